//! What the firewall tests share, one agent watching both sides (tests/firewall.rs) or two
//! agents and the correlator (tests/correlator.rs): the requests, the haproxy in the fw, and
//! the checks of the firewall spans at the receiver.

use std::{net::TcpListener, time::Duration};

use xtask::lab::{
    Background, Direction, FW_AGENT_IP, FW_PERSONA_IP, Host, Lab, LabConfig, PERSONA_IP,
    PersonaLeg, TlsInterception,
};

use crate::{
    agent::Agent,
    clock_shift::ClockShiftRelay,
    receiver::{OtlpReceiver, ReceivedSpan},
};

pub const PARENT_ID: &str = "00f067aa0ba902b7";
/// Requests per test: one that opens the connection, then keep-alive ones.
pub const REQUESTS: usize = 5;
/// The delay holder releases packets up to ~0.4 ms late, and never early; a proxy adds its own
/// (unbounded, on a loaded 2-core machine) scheduling time to each request. So every request's
/// split is at least the injected delay, and the least delayed one is within this above it.
pub const SPLIT_TOLERANCE: Duration = Duration::from_millis(1);
/// Timestamps are taken on different CPUs: allow for their skew below the injected delay.
pub const NEVER_EARLY_SLACK: Duration = Duration::from_micros(50);
/// Sums on one clock: agent = forward + persona + return, up to the agent host's own kernel time.
pub const SUM_TOLERANCE: Duration = Duration::from_micros(500);

pub fn spans_of(
    receiver: &OtlpReceiver,
    trace_id: &str,
    firewall_spans: usize,
) -> Vec<ReceivedSpan> {
    receiver
        .try_wait_for_spans(
            |spans| {
                spans
                    .iter()
                    .filter(|s| s.trace_id == trace_id && s.name == "firewall")
                    .count()
                    >= firewall_spans
            },
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("waiting for {firewall_spans} firewall spans: {e:#}"))
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect()
}

pub fn within(actual: Duration, expected: Duration, tolerance: Duration, what: &str) {
    assert!(
        actual.abs_diff(expected) <= tolerance,
        "{what}: {actual:?}, expected {expected:?} +- {tolerance:?}"
    );
}

/// One trace's spans by hop, each kind in request order (by start time).
pub struct Hops<'a> {
    pub agent: Vec<&'a ReceivedSpan>,
    pub persona: Vec<&'a ReceivedSpan>,
    pub total: Vec<&'a ReceivedSpan>,
    pub forward: Vec<&'a ReceivedSpan>,
    pub back: Vec<&'a ReceivedSpan>,
}

/// Sorts `spans` by hop; asserts that each hop has `n` of them.
pub fn hops(spans: &[ReceivedSpan], n: usize) -> Hops<'_> {
    let by = |name: &str, hop: &str| {
        let mut found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.name == name && s.attr_str("hoptrace.hop") == Some(hop))
            .collect();
        found.sort_by_key(|s| s.start_time_unix_nano);
        found
    };
    let hops = Hops {
        agent: by("GET", "agent"),
        persona: by("GET", "persona"),
        total: by("firewall", "firewall"),
        forward: by("firewall.forward", "firewall"),
        back: by("firewall.return", "firewall"),
    };
    assert_eq!(
        [
            hops.agent.len(),
            hops.persona.len(),
            hops.total.len(),
            hops.forward.len(),
            hops.back.len()
        ],
        [n; 5],
        "{spans:#?}"
    );
    hops
}

/// A side's request from its first byte at its host's NIC to the response's first byte there:
/// leaving and back for the agent, in and out for the persona.
pub fn nic_to_nic(span: &ReceivedSpan) -> Duration {
    let event = |name: &str| span.event(name).expect(name).time_unix_nano;
    Duration::from_nanos(match span.attr_str("hoptrace.hop") {
        Some("agent") => event("response.nic_ingress") - event("request.nic_egress"),
        _ => event("response.nic_egress") - event("request.nic_ingress"),
    })
}

/// Whether `child` lies within `parent`'s time.
pub fn inside(child: &ReceivedSpan, parent: &ReceivedSpan) -> bool {
    parent.start_time_unix_nano <= child.start_time_unix_nano
        && child.end_time_unix_nano <= parent.end_time_unix_nano
}

/// Checks the `n` requests of `spans` (in order): each has its firewall spans, in its own trace
/// and under the caller like its agent and persona spans, in `mode`, measured on NIC times and
/// inside the agent's request; no split below the injected delays, the least delayed keep-alive
/// request's within [`SPLIT_TOLERANCE`] of them (through a proxy, the forward time of a
/// connection's first request also holds the proxy's own connect and handshake); and the sums.
/// Returns the spans by hop.
pub fn check_split<'a>(
    spans: &'a [ReceivedSpan],
    n: usize,
    (forward_ms, return_ms): (u64, u64),
    mode: &str,
) -> Hops<'a> {
    let hops = hops(spans, n);
    let Hops {
        agent,
        persona,
        total,
        forward,
        back,
    } = &hops;
    for i in 0..n {
        let request = [agent[i], persona[i], total[i], forward[i], back[i]];
        let what = format!("request {i}: {request:#?}");
        for span in request {
            assert_eq!(span.trace_id, agent[i].trace_id, "{what}");
            assert_eq!(
                span.parent_span_id, PARENT_ID,
                "all under the caller: {what}"
            );
        }
        for span in [total[i], forward[i], back[i]] {
            assert_eq!(span.attr_str("hoptrace.firewall.mode"), Some(mode));
            assert!(
                span.attr_str("hoptrace.uncertain").is_none(),
                "NIC times on both sides: {span:#?}"
            );
        }
        assert!(inside(total[i], agent[i]), "{what}");
        assert!(
            inside(forward[i], total[i]) && inside(back[i], total[i]),
            "{what}"
        );
    }
    let keep_alive: Vec<usize> = (0..n)
        .filter(|&i| agent[i].attr_bool("hoptrace.connection.first_request") == Some(false))
        .collect();
    assert!(!keep_alive.is_empty(), "no keep-alive request: {spans:#?}");
    for (direction, spans, injected) in [
        ("forward", forward, forward_ms),
        ("return", back, return_ms),
    ] {
        let injected = Duration::from_millis(injected);
        let durations: Vec<Duration> = spans.iter().map(|s| s.duration()).collect();
        assert!(
            spans
                .iter()
                .all(|s| s.attr_str("hoptrace.direction") == Some(direction))
        );
        assert!(
            durations.iter().all(|d| *d + NEVER_EARLY_SLACK >= injected),
            "{direction} below the injected delay: {durations:?}"
        );
        within(
            keep_alive.iter().map(|&i| durations[i]).min().unwrap(),
            injected,
            SPLIT_TOLERANCE,
            direction,
        );
    }
    for i in 0..n {
        // From the agent host's NIC and back, the request's time is exactly forward + persona +
        // return (one clock, first bytes); the agent's whole span adds its own host's time on top (kernel,
        // and the wait until curl runs again: unbounded on a loaded 2-core machine, so not
        // checked).
        let agent_nic = nic_to_nic(agent[i]);
        // The persona's part is first byte in to first byte out, like the split's ends; its
        // span lasts to the last byte out (nginx's sendfile body may leave later).
        let persona_nic = nic_to_nic(persona[i]);
        let sum = forward[i].duration() + persona_nic + back[i].duration();
        let what = format!(
            "request {i}: agent (NIC to NIC) = forward + persona + return\n{:#?}",
            [agent[i], persona[i], forward[i], back[i]]
        );
        within(agent_nic, sum, SUM_TOLERANCE, &what);
        assert!(
            agent[i].duration() >= agent_nic,
            "the agent span contains its NIC-to-NIC part"
        );
        let total_ns = total[i]
            .attr_i64("hoptrace.firewall.total_ns")
            .expect("total") as u64;
        within(
            Duration::from_nanos(total_ns),
            agent[i].duration() - persona[i].duration(),
            Duration::ZERO,
            "total",
        );
    }
    hops
}

/// Runs [`REQUESTS`] GETs with `traceparent` on one keep-alive connection from the agent host.
pub fn curl_requests(lab: &Lab, url: &str, trace: &str) {
    curl_keep_alive(lab, url, &[], trace, REQUESTS);
}

/// Runs `requests` GETs with `traceparent` on one keep-alive connection from the agent host,
/// with curl's `options`.
pub fn curl_keep_alive(lab: &Lab, url: &str, options: &[&str], trace: &str, requests: usize) {
    let header = format!("traceparent: 00-{trace}-{PARENT_ID}-01");
    let mut args = vec!["curl", "-sS", "-H", header.as_str()];
    args.extend(options);
    for _ in 0..requests {
        args.extend(["-o", "/dev/null", url]);
    }
    lab.run(Host::Agent, &args).unwrap();
}

/// Through the L3 forwarder delaying `forward_ms` / `return_ms`, with the persona side as a host
/// whose clock reads `offset_ns` behind the agent side's ([`deploy_correlated_with`]):
/// `requests` GETs on one keep-alive connection. Returns their spans at the receiver and the
/// persona host's (fake) boot id.
pub fn shifted_requests(
    lab: &Lab,
    offset_ns: i64,
    (forward_ms, return_ms): (u64, u64),
    requests: usize,
    trace: &str,
) -> (Vec<ReceivedSpan>, String) {
    let receiver = OtlpReceiver::start().expect("receiver");
    let deployment = deploy_correlated_with(lab, &receiver, 30, Some(offset_ns));
    set_delays(lab, forward_ms, return_ms);
    curl_keep_alive(lab, &lab.nginx_url("/"), &[], trace, requests);
    let relay = deployment.relay.as_ref().expect("deployed with a relay");
    (
        spans_of(&receiver, trace, requests),
        relay.boot_id().to_owned(),
    )
}

/// The path haproxy answers itself (`HAPROXY_LOCAL_PATH`): a request the persona never sees.
pub const HAPROXY_LOCAL_PATH: &str = "/fw-local";

/// haproxy in the fw terminating TCP: agent -> fw:8080 -> persona:80, answering
/// [`HAPROXY_LOCAL_PATH`] itself. Returns its URL once it serves.
pub fn start_haproxy(lab: &Lab) -> (Background, String) {
    let config = lab.temp_dir().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 1000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fw\n  bind {FW_AGENT_IP}:8080\n  http-request return status 200 if {{ path {HAPROXY_LOCAL_PATH} }}\n  default_backend persona\n\
             backend persona\n  server p {PERSONA_IP}:80\n"
        ),
    )
    .unwrap();
    let haproxy = lab
        .spawn(
            Host::Fw,
            &["haproxy", "-db", "-f", config.to_str().unwrap()],
        )
        .expect("haproxy");
    // Wait until haproxy listens.
    let ready = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        lab.exec(
            Host::Agent,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                &format!("http://{FW_AGENT_IP}:8080/"),
            ],
        )
        .status()
        .is_ok_and(|s| s.success())
    });
    assert!(ready, "haproxy did not come up");
    (haproxy, format!("http://{FW_AGENT_IP}:8080/"))
}

/// The fw's delays through the TLS interception (forward ms, return ms): the forward one lands
/// on the agent <-> fw leg, the return one on the fw <-> persona leg (xtask's interception.rs).
pub const INTERCEPTION_DELAYS: (u64, u64) = (20, 5);
/// GETs per connection through the interception: the first opens both legs, the next reuses
/// them.
pub const INTERCEPTED_REQUESTS: usize = 2;

/// The TLS of haproxy's own connections to the persona, and when a connection's first request
/// reaches the persona.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersonaTls {
    /// TLS 1.2 with a full handshake on each connection, as the accuracy benchmark runs it:
    /// haproxy sends the first request once the persona's Finished is back, so the request
    /// reaches the persona a return delay after the persona's handshake is done.
    FullTls12,
    /// haproxy's default, TLS 1.3 (which this haproxy does not resume): the request follows
    /// haproxy's Finished flight within ~150 us, and nginx often reads both in one call during
    /// the handshake. The request's own segment, found inside that read, arrives after the
    /// flight's: taking the read's first segment, the flight's, made the persona span start
    /// exactly at the handshake's end and `firewall.forward` ~150 us too short.
    Default,
}

/// haproxy intercepting TLS in the fw, its leg to the persona as `tls` says.
pub fn start_interception(lab: &Lab, tls: PersonaTls) -> TlsInterception<'_> {
    let leg = match tls {
        PersonaTls::FullTls12 => PersonaLeg {
            max_version: Some("TLSv1.2"),
            full_handshakes: true,
        },
        PersonaTls::Default => PersonaLeg::default(),
    };
    lab.start_tls_interception_with(leg)
        .expect("TLS interception")
}

/// Each connection's legs through the interception, by (span name, hop): the agent's connect
/// and TLS handshake to the fw, then the fw's own to the persona.
const LEGS: [(&str, &str); 4] = [
    ("tcp.connect", "agent"),
    ("tls.handshake", "agent"),
    ("tcp.accept", "persona"),
    ("tls.handshake", "persona"),
];

/// The spans of trace `trace` of each of [`LEGS`].
fn legs<'a>(spans: &'a [ReceivedSpan], trace: &str) -> [Vec<&'a ReceivedSpan>; 4] {
    LEGS.map(|(name, hop)| {
        spans
            .iter()
            .filter(|s| {
                s.trace_id == trace && s.name == name && s.attr_str("hoptrace.hop") == Some(hop)
            })
            .collect()
    })
}

/// HTTPS through `interception` (curl trusting the fw's CA) with the fw delaying
/// [`INTERCEPTION_DELAYS`]: [`INTERCEPTED_REQUESTS`] GETs on a connection of their own per trace
/// of `traces`, one connection after the other. Returns the traces' spans once every request's
/// firewall spans and every connection's legs are in.
pub fn intercepted_requests(
    lab: &Lab,
    interception: &TlsInterception,
    receiver: &OtlpReceiver,
    traces: &[&str],
) -> Vec<ReceivedSpan> {
    set_delays(lab, INTERCEPTION_DELAYS.0, INTERCEPTION_DELAYS.1);
    let ca = interception.ca().to_str().expect("a UTF-8 path");
    for trace in traces {
        curl_keep_alive(
            lab,
            &lab.nginx_https_url("/"),
            &["--cacert", ca],
            trace,
            INTERCEPTED_REQUESTS,
        );
    }
    receiver
        .try_wait_for_spans(
            |spans| {
                traces.iter().all(|trace| {
                    legs(spans, trace).iter().all(|leg| !leg.is_empty())
                        && spans
                            .iter()
                            .filter(|s| s.trace_id == *trace && s.name == "firewall")
                            .count()
                            >= INTERCEPTED_REQUESTS
                })
            },
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("waiting for the intercepted requests' spans: {e:#}"))
        .into_iter()
        .filter(|s| traces.contains(&s.trace_id.as_str()))
        .collect()
}

/// Checks what [`intercepted_requests`] got through an interception whose persona leg is `tls`:
/// every request's firewall spans in mode proxy ([`check_split`]), each connection's requests
/// in its own trace, its two legs' connects and handshakes under that trace, the persona's
/// first request after its handshake, and every span inside its parent.
pub fn check_intercepted(spans: &[ReceivedSpan], traces: &[&str], tls: PersonaTls) {
    let hops = check_split(
        spans,
        traces.len() * INTERCEPTED_REQUESTS,
        INTERCEPTION_DELAYS,
        "proxy",
    );
    let (forward, back) = (
        Duration::from_millis(INTERCEPTION_DELAYS.0),
        Duration::from_millis(INTERCEPTION_DELAYS.1),
    );
    for (c, trace) in traces.iter().enumerate() {
        let requests = c * INTERCEPTED_REQUESTS..(c + 1) * INTERCEPTED_REQUESTS;
        for i in requests.clone() {
            assert_eq!(hops.agent[i].trace_id, *trace, "request {i}");
            assert_eq!(
                hops.agent[i].attr_bool("hoptrace.connection.first_request"),
                Some(i == requests.start),
                "request {i}"
            );
        }
        let (agent, persona) = (hops.agent[requests.start], hops.persona[requests.start]);
        let [connect, agent_handshake, accept, persona_handshake] =
            legs(spans, trace).map(|leg| match leg[..] {
                [span] => span,
                _ => panic!("connection {c}: one of each leg's spans, got {leg:#?}"),
            });
        // The agent's leg ends at the fw, which answers in the persona's name: children of the
        // connection's first request, behind the forward delay only. The fw's own leg, opened
        // once haproxy has the first request, comes from the fw's persona-side address:
        // siblings of the persona's first request (they precede it), behind the return delay
        // only.
        for ([tcp, handshake], parent, peer, delay) in [
            (
                [connect, agent_handshake],
                &agent.span_id,
                PERSONA_IP,
                forward,
            ),
            (
                [accept, persona_handshake],
                &persona.parent_span_id,
                FW_PERSONA_IP,
                back,
            ),
        ] {
            for span in [tcp, handshake] {
                assert_eq!(&span.parent_span_id, parent, "{span:#?}");
                assert_eq!(
                    span.attr_str("network.peer.address"),
                    Some(peer.to_string().as_str()),
                    "{span:#?}"
                );
            }
            assert!(tcp.duration() + NEVER_EARLY_SLACK >= delay, "{tcp:#?}");
        }
        let (request_in, handshake_done) = (persona.start_time(), persona_handshake.end_time());
        let what = format!("{:#?}", [persona_handshake, persona]);
        match tls {
            // haproxy sends the request once the persona's Finished is back through the fw: it
            // reaches the persona a return delay after the handshake is done, never with it.
            PersonaTls::FullTls12 => assert!(
                request_in + NEVER_EARLY_SLACK >= handshake_done + back,
                "the first request arrived with its handshake: {what}"
            ),
            // The persona's TLS 1.3 handshake is done when haproxy's Finished flight arrives,
            // and the request follows it without a round trip, in a segment of its own: after
            // the flight, never with it.
            PersonaTls::Default => assert!(
                handshake_done < request_in && request_in < handshake_done + back,
                "the first request did not follow its handshake's end alone: {what}"
            ),
        }
    }
    for child in spans {
        if let Some(parent) = spans.iter().find(|s| s.span_id == child.parent_span_id) {
            assert!(
                inside(child, parent),
                "{child:#?}\noutside its parent {parent:#?}"
            );
        }
    }
}

/// The lab the firewall tests use (nginx in the persona, no Python server).
pub fn lab() -> Lab {
    Lab::start(LabConfig {
        python: false,
        ..LabConfig::default()
    })
    .expect("lab")
}

/// The fw's per-direction delays, in ms.
pub fn set_delays(lab: &Lab, forward_ms: u64, return_ms: u64) {
    lab.set_delay(Direction::Forward, Duration::from_millis(forward_ms))
        .unwrap();
    lab.set_delay(Direction::Return, Duration::from_millis(return_ms))
        .unwrap();
}

/// A port nobody listens on now (the correlator binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The correlator exporting to `receiver`, and an agent per side exporting to it.
pub struct Deployment {
    pub correlator: Agent,
    /// The agent-side agent, then the persona-side one.
    pub agents: [Agent; 2],
    /// What the persona-side agent exports through when its host's clock is shifted.
    pub relay: Option<ClockShiftRelay>,
    correlator_args: Vec<String>,
    correlator_env: Vec<(&'static str, String)>,
}

impl Deployment {
    /// Kills the correlator (SIGKILL: nothing it holds is flushed); returns its log.
    pub fn kill_correlator(&mut self) -> String {
        self.correlator.kill().expect("kill the correlator");
        self.correlator.stderr()
    }

    /// Starts a new correlator on the same ports (after [`Deployment::kill_correlator`]).
    pub fn restart_correlator(&mut self) {
        self.correlator = start_correlator(&self.correlator_args, &self.correlator_env);
    }
}

fn start_correlator(args: &[String], env: &[(&'static str, String)]) -> Agent {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Agent::start_correlator(&args, &env).expect("correlator")
}

/// `join_window_s`: how long a side waits for the other.
pub fn deploy_correlated(lab: &Lab, receiver: &OtlpReceiver, join_window_s: u64) -> Deployment {
    deploy_correlated_with(lab, receiver, join_window_s, None)
}

/// [`deploy_correlated`], with `persona_clock_offset_ns` Some: the persona side as another
/// host whose clock reads that much behind the agent side's (agent time = persona time +
/// offset, the sign of `hoptrace.clock.offset_ns`), its agent exporting through a
/// [`ClockShiftRelay`] to the correlator's gRPC port.
pub fn deploy_correlated_with(
    lab: &Lab,
    receiver: &OtlpReceiver,
    join_window_s: u64,
    persona_clock_offset_ns: Option<i64>,
) -> Deployment {
    let (grpc, http) = (free_port(), free_port());
    let (grpc_listen, http_listen) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{http}"));
    let correlator_args: Vec<String> = [
        "--grpc-listen",
        &grpc_listen,
        "--http-listen",
        &http_listen,
        "--join-window",
        &join_window_s.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let correlator_env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
        ("OTEL_SERVICE_NAME", "hoptrace-correlator-test".to_owned()),
    ];
    let correlator = start_correlator(&correlator_args, &correlator_env);
    let relay = persona_clock_offset_ns
        .map(|offset| ClockShiftRelay::start(&grpc_listen, offset).expect("clock shift relay"));
    // Unshifted, over the correlator's other transport (the relay speaks gRPC only).
    let (persona_endpoint, persona_protocol) = match &relay {
        Some(relay) => (relay.endpoint(), "grpc"),
        None => (format!("http://{http_listen}"), "http/protobuf"),
    };
    let agent = |host: Host, endpoint: String, protocol: &str, service: &str| {
        Agent::start(
            &["--netns", lab.netns(host).name()],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_SERVICE_NAME", service),
            ],
        )
        .expect("agent")
    };
    let agents = [
        agent(
            Host::Agent,
            format!("http://{grpc_listen}"),
            "grpc",
            "hoptrace-agent-side",
        ),
        agent(
            Host::Persona,
            persona_endpoint,
            persona_protocol,
            "hoptrace-persona-side",
        ),
    ];
    Deployment {
        correlator,
        agents,
        relay,
        correlator_args,
        correlator_env,
    }
}
