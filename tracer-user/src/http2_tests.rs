use proptest::prelude::*;
use tracer_common::http2::{PREFACE, flags};

use super::*;

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HEADERS frame with `fields` encoded by `encoder` (whose dynamic table, like a real
/// peer's, indexes what it sends).
pub(crate) fn headers(
    encoder: &mut loona_hpack::Encoder<'_>,
    stream: u32,
    end_stream: bool,
    fields: &[(&str, &str)],
) -> Vec<u8> {
    let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let end = if end_stream { flags::END_STREAM } else { 0 };
    frame(
        frame_type::HEADERS,
        flags::END_HEADERS | end,
        stream,
        &block,
    )
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn request(path: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".into()),
        (":scheme", "https".into()),
        (":authority", "persona.lab".into()),
        (":path", path.into()),
        ("user-agent", "curl/7.88.1".into()),
        ("traceparent", TRACEPARENT.into()),
    ]
}

fn encode_request(encoder: &mut loona_hpack::Encoder<'_>, stream: u32, path: &str) -> Vec<u8> {
    let fields = request(path);
    let borrowed: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
    headers(encoder, stream, true, &borrowed)
}

fn feed_all(direction: &mut Direction<u32>, records: &[(&[u8], u64, u32)]) -> Vec<Event<u32>> {
    let mut out = Vec::new();
    for (data, len, stamp) in records {
        direction.feed(data, *len, *stamp, &mut out);
    }
    out
}

fn decoded(stream: u32, first: u32, last: u32, path: &str) -> Event<u32> {
    Event::Headers {
        stream,
        first,
        last,
        fields: Fields {
            method: Some("GET".into()),
            path: Some(path.into()),
            status: None,
            traceparents: vec![TRACEPARENT.as_bytes().to_vec()],
            tracestate: None,
        },
        end_stream: true,
    }
}

#[test]
fn decodes_requests_through_the_dynamic_table() {
    let mut encoder = loona_hpack::Encoder::new();
    let mut start = PREFACE.to_vec();
    start.extend(frame(frame_type::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
    let first = encode_request(&mut encoder, 1, "/a?secret=1");
    // The second request names fields the first put in the table.
    let second = encode_request(&mut encoder, 3, "/b");
    assert!(second.len() < first.len(), "the table was used");
    let mut direction = Direction::from_client();
    let events = feed_all(
        &mut direction,
        &[
            (&start, start.len() as u64, 1),
            (&first, first.len() as u64, 2),
            (&second, second.len() as u64, 3),
        ],
    );
    assert_eq!(events, [decoded(1, 2, 2, "/a"), decoded(3, 3, 3, "/b")]);
}

#[test]
fn continuation_and_record_boundaries() {
    let mut encoder = loona_hpack::Encoder::new();
    let whole = encode_request(&mut encoder, 5, "/c");
    let block = &whole[9..];
    let (a, b) = block.split_at(block.len() / 2);
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(frame_type::HEADERS, flags::END_STREAM, 5, a));
    bytes.extend(frame(frame_type::CONTINUATION, flags::END_HEADERS, 5, b));
    // Cut in the preface and in the CONTINUATION's header.
    let cut1 = 10;
    let cut2 = PREFACE.len() + 9 + a.len() + 4;
    let mut direction = Direction::from_client();
    let events = feed_all(
        &mut direction,
        &[
            (&bytes[..cut1], cut1 as u64, 1),
            (&bytes[cut1..cut2], (cut2 - cut1) as u64, 2),
            (&bytes[cut2..], (bytes.len() - cut2) as u64, 3),
        ],
    );
    assert_eq!(events, [decoded(5, 2, 3, "/c")]);
}

#[test]
fn responses_statuses_and_stream_ends() {
    let mut encoder = loona_hpack::Encoder::new();
    let mut bytes = frame(frame_type::SETTINGS, 0, 0, &[0, 1, 0, 0, 0x20, 0]);
    bytes.extend(headers(&mut encoder, 1, false, &[(":status", "200")]));
    bytes.extend(frame(frame_type::DATA, 0, 1, b"hello"));
    bytes.extend(frame(frame_type::RST_STREAM, 0, 3, &[0, 0, 0, 8]));
    bytes.extend(frame(frame_type::DATA, flags::END_STREAM, 1, b""));
    let mut direction = Direction::from_server();
    let events = feed_all(&mut direction, &[(&bytes, bytes.len() as u64, 7)]);
    assert_eq!(
        events,
        [
            Event::HeaderTableSize(0x2000),
            Event::Headers {
                stream: 1,
                first: 7,
                last: 7,
                fields: Fields {
                    status: Some(200),
                    ..Fields::default()
                },
                end_stream: false,
            },
            Event::Reset { stream: 3 },
            Event::StreamEnd { stream: 1, at: 7 },
        ]
    );
}

#[test]
fn a_truncated_block_stops_decoding_but_not_timing() {
    let mut encoder = loona_hpack::Encoder::new();
    let big = "x".repeat(2000);
    let first = headers(
        &mut encoder,
        1,
        true,
        &[(":method", "GET"), (":path", "/big"), ("x-big", &big)],
    );
    let second = encode_request(&mut encoder, 3, "/after");
    let mut direction = Direction::from_server();
    // The kernel copied 1 KiB of the first block.
    let events = feed_all(
        &mut direction,
        &[
            (&first[..1024], first.len() as u64, 1),
            (&second, second.len() as u64, 2),
        ],
    );
    assert_eq!(
        events,
        [
            Event::HeadersNotDecoded {
                stream: 1,
                first: 1,
                last: 1,
                end_stream: true,
                reason: "header block larger than the captured prefix",
            },
            Event::HeadersNotDecoded {
                stream: 3,
                first: 2,
                last: 2,
                end_stream: true,
                reason: "HPACK state lost earlier on the connection",
            },
        ]
    );
}

#[test]
fn a_decoder_that_missed_the_start_errs_rather_than_guesses() {
    // Attached after the first request: its table entries are unknown here.
    let mut encoder = loona_hpack::Encoder::new();
    let _missed = encode_request(&mut encoder, 1, "/a");
    let second = encode_request(&mut encoder, 3, "/b");
    let mut direction = Direction::from_server();
    let events = feed_all(&mut direction, &[(&second, second.len() as u64, 1)]);
    assert!(
        matches!(
            &events[..],
            [Event::HeadersNotDecoded {
                reason: "HPACK decoding failed",
                ..
            }]
        ),
        "{events:?}"
    );
}

#[test]
fn table_size_beyond_what_was_allowed_is_not_decoded() {
    // A dynamic table size update to 8192 when only 4096 was advertised (RFC 7541 §6.3).
    let block = [0x3f, 0xe1, 0x3f, 0x82];
    let bytes = frame(frame_type::HEADERS, flags::END_HEADERS, 1, &block);
    let mut direction = Direction::<u32>::from_server();
    let events = feed_all(&mut direction, &[(&bytes, bytes.len() as u64, 1)]);
    assert!(
        matches!(&events[..], [Event::HeadersNotDecoded { .. }]),
        "{events:?}"
    );
    // Allowed once the peer advertised it.
    let mut direction = Direction::<u32>::from_server();
    direction.allow_table_size(8192);
    let events = feed_all(&mut direction, &[(&bytes, bytes.len() as u64, 1)]);
    assert!(matches!(&events[..], [Event::Headers { .. }]), "{events:?}");
    // Never beyond the hard cap.
    let mut direction = Direction::<u32>::from_server();
    direction.allow_table_size(u32::MAX);
    let huge = [0x3f, 0xe1, 0xff, 0x07, 0x82]; // 2^17 + 31 - 1 ... > 64 KiB
    let bytes = frame(frame_type::HEADERS, flags::END_HEADERS, 1, &huge);
    let events = feed_all(&mut direction, &[(&bytes, bytes.len() as u64, 1)]);
    assert!(
        matches!(&events[..], [Event::HeadersNotDecoded { .. }]),
        "{events:?}"
    );
}

#[test]
fn framing_errors_lose_the_direction() {
    let mut direction = Direction::<u32>::from_client();
    let events = feed_all(&mut direction, &[(b"GET / HTTP/1.1\r\n\r\n", 18, 1)]);
    assert_eq!(
        events,
        [Event::Lost {
            reason: "client preface not seen",
            at: 1
        }]
    );
    // Nothing more from a lost direction.
    let settings = frame(frame_type::SETTINGS, 0, 0, &[]);
    assert_eq!(feed_all(&mut direction, &[(&settings, 9, 2)]), []);
    // A DATA frame inside a header block.
    let mut bytes = frame(frame_type::HEADERS, 0, 1, &[0x82]);
    bytes.extend(frame(frame_type::DATA, 0, 1, b"x"));
    let mut direction = Direction::<u32>::from_server();
    let events = feed_all(&mut direction, &[(&bytes, bytes.len() as u64, 2)]);
    assert_eq!(
        events,
        [Event::Lost {
            reason: "header block interrupted",
            at: 2
        }]
    );
}

proptest! {
    /// Arbitrary records never panic, and nothing is decoded from an empty table but what the
    /// static table and literals say.
    #[test]
    fn never_panics(
        records in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..300), 0u64..400),
            0..6,
        ),
        client in any::<bool>(),
    ) {
        let mut direction = if client { Direction::from_client() } else { Direction::from_server() };
        let mut out = Vec::new();
        for (i, (data, len)) in records.iter().enumerate() {
            direction.feed(data, *len, i, &mut out);
        }
        prop_assert!(out.len() <= records.iter().map(|(d, _)| d.len() / 9 + 1).sum::<usize>());
    }

    /// Valid frames with HPACK blocks, cut anywhere into records: decoded the same.
    #[test]
    fn record_boundaries_do_not_matter(
        paths in proptest::collection::vec("/[a-z]{0,20}", 1..5),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
    ) {
        let mut encoder = loona_hpack::Encoder::new();
        let mut bytes = PREFACE.to_vec();
        for (i, path) in paths.iter().enumerate() {
            bytes.extend(encode_request(&mut encoder, 2 * i as u32 + 1, path));
        }
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        at.extend([0, bytes.len()]);
        at.sort_unstable();
        let mut direction = Direction::from_client();
        let mut out = Vec::new();
        for w in at.windows(2) {
            direction.feed(&bytes[w[0]..w[1]], (w[1] - w[0]) as u64, 0u32, &mut out);
        }
        let got: Vec<Option<String>> = out
            .iter()
            .map(|e| match e {
                Event::Headers { fields, .. } => fields.path.clone(),
                _ => None,
            })
            .collect();
        let want: Vec<Option<String>> = paths.iter().cloned().map(Some).collect();
        prop_assert_eq!(got, want);
    }
}
