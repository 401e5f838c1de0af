//! What the join reads of spans received over OTLP (the generated prost types): `SpanView`
//! on a received span, and the sender's clock from its resource. The spans themselves are
//! exported as they came (export::SpanSink::forward).

use std::borrow::Cow;

use opentelemetry_proto::tonic::{
    resource::v1::Resource as ProtoResource,
    trace::v1::{self as proto, span::SpanKind as ProtoKind},
};

use crate::{
    clock::attr,
    correlate::{ClockInfo, SpanView},
    export::attribute_text,
    span::Role,
};

/// A received span with valid ids (others are counted and dropped: a receiver rejects a
/// request that holds an id of the wrong length, and the join needs them).
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
    fn text(&self, key: &str) -> Option<Cow<'_, str>> {
        attribute_text(&self.span.attributes, key)
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

/// How far an agent's mapping of kernel time to wall time may lag the kernel's: it re-samples
/// every 500 ms, during which an NTP slew (at most 500 ppm) moves the wall clock up to 250 us;
/// in practice a few ppm, well under this.
const MAPPING_ERROR_NS: u64 = 50_000;

/// The sender's clock, from the `hoptrace.clock.*` resource attributes its agent sets
/// (ClockState). Without them nothing is known: not synchronized, no shared clock.
pub fn clock_info(resource: Option<&ProtoResource>) -> ClockInfo {
    let attributes = resource.map_or(&[][..], |r| r.attributes.as_slice());
    ClockInfo {
        domain: attribute_text(attributes, attr::BOOT_ID).map(|id| Cow::Owned(id.into_owned())),
        synchronized: attribute_text(attributes, attr::SYNCHRONIZED).as_deref() == Some("true"),
        maxerror_ns: attribute_text(attributes, attr::MAXERROR_NS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX),
        mapping_error_ns: MAPPING_ERROR_NS,
    }
}
