//! What the agent observes: network namespaces, processes and ports. Resolved here, enforced in
//! the kernel (see tracer-ebpf's scope module) so nothing out of scope reaches user space.

use std::{io::ErrorKind, os::unix::fs::MetadataExt as _, path::PathBuf};

/// Where `ip netns add NAME` puts its namespace handles.
const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Network namespace inode numbers; empty = every namespace.
    pub netns: Vec<NetnsRef>,
    /// Process ids (tgid); empty = every process.
    pub pids: Vec<u32>,
    /// TCP ports, matched against either end; empty = every port.
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsRef {
    /// What the user wrote (a name or a path), for messages.
    pub spec: String,
    /// The namespace file it resolved to (entered to attach tc inside the namespace).
    pub path: PathBuf,
    pub inode: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "unknown network namespace {spec:?}: {path} does not exist ({reason}); `ip netns list` \
         shows the names, or pass a path such as /proc/PID/ns/net"
    )]
    UnknownNetns {
        spec: String,
        path: PathBuf,
        reason: String,
    },
}

impl Scope {
    /// Resolves `--netns` arguments: a name as `ip netns` knows it, or a path to a namespace
    /// file (anything containing a `/`, e.g. /proc/1234/ns/net).
    pub fn resolve(netns: &[String], pids: &[u32], ports: &[u16]) -> Result<Self, ScopeError> {
        let netns = netns
            .iter()
            .map(|spec| resolve_netns(spec))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            netns,
            pids: pids.to_vec(),
            ports: ports.to_vec(),
        })
    }

    /// Whether process `pid` is observed: its pid listed (or no pid filter) and its network
    /// namespace listed (or no namespace filter). False for a process that is gone. For the
    /// user-space work that follows processes (uprobe attachment); the kernel filters events.
    /// The error when the kernel refuses to show the process's namespace (the ptrace check on
    /// another user's or container's process, without CAP_SYS_PTRACE): it cannot be told.
    pub fn process_in_scope(&self, pid: u32) -> std::io::Result<bool> {
        if !self.pids.is_empty() && !self.pids.contains(&pid) {
            return Ok(false);
        }
        if self.netns.is_empty() {
            return Ok(true);
        }
        match std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            Ok(meta) => Ok(self.netns.iter().any(|n| u64::from(n.inode) == meta.ino())),
            Err(e) if e.kind() == ErrorKind::PermissionDenied => Err(e),
            Err(_) => Ok(false), // gone
        }
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.netns.is_empty() {
            let list: Vec<_> = self
                .netns
                .iter()
                .map(|n| format!("{} ({})", n.spec, n.inode))
                .collect();
            parts.push(format!("netns {}", list.join(", ")));
        }
        if !self.pids.is_empty() {
            parts.push(format!("pids {:?}", self.pids));
        }
        if !self.ports.is_empty() {
            parts.push(format!("ports {:?}", self.ports));
        }
        if parts.is_empty() {
            "the whole host".into()
        } else {
            parts.join("; ")
        }
    }
}

fn resolve_netns(spec: &str) -> Result<NetnsRef, ScopeError> {
    let path = if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        PathBuf::from(NETNS_RUN_DIR).join(spec)
    };
    let meta = std::fs::metadata(&path).map_err(|e| ScopeError::UnknownNetns {
        spec: spec.into(),
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // Namespace inode numbers fit in 32 bits (the kernel's ns_common.inum is an unsigned int).
    Ok(NetnsRef {
        spec: spec.into(),
        path,
        inode: meta.ino() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_resolves_to_its_inode() {
        let scope = Scope::resolve(&["/proc/self/ns/net".into()], &[], &[]).unwrap();
        let want = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        assert_eq!(scope.netns[0].inode, want);
    }

    #[test]
    fn an_unknown_name_says_how_to_find_names() {
        let err = Scope::resolve(&["no-such-ns-hoptrace".into()], &[], &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/run/netns/no-such-ns-hoptrace") && msg.contains("ip netns list"));
    }

    #[test]
    fn a_process_is_in_scope_by_pid_and_by_its_network_namespace() {
        let me = std::process::id();
        let here = Scope::resolve(&["/proc/self/ns/net".into()], &[], &[]).unwrap();
        assert!(here.process_in_scope(me).unwrap());
        assert!(Scope::default().process_in_scope(me).unwrap());
        let other_pid = Scope {
            pids: vec![me + 1],
            ..here.clone()
        };
        assert!(!other_pid.process_in_scope(me).unwrap());
        let mut elsewhere = here;
        elsewhere.netns[0].inode ^= 1;
        assert!(!elsewhere.process_in_scope(me).unwrap());
        // A process that is gone is in no namespace.
        assert!(
            !Scope::resolve(&["/proc/self/ns/net".into()], &[], &[])
                .unwrap()
                .process_in_scope(u32::MAX)
                .unwrap()
        );
    }

    #[test]
    fn describes_an_empty_scope_as_the_host() {
        assert_eq!(Scope::default().describe(), "the whole host");
    }
}
