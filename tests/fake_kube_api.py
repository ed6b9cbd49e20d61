"""A small Kubernetes API server on loopback, speaking the real REST protocol, for launcher tests.

It keeps Jobs, Services and Pods in memory with a global resourceVersion and an event log, and
serves create / list / watch / delete / merge patch (Kueue admits a Job by patching `spec.suspend`)
the way the API server does: label selectors, watches that resume from a resourceVersion, BOOKMARK
events, 410 Gone for compacted versions (on the request or in an open stream), ownerReference
garbage collection, Status bodies for errors. Tests drive it (`set_job_status`, `add_pod`, `expire`,
`bookmark`, `end_watches`, `fail`) and read what it got (`requests`, `verbs`). kmock (PyPI) does not
fit: its emulator is asyncio-only and has no resourceVersion ordering, label selectors, bookmarks or
410 semantics, so this fake is smaller than the code needed to add them. `Events` collects what a
launcher reports, for waiting on it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/v1)/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?$")
_KINDS = {"jobs": ("batch/v1", "Job"), "services": ("v1", "Service"), "pods": ("v1", "Pod")}


@dataclass
class Recorded:
    method: str
    group: str
    resource: str
    name: str | None
    query: dict[str, str]
    body: Any
    status: int = 0

    @property
    def verb(self) -> str:
        if self.method == "POST":
            return "create"
        if self.method == "DELETE":
            return "delete"
        if self.method == "PATCH":
            return "patch"
        if self.query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if self.name else "list"


@dataclass
class _Fault:
    method: str
    resource: str
    status: int
    times: int
    headers: dict[str, str] = field(default_factory=dict)


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k` (exists), comma-separated."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Apply a JSON merge patch to `target` in place: null deletes a key, objects merge, the rest replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = json.loads(json.dumps(value))


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class Events:
    """Collects a launcher's events from its watch thread; `wait_for` blocks until one matches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list = []

    def __call__(self, event: Any) -> None:
        with self._cond:
            self.items.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: any(predicate(e) for e in self.items), timeout=timeout):
                raise AssertionError(f"no matching event in {self.items}")
            return next(e for e in self.items if predicate(e))


class FakeKubeApi:
    """The fake server; `url` is its base URL. Thread-safe: one condition guards all state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._version = 0
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []  # (version, resource, type, object)
        self._compacted = 0  # watches from an older version get 410 Gone
        self._epoch = 0  # bumped by end_watches/expire: open streams end
        self._gone_epoch = -1  # open streams of an epoch before this one get an ERROR 410 first
        self._faults: list[_Fault] = []
        self._closing = False
        self.requests: list[Recorded] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"api": self}))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # --- test controls ---------------------------------------------------------------------------

    def fail(self, method: str, resource: str, status: int, times: int = 1,
             headers: dict[str, str] | None = None) -> None:
        """The next `times` `method` requests on `resource` get `status` (with `headers`)."""
        with self._cond:
            self._faults.append(_Fault(method, resource, status, times, headers or {}))

    def set_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with self._cond:
            job = self._objects[("jobs", namespace, name)]
            job["status"] = status
            self._record_event("jobs", "MODIFIED", job)

    def add_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        with self._cond:
            pod["metadata"].setdefault("namespace", namespace)
            self._store("pods", pod)

    def add_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """A Job created by someone else (e.g. before a service restart)."""
        with self._cond:
            return self._store("jobs", job)

    def delete_now(self, resource: str, namespace: str, name: str) -> None:
        with self._cond:
            self._remove(resource, namespace, name)

    def expire(self) -> int:
        """Compact the event log: open watches get ERROR 410, older versions are Gone. Returns the version."""
        with self._cond:
            self._compacted = self._version + 1
            self._gone_epoch = self._epoch + 1
            self._epoch += 1
            self._cond.notify_all()
            return self._version

    def bookmark(self) -> str:
        """Advance the version (as other objects' changes do) and send a BOOKMARK to open watches."""
        with self._cond:
            self._version += 1
            marker = {"kind": "Job", "apiVersion": "batch/v1", "metadata": {"resourceVersion": str(self._version)}}
            self._events.append((self._version, "jobs", "BOOKMARK", marker))
            self._cond.notify_all()
            return str(self._version)

    def end_watches(self) -> None:
        """End every open watch as a server-side timeout would."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    def objects(self, resource: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(json.dumps(o)) for (r, _, _), o in self._objects.items() if r == resource]

    def verbs(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource, verb) of every request received, as RBAC names them."""
        with self._cond:
            return {(r.group, r.resource, r.verb) for r in self.requests}

    def wait_for_requests(self, predicate, timeout: float = 10.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (found := [r for r in self.requests if predicate(r)]):
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("no matching request")
            return found

    # --- state (callers hold the condition) ------------------------------------------------------

    def _store(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        self._version += 1
        api_version, kind = _KINDS[resource]
        obj.update(apiVersion=api_version, kind=kind)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(self._version), generation=1,
                    creationTimestamp="2025-01-01T00:00:00Z")
        if resource == "jobs":
            obj.setdefault("status", {})
        self._objects[(resource, meta["namespace"], meta["name"])] = obj
        self._events.append((self._version, resource, "ADDED", json.loads(json.dumps(obj))))
        self._cond.notify_all()
        return obj

    def _record_event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        self._events.append((self._version, resource, kind, json.loads(json.dumps(obj))))
        self._cond.notify_all()

    def _remove(self, resource: str, namespace: str, name: str, foreground: bool = False) -> dict[str, Any]:
        obj = self._objects[(resource, namespace, name)]
        if foreground:  # the object stays, marked, until its dependents are gone
            obj["metadata"].update(deletionTimestamp="2025-01-01T00:01:00Z", finalizers=["foregroundDeletion"])
            self._record_event(resource, "MODIFIED", obj)
        uid = obj["metadata"]["uid"]
        for key, other in list(self._objects.items()):  # garbage collection of owned objects
            owners = other["metadata"].get("ownerReferences") or []
            job_label = other["metadata"].get("labels", {}).get("batch.kubernetes.io/job-name")
            if any(o["uid"] == uid for o in owners) or (resource == "jobs" and job_label == name):
                self._remove(*key)
        del self._objects[(resource, namespace, name)]
        self._record_event(resource, "DELETED", obj)
        return obj

    def _handle(self, request: Recorded, namespace: str, params: dict[str, str]) -> tuple[int, Any, dict]:
        with self._cond:
            status, payload, headers = self._answer(request, namespace, params)
            return status, json.loads(json.dumps(payload)), headers

    def _answer(self, request: Recorded, namespace: str, params: dict[str, str]) -> tuple[int, Any, dict]:
        """Route one non-watch request (caller holds the condition)."""
        self.requests.append(request)
        self._cond.notify_all()
        for fault in self._faults:
            if fault.times > 0 and fault.method == request.method and fault.resource == request.resource:
                fault.times -= 1
                return fault.status, _status(fault.status, "Injected", "injected fault"), fault.headers
        key = (request.resource, namespace, request.name or "")
        if request.method == "POST":
            obj = json.loads(json.dumps(request.body))  # the recorded body stays as sent
            obj["metadata"]["namespace"] = namespace
            if (request.resource, namespace, obj["metadata"]["name"]) in self._objects:
                return 409, _status(409, "AlreadyExists", f"{request.resource} "
                                    f"\"{obj['metadata']['name']}\" already exists"), {}
            return 201, self._store(request.resource, obj), {}
        if request.method == "PATCH":
            return self._patch(request, key)
        if request.method == "DELETE":
            if key not in self._objects:
                return 404, _status(404, "NotFound", f"{request.resource} \"{request.name}\" not found"), {}
            foreground = params.get("propagationPolicy") == "Foreground"
            return 200, self._remove(*key, foreground=foreground), {}
        if request.name:
            if key not in self._objects:
                return 404, _status(404, "NotFound", f"{request.resource} \"{request.name}\" not found"), {}
            return 200, self._objects[key], {}
        selector = params.get("labelSelector", "")
        items = [o for (r, ns, _), o in sorted(self._objects.items())
                 if r == request.resource and ns == namespace and selector_matches(selector, o["metadata"].get(
                     "labels", {}))]
        api_version, kind = _KINDS[request.resource]
        return 200, {"kind": f"{kind}List", "apiVersion": api_version,
                     "metadata": {"resourceVersion": str(self._version)}, "items": items}, {}

    def _patch(self, request: Recorded, key: tuple[str, str, str]) -> tuple[int, Any, dict]:
        """A merge patch (RFC 7386; a strategic merge patch is one for the scalar fields tests patch)."""
        if key not in self._objects:
            return 404, _status(404, "NotFound", f"{request.resource} \"{request.name}\" not found"), {}
        if not isinstance(request.body, dict):
            return 415, _status(415, "UnsupportedMediaType", "only merge patches (objects) are supported"), {}
        obj = self._objects[key]
        _merge(obj, request.body)
        if "spec" in request.body:
            obj["metadata"]["generation"] += 1
        self._record_event(request.resource, "MODIFIED", obj)
        return 200, obj, {}

    def _watch_lines(self, resource: str, namespace: str, params: dict[str, str]):
        """Yield the JSON lines of one watch response until it times out or a test ends it."""
        start = int(params.get("resourceVersion") or 0)
        bookmarks = params.get("allowWatchBookmarks") == "true"
        selector = params.get("labelSelector", "")
        deadline = time.monotonic() + float(params.get("timeoutSeconds") or 1800)
        with self._cond:
            if start < self._compacted:
                yield {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {start} "
                                                          f"({self._compacted})")}
                return
            epoch, sent = self._epoch, start
        while True:
            with self._cond:
                batch = [(v, t, o) for v, r, t, o in self._events
                         if v > sent and r == resource and o["metadata"].get("namespace", namespace) == namespace
                         and (t != "BOOKMARK" or bookmarks)
                         and (t == "BOOKMARK" or selector_matches(selector, o["metadata"].get("labels", {})))]
                if self._gone_epoch > epoch and not self._closing:  # compacted under an open watch
                    yield {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
                    return
                ended = self._closing or self._epoch != epoch or time.monotonic() >= deadline
                if ended and not batch:
                    return
                if not batch:
                    self._cond.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                    continue
            for version, kind, obj in batch:
                sent = version
                yield {"type": kind, "object": obj}


class _Handler(BaseHTTPRequestHandler):
    """HTTP side of the fake; `api` is set on a subclass per server."""

    api: FakeKubeApi
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        match = _PATH.match(url.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not match or match["resource"] not in _KINDS:
            return self._send(404, _status(404, "NotFound", f"no route {url.path}"), {})
        body = json.loads(raw) if raw else None
        request = Recorded(method, match["group"] or "", match["resource"], match["name"], params, body)
        if method == "GET" and request.verb == "watch":
            with self.api._cond:
                self.api.requests.append(request)
                self.api._cond.notify_all()
            return self._stream(self.api._watch_lines(match["resource"], match["ns"], params))
        status, payload, headers = self.api._handle(request, match["ns"], params)
        request.status = status
        self._send(status, payload, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, lines) -> None:
        # Chunked, like the API server: the client reads each event as its chunk arrives.
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for line in lines:
                data = json.dumps(line).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped watching

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")
