//! The OTLP receiver the end-to-end tests export spans to.
//!
//! [`OtlpReceiver`] runs `tests/otlp_receiver.py`, a real OTLP/gRPC and OTLP/HTTP
//! (protobuf and JSON) trace receiver built on the official generated protos, on
//! ephemeral ports of 127.0.0.1. Every span it receives is appended as one JSON line
//! to a file private to the instance, flushed before the export is answered: once an
//! exporter's export call returned successfully, [`OtlpReceiver::spans`] sees its
//! spans. Each instance has its own ports and files, so tests may run in parallel.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

/// OTLP `Span.SpanKind` values, as found in [`ReceivedSpan::kind`].
pub mod span_kind {
    pub const UNSPECIFIED: i32 = 0;
    pub const INTERNAL: i32 = 1;
    pub const SERVER: i32 = 2;
    pub const CLIENT: i32 = 3;
    pub const PRODUCER: i32 = 4;
    pub const CONSUMER: i32 = 5;
}

/// OTLP `Status.StatusCode` values, as found in [`SpanStatus::code`].
pub mod status_code {
    pub const UNSET: i32 = 0;
    pub const OK: i32 = 1;
    pub const ERROR: i32 = 2;
}

/// How a span or an export request reached the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// OTLP/gRPC `TraceService/Export`.
    Grpc,
    /// OTLP/HTTP `POST /v1/traces`, `application/x-protobuf`.
    HttpProtobuf,
    /// OTLP/HTTP `POST /v1/traces`, `application/json` (OTLP/JSON).
    HttpJson,
}

/// A span's status.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SpanStatus {
    /// One of [`status_code`].
    pub code: i32,
    pub message: String,
}

/// An event of a span.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SpanEvent {
    pub name: String,
    pub time_unix_nano: u64,
    pub attributes: Map<String, Value>,
}

/// A link of a span.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SpanLink {
    /// Lowercase hex.
    pub trace_id: String,
    /// Lowercase hex.
    pub span_id: String,
    #[serde(default)]
    pub trace_state: String,
    pub attributes: Map<String, Value>,
}

/// One span as the receiver got it.
///
/// Attribute values are JSON: strings, integers (OTLP int64), floats (OTLP double;
/// non-finite ones as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`), booleans,
/// arrays of those, objects (OTLP kvlist), base64 strings (OTLP bytes) or null.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReceivedSpan {
    /// Lowercase hex, 32 digits for a valid span.
    pub trace_id: String,
    /// Lowercase hex, 16 digits for a valid span.
    pub span_id: String,
    /// Lowercase hex, or the empty string for a root span.
    pub parent_span_id: String,
    #[serde(default)]
    pub trace_state: String,
    pub name: String,
    /// One of [`span_kind`].
    pub kind: i32,
    #[serde(default)]
    pub flags: u32,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub status: SpanStatus,
    pub attributes: Map<String, Value>,
    pub events: Vec<SpanEvent>,
    #[serde(default)]
    pub links: Vec<SpanLink>,
    /// The resource's attributes (`service.name`, ...).
    pub resource: Map<String, Value>,
    /// The instrumentation scope's name.
    pub scope_name: String,
    #[serde(default)]
    pub scope_version: String,
    pub transport: Transport,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.get(key)
    }

    /// The attribute's value if it is a string.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attr(key)?.as_str()
    }

    /// The attribute's value if it is an integer.
    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        self.attr(key)?.as_i64()
    }

    /// The attribute's value if it is a number (integer or double).
    pub fn attr_f64(&self, key: &str) -> Option<f64> {
        self.attr(key)?.as_f64()
    }

    /// The attribute's value if it is a boolean.
    pub fn attr_bool(&self, key: &str) -> Option<bool> {
        self.attr(key)?.as_bool()
    }

    /// The resource attribute's value if it is a string (e.g. `service.name`).
    pub fn resource_str(&self, key: &str) -> Option<&str> {
        self.resource.get(key)?.as_str()
    }

    /// End minus start time (zero if the span ends before it starts).
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(
            self.end_time_unix_nano
                .saturating_sub(self.start_time_unix_nano),
        )
    }

    pub fn start_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.start_time_unix_nano)
    }

    pub fn end_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.end_time_unix_nano)
    }

    /// Whether the span has no parent.
    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }

    /// The first event of that name.
    pub fn event(&self, name: &str) -> Option<&SpanEvent> {
        self.events.iter().find(|e| e.name == name)
    }
}

/// What the receiver answered to an export request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportResult {
    /// Accepted; its spans are in [`OtlpReceiver::spans`].
    Ok,
    /// Refused with gRPC UNAVAILABLE / HTTP 503 ([`ReceiverOptions::fail_first`]); its
    /// spans were not recorded.
    Unavailable,
    /// Refused with HTTP 400: the body was not a valid OTLP export request.
    BadRequest,
}

/// One export request (accepted or not), in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExportRequest {
    pub transport: Transport,
    /// Number of spans in the request (0 for a bad request).
    pub spans: usize,
    pub result: ExportResult,
    pub time_unix_nano: u64,
}

/// How to start an [`OtlpReceiver`].
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// OTLP/gRPC port on 127.0.0.1; 0 (the default) = ephemeral.
    pub grpc_port: u16,
    /// OTLP/HTTP port on 127.0.0.1; 0 (the default) = ephemeral.
    pub http_port: u16,
    /// Answer the first N exports (both transports counted together) with gRPC
    /// UNAVAILABLE / HTTP 503, without recording their spans.
    pub fail_first: u32,
    /// How long to wait for the receiver to listen (default 30 s).
    pub ready_timeout: Duration,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        Self {
            grpc_port: 0,
            http_port: 0,
            fail_first: 0,
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// A running `tests/otlp_receiver.py`; dropping it kills the process and removes its
/// files.
pub struct OtlpReceiver {
    child: Mutex<Child>,
    /// Held open: the script exits when it reads EOF, so it never outlives this
    /// process even if `drop` does not run.
    _stdin: Option<ChildStdin>,
    grpc_port: u16,
    http_port: u16,
    dir: PathBuf,
    spans_path: PathBuf,
    requests_path: PathBuf,
    stderr_path: PathBuf,
}

/// How often the `wait_for_*` functions read the file.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

impl OtlpReceiver {
    /// The path of the receiver script.
    pub fn script_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp_receiver.py")
    }

    /// Starts a receiver on ephemeral ports and waits until it listens.
    pub fn start() -> Result<Self> {
        Self::start_with(ReceiverOptions::default())
    }

    /// Starts a receiver and waits until it listens (at most `opts.ready_timeout`).
    pub fn start_with(opts: ReceiverOptions) -> Result<Self> {
        let dir = unique_temp_dir()?;
        let spans_path = dir.join("spans.jsonl");
        let requests_path = dir.join("requests.jsonl");
        let stderr_path = dir.join("stderr.log");
        let stderr = match fs::File::create(&stderr_path) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e).with_context(|| format!("creating {}", stderr_path.display()));
            }
        };
        let script = Self::script_path();
        let python = std::env::var("HOPTRACE_PYTHON").unwrap_or_else(|_| "python3".into());
        let spawned = Command::new(&python)
            .arg(&script)
            .arg("--out")
            .arg(&spans_path)
            .arg("--requests-out")
            .arg(&requests_path)
            .arg("--grpc-port")
            .arg(opts.grpc_port.to_string())
            .arg("--http-port")
            .arg(opts.http_port.to_string())
            .arg("--fail-first")
            .arg(opts.fail_first.to_string())
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e).with_context(|| format!("spawning {python} {}", script.display()));
            }
        };
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        // From here on, Drop cleans up on every error path.
        let mut receiver = Self {
            child: Mutex::new(child),
            _stdin: stdin,
            grpc_port: 0,
            http_port: 0,
            dir,
            spans_path,
            requests_path,
            stderr_path,
        };

        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("otlp-receiver-stdout".into())
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let _ = tx.send(lines.next());
                // Drain whatever else comes, so the script never blocks on a full pipe.
                for _ in lines {}
            })
            .context("spawning the stdout reader thread")?;
        let first = match rx.recv_timeout(opts.ready_timeout) {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => {
                return Err(receiver.startup_error(&format!("reading its stdout: {e}")));
            }
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(receiver.startup_error("it exited without printing the ready line"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(receiver
                    .startup_error(&format!("no ready line within {:?}", opts.ready_timeout)));
            }
        };
        match parse_ready_line(&first) {
            Some((grpc, http)) => {
                receiver.grpc_port = grpc;
                receiver.http_port = http;
                Ok(receiver)
            }
            None => Err(receiver.startup_error(&format!("unexpected first line {first:?}"))),
        }
    }

    /// Kills the script and describes why it did not start, with its stderr.
    fn startup_error(&self, why: &str) -> anyhow::Error {
        let status = self.kill();
        anyhow!(
            "the OTLP receiver ({}) did not start: {why}; {}; its stderr:\n{}",
            Self::script_path().display(),
            status,
            self.stderr().trim_end()
        )
    }

    /// Kills and reaps the script; describes how it ended.
    fn kill(&self) -> String {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.try_wait() {
            Ok(Some(status)) => format!("it ended with {status}"),
            _ => {
                let _ = child.kill();
                match child.wait() {
                    Ok(status) => format!("killed it ({status})"),
                    Err(e) => format!("killed it (wait failed: {e})"),
                }
            }
        }
    }

    /// Bails if the script is no longer running.
    fn check_alive(&self) -> Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the OTLP receiver exited ({status}); its stderr:\n{}",
                self.stderr().trim_end()
            );
        }
        Ok(())
    }

    /// The OTLP/gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// The OTLP/HTTP base endpoint, `http://127.0.0.1:PORT` (what
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` takes; exporters append `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The OTLP/HTTP traces URL, `http://127.0.0.1:PORT/v1/traces` (what
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` takes).
    pub fn http_traces_url(&self) -> String {
        format!("{}/v1/traces", self.http_endpoint())
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The spans received so far, in arrival order.
    ///
    /// Panics if the file cannot be read or parsed (see [`Self::try_spans`]).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.try_spans().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The spans received so far, in arrival order.
    pub fn try_spans(&self) -> Result<Vec<ReceivedSpan>> {
        read_jsonl(&self.spans_path)
    }

    /// Polls [`Self::spans`] until `predicate` holds for all spans received so far,
    /// and returns them. At the timeout it returns the spans received by then
    /// (assert on them); see [`Self::try_wait_for_spans`] for an error instead.
    pub fn wait_for_spans(
        &self,
        mut predicate: impl FnMut(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if predicate(&spans) || Instant::now() >= deadline {
                return spans;
            }
            if let Err(e) = self.check_alive() {
                panic!("{e:#}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Like [`Self::wait_for_spans`], but an error (listing what was received) at the
    /// timeout, or as soon as the receiver dies.
    pub fn try_wait_for_spans(
        &self,
        mut predicate: impl FnMut(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.try_spans()?;
            if predicate(&spans) {
                return Ok(spans);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the OTLP receiver did not get the expected spans within {timeout:?}; \
                     it got {} span(s), by name: {:?}",
                    spans.len(),
                    spans.iter().fold(
                        std::collections::BTreeMap::<&str, usize>::new(),
                        |mut counts, s| {
                            *counts.entry(s.name.as_str()).or_default() += 1;
                            counts
                        }
                    )
                );
            }
            self.check_alive()?;
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The export requests received so far (accepted or not), in arrival order.
    pub fn requests(&self) -> Vec<ExportRequest> {
        read_jsonl(&self.requests_path).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// What the script wrote to stderr so far (one line per export request).
    pub fn stderr(&self) -> String {
        fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The JSON-lines file the spans are appended to.
    pub fn spans_path(&self) -> &Path {
        &self.spans_path
    }

    /// The receiver's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "OTLP receiver on grpc={} http={}: its stderr:\n{}",
                self.grpc_port,
                self.http_port,
                self.stderr().trim_end()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("grpc_port", &self.grpc_port)
            .field("http_port", &self.http_port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Groups spans by trace id.
pub fn by_trace(spans: &[ReceivedSpan]) -> HashMap<&str, Vec<&ReceivedSpan>> {
    let mut traces: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    for span in spans {
        traces.entry(span.trace_id.as_str()).or_default().push(span);
    }
    traces
}

fn parse_ready_line(line: &str) -> Option<(u16, u16)> {
    let rest = line.trim().strip_prefix("ready ")?;
    let mut grpc = None;
    let mut http = None;
    for field in rest.split_whitespace() {
        if let Some(p) = field.strip_prefix("grpc=") {
            grpc = p.parse().ok();
        } else if let Some(p) = field.strip_prefix("http=") {
            http = p.parse().ok();
        }
    }
    Some((grpc?, http?))
}

fn unique_temp_dir() -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let dir = base.join(format!(
            "hoptrace-otlp-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("cannot create a unique directory in {}", base.display())
}

/// Parses a JSON-lines file written concurrently: a last line without its newline is
/// still being written and is left out. A missing file is empty.
fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => return Ok(Vec::new()),
    };
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}: line {}: {line}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{io::Write, net::TcpListener};

    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    /// A real OTLP client: the OpenTelemetry Python SDK with its OTLP exporters.
    /// Makes a SERVER span with a CLIENT child, both with fixed times, and prints
    /// their ids.
    const SDK_CLIENT: &str = r#"
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id

protocol, endpoint = sys.argv[1], sys.argv[2]
if protocol == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10)
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=10)

provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test", "lab.run": 7}))
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("hoptrace.receiver.test", "1.2.3")

T0 = 1_700_000_000_123_456_789
parent = tracer.start_span("GET /parent", kind=SpanKind.SERVER, start_time=T0, attributes={
    "http.request.method": "GET",
    "http.response.status_code": 200,
    "hop.latency_ms": 12.5,
    "hop.tls": True,
    "hop.names": ["agent", "fw", "persona"],
    "hop.ports": [443, 8443],
    "big": 9_007_199_254_740_993,
    "negative": -42,
})
parent.add_event("tls.handshake", attributes={"tls.version": "1.3", "bytes": 517}, timestamp=T0 + 1_000)
ctx = trace.set_span_in_context(parent)
child = tracer.start_span("connect persona", kind=SpanKind.CLIENT, context=ctx, start_time=T0 + 2_000)
child.set_attribute("net.peer.port", 443)
child.set_status(Status(StatusCode.ERROR, "boom"))
child.end(end_time=T0 + 2_000 + 3_456_789)
parent.end(end_time=T0 + 1_000_000_001)
provider.shutdown()

def ids(span):
    c = span.get_span_context()
    return {"trace_id": format_trace_id(c.trace_id), "span_id": format_span_id(c.span_id)}
print(json.dumps({"parent": ids(parent), "child": ids(child)}))
"#;

    const T0: u64 = 1_700_000_000_123_456_789;

    struct Ids {
        trace_id: String,
        parent: String,
        child: String,
    }

    fn run_sdk_client(protocol: &str, endpoint: &str) -> Ids {
        let out = Command::new("python3")
            .args(["-c", SDK_CLIENT, protocol, endpoint])
            .output()
            .expect("running python3");
        assert!(
            out.status.success(),
            "the OpenTelemetry SDK client failed ({}); are opentelemetry-sdk and \
             opentelemetry-exporter-otlp-proto-{{grpc,http}} installed (scripts/setup.sh)?\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("client output");
        let trace_id = v["parent"]["trace_id"].as_str().unwrap().to_owned();
        assert_eq!(v["child"]["trace_id"], v["parent"]["trace_id"]);
        Ids {
            trace_id,
            parent: v["parent"]["span_id"].as_str().unwrap().to_owned(),
            child: v["child"]["span_id"].as_str().unwrap().to_owned(),
        }
    }

    fn check_sdk_spans(spans: &[ReceivedSpan], ids: &Ids, transport: Transport) {
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let parent = spans.iter().find(|s| s.name == "GET /parent").unwrap();
        let child = spans.iter().find(|s| s.name == "connect persona").unwrap();

        for s in [parent, child] {
            assert_eq!(s.trace_id, ids.trace_id);
            assert_eq!(s.trace_id.len(), 32);
            assert_eq!(s.transport, transport);
            assert_eq!(s.resource_str("service.name"), Some("receiver-test"));
            assert_eq!(s.resource.get("lab.run"), Some(&Value::from(7)));
            assert_eq!(s.scope_name, "hoptrace.receiver.test");
            assert_eq!(s.scope_version, "1.2.3");
        }
        assert_eq!(parent.span_id, ids.parent);
        assert_eq!(child.span_id, ids.child);
        assert!(parent.is_root());
        assert_eq!(parent.parent_span_id, "");
        assert_eq!(child.parent_span_id, ids.parent);
        assert_eq!(by_trace(spans).len(), 1);

        assert_eq!(parent.kind, span_kind::SERVER);
        assert_eq!(child.kind, span_kind::CLIENT);
        assert_eq!(parent.start_time_unix_nano, T0);
        assert_eq!(parent.end_time_unix_nano, T0 + 1_000_000_001);
        assert_eq!(parent.duration(), Duration::from_nanos(1_000_000_001));
        assert_eq!(child.start_time_unix_nano, T0 + 2_000);
        assert_eq!(child.duration(), Duration::from_nanos(3_456_789));
        assert_eq!(
            parent.start_time(),
            UNIX_EPOCH + Duration::from_nanos(T0),
            "start_time()"
        );

        assert_eq!(parent.attr_str("http.request.method"), Some("GET"));
        assert_eq!(parent.attr_i64("http.response.status_code"), Some(200));
        assert_eq!(parent.attr_f64("hop.latency_ms"), Some(12.5));
        assert_eq!(parent.attr_bool("hop.tls"), Some(true));
        assert_eq!(
            parent.attr("hop.names"),
            Some(&serde_json::json!(["agent", "fw", "persona"]))
        );
        assert_eq!(
            parent.attr("hop.ports"),
            Some(&serde_json::json!([443, 8443]))
        );
        // Beyond 2^53: exact only if no float sits anywhere on the way.
        assert_eq!(parent.attr_i64("big"), Some(9_007_199_254_740_993));
        assert_eq!(parent.attr_i64("negative"), Some(-42));
        assert_eq!(parent.attr_str("http.response.status_code"), None);
        assert_eq!(parent.attr_i64("missing"), None);
        assert_eq!(child.attr_i64("net.peer.port"), Some(443));

        let event = parent.event("tls.handshake").expect("event");
        assert_eq!(event.time_unix_nano, T0 + 1_000);
        assert_eq!(event.attributes["tls.version"], "1.3");
        assert_eq!(event.attributes["bytes"], 517);
        assert!(child.events.is_empty());

        assert_eq!(parent.status.code, status_code::UNSET);
        assert_eq!(child.status.code, status_code::ERROR);
        assert_eq!(child.status.message, "boom");
    }

    #[test]
    fn sdk_exports_over_grpc_arrive_exactly() {
        let receiver = OtlpReceiver::start().unwrap();
        let ids = run_sdk_client("grpc", &receiver.grpc_endpoint());
        let spans = receiver.try_wait_for_spans(|s| s.len() >= 2, WAIT).unwrap();
        check_sdk_spans(&spans, &ids, Transport::Grpc);
        let requests = receiver.requests();
        assert!(
            requests
                .iter()
                .all(|r| r.transport == Transport::Grpc && r.result == ExportResult::Ok),
            "{requests:?}"
        );
        assert_eq!(requests.iter().map(|r| r.spans).sum::<usize>(), 2);
    }

    #[test]
    fn sdk_exports_over_http_protobuf_arrive_exactly() {
        let receiver = OtlpReceiver::start().unwrap();
        let ids = run_sdk_client("http", &receiver.http_traces_url());
        let spans = receiver.try_wait_for_spans(|s| s.len() >= 2, WAIT).unwrap();
        check_sdk_spans(&spans, &ids, Transport::HttpProtobuf);
    }

    #[test]
    fn fail_first_makes_the_sdk_retry_over_grpc() {
        let receiver = OtlpReceiver::start_with(ReceiverOptions {
            fail_first: 1,
            ..Default::default()
        })
        .unwrap();
        let ids = run_sdk_client("grpc", &receiver.grpc_endpoint());
        let spans = receiver.try_wait_for_spans(|s| s.len() >= 2, WAIT).unwrap();
        check_sdk_spans(&spans, &ids, Transport::Grpc);
        let results: Vec<_> = receiver.requests().iter().map(|r| r.result).collect();
        assert_eq!(
            results,
            [
                ExportResult::Unavailable,
                ExportResult::Ok,
                ExportResult::Ok
            ]
        );
    }

    #[test]
    fn fail_first_answers_http_503() {
        let receiver = OtlpReceiver::start_with(ReceiverOptions {
            fail_first: 2,
            ..Default::default()
        })
        .unwrap();
        let body = json_body("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "");
        assert_eq!(curl_json(&receiver, &body).0, 503);
        assert_eq!(curl_json(&receiver, &body).0, 503);
        assert!(receiver.spans().is_empty());
        let (code, reply) = curl_json(&receiver, &body);
        assert_eq!((code, reply.as_str()), (200, "{}"));
        assert_eq!(receiver.spans().len(), 1);
        let results: Vec<_> = receiver.requests().iter().map(|r| r.result).collect();
        assert_eq!(
            results,
            [
                ExportResult::Unavailable,
                ExportResult::Unavailable,
                ExportResult::Ok
            ]
        );
    }

    fn json_body(trace_id: &str, span_id: &str, parent_span_id: &str) -> String {
        serde_json::json!({
            "resourceSpans": [{
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": "curl"}}
                ]},
                "scopeSpans": [{
                    "scope": {"name": "json-scope", "version": "0.1"},
                    "spans": [{
                        "traceId": trace_id,
                        "spanId": span_id,
                        "parentSpanId": parent_span_id,
                        "name": "json span",
                        "kind": 3,
                        "startTimeUnixNano": "1700000000000000001",
                        "endTimeUnixNano": "1700000000250000001",
                        "attributes": [
                            {"key": "int", "value": {"intValue": "-9007199254740993"}},
                            {"key": "int_as_number", "value": {"intValue": 7}},
                            {"key": "double", "value": {"doubleValue": 0.25}},
                            {"key": "bool", "value": {"boolValue": false}},
                            {"key": "str", "value": {"stringValue": "s"}},
                            {"key": "arr", "value": {"arrayValue": {"values": [
                                {"stringValue": "a"}, {"intValue": "1"}
                            ]}}},
                            {"key": "kv", "value": {"kvlistValue": {"values": [
                                {"key": "k", "value": {"stringValue": "v"}}
                            ]}}},
                            {"key": "bytes", "value": {"bytesValue": "AQID"}}
                        ],
                        "events": [{
                            "timeUnixNano": "1700000000100000001",
                            "name": "ev",
                            "attributes": [{"key": "n", "value": {"intValue": "3"}}]
                        }],
                        "links": [{
                            "traceId": "FFFFFFFFFFFFFFFF0000000000000001",
                            "spanId": "00000000000000AB",
                            "attributes": []
                        }],
                        "status": {"code": 2, "message": "json error"},
                        "unknownFieldFromTheFuture": true
                    }]
                }]
            }]
        })
        .to_string()
    }

    /// POSTs an OTLP/JSON body with curl; returns the HTTP status and the body.
    fn curl_json(receiver: &OtlpReceiver, body: &str) -> (u16, String) {
        curl(receiver, "application/json", body)
    }

    fn curl(receiver: &OtlpReceiver, content_type: &str, body: &str) -> (u16, String) {
        let mut child = Command::new("curl")
            .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
            .args(["-H", &format!("Content-Type: {content_type}")])
            .args(["--data-binary", "@-", &receiver.http_traces_url()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running curl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "curl failed: {}", out.status);
        let text = String::from_utf8(out.stdout).unwrap();
        let (reply, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), reply.to_owned())
    }

    #[test]
    fn otlp_json_with_hex_ids() {
        let receiver = OtlpReceiver::start().unwrap();
        // OTLP/JSON ids are case-insensitive hex; they come out lowercase.
        let body = json_body(
            "5B8EFFF798038103D269B633813FC60C",
            "EEE19B7EC3C1B174",
            "eee19b7ec3c1b173",
        );
        let (code, reply) = curl_json(&receiver, &body);
        assert_eq!((code, reply.as_str()), (200, "{}"));
        let spans = receiver.spans();
        assert_eq!(spans.len(), 1, "{spans:#?}");
        let s = &spans[0];
        assert_eq!(s.transport, Transport::HttpJson);
        assert_eq!(s.trace_id, "5b8efff798038103d269b633813fc60c");
        assert_eq!(s.span_id, "eee19b7ec3c1b174");
        assert_eq!(s.parent_span_id, "eee19b7ec3c1b173");
        assert!(!s.is_root());
        assert_eq!(s.name, "json span");
        assert_eq!(s.kind, span_kind::CLIENT);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_000_000_001);
        assert_eq!(s.end_time_unix_nano, 1_700_000_000_250_000_001);
        assert_eq!(s.duration(), Duration::from_millis(250));
        assert_eq!(s.attr_i64("int"), Some(-9_007_199_254_740_993));
        assert_eq!(s.attr_i64("int_as_number"), Some(7));
        assert_eq!(s.attr_f64("double"), Some(0.25));
        assert_eq!(s.attr_bool("bool"), Some(false));
        assert_eq!(s.attr_str("str"), Some("s"));
        assert_eq!(s.attr("arr"), Some(&serde_json::json!(["a", 1])));
        assert_eq!(s.attr("kv"), Some(&serde_json::json!({"k": "v"})));
        assert_eq!(s.attr_str("bytes"), Some("AQID"));
        let ev = s.event("ev").unwrap();
        assert_eq!(ev.time_unix_nano, 1_700_000_000_100_000_001);
        assert_eq!(ev.attributes["n"], 3);
        assert_eq!(s.links.len(), 1);
        assert_eq!(s.links[0].trace_id, "ffffffffffffffff0000000000000001");
        assert_eq!(s.links[0].span_id, "00000000000000ab");
        assert_eq!(s.status.code, status_code::ERROR);
        assert_eq!(s.status.message, "json error");
        assert_eq!(s.resource_str("service.name"), Some("curl"));
        assert_eq!(s.scope_name, "json-scope");
        assert_eq!(s.scope_version, "0.1");

        // A root span: an empty parentSpanId.
        let body = json_body("00000000000000000000000000000abc", "0000000000000def", "");
        assert_eq!(curl_json(&receiver, &body).0, 200);
        let spans = receiver.spans();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[1].trace_id, "00000000000000000000000000000abc");
        assert_eq!(spans[1].parent_span_id, "");
        assert!(spans[1].is_root());
    }

    #[test]
    fn bad_requests_are_refused_and_not_recorded() {
        let receiver = OtlpReceiver::start().unwrap();
        // base64 ids (protobuf's JSON mapping) are not OTLP/JSON.
        let base64_ids = json_body("W47/95gDgQPSabYzgT/GDA==", "7uGbfsPBsXQ=", "");
        assert_eq!(curl_json(&receiver, &base64_ids).0, 400);
        // Hex of the wrong length, and not hex.
        let short = json_body("5b8efff798038103d269b633813fc6", "eee19b7ec3c1b174", "");
        assert_eq!(curl_json(&receiver, &short).0, 400);
        let not_hex = json_body("zz8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "");
        assert_eq!(curl_json(&receiver, &not_hex).0, 400);
        assert_eq!(curl_json(&receiver, "{not json").0, 400);
        assert_eq!(
            curl(&receiver, "application/x-protobuf", "\u{7}garbage").0,
            400
        );
        assert_eq!(curl(&receiver, "text/plain", "x").0, 415);
        assert!(receiver.spans().is_empty());
        let requests = receiver.requests();
        assert_eq!(requests.len(), 5, "{requests:?}");
        assert!(
            requests
                .iter()
                .all(|r| r.result == ExportResult::BadRequest)
        );
        // Still serving.
        let body = json_body("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "");
        assert_eq!(curl_json(&receiver, &body).0, 200);
        assert_eq!(receiver.spans().len(), 1);
    }

    #[test]
    fn instances_are_independent_and_drop_cleans_up() {
        let a = OtlpReceiver::start().unwrap();
        let b = OtlpReceiver::start().unwrap();
        assert_ne!(a.grpc_port(), b.grpc_port());
        assert_ne!(a.http_port(), b.http_port());
        assert_ne!(a.spans_path(), b.spans_path());
        assert_eq!(
            a.grpc_endpoint(),
            format!("http://127.0.0.1:{}", a.grpc_port())
        );
        assert_eq!(
            a.http_endpoint(),
            format!("http://127.0.0.1:{}", a.http_port())
        );
        let body = json_body("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "");
        assert_eq!(curl_json(&a, &body).0, 200);
        assert_eq!(a.spans().len(), 1);
        assert!(b.spans().is_empty());

        let pid = a.pid();
        let path = a.spans_path().to_owned();
        assert!(path.exists());
        drop(a);
        assert!(!path.exists(), "{} left behind", path.display());
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "receiver {pid} still running"
        );
        assert!(b.spans().is_empty());
    }

    #[test]
    fn wait_for_spans_times_out_with_what_it_has() {
        let receiver = OtlpReceiver::start().unwrap();
        let started = Instant::now();
        let spans = receiver.wait_for_spans(|s| !s.is_empty(), Duration::from_millis(300));
        assert!(spans.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(300));
        let err = receiver
            .try_wait_for_spans(|s| !s.is_empty(), Duration::from_millis(100))
            .unwrap_err();
        assert!(err.to_string().contains("0 span(s)"), "{err:#}");
    }

    #[test]
    fn a_port_in_use_is_a_clear_startup_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = OtlpReceiver::start_with(ReceiverOptions {
            http_port: port,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("did not start"), "{err}");
        assert!(err.contains("cannot listen for HTTP"), "{err}");
    }

    #[test]
    fn partial_last_line_is_ignored() {
        let dir = unique_temp_dir().unwrap();
        let path = dir.join("x.jsonl");
        fs::write(
            &path,
            "{\"transport\":\"grpc\",\"spans\":1,\"result\":\"ok\",\"time_unix_nano\":5}\n{\"tra",
        )
        .unwrap();
        let got: Vec<ExportRequest> = read_jsonl(&path).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].result, ExportResult::Ok);
        assert!(
            read_jsonl::<ExportRequest>(&dir.join("missing"))
                .unwrap()
                .is_empty()
        );
        fs::remove_dir_all(dir).unwrap();
        assert_eq!(parse_ready_line("ready grpc=1 http=2\n"), Some((1, 2)));
        assert_eq!(parse_ready_line("ready grpc=1"), None);
    }
}
