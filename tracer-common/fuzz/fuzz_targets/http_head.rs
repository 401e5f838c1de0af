//! HTTP/1.x heads: never panic, every accessor is safe on whatever parsed, and a prefix never
//! contradicts the whole (same error, or a consistent partial head).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_common::http::{
    HttpError, looks_like_request, looks_like_response, parse_request_head, parse_response_head,
};

fuzz_target!(|data: &[u8]| {
    let _ = (looks_like_request(data), looks_like_response(data));

    let whole = parse_request_head(data);
    if let Ok(h) = &whole {
        let _ = (h.path(), h.header(b"traceparent"), h.content_length());
        let _ = (h.is_chunked(), h.connection_close());
        assert_eq!(h.headers.iter().count(), h.headers.len());
        assert_eq!(h.complete, h.head_len.is_some());
        assert!(h.head_len.is_none_or(|n| n <= data.len()));
    }
    // One prefix per input keeps runs fast; the fuzzer varies the length.
    let cut = data.len() / 2;
    let prefix = data.get(..cut).unwrap_or_default();
    match (parse_request_head(prefix), &whole) {
        (Err(HttpError::Incomplete), _) => {}
        (Err(e), w) => assert_eq!(Err(e), w.map(|_| ())),
        (Ok(p), Ok(w)) => {
            assert_eq!((p.method, p.target), (w.method, w.target));
            assert!(p.headers.iter().zip(w.headers.iter()).all(|(a, b)| a == b));
            if p.complete {
                assert_eq!(p, *w);
            }
        }
        (Ok(p), Err(_)) => assert!(!p.complete),
    }

    if let Ok(h) = parse_response_head(data) {
        let _ = (h.header(b"traceparent"), h.content_length(), h.is_chunked());
        let _ = h.connection_close();
        assert_eq!(h.headers.iter().count(), h.headers.len());
    }
});
