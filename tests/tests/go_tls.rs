//! Go crypto/tls plaintext through uprobes on Conn.Write/Read entries and RET instructions:
//! Debian's stripped caddy (.gopclntab) and the lab's self-built Go server and client (with
//! symbols) in the lab, curl over HTTP/1.1 with a traceparent, spans at a real OTLP receiver.

use std::{net::SocketAddr, time::Duration};

use hoptrace_tests::{
    agent::Agent,
    curl::curl_persona_https as curl,
    personas::{start_caddy, start_go_server, wait_listening},
    receiver::{OtlpReceiver, ReceivedSpan, span_kind},
    request_spans::wait_request_span,
};
use xtask::lab::{
    Host, Lab, LabConfig, PERSONA_IP,
    golang::{GoProgram, go_binary},
};

const PARENT_ID: &str = "00f067aa0ba902b7";
const GO_LIBRARY: &str = "go crypto/tls";

fn traceparent(trace_id: &str) -> String {
    format!("traceparent: 00-{trace_id}-{PARENT_ID}-01")
}

fn start_agent(lab: &Lab, receiver: &OtlpReceiver) -> Agent {
    Agent::watching_lab(lab, receiver).expect("agent")
}

fn assert_go_server_span(span: &ReceivedSpan, trace_id: &str, path: &str, executable: &str) {
    assert_eq!(span.trace_id, trace_id, "{span:#?}");
    assert_eq!(span.parent_span_id, PARENT_ID, "{span:#?}");
    assert_eq!(span.kind, span_kind::SERVER);
    assert_eq!(span.attr_str("http.request.method"), Some("GET"));
    assert_eq!(span.attr_str("url.path"), Some(path));
    assert_eq!(span.attr_i64("http.response.status_code"), Some(200));
    assert_eq!(
        span.attr_str("hoptrace.tls.plaintext_from"),
        Some(GO_LIBRARY)
    );
    assert_eq!(span.attr_str("process.executable.name"), Some(executable));
}

#[test]
fn stripped_caddy_yields_the_persona_span_of_an_https_request() {
    let lab = Lab::start(LabConfig::bare()).expect("lab");
    let _caddy = start_caddy(&lab, 8443);
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = start_agent(&lab, &receiver);
    assert!(
        agent
            .stderr()
            .contains("Go crypto/tls probed in /usr/bin/caddy"),
        "{}",
        agent.stderr()
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4701";
    curl(
        &lab,
        8443,
        "/caddy-path",
        &["--http1.1", "-H", &traceparent(trace_id)],
    );
    let span = wait_request_span(&receiver, &agent, "persona", trace_id);
    assert_go_server_span(&span, trace_id, "/caddy-path", "caddy");
    agent.stop().unwrap();
    assert!(
        agent.stderr().contains("Go crypto/tls: 1 programs probed"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn self_built_go_server_and_client_yield_persona_and_agent_spans() {
    let lab = Lab::start(LabConfig::bare()).expect("lab");
    let _server = start_go_server(&lab, 8444);
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = start_agent(&lab, &receiver);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4702";
    curl(
        &lab,
        8444,
        "/from-curl",
        &["--http1.1", "-H", &traceparent(trace_id)],
    );
    let span = wait_request_span(&receiver, &agent, "persona", trace_id);
    assert_go_server_span(&span, trace_id, "/from-curl", "https");

    // The Go client on the agent side: its Write carries the traceparent. It runs the server's
    // executable, whose probes (on the file) cover it from its start: no scan needed. It writes
    // and reads on two goroutines, so its response's record may come before its request's.
    let client = go_binary(GoProgram::Https).unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4703";
    let url = format!("https://{PERSONA_IP}:8444/from-go");
    let ca = lab.persona_ca().to_str().unwrap().to_owned();
    let tp = format!("00-{trace_id}-{PARENT_ID}-01");
    let status = lab
        .run_stdout(
            Host::Agent,
            &[
                client.to_str().unwrap(),
                "-get",
                &url,
                "-ca",
                &ca,
                "-traceparent",
                &tp,
            ],
        )
        .unwrap();
    assert_eq!(status.trim(), "200");
    let server = wait_request_span(&receiver, &agent, "persona", trace_id);
    assert_go_server_span(&server, trace_id, "/from-go", "https");
    let client = wait_request_span(&receiver, &agent, "agent", trace_id);
    assert_eq!(client.kind, span_kind::CLIENT, "{client:#?}");
    assert_eq!(client.parent_span_id, PARENT_ID);
    assert_eq!(client.attr_str("url.path"), Some("/from-go"));
    assert_eq!(client.attr_i64("http.response.status_code"), Some(200));
    assert_eq!(
        client.attr_str("hoptrace.tls.plaintext_from"),
        Some(GO_LIBRARY)
    );
    // The client's request spans the server's.
    assert!(client.start_time() <= server.start_time() && server.end_time() <= client.end_time());
    agent.stop().unwrap();
    assert!(
        agent.stderr().contains("Go crypto/tls: 1 programs probed"),
        "one executable, two processes: {}",
        agent.stderr()
    );
}

#[test]
fn a_go_program_without_crypto_tls_is_skipped_with_a_log_line_and_counted() {
    let lab = Lab::start(LabConfig::bare()).expect("lab");
    let binary = go_binary(GoProgram::PlainTcp).unwrap();
    let listen = format!("{PERSONA_IP}:9000");
    let mut plain = lab
        .spawn(
            Host::Persona,
            &[binary.as_os_str(), "-listen".as_ref(), listen.as_ref()],
        )
        .unwrap();
    wait_listening(&lab, &mut plain, SocketAddr::new(PERSONA_IP.into(), 9000));
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = start_agent(&lab, &receiver);
    agent.stop().unwrap();
    let log = agent.stderr();
    assert!(
        log.contains("not probing") && log.contains("no crypto/tls in this Go program"),
        "{log}"
    );
    assert!(
        log.contains("Go crypto/tls: 0 programs probed, 1 skipped"),
        "{log}"
    );
}

#[test]
fn http2_to_caddy_yields_connection_spans_and_no_made_up_request() {
    let lab = Lab::start(LabConfig::bare()).expect("lab");
    let _caddy = start_caddy(&lab, 8445);
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = start_agent(&lab, &receiver);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4704";
    // curl's default with caddy: HTTP/2 (HPACK headers, not decoded).
    curl(
        &lab,
        8445,
        "/h2",
        &["--http2", "-H", &traceparent(trace_id)],
    );
    receiver
        .try_wait_for_spans(
            |spans| spans.iter().any(|s| s.name == "tcp.accept"),
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("no accept span: {e:#}\n{}", agent.stderr()));
    agent.stop().unwrap();
    let spans = receiver.spans();
    assert!(spans.iter().any(|s| s.name == "tcp.accept"), "{spans:#?}");
    // Nothing claims to be an HTTP/1 request of this connection with a made-up method or path.
    for span in &spans {
        if let Some(method) = span.attr_str("http.request.method") {
            assert!(
                span.attr_str("url.path") == Some("/h2") && method == "GET",
                "made-up request span: {span:#?}"
            );
        }
    }
}
