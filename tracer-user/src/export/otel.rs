//! HopSpan -> OpenTelemetry SpanData, and the OTLP exporter.

use std::{borrow::Cow, time::Duration};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceState},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator, SpanData, SpanEvents, SpanLinks};

use super::Protocol;
use crate::{
    clock::Clock,
    span::{HopSpan, Role, Value},
};

pub fn to_span_data(span: &HopSpan, clock: &Clock) -> SpanData {
    let ids = RandomIdGenerator::default();
    let context = SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    SpanData {
        span_context: context,
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: match span.role {
            Role::Client => SpanKind::Client,
            Role::Server => SpanKind::Server,
            Role::Internal => SpanKind::Internal,
        },
        name: Cow::Borrowed(span.name),
        start_time: clock.to_system_time(span.start_ns),
        end_time: clock.to_system_time(span.end_ns),
        attributes: span.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        // Success stays Unset, as instrumentation should leave it (OTel spec).
        status: match &span.error {
            Some(description) => Status::error(description.clone()),
            None => Status::Unset,
        },
        instrumentation_scope: InstrumentationScope::builder("hoptrace")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    }
}

fn key_value(key: &'static str, value: &Value) -> KeyValue {
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
        Protocol::Grpc => builder.with_tonic().with_endpoint(endpoint).with_timeout(timeout).build(),
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
