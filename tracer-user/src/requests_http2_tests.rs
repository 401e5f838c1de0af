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

/// A TLS library call on `SK` at `t` µs, its syscall 10 µs later, TCP at +15, returning at +20.
fn h2(r: &mut Replay, direction: u8, bytes: &[u8], t: u64) {
    r.tls(SK, direction, bytes, t, At(t + 10, t + 15, t + 20));
}

/// A client that connected at 100 µs and sent its preface and SETTINGS at 200 µs, with the
/// HPACK encoders of the two directions.
fn curl_connected() -> (
    Replay,
    loona_hpack::Encoder<'static>,
    loona_hpack::Encoder<'static>,
) {
    let mut r = Replay::new();
    r.connect(SK, 0, 100);
    let mut start = PREFACE.to_vec();
    start.extend(settings());
    h2(&mut r, DIRECTION_SEND, &start, 200);
    (r, loona_hpack::Encoder::new(), loona_hpack::Encoder::new())
}

fn version(span: &HopSpan) -> Option<&Value> {
    span.attr("network.protocol.version")
}

#[test]
fn concurrent_streams_each_get_their_span_matched_by_stream_id() {
    let (mut r, mut to_server, mut to_client) = curl_connected();
    // Two requests in flight at once; stream 3 is answered first.
    h2(
        &mut r,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 1, "/one?q=1", true),
        300,
    );
    h2(
        &mut r,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 3, "/three", false),
        400,
    );
    let mut answer3 = settings();
    answer3.extend(status_h2(&mut to_client, 3, "404"));
    answer3.extend(end_data(3, b"no"));
    h2(&mut r, DIRECTION_RECV, &answer3, 500);
    let mut answer1 = status_h2(&mut to_client, 1, "200");
    answer1.extend(frame(frame_type::DATA, 0, 1, b"hello "));
    h2(&mut r, DIRECTION_RECV, &answer1, 600);
    h2(&mut r, DIRECTION_RECV, &end_data(1, b"world"), 700);
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
    assert!(
        one.start_ns < us(300),
        "the first stream includes the connect"
    );
    assert_eq!(three.start_ns, us(400), "handed to TLS");
    assert_eq!(
        one.end_ns,
        us(720),
        "ends when END_STREAM reached the client"
    );
    assert_eq!(three.end_ns, us(520));
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
    h2(&mut r, DIRECTION_SEND, &settings(), 150);
    let mut request = PREFACE.to_vec();
    request.extend(settings());
    request.extend(get_h2(&mut to_server, 1, "/p", true));
    h2(&mut r, DIRECTION_RECV, &request, 200);
    let mut answer = status_h2(&mut to_client, 1, "503");
    answer.extend(end_data(1, b""));
    h2(&mut r, DIRECTION_SEND, &answer, 300);
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
    let (mut r, mut to_server, mut to_client) = curl_connected();
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
    h2(&mut r, DIRECTION_SEND, &huge, 300);
    // The next request is small, but its block may name what the lost one added to the table.
    h2(
        &mut r,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 3, "/small", true),
        400,
    );
    for stream in [1, 3] {
        let mut answer = status_h2(&mut to_client, stream, "200");
        answer.extend(end_data(stream, b"ok"));
        h2(&mut r, DIRECTION_RECV, &answer, 500);
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
    h2(
        &mut r,
        DIRECTION_SEND,
        &get_h2(&mut to_server, 3, "/new", true),
        300,
    );
    h2(&mut r, DIRECTION_RECV, &end_data(3, b"x"), 400);
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
