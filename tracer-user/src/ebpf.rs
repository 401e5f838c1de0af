//! Loading hoptrace's eBPF object: load-time globals, scope maps, and the probe table that says
//! which program attaches where.

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, PerCpuArray},
    programs::{Program, ProgramError, TracePoint},
};
use tracer_common::{
    conn::{ListenerInfo, ListenerKey},
    maps::{self, COUNTER_COUNT, Counter, KernelOffsets, globals},
};

use crate::{kernel_features, kernel_offsets, listeners, nic, scope::Scope, tracefs};

/// The eBPF object built by build.rs from tracer-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

/// What a group of probes gives the agent; a group attaches whole or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// TCP connect/accept/failure spans. Required.
    Connections,
    /// Send/receive syscalls on TCP sockets: request timelines (needs Linux 6.4+ for
    /// sock:sock_{send,recv}_length). Optional: without it, connection spans only.
    Requests,
    /// When received data reached TCP (tcp:tcp_probe). Optional: without it, the persona's
    /// request start is the application's read, flagged as such.
    TcpArrival,
}

/// A tracepoint the agent attaches, with the record layout its program was written against.
pub struct TracepointProbe {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    pub layout: &'static [(&'static str, usize, usize)],
    pub layer: Layer,
}

const SET_STATE_LAYOUT: &[(&str, usize, usize)] = &[
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
];
const SYSCALL_EXIT_LAYOUT: &[(&str, usize, usize)] = &[("ret", 16, 8)];
const SOCK_LENGTH_LAYOUT: &[(&str, usize, usize)] =
    &[("sk", 8, 8), ("protocol", 18, 2), ("ret", 20, 4)];
const TCP_PROBE_LAYOUT: &[(&str, usize, usize)] = &[("data_len", 76, 2), ("skaddr", 128, 8)];

macro_rules! syscall_pair {
    ($enter:literal, $exit:literal, $buffer:literal, $count:literal) => {
        [
            TracepointProbe {
                program: $enter,
                category: "syscalls",
                name: $enter,
                layout: &[($buffer, 24, 8), ($count, 32, 8)],
                layer: Layer::Requests,
            },
            TracepointProbe {
                program: $exit,
                category: "syscalls",
                name: $exit,
                layout: SYSCALL_EXIT_LAYOUT,
                layer: Layer::Requests,
            },
        ]
    };
}

/// What `hoptrace agent` attaches, by layer. Stable tracepoints only.
pub fn agent_probes() -> Vec<TracepointProbe> {
    let mut probes = vec![TracepointProbe {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        layout: SET_STATE_LAYOUT,
        layer: Layer::Connections,
    }];
    // The socket tracepoints first: if they are missing the syscall probes are pointless.
    for (program, name) in [
        ("sock_send_length", "sock_send_length"),
        ("sock_recv_length", "sock_recv_length"),
    ] {
        probes.push(TracepointProbe {
            program,
            category: "sock",
            name,
            layout: SOCK_LENGTH_LAYOUT,
            layer: Layer::Requests,
        });
    }
    probes.extend(syscall_pair!(
        "sys_enter_write",
        "sys_exit_write",
        "buf",
        "count"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_sendto",
        "sys_exit_sendto",
        "buff",
        "len"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_writev",
        "sys_exit_writev",
        "vec",
        "vlen"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_sendmsg",
        "sys_exit_sendmsg",
        "msg",
        "flags"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_sendfile64",
        "sys_exit_sendfile64",
        "in_fd",
        "offset"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_read",
        "sys_exit_read",
        "buf",
        "count"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_recvfrom",
        "sys_exit_recvfrom",
        "ubuf",
        "size"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_readv",
        "sys_exit_readv",
        "vec",
        "vlen"
    ));
    probes.extend(syscall_pair!(
        "sys_enter_recvmsg",
        "sys_exit_recvmsg",
        "msg",
        "flags"
    ));
    probes.push(TracepointProbe {
        program: "tcp_probe",
        category: "tcp",
        name: "tcp_probe",
        layout: TCP_PROBE_LAYOUT,
        layer: Layer::TcpArrival,
    });
    probes
}

impl Layer {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Connections => "TCP connect, accept, refused, timed out, reset",
            Self::Requests => "request timelines (send/recv syscalls on TCP sockets)",
            Self::TcpArrival => "when received data reached TCP",
        }
    }
}

/// The layers that attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub requests: bool,
    pub tcp_arrival: bool,
    /// tc on the observed namespaces' interfaces: NIC egress/ingress times.
    pub nic: bool,
}

impl Attached {
    /// `hoptrace.layers` on request spans: where the timestamps come from.
    pub fn layers(self) -> &'static str {
        match (self.tcp_arrival, self.nic) {
            (true, true) => "syscall,tcp,nic",
            (true, false) => "syscall,tcp",
            (false, true) => "syscall,tcp-send,nic",
            (false, false) => "syscall,tcp-send",
        }
    }
}

/// Detaches and unloads every program of `object`, one thread per program. Each detach of a
/// perf-event tracepoint waits for an RCU grace period under the kernel's event_mutex (60-300
/// ms each on a loaded VM), so those still run one after another; uprobe and tc detaches
/// overlap with them (3.3 s -> 2.2 s for a whole agent on an idle VM).
pub fn detach_all(mut object: Ebpf) {
    std::thread::scope(|threads| {
        for (name, program) in object.programs_mut() {
            threads.spawn(move || match unload(program) {
                Ok(()) | Err(ProgramError::NotLoaded) => {}
                Err(e) => log::warn!("detaching {name}: {e}"),
            });
        }
    });
}

/// Unloads a program in place (aya's `Program::unload` takes it by value, out of `Ebpf`).
fn unload(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::TracePoint(p) => p.unload(),
        Program::UProbe(p) => p.unload(),
        Program::SchedClassifier(p) => p.unload(),
        Program::BtfTracePoint(p) => p.unload(),
        Program::KProbe(p) => p.unload(),
        // Not used by the agent: dropped with `object`, as before.
        _ => Ok(()),
    }
}

/// Loads the object with the scope's switches and the kernel's struct offsets, fills the scope
/// maps and attaches the agent's probes: the connection layer or fail; the optional layers
/// each whole or not at all, with a warning. Dropping the returned `Ebpf` detaches everything.
pub fn load_agent(scope: &Scope, ring_buffer_bytes: u32) -> anyhow::Result<(Ebpf, Attached)> {
    let offsets = kernel_offsets::resolve()?;
    let mut ebpf = load_object(scope, &offsets, ring_buffer_bytes)?;
    fill_scope_maps(&mut ebpf, scope)?;
    seed_listeners(&mut ebpf, scope)?;
    let probes = agent_probes();
    let mut attached = Attached {
        requests: true,
        tcp_arrival: true,
        nic: false,
    };
    for layer in [Layer::Connections, Layer::Requests, Layer::TcpArrival] {
        let group: Vec<_> = probes.iter().filter(|p| p.layer == layer).collect();
        if layer == Layer::TcpArrival && !attached.requests {
            attached.tcp_arrival = false;
            continue;
        }
        if let Err(error) = attach_group(&mut ebpf, &group) {
            if layer == Layer::Connections {
                return Err(error);
            }
            log::warn!(
                "{} unavailable, continuing without it: {error:#}",
                layer.describe()
            );
            match layer {
                Layer::Requests => attached.requests = false,
                _ => attached.tcp_arrival = false,
            }
        }
    }
    if attached.requests {
        match nic::attach(&mut ebpf, scope) {
            Ok(interfaces) => {
                log::debug!("NIC layer on {interfaces} interfaces");
                attached.nic = true;
            }
            Err(error) => log::warn!(
                "NIC layer (tc) unavailable, continuing without it: {:#}",
                explain_tc_error(error, scope)
            ),
        }
    }
    Ok((ebpf, attached))
}

/// Attaches every probe of a group, or detaches what it attached and fails.
fn attach_group(ebpf: &mut Ebpf, group: &[&TracepointProbe]) -> anyhow::Result<()> {
    let mut links = Vec::new();
    let outcome = group.iter().try_for_each(|probe| {
        tracefs::verify_layout(probe.category, probe.name, probe.layout)?;
        let program: &mut TracePoint = ebpf
            .program_mut(probe.program)
            .with_context(|| format!("program {} missing from the object", probe.program))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("loading {}", probe.program))?;
        }
        let link = program
            .attach(probe.category, probe.name)
            .with_context(|| {
                format!("attaching to tracepoint {}:{}", probe.category, probe.name)
            })?;
        links.push((probe.program, link));
        anyhow::Ok(())
    });
    if outcome.is_err() {
        for (name, link) in links {
            if let Some(Ok(program)) = ebpf.program_mut(name).map(<&mut TracePoint>::try_from) {
                let _ = program.detach(link);
            }
        }
    }
    outcome
}

/// Loads the object without attaching anything (`hoptrace check` attaches its own probes).
pub fn load_object(
    scope: &Scope,
    offsets: &KernelOffsets,
    ring_buffer_bytes: u32,
) -> anyhow::Result<Ebpf> {
    let on = |enabled: bool| u32::from(enabled);
    let (netns, pids, ports) = (
        on(!scope.netns.is_empty()),
        on(!scope.pids.is_empty()),
        on(!scope.ports.is_empty()),
    );
    EbpfLoader::new()
        .override_global(globals::FILTER_NETNS, &netns, true)
        .override_global(globals::FILTER_PID, &pids, true)
        .override_global(globals::FILTER_PORT, &ports, true)
        .override_global(globals::SELF_TGID, &std::process::id(), true)
        .override_global(globals::KERNEL_OFFSETS, offsets, true)
        .override_global(
            globals::GO_TLS_JOIN,
            &on(kernel_features::go_tls_join().is_ok()),
            true,
        )
        .map_max_entries(maps::EVENTS, ring_buffer_bytes)
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
    log::debug!(
        "{} listening sockets existed before the agent",
        existing.len()
    );
    for (key, info) in existing {
        listeners.insert(&key, &info, 0)?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
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

/// A capability by number (linux/capability.h) and name.
pub type Capability = (u32, &'static str);
/// Creating maps, loading BTF and programs (Linux 5.8+).
pub const BPF: Capability = (39, "CAP_BPF");
/// perf_event_open() for tracepoint links; loading tracing programs (Linux 5.8+).
pub const PERFMON: Capability = (38, "CAP_PERFMON");
/// Loading tc programs and attaching them.
pub const NET_ADMIN: Capability = (12, "CAP_NET_ADMIN");
/// The ptrace access check on another user's or container's /proc/PID/maps, /root, /exe.
pub const SYS_PTRACE: Capability = (19, "CAP_SYS_PTRACE");
/// Reading and searching files whatever their mode (other containers' root filesystems).
pub const DAC_READ_SEARCH: Capability = (2, "CAP_DAC_READ_SEARCH");
/// All of the above where the others are unknown; setns(); uprobes from Linux 6.16.
pub const SYS_ADMIN: Capability = (21, "CAP_SYS_ADMIN");

/// Fails with a clear message when not running with enough privilege to load the probes:
/// CAP_BPF with CAP_PERFMON (Linux 5.8+), or CAP_SYS_ADMIN, which allows both on every kernel.
/// The capabilities, not uid 0: root in a container has only those the container adds.
pub fn require_privilege() -> anyhow::Result<()> {
    let caps = effective_capabilities();
    let has = |cap| holds(caps, cap);
    if has(SYS_ADMIN) || (has(BPF) && has(PERFMON)) {
        return Ok(());
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "hoptrace needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load eBPF \
             programs: run it with sudo"
        );
    }
    let missing: Vec<_> = [BPF, PERFMON]
        .into_iter()
        .filter(|&cap| !has(cap))
        .map(|(_, name)| name)
        .collect();
    bail!(
        "hoptrace runs as root without {}: a container must add CAP_BPF and CAP_PERFMON \
         (deploy/README.md, \"Capabilities\")",
        missing.join(" and ")
    );
}

/// Says which capability tc lacked when the kernel refused it: CAP_NET_ADMIN for the programs
/// and their attachment, CAP_SYS_ADMIN for setns() into the observed network namespaces (which
/// deploy/kubernetes/components/sys-admin adds).
fn explain_tc_error(error: anyhow::Error, scope: &Scope) -> anyhow::Error {
    if !format!("{error:#}").contains("Operation not permitted") {
        return error;
    }
    let caps = effective_capabilities();
    if !holds(caps, NET_ADMIN) {
        return error.context("tc needs CAP_NET_ADMIN");
    }
    if !holds(caps, SYS_ADMIN) && !scope.netns.is_empty() {
        return error.context(
            "tc inside other network namespaces needs CAP_SYS_ADMIN (setns); the host's own \
             interfaces do not",
        );
    }
    error
}

/// Whether the kernel refused a uprobe attach for want of CAP_SYS_ADMIN: its uprobe PMU asks
/// for CAP_SYS_ADMIN, not CAP_PERFMON, since Linux 6.16 ("perf: Revert to requiring
/// CAP_SYS_ADMIN for uprobes", also in stable kernels that took the fix). Every later uprobe
/// fails the same way, so callers say it once.
pub fn uprobe_needs_sys_admin(error: &anyhow::Error) -> bool {
    lacks(SYS_ADMIN) && format!("{error:#}").contains("Permission denied")
}

/// Says why a uprobe attach was refused when CAP_SYS_ADMIN is what is missing.
pub fn explain_uprobe_error(error: anyhow::Error) -> anyhow::Error {
    if uprobe_needs_sys_admin(&error) {
        return error.context("uprobes need CAP_SYS_ADMIN (Linux 6.16 on)");
    }
    error
}

/// Why the kernel refused the agent a look into another process (its /proc/PID entries, or a
/// file through /proc/PID/root): the capabilities of `needed` that the agent lacks; or, having
/// them all, a security module's policy.
pub fn explain_access_denied(needed: &[Capability]) -> String {
    let missing: Vec<_> = needed
        .iter()
        .filter(|&&cap| lacks(cap))
        .map(|&(_, name)| name)
        .collect();
    if missing.is_empty() {
        "refused despite the agent's capabilities: an LSM policy (AppArmor, SELinux)?".into()
    } else {
        format!("needs {}", missing.join(" and "))
    }
}

/// Whether `cap` is missing from the effective set.
pub fn lacks(cap: Capability) -> bool {
    !holds(effective_capabilities(), cap)
}

/// Whether the capability set `caps` (as [`effective_capabilities`] gives it) holds `cap`.
pub fn holds(caps: u64, (number, _): Capability) -> bool {
    caps & (1 << number) != 0
}

/// The effective capability set (bit N: capability N), read from /proc so no capability crate
/// is needed; empty when it cannot be read.
pub fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .unwrap_or(0)
}
