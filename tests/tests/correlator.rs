//! End-to-end multi-host firewall attribution: one agent scoped to the lab's agent namespace
//! and one to the persona namespace (as on two hosts; the fw runs nothing), both exporting
//! OTLP to `hoptrace correlate` (one over gRPC, one over HTTP/protobuf), which passes their
//! spans on to the real OTLP receiver and adds the firewall spans. Both agents read this one
//! kernel's clock (the same boot id in their resources), so the split is measured, and the
//! sums are checked as in the single-host test; the offset estimator for different clocks is
//! unit-tested (clock_offset.rs, correlate.rs).

use std::time::Duration;

use hoptrace_tests::{
    firewall::{
        HAPROXY_LOCAL_PATH, PARENT_ID, REQUESTS, check_split, curl_requests, deploy_correlated,
        lab, set_delays, spans_of, start_haproxy,
    },
    receiver::OtlpReceiver,
};
use xtask::lab::Host;

/// How long a side waits for the other: short, so that the one-sided test sees its eviction.
const JOIN_WINDOW_S: u64 = 2;

/// The sides' spans arrive under their own agents' resources with the clock state; the
/// firewall spans under the correlator's, measured on the shared clock.
fn check_resources(spans: &[hoptrace_tests::receiver::ReceivedSpan]) {
    let service = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.resource_str("service.name").unwrap_or("?"))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(
        service("firewall").into_iter().collect::<Vec<_>>(),
        ["hoptrace-correlator-test"]
    );
    assert_eq!(
        service("GET").into_iter().collect::<Vec<_>>(),
        ["hoptrace-agent-side", "hoptrace-persona-side"]
    );
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    for span in spans.iter().filter(|s| s.name == "GET") {
        assert_eq!(
            span.resource_str("hoptrace.clock.boot_id"),
            Some(boot_id.trim())
        );
        assert!(span.resource.get("hoptrace.clock.synchronized").is_some());
        assert!(span.resource.get("hoptrace.clock.maxerror_ns").is_some());
    }
    for span in spans.iter().filter(|s| s.name.starts_with("firewall")) {
        assert_eq!(span.attr_str("hoptrace.firewall.split"), Some("measured"));
    }
}

#[test]
fn two_agents_and_the_correlator_attribute_an_l3_forwarder() {
    let lab = lab();
    let receiver = OtlpReceiver::start().expect("receiver");
    let _deployment = deploy_correlated(&lab, &receiver, JOIN_WINDOW_S);
    set_delays(&lab, 20, 10);
    let trace = "2af7651916cd43dd8448eb211c80319c";
    curl_requests(&lab, &lab.nginx_url("/"), trace);
    let spans = spans_of(&receiver, trace, REQUESTS);
    check_split(&spans, 20, 10, "forwarder");
    check_resources(&spans);
}

#[test]
fn two_agents_and_the_correlator_attribute_a_proxy_and_pass_one_sided_requests_through() {
    let lab = lab();
    let (_haproxy, url) = start_haproxy(&lab);
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut deployment = deploy_correlated(&lab, &receiver, JOIN_WINDOW_S);
    set_delays(&lab, 15, 5);
    let trace = "3af7651916cd43dd8448eb211c80319c";
    curl_requests(&lab, &url, trace);
    let spans = spans_of(&receiver, trace, REQUESTS);
    check_split(&spans, 15, 5, "proxy");
    check_resources(&spans);

    // haproxy answers this one itself: only the agent side exists.
    let lonely = "4af7651916cd43dd8448eb211c80319c";
    let header = format!("traceparent: 00-{lonely}-{PARENT_ID}-01");
    let local = format!("{}{}", url.trim_end_matches('/'), HAPROXY_LOCAL_PATH);
    lab.run(
        Host::Agent,
        &["curl", "-sS", "-o", "/dev/null", "-H", &header, &local],
    )
    .unwrap();
    let agent_span = receiver
        .wait_for_spans(
            |spans| {
                spans
                    .iter()
                    .any(|s| s.trace_id == lonely && s.name == "GET")
            },
            Duration::from_secs(15),
        )
        .into_iter()
        .find(|s| s.trace_id == lonely && s.name == "GET")
        .unwrap();
    // Passed on as the agent exported it.
    assert_eq!(agent_span.parent_span_id, PARENT_ID);
    assert_eq!(agent_span.attr_str("hoptrace.hop"), Some("agent"));
    assert_eq!(agent_span.attr_str("url.path"), Some(HAPROXY_LOCAL_PATH));
    assert!(agent_span.event("request.nic_egress").is_some());
    assert_eq!(
        agent_span.resource_str("service.name"),
        Some("hoptrace-agent-side")
    );
    // Evicted after the window, counted, and no firewall span made up for it.
    std::thread::sleep(Duration::from_secs(JOIN_WINDOW_S + 2));
    let status = deployment.correlator.stop().expect("correlator stops");
    assert!(status.success(), "{}", deployment.correlator.stderr());
    let log = deployment.correlator.stderr();
    assert!(
        log.contains(&format!("firewall joins {}, one-sided 1,", REQUESTS)),
        "{log}"
    );
    assert!(
        !receiver
            .spans()
            .iter()
            .any(|s| s.trace_id == lonely && s.name.starts_with("firewall"))
    );
}
