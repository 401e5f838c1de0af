#!/usr/bin/env python3
"""An OTLP/gRPC relay that puts the spans it passes on onto another host's clock.

Two agents on one machine read one kernel clock; a correlator joining them sees the same boot
id on both sides and measures the firewall's split on that shared clock. To make one of them
look like a host whose clock is off by a known amount, its agent exports through this relay:

* every span's start and end time and every event's time move by --shift-ns (signed), as
  they would on a host whose wall clock reads that much later;
* the resource attribute hoptrace.clock.boot_id becomes --boot-id (another kernel), and
  hoptrace.clock.synchronized becomes false: a clock off by the shift is not synchronized,
  and a correlator that believed it was would narrow its offset estimate by the kernel's
  maxerror, which the shift does not respect.

Everything else is passed on as received, to the OTLP/gRPC endpoint --forward-to
(host:port). A forward that fails is answered to the sender with UNAVAILABLE (its exporter
retries), never dropped silently.

Listens on 127.0.0.1 (--port, 0 = ephemeral); once it listens it prints one line
`ready grpc=<port>` to stdout, flushed. Exits when its stdin is closed, so it never outlives
the test process that started it.
"""

import argparse
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

HOST = "127.0.0.1"
BOOT_ID = "hoptrace.clock.boot_id"
SYNCHRONIZED = "hoptrace.clock.synchronized"
FORWARD_TIMEOUT_S = 10


def set_attribute(attributes, key, field, value):
    """Sets `key` to `value` in AnyValue field `field`, replacing what was there."""
    for kv in attributes:
        if kv.key == key:
            kv.value.Clear()
            setattr(kv.value, field, value)
            return
    kv = attributes.add()
    kv.key = key
    setattr(kv.value, field, value)


def shift(request, shift_ns, boot_id):
    for resource_spans in request.resource_spans:
        attributes = resource_spans.resource.attributes
        set_attribute(attributes, BOOT_ID, "string_value", boot_id)
        set_attribute(attributes, SYNCHRONIZED, "bool_value", False)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.start_time_unix_nano += shift_ns
                span.end_time_unix_nano += shift_ns
                for event in span.events:
                    event.time_unix_nano += shift_ns


class Relay(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, forward_to, shift_ns, boot_id):
        self.stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(forward_to))
        self.shift_ns = shift_ns
        self.boot_id = boot_id

    def Export(self, request, context):
        shift(request, self.shift_ns, self.boot_id)
        try:
            return self.stub.Export(request, timeout=FORWARD_TIMEOUT_S)
        except grpc.RpcError as e:
            message = f"forwarding failed: {e.code()}: {e.details()}"
            print(f"clock_shift_relay: {message}", file=sys.stderr, flush=True)
            context.abort(grpc.StatusCode.UNAVAILABLE, message)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--forward-to", required=True, help="OTLP/gRPC host:port to pass on to")
    parser.add_argument("--shift-ns", type=int, required=True,
                        help="added to every span and event time (signed)")
    parser.add_argument("--boot-id", required=True, help="the other host's boot id")
    parser.add_argument("--port", type=int, default=0, help="OTLP/gRPC port (0 = ephemeral)")
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.so_reuseport", 0)])
    relay = Relay(args.forward_to, args.shift_ns, args.boot_id)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(relay, server)
    port = server.add_insecure_port(f"{HOST}:{args.port}")
    if port == 0:
        print(f"clock_shift_relay: cannot listen on {HOST}:{args.port}", file=sys.stderr)
        return 1
    server.start()
    print(f"ready grpc={port}", flush=True)
    while sys.stdin.buffer.read(4096):
        pass
    server.stop(grace=1.0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
