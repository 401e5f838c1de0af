//! The NIC layer: when a TCP segment crossed the host's network interface, from tc programs on
//! egress and ingress. Keyed by the segment's connection (from the host's side) and the
//! sequence number of its first byte, so that user space can ask "when did the segment that
//! starts with this request's (or response's) first byte leave (or arrive)?"
//!
//! The tables are arrays of [`NIC_SLOTS`] slots in buckets of [`NIC_WAYS`] (two-way set
//! associative): a segment goes to the bucket its key hashes to ([`bucket`]), into a way that
//! already holds it, else the older of the two. The tc programs run for every packet, and an
//! LRU hash insert per data segment (a global LRU lock, node allocation and eviction scans)
//! cost them ~800 ns a packet; writing a slot costs a hash and a copy. A reader compares the
//! whole key, so a slot overwritten by another segment reads as "no NIC time", never as a wrong
//! one. Lookups follow the write by microseconds to milliseconds (user space reads a request's
//! egress once its response is in). With one way, ~100 writes in between overwrote ~0.2 % of the
//! slots looked up at 20k requests/s; with two, a segment is lost only when two others land in
//! its bucket meanwhile (~1e-5). A span without a NIC time says so in its layers.

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

/// Slots per direction (a power of two: [`bucket`] masks with it). 48 bytes each: 3 MiB.
pub const NIC_SLOTS: u32 = 1 << 16;
/// Slots per bucket.
pub const NIC_WAYS: u32 = 2;

/// One slot of a NIC table: the segment that last hashed here and when it crossed the NIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStamp {
    pub key: NicKey,
    /// ns, CLOCK_MONOTONIC; 0 = an empty slot.
    pub ns: u64,
}
const _: () = assert!(core::mem::size_of::<NicStamp>() == 48);

impl NicKey {
    /// The key as ten native-endian words: compared and hashed word by word, because the eBPF
    /// target has no memcmp to lower a byte-array comparison to.
    #[inline(always)]
    #[must_use]
    pub fn words(&self) -> [u32; 10] {
        // SAFETY: repr(C), 40 bytes without padding (16 + 16 + 2 + 2 + 4), every bit pattern
        // valid for both types, and u32's alignment (4) is NicKey's.
        unsafe { core::mem::transmute::<Self, [u32; 10]>(*self) }
    }

    /// Equality word by word (see [`Self::words`]).
    #[inline(always)]
    #[must_use]
    pub fn same_as(&self, other: &Self) -> bool {
        let (a, b) = (self.words(), other.words());
        let mut differ = 0;
        let mut i = 0;
        while i < 10 {
            differ |= a[i] ^ b[i];
            i += 1;
        }
        differ == 0
    }
}

/// The first slot of `key`'s bucket in a NIC table (its ways follow): a multiplicative hash of
/// its words, so that the segments of one connection (sequence numbers a segment length apart)
/// and the connections of one host pair (ports apart) spread over the table.
#[inline(always)]
#[must_use]
pub fn bucket(key: &NicKey) -> u32 {
    let words = key.words();
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 10 {
        hash = (hash ^ words[i]).wrapping_mul(0x9e37_79b1);
        hash ^= hash >> 15;
        i += 1;
    }
    hash & (NIC_SLOTS - 1) & !(NIC_WAYS - 1)
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for NicKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for NicStamp {}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(local_port: u16, seq: u32) -> NicKey {
        let mut key = NicKey {
            local_port,
            remote_port: 80,
            seq,
            ..NicKey::default()
        };
        key.local_addr[..4].copy_from_slice(&[10, 10, 1, 2]);
        key.remote_addr[..4].copy_from_slice(&[10, 10, 2, 2]);
        key
    }

    #[test]
    fn equality_is_byte_equality() {
        let a = key(40000, 1);
        assert!(a.same_as(&a));
        for changed in [key(40001, 1), key(40000, 2)] {
            assert!(!a.same_as(&changed));
        }
        let mut other_address = a;
        other_address.remote_addr[15] = 1;
        assert!(!a.same_as(&other_address));
    }

    /// The shape of the lab's traffic: many connections from one client to one server, each
    /// with segments ~100-1000 bytes apart. Collisions among the live keys stay near what a
    /// uniform hash gives (n^2 / 2m pairs), not clustered.
    #[test]
    fn one_host_pairs_traffic_spreads_over_the_buckets() {
        let buckets = f64::from(NIC_SLOTS / NIC_WAYS);
        let mut used = std::collections::HashMap::new();
        let mut keys = 0u32;
        for port in 30000..30064u16 {
            let mut seq = u32::from(port).wrapping_mul(2_654_435_761);
            for _ in 0..64 {
                *used.entry(bucket(&key(port, seq))).or_insert(0u32) += 1;
                seq = seq.wrapping_add(150 + u32::from(port % 7) * 100);
                keys += 1;
            }
        }
        let colliding: u32 = used.values().map(|n| n - 1).sum();
        let expected = f64::from(keys) * f64::from(keys) / (2.0 * buckets);
        assert!(
            f64::from(colliding) < 2.0 * expected + 10.0,
            "{colliding} collisions among {keys} keys (uniform: ~{expected:.0})"
        );
        assert!(
            used.keys()
                .all(|&b| b % NIC_WAYS == 0 && b + NIC_WAYS <= NIC_SLOTS)
        );
    }
}
