//! The agent's Prometheus endpoint end to end: real requests through the lab's firewall, a scrape
//! of /metrics parsed by the reference parsers (prometheus_client's Prometheus text and
//! OpenMetrics parsers), histogram counts equal to the requests made.

use std::time::Duration;

use hoptrace_tests::{
    agent::Agent,
    prometheus::{Scrape, scrape},
    receiver::OtlpReceiver,
};
use xtask::lab::{Direction, Host, Lab, LabConfig, NGINX_PORT, PERSONA_IP};

const REQUESTS: usize = 6;
const FORWARD_DELAY: Duration = Duration::from_millis(10);

#[test]
fn hop_histograms_count_every_request_and_counters_track_the_pipeline() {
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    let endpoint = receiver.grpc_endpoint();
    let agent = Agent::start(
        &[
            "--netns",
            lab.netns(Host::Agent).name(),
            "--netns",
            lab.netns(Host::Persona).name(),
            // Port 0: the agent logs the port it got, so parallel tests never collide.
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    )
    .expect("agent");
    let url = agent
        .metrics_url()
        .expect("the agent logs its metrics address");
    lab.set_delay(Direction::Forward, FORWARD_DELAY).unwrap();
    let page = lab.nginx_url("/");
    let mut argv = vec!["curl", "-sS", "-o", "/dev/null", "--max-time", "5"];
    let header = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    argv.extend(["-H", header]);
    argv.extend(std::iter::repeat_n(page.as_str(), REQUESTS));
    lab.run(Host::Agent, &argv).expect("curl");
    receiver
        .try_wait_for_spans(
            |spans| {
                spans
                    .iter()
                    .filter(|s| s.name == "firewall.forward")
                    .count()
                    >= REQUESTS
            },
            Duration::from_secs(15),
        )
        .expect("firewall spans of every request");

    let server = format!("{PERSONA_IP}:{NGINX_PORT}");
    let count = |scrape: &Scrape, hop: &str, direction: &str| {
        scrape
            .value(
                "hoptrace_hop_duration_seconds_count",
                &[("hop", hop), ("direction", direction), ("server", &server)],
            )
            .unwrap_or(0.0)
    };
    // Counters are published on the agent's 500 ms sweep: scrape until they have caught up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let scrape = scrape(&url);
        let exported = scrape
            .value("hoptrace_spans_exported_total", &[])
            .unwrap_or(0.0);
        if exported >= receiver.spans().len() as f64 || std::time::Instant::now() > deadline {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        scrape
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        scrape.content_type
    );
    assert!(
        scrape.strict_unlabeled > 5,
        "the OpenMetrics parser read too little"
    );
    let n = REQUESTS as f64;
    for (hop, direction) in [
        ("agent", "round_trip"),
        ("persona", "round_trip"),
        ("firewall", "round_trip"),
        ("firewall", "forward"),
        ("firewall", "return"),
    ] {
        assert_eq!(
            count(&scrape, hop, direction),
            n,
            "{hop} {direction}: {:#?}",
            scrape.samples
        );
    }
    // Every forward hop waited in the delay queue: a lower bound on the sum, no upper one.
    let forward_sum = scrape
        .value(
            "hoptrace_hop_duration_seconds_sum",
            &[
                ("hop", "firewall"),
                ("direction", "forward"),
                ("server", &server),
            ],
        )
        .unwrap();
    assert!(
        forward_sum >= n * FORWARD_DELAY.as_secs_f64(),
        "{forward_sum}"
    );
    // The +Inf bucket holds every observation; the histogram's type survives the parser.
    let inf = scrape
        .value(
            "hoptrace_hop_duration_seconds_bucket",
            &[("hop", "agent"), ("server", &server), ("le", "+Inf")],
        )
        .unwrap();
    assert_eq!(inf, n);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.name == "hoptrace_hop_duration_seconds_bucket" && s.kind == "histogram")
    );
    assert!(
        scrape
            .value("hoptrace_ring_buffer_records_total", &[])
            .unwrap()
            > 0.0
    );
    assert_eq!(
        scrape.value("hoptrace_ring_buffer_lost_records_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        scrape.value("hoptrace_spans_dropped_queue_full_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        scrape.value("hoptrace_export_failed_spans_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        scrape.value("hoptrace_firewall_joins_total", &[("reason", "joined")]),
        Some(n)
    );
    assert_eq!(
        scrape.value("hoptrace_layer_attached", &[("layer", "requests")]),
        Some(1.0)
    );
    let exported = scrape.value("hoptrace_spans_exported_total", &[]).unwrap();
    assert!(
        exported >= receiver.spans().len() as f64,
        "{exported} < spans received"
    );
    assert!(scrape.value("hoptrace_export_queue_spans", &[]).is_some());
    // The Grafana example (deploy/grafana) queries only series a real agent serves.
    for name in dashboard_metric_names() {
        assert!(
            scrape.samples.iter().any(|s| s.name == name),
            "the dashboard queries {name}, which the agent does not serve"
        );
    }
    drop(agent);
}

/// Every `hoptrace_*` series name in the example dashboard's Prometheus queries.
fn dashboard_metric_names() -> std::collections::BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/dashboards/hoptrace.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut names = std::collections::BTreeSet::new();
    let queries = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .chain(
            dashboard["templating"]["list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["query"]["query"].as_str()),
        );
    for query in queries {
        for piece in query.split("hoptrace_").skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(format!("hoptrace_{name}"));
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    names
}
