//! Kernel features that decide, at load time, which branches of the eBPF programs exist (a
//! helper the kernel lacks makes the verifier reject every program that calls it, even on a
//! path that never runs, unless a read-only global lets the verifier drop that path).
//!
//! Go crypto/tls plaintext is joined to its socket in the syscall programs through
//! `bpf_task_pt_regs` (Linux 5.15) on `bpf_get_current_task_btf` (5.11): on an older kernel
//! that branch is pruned (`GO_TLS_JOIN` = 0), the syscall programs load, and Go TLS plaintext
//! is unavailable, said by `hoptrace check` and the agent's startup log.

use std::sync::OnceLock;

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
};

/// For testing: set to 1 to behave as on a kernel without `bpf_task_pt_regs` (before 5.15),
/// so that the old-kernel path runs on a new kernel.
pub const FORCE_NO_TASK_PT_REGS: &str = "HOPTRACE_TEST_NO_TASK_PT_REGS";

/// The helpers the Go TLS join needs, with the kernel release that added them.
const GO_TLS_HELPERS: [(BpfHelper, &str, &str); 2] = [
    (
        BpfHelper::BPF_FUNC_get_current_task_btf,
        "bpf_get_current_task_btf",
        "5.11",
    ),
    (BpfHelper::BPF_FUNC_task_pt_regs, "bpf_task_pt_regs", "5.15"),
];

/// Whether the syscall programs can join Go crypto/tls calls to their sockets, or why not.
/// Probed once (loading a two-instruction tracepoint program per helper).
pub fn go_tls_join() -> &'static Result<(), String> {
    static PROBED: OnceLock<Result<(), String>> = OnceLock::new();
    PROBED.get_or_init(|| {
        if std::env::var(FORCE_NO_TASK_PT_REGS).is_ok_and(|v| v.trim() == "1") {
            return Err(format!(
                "bpf_task_pt_regs treated as missing ({FORCE_NO_TASK_PT_REGS}=1, for testing)"
            ));
        }
        for (helper, name, since) in GO_TLS_HELPERS {
            match is_helper_supported(ProgramType::TracePoint, helper) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(format!(
                        "the kernel lacks {name} for tracepoint programs (Linux {since}+)"
                    ));
                }
                Err(e) => return Err(format!("probing {name} failed: {e}")),
            }
        }
        Ok(())
    })
}

/// What Go TLS plaintext becomes without the join, for logs and `hoptrace check`.
pub fn go_tls_unavailable(why: &str) -> String {
    format!("Go crypto/tls plaintext unavailable: {why}; everything else works")
}
