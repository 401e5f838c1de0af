//! The NIC layer in user space: attaching the tc classifiers to the interfaces of the observed
//! network namespaces, and looking up when a segment crossed them.
//!
//! tc attachments name an interface by index, and an index only means something inside its
//! namespace, so each namespace's interfaces are listed and attached from a thread that has
//! entered that namespace (setns is per thread; the process stays where it is).

use std::{ffi::CStr, fs::File, net::IpAddr, os::fd::AsRawFd as _, path::PathBuf};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Map, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use tracer_common::{
    maps,
    nic::{NIC_SLOTS, NIC_WAYS, NicKey, NicStamp, bucket},
};

use crate::scope::Scope;

/// Attaches `nic_egress` and `nic_ingress` to every interface but loopback in each observed
/// namespace (the agent's own namespace when none is named). Returns how many interfaces.
pub fn attach(ebpf: &mut Ebpf, scope: &Scope) -> anyhow::Result<usize> {
    let namespaces: Vec<Option<PathBuf>> = if scope.netns.is_empty() {
        vec![None]
    } else {
        scope.netns.iter().map(|n| Some(n.path.clone())).collect()
    };
    for name in ["nic_egress", "nic_ingress"] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
    }
    let mut attached = 0;
    for namespace in namespaces {
        attached += std::thread::scope(|s| {
            s.spawn(|| attach_in(ebpf, namespace.as_ref()))
                .join()
                .map_err(|_| anyhow::anyhow!("tc attach thread panicked"))?
        })?;
    }
    Ok(attached)
}

/// Runs on its own thread: enters `namespace` (if any) and attaches there.
fn attach_in(ebpf: &mut Ebpf, namespace: Option<&PathBuf>) -> anyhow::Result<usize> {
    if let Some(path) = namespace {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {}", path.display()));
        }
    }
    // Before TCX (6.6) tc programs hang off a clsact qdisc, which must exist first.
    let needs_clsact = aya::util::KernelVersion::current()
        .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0));
    let mut count = 0;
    for (index, name) in interfaces()? {
        if name == "lo" {
            continue;
        }
        if needs_clsact {
            let _ = aya::programs::tc::qdisc_add_clsact(index);
        }
        for (program, direction) in [
            ("nic_egress", TcAttachType::Egress),
            ("nic_ingress", TcAttachType::Ingress),
        ] {
            if needs_clsact {
                // Netlink tc filters, unlike TCX links, outlive the process that attached them:
                // an agent killed with SIGKILL leaves its filters running. Remove them so that a
                // restart does not stack a second set of timestamps on the same packets.
                if aya::programs::tc::qdisc_detach_program(index, direction.into(), program).is_ok()
                {
                    log::info!("removed a stale tc {direction:?} filter {program} from {name}");
                }
            }
            let program: &mut SchedClassifier = ebpf
                .program_mut(program)
                .context("tc program missing")?
                .try_into()?;
            program
                .attach(index, direction)
                .with_context(|| format!("attaching tc {direction:?} to {name}"))?;
        }
        count += 1;
    }
    Ok(count)
}

/// Interfaces of the calling thread's network namespace (if_nameindex asks netlink there).
fn interfaces() -> anyhow::Result<Vec<(u32, String)>> {
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        bail!("if_nameindex: {}", std::io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut entry = list;
    // SAFETY: the array ends with an entry whose index is 0; freed below.
    unsafe {
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            found.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(found)
}

/// When segments crossed a NIC, by connection and first sequence number. (A receive record
/// comes with the arrival of the segment its first byte started: the kernel looks it up at the
/// read. `ingress` is for segments further into a read.)
pub trait NicTimes {
    fn egress(&self, key: &NicKey) -> Option<u64>;
    fn ingress(&self, key: &NicKey) -> Option<u64>;
}

/// The kernel's egress and ingress tables, read at span-building time: a request's segment
/// left before its response came back, a response's before the persona's next read or the
/// span's end; a segment arrived before the read that returned its bytes.
pub struct KernelNicTimes {
    tx: MappedTable,
    rx: MappedTable,
}

impl KernelNicTimes {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            tx: MappedTable::take(ebpf, maps::NIC_TX)?,
            rx: MappedTable::take(ebpf, maps::NIC_RX)?,
        })
    }
}

impl NicTimes for KernelNicTimes {
    fn egress(&self, key: &NicKey) -> Option<u64> {
        self.tx.lookup(key)
    }

    fn ingress(&self, key: &NicKey) -> Option<u64> {
        self.rx.lookup(key)
    }
}

/// One NIC table, created mmapable (BPF_F_MMAPABLE) and mapped read-only into the agent, so a
/// lookup reads its slot from memory: a bpf() system call per span was ~6 % of the agent's CPU.
struct MappedTable {
    /// The map, whose file descriptor keeps the mapped object alive.
    _map: MapData,
    slots: std::ptr::NonNull<NicStamp>,
    mapped_len: usize,
}

// SAFETY: the mapping is read-only shared memory, valid until drop; reading it from any thread
// is as sound as from the one that mapped it.
unsafe impl Send for MappedTable {}

impl MappedTable {
    fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Self> {
        let map = match ebpf
            .take_map(name)
            .with_context(|| format!("{name} missing"))?
        {
            Map::Array(map) => map,
            _ => bail!("{name} is not an array"),
        };
        let mapped_len = NIC_SLOTS as usize * size_of::<NicStamp>();
        let fd = std::os::fd::AsFd::as_fd(map.fd()).as_raw_fd();
        // SAFETY: a fresh shared read-only mapping of the whole array (array maps are laid out
        // as max_entries values of round_up(value_size, 8) bytes; NicStamp is 48).
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} into memory"));
        }
        let slots =
            std::ptr::NonNull::new(address.cast()).context("mmap returned a null mapping")?;
        Ok(Self {
            _map: map,
            slots,
            mapped_len,
        })
    }

    fn lookup(&self, key: &NicKey) -> Option<u64> {
        use std::sync::atomic::{Ordering, fence};
        let first = bucket(key);
        (first..first + NIC_WAYS).find_map(|index| {
            let stamp = self.slots.as_ptr().wrapping_add(index as usize);
            // The tc program may be rewriting this slot for another segment (key, then time),
            // so the time is read before and after the key, like a sequence lock: a changed time
            // means a write came in between. The bucket may also hold other segments by now
            // (tracer_common::nic): then none is known.
            // SAFETY: bucket() + NIC_WAYS <= NIC_SLOTS, inside the mapping; plain data read
            // volatile because the kernel writes it concurrently.
            let before = unsafe { std::ptr::addr_of!((*stamp).ns).read_volatile() };
            fence(Ordering::Acquire);
            let found = unsafe { std::ptr::addr_of!((*stamp).key).read_volatile() };
            fence(Ordering::Acquire);
            let after = unsafe { std::ptr::addr_of!((*stamp).ns).read_volatile() };
            (before != 0 && before == after && found == *key).then_some(before)
        })
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in take(), unmapped once.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), self.mapped_len) };
    }
}

/// The key of the segment starting at `seq` on the connection `local` <-> `remote`.
pub fn key(local: (IpAddr, u16), remote: (IpAddr, u16), seq: u32) -> NicKey {
    NicKey {
        local_addr: address_bytes(local.0),
        remote_addr: address_bytes(remote.0),
        local_port: local.1,
        remote_port: remote.1,
        seq,
    }
}

fn address_bytes(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}
