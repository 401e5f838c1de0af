//! End-to-end: the real agent, scoped to lab namespaces, exporting to a real OTLP receiver over
//! the network while curl connects through the fw with injected per-direction delays.
//! Needs root and the kernel (tracepoints, BTF); every test builds its own lab.

use std::time::Duration;

use hoptrace_tests::{
    agent::Agent,
    assert_close,
    receiver::{OtlpReceiver, ReceivedSpan, span_kind, status_code},
};
use xtask::lab::{Direction, Host, Lab, LabConfig, NGINX_PORT, PERSONA_IP};

fn lab_with_nginx() -> Lab {
    Lab::start(LabConfig {
        python: false,
        ..LabConfig::default()
    })
    .expect("lab")
}

fn agent_for(lab: &Lab, hosts: &[Host], receiver: &OtlpReceiver, protocol: &str) -> Agent {
    let endpoint = match protocol {
        "grpc" => receiver.grpc_endpoint(),
        _ => receiver.http_endpoint(),
    };
    let mut args = Vec::new();
    for host in hosts {
        args.push("--netns");
        args.push(lab.netns(*host).name());
    }
    Agent::start(
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ],
    )
    .expect("agent")
}

fn curl(lab: &Lab, url: &str) {
    lab.run(
        Host::Agent,
        &["curl", "-sS", "-o", "/dev/null", "--max-time", "5", url],
    )
    .expect("curl");
}

fn netns_inode(lab: &Lab, host: Host) -> i64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(lab.netns(host).path()).unwrap().ino() as i64
}

/// Waits until `count` spans named `name` have arrived, and returns them.
fn wait_for(receiver: &OtlpReceiver, name: &str, count: usize) -> Vec<ReceivedSpan> {
    let spans = receiver
        .try_wait_for_spans(
            |spans| spans.iter().filter(|s| s.name == name).count() >= count,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("waiting for {count} {name} spans: {e:#}"));
    spans.into_iter().filter(|s| s.name == name).collect()
}

fn connect_to_persona(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.attr_str("network.peer.address") == Some(&PERSONA_IP.to_string()))
        .collect()
}

#[test]
fn forward_delay_shows_in_the_connect_span_and_only_the_scoped_namespace_is_seen() {
    let lab = lab_with_nginx();
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = agent_for(&lab, &[Host::Agent], &receiver, "grpc");
    lab.set_delay(Direction::Forward, Duration::from_millis(20))
        .unwrap();
    // Traffic the agent must not see: inside persona, and in the fw namespace.
    lab.run(
        Host::Persona,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            &format!("http://{PERSONA_IP}/"),
        ],
    )
    .unwrap();
    lab.run(
        Host::Fw,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            &format!("http://{PERSONA_IP}/"),
        ],
    )
    .unwrap();
    for _ in 0..3 {
        curl(&lab, &lab.nginx_url("/"));
    }

    let spans = wait_for(&receiver, "tcp.connect", 3);
    let ours = connect_to_persona(&spans);
    assert_eq!(ours.len(), 3, "one connect span per curl: {spans:#?}");
    for span in &ours {
        assert_close(
            span.duration(),
            Duration::from_millis(20),
            "connect with 20 ms forward delay",
        );
        assert_eq!(span.kind, span_kind::CLIENT);
        assert_eq!(span.status.code, status_code::UNSET);
        assert_eq!(span.attr_str("hoptrace.hop"), Some("agent"));
        assert_eq!(span.attr_i64("server.port"), Some(i64::from(NGINX_PORT)));
        assert_eq!(span.attr_str("network.local.address"), Some("10.10.1.2"));
        assert_eq!(span.attr_str("process.executable.name"), Some("curl"));
        assert!(span.attr_i64("process.pid").is_some_and(|pid| pid > 0));
        assert_eq!(span.resource_str("service.name"), Some("hoptrace"));
    }
    agent.stop().unwrap();
    let all = receiver.spans();
    let agent_ns = netns_inode(&lab, Host::Agent);
    assert!(
        all.iter()
            .all(|s| s.attr_i64("hoptrace.netns") == Some(agent_ns)),
        "spans from namespaces the agent was not told to watch: {all:#?}"
    );
    assert!(
        all.iter().all(|s| s.name != "tcp.accept"),
        "persona is not observed: {all:#?}"
    );
}

#[test]
fn return_delay_shows_in_the_connect_span_over_http_protobuf() {
    let lab = lab_with_nginx();
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = agent_for(&lab, &[Host::Agent], &receiver, "http/protobuf");
    lab.set_delay(Direction::Return, Duration::from_millis(20))
        .unwrap();
    curl(&lab, &lab.nginx_url("/"));
    let spans = wait_for(&receiver, "tcp.connect", 1);
    let ours = connect_to_persona(&spans);
    assert_eq!(ours.len(), 1, "{spans:#?}");
    assert_close(
        ours[0].duration(),
        Duration::from_millis(20),
        "connect with 20 ms return delay",
    );
}

#[test]
fn the_persona_side_handshake_lasts_one_syn_ack_round_trip() {
    let lab = lab_with_nginx();
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = agent_for(&lab, &[Host::Agent, Host::Persona], &receiver, "grpc");
    lab.set_delay(Direction::Forward, Duration::from_millis(15))
        .unwrap();
    curl(&lab, &lab.nginx_url("/"));
    let accepts = wait_for(&receiver, "tcp.accept", 1);
    let accept = &accepts[0];
    // SYN-ACK out, then the ACK crosses the delayed forward path.
    assert_close(
        accept.duration(),
        Duration::from_millis(15),
        "accept with 15 ms forward delay",
    );
    assert_eq!(accept.kind, span_kind::SERVER);
    assert_eq!(accept.attr_str("hoptrace.hop"), Some("persona"));
    assert_eq!(accept.attr_str("process.executable.name"), Some("nginx"));
    assert_eq!(accept.attr_str("network.peer.address"), Some("10.10.1.2"));
    assert_eq!(
        accept.attr_i64("hoptrace.netns"),
        Some(netns_inode(&lab, Host::Persona))
    );
    let connects = wait_for(&receiver, "tcp.connect", 1);
    assert_close(
        connects[0].duration(),
        Duration::from_millis(15),
        "the agent's connect",
    );
}

#[test]
fn a_refused_connection_is_an_error_span_with_the_reason() {
    let lab = lab_with_nginx();
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = agent_for(&lab, &[Host::Agent], &receiver, "grpc");
    let refused = lab
        .exec(
            Host::Agent,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                &format!("http://{PERSONA_IP}:81/"),
            ],
        )
        .output()
        .unwrap();
    assert!(!refused.status.success(), "nothing listens on :81");
    let spans = wait_for(&receiver, "tcp.connect", 1);
    let span = &spans[0];
    assert_eq!(span.status.code, status_code::ERROR, "{span:#?}");
    assert!(span.status.message.contains("refused"), "{span:#?}");
    assert_eq!(span.attr_str("error.type"), Some("ECONNREFUSED"));
    assert_eq!(span.attr_i64("server.port"), Some(81));
}

#[test]
fn without_an_endpoint_spans_print_to_the_terminal_and_stop_flushes_them() {
    let lab = lab_with_nginx();
    let ns = lab.netns(Host::Agent).name().to_string();
    let mut agent =
        Agent::start(&["--netns", &ns], &[("OTEL_BSP_SCHEDULE_DELAY", "60000")]).unwrap();
    curl(&lab, &lab.nginx_url("/"));
    std::thread::sleep(Duration::from_millis(300));
    // The batch delay is a minute: only the shutdown flush can have printed the span.
    let status = agent.stop().unwrap();
    assert!(status.success(), "{}", agent.stderr());
    let out = agent.stdout();
    let line = out
        .lines()
        .find(|l| l.contains("tcp.connect"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("curl[") && line.contains("-> 10.10.2.2:80"),
        "{line}"
    );
    // The request span and its connect child.
    assert!(agent.stderr().contains("exported 2"), "{}", agent.stderr());
    assert!(out.contains("GET / 200"), "{out}");
}

#[test]
fn bad_scope_and_a_down_collector_are_clear_errors_not_hangs() {
    let unknown = Agent::start(&["--netns", "hoptrace-no-such-namespace"], &[])
        .err()
        .unwrap();
    assert!(
        format!("{unknown:#}").contains("ip netns list"),
        "{unknown:#}"
    );

    // Nothing listens on this port: export fails, is counted and logged, the agent keeps going
    // and still stops promptly.
    let lab = lab_with_nginx();
    let ns = lab.netns(Host::Agent).name().to_string();
    // Export retries until the shutdown bound (2 s here); detaching the probes comes on top
    // (each tracepoint detach waits for an RCU grace period: seconds on a loaded machine).
    let mut agent = Agent::start(
        &["--netns", &ns, "--shutdown-timeout", "2"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "2000"),
        ],
    )
    .unwrap();
    curl(&lab, &lab.nginx_url("/"));
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    assert!(agent.stop().unwrap().success());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stop took {:?}",
        started.elapsed()
    );
    let log = agent.stderr();
    assert!(
        log.contains("export failed") && log.contains("failed (exporter) 2"),
        "{log}"
    );
}
