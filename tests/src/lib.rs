pub mod agent;
pub mod bpf_objects;
pub mod capture;
pub mod cgroup;
pub mod clock_shift;
pub mod curl;
pub mod firewall;
pub mod kube_api;
pub mod personas;
pub mod prometheus;
pub mod receiver;
pub mod request_spans;

/// Timing checks of the end-to-end tests: the lab's delays are exact to well under this.
pub const TOLERANCE: std::time::Duration = std::time::Duration::from_millis(2);

/// Asserts `actual` is within [`TOLERANCE`] of `expected`.
#[track_caller]
pub fn assert_close(actual: std::time::Duration, expected: std::time::Duration, what: &str) {
    let diff = actual.abs_diff(expected);
    assert!(
        diff <= TOLERANCE,
        "{what}: {actual:?}, expected {expected:?} +- {TOLERANCE:?}"
    );
}
