"""Malformed and dangerous requests over raw sockets: each is answered 400 (431 for oversized
headers), never forwarded to the backend, and the gateway stays up.

The upstream is an in-process counting backend, so "never forwarded" is checked exactly."""

import json
import socket
import time

import pytest

from conftest import wait_until


def _big_headers():
    lines = b"".join(b"X-Fill-%03d: %s\r\n" % (i, b"a" * 1024) for i in range(100))
    return b"GET /bad-big HTTP/1.1\r\nHost: t.test\r\n" + lines + b"\r\n"


CASES = [
    ("malformed-request-line", b"GET /bad-rl HTTP/1.1 extra words\r\nHost: t.test\r\n\r\n", {400}),
    ("garbage-request-line", b"hello gateway, /bad-garbage is not http\r\n\r\n", {400}),
    ("nul-in-header-name", b"GET /bad-nul HTTP/1.1\r\nHost: t.test\r\nX-Bad\x00Name: v\r\n\r\n", {400}),
    ("del-in-header-name", b"GET /bad-del HTTP/1.1\r\nHost: t.test\r\nX-Bad\x7fName: v\r\n\r\n", {400}),
    ("space-before-colon", b"GET /bad-space HTTP/1.1\r\nHost: t.test\r\nX-Name : v\r\n\r\n", {400}),
    ("nul-in-header-value", b"GET /bad-nulv HTTP/1.1\r\nHost: t.test\r\nX-Val: a\x00b\r\n\r\n", {400}),
    ("100KiB-of-headers", _big_headers(), {431}),
    ("content-length-and-transfer-encoding",
     b"POST /bad-clte HTTP/1.1\r\nHost: t.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /bad-smuggled HTTP/1.1\r\nHost: t.test\r\n\r\n", {400}),
    ("two-different-content-lengths",
     b"POST /bad-2cl HTTP/1.1\r\nHost: t.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", {400}),
    ("non-numeric-content-length",
     b"POST /bad-cl HTTP/1.1\r\nHost: t.test\r\nContent-Length: 5x\r\n\r\nhello", {400}),
]


def raw_exchange(port, data, timeout=5.0):
    """Send raw bytes, read until the server closes or a full response arrived; return raw response bytes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
            if _complete(got):
                break
    finally:
        s.close()
    return got


def _complete(raw):
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            try:
                return len(body) >= int(v.strip())
            except ValueError:
                return False
    return False


def parse_status(raw):
    line = raw.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


@pytest.fixture(scope="module")
def setup(module_procs):
    backend = module_procs.py_backend("counted")
    gw = module_procs.gateway({
        "upstreams": {"counted": {"endpoints": [backend.address]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "counted"}],
    })
    return gw, backend


def test_good_request_is_forwarded(setup):
    gw, backend = setup
    before = backend.count()
    raw = raw_exchange(gw.port, b"GET /good HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n")
    assert parse_status(raw) == 200, raw[:300]
    wait_until(lambda: backend.count() == before + 1, 5, what="the good request to reach the backend")
    assert "/good" in backend.paths()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rejected_and_not_forwarded(setup, case):
    gw, backend = setup
    _id, data, statuses = case
    seen_before = len(backend.paths())
    raw = raw_exchange(gw.port, data)
    status = parse_status(raw)
    time.sleep(0.2)
    leaked = backend.paths()[seen_before:]
    assert raw, "empty reply (connection closed without a response)"
    assert status in statuses, f"expected {sorted(statuses)}, got {raw[:300]!r}; backend received {leaked}"
    assert not leaked, f"backend received requests it should never have seen: {leaked}"
    assert gw.alive(), "gateway died"
    r = gw.get("/still-alive")
    assert r.status == 200, f"gateway not serving after bad input: {r}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rejection_body_is_json(setup, case):
    """operations.md: errors the gateway makes itself are JSON {"error", "message", "request_id"}."""
    gw, _backend = setup
    raw = raw_exchange(gw.port, case[1])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert raw, "empty reply"
    try:
        j = json.loads(body)
    except ValueError:
        raise AssertionError(f"{case[0]}: error body is not JSON: {raw[:400]!r}") from None
    assert isinstance(j, dict) and isinstance(j.get("error"), str) and "request_id" in j, j


def test_gateway_alive_and_backend_clean_at_end(setup):
    gw, backend = setup
    assert gw.alive()
    assert gw.admin("GET", "/healthz").status == 200
    assert gw.get("/final").status == 200
