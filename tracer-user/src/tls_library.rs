//! The TLS library's view of a handshake (tracer-ebpf's tls_openssl_handshake.rs): when the
//! application started it and when the library reported it done or failed, added to the
//! connection's `tls.handshake` span as events and attributes. The span's own times stay the
//! wire's (tls_handshake.rs): the library's edges say how much of the handshake the
//! application waited for beyond the bytes on the wire (its own CPU: key exchange, signing,
//! certificate checks; and its scheduling), and for a failure what the library concluded.

use tracer_common::handshake_call::{HandshakeCallEvent, function, outcome, ssl_error};

use crate::span::{HopSpan, Value};

/// Span events, in the order they happen on a client (the server's first handshake call comes
/// after the ClientHello arrived).
pub const STARTED: &str = "tls.library.handshake_start";
pub const DONE: &str = "tls.library.handshake_done";
pub const FAILED: &str = "tls.library.handshake_failed";

/// One completed handshake as the library reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryHandshake {
    started_ns: u64,
    returned_ns: u64,
    function: u8,
    failed: bool,
    ret: i32,
    ssl_error: i32,
    calls: u16,
}

impl From<&HandshakeCallEvent> for LibraryHandshake {
    fn from(event: &HandshakeCallEvent) -> Self {
        Self {
            started_ns: event.started_ns,
            returned_ns: event.header.ts_ns,
            function: event.function,
            failed: event.outcome != outcome::DONE,
            ret: event.ret,
            ssl_error: event.ssl_error,
            calls: event.calls,
        }
    }
}

impl LibraryHandshake {
    /// The library's verdict on a failed handshake.
    fn verdict(&self) -> String {
        let name = function::name(self.function);
        if self.ssl_error == ssl_error::NOT_ASKED {
            format!("{name} returned {}", self.ret)
        } else {
            format!(
                "{name} returned {}, SSL_get_error {} ({})",
                self.ret,
                ssl_error::name(self.ssl_error),
                self.ssl_error
            )
        }
    }

    /// Adds the library's events and attributes to the handshake span. A failure the wire did
    /// not show (an encrypted alert too large to be recognized, a peer that just went quiet)
    /// makes the span ERROR with the library's verdict.
    pub fn annotate(&self, span: &mut HopSpan) {
        span.events.push((STARTED, self.started_ns));
        span.events
            .push((if self.failed { FAILED } else { DONE }, self.returned_ns));
        span.events.sort_by_key(|&(_, at)| at);
        span.attributes.extend([
            ("hoptrace.tls.library", Value::from("openssl")),
            (
                "hoptrace.tls.library.function",
                function::name(self.function).into(),
            ),
            ("hoptrace.tls.library.calls", i64::from(self.calls).into()),
            (
                "hoptrace.tls.library.duration_ns",
                (self.returned_ns.saturating_sub(self.started_ns) as i64).into(),
            ),
        ]);
        if !self.failed {
            span.attributes
                .push(("hoptrace.tls.library.result", "done".into()));
            return;
        }
        let verdict = self.verdict();
        span.attributes.push((
            "hoptrace.tls.library.result",
            format!("failed: {verdict}").into(),
        ));
        if span.error.is_none() {
            span.error = Some(format!(
                "the TLS library reported the handshake failed: {verdict}"
            ));
            span.attributes
                .push(("error.type", "tls_library_failure".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::conn::EventHeader;

    use super::*;
    use crate::span::{Role, SpanIds};

    fn span(error: Option<&str>) -> HopSpan {
        HopSpan {
            ids: SpanIds::new_root(),
            name: "tls.handshake".into(),
            role: Role::Client,
            start_ns: 200,
            end_ns: 400,
            error: error.map(str::to_string),
            attributes: Vec::new(),
            events: vec![("tls.client_hello", 200), ("tls.handshake_done", 400)],
        }
    }

    fn event(outcome: u8, ret: i32, ssl_error: i32) -> HandshakeCallEvent {
        HandshakeCallEvent {
            header: EventHeader {
                ts_ns: 450,
                ..EventHeader::default()
            },
            started_ns: 150,
            enter_ns: 300,
            ret,
            ssl_error,
            calls: 2,
            function: function::SSL_CONNECT,
            outcome,
            ..HandshakeCallEvent::default()
        }
    }

    #[test]
    fn a_done_handshake_gets_the_library_edges_in_time_order() {
        let mut s = span(None);
        LibraryHandshake::from(&event(outcome::DONE, 1, ssl_error::NOT_ASKED)).annotate(&mut s);
        let names: Vec<_> = s.events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [STARTED, "tls.client_hello", "tls.handshake_done", DONE]
        );
        assert_eq!(s.error, None);
        assert_eq!(
            s.attr("hoptrace.tls.library.function"),
            Some(&Value::from("SSL_connect"))
        );
        assert_eq!(s.attr("hoptrace.tls.library.calls"), Some(&Value::Int(2)));
        assert_eq!(
            s.attr("hoptrace.tls.library.duration_ns"),
            Some(&Value::Int(300))
        );
        assert_eq!(
            s.attr("hoptrace.tls.library.result"),
            Some(&Value::from("done"))
        );
    }

    #[test]
    fn a_failure_keeps_the_wire_error_and_adds_the_verdict() {
        let mut s = span(Some("TLS alert sent before the handshake completed"));
        LibraryHandshake::from(&event(outcome::FAILED, -1, ssl_error::SSL)).annotate(&mut s);
        assert!(s.events.iter().any(|(n, at)| *n == FAILED && *at == 450));
        assert_eq!(
            s.error.as_deref(),
            Some("TLS alert sent before the handshake completed")
        );
        assert_eq!(
            s.attr("hoptrace.tls.library.result"),
            Some(&Value::from(
                "failed: SSL_connect returned -1, SSL_get_error SSL_ERROR_SSL (1)".to_string()
            ))
        );
        assert_eq!(s.attr("error.type"), None);
    }

    #[test]
    fn a_failure_the_wire_missed_makes_the_span_an_error() {
        let mut s = span(None);
        LibraryHandshake::from(&event(outcome::FAILED, 0, ssl_error::NOT_ASKED)).annotate(&mut s);
        assert_eq!(
            s.error.as_deref(),
            Some("the TLS library reported the handshake failed: SSL_connect returned 0")
        );
        assert_eq!(
            s.attr("error.type"),
            Some(&Value::from("tls_library_failure"))
        );
    }
}
