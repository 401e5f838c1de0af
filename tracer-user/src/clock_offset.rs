//! The offset between two hosts' clocks, from the requests that crossed between them.
//!
//! For a request that left the agent host at `a_out` (agent clock), reached the persona host at
//! `p_in` (persona clock), whose response left at `p_out` and came back at `a_in`, and an
//! offset `theta` that turns persona times into agent times, both one-way delays are
//! non-negative: `p_in + theta - a_out >= 0` and `a_in - p_out - theta >= 0`, so
//! `a_out - p_in <= theta <= a_in - p_out`. Every two-sided request bounds theta; the tightest
//! bounds over a window come from the requests with the least delay in each direction
//! (minimum-delay filtering, as NTP's clock filter does). The estimate is the middle of the
//! bounds and its uncertainty half their width: the true offset lies inside as long as the
//! clocks did not drift or step within the window. What the bounds cannot tell is how a
//! constant path asymmetry splits: with a firewall adding 20 ms forward and 5 ms back, the
//! bounds stay 25 ms wide whatever the traffic, and so does the stated uncertainty.

use std::collections::VecDeque;

/// What one host pair's offset is known to be, in ns (add to persona times for agent times).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub offset_ns: i64,
    pub uncertainty_ns: u64,
    /// Requests it stands on.
    pub samples: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    Used,
    /// Older than the window (a request hours late): the clocks may have moved since, so it
    /// neither tightens nor resets the current bounds.
    Stale,
    /// It contradicts every request in the window: the clocks stepped (or drifted past the
    /// bounds). The window restarts from it.
    Step,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at_ns: u64,
    lower_ns: i64,
    upper_ns: i64,
}

#[derive(Debug)]
pub struct OffsetEstimator {
    samples: VecDeque<Sample>,
    window_ns: u64,
    capacity: usize,
    newest_ns: u64,
}

impl OffsetEstimator {
    /// Keeps the requests of the last `window_ns` (agent time), at most `capacity` of them.
    pub fn new(window_ns: u64, capacity: usize) -> Self {
        Self {
            samples: VecDeque::new(),
            window_ns,
            capacity: capacity.max(1),
            newest_ns: 0,
        }
    }

    /// One two-sided request's bounds `lower_ns <= theta <= upper_ns`, taken at agent time
    /// `at_ns`. The caller checked `lower_ns <= upper_ns`.
    pub fn add(&mut self, at_ns: u64, lower_ns: i64, upper_ns: i64) -> Added {
        if at_ns.saturating_add(self.window_ns) < self.newest_ns {
            return Added::Stale;
        }
        let sample = Sample {
            at_ns,
            lower_ns,
            upper_ns,
        };
        let mut outcome = Added::Used;
        if let Some((lower, upper)) = self.bounds()
            && (lower_ns > upper || upper_ns < lower)
        {
            if at_ns < self.newest_ns {
                // Late and contradicting the newer requests: from before a step.
                return Added::Stale;
            }
            self.samples.clear();
            outcome = Added::Step;
        }
        self.newest_ns = self.newest_ns.max(at_ns);
        self.samples.push_back(sample);
        let oldest = self.newest_ns.saturating_sub(self.window_ns);
        while self.samples.len() > self.capacity
            || self.samples.front().is_some_and(|s| s.at_ns < oldest)
        {
            self.samples.pop_front();
        }
        outcome
    }

    /// The intersection of the window's bounds.
    fn bounds(&self) -> Option<(i64, i64)> {
        let lower = self.samples.iter().map(|s| s.lower_ns).max()?;
        let upper = self.samples.iter().map(|s| s.upper_ns).min()?;
        Some((lower, upper))
    }

    /// The middle of the bounds, narrowed by `prior_ns` (|theta| <= prior: both clocks
    /// synchronized within their kernel's maximum error) when the two agree.
    pub fn estimate(&self, prior_ns: Option<u64>) -> Option<Estimate> {
        let (mut lower, mut upper) = self.bounds()?;
        if let Some(prior) = prior_ns.map(|p| i64::try_from(p).unwrap_or(i64::MAX)) {
            let (l, u) = (lower.max(-prior), upper.min(prior));
            if l <= u {
                (lower, upper) = (l, u);
            }
        }
        let width = (upper as i128 - lower as i128).max(0);
        Some(Estimate {
            offset_ns: (lower as i128 + width / 2) as i64,
            uncertainty_ns: u64::try_from((width + 1) / 2).unwrap_or(u64::MAX),
            samples: self.samples.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000_000;

    /// A request at agent time `at` with one-way delays `forward` and `back` between hosts
    /// whose offset is `theta`, persona time spent `inside`: its bounds.
    fn request(at: i64, theta: i64, forward: i64, inside: i64, back: i64) -> (u64, i64, i64) {
        let a_out = at;
        let p_in = a_out + forward - theta;
        let p_out = p_in + inside;
        let a_in = p_out + theta + back;
        (a_out as u64, a_out - p_in, a_in - p_out)
    }

    fn covers(estimate: Estimate, theta: i64) -> bool {
        (estimate.offset_ns - theta).unsigned_abs() <= estimate.uncertainty_ns
    }

    #[test]
    fn the_least_delayed_requests_pin_a_known_artificial_offset() {
        let theta = 3_600_123_456_789; // an hour and change between the two clocks
        let mut estimator = OffsetEstimator::new(60_000 * MS as u64, 1024);
        // Delays vary 0.2 .. 5 ms each way; a few requests see both minima.
        for i in 0..200 {
            let forward = 200_000 + (i * 7919 % 4_800) * 1_000;
            let back = 200_000 + (i * 104_729 % 4_800) * 1_000;
            let (at, lo, hi) = request(i * MS, theta, forward, 300_000, back);
            assert_eq!(estimator.add(at, lo, hi), Added::Used);
        }
        let estimate = estimator.estimate(None).unwrap();
        assert!(covers(estimate, theta), "{estimate:?}");
        // Bounded by the smallest forward + return delay (0.2 + 0.2 ms), not the largest.
        assert!(estimate.uncertainty_ns <= 200_000, "{estimate:?}");
        assert_eq!(estimate.samples, 200);
    }

    #[test]
    fn a_constant_asymmetry_stays_inside_a_wide_uncertainty() {
        let theta = -42 * MS;
        let mut estimator = OffsetEstimator::new(60_000 * MS as u64, 1024);
        for i in 0..50 {
            let (at, lo, hi) = request(i * MS, theta, 20 * MS, MS, 5 * MS);
            estimator.add(at, lo, hi);
        }
        let estimate = estimator.estimate(None).unwrap();
        assert!(covers(estimate, theta));
        assert_eq!(estimate.uncertainty_ns, 12_500_000);
        // Synchronized clocks (each within 1 ms of UTC) narrow it, and still cover the truth
        // when it lies within them.
        let mut synced = OffsetEstimator::new(60_000 * MS as u64, 1024);
        let (at, lo, hi) = request(0, 1_500_000, 20 * MS, MS, 5 * MS);
        synced.add(at, lo, hi);
        let narrowed = synced.estimate(Some(2 * MS as u64)).unwrap();
        assert!(covers(narrowed, 1_500_000) && narrowed.uncertainty_ns <= 2 * MS as u64);
    }

    #[test]
    fn out_of_order_and_hours_late_requests_do_not_move_the_estimate_wrongly() {
        const HOURS_10: i64 = 36_000_000 * MS;
        let theta = 7 * MS;
        let mut estimator = OffsetEstimator::new(60_000 * MS as u64, 1024);
        let mut requests: Vec<_> = (0..100)
            .map(|i| request(HOURS_10 + i * MS, theta, MS + i * 1000, 100, MS))
            .collect();
        requests.reverse();
        for (at, lo, hi) in requests {
            assert_eq!(estimator.add(at, lo, hi), Added::Used);
        }
        let before = estimator.estimate(None).unwrap();
        assert!(covers(before, theta));
        // From two hours earlier, when the clocks were 30 ms further apart.
        let (at, lo, hi) = request(HOURS_10 - 7_200_000 * MS, theta + 30 * MS, MS, 100, MS);
        assert_eq!(estimator.add(at, lo, hi), Added::Stale);
        assert_eq!(estimator.estimate(None).unwrap(), before);
    }

    #[test]
    fn a_clock_step_restarts_the_window_and_the_new_offset_is_covered() {
        let mut estimator = OffsetEstimator::new(60_000 * MS as u64, 1024);
        for i in 0..20 {
            let (at, lo, hi) = request(i * MS, 5 * MS, MS, 100, MS);
            estimator.add(at, lo, hi);
        }
        // The persona host's clock steps back 40 ms.
        let stepped = 45 * MS;
        let (at, lo, hi) = request(20 * MS, stepped, MS, 100, MS);
        assert_eq!(estimator.add(at, lo, hi), Added::Step);
        let after = estimator.estimate(None).unwrap();
        assert!(covers(after, stepped), "{after:?}");
        assert_eq!(after.samples, 1);
        // A late request from before the step contradicts: dropped, not a step back.
        let (at, lo, hi) = request(19 * MS, 5 * MS, MS, 100, MS);
        assert_eq!(estimator.add(at, lo, hi), Added::Stale);
        assert!(covers(estimator.estimate(None).unwrap(), stepped));
    }

    #[test]
    fn the_window_is_bounded() {
        let mut estimator = OffsetEstimator::new(10 * MS as u64, 8);
        for i in 0..1000 {
            let (at, lo, hi) = request(i * MS / 10, 0, MS, 100, MS);
            estimator.add(at, lo, hi);
        }
        assert_eq!(estimator.samples.len(), 8);
        assert!(estimator.estimate(None).is_some());
    }
}
