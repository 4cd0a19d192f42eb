"""Shared fixtures and helpers for Portico's end-to-end tests.

Everything here uses the Python standard library plus pytest: real `portico`
processes, real demo backends (`portico demo-backend`), real HTTP clients
(http.client / raw sockets).

Main pieces:

* ``free_port()``            -- bind port 0 on 127.0.0.1 and hand the number out.
* ``Procs`` (fixtures ``procs`` and ``module_procs``) -- starts and always reaps
  subprocesses: demo backends, gateways, CLI runs.  Logs go to files in the
  test's tmp dir and their tails are attached to the report of a failing test.
* ``Gateway``                -- one ``portico run`` process with its config file,
  listener port, admin port and access log; helpers for requests, admin API,
  metrics, atomic config rewrites, RSS sampling and signals.
* ``PyBackend``              -- a tiny in-process HTTP/1.1 backend that counts the
  requests it receives (and can be made slow); used where the test must know
  exactly what reached the upstream.
* ``to_yaml()``              -- a small block-style YAML emitter for config dicts.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PORTICO_BIN = Path(os.environ.get("PORTICO_BIN") or (REPO_ROOT / "target" / "debug" / "portico"))
if not PORTICO_BIN.is_absolute():
    PORTICO_BIN = (REPO_ROOT / PORTICO_BIN).resolve()

SKIP_SLOW = os.environ.get("PORTICO_SKIP_SLOW", "") not in ("", "0")
slow = pytest.mark.skipif(SKIP_SLOW, reason="PORTICO_SKIP_SLOW is set")

GATEWAY_READY_TIMEOUT = 20.0
BACKEND_READY_TIMEOUT = 15.0

REQUEST_ID_HEADER = "x-request-id"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (skipped with PORTICO_SKIP_SLOW=1)")


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (never the same one twice per session)."""
    with _port_lock:
        for _ in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("could not find a free port")


def wait_port_closed(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)


# --------------------------------------------------------------------------- YAML

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_RESERVED = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _yaml_key(k) -> str:
    k = str(k)
    if _PLAIN_KEY.match(k) and k.lower() not in _RESERVED:
        return k
    return json.dumps(k)


def to_yaml(obj, indent: int = 0) -> str:
    """Block-style YAML for dicts/lists/scalars (strings always double-quoted)."""
    pad = "  " * indent
    out = []
    if isinstance(obj, dict):
        if not obj:
            return pad + "{}\n"
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{_yaml_key(k)}:\n" + to_yaml(v, indent + 1))
            elif isinstance(v, dict):
                out.append(f"{pad}{_yaml_key(k)}: {{}}\n")
            elif isinstance(v, list):
                out.append(f"{pad}{_yaml_key(k)}: []\n")
            else:
                out.append(f"{pad}{_yaml_key(k)}: {_yaml_scalar(v)}\n")
    elif isinstance(obj, list):
        if not obj:
            return pad + "[]\n"
        for item in obj:
            if isinstance(item, (dict, list)) and item:
                sub = to_yaml(item, indent + 1)
                out.append(f"{pad}- " + sub[len(pad) + 2:])
            else:
                out.append(f"{pad}- {_yaml_scalar(item) if not isinstance(item, (dict, list)) else ('{}' if isinstance(item, dict) else '[]')}\n")
    else:
        return pad + _yaml_scalar(obj) + "\n"
    return "".join(out)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- HTTP client

class Resp:
    """A fully read HTTP response."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.reason = reason
        self.header_list = headers
        self.body = body

    def header(self, name: str, default=None):
        name = name.lower()
        for k, v in self.header_list:
            if k.lower() == name:
                return v
        return default

    def headers_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.header_list if k.lower() == name]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise AssertionError(f"response body is not JSON ({e}): status={self.status} "
                                 f"headers={self.header_list} body={self.body[:500]!r}") from None

    def __repr__(self) -> str:
        return f"<Resp {self.status} headers={self.header_list} body={self.body[:300]!r}>"


def http_request(port: int, method: str = "GET", path: str = "/", headers: dict | list | None = None,
                 body=None, timeout: float = 30.0, conn: http.client.HTTPConnection | None = None,
                 host: str = "127.0.0.1") -> Resp:
    """One request. With `conn` the (keep-alive) connection is reused, else a new one is used and closed."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = headers or {}
        if isinstance(hdrs, dict):
            hdrs = list(hdrs.items())
        names = {k.lower() for k, _ in hdrs}
        conn.putrequest(method, path, skip_host="host" in names, skip_accept_encoding="accept-encoding" in names)
        for k, v in hdrs:
            conn.putheader(k, v)
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            if isinstance(body, str):
                body = body.encode()
            conn.putheader("Content-Length", str(len(body)))
        elif body is None and method in ("POST", "PUT", "PATCH") and "content-length" not in names:
            conn.putheader("Content-Length", "0")
        if isinstance(body, str):
            body = body.encode()
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, r.reason, r.getheaders(), data)
    finally:
        if own:
            conn.close()


class KeepAliveClient:
    """A keep-alive connection that reconnects (and counts reconnects) when the server closes it."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def request(self, method="GET", path="/", headers=None, body=None) -> Resp:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.connects += 1
        try:
            r = http_request(self.port, method, path, headers, body, conn=self.conn)
        except Exception:
            self.close()
            raise
        if (r.header("connection") or "").lower() == "close":
            self.close()
        return r

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None


# --------------------------------------------------------------------------- metrics

_SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL_RE.findall(m.group(3) or "")}
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        samples.append((m.group(1), labels, value))
    return samples


def metric_sum(samples, name: str, **labels) -> float:
    total = 0.0
    for n, l, v in samples:
        if n == name and all(l.get(k) == str(val) for k, val in labels.items()):
            total += v
    return total


def metric_samples(samples, name: str, **labels):
    return [(l, v) for n, l, v in samples if n == name and all(l.get(k) == str(val) for k, val in labels.items())]


# --------------------------------------------------------------------------- processes

_ALL_PROCS: list["Managed"] = []
_ALL_LOCK = threading.Lock()


def _tail(path: Path, lines: int = 80) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "<no log>"
    text = data[-64 * 1024:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class Managed:
    """A subprocess whose output goes to a log file and which is always killed at teardown."""

    def __init__(self, label: str, argv: list[str], log_path: Path, env: dict | None = None, cwd=None):
        self.label = label
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self):
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== start {' '.join(self.argv)} at {time.time():.3f}\n".encode())
        self._log.flush()
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.cwd or REPO_ROOT)
        with _ALL_LOCK:
            if self not in _ALL_PROCS:
                _ALL_PROCS.append(self)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._log:
            try:
                self._log.close()
            except Exception:
                pass
            self._log = None

    def stop(self, timeout: float = 3.0):
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        self.kill()

    def log_tail(self, lines: int = 80) -> str:
        return _tail(self.log_path, lines)


def _kill_everything():
    with _ALL_LOCK:
        procs = list(_ALL_PROCS)
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass


atexit.register(_kill_everything)


def _require_binary():
    if not PORTICO_BIN.exists():
        pytest.fail(f"portico binary not found at {PORTICO_BIN} (build it with `cargo build`, "
                    f"or set PORTICO_BIN)", pytrace=False)


def run_cli(args: list, timeout: float = 60.0, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run `portico ARGS...` to completion and return the CompletedProcess (text mode)."""
    _require_binary()
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run([str(PORTICO_BIN)] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO_ROOT, env=e)


def wait_http_ok(port: int, path: str, timeout: float, proc: Managed | None = None, expect=200) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.label} exited with code {proc.proc.returncode} before becoming ready; "
                                 f"log:\n{proc.log_tail()}")
        try:
            r = http_request(port, "GET", path, timeout=2.0)
            if r.status == expect:
                return
            last = f"status {r.status}: {r.body[:200]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.05)
    log = f"; log:\n{proc.log_tail()}" if proc else ""
    raise AssertionError(f"127.0.0.1:{port}{path} not ready within {timeout}s (last: {last}){log}")


class DemoBackend:
    """`portico demo-backend --name NAME --port P`, restartable on the same port."""

    def __init__(self, procs: "Procs", name: str, port: int | None = None):
        self.procs = procs
        self.name = name
        self.port = port or free_port()
        self.m: Managed | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def served_by(self) -> str:
        return f"{self.name}:{self.port}"

    def start(self, wait: bool = True):
        _require_binary()
        self.starts += 1
        log = self.procs.dir / f"backend-{self.name}-{self.port}.log"
        self.m = Managed(f"demo-backend {self.name}:{self.port}",
                         [PORTICO_BIN, "demo-backend", "--name", self.name, "--port", str(self.port)], log)
        self.procs.track(self.m)
        self.m.start()
        if wait:
            wait_http_ok(self.port, "/healthz", BACKEND_READY_TIMEOUT, self.m)
        return self

    def kill(self):
        if self.m:
            self.m.kill()

    def alive(self) -> bool:
        return self.m is not None and self.m.alive()


class Gateway:
    """One `portico run -c FILE` process."""

    def __init__(self, procs: "Procs", config, name: str = "gateway", env: dict | None = None):
        self.procs = procs
        self.name = name
        self.env = env
        self.port = free_port()
        self.admin_port = free_port()
        self.dir = procs.dir / f"{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "portico.yaml"
        self.access_log_path = self.dir / "access.log"
        self.log_path = self.dir / "gateway.log"
        self.m: Managed | None = None
        self.write_config(config)

    # -- config
    def complete(self, cfg: dict) -> dict:
        """Fill in listeners / admin / access_log unless the test set them."""
        cfg = dict(cfg)
        cfg.setdefault("listeners", [{"name": "web", "bind": f"127.0.0.1:{self.port}"}])
        cfg.setdefault("admin", {"bind": f"127.0.0.1:{self.admin_port}"})
        cfg.setdefault("access_log", {"path": str(self.access_log_path)})
        # keep the file order listeners, admin, access_log, rest
        ordered = {k: cfg[k] for k in ("listeners", "admin", "access_log", "server") if k in cfg}
        ordered.update({k: v for k, v in cfg.items() if k not in ordered})
        return ordered

    def render(self, config) -> str:
        if isinstance(config, str):
            return config
        return to_yaml(self.complete(config))

    def write_config(self, config) -> str:
        text = self.render(config)
        atomic_write(self.config_path, text)
        return text

    # -- process
    def start(self, wait: bool = True, timeout: float = GATEWAY_READY_TIMEOUT):
        _require_binary()
        self.m = Managed(f"gateway {self.name}", [PORTICO_BIN, "run", "-c", self.config_path], self.log_path,
                         env=self.env)
        self.procs.track(self.m)
        self.m.start()
        if wait:
            wait_http_ok(self.admin_port, "/readyz", timeout, self.m)
        return self

    @property
    def pid(self) -> int:
        return self.m.pid

    def alive(self) -> bool:
        return self.m is not None and self.m.alive()

    def signal(self, sig=signal.SIGTERM):
        os.kill(self.m.pid, sig)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.m.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.m:
            self.m.kill()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log_tail(self, lines: int = 80) -> str:
        return _tail(self.log_path, lines)

    # -- traffic
    def request(self, method="GET", path="/", headers=None, body=None, timeout=30.0, conn=None) -> Resp:
        return http_request(self.port, method, path, headers, body, timeout=timeout, conn=conn)

    def get(self, path, headers=None, **kw) -> Resp:
        return self.request("GET", path, headers, **kw)

    def admin(self, method="GET", path="/", body=None, headers=None, timeout=15.0) -> Resp:
        return http_request(self.admin_port, method, path, headers, body, timeout=timeout)

    def admin_json(self, path: str):
        r = self.admin("GET", path)
        assert r.status == 200, f"admin GET {path}: {r}"
        return r.json()

    def metrics_text(self) -> str:
        r = self.admin("GET", "/metrics")
        assert r.status == 200, f"GET /metrics: {r}"
        return r.text

    def metrics(self):
        return parse_metrics(self.metrics_text())

    def reload(self) -> Resp:
        return self.admin("POST", "/reload", body=b"")

    def access_log_entries(self) -> list[dict]:
        try:
            text = self.access_log_path.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            line = line.strip()
            if line:
                out.append(json.loads(line))
        return out


class Procs:
    """Starts backends/gateways for one test (or module) and tears all of them down."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.managed: list[Managed] = []
        self.extra_cleanup = []

    def track(self, m: Managed):
        self.managed.append(m)

    def backend(self, name: str, port: int | None = None, start: bool = True) -> DemoBackend:
        b = DemoBackend(self, name, port)
        if start:
            b.start()
        return b

    def backends(self, *names: str) -> list[DemoBackend]:
        bs = [self.backend(n, start=False) for n in names]
        for b in bs:
            b.start(wait=False)
        for b in bs:
            wait_http_ok(b.port, "/healthz", BACKEND_READY_TIMEOUT, b.m)
        return bs

    def gateway(self, config, name: str = "gateway", start: bool = True, env=None) -> Gateway:
        g = Gateway(self, config, name=name, env=env)
        if start:
            g.start()
        return g

    def py_backend(self, name: str, delay: float = 0.0) -> "PyBackend":
        b = PyBackend(name, delay)
        self.extra_cleanup.append(b.close)
        return b

    def failure_report(self) -> str:
        parts = []
        for m in self.managed:
            state = "running" if m.alive() else f"exited {m.proc.returncode if m.proc else '?'}"
            parts.append(f"----- {m.label} ({state}) {m.log_path}\n{m.log_tail()}")
        return "\n".join(parts)

    def cleanup(self):
        for m in reversed(self.managed):
            try:
                m.kill()
            except Exception:
                pass
        for fn in self.extra_cleanup:
            try:
                fn()
            except Exception:
                pass
        with _ALL_LOCK:
            for m in self.managed:
                if m in _ALL_PROCS:
                    _ALL_PROCS.remove(m)


_ACTIVE_PROCS: list[Procs] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _ACTIVE_PROCS:
        for p in list(_ACTIVE_PROCS):
            txt = p.failure_report()
            if txt:
                rep.sections.append((f"process logs ({p.dir})", txt))


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    _ACTIVE_PROCS.append(p)
    try:
        yield p
    finally:
        p.cleanup()
        _ACTIVE_PROCS.remove(p)


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory, request):
    p = Procs(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    _ACTIVE_PROCS.append(p)
    try:
        yield p
    finally:
        p.cleanup()
        _ACTIVE_PROCS.remove(p)


# --------------------------------------------------------------------------- python backend

class PyBackend:
    """In-process HTTP/1.1 backend: counts every request (method, path, headers), optional fixed delay.

    Answers 200 JSON {"service", "path"} with `x-served-by: NAME:PORT`; /healthz answers 200 and is
    counted separately (health_requests)."""

    def __init__(self, name: str, delay: float = 0.0):
        self.name = name
        self.delay = delay
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict]] = []
        self.health_requests = 0
        self.inflight = 0
        self.max_inflight = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                if self.path == "/healthz":
                    with backend.lock:
                        backend.health_requests += 1
                    body = b"ok"
                else:
                    with backend.lock:
                        backend.requests.append((self.command, self.path, dict(self.headers.items())))
                        backend.inflight += 1
                        backend.max_inflight = max(backend.max_inflight, backend.inflight)
                    try:
                        if backend.delay:
                            time.sleep(backend.delay)
                    finally:
                        with backend.lock:
                            backend.inflight -= 1
                    body = json.dumps({"service": backend.name, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-served-by", f"{backend.name}:{backend.port}")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def served_by(self) -> str:
        return f"{self.name}:{self.port}"

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def paths(self) -> list[str]:
        with self.lock:
            return [p for _, p, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- misc helpers

def wait_until(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `pred()` until it returns a truthy value; return it, or raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def respond_route(name: str, match: dict, **extra) -> dict:
    """A `respond` route whose body and `x-route` header name the route."""
    r = {"name": name, "match": match,
         "respond": {"status": 200, "body": name, "headers": {"x-route": name, "content-type": "text/plain"}}}
    r.update(extra)
    return r


def assert_gateway_error(r: Resp, status: int, code: str):
    """A gateway-made error: given status, JSON {"error": code, "message": str, "request_id": str}."""
    assert r.status == status, f"expected {status} {code}, got {r}"
    j = r.json()
    assert isinstance(j, dict), f"error body is not a JSON object: {r}"
    assert j.get("error") == code, f"expected error {code!r}, got {j}"
    assert isinstance(j.get("message"), str), f"error body lacks a message string: {j}"
    assert isinstance(j.get("request_id"), str) and j["request_id"], f"error body lacks request_id: {j}"
    rid = r.header(REQUEST_ID_HEADER)
    assert rid, f"error response lacks x-request-id: {r}"
    assert rid == j["request_id"], f"x-request-id header {rid!r} != body request_id {j['request_id']!r}"
    return j
