//! Firewall attribution on one host: joins the agent side and the persona side of the same
//! request and builds spans for the middlebox between them, which cannot speak for itself.
//!
//! The join key is the request's trace context (trace id + the caller's span id): it survives a
//! middlebox that terminates TCP and opens its own connection, where 4-tuples and sequence
//! numbers differ on the two sides. Requests sharing a key (several requests sent under one SDK
//! span) pair in order. Times come from one kernel clock here (both namespaces on this host),
//! so the forward/return split is exact to the layers' precision; across hosts it needs a clock
//! offset (the correlator of the multi-host issue).
//!
//! Pure and bounded: spans in, spans out; a key waits at most `window_ns` (of span time) and
//! at most `max_pending` keys wait, older ones are evicted and counted.

use std::collections::{HashMap, VecDeque};

use crate::span::{HopSpan, Role, SpanIds, Value};

pub const HOP_FIREWALL: &str = "firewall";

#[derive(Clone, Debug)]
pub struct Config {
    pub window_ns: u64,
    pub max_pending: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window_ns: 30_000_000_000,
            max_pending: 65_536,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub joined: u64,
    /// A side whose partner never came within the window (or the table was full).
    pub one_sided: u64,
    /// Joined, but the times contradict each other (a side's clock or layer was off): no
    /// firewall span rather than a negative one.
    pub inconsistent: u64,
}

/// What the join needs of one side's request span.
#[derive(Clone, Debug)]
struct Side {
    start_ns: u64,
    end_ns: u64,
    /// Agent: the request leaving its host; persona: the request reaching its host.
    request_ns: Option<u64>,
    /// Agent: the response reaching its host; persona: the response leaving its host.
    response_ns: Option<u64>,
    /// Whether `request_ns` / `response_ns` are NIC times (else estimated from TCP/syscalls).
    nic: bool,
    client: Option<String>,
    trace_state: Option<String>,
    /// When it started waiting (its span's end): what eviction compares.
    arrived_ns: u64,
}

#[derive(Default)]
struct Waiting {
    agent: VecDeque<Side>,
    persona: VecDeque<Side>,
}

type Key = ([u8; 16], [u8; 8]);

pub struct Correlator {
    config: Config,
    waiting: HashMap<Key, Waiting>,
    /// Keys in arrival order with the span time they arrived at, for eviction.
    order: VecDeque<(Key, u64)>,
    pub stats: Stats,
}

impl Correlator {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            waiting: HashMap::new(),
            order: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Looks at a span the assembler emitted; when it completes a pair, pushes firewall spans.
    pub fn observe(&mut self, span: &HopSpan, out: &mut Vec<HopSpan>) {
        let Some(parent) = span.ids.parent_id else {
            return;
        };
        if span.attr("http.request.method").is_none() {
            return;
        }
        let is_agent = match (span.role, span.attr("hoptrace.hop")) {
            (Role::Client, Some(Value::Str(hop))) if hop == "agent" => true,
            (Role::Server, Some(Value::Str(hop))) if hop == "persona" => false,
            _ => return,
        };
        let side = side_of(span, is_agent);
        let key = (span.ids.trace_id, parent);
        let now = span.end_ns;
        let waiting = self.waiting.entry(key).or_default();
        let partner = if is_agent {
            waiting.persona.pop_front()
        } else {
            waiting.agent.pop_front()
        };
        match partner {
            Some(other) => {
                if waiting.agent.is_empty() && waiting.persona.is_empty() {
                    self.waiting.remove(&key);
                }
                let (agent, persona) = if is_agent {
                    (side, other)
                } else {
                    (other, side)
                };
                self.stats.joined += 1;
                match firewall_spans(key, &agent, &persona) {
                    Some(spans) => out.extend(spans),
                    None => self.stats.inconsistent += 1,
                }
            }
            None => {
                if is_agent {
                    waiting.agent.push_back(side)
                } else {
                    waiting.persona.push_back(side)
                }
                self.order.push_back((key, now));
            }
        }
        self.evict(now);
    }

    /// Drops what waited longer than the window, or beyond capacity.
    fn evict(&mut self, now_ns: u64) {
        while let Some(&(key, at)) = self.order.front() {
            let expired = now_ns.saturating_sub(at) > self.config.window_ns;
            if !expired && self.waiting.len() <= self.config.max_pending {
                break;
            }
            self.order.pop_front();
            if let Some(waiting) = self.waiting.get_mut(&key) {
                // Only a side still waiting since `at`; one that was joined since is gone.
                let queue = if waiting.agent.front().is_some_and(|s| s.arrived_ns == at) {
                    &mut waiting.agent
                } else {
                    &mut waiting.persona
                };
                if queue.front().is_some_and(|s| s.arrived_ns == at) {
                    queue.pop_front();
                    self.stats.one_sided += 1;
                }
                if waiting.agent.is_empty() && waiting.persona.is_empty() {
                    self.waiting.remove(&key);
                }
            }
        }
    }
}

fn side_of(span: &HopSpan, is_agent: bool) -> Side {
    let event = |name: &str| {
        span.events
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    };
    let (request_nic, response_nic) = if is_agent {
        (event("request.nic_egress"), event("response.nic_ingress"))
    } else {
        (event("request.nic_ingress"), event("response.nic_egress"))
    };
    let (request_fallback, response_fallback) = if is_agent {
        (
            event("request.tcp_queued"),
            event("response.at_tcp").or(event("response.to_app")),
        )
    } else {
        (Some(span.start_ns), Some(span.end_ns))
    };
    let text = |key: &str| match span.attr(key) {
        Some(Value::Str(s)) => Some(s.to_string()),
        Some(Value::Int(i)) => Some(i.to_string()),
        _ => None,
    };
    let (address, port) = if is_agent {
        (text("network.local.address"), text("network.local.port"))
    } else {
        (text("network.peer.address"), text("network.peer.port"))
    };
    Side {
        start_ns: span.start_ns,
        end_ns: span.end_ns,
        nic: request_nic.is_some() && response_nic.is_some(),
        request_ns: request_nic.or(request_fallback),
        response_ns: response_nic.or(response_fallback),
        client: address.zip(port).map(|(a, p)| format!("{a}:{p}")),
        trace_state: span.ids.trace_state.clone(),
        arrived_ns: span.end_ns,
    }
}

/// The firewall's total, forward and return spans, under the request's caller.
fn firewall_spans(key: Key, agent: &Side, persona: &Side) -> Option<Vec<HopSpan>> {
    let (trace_id, parent) = key;
    let left_agent = agent.request_ns?;
    let reached_persona = persona.request_ns?;
    let left_persona = persona.response_ns?;
    let reached_agent = agent.response_ns?;
    if reached_persona < left_agent
        || reached_agent < left_persona
        || left_persona < reached_persona
    {
        return None;
    }
    let forward = reached_persona - left_agent;
    let back = reached_agent - left_persona;
    // Needs no clock agreement between the sides: a difference of two durations.
    let total = (agent.end_ns - agent.start_ns).checked_sub(persona.end_ns - persona.start_ns)?;
    // Same client address and port on both sides: the packets were forwarded; otherwise the
    // middlebox terminated the agent's connection and opened its own.
    let mode = match (&agent.client, &persona.client) {
        (Some(a), Some(p)) if a == p => "forwarder",
        (Some(_), Some(_)) => "proxy",
        _ => "unknown",
    };
    let mut common: Vec<(&'static str, Value)> = vec![
        ("hoptrace.hop", HOP_FIREWALL.into()),
        ("hoptrace.firewall.mode", mode.into()),
    ];
    if !(agent.nic && persona.nic) {
        common.push((
            "hoptrace.uncertain",
            "split estimated: a side has no NIC times; TCP/syscall times used".into(),
        ));
    }
    let span =
        |name: &'static str, start: u64, end: u64, extra: Vec<(&'static str, Value)>| HopSpan {
            ids: SpanIds::child(trace_id, parent, agent.trace_state.clone()),
            name: name.into(),
            role: Role::Internal,
            start_ns: start,
            end_ns: end,
            error: None,
            attributes: common.iter().cloned().chain(extra).collect(),
            events: Vec::new(),
        };
    Some(vec![
        span(
            "firewall",
            left_agent,
            reached_agent,
            vec![
                ("hoptrace.firewall.total_ns", (total as i64).into()),
                ("hoptrace.firewall.forward_ns", (forward as i64).into()),
                ("hoptrace.firewall.return_ns", (back as i64).into()),
            ],
        ),
        span(
            "firewall.forward",
            left_agent,
            reached_persona,
            vec![("hoptrace.direction", "forward".into())],
        ),
        span(
            "firewall.return",
            left_persona,
            reached_agent,
            vec![("hoptrace.direction", "return".into())],
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: [u8; 16] = [7; 16];
    const PARENT: [u8; 8] = [9; 8];

    fn hop(
        role: Role,
        hop: &'static str,
        start: u64,
        end: u64,
        events: Vec<(&'static str, u64)>,
        client: &str,
    ) -> HopSpan {
        let (addr_key, port_key) = if role == Role::Client {
            ("network.local.address", "network.local.port")
        } else {
            ("network.peer.address", "network.peer.port")
        };
        HopSpan {
            ids: SpanIds::child(TRACE, PARENT, None),
            name: "GET".into(),
            role,
            start_ns: start,
            end_ns: end,
            error: None,
            attributes: vec![
                ("hoptrace.hop", hop.into()),
                ("http.request.method", "GET".into()),
                (addr_key, client.to_string().into()),
                (port_key, Value::Int(40000)),
            ],
            events,
        }
    }

    fn agent(start: u64, end: u64, left: u64, back: u64, client: &str) -> HopSpan {
        hop(
            Role::Client,
            "agent",
            start,
            end,
            vec![("request.nic_egress", left), ("response.nic_ingress", back)],
            client,
        )
    }

    fn persona(start: u64, end: u64, client: &str) -> HopSpan {
        hop(
            Role::Server,
            "persona",
            start,
            end,
            vec![("request.nic_ingress", start), ("response.nic_egress", end)],
            client,
        )
    }

    #[test]
    fn splits_the_time_outside_the_persona_into_forward_and_return() {
        let mut c = Correlator::new(Config::default());
        let mut out = Vec::new();
        // Persona finishes first; the agent's span completes when the response is back.
        c.observe(&persona(1_020, 1_025, "10.0.0.1"), &mut out);
        assert!(out.is_empty());
        c.observe(&agent(1_000, 1_040, 1_001, 1_039, "10.0.0.1"), &mut out);
        let names: Vec<_> = out.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names, ["firewall", "firewall.forward", "firewall.return"]);
        assert_eq!((out[1].start_ns, out[1].end_ns), (1_001, 1_020));
        assert_eq!((out[2].start_ns, out[2].end_ns), (1_025, 1_039));
        assert!(
            out.iter()
                .all(|s| s.ids.trace_id == TRACE && s.ids.parent_id == Some(PARENT))
        );
        assert_eq!(
            out[0].attr("hoptrace.firewall.total_ns"),
            Some(&Value::Int(35))
        );
        assert_eq!(
            out[0].attr("hoptrace.firewall.mode"),
            Some(&Value::from("forwarder"))
        );
        assert_eq!(c.stats.joined, 1);
    }

    #[test]
    fn a_different_client_address_means_a_terminating_proxy() {
        let mut c = Correlator::new(Config::default());
        let mut out = Vec::new();
        c.observe(&agent(1_000, 1_040, 1_001, 1_039, "10.0.0.1"), &mut out);
        c.observe(&persona(1_020, 1_025, "10.0.2.1"), &mut out);
        assert_eq!(
            out[0].attr("hoptrace.firewall.mode"),
            Some(&Value::from("proxy"))
        );
    }

    #[test]
    fn requests_sharing_a_traceparent_pair_in_order() {
        let mut c = Correlator::new(Config::default());
        let mut out = Vec::new();
        c.observe(&persona(1_020, 1_025, "c"), &mut out);
        c.observe(&persona(2_020, 2_025, "c"), &mut out);
        c.observe(&agent(1_000, 1_040, 1_001, 1_039, "c"), &mut out);
        c.observe(&agent(2_000, 2_040, 2_001, 2_039, "c"), &mut out);
        let forwards: Vec<_> = out
            .iter()
            .filter(|s| s.name == "firewall.forward")
            .map(|s| (s.start_ns, s.end_ns))
            .collect();
        assert_eq!(forwards, [(1_001, 1_020), (2_001, 2_020)]);
    }

    #[test]
    fn contradicting_times_make_no_span_and_one_sided_requests_are_evicted() {
        let mut c = Correlator::new(Config {
            window_ns: 100,
            max_pending: 4,
        });
        let mut out = Vec::new();
        // The persona answered after the agent got its response: impossible, nothing emitted.
        c.observe(&persona(1_020, 1_050, "c"), &mut out);
        c.observe(&agent(1_000, 1_040, 1_001, 1_039, "c"), &mut out);
        assert!(out.is_empty());
        assert_eq!(c.stats.inconsistent, 1);
        // An agent side alone, then time passes beyond the window.
        c.observe(&agent(2_000, 2_040, 2_001, 2_039, "c"), &mut out);
        let mut late = persona(5_000, 5_010, "c");
        late.ids.trace_id = [1; 16];
        c.observe(&late, &mut out);
        assert_eq!(c.stats.one_sided, 1);
        assert!(out.is_empty());
    }

    #[test]
    fn spans_without_a_caller_are_not_joined() {
        let mut c = Correlator::new(Config::default());
        let mut out = Vec::new();
        let mut lone = agent(1_000, 1_040, 1_001, 1_039, "c");
        lone.ids.parent_id = None;
        c.observe(&lone, &mut out);
        assert!(c.waiting.is_empty());
    }
}
