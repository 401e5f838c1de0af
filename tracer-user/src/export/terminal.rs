//! The embedded default exporter: one readable line per span on stdout, for the demo and for a
//! first look without a collector.

use std::{
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
    time::UNIX_EPOCH,
};

use opentelemetry::{Value, trace::Status};
use opentelemetry_sdk::{Resource, trace::SpanData};

pub struct TerminalExporter {
    header_printed: AtomicBool,
    service: String,
}

impl TerminalExporter {
    pub fn new(resource: Resource) -> Self {
        let service = resource
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        Self {
            header_printed: AtomicBool::new(false),
            service,
        }
    }

    pub fn print(&self, batch: &[SpanData]) {
        let mut out = std::io::stdout().lock();
        if !self.header_printed.swap(true, Ordering::Relaxed) {
            let _ = writeln!(
                out,
                "# service {}: time (UTC)  trace  span  hop  duration  status  process  client -> server  [detail]",
                self.service
            );
        }
        for span in batch {
            let _ = writeln!(out, "{}", format_span(span));
        }
        let _ = out.flush();
    }
}

pub fn format_span(span: &SpanData) -> String {
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| match &kv.value {
                Value::String(s) => s.as_str().to_string(),
                other => other.to_string(),
            })
    };
    let text = |key: &str| attr(key).unwrap_or_else(|| "?".into());
    let duration = span
        .end_time
        .duration_since(span.start_time)
        .unwrap_or_default();
    let uncertain = attr("hoptrace.uncertain");
    let (status, detail) = match &span.status {
        Status::Error { description } => ("ERROR", description.to_string()),
        _ => ("ok", String::new()),
    };
    let process = match (attr("process.executable.name"), attr("process.pid")) {
        (Some(name), Some(pid)) => format!("{name}[{pid}]"),
        _ => "-".into(),
    };
    let since_epoch = span
        .start_time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs_of_day = since_epoch.as_secs() % 86_400;
    let trace = span.span_context.trace_id().to_string();
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
            if span.span_kind == opentelemetry::trace::SpanKind::Server {
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
        &trace[..8],
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
