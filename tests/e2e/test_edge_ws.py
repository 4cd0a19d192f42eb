"""WebSocket through the gateway, end to end (RFC 6455 client and echo server written here
over plain sockets, so no extra package is needed).

* 1,000 echoed messages (text and binary, up to 70 KB, so all three length encodings are
  used), then the same socket survives 10 config reloads, echoing after each one.
* A route with `jwt` refuses an upgrade without a valid token with 401 (the backend never
  sees it) and lets a valid one through.
* SIGTERM with `server.grace_period: 2s`: the open socket keeps working during the grace
  period, is closed when it ends, and the process exits 0.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import wait_until

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def encode_frame(opcode: int, payload: bytes, mask: bool, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _xor(payload, key)
        head += key
    return head + payload


def _xor(data: bytes, key: bytes) -> bytes:
    k = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(len(data), "big")


def read_frame(sock: socket.socket):
    """(fin, opcode, payload); unmasks when needed."""
    b1, b2 = _recv_exact(sock, 2)
    fin, opcode = bool(b1 & 0x80), b1 & 0x0F
    masked, n = bool(b2 & 0x80), b2 & 0x7F
    if n == 126:
        n = struct.unpack("!H", _recv_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", _recv_exact(sock, 8))[0]
    key = _recv_exact(sock, 4) if masked else None
    payload = _recv_exact(sock, n) if n else b""
    if key:
        payload = _xor(payload, key)
    return fin, opcode, payload


def read_message(sock: socket.socket):
    """One whole message (reassembling fragments, answering nothing): (opcode, payload)."""
    fin, opcode, payload = read_frame(sock)
    while not fin:
        fin, _, more = read_frame(sock)
        payload += more
    return opcode, payload


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before the end of the header: {data!r}")
        data += chunk
        if len(data) > 65536:
            raise ValueError("header too large")
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


# --------------------------------------------------------------------------- echo server

class WSEchoServer:
    """Threaded WebSocket echo server: echoes text/binary, answers ping, returns close."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = 0
        self.upgrades: list[dict] = []
        self.plain_requests: list[dict] = []
        self.open_sockets = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        upgraded = False
        try:
            head, rest = _read_head(conn)
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            info = {"request_line": lines[0], "headers": headers}
            if headers.get("upgrade", "").lower() != "websocket":
                with self.lock:
                    self.plain_requests.append(info)
                body = b"not a websocket request\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
                return
            with self.lock:
                self.upgrades.append(info)
                self.open_sockets += 1
            upgraded = True
            conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept_key(headers['sec-websocket-key'])}\r\n\r\n").encode())
            assert not rest, "client sent frames before the 101"
            while True:
                fin, opcode, payload = read_frame(conn)
                if opcode == OP_CLOSE:
                    conn.sendall(encode_frame(OP_CLOSE, payload[:2], mask=False))
                    return
                if opcode == OP_PING:
                    conn.sendall(encode_frame(OP_PONG, payload, mask=False))
                    continue
                if opcode in (OP_TEXT, OP_BIN, OP_CONT):
                    conn.sendall(encode_frame(opcode, payload, mask=False, fin=fin))
        except (ConnectionError, OSError, ValueError, AssertionError, KeyError):
            pass
        finally:
            if upgraded:
                with self.lock:
                    self.open_sockets -= 1
            try:
                conn.close()
            except OSError:
                pass

    def close(self):
        self.closed.set()
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- client

class WSClient:
    def __init__(self, port: int, path: str, headers: dict | None = None, timeout: float = 10.0,
                 host: str = "ws.example"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        hdrs = {"Host": host, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key,
                "Sec-WebSocket-Version": "13"}
        hdrs.update(headers or {})
        req = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        self.sock.sendall(req.encode())
        head, rest = _read_head(self.sock)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.body = rest
        if self.status == 101:
            assert not rest, f"bytes after the 101: {rest!r}"
            assert self.headers.get("sec-websocket-accept") == accept_key(key), self.headers
            assert self.headers.get("upgrade", "").lower() == "websocket", self.headers
        else:
            n = int(self.headers.get("content-length", "0") or 0)
            while len(self.body) < n:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.body += chunk

    def send(self, payload: bytes | str):
        if isinstance(payload, str):
            self.sock.sendall(encode_frame(OP_TEXT, payload.encode(), mask=True))
        else:
            self.sock.sendall(encode_frame(OP_BIN, payload, mask=True))

    def recv(self):
        while True:
            opcode, payload = read_message(self.sock)
            if opcode == OP_PING:
                self.sock.sendall(encode_frame(OP_PONG, payload, mask=True))
                continue
            return opcode, payload

    def echo(self, payload: bytes | str):
        self.send(payload)
        opcode, got = self.recv()
        want_op = OP_TEXT if isinstance(payload, str) else OP_BIN
        want = payload.encode() if isinstance(payload, str) else payload
        assert opcode == want_op and got == want, \
            f"echo mismatch: sent op {want_op} {len(want)} bytes, got op {opcode} {len(got)} bytes {got[:60]!r}"

    def ping(self, payload=b"hb"):
        self.sock.sendall(encode_frame(OP_PING, payload, mask=True))
        opcode, got = read_message(self.sock)
        assert (opcode, got) == (OP_PONG, payload), (opcode, got)

    def close(self):
        try:
            self.sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))
            self.sock.settimeout(2)
            read_message(self.sock)
        except (OSError, ConnectionError):
            pass
        finally:
            self.sock.close()


def _messages(n: int):
    """Deterministic mix of text and binary payloads of many sizes (0 B .. 70 KB)."""
    sizes = [0, 1, 125, 126, 127, 200, 65535, 65536, 70000]
    out = []
    for i in range(n):
        size = sizes[i % len(sizes)] if i % 10 == 0 else (i * 37) % 3000
        if i % 2:
            out.append(f"t{i}:" + "x" * size)
        else:
            out.append(bytes((i + j) % 256 for j in range(size)) if size < 4096 else os.urandom(size))
    return out


def version_route(v: int) -> dict:
    return {"name": "version", "match": {"path": "/version"},
            "respond": {"status": 200, "body": f"v{v}", "headers": {"content-type": "text/plain"}}}


# --------------------------------------------------------------------------- tests

@pytest.fixture
def ws_backend(procs):
    s = WSEchoServer()
    procs.extra_cleanup.append(s.close)
    return s


def ws_config(backend: WSEchoServer, v: int, **extra) -> dict:
    cfg = {
        "upstreams": {"ws": {"endpoints": [backend.address], "timeouts": {"connect": "2s", "read": "120s"}}},
        "routes": [version_route(v), {"name": "ws", "match": {"path_prefix": "/ws"}, "upstream": "ws"}],
    }
    cfg.update(extra)
    return cfg


def test_ws_echo_1000_and_survives_10_reloads(procs, ws_backend):
    gw = procs.gateway(ws_config(ws_backend, 0))
    assert gw.get("/version").body == b"v0"
    ws = WSClient(gw.port, "/ws/chat", timeout=30)
    assert ws.status == 101, (ws.status, ws.headers, ws.body)
    up = ws_backend.upgrades[-1]
    assert up["request_line"] == "GET /ws/chat HTTP/1.1", up
    assert up["headers"].get("upgrade", "").lower() == "websocket", up
    assert up["headers"].get("x-request-id"), f"no x-request-id on the forwarded upgrade: {up}"

    msgs = _messages(1000)
    # half one by one, half pipelined in batches of 50 (the gateway must keep order)
    for m in msgs[:500]:
        ws.echo(m)
    for i in range(500, 1000, 50):
        batch = msgs[i:i + 50]
        for m in batch:
            ws.send(m)
        for m in batch:
            op, got = ws.recv()
            want = m.encode() if isinstance(m, str) else m
            assert got == want, f"message {i}: got {len(got)} bytes, want {len(want)}"
    ws.ping(b"after-1000")

    for v in range(1, 11):
        gw.write_config(ws_config(ws_backend, v))
        r = gw.reload()
        assert r.status == 200, f"reload {v}: {r}"
        # the new config is live ...
        wait_until(lambda: gw.get("/version").body == f"v{v}".encode(), 5, what=f"config version v{v} served")
        # ... and the old socket still echoes, both ways
        ws.echo(f"after reload {v}")
        ws.echo(os.urandom(1000 + v))
    assert ws_backend.connections == 1, f"the backend saw {ws_backend.connections} connections (want 1)"
    assert len(ws_backend.upgrades) == 1
    ws.close()
    wait_until(lambda: ws_backend.open_sockets == 0, 5, what="backend socket closed after the client's close")


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(secret: str, claims: dict, alg="HS256") -> str:
    h = _b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    p = _b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{_b64url(sig)}"


def test_ws_jwt_refuses_unauthenticated_upgrade(procs, ws_backend):
    secret = "ws-secret-0123456789-abcdefghijklmnop"
    cfg = ws_config(ws_backend, 0)
    cfg["routes"].insert(0, {"name": "secure-ws", "match": {"path_prefix": "/secure"}, "upstream": "ws",
                             "plugins": [{"jwt": {"algorithms": ["HS256"], "secret": secret}}]})
    gw = procs.gateway(cfg)
    now = int(time.time())
    cases = [
        ("no token", {}),
        ("bad signature", {"Authorization": "Bearer " + make_jwt("wrong-secret-wrong-secret-wrong", {"sub": "u", "exp": now + 300})}),
        ("expired", {"Authorization": "Bearer " + make_jwt(secret, {"sub": "u", "exp": now - 3600})}),
    ]
    for what, hdrs in cases:
        ws = WSClient(gw.port, "/secure/chat", hdrs)
        try:
            assert ws.status == 401, f"{what}: upgrade answered {ws.status} {ws.headers} {ws.body[:200]!r}"
            assert ws.headers.get("www-authenticate", "").startswith("Bearer"), ws.headers
            assert json.loads(ws.body).get("error"), ws.body
        finally:
            ws.sock.close()
    assert ws_backend.connections == 0, "the backend saw an unauthenticated upgrade"

    good = make_jwt(secret, {"sub": "alice", "exp": now + 300})
    ws = WSClient(gw.port, "/secure/chat", {"Authorization": f"Bearer {good}"})
    assert ws.status == 101, (ws.status, ws.body)
    for i in range(20):
        ws.echo(f"secure {i}")
    ws.close()
    assert ws_backend.connections == 1


def test_ws_closed_at_end_of_grace_period_after_sigterm(procs, ws_backend):
    grace = 2.0
    gw = procs.gateway(ws_config(ws_backend, 0, server={"grace_period": "2s"}))
    ws = WSClient(gw.port, "/ws/long", timeout=15)
    assert ws.status == 101
    for i in range(10):
        ws.echo(f"before {i}")

    gw.signal(signal.SIGTERM)
    t_term = time.monotonic()
    # during the grace period the socket still works
    time.sleep(0.7)
    ws.echo("during grace")
    t_echo = time.monotonic() - t_term
    assert t_echo < grace, f"echo during the grace period only finished {t_echo:.2f}s after SIGTERM"

    # then it is closed (EOF/reset, or a close frame followed by EOF) when the grace period ends
    ws.sock.settimeout(grace + 8)
    closed_how = None
    try:
        while True:
            op, payload = read_message(ws.sock)
            if op == OP_CLOSE:
                closed_how = f"close frame {payload[:2].hex()}"
                try:
                    read_message(ws.sock)
                except (ConnectionError, OSError):
                    pass
                break
    except (ConnectionError, OSError) as e:
        closed_how = repr(e)
    t_closed = time.monotonic() - t_term
    assert closed_how is not None and "timed out" not in closed_how, \
        f"the WebSocket was not closed within {grace + 8:.0f}s after SIGTERM ({closed_how})"
    assert grace - 0.5 <= t_closed <= grace + 2.5, \
        f"WebSocket closed {t_closed:.2f}s after SIGTERM; want at the end of the {grace:.0f}s grace period ({closed_how})"
    print(f"WebSocket closed {t_closed:.2f}s after SIGTERM ({closed_how})")
    rc = gw.wait_exit(10)
    t_exit = time.monotonic() - t_term
    assert rc == 0, f"gateway exit code {rc} (want 0) after {t_exit:.2f}s"
    assert t_exit <= grace + 4, f"gateway exited {t_exit:.2f}s after SIGTERM"
    ws.sock.close()
