//! Container and pod identity of a process from its cgroup path (/proc/PID/cgroup), as the
//! OpenTelemetry attributes `container.id` and `k8s.pod.uid`.
//!
//! The runtimes name a container's cgroup after its 64-hex id and, under Kubernetes, put it below
//! a per-pod cgroup named after the pod UID. Shapes handled (cgroup v2 `0::PATH` lines and v1
//! `N:controllers:PATH` lines alike, with any prefix, including the `/../..` a private cgroup
//! namespace shows):
//! - systemd driver: `.../kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`,
//!   `crio-<id>.scope` (not `crio-conmon-<id>.scope`, CRI-O's monitor), `docker-<id>.scope`,
//!   `libpod-<id>.scope` (Podman);
//! - cgroupfs driver: `/kubepods/besteffort/pod<uid>/<id>`, `/docker/<id>`.

use std::{collections::HashMap, sync::Arc};

use crate::{
    kubernetes::Pods,
    span::{HopSpan, Value},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

/// Parses the text of /proc/PID/cgroup. The unified (v2) line wins; otherwise the first v1 line
/// that names a container.
pub fn parse_cgroup(text: &str) -> Identity {
    let mut best = Identity::default();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let identity = parse_path(path);
        if identity.container_id.is_none() && identity.pod_uid.is_none() {
            continue;
        }
        if hierarchy == "0" || best.container_id.is_none() {
            best = identity;
        }
        if hierarchy == "0" {
            break;
        }
    }
    best
}

fn parse_path(path: &str) -> Identity {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let container_id = segments.iter().rev().find_map(|s| container_id(s));
    let pod_uid = segments.iter().rev().find_map(|s| pod_uid(s));
    Identity {
        container_id,
        pod_uid,
    }
}

fn container_id(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = [
        "cri-containerd-",
        "crio-",
        "docker-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|prefix| name.strip_prefix(prefix))
    .unwrap_or(name);
    (id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| id.to_string())
}

fn pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    // `pod<uid>` or `kubepods-<qos>-pod<uid>`: the last "pod" before the UID.
    let uid = name.rsplit_once("pod").map(|(_, uid)| uid)?;
    let uid = uid.replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    (groups.len() == 5
        && groups
            .iter()
            .zip(shape)
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit())))
    .then_some(uid)
}

/// Cached identities by process id. A process keeps its cgroup for life (almost always), and
/// PIDs are reused only after many others: entries are dropped wholesale when the cache fills.
pub struct ContainerMetadata {
    by_pid: HashMap<u32, Identity>,
    /// Pod names from the API server (`kubernetes.api`).
    pods: Option<Arc<Pods>>,
}

/// Processes remembered before the cache starts over.
const MAX_PROCESSES: usize = 4096;

impl ContainerMetadata {
    pub fn new(pods: Option<Arc<Pods>>) -> Self {
        Self {
            by_pid: HashMap::new(),
            pods,
        }
    }

    /// Adds container.id and k8s.pod.uid to a span of a process in a container. A process
    /// that has exited by now (a short-lived client) has no /proc entry: nothing is added.
    pub fn annotate(&mut self, span: &mut HopSpan) {
        let Some(&Value::Int(pid)) = span.attr("process.pid") else {
            return;
        };
        let Ok(pid) = u32::try_from(pid) else { return };
        if !self.by_pid.contains_key(&pid) {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
                return;
            };
            if self.by_pid.len() >= MAX_PROCESSES {
                self.by_pid.clear();
            }
            self.by_pid.insert(pid, parse_cgroup(&text));
        }
        let identity = &self.by_pid[&pid];
        if let Some(id) = &identity.container_id {
            span.attributes.push(("container.id", id.clone().into()));
        }
        if let Some(uid) = &identity.pod_uid {
            span.attributes.push(("k8s.pod.uid", uid.clone().into()));
        }
        if let Some(pods) = &self.pods {
            pods.annotate(identity, span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e8c2b9a1d7e6f5c4b3a29180716f5e4d3c2b1a09f8e7d6c5b4a3928170615";
    const UID: &str = "1f2e3d4c-5b6a-4980-8a2b-3c4d5e6f7a8b";

    fn identity(text: &str) -> (Option<String>, Option<String>) {
        let i = parse_cgroup(text);
        (i.container_id, i.pod_uid)
    }

    fn both() -> (Option<String>, Option<String>) {
        (Some(ID.into()), Some(UID.into()))
    }

    #[test]
    fn cgroup_v2_systemd_driver_of_containerd_and_cri_o() {
        let uid_ = UID.replace('-', "_");
        assert_eq!(
            identity(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
            )),
            both()
        );
        assert_eq!(
            identity(&format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope\n"
            )),
            both()
        );
        // Guaranteed pods sit right under kubepods.slice.
        assert_eq!(
            identity(&format!(
                "0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"
            )),
            both()
        );
        // CRI-O's conmon runs in the pod, not in the container.
        assert_eq!(
            identity(&format!(
                "0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope"
            )),
            (None, Some(UID.into()))
        );
    }

    #[test]
    fn cgroup_v2_seen_from_a_private_cgroup_namespace() {
        let uid_ = UID.replace('-', "_");
        assert_eq!(
            identity(&format!(
                "0::/../../kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
            )),
            both()
        );
    }

    #[test]
    fn cgroupfs_driver_and_v1_hierarchies() {
        let v1 = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n\
             11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n"
        );
        assert_eq!(identity(&v1), both());
        assert_eq!(identity(&format!("0::/kubepods/pod{UID}/{ID}")), both());
        // A hybrid host: the v1 lines name the container, the v2 line only the session.
        let hybrid = format!("5:memory:/docker/{ID}\n0::/user.slice/session-3.scope\n");
        assert_eq!(identity(&hybrid), (Some(ID.into()), None));
    }

    #[test]
    fn docker_and_podman_without_kubernetes() {
        assert_eq!(
            identity(&format!("0::/system.slice/docker-{ID}.scope")),
            (Some(ID.into()), None)
        );
        assert_eq!(
            identity(&format!("0::/machine.slice/libpod-{ID}.scope/container")),
            (Some(ID.into()), None)
        );
    }

    #[test]
    fn host_processes_and_garbage_have_no_identity() {
        for text in [
            "0::/init.scope\n",
            "0::/system.slice/nginx.service\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "",
            "garbage",
            "0::/kubepods/podnot-a-uid/abc\n",
            &format!("0::/system.slice/docker-{}.scope", &ID[..63]),
            &format!("0::/system.slice/docker-{}.scope", ID.to_uppercase()),
        ] {
            assert_eq!(identity(text), (None, None), "{text:?}");
        }
    }
}
