//! HTTP/1.x message heads (RFC 9112), parsed from the byte prefixes the kernel copies.
//!
//! A head is the start line plus the field lines up to the blank line (RFC 9112 §2.1). The
//! kernel copies a bounded prefix of each write or read, so a head may be cut anywhere: the
//! parsers then return what is certain (the start line and every *complete* field line) with
//! `complete == false`, and never a field line whose terminator has not been seen, so a
//! truncated `traceparent` value is never returned as if it were whole.
//!
//! The parsers are strict where laxity is a request-smuggling or misattribution risk (bare CR,
//! obs-fold, whitespace before the colon, control bytes, conflicting `Content-Length`) and
//! lenient where RFC 9112 lets recipients be (bare LF line endings, one empty line before a
//! request line, a missing reason phrase). They do not allocate, never panic, and every loop is
//! bounded by the input length or by [`MAX_HEADERS`].

// The parsers take untrusted bytes: any panic is a bug. Tests opt out below.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use core::{fmt, iter::FusedIterator};

/// Most field lines a head may have; one more is [`HttpError::TooManyHeaders`]. Also bounds
/// the parsers' outer loop by a constant, as the eBPF verifier wants.
pub const MAX_HEADERS: usize = 64;

/// Why bytes are not (yet) an HTTP/1.x message head, or why a field is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpError {
    /// The start line has no line terminator yet. More bytes may complete it; if the kernel
    /// copied a prefix that ends inside the start line (a long target), none will.
    Incomplete,
    /// The request method is empty, holds a byte that is not a `tchar`, or is not followed by a
    /// single space (RFC 9112 §3, RFC 9110 §9.1 `method = token`).
    InvalidMethod,
    /// The request target is missing or empty, or holds a control byte (`0x00`-`0x1f`, `0x7f`).
    /// Non-ASCII bytes are accepted: this is a tracer, not a gatekeeper (RFC 9112 §3.2).
    InvalidTarget,
    /// The version is not `HTTP/<digit>.<digit>` exactly (case-sensitive, RFC 9112 §2.3), or
    /// is not followed by a single space (status line) or the end of the line (request line).
    InvalidVersion,
    /// A well-formed version other than `HTTP/1.0` and `HTTP/1.1`.
    UnsupportedVersion,
    /// The status code is not three digits followed by a space or the end of the line
    /// (RFC 9112 §4).
    InvalidStatus,
    /// The reason phrase holds a control byte other than HTAB (RFC 9112 §4).
    InvalidReason,
    /// A CR not followed by LF. RFC 9112 §2.2: a recipient must treat the element as invalid
    /// (or replace it with SP, which would change what the peer sees).
    BareCr,
    /// A line in the field section starts with SP or HTAB: either obs-fold, deprecated and
    /// rejectable by RFC 9112 §5.2, or whitespace between the start line and the first field,
    /// which RFC 9112 §2.2 requires rejecting or ignoring.
    ObsFold,
    /// A field name is empty or holds a byte that is not a `tchar` (RFC 9110 §5.1), including
    /// whitespace before the colon, which RFC 9112 §5.1 requires rejecting.
    InvalidHeaderName,
    /// A field line has no colon (RFC 9112 §5).
    MissingColon,
    /// A field value holds a control byte other than HTAB, or DEL (RFC 9110 §5.5).
    InvalidHeaderValue,
    /// More than [`MAX_HEADERS`] field lines.
    TooManyHeaders,
    /// A `Content-Length` value or list element is not `1*DIGIT` (RFC 9110 §8.6).
    InvalidContentLength,
    /// `Content-Length` values that differ (RFC 9112 §6.3, item 5: unrecoverable framing error).
    ConflictingContentLength,
    /// A `Content-Length` above `u64::MAX`.
    ContentLengthOverflow,
}

impl HttpError {
    /// A stable snake_case reason, usable as a metric label. Never changes for a variant.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Incomplete => "incomplete",
            Self::InvalidMethod => "invalid_method",
            Self::InvalidTarget => "invalid_target",
            Self::InvalidVersion => "invalid_version",
            Self::UnsupportedVersion => "unsupported_version",
            Self::InvalidStatus => "invalid_status",
            Self::InvalidReason => "invalid_reason",
            Self::BareCr => "bare_cr",
            Self::ObsFold => "obs_fold",
            Self::InvalidHeaderName => "invalid_header_name",
            Self::MissingColon => "missing_colon",
            Self::InvalidHeaderValue => "invalid_header_value",
            Self::TooManyHeaders => "too_many_headers",
            Self::InvalidContentLength => "invalid_content_length",
            Self::ConflictingContentLength => "conflicting_content_length",
            Self::ContentLengthOverflow => "content_length_overflow",
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for HttpError {}

/// The field lines of a head that were complete in the buffer, validated, in order.
///
/// Lookups are linear scans (at most [`MAX_HEADERS`] lines): heads are small and this keeps the
/// type free of allocation and of a fixed-size index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers<'a> {
    /// Complete field lines, each with its terminator; excludes the blank line.
    block: &'a [u8],
    len: usize,
}

impl<'a> Headers<'a> {
    /// Number of complete field lines.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no complete field lines.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All complete field lines as `(name, value)`, in order; values are OWS-trimmed.
    #[must_use]
    pub const fn iter(&self) -> HeaderIter<'a> {
        HeaderIter { rest: self.block }
    }

    /// The value of the first field line named `name` (ASCII case-insensitive, RFC 9110 §5.1),
    /// without leading and trailing OWS (RFC 9110 §5.5). Later lines with the same name are
    /// ignored; use [`Self::get_all`] to see them.
    #[must_use]
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    /// The values of every field line named `name`, in order (for list-valued fields, and to
    /// detect duplicates of singleton fields such as `traceparent`).
    #[must_use]
    pub const fn get_all<'n>(&self, name: &'n [u8]) -> HeaderValues<'a, 'n> {
        HeaderValues {
            iter: self.iter(),
            name,
        }
    }

    /// The body length declared by `Content-Length` (RFC 9110 §8.6, RFC 9112 §6.3).
    ///
    /// `Ok(None)` when absent. Several field lines, or a comma-separated list, are accepted if
    /// every element is the same number (RFC 9110 §8.6 allows a recipient to).
    /// Framing precedence (`Transfer-Encoding` overrides `Content-Length`, RFC 9112 §6.3) is
    /// the caller's.
    ///
    /// # Errors
    ///
    /// [`HttpError::ConflictingContentLength`] when elements differ;
    /// [`HttpError::InvalidContentLength`] when one is not `1*DIGIT` (sign, inner space, empty
    /// element, hex); [`HttpError::ContentLengthOverflow`] above `u64::MAX`. RFC 9112 §6.3 item
    /// 5: each makes the message framing invalid.
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        self.select().content_length
    }

    /// Whether the last transfer coding is `chunked` (RFC 9112 §6.1, §6.3 item 4), across all
    /// `Transfer-Encoding` field lines taken as one list, case-insensitive, ignoring empty list
    /// elements and coding parameters. `gzip, chunked` is chunked; `chunked, gzip` is not (a
    /// request so framed is invalid; a response is then delimited by connection close).
    #[must_use]
    pub fn is_chunked(&self) -> bool {
        self.select().chunked
    }

    /// The body framing and the W3C trace context fields, from one pass over the field lines
    /// (a lookup per field would scan them once each).
    #[must_use]
    pub fn select(&self) -> SelectedFields<'a> {
        let mut selected = SelectedFields {
            traceparent: None,
            traceparent_lines: 0,
            tracestate: None,
            content_length: Ok(None),
            chunked: false,
        };
        let mut last_coding: &[u8] = &[];
        for (name, value) in self.iter() {
            if name.eq_ignore_ascii_case(b"traceparent") {
                selected.traceparent.get_or_insert(value);
                selected.traceparent_lines += 1;
            } else if name.eq_ignore_ascii_case(b"tracestate") {
                selected.tracestate.get_or_insert(value);
            } else if name.eq_ignore_ascii_case(b"content-length") {
                selected.content_length = add_content_length(selected.content_length, value);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                last_coding = last_list_element(value).unwrap_or(last_coding);
            }
        }
        let coding = last_coding.split(|&b| b == b';').next().unwrap_or_default();
        selected.chunked = trim_ows(coding).eq_ignore_ascii_case(b"chunked");
        selected
    }

    /// Whether any `Connection` field line lists `option`, case-insensitive (RFC 9110 §7.6.1).
    #[must_use]
    pub fn has_connection_option(&self, option: &[u8]) -> bool {
        self.get_all(b"connection").any(|value| {
            value
                .split(|&b| b == b',')
                .any(|o| trim_ows(o).eq_ignore_ascii_case(option))
        })
    }

    /// RFC 9112 §9.3: `close` ends the connection after this message; otherwise HTTP/1.1
    /// persists, and HTTP/1.0 persists only with `keep-alive`.
    fn connection_close(&self, minor_version: u8) -> bool {
        if self.has_connection_option(b"close") {
            return true;
        }
        minor_version == 0 && !self.has_connection_option(b"keep-alive")
    }
}

impl<'a> IntoIterator for Headers<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = HeaderIter<'a>;

    fn into_iter(self) -> HeaderIter<'a> {
        self.iter()
    }
}

/// Iterator over `(name, value)` of complete field lines; see [`Headers::iter`].
#[derive(Clone, Debug)]
pub struct HeaderIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // The parser validated every line; split defensively anyway (stop, never panic).
        let newline = self.rest.iter().position(|&b| b == b'\n')?;
        let line = self.rest.get(..newline)?;
        self.rest = self.rest.get(newline + 1..).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let name = line.get(..colon)?;
        let value = line.get(colon + 1..)?;
        Some((name, trim_ows(value)))
    }
}

impl FusedIterator for HeaderIter<'_> {}

/// Iterator over the values of the field lines with one name; see [`Headers::get_all`].
#[derive(Clone, Debug)]
pub struct HeaderValues<'a, 'n> {
    iter: HeaderIter<'a>,
    name: &'n [u8],
}

impl<'a> Iterator for HeaderValues<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let name = self.name;
        self.iter
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

impl FusedIterator for HeaderValues<'_, '_> {}

/// What a tracer reads of a head, found in one pass over its complete field lines; see
/// [`Headers::select`]. Field names match ASCII case-insensitively, values are OWS-trimmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectedFields<'a> {
    /// The first `traceparent` value.
    pub traceparent: Option<&'a [u8]>,
    /// How many `traceparent` field lines there are: with more than one, which is right is
    /// unknowable (W3C Trace Context §3.2).
    pub traceparent_lines: usize,
    /// The first `tracestate` value.
    pub tracestate: Option<&'a [u8]>,
    /// As [`Headers::content_length`].
    pub content_length: Result<Option<u64>, HttpError>,
    /// As [`Headers::is_chunked`].
    pub chunked: bool,
}

/// A parsed HTTP/1.x request head (RFC 9112 §3), possibly truncated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// The method token, case preserved (methods are case-sensitive, RFC 9110 §9.1).
    pub method: &'a [u8],
    /// The request target as sent: origin-form (`/a?b`), absolute-form (`http://h/a`),
    /// authority-form (`h:443`, CONNECT) or asterisk-form (`*`). Not decoded.
    pub target: &'a [u8],
    /// `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub minor_version: u8,
    /// The complete field lines.
    pub headers: Headers<'a>,
    /// Bytes from the start of the buffer up to and including the blank line ending the head
    /// (including an ignored leading empty line, if any); `None` while the blank line has not
    /// been seen. The body, if any, starts here.
    pub head_len: Option<usize>,
    /// `head_len.is_some()`: the blank line was seen, so no field line is missing.
    pub complete: bool,
}

impl<'a> RequestHead<'a> {
    /// The target up to, not including, the first `?` (query) or `#` (fragment, which a client
    /// should not send, RFC 9112 §3.2). Absolute-form keeps its scheme and authority.
    #[must_use]
    pub fn path(&self) -> &'a [u8] {
        let end = self
            .target
            .iter()
            .position(|&b| b == b'?' || b == b'#')
            .unwrap_or(self.target.len());
        self.target.get(..end).unwrap_or(self.target)
    }

    /// [`Headers::get`]: the first field line named `name`, case-insensitive, OWS-trimmed.
    #[must_use]
    pub fn header(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.headers.get(name)
    }

    /// [`Headers::content_length`]. Only final when [`Self::complete`].
    ///
    /// # Errors
    ///
    /// As [`Headers::content_length`].
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        self.headers.content_length()
    }

    /// [`Headers::is_chunked`]. Only final when [`Self::complete`]. RFC 9112 §6.1: a
    /// `Transfer-Encoding` in an HTTP/1.0 message means faulty framing; that check is the
    /// caller's.
    #[must_use]
    pub fn is_chunked(&self) -> bool {
        self.headers.is_chunked()
    }

    /// Whether the connection closes after this exchange (RFC 9112 §9.3): a `close` option in
    /// `Connection`, or HTTP/1.0 without `keep-alive`. Only final when [`Self::complete`].
    #[must_use]
    pub fn connection_close(&self) -> bool {
        self.headers.connection_close(self.minor_version)
    }
}

/// A parsed HTTP/1.x response head (RFC 9112 §4), possibly truncated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    /// `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub minor_version: u8,
    /// The three-digit status code, `0`..=`999` as sent; its meaning is the caller's.
    pub status: u16,
    /// The reason phrase, possibly empty; a client should ignore it (RFC 9112 §4).
    pub reason: &'a [u8],
    /// The complete field lines.
    pub headers: Headers<'a>,
    /// Bytes up to and including the blank line ending the head; `None` while not seen.
    pub head_len: Option<usize>,
    /// `head_len.is_some()`.
    pub complete: bool,
}

impl<'a> ResponseHead<'a> {
    /// [`Headers::get`]: the first field line named `name`, case-insensitive, OWS-trimmed.
    #[must_use]
    pub fn header(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.headers.get(name)
    }

    /// [`Headers::content_length`]. Whether a response has a body at all also depends on the
    /// request method and the status (RFC 9112 §6.3 items 1-2): the caller's.
    ///
    /// # Errors
    ///
    /// As [`Headers::content_length`].
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        self.headers.content_length()
    }

    /// [`Headers::is_chunked`].
    #[must_use]
    pub fn is_chunked(&self) -> bool {
        self.headers.is_chunked()
    }

    /// Whether the connection closes after this response (RFC 9112 §9.3).
    #[must_use]
    pub fn connection_close(&self) -> bool {
        self.headers.connection_close(self.minor_version)
    }
}

/// Parses an HTTP/1.0 or HTTP/1.1 request head from the start of `buf`.
///
/// `request-line = method SP request-target SP HTTP-version`, then field lines, then a blank
/// line (RFC 9112 §2.1, §3). Lines end in CRLF or a bare LF (RFC 9112 §2.2 lets a recipient
/// accept LF). One empty line before the request line is skipped (RFC 9112 §2.2: a server
/// SHOULD ignore at least one).
///
/// Returns [`HttpError::Incomplete`] until the request line is terminated. After that, a
/// buffer without the blank line yields `Ok` with `complete == false` and only the field
/// lines whose terminator was seen; bytes after the last terminator are not returned (but a
/// bare CR among them is already an error). Bytes after the blank line (the body, or the next
/// request) are not looked at.
///
/// # Errors
///
/// [`HttpError::Incomplete`] before the request line's terminator; otherwise the variant
/// naming the first rule broken, in buffer order (each variant's doc gives the rule). Errors are
/// stable under extension: if a prefix of a buffer fails with anything but `Incomplete`, the
/// whole buffer fails with the same error.
pub fn parse_request_head(buf: &[u8]) -> Result<RequestHead<'_>, HttpError> {
    let start = match buf {
        [b'\r', b'\n', ..] => 2,
        [b'\n', ..] => 1,
        _ => 0,
    };
    let (line, next) = next_line(buf, start)?.ok_or(HttpError::Incomplete)?;
    let (method, target, minor_version) = parse_request_line(line)?;
    let (headers, head_len) = parse_fields(buf, next)?;
    Ok(RequestHead {
        method,
        target,
        minor_version,
        headers,
        head_len,
        complete: head_len.is_some(),
    })
}

/// Parses an HTTP/1.0 or HTTP/1.1 response head from the start of `buf`.
///
/// `status-line = HTTP-version SP status-code SP [ reason-phrase ]` (RFC 9112 §4); the SP
/// before an empty reason may be missing, as many servers omit it. Truncation, line endings and
/// fields as in [`parse_request_head`]; no leading empty line is skipped.
///
/// # Errors
///
/// As [`parse_request_head`], with [`HttpError::InvalidStatus`] and
/// [`HttpError::InvalidReason`] for the status line's own parts.
pub fn parse_response_head(buf: &[u8]) -> Result<ResponseHead<'_>, HttpError> {
    let (line, next) = next_line(buf, 0)?.ok_or(HttpError::Incomplete)?;
    let (minor_version, status, reason) = parse_status_line(line)?;
    let (headers, head_len) = parse_fields(buf, next)?;
    Ok(ResponseHead {
        minor_version,
        status,
        reason,
        headers,
        head_len,
        complete: head_len.is_some(),
    })
}

/// The methods [`looks_like_request`] recognises: RFC 9110 §9.3 and PATCH (RFC 5789).
pub const KNOWN_METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// Whether `buf` starts with a known method (case-sensitive) followed by a space: a cheap test
/// of whether bytes on a socket begin an HTTP/1.x request, looking at no more than 8 bytes.
/// False for a prefix too short to tell, for extension methods, and for the HTTP/2 preface
/// (`PRI * HTTP/2.0`).
#[must_use]
pub fn looks_like_request(buf: &[u8]) -> bool {
    KNOWN_METHODS
        .iter()
        .any(|m| buf.strip_prefix(*m).and_then(<[u8]>::first) == Some(&b' '))
}

/// Whether `buf` starts with `HTTP/1.`: a cheap test of whether bytes on a socket begin an
/// HTTP/1.x response.
#[must_use]
pub fn looks_like_response(buf: &[u8]) -> bool {
    buf.starts_with(b"HTTP/1.")
}

/// The line starting at `start`: `Ok(Some((content, next_start)))` with the terminator (LF or
/// CRLF) removed, `Ok(None)` if no terminator is in `buf` yet, [`HttpError::BareCr`] for a CR
/// followed by anything but LF.
fn next_line(buf: &[u8], start: usize) -> Result<Option<(&[u8], usize)>, HttpError> {
    let rest = buf.get(start..).unwrap_or_default();
    for (i, &b) in rest.iter().enumerate() {
        let terminator = match b {
            b'\n' => 1,
            b'\r' => match rest.get(i + 1) {
                Some(b'\n') => 2,
                Some(_) => return Err(HttpError::BareCr),
                None => return Ok(None),
            },
            _ => continue,
        };
        return Ok(Some((
            rest.get(..i).unwrap_or_default(),
            start + i + terminator,
        )));
    }
    Ok(None)
}

fn parse_request_line(line: &[u8]) -> Result<(&[u8], &[u8], u8), HttpError> {
    let method_len = line
        .iter()
        .position(|&b| !is_tchar(b))
        .unwrap_or(line.len());
    let (method, rest) = line
        .split_at_checked(method_len)
        .ok_or(HttpError::InvalidMethod)?;
    let rest = match rest {
        _ if method.is_empty() => return Err(HttpError::InvalidMethod),
        [b' ', rest @ ..] => rest,
        [] => return Err(HttpError::InvalidTarget),
        _ => return Err(HttpError::InvalidMethod),
    };
    let target_len = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let (target, rest) = rest
        .split_at_checked(target_len)
        .ok_or(HttpError::InvalidTarget)?;
    if target.is_empty() || target.iter().any(|&b| b.is_ascii_control()) {
        return Err(HttpError::InvalidTarget);
    }
    let [b' ', version @ ..] = rest else {
        return Err(HttpError::InvalidVersion);
    };
    Ok((method, target, parse_version(version)?))
}

fn parse_status_line(line: &[u8]) -> Result<(u8, u16, &[u8]), HttpError> {
    let (version, rest) = line.split_at_checked(8).ok_or(HttpError::InvalidVersion)?;
    let minor_version = parse_version(version)?;
    let [b' ', rest @ ..] = rest else {
        return Err(HttpError::InvalidVersion);
    };
    let (code, rest) = rest.split_at_checked(3).ok_or(HttpError::InvalidStatus)?;
    let mut status = 0u16;
    for &d in code {
        if !d.is_ascii_digit() {
            return Err(HttpError::InvalidStatus);
        }
        status = status * 10 + u16::from(d - b'0');
    }
    let reason = match rest {
        [] => rest,
        [b' ', reason @ ..] => reason,
        _ => return Err(HttpError::InvalidStatus),
    };
    if reason.iter().any(|&b| b != b'\t' && b.is_ascii_control()) {
        return Err(HttpError::InvalidReason);
    }
    Ok((minor_version, status, reason))
}

/// `HTTP-version = "HTTP" "/" DIGIT "." DIGIT` (RFC 9112 §2.3), of which 1.0 and 1.1.
fn parse_version(version: &[u8]) -> Result<u8, HttpError> {
    match *version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            match (major, minor) {
                (b'1', b'0') => Ok(0),
                (b'1', b'1') => Ok(1),
                _ => Err(HttpError::UnsupportedVersion),
            }
        }
        _ => Err(HttpError::InvalidVersion),
    }
}

/// Reads field lines from `start` to the blank line. Returns the complete lines and, if the
/// blank line was seen, the offset just past it.
fn parse_fields(buf: &[u8], start: usize) -> Result<(Headers<'_>, Option<usize>), HttpError> {
    let mut pos = start;
    // Each turn either returns or consumes one field line, so `len` counts the lines consumed
    // and MAX_HEADERS + 1 turns suffice.
    for len in 0..=MAX_HEADERS {
        let line = next_line(buf, pos)?;
        let block = buf.get(start..pos).unwrap_or_default();
        let Some((line, next)) = line else {
            return Ok((Headers { block, len }, None));
        };
        if line.is_empty() {
            return Ok((Headers { block, len }, Some(next)));
        }
        if len == MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        validate_field_line(line)?;
        pos = next;
    }
    Err(HttpError::TooManyHeaders)
}

/// `field-line = field-name ":" OWS field-value OWS` (RFC 9112 §5), `field-name = token`,
/// `field-value` bytes: HTAB, SP, VCHAR, obs-text (RFC 9110 §5.5).
fn validate_field_line(line: &[u8]) -> Result<(), HttpError> {
    if let [b' ' | b'\t', ..] = line {
        return Err(HttpError::ObsFold);
    }
    let name_len = line.iter().position(|&b| !is_tchar(b));
    let Some((b':', value)) = name_len
        .and_then(|n| line.get(n..))
        .and_then(<[u8]>::split_first)
    else {
        return Err(match name_len {
            None => HttpError::MissingColon,
            Some(_) => HttpError::InvalidHeaderName,
        });
    };
    if name_len == Some(0) {
        return Err(HttpError::InvalidHeaderName);
    }
    if value.iter().any(|&b| b != b'\t' && b.is_ascii_control()) {
        return Err(HttpError::InvalidHeaderValue);
    }
    Ok(())
}

/// `1*DIGIT` as a u64 (RFC 9110 §8.6).
fn parse_decimal(digits: &[u8]) -> Result<u64, HttpError> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::InvalidContentLength);
    }
    let mut n: u64 = 0;
    for &d in digits {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(HttpError::ContentLengthOverflow)?;
    }
    Ok(n)
}

/// `tchar` (RFC 9110 §5.6.2): a table lookup, as every byte of every method and field name
/// is tested (the rule's comparisons showed in the agent's profile).
fn is_tchar(b: u8) -> bool {
    TCHAR.get(usize::from(b)).copied().unwrap_or(false)
}

/// [`tchar_rule`] for every byte value.
#[expect(
    clippy::indexing_slicing,
    reason = "the index stays below the table's length; evaluated at compile time"
)]
const TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < table.len() {
        table[b] = tchar_rule(b as u8);
        b += 1;
    }
    table
};

/// `tchar` (RFC 9110 §5.6.2), the rule [`TCHAR`] tabulates.
const fn tchar_rule(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Folds one `Content-Length` field value into what the earlier ones declared: every list
/// element must be the same `1*DIGIT` (RFC 9110 §8.6); the first error, in order, sticks.
fn add_content_length(
    found: Result<Option<u64>, HttpError>,
    value: &[u8],
) -> Result<Option<u64>, HttpError> {
    let mut found = found?;
    for element in value.split(|&b| b == b',') {
        let n = parse_decimal(trim_ows(element))?;
        match found {
            Some(prev) if prev != n => return Err(HttpError::ConflictingContentLength),
            _ => found = Some(n),
        }
    }
    Ok(found)
}

/// The last non-empty element of a comma-separated list value, OWS-trimmed.
fn last_list_element(value: &[u8]) -> Option<&[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .rfind(|element| !element.is_empty())
}

/// Strips leading and trailing OWS (SP / HTAB, RFC 9110 §5.6.3).
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    #![expect(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        reason = "tests index known-good fixtures and panic on failure"
    )]

    extern crate std;

    use std::{format, string::String, vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    const TRACEPARENT: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A request as curl sends it, with a traceparent in the middle of the head and a body.
    const REQUEST: &[u8] = b"POST /api/v1/orders?id=7&x=%20#frag HTTP/1.1\r\n\
        Host: shop.example:8080\r\n\
        User-Agent: curl/8.5.0\r\n\
        Accept: */*\r\n\
        traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
        tracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\r\n\
        Content-Type: application/json\r\n\
        Content-Length: 13\r\n\
        \r\n\
        {\"qty\": 1234}";

    const RESPONSE: &[u8] = b"HTTP/1.1 201 Created\r\n\
        Content-Type: application/json\r\n\
        traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-b9c7c989f97918e1-01\r\n\
        Transfer-Encoding: chunked\r\n\
        \r\n\
        5\r\nhello\r\n0\r\n\r\n";

    fn req(s: &str) -> Result<RequestHead<'_>, HttpError> {
        parse_request_head(s.as_bytes())
    }

    fn resp(s: &str) -> Result<ResponseHead<'_>, HttpError> {
        parse_response_head(s.as_bytes())
    }

    #[test]
    fn full_request() {
        let h = parse_request_head(REQUEST).unwrap();
        assert_eq!(h.method, b"POST");
        assert_eq!(h.target, b"/api/v1/orders?id=7&x=%20#frag");
        assert_eq!(h.path(), b"/api/v1/orders");
        assert_eq!(h.minor_version, 1);
        assert!(h.complete);
        let body = REQUEST.iter().position(|&b| b == b'{').unwrap();
        assert_eq!(h.head_len, Some(body));
        assert_eq!(h.headers.len(), 7);
        assert_eq!(h.header(b"traceparent"), Some(TRACEPARENT));
        assert_eq!(h.header(b"TraceParent"), Some(TRACEPARENT));
        assert_eq!(h.header(b"HOST"), Some(&b"shop.example:8080"[..]));
        assert_eq!(h.header(b"trace-parent"), None);
        assert_eq!(h.content_length(), Ok(Some(13)));
        assert!(!h.is_chunked());
        assert!(!h.connection_close());
        let names: Vec<&[u8]> = h.headers.iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], b"Host");
        assert_eq!(names[6], b"Content-Length");
    }

    #[test]
    fn full_response() {
        let h = parse_response_head(RESPONSE).unwrap();
        assert_eq!(
            (h.minor_version, h.status, h.reason),
            (1, 201, &b"Created"[..])
        );
        assert!(h.complete);
        let blank = RESPONSE.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        assert_eq!(h.head_len, Some(blank + 4));
        assert!(h.is_chunked());
        assert_eq!(h.content_length(), Ok(None));
        assert_eq!(
            h.header(b"traceparent"),
            Some(&b"00-4bf92f3577b34da6a3ce929d0e0e4736-b9c7c989f97918e1-01"[..])
        );
    }

    #[test]
    fn request_lines() {
        use HttpError::*;
        type Case<'a> = (&'a str, Result<(&'a str, &'a str, u8), HttpError>);
        let cases: &[Case<'_>] = &[
            ("GET / HTTP/1.1\r\n\r\n", Ok(("GET", "/", 1))),
            ("GET / HTTP/1.0\r\n\r\n", Ok(("GET", "/", 0))),
            ("OPTIONS * HTTP/1.1\r\n\r\n", Ok(("OPTIONS", "*", 1))),
            (
                "CONNECT h.example:443 HTTP/1.1\r\n\r\n",
                Ok(("CONNECT", "h.example:443", 1)),
            ),
            (
                "GET http://h/a?b HTTP/1.1\r\n\r\n",
                Ok(("GET", "http://h/a?b", 1)),
            ),
            // Extension methods are tokens too; methods are case-sensitive, so kept as sent.
            ("M-SEARCH * HTTP/1.1\r\n\r\n", Ok(("M-SEARCH", "*", 1))),
            ("get / HTTP/1.1\r\n\r\n", Ok(("get", "/", 1))),
            // obs-text in the target is kept.
            (
                "GET /caf\u{e9} HTTP/1.1\r\n\r\n",
                Ok(("GET", "/caf\u{e9}", 1)),
            ),
            // Bare LF endings, and one leading empty line (RFC 9112 §2.2).
            ("GET / HTTP/1.1\n\n", Ok(("GET", "/", 1))),
            ("GET / HTTP/1.1\r\nA: b\n\r\n", Ok(("GET", "/", 1))),
            ("\r\nGET / HTTP/1.1\r\n\r\n", Ok(("GET", "/", 1))),
            ("\nGET / HTTP/1.1\r\n\r\n", Ok(("GET", "/", 1))),
            ("\r\n\r\nGET / HTTP/1.1\r\n\r\n", Err(InvalidMethod)),
            // Method.
            (" GET / HTTP/1.1\r\n\r\n", Err(InvalidMethod)),
            ("G(ET / HTTP/1.1\r\n\r\n", Err(InvalidMethod)),
            ("GET\t/ HTTP/1.1\r\n\r\n", Err(InvalidMethod)),
            ("\r\n", Err(Incomplete)),
            // Target.
            ("GET\r\n\r\n", Err(InvalidTarget)),
            ("GET \r\n\r\n", Err(InvalidTarget)),
            ("GET  / HTTP/1.1\r\n\r\n", Err(InvalidTarget)),
            ("GET /a\x01b HTTP/1.1\r\n\r\n", Err(InvalidTarget)),
            ("GET /a\tb HTTP/1.1\r\n\r\n", Err(InvalidTarget)),
            ("GET /a\x7f HTTP/1.1\r\n\r\n", Err(InvalidTarget)),
            // Version.
            ("GET /\r\n\r\n", Err(InvalidVersion)),
            ("GET / \r\n\r\n", Err(InvalidVersion)),
            ("GET /a b HTTP/1.1\r\n\r\n", Err(InvalidVersion)),
            ("GET / HTTP/1.1 \r\n\r\n", Err(InvalidVersion)),
            ("GET / http/1.1\r\n\r\n", Err(InvalidVersion)),
            ("GET / HTTP/1.10\r\n\r\n", Err(InvalidVersion)),
            ("GET / HTTP/11\r\n\r\n", Err(InvalidVersion)),
            ("GET / HTTP/1.x\r\n\r\n", Err(InvalidVersion)),
            ("GET / HTTP/2.0\r\n\r\n", Err(UnsupportedVersion)),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Err(UnsupportedVersion)),
            ("GET / HTTP/1.2\r\n\r\n", Err(UnsupportedVersion)),
            ("GET / HTTP/0.9\r\n\r\n", Err(UnsupportedVersion)),
            // Bare CR anywhere in the request line.
            ("GET /a\rb HTTP/1.1\r\n\r\n", Err(BareCr)),
            ("GET / HTTP/1.1\r\r\n\r\n", Err(BareCr)),
            ("GET / HTTP/1.1\rX", Err(BareCr)),
            // Unterminated request line.
            ("", Err(Incomplete)),
            ("GET", Err(Incomplete)),
            ("GET / HTTP/1.1", Err(Incomplete)),
            ("GET / HTTP/1.1\r", Err(Incomplete)),
        ];
        for (input, want) in cases {
            let got = req(input).map(|h| (h.method, h.target, h.minor_version));
            let want = want.map(|(m, t, v)| (m.as_bytes(), t.as_bytes(), v));
            assert_eq!(got, want, "input {input:?}");
        }
    }

    #[test]
    fn status_lines() {
        use HttpError::*;
        type Case<'a> = (&'a str, Result<(u8, u16, &'a str), HttpError>);
        let cases: &[Case<'_>] = &[
            ("HTTP/1.1 200 OK\r\n\r\n", Ok((1, 200, "OK"))),
            ("HTTP/1.0 404 Not Found\r\n\r\n", Ok((0, 404, "Not Found"))),
            ("HTTP/1.1 204\r\n\r\n", Ok((1, 204, ""))),
            ("HTTP/1.1 204 \r\n\r\n", Ok((1, 204, ""))),
            (
                "HTTP/1.1 500 \tweird\t reason \r\n\r\n",
                Ok((1, 500, "\tweird\t reason ")),
            ),
            (
                "HTTP/1.1 200 D\u{e9}j\u{e0} vu\n\n",
                Ok((1, 200, "D\u{e9}j\u{e0} vu")),
            ),
            ("HTTP/1.1 999 X\r\n\r\n", Ok((1, 999, "X"))),
            ("HTTP/1.1 099 X\r\n\r\n", Ok((1, 99, "X"))),
            ("HTTP/1.1 20 OK\r\n\r\n", Err(InvalidStatus)),
            ("HTTP/1.1 2000 OK\r\n\r\n", Err(InvalidStatus)),
            ("HTTP/1.1 20a OK\r\n\r\n", Err(InvalidStatus)),
            ("HTTP/1.1 -20 OK\r\n\r\n", Err(InvalidStatus)),
            ("HTTP/1.1 200OK\r\n\r\n", Err(InvalidStatus)),
            ("HTTP/1.1 \r\n\r\n", Err(InvalidStatus)),
            ("HTTP/1.1  200 OK\r\n\r\n", Err(InvalidStatus)),
            ("HTTP/1.1 200 O\x00K\r\n\r\n", Err(InvalidReason)),
            ("HTTP/1.1 200 OK\x7f\r\n\r\n", Err(InvalidReason)),
            ("HTTP/1.1 200 O\rK\r\n\r\n", Err(BareCr)),
            ("HTTP/1.1\r\n\r\n", Err(InvalidVersion)),
            ("HTTP/1.1\t200 OK\r\n\r\n", Err(InvalidVersion)),
            ("http/1.1 200 OK\r\n\r\n", Err(InvalidVersion)),
            ("HTTP/1 200 OK\r\n\r\n", Err(InvalidVersion)),
            ("\r\nHTTP/1.1 200 OK\r\n\r\n", Err(InvalidVersion)),
            ("HTTP/2.0 200 OK\r\n\r\n", Err(UnsupportedVersion)),
            ("HTTP/1.1 200 OK", Err(Incomplete)),
            ("", Err(Incomplete)),
        ];
        for (input, want) in cases {
            let got = resp(input).map(|h| (h.minor_version, h.status, h.reason));
            let want = want.map(|(v, s, r)| (v, s, r.as_bytes()));
            assert_eq!(got, want, "input {input:?}");
        }
    }

    #[test]
    fn field_lines() {
        use HttpError::*;
        let cases: &[(&str, Result<usize, HttpError>)] = &[
            ("A: b\r\n", Ok(1)),
            ("A:b\r\n", Ok(1)),
            ("A:\r\n", Ok(1)),
            ("A: \t b \t\r\n", Ok(1)),
            ("A: b\tc\r\n", Ok(1)),
            ("A: caf\u{e9}\r\n", Ok(1)),
            ("!#$%&'*+-.^_`|~09azAZ: v\r\n", Ok(1)),
            ("A: b\r\nA: c\r\nB: d\n", Ok(3)),
            // obs-fold, and whitespace before the first field line.
            ("A: b\r\n c\r\n", Err(ObsFold)),
            ("A: b\r\n\tc\r\n", Err(ObsFold)),
            (" A: b\r\n", Err(ObsFold)),
            // Names.
            ("A b: c\r\n", Err(InvalidHeaderName)),
            ("A : b\r\n", Err(InvalidHeaderName)),
            ("A\t: b\r\n", Err(InvalidHeaderName)),
            (": b\r\n", Err(InvalidHeaderName)),
            ("A(b): c\r\n", Err(InvalidHeaderName)),
            ("A\"b: c\r\n", Err(InvalidHeaderName)),
            ("A/b: c\r\n", Err(InvalidHeaderName)),
            ("caf\u{e9}: b\r\n", Err(InvalidHeaderName)),
            ("A\x00: b\r\n", Err(InvalidHeaderName)),
            ("A\r\n", Err(MissingColon)),
            ("A b\r\n", Err(InvalidHeaderName)),
            // Values.
            ("A: b\x00c\r\n", Err(InvalidHeaderValue)),
            ("A: b\x1bc\r\n", Err(InvalidHeaderValue)),
            ("A: b\x7f\r\n", Err(InvalidHeaderValue)),
            ("A: b\x0bc\r\n", Err(InvalidHeaderValue)),
            ("A: b\rc\r\n", Err(BareCr)),
            ("A: b\r\r\n", Err(BareCr)),
            ("A: b\r\nB: c\rd", Err(BareCr)),
        ];
        for (fields, want) in cases {
            let input = format!("GET / HTTP/1.1\r\n{fields}\r\n");
            let got = req(&input).map(|h| h.headers.len());
            assert_eq!(got, *want, "fields {fields:?}");
            let input = format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
            let got = resp(&input).map(|h| h.headers.len());
            assert_eq!(got, *want, "fields {fields:?}");
        }
    }

    #[test]
    fn header_lookup() {
        let h = req("GET / HTTP/1.1\r\nX-A:  one \r\nx-a: two\r\nEmpty:\r\nX-B:\tthree\t\r\n\r\n")
            .unwrap();
        assert_eq!(h.header(b"x-a"), Some(&b"one"[..]));
        assert_eq!(h.header(b"X-A"), Some(&b"one"[..]));
        let all: Vec<&[u8]> = h.headers.get_all(b"X-a").collect();
        assert_eq!(all, [&b"one"[..], &b"two"[..]]);
        assert_eq!(h.header(b"empty"), Some(&b""[..]));
        assert_eq!(h.header(b"x-b"), Some(&b"three"[..]));
        assert_eq!(h.header(b"x-"), None);
        assert_eq!(h.header(b""), None);
        let pairs: Vec<(&[u8], &[u8])> = h.headers.into_iter().collect();
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[1], (&b"x-a"[..], &b"two"[..]));
    }

    #[test]
    fn header_count_limit() {
        let fields = |n: usize| -> String { (0..n).map(|i| format!("H{i}: v\r\n")).collect() };
        let ok = format!("GET / HTTP/1.1\r\n{}\r\n", fields(MAX_HEADERS));
        assert_eq!(req(&ok).unwrap().headers.len(), MAX_HEADERS);
        let over = format!("GET / HTTP/1.1\r\n{}\r\n", fields(MAX_HEADERS + 1));
        assert_eq!(req(&over), Err(HttpError::TooManyHeaders));
        let over = format!("HTTP/1.1 200 OK\r\n{}\r\n", fields(MAX_HEADERS + 1));
        assert_eq!(resp(&over), Err(HttpError::TooManyHeaders));
        // A 65th line that is still incomplete is not yet an error.
        let partial = format!("GET / HTTP/1.1\r\n{}H64: v", fields(MAX_HEADERS));
        let h = req(&partial).unwrap();
        assert!(!h.complete);
        assert_eq!(h.headers.len(), MAX_HEADERS);
        // Many more lines: rejected after the 65th, without reading further.
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", fields(10_000));
        assert_eq!(req(&many), Err(HttpError::TooManyHeaders));
    }

    #[test]
    fn content_length() {
        use HttpError::*;
        let cases: &[(&str, Result<Option<u64>, HttpError>)] = &[
            ("", Ok(None)),
            ("Content-Length: 0\r\n", Ok(Some(0))),
            ("content-length: 42\r\n", Ok(Some(42))),
            ("Content-Length:  007 \r\n", Ok(Some(7))),
            ("Content-Length: 42, 42\r\n", Ok(Some(42))),
            ("Content-Length: 42\r\nContent-Length: 42\r\n", Ok(Some(42))),
            (
                "Content-Length: 42\r\nContent-Length: 43\r\n",
                Err(ConflictingContentLength),
            ),
            ("Content-Length: 42,43\r\n", Err(ConflictingContentLength)),
            ("Content-Length: 42,\r\n", Err(InvalidContentLength)),
            ("Content-Length:\r\n", Err(InvalidContentLength)),
            ("Content-Length: 4 2\r\n", Err(InvalidContentLength)),
            ("Content-Length: +1\r\n", Err(InvalidContentLength)),
            ("Content-Length: -1\r\n", Err(InvalidContentLength)),
            ("Content-Length: 0x10\r\n", Err(InvalidContentLength)),
            ("Content-Length: 1e3\r\n", Err(InvalidContentLength)),
            (
                "Content-Length: 18446744073709551615\r\n",
                Ok(Some(u64::MAX)),
            ),
            (
                "Content-Length: 18446744073709551616\r\n",
                Err(ContentLengthOverflow),
            ),
            (
                "Content-Length: 99999999999999999999999\r\n",
                Err(ContentLengthOverflow),
            ),
            (
                "Content-Length: 99999999999999999999999x\r\n",
                Err(InvalidContentLength),
            ),
        ];
        for (fields, want) in cases {
            let input = format!("POST / HTTP/1.1\r\n{fields}\r\n");
            assert_eq!(
                req(&input).unwrap().content_length(),
                *want,
                "fields {fields:?}"
            );
        }
    }

    #[test]
    fn transfer_encoding() {
        let cases: &[(&str, bool)] = &[
            ("", false),
            ("Transfer-Encoding: chunked\r\n", true),
            ("transfer-encoding: Chunked\r\n", true),
            ("Transfer-Encoding: gzip, chunked\r\n", true),
            ("Transfer-Encoding: gzip,chunked , \r\n", true),
            ("Transfer-Encoding: chunked, gzip\r\n", false),
            (
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                true,
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
                false,
            ),
            ("Transfer-Encoding: chunked ; x=y\r\n", true),
            ("Transfer-Encoding: xchunked\r\n", false),
            ("Transfer-Encoding: chunked-x\r\n", false),
            ("Transfer-Encoding:\r\n", false),
        ];
        for (fields, want) in cases {
            let input = format!("POST / HTTP/1.1\r\n{fields}\r\n");
            assert_eq!(
                req(&input).unwrap().is_chunked(),
                *want,
                "fields {fields:?}"
            );
        }
    }

    #[test]
    fn connection_persistence() {
        let cases: &[(&str, &str, bool)] = &[
            ("1.1", "", false),
            ("1.1", "Connection: close\r\n", true),
            ("1.1", "Connection: Keep-Alive, Close\r\n", true),
            ("1.1", "Connection: upgrade\r\nConnection: close\r\n", true),
            ("1.1", "Connection: closed\r\n", false),
            ("1.1", "Connection: keep-alive\r\n", false),
            ("1.0", "", true),
            ("1.0", "Connection: keep-alive\r\n", false),
            ("1.0", "Connection: Keep-Alive\r\n", false),
            ("1.0", "Connection: keep-alive, close\r\n", true),
        ];
        for (version, fields, want) in cases {
            let input = format!("GET / HTTP/{version}\r\n{fields}\r\n");
            assert_eq!(
                req(&input).unwrap().connection_close(),
                *want,
                "{version} {fields:?}"
            );
            let input = format!("HTTP/{version} 200 OK\r\n{fields}\r\n");
            assert_eq!(
                resp(&input).unwrap().connection_close(),
                *want,
                "{version} {fields:?}"
            );
        }
    }

    #[test]
    fn paths() {
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a?b=c", "/a"),
            ("/a#frag", "/a"),
            ("/a?b#c", "/a"),
            ("/a#b?c", "/a"),
            ("?q", ""),
            ("*", "*"),
            ("http://h:80/p?q", "http://h:80/p"),
        ];
        for (target, want) in cases {
            let input = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert_eq!(
                req(&input).unwrap().path(),
                want.as_bytes(),
                "target {target:?}"
            );
        }
    }

    #[test]
    fn head_len_stops_at_blank_line() {
        let buf = b"GET /a HTTP/1.1\r\nA: b\r\n\r\nGET /b HTTP/1.1\r\n\x00garbage\r\n";
        let h = parse_request_head(buf).unwrap();
        assert_eq!(h.head_len, Some(25));
        let next = parse_request_head(&buf[25..]);
        assert_eq!(next, Err(HttpError::InvalidHeaderName));
        let lf = b"GET / HTTP/1.1\nA: b\n\nbody";
        assert_eq!(parse_request_head(lf).unwrap().head_len, Some(21));
        let lead = b"\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(parse_request_head(lead).unwrap().head_len, Some(lead.len()));
    }

    #[test]
    fn truncated_request_at_every_offset() {
        let head_len = parse_request_head(REQUEST).unwrap().head_len.unwrap();
        let request_line = REQUEST.iter().position(|&b| b == b'\n').unwrap() + 1;
        for cut in 0..=REQUEST.len() {
            let prefix = &REQUEST[..cut];
            match parse_request_head(prefix) {
                Err(e) => {
                    assert_eq!(e, HttpError::Incomplete, "cut {cut}");
                    assert!(cut < request_line, "cut {cut}");
                }
                Ok(h) => {
                    assert!(cut >= request_line, "cut {cut}");
                    assert_eq!(h.method, b"POST");
                    assert_eq!(h.path(), b"/api/v1/orders");
                    assert_eq!(h.complete, cut >= head_len, "cut {cut}");
                    // Never a traceparent that is cut short.
                    if let Some(tp) = h.header(b"traceparent") {
                        assert_eq!(tp, TRACEPARENT, "cut {cut}");
                    }
                    // Every header returned is one of the full head's, whole.
                    let full = parse_request_head(REQUEST).unwrap();
                    for (got, want) in h.headers.iter().zip(full.headers.iter()) {
                        assert_eq!(got, want, "cut {cut}");
                    }
                    if !h.complete {
                        assert_eq!(h.head_len, None);
                        assert!(h.headers.len() < full.headers.len() || cut >= head_len - 2);
                        // Content-Length is the last field: only seen once its line is whole.
                        let cl = h.content_length().unwrap();
                        assert!(cl.is_none() || cl == Some(13), "cut {cut}");
                    }
                }
            }
        }
    }

    #[test]
    fn truncated_response_at_every_offset() {
        let full = parse_response_head(RESPONSE).unwrap();
        for cut in 0..=RESPONSE.len() {
            if let Ok(h) = parse_response_head(&RESPONSE[..cut]) {
                assert_eq!((h.status, h.reason), (201, &b"Created"[..]));
                assert_eq!(h.complete, cut >= full.head_len.unwrap(), "cut {cut}");
                if let Some(tp) = h.header(b"traceparent") {
                    assert_eq!(tp, full.header(b"traceparent").unwrap(), "cut {cut}");
                }
                for (got, want) in h.headers.iter().zip(full.headers.iter()) {
                    assert_eq!(got, want, "cut {cut}");
                }
            } else {
                assert!(cut < 23, "cut {cut}");
            }
        }
    }

    #[test]
    fn looks_like() {
        for m in KNOWN_METHODS {
            let mut buf = Vec::from(m);
            assert!(!looks_like_request(&buf), "{m:?} without space");
            buf.push(b' ');
            assert!(looks_like_request(&buf), "{m:?}");
            buf.extend_from_slice(b"/ HTTP/1.1\r\n");
            assert!(looks_like_request(&buf), "{m:?}");
        }
        for no in [
            &b""[..],
            b"G",
            b"get /",
            b"GETX /",
            b"GET\t/",
            b" GET /",
            b"PRI * HTTP/2.0\r\n",
            b"HTTP/1.1 200 OK",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert!(!looks_like_request(no), "{no:?}");
        }
        assert!(looks_like_response(b"HTTP/1.1 200 OK\r\n"));
        assert!(looks_like_response(b"HTTP/1.0"));
        assert!(looks_like_response(b"HTTP/1."));
        for no in [
            &b""[..],
            b"HTTP/1",
            b"HTTP/2 200",
            b"http/1.1 200",
            b"GET / HTTP/1.1",
        ] {
            assert!(!looks_like_response(no), "{no:?}");
        }
    }

    #[test]
    fn error_labels_are_distinct_snake_case() {
        use HttpError::*;
        let all = [
            Incomplete,
            InvalidMethod,
            InvalidTarget,
            InvalidVersion,
            UnsupportedVersion,
            InvalidStatus,
            InvalidReason,
            BareCr,
            ObsFold,
            InvalidHeaderName,
            MissingColon,
            InvalidHeaderValue,
            TooManyHeaders,
            InvalidContentLength,
            ConflictingContentLength,
            ContentLengthOverflow,
        ];
        for (i, e) in all.iter().enumerate() {
            let l = e.as_str();
            assert!(
                l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
            assert!(all[..i].iter().all(|o| o.as_str() != l), "duplicate {l}");
            assert_eq!(format!("{e}"), l);
        }
    }

    /// A valid request head built from parts, and its parts.
    fn arb_request() -> impl Strategy<Value = (Vec<u8>, String, Vec<(String, String)>)> {
        (
            proptest::sample::select(&KNOWN_METHODS[..]),
            "/[!-~]{0,30}",
            proptest::collection::vec(
                (
                    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}",
                    "[!-~]([ -~\t]{0,20}[!-~])?",
                ),
                0..12,
            ),
            any::<bool>(),
        )
            .prop_map(|(method, target, fields, lf)| {
                let eol = if lf { "\n" } else { "\r\n" };
                let mut s = format!("{} {target} HTTP/1.1{eol}", String::from_utf8_lossy(method));
                for (n, v) in &fields {
                    s.push_str(&format!("{n}: {v}{eol}"));
                }
                s.push_str(eol);
                (s.into_bytes(), target, fields)
            })
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = looks_like_request(&bytes);
            let _ = looks_like_response(&bytes);
            if let Ok(h) = parse_request_head(&bytes) {
                let _ = (h.path(), h.header(b"traceparent"), h.content_length());
                let _ = (h.is_chunked(), h.connection_close(), h.headers.iter().count());
            }
            if let Ok(h) = parse_response_head(&bytes) {
                let _ = (h.header(b"traceparent"), h.content_length(), h.is_chunked());
            }
        }

        #[test]
        fn never_panics_after_valid_start_line(
            tail in proptest::collection::vec(
                prop_oneof![
                    4 => any::<u8>(),
                    1 => Just(b'\r'),
                    1 => Just(b'\n'),
                    1 => Just(b':'),
                    1 => Just(b' '),
                ],
                0..512,
            ),
        ) {
            for start in [&b"GET / HTTP/1.1\r\n"[..], b"HTTP/1.1 200 OK\r\n"] {
                let mut buf = Vec::from(start);
                buf.extend_from_slice(&tail);
                let r = parse_request_head(&buf).map(|h| h.headers);
                let s = parse_response_head(&buf).map(|h| h.headers);
                for headers in [r, s].into_iter().flatten() {
                    let _ = (headers.content_length(), headers.is_chunked());
                    prop_assert_eq!(headers.iter().count(), headers.len());
                    prop_assert_select_agrees_with_lookups(&headers)?;
                }
            }
        }

        #[test]
        fn generated_requests_parse((buf, target, fields) in arb_request()) {
            let h = parse_request_head(&buf).unwrap();
            prop_assert!(h.complete);
            prop_assert_eq!(h.head_len, Some(buf.len()));
            prop_assert_eq!(h.target, target.as_bytes());
            prop_assert_eq!(h.headers.len(), fields.len());
            for ((n, v), (gn, gv)) in fields.iter().zip(h.headers.iter()) {
                prop_assert_eq!(n.as_bytes(), gn);
                prop_assert_eq!(v.as_bytes(), gv);
            }
            prop_assert_select_agrees_with_lookups(&h.headers)?;
        }

        /// Prefixes never contradict the whole: same error, or a consistent partial head.
        #[test]
        fn prefixes_are_consistent(
            (buf, _, _) in arb_request(),
            noise in proptest::collection::vec(any::<u8>(), 0..4),
            at in any::<prop::sample::Index>(),
        ) {
            // Sometimes corrupt the head, so that error paths are covered too.
            let mut buf = buf;
            if !noise.is_empty() {
                let i = at.index(buf.len());
                buf.splice(i..i, noise);
            }
            let whole = parse_request_head(&buf);
            for cut in 0..=buf.len() {
                match (parse_request_head(&buf[..cut]), &whole) {
                    (Err(HttpError::Incomplete), _) => {}
                    (Err(e), w) => prop_assert_eq!(Err(e), w.map(|_| ())),
                    (Ok(p), Ok(w)) => {
                        prop_assert_eq!((p.method, p.target), (w.method, w.target));
                        prop_assert!(p.headers.len() <= w.headers.len());
                        for (a, b) in p.headers.iter().zip(w.headers.iter()) {
                            prop_assert_eq!(a, b);
                        }
                        if p.complete {
                            prop_assert_eq!(p, *w);
                        }
                    }
                    (Ok(p), Err(_)) => prop_assert!(!p.complete),
                }
            }
        }
    }

    /// [`Headers::select`] finds what a lookup per field finds.
    fn prop_assert_select_agrees_with_lookups(headers: &Headers<'_>) -> Result<(), TestCaseError> {
        let selected = headers.select();
        prop_assert_eq!(selected.traceparent, headers.get(b"traceparent"));
        prop_assert_eq!(
            selected.traceparent_lines,
            headers.get_all(b"traceparent").count()
        );
        prop_assert_eq!(selected.tracestate, headers.get(b"tracestate"));
        Ok(())
    }

    #[test]
    fn select_finds_trace_context_and_framing_in_one_pass() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cases: &[(&str, SelectedFields<'_>)] = &[
            (
                "",
                SelectedFields {
                    traceparent: None,
                    traceparent_lines: 0,
                    tracestate: None,
                    content_length: Ok(None),
                    chunked: false,
                },
            ),
            (
                "Host: h\r\nTraceParent:  00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 \r\n\
                 tracestate: a=1\r\nTRACESTATE: b=2\r\nContent-Length: 5\r\n",
                SelectedFields {
                    traceparent: Some(TP.as_bytes()),
                    traceparent_lines: 1,
                    tracestate: Some(b"a=1"),
                    content_length: Ok(Some(5)),
                    chunked: false,
                },
            ),
            (
                "traceparent: x\r\ntraceparent: y\r\nTransfer-Encoding: gzip\r\n\
                 Transfer-Encoding: chunked\r\nContent-Length: 3\r\nContent-Length: 4\r\n",
                SelectedFields {
                    traceparent: Some(b"x"),
                    traceparent_lines: 2,
                    tracestate: None,
                    content_length: Err(HttpError::ConflictingContentLength),
                    chunked: true,
                },
            ),
            (
                // Near misses of the names are other fields.
                "traceparents: x\r\ntrace-state: y\r\ncontent-length2: 7\r\n\
                 Content-Length: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked, \r\n",
                SelectedFields {
                    traceparent: None,
                    traceparent_lines: 0,
                    tracestate: None,
                    content_length: Err(HttpError::InvalidContentLength),
                    chunked: true,
                },
            ),
        ];
        for (fields, want) in cases {
            let input = format!("POST / HTTP/1.1\r\n{fields}\r\n");
            assert_eq!(req(&input).unwrap().headers.select(), *want, "{fields:?}");
        }
    }

    #[test]
    fn tchar_table_is_the_rule() {
        let tokens = b"!#$%&'*+-.^_`|~";
        for b in 0..=u8::MAX {
            let want = b.is_ascii_alphanumeric() || tokens.contains(&b);
            assert_eq!(is_tchar(b), want, "{b:#04x}");
        }
    }

    #[test]
    fn bytes_after_cut_are_never_returned() {
        // Whatever follows the last terminator is invisible, even a plausible value.
        let buf = b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0";
        let h = parse_request_head(buf).unwrap();
        assert_eq!(h.header(b"traceparent"), None);
        let mut with_cr = vec![];
        with_cr.extend_from_slice(buf);
        with_cr.extend_from_slice(b"1\r");
        assert_eq!(
            parse_request_head(&with_cr).unwrap().header(b"traceparent"),
            None
        );
        with_cr.push(b'\n');
        assert_eq!(
            parse_request_head(&with_cr).unwrap().header(b"traceparent"),
            Some(TRACEPARENT)
        );
    }
}
