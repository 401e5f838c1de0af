//! `cargo xtask otlp-count-receiver --out FILE`: the overhead benchmark's OTLP/gRPC receiver.
//!
//! It answers `TraceService/Export` on an ephemeral loopback port, prints `ready grpc=<port>`
//! once listening, and counts the spans by (`hoptrace.hop` attribute, span kind, name) into the
//! same JSON summary as `tests/otlp_receiver.py --count-only` (rewritten every second when
//! something changed, through a temp file and a rename, and at exit on SIGTERM or SIGINT), so
//! that `bench` reads either. It runs as its own process so that `bench` can measure its CPU
//! apart from the agent's: it shares the lab's two cores, and the Python receiver cost as much
//! CPU per request as the agent itself.
//!
//! Requests are not decoded into opentelemetry-proto's `ExportTraceServiceRequest`: that
//! allocates every id, attribute key and value (about 1.6 us per span of hoptrace's, release
//! build; the agent sends five spans per keep-alive request). Prost decodes the request down to
//! the encoded spans, and `span_key` reads name, kind and the hop attribute from those bytes
//! with prost's wire-format functions, skipping the rest without copying (about 0.3 us a span;
//! a derived `Span` keeping the attributes as `Bytes` slices took 1.1 us).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::{
    DecodeError, Message as _,
    encoding::{
        DecodeContext, WireType, check_wire_type, decode_key, decode_varint, int32, skip_field,
        string,
    },
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    time::MissedTickBehavior,
};
use tonic::codegen::{Body, StdError, http};
use tonic_prost::ProstCodec;

/// The one method served.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The attribute whose value is counted as the span's hop ("-" when absent).
const HOP_KEY: &str = "hoptrace.hop";

/// How often the summary is rewritten (`bench` waits for it to stop changing).
const SUMMARY_PERIOD: Duration = Duration::from_secs(1);

/// `ExportTraceServiceRequest` down to its spans, which stay encoded: `span_key` reads the
/// three fields counted straight from their bytes (tags from
/// opentelemetry/proto/collector/trace/v1/trace_service.proto and trace/v1/trace.proto).
#[derive(prost::Message)]
struct CountedRequest {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<CountedResourceSpans>,
}

#[derive(prost::Message)]
struct CountedResourceSpans {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<CountedScopeSpans>,
}

#[derive(prost::Message)]
struct CountedScopeSpans {
    /// Slices of the received buffer, not copies.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    spans: Vec<Bytes>,
}

/// `AnyValue`, decoded only for the hop: any other kind of value reads as "", as the Python
/// receiver's `value.string_value` does.
#[derive(prost::Message)]
struct StringValue {
    #[prost(string, tag = "1")]
    string_value: String,
}

/// (hop, kind, name) of an encoded `Span`: name (5), kind (6, the `SpanKind` value kept as a
/// number) and the first `hoptrace.hop` attribute (9) as the Python receiver takes it, "-"
/// when there is none; every other field is skipped.
fn span_key(mut span: &[u8]) -> Result<(String, i32, String), DecodeError> {
    let (mut name, mut kind, mut hop) = (String::new(), 0, None);
    while !span.is_empty() {
        let (tag, wire_type) = decode_key(&mut span)?;
        match tag {
            5 => string::merge(wire_type, &mut name, &mut span, DecodeContext::default())?,
            6 => int32::merge(wire_type, &mut kind, &mut span, DecodeContext::default())?,
            9 if hop.is_none() => hop = hop_value(length_delimited(tag, wire_type, &mut span)?)?,
            _ => skip_field(wire_type, tag, &mut span, DecodeContext::default())?,
        }
    }
    Ok((hop.unwrap_or_else(|| "-".to_owned()), kind, name))
}

/// The value of an encoded `KeyValue` (key 1, value 2) when its key is `hoptrace.hop`.
fn hop_value(mut attribute: &[u8]) -> Result<Option<String>, DecodeError> {
    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
    while !attribute.is_empty() {
        let (tag, wire_type) = decode_key(&mut attribute)?;
        match tag {
            1 => key = length_delimited(tag, wire_type, &mut attribute)?,
            2 => value = length_delimited(tag, wire_type, &mut attribute)?,
            _ => skip_field(wire_type, tag, &mut attribute, DecodeContext::default())?,
        }
    }
    if key != HOP_KEY.as_bytes() {
        return Ok(None);
    }
    Ok(Some(StringValue::decode(value)?.string_value))
}

/// The contents of the length-delimited field whose key was just read; `buf` moves past it.
fn length_delimited<'a>(
    tag: u32,
    wire_type: WireType,
    buf: &mut &'a [u8],
) -> Result<&'a [u8], DecodeError> {
    check_wire_type(WireType::LengthDelimited, wire_type)?;
    let field = *buf;
    // Checks that the length fits, without copying.
    skip_field(wire_type, tag, buf, DecodeContext::default())?;
    let mut contents = &field[..field.len() - buf.len()];
    decode_varint(&mut contents)?;
    Ok(contents)
}

/// What has been accepted so far.
#[derive(Default)]
struct Counts {
    spans: u64,
    exports: u64,
    by_hop_kind_name: HashMap<(String, i32, String), u64>,
    /// Changed since the summary was last written.
    dirty: bool,
}

impl Counts {
    /// Counts a request's spans, all or (when one is undecodable) none.
    fn add(&mut self, request: CountedRequest) -> Result<(), DecodeError> {
        let spans = request
            .resource_spans
            .into_iter()
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .map(|span| span_key(&span))
            .collect::<Result<Vec<_>, DecodeError>>()?;
        self.spans += spans.len() as u64;
        self.exports += 1;
        self.dirty = true;
        for key in spans {
            *self.by_hop_kind_name.entry(key).or_default() += 1;
        }
        Ok(())
    }

    /// The summary: Python's `json.dumps(indent=1, sort_keys=True)` of `spans`, `exports`,
    /// `by_name`, `by_hop` and `by_hop_kind_name` (keys `hop|KIND|name`), byte for byte.
    fn summary(&self) -> String {
        let mut by_name = BTreeMap::<&str, u64>::new();
        let mut by_hop = BTreeMap::<&str, u64>::new();
        let mut by_hop_kind_name = BTreeMap::<String, u64>::new();
        for ((hop, kind, name), &n) in &self.by_hop_kind_name {
            *by_name.entry(name).or_default() += n;
            *by_hop.entry(hop).or_default() += n;
            *by_hop_kind_name
                .entry(format!("{hop}|{}|{name}", kind_name(*kind)))
                .or_default() += n;
        }
        // Sorted keys: Rust orders strings by UTF-8 bytes, Python by code points, the same
        // order.
        let mut s = String::from("{\n");
        write_section(&mut s, "by_hop", &by_hop);
        write_section(&mut s, "by_hop_kind_name", &by_hop_kind_name);
        write_section(&mut s, "by_name", &by_name);
        let _ = write!(
            s,
            " \"exports\": {},\n \"spans\": {}\n}}\n",
            self.exports, self.spans
        );
        s
    }
}

fn kind_name(kind: i32) -> String {
    match kind {
        0 => "UNSPECIFIED",
        1 => "INTERNAL",
        2 => "SERVER",
        3 => "CLIENT",
        4 => "PRODUCER",
        5 => "CONSUMER",
        other => return other.to_string(),
    }
    .to_owned()
}

/// ` "name": {...},` as json.dumps(indent=1) writes a nested object (`{}` when empty).
fn write_section<K: AsRef<str>>(s: &mut String, name: &str, counts: &BTreeMap<K, u64>) {
    let _ = write!(s, " {}: {{", json_string(name));
    if counts.is_empty() {
        s.push_str("},\n");
        return;
    }
    for (i, (key, n)) in counts.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(s, "{sep}\n  {}: {n}", json_string(key.as_ref()));
    }
    s.push_str("\n },\n");
}

/// A JSON string as Python's json.dumps writes it (`ensure_ascii`): printable ASCII as is,
/// the short escapes, everything else `\uXXXX` (lowercase hex, surrogate pairs above U+FFFF).
fn json_string(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            ' '..='~' => s.push(c),
            _ => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = write!(s, "\\u{unit:04x}");
                }
            }
        }
    }
    s.push('"');
    s
}

/// The gRPC method, on the counts shared by all connections.
#[derive(Clone, Default)]
struct Export(Arc<Mutex<Counts>>);

impl tonic::server::UnaryService<CountedRequest> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<CountedRequest>) -> Self::Future {
        let added = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(request.into_inner());
        std::future::ready(match added {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err(e) => Err(tonic::Status::invalid_argument(format!(
                "undecodable span: {e}"
            ))),
        })
    }
}

impl Export {
    /// One HTTP/2 request: gRPC framing, decoding and the answer are tonic's.
    async fn handle<B>(self, request: http::Request<B>) -> http::Response<tonic::body::Body>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<StdError> + Send,
    {
        if request.uri().path() != EXPORT_PATH {
            return tonic::Status::unimplemented(format!("only {EXPORT_PATH}")).into_http();
        }
        let codec = ProstCodec::<ExportTraceServiceResponse, CountedRequest>::default();
        tonic::server::Grpc::new(codec).unary(self, request).await
    }

    /// Writes the summary (temp file, then rename) when the counts changed since the last time.
    fn write_summary(&self, out: &Path) -> Result<()> {
        let text = {
            let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if !counts.dirty {
                return Ok(());
            }
            counts.dirty = false;
            counts.summary()
        };
        let mut tmp = out.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
    }
}

/// Serves until SIGTERM or SIGINT, then writes the final summary.
pub fn run(out: &Path) -> Result<()> {
    // One thread: the load shares the cores, and exports arrive a few per second at most.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(out))
}

async fn serve(out: &Path) -> Result<()> {
    let export = Export::default();
    // The empty summary first, as the Python receiver does.
    export.0.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
    export.write_summary(out)?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("listening on 127.0.0.1")?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + SUMMARY_PERIOD, SUMMARY_PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready grpc={}", listener.local_addr()?.port())?;
    stdout.flush()?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.context("accepting a connection")?;
                let export = export.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let export = export.clone();
                        async move { Ok::<_, std::convert::Infallible>(export.handle(request).await) }
                    });
                    // A sender that goes away mid-request is no concern of the counts.
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = tick.tick() => export.write_summary(out)?,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    export.write_summary(out)
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, Full};
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value},
        trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind},
    };

    use super::*;

    fn attribute(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        }
    }

    fn span(name: &str, kind: SpanKind, attributes: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            attributes,
            ..Span::default()
        }
    }

    fn hop(hop: &str) -> KeyValue {
        attribute(HOP_KEY, any_value::Value::StringValue(hop.into()))
    }

    /// A gRPC unary call: the message behind the 5-byte prefix (uncompressed, length).
    fn grpc_request(message: &impl prost::Message) -> http::Request<Full<Bytes>> {
        let encoded = message.encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend_from_slice(&encoded);
        http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{EXPORT_PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }

    /// The response's grpc-status (in the trailers on success, in the headers otherwise).
    async fn grpc_status(response: http::Response<tonic::body::Body>) -> String {
        let headers = response.headers().clone();
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = trailers.get("grpc-status").or(headers.get("grpc-status"));
        status.unwrap().to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn counts_an_export_by_hop_kind_and_name() {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![
                    ScopeSpans {
                        spans: vec![
                            span(
                                "GET",
                                SpanKind::Client,
                                vec![
                                    attribute("server.port", any_value::Value::IntValue(80)),
                                    hop("agent"),
                                ],
                            ),
                            // The first hop attribute counts.
                            span("GET", SpanKind::Client, vec![hop("agent"), hop("fw")]),
                            span("tcp.accept", SpanKind::Server, vec![hop("persona")]),
                        ],
                        ..ScopeSpans::default()
                    },
                    ScopeSpans {
                        spans: vec![
                            // No hop attribute, and a hop that is not a string.
                            span("odd \"name\" é", SpanKind::Internal, vec![]),
                            span(
                                "GET",
                                SpanKind::Client,
                                vec![attribute(HOP_KEY, any_value::Value::IntValue(1))],
                            ),
                        ],
                        ..ScopeSpans::default()
                    },
                ],
                ..ResourceSpans::default()
            }],
        };
        let export = Export::default();
        for _ in 0..2 {
            let response = export.clone().handle(grpc_request(&request)).await;
            assert_eq!(grpc_status(response).await, "0");
        }
        // What tests/otlp_receiver.py --count-only writes for the same two exports.
        let expected = r#"{
 "by_hop": {
  "": 2,
  "-": 2,
  "agent": 4,
  "persona": 2
 },
 "by_hop_kind_name": {
  "-|INTERNAL|odd \"name\" \u00e9": 2,
  "agent|CLIENT|GET": 4,
  "persona|SERVER|tcp.accept": 2,
  "|CLIENT|GET": 2
 },
 "by_name": {
  "GET": 6,
  "odd \"name\" \u00e9": 2,
  "tcp.accept": 2
 },
 "exports": 2,
 "spans": 10
}
"#;
        assert_eq!(export.0.lock().unwrap().summary(), expected);
    }

    #[tokio::test]
    async fn refuses_other_methods_and_undecodable_requests() {
        let export = Export::default();
        let mut request = grpc_request(&ExportTraceServiceRequest::default());
        *request.uri_mut() = "http://127.0.0.1/other.Service/Export".parse().unwrap();
        let response = export.clone().handle(request).await;
        assert_eq!(grpc_status(response).await, "12"); // UNIMPLEMENTED
        let mut request = grpc_request(&ExportTraceServiceRequest::default());
        *request.body_mut() = Full::new(Bytes::from_static(&[0, 0, 0, 0, 2, 0x0a, 0x05]));
        let response = export.clone().handle(request).await;
        assert_eq!(grpc_status(response).await, "13"); // INTERNAL: tonic's decode error
        // A span cut short (name: 5 bytes announced, 1 there): nothing of its request counts.
        let request = CountedRequest {
            resource_spans: vec![CountedResourceSpans {
                scope_spans: vec![CountedScopeSpans {
                    spans: vec![
                        span("GET", SpanKind::Client, vec![hop("agent")])
                            .encode_to_vec()
                            .into(),
                        Bytes::from_static(&[0x2a, 5, b'G']),
                    ],
                }],
            }],
        };
        let response = export.clone().handle(grpc_request(&request)).await;
        assert_eq!(grpc_status(response).await, "3"); // INVALID_ARGUMENT
        let counts = export.0.lock().unwrap();
        assert_eq!((counts.exports, counts.spans), (0, 0));
    }

    #[test]
    fn empty_summary_and_escapes_as_python_writes_them() {
        assert_eq!(
            Counts::default().summary(),
            "{\n \"by_hop\": {},\n \"by_hop_kind_name\": {},\n \"by_name\": {},\n \
             \"exports\": 0,\n \"spans\": 0\n}\n"
        );
        // python3 -c 'import json; print(json.dumps("a\"\\\n\r\t\b\f\x01\x7f~é😀"))'
        assert_eq!(
            json_string("a\"\\\n\r\t\u{8}\u{c}\u{1}\u{7f}~é😀"),
            r#""a\"\\\n\r\t\b\f\u0001\u007f~\u00e9\ud83d\ude00""#
        );
    }
}
