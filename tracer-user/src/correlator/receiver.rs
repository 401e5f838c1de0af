//! The OTLP trace receiver: gRPC (the collector protocol's generated tonic service) and
//! OTLP/HTTP (protobuf or JSON on POST /v1/traces), both on every listening port, served by
//! hyper. Accepted requests go into a bounded queue; when it is full the sender is told to
//! retry (gRPC UNAVAILABLE, HTTP 503), as the OTLP spec asks, and that is counted.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, header::CONTENT_TYPE};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use prost::Message as _;
use tokio::{net::TcpListener, sync::mpsc};

/// The largest request accepted (gRPC and HTTP alike); the collector's default is 4 MiB.
const MAX_REQUEST_BYTES: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct ReceiverStats {
    pub requests: AtomicU64,
    /// Refused because the queue was full (the sender retries).
    pub busy: AtomicU64,
    /// Undecodable, too large, or of an unsupported content type.
    pub malformed: AtomicU64,
}

#[derive(Clone)]
pub struct Ingest {
    queue: mpsc::Sender<ExportTraceServiceRequest>,
    pub stats: Arc<ReceiverStats>,
}

enum Refused {
    Busy,
}

impl Ingest {
    pub fn new(queue: mpsc::Sender<ExportTraceServiceRequest>) -> Self {
        Self {
            queue,
            stats: Arc::default(),
        }
    }

    fn accept(&self, request: ExportTraceServiceRequest) -> Result<(), Refused> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.queue.try_send(request).map_err(|_| {
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            Refused::Busy
        })
    }

    fn malformed(&self, status: StatusCode, why: String) -> Response<tonic::body::Body> {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        log::debug!("OTLP/HTTP request refused ({status}): {why}");
        reply(status, "text/plain", why.into_bytes())
    }

    /// One HTTP request of either protocol.
    async fn handle(&self, request: Request<Incoming>) -> Response<tonic::body::Body> {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("application/grpc") {
            let mut grpc =
                TraceServiceServer::new(self.clone()).max_decoding_message_size(MAX_REQUEST_BYTES);
            let Ok(response) = tower_service::Service::call(&mut grpc, request).await;
            return response;
        }
        if request.uri().path() != "/v1/traces" {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"OTLP traces: POST /v1/traces".to_vec(),
            );
        }
        if request.method() != hyper::Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", Vec::new());
        }
        let json = content_type.starts_with("application/json");
        if !json && !content_type.starts_with("application/x-protobuf") {
            return self.malformed(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content type {content_type:?}: use application/x-protobuf or application/json"
                ),
            );
        }
        let body = match Limited::new(request.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return self.malformed(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("reading the body: {e}"),
                );
            }
        };
        let decoded = if json {
            serde_json::from_slice::<ExportTraceServiceRequest>(&body).map_err(|e| e.to_string())
        } else {
            ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string())
        };
        let export = match decoded {
            Ok(export) => export,
            Err(e) => return self.malformed(StatusCode::BAD_REQUEST, format!("undecodable: {e}")),
        };
        match self.accept(export) {
            Ok(()) => {
                let response = ExportTraceServiceResponse::default();
                if json {
                    let body = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
                    reply(StatusCode::OK, "application/json", body)
                } else {
                    reply(
                        StatusCode::OK,
                        "application/x-protobuf",
                        response.encode_to_vec(),
                    )
                }
            }
            Err(Refused::Busy) => {
                let mut response = reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    b"busy, retry".to_vec(),
                );
                response.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from_static("1"),
                );
                response
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Ingest {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.accept(request.into_inner()) {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err(Refused::Busy) => Err(tonic::Status::unavailable("correlator busy, retry")),
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::new(Full::new(bytes::Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Binds `address` (an error now, not later, when it is taken).
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))
}

/// Serves connections on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, ingest: Ingest) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                log::warn!("accepting an OTLP connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let ingest = ingest.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let ingest = ingest.clone();
                async move { Ok::<_, Infallible>(ingest.handle(request).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("OTLP connection ended: {e}");
            }
        });
    }
}
