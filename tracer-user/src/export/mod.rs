//! Export: spans go through a bounded queue to a batch task that encodes them as OTLP protobuf
//! and sends them to the configured receiver (gRPC or HTTP), several batches in flight, or
//! prints them on the terminal when no endpoint is configured. A full queue or a failing
//! collector never blocks the agent: spans are dropped and counted.
//!
//! The queue carries hoptrace's own spans (exported under the resource given to `start`) and,
//! in the correlator, spans received over OTLP, which go on unchanged under their sender's
//! resource in the same requests.

mod client;
mod config;
mod otlp;
mod terminal;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

pub use config::{ExportConfig, ExportFlags, Protocol, Target};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use opentelemetry_sdk::Resource;
pub use otlp::attribute_text;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};

use crate::{clock::Clock, span::HopSpan};

/// Batches being sent at once: one slow round trip does not stall the encoding of the next.
const MAX_IN_FLIGHT: usize = 4;

/// What the pipeline has done, for the agent's periodic report and exit summary.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub queued: AtomicU64,
    pub exported: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub failed: AtomicU64,
}

impl ExportStats {
    pub fn summary(&self) -> String {
        format!(
            "spans queued {}, exported {}, dropped (queue full) {}, failed (exporter) {}",
            self.queued.load(Ordering::Relaxed),
            self.exported.load(Ordering::Relaxed),
            self.dropped_queue_full.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// What the queue carries.
enum Item {
    /// One of hoptrace's spans, whose kernel times the clock turns into Unix time.
    Hop(HopSpan, Clock),
    /// Spans received over OTLP, passed on as they came under their sender's resource.
    Forwarded(ResourceSpans),
}

impl Item {
    fn spans(&self) -> u64 {
        match self {
            Self::Hop(..) => 1,
            Self::Forwarded(resource_spans) => span_count(resource_spans),
        }
    }
}

fn span_count(resource_spans: &ResourceSpans) -> u64 {
    resource_spans
        .scope_spans
        .iter()
        .map(|scope| scope.spans.len() as u64)
        .sum()
}

/// The agent's handle: enqueues spans without ever waiting.
#[derive(Clone)]
pub struct SpanSink {
    sender: Option<mpsc::Sender<Item>>,
    stats: Arc<ExportStats>,
}

impl SpanSink {
    /// Queues `span`, whose kernel times `clock` turns into Unix time.
    pub fn send(&self, span: HopSpan, clock: &Clock) {
        self.enqueue(Item::Hop(span, *clock));
    }

    /// Queues spans received over OTLP, to be exported unchanged under their own resource.
    pub fn forward(&self, resource_spans: ResourceSpans) {
        self.enqueue(Item::Forwarded(resource_spans));
    }

    fn enqueue(&self, item: Item) {
        let Some(sender) = &self.sender else { return };
        let spans = item.spans();
        match sender.try_send(item) {
            Ok(()) => {
                self.stats.queued.fetch_add(spans, Ordering::Relaxed);
            }
            Err(_) => {
                if self
                    .stats
                    .dropped_queue_full
                    .fetch_add(spans, Ordering::Relaxed)
                    == 0
                {
                    log::warn!(
                        "export queue full: dropping spans (counted; raise OTEL_BSP_MAX_QUEUE_SIZE \
                         or check the collector)"
                    );
                }
            }
        }
    }

    /// The pipeline's counters; they keep counting after the sink is dropped, until the
    /// pipeline has shut down.
    pub fn stats(&self) -> Arc<ExportStats> {
        self.stats.clone()
    }
}

/// Where encoded batches go.
enum Exporter {
    Terminal(terminal::TerminalExporter),
    /// Boxed: much larger than the terminal printer, and there is one per agent.
    Otlp(Box<client::OtlpClient>),
}

pub struct Pipeline {
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<ExportStats>,
}

/// Starts the export pipeline on the current tokio runtime; hoptrace's own spans carry
/// `resource` (normally `config.resource()`, plus what the caller knows about itself).
pub fn start(config: &ExportConfig, resource: Resource) -> anyhow::Result<(SpanSink, Pipeline)> {
    let stats = Arc::new(ExportStats::default());
    let exporter = match &config.target {
        Target::Disabled(why) => {
            log::warn!("span export disabled: {why}");
            let pipeline = Pipeline {
                task: None,
                stats: Arc::clone(&stats),
            };
            return Ok((
                SpanSink {
                    sender: None,
                    stats,
                },
                pipeline,
            ));
        }
        Target::Terminal => {
            log::info!("no OTLP endpoint configured: printing spans to the terminal");
            Exporter::Terminal(terminal::TerminalExporter::default())
        }
        Target::Otlp { endpoint, protocol } => {
            log::info!(
                "exporting spans over OTLP {} to {endpoint}",
                protocol.as_str()
            );
            let client = client::OtlpClient::new(
                endpoint,
                *protocol,
                config.headers.as_deref(),
                config.export_timeout,
            )?;
            Exporter::Otlp(Box::new(client))
        }
    };
    let (sender, receiver) = mpsc::channel(config.max_queue_size);
    let task = tokio::spawn(batch_loop(
        receiver,
        otlp::BatchEncoder::new(&resource),
        exporter,
        config.clone(),
        stats.clone(),
    ));
    let pipeline = Pipeline {
        task: Some(task),
        stats: stats.clone(),
    };
    Ok((
        SpanSink {
            sender: Some(sender),
            stats,
        },
        pipeline,
    ))
}

impl Pipeline {
    /// Flushes what is queued (the senders must be dropped first) within `timeout`.
    /// Spans still queued or retrying then are lost, and counted as failed.
    pub async fn shutdown(self, timeout: Duration) {
        let Some(task) = self.task else { return };
        if tokio::time::timeout(timeout, task).await.is_err() {
            let stats = &self.stats;
            let done =
                stats.exported.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
            let pending = stats.queued.load(Ordering::Relaxed).saturating_sub(done);
            stats.failed.fetch_add(pending, Ordering::Relaxed);
            log::warn!(
                "export did not finish within the shutdown bound ({timeout:?} left for it): \
                 {pending} pending spans lost (counted as failed)"
            );
        }
    }
}

async fn batch_loop(
    mut receiver: mpsc::Receiver<Item>,
    mut batch: otlp::BatchEncoder,
    mut exporter: Exporter,
    config: ExportConfig,
    stats: Arc<ExportStats>,
) {
    let mut tick = tokio::time::interval(config.schedule_delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut sending = JoinSet::new();
    let failures = Arc::new(Failures::default());
    loop {
        let closed = tokio::select! {
            item = receiver.recv() => match item {
                Some(item) => {
                    match item {
                        Item::Hop(span, clock) => batch.push(&span, &clock),
                        Item::Forwarded(resource_spans) => batch.push_forwarded(&resource_spans),
                    }
                    if batch.len() < config.max_export_batch_size {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        // Reap finished sends so the set stays small.
        while sending.try_join_next().is_some() {}
        let count = batch.len() as u64;
        if count > 0 {
            let request = batch.take_request();
            match &mut exporter {
                Exporter::Terminal(printer) => {
                    printer.print(&request);
                    stats.exported.fetch_add(count, Ordering::Relaxed);
                }
                Exporter::Otlp(client) => {
                    let request = bytes::Bytes::from(request);
                    // Waits when MAX_IN_FLIGHT batches are out: the queue then fills and drops
                    // (counted) instead of memory growing without bound.
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    let (mut client, stats, failures) =
                        (client.clone(), stats.clone(), failures.clone());
                    sending.spawn(async move {
                        // Once per outage, not per attempt of every batch in flight.
                        let on_retry = |why: &str| {
                            if !failures.retrying.swap(true, Ordering::Relaxed) {
                                log::warn!("export failed, retrying for up to 30 s: {why}");
                            }
                        };
                        let outcome = client.export(request, on_retry).await;
                        drop(permit);
                        record_outcome(outcome, count, &stats, &failures);
                    });
                }
            }
        }
        if closed {
            // Shutdown: the sends in flight finish (the caller bounds the wait).
            while sending.join_next().await.is_some() {}
            return;
        }
    }
}

/// What the log has said about failing exports, shared by the batches in flight.
#[derive(Default)]
struct Failures {
    /// Batches lost since the last success.
    batches: AtomicU64,
    /// A retry was reported since the last success.
    retrying: AtomicBool,
}

/// Counts a batch's outcome; logs the first loss, every 100th after it, and recovery.
fn record_outcome(
    outcome: Result<(), String>,
    count: u64,
    stats: &ExportStats,
    failures: &Failures,
) {
    match outcome {
        Ok(()) => {
            stats.exported.fetch_add(count, Ordering::Relaxed);
            let lost = failures.batches.swap(0, Ordering::Relaxed) > 0;
            if failures.retrying.swap(false, Ordering::Relaxed) || lost {
                log::info!("exporter recovered");
            }
        }
        Err(why) => {
            let failed = stats.failed.fetch_add(count, Ordering::Relaxed) + count;
            if failures
                .batches
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(100)
            {
                log::warn!("export failed ({failed} spans lost so far): {why}");
            }
        }
    }
}
