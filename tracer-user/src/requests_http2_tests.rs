//! Replay tests of HTTP/2 connections in the request assembler: TLS plaintext records of curl
//! (client) and a Go server, as frames with real HPACK blocks.

use tracer_common::http2::{PREFACE, flags, frame_type};

use super::*;
use crate::http2::tests::{frame, headers};

fn settings() -> Vec<u8> {
    frame(frame_type::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])
}

fn get_h2(encoder: &mut loona_hpack::Encoder<'_>, stream: u32, path: &str, tp: bool) -> Vec<u8> {
    let mut fields = vec![
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "persona.lab"),
        (":path", path),
    ];
    if tp {
        fields.push(("traceparent", TP));
    }
    headers(encoder, stream, true, &fields)
}

fn status_h2(encoder: &mut loona_hpack::Encoder<'_>, stream: u32, status: &str) -> Vec<u8> {
    headers(encoder, stream, false, &[(":status", status)])
}

fn end_data(stream: u32, body: &[u8]) -> Vec<u8> {
    frame(frame_type::DATA, flags::END_STREAM, stream, body)
}

fn version(span: &HopSpan) -> Option<&Value> {
    span.attr("network.protocol.version")
}

#[test]
fn concurrent_streams_each_get_their_span_matched_by_stream_id() {
    let mut r = Replay::new();
    r.connect(SK, 0, 100);
    let (mut to_server, mut to_client) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
    let mut start = PREFACE.to_vec();
    start.extend(settings());
    r.tls(SK, DIRECTION_SEND, &start, 200, At(210, 215, 220));
    // Two requests in flight at once; stream 3 is answered first.
    r.tls(
        SK,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 1, "/one?q=1", true),
        300,
        At(310, 315, 320),
    );
    r.tls(
        SK,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 3, "/three", false),
        400,
        At(410, 415, 420),
    );
    let mut answer3 = settings();
    answer3.extend(status_h2(&mut to_client, 3, "404"));
    answer3.extend(end_data(3, b"no"));
    r.tls(SK, DIRECTION_RECV, &answer3, 500, At(500, 505, 510));
    let mut answer1 = status_h2(&mut to_client, 1, "200");
    answer1.extend(frame(frame_type::DATA, 0, 1, b"hello "));
    r.tls(SK, DIRECTION_RECV, &answer1, 600, At(600, 605, 610));
    r.tls(
        SK,
        DIRECTION_RECV,
        &end_data(1, b"world"),
        700,
        At(700, 705, 710),
    );
    let spans = r.take();
    let hops = hops(&spans);
    assert_eq!(hops.len(), 2, "{spans:#?}");
    let (three, one) = (hops[0], hops[1]);
    assert_eq!((path(three).as_str(), status(three)), ("/three", 404));
    assert_eq!((path(one).as_str(), status(one)), ("/one", 200));
    for hop in [three, one] {
        assert_eq!(version(hop), Some(&Value::from("2")));
        assert_eq!(hop.attr("url.scheme"), Some(&Value::from("https")));
    }
    // Stream 1 carried the caller's trace context and opened the connection.
    assert_eq!(one.ids.trace_id, TP_TRACE);
    assert_eq!(one.ids.parent_id, Some(TP_PARENT));
    assert_eq!(origin(three), Some(&Value::from("hoptrace")));
    assert_eq!(one.start_ns, us(100).min(us(300)).min(one.start_ns));
    assert_eq!(
        one.end_ns,
        us(710),
        "ends when END_STREAM reached the client"
    );
    assert_eq!(three.end_ns, us(510));
    assert!(
        !children(&spans, one).is_empty(),
        "the connect is the first stream's child"
    );
    let stats = r.stats();
    assert_eq!(
        (stats.requests, stats.spans, stats.http2.streams_decoded),
        (2, 2, 2)
    );
    assert_eq!((stats.heads_malformed, stats.non_http_records), (0, 0));
    assert_eq!(stats.http2.connections, 1);
}

#[test]
fn a_server_socket_gives_persona_spans_whichever_preface_comes_first() {
    let mut r = Replay::new();
    r.accept(SK, 100, 50);
    let (mut to_server, mut to_client) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
    // Go writes its SETTINGS before reading the client's preface.
    r.tls(SK, DIRECTION_SEND, &settings(), 150, At(150, 155, 160));
    let mut request = PREFACE.to_vec();
    request.extend(settings());
    request.extend(get_h2(&mut to_server, 1, "/p", true));
    r.tls(SK, DIRECTION_RECV, &request, 200, At(200, 205, 210));
    let mut answer = status_h2(&mut to_client, 1, "503");
    answer.extend(end_data(1, b""));
    r.tls(SK, DIRECTION_SEND, &answer, 300, At(310, 315, 320));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(hop.role, Role::Server);
    assert_eq!((path(hop).as_str(), status(hop)), ("/p", 503));
    assert_eq!(hop.ids.parent_id, Some(TP_PARENT));
    assert_eq!(hop.error.as_deref(), Some("HTTP 503"));
    assert_eq!(version(hop), Some(&Value::from("2")));
    assert_eq!(r.stats().non_http_records, 0);
}

#[test]
fn headers_beyond_the_capture_are_marked_not_decoded_never_guessed() {
    let mut r = Replay::new();
    r.connect(SK, 0, 100);
    let (mut to_server, mut to_client) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
    let mut start = PREFACE.to_vec();
    start.extend(settings());
    r.tls(SK, DIRECTION_SEND, &start, 200, At(210, 215, 220));
    let big = "b".repeat(3000);
    let huge = headers(
        &mut to_server,
        1,
        true,
        &[
            (":method", "GET"),
            (":path", "/big"),
            ("traceparent", TP),
            ("x-big", &big),
        ],
    );
    r.tls(SK, DIRECTION_SEND, &huge, 300, At(310, 315, 320));
    // The next request is small, but its block may name what the lost one added to the table.
    r.tls(
        SK,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 3, "/small", true),
        400,
        At(410, 415, 420),
    );
    for stream in [1, 3] {
        let mut answer = status_h2(&mut to_client, stream, "200");
        answer.extend(end_data(stream, b"ok"));
        r.tls(SK, DIRECTION_RECV, &answer, 500, At(500, 505, 510));
    }
    let spans = r.take();
    assert!(hops(&spans).is_empty(), "{spans:#?}");
    let marker = named(&spans, "HTTP/2 not decoded");
    assert_eq!(marker.len(), 1, "once per connection: {spans:#?}");
    assert_eq!(
        marker[0].attr("hoptrace.http2.not_decoded"),
        Some(&Value::from("header block larger than the captured prefix"))
    );
    assert_ne!(marker[0].ids.trace_id, TP_TRACE);
    let stats = r.stats();
    assert_eq!(stats.http2.streams_not_decoded.values().sum::<u64>(), 2);
    assert_eq!(
        (stats.requests, stats.spans, stats.heads_malformed),
        (0, 0, 0)
    );
    // The connect waited for a first request that never came: out after the hold.
    r.sweep(3_000_000);
    assert_eq!(named(&r.take(), conn_spans::CONNECT).len(), 1);
}

#[test]
fn a_connection_older_than_the_agent_is_not_decodable() {
    let mut r = Replay::new();
    let mut to_server = loona_hpack::Encoder::new();
    let _before_the_agent = get_h2(&mut to_server, 1, "/old", true);
    r.tls(
        SK,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 3, "/new", true),
        300,
        At(310, 315, 320),
    );
    r.tls(
        SK,
        DIRECTION_RECV,
        &end_data(3, b"x"),
        400,
        At(400, 405, 410),
    );
    let spans = r.take();
    assert!(hops(&spans).is_empty(), "{spans:#?}");
    let marker = named(&spans, "HTTP/2 not decoded");
    assert_eq!(marker.len(), 1, "{spans:#?}");
    assert_eq!(
        marker[0].attr("hoptrace.http2.not_decoded"),
        Some(&Value::from(
            "connection older than the agent: HPACK state unknown"
        ))
    );
    let stats = r.stats();
    assert_eq!(stats.http2.connections_not_decodable, 1);
    assert_eq!((stats.non_http_records, stats.heads_malformed), (0, 0));
}

#[test]
fn http1_on_a_fresh_connection_is_untouched() {
    let mut r = Replay::new();
    r.connect(SK, 0, 100);
    r.send(SK, get_traced("/h1"), At(200, 205, 210));
    r.recv(SK, ok("hi"), At(300, 305, 310));
    let spans = r.take();
    assert_eq!(version(only_hop(&spans)), Some(&Value::from("1.1")));
    assert_eq!(r.stats().http2.connections, 0);
}
