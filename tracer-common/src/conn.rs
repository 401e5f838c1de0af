//! TCP connection lifecycle records, written by the `sock:inet_sock_set_state` probe.
//!
//! The kernel keeps per-socket context (who connected, when) in an LRU map so that each record
//! is self-contained: user space turns one record into one span without any state of its own.

/// Kinds of ring-buffer records. Fixed numbers, never reused.
pub mod kind {
    pub const CONN: u8 = 1;
    pub const DATA: u8 = 2;
    /// [`crate::plaintext::PlaintextEvent`]: plaintext of a TLS socket, from a library uprobe.
    pub const PLAINTEXT: u8 = 3;
    /// [`crate::handshake_call::HandshakeCallEvent`]: a TLS library reported a handshake done
    /// or failed.
    pub const HANDSHAKE_CALL: u8 = 4;
}

/// TCP states as in include/net/tcp_states.h (kernel ABI).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// `AF_INET` and `AF_INET6` (kernel ABI).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`: the tracepoint also fires for other inet protocols (MPTCP, SCTP).
pub const IPPROTO_TCP: u16 = 6;

/// Header every ring-buffer record starts with; `kind` first so user space can dispatch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`kind`].
    pub kind: u8,
    pub _pad: [u8; 3],
    /// Process id (tgid) the socket belongs to: the connecting process on the client side, the
    /// listening process on the server side; 0 when unknown (socket older than the agent).
    pub tgid: u32,
    /// When the event happened: ns of CLOCK_MONOTONIC (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 16);

/// One reported TCP state transition of an observed socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    /// Kernel address of the `struct sock`: identifies the socket while it lives.
    pub skaddr: u64,
    /// When the phase that this transition ends began, ns of CLOCK_MONOTONIC: the connect()
    /// for [`ConnTransition::ConnectDone`]/[`ConnTransition::ConnectFailed`], the
    /// establishment for [`ConnTransition::Aborted`]; 0 when the kernel did not see it.
    pub phase_start_ns: u64,
    /// Inode number of the socket's network namespace.
    pub netns_ino: u32,
    /// Pending socket error (`sk_err`, a positive errno) at the transition; 0 = none.
    pub sk_err: i32,
    /// Smoothed RTT in microseconds at the transition (`srtt_us >> 3`); 0 = no sample. On a
    /// server socket that just got established this is the SYN-ACK -> ACK round trip.
    pub srtt_us: u32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// TCP states before and after ([`tcp_state`]).
    pub oldstate: u8,
    pub newstate: u8,
    pub _pad: [u8; 4],
    /// Local address: IPv4 in the first 4 bytes, or IPv6; network byte order.
    pub saddr: [u8; 16],
    /// Remote address, as `saddr`.
    pub daddr: [u8; 16],
    /// Command name (`comm`) of the process in `tgid`, NUL-padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 104);

/// The transitions hoptrace reports; every other transition only updates kernel maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnTransition {
    /// CLOSE -> SYN_SENT: connect() sent the SYN (process context).
    ConnectStart,
    /// SYN_SENT -> ESTABLISHED: the SYN-ACK arrived.
    ConnectDone,
    /// SYN_SENT -> CLOSE: refused, timed out, unreachable or aborted (see `sk_err`).
    ConnectFailed,
    /// SYN_RECV -> ESTABLISHED: the server side's handshake completed.
    AcceptDone,
    /// SYN_RECV -> CLOSE: the server side's child socket died before establishing.
    AcceptFailed,
    /// ESTABLISHED -> CLOSE: a reset (received or sent) or an abort, never a graceful close.
    Aborted,
    /// FIN_WAIT1/FIN_WAIT2/CLOSING/TIME_WAIT/CLOSE_WAIT/LAST_ACK -> CLOSE: a graceful close
    /// ended the socket. No span; user space forgets the socket at once, instead of holding
    /// its state until the address is reused or the idle timeout (at thousands of new
    /// connections a second, that state was tens of MiB).
    Closed,
    /// CLOSE -> LISTEN: a listener appeared (recorded in the kernel, not reported).
    Listen,
}

impl ConnTransition {
    /// Classifies a transition. Pure and shared: the eBPF probe uses it to decide what to
    /// record, user space to decode what it got.
    pub const fn classify(oldstate: u8, newstate: u8) -> Option<Self> {
        use tcp_state::*;
        Some(match (oldstate, newstate) {
            (CLOSE, SYN_SENT) => Self::ConnectStart,
            (SYN_SENT, ESTABLISHED) => Self::ConnectDone,
            (SYN_SENT, CLOSE) => Self::ConnectFailed,
            (SYN_RECV, ESTABLISHED) => Self::AcceptDone,
            (SYN_RECV, CLOSE) => Self::AcceptFailed,
            (ESTABLISHED, CLOSE) => Self::Aborted,
            (FIN_WAIT1 | FIN_WAIT2 | CLOSING | TIME_WAIT | CLOSE_WAIT | LAST_ACK, CLOSE) => {
                Self::Closed
            }
            (CLOSE, LISTEN) => Self::Listen,
            _ => return None,
        })
    }

    /// Whether this transition becomes a ring-buffer record (the rest update kernel maps).
    pub const fn is_reported(self) -> bool {
        !matches!(self, Self::ConnectStart | Self::Listen)
    }
}

/// Key of the kernel's listener table: which process listens on a port in a namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerKey {
    pub netns_ino: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 8);

/// What the kernel remembers about an observed socket between transitions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockContext {
    /// Start of the current phase (connect() or establishment), ns of CLOCK_MONOTONIC.
    pub phase_start_ns: u64,
    pub tgid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SockContext>() == 32);

/// What the kernel remembers about a listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerInfo {
    pub tgid: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ListenerInfo>() == 20);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::ListenerInfo {}
}

#[cfg(test)]
mod tests {
    use super::{ConnTransition::*, tcp_state::*, *};

    #[test]
    fn classifies_the_transitions_that_matter() {
        let table = [
            (CLOSE, SYN_SENT, Some(ConnectStart)),
            (SYN_SENT, ESTABLISHED, Some(ConnectDone)),
            (SYN_SENT, CLOSE, Some(ConnectFailed)),
            (SYN_RECV, ESTABLISHED, Some(AcceptDone)),
            (SYN_RECV, CLOSE, Some(AcceptFailed)),
            (ESTABLISHED, CLOSE, Some(Aborted)),
            (CLOSE, LISTEN, Some(Listen)),
            // A graceful close goes through FIN_WAIT1 or CLOSE_WAIT: not an abort; it is
            // reported when the socket finally closes.
            (ESTABLISHED, FIN_WAIT1, None),
            (ESTABLISHED, CLOSE_WAIT, None),
            (FIN_WAIT2, CLOSE, Some(Closed)),
            (LAST_ACK, CLOSE, Some(Closed)),
            (FIN_WAIT1, CLOSE, Some(Closed)),
            (LISTEN, SYN_RECV, None),
            (LISTEN, CLOSE, None),
        ];
        for (old, new, want) in table {
            assert_eq!(ConnTransition::classify(old, new), want, "{old} -> {new}");
        }
    }

    #[test]
    fn connect_start_and_listen_stay_in_the_kernel() {
        assert!(!ConnectStart.is_reported());
        assert!(!Listen.is_reported());
        assert!(ConnectDone.is_reported() && Aborted.is_reported() && AcceptDone.is_reported());
        assert!(Closed.is_reported());
    }
}
