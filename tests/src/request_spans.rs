//! Finding a request span (an exported HTTP request, agent or persona side) by trace id.

use std::time::Duration;

use crate::{
    agent::Agent,
    receiver::{OtlpReceiver, ReceivedSpan},
};

/// The request span of `hop` (`agent` or `persona`) in trace `trace_id`.
pub fn request_span<'a>(
    spans: &'a [ReceivedSpan],
    hop: &str,
    trace_id: &str,
) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| {
        s.attr_str("hoptrace.hop") == Some(hop)
            && s.trace_id == trace_id
            && s.attr_str("http.request.method").is_some()
    })
}

/// Waits (15 s at most) for [`request_span`]; panics with the agent's log when it never comes.
pub fn wait_request_span(
    receiver: &OtlpReceiver,
    agent: &Agent,
    hop: &str,
    trace_id: &str,
) -> ReceivedSpan {
    let spans = receiver
        .try_wait_for_spans(
            |spans| request_span(spans, hop, trace_id).is_some(),
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("no {hop} request span: {e:#}\nagent:\n{}", agent.stderr()));
    request_span(&spans, hop, trace_id).unwrap().clone()
}
