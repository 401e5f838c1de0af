//! The TLS library's own view of a handshake: when the application started it (the first entry
//! into OpenSSL's `SSL_do_handshake` / `SSL_connect` / `SSL_accept` on a session) and when the
//! library reported it done or failed (the return of the call that completed it). The wire
//! timing of the handshake comes from the record headers (user space's tls_handshake.rs); this
//! adds the application-side edges and, for a failure, the library's verdict.
//!
//! A non-blocking application calls the handshake function several times: each call that
//! returns -1 with `SSL_get_error` = WANT_READ / WANT_WRITE (or another WANT_*) is a retry, not
//! an outcome. The kernel keeps the session's first entry and emits one
//! [`HandshakeCallEvent`] when a call completes: returns 1 (done), 0 (failed), or -1 with a
//! non-retry `SSL_get_error` (failed; the probe reads `SSL_get_error`'s return on the same
//! thread right after the call).

/// Which function the application called (the outermost one: `SSL_connect` calls
/// `SSL_do_handshake` inside).
pub mod function {
    pub const SSL_DO_HANDSHAKE: u8 = 1;
    pub const SSL_CONNECT: u8 = 2;
    pub const SSL_ACCEPT: u8 = 3;

    pub const fn name(function: u8) -> &'static str {
        match function {
            SSL_DO_HANDSHAKE => "SSL_do_handshake",
            SSL_CONNECT => "SSL_connect",
            SSL_ACCEPT => "SSL_accept",
            _ => "unknown",
        }
    }
}

/// `HandshakeCallEvent::outcome`.
pub mod outcome {
    /// The call returned 1: the library finished the handshake.
    pub const DONE: u8 = 1;
    /// The call returned 0, or -1 with a non-retry `SSL_get_error`.
    pub const FAILED: u8 = 2;
}

/// `SSL_get_error` codes (openssl/ssl.h; stable since 1.0).
pub mod ssl_error {
    pub const NONE: i32 = 0;
    pub const SSL: i32 = 1;
    pub const WANT_READ: i32 = 2;
    pub const WANT_WRITE: i32 = 3;
    pub const WANT_X509_LOOKUP: i32 = 4;
    pub const SYSCALL: i32 = 5;
    pub const ZERO_RETURN: i32 = 6;
    pub const WANT_CONNECT: i32 = 7;
    pub const WANT_ACCEPT: i32 = 8;
    pub const WANT_ASYNC: i32 = 9;
    pub const WANT_ASYNC_JOB: i32 = 10;
    pub const WANT_CLIENT_HELLO_CB: i32 = 11;
    pub const WANT_RETRY_VERIFY: i32 = 12;
    /// Not asked (the call returned 0 or 1).
    pub const NOT_ASKED: i32 = -1;

    /// Whether the code means "call again when the socket is ready": a retry, not an outcome.
    pub const fn is_retry(code: i32) -> bool {
        matches!(
            code,
            WANT_READ
                | WANT_WRITE
                | WANT_X509_LOOKUP
                | WANT_CONNECT
                | WANT_ACCEPT
                | WANT_ASYNC
                | WANT_ASYNC_JOB
                | WANT_CLIENT_HELLO_CB
                | WANT_RETRY_VERIFY
        )
    }

    pub const fn name(code: i32) -> &'static str {
        match code {
            NONE => "SSL_ERROR_NONE",
            SSL => "SSL_ERROR_SSL",
            SYSCALL => "SSL_ERROR_SYSCALL",
            ZERO_RETURN => "SSL_ERROR_ZERO_RETURN",
            NOT_ASKED => "not asked",
            _ if is_retry(code) => "SSL_ERROR_WANT_*",
            _ => "unknown",
        }
    }
}

/// One completed handshake as the library reported it (`header.kind` =
/// [`crate::conn::kind::HANDSHAKE_CALL`], `header.ts_ns` = the completing call's return).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCallEvent {
    pub header: crate::conn::EventHeader,
    /// Entry of the session's first handshake call: the application started the handshake.
    pub started_ns: u64,
    /// Entry of the call that completed it.
    pub enter_ns: u64,
    /// The library's session object (OpenSSL `SSL *`), for diagnostics.
    pub session: u64,
    /// The socket whose ciphertext a call of this handshake moved (0 = none seen: a memory BIO,
    /// or a socket out of scope).
    pub skaddr: u64,
    pub netns_ino: u32,
    /// The completing call's return value.
    pub ret: i32,
    /// `SSL_get_error`'s return for it, or [`ssl_error::NOT_ASKED`].
    pub ssl_error: i32,
    /// Handshake calls on the session up to and including the completing one (saturating).
    pub calls: u16,
    /// One of [`function`].
    pub function: u8,
    /// One of [`outcome`].
    pub outcome: u8,
}
const _: () = assert!(core::mem::size_of::<HandshakeCallEvent>() == 64);

/// A handshake call in progress on a thread (kernel-side state).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCall {
    pub enter_ns: u64,
    pub session: u64,
    /// The first ciphertext syscall's socket inside the call (0 = none yet).
    pub skaddr: u64,
    pub netns_ino: u32,
    /// Nested handshake functions entered (SSL_connect -> SSL_do_handshake).
    pub depth: u16,
    pub function: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<HandshakeCall>() == 32);

/// A session whose handshake started and has not completed (kernel-side state).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeSession {
    pub started_ns: u64,
    pub skaddr: u64,
    pub netns_ino: u32,
    pub calls: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<HandshakeSession>() == 24);

/// A call that returned -1, waiting for the thread's `SSL_get_error` (kernel-side state).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictWait {
    pub call: HandshakeCall,
    pub ret: i32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VerdictWait>() == 40);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::HandshakeCallEvent {}
}
