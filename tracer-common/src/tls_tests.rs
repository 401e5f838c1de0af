#![expect(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    reason = "tests index known-good fixtures and panic on failure"
)]

extern crate std;

use std::vec::Vec;

use proptest::prelude::*;

use super::*;

/// Real records, captured from curl 7.88 / OpenSSL 3.0 (python's ssl module driving the same
/// libssl nginx uses, through memory BIOs) against a server certificate for `persona.lab`:
/// see testdata/tls/README.md.
macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../testdata/tls/", $name, ".bin")).as_slice()
    };
}

/// The records of a flight: (header, body) in order.
fn records(mut bytes: &[u8]) -> Vec<(RecordHeader, &[u8])> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let header = parse_record_header(bytes).unwrap();
        let end = RECORD_HEADER_LEN + usize::from(header.length);
        out.push((header, &bytes[RECORD_HEADER_LEN..end]));
        bytes = &bytes[end..];
    }
    out
}

/// The first handshake message of the flight's first record, its header first.
fn first_message(flight: &[u8], want: u8) -> &[u8] {
    let (header, body) = records(flight)[0];
    assert_eq!(header.content_type, ContentType::Handshake);
    let hs = parse_handshake_header(body).unwrap();
    assert_eq!(hs.msg_type, want);
    &body[..HANDSHAKE_HEADER_LEN + hs.length as usize]
}

fn names<'a>(list: AlpnList<'a>) -> Vec<&'a [u8]> {
    list.iter().collect()
}

#[test]
fn record_headers_of_real_flights() {
    use ContentType::*;
    let kinds = |flight: &[u8]| -> Vec<(ContentType, u16, u16)> {
        records(flight)
            .iter()
            .map(|(h, _)| (h.content_type, h.legacy_version, h.length))
            .collect()
    };
    // A first ClientHello says 1.0 on the record layer, whatever it offers.
    assert_eq!(
        kinds(fixture!("curl_tls13_client_hello")),
        [(Handshake, 0x0301, 512)]
    );
    assert_eq!(
        kinds(fixture!("curl_tls12_client_hello")),
        [(Handshake, 0x0301, 217)]
    );
    // TLS 1.3, middlebox compatibility mode: CCS, then the encrypted Finished as app data.
    assert_eq!(
        kinds(fixture!("openssl_tls13_client_finished_flight")),
        [(ChangeCipherSpec, 0x0303, 1), (ApplicationData, 0x0303, 69)]
    );
    // TLS 1.2: ClientKeyExchange, CCS, Finished (encrypted, still a handshake record).
    assert_eq!(
        kinds(fixture!("openssl_tls12_client_finished_flight")),
        [
            (Handshake, 0x0303, 37),
            (ChangeCipherSpec, 0x0303, 1),
            (Handshake, 0x0303, 40)
        ]
    );
    let server13 = kinds(fixture!("openssl_tls13_server_flight"));
    assert_eq!(server13[0].0, Handshake);
    assert_eq!(server13[1].0, ChangeCipherSpec);
    assert!(server13[2..].iter().all(|k| k.0 == ApplicationData));
}

#[test]
fn record_header_validity() {
    type Want = Result<(ContentType, u16, u16), TlsError>;
    let cases: &[(&[u8], Want)] = &[
        (b"", Err(TlsError::Incomplete)),
        (&[22], Err(TlsError::Incomplete)),
        (&[22, 3], Err(TlsError::Incomplete)),
        (&[22, 3, 1, 0], Err(TlsError::Incomplete)),
        (&[22, 3, 1, 0, 5], Ok((ContentType::Handshake, 0x0301, 5))),
        (
            &[23, 3, 3, 0, 0],
            Ok((ContentType::ApplicationData, 0x0303, 0)),
        ),
        (&[21, 3, 3, 0, 0], Err(TlsError::InvalidLength)),
        (&[23, 3, 3, 0x48, 0x01], Err(TlsError::InvalidLength)),
        (
            &[23, 3, 3, 0x48, 0x00],
            Ok((ContentType::ApplicationData, 0x0303, 0x4800)),
        ),
        (b"GET / HTTP/1.1\r\n", Err(TlsError::InvalidContentType)),
        (&[22, 2, 0, 0, 1], Err(TlsError::InvalidVersion)),
        (&[22, 4], Err(TlsError::InvalidVersion)),
        (&[22, 3, 5, 0, 1], Err(TlsError::InvalidVersion)),
        (&[0x80, 0x2e, 0x01], Err(TlsError::InvalidContentType)), // SSLv2 hello
    ];
    for (bytes, want) in cases {
        let got = parse_record_header(bytes).map(|h| (h.content_type, h.legacy_version, h.length));
        assert_eq!(got, *want, "{bytes:02x?}");
    }
    assert!(looks_like_client_hello(fixture!("curl_tls12_client_hello")));
    assert!(!looks_like_client_hello(fixture!(
        "openssl_tls13_server_flight"
    )));
    assert!(!looks_like_client_hello(b"\x16\x03\x01\x00"));
}

#[test]
fn client_hellos() {
    struct Case {
        name: &'static str,
        flight: &'static [u8],
        sni: Option<&'static [u8]>,
        alpn: Option<&'static [&'static [u8]]>,
        max_version: u16,
    }
    let cases = [
        Case {
            name: "curl, TLS 1.3 capable",
            flight: fixture!("curl_tls13_client_hello"),
            sni: Some(b"persona.lab"),
            alpn: Some(&[b"h2", b"http/1.1"]),
            max_version: version::TLS_1_3,
        },
        Case {
            name: "curl --tls-max 1.2: no supported_versions, so 1.2 from legacy_version",
            flight: fixture!("curl_tls12_client_hello"),
            sni: Some(b"persona.lab"),
            alpn: Some(&[b"h2", b"http/1.1"]),
            max_version: version::TLS_1_2,
        },
        Case {
            name: "OpenSSL via python, 1.3",
            flight: fixture!("openssl_tls13_client_hello"),
            sni: Some(b"persona.lab"),
            alpn: Some(&[b"h2", b"http/1.1"]),
            max_version: version::TLS_1_3,
        },
    ];
    for case in cases {
        let hello =
            parse_client_hello(first_message(case.flight, handshake_type::CLIENT_HELLO)).unwrap();
        assert!(hello.complete, "{}", case.name);
        assert_eq!(hello.legacy_version, version::TLS_1_2, "{}", case.name);
        assert_eq!(hello.server_name, case.sni, "{}", case.name);
        assert_eq!(hello.alpn.map(names).as_deref(), case.alpn, "{}", case.name);
        assert_eq!(hello.max_version(), Some(case.max_version), "{}", case.name);
        assert_eq!(
            hello.offers_tls13(),
            Some(case.max_version == version::TLS_1_3),
            "{}",
            case.name
        );
    }
}

#[test]
fn client_hello_cut_anywhere_returns_only_whole_fields() {
    let message = first_message(
        fixture!("curl_tls13_client_hello"),
        handshake_type::CLIENT_HELLO,
    );
    let whole = parse_client_hello(message).unwrap();
    for cut in 0..message.len() {
        match parse_client_hello(&message[..cut]) {
            Err(e) => assert_eq!(e, TlsError::Incomplete, "cut {cut}"),
            Ok(part) => {
                assert!(!part.complete, "cut {cut}");
                // Whatever a prefix reports agrees with the whole.
                if let Some(sni) = part.server_name {
                    assert_eq!(Some(sni), whole.server_name);
                }
                if let Some(alpn) = part.alpn {
                    assert_eq!(Some(names(alpn)), whole.alpn.map(names));
                }
                if let Some(v) = part.max_version() {
                    assert_eq!(Some(v), whole.max_version(), "cut {cut}");
                }
            }
        }
    }
}

#[test]
fn server_hellos() {
    let s13 = parse_server_hello(first_message(
        fixture!("openssl_tls13_server_flight"),
        handshake_type::SERVER_HELLO,
    ))
    .unwrap();
    assert_eq!(s13.legacy_version, version::TLS_1_2);
    assert_eq!(s13.negotiated_version(), Some(version::TLS_1_3));
    assert_eq!(
        cipher_suite_name(s13.cipher_suite),
        Some("TLS_AES_256_GCM_SHA384")
    );
    // ALPN is in the encrypted EncryptedExtensions in 1.3: not visible here.
    assert_eq!(s13.alpn, None);
    assert!(!s13.hello_retry_request);

    let s12 = parse_server_hello(first_message(
        fixture!("openssl_tls12_server_flight"),
        handshake_type::SERVER_HELLO,
    ))
    .unwrap();
    assert_eq!(s12.negotiated_version(), Some(version::TLS_1_2));
    assert_eq!(s12.selected_version, None);
    assert_eq!(s12.alpn, Some(b"http/1.1".as_slice()));
    assert_eq!(
        cipher_suite_name(s12.cipher_suite),
        Some("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384")
    );

    // Cut: selected_version is reported only when seen whole, and then it is the version.
    let message = first_message(
        fixture!("openssl_tls13_server_flight"),
        handshake_type::SERVER_HELLO,
    );
    for cut in 0..message.len() {
        match parse_server_hello(&message[..cut]) {
            Err(e) => assert_eq!(e, TlsError::Incomplete, "cut {cut}"),
            Ok(part) => {
                assert!(!part.complete, "cut {cut}");
                assert!(
                    part.negotiated_version()
                        .is_none_or(|v| v == version::TLS_1_3)
                );
            }
        }
    }
    // The handshake header says which message it is.
    assert_eq!(
        parse_client_hello(message),
        Err(TlsError::UnexpectedMessage)
    );

    // HelloRetryRequest: the fixed random (RFC 8446 §4.1.3).
    let mut hrr = message.to_vec();
    hrr[6..38].copy_from_slice(&HELLO_RETRY_REQUEST_RANDOM);
    assert!(parse_server_hello(&hrr).unwrap().hello_retry_request);
}

#[test]
fn alerts() {
    // Both captures: the client rejecting the server's certificate (no trusted CA). OpenSSL
    // sends it in the clear in 1.3 too: its handshake write keys are not installed yet.
    for flight in [
        fixture!("openssl_tls12_unknown_ca_alert"),
        fixture!("openssl_tls13_unknown_ca_alert"),
    ] {
        let (header, body) = records(flight)[0];
        assert_eq!(header.content_type, ContentType::Alert);
        let alert = parse_alert(body).unwrap();
        assert_eq!(
            (alert.level_name(), alert.description_name()),
            ("fatal", Some("unknown_ca"))
        );
        assert!(alert.is_fatal());
    }
    assert_eq!(parse_alert(&[2]), Err(TlsError::Incomplete));
    assert_eq!(parse_alert(&[2, 40, 0]), Err(TlsError::Malformed));
    assert_eq!(
        parse_alert(&[1, 0]).unwrap().description_name(),
        Some("close_notify")
    );
    assert_eq!(parse_alert(&[2, 255]).unwrap().description_name(), None);
}

#[test]
fn grease_and_names() {
    assert!(is_grease(0x0a0a) && is_grease(0xfafa));
    assert!(!is_grease(0x0a1a) && !is_grease(version::TLS_1_3));
    assert_eq!(version_name(version::TLS_1_3), Some("1.3"));
    assert_eq!(version_name(0x7f1c), None);
    assert_eq!(protocol_name(version::SSL_3_0), "ssl");
}

proptest! {
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_record_header(&bytes);
        let _ = looks_like_client_hello(&bytes);
        let _ = parse_handshake_header(&bytes);
        if let Ok(h) = parse_client_hello(&bytes) {
            let _ = (h.max_version(), h.offers_tls13(), h.alpn.map(names));
        }
        if let Ok(h) = parse_server_hello(&bytes) {
            let _ = h.negotiated_version();
        }
        let _ = parse_alert(&bytes);
    }

    #[test]
    fn scribbled_client_hello_never_panics(
        at in 0usize..512,
        value in any::<u8>(),
        cut in 0usize..512,
    ) {
        // Start from a real hello and corrupt one byte, to reach the extension parsing.
        let message =
            first_message(fixture!("curl_tls13_client_hello"), handshake_type::CLIENT_HELLO);
        let mut bytes = message.to_vec();
        let at = at % bytes.len();
        bytes[at] = value;
        bytes.truncate(cut.max(1));
        if let Ok(h) = parse_client_hello(&bytes) {
            let _ = (h.max_version(), h.alpn.map(names));
            prop_assert!(h.server_name.is_none_or(|n| n.len() <= bytes.len()));
        }
    }
}

#[test]
fn a_repeated_extension_is_malformed() {
    // Found by the fuzzer: two supported_versions made a prefix and the whole disagree.
    let hello: &[u8] = &[
        1, 0, 0, 57, 3, 3, // ClientHello, 57 bytes, legacy_version 1.2
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // random
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
        0, 0, 2, 0x13, 0x01, 1, 0, // no session id, one suite, null compression
        0, 14, // extensions
        0, 43, 0, 3, 2, 3, 4, // supported_versions: 1.3
        0, 43, 0, 3, 2, 3, 3, // again: 1.2
    ];
    assert_eq!(parse_client_hello(hello), Err(TlsError::Malformed));
    assert_eq!(
        parse_client_hello(&hello[..54]).unwrap().max_version(),
        Some(version::TLS_1_3)
    );
}
