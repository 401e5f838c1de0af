//! End-to-end request timelines: the real agent watching the lab's agent and persona namespaces,
//! real clients (curl, a Python raw-socket client for pipelining and split writes) and servers
//! (nginx, Python), spans checked at a real OTLP receiver.

use std::time::Duration;

use hoptrace_tests::{
    agent::Agent,
    assert_close,
    receiver::{OtlpReceiver, ReceivedSpan, span_kind},
};
use xtask::lab::{Direction, Host, Lab, LabConfig, PERSONA_IP};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn traceparent(trace_id: &str, flags: &str) -> String {
    format!("traceparent: 00-{trace_id}-{PARENT_ID}-{flags}")
}

struct Setup {
    lab: Lab,
    receiver: OtlpReceiver,
    agent: Agent,
}

fn setup(extra_env: &[(&str, &str)]) -> Setup {
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    let endpoint = receiver.grpc_endpoint();
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ];
    env.extend_from_slice(extra_env);
    let agent = Agent::start(
        &[
            "--netns",
            lab.netns(Host::Agent).name(),
            "--netns",
            lab.netns(Host::Persona).name(),
        ],
        &env,
    )
    .expect("agent");
    Setup {
        lab,
        receiver,
        agent,
    }
}

fn curl(lab: &Lab, args: &[&str]) {
    let mut argv = vec!["curl", "-sS", "-o", "/dev/null", "--max-time", "5"];
    argv.extend_from_slice(args);
    lab.run(Host::Agent, &argv).expect("curl");
}

/// Runs a Python client in the agent namespace that talks raw HTTP/1.1 to `port`.
fn python_client(lab: &Lab, script: &str) {
    let out = lab
        .run(Host::Agent, &["python3", "-c", script])
        .expect("python client");
    assert!(out.status.success());
}

fn http_spans<'a>(spans: &'a [ReceivedSpan], hop: &str) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.attr_str("hoptrace.hop") == Some(hop) && s.attr_str("http.request.method").is_some()
        })
        .collect();
    found.sort_by_key(|s| s.start_time_unix_nano);
    found
}

fn wait_http(
    receiver: &OtlpReceiver,
    agent_spans: usize,
    persona_spans: usize,
) -> Vec<ReceivedSpan> {
    receiver
        .try_wait_for_spans(
            |spans| {
                let owned: Vec<ReceivedSpan> = spans.to_vec();
                http_spans(&owned, "agent").len() >= agent_spans
                    && http_spans(&owned, "persona").len() >= persona_spans
            },
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| {
            panic!(
                "waiting for {agent_spans} agent and {persona_spans} persona request spans: {e:#}"
            )
        })
}

/// Timestamps come from different CPUs: allow for their skew below an injected delay, which
/// the delay holder never undercuts.
const NEVER_EARLY_SLACK: Duration = Duration::from_micros(50);

#[test]
fn a_traceparent_yields_agent_and_persona_spans_under_its_parent_with_the_delays_between_them() {
    let s = setup(&[("HOPTRACE_LAYER_SPANS", "true")]);
    s.lab
        .set_delay(Direction::Forward, Duration::from_millis(20))
        .unwrap();
    s.lab
        .set_delay(Direction::Return, Duration::from_millis(10))
        .unwrap();
    // Two requests on one keep-alive connection: the first includes the connect.
    let url = s.lab.nginx_url("/");
    curl(&s.lab, &["-H", &traceparent(TRACE_ID, "01"), &url, &url]);
    let spans = wait_http(&s.receiver, 2, 2);
    let agent = http_spans(&spans, "agent");
    let persona = http_spans(&spans, "persona");
    for span in agent.iter().chain(&persona) {
        assert_eq!(span.trace_id, TRACE_ID, "{span:#?}");
        assert_eq!(span.parent_span_id, PARENT_ID, "{span:#?}");
        assert_eq!(span.attr_str("http.request.method"), Some("GET"));
        assert_eq!(span.attr_str("url.path"), Some("/"));
        assert_eq!(span.attr_i64("http.response.status_code"), Some(200));
        assert_eq!(span.attr_str("hoptrace.trace_origin"), Some("traceparent"));
    }
    assert_eq!(agent[0].kind, span_kind::CLIENT);
    assert_eq!(persona[0].kind, span_kind::SERVER);
    assert_eq!(agent[0].attr_str("process.executable.name"), Some("curl"));
    assert_eq!(
        persona[0].attr_str("process.executable.name"),
        Some("nginx")
    );
    // The agent span minus the persona span is the time in the network and the fw (the
    // injected delays, both directions) plus curl's own time, which only adds (unbounded on a
    // loaded machine): a lower bound here; the exact split is checked NIC to NIC below.
    let outside = agent[1].duration().saturating_sub(persona[1].duration());
    assert!(
        outside + NEVER_EARLY_SLACK >= Duration::from_millis(30),
        "keep-alive request: agent - persona = {outside:?}"
    );
    assert_eq!(
        agent[0].attr_bool("hoptrace.connection.first_request"),
        Some(true)
    );
    assert_eq!(
        agent[1].attr_bool("hoptrace.connection.first_request"),
        Some(false)
    );
    // The connect is the first request's child; the persona's parts are the persona span's.
    let connect = spans
        .iter()
        .find(|x| x.name == "tcp.connect")
        .expect("connect span");
    assert_eq!(
        (connect.trace_id.as_str(), connect.parent_span_id.as_str()),
        (TRACE_ID, agent[0].span_id.as_str())
    );
    assert_close(connect.duration(), Duration::from_millis(30), "connect");
    // The first request's span starts with its connect and also waited for the handshake: one
    // more round trip.
    assert_eq!(
        agent[0].start_time_unix_nano, connect.start_time_unix_nano,
        "from the connect on"
    );
    let outside_first = agent[0].duration().saturating_sub(persona[0].duration());
    assert!(
        outside_first + NEVER_EARLY_SLACK >= Duration::from_millis(60),
        "first request: agent - persona = {outside_first:?}"
    );
    for part in ["kernel receive", "application", "kernel send"] {
        let child = spans
            .iter()
            .find(|x| x.name == part && x.parent_span_id == persona[1].span_id)
            .unwrap_or_else(|| panic!("no {part} under the persona span: {spans:#?}"));
        assert!(
            child.start_time() >= persona[1].start_time()
                && child.end_time() <= persona[1].end_time()
        );
    }
    // The persona span starts when the request reached the persona host's NIC; the agent span
    // says when it left the agent host's NIC: between the two lies the forward delay (one
    // clock, one machine). Likewise the response's way back is the return delay.
    assert_eq!(
        persona[1].attr_str("hoptrace.layers"),
        Some("syscall,tcp,nic")
    );
    let event = |span: &ReceivedSpan, name: &str| {
        span.event(name)
            .unwrap_or_else(|| panic!("no event {name} in {span:#?}"))
            .time_unix_nano
    };
    let forward = persona[1].start_time_unix_nano - event(agent[1], "request.nic_egress");
    assert_close(
        Duration::from_nanos(forward),
        Duration::from_millis(20),
        "forward, NIC to NIC",
    );
    let back = event(agent[1], "response.nic_ingress") - event(persona[1], "response.nic_egress");
    assert_close(
        Duration::from_nanos(back),
        Duration::from_millis(10),
        "return, NIC to NIC",
    );
}

#[test]
fn pipelined_and_split_requests_each_get_their_own_span() {
    let s = setup(&[]);
    // Three pipelined requests in one write, then one request whose head is written in three
    // pieces with the traceparent in the last, on the same connection.
    let script = format!(
        r#"
import socket, time
s = socket.create_connection(("{PERSONA_IP}", 80))
tp = "00-{TRACE_ID}-{PARENT_ID}-01"
reqs = "".join(f"GET /?n={{i}} HTTP/1.1\r\nHost: p\r\ntraceparent: {{tp}}\r\n\r\n" for i in range(3))
s.sendall(reqs.encode())
got = b""
while got.count(b"HTTP/1.1 200") < 3:
    got += s.recv(65536)
for piece in [b"GET /split HTTP/1.1\r\n", b"Host: p\r\n", ("traceparent: " + tp + "\r\n\r\n").encode()]:
    s.sendall(piece); time.sleep(0.02)
got = b""
while b"\r\n\r\n" not in got:
    got += s.recv(65536)
s.close()
"#
    );
    python_client(&s.lab, &script);
    let spans = wait_http(&s.receiver, 4, 4);
    let agent = http_spans(&spans, "agent");
    let persona = http_spans(&spans, "persona");
    assert_eq!(agent.len(), 4, "{agent:#?}");
    assert_eq!(persona.len(), 4, "{persona:#?}");
    for span in agent.iter().chain(&persona) {
        assert_eq!(span.trace_id, TRACE_ID);
    }
    // The split request: nginx answers 404 for /split.
    assert_eq!(agent[3].attr_str("url.path"), Some("/split"));
    assert_eq!(agent[3].attr_i64("http.response.status_code"), Some(404));
    assert_eq!(
        agent[0].attr_str("url.path"),
        Some("/"),
        "the query is stripped"
    );
}

#[test]
fn sampling_and_untraced_requests_follow_the_configuration() {
    let s = setup(&[("HOPTRACE_UNTRACED", "ignore")]);
    let url = s.lab.nginx_url("/");
    // Not sampled by the caller: no span (parent-based sampling).
    curl(
        &s.lab,
        &[
            "-H",
            &traceparent("11111111111111111111111111111111", "00"),
            &url,
        ],
    );
    // No traceparent, policy ignore: no span.
    curl(&s.lab, &[&url]);
    // Sampled: spans.
    curl(&s.lab, &["-H", &traceparent(TRACE_ID, "01"), &url]);
    let spans = wait_http(&s.receiver, 1, 1);
    let mut agent = s.agent;
    agent.stop().unwrap();
    let all = s.receiver.spans();
    let http: Vec<_> = all
        .iter()
        .filter(|x| x.attr_str("http.request.method").is_some())
        .collect();
    assert_eq!(http.len(), 2, "only the sampled request: {http:#?}");
    assert!(http.iter().all(|x| x.trace_id == TRACE_ID));
    let log = agent.stderr();
    assert!(
        log.contains("not sampled 2") && log.contains("untraced ignored 2"),
        "{log}"
    );
    drop(spans);
}

#[test]
fn bad_input_is_counted_and_never_exported_as_valid() {
    let s = setup(&[]);
    let url = s.lab.nginx_url("/");
    // Uppercase hex is invalid per W3C: a new trace, marked, never the given id.
    let upper = "4BF92F3577B34DA6A3CE929D0E0E4736";
    curl(&s.lab, &["-H", &traceparent(upper, "01"), &url]);
    // A 64 KiB header before the traceparent: beyond what the kernel copies.
    let big = format!("X-Big: {}", "a".repeat(64 * 1024));
    let _ = s
        .lab
        .exec(
            Host::Agent,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "-H",
                &big,
                "-H",
                &traceparent(TRACE_ID, "01"),
                &url,
            ],
        )
        .output();
    // Binary garbage on the HTTP port, and a request cut short by a reset.
    python_client(
        &s.lab,
        &format!(
            r#"
import socket, struct, os
s = socket.create_connection(("{PERSONA_IP}", 80)); s.sendall(os.urandom(2000)); s.close()
s = socket.create_connection(("{PERSONA_IP}", 80)); s.sendall(b"GET /half HTTP/1.1\r\nHost: p\r\ntracepa")
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
"#
        ),
    );
    std::thread::sleep(Duration::from_millis(800));
    let mut agent = s.agent;
    assert!(agent.stop().unwrap().success(), "{}", agent.stderr());
    let all = s.receiver.spans();
    assert!(
        all.iter().all(|x| x.trace_id != upper.to_lowercase()),
        "uppercase id exported"
    );
    assert!(
        all.iter().all(|x| x.trace_id != TRACE_ID),
        "traceparent beyond the capture was invented"
    );
    assert!(
        all.iter().all(|x| x.attr_str("url.path") != Some("/half")),
        "half-sent request got a span"
    );
    let upper_span = all
        .iter()
        .find(|x| {
            x.attr_str("hoptrace.trace_origin") == Some("hoptrace (invalid traceparent ignored)")
        })
        .expect("the uppercase request's span says its context was ignored");
    assert_eq!(upper_span.attr_str("url.path"), Some("/"));
    let log = agent.stderr();
    // Counted once on each side (agent and persona sockets).
    assert!(log.contains("\"uppercase_hex\": 2"), "{log}");
    assert!(
        log.contains("truncated heads 1") || log.contains("truncated heads 2"),
        "{log}"
    );
    assert!(
        !log.contains("non-HTTP records 0"),
        "garbage counted: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn two_thousand_concurrent_connections_each_get_their_request_spans() {
    let s = setup(&[("OTEL_BSP_MAX_QUEUE_SIZE", "65536")]);
    const CONNECTIONS: usize = 2000;
    // All connections open first, then every request goes out, then every response is read:
    // thousands of sockets in flight at once, each with its own traceparent.
    let script = format!(
        r#"
import asyncio, resource
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def main():
    conns = await asyncio.gather(*[asyncio.open_connection("{PERSONA_IP}", 80) for _ in range({CONNECTIONS})])
    for i, (r, w) in enumerate(conns):
        w.write(f"GET /?c={{i}} HTTP/1.1\r\nHost: p\r\ntraceparent: 00-{{i + 1:032x}}-{PARENT_ID}-01\r\n\r\n".encode())
    async def read(r):
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
    await asyncio.gather(*[read(r) for r, _ in conns])
    for _, w in conns:
        w.close()
asyncio.run(main())
"#
    );
    python_client(&s.lab, &script);
    let spans = wait_http(&s.receiver, CONNECTIONS, CONNECTIONS);
    let agent = http_spans(&spans, "agent");
    let persona = http_spans(&spans, "persona");
    let ids = |spans: &[&ReceivedSpan]| {
        let mut ids: Vec<String> = spans.iter().map(|s| s.trace_id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    assert_eq!(
        (agent.len(), ids(&agent)),
        (CONNECTIONS, CONNECTIONS),
        "one agent span per connection"
    );
    assert_eq!(
        (persona.len(), ids(&persona)),
        (CONNECTIONS, CONNECTIONS),
        "one persona span per connection"
    );
    let mut agent_process = s.agent;
    agent_process.stop().unwrap();
    let log = agent_process.stderr();
    assert!(log.contains(" 0 lost to a full ring buffer"), "{log}");
}
