//! Runs the real `hoptrace` binary as the tests' agent: waits until it has attached, and stops it
//! with SIGTERM (then SIGKILL if it hangs) even when the test fails.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The line the agent logs once every probe is attached.
const READY: &str = "hoptrace agent ready";

/// Path of the hoptrace binary: $HOPTRACE_BIN, or the one cargo built next to the test binary
/// (target/<profile>/hoptrace; `./x test` builds it first).
pub fn hoptrace_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HOPTRACE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary has no target/<profile>/deps parent")?;
    let bin = profile_dir.join("hoptrace");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build -p hoptrace`, which ./x test does)",
            bin.display()
        );
    }
    Ok(bin)
}

pub struct Agent {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts the agent watching the lab's agent and persona namespaces (not fw: the middlebox
    /// stays uninstrumented), exporting over OTLP/gRPC to `receiver`.
    pub fn watching_lab(
        lab: &xtask::lab::Lab,
        receiver: &crate::receiver::OtlpReceiver,
    ) -> Result<Self> {
        Self::watching_lab_with(lab, receiver, &[])
    }

    /// [`Agent::watching_lab`] with more environment.
    pub fn watching_lab_with(
        lab: &xtask::lab::Lab,
        receiver: &crate::receiver::OtlpReceiver,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::watching_lab_through(&[], lab, receiver, env)
    }

    /// [`Agent::watching_lab_with`], started through `wrapper`: a command that execs the rest
    /// of its arguments (such as `setpriv`, restricting the agent's capabilities).
    pub fn watching_lab_through(
        wrapper: &[&str],
        lab: &xtask::lab::Lab,
        receiver: &crate::receiver::OtlpReceiver,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        use xtask::lab::Host;
        let endpoint = receiver.grpc_endpoint();
        let mut all = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        all.extend_from_slice(env);
        Self::start_command(
            wrapper,
            "agent",
            READY,
            &[
                "--netns",
                lab.netns(Host::Agent).name(),
                "--netns",
                lab.netns(Host::Persona).name(),
            ],
            &all,
        )
    }

    /// Starts `hoptrace agent ARGS` with extra environment and waits for it to be attached.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_command(&[], "agent", READY, args, env)
    }

    /// Starts `hoptrace correlate ARGS` and waits until it listens.
    pub fn start_correlator(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_command(&[], "correlate", "hoptrace correlate ready", args, env)
    }

    /// Starts `[WRAPPER...] hoptrace SUBCOMMAND ARGS` and waits for the line `ready` on its
    /// stderr. A wrapper must exec hoptrace, so that the child's pid is the agent's.
    fn start_command(
        wrapper: &[&str],
        subcommand: &str,
        ready: &'static str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let bin = hoptrace_bin()?;
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(bin);
                command
            }
            None => Command::new(bin),
        };
        command
            .arg(subcommand)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Tests must not inherit an exporter configuration from the environment.
        for key in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_SDK_DISABLED",
        ] {
            command.env_remove(key);
        }
        command.env("OTEL_BSP_SCHEDULE_DELAY", "100");
        command.envs(env.iter().copied());
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning hoptrace {subcommand}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = child.stderr.take().context("agent stderr")?;
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains(ready) {
                    let _ = ready_tx.send(());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let pipe = child.stdout.take().context("agent stdout")?;
        let sink = stdout.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let mut agent = Self {
            child: Some(child),
            stderr,
            stdout,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return Ok(agent);
            }
            if let Some(status) = agent.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "hoptrace {subcommand} exited with {status} before it was ready:\n{}",
                    agent.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "hoptrace {subcommand} not ready after 30 s:\n{}",
                    agent.stderr()
                );
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// http://ADDR/metrics as the agent logged it when serving metrics (`--metrics-addr`, port 0
    /// included).
    pub fn metrics_url(&self) -> Option<String> {
        self.stderr()
            .lines()
            .find_map(|l| l.split("serving Prometheus metrics at ").nth(1))
            .map(|url| url.trim().to_string())
    }

    /// The agent's process id (until it is stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as the OOM killer or a node failure would: no cleanup runs in the agent.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        child.kill()?;
        Ok(child.wait()?)
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns its status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                // Let the reader threads take the last lines.
                thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "hoptrace agent did not stop within 15 s of SIGTERM:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
