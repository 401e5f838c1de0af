//! uprobes/uretprobes on OpenSSL's `SSL_write`, `SSL_write_ex`, `SSL_read` and `SSL_read_ex`
//! (1.1 and 3.x share these signatures), in a dynamic libssl or in a binary that links OpenSSL
//! statically and exports them (node). User space attaches them per library file
//! (tls_uprobes.rs). Entry remembers the buffer; the return reports the plaintext, only when
//! the call moved bytes: OpenSSL returns <= 0 (with SSL_ERROR_WANT_*) while a handshake
//! finishes or the socket would block, and the caller retries with the same buffer.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    data::{DIRECTION_RECV, DIRECTION_SEND},
    plaintext::library::OPENSSL,
};

use crate::tls_plaintext;

/// `int SSL_write(SSL *s, const void *buf, int num)` and
/// `int SSL_read(SSL *s, void *buf, int num)`: the count is the return value.
#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u8, moved_out: bool) {
    let (Some(ssl), Some(buffer)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    // `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`, and
    // SSL_read_ex's `size_t *readbytes`: the count is stored there when the call returns 1.
    let out = if moved_out {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    tls_plaintext::call_enter(OPENSSL, direction, ssl, buffer, out);
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_SEND, false);
    0
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_SEND, true);
    0
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_RECV, false);
    0
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_RECV, true);
    0
}

/// Return of SSL_write / SSL_read: > 0 is the bytes moved.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    tls_plaintext::call_return(Some(if ret > 0 { ret as u64 } else { 0 }));
    0
}

/// Return of SSL_write_ex / SSL_read_ex: 1 = success, the count is behind the out pointer.
#[uretprobe]
pub fn ssl_ex_return(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    tls_plaintext::call_return(if ret == 1 { None } else { Some(0) });
    0
}
