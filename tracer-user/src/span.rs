//! The spans hoptrace builds, before they become OpenTelemetry: plain data on kernel time.
//! Only the export module knows OpenTelemetry's types.

use std::borrow::Cow;

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
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Self::Str(Cow::Borrowed(s))
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Str(Cow::Owned(s))
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

#[derive(Clone, Debug, PartialEq)]
pub struct HopSpan {
    pub name: &'static str,
    pub role: Role,
    /// Start and end, ns of CLOCK_MONOTONIC (kernel time).
    pub start_ns: u64,
    pub end_ns: u64,
    /// `Some(description)` makes the span's status ERROR.
    pub error: Option<String>,
    /// Semantic-convention keys where they exist, `hoptrace.*` otherwise.
    pub attributes: Vec<(&'static str, Value)>,
}

#[cfg(test)]
impl HopSpan {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}
