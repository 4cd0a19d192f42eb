"""A small Kubernetes API server for Portico's cluster-mode tests (stdlib only).

It speaks the real list and watch protocol for the resources Portico's controller
watches, on the real paths:

* ``GET /api/v1/services``, ``/api/v1/namespaces/{ns}/services`` (and ``secrets``),
  ``/apis/networking.k8s.io/v1/ingresses`` (and ``ingressclasses``, cluster scoped),
  ``/apis/discovery.k8s.io/v1/endpointslices``, ``/apis/gateway.networking.k8s.io/v1/
  gateways`` and ``httproutes``; ``.../{name}`` gets one object.
* Lists answer ``{kind: XList, metadata: {resourceVersion}, items}``; ``limit`` and
  ``continue`` page through a snapshot (``resourceVersion=0`` is served "from the cache"
  and, as on a real API server, ignores ``limit``); ``resourceVersionMatch=Exact`` with a
  compacted version answers 410.
* ``?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T`` streams
  chunked JSON lines of ADDED / MODIFIED / DELETED / BOOKMARK events after N. A version
  outside the kept history (compacted, or from another history after a restart) gets
  ``200`` and one ``ERROR`` event holding a ``Status`` with code 410, as the real server
  does. ``sendInitialEvents=true`` streams the current objects first and ends them with
  a bookmark annotated ``k8s.io/initial-events-end``.
* ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``) and ``fieldSelector``
  (``metadata.name``, ``metadata.namespace``, ``type``, any dotted path; ``=``, ``==``, ``!=``).
* ``PATCH .../{name}/status`` with ``application/merge-patch+json`` (RFC 7386) changes the
  status only; every such patch is recorded in ``status_patches``.

Test controls are Python methods: ``put``, ``delete``, ``compact`` (drop history; with
``expire_watches`` open watches get the 410 ERROR event), ``stop`` (close the socket and
every open connection) and ``restart`` (same port; ``fresh_history`` renumbers every
object from a new, unrelated resourceVersion sequence so old versions are Gone), and
``gateway_api=False`` to answer 404 for the Gateway API resources (CRDs not installed),
and ``fail_with = 503`` (any status) to answer every request with that error. Another process drives it with ``POST /_control/put`` (an object), ``/_control/delete``
(``{kind, namespace, name}``) and ``/_control/compact``.

Run as a script (``python3 k8s_apiserver.py --port N --load objects.json``) it serves
the objects of a JSON list until killed (used by bench/k8s).
"""

from __future__ import annotations

import base64
import bisect
import copy
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# resource plural -> (group prefix, kind, namespaced)
RESOURCES = {
    "ingresses": ("/apis/networking.k8s.io/v1", "Ingress", True),
    "ingressclasses": ("/apis/networking.k8s.io/v1", "IngressClass", False),
    "services": ("/api/v1", "Service", True),
    "secrets": ("/api/v1", "Secret", True),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "EndpointSlice", True),
    "gateways": ("/apis/gateway.networking.k8s.io/v1", "Gateway", True),
    "httproutes": ("/apis/gateway.networking.k8s.io/v1", "HTTPRoute", True),
    "gatewayclasses": ("/apis/gateway.networking.k8s.io/v1", "GatewayClass", False),
}
KIND_TO_PLURAL = {kind: plural for plural, (_, kind, _) in RESOURCES.items()}
GATEWAY_API = "/apis/gateway.networking.k8s.io/"


def api_version_of(plural: str) -> str:
    prefix = RESOURCES[plural][0]
    return prefix[len("/api/"):] if prefix.startswith("/api/") else prefix[len("/apis/"):]


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _lookup(obj, dotted: str):
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _split_selector(sel: str) -> list[str]:
    return [t.strip() for t in sel.split(",") if t.strip()]


def label_match(obj, sel: str | None) -> bool:
    if not sel:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in _split_selector(sel):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "==" in term or "=" in term:
            k, v = term.split("==", 1) if "==" in term else term.split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_match(obj, sel: str | None) -> bool:
    if not sel:
        return True
    for term in _split_selector(sel):
        neg = "!=" in term
        if neg:
            k, v = term.split("!=", 1)
        elif "==" in term:
            k, v = term.split("==", 1)
        else:
            k, v = term.split("=", 1)
        have = _lookup(obj, k.strip())
        have = "" if have is None else str(have)
        if (have == v.strip()) == neg:
            return False
    return True


class Gone(Exception):
    pass


class _Watch:
    """One open watch stream: the handler thread waits on the store's condition."""

    def __init__(self):
        self.expired = False


class Store:
    """Objects, the event history and the resourceVersion counter."""

    def __init__(self, first_rv: int = 1):
        self.cond = threading.Condition()
        self.rv = first_rv
        self.oldest = first_rv  # events after `oldest` are kept
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, plural, type, obj)
        self.watches: set[_Watch] = set()
        self.generation = 0

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        kind = obj.get("kind")
        if kind not in KIND_TO_PLURAL:
            raise ValueError(f"unsupported kind {kind!r}")
        plural = KIND_TO_PLURAL[kind]
        obj.setdefault("apiVersion", api_version_of(plural))
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "") if RESOURCES[plural][2] else ""
        if RESOURCES[plural][2]:
            ns = ns or "default"
            meta["namespace"] = ns
        key = (plural, ns, meta["name"])
        with self.cond:
            old = self.objects.get(key)
            meta["uid"] = (old or {}).get("metadata", {}).get("uid") or meta.get("uid") or str(uuid.uuid4())
            meta.setdefault("creationTimestamp",
                            (old or {}).get("metadata", {}).get("creationTimestamp")
                            or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if old is not None and "status" in old and "status" not in obj:
                obj["status"] = copy.deepcopy(old["status"])
            meta["resourceVersion"] = str(self._bump())
            self.objects[key] = obj
            self.history.append((self.rv, plural, "MODIFIED" if old else "ADDED", obj))
            self.cond.notify_all()
        return copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        plural = KIND_TO_PLURAL[kind]
        ns = (namespace or "default") if RESOURCES[plural][2] else ""
        with self.cond:
            old = self.objects.pop((plural, ns, name), None)
            if old is None:
                return False
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._bump())
            self.history.append((self.rv, plural, "DELETED", gone))
            self.cond.notify_all()
        return True

    def patch_status(self, plural: str, ns: str, name: str, patch: dict) -> dict | None:
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return None
            obj = copy.deepcopy(obj)
            obj["status"] = merge_patch(obj.get("status") or {}, patch.get("status") or {})
            obj["metadata"]["resourceVersion"] = str(self._bump())
            self.objects[(plural, ns, name)] = obj
            self.history.append((self.rv, plural, "MODIFIED", obj))
            self.cond.notify_all()
            return copy.deepcopy(obj)

    def compact(self, expire_watches: bool) -> None:
        with self.cond:
            self.history.clear()
            self.oldest = self.rv
            if expire_watches:
                for w in self.watches:
                    w.expired = True
            self.cond.notify_all()

    def renumber(self, first_rv: int) -> None:
        """A fresh history: every object gets a new version from an unrelated sequence."""
        with self.cond:
            self.rv = first_rv
            self.oldest = first_rv
            self.history.clear()
            for key in sorted(self.objects):
                self.objects[key]["metadata"]["resourceVersion"] = str(self._bump())
            self.generation += 1
            for w in self.watches:
                w.expired = True
            self.cond.notify_all()

    def since(self, rv: int, plural: str) -> list[tuple[int, str, dict]]:
        """Events of `plural` after `rv` (the history is ordered by version)."""
        i = bisect.bisect_right(self.history, rv, key=lambda e: e[0])
        return [(r, t, o) for (r, p, t, o) in self.history[i:] if p == plural]

    def items(self, plural: str, ns: str | None, lsel, fsel) -> list[dict]:
        out = []
        for (p, ons, _), obj in sorted(self.objects.items()):
            if p == plural and (ns is None or ons == ns) and label_match(obj, lsel) and field_match(obj, fsel):
                out.append(obj)
        return out


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, fmt, *args):  # quiet; requests are recorded instead
        pass

    def setup(self):
        super().setup()
        with self.server.api.lock:
            self.server.api.conns.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.api.lock:
                self.server.api.conns.discard(self.connection)

    # ------------------------------------------------------------------ plumbing
    def _send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self):
        """-> (plural, namespace or None, name or None, subresource or None) or None."""
        path = urlsplit(self.path).path.rstrip("/")
        for plural, (prefix, _, namespaced) in RESOURCES.items():
            if not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:].split("/")
            ns = None
            if namespaced and len(rest) >= 3 and rest[0] == "namespaces":
                ns, rest = rest[1], rest[2:]
            if not rest or rest[0] != plural:
                continue
            name = rest[1] if len(rest) > 1 else None
            sub = rest[2] if len(rest) > 2 else None
            if len(rest) > 3:
                return None
            return plural, ns, name, sub
        return None

    def _common(self):
        api = self.server.api
        api.record(self.command, self.path)
        if api.fail_with:
            self._send_json(api.fail_with, _status(api.fail_with, "InternalError", "injected failure"))
            return None
        route = self._route()
        if route is None or (not api.gateway_api and self.path.startswith(GATEWAY_API)):
            self._send_json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return None
        return route

    # ------------------------------------------------------------------ verbs
    def do_GET(self):
        route = self._common()
        if route is None:
            return
        plural, ns, name, sub = route
        q = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
        store = self.server.api.store
        if name is not None:
            with store.cond:
                obj = store.objects.get((plural, ns or "", name))
            if obj is None:
                return self._send_json(404, _status(404, "NotFound", f'{plural} "{name}" not found'))
            return self._send_json(200, obj)
        if q.get("watch") in ("1", "true"):
            return self._watch(plural, ns, q)
        return self._list(plural, ns, q)

    def _list(self, plural, ns, q):
        api = self.server.api
        store = api.store
        kind = RESOURCES[plural][1]
        lsel, fsel = q.get("labelSelector"), q.get("fieldSelector")
        rv, match = q.get("resourceVersion"), q.get("resourceVersionMatch")
        cont = q.get("continue")
        with store.cond:
            if match == "Exact" and rv and int(rv) < store.oldest:
                return self._send_json(410, _status(410, "Expired", f"too old resource version: {rv} ({store.oldest})"))
            if cont:
                try:
                    token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                    snap = api.pages.get(token["id"])
                except (ValueError, KeyError):
                    snap = None
                if snap is None:
                    return self._send_json(410, _status(410, "Expired", "the provided continue parameter is too old"))
                list_rv, items, start = snap[0], snap[1], token["start"]
            else:
                list_rv, items, start = store.rv, copy.deepcopy(store.items(plural, ns, lsel, fsel)), 0
        limit = int(q.get("limit") or 0)
        if rv == "0" and not cont:
            limit = 0  # served from the watch cache: the limit does not apply
        meta = {"resourceVersion": str(list_rv)}
        page = items[start:]
        if limit and len(page) > limit:
            page = page[:limit]
            pid = api.remember_pages(list_rv, items)
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"id": pid, "start": start + limit}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        for it in page:
            it.pop("kind", None)
            it.pop("apiVersion", None)
        self._send_json(200, {"kind": kind + "List", "apiVersion": api_version_of(plural),
                              "metadata": meta, "items": page})

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, plural, ns, q):
        api = self.server.api
        store = api.store
        kind = RESOURCES[plural][1]
        lsel, fsel = q.get("labelSelector"), q.get("fieldSelector")
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
        timeout = min(float(q.get("timeoutSeconds") or 1800), api.max_watch_seconds)
        rv = q.get("resourceVersion") or "0"
        initial = q.get("sendInitialEvents") in ("1", "true")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        w = _Watch()
        pending: list[dict] = []
        with store.cond:
            store.watches.add(w)
            if rv == "0" or initial:
                start = store.rv
                for obj in store.items(plural, ns, lsel, fsel):
                    pending.append({"type": "ADDED", "object": copy.deepcopy(obj)})
                if initial:
                    pending.append({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version_of(plural),
                        "metadata": {"resourceVersion": str(start),
                                     "annotations": {"k8s.io/initial-events-end": "true"}}}})
            else:
                start = int(rv)
                if start < store.oldest or start > store.rv:
                    w.expired = True
        deadline = time.monotonic() + timeout
        last_bookmark = time.monotonic()
        pos = start
        try:
            for ev in pending:
                self._chunk(ev)
            while not api.stopping:
                with store.cond:
                    if w.expired:
                        break
                    fresh = store.since(pos, plural)
                    if not fresh:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return self._end_chunks()
                        store.cond.wait(min(left, api.bookmark_interval, 0.5))
                        if w.expired:
                            break
                        fresh = store.since(pos, plural)
                    now_rv = store.rv
                for r, t, o in fresh:
                    pos = r
                    if (ns is None or o["metadata"].get("namespace", "") == ns) and \
                            label_match(o, lsel) and field_match(o, fsel):
                        self._chunk({"type": t, "object": copy.deepcopy(o)})
                if bookmarks and time.monotonic() - last_bookmark >= api.bookmark_interval:
                    pos = max(pos, now_rv)
                    self._chunk({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version_of(plural),
                        "metadata": {"resourceVersion": str(pos)}}})
                    last_bookmark = time.monotonic()
                if time.monotonic() >= deadline:
                    return self._end_chunks()
            if w.expired:
                self._chunk({"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {rv} ({store.oldest})")})
                api.gone_sent += 1
                return self._end_chunks()
        except OSError:
            self.close_connection = True
        finally:
            with store.cond:
                store.watches.discard(w)

    def _end_chunks(self):
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def do_POST(self):
        """Script-mode controls: POST /_control/put (an object), /_control/delete
        ({kind, namespace, name}), /_control/compact."""
        api = self.server.api
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            arg = json.loads(body) if body.strip() else {}
        except ValueError as e:
            return self._send_json(400, _status(400, "BadRequest", f"bad JSON: {e}"))
        path = urlsplit(self.path).path
        if path == "/_control/put":
            return self._send_json(200, api.put(arg))
        if path == "/_control/delete":
            ok = api.delete(arg["kind"], arg.get("namespace", ""), arg["name"])
            return self._send_json(200 if ok else 404, {"deleted": ok})
        if path == "/_control/compact":
            api.compact()
            return self._send_json(200, {"compacted": api.store.rv})
        return self._send_json(404, _status(404, "NotFound", "no such control"))

    def do_PATCH(self):
        route = self._common()
        if route is None:
            return
        plural, ns, name, sub = route
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if sub != "status" or name is None:
            return self._send_json(405, _status(405, "MethodNotAllowed", "only the status subresource is patchable here"))
        if ctype != "application/merge-patch+json":
            return self._send_json(415, _status(415, "UnsupportedMediaType", f"unsupported patch type {ctype}"))
        try:
            patch = json.loads(body)
        except ValueError as e:
            return self._send_json(400, _status(400, "BadRequest", f"bad JSON: {e}"))
        obj = self.server.api.store.patch_status(plural, ns or "", name, patch)
        if obj is None:
            return self._send_json(404, _status(404, "NotFound", f'{plural} "{name}" not found'))
        with self.server.api.lock:
            self.server.api.status_patches.append((plural, ns, name, patch))
        self._send_json(200, obj)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: "ApiServer"


class ApiServer:
    """The test API server: start(), put()/delete()/compact(), stop()/restart()."""

    def __init__(self, port: int = 0, gateway_api: bool = True, bookmark_interval: float = 1.0,
                 max_watch_seconds: float = 1800.0):
        self.port = port
        self.gateway_api = gateway_api
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self.store = Store()
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.requests: list[tuple[str, str]] = []
        self.status_patches: list[tuple] = []
        self.pages: dict[str, tuple[int, list]] = {}
        self.gone_sent = 0
        self.fail_with = 0
        self.stopping = False
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ApiServer":
        self.stopping = False
        httpd = _Server(("127.0.0.1", self.port), _Handler)
        httpd.api = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name=f"k8s-apiserver-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops listening and cuts every open connection (watches included)."""
        if self._httpd is None:
            return
        self.stopping = True
        with self.store.cond:
            self.store.cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd = None

    def restart(self, fresh_history: bool = True, first_rv: int = 1000000) -> None:
        """Serves again on the same port; with `fresh_history` old versions are Gone."""
        self.stop()
        if fresh_history:
            self.store.renumber(first_rv)
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self) -> str:
        """A kubeconfig (JSON is valid YAML) pointing at this server."""
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }, indent=2)

    # ------------------------------------------------------------------ controls
    def put(self, obj: dict) -> dict:
        return self.store.put(obj)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self.store.delete(kind, namespace, name)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        plural = KIND_TO_PLURAL[kind]
        ns = (namespace or "default") if RESOURCES[plural][2] else ""
        with self.store.cond:
            o = self.store.objects.get((plural, ns, name))
            return copy.deepcopy(o) if o else None

    def compact(self, expire_watches: bool = True) -> None:
        self.store.compact(expire_watches)

    def record(self, method: str, path: str) -> None:
        with self.lock:
            self.requests.append((method, path))
            if len(self.requests) > 10000:
                del self.requests[:5000]

    def remember_pages(self, rv: int, items: list) -> str:
        pid = uuid.uuid4().hex
        with self.lock:
            self.pages[pid] = (rv, items)
            while len(self.pages) > 64:
                self.pages.pop(next(iter(self.pages)))
        return pid

    def open_watches(self) -> int:
        with self.store.cond:
            return len(self.store.watches)


def main() -> None:
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(description="test Kubernetes API server")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--load", help="JSON file with a list of objects to serve")
    ap.add_argument("--no-gateway-api", action="store_true")
    args = ap.parse_args()
    api = ApiServer(port=args.port, gateway_api=not args.no_gateway_api)
    if args.load:
        with open(args.load) as f:
            for obj in json.load(f):
                api.put(obj)
        api.compact(expire_watches=False)  # the loading is not history anyone watches
    api.start()
    print(f"listening on {api.url} with {len(api.store.objects)} objects", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
