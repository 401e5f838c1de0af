//! The eBPF objects (programs, maps, links) a process holds, from /proc/PID/fdinfo, and whether
//! the kernel still has them: a detached and freed object can no longer be opened by its id.

use std::{fs, time::Duration};

/// Kernel ids of the eBPF objects one process has open.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BpfObjects {
    pub programs: Vec<u32>,
    pub maps: Vec<u32>,
    pub links: Vec<u32>,
    /// `link_type` of each link (tracepoint links show as `perf_event` or `raw_tracepoint`,
    /// tc as `tcx`).
    pub link_types: Vec<String>,
}

impl BpfObjects {
    /// Reads every fd of `pid`: bpf-prog, bpf-map and bpf-link fds say their id in fdinfo.
    pub fn of_process(pid: u32) -> std::io::Result<Self> {
        let mut found = Self::default();
        for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
            let Ok(text) = fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            let id = |name: &str| field(name).and_then(|v| v.parse::<u32>().ok());
            if let Some(link) = id("link_id:") {
                found.links.push(link);
                found
                    .link_types
                    .push(field("link_type:").unwrap_or_default());
            } else if let Some(program) = id("prog_id:") {
                found.programs.push(program);
            } else if let Some(map) = id("map_id:") {
                found.maps.push(map);
            }
        }
        for list in [&mut found.programs, &mut found.maps, &mut found.links] {
            list.sort_unstable();
            list.dedup();
        }
        Ok(found)
    }

    /// The ids the kernel still knows, after waiting up to `patience` for deferred frees.
    pub fn still_loaded(&self, patience: Duration) -> Self {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let left = Self {
                programs: alive(BPF_PROG_GET_FD_BY_ID, &self.programs),
                maps: alive(BPF_MAP_GET_FD_BY_ID, &self.maps),
                links: alive(BPF_LINK_GET_FD_BY_ID, &self.links),
                link_types: Vec::new(),
            };
            let empty = left.programs.is_empty() && left.maps.is_empty() && left.links.is_empty();
            if empty || std::time::Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// The ids that `cmd` can still open (anything but ENOENT counts as alive: an EPERM would say
/// nothing about whether the object exists).
fn alive(cmd: libc::c_long, ids: &[u32]) -> Vec<u32> {
    ids.iter()
        .copied()
        .filter(|&id| {
            // union bpf_attr for *_GET_FD_BY_ID: the id, then next_id and open_flags.
            let attr: [u32; 3] = [id, 0, 0];
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    cmd,
                    attr.as_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            if fd >= 0 {
                unsafe { libc::close(fd as libc::c_int) };
                return true;
            }
            std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
        })
        .collect()
}
