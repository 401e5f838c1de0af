//! Socket data records: one per send or receive syscall on an observed TCP socket, with the
//! timestamps of each layer the kernel offers and a bounded prefix of the bytes moved (enough for
//! an HTTP/1.x head with its traceparent; bodies are never needed and never exported).

use crate::conn::EventHeader;

/// Bytes of payload the kernel copies per syscall at most. A power of two: the probes mask
/// offsets with it so the verifier can prove every copy stays in bounds.
pub const MAX_CAPTURE: usize = 1024;

pub const DIRECTION_SEND: u8 = 0;
pub const DIRECTION_RECV: u8 = 1;

/// Which syscall shape moved the bytes: where the kernel finds the buffer.
pub mod buffer_kind {
    /// write/read, sendto/recvfrom: one buffer.
    pub const PLAIN: u8 = 0;
    /// writev/readv: an iovec array.
    pub const IOVEC: u8 = 1;
    /// sendmsg/recvmsg: a user_msghdr pointing at an iovec array.
    pub const MSGHDR: u8 = 2;
    /// sendfile: bytes straight from a file, nothing to copy; recorded so that stream
    /// positions stay right (nginx sends bodies this way, heads with writev).
    pub const NONE: u8 = 3;
}

/// One send or receive on an observed socket. Only the first `captured` bytes of `data` are
/// transmitted: the ring-buffer record is [`DATA_HEADER_LEN`] + `captured` bytes long.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataEvent {
    /// `header.ts_ns`: the syscall's return (ns, CLOCK_MONOTONIC).
    pub header: EventHeader,
    /// Kernel address of the `struct sock`.
    pub skaddr: u64,
    /// The syscall's entry: the application handing bytes over (send) or asking for them (recv).
    pub enter_ns: u64,
    /// The TCP layer: send, when tcp_sendmsg had queued the bytes (`sock:sock_send_length`);
    /// receive, when the first segment of the unread data reached TCP (`tcp:tcp_probe`).
    /// 0 = not seen.
    pub tcp_ns: u64,
    /// Receive only: when the segment starting with the first byte read arrived at a NIC
    /// (looked up in the kernel at the read: the arrival is already recorded then); 0 = unknown.
    pub nic_ns: u64,
    pub netns_ino: u32,
    /// Bytes the syscall moved (its return value).
    pub len: u32,
    /// Valid bytes at the start of `data` (<= [`MAX_CAPTURE`]).
    pub captured: u16,
    /// [`DIRECTION_SEND`] or [`DIRECTION_RECV`].
    pub direction: u8,
    /// AF_INET or AF_INET6 (fits a byte).
    pub family: u8,
    /// Local and remote ports, host byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP sequence number of the first byte moved (for the NIC layer's lookup).
    pub seq: u32,
    pub _pad: u32,
    /// Local and remote addresses, network byte order (IPv4 in the first 4 bytes).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; 16],
    pub data: [u8; MAX_CAPTURE],
}

/// Size of everything before `data`.
pub const DATA_HEADER_LEN: usize = core::mem::offset_of!(DataEvent, data);
const _: () = assert!(DATA_HEADER_LEN == 120);
const _: () = assert!(core::mem::size_of::<DataEvent>() == DATA_HEADER_LEN + MAX_CAPTURE);

/// What a probe remembers between a syscall's entry and its exit (keyed by pid_tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallContext {
    pub enter_ns: u64,
    /// User pointer: the buffer, the iovec array or the msghdr, per `buffer_kind`.
    pub buffer: u64,
    /// Filled by the socket tracepoint that fires inside the syscall; 0 = not a TCP socket
    /// in scope (then the exit emits nothing).
    pub skaddr: u64,
    pub tcp_ns: u64,
    pub direction: u8,
    pub buffer_kind: u8,
    pub _pad: [u8; 2],
    /// iovec count for [`buffer_kind::IOVEC`] (from the syscall's arguments).
    pub iov_count: u32,
    /// TCP sequence number of the first byte moved, from the socket tracepoint.
    pub seq: u32,
    /// The socket's network namespace, read once by the socket tracepoint for its scope check.
    pub netns_ino: u32,
}
const _: () = assert!(core::mem::size_of::<SyscallContext>() == 48);

#[cfg(feature = "user")]
unsafe impl aya::Pod for DataEvent {}
