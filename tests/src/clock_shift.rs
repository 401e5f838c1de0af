//! A second host's clock for the correlator tests. Both agents of the lab read this machine's
//! kernel clock, so the correlator would measure the firewall's split on one clock; exporting
//! the persona-side agent through [`ClockShiftRelay`] (`tests/clock_shift_relay.py`, a real
//! OTLP/gRPC relay) puts its spans on another "host" whose clock is off by a known amount, and
//! the correlator has to estimate that offset from the requests as it would across machines.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::receiver::ReceivedSpan;

/// A running `tests/clock_shift_relay.py`; dropping it kills the process.
pub struct ClockShiftRelay {
    child: Child,
    /// Held open: the script exits when its stdin closes, so it never outlives this process
    /// even if `drop` does not run.
    _stdin: ChildStdin,
    port: u16,
    boot_id: String,
}

impl ClockShiftRelay {
    /// Relays OTLP/gRPC to `forward_to` (`host:port`) as if the sender's host clock read
    /// `offset_ns` behind the receiver's: agent time = persona time + `offset_ns`, the sign of
    /// the correlator's `hoptrace.clock.offset_ns`. Waits until it listens.
    pub fn start(forward_to: &str, offset_ns: i64) -> Result<Self> {
        // One fake kernel per relay: each stands for a host of its own.
        static RELAYS: AtomicU64 = AtomicU64::new(0);
        let boot_id = format!(
            "clock-shift-relay-{}-{}",
            std::process::id(),
            RELAYS.fetch_add(1, Ordering::Relaxed)
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clock_shift_relay.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--forward-to", forward_to])
            .args(["--shift-ns", &(-offset_ns).to_string()])
            .args(["--boot-id", &boot_id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting tests/clock_shift_relay.py")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        // From here on, Drop kills it on every error path.
        let mut relay = Self {
            child,
            _stdin: stdin,
            port: 0,
            boot_id,
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
            let _ = tx.send(lines.next());
            // Drain the rest, so the script never blocks on a full pipe.
            lines.for_each(drop);
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(line)) => line,
            _ => bail!("the clock shift relay did not start (its stderr is the test's)"),
        };
        relay.port = line
            .strip_prefix("ready grpc=")
            .and_then(|port| port.trim().parse().ok())
            .with_context(|| format!("the clock shift relay said {line:?}"))?;
        Ok(relay)
    }

    /// Its OTLP/gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The boot id it gives the relayed spans' resource: the other host's kernel.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }
}

impl Drop for ClockShiftRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a cross-host firewall span says about the clock offset it split the request with.
#[derive(Clone, Copy, Debug)]
pub struct OffsetSplit {
    pub offset_ns: i64,
    pub uncertainty_ns: i64,
    pub samples: i64,
    pub forward_ns: i64,
    pub return_ns: i64,
}

impl OffsetSplit {
    /// From a `firewall` span; panics if it lacks the cross-host attributes.
    pub fn of(firewall: &ReceivedSpan) -> Self {
        let attr = |key| {
            firewall
                .attr_i64(key)
                .unwrap_or_else(|| panic!("{key} missing: {firewall:#?}"))
        };
        Self {
            offset_ns: attr("hoptrace.clock.offset_ns"),
            uncertainty_ns: attr("hoptrace.clock.offset_uncertainty_ns"),
            samples: attr("hoptrace.clock.offset_samples"),
            forward_ns: attr("hoptrace.firewall.forward_ns"),
            return_ns: attr("hoptrace.firewall.return_ns"),
        }
    }

    /// |estimate - the true offset|.
    pub fn error_ns(&self, true_offset_ns: i64) -> u64 {
        self.offset_ns.abs_diff(true_offset_ns)
    }

    /// Whether the true offset lies within the stated uncertainty.
    pub fn covers(&self, true_offset_ns: i64) -> bool {
        self.error_ns(true_offset_ns) <= self.uncertainty_ns.unsigned_abs()
    }
}
