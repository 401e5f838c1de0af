//! End-to-end: TLS handshake spans from ciphertext record headers, with the real agent, nginx
//! over TLS 1.2 and 1.3, curl, haproxy intercepting TLS in fw, and a real OTLP receiver.
//! Needs root and the kernel; every test builds its own lab.

use std::time::Duration;

use hoptrace_tests::{
    TOLERANCE,
    agent::Agent,
    receiver::{OtlpReceiver, ReceivedSpan, span_kind, status_code},
};
use xtask::lab::{Direction, Host, Lab, LabConfig, NGINX_TLS_PORT, PERSONA_IP, PERSONA_TLS_NAME};

const HANDSHAKE: &str = "tls.handshake";

fn lab_with_nginx() -> Lab {
    Lab::start(LabConfig {
        python: false,
        ..LabConfig::default()
    })
    .expect("lab")
}

/// The agent watching the agent and persona namespaces (never fw: it is the uninstrumented
/// middlebox), exporting OTLP/gRPC to `receiver`.
fn agent_for(lab: &Lab, receiver: &OtlpReceiver) -> Agent {
    Agent::start(
        &[
            "--netns",
            lab.netns(Host::Agent).name(),
            "--netns",
            lab.netns(Host::Persona).name(),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    )
    .expect("agent")
}

/// curl from the agent to `https://persona.lab/` (so that it sends SNI), trusting `ca`, with
/// `extra` options; returns curl's exit code.
fn curl_https(lab: &Lab, ca: Option<&std::path::Path>, extra: &[&str]) -> Option<i32> {
    let resolve = format!("{PERSONA_TLS_NAME}:{NGINX_TLS_PORT}:{PERSONA_IP}");
    let url = format!("https://{PERSONA_TLS_NAME}/");
    let mut cmd = lab.exec(
        Host::Agent,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "--resolve",
            &resolve,
        ],
    );
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args(extra).arg(&url);
    cmd.output().expect("curl").status.code()
}

fn wait_for_handshakes(receiver: &OtlpReceiver, count: usize) -> Vec<ReceivedSpan> {
    let spans = receiver
        .try_wait_for_spans(
            |spans| spans.iter().filter(|s| s.name == HANDSHAKE).count() >= count,
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| {
            let got: Vec<String> = receiver
                .spans()
                .iter()
                .map(|s| {
                    format!(
                        "{} {:?} {:?}",
                        s.name,
                        s.attr_str("hoptrace.hop"),
                        s.attr_str("network.peer.address")
                    )
                })
                .collect();
            panic!("waiting for {count} {HANDSHAKE} spans: {e:#}: {got:#?}")
        });
    spans.into_iter().filter(|s| s.name == HANDSHAKE).collect()
}

fn side<'a>(spans: &'a [ReceivedSpan], hop: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.attr_str("hoptrace.hop") == Some(hop))
        .collect()
}

fn event_ns(span: &ReceivedSpan, name: &str) -> u64 {
    span.events
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no {name} event: {span:#?}"))
        .time_unix_nano
}

/// ClientHello -> ServerHello as this side saw it.
fn hello_to_hello(span: &ReceivedSpan) -> Duration {
    Duration::from_nanos(event_ns(span, "tls.server_hello") - event_ns(span, "tls.client_hello"))
}

/// Noise only adds time: every sample at least `want`, the least within `slack` of it.
#[track_caller]
fn assert_bounded_by(samples: &[Duration], want: Duration, slack: Duration, what: &str) {
    for s in samples {
        assert!(*s >= want, "{what}: {s:?} < {want:?} ({samples:?})");
    }
    let least = samples.iter().min().expect("samples");
    assert!(
        *least <= want + slack,
        "{what}: least {least:?} > {want:?} + {slack:?} ({samples:?})"
    );
}

/// One network round trip's worth of timing: the tests' common tolerance.
#[track_caller]
fn assert_bounded(samples: &[Duration], want: Duration, what: &str) {
    assert_bounded_by(samples, want, TOLERANCE, what);
}

/// A whole handshake also holds both ends' key exchange, signing and certificate checks (a few
/// ms of CPU each on this loaded 2-core machine, in a debug build of nothing but the tracer):
/// the delays are its floor, not its size.
const CRYPTO_SLACK: Duration = Duration::from_millis(10);

#[test]
fn curl_to_nginx_over_tls_1_2_and_1_3_gives_handshake_spans_on_both_sides() {
    let lab = lab_with_nginx();
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = agent_for(&lab, &receiver);
    let (forward, ret) = (Duration::from_millis(10), Duration::from_millis(5));
    lab.set_delay(Direction::Forward, forward).unwrap();
    lab.set_delay(Direction::Return, ret).unwrap();
    const RUNS: usize = 3;
    for (min, max) in [("--tlsv1.2", "1.2"), ("--tlsv1.3", "1.3")] {
        for _ in 0..RUNS {
            let code = curl_https(&lab, Some(lab.persona_ca()), &[min, "--tls-max", max]);
            assert_eq!(code, Some(0));
        }
    }
    let spans = wait_for_handshakes(&receiver, 4 * RUNS);
    let rtt = forward + ret;
    for version in ["1.2", "1.3"] {
        let of_version: Vec<ReceivedSpan> = spans
            .iter()
            .filter(|s| s.attr_str("tls.protocol.version") == Some(version))
            .cloned()
            .collect();
        let agent = side(&of_version, "agent");
        let persona = side(&of_version, "persona");
        assert_eq!(
            (agent.len(), persona.len()),
            (RUNS, RUNS),
            "{version}: {spans:#?}"
        );
        for span in agent.iter().chain(&persona) {
            assert_eq!(span.status.code, status_code::UNSET, "{span:#?}");
            assert_eq!(
                span.attr_str("tls.client.server_name"),
                Some(PERSONA_TLS_NAME)
            );
            assert_eq!(span.attr_str("tls.protocol.name"), Some("tls"));
            assert_eq!(span.attr_bool("tls.established"), Some(true));
            assert_eq!(
                span.attr_str("hoptrace.tls.alpn_offered"),
                Some("h2,http/1.1")
            );
            assert_eq!(
                span.attr_i64("server.port"),
                Some(i64::from(NGINX_TLS_PORT))
            );
        }
        for span in &agent {
            assert_eq!(span.kind, span_kind::CLIENT);
            assert_eq!(span.attr_str("process.executable.name"), Some("curl"));
            // The request is known (plaintext from curl's libssl): the handshake is a child of
            // the request that opened the connection, like the connect.
            let request = spans_named_with_id(&receiver, "GET", &span.parent_span_id);
            assert_eq!(request.trace_id, span.trace_id);
            assert_eq!(request.attr_str("hoptrace.hop"), Some("agent"));
        }
        for span in &persona {
            assert_eq!(span.kind, span_kind::SERVER);
            assert_eq!(span.attr_str("process.executable.name"), Some("nginx"));
        }
        // The ServerHello comes back one round trip (both delays) after the ClientHello left.
        let samples: Vec<Duration> = agent.iter().map(|s| hello_to_hello(s)).collect();
        assert_bounded(
            &samples,
            rtt,
            &format!("agent ClientHello -> ServerHello, {version}"),
        );
        // Done: TLS 1.3 after one round trip on both sides; TLS 1.2 after two on the client
        // (the server's Finished), one on the server (from the ClientHello to its Finished).
        let client_rtts = if version == "1.2" { 2 } else { 1 };
        let durations: Vec<Duration> = agent.iter().map(|s| s.duration()).collect();
        let what = format!("agent handshake, {version}");
        assert_bounded_by(&durations, rtt * client_rtts, CRYPTO_SLACK, &what);
        let durations: Vec<Duration> = persona.iter().map(|s| s.duration()).collect();
        let what = format!("persona handshake, {version}");
        assert_bounded_by(&durations, rtt, CRYPTO_SLACK, &what);
        // The library's view (OpenSSL handshake uprobes): curl's SSL_connect starts before its
        // ClientHello leaves and returns once the wire says done; nginx calls
        // SSL_do_handshake once the ClientHello is there.
        for span in &agent {
            assert_library_order(
                span,
                "SSL_connect",
                &[
                    LIBRARY_START,
                    "tls.client_hello",
                    "tls.server_hello",
                    "tls.handshake_done",
                    LIBRARY_DONE,
                ],
            );
            let library =
                Duration::from_nanos(event_ns(span, LIBRARY_DONE) - event_ns(span, LIBRARY_START));
            assert!(library >= rtt * client_rtts, "{library:?}: {span:#?}");
        }
        for span in &persona {
            assert_library_order(
                span,
                "SSL_do_handshake",
                &[
                    "tls.client_hello",
                    LIBRARY_START,
                    "tls.server_hello",
                    "tls.handshake_done",
                    LIBRARY_DONE,
                ],
            );
        }
        // ALPN: in the clear in 1.2 (nginx picks http/1.1), encrypted in 1.3 and said so.
        if version == "1.2" {
            assert_eq!(agent[0].attr_str("tls.next_protocol"), Some("http/1.1"));
        } else {
            assert!(
                agent[0]
                    .attr_str("hoptrace.tls.next_protocol_visible")
                    .is_some()
            );
        }
    }
}

/// The handshake failed on the client's unknown_ca alert, `how` (sent or received) here.
#[track_caller]
fn assert_unknown_ca(span: &ReceivedSpan, how: &str) {
    let message = &span.status.message;
    assert!(
        message.contains(how) && message.contains("fatal unknown_ca (48)"),
        "{span:#?}"
    );
    assert_eq!(span.attr_str("error.type"), Some("unknown_ca"));
}

const LIBRARY_START: &str = "tls.library.handshake_start";
const LIBRARY_DONE: &str = "tls.library.handshake_done";
const LIBRARY_FAILED: &str = "tls.library.handshake_failed";

/// The span's events `order` happened in that order (equal times allowed), and the library's
/// report names `function`.
#[track_caller]
fn assert_library_order(span: &ReceivedSpan, function: &str, order: &[&str]) {
    let times: Vec<u64> = order.iter().map(|name| event_ns(span, name)).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "events out of order, want {order:?}, got {times:?}: {span:#?}"
    );
    assert_eq!(
        span.attr_str("hoptrace.tls.library.function"),
        Some(function),
        "{span:#?}"
    );
    assert_eq!(span.attr_str("hoptrace.tls.library"), Some("openssl"));
}

/// The span `name` with span id `id`, waiting for it a while (it may be in a later batch).
fn spans_named_with_id(receiver: &OtlpReceiver, name: &str, id: &str) -> ReceivedSpan {
    let found = |spans: &[ReceivedSpan]| spans.iter().any(|s| s.name == name && s.span_id == id);
    receiver
        .try_wait_for_spans(found, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no {name} span {id}: {e:#}"))
        .into_iter()
        .find(|s| s.name == name && s.span_id == id)
        .expect("found")
}

#[test]
fn an_untrusted_certificate_is_an_error_handshake_span_with_the_alert() {
    let lab = lab_with_nginx();
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = agent_for(&lab, &receiver);
    for version in ["1.2", "1.3"] {
        let code = curl_https(&lab, None, &["--tls-max", version]);
        assert_eq!(
            code,
            Some(60),
            "curl: peer certificate cannot be authenticated"
        );
    }
    let spans = wait_for_handshakes(&receiver, 4);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert_eq!(side(&spans, "agent").len(), 2, "{spans:#?}");
    assert_eq!(side(&spans, "persona").len(), 2, "{spans:#?}");
    for span in &spans {
        assert_eq!(span.status.code, status_code::ERROR, "{span:#?}");
        assert_eq!(span.attr_bool("tls.established"), Some(false));
    }
    // The client sent the alert; the library's verdict: curl's SSL_connect failed
    // (SSL_get_error says SSL_ERROR_SSL: the certificate check) after the ServerHello brought
    // the certificate, not mistaken for a retry.
    for span in side(&spans, "agent") {
        assert_unknown_ca(span, "alert sent");
        assert_library_order(
            span,
            "SSL_connect",
            &[
                LIBRARY_START,
                "tls.client_hello",
                "tls.server_hello",
                LIBRARY_FAILED,
            ],
        );
        assert_eq!(
            span.attr_str("hoptrace.tls.library.result"),
            Some("failed: SSL_connect returned -1, SSL_get_error SSL_ERROR_SSL (1)"),
            "{span:#?}"
        );
    }
    // nginx received the alert, or a reset: curl closes with the server's last records unread,
    // so its kernel sends a RST right behind the alert, and when the RST is there before nginx
    // reads, the alert is discarded unread (a race of the real stack, not of the tracer). With
    // the alert read, nginx's SSL_do_handshake failing on it is the library's verdict.
    for span in side(&spans, "persona") {
        if span
            .status
            .message
            .contains("connection reset before Finished")
        {
            assert_eq!(span.attr_str("error.type"), Some("connection_reset"));
            continue;
        }
        assert_unknown_ca(span, "alert received");
        assert_library_order(
            span,
            "SSL_do_handshake",
            &["tls.client_hello", LIBRARY_START, LIBRARY_FAILED],
        );
        let result = span.attr_str("hoptrace.tls.library.result").unwrap_or("");
        assert!(
            result.starts_with("failed: SSL_do_handshake returned "),
            "{span:#?}"
        );
        assert!(span.events.iter().all(|e| e.name != LIBRARY_DONE));
    }
}

#[test]
fn through_tls_interception_each_leg_has_its_handshake_and_its_delay() {
    let lab = lab_with_nginx();
    let interception = lab.start_tls_interception().expect("interception");
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = agent_for(&lab, &receiver);
    // Forward delay: packets entering fw from the agent (the agent <-> fw leg); return delay:
    // packets entering fw from the persona (the fw <-> persona leg).
    let (forward, ret) = (Duration::from_millis(20), Duration::from_millis(5));
    lab.set_delay(Direction::Forward, forward).unwrap();
    lab.set_delay(Direction::Return, ret).unwrap();
    const RUNS: usize = 3;
    for _ in 0..RUNS {
        assert_eq!(curl_https(&lab, Some(interception.ca()), &[]), Some(0));
    }
    let spans = wait_for_handshakes(&receiver, 2 * RUNS);
    let agent = side(&spans, "agent");
    let persona = side(&spans, "persona");
    assert_eq!((agent.len(), persona.len()), (RUNS, RUNS), "{spans:#?}");
    // The agent's leg ends at fw (though addressed to the persona): only the forward delay.
    let samples: Vec<Duration> = agent.iter().map(|s| hello_to_hello(s)).collect();
    assert_bounded(&samples, forward, "agent <-> fw ClientHello -> ServerHello");
    let durations: Vec<Duration> = agent.iter().map(|s| s.duration()).collect();
    assert_bounded_by(&durations, forward, CRYPTO_SLACK, "agent <-> fw handshake");
    // haproxy's own leg to the persona, from fw's address, with haproxy's SNI.
    for span in &persona {
        assert_eq!(span.attr_str("network.peer.address"), Some("10.10.2.1"));
        assert_eq!(
            span.attr_str("tls.client.server_name"),
            Some(PERSONA_TLS_NAME)
        );
        assert_eq!(span.status.code, status_code::UNSET);
    }
    let durations: Vec<Duration> = persona.iter().map(|s| s.duration()).collect();
    assert_bounded_by(&durations, ret, CRYPTO_SLACK, "fw <-> persona handshake");
    // ...and less than the agent's leg, whose delay is four times larger.
    let least = |spans: &[&ReceivedSpan]| spans.iter().map(|s| s.duration()).min().unwrap();
    assert!(least(&persona) < least(&agent), "{spans:#?}");
}

#[test]
fn plain_http_and_garbage_on_443_are_counted_not_timed() {
    let lab = lab_with_nginx();
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut agent = agent_for(&lab, &receiver);
    // Plain HTTP to the TLS port (nginx answers 400), then bytes that are nothing at all.
    let http = format!("http://{PERSONA_IP}:{NGINX_TLS_PORT}/");
    lab.run(Host::Agent, &["curl", "-sS", "-o", "/dev/null", &http])
        .unwrap();
    let garbage = format!(
        "exec 3<>/dev/tcp/{PERSONA_IP}/{NGINX_TLS_PORT}; printf '\\001\\002 garbage \\377' >&3; \
         sleep 0.3"
    );
    lab.run(Host::Agent, &["bash", "-c", &garbage]).unwrap();
    // Let the connect spans' hold pass, then stop the agent for its summary.
    std::thread::sleep(Duration::from_secs(3));
    agent.stop().unwrap();
    let stderr = agent.stderr();
    // Two connections, each seen from the agent and from the persona.
    assert!(stderr.contains("non-TLS on TLS ports 4"), "{stderr}");
    assert!(stderr.contains("TLS handshakes 0"), "{stderr}");
    assert!(receiver.spans().iter().all(|s| s.name != HANDSHAKE));
}
