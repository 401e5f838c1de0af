//! Listening sockets that existed before the agent started, with the processes that own them.
//!
//! The kernel probe learns a listener when it goes CLOSE -> LISTEN; servers started earlier
//! (the usual case for an agent deployed onto a running host) would otherwise leave accepted
//! connections without a pid or process name, and a `--pid` filter could not match them.
//! /proc has everything: /proc/PID/net/tcp{,6} lists the listeners of PID's namespace with
//! their socket inodes, /proc/PID/fd links name the sockets a process holds.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
};

use tracer_common::conn::{ListenerInfo, ListenerKey};

/// TCP_LISTEN as /proc/net/tcp prints it (hex state column).
const PROC_TCP_LISTEN: &str = "0A";

/// Every listener in the given namespaces (all namespaces when `netns` is empty), owned by the
/// lowest pid holding its socket (a pre-forking server's master).
pub fn existing(netns: &[u32]) -> Vec<(ListenerKey, ListenerInfo)> {
    let wanted: HashSet<u32> = netns.iter().copied().collect();
    // netns inode -> pids in it, ascending.
    let mut pids_by_netns: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for pid in all_pids() {
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let ns = meta.ino() as u32;
        if wanted.is_empty() || wanted.contains(&ns) {
            pids_by_netns.entry(ns).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    for (ns, pids) in pids_by_netns {
        // Any process of the namespace shows the namespace's sockets.
        let Some(listening) = pids.iter().find_map(|pid| listening_sockets(*pid)) else {
            continue;
        };
        if listening.is_empty() {
            continue;
        }
        let mut claimed = HashSet::new();
        for pid in pids {
            for inode in socket_inodes(pid) {
                let Some(&port) = listening.get(&inode) else {
                    continue;
                };
                if claimed.insert(port) {
                    let key = ListenerKey {
                        netns_ino: ns,
                        port,
                        _pad: 0,
                    };
                    found.push((
                        key,
                        ListenerInfo {
                            tgid: pid,
                            comm: comm(pid),
                        },
                    ));
                }
            }
        }
    }
    found
}

pub(crate) fn all_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// Socket inode -> local port of every listening TCP socket in `pid`'s namespace.
fn listening_sockets(pid: u32) -> Option<HashMap<u64, u16>> {
    let mut sockets = HashMap::new();
    for file in ["tcp", "tcp6"] {
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            if file == "tcp" {
                return None;
            }
            continue;
        };
        sockets.extend(parse_listeners(&table));
    }
    Some(sockets)
}

/// Parses /proc/net/tcp: `sl local_address rem_address st ... uid timeout inode`.
fn parse_listeners(table: &str) -> impl Iterator<Item = (u64, u16)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&PROC_TCP_LISTEN) {
            return None;
        }
        let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        let inode = fields.get(9)?.parse().ok()?;
        Some((inode, port))
    })
}

fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.filter_map(|fd| {
        let target = std::fs::read_link(fd.ok()?.path()).ok()?;
        let target = target.to_str()?;
        target
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

fn comm(pid: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(name) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        let name = name.trim_end().as_bytes();
        let len = name.len().min(15);
        out[..len].copy_from_slice(&name[..len]);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn parses_listeners_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0\n\
            1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0\n";
        assert_eq!(
            parse_listeners(table).collect::<Vec<_>>(),
            vec![(12345, 80)]
        );
    }

    #[test]
    fn finds_a_listener_of_this_process() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let own_ns = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        let found = existing(&[own_ns]);
        let (key, info) = found
            .iter()
            .find(|(k, _)| k.port == port)
            .expect("our listener");
        assert_eq!(key.netns_ino, own_ns);
        assert_eq!(info.tgid, std::process::id());
    }
}
