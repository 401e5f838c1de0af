//! The test lab: three network namespaces standing in for a client ("agent"), an
//! uninstrumented middlebox ("fw") and a server ("persona"), with HTTP servers in persona and
//! a per-direction delay injector in fw that gives per-hop ground truth.
//!
//! ```text
//!  agent                        fw                          persona
//!  10.10.1.2/24 [a] <--veth--> [fa] 10.10.1.1/24
//!                                    10.10.2.1/24 [fp] <--veth--> [p] 10.10.2.2/24
//!  default via 10.10.1.1       ip_forward=1                 default via 10.10.2.1
//!                              NFQUEUE on fa = forward delay  nginx :80 :443, python :8080
//!                              NFQUEUE on fp = return delay
//! ```
//!
//! Interfaces are named `ht<pid base 36>-<instance base 36>-<side>` with the sides shown in
//! brackets (see [`Lab::ifaces`]); namespaces `ht-<pid>-<instance>-{agent,fw,persona}` (see
//! [`Lab::netns`]).
//!
//! Every lab has its own namespaces, so the addresses are the same in every lab while the names
//! (namespaces, interfaces, temp dir) are unique per process and instance: tests run in
//! parallel in one process and in several processes. Interfaces are created directly inside
//! their namespaces, never in the root namespace, but still get unique names so that a tracer
//! that sees every namespace (device names in `net:*` tracepoints) can tell them apart.
//!
//! Everything needs root and the real kernel (see /work/shared/TESTBED.md and KERNEL.md).

mod cmd;
mod delay;
pub mod golang;
mod interception;
mod netns;
pub mod pki;
mod servers;
#[cfg(test)]
mod tests;

use std::{
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Output},
    sync::{
        Mutex, Once, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub use self::interception::{INTERCEPTION_PORT, PersonaLeg, TlsInterception};
pub use self::{
    cmd::run_command,
    netns::{NETNS_DIR, Netns},
    servers::{BIG_BODY_LEN, Background, NGINX_SMALL_BODY, PYTHON_SMALL_BODY},
};
use self::{delay::DelayInjector, servers::Server};

/// The agent's address (on its interface towards fw).
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
/// fw's address on the agent side: the agent's default gateway.
pub const FW_AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
/// fw's address on the persona side: persona's default gateway.
pub const FW_PERSONA_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 1);
/// The persona's address, where its servers listen.
pub const PERSONA_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
/// Prefix length of both links.
pub const PREFIX_LEN: u8 = 24;
/// nginx's port in persona.
pub const NGINX_PORT: u16 = 80;
/// nginx's HTTPS port in persona (TLS 1.2 and 1.3, certificate by [`Lab::persona_ca`]).
pub const NGINX_TLS_PORT: u16 = 443;
/// The persona's name in its certificate (which also names [`PERSONA_IP`]).
pub const PERSONA_TLS_NAME: &str = "persona.lab";
/// The Python server's port in persona.
pub const PYTHON_PORT: u16 = 8080;

/// Prefix of every name the lab creates (namespaces `ht-<pid>-<n>-<role>`, temp dirs
/// `ht-<pid>-<n>-XXXXXX`): [`Lab::cleanup_stale`] recognises leftovers by it and by the pid.
const NAME_PREFIX: &str = "ht-";

/// Which host of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// The client side, where the tracer's subject runs.
    Agent,
    /// The middlebox: forwards between the two links, holds delayed packets.
    Fw,
    /// The server side.
    Persona,
}

/// A direction of traffic through fw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Agent to persona: packets entering fw on its agent-side interface.
    Forward,
    /// Persona to agent: packets entering fw on its persona-side interface.
    Return,
}

/// What [`Lab::start`] sets up.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Start nginx on [`PERSONA_IP`]:[`NGINX_PORT`].
    pub nginx: bool,
    /// nginx `worker_processes`; 0 = `auto` (one per CPU, Debian's default and what the
    /// TESTBED.md baselines used: a single worker halves keep-alive rates on 2 cores).
    pub nginx_workers: u32,
    /// Start the Python server on [`PERSONA_IP`]:[`PYTHON_PORT`].
    pub python: bool,
    /// Initial forward delay (0 = no queue rule at all).
    pub forward_delay: Duration,
    /// Initial return delay (0 = no queue rule at all).
    pub return_delay: Duration,
    /// How long each server may take to listen.
    pub ready_timeout: Duration,
}

impl Default for LabConfig {
    /// Both servers, nginx workers `auto`, no delay, 10 s to get ready.
    fn default() -> Self {
        LabConfig {
            nginx: true,
            nginx_workers: 0,
            python: true,
            forward_delay: Duration::ZERO,
            return_delay: Duration::ZERO,
            ready_timeout: Duration::from_secs(10),
        }
    }
}

impl LabConfig {
    /// Namespaces and links only: no server.
    pub fn bare() -> Self {
        LabConfig {
            nginx: false,
            python: false,
            ..Default::default()
        }
    }
}

/// The interface names of a lab (unique per lab, at most 15 bytes).
#[derive(Clone, Debug)]
pub struct Ifaces {
    /// In agent, towards fw.
    pub agent: String,
    /// In fw, towards agent (forward-delay queue).
    pub fw_agent: String,
    /// In fw, towards persona (return-delay queue).
    pub fw_persona: String,
    /// In persona, towards fw.
    pub persona: String,
}

/// A running lab. Dropping it (also while unwinding from a panic) stops the delay holder,
/// stops the servers, kills every process left in its namespaces, deletes the namespaces
/// (and with them interfaces and iptables rules) and removes its temp dir.
///
/// `Lab` is `Send + Sync`: share it with `Arc` to change delays while load runs.
pub struct Lab {
    id: String,
    ifaces: Ifaces,
    delay: DelayInjector,
    /// Whether each direction's NFQUEUE rule is installed; the lock also serialises changes.
    rules: Mutex<[bool; 2]>,
    servers: Vec<Background>,
    /// The CA that signed the persona's certificate: what a client of the persona trusts.
    persona_ca: pki::CertKey,
    // Fields drop in declaration order after `Drop::drop`: namespaces (which kills what is
    // left in them) before the temp dir the servers used.
    agent: Netns,
    fw: Netns,
    persona: Netns,
    temp: tempfile::TempDir,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

impl Lab {
    /// Builds the topology, starts the delay holder and the configured servers, and returns
    /// once every server accepts TCP connections (about 0.2-1 s).
    ///
    /// The first call in a process also runs [`Lab::cleanup_stale`] (and removes leftovers
    /// carrying this process's own pid: an earlier, killed process may have had it).
    pub fn start(config: LabConfig) -> Result<Lab> {
        initial_cleanup();
        let pid = std::process::id();
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{NAME_PREFIX}{pid}-{n}");
        let short = format!("ht{}-{}", base36(pid), base36(n));
        let ifaces = Ifaces {
            agent: format!("{short}-a"),
            fw_agent: format!("{short}-fa"),
            fw_persona: format!("{short}-fp"),
            persona: format!("{short}-p"),
        };
        if ifaces.fw_agent.len() > 15 {
            bail!("interface name {} is longer than 15 bytes", ifaces.fw_agent);
        }
        let temp = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .context("create the lab's temp dir")?;

        // Each local below cleans up after itself if a later step fails.
        let agent = Netns::create(&format!("{id}-agent"))?;
        let fw = Netns::create(&format!("{id}-fw"))?;
        let persona = Netns::create(&format!("{id}-persona"))?;
        // Created inside fw with the peer placed directly in the other namespace: nothing
        // appears in the root namespace, even for a moment.
        for (fw_if, peer_if, peer) in [
            (&ifaces.fw_agent, &ifaces.agent, &agent),
            (&ifaces.fw_persona, &ifaces.persona, &persona),
        ] {
            ip(
                &fw,
                &[
                    "link",
                    "add",
                    fw_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer_if,
                    "netns",
                    peer.name(),
                ],
            )?;
        }
        let links = [
            (&agent, &ifaces.agent, AGENT_IP, Some(FW_AGENT_IP)),
            (&fw, &ifaces.fw_agent, FW_AGENT_IP, None),
            (&fw, &ifaces.fw_persona, FW_PERSONA_IP, None),
            (&persona, &ifaces.persona, PERSONA_IP, Some(FW_PERSONA_IP)),
        ];
        for (ns, iface, addr, gateway) in links {
            ip(
                ns,
                &["addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", iface],
            )?;
            ip(ns, &["link", "set", iface, "up"])?;
            if let Some(gw) = gateway {
                ip(ns, &["route", "add", "default", "via", &gw.to_string()])?;
            }
        }
        write_sysctls(&fw, &[("net/ipv4/ip_forward", "1")])?;
        // New-connection load exhausts the default ephemeral range within seconds and leaves
        // it full of TIME_WAIT: rates then collapse run after run (TESTBED.md).
        write_sysctls(
            &agent,
            &[
                ("net/ipv4/ip_local_port_range", "1024 65535"),
                ("net/ipv4/tcp_tw_reuse", "1"),
            ],
        )?;

        let persona_ca = pki::create_ca(temp.path(), "persona")?;
        let delay = DelayInjector::start(&fw)?;
        let mut lab = Lab {
            id,
            ifaces,
            delay,
            rules: Mutex::new([false; 2]),
            servers: Vec::new(),
            persona_ca,
            agent,
            fw,
            persona,
            temp,
        };
        // From here on, an error drops `lab`, which undoes everything.
        lab.set_delay(Direction::Forward, config.forward_delay)?;
        lab.set_delay(Direction::Return, config.return_delay)?;

        // Start both servers first, then wait for both: their start-ups overlap. On error,
        // `started` (declared after `lab`) is dropped first: servers stop before the
        // namespaces go.
        let mut started: Vec<Server> = Vec::new();
        let dir = lab.temp.path().to_owned();
        if config.nginx {
            let addr = SocketAddr::new(IpAddr::V4(PERSONA_IP), NGINX_PORT);
            let cert = pki::create_leaf(
                &dir,
                "persona",
                &format!("DNS:{PERSONA_TLS_NAME},IP:{PERSONA_IP}"),
                &lab.persona_ca,
            )?;
            started.push(servers::start_nginx(
                &lab.persona,
                &dir,
                addr,
                NGINX_TLS_PORT,
                &cert,
                config.nginx_workers,
            )?);
        }
        if config.python {
            let addr = SocketAddr::new(IpAddr::V4(PERSONA_IP), PYTHON_PORT);
            started.push(servers::start_python(&lab.persona, &dir, addr)?);
        }
        for server in &mut started {
            servers::wait_listening(&lab.persona, server, config.ready_timeout)?;
        }
        lab.servers.extend(started.into_iter().map(|s| s.process));
        Ok(lab)
    }

    /// Removes what killed processes left behind: namespaces named `ht-<pid>-...` whose pid is
    /// no longer alive (after SIGKILLing any process still inside them, e.g. an orphaned
    /// nginx) and temp dirs `ht-<pid>-...` of dead pids. Returns how many namespaces it
    /// deleted. Labs of live processes, including this one, are left alone.
    pub fn cleanup_stale() -> Result<usize> {
        cleanup(false)
    }

    /// `ht-<pid>-<n>`: the prefix of this lab's namespace and temp dir names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespace of `host` (its `name()` is what `ip netns exec` and the tracer's
    /// `--netns` take; its `path()` is under `/run/netns`).
    pub fn netns(&self, host: Host) -> &Netns {
        match host {
            Host::Agent => &self.agent,
            Host::Fw => &self.fw,
            Host::Persona => &self.persona,
        }
    }

    /// The interface names on each side.
    pub fn ifaces(&self) -> &Ifaces {
        &self.ifaces
    }

    /// The lab's temp dir (server configs and logs `nginx.log`, `python.log`); removed on drop.
    pub fn temp_dir(&self) -> &Path {
        self.temp.path()
    }

    /// `http://10.10.2.2:80<path>`: nginx as seen from the agent.
    pub fn nginx_url(&self, path: &str) -> String {
        format!("http://{PERSONA_IP}:{NGINX_PORT}{path}")
    }

    /// `https://10.10.2.2:443<path>`: nginx over TLS as seen from the agent; trust
    /// [`Lab::persona_ca`] (`curl --cacert`).
    pub fn nginx_https_url(&self, path: &str) -> String {
        format!("https://{PERSONA_IP}:{NGINX_TLS_PORT}{path}")
    }

    /// The PEM file of the CA that signed the persona's certificate.
    pub fn persona_ca(&self) -> &Path {
        &self.persona_ca.cert
    }

    /// A new certificate `<name>.pem`/`<name>.key` in the temp dir for the persona's name and
    /// address, signed by [`Lab::persona_ca`]: for TLS servers a test starts itself (caddy, Go).
    pub fn persona_certificate(&self, name: &str) -> Result<pki::CertKey> {
        pki::create_leaf(
            self.temp.path(),
            name,
            &format!("DNS:{PERSONA_TLS_NAME},IP:{PERSONA_IP}"),
            &self.persona_ca,
        )
    }

    /// `http://10.10.2.2:8080<path>`: the Python server as seen from the agent.
    pub fn python_url(&self, path: &str) -> String {
        format!("http://{PERSONA_IP}:{PYTHON_PORT}{path}")
    }

    /// Pids of the servers the lab started (nginx master, python).
    pub fn server_pids(&self) -> Vec<u32> {
        self.servers.iter().map(Background::pid).collect()
    }

    /// A `Command` running `argv[0]` with `argv[1..]` inside `host`'s namespace (see
    /// [`Netns::command`]). Panics if `argv` is empty.
    pub fn exec<S: AsRef<OsStr>>(&self, host: Host, argv: &[S]) -> Command {
        let (program, args) = argv.split_first().expect("Lab::exec needs a program");
        let mut cmd = self.netns(host).command(program);
        cmd.args(args);
        cmd
    }

    /// Runs `argv` in `host` to completion; fails with the command line, status and stderr
    /// unless it exits with 0.
    pub fn run<S: AsRef<OsStr>>(&self, host: Host, argv: &[S]) -> Result<Output> {
        run_command(&mut self.exec(host, argv))
            .with_context(|| format!("in network namespace {}", self.netns(host).name()))
    }

    /// Like [`Lab::run`], returning stdout as a string.
    pub fn run_stdout<S: AsRef<OsStr>>(&self, host: Host, argv: &[S]) -> Result<String> {
        let out = self.run(host, argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `argv` in `host` in the background; the returned guard stops it when dropped.
    /// Whatever is still running in the lab's namespaces when the lab is dropped is killed.
    pub fn spawn<S: AsRef<OsStr>>(&self, host: Host, argv: &[S]) -> Result<Background> {
        Background::spawn(&mut self.exec(host, argv))
    }

    /// Runs Rust code on a thread inside `host`'s namespace (e.g. to open sockets there).
    pub fn run_in<T: Send, F: FnOnce() -> T + Send>(&self, host: Host, f: F) -> Result<T> {
        self.netns(host).run_in(f)
    }

    /// Sets the delay added to packets in `dir` (exact per packet, arrival order kept).
    ///
    /// Zero removes the NFQUEUE rule instead of queueing with no delay: the round trip through
    /// userspace alone halves the maximum request rate (TESTBED.md). Packets already held keep
    /// their release time.
    pub fn set_delay(&self, dir: Direction, delay: Duration) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = match dir {
            Direction::Forward => 0,
            Direction::Return => 1,
        };
        let want = !delay.is_zero();
        // Delay first, rule second: the first packet queued already gets the new delay.
        self.delay.set(dir, delay);
        if want != rules[slot] {
            let iface = match dir {
                Direction::Forward => &self.ifaces.fw_agent,
                Direction::Return => &self.ifaces.fw_persona,
            };
            let queue = delay::queue_num(dir).to_string();
            let action = if want { "-A" } else { "-D" };
            // `--queue-bypass`: if the holder is gone, packets pass instead of being dropped.
            let argv = [
                iptables(),
                "-w",
                "-t",
                "mangle",
                action,
                "PREROUTING",
                "-i",
                iface,
                "-j",
                "NFQUEUE",
                "--queue-num",
                &queue,
                "--queue-bypass",
            ];
            self.run(Host::Fw, &argv)?;
            rules[slot] = want;
        }
        Ok(())
    }

    /// The delay currently set for `dir`.
    pub fn delay(&self, dir: Direction) -> Duration {
        self.delay.get(dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.delay.stop();
        // Graceful first (nginx stops its workers only on SIGTERM); the namespaces' drop then
        // SIGKILLs whatever is left in them, including processes spawned by the caller.
        self.servers.clear();
    }
}

/// iptables-nft explicitly: where the `iptables` alternative points to the legacy backend, its
/// rules would not coexist with nft-based tools, and legacy tables may be missing.
fn iptables() -> &'static str {
    static PATH: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let nft = ["/usr/sbin/iptables-nft", "/sbin/iptables-nft"];
        nft.into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("iptables")
    })
}

fn ip(ns: &Netns, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.arg("-n").arg(ns.name()).args(args);
    run_command(&mut cmd)?;
    Ok(())
}

/// Writes `/proc/sys/<key>` from a thread inside `ns`: `/proc/sys/net` belongs to the writing
/// thread's namespace, so no `sysctl` process is needed.
fn write_sysctls(ns: &Netns, settings: &[(&str, &str)]) -> Result<()> {
    ns.run_in(|| -> Result<()> {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value).with_context(|| {
                format!("write {value:?} to {} in {}", path.display(), ns.name())
            })?;
        }
        Ok(())
    })?
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

/// `ht-<pid>-<n>-<rest>` -> pid.
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix(NAME_PREFIX)?.splitn(3, '-');
    let pid = parts.next()?;
    let n = parts.next()?;
    let rest = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) || rest.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Once per process, before its first lab: leftovers of dead processes, and of an earlier
/// process that had this pid (names embed the pid, so they would clash).
fn initial_cleanup() {
    STALE_CLEANUP.call_once(|| {
        if let Err(e) = cleanup(true) {
            log::warn!("lab: cleaning up stale labs: {e:#}");
        }
    });
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks existence and permission.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

fn cleanup(include_own_pid: bool) -> Result<usize> {
    let me = std::process::id();
    let stale = |name: &str| match owner_pid(name) {
        Some(pid) if pid == me => include_own_pid,
        Some(pid) => !pid_alive(pid),
        None => false,
    };
    let mut removed = 0;
    let mut errors = Vec::new();
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                match netns::destroy(&name) {
                    Ok(()) => removed += 1,
                    Err(e) => errors.push(format!("{name}: {e:#}")),
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale(&name)
                && entry.file_type().is_ok_and(|t| t.is_dir())
                && let Err(e) = std::fs::remove_dir_all(entry.path())
            {
                errors.push(format!("{}: {e}", entry.path().display()));
            }
        }
    }
    if !errors.is_empty() {
        bail!("cannot remove stale lab state: {}", errors.join("; "));
    }
    Ok(removed)
}
