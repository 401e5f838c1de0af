//! Socket data with per-layer timestamps, from stable tracepoints only (no kprobes):
//! - `syscalls:sys_enter_*` / `sys_exit_*` of write, writev, sendto, sendmsg, sendfile64, read,
//!   readv, recvfrom, recvmsg: when the application hands bytes over or gets them, and the
//!   bytes themselves (a receive buffer is only filled at exit, so its pointer is kept from
//!   entry; sendfile's come from a file and are only counted);
//! - `sock:sock_send_length` / `sock_recv_length` (Linux 6.4+), which fire inside those
//!   syscalls with the `struct sock`: they tell which syscalls touched a TCP socket in scope,
//!   and when TCP had queued the bytes of a send;
//! - `tcp:tcp_probe` (4.16+), on each incoming segment of an established socket: when the data
//!   an application later reads reached TCP.
//! The three meet in `SYSCALLS`, keyed by pid_tgid; only syscalls that moved bytes on an
//! observed socket produce a record.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_probe_read_user as read_user_raw,
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use tracer_common::{
    conn::{AF_INET6, EventHeader, IPPROTO_TCP, kind},
    data::{
        DATA_HEADER_LEN, DIRECTION_RECV, DIRECTION_SEND, DataEvent, MAX_CAPTURE, SyscallContext,
        buffer_kind,
    },
    maps::{Counter, KernelOffsets},
    nic::NicKey,
};

use crate::{
    maps::{EVENTS, count},
    nic, scope,
};

/// A plain hash, not an LRU: every in-scope read and write inserts and deletes here, and an LRU
/// insert (global lock, node recycling) cost several times a hash insert. Entries never
/// outlive their syscall (sys_exit fires even for a task killed in the call); the next entry
/// of the same thread replaces one whose exit was missed while attaching.
#[map]
static SYSCALLS: HashMap<u64, SyscallContext> = HashMap::with_max_entries(16384, 0);

/// Per socket, when the oldest unread segment reached TCP; 0 once a read took it. Cleared
/// rather than removed, and set in place: an LRU insert or delete per segment and per read
/// (the LRU lock, a node recycled) cost more than the rest of those probes; a socket pays
/// one insert in its life and the LRU evicts the entries of closed sockets.
#[map]
static RX_ARRIVAL: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// The record under construction: 1.1 KiB, too big for the 512-byte BPF stack.
#[map]
static DATA_SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

// Argument offsets in the syscall tracepoints' records (see their format files): the buffer
// (or iovec array, or msghdr) pointer sits at 24 in every one of them, the count at 32.
const ARG_BUFFER: usize = 24;
const ARG_COUNT: usize = 32;
// sys_exit_*: `long ret` at 16.
const ARG_RET: usize = 16;
// sock:sock_{send,recv}_length: sk at 8, protocol at 18, ret at 20.
const SOCK_SK: usize = 8;
const SOCK_PROTOCOL: usize = 18;
const SOCK_RET: usize = 20;
// tcp:tcp_probe: data_len at 76, skaddr at 128.
const PROBE_DATA_LEN: usize = 76;
const PROBE_SKADDR: usize = 128;
// struct user_msghdr (UAPI): msg_iov at 16, msg_iovlen at 24.
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;

macro_rules! syscall_probes {
    ($($enter:ident / $exit:ident: $direction:expr, $kind:expr;)*) => {$(
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter(&ctx, $direction, $kind);
            0
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit(&ctx);
            0
        }
    )*};
}

syscall_probes! {
    sys_enter_write / sys_exit_write: DIRECTION_SEND, buffer_kind::PLAIN;
    sys_enter_sendto / sys_exit_sendto: DIRECTION_SEND, buffer_kind::PLAIN;
    sys_enter_writev / sys_exit_writev: DIRECTION_SEND, buffer_kind::IOVEC;
    sys_enter_sendmsg / sys_exit_sendmsg: DIRECTION_SEND, buffer_kind::MSGHDR;
    sys_enter_read / sys_exit_read: DIRECTION_RECV, buffer_kind::PLAIN;
    sys_enter_recvfrom / sys_exit_recvfrom: DIRECTION_RECV, buffer_kind::PLAIN;
    sys_enter_readv / sys_exit_readv: DIRECTION_RECV, buffer_kind::IOVEC;
    sys_enter_recvmsg / sys_exit_recvmsg: DIRECTION_RECV, buffer_kind::MSGHDR;
    sys_enter_sendfile64 / sys_exit_sendfile64: DIRECTION_SEND, buffer_kind::NONE;
}

#[inline(always)]
fn enter(ctx: &TracePointContext, direction: u8, kind: u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !scope::pid_in_scope((pid_tgid >> 32) as u32) || !current_netns_in_scope() {
        return;
    }
    let Ok(buffer) = (unsafe { ctx.read_at::<u64>(ARG_BUFFER) }) else {
        return;
    };
    let iov_count = unsafe { ctx.read_at::<u64>(ARG_COUNT) }.unwrap_or(0) as u32;
    let context = SyscallContext {
        enter_ns: unsafe { bpf_ktime_get_ns() },
        buffer,
        skaddr: 0,
        tcp_ns: 0,
        direction,
        buffer_kind: kind,
        _pad: [0; 2],
        iov_count,
        seq: 0,
        netns_ino: 0,
    };
    if SYSCALLS.insert(&pid_tgid, &context, 0).is_err() {
        count(Counter::SyscallTableFull);
    }
}

/// The calling task's network namespace, when a netns filter is set (entry-time pruning: most
/// reads and writes on a host are not ours and should cost one map lookup at most).
#[inline(always)]
pub(crate) fn current_netns_in_scope() -> bool {
    if !scope::netns_filter_enabled() {
        return true;
    }
    let off = scope::offsets();
    let task = unsafe { bpf_get_current_task() };
    let read = |addr: u64| unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok();
    let Some(nsproxy) = read(task + off.task_nsproxy as u64) else {
        return false;
    };
    let Some(net) = read(nsproxy + off.nsproxy_net_ns as u64) else {
        return false;
    };
    match unsafe { bpf_probe_read_kernel((net + off.net_inum as u64) as *const u32) } {
        Ok(inum) => scope::netns_in_scope(inum),
        Err(_) => false,
    }
}

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    on_socket(&ctx, DIRECTION_SEND);
    0
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    on_socket(&ctx, DIRECTION_RECV);
    0
}

#[inline(always)]
fn on_socket(ctx: &TracePointContext, direction: u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(context) = SYSCALLS.get_ptr_mut(&pid_tgid) else {
        return;
    };
    let protocol: u16 = unsafe { ctx.read_at(SOCK_PROTOCOL) }.unwrap_or(0);
    let ret: i32 = unsafe { ctx.read_at(SOCK_RET) }.unwrap_or(0);
    let sk: u64 = unsafe { ctx.read_at(SOCK_SK) }.unwrap_or(0);
    let context = unsafe { &mut *context };
    if protocol != IPPROTO_TCP || ret <= 0 || sk == 0 || context.direction != direction {
        return;
    }
    let off = scope::offsets();
    let netns = scope::sock_netns(sk, &off).ok().filter(|&netns| {
        let (local, remote) = ports(sk, &off);
        scope::netns_in_scope(netns) && scope::ports_in_scope(local, remote)
    });
    let Some(netns) = netns else {
        let _ = SYSCALLS.remove(&pid_tgid);
        return;
    };
    context.netns_ino = netns;
    // A sendfile can call sendmsg several times: the first call holds the first byte.
    let first_call = context.skaddr == 0;
    context.skaddr = sk;
    if direction == DIRECTION_SEND {
        context.tcp_ns = unsafe { bpf_ktime_get_ns() };
    }
    if first_call {
        // The tracepoint fires after TCP moved `ret` bytes: its cursor already passed them.
        let cursor = if direction == DIRECTION_SEND {
            off.tcp_write_seq
        } else {
            off.tcp_copied_seq
        };
        if let Ok(after) = unsafe { bpf_probe_read_kernel((sk + cursor as u64) as *const u32) } {
            context.seq = after.wrapping_sub(ret as u32);
        }
    }
}

#[tracepoint(category = "tcp", name = "tcp_probe")]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    let data_len: u16 = unsafe { ctx.read_at(PROBE_DATA_LEN) }.unwrap_or(0);
    if data_len == 0 {
        return 0;
    }
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(PROBE_SKADDR) }) else {
        return 0;
    };
    let off = scope::offsets();
    if !scope::sock_netns(sk, &off).is_ok_and(scope::netns_in_scope) {
        return 0;
    }
    // Keep the oldest unread arrival.
    let now = unsafe { bpf_ktime_get_ns() };
    match RX_ARRIVAL.get_ptr_mut(&sk) {
        Some(arrival) => unsafe {
            if *arrival == 0 {
                *arrival = now;
            }
        },
        None => {
            let _ = RX_ARRIVAL.insert(&sk, &now, BPF_NOEXIST as u64);
        }
    }
    0
}

#[inline(always)]
fn exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(context) = (unsafe { SYSCALLS.get(&pid_tgid) }).copied() else {
        return;
    };
    let _ = SYSCALLS.remove(&pid_tgid);
    let ret: i64 = unsafe { ctx.read_at(ARG_RET) }.unwrap_or(0);
    if context.skaddr == 0 || ret <= 0 {
        return;
    }
    let _ = emit(&context, pid_tgid, ret as u64);
}

#[inline(always)]
fn emit(context: &SyscallContext, pid_tgid: u64, moved: u64) -> Result<(), ()> {
    let event = DATA_SCRATCH.get_ptr_mut(0).ok_or(())?;
    let event = unsafe { &mut *event };
    let sk = context.skaddr;
    let off = scope::offsets();
    event.header = EventHeader {
        kind: kind::DATA,
        _pad: [0; 3],
        tgid: (pid_tgid >> 32) as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    event.skaddr = sk;
    event.enter_ns = context.enter_ns;
    event.tcp_ns = context.tcp_ns;
    if context.direction == DIRECTION_RECV {
        if let Some(arrival) = RX_ARRIVAL.get_ptr_mut(&sk) {
            // SAFETY: a valid value of the map; tcp_probe on another CPU may set it meanwhile,
            // and that segment's time is then lost (the next read says "not seen"), as with a
            // remove.
            unsafe {
                event.tcp_ns = *arrival;
                *arrival = 0;
            }
        }
    }
    event.netns_ino = context.netns_ino;
    event.len = moved.min(u32::MAX as u64) as u32;
    event.direction = context.direction;
    event.seq = context.seq;
    event._pad = 0;
    fill_addresses(event, sk, &off);
    event.nic_ns = 0;
    if context.direction == DIRECTION_RECV {
        let key = NicKey {
            local_addr: event.saddr,
            remote_addr: event.daddr,
            local_port: event.sport,
            remote_port: event.dport,
            seq: context.seq,
        };
        event.nic_ns = nic::arrival(&key).unwrap_or(0);
    }
    event.comm = bpf_get_current_comm().unwrap_or_default();

    let (source, available) = first_buffer(context);
    let captured = copy_prefix(&mut event.data, source, available.min(moved));
    event.captured = captured as u16;
    // A TLS library call running on this thread learns its socket and kernel timestamps.
    crate::tls_plaintext::on_ciphertext(pid_tgid, event);
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (event as *const DataEvent).cast::<u8>(),
            DATA_HEADER_LEN + captured as usize,
        )
    };
    match EVENTS.output(bytes, 0) {
        Ok(()) => count(Counter::DataSubmitted),
        Err(_) => count(Counter::RingbufFull),
    }
    Ok(())
}

/// Copies the first `len` bytes (at most [`MAX_CAPTURE`]) at user address `source` into `dst`;
/// returns how many it copied (0 when the read failed, counted).
#[inline(always)]
pub(crate) fn copy_prefix(dst: &mut [u8; MAX_CAPTURE], source: u64, len: u64) -> u64 {
    let mut want = len;
    if want > MAX_CAPTURE as u64 {
        want = MAX_CAPTURE as u64;
    }
    if source == 0 || want == 0 {
        return 0;
    }
    // SAFETY: want <= MAX_CAPTURE == dst's length.
    if unsafe { read_user_raw(dst.as_mut_ptr().cast(), want as u32, source as *const _) } != 0 {
        count(Counter::UserReadFailed);
        return 0;
    }
    // Clamped again after the helper call, as before this was shared: the record's length is
    // computed from the result and the verifier must see it bounded there too.
    if want > MAX_CAPTURE as u64 {
        want = MAX_CAPTURE as u64;
    }
    want
}

/// Where the first bytes of the syscall's data are, and how many the first buffer holds.
#[inline(always)]
fn first_buffer(context: &SyscallContext) -> (u64, u64) {
    let iovec_at = |array: u64| -> (u64, u64) {
        match unsafe { bpf_probe_read_user(array as *const [u64; 2]) } {
            Ok([base, len]) => (base, len),
            Err(_) => (0, 0),
        }
    };
    match context.buffer_kind {
        buffer_kind::PLAIN => (context.buffer, u64::MAX),
        buffer_kind::IOVEC if context.iov_count > 0 => iovec_at(context.buffer),
        buffer_kind::MSGHDR => {
            let iov = unsafe { bpf_probe_read_user((context.buffer + MSGHDR_IOV) as *const u64) };
            let iovlen =
                unsafe { bpf_probe_read_user((context.buffer + MSGHDR_IOVLEN) as *const u64) };
            match (iov, iovlen) {
                (Ok(iov), Ok(n)) if n > 0 => iovec_at(iov),
                _ => (0, 0),
            }
        }
        _ => (0, 0),
    }
}

#[inline(always)]
fn ports(sk: u64, off: &KernelOffsets) -> (u16, u16) {
    let local =
        unsafe { bpf_probe_read_kernel((sk + off.sock_num as u64) as *const u16) }.unwrap_or(0);
    let remote = unsafe { bpf_probe_read_kernel((sk + off.sock_dport as u64) as *const u16) }
        .map(u16::from_be)
        .unwrap_or(0);
    (local, remote)
}

#[inline(always)]
pub(crate) fn fill_addresses(event: &mut DataEvent, sk: u64, off: &KernelOffsets) {
    let (local, remote) = ports(sk, off);
    event.sport = local;
    event.dport = remote;
    let family: u16 =
        unsafe { bpf_probe_read_kernel((sk + off.sock_family as u64) as *const u16) }.unwrap_or(0);
    event.family = family as u8;
    event.saddr = [0; 16];
    event.daddr = [0; 16];
    if family == AF_INET6 {
        event.saddr = unsafe {
            bpf_probe_read_kernel((sk + off.sock_v6_rcv_saddr as u64) as *const [u8; 16])
        }
        .unwrap_or_default();
        event.daddr =
            unsafe { bpf_probe_read_kernel((sk + off.sock_v6_daddr as u64) as *const [u8; 16]) }
                .unwrap_or_default();
    } else {
        let s: [u8; 4] =
            unsafe { bpf_probe_read_kernel((sk + off.sock_rcv_saddr as u64) as *const [u8; 4]) }
                .unwrap_or_default();
        let d: [u8; 4] =
            unsafe { bpf_probe_read_kernel((sk + off.sock_daddr as u64) as *const [u8; 4]) }
                .unwrap_or_default();
        event.saddr[..4].copy_from_slice(&s);
        event.daddr[..4].copy_from_slice(&d);
    }
}
