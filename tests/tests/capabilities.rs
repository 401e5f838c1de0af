//! The agent's capability sets (deploy/README.md, "Capabilities"), on the real kernel: the base's
//! least-privilege set, read from the DaemonSet, and the set of `overlays/tracing-on` (the base
//! with `components/sys-admin`), each applied with setpriv the way a container runtime applies
//! `capabilities: {drop: [ALL], add: [...]}` to root; then `hoptrace check` and the agent must do
//! what the README's table says, with the whole set and with each capability taken away.
//!
//! Capabilities the check cannot show (CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH guard other
//! processes' /proc entries and files) are shown with the agent and an OpenSSL client of another
//! user whose library sits in a directory only that user may enter.

use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, chown},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use hoptrace_tests::{
    agent::{Agent, hoptrace_bin},
    personas::{start_caddy, start_go_server},
    receiver::OtlpReceiver,
    request_spans::wait_request_span,
};
use serde_json::Value;
use xtask::lab::{Background, Host, Lab, LabConfig};

/// Capability numbers (linux/capability.h) of the names the manifests use.
const NUMBERS: [(&str, u32); 6] = [
    ("DAC_READ_SEARCH", 2),
    ("NET_ADMIN", 12),
    ("SYS_PTRACE", 19),
    ("SYS_ADMIN", 21),
    ("PERFMON", 38),
    ("BPF", 39),
];

const TRACE_ID: &str = "5af7651916cd43dd8448eb211c80319c";
const PARENT_ID: &str = "b7ad6b7169203331";

// ---------------------------------------------------------------------------------------------
// The capability sets, from the manifests

fn kube() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// The objects of a YAML file, or (`build`) of a kustomization directory, through render.py
/// (PyYAML; deploy_manifests.rs checks it renders as kustomize does).
fn render(args: &[&Path]) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(kube().join("render.py"))
        .args(args)
        .output()
        .expect("running python3 deploy/kubernetes/render.py");
    assert!(
        out.status.success(),
        "render.py {args:?} (needs PyYAML: scripts/setup.sh installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(objects)) => objects,
        other => panic!("render.py {args:?} printed {other:?}"),
    }
}

/// `capabilities.add` of the agent container of the hoptrace-agent DaemonSet in `objects`,
/// after checking that `hoptrace check` (the init container) gets the same.
fn agent_capabilities(objects: &[Value]) -> Vec<String> {
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "hoptrace-agent")
        .expect("the hoptrace-agent DaemonSet");
    let added = |list: &str, name: &str| -> Vec<String> {
        let container = ds["spec"]["template"]["spec"][list]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no {list} {name}"));
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        serde_json::from_value(container["securityContext"]["capabilities"]["add"].clone())
            .unwrap_or_else(|e| panic!("{name}: capabilities.add: {e}"))
    };
    let agent = added("containers", "agent");
    assert_eq!(added("initContainers", "check"), agent);
    agent
}

/// The base's set: deploy/kubernetes/base/agent-daemonset.yaml.
fn base() -> &'static [String] {
    static BASE: OnceLock<Vec<String>> = OnceLock::new();
    BASE.get_or_init(|| {
        agent_capabilities(&render(&[
            Path::new("json"),
            &kube().join("base/agent-daemonset.yaml"),
        ]))
    })
}

/// The set of `overlays/tracing-on`, the overlay a lab applies: the base with
/// `components/sys-admin`.
fn tracing_on() -> &'static [String] {
    static TRACING_ON: OnceLock<Vec<String>> = OnceLock::new();
    TRACING_ON.get_or_init(|| {
        let overlay = kube().join("overlays/tracing-on");
        agent_capabilities(&render(&[
            Path::new("build"),
            &overlay,
            Path::new("--json"),
        ]))
    })
}

/// `set` without `cap`.
fn without(set: &[String], cap: &str) -> Vec<String> {
    assert!(set.iter().any(|c| c == cap), "{cap} not in {set:?}");
    set.iter().filter(|c| *c != cap).cloned().collect()
}

fn mask(set: &[String]) -> u64 {
    set.iter()
        .map(|name| {
            let (_, bit) = NUMBERS
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("capability {name} unknown to this test"));
            1u64 << bit
        })
        .fold(0, |m, bit| m | bit)
}

// ---------------------------------------------------------------------------------------------
// Running with exactly a set

/// A command prefix that runs its program as root with exactly `set`, as a container runtime
/// does for `drop: [ALL]`, `add: set` and `allowPrivilegeEscalation: false`: the bounding set is
/// `set`, which exec turns into uid 0's permitted and effective sets; nothing inheritable or
/// ambient; no_new_privs.
fn restricted_to(set: &[String]) -> Vec<String> {
    let caps: Vec<_> = set
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    vec![
        "setpriv".into(),
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--".into(),
    ]
}

fn run_restricted(set: &[String], argv: &[&str]) -> Output {
    let prefix = restricted_to(set);
    Command::new(&prefix[0])
        .args(&prefix[1..])
        .args(argv)
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?} through setpriv: {e}"))
}

struct Check {
    passed: bool,
    text: String,
}

impl Check {
    fn run(set: &[String]) -> Self {
        let bin = hoptrace_bin().unwrap();
        let out = run_restricted(set, &[bin.to_str().unwrap(), "check"]);
        Self {
            passed: out.status.success(),
            text: format!(
                "with {set:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// The table row of `what` ("tracepoint" is not "tracepoints").
    fn row(&self, what: &str) -> &str {
        self.text
            .lines()
            .find(|l| l.strip_prefix(what).is_some_and(|r| r.starts_with(' ')))
            .unwrap_or_else(|| panic!("no {what:?} row {}", self.text))
    }

    /// The row's result: works, absent or MISSING.
    fn result(&self, what: &str) -> &str {
        let rest = &self.row(what)[what.len()..];
        rest.split_whitespace().nth(1).unwrap_or("")
    }

    #[track_caller]
    fn assert_row(&self, what: &str, result: &str, detail: &str) {
        assert!(
            self.result(what) == result && self.row(what).contains(detail),
            "expected {what} {result} with {detail:?} {}",
            self.text
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The sets and setpriv

#[test]
fn the_manifests_sets_are_the_documented_ones_and_setpriv_gives_exactly_them() {
    assert_eq!(
        base(),
        [
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "SYS_PTRACE",
            "DAC_READ_SEARCH"
        ],
        "deploy/README.md's table lists these"
    );
    assert_eq!(tracing_on(), [base(), &["SYS_ADMIN".to_string()]].concat());
    for set in [base(), tracing_on()] {
        let out = run_restricted(set, &["grep", "^Cap", "/proc/self/status"]);
        let status = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"));
            u64::from_str_radix(hex.trim(), 16).unwrap()
        };
        for name in ["CapPrm:", "CapEff:", "CapBnd:"] {
            assert_eq!(field(name), mask(set), "{name} for {set:?}:\n{status}");
        }
        for name in ["CapInh:", "CapAmb:"] {
            assert_eq!(field(name), 0, "{name} for {set:?}:\n{status}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// hoptrace check

#[test]
fn check_passes_with_the_base_set_without_tc_and_uprobes() {
    let check = Check::run(base());
    assert!(check.passed, "{}", check.text);
    check.assert_row(
        "privileges",
        "works",
        "uid 0, CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH; \
         without CAP_SYS_ADMIN",
    );
    check.assert_row("tracepoint", "works", "attached and fired");
    check.assert_row("tp_btf", "works", "attached and fired");
    // setns/unshare into a network namespace, and uprobes (Linux 6.16 on), need CAP_SYS_ADMIN.
    check.assert_row("tc (tcx/clsact)", "absent", "unshare(CLONE_NEWNET)");
    check.assert_row("uprobe", "absent", "uprobes need CAP_SYS_ADMIN");
    assert!(
        check.text.contains("result: every required hook works"),
        "{}",
        check.text
    );
}

#[test]
fn check_passes_with_the_tracing_on_set_with_every_hook() {
    let check = Check::run(tracing_on());
    assert!(check.passed, "{}", check.text);
    for what in ["tracepoint", "tp_btf", "uprobe", "tc (tcx/clsact)"] {
        check.assert_row(what, "works", "attached and fired");
    }
}

/// Each capability of the base taken away, one at a time: what the README's table says
/// happens. CAP_SYS_ADMIN would stand in for CAP_BPF and CAP_PERFMON, so those two are taken
/// from the base; CAP_NET_ADMIN from both (without CAP_SYS_ADMIN tc is absent anyway).
#[test]
fn check_without_each_capability_fails_or_degrades_as_documented() {
    let check = Check::run(&without(base(), "BPF"));
    assert!(!check.passed, "{}", check.text);
    check.assert_row("privileges", "MISSING", "root without CAP_BPF:");
    check.assert_row("eBPF object", "MISSING", "Operation not permitted");

    let check = Check::run(&without(base(), "PERFMON"));
    assert!(!check.passed, "{}", check.text);
    check.assert_row("privileges", "MISSING", "root without CAP_PERFMON:");
    check.assert_row("tracepoint", "MISSING", "Operation not permitted");

    // Without it the tc program does not even load; with CAP_SYS_ADMIN it loads, but the
    // throwaway namespace's interface cannot be configured nor the program attached.
    let check = Check::run(&without(base(), "NET_ADMIN"));
    assert!(check.passed, "{}", check.text);
    check.assert_row("tc (tcx/clsact)", "absent", "BPF_PROG_LOAD");
    let check = Check::run(&without(tracing_on(), "NET_ADMIN"));
    assert!(check.passed, "{}", check.text);
    assert_eq!(check.result("tc (tcx/clsact)"), "absent", "{}", check.text);
    check.assert_row("uprobe", "works", "attached and fired");
}

// ---------------------------------------------------------------------------------------------
// The agent

fn traceparent() -> String {
    format!("traceparent: 00-{TRACE_ID}-{PARENT_ID}-01")
}

/// Starts the agent on a fresh lab with exactly `set` and two Go HTTPS servers in the persona
/// (caddy and the lab's own: two executables for the Go uprobes), sends one request with a
/// traceparent, stops the agent, and returns its `hoptrace.layers` on the persona's request
/// span and its log, final summary included.
fn trace_a_request_with(set: &[String]) -> (String, String) {
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let _caddy = start_caddy(&lab, 8443);
    let _go_server = start_go_server(&lab, 8444);
    let receiver = OtlpReceiver::start().expect("receiver");
    let wrapper = restricted_to(set);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent = Agent::watching_lab_through(&wrapper, &lab, &receiver, &[]).expect("agent");
    let url = lab.nginx_url("/");
    let out = lab
        .run(
            Host::Agent,
            &["curl", "-sS", "-o", "/dev/null", "-H", &traceparent(), &url],
        )
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let agent_span = wait_request_span(&receiver, &agent, "agent", TRACE_ID);
    let persona_span = wait_request_span(&receiver, &agent, "persona", TRACE_ID);
    for span in [&agent_span, &persona_span] {
        assert_eq!(span.parent_span_id, PARENT_ID, "{span:#?}");
    }
    let layers = persona_span
        .attr_str("hoptrace.layers")
        .expect("hoptrace.layers")
        .to_string();
    agent.stop().expect("stopping the agent");
    (layers, agent.stderr())
}

/// The number after `label` in the OpenSSL part of the agent's final summary (which follows
/// the Go part, with labels of the same names).
fn openssl_count(log: &str, label: &str) -> u64 {
    let section = "OpenSSL files probed";
    let rest = &log[log
        .find(section)
        .unwrap_or_else(|| panic!("no {section:?} in {log}"))..];
    let at = rest
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} after {section:?} in {log}"));
    rest[at + label.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count after {label:?} in {log}"))
}

const UPROBES_NEED_SYS_ADMIN: &str = "uprobes need CAP_SYS_ADMIN";

/// Lines of `log` that contain every one of `parts`.
fn lines_with(log: &str, parts: &[&str]) -> usize {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

#[test]
fn the_agent_with_the_tracing_on_set_traces_requests_with_nic_times_and_tls_plaintext() {
    let (layers, log) = trace_a_request_with(tracing_on());
    assert_eq!(layers, "syscall,tcp,nic", "{log}");
    assert!(!log.contains(UPROBES_NEED_SYS_ADMIN), "{log}");
    assert!(openssl_count(&log, "OpenSSL files probed ") >= 1, "{log}");
    assert!(
        log.contains("Go crypto/tls: 2 programs probed, 0 skipped"),
        "caddy and the lab's server: {log}"
    );
}

#[test]
fn the_agent_with_the_base_set_traces_requests_and_says_tc_and_uprobes_are_unavailable() {
    let (layers, log) = trace_a_request_with(base());
    assert_eq!(layers, "syscall,tcp", "{log}");
    assert!(
        log.contains(
            "NIC layer (tc) unavailable, continuing without it: tc inside other network \
             namespaces needs CAP_SYS_ADMIN"
        ),
        "{log}"
    );
    // The lab's nginx (libssl) runs before the agent starts: its first scan is refused, and
    // the ready line does not claim the layer.
    assert_eq!(
        lines_with(&log, &["hoptrace agent ready", "no TLS plaintext (uprobes refused"]),
        1,
        "{log}"
    );
    // Said once per run for each kind of uprobe, and counted: every file is refused alike.
    let openssl = ["attaching OpenSSL probes to", UPROBES_NEED_SYS_ADMIN];
    assert_eq!(lines_with(&log, &openssl), 1, "{log}");
    assert!(
        openssl_count(&log, "refused without CAP_SYS_ADMIN ") >= 1,
        "{log}"
    );
    let go = ["Go crypto/tls: attaching to", UPROBES_NEED_SYS_ADMIN];
    assert_eq!(lines_with(&log, &go), 1, "two Go programs, one line: {log}");
    assert!(
        log.contains(
            "Go crypto/tls: 0 programs probed, 0 skipped, 2 refused without CAP_SYS_ADMIN"
        ),
        "{log}"
    );
}

/// A Python process of another user (nobody) in the lab's agent namespace that has loaded its
/// own copy of libssl from a directory only nobody may enter: to the agent, what a library in
/// another container's root filesystem is. Stopped, and the directory removed, when dropped.
struct ForeignOpenSsl {
    process: Background,
    dir: PathBuf,
    libssl: String,
}

impl ForeignOpenSsl {
    fn start(lab: &Lab) -> Self {
        const NOBODY: u32 = 65534;
        let system_libssl = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
            .iter()
            .map(|dir| Path::new(dir).join("libssl.so.3"))
            .find(|path| path.exists())
            .expect("libssl.so.3 in a system library directory");
        let dir =
            std::env::temp_dir().join(format!("hoptrace-capabilities-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let libssl = dir.join("libssl.so.3");
        fs::copy(&system_libssl, &libssl).unwrap();
        chown(&libssl, Some(NOBODY), Some(NOBODY)).unwrap();
        chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let library_path = format!("LD_LIBRARY_PATH={}", dir.display());
        let process = lab
            .spawn(
                Host::Agent,
                &[
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                    "env",
                    &library_path,
                    "python3",
                    "-c",
                    "import ssl, time; time.sleep(60)",
                ],
            )
            .expect("python3 as nobody");
        let client = Self {
            process,
            dir,
            libssl: libssl.display().to_string(),
        };
        // The test itself has every capability: it can watch the library being mapped.
        let maps = format!("/proc/{}/maps", client.process.pid());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&maps).is_ok_and(|m| m.contains(&client.libssl)) {
            assert!(
                Instant::now() < deadline,
                "{} never mapped {}",
                maps,
                client.libssl
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        client
    }
}

impl Drop for ForeignOpenSsl {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// CAP_SYS_PTRACE (the process's /proc/PID/maps and /proc/PID/root: another uid) and
/// CAP_DAC_READ_SEARCH (its library's directory) are both needed to probe such a library;
/// without either the agent says which, once, and counts the processes.
#[test]
fn the_agent_probes_another_users_private_libssl_only_with_sys_ptrace_and_dac_read_search() {
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    let client = ForeignOpenSsl::start(&lab);
    let probed = format!(
        "TLS plaintext probes on {} (found in pid {})",
        client.libssl,
        client.process.pid()
    );
    // The agent scans every process in scope before it says it is ready; stopped, it logs
    // its summary.
    let log_with = |set: &[String]| {
        let wrapper = restricted_to(set);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut agent = Agent::watching_lab_through(&wrapper, &lab, &receiver, &[]).expect("agent");
        agent.stop().expect("stopping the agent");
        agent.stderr()
    };
    let log = log_with(tracing_on());
    assert!(log.contains(&probed), "{log}");
    assert_eq!(openssl_count(&log, "processes not readable "), 0, "{log}");

    // Not the nobody process alone: nginx's workers are another user's too.
    let log = log_with(&without(tracing_on(), "SYS_PTRACE"));
    assert!(!log.contains(&probed), "{log}");
    let unreadable = [
        "not scanned for OpenSSL",
        "Permission denied",
        "needs CAP_SYS_PTRACE",
    ];
    assert_eq!(lines_with(&log, &unreadable), 1, "{log}");
    assert!(openssl_count(&log, "processes not readable ") >= 1, "{log}");

    // Only the nobody process: its library's directory is closed to others.
    let log = log_with(&without(tracing_on(), "DAC_READ_SEARCH"));
    assert!(!log.contains(&probed), "{log}");
    let not_scanned = format!("pid {} not scanned for OpenSSL", client.process.pid());
    let unreadable = [&not_scanned, &client.libssl, "needs CAP_DAC_READ_SEARCH"];
    assert_eq!(lines_with(&log, &unreadable), 1, "{log}");
    assert_eq!(openssl_count(&log, "processes not readable "), 1, "{log}");
}
