//! HTTP/2 over TLS in the lab: curl (OpenSSL + nghttp2) negotiates h2 with the self-built Go
//! server and with Debian's caddy; hoptrace decodes each stream's HEADERS (HPACK) from the TLS
//! plaintext and exports agent and persona spans like HTTP/1.1's, one per stream, and says
//! "not decoded" (never a made-up request) when the kernel's capture limit cut a header block.

use std::time::Duration;

use hoptrace_tests::{
    agent::Agent,
    personas::{start_caddy, start_go_server},
    receiver::{OtlpReceiver, ReceivedSpan, span_kind},
};
use xtask::lab::{Host, Lab, LabConfig, PERSONA_IP, PERSONA_TLS_NAME};

const PARENT_ID: &str = "00f067aa0ba902b7";

fn traceparent(trace_id: &str) -> String {
    format!("traceparent: 00-{trace_id}-{PARENT_ID}-01")
}

/// One curl run over HTTP/2 to `https://persona.lab:<port>` for each path (one connection,
/// streams multiplexed with `--parallel`), trusting the lab's persona CA; returns what curl
/// wrote per transfer: "<http version> <status>".
fn curl_h2(lab: &Lab, port: u16, paths: &[&str], headers: &[&str]) -> Vec<String> {
    let resolve = format!("{PERSONA_TLS_NAME}:{port}:{PERSONA_IP}");
    let ca = lab.persona_ca().to_str().unwrap().to_owned();
    let mut argv: Vec<String> = [
        "curl",
        "-sS",
        "--http2",
        "--parallel",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-w",
        "%{http_version} %{http_code}\\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for header in headers {
        argv.extend(["-H".to_string(), header.to_string()]);
    }
    for path in paths {
        argv.extend([
            "-o".to_string(),
            "/dev/null".to_string(),
            format!("https://{PERSONA_TLS_NAME}:{port}{path}"),
        ]);
    }
    let out = lab.run_stdout(Host::Agent, &argv).expect("curl");
    out.lines().map(str::to_string).collect()
}

fn request_spans<'a>(
    spans: &'a [ReceivedSpan],
    hop: &str,
    trace_id: &str,
) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.attr_str("hoptrace.hop") == Some(hop)
                && s.trace_id == trace_id
                && s.attr_str("http.request.method").is_some()
        })
        .collect()
}

/// Waits for `count` agent and `count` persona request spans of `trace_id`.
fn wait_request_spans(
    receiver: &OtlpReceiver,
    agent: &Agent,
    trace_id: &str,
    count: usize,
) -> Vec<ReceivedSpan> {
    receiver
        .try_wait_for_spans(
            |spans| {
                request_spans(spans, "agent", trace_id).len() >= count
                    && request_spans(spans, "persona", trace_id).len() >= count
            },
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("request spans missing: {e:#}\nagent:\n{}", agent.stderr()))
}

fn assert_h2_span(span: &ReceivedSpan, trace_id: &str, kind: i32) {
    assert_eq!(span.trace_id, trace_id, "{span:#?}");
    assert_eq!(span.parent_span_id, PARENT_ID, "{span:#?}");
    assert_eq!(span.kind, kind, "{span:#?}");
    assert_eq!(
        span.attr_str("http.request.method"),
        Some("GET"),
        "{span:#?}"
    );
    assert_eq!(
        span.attr_i64("http.response.status_code"),
        Some(200),
        "{span:#?}"
    );
    assert_eq!(
        span.attr_str("network.protocol.version"),
        Some("2"),
        "{span:#?}"
    );
    assert_eq!(span.attr_str("url.scheme"), Some("https"), "{span:#?}");
}

#[test]
fn concurrent_streams_to_the_go_server_each_get_agent_and_persona_spans() {
    let lab = Lab::start(LabConfig::bare()).expect("lab");
    let _server = start_go_server(&lab, 8461);
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = Agent::watching_lab(&lab, &receiver).expect("agent");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4761";
    let paths = ["/h2/one?secret=1", "/h2/two", "/h2/three"];
    let written = curl_h2(&lab, 8461, &paths, &[&traceparent(trace_id)]);
    assert_eq!(written, ["2 200", "2 200", "2 200"], "curl spoke HTTP/2");

    let spans = wait_request_spans(&receiver, &agent, trace_id, paths.len());
    let agents = request_spans(&spans, "agent", trace_id);
    let personas = request_spans(&spans, "persona", trace_id);
    for (hop, kind, found) in [
        ("agent", span_kind::CLIENT, &agents),
        ("persona", span_kind::SERVER, &personas),
    ] {
        let mut got: Vec<&str> = found
            .iter()
            .filter_map(|s| s.attr_str("url.path"))
            .collect();
        got.sort_unstable();
        assert_eq!(
            got,
            ["/h2/one", "/h2/three", "/h2/two"],
            "{hop}: {found:#?}"
        );
        for span in found {
            assert_h2_span(span, trace_id, kind);
        }
    }
    let client_ports: std::collections::BTreeSet<i64> = agents
        .iter()
        .filter_map(|s| s.attr_i64("network.local.port"))
        .collect();
    assert_eq!(
        client_ports.len(),
        1,
        "all streams on one connection: {agents:#?}"
    );
    for persona in &personas {
        assert_eq!(
            persona.attr_str("hoptrace.tls.plaintext_from"),
            Some("go crypto/tls")
        );
        // Its client's span encloses it (same stream: same path).
        let path = persona.attr_str("url.path");
        let client = agents
            .iter()
            .find(|a| a.attr_str("url.path") == path)
            .unwrap();
        assert!(
            client.start_time() <= persona.start_time() && persona.end_time() <= client.end_time(),
            "agent {client:#?}\npersona {persona:#?}"
        );
    }
    agent.stop().unwrap();
    let log = agent.stderr();
    assert!(
        log.contains("HTTP/2 connections 2"),
        "agent and persona sockets: {log}"
    );
    assert!(
        !spans.iter().any(|s| s.name == "HTTP/2 not decoded"),
        "{spans:#?}"
    );
}

#[test]
fn caddy_over_http2_yields_agent_and_persona_spans() {
    let lab = Lab::start(LabConfig::bare()).expect("lab");
    let _caddy = start_caddy(&lab, 8462);
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = Agent::watching_lab(&lab, &receiver).expect("agent");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4762";
    let written = curl_h2(&lab, 8462, &["/caddy/h2"], &[&traceparent(trace_id)]);
    assert_eq!(written, ["2 200"]);
    let spans = wait_request_spans(&receiver, &agent, trace_id, 1);
    for (hop, kind) in [("agent", span_kind::CLIENT), ("persona", span_kind::SERVER)] {
        let found = request_spans(&spans, hop, trace_id);
        assert_eq!(found.len(), 1, "{hop}: {found:#?}");
        assert_h2_span(found[0], trace_id, kind);
        assert_eq!(found[0].attr_str("url.path"), Some("/caddy/h2"));
    }
    let persona = &request_spans(&spans, "persona", trace_id)[0];
    assert_eq!(persona.attr_str("process.executable.name"), Some("caddy"));
    agent.stop().unwrap();
}

#[test]
fn headers_beyond_the_capture_limit_are_marked_not_decoded_and_never_made_up() {
    let lab = Lab::start(LabConfig::bare()).expect("lab");
    let _server = start_go_server(&lab, 8463);
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = Agent::watching_lab(&lab, &receiver).expect("agent");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4763";
    // A 3 KB header: the HEADERS frame is larger than the 1 KiB the kernel copies per call,
    // so its HPACK block (and the dynamic table after it) cannot be decoded.
    let big = format!("x-big: {}", "b".repeat(3000));
    let written = curl_h2(
        &lab,
        8463,
        &["/big", "/after-big"],
        &[&traceparent(trace_id), &big],
    );
    assert_eq!(written, ["2 200", "2 200"]);
    let spans = receiver
        .try_wait_for_spans(
            |spans| {
                let marked = |hop: &str| {
                    spans.iter().any(|s| {
                        s.name == "HTTP/2 not decoded" && s.attr_str("hoptrace.hop") == Some(hop)
                    })
                };
                marked("agent") && marked("persona")
            },
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("no not-decoded marker: {e:#}\n{}", agent.stderr()));
    agent.stop().unwrap();
    let spans = [spans, receiver.spans()].concat();
    for marker in spans.iter().filter(|s| s.name == "HTTP/2 not decoded") {
        assert_eq!(
            marker.attr_str("hoptrace.http2.not_decoded"),
            Some("header block larger than the captured prefix"),
            "{marker:#?}"
        );
        assert_eq!(marker.attr_str("network.protocol.version"), Some("2"));
        assert_ne!(
            marker.trace_id, trace_id,
            "the marker knows no trace context"
        );
    }
    // No request span at all for this connection's streams: not with the real trace id (it
    // was not decoded), and not with a made-up method or path.
    let requests: Vec<_> = spans
        .iter()
        .filter(|s| s.attr_str("http.request.method").is_some())
        .collect();
    assert!(requests.is_empty(), "{requests:#?}");
    // The connection and TLS spans are still there.
    assert!(spans.iter().any(|s| s.name == "tcp.accept"), "{spans:#?}");
    assert!(
        spans.iter().any(|s| s.name == "tls.handshake"),
        "{spans:#?}"
    );
    let log = agent.stderr();
    assert!(log.contains("streams decoded 0"), "{log}");
}
