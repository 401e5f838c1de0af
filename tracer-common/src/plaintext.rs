//! Plaintext of a TLS socket, captured by a uprobe on a TLS library's write or read function
//! (OpenSSL's `SSL_write`/`SSL_read`, Go's `crypto/tls.(*Conn).Write`/`Read`, ...), joined to
//! the kernel socket whose ciphertext the call moved.
//!
//! The design is library-independent, so that every TLS library probe shares it:
//! - a library probe remembers its call in a [`TlsCall`] (keyed by pid_tgid: the thread that
//!   runs the call is the one whose send/recv syscalls carry its ciphertext);
//! - the syscall layer (data.rs), when it emits a ciphertext record, fills that thread's call
//!   with the socket and the syscall-layer timestamps (so the kernel-side join needs no
//!   library-specific struct offsets);
//! - each `(tgid, session)` remembers its socket in [`TlsSession`] once learned, since a read
//!   can return data the library had already buffered without any syscall;
//! - libraries that do their socket I/O outside the call (node's memory BIO: the event loop
//!   reads ciphertext, then calls SSL_read; SSL_write, then writes the ciphertext) are joined by
//!   the thread's last receive before the read, and by the thread's next send after the write
//!   (the write's record waits in the kernel for that send);
//! - on the call's return, only when it really moved bytes (its return value; calls are retried
//!   with the same buffer while a handshake finishes or a socket would block), the probe emits a
//!   [`PlaintextEvent`]: the library's own timestamps plus a [`DataEvent`] filled exactly as the
//!   syscall layer fills one, but carrying the plaintext. User space feeds that inner record to
//!   the same per-socket HTTP assembler as plaintext HTTP, and stops parsing the socket's
//!   ciphertext records for HTTP (they still flow, for TLS handshake timing).

use crate::data::{DATA_HEADER_LEN, DataEvent};

/// Which library a [`PlaintextEvent`] came from (`PlaintextEvent::library`).
pub mod library {
    pub const OPENSSL: u8 = 1;
    pub const GO_CRYPTO_TLS: u8 = 2;

    /// Name for logs and the span attribute `hoptrace.tls.plaintext_from`.
    pub const fn name(library: u8) -> &'static str {
        match library {
            OPENSSL => "openssl",
            GO_CRYPTO_TLS => "go crypto/tls",
            _ => "unknown",
        }
    }
}

/// How a [`PlaintextEvent`] found its socket (`PlaintextEvent::joined_by`).
pub mod joined_by {
    /// A send/recv syscall inside the library call touched the socket: its timestamps are in
    /// the inner record.
    pub const SYSCALL_IN_CALL: u8 = 1;
    /// No syscall inside the call (data the library had buffered): the socket its session used
    /// before; the inner record's syscall-layer timestamps are 0.
    pub const SESSION: u8 = 2;
    /// A write whose ciphertext the thread sent after the call returned (memory BIO).
    pub const NEXT_SEND: u8 = 3;
    /// A read of ciphertext the thread had received before the call (memory BIO).
    pub const LAST_RECV: u8 = 4;
}

/// The socket side of a join: one ciphertext syscall's socket and timestamps (as in its
/// [`DataEvent`]; 0 = unknown).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ciphertext {
    pub skaddr: u64,
    pub enter_ns: u64,
    pub tcp_ns: u64,
    pub nic_ns: u64,
    pub seq: u32,
    pub netns_ino: u32,
}
const _: () = assert!(core::mem::size_of::<Ciphertext>() == 40);

/// One library call that moved plaintext on a TLS socket in scope.
///
/// Only the first `data.captured` bytes of `data.data` are transmitted: the ring-buffer record
/// is [`PLAINTEXT_HEADER_LEN`] + `data.captured` bytes long.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaintextEvent {
    /// `kind` = [`crate::conn::kind::PLAINTEXT`]; `ts_ns` = the library call's return (ns,
    /// CLOCK_MONOTONIC): for a read, when the plaintext reached the application.
    pub header: crate::conn::EventHeader,
    /// The library call's entry (ns, CLOCK_MONOTONIC): for a write, when the application handed
    /// the plaintext to the TLS library (the inner record's `enter_ns` is when the ciphertext
    /// was handed to the kernel).
    pub library_enter_ns: u64,
    /// The library's session object (OpenSSL `SSL *`, Go `*tls.Conn`), a user address; for
    /// diagnostics only.
    pub session: u64,
    /// One of [`library`].
    pub library: u8,
    /// One of [`joined_by`].
    pub joined_by: u8,
    /// Ciphertext syscalls on the socket inside the call (saturating at 255).
    pub syscalls: u8,
    pub _pad: [u8; 5],
    /// As the syscall layer records it, with plaintext: `header.kind` is PLAINTEXT too,
    /// `header.ts_ns` the library call's return; `len` the plaintext bytes the call moved;
    /// `enter_ns` the first ciphertext syscall's entry (the library's entry when there was
    /// none); `tcp_ns`/`nic_ns`/`seq` those of the first ciphertext syscall, except that for a
    /// send `tcp_ns` is when TCP queued the last one; socket, addresses, netns, comm as usual.
    pub data: DataEvent,
}

/// Size of everything before the plaintext bytes.
pub const PLAINTEXT_HEADER_LEN: usize =
    core::mem::offset_of!(PlaintextEvent, data) + DATA_HEADER_LEN;
const _: () = assert!(PLAINTEXT_HEADER_LEN == 160);
const _: () = assert!(
    core::mem::size_of::<PlaintextEvent>() == PLAINTEXT_HEADER_LEN + crate::data::MAX_CAPTURE
);

/// What a library probe remembers between a call's entry and its return (keyed by pid_tgid),
/// filled in between by the syscall layer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCall {
    /// The call's entry (ns, CLOCK_MONOTONIC).
    pub enter_ns: u64,
    /// The session object (see [`PlaintextEvent::session`]).
    pub session: u64,
    /// User pointer to the plaintext buffer.
    pub buffer: u64,
    /// User pointer where the call stores the bytes moved (OpenSSL `_ex`: `size_t *`); 0 when
    /// the return value is the count.
    pub moved_out: u64,
    /// The first ciphertext syscall in the call (`skaddr` 0 = none yet); for a send, `tcp_ns`
    /// follows the last one.
    pub ciphertext: Ciphertext,
    /// [`crate::data::DIRECTION_SEND`] or [`crate::data::DIRECTION_RECV`].
    pub direction: u8,
    /// One of [`library`].
    pub library: u8,
    /// Ciphertext syscalls seen (saturating).
    pub syscalls: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<TlsCall>() == 80);

/// Key of the session -> socket cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsSessionKey {
    pub tgid: u32,
    pub _pad: u32,
    pub session: u64,
}
const _: () = assert!(core::mem::size_of::<TlsSessionKey>() == 16);

/// The socket a session last moved ciphertext on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsSession {
    pub skaddr: u64,
    pub netns_ino: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TlsSession>() == 16);

/// A Go crypto/tls call of a goroutine: Go's TLS calls are keyed by goroutine rather than by
/// thread (a goroutine may resume on another thread). `g` is the runtime's goroutine pointer
/// (R14); `call` one of [`go_call`], since a Read may run the handshake inside it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoroutineKey {
    pub tgid: u32,
    pub call: u32,
    pub g: u64,
}
const _: () = assert!(core::mem::size_of::<GoroutineKey>() == 16);

/// Which Go call a [`GoroutineKey`] names.
pub mod go_call {
    /// `(*Conn).Write` or `(*Conn).Read`: moves plaintext.
    pub const DATA: u32 = 0;
    /// `(*Conn).handshakeContext`: moves none, but its first read learns the session's socket
    /// (net/http handshakes before its first Read, which may then find the request buffered).
    pub const HANDSHAKE: u32 = 1;
}

impl GoroutineKey {
    pub const fn new(tgid: u32, call: u32, g: u64) -> Self {
        Self { tgid, call, g }
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::PlaintextEvent {}
}
