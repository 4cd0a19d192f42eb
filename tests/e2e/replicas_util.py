"""Helpers for tests that run several Portico replicas and shared Redis.

* ``RedisServer``      -- a real ``redis-server`` on a free loopback port (no persistence),
  killable and restartable on the same port; ``cli()`` runs ``redis-cli`` against it.
* ``REPLICA_IPS`` / ``start_replicas()`` -- N gateways with the same config, listening on
  127.0.0.1, 127.0.0.2, 127.0.0.3 ... on one shared port (as DNS round robin would hand
  out), each with its own admin port and upgrade socket.
* ``Spreader``         -- a client that sends each GET to the next replica in turn and
  moves on to another replica when a connection is refused or closed before any byte of
  the answer, counting statuses per replica and those retries.

Only the standard library and the ``procs`` fixture of conftest.py are used.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import threading
from collections import Counter

from conftest import Managed, free_port, wait_until

REPLICA_IPS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


class RedisServer:
    """`redis-server` on 127.0.0.1:PORT, started by the test and killed at teardown."""

    def __init__(self, procs, port: int | None = None):
        if shutil.which("redis-server") is None:
            raise AssertionError("redis-server is not installed (bash scripts/setup.sh installs it)")
        self.procs = procs
        self.port = port or free_port()
        self.m: Managed | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        self.starts += 1
        log = self.procs.dir / f"redis-{self.port}.log"
        self.m = Managed(f"redis-server :{self.port} (start {self.starts})",
                         ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                          "--save", "", "--appendonly", "no", "--protected-mode", "no"], log)
        self.procs.track(self.m)
        self.m.start()
        wait_until(lambda: self.cli("PING") == "PONG", 10, what=f"redis-server on {self.port}")
        return self

    def kill(self):
        """SIGKILL: Redis disappears without a goodbye."""
        if self.m:
            self.m.kill()

    def cli(self, *args: str) -> str:
        r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip()


def start_replicas(procs, cfg: dict, n: int = 3, port: int | None = None, name: str = "replica"):
    """`n` gateways with `cfg`, on REPLICA_IPS[i]:port (one port for all); returns (gateways, port)."""
    port = port or free_port()
    gws = []
    for i in range(n):
        c = dict(cfg)
        c["listeners"] = [{"name": "web", "bind": f"{REPLICA_IPS[i]}:{port}"}]
        server = dict(c.get("server", {}))
        server.setdefault("upgrade_sock", str(procs.dir / f"{name}{i}-upgrade.sock"))
        c["server"] = server
        g = procs.gateway(c, name=f"{name}{i}", start=False)
        g.port = port
        g.ip = REPLICA_IPS[i]
        g.start(wait=False)
        gws.append(g)
    for g in gws:
        wait_until(lambda g=g: _ready(g), 30, what=f"{g.name} ready")
    return gws, port


def _ready(g) -> bool:
    if not g.alive():
        raise AssertionError(f"{g.name} exited: {g.log_tail()}")
    try:
        c = http.client.HTTPConnection("127.0.0.1", g.admin_port, timeout=2)
        c.request("GET", "/readyz")
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except OSError:
        return False


# Errors that mean "this replica did not take the request": safe to send a GET elsewhere.
# A refused connection never reached a server. A connection closed or reset before any
# byte of the answer is one the server never worked on: a kept-alive connection closed
# as the request crossed it (RFC 9112 section 9.3.1), or a connection the kernel had
# queued in the instant the listener closed (the kernel resets those instead of refusing
# them). RFC 9110 section 9.2.2 lets clients retry idempotent requests after either.
# A failure after the status line (IncompleteRead, a timeout) is never retried.
def _retryable(e: BaseException) -> bool:
    return isinstance(e, (ConnectionRefusedError, http.client.RemoteDisconnected,
                          ConnectionResetError, BrokenPipeError, http.client.BadStatusLine))


class Spreader:
    """Sends GETs round robin over `targets` [(ip, port)], moving on when a replica refuses.

    `keepalive`: one kept-alive connection per target (reconnecting when closed), else a
    new connection per request. Results are counted per (ip, status); a request that no
    target took after `attempts` tries, or that failed otherwise, is a failure."""

    def __init__(self, targets, keepalive: bool = True, timeout: float = 10.0, attempts: int = 6):
        self.targets = list(targets)
        self.keepalive = keepalive
        self.timeout = timeout
        self.attempts = attempts
        self.conns: dict[tuple, http.client.HTTPConnection] = {}
        self.next = 0
        self.counts: Counter = Counter()
        self.headers_seen: Counter = Counter()
        self.retries: Counter = Counter()
        self.failures: list[str] = []

    def _conn(self, t):
        c = self.conns.get(t)
        if c is None or not self.keepalive:
            c = http.client.HTTPConnection(t[0], t[1], timeout=self.timeout)
            if self.keepalive:
                self.conns[t] = c
        return c

    def _close(self, t, c):
        if self.keepalive:
            self._drop(t)
        else:
            c.close()

    def _drop(self, t):
        c = self.conns.pop(t, None)
        if c is not None:
            c.close()

    def get(self, path: str, headers: dict | None = None, watch_header: str | None = None):
        """One request; returns (ip, status) or None when it failed."""
        for attempt in range(self.attempts):
            t = self.targets[self.next % len(self.targets)]
            self.next += 1
            c = self._conn(t)
            try:
                c.request("GET", path, headers=headers or {})
                r = c.getresponse()
                r.read()
                if not self.keepalive or (r.getheader("connection") or "").lower() == "close":
                    self._close(t, c)
                self.counts[(t[0], r.status)] += 1
                if watch_header:
                    self.headers_seen[r.getheader(watch_header)] += 1
                return t[0], r.status
            except Exception as e:  # noqa: BLE001 - classified below
                self._close(t, c)
                if _retryable(e):
                    self.retries[(t[0], type(e).__name__)] += 1
                    continue
                self.failures.append(f"{t[0]}: {type(e).__name__}: {e}")
                return None
        self.failures.append(f"{path}: no replica took it in {self.attempts} tries")
        return None

    def close(self):
        for t in list(self.conns):
            self._drop(t)

    def admitted(self) -> int:
        return sum(n for (_, s), n in self.counts.items() if s == 200)

    def by_status(self) -> Counter:
        out: Counter = Counter()
        for (_, s), n in self.counts.items():
            out[s] += n
        return out


class LoadLoop:
    """`threads` Spreaders sending requests back to back until stopped."""

    def __init__(self, targets, path: str, threads: int = 4, keepalive: bool = True,
                 watch_header: str | None = None):
        self.spreaders = [Spreader(targets, keepalive=keepalive) for _ in range(threads)]
        for i, s in enumerate(self.spreaders):
            s.next = i
        self.path = path
        self.watch_header = watch_header
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True)
                        for s in self.spreaders]

    def _run(self, s: Spreader):
        while not self.stop_ev.is_set():
            s.get(self.path, watch_header=self.watch_header)
        s.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(30)

    def total(self) -> int:
        return sum(sum(s.counts.values()) for s in self.spreaders)

    def summary(self):
        counts: Counter = Counter()
        retries: Counter = Counter()
        headers: Counter = Counter()
        failures: list[str] = []
        for s in self.spreaders:
            counts.update(s.counts)
            retries.update(s.retries)
            headers.update(s.headers_seen)
            failures.extend(s.failures)
        return counts, retries, headers, failures


def port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False

