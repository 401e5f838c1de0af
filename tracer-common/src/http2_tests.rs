use proptest::prelude::*;

use super::*;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Pieces as owned values, for comparisons.
#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Frame(FrameHeader),
    Payload(Vec<u8>),
    Uncaptured(u32),
    End,
    Lost(Lost),
}

/// Feeds records `(captured, len)` and collects the pieces, merging adjacent payload pieces.
fn split(records: &[(&[u8], u64)]) -> Vec<Owned> {
    let mut splitter = Splitter::default();
    let mut out = Vec::new();
    for (data, len) in records {
        splitter.feed(data, *len, |piece| {
            let owned = match piece {
                Piece::Frame(h) => Owned::Frame(h),
                Piece::Payload(p) => {
                    if let Some(Owned::Payload(before)) = out.last_mut() {
                        before.extend_from_slice(p);
                        return;
                    }
                    Owned::Payload(p.to_vec())
                }
                Piece::Uncaptured(n) => Owned::Uncaptured(n),
                Piece::FrameEnd => Owned::End,
                Piece::Lost(why) => Owned::Lost(why),
            };
            out.push(owned);
        });
    }
    out
}

fn header(kind: u8, flags: u8, stream_id: u32, length: u32) -> FrameHeader {
    FrameHeader {
        length,
        kind,
        flags,
        stream_id,
    }
}

#[test]
fn parses_frame_headers() {
    let f = frame(frame_type::HEADERS, 0x25, 0x8000_0003, b"abc");
    assert_eq!(
        FrameHeader::parse(&f),
        Some(header(frame_type::HEADERS, 0x25, 3, 3))
    );
    let h = FrameHeader::parse(&f).unwrap();
    assert!(h.ends_stream() && h.ends_headers() && h.is_plausible());
    assert_eq!(FrameHeader::parse(&f[..8]), None);
    // END_STREAM's bit is ACK on SETTINGS: not an end of stream.
    assert!(!header(frame_type::SETTINGS, flags::ACK, 0, 0).ends_stream());
}

#[test]
fn plausibility_by_type() {
    use frame_type::*;
    let table = [
        (header(DATA, 0, 1, 10), true),
        (header(DATA, 0, 0, 10), false),
        (header(HEADERS, 0, 0, 10), false),
        (header(PRIORITY, 0, 1, 5), true),
        (header(PRIORITY, 0, 1, 6), false),
        (header(RST_STREAM, 0, 1, 4), true),
        (header(SETTINGS, 0, 0, 18), true),
        (header(SETTINGS, 0, 0, 7), false),
        (header(SETTINGS, 0, 1, 6), false),
        (header(SETTINGS, flags::ACK, 0, 0), true),
        (header(SETTINGS, flags::ACK, 0, 6), false),
        (header(PING, 0, 0, 8), true),
        (header(GOAWAY, 0, 0, 8), true),
        (header(GOAWAY, 0, 0, 7), false),
        (header(WINDOW_UPDATE, 0, 0, 4), true),
        (header(WINDOW_UPDATE, 0, 5, 3), false),
        (header(0xfa, 0xff, 0, 77), true),
    ];
    for (h, plausible) in table {
        assert_eq!(h.is_plausible(), plausible, "{h:?}");
    }
}

#[test]
fn header_block_fragments() {
    let plain = header(frame_type::HEADERS, flags::END_HEADERS, 1, 3);
    assert_eq!(header_block_fragment(&plain, b"abc"), Ok(&b"abc"[..]));
    let padded = header(frame_type::HEADERS, flags::PADDED, 1, 6);
    assert_eq!(
        header_block_fragment(&padded, b"\x02abcxx"),
        Ok(&b"abc"[..])
    );
    let priority = header(frame_type::HEADERS, flags::PRIORITY | flags::PADDED, 1, 0);
    assert_eq!(
        header_block_fragment(&priority, b"\x01\x00\x00\x00\x03\x10ab-"),
        Ok(&b"ab"[..])
    );
    assert_eq!(
        header_block_fragment(&padded, b"\x09abc"),
        Err(FrameError::BadPadding)
    );
    assert_eq!(
        header_block_fragment(&padded, b""),
        Err(FrameError::BadPadding)
    );
    assert_eq!(
        header_block_fragment(&priority, b"\x00\x00\x00"),
        Err(FrameError::BadPadding)
    );
    let push = header(
        frame_type::PUSH_PROMISE,
        flags::PADDED | flags::PRIORITY,
        1,
        0,
    );
    assert_eq!(
        header_block_fragment(&push, b"\x01\x00\x00\x00\x02ab-"),
        Ok(&b"ab"[..])
    );
    let continuation = header(frame_type::CONTINUATION, 0, 1, 2);
    assert_eq!(
        header_block_fragment(&continuation, b"\x08z"),
        Ok(&b"\x08z"[..])
    );
}

#[test]
fn settings_header_table_size() {
    let mut payload = vec![0, 3, 0, 0, 0, 100]; // MAX_CONCURRENT_STREAMS
    assert_eq!(header_table_size(&payload), None);
    payload.extend_from_slice(&[0, 1, 0, 0, 0x10, 0]);
    payload.extend_from_slice(&[0, 1, 0, 0, 0x20, 0]);
    assert_eq!(header_table_size(&payload), Some(0x2000));
}

#[test]
fn splits_frames_across_records() {
    let a = frame(frame_type::SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]);
    let b = frame(frame_type::HEADERS, flags::END_HEADERS, 1, b"hpack");
    let mut all = a.clone();
    all.extend_from_slice(&b);
    // Cut inside b's header and inside its payload.
    let (r1, rest) = all.split_at(a.len() + 4);
    let (r2, r3) = rest.split_at(7);
    let expected = vec![
        Owned::Frame(header(frame_type::SETTINGS, 0, 0, 6)),
        Owned::Payload(vec![0, 1, 0, 0, 0x10, 0]),
        Owned::End,
        Owned::Frame(header(frame_type::HEADERS, flags::END_HEADERS, 1, 5)),
        Owned::Payload(b"hpack".to_vec()),
        Owned::End,
    ];
    assert_eq!(
        split(&[(r1, r1.len() as u64), (r2, 7), (r3, r3.len() as u64)]),
        expected
    );
    assert_eq!(split(&[(&all, all.len() as u64)]), expected);
}

#[test]
fn uncaptured_payload_is_skipped_by_length() {
    let data = frame(frame_type::DATA, 0, 1, &[7; 100]);
    let next = frame(frame_type::DATA, flags::END_STREAM, 1, b"");
    // Only the header and 10 payload bytes captured; the next record starts a frame.
    assert_eq!(
        split(&[(&data[..19], data.len() as u64), (&next, 9)]),
        vec![
            Owned::Frame(header(frame_type::DATA, 0, 1, 100)),
            Owned::Payload(vec![7; 10]),
            Owned::Uncaptured(90),
            Owned::End,
            Owned::Frame(header(frame_type::DATA, flags::END_STREAM, 1, 0)),
            Owned::End,
        ]
    );
}

#[test]
fn a_header_in_uncaptured_bytes_loses_the_framing() {
    let mut two = frame(frame_type::DATA, 0, 1, &[1; 4]);
    two.extend_from_slice(&frame(frame_type::DATA, 0, 1, &[2; 4]));
    let pieces = split(&[(&two[..15], two.len() as u64), (&two, two.len() as u64)]);
    assert_eq!(
        pieces,
        vec![
            Owned::Frame(header(frame_type::DATA, 0, 1, 4)),
            Owned::Payload(vec![1; 4]),
            Owned::End,
            Owned::Lost(Lost::HeaderNotCaptured),
        ]
    );
}

#[test]
fn an_implausible_header_loses_the_framing() {
    let bad = frame(frame_type::HEADERS, 0, 0, b"x");
    assert_eq!(
        split(&[(&bad, bad.len() as u64)]),
        vec![Owned::Lost(Lost::Implausible)]
    );
}

#[test]
fn recognises_starts_of_directions() {
    let settings = frame(frame_type::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
    assert!(starts_with_server_preface(&settings));
    assert!(!starts_with_server_preface(&frame(
        frame_type::SETTINGS,
        flags::ACK,
        0,
        b""
    )));
    assert!(!starts_with_server_preface(b"HTTP/1.1 200 OK\r\n"));
    assert!(looks_like_frames(&settings, settings.len() as u64));
    let mut two = frame(frame_type::HEADERS, flags::END_HEADERS, 3, b"abc");
    two.extend_from_slice(&frame(frame_type::DATA, flags::END_STREAM, 3, &[0; 50]));
    assert!(looks_like_frames(&two[..25], two.len() as u64));
    // Frames must end where the record does.
    assert!(!looks_like_frames(&two, two.len() as u64 + 3));
    assert!(!looks_like_frames(&two[..5], 5));
    // A frame header cut by the capture limit: not enough to tell.
    assert!(!looks_like_frames(&two[..20], two.len() as u64));
    assert!(!looks_like_frames(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27));
    assert!(!looks_like_frames(
        &[0x16, 3, 1, 0, 0x40, 1, 0, 0, 0x3c],
        69
    ));
    assert!(!looks_like_frames(PREFACE, 24));
}

/// Frames as a peer would write them: any type, plausible shapes.
fn arb_frames() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        (
            0u8..12,
            any::<u8>(),
            1u32..10,
            proptest::collection::vec(any::<u8>(), 0..300),
        ),
        0..8,
    )
    .prop_map(|frames| {
        let mut bytes = Vec::new();
        for (kind, flags, stream, mut payload) in frames {
            let h = header(kind, flags, stream, payload.len() as u32);
            let mut h = h;
            if !h.is_plausible() {
                // Make it a DATA frame, always plausible on a stream.
                h.kind = frame_type::DATA;
                payload.truncate(payload.len());
            }
            bytes.extend_from_slice(&frame(h.kind, h.flags, h.stream_id, &payload));
        }
        bytes
    })
}

proptest! {
    #[test]
    fn never_panics(
        records in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..64), 0u64..200),
            0..6,
        ),
    ) {
        let mut splitter = Splitter::default();
        for (data, len) in &records {
            let mut moved = 0u64;
            splitter.feed(data, *len, |piece| {
                if let Piece::Payload(p) = piece { moved += p.len() as u64 }
                if let Piece::Uncaptured(n) = piece { moved += u64::from(n) }
            });
            prop_assert!(moved <= (*len).max(data.len() as u64));
            let _ = (looks_like_frames(data, *len), starts_with_server_preface(data));
            let _ = header_table_size(data);
            if let Some(h) = FrameHeader::parse(data) {
                let _ = header_block_fragment(&h, &data[9..]);
            }
        }
    }

    /// However the stream is cut into records, the frames are the same.
    #[test]
    fn record_boundaries_do_not_matter(
        bytes in arb_frames(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let whole = split(&[(&bytes, bytes.len() as u64)]);
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        let records: Vec<(&[u8], u64)> = at
            .windows(2)
            .map(|w| (&bytes[w[0]..w[1]], (w[1] - w[0]) as u64))
            .collect();
        prop_assert_eq!(split(&records), whole);
    }

    /// Capturing a prefix of a record either yields the same frames with some payload bytes
    /// uncaptured, or loses the framing: never different frames.
    #[test]
    fn truncation_never_invents_frames(bytes in arb_frames(), keep in any::<prop::sample::Index>()) {
        let whole: Vec<FrameHeader> = split(&[(&bytes, bytes.len() as u64)])
            .into_iter()
            .filter_map(|p| if let Owned::Frame(h) = p { Some(h) } else { None })
            .collect();
        let cut = keep.index(bytes.len() + 1);
        let pieces = split(&[(&bytes[..cut], bytes.len() as u64)]);
        let seen: Vec<FrameHeader> = pieces
            .iter()
            .filter_map(|p| if let Owned::Frame(h) = p { Some(*h) } else { None })
            .collect();
        prop_assert_eq!(&whole[..seen.len()], &seen[..]);
        if seen.len() < whole.len() {
            prop_assert_eq!(pieces.last(), Some(&Owned::Lost(Lost::HeaderNotCaptured)));
        }
    }
}
