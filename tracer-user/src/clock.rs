//! Kernel timestamps (CLOCK_MONOTONIC, what `bpf_ktime_get_ns` returns) to wall-clock time.
//!
//! The offset between the two clocks moves when NTP steps or slews the wall clock, so the agent
//! re-samples it periodically. Durations never depend on it: they are differences of kernel
//! timestamps, exact to the nanosecond whatever the wall clock does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

    #[cfg(test)]
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

    pub fn to_system_time(self, monotonic_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.to_unix_ns(monotonic_ns))
    }
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
    use super::*;

    #[test]
    fn maps_monotonic_to_wall_clock_and_keeps_differences() {
        let clock = Clock::with_offset(1_700_000_000_000_000_000);
        let a = clock.to_system_time(5_000);
        let b = clock.to_system_time(25_000);
        assert_eq!(b.duration_since(a).unwrap(), Duration::from_micros(20));
        assert_eq!(
            a.duration_since(UNIX_EPOCH).unwrap().as_nanos(),
            1_700_000_000_000_005_000
        );
    }

    #[test]
    fn a_sample_agrees_with_the_system_clock() {
        let clock = Clock::sample();
        let mapped = clock.to_system_time(monotonic_now_ns());
        let drift = SystemTime::now().duration_since(mapped).unwrap_or_default();
        assert!(drift < Duration::from_millis(50), "{drift:?}");
        assert!(clock.uncertainty_ns < 1_000_000);
    }
}
