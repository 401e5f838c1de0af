//! HopSpan -> OpenTelemetry SpanData, and the OTLP exporter.

use std::time::Duration;

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::Protocol;
use crate::{
    clock::Clock,
    span::{HopSpan, Role, Value},
};

/// Built once: every span carries the same scope.
static SCOPE: std::sync::LazyLock<InstrumentationScope> = std::sync::LazyLock::new(|| {
    InstrumentationScope::builder("hoptrace")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
});

pub fn to_span_data(span: &HopSpan, clock: &Clock) -> SpanData {
    let trace_state = span
        .ids
        .trace_state
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        TraceId::from_bytes(span.ids.trace_id),
        SpanId::from_bytes(span.ids.span_id),
        TraceFlags::SAMPLED,
        false,
        trace_state,
    );
    SpanData {
        span_context: context,
        parent_span_id: span
            .ids
            .parent_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        // The parent is the SDK's span in another process, known through traceparent.
        parent_span_is_remote: span.ids.parent_id.is_some(),
        span_kind: match span.role {
            Role::Client => SpanKind::Client,
            Role::Server => SpanKind::Server,
            Role::Internal => SpanKind::Internal,
        },
        name: span.name.clone(),
        start_time: clock.to_system_time(span.start_ns),
        end_time: clock.to_system_time(span.end_ns),
        attributes: span
            .attributes
            .iter()
            .map(|(k, v)| key_value(k, v))
            .collect(),
        dropped_attributes_count: 0,
        events: events(span, clock),
        links: SpanLinks::default(),
        // Success stays Unset, as instrumentation should leave it (OTel spec).
        status: match &span.error {
            Some(description) => Status::error(description.clone()),
            None => Status::Unset,
        },
        instrumentation_scope: SCOPE.clone(),
    }
}

fn events(span: &HopSpan, clock: &Clock) -> SpanEvents {
    let mut events = SpanEvents::default();
    events.events = span
        .events
        .iter()
        .map(|(name, ns)| Event::new(*name, clock.to_system_time(*ns), Vec::new(), 0))
        .collect();
    events
}

pub fn key_value(key: &'static str, value: &Value) -> KeyValue {
    match value {
        Value::Str(s) => KeyValue::new(key, s.clone()),
        Value::Int(i) => KeyValue::new(key, *i),
        Value::Bool(b) => KeyValue::new(key, *b),
    }
}

pub fn otlp_exporter(
    endpoint: &str,
    protocol: Protocol,
    timeout: Duration,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match protocol {
        Protocol::Grpc => builder
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build(),
        Protocol::HttpProtobuf | Protocol::HttpJson => builder
            .with_http()
            .with_protocol(match protocol {
                Protocol::HttpJson => opentelemetry_otlp::Protocol::HttpJson,
                _ => opentelemetry_otlp::Protocol::HttpBinary,
            })
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build(),
    };
    exporter.map_err(|e| anyhow::anyhow!("cannot build the OTLP exporter for {endpoint}: {e}"))
}
