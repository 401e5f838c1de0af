//! Sends encoded `ExportTraceServiceRequest`s to an OTLP receiver: gRPC over tonic's channel,
//! or HTTP (protobuf, or JSON transcoded from it) over hyper, as the OTLP exporter spec says
//! (signal path `/v1/traces` already in the endpoint, headers from
//! OTEL_EXPORTER_OTLP_[TRACES_]HEADERS, the export timeout per request).
//!
//! The client is cheap to clone: several batches can be in flight at once.

use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, Endpoint},
};

use super::Protocol;

const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[derive(Clone)]
pub struct OtlpClient {
    transport: Transport,
    headers: Vec<(String, String)>,
    timeout: Duration,
}

#[derive(Clone)]
enum Transport {
    Grpc(tonic::client::Grpc<Channel>),
    Http {
        /// Boxed: with hyper's HTTP/2 (which the correlator's receiver needs) the client's
        /// settings are far larger than the gRPC channel.
        client: Box<HyperClient<HttpConnector, Full<Bytes>>>,
        url: hyper::Uri,
        json: bool,
    },
}

impl OtlpClient {
    /// `endpoint` is the full traces URL (gRPC: the base URL); `headers` as the spec's
    /// `key=value,key2=value2` list. Connects lazily: a receiver that is not up yet is an
    /// export failure later, not a start-up error.
    pub fn new(
        endpoint: &str,
        protocol: Protocol,
        headers: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let headers = parse_headers(headers.unwrap_or_default())?;
        let transport = match protocol {
            Protocol::Grpc => {
                let channel = Endpoint::from_shared(endpoint.to_owned())
                    .map_err(|e| anyhow::anyhow!("invalid OTLP endpoint {endpoint:?}: {e}"))?
                    .timeout(timeout)
                    .connect_timeout(timeout)
                    .connect_lazy();
                Transport::Grpc(tonic::client::Grpc::new(channel))
            }
            Protocol::HttpProtobuf | Protocol::HttpJson => {
                let url: hyper::Uri = endpoint
                    .parse()
                    .map_err(|e| anyhow::anyhow!("invalid OTLP endpoint {endpoint:?}: {e}"))?;
                if url.scheme_str() != Some("http") {
                    anyhow::bail!(
                        "OTLP endpoint {endpoint:?}: only http:// is supported (put TLS in a local collector)"
                    );
                }
                let client = Box::new(HyperClient::builder(TokioExecutor::new()).build_http());
                Transport::Http {
                    client,
                    url,
                    json: protocol == Protocol::HttpJson,
                }
            }
        };
        Ok(Self {
            transport,
            headers,
            timeout,
        })
    }

    /// Sends one request, retrying what the OTLP spec calls transient failures (the receiver
    /// unreachable or overloaded, a timeout) with exponential backoff for up to
    /// [`RETRY_FOR`]; the error says why it was finally not accepted. While a batch retries it
    /// holds its in-flight slot, so an outage backs the queue up (bounded, drops counted)
    /// instead of throwing each batch away at once, and what waits is delivered when the
    /// collector returns.
    /// `on_retry` hears each transient failure that will be retried.
    pub async fn export(&mut self, request: Bytes, on_retry: impl Fn(&str)) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let outcome = tokio::time::timeout(self.timeout, self.send(request.clone())).await;
            let failure = match outcome {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failure)) => failure,
                Err(_) => Failure::transient(format!("timed out after {:?}", self.timeout)),
            };
            if !failure.transient || started.elapsed() + backoff > RETRY_FOR {
                return Err(failure.message);
            }
            on_retry(&failure.message);
            // Jitter keeps agents that lost the same collector from returning in lockstep.
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.2);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn send(&mut self, request: Bytes) -> Result<(), Failure> {
        match &mut self.transport {
            Transport::Grpc(grpc) => {
                let mut message = tonic::Request::new(request);
                *message.metadata_mut() =
                    grpc_metadata(&self.headers).map_err(Failure::permanent)?;
                grpc.ready()
                    .await
                    .map_err(|e| Failure::transient(format!("gRPC channel: {e}")))?;
                let path = http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH);
                let response = grpc
                    .unary(message, path, RawCodec)
                    .await
                    .map_err(|status| Failure {
                        transient: grpc_code_is_transient(status.code()),
                        message: format!("gRPC {status}"),
                    })?;
                partial_success(&response.into_inner()).map_err(Failure::permanent)
            }
            Transport::Http { client, url, json } => {
                let (body, content_type) = if *json {
                    (
                        Bytes::from(transcode_to_json(&request).map_err(Failure::permanent)?),
                        "application/json",
                    )
                } else {
                    (request, "application/x-protobuf")
                };
                let mut builder = hyper::Request::post(url.clone())
                    .header(hyper::header::CONTENT_TYPE, content_type);
                for (key, value) in &self.headers {
                    builder = builder.header(key, value);
                }
                let request = builder
                    .body(Full::new(body))
                    .map_err(|e| Failure::permanent(e.to_string()))?;
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| Failure::transient(format!("HTTP: {e}")))?;
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Failure::transient(format!("HTTP body: {e}")))?
                    .to_bytes();
                if !status.is_success() {
                    return Err(Failure {
                        // OTLP/HTTP: retryable are 429, 502, 503 and 504.
                        transient: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                        message: format!(
                            "HTTP {status}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(200)])
                        ),
                    });
                }
                if *json {
                    return Ok(());
                }
                partial_success(&body).map_err(Failure::permanent)
            }
        }
    }
}

/// How long a batch keeps retrying, and the backoff between attempts.
const RETRY_FOR: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why an attempt failed, and whether the OTLP spec says to retry it.
struct Failure {
    transient: bool,
    message: String,
}

impl Failure {
    fn transient(message: String) -> Self {
        Self {
            transient: true,
            message,
        }
    }

    fn permanent(message: String) -> Self {
        Self {
            transient: false,
            message,
        }
    }
}

/// The gRPC codes the OTLP exporter spec lists as retryable (RESOURCE_EXHAUSTED only with
/// retry info, which receivers send when they are merely busy: treated as retryable).
fn grpc_code_is_transient(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// A receiver may accept a request but reject some spans (OTLP partial success).
fn partial_success(response: &[u8]) -> Result<(), String> {
    let Ok(response) = ExportTraceServiceResponse::decode(response) else {
        return Ok(());
    };
    match response.partial_success {
        Some(partial) if partial.rejected_spans > 0 => Err(format!(
            "receiver rejected {} spans: {}",
            partial.rejected_spans, partial.error_message
        )),
        _ => Ok(()),
    }
}

/// OTLP/JSON (hex ids, as the spec says) from the encoded protobuf request: JSON is for
/// debugging receivers, so the round trip through the generated types is fine there.
fn transcode_to_json(request: &[u8]) -> Result<Vec<u8>, String> {
    let request = ExportTraceServiceRequest::decode(request)
        .map_err(|e| format!("re-decoding the request: {e}"))?;
    serde_json::to_vec(&request).map_err(|e| format!("encoding JSON: {e}"))
}

/// `key=value,key2=value2`, values percent-decoded (OTLP exporter spec, W3C Baggage format).
fn parse_headers(list: &str) -> anyhow::Result<Vec<(String, String)>> {
    list.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("OTLP header {item:?} is not key=value"))?;
            let value = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8()
                .map_err(|e| anyhow::anyhow!("OTLP header {key:?}: {e}"))?;
            Ok((key.trim().to_ascii_lowercase(), value.into_owned()))
        })
        .collect()
}

fn grpc_metadata(headers: &[(String, String)]) -> Result<MetadataMap, String> {
    let mut map = MetadataMap::new();
    for (key, value) in headers {
        let key =
            MetadataKey::from_bytes(key.as_bytes()).map_err(|e| format!("header {key:?}: {e}"))?;
        let value = MetadataValue::try_from(value.as_str())
            .map_err(|e| format!("header value {value:?}: {e}"))?;
        map.insert(key, value);
    }
    Ok(map)
}

/// gRPC with the message already encoded: bytes out, the response's bytes in.
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_the_spec_list_format() {
        let parsed = parse_headers("api-key=secret%20value, X-Tenant = lab1 ,").unwrap();
        assert_eq!(
            parsed,
            [
                ("api-key".to_owned(), "secret value".to_owned()),
                ("x-tenant".to_owned(), "lab1".to_owned())
            ]
        );
        assert!(parse_headers("no-equals-sign").is_err());
        assert!(parse_headers("").unwrap().is_empty());
    }
}
