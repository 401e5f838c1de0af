//! End-to-end HTTPS request timelines from OpenSSL uprobes: real curl (dynamic libssl 3) and
//! node (static OpenSSL, exported symbols) clients talking TLS 1.2 and 1.3 to the lab's nginx
//! (dynamic libssl 3), the real agent, spans checked at a real OTLP receiver.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use hoptrace_tests::{
    TOLERANCE,
    agent::Agent,
    receiver::{OtlpReceiver, ReceivedSpan, span_kind},
};
use xtask::lab::{Direction, Host, Lab, LabConfig};

const PARENT_ID: &str = "00f067aa0ba902b7";
const FORWARD: Duration = Duration::from_millis(20);
const RETURN: Duration = Duration::from_millis(10);

/// The lab, a receiver, and the agent watching the given lab hosts.
struct Setup {
    lab: Lab,
    receiver: OtlpReceiver,
    agent: Agent,
}

fn setup(hosts: &[Host]) -> Setup {
    start_agent(Lab::start(LabConfig::default()).expect("lab"), hosts)
}

fn start_agent(lab: Lab, hosts: &[Host]) -> Setup {
    let receiver = OtlpReceiver::start().expect("receiver");
    let endpoint = receiver.grpc_endpoint();
    let mut args = Vec::new();
    for &host in hosts {
        args.extend(["--netns", lab.netns(host).name()]);
    }
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ];
    let agent = Agent::start(&args, &env).expect("agent");
    Setup {
        lab,
        receiver,
        agent,
    }
}

fn traceparent(trace_id: &str) -> String {
    format!("traceparent: 00-{trace_id}-{PARENT_ID}-01")
}

/// curl over TLS from `host` to nginx, `count` requests on one connection.
fn curl(lab: &Lab, host: Host, tls: &str, trace_id: &str, count: usize) {
    let ca = lab.persona_ca().to_str().unwrap().to_owned();
    let url = lab.nginx_https_url("/");
    let header = traceparent(trace_id);
    let mut argv = vec![
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "--tls-max",
        tls,
        "-H",
        &header,
    ];
    let version = format!("--tlsv{tls}");
    argv.push(&version);
    argv.extend(std::iter::repeat_n(url.as_str(), count));
    let out = lab.run(host, &argv).expect("curl");
    assert!(out.status.success(), "curl failed: {out:?}");
}

/// A node https client: `count` GETs on one keep-alive connection, each with the traceparent.
fn node_script(lab: &Lab, trace_id: &str, count: usize, wait_for: Option<&str>) -> String {
    let ca = lab.persona_ca().display();
    let url = lab.nginx_https_url("/");
    let wait = wait_for.map_or(String::new(), |path| {
        format!("while (!fs.existsSync('{path}')) await new Promise(r => setTimeout(r, 20));")
    });
    format!(
        "const https = require('https'); const fs = require('fs');
         const agent = new https.Agent({{ keepAlive: true, maxSockets: 1, ca: fs.readFileSync('{ca}') }});
         const get = () => new Promise((ok, fail) => https.get('{url}', {{ agent,
             headers: {{ traceparent: '00-{trace_id}-{PARENT_ID}-01' }} }},
             res => {{ res.resume(); res.on('end', () => ok(res.statusCode)); }}).on('error', fail));
         (async () => {{ {wait}
             for (let i = 0; i < {count}; i++) {{ const status = await get(); if (status !== 200) throw status; }}
             agent.destroy(); }})().catch(e => {{ console.error(e); process.exit(1); }});"
    )
}

fn request_spans<'a>(
    spans: &'a [ReceivedSpan],
    trace_id: &str,
    hop: &str,
) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.trace_id == trace_id
                && s.attr_str("hoptrace.hop") == Some(hop)
                && s.attr_str("http.request.method").is_some()
        })
        .collect();
    found.sort_by_key(|s| s.start_time_unix_nano);
    found
}

fn wait_requests(s: &Setup, trace_id: &str, agent: usize, persona: usize) -> Vec<ReceivedSpan> {
    s.receiver
        .try_wait_for_spans(
            |spans| {
                request_spans(spans, trace_id, "agent").len() >= agent
                    && request_spans(spans, trace_id, "persona").len() >= persona
            },
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| {
            panic!(
                "waiting for {agent} agent and {persona} persona spans of {trace_id}: {e:#}\n{}",
                s.agent.stderr()
            )
        })
}

/// Every request span of the trace is a GET / 200 over TLS under the SDK's parent.
fn assert_https_request(span: &ReceivedSpan, trace_id: &str, kind: i32, process: &str) {
    assert_eq!(span.trace_id, trace_id, "{span:#?}");
    assert_eq!(span.parent_span_id, PARENT_ID, "{span:#?}");
    assert_eq!(span.kind, kind, "{span:#?}");
    assert_eq!(span.name, "GET");
    assert_eq!(span.attr_str("http.request.method"), Some("GET"));
    assert_eq!(span.attr_str("url.path"), Some("/"));
    assert_eq!(span.attr_i64("http.response.status_code"), Some(200));
    assert_eq!(span.attr_str("url.scheme"), Some("https"));
    assert_eq!(
        span.attr_str("hoptrace.tls.plaintext_from"),
        Some("openssl")
    );
    assert_eq!(span.attr_str("process.executable.name"), Some(process));
}

/// Lower bound strict (noise only adds time), the least of the samples within the tolerance.
#[track_caller]
fn assert_at_least_and_min_close(samples: &[Duration], expected: Duration, what: &str) {
    for sample in samples {
        assert!(
            *sample >= expected,
            "{what}: {sample:?} < {expected:?} ({samples:?})"
        );
    }
    let least = samples.iter().min().expect("samples");
    assert!(
        *least <= expected + TOLERANCE,
        "{what}: least of {samples:?} is more than {TOLERANCE:?} above {expected:?}"
    );
}

#[test]
fn curl_over_tls_1_2_and_1_3_yields_agent_and_persona_spans_timed_like_plain_http() {
    let s = setup(&[Host::Agent, Host::Persona]);
    s.lab.set_delay(Direction::Forward, FORWARD).unwrap();
    s.lab.set_delay(Direction::Return, RETURN).unwrap();
    let round_trip = FORWARD + RETURN;
    let mut keep_alive_outside = Vec::new();
    // (version, trace, handshake round trips before the first request can leave)
    for (tls, trace_id, handshake_rtts) in [
        ("1.3", "5bf92f3577b34da6a3ce929d0e0e4736", 1u32),
        ("1.2", "6bf92f3577b34da6a3ce929d0e0e4736", 2),
    ] {
        curl(&s.lab, Host::Agent, tls, trace_id, 3);
        let spans = wait_requests(&s, trace_id, 3, 3);
        let agent = request_spans(&spans, trace_id, "agent");
        let persona = request_spans(&spans, trace_id, "persona");
        assert_eq!(
            (agent.len(), persona.len()),
            (3, 3),
            "TLS {tls}: {spans:#?}"
        );
        for span in &agent {
            assert_https_request(span, trace_id, span_kind::CLIENT, "curl");
            // Handed to OpenSSL, then (encrypted) to the kernel.
            let to_tls = span.event("request.to_tls").expect("request.to_tls");
            let to_kernel = span.event("request.to_kernel").expect("request.to_kernel");
            assert!(
                to_tls.time_unix_nano <= to_kernel.time_unix_nano,
                "{span:#?}"
            );
        }
        for span in &persona {
            assert_https_request(span, trace_id, span_kind::SERVER, "nginx");
            assert!(span.event("response.to_kernel").is_some(), "{span:#?}");
        }
        let first = agent[0].attr_bool("hoptrace.connection.first_request");
        assert_eq!(first, Some(true));
        // The first request includes the TCP connect and the TLS handshake's round trips, and
        // the handshake's cryptography on both sides (CPU time, unbounded on a loaded
        // machine): a lower bound only.
        let outside_first = agent[0].duration().saturating_sub(persona[0].duration());
        let expected_first = round_trip * (2 + handshake_rtts);
        assert!(
            outside_first >= expected_first,
            "TLS {tls} first request: {outside_first:?} < {expected_first:?}"
        );
        for i in 1..3 {
            assert_eq!(
                agent[i].attr_bool("hoptrace.connection.first_request"),
                Some(false)
            );
            keep_alive_outside.push(agent[i].duration().saturating_sub(persona[i].duration()));
        }
    }
    // Keep-alive requests: agent minus persona is the network's share, both delays.
    assert_at_least_and_min_close(
        &keep_alive_outside,
        round_trip,
        "keep-alive agent - persona",
    );
}

#[test]
fn a_node_client_with_static_openssl_is_traced_over_keep_alive() {
    // node runs before the agent starts, waiting: the agent's first scan finds its OpenSSL.
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let trace_id = "7bf92f3577b34da6a3ce929d0e0e4736";
    let go = GoFile::new("node-first");
    let script = node_script(&lab, trace_id, 3, Some(go.path()));
    let mut node = lab
        .spawn(Host::Agent, &["node", "-e", &script])
        .expect("node");
    // Until node has mapped its code (it has once it polls for the go-file).
    std::thread::sleep(Duration::from_millis(500));
    let s = start_agent(lab, &[Host::Agent, Host::Persona]);
    assert!(
        s.agent
            .stderr()
            .contains("TLS plaintext probes on /usr/bin/node"),
        "{}",
        s.agent.stderr()
    );
    go.release();
    assert!(node.child_mut().wait().expect("node exit").success());
    let spans = wait_requests(&s, trace_id, 3, 3);
    let agent = request_spans(&spans, trace_id, "agent");
    assert_eq!(
        agent.len(),
        3,
        "one span per request, none for retries: {spans:#?}"
    );
    for span in agent {
        assert_https_request(span, trace_id, span_kind::CLIENT, "node");
    }
    for span in request_spans(&spans, trace_id, "persona") {
        assert_https_request(span, trace_id, span_kind::SERVER, "nginx");
    }
}

/// Removes the go-file a waiting client polls for, even when the test fails.
struct GoFile(PathBuf);

impl GoFile {
    fn new(what: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self(std::env::temp_dir().join(format!(
            "hoptrace-https-{what}-{}-{nanos}",
            std::process::id()
        )))
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("temp path is UTF-8")
    }

    fn release(&self) {
        std::fs::write(&self.0, b"go").expect("writing the go-file");
    }
}

impl Drop for GoFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_client_started_after_the_agent_is_found_and_traced() {
    let s = setup(&[Host::Agent, Host::Persona]);
    let trace_id = "8bf92f3577b34da6a3ce929d0e0e4736";
    let go = GoFile::new("node-late");
    // node starts now, after the agent, and waits: its own OpenSSL is a file the agent has not
    // probed yet, found by the agent's rescan of /proc.
    let script = node_script(&s.lab, trace_id, 2, Some(go.path()));
    let mut node = s
        .lab
        .spawn(Host::Agent, &["node", "-e", &script])
        .expect("node");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !s
        .agent
        .stderr()
        .contains("TLS plaintext probes on /usr/bin/node")
    {
        assert!(
            Instant::now() < deadline,
            "node never probed:\n{}",
            s.agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    go.release();
    let status = node.child_mut().wait().expect("node exit");
    assert!(status.success());
    let spans = wait_requests(&s, trace_id, 2, 2);
    for span in request_spans(&spans, trace_id, "agent") {
        assert_https_request(span, trace_id, span_kind::CLIENT, "node");
    }
}

#[test]
fn processes_outside_the_observed_namespaces_are_not_traced() {
    // Only the agent namespace: nginx in persona runs the same probed libssl as curl, and the
    // kernel must drop its calls; a client in fw is out of scope altogether.
    let mut s = setup(&[Host::Agent]);
    let observed = "9bf92f3577b34da6a3ce929d0e0e4736";
    let outside = "abf92f3577b34da6a3ce929d0e0e4736";
    curl(&s.lab, Host::Fw, "1.3", outside, 1);
    curl(&s.lab, Host::Agent, "1.3", observed, 2);
    let spans = wait_requests(&s, observed, 2, 0);
    for span in request_spans(&spans, observed, "agent") {
        assert_https_request(span, observed, span_kind::CLIENT, "curl");
    }
    // Let anything late arrive before judging absence.
    s.agent.stop().expect("agent stop");
    let spans = s.receiver.spans();
    assert!(
        request_spans(&spans, observed, "persona").is_empty(),
        "{spans:#?}"
    );
    assert!(spans.iter().all(|x| x.trace_id != outside), "{spans:#?}");
}
