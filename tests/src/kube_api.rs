//! A stand-in for the Kubernetes API server's pod endpoints (`tests/kube_apiserver.py`): HTTPS
//! with a CA of its own, bearer-token checks, PodList and watch streams in the real API's
//! shape. Not a kube-apiserver: none can run on the test machines (see the script's doc).
//!
//! [`KubeApi::agent_env`] is what the agent needs to reach it as it would reach the real one
//! in a pod: KUBERNETES_SERVICE_HOST/PORT, and the service account's token and CA files.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use xtask::lab::pki;

/// A pod to serve: its identity and containers (name, 64-hex container id).
pub struct PodSpec<'a> {
    pub uid: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub node: &'a str,
    pub containers: &'a [(&'a str, &'a str)],
}

pub struct KubeApi {
    child: Child,
    stdin: ChildStdin,
    port: u16,
    dir: PathBuf,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl KubeApi {
    /// Starts a server that accepts `token`; the token file the agent reads says `token` too.
    pub fn start(name: &str, token: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("hoptrace-kube-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ca = pki::create_ca(&dir, "kube")?;
        let leaf = pki::create_leaf(&dir, "apiserver", "IP:127.0.0.1", &ca)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube_apiserver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--cert")
            .arg(&leaf.cert)
            .arg("--key")
            .arg(&leaf.key)
            .args(["--token", token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting tests/kube_apiserver.py")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        let sink = requests.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    let _ = port_tx.send(port.trim().parse::<u16>().ok());
                } else if let Ok(request) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(request);
                }
            }
        });
        let mut api = Self {
            child,
            stdin,
            port: 0,
            dir,
            requests,
        };
        api.port = port_rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .context("the stand-in API server did not start")?;
        std::fs::copy(&ca.cert, api.ca_file())?;
        api.write_token(token)?;
        Ok(api)
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn token_file(&self) -> PathBuf {
        self.dir.join("token")
    }

    /// Environment for `hoptrace agent` with the lookup on, as a DaemonSet pod on `node` has.
    pub fn agent_env(&self, node: &str) -> Vec<(String, String)> {
        vec![
            ("HOPTRACE_KUBERNETES_API".into(), "true".into()),
            ("HOPTRACE_NODE_NAME".into(), node.into()),
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), self.port.to_string()),
            (
                "HOPTRACE_KUBERNETES_TOKEN_FILE".into(),
                self.token_file().display().to_string(),
            ),
            (
                "HOPTRACE_KUBERNETES_CA_FILE".into(),
                self.ca_file().display().to_string(),
            ),
        ]
    }

    /// Replaces the token file's content, as the kubelet does when it rotates the token
    /// (write then rename: a reader sees the old or the new token, never half).
    pub fn write_token(&self, token: &str) -> Result<()> {
        let next = self.dir.join("token.next");
        std::fs::write(&next, token)?;
        std::fs::rename(&next, self.token_file())?;
        Ok(())
    }

    fn command(&mut self, command: Value) -> Result<()> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Adds (ADDED) or replaces (MODIFIED) a pod.
    pub fn add_pod(&mut self, pod: &PodSpec) -> Result<()> {
        self.command(json!({"op": "add", "pod": {
            "uid": pod.uid, "name": pod.name, "namespace": pod.namespace, "node": pod.node,
            "containers": pod.containers,
        }}))
    }

    pub fn delete_pod(&mut self, uid: &str) -> Result<()> {
        self.command(json!({"op": "delete", "uid": uid}))
    }

    /// The server accepts only `token` from now on.
    pub fn accept_token(&mut self, token: &str) -> Result<()> {
        self.command(json!({"op": "token", "token": token}))
    }

    /// Answers the next requests (of those with a valid token) with these statuses in turn:
    /// a number (401, 403, 500, ...) or `"malformed"` (200 with truncated JSON).
    pub fn fail_next(&mut self, responses: Value) -> Result<()> {
        self.command(json!({"op": "fail", "responses": responses}))
    }

    /// Compacts the history: open watches end with an ERROR event of 410 Expired.
    pub fn expire(&mut self) -> Result<()> {
        self.command(json!({"op": "expire"}))
    }

    /// Every request so far: method, path, query (a map), token, watch, status, time.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits for `count` requests matching `predicate`; returns all requests then.
    pub fn wait_for_requests(
        &self,
        count: usize,
        predicate: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.iter().filter(|r| predicate(r)).count() >= count {
                return Ok(requests);
            }
            if Instant::now() > deadline {
                bail!("not {count} such requests within {timeout:?}: {requests:#?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
