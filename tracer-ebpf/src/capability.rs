//! Tiny probes that `hoptrace check` loads, attaches and triggers to learn which hook kinds the
//! running kernel really allows (a config option or lockdown can forbid any of them). Each one
//! only counts its hits in `CHECK_HITS`; index numbers match `check::Probe` in user space.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{btf_tracepoint, classifier, fentry, kprobe, tracepoint, uprobe},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, TcContext, TracePointContext},
};

use crate::maps::CHECK_HITS;

#[inline(always)]
fn hit(index: u32) {
    if let Some(slot) = CHECK_HITS.get_ptr_mut(index) {
        // A racy add is fine: `check` only asks whether the probe ran at all.
        unsafe { *slot += 1 };
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_getppid")]
pub fn check_tracepoint(_ctx: TracePointContext) -> u32 {
    hit(0);
    0
}

#[btf_tracepoint(function = "sys_enter")]
pub fn check_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    hit(1);
    0
}

#[uprobe]
pub fn check_uprobe(_ctx: ProbeContext) -> u32 {
    hit(2);
    0
}

#[classifier]
pub fn check_tc(_ctx: TcContext) -> i32 {
    hit(3);
    TC_ACT_OK
}

#[kprobe]
pub fn check_kprobe(_ctx: ProbeContext) -> u32 {
    hit(4);
    0
}

#[fentry(function = "tcp_connect")]
pub fn check_fentry(_ctx: FEntryContext) -> i32 {
    hit(5);
    0
}
