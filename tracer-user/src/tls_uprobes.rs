//! Finds the OpenSSL code that processes in scope run and attaches the TLS plaintext probes
//! (tracer-ebpf's tls_openssl.rs) to it: `libssl.so*` mapped by a process, and executables that
//! link OpenSSL statically and export its symbols (node).
//!
//! Probes attach once per library *file* (device + inode), for every process: any process that
//! maps an already probed file, including one started after the agent, is traced from its first
//! call, and the kernel's scope filters decide whose calls count. New files (a container image's
//! own libssl, the first node process) are found by rescanning /proc periodically rather than on
//! `sched_process_exec`: at exec the dynamic loader has not mapped libssl yet, and libraries
//! opened later with dlopen (Python's `ssl`) never exec at all. Files are opened through
//! `/proc/PID/root` so that processes in other mount namespaces (containers) work.
//!
//! Nothing here may stop the agent: a file without the symbols, unreadable or gone is logged
//! once and counted in [`Stats`]. What fails alike for every process and file, for want of a
//! capability (uprobes without CAP_SYS_ADMIN, other users' processes without CAP_SYS_PTRACE or
//! CAP_DAC_READ_SEARCH), is logged once per run and counted.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::ErrorKind,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, read::ReadCache};

use crate::{
    ebpf::{self, Capability},
    listeners,
    scope::Scope,
};

/// Library function, entry program (none: only its return is probed), return program.
type Probe = (&'static str, Option<&'static str>, &'static str);

/// The plaintext probes. SSL_write and SSL_read are required; the `_ex` variants exist from
/// OpenSSL 1.1.1 on and are attached where present.
const PLAINTEXT: [Probe; 4] = [
    ("SSL_write", Some("ssl_write"), "ssl_return"),
    ("SSL_read", Some("ssl_read"), "ssl_return"),
    ("SSL_write_ex", Some("ssl_write_ex"), "ssl_ex_return"),
    ("SSL_read_ex", Some("ssl_read_ex"), "ssl_ex_return"),
];
const REQUIRED: [&str; 2] = ["SSL_write", "SSL_read"];
/// The handshake probes (tracer-ebpf's tls_openssl_handshake.rs): the library's view of the
/// handshake, attached to the files that get the plaintext probes when SSL_do_handshake and
/// SSL_get_error are there (SSL_connect and SSL_accept where present).
const HANDSHAKE: [Probe; 4] = [
    (
        "SSL_do_handshake",
        Some("ssl_do_handshake"),
        "ssl_handshake_return",
    ),
    ("SSL_connect", Some("ssl_connect"), "ssl_handshake_return"),
    ("SSL_accept", Some("ssl_accept"), "ssl_handshake_return"),
    ("SSL_get_error", None, "ssl_get_error_return"),
];
const HANDSHAKE_REQUIRED: [&str; 2] = ["SSL_do_handshake", "SSL_get_error"];
/// Every function looked up in a file.
const FUNCTIONS: [Probe; 8] = [
    PLAINTEXT[0],
    PLAINTEXT[1],
    PLAINTEXT[2],
    PLAINTEXT[3],
    HANDSHAKE[0],
    HANDSHAKE[1],
    HANDSHAKE[2],
    HANDSHAKE[3],
];
/// What the probes attach to, for `hoptrace check`'s plan.
pub const HOOKS: &str = "uprobe+uretprobe on SSL_write, SSL_write_ex, SSL_read, SSL_read_ex, \
                         SSL_do_handshake, SSL_connect, SSL_accept, uretprobe on SSL_get_error \
                         in libssl.so* and executables exporting them (node), found in /proc";
/// How often /proc is rescanned for OpenSSL files not probed yet.
pub const RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Distinct files probed at most (each costs a few uprobes in the kernel).
const MAX_FILES: usize = 256;

/// What the scans found; reported in the agent's summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files_attached: u64,
    /// libssl files (or executables inspected) without SSL_write/SSL_read.
    pub files_without_symbols: u64,
    /// Files that could not be read, parsed or attached.
    pub files_failed: u64,
    /// Mappings whose file was deleted or replaced since the process mapped it.
    pub files_gone: u64,
    pub files_over_capacity: u64,
    /// Files probed for plaintext without SSL_do_handshake/SSL_get_error (or whose handshake
    /// probes failed): their handshake spans have no library view.
    pub files_without_handshake_symbols: u64,
    /// Files whose probes the kernel refused for want of CAP_SYS_ADMIN (uprobes, Linux 6.16+).
    pub files_refused_without_sys_admin: u64,
    /// Processes the agent may not look into (their network namespace, so whether they are in
    /// scope; their /proc/PID/maps; a file they map, through /proc/PID/root), for want of
    /// CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH: their OpenSSL is not probed. Once per process.
    pub processes_unreadable: u64,
}

impl Stats {
    pub fn summary(&self) -> String {
        format!(
            "OpenSSL files probed {}, without SSL symbols {}, failed {}, deleted or replaced {}, \
             over capacity {}, without handshake symbols {}, refused without CAP_SYS_ADMIN {}, \
             processes not readable {}",
            self.files_attached,
            self.files_without_symbols,
            self.files_failed,
            self.files_gone,
            self.files_over_capacity,
            self.files_without_handshake_symbols,
            self.files_refused_without_sys_admin,
            self.processes_unreadable
        )
    }
}

/// A file as the kernel identifies it.
type FileId = (u64, u64);

pub struct OpenSslProbes {
    scope: Scope,
    /// Files probed, with the path they were found at (for logs).
    attached: HashMap<FileId, PathBuf>,
    /// Files inspected and not probed (no symbols, failed): never inspected again.
    skipped: HashSet<FileId>,
    /// Deleted mappings already counted, by (pid, inode): counted once, not every rescan.
    gone: HashSet<(u32, u64)>,
    /// Processes counted as not readable: counted once, not every rescan (live ones only).
    unreadable: HashSet<u32>,
    /// Whether a refusal for want of CAP_SYS_ADMIN, and an unreadable process, were logged.
    logged_sys_admin: bool,
    logged_unreadable: bool,
    pub stats: Stats,
    /// The handshake programs loaded (else only the plaintext probes attach).
    handshake: bool,
}

impl OpenSslProbes {
    /// Loads the probe programs into `ebpf` (they attach later, per file). Fails when the
    /// kernel refuses uprobes: the agent then runs without TLS plaintext.
    pub fn load(ebpf: &mut Ebpf, scope: &Scope) -> anyhow::Result<Self> {
        load_programs(ebpf, &PLAINTEXT)?;
        let handshake = load_programs(ebpf, &HANDSHAKE)
            .inspect_err(|e| {
                log::warn!(
                    "OpenSSL handshake probes unavailable (handshake spans keep their wire \
                     timing only): {e:#}"
                )
            })
            .is_ok();
        Ok(Self {
            scope: scope.clone(),
            attached: HashMap::new(),
            skipped: HashSet::new(),
            gone: HashSet::new(),
            unreadable: HashSet::new(),
            logged_sys_admin: false,
            logged_unreadable: false,
            stats: Stats::default(),
            handshake,
        })
    }

    /// Probes the host's own libssl files (most short-lived clients, curl or wrk, run them;
    /// a rescan could miss such a process entirely), then looks at every process in scope and
    /// probes the OpenSSL files it runs that are new.
    pub fn scan(&mut self, ebpf: &mut Ebpf) {
        let (root_pid, libraries) = host_libraries();
        for path in libraries {
            let candidate = Mapping {
                path,
                inode: 0,
                deleted: false,
                library: true,
            };
            self.consider(ebpf, root_pid, candidate);
        }
        let own = std::process::id();
        let alive: HashSet<u32> = listeners::all_pids().into_iter().collect();
        for &pid in &alive {
            if pid == own {
                continue;
            }
            // What the kernel refused to show, if anything: both are behind the ptrace check.
            let found = match self.scope.process_in_scope(pid) {
                Ok(true) => candidates(pid).map_err(|e| (format!("/proc/{pid}/maps"), e)),
                Ok(false) => continue,
                Err(e) if ebpf::lacks(ebpf::SYS_PTRACE) => Err((format!("/proc/{pid}/ns/net"), e)),
                // Refused despite CAP_SYS_PTRACE (a process of an outer user namespace): nothing
                // the agent could be given, and most likely not in scope anyway.
                Err(_) => continue,
            };
            match found {
                Ok(candidates) => {
                    for candidate in candidates {
                        self.consider(ebpf, pid, candidate);
                    }
                }
                Err((what, e)) if e.kind() == ErrorKind::PermissionDenied => {
                    self.unreadable(pid, &what, e, &[ebpf::SYS_PTRACE]);
                }
                Err(_) => {} // the process exited meanwhile
            }
        }
        // A reused pid is a new process, which may well be readable.
        self.unreadable.retain(|pid| alive.contains(pid));
    }

    /// A process whose namespace, maps or files the kernel would not show: every process of
    /// another user or container is refused alike, so it is logged once per run (the first, with
    /// the capability `needed` that the agent lacks) and counted once per process.
    fn unreadable(&mut self, pid: u32, what: &str, error: std::io::Error, needed: &[Capability]) {
        if !self.unreadable.insert(pid) {
            return;
        }
        self.stats.processes_unreadable += 1;
        log::log!(
            once(&mut self.logged_unreadable),
            "pid {pid} not scanned for OpenSSL: reading {what}: {error}: {} (logged once per run, \
             counted in the summary)",
            ebpf::explain_access_denied(needed)
        );
    }

    fn consider(&mut self, ebpf: &mut Ebpf, pid: u32, candidate: Mapping) {
        if candidate.deleted {
            // A deleted executable is most often not OpenSSL's (a memfd, an upgraded package):
            // only a library is worth a line.
            if candidate.library && self.gone.insert((pid, candidate.inode)) {
                self.stats.files_gone += 1;
                log::info!(
                    "pid {pid} runs {} which was deleted since: not probed",
                    candidate.path
                );
            }
            return;
        }
        // The file as the process sees it, in its own mount namespace.
        let mut path = PathBuf::from(format!("/proc/{pid}/root{}", candidate.path));
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                // /proc/PID/root is behind the ptrace check, the path behind directory modes.
                let what = path.display().to_string();
                self.unreadable(pid, &what, e, &[ebpf::SYS_PTRACE, ebpf::DAC_READ_SEARCH]);
                return;
            }
            Err(_) => return, // the process exited meanwhile
        };
        let id = (meta.dev(), meta.ino());
        // The same file in the agent's own view is a path that outlives the process.
        if std::fs::metadata(&candidate.path).is_ok_and(|own| (own.dev(), own.ino()) == id) {
            path = PathBuf::from(&candidate.path);
        }
        if self.attached.contains_key(&id) || self.skipped.contains(&id) {
            return;
        }
        if candidate.inode != 0
            && candidate.inode != meta.ino()
            && self.gone.insert((pid, candidate.inode))
        {
            self.stats.files_gone += 1;
            log::info!(
                "pid {pid} maps an older {} (replaced since); probing the current file",
                candidate.path
            );
        }
        if self.attached.len() >= MAX_FILES {
            self.stats.files_over_capacity += 1;
            self.skipped.insert(id);
            log::warn!(
                "{} not probed: {MAX_FILES} files already are",
                candidate.path
            );
            return;
        }
        let offsets = match symbol_offsets(&path) {
            Ok(offsets) => offsets,
            Err(e) => {
                self.stats.files_failed += 1;
                self.skipped.insert(id);
                log::warn!("cannot read symbols of {}: {e:#}", path.display());
                return;
            }
        };
        if !REQUIRED.iter().all(|f| offsets.contains_key(f)) {
            // An executable without OpenSSL is the common case: only a libssl is news.
            if candidate.library {
                self.stats.files_without_symbols += 1;
                log::warn!(
                    "{} has no SSL_write/SSL_read symbols: not probed",
                    path.display()
                );
            }
            self.skipped.insert(id);
            return;
        }
        match attach(ebpf, &path, &offsets, &PLAINTEXT) {
            Ok(mut attached) => {
                self.stats.files_attached += 1;
                self.attach_handshake(ebpf, &path, &offsets, &mut attached);
                log::info!(
                    "TLS plaintext probes on {} (found in pid {pid}): {}",
                    candidate.path,
                    attached.join(", ")
                );
                self.attached.insert(id, path);
            }
            Err(e) if std::fs::metadata(&path).is_err() => {
                // The process exited and took its mount namespace's path along: the next scan
                // that sees the file in another process tries again.
                log::debug!("{} went away while probing it: {e:#}", path.display());
            }
            Err(e) if ebpf::uprobe_needs_sys_admin(&e) => {
                self.stats.files_refused_without_sys_admin += 1;
                self.skipped.insert(id);
                log::log!(
                    once(&mut self.logged_sys_admin),
                    "attaching OpenSSL probes to {}: {:#} (logged once per run, counted in the \
                     summary)",
                    path.display(),
                    ebpf::explain_uprobe_error(e)
                );
            }
            Err(e) => {
                self.stats.files_failed += 1;
                self.skipped.insert(id);
                log::warn!("attaching OpenSSL probes to {}: {e:#}", path.display());
            }
        }
    }
}

/// The level of a warning that every process or file would repeat: a warning the first time
/// (`logged` false), debug after that.
pub fn once(logged: &mut bool) -> log::Level {
    if std::mem::replace(logged, true) {
        log::Level::Debug
    } else {
        log::Level::Warn
    }
}

impl OpenSslProbes {
    /// The handshake probes on a file that got the plaintext ones; a file without their
    /// symbols, or where they fail, is counted and logged, and keeps its plaintext probes.
    fn attach_handshake(
        &mut self,
        ebpf: &mut Ebpf,
        path: &Path,
        offsets: &HashMap<&'static str, u64>,
        attached: &mut Vec<&'static str>,
    ) {
        if !self.handshake {
            return;
        }
        let missing: Vec<_> = HANDSHAKE_REQUIRED
            .iter()
            .filter(|f| !offsets.contains_key(*f))
            .collect();
        if !missing.is_empty() {
            self.stats.files_without_handshake_symbols += 1;
            log::warn!(
                "{} has no {missing:?}: its handshakes keep their wire timing only",
                path.display()
            );
            return;
        }
        match attach(ebpf, path, offsets, &HANDSHAKE) {
            Ok(functions) => attached.extend(functions),
            Err(e) => {
                self.stats.files_without_handshake_symbols += 1;
                log::warn!(
                    "attaching OpenSSL handshake probes to {}: {e:#}",
                    path.display()
                );
            }
        }
    }
}

/// Loads the entry and return programs of `probes` (each once).
fn load_programs(ebpf: &mut Ebpf, probes: &[Probe]) -> anyhow::Result<()> {
    let mut loaded = HashSet::new();
    for &(_, entry, ret) in probes {
        for name in entry.into_iter().chain([ret]) {
            if loaded.insert(name) {
                program(ebpf, name)?
                    .load()
                    .with_context(|| format!("loading {name}"))?;
            }
        }
    }
    Ok(())
}

/// Attaches every function of `probes` present (entry and return), or fails having attached
/// none of them that it could take back.
fn attach(
    ebpf: &mut Ebpf,
    path: &Path,
    offsets: &HashMap<&'static str, u64>,
    probes: &[Probe],
) -> anyhow::Result<Vec<&'static str>> {
    let mut links = Vec::new();
    let mut done = Vec::new();
    let outcome = probes.iter().try_for_each(|&(function, entry, ret)| {
        let Some(&offset) = offsets.get(function) else {
            return Ok(());
        };
        for name in entry.into_iter().chain([ret]) {
            let link = program(ebpf, name)?
                .attach(
                    [UProbeAttachLocation::AbsoluteOffset(offset)],
                    path,
                    UProbeScope::AllProcesses,
                )
                .with_context(|| format!("{function} ({name})"))?;
            links.push((name, link));
        }
        done.push(function);
        anyhow::Ok(())
    });
    if let Err(e) = outcome {
        for (name, link) in links {
            if let Ok(p) = program(ebpf, name) {
                let _ = p.detach(link);
            }
        }
        return Err(e);
    }
    Ok(done)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?)
}

/// `libssl.so*` files in the host's standard library directories (multiarch ones included), and
/// the pid whose root they are under: pid 1's root is the host's (also from a container in the
/// host's pid namespace), when the agent may look there; else the agent's own.
fn host_libraries() -> (u32, Vec<String>) {
    let pid = if std::fs::read_dir("/proc/1/root/").is_ok() {
        1
    } else {
        std::process::id()
    };
    let mut dirs: Vec<String> = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"]
        .iter()
        .map(|d| d.to_string())
        .collect();
    let names_in = |dir: &str, wanted: &dyn Fn(&str) -> bool| -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/root{dir}")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|name| wanted(name))
            .map(|name| format!("{dir}/{name}"))
            .collect()
    };
    for parent in ["/lib", "/usr/lib"] {
        dirs.extend(names_in(parent, &|n| n.ends_with("-linux-gnu")));
    }
    let found = dirs
        .iter()
        .flat_map(|dir| names_in(dir, &|n| n.starts_with("libssl.so.")))
        .collect();
    (pid, found)
}

/// A file mapped executable by a process, from /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mapping {
    path: String,
    inode: u64,
    deleted: bool,
    /// A `libssl.so*` (else the main executable, probed only if it exports OpenSSL).
    library: bool,
}

/// The process's libssl mappings and its executable.
fn candidates(pid: u32) -> std::io::Result<Vec<Mapping>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe = exe.as_deref().and_then(Path::to_str);
    let exe = exe.map(|e| e.strip_suffix(" (deleted)").unwrap_or(e));
    Ok(parse_maps(&maps, exe))
}

/// Executable mappings of libssl or of `exe`, each file once.
fn parse_maps(maps: &str, exe: Option<&str>) -> Vec<Mapping> {
    let mut found: Vec<Mapping> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path (the path may contain spaces)
        let mut fields = line.splitn(6, ' ');
        let (Some(_), Some(perms), Some(_), Some(_), Some(inode), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = path.trim_start();
        if !perms.contains('x') || !path.starts_with('/') || path.starts_with("/memfd:") {
            continue;
        }
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        let file_name = Path::new(path).file_name().and_then(|n| n.to_str());
        let library = file_name.is_some_and(|n| n.starts_with("libssl.so"));
        if !library && Some(path) != exe {
            continue;
        }
        if found.iter().any(|m| m.path == path) {
            continue;
        }
        found.push(Mapping {
            path: path.to_string(),
            inode: inode.parse().unwrap_or(0),
            deleted,
            library,
        });
    }
    found
}

/// File offsets of the OpenSSL functions the file defines (dynamic symbols: what a shared
/// library or an executable like node exports). Reads only the ELF parts it needs.
fn symbol_offsets(path: &Path) -> anyhow::Result<HashMap<&'static str, u64>> {
    let file = File::open(path).context("open")?;
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).context("not an ELF file")?;
    let mut offsets = HashMap::new();
    for symbol in elf.dynamic_symbols() {
        let Ok(name) = symbol.name() else { continue };
        let Some(&(function, _, _)) = FUNCTIONS.iter().find(|(f, _, _)| *f == name) else {
            continue;
        };
        if !symbol.is_definition() {
            continue; // an import (a program calling libssl), not the code
        }
        let address = symbol.address();
        let section = symbol
            .section_index()
            .and_then(|index| elf.section_by_index(index).ok());
        let Some((section_offset, _)) = section.as_ref().and_then(|s| s.file_range()) else {
            continue;
        };
        let section_address = section.map_or(0, |s| s.address());
        if let Ok(UProbeAttachLocation::AbsoluteOffset(offset)) =
            UProbeAttachLocation::from_virtual_address(address, section_address, section_offset)
        {
            offsets.insert(function, offset);
        }
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a20000 r-xp 00002000 08:01 1311 /usr/bin/curl
7f0000000000-7f0000010000 r--p 00000000 08:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000010000-7f0000080000 r-xp 00010000 08:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000090000-7f00000a0000 r-xp 00000000 08:01 3333 /opt/app/lib/libssl.so.1.1 (deleted)
7f00000b0000-7f00000c0000 r-xp 00000000 08:01 4444 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00000d0000-7f00000e0000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn finds_libssl_and_the_executable_once_each() {
        let found = parse_maps(MAPS, Some("/usr/bin/curl"));
        let summary: Vec<_> = found
            .iter()
            .map(|m| (m.path.as_str(), m.inode, m.deleted, m.library))
            .collect();
        assert_eq!(
            summary,
            [
                ("/usr/bin/curl", 1311, false, false),
                ("/usr/lib/x86_64-linux-gnu/libssl.so.3", 2222, false, true),
                ("/opt/app/lib/libssl.so.1.1", 3333, true, true),
            ]
        );
        // Without knowing the executable, only libraries.
        assert_eq!(parse_maps(MAPS, None).len(), 2);
    }

    #[test]
    fn resolves_the_functions_of_this_machines_libssl_and_node() {
        // Real files of the test bed (TESTBED.md): dynamic libssl 3 and node's static OpenSSL.
        let libssl = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let offsets = symbol_offsets(libssl).expect("libssl.so.3 readable");
        for function in FUNCTIONS.map(|(function, _, _)| function) {
            assert!(offsets.contains_key(function), "{function} in {offsets:?}");
        }
        let node = symbol_offsets(Path::new("/usr/bin/node")).expect("node readable");
        assert!(REQUIRED.iter().all(|f| node.contains_key(f)), "{node:?}");
        // curl imports SSL_write from libssl: an import is not code to probe.
        let curl = symbol_offsets(Path::new("/usr/bin/curl")).expect("curl readable");
        assert!(curl.is_empty(), "{curl:?}");
        assert!(symbol_offsets(Path::new("/etc/hostname")).is_err());
    }
}
