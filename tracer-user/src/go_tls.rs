//! Attaching the Go crypto/tls probes (tracer-ebpf's tls_go.rs) to the Go programs of the
//! processes in scope: each executable is analysed once (golang.rs) by file identity, then
//! probed at `crypto/tls.(*Conn).Write`/`.Read`/`.handshakeContext` entries and at their RET
//! instructions, for every process running it. Processes are looked for at start and then on every
//! [`GoTls::rescan`], so programs started after the agent are found too.
//!
//! A Go program that cannot be probed (too old for the register ABI, an unknown pclntab
//! layout, no crypto/tls) is skipped with one warning per executable and counted.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};

use crate::{
    golang::{self, GoBinaryError, GoTlsBinary},
    listeners,
    scope::Scope,
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
    /// A Go program we cannot probe (counted as skipped).
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
    pub stats: GoTlsStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoTlsStats {
    /// Go executables probed.
    pub probed: u64,
    /// Go executables skipped (unsupported version or layout, no crypto/tls, attach failed).
    pub skipped: u64,
}

impl GoTlsStats {
    pub fn summary(&self) -> String {
        format!(
            "Go crypto/tls: {} programs probed, {} skipped",
            self.probed, self.skipped
        )
    }
}

impl GoTls {
    pub fn new(scope: &Scope) -> Self {
        Self {
            scope: scope.clone(),
            seen_pids: HashSet::new(),
            binaries: HashMap::new(),
            stats: GoTlsStats::default(),
        }
    }

    /// Looks at processes not seen before and probes their Go executables.
    pub fn rescan(&mut self, ebpf: &mut Ebpf) {
        let alive: HashSet<u32> = listeners::all_pids().into_iter().collect();
        let own = std::process::id();
        for &pid in &alive {
            if self.seen_pids.insert(pid) && pid != own && self.scope.process_in_scope(pid) {
                self.look_at(ebpf, pid);
            }
        }
        // Bounded by the live processes: a reused pid is looked at again.
        self.seen_pids.retain(|pid| alive.contains(pid));
    }

    fn look_at(&mut self, ebpf: &mut Ebpf, pid: u32) {
        // /proc/PID/exe opens the executable itself, also inside another mount namespace.
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let Ok(meta) = std::fs::metadata(&exe) else {
            return; // kernel thread, or gone
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
                Err(error) => {
                    log::warn!(
                        "Go crypto/tls: attaching to {} (pid {pid}) failed, skipped: {error:#}",
                        name.display()
                    );
                    self.stats.skipped += 1;
                    Outcome::Skipped
                }
            },
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
