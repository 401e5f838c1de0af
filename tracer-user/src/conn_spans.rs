//! Connection lifecycle spans from the kernel's connection records. Pure: a record in, at most
//! one span out, no I/O and no clock (each record carries everything, see tracer-common::conn).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracer_common::conn::{AF_INET6, ConnEvent, ConnTransition};

use crate::span::{HopSpan, Role, SpanIds, Value};

/// Span names (stable: dashboards and tests rely on them).
pub const CONNECT: &str = "tcp.connect";
pub const ACCEPT: &str = "tcp.accept";
pub const ABORT: &str = "tcp.abort";

/// Which hop a socket's side stands for in the lab's vocabulary.
pub const HOP_AGENT: &str = "agent";
pub const HOP_PERSONA: &str = "persona";

pub fn span_for(event: &ConnEvent) -> Option<HopSpan> {
    let transition = ConnTransition::classify(event.oldstate, event.newstate)?;
    let end = event.header.ts_ns;
    let (name, role, start, error, mut attributes) = match transition {
        ConnTransition::ConnectDone => (CONNECT, Role::Client, event.phase_start_ns, None, vec![]),
        ConnTransition::ConnectFailed => {
            let (kind, why) = connect_failure(event.sk_err);
            let attributes = vec![("error.type", Value::from(kind))];
            (
                CONNECT,
                Role::Client,
                event.phase_start_ns,
                Some(why.to_string()),
                attributes,
            )
        }
        ConnTransition::AcceptDone => {
            // The SYN arrived one SYN-ACK round trip before the handshake completed, as the
            // kernel itself measured it. Without a sample (the SYN-ACK was retransmitted) the
            // start is unknown: say so rather than invent one.
            let rtt_ns = u64::from(event.srtt_us) * 1000;
            let attributes = if event.srtt_us == 0 {
                vec![(
                    "hoptrace.uncertain",
                    Value::from("start: no SYN-ACK round-trip sample"),
                )]
            } else {
                vec![("hoptrace.start_source", Value::from("synack_rtt"))]
            };
            (
                ACCEPT,
                Role::Server,
                end.saturating_sub(rtt_ns),
                None,
                attributes,
            )
        }
        ConnTransition::AcceptFailed => {
            let why = format!(
                "handshake aborted before establishment ({})",
                errno_name(event.sk_err)
            );
            (
                ACCEPT,
                Role::Server,
                end,
                Some(why),
                vec![("error.type", errno_name(event.sk_err).into())],
            )
        }
        ConnTransition::Aborted => {
            let (kind, why) = abort_reason(event.sk_err);
            (
                ABORT,
                Role::Internal,
                event.phase_start_ns,
                Some(why.to_string()),
                vec![("error.type", kind.into())],
            )
        }
        ConnTransition::ConnectStart | ConnTransition::Listen | ConnTransition::Closed => {
            return None;
        }
    };
    // A phase the kernel did not see start (socket older than the agent): a zero-length span at
    // the moment we know, flagged, never a made-up duration.
    let start = if start == 0 || start > end {
        attributes.push((
            "hoptrace.uncertain",
            "start: socket predates the agent".into(),
        ));
        end
    } else {
        start
    };
    let server_side = role == Role::Server;
    attributes.extend(common_attributes(event, server_side));
    Some(HopSpan {
        ids: SpanIds::new_root(),
        name: name.into(),
        role,
        start_ns: start,
        end_ns: end,
        error,
        attributes,
        events: Vec::new(),
    })
}

fn common_attributes(event: &ConnEvent, server_side: bool) -> Vec<(&'static str, Value)> {
    let local = address(event.family, &event.saddr);
    let peer = address(event.family, &event.daddr);
    let mut attributes = vec![
        (
            "hoptrace.hop",
            Value::from(if server_side { HOP_PERSONA } else { HOP_AGENT }),
        ),
        ("network.transport", "tcp".into()),
        (
            "network.type",
            (if event.family == AF_INET6 {
                "ipv6"
            } else {
                "ipv4"
            })
            .into(),
        ),
        ("network.local.address", local.to_string().into()),
        ("network.local.port", i64::from(event.sport).into()),
        ("network.peer.address", peer.to_string().into()),
        ("network.peer.port", i64::from(event.dport).into()),
        ("hoptrace.netns", i64::from(event.netns_ino).into()),
    ];
    let (server, server_port) = if server_side {
        (local, event.sport)
    } else {
        (peer, event.dport)
    };
    attributes.push(("server.address", server.to_string().into()));
    attributes.push(("server.port", i64::from(server_port).into()));
    if event.srtt_us != 0 {
        attributes.push(("hoptrace.tcp.srtt_us", i64::from(event.srtt_us).into()));
    }
    if event.header.tgid != 0 {
        attributes.push(("process.pid", i64::from(event.header.tgid).into()));
        attributes.push(("process.executable.name", comm(&event.comm).into()));
    }
    attributes
}

/// A kernel address field (IPv4 in the first 4 bytes) as an address of its family.
pub fn address(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// A NUL-padded `comm` as text.
pub fn comm(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

/// Why a connect() failed, from the socket error the kernel set (tcp_done_with_error).
fn connect_failure(sk_err: i32) -> (&'static str, &'static str) {
    match sk_err {
        libc::ECONNREFUSED => ("ECONNREFUSED", "connection refused: RST in reply to SYN"),
        libc::ETIMEDOUT => ("ETIMEDOUT", "connect timed out: no SYN-ACK after retries"),
        libc::EHOSTUNREACH => ("EHOSTUNREACH", "host unreachable (ICMP)"),
        libc::ENETUNREACH => ("ENETUNREACH", "network unreachable (ICMP)"),
        0 => (
            "aborted",
            "connect abandoned by the application before completion",
        ),
        other => (errno_name(other), "connect failed"),
    }
}

/// Why an established connection ended without a graceful close.
fn abort_reason(sk_err: i32) -> (&'static str, &'static str) {
    match sk_err {
        libc::ECONNRESET => ("ECONNRESET", "connection reset by peer"),
        libc::EPIPE => ("EPIPE", "connection reset by peer after its FIN"),
        libc::ETIMEDOUT => (
            "ETIMEDOUT",
            "connection timed out (retransmissions or keepalive)",
        ),
        0 => (
            "reset_sent",
            "connection reset locally (unread data at close, or SO_LINGER 0)",
        ),
        other => (errno_name(other), "connection aborted"),
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        0 => "none",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EPIPE => "EPIPE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::conn::{AF_INET, EventHeader, kind, tcp_state::*};

    use super::*;

    fn event(old: u8, new: u8) -> ConnEvent {
        ConnEvent {
            header: EventHeader {
                kind: kind::CONN,
                _pad: [0; 3],
                tgid: 4242,
                ts_ns: 50_000_000,
            },
            skaddr: 0xffff_8880_0000_1000,
            phase_start_ns: 30_000_000,
            netns_ino: 4026532000,
            sk_err: 0,
            srtt_us: 0,
            family: AF_INET,
            sport: 41000,
            dport: 80,
            oldstate: old,
            newstate: new,
            _pad: [0; 4],
            saddr: [10, 10, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 10, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn a_completed_connect_spans_from_connect_to_syn_ack() {
        let span = span_for(&event(SYN_SENT, ESTABLISHED)).unwrap();
        assert_eq!(
            (span.name.as_ref(), span.role, span.duration_ns()),
            (CONNECT, Role::Client, 20_000_000)
        );
        assert_eq!(span.error, None);
        assert_eq!(span.attr("hoptrace.hop"), Some(&Value::from(HOP_AGENT)));
        assert_eq!(
            span.attr("server.address"),
            Some(&Value::from("10.10.2.2".to_string()))
        );
        assert_eq!(span.attr("server.port"), Some(&Value::Int(80)));
        assert_eq!(
            span.attr("process.executable.name"),
            Some(&Value::from("curl".to_string()))
        );
        assert_eq!(span.attr("process.pid"), Some(&Value::Int(4242)));
    }

    #[test]
    fn a_refused_connect_is_an_error_with_the_reason() {
        let mut refused = event(SYN_SENT, CLOSE);
        refused.sk_err = libc::ECONNREFUSED;
        let span = span_for(&refused).unwrap();
        assert_eq!(span.name, CONNECT);
        assert!(span.error.as_deref().unwrap().contains("refused"));
        assert_eq!(span.attr("error.type"), Some(&Value::from("ECONNREFUSED")));
        let mut timed_out = refused;
        timed_out.sk_err = libc::ETIMEDOUT;
        assert!(
            span_for(&timed_out)
                .unwrap()
                .error
                .unwrap()
                .contains("timed out")
        );
    }

    #[test]
    fn an_accept_starts_one_syn_ack_round_trip_before_establishment() {
        let mut accepted = event(SYN_RECV, ESTABLISHED);
        accepted.srtt_us = 20_000;
        accepted.phase_start_ns = 0;
        let span = span_for(&accepted).unwrap();
        assert_eq!(
            (span.name.as_ref(), span.role, span.duration_ns()),
            (ACCEPT, Role::Server, 20_000_000)
        );
        assert_eq!(span.attr("hoptrace.hop"), Some(&Value::from(HOP_PERSONA)));
        assert_eq!(span.attr("server.port"), Some(&Value::Int(41000)));
    }

    #[test]
    fn unknown_starts_are_flagged_not_invented() {
        let mut accepted = event(SYN_RECV, ESTABLISHED);
        accepted.phase_start_ns = 0;
        let span = span_for(&accepted).unwrap();
        assert_eq!(span.duration_ns(), 0);
        assert!(span.attr("hoptrace.uncertain").is_some());
        let mut late = event(SYN_SENT, ESTABLISHED);
        late.phase_start_ns = 0;
        assert_eq!(span_for(&late).unwrap().duration_ns(), 0);
    }

    #[test]
    fn a_reset_is_an_error_span_over_the_connection() {
        let mut reset = event(ESTABLISHED, CLOSE);
        reset.sk_err = libc::ECONNRESET;
        let span = span_for(&reset).unwrap();
        assert_eq!((span.name.as_ref(), span.role), (ABORT, Role::Internal));
        assert!(span.error.unwrap().contains("reset by peer"));
    }

    #[test]
    fn transitions_that_stay_in_the_kernel_make_no_span() {
        assert_eq!(span_for(&event(CLOSE, SYN_SENT)), None);
        assert_eq!(span_for(&event(ESTABLISHED, 4)), None);
    }
}
