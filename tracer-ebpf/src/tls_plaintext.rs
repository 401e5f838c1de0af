//! The library-independent half of TLS plaintext capture (see `tracer_common::plaintext` for
//! the design): a library probe calls [`call_enter`] at its function's entry and [`call_return`]
//! with the bytes moved at its return; data.rs calls [`on_ciphertext`] for each ciphertext
//! record it emits, which joins the call running on that thread to its socket.
//! Needs uprobes (any kernel with BPF uprobes, 4.x) and the syscall layer.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_probe_read_user as read_user_raw,
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use tracer_common::{
    conn::{EventHeader, kind},
    data::{DataEvent, MAX_CAPTURE},
    maps::Counter,
    plaintext::{
        PLAINTEXT_HEADER_LEN, PlaintextEvent, TlsCall, TlsSession, TlsSessionKey, joined_by,
    },
};

use crate::{
    data,
    maps::{EVENTS, count},
    scope,
};

/// Library calls in progress, by thread.
#[map]
static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// Session -> the socket it last moved ciphertext on (LRU: sessions are never seen closing).
#[map]
static TLS_SESSIONS: LruHashMap<TlsSessionKey, TlsSession> = LruHashMap::with_max_entries(65536, 0);

/// The record under construction (1.2 KiB, beyond the BPF stack).
#[map]
static PLAINTEXT_SCRATCH: PerCpuArray<PlaintextEvent> = PerCpuArray::with_max_entries(1, 0);

/// A library call starts on this thread: remember where its plaintext is. Out-of-scope
/// processes and namespaces stop here (ports are checked when the socket is known).
#[inline(always)]
pub fn call_enter(library: u8, direction: u8, session: u64, buffer: u64, moved_out: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(call) = new_call(pid_tgid, library, direction, session, buffer, moved_out) {
        let _ = TLS_CALLS.insert(&pid_tgid, &call, 0);
    }
}

/// The call a library probe remembers at entry, or None when the process or namespace is out
/// of scope. For libraries whose calls are not bound to a thread (Go: goroutines move between
/// threads), the probe keeps it in its own map and passes it to [`call_finished`].
#[inline(always)]
pub fn new_call(
    pid_tgid: u64,
    library: u8,
    direction: u8,
    session: u64,
    buffer: u64,
    moved_out: u64,
) -> Option<TlsCall> {
    if !scope::pid_in_scope((pid_tgid >> 32) as u32) || !data::current_netns_in_scope() {
        return None;
    }
    Some(TlsCall {
        enter_ns: unsafe { bpf_ktime_get_ns() },
        session,
        buffer,
        moved_out,
        direction,
        library,
        ..TlsCall::default()
    })
}

/// data.rs emitted a ciphertext record on this thread: if a library call in the same
/// direction runs here (for Go: in the goroutine running here), that record's socket is the
/// call's.
#[inline(always)]
pub fn on_ciphertext(pid_tgid: u64, record: &DataEvent) {
    let Some(call) = TLS_CALLS
        .get_ptr_mut(&pid_tgid)
        .or_else(|| crate::tls_go::current_call(pid_tgid))
    else {
        return;
    };
    let call = unsafe { &mut *call };
    if call.direction != record.direction {
        // A read inside a write (a handshake or key update) is not the call's data.
        return;
    }
    if call.skaddr == 0 {
        call.skaddr = record.skaddr;
        call.sys_enter_ns = record.enter_ns;
        call.tcp_ns = record.tcp_ns;
        call.nic_ns = record.nic_ns;
        call.seq = record.seq;
        call.netns_ino = record.netns_ino;
    } else if call.direction == tracer_common::data::DIRECTION_SEND && record.tcp_ns != 0 {
        // A send is out when TCP queued its last ciphertext.
        call.tcp_ns = record.tcp_ns;
    }
    call.syscalls = call.syscalls.saturating_add(1);
}

/// The library call returned having moved `moved` plaintext bytes (0 = nothing, e.g. would
/// block; then nothing is emitted). For `_ex`-style calls pass `None` and the count is read
/// from the call's `moved_out` pointer.
#[inline(always)]
pub fn call_return(moved: Option<u64>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { TLS_CALLS.get(&pid_tgid) }).copied() else {
        return;
    };
    let _ = TLS_CALLS.remove(&pid_tgid);
    call_finished(&call, pid_tgid, moved);
}

/// A call (from [`call_return`], or a library probe's own map) returned; see [`call_return`].
#[inline(always)]
pub fn call_finished(call: &TlsCall, pid_tgid: u64, moved: Option<u64>) {
    let moved = match moved {
        Some(n) => n,
        None if call.moved_out != 0 => {
            unsafe { bpf_probe_read_user(call.moved_out as *const u64) }.unwrap_or(0)
        }
        None => 0,
    };
    let session_key = TlsSessionKey {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        session: call.session,
    };
    // Even a call that moved no plaintext (a handshake) teaches the session its socket: the
    // data that follows may have been buffered by the library during it, without a syscall.
    if call.skaddr != 0 {
        let known = TlsSession {
            skaddr: call.skaddr,
            netns_ino: call.netns_ino,
            _pad: 0,
        };
        let _ = TLS_SESSIONS.insert(&session_key, &known, 0);
    }
    if moved == 0 {
        return;
    }
    let joined = if call.skaddr != 0 {
        joined_by::SYSCALL_IN_CALL
    } else {
        joined_by::SESSION
    };
    let socket = match unsafe { TLS_SESSIONS.get(&session_key) } {
        Some(socket) => *socket,
        None => {
            count(Counter::PlaintextUnjoined);
            return;
        }
    };
    let _ = emit(call, pid_tgid, moved, joined, socket);
}

#[inline(always)]
fn emit(
    call: &TlsCall,
    pid_tgid: u64,
    moved: u64,
    joined: u8,
    socket: TlsSession,
) -> Result<(), ()> {
    let event = PLAINTEXT_SCRATCH.get_ptr_mut(0).ok_or(())?;
    let event = unsafe { &mut *event };
    let header = EventHeader {
        kind: kind::PLAINTEXT,
        _pad: [0; 3],
        tgid: (pid_tgid >> 32) as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    event.header = header;
    event.library_enter_ns = call.enter_ns;
    event.session = call.session;
    event.library = call.library;
    event.joined_by = joined;
    event.syscalls = call.syscalls;
    event._pad = [0; 5];
    let inner = &mut event.data;
    inner.header = header;
    inner.skaddr = socket.skaddr;
    let in_call = joined == joined_by::SYSCALL_IN_CALL;
    inner.enter_ns = if in_call {
        call.sys_enter_ns
    } else {
        call.enter_ns
    };
    inner.tcp_ns = if in_call { call.tcp_ns } else { 0 };
    inner.nic_ns = if in_call { call.nic_ns } else { 0 };
    inner.seq = if in_call { call.seq } else { 0 };
    inner.netns_ino = socket.netns_ino;
    inner.len = moved.min(u32::MAX as u64) as u32;
    inner.direction = call.direction;
    inner._pad = 0;
    data::fill_addresses(inner, socket.skaddr, &scope::offsets());
    inner.comm = bpf_get_current_comm().unwrap_or_default();
    let mut want = moved;
    if want > MAX_CAPTURE as u64 {
        want = MAX_CAPTURE as u64;
    }
    let mut captured = 0u64;
    if call.buffer != 0 && want > 0 {
        let dst = inner.data.as_mut_ptr();
        // SAFETY: want <= MAX_CAPTURE == data's length.
        if unsafe { read_user_raw(dst.cast(), want as u32, call.buffer as *const _) } == 0 {
            captured = want;
        } else {
            count(Counter::UserReadFailed);
        }
    }
    if captured > MAX_CAPTURE as u64 {
        captured = MAX_CAPTURE as u64;
    }
    inner.captured = captured as u16;
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (event as *const PlaintextEvent).cast::<u8>(),
            PLAINTEXT_HEADER_LEN + captured as usize,
        )
    };
    match EVENTS.output(bytes, 0) {
        Ok(()) => count(Counter::PlaintextSubmitted),
        Err(_) => count(Counter::RingbufFull),
    }
    Ok(())
}
