//! `cargo xtask` (through `./x`, which installs what is missing first): the demo, the test suite
//! and the lab, for people and for CI. Nothing here is needed to build hoptrace itself.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use xtask::lab::{Direction, Host, Lab, LabConfig, PERSONA_IP};

#[derive(Parser)]
#[command(name = "xtask", about = "hoptrace's demo, tests and lab")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The lab (agent -> fw -> persona namespaces, nginx and a Python server, per-direction
    /// delays and TLS interception in the fw) with the hoptrace agent printing what it sees.
    Demo {
        /// Delay added to packets from the agent towards the persona, in ms.
        #[arg(long, default_value_t = 20)]
        forward_ms: u64,
        /// Delay added to packets from the persona back to the agent, in ms.
        #[arg(long, default_value_t = 5)]
        return_ms: u64,
    },
    /// The whole test suite: unit, property and end-to-end tests (what CI runs).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// `hoptrace check` on this machine.
    Check,
    /// The tracer's overhead: wrk against nginx in the lab, alternating runs without and with
    /// the agent; prints ratios and PASS/FAIL against the targets.
    Bench(xtask::bench::BenchArgs),
    /// Firewall attribution against packet captures on the fw's interfaces: two agents and
    /// the correlator, L3 forwarder and haproxy, asymmetric delays; prints |error| median/p99
    /// of forward, return and total, and fails when the target is missed.
    Accuracy,
    /// The benchmark's span-counting OTLP/gRPC receiver, which `bench` spawns.
    #[command(hide = true)]
    OtlpCountReceiver {
        /// The JSON summary, rewritten every second and at exit.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Demo {
            forward_ms,
            return_ms,
        } => demo(forward_ms, return_ms),
        Task::Test { args } => test(&args),
        Task::Check => {
            let status = Command::new(build_hoptrace()?).arg("check").status()?;
            if !status.success() {
                bail!("hoptrace check failed");
            }
            Ok(())
        }
        Task::Bench(args) => xtask::bench::run(args),
        Task::OtlpCountReceiver { out } => xtask::otlp_count::run(&out),
        // The measurement is the ignored end-to-end test tests/tests/accuracy.rs: it shares
        // the tests' harness (agents, correlator, receiver, haproxy).
        Task::Accuracy => {
            let bin = build_hoptrace()?;
            let status = cargo()
                .args(["test", "-p", "hoptrace-tests", "--test", "accuracy", "--"])
                // One measurement at a time: they share the 2 cores and time to the microsecond.
                .args(["--ignored", "--nocapture", "--test-threads", "1"])
                .env("HOPTRACE_BIN", &bin)
                .current_dir(workspace_root())
                .status()
                .context("running cargo test")?;
            if !status.success() {
                bail!("accuracy target missed (or the benchmark failed)");
            }
            Ok(())
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the agent (debug profile, shared with the tests) and returns its path.
fn build_hoptrace() -> anyhow::Result<PathBuf> {
    let status = cargo()
        .args(["build", "--quiet", "-p", "hoptrace"])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building hoptrace failed");
    }
    Ok(workspace_root().join("target/debug/hoptrace"))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let bin = build_hoptrace()?;
    // Doc tests are left out: there are none, and their empty "0 passed" summaries would close
    // the output as if nothing had run.
    let mut child = cargo()
        .args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "tracer-ebpf",
            "--lib",
            "--bins",
            "--tests",
        ])
        .args(extra)
        .env("HOPTRACE_BIN", &bin)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = test_result_counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    // One closing line for the whole suite, across every test binary.
    println!("\nhoptrace: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// `test result: ok. 59 passed; 0 failed; ...` -> (59, 0).
fn test_result_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let mut numbers = rest.split(';').filter_map(|part| {
        let mut words = part.split_whitespace().rev();
        let (label, count) = (words.next()?, words.next()?);
        Some((label, count.parse::<u64>().ok()?))
    });
    let (_, passed) = numbers.next().filter(|(label, _)| *label == "passed")?;
    let (_, failed) = numbers.next().filter(|(label, _)| *label == "failed")?;
    Some((passed, failed))
}

fn demo(forward_ms: u64, return_ms: u64) -> anyhow::Result<()> {
    let bin = build_hoptrace()?;
    println!(
        "== starting the lab: agent 10.10.1.2 -> fw -> persona {PERSONA_IP} (nginx :80, python :8080)"
    );
    let lab = Lab::start(LabConfig::default())?;
    lab.set_delay(Direction::Forward, Duration::from_millis(forward_ms))?;
    lab.set_delay(Direction::Return, Duration::from_millis(return_ms))?;
    println!(
        "== fw delays: forward +{forward_ms} ms, return +{return_ms} ms (NFQUEUE holder in the fw namespace)"
    );
    let interception = lab.start_tls_interception()?;
    println!(
        "== fw intercepts TLS to {PERSONA_IP}:443: haproxy presents a certificate forged by the fw's \
         CA (which the agent trusts) and opens its own TLS connection to the persona"
    );
    println!(
        "== hoptrace agent observes the agent and persona namespaces, not the fw (it cannot speak)\n"
    );
    let mut agent = AgentProcess::start(&bin, &lab)?;

    // As an SDK-instrumented agent would: each request carries the caller's trace context.
    // Trace ids differ in their first digits, which the terminal shows.
    let traceparent = |n: u32| {
        format!(
            "traceparent: 00-{:08x}77b34da6a3ce929d0e0e4736-{:016x}-01",
            0x4bf9_2f30 + n,
            0xa3ce_929d_0000_0000_u64 | u64::from(n)
        )
    };
    let ca = interception.ca().to_string_lossy().into_owned();
    let requests = [
        (
            "nginx, two requests on one keep-alive connection",
            vec![lab.nginx_url("/"), lab.nginx_url("/big")],
            vec![],
        ),
        (
            "HTTPS through the fw's TLS interception, two requests on one connection",
            vec![lab.nginx_https_url("/"), lab.nginx_https_url("/")],
            vec!["--cacert", ca.as_str()],
        ),
        ("python http.server", vec![lab.python_url("/")], vec![]),
        (
            "nothing listening",
            vec![format!("http://{PERSONA_IP}:81/")],
            vec![],
        ),
    ];
    for (n, (what, urls, options)) in requests.iter().enumerate() {
        let header = traceparent(n as u32 + 1);
        let mut argv = vec![
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total} ",
            "--max-time",
            "3",
            "-H",
            &header,
        ];
        argv.extend(options);
        argv.extend(urls.iter().map(String::as_str));
        let output = lab.exec(Host::Agent, &argv).output()?;
        let totals: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|t| t.parse::<f64>().ok())
            .map(|s| format!("{:.3} ms", s * 1e3))
            .collect();
        println!(
            "-- curl {} ({what}) with {header}: curl's own total {}",
            urls.join(" "),
            if totals.is_empty() {
                "failed".into()
            } else {
                totals.join(", ")
            }
        );
        thread::sleep(Duration::from_millis(300));
    }
    thread::sleep(Duration::from_millis(500));
    agent.stop();
    drop(interception);
    let rtt = forward_ms + return_ms;
    println!(
        "\nread it (spans of one request share its trace id, the first column after the time):\n\
         - GET ... agent: from curl handing the request to its kernel to the response reaching curl;\n\
         \x20 the first request of a connection starts at the connect, its tcp.connect child lasts {rtt} ms\n\
         \x20 (forward {forward_ms} + return {return_ms} through the fw);\n\
         - GET ... persona: from the request reaching the persona's TCP to the response queued, split into\n\
         \x20 kernel receive / application / kernel send; agent minus persona = {rtt} ms per round trip in\n\
         \x20 the network and the fw;\n\
         - tcp.accept persona: the SYN-ACK's round trip seen from the server, {rtt} ms;\n\
         - firewall: both sides joined by trace context; firewall.forward = request leaving the\n\
         \x20 agent's NIC -> reaching the persona's ({forward_ms} ms), firewall.return = response leaving\n\
         \x20 the persona's NIC -> reaching the agent's ({return_ms} ms); agent - persona is all the time\n\
         \x20 spent outside the persona (with the connect and the body's transfer);\n\
         - HTTPS through the interception: two TCP and two TLS connections. The agent's tcp.connect\n\
         \x20 and tls.handshake time its leg to the fw (haproxy answers the SYN and the ClientHello:\n\
         \x20 {forward_ms} ms forward delay, no return delay); the persona's tcp.accept and tls.handshake,\n\
         \x20 from the fw's address 10.10.2.1, time haproxy's own leg ({return_ms} ms return delay only);\n\
         \x20 the firewall spans are joined by trace context (mode proxy). haproxy opens its leg once it\n\
         \x20 has the first request: that request's firewall.forward holds the {forward_ms} ms plus the\n\
         \x20 fw's connect and handshake to the persona; the second one reuses the leg;\n\
         - the connect to :81 is an ERROR span: refused."
    );
    Ok(())
}

/// The agent as a child process sharing the terminal; stopped with SIGTERM so it flushes.
struct AgentProcess(Option<Child>);

impl AgentProcess {
    fn start(bin: &PathBuf, lab: &Lab) -> anyhow::Result<Self> {
        let child = Command::new(bin)
            .args([
                "agent",
                "--netns",
                lab.netns(Host::Agent).name(),
                "--netns",
                lab.netns(Host::Persona).name(),
            ])
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            // The demo shows the persona's kernel / application split as spans of their own.
            .env("HOPTRACE_LAYER_SPANS", "true")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting hoptrace agent")?;
        // Attaching takes well under a second; the agent logs when it is ready.
        thread::sleep(Duration::from_millis(1500));
        Ok(Self(Some(child)))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.0.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::test_result_counts;

    #[test]
    fn reads_cargo_test_summaries() {
        let line = "test result: ok. 59 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.44s";
        assert_eq!(test_result_counts(line), Some((59, 0)));
        assert_eq!(
            test_result_counts("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(test_result_counts("running 4 tests"), None);
    }
}
