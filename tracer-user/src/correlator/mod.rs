//! `hoptrace correlate`: the multi-host join. Agents on the client and server hosts (or a
//! collector routing by trace id in front of several correlators) send their spans here over
//! OTLP; every span is passed on unchanged, under its sender's resource, to the exporter the
//! OTEL_* variables configure (the terminal by default), in the same export requests as the
//! correlator's own firewall spans (under its own resource), and when both sides of a request have
//! arrived within the window the firewall spans are added (correlate.rs, the join the agent's
//! single-host mode uses too). Sides that wait longer are evicted and counted; nothing is held
//! back from export while it waits.

mod received;
mod receiver;

use std::{
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
    let (sink, pipeline) = export::start(&config, config.resource())?;
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
                Some(request) => process(request, &sink, &mut correlator, &mut counts),
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
        process(request, &sink, &mut correlator, &mut counts);
    }
    let waiting = correlator.pending();
    let summary = summary(&counts, &correlator, &receiver_stats);
    let stats = sink.stats();
    drop(sink);
    pipeline.shutdown(options.shutdown_timeout).await;
    let exported = stats.exported.load(Ordering::Relaxed);
    let lost =
        stats.dropped_queue_full.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
    log::info!(
        "hoptrace correlate stopped: {summary}; {waiting} sides still waiting (their spans were \
         exported, unjoined); spans exported {exported}, lost {lost}"
    );
    Ok(())
}

fn summary(counts: &Counts, correlator: &Correlator, receiver: &receiver::ReceiverStats) -> String {
    format!(
        "OTLP requests {} (busy {}, malformed {}), spans {} (invalid ids {}); {}",
        receiver.requests.load(Ordering::Relaxed),
        receiver.busy.load(Ordering::Relaxed),
        receiver.malformed.load(Ordering::Relaxed),
        counts.spans,
        counts.invalid,
        correlator.stats.summary()
    )
}

/// Feeds the request spans to the join and passes every span on, each resource's as it came
/// (less the spans without valid ids), followed by the firewall spans the join made.
fn process(
    request: ExportTraceServiceRequest,
    sink: &SpanSink,
    correlator: &mut Correlator,
    counts: &mut Counts,
) {
    let now = unix_now_ns();
    let mut joined: Vec<HopSpan> = Vec::new();
    for mut resource_spans in request.resource_spans {
        let clock = received::clock_info(resource_spans.resource.as_ref());
        let mut valid = 0;
        for scope_spans in &mut resource_spans.scope_spans {
            scope_spans.spans.retain(|span| {
                counts.spans += 1;
                let Some(received) = received::Received::new(span) else {
                    counts.invalid += 1;
                    return false;
                };
                correlator.observe(&received, &clock, now, &mut joined);
                true
            });
            valid += scope_spans.spans.len();
        }
        if valid > 0 {
            sink.forward(resource_spans);
        }
    }
    sink.send_all(joined, &Clock::unix());
}
