//! TCP connection lifecycle from the stable tracepoint `sock:inet_sock_set_state` (Linux 4.16+).
//!
//! Why this hook: it fires on every TCP state change of every socket, in process context for
//! connect()/listen() and in softirq context for handshakes completing, without kprobes (not
//! available on every kernel this runs on). The socket's netns, error and RTT are read through
//! offsets resolved from the running kernel's BTF by user space.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    conn::{
        AF_INET, AF_INET6, ConnEvent, ConnTransition, EventHeader, IPPROTO_TCP, ListenerInfo,
        ListenerKey, SockContext, kind, tcp_state,
    },
    maps::Counter,
};

use crate::{
    maps::{EVENTS, LISTENERS, SOCKS, count},
    scope,
};

/// Field offsets of the tracepoint's record, from
/// /sys/kernel/tracing/events/sock/inet_sock_set_state/format (stable since 4.16; user space
/// verifies them against the running kernel before loading).
mod field {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 36;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), ()> {
    let protocol: u16 = read(ctx, field::PROTOCOL)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let oldstate: i32 = read(ctx, field::OLDSTATE)?;
    let newstate: i32 = read(ctx, field::NEWSTATE)?;
    let Some(transition) = ConnTransition::classify(oldstate as u8, newstate as u8) else {
        // Any other way into CLOSE ends the socket: forget it (LRU would anyway, later).
        if newstate as u8 == tcp_state::CLOSE {
            let sk: u64 = read(ctx, field::SKADDR)?;
            let _ = SOCKS.remove(&sk);
        }
        return Ok(());
    };
    let sk: u64 = read(ctx, field::SKADDR)?;
    let sport: u16 = read(ctx, field::SPORT)?;
    let dport: u16 = read(ctx, field::DPORT)?;
    let off = scope::offsets();
    let Ok(netns_ino) = scope::sock_netns(sk, &off) else {
        count(Counter::KernelReadFailed);
        return Err(());
    };
    if !scope::netns_in_scope(netns_ino) || !scope::ports_in_scope(sport, dport) {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };

    let owner = match transition {
        ConnTransition::Listen => {
            let info = ListenerInfo {
                tgid: current_tgid(),
                comm: current_comm(),
            };
            let key = ListenerKey {
                netns_ino,
                port: sport,
                _pad: 0,
            };
            let _ = LISTENERS.insert(&key, &info, 0);
            return Ok(());
        }
        ConnTransition::ConnectStart => {
            let tgid = current_tgid();
            if !scope::pid_in_scope(tgid) {
                return Ok(());
            }
            let context = SockContext {
                phase_start_ns: now,
                tgid,
                _pad: 0,
                comm: current_comm(),
            };
            let _ = SOCKS.insert(&sk, &context, 0);
            return Ok(());
        }
        ConnTransition::AcceptDone => {
            // Softirq context: the owner is whoever listens on the local port.
            let key = ListenerKey {
                netns_ino,
                port: sport,
                _pad: 0,
            };
            let listener = unsafe { LISTENERS.get(&key) }.copied().unwrap_or_default();
            if !scope::pid_in_scope(listener.tgid) {
                return Ok(());
            }
            let context = SockContext {
                phase_start_ns: now,
                tgid: listener.tgid,
                _pad: 0,
                comm: listener.comm,
            };
            let _ = SOCKS.insert(&sk, &context, 0);
            // The event carries no phase start: user space derives the SYN's arrival from the
            // SYN-ACK round trip (srtt), which the kernel measured itself.
            SockContext {
                phase_start_ns: 0,
                ..context
            }
        }
        ConnTransition::ConnectDone => {
            let Some(context) = (unsafe { SOCKS.get(&sk) }).copied() else {
                // connect() happened before the agent started, or out of scope by pid.
                return Ok(());
            };
            if !scope::pid_in_scope(context.tgid) {
                return Ok(());
            }
            // The next phase (the established connection) starts now.
            let _ = SOCKS.insert(
                &sk,
                &SockContext {
                    phase_start_ns: now,
                    ..context
                },
                0,
            );
            context
        }
        ConnTransition::Closed => {
            // Reported only for sockets this agent followed (and so has state for).
            let Some(context) = (unsafe { SOCKS.get(&sk) }).copied() else {
                return Ok(());
            };
            let _ = SOCKS.remove(&sk);
            if !scope::pid_in_scope(context.tgid) {
                return Ok(());
            }
            context
        }
        ConnTransition::ConnectFailed | ConnTransition::AcceptFailed | ConnTransition::Aborted => {
            let context = unsafe { SOCKS.get(&sk) }.copied();
            let _ = SOCKS.remove(&sk);
            match context {
                Some(context) if scope::pid_in_scope(context.tgid) => context,
                Some(_) => return Ok(()),
                // Unknown socket (older than the agent): report it only without a pid filter.
                None if scope::pid_in_scope(0) => SockContext::default(),
                None => return Ok(()),
            }
        }
    };
    emit(
        ctx,
        sk,
        netns_ino,
        oldstate as u8,
        newstate as u8,
        sport,
        dport,
        now,
        &off,
        &owner,
    )
}

#[expect(clippy::too_many_arguments, reason = "a probe's locals, passed once")]
#[inline(always)]
fn emit(
    ctx: &TracePointContext,
    sk: u64,
    netns_ino: u32,
    oldstate: u8,
    newstate: u8,
    sport: u16,
    dport: u16,
    now: u64,
    off: &tracer_common::maps::KernelOffsets,
    owner: &SockContext,
) -> Result<(), ()> {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count(Counter::RingbufFull);
        return Err(());
    };
    let family: u16 = read(ctx, field::FAMILY).unwrap_or(0);
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET6 {
        saddr = read(ctx, field::SADDR_V6).unwrap_or_default();
        daddr = read(ctx, field::DADDR_V6).unwrap_or_default();
    } else if family == AF_INET {
        let s: [u8; 4] = read(ctx, field::SADDR).unwrap_or_default();
        let d: [u8; 4] = read(ctx, field::DADDR).unwrap_or_default();
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    }
    let sk_err: i32 =
        unsafe { bpf_probe_read_kernel((sk + off.sock_err as u64) as *const i32) }.unwrap_or(0);
    let srtt: u32 =
        unsafe { bpf_probe_read_kernel((sk + off.tcp_srtt_us as u64) as *const u32) }.unwrap_or(0);
    entry.write(ConnEvent {
        header: EventHeader {
            kind: kind::CONN,
            _pad: [0; 3],
            tgid: owner.tgid,
            ts_ns: now,
        },
        skaddr: sk,
        phase_start_ns: owner.phase_start_ns,
        netns_ino,
        sk_err,
        srtt_us: srtt >> 3,
        family,
        sport,
        dport,
        oldstate,
        newstate,
        _pad: [0; 4],
        saddr,
        daddr,
        comm: owner.comm,
    });
    entry.submit(0);
    count(Counter::Submitted);
    Ok(())
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: usize) -> Result<T, ()> {
    unsafe { ctx.read_at::<T>(offset) }.map_err(|_| ())
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn current_comm() -> [u8; 16] {
    bpf_get_current_comm().unwrap_or_default()
}
