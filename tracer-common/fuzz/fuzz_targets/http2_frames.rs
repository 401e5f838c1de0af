//! HTTP/2 frame splitter: never panics, never reports more payload than the record moved, and
//! a record cut anywhere gives the same frames as the whole (or says the framing was lost).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_common::http2::{
    FrameHeader, Piece, Splitter, header_block_fragment, header_table_size, looks_like_frames,
    starts_with_server_preface,
};

fn frames(records: &[(&[u8], u64)]) -> (Vec<FrameHeader>, bool) {
    let mut splitter = Splitter::default();
    let (mut headers, mut lost) = (Vec::new(), false);
    for (data, len) in records {
        let mut moved = 0u64;
        splitter.feed(data, *len, |piece| match piece {
            Piece::Frame(h) => headers.push(h),
            Piece::Payload(p) => moved += p.len() as u64,
            Piece::Uncaptured(n) => moved += u64::from(n),
            Piece::Lost(_) => lost = true,
            Piece::FrameEnd => {}
        });
        assert!(moved <= (*len).max(data.len() as u64));
    }
    (headers, lost)
}

fuzz_target!(|data: &[u8]| {
    let _ = (looks_like_frames(data, data.len() as u64), starts_with_server_preface(data));
    let _ = header_table_size(data);
    if let Some(h) = FrameHeader::parse(data) {
        let _ = header_block_fragment(&h, &data[9..]);
    }
    let (whole, whole_lost) = frames(&[(data, data.len() as u64)]);
    let cut = data.len() / 2;
    let (a, b) = data.split_at(cut);
    let (split, split_lost) = frames(&[(a, a.len() as u64), (b, b.len() as u64)]);
    assert_eq!((&whole, whole_lost), (&split, split_lost));
    // Only the first half captured: a prefix of the same frames.
    let (prefix, _) = frames(&[(a, data.len() as u64)]);
    assert_eq!(&whole[..prefix.len()], &prefix[..]);
});
