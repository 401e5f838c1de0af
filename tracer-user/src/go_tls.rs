//! Attaching the Go crypto/tls probes (tracer-ebpf's tls_go.rs) to the Go programs of the
//! processes in scope: each executable is analysed once (golang.rs) by file identity, then
//! probed at `crypto/tls.(*Conn).Write`/`.Read`/`.handshakeContext` entries and at their RET
//! instructions, for every process running it. Processes are looked for at start and then on every
//! [`GoTls::rescan`], so programs started after the agent are found too.
//!
//! A Go program that cannot be probed (too old for the register ABI, an unknown pclntab
//! layout, no crypto/tls) is skipped with one warning per executable and counted. A kernel that
//! refuses uprobes for want of CAP_SYS_ADMIN (Linux 6.16+) refuses every executable alike: that
//! is logged once per run and counted apart; so are processes of other users or containers the
//! agent may not look into (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH).

use std::{
    collections::{HashMap, HashSet},
    io::ErrorKind,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};

use crate::{
    ebpf::{self, Capability},
    golang::{self, GoBinaryError, GoTlsBinary},
    listeners,
    scope::Scope,
    tls_uprobes::once,
};

/// The eBPF programs, as named in tracer-ebpf's tls_go.rs.
const WRITE_ENTRY: &str = "go_tls_write";
const READ_ENTRY: &str = "go_tls_read";
const RETURN: &str = "go_tls_return";
const HANDSHAKE_ENTRY: &str = "go_tls_handshake";
const HANDSHAKE_RETURN: &str = "go_tls_handshake_return";

/// What became of an executable.
enum Outcome {
    Probed,
    /// A Go program we cannot probe (counted as skipped, or refused).
    Skipped,
    /// Not a Go program, or unreadable: nothing to do.
    Ignored,
}

/// The Go programs seen so far.
pub struct GoTls {
    scope: Scope,
    /// Processes already looked at.
    seen_pids: HashSet<u32>,
    /// Executables by (device, inode).
    binaries: HashMap<(u64, u64), Outcome>,
    /// Whether a refusal for want of CAP_SYS_ADMIN, and an unreadable process, were logged.
    logged_sys_admin: bool,
    logged_unreadable: bool,
    pub stats: GoTlsStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoTlsStats {
    /// Go executables probed.
    pub probed: u64,
    /// Go executables skipped (unsupported version or layout, no crypto/tls, attach failed).
    pub skipped: u64,
    /// Go executables whose probes the kernel refused for want of CAP_SYS_ADMIN (uprobes,
    /// Linux 6.16+).
    pub refused_without_sys_admin: u64,
    /// Processes the agent may not look into (their network namespace, so whether they are in
    /// scope; /proc/PID/exe; the executable itself), for want of CAP_SYS_PTRACE or
    /// CAP_DAC_READ_SEARCH: not probed.
    pub processes_unreadable: u64,
}

impl GoTlsStats {
    pub fn summary(&self) -> String {
        format!(
            "Go crypto/tls: {} programs probed, {} skipped, {} refused without CAP_SYS_ADMIN, \
             processes not readable {}",
            self.probed, self.skipped, self.refused_without_sys_admin, self.processes_unreadable
        )
    }
}

impl GoTls {
    pub fn new(scope: &Scope) -> Self {
        Self {
            scope: scope.clone(),
            seen_pids: HashSet::new(),
            binaries: HashMap::new(),
            logged_sys_admin: false,
            logged_unreadable: false,
            stats: GoTlsStats::default(),
        }
    }

    /// Looks at processes not seen before and probes their Go executables.
    pub fn rescan(&mut self, ebpf: &mut Ebpf) {
        let alive: HashSet<u32> = listeners::all_pids().into_iter().collect();
        let own = std::process::id();
        for &pid in &alive {
            if !self.seen_pids.insert(pid) || pid == own {
                continue;
            }
            match self.scope.process_in_scope(pid) {
                Ok(true) => self.look_at(ebpf, pid),
                Ok(false) => {}
                Err(e) if ebpf::lacks(ebpf::SYS_PTRACE) => {
                    let namespace = PathBuf::from(format!("/proc/{pid}/ns/net"));
                    self.unreadable(pid, &namespace, e, &[ebpf::SYS_PTRACE]);
                }
                // Refused despite CAP_SYS_PTRACE (a process of an outer user namespace): nothing
                // the agent could be given, and most likely not in scope anyway.
                Err(_) => {}
            }
        }
        // Bounded by the live processes: a reused pid is looked at again.
        self.seen_pids.retain(|pid| alive.contains(pid));
    }

    fn look_at(&mut self, ebpf: &mut Ebpf, pid: u32) {
        // /proc/PID/exe opens the executable itself, also inside another mount namespace.
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let meta = match std::fs::metadata(&exe) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                return self.unreadable(pid, &exe, e, &[ebpf::SYS_PTRACE]);
            }
            Err(_) => return, // kernel thread, or gone
        };
        let identity = (meta.dev(), meta.ino());
        if self.binaries.contains_key(&identity) {
            return;
        }
        let name = std::fs::read_link(&exe).unwrap_or_else(|_| exe.clone());
        let outcome = match golang::analyze_file(&exe) {
            Ok(binary) => match attach(ebpf, &exe, &binary) {
                Ok(()) => {
                    log::info!(
                        "Go crypto/tls probed in {} (pid {pid}, {}, symbols from {:?}): \
                         Write with {} returns, Read with {} returns",
                        name.display(),
                        binary.go_version,
                        binary.source,
                        binary.write.ret_offsets.len(),
                        binary.read.ret_offsets.len(),
                    );
                    self.stats.probed += 1;
                    Outcome::Probed
                }
                Err(error) if ebpf::uprobe_needs_sys_admin(&error) => {
                    log::log!(
                        once(&mut self.logged_sys_admin),
                        "Go crypto/tls: attaching to {} (pid {pid}) failed, skipped: {:#} \
                         (logged once per run, counted in the summary)",
                        name.display(),
                        ebpf::explain_uprobe_error(error)
                    );
                    self.stats.refused_without_sys_admin += 1;
                    Outcome::Skipped
                }
                Err(error) => {
                    log::warn!(
                        "Go crypto/tls: attaching to {} (pid {pid}) failed, skipped: {error:#}",
                        name.display()
                    );
                    self.stats.skipped += 1;
                    Outcome::Skipped
                }
            },
            Err(GoBinaryError::Io { source, .. })
                if source.kind() == ErrorKind::PermissionDenied =>
            {
                // The file's own mode: another user's executable.
                self.unreadable(pid, &name, source, &[ebpf::DAC_READ_SEARCH]);
                Outcome::Ignored
            }
            Err(GoBinaryError::NotElf(_) | GoBinaryError::NotGo | GoBinaryError::Io { .. }) => {
                Outcome::Ignored
            }
            Err(error) => {
                log::warn!(
                    "Go crypto/tls: not probing {} (pid {pid}): {error}",
                    name.display()
                );
                self.stats.skipped += 1;
                Outcome::Skipped
            }
        };
        self.binaries.insert(identity, outcome);
    }

    /// A process whose namespace or executable the kernel would not show: every process of
    /// another user or container is refused alike, so it is logged once per run (the first,
    /// with the capability `needed` that the agent lacks) and counted.
    fn unreadable(&mut self, pid: u32, what: &Path, error: std::io::Error, needed: &[Capability]) {
        self.stats.processes_unreadable += 1;
        log::log!(
            once(&mut self.logged_unreadable),
            "pid {pid} not scanned for Go crypto/tls: reading {}: {error}: {} (logged once per run, \
             counted in the summary)",
            what.display(),
            ebpf::explain_access_denied(needed)
        );
    }
}

/// Attaches the entry probes and the RET probes of the three functions to `exe`.
fn attach(ebpf: &mut Ebpf, exe: &Path, binary: &GoTlsBinary) -> anyhow::Result<()> {
    let rets: Vec<u64> = binary
        .write
        .ret_offsets
        .iter()
        .chain(&binary.read.ret_offsets)
        .copied()
        .collect();
    for (program, offsets) in [
        (WRITE_ENTRY, vec![binary.write.entry_offset]),
        (READ_ENTRY, vec![binary.read.entry_offset]),
        (RETURN, rets),
        (HANDSHAKE_ENTRY, vec![binary.handshake.entry_offset]),
        (HANDSHAKE_RETURN, binary.handshake.ret_offsets.clone()),
    ] {
        let probe: &mut UProbe = ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing from the object"))?
            .try_into()?;
        if probe.fd().is_err() {
            probe.load().with_context(|| format!("loading {program}"))?;
        }
        probe
            .attach(&offsets, exe, UProbeScope::AllProcesses)
            .with_context(|| format!("attaching {program} at {} offsets", offsets.len()))?;
    }
    Ok(())
}
