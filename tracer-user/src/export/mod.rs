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
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
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

/// What the queue carries. A message of hoptrace's spans holds all that one read of the ring
/// buffer made: the export task wakes once for them, not once per span (those wake-ups, each
/// a thread switch, were a large part of the agent's CPU).
enum Message {
    /// hoptrace's spans, whose kernel times the clock turns into Unix time.
    Hop(Vec<HopSpan>, Clock),
    /// Spans received over OTLP, passed on as they came under their sender's resource.
    Forwarded(ResourceSpans),
}

impl Message {
    /// Queue slots taken: one per hoptrace span, one per forwarded `ResourceSpans` (as when
    /// each went through the queue on its own).
    fn slots(&self) -> usize {
        match self {
            Self::Hop(spans, _) => spans.len(),
            Self::Forwarded(_) => 1,
        }
    }

    fn spans(&self) -> u64 {
        match self {
            Self::Hop(spans, _) => spans.len() as u64,
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
    sender: Option<mpsc::UnboundedSender<Message>>,
    /// Bounds the queue: slots taken by messages not yet received by the export task.
    queue: Arc<QueueSlots>,
    stats: Arc<ExportStats>,
}

/// The queue's bound, counted in slots ([`Message::slots`]): the channel itself is unbounded,
/// as its messages vary in size.
struct QueueSlots {
    taken: AtomicUsize,
    capacity: usize,
}

impl QueueSlots {
    /// Takes up to `wanted` slots; returns how many were free.
    fn take(&self, wanted: usize) -> usize {
        let free = |taken: usize| wanted.min(self.capacity.saturating_sub(taken));
        let before = self
            .taken
            .update(Ordering::Relaxed, Ordering::Relaxed, |taken| {
                taken + free(taken)
            });
        free(before)
    }

    fn release(&self, slots: usize) {
        self.taken.fetch_sub(slots, Ordering::Relaxed);
    }
}

impl SpanSink {
    /// Queues `spans`, whose kernel times `clock` turns into Unix time, as one message. When
    /// the queue has no room for all, the first ones go and the rest are dropped (counted).
    pub fn send_all(&self, spans: impl IntoIterator<Item = HopSpan>, clock: &Clock) {
        let Some(sender) = &self.sender else { return };
        let mut spans: Vec<HopSpan> = spans.into_iter().collect();
        if spans.is_empty() {
            return;
        }
        let granted = self.queue.take(spans.len());
        self.count_dropped((spans.len() - granted) as u64);
        spans.truncate(granted);
        // A queued span holds only what it uses: spans are built with room for every attribute
        // they might get (growing was a copy per span), and a queue of tens of thousands of
        // them at full load would otherwise hold that room too (peak RSS 70-86 MiB instead of
        // under 64). Shrinking in place is a free-list split for the allocator, not a copy.
        for span in &mut spans {
            span.attributes.shrink_to_fit();
            span.events.shrink_to_fit();
        }
        if granted > 0 {
            self.enqueue(sender, Message::Hop(spans, *clock));
        }
    }

    /// Queues spans received over OTLP, to be exported unchanged under their own resource.
    pub fn forward(&self, resource_spans: ResourceSpans) {
        let Some(sender) = &self.sender else { return };
        let message = Message::Forwarded(resource_spans);
        if self.queue.take(message.slots()) == 0 {
            self.count_dropped(message.spans());
            return;
        }
        self.enqueue(sender, message);
    }

    /// Sends a message whose slots are taken.
    fn enqueue(&self, sender: &mpsc::UnboundedSender<Message>, message: Message) {
        let (slots, spans) = (message.slots(), message.spans());
        match sender.send(message) {
            Ok(()) => {
                self.stats.queued.fetch_add(spans, Ordering::Relaxed);
            }
            Err(_) => {
                self.queue.release(slots);
                self.count_dropped(spans);
            }
        }
    }

    fn count_dropped(&self, spans: u64) {
        if spans == 0 {
            return;
        }
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
    let queue = Arc::new(QueueSlots {
        taken: AtomicUsize::new(0),
        capacity: config.max_queue_size,
    });
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
                    queue,
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
    let (sender, receiver) = mpsc::unbounded_channel();
    let task = tokio::spawn(batch_loop(
        receiver,
        queue.clone(),
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
            queue,
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
    mut receiver: mpsc::UnboundedReceiver<Message>,
    queue: Arc<QueueSlots>,
    mut batch: otlp::BatchEncoder,
    exporter: Exporter,
    config: ExportConfig,
    stats: Arc<ExportStats>,
) {
    let mut tick = tokio::time::interval(config.schedule_delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Outlet {
        exporter,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        sending: JoinSet::new(),
        failures: Arc::new(Failures::default()),
        stats,
    };
    loop {
        tokio::select! {
            message = receiver.recv() => match message {
                Some(message) => {
                    queue.release(message.slots());
                    match message {
                        Message::Hop(spans, clock) => {
                            for span in &spans {
                                batch.push(span, &clock);
                                if batch.len() >= config.max_export_batch_size {
                                    out.send(&mut batch).await;
                                }
                            }
                        }
                        Message::Forwarded(resource_spans) => {
                            batch.push_forwarded(&resource_spans);
                            if batch.len() >= config.max_export_batch_size {
                                out.send(&mut batch).await;
                            }
                        }
                    }
                }
                None => {
                    // Shutdown: the sends in flight finish (the caller bounds the wait).
                    out.send(&mut batch).await;
                    while out.sending.join_next().await.is_some() {}
                    return;
                }
            },
            _ = tick.tick() => out.send(&mut batch).await,
        }
    }
}

/// Where full batches leave: the exporter, with up to [`MAX_IN_FLIGHT`] sends at once.
struct Outlet {
    exporter: Exporter,
    in_flight: Arc<Semaphore>,
    sending: JoinSet<()>,
    failures: Arc<Failures>,
    stats: Arc<ExportStats>,
}

impl Outlet {
    /// Sends the batch so far, if it has spans; the encoder is empty afterwards.
    async fn send(&mut self, batch: &mut otlp::BatchEncoder) {
        // Reap finished sends so the set stays small.
        while self.sending.try_join_next().is_some() {}
        let count = batch.len() as u64;
        if count == 0 {
            return;
        }
        let request = batch.take_request();
        match &mut self.exporter {
            Exporter::Terminal(printer) => {
                printer.print(&request);
                self.stats.exported.fetch_add(count, Ordering::Relaxed);
            }
            Exporter::Otlp(client) => {
                let request = bytes::Bytes::from(request);
                // Waits when MAX_IN_FLIGHT batches are out: the queue then fills and drops
                // (counted) instead of memory growing without bound.
                let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                    return;
                };
                let (mut client, stats, failures) =
                    (client.clone(), self.stats.clone(), self.failures.clone());
                self.sending.spawn(async move {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{Role, SpanIds};

    fn span() -> HopSpan {
        HopSpan {
            ids: SpanIds::new_root(),
            name: "GET".into(),
            role: Role::Client,
            start_ns: 1,
            end_ns: 2,
            error: None,
            attributes: Vec::new(),
            events: Vec::new(),
        }
    }

    #[test]
    fn a_full_queue_takes_the_first_spans_and_counts_the_rest_dropped() {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let sink = SpanSink {
            sender: Some(sender),
            queue: Arc::new(QueueSlots {
                taken: AtomicUsize::new(0),
                capacity: 3,
            }),
            stats: Arc::default(),
        };
        let clock = Clock::unix();
        sink.send_all(vec![span(), span()], &clock);
        sink.send_all(vec![span(), span()], &clock);
        let lengths = |message: Message| match message {
            Message::Hop(spans, _) => spans.len(),
            Message::Forwarded(_) => 0,
        };
        let first = receiver.try_recv().unwrap();
        assert_eq!(lengths(receiver.try_recv().unwrap()), 1);
        assert!(receiver.try_recv().is_err());
        let stats = sink.stats();
        assert_eq!(stats.queued.load(Ordering::Relaxed), 3);
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 1);
        // Received messages free their slots.
        sink.queue.release(first.slots());
        assert_eq!(lengths(first), 2);
        sink.send_all(vec![span(), span(), span()], &clock);
        assert_eq!(lengths(receiver.try_recv().unwrap()), 2);
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 2);
        // A forwarded ResourceSpans takes one slot, whatever it holds; none are free now.
        sink.forward(ResourceSpans::default());
        assert!(receiver.try_recv().is_err());
    }
}
