//! `hoptrace correlate`: the multi-host join. Agents on the client and server hosts (or a
//! collector routing by trace id in front of several correlators) send their spans here over
//! OTLP; every span is passed on unchanged, under its sender's resource, to the exporter the
//! OTEL_* variables configure (the terminal by default), and when both sides of a request have
//! arrived within the window the firewall spans are added (correlate.rs, the join the agent's
//! single-host mode uses too). Sides that wait longer are evicted and counted; nothing is held
//! back from export while it waits.

mod convert;
mod receiver;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    clock::Clock,
    correlate::{self, Correlator},
    export::{self, ExportConfig, ExportFlags, SpanSink},
    span::HopSpan,
};

/// Each distinct sender resource gets its own export pipeline (the exporter stamps one resource
/// on a batch); more than this many and the rest share the correlator's, counted.
const MAX_RESOURCES: usize = 256;

pub struct CorrelateOptions {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub export: ExportFlags,
    pub join: correlate::Config,
    /// Received requests queued for the join before senders are told to retry.
    pub queue: usize,
    pub shutdown_timeout: Duration,
    pub report_interval: Duration,
}

#[derive(Default)]
struct Counts {
    spans: u64,
    /// Spans without valid ids: neither exportable nor joinable.
    invalid: u64,
    resources_over_limit: u64,
}

/// Where spans go: one pipeline per sender resource, and the correlator's own.
struct Outputs {
    config: ExportConfig,
    by_resource: HashMap<String, (SpanSink, export::Pipeline)>,
    own: (SpanSink, export::Pipeline),
}

impl Outputs {
    fn for_resource(
        &mut self,
        resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>,
        counts: &mut Counts,
    ) -> anyhow::Result<&SpanSink> {
        let key = format!("{:?}", resource.map(|r| &r.attributes));
        if !self.by_resource.contains_key(&key) {
            if self.by_resource.len() >= MAX_RESOURCES {
                counts.resources_over_limit += 1;
                return Ok(&self.own.0);
            }
            let pipeline = export::start(&self.config, convert::resource(resource))?;
            self.by_resource.insert(key.clone(), pipeline);
        }
        Ok(&self.by_resource[&key].0)
    }
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub async fn run(options: CorrelateOptions) -> anyhow::Result<()> {
    let config = ExportConfig::from_env(&options.export).map_err(anyhow::Error::msg)?;
    let (sender, mut queue) = mpsc::channel(options.queue.max(1));
    let ingest = receiver::Ingest::new(sender);
    let receiver_stats = ingest.stats.clone();
    let mut servers = Vec::new();
    for address in [options.grpc_listen, options.http_listen] {
        let listener = receiver::bind(address).await?;
        servers.push(tokio::spawn(receiver::serve(listener, ingest.clone())));
    }
    drop(ingest);
    let own = export::start(&config, config.resource())?;
    let mut outputs = Outputs {
        config,
        by_resource: HashMap::new(),
        own,
    };
    let mut correlator = Correlator::new(options.join);
    let mut counts = Counts::default();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut evict = tokio::time::interval(Duration::from_secs(1));
    let mut report = tokio::time::interval(options.report_interval);
    report.tick().await;
    log::info!(
        "hoptrace correlate ready: OTLP on {} and {} (gRPC and HTTP on both)",
        options.grpc_listen,
        options.http_listen
    );
    loop {
        tokio::select! {
            request = queue.recv() => match request {
                Some(request) => process(request, &mut outputs, &mut correlator, &mut counts)?,
                None => break,
            },
            _ = evict.tick() => correlator.evict(unix_now_ns()),
            _ = report.tick() => log::info!("{}", summary(&counts, &correlator, &receiver_stats)),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    log::info!("stopping: no new requests; exporting what was received");
    for server in &servers {
        server.abort();
    }
    while let Ok(request) = queue.try_recv() {
        process(request, &mut outputs, &mut correlator, &mut counts)?;
    }
    let waiting = correlator.pending();
    let summary = summary(&counts, &correlator, &receiver_stats);
    let mut flushes = Vec::new();
    for (sink, pipeline) in outputs.by_resource.into_values().chain([outputs.own]) {
        let stats = sink.stats();
        drop(sink);
        flushes.push(async move {
            pipeline.shutdown(options.shutdown_timeout).await;
            stats
        });
    }
    let mut exported = 0;
    let mut lost = 0;
    for stats in futures_join(flushes).await {
        exported += stats.exported.load(Ordering::Relaxed);
        lost +=
            stats.dropped_queue_full.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
    }
    log::info!(
        "hoptrace correlate stopped: {summary}; {waiting} sides still waiting (their spans were \
         exported, unjoined); spans exported {exported}, lost {lost}"
    );
    Ok(())
}

/// Runs the flushes concurrently: each may take up to the shutdown timeout.
async fn futures_join<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        if let Ok(value) = handle.await {
            out.push(value);
        }
    }
    out
}

fn summary(counts: &Counts, correlator: &Correlator, receiver: &receiver::ReceiverStats) -> String {
    format!(
        "OTLP requests {} (busy {}, malformed {}), spans {} (invalid ids {}, senders over the \
         resource limit {}); {}",
        receiver.requests.load(Ordering::Relaxed),
        receiver.busy.load(Ordering::Relaxed),
        receiver.malformed.load(Ordering::Relaxed),
        counts.spans,
        counts.invalid,
        counts.resources_over_limit,
        correlator.stats.summary()
    )
}

/// Passes every span on and feeds the request spans to the join.
fn process(
    request: ExportTraceServiceRequest,
    outputs: &mut Outputs,
    correlator: &mut Correlator,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let now = unix_now_ns();
    let mut joined: Vec<HopSpan> = Vec::new();
    for resource_spans in &request.resource_spans {
        let resource = resource_spans.resource.as_ref();
        let clock = convert::clock_info(resource);
        let sink = outputs.for_resource(resource, counts)?;
        for scope_spans in &resource_spans.scope_spans {
            let scope = convert::scope(scope_spans.scope.as_ref());
            for span in &scope_spans.spans {
                counts.spans += 1;
                let Some(received) = convert::Received::new(span) else {
                    counts.invalid += 1;
                    continue;
                };
                sink.send_data(received.to_span_data(&scope));
                correlator.observe(&received, &clock, now, &mut joined);
            }
        }
    }
    for span in &joined {
        outputs.own.0.send(span, &Clock::unix());
    }
    Ok(())
}
