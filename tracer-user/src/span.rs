//! The spans hoptrace builds, before they become OpenTelemetry: plain data on kernel time.
//! Only the export module knows OpenTelemetry's types.

use std::{borrow::Cow, fmt, ops::Deref, sync::Arc};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that connects (OpenTelemetry kind CLIENT).
    Client,
    /// The side that accepts (kind SERVER).
    Server,
    /// Neither: an event on an established connection (kind INTERNAL).
    Internal,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(Text),
    Int(i64),
    Bool(bool),
}

/// A string value: fixed text, text that many spans share (a socket's addresses and process
/// name, formatted once per socket rather than once per span), or a span's own.
#[derive(Clone, Debug)]
pub enum Text {
    Static(&'static str),
    Shared(Arc<str>),
    Owned(String),
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Self::Static(s) => s,
            Self::Shared(s) => s,
            Self::Owned(s) => s,
        }
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl From<Cow<'static, str>> for Text {
    fn from(s: Cow<'static, str>) -> Self {
        match s {
            Cow::Borrowed(s) => Self::Static(s),
            Cow::Owned(s) => Self::Owned(s),
        }
    }
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Self::Str(Text::Static(s))
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Str(Text::Owned(s))
    }
}
impl From<Arc<str>> for Value {
    fn from(s: Arc<str>) -> Self {
        Self::Str(Text::Shared(s))
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

/// W3C trace context identity of a span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The parent span: the SDK's span named by a request's traceparent, or one of ours.
    pub parent_id: Option<[u8; 8]>,
    /// The request's validated `tracestate`, carried along unchanged.
    pub trace_state: Option<String>,
}

impl SpanIds {
    /// A new trace (random ids, as the W3C spec asks: no structure, full entropy).
    pub fn new_root() -> Self {
        Self {
            trace_id: random_nonzero(),
            span_id: random_nonzero(),
            parent_id: None,
            trace_state: None,
        }
    }

    /// A new span in `trace_id` under `parent_id`.
    pub fn child(trace_id: [u8; 16], parent_id: [u8; 8], trace_state: Option<String>) -> Self {
        Self {
            trace_id,
            span_id: random_nonzero(),
            parent_id: Some(parent_id),
            trace_state,
        }
    }
}

/// All-zero ids are invalid in W3C Trace Context; redraw in that (2^-64) case.
fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id.iter().any(|&b| b != 0) {
            return id;
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HopSpan {
    pub ids: SpanIds,
    pub name: Cow<'static, str>,
    pub role: Role,
    /// Start and end, ns of CLOCK_MONOTONIC (kernel time).
    pub start_ns: u64,
    pub end_ns: u64,
    /// `Some(description)` makes the span's status ERROR.
    pub error: Option<String>,
    /// Semantic-convention keys where they exist, `hoptrace.*` otherwise.
    pub attributes: Vec<(&'static str, Value)>,
    /// Named instants inside the span (per-layer timestamps), ns of CLOCK_MONOTONIC.
    pub events: Vec<(&'static str, u64)>,
}

impl HopSpan {
    #[cfg(test)]
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}
