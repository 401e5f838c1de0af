//! TLS handshake timing for any TLS library, from the record headers in the byte streams the
//! kernel already copies (the first 1 KiB of every send and receive of an observed socket).
//!
//! Nothing is decrypted: record content types, the plaintext handshake messages (ClientHello,
//! ServerHello), ChangeCipherSpec and Alerts say where the handshake is. A connection is followed
//! when its first bytes are a ClientHello; then each direction is cut into records (a record may
//! span reads: OpenSSL reads a header, then the body; and the kernel copies only a prefix of each
//! syscall, so a record boundary may fall in bytes not copied: then the direction re-syncs on the
//! next syscall whose first bytes are a valid record header, or is given up, counted).
//!
//! # Phases (kernel timestamps; a send is timed when the application handed the bytes to the
//! kernel, a receive when its first segment arrived: NIC, else TCP, else the read's return)
//!
//! - `tls.client_hello`: the ClientHello sent (client side) or arrived (server side). The span
//!   starts here. After a HelloRetryRequest the first ClientHello still starts it.
//! - `tls.server_hello`: the (non-retry) ServerHello arrived (client) or was sent (server).
//! - `tls.handshake_done`, where the span ends, the moment this endpoint has done its part:
//!   - TLS 1.2 and below: when both directions' ChangeCipherSpec (each followed by its Finished)
//!     have been seen: the client, in a full handshake, on receiving the server's Finished; the
//!     server on sending it (in a resumed handshake the other way round).
//!   - TLS 1.3: when the client's Finished flight moves: the client's first send of an encrypted
//!     record after it received the ServerHello, the server's first receive of one after it sent
//!     its ServerHello. (With client certificates that flight holds more records, and the
//!     ones after the first would be taken for data: client certificates are not handled.)
//! - `hoptrace.tls.first_data_after_ns`: from done to the client's first application record
//!   (the request) as this endpoint saw it. In TLS 1.3 the server's NewSessionTicket records
//!   look like application data, so only the client-to-server direction is used. The span waits
//!   for it (or a timeout) before it is emitted.
//!
//! An Alert before done (or a connection reset, or closed, before done) makes the span ERROR
//! with the reason. Alerts sent in the clear are named; an encrypted one (TLS 1.3 after the
//! ServerHello, recognized from the client by its size: 2 bytes, the inner content type and a
//! 16-byte AEAD tag) is reported as such, since its description is not visible.

use std::borrow::Cow;

use tracer_common::tls::{
    self, ContentType, RECORD_HEADER_LEN, RecordHeader, handshake_type, version,
};

use crate::{
    span::{HopSpan, Role, SpanIds, Value},
    tls_library::LibraryHandshake,
};

/// Span name (stable: dashboards and tests rely on it).
pub const HANDSHAKE: &str = "tls.handshake";

/// Ports where TLS is expected: other bytes there are counted.
const TLS_PORTS: [u16; 2] = [443, 8443];
/// Handshake message bytes kept per direction to parse a hello (a ClientHello with post-quantum
/// key shares is ~1.8 KiB; beyond this the hello is parsed as cut).
const MAX_HELLO: usize = 4096;
/// Record length of an encrypted TLS 1.3 alert without padding: the 2 alert bytes, the inner
/// content type, a 16-byte AEAD tag (every TLS 1.3 suite but CCM_8).
const ENCRYPTED_ALERT_LEN: u16 = 2 + 1 + 16;

/// What was skipped, and why. Reported by the agent, never exported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections whose ClientHello was seen.
    pub handshakes: u64,
    /// tls.handshake spans built (completed or failed).
    pub spans: u64,
    pub failed: u64,
    /// Connections whose first bytes were TLS records but not a ClientHello (older than the
    /// agent, or the start was not captured): not timed.
    pub midstream_skipped: u64,
    /// Directions that lost track of record boundaries in bytes the kernel did not copy and
    /// could not re-sync: the handshake's later phases may be missing.
    pub records_lost: u64,
    /// Hellos longer than what was captured: some attributes may be missing.
    pub hellos_truncated: u64,
    /// Connections on a TLS port (443, 8443) whose first bytes were not TLS.
    pub non_tls_on_tls_port: u64,
    /// TLS library handshake reports added to a handshake span, and those that found none
    /// (no socket known, a connection whose start was not seen, a span already out).
    pub library_joined: u64,
    pub library_unjoined: u64,
}

impl Stats {
    pub fn summary(&self) -> String {
        format!(
            "TLS handshakes {}, handshake spans {} ({} failed), TLS mid-stream skipped {}, TLS \
             records lost {}, TLS hellos truncated {}, non-TLS on TLS ports {}, TLS library \
             handshake reports joined {} (unjoined {})",
            self.handshakes,
            self.spans,
            self.failed,
            self.midstream_skipped,
            self.records_lost,
            self.hellos_truncated,
            self.non_tls_on_tls_port,
            self.library_joined,
            self.library_unjoined,
        )
    }
}

/// What a connection's first bytes say about TLS.
enum FirstBytes {
    /// A ClientHello: follow the handshake. `client` is whether this socket sent it.
    Handshake {
        client: bool,
    },
    /// TLS records, but the handshake's start was not seen.
    MidStream,
    NotTls,
}

/// Classifies a connection's first captured bytes (counting what is skipped). `ports` are the
/// socket's local and remote ports.
fn classify(data: &[u8], sending: bool, ports: [u16; 2], stats: &mut Stats) -> FirstBytes {
    if tls::looks_like_client_hello(data) {
        stats.handshakes += 1;
        return FirstBytes::Handshake { client: sending };
    }
    if tls::parse_record_header(data).is_ok() {
        stats.midstream_skipped += 1;
        return FirstBytes::MidStream;
    }
    if ports.iter().any(|p| TLS_PORTS.contains(p)) {
        stats.non_tls_on_tls_port += 1;
        log::debug!("non-TLS bytes on a TLS port {ports:?} (counted, not timed)");
    }
    FirstBytes::NotTls
}

/// One record's header as it went by, with its captured body prefix when wanted.
#[derive(Debug)]
struct Record {
    header: RecordHeader,
    /// The syscall that moved the record's first byte.
    at_ns: u64,
    /// TCP sequence number of the record's first byte.
    seq: u32,
    /// Captured body bytes (handshake records until both hellos are in, and alerts).
    body: Vec<u8>,
}

/// Cuts one direction's byte stream into records.
#[derive(Debug, Default)]
struct RecordReader {
    /// A record header split across syscalls, and the sequence number of its first byte.
    partial_header: Vec<u8>,
    partial_seq: u32,
    /// The record in progress: its header, body bytes still to come, when and at which
    /// sequence number it started.
    current: Option<(RecordHeader, u32, u64, u32)>,
    body: Vec<u8>,
    keep_bodies: bool,
    /// A record boundary fell in bytes not copied: wait for a syscall starting with a header.
    lost: bool,
}

impl RecordReader {
    /// Feeds one syscall's bytes (`data` captured of `len` moved, at `at_ns`, the first at
    /// sequence number `seq`); returns the records whose bodies ended (or, for a body cut by the
    /// capture, whose captured part ended), and whether sync was lost for good in this call.
    fn feed(&mut self, data: &[u8], len: u64, at_ns: u64, seq: u32, out: &mut Vec<Record>) -> bool {
        if self.lost {
            // Writers hand whole records to the kernel (OpenSSL, Go, rustls write flights of
            // records), so a new syscall may start one: re-sync if it looks like it.
            if tls::parse_record_header(data).is_err() {
                return false;
            }
            self.lost = false;
            self.partial_header.clear();
            self.current = None;
        }
        let mut at = 0u64; // offset in this syscall's bytes (may pass data.len())
        // Bounded: each turn consumes at least one byte (a header byte or a body byte).
        while at < len {
            if let Some((header, remaining, started, start_seq)) = self.current {
                let take = u64::from(remaining).min(len - at);
                // Alerts are two bytes in the clear: always worth keeping.
                if self.keep_bodies || header.content_type == ContentType::Alert {
                    let from = usize::try_from(at).unwrap_or(usize::MAX);
                    let to = usize::try_from(at + take).unwrap_or(usize::MAX);
                    if let Some(bytes) = data.get(from..to.min(data.len())) {
                        let room = MAX_HELLO.saturating_sub(self.body.len());
                        self.body.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    }
                }
                at += take;
                let remaining = remaining - take as u32;
                if remaining == 0 {
                    self.current = None;
                    out.push(Record {
                        header,
                        at_ns: started,
                        seq: start_seq,
                        body: std::mem::take(&mut self.body),
                    });
                } else {
                    self.current = Some((header, remaining, started, start_seq));
                }
                continue;
            }
            let Some(&byte) = data.get(at as usize) else {
                // A header in bytes the kernel did not copy: boundaries are lost.
                self.lost = true;
                self.partial_header.clear();
                return true;
            };
            if self.partial_header.is_empty() {
                self.partial_header.reserve(RECORD_HEADER_LEN);
                // Sequence numbers wrap: so does the offset added (at < len <= u32::MAX).
                self.partial_seq = seq.wrapping_add(at as u32);
            }
            self.partial_header.push(byte);
            at += 1;
            if self.partial_header.len() < RECORD_HEADER_LEN {
                continue;
            }
            match tls::parse_record_header(&self.partial_header) {
                Ok(header) => {
                    self.partial_header.clear();
                    let start_seq = self.partial_seq;
                    self.current = Some((header, u32::from(header.length), at_ns, start_seq));
                    if header.length == 0 {
                        // An empty application data record: complete at once.
                        self.current = None;
                        out.push(Record {
                            header,
                            at_ns,
                            seq: start_seq,
                            body: Vec::new(),
                        });
                    }
                }
                Err(_) => {
                    self.lost = true;
                    self.partial_header.clear();
                    return true;
                }
            }
        }
        false
    }
}

/// Kernel timestamps of one syscall (ns, CLOCK_MONOTONIC; 0 = unknown).
#[derive(Clone, Copy, Debug, Default)]
pub struct Moment {
    pub enter_ns: u64,
    pub exit_ns: u64,
    pub tcp_ns: u64,
    pub nic_ns: u64,
    /// TCP sequence number of the syscall's first byte.
    pub seq: u32,
}

impl Moment {
    /// When the bytes moved, as this phase model times them: a send when handed to the kernel,
    /// a receive when its first segment arrived (NIC, else TCP, else the read's return).
    fn time(&self, sending: bool) -> u64 {
        if sending {
            return self.enter_ns;
        }
        [self.nic_ns, self.tcp_ns]
            .into_iter()
            .find(|&t| t != 0 && t <= self.exit_ns)
            .unwrap_or(self.exit_ns)
    }
}

/// Why a connection ended before its handshake was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// A reset or abort (ESTABLISHED -> CLOSE).
    Reset,
    /// The socket's address was reused by a new connection: the old one had closed.
    Closed,
    /// No record for the idle timeout.
    Idle,
    /// The agent stopped: whether it would have completed is unknown.
    AgentStopped,
}

/// What the ClientHello offered.
#[derive(Clone, Debug, Default)]
struct Offered {
    server_name: Option<String>,
    alpn: Vec<String>,
    max_version: Option<u16>,
    truncated: bool,
}

/// What the ServerHello chose.
#[derive(Clone, Copy, Debug, Default)]
struct Chosen {
    version: Option<u16>,
    cipher_suite: u16,
    /// ALPN in the clear (TLS 1.2 and below).
    alpn: Option<[u8; 32]>,
    alpn_len: u8,
}

/// One connection's handshake, seen from one endpoint.
#[derive(Debug)]
pub struct Handshake {
    /// This socket sent the ClientHello.
    client: bool,
    outgoing: RecordReader,
    incoming: RecordReader,
    client_hello_ns: u64,
    offered: Offered,
    server_hello_ns: Option<u64>,
    hello_retry: bool,
    chosen: Chosen,
    /// ChangeCipherSpec seen from the client / the server.
    ccs_from_client: bool,
    ccs_from_server: bool,
    done_ns: Option<u64>,
    /// The first client application record after done (the request), as seen here.
    first_data_ns: Option<u64>,
    /// Server side: a receive that brought the handshake's end and (perhaps) the request.
    shared_read: Option<SharedRead>,
    error: Option<(String, &'static str)>,
    records_lost: bool,
    /// The span was emitted: later bytes are ignored.
    finished: bool,
    /// What the TLS library reported, if it did before the span was built.
    library: Option<LibraryHandshake>,
}

/// A server's receive that brought the client's first application record (the request) but
/// did not start with it: typically the end of the client's handshake flight and the request,
/// which a server reading ahead (nginx in `SSL_do_handshake`) gets in one read when the request
/// follows closely. The kernel timed that read by its first segment's arrival, the handshake's;
/// the request's own is the segment starting at `request_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedRead {
    /// Sequence number of the read's first byte: what plaintext served from the read carries.
    pub read_seq: u32,
    /// Sequence number of the request record's first byte; None when record boundaries were
    /// lost in bytes the kernel did not copy (then where the request began is unknown).
    pub request_seq: Option<u32>,
}

/// What a record did to a handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Pending,
    /// Done, or failed: the span is ready.
    Ready,
}

impl Handshake {
    fn new(client: bool) -> Self {
        let mut handshake = Self {
            client,
            outgoing: RecordReader::default(),
            incoming: RecordReader::default(),
            client_hello_ns: 0,
            offered: Offered::default(),
            server_hello_ns: None,
            hello_retry: false,
            chosen: Chosen::default(),
            ccs_from_client: false,
            ccs_from_server: false,
            done_ns: None,
            first_data_ns: None,
            shared_read: None,
            error: None,
            records_lost: false,
            finished: false,
            library: None,
        };
        handshake.outgoing.keep_bodies = true;
        handshake.incoming.keep_bodies = true;
        handshake
    }

    /// The ServerHello chose `h2` by ALPN (visible up to TLS 1.2 only).
    pub fn alpn_chose_h2(&self) -> bool {
        self.chosen
            .alpn
            .is_some_and(|bytes| bytes[..usize::from(self.chosen.alpn_len)] == *b"h2")
    }

    /// Whether this socket sent the ClientHello.
    pub fn is_client(&self) -> bool {
        self.client
    }

    /// Server side: the receive that held the handshake's end and the request, or lost their
    /// boundary, if one did (given once).
    pub fn take_shared_read(&mut self) -> Option<SharedRead> {
        self.shared_read.take()
    }

    /// The TLS library's report, added to the span when it is built.
    pub fn set_library(&mut self, library: LibraryHandshake) {
        self.library = Some(library);
    }

    /// Feeds one syscall of this socket.
    pub fn on_data(
        &mut self,
        data: &[u8],
        len: u64,
        sending: bool,
        moment: Moment,
        stats: &mut Stats,
    ) -> Progress {
        if self.finished {
            return Progress::Pending;
        }
        let at_ns = moment.time(sending);
        let reader = if sending {
            &mut self.outgoing
        } else {
            &mut self.incoming
        };
        let mut records = Vec::new();
        let lost = reader.feed(data, len, at_ns, moment.seq, &mut records);
        if lost && !self.records_lost {
            self.records_lost = true;
            stats.records_lost += 1;
        }
        let from_client = sending == self.client;
        for record in records {
            let had_data = self.first_data_ns.is_some();
            self.on_record(&record, from_client, stats);
            if self.error.is_some() {
                return Progress::Ready;
            }
            if !had_data && self.first_data_ns.is_some() && record.seq != moment.seq && !sending {
                self.shared_read = Some(SharedRead {
                    read_seq: moment.seq,
                    request_seq: Some(record.seq),
                });
            }
        }
        if lost && !sending && !self.client && self.first_data_ns.is_none() {
            self.shared_read = Some(SharedRead {
                read_seq: moment.seq,
                request_seq: None,
            });
        }
        if self.first_data_ns.is_some() {
            Progress::Ready
        } else {
            Progress::Pending
        }
    }

    fn on_record(&mut self, record: &Record, from_client: bool, stats: &mut Stats) {
        let header = record.header;
        let sender_encrypting = if from_client {
            self.ccs_from_client
        } else {
            self.ccs_from_server
        };
        let tls13 = self.chosen.version == Some(version::TLS_1_3);
        match header.content_type {
            ContentType::Handshake if !sender_encrypting => {
                self.on_handshake(record, from_client, stats);
                // Stop keeping bodies once both hellos are in: nothing later is parsed.
                if self.server_hello_ns.is_some() {
                    self.outgoing.keep_bodies = false;
                    self.incoming.keep_bodies = false;
                }
            }
            ContentType::ChangeCipherSpec => {
                if from_client {
                    self.ccs_from_client = true;
                } else {
                    self.ccs_from_server = true;
                }
                if !tls13
                    && self.server_hello_ns.is_some()
                    && self.ccs_from_client
                    && self.ccs_from_server
                    && self.done_ns.is_none()
                {
                    self.done_ns = Some(record.at_ns);
                }
            }
            ContentType::Alert if self.done_ns.is_none() => {
                let sent = from_client == self.client;
                let direction = if sent { "sent" } else { "received" };
                self.error = Some(match tls::parse_alert(&record.body) {
                    Ok(alert) => {
                        let name = alert.description_name().unwrap_or("unassigned");
                        (
                            format!(
                                "TLS alert {direction} before the handshake completed: {} {name} ({})",
                                alert.level_name(),
                                alert.description
                            ),
                            alert.description_name().unwrap_or("tls_alert"),
                        )
                    }
                    Err(_) => (
                        format!(
                            "TLS alert {direction} before the handshake completed (encrypted: \
                             description not visible)"
                        ),
                        "tls_alert",
                    ),
                });
            }
            ContentType::ApplicationData if from_client => {
                if self.done_ns.is_some() {
                    // After the client's Finished (1.2: a handshake record; 1.3: the record
                    // that marked done), a client application record is data.
                    self.first_data_ns.get_or_insert(record.at_ns);
                    return;
                }
                if !tls13 || self.server_hello_ns.is_none() {
                    return;
                }
                if header.length == ENCRYPTED_ALERT_LEN {
                    let direction = if self.client { "sent" } else { "received" };
                    self.error = Some((
                        format!(
                            "TLS alert {direction} before the handshake completed (encrypted, \
                             recognized by its size: description not visible)"
                        ),
                        "tls_alert",
                    ));
                    return;
                }
                // The client's Finished flight (TLS 1.3): this endpoint's part is done.
                self.done_ns = Some(record.at_ns);
            }
            _ => {}
        }
    }

    fn on_handshake(&mut self, record: &Record, from_client: bool, stats: &mut Stats) {
        let body = record.body.as_slice();
        let cut = body.len() < usize::from(record.header.length);
        match (from_client, body.first().copied()) {
            (true, Some(handshake_type::CLIENT_HELLO)) => {
                if self.client_hello_ns != 0 {
                    return; // the second ClientHello after a HelloRetryRequest
                }
                self.client_hello_ns = record.at_ns;
                if let Ok(hello) = tls::parse_client_hello(body) {
                    self.offered = Offered {
                        server_name: hello
                            .server_name
                            .map(|n| String::from_utf8_lossy(n).into_owned()),
                        alpn: hello
                            .alpn
                            .map(|list| {
                                list.iter()
                                    .map(|p| String::from_utf8_lossy(p).into_owned())
                                    .collect()
                            })
                            .unwrap_or_default(),
                        max_version: hello.max_version(),
                        truncated: !hello.complete,
                    };
                    if !hello.complete || cut {
                        stats.hellos_truncated += 1;
                        self.offered.truncated = true;
                    }
                } else {
                    stats.hellos_truncated += 1;
                    self.offered.truncated = true;
                }
            }
            (false, Some(handshake_type::SERVER_HELLO)) if self.server_hello_ns.is_none() => {
                let Ok(hello) = tls::parse_server_hello(body) else {
                    return;
                };
                if hello.hello_retry_request {
                    self.hello_retry = true;
                    return;
                }
                self.server_hello_ns = Some(record.at_ns);
                let mut chosen = Chosen {
                    version: hello.negotiated_version(),
                    cipher_suite: hello.cipher_suite,
                    ..Chosen::default()
                };
                if let Some(alpn) = hello.alpn.filter(|a| a.len() <= 32) {
                    let mut bytes = [0u8; 32];
                    bytes[..alpn.len()].copy_from_slice(alpn);
                    chosen.alpn = Some(bytes);
                    chosen.alpn_len = alpn.len() as u8;
                }
                self.chosen = chosen;
            }
            _ => {}
        }
    }

    /// The span, when done and its first data seen, or failed.
    pub fn span(&mut self, base: Vec<(&'static str, Value)>, stats: &mut Stats) -> HopSpan {
        self.build(base, None, stats)
    }

    /// The span of a connection that ended (or is given up) before its span was ready: ERROR if
    /// the handshake was not done; a done one lacks only its first data.
    pub fn span_on_end(
        &mut self,
        why: Gone,
        base: Vec<(&'static str, Value)>,
        stats: &mut Stats,
    ) -> HopSpan {
        self.build(base, Some(why), stats)
    }

    fn build(
        &mut self,
        mut attributes: Vec<(&'static str, Value)>,
        gone: Option<Gone>,
        stats: &mut Stats,
    ) -> HopSpan {
        self.finished = true;
        stats.spans += 1;
        let start = self.client_hello_ns;
        let mut events = vec![("tls.client_hello", start)];
        let mut end = start;
        if let Some(t) = self.server_hello_ns {
            events.push(("tls.server_hello", t));
            end = end.max(t);
        }
        if let Some(t) = self.done_ns {
            events.push(("tls.handshake_done", t));
            end = end.max(t);
        }
        let mut error = self.error.clone();
        if error.is_none() && self.done_ns.is_none() {
            error = match gone {
                Some(Gone::Reset) => Some((
                    "aborted: connection reset before Finished".to_string(),
                    "connection_reset",
                )),
                Some(Gone::Closed) => Some((
                    "aborted: connection closed before Finished".to_string(),
                    "connection_closed",
                )),
                Some(Gone::Idle) => Some((
                    "aborted: no Finished before the connection went idle".to_string(),
                    "timeout",
                )),
                Some(Gone::AgentStopped) | None => {
                    attributes.push((
                        "hoptrace.uncertain",
                        "end: the agent stopped before the handshake completed".into(),
                    ));
                    None
                }
            };
        }
        let version = self.chosen.version;
        attributes.push((
            "tls.protocol.name",
            version.map_or("tls", tls::protocol_name).into(),
        ));
        if let Some(name) = version.and_then(tls::version_name) {
            attributes.push(("tls.protocol.version", name.into()));
        }
        if self.server_hello_ns.is_some() {
            let suite = self.chosen.cipher_suite;
            let name: Cow<'static, str> = tls::cipher_suite_name(suite)
                .map_or_else(|| format!("0x{suite:04x}").into(), Cow::Borrowed);
            attributes.push(("tls.cipher", Value::Str(name.into())));
        }
        if let Some(name) = &self.offered.server_name {
            attributes.push(("tls.client.server_name", name.clone().into()));
        }
        if !self.offered.alpn.is_empty() {
            attributes.push((
                "hoptrace.tls.alpn_offered",
                self.offered.alpn.join(",").into(),
            ));
        }
        if let Some(v) = self.offered.max_version.and_then(tls::version_name) {
            attributes.push(("hoptrace.tls.max_version_offered", v.into()));
        }
        match (self.chosen.alpn, self.chosen.version) {
            (Some(bytes), _) => {
                let alpn = &bytes[..usize::from(self.chosen.alpn_len)];
                attributes.push((
                    "tls.next_protocol",
                    String::from_utf8_lossy(alpn).into_owned().into(),
                ));
            }
            (None, Some(version::TLS_1_3)) => attributes.push((
                "hoptrace.tls.next_protocol_visible",
                "no: TLS 1.3 sends the ALPN choice encrypted".into(),
            )),
            _ => {}
        }
        if self.hello_retry {
            attributes.push(("hoptrace.tls.hello_retry_request", true.into()));
        }
        attributes.push((
            "tls.established",
            (self.done_ns.is_some() && error.is_none()).into(),
        ));
        if let (Some(done), Some(data)) = (self.done_ns, self.first_data_ns) {
            attributes.push((
                "hoptrace.tls.first_data_after_ns",
                (data.saturating_sub(done) as i64).into(),
            ));
        }
        if self.offered.truncated {
            attributes.push((
                "hoptrace.uncertain",
                "ClientHello larger than the captured prefix: offers may be missing".into(),
            ));
        }
        if self.records_lost {
            attributes.push((
                "hoptrace.uncertain",
                "record boundaries lost in bytes not captured: later phases may be missing".into(),
            ));
        }
        if let Some((_, kind)) = &error {
            attributes.push(("error.type", (*kind).into()));
            stats.failed += 1;
        }
        let mut span = HopSpan {
            ids: SpanIds::new_root(),
            name: HANDSHAKE.into(),
            role: if self.client {
                Role::Client
            } else {
                Role::Server
            },
            start_ns: start,
            end_ns: end,
            error: error.map(|(why, _)| why),
            attributes,
            events,
        };
        if let Some(library) = &self.library {
            library.annotate(&mut span);
        }
        span
    }
}

/// Where a connection's bytes go: HTTP parsing, or the TLS handshake tracker.
#[derive(Debug, Default)]
pub enum Tls {
    /// No bytes seen yet.
    #[default]
    Unknown,
    /// The first bytes were too few to decide but could start a ClientHello record: a server
    /// that reads the 5-byte record header first (OpenSSL without read-ahead), or peeks at one
    /// byte (nginx's `MSG_PEEK` to tell TLS from plain HTTP). Held until the next bytes decide.
    Undecided(Vec<Held>),
    /// Not TLS: the bytes are HTTP's (or counted as non-HTTP there).
    No,
    /// TLS whose start was not seen, or whose handshake span is out: ignored.
    Ignored,
    Tracking(Box<Handshake>),
}

/// A syscall's bytes held while undecided.
#[derive(Debug)]
pub struct Held {
    data: Vec<u8>,
    len: u64,
    sending: bool,
    moment: Moment,
}

/// Held syscalls at most while undecided (a peek, a header, its body).
const MAX_HELD: usize = 4;

/// Where one syscall's bytes went.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Not TLS: the caller parses them as HTTP.
    Http,
    /// Taken by the TLS tracker; `Ready` when the handshake span can be built.
    Tls(Progress),
}

/// Whether `bytes` (at most a record header) could begin a handshake record.
fn could_start_handshake(bytes: &[u8]) -> bool {
    bytes.len() <= RECORD_HEADER_LEN
        && bytes.first() == Some(&22)
        && matches!(
            tls::parse_record_header(bytes),
            Ok(_) | Err(tls::TlsError::Incomplete)
        )
}

impl Tls {
    /// Routes one syscall of the socket: the first captured bytes decide whether the connection
    /// is TLS (`ports`: local and remote, for the non-TLS-on-a-TLS-port count).
    pub fn route(
        &mut self,
        data: &[u8],
        len: u64,
        sending: bool,
        moment: Moment,
        ports: [u16; 2],
        stats: &mut Stats,
    ) -> Route {
        if data.is_empty() && matches!(self, Self::Unknown) {
            return Route::Http; // sendfile or an uncaptured read: nothing to decide on
        }
        if matches!(self, Self::Unknown | Self::Undecided(_)) {
            let mut held = match std::mem::take(self) {
                Self::Undecided(held) => held,
                _ => Vec::new(),
            };
            // The same bytes again: the earlier read only peeked at them.
            if held
                .last()
                .is_some_and(|h| h.sending == sending && data.starts_with(&h.data))
            {
                held.pop();
            }
            let mut first: Vec<u8> = held.iter().flat_map(|h| h.data.iter().copied()).collect();
            first.extend_from_slice(data);
            if could_start_handshake(&first) && held.len() < MAX_HELD {
                held.push(Held {
                    data: data.to_vec(),
                    len,
                    sending,
                    moment,
                });
                *self = Self::Undecided(held);
                return Route::Tls(Progress::Pending);
            }
            *self = match classify(
                &first,
                held.first().map_or(sending, |h| h.sending),
                ports,
                stats,
            ) {
                FirstBytes::Handshake { client } => {
                    let mut handshake = Box::new(Handshake::new(client));
                    for h in held {
                        handshake.on_data(&h.data, h.len, h.sending, h.moment, stats);
                    }
                    Self::Tracking(handshake)
                }
                FirstBytes::MidStream => Self::Ignored,
                FirstBytes::NotTls => Self::No,
            };
        }
        match self {
            Self::Unknown | Self::Undecided(_) | Self::No => Route::Http,
            Self::Ignored => Route::Tls(Progress::Pending),
            Self::Tracking(handshake) => {
                Route::Tls(handshake.on_data(data, len, sending, moment, stats))
            }
        }
    }
}

/// A done handshake whose first data did not come within `hold_ns`: its span goes out without
/// it, into `held` (the caller's slot for spans waiting for a request), stamped with its done
/// time so that it is released with the connect.
pub fn give_up_waiting(
    tls: &mut Tls,
    now_ns: u64,
    hold_ns: u64,
    stats: &mut Stats,
    attributes: impl FnOnce() -> Vec<(&'static str, Value)>,
    held: &mut Option<(HopSpan, u64)>,
) {
    let Tls::Tracking(handshake) = tls else {
        return;
    };
    let Some(done) = handshake.done_ns else {
        return;
    };
    if now_ns.saturating_sub(done) <= hold_ns {
        return;
    }
    let span = handshake.span(attributes(), stats);
    *tls = Tls::Ignored;
    *held = Some((span, done));
}
