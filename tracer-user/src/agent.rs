//! `hoptrace agent`: load and attach, then read the ring buffer until told to stop.
//! load -> decode -> assemble (conn_spans) -> export, each stage its own module.

use std::time::Duration;

use anyhow::Context as _;
use aya::maps::RingBuf;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracer_common::maps::{self, Counter};

use crate::{
    clock::{self, Clock},
    containers::ContainerMetadata,
    correlate::{self, Correlator},
    decode::{Decoder, Event},
    ebpf,
    export::{self, ExportConfig, SpanSink},
    go_tls::GoTls,
    kernel_features,
    kubernetes::{self, Pods},
    metrics::{HopRecorder, Metrics, Observed},
    nic::KernelNicTimes,
    requests::{self, Assembler},
    sampling::{Sampler, Untraced},
    scope::Scope,
    span::HopSpan,
    tls_uprobes::{self, OpenSslProbes},
};

pub struct AgentOptions {
    pub scope_netns: Vec<String>,
    pub scope_pids: Vec<u32>,
    pub scope_ports: Vec<u16>,
    pub export: ExportConfig,
    pub untraced: Untraced,
    pub layer_spans: bool,
    pub ring_buffer_bytes: u32,
    /// How long Ctrl-C / SIGTERM may take to flush pending spans.
    pub shutdown_timeout: Duration,
    /// How often the kernel counters are checked.
    pub report_interval: Duration,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Pod names from the API server.
    pub kubernetes: Option<kubernetes::ApiConfig>,
}

/// How long the reader lets ring-buffer records gather after a wake-up. Well below what a
/// 4 MiB ring holds at 100k records/s (~40 ms), and spans leave in batches anyway.
const RING_GATHER: Duration = Duration::from_millis(1);

/// Spans a drain of the ring buffer hands on at once. Under saturation the ring never empties
/// and one drain goes on for as long: without this bound its spans piled up in memory (peak RSS
/// 190 MiB) and then reached the export queue in one burst, which dropped most of them.
const EMIT_EVERY: usize = 512;

/// The least time the last spans get to leave when detaching took the whole shutdown bound.
const FINAL_FLUSH_MIN: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Counts {
    records: u64,
    decode_errors: u64,
    ringbuf_full_reported: u64,
}

/// The assembler, the single-host firewall join, and where their spans go.
struct Pipeline<'a> {
    decoder: Decoder,
    assembler: Assembler,
    correlator: Correlator,
    sink: &'a SpanSink,
    spans: Vec<HopSpan>,
    joined: Vec<HopSpan>,
    /// container.id and k8s.pod.uid of the spans' processes (and pod names, when looked up).
    containers: ContainerMetadata,
    /// Latency histograms, when metrics are served.
    hops: Option<HopRecorder>,
}

impl Pipeline<'_> {
    /// Annotates and joins the spans made since the last call, then queues them with their
    /// firewall spans, all in one message.
    fn emit(&mut self, clock: &Clock) {
        for span in &mut self.spans {
            self.containers.annotate(span);
            let before = self.joined.len();
            self.correlator.observe(
                &*span,
                &correlate::ClockInfo::this_host(),
                span.end_ns,
                &mut self.joined,
            );
            if let Some(hops) = &mut self.hops {
                hops.record(span, &self.joined[before..]);
            }
        }
        let spans = self.spans.drain(..).chain(self.joined.drain(..));
        self.sink.send_all(spans, clock);
    }
}

pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    ebpf::require_privilege()?;
    let scope = Scope::resolve(
        &options.scope_netns,
        &options.scope_pids,
        &options.scope_ports,
    )?;
    let sampler = Sampler::from_env(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let (mut object, attached) = ebpf::load_agent(&scope, options.ring_buffer_bytes)?;
    let ring = RingBuf::try_from(
        object
            .take_map(maps::EVENTS)
            .context("EVENTS map missing")?,
    )?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // AsyncFd is dropped at the end of this function.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    // The clock state as the agent starts: a correlator compares it across hosts.
    let clock_state = clock::ClockState::read();
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(
            options
                .export
                .resource()
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone()))
                .chain(clock_state.attributes()),
        )
        .build();
    let (sink, exporter) = export::start(&options.export, resource)?;
    let mut assembler = Assembler::new(requests::Config {
        sampler,
        untraced: options.untraced,
        layers: attached.layers(),
        layer_spans: options.layer_spans,
        ..requests::Config::default()
    });
    if attached.nic {
        assembler = assembler.with_nic(Box::new(KernelNicTimes::take(&mut object)?));
    }
    // Go TLS plaintext joins its socket through the syscall layer (and a kernel helper of 5.15):
    // without them, nothing to do.
    let go_tls_join = kernel_features::go_tls_join();
    if let (true, Err(why)) = (attached.requests, go_tls_join) {
        log::warn!("{}", kernel_features::go_tls_unavailable(why));
    }
    let mut go_tls = (attached.requests && go_tls_join.is_ok()).then(|| GoTls::new(&scope));
    if let Some(go_tls) = &mut go_tls {
        go_tls.rescan(&mut object);
    }
    let mut metrics = match options.metrics_addr {
        Some(addr) => {
            let metrics = Metrics::new(&[
                ("connections", true),
                ("requests", attached.requests),
                ("tcp_arrival", attached.tcp_arrival),
                ("nic", attached.nic),
            ]);
            Some((metrics.serve(addr).await?, metrics))
        }
        None => None,
    };
    let export_stats = sink.stats();
    let pods = options.kubernetes.clone().map(Pods::watch);
    let mut pipeline = Pipeline {
        decoder: Decoder::default(),
        containers: ContainerMetadata::new(pods.clone()),
        hops: metrics.as_ref().map(|(_, m)| m.hop_recorder()),
        assembler,
        correlator: Correlator::new(correlate::Config::default()),
        joined: Vec::new(),
        sink: &sink,
        spans: Vec::new(),
    };
    // TLS plaintext: programs loaded now, attached per OpenSSL file as processes show them.
    let mut openssl = if attached.requests {
        OpenSslProbes::load(&mut object, &scope)
            .inspect_err(|e| log::warn!("TLS plaintext (OpenSSL uprobes) unavailable: {e:#}"))
            .ok()
    } else {
        None
    };
    if let Some(probes) = openssl.as_mut() {
        probes.scan(&mut object);
    }
    let mut rescan = tokio::time::interval(tls_uprobes::RESCAN_INTERVAL);
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut report = tokio::time::interval(options.report_interval);
    let mut clock = Clock::sample();
    let mut counts = Counts::default();
    log::info!(
        "hoptrace agent ready: observing {}; layers: connections{}{}",
        scope.describe(),
        if attached.requests {
            format!(", requests ({})", attached.layers())
        } else {
            String::new()
        },
        openssl_layer(openssl.as_ref())
    );

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                // Let records gather: one wake-up per millisecond at most, not one per record
                // (the kernel wakes a reader that has caught up on every record it writes).
                tokio::time::sleep(RING_GATHER).await;
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut pipeline, &clock, &mut counts);
                guard.clear_ready();
            }
            _ = sweep.tick() => {
                // Often: two agents on one kernel map its clock to wall time alike only when
                // neither lags behind an NTP slew (a correlator compares their times).
                clock = Clock::sample();
                pipeline.assembler.sweep(clock::monotonic_now_ns(), &mut pipeline.spans);
                if let Some(go_tls) = &mut go_tls {
                    go_tls.rescan(&mut object);
                }
                pipeline.emit(&clock);
                if let Some((_, metrics)) = &mut metrics {
                    metrics.publish(&Observed {
                        records: counts.records,
                        undecodable: counts.decode_errors,
                        ring_lost: ebpf::read_counters(&object)
                            .ok()
                            .map(|c| ebpf::counter(&c, Counter::RingbufFull)),
                        requests: &pipeline.assembler.stats,
                        joins: &pipeline.correlator.stats,
                        export: &export_stats,
                        kubernetes: pods.as_deref().map(|p| &p.stats),
                    });
                }
            }
            _ = rescan.tick(), if openssl.is_some() => {
                if let Some(probes) = openssl.as_mut() {
                    probes.scan(&mut object);
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = report.tick() => {
                check_kernel_counters(&object, &mut counts);
            }
        }
    }

    log::info!("stopping: detaching probes and flushing spans");
    // The flush bound counts from the signal. Detaching runs meanwhile on blocking threads
    // (each link's detach waits for an RCU grace period: see ebpf::detach_all), while spans
    // already queued keep being exported and the ring buffer keeps being read. Then what the
    // kernel wrote last is taken.
    let flush_deadline = tokio::time::Instant::now() + options.shutdown_timeout;
    let kernel_counters = ebpf::read_counters(&object).ok();
    let mut detach = tokio::task::spawn_blocking(move || ebpf::detach_all(object));
    loop {
        tokio::select! {
            _ = &mut detach => break,
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut pipeline, &clock, &mut counts);
                guard.clear_ready();
            }
        }
    }
    drain(ring.get_mut(), &mut pipeline, &clock, &mut counts);
    pipeline.assembler.flush(&mut pipeline.spans);
    pipeline.emit(&clock);
    let request_stats = pipeline.assembler.stats.summary();
    let go_stats = match (go_tls, go_tls_join) {
        (Some(g), _) => Some(format!("; {}", g.stats.summary())),
        (None, Err(why)) => Some(format!("; Go crypto/tls: unavailable ({why})")),
        (None, Ok(())) => None,
    };
    let request_stats = format!(
        "{request_stats}; {}{}",
        pipeline.correlator.stats.summary(),
        go_stats.unwrap_or_default()
    );
    drop(pipeline);
    let request_stats = match (&openssl, kernel_counters) {
        (Some(probes), Some(counters)) => format!(
            "{request_stats}; {}, TLS plaintext records {}, unjoined {}",
            probes.stats.summary(),
            ebpf::counter(&counters, Counter::PlaintextSubmitted),
            ebpf::counter(&counters, Counter::PlaintextUnjoined)
        ),
        _ => request_stats,
    };
    let stats = sink.stats();
    drop(sink);
    // What is left of the bound, but a moment at least for the spans of the last records.
    let left = flush_deadline.saturating_duration_since(tokio::time::Instant::now());
    exporter
        .shutdown(left.max(FINAL_FLUSH_MIN.min(options.shutdown_timeout)))
        .await;
    if let Some((server, _)) = metrics {
        server.abort();
    }
    let stats = stats.summary();
    let lost = kernel_counters.map_or(0, |c| ebpf::counter(&c, Counter::RingbufFull));
    log::info!(
        "hoptrace agent stopped: {} records, {} undecodable, {lost} lost to a full ring buffer; \
         {request_stats}; {stats}",
        counts.records,
        counts.decode_errors,
    );
    Ok(())
}

fn drain(
    ring: &mut RingBuf<aya::maps::MapData>,
    pipeline: &mut Pipeline<'_>,
    clock: &Clock,
    counts: &mut Counts,
) {
    while let Some(record) = ring.next() {
        counts.records += 1;
        match pipeline.decoder.decode(&record) {
            Ok(Event::Conn(event)) => pipeline.assembler.on_conn(&event, &mut pipeline.spans),
            Ok(Event::Data(event)) => pipeline.assembler.on_data(event, &mut pipeline.spans),
            Ok(Event::Plaintext(event)) => {
                pipeline.assembler.on_plaintext(event, &mut pipeline.spans)
            }
            Ok(Event::HandshakeCall(event)) => pipeline
                .assembler
                .on_handshake_call(&event, &mut pipeline.spans),
            Err(e) => {
                if counts.decode_errors == 0 {
                    log::warn!("undecodable ring-buffer record (counted, skipped): {e}");
                }
                counts.decode_errors += 1;
            }
        }
        if pipeline.spans.len() >= EMIT_EVERY {
            pipeline.emit(clock);
        }
    }
    pipeline.emit(clock);
}

/// The ready line's word on TLS plaintext, after the first scan: a kernel that refused every
/// uprobe (CAP_SYS_ADMIN, Linux 6.16+) must not read as if HTTPS were observed.
fn openssl_layer(probes: Option<&OpenSslProbes>) -> &'static str {
    match probes {
        None => "",
        Some(probes)
            if probes.stats.files_attached == 0
                && probes.stats.files_refused_without_sys_admin > 0 =>
        {
            ", no TLS plaintext (uprobes refused: CAP_SYS_ADMIN is needed on Linux 6.16+)"
        }
        Some(_) => ", TLS plaintext (OpenSSL uprobes)",
    }
}

/// Reports new ring-buffer drops: the kernel never blocks on a full buffer, it counts.
fn check_kernel_counters(object: &aya::Ebpf, counts: &mut Counts) {
    let Ok(counters) = ebpf::read_counters(object) else {
        return;
    };
    let full = ebpf::counter(&counters, Counter::RingbufFull);
    if full > counts.ringbuf_full_reported {
        log::warn!(
            "ring buffer full: {} events lost since the last report ({full} in total)",
            full - counts.ringbuf_full_reported
        );
        counts.ringbuf_full_reported = full;
    }
    let untracked = ebpf::counter(&counters, Counter::SyscallTableFull);
    if untracked > 0 {
        log::warn!(
            "{untracked} socket reads and writes lost in total: more threads were inside \
             observed syscalls at once than the kernel's table holds"
        );
    }
    let unreadable = ebpf::counter(&counters, Counter::KernelReadFailed);
    if unreadable > 0 {
        log::debug!("{unreadable} socket reads failed in the kernel (skipped)");
    }
}
