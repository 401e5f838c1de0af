//! A cgroup tree shaped like a kubelet's for one container (cgroup v2, systemd driver,
//! containerd): `kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`, so that
//! /proc/PID/cgroup of a process moved into it reads like a Kubernetes container's; and a
//! server in the lab's persona inside one.

use std::path::{Path, PathBuf};

use xtask::lab::{Host, Lab, PERSONA_IP};

/// Where the unified (v2) hierarchy is mounted on hybrid hosts (v1 controllers beside).
const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// The cgroups, removed with the processes moved back out on drop.
pub struct PodCgroup {
    top: PathBuf,
    leaf: PathBuf,
}

impl PodCgroup {
    /// `name` keeps tests running in parallel apart.
    pub fn create(name: &str, pod_uid: &str, container_id: &str) -> Self {
        let root = if Path::new(UNIFIED).join("cgroup.procs").exists() {
            PathBuf::from(UNIFIED)
        } else {
            PathBuf::from("/sys/fs/cgroup")
        };
        let top = root.join(format!("hoptrace-e2e-{name}-{}.slice", std::process::id()));
        let leaf = top
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                pod_uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{container_id}.scope"));
        std::fs::create_dir_all(&leaf).expect("creating the test cgroup");
        Self { top, leaf }
    }

    pub fn enter(&self, pid: u32) {
        std::fs::write(self.leaf.join("cgroup.procs"), pid.to_string()).expect("moving the server");
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let root = self.top.parent().unwrap().join("cgroup.procs");
        if let Ok(pids) = std::fs::read_to_string(self.leaf.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = std::fs::write(&root, pid);
            }
        }
        let mut dir = self.leaf.clone();
        while dir.starts_with(&self.top) {
            let _ = std::fs::remove_dir(&dir);
            dir.pop();
        }
    }
}

/// A python HTTP server on the persona at `port`, inside a pod's cgroup.
pub struct PodServer {
    // Declared first: the server stops before its cgroup is removed.
    pub server: xtask::lab::Background,
    _cgroup: PodCgroup,
}

impl PodServer {
    pub fn start(lab: &Lab, name: &str, pod_uid: &str, container_id: &str, port: u16) -> Self {
        let cgroup = PodCgroup::create(name, pod_uid, container_id);
        let server = lab
            .spawn(
                Host::Persona,
                &[
                    "python3",
                    "-m",
                    "http.server",
                    &port.to_string(),
                    "--bind",
                    &PERSONA_IP.to_string(),
                ],
            )
            .expect("python server");
        cgroup.enter(server.pid());
        Self {
            server,
            _cgroup: cgroup,
        }
    }
}

/// One GET from the agent host; curl retries refused connections while the server starts.
pub fn curl_retrying(lab: &Lab, url: &str) {
    lab.run(
        Host::Agent,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "--retry",
            "20",
            "--retry-connrefused",
            "--retry-delay",
            "1",
            url,
        ],
    )
    .expect("curl");
}
