//! Loading hoptrace's eBPF object: load-time globals, scope maps, and the probe table that says
//! which program attaches where.

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, PerCpuArray},
    programs::TracePoint,
};
use tracer_common::{
    conn::{ListenerInfo, ListenerKey},
    maps::{self, COUNTER_COUNT, Counter, KernelOffsets, globals},
};

use crate::{kernel_offsets, listeners, scope::Scope, tracefs};

/// The eBPF object built by build.rs from tracer-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

/// A tracepoint the agent attaches, with the record layout its program was written against.
pub struct TracepointProbe {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    pub layout: &'static [(&'static str, usize, usize)],
    pub why: &'static str,
}

/// What `hoptrace agent` attaches. All of it is required: it stands on stable tracepoints only.
pub const AGENT_PROBES: &[TracepointProbe] = &[TracepointProbe {
    program: "inet_sock_set_state",
    category: "sock",
    name: "inet_sock_set_state",
    layout: &[
        ("skaddr", 8, 8),
        ("oldstate", 16, 4),
        ("newstate", 20, 4),
        ("sport", 24, 2),
        ("dport", 26, 2),
        ("family", 28, 2),
        ("protocol", 30, 2),
        ("saddr", 32, 4),
        ("daddr", 36, 4),
        ("saddr_v6", 40, 16),
        ("daddr_v6", 56, 16),
    ],
    why: "TCP connect, accept, refused, timed out, reset",
}];

/// Loads the object with the scope's switches and the kernel's struct offsets, fills the scope
/// maps and attaches every agent probe. Dropping the returned `Ebpf` detaches everything.
pub fn load_agent(scope: &Scope) -> anyhow::Result<Ebpf> {
    for probe in AGENT_PROBES {
        tracefs::verify_layout(probe.category, probe.name, probe.layout)?;
    }
    let offsets = kernel_offsets::resolve()?;
    let mut ebpf = load_object(scope, &offsets)?;
    fill_scope_maps(&mut ebpf, scope)?;
    seed_listeners(&mut ebpf, scope)?;
    for probe in AGENT_PROBES {
        let program: &mut TracePoint = ebpf
            .program_mut(probe.program)
            .with_context(|| format!("program {} missing from the object", probe.program))?
            .try_into()?;
        program.load().with_context(|| format!("loading {}", probe.program))?;
        program
            .attach(probe.category, probe.name)
            .with_context(|| format!("attaching to tracepoint {}:{}", probe.category, probe.name))?;
    }
    Ok(ebpf)
}

/// Loads the object without attaching anything (`hoptrace check` attaches its own probes).
pub fn load_object(scope: &Scope, offsets: &KernelOffsets) -> anyhow::Result<Ebpf> {
    let on = |enabled: bool| u32::from(enabled);
    let (netns, pids, ports) =
        (on(!scope.netns.is_empty()), on(!scope.pids.is_empty()), on(!scope.ports.is_empty()));
    EbpfLoader::new()
        .override_global(globals::FILTER_NETNS, &netns, true)
        .override_global(globals::FILTER_PID, &pids, true)
        .override_global(globals::FILTER_PORT, &ports, true)
        .override_global(globals::KERNEL_OFFSETS, offsets, true)
        .load(OBJECT)
        .map_err(|e| explain_load_error(e.into()))
}

fn fill_scope_maps(ebpf: &mut Ebpf, scope: &Scope) -> anyhow::Result<()> {
    let mut netns: HashMap<_, u32, u8> = HashMap::try_from(map(ebpf, maps::NETNS_FILTER)?)?;
    for ns in &scope.netns {
        netns.insert(&ns.inode, &1, 0)?;
    }
    let mut pids: HashMap<_, u32, u8> = HashMap::try_from(map(ebpf, maps::PID_FILTER)?)?;
    for &pid in &scope.pids {
        pids.insert(&pid, &1, 0)?;
    }
    let mut ports: HashMap<_, u16, u8> = HashMap::try_from(map(ebpf, maps::PORT_FILTER)?)?;
    for &port in &scope.ports {
        ports.insert(&port, &1, 0)?;
    }
    Ok(())
}

/// Tells the kernel about servers that were listening before the agent started.
fn seed_listeners(ebpf: &mut Ebpf, scope: &Scope) -> anyhow::Result<()> {
    let netns: Vec<u32> = scope.netns.iter().map(|n| n.inode).collect();
    let mut listeners: HashMap<_, ListenerKey, ListenerInfo> =
        HashMap::try_from(map(ebpf, maps::LISTENERS)?)?;
    let existing = listeners::existing(&netns);
    log::debug!("{} listening sockets existed before the agent", existing.len());
    for (key, info) in existing {
        listeners.insert(&key, &info, 0)?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).with_context(|| format!("map {name} missing from the eBPF object"))
}

/// The kernel's counters, summed over CPUs, indexed by [`Counter`].
pub fn read_counters(ebpf: &Ebpf) -> anyhow::Result<[u64; COUNTER_COUNT as usize]> {
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(maps::COUNTERS).context("COUNTERS map missing")?)?;
    let mut sums = [0u64; COUNTER_COUNT as usize];
    for (index, sum) in sums.iter_mut().enumerate() {
        *sum = counters.get(&(index as u32), 0)?.iter().sum();
    }
    Ok(sums)
}

pub fn counter(counters: &[u64; COUNTER_COUNT as usize], which: Counter) -> u64 {
    counters[which as usize]
}

/// Turns the usual load failures into what to do about them.
fn explain_load_error(error: anyhow::Error) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("EPERM") || text.contains("Operation not permitted") {
        if unsafe { libc::geteuid() } != 0 {
            return error.context(
                "loading eBPF programs needs root, or CAP_BPF + CAP_PERFMON (+ CAP_NET_ADMIN \
                 for tc): run with sudo",
            );
        }
        return error.context("the kernel refused to load eBPF (lockdown or a seccomp policy?)");
    }
    error
}

/// Fails with a clear message when not running with enough privilege to do anything useful.
pub fn require_privilege() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 && !has_cap_bpf() {
        bail!(
            "hoptrace needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load eBPF \
             programs: run it with sudo"
        );
    }
    Ok(())
}

/// CAP_BPF (39) in the effective set, read from /proc so no capability crate is needed.
fn has_cap_bpf() -> bool {
    const CAP_BPF: u32 = 39;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_BPF) != 0)
}
