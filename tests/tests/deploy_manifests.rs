//! deploy/kubernetes: the manifests, the overlays and the collector configuration.
//!
//! Every manifest, and every object each overlay renders to, passes kubernetes-validate in
//! strict mode (the Kubernetes OpenAPI schemas, bundled in the PyPI package: unknown fields,
//! wrong types, missing required fields and unknown kinds or API versions are errors) for the
//! oldest and the newest Kubernetes the deployment supports. Broken copies fail, so a validator
//! that accepts everything cannot pass. Then the pieces must agree where no schema looks:
//! selectors and labels, Service and container ports, references by name, the agent's
//! capability set and its config file (read by the real agent), the collector's pipelines, and what each overlay says
//! it changes.
//!
//! Tools (scripts/setup.sh installs them): python3 with kubernetes-validate and PyYAML. When
//! kustomize or kubectl (its built-in kustomize) is on PATH, each overlay is rendered by it and
//! by deploy/kubernetes/render.py and the two must agree object for object; without either,
//! render.py's output alone is validated. HOPTRACE_KUSTOMIZE=off skips the comparison.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use hoptrace_tests::agent::hoptrace_bin;
use serde_json::{Value, json};

/// The oldest and the newest Kubernetes minor version whose schemas every object must pass.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.28", "1.37"];
const VALIDATOR_INSTALL: &str =
    "python3 -m pip install kubernetes-validate==1.37.0 (scripts/setup.sh does)";
const OVERLAYS: [&str; 4] = ["least-privilege", "privileged", "tracing-off", "tracing-on"];
/// The capabilities the agent and its check get, and no others (agent-daemonset.yaml says why).
const AGENT_CAPABILITIES: [&str; 5] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
];

// ---------------------------------------------------------------------------------------------
// Paths, processes and scratch space

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn kube() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn render_py() -> PathBuf {
    kube().join("render.py")
}

/// A fresh directory, under cargo's scratch space for integration tests; one name per test
/// (tests run in parallel), left behind for a look after a failure.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("deploy_manifests")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    fs::canonicalize(&dir).expect("canonical scratch path")
}

fn run(command: &mut Command, what: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn python() -> Command {
    Command::new("python3")
}

/// Fails the first test that needs the validator with the command that installs it.
fn require_validator() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let out = run(
            python().args(["-c", "import kubernetes_validate, yaml"]),
            "checking for kubernetes-validate",
        );
        assert!(
            out.status.success(),
            "kubernetes-validate is not installed for python3: {VALIDATOR_INSTALL}\n{}",
            text(&out.stderr)
        );
    });
}

// ---------------------------------------------------------------------------------------------
// YAML (through render.py, which uses PyYAML) and rendering

fn parse_json_docs(out: Output, what: &str) -> Vec<Value> {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("{what}: expected a JSON array, got {other:?}"),
    }
}

/// The documents of a YAML file.
fn yaml_file(path: &Path) -> Vec<Value> {
    require_validator();
    parse_json_docs(
        run(
            python().arg(render_py()).arg("json").arg(path),
            "render.py json",
        ),
        &format!("parsing {}", path.display()),
    )
}

/// The documents of a YAML string.
fn yaml_str(yaml: &str, what: &str) -> Vec<Value> {
    require_validator();
    let mut child = python()
        .arg(render_py())
        .args(["json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning render.py json -");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("writing YAML to render.py");
    parse_json_docs(child.wait_with_output().expect("render.py json -"), what)
}

/// `dir` rendered by render.py, or its error output.
fn try_render_lite(dir: &Path) -> Result<Vec<Value>, String> {
    require_validator();
    let out = run(
        python()
            .arg(render_py())
            .arg("build")
            .arg(dir)
            .arg("--json"),
        "render.py build",
    );
    if !out.status.success() {
        return Err(text(&out.stderr));
    }
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(docs)) => Ok(docs),
        other => Err(format!("render.py build printed {other:?}")),
    }
}

fn render_lite(dir: &Path) -> Vec<Value> {
    try_render_lite(dir).unwrap_or_else(|e| panic!("render.py build {}: {e}", dir.display()))
}

/// The real kustomize, if this machine has one that can render these kustomizations:
/// `kustomize build` or `kubectl kustomize` (kubectl before 1.21 embeds a kustomize without
/// components, which the probe below turns away).
fn kustomize() -> Option<&'static [&'static str]> {
    static TOOL: OnceLock<Option<&'static [&'static str]>> = OnceLock::new();
    *TOOL.get_or_init(|| {
        if std::env::var("HOPTRACE_KUSTOMIZE").is_ok_and(|v| v == "off") {
            return None;
        }
        let probe = scratch("kustomize-probe");
        fs::create_dir_all(probe.join("component")).expect("probe dir");
        fs::write(
            probe.join("kustomization.yaml"),
            "resources: [map.yaml]\ncomponents: [component]\n",
        )
        .expect("probe");
        fs::write(
            probe.join("map.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n",
        )
        .expect("probe");
        fs::write(
            probe.join("component/kustomization.yaml"),
            r#"
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
patches:
  - target: {kind: ConfigMap}
    patch: '[{"op": "add", "path": "/data", "value": {}}]'
"#,
        )
        .expect("probe");
        let candidates: [&'static [&'static str]; 2] =
            [&["kustomize", "build"], &["kubectl", "kustomize"]];
        let found = candidates.into_iter().find(|tool| {
            Command::new(tool[0])
                .args(&tool[1..])
                .arg(&probe)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        match found {
            Some(tool) => eprintln!("comparing render.py with `{}`", tool.join(" ")),
            None => {
                eprintln!(
                    "no kustomize with components on PATH: overlays are rendered by render.py alone"
                )
            }
        }
        found
    })
}

fn render_kustomize(dir: &Path) -> Option<Vec<Value>> {
    let tool = kustomize()?;
    let out = run(Command::new(tool[0]).args(&tool[1..]).arg(dir), "kustomize");
    assert!(
        out.status.success(),
        "`{} {}` failed (render.py did not; HOPTRACE_KUSTOMIZE=off skips the comparison):\n{}",
        tool.join(" "),
        dir.display(),
        text(&out.stderr)
    );
    Some(yaml_str(
        &text(&out.stdout),
        &format!("{} output", tool.join(" ")),
    ))
}

/// Renders `dir` with render.py and, where available, kustomize; they must agree.
fn render(dir: &Path) -> Vec<Value> {
    let lite = render_lite(dir);
    if let Some(real) = render_kustomize(dir) {
        let by_id = |docs: &[Value]| {
            docs.iter()
                .map(|d| (id(d), d.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let (lite_map, real_map) = (by_id(&lite), by_id(&real));
        assert_eq!(
            lite_map.keys().collect::<Vec<_>>(),
            real_map.keys().collect::<Vec<_>>(),
            "{}: render.py and kustomize render different objects",
            dir.display()
        );
        for (key, object) in &lite_map {
            assert!(
                object == &real_map[key],
                "{}: {key} differs between render.py and kustomize:\nrender.py: {object:#}\nkustomize: {:#}",
                dir.display(),
                real_map[key]
            );
        }
    }
    lite
}

// ---------------------------------------------------------------------------------------------
// Validation

/// Runs kubernetes-validate (strict, every version in KUBERNETES_VERSIONS) over `file`, which
/// holds `docs` objects. Ok only if every object passed against every version; a WARN (no
/// schema for the kind or API version) counts as a failure.
fn validate(file: &Path, docs: usize) -> Result<(), String> {
    require_validator();
    let mut command = python();
    command.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        command.args(["-k", version]);
    }
    let out = run(command.arg(file), "kubernetes-validate");
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let passed = report
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    let complaints = report.lines().any(|l| !l.starts_with("INFO "));
    let expected = docs * KUBERNETES_VERSIONS.len();
    if out.status.success() && !complaints && passed == expected {
        Ok(())
    } else {
        Err(format!(
            "{} ({passed} of {expected} checks passed):\n{report}",
            file.display()
        ))
    }
}

/// Validates objects (rendered output) by writing them to a file first.
fn validate_objects(objects: &[Value], dir: &Path, name: &str) -> Result<(), String> {
    let file = dir.join(format!("{name}.yaml"));
    let mut yaml = String::new();
    for object in objects {
        // JSON is YAML: one document per object.
        yaml.push_str("---\n");
        yaml.push_str(&object.to_string());
        yaml.push('\n');
    }
    fs::write(&file, yaml).expect("writing rendered objects");
    validate(&file, objects.len())
}

// ---------------------------------------------------------------------------------------------
// Objects

fn id(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            panic!(
                "no {kind} {name} among {:?}",
                objects.iter().map(id).collect::<Vec<_>>()
            )
        })
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value}"))
}

fn array_of<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what}: expected an array, got {value}"))
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(workload: &'a Value, list: &str, name: &str) -> &'a Value {
    array_of(&pod_spec(workload)[list], list)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{}: no {list} entry named {name}", id(workload)))
}

fn workloads(objects: &[Value]) -> impl Iterator<Item = &Value> {
    objects.iter().filter(|o| {
        matches!(
            o["kind"].as_str(),
            Some("DaemonSet" | "Deployment" | "StatefulSet")
        )
    })
}

fn base() -> &'static [Value] {
    static BASE: OnceLock<Vec<Value>> = OnceLock::new();
    BASE.get_or_init(|| render(&kube().join("base")))
}

fn overlay(name: &str) -> Vec<Value> {
    render(&kube().join("overlays").join(name))
}

fn config_map_data<'a>(objects: &'a [Value], name: &str) -> &'a serde_json::Map<String, Value> {
    find(objects, "ConfigMap", name)["data"]
        .as_object()
        .unwrap_or_else(|| panic!("ConfigMap {name} has no data"))
}

/// The agent's config file as the ConfigMap carries it.
fn agent_config_file(objects: &[Value]) -> &str {
    str_of(
        &config_map_data(objects, "hoptrace-agent")["hoptrace.toml"],
        "hoptrace.toml",
    )
}

/// What the real agent makes of `file` (`hoptrace agent --config F --print-config`), without
/// this process's OTEL_* and HOPTRACE_* variables: its parser, its unknown-key check, its values.
fn effective_agent_config(file: &str) -> String {
    // Tests run in parallel: one scratch directory per call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = scratch(&format!("agent-config-{call}")).join("hoptrace.toml");
    fs::write(&path, file).expect("config file");
    let mut command = Command::new(hoptrace_bin().expect("hoptrace binary"));
    command
        .args(["agent", "--print-config", "--config"])
        .arg(&path);
    for (key, _) in std::env::vars() {
        if key.starts_with("OTEL_") || key.starts_with("HOPTRACE_") {
            command.env_remove(key);
        }
    }
    let out = run(&mut command, "hoptrace agent --print-config");
    assert!(
        out.status.success(),
        "the agent refuses the ConfigMap's file: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The value of `key` in a section of --print-config's output (`key = value  # source`).
fn setting<'a>(effective: &'a str, section: &str, key: &str) -> &'a str {
    let mut current = "";
    for line in effective.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name;
        } else if current == section
            && let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(" = "))
        {
            return rest.split("  #").next().unwrap_or("").trim_matches('"');
        }
    }
    panic!("no {section}.{key} in:\n{effective}")
}

/// Bytes in a memory quantity such as 64Mi or 1G.
fn bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return number
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("quantity {quantity}: {e}"))
                * factor;
        }
    }
    quantity
        .parse()
        .unwrap_or_else(|e| panic!("quantity {quantity}: {e}"))
}

/// The container port a Service port's targetPort refers to (by name or number), if any.
fn target_container_port(workload: &Value, target: &Value) -> Option<u64> {
    array_of(&pod_spec(workload)["containers"], "containers")
        .iter()
        .find_map(|c| {
            c["ports"].as_array()?.iter().find_map(|p| {
                let hit = match target {
                    Value::String(name) => p["name"] == *name,
                    Value::Number(_) => p["containerPort"] == *target,
                    _ => false,
                };
                hit.then(|| p["containerPort"].as_u64()).flatten()
            })
        })
}

/// The workload whose pods a Service selects.
fn selected_workload<'a>(objects: &'a [Value], service: &Value) -> &'a Value {
    let selector = service["spec"]["selector"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no selector", id(service)));
    let hits: Vec<_> = workloads(objects)
        .filter(|w| {
            selector
                .iter()
                .all(|(k, v)| w["spec"]["template"]["metadata"]["labels"][k] == *v)
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{} selects {} workloads",
        id(service),
        hits.len()
    );
    hits[0]
}

/// Service port number -> container port number, for a Service and the workload it selects.
fn service_ports(objects: &[Value], service_name: &str) -> BTreeMap<u64, u64> {
    let service = find(objects, "Service", service_name);
    let workload = selected_workload(objects, service);
    array_of(&service["spec"]["ports"], "Service ports")
        .iter()
        .map(|p| {
            let target = if p["targetPort"].is_null() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            let container_port = target_container_port(workload, target).unwrap_or_else(|| {
                panic!(
                    "{}: targetPort {target} matches no container port of {}",
                    id(service),
                    id(workload)
                )
            });
            (p["port"].as_u64().expect("port number"), container_port)
        })
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// (host, port) of an endpoint URL such as http://hoptrace-collector:4317 or tempo:4317.
fn host_port(endpoint: &str) -> (String, u64) {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{endpoint}: no port"));
    (
        host.to_string(),
        port.parse()
            .unwrap_or_else(|e| panic!("{endpoint}: port: {e}")),
    )
}

fn port_of(endpoint: &str) -> u64 {
    host_port(endpoint).1
}

// ---------------------------------------------------------------------------------------------
// The files

struct Files {
    /// Manifests listed as `resources` of some kustomization.
    manifests: BTreeSet<PathBuf>,
    /// Files a configMapGenerator reads.
    generated_from: BTreeSet<PathBuf>,
    kustomizations: BTreeSet<PathBuf>,
}

fn files() -> Files {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut all = Vec::new();
    walk(&kube(), &mut all);
    let mut files = Files {
        manifests: BTreeSet::new(),
        generated_from: BTreeSet::new(),
        kustomizations: BTreeSet::new(),
    };
    for path in all
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
    {
        let dir = path.parent().expect("parent");
        files.kustomizations.insert(path.clone());
        let k = &yaml_file(path)[0];
        for resource in k["resources"].as_array().into_iter().flatten() {
            let target = dir.join(str_of(resource, "resource"));
            if target.is_file() {
                files
                    .manifests
                    .insert(fs::canonicalize(&target).expect("canonical path"));
            }
        }
        for generator in k["configMapGenerator"].as_array().into_iter().flatten() {
            for file in generator["files"].as_array().into_iter().flatten() {
                let file = str_of(file, "generator file");
                let file = file.split_once('=').map_or(file, |(_, path)| path);
                files
                    .generated_from
                    .insert(fs::canonicalize(dir.join(file)).expect("canonical path"));
            }
        }
    }
    // Nothing under deploy/kubernetes escapes validation by not being listed anywhere.
    for path in &all {
        let canonical = fs::canonicalize(path).expect("canonical path");
        let listed = files.kustomizations.contains(path)
            || files.manifests.contains(&canonical)
            || files.generated_from.contains(&canonical)
            || path == &render_py();
        assert!(
            listed,
            "{} is neither a manifest, a kustomization nor a generator input",
            path.display()
        );
    }
    files
}

// ---------------------------------------------------------------------------------------------
// Schema validation

#[test]
fn every_manifest_passes_strict_schema_validation() {
    let files = files();
    assert!(
        files.manifests.len() >= 7,
        "found only {:?}",
        files.manifests
    );
    let failures: Vec<_> = files
        .manifests
        .iter()
        .filter_map(|file| validate(file, yaml_file(file).len()).err())
        .collect();
    assert!(
        failures.is_empty(),
        "manifests failing validation:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_overlay_renders_and_its_output_passes_strict_schema_validation() {
    let dir = scratch("overlays");
    let mut failures = Vec::new();
    let mut renders = vec![("base".to_string(), base().to_vec())];
    for name in OVERLAYS {
        renders.push((name.to_string(), overlay(name)));
    }
    renders.push(("composed".to_string(), composed().to_vec()));
    for (name, objects) in &renders {
        assert!(
            objects.len() >= 13,
            "{name}: only {} objects",
            objects.len()
        );
        if let Err(e) = validate_objects(objects, &dir, name) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "rendered output failing validation:\n{}",
        failures.join("\n")
    );
}

/// `deploy/kubernetes/<path>` as a path relative to `dir` (kustomize refuses absolute ones).
fn relative_from(dir: &Path, path: &str) -> String {
    let up = "../".repeat(dir.components().count() - 1);
    let kube = fs::canonicalize(kube()).expect("canonical deploy/kubernetes");
    format!(
        "{up}{}/{path}",
        kube.strip_prefix("/").expect("absolute path").display()
    )
}

/// A user's overlay as deploy/README.md describes one: components combined, the image moved to
/// a registry, another namespace, in a scratch directory.
fn composed() -> &'static [Value] {
    static COMPOSED: OnceLock<Vec<Value>> = OnceLock::new();
    COMPOSED.get_or_init(|| {
        let dir = scratch("composed");
        let kustomization = r#"
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: lab-tracing
resources:
  - KUBE/base
components:
  - KUBE/components/sys-admin
  - KUBE/components/tracing-off
images:
  - name: hoptrace
    newName: registry.lab.example/hoptrace
    newTag: "0.1.1"
"#;
        let kustomization = kustomization.replace("KUBE/", &relative_from(&dir, ""));
        fs::write(dir.join("kustomization.yaml"), kustomization).expect("writing kustomization");
        render(&dir)
    })
}

/// One deliberate breakage of a manifest, and what the validator must say about it.
struct Breakage {
    file: &'static str,
    from: &'static str,
    to: &'static str,
    expect: &'static str,
}

#[test]
fn the_validator_rejects_broken_manifests() {
    let breakages = [
        // An unknown field (a typo): strict mode rejects additional properties.
        Breakage {
            file: "agent-daemonset.yaml",
            from: "hostPID: true",
            to: "hostPid: true",
            expect: "'hostPid' was unexpected",
        },
        // Wrong types.
        Breakage {
            file: "correlator.yaml",
            from: "containerPort: 4317",
            to: "containerPort: \"4317\"",
            expect: "is not of type 'integer'",
        },
        Breakage {
            file: "agent-daemonset.yaml",
            from: "readOnly: true",
            to: "readOnly: \"yes\"",
            expect: "is not of type 'boolean'",
        },
        Breakage {
            file: "agent-daemonset.yaml",
            from: "- BPF",
            to: "- 39",
            expect: "is not of type 'string'",
        },
        Breakage {
            file: "agent-daemonset.yaml",
            from: "memory: 128Mi",
            to: "memory: [128Mi]",
            expect: "is not valid under any of the given schemas",
        },
        // A missing required field.
        Breakage {
            file: "agent-daemonset.yaml",
            from: "- name: check",
            to: "- nmae: check",
            expect: "'name' is a required property",
        },
        // An unknown kind and a removed API version: no schema, which must not count as a pass.
        Breakage {
            file: "agent-daemonset.yaml",
            from: "kind: DaemonSet",
            to: "kind: DeamonSet",
            expect: "Couldn't find schema for kind DeamonSet",
        },
        Breakage {
            file: "collector.yaml",
            from: "apiVersion: apps/v1",
            to: "apiVersion: apps/v1beta2",
            expect: "Couldn't find schema",
        },
    ];
    let dir = scratch("broken");
    for (index, b) in breakages.iter().enumerate() {
        let original_path = kube().join("base").join(b.file);
        let original = fs::read_to_string(&original_path).expect("reading manifest");
        let docs = yaml_file(&original_path).len();
        assert!(
            original.contains(b.from),
            "{} no longer contains {:?}: update this test",
            b.file,
            b.from
        );
        // The unbroken copy passes from the same place, so the failure is the edit's doing.
        let intact = dir.join(format!("{index}-intact-{}", b.file));
        fs::write(&intact, &original).expect("writing copy");
        validate(&intact, docs).unwrap_or_else(|e| panic!("the intact copy fails: {e}"));
        let broken = dir.join(format!("{index}-broken-{}", b.file));
        fs::write(&broken, original.replacen(b.from, b.to, 1)).expect("writing broken copy");
        match validate(&broken, docs) {
            Ok(()) => panic!("{}: {:?} -> {:?} passed validation", b.file, b.from, b.to),
            Err(report) => {
                assert!(
                    report.contains(b.expect),
                    "{}: expected {:?} in:\n{report}",
                    b.file,
                    b.expect
                )
            }
        }
    }
    // The rendered path too: a broken object among rendered ones.
    let mut objects = base().to_vec();
    let agent = objects
        .iter_mut()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("DaemonSet");
    agent["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!("30s");
    let err = validate_objects(&objects, &dir, "rendered-broken")
        .expect_err("a string grace period passed");
    assert!(err.contains("terminationGracePeriodSeconds"), "{err}");
}

#[test]
fn render_py_refuses_what_it_does_not_implement() {
    let dir = scratch("refuse");
    // (a kustomization, BASE standing for the relative path to the base; what render.py says)
    let cases = [
        // A kustomize feature render.py does not implement.
        (
            "resources: [BASE]\ncommonLabels: {team: lab}\n",
            "commonLabels not supported",
        ),
        // Generated names with hashes (render.py cannot reproduce kustomize's hash).
        (
            "configMapGenerator:\n  - name: x\n    literals: [a=b]\n",
            "disableNameSuffixHash",
        ),
        // A JSON patch whose guard fails: the components' `test` operations catch a reordering.
        (
            r#"
resources: [BASE]
patches:
  - target: {kind: DaemonSet, name: hoptrace-agent}
    patch: |-
      - op: test
        path: /spec/template/spec/containers/0/name
        value: check
"#,
            "test failed",
        ),
        // A path that does not exist.
        (
            r#"
resources: [BASE]
patches:
  - target: {kind: ConfigMap, name: hoptrace-agent}
    patch: |-
      - op: replace
        path: /data/NO_SUCH_KEY
        value: x
"#,
            "does not exist",
        ),
    ];
    for (index, (kustomization, expect)) in cases.iter().enumerate() {
        let case = dir.join(index.to_string());
        fs::create_dir_all(&case).expect("case dir");
        let kustomization = kustomization.replace("BASE", &relative_from(&case, "base"));
        fs::write(case.join("kustomization.yaml"), &kustomization).expect("writing");
        match try_render_lite(&case) {
            Ok(_) => panic!("render.py accepted:\n{kustomization}"),
            Err(e) => assert!(e.contains(expect), "expected {expect:?} in {e}"),
        }
    }
}

#[test]
fn the_agent_runs_least_privileged_with_the_host_views_it_needs() {
    let objects = base();
    let ds = find(objects, "DaemonSet", "hoptrace-agent");
    let spec = pod_spec(ds);
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(
        spec["dnsPolicy"], "ClusterFirstWithHostNet",
        "a hostNetwork pod cannot resolve Services otherwise"
    );
    assert_eq!(spec["automountServiceAccountToken"], false);
    let names = |list: &str| {
        array_of(&spec[list], list)
            .iter()
            .map(|c| c["name"].clone())
            .collect::<Vec<_>>()
    };
    // The overlays' JSON patches address the containers by index: check first, agent first.
    assert_eq!(names("initContainers"), [json!("check")]);
    assert_eq!(names("containers"), [json!("agent")]);
    let check = container(ds, "initContainers", "check");
    let agent = container(ds, "containers", "agent");
    assert_eq!(
        check["args"],
        json!(["check"]),
        "the init container must be `hoptrace check`"
    );
    assert_eq!(check["image"], agent["image"]);

    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(
        sc["runAsUser"], 0,
        "added capabilities reach the effective set of uid 0 only"
    );
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let added: BTreeSet<_> = array_of(&sc["capabilities"]["add"], "capabilities.add")
        .iter()
        .map(|c| str_of(c, "capability"))
        .collect();
    assert_eq!(
        added,
        AGENT_CAPABILITIES.into_iter().collect(),
        "the base's capability set"
    );
    assert_eq!(
        check["securityContext"], *sc,
        "check must probe with exactly the agent's privileges"
    );

    // Host paths, mounted where the agent looks for them, read-only (besides the config file's
    // ConfigMap volume, checked with the configuration, and the API token's projected volume,
    // checked with the RBAC).
    let volumes: BTreeMap<_, _> = array_of(&spec["volumes"], "volumes")
        .iter()
        .filter(|v| v["configMap"].is_null() && v["projected"].is_null())
        .map(|v| {
            (
                str_of(&v["name"], "volume name"),
                str_of(&v["hostPath"]["path"], "hostPath"),
            )
        })
        .collect();
    let expected = [
        ("btf", "/sys/kernel/btf"),
        ("tracefs", "/sys/kernel/tracing"),
        ("bpffs", "/sys/fs/bpf"),
        ("netns", "/run/netns"),
    ];
    assert_eq!(volumes, expected.into_iter().collect());
    for c in [check, agent] {
        for mount in array_of(&c["volumeMounts"], "volumeMounts") {
            let name = str_of(&mount["name"], "mount name");
            if name == "config" || name == API_ACCESS {
                continue;
            }
            assert_eq!(
                mount["mountPath"], volumes[name],
                "{name} mounted where the host has it"
            );
            assert_eq!(mount["readOnly"], true, "{name} read-only");
        }
    }
    let agent_mounts: BTreeSet<_> = array_of(&agent["volumeMounts"], "mounts")
        .iter()
        .map(|m| str_of(&m["name"], "name"))
        .filter(|name| *name != "config" && *name != API_ACCESS)
        .collect();
    assert_eq!(agent_mounts, volumes.keys().copied().collect());
    let netns_mount = array_of(&agent["volumeMounts"], "mounts")
        .iter()
        .find(|m| m["name"] == "netns")
        .expect("netns mount");
    assert_eq!(
        netns_mount["mountPropagation"], "HostToContainer",
        "namespaces added later must show up"
    );

    // Memory: requested and limited (eBPF maps are charged to the pod's cgroup).
    for c in [check, agent] {
        let request = bytes(str_of(
            &c["resources"]["requests"]["memory"],
            "memory request",
        ));
        let limit = bytes(str_of(&c["resources"]["limits"]["memory"], "memory limit"));
        assert!(
            (64 << 20..=limit).contains(&request) && limit <= 256 << 20,
            "memory {request}..{limit}"
        );
    }

    // Shutdown: the grace period outlasts the flush, and the flush outlasts one export.
    let effective = effective_agent_config(agent_config_file(objects));
    let shutdown: f64 = setting(&effective, "", "shutdown_timeout")
        .parse()
        .expect("seconds");
    let export_ms: f64 = setting(&effective, "export", "export_timeout_ms")
        .parse()
        .expect("ms");
    let grace = spec["terminationGracePeriodSeconds"]
        .as_f64()
        .expect("grace period");
    assert!(
        grace >= shutdown + 5.0,
        "terminationGracePeriodSeconds {grace} vs --shutdown-timeout {shutdown}"
    );
    assert!(
        export_ms / 1000.0 < shutdown,
        "export_timeout_ms {export_ms} vs shutdown_timeout {shutdown} s"
    );
}

/// The agent's projected service account volume: token and CA for the API server lookup.
const API_ACCESS: &str = "api-access";

/// Kinds the manifests hold that have no namespace.
const CLUSTER_SCOPED: [&str; 3] = ["Namespace", "ClusterRole", "ClusterRoleBinding"];

#[test]
fn the_agent_may_only_read_pods_and_only_its_agent_container_has_a_token() {
    let objects = base();
    // Read-only, pods only, bound to the agent's ServiceAccount.
    let role = find(objects, "ClusterRole", "hoptrace-agent");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = find(objects, "ClusterRoleBinding", "hoptrace-agent");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "hoptrace-agent");
    let ds = find(objects, "DaemonSet", "hoptrace-agent");
    let spec = pod_spec(ds);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                "namespace": ds["metadata"]["namespace"]}])
    );
    // No automatic token for every container: one projected into the agent's, where
    // in-cluster clients (and the agent's defaults) look, with the cluster CA.
    assert_eq!(spec["automountServiceAccountToken"], false);
    let volume = array_of(&spec["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == API_ACCESS)
        .expect("the token volume");
    let sources = array_of(&volume["projected"]["sources"], "sources");
    assert!(
        sources
            .iter()
            .any(|s| s["serviceAccountToken"]["path"] == "token")
    );
    assert!(
        sources
            .iter()
            .any(|s| s["configMap"]["name"] == "kube-root-ca.crt"
                && s["configMap"]["items"] == json!([{"key": "ca.crt", "path": "ca.crt"}]))
    );
    let mounted = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == API_ACCESS)
            .cloned()
    };
    assert_eq!(mounted(container(ds, "initContainers", "check")), None);
    let mount = mounted(container(ds, "containers", "agent")).expect("agent token mount");
    assert_eq!(mount["readOnly"], true);
    // The config turns the lookup on, and the files are where the agent reads them.
    let effective = effective_agent_config(agent_config_file(objects));
    assert_eq!(setting(&effective, "kubernetes", "api"), "true");
    let mount_path = Path::new(str_of(&mount["mountPath"], "mountPath"));
    for (key, file) in [("token_file", "token"), ("ca_file", "ca.crt")] {
        assert_eq!(
            Path::new(setting(&effective, "kubernetes", key)),
            mount_path.join(file)
        );
    }
    // The node whose pods it watches: HOPTRACE_NODE_NAME from the downward API, checked with
    // the environment below.
}

#[test]
fn the_agent_reads_the_config_files_it_is_given_and_the_environment_is_well_formed() {
    let objects = base();
    let ds = find(objects, "DaemonSet", "hoptrace-agent");
    let agent = container(ds, "containers", "agent");

    // The ConfigMap is one file, mounted where the agent's --config looks.
    let data = config_map_data(objects, "hoptrace-agent");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["hoptrace.toml"]);
    let args: Vec<&str> = array_of(&agent["args"], "args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert_eq!(args[..2], ["agent", "--config"]);
    let config_path = Path::new(args[2]);
    let volume = array_of(&pod_spec(ds)["volumes"], "volumes")
        .iter()
        .find(|v| v["configMap"]["name"] == "hoptrace-agent")
        .expect("a volume of the agent ConfigMap");
    let mount = array_of(&agent["volumeMounts"], "mounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the config volume is mounted");
    assert_eq!(
        config_path.parent().unwrap(),
        Path::new(str_of(&mount["mountPath"], "mountPath"))
    );
    assert_eq!(config_path.file_name().unwrap(), "hoptrace.toml");

    // The real agent accepts the file (no unknown key, no bad value) and reads what it says.
    let effective = effective_agent_config(agent_config_file(objects));
    assert_eq!(setting(&effective, "export", "protocol"), "grpc");
    assert_eq!(setting(&effective, "export", "disabled"), "false");
    assert!(effective.contains("# resolved: OTLP grpc to http://hoptrace-collector:4317"));
    assert_eq!(setting(&effective, "scope", "netns"), "[]");
    // Metrics on the container port the DaemonSet declares.
    let metrics_port = port_of(&format!(
        "http://{}",
        setting(&effective, "", "metrics_addr")
    ));
    assert!(
        array_of(&agent["ports"], "ports")
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(metrics_port)),
        "metrics port {metrics_port} not declared"
    );
    // A broken copy is refused: the check above can fail.
    let broken = agent_config_file(objects).replace("[scope]", "[scopes]");
    let path = scratch("broken-agent-config").join("hoptrace.toml");
    fs::write(&path, broken).unwrap();
    let out = run(
        Command::new(hoptrace_bin().unwrap())
            .args(["agent", "--print-config", "--config"])
            .arg(&path),
        "hoptrace agent --print-config (broken file)",
    );
    assert!(!out.status.success() && text(&out.stderr).contains("unknown field `scopes`"));

    // $(NAME) must name something defined before it (Kubernetes leaves unknown references as
    // they are).
    let env = array_of(&agent["env"], "env");
    let mut defined = BTreeSet::new();
    for var in env {
        let name = str_of(&var["name"], "env name");
        if let Some(value) = var["value"].as_str() {
            for reference in value.split("$(").skip(1) {
                let referenced = reference.split(')').next().unwrap_or("");
                assert!(
                    defined.contains(referenced),
                    "{name} refers to $({referenced}), not defined before it"
                );
            }
        }
        defined.insert(name.to_string());
    }
    // The node name (k8s.node.name on every span) from the downward API.
    let node = env
        .iter()
        .find(|e| e["name"] == "HOPTRACE_NODE_NAME")
        .expect("HOPTRACE_NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
}

#[test]
fn the_correlators_are_reached_per_pod_and_ready_on_grpc() {
    let objects = base();
    let service = find(objects, "Service", "hoptrace-correlator");
    assert_eq!(
        service["spec"]["clusterIP"], "None",
        "headless: pod addresses for the loadbalancing exporter"
    );
    let ports = service_ports(objects, "hoptrace-correlator");
    assert_eq!(ports, BTreeMap::from([(4317, 4317), (4318, 4318)]));
    let deployment = selected_workload(objects, service);
    let correlator = container(deployment, "containers", "correlator");
    assert_eq!(correlator["args"], json!(["correlate"]));
    let agent = container(
        find(objects, "DaemonSet", "hoptrace-agent"),
        "containers",
        "agent",
    );
    assert_eq!(
        correlator["image"], agent["image"],
        "one image for agent and correlator"
    );
    let readiness = &correlator["readinessProbe"]["tcpSocket"]["port"];
    assert_eq!(
        target_container_port(deployment, readiness),
        Some(4317),
        "readiness on the gRPC port"
    );
    assert_eq!(
        pod_spec(deployment)["securityContext"]["runAsNonRoot"],
        true
    );
}

#[test]
fn the_collector_routes_agent_spans_by_trace_id_and_correlated_spans_to_tempo() {
    let objects = base();
    let deployment = find(objects, "Deployment", "hoptrace-collector");
    let collector = container(deployment, "containers", "otel-collector");
    assert!(
        str_of(&collector["image"], "image").starts_with("otel/opentelemetry-collector-contrib:")
    );

    // The configuration the Deployment actually reads.
    let config_arg = array_of(&collector["args"], "args")
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--config="))
        .expect("--config=");
    let (config_dir, config_key) = config_arg.rsplit_once('/').expect("config path");
    let mount = array_of(&collector["volumeMounts"], "mounts")
        .iter()
        .find(|m| m["mountPath"] == config_dir)
        .expect("config mount");
    let volume = array_of(&pod_spec(deployment)["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("config volume");
    let data = config_map_data(
        objects,
        str_of(&volume["configMap"]["name"], "configMap name"),
    );
    let config = &yaml_str(
        str_of(&data[config_key], "collector config"),
        "collector config",
    )[0];

    // Every component a pipeline names is defined, and every defined one is used.
    let pipelines = config["service"]["pipelines"]
        .as_object()
        .expect("service.pipelines");
    for section in ["receivers", "processors", "exporters"] {
        let defined: BTreeSet<&str> = config[section]
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let used: BTreeSet<&str> = pipelines
            .values()
            .flat_map(|p| {
                p[section]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| str_of(c, section))
            })
            .collect();
        assert_eq!(used, defined, "{section}: used in pipelines vs defined");
    }
    for extension in array_of(&config["service"]["extensions"], "extensions") {
        assert!(
            config["extensions"][str_of(extension, "extension")].is_object(),
            "extension {extension} undefined"
        );
    }

    // Receivers listen on every interface (the collector's own default is localhost), on ports
    // the collector's Service forwards to.
    let service = service_ports(objects, "hoptrace-collector");
    let receiver_port = |name: &str, protocol: &str| -> u64 {
        let endpoint = str_of(
            &config["receivers"][name]["protocols"][protocol]["endpoint"],
            "receiver endpoint",
        );
        assert!(
            endpoint.starts_with("0.0.0.0:"),
            "{name} {protocol} listens on {endpoint}"
        );
        port_of(endpoint)
    };
    let pipeline_with = |receiver_port_wanted: u64| -> (&String, &Value) {
        pipelines
            .iter()
            .find(|(_, p)| {
                array_of(&p["receivers"], "receivers")
                    .iter()
                    .any(|r| receiver_port(str_of(r, "receiver"), "grpc") == receiver_port_wanted)
            })
            .unwrap_or_else(|| panic!("no pipeline receives on {receiver_port_wanted}"))
    };

    // Agents -> collector: the agents' endpoint is this Service and a gRPC receiver port.
    let agent_config = effective_agent_config(agent_config_file(objects));
    let (host, agent_port) = host_port(setting(&agent_config, "export", "endpoint"));
    assert_eq!(host, "hoptrace-collector");
    assert_eq!(setting(&agent_config, "export", "protocol"), "grpc");
    let (agents_name, agents) = pipeline_with(service[&agent_port]);
    for receiver in array_of(&agents["receivers"], "receivers") {
        let receiver = str_of(receiver, "receiver");
        assert!(
            service
                .values()
                .any(|p| *p == receiver_port(receiver, "http")),
            "{receiver}: http port not in the Service"
        );
    }

    // ... -> loadbalancing by trace ID over the correlator Service's gRPC port.
    assert_eq!(
        agents["exporters"],
        json!(["loadbalancing"]),
        "{agents_name}"
    );
    let lb = &config["exporters"]["loadbalancing"];
    assert_eq!(lb["routing_key"], "traceID");
    assert!(lb["protocol"]["otlp"].is_object() && lb["protocol"]["otlp"]["endpoint"].is_null());
    let resolver_service = str_of(&lb["resolver"]["k8s"]["service"], "resolver.k8s.service");
    let (svc_name, svc_namespace) = resolver_service
        .split_once('.')
        .map_or((resolver_service, None), |(n, ns)| (n, Some(ns)));
    let correlator_service = find(objects, "Service", svc_name);
    if let Some(namespace) = svc_namespace {
        assert_eq!(correlator_service["metadata"]["namespace"], namespace);
    }
    let correlator_ports = service_ports(objects, svc_name);
    let lb_ports: Vec<u64> = array_of(&lb["resolver"]["k8s"]["ports"], "ports")
        .iter()
        .map(|p| p.as_u64().expect("port"))
        .collect();
    assert_eq!(lb_ports, [4317]);
    assert!(
        lb_ports
            .iter()
            .all(|p| correlator_ports.values().any(|c| c == p)),
        "loadbalancing ports {lb_ports:?} vs correlator {correlator_ports:?}"
    );

    // Correlators -> the collector's other pipeline -> Tempo.
    let correlator = container(
        selected_workload(objects, correlator_service),
        "containers",
        "correlator",
    );
    let (host, correlated_port) = host_port(
        env_value(correlator, "OTEL_EXPORTER_OTLP_ENDPOINT").expect("correlator endpoint"),
    );
    assert_eq!(host, "hoptrace-collector");
    let (correlated_name, correlated) = pipeline_with(service[&correlated_port]);
    assert_ne!(correlated_name, agents_name);
    let exporters = array_of(&correlated["exporters"], "exporters");
    assert_eq!(exporters.len(), 1);
    let tempo_exporter = str_of(&exporters[0], "exporter");
    assert!(
        tempo_exporter == "otlp" || tempo_exporter.starts_with("otlp/"),
        "{tempo_exporter} is not an otlp exporter"
    );
    let endpoint = str_of(
        &config["exporters"][tempo_exporter]["endpoint"],
        "tempo endpoint",
    );
    let endpoint = match endpoint
        .strip_prefix("${env:")
        .and_then(|e| e.strip_suffix('}'))
    {
        Some(var) => {
            env_value(collector, var).unwrap_or_else(|| panic!("{var} not set on the collector"))
        }
        None => endpoint,
    };
    assert_eq!(endpoint, "tempo:4317");

    // Health: the probes ask the health_check extension.
    let health_port = port_of(str_of(
        &config["extensions"]["health_check"]["endpoint"],
        "health_check endpoint",
    ));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            target_container_port(deployment, &collector[probe]["httpGet"]["port"]),
            Some(health_port),
            "{probe}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-references and overlays

/// What no schema checks: names that refer to other objects, in every rendering.
#[test]
fn references_resolve_in_every_rendering() {
    let mut renders = vec![("base", base().to_vec())];
    for name in OVERLAYS {
        renders.push((name, overlay(name)));
    }
    for (name, objects) in &renders {
        let namespace = find(objects, "Namespace", "hoptrace")["metadata"]["name"].clone();
        for object in objects
            .iter()
            .filter(|o| !CLUSTER_SCOPED.contains(&str_of(&o["kind"], "kind")))
        {
            assert_eq!(
                object["metadata"]["namespace"],
                namespace,
                "{name}: {} is in another namespace",
                id(object)
            );
        }
        for workload in workloads(objects) {
            let what = format!("{name}: {}", id(workload));
            let labels = &workload["spec"]["template"]["metadata"]["labels"];
            for (key, value) in workload["spec"]["selector"]["matchLabels"]
                .as_object()
                .expect("matchLabels")
            {
                assert_eq!(
                    &labels[key], value,
                    "{what}: selector {key} does not match the pod labels"
                );
            }
            let spec = pod_spec(workload);
            find(
                objects,
                "ServiceAccount",
                str_of(&spec["serviceAccountName"], "serviceAccountName"),
            );
            let volumes: BTreeSet<&str> = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| str_of(&v["name"], "volume"))
                .collect();
            for volume in spec["volumes"].as_array().into_iter().flatten() {
                if let Some(config_map) = volume["configMap"]["name"].as_str() {
                    find(objects, "ConfigMap", config_map);
                }
            }
            for list in ["initContainers", "containers"] {
                for c in spec[list].as_array().into_iter().flatten() {
                    for mount in c["volumeMounts"].as_array().into_iter().flatten() {
                        assert!(
                            volumes.contains(str_of(&mount["name"], "mount")),
                            "{what}: mount {} has no volume",
                            mount["name"]
                        );
                    }
                    for source in c["envFrom"].as_array().into_iter().flatten() {
                        find(
                            objects,
                            "ConfigMap",
                            str_of(&source["configMapRef"]["name"], "configMapRef"),
                        );
                    }
                }
            }
        }
        for service in objects.iter().filter(|o| o["kind"] == "Service") {
            service_ports(
                objects,
                str_of(&service["metadata"]["name"], "service name"),
            );
        }
        for binding in objects
            .iter()
            .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
        {
            find(
                objects,
                str_of(&binding["roleRef"]["kind"], "roleRef kind"),
                str_of(&binding["roleRef"]["name"], "roleRef"),
            );
            for subject in array_of(&binding["subjects"], "subjects") {
                let account = find(
                    objects,
                    "ServiceAccount",
                    str_of(&subject["name"], "subject"),
                );
                assert_eq!(
                    subject["namespace"],
                    account["metadata"]["namespace"],
                    "{name}: {}",
                    id(binding)
                );
            }
        }
    }
}

/// `overlay` equals the base except for the agent DaemonSet (and what `also` names); returns
/// the overlay's DaemonSet.
fn only_daemonset_differs(overlay: &[Value], also: &[&str]) -> Value {
    let by_id = |docs: &[Value]| {
        docs.iter()
            .map(|d| (id(d), d.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let (base_map, overlay_map) = (by_id(base()), by_id(overlay));
    assert_eq!(
        base_map.keys().collect::<Vec<_>>(),
        overlay_map.keys().collect::<Vec<_>>()
    );
    for (key, object) in &base_map {
        let changed_on_purpose = key.starts_with("DaemonSet/") || also.iter().any(|a| key == a);
        assert!(
            changed_on_purpose || object == &overlay_map[key],
            "{key} changed"
        );
    }
    find(overlay, "DaemonSet", "hoptrace-agent").clone()
}

#[test]
fn the_privileged_overlay_makes_both_agent_containers_privileged_and_nothing_else() {
    let mut ds = only_daemonset_differs(&overlay("privileged"), &[]);
    for (list, name) in [("initContainers", "check"), ("containers", "agent")] {
        let sc = &container(&ds, list, name)["securityContext"];
        assert_eq!(sc["privileged"], true, "{name}");
        // The API server rejects privileged: true with allowPrivilegeEscalation: false.
        assert!(
            sc["allowPrivilegeEscalation"].is_null() || sc["allowPrivilegeEscalation"] == true,
            "{name}"
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
    }
    // Apart from the security contexts, the base's DaemonSet.
    let base_ds = find(base(), "DaemonSet", "hoptrace-agent");
    for (list, index) in [("initContainers", 0), ("containers", 0)] {
        ds["spec"]["template"]["spec"][list][index]["securityContext"] =
            pod_spec(base_ds)[list][index]["securityContext"].clone();
    }
    assert_eq!(&ds, base_ds);
}

/// The base's agent DaemonSet with CAP_SYS_ADMIN added to both containers, as
/// components/sys-admin adds it.
fn base_daemonset_with_sys_admin() -> Value {
    let mut ds = find(base(), "DaemonSet", "hoptrace-agent").clone();
    for list in ["initContainers", "containers"] {
        let add =
            &mut ds["spec"]["template"]["spec"][list][0]["securityContext"]["capabilities"]["add"];
        add.as_array_mut()
            .expect("capabilities.add")
            .push(json!("SYS_ADMIN"));
    }
    ds
}

#[test]
fn the_least_privilege_overlay_is_the_base() {
    let least = only_daemonset_differs(&overlay("least-privilege"), &[]);
    assert_eq!(&least, find(base(), "DaemonSet", "hoptrace-agent"));
}

#[test]
fn tracing_off_schedules_no_agent_and_tracing_on_undoes_it() {
    let off = only_daemonset_differs(&overlay("tracing-off"), &[]);
    let on_objects = overlay("tracing-on");
    let on = only_daemonset_differs(&on_objects, &[]);
    let on_ds = base_daemonset_with_sys_admin();
    let base_selector = pod_spec(&on_ds)["nodeSelector"]
        .as_object()
        .expect("base nodeSelector")
        .clone();
    assert_eq!(
        base_selector,
        json!({"kubernetes.io/os": "linux"})
            .as_object()
            .unwrap()
            .clone()
    );

    // Off: one label added to the node selector, which no node carries (not a well-known
    // kubernetes.io label that nodes get automatically); nothing else changes.
    let selector = pod_spec(&off)["nodeSelector"]
        .as_object()
        .expect("nodeSelector");
    let added: Vec<_> = selector
        .iter()
        .filter(|(k, _)| !base_selector.contains_key(*k))
        .collect();
    assert_eq!(added.len(), 1, "{selector:?}");
    assert!(
        !added[0].0.contains("kubernetes.io"),
        "{:?} might match real nodes",
        added[0]
    );
    let mut restored = off.clone();
    restored["spec"]["template"]["spec"]["nodeSelector"] = Value::Object(base_selector.clone());
    assert_eq!(restored, on_ds, "off is on with the selector");

    // On: the base's scheduling, CAP_SYS_ADMIN added (for uprobes), and exporting.
    assert_eq!(on, on_ds);
    let effective = effective_agent_config(agent_config_file(&on_objects));
    assert_eq!(setting(&effective, "export", "disabled"), "false");
}

#[test]
fn the_sys_admin_component_adds_cap_sys_admin_to_both_agent_containers_only() {
    let objects = composed();
    let ds = find(objects, "DaemonSet", "hoptrace-agent");
    for (list, name) in [("initContainers", "check"), ("containers", "agent")] {
        let c = container(ds, list, name);
        let added: BTreeSet<_> = array_of(&c["securityContext"]["capabilities"]["add"], "add")
            .iter()
            .map(|v| str_of(v, "cap"))
            .collect();
        let mut expected: BTreeSet<_> = AGENT_CAPABILITIES.into_iter().collect();
        expected.insert("SYS_ADMIN");
        assert_eq!(added, expected, "{name}");
        assert_eq!(c["securityContext"]["privileged"], false, "{name}");
        assert_eq!(
            c["image"], "registry.lab.example/hoptrace:0.1.1",
            "{name}: the images transformer"
        );
    }
    for workload in workloads(objects).filter(|w| w["kind"] != "DaemonSet") {
        for c in array_of(&pod_spec(workload)["containers"], "containers") {
            assert!(
                c["securityContext"]["capabilities"]["add"].is_null(),
                "{}: capabilities added",
                id(workload)
            );
        }
    }
    // The namespace override moved everything namespaced, the bindings' subjects included.
    assert!(objects.iter().all(|o| {
        CLUSTER_SCOPED.contains(&str_of(&o["kind"], "kind"))
            || o["metadata"]["namespace"] == "lab-tracing"
    }));
    for (kind, name) in [
        ("RoleBinding", "hoptrace-collector"),
        ("ClusterRoleBinding", "hoptrace-agent"),
    ] {
        assert_eq!(
            find(objects, kind, name)["subjects"][0]["namespace"],
            "lab-tracing"
        );
    }
}

/// deploy/grafana: the dashboard is JSON Grafana can load (unique uid and panel ids, a grid
/// position each) and every panel and variable uses a data source the provisioning file
/// defines. (tests/tests/metrics.rs checks its metric names against a real agent's scrape.)
#[test]
fn the_grafana_example_is_valid_and_uses_the_provisioned_data_sources() {
    let grafana = repo().join("deploy/grafana");
    let sources = yaml_file(&grafana.join("provisioning/datasources/hoptrace.yaml"));
    let uids: BTreeSet<&str> = array_of(&sources[0]["datasources"], "datasources")
        .iter()
        .map(|d| str_of(&d["uid"], "uid"))
        .collect();
    assert_eq!(uids, BTreeSet::from(["prometheus", "tempo"]));
    let providers = yaml_file(&grafana.join("provisioning/dashboards/hoptrace.yaml"));
    assert_eq!(providers[0]["providers"][0]["type"], "file");
    let text = fs::read_to_string(grafana.join("dashboards/hoptrace.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(!str_of(&dashboard["uid"], "uid").is_empty());
    let panels = array_of(&dashboard["panels"], "panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        for key in ["x", "y", "w", "h"] {
            assert!(
                panel["gridPos"][key].is_u64(),
                "{} gridPos.{key}",
                panel["title"]
            );
        }
        let uid = str_of(&panel["datasource"]["uid"], "panel data source");
        assert!(uids.contains(uid), "{}: data source {uid}", panel["title"]);
        assert!(!array_of(&panel["targets"], "targets").is_empty());
    }
    for variable in array_of(&dashboard["templating"]["list"], "variables") {
        assert!(uids.contains(str_of(
            &variable["datasource"]["uid"],
            "variable data source"
        )));
    }
}
