//! Firewall attribution: joins the agent side and the persona side of the same request and
//! builds spans for the middlebox between them, which cannot speak for itself. One join for
//! both modes: the agent's (one agent watching both sides, spans straight from the assembler)
//! and the correlator's (`hoptrace correlate`, spans from two hosts' agents over OTLP); each
//! reads its spans through `SpanView`.
//!
//! The join key is the request's trace context (trace id + the caller's span id): it survives a
//! middlebox that terminates TCP and opens its own connection, where 4-tuples and sequence
//! numbers differ on the two sides. Requests sharing a key (several requests sent under one SDK
//! span) pair in order.
//!
//! The firewall's total (agent minus persona duration) needs no clock agreement. The split into
//! forward and return compares the two hosts' clocks: exact when both sides read one kernel's
//! clock; across hosts it uses the offset estimated from the pair's earlier requests
//! (clock_offset.rs), is stated with its uncertainty, and is marked estimated when that is
//! wide or a clock is not synchronized. Either way forward + return is exactly the agent's
//! NIC-to-NIC time minus the persona's, both parts are non-negative, and every span lies
//! inside the agent's request.
//!
//! Bounded: a key waits at most `window_ns` (of the caller's clock) and at most `max_pending`
//! keys wait; older ones are evicted and counted, and so are the host pairs whose offsets are
//! tracked.

mod late;

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
};

use self::late::GivenUp;
use crate::{
    clock_offset::{Added, OffsetEstimator},
    span::{HopSpan, Role, SpanIds, Value},
};

pub const HOP_FIREWALL: &str = "firewall";

/// Wider than this, the forward/return split is only an estimate (the accuracy target).
const PRECISE_SPLIT_NS: u64 = 100_000;
/// Offsets tracked for at most this many (agent host, persona host) pairs.
const MAX_HOST_PAIRS: usize = 4096;

#[derive(Clone, Debug)]
pub struct Config {
    pub window_ns: u64,
    pub max_pending: usize,
    /// The offset estimator's sliding window (agent time) and its size.
    pub offset_window_ns: u64,
    pub offset_samples: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window_ns: 30_000_000_000,
            max_pending: 65_536,
            offset_window_ns: 300_000_000_000,
            offset_samples: 1024,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub joined: u64,
    /// A side whose partner never came within the window.
    pub one_sided: u64,
    /// A side whose partner had already been given up on (one-sided or evicted): it is passed
    /// on unjoined at once, and not counted one-sided again.
    pub late: u64,
    /// A side evicted because `max_pending` keys were waiting.
    pub evicted_full: u64,
    /// The same span (span id) seen again while waiting: a replay, ignored.
    pub duplicates: u64,
    /// Joined, but the times contradict each other (a side's clock or layer was off): no
    /// firewall span rather than a negative one.
    pub inconsistent: u64,
    /// Host pairs whose clocks stepped, and joins too late to update the offset.
    pub clock_steps: u64,
    pub stale_offsets: u64,
    /// Host pairs forgotten because `MAX_HOST_PAIRS` were tracked.
    pub host_pairs_evicted: u64,
}

impl Stats {
    pub fn summary(&self) -> String {
        format!(
            "firewall joins {}, one-sided {}, late {}, evicted (table full) {}, duplicates {}, \
             inconsistent {}, clock steps {}, stale offsets {}",
            self.joined,
            self.one_sided,
            self.late,
            self.evicted_full,
            self.duplicates,
            self.inconsistent,
            self.clock_steps,
            self.stale_offsets,
        )
    }
}

/// Which clock a side's times are on, and what its kernel says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockInfo {
    /// Equal for two sides reading one kernel's clocks (its boot id); None: unknown.
    pub domain: Option<Cow<'static, str>>,
    pub synchronized: bool,
    /// The kernel's bound on its wall clock's error (adjtimex maxerror), when synchronized.
    pub maxerror_ns: u64,
    /// How far the times may be from the domain's own clock: 0 for the kernel timestamps
    /// themselves, more for times that an agent mapped to wall-clock time before exporting
    /// (two agents on one kernel map it separately).
    pub mapping_error_ns: u64,
}

impl ClockInfo {
    /// Both sides on this host (the agent's single-host mode).
    pub fn this_host() -> Self {
        Self {
            // Borrowed: the agent passes this with every span, and allocates nothing for it.
            domain: Some(Cow::Borrowed("this host")),
            synchronized: true,
            maxerror_ns: 0,
            mapping_error_ns: 0,
        }
    }
}

/// What the join reads of a span, whatever form it arrived in.
pub trait SpanView {
    fn trace_id(&self) -> [u8; 16];
    fn span_id(&self) -> [u8; 8];
    fn parent_id(&self) -> Option<[u8; 8]>;
    fn role(&self) -> Role;
    /// A string or integer attribute, as text (borrowed where it is one).
    fn text(&self, key: &str) -> Option<Cow<'_, str>>;
    /// The time of the span's event `name`.
    fn event(&self, name: &str) -> Option<u64>;
    fn start_ns(&self) -> u64;
    fn end_ns(&self) -> u64;
    fn trace_state(&self) -> Option<String>;
}

impl SpanView for HopSpan {
    fn trace_id(&self) -> [u8; 16] {
        self.ids.trace_id
    }
    fn span_id(&self) -> [u8; 8] {
        self.ids.span_id
    }
    fn parent_id(&self) -> Option<[u8; 8]> {
        self.ids.parent_id
    }
    fn role(&self) -> Role {
        self.role
    }
    fn text(&self, key: &str) -> Option<Cow<'_, str>> {
        match self.attr(key)? {
            Value::Str(s) => Some(Cow::Borrowed(s)),
            Value::Int(i) => Some(Cow::Owned(i.to_string())),
            Value::Bool(_) => None,
        }
    }
    fn event(&self, name: &str) -> Option<u64> {
        self.events
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }
    fn start_ns(&self) -> u64 {
        self.start_ns
    }
    fn end_ns(&self) -> u64 {
        self.end_ns
    }
    fn trace_state(&self) -> Option<String> {
        self.ids.trace_state.clone()
    }
}

/// What the join needs of one side's request span.
#[derive(Clone, Debug)]
struct Side {
    span_id: [u8; 8],
    start_ns: u64,
    end_ns: u64,
    /// Agent: the request leaving its host; persona: the request reaching its host.
    request_ns: u64,
    /// Agent: the response reaching its host; persona: the response leaving its host.
    response_ns: u64,
    /// Whether `request_ns` / `response_ns` are NIC times (else estimated from TCP/syscalls).
    nic: bool,
    client: Option<String>,
    trace_state: Option<String>,
    clock: ClockInfo,
    /// When it started waiting (the caller's clock): what eviction compares.
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
    /// Keys in arrival order with the time they arrived at, for eviction.
    order: VecDeque<(Key, u64)>,
    /// Sides evicted, so that a partner still arriving is told apart as late.
    given_up: GivenUp<Key>,
    /// Per (agent clock domain, persona clock domain).
    offsets: HashMap<(String, String), OffsetEstimator>,
    pub stats: Stats,
}

impl Correlator {
    pub fn new(config: Config) -> Self {
        Self {
            waiting: HashMap::new(),
            order: VecDeque::new(),
            given_up: GivenUp::new(config.max_pending),
            offsets: HashMap::new(),
            stats: Stats::default(),
            config,
        }
    }

    /// Looks at a span at time `now_ns` (the caller's clock, for the window); when it
    /// completes a pair, pushes firewall spans, on the agent side's clock.
    pub fn observe(
        &mut self,
        span: &impl SpanView,
        clock: &ClockInfo,
        now_ns: u64,
        out: &mut Vec<HopSpan>,
    ) {
        let Some(parent) = span.parent_id() else {
            return;
        };
        if span.text("http.request.method").is_none() {
            return;
        }
        let is_agent = match (span.role(), span.text("hoptrace.hop").as_deref()) {
            (Role::Client, Some("agent")) => true,
            (Role::Server, Some("persona")) => false,
            _ => return,
        };
        let Some(side) = side_of(span, is_agent, clock, now_ns) else {
            return;
        };
        let key = (span.trace_id(), parent);
        let waiting = self.waiting.entry(key).or_default();
        let (own, other) = if is_agent {
            (&mut waiting.agent, &mut waiting.persona)
        } else {
            (&mut waiting.persona, &mut waiting.agent)
        };
        if own.iter().any(|s| s.span_id == side.span_id) {
            self.stats.duplicates += 1;
            return;
        }
        match other.pop_front() {
            Some(partner) => {
                if waiting.agent.is_empty() && waiting.persona.is_empty() {
                    self.waiting.remove(&key);
                }
                let (agent, persona) = if is_agent {
                    (side, partner)
                } else {
                    (partner, side)
                };
                self.stats.joined += 1;
                match self.firewall_spans(key, &agent, &persona) {
                    Some(spans) => out.extend(spans),
                    None => self.stats.inconsistent += 1,
                }
            }
            None if self.given_up.take_partner(&key, is_agent) => {
                if waiting.agent.is_empty() && waiting.persona.is_empty() {
                    self.waiting.remove(&key);
                }
                self.stats.late += 1;
            }
            None => {
                own.push_back(side);
                self.order.push_back((key, now_ns));
            }
        }
        self.evict(now_ns);
    }

    /// Drops what waited longer than the window, or beyond capacity.
    pub fn evict(&mut self, now_ns: u64) {
        while let Some(&(key, at)) = self.order.front() {
            let expired = now_ns.saturating_sub(at) > self.config.window_ns;
            let full = self.waiting.len() > self.config.max_pending;
            if !expired && !full {
                break;
            }
            self.order.pop_front();
            if let Some(waiting) = self.waiting.get_mut(&key) {
                // Only a side still waiting since `at`; one that was joined since is gone.
                let agent_side = waiting.agent.front().is_some_and(|s| s.arrived_ns == at);
                let queue = if agent_side {
                    &mut waiting.agent
                } else {
                    &mut waiting.persona
                };
                if queue.front().is_some_and(|s| s.arrived_ns == at) {
                    queue.pop_front();
                    self.given_up.remember(key, agent_side);
                    if expired {
                        self.stats.one_sided += 1;
                    } else {
                        self.stats.evicted_full += 1;
                    }
                }
                if waiting.agent.is_empty() && waiting.persona.is_empty() {
                    self.waiting.remove(&key);
                }
            }
        }
    }

    /// Requests waiting for their other side.
    pub fn pending(&self) -> usize {
        self.waiting
            .values()
            .map(|w| w.agent.len() + w.persona.len())
            .sum()
    }

    /// The persona-to-agent clock offset for this request: exact on one clock, else the
    /// pair's estimate (which this request also tightens).
    fn offset(&mut self, agent: &Side, persona: &Side, lower: i64, upper: i64) -> Option<Split> {
        let (a, p) = (&agent.clock, &persona.clock);
        if a.domain.is_some() && a.domain == p.domain {
            let offset = 0i64.clamp(lower, upper);
            let tolerance = a.mapping_error_ns.saturating_add(p.mapping_error_ns);
            return (offset.unsigned_abs() <= tolerance).then_some(Split {
                offset_ns: offset,
                uncertainty_ns: 0,
                cross_host: None,
            });
        }
        let both_synchronized = a.synchronized && p.synchronized;
        let prior = both_synchronized.then(|| a.maxerror_ns.saturating_add(p.maxerror_ns));
        let (estimate, stale) = match (&a.domain, &p.domain) {
            (Some(ad), Some(pd)) => {
                let pair = (ad.to_string(), pd.to_string());
                if !self.offsets.contains_key(&pair) && self.offsets.len() >= MAX_HOST_PAIRS {
                    // Arbitrary but bounded: a forgotten pair relearns from its next requests.
                    if let Some(victim) = self.offsets.keys().next().cloned() {
                        self.offsets.remove(&victim);
                        self.stats.host_pairs_evicted += 1;
                    }
                }
                let estimator = self.offsets.entry(pair).or_insert_with(|| {
                    OffsetEstimator::new(self.config.offset_window_ns, self.config.offset_samples)
                });
                let added = estimator.add(agent.request_ns, lower, upper);
                match added {
                    Added::Step => self.stats.clock_steps += 1,
                    Added::Stale => self.stats.stale_offsets += 1,
                    Added::Used => {}
                }
                (estimator.estimate(prior), added == Added::Stale)
            }
            // Unknown clocks: this request's own bounds are all there is.
            _ => {
                let mut alone = OffsetEstimator::new(0, 1);
                alone.add(agent.request_ns, lower, upper);
                (alone.estimate(prior), false)
            }
        };
        let estimate = estimate?;
        Some(Split {
            offset_ns: estimate.offset_ns.clamp(lower, upper),
            uncertainty_ns: estimate.uncertainty_ns,
            cross_host: Some(CrossHost {
                both_synchronized,
                stale,
                samples: estimate.samples,
            }),
        })
    }

    /// The firewall's total, forward and return spans, under the request's caller.
    fn firewall_spans(&mut self, key: Key, agent: &Side, persona: &Side) -> Option<Vec<HopSpan>> {
        let (trace_id, parent) = key;
        let (left_agent, reached_agent) = (agent.request_ns, agent.response_ns);
        let (reached_persona, left_persona) = (persona.request_ns, persona.response_ns);
        if reached_agent < left_agent || left_persona < reached_persona {
            return None;
        }
        // Needs no clock agreement between the sides: a difference of two durations.
        let total =
            (agent.end_ns - agent.start_ns).checked_sub(persona.end_ns - persona.start_ns)?;
        // The offset bounds this request alone gives (clock_offset.rs); empty when the persona
        // held the request longer than the agent waited for it.
        let lower = i64::try_from(left_agent as i128 - reached_persona as i128).ok()?;
        let upper = i64::try_from(reached_agent as i128 - left_persona as i128).ok()?;
        if lower > upper {
            return None;
        }
        let split = self.offset(agent, persona, lower, upper)?;
        let forward = (split.offset_ns - lower) as u64;
        let back = (upper - split.offset_ns) as u64;
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
        let mut uncertain = Vec::new();
        if !(agent.nic && persona.nic) {
            uncertain.push("a side has no NIC times; TCP/syscall times used".to_string());
        }
        if let Some(cross) = &split.cross_host {
            common.push(("hoptrace.clock.offset_ns", split.offset_ns.into()));
            common.push((
                "hoptrace.clock.offset_uncertainty_ns",
                (split.uncertainty_ns as i64).into(),
            ));
            common.push((
                "hoptrace.clock.offset_samples",
                (cross.samples as i64).into(),
            ));
            if split.uncertainty_ns > PRECISE_SPLIT_NS {
                uncertain.push(format!(
                    "clock offset between the hosts known to +-{} us only",
                    split.uncertainty_ns / 1000
                ));
            }
            if !cross.both_synchronized {
                uncertain.push("a host's clock is not synchronized".into());
            }
            if cross.stale {
                uncertain.push("request older than the offset estimate's window".into());
            }
        }
        common.push((
            "hoptrace.firewall.split",
            if uncertain.is_empty() {
                "measured"
            } else {
                "estimated"
            }
            .into(),
        ));
        if !uncertain.is_empty() {
            common.push((
                "hoptrace.uncertain",
                format!("split estimated: {}", uncertain.join("; ")).into(),
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
        // All on the agent's clock, inside the agent's request: forward from its request
        // leaving, return up to its response arriving.
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
                left_agent + forward,
                vec![("hoptrace.direction", "forward".into())],
            ),
            span(
                "firewall.return",
                reached_agent - back,
                reached_agent,
                vec![("hoptrace.direction", "return".into())],
            ),
        ])
    }
}

/// How this request's clocks relate.
struct Split {
    /// Add to persona times for agent times.
    offset_ns: i64,
    uncertainty_ns: u64,
    /// Set when the sides are on different clocks.
    cross_host: Option<CrossHost>,
}

struct CrossHost {
    both_synchronized: bool,
    stale: bool,
    samples: usize,
}

fn side_of(span: &impl SpanView, is_agent: bool, clock: &ClockInfo, now_ns: u64) -> Option<Side> {
    let (request_nic, response_nic) = if is_agent {
        (
            span.event("request.nic_egress"),
            span.event("response.nic_ingress"),
        )
    } else {
        (
            span.event("request.nic_ingress"),
            span.event("response.nic_egress"),
        )
    };
    let (request_fallback, response_fallback) = if is_agent {
        (
            span.event("request.tcp_queued"),
            span.event("response.at_tcp")
                .or(span.event("response.to_app")),
        )
    } else {
        (Some(span.start_ns()), Some(span.end_ns()))
    };
    let (address, port) = if is_agent {
        (
            span.text("network.local.address"),
            span.text("network.local.port"),
        )
    } else {
        (
            span.text("network.peer.address"),
            span.text("network.peer.port"),
        )
    };
    Some(Side {
        span_id: span.span_id(),
        start_ns: span.start_ns(),
        end_ns: span.end_ns().max(span.start_ns()),
        nic: request_nic.is_some() && response_nic.is_some(),
        request_ns: request_nic.or(request_fallback)?,
        response_ns: response_nic.or(response_fallback)?,
        client: address.zip(port).map(|(a, p)| format!("{a}:{p}")),
        trace_state: span.trace_state(),
        clock: clock.clone(),
        arrived_ns: now_ns,
    })
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

    fn observe(c: &mut Correlator, span: &HopSpan, out: &mut Vec<HopSpan>) {
        c.observe(span, &ClockInfo::this_host(), span.end_ns, out);
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
        observe(&mut c, &persona(1_020, 1_025, "10.0.0.1"), &mut out);
        assert!(out.is_empty());
        observe(
            &mut c,
            &agent(1_000, 1_040, 1_001, 1_039, "10.0.0.1"),
            &mut out,
        );
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
        observe(
            &mut c,
            &agent(1_000, 1_040, 1_001, 1_039, "10.0.0.1"),
            &mut out,
        );
        observe(&mut c, &persona(1_020, 1_025, "10.0.2.1"), &mut out);
        assert_eq!(
            out[0].attr("hoptrace.firewall.mode"),
            Some(&Value::from("proxy"))
        );
    }

    #[test]
    fn requests_sharing_a_traceparent_pair_in_order() {
        let mut c = Correlator::new(Config::default());
        let mut out = Vec::new();
        observe(&mut c, &persona(1_020, 1_025, "c"), &mut out);
        observe(&mut c, &persona(2_020, 2_025, "c"), &mut out);
        observe(&mut c, &agent(1_000, 1_040, 1_001, 1_039, "c"), &mut out);
        observe(&mut c, &agent(2_000, 2_040, 2_001, 2_039, "c"), &mut out);
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
            ..Config::default()
        });
        let mut out = Vec::new();
        // The persona answered after the agent got its response: impossible, nothing emitted.
        observe(&mut c, &persona(1_020, 1_050, "c"), &mut out);
        observe(&mut c, &agent(1_000, 1_040, 1_001, 1_039, "c"), &mut out);
        assert!(out.is_empty());
        assert_eq!(c.stats.inconsistent, 1);
        // An agent side alone, then time passes beyond the window.
        observe(&mut c, &agent(2_000, 2_040, 2_001, 2_039, "c"), &mut out);
        let mut late = persona(5_000, 5_010, "c");
        late.ids.trace_id = [1; 16];
        observe(&mut c, &late, &mut out);
        assert_eq!(c.stats.one_sided, 1);
        assert!(out.is_empty());
    }

    #[test]
    fn a_side_whose_partner_was_given_up_on_is_late_not_one_sided() {
        let mut c = Correlator::new(Config {
            window_ns: 100,
            ..Config::default()
        });
        let mut out = Vec::new();
        // The agent side waits alone past the window and is evicted...
        c.observe(
            &agent(1_000, 1_040, 1_001, 1_039, "c"),
            &ClockInfo::this_host(),
            1_040,
            &mut out,
        );
        c.evict(1_200);
        assert_eq!((c.stats.one_sided, c.pending()), (1, 0));
        // ...then its persona side comes: late, not joined, not waiting for a second eviction.
        c.observe(
            &persona(1_020, 1_025, "c"),
            &ClockInfo::this_host(),
            1_300,
            &mut out,
        );
        c.evict(10_000);
        assert!(out.is_empty());
        assert_eq!(
            (c.stats.late, c.stats.one_sided, c.stats.joined, c.pending()),
            (1, 1, 0, 0)
        );
        // The next request under the same key pairs as usual.
        observe(&mut c, &persona(2_020, 2_025, "c"), &mut out);
        observe(&mut c, &agent(2_000, 2_040, 2_001, 2_039, "c"), &mut out);
        assert_eq!((c.stats.joined, out.len()), (1, 3));
    }

    #[test]
    fn a_wall_clock_step_between_two_agents_on_one_kernel_makes_no_span() {
        // One kernel, two agents mapping its clock to wall time: one mapped before a 20 ms step,
        // the other after. The sides then contradict each other beyond the mapping error.
        let mut c = Correlator::new(Config::default());
        let mut out = Vec::new();
        let clock = ClockInfo {
            domain: Some("boot-id".into()),
            synchronized: true,
            maxerror_ns: 0,
            mapping_error_ns: 50_000,
        };
        let step = 20_000_000;
        for (shift, joined_spans) in [(step, 0), (-step, 0), (10_000, 3)] {
            out.clear();
            let start = 1_000_000_000u64;
            let p_in = (start as i64 + 3_000_000 + shift) as u64;
            c.observe(
                &persona(p_in, p_in + 1_000_000, "c"),
                &clock,
                start,
                &mut out,
            );
            let a = agent(start, start + 6_000_000, start + 1, start + 5_999_999, "c");
            c.observe(&a, &clock, start, &mut out);
            assert_eq!(out.len(), joined_spans, "shift {shift}: {out:#?}");
            assert!(out.iter().all(|s| s.end_ns >= s.start_ns
                && s.start_ns >= a.start_ns
                && s.end_ns <= a.end_ns));
        }
        assert_eq!((c.stats.joined, c.stats.inconsistent), (3, 2));
    }

    #[test]
    fn spans_without_a_caller_are_not_joined() {
        let mut c = Correlator::new(Config::default());
        let mut out = Vec::new();
        let mut lone = agent(1_000, 1_040, 1_001, 1_039, "c");
        lone.ids.parent_id = None;
        observe(&mut c, &lone, &mut out);
        assert!(c.waiting.is_empty());
    }

    #[test]
    fn a_replayed_span_is_counted_not_paired_and_a_full_table_evicts() {
        let mut c = Correlator::new(Config {
            max_pending: 2,
            ..Config::default()
        });
        let mut out = Vec::new();
        let first = agent(1_000, 1_040, 1_001, 1_039, "c");
        observe(&mut c, &first, &mut out);
        observe(&mut c, &first, &mut out);
        assert_eq!(c.stats.duplicates, 1);
        assert_eq!(c.pending(), 1);
        for t in 1..=3u8 {
            let mut other = agent(2_000, 2_040, 2_001, 2_039, "c");
            other.ids.trace_id = [t; 16];
            observe(&mut c, &other, &mut out);
        }
        assert_eq!(c.stats.evicted_full, 2);
        assert_eq!(c.pending(), 2);
        assert!(out.is_empty());
    }

    /// Agent and persona sides on different hosts whose clocks differ by `theta` (persona
    /// time + theta = agent time): forward 3 ms and return 1 ms on the wire.
    fn cross_host(
        c: &mut Correlator,
        at: u64,
        theta: i64,
        persona_clock: &ClockInfo,
    ) -> Vec<HopSpan> {
        let agent_clock = ClockInfo {
            domain: Some("agent-host".into()),
            synchronized: true,
            maxerror_ns: 0,
            mapping_error_ns: 0,
        };
        let mut out = Vec::new();
        let mut a = agent(at, at + 5_000_000, at + 1, at + 4_500_001, "c");
        let p_in = (at as i64 + 3_000_001 - theta) as u64;
        let mut p = persona(p_in, p_in + 500_000, "c");
        let parent = at.to_le_bytes();
        a.ids.parent_id = Some(parent);
        p.ids.parent_id = Some(parent);
        c.observe(&p, persona_clock, at, &mut out);
        c.observe(&a, &agent_clock, at, &mut out);
        out
    }

    #[test]
    fn across_hosts_the_split_uses_the_estimated_offset_and_says_how_sure_it_is() {
        let theta = -86_400_000_000_123; // a day apart
        let unsynchronized = ClockInfo {
            domain: Some("persona-host".into()),
            synchronized: false,
            maxerror_ns: 16_000_000_000,
            mapping_error_ns: 0,
        };
        let mut c = Correlator::new(Config::default());
        let out = cross_host(&mut c, 10_000_000_000, theta, &unsynchronized);
        let names: Vec<_> = out.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names, ["firewall", "firewall.forward", "firewall.return"]);
        // The total needs no offset; the split is exact in sum and marked estimated.
        assert_eq!(
            out[0].attr("hoptrace.firewall.total_ns"),
            Some(&Value::Int(4_500_000))
        );
        let forward = out[1].duration_ns() as i64;
        let back = out[2].duration_ns() as i64;
        assert_eq!(forward + back, 4_000_000);
        let Some(Value::Int(offset)) = out[0].attr("hoptrace.clock.offset_ns") else {
            panic!("no offset");
        };
        let Some(Value::Int(uncertainty)) = out[0].attr("hoptrace.clock.offset_uncertainty_ns")
        else {
            panic!("no uncertainty");
        };
        assert!(
            (offset - theta).abs() <= *uncertainty,
            "{offset} +- {uncertainty}"
        );
        assert_eq!(
            out[0].attr("hoptrace.firewall.split"),
            Some(&Value::from("estimated"))
        );
        assert!(
            out.iter()
                .all(|s| s.start_ns >= out[0].start_ns && s.end_ns <= out[0].end_ns)
        );
        // Synchronized within 1 ms each: the kernel's bound narrows the estimate.
        let synchronized = ClockInfo {
            domain: Some("persona-host-2".into()),
            synchronized: true,
            maxerror_ns: 1_000_000,
            mapping_error_ns: 0,
        };
        let out = cross_host(&mut c, 20_000_000_000, 1_500_000, &synchronized);
        let Some(Value::Int(uncertainty)) = out[0].attr("hoptrace.clock.offset_uncertainty_ns")
        else {
            panic!("no uncertainty");
        };
        assert!(*uncertainty <= 1_500_000);
        assert_eq!(c.stats.joined, 2);
    }

    #[test]
    fn a_clock_step_between_hosts_is_counted_and_never_makes_a_negative_span() {
        let persona_clock = ClockInfo {
            domain: Some("persona-host".into()),
            synchronized: true,
            maxerror_ns: 0,
            mapping_error_ns: 0,
        };
        let mut c = Correlator::new(Config::default());
        for i in 0..5 {
            cross_host(&mut c, 1_000_000_000 + i * 10_000_000, 0, &persona_clock);
        }
        let out = cross_host(&mut c, 2_000_000_000, -30_000_000, &persona_clock);
        assert_eq!(c.stats.clock_steps, 1);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|s| s.end_ns >= s.start_ns));
        assert_eq!(out[1].duration_ns() + out[2].duration_ns(), 4_000_000);
    }
}
