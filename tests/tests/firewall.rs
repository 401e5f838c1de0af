//! End-to-end firewall attribution on one host: one agent watching the agent and persona
//! namespaces (not the fw, which stays uninstrumented) joins both sides of each request by its
//! traceparent and exports the firewall's forward and return time, through a plain L3
//! forwarder and through haproxy terminating TCP in the fw.

use std::time::Duration;

use hoptrace_tests::{
    agent::Agent,
    receiver::{OtlpReceiver, ReceivedSpan},
};
use xtask::lab::{Direction, FW_AGENT_IP, Host, Lab, LabConfig, PERSONA_IP};

const PARENT_ID: &str = "00f067aa0ba902b7";
/// Requests per test: one that opens the connection, then keep-alive ones.
const REQUESTS: usize = 5;
/// The delay holder releases packets up to ~0.4 ms late, and never early; a proxy adds its own
/// (unbounded, on a loaded 2-core machine) scheduling time to each request. So every request's
/// split is at least the injected delay, and the least delayed one is within this above it.
const SPLIT_TOLERANCE: Duration = Duration::from_millis(1);
/// Timestamps are taken on different CPUs: allow for their skew below the injected delay.
const NEVER_EARLY_SLACK: Duration = Duration::from_micros(50);
/// Sums on one clock: agent = forward + persona + return, up to the agent host's own kernel time.
const SUM_TOLERANCE: Duration = Duration::from_micros(500);

fn start(lab: &Lab, receiver: &OtlpReceiver) -> Agent {
    Agent::watching_lab(lab, receiver).expect("agent")
}

fn spans_of(receiver: &OtlpReceiver, trace_id: &str, firewall_spans: usize) -> Vec<ReceivedSpan> {
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

fn within(actual: Duration, expected: Duration, tolerance: Duration, what: &str) {
    assert!(
        actual.abs_diff(expected) <= tolerance,
        "{what}: {actual:?}, expected {expected:?} +- {tolerance:?}"
    );
}

/// Checks every keep-alive request of `spans` (all but the first, which also opens the
/// connection): parents, mode, split and sums.
fn check_split(spans: &[ReceivedSpan], forward_ms: u64, return_ms: u64, mode: &str) {
    let by = |name: &str, hop: &str| {
        let mut found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.name == name && s.attr_str("hoptrace.hop") == Some(hop))
            .collect();
        found.sort_by_key(|s| s.start_time_unix_nano);
        found
    };
    let (agent, persona) = (by("GET", "agent"), by("GET", "persona"));
    let (total, forward, back) = (
        by("firewall", "firewall"),
        by("firewall.forward", "firewall"),
        by("firewall.return", "firewall"),
    );
    let n = REQUESTS;
    assert_eq!(
        (
            agent.len(),
            persona.len(),
            total.len(),
            forward.len(),
            back.len()
        ),
        (n, n, n, n, n),
        "{spans:#?}"
    );
    for span in total.iter().chain(&forward).chain(&back) {
        assert_eq!(
            span.parent_span_id, PARENT_ID,
            "under the caller, like the agent and persona spans"
        );
        assert_eq!(span.attr_str("hoptrace.firewall.mode"), Some(mode));
        assert!(
            span.attr_str("hoptrace.uncertain").is_none(),
            "NIC times on both sides: {span:#?}"
        );
    }
    for (direction, spans, injected) in [
        ("forward", &forward, forward_ms),
        ("return", &back, return_ms),
    ] {
        let injected = Duration::from_millis(injected);
        let keep_alive: Vec<Duration> = spans[1..].iter().map(|s| s.duration()).collect();
        assert!(
            spans
                .iter()
                .all(|s| s.attr_str("hoptrace.direction") == Some(direction))
        );
        assert!(
            keep_alive
                .iter()
                .all(|d| *d + NEVER_EARLY_SLACK >= injected),
            "{direction} below the injected delay: {keep_alive:?}"
        );
        within(
            *keep_alive.iter().min().unwrap(),
            injected,
            SPLIT_TOLERANCE,
            direction,
        );
    }
    for i in 1..n {
        // From the agent host's NIC and back, the request's time is exactly forward + persona +
        // return (one clock, first bytes); the agent's whole span adds its own host's time on top (kernel,
        // and the wait until curl runs again: unbounded on a loaded 2-core machine, so not
        // checked).
        let event = |span: &ReceivedSpan, name: &str| span.event(name).expect(name).time_unix_nano;
        let agent_nic = Duration::from_nanos(
            event(agent[i], "response.nic_ingress") - event(agent[i], "request.nic_egress"),
        );
        // The persona's part is first byte in to first byte out, like the split's ends; its
        // span lasts to the last byte out (nginx's sendfile body may leave later).
        let persona_nic = Duration::from_nanos(
            event(persona[i], "response.nic_egress") - event(persona[i], "request.nic_ingress"),
        );
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
}

/// Runs [`REQUESTS`] GETs with `traceparent` on one keep-alive connection from the agent host.
fn curl_requests(lab: &Lab, url: &str, trace: &str) {
    let header = format!("traceparent: 00-{trace}-{PARENT_ID}-01");
    let mut args = vec!["curl", "-sS", "-H", header.as_str()];
    for _ in 0..REQUESTS {
        args.extend(["-o", "/dev/null", url]);
    }
    lab.run(Host::Agent, &args).unwrap();
}

#[test]
fn an_l3_forwarder_gets_forward_and_return_spans_that_add_up() {
    let lab = Lab::start(LabConfig {
        python: false,
        ..LabConfig::default()
    })
    .expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = start(&lab, &receiver);
    lab.set_delay(Direction::Forward, Duration::from_millis(20))
        .unwrap();
    lab.set_delay(Direction::Return, Duration::from_millis(10))
        .unwrap();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    curl_requests(&lab, &lab.nginx_url("/"), trace);
    check_split(&spans_of(&receiver, trace, REQUESTS), 20, 10, "forwarder");
}

#[test]
fn a_tcp_terminating_proxy_is_attributed_by_trace_context() {
    let lab = Lab::start(LabConfig {
        python: false,
        ..LabConfig::default()
    })
    .expect("lab");
    let config = lab.temp_dir().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 1000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fw\n  bind {FW_AGENT_IP}:8080\n  default_backend persona\n\
             backend persona\n  server p {PERSONA_IP}:80\n"
        ),
    )
    .unwrap();
    let _haproxy = lab
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
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = start(&lab, &receiver);
    lab.set_delay(Direction::Forward, Duration::from_millis(15))
        .unwrap();
    lab.set_delay(Direction::Return, Duration::from_millis(5))
        .unwrap();
    let trace = "1af7651916cd43dd8448eb211c80319c";
    curl_requests(&lab, &format!("http://{FW_AGENT_IP}:8080/"), trace);
    // haproxy's own leg to the persona is new per request or reused: either way the join is by
    // trace context, and the split is on the agent's and the persona's NICs.
    check_split(&spans_of(&receiver, trace, REQUESTS), 15, 5, "proxy");
}
