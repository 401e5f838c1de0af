//! `hoptrace agent` configuration end to end: the real binary reads a TOML file, the environment
//! and flags in that order of precedence, prints the result with --print-config, refuses unknown
//! keys and bad values with the key and its source, and really runs on a file's settings.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use hoptrace_tests::{
    agent::{Agent, hoptrace_bin},
    receiver::OtlpReceiver,
};
use xtask::lab::{Host, Lab, LabConfig, PERSONA_IP, PYTHON_PORT};

/// A config file private to one test, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "hoptrace-config-{name}-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `hoptrace agent ARGS` with exactly `env` of the hoptrace and OTel variables.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(hoptrace_bin().unwrap());
    command.arg("agent").args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("OTEL_") || key.starts_with("HOPTRACE_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied()).output().unwrap()
}

const FILE: &str = r#"
ring_buffer_mib = 8
shutdown_timeout = 2.5
untraced = "ignore"

[scope]
netns = ["from-file"]
ports = [80, 443]

[export]
endpoint = "http://file-collector:4317"
protocol = "grpc"
max_queue_size = 100
"#;

#[test]
fn print_config_shows_flags_over_env_over_file_over_defaults_with_each_source() {
    let file = ConfigFile::new("precedence", FILE);
    let out = agent(
        &[
            "--config",
            file.path(),
            "--print-config",
            "--ring-buffer-mib",
            "16",
        ],
        &[
            ("HOPTRACE_PORTS", "8080"),
            ("HOPTRACE_NETNS", ""),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "50"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = format!("file {}", file.path());
    for line in [
        "ring_buffer_mib = 16  # flag --ring-buffer-mib".to_string(),
        "ports = [8080]  # env HOPTRACE_PORTS".to_string(),
        "max_queue_size = 50  # env OTEL_BSP_MAX_QUEUE_SIZE".to_string(),
        format!("netns = [\"from-file\"]  # {source}"),
        format!("shutdown_timeout = 2.5  # {source}"),
        format!("untraced = \"ignore\"  # {source}"),
        format!("endpoint = \"http://file-collector:4317\"  # {source}"),
        "layer_spans = false  # default".to_string(),
        "pids = []  # default".to_string(),
        "# resolved: OTLP grpc to http://file-collector:4317".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    // HOPTRACE_CONFIG names the file when --config does not.
    let out = agent(&["--print-config"], &[("HOPTRACE_CONFIG", file.path())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("ring_buffer_mib = 8  # {source}")),
        "{text}"
    );
    // Without a file: defaults.
    let out = agent(&["--print-config"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ring_buffer_mib = 4  # default"), "{text}");
    assert!(text.contains("# resolved: terminal"), "{text}");
}

#[test]
fn unknown_keys_bad_values_and_missing_files_fail_with_the_key_and_source() {
    let failure = |args: &[&str], env: &[(&str, &str)]| {
        let out = agent(args, env);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let unknown = ConfigFile::new("unknown", "[scope]\nnetns = [\"a\"]\nport = [80]\n");
    let text = failure(&["--config", unknown.path(), "--print-config"], &[]);
    assert!(
        text.contains(unknown.path())
            && text.contains("unknown field `port`")
            && text.contains("line 3"),
        "{text}"
    );
    let bad = ConfigFile::new("bad", "ring_buffer_mib = 3\n");
    let text = failure(&["--config", bad.path()], &[]);
    assert!(
        text.contains(&format!(
            "ring_buffer_mib: 3 is not a power of two from 1 to 1024 (MiB) (from file {})",
            bad.path()
        )),
        "{text}"
    );
    let text = failure(&["--print-config"], &[("HOPTRACE_PORTS", "80,https")]);
    assert!(
        text.contains("scope.ports") && text.contains("(from env HOPTRACE_PORTS)"),
        "{text}"
    );
    let text = failure(
        &["--print-config"],
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")],
    );
    assert!(
        text.contains("export.protocol: unknown OTLP protocol \"udp\"")
            && text.contains("(from env OTEL_EXPORTER_OTLP_PROTOCOL)"),
        "{text}"
    );
    let text = failure(
        &["--print-config"],
        &[("HOPTRACE_CONFIG", "/nonexistent/hoptrace.toml")],
    );
    assert!(
        text.contains("reading config file /nonexistent/hoptrace.toml"),
        "{text}"
    );
}

/// The agent runs on a config file alone: its scope and its exporter come from the file.
#[test]
fn an_agent_configured_only_by_file_exports_spans_of_its_scope() {
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    let file = ConfigFile::new(
        "run",
        &format!(
            "[scope]\nnetns = [\"{}\"]\nports = [80]\n[export]\nendpoint = \"{}\"\nprotocol = \"grpc\"\nschedule_delay_ms = 100\n",
            lab.netns(Host::Agent).name(),
            receiver.grpc_endpoint()
        ),
    );
    let _agent = Agent::start(&["--config", file.path()], &[]).expect("agent");
    let url = lab.nginx_url("/");
    lab.run(
        Host::Agent,
        &["curl", "-sS", "-o", "/dev/null", "--max-time", "5", &url],
    )
    .expect("curl");
    // The python server's port is out of the file's scope.
    let python = format!("http://{PERSONA_IP}:{PYTHON_PORT}/");
    lab.run(
        Host::Agent,
        &["curl", "-sS", "-o", "/dev/null", "--max-time", "5", &python],
    )
    .expect("curl python");
    let spans = receiver
        .try_wait_for_spans(
            |spans| {
                spans.iter().any(|s| {
                    s.attr_str("hoptrace.hop") == Some("agent")
                        && s.attr_str("http.request.method").is_some()
                })
            },
            Duration::from_secs(15),
        )
        .expect("a request span from the file's exporter");
    // Settle, then check nothing outside the scope (the persona's side, the Python port) came.
    std::thread::sleep(Duration::from_millis(500));
    let spans = [spans, receiver.spans()].concat();
    assert!(
        spans
            .iter()
            .all(|s| s.attr_str("hoptrace.hop") != Some("persona")
                && s.attr_i64("server.port").is_none_or(|p| p == 80)),
        "{spans:#?}"
    );
}
