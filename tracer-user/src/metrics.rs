//! Prometheus metrics of the agent (`--metrics-addr`): per-hop latency histograms and the
//! pipeline's counters, served as OpenMetrics text at http://ADDR/metrics.
//!
//! Off the hot path: the histograms are observed once per exported hop span (an atomic add in
//! prometheus-client); every counter is mirrored from the totals the agent already keeps
//! (records, request stats, export stats, kernel counters) on the agent's 500 ms sweep, so a
//! scrape sees values at most that old and the ring-buffer loop does no extra work.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    correlate,
    export::ExportStats,
    kubernetes, requests,
    span::{HopSpan, Value},
};

/// Distinct (hop, direction, server) series before new servers share `server="other"`: the
/// label set stays bounded however many servers the agent sees.
const MAX_SERVER_SERIES: usize = 128;
pub const OVERFLOW_SERVER: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabels {
    /// agent, persona or firewall (`hoptrace.hop`).
    hop: String,
    /// `round_trip` for a whole request (agent, persona, the firewall's total); `forward` or
    /// `return` for the firewall's two directions.
    direction: String,
    /// The request's server as ADDRESS:PORT (server.address, server.port), or `other`.
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabel {
    layer: String,
}

type HopHistograms = Family<HopLabels, Histogram, fn() -> Histogram>;

fn hop_histogram() -> Histogram {
    // 50 µs to about 3.3 s, doubling: a lab's hops and a slow server's answer.
    Histogram::new(exponential_buckets(50e-6, 2.0, 17))
}

/// Observes exported hop spans into the histograms. Owned by the agent's pipeline.
pub struct HopRecorder {
    histograms: HopHistograms,
    servers: HashSet<(String, String, String)>,
}

impl HopRecorder {
    /// Records a span the pipeline exports and the firewall spans its arrival completed.
    pub fn record(&mut self, span: &HopSpan, joined: &[HopSpan]) {
        self.observe(span, None);
        let server = server_of(span);
        for firewall in joined {
            self.observe(firewall, server.as_deref());
        }
    }

    /// `server` labels the firewall's spans, which carry no address of their own: the server
    /// of the request span whose arrival completed the join.
    fn observe(&mut self, span: &HopSpan, server: Option<&str>) {
        let Some(Value::Str(hop)) = span.attr("hoptrace.hop") else {
            return;
        };
        let direction = match (span.name.as_ref(), span.attr("hoptrace.direction")) {
            (_, Some(Value::Str(direction))) => direction.as_ref(),
            ("firewall", None) => "round_trip",
            // Request spans of the agent and the persona (not connection or layer spans).
            (_, None) if span.attr("http.request.method").is_some() => "round_trip",
            _ => return,
        };
        let server = server.map(str::to_string).or_else(|| server_of(span));
        let key = (
            hop.to_string(),
            direction.to_string(),
            server.unwrap_or_else(|| OVERFLOW_SERVER.to_string()),
        );
        let key = if self.servers.contains(&key) || self.servers.len() < MAX_SERVER_SERIES {
            self.servers.insert(key.clone());
            key
        } else {
            (key.0, key.1, OVERFLOW_SERVER.to_string())
        };
        let seconds = span.end_ns.saturating_sub(span.start_ns) as f64 / 1e9;
        self.histograms
            .get_or_create(&HopLabels {
                hop: key.0,
                direction: key.1,
                server: key.2,
            })
            .observe(seconds);
    }
}

/// ADDRESS:PORT of a span's server.address and server.port.
fn server_of(span: &HopSpan) -> Option<String> {
    match (span.attr("server.address"), span.attr("server.port")) {
        (Some(Value::Str(address)), Some(Value::Int(port))) => Some(format!("{address}:{port}")),
        _ => None,
    }
}

/// A Prometheus counter that mirrors a total kept elsewhere.
#[derive(Default)]
struct Mirror {
    counter: Counter,
    last: u64,
}

impl Mirror {
    fn set(&mut self, total: u64) {
        self.counter.inc_by(total.saturating_sub(self.last));
        self.last = self.last.max(total);
    }
}

/// A labeled family of mirrored counters.
#[derive(Default)]
struct MirrorFamily {
    family: Family<ReasonLabel, Counter>,
    last: BTreeMap<String, u64>,
}

impl MirrorFamily {
    fn set(&mut self, reason: &str, total: u64) {
        let last = self.last.entry(reason.to_string()).or_default();
        self.family
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc_by(total.saturating_sub(*last));
        *last = (*last).max(total);
    }
}

/// The totals the agent keeps, read on each publish.
pub struct Observed<'a> {
    pub records: u64,
    pub undecodable: u64,
    /// None when the kernel counters could not be read this time.
    pub ring_lost: Option<u64>,
    pub requests: &'a requests::Stats,
    pub joins: &'a correlate::Stats,
    pub export: &'a ExportStats,
    /// The pod-name lookup, when `kubernetes.api` is on.
    pub kubernetes: Option<&'a kubernetes::Stats>,
}

pub struct Metrics {
    registry: Arc<Registry>,
    hops: HopHistograms,
    records: Mirror,
    undecodable: Mirror,
    ring_lost: Mirror,
    skipped: MirrorFamily,
    joins: MirrorFamily,
    spans_queued: Mirror,
    spans_exported: Mirror,
    spans_dropped: Mirror,
    export_failed: Mirror,
    export_pending: Gauge,
    kubernetes_errors: MirrorFamily,
    kubernetes_named: Mirror,
    kubernetes_unknown: Mirror,
    kubernetes_pods: Gauge,
}

impl Metrics {
    /// `layers`: each probe layer and whether it attached.
    pub fn new(layers: &[(&str, bool)]) -> Self {
        let mut registry = Registry::with_prefix("hoptrace");
        let hops = HopHistograms::new_with_constructor(hop_histogram);
        registry.register(
            "hop_duration_seconds",
            "Duration of each hop's spans: agent and persona requests, the firewall's total \
             (round_trip) and its forward and return directions",
            hops.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let mirror = Mirror::default();
            registry.register(name, help, mirror.counter.clone());
            mirror
        };
        let records = counter(
            "ring_buffer_records",
            "Records read from the kernel ring buffer",
        );
        let undecodable = counter(
            "ring_buffer_undecodable_records",
            "Ring-buffer records that did not decode (skipped)",
        );
        let ring_lost = counter(
            "ring_buffer_lost_records",
            "Records the kernel dropped because the ring buffer was full",
        );
        let spans_queued = counter("spans_queued", "Spans handed to the export queue");
        let spans_exported = counter("spans_exported", "Spans the exporter delivered");
        let spans_dropped = counter(
            "spans_dropped_queue_full",
            "Spans dropped because the export queue was full",
        );
        let export_failed = counter(
            "export_failed_spans",
            "Spans lost because an export failed or timed out",
        );
        let kubernetes_named = counter(
            "kubernetes_spans_named",
            "Spans given their pod's name and namespace from the Kubernetes API server",
        );
        let kubernetes_unknown = counter(
            "kubernetes_spans_pod_unknown",
            "Spans of a pod or container the API server had not shown (yet): exported without \
             pod name",
        );
        let kubernetes_errors = MirrorFamily::default();
        registry.register(
            "kubernetes_api_errors",
            "Failed requests to the Kubernetes API server, by reason (unreachable, \
             unauthorized, forbidden, http_status, malformed, credentials)",
            kubernetes_errors.family.clone(),
        );
        let kubernetes_pods = Gauge::default();
        registry.register(
            "kubernetes_pods",
            "Pods of this node known from the Kubernetes API server",
            kubernetes_pods.clone(),
        );
        let skipped = MirrorFamily::default();
        registry.register(
            "requests_skipped",
            "Requests or records the request layer skipped, by reason",
            skipped.family.clone(),
        );
        let joins = MirrorFamily::default();
        registry.register(
            "firewall_joins",
            "Single-host firewall joins by outcome (joined, one_sided, late, inconsistent)",
            joins.family.clone(),
        );
        let export_pending = Gauge::default();
        registry.register(
            "export_queue_spans",
            "Spans queued or being exported, not yet delivered or lost",
            export_pending.clone(),
        );
        let attached = Family::<LayerLabel, Gauge>::default();
        registry.register(
            "layer_attached",
            "1 when the probe layer attached, 0 when it is missing",
            attached.clone(),
        );
        for (layer, on) in layers {
            attached
                .get_or_create(&LayerLabel {
                    layer: layer.to_string(),
                })
                .set(i64::from(*on));
        }
        Self {
            registry: Arc::new(registry),
            hops,
            records,
            undecodable,
            ring_lost,
            skipped,
            joins,
            spans_queued,
            spans_exported,
            spans_dropped,
            export_failed,
            export_pending,
            kubernetes_errors,
            kubernetes_named,
            kubernetes_unknown,
            kubernetes_pods,
        }
    }

    pub fn hop_recorder(&self) -> HopRecorder {
        HopRecorder {
            histograms: self.hops.clone(),
            servers: HashSet::new(),
        }
    }

    /// Mirrors the agent's totals into the counters.
    pub fn publish(&mut self, observed: &Observed<'_>) {
        self.records.set(observed.records);
        self.undecodable.set(observed.undecodable);
        if let Some(lost) = observed.ring_lost {
            self.ring_lost.set(lost);
        }
        let r = observed.requests;
        for (reason, total) in [
            ("not_sampled", r.not_sampled),
            ("untraced_ignored", r.untraced_ignored),
            ("head_truncated", r.heads_truncated),
            ("head_malformed", r.heads_malformed),
            ("non_http", r.non_http_records),
            ("response_unmatched", r.responses_unmatched),
            ("request_unanswered", r.requests_unanswered),
            ("requests_overflow", r.requests_overflow),
            ("sockets_over_capacity", r.sockets_over_capacity),
        ] {
            self.skipped.set(reason, total);
        }
        for (reason, total) in &r.traceparent_invalid {
            self.skipped.set(&format!("traceparent_{reason}"), *total);
        }
        let j = observed.joins;
        self.joins.set("joined", j.joined);
        self.joins.set("one_sided", j.one_sided);
        self.joins.set("late", j.late);
        self.joins.set("inconsistent", j.inconsistent);
        let e = observed.export;
        let queued = e.queued.load(Ordering::Relaxed);
        let exported = e.exported.load(Ordering::Relaxed);
        let failed = e.failed.load(Ordering::Relaxed);
        self.spans_queued.set(queued);
        self.spans_exported.set(exported);
        self.spans_dropped
            .set(e.dropped_queue_full.load(Ordering::Relaxed));
        self.export_failed.set(failed);
        self.export_pending
            .set(i64::try_from(queued.saturating_sub(exported + failed)).unwrap_or(i64::MAX));
        if let Some(k) = observed.kubernetes {
            for (reason, total) in kubernetes::ERROR_REASONS.iter().zip(&k.api_errors) {
                self.kubernetes_errors
                    .set(reason, total.load(Ordering::Relaxed));
            }
            self.kubernetes_named
                .set(k.spans_named.load(Ordering::Relaxed));
            self.kubernetes_unknown
                .set(k.spans_pod_unknown.load(Ordering::Relaxed));
            self.kubernetes_pods
                .set(i64::try_from(k.pods.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        }
    }

    /// Binds `addr` now (a taken port fails the start) and serves /metrics on this runtime.
    pub async fn serve(&self, addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics endpoint: binding {addr}"))?;
        log::info!(
            "serving Prometheus metrics at http://{}/metrics",
            listener.local_addr()?
        );
        let registry = self.registry.clone();
        Ok(tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        log::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let registry = registry.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let registry = registry.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&request, &registry)) }
                    });
                    if let Err(e) = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        log::debug!("metrics endpoint: connection: {e}");
                    }
                });
            }
        }))
    }
}

fn respond<B>(request: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into());
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding metrics: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{Role, SpanIds};

    fn span(hop: &'static str, name: &'static str, extra: Vec<(&'static str, Value)>) -> HopSpan {
        let mut attributes = vec![("hoptrace.hop", hop.into())];
        attributes.extend(extra);
        HopSpan {
            ids: SpanIds::new_root(),
            name: name.into(),
            role: Role::Internal,
            start_ns: 1_000_000,
            end_ns: 3_000_000,
            error: None,
            attributes,
            events: Vec::new(),
        }
    }

    fn request(hop: &'static str, port: i64) -> HopSpan {
        span(
            hop,
            "GET",
            vec![
                ("http.request.method", "GET".into()),
                ("server.address", "10.10.2.2".to_string().into()),
                ("server.port", port.into()),
            ],
        )
    }

    fn encoded(metrics: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        text
    }

    #[test]
    fn request_and_firewall_spans_land_in_their_series_and_others_are_not_counted() {
        let metrics = Metrics::new(&[("requests", true), ("nic", false)]);
        let mut recorder = metrics.hop_recorder();
        recorder.observe(&request("agent", 80), None);
        recorder.observe(&request("agent", 80), None);
        recorder.observe(&request("persona", 80), None);
        let forward = span(
            "firewall",
            "firewall.forward",
            vec![("hoptrace.direction", "forward".into())],
        );
        recorder.observe(&forward, Some("10.10.2.2:80"));
        // A connection span and a persona layer span: not request latencies.
        recorder.observe(&span("agent", "tcp.connect", vec![]), None);
        recorder.observe(&span("persona", "persona.kernel_receive", vec![]), None);
        let text = encoded(&metrics);
        assert!(text.contains(
            "hoptrace_hop_duration_seconds_count{hop=\"agent\",direction=\"round_trip\",server=\"10.10.2.2:80\"} 2"
        ), "{text}");
        assert!(text.contains(
            "hoptrace_hop_duration_seconds_count{hop=\"firewall\",direction=\"forward\",server=\"10.10.2.2:80\"} 1"
        ), "{text}");
        assert_eq!(
            text.matches("hoptrace_hop_duration_seconds_count").count(),
            3,
            "{text}"
        );
        assert!(
            text.contains("hoptrace_layer_attached{layer=\"nic\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn servers_beyond_the_limit_share_the_overflow_series() {
        let metrics = Metrics::new(&[]);
        let mut recorder = metrics.hop_recorder();
        for port in 0..(MAX_SERVER_SERIES as i64 + 10) {
            recorder.observe(&request("agent", 1000 + port), None);
        }
        // A server seen before the limit keeps its own series.
        recorder.observe(&request("agent", 1000), None);
        let text = encoded(&metrics);
        assert_eq!(
            text.matches("hoptrace_hop_duration_seconds_count").count(),
            MAX_SERVER_SERIES + 1
        );
        assert!(text.contains("server=\"other\"} 10"), "{text}");
        assert!(text.contains("server=\"10.10.2.2:1000\"} 2"), "{text}");
    }

    #[test]
    fn counters_mirror_totals_without_going_backwards() {
        let mut metrics = Metrics::new(&[]);
        let stats = requests::Stats {
            heads_malformed: 3,
            ..Default::default()
        };
        let joins = correlate::Stats::default();
        let export = ExportStats::default();
        export.queued.store(10, Ordering::Relaxed);
        export.exported.store(4, Ordering::Relaxed);
        for records in [5, 9, 9] {
            metrics.publish(&Observed {
                records,
                undecodable: 0,
                ring_lost: Some(2),
                requests: &stats,
                joins: &joins,
                export: &export,
                kubernetes: None,
            });
        }
        let text = encoded(&metrics);
        assert!(
            text.contains("hoptrace_ring_buffer_records_total 9\n"),
            "{text}"
        );
        assert!(
            text.contains("hoptrace_ring_buffer_lost_records_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("hoptrace_requests_skipped_total{reason=\"head_malformed\"} 3"),
            "{text}"
        );
        assert!(text.contains("hoptrace_export_queue_spans 6\n"), "{text}");
    }
}
