"""Edge limits, end to end over raw sockets.

* Slowloris: 500 connections each sending one header byte per second are closed (with a
  408) at `server.header_timeout` (3 s), while a steady client opening a new connection per
  request keeps getting answers within 100 ms. The attacker runs in its own process so the
  measuring client does not share its interpreter. The same is asked of a TLS listener
  (slow header, no ClientHello, or a handshake stalled after the ClientHello) and of an
  h2c listener (a partial HTTP/2 preface).
* 414 for a 10 KiB request line, 431 for 100 headers over `max_headers` and for a header
  block over `max_header_bytes`; requests just under the limits pass; nothing refused is
  forwarded.
* `max_connections`: connections over the per-listener limit are closed at once, without
  an answer; once others close, new ones are served again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import free_port, http_request, metric_sum, wait_until
from test_edge_tls import PKI, cert_pair

HEADER_TIMEOUT = 3.0

# Runs in a separate Python process: opens N connections (plain, or TLS with a handshake
# first), sends one header byte per connection per second, and reports for each one when
# it was opened and when the gateway closed it, and the first bytes it got back.
ATTACKER = textwrap.dedent(r'''
    import json, select, socket, ssl, sys, time
    port, n, mode, run_for = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    msg = b"GET /slow HTTP/1.1\r\nHost: victim.example\r\nUser-Agent: slowloris\r\nX-Pad: " + b"a" * 4000
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    conns = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if mode == "tls":
            s = ctx.wrap_socket(s, server_hostname="localhost")
        elif mode == "h2c":
            s.sendall(b"PRI * HTTP/2.0\r\n")
        elif mode == "midhandshake":
            # A real ClientHello, then silence: the server answers and waits for the
            # client's Finished, which never comes.
            bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(bio_in, bio_out, server_hostname="localhost")
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            s.sendall(bio_out.read())
        s.setblocking(False)
        conns.append({"s": s, "opened": time.monotonic(), "closed": None, "sent": 0, "got": b"", "how": None})
    if mode in ("nohandshake", "midhandshake"):
        for c in conns:
            c["sent"] = -1
    print(json.dumps({"event": "opened", "t": time.monotonic()}), flush=True)
    start = time.monotonic()
    next_send = start
    while time.monotonic() - start < run_for:
        live = [c for c in conns if c["closed"] is None]
        if not live:
            break
        now = time.monotonic()
        if now >= next_send:
            for c in live:
                if mode in ("nohandshake", "midhandshake", "h2c"):
                    continue
                try:
                    if c["sent"] < len(msg):
                        c["s"].send(msg[c["sent"]:c["sent"] + 1])
                        c["sent"] += 1
                except (ssl.SSLWantWriteError, BlockingIOError):
                    pass
                except OSError as e:
                    c["closed"], c["how"] = time.monotonic(), "send: " + type(e).__name__
            next_send += 1.0
        socks = [c["s"] for c in live if c["closed"] is None]
        try:
            readable, _, _ = select.select(socks, [], [], 0.05)
        except (ValueError, OSError):
            readable = []
        for c in live:
            if c["s"] not in readable or c["closed"] is not None:
                continue
            try:
                data = c["s"].recv(4096)
                if not data:
                    c["closed"], c["how"] = time.monotonic(), "eof"
                else:
                    c["got"] += data
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            except OSError as e:
                c["closed"], c["how"] = time.monotonic(), "recv: " + type(e).__name__
    out = [{"opened": c["opened"], "closed": c["closed"], "how": c["how"], "sent": c["sent"],
            "got": c["got"][:64].decode("latin-1")} for c in conns]
    print(json.dumps({"event": "done", "conns": out}), flush=True)
''')


def start_attacker(port: int, n: int, mode: str, run_for: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ATTACKER, str(port), str(n), mode, str(run_for)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def attacker_result(p: subprocess.Popen, timeout: float) -> tuple[float, list[dict]]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"slowloris attacker did not finish; stderr: {err[-2000:]}")
    opened_at, conns = None, None
    for line in out.splitlines():
        ev = json.loads(line)
        if ev["event"] == "opened":
            opened_at = ev["t"]
        elif ev["event"] == "done":
            conns = ev["conns"]
    assert conns is not None, f"attacker output: {out[-2000:]} stderr: {err[-2000:]}"
    return opened_at, conns


class SteadyClient(threading.Thread):
    """A new connection + one GET per iteration, ~20 per second; records latency and failures."""

    def __init__(self, port: int, path: str = "/ping"):
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.samples: list[tuple[float, float]] = []   # (start, latency)
        self.errors: list[str] = []
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            try:
                r = http_request(self.port, "GET", self.path, timeout=5)
                lat = time.monotonic() - t0
                if r.status != 200 or r.body != b"pong":
                    self.errors.append(f"status {r.status} body {r.body[:80]!r}")
                else:
                    self.samples.append((t0, lat))
            except Exception as e:  # noqa: BLE001
                self.errors.append(repr(e))
            time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))

    def stop(self):
        self.stop_ev.set()
        self.join(10)


PING_ROUTE = {"name": "ping", "match": {"path": "/ping"},
              "respond": {"status": 200, "body": "pong", "headers": {"content-type": "text/plain"}}}


def _pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


# --------------------------------------------------------------------------- slowloris

def test_slowloris_closed_at_header_timeout_while_others_are_served(procs):
    n = 500
    backend = procs.backend("limits-echo")
    gw = procs.gateway({
        "server": {"header_timeout": "3s"},
        "upstreams": {"echo": {"endpoints": [backend.address]}},
        "routes": [PING_ROUTE, {"name": "echo", "match": {"path_prefix": "/"}, "upstream": "echo"}],
    })
    for _ in range(5):
        assert gw.get("/ping").status == 200   # warm up
    before_408 = metric_sum(gw.metrics(), "portico_requests_total", status="408")

    client = SteadyClient(gw.port)
    client.start()
    time.sleep(1.0)   # baseline before the attack
    attacker = start_attacker(gw.port, n, "plain", run_for=HEADER_TIMEOUT + 8)
    opened_at, conns = attacker_result(attacker, timeout=60)
    time.sleep(0.5)
    client.stop()

    # every slow connection was closed by the gateway, at the header timeout, with a 408
    not_closed = [c for c in conns if c["closed"] is None]
    assert not not_closed, f"{len(not_closed)} of {n} slowloris connections still open after {HEADER_TIMEOUT + 8}s"
    lifetimes = sorted(c["closed"] - c["opened"] for c in conns)
    assert lifetimes[0] >= HEADER_TIMEOUT - 0.3, \
        f"a slow connection was closed after {lifetimes[0]:.2f}s, before the {HEADER_TIMEOUT}s header timeout"
    assert lifetimes[-1] <= HEADER_TIMEOUT + 2.0, \
        f"slow connections closed up to {lifetimes[-1]:.2f}s after opening (header timeout {HEADER_TIMEOUT}s)"
    got_408 = sum(1 for c in conns if c["got"].startswith("HTTP/1.1 408"))
    assert got_408 >= n * 0.95, f"only {got_408} of {n} slow connections got a 408 before the close"
    assert max(c["sent"] for c in conns) <= HEADER_TIMEOUT + 3, "connections lived long enough to send too much"
    # the refusals are counted, and nothing reached the backend
    after_408 = metric_sum(gw.metrics(), "portico_requests_total", status="408")
    assert after_408 - before_408 >= got_408, (before_408, after_408, got_408)
    assert backend_requests(backend) == 0

    # the steady client was served throughout, quickly
    assert not client.errors, f"steady client failures during the attack: {client.errors[:5]}"
    attack_end = opened_at + HEADER_TIMEOUT + 2.0
    during = [lat for t0, lat in client.samples if opened_at - 0.5 <= t0 <= attack_end]
    assert len(during) >= 40, f"only {len(during)} steady requests during the attack"
    p99, worst = _pct(during, 99), max(during)
    over = sum(1 for x in during if x > 0.100)
    print(f"steady client during the attack: {len(during)} requests, p50 {_pct(during, 50) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms, {over} over 100 ms")
    assert p99 <= 0.100, f"steady client p99 {p99 * 1000:.1f} ms during the attack (> 100 ms); max {worst * 1000:.1f} ms"
    assert over <= max(1, len(during) * 0.03), f"{over} of {len(during)} steady requests took over 100 ms"
    assert gw.alive()


def backend_requests(backend) -> int:
    return http_request(backend.port, "GET", "/_stats").json()["requests"]


def _slowloris_other_listener(procs, tmp_path, mode: str, n: int):
    """Slow clients on a TLS or h2c listener must also be closed at the header timeout."""
    pki = PKI(tmp_path / "pki").standard()
    port = free_port()
    listener = {"name": mode, "bind": f"127.0.0.1:{port}"}
    if mode in ("tls", "nohandshake", "midhandshake"):
        listener["tls"] = {"certificates": [cert_pair(pki.localhost)]}
    else:
        listener["http2"] = True
    gw = procs.gateway({
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{free_port()}"}, listener],
        "server": {"header_timeout": "3s"},
        "routes": [PING_ROUTE],
    })
    attacker = start_attacker(port, n, mode, run_for=HEADER_TIMEOUT + 6)
    _, conns = attacker_result(attacker, timeout=60)
    lifetimes = [c["closed"] - c["opened"] for c in conns if c["closed"] is not None]
    still_open = n - len(lifetimes)
    assert still_open == 0 and max(lifetimes) <= HEADER_TIMEOUT + 2.0, (
        f"{mode}: {still_open} of {n} slow connections still open {HEADER_TIMEOUT + 6:.0f}s after opening "
        f"(header_timeout {HEADER_TIMEOUT:.0f}s); closed ones lived up to "
        f"{max(lifetimes) if lifetimes else 0:.2f}s")
    assert gw.alive()


def test_slowloris_on_tls_listener(procs, tmp_path):
    """TLS handshake done, then one header byte per second."""
    _slowloris_other_listener(procs, tmp_path, "tls", 50)


def test_tls_connections_that_never_handshake_are_closed(procs, tmp_path):
    """TCP connected to a TLS listener, no ClientHello ever."""
    _slowloris_other_listener(procs, tmp_path, "nohandshake", 50)


def test_tls_handshakes_that_stall_after_the_client_hello_are_closed(procs, tmp_path):
    """A ClientHello, the server's answer, and then no client Finished."""
    _slowloris_other_listener(procs, tmp_path, "midhandshake", 50)


def test_h2c_partial_preface_is_closed(procs, tmp_path):
    """`PRI * HTTP/2.0\\r\\n` and then nothing, on an http2 plain listener."""
    _slowloris_other_listener(procs, tmp_path, "h2c", 50)


# --------------------------------------------------------------------------- 414 / 431

def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                cl = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if cl and len(body) >= int(cl[0].split(b":")[1]):
                    break
        return out
    finally:
        s.close()


def parse(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith(b"HTTP/1.1 ") else None
    return status, body


@pytest.fixture
def limits_gw(procs):
    backend = procs.backend("limits-backend")
    gw = procs.gateway({
        "upstreams": {"echo": {"endpoints": [backend.address]}},
        "routes": [{"name": "echo", "match": {"path_prefix": "/"}, "upstream": "echo"}],
    })
    gw.backend = backend
    return gw


def test_414_for_10k_request_line(limits_gw):
    gw = limits_gw
    long_path = "/" + "a" * (10 * 1024)
    raw = raw_exchange(gw.port, f"GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, body = parse(raw)
    assert status == 414, raw[:300]
    j = json.loads(body)
    assert j["error"] == "uri_too_long" and j["request_id"], j
    # the request line alone, still arriving: refused as soon as it is too long
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        s.sendall(b"GET /" + b"b" * (9 * 1024))
        got = s.recv(4096)
        assert got.startswith(b"HTTP/1.1 414"), got[:200]
    finally:
        s.close()
    # just under the 8 KiB default: forwarded
    ok_path = "/" + "c" * (8 * 1024 - 64)
    r = http_request(gw.port, "GET", ok_path, {"Host": "x"})
    assert r.status == 200 and r.json()["path"] == ok_path, r
    assert backend_requests(gw.backend) == 1, "a refused request reached the backend"


def test_431_for_too_many_and_too_large_headers(limits_gw):
    gw = limits_gw
    many = "".join(f"X-H{i}: v{i}\r\n" for i in range(200))   # 100 over the default max_headers (100)
    status, body = parse(raw_exchange(gw.port, f"GET /many HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode()))
    assert status == 431, body[:300]
    assert json.loads(body)["error"] == "headers_too_large"
    big = "X-Big: " + "z" * (70 * 1024) + "\r\n"                 # over max_header_bytes (64 KiB)
    status, body = parse(raw_exchange(gw.port, f"GET /big HTTP/1.1\r\nHost: x\r\n{big}\r\n".encode()))
    assert status == 431, body[:300]
    assert json.loads(body)["error"] == "headers_too_large"
    # 90 headers and a 16 KiB header pass
    fine = {f"X-H{i}": f"v{i}" for i in range(90)}
    fine["Host"] = "x"
    r = http_request(gw.port, "GET", "/fine", fine)
    assert r.status == 200, r
    assert r.json()["headers"].get("x-h89") == "v89"
    r = http_request(gw.port, "GET", "/fine-big", {"Host": "x", "X-Big": "y" * 16384})
    assert r.status == 200, r
    assert backend_requests(gw.backend) == 2, "a refused request reached the backend"


# --------------------------------------------------------------------------- max_connections

def test_max_connections_closes_extra_connections(procs):
    limit = 20
    gw = procs.gateway({"server": {"max_connections": limit}, "routes": [PING_ROUTE]})
    held = []
    try:
        for i in range(limit):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            status, body = parse(_read_response(s))
            assert status == 200 and body == b"pong", f"connection {i} under the limit: {status} {body!r}"
            held.append(s)   # kept open (keep-alive)

        # over the limit: closed at once, no answer
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            t0 = time.monotonic()
            try:
                s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    got = s.recv(4096)
                except ConnectionResetError:
                    got = b""
            except (BrokenPipeError, ConnectionResetError):
                got = b""
            finally:
                s.close()
            assert got == b"", f"a connection over max_connections was served: {got[:200]!r}"
            assert time.monotonic() - t0 < 2.0, "the extra connection was not closed at once"
        assert "max_connections" in gw.log_path.read_text(errors="replace")

        # the held connections still work
        for s in held[:3]:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert parse(_read_response(s))[0] == 200

        # free five slots: new connections are served again
        for s in held[:5]:
            s.close()
        del held[:5]

        def served():
            r = http_request(gw.port, "GET", "/ping", timeout=3)
            return r.status == 200
        wait_until(served, 5, what="a new connection served after others closed")
        # the admin listener is not counted against the proxy listener's limit
        assert gw.admin("GET", "/healthz").status == 200
    finally:
        for s in held:
            s.close()


def _read_response(s: socket.socket) -> bytes:
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = s.recv(4096)
        if not chunk:
            return out
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    n = 0
    for ln in head.split(b"\r\n"):
        if ln.lower().startswith(b"content-length:"):
            n = int(ln.split(b":")[1])
    while len(body) < n:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_idle_keepalive_connections_close_at_keepalive_timeout(procs):
    """A kept-alive client connection that stays idle is closed at
    `server.keepalive_timeout`; one that keeps sending requests within it stays open."""
    gw = procs.gateway({"server": {"keepalive_timeout": "2s"}, "routes": [PING_ROUTE]})
    req = b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n"

    def answer(s: socket.socket) -> bytes:
        got = b""
        while not got.endswith(b"pong"):
            chunk = s.recv(4096)
            assert chunk, f"closed before the answer: {got!r}"
            got += chunk
        return got

    idle = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    busy = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    for s in (idle, busy):
        s.sendall(req)
        assert answer(s).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    checked_early = False
    # The busy one asks again every 0.5 s for 4 s, twice the timeout.
    while time.monotonic() - start < 4.0:
        time.sleep(0.5)
        busy.sendall(req)
        assert answer(busy).startswith(b"HTTP/1.1 200"), "an active connection was closed"
        if not checked_early and time.monotonic() - start >= 1.0:
            # Half the timeout: the idle one must still be open (nothing to read yet).
            checked_early = True
            idle.setblocking(False)
            try:
                early = idle.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                early = None
            idle.setblocking(True)
            assert early is None, f"idle connection closed after {time.monotonic() - start:.1f}s, before keepalive_timeout 2s"
    idle.settimeout(2.0)
    try:
        data = idle.recv(4096)
    except ConnectionResetError:
        data = b""
    closed_after = time.monotonic() - start
    assert data == b"", f"idle connection still open after {closed_after:.1f}s (keepalive_timeout 2s): {data!r}"
    idle.close()
    busy.close()
    assert gw.alive()
