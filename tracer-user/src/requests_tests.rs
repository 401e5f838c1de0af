//! Replay tests of the request assembler: synthetic kernel records in, spans out.
//!
//! Times are written in microseconds ([`us`]) and records are built as the probes write them:
//! `len` is what the syscall moved, `captured` what was copied (at most `MAX_CAPTURE`).

use proptest::prelude::*;
use tracer_common::{
    conn::{AF_INET, EventHeader, kind, tcp_state::*},
    data::{DIRECTION_RECV, MAX_CAPTURE},
};

use super::*;

#[path = "requests_http2_tests.rs"]
mod http2_replay;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TP_TRACE: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];
const TP_PARENT: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

/// Socket addresses (kernel `struct sock` pointers).
const SK: u64 = 0xffff_8880_0000_1000;
const SK2: u64 = 0xffff_8880_0000_2000;
const SK3: u64 = 0xffff_8880_0000_3000;

const fn us(n: u64) -> u64 {
    n * 1_000
}

/// A record's three kernel timestamps, in µs: syscall entry, TCP layer (0 = not seen), exit.
#[derive(Clone, Copy)]
struct At(u64, u64, u64);

/// A data record as the probe writes it: `len` = bytes moved, the first min(len, 1024) copied.
fn record(sk: u64, direction: u8, bytes: &[u8], at: At) -> DataEvent {
    let mut data = [0u8; MAX_CAPTURE];
    let captured = bytes.len().min(MAX_CAPTURE);
    data[..captured].copy_from_slice(&bytes[..captured]);
    DataEvent {
        header: EventHeader {
            kind: kind::DATA,
            _pad: [0; 3],
            tgid: 4242,
            ts_ns: us(at.2),
        },
        skaddr: sk,
        enter_ns: us(at.0),
        tcp_ns: us(at.1),
        nic_ns: 0,
        netns_ino: 4_026_532_000,
        len: u32::try_from(bytes.len()).unwrap(),
        captured: u16::try_from(captured).unwrap(),
        direction,
        family: AF_INET as u8,
        sport: 41_000,
        dport: 8080,
        // Tests name a record's first segment by its entry time.
        seq: u32::try_from(at.0).unwrap(),
        _pad: 0,
        saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        comm: *b"client\0\0\0\0\0\0\0\0\0\0",
        data,
    }
}

/// The same record with fewer bytes copied than moved (the kernel's capture limit, a failed
/// read, sendfile).
fn cut(mut event: DataEvent, captured: usize) -> DataEvent {
    event.captured = u16::try_from(captured).unwrap();
    event
}

fn conn_event(sk: u64, old: u8, new: u8, phase_start_us: u64, at_us: u64) -> ConnEvent {
    ConnEvent {
        header: EventHeader {
            kind: kind::CONN,
            _pad: [0; 3],
            tgid: 4242,
            ts_ns: us(at_us),
        },
        skaddr: sk,
        phase_start_ns: us(phase_start_us),
        netns_ino: 4_026_532_000,
        sk_err: 0,
        srtt_us: 0,
        family: AF_INET,
        sport: 41_000,
        dport: 8080,
        oldstate: old,
        newstate: new,
        _pad: [0; 4],
        saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        comm: *b"client\0\0\0\0\0\0\0\0\0\0",
    }
}

/// An assembler and the spans it produced so far.
struct Replay {
    asm: Assembler,
    out: Vec<HopSpan>,
}

impl Replay {
    fn new() -> Self {
        // Layer child spans on, so their boundaries are checked too.
        Self::with(Config {
            layer_spans: true,
            ..Config::default()
        })
    }

    fn with(config: Config) -> Self {
        Self {
            asm: Assembler::new(config),
            out: Vec::new(),
        }
    }

    /// connect() at `start`, SYN-ACK at `established` (µs).
    fn connect(&mut self, sk: u64, start: u64, established: u64) {
        self.asm.on_conn(
            &conn_event(sk, SYN_SENT, ESTABLISHED, start, established),
            &mut self.out,
        );
    }

    /// The server side's handshake completing at `established`, `srtt` µs after the SYN-ACK.
    fn accept(&mut self, sk: u64, established: u64, srtt: u32) {
        let mut event = conn_event(sk, SYN_RECV, ESTABLISHED, 0, established);
        event.srtt_us = srtt;
        self.asm.on_conn(&event, &mut self.out);
    }

    fn reset(&mut self, sk: u64, established: u64, at: u64) {
        let mut event = conn_event(sk, ESTABLISHED, CLOSE, established, at);
        event.sk_err = libc::ECONNRESET;
        self.asm.on_conn(&event, &mut self.out);
    }

    fn send(&mut self, sk: u64, bytes: impl AsRef<[u8]>, at: At) {
        self.data(&record(sk, DIRECTION_SEND, bytes.as_ref(), at));
    }

    fn recv(&mut self, sk: u64, bytes: impl AsRef<[u8]>, at: At) {
        self.data(&record(sk, DIRECTION_RECV, bytes.as_ref(), at));
    }

    fn data(&mut self, event: &DataEvent) {
        self.asm.on_data(event, &mut self.out);
    }

    /// A TLS library call's plaintext (see [`plaintext`]).
    fn tls(&mut self, sk: u64, direction: u8, bytes: &[u8], library_us: u64, at: At) {
        let event = plaintext(sk, direction, bytes, library_us, at);
        self.asm.on_plaintext(&event, &mut self.out);
    }

    /// The TLS library reports the socket's handshake done (`ssl_error` NOT_ASKED, ret 1) or
    /// failed, started at `started_us`, returned at `returned_us`.
    fn library_handshake(
        &mut self,
        sk: u64,
        ret: i32,
        ssl_error: i32,
        started_us: u64,
        returned_us: u64,
    ) {
        use tracer_common::handshake_call::{HandshakeCallEvent, function, outcome};
        let event = HandshakeCallEvent {
            header: EventHeader {
                kind: kind::HANDSHAKE_CALL,
                ts_ns: us(returned_us),
                ..EventHeader::default()
            },
            started_ns: us(started_us),
            skaddr: sk,
            ret,
            ssl_error,
            calls: 1,
            function: function::SSL_CONNECT,
            outcome: if ret == 1 {
                outcome::DONE
            } else {
                outcome::FAILED
            },
            ..HandshakeCallEvent::default()
        };
        self.asm.on_handshake_call(&event, &mut self.out);
    }

    fn sweep(&mut self, now_us: u64) {
        self.asm.sweep(us(now_us), &mut self.out);
    }

    fn take(&mut self) -> Vec<HopSpan> {
        std::mem::take(&mut self.out)
    }

    fn stats(&self) -> &Stats {
        &self.asm.stats
    }
}

fn request(method: &str, path: &str, headers: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: shop.example\r\n{headers}\r\n").into_bytes()
}

fn get(path: &str) -> Vec<u8> {
    request("GET", path, "")
}

fn get_traced(path: &str) -> Vec<u8> {
    request("GET", path, &format!("traceparent: {TP}\r\n"))
}

fn response(status: u16, headers: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status} Whatever\r\n{headers}\r\n{body}").into_bytes()
}

fn ok(body: &str) -> Vec<u8> {
    response(200, &format!("Content-Length: {}\r\n", body.len()), body)
}

/// The request spans (agent or persona hop), in output order.
fn hops(spans: &[HopSpan]) -> Vec<&HopSpan> {
    spans
        .iter()
        .filter(|s| s.attr("http.request.method").is_some())
        .collect()
}

fn only_hop(spans: &[HopSpan]) -> &HopSpan {
    let hops = hops(spans);
    assert_eq!(hops.len(), 1, "{spans:#?}");
    hops[0]
}

fn children<'a>(spans: &'a [HopSpan], parent: &HopSpan) -> Vec<&'a HopSpan> {
    spans
        .iter()
        .filter(|s| {
            s.ids.trace_id == parent.ids.trace_id && s.ids.parent_id == Some(parent.ids.span_id)
        })
        .collect()
}

fn named<'a>(spans: &'a [HopSpan], name: &str) -> Vec<&'a HopSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn path(span: &HopSpan) -> String {
    match span.attr("url.path") {
        Some(Value::Str(p)) => p.to_string(),
        other => panic!("url.path: {other:?}"),
    }
}

fn status(span: &HopSpan) -> i64 {
    match span.attr("http.response.status_code") {
        Some(Value::Int(s)) => *s,
        other => panic!("status: {other:?}"),
    }
}

fn origin(span: &HopSpan) -> Option<&Value> {
    span.attr("hoptrace.trace_origin")
}

fn unanswered_and_unmatched(stats: &Stats) -> (u64, u64) {
    (stats.requests_unanswered, stats.responses_unmatched)
}

// --- Client sockets: keep-alive, pipelining, split heads, bodies ---

#[test]
fn keep_alive_gives_a_span_per_request_and_the_connect_only_to_the_first() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_500);
    assert!(r.out.is_empty(), "the connect waits for the first request");
    r.send(SK, get_traced("/a"), At(2_000, 2_010, 2_020));
    r.recv(SK, ok("ok"), At(2_030, 2_900, 3_000));
    r.send(SK, get("/b"), At(4_000, 4_010, 4_020));
    r.recv(SK, ok("fine"), At(4_030, 4_900, 5_000));
    let mut post = request("POST", "/c", "Content-Length: 5\r\n");
    post.extend_from_slice(b"hello");
    r.send(SK, post, At(6_000, 6_010, 6_020));
    r.recv(
        SK,
        response(201, "Content-Length: 0\r\n", ""),
        At(6_030, 6_900, 7_000),
    );
    let spans = r.take();

    let hops = hops(&spans);
    assert_eq!(hops.len(), 3, "{spans:#?}");
    assert_eq!(spans.len(), 4, "three requests and the connect");
    let names: Vec<_> = hops
        .iter()
        .map(|s| (s.name.as_ref(), path(s), status(s)))
        .collect();
    assert_eq!(
        names,
        [
            ("GET", "/a".to_string(), 200),
            ("GET", "/b".to_string(), 200),
            ("POST", "/c".to_string(), 201)
        ]
    );
    for hop in &hops {
        assert_eq!(hop.role, Role::Client);
        assert_eq!(hop.attr("hoptrace.hop"), Some(&Value::from(HOP_AGENT)));
    }
    // The first request starts at the connect, which is its child; the others start when the
    // application handed the request to the kernel.
    assert_eq!((hops[0].start_ns, hops[0].end_ns), (us(1_000), us(3_000)));
    assert_eq!((hops[1].start_ns, hops[1].end_ns), (us(4_000), us(5_000)));
    assert_eq!((hops[2].start_ns, hops[2].end_ns), (us(6_000), us(7_000)));
    let connect = children(&spans, hops[0]);
    assert_eq!(connect.len(), 1);
    assert_eq!(connect[0].name, conn_spans::CONNECT);
    assert_eq!(
        (connect[0].start_ns, connect[0].end_ns),
        (us(1_000), us(1_500))
    );
    assert!(children(&spans, hops[1]).is_empty() && children(&spans, hops[2]).is_empty());
    assert_eq!(named(&spans, conn_spans::CONNECT).len(), 1);
    let first: Vec<_> = hops
        .iter()
        .map(|s| s.attr("hoptrace.connection.first_request"))
        .collect();
    assert_eq!(
        first,
        [
            Some(&Value::Bool(true)),
            Some(&Value::Bool(false)),
            Some(&Value::Bool(false))
        ]
    );
    // Events: the layers' instants, in the span.
    assert_eq!(
        hops[1].events,
        [
            ("request.to_kernel", us(4_000)),
            ("request.tcp_queued", us(4_010)),
            ("response.at_tcp", us(4_900)),
            ("response.to_app", us(5_000)),
        ]
    );
    assert_eq!((r.stats().requests, r.stats().spans), (3, 3));
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
    // Nothing is left held: a later sweep exports nothing more.
    r.sweep(10_000_000);
    assert!(r.out.is_empty(), "{:#?}", r.out);
}

#[test]
fn pipelined_requests_in_one_record_keep_their_order() {
    // Responses all in one record.
    let mut r = Replay::new();
    let mut requests = get("/1");
    requests.extend(request("POST", "/2", "Content-Length: 3\r\n"));
    requests.extend(b"abc");
    requests.extend(get("/3"));
    r.send(SK, &requests, At(1_000, 1_001, 1_002));
    let mut responses = response(201, "Content-Length: 2\r\n", "r1");
    responses.extend(response(202, "Content-Length: 0\r\n", ""));
    responses.extend(response(203, "Content-Length: 4\r\n", "r3r3"));
    r.recv(SK, &responses, At(1_010, 1_900, 2_000));
    let spans = r.take();
    let got: Vec<_> = hops(&spans)
        .iter()
        .map(|s| (path(s), status(s), s.start_ns, s.end_ns))
        .collect();
    assert_eq!(
        got,
        [
            ("/1".to_string(), 201, us(1_000), us(2_000)),
            ("/2".to_string(), 202, us(1_000), us(2_000)),
            ("/3".to_string(), 203, us(1_000), us(2_000)),
        ]
    );

    // Responses one per record: each request ends with its own.
    let mut r = Replay::new();
    r.send(SK, &requests, At(1_000, 1_001, 1_002));
    r.recv(
        SK,
        response(201, "Content-Length: 2\r\n", "r1"),
        At(1_010, 1_900, 2_000),
    );
    r.recv(
        SK,
        response(202, "Content-Length: 0\r\n", ""),
        At(2_010, 2_900, 3_000),
    );
    r.recv(
        SK,
        response(203, "Content-Length: 4\r\n", "r3r3"),
        At(3_010, 3_900, 4_000),
    );
    let spans = r.take();
    let got: Vec<_> = hops(&spans)
        .iter()
        .map(|s| (path(s), status(s), s.end_ns))
        .collect();
    assert_eq!(
        got,
        [
            ("/1".to_string(), 201, us(2_000)),
            ("/2".to_string(), 202, us(3_000)),
            ("/3".to_string(), 203, us(4_000))
        ]
    );
    assert_eq!((r.stats().requests, r.stats().spans), (3, 3));
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
}

#[test]
fn a_head_split_over_three_records_is_joined_and_starts_at_its_first_piece() {
    let mut r = Replay::new();
    let head = format!(
        "GET /split?q=1 HTTP/1.1\r\nHost: a\r\n|User-Agent: test\r\nAccept: */*\r\n|traceparent: {TP}\r\n\r\n"
    );
    let pieces: Vec<&str> = head.split('|').collect();
    r.send(SK, pieces[0], At(1_000, 1_001, 1_002));
    r.send(SK, pieces[1], At(1_100, 1_101, 1_102));
    r.send(SK, pieces[2], At(1_200, 1_201, 1_202));
    assert!(r.out.is_empty());
    r.recv(SK, ok(""), At(1_300, 1_900, 2_000));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(path(hop), "/split");
    assert_eq!((hop.start_ns, hop.end_ns), (us(1_000), us(2_000)));
    assert_eq!(hop.ids.trace_id, TP_TRACE);
    assert_eq!(hop.ids.parent_id, Some(TP_PARENT));
    assert_eq!(origin(hop), Some(&Value::from("traceparent")));
}

#[test]
fn a_head_split_inside_its_blank_line_ends_where_it_should() {
    let head = get_traced("/x");
    assert!(head.ends_with(b"\r\n\r\n"));
    for split in 1..=3 {
        let at = head.len() - split;
        let mut r = Replay::new();
        r.send(SK, &head[..at], At(1_000, 1_001, 1_002));
        // The rest of the blank line, then a second (pipelined) request in the same record.
        let mut rest = head[at..].to_vec();
        rest.extend(get("/y"));
        r.send(SK, rest, At(1_100, 1_101, 1_102));
        let mut responses = ok("1");
        responses.extend(ok("22"));
        r.recv(SK, responses, At(1_200, 1_900, 2_000));
        let spans = r.take();
        let got: Vec<_> = hops(&spans).iter().map(|s| (path(s), s.start_ns)).collect();
        assert_eq!(
            got,
            [("/x".to_string(), us(1_000)), ("/y".to_string(), us(1_100))],
            "split {split}"
        );
        assert_eq!(hops(&spans)[0].ids.trace_id, TP_TRACE);
        assert_eq!(
            r.stats().heads_malformed + r.stats().non_http_records,
            0,
            "split {split}"
        );
    }
}

#[test]
fn content_length_bodies_are_skipped_even_when_they_look_like_responses() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.send(SK, get("/big"), At(1_200, 1_201, 1_202));
    // A 3000-byte body over four records; two records *start* with what looks like a response.
    let fake = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let mut body = vec![b'x'; 3_000];
    body[500..500 + fake.len()].copy_from_slice(fake);
    body[1_524..1_524 + fake.len()].copy_from_slice(fake);
    let mut first = response(200, "Content-Length: 3000\r\n", "");
    first.extend_from_slice(&body[..500]);
    r.recv(SK, first, At(1_300, 1_900, 2_000));
    r.recv(SK, &body[500..1_524], At(2_100, 2_101, 2_102));
    // Larger than the capture: only its first 1024 bytes are seen, all of it is body.
    r.recv(SK, &body[1_524..2_900], At(2_200, 2_201, 2_202));
    // Moved but not copied at all.
    r.data(&cut(
        record(SK, DIRECTION_RECV, &body[2_900..], At(2_300, 2_301, 2_302)),
        0,
    ));
    r.send(SK, get("/next"), At(3_000, 3_001, 3_002));
    r.recv(SK, response(204, "", ""), At(3_100, 3_900, 4_000));
    let spans = r.take();
    let got: Vec<_> = hops(&spans)
        .iter()
        .map(|s| (path(s), status(s), s.end_ns))
        .collect();
    // The span ends when the body's last byte reached the application (the uncaptured record).
    assert_eq!(
        got,
        [
            ("/big".to_string(), 200, us(2_302)),
            ("/next".to_string(), 204, us(4_000))
        ]
    );
    assert!(
        hops(&spans)[0]
            .events
            .iter()
            .any(|(name, ns)| *name == "response.complete" && *ns == us(2_302))
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
    assert_eq!(r.stats().non_http_records + r.stats().heads_malformed, 0);
}

#[test]
fn a_response_cut_off_by_a_reset_ends_at_its_first_byte_and_says_so() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.send(SK, get("/big"), At(1_200, 1_201, 1_202));
    let mut first = response(200, "Content-Length: 3000\r\n", "");
    first.extend_from_slice(&[b'x'; 100]);
    r.recv(SK, first, At(1_300, 1_900, 2_000));
    r.reset(SK, 1_100, 2_500);
    let spans = r.take();
    let hop = hops(&spans)[0];
    assert_eq!(hop.end_ns, us(2_000));
    assert!(
        hop.attributes
            .iter()
            .any(|(k, v)| *k == "hoptrace.uncertain"
                && matches!(v, Value::Str(text) if text.contains("body's end")))
    );
}

#[test]
fn a_chunked_response_then_another_on_the_same_connection() {
    let chunked = "Transfer-Encoding: chunked\r\n";
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.send(SK, get("/c1"), At(1_200, 1_201, 1_202));
    r.recv(
        SK,
        response(200, chunked, "5\r\nhello\r\n"),
        At(1_300, 1_900, 2_000),
    );
    r.recv(SK, "6\r\n world\r\n0\r\n\r\n", At(2_100, 2_101, 2_102));
    r.send(SK, get("/c2"), At(3_000, 3_001, 3_002));
    r.recv(
        SK,
        response(200, chunked, "2\r\nok\r\n0\r\n\r\n"),
        At(3_100, 3_900, 4_000),
    );
    r.send(SK, get("/c3"), At(5_000, 5_001, 5_002));
    r.recv(SK, ok("done"), At(5_100, 5_900, 6_000));
    let spans = r.take();
    let got: Vec<_> = hops(&spans).iter().map(|s| (path(s), s.end_ns)).collect();
    assert_eq!(
        got,
        // /c1's last chunk came in the second record.
        [
            ("/c1".to_string(), us(2_102)),
            ("/c2".to_string(), us(4_000)),
            ("/c3".to_string(), us(6_000))
        ]
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
}

#[test]
fn pipelined_chunked_responses_in_one_record_are_each_matched() {
    let chunked = "Transfer-Encoding: chunked\r\n";
    let mut r = Replay::new();
    let mut requests = get("/p1");
    requests.extend(get("/p2"));
    requests.extend(get("/p3"));
    r.send(SK, requests, At(1_000, 1_001, 1_002));
    // Chunk data that looks like a response, a chunk extension, a trailer field.
    let fake = "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n";
    let mut responses = response(
        201,
        chunked,
        &format!("{:x}\r\n{fake}\r\n0\r\n\r\n", fake.len()),
    );
    responses.extend(response(
        202,
        chunked,
        "3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n",
    ));
    responses.extend(ok("3"));
    r.recv(SK, responses, At(1_100, 1_900, 2_000));
    let spans = r.take();
    let got: Vec<_> = hops(&spans).iter().map(|s| (path(s), status(s))).collect();
    assert_eq!(
        got,
        [
            ("/p1".to_string(), 201),
            ("/p2".to_string(), 202),
            ("/p3".to_string(), 200)
        ]
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
}

#[test]
fn chunked_framing_is_followed_across_records_and_given_up_when_not_captured() {
    let chunked = "Transfer-Encoding: chunked\r\n";
    let mut r = Replay::new();
    r.send(SK, get("/c1"), At(1_000, 1_001, 1_002));
    // The size line split across records, a record that starts inside chunk data with what
    // looks like a response, and a trailer field.
    r.recv(SK, response(200, chunked, "1"), At(1_100, 1_900, 2_000));
    r.recv(SK, "a;name=value\r\n", At(2_100, 2_101, 2_102));
    r.recv(
        SK,
        "HTTP/1.1 404 \r\n\r\n\r\n\r\n0\r\n",
        At(2_200, 2_201, 2_202),
    );
    r.recv(SK, "Trailer: x\r\n\r\n", At(2_300, 2_301, 2_302));
    r.send(SK, get("/c2"), At(3_000, 3_001, 3_002));
    // A chunk larger than the capture: its framing after the capture is lost, so the stream
    // waits for the next head.
    let mut big = response(200, chunked, &format!("{:x}\r\n", 3_000));
    big.extend(vec![b'z'; 3_000]);
    big.extend(b"\r\n0\r\n\r\n");
    r.recv(SK, big, At(3_100, 3_900, 4_000));
    r.send(SK, get("/c3"), At(5_000, 5_001, 5_002));
    // Many small chunks in one record, then the next response in the same record.
    let mut many = response(200, chunked, &"1\r\nx\r\n".repeat(150));
    many.extend(b"0\r\n\r\n");
    r.recv(SK, many, At(5_100, 5_900, 6_000));
    r.send(SK, get("/c4"), At(7_000, 7_001, 7_002));
    r.recv(SK, ok("4"), At(7_100, 7_900, 8_000));
    let spans = r.take();
    let got: Vec<_> = hops(&spans)
        .iter()
        .map(|s| (path(s), status(s), s.end_ns))
        .collect();
    assert_eq!(
        got,
        [
            ("/c1".to_string(), 200, us(2_000)),
            ("/c2".to_string(), 200, us(4_000)),
            ("/c3".to_string(), 200, us(6_000)),
            ("/c4".to_string(), 200, us(8_000)),
        ]
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
    assert_eq!(r.stats().non_http_records + r.stats().heads_malformed, 0);
}

#[test]
fn a_chunked_request_body_then_a_pipelined_request_on_a_server() {
    let mut r = Replay::new();
    r.accept(SK, 900, 0);
    let mut requests = request("POST", "/upload", "Transfer-Encoding: chunked\r\n");
    requests.extend(b"4\r\nGET \r\n0\r\n\r\n");
    requests.extend(get_traced("/then"));
    r.recv(SK, requests, At(950, 1_000, 1_020));
    r.send(SK, ok("a"), At(1_500, 1_510, 1_520));
    r.send(SK, ok("b"), At(1_600, 1_610, 1_620));
    let spans = r.take();
    let got: Vec<_> = hops(&spans)
        .iter()
        .map(|s| (s.name.to_string(), path(s), s.end_ns))
        .collect();
    assert_eq!(
        got,
        [
            ("POST".to_string(), "/upload".to_string(), us(1_510)),
            ("GET".to_string(), "/then".to_string(), us(1_610))
        ]
    );
    assert_eq!(hops(&spans)[1].ids.trace_id, TP_TRACE);
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
}

#[test]
fn a_malformed_response_still_answers_its_request() {
    let mut r = Replay::new();
    let mut requests = get("/1");
    requests.extend(get("/2"));
    r.send(SK, requests, At(1_000, 1_001, 1_002));
    r.recv(
        SK,
        "HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n",
        At(1_100, 1_900, 2_000),
    );
    r.recv(
        SK,
        response(202, "Content-Length: 0\r\n", ""),
        At(2_100, 2_900, 3_000),
    );
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(
        (path(hop), status(hop)),
        ("/2".to_string(), 202),
        "not matched to /1"
    );
    assert_eq!(r.stats().heads_malformed, 1);
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
}

#[test]
fn a_response_without_length_runs_until_close() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.send(SK, get("/stream"), At(1_200, 1_201, 1_202));
    r.recv(
        SK,
        response(200, "Connection: close\r\n", "first bytes"),
        At(1_300, 1_900, 2_000),
    );
    r.recv(SK, [0u8, 1, 2, 0xff, 0x16, 3, 1], At(2_100, 2_101, 2_102));
    r.recv(SK, "more body", At(2_200, 2_201, 2_202));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!((status(hop), hop.end_ns), (200, us(2_000)));
    let stats = r.stats();
    assert_eq!(
        (
            stats.non_http_records,
            stats.heads_malformed,
            stats.responses_unmatched
        ),
        (0, 0, 0)
    );
}

#[test]
fn a_100_continue_is_not_the_response() {
    let expect = "Expect: 100-continue\r\nContent-Length: 5\r\n";
    // Interim and final response in separate records, the body sent in between.
    let mut r = Replay::new();
    r.send(
        SK,
        request("POST", "/upload", expect),
        At(1_000, 1_001, 1_002),
    );
    r.recv(SK, "HTTP/1.1 100 Continue\r\n\r\n", At(1_010, 1_500, 1_510));
    assert!(r.out.is_empty());
    r.send(SK, "hello", At(1_600, 1_601, 1_602));
    r.recv(
        SK,
        response(201, "Content-Length: 0\r\n", ""),
        At(1_700, 2_900, 3_000),
    );
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(
        (status(hop), hop.start_ns, hop.end_ns),
        (201, us(1_000), us(3_000))
    );

    // Both in one record, then a second request on the connection.
    let mut r = Replay::new();
    r.send(
        SK,
        request("POST", "/upload", expect),
        At(1_000, 1_001, 1_002),
    );
    r.send(SK, "hello", At(1_600, 1_601, 1_602));
    let mut both = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
    both.extend(response(200, "Content-Length: 2\r\n", "ok"));
    r.recv(SK, both, At(1_700, 2_900, 3_000));
    r.send(SK, get("/after"), At(4_000, 4_001, 4_002));
    r.recv(SK, ok(""), At(4_100, 4_900, 5_000));
    let spans = r.take();
    let got: Vec<_> = hops(&spans).iter().map(|s| (path(s), status(s))).collect();
    assert_eq!(
        got,
        [("/upload".to_string(), 200), ("/after".to_string(), 200)]
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
}

#[test]
fn a_head_request_response_has_no_body_whatever_its_content_length() {
    // RFC 9112 §6.3 item 1: a response to HEAD ends at its head; its Content-Length describes
    // the GET response it stands for.
    let mut r = Replay::new();
    r.send(SK, request("HEAD", "/h", ""), At(1_000, 1_001, 1_002));
    r.recv(
        SK,
        response(200, "Content-Length: 1234\r\n", ""),
        At(1_100, 1_900, 2_000),
    );
    r.send(SK, get("/g"), At(3_000, 3_001, 3_002));
    r.recv(SK, ok("ok"), At(3_100, 3_900, 4_000));
    // Pipelined: HEAD then GET, both responses in one record.
    let mut requests = request("HEAD", "/h2", "");
    requests.extend(get("/g2"));
    r.send(SK, requests, At(5_000, 5_001, 5_002));
    let mut responses = response(200, "Content-Length: 99\r\n", "");
    responses.extend(ok("ok"));
    r.recv(SK, responses, At(5_100, 5_900, 6_000));
    let spans = r.take();
    let got: Vec<_> = hops(&spans)
        .iter()
        .map(|s| (s.name.to_string(), path(s), s.end_ns))
        .collect();
    assert_eq!(
        got,
        [
            ("HEAD".to_string(), "/h".to_string(), us(2_000)),
            ("GET".to_string(), "/g".to_string(), us(4_000)),
            ("HEAD".to_string(), "/h2".to_string(), us(6_000)),
            ("GET".to_string(), "/g2".to_string(), us(6_000)),
        ]
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
}

#[test]
fn a_malformed_head_is_counted_and_the_next_request_still_parsed() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    // Whitespace before the colon: RFC 9112 §5.1 says reject.
    r.send(
        SK,
        "GET /bad HTTP/1.1\r\nHost : a\r\n\r\n",
        At(1_200, 1_201, 1_202),
    );
    assert_eq!(
        r.stats().heads_malformed,
        1,
        "counted when seen, not once 16 KiB have piled up"
    );
    r.recv(SK, ok(""), At(1_300, 1_900, 2_000));
    r.send(SK, get("/good"), At(3_000, 3_001, 3_002));
    r.recv(SK, ok(""), At(3_100, 3_900, 4_000));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!((path(hop), hop.end_ns), ("/good".to_string(), us(4_000)));
    assert_eq!(r.stats().requests, 1);
}

// --- Server sockets ---

#[test]
fn a_server_socket_gives_a_persona_span_with_its_three_phases() {
    let mut r = Replay::new();
    r.accept(SK, 900, 100);
    assert!(r.out.is_empty(), "the accept waits for the first request");
    // The request reached TCP at 1000 µs; the application asked at 950 and got it at 1020.
    r.recv(SK, get_traced("/api"), At(950, 1_000, 1_020));
    // The application answered at 1500; TCP had queued it at 1510.
    r.send(SK, ok("done"), At(1_500, 1_510, 1_520));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(hop.role, Role::Server);
    assert_eq!(hop.attr("hoptrace.hop"), Some(&Value::from(HOP_PERSONA)));
    assert_eq!((hop.start_ns, hop.end_ns), (us(1_000), us(1_510)));
    assert_eq!(
        (hop.ids.trace_id, hop.ids.parent_id),
        (TP_TRACE, Some(TP_PARENT))
    );
    assert_eq!(
        hop.attr("server.port"),
        Some(&Value::Int(41_000)),
        "the local port, on a server"
    );
    let phases: Vec<_> = children(&spans, hop)
        .iter()
        .map(|c| (c.name.as_ref(), c.start_ns, c.duration_ns()))
        .collect();
    assert_eq!(
        phases,
        [
            ("kernel receive", us(1_000), us(20)),
            ("application", us(1_020), us(480)),
            ("kernel send", us(1_500), us(10)),
        ]
    );
    assert_eq!(
        hop.attr("hoptrace.kernel_receive_ns"),
        Some(&Value::Int(20_000))
    );
    assert_eq!(
        hop.attr("hoptrace.application_ns"),
        Some(&Value::Int(480_000))
    );
    assert_eq!(
        hop.attr("hoptrace.kernel_send_ns"),
        Some(&Value::Int(10_000))
    );
    // The accept (SYN at 800 µs) is a sibling under the caller's span, not a child.
    let accept = named(&spans, conn_spans::ACCEPT);
    assert_eq!(accept.len(), 1);
    assert_eq!(
        (accept[0].ids.trace_id, accept[0].ids.parent_id),
        (TP_TRACE, Some(TP_PARENT))
    );
    assert_eq!((accept[0].start_ns, accept[0].end_ns), (us(800), us(900)));
    assert_eq!(spans.len(), 5);

    // A second request on the connection: no accept, and without the TCP layer the start is
    // the application's read, flagged.
    r.recv(SK, get("/two"), At(2_000, 0, 2_020));
    r.send(SK, ok(""), At(2_100, 0, 2_120));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!((hop.start_ns, hop.end_ns), (us(2_020), us(2_120)));
    assert!(hop.attr("hoptrace.uncertain").is_some());
    let phases: Vec<_> = children(&spans, hop)
        .iter()
        .map(|c| c.name.as_ref())
        .collect();
    assert_eq!(phases, ["application"]);
    assert!(named(&spans, conn_spans::ACCEPT).is_empty());
}

#[test]
fn a_server_socket_older_than_the_agent_is_recognised_by_its_first_bytes() {
    let mut r = Replay::new();
    r.recv(SK, get("/old"), At(1_000, 990, 1_010));
    r.send(
        SK,
        response(503, "Content-Length: 0\r\n", ""),
        At(1_100, 1_105, 1_110),
    );
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!((hop.role, status(hop)), (Role::Server, 503));
    assert_eq!(hop.error.as_deref(), Some("HTTP 503"));
    assert_eq!((hop.start_ns, hop.end_ns), (us(990), us(1_105)));
}

// --- Trace context and sampling ---

#[test]
fn a_valid_traceparent_makes_the_span_a_child_of_the_caller() {
    let mut r = Replay::new();
    let headers = format!("traceparent: {TP}\r\ntracestate: rojo=00f067aa0ba902b7\r\n");
    r.send(SK, request("GET", "/t", &headers), At(1_000, 1_001, 1_002));
    r.recv(SK, ok(""), At(1_100, 1_900, 2_000));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(hop.ids.trace_id, TP_TRACE);
    assert_eq!(
        hop.ids.parent_id,
        Some(TP_PARENT),
        "the parent is remote: the caller's span"
    );
    assert_ne!(hop.ids.span_id, TP_PARENT);
    assert_eq!(
        hop.ids.trace_state.as_deref(),
        Some("rojo=00f067aa0ba902b7")
    );
    assert_eq!(origin(hop), Some(&Value::from("traceparent")));
    assert!(r.stats().traceparent_invalid.is_empty());
}

#[test]
fn invalid_traceparents_are_counted_by_reason_and_never_exported() {
    let uppercase = TP.to_ascii_uppercase();
    let cases: [(String, &str); 6] = [
        (format!("traceparent: {uppercase}\r\n"), "uppercase_hex"),
        (format!("traceparent: {}\r\n", &TP[..54]), "length"),
        (format!("traceparent: {TP}0\r\n"), "length"),
        (
            "traceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01\r\n".to_string(),
            "zero_trace_id",
        ),
        (
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01\r\n".to_string(),
            "zero_parent_id",
        ),
        (
            format!("traceparent: {TP}\r\ntraceparent: {TP}\r\n"),
            "duplicate",
        ),
    ];
    for (headers, reason) in cases {
        let mut r = Replay::new();
        r.send(SK, request("GET", "/t", &headers), At(1_000, 1_001, 1_002));
        r.recv(SK, ok(""), At(1_100, 1_900, 2_000));
        let spans = r.take();
        let hop = only_hop(&spans);
        assert_ne!(hop.ids.trace_id, TP_TRACE, "{reason}");
        assert_ne!(hop.ids.trace_id, [0; 16], "{reason}");
        assert_eq!(hop.ids.parent_id, None, "{reason}: a new trace");
        assert_eq!(
            origin(hop),
            Some(&Value::from("hoptrace (invalid traceparent ignored)")),
            "{reason}"
        );
        assert_eq!(
            r.stats().traceparent_invalid,
            BTreeMap::from([(reason, 1)]),
            "{reason}"
        );
    }
}

#[test]
fn an_unsampled_caller_gives_no_span() {
    let mut r = Replay::new();
    let unsampled = TP.replace("-01", "-00");
    r.send(
        SK,
        request("GET", "/t", &format!("traceparent: {unsampled}\r\n")),
        At(1_000, 1_001, 1_002),
    );
    r.recv(SK, ok(""), At(1_100, 1_900, 2_000));
    assert!(r.out.is_empty(), "{:#?}", r.out);
    let stats = r.stats();
    assert_eq!((stats.requests, stats.not_sampled, stats.spans), (1, 1, 0));
    assert_eq!(
        unanswered_and_unmatched(stats),
        (0, 0),
        "answered, just not exported"
    );
}

#[test]
fn untraced_requests_are_ignored_or_start_a_trace_as_configured() {
    let mut r = Replay::with(Config {
        untraced: Untraced::Ignore,
        ..Config::default()
    });
    r.send(SK, get("/u"), At(1_000, 1_001, 1_002));
    r.recv(SK, ok(""), At(1_100, 1_900, 2_000));
    assert!(r.out.is_empty());
    assert_eq!(
        (
            r.stats().untraced_ignored,
            r.stats().not_sampled,
            r.stats().spans
        ),
        (1, 0, 0)
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
    // A traced request on the same connection is still exported.
    r.send(SK, get_traced("/t"), At(3_000, 3_001, 3_002));
    r.recv(SK, ok(""), At(3_100, 3_900, 4_000));
    assert_eq!(only_hop(&r.take()).ids.trace_id, TP_TRACE);

    let mut r = Replay::with(Config {
        untraced: Untraced::NewTrace,
        ..Config::default()
    });
    r.send(SK, get("/u"), At(1_000, 1_001, 1_002));
    r.recv(SK, ok(""), At(1_100, 1_900, 2_000));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(hop.ids.parent_id, None);
    assert_eq!(origin(hop), Some(&Value::from("hoptrace")));
    assert_eq!((r.stats().untraced_ignored, r.stats().spans), (0, 1));
}

// --- Capture limits and memory bounds ---

#[test]
fn a_head_larger_than_the_capture_never_yields_an_invented_traceparent() {
    // The traceparent lies wholly past the capture, or is cut by it.
    for pad in [1_100, MAX_CAPTURE - 80] {
        let headers = format!("X-Pad: {}\r\ntraceparent: {TP}\r\n", "p".repeat(pad));
        let head = request("GET", "/long", &headers);
        assert!(head.len() > MAX_CAPTURE);
        let mut r = Replay::new();
        r.send(SK, &head, At(1_000, 1_001, 1_002));
        r.recv(SK, ok(""), At(1_100, 1_900, 2_000));
        let spans = r.take();
        let hop = only_hop(&spans);
        assert_ne!(hop.ids.trace_id, TP_TRACE, "pad {pad}");
        assert_eq!(hop.ids.parent_id, None, "pad {pad}");
        assert_eq!(
            origin(hop),
            Some(&Value::from(
                "hoptrace (head truncated before any traceparent)"
            ))
        );
        assert!(hop.attr("hoptrace.uncertain").is_some());
        assert_eq!(r.stats().heads_truncated, 1, "pad {pad}");
        assert!(
            r.stats().traceparent_invalid.is_empty(),
            "pad {pad}: a cut value is not parsed"
        );
        // The connection goes on: the next request is whole.
        r.send(SK, get_traced("/next"), At(3_000, 3_001, 3_002));
        r.recv(SK, ok(""), At(3_100, 3_900, 4_000));
        assert_eq!(only_hop(&r.take()).ids.trace_id, TP_TRACE, "pad {pad}");
        assert_eq!(unanswered_and_unmatched(r.stats()), (0, 0));
    }
}

#[test]
fn a_64_kib_header_over_many_records_stays_bounded() {
    let headers = format!("X-Big: {}\r\ntraceparent: {TP}\r\n", "b".repeat(64 * 1024));
    let head = request("GET", "/huge", &headers);
    let mut r = Replay::new();
    for (i, piece) in head.chunks(MAX_CAPTURE).enumerate() {
        let t = 1_000 + 10 * i as u64;
        r.send(SK, piece, At(t, t + 1, t + 2));
        let socket = &r.asm.sockets[&SK];
        assert!(
            socket.outgoing.head.len() <= MAX_HEAD,
            "piece {i}: {}",
            socket.outgoing.head.len()
        );
    }
    r.recv(SK, ok(""), At(5_000, 5_900, 6_000));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(hop.start_ns, us(1_000));
    assert_ne!(hop.ids.trace_id, TP_TRACE);
    let stats = r.stats();
    assert_eq!(
        (stats.requests, stats.heads_truncated, stats.heads_malformed),
        (1, 1, 0)
    );
    r.send(SK, get("/next"), At(7_000, 7_001, 7_002));
    r.recv(SK, ok(""), At(7_100, 7_900, 8_000));
    assert_eq!(path(only_hop(&r.take())), "/next");
}

#[test]
fn binary_data_is_counted_not_traced() {
    let tls_client_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut r = Replay::new();
    r.send(SK, tls_client_hello, At(1_000, 1_001, 1_002));
    r.recv(
        SK,
        [0x16, 0x03, 0x03, 0x00, 0x7a, 0x02],
        At(1_100, 1_101, 1_102),
    );
    assert!(r.out.is_empty());
    // TLS is the handshake tracker's, not HTTP garbage.
    assert_eq!((r.stats().non_http_records, r.stats().requests), (0, 0));
    assert_eq!(r.stats().tls.handshakes, 1);
    // HTTP/2 is requests_http2's: a frame no peer would send (DATA on stream 0) is not
    // decoded, and says so, never as HTTP/1.x garbage.
    r.send(SK2, h2_preface, At(1_000, 1_001, 1_002));
    r.recv(SK2, [0u8; 9], At(1_100, 1_101, 1_102));
    let marker = named(&r.out, "HTTP/2 not decoded");
    assert_eq!(marker.len(), 1, "{:#?}", r.out);
    assert_eq!(
        marker[0].attr("hoptrace.http2.not_decoded"),
        Some(&Value::from("implausible frame header"))
    );
    assert_eq!((r.stats().non_http_records, r.stats().requests), (0, 0));

    // On a connection known to be a client's: counted once, then skipped until a head starts.
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    // An HTTP/2 SETTINGS frame header, which only a server starts with (TLS would go to the
    // handshake tracker).
    r.send(
        SK,
        [0u8, 0, 0x12, 4, 0, 0, 0, 0, 0],
        At(1_200, 1_201, 1_202),
    );
    r.send(SK, [0xffu8; 300], At(1_300, 1_301, 1_302));
    r.recv(
        SK,
        [0x17u8, 3, 3, 0, 5, 1, 2, 3, 4, 5],
        At(1_400, 1_401, 1_402),
    );
    assert!(r.out.is_empty());
    assert_eq!(r.stats().requests, 0);
    assert_eq!(r.stats().non_http_records, 2, "one per direction");
}

// --- Unmatched, aborted, swept ---

#[test]
fn a_response_without_a_request_is_counted() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.recv(SK, ok("surprise"), At(1_200, 1_900, 2_000));
    assert!(hops(&r.out).is_empty());
    assert_eq!(unanswered_and_unmatched(r.stats()), (0, 1));
}

#[test]
fn a_reset_mid_response_counts_the_request_and_exports_the_abort() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.send(SK, get_traced("/r"), At(1_200, 1_201, 1_202));
    r.recv(SK, "HTTP/1.1 200 OK\r\nContent-Ty", At(1_300, 1_900, 2_000));
    r.reset(SK, 1_100, 2_500);
    let spans = r.take();
    assert!(hops(&spans).is_empty(), "{spans:#?}");
    let abort = named(&spans, conn_spans::ABORT);
    assert_eq!(abort.len(), 1);
    assert!(abort[0].error.as_deref().unwrap().contains("reset"));
    assert_eq!(
        abort[0].attr("error.type"),
        Some(&Value::from("ECONNRESET"))
    );
    // The connect it held goes out alone rather than being lost.
    assert_eq!(named(&spans, conn_spans::CONNECT).len(), 1);
    assert_eq!(spans.len(), 2);
    assert_eq!(unanswered_and_unmatched(r.stats()), (1, 0));
    assert!(r.asm.sockets.is_empty());
}

#[test]
fn a_held_connect_goes_out_alone_after_the_hold() {
    let hold_us = Config::default().connect_hold_ns / 1_000;
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_500);
    r.sweep(1_500 + hold_us);
    assert!(r.out.is_empty(), "not before the hold has passed");
    r.sweep(1_500 + hold_us + 1);
    let spans = r.take();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].name, conn_spans::CONNECT);
    assert_eq!(spans[0].ids.parent_id, None);
    r.sweep(1_500 + 2 * hold_us + 2);
    assert!(r.out.is_empty(), "exported once");
    // A late first request no longer includes it.
    let t = 1_500 + 2 * hold_us + 10;
    r.send(SK, get("/late"), At(t, t + 1, t + 2));
    r.recv(SK, ok(""), At(t + 10, t + 19, t + 20));
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(hop.start_ns, us(t));
    assert_eq!(
        hop.attr("hoptrace.connection.first_request"),
        Some(&Value::Bool(true))
    );
}

#[test]
fn idle_sockets_are_forgotten_with_their_unanswered_requests() {
    let idle_us = Config::default().idle_ns / 1_000;
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.send(SK, get("/slow"), At(1_200, 1_201, 1_202));
    r.send(SK, get("/slower"), At(1_300, 1_301, 1_302));
    r.recv(SK2, get("/server-side"), At(1_400, 1_390, 1_402));
    // The hold has passed, not the idle time: the connect goes out, the sockets stay.
    r.sweep(1_302 + idle_us);
    assert_eq!(named(&r.take(), conn_spans::CONNECT).len(), 1);
    assert_eq!(r.asm.sockets.len(), 2);
    r.sweep(1_402 + idle_us + 1);
    assert!(r.out.is_empty());
    assert!(r.asm.sockets.is_empty());
    assert_eq!(unanswered_and_unmatched(r.stats()), (3, 0));
    // A response after that has nothing to answer.
    r.recv(SK, ok(""), At(2_000_000_000, 2_000_000_001, 2_000_000_002));
    assert_eq!(unanswered_and_unmatched(r.stats()), (3, 1));
}

#[test]
fn sockets_beyond_capacity_are_counted_and_their_connects_not_held() {
    let mut r = Replay::with(Config {
        max_sockets: 2,
        ..Config::default()
    });
    r.connect(SK, 1_000, 1_100);
    r.connect(SK2, 1_000, 1_100);
    assert!(r.out.is_empty());
    r.connect(SK3, 1_000, 1_100);
    assert_eq!(
        named(&r.take(), conn_spans::CONNECT).len(),
        1,
        "exported at once, not held"
    );
    r.send(SK3, get("/x"), At(1_200, 1_201, 1_202));
    r.recv(SK3, ok(""), At(1_300, 1_301, 1_302));
    assert!(r.out.is_empty());
    assert_eq!(r.stats().sockets_over_capacity, 3);
    assert_eq!(r.asm.sockets.len(), 2);
    // A known socket still works at capacity.
    r.send(SK, get("/y"), At(1_200, 1_201, 1_202));
    r.recv(SK, ok(""), At(1_300, 1_301, 1_302));
    assert_eq!(path(only_hop(&r.take())), "/y");
}

#[test]
fn flush_exports_what_is_held_and_counts_what_is_pending() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_100);
    r.accept(SK2, 1_000, 50);
    r.recv(SK2, get("/pending"), At(1_200, 1_190, 1_202));
    r.asm.flush(&mut r.out);
    let spans = r.take();
    assert_eq!(
        named(&spans, conn_spans::CONNECT).len() + named(&spans, conn_spans::ACCEPT).len(),
        2
    );
    assert_eq!(unanswered_and_unmatched(r.stats()), (1, 0));
}

// --- Property: arbitrary record sequences ---

/// Pieces that HTTP/1.x streams are made of, so that arbitrary sequences reach deep states.
const PIECES: &[&str] = &[
    "GET / HTTP/1.1\r\n",
    "HEAD /h HTTP/1.1\r\n",
    "POST /p HTTP/1.1\r\n",
    "HTTP/1.1 200 OK\r\n",
    "HTTP/1.1 100 Continue\r\n",
    "HTTP/1.1 204 No Content\r\n",
    "HTTP/1.0 500 Oops\r\n",
    "Content-Length: 5\r\n",
    "Content-Length: 2000\r\n",
    "Transfer-Encoding: chunked\r\n",
    "Connection: close\r\n",
    "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n",
    "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\n",
    "traceparent: 00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01\r\n",
    "tracestate: a=b\r\n",
    "\r\n",
    "\r",
    "\n",
    "hello",
    "5\r\nhello\r\n",
    "0\r\n\r\n",
    "ff;x=y\r\n",
];

/// Whole messages, so that arbitrary sequences also make request/response pairs.
const MESSAGES: &[&str] = &[
    "GET /a HTTP/1.1\r\nHost: x\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
    "GET /b HTTP/1.1\r\n\r\n",
    "HEAD /h HTTP/1.1\r\n\r\n",
    "POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 204 No Content\r\n\r\n",
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nT: 1\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nHTTP/1.1 2",
    "HTTP/1.0 503 Busy\r\n\r\nbody until close",
    "HTTP/1.1 500 Oops\r\nBad Header: x\r\n\r\n",
];

#[derive(Clone, Debug)]
enum Op {
    Conn {
        sk: u64,
        old: u8,
        new: u8,
        sk_err: i32,
        srtt_us: u32,
        phase_start: u64,
        at: u64,
    },
    /// `len` = the bytes' length plus `extra_len`; `captured` overrides what the record says.
    Data {
        sk: u64,
        send: bool,
        bytes: Vec<u8>,
        extra_len: u32,
        captured: Option<u16>,
        times: [u64; 3],
    },
    /// A request, then a response, on one socket (sent then received on a client's, the other
    /// way round on a server's).
    Exchange {
        sk: u64,
        server: bool,
        request: Vec<u8>,
        response: Vec<u8>,
        times: [u64; 6],
    },
    Sweep(u64),
    Flush,
}

fn socket() -> impl Strategy<Value = u64> {
    prop_oneof![4 => Just(0u64), 1 => 1..4u64]
}

fn timestamp() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..10_000_000_000u64, 1 => any::<u64>(), 1 => Just(0u64)]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    let messages = proptest::collection::vec(proptest::sample::select(MESSAGES), 1..4)
        .prop_map(|m| m.concat().into_bytes());
    let index = any::<prop::sample::Index>;
    prop_oneof![
        // Whole messages, or a slice of them (a record cut anywhere in a stream).
        2 => messages.clone(),
        1 => (messages, index(), index()).prop_map(|(m, a, b)| {
            let (a, b) = (a.index(m.len() + 1), b.index(m.len() + 1));
            m[a.min(b)..a.max(b)].to_vec()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..1_200),
        1 => proptest::collection::vec(
            prop_oneof![
                4 => proptest::sample::select(PIECES).prop_map(|p| p.as_bytes().to_vec()),
                1 => proptest::collection::vec(any::<u8>(), 0..8),
            ],
            0..24,
        )
        .prop_map(|parts| parts.concat()),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let transition = prop_oneof![
        2 => Just((SYN_SENT, ESTABLISHED)),
        2 => Just((SYN_RECV, ESTABLISHED)),
        1 => Just((ESTABLISHED, CLOSE)),
        1 => (any::<u8>(), any::<u8>()),
    ];
    let sk_err = prop_oneof![Just(0), Just(libc::ECONNRESET), any::<i32>()];
    let len_extra = prop_oneof![4 => Just(0u32), 1 => 0..5_000u32, 1 => any::<u32>()];
    prop_oneof![
        2 => (socket(), transition, sk_err, any::<u32>(), timestamp(), timestamp()).prop_map(
            |(sk, (old, new), sk_err, srtt_us, phase_start, at)| {
                Op::Conn { sk, old, new, sk_err, srtt_us, phase_start, at }
            }
        ),
        6 => (
            socket(),
            any::<bool>(),
            payload(),
            len_extra,
            proptest::option::weighted(0.2, any::<u16>()),
            [timestamp(), timestamp(), timestamp()],
        )
            .prop_map(|(sk, send, bytes, extra_len, captured, times)| Op::Data {
                sk,
                send,
                bytes,
                extra_len,
                captured,
                times,
            }),
        3 => (
            socket(),
            any::<bool>(),
            proptest::sample::select(&MESSAGES[..5]),
            proptest::collection::vec(proptest::sample::select(&MESSAGES[5..]), 1..3),
            [timestamp(), timestamp(), timestamp(), timestamp(), timestamp(), timestamp()],
        )
            .prop_map(|(sk, server, request, response, times)| Op::Exchange {
                sk,
                server,
                request: request.as_bytes().to_vec(),
                response: response.concat().into_bytes(),
                times,
            }),
        1 => timestamp().prop_map(Op::Sweep),
        1 => Just(Op::Flush),
    ]
}

/// A data record with raw (ns) timestamps.
fn raw_record(sk: u64, direction: u8, bytes: &[u8], times: &[u64]) -> DataEvent {
    let mut event = record(sk, direction, bytes, At(0, 0, 0));
    (event.enter_ns, event.tcp_ns, event.header.ts_ns) = (times[0], times[1], times[2]);
    event
}

fn apply(asm: &mut Assembler, op: &Op, out: &mut Vec<HopSpan>) {
    match op {
        Op::Conn {
            sk,
            old,
            new,
            sk_err,
            srtt_us,
            phase_start,
            at,
        } => {
            let mut event = conn_event(*sk, *old, *new, 0, 0);
            (event.phase_start_ns, event.header.ts_ns) = (*phase_start, *at);
            (event.sk_err, event.srtt_us) = (*sk_err, *srtt_us);
            asm.on_conn(&event, out);
        }
        Op::Data {
            sk,
            send,
            bytes,
            extra_len,
            captured,
            times,
        } => {
            let direction = if *send {
                DIRECTION_SEND
            } else {
                DIRECTION_RECV
            };
            let mut event = raw_record(*sk, direction, bytes, times);
            event.len = event.len.saturating_add(*extra_len);
            if let Some(captured) = captured {
                // Any value the record may carry, even one larger than what it holds.
                event.captured = *captured;
            }
            asm.on_data(&event, out);
        }
        Op::Exchange {
            sk,
            server,
            request,
            response,
            times,
        } => {
            let (to_server, to_client) = if *server {
                (DIRECTION_RECV, DIRECTION_SEND)
            } else {
                (DIRECTION_SEND, DIRECTION_RECV)
            };
            asm.on_data(&raw_record(*sk, to_server, request, &times[..3]), out);
            asm.on_data(&raw_record(*sk, to_client, response, &times[3..]), out);
        }
        Op::Sweep(now) => asm.sweep(*now, out),
        Op::Flush => asm.flush(out),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_records_never_panic_nor_build_inverted_spans(
        ops in proptest::collection::vec(op(), 1..40),
        ignore in proptest::bool::weighted(0.2),
    ) {
        let config = Config {
            max_sockets: 3,
            untraced: if ignore { Untraced::Ignore } else { Untraced::NewTrace },
            sampler: Sampler::AlwaysOn,
            ..Config::default()
        };
        let mut asm = Assembler::new(config);
        let mut spans = Vec::new();
        for op in &ops {
            let mut out = Vec::new();
            apply(&mut asm, op, &mut out);
            prop_assert!(asm.sockets.len() <= 3);
            for socket in asm.sockets.values() {
                prop_assert!(socket.outgoing.head.len() <= MAX_HEAD);
                prop_assert!(socket.incoming.head.len() <= MAX_HEAD);
                prop_assert!(socket.in_flight.len() <= MAX_IN_FLIGHT);
            }
            // Children arrive with their parent, in the same batch.
            for child in &out {
                prop_assert!(child.start_ns <= child.end_ns, "inverted: {child:#?}");
                let parent = out.iter().find(|p| {
                    p.ids.trace_id == child.ids.trace_id && Some(p.ids.span_id) == child.ids.parent_id
                });
                if let Some(parent) = parent {
                    prop_assert!(parent.start_ns <= child.start_ns, "child first: {parent:#?} {child:#?}");
                }
            }
            spans.extend(out);
        }
        asm.flush(&mut spans);
        prop_assert!(asm.sockets.is_empty());
        prop_assert!(spans.iter().all(|s| s.start_ns <= s.end_ns));
    }
}

/// NIC times keyed by sequence number (the tests' records use their entry time as seq).
#[derive(Default)]
struct FakeNic {
    egress: Vec<(u32, u64)>,
    ingress: Vec<(u32, u64)>,
}

impl crate::nic::NicTimes for FakeNic {
    fn egress(&self, key: &tracer_common::nic::NicKey) -> Option<u64> {
        self.egress
            .iter()
            .find(|(seq, _)| *seq == key.seq)
            .map(|(_, t)| *t)
    }

    fn ingress(&self, key: &tracer_common::nic::NicKey) -> Option<u64> {
        self.ingress
            .iter()
            .find(|(seq, _)| *seq == key.seq)
            .map(|(_, t)| *t)
    }
}

/// A receive record whose first segment arrived at the NIC at `nic_us` (the kernel's lookup).
fn arrived_at(mut event: DataEvent, nic_us: u64) -> DataEvent {
    event.nic_ns = us(nic_us);
    event
}

#[test]
fn the_nic_layer_moves_the_persona_start_to_arrival_and_marks_the_agent_span() {
    // Server side: request record entered at 2_000 (its seq), NIC arrival at 1_500 us.
    let nic = FakeNic {
        egress: vec![(3_000, us(3_040)), (1_200, us(1_210))],
        ..FakeNic::default()
    };
    let mut r = Replay::with(Config::default());
    r.asm = Assembler::new(Config::default()).with_nic(Box::new(nic));
    r.accept(SK2, 1_000, 50);
    r.data(&arrived_at(
        record(
            SK2,
            DIRECTION_RECV,
            &get_traced("/n"),
            At(2_000, 1_600, 2_100),
        ),
        1_500,
    ));
    r.send(SK2, ok("x"), At(3_000, 3_010, 3_020));
    let spans = r.take();
    let persona = only_hop(&spans);
    assert_eq!(
        persona.start_ns,
        us(1_500),
        "starts when the request crossed the NIC"
    );
    assert_eq!(
        persona.end_ns,
        us(3_040),
        "ends when the response crossed the NIC"
    );
    assert!(
        persona
            .events
            .iter()
            .any(|(n, t)| *n == "request.nic_ingress" && *t == us(1_500))
    );
    // Client side: the request's segment left at 1_210, the response's arrived at 1_880.
    r.connect(SK, 1_000, 1_100);
    r.send(SK, get_traced("/m"), At(1_200, 1_205, 1_206));
    r.data(&arrived_at(
        record(SK, DIRECTION_RECV, &ok("y"), At(1_300, 1_890, 1_900)),
        1_880,
    ));
    let spans = r.take();
    let agent = only_hop(&spans);
    assert!(
        agent
            .events
            .iter()
            .any(|(n, t)| *n == "request.nic_egress" && *t == us(1_210))
    );
    assert!(
        agent
            .events
            .iter()
            .any(|(n, t)| *n == "response.nic_ingress" && *t == us(1_880))
    );
}

#[test]
fn by_default_the_persona_layers_are_attributes_not_spans() {
    let mut r = Replay::with(Config::default());
    r.accept(SK2, 1_000, 50);
    r.recv(SK2, get_traced("/a"), At(2_000, 1_600, 2_100));
    r.send(SK2, ok("x"), At(3_000, 3_010, 3_020));
    let spans = r.take();
    assert_eq!(
        spans.iter().filter(|s| s.role == Role::Internal).count(),
        0,
        "{spans:#?}"
    );
    let persona = only_hop(&spans);
    let attr = |key: &str| {
        persona
            .attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        attr("hoptrace.kernel_receive_ns"),
        Some(Value::Int(500_000))
    );
    assert_eq!(attr("hoptrace.application_ns"), Some(Value::Int(900_000)));
}

#[path = "tls_handshake_tests.rs"]
mod tls;
/// A TLS library's plaintext record: the call entered at `library_us`, its ciphertext syscall
/// (entry, TCP, and the call's return as exit) at `at`.
fn plaintext(sk: u64, direction: u8, bytes: &[u8], library_us: u64, at: At) -> PlaintextEvent {
    let mut data = record(sk, direction, bytes, at);
    data.header.kind = kind::PLAINTEXT;
    PlaintextEvent {
        header: data.header,
        library_enter_ns: us(library_us),
        session: 0x5555_0000_1000,
        library: library::OPENSSL,
        joined_by: tracer_common::plaintext::joined_by::SYSCALL_IN_CALL,
        syscalls: 1,
        _pad: [0; 5],
        data,
    }
}

/// TLS records as they look on the wire (handshake, application data): never HTTP.
const CIPHERTEXT: &[u8] = &[0x17, 0x03, 0x03, 0x00, 0x20, 0xde, 0xad, 0xbe, 0xef];

#[test]
fn tls_plaintext_feeds_the_requests_and_the_ciphertext_is_left_alone() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_500);
    // The handshake, before any plaintext: the TLS tracker's, never counted as garbage HTTP.
    r.send(SK, [0x16, 0x03, 0x01, 0x00, 0x05], At(1_600, 1_610, 1_620));
    r.recv(SK, [0x16, 0x03, 0x03, 0x00, 0x05], At(1_630, 1_700, 1_720));
    let before = r.stats().non_http_records;
    assert_eq!(before, 0);
    for (library, at, path) in [(1_900, 2_000, "/a"), (3_900, 4_000, "/b")] {
        // The syscall's ciphertext record comes first (it returns inside the library call).
        r.send(SK, CIPHERTEXT, At(at, at + 10, at + 20));
        let head = if path == "/a" {
            get_traced(path)
        } else {
            get(path)
        };
        r.tls(SK, DIRECTION_SEND, &head, library, At(at, at + 10, at + 30));
        r.recv(SK, CIPHERTEXT, At(at + 40, at + 800, at + 900));
        r.tls(
            SK,
            DIRECTION_RECV,
            &ok("ok"),
            at + 35,
            At(at + 40, at + 800, at + 950),
        );
    }
    let spans = r.take();
    let hops = hops(&spans);
    assert_eq!(hops.len(), 2, "{spans:#?}");
    assert_eq!(path(hops[0]), "/a");
    assert_eq!(hops[0].ids.trace_id, TP_TRACE);
    // The first starts at the connect; the keep-alive one when curl called the library, and
    // ends when the library returned the response.
    assert_eq!((hops[0].start_ns, hops[0].end_ns), (us(1_000), us(2_950)));
    assert_eq!((hops[1].start_ns, hops[1].end_ns), (us(3_900), us(4_950)));
    assert_eq!(
        hops[1].events[..2],
        [
            ("request.to_tls", us(3_900)),
            ("request.to_kernel", us(4_000))
        ]
    );
    for hop in &hops {
        assert_eq!(hop.attr("url.scheme"), Some(&Value::from("https")));
        assert_eq!(
            hop.attr("hoptrace.tls.plaintext_from"),
            Some(&Value::from("openssl"))
        );
    }
    // Ciphertext after the first plaintext is neither parsed nor counted as non-HTTP.
    assert_eq!(r.stats().non_http_records, before);
    assert_eq!((r.stats().requests, r.stats().spans), (2, 2));
}

#[test]
fn a_tls_server_spends_application_time_until_it_calls_the_library() {
    let mut r = Replay::new();
    r.accept(SK, 1_000, 100);
    r.recv(SK, CIPHERTEXT, At(1_990, 1_950, 2_000));
    r.tls(
        SK,
        DIRECTION_RECV,
        &get_traced("/"),
        1_980,
        At(1_990, 1_950, 2_010),
    );
    // nginx calls SSL_write at 2_500; its ciphertext reaches the kernel at 2_600.
    r.send(SK, CIPHERTEXT, At(2_600, 2_650, 2_700));
    r.tls(
        SK,
        DIRECTION_SEND,
        &ok("ok"),
        2_500,
        At(2_600, 2_650, 2_710),
    );
    let spans = r.take();
    let hop = only_hop(&spans);
    assert_eq!(hop.role, Role::Server);
    // From the request's arrival at TCP to TCP queuing the response.
    assert_eq!((hop.start_ns, hop.end_ns), (us(1_950), us(2_650)));
    assert_eq!(
        hop.attr("hoptrace.application_ns"),
        Some(&Value::from(i64::try_from(us(2_500 - 2_010)).unwrap()))
    );
    let event = |name: &str| hop.events.iter().find(|(n, _)| *n == name).map(|e| e.1);
    assert_eq!(event("response.from_app"), Some(us(2_500)));
    assert_eq!(event("response.to_kernel"), Some(us(2_600)));
}

/// Go's HTTP client writes on one goroutine and reads on another, and plaintext records are
/// emitted at the library call's return: the response's record can come out of the ring buffer
/// before its request's. The span is the one the records in order make.
#[test]
fn a_response_record_before_its_requests_is_held_until_the_request_comes() {
    let exchange = |response_first: bool| {
        let mut r = Replay::new();
        r.connect(SK, 1_000, 1_500);
        r.send(SK, CIPHERTEXT, At(2_000, 2_010, 2_020));
        r.recv(SK, CIPHERTEXT, At(2_040, 2_800, 2_900));
        let request = plaintext(
            SK,
            DIRECTION_SEND,
            &get_traced("/a"),
            1_900,
            At(2_000, 2_010, 3_100),
        );
        let response = plaintext(
            SK,
            DIRECTION_RECV,
            &ok("ok"),
            1_950,
            At(2_040, 2_800, 2_950),
        );
        let order = if response_first {
            [&response, &request]
        } else {
            [&request, &response]
        };
        for event in order {
            r.asm.on_plaintext(event, &mut r.out);
        }
        assert_eq!(r.stats().responses_unmatched, 0);
        assert_eq!(r.stats().receives_early, u64::from(response_first));
        r.take()
    };
    let in_order = exchange(false);
    let reordered = exchange(true);
    assert_eq!(hops(&in_order).len(), 1, "{in_order:#?}");
    // The same spans but for their random ids.
    let without_ids = |spans: &[HopSpan]| {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} {:?} {:?}",
                    s.name, s.start_ns, s.end_ns, s.attributes, s.events
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(without_ids(&reordered), without_ids(&in_order));
}

/// A receive on a client socket that no request ever explains waits at most the connect hold,
/// then is what it was before: an unmatched response, no span.
#[test]
fn a_response_without_a_request_is_let_go_after_the_hold() {
    let mut r = Replay::new();
    r.connect(SK, 1_000, 1_500);
    r.tls(
        SK,
        DIRECTION_RECV,
        &ok("ok"),
        1_900,
        At(2_000, 2_100, 2_200),
    );
    assert_eq!(r.stats().receives_early, 1);
    assert_eq!(r.stats().responses_unmatched, 0);
    let hold_us = Config::default().connect_hold_ns / 1_000;
    r.sweep(2_200 + hold_us / 2);
    assert_eq!(r.stats().responses_unmatched, 0);
    r.sweep(2_200 + hold_us + 1);
    assert_eq!(r.stats().responses_unmatched, 1);
    assert!(hops(&r.take()).is_empty());
}
