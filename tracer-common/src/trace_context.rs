//! W3C Trace Context: the `traceparent` and `tracestate` header values.
//!
//! Implements the parsing rules of W3C Trace Context Level 1
//! (<https://www.w3.org/TR/trace-context/>) and Level 2
//! (<https://www.w3.org/TR/trace-context-2/>); section numbers below are those of both documents
//! (they agree up to §3.3), with the Level 2 text winning where the two differ (the `tracestate`
//! key grammar and the `random` trace flag, both noted where they apply).
//!
//! Inputs are header *values*, i.e. what follows `traceparent:` with the field line's
//! terminator removed, as returned by [`crate::http::RequestHead::header`]. The parsers do not
//! allocate, never panic, and every loop is bounded by the input length or a constant, so they can
//! run on byte prefixes copied by the kernel and, later, inside eBPF.

// The parsers take untrusted bytes: any panic is a bug. Tests opt out below.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use core::fmt;

/// Length in bytes of a version `00` `traceparent` value: `2 + 1 + 32 + 1 + 16 + 1 + 2`
/// (§3.2.2, "traceparent Header Field Values").
pub const TRACEPARENT_LEN: usize = 55;

/// The `sampled` bit of `trace-flags`: the caller may have recorded trace data (§3.2.2.5.1).
pub const FLAG_SAMPLED: u8 = 0x01;

/// The `random-trace-id` bit of `trace-flags`, added by Level 2 (§3.2.2.5.2): the right-most 7
/// bytes of the trace id were generated randomly. Level 1 receivers see it as a reserved bit.
pub const FLAG_RANDOM_TRACE_ID: u8 = 0x02;

/// A parsed `traceparent` header value (§3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The `version` field (§3.2.2.1), as received: `0x00` for this specification, higher for a
    /// future version parsed under the rules of §3.2.4. Never `0xff`.
    pub version: u8,
    /// The `trace-id` (§3.2.2.3): 16 bytes, in the order they appear in the header (the first
    /// two hex digits are byte 0). Never all zero.
    pub trace_id: [u8; 16],
    /// The `parent-id` (§3.2.2.4), the caller's span id: 8 bytes, in header order. Never all
    /// zero.
    pub parent_id: [u8; 8],
    /// The `trace-flags` bit field (§3.2.2.5), unmasked: test bits with [`FLAG_SAMPLED`] and
    /// [`FLAG_RANDOM_TRACE_ID`]; other bits are reserved and passed through unchanged.
    pub flags: u8,
}

impl TraceParent {
    /// Whether the caller may have recorded trace data (§3.2.2.5.1, the least significant bit
    /// of `trace-flags`).
    #[must_use]
    pub const fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// Whether the caller declares the trace id random (Level 2, §3.2.2.5.2).
    #[must_use]
    pub const fn random_trace_id(&self) -> bool {
        self.flags & FLAG_RANDOM_TRACE_ID != 0
    }

    /// Renders the version `00` form, `00-<trace-id>-<parent-id>-<flags>`, in lowercase hex.
    ///
    /// The version written is always `00`, whatever [`Self::version`] holds: §3.2.4 requires a
    /// vendor to re-emit a higher version it parsed in the highest version it knows, and the
    /// fields of `00` are a prefix of every later version. The flags are written as stored.
    pub fn format(&self, out: &mut [u8; TRACEPARENT_LEN]) {
        out.fill(b'-');
        if let Some(dst) = out.get_mut(0..2) {
            put_hex(dst, &[0]);
        }
        if let Some(dst) = out.get_mut(3..35) {
            put_hex(dst, &self.trace_id);
        }
        if let Some(dst) = out.get_mut(36..52) {
            put_hex(dst, &self.parent_id);
        }
        if let Some(dst) = out.get_mut(53..55) {
            put_hex(dst, &[self.flags]);
        }
    }

    /// [`Self::format`] into a new array.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [0; TRACEPARENT_LEN];
        self.format(&mut out);
        out
    }
}

/// Why a `traceparent` value was rejected. The spec's answer to every one of them is the same
/// (ignore the header and restart the trace); the variants exist for diagnostics and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceParentError {
    /// After trimming OWS, the value is shorter than 55 bytes (any version, §3.2.4), or a
    /// version `00` value is not exactly 55 bytes (§3.2.2).
    Length,
    /// A field holds `A`-`F`. `HEXDIGLC` is lowercase only (§3.2.2); uppercase is a common
    /// interoperability bug, so it gets its own label.
    UppercaseHex,
    /// A field holds a byte that is not a hex digit at all (§3.2.2).
    NotHex,
    /// Version `ff` is forbidden (§3.2.2.1).
    VersionFf,
    /// A `-` is missing where §3.2.2 puts one (after the version, trace id or parent id), or a
    /// future version's value continues after the flags with something other than `-`
    /// (§3.2.4).
    BadDelimiter,
    /// The trace id is all zeros (§3.2.2.3).
    ZeroTraceId,
    /// The parent id is all zeros (§3.2.2.4).
    ZeroParentId,
}

impl TraceParentError {
    /// A stable snake_case reason, usable as a metric label. Never changes for a variant.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::UppercaseHex => "uppercase_hex",
            Self::NotHex => "not_hex",
            Self::VersionFf => "version_ff",
            Self::BadDelimiter => "bad_delimiter",
            Self::ZeroTraceId => "zero_trace_id",
            Self::ZeroParentId => "zero_parent_id",
        }
    }
}

impl fmt::Display for TraceParentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for TraceParentError {}

/// Parses a `traceparent` header value (§3.2.2, §3.2.4).
///
/// Leading and trailing optional whitespace (space, horizontal tab; RFC 9110 §5.6.3 OWS) is
/// trimmed first: HTTP excludes it from a field value (RFC 9110 §5.5) and the W3C test suite
/// sends it. Then:
/// - `version` must be two lowercase hex digits followed by `-`, and not `ff`;
/// - version `00` must be exactly 55 bytes;
/// - a higher version must be at least 55 bytes, and if longer, byte 55 must be `-`: its first
///   four fields are parsed as version `00`'s and the rest is ignored (§3.2.4);
/// - `trace-id` (32), `parent-id` (16) and `trace-flags` (2) must be lowercase hex, separated by
///   `-`, and neither id may be all zeros.
///
/// Duplicate `traceparent` field lines make the header invalid (the combined value is not a
/// `traceparent`); that is the caller's check, with [`crate::http::Headers::get_all`].
///
/// # Errors
///
/// The [`TraceParentError`] naming the first check above that fails; within a field the
/// first offending byte decides between [`TraceParentError::UppercaseHex`] and
/// [`TraceParentError::NotHex`]. The spec's response to any of them is to ignore the header and
/// restart the trace (§3.2.2.3, §3.2.2.4, §3.2.4).
pub fn parse_traceparent(value: &[u8]) -> Result<TraceParent, TraceParentError> {
    let v = trim_ows(value);
    if v.len() < TRACEPARENT_LEN {
        return Err(TraceParentError::Length);
    }
    let [version] = decode_hex::<1>(v.get(0..2))?;
    if v.get(2) != Some(&b'-') {
        return Err(TraceParentError::BadDelimiter);
    }
    if version == 0xff {
        return Err(TraceParentError::VersionFf);
    }
    if version == 0 && v.len() != TRACEPARENT_LEN {
        return Err(TraceParentError::Length);
    }
    // Future versions: "the 2 characters [of the flags] are either at the end of the string or
    // followed by a dash" (§3.2.4).
    if !matches!(v.get(TRACEPARENT_LEN), None | Some(b'-')) {
        return Err(TraceParentError::BadDelimiter);
    }
    if v.get(35) != Some(&b'-') || v.get(52) != Some(&b'-') {
        return Err(TraceParentError::BadDelimiter);
    }
    let trace_id = decode_hex::<16>(v.get(3..35))?;
    let parent_id = decode_hex::<8>(v.get(36..52))?;
    let [flags] = decode_hex::<1>(v.get(53..55))?;
    if trace_id == [0; 16] {
        return Err(TraceParentError::ZeroTraceId);
    }
    if parent_id == [0; 8] {
        return Err(TraceParentError::ZeroParentId);
    }
    Ok(TraceParent {
        version,
        trace_id,
        parent_id,
        flags,
    })
}

/// Maximum number of non-empty list members in a `tracestate` value (§3.3.1.1).
pub const TRACESTATE_MAX_MEMBERS: usize = 32;

/// Maximum length of a `tracestate` key in bytes (§3.3.1.3.1).
pub const TRACESTATE_MAX_KEY_LEN: usize = 256;

/// Maximum length of a `tracestate` value in bytes (§3.3.1.3.2).
pub const TRACESTATE_MAX_VALUE_LEN: usize = 256;

/// Longest `tracestate` value [`validate_tracestate`] examines, in bytes, before trimming.
///
/// The spec bounds members, keys and values but not the whitespace and empty members between
/// them, and only asks that 512 bytes be propagated (§3.3.1.5). 32 maximal members joined by
/// commas take 16,447 bytes; twice that leaves ample room for OWS and empty members while
/// keeping offsets in 16 bits and the work per value bounded.
pub const TRACESTATE_MAX_LEN: usize = 32 * 1024;

/// Why a `tracestate` value was rejected. A vendor discards the whole header for any of them;
/// per §3.3 this never affects the `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceStateError {
    /// The value is longer than [`TRACESTATE_MAX_LEN`]; it was not examined further.
    TooLong,
    /// More than [`TRACESTATE_MAX_MEMBERS`] non-empty list members (§3.3.1.1).
    TooManyMembers,
    /// A non-empty list member has no `=` (§3.3.1.2: `list-member = key "=" value`).
    MissingEquals,
    /// A key is empty, does not start with `a`-`z` or `0`-`9`, or holds a byte other than
    /// `a`-`z 0-9 _ - * / @` (§3.3.1.3.1). This includes uppercase letters and whitespace around
    /// `=`.
    InvalidKey,
    /// A key is longer than [`TRACESTATE_MAX_KEY_LEN`] (§3.3.1.3.1).
    KeyTooLong,
    /// A value is empty or holds a byte outside printable ASCII `0x20`-`0x7e`, or a `=`
    /// (§3.3.1.3.2). Tabs are rejected; trailing spaces are OWS, not part of the value.
    InvalidValue,
    /// A value is longer than [`TRACESTATE_MAX_VALUE_LEN`] (§3.3.1.3.2).
    ValueTooLong,
    /// Two list members have the same key: "Only one entry per key is allowed" (§3.3.1.4).
    DuplicateKey,
}

impl TraceStateError {
    /// A stable snake_case reason, usable as a metric label. Never changes for a variant.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TooLong => "too_long",
            Self::TooManyMembers => "too_many_members",
            Self::MissingEquals => "missing_equals",
            Self::InvalidKey => "invalid_key",
            Self::KeyTooLong => "key_too_long",
            Self::InvalidValue => "invalid_value",
            Self::ValueTooLong => "value_too_long",
            Self::DuplicateKey => "duplicate_key",
        }
    }
}

impl fmt::Display for TraceStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for TraceStateError {}

/// Validates a `tracestate` header value and returns its number of non-empty list members.
///
/// Grammar (§3.3.1.2, §3.3.1.3): a comma-separated list; OWS around each member is ignored;
/// empty and whitespace-only members are allowed, ignored and not counted (§3.3.1.1: they exist
/// because combining several field lines produces them). Each other member is `key=value`:
/// - key (Level 2 grammar): `( lcalpha / DIGIT ) 0*255( lcalpha / DIGIT / "_" / "-" / "*" /
///   "/" / "@" )`. Level 1's `simple-key / tenant-id "@" system-id` is a strict subset of it,
///   so every Level 1 key is accepted too; Level 2 also accepts `foo@`, `a@b@c` and system ids
///   longer than 14 bytes.
/// - value: `0*255( %x20 / nblk-chr ) nblk-chr` with `nblk-chr = %x21-2B / %x2D-3C / %x3E-7E`:
///   1 to 256 printable ASCII bytes except `,` and `=`, not ending in a space. Leading spaces
///   belong to the value.
///
/// At most [`TRACESTATE_MAX_MEMBERS`] members, no duplicate keys (§3.3.1.4), and the whole
/// value at most [`TRACESTATE_MAX_LEN`] bytes.
///
/// Several `tracestate` field lines are one list (RFC 9110 §5.3): join them with `,` before
/// calling. Per §3.3, do not look at `tracestate` when the `traceparent` was invalid.
///
/// # Errors
///
/// The [`TraceStateError`] for the first offending member, left to right; the whole header is
/// then to be discarded. [`TraceStateError::TooLong`] is decided before anything is read.
pub fn validate_tracestate(value: &[u8]) -> Result<usize, TraceStateError> {
    if value.len() > TRACESTATE_MAX_LEN {
        return Err(TraceStateError::TooLong);
    }
    // Key offsets into `value`, for the duplicate check without allocation. 128 bytes of
    // stack; the length cap above keeps every offset within u16.
    let mut keys = [(0u16, 0u16); TRACESTATE_MAX_MEMBERS];
    let mut members = 0;
    let mut offset = 0;
    for raw in value.split(|&b| b == b',') {
        let member_start = offset;
        offset += raw.len() + 1;
        let leading = raw.len() - trim_ows_start(raw).len();
        let member = trim_ows(raw);
        if member.is_empty() {
            continue;
        }
        if members == TRACESTATE_MAX_MEMBERS {
            return Err(TraceStateError::TooManyMembers);
        }
        let eq = member
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TraceStateError::MissingEquals)?;
        let key = member.get(..eq).unwrap_or_default();
        let val = member.get(eq + 1..).unwrap_or_default();
        validate_key(key)?;
        validate_value(val)?;
        let key_start = member_start + leading;
        let (Ok(start), Ok(end)) = (u16::try_from(key_start), u16::try_from(key_start + eq)) else {
            // Unreachable with TRACESTATE_MAX_LEN below u16::MAX.
            return Err(TraceStateError::TooLong);
        };
        let seen = keys.get(..members).unwrap_or_default();
        if seen
            .iter()
            .any(|&(s, e)| value.get(usize::from(s)..usize::from(e)) == Some(key))
        {
            return Err(TraceStateError::DuplicateKey);
        }
        if let Some(slot) = keys.get_mut(members) {
            *slot = (start, end);
        }
        members += 1;
    }
    Ok(members)
}

/// §3.3.1.3.1, Level 2 grammar (a superset of Level 1's, see [`validate_tracestate`]).
fn validate_key(key: &[u8]) -> Result<(), TraceStateError> {
    let Some((&first, rest)) = key.split_first() else {
        return Err(TraceStateError::InvalidKey);
    };
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(TraceStateError::InvalidKey);
    }
    let keychar = |b: u8| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'_' | b'-' | b'*' | b'/' | b'@')
    };
    if !rest.iter().all(|&b| keychar(b)) {
        return Err(TraceStateError::InvalidKey);
    }
    if key.len() > TRACESTATE_MAX_KEY_LEN {
        return Err(TraceStateError::KeyTooLong);
    }
    Ok(())
}

/// §3.3.1.3.2. The caller trimmed trailing OWS, so a non-empty value never ends in a space.
fn validate_value(value: &[u8]) -> Result<(), TraceStateError> {
    let chr = |b: u8| matches!(b, 0x20..=0x7e) && b != b',' && b != b'=';
    if value.is_empty() || !value.iter().all(|&b| chr(b)) {
        return Err(TraceStateError::InvalidValue);
    }
    if value.len() > TRACESTATE_MAX_VALUE_LEN {
        return Err(TraceStateError::ValueTooLong);
    }
    Ok(())
}

/// Decodes `2 * N` lowercase hex digits; `None` (a range outside the input) reads as a length
/// error, which the callers' length checks make unreachable.
fn decode_hex<const N: usize>(digits: Option<&[u8]>) -> Result<[u8; N], TraceParentError> {
    let digits = digits.ok_or(TraceParentError::Length)?;
    if digits.len() != 2 * N {
        return Err(TraceParentError::Length);
    }
    let mut out = [0; N];
    for (byte, &[hi, lo]) in out.iter_mut().zip(digits.as_chunks::<2>().0) {
        *byte = (hex_value(hi)? << 4) | hex_value(lo)?;
    }
    Ok(out)
}

fn hex_value(c: u8) -> Result<u8, TraceParentError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Err(TraceParentError::UppercaseHex),
        _ => Err(TraceParentError::NotHex),
    }
}

/// Writes `bytes` as lowercase hex into `out`, two digits per byte, as far as both reach.
fn put_hex(out: &mut [u8], bytes: &[u8]) {
    for ([hi, lo], &b) in out.as_chunks_mut::<2>().0.iter_mut().zip(bytes) {
        *hi = hex_digit(b >> 4);
        *lo = hex_digit(b & 0x0f);
    }
}

const fn hex_digit(nibble: u8) -> u8 {
    if nibble < 10 {
        b'0' + nibble
    } else {
        b'a' + (nibble - 10)
    }
}

/// Strips leading and trailing OWS (SP / HTAB, RFC 9110 §5.6.3).
fn trim_ows(s: &[u8]) -> &[u8] {
    let mut s = trim_ows_start(s);
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn trim_ows_start(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
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

    use std::{format, string::String, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_ID: &str = "00f067aa0ba902b7";

    fn tp(s: &str) -> Result<TraceParent, TraceParentError> {
        parse_traceparent(s.as_bytes())
    }

    fn hex16(s: &str) -> [u8; 16] {
        let mut out = [0; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn spec_examples() {
        // §3.2.3, "Examples of HTTP traceparent Headers".
        let sampled = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(sampled.version, 0);
        assert_eq!(sampled.trace_id, hex16(TRACE_ID));
        assert_eq!(
            sampled.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(sampled.flags, 0x01);
        assert!(sampled.sampled());
        assert!(!sampled.random_trace_id());

        let unsampled = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled());

        // §3.1's example, and the one the W3C test suite uses throughout.
        tp("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        tp("00-12345678901234567890123456789012-1234567890123456-01").unwrap();
    }

    #[test]
    fn flags_are_a_bit_field() {
        // §3.2.2.5: mask, do not compare. 0x09 is sampled plus a reserved bit.
        let t = tp(&format!("00-{TRACE_ID}-{PARENT_ID}-09")).unwrap();
        assert!(t.sampled());
        assert_eq!(t.flags, 0x09);
        let t = tp(&format!("00-{TRACE_ID}-{PARENT_ID}-02")).unwrap();
        assert!(!t.sampled());
        assert!(t.random_trace_id());
        let t = tp(&format!("00-{TRACE_ID}-{PARENT_ID}-ff")).unwrap();
        assert!(t.sampled() && t.random_trace_id());
    }

    #[test]
    fn table() {
        use TraceParentError::*;
        let z32 = "0".repeat(32);
        let z16 = "0".repeat(16);
        let cases: &[(String, Result<u8, TraceParentError>)] = &[
            // OWS is trimmed (W3C test suite test_traceparent_ows_handling).
            (format!(" 00-{TRACE_ID}-{PARENT_ID}-01"), Ok(0)),
            (format!("\t00-{TRACE_ID}-{PARENT_ID}-01"), Ok(0)),
            (format!("00-{TRACE_ID}-{PARENT_ID}-01 "), Ok(0)),
            (format!("00-{TRACE_ID}-{PARENT_ID}-01\t"), Ok(0)),
            (format!("\t 00-{TRACE_ID}-{PARENT_ID}-01 \t"), Ok(0)),
            // Other whitespace is not OWS.
            (format!("\n00-{TRACE_ID}-{PARENT_ID}-01"), Err(NotHex)),
            (format!("00-{TRACE_ID}-{PARENT_ID}-01\r"), Err(Length)),
            // Uppercase hex, in each field.
            (format!("0A-{TRACE_ID}-{PARENT_ID}-01"), Err(UppercaseHex)),
            (
                format!("00-4BF92F3577B34DA6A3CE929D0E0E4736-{PARENT_ID}-01"),
                Err(UppercaseHex),
            ),
            (
                format!("00-{TRACE_ID}-00F067AA0BA902B7-01"),
                Err(UppercaseHex),
            ),
            (format!("00-{TRACE_ID}-{PARENT_ID}-0A"), Err(UppercaseHex)),
            // Not hex at all, in each field (test_traceparent_*_illegal_characters).
            (format!(".0-{TRACE_ID}-{PARENT_ID}-01"), Err(NotHex)),
            (format!("0.-{TRACE_ID}-{PARENT_ID}-01"), Err(NotHex)),
            (
                "00-.2345678901234567890123456789012-1234567890123456-01".into(),
                Err(NotHex),
            ),
            (
                "00-1234567890123456789012345678901.-1234567890123456-01".into(),
                Err(NotHex),
            ),
            (
                "00-12345678901234567890123456789012-.234567890123456-01".into(),
                Err(NotHex),
            ),
            (
                "00-12345678901234567890123456789012-123456789012345.-01".into(),
                Err(NotHex),
            ),
            (
                "00-12345678901234567890123456789012-1234567890123456-.0".into(),
                Err(NotHex),
            ),
            (
                "00-12345678901234567890123456789012-1234567890123456-0.".into(),
                Err(NotHex),
            ),
            (format!("00-{TRACE_ID}-{PARENT_ID}-0g"), Err(NotHex)),
            // First offending byte decides.
            (format!("00-{TRACE_ID}-{PARENT_ID}-A."), Err(UppercaseHex)),
            (format!("00-{TRACE_ID}-{PARENT_ID}-.A"), Err(NotHex)),
            // Version ff is forbidden, in any form.
            (format!("ff-{TRACE_ID}-{PARENT_ID}-01"), Err(VersionFf)),
            (
                format!("ff-{TRACE_ID}-{PARENT_ID}-01-extra"),
                Err(VersionFf),
            ),
            (format!("FF-{TRACE_ID}-{PARENT_ID}-01"), Err(UppercaseHex)),
            // All-zero ids.
            (format!("00-{z32}-{PARENT_ID}-01"), Err(ZeroTraceId)),
            (format!("00-{TRACE_ID}-{z16}-01"), Err(ZeroParentId)),
            (format!("00-{z32}-{z16}-01"), Err(ZeroTraceId)),
            // Zero flags and ids that are merely mostly zero are fine.
            (format!("00-{}1-{}1-00", &z32[1..], &z16[1..]), Ok(0)),
            // Lengths: whole value.
            (String::new(), Err(Length)),
            ("00".into(), Err(Length)),
            (format!("00-{TRACE_ID}-{PARENT_ID}-0"), Err(Length)),
            (format!("00-{TRACE_ID}-{PARENT_ID}-01."), Err(Length)),
            (format!("00-{TRACE_ID}-{PARENT_ID}-01-"), Err(Length)),
            (
                format!("00-{TRACE_ID}-{PARENT_ID}-01-what-the-future-will-be-like"),
                Err(Length),
            ),
            // Lengths: one field too long or too short (test_traceparent_*_too_long/short). A
            // longer version 00 is a length error, a longer version field shifts the delimiter.
            (
                "000-12345678901234567890123456789012-1234567890123456-01".into(),
                Err(BadDelimiter),
            ),
            (
                "0000-12345678901234567890123456789012-1234567890123456-01".into(),
                Err(BadDelimiter),
            ),
            (
                "0-12345678901234567890123456789012-1234567890123456-01".into(),
                Err(Length),
            ),
            (
                "00-123456789012345678901234567890123-1234567890123456-01".into(),
                Err(Length),
            ),
            (
                "00-1234567890123456789012345678901-1234567890123456-01".into(),
                Err(Length),
            ),
            (
                "00-12345678901234567890123456789012-12345678901234567-01".into(),
                Err(Length),
            ),
            (
                "00-12345678901234567890123456789012-123456789012345-01".into(),
                Err(Length),
            ),
            (
                "00-12345678901234567890123456789012-1234567890123456-001".into(),
                Err(Length),
            ),
            (
                "00-12345678901234567890123456789012-1234567890123456-1".into(),
                Err(Length),
            ),
            // A wrong delimiter at each position.
            (format!("00_{TRACE_ID}-{PARENT_ID}-01"), Err(BadDelimiter)),
            (format!("00-{TRACE_ID}_{PARENT_ID}-01"), Err(BadDelimiter)),
            (format!("00-{TRACE_ID}-{PARENT_ID}_01"), Err(BadDelimiter)),
            // Future versions (§3.2.4, test_traceparent_version_0xcc).
            (format!("cc-{TRACE_ID}-{PARENT_ID}-01"), Ok(0xcc)),
            (
                format!("cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-will-be-like"),
                Ok(0xcc),
            ),
            (
                format!("cc-{TRACE_ID}-{PARENT_ID}-01.what-the-future-will-be-like"),
                Err(BadDelimiter),
            ),
            (format!("01-{TRACE_ID}-{PARENT_ID}-01-extra"), Ok(0x01)),
            (format!("01-{TRACE_ID}-{PARENT_ID}-01-"), Ok(0x01)),
            (
                format!("01-{TRACE_ID}-{PARENT_ID}-01-EXTRA\x01\x7f"),
                Ok(0x01),
            ),
            (format!("01-{TRACE_ID}-{PARENT_ID}-0"), Err(Length)),
            (format!("01-{TRACE_ID}-{PARENT_ID}-010"), Err(BadDelimiter)),
            (
                format!("01-{TRACE_ID}-{PARENT_ID}-0A-extra"),
                Err(UppercaseHex),
            ),
            (format!("fe-{z32}-{PARENT_ID}-01-extra"), Err(ZeroTraceId)),
            (format!("fe-{TRACE_ID}-{z16}-01"), Err(ZeroParentId)),
        ];
        for (input, want) in cases {
            let got = tp(input).map(|t| t.version);
            assert_eq!(got, *want, "input {input:?}");
        }
    }

    #[test]
    fn future_version_uses_first_four_fields() {
        let t = tp(&format!(
            "cc-{TRACE_ID}-{PARENT_ID}-03-what-the-future-will-be-like"
        ))
        .unwrap();
        assert_eq!(t.version, 0xcc);
        assert_eq!(t.trace_id, hex16(TRACE_ID));
        assert_eq!(t.flags, 0x03);
        // Re-emitted as version 00 (§3.2.4, "Downgrade the version" in §3.4).
        assert_eq!(
            t.to_bytes(),
            *format!("00-{TRACE_ID}-{PARENT_ID}-03").as_bytes()
        );
    }

    #[test]
    fn format_renders_version_00() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut out = [0; TRACEPARENT_LEN];
        tp(s).unwrap().format(&mut out);
        assert_eq!(&out, s.as_bytes());
    }

    #[test]
    fn error_labels_are_distinct_snake_case() {
        use TraceParentError::*;
        let all = [
            Length,
            UppercaseHex,
            NotHex,
            VersionFf,
            BadDelimiter,
            ZeroTraceId,
            ZeroParentId,
        ];
        assert_labels(&all.map(TraceParentError::as_str));
        use TraceStateError::*;
        let all = [
            TooLong,
            TooManyMembers,
            MissingEquals,
            InvalidKey,
            KeyTooLong,
            InvalidValue,
            ValueTooLong,
            DuplicateKey,
        ];
        assert_labels(&all.map(TraceStateError::as_str));
        assert_eq!(format!("{}", TraceParentError::VersionFf), "version_ff");
    }

    fn assert_labels(labels: &[&str]) {
        for (i, l) in labels.iter().enumerate() {
            assert!(
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
            assert!(!labels[..i].contains(l), "duplicate label {l}");
        }
    }

    fn ts(s: &str) -> Result<usize, TraceStateError> {
        validate_tracestate(s.as_bytes())
    }

    #[test]
    fn tracestate_table() {
        use TraceStateError::*;
        let all_key = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
        let all_value: String = (0x20u8..=0x7e)
            .filter(|&b| b != b',' && b != b'=')
            .map(char::from)
            .collect();
        let cases: &[(String, Result<usize, TraceStateError>)] = &[
            // §3.3 examples.
            ("congo=t61rcWkgMzE".into(), Ok(1)),
            ("rojo=00f067aa0ba902b7".into(), Ok(1)),
            ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".into(), Ok(2)),
            ("congo=ucfJifl5GOE,rojo=00f067aa0ba902b7".into(), Ok(2)),
            (
                "vendorname1=opaqueValue1,vendorname2=opaqueValue2".into(),
                Ok(2),
            ),
            // Empty and whitespace-only members (§3.3.1.1).
            (String::new(), Ok(0)),
            (" \t ".into(), Ok(0)),
            (",".into(), Ok(0)),
            (" , ,\t,".into(), Ok(0)),
            ("foo=1,,bar=2".into(), Ok(2)),
            (",foo=1,".into(), Ok(1)),
            // OWS around members (test_tracestate_ows_handling).
            ("foo=1 \t , \t bar=2, \t baz=3".into(), Ok(3)),
            ("foo=1\t \t,\t \tbar=2,\t \tbaz=3".into(), Ok(3)),
            (" foo=1".into(), Ok(1)),
            ("\tfoo=1".into(), Ok(1)),
            ("foo=1 ".into(), Ok(1)),
            ("foo=1\t".into(), Ok(1)),
            ("\t foo=1 \t".into(), Ok(1)),
            // All allowed characters (test_tracestate_all_allowed_characters).
            (format!("{all_key}={all_value}"), Ok(1)),
            (format!("{all_key}@a-z0-9_-*/={all_value}"), Ok(1)),
            // Keys.
            ("foo =1".into(), Err(InvalidKey)),
            ("FOO=1".into(), Err(InvalidKey)),
            ("fOo=1".into(), Err(InvalidKey)),
            ("foo.bar=1".into(), Err(InvalidKey)),
            ("@foo=1,bar=2".into(), Err(InvalidKey)),
            ("_foo=1".into(), Err(InvalidKey)),
            ("=1".into(), Err(InvalidKey)),
            ("1foo=1".into(), Ok(1)),
            ("fw529a3039@dt=1".into(), Ok(1)),
            ("001@xyz=1".into(), Ok(1)),
            // Level 2 keys that Level 1's tenant@system grammar rejected.
            ("foo@=1,bar=2".into(), Ok(2)),
            ("foo@@bar=1".into(), Ok(1)),
            ("foo@bar@baz=1".into(), Ok(1)),
            (format!("t@{}=1", "v".repeat(15)), Ok(1)),
            (format!("{}@v=1", "t".repeat(242)), Ok(1)),
            // Key length (test_tracestate_key_length_limit).
            (format!("foo=1,{}=1", "z".repeat(256)), Ok(2)),
            (format!("foo=1,{}=1", "z".repeat(257)), Err(KeyTooLong)),
            (format!("{}@{}=1", "t".repeat(241), "v".repeat(14)), Ok(1)),
            // Values.
            ("foo=bar=baz".into(), Err(InvalidValue)),
            ("foo=,bar=3".into(), Err(InvalidValue)),
            ("foo=".into(), Err(InvalidValue)),
            ("foo=   ".into(), Err(InvalidValue)),
            ("foo= bar".into(), Ok(1)),
            ("foo=a b".into(), Ok(1)),
            ("foo=a\tb".into(), Err(InvalidValue)),
            ("foo=a\x7f".into(), Err(InvalidValue)),
            ("foo=\u{e9}".into(), Err(InvalidValue)),
            (format!("foo={}", "v".repeat(256)), Ok(1)),
            (format!("foo= {}", "v".repeat(255)), Ok(1)),
            (format!("foo={}", "v".repeat(257)), Err(ValueTooLong)),
            // Members without '='.
            ("foo".into(), Err(MissingEquals)),
            ("foo=1,bar".into(), Err(MissingEquals)),
            // Duplicates (test_tracestate_duplicated_keys), including after OWS.
            ("foo=1,foo=1".into(), Err(DuplicateKey)),
            ("foo=1,foo=2".into(), Err(DuplicateKey)),
            ("foo=1, bar=2 ,\tfoo=3".into(), Err(DuplicateKey)),
            ("foo=1,foo@x=2,foox=3,fo=4".into(), Ok(4)),
            // Total length cap.
            (" ".repeat(TRACESTATE_MAX_LEN), Ok(0)),
            (" ".repeat(TRACESTATE_MAX_LEN + 1), Err(TooLong)),
        ];
        for (input, want) in cases {
            assert_eq!(ts(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn tracestate_member_count() {
        let members: Vec<String> = (1..=33).map(|i| format!("bar{i:02}={i:02}")).collect();
        assert_eq!(ts(&members[..32].join(",")), Ok(32));
        assert_eq!(ts(&members.join(",")), Err(TraceStateError::TooManyMembers));
        // Empty members do not count.
        assert_eq!(ts(&members[..32].join(", ,")), Ok(32));
    }

    #[test]
    fn tracestate_largest_valid_value() {
        let members: Vec<String> = (0..32)
            .map(|i| format!("{i:0>256}={}", "v".repeat(256)))
            .collect();
        let value = members.join(",");
        assert_eq!(value.len(), 16_447);
        assert_eq!(ts(&value), Ok(32));
    }

    prop_compose! {
        fn any_traceparent()(
            version in 0u8..0xff,
            trace_id in any::<[u8; 16]>().prop_filter("non-zero", |t| *t != [0; 16]),
            parent_id in any::<[u8; 8]>().prop_filter("non-zero", |p| *p != [0; 8]),
            flags in any::<u8>(),
        ) -> TraceParent {
            TraceParent { version, trace_id, parent_id, flags }
        }
    }

    proptest! {
        #[test]
        fn traceparent_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_traceparent(&bytes);
        }

        #[test]
        fn traceparent_near_valid_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 55..70),
            seed in any_traceparent(),
        ) {
            // Start from a valid value and scribble on part of it, to reach the later checks.
            let valid = seed.to_bytes();
            let keep = usize::from(bytes[0]) % 56;
            bytes[..keep].copy_from_slice(&valid[..keep]);
            let _ = parse_traceparent(&bytes);
        }

        #[test]
        fn format_parse_round_trip(t in any_traceparent()) {
            let parsed = parse_traceparent(&t.to_bytes()).unwrap();
            prop_assert_eq!(parsed, TraceParent { version: 0, ..t });
        }

        #[test]
        fn future_versions_round_trip(t in any_traceparent(), tail in "(-[ -~]{0,40})?") {
            let version = t.version.max(1);
            let mut s = Vec::from(&t.to_bytes()[..]);
            s[..2].copy_from_slice(format!("{version:02x}").as_bytes());
            s.extend_from_slice(tail.as_bytes());
            let parsed = parse_traceparent(&s).unwrap();
            prop_assert_eq!(parsed, TraceParent { version, ..t });
        }

        #[test]
        fn tracestate_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = validate_tracestate(&bytes);
        }

        #[test]
        fn tracestate_valid_lists(
            members in proptest::collection::btree_map(
                "[a-z0-9][a-z0-9_*/@-]{0,20}",
                "[ -+\\--<>-~]{0,20}[!-+\\--<>-~]",
                0..=TRACESTATE_MAX_MEMBERS,
            ),
            sep in "[ \t]{0,2},[ \t]{0,2}",
        ) {
            let joined: Vec<String> = members.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let value = joined.join(&sep);
            prop_assert_eq!(validate_tracestate(value.as_bytes()), Ok(members.len()));
        }
    }
}
