"""Traffic plugins end to end: `rate_limit` (the GCRA acceptance rate, independent client
addresses, bounded memory with 200,000 distinct keys), `compression` (decoded by real
decoders: zlib/gzip from the standard library, `brotli` and `zstandard` from PyPI, and
curl --compressed; small, large streamed and chunked bodies; q-values; already-encoded
bodies untouched), `cors` (preflight answered by the gateway, actual requests),
`ip_filter` (IPv4 and IPv6), `request_size` (413 on declared and streamed bodies) and
`headers`.

`brotli` and `zstandard` are installed with pip when missing."""

import gzip
import http.client
import importlib
import json
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import assert_gateway_error, free_port, http_request, slow, wait_http_ok

MIB = 1 << 20


def _module(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", name], check=False,
                       capture_output=True, timeout=300)
        try:
            return importlib.import_module(name)
        except ImportError:
            return None


brotli = _module("brotli")
zstandard = _module("zstandard")


def ipv6_loopback() -> bool:
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- a content upstream

JSON_BODY = json.dumps({"items": [{"id": i, "name": f"item-{i}", "tags": ["a", "b", "c"]} for i in range(1500)]}
                       ).encode()
SMALL_BODY = b'{"ok":true,"pad":"' + b"x" * 100 + b'"}'
CHUNKS = [f"chunk {i}: {'lorem ipsum dolor sit amet ' * 40}\n".encode() for i in range(30)]
TEXT = b"".join(CHUNKS)
ENCODED = gzip.compress(TEXT)


class ContentServer:
    """Deterministic bodies: /json, /small, /chunked (Transfer-Encoding: chunked, slowly),
    /encoded (already gzip), /nt (Cache-Control: no-transform)."""

    def __init__(self):
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _fixed(self, body, ctype, extra=()):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                p = self.path.split("?")[0].rsplit("/", 1)[-1]
                if p == "json":
                    self._fixed(JSON_BODY, "application/json",
                                [("ETag", '"v1"'), ("Vary", "Origin"), ("Accept-Ranges", "bytes")])
                elif p == "small":
                    self._fixed(SMALL_BODY, "application/json")
                elif p == "encoded":
                    self._fixed(ENCODED, "text/plain", [("Content-Encoding", "gzip")])
                elif p == "nt":
                    self._fixed(TEXT, "text/plain", [("Cache-Control", "no-transform")])
                elif p == "chunked":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for c in CHUNKS:
                        self.wfile.write(f"{len(c):x}\r\n".encode() + c + b"\r\n")
                        self.wfile.flush()
                        time.sleep(0.005)
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self._fixed(b"not found", "text/plain")

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the gateway

def respond(name, path, plugins):
    return {"name": name, "match": {"path_prefix": path}, "plugins": plugins,
            "respond": {"status": 200, "body": f"{name}\n", "headers": {"content-type": "text/plain"}}}


@pytest.fixture(scope="module")
def env(module_procs):
    demo = module_procs.backend("bulk")
    counted = module_procs.py_backend("counted")
    content = ContentServer()
    module_procs.extra_cleanup.append(content.close)
    all_codings = ["gzip", "br", "zstd", "deflate"]
    routes = [
        respond("rl", "/rl", [{"rate_limit": {"requests": 10, "per": "1s", "burst": 5}}]),
        respond("rlip", "/rlip", [{"rate_limit": {"requests": 3, "per": "1m"}}]),
        {"name": "content", "match": {"path_prefix": "/content"}, "upstream": "content",
         "plugins": [{"compression": {"algorithms": all_codings}}]},
        {"name": "bytes", "match": {"path_prefix": "/bytes"}, "upstream": "bulk", "timeout": "300s",
         "plugins": [{"compression": {"algorithms": all_codings,
                                      "content_types": ["application/octet-stream"]}}]},
        {"name": "cors", "match": {"path_prefix": "/cors"}, "upstream": "counted",
         "plugins": [{"cors": {"allow_origins": ["https://app.test", "https://*.corp.test"],
                               "allow_methods": ["GET", "POST", "DELETE"],
                               "allow_headers": ["content-type", "authorization"],
                               "expose_headers": ["x-total"], "max_age": "10m",
                               "allow_credentials": True}},
                     {"api_key": {"keys": {"k1": "one"}}}]},
        respond("deny6", "/ip/deny6", [{"ip_filter": {"deny": ["::1"]}}]),
        respond("allow6", "/ip/allow6", [{"ip_filter": {"allow": ["::1/128", "2001:db8::/32"]}}]),
        respond("allow4", "/ip/allow4", [{"ip_filter": {"allow": ["127.0.0.1"]}}]),
        respond("deny4", "/ip/deny4", [{"ip_filter": {"allow": ["127.0.0.0/8"], "deny": ["127.0.0.2"]}}]),
        {"name": "size", "match": {"path_prefix": "/size"}, "upstream": "bulk",
         "plugins": [{"request_size": {"max_body": "64KiB"}}]},
        {"name": "hdrs", "match": {"path_prefix": "/hdrs"}, "upstream": "counted",
         "plugins": [{"headers": {"request": {"set": {"x-env": "e2e"}, "remove": ["x-debug"],
                                              "add": {"x-tag": ["a", "b"]}},
                                  "response": {"set": {"x-gw": "portico"}, "remove": ["x-served-by"],
                                               "add": {"x-extra": "1"}}}}]},
    ]
    cfg = {"upstreams": {"content": {"endpoints": [content.address]},
                         "bulk": {"endpoints": [demo.address], "timeouts": {"connect": "2s", "read": "120s"}},
                         "counted": {"endpoints": [counted.address]}},
           "routes": routes}
    gw = module_procs.gateway(cfg, start=False)
    port6 = None
    listeners = [{"name": "web", "bind": f"127.0.0.1:{gw.port}"}]
    if ipv6_loopback():
        port6 = free_port()
        listeners.append({"name": "web6", "bind": f"[::1]:{port6}"})
    gw.write_config({"listeners": listeners, **cfg})
    gw.start()
    return {"gw": gw, "demo": demo, "counted": counted, "content": content, "port6": port6}


def get_from(port, path, source, headers=None, host="127.0.0.1"):
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        return http_request(port, "GET", path, headers, conn=conn)
    finally:
        conn.close()


# --------------------------------------------------------------------------- rate_limit

def test_rate_limit_acceptance_rate(env):
    gw = env["gw"]
    accepted = 0
    start = time.monotonic()
    for i in range(100):
        due = start + i * 0.02
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        r = gw.get("/rl")
        for h in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
            assert r.header(h) is not None, f"{h} missing: {r}"
        assert r.header("ratelimit-limit") == "5"
        if r.status == 200:
            accepted += 1
        else:
            assert_gateway_error(r, 429, "rate_limited")
            assert r.header("retry-after") == "1", r   # <= 100 ms, rounded up
            assert r.header("ratelimit-remaining") == "0"
    elapsed = time.monotonic() - start
    assert 24 <= accepted <= 26, f"{accepted} accepted in {elapsed:.2f}s"


def test_rate_limit_client_addresses_are_independent(env):
    port = env["gw"].port
    for src in ("127.0.0.1", "127.0.0.2"):
        statuses = [get_from(port, "/rlip", src).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429], (src, statuses)
    r = get_from(port, "/rlip", "127.0.0.1")
    assert r.status == 429 and int(r.header("retry-after")) >= 1


@slow
def test_rate_limit_memory_with_200k_keys(procs):
    gw = procs.gateway({"routes": [respond("many", "/", [{"rate_limit": {
        "requests": 5, "per": "1m", "key": "header:x-key"}}])]})
    threads, per_thread = 4, 50_000
    errors = []

    def client(t, n, prefix):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        try:
            for i in range(n):
                conn.request("GET", "/", headers={"x-key": f"{prefix}-{t}-{i}-{'k' * 40}"})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
                    return
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            conn.close()

    # Warm up (allocator arenas, buffers), then measure.
    ws = [threading.Thread(target=client, args=(t, 2000, "warm")) for t in range(threads)]
    [w.start() for w in ws]
    [w.join() for w in ws]
    assert not errors, errors
    base = gw.rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], gw.rss_bytes())
            time.sleep(0.05)

    s = threading.Thread(target=sample, daemon=True)
    s.start()
    t0 = time.monotonic()
    ts = [threading.Thread(target=client, args=(t, per_thread, "load")) for t in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    stop.set()
    s.join(2)
    assert not errors, errors[:5]
    growth = peak[0] - base
    print(f"rate_limit: {threads * per_thread} keys in {time.monotonic() - t0:.1f}s, "
          f"RSS {base / MIB:.1f} -> peak {peak[0] / MIB:.1f} MiB")
    assert growth < 100 * MIB, f"RSS grew by {growth / MIB:.1f} MiB over {threads * per_thread} keys " \
                               f"in {time.monotonic() - t0:.1f}s"
    # Still limiting.
    statuses = [gw.get("/", {"x-key": "same"}).status for _ in range(7)]
    assert statuses.count(429) == 2, statuses


# --------------------------------------------------------------------------- compression

def decode(coding, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "deflate":
        return zlib.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise ValueError(coding)


def codings():
    out = ["gzip", "deflate"]
    if brotli is not None:
        out.append("br")
    if zstandard is not None:
        out.append("zstd")
    return out


def test_compression_small_json_every_coding(env):
    gw = env["gw"]
    plain = gw.get("/content/json", {"Accept-Encoding": "identity"})
    assert plain.status == 200 and plain.header("content-encoding") is None
    assert plain.body == JSON_BODY
    assert brotli is not None and zstandard is not None, "pip install brotli zstandard"
    for c in codings():
        r = gw.get("/content/json", {"Accept-Encoding": c})
        assert r.status == 200
        assert r.header("content-encoding") == c, r
        assert r.header("content-length") is None
        assert r.header("accept-ranges") is None
        assert r.header("etag") == 'W/"v1"', r
        vary = [v.strip().lower() for v in ",".join(r.headers_all("vary")).split(",")]
        assert "origin" in vary and "accept-encoding" in vary, r
        assert len(r.body) < len(JSON_BODY) / 4
        assert decode(c, r.body) == JSON_BODY, c


def test_compression_curl_compressed(env):
    gw = env["gw"]
    for c in codings():
        out = subprocess.run(["curl", "-sS", "--compressed", "-H", f"Accept-Encoding: {c}", "-D", "-",
                              "-o", "/dev/stdout", f"http://127.0.0.1:{gw.port}/content/json"],
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        head, _, body = out.stdout.partition(b"\r\n\r\n")
        assert f"content-encoding: {c}".encode() in head.lower(), head
        assert body == JSON_BODY, c


def test_compression_chunked_upstream(env):
    gw = env["gw"]
    for c in codings():
        r = gw.get("/content/chunked", {"Accept-Encoding": c})
        assert r.status == 200 and r.header("content-encoding") == c, r
        assert decode(c, r.body) == TEXT, c


def test_compression_skips(env):
    gw = env["gw"]
    # Small bodies, already-encoded bodies, no-transform, Range, HEAD.
    r = gw.get("/content/small", {"Accept-Encoding": "gzip"})
    assert r.header("content-encoding") is None and r.body == SMALL_BODY
    r = gw.get("/content/encoded", {"Accept-Encoding": "br, gzip, zstd"})
    assert r.header("content-encoding") == "gzip" and r.body == ENCODED, "re-encoded or altered"
    r = gw.get("/content/nt", {"Accept-Encoding": "gzip"})
    assert r.header("content-encoding") is None and r.body == TEXT
    r = gw.get("/content/json", {"Accept-Encoding": "gzip", "Range": "bytes=0-99"})
    assert r.header("content-encoding") is None
    r = gw.request("HEAD", "/content/json", {"Accept-Encoding": "gzip"})
    assert r.header("content-encoding") is None and r.body == b""


def test_compression_q_values(env):
    gw = env["gw"]
    cases = [
        ("gzip, br, zstd", "gzip"),                       # tie: the server's order
        ("gzip;q=0.5, br;q=0.9", "br"),
        ("gzip;q=0.1, zstd;q=0.8, br;q=0.5", "zstd"),
        ("br;q=0, gzip;q=0, zstd;q=0, deflate;q=0", None),
        ("*;q=0", None),
        ("*", "gzip"),
        ("*;q=0.5, gzip;q=0", "br"),
        ("identity", None),
        ("gzip;q=0.4, identity;q=1", None),
        ("deflate", "deflate"),
        ("compress, x-unknown", None),
    ]
    for accept, want in cases:
        r = gw.get("/content/json", {"Accept-Encoding": accept})
        assert r.status == 200
        assert r.header("content-encoding") == want, f"{accept!r}: {r.header('content-encoding')}"
        body = r.body if want is None else decode(want, r.body)
        assert body == JSON_BODY, accept


def _stream_check(port, coding, n):
    """Downloads /bytes/n with `coding`, decoding as it streams; returns (decoded bytes, wire bytes)."""
    if coding == "gzip":
        d = zlib.decompressobj(wbits=31)
        feed = d.decompress
    elif coding == "deflate":
        d = zlib.decompressobj()
        feed = d.decompress
    elif coding == "br":
        d = brotli.Decompressor()
        feed = d.process
    else:
        d = zstandard.ZstdDecompressor().decompressobj()
        feed = d.decompress
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("GET", f"/bytes/{n}", headers={"Accept-Encoding": coding})
        r = conn.getresponse()
        assert r.status == 200
        assert r.getheader("content-encoding") == coding
        assert r.getheader("content-length") is None
        got = wire = 0
        while True:
            chunk = r.read(256 * 1024)
            if not chunk:
                break
            wire += len(chunk)
            out = feed(chunk)
            assert out.count(b"x") == len(out), "corrupted"
            got += len(out)
        if coding in ("gzip", "deflate"):
            tail = d.flush()
            assert tail.count(b"x") == len(tail)
            got += len(tail)
        return got, wire
    finally:
        conn.close()


@slow
def test_compression_large_streamed(env):
    gw = env["gw"]
    n = 50 * MIB
    base = gw.rss_bytes()
    for c in codings():
        got, wire = _stream_check(gw.port, c, n)
        assert got == n, f"{c}: {got} bytes decoded, expected {n}"
        assert wire < n / 50, f"{c}: {wire} bytes on the wire"
    assert gw.rss_bytes() - base < 64 * MIB, "the body was buffered"
    # curl agrees, byte for byte (counted, not stored).
    out = subprocess.run(f"curl -sS --compressed -H 'Accept-Encoding: zstd' "
                         f"http://127.0.0.1:{gw.port}/bytes/{n} | tr -d x | wc -c",
                         shell=True, capture_output=True, timeout=300, text=True)
    assert out.stdout.strip() == "0", out
    out = subprocess.run(f"curl -sS --compressed http://127.0.0.1:{gw.port}/bytes/{n} | wc -c",
                         shell=True, capture_output=True, timeout=300, text=True)
    assert out.stdout.strip() == str(n), out


# --------------------------------------------------------------------------- cors

def test_cors_preflight_answered_by_the_gateway(env):
    gw, counted = env["gw"], env["counted"]
    before = counted.count()
    r = gw.request("OPTIONS", "/cors/items", {"Origin": "https://app.test", "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "Content-Type, Authorization"})
    assert r.status == 204, r
    assert r.header("access-control-allow-origin") == "https://app.test"
    assert r.header("access-control-allow-methods") == "GET, POST, DELETE"
    assert r.header("access-control-allow-headers") == "content-type, authorization"
    assert r.header("access-control-allow-credentials") == "true"
    assert r.header("access-control-max-age") == "600"
    assert "Origin" in r.header("vary")
    r = gw.request("OPTIONS", "/cors/items", {"Origin": "https://a.b.corp.test",
                                              "Access-Control-Request-Method": "GET"})
    assert r.status == 204 and r.header("access-control-allow-origin") == "https://a.b.corp.test"
    for h in ({"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"},
              {"Origin": "https://app.test", "Access-Control-Request-Method": "PATCH"},
              {"Origin": "https://app.test", "Access-Control-Request-Method": "GET",
               "Access-Control-Request-Headers": "x-secret"}):
        r = gw.request("OPTIONS", "/cors/items", h)
        assert_gateway_error(r, 403, "cors_forbidden")
        assert r.header("access-control-allow-origin") is None
    assert counted.count() == before, "a preflight reached the backend"


def test_cors_actual_requests(env):
    gw = env["gw"]
    r = gw.get("/cors/items", {"Origin": "https://app.test", "x-api-key": "k1"})
    assert r.status == 200, r
    assert r.header("access-control-allow-origin") == "https://app.test"
    assert r.header("access-control-allow-credentials") == "true"
    assert r.header("access-control-expose-headers") == "x-total"
    assert "origin" in r.header("vary", "").lower()
    # A rejection by a later plugin (api_key) stays readable by the page.
    r = gw.get("/cors/items", {"Origin": "https://app.test"})
    assert r.status == 401 and r.header("access-control-allow-origin") == "https://app.test", r
    # Another origin: no CORS headers (the browser blocks the read), the request still goes on.
    r = gw.get("/cors/items", {"Origin": "https://evil.test", "x-api-key": "k1"})
    assert r.status == 200 and r.header("access-control-allow-origin") is None
    r = gw.get("/cors/items", {"x-api-key": "k1"})
    assert r.status == 200 and r.header("access-control-allow-origin") is None


# --------------------------------------------------------------------------- ip_filter

def test_ip_filter_ipv4(env):
    port = env["gw"].port
    assert get_from(port, "/ip/allow4", "127.0.0.1").status == 200
    r = get_from(port, "/ip/allow4", "127.0.0.2")
    assert_gateway_error(r, 403, "forbidden")
    assert get_from(port, "/ip/deny4", "127.0.0.3").status == 200
    assert get_from(port, "/ip/deny4", "127.0.0.2").status == 403, "deny wins over allow"
    assert get_from(port, "/ip/deny6", "127.0.0.1").status == 200
    assert get_from(port, "/ip/allow6", "127.0.0.1").status == 403


def test_ip_filter_ipv6(env):
    port6 = env["port6"]
    if port6 is None:
        pytest.skip("no IPv6 loopback on this machine")

    def get6(path):
        conn = http.client.HTTPConnection("::1", port6, timeout=10)
        try:
            return http_request(port6, "GET", path, {"Host": "localhost"}, conn=conn)
        finally:
            conn.close()

    assert_gateway_error(get6("/ip/deny6"), 403, "forbidden")
    assert get6("/ip/allow6").status == 200
    assert get6("/ip/allow4").status == 403


# --------------------------------------------------------------------------- request_size

def test_request_size_declared(env):
    gw = env["gw"]
    r = gw.request("POST", "/size", body=b"a" * (64 * 1024))
    assert r.status == 200 and r.json()["body_bytes"] == 64 * 1024
    r = gw.request("POST", "/size", body=b"a" * (64 * 1024 + 1))
    assert_gateway_error(r, 413, "payload_too_large")


def _chunked_post(port, total, chunk=16 * 1024):
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        s.sendall(b"POST /size HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        try:
            while sent < total:
                n = min(chunk, total - sent)
                s.sendall(f"{n:x}\r\n".encode() + b"b" * n + b"\r\n")
                sent += n
                time.sleep(0.002)
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass   # the gateway answered and closed while the body was still coming
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 12:
                part = s.recv(65536)
                if not part:
                    break
                data += part
            head, _, rest = data.partition(b"\r\n\r\n")
            # Read the rest of a small body, if any is still coming.
            s.settimeout(1)
            while True:
                part = s.recv(65536)
                if not part:
                    break
                rest += part
        except OSError:
            head, _, rest = data.partition(b"\r\n\r\n")
        return head.decode("latin-1"), rest
    finally:
        s.close()


def test_request_size_streamed(env):
    port = env["gw"].port
    head, body = _chunked_post(port, 32 * 1024)
    assert head.startswith("HTTP/1.1 200"), head
    head, body = _chunked_post(port, 256 * 1024)
    assert head.startswith("HTTP/1.1 413"), head
    assert b"payload_too_large" in body


# --------------------------------------------------------------------------- headers

def test_headers_plugin_set_and_remove(env):
    gw, counted = env["gw"], env["counted"]
    r = gw.get("/hdrs", {"x-debug": "1", "x-env": "client"})
    assert r.status == 200
    assert r.header("x-gw") == "portico"
    assert r.header("x-served-by") is None
    seen = {k.lower(): v for k, v in counted.requests[-1][2].items()}
    assert seen.get("x-env") == "e2e" and "x-debug" not in seen, seen


def test_headers_plugin_add(env):
    """`add` needs the gateway to apply HeaderEdits::append (one more header line)."""
    gw, counted = env["gw"], env["counted"]
    r = gw.get("/hdrs")
    assert r.header("x-extra") == "1", f"response add not applied (gateway must apply edits.append): {r}"
    # (The counting backend keeps one value per name, so only the presence is checked.)
    req_headers = {k.lower(): v for k, v in counted.requests[-1][2].items()}
    assert "x-tag" in req_headers, f"request add not applied (gateway must apply edits.append): {req_headers}"
