//! `cargo xtask bench`: what the tracer costs the traffic it observes.
//!
//! wrk (2 threads, 32 connections) loads nginx in the lab's persona namespace from the agent
//! namespace, with no delay in the fw (the NFQUEUE holder alone halves the request rate) and
//! a fresh W3C `traceparent` on every request (`xtask/bench/traceparent.lua`). Per mode
//! (keep-alive, or a new connection per request via `Connection: close`) it alternates runs
//! without and with the agent, `--rounds` pairs in ABBA order (off/on, on/off, ...) so that
//! drift over time does not favour either side. Run-to-run variation on two cores is 10-15 %
//! (TESTBED.md): only ratios of paired runs are reported, never single absolute numbers.
//!
//! `--tls` runs the same over HTTPS (nginx :443, TLS 1.3; wrk does not verify certificates;
//! modes `https-keepalive`, `https-newconn`): the agent then sees the requests through the
//! OpenSSL uprobes on wrk's and nginx's libssl, and completeness counts those request spans.
//! In `https-newconn` every request is a full handshake, so the load is mostly crypto.
//!
//! wrk has no rate limit: `--rate R` paces it in the Lua script (wrk's `delay()` hook, slots
//! spaced evenly per thread). Without it, runs go as fast as they can and drops are reported at
//! whatever rate that was.
//!
//! A run with the agent starts a fresh agent scoped to the agent and persona namespaces,
//! exporting OTLP/gRPC to a fresh counting receiver on loopback (`otlp_count`: the hidden
//! `otlp-count-receiver` command of a release build of xtask, in its own process), and
//! measures:
//! * the agent's CPU time (utime+stime from /proc/PID/stat) from just before the load until
//!   the receiver's count stops growing after it (the export queue has drained), per 1000
//!   requests. The eBPF programs run in the context of the traced processes (wrk, nginx):
//!   their cost is not in this number, it shows up in the throughput and latency ratios;
//! * its peak RSS (VmHWM), read before it is stopped;
//! * what it lost, from its exit summary: ring-buffer drops, export-queue drops, failed exports;
//! * the spans the receiver got, by hop, kind and name: completeness (see `Basis`).
//!
//! The receiver shares the two cores with the load: its CPU time is printed too, so that its
//! share of the overhead can be judged (a collector is on another machine in the field). It is
//! in Rust and decodes only what it counts: `tests/otlp_receiver.py --count-only`, which writes
//! the same summary, cost about as much CPU per request as the agent.
//!
//! hoptrace is built in the release profile by default (what is deployed; about 30 s on top of
//! the debug build the tests use, under 2 min cold): `--debug` measures the debug build,
//! `--hoptrace PATH` a given binary. The command fails (after printing everything) when a
//! target is not met. Ctrl-C stops everything it started; a second Ctrl-C exits at once (the
//! next lab start removes what is left).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, ValueEnum};

use crate::lab::{Background, Host, Lab, LabConfig};

/// The wrk script: a fresh traceparent per request, `Connection: close`, pacing, and a
/// machine-readable result line.
const WRK_SCRIPT: &str = include_str!("../bench/traceparent.lua");

/// The targets the benchmark checks (see the issue).
const MIN_THROUGHPUT_RATIO: f64 = 0.95;
const MIN_COMPLETENESS: f64 = 0.999;
const MAX_RSS_MIB: f64 = 64.0;

/// Agent settings, fixed.
const AGENT_ENV: &[(&str, &str)] = &[
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ("OTEL_SERVICE_NAME", "hoptrace-bench"),
    // The exit summary is an info line: never let the caller's RUST_LOG hide it.
    ("RUST_LOG", "info"),
];

/// Agent export-queue settings: these defaults (a queue that absorbs bursts of tens of
/// milliseconds at a quarter of a million spans per second, frequent exports) unless set in the
/// environment, e.g. `OTEL_BSP_MAX_QUEUE_SIZE=2048 ./x bench` to measure the agent's own
/// defaults. A queued span holds ~1.2 KiB: the queue's bound is also the agent's memory bound
/// (65536 spans reached a 92 MiB peak RSS at full speed; 16384 stay within the 64 MiB target).
const AGENT_BSP_DEFAULTS: &[(&str, &str)] = &[
    ("OTEL_BSP_MAX_QUEUE_SIZE", "16384"),
    ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "30000"),
];

/// The export-queue settings the agent runs with: the environment's, else the defaults.
fn agent_bsp_env() -> Vec<(String, String)> {
    AGENT_BSP_DEFAULTS
        .iter()
        .map(|(k, default)| {
            let v = std::env::var(k).ok().filter(|v| !v.trim().is_empty());
            (k.to_string(), v.unwrap_or_else(|| default.to_string()))
        })
        .collect()
}

/// What the agent prints once attached, and when it stops.
const AGENT_READY: &str = "hoptrace agent ready";
const AGENT_SUMMARY: &str = "hoptrace agent stopped:";

/// Time between the agent being ready and the load.
const SETTLE: Duration = Duration::from_millis(500);
/// After the load, the readings wait until the receiver's count (rewritten every second) stops
/// growing, so that the agent's CPU time includes exporting its backlog; at most this long.
const DRAIN_MAX: Duration = Duration::from_secs(15);

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Keep-alive connections, a new connection per request, or both.
    #[arg(long, value_enum, default_value_t = ModeArg::Both)]
    pub mode: ModeArg,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Pairs of runs (without, with the agent) per mode.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Total requests per second (paced in the wrk script); default: as fast as possible.
    #[arg(long)]
    pub rate: Option<u32>,
    /// Measure the release build of hoptrace (the default).
    #[arg(long, conflicts_with_all = ["debug", "hoptrace"])]
    pub release: bool,
    /// Measure the debug build (what the tests use) instead of the release build.
    #[arg(long, conflicts_with = "hoptrace")]
    pub debug: bool,
    /// Use this hoptrace binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub hoptrace: Option<PathBuf>,
    /// Seconds of unmeasured load before each mode's first run.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// wrk connections (open at once).
    #[arg(long, default_value_t = 32)]
    pub connections: u32,
    /// HTTPS: wrk over TLS to nginx :443 (modes are then named https-keepalive and
    /// https-newconn); the requests reach the agent through the OpenSSL uprobes.
    #[arg(long)]
    pub tls: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    Keepalive,
    Newconn,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reuse {
    /// Every connection carries requests until the end of the run.
    Keepalive,
    /// `Connection: close`: one TCP connection (and with `--tls` one full TLS handshake) per
    /// request.
    Newconn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    reuse: Reuse,
    /// HTTPS to nginx :443: the agent sees the requests through the OpenSSL uprobes (wrk's and
    /// nginx's libssl), the handshakes through the record headers.
    tls: bool,
}

impl Mode {
    fn name(self) -> &'static str {
        match (self.tls, self.reuse) {
            (false, Reuse::Keepalive) => "keepalive",
            (false, Reuse::Newconn) => "newconn",
            (true, Reuse::Keepalive) => "https-keepalive",
            (true, Reuse::Newconn) => "https-newconn",
        }
    }
}

/// Runs the benchmark: builds (unless given) hoptrace, starts the lab, runs, prints the table.
/// Fails when a target is not met, after printing everything.
pub fn run(args: BenchArgs) -> Result<()> {
    install_interrupt_handler();
    if args.rounds == 0 || args.duration == 0 || args.threads == 0 {
        bail!("--rounds, --duration and --threads must be at least 1");
    }
    if args.connections < args.threads {
        bail!("--connections must be at least --threads (wrk gives each thread its share)");
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and builds network namespaces: run it as root");
    }
    let modes: Vec<Mode> = match args.mode {
        ModeArg::Keepalive => vec![Reuse::Keepalive],
        ModeArg::Newconn => vec![Reuse::Newconn],
        ModeArg::Both => vec![Reuse::Keepalive, Reuse::Newconn],
    }
    .into_iter()
    .map(|reuse| Mode {
        reuse,
        tls: args.tls,
    })
    .collect();
    which("wrk").context("wrk is needed for the load (Debian package wrk; ./x installs it)")?;
    let (hoptrace, profile) = match &args.hoptrace {
        Some(path) => (path.clone(), "given".to_owned()),
        None => (
            build("hoptrace", !args.debug)?.join("hoptrace"),
            if args.debug { "debug" } else { "release" }.to_owned(),
        ),
    };
    if !hoptrace.exists() {
        bail!("{} not found", hoptrace.display());
    }
    // Release, whatever hoptrace's profile: the debug build's decoding costs more CPU than the
    // Python receiver did, all of it on the lab's cores.
    let receiver = build("xtask", true)?.join("xtask");
    check_interrupted()?;
    raise_nofile_limit();

    let work = tempfile::Builder::new()
        .prefix("hoptrace-bench-")
        .tempdir()
        .context("creating the benchmark's temp dir")?;
    let script = work.path().join("traceparent.lua");
    fs::write(&script, WRK_SCRIPT).context("writing the wrk script")?;

    // nginx only (workers: one per CPU, as in the TESTBED.md baselines), no delay. The lab
    // itself widens the agent's ephemeral port range and enables tcp_tw_reuse there.
    let lab = Lab::start(LabConfig {
        nginx: true,
        python: false,
        ..LabConfig::default()
    })?;
    check_interrupted()?;
    let bench = Bench {
        args: &args,
        lab: &lab,
        hoptrace: &hoptrace,
        receiver: &receiver,
        script: &script,
        work: work.path(),
    };
    println!(
        "== hoptrace overhead: {} ({profile}), wrk -t{} -c{} -d{}s against {} from the agent \
         namespace, {}, {} round(s) per mode",
        hoptrace.display(),
        args.threads,
        args.connections,
        args.duration,
        url(&lab, args.tls),
        args.rate
            .map_or("as fast as possible".to_owned(), |r| format!(
                "paced at {r} req/s"
            )),
        args.rounds,
    );
    println!(
        "== agent: --netns {} --netns {}, OTLP/gRPC to a counting receiver on 127.0.0.1, {}",
        lab.netns(Host::Agent).name(),
        lab.netns(Host::Persona).name(),
        agent_bsp_env()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    );

    let mut results = Vec::new();
    for &mode in &modes {
        if args.warmup > 0 {
            let load = bench.wrk(mode, args.warmup)?;
            println!(
                "-- {:<15} warm-up ({} s, not counted): {:.0} req/s",
                mode.name(),
                args.warmup,
                load.rps
            );
        }
        for round in 1..=args.rounds {
            // ABBA: off/on, on/off, ...
            let order = if round % 2 == 1 {
                [false, true]
            } else {
                [true, false]
            };
            let mut pair: [Option<Run>; 2] = [None, None];
            for with_agent in order {
                pause(Duration::from_secs(1))?;
                let run = bench.run_once(mode, with_agent)?;
                println!(
                    "-- {:<15} round {round}/{} {}",
                    mode.name(),
                    args.rounds,
                    run.describe()
                );
                pair[usize::from(with_agent)] = Some(run);
            }
            let [Some(without), Some(with)] = pair else {
                unreachable!()
            };
            results.push(Pair {
                mode,
                without,
                with,
            });
        }
    }
    drop(lab);

    let report = Report::new(&args, &modes, &results);
    print!("{}", report.render());
    if report.all_pass() {
        Ok(())
    } else {
        bail!("hoptrace overhead targets not met (see FAIL above)")
    }
}

/// nginx as the load sees it: HTTP :80, or HTTPS :443 (wrk does not verify certificates).
fn url(lab: &Lab, tls: bool) -> String {
    if tls {
        lab.nginx_https_url("/")
    } else {
        lab.nginx_url("/")
    }
}

struct Bench<'a> {
    args: &'a BenchArgs,
    lab: &'a Lab,
    hoptrace: &'a Path,
    /// The xtask binary that serves `otlp-count-receiver`.
    receiver: &'a Path,
    script: &'a Path,
    work: &'a Path,
}

/// What wrk measured.
#[derive(Debug, Clone, Default)]
struct Load {
    requests: u64,
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    /// connect, read, write, non-2xx/3xx status, timeout
    errors: [u64; 5],
}

/// What a run with the agent measured about it.
#[derive(Debug, Clone, Default)]
struct AgentStats {
    cpu_s: f64,
    receiver_cpu_s: f64,
    rss_kib: u64,
    records: u64,
    undecodable: u64,
    ring_lost: u64,
    queued: u64,
    exported: u64,
    queue_dropped: u64,
    export_failed: u64,
    received: SpanCounts,
}

impl AgentStats {
    fn lost(&self) -> u64 {
        self.ring_lost + self.queue_dropped + self.export_failed
    }
}

#[derive(Debug, Clone)]
struct Run {
    mode: Mode,
    load: Load,
    agent: Option<AgentStats>,
    cpu: CpuUse,
}

impl Run {
    /// The new TCP connections wrk opened: all of them at the start with keep-alive, one per
    /// request otherwise (those open at the end without a finished request aside).
    fn connections(&self, configured: u32) -> u64 {
        match self.mode.reuse {
            Reuse::Keepalive => u64::from(configured),
            Reuse::Newconn => self.load.requests,
        }
    }

    fn describe(&self) -> String {
        let l = &self.load;
        let mut s = format!(
            "{}: {:>7.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms",
            if self.agent.is_some() {
                "with agent   "
            } else {
                "without agent"
            },
            l.rps,
            l.p50_us as f64 / 1e3,
            l.p99_us as f64 / 1e3,
        );
        let _ = write!(
            s,
            "  lab CPU {:>5.1} us/req",
            self.cpu.lab_s * 1e6 / l.requests.max(1) as f64
        );
        if self.cpu.foreign_share > FOREIGN_WARN {
            let _ = write!(
                s,
                "  (other work: {:.0}% of the CPUs)",
                self.cpu.foreign_share * 100.0
            );
        }
        if l.errors.iter().any(|&e| e > 0) {
            let [c, r, w, st, t] = l.errors;
            let _ = write!(
                s,
                "  wrk errors: connect {c} read {r} write {w} status {st} timeout {t}"
            );
        }
        if let Some(a) = &self.agent {
            let per_k = 1000.0 / l.requests.max(1) as f64;
            let _ = write!(
                s,
                "\n     agent: {:.3} CPU s/1k req, peak RSS {:.1} MiB, {} records ({} undecodable), \
                 lost: ring buffer {} / export queue {} / exporter {}; spans queued {} exported {}\
                 \n     receiver: {} spans [{}], {:.3} CPU s/1k req",
                a.cpu_s * per_k,
                a.rss_kib as f64 / 1024.0,
                a.records,
                a.undecodable,
                a.ring_lost,
                a.queue_dropped,
                a.export_failed,
                a.queued,
                a.exported,
                a.received.total,
                a.received.describe(),
                a.receiver_cpu_s * per_k,
            );
        }
        s
    }
}

struct Pair {
    mode: Mode,
    without: Run,
    with: Run,
}

impl Bench<'_> {
    fn run_once(&self, mode: Mode, with_agent: bool) -> Result<Run> {
        // nginx's master and workers; wrk is counted as a reaped child.
        let pids = self.nginx_pids();
        if !with_agent {
            let before = CpuSnapshot::take(&pids);
            let load = self.wrk(mode, self.args.duration)?;
            return Ok(Run {
                mode,
                load,
                agent: None,
                cpu: CpuUse::between(&before, &CpuSnapshot::take(&pids)),
            });
        }
        let mut receiver = Receiver::start(self.receiver, self.work)?;
        let mut agent = Agent::start(self.hoptrace, self.lab, receiver.grpc_port, self.work)?;
        pause(SETTLE)?;
        let pids = [pids, vec![agent.pid(), receiver.pid()]].concat();
        let before = CpuSnapshot::take(&pids);
        let cpu0 = cpu_seconds(agent.pid())?;
        let rcpu0 = cpu_seconds(receiver.pid())?;
        let load = self.wrk(mode, self.args.duration)?;
        receiver.wait_until_idle(DRAIN_MAX)?;
        let cpu = CpuUse::between(&before, &CpuSnapshot::take(&pids));
        let cpu_s = cpu_seconds(agent.pid())? - cpu0;
        let receiver_cpu_s = cpu_seconds(receiver.pid())? - rcpu0;
        let rss_kib = vm_hwm_kib(agent.pid())?;
        let summary = agent.stop()?;
        let received = receiver.stop()?;
        let mut stats = parse_agent_summary(&summary)
            .with_context(|| format!("parsing the agent's exit summary {summary:?}"))?;
        stats.cpu_s = cpu_s;
        stats.receiver_cpu_s = receiver_cpu_s;
        stats.rss_kib = rss_kib;
        stats.received = received;
        Ok(Run {
            mode,
            load,
            agent: Some(stats),
            cpu,
        })
    }

    /// nginx's master and its workers.
    fn nginx_pids(&self) -> Vec<u32> {
        let masters = self.lab.server_pids();
        let mut pids = masters.clone();
        pids.extend(
            proc_pids()
                .into_iter()
                .filter(|&pid| parent_pid(pid).is_some_and(|ppid| masters.contains(&ppid))),
        );
        pids
    }

    /// One wrk run of `secs` seconds from the agent namespace.
    fn wrk(&self, mode: Mode, secs: u64) -> Result<Load> {
        let a = self.args;
        let mut argv: Vec<String> = vec![
            "wrk".into(),
            format!("-t{}", a.threads),
            format!("-c{}", a.connections),
            format!("-d{secs}s"),
            "--timeout".into(),
            "5s".into(),
            "--latency".into(),
            "-s".into(),
            self.script.display().to_string(),
            url(self.lab, mode.tls),
            "--".into(),
            format!("threads={}", a.threads),
        ];
        if mode.reuse == Reuse::Newconn {
            argv.push("close".into());
        }
        if let Some(rate) = a.rate {
            argv.push(format!("rate={rate}"));
        }
        let mut cmd = self.lab.exec(Host::Agent, &argv);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut wrk = Background::spawn(&mut cmd)?;
        let mut stdout = wrk.child_mut().stdout.take().context("wrk stdout")?;
        let mut stderr = wrk.child_mut().stderr.take().context("wrk stderr")?;
        // Read both pipes while it runs (its output is small, but never risk a full pipe).
        let out_reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(secs + 30);
        let status = loop {
            if let Some(status) = wrk.try_wait()? {
                break status;
            }
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("wrk did not finish within {} s", secs + 30);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            bail!("`{}` failed ({status}):\n{out}{err}", argv.join(" "));
        }
        parse_wrk(&out).with_context(|| format!("parsing wrk's output:\n{out}{err}"))
    }
}

/// Parses the script's `BENCH key=value ...` line.
fn parse_wrk(out: &str) -> Result<Load> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .context("no BENCH line (did the wrk script run?)")?;
    let fields: BTreeMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let get = |k: &str| {
        fields
            .get(k)
            .copied()
            .with_context(|| format!("no {k} in {line:?}"))
    };
    let requests = get("requests")?;
    let duration_us = get("duration_us")?;
    if requests == 0 || duration_us == 0 {
        bail!("wrk completed no request");
    }
    Ok(Load {
        requests,
        rps: requests as f64 * 1e6 / duration_us as f64,
        p50_us: get("p50_us")?,
        p99_us: get("p99_us")?,
        errors: [
            get("connect_err")?,
            get("read_err")?,
            get("write_err")?,
            get("status_err")?,
            get("timeout_err")?,
        ],
    })
}

// ---------------------------------------------------------------------------------------------
// Spans received, and what counts as complete.

/// The receiver's counts by (hop, kind, name); hop "-" when the span had no `hoptrace.hop`.
#[derive(Debug, Clone, Default)]
struct SpanCounts {
    total: u64,
    by_hop_kind_name: BTreeMap<(String, String, String), u64>,
}

impl SpanCounts {
    fn count(&self, want: impl Fn(&str, &str, &str) -> bool) -> u64 {
        self.by_hop_kind_name
            .iter()
            .filter(|((hop, kind, name), _)| want(hop, kind, name))
            .map(|(_, n)| n)
            .sum()
    }

    fn describe(&self) -> String {
        self.by_hop_kind_name
            .iter()
            .map(|((hop, kind, name), n)| format!("{hop} {kind} {name}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What the spans are counted against. Adapt here when span kinds are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// One CLIENT span at hop agent and one SERVER span at hop persona per HTTP request, named
    /// after the method (`GET`, or `GET /route`).
    Requests,
    /// One `tcp.connect` (agent) and one `tcp.accept` (persona) per new connection.
    Connections,
}

impl Basis {
    fn describe(self) -> &'static str {
        match self {
            Basis::Requests => "request spans per request",
            Basis::Connections => "connection spans per connection",
        }
    }

    /// (agent-side, persona-side) spans of this basis.
    fn spans(self, c: &SpanCounts) -> (u64, u64) {
        match self {
            Basis::Requests => (
                c.count(|hop, kind, name| {
                    hop == "agent" && kind == "CLIENT" && is_http_method_name(name)
                }),
                c.count(|hop, kind, name| {
                    hop == "persona" && kind == "SERVER" && is_http_method_name(name)
                }),
            ),
            Basis::Connections => (
                c.count(|hop, _, name| hop == "agent" && name == "tcp.connect"),
                c.count(|hop, _, name| hop == "persona" && name == "tcp.accept"),
            ),
        }
    }

    /// How many of each side's spans a run should have produced.
    fn expected(self, run: &Run, connections: u32) -> u64 {
        match self {
            Basis::Requests => run.load.requests,
            Basis::Connections => run.connections(connections),
        }
    }

    /// Request spans once the agent exports any, connection spans before.
    fn choose(runs: &[&Run]) -> Basis {
        let any_request_spans = runs.iter().filter_map(|r| r.agent.as_ref()).any(|a| {
            let (agent, persona) = Basis::Requests.spans(&a.received);
            agent + persona > 0
        });
        if any_request_spans {
            Basis::Requests
        } else {
            Basis::Connections
        }
    }
}

/// `GET`, `POST`, ... alone or followed by a route (OpenTelemetry's `{method} {target}`), or
/// `HTTP` (OpenTelemetry's name when the method is unknown).
fn is_http_method_name(name: &str) -> bool {
    const METHODS: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "HTTP",
    ];
    let first = name.split(' ').next().unwrap_or("");
    METHODS.contains(&first)
}

// ---------------------------------------------------------------------------------------------
// The summary table.

struct ModeSummary {
    mode: Mode,
    rounds: usize,
    rps_without: f64,
    rps_with: f64,
    tput_mean: f64,
    tput_min: f64,
    /// with / without: the lab's CPU time per request (robust to other work on the machine).
    cpu_per_req_ratio: f64,
    /// Largest share of the CPUs other processes used during one of this mode's runs.
    foreign_max: f64,
    p50_mean: f64,
    p99_mean: f64,
    basis: Basis,
    /// Lowest over runs of min(agent side, persona side), and each side's lowest.
    completeness: f64,
    completeness_agent: f64,
    completeness_persona: f64,
    drops: u64,
    cpu_per_k: f64,
    receiver_cpu_per_k: f64,
    rss_mib: f64,
    wrk_errors_with: u64,
    wrk_errors_without: u64,
}

struct Report {
    rate: Option<u32>,
    modes: Vec<ModeSummary>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl Report {
    fn new(args: &BenchArgs, modes: &[Mode], pairs: &[Pair]) -> Report {
        let all_runs: Vec<&Run> = pairs.iter().map(|p| &p.with).collect();
        let basis = Basis::choose(&all_runs);
        let modes = modes
            .iter()
            .map(|&mode| {
                let pairs: Vec<&Pair> = pairs.iter().filter(|p| p.mode == mode).collect();
                let ratio = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> {
                    pairs
                        .iter()
                        .map(|p| f(&p.with) / f(&p.without).max(f64::MIN_POSITIVE))
                        .collect()
                };
                let tput = ratio(&|r| r.load.rps);
                let cpu_per_req = ratio(&|r| r.cpu.lab_s / r.load.requests.max(1) as f64);
                let p50 = ratio(&|r| r.load.p50_us as f64);
                let p99 = ratio(&|r| r.load.p99_us as f64);
                let agents: Vec<(&Run, &AgentStats)> = pairs
                    .iter()
                    .filter_map(|p| Some((&p.with, p.with.agent.as_ref()?)))
                    .collect();
                let mut completeness_agent = f64::INFINITY;
                let mut completeness_persona = f64::INFINITY;
                for (run, a) in &agents {
                    let expected = basis.expected(run, args.connections).max(1) as f64;
                    let (agent, persona) = basis.spans(&a.received);
                    completeness_agent = completeness_agent.min(agent as f64 / expected);
                    completeness_persona = completeness_persona.min(persona as f64 / expected);
                }
                let per_k = |cpu_s: f64, r: &Run| cpu_s * 1000.0 / r.load.requests.max(1) as f64;
                let cpu: Vec<f64> = agents.iter().map(|(r, a)| per_k(a.cpu_s, r)).collect();
                let receiver_cpu: Vec<f64> = agents
                    .iter()
                    .map(|(r, a)| per_k(a.receiver_cpu_s, r))
                    .collect();
                let errors = |r: &Run| r.load.errors.iter().sum::<u64>();
                ModeSummary {
                    mode,
                    rounds: pairs.len(),
                    rps_without: mean(
                        &pairs.iter().map(|p| p.without.load.rps).collect::<Vec<_>>(),
                    ),
                    rps_with: mean(&pairs.iter().map(|p| p.with.load.rps).collect::<Vec<_>>()),
                    tput_mean: mean(&tput),
                    tput_min: tput.iter().copied().fold(f64::INFINITY, f64::min),
                    cpu_per_req_ratio: mean(&cpu_per_req),
                    foreign_max: pairs
                        .iter()
                        .flat_map(|p| [p.with.cpu.foreign_share, p.without.cpu.foreign_share])
                        .fold(0.0, f64::max),
                    p50_mean: mean(&p50),
                    p99_mean: mean(&p99),
                    basis,
                    completeness: completeness_agent.min(completeness_persona),
                    completeness_agent,
                    completeness_persona,
                    drops: agents.iter().map(|(_, a)| a.lost()).sum(),
                    cpu_per_k: mean(&cpu),
                    receiver_cpu_per_k: mean(&receiver_cpu),
                    rss_mib: agents
                        .iter()
                        .map(|(_, a)| a.rss_kib as f64 / 1024.0)
                        .fold(0.0, f64::max),
                    wrk_errors_with: pairs.iter().map(|p| errors(&p.with)).sum(),
                    wrk_errors_without: pairs.iter().map(|p| errors(&p.without)).sum(),
                }
            })
            .collect();
        Report {
            rate: args.rate,
            modes,
        }
    }

    fn checks(m: &ModeSummary) -> [(String, bool); 4] {
        [
            (
                format!(
                    "throughput ratio {:.3} >= {MIN_THROUGHPUT_RATIO}",
                    m.tput_mean
                ),
                m.tput_mean >= MIN_THROUGHPUT_RATIO,
            ),
            (
                format!(
                    "completeness {:.2}% >= {:.1}%",
                    m.completeness * 100.0,
                    MIN_COMPLETENESS * 100.0
                ),
                m.completeness >= MIN_COMPLETENESS,
            ),
            (format!("drops {} == 0", m.drops), m.drops == 0),
            (
                format!("peak RSS {:.1} MiB <= {MAX_RSS_MIB} MiB", m.rss_mib),
                m.rss_mib <= MAX_RSS_MIB,
            ),
        ]
    }

    fn all_pass(&self) -> bool {
        self.modes
            .iter()
            .all(|m| Self::checks(m).iter().all(|(_, ok)| *ok))
    }

    fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| mode | req/s without -> with | throughput ratio mean (min) | lab CPU/req ratio \
             | p50 ratio | p99 ratio | completeness | drops | agent CPU s / 1k req \
             | agent peak RSS MiB | receiver CPU s / 1k req |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for m in &self.modes {
            let _ = writeln!(
                s,
                "| {} | {:.0} -> {:.0} | {:.3} ({:.3}) | {:.3} | {:.3} | {:.3} | {:.2}% | {} | {:.4} \
                 | {:.1} | {:.4} |",
                m.mode.name(),
                m.rps_without,
                m.rps_with,
                m.tput_mean,
                m.tput_min,
                m.cpu_per_req_ratio,
                m.p50_mean,
                m.p99_mean,
                m.completeness * 100.0,
                m.drops,
                m.cpu_per_k,
                m.rss_mib,
                m.receiver_cpu_per_k,
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "ratios: with / without the agent, per round pair, mean (and min) over {} round(s); \
             latency percentiles as wrk measures them (from the first byte written, so without \
             the TCP handshake); the receiver shares the 2 cores: its CPU is part of the \
             with-agent cost here, not in the field",
            self.modes.first().map_or(0, |m| m.rounds),
        );
        let _ = writeln!(
            s,
            "lab CPU/req: CPU time of wrk + nginx + agent + receiver + ksoftirqd (+ the irq and \
             softirq work they were interrupted for) per request, with / without; on CPU-bound cores 1 / this ratio is the throughput ratio \
             to expect on a machine doing nothing else"
        );
        for m in &self.modes {
            if m.foreign_max > FOREIGN_WARN {
                let _ = writeln!(
                    s,
                    "WARNING {}: other processes used up to {:.0}% of the CPUs during a run: \
                     throughput and latency ratios are unreliable, lab CPU/req is the better \
                     guide",
                    m.mode.name(),
                    m.foreign_max * 100.0,
                );
            } else {
                let _ = writeln!(
                    s,
                    "{}: other processes used at most {:.1}% of the CPUs during a run",
                    m.mode.name(),
                    m.foreign_max * 100.0,
                );
            }
        }
        for m in &self.modes {
            let _ = writeln!(
                s,
                "{}: completeness = {} (lowest run: agent {:.2}%, persona {:.2}%); drops = ring \
                 buffer + export queue + failed exports; wrk errors without/with: {}/{}",
                m.mode.name(),
                m.basis.describe(),
                m.completeness_agent * 100.0,
                m.completeness_persona * 100.0,
                m.wrk_errors_without,
                m.wrk_errors_with,
            );
        }
        match self.rate {
            Some(rate) => {
                let _ = writeln!(
                    s,
                    "paced at {rate} req/s: drops and completeness hold at the rates achieved \
                     above; the throughput ratio only shows whether the agent kept that rate"
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "unpaced (as fast as possible): drops and completeness hold at the rates \
                     achieved above (the issue's target is zero drops at 20k req/s; --rate paces)"
                );
            }
        }
        let _ = writeln!(s);
        for m in &self.modes {
            for (what, ok) in Self::checks(m) {
                let _ = writeln!(
                    s,
                    "{} {:<15} {what}",
                    if ok { "PASS" } else { "FAIL" },
                    m.mode.name()
                );
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The agent and the receiver, each stopped when dropped.

struct Agent {
    process: Option<Background>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(bin: &Path, lab: &Lab, grpc_port: u16, work: &Path) -> Result<Agent> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "agent",
            "--netns",
            lab.netns(Host::Agent).name(),
            "--netns",
            lab.netns(Host::Persona).name(),
        ]);
        for key in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_SDK_DISABLED",
            "OTEL_TRACES_EXPORTER",
            "OTEL_RESOURCE_ATTRIBUTES",
        ] {
            cmd.env_remove(key);
        }
        cmd.env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{grpc_port}"),
        )
        .envs(AGENT_ENV.iter().copied())
        .envs(agent_bsp_env())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut process = Background::spawn(&mut cmd)?;
        let pipe = process.child_mut().stderr.take().context("agent stderr")?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let lines = stderr.clone();
        let log_path = work.join("agent.log");
        thread::spawn(move || {
            let mut log = fs::File::create(log_path).ok();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains(AGENT_READY) {
                    let _ = ready_tx.send(());
                }
                if let Some(f) = log.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let mut agent = Agent {
            process: Some(process),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(agent);
            }
            check_interrupted()?;
            if let Some(status) = agent.process_mut().try_wait()? {
                bail!(
                    "hoptrace agent exited ({status}) before it was ready:\n{}",
                    agent.tail()
                );
            }
            if Instant::now() > deadline {
                bail!("hoptrace agent not ready after 60 s:\n{}", agent.tail());
            }
        }
    }

    fn process_mut(&mut self) -> &mut Background {
        self.process.as_mut().expect("agent running")
    }

    fn pid(&self) -> u32 {
        self.process.as_ref().expect("agent running").pid()
    }

    fn tail(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, wait for the flush and exit; returns the exit summary line.
    fn stop(&mut self) -> Result<String> {
        let mut process = self.process.take().context("agent already stopped")?;
        let status = terminate(&mut process, Duration::from_secs(20))?;
        // The stderr reader may still be taking the last lines.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let summary = self
                .stderr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .rev()
                .find_map(|l| l.find(AGENT_SUMMARY).map(|i| l[i..].to_owned()));
            if let Some(summary) = summary {
                if !status.success() {
                    bail!("hoptrace agent exited with {status}:\n{}", self.tail());
                }
                return Ok(summary);
            }
            if Instant::now() > deadline {
                bail!(
                    "hoptrace agent ({status}) printed no exit summary:\n{}",
                    self.tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // Flushing takes up to --shutdown-timeout (5 s); Background's own drop would
            // SIGKILL after 2 s.
            let _ = terminate(&mut process, Duration::from_secs(10));
        }
    }
}

/// `otlp-count-receiver` (a release build of xtask, see `otlp_count`) on an ephemeral
/// loopback port.
struct Receiver {
    process: Option<Background>,
    grpc_port: u16,
    summary: PathBuf,
}

impl Receiver {
    fn start(xtask: &Path, work: &Path) -> Result<Receiver> {
        let summary = work.join("received.json");
        let _ = fs::remove_file(&summary);
        let log = fs::File::create(work.join("receiver.log")).context("creating receiver.log")?;
        let mut cmd = Command::new(xtask);
        cmd.arg("otlp-count-receiver")
            .arg("--out")
            .arg(&summary)
            .stdout(Stdio::piped())
            .stderr(log);
        let mut process = Background::spawn(&mut cmd)?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .context("receiver stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            // Keep reading so that the receiver never writes into a closed pipe.
            for _ in lines {}
        });
        let mut receiver = Receiver {
            process: Some(process),
            grpc_port: 0,
            summary,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Some(line)) => break line,
                Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "the OTLP receiver ({} otlp-count-receiver) exited before it was ready: \
                         see {}",
                        xtask.display(),
                        work.join("receiver.log").display()
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("the OTLP receiver was not ready after 30 s");
            }
        };
        receiver.grpc_port = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected receiver greeting {line:?}"))?;
        Ok(receiver)
    }

    fn pid(&self) -> u32 {
        self.process.as_ref().expect("receiver running").pid()
    }

    /// Spans received so far (as of the last rewrite of the summary, at most 1 s old).
    fn total(&self) -> Option<u64> {
        let text = fs::read_to_string(&self.summary).ok()?;
        parse_receiver_summary(&text).ok().map(|c| c.total)
    }

    /// Waits until the count has not changed for more than a summary period, or `max`.
    fn wait_until_idle(&self, max: Duration) -> Result<()> {
        let deadline = Instant::now() + max;
        let mut last = self.total();
        loop {
            pause(Duration::from_millis(1200))?;
            let now = self.total();
            if now == last || Instant::now() > deadline {
                return Ok(());
            }
            last = now;
        }
    }

    /// Stops it (it writes its summary at exit) and returns the counts.
    fn stop(&mut self) -> Result<SpanCounts> {
        let mut process = self.process.take().context("receiver already stopped")?;
        let status = terminate(&mut process, Duration::from_secs(10))?;
        if !status.success() {
            bail!("the OTLP receiver exited with {status}");
        }
        let text = fs::read_to_string(&self.summary)
            .with_context(|| format!("reading {}", self.summary.display()))?;
        parse_receiver_summary(&text)
            .with_context(|| format!("parsing the receiver's summary:\n{text}"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = terminate(&mut process, Duration::from_secs(5));
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`; reaps the process.
fn terminate(process: &mut Background, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = process.try_wait()? {
        return Ok(status);
    }
    // SAFETY: plain system call; the pid is our unreaped child.
    unsafe { libc::kill(process.pid() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = process.try_wait()? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let child = process.child_mut();
    child.kill()?;
    Ok(child.wait()?)
}

/// The receiver's summary (as `tests/otlp_receiver.py --count-only` writes it):
/// `json.dumps(indent=1, sort_keys=True)`, so one count per line; the `by_hop_kind_name` keys
/// are `hop|KIND|name`.
fn parse_receiver_summary(text: &str) -> Result<SpanCounts> {
    let mut counts = SpanCounts::default();
    let mut section = String::new();
    let mut total = None;
    for line in text.lines() {
        let line = line.trim().trim_end_matches(',');
        if line == "}" {
            section.clear();
            continue;
        }
        if line == "{" || line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(':') else {
            continue;
        };
        let key = unquote(key.trim()).with_context(|| format!("bad key in {line:?}"))?;
        let value = value.trim();
        if value == "{" {
            section = key;
            continue;
        }
        let n: u64 = value
            .parse()
            .with_context(|| format!("bad count in {line:?}"))?;
        if section.is_empty() && key == "spans" {
            total = Some(n);
        } else if section == "by_hop_kind_name" {
            let mut parts = key.splitn(3, '|');
            let (Some(hop), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("bad by_hop_kind_name key {key:?}");
            };
            counts
                .by_hop_kind_name
                .insert((hop.into(), kind.into(), name.into()), n);
        }
    }
    counts.total = total.context("no \"spans\" count")?;
    Ok(counts)
}

/// `"..."` -> its contents, with the escapes json.dumps produces for ASCII text.
fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('\u{fffd}'));
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// "hoptrace agent stopped: N records, N undecodable, N lost to a full ring buffer; spans
/// queued N, exported N, dropped (queue full) N, failed (exporter) N"
fn parse_agent_summary(line: &str) -> Result<AgentStats> {
    let before = |suffix: &str| -> Result<u64> {
        let end = line
            .find(suffix)
            .with_context(|| format!("no {suffix:?}"))?;
        let head = line[..end].trim_end();
        let start = head
            .rfind(|c: char| !c.is_ascii_digit())
            .map_or(0, |i| i + 1);
        head[start..]
            .parse()
            .with_context(|| format!("no number before {suffix:?}"))
    };
    let after = |prefix: &str| -> Result<u64> {
        let start = line
            .find(prefix)
            .with_context(|| format!("no {prefix:?}"))?
            + prefix.len();
        let digits: String = line[start..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits
            .parse()
            .with_context(|| format!("no number after {prefix:?}"))
    };
    Ok(AgentStats {
        records: before(" records")?,
        undecodable: before(" undecodable")?,
        ring_lost: before(" lost to a full ring buffer")?,
        queued: after("spans queued")?,
        exported: after("exported")?,
        queue_dropped: after("dropped (queue full)")?,
        export_failed: after("failed (exporter)")?,
        ..AgentStats::default()
    })
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').context("bad /proc/PID/stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse()
            .context("bad /proc/PID/stat")
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

/// Peak resident set size (VmHWM) of `pid` in KiB.
fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// The per-CPU ksoftirqd kernel threads.
fn ksoftirqd_pids() -> Vec<u32> {
    static PIDS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    PIDS.get_or_init(|| {
        proc_pids()
            .into_iter()
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.starts_with("ksoftirqd/"))
            })
            .collect()
    })
    .clone()
}

/// Every process id in /proc.
fn proc_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// Parent pid from /proc/PID/stat.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Above this share of the machine's CPU used by processes other than the lab's during a run,
/// the run is flagged: its throughput says more about the other work than about the agent.
const FOREIGN_WARN: f64 = 0.05;

/// CPU counters at one moment, in seconds.
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    at: Instant,
    /// All CPUs, busy (user, nice, system, irq, softirq, steal) from /proc/stat.
    busy: f64,
    /// utime+stime of the lab's long-lived processes (nginx, agent, receiver), this process,
    /// and the ksoftirqd threads (the network stack's deferred work, mostly the lab's
    /// traffic). With tick accounting, irq/softirq time is in the interrupted task's stime.
    tasks: f64,
    /// This process's reaped children (wrk, reaped when its run ends).
    children: f64,
}

impl CpuSnapshot {
    fn take(pids: &[u32]) -> CpuSnapshot {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut busy = 0.0;
        if let Ok(stat) = fs::read_to_string("/proc/stat")
            && let Some(line) = stat.lines().find(|l| l.starts_with("cpu "))
        {
            // user nice system idle iowait irq softirq steal guest guest_nice
            let v: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() >= 8 {
                busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz;
            }
        }
        let tasks = pids
            .iter()
            .copied()
            .chain([std::process::id()])
            .chain(ksoftirqd_pids())
            .filter_map(|p| cpu_seconds(p).ok())
            .sum();
        // SAFETY: plain system call on a local struct.
        let children = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(usage.ru_utime) + tv(usage.ru_stime)
        };
        CpuSnapshot {
            at: Instant::now(),
            busy,
            tasks,
            children,
        }
    }
}

/// CPU used during a run (from just before the load until the readings after it).
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// The lab's: wrk, nginx, agent, receiver, this process, ksoftirqd.
    lab_s: f64,
    /// What everything else on the machine used, as a share of all CPUs over the run.
    foreign_share: f64,
}

impl CpuUse {
    fn between(a: &CpuSnapshot, b: &CpuSnapshot) -> CpuUse {
        let lab_s = (b.tasks - a.tasks) + (b.children - a.children);
        let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = (b.at - a.at).as_secs_f64().max(1e-3);
        let foreign = ((b.busy - a.busy) - lab_s).max(0.0);
        CpuUse {
            lab_s,
            foreign_share: foreign / (wall * cpus),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Build, environment, interruption.

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds `package` in the release or debug profile and returns the directory of its
/// binary; honours CARGO_TARGET_DIR.
fn build(package: &str, release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    println!("== building {package} ({profile})");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--quiet", "-p", package])
        .current_dir(workspace_root());
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building {package} failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .or_else(|| std::env::var_os("CARGO_BUILD_TARGET_DIR"))
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                workspace_root().join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join(profile))
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{program} not found in PATH"))
}

/// wrk and nginx inherit it: each connection is a descriptor.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    // A second Ctrl-C leaves at once (the next lab start removes what is left behind).
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Ctrl-C / SIGTERM set a flag that every wait checks: the run fails with "interrupted" and
/// the guards (agent, receiver, wrk, lab) stop everything on the way out.
fn install_interrupt_handler() {
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, returning early with an error when interrupted.
fn pause(d: Duration) -> Result<()> {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        check_interrupted()?;
        thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
    }
    check_interrupted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_agent_summary() {
        let line = "hoptrace agent stopped: 1234 records, 2 undecodable, 5 lost to a full ring \
                    buffer; spans queued 1200, exported 1190, dropped (queue full) 7, failed \
                    (exporter) 3";
        let s = parse_agent_summary(line).unwrap();
        assert_eq!(
            (
                s.records,
                s.undecodable,
                s.ring_lost,
                s.queued,
                s.exported,
                s.queue_dropped,
                s.export_failed
            ),
            (1234, 2, 5, 1200, 1190, 7, 3)
        );
        assert_eq!(s.lost(), 15);
    }

    #[test]
    fn parses_the_receiver_summary() {
        let text = r#"{
 "by_hop": {
  "agent": 3,
  "persona": 1
 },
 "by_hop_kind_name": {
  "-|INTERNAL|odd \"name\"": 1,
  "agent|CLIENT|GET": 2,
  "agent|CLIENT|tcp.connect": 1,
  "persona|SERVER|tcp.accept": 1
 },
 "by_name": {
  "GET": 2
 },
 "exports": 2,
 "spans": 5
}
"#;
        let c = parse_receiver_summary(text).unwrap();
        assert_eq!(c.total, 5);
        assert_eq!(
            c.by_hop_kind_name[&("-".into(), "INTERNAL".into(), "odd \"name\"".into())],
            1
        );
        assert_eq!(Basis::Requests.spans(&c), (2, 0));
        assert_eq!(Basis::Connections.spans(&c), (1, 1));
    }

    #[test]
    fn parses_wrk() {
        let out = "Running 1s test\nBENCH requests=1000 duration_us=500000 p50_us=70 p99_us=900 \
                   max_us=1000 connect_err=0 read_err=1 write_err=0 status_err=0 timeout_err=0\n";
        let l = parse_wrk(out).unwrap();
        assert_eq!(
            (l.requests, l.p50_us, l.p99_us, l.errors[1]),
            (1000, 70, 900, 1)
        );
        assert!((l.rps - 2000.0).abs() < 1e-9);
    }

    #[test]
    fn http_method_names() {
        assert!(is_http_method_name("GET"));
        assert!(is_http_method_name("GET /"));
        assert!(!is_http_method_name("tcp.connect"));
    }
}
