//! uprobes on Go's `crypto/tls.(*Conn).Write` and `.Read` (Go 1.17+ register ABI on amd64),
//! attached by user space (golang.rs finds the offsets, go_tls.rs attaches) at each function's
//! entry and on each of its RET instructions: a uretprobe rewrites the return address on the
//! goroutine's stack, which Go may move, so it is not used.
//!
//! A Go call is not bound to a thread: the goroutine may park (a Read waiting for data) and
//! resume on another thread. Calls are therefore keyed by goroutine, `(tgid, g)`, with g read
//! from R14 (the register ABI keeps the current g there), both in the probes and when the
//! syscall layer joins a ciphertext syscall to the call in progress ([`current_call`]: the
//! thread's saved user registers at the syscall, Go's syscall path leaves R14 alone).
//! `handshakeContext` is probed too: it moves no plaintext, but the socket its first read
//! touches becomes the session's, for a Read served from what the handshake buffered.
//! Everything else (scope, socket join, session cache, record) is tls_plaintext's.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, uprobe},
    maps::LruHashMap,
    programs::ProbeContext,
};
use tracer_common::{
    data::{DIRECTION_RECV, DIRECTION_SEND},
    plaintext::{GoroutineKey, TlsCall, go_call, library::GO_CRYPTO_TLS},
};

use crate::tls_plaintext;

/// Whether the kernel has the helpers [`current_call`] needs (set at load time, see
/// `tracer_common::maps::globals::GO_TLS_JOIN`); 0 leaves the helper calls in a branch the
/// verifier never walks, so the syscall programs that inline it load on kernels before 5.15.
#[unsafe(no_mangle)]
static GO_TLS_JOIN: u32 = 0;

/// Go calls in progress, by goroutine.
#[map]
static GO_TLS_CALLS: LruHashMap<GoroutineKey, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// Processes that entered a probed Go call: only their ciphertext syscalls pay for the
/// goroutine lookup.
#[map]
static GO_TLS_PROCESSES: LruHashMap<u32, u8> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn regs(ctx: &ProbeContext) -> &pt_regs {
    // SAFETY: a uprobe's context is the probed thread's saved user registers.
    unsafe { &*ctx.regs }
}

/// `func (c *Conn) Write(b []byte) (int, error)` and `Read`: c in AX, b's pointer in BX and
/// length in CX. `handshakeContext(ctx)`: c in AX; its reads are the ones that teach the
/// socket (a client reads the ServerHello, a server the ClientHello).
#[inline(always)]
fn enter(ctx: &ProbeContext, call_kind: u32, direction: u8) {
    let regs = regs(ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    let buffer = if call_kind == go_call::DATA {
        regs.rbx
    } else {
        0
    };
    let Some(call) =
        tls_plaintext::new_call(pid_tgid, GO_CRYPTO_TLS, direction, regs.rax, buffer, 0)
    else {
        return;
    };
    let tgid = (pid_tgid >> 32) as u32;
    let key = GoroutineKey::new(tgid, call_kind, regs.r14);
    // A function entered again after growing its stack (morestack) only refreshes the entry.
    let _ = GO_TLS_CALLS.insert(&key, &call, 0);
    let _ = GO_TLS_PROCESSES.insert(&tgid, &1, 0);
}

#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, go_call::DATA, DIRECTION_SEND);
    0
}

#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, go_call::DATA, DIRECTION_RECV);
    0
}

#[uprobe]
pub fn go_tls_handshake(ctx: ProbeContext) -> u32 {
    enter(&ctx, go_call::HANDSHAKE, DIRECTION_RECV);
    0
}

/// Takes the goroutine's call of `call_kind` out of the map.
#[inline(always)]
fn take_call(ctx: &ProbeContext, call_kind: u32) -> Option<(u64, TlsCall)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = GoroutineKey::new((pid_tgid >> 32) as u32, call_kind, regs(ctx).r14);
    let call = (unsafe { GO_TLS_CALLS.get(&key) }).copied()?;
    let _ = GO_TLS_CALLS.remove(&key);
    Some((pid_tgid, call))
}

/// On every RET of Write and Read: n in AX, the error interface in BX (type word) and CX.
/// Bytes moved only when the error is nil and n > 0.
#[uprobe]
pub fn go_tls_return(ctx: ProbeContext) -> u32 {
    if let Some((pid_tgid, call)) = take_call(&ctx, go_call::DATA) {
        let regs = regs(&ctx);
        let n = regs.rax as i64;
        let moved = if regs.rbx != 0 || n <= 0 { 0 } else { n as u64 };
        tls_plaintext::call_finished(&call, pid_tgid, Some(moved));
    }
    0
}

/// On every RET of handshakeContext: no plaintext, only the socket learned.
#[uprobe]
pub fn go_tls_handshake_return(ctx: ProbeContext) -> u32 {
    if let Some((pid_tgid, call)) = take_call(&ctx, go_call::HANDSHAKE) {
        tls_plaintext::call_finished(&call, pid_tgid, Some(0));
    }
    0
}

/// The Go call of the goroutine running on this thread, if its process has one in progress:
/// R14 from the registers the thread saved on entering the kernel.
#[inline(always)]
pub fn current_call(pid_tgid: u64) -> Option<*mut TlsCall> {
    // Volatile: the value is patched into .rodata at load time, after compilation.
    if unsafe { core::ptr::read_volatile(&GO_TLS_JOIN) } == 0 {
        return None;
    }
    let tgid = (pid_tgid >> 32) as u32;
    unsafe { GO_TLS_PROCESSES.get(&tgid) }?;
    // SAFETY: helpers on the current task; the register read goes through probe_read.
    let g = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        bpf_probe_read_kernel(core::ptr::addr_of!((*regs).r14)).ok()?
    };
    // A Read running the handshake: the data call takes the syscall (same socket either way).
    GO_TLS_CALLS
        .get_ptr_mut(&GoroutineKey::new(tgid, go_call::DATA, g))
        .or_else(|| GO_TLS_CALLS.get_ptr_mut(&GoroutineKey::new(tgid, go_call::HANDSHAKE, g)))
}
