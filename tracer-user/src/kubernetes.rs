//! Pod name, namespace and container name of traced processes, from the Kubernetes API server
//! (`kubernetes.api`): the OpenTelemetry attributes `k8s.pod.name`, `k8s.namespace.name` and
//! `k8s.container.name`, looked up by the pod UID and container id that containers.rs reads
//! from /proc/PID/cgroup.
//!
//! A background task keeps a directory of the pods on this node (`fieldSelector=
//! spec.nodeName=NODE`) the way client-go's reflector does: LIST, then WATCH from the list's
//! resourceVersion (ADDED / MODIFIED / DELETED / BOOKMARK events, newline-delimited JSON), a
//! fresh LIST when the server says the version expired (an ERROR event or HTTP 410 Gone).
//! The span path only reads the directory: a pod not listed yet means the span goes out without
//! its name, counted, never a wait. Faults (server unreachable, 401, 403, other statuses,
//! malformed JSON) are logged, counted by reason, and retried with capped exponential backoff.
//!
//! Credentials are the pod's service account, as in-cluster clients use them: the API server at
//! https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, its CA, and a bearer token read
//! again for every request (bound tokens are rotated by the kubelet; a watch lasts minutes at
//! most). Hand-written on hyper + rustls rather than kube-rs: two GET requests and four
//! fields of a Pod do not need kube-rs's generic machinery and k8s-openapi's thousands of
//! generated types, which would dominate the agent's build time and binary size.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde::Deserialize;

use crate::{
    containers::Identity,
    span::{HopSpan, Value},
};

/// Where the kubelet mounts the pod's service account.
pub const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Pods remembered. A node runs at most the kubelet's maxPods (110 by default); beyond this,
/// new pods are not remembered (their spans are counted as unknown).
const MAX_PODS: usize = 2048;
/// The largest LIST response read (a node's pods with their full specs and statuses).
const MAX_LIST_BYTES: usize = 64 << 20;
/// The largest single watch event (one Pod object).
const MAX_EVENT_BYTES: usize = 4 << 20;
/// The largest error response read, for its message.
const MAX_STATUS_BYTES: usize = 64 << 10;
/// The server ends a watch after this long (the `timeoutSeconds` parameter); it is resumed
/// from the last resourceVersion seen.
const WATCH_SECONDS: u64 = 290;
/// Silence after which a watch is presumed dead (a half-open connection): bookmarks arrive
/// about once a minute and the server ends the watch after WATCH_SECONDS anyway.
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS + 30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How the agent reaches the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// https://HOST:PORT
    pub server: String,
    /// Only pods scheduled here are listed and watched.
    pub node_name: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

impl ApiConfig {
    /// The in-cluster API server address, from the variables the kubelet sets in every
    /// container (the `kubernetes` Service in the default namespace).
    pub fn in_cluster_server(env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
        match (
            env("KUBERNETES_SERVICE_HOST"),
            env("KUBERNETES_SERVICE_PORT"),
        ) {
            (Some(host), Some(port)) => {
                let host = host.trim();
                let port: u16 = port
                    .trim()
                    .parse()
                    .map_err(|e| format!("KUBERNETES_SERVICE_PORT={port:?}: {e}"))?;
                // An IPv6 service address goes in brackets.
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                Ok(format!("https://{host}:{port}"))
            }
            _ => Err(
                "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set \
                      (they are in every pod: is the agent running in Kubernetes?)"
                    .into(),
            ),
        }
    }
}

/// What the span path learns about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodInfo {
    name: String,
    namespace: String,
    /// Container id (without the runtime's `containerd://` prefix) and container name.
    containers: Vec<(String, String)>,
}

/// The pods of this node by UID, and their containers' ids.
#[derive(Debug, Default)]
struct Directory {
    by_uid: HashMap<String, PodInfo>,
    uid_by_container: HashMap<String, String>,
}

impl Directory {
    /// Adds or replaces a pod; false when the directory is full.
    fn upsert(&mut self, uid: String, pod: PodInfo) -> bool {
        if !self.by_uid.contains_key(&uid) && self.by_uid.len() >= MAX_PODS {
            return false;
        }
        self.remove(&uid);
        for (id, _) in &pod.containers {
            self.uid_by_container.insert(id.clone(), uid.clone());
        }
        self.by_uid.insert(uid, pod);
        true
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.by_uid.remove(uid) {
            for (id, _) in old.containers {
                self.uid_by_container.remove(&id);
            }
        }
    }

    fn lookup(&self, identity: &Identity) -> Option<&PodInfo> {
        let uid = identity.pod_uid.as_ref().or_else(|| {
            identity
                .container_id
                .as_ref()
                .and_then(|id| self.uid_by_container.get(id))
        })?;
        self.by_uid.get(uid)
    }
}

/// Why a request to the API server failed, each a label of
/// `hoptrace_kubernetes_api_errors_total`.
pub const ERROR_REASONS: [&str; 6] = [
    "credentials",
    "unreachable",
    "unauthorized",
    "forbidden",
    "http_status",
    "malformed",
];

#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error("reading {0}")]
    Credentials(String),
    #[error("API server unreachable: {0}")]
    Unreachable(String),
    #[error(
        "401 Unauthorized: the API server rejected the service account token ({0}); \
         is the token file current?"
    )]
    Unauthorized(String),
    #[error(
        "403 Forbidden: the service account may not list or watch pods ({0}); the agent needs \
         the ClusterRole hoptrace-agent (get, list, watch on pods) bound to its ServiceAccount"
    )]
    Forbidden(String),
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The resourceVersion to watch from is no longer in the server's history: list again.
    #[error("resource version expired (410 Gone): {0}")]
    Gone(String),
}

impl Fault {
    fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Credentials(_) => Some("credentials"),
            Self::Unreachable(_) => Some("unreachable"),
            Self::Unauthorized(_) => Some("unauthorized"),
            Self::Forbidden(_) => Some("forbidden"),
            Self::Status(..) => Some("http_status"),
            Self::Malformed(_) => Some("malformed"),
            // The normal end of a long watch on a busy cluster, not an error.
            Self::Gone(_) => None,
        }
    }
}

/// Counters of the lookup, mirrored into the Prometheus metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// By ERROR_REASONS' index.
    pub api_errors: [AtomicU64; ERROR_REASONS.len()],
    /// Spans of a pod or container that were given the pod's name.
    pub spans_named: AtomicU64,
    /// Spans of a pod or container the directory did not know (yet): exported without names.
    pub spans_pod_unknown: AtomicU64,
    /// Pods in the directory now.
    pub pods: AtomicU64,
    /// Complete LISTs received.
    pub lists: AtomicU64,
}

impl Stats {
    fn count_error(&self, reason: &str) {
        if let Some(i) = ERROR_REASONS.iter().position(|r| *r == reason) {
            self.api_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The directory the span path reads and the watcher task writes.
pub struct Pods {
    directory: RwLock<Directory>,
    pub stats: Stats,
}

impl Pods {
    fn new() -> Self {
        Self {
            directory: RwLock::new(Directory::default()),
            stats: Stats::default(),
        }
    }

    /// Starts listing and watching this node's pods on the current tokio runtime.
    pub fn watch(config: ApiConfig) -> Arc<Self> {
        let pods = Arc::new(Self::new());
        log::info!(
            "Kubernetes metadata: watching the pods of node {} at {}",
            config.node_name,
            config.server
        );
        tokio::spawn(keep_in_sync(config, pods.clone()));
        pods
    }

    /// Adds k8s.pod.name, k8s.namespace.name and k8s.container.name to the span of a process
    /// in a container. Never waits for the API server.
    pub fn annotate(&self, identity: &Identity, span: &mut HopSpan) {
        if identity.pod_uid.is_none() && identity.container_id.is_none() {
            return;
        }
        // The writer holds the lock only to insert or swap a map: no I/O under it.
        let directory = self.directory.read().unwrap_or_else(|e| e.into_inner());
        let Some(pod) = directory.lookup(identity) else {
            self.stats.spans_pod_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        span.attributes
            .push(("k8s.pod.name", Value::from(pod.name.clone())));
        span.attributes
            .push(("k8s.namespace.name", Value::from(pod.namespace.clone())));
        if let Some(id) = &identity.container_id
            && let Some((_, name)) = pod.containers.iter().find(|(c, _)| c == id)
        {
            span.attributes
                .push(("k8s.container.name", Value::from(name.clone())));
        }
        self.stats.spans_named.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.directory.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the directory with a LIST's pods.
    fn replace(&self, pods: Vec<Pod>) {
        let mut directory = Directory::default();
        let mut over = 0;
        for pod in pods {
            if let Some((uid, info)) = pod.into_info()
                && !directory.upsert(uid, info)
            {
                over += 1;
            }
        }
        if over > 0 {
            log::warn!(
                "Kubernetes metadata: {over} pods beyond the {MAX_PODS} remembered; their spans go without names"
            );
        }
        let count = directory.by_uid.len();
        *self.write() = directory;
        self.stats.pods.store(count as u64, Ordering::Relaxed);
    }

    /// Applies one watch event; returns the resourceVersion to resume from.
    fn apply(&self, event: WatchEvent) -> Result<String, Fault> {
        let object = event.object;
        match event.kind.as_str() {
            "ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK" => {
                let pod: Pod = serde_json::from_value(object)
                    .map_err(|e| Fault::Malformed(format!("{} event: {e}", event.kind)))?;
                let version = pod.metadata.resource_version.clone();
                let mut directory = self.write();
                let remembered = match event.kind.as_str() {
                    "DELETED" => {
                        directory.remove(&pod.metadata.uid);
                        true
                    }
                    "BOOKMARK" => true,
                    _ => pod
                        .into_info()
                        .is_none_or(|(uid, info)| directory.upsert(uid, info)),
                };
                let count = directory.by_uid.len();
                drop(directory);
                self.stats.pods.store(count as u64, Ordering::Relaxed);
                if !remembered {
                    log::warn!(
                        "Kubernetes metadata: more than {MAX_PODS} pods on this node; a new one is not remembered"
                    );
                }
                Ok(version)
            }
            "ERROR" => {
                let status: Status = serde_json::from_value(object)
                    .map_err(|e| Fault::Malformed(format!("ERROR event: {e}")))?;
                Err(match status.code {
                    410 => Fault::Gone(status.message),
                    code => Fault::Status(code, status.message),
                })
            }
            other => Err(Fault::Malformed(format!(
                "unknown watch event type {other:?}"
            ))),
        }
    }
}

// The few fields of the API's objects the agent reads; serde skips the rest.

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    resource_version: String,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    init_container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Debug, Deserialize)]
struct ContainerStatus {
    name: String,
    /// `<runtime>://<id>`, absent until the container was created.
    #[serde(rename = "containerID", default)]
    container_id: Option<String>,
}

impl Pod {
    /// The pod's UID and what spans need of it; None without a UID.
    fn into_info(self) -> Option<(String, PodInfo)> {
        if self.metadata.uid.is_empty() {
            return None;
        }
        let status = self.status.unwrap_or_default();
        let containers = [
            status.container_statuses,
            status.init_container_statuses,
            status.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|c| {
            let id = c.container_id?;
            let id = id.rsplit_once("://").map_or(id.as_str(), |(_, id)| id);
            (!id.is_empty()).then(|| (id.to_string(), c.name))
        })
        .collect();
        Some((
            self.metadata.uid,
            PodInfo {
                name: self.metadata.name,
                namespace: self.metadata.namespace,
                containers,
            },
        ))
    }
}

#[derive(Debug, Deserialize)]
struct ListMeta {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
}

#[derive(Debug, Deserialize)]
struct PodList {
    metadata: ListMeta,
    #[serde(default)]
    items: Option<Vec<Pod>>,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// The API's error object (kind Status).
#[derive(Debug, Deserialize)]
struct Status {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: String,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// One connection setup to the API server: the CA as read now.
struct ApiClient {
    client: HttpsClient,
    config: ApiConfig,
    pods_path: String,
}

impl ApiClient {
    fn new(config: &ApiConfig) -> Result<Self, Fault> {
        let ca = &config.ca_file;
        let credentials = |e: &dyn std::fmt::Display| {
            Fault::Credentials(format!("the API server's CA {}: {e}", ca.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| credentials(&e))? {
            roots
                .add(cert.map_err(|e| credentials(&e))?)
                .map_err(|e| credentials(&e))?;
        }
        if roots.is_empty() {
            return Err(credentials(&"no certificate in the file"));
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| credentials(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let selector = format!("spec.nodeName={}", config.node_name);
        let pods_path = format!(
            "/api/v1/pods?fieldSelector={}",
            percent_encoding::utf8_percent_encode(&selector, percent_encoding::NON_ALPHANUMERIC)
        );
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            config: config.clone(),
            pods_path,
        })
    }

    /// GET `query` on this node's pods with the current token; the response when it is 200.
    async fn get(&self, query: &str) -> Result<hyper::Response<hyper::body::Incoming>, Fault> {
        let token_file = &self.config.token_file;
        let token = std::fs::read_to_string(token_file).map_err(|e| {
            Fault::Credentials(format!(
                "the service account token {}: {e}",
                token_file.display()
            ))
        })?;
        let uri = format!("{}{}{query}", self.config.server, self.pods_path);
        let request = hyper::Request::get(&uri)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "hoptrace-agent")
            .body(Empty::new())
            .map_err(|e| Fault::Credentials(format!("building the request to {uri}: {e}")))?;
        let response = self.client.request(request).await.map_err(|e| {
            // The source says why (connection refused, certificate not trusted, ...).
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            Fault::Unreachable(format!("{uri}: {message}"))
        })?;
        let code = response.status().as_u16();
        if code == 200 {
            return Ok(response);
        }
        let body = Limited::new(response.into_body(), MAX_STATUS_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<Status>(&body)
            .map(|s| s.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into());
        Err(match code {
            401 => Fault::Unauthorized(message),
            403 => Fault::Forbidden(message),
            410 => Fault::Gone(message),
            _ => Fault::Status(code, message),
        })
    }

    /// LISTs the node's pods into the directory; returns the list's resourceVersion.
    async fn list(&self, pods: &Pods) -> Result<String, Fault> {
        let read = async {
            let response = self.get("").await?;
            Limited::new(response.into_body(), MAX_LIST_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| Fault::Unreachable(format!("reading the pod list: {e}")))
        };
        let body = tokio::time::timeout(LIST_TIMEOUT, read)
            .await
            .map_err(|_| Fault::Unreachable(format!("no pod list within {LIST_TIMEOUT:?}")))??;
        let list: PodList = serde_json::from_slice(&body)
            .map_err(|e| Fault::Malformed(format!("pod list: {e}")))?;
        let items = list.items.unwrap_or_default();
        let count = items.len();
        pods.replace(items);
        pods.stats.lists.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "Kubernetes metadata: {count} pods on node {} (resourceVersion {})",
            self.config.node_name,
            list.metadata.resource_version
        );
        Ok(list.metadata.resource_version)
    }

    /// WATCHes from `version`, applying events, until the server ends the watch (Ok) or
    /// something fails. `version` follows every event.
    async fn watch(&self, version: &mut String, pods: &Pods) -> Result<(), Fault> {
        let query = format!(
            "&watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
            percent_encoding::utf8_percent_encode(version, percent_encoding::NON_ALPHANUMERIC)
        );
        let mut body = tokio::time::timeout(LIST_TIMEOUT, self.get(&query))
            .await
            .map_err(|_| Fault::Unreachable(format!("no watch response within {LIST_TIMEOUT:?}")))??
            .into_body();
        let mut pending = BytesMut::new();
        loop {
            let frame = tokio::time::timeout(WATCH_IDLE, body.frame())
                .await
                .map_err(|_| Fault::Unreachable(format!("watch silent for {WATCH_IDLE:?}")))?;
            let Some(frame) = frame else {
                return if pending.iter().all(u8::is_ascii_whitespace) {
                    Ok(())
                } else {
                    Err(Fault::Malformed(
                        "watch stream ended inside an event".into(),
                    ))
                };
            };
            let frame = frame.map_err(|e| Fault::Unreachable(format!("watch stream: {e}")))?;
            let Ok(mut data) = frame.into_data() else {
                continue; // trailers
            };
            while data.has_remaining() {
                let chunk = data.chunk();
                let (take, line_end) = match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (chunk.len(), false),
                };
                pending.extend_from_slice(&chunk[..take]);
                data.advance(take);
                if pending.len() > MAX_EVENT_BYTES {
                    return Err(Fault::Malformed(format!(
                        "a watch event over {MAX_EVENT_BYTES} bytes"
                    )));
                }
                if line_end {
                    let line = pending.split();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let event: WatchEvent = serde_json::from_slice(&line)
                        .map_err(|e| Fault::Malformed(format!("watch event: {e}")))?;
                    let next = pods.apply(event)?;
                    if !next.is_empty() {
                        *version = next;
                    }
                }
            }
        }
    }
}

/// Counts and logs a fault; returns how long to wait before trying again, and doubles the
/// backoff.
fn on_fault(pods: &Pods, fault: &Fault, backoff: &mut Duration) -> Duration {
    let wait = *backoff;
    if let Some(reason) = fault.reason() {
        pods.stats.count_error(reason);
    }
    log::warn!(
        "Kubernetes metadata: {fault}; spans keep flowing without pod names (retrying in {wait:.1?})"
    );
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    // Jitter: the agents of every node lost the same server and should not return at once.
    wait + wait.mul_f64(rand::random::<f64>() * 0.2)
}

/// The watcher task: list, watch, and start over after faults, for as long as the agent runs.
async fn keep_in_sync(config: ApiConfig, pods: Arc<Pods>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let listed = match ApiClient::new(&config) {
            Ok(client) => client.list(&pods).await.map(|version| (client, version)),
            Err(e) => Err(e),
        };
        let (client, mut version) = match listed {
            Ok(listed) => listed,
            Err(e) => {
                tokio::time::sleep(on_fault(&pods, &e, &mut backoff)).await;
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        loop {
            let started = tokio::time::Instant::now();
            match client.watch(&mut version, &pods).await {
                // The server's timeoutSeconds: resume where it ended. A server that ends
                // watches at once is not hammered.
                Ok(()) => {
                    if started.elapsed() < Duration::from_secs(1) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                // The normal end of a long watch on a busy cluster: list again at once.
                Err(e @ Fault::Gone(_)) => {
                    log::info!("Kubernetes metadata: {e}; listing the pods again");
                    break;
                }
                Err(e) => {
                    tokio::time::sleep(on_fault(&pods, &e, &mut backoff)).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{Role, SpanIds};

    const UID: &str = "6b1f2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    const ID: &str = "9c3e1f0a7b2d4c6e8f1a3b5c7d9e0f2a4b6c8d0e1f3a5b7c9d1e3f5a7b9c1d3e";

    /// A Pod as the API server returns it (trimmed of nothing the agent must ignore).
    fn pod_json(uid: &str, name: &str, version: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {
                "name": name, "namespace": "shop", "uid": uid, "resourceVersion": version,
                "generateName": "web-7d4b9c-", "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": {"app": "web"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d4b9c", "uid": "0f0f0f0f-0000-4000-8000-000000000000",
                    "controller": true, "blockOwnerDeletion": true}],
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                    "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]
            },
            "spec": {"nodeName": "lab-node-1", "containers": [{"name": "nginx", "image": "nginx"}]},
            "status": {
                "phase": "Running", "podIP": "10.244.1.7",
                "initContainerStatuses": [{"name": "init", "ready": true, "restartCount": 0,
                    "image": "busybox", "imageID": "", "containerID": "containerd://1111"}],
                "containerStatuses": [
                    {"name": "nginx", "ready": true, "restartCount": 0, "image": "nginx",
                     "imageID": "docker.io/library/nginx@sha256:00",
                     "containerID": format!("containerd://{ID}"),
                     "state": {"running": {"startedAt": "2025-01-01T00:00:01Z"}}},
                    {"name": "pending", "ready": false, "restartCount": 0, "image": "x",
                     "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}
                ]
            }
        })
    }

    fn span() -> HopSpan {
        HopSpan {
            ids: SpanIds::new_root(),
            name: "GET".into(),
            role: Role::Server,
            start_ns: 1,
            end_ns: 2,
            error: None,
            attributes: Vec::new(),
            events: Vec::new(),
        }
    }

    fn identity(uid: Option<&str>, id: Option<&str>) -> Identity {
        Identity {
            pod_uid: uid.map(str::to_string),
            container_id: id.map(str::to_string),
        }
    }

    fn names(pods: &Pods, identity: &Identity) -> Vec<(&'static str, String)> {
        let mut span = span();
        pods.annotate(identity, &mut span);
        span.attributes
            .into_iter()
            .map(|(k, v)| match v {
                Value::Str(s) => (k, s.to_string()),
                other => panic!("{k}: {other:?}"),
            })
            .collect()
    }

    fn event(kind: &str, object: serde_json::Value) -> WatchEvent {
        let line = serde_json::json!({"type": kind, "object": object}).to_string();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn a_listed_pod_names_the_spans_of_its_containers() {
        let pods = Pods::new();
        let list = serde_json::json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": "1234"},
            "items": [pod_json(UID, "web-7d4b9c-x2k4q", "1200")]
        });
        let list: PodList = serde_json::from_value(list).unwrap();
        assert_eq!(list.metadata.resource_version, "1234");
        pods.replace(list.items.unwrap());
        assert_eq!(
            names(&pods, &identity(Some(UID), Some(ID))),
            [
                ("k8s.pod.name", "web-7d4b9c-x2k4q".to_string()),
                ("k8s.namespace.name", "shop".to_string()),
                ("k8s.container.name", "nginx".to_string()),
            ]
        );
        // By the container id alone (no pod segment in the cgroup path).
        assert_eq!(names(&pods, &identity(None, Some(ID))).len(), 3);
        // The pod's conmon or pause process: the pod without a container name.
        assert_eq!(names(&pods, &identity(Some(UID), None)).len(), 2);
        assert_eq!(pods.stats.spans_named.load(Ordering::Relaxed), 3);
        // Another pod, and a host process (not counted).
        assert!(
            names(
                &pods,
                &identity(Some("00000000-0000-4000-8000-000000000000"), None)
            )
            .is_empty()
        );
        assert!(names(&pods, &identity(None, None)).is_empty());
        assert_eq!(pods.stats.spans_pod_unknown.load(Ordering::Relaxed), 1);
        assert_eq!(pods.stats.pods.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn watch_events_add_change_and_remove_pods_and_move_the_resource_version() {
        let pods = Pods::new();
        let added = pods
            .apply(event("ADDED", pod_json(UID, "web-1", "10")))
            .unwrap();
        assert_eq!(added, "10");
        assert_eq!(names(&pods, &identity(Some(UID), None))[0].1, "web-1");
        pods.apply(event("MODIFIED", pod_json(UID, "web-1-renamed", "11")))
            .unwrap();
        assert_eq!(
            names(&pods, &identity(None, Some(ID)))[0].1,
            "web-1-renamed"
        );
        let bookmark = serde_json::json!({"kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": "15", "annotations": {"k8s.io/initial-events-end": "true"}}});
        assert_eq!(pods.apply(event("BOOKMARK", bookmark)).unwrap(), "15");
        assert_eq!(pods.stats.pods.load(Ordering::Relaxed), 1);
        assert_eq!(
            pods.apply(event("DELETED", pod_json(UID, "web-1-renamed", "16")))
                .unwrap(),
            "16"
        );
        assert!(names(&pods, &identity(Some(UID), Some(ID))).is_empty());
        assert!(names(&pods, &identity(None, Some(ID))).is_empty());
        assert_eq!(pods.stats.pods.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_expired_version_asks_for_a_new_list_and_garbage_is_malformed() {
        let pods = Pods::new();
        let gone = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "too old resource version: 10 (20)",
            "reason": "Expired", "code": 410});
        assert!(
            matches!(pods.apply(event("ERROR", gone)), Err(Fault::Gone(m)) if m.contains("too old"))
        );
        let other = serde_json::json!({"kind": "Status", "code": 500, "message": "etcd down"});
        assert!(matches!(
            pods.apply(event("ERROR", other)),
            Err(Fault::Status(500, _))
        ));
        assert!(matches!(
            pods.apply(event(
                "ADDED",
                serde_json::json!({"metadata": "not an object"})
            )),
            Err(Fault::Malformed(_))
        ));
        assert!(matches!(
            pods.apply(event("RESIZED", serde_json::json!({}))),
            Err(Fault::Malformed(_))
        ));
        assert!(serde_json::from_str::<WatchEvent>("{\"type\":\"ADDED\"").is_err());
        assert!(serde_json::from_str::<PodList>("{\"items\": []}").is_err());
    }

    #[test]
    fn the_directory_is_bounded() {
        let pods = Pods::new();
        let many = (0..MAX_PODS + 5)
            .map(|i| {
                let uid = format!("00000000-0000-4000-8000-{i:012}");
                serde_json::from_value(pod_json(&uid, &format!("p{i}"), "1")).unwrap()
            })
            .collect();
        pods.replace(many);
        assert_eq!(pods.stats.pods.load(Ordering::Relaxed), MAX_PODS as u64);
        let extra = format!("00000000-0000-4000-8000-{:012}", MAX_PODS + 1);
        pods.apply(event("ADDED", pod_json(&extra, "late", "2")))
            .unwrap();
        assert!(names(&pods, &identity(Some(&extra), None)).is_empty());
        // A known pod still changes.
        let first = "00000000-0000-4000-8000-000000000000";
        pods.apply(event("MODIFIED", pod_json(first, "changed", "3")))
            .unwrap();
        assert_eq!(names(&pods, &identity(Some(first), None))[0].1, "changed");
    }

    #[test]
    fn the_in_cluster_server_comes_from_the_service_variables() {
        let env = |host: &'static str, port: &'static str| {
            move |key: &str| match key {
                "KUBERNETES_SERVICE_HOST" => Some(host.to_string()),
                "KUBERNETES_SERVICE_PORT" => Some(port.to_string()),
                _ => None,
            }
        };
        assert_eq!(
            ApiConfig::in_cluster_server(env("10.96.0.1", "443")).unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            ApiConfig::in_cluster_server(env("fd00::1", "6443")).unwrap(),
            "https://[fd00::1]:6443"
        );
        assert!(ApiConfig::in_cluster_server(env("10.96.0.1", "https")).is_err());
        assert!(ApiConfig::in_cluster_server(|_: &str| None).is_err());
    }
}
