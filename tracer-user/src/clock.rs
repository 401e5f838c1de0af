//! Kernel timestamps (CLOCK_MONOTONIC, what `bpf_ktime_get_ns` returns) to wall-clock time.
//!
//! The offset between the two clocks moves when NTP steps or slews the wall clock, so the agent
//! re-samples it periodically. Durations never depend on it: they are differences of kernel
//! timestamps, exact to the nanosecond whatever the wall clock does.

use opentelemetry::KeyValue;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns.
    realtime_minus_monotonic_ns: i128,
    /// Half the width of the window the two clocks were read in: how wrong the offset may be.
    pub uncertainty_ns: u64,
}

impl Clock {
    /// Samples both clocks a few times and keeps the tightest bracket.
    pub fn sample() -> Self {
        let mut best: Option<Self> = None;
        for _ in 0..5 {
            let before = now(libc::CLOCK_MONOTONIC);
            let real = now(libc::CLOCK_REALTIME);
            let after = now(libc::CLOCK_MONOTONIC);
            let window = after.saturating_sub(before);
            let mid = before as i128 + (window / 2) as i128;
            let candidate = Self {
                realtime_minus_monotonic_ns: real as i128 - mid,
                uncertainty_ns: window / 2,
            };
            if best.is_none_or(|b| candidate.uncertainty_ns < b.uncertainty_ns) {
                best = Some(candidate);
            }
        }
        best.expect("sampled at least once")
    }

    /// Times that already are Unix time (the correlator's, received over OTLP).
    pub fn unix() -> Self {
        Self::with_offset(0)
    }

    pub fn with_offset(realtime_minus_monotonic_ns: i128) -> Self {
        Self {
            realtime_minus_monotonic_ns,
            uncertainty_ns: 0,
        }
    }

    /// `monotonic_ns` as ns since the Unix epoch (0 before it).
    pub fn to_unix_ns(self, monotonic_ns: u64) -> u64 {
        let unix_ns = (monotonic_ns as i128 + self.realtime_minus_monotonic_ns).max(0);
        u64::try_from(unix_ns).unwrap_or(u64::MAX)
    }
}

/// What the kernel says about its wall clock's discipline (NTP, PTP via phc2sys, chrony), and
/// which kernel clock it is: exported as resource attributes so that a correlator joining two
/// hosts' spans knows whether their times can be compared and how far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockState {
    /// The kernel's random id of this boot: two agents with the same one read the same clocks.
    pub boot_id: Option<String>,
    /// The kernel considers the clock synchronized (adjtimex: no STA_UNSYNC, not TIME_ERROR).
    pub synchronized: bool,
    /// Estimated and maximum error of the wall clock, ns (adjtimex esterror / maxerror).
    pub esterror_ns: u64,
    pub maxerror_ns: u64,
}

impl ClockState {
    /// Reads adjtimex(2) without changing anything (modes = 0, allowed unprivileged).
    pub fn read() -> Self {
        // SAFETY: an all-zero timex is valid input; modes = 0 only reads.
        let mut timex: libc::timex = unsafe { std::mem::zeroed() };
        // SAFETY: timex is a valid, writable timex.
        let state = unsafe { libc::adjtimex(&mut timex) };
        let synchronized =
            state != -1 && state != libc::TIME_ERROR && timex.status & libc::STA_UNSYNC == 0;
        Self {
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|id| id.trim().to_string())
                .filter(|id| !id.is_empty()),
            synchronized,
            esterror_ns: u64::try_from(timex.esterror).unwrap_or(0) * 1000,
            maxerror_ns: u64::try_from(timex.maxerror).unwrap_or(0) * 1000,
        }
    }

    /// As `hoptrace.clock.*` resource attributes (keys shared with the correlator).
    pub fn attributes(&self) -> Vec<KeyValue> {
        let mut attributes = vec![
            KeyValue::new(attr::SYNCHRONIZED, self.synchronized),
            KeyValue::new(attr::ESTERROR_NS, self.esterror_ns as i64),
            KeyValue::new(attr::MAXERROR_NS, self.maxerror_ns as i64),
        ];
        if let Some(id) = &self.boot_id {
            attributes.push(KeyValue::new(attr::BOOT_ID, id.clone()));
        }
        attributes
    }
}

/// Resource attribute keys of the clock state.
pub mod attr {
    pub const BOOT_ID: &str = "hoptrace.clock.boot_id";
    pub const SYNCHRONIZED: &str = "hoptrace.clock.synchronized";
    pub const ESTERROR_NS: &str = "hoptrace.clock.esterror_ns";
    pub const MAXERROR_NS: &str = "hoptrace.clock.maxerror_ns";
}

fn now(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC now, in ns: the kernel timestamps' time base.
pub fn monotonic_now_ns() -> u64 {
    now(libc::CLOCK_MONOTONIC)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;

    #[test]
    fn maps_monotonic_to_wall_clock_and_keeps_differences() {
        let clock = Clock::with_offset(1_700_000_000_000_000_000);
        let a = clock.to_unix_ns(5_000);
        let b = clock.to_unix_ns(25_000);
        assert_eq!(b - a, 20_000);
        assert_eq!(a, 1_700_000_000_000_005_000);
        assert_eq!(
            Clock::with_offset(-10_000).to_unix_ns(5_000),
            0,
            "before the epoch"
        );
    }

    #[test]
    fn a_sample_agrees_with_the_system_clock() {
        let clock = Clock::sample();
        let mapped = UNIX_EPOCH + Duration::from_nanos(clock.to_unix_ns(monotonic_now_ns()));
        let drift = SystemTime::now().duration_since(mapped).unwrap_or_default();
        assert!(drift < Duration::from_millis(50), "{drift:?}");
        assert!(clock.uncertainty_ns < 1_000_000);
    }

    #[test]
    fn the_clock_state_names_this_boot_and_a_bounded_error() {
        let state = ClockState::read();
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert_eq!(state.boot_id.as_deref(), Some(boot_id.trim()));
        // The kernel caps maxerror at NTP_PHASE_LIMIT (16 s), esterror below it.
        assert!(state.maxerror_ns <= 16_000_000_000, "{state:?}");
        assert!(state.esterror_ns <= state.maxerror_ns.max(16_000_000_000));
        let keys: Vec<_> = state
            .attributes()
            .iter()
            .map(|kv| kv.key.as_str().to_owned())
            .collect();
        assert!(
            keys.iter().any(|k| k == attr::SYNCHRONIZED) && keys.iter().any(|k| k == attr::BOOT_ID)
        );
    }
}
