//! Received OTLP (prost types) -> what the join reads (`SpanView`) and what the exporter sends
//! (the SDK's `SpanData`, under the sender's own resource), losing nothing the exporter can
//! carry.

use std::{
    borrow::Cow,
    time::{Duration, UNIX_EPOCH},
};

use opentelemetry::{
    Array, InstrumentationScope, Key, KeyValue, StringValue, Value,
    trace::{Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_proto::tonic::{
    common::v1::{self as proto_common, any_value},
    resource::v1::Resource as ProtoResource,
    trace::v1::{self as proto, span::SpanKind as ProtoKind, status::StatusCode},
};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanLinks},
};

use crate::{
    clock::attr,
    correlate::{ClockInfo, SpanView},
    span::Role,
};

/// OTLP span flags: bit 8 says whether bit 9 (parent is remote) is known.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// A received span with valid ids (others are counted and dropped: the exporter needs them).
pub struct Received<'a> {
    span: &'a proto::Span,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_id: Option<[u8; 8]>,
}

impl<'a> Received<'a> {
    pub fn new(span: &'a proto::Span) -> Option<Self> {
        let trace_id = <[u8; 16]>::try_from(span.trace_id.as_slice()).ok()?;
        let span_id = <[u8; 8]>::try_from(span.span_id.as_slice()).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let parent_id = <[u8; 8]>::try_from(span.parent_span_id.as_slice())
            .ok()
            .filter(|id| *id != [0; 8]);
        Some(Self {
            span,
            trace_id,
            span_id,
            parent_id,
        })
    }

    pub fn to_span_data(&self, scope: &InstrumentationScope) -> SpanData {
        let span = self.span;
        let context = |trace_id, span_id, trace_state: &str, flags: u32| {
            SpanContext::new(
                TraceId::from_bytes(trace_id),
                SpanId::from_bytes(span_id),
                TraceFlags::new(flags as u8),
                false,
                trace_state.parse::<TraceState>().unwrap_or_default(),
            )
        };
        let mut events = SpanEvents::default();
        events.events = span
            .events
            .iter()
            .map(|e| {
                Event::new(
                    e.name.clone(),
                    unix_time(e.time_unix_nano),
                    key_values(&e.attributes),
                    e.dropped_attributes_count,
                )
            })
            .collect();
        events.dropped_count = span.dropped_events_count;
        let mut links = SpanLinks::default();
        links.links = span
            .links
            .iter()
            .filter_map(|l| {
                let trace_id = <[u8; 16]>::try_from(l.trace_id.as_slice()).ok()?;
                let span_id = <[u8; 8]>::try_from(l.span_id.as_slice()).ok()?;
                let mut link =
                    Link::with_context(context(trace_id, span_id, &l.trace_state, l.flags));
                link.attributes = key_values(&l.attributes);
                link.dropped_attributes_count = l.dropped_attributes_count;
                Some(link)
            })
            .collect();
        links.dropped_count = span.dropped_links_count;
        SpanData {
            span_context: context(self.trace_id, self.span_id, &span.trace_state, span.flags),
            parent_span_id: self.parent_id.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: span.flags & FLAG_HAS_IS_REMOTE != 0
                && span.flags & FLAG_IS_REMOTE != 0,
            span_kind: match ProtoKind::try_from(span.kind) {
                Ok(ProtoKind::Server) => SpanKind::Server,
                Ok(ProtoKind::Client) => SpanKind::Client,
                Ok(ProtoKind::Producer) => SpanKind::Producer,
                Ok(ProtoKind::Consumer) => SpanKind::Consumer,
                _ => SpanKind::Internal,
            },
            name: Cow::Owned(span.name.clone()),
            start_time: unix_time(span.start_time_unix_nano),
            end_time: unix_time(span.end_time_unix_nano),
            attributes: key_values(&span.attributes),
            dropped_attributes_count: span.dropped_attributes_count,
            events,
            links,
            status: match &span.status {
                Some(s) if s.code == StatusCode::Error as i32 => Status::error(s.message.clone()),
                Some(s) if s.code == StatusCode::Ok as i32 => Status::Ok,
                _ => Status::Unset,
            },
            instrumentation_scope: scope.clone(),
        }
    }
}

impl SpanView for Received<'_> {
    fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }
    fn span_id(&self) -> [u8; 8] {
        self.span_id
    }
    fn parent_id(&self) -> Option<[u8; 8]> {
        self.parent_id
    }
    fn role(&self) -> Role {
        match ProtoKind::try_from(self.span.kind) {
            Ok(ProtoKind::Client) => Role::Client,
            Ok(ProtoKind::Server) => Role::Server,
            _ => Role::Internal,
        }
    }
    fn text(&self, key: &str) -> Option<String> {
        text(&self.span.attributes, key)
    }
    fn event(&self, name: &str) -> Option<u64> {
        self.span
            .events
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.time_unix_nano)
    }
    fn start_ns(&self) -> u64 {
        self.span.start_time_unix_nano
    }
    fn end_ns(&self) -> u64 {
        self.span.end_time_unix_nano
    }
    fn trace_state(&self) -> Option<String> {
        Some(self.span.trace_state.clone()).filter(|s| !s.is_empty())
    }
}

fn text(attributes: &[proto_common::KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

/// How far an agent's mapping of kernel time to wall time may lag the kernel's: it re-samples
/// every 500 ms, during which an NTP slew (at most 500 ppm) moves the wall clock up to 250 us;
/// in practice a few ppm, well under this.
const MAPPING_ERROR_NS: u64 = 50_000;

/// The sender's clock, from the `hoptrace.clock.*` resource attributes its agent sets
/// (ClockState). Without them nothing is known: not synchronized, no shared clock.
pub fn clock_info(resource: Option<&ProtoResource>) -> ClockInfo {
    let attributes = resource.map_or(&[][..], |r| r.attributes.as_slice());
    ClockInfo {
        domain: text(attributes, attr::BOOT_ID),
        synchronized: text(attributes, attr::SYNCHRONIZED).as_deref() == Some("true"),
        maxerror_ns: text(attributes, attr::MAXERROR_NS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX),
        mapping_error_ns: MAPPING_ERROR_NS,
    }
}

pub fn resource(resource: Option<&ProtoResource>) -> Resource {
    Resource::builder_empty()
        .with_attributes(
            resource
                .map(|r| key_values(&r.attributes))
                .unwrap_or_default(),
        )
        .build()
}

pub fn scope(scope: Option<&proto_common::InstrumentationScope>) -> InstrumentationScope {
    let Some(scope) = scope else {
        return InstrumentationScope::builder("").build();
    };
    let mut builder = InstrumentationScope::builder(scope.name.clone())
        .with_attributes(key_values(&scope.attributes));
    if !scope.version.is_empty() {
        builder = builder.with_version(scope.version.clone());
    }
    builder.build()
}

fn unix_time(ns: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn key_values(attributes: &[proto_common::KeyValue]) -> Vec<KeyValue> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = value(kv.value.as_ref()?.value.as_ref()?)?;
            Some(KeyValue::new(Key::new(kv.key.clone()), value))
        })
        .collect()
}

/// Scalars and homogeneous arrays map one to one; maps, bytes and mixed arrays (which the
/// SDK's attribute type cannot hold) become their debug text rather than vanish.
fn value(value: &any_value::Value) -> Option<Value> {
    use any_value::Value as V;
    Some(match value {
        V::StringValue(s) => Value::String(s.clone().into()),
        V::BoolValue(b) => Value::Bool(*b),
        V::IntValue(i) => Value::I64(*i),
        V::DoubleValue(d) => Value::F64(*d),
        V::ArrayValue(array) => {
            let items: Vec<_> = array
                .values
                .iter()
                .filter_map(|v| v.value.as_ref())
                .collect();
            let all = |f: fn(&V) -> bool| items.iter().all(|v| f(v));
            if all(|v| matches!(v, V::StringValue(_))) {
                Value::Array(Array::String(
                    items
                        .iter()
                        .filter_map(|v| match v {
                            V::StringValue(s) => Some(StringValue::from(s.clone())),
                            _ => None,
                        })
                        .collect(),
                ))
            } else if all(|v| matches!(v, V::IntValue(_))) {
                Value::Array(Array::I64(
                    items
                        .iter()
                        .filter_map(|v| match v {
                            V::IntValue(i) => Some(*i),
                            _ => None,
                        })
                        .collect(),
                ))
            } else {
                Value::String(format!("{array:?}").into())
            }
        }
        V::KvlistValue(list) => Value::String(format!("{list:?}").into()),
        V::BytesValue(bytes) => Value::String(format!("{bytes:02x?}").into()),
        // A profiling-only reference: meaningless in traces (the spec says ignore it).
        V::StringValueStrindex(_) => return None,
    })
}
