#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server's pod endpoints, for the agent's end-to-end tests.

No real kube-apiserver can run on the test machines (no container runtime, no release binaries
in any reachable registry), so this serves what the agent uses, in the exact shape of the real
API (core/v1, as kube-apiserver 1.28+ answers), over HTTPS with the certificate it is given:

- GET /api/v1/pods?fieldSelector=spec.nodeName=NODE: a PodList with metadata.resourceVersion;
  pods of other nodes are filtered out as the real field selector does;
- the same with watch=true&resourceVersion=RV[&allowWatchBookmarks=true][&timeoutSeconds=N]:
  a chunked stream of newline-delimited JSON watch events (ADDED, MODIFIED, DELETED, BOOKMARK)
  after RV; an RV older than the retained history gets an ERROR event carrying the Status of
  410 Expired ("too old resource version"), then the stream ends, as the real server does;
- Authorization: Bearer TOKEN checked against the accepted token: 401 Status otherwise.

Driven through stdin, one JSON command per line:
  {"op": "add", "pod": {uid, name, namespace, node, containers: [[name, id], ...]}}
  {"op": "delete", "uid": UID}
  {"op": "token", "token": T}            accept only T from now on
  {"op": "fail", "responses": [401, 403, 500, "malformed"]}   answer the next requests so
  {"op": "expire"}                       end every watch with 410 and forget the history
  {"op": "bookmark"}                     send a BOOKMARK on every watch
Prints `LISTENING PORT`, then one JSON line per request: method, path, query, token, status,
time (monotonic seconds).
"""

import argparse
import http.server
import json
import ssl
import sys
import threading
import time
import urllib.parse

LOCK = threading.Condition()
PODS = {}  # uid -> Pod object
EVENTS = []  # (resourceVersion, type, Pod object)
STATE = {"rv": 1000, "oldest": 1000, "token": None, "fail": [], "epoch": 0}


def emit(line):
    with LOCK:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def status(code, reason, message, details=None):
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def make_pod(spec, rv):
    """A Pod as the real API returns it: full metadata, spec, and status."""
    uid, name, namespace, node = spec["uid"], spec["name"], spec["namespace"], spec["node"]
    containers = spec.get("containers", [])
    started = "2025-06-01T10:00:00Z"
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "generateName": name.rsplit("-", 1)[0] + "-",
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": str(rv),
            "creationTimestamp": started,
            "labels": {"app": name.rsplit("-", 1)[0], "pod-template-hash": "7d4b9c"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": name.rsplit("-", 1)[0] + "-7d4b9c",
                    "uid": "0f0f0f0f-0000-4000-8000-000000000001",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": started,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}}},
                    "subresource": "status",
                }
            ],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "default",
            "restartPolicy": "Always",
            "containers": [
                {"name": c, "image": "python:3", "resources": {}, "imagePullPolicy": "IfNotPresent"}
                for c, _ in containers
            ],
        },
        "status": {
            "phase": "Running",
            "hostIP": "10.10.2.2",
            "podIP": "10.244.1.7",
            "podIPs": [{"ip": "10.244.1.7"}],
            "startTime": started,
            "qosClass": "BestEffort",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": started}],
            "containerStatuses": [
                {
                    "name": c,
                    "state": {"running": {"startedAt": started}},
                    "lastState": {},
                    "ready": True,
                    "restartCount": 0,
                    "image": "docker.io/library/python:3",
                    "imageID": "docker.io/library/python@sha256:" + "0" * 64,
                    "containerID": "containerd://" + cid,
                    "started": True,
                }
                for c, cid in containers
            ],
        },
    }


def change(kind, pod):
    """Records a change at the next resourceVersion and wakes the watchers. LOCK held."""
    STATE["rv"] += 1
    pod["metadata"]["resourceVersion"] = str(STATE["rv"])
    EVENTS.append((STATE["rv"], kind, pod))
    LOCK.notify_all()


def command(line):
    cmd = json.loads(line)
    op = cmd["op"]
    with LOCK:
        if op == "add":
            kind = "MODIFIED" if cmd["pod"]["uid"] in PODS else "ADDED"
            pod = make_pod(cmd["pod"], 0)
            PODS[cmd["pod"]["uid"]] = pod
            change(kind, pod)
        elif op == "delete":
            pod = PODS.pop(cmd["uid"])
            change("DELETED", pod)
        elif op == "token":
            STATE["token"] = cmd["token"]
        elif op == "fail":
            STATE["fail"].extend(cmd["responses"])
        elif op == "expire":
            # Compaction: every version up to now is gone; open watches end with 410.
            STATE["oldest"] = STATE["rv"]
            STATE["epoch"] += 1
            EVENTS.clear()
            LOCK.notify_all()
        elif op == "bookmark":
            STATE["bookmark"] = STATE.get("bookmark", 0) + 1
            LOCK.notify_all()
        else:
            raise ValueError(f"unknown op {op!r}")


def node_of(query):
    selector = query.get("fieldSelector", [""])[0]
    for term in selector.split(","):
        if term.startswith("spec.nodeName="):
            return term.split("=", 1)[1]
    return None


def selected(pod, node):
    return node is None or pod["spec"]["nodeName"] == node


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        watch = query.get("watch", ["false"])[0] in ("true", "1")
        record = {
            "method": "GET",
            "path": url.path,
            "query": {k: v[0] for k, v in query.items()},
            "token": token,
            "watch": watch,
            "time": time.monotonic(),
        }
        with LOCK:
            injected = STATE["fail"].pop(0) if STATE["fail"] else None
            accepted = STATE["token"]
        if url.path != "/api/v1/pods":
            record["status"] = 404
            emit(record)
            return self.reply(404, status(404, "NotFound", "the server could not find the requested resource"))
        if token is None or token != accepted:
            record["status"] = 401
            emit(record)
            return self.reply(401, status(401, "Unauthorized", "Unauthorized"))
        if isinstance(injected, int):
            record["status"] = injected
            emit(record)
            if injected == 403:
                message = ('pods is forbidden: User "system:serviceaccount:hoptrace:hoptrace-agent" '
                           'cannot list resource "pods" in API group "" at the cluster scope')
                return self.reply(403, status(403, "Forbidden", message, {"kind": "pods"}))
            if injected == 401:
                return self.reply(401, status(401, "Unauthorized", "Unauthorized"))
            return self.reply(injected, status(injected, "InternalError", "etcdserver: request timed out"))
        node = node_of(query)
        if injected == "malformed":
            record["status"] = 200
            record["malformed"] = True
            emit(record)
            return self.reply(200, b'{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":')
        if not watch:
            with LOCK:
                items = [p for p in PODS.values() if selected(p, node)]
                body = {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(STATE["rv"])},
                    "items": items,
                }
            record["status"] = 200
            record["resourceVersion"] = body["metadata"]["resourceVersion"]
            emit(record)
            return self.reply(200, body)
        self.watch(query, node, record)

    def watch(self, query, node, record):
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        timeout = float(query.get("timeoutSeconds", ["1800"])[0])
        bookmarks = query.get("allowWatchBookmarks", ["false"])[0] == "true"
        deadline = time.monotonic() + timeout
        record["status"] = 200
        emit(record)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        with LOCK:
            epoch = STATE["epoch"]
            bookmark_seen = STATE.get("bookmark", 0)
            gone = since < STATE["oldest"]
        try:
            if gone:
                raise Expired()
            while time.monotonic() < deadline:
                with LOCK:
                    LOCK.wait_for(
                        lambda: STATE["epoch"] != epoch
                        or STATE.get("bookmark", 0) != bookmark_seen
                        or any(rv > since for rv, _, _ in EVENTS),
                        timeout=max(0.0, min(1.0, deadline - time.monotonic())),
                    )
                    if STATE["epoch"] != epoch:
                        raise Expired()
                    pending = [(rv, k, p) for rv, k, p in EVENTS if rv > since]
                    want_bookmark = STATE.get("bookmark", 0) != bookmark_seen
                    bookmark_seen = STATE.get("bookmark", 0)
                    current = STATE["rv"]
                for rv, kind, pod in pending:
                    since = rv
                    if selected(pod, node):
                        self.chunk(json.dumps({"type": kind, "object": pod}).encode() + b"\n")
                if want_bookmark and bookmarks:
                    since = max(since, current)
                    mark = {"kind": "Pod", "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(since), "creationTimestamp": None}}
                    self.chunk(json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n")
        except Expired:
            with LOCK:
                oldest = STATE["oldest"]
            message = f"too old resource version: {since} ({oldest + 1})"
            error = {"type": "ERROR", "object": status(410, "Expired", message)}
            self.chunk(json.dumps(error).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return
        try:
            self.chunk(b"")
        except OSError:
            pass
        self.close_connection = True


class Expired(Exception):
    pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, context):
        self.context = context
        super().__init__(address, Handler)

    def get_request(self):
        sock, address = self.socket.accept()
        # The handshake happens in the handler's thread, on first read.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request, client_address):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    STATE["token"] = args.token
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server = Server(("127.0.0.1", 0), context)
    emit_port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"LISTENING {emit_port}", flush=True)
    for line in sys.stdin:
        if line.strip():
            command(line)
    server.shutdown()


if __name__ == "__main__":
    main()
