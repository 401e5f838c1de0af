//! Replay tests of the TLS handshake tracker through the assembler: real flights (captured from
//! curl and OpenSSL, see tracer-common/testdata/tls) cut into syscalls as TLS libraries make them.

use tracer_common::data::DIRECTION_RECV;

use super::*;

macro_rules! flight {
    ($name:literal) => {
        include_bytes!(concat!("../../tracer-common/testdata/tls/", $name, ".bin")).as_slice()
    };
}

/// A made-up encrypted application record (content type 23) with `n` body bytes.
fn app_record(n: u16) -> Vec<u8> {
    let mut record = vec![23, 3, 3];
    record.extend_from_slice(&n.to_be_bytes());
    record.resize(5 + usize::from(n), 0xa5);
    record
}

/// Receives `flight` as OpenSSL reads it without read-ahead: each record's 5-byte header, then
/// its body, each one read() at successive microseconds from `at`; the first segment reached
/// TCP at `tcp`.
fn recv_like_openssl(replay: &mut Replay, sk: u64, mut flight: &[u8], tcp: u64, mut at: u64) {
    while flight.len() >= 5 {
        let len = 5 + usize::from(u16::from_be_bytes([flight[3], flight[4]]));
        replay.recv(sk, &flight[..5], At(at, tcp, at + 1));
        replay.recv(sk, &flight[5..len], At(at + 1, tcp, at + 2));
        flight = &flight[len..];
        at += 2;
    }
}

/// A client connects (100..1_100 µs), sends `hello` at 1_200 and reads `server` (its first
/// segment at TCP at 2_000) record by record.
fn client_to_server_hello(r: &mut Replay, hello: &[u8], server: &[u8]) {
    client_sends_hello(r, hello);
    recv_like_openssl(r, SK, server, 2_000, 2_050);
}

fn client_sends_hello(r: &mut Replay, hello: &[u8]) {
    r.connect(SK, 100, 1_100);
    r.send(SK, hello, At(1_200, 1_210, 1_220));
}

/// A server accepts (at 1_000), `hello` arrives at TCP at 1_050, `server` is sent at 1_200.
fn server_to_server_hello(r: &mut Replay, hello: &[u8], server: &[u8]) {
    r.accept(SK, 1_000, 50);
    r.recv(SK, hello, At(1_100, 1_050, 1_120));
    r.send(SK, server, At(1_200, 1_210, 1_220));
}

fn str_attr<'a>(span: &'a HopSpan, key: &str) -> Option<&'a str> {
    match span.attr(key) {
        Some(Value::Str(s)) => Some(s),
        _ => None,
    }
}

fn event(span: &HopSpan, name: &str) -> Option<u64> {
    span.events
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, t)| t)
}

#[test]
fn a_tls13_client_handshake_is_timed_and_joins_its_connect() {
    let mut r = Replay::new();
    // The server's flight reached TCP at 2_000 (a round trip later).
    client_to_server_hello(
        &mut r,
        flight!("curl_tls13_client_hello"),
        flight!("openssl_tls13_server_flight"),
    );
    r.send(
        SK,
        flight!("openssl_tls13_client_finished_flight"),
        At(2_300, 2_310, 2_320),
    );
    r.send(SK, app_record(90), At(2_400, 2_410, 2_420));
    assert!(
        r.take().is_empty(),
        "held for the connection's first request"
    );
    recv_like_openssl(
        &mut r,
        SK,
        flight!("openssl_tls13_server_tickets"),
        3_000,
        3_010,
    );

    r.sweep(1_100 + 2_000_000 + 1);
    let spans = r.take();
    let connect = named(&spans, conn_spans::CONNECT)[0];
    let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
    assert_eq!(spans.len(), 2);
    // No request known (no plaintext): the handshake joins the connect's trace, as its child.
    assert_eq!(tls.ids.trace_id, connect.ids.trace_id);
    assert_eq!(tls.ids.parent_id, Some(connect.ids.span_id));
    assert_eq!((tls.role, tls.error.as_deref()), (Role::Client, None));
    assert_eq!((tls.start_ns, tls.end_ns), (us(1_200), us(2_300)));
    assert_eq!(event(tls, "tls.server_hello"), Some(us(2_000)));
    assert_eq!(str_attr(tls, "tls.protocol.version"), Some("1.3"));
    assert_eq!(str_attr(tls, "tls.client.server_name"), Some("persona.lab"));
    assert_eq!(
        str_attr(tls, "hoptrace.tls.alpn_offered"),
        Some("h2,http/1.1")
    );
    assert_eq!(str_attr(tls, "tls.cipher"), Some("TLS_AES_256_GCM_SHA384"));
    assert_eq!(tls.attr("tls.next_protocol"), None);
    assert!(str_attr(tls, "hoptrace.tls.next_protocol_visible").is_some());
    assert_eq!(
        tls.attr("hoptrace.tls.first_data_after_ns"),
        Some(&Value::Int(100_000))
    );
    assert_eq!(str_attr(tls, "hoptrace.hop"), Some(HOP_AGENT));
    // Ciphertext is not HTTP garbage.
    assert_eq!(r.stats().non_http_records, 0);
    assert_eq!((r.stats().tls.handshakes, r.stats().tls.spans), (1, 1));
}

#[test]
fn a_tls12_server_handshake_is_done_when_it_sends_its_finished() {
    let mut r = Replay::new();
    server_to_server_hello(
        &mut r,
        flight!("curl_tls12_client_hello"),
        flight!("openssl_tls12_server_flight"),
    );
    // The client's ClientKeyExchange, CCS and Finished in one read.
    r.recv(
        SK,
        flight!("openssl_tls12_client_finished_flight"),
        At(2_000, 1_900, 2_010),
    );
    r.send(
        SK,
        flight!("openssl_tls12_server_finished_flight"),
        At(2_100, 2_110, 2_120),
    );
    r.recv(SK, app_record(200), At(3_000, 2_900, 3_010));
    r.sweep(1_000 + 2_000_000 + 1);
    let spans = r.take();
    let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
    assert_eq!(tls.role, Role::Server);
    // Starts at the ClientHello's arrival at TCP, done at the server's CCS + Finished send.
    assert_eq!((tls.start_ns, tls.end_ns), (us(1_050), us(2_100)));
    assert_eq!(event(tls, "tls.server_hello"), Some(us(1_200)));
    assert_eq!(str_attr(tls, "tls.protocol.version"), Some("1.2"));
    // TLS 1.2 sends the ALPN choice in the clear.
    assert_eq!(str_attr(tls, "tls.next_protocol"), Some("http/1.1"));
    assert_eq!(
        tls.attr("hoptrace.tls.first_data_after_ns"),
        Some(&Value::Int(800_000))
    );
    assert_eq!(str_attr(tls, "hoptrace.hop"), Some(HOP_PERSONA));
    assert_eq!(tls.attr("tls.established"), Some(&Value::Bool(true)));
}

#[test]
fn an_alert_fails_the_handshake_at_once_with_its_name() {
    for (hello, server, alert, version) in [
        (
            flight!("curl_tls12_client_hello"),
            flight!("openssl_tls12_server_flight"),
            flight!("openssl_tls12_unknown_ca_alert"),
            "1.2",
        ),
        (
            flight!("curl_tls13_client_hello"),
            flight!("openssl_tls13_server_flight"),
            flight!("openssl_tls13_unknown_ca_alert"),
            "1.3",
        ),
    ] {
        let mut r = Replay::new();
        client_to_server_hello(&mut r, hello, server);
        r.send(SK, alert, At(2_500, 2_510, 2_520));
        // Held for the library's verdict (or the connection's end), then out at once.
        assert!(r.take().is_empty(), "{version}");
        r.library_handshake(SK, -1, 1, 1_150, 2_530);
        let spans = r.take();
        let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
        assert_eq!(
            str_attr(tls, "hoptrace.tls.library.result"),
            Some("failed: SSL_connect returned -1, SSL_get_error SSL_ERROR_SSL (1)")
        );
        let events: Vec<_> = tls.events.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            events,
            [
                crate::tls_library::STARTED,
                "tls.client_hello",
                "tls.server_hello",
                crate::tls_library::FAILED
            ]
        );
        assert_eq!(named(&spans, conn_spans::CONNECT).len(), 1, "{version}");
        let error = tls.error.as_deref().unwrap();
        assert!(
            error.contains("alert sent") && error.contains("fatal unknown_ca (48)"),
            "{error}"
        );
        assert_eq!(str_attr(tls, "error.type"), Some("unknown_ca"));
        assert_eq!(str_attr(tls, "tls.protocol.version"), Some(version));
        assert_eq!(
            tls.end_ns,
            us(2_000),
            "ends at the last phase seen: the ServerHello"
        );
        assert_eq!(r.stats().tls.failed, 1);
    }
}

#[test]
fn an_encrypted_tls13_alert_is_recognized_by_its_size() {
    let mut r = Replay::new();
    server_to_server_hello(
        &mut r,
        flight!("curl_tls13_client_hello"),
        flight!("openssl_tls13_server_flight"),
    );
    r.recv(SK, app_record(19), At(2_000, 1_900, 2_010));
    // No library report (a server the probes do not see): out when the connection ends.
    assert!(r.take().is_empty());
    r.reset(SK, 1_000, 2_100);
    let spans = r.take();
    let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
    assert!(tls.error.as_deref().unwrap().contains("encrypted"));
}

#[test]
fn a_reset_before_finished_is_an_aborted_handshake() {
    let mut r = Replay::new();
    client_sends_hello(&mut r, flight!("curl_tls13_client_hello"));
    r.reset(SK, 1_100, 5_000);
    let spans = r.take();
    let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
    assert_eq!(
        tls.error.as_deref(),
        Some("aborted: connection reset before Finished")
    );
    assert_eq!(
        tls.attr("tls.protocol.version"),
        None,
        "no ServerHello: version unknown"
    );
    assert_eq!((tls.start_ns, tls.end_ns), (us(1_200), us(1_200)));
}

#[test]
fn non_tls_on_443_and_tls_without_its_start_are_counted_not_timed() {
    let mut r = Replay::new();
    let mut garbage = record(SK, DIRECTION_SEND, b"\x00\x01garbage\xff", At(10, 11, 12));
    garbage.dport = 443;
    r.data(&garbage);
    let mut midstream = record(SK2, DIRECTION_RECV, &app_record(40), At(20, 21, 22));
    midstream.dport = 443;
    r.data(&midstream);
    r.data(&record(
        SK2,
        DIRECTION_SEND,
        &app_record(40),
        At(30, 31, 32),
    ));
    r.sweep(10_000_000);
    r.asm.flush(&mut r.out);
    assert!(r.take().is_empty());
    let tls = &r.stats().tls;
    assert_eq!((tls.non_tls_on_tls_port, tls.midstream_skipped), (1, 1));
    assert_eq!(r.stats().non_http_records, 1, "only the garbage");
}

#[test]
fn a_record_boundary_in_uncaptured_bytes_resyncs_on_the_next_syscall() {
    let mut r = Replay::new();
    client_sends_hello(&mut r, flight!("curl_tls13_client_hello"));
    // The whole 800-byte server flight plus a 1 KiB record in one read: the kernel copies
    // 1024 bytes, the next record's header falls after them.
    let mut big = flight!("openssl_tls13_server_flight").to_vec();
    big.extend(app_record(1_000));
    big.extend(app_record(10));
    r.recv(SK, &big, At(2_050, 2_000, 2_060));
    r.send(
        SK,
        flight!("openssl_tls13_client_finished_flight"),
        At(2_300, 2_310, 2_320),
    );
    r.send(SK, app_record(90), At(2_400, 2_410, 2_420));
    r.sweep(1_100 + 2_000_000 + 1);
    let spans = r.take();
    let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
    assert_eq!(r.stats().tls.records_lost, 1);
    assert!(tls.error.is_none());
    assert_eq!((tls.start_ns, tls.end_ns), (us(1_200), us(2_300)));
    assert!(
        tls.attributes
            .iter()
            .any(|(k, v)| *k == "hoptrace.uncertain"
                && matches!(v, Value::Str(s) if s.contains("record boundaries")))
    );
}

#[test]
fn a_done_handshake_without_data_goes_out_after_the_hold() {
    let mut r = Replay::new();
    server_to_server_hello(
        &mut r,
        flight!("curl_tls13_client_hello"),
        flight!("openssl_tls13_server_flight"),
    );
    r.recv(
        SK,
        flight!("openssl_tls13_client_finished_flight"),
        At(2_000, 1_900, 2_010),
    );
    r.sweep(1_500_000);
    assert!(r.take().is_empty());
    r.sweep(1_900 + 2_000_000 + 1);
    let spans = r.take();
    let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
    assert_eq!((tls.start_ns, tls.end_ns), (us(1_050), us(1_900)));
    assert_eq!(tls.attr("hoptrace.tls.first_data_after_ns"), None);
    assert_eq!(named(&spans, conn_spans::ACCEPT).len(), 1);
}

proptest! {
    /// Arbitrary bytes after a real ClientHello, cut into arbitrary syscalls and capture
    /// lengths: never a panic, at most one handshake span.
    #[test]
    fn arbitrary_streams_never_panic(
        chunks in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 1..1500), 0usize..1500),
            0..12,
        ),
    ) {
        let mut r = Replay::new();
        r.connect(SK, 100, 1_100);
        r.send(SK, flight!("curl_tls13_client_hello"), At(1_200, 1_210, 1_220));
        for (i, (sending, bytes, captured)) in chunks.iter().enumerate() {
            let t = 2_000 + 10 * i as u64;
            let dir = if *sending { DIRECTION_SEND } else { DIRECTION_RECV };
            let event = record(SK, dir, bytes, At(t, t, t + 1));
            r.data(&cut(event, (*captured).min(usize::from(event.captured))));
        }
        r.asm.flush(&mut r.out);
        let spans = r.take();
        prop_assert_eq!(named(&spans, tls_handshake::HANDSHAKE).len(), 1);
    }
}

#[test]
fn a_peeked_byte_and_a_header_read_alone_still_start_the_handshake() {
    // nginx peeks at one byte (MSG_PEEK) to tell TLS from HTTP, then OpenSSL reads the record
    // header and its body separately.
    let hello = flight!("curl_tls13_client_hello");
    let mut r = Replay::new();
    r.accept(SK, 1_000, 50);
    r.recv(SK, &hello[..1], At(1_100, 1_050, 1_110));
    r.recv(SK, &hello[..5], At(1_120, 1_050, 1_130));
    r.recv(SK, &hello[5..], At(1_140, 1_050, 1_150));
    r.send(
        SK,
        flight!("openssl_tls13_server_flight"),
        At(1_200, 1_210, 1_220),
    );
    r.recv(
        SK,
        flight!("openssl_tls13_client_finished_flight"),
        At(2_000, 1_900, 2_010),
    );
    r.recv(SK, app_record(100), At(2_100, 2_050, 2_110));
    r.sweep(1_900 + 2_000_000 + 1);
    let spans = r.take();
    let tls = named(&spans, tls_handshake::HANDSHAKE)[0];
    assert_eq!((tls.start_ns, tls.end_ns), (us(1_050), us(1_900)));
    assert_eq!(str_attr(tls, "tls.client.server_name"), Some("persona.lab"));
    assert_eq!(r.stats().tls.non_tls_on_tls_port, 0);
    assert_eq!(r.stats().non_http_records, 0);
}

/// nginx reading ahead in `SSL_do_handshake`: one read returns the client's Finished flight
/// (its segment arrived at 2_880 us, the kernel's lookup for the read) and the request's first
/// record (its own segment at 2_950). The request's span starts at its own segment when the
/// record is found in the captured bytes and a segment starts there; otherwise at the read's,
/// said to be perhaps the handshake's.
#[test]
fn a_request_read_with_the_handshakes_end_starts_at_its_own_segment() {
    let finished = flight!("openssl_tls13_client_finished_flight");
    let request_seq = 3_000 + u32::try_from(finished.len()).unwrap();
    let mut read = finished.to_vec();
    read.extend(app_record(200));
    // (bytes the kernel copied, the request segment's arrival known) -> (start, uncertain)
    for (captured, segment_known, start, uncertain) in [
        (read.len(), true, 2_950, false),
        // The Finished and the request in one segment, or its slot overwritten.
        (read.len(), false, 2_880, true),
        // The request's record header lies in bytes not copied.
        (finished.len() + 2, true, 2_880, true),
    ] {
        let nic = FakeNic {
            ingress: Vec::from_iter(segment_known.then_some((request_seq, us(2_950)))),
            ..FakeNic::default()
        };
        let mut r = Replay::with(Config::default());
        r.asm = Assembler::new(Config::default()).with_nic(Box::new(nic));
        server_to_server_hello(
            &mut r,
            flight!("curl_tls13_client_hello"),
            flight!("openssl_tls13_server_flight"),
        );
        r.data(&cut(
            arrived_at(
                record(SK, DIRECTION_RECV, &read, At(3_000, 2_900, 3_010)),
                2_880,
            ),
            captured,
        ));
        // SSL_read serves the request from what the handshake call read: that read's times.
        let mut request = plaintext(
            SK,
            DIRECTION_RECV,
            &get_traced("/"),
            3_020,
            At(3_000, 2_900, 3_030),
        );
        request.data.nic_ns = us(2_880);
        r.asm.on_plaintext(&request, &mut r.out);
        r.send(SK, CIPHERTEXT, At(3_100, 3_110, 3_120));
        r.tls(
            SK,
            DIRECTION_SEND,
            &ok("ok"),
            3_090,
            At(3_100, 3_110, 3_130),
        );
        let spans = r.take();
        let hop = only_hop(&spans);
        let what = format!("captured {captured}, segment known {segment_known}: {hop:#?}");
        assert_eq!(hop.start_ns, us(start), "{what}");
        assert_eq!(event(hop, "request.nic_ingress"), Some(us(start)), "{what}");
        assert_eq!(
            hop.attributes
                .iter()
                .any(|(k, v)| *k == "hoptrace.uncertain"
                    && matches!(v, Value::Str(s) if s.contains("the handshake's"))),
            uncertain,
            "{what}"
        );
        // TCP timed the read's first segment: kept only where the arrival stays the read's.
        assert_eq!(event(hop, "request.at_tcp").is_some(), uncertain, "{what}");
    }
}
