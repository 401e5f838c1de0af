//! End-to-end faults of `hoptrace correlate` with the real agents (one per side, as on two
//! hosts) and the real OTLP receiver: a correlator killed and started again while the agents
//! export, and a side arriving after its partner was given up on. In both, the sides that
//! cannot be joined are exported as they came and counted, and no firewall span is made up.
//!
//! To decide which side reaches the correlator when, the persona-side agent is paused
//! (SIGSTOP) while a request runs: its kernel records wait in the ring buffer, and it builds and
//! exports the persona's span once it is continued.

use std::time::Duration;

use hoptrace_tests::{
    agent::Agent,
    firewall::{Deployment, PARENT_ID, deploy_correlated, lab, set_delays},
    receiver::{OtlpReceiver, ReceivedSpan},
};
use xtask::lab::{Host, Lab};

/// Pauses an agent until dropped (also when the test fails).
struct Paused(u32);

impl Paused {
    fn new(agent: &Agent) -> Self {
        let pid = agent.pid().expect("agent runs");
        // SAFETY: plain system call on our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        Self(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: plain system call on our own child.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// One GET under `trace`, on a connection of its own.
fn request(lab: &Lab, trace: &str) {
    let header = format!("traceparent: 00-{trace}-{PARENT_ID}-01");
    lab.run(
        Host::Agent,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-H",
            &header,
            &lab.nginx_url("/"),
        ],
    )
    .unwrap();
}

fn has(spans: &[ReceivedSpan], trace: &str, name: &str, hop: &str) -> bool {
    spans
        .iter()
        .any(|s| s.trace_id == trace && s.name == name && s.attr_str("hoptrace.hop") == Some(hop))
}

fn wait_for(receiver: &OtlpReceiver, trace: &str, name: &str, hop: &str) {
    receiver
        .try_wait_for_spans(
            |spans| has(spans, trace, name, hop),
            Duration::from_secs(40),
        )
        .unwrap_or_else(|e| panic!("waiting for {name} ({hop}) of {trace}: {e:#}"));
}

/// Stops the correlator; its closing counts must hold `counts`.
fn stop_expecting(deployment: &mut Deployment, counts: &str, context: &str) {
    let status = deployment.correlator.stop().expect("correlator stops");
    let log = deployment.correlator.stderr();
    assert!(status.success(), "{log}");
    assert!(log.contains(counts), "{counts}:\n{log}{context}");
}

fn assert_no_firewall_span(spans: &[ReceivedSpan], trace: &str) {
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id == trace && s.name.starts_with("firewall")),
        "{spans:#?}"
    );
}

#[test]
fn a_restarted_correlator_joins_again_and_exports_straddling_requests_one_sided() {
    let lab = lab();
    let receiver = OtlpReceiver::start().expect("receiver");
    const WINDOW_S: u64 = 3;
    let mut deployment = deploy_correlated(&lab, &receiver, WINDOW_S);
    set_delays(&lab, 5, 2);
    let (before, straddling, during, after) = (
        "5af7651916cd43dd8448eb211c80319c",
        "6af7651916cd43dd8448eb211c80319c",
        "7af7651916cd43dd8448eb211c80319c",
        "8af7651916cd43dd8448eb211c80319c",
    );
    request(&lab, before);
    wait_for(&receiver, before, "firewall", "firewall");

    // The agent's half reaches the first correlator; the persona's is held back...
    let paused = Paused::new(&deployment.agents[1]);
    request(&lab, straddling);
    wait_for(&receiver, straddling, "GET", "agent");
    // ...until the first correlator is gone. Meanwhile a request runs with no correlator: the
    // agents' exporters fail and retry.
    let first_log = deployment.kill_correlator();
    request(&lab, during);
    std::thread::sleep(Duration::from_secs(1));
    // The same ports again; a new process knows nothing of what the first one held.
    deployment.restart_correlator();
    drop(paused);
    request(&lab, after);
    for trace in [during, after] {
        wait_for(&receiver, trace, "firewall", "firewall");
    }
    wait_for(&receiver, straddling, "GET", "persona");

    // The straddling request's persona side waits out the window in the new correlator and is
    // counted one-sided; both its sides were exported, no firewall span was made up.
    std::thread::sleep(Duration::from_secs(WINDOW_S + 2));
    stop_expecting(
        &mut deployment,
        "firewall joins 2, one-sided 1, late 0,",
        &format!("\nfirst correlator:\n{first_log}"),
    );
    let spans = receiver.spans();
    assert!(has(&spans, straddling, "GET", "agent") && has(&spans, straddling, "GET", "persona"));
    assert_no_firewall_span(&spans, straddling);
    for trace in [before, during, after] {
        let firewall = spans
            .iter()
            .filter(|s| s.trace_id == trace && s.name == "firewall")
            .count();
        assert_eq!(firewall, 1, "{trace}");
    }

    // The agent side retried through the outage and lost nothing.
    let agent = &mut deployment.agents[0];
    agent.stop().expect("agent stops");
    let agent_log = agent.stderr();
    for expected in [
        "export failed, retrying",
        "exporter recovered",
        "failed (exporter) 0",
    ] {
        assert!(agent_log.contains(expected), "{expected}:\n{agent_log}");
    }
}

#[test]
fn a_side_arriving_after_its_partner_was_evicted_is_counted_late() {
    let lab = lab();
    let receiver = OtlpReceiver::start().expect("receiver");
    const WINDOW_S: u64 = 1;
    let mut deployment = deploy_correlated(&lab, &receiver, WINDOW_S);
    let late = "9af7651916cd43dd8448eb211c80319c";
    {
        let _paused = Paused::new(&deployment.agents[1]);
        request(&lab, late);
        wait_for(&receiver, late, "GET", "agent");
        // The window passes, and the eviction (every second) with it.
        std::thread::sleep(Duration::from_secs(WINDOW_S + 2));
    }
    wait_for(&receiver, late, "GET", "persona");
    stop_expecting(
        &mut deployment,
        "firewall joins 0, one-sided 1, late 1,",
        "",
    );
    // Passed on as it came, unjoined.
    let spans = receiver.spans();
    let persona = spans
        .iter()
        .find(|s| {
            s.trace_id == late && s.attr_str("hoptrace.hop") == Some("persona") && s.name == "GET"
        })
        .unwrap();
    assert_eq!(persona.parent_span_id, PARENT_ID);
    assert_no_firewall_span(&spans, late);
}
