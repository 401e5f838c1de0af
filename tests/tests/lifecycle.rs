//! The agent's lifecycle on the real kernel: SIGTERM detaches every program and link (tc
//! included) and flushes within the shutdown bound, even with a collector that never answers;
//! a restart after SIGKILL starts cleanly and counts every request once; a collector that is
//! down costs counted, bounded losses and the export recovers when it is back on the same port.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use hoptrace_tests::{
    agent::Agent,
    bpf_objects::BpfObjects,
    receiver::{OtlpReceiver, ReceivedSpan, ReceiverOptions},
};
use xtask::lab::{Host, Lab, LabConfig};

const PARENT_ID: &str = "00f067aa0ba902b7";

fn start(lab: &Lab, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
    let mut all = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ];
    all.extend_from_slice(env);
    let mut all_args = vec![
        "--netns",
        lab.netns(Host::Agent).name(),
        "--netns",
        lab.netns(Host::Persona).name(),
    ];
    all_args.extend_from_slice(args);
    Agent::start(&all_args, &all).expect("agent")
}

/// `count` keep-alive requests to nginx carrying `trace_id`.
fn requests(lab: &Lab, trace_id: &str, count: usize) {
    let url = lab.nginx_url("/");
    let header = format!("traceparent: 00-{trace_id}-{PARENT_ID}-01");
    let mut argv = vec![
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "5",
        "-H",
        &header,
    ];
    argv.extend(std::iter::repeat_n(url.as_str(), count));
    lab.run(Host::Agent, &argv).expect("curl");
}

fn request_spans<'a>(
    spans: &'a [ReceivedSpan],
    trace_id: &str,
    hop: &str,
) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.trace_id == trace_id
                && s.attr_str("hoptrace.hop") == Some(hop)
                && s.attr_str("http.request.method").is_some()
        })
        .collect()
}

fn objects(agent: &Agent) -> BpfObjects {
    let objects = BpfObjects::of_process(agent.pid().unwrap()).expect("fdinfo");
    assert!(
        !objects.programs.is_empty() && !objects.maps.is_empty(),
        "{objects:?}"
    );
    // tc on the one veth of each of the two namespaces, both directions (TCX on 6.6+).
    let tc = objects.link_types.iter().filter(|t| *t == "tcx").count();
    assert!(tc >= 4, "tc links: {objects:?}");
    objects
}

#[test]
fn sigterm_detaches_everything_and_flushes_pending_spans_within_the_bound() {
    const TRACE: &str = "11111111111111111111111111111111";
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    // A schedule delay of ten minutes: the spans can only leave with the shutdown flush.
    let mut agent = start(
        &lab,
        &receiver.grpc_endpoint(),
        &[],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("HOPTRACE_SHUTDOWN_TIMEOUT", "5"),
        ],
    );
    let held = objects(&agent);
    requests(&lab, TRACE, 3);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        request_spans(&receiver.spans(), TRACE, "agent").is_empty(),
        "exported before the flush"
    );

    let started = Instant::now();
    let status = agent.stop().expect("stop");
    let took = started.elapsed();
    assert!(status.success(), "{status}\n{}", agent.stderr());
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    // Flushed: the receiver answered the last export before the agent exited.
    let spans = receiver.spans();
    assert_eq!(
        request_spans(&spans, TRACE, "agent").len(),
        3,
        "{}",
        agent.stderr()
    );
    assert_eq!(request_spans(&spans, TRACE, "persona").len(), 3);
    let left = held.still_loaded(Duration::from_secs(3));
    assert_eq!(
        left,
        BpfObjects::default(),
        "still in the kernel after SIGTERM (of {held:?})"
    );
    assert!(
        agent.stderr().contains("hoptrace agent stopped"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn sigterm_with_a_collector_that_never_answers_stops_within_the_shutdown_timeout() {
    let lab = Lab::start(LabConfig::default()).expect("lab");
    // Accepts connections (the kernel's backlog) and never speaks: an export hangs.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let mut agent = start(
        &lab,
        &endpoint,
        &[],
        &[
            ("OTEL_BSP_EXPORT_TIMEOUT", "60000"),
            ("HOPTRACE_SHUTDOWN_TIMEOUT", "2"),
        ],
    );
    requests(&lab, "22222222222222222222222222222222", 2);
    std::thread::sleep(Duration::from_millis(500));
    let held = objects(&agent);
    let started = Instant::now();
    let status = agent.stop().expect("stop");
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    // The flush bound holds, and the agent says what it gave up. Detaching (an RCU grace
    // period per link, slow on a loaded machine) runs meanwhile; the last records' spans get
    // half a second more when it takes longer than the bound.
    assert!(took < Duration::from_secs(6), "stopping took {took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "did not wait for the export: {took:?}"
    );
    assert!(
        agent
            .stderr()
            .contains("export did not finish within the shutdown bound"),
        "{}",
        agent.stderr()
    );
    assert_eq!(
        held.still_loaded(Duration::from_secs(3)),
        BpfObjects::default()
    );
}

#[test]
fn a_restart_after_sigkill_starts_cleanly_and_sees_each_request_once() {
    const TRACE: &str = "33333333333333333333333333333333";
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    let mut first = start(&lab, &receiver.grpc_endpoint(), &[], &[]);
    let held = objects(&first);
    first.kill().expect("SIGKILL");
    // No cleanup ran in the agent: the kernel's own release of its fds must detach it all.
    let left = held.still_loaded(Duration::from_secs(3));
    assert_eq!(
        left,
        BpfObjects::default(),
        "left behind by a killed agent (of {held:?})"
    );

    let second = start(&lab, &receiver.grpc_endpoint(), &[], &[]);
    objects(&second);
    requests(&lab, TRACE, 3);
    let spans = receiver
        .try_wait_for_spans(
            |spans| {
                spans
                    .iter()
                    .filter(|s| s.trace_id == TRACE && s.name == "firewall")
                    .count()
                    >= 3
            },
            Duration::from_secs(15),
        )
        .expect("spans after the restart");
    std::thread::sleep(Duration::from_millis(500));
    let spans = [spans, receiver.spans()].concat();
    let mut seen = std::collections::HashSet::new();
    let spans: Vec<ReceivedSpan> = spans
        .into_iter()
        .filter(|s| seen.insert(s.span_id.clone()))
        .collect();
    for hop in ["agent", "persona"] {
        let found = request_spans(&spans, TRACE, hop);
        assert_eq!(found.len(), 3, "{hop}: {found:#?}");
        for span in found {
            assert!(
                span.attr_str("hoptrace.layers")
                    .is_some_and(|l| l.contains("nic")),
                "{span:#?}"
            );
        }
    }
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.trace_id == TRACE && s.name == "firewall")
            .count(),
        3
    );
}

/// The `NAME VALUE` of an unlabeled sample in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_collector_outage_costs_counted_bounded_drops_and_export_recovers_on_its_return() {
    const DURING: &str = "44444444444444444444444444444444";
    const AFTER: &str = "55555555555555555555555555555555";
    const QUEUE: usize = 16;
    let lab = Lab::start(LabConfig::default()).expect("lab");
    // Take a port a receiver listened on, then stop it: the collector is down.
    let port = OtlpReceiver::start().expect("receiver").grpc_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let queue = QUEUE.to_string();
    let mut agent = start(
        &lab,
        &endpoint,
        &["--metrics-addr", "127.0.0.1:0"],
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", &queue),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "1000"),
        ],
    );
    let metrics = agent.metrics_url().expect("metrics address");
    let scrape = || {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", &metrics])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // ~150 spans: more than the queue, the batch being built and the batches in flight
    // (which retry during the outage) hold.
    requests(&lab, DURING, 30);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape();
        let lost = sample(&text, "hoptrace_export_failed_spans_total").unwrap_or(0.0)
            + sample(&text, "hoptrace_spans_dropped_queue_full_total").unwrap_or(0.0);
        if lost >= 20.0 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let failed = sample(&text, "hoptrace_export_failed_spans_total").unwrap();
    let dropped = sample(&text, "hoptrace_spans_dropped_queue_full_total").unwrap();
    assert!(
        failed + dropped >= 20.0,
        "30 requests' spans, lost and counted:\n{text}"
    );
    // Bounded: what waits is at most the queue, the batch being built and the 4 batches in
    // flight (export::MAX_IN_FLIGHT), each of 8.
    let pending = sample(&text, "hoptrace_export_queue_spans").unwrap();
    assert!(pending <= (QUEUE + 5 * 8) as f64, "{pending} spans pending");

    // The collector returns on the same port.
    let receiver = OtlpReceiver::start_with(ReceiverOptions {
        grpc_port: port,
        ..ReceiverOptions::default()
    })
    .expect("receiver back on the same port");
    // The exporter reconnects (with its own backoff) and delivers what the queue held; until
    // then new spans still meet a full queue, so new requests wait for that.
    receiver
        .try_wait_for_spans(|spans| !spans.is_empty(), Duration::from_secs(15))
        .unwrap_or_else(|e| {
            panic!(
                "no export reached the returned collector: {e:#}\n{}",
                agent.stderr()
            )
        });
    requests(&lab, AFTER, 2);
    receiver
        .try_wait_for_spans(
            |spans| {
                request_spans(spans, AFTER, "persona").len() >= 2
                    && request_spans(spans, AFTER, "agent").len() >= 2
            },
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("export did not recover: {e:#}\n{}", agent.stderr()));
    // What the outage let through is what was waiting when it began: the queue, the batch
    // being built and the batches in flight, which keep retrying and may land after the return.
    let delivered_during = receiver
        .spans()
        .iter()
        .filter(|s| s.trace_id == DURING)
        .count();
    assert!(
        delivered_during <= QUEUE + 5 * 8,
        "{delivered_during} spans of the outage delivered"
    );
    agent.stop().expect("stop");
    // The exit summary counts the same losses.
    let log = agent.stderr();
    let summary = log
        .lines()
        .find(|l| l.contains("hoptrace agent stopped"))
        .unwrap_or_else(|| panic!("no summary:\n{log}"));
    let count = |label: &str| -> f64 {
        summary
            .split(label)
            .nth(1)
            .and_then(|rest| rest.trim().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in {summary}"))
    };
    assert!(
        count("dropped (queue full)") + count("failed (exporter)") >= failed + dropped,
        "{summary}"
    );
}
