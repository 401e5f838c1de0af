//! One direction of an HTTP/2 connection, decoded from its captured plaintext: frames (cut by
//! `tracer_common::http2::Splitter`), header blocks (HEADERS + CONTINUATION, and PUSH_PROMISE,
//! which changes the HPACK state too), HPACK with this direction's dynamic table, and stream
//! ends. Pure: records in, [`Event`]s out, no clock and no I/O; the per-connection stream
//! bookkeeping is in requests_http2.rs.
//!
//! Honesty over coverage: the kernel copies a bounded prefix of each record, so
//! - a header block with uncaptured bytes is not decoded, and since the block may have added
//!   entries to the dynamic table (every later index would then name the wrong field), no later
//!   block of the direction is decoded either ([`Event::HeadersNotDecoded`]);
//! - an HPACK error leaves the table in an unknown state: the same;
//! - a frame header in uncaptured bytes loses the framing ([`Event::Lost`]): nothing more.
//!
//! Frame headers carry stream ids and END_STREAM in the clear, so timing survives a lost HPACK
//! state; only the fields (method, path, status, trace context) need the table.
//!
//! Memory is bounded: a header block is kept up to [`MAX_HEADER_BLOCK`] bytes, the dynamic
//! table up to the size the peer advertised in SETTINGS_HEADER_TABLE_SIZE and never beyond
//! [`MAX_TABLE_SIZE`], and only the few fields hoptrace exports are copied out of a block.

use tracer_common::http2::{self, FrameHeader, Piece, Splitter, frame_type};

/// Header block bytes buffered at most (HEADERS + CONTINUATION); a larger block is not decoded.
const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// The largest dynamic table decoded, whatever the peer allows (RFC 7541 §4.2: the encoder may
/// use up to what the decoder's SETTINGS_HEADER_TABLE_SIZE allows; an encoder using more than
/// this makes its blocks "not decoded").
pub const MAX_TABLE_SIZE: usize = 64 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE before any SETTINGS (RFC 9113 §6.5.2).
const DEFAULT_TABLE_SIZE: usize = 4096;
/// Field values copied out of a block at most; longer ones are cut (path) or dropped.
const MAX_VALUE: usize = 1024;

/// The fields of a header block that hoptrace exports or needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    pub method: Option<String>,
    /// `:path` up to, not including, its query or fragment.
    pub path: Option<String>,
    pub status: Option<u16>,
    /// Every `traceparent` value (at most two kept: two already make it ambiguous).
    pub traceparents: Vec<Vec<u8>>,
    pub tracestate: Option<Vec<u8>>,
}

impl Fields {
    fn add(&mut self, name: &[u8], value: &[u8]) {
        let text = || String::from_utf8_lossy(&value[..value.len().min(MAX_VALUE)]).into_owned();
        match name {
            b":method" => self.method = Some(text()),
            b":path" => {
                let end = value
                    .iter()
                    .position(|&b| b == b'?' || b == b'#')
                    .unwrap_or(value.len());
                let path = &value[..end.min(MAX_VALUE)];
                self.path = Some(String::from_utf8_lossy(path).into_owned());
            }
            b":status" => {
                self.status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            }
            b"traceparent" if self.traceparents.len() < 2 && value.len() <= MAX_VALUE => {
                self.traceparents.push(value.to_vec());
            }
            b"traceparent" => {}
            b"tracestate" if self.tracestate.is_none() && value.len() <= MAX_VALUE => {
                self.tracestate = Some(value.to_vec());
            }
            _ => {}
        }
    }
}

/// What a direction's records said, in order. `S` is the caller's record stamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<S> {
    /// A header block on `stream` decoded; `first` is the record that moved its first byte,
    /// `last` the one that moved its last (END_STREAM, when set, takes effect there).
    Headers {
        stream: u32,
        first: S,
        last: S,
        fields: Fields,
        end_stream: bool,
    },
    /// A header block on `stream` that could not be decoded, and why.
    HeadersNotDecoded {
        stream: u32,
        first: S,
        last: S,
        end_stream: bool,
        reason: &'static str,
    },
    /// DATA with END_STREAM: the sender finished `stream`.
    StreamEnd { stream: u32, at: S },
    /// RST_STREAM: `stream` was cancelled.
    Reset { stream: u32 },
    /// The sender advertised SETTINGS_HEADER_TABLE_SIZE: it bounds the *other* direction's
    /// dynamic table.
    HeaderTableSize(u32),
    /// The direction can no longer be followed at all.
    Lost { reason: &'static str, at: S },
}

/// A header block being gathered.
struct Block<S> {
    stream: u32,
    first: S,
    bytes: Vec<u8>,
    end_stream: bool,
    /// Bytes were not captured, or the block outgrew [`MAX_HEADER_BLOCK`].
    incomplete: Option<&'static str>,
    /// A PUSH_PROMISE's block: decoded for the table's sake, reported as nothing.
    promise: bool,
}

/// The frame whose payload is arriving.
struct Current {
    header: FrameHeader,
    /// Payload kept for frames whose payload matters (header blocks, SETTINGS).
    payload: Vec<u8>,
    uncaptured: bool,
}

/// One direction of one connection.
pub struct Direction<S> {
    /// Client preface bytes still to skip (the client's direction starts with 24 of them).
    preface_left: usize,
    splitter: Splitter,
    state: State<S>,
}

/// What the frames built so far (apart from the splitter, which reports to it).
struct State<S> {
    current: Option<Current>,
    block: Option<Block<S>>,
    hpack: loona_hpack::Decoder<'static>,
    /// Why the HPACK state is unknown, once it is.
    hpack_lost: Option<&'static str>,
    lost: bool,
}

impl<S: Copy> Direction<S> {
    /// The client's direction, which starts with the connection preface.
    pub fn from_client() -> Self {
        Self::new(http2::PREFACE.len())
    }

    pub fn from_server() -> Self {
        Self::new(0)
    }

    fn new(preface_left: usize) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(DEFAULT_TABLE_SIZE);
        Self {
            preface_left,
            splitter: Splitter::default(),
            state: State {
                current: None,
                block: None,
                hpack,
                hpack_lost: None,
                lost: false,
            },
        }
    }

    /// The peer (the receiver of this direction) advertised SETTINGS_HEADER_TABLE_SIZE.
    pub fn allow_table_size(&mut self, size: u32) {
        let size = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .min(MAX_TABLE_SIZE);
        self.state.hpack.set_max_allowed_table_size(size);
    }

    /// One record of this direction: `len` bytes moved, `data` the captured prefix.
    pub fn feed(&mut self, data: &[u8], len: u64, stamp: S, out: &mut Vec<Event<S>>) {
        if self.state.lost {
            return;
        }
        let (mut data, mut len) = (data, len.max(data.len() as u64));
        if self.preface_left > 0 {
            let expected = &http2::PREFACE[http2::PREFACE.len() - self.preface_left..];
            let n = expected.len().min(len as usize);
            let captured = n.min(data.len());
            if data[..captured] != expected[..captured] || captured < n {
                self.state.lose("client preface not seen", stamp, out);
                return;
            }
            self.preface_left -= n;
            data = &data[n..];
            len -= n as u64;
        }
        let state = &mut self.state;
        self.splitter
            .feed(data, len, |piece| state.piece(piece, stamp, out));
    }
}

impl<S: Copy> State<S> {
    fn piece(&mut self, piece: Piece<'_>, stamp: S, out: &mut Vec<Event<S>>) {
        if self.lost {
            return; // the splitter goes on with frames that no longer mean anything here
        }
        match piece {
            Piece::Frame(header) => self.frame_starts(header, stamp, out),
            Piece::Payload(bytes) => {
                if let Some(current) = &mut self.current
                    && keeps_payload(current.header.kind)
                {
                    let room = MAX_HEADER_BLOCK.saturating_sub(current.payload.len());
                    current.uncaptured |= bytes.len() > room;
                    current
                        .payload
                        .extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
            }
            Piece::Uncaptured(_) => {
                if let Some(current) = &mut self.current {
                    current.uncaptured = true;
                }
            }
            Piece::FrameEnd => {
                if let Some(current) = self.current.take() {
                    self.frame_ends(current, stamp, out);
                }
            }
            Piece::Lost(why) => self.lose(why.as_str(), stamp, out),
        }
    }

    fn frame_starts(&mut self, header: FrameHeader, stamp: S, out: &mut Vec<Event<S>>) {
        // A header block must go on in CONTINUATION frames of its stream, and nothing else
        // (RFC 9113 §6.10): anything else means we are not where we think.
        let continues = header.kind == frame_type::CONTINUATION;
        match &self.block {
            Some(block) if !continues || header.stream_id != block.stream => {
                self.lose("header block interrupted", stamp, out);
                return;
            }
            None if continues => {
                self.lose("CONTINUATION without a header block", stamp, out);
                return;
            }
            _ => {}
        }
        if matches!(header.kind, frame_type::HEADERS | frame_type::PUSH_PROMISE) {
            self.block = Some(Block {
                stream: header.stream_id,
                first: stamp,
                bytes: Vec::new(),
                end_stream: header.ends_stream(),
                incomplete: None,
                promise: header.kind == frame_type::PUSH_PROMISE,
            });
        }
        self.current = Some(Current {
            header,
            payload: Vec::new(),
            uncaptured: false,
        });
    }

    fn frame_ends(&mut self, current: Current, stamp: S, out: &mut Vec<Event<S>>) {
        let Current {
            header,
            payload,
            uncaptured,
        } = current;
        match header.kind {
            frame_type::DATA if header.ends_stream() => out.push(Event::StreamEnd {
                stream: header.stream_id,
                at: stamp,
            }),
            frame_type::RST_STREAM => out.push(Event::Reset {
                stream: header.stream_id,
            }),
            frame_type::SETTINGS if header.flags & http2::flags::ACK == 0 => {
                if uncaptured {
                    // The table size may be in the bytes not seen: the other direction's bound
                    // stays as it was (its decoder errs, never guesses, if the encoder goes
                    // beyond it).
                    return;
                }
                if let Some(size) = http2::header_table_size(&payload) {
                    out.push(Event::HeaderTableSize(size));
                }
            }
            frame_type::HEADERS | frame_type::PUSH_PROMISE | frame_type::CONTINUATION => {
                let Some(block) = &mut self.block else {
                    return;
                };
                let fragment = if uncaptured {
                    Err("header block larger than the captured prefix")
                } else {
                    http2::header_block_fragment(&header, &payload).map_err(|_| "malformed padding")
                };
                match fragment {
                    Ok(f) if block.bytes.len() + f.len() <= MAX_HEADER_BLOCK => {
                        block.bytes.extend_from_slice(f);
                    }
                    Ok(_) => block.incomplete = Some("header block too large"),
                    Err(why) => block.incomplete = Some(why),
                }
                if header.ends_headers()
                    && let Some(block) = self.block.take()
                {
                    self.block_done(block, stamp, out);
                }
            }
            _ => {}
        }
    }

    fn block_done(&mut self, block: Block<S>, last: S, out: &mut Vec<Event<S>>) {
        let Block {
            stream,
            first,
            bytes,
            end_stream,
            incomplete,
            promise,
        } = block;
        if let Some(why) = incomplete.filter(|_| self.hpack_lost.is_none()) {
            // The block may have changed the table: every later block is suspect.
            self.hpack_lost = Some(why);
        }
        let decoded = match (incomplete, self.hpack_lost) {
            (Some(why), _) => Err(why),
            (None, Some(_)) => Err("HPACK state lost earlier on the connection"),
            (None, None) => {
                let mut fields = Fields::default();
                match self
                    .hpack
                    .decode_with_cb(&bytes, |name, value| fields.add(&name, &value))
                {
                    Ok(()) => Ok(fields),
                    Err(e) => {
                        log::debug!("HPACK error on stream {stream}: {e:?}");
                        self.hpack_lost = Some("HPACK decoding failed");
                        Err("HPACK decoding failed")
                    }
                }
            }
        };
        if promise {
            return;
        }
        out.push(match decoded {
            Ok(fields) => Event::Headers {
                stream,
                first,
                last,
                fields,
                end_stream,
            },
            Err(reason) => Event::HeadersNotDecoded {
                stream,
                first,
                last,
                end_stream,
                reason,
            },
        });
    }

    fn lose(&mut self, reason: &'static str, at: S, out: &mut Vec<Event<S>>) {
        self.lost = true;
        self.block = None;
        self.current = None;
        out.push(Event::Lost { reason, at });
    }
}

fn keeps_payload(kind: u8) -> bool {
    matches!(
        kind,
        frame_type::HEADERS
            | frame_type::PUSH_PROMISE
            | frame_type::CONTINUATION
            | frame_type::SETTINGS
    )
}

#[cfg(test)]
#[path = "http2_tests.rs"]
pub(crate) mod tests;
