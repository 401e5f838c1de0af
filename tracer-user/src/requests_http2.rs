//! HTTP/2 connections in the request assembler: each stream becomes one request of the same
//! pipeline as HTTP/1.x (same spans, `network.protocol.version` "2"), matched to its response by
//! stream id, so concurrent streams on one connection each get their span and the order in which
//! the two directions' records arrive does not matter.
//!
//! A socket is HTTP/2 when a direction starts with the client's connection preface or the
//! server's (a SETTINGS frame, RFC 9113 §3.4); its bytes then never reach the HTTP/1.x parser.
//! A connection whose start was not seen (ALPN chose h2 but no preface, or whole frames on a
//! connection older than the agent) cannot be decoded: HPACK's dynamic table is unknown. What
//! cannot be decoded yields a "HTTP/2 not decoded" span (once per connection) and counters,
//! never a request span with guessed fields. The frame and HPACK work is in http2.rs.

use std::collections::BTreeMap;

use tracer_common::http2 as frames;

use super::{
    Answer, Config, Pending, STATUS_UNKNOWN, Side, Socket, SpanEnv, Stamp, Stats, TraceContext,
    cut_path, finish, request_ids, tls_attributes,
};
use crate::{
    http2::{Direction, Event, Fields},
    span::{HopSpan, Role, SpanIds},
};

/// Streams followed per connection at most (SETTINGS_MAX_CONCURRENT_STREAMS is 100 to 250 in
/// common servers); beyond, new streams are counted and not followed.
const MAX_STREAMS: usize = 256;

/// What happened to HTTP/2 connections and streams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Http2Stats {
    pub connections: u64,
    /// Streams whose request headers were decoded (they are in `Stats::requests` too).
    pub streams_decoded: u64,
    /// Streams whose request headers could not be decoded, by reason: no span.
    pub streams_not_decoded: BTreeMap<&'static str, u64>,
    /// Responses whose headers (status) could not be decoded: spans without a status.
    pub responses_not_decoded: u64,
    /// Directions whose framing was lost, by reason: later streams not seen at all.
    pub directions_lost: BTreeMap<&'static str, u64>,
    /// Connections whose start was not seen: nothing decoded.
    pub connections_not_decodable: u64,
    pub streams_reset: u64,
    pub streams_over_capacity: u64,
}

impl Http2Stats {
    pub fn summary(&self) -> String {
        let not_decoded: u64 = self.streams_not_decoded.values().sum();
        let lost: u64 = self.directions_lost.values().sum();
        format!(
            "HTTP/2 connections {} (start not seen {}), streams decoded {}, not decoded \
             {not_decoded} {:?}, responses not decoded {}, directions lost {lost} {:?}, reset {}, \
             over capacity {}",
            self.connections,
            self.connections_not_decodable,
            self.streams_decoded,
            self.streams_not_decoded,
            self.responses_not_decoded,
            self.directions_lost,
            self.streams_reset,
            self.streams_over_capacity,
        )
    }
}

/// Whether a socket speaks HTTP/2, and its state when it does.
#[derive(Debug)]
pub(super) enum Http2 {
    /// Which directions had a record (a preface only counts at a direction's start), and
    /// whether the TLS handshake chose h2.
    Undecided {
        seen: [bool; 2],
        alpn_h2: bool,
    },
    Decoding(Box<Connection>),
    /// HTTP/2 whose start was not seen: its records are dropped (counted once, marked once).
    NotDecodable,
    /// Not HTTP/2: HTTP/1.x parses the records.
    No,
}

impl Default for Http2 {
    fn default() -> Self {
        Self::Undecided {
            seen: [false; 2],
            alpn_h2: false,
        }
    }
}

impl Http2 {
    /// The TLS handshake chose `h2` by ALPN.
    pub(super) fn alpn_chose_h2(&mut self) {
        if let Self::Undecided { alpn_h2, .. } = self {
            *alpn_h2 = true;
        }
    }

    /// Requests decoded and not answered (the connection is going away).
    pub(super) fn unanswered(&self) -> u64 {
        match self {
            Self::Decoding(conn) => conn
                .streams
                .values()
                .filter(|s| s.request.is_some())
                .count() as u64,
            _ => 0,
        }
    }
}

pub(super) struct Connection {
    from_client: Direction<Stamp>,
    from_server: Direction<Stamp>,
    streams: BTreeMap<u32, H2Stream>,
    /// The "not decoded" span went out.
    marked: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("streams", &self.streams.len())
            .field("marked", &self.marked)
            .finish_non_exhaustive()
    }
}

/// One stream's request and response, as far as seen (either may come first).
#[derive(Debug, Default)]
struct H2Stream {
    request: Option<Pending>,
    /// The request's headers were not decoded: no span, whatever the response.
    request_not_decoded: bool,
    /// The final response's first record and status ([`STATUS_UNKNOWN`] if not decoded).
    response: Option<(Stamp, u16)>,
    /// The record that ended the response.
    end: Option<Stamp>,
}

/// One record of a socket, as the assembler sees it.
pub(super) struct Record<'a> {
    pub data: &'a [u8],
    pub len: u64,
    pub stamp: Stamp,
    pub sending: bool,
    /// Plaintext from a TLS library probe (not a syscall's bytes).
    pub plaintext: bool,
}

/// Takes the record if the socket speaks HTTP/2 (or starts to); `false` leaves it to HTTP/1.x.
pub(super) fn route(
    socket: &mut Socket,
    record: &Record<'_>,
    config: &Config,
    env: &SpanEnv<'_>,
    stats: &mut Stats,
    out: &mut Vec<HopSpan>,
) -> bool {
    if matches!(socket.http2, Http2::Undecided { .. }) {
        decide(socket, record, config, stats, out);
    }
    match std::mem::replace(&mut socket.http2, Http2::No) {
        Http2::Decoding(mut conn) => {
            feed(&mut conn, socket, record, config, env, stats, out);
            socket.http2 = Http2::Decoding(conn);
            true
        }
        Http2::NotDecodable => {
            socket.http2 = Http2::NotDecodable;
            true
        }
        other => {
            socket.http2 = other;
            false
        }
    }
}

fn decide(
    socket: &mut Socket,
    record: &Record<'_>,
    config: &Config,
    stats: &mut Stats,
    out: &mut Vec<HopSpan>,
) {
    let Http2::Undecided { seen, alpn_h2 } = &mut socket.http2 else {
        return;
    };
    let direction = usize::from(!record.sending);
    let at_start = !seen[direction];
    seen[direction] = true;
    let data = record.data;
    // Whether this socket is the client, when the record starts a preface.
    let client = if at_start && data.starts_with(frames::PREFACE) {
        Some(record.sending)
    } else if at_start && frames::starts_with_server_preface(data) {
        Some(!record.sending)
    } else {
        None
    };
    // A preface from the wrong end (a connecting socket starting with SETTINGS) is not one.
    let side = client.map(|client| if client { Side::Client } else { Side::Server });
    if let Some(side) = side.filter(|side| socket.side.is_none_or(|known| known == *side)) {
        socket.side = Some(side);
        stats.http2.connections += 1;
        socket.http2 = Http2::Decoding(Box::new(Connection {
            from_client: Direction::from_client(),
            from_server: Direction::from_server(),
            streams: BTreeMap::new(),
            marked: false,
        }));
        return;
    }
    let reason = if *alpn_h2 {
        Some("ALPN chose h2 but the connection preface was not seen")
    } else if record.plaintext
        && socket.side.is_none()
        && frames::looks_like_frames(data, record.len)
    {
        Some("connection older than the agent: HPACK state unknown")
    } else {
        None
    };
    if let Some(reason) = reason {
        stats.http2.connections += 1;
        stats.http2.connections_not_decodable += 1;
        out.extend(not_decoded_span(socket, reason, record.stamp, config));
        socket.http2 = Http2::NotDecodable;
    } else if *seen == [true, true] {
        socket.http2 = Http2::No;
    }
}

fn feed(
    conn: &mut Connection,
    socket: &mut Socket,
    record: &Record<'_>,
    config: &Config,
    env: &SpanEnv<'_>,
    stats: &mut Stats,
    out: &mut Vec<HopSpan>,
) {
    let side = socket.side.unwrap_or(Side::Client);
    let from_client = record.sending == (side == Side::Client);
    let mut events = Vec::new();
    let direction = if from_client {
        &mut conn.from_client
    } else {
        &mut conn.from_server
    };
    direction.feed(record.data, record.len, record.stamp, &mut events);
    for event in events {
        match event {
            Event::HeaderTableSize(size) => {
                // A peer's SETTINGS bound the table of what the *other* peer encodes.
                if from_client {
                    conn.from_server.allow_table_size(size);
                } else {
                    conn.from_client.allow_table_size(size);
                }
            }
            Event::Reset { stream } => {
                if conn
                    .streams
                    .remove(&stream)
                    .is_some_and(|s| s.request.is_some())
                {
                    stats.http2.streams_reset += 1;
                }
            }
            Event::Lost { reason, at } => {
                *stats.http2.directions_lost.entry(reason).or_default() += 1;
                log::debug!("HTTP/2 direction lost on {:?}: {reason}", socket.endpoint);
                conn.mark(socket, reason, at, config, out);
            }
            Event::Headers {
                stream,
                first,
                fields,
                ..
            } if from_client => {
                let Some(entry) = conn.new_request(stream, stats) else {
                    continue;
                };
                let Some(pending) = request(fields, first, socket, config, stats) else {
                    continue;
                };
                stats.http2.streams_decoded += 1;
                entry.request = Some(pending);
                conn.try_finish(stream, socket, side, env, stats, out);
            }
            Event::HeadersNotDecoded {
                stream,
                reason,
                first,
                ..
            } if from_client => {
                let Some(entry) = conn.new_request(stream, stats) else {
                    continue;
                };
                entry.request_not_decoded = true;
                *stats.http2.streams_not_decoded.entry(reason).or_default() += 1;
                conn.mark(socket, reason, first, config, out);
                conn.try_finish(stream, socket, side, env, stats, out);
            }
            Event::Headers {
                stream,
                first,
                last,
                fields,
                end_stream,
            } => {
                let status = fields.status.unwrap_or(STATUS_UNKNOWN);
                if status != STATUS_UNKNOWN && status < 200 && !end_stream {
                    continue; // interim (103 Early Hints, 100 Continue): the final one follows
                }
                conn.response(stream, first, status, end_stream.then_some(last), stats);
                conn.try_finish(stream, socket, side, env, stats, out);
            }
            Event::HeadersNotDecoded {
                stream,
                first,
                last,
                end_stream,
                ..
            } => {
                stats.http2.responses_not_decoded += 1;
                conn.response(
                    stream,
                    first,
                    STATUS_UNKNOWN,
                    end_stream.then_some(last),
                    stats,
                );
                conn.try_finish(stream, socket, side, env, stats, out);
            }
            Event::StreamEnd { stream, at } if !from_client => {
                if let Some(entry) = conn.streams.get_mut(&stream) {
                    entry.end.get_or_insert(at);
                }
                conn.try_finish(stream, socket, side, env, stats, out);
            }
            Event::StreamEnd { .. } => {}
        }
    }
}

/// A decoded request's pending state; `None` for a header block without `:method` (not a
/// request: a malformed stream).
fn request(
    fields: Fields,
    first: Stamp,
    socket: &mut Socket,
    config: &Config,
    stats: &mut Stats,
) -> Option<Pending> {
    let method = fields.method?;
    let first_on_connection = socket.requests_seen == 0;
    socket.requests_seen += 1;
    let context = TraceContext::read(
        fields.traceparents.first().map(Vec::as_slice),
        fields.traceparents.len(),
        fields.tracestate.as_deref(),
    );
    let (ids, trace_origin) = request_ids(context, false, config.untraced, config.sampler, stats);
    Some(Pending {
        stamp: first,
        method: method.into(),
        path: cut_path(fields.path.unwrap_or_default().into()),
        ids,
        trace_origin,
        first_on_connection,
        truncated: false,
        protocol_version: "2",
    })
}

impl Connection {
    /// The stream's entry, created if there is room (counted when there is none).
    fn stream(&mut self, id: u32, stats: &mut Stats) -> Option<&mut H2Stream> {
        if !self.streams.contains_key(&id) && self.streams.len() >= MAX_STREAMS {
            stats.http2.streams_over_capacity += 1;
            return None;
        }
        Some(self.streams.entry(id).or_default())
    }

    /// The stream's entry for its request headers; `None` when the stream already had them
    /// (these are trailers) or there is no room.
    fn new_request(&mut self, id: u32, stats: &mut Stats) -> Option<&mut H2Stream> {
        self.stream(id, stats)
            .filter(|entry| entry.request.is_none() && !entry.request_not_decoded)
    }

    fn response(
        &mut self,
        stream: u32,
        first: Stamp,
        status: u16,
        end: Option<Stamp>,
        stats: &mut Stats,
    ) {
        let Some(entry) = self.stream(stream, stats) else {
            return;
        };
        if entry.response.is_none() {
            entry.response = Some((first, status));
        }
        if let Some(end) = end {
            entry.end.get_or_insert(end);
        }
    }

    /// Emits the stream's spans once its request, response and response end are all known.
    fn try_finish(
        &mut self,
        id: u32,
        socket: &mut Socket,
        side: Side,
        env: &SpanEnv<'_>,
        stats: &mut Stats,
        out: &mut Vec<HopSpan>,
    ) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        if entry.request_not_decoded && entry.end.is_some() {
            self.streams.remove(&id);
            return;
        }
        if entry.request.is_none() || entry.response.is_none() || entry.end.is_none() {
            return;
        }
        let Some(H2Stream {
            request: Some(request),
            response: Some((head, status)),
            end: Some(end),
            ..
        }) = self.streams.remove(&id)
        else {
            return;
        };
        let answer = Answer::new(request, head, status, socket);
        finish(answer, Some(end), side, &socket.endpoint, env, stats, out);
    }

    /// The connection's "not decoded" span, the first time something is not.
    fn mark(
        &mut self,
        socket: &Socket,
        reason: &'static str,
        at: Stamp,
        config: &Config,
        out: &mut Vec<HopSpan>,
    ) {
        if !self.marked {
            self.marked = true;
            out.extend(not_decoded_span(socket, reason, at, config));
        }
    }
}

/// A span saying that requests on this connection were not decoded, and why: on its own
/// trace (the connection's spans wait for a request that may never come, and are re-parented
/// when one does), sampled like a request without trace context.
fn not_decoded_span(
    socket: &Socket,
    reason: &'static str,
    at: Stamp,
    config: &Config,
) -> Option<HopSpan> {
    let ids = SpanIds::new_root();
    if !config.sampler.keep(&ids.trace_id, None) {
        return None;
    }
    let mut attributes = tls_attributes(&socket.endpoint, socket.side);
    attributes.extend([
        ("network.protocol.name", "http".into()),
        ("network.protocol.version", "2".into()),
        ("hoptrace.http2.not_decoded", reason.into()),
    ]);
    if let Some(from) = socket.endpoint.plaintext_from {
        attributes.push(("hoptrace.tls.plaintext_from", from.into()));
    }
    Some(HopSpan {
        ids,
        name: "HTTP/2 not decoded".into(),
        role: Role::Internal,
        start_ns: at.exit_ns,
        end_ns: at.exit_ns,
        error: None,
        attributes,
        events: Vec::new(),
    })
}
