//! Every map of the eBPF object, named as in `tracer_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    conn::{ListenerInfo, ListenerKey, SockContext},
    maps::{COUNTER_COUNT, Counter},
};

/// Kernel -> user records. The size here is a placeholder: the loader sets it
/// (`--ring-buffer-mib`, 4 MiB by default: ~15k request records of a burst before any drop).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
pub static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(256, 0);

#[map]
pub static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

#[map]
pub static PORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(256, 0);

/// Per observed socket: who owns it and when its current phase began. LRU so that sockets we
/// never see close (agent started late, lost events) cannot fill it.
#[map]
pub static SOCKS: LruHashMap<u64, SockContext> = LruHashMap::with_max_entries(65536, 0);

/// Listening sockets in scope: gives accepted connections, which establish in softirq context
/// where the current task is unrelated, the pid and name of the server.
#[map]
pub static LISTENERS: LruHashMap<ListenerKey, ListenerInfo> = LruHashMap::with_max_entries(4096, 0);

/// Capability probes of `hoptrace check`: hits per probe kind (index = capability::Probe).
#[map]
pub static CHECK_HITS: aya_ebpf::maps::Array<u64> = aya_ebpf::maps::Array::with_max_entries(8, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer, a plain add is enough.
        unsafe { *slot += 1 };
    }
}
