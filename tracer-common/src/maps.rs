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
    /// u32: the agent's own pid, never observed (its export traffic would loop).
    pub const SELF_TGID: &str = "SELF_TGID";
    /// Byte offsets into kernel structures, resolved from the running kernel's BTF by user
    /// space (CO-RE done by the loader, since Rust eBPF has no field relocations yet).
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
    /// u32, 1 when the kernel has `bpf_task_pt_regs` (Linux 5.15) and
    /// `bpf_get_current_task_btf` (5.11): the syscall layer then joins Go crypto/tls calls to
    /// their sockets by goroutine. 0 prunes that branch, so that an older kernel's verifier
    /// accepts the syscall programs (everything but Go TLS plaintext works).
    pub const GO_TLS_JOIN: &str = "GO_TLS_JOIN";
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
    /// `struct sock` -> `__sk_common.skc_daddr` (__be32): remote IPv4 address.
    pub sock_daddr: u32,
    /// `struct sock` -> `__sk_common.skc_rcv_saddr` (__be32): local IPv4 address.
    pub sock_rcv_saddr: u32,
    /// `struct sock` -> `__sk_common.skc_dport` (__be16): remote port.
    pub sock_dport: u32,
    /// `struct sock` -> `__sk_common.skc_num` (u16, host order): local port.
    pub sock_num: u32,
    /// `struct sock` -> `__sk_common.skc_family` (u16).
    pub sock_family: u32,
    /// `struct sock` -> `__sk_common.skc_v6_daddr` / `skc_v6_rcv_saddr` (in6_addr).
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    /// `struct task_struct` -> `nsproxy`, and `struct nsproxy` -> `net_ns`: the calling task's
    /// network namespace, to drop out-of-scope syscalls at entry before any map work.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    /// `struct tcp_sock` -> `write_seq` (u32): sequence number after the last byte queued.
    pub tcp_write_seq: u32,
    /// `struct tcp_sock` -> `copied_seq` (u32): sequence number after the last byte read.
    pub tcp_copied_seq: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 60);

impl KernelOffsets {
    /// All zero: the compiled-in value the loader always overrides.
    pub const ZERO: Self = Self {
        sock_net: 0,
        net_inum: 0,
        sock_err: 0,
        tcp_srtt_us: 0,
        sock_daddr: 0,
        sock_rcv_saddr: 0,
        sock_dport: 0,
        sock_num: 0,
        sock_family: 0,
        sock_v6_daddr: 0,
        sock_v6_rcv_saddr: 0,
        task_nsproxy: 0,
        nsproxy_net_ns: 0,
        tcp_write_seq: 0,
        tcp_copied_seq: 0,
    };
}

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
    /// A user buffer could not be read at syscall exit (paged out or bad pointer): the record
    /// went out without payload.
    UserReadFailed = 3,
    /// Data records submitted.
    DataSubmitted = 4,
    /// TLS plaintext records submitted.
    PlaintextSubmitted = 5,
    /// A TLS library call moved bytes, but no socket in scope was known for its session (its
    /// ciphertext never passed a syscall the agent saw, or the socket is out of scope).
    PlaintextUnjoined = 6,
    /// TLS library handshake records (`crate::handshake_call::HandshakeCallEvent`) submitted.
    HandshakeCallSubmitted = 7,
    /// A syscall's entry found the entry/exit table (`SYSCALLS`) full: its bytes are lost.
    SyscallTableFull = 8,
}
/// Number of entries in [`COUNTERS`].
pub const COUNTER_COUNT: u32 = 9;

#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}

/// Hash: pid_tgid (u64) -> [`crate::data::SyscallContext`] between a syscall's entry and exit.
pub const SYSCALLS: &str = "SYSCALLS";
/// LRU hash: socket address (u64) -> ns when the oldest unread segment reached TCP.
pub const RX_ARRIVAL: &str = "RX_ARRIVAL";
/// Array of [`crate::nic::NIC_SLOTS`] [`crate::nic::NicStamp`]s: when data segments left
/// through a NIC (tc egress), in buckets of two by [`crate::nic::bucket`].
pub const NIC_TX: &str = "NIC_TX";
/// As [`NIC_TX`], for data segments arriving at a NIC (tc ingress).
pub const NIC_RX: &str = "NIC_RX";
/// Per-CPU scratch for building a [`crate::data::DataEvent`] (too big for the BPF stack).
pub const DATA_SCRATCH: &str = "DATA_SCRATCH";

/// LRU hash: socket address (u64) -> [`crate::conn::SockContext`].
pub const SOCKS: &str = "SOCKS";
/// LRU hash: [`crate::conn::ListenerKey`] -> [`crate::conn::ListenerInfo`].
pub const LISTENERS: &str = "LISTENERS";

/// LRU hash: pid_tgid (u64) -> [`crate::plaintext::TlsCall`] between a TLS library call's entry
/// and return.
pub const TLS_CALLS: &str = "TLS_CALLS";
/// LRU hash: [`crate::plaintext::TlsSessionKey`] -> [`crate::plaintext::TlsSession`].
pub const TLS_SESSIONS: &str = "TLS_SESSIONS";
/// Per-CPU scratch for building a [`crate::plaintext::PlaintextEvent`].
pub const PLAINTEXT_SCRATCH: &str = "PLAINTEXT_SCRATCH";
/// LRU hash: [`crate::plaintext::GoroutineKey`] -> [`crate::plaintext::TlsCall`]: Go crypto/tls
/// calls in progress, by goroutine.
pub const GO_TLS_CALLS: &str = "GO_TLS_CALLS";
/// LRU hash: tgid (u32) -> u8: processes with Go crypto/tls calls.
pub const GO_TLS_PROCESSES: &str = "GO_TLS_PROCESSES";
/// LRU hash: pid_tgid (u64) -> [`crate::plaintext::Ciphertext`]: the thread's last ciphertext
/// receive outside any TLS library call (joins memory-BIO reads).
pub const TLS_LAST_RECV: &str = "TLS_LAST_RECV";
/// LRU hash: pid_tgid (u64) -> [`crate::plaintext::PlaintextEvent`]: a write waiting for the
/// thread's next send (memory-BIO writes).
pub const TLS_PENDING_SENDS: &str = "TLS_PENDING_SENDS";
