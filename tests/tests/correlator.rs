//! End-to-end multi-host firewall attribution: one agent scoped to the lab's agent namespace
//! and one to the persona namespace (as on two hosts; the fw runs nothing), both exporting
//! OTLP to `hoptrace correlate` (one over gRPC, one over HTTP/protobuf), which passes their
//! spans on to the real OTLP receiver and adds the firewall spans. Both agents read this one
//! kernel's clock (the same boot id in their resources), so the split is measured, and the
//! sums are checked as in the single-host test. For different clocks, the persona-side agent
//! exports through a relay that moves its spans onto another "host" whose clock is off by a
//! known amount (clock_shift.rs): the correlator's offset estimate and its stated uncertainty
//! must cover that offset.

use std::time::Duration;

use hoptrace_tests::{
    clock_shift::OffsetSplit,
    firewall::{
        HAPROXY_LOCAL_PATH, PARENT_ID, PersonaTls, REQUESTS, SPLIT_TOLERANCE, SUM_TOLERANCE,
        check_intercepted, check_split, curl_requests, deploy_correlated, hops, inside,
        intercepted_requests, lab, nic_to_nic, set_delays, shifted_requests, spans_of,
        start_haproxy, start_interception, within,
    },
    receiver::{OtlpReceiver, ReceivedSpan},
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
    check_split(&spans, REQUESTS, (20, 10), "forwarder");
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
    check_split(&spans, REQUESTS, (15, 5), "proxy");
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

#[test]
fn two_agents_and_the_correlator_attribute_a_tls_intercepting_proxy() {
    let lab = lab();
    let interception = start_interception(&lab, PersonaTls::FullTls12);
    let receiver = OtlpReceiver::start().expect("receiver");
    let _deployment = deploy_correlated(&lab, &receiver, JOIN_WINDOW_S);
    // One trace per connection: the second connection's persona leg resumes the first's session.
    let traces = [
        "9af7651916cd43dd8448eb211c80319c",
        "aaf7651916cd43dd8448eb211c80319c",
    ];
    let spans = intercepted_requests(&lab, &interception, &receiver, &traces);
    check_intercepted(&spans, &traces, PersonaTls::FullTls12);
    check_resources(&spans);
}

/// The persona host's clock reads this much behind the agent host's (agent time = persona time
/// + offset: the sign of `hoptrace.clock.offset_ns`).
const PERSONA_CLOCK_OFFSET_NS: i64 = 250_000_000;
/// Enough for the least delayed requests to pin the bounds (minimum-delay filtering).
const OFFSET_REQUESTS: usize = 15;
/// Wider than this, the correlator marks the split estimated (correlate.rs).
const PRECISE_SPLIT_NS: i64 = 100_000;

/// Every request's offset estimate covers the true offset; the split is marked estimated, sums
/// to the time outside the persona without any shared clock, and nests inside the agent's
/// request. The last request's bounds are the least forward and return delays around the
/// offset: uncertainty half the round trip, error half the asymmetry (a constant asymmetry
/// cannot be told from an offset).
fn check_offset_covered(
    spans: &[ReceivedSpan],
    persona_boot_id: &str,
    offset_ns: i64,
    (forward_ms, return_ms): (u64, u64),
) {
    let n = OFFSET_REQUESTS;
    let hops = hops(spans, n);
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    for span in &hops.agent {
        assert_eq!(
            span.resource_str("hoptrace.clock.boot_id"),
            Some(boot_id.trim())
        );
    }
    for span in &hops.persona {
        assert_eq!(
            span.resource_str("hoptrace.clock.boot_id"),
            Some(persona_boot_id)
        );
        assert_eq!(
            span.resource
                .get("hoptrace.clock.synchronized")
                .and_then(|v| v.as_bool()),
            Some(false)
        );
    }
    for i in 0..n {
        let split = OffsetSplit::of(hops.total[i]);
        let what = format!(
            "request {i}: {split:?}\n{:#?}",
            [hops.total[i], hops.agent[i], hops.persona[i]]
        );
        assert!(split.covers(offset_ns), "not covered: {what}");
        assert!(split.uncertainty_ns > PRECISE_SPLIT_NS, "{what}");
        assert_eq!(
            hops.total[i].attr_str("hoptrace.firewall.split"),
            Some("estimated"),
            "{what}"
        );
        assert!(
            hops.total[i].attr_str("hoptrace.uncertain").is_some(),
            "{what}"
        );
        assert!(split.forward_ns >= 0 && split.return_ns >= 0, "{what}");
        within(
            Duration::from_nanos((split.forward_ns + split.return_ns) as u64),
            nic_to_nic(hops.agent[i]) - nic_to_nic(hops.persona[i]),
            SUM_TOLERANCE,
            &format!("forward + return = agent minus persona, NIC to NIC: {what}"),
        );
        assert_eq!(
            (hops.forward[i].duration(), hops.back[i].duration()),
            (
                Duration::from_nanos(split.forward_ns as u64),
                Duration::from_nanos(split.return_ns as u64)
            ),
            "{what}"
        );
        assert!(inside(hops.total[i], hops.agent[i]), "{what}");
        assert!(
            inside(hops.forward[i], hops.total[i]) && inside(hops.back[i], hops.total[i]),
            "{what}\n{:#?}",
            [hops.forward[i], hops.back[i]]
        );
    }
    let last = OffsetSplit::of(hops.total[n - 1]);
    within(
        Duration::from_nanos(last.uncertainty_ns as u64),
        Duration::from_micros((forward_ms + return_ms) * 500),
        SPLIT_TOLERANCE,
        &format!("uncertainty: half the round trip, {last:?}"),
    );
    within(
        Duration::from_nanos(last.error_ns(offset_ns)),
        Duration::from_micros(forward_ms.abs_diff(return_ms) * 500),
        SPLIT_TOLERANCE,
        &format!("error: half the asymmetry, {last:?}"),
    );
}

#[test]
fn a_known_clock_offset_between_hosts_is_covered_by_the_estimate_and_its_uncertainty() {
    let lab = lab();
    // A fresh correlator (and fake host) per pair: one offset estimate each.
    for (delays, trace) in [
        ((10, 10), "5af7651916cd43dd8448eb211c80319c"),
        ((20, 5), "6af7651916cd43dd8448eb211c80319c"),
    ] {
        let (spans, persona_boot_id) = shifted_requests(
            &lab,
            PERSONA_CLOCK_OFFSET_NS,
            delays,
            OFFSET_REQUESTS,
            trace,
        );
        check_offset_covered(&spans, &persona_boot_id, PERSONA_CLOCK_OFFSET_NS, delays);
    }
}
