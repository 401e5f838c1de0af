//! The library-independent half of TLS plaintext capture (see `tracer_common::plaintext` for
//! the design): a library probe calls [`call_enter`] at its function's entry and [`call_return`]
//! with the bytes moved at its return; data.rs calls [`on_ciphertext`] for each ciphertext
//! record it emits, which joins the call running on that thread to its socket (or, for memory
//! BIOs, a write that waits for the thread's next send, a read the thread's last receive).
//! Needs uprobes (any kernel with BPF uprobes, 4.x) and the syscall layer.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use tracer_common::{
    conn::{EventHeader, kind},
    data::{DIRECTION_SEND, DataEvent, MAX_CAPTURE},
    maps::Counter,
    plaintext::{
        Ciphertext, PLAINTEXT_HEADER_LEN, PlaintextEvent, TlsCall, TlsSession, TlsSessionKey,
        joined_by,
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

/// Per thread, its last ciphertext receive outside a library call (memory-BIO reads). Every
/// receive of every observed thread writes here, TLS or not: a thread's entry is overwritten
/// in place and consumed by clearing its socket (`skaddr` 0), so that the plain read path pays
/// an LRU insert (its lock, a node recycled) once per thread, not once per read.
#[map]
static TLS_LAST_RECV: LruHashMap<u64, Ciphertext> = LruHashMap::with_max_entries(16384, 0);

/// Per thread, a write waiting for the send of its ciphertext (memory-BIO writes); 1.2 KiB
/// each, hence fewer.
#[map]
static TLS_PENDING_SENDS: LruHashMap<u64, PlaintextEvent> = LruHashMap::with_max_entries(1024, 0);

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

/// data.rs emitted a ciphertext record on this thread: if a library call in the same direction
/// runs here (for Go: in the goroutine running here), that record's socket is the call's; else
/// it may complete a memory-BIO write, or be the receive a memory-BIO read will consume.
#[inline(always)]
pub fn on_ciphertext(pid_tgid: u64, record: &DataEvent) {
    let ciphertext = Ciphertext {
        skaddr: record.skaddr,
        enter_ns: record.enter_ns,
        tcp_ns: record.tcp_ns,
        nic_ns: record.nic_ns,
        seq: record.seq,
        netns_ino: record.netns_ino,
    };
    let Some(call) = TLS_CALLS
        .get_ptr_mut(&pid_tgid)
        .or_else(|| crate::tls_go::current_call(pid_tgid))
    else {
        crate::tls_openssl_handshake::on_ciphertext(pid_tgid, &ciphertext);
        if record.direction == DIRECTION_SEND {
            send_pending(pid_tgid, &ciphertext);
        } else {
            match TLS_LAST_RECV.get_ptr_mut(&pid_tgid) {
                Some(last) => unsafe { *last = ciphertext },
                None => {
                    let _ = TLS_LAST_RECV.insert(&pid_tgid, &ciphertext, 0);
                }
            }
        }
        return;
    };
    let call = unsafe { &mut *call };
    if call.direction != record.direction {
        // A read inside a write (a handshake or key update) is not the call's data.
        return;
    }
    if call.ciphertext.skaddr == 0 {
        call.ciphertext = ciphertext;
    } else if call.direction == DIRECTION_SEND && record.tcp_ns != 0 {
        // A send is out when TCP queued its last ciphertext.
        call.ciphertext.tcp_ns = record.tcp_ns;
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
    // Even a call that moved no plaintext (a handshake) teaches the session its socket: the
    // data that follows may have been buffered by the library during it, without a syscall.
    if call.ciphertext.skaddr != 0 {
        let key = TlsSessionKey {
            tgid: (pid_tgid >> 32) as u32,
            _pad: 0,
            session: call.session,
        };
        let _ = TLS_SESSIONS.insert(&key, &session_of(&call.ciphertext), 0);
    }
    if moved == 0 {
        return;
    }
    let Some(event) = PLAINTEXT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let event = unsafe { &mut *event };
    fill_plaintext(event, call, pid_tgid, moved);
    if call.ciphertext.skaddr != 0 {
        output(event, &call.ciphertext, joined_by::SYSCALL_IN_CALL);
        return;
    }
    if call.direction == DIRECTION_SEND {
        // Its ciphertext goes out with the thread's next send (a memory BIO): wait for it. A
        // write still waiting goes out now, on what its session is known to use.
        if let Some(waiting) = TLS_PENDING_SENDS.get_ptr_mut(&pid_tgid) {
            let waiting = unsafe { &mut *waiting };
            match unsafe { TLS_SESSIONS.get(&session_key(waiting)) }.copied() {
                Some(socket) => output(waiting, &session_only(&socket), joined_by::SESSION),
                None => count(Counter::PlaintextUnjoined),
            }
        }
        let _ = TLS_PENDING_SENDS.insert(&pid_tgid, event, 0);
        return;
    }
    // A read without a syscall: ciphertext this thread received before (a memory BIO), when
    // the session is new or that receive was on its socket; else data the library buffered.
    // (Plain branches, no match on a tuple of Options: that shape miscompiles for BPF here,
    // a register read before it is written, which the verifier rejects.)
    let known_skaddr = match unsafe { TLS_SESSIONS.get(&session_key(event)) } {
        Some(socket) => socket.skaddr,
        None => 0,
    };
    if let Some(slot) = TLS_LAST_RECV.get_ptr_mut(&pid_tgid) {
        let last = unsafe { *slot };
        if last.skaddr != 0 && (known_skaddr == 0 || known_skaddr == last.skaddr) {
            // Consumed: a later read served from the buffer must not reuse its times.
            unsafe { (*slot).skaddr = 0 };
            remember(event, &last);
            output(event, &last, joined_by::LAST_RECV);
            return;
        }
    }
    match unsafe { TLS_SESSIONS.get(&session_key(event)) } {
        Some(socket) => output(event, &session_only(socket), joined_by::SESSION),
        None => count(Counter::PlaintextUnjoined),
    }
}

/// A handshake call of `session` moved ciphertext on `ciphertext`'s socket: a read the library
/// serves from what it buffered during the handshake (nginx reads ahead: a new connection's
/// request often arrives with the client's Finished) finds its socket here.
#[inline(always)]
pub fn learn_session(pid_tgid: u64, session: u64, ciphertext: &Ciphertext) {
    let key = TlsSessionKey {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        session,
    };
    let _ = TLS_SESSIONS.insert(&key, &session_of(ciphertext), 0);
}

/// A write waiting on this thread meets its ciphertext's send.
#[inline(always)]
fn send_pending(pid_tgid: u64, ciphertext: &Ciphertext) {
    let Some(waiting) = TLS_PENDING_SENDS.get_ptr_mut(&pid_tgid) else {
        return;
    };
    let waiting = unsafe { &mut *waiting };
    remember(waiting, ciphertext);
    output(waiting, ciphertext, joined_by::NEXT_SEND);
    let _ = TLS_PENDING_SENDS.remove(&pid_tgid);
}

fn session_key(event: &PlaintextEvent) -> TlsSessionKey {
    TlsSessionKey {
        tgid: event.header.tgid,
        _pad: 0,
        session: event.session,
    }
}

/// The session's socket, without the times of any syscall.
#[inline(always)]
fn session_only(socket: &TlsSession) -> Ciphertext {
    Ciphertext {
        skaddr: socket.skaddr,
        netns_ino: socket.netns_ino,
        ..Ciphertext::default()
    }
}

/// The session's socket, for its later calls that move no ciphertext themselves.
#[inline(always)]
fn remember(event: &PlaintextEvent, ciphertext: &Ciphertext) {
    let _ = TLS_SESSIONS.insert(&session_key(event), &session_of(ciphertext), 0);
}

#[inline(always)]
fn session_of(ciphertext: &Ciphertext) -> TlsSession {
    TlsSession {
        skaddr: ciphertext.skaddr,
        netns_ino: ciphertext.netns_ino,
        _pad: 0,
    }
}

/// Everything but the socket: the library call, the process, the plaintext prefix.
#[inline(always)]
fn fill_plaintext(event: &mut PlaintextEvent, call: &TlsCall, pid_tgid: u64, moved: u64) {
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
    event.syscalls = call.syscalls;
    event._pad = [0; 5];
    let inner = &mut event.data;
    inner.header = header;
    // Until joined: a call without a syscall was handed over at its entry.
    inner.enter_ns = call.enter_ns;
    inner.len = moved.min(u32::MAX as u64) as u32;
    inner.direction = call.direction;
    inner._pad = 0;
    inner.comm = bpf_get_current_comm().unwrap_or_default();
    let captured = data::copy_prefix(&mut inner.data, call.buffer, moved);
    inner.captured = captured as u16;
}

/// Joins the record to its socket and submits it.
#[inline(always)]
fn output(event: &mut PlaintextEvent, ciphertext: &Ciphertext, joined: u8) {
    event.joined_by = joined;
    let inner = &mut event.data;
    inner.skaddr = ciphertext.skaddr;
    inner.netns_ino = ciphertext.netns_ino;
    if ciphertext.enter_ns != 0 {
        inner.enter_ns = ciphertext.enter_ns;
    }
    inner.tcp_ns = ciphertext.tcp_ns;
    inner.nic_ns = ciphertext.nic_ns;
    inner.seq = ciphertext.seq;
    data::fill_addresses(inner, ciphertext.skaddr, &scope::offsets());
    let mut captured = inner.captured as usize;
    if captured > MAX_CAPTURE {
        captured = MAX_CAPTURE;
    }
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (event as *const PlaintextEvent).cast::<u8>(),
            PLAINTEXT_HEADER_LEN + captured,
        )
    };
    match EVENTS.output(bytes, 0) {
        Ok(()) => count(Counter::PlaintextSubmitted),
        Err(_) => count(Counter::RingbufFull),
    }
}
