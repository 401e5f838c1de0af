//! Export: the only module that knows OpenTelemetry. Spans go through a bounded queue to a batch
//! task that hands them to the configured exporter: OTLP (gRPC or HTTP) when an endpoint is
//! configured, otherwise the terminal printer. A full queue or a failing collector never blocks
//! the agent: spans are dropped and counted.

mod config;
mod otel;
mod terminal;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

pub use config::{ExportConfig, ExportFlags, Protocol, Target};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanExporter as _},
};
pub use otel::key_value;
use tokio::sync::mpsc;

use crate::{clock::Clock, span::HopSpan};

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

/// The agent's handle: converts and enqueues spans without ever waiting.
#[derive(Clone)]
pub struct SpanSink {
    sender: Option<mpsc::Sender<SpanData>>,
    stats: Arc<ExportStats>,
}

impl SpanSink {
    pub fn send(&self, span: &HopSpan, clock: &Clock) {
        if self.sender.is_some() {
            self.send_data(otel::to_span_data(span, clock));
        }
    }

    /// Enqueues a span that already is OpenTelemetry's (the correlator's received spans).
    pub fn send_data(&self, span: SpanData) {
        let Some(sender) = &self.sender else { return };
        match sender.try_send(span) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                if self
                    .stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed)
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

enum Exporter {
    Terminal(terminal::TerminalExporter),
    /// Boxed: much larger than the terminal printer, and there is one exporter per agent.
    Otlp(Box<opentelemetry_otlp::SpanExporter>),
}

impl Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> Result<(), String> {
        match self {
            Self::Terminal(t) => {
                t.print(&batch);
                Ok(())
            }
            Self::Otlp(e) => e.export(batch).await.map_err(|e| e.to_string()),
        }
    }
}

pub struct Pipeline {
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Starts the export pipeline on the current tokio runtime; its spans carry `resource`
/// (normally `config.resource()`, plus what the caller knows about itself).
pub fn start(config: &ExportConfig, resource: Resource) -> anyhow::Result<(SpanSink, Pipeline)> {
    let stats = Arc::new(ExportStats::default());
    let exporter = match &config.target {
        Target::Disabled(why) => {
            log::warn!("span export disabled: {why}");
            return Ok((
                SpanSink {
                    sender: None,
                    stats,
                },
                Pipeline { task: None },
            ));
        }
        Target::Terminal => {
            log::info!("no OTLP endpoint configured: printing spans to the terminal");
            Exporter::Terminal(terminal::TerminalExporter::new(resource))
        }
        Target::Otlp { endpoint, protocol } => {
            log::info!(
                "exporting spans over OTLP {} to {endpoint}",
                protocol.as_str()
            );
            let mut exporter = otel::otlp_exporter(endpoint, *protocol, config.export_timeout)?;
            exporter.set_resource(&resource);
            Exporter::Otlp(Box::new(exporter))
        }
    };
    let (sender, receiver) = mpsc::channel(config.max_queue_size);
    let task = tokio::spawn(batch_loop(
        receiver,
        exporter,
        config.clone(),
        stats.clone(),
    ));
    Ok((
        SpanSink {
            sender: Some(sender),
            stats,
        },
        Pipeline { task: Some(task) },
    ))
}

impl Pipeline {
    /// Flushes what is queued (the senders must be dropped first) within `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        let Some(task) = self.task else { return };
        if tokio::time::timeout(timeout, task).await.is_err() {
            log::warn!("export did not finish within {timeout:?}: pending spans are lost");
        }
    }
}

async fn batch_loop(
    mut receiver: mpsc::Receiver<SpanData>,
    exporter: Exporter,
    config: ExportConfig,
    stats: Arc<ExportStats>,
) {
    let mut batch = Vec::with_capacity(config.max_export_batch_size);
    let mut tick = tokio::time::interval(config.schedule_delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures_reported = 0u64;
    loop {
        let closed = tokio::select! {
            span = receiver.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() < config.max_export_batch_size {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        if !batch.is_empty() {
            let spans =
                std::mem::replace(&mut batch, Vec::with_capacity(config.max_export_batch_size));
            let count = spans.len() as u64;
            match tokio::time::timeout(config.export_timeout, exporter.export(spans)).await {
                Ok(Ok(())) => {
                    stats.exported.fetch_add(count, Ordering::Relaxed);
                    if failures_reported > 0 {
                        log::info!("exporter recovered");
                        failures_reported = 0;
                    }
                }
                outcome => {
                    let failed = stats.failed.fetch_add(count, Ordering::Relaxed) + count;
                    // Log the first failure and then every 100th, not every batch.
                    if failures_reported.is_multiple_of(100) {
                        let why = match outcome {
                            Ok(Err(e)) => e,
                            _ => format!("timed out after {:?}", config.export_timeout),
                        };
                        log::warn!("export failed ({failed} spans lost so far): {why}");
                    }
                    failures_reported += 1;
                }
            }
        }
        if closed {
            return;
        }
    }
}
