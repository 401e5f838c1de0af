//! uprobes/uretprobes on OpenSSL's handshake entry points, `SSL_do_handshake`, `SSL_connect`
//! and `SSL_accept` (1.1 and 3.x: `int f(SSL *s)`), and a uretprobe on `SSL_get_error`: the
//! library's view of a handshake (see `tracer_common::handshake_call`). Attached by user space
//! (tls_uprobes.rs) with the plaintext probes, to the same files.
//!
//! The call is joined to its socket like SSL_read/SSL_write: the syscall layer hands every
//! ciphertext record it emits to [`on_ciphertext`], which gives the socket to the handshake
//! call running on that thread. A session remembers the socket across its calls (a
//! non-blocking server's last call may be the one whose read finds nothing new to read).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    conn::{EventHeader, kind},
    handshake_call::{
        HandshakeCall, HandshakeCallEvent, HandshakeSession, VerdictWait, function, outcome,
        ssl_error,
    },
    maps::Counter,
    plaintext::{Ciphertext, TlsSessionKey},
};

use crate::{
    data,
    maps::{EVENTS, count},
    scope,
};

/// The handshake call in progress, by thread.
#[map]
static HANDSHAKE_CALLS: LruHashMap<u64, HandshakeCall> = LruHashMap::with_max_entries(16384, 0);

/// Sessions whose handshake started and has not completed (LRU: a session abandoned after a
/// retry is never seen again).
#[map]
static HANDSHAKE_SESSIONS: LruHashMap<TlsSessionKey, HandshakeSession> =
    LruHashMap::with_max_entries(16384, 0);

/// A call that returned -1, by thread, until the thread's `SSL_get_error` says why.
#[map]
static HANDSHAKE_VERDICTS: LruHashMap<u64, VerdictWait> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn enter(ctx: &ProbeContext, which: u8) {
    let Some(ssl) = ctx.arg::<u64>(0) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(call) = HANDSHAKE_CALLS.get_ptr_mut(&pid_tgid) {
        let call = unsafe { &mut *call };
        if call.session == ssl {
            // SSL_connect / SSL_accept calling SSL_do_handshake.
            call.depth = call.depth.saturating_add(1);
            return;
        }
    }
    if !scope::pid_in_scope((pid_tgid >> 32) as u32) || !data::current_netns_in_scope() {
        return;
    }
    // A verdict nobody asked for (the application did not call SSL_get_error) is stale now.
    let _ = HANDSHAKE_VERDICTS.remove(&pid_tgid);
    let call = HandshakeCall {
        enter_ns: unsafe { bpf_ktime_get_ns() },
        session: ssl,
        depth: 1,
        function: which,
        ..HandshakeCall::default()
    };
    let _ = HANDSHAKE_CALLS.insert(&pid_tgid, &call, 0);
}

#[uprobe]
pub fn ssl_do_handshake(ctx: ProbeContext) -> u32 {
    enter(&ctx, function::SSL_DO_HANDSHAKE);
    0
}

#[uprobe]
pub fn ssl_connect(ctx: ProbeContext) -> u32 {
    enter(&ctx, function::SSL_CONNECT);
    0
}

#[uprobe]
pub fn ssl_accept(ctx: ProbeContext) -> u32 {
    enter(&ctx, function::SSL_ACCEPT);
    0
}

/// Return of any of the three: 1 done, 0 failed, -1 ask SSL_get_error.
#[uretprobe]
pub fn ssl_handshake_return(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = HANDSHAKE_CALLS.get_ptr_mut(&pid_tgid) else {
        return 0;
    };
    let call = unsafe { &mut *call };
    if call.depth > 1 {
        call.depth -= 1;
        return 0;
    }
    let call = *call;
    let _ = HANDSHAKE_CALLS.remove(&pid_tgid);
    if call.skaddr != 0 {
        let socket = Ciphertext {
            skaddr: call.skaddr,
            netns_ino: call.netns_ino,
            ..Ciphertext::default()
        };
        crate::tls_plaintext::learn_session(pid_tgid, call.session, &socket);
    }
    match ret {
        1 => complete(pid_tgid, &call, ret, ssl_error::NOT_ASKED, outcome::DONE),
        0 => complete(pid_tgid, &call, ret, ssl_error::NOT_ASKED, outcome::FAILED),
        _ => {
            // Retry or failure: SSL_get_error, called next on this thread, tells.
            note_call(pid_tgid, &call);
            let wait = VerdictWait { call, ret, _pad: 0 };
            let _ = HANDSHAKE_VERDICTS.insert(&pid_tgid, &wait, 0);
        }
    }
    0
}

/// Return of `SSL_get_error(ssl, ret)`: the verdict on this thread's handshake call that
/// returned -1, if one waits (most calls are about SSL_read/SSL_write: one map miss).
#[uretprobe]
pub fn ssl_get_error_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(wait) = (unsafe { HANDSHAKE_VERDICTS.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = HANDSHAKE_VERDICTS.remove(&pid_tgid);
    let code: i32 = ctx.ret();
    if !ssl_error::is_retry(code) {
        // The call was counted on the session when it returned.
        emit(pid_tgid, &wait.call, wait.ret, code, outcome::FAILED);
    }
    0
}

#[inline(always)]
fn session_key(pid_tgid: u64, session: u64) -> TlsSessionKey {
    TlsSessionKey {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        session,
    }
}

/// Counts a call on its session (starting the session at its first call), and teaches the
/// session the socket the call moved ciphertext on.
#[inline(always)]
fn note_call(pid_tgid: u64, call: &HandshakeCall) {
    let key = session_key(pid_tgid, call.session);
    if let Some(session) = HANDSHAKE_SESSIONS.get_ptr_mut(&key) {
        let session = unsafe { &mut *session };
        session.calls = session.calls.saturating_add(1);
        if call.skaddr != 0 {
            session.skaddr = call.skaddr;
            session.netns_ino = call.netns_ino;
        }
        return;
    }
    let session = HandshakeSession {
        started_ns: call.enter_ns,
        skaddr: call.skaddr,
        netns_ino: call.netns_ino,
        calls: 1,
        _pad: 0,
    };
    let _ = HANDSHAKE_SESSIONS.insert(&key, &session, 0);
}

/// The call completed the handshake: one record with the session's first entry.
#[inline(always)]
fn complete(pid_tgid: u64, call: &HandshakeCall, ret: i32, code: i32, result: u8) {
    note_call(pid_tgid, call);
    emit(pid_tgid, call, ret, code, result);
}

#[inline(always)]
fn emit(pid_tgid: u64, call: &HandshakeCall, ret: i32, code: i32, result: u8) {
    let key = session_key(pid_tgid, call.session);
    let Some(session) = (unsafe { HANDSHAKE_SESSIONS.get(&key) }).copied() else {
        return;
    };
    let _ = HANDSHAKE_SESSIONS.remove(&key);
    let event = HandshakeCallEvent {
        header: EventHeader {
            kind: kind::HANDSHAKE_CALL,
            _pad: [0; 3],
            tgid: (pid_tgid >> 32) as u32,
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        started_ns: session.started_ns,
        enter_ns: call.enter_ns,
        session: call.session,
        skaddr: session.skaddr,
        netns_ino: session.netns_ino,
        ret,
        ssl_error: code,
        calls: session.calls,
        function: call.function,
        outcome: result,
    };
    match EVENTS.output(&event, 0) {
        Ok(()) => count(Counter::HandshakeCallSubmitted),
        Err(_) => count(Counter::RingbufFull),
    }
}

/// data.rs emitted a ciphertext record on this thread outside any plaintext call: if a
/// handshake call runs here, that record's socket is the handshake's.
#[inline(always)]
pub fn on_ciphertext(pid_tgid: u64, ciphertext: &Ciphertext) {
    let Some(call) = HANDSHAKE_CALLS.get_ptr_mut(&pid_tgid) else {
        return;
    };
    let call = unsafe { &mut *call };
    if call.skaddr == 0 {
        call.skaddr = ciphertext.skaddr;
        call.netns_ino = ciphertext.netns_ino;
    }
}
