//! The NIC layer: when a TCP segment crossed the host's network interface, from tc programs on
//! egress and ingress. Keyed by the segment's connection (from the host's side) and the
//! sequence number of its first byte, so that user space can ask "when did the segment that
//! starts with this request's (or response's) first byte leave (or arrive)?"

/// A data segment, as the host sees its connection. IPv4 addresses sit in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NicKey {
    /// This host's address and port (the source on egress, the destination on ingress);
    /// addresses in network byte order, ports in host byte order.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// Sequence number of the segment's first payload byte (host byte order).
    pub seq: u32,
}
const _: () = assert!(core::mem::size_of::<NicKey>() == 40);

#[cfg(feature = "user")]
unsafe impl aya::Pod for NicKey {}
