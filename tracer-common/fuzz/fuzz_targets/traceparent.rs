//! `traceparent` and `tracestate` values: never panic, and a parsed `traceparent` re-formats to
//! a value that parses back to the same ids and flags.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_common::trace_context::{TraceParent, parse_traceparent, validate_tracestate};

fuzz_target!(|data: &[u8]| {
    if let Ok(tp) = parse_traceparent(data) {
        let again = parse_traceparent(&tp.to_bytes()).expect("formatted traceparent parses");
        assert_eq!(again, TraceParent { version: 0, ..tp });
    }
    if let Ok(members) = validate_tracestate(data) {
        assert!(members <= 32);
    }
});
