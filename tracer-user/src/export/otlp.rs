//! OTLP protobuf encoding straight from [`HopSpan`]s (opentelemetry/proto/trace/v1/trace.proto
//! and collector/trace/v1/trace_service.proto), with prost's wire-format primitives.
//!
//! Why not the SDK's `SpanData` and opentelemetry-otlp's exporter: at tens of thousands of
//! requests per second (five spans each with the firewall spans) the conversion to `SpanData`,
//! the exporter's clone of every batch per attempt and its conversion to prost structs cost
//! ~20 allocations per attribute-carrying span and most of the agent's CPU (measured with perf
//! in the overhead benchmark). Here a span is written field by field into the batch's buffer:
//! no allocation per span once the buffers have grown. The tests decode the bytes with the
//! official generated types (opentelemetry-proto) to show they are what the spec says.
//!
//! Spans received over OTLP (the correlator's) arrive as the generated types and go into the
//! same request as further `resource_spans`, encoded by prost, so that each keeps its sender's
//! resource.

use std::borrow::Cow;

use opentelemetry::Value as OtelValue;
use opentelemetry_proto::tonic::{
    common::v1::{KeyValue as ProtoKeyValue, any_value},
    trace::v1::ResourceSpans,
};
use opentelemetry_sdk::Resource;
use prost::{
    Message as _,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};

use crate::{
    clock::Clock,
    span::{HopSpan, Role, Value},
};

/// The instrumentation scope of every span.
const SCOPE_NAME: &str = "hoptrace";

/// W3C trace flags: sampled (hoptrace exports only what it sampled).
const FLAG_SAMPLED: u32 = 0x01;
/// OTLP SpanFlags: whether the parent's remoteness is known, and that it is remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// Span.kind values (trace.proto SpanKind).
fn kind(role: Role) -> u64 {
    match role {
        Role::Internal => 1,
        Role::Server => 2,
        Role::Client => 3,
    }
}

/// Status.code ERROR (trace.proto Status.StatusCode).
const STATUS_ERROR: u64 = 2;

/// A batch under construction: spans are encoded as they arrive, the request is framed once
/// when the batch is sent.
pub struct BatchEncoder {
    /// `Resource` and `InstrumentationScope` messages, encoded once.
    resource: Vec<u8>,
    scope: Vec<u8>,
    /// Repeated `ScopeSpans.spans` fields (key, length, `Span`) of the spans so far.
    spans: Vec<u8>,
    count: usize,
    /// Received spans: repeated `ExportTraceServiceRequest.resource_spans` fields, and how
    /// many spans they hold.
    forwarded: Vec<u8>,
    forwarded_count: usize,
    /// Reused for each span before its length is known.
    scratch: Vec<u8>,
}

impl BatchEncoder {
    pub fn new(resource: &Resource) -> Self {
        let mut encoded_resource = Vec::new();
        for (key, value) in resource.iter() {
            put_message(&mut encoded_resource, 1, |buf| {
                put_key_value(buf, key.as_str(), &AnyValue::Otel(value))
            });
        }
        let mut scope = Vec::new();
        put_string(&mut scope, 1, SCOPE_NAME);
        put_string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
        Self {
            resource: encoded_resource,
            scope,
            spans: Vec::new(),
            count: 0,
            forwarded: Vec::new(),
            forwarded_count: 0,
            scratch: Vec::new(),
        }
    }

    /// Spans in the batch, hoptrace's and forwarded.
    pub fn len(&self) -> usize {
        self.count + self.forwarded_count
    }

    /// Appends `span`, its kernel times turned into Unix time by `clock`.
    pub fn push(&mut self, span: &HopSpan, clock: &Clock) {
        self.scratch.clear();
        encode_span(&mut self.scratch, span, clock);
        put_bytes(&mut self.spans, 2, &self.scratch);
        self.count += 1;
    }

    /// Appends spans received over OTLP as they are, under their own resource and scopes.
    pub fn push_forwarded(&mut self, resource_spans: &ResourceSpans) {
        put_header(&mut self.forwarded, 1, resource_spans.encoded_len());
        resource_spans.encode_raw(&mut self.forwarded);
        self.forwarded_count += resource_spans
            .scope_spans
            .iter()
            .map(|scope| scope.spans.len())
            .sum::<usize>();
    }

    /// The `ExportTraceServiceRequest` of the spans so far; the encoder is empty afterwards.
    /// hoptrace's own spans are left out only when there are none and forwarded spans fill
    /// the request (an empty batch is still a valid request).
    pub fn take_request(&mut self) -> Vec<u8> {
        let scope_spans_len = field_len(1, self.scope.len()) + self.spans.len();
        let resource_spans_len = field_len(1, self.resource.len()) + field_len(2, scope_spans_len);
        let own = self.count > 0 || self.forwarded.is_empty();
        let own_len = if own {
            field_len(1, resource_spans_len)
        } else {
            0
        };
        let mut out = Vec::with_capacity(own_len + self.forwarded.len());
        if own {
            put_header(&mut out, 1, resource_spans_len);
            put_bytes(&mut out, 1, &self.resource);
            put_header(&mut out, 2, scope_spans_len);
            put_bytes(&mut out, 1, &self.scope);
            out.extend_from_slice(&self.spans);
        }
        out.extend_from_slice(&self.forwarded);
        self.spans.clear();
        self.count = 0;
        self.forwarded.clear();
        self.forwarded_count = 0;
        out
    }
}

fn encode_span(buf: &mut Vec<u8>, span: &HopSpan, clock: &Clock) {
    let ids = &span.ids;
    put_bytes(buf, 1, &ids.trace_id);
    put_bytes(buf, 2, &ids.span_id);
    if let Some(state) = ids.trace_state.as_deref().filter(|s| !s.is_empty()) {
        put_string(buf, 3, state);
    }
    if let Some(parent) = &ids.parent_id {
        put_bytes(buf, 4, parent);
    }
    put_string(buf, 5, &span.name);
    put_varint(buf, 6, kind(span.role));
    put_fixed64(buf, 7, clock.to_unix_ns(span.start_ns));
    put_fixed64(buf, 8, clock.to_unix_ns(span.end_ns));
    for (key, value) in &span.attributes {
        put_message(buf, 9, |buf| put_key_value(buf, key, &AnyValue::Hop(value)));
    }
    for (name, ns) in &span.events {
        put_message(buf, 11, |buf| {
            put_fixed64(buf, 1, clock.to_unix_ns(*ns));
            put_string(buf, 2, name);
        });
    }
    if let Some(description) = &span.error {
        put_message(buf, 15, |buf| {
            put_string(buf, 2, description);
            put_varint(buf, 3, STATUS_ERROR);
        });
    }
    // The parent is the SDK's span in another process, known through traceparent.
    let remote = if ids.parent_id.is_some() {
        FLAG_IS_REMOTE
    } else {
        0
    };
    encode_key(16, WireType::ThirtyTwoBit, buf);
    buf.extend_from_slice(&(FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | remote).to_le_bytes());
}

/// The two value types that become an OTLP `AnyValue`: hoptrace's own and the SDK's (resource
/// attributes from OTEL_RESOURCE_ATTRIBUTES).
enum AnyValue<'a> {
    Hop(&'a Value),
    Otel(&'a OtelValue),
}

fn put_key_value(buf: &mut Vec<u8>, key: &str, value: &AnyValue<'_>) {
    put_string(buf, 1, key);
    put_message(buf, 2, |buf| match value {
        AnyValue::Hop(Value::Str(s)) => put_string_always(buf, 1, s),
        AnyValue::Hop(Value::Bool(b)) => put_varint_always(buf, 2, u64::from(*b)),
        AnyValue::Hop(Value::Int(i)) => put_varint_always(buf, 3, *i as u64),
        AnyValue::Otel(OtelValue::String(s)) => put_string_always(buf, 1, s.as_str()),
        AnyValue::Otel(OtelValue::Bool(b)) => put_varint_always(buf, 2, u64::from(*b)),
        AnyValue::Otel(OtelValue::I64(i)) => put_varint_always(buf, 3, *i as u64),
        AnyValue::Otel(OtelValue::F64(f)) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&f.to_le_bytes());
        }
        // Arrays come only from code, never from OTEL_RESOURCE_ATTRIBUTES: their text form.
        AnyValue::Otel(other) => put_string_always(buf, 1, &other.to_string()),
    });
}

/// An OTLP attribute as text: strings as they are, scalars in their usual form; None for
/// arrays, maps and bytes, and when absent.
pub fn attribute_text<'a>(attributes: &'a [ProtoKeyValue], key: &str) -> Option<Cow<'a, str>> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(Cow::Borrowed(s)),
        any_value::Value::IntValue(i) => Some(Cow::Owned(i.to_string())),
        any_value::Value::BoolValue(b) => Some(Cow::Owned(b.to_string())),
        any_value::Value::DoubleValue(d) => Some(Cow::Owned(d.to_string())),
        _ => None,
    }
}

/// Bytes a length-delimited field `tag` of `len` bytes takes.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_header(buf: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_bytes(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    put_header(buf, tag, bytes.len());
    buf.extend_from_slice(bytes);
}

/// A proto3 string field: the empty string is the default and is not written.
fn put_string(buf: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        put_bytes(buf, tag, s.as_bytes());
    }
}

/// A field of a `oneof`: written even when it holds the default, or the choice is lost.
fn put_string_always(buf: &mut Vec<u8>, tag: u32, s: &str) {
    put_bytes(buf, tag, s.as_bytes());
}

fn put_varint(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_varint_always(buf, tag, v);
    }
}

fn put_varint_always(buf: &mut Vec<u8>, tag: u32, v: u64) {
    encode_key(tag, WireType::Varint, buf);
    encode_varint(v, buf);
}

fn put_fixed64(buf: &mut Vec<u8>, tag: u32, v: u64) {
    encode_key(tag, WireType::SixtyFourBit, buf);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// A nested message: encoded in place after its key, then its length is inserted before it.
/// The messages nested inside a span are tens of bytes, so the shift is a short move and the
/// length takes one byte (no shift at all below 128 bytes, the common case, since one byte
/// is reserved).
fn put_message(buf: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, buf);
    let len_at = buf.len();
    buf.push(0);
    body(buf);
    let len = buf.len() - len_at - 1;
    if len < 0x80 {
        buf[len_at] = len as u8;
    } else {
        let mut prefix = Vec::with_capacity(10);
        encode_varint(len as u64, &mut prefix);
        buf.splice(len_at..len_at + 1, prefix);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use opentelemetry::KeyValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;

    use super::*;
    use crate::span::SpanIds;

    fn span(parent: Option<[u8; 8]>, error: Option<&str>) -> HopSpan {
        HopSpan {
            ids: SpanIds {
                trace_id: [0xab; 16],
                span_id: [0xcd; 8],
                parent_id: parent,
                trace_state: Some("k=v".into()),
            },
            name: "GET".into(),
            role: Role::Client,
            start_ns: 1_000,
            end_ns: 31_000_000,
            error: error.map(str::to_owned),
            attributes: vec![
                ("hoptrace.hop", "agent".into()),
                ("http.response.status_code", Value::Int(200)),
                ("hoptrace.negative", Value::Int(-5)),
                ("hoptrace.flag", Value::Bool(false)),
                ("hoptrace.empty", "".into()),
                // Longer than 127 bytes: its KeyValue's length takes two bytes.
                ("url.path", "/".repeat(300).into()),
            ],
            events: vec![
                ("request.nic_egress", 2_000),
                ("response.nic_ingress", 30_000_000),
            ],
        }
    }

    /// An attribute as received.
    pub fn key_value(key: &str, value: any_value::Value) -> ProtoKeyValue {
        ProtoKeyValue {
            key: key.into(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    /// An encoder whose own spans are `service`'s.
    pub fn encoder_of(service: &'static str) -> BatchEncoder {
        BatchEncoder::new(
            &Resource::builder_empty()
                .with_attributes([KeyValue::new("service.name", service)])
                .build(),
        )
    }

    fn decode(bytes: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(bytes).expect("valid OTLP protobuf")
    }

    #[test]
    fn spans_decode_with_the_official_types() {
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "hoptrace"),
                KeyValue::new("host.cpus", 2_i64),
            ])
            .build();
        let clock = Clock::sample();
        let mut batch = BatchEncoder::new(&resource);
        batch.push(&span(Some([0x11; 8]), None), &clock);
        batch.push(&span(None, Some("connection reset")), &clock);
        assert_eq!(batch.len(), 2);
        let request = decode(&batch.take_request());
        assert_eq!(batch.len(), 0);

        let resource_spans = &request.resource_spans[0];
        let resource = resource_spans.resource.as_ref().unwrap();
        let attrs: Vec<_> = resource
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap()))
            .collect();
        assert!(attrs.contains(&(
            "service.name",
            any_value::Value::StringValue("hoptrace".into())
        )));
        assert!(attrs.contains(&("host.cpus", any_value::Value::IntValue(2))));
        let scope_spans = &resource_spans.scope_spans[0];
        assert_eq!(scope_spans.scope.as_ref().unwrap().name, "hoptrace");
        let [first, second] = &scope_spans.spans[..] else {
            panic!("two spans")
        };

        assert_eq!(
            (first.trace_id.as_slice(), first.span_id.as_slice()),
            (&[0xab; 16][..], &[0xcd; 8][..])
        );
        assert_eq!(first.parent_span_id, vec![0x11; 8]);
        assert_eq!(first.trace_state, "k=v");
        assert_eq!((first.name.as_str(), first.kind), ("GET", 3));
        assert_eq!(first.flags, 0x301, "sampled, parent known remote");
        assert_eq!(second.flags, 0x101, "a root: no remote parent");
        assert!(second.parent_span_id.is_empty());
        assert_eq!(first.start_time_unix_nano, clock.to_unix_ns(1_000));
        assert_eq!(
            first.end_time_unix_nano - first.start_time_unix_nano,
            31_000_000 - 1_000
        );
        let values: Vec<_> = first
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap()))
            .collect();
        assert_eq!(
            values,
            [
                (
                    "hoptrace.hop",
                    any_value::Value::StringValue("agent".into())
                ),
                ("http.response.status_code", any_value::Value::IntValue(200)),
                ("hoptrace.negative", any_value::Value::IntValue(-5)),
                ("hoptrace.flag", any_value::Value::BoolValue(false)),
                (
                    "hoptrace.empty",
                    any_value::Value::StringValue(String::new())
                ),
                ("url.path", any_value::Value::StringValue("/".repeat(300))),
            ]
        );
        let events: Vec<_> = first
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.time_unix_nano))
            .collect();
        assert_eq!(
            events,
            [
                ("request.nic_egress", clock.to_unix_ns(2_000)),
                ("response.nic_ingress", clock.to_unix_ns(30_000_000))
            ]
        );
        assert!(first.status.is_none(), "success stays Unset");
        let status = second.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (2, "connection reset")
        );
    }

    /// Spans as another host's agent (or any SDK) sent them, with what hoptrace never writes.
    fn received(service: &str, spans: usize) -> ResourceSpans {
        use opentelemetry_proto::tonic::{
            common::v1::{AnyValue as ProtoAnyValue, ArrayValue, InstrumentationScope},
            resource::v1::Resource as ProtoResource,
            trace::v1::{ScopeSpans, Span, Status, span, status},
        };
        let value = |value| ProtoAnyValue { value: Some(value) };
        let attributes = vec![
            key_value(
                "service.name",
                any_value::Value::StringValue(service.into()),
            ),
            key_value("ratio", any_value::Value::DoubleValue(0.25)),
            key_value(
                "list",
                any_value::Value::ArrayValue(ArrayValue {
                    values: vec![
                        value(any_value::Value::IntValue(1)),
                        value(any_value::Value::BytesValue(vec![0, 1])),
                    ],
                }),
            ),
        ];
        let span = |i: usize| Span {
            trace_id: vec![0x12; 16],
            span_id: vec![i as u8 + 1; 8],
            parent_span_id: vec![0x34; 8],
            flags: 0x301,
            name: format!("span {i}"),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_250_000,
            attributes: attributes.clone(),
            dropped_attributes_count: 2,
            events: vec![span::Event {
                time_unix_nano: 1_700_000_000_000_100_000,
                name: "request.nic_ingress".into(),
                attributes: attributes.clone(),
                dropped_attributes_count: 1,
            }],
            links: vec![span::Link {
                trace_id: vec![0x56; 16],
                span_id: vec![0x78; 8],
                trace_state: "a=b".into(),
                attributes: attributes.clone(),
                dropped_attributes_count: 0,
                flags: 0x101,
            }],
            dropped_links_count: 3,
            status: Some(Status {
                message: "ok".into(),
                code: status::StatusCode::Ok as i32,
            }),
            ..Default::default()
        };
        ResourceSpans {
            resource: Some(ProtoResource {
                attributes: attributes.clone(),
                dropped_attributes_count: 4,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "sdk".into(),
                    version: "1.2".into(),
                    attributes: attributes.clone(),
                    dropped_attributes_count: 0,
                }),
                spans: (0..spans).map(span).collect(),
                schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
            }],
            schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
        }
    }

    #[test]
    fn received_spans_go_on_unchanged_next_to_hoptraces_own() {
        let mut batch = encoder_of("hoptrace-correlate");
        let (agent, persona) = (received("agent-host", 2), received("persona-host", 1));
        batch.push_forwarded(&agent);
        batch.push(&span(Some([0x11; 8]), None), &Clock::sample());
        batch.push_forwarded(&persona);
        assert_eq!(batch.len(), 4);
        let request = decode(&batch.take_request());
        let [own, first, second] = &request.resource_spans[..] else {
            panic!("three resource spans: {request:#?}")
        };
        assert_eq!(own.scope_spans[0].spans.len(), 1);
        assert_eq!((first, second), (&agent, &persona));

        // Only received spans: no empty entry for the correlator's own resource.
        batch.push_forwarded(&persona);
        assert_eq!(decode(&batch.take_request()).resource_spans, [persona]);
        assert_eq!(batch.len(), 0);
        let request = decode(&batch.take_request());
        assert!(request.resource_spans[0].scope_spans[0].spans.is_empty());
    }

    #[test]
    fn an_empty_batch_is_a_valid_request() {
        let mut batch = BatchEncoder::new(&Resource::builder_empty().build());
        let request = decode(&batch.take_request());
        assert!(request.resource_spans[0].scope_spans[0].spans.is_empty());
    }
}
