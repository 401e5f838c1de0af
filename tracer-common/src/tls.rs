//! TLS record and handshake headers (RFC 8446 §5.1, §4; RFC 5246 §6.2, §7.4), parsed from the
//! byte prefixes the kernel copies of each send and receive.
//!
//! Only what travels in the clear is read: record headers, and in the handshake's plaintext part
//! the ClientHello (SNI, ALPN offered, supported versions), the ServerHello (negotiated version,
//! cipher suite, ALPN when TLS 1.2 sends it in the clear) and Alerts sent before encryption
//! started. In TLS 1.3 everything after the ServerHello is encrypted, including the server's
//! ALPN choice (EncryptedExtensions): the parsers say it is not visible rather than guess.
//!
//! A record or a message may be cut by the kernel's capture limit or split across reads: the
//! parsers return [`TlsError::Incomplete`] when the bytes end before the fixed part they need,
//! and otherwise what is certain with `complete == false`, never an extension whose bytes were
//! not all seen. They do not allocate, never panic, and every loop is bounded by the input.

// The parsers take untrusted bytes: any panic is a bug. Tests opt out below.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use core::fmt;

/// Bytes of a record header: content type, legacy version, length.
pub const RECORD_HEADER_LEN: usize = 5;
/// Longest record body allowed: 2^14 plaintext plus 256 of expansion (RFC 8446 §5.2,
/// RFC 5246 §6.2.3 allows 2^14 + 2048 for TLS 1.2 ciphertext: the larger bound is used).
pub const MAX_RECORD_LEN: u16 = 16384 + 2048;
/// Bytes of a handshake message header: type and a 24-bit length.
pub const HANDSHAKE_HEADER_LEN: usize = 4;

/// Record content types (RFC 8446 §5.1, RFC 6520 for heartbeat).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentType {
    ChangeCipherSpec,
    Alert,
    Handshake,
    ApplicationData,
    Heartbeat,
}

impl ContentType {
    #[must_use]
    pub const fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            20 => Self::ChangeCipherSpec,
            21 => Self::Alert,
            22 => Self::Handshake,
            23 => Self::ApplicationData,
            24 => Self::Heartbeat,
            _ => return None,
        })
    }
}

/// Handshake message types this crate reads (RFC 8446 §4).
pub mod handshake_type {
    pub const CLIENT_HELLO: u8 = 1;
    pub const SERVER_HELLO: u8 = 2;
    pub const NEW_SESSION_TICKET: u8 = 4;
    pub const CERTIFICATE: u8 = 11;
    pub const SERVER_KEY_EXCHANGE: u8 = 12;
    pub const SERVER_HELLO_DONE: u8 = 14;
    pub const CLIENT_KEY_EXCHANGE: u8 = 16;
    pub const FINISHED: u8 = 20;
}

/// Protocol version code points (RFC 8446 §4.2.1, RFC 5246 §6.2.1).
pub mod version {
    pub const SSL_3_0: u16 = 0x0300;
    pub const TLS_1_0: u16 = 0x0301;
    pub const TLS_1_1: u16 = 0x0302;
    pub const TLS_1_2: u16 = 0x0303;
    pub const TLS_1_3: u16 = 0x0304;
}

/// Extension code points read here.
mod extension {
    pub const SERVER_NAME: u16 = 0;
    pub const ALPN: u16 = 16;
    pub const SUPPORTED_VERSIONS: u16 = 43;
}

/// The ServerHello random that marks a HelloRetryRequest (RFC 8446 §4.1.3).
const HELLO_RETRY_REQUEST_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// Why bytes are not (yet) what a parser wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsError {
    /// The bytes end before the fixed part the parser needs. More bytes of the same stream may
    /// complete it; if the kernel cut the capture there, none will.
    Incomplete,
    /// The first byte is not a TLS content type.
    InvalidContentType,
    /// The record's legacy version is not 3.0 to 3.4 (SSL 3.0 to TLS 1.3).
    InvalidVersion,
    /// The record's length is 0 where RFC 8446 §5.1 forbids it (handshake, alert, CCS) or larger
    /// than [`MAX_RECORD_LEN`].
    InvalidLength,
    /// A handshake message is not the type the parser reads.
    UnexpectedMessage,
    /// A length field inside a message points past its enclosing structure.
    Malformed,
}

impl TlsError {
    /// A stable snake_case reason, usable as a metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Incomplete => "incomplete",
            Self::InvalidContentType => "invalid_content_type",
            Self::InvalidVersion => "invalid_version",
            Self::InvalidLength => "invalid_length",
            Self::UnexpectedMessage => "unexpected_message",
            Self::Malformed => "malformed",
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for TlsError {}

/// A TLS record header (TLSPlaintext / TLSCiphertext without its fragment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub content_type: ContentType,
    /// `legacy_record_version`: 0x0301 in a first ClientHello, 0x0303 after, whatever is
    /// negotiated. Not the negotiated version.
    pub legacy_version: u16,
    /// Bytes of the record body that follow the header.
    pub length: u16,
}

/// Parses a record header at the start of `bytes`, checking what makes random bytes unlikely to
/// pass: a known content type, version 3.x (x <= 4), a length within bounds.
pub fn parse_record_header(bytes: &[u8]) -> Result<RecordHeader, TlsError> {
    let Some(&first) = bytes.first() else {
        return Err(TlsError::Incomplete);
    };
    let content_type = ContentType::from_u8(first).ok_or(TlsError::InvalidContentType)?;
    let [major, minor] = match bytes.get(1..3) {
        Some(&[major, minor]) => [major, minor],
        _ => {
            // Judge the version bytes that are there: a prefix of garbage fails early.
            return match bytes.get(1) {
                Some(&major) if major != 3 => Err(TlsError::InvalidVersion),
                _ => Err(TlsError::Incomplete),
            };
        }
    };
    if major != 3 || minor > 4 {
        return Err(TlsError::InvalidVersion);
    }
    let length = match bytes.get(3..5) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => return Err(TlsError::Incomplete),
    };
    let empty_forbidden = content_type != ContentType::ApplicationData;
    if length > MAX_RECORD_LEN || (length == 0 && empty_forbidden) {
        return Err(TlsError::InvalidLength);
    }
    Ok(RecordHeader {
        content_type,
        legacy_version: u16::from_be_bytes([major, minor]),
        length,
    })
}

/// Whether `bytes` start like a record carrying a ClientHello: what a TLS client sends first.
/// Cheap enough to run on every new connection's first bytes.
#[must_use]
pub fn looks_like_client_hello(bytes: &[u8]) -> bool {
    matches!(
        parse_record_header(bytes),
        Ok(RecordHeader {
            content_type: ContentType::Handshake,
            ..
        })
    ) && bytes.get(RECORD_HEADER_LEN) == Some(&handshake_type::CLIENT_HELLO)
}

/// A handshake message header (RFC 8446 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeHeader {
    pub msg_type: u8,
    /// Bytes of the message body (24-bit on the wire).
    pub length: u32,
}

/// Parses a handshake message header at the start of `bytes` (a handshake record's body, or the
/// concatenation of several when a message spans records).
pub fn parse_handshake_header(bytes: &[u8]) -> Result<HandshakeHeader, TlsError> {
    match bytes.get(..HANDSHAKE_HEADER_LEN) {
        Some(&[msg_type, a, b, c]) => Ok(HandshakeHeader {
            msg_type,
            length: u32::from_be_bytes([0, a, b, c]),
        }),
        _ => Err(TlsError::Incomplete),
    }
}

/// A bounded reader over a message body. Every read checks the length first.
#[derive(Clone, Copy)]
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    const fn new(rest: &'a [u8]) -> Self {
        Self { rest }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TlsError> {
        if self.rest.len() < n {
            return Err(TlsError::Incomplete);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, TlsError> {
        match self.take(1)? {
            &[b] => Ok(b),
            _ => Err(TlsError::Incomplete),
        }
    }

    fn u16(&mut self) -> Result<u16, TlsError> {
        match self.take(2)? {
            &[a, b] => Ok(u16::from_be_bytes([a, b])),
            _ => Err(TlsError::Incomplete),
        }
    }

    /// A vector with a `width`-byte length prefix (1 or 2).
    fn vector(&mut self, width: usize) -> Result<&'a [u8], TlsError> {
        let len = if width == 1 {
            usize::from(self.u8()?)
        } else {
            usize::from(self.u16()?)
        };
        self.take(len)
    }

    const fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// A list of 16-bit values on the wire (supported_versions, cipher suites). Iterating never
/// fails: a trailing odd byte is ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct U16List<'a>(&'a [u8]);

impl<'a> U16List<'a> {
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0
            .as_chunks::<2>()
            .0
            .iter()
            .map(|pair| u16::from_be_bytes(*pair))
    }

    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.0.len() < 2
    }
}

/// An ALPN ProtocolNameList (RFC 7301 §3.1), already length-checked as a whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlpnList<'a>(&'a [u8]);

impl<'a> AlpnList<'a> {
    /// The protocol names in order. Stops at the first name whose length points past the list.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut reader = Reader::new(self.0);
        core::iter::from_fn(move || {
            if reader.is_empty() {
                return None;
            }
            reader.vector(1).ok().filter(|name| !name.is_empty())
        })
    }

    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `value` is a GREASE value (RFC 8701): meaningless, to be skipped.
#[must_use]
pub const fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && (value >> 8) == (value & 0xff)
}

/// What a ClientHello offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// `legacy_version` (0x0303 when TLS 1.3 is offered: see `supported_versions`).
    pub legacy_version: u16,
    /// The host name of the server_name extension (RFC 6066 §3), if seen.
    pub server_name: Option<&'a [u8]>,
    /// ALPN protocols offered, if the extension was seen.
    pub alpn: Option<AlpnList<'a>>,
    /// supported_versions (RFC 8446 §4.2.1), if seen; may hold GREASE values.
    pub supported_versions: Option<U16List<'a>>,
    /// Every extension was seen (the message was not cut).
    pub complete: bool,
}

impl ClientHello<'_> {
    /// The highest non-GREASE version offered: supported_versions where sent, else
    /// `legacy_version`. `None` while supported_versions may still be in the bytes not seen.
    #[must_use]
    pub fn max_version(&self) -> Option<u16> {
        match self.supported_versions {
            Some(list) => list.iter().filter(|v| !is_grease(*v)).max(),
            None if self.complete => Some(self.legacy_version),
            None => None,
        }
    }

    /// Whether TLS 1.3 is offered; `None` when the bytes that would say were not seen.
    #[must_use]
    pub fn offers_tls13(&self) -> Option<bool> {
        self.max_version().map(|v| v >= version::TLS_1_3)
    }
}

/// The body of a handshake message of type `want` at the start of `message` (its header first),
/// and whether all of it is there. Bytes past the message's declared end are not part of it.
fn message_body(message: &[u8], want: u8) -> Result<(&[u8], bool), TlsError> {
    let header = parse_handshake_header(message)?;
    if header.msg_type != want {
        return Err(TlsError::UnexpectedMessage);
    }
    let rest = message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default();
    let declared = usize::try_from(header.length).unwrap_or(usize::MAX);
    match rest.get(..declared) {
        Some(body) => Ok((body, true)),
        None => Ok((rest, false)),
    }
}

/// Parses a ClientHello message (its 4-byte handshake header first). `Err(Incomplete)` when the
/// bytes end before the extensions start; a message cut inside the extensions returns those seen
/// whole, with `complete == false`.
pub fn parse_client_hello(message: &[u8]) -> Result<ClientHello<'_>, TlsError> {
    let (body, whole) = message_body(message, handshake_type::CLIENT_HELLO)?;
    let mut r = Reader::new(body);
    let legacy_version = r.u16()?;
    r.take(32)?; // random
    r.vector(1)?; // legacy_session_id
    r.vector(2)?; // cipher_suites
    r.vector(1)?; // legacy_compression_methods
    let mut hello = ClientHello {
        legacy_version,
        ..ClientHello::default()
    };
    let (block, complete) = extensions_block(&mut r, whole)?;
    hello.complete = complete;
    for_each_extension(block, |ext_type, data| {
        let mut d = Reader::new(data);
        match ext_type {
            extension::SERVER_NAME => {
                // server_name_list: entries of (name_type, HostName); the first host_name wins.
                let mut list = Reader::new(d.vector(2)?);
                for _ in 0..list.rest.len() {
                    if list.is_empty() {
                        break;
                    }
                    let name_type = list.u8()?;
                    let name = list.vector(2)?;
                    if name_type == 0 && !name.is_empty() {
                        hello.server_name = Some(name);
                        break;
                    }
                }
            }
            extension::ALPN => hello.alpn = Some(AlpnList(d.vector(2)?)),
            extension::SUPPORTED_VERSIONS => {
                hello.supported_versions = Some(U16List(d.vector(1)?));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(hello)
}

/// The extensions block after a hello's fixed part, and whether it is all there. A message
/// without extensions (allowed before TLS 1.3) has an empty block.
fn extensions_block<'a>(r: &mut Reader<'a>, whole: bool) -> Result<(&'a [u8], bool), TlsError> {
    if r.is_empty() {
        return if whole {
            Ok((&[], true))
        } else {
            Err(TlsError::Incomplete)
        };
    }
    let total = usize::from(r.u16()?);
    match r.take(total) {
        Ok(block) if whole && r.is_empty() => Ok((block, true)),
        // Bytes after the extensions inside the message's declared length.
        Ok(_) if whole => Err(TlsError::Malformed),
        Ok(block) => Ok((block, false)),
        Err(_) if whole => Err(TlsError::Malformed),
        Err(_) => Ok((r.rest, false)),
    }
}

/// Calls `each` with every extension read here whose bytes are all in `block`; a cut last
/// extension is left out. An extension whose inner lengths are inconsistent, or one of these
/// sent twice (RFC 8446 §4.2 forbids it; which one a peer used is unknowable), makes the hello
/// malformed.
fn for_each_extension<'a>(
    block: &'a [u8],
    mut each: impl FnMut(u16, &'a [u8]) -> Result<(), TlsError>,
) -> Result<(), TlsError> {
    let mut r = Reader::new(block);
    let mut seen = [false; 3];
    // At most one extension per 4 bytes: a bound the loop cannot exceed.
    for _ in 0..block.len() / 4 + 1 {
        if r.is_empty() {
            break;
        }
        let Ok(ext_type) = r.u16() else { break };
        let Ok(data) = r.vector(2) else { break };
        let slot = match ext_type {
            extension::SERVER_NAME => seen.get_mut(0),
            extension::ALPN => seen.get_mut(1),
            extension::SUPPORTED_VERSIONS => seen.get_mut(2),
            _ => continue,
        };
        if let Some(seen) = slot {
            if *seen {
                return Err(TlsError::Malformed);
            }
            *seen = true;
        }
        each(ext_type, data).map_err(|_| TlsError::Malformed)?;
    }
    Ok(())
}

/// What a ServerHello chose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerHello<'a> {
    pub legacy_version: u16,
    /// The random is the HelloRetryRequest value: the server asks for a second ClientHello.
    pub hello_retry_request: bool,
    pub cipher_suite: u16,
    /// supported_versions' selected_version (TLS 1.3), if seen.
    pub selected_version: Option<u16>,
    /// The ALPN protocol selected, when the ServerHello carries it (TLS 1.2 and below; in
    /// TLS 1.3 it travels in the encrypted EncryptedExtensions).
    pub alpn: Option<&'a [u8]>,
    pub complete: bool,
}

impl ServerHello<'_> {
    /// The negotiated version: selected_version where present, else `legacy_version`. `None`
    /// while the extensions that would say were not all seen.
    #[must_use]
    pub const fn negotiated_version(&self) -> Option<u16> {
        match self.selected_version {
            Some(v) => Some(v),
            None if self.complete => Some(self.legacy_version),
            None => None,
        }
    }
}

/// Parses a ServerHello message, its 4-byte handshake header first (or a HelloRetryRequest,
/// which shares its format), as [`parse_client_hello`].
pub fn parse_server_hello(message: &[u8]) -> Result<ServerHello<'_>, TlsError> {
    let (body, whole) = message_body(message, handshake_type::SERVER_HELLO)?;
    let mut r = Reader::new(body);
    let legacy_version = r.u16()?;
    let random = r.take(32)?;
    r.vector(1)?; // legacy_session_id_echo
    let cipher_suite = r.u16()?;
    r.u8()?; // legacy_compression_method
    let mut hello = ServerHello {
        legacy_version,
        hello_retry_request: random == HELLO_RETRY_REQUEST_RANDOM,
        cipher_suite,
        ..ServerHello::default()
    };
    let (block, complete) = extensions_block(&mut r, whole)?;
    hello.complete = complete;
    for_each_extension(block, |ext_type, data| {
        let mut d = Reader::new(data);
        match ext_type {
            extension::SUPPORTED_VERSIONS => hello.selected_version = Some(d.u16()?),
            extension::ALPN => {
                // Exactly one protocol name (RFC 7301 §3.1).
                let mut list = Reader::new(d.vector(2)?);
                hello.alpn = Some(list.vector(1)?);
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(hello)
}

/// An Alert record's body (RFC 8446 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alert {
    /// 1 = warning, 2 = fatal.
    pub level: u8,
    pub description: u8,
}

impl Alert {
    #[must_use]
    pub const fn level_name(&self) -> &'static str {
        match self.level {
            1 => "warning",
            2 => "fatal",
            _ => "unknown",
        }
    }

    /// The description's name in the IANA registry, `None` for an unassigned value.
    #[must_use]
    pub const fn description_name(&self) -> Option<&'static str> {
        Some(match self.description {
            0 => "close_notify",
            10 => "unexpected_message",
            20 => "bad_record_mac",
            21 => "decryption_failed",
            22 => "record_overflow",
            30 => "decompression_failure",
            40 => "handshake_failure",
            41 => "no_certificate",
            42 => "bad_certificate",
            43 => "unsupported_certificate",
            44 => "certificate_revoked",
            45 => "certificate_expired",
            46 => "certificate_unknown",
            47 => "illegal_parameter",
            48 => "unknown_ca",
            49 => "access_denied",
            50 => "decode_error",
            51 => "decrypt_error",
            60 => "export_restriction",
            70 => "protocol_version",
            71 => "insufficient_security",
            80 => "internal_error",
            86 => "inappropriate_fallback",
            90 => "user_canceled",
            100 => "no_renegotiation",
            109 => "missing_extension",
            110 => "unsupported_extension",
            111 => "certificate_unobtainable",
            112 => "unrecognized_name",
            113 => "bad_certificate_status_response",
            114 => "bad_certificate_hash_value",
            115 => "unknown_psk_identity",
            116 => "certificate_required",
            120 => "no_application_protocol",
            _ => return None,
        })
    }

    /// Whether the alert ends the connection: fatal, or a close_notify / user_canceled.
    #[must_use]
    pub const fn is_fatal(&self) -> bool {
        self.level == 2
    }
}

/// Parses an Alert record's body (two bytes; more is malformed).
pub fn parse_alert(body: &[u8]) -> Result<Alert, TlsError> {
    match body {
        [level, description] => Ok(Alert {
            level: *level,
            description: *description,
        }),
        [] | [_] => Err(TlsError::Incomplete),
        _ => Err(TlsError::Malformed),
    }
}

/// The version's name as OpenTelemetry's `tls.protocol.version` spells it ("1.2", "1.3").
#[must_use]
pub const fn version_name(v: u16) -> Option<&'static str> {
    Some(match v {
        version::SSL_3_0 => "3.0",
        version::TLS_1_0 => "1.0",
        version::TLS_1_1 => "1.1",
        version::TLS_1_2 => "1.2",
        version::TLS_1_3 => "1.3",
        _ => return None,
    })
}

/// The protocol's name for a version: "ssl" for 3.0, else "tls" (OpenTelemetry's
/// `tls.protocol.name`).
#[must_use]
pub const fn protocol_name(v: u16) -> &'static str {
    if v == version::SSL_3_0 { "ssl" } else { "tls" }
}

/// IANA names of the cipher suites a current OpenSSL, Go or rustls negotiates; `None` for the
/// rest (the caller shows the code point).
#[must_use]
pub const fn cipher_suite_name(suite: u16) -> Option<&'static str> {
    Some(match suite {
        0x1301 => "TLS_AES_128_GCM_SHA256",
        0x1302 => "TLS_AES_256_GCM_SHA384",
        0x1303 => "TLS_CHACHA20_POLY1305_SHA256",
        0x1304 => "TLS_AES_128_CCM_SHA256",
        0x1305 => "TLS_AES_128_CCM_8_SHA256",
        0xc02b => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        0xc02c => "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        0xc02f => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        0xc030 => "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        0xcca8 => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        0xcca9 => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        0x009c => "TLS_RSA_WITH_AES_128_GCM_SHA256",
        0x009d => "TLS_RSA_WITH_AES_256_GCM_SHA384",
        _ => return None,
    })
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
