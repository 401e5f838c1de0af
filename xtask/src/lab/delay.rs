//! The per-direction delay injector: packets sent to NFQUEUE in the fw namespace are held by a
//! thread of this process and accepted after a fixed delay.
//!
//! Why NFQUEUE and a userspace holder: this kernel has no netem (see KERNEL.md), and nft's own
//! `queue` statement does not work here, so iptables-nft's NFQUEUE target feeds the queue.
//! The iptables rules themselves are managed by [`super::Lab::set_delay`]; this module only
//! holds and releases packets.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nfq::{Message, Queue};

use super::{Direction, netns::Netns};

/// Longest kernel queue per direction. The default (1024) drops bursts: at 20 ms and tens of
/// thousands of packets per second thousands of packets are held at once.
const QUEUE_MAX_LEN: u32 = 16384;
/// Netlink receive buffer for the queue socket. If it fills, the kernel drops packets instead
/// of queueing them; metadata-only messages are ~100-200 bytes, so this holds ~50k.
const RCVBUF: libc::c_int = 8 << 20;
/// Messages read per wake-up before looking at due releases again, so a flood of arrivals
/// cannot make releases late.
const RECV_BATCH: usize = 64;
/// `SIOCGSKNS` (linux/sockios.h): get a socket's network namespace as an fd. Not in `libc`.
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// The NFQUEUE number that feeds `dir`'s holder. Queue numbers are per network namespace, and
/// each lab has its own fw namespace, so fixed numbers never clash between labs.
pub fn queue_num(dir: Direction) -> u16 {
    match dir {
        Direction::Forward => 1,
        Direction::Return => 2,
    }
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Forward => 0,
        Direction::Return => 1,
    }
}

/// State shared between the lab and its holder thread.
struct Shared {
    /// Delay per direction in ns, read when a packet arrives.
    delay_ns: [AtomicU64; 2],
    stop: AtomicBool,
    /// eventfd that wakes the holder out of `ppoll` to stop.
    wake: OwnedFd,
}

/// Owns the holder thread; stops it on drop (accepting every held packet at once).
pub struct DelayInjector {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DelayInjector {
    /// Starts the holder thread in `fw`'s namespace, bound to both queues, and waits until it
    /// is ready (or failed to bind).
    pub fn start(fw: &Netns) -> Result<DelayInjector> {
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error()).context("eventfd");
        }
        let shared = Arc::new(Shared {
            delay_ns: [AtomicU64::new(0), AtomicU64::new(0)],
            stop: AtomicBool::new(false),
            // SAFETY: efd is a fresh fd that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(efd) },
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let ns_file = fw.clone_file();
        let ns_name = fw.name().to_owned();
        let thread = thread::Builder::new()
            .name(format!("delay-{ns_name}"))
            .spawn(move || {
                // SAFETY: plain system call on an fd kept alive by `ns_file`.
                if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let err = io::Error::last_os_error();
                    let _ = ready_tx.send(Err(anyhow::Error::new(err).context("setns")));
                    return;
                }
                drop(ns_file);
                match Holder::open() {
                    Ok(mut holder) => {
                        let _ = ready_tx.send(Ok(()));
                        holder.run(&thread_shared);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("spawn the delay holder thread")?;
        let mut injector = DelayInjector {
            shared,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(injector),
            Ok(Err(e)) => {
                injector.stop();
                Err(e.context(format!("starting the delay holder in {ns_name}")))
            }
            Err(_) => {
                injector.stop();
                bail!("the delay holder thread for {ns_name} died while starting")
            }
        }
    }

    /// Sets the delay applied to packets of `dir` that arrive from now on. Packets already held
    /// keep the release time they got on arrival.
    pub fn set(&self, dir: Direction, delay: Duration) {
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_ns[index(dir)].store(ns, Ordering::Relaxed);
    }

    /// The delay currently applied to new packets of `dir`.
    pub fn get(&self, dir: Direction) -> Duration {
        Duration::from_nanos(self.shared.delay_ns[index(dir)].load(Ordering::Relaxed))
    }

    /// Stops the holder and waits for it; idempotent.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.shared.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        if thread.join().is_err() {
            log::warn!("lab: the delay holder thread panicked");
        }
    }
}

impl Drop for DelayInjector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The holder thread's state: the queue socket and the packets held per direction, each with
/// its release time, in arrival order.
struct Holder {
    queue: Queue,
    fd: RawFd,
    held: [VecDeque<(Instant, Message)>; 2],
}

impl Holder {
    /// Opens and configures the queue socket in the calling thread's namespace.
    fn open() -> Result<Holder> {
        let mut queue = Queue::open().context("open an NFQUEUE netlink socket")?;
        let fd = find_queue_fd().context("finding the nfq socket's fd")?;
        let rcvbuf = RCVBUF;
        // SAFETY: fcntl/setsockopt on the socket the queue owns, with valid arguments.
        unsafe {
            // The crate opens the socket without SOCK_CLOEXEC: a server forked meanwhile
            // would keep it (and the queue binding) alive.
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            // Best effort (SO_RCVBUFFORCE needs CAP_NET_ADMIN, which we have as root).
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const rcvbuf).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            // Timer slack defaults to 50 us; every release is a timed wake-up, so ask for
            // the tightest the kernel gives.
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
            // Real-time priority: under load (wrk, servers and the tracer on 2 cores) a normal
            // thread waits for CPU and releases late by milliseconds; measured here, release
            // lateness went from median 68 / p90 200 us to 40 / 94 us. The thread blocks in
            // ppoll whenever nothing is due, and RT throttling caps it at 95% of a CPU if a
            // flood keeps it busy. Best effort.
            let param = libc::sched_param { sched_priority: 10 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
                log::debug!(
                    "lab: delay holder stays SCHED_OTHER: {}",
                    io::Error::last_os_error()
                );
            }
        }
        for dir in [Direction::Forward, Direction::Return] {
            let num = queue_num(dir);
            let ctx = || format!("configuring NFQUEUE {num}");
            queue.bind(num).with_context(ctx)?;
            // Metadata only: the holder never looks at payloads.
            queue.set_copy_range(num, 0).with_context(ctx)?;
            queue
                .set_queue_max_len(num, QUEUE_MAX_LEN)
                .with_context(ctx)?;
            // Without this the kernel segments GRO/GSO packets before queueing them; we never
            // read or change payloads or checksums, so large packets can pass as they are.
            queue.set_recv_gso(num, true).with_context(ctx)?;
        }
        queue.set_nonblocking(true);
        Ok(Holder {
            queue,
            fd,
            held: [VecDeque::new(), VecDeque::new()],
        })
    }

    fn run(&mut self, shared: &Shared) {
        while !shared.stop.load(Ordering::SeqCst) {
            self.release_due(Instant::now());
            let next = self
                .held
                .iter()
                .filter_map(|q| q.front().map(|(t, _)| *t))
                .min();
            let timeout = next.map(|t| {
                let d = t.saturating_duration_since(Instant::now());
                libc::timespec {
                    tv_sec: d.as_secs() as libc::time_t,
                    tv_nsec: d.subsec_nanos() as libc::c_long,
                }
            });
            let mut fds = [
                libc::pollfd {
                    fd: self.fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: shared.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout_ptr = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const _);
            // SAFETY: fds and timeout are valid for the call; no signal mask change.
            let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, timeout_ptr, std::ptr::null()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    log::error!("lab: delay holder ppoll failed: {err}");
                    break;
                }
                continue;
            }
            if fds[0].revents != 0 {
                self.receive(shared);
            }
        }
        // Let everything held go at once rather than have the kernel drop it when the socket
        // closes.
        self.release_due(Instant::now() + Duration::from_secs(3600));
    }

    /// Reads up to [`RECV_BATCH`] queued packets and stamps each with its release time.
    fn receive(&mut self, shared: &Shared) {
        for _ in 0..RECV_BATCH {
            match self.queue.recv() {
                Ok(msg) => {
                    let arrived = Instant::now();
                    let slot = match msg.get_queue_num() {
                        1 => 0,
                        2 => 1,
                        other => {
                            log::warn!("lab: packet from unexpected NFQUEUE {other}, accepting");
                            self.verdict(msg);
                            continue;
                        }
                    };
                    let delay = Duration::from_nanos(shared.delay_ns[slot].load(Ordering::Relaxed));
                    self.held[slot].push_back((arrived + delay, msg));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("lab: delay holder recv failed: {e}");
                    return;
                }
            }
        }
    }

    /// Accepts, in arrival order, every held packet due by `now`. A packet that got a shorter
    /// delay than its predecessor (the delay was lowered) waits for it: order is kept.
    fn release_due(&mut self, now: Instant) {
        for slot in 0..2 {
            while self.held[slot].front().is_some_and(|(t, _)| *t <= now) {
                let (_, msg) = self.held[slot].pop_front().expect("checked by front()");
                self.verdict(msg);
            }
        }
    }

    fn verdict(&mut self, msg: Message) {
        // The message's default verdict is Accept.
        if let Err(e) = self.queue.verdict(msg) {
            log::warn!("lab: delay holder verdict failed: {e}");
        }
    }
}

/// Finds the fd of the nfq socket just opened by this thread.
///
/// Why: `nfq::Queue` does not expose its fd, and without it the holder could not `ppoll`
/// with a timeout to release packets on time. The socket is recognised as the only
/// `NETLINK_NETFILTER` socket of this process in this thread's network namespace: each lab has
/// its own fw namespace and one holder there, and nothing else in the process opens such
/// sockets (iptables runs as child processes).
fn find_queue_fd() -> Result<RawFd> {
    let (want_dev, want_ino) = super::netns::current_thread_netns()?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/thread-self/fd").context("read /proc/thread-self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if sockopt_int(fd, libc::SO_DOMAIN) != Some(libc::AF_NETLINK)
            || sockopt_int(fd, libc::SO_PROTOCOL) != Some(libc::NETLINK_NETFILTER)
        {
            continue;
        }
        // SAFETY: ioctl on an fd number; a non-socket or closed fd just fails.
        let nsfd = unsafe { libc::ioctl(fd, SIOCGSKNS as _) };
        if nsfd < 0 {
            continue;
        }
        // SAFETY: nsfd is a fresh fd we own; st is written by fstat.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            let rc = libc::fstat(nsfd, &mut st);
            libc::close(nsfd);
            (rc == 0).then_some(st)
        };
        if st.is_some_and(|st| st.st_dev == want_dev && st.st_ino == want_ino) {
            found.push(fd);
        }
    }
    match found[..] {
        [fd] => Ok(fd),
        _ => bail!(
            "expected exactly one NETLINK_NETFILTER socket in this network namespace, found {found:?}"
        ),
    }
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw mut val).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(val)
}
