//! hoptrace's eBPF programs. One module per hook family; every map lives in [`maps`].
#![no_std]
#![no_main]

mod capability;
mod conn;
mod data;
mod maps;
mod nic;
mod scope;
mod tls_go;
mod tls_openssl;
mod tls_openssl_handshake;
mod tls_plaintext;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic; this only satisfies the linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
