//! The NIC layer: tc classifiers on the observed namespaces' interfaces (TCX on 6.6+, clsact
//! before) record when each TCP data segment left or arrived, keyed by connection and first
//! sequence number (tracer_common::nic::NicKey). User space looks up the segments that carry a
//! request's or a response's first byte. Programs only read the packet and always pass it.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::LruHashMap,
    programs::TcContext,
};
use tracer_common::nic::NicKey;

#[map]
static NIC_TX: LruHashMap<NicKey, u64> = LruHashMap::with_max_entries(65536, 0);

#[map]
pub static NIC_RX: LruHashMap<NicKey, u64> = LruHashMap::with_max_entries(65536, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;

#[classifier]
pub fn nic_egress(ctx: TcContext) -> i32 {
    if let Some(key) = segment(&ctx, true) {
        let now = unsafe { bpf_ktime_get_ns() };
        // First transmission wins: a retransmission must not move the time the data first left.
        let _ = NIC_TX.insert(&key, &now, aya_ebpf::bindings::BPF_NOEXIST as u64);
    }
    TC_ACT_OK
}

#[classifier]
pub fn nic_ingress(ctx: TcContext) -> i32 {
    if let Some(key) = segment(&ctx, false) {
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = NIC_RX.insert(&key, &now, aya_ebpf::bindings::BPF_NOEXIST as u64);
    }
    TC_ACT_OK
}

/// The key of a TCP segment with payload, from this host's side; None for anything else.
#[inline(always)]
fn segment(ctx: &TcContext, egress: bool) -> Option<NicKey> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut key = NicKey::default();
    let (src, dst, l4, payload_total) = match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            if ihl < 20 || ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
                return None;
            }
            // Fragments carry no TCP header at the offset we would read.
            let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
            if frag & 0x3fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?));
            let src: [u8; 4] = ctx.load(ETH_HLEN + 12).ok()?;
            let dst: [u8; 4] = ctx.load(ETH_HLEN + 16).ok()?;
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s[..4].copy_from_slice(&src);
            d[..4].copy_from_slice(&dst);
            (s, d, ETH_HLEN + ihl, total.checked_sub(ihl)?)
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: a segment behind one has no NIC time.
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_TCP {
                return None;
            }
            let payload = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?));
            let src: [u8; 16] = ctx.load(ETH_HLEN + 8).ok()?;
            let dst: [u8; 16] = ctx.load(ETH_HLEN + 24).ok()?;
            (src, dst, ETH_HLEN + 40, payload)
        }
        _ => return None,
    };
    let sport = u16::from_be(ctx.load::<u16>(l4).ok()?);
    let dport = u16::from_be(ctx.load::<u16>(l4 + 2).ok()?);
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4).ok()?);
    let data_offset: u8 = ctx.load(l4 + 12).ok()?;
    let tcp_header = usize::from(data_offset >> 4) * 4;
    // GSO/GRO packets report their whole length here too: "has payload" is what matters.
    if payload_total <= tcp_header {
        return None;
    }
    if egress {
        (
            key.local_addr,
            key.remote_addr,
            key.local_port,
            key.remote_port,
        ) = (src, dst, sport, dport);
    } else {
        (
            key.local_addr,
            key.remote_addr,
            key.local_port,
            key.remote_port,
        ) = (dst, src, dport, sport);
    }
    key.seq = seq;
    Some(key)
}
