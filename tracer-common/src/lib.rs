//! What hoptrace's eBPF programs and its user space agree on: the records the kernel writes to
//! the ring buffer, the names of maps and load-time globals, and pure parsers that both sides
//! (or the host's tests) can run.
//!
//! Records are `#[repr(C)]` with fixed-width integers and explicit padding, never `bool` or enums:
//! the kernel writes raw bytes and user space converts with `TryFrom`. Sizes are asserted at
//! compile time so that a field added on one side cannot silently shift the other.
#![cfg_attr(not(test), no_std)]

pub mod conn;
pub mod data;
pub mod handshake_call;
pub mod http;
pub mod http2;
pub mod maps;
pub mod nic;
pub mod plaintext;
pub mod tls;
pub mod trace_context;
