//! Named network namespaces (`/run/netns/<name>`, as made by `ip netns add`) and running
//! programs or Rust code inside them.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    os::{
        fd::AsRawFd,
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use super::cmd::run_command;

/// Where `ip netns` keeps its bind-mounted namespace files; the tracer's `--netns NAME` and
/// every `ip netns exec` look here, so the lab must too.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace.
///
/// A namespace made by [`Netns::create`] is owned: dropping it kills every process still inside
/// and deletes `/run/netns/<name>` (which, with no process left, frees the namespace and all of
/// its interfaces and iptables state). One opened with [`Netns::open`] is only borrowed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    // Shared with the `pre_exec` closures of the `Command`s made by `command`, so that the fd
    // they `setns` into stays valid as long as any such `Command` lives.
    file: Arc<File>,
    owned: bool,
}

impl Netns {
    /// Creates `/run/netns/<name>` with `ip netns add` (which also sets up the shared mount
    /// of `/run/netns` that other tools expect) and brings `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        run_command(Command::new("ip").args(["netns", "add", name]))?;
        // From here on, dropping `ns` deletes the namespace again if a later step fails.
        let mut ns = Netns::open(name)?;
        ns.owned = true;
        run_command(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Opens an existing namespace by name, without taking ownership.
    pub fn open(name: &str) -> Result<Netns> {
        let path = Path::new(NETNS_DIR).join(name);
        let file = File::open(&path)
            .with_context(|| format!("cannot open network namespace {}", path.display()))?;
        Ok(Netns {
            name: name.to_owned(),
            path,
            file: Arc::new(file),
            owned: false,
        })
    }

    /// The name to give `ip netns exec`, `ip -n` or the tracer's `--netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `Command` for `program` that runs inside this namespace.
    ///
    /// The child calls `setns(CLONE_NEWNET)` between fork and exec: cheaper than `ip netns
    /// exec` (no extra process, no mount namespace) and the child's pid is the program's own.
    /// Unlike `ip netns exec`, `/sys` is not remounted, so `/sys/class/net` still shows the
    /// root namespace; netlink, `/proc/net` and `/proc/sys/net` are the namespace's.
    /// The child also gets every inherited fd above 2 marked close-on-exec, because some fds
    /// in this process (the nfq crate's netlink socket) are opened without `O_CLOEXEC` and
    /// must not leak into servers.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let file = Arc::clone(&self.file);
        // SAFETY: the closure only makes async-signal-safe system calls and touches no locks
        // or allocations (the Arc is only dereferenced to read the fd).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Best effort: close_range needs Linux 5.11.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a fresh thread that has joined this namespace (`setns` is per thread), and
    /// returns its result. Sockets created by `f` stay in this namespace even when returned.
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        thread::scope(|s| {
            let handle = s.spawn(|| {
                self.enter_current_thread()?;
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Moves the calling thread into this namespace (for threads that live there, like the
    /// delay holder).
    pub(crate) fn enter_current_thread(&self) -> Result<()> {
        // SAFETY: plain system call on an fd we own.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("setns into network namespace {}", self.name));
        }
        Ok(())
    }

    /// Pids of the processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let meta = self.file.metadata()?;
        pids_in_netns(meta.dev(), meta.ino())
    }

    pub(crate) fn clone_file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = destroy(&self.name)
        {
            log::warn!("lab: cannot delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// Kills every process left in namespace `name`, then deletes `/run/netns/<name>`.
pub(crate) fn destroy(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        // Someone else (another process's stale cleanup) got there first.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    kill_all_in_netns(meta.dev(), meta.ino())
        .with_context(|| format!("killing the processes in network namespace {name}"))?;
    match run_command(Command::new("ip").args(["netns", "delete", name])) {
        Err(_) if !path.exists() => Ok(()),
        other => other.map(drop),
    }
}

/// SIGKILLs every process in the namespace (`dev`, `ino`) and waits (up to 2 s) until they are
/// gone, so that after a lab is dropped no server outlives it. Never kills this process.
fn kill_all_in_netns(dev: u64, ino: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = pids_in_netns(dev, ino)?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} survived SIGKILL");
        }
        for pid in pids {
            // SAFETY: plain system call.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Scans `/proc/<pid>/ns/net` (what `ip netns pids` does). Zombies have no namespace link
/// and are skipped: they hold no resources of the namespace.
fn pids_in_netns(dev: u64, ino: u64) -> Result<Vec<i32>> {
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes may exit while we look: any error means "not in it".
        if let Ok(meta) = std::fs::metadata(entry.path().join("ns/net"))
            && meta.dev() == dev
            && meta.ino() == ino
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The calling thread's network namespace as (dev, ino).
pub(crate) fn current_thread_netns() -> Result<(u64, u64)> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| anyhow!(e))
        .context("stat /proc/thread-self/ns/net")?;
    Ok((meta.dev(), meta.ino()))
}
