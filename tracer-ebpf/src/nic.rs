//! The NIC layer: tc classifiers on the observed namespaces' interfaces (TCX on 6.6+, clsact
//! before) record when each TCP data segment left or arrived, keyed by connection and first
//! sequence number (tracer_common::nic::NicKey) in direct-mapped tables (see tracer_common::nic
//! for why not a hash map). User space looks up the segments that carry a request's or a
//! response's first byte. Programs only read the packet and always pass it.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, TC_ACT_OK},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use tracer_common::nic::{NIC_SLOTS, NicKey, NicStamp, bucket};

/// Mmapable: user space reads its egress times straight from this array's memory.
#[map]
static NIC_TX: Array<NicStamp> = Array::with_max_entries(NIC_SLOTS, BPF_F_MMAPABLE);

/// Looked up by the receive probes (data.rs) for a read's first segment; mmapable too: user
/// space looks up a segment further into a read (a request read with the TLS handshake's end).
#[map]
static NIC_RX: Array<NicStamp> = Array::with_max_entries(NIC_SLOTS, BPF_F_MMAPABLE);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;

#[classifier]
pub fn nic_egress(ctx: TcContext) -> i32 {
    if let Some(key) = segment(&ctx, true) {
        record(&NIC_TX, &key);
    }
    TC_ACT_OK
}

#[classifier]
pub fn nic_ingress(ctx: TcContext) -> i32 {
    if let Some(key) = segment(&ctx, false) {
        record(&NIC_RX, &key);
    }
    TC_ACT_OK
}

/// When the segment `key` crossed the NIC, as of now, unless its bucket already holds it: the
/// first transmission wins, a retransmission must not move the time the data first left.
/// Otherwise it replaces the older way of its bucket.
#[inline(always)]
fn record(table: &Array<NicStamp>, key: &NicKey) {
    let first = bucket(key);
    let (Some(a), Some(b)) = (table.get_ptr_mut(first), table.get_ptr_mut(first + 1)) else {
        return;
    };
    // SAFETY: valid slots of the array; a concurrent writer of the same bucket (another CPU,
    // another segment hashing here within nanoseconds) may interleave with this one, and the
    // readers' whole-key comparison then almost always rejects the mixed slot.
    let (a, b) = unsafe { (&mut *a, &mut *b) };
    if (a.ns != 0 && a.key.same_as(key)) || (b.ns != 0 && b.key.same_as(key)) {
        return;
    }
    let stamp = if a.ns <= b.ns { a } else { b };
    // The time is cleared before the key changes and set after: a reader in user space, which
    // reads the time before and after the key, then never pairs the new key with the old time.
    // Volatile, or the first store would be dropped as overwritten.
    unsafe { core::ptr::write_volatile(&mut stamp.ns, 0) };
    stamp.key = *key;
    unsafe { core::ptr::write_volatile(&mut stamp.ns, bpf_ktime_get_ns()) };
}

/// When the segment `key` arrived, if its bucket still holds it.
#[inline(always)]
pub fn arrival(key: &NicKey) -> Option<u64> {
    let first = bucket(key);
    for index in [first, first + 1] {
        let stamp = NIC_RX.get(index)?;
        if stamp.ns != 0 && stamp.key.same_as(key) {
            return Some(stamp.ns);
        }
    }
    None
}

/// The key of a TCP segment with payload, from this host's side; None for anything else.
/// Each header is read with one helper call: they are most of what a packet costs here, and
/// most packets (ACKs) are dropped from consideration only once both headers are read.
#[inline(always)]
fn segment(ctx: &TcContext, egress: bool) -> Option<NicKey> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    let (l4, payload_total) = match ethertype {
        ETH_P_IP => {
            let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            // Fragments carry no TCP header at the offset we would read.
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if ihl < 20 || ip[9] != IPPROTO_TCP || fragment {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            src[..4].copy_from_slice(&ip[12..16]);
            dst[..4].copy_from_slice(&ip[16..20]);
            (ETH_HLEN + ihl, total.checked_sub(ihl)?)
        }
        ETH_P_IPV6 => {
            let ip: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
            // Extension headers are not followed: a segment behind one has no NIC time.
            if ip[6] != IPPROTO_TCP {
                return None;
            }
            src = ctx.load(ETH_HLEN + 8).ok()?;
            dst = ctx.load(ETH_HLEN + 24).ok()?;
            (ETH_HLEN + 40, usize::from(u16::from_be_bytes([ip[4], ip[5]])))
        }
        _ => return None,
    };
    // Ports, sequence number and data offset: the first 13 bytes of the TCP header.
    let tcp: [u8; 16] = ctx.load(l4).ok()?;
    let tcp_header = usize::from(tcp[12] >> 4) * 4;
    // GSO/GRO packets report their whole length here too: "has payload" is what matters.
    if payload_total <= tcp_header {
        return None;
    }
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Some(if egress {
        NicKey {
            local_addr: src,
            remote_addr: dst,
            local_port: sport,
            remote_port: dport,
            seq,
        }
    } else {
        NicKey {
            local_addr: dst,
            remote_addr: src,
            local_port: dport,
            remote_port: sport,
            seq,
        }
    })
}
