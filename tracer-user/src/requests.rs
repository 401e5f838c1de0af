//! Per-request HTTP/1.x timelines from the kernel's data and connection records.
//!
//! A pure state machine per socket: records in, spans out, no I/O and no clock of its own (time
//! is the records' kernel timestamps; `sweep` is told what time it is). Each socket has two byte
//! streams (what it sends, what it receives); on a client socket requests go out and responses
//! come in, on a server socket the other way round. A stream is cut into message heads by the
//! HTTP/1.x parser in tracer-common, bodies are skipped by their length or chunked framing, and
//! responses are matched to requests in order (HTTP/1.1 keeps order, including when pipelining).
//!
//! Memory is bounded: sockets (idle ones are swept, at most `max_sockets`), requests in flight
//! per socket, and head bytes buffered per stream. What is skipped is counted in [`Stats`].

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use tracer_common::{
    conn::{ConnEvent, ConnTransition},
    data::{DIRECTION_SEND, DataEvent},
    handshake_call::HandshakeCallEvent,
    http,
    plaintext::{PlaintextEvent, library},
    trace_context,
};

use crate::{
    conn_spans::{self, HOP_AGENT, HOP_PERSONA},
    early_receives::{Early, EarlyReceives},
    nic::NicTimes,
    sampling::{Sampler, Untraced},
    span::{HopSpan, Role, SpanIds, Value},
    tls_handshake::{self, Gone, SharedRead, Tls},
    tls_library::LibraryHandshake,
};

/// Head bytes buffered per stream before the head counts as truncated (a 64 KiB header must
/// not grow memory; the traceparent is normally in the first few hundred bytes).
const MAX_HEAD: usize = 16 * 1024;
/// Requests awaiting their response on one connection (pipelining depth).
const MAX_IN_FLIGHT: usize = 64;
/// Longest path exported (paths are cut, never exported whole if huge).
const MAX_PATH: usize = 256;
/// Room for all the attributes a request span gets, with its container's and pod's.
const ATTRIBUTES_CAPACITY: usize = 32;
/// [`Answer::status`] of a response whose status is unknown (HTTP/2 headers not decoded).
const STATUS_UNKNOWN: u16 = 0;

#[derive(Clone, Debug)]
pub struct Config {
    pub sampler: Sampler,
    pub untraced: Untraced,
    /// Sockets tracked at most; beyond, new sockets are not followed (counted).
    pub max_sockets: usize,
    /// A socket with no record for this long is forgotten (its unanswered requests counted).
    pub idle_ns: u64,
    /// How long a connect span waits for the first request on its connection, to become its
    /// child; after that it is exported on its own.
    pub connect_hold_ns: u64,
    /// Which layers the kernel gives timestamps for, named on every span (`hoptrace.layers`).
    pub layers: &'static str,
    /// Also export the persona's kernel receive / application / kernel send as child spans
    /// (their durations are always on the persona span as attributes and events). Off by
    /// default: three more spans per request is most of the export cost at high rates.
    pub layer_spans: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            sampler: Sampler::default(),
            untraced: Untraced::NewTrace,
            max_sockets: 65_536,
            idle_ns: 120_000_000_000,
            connect_hold_ns: 2_000_000_000,
            layers: "syscall,tcp",
            layer_spans: false,
        }
    }
}

/// What was skipped, and why. Reported by the agent; nothing here is ever exported as a span.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub spans: u64,
    pub not_sampled: u64,
    pub untraced_ignored: u64,
    /// Invalid traceparent headers, by reason (`TraceParentError::as_str`).
    pub traceparent_invalid: BTreeMap<&'static str, u64>,
    /// Heads larger than what the kernel copied or than MAX_HEAD: trace context may be missing.
    pub heads_truncated: u64,
    /// Heads that did not parse as HTTP/1.x.
    pub heads_malformed: u64,
    /// Data on a socket that never looked like HTTP/1.x (binary, TLS, HTTP/2...).
    pub non_http_records: u64,
    pub responses_unmatched: u64,
    /// Receives on a client socket before its request's record (TLS plaintext of a client
    /// that writes and reads on two threads): held, then replayed (early_receives.rs).
    pub receives_early: u64,
    /// Requests whose response never came (reset, idle, socket forgotten).
    pub requests_unanswered: u64,
    pub requests_overflow: u64,
    pub sockets_over_capacity: u64,
    pub tls: tls_handshake::Stats,
    pub http2: http2::Http2Stats,
}

impl Stats {
    pub fn summary(&self) -> String {
        let invalid: u64 = self.traceparent_invalid.values().sum();
        format!(
            "requests {}, request spans {}, not sampled {}, untraced ignored {}, invalid \
             traceparent {invalid} {:?}, truncated heads {}, malformed heads {}, non-HTTP records \
             {}, unmatched responses {}, early receives held {}, unanswered requests {}, pipelining overflow {}, sockets \
             over capacity {}; {}; {}",
            self.requests,
            self.spans,
            self.not_sampled,
            self.untraced_ignored,
            self.traceparent_invalid,
            self.heads_truncated,
            self.heads_malformed,
            self.non_http_records,
            self.responses_unmatched,
            self.receives_early,
            self.requests_unanswered,
            self.requests_overflow,
            self.sockets_over_capacity,
            self.tls.summary(),
            self.http2.summary(),
        )
    }
}

/// Kernel timestamps of one record (ns, CLOCK_MONOTONIC; `tcp_ns` 0 = unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stamp {
    enter_ns: u64,
    tcp_ns: u64,
    exit_ns: u64,
    /// TCP sequence number of the record's first byte: finds its segment at the NIC.
    seq: u32,
    /// Receive records: when that segment arrived at the NIC (0 = unknown).
    nic_ns: u64,
    /// TLS plaintext records: when the application called the TLS library (0 = not through a
    /// library probe; then `enter_ns` is the application's own syscall).
    library_ns: u64,
    /// Receive records: the read returned the end of the TLS handshake before these bytes, and
    /// where they began is not known: `nic_ns` and `tcp_ns` may be the handshake's arrival.
    arrival_may_be_handshake: bool,
}

impl Stamp {
    /// When the application handed the bytes over: to the TLS library, else to the kernel.
    fn handed_over(&self) -> u64 {
        if self.library_ns != 0 {
            self.library_ns
        } else {
            self.enter_ns
        }
    }
}

/// Who is at the ends of a socket, from its latest record.
#[derive(Clone, Debug, Default)]
struct Endpoint {
    tgid: u32,
    /// Shared by the socket's spans, as are the addresses' texts.
    comm: Arc<str>,
    netns: u32,
    local: Option<Address>,
    peer: Option<Address>,
    /// The TLS library whose uprobes give this socket's plaintext; its ciphertext records are
    /// then not parsed for HTTP.
    plaintext_from: Option<&'static str>,
}

/// An end of a socket, its address formatted once for all the socket's spans.
#[derive(Clone, Debug)]
struct Address {
    ip: IpAddr,
    port: u16,
    text: Arc<str>,
}

impl Address {
    fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            ip,
            port,
            text: ip.to_string().into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// The next bytes start a head.
    None,
    /// This many body bytes follow.
    Length(u64),
    /// Chunked (RFC 9112 §7.1), followed through its framing while its bytes are captured.
    Chunked(Chunk),
    /// Unknown length (until close, or chunked framing not seen): skip until something looks
    /// like a head.
    UntilNextHead,
}

/// Where a chunked body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far, whether a digit was seen, whether the digits
    /// ended (an extension or the line's end follows).
    Size { size: u64, digits: bool, ext: bool },
    /// This many bytes of chunk data, with the CRLF after them, follow.
    Data(u64),
    /// In the trailer section; `empty` while the current line holds nothing but CR.
    Trailer { empty: bool },
}

impl Chunk {
    const START: Self = Self::Size {
        size: 0,
        digits: false,
        ext: false,
    };
}

/// Follows chunked framing (a size line or the trailer section, never chunk data) over
/// captured bytes: the bytes used and the body state after them. Framing that does not parse
/// falls back to [`Body::UntilNextHead`].
fn chunk_framing(mut chunk: Chunk, bytes: &[u8]) -> (usize, Body) {
    for (i, &b) in bytes.iter().enumerate() {
        let next = match chunk {
            Chunk::Size { size, digits, ext } => match b {
                b'\n' if !digits => Body::UntilNextHead,
                b'\n' if size == 0 => Body::Chunked(Chunk::Trailer { empty: true }),
                b'\n' => size
                    .checked_add(2)
                    .map_or(Body::UntilNextHead, |n| Body::Chunked(Chunk::Data(n))),
                _ if ext => continue,
                _ => match char::from(b).to_digit(16) {
                    Some(d) => match size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(d)))
                    {
                        Some(size) => {
                            chunk = Chunk::Size {
                                size,
                                digits: true,
                                ext,
                            };
                            continue;
                        }
                        None => Body::UntilNextHead,
                    },
                    None if digits => {
                        chunk = Chunk::Size {
                            size,
                            digits,
                            ext: true,
                        };
                        continue;
                    }
                    None => Body::UntilNextHead,
                },
            },
            Chunk::Trailer { empty } => match b {
                b'\n' if empty => Body::None,
                b'\n' => {
                    chunk = Chunk::Trailer { empty: true };
                    continue;
                }
                b'\r' => continue,
                _ => {
                    chunk = Chunk::Trailer { empty: false };
                    continue;
                }
            },
            Chunk::Data(_) => return (0, Body::Chunked(chunk)), // the caller skips data
        };
        return (i + 1, next);
    }
    (bytes.len(), Body::Chunked(chunk))
}

/// One direction of a socket's byte stream.
#[derive(Debug)]
struct Stream {
    /// Bytes of a head that continues in a later record (a head that a record holds whole is
    /// parsed where it is, not copied here).
    head: Vec<u8>,
    /// When the head's first bytes moved.
    head_stamp: Stamp,
    body: Body,
}

impl Default for Stream {
    fn default() -> Self {
        Self {
            head: Vec::new(),
            head_stamp: Stamp::default(),
            body: Body::None,
        }
    }
}

/// How a stream's heads are read: parsed once, when complete or cut short, into what the
/// spans need (`Fields`); the bytes are not kept.
trait HeadReader {
    type Fields;
    /// Whether bytes begin a head.
    fn starts_head(&self, bytes: &[u8]) -> bool;
    /// A head at the start of `buf` that is complete: its length, the body after it and its
    /// fields; `None` while incomplete. A malformed head ends where its bytes do (the parser's
    /// errors are stable under extension: more bytes would not mend it), to be counted; the
    /// stream then waits for the next head.
    fn complete(&mut self, buf: &[u8]) -> Option<(usize, Body, Self::Fields)>;
    /// The fields of a head whose remaining bytes will not be seen.
    fn cut_short(&self, buf: &[u8]) -> Self::Fields;
}

/// A message head cut from a stream.
struct Head<F> {
    fields: F,
    stamp: Stamp,
    truncated: bool,
    /// What follows the head: whether the message's end will be seen.
    body: Body,
}

/// What a record completed, in stream order.
enum Piece<F> {
    Head(Head<F>),
    /// The last byte of the current message's body moved in the record with this stamp.
    BodyEnd(Stamp),
}

impl Stream {
    /// Feeds one record's bytes (`captured` of `len` were copied); returns the heads and body
    /// ends it completed.
    fn feed<R: HeadReader>(
        &mut self,
        data: &[u8],
        len: u64,
        stamp: Stamp,
        reader: &mut R,
        stats: &mut Stats,
    ) -> Vec<Piece<R::Fields>> {
        let mut heads = Vec::new();
        let mut at = 0usize; // offset into this record's bytes (may pass `data.len()`)
        // Bounded: each turn consumes a captured byte or more, or skips past the captured
        // bytes (after which the next turn ends). Stopping earlier would leave the stream's
        // state out of step with its bytes.
        for _ in 0..data.len() + 3 {
            let remaining_total = len.saturating_sub(at as u64);
            if remaining_total == 0 {
                break;
            }
            match self.body {
                Body::Length(n) => {
                    let skip = n.min(remaining_total);
                    self.body = if skip == n {
                        Body::None
                    } else {
                        Body::Length(n - skip)
                    };
                    if skip == n {
                        heads.push(Piece::BodyEnd(stamp));
                    }
                    at += skip as usize;
                    continue;
                }
                Body::Chunked(Chunk::Data(n)) => {
                    let skip = n.min(remaining_total);
                    self.body = Body::Chunked(if skip == n {
                        Chunk::START
                    } else {
                        Chunk::Data(n - skip)
                    });
                    at += skip as usize;
                    continue;
                }
                Body::Chunked(chunk) => {
                    let Some(rest) = data.get(at..).filter(|r| !r.is_empty()) else {
                        self.body = Body::UntilNextHead; // framing not captured: lost
                        break;
                    };
                    let (used, body) = chunk_framing(chunk, rest);
                    self.body = body;
                    if body == Body::None {
                        heads.push(Piece::BodyEnd(stamp));
                    }
                    at += used;
                    continue;
                }
                Body::UntilNextHead if self.head.is_empty() => {
                    let rest = data.get(at..).unwrap_or_default();
                    if rest.is_empty() || !reader.starts_head(rest) {
                        break; // body bytes (or bytes we did not see)
                    }
                    self.body = Body::None;
                }
                _ => {}
            }
            let Some(rest) = data.get(at..).filter(|r| !r.is_empty()) else {
                // The rest of this record was not captured.
                if !self.head.is_empty() {
                    heads.push(self.cut_short(reader));
                }
                break;
            };
            if self.head.is_empty() {
                if !reader.starts_head(rest) {
                    stats.non_http_records += 1;
                    self.body = Body::UntilNextHead;
                    break;
                }
                self.head_stamp = stamp;
            }
            let buffered = self.head.len();
            let room = MAX_HEAD.saturating_sub(buffered);
            let new = rest.get(..rest.len().min(room)).unwrap_or(rest);
            let complete = if buffered == 0 {
                reader.complete(new)
            } else {
                // The parser's verdict on an incomplete head changes only at a line ending:
                // bytes without CR or LF (after bytes not ending in CR) leave it incomplete.
                let may_end = self.head.last() == Some(&b'\r')
                    || new.iter().any(|&b| b == b'\n' || b == b'\r');
                self.head.extend_from_slice(new);
                if may_end {
                    reader.complete(&self.head)
                } else {
                    None
                }
            };
            match complete {
                Some((head_len, body, fields)) => {
                    // Not kept for the next head: a long head's buffer would stay allocated
                    // on every socket that ever saw one.
                    self.head = Vec::new();
                    self.body = body;
                    heads.push(Piece::Head(Head {
                        fields,
                        stamp: self.head_stamp,
                        truncated: false,
                        body,
                    }));
                    at += head_len.saturating_sub(buffered);
                }
                None => {
                    if buffered == 0 {
                        self.head.extend_from_slice(new);
                    }
                    // Incomplete: the head continues in the next record, unless it reached
                    // MAX_HEAD or this record was cut by the kernel's capture limit.
                    if self.head.len() >= MAX_HEAD || (data.len() as u64) < len {
                        heads.push(self.cut_short(reader));
                    }
                    break;
                }
            }
        }
        heads
    }

    /// The head buffered so far, whose remaining bytes will not be seen (it can still yield
    /// what it shows, nothing more), as a piece of output; the stream skips to the next head.
    fn cut_short<R: HeadReader>(&mut self, reader: &R) -> Piece<R::Fields> {
        self.body = Body::UntilNextHead;
        let head = Head {
            fields: reader.cut_short(&self.head),
            stamp: self.head_stamp,
            truncated: true,
            body: self.body,
        };
        self.head = Vec::new();
        Piece::Head(head)
    }
}

/// Reads request heads.
struct Requests;

impl HeadReader for Requests {
    /// `None`: the head did not parse.
    type Fields = Option<RequestFields>;

    fn starts_head(&self, bytes: &[u8]) -> bool {
        http::looks_like_request(bytes)
    }

    fn complete(&mut self, buf: &[u8]) -> Option<(usize, Body, Self::Fields)> {
        match http::parse_request_head(buf) {
            Ok(head) => {
                let head_len = head.head_len?;
                let selected = head.headers.select();
                let body = body_after(&selected, true);
                Some((head_len, body, Some(RequestFields::new(&head, &selected))))
            }
            Err(http::HttpError::Incomplete) => None,
            Err(_) => Some((buf.len(), Body::UntilNextHead, None)),
        }
    }

    fn cut_short(&self, buf: &[u8]) -> Self::Fields {
        let head = http::parse_request_head(buf).ok()?;
        Some(RequestFields::new(&head, &head.headers.select()))
    }
}

/// Reads the response heads to the requests in flight, in order: a response to HEAD has no
/// body. Counts the final and malformed heads it completes in `answered`, as the assembler
/// pops a request for each.
struct Responses<'a> {
    in_flight: &'a VecDeque<Pending>,
    answered: usize,
}

impl HeadReader for Responses<'_> {
    /// The status; `None`: the head did not parse.
    type Fields = Option<u16>;

    fn starts_head(&self, bytes: &[u8]) -> bool {
        http::looks_like_response(bytes)
    }

    fn complete(&mut self, buf: &[u8]) -> Option<(usize, Body, Self::Fields)> {
        let head = match http::parse_response_head(buf) {
            Ok(head) => head,
            Err(http::HttpError::Incomplete) => return None,
            Err(_) => {
                self.answered += 1;
                return Some((buf.len(), Body::UntilNextHead, None));
            }
        };
        let len = head.head_len?;
        let status = Some(head.status);
        if head.status < 200 {
            return Some((len, Body::None, status));
        }
        let to_head = self
            .in_flight
            .get(self.answered)
            .is_some_and(|request| request.method == "HEAD");
        self.answered += 1;
        // A response to HEAD, 204 and 304 have no body (RFC 9112 §6.3), whatever they declare.
        if to_head || head.status == 204 || head.status == 304 {
            return Some((len, Body::None, status));
        }
        Some((len, body_after(&head.headers.select(), false), status))
    }

    fn cut_short(&self, buf: &[u8]) -> Self::Fields {
        http::parse_response_head(buf).ok().map(|head| head.status)
    }
}

fn body_after(selected: &http::SelectedFields<'_>, request: bool) -> Body {
    if selected.chunked {
        return Body::Chunked(Chunk::START);
    }
    match selected.content_length {
        Ok(Some(0)) => Body::None,
        Ok(Some(n)) => Body::Length(n),
        // A request without length has no body; a response without one runs until close.
        Ok(None) if request => Body::None,
        _ => Body::UntilNextHead,
    }
}

/// What a request's span needs of its head, read when the head was parsed.
struct RequestFields {
    method: Cow<'static, str>,
    /// Cut to [`MAX_PATH`] characters.
    path: String,
    context: TraceContext,
}

impl RequestFields {
    fn new(head: &http::RequestHead<'_>, selected: &http::SelectedFields<'_>) -> Self {
        Self {
            method: method_name(head.method),
            path: cut_path(String::from_utf8_lossy(head.path())),
            context: TraceContext::read(
                selected.traceparent,
                selected.traceparent_lines,
                selected.tracestate,
            ),
        }
    }
}

/// A method as text: the known ones without allocating.
fn method_name(method: &[u8]) -> Cow<'static, str> {
    http::KNOWN_METHODS
        .iter()
        .find(|known| **known == method)
        .and_then(|known| std::str::from_utf8(known).ok())
        .map_or_else(
            || String::from_utf8_lossy(method).into_owned().into(),
            Cow::Borrowed,
        )
}

/// A path as exported: its first [`MAX_PATH`] characters.
fn cut_path(path: Cow<'_, str>) -> String {
    match path.char_indices().nth(MAX_PATH) {
        Some((end, _)) => path.get(..end).unwrap_or_default().to_owned(),
        None => path.into_owned(),
    }
}

/// A request whose response has not been seen yet.
#[derive(Debug)]
struct Pending {
    stamp: Stamp,
    method: Cow<'static, str>,
    path: String,
    ids: Option<SpanIds>,
    /// Why this request has no trace context, when it has none (`hoptrace.trace_origin`).
    trace_origin: &'static str,
    first_on_connection: bool,
    truncated: bool,
    /// `network.protocol.version`: "1.1" or "2".
    protocol_version: &'static str,
}

#[derive(Debug, Default)]
struct Socket {
    last_ns: u64,
    side: Option<Side>,
    endpoint: Endpoint,
    /// The handshake span, waiting for the connection's first request.
    held_handshake: Option<(HopSpan, u64)>,
    /// Whether the bytes are TLS: then the handshake tracker times them, HTTP never sees them.
    tls: Tls,
    /// The tls.handshake span, held like the connect (and with it) for the first request.
    held_tls: Option<(HopSpan, u64)>,
    /// A receive that brought the handshake's end with (perhaps) the first request, until the
    /// first plaintext receive.
    shared_read: Option<SharedRead>,
    requests_seen: u64,
    outgoing: Stream,
    incoming: Stream,
    in_flight: VecDeque<Pending>,
    /// A response whose head was seen and whose body is still moving.
    answering: Option<Answer>,
    /// Receives that came before the request they answer.
    early: EarlyReceives,
    /// Whether the socket speaks HTTP/2, and its streams when it does.
    http2: http2::Http2,
}

/// A request with its response head, waiting for the response's last byte.
#[derive(Debug)]
struct Answer {
    request: Pending,
    head: Stamp,
    status: u16,
    held_handshake: Option<(HopSpan, u64)>,
    held_tls: Option<(HopSpan, u64)>,
}

impl Answer {
    /// The connection's first request takes the socket's held connect and TLS spans along.
    fn new(request: Pending, head: Stamp, status: u16, socket: &mut Socket) -> Self {
        let (held_handshake, held_tls) = if request.first_on_connection {
            (socket.held_handshake.take(), socket.held_tls.take())
        } else {
            (None, None)
        };
        Self {
            request,
            head,
            status,
            held_handshake,
            held_tls,
        }
    }
}

pub struct Assembler {
    config: Config,
    sockets: HashMap<u64, Socket>,
    /// The NIC layer's timestamps, when the kernel gives them.
    nic: Option<Box<dyn NicTimes>>,
    /// Receives held on all sockets (bounded by [`crate::early_receives::MAX_HELD`]).
    early_held: usize,
    pub stats: Stats,
}

/// What building a span needs besides the request: where timestamps come from.
struct SpanEnv<'a> {
    layers: &'static str,
    layer_spans: bool,
    nic: Option<&'a dyn NicTimes>,
}

impl Assembler {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            sockets: HashMap::new(),
            nic: None,
            early_held: 0,
            stats: Stats::default(),
        }
    }

    /// Uses the NIC layer's timestamps for request and response first bytes.
    pub fn with_nic(mut self, nic: Box<dyn NicTimes>) -> Self {
        self.nic = Some(nic);
        self
    }

    pub fn on_conn(&mut self, event: &ConnEvent, out: &mut Vec<HopSpan>) {
        let transition = ConnTransition::classify(event.oldstate, event.newstate);
        if transition == Some(ConnTransition::Closed) {
            self.forget(event.skaddr, Gone::Closed, out);
            return;
        }
        let Some(span) = conn_spans::span_for(event) else {
            return;
        };
        match transition {
            Some(ConnTransition::ConnectDone | ConnTransition::AcceptDone) => {
                // A new connection on this address: whatever was there is gone.
                self.forget(event.skaddr, Gone::Closed, out);
                if let Some(socket) = self.socket(event.skaddr, event.header.ts_ns) {
                    socket.side = Some(if transition == Some(ConnTransition::ConnectDone) {
                        Side::Client
                    } else {
                        Side::Server
                    });
                    socket.held_handshake = Some((span, event.header.ts_ns));
                } else {
                    out.push(span);
                }
            }
            Some(
                ConnTransition::Aborted
                | ConnTransition::AcceptFailed
                | ConnTransition::ConnectFailed,
            ) => {
                self.forget(event.skaddr, Gone::Reset, out);
                out.push(span);
            }
            _ => out.push(span),
        }
    }

    /// A send or receive syscall's record. On a socket whose plaintext comes from a TLS
    /// library probe, this is ciphertext: ignored here.
    pub fn on_data(&mut self, event: &DataEvent, out: &mut Vec<HopSpan>) {
        self.on_record(event, 0, None, out);
    }

    /// Plaintext of a TLS socket from a library probe: parsed like a plaintext socket's
    /// records, timed from the library call (see `tracer_common::plaintext`).
    pub fn on_plaintext(&mut self, event: &PlaintextEvent, out: &mut Vec<HopSpan>) {
        let from = library::name(event.library);
        self.on_record(&event.data, event.library_enter_ns, Some(from), out);
    }

    /// A TLS library's report on a handshake: added to its socket's `tls.handshake` span,
    /// whether that is still being built or held for the first request.
    pub fn on_handshake_call(&mut self, event: &HandshakeCallEvent, out: &mut Vec<HopSpan>) {
        let stats = &mut self.stats.tls;
        let Some(socket) = self
            .sockets
            .get_mut(&event.skaddr)
            .filter(|_| event.skaddr != 0)
        else {
            stats.library_unjoined += 1;
            return;
        };
        let library = LibraryHandshake::from(event);
        match (&mut socket.tls, &mut socket.held_tls) {
            (Tls::Tracking(handshake), _) => handshake.set_library(library),
            (_, Some((span, _))) => {
                library.annotate(span);
                if span.error.is_some() {
                    // No request follows a failed handshake: out now, with the connect.
                    release_held(socket, out);
                }
            }
            _ => {
                stats.library_unjoined += 1;
                return;
            }
        }
        stats.library_joined += 1;
    }

    /// A record in, and the receives it lets go when it put a request in flight.
    fn on_record(
        &mut self,
        event: &DataEvent,
        library_ns: u64,
        plaintext_from: Option<&'static str>,
        out: &mut Vec<HopSpan>,
    ) {
        let replay = self.record(event, library_ns, plaintext_from, true, out);
        for early in replay {
            self.record(
                &early.event,
                early.library_ns,
                early.plaintext_from,
                true,
                out,
            );
        }
    }

    /// Processes the receives held on `addr` as they are (their request never came).
    fn release_early(&mut self, addr: u64, out: &mut Vec<HopSpan>) {
        let Some(socket) = self.sockets.get_mut(&addr) else {
            return;
        };
        for early in socket.early.take(&mut self.early_held) {
            self.record(
                &early.event,
                early.library_ns,
                early.plaintext_from,
                false,
                out,
            );
        }
    }

    /// Feeds one record to its socket's streams; a receive on a client socket with nothing in
    /// flight is held when `may_hold`. Returns the held receives a send released.
    fn record(
        &mut self,
        event: &DataEvent,
        library_ns: u64,
        plaintext_from: Option<&'static str>,
        may_hold: bool,
        out: &mut Vec<HopSpan>,
    ) -> VecDeque<Early> {
        let mut stamp = Stamp {
            enter_ns: event.enter_ns,
            tcp_ns: event.tcp_ns,
            exit_ns: event.header.ts_ns,
            seq: event.seq,
            nic_ns: event.nic_ns,
            library_ns,
            arrival_may_be_handshake: false,
        };
        let captured = usize::from(event.captured).min(event.data.len());
        let data = &event.data[..captured];
        let sending = event.direction == DIRECTION_SEND;
        let Self {
            config,
            sockets,
            stats,
            nic,
            early_held,
        } = self;
        let env = SpanEnv {
            layers: config.layers,
            layer_spans: config.layer_spans,
            nic: nic.as_deref(),
        };
        let Some(socket) = tracked(
            sockets,
            stats,
            config.max_sockets,
            event.skaddr,
            event.header.ts_ns,
        ) else {
            return VecDeque::new();
        };
        // Addresses don't change; the owner may (a socket passed on): refresh only then, not for
        // every record (it allocates).
        if socket.endpoint.local.is_none() || socket.endpoint.tgid != event.header.tgid {
            let tls = socket.endpoint.plaintext_from;
            socket.endpoint = endpoint(event);
            socket.endpoint.plaintext_from = tls;
        }
        // Ciphertext feeds the handshake tracker, also on sockets whose plaintext comes from
        // a library probe.
        if plaintext_from.is_none() && tls_bytes(socket, event, data, &mut stats.tls) {
            return VecDeque::new();
        }
        match (plaintext_from, socket.endpoint.plaintext_from) {
            (None, Some(_)) => return VecDeque::new(), // ciphertext: its plaintext comes from the library
            (Some(from), None) => {
                // The first plaintext: what the streams made of the handshake's ciphertext
                // is meaningless.
                socket.endpoint.plaintext_from = Some(from);
                socket.outgoing = Stream::default();
                socket.incoming = Stream::default();
            }
            _ => {}
        }
        if plaintext_from.is_some() && !sending {
            // The first plaintext received: served from the read that ended the handshake, or
            // from a read of its own.
            if let Some(read) = socket.shared_read.take()
                && read.read_seq == stamp.seq
            {
                own_arrival(&mut stamp, read, &socket.endpoint, env.nic);
            }
        }
        let record = http2::Record {
            data,
            len: u64::from(event.len),
            stamp,
            sending,
            plaintext: plaintext_from.is_some(),
        };
        if http2::route(socket, &record, config, &env, stats, out) {
            return VecDeque::new();
        }
        if socket.side.is_none() {
            // A connection older than the agent: who is the client shows in the first bytes.
            socket.side = match (
                sending,
                http::looks_like_request(data),
                http::looks_like_response(data),
            ) {
                (true, true, _) | (false, _, true) => Some(Side::Client),
                (false, true, _) | (true, _, true) => Some(Side::Server),
                _ => {
                    stats.non_http_records += 1;
                    return VecDeque::new();
                }
            };
        }
        let side = socket.side.unwrap_or(Side::Client);
        // Only library plaintext: syscall records are emitted as the syscall returns, in order.
        let nothing_in_flight = socket.in_flight.is_empty() && socket.answering.is_none();
        if may_hold
            && plaintext_from.is_some()
            && !sending
            && side == Side::Client
            && (nothing_in_flight || !socket.early.is_empty())
        {
            let early = Early {
                event: Box::new(*event),
                library_ns,
                plaintext_from,
            };
            if socket.early.hold(early, early_held).is_ok() {
                stats.receives_early += 1;
                return VecDeque::new();
            }
        }
        let carries_requests = (side == Side::Client) == sending;
        let stream = if sending {
            &mut socket.outgoing
        } else {
            &mut socket.incoming
        };
        let len = u64::from(event.len);
        if carries_requests {
            for piece in stream.feed(data, len, stamp, &mut Requests, stats) {
                let Piece::Head(head) = piece else { continue };
                let first = socket.requests_seen == 0;
                socket.requests_seen += 1;
                let Some(pending) = pending_request(head, first, config, stats) else {
                    continue;
                };
                if socket.in_flight.len() >= MAX_IN_FLIGHT {
                    stats.requests_overflow += 1;
                    continue;
                }
                socket.in_flight.push_back(pending);
            }
        } else {
            let mut responses = Responses {
                in_flight: &socket.in_flight,
                answered: 0,
            };
            for piece in stream.feed(data, len, stamp, &mut responses, stats) {
                let head = match piece {
                    Piece::BodyEnd(end) => {
                        if let Some(answer) = socket.answering.take() {
                            finish(answer, Some(end), side, &socket.endpoint, &env, stats, out);
                        }
                        continue;
                    }
                    Piece::Head(head) => head,
                };
                let Some(status) = head.fields else {
                    // It still answers the oldest request: keep the later ones in step.
                    stats.heads_malformed += 1;
                    socket.in_flight.pop_front();
                    continue;
                };
                if status < 200 {
                    continue; // interim (100 Continue): the final response follows
                }
                // A body whose end was never seen (its framing lost): that answer ends at its
                // first byte, said so.
                if let Some(answer) = socket.answering.take() {
                    finish(answer, None, side, &socket.endpoint, &env, stats, out);
                }
                let Some(request) = socket.in_flight.pop_front() else {
                    stats.responses_unmatched += 1;
                    continue;
                };
                let answer = Answer::new(request, head.stamp, status, socket);
                match head.body {
                    Body::None => finish(
                        answer,
                        Some(head.stamp),
                        side,
                        &socket.endpoint,
                        &env,
                        stats,
                        out,
                    ),
                    Body::UntilNextHead => {
                        finish(answer, None, side, &socket.endpoint, &env, stats, out)
                    }
                    Body::Length(_) | Body::Chunked(_) => socket.answering = Some(answer),
                }
            }
        }
        if sending && !socket.in_flight.is_empty() {
            socket.early.take(early_held)
        } else {
            VecDeque::new()
        }
    }

    /// Exports handshake spans that waited long enough, forgets idle sockets.
    pub fn sweep(&mut self, now_ns: u64, out: &mut Vec<HopSpan>) {
        let hold = self.config.connect_hold_ns;
        let idle = self.config.idle_ns;
        let mut idle_sockets = Vec::new();
        let mut early_waited = Vec::new();
        for (addr, socket) in &mut self.sockets {
            if socket.early.waited_longer(now_ns, hold) {
                early_waited.push(*addr);
            }
            tls_handshake::give_up_waiting(
                &mut socket.tls,
                now_ns,
                hold,
                &mut self.stats.tls,
                || tls_attributes(&socket.endpoint, socket.side),
                &mut socket.held_tls,
            );
            let expired = |held: &Option<(HopSpan, u64)>| {
                held.as_ref()
                    .is_some_and(|(_, at)| now_ns.saturating_sub(*at) > hold)
            };
            if expired(&socket.held_handshake) || expired(&socket.held_tls) {
                release_held(socket, out);
            }
            if now_ns.saturating_sub(socket.last_ns) > idle {
                idle_sockets.push(*addr);
            }
        }
        for addr in early_waited {
            self.release_early(addr, out);
        }
        for addr in idle_sockets {
            self.forget(addr, Gone::Idle, out);
        }
    }

    /// At shutdown: everything held goes out.
    pub fn flush(&mut self, out: &mut Vec<HopSpan>) {
        let all: Vec<u64> = self.sockets.keys().copied().collect();
        for addr in all {
            self.forget(addr, Gone::AgentStopped, out);
        }
    }

    fn forget(&mut self, addr: u64, why: Gone, out: &mut Vec<HopSpan>) {
        self.release_early(addr, out);
        if let Some(mut socket) = self.sockets.remove(&addr) {
            if let Tls::Tracking(handshake) = &mut socket.tls {
                let span = handshake.span_on_end(
                    why,
                    tls_attributes(&socket.endpoint, socket.side),
                    &mut self.stats.tls,
                );
                socket.held_tls = Some((span, 0));
            }
            self.stats.requests_unanswered +=
                socket.in_flight.len() as u64 + socket.http2.unanswered();
            if let (Some(answer), Some(side)) = (socket.answering.take(), socket.side) {
                // The connection ended (or went idle) inside the body: the end is unknown.
                let env = SpanEnv {
                    layers: self.config.layers,
                    layer_spans: self.config.layer_spans,
                    nic: self.nic.as_deref(),
                };
                finish(
                    answer,
                    None,
                    side,
                    &socket.endpoint,
                    &env,
                    &mut self.stats,
                    out,
                );
            }
            release_held(&mut socket, out);
        }
    }

    fn socket(&mut self, addr: u64, now_ns: u64) -> Option<&mut Socket> {
        tracked(
            &mut self.sockets,
            &mut self.stats,
            self.config.max_sockets,
            addr,
            now_ns,
        )
    }
}

/// The state of socket `addr`, created if there is room (counted when there is none).
fn tracked<'a>(
    sockets: &'a mut HashMap<u64, Socket>,
    stats: &mut Stats,
    max_sockets: usize,
    addr: u64,
    now_ns: u64,
) -> Option<&'a mut Socket> {
    if !sockets.contains_key(&addr) && sockets.len() >= max_sockets {
        stats.sockets_over_capacity += 1;
        return None;
    }
    let socket = sockets.entry(addr).or_default();
    socket.last_ns = now_ns;
    Some(socket)
}

/// A request head's pending state; `None` when it did not parse (counted).
fn pending_request(
    head: Head<Option<RequestFields>>,
    first_on_connection: bool,
    config: &Config,
    stats: &mut Stats,
) -> Option<Pending> {
    let Some(request) = head.fields else {
        stats.heads_malformed += 1;
        return None;
    };
    if head.truncated {
        stats.heads_truncated += 1;
    }
    let (ids, origin) = request_ids(
        request.context,
        head.truncated,
        config.untraced,
        config.sampler,
        stats,
    );
    Some(Pending {
        stamp: head.stamp,
        method: request.method,
        path: request.path,
        ids,
        trace_origin: origin,
        first_on_connection,
        truncated: head.truncated,
        protocol_version: "1.1",
    })
}

/// A request's trace context, as its head carried it.
struct TraceContext {
    /// The traceparent, or why there is no usable one (`absent`, `duplicate`, or
    /// `TraceParentError::as_str`).
    parent: Result<trace_context::TraceParent, &'static str>,
    /// The tracestate, when valid.
    state: Option<String>,
}

impl TraceContext {
    /// From the first `traceparent` value and how many there are, and the first `tracestate`.
    fn read(traceparent: Option<&[u8]>, traceparents: usize, tracestate: Option<&[u8]>) -> Self {
        let parent = match (traceparent, traceparents) {
            (None, _) => Err("absent"),
            (Some(one), 1) => trace_context::parse_traceparent(one).map_err(|e| e.as_str()),
            // Two traceparent headers: which one is right is unknowable (W3C §3.2).
            _ => Err("duplicate"),
        };
        let state = tracestate
            .filter(|v| trace_context::validate_tracestate(v).is_ok())
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string);
        Self { parent, state }
    }
}

/// Counts a request and gives its span's ids (`None` when not sampled, or untraced and ignored:
/// the request still answers its response) and trace origin.
fn request_ids(
    context: TraceContext,
    truncated: bool,
    untraced: Untraced,
    sampler: Sampler,
    stats: &mut Stats,
) -> (Option<SpanIds>, &'static str) {
    stats.requests += 1;
    let (ids, origin, keep) = match context.parent {
        Ok(parent) => {
            let keep = sampler.keep(&parent.trace_id, Some(parent.sampled()));
            (
                Some(SpanIds::child(
                    parent.trace_id,
                    parent.parent_id,
                    context.state,
                )),
                "traceparent",
                keep,
            )
        }
        Err(reason) => {
            if reason != "absent" {
                *stats.traceparent_invalid.entry(reason).or_default() += 1;
            }
            // Truncated before any traceparent showed: it may be in the bytes not captured.
            let origin = if reason == "absent" && truncated {
                "hoptrace (head truncated before any traceparent)"
            } else if reason == "absent" {
                "hoptrace"
            } else {
                "hoptrace (invalid traceparent ignored)"
            };
            match untraced {
                Untraced::Ignore => {
                    stats.untraced_ignored += 1;
                    (None, origin, false)
                }
                Untraced::NewTrace => {
                    let ids = SpanIds::new_root();
                    let keep = sampler.keep(&ids.trace_id, None);
                    (Some(ids), origin, keep)
                }
            }
        }
    };
    if !keep && ids.is_some() {
        stats.not_sampled += 1;
    }
    (ids.filter(|_| keep), origin)
}

/// Emits the spans of an answered request. `end` is the record that moved the response's last
/// byte; `None` when that is unknown, and then the span ends at the response's first byte and
/// says so.
fn finish(
    answer: Answer,
    end: Option<Stamp>,
    side: Side,
    endpoint: &Endpoint,
    env: &SpanEnv<'_>,
    stats: &mut Stats,
    out: &mut Vec<HopSpan>,
) {
    if let Some(spans) = build_spans(side, endpoint, answer, end, env) {
        stats.spans += 1;
        out.extend(spans);
    }
}

/// Moves `stamp`, the first plaintext served from `read` (which began with the end of the TLS
/// handshake), to the arrival of the segment that starts its own first record, when the record
/// was found in the captured bytes and a segment starts there. Otherwise the read's arrival
/// stays, marked: the request may have come in the handshake's segment, or later.
fn own_arrival(
    stamp: &mut Stamp,
    read: SharedRead,
    endpoint: &Endpoint,
    nic: Option<&dyn NicTimes>,
) {
    match own_segment(read, endpoint, nic) {
        Some((seq, arrived)) => {
            stamp.seq = seq;
            stamp.nic_ns = arrived;
            // TCP timed the read's first segment, the handshake's: nothing of the request's.
            stamp.tcp_ns = 0;
        }
        None => stamp.arrival_may_be_handshake = true,
    }
}

/// The sequence number of the request's first record in `read` and the NIC arrival of the
/// segment starting there, when both are known.
fn own_segment(
    read: SharedRead,
    endpoint: &Endpoint,
    nic: Option<&dyn NicTimes>,
) -> Option<(u32, u64)> {
    let (local, peer) = (endpoint.local.as_ref()?, endpoint.peer.as_ref()?);
    let seq = read.request_seq?;
    let key = crate::nic::key((local.ip, local.port), (peer.ip, peer.port), seq);
    Some((seq, nic?.ingress(&key)?))
}

/// The hop span of a request (and its children).
fn build_spans(
    side: Side,
    endpoint: &Endpoint,
    answer: Answer,
    end: Option<Stamp>,
    env: &SpanEnv<'_>,
) -> Option<Vec<HopSpan>> {
    let Answer {
        mut request,
        head: response,
        status,
        held_handshake,
        held_tls,
    } = answer;
    let last = end.unwrap_or(response);
    // The NIC times of the request's and the response's first segments, where the layer exists
    // and the first byte started a segment.
    let nic_at = |stamp: &Stamp, egress: bool| -> Option<u64> {
        if !egress {
            return (stamp.nic_ns != 0).then_some(stamp.nic_ns);
        }
        let (nic, local, peer) = (env.nic?, endpoint.local.as_ref()?, endpoint.peer.as_ref()?);
        nic.egress(&crate::nic::key(
            (local.ip, local.port),
            (peer.ip, peer.port),
            stamp.seq,
        ))
    };
    let layers = env.layers;
    let ids = request.ids?;
    let hop = match side {
        Side::Client => HOP_AGENT,
        Side::Server => HOP_PERSONA,
    };
    // Sized for all a span may get: growing it was a copy and a reallocation per span.
    let mut attributes: Vec<(&'static str, Value)> = Vec::with_capacity(ATTRIBUTES_CAPACITY);
    attributes.extend([
        ("hoptrace.hop", hop.into()),
        (
            "http.request.method",
            Value::Str(request.method.clone().into()),
        ),
        ("url.path", std::mem::take(&mut request.path).into()),
    ]);
    if status != STATUS_UNKNOWN {
        attributes.push(("http.response.status_code", i64::from(status).into()));
    }
    attributes.extend([
        ("network.protocol.name", "http".into()),
        ("network.protocol.version", request.protocol_version.into()),
        ("hoptrace.layers", layers.into()),
        ("hoptrace.trace_origin", request.trace_origin.into()),
        (
            "hoptrace.connection.first_request",
            request.first_on_connection.into(),
        ),
    ]);
    if status == STATUS_UNKNOWN {
        attributes.push((
            "hoptrace.uncertain",
            "status: the response's headers were not decoded".into(),
        ));
    }
    push_endpoint_attributes(&mut attributes, endpoint, side);
    if let Some(from) = endpoint.plaintext_from {
        attributes.push(("url.scheme", "https".into()));
        attributes.push(("hoptrace.tls.plaintext_from", from.into()));
    }
    if request.truncated {
        attributes.push((
            "hoptrace.uncertain",
            "request head larger than the captured prefix".into(),
        ));
    }
    if end.is_none() {
        attributes.push((
            "hoptrace.uncertain",
            "end: the response body's end was not seen; ends at its first byte".into(),
        ));
    }
    let error = (status >= 500 && side == Side::Server).then(|| format!("HTTP {status}"));
    let mut spans = Vec::new();
    let hop = match side {
        Side::Client => {
            let req = request.stamp;
            let mut start = req.handed_over();
            let mut events = Vec::with_capacity(8);
            if req.library_ns != 0 {
                events.push(("request.to_tls", req.library_ns));
            }
            events.push(("request.to_kernel", req.enter_ns));
            if req.tcp_ns != 0 {
                events.push(("request.tcp_queued", req.tcp_ns));
            }
            if let Some(left) = nic_at(&req, true) {
                events.push(("request.nic_egress", left));
            }
            if let Some(arrived) = nic_at(&response, false) {
                events.push(("response.nic_ingress", arrived));
            }
            if response.tcp_ns != 0 {
                events.push(("response.at_tcp", response.tcp_ns));
            }
            events.push(("response.to_app", response.exit_ns));
            if last != response {
                events.push(("response.complete", last.exit_ns));
            }
            let mut handshake_child = None;
            // The request that opened its connection includes the connect and the TLS
            // handshake, as its children.
            for (mut handshake, _) in held_handshake.into_iter().chain(held_tls) {
                if handshake.start_ns <= start || handshake_child.is_some() {
                    start = start.min(handshake.start_ns);
                    handshake.ids =
                        SpanIds::child(ids.trace_id, ids.span_id, ids.trace_state.clone());
                    handshake_child.get_or_insert_with(Vec::new).push(handshake);
                } else {
                    spans.push(handshake);
                }
            }
            let hop = HopSpan {
                ids: ids.clone(),
                name: request.method.clone(),
                role: Role::Client,
                start_ns: start,
                end_ns: last.exit_ns.max(start),
                error,
                attributes,
                events,
            };
            spans.extend(handshake_child.into_iter().flatten());
            hop
        }
        Side::Server => {
            let req = request.stamp;
            // The request reached the host when its first segment crossed the NIC, or else
            // reached TCP; without either layer, only when the application read it (said so).
            let arrived = nic_at(&req, false).filter(|&t| t <= req.exit_ns);
            let (start, start_known) = match (arrived, req.tcp_ns) {
                (Some(nic), _) => (nic, true),
                (None, tcp) if tcp != 0 && tcp <= req.exit_ns => (tcp, true),
                _ => (req.exit_ns, false),
            };
            // The response left when TCP had queued its last byte, or when its first segment
            // crossed the NIC, whichever came later.
            let queued = if last.tcp_ns != 0 {
                last.tcp_ns
            } else {
                last.exit_ns
            };
            let left = nic_at(&response, true);
            let end = queued.max(left.unwrap_or(0)).max(start);
            if !start_known {
                attributes.push((
                    "hoptrace.uncertain",
                    "start: arrival at TCP not seen; from the application's read".into(),
                ));
            } else if req.arrival_may_be_handshake {
                attributes.push((
                    "hoptrace.uncertain",
                    "start: the request was read with the TLS handshake's end; the arrival may \
                     be the handshake's"
                        .into(),
                ));
            }
            let kernel_rx = req.exit_ns.saturating_sub(start);
            let app = response.handed_over().saturating_sub(req.exit_ns);
            let kernel_tx = end.saturating_sub(response.enter_ns.max(start));
            attributes.push(("hoptrace.kernel_receive_ns", (kernel_rx as i64).into()));
            attributes.push(("hoptrace.application_ns", (app as i64).into()));
            attributes.push(("hoptrace.kernel_send_ns", (kernel_tx as i64).into()));
            let child = |name: &'static str, from: u64, to: u64| HopSpan {
                ids: SpanIds::child(ids.trace_id, ids.span_id, ids.trace_state.clone()),
                name: name.into(),
                role: Role::Internal,
                start_ns: from.clamp(start, end),
                end_ns: to.clamp(start, end).max(from.clamp(start, end)),
                error: None,
                attributes: vec![("hoptrace.hop", HOP_PERSONA.into())],
                events: Vec::new(),
            };
            if env.layer_spans && start_known {
                spans.push(child("kernel receive", start, req.exit_ns));
            }
            if env.layer_spans {
                spans.push(child("application", req.exit_ns, response.handed_over()));
            }
            if env.layer_spans && (last.tcp_ns != 0 || left.is_some()) {
                // From the response head handed over to its last byte queued by TCP (or its
                // first segment through the NIC).
                spans.push(child("kernel send", response.enter_ns, end));
            }
            for (mut handshake, _) in held_handshake.into_iter().chain(held_tls) {
                // The accept and the TLS handshake precede the request: siblings under the same
                // parent, not children (a child never starts before its parent).
                handshake.ids = match ids.parent_id {
                    Some(parent) => SpanIds::child(ids.trace_id, parent, ids.trace_state.clone()),
                    None => SpanIds {
                        span_id: handshake.ids.span_id,
                        ..ids.clone()
                    },
                };
                spans.push(handshake);
            }
            HopSpan {
                ids,
                name: request.method,
                role: Role::Server,
                start_ns: start,
                end_ns: end,
                error,
                attributes,
                events: [
                    arrived.map(|t| ("request.nic_ingress", t)),
                    (req.tcp_ns != 0).then_some(("request.at_tcp", req.tcp_ns)),
                    Some(("request.to_app", req.exit_ns)),
                    Some(("response.from_app", response.handed_over())),
                    (response.library_ns != 0).then_some(("response.to_kernel", response.enter_ns)),
                    left.map(|t| ("response.nic_egress", t)),
                ]
                .into_iter()
                .flatten()
                .collect(),
            }
        }
    };
    spans.insert(0, hop);
    Some(spans)
}

/// Routes a syscall's bytes on a TLS connection to the handshake tracker; `false` when they are
/// not TLS (then HTTP parsing has them). The first captured bytes decide.
fn tls_bytes(
    socket: &mut Socket,
    event: &DataEvent,
    data: &[u8],
    stats: &mut tls_handshake::Stats,
) -> bool {
    let sending = event.direction == DIRECTION_SEND;
    let moment = tls_handshake::Moment {
        enter_ns: event.enter_ns,
        exit_ns: event.header.ts_ns,
        tcp_ns: event.tcp_ns,
        nic_ns: event.nic_ns,
        seq: event.seq,
    };
    let ports = [event.sport, event.dport];
    let route = socket
        .tls
        .route(data, u64::from(event.len), sending, moment, ports, stats);
    if let Tls::Tracking(handshake) = &mut socket.tls {
        socket.side.get_or_insert(if handshake.is_client() {
            Side::Client
        } else {
            Side::Server
        });
        if let Some(read) = handshake.take_shared_read() {
            socket.shared_read = Some(read);
        }
        if route == tls_handshake::Route::Tls(tls_handshake::Progress::Ready) {
            if handshake.alpn_chose_h2() {
                socket.http2.alpn_chose_h2();
            }
            let span = handshake.span(tls_attributes(&socket.endpoint, socket.side), stats);
            socket.tls = Tls::Ignored;
            // No request follows a failed handshake: it goes out with the connect when the
            // TLS library gives its verdict (on_handshake_call), the connection ends, or the
            // hold expires, whichever comes first.
            socket.held_tls = Some((span, event.header.ts_ns));
        }
    }
    route != tls_handshake::Route::Http
}

/// Exports a socket's held connect/accept and TLS handshake spans without a request: the TLS
/// span joins the connect's trace as its child, or is exported on its own.
fn release_held(socket: &mut Socket, out: &mut Vec<HopSpan>) {
    let connect = socket.held_handshake.take().map(|(span, _)| span);
    let tls = socket.held_tls.take().map(|(mut tls, _)| {
        if let Some(connect) = &connect {
            tls.ids = SpanIds::child(
                connect.ids.trace_id,
                connect.ids.span_id,
                connect.ids.trace_state.clone(),
            );
        }
        tls
    });
    out.extend(connect);
    out.extend(tls);
}

fn tls_attributes(endpoint: &Endpoint, side: Option<Side>) -> Vec<(&'static str, Value)> {
    let side = side.unwrap_or(Side::Client);
    let hop = if side == Side::Client {
        HOP_AGENT
    } else {
        HOP_PERSONA
    };
    let mut attributes = vec![("hoptrace.hop", hop.into())];
    push_endpoint_attributes(&mut attributes, endpoint, side);
    attributes
}

fn push_endpoint_attributes(
    attributes: &mut Vec<(&'static str, Value)>,
    endpoint: &Endpoint,
    side: Side,
) {
    attributes.push(("hoptrace.netns", i64::from(endpoint.netns).into()));
    let (local, peer) = (&endpoint.local, &endpoint.peer);
    if let Some(local) = local {
        attributes.push(("network.local.address", local.text.clone().into()));
        attributes.push(("network.local.port", i64::from(local.port).into()));
    }
    if let Some(peer) = peer {
        attributes.push(("network.peer.address", peer.text.clone().into()));
        attributes.push(("network.peer.port", i64::from(peer.port).into()));
    }
    let server = if side == Side::Client { peer } else { local };
    if let Some(server) = server {
        attributes.push(("server.address", server.text.clone().into()));
        attributes.push(("server.port", i64::from(server.port).into()));
    }
    if endpoint.tgid != 0 {
        attributes.push(("process.pid", i64::from(endpoint.tgid).into()));
        attributes.push(("process.executable.name", endpoint.comm.clone().into()));
    }
}

fn endpoint(event: &DataEvent) -> Endpoint {
    let family = u16::from(event.family);
    Endpoint {
        tgid: event.header.tgid,
        comm: conn_spans::comm(&event.comm).into(),
        netns: event.netns_ino,
        local: Some(Address::new(
            conn_spans::address(family, &event.saddr),
            event.sport,
        )),
        peer: Some(Address::new(
            conn_spans::address(family, &event.daddr),
            event.dport,
        )),
        plaintext_from: None,
    }
}

#[path = "requests_http2.rs"]
mod http2;
#[cfg(test)]
#[path = "requests_tests.rs"]
mod tests;
