#!/usr/bin/env python3
"""A real OTLP trace receiver for hoptrace's end-to-end tests.

Built on the official generated protos (PyPI opentelemetry-proto) and grpcio:

* OTLP/gRPC: opentelemetry.proto.collector.trace.v1.TraceService/Export
* OTLP/HTTP: POST /v1/traces with Content-Type application/x-protobuf or
  application/json (OTLP/JSON: protobuf JSON mapping, except that trace and
  span ids are hex strings instead of base64), optionally gzip-encoded.

Both listen on 127.0.0.1 (port 0 = ephemeral). Once both listen, one line
`ready grpc=<port> http=<port>` is printed to stdout and flushed.

Every received span is appended as one JSON line to --out (flushed before the
export is answered, so a client whose export returned finds its spans there):

  trace_id, span_id, parent_span_id  lowercase hex, "" when absent
  trace_state, name, kind (int, SpanKind enum value), flags
  start_time_unix_nano, end_time_unix_nano  integers
  status {code (int, 0 unset / 1 ok / 2 error), message}
  attributes  dict; values are str/int/float/bool/list/dict/None; bytes are
              base64 strings; non-finite doubles are "NaN"/"Infinity"/"-Infinity"
  events [{name, time_unix_nano, attributes}]
  links [{trace_id, span_id, trace_state, attributes}]
  resource  dict of resource attributes
  scope_name, scope_version
  transport  "grpc" | "http-protobuf" | "http-json"

With --count-only, --out is instead a small JSON summary, rewritten (atomically:
temp file + rename) every second and at exit, and no span is written one by one
(at tens of thousands of spans per second the JSON lines cost more than the
tracer being measured). Sorted keys, indent 1, so one count per line:

  spans, exports      accepted spans and accepted export requests
  by_name             {span name: count}
  by_hop              {attribute hoptrace.hop ("-" when absent): count}
  by_hop_kind_name    {"<hop>|<KIND>|<name>": count}, KIND one of UNSPECIFIED,
                      INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER

Exports are then not logged one by one on stderr either.

With --requests-out, every export request (also failed ones) is appended as
one JSON line: {transport, spans, result ("ok" | "unavailable" | "bad_request"),
time_unix_nano}.

Fault injection: --fail-first N answers the first N well-formed exports (over
either transport, counted together) with gRPC UNAVAILABLE / HTTP 503 and does
not record their spans.

Exits cleanly (exit status 0) on SIGTERM or SIGINT, and with
--exit-on-stdin-eof when its stdin is closed (so it never outlives a test
process that died without cleaning up).
"""

import argparse
import base64
import gzip
import json
import math
import os
import signal
import sys
import threading
import time
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

HOST = "127.0.0.1"
TRACES_PATH = "/v1/traces"
MAX_BODY = 64 * 1024 * 1024


class BadRequest(Exception):
    pass


# ---------------------------------------------------------------------------
# Conversion of the protobuf messages to the JSON lines written to --out.


def any_value(v):
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        d = v.double_value
        if math.isnan(d):
            return "NaN"
        if math.isinf(d):
            return "Infinity" if d > 0 else "-Infinity"
        return d
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    return None


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def span_record(span, resource, scope, transport):
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "trace_state": span.trace_state,
        "name": span.name,
        "kind": int(span.kind),
        "flags": span.flags,
        "start_time_unix_nano": span.start_time_unix_nano,
        "end_time_unix_nano": span.end_time_unix_nano,
        "status": {"code": int(span.status.code), "message": span.status.message},
        "attributes": attributes(span.attributes),
        "events": [
            {
                "name": e.name,
                "time_unix_nano": e.time_unix_nano,
                "attributes": attributes(e.attributes),
            }
            for e in span.events
        ],
        "links": [
            {
                "trace_id": link.trace_id.hex(),
                "span_id": link.span_id.hex(),
                "trace_state": link.trace_state,
                "attributes": attributes(link.attributes),
            }
            for link in span.links
        ],
        "resource": resource,
        "scope_name": scope.name,
        "scope_version": scope.version,
        "transport": transport,
    }


def span_lines(request, transport):
    lines = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                record = span_record(span, resource, ss.scope, transport)
                lines.append(json.dumps(record, separators=(",", ":"), allow_nan=False))
    return lines


KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER",
              5: "CONSUMER"}


def count_spans(request, counts):
    """Adds the request's spans to counts {(hop, kind, name): n}; returns how many."""
    n = 0
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                hop = "-"
                for kv in span.attributes:
                    if kv.key == "hoptrace.hop":
                        hop = kv.value.string_value
                        break
                key = (hop, span.kind, span.name)
                counts[key] = counts.get(key, 0) + 1
                n += 1
    return n


def span_count(request):
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


# ---------------------------------------------------------------------------
# OTLP/JSON: ids are hex, protobuf's JSON mapping wants base64 for bytes.

ID_HEX_LEN = {"traceId": 32, "trace_id": 32, "spanId": 16, "span_id": 16,
              "parentSpanId": 16, "parent_span_id": 16}


def hex_ids_to_base64(obj):
    """Rewrite the hex ids of a span or link in place. OTLP/JSON requires
    hex, so anything else (base64 included) is a bad request."""
    for key, hexlen in ID_HEX_LEN.items():
        if key not in obj:
            continue
        value = obj[key]
        if value == "" or value is None:
            continue
        if not isinstance(value, str) or len(value) != hexlen:
            raise BadRequest(f"{key} must be {hexlen} hex digits, got {value!r}")
        try:
            raw = bytes.fromhex(value)
        except ValueError as e:
            raise BadRequest(f"{key} must be {hexlen} hex digits, got {value!r}") from e
        obj[key] = base64.b64encode(raw).decode("ascii")


def otlp_json_to_request(body):
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadRequest("JSON body is not an object")
    for rs in _list(doc, "resourceSpans", "resource_spans"):
        for ss in _list(rs, "scopeSpans", "scope_spans"):
            for span in _list(ss, "spans"):
                if not isinstance(span, dict):
                    continue
                hex_ids_to_base64(span)
                for link in _list(span, "links"):
                    if isinstance(link, dict):
                        hex_ids_to_base64(link)
    request = trace_service_pb2.ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except Exception as e:  # ParseError, and TypeError/ValueError for odd shapes
        raise BadRequest(f"invalid OTLP/JSON: {e}") from e
    return request


def _list(obj, *keys):
    if not isinstance(obj, dict):
        return []
    for key in keys:
        value = obj.get(key)
        if isinstance(value, list):
            return value
    return []


# ---------------------------------------------------------------------------
# The sink shared by both transports.


class Sink:
    def __init__(self, out_path, requests_path, fail_first):
        self.lock = threading.Lock()
        self.out = open(out_path, "w", encoding="utf-8")
        self.requests = open(requests_path, "w", encoding="utf-8") if requests_path else None
        self.fail_remaining = fail_first
        self.closed = False

    def export(self, request, transport):
        """Returns True when accepted, False when it must be answered UNAVAILABLE."""
        lines = span_lines(request, transport)
        with self.lock:
            accept = self.fail_remaining <= 0
            if not accept:
                self.fail_remaining -= 1
            if accept and lines and not self.closed:
                self.out.write("\n".join(lines) + "\n")
                self.out.flush()
            self._log(transport, len(lines), "ok" if accept else "unavailable")
        log(f"export transport={transport} spans={len(lines)} "
            f"result={'ok' if accept else 'unavailable'}")
        return accept

    def bad_request(self, transport, why):
        with self.lock:
            self._log(transport, 0, "bad_request")
        log(f"export transport={transport} result=bad_request: {why}")

    def _log(self, transport, spans, result):
        if self.requests is None or self.closed:
            return
        self.requests.write(json.dumps({
            "transport": transport,
            "spans": spans,
            "result": result,
            "time_unix_nano": time.time_ns(),
        }) + "\n")
        self.requests.flush()

    def close(self):
        with self.lock:
            self.closed = True
            self.out.close()
            if self.requests is not None:
                self.requests.close()


class CountSink(Sink):
    """--count-only: counts spans instead of writing them; see the module docstring."""

    def __init__(self, out_path, requests_path, fail_first):
        self.out_path = out_path
        self.lock = threading.Lock()
        self.requests = open(requests_path, "w", encoding="utf-8") if requests_path else None
        self.fail_remaining = fail_first
        self.closed = False
        self.counts = {}
        self.spans = 0
        self.exports = 0
        self.dirty = True
        self.write_summary()
        self.stop = threading.Event()
        self.writer = threading.Thread(target=self._write_every_second, name="summary",
                                       daemon=True)
        self.writer.start()

    def export(self, request, transport):
        with self.lock:
            accept = self.fail_remaining <= 0
            if not accept:
                self.fail_remaining -= 1
            spans = 0
            if accept and not self.closed:
                # Under the lock: the gRPC server runs exports on several threads.
                spans = count_spans(request, self.counts)
                self.spans += spans
                self.exports += 1
                self.dirty = True
            else:
                spans = span_count(request)
            self._log(transport, spans, "ok" if accept else "unavailable")
        if not accept:
            log(f"export transport={transport} spans={spans} result=unavailable")
        return accept

    def summary(self):
        by_name, by_hop, by_hop_kind_name = {}, {}, {}
        for (hop, kind, name), n in self.counts.items():
            by_name[name] = by_name.get(name, 0) + n
            by_hop[hop] = by_hop.get(hop, 0) + n
            key = f"{hop}|{KIND_NAMES.get(kind, str(kind))}|{name}"
            by_hop_kind_name[key] = by_hop_kind_name.get(key, 0) + n
        return {"spans": self.spans, "exports": self.exports, "by_name": by_name,
                "by_hop": by_hop, "by_hop_kind_name": by_hop_kind_name}

    def write_summary(self):
        with self.lock:
            if not self.dirty:
                return
            doc = self.summary()
            self.dirty = False
        tmp = self.out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.out_path)

    def _write_every_second(self):
        while not self.stop.wait(1.0):
            self.write_summary()

    def close(self):
        self.stop.set()
        self.writer.join()
        self.write_summary()
        with self.lock:
            self.closed = True
            if self.requests is not None:
                self.requests.close()


def log(msg):
    print(f"otlp_receiver: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# OTLP/gRPC


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        if not self.sink.export(request, "grpc"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated outage (--fail-first)")
        return trace_service_pb2.ExportTraceServiceResponse()


# ---------------------------------------------------------------------------
# OTLP/HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hoptrace-otlp-receiver"
    sink = None  # set on the subclass made in main()

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        pass

    def do_POST(self):
        try:
            body = self._read_body()
        except BadRequest as e:
            self.close_connection = True
            self._reply(400, "text/plain", str(e).encode())
            return
        path = self.path.split("?", 1)[0]
        if path != TRACES_PATH:
            self._reply(404, "text/plain", b"only POST /v1/traces is served\n")
            return
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype == "application/x-protobuf":
            transport = "http-protobuf"
        elif ctype == "application/json":
            transport = "http-json"
        else:
            self._reply(415, "text/plain", b"use application/x-protobuf or application/json\n")
            return
        try:
            body = self._decode(body)
            if transport == "http-json":
                request = otlp_json_to_request(body)
            else:
                request = trace_service_pb2.ExportTraceServiceRequest()
                try:
                    request.ParseFromString(body)
                except Exception as e:  # protobuf's DecodeError and friends
                    raise BadRequest(f"invalid protobuf: {e}") from e
        except BadRequest as e:
            self.sink.bad_request(transport, e)
            self._reply(400, "text/plain", f"{e}\n".encode())
            return
        if not self.sink.export(request, transport):
            self._reply(503, "text/plain", b"simulated outage (--fail-first)\n")
            return
        response = trace_service_pb2.ExportTraceServiceResponse()
        if transport == "http-json":
            self._reply(200, "application/json", b"{}")
        else:
            self._reply(200, "application/x-protobuf", response.SerializeToString())

    def do_GET(self):
        self._reply(405, "text/plain", b"only POST /v1/traces is served\n")

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError as e:
                    raise BadRequest("bad chunk size") from e
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise BadRequest("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError as e:
            raise BadRequest("bad Content-Length") from e
        if length < 0 or length > MAX_BODY:
            raise BadRequest("bad Content-Length")
        return self.rfile.read(length)

    def _decode(self, body):
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                return gzip.decompress(body)
            if encoding == "deflate":
                return zlib.decompress(body)
        except (OSError, EOFError, zlib.error) as e:
            raise BadRequest(f"cannot decode {encoding} body: {e}") from e
        if encoding not in ("", "identity"):
            raise BadRequest(f"unsupported Content-Encoding {encoding}")
        return body

    def _reply(self, code, ctype, payload):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


class HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


# ---------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", required=True,
                        help="JSON-lines file receiving one line per span (with --count-only: "
                             "the JSON summary)")
    parser.add_argument("--count-only", action="store_true",
                        help="count spans by name and hoptrace.hop into --out (rewritten every "
                             "second and at exit) instead of writing each span")
    parser.add_argument("--grpc-port", type=int, default=0, help="OTLP/gRPC port (0 = ephemeral)")
    parser.add_argument("--http-port", type=int, default=0, help="OTLP/HTTP port (0 = ephemeral)")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N",
                        help="answer the first N exports with UNAVAILABLE / HTTP 503")
    parser.add_argument("--requests-out", help="JSON-lines file receiving one line per export request")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="exit when stdin is closed (e.g. the parent died)")
    args = parser.parse_args()

    sink = (CountSink if args.count_only else Sink)(args.out, args.requests_out, args.fail_first)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                              options=[("grpc.so_reuseport", 0)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(sink), grpc_server)
    grpc_port = grpc_server.add_insecure_port(f"{HOST}:{args.grpc_port}")
    if grpc_port == 0:
        log(f"cannot listen for gRPC on {HOST}:{args.grpc_port}")
        return 1
    grpc_server.start()

    handler = type("BoundHandler", (Handler,), {"sink": sink})
    try:
        httpd = HttpServer((HOST, args.http_port), handler)
    except OSError as e:
        log(f"cannot listen for HTTP on {HOST}:{args.http_port}: {e}")
        grpc_server.stop(None)
        return 1
    http_port = httpd.server_address[1]
    http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                   name="otlp-http", daemon=True)
    http_thread.start()

    if args.exit_on_stdin_eof:
        def watch_stdin():
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            except (OSError, ValueError):
                pass
            stop.set()

        threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()

    print(f"ready grpc={grpc_port} http={http_port}", flush=True)

    while not stop.wait(0.2):
        pass

    httpd.shutdown()
    httpd.server_close()
    grpc_server.stop(grace=1.0).wait()
    sink.close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
