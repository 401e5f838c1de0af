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
    /// delays in the fw) with the hoptrace agent printing what it sees.
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Demo { forward_ms, return_ms } => demo(forward_ms, return_ms),
        Task::Test { args } => test(&args),
        Task::Check => {
            let status = Command::new(build_hoptrace()?).arg("check").status()?;
            if !status.success() {
                bail!("hoptrace check failed");
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
    let status = cargo()
        .args(["test", "--workspace", "--exclude", "tracer-ebpf"])
        .args(extra)
        .env("HOPTRACE_BIN", &bin)
        .current_dir(workspace_root())
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

fn demo(forward_ms: u64, return_ms: u64) -> anyhow::Result<()> {
    let bin = build_hoptrace()?;
    println!("== starting the lab: agent 10.10.1.2 -> fw -> persona {PERSONA_IP} (nginx :80, python :8080)");
    let lab = Lab::start(LabConfig::default())?;
    lab.set_delay(Direction::Forward, Duration::from_millis(forward_ms))?;
    lab.set_delay(Direction::Return, Duration::from_millis(return_ms))?;
    println!("== fw delays: forward +{forward_ms} ms, return +{return_ms} ms (NFQUEUE holder in the fw namespace)");
    println!("== hoptrace agent observes the agent and persona namespaces, not the fw (it cannot speak)\n");
    let mut agent = AgentProcess::start(&bin, &lab)?;

    let requests = [
        ("nginx", lab.nginx_url("/")),
        ("nginx, 64 KiB body", lab.nginx_url("/big")),
        ("python http.server", lab.python_url("/")),
        ("nothing listening", format!("http://{PERSONA_IP}:81/")),
    ];
    for (what, url) in &requests {
        let output = lab
            .exec(Host::Agent, &["curl", "-sS", "-o", "/dev/null", "-w", "%{time_connect}", "--max-time", "3", url])
            .output()?;
        let connect = String::from_utf8_lossy(&output.stdout);
        let seen_by_curl = connect.trim().parse::<f64>().map_or("failed".to_string(), |s| format!("{:.3} ms", s * 1e3));
        println!("-- curl {url} ({what}): curl's own connect time {seen_by_curl}");
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(500));
    agent.stop();
    println!(
        "\nread it: tcp.connect (agent) lasts forward + return delay = {} ms, the SYN's round trip \
         through the fw;\ntcp.accept (persona) lasts the SYN-ACK's round trip = the same {} ms seen \
         from the other side;\nthe refused connect to :81 is an ERROR span with its reason.",
        forward_ms + return_ms,
        forward_ms + return_ms,
    );
    Ok(())
}

/// The agent as a child process sharing the terminal; stopped with SIGTERM so it flushes.
struct AgentProcess(Option<Child>);

impl AgentProcess {
    fn start(bin: &PathBuf, lab: &Lab) -> anyhow::Result<Self> {
        let child = Command::new(bin)
            .args(["agent", "--netns", lab.netns(Host::Agent).name(), "--netns", lab.netns(Host::Persona).name()])
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
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
