//! HTTP/2 framing (RFC 9113 §4, §6) over a byte stream that is only partly captured.
//!
//! The kernel copies a bounded prefix of each write or read ([`crate::data::MAX_CAPTURE`]), so
//! a direction of a connection arrives as records of `len` bytes of which the first `captured`
//! are known. [`Splitter`] cuts such records into frames: a frame's payload may be partly
//! uncaptured (its bytes are then only counted, [`Piece::Uncaptured`]), but a frame *header*
//! that falls in uncaptured bytes loses the framing of the rest of the direction for good
//! ([`Piece::Lost`]): every later frame boundary would be a guess.
//!
//! Pure and bounded: no allocation, no panics, loops bounded by the record's captured bytes.
//! Header blocks (HPACK) are decoded in user space; this module only finds their fragments.

/// What a client sends first on every HTTP/2 connection (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const FRAME_HEADER_LEN: usize = 9;

/// Frame types (RFC 9113 §6).
pub mod frame_type {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PUSH_PROMISE: u8 = 5;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;
}

/// Frame flags (RFC 9113 §6); their meaning depends on the frame type.
pub mod flags {
    /// DATA, HEADERS: the last frame the sender sends on the stream.
    pub const END_STREAM: u8 = 0x1;
    /// SETTINGS, PING: an acknowledgement.
    pub const ACK: u8 = 0x1;
    /// HEADERS, PUSH_PROMISE, CONTINUATION: the header block ends in this frame.
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    /// HEADERS: stream dependency and weight precede the fragment (PUSH_PROMISE uses the bit
    /// for nothing).
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS_HEADER_TABLE_SIZE (RFC 9113 §6.5.2): how large the sender lets the peer's HPACK
/// encoder make the sender's decoding table.
pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 1;

/// A frame's 9-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length (24 bits).
    pub length: u32,
    pub kind: u8,
    pub flags: u8,
    /// Stream identifier (31 bits, the reserved bit cleared).
    pub stream_id: u32,
}

impl FrameHeader {
    /// The header at the start of `buf`; `None` when fewer than 9 bytes.
    #[must_use]
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let b: &[u8; FRAME_HEADER_LEN] = buf.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(Self {
            length: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    /// Whether a frame of a known type has the stream and length its type requires (RFC 9113
    /// §6): a peer would treat anything else as a connection error, so such a header means the
    /// framing is not what we think. Unknown types are extensions, to be ignored: plausible.
    #[must_use]
    pub fn is_plausible(&self) -> bool {
        use frame_type::*;
        let on_stream = self.stream_id != 0;
        match self.kind {
            DATA | HEADERS | CONTINUATION | PUSH_PROMISE => on_stream,
            PRIORITY => on_stream && self.length == 5,
            RST_STREAM => on_stream && self.length == 4,
            SETTINGS if self.flags & flags::ACK != 0 => !on_stream && self.length == 0,
            SETTINGS => !on_stream && self.length.is_multiple_of(6),
            PING => !on_stream && self.length == 8,
            GOAWAY => !on_stream && self.length >= 8,
            WINDOW_UPDATE => self.length == 4,
            _ => true,
        }
    }

    #[must_use]
    pub fn is_known_type(&self) -> bool {
        self.kind <= frame_type::CONTINUATION
    }

    /// DATA or HEADERS that ends its stream in this direction.
    #[must_use]
    pub fn ends_stream(&self) -> bool {
        matches!(self.kind, frame_type::DATA | frame_type::HEADERS)
            && self.flags & flags::END_STREAM != 0
    }

    /// HEADERS, PUSH_PROMISE or CONTINUATION that ends its header block.
    #[must_use]
    pub fn ends_headers(&self) -> bool {
        matches!(
            self.kind,
            frame_type::HEADERS | frame_type::PUSH_PROMISE | frame_type::CONTINUATION
        ) && self.flags & flags::END_HEADERS != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Padding, priority or promised-stream fields longer than the payload.
    BadPadding,
}

/// The header block fragment of a complete HEADERS or PUSH_PROMISE frame payload: without the
/// pad length, priority fields, promised stream and padding (RFC 9113 §6.2, §6.6). Other frame
/// types' payloads are returned as they are (CONTINUATION carries nothing else).
pub fn header_block_fragment<'a>(
    header: &FrameHeader,
    payload: &'a [u8],
) -> Result<&'a [u8], FrameError> {
    let fixed = match header.kind {
        frame_type::HEADERS if header.flags & flags::PRIORITY != 0 => 5,
        frame_type::HEADERS => 0,
        frame_type::PUSH_PROMISE => 4,
        _ => return Ok(payload),
    };
    let mut rest = payload;
    let mut pad = 0usize;
    if header.flags & flags::PADDED != 0 {
        let (&n, after) = rest.split_first().ok_or(FrameError::BadPadding)?;
        pad = usize::from(n);
        rest = after;
    }
    rest = rest.get(fixed..).ok_or(FrameError::BadPadding)?;
    let keep = rest.len().checked_sub(pad).ok_or(FrameError::BadPadding)?;
    Ok(&rest[..keep])
}

/// The last SETTINGS_HEADER_TABLE_SIZE in a SETTINGS payload, if any.
#[must_use]
pub fn header_table_size(payload: &[u8]) -> Option<u32> {
    payload
        .as_chunks::<6>()
        .0
        .iter()
        .rev()
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == SETTINGS_HEADER_TABLE_SIZE)
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
}

/// Why a direction's framing was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// A frame header fell in bytes the kernel did not copy.
    HeaderNotCaptured,
    /// A frame header that no peer would send: the stream is not where we think.
    Implausible,
}

impl Lost {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Lost::HeaderNotCaptured => "frame header not captured",
            Lost::Implausible => "implausible frame header",
        }
    }
}

/// What a record held, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A frame starts: its header is complete.
    Frame(FrameHeader),
    /// Captured payload bytes of the current frame.
    Payload(&'a [u8]),
    /// Payload bytes of the current frame that moved but were not copied.
    Uncaptured(u32),
    /// The current frame's payload is complete.
    FrameEnd,
    /// Framing lost: the splitter says nothing more.
    Lost(Lost),
}

/// Cuts one direction of a connection into frames, record by record (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Splitter {
    /// Bytes of a frame header that a record boundary cut.
    partial: [u8; FRAME_HEADER_LEN],
    partial_len: u8,
    /// Payload bytes left in the current frame (`None` between frames).
    left: Option<u32>,
    lost: bool,
}

impl Splitter {
    /// Whether the framing was lost (then [`Self::feed`] reports nothing).
    #[must_use]
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// Feeds one record: `len` bytes moved, the first `data.len()` of them captured (more
    /// captured than moved is taken as `len`). Reports the pieces to `on`, in order.
    pub fn feed(&mut self, data: &[u8], len: u64, mut on: impl FnMut(Piece<'_>)) {
        let len = len.max(data.len() as u64);
        let mut at = 0u64;
        // Each turn consumes at least one byte, and turns that consume only uncaptured bytes
        // end the record or lose the framing: bounded by the captured bytes.
        for _ in 0..2 * data.len() + 4 {
            if self.lost || at >= len {
                return;
            }
            if let Some(left) = self.left {
                let n = u64::from(left).min(len - at);
                let captured_here = (data.len() as u64).saturating_sub(at).min(n);
                if captured_here > 0 {
                    let from = at as usize;
                    on(Piece::Payload(&data[from..from + captured_here as usize]));
                }
                if n > captured_here {
                    on(Piece::Uncaptured((n - captured_here) as u32));
                }
                at += n;
                self.left = Some(left - n as u32);
                if left as u64 == n {
                    self.left = None;
                    on(Piece::FrameEnd);
                }
                continue;
            }
            let Some(rest) = data.get(at as usize..).filter(|r| !r.is_empty()) else {
                self.lose(Lost::HeaderNotCaptured, &mut on);
                return;
            };
            let have = usize::from(self.partial_len);
            let take = (FRAME_HEADER_LEN - have).min(rest.len());
            self.partial[have..have + take].copy_from_slice(&rest[..take]);
            self.partial_len += take as u8;
            at += take as u64;
            if usize::from(self.partial_len) < FRAME_HEADER_LEN {
                continue; // the header goes on in the next record (or was not captured)
            }
            self.partial_len = 0;
            let Some(header) = FrameHeader::parse(&self.partial) else {
                return;
            };
            if !header.is_plausible() {
                self.lose(Lost::Implausible, &mut on);
                return;
            }
            on(Piece::Frame(header));
            if header.length == 0 {
                on(Piece::FrameEnd);
            } else {
                self.left = Some(header.length);
            }
        }
    }

    fn lose(&mut self, why: Lost, on: &mut impl FnMut(Piece<'_>)) {
        self.lost = true;
        on(Piece::Lost(why));
    }
}

/// Whether a record that starts a direction looks like whole HTTP/2 frames: at least one frame
/// header, every header captured of a known type and plausible, and the frames ending exactly
/// where the record does. A cheap test for connections whose start (preface, ALPN) was not
/// seen; never true for HTTP/1.x or TLS records.
#[must_use]
pub fn looks_like_frames(data: &[u8], len: u64) -> bool {
    let mut splitter = Splitter::default();
    let (mut frames, mut ok) = (0u32, true);
    splitter.feed(data, len, |piece| match piece {
        Piece::Frame(h) => {
            frames += 1;
            ok &= h.is_known_type();
        }
        Piece::Lost(_) => ok = false,
        _ => {}
    });
    ok && frames > 0 && splitter.left.is_none() && splitter.partial_len == 0
}

/// Whether a record that starts the server's direction begins with the server's connection
/// preface, a SETTINGS frame that is not an acknowledgement (RFC 9113 §3.4).
#[must_use]
pub fn starts_with_server_preface(data: &[u8]) -> bool {
    FrameHeader::parse(data).is_some_and(|h| {
        h.kind == frame_type::SETTINGS && h.flags & flags::ACK == 0 && h.is_plausible()
    })
}

#[cfg(test)]
#[path = "http2_tests.rs"]
mod tests;
