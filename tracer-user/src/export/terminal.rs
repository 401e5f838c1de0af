//! The embedded default exporter: one readable line per span on stdout, for the demo and for a
//! first look without a collector.

use std::{io::Write, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use prost::Message as _;

use super::otlp::attribute_text;

/// Prints the requests the batch loop encodes, decoded with the official types: one formatter
/// for hoptrace's spans and for those a correlator passes on, as a receiver would see them.
#[derive(Default)]
pub struct TerminalExporter {
    /// The service whose header was printed last: a new header when another one's spans come.
    service: Option<String>,
}

impl TerminalExporter {
    /// Prints an encoded `ExportTraceServiceRequest` on stdout.
    pub fn print(&mut self, request: &[u8]) {
        let request = match ExportTraceServiceRequest::decode(request) {
            Ok(request) => request,
            Err(e) => {
                log::warn!("cannot print a batch: {e}");
                return;
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = self.write(&request, &mut out).and_then(|()| out.flush());
    }

    fn write(
        &mut self,
        request: &ExportTraceServiceRequest,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        for resource_spans in &request.resource_spans {
            let resource = resource_spans.resource.as_ref();
            let service = resource
                .and_then(|r| attribute_text(&r.attributes, "service.name"))
                .unwrap_or_default();
            if self.service.as_deref() != Some(&*service) {
                writeln!(
                    out,
                    "# service {service}: time (UTC)  trace  span  hop  duration  status  process  client -> server  [detail]",
                )?;
                self.service = Some(service.into_owned());
            }
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                writeln!(out, "{}", format_span(span))?;
            }
        }
        Ok(())
    }
}

fn format_span(span: &Span) -> String {
    let attr = |key: &str| attribute_text(&span.attributes, key).map(|v| v.into_owned());
    let text = |key: &str| attr(key).unwrap_or_else(|| "?".into());
    let duration = Duration::from_nanos(
        span.end_time_unix_nano
            .saturating_sub(span.start_time_unix_nano),
    );
    let uncertain = attr("hoptrace.uncertain");
    let (status, detail) = match &span.status {
        Some(status) if status.code == StatusCode::Error as i32 => {
            ("ERROR", status.message.clone())
        }
        _ => ("ok", String::new()),
    };
    let process = match (attr("process.executable.name"), attr("process.pid")) {
        (Some(name), Some(pid)) => format!("{name}[{pid}]"),
        _ => "-".into(),
    };
    let since_epoch = Duration::from_nanos(span.start_time_unix_nano);
    let secs_of_day = since_epoch.as_secs() % 86_400;
    // The first 8 hex digits: enough to tell traces apart on a screen.
    let trace: String = span
        .trace_id
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = match (
        attr("http.request.method"),
        attr("url.path"),
        attr("http.response.status_code"),
    ) {
        (Some(method), Some(path), Some(status)) => format!("{method} {path} {status}"),
        _ if attr("network.peer.address").is_none() => format!("  - {}", span.name),
        _ => span.name.to_string(),
    };
    let flow = match (attr("network.local.address"), attr("network.peer.address")) {
        (Some(_), Some(_)) => {
            let local = format!(
                "{}:{}",
                text("network.local.address"),
                text("network.local.port")
            );
            let peer = format!(
                "{}:{}",
                text("network.peer.address"),
                text("network.peer.port")
            );
            // Always client -> server, whichever side observed it.
            if span.kind == SpanKind::Server as i32 {
                format!("{peer} -> {local}")
            } else {
                format!("{local} -> {peer}")
            }
        }
        _ => String::new(),
    };
    let mut line = format!(
        "{:02}:{:02}:{:02}.{:06}  {}  {:<22} {:<8} {}{:>9.3} ms  {:<5}  {:<16} {}",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        since_epoch.subsec_micros(),
        trace,
        name,
        text("hoptrace.hop"),
        if uncertain.is_some() { "~" } else { " " },
        duration.as_secs_f64() * 1e3,
        status,
        process,
        flow,
    );
    if !detail.is_empty() {
        line.push_str(&format!("  {detail}"));
    }
    if let Some(total) = attr("hoptrace.firewall.total_ns").and_then(|v| v.parse::<f64>().ok()) {
        let mode = text("hoptrace.firewall.mode");
        line.push_str(&format!(
            "  agent - persona = {:.3} ms ({mode})",
            total / 1e6
        ));
    }
    if let Some(why) = uncertain {
        line.push_str(&format!("  (uncertain {why})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        common::v1::{KeyValue as ProtoKeyValue, any_value},
        resource::v1::Resource as ProtoResource,
        trace::v1::{ResourceSpans, ScopeSpans},
    };

    use super::*;
    use crate::{
        clock::Clock,
        export::otlp::tests::{encoder_of, key_value},
        span::{HopSpan, Role, SpanIds, Value},
    };

    /// 2023-11-14 22:13:20 UTC, in ns.
    const NOON_NS: u64 = 1_700_000_000_000_000_000;

    fn string(key: &str, value: &str) -> ProtoKeyValue {
        key_value(key, any_value::Value::StringValue(value.into()))
    }

    fn int(key: &str, value: i64) -> ProtoKeyValue {
        key_value(key, any_value::Value::IntValue(value))
    }

    /// What another host's agent sent a correlator: its persona span.
    fn forwarded() -> ResourceSpans {
        ResourceSpans {
            resource: Some(ProtoResource {
                attributes: vec![string("service.name", "persona-host")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![0x12; 16],
                    span_id: vec![0x34; 8],
                    name: "GET".into(),
                    kind: SpanKind::Server as i32,
                    start_time_unix_nano: NOON_NS + 2_000_000,
                    end_time_unix_nano: NOON_NS + 2_250_000,
                    attributes: vec![
                        string("hoptrace.hop", "persona"),
                        string("http.request.method", "GET"),
                        string("url.path", "/"),
                        int("http.response.status_code", 200),
                        string("network.local.address", "10.10.2.2"),
                        int("network.local.port", 80),
                        string("network.peer.address", "10.10.2.1"),
                        int("network.peer.port", 41000),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn prints_own_and_forwarded_spans_under_their_services() {
        let mut batch = encoder_of("hoptrace");
        let firewall = HopSpan {
            ids: SpanIds {
                trace_id: [0xab; 16],
                span_id: [0xcd; 8],
                parent_id: Some([0x11; 8]),
                trace_state: None,
            },
            name: "firewall".into(),
            role: Role::Internal,
            start_ns: 1_000_000,
            end_ns: 4_000_000,
            error: Some("inconsistent".into()),
            attributes: vec![
                ("hoptrace.hop", "firewall".into()),
                ("hoptrace.firewall.total_ns", Value::Int(2_750_000)),
                ("hoptrace.firewall.mode", "proxy".into()),
                ("hoptrace.uncertain", "split estimated".into()),
            ],
            events: Vec::new(),
        };
        batch.push(&firewall, &Clock::with_offset(NOON_NS as i128));
        batch.push_forwarded(&forwarded());
        let request = ExportTraceServiceRequest::decode(&batch.take_request()[..]).unwrap();

        let mut printer = TerminalExporter::default();
        let mut out = Vec::new();
        printer.write(&request, &mut out).unwrap();
        printer.write(&request, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 8, "{out}");
        assert!(
            lines[0].starts_with("# service hoptrace: time (UTC)"),
            "{out}"
        );
        assert_eq!(
            lines[1],
            "22:13:20.001000  abababab    - firewall           firewall ~    3.000 ms  \
             ERROR  -                  inconsistent  agent - persona = 2.750 ms (proxy)  \
             (uncertain split estimated)"
        );
        assert!(lines[2].starts_with("# service persona-host: "), "{out}");
        assert_eq!(
            lines[3],
            "22:13:20.002000  12121212  GET / 200              persona       0.250 ms  ok     \
             -                10.10.2.1:41000 -> 10.10.2.2:80"
        );
        // A header again whenever the service changes, not for every batch.
        assert!(lines[4].starts_with("# service hoptrace: "), "{out}");
        assert_eq!(lines[5..], [lines[1], lines[2], lines[3]]);
    }
}
