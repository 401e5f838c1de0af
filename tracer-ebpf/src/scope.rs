//! What the agent was told to observe, decided in the kernel before anything reaches the ring
//! buffer. The switches are load-time globals: with a filter off, the verifier prunes its
//! branch and the check costs nothing.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use tracer_common::maps::KernelOffsets;

use crate::maps::{NETNS_FILTER, PID_FILTER, PORT_FILTER};

#[unsafe(no_mangle)]
static FILTER_NETNS: u32 = 0;
#[unsafe(no_mangle)]
static FILTER_PID: u32 = 0;
#[unsafe(no_mangle)]
static FILTER_PORT: u32 = 0;
/// The agent's own process id: its export connections must never be traced (a loop).
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::ZERO;

#[inline(always)]
fn enabled(flag: &u32) -> bool {
    // Volatile: the value is patched into .rodata at load time, after compilation.
    unsafe { core::ptr::read_volatile(flag) != 0 }
}

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

pub fn netns_filter_enabled() -> bool {
    enabled(&FILTER_NETNS)
}

pub fn netns_in_scope(netns_ino: u32) -> bool {
    !enabled(&FILTER_NETNS) || unsafe { NETNS_FILTER.get(&netns_ino) }.is_some()
}

pub fn pid_in_scope(tgid: u32) -> bool {
    let own = unsafe { core::ptr::read_volatile(&SELF_TGID) };
    tgid != own && (!enabled(&FILTER_PID) || unsafe { PID_FILTER.get(&tgid) }.is_some())
}

pub fn ports_in_scope(local: u16, remote: u16) -> bool {
    !enabled(&FILTER_PORT)
        || unsafe { PORT_FILTER.get(&local) }.is_some()
        || unsafe { PORT_FILTER.get(&remote) }.is_some()
}

/// Inode number of the network namespace of `sk` (a `struct sock *`).
#[inline(always)]
pub fn sock_netns(sk: u64, off: &KernelOffsets) -> Result<u32, ()> {
    let net: u64 = unsafe { bpf_probe_read_kernel((sk + off.sock_net as u64) as *const u64) }
        .map_err(|_| ())?;
    unsafe { bpf_probe_read_kernel((net + off.net_inum as u64) as *const u32) }.map_err(|_| ())
}
