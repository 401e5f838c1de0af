//! TLS record and handshake parsers: never panic, and a prefix never contradicts the whole
//! (what a cut ClientHello reports is what the whole one says).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_common::tls::{
    TlsError, looks_like_client_hello, parse_alert, parse_client_hello, parse_handshake_header,
    parse_record_header, parse_server_hello,
};

fuzz_target!(|data: &[u8]| {
    let _ = (looks_like_client_hello(data), parse_handshake_header(data), parse_alert(data));
    if let Ok(header) = parse_record_header(data) {
        assert!(header.length <= tracer_common::tls::MAX_RECORD_LEN);
    }
    let whole = parse_client_hello(data);
    if let Ok(h) = &whole {
        let _ = (h.max_version(), h.offers_tls13());
        let _ = h.alpn.map(|a| a.iter().count());
        let _ = h.supported_versions.map(|v| v.iter().count());
    }
    let cut = data.len() / 2;
    let prefix = data.get(..cut).unwrap_or_default();
    match (parse_client_hello(prefix), &whole) {
        (Ok(p), Ok(w)) => {
            assert!(!p.complete || cut == data.len() || p == *w);
            if p.server_name.is_some() {
                assert_eq!(p.server_name, w.server_name);
            }
            if let Some(v) = p.max_version().filter(|_| p.supported_versions.is_some()) {
                assert_eq!(Some(v), w.max_version());
            }
        }
        (Err(TlsError::Incomplete | TlsError::UnexpectedMessage), _) | (_, Err(_)) => {}
        (p, w) => assert_eq!(p.map(|_| ()), w.map(|_| ())),
    }
    if let Ok(h) = parse_server_hello(data) {
        let _ = h.negotiated_version();
    }
});
