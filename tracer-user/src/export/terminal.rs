//! The embedded default exporter: one readable line per span on stdout, for the demo and for a
//! first look without a collector.

use std::{
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, UNIX_EPOCH},
};

use opentelemetry_sdk::Resource;

use crate::{
    clock::Clock,
    span::{HopSpan, Role, Value},
};

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

    pub fn print(&self, batch: &[(HopSpan, Clock)]) {
        let mut out = std::io::stdout().lock();
        if !self.header_printed.swap(true, Ordering::Relaxed) {
            let _ = writeln!(
                out,
                "# service {}: time (UTC)  trace  span  hop  duration  status  process  client -> server  [detail]",
                self.service
            );
        }
        for (span, clock) in batch {
            let _ = writeln!(out, "{}", format_span(span, clock));
        }
        let _ = out.flush();
    }
}

pub fn format_span(span: &HopSpan, clock: &Clock) -> String {
    let attr = |key: &str| {
        span.attr(key).map(|value| match value {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
        })
    };
    let text = |key: &str| attr(key).unwrap_or_else(|| "?".into());
    let duration = Duration::from_nanos(span.end_ns.saturating_sub(span.start_ns));
    let uncertain = attr("hoptrace.uncertain");
    let (status, detail) = match &span.error {
        Some(description) => ("ERROR", description.clone()),
        None => ("ok", String::new()),
    };
    let process = match (attr("process.executable.name"), attr("process.pid")) {
        (Some(name), Some(pid)) => format!("{name}[{pid}]"),
        _ => "-".into(),
    };
    let since_epoch = clock
        .to_system_time(span.start_ns)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs_of_day = since_epoch.as_secs() % 86_400;
    // The first 8 hex digits: enough to tell traces apart on a screen.
    let trace: String = span.ids.trace_id[..4]
        .iter()
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
            if span.role == Role::Server {
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
