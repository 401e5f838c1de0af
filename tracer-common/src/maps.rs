//! Names of maps and load-time globals, defined once for both sides (the eBPF crate uses the
//! same identifiers as `static`s; user space looks them up by these strings).

/// Ring buffer of [`crate::conn::ConnEvent`] records (kernel -> user).
pub const EVENTS: &str = "EVENTS";
/// Per-CPU array of counters indexed by [`Counter`].
pub const COUNTERS: &str = "COUNTERS";
/// Hash set of network-namespace inode numbers to observe (key u32, value u8).
pub const NETNS_FILTER: &str = "NETNS_FILTER";
/// Hash set of process ids (tgid) to observe (key u32, value u8).
pub const PID_FILTER: &str = "PID_FILTER";
/// Hash set of TCP ports, local or remote, to observe (key u16 host order, value u8).
pub const PORT_FILTER: &str = "PORT_FILTER";

/// Load-time globals (set with `EbpfLoader::override_global`; the verifier prunes disabled
/// branches). Each filter flag is a `u32`, 0 = off, 1 = on.
pub mod globals {
    pub const FILTER_NETNS: &str = "FILTER_NETNS";
    pub const FILTER_PID: &str = "FILTER_PID";
    pub const FILTER_PORT: &str = "FILTER_PORT";
    /// Byte offsets into kernel structures, resolved from the running kernel's BTF by user
    /// space (CO-RE done by the loader, since Rust eBPF has no field relocations yet).
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
}

/// Byte offsets into kernel structures that the probes read with `bpf_probe_read_kernel`.
/// Resolved by user space from `/sys/kernel/btf/vmlinux` before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock` -> `__sk_common.skc_net` (a `possible_net_t` whose first member is the
    /// `struct net *`).
    pub sock_net: u32,
    /// `struct net` -> `ns.inum`: the namespace's inode number, as `stat /run/netns/X` shows.
    pub net_inum: u32,
    /// `struct sock` -> `sk_err` (int): the pending socket error (ECONNREFUSED, ETIMEDOUT, ...).
    pub sock_err: u32,
    /// `struct tcp_sock` -> `srtt_us` (u32): smoothed RTT in microseconds, shifted left by 3.
    pub tcp_srtt_us: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 16);

/// Indices into the [`COUNTERS`] per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Events lost because the ring buffer was full.
    RingbufFull = 0,
    /// Events passed the scope filters and were submitted.
    Submitted = 1,
    /// A kernel structure read failed (bad offset or freed memory): event skipped.
    KernelReadFailed = 2,
}
/// Number of entries in [`COUNTERS`].
pub const COUNTER_COUNT: u32 = 3;

#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}

/// LRU hash: socket address (u64) -> [`crate::conn::SockContext`].
pub const SOCKS: &str = "SOCKS";
/// LRU hash: [`crate::conn::ListenerKey`] -> [`crate::conn::ListenerInfo`].
pub const LISTENERS: &str = "LISTENERS";
