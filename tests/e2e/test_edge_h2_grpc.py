"""HTTP/2 and gRPC at the edge, end to end.

* h2load: 10,000 requests over 10 connections with 100 concurrent streams each, through a
  TLS listener (h2 via ALPN) and a plain listener (h2c with prior knowledge), proxied to a
  demo backend; every answer must be 2xx.
* gRPC with grpcio (generic handlers, raw bytes, no protoc): the server listens h2c, the
  gateway's upstream is `protocol: h2c`, clients come over h2c and over TLS. Unary calls
  (up to 1 MiB), a 100-message bidirectional stream, metadata both ways, trailers and a
  custom status; gateway errors become gRPC statuses: no healthy endpoint / refused
  connection -> 14 UNAVAILABLE, no route -> 12 UNIMPLEMENTED, jwt -> 16 UNAUTHENTICATED,
  route timeout -> 4 DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures

import pytest

from conftest import free_port, wait_until
from test_edge_tls import PKI, cert_pair


def _import_grpc():
    try:
        import grpc as mod
        return mod
    except ImportError:
        pass
    # grpcio is a dependency of these tests only: install it when missing (one bounded try)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "grpcio"], capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        import grpc as mod
        return mod
    except ImportError:
        return None


grpc = _import_grpc()
needs_grpc = pytest.mark.skipif(grpc is None, reason="grpcio is not installed and could not be installed "
                                                     "(python3 -m pip install grpcio)")

H2LOAD_TIMEOUT = 240


# --------------------------------------------------------------------------- h2load

def _h2load_bin() -> str:
    path = shutil.which("h2load")
    if path is None:
        # Debian: nghttp2-client; try once, quietly
        subprocess.run(["apt-get", "install", "-y", "nghttp2-client"], capture_output=True, timeout=300)
        path = shutil.which("h2load")
    if path is None:
        pytest.fail("h2load not found (apt-get install -y nghttp2-client)", pytrace=False)
    return path


def run_h2load(url: str, n=10000, c=10, m=100) -> dict:
    p = subprocess.run([_h2load_bin(), "-n", str(n), "-c", str(c), "-m", str(m), url],
                       capture_output=True, text=True, timeout=H2LOAD_TIMEOUT)
    out = p.stdout + p.stderr
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    assert req and codes, f"h2load output not understood (rc {p.returncode}):\n{out[-3000:]}"
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    res = dict(zip(keys, map(int, req.groups())))
    res.update(dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups()))))
    res["protocol"] = proto.group(1) if proto else None
    res["rc"] = p.returncode
    res["out"] = out
    return res


def test_h2load_tls_and_h2c(procs, tmp_path):
    pki = PKI(tmp_path / "pki").standard()
    backend = procs.backend("h2-echo")
    tls_port, h2c_port = free_port(), free_port()
    gw = procs.gateway({
        "listeners": [
            {"name": "tls", "bind": f"127.0.0.1:{tls_port}", "http2": True,
             "tls": {"certificates": [cert_pair(pki.localhost)]}},
            {"name": "h2c", "bind": f"127.0.0.1:{h2c_port}", "http2": True},
        ],
        "server": {"h2_max_concurrent_streams": 100},
        "upstreams": {"echo": {"endpoints": [backend.address], "timeouts": {"connect": "5s", "read": "60s"}}},
        "routes": [{"name": "echo", "match": {"path_prefix": "/"}, "upstream": "echo"}],
    })
    for url, proto in ((f"https://127.0.0.1:{tls_port}/load/tls", "h2"),
                       (f"http://127.0.0.1:{h2c_port}/load/h2c", "h2c")):
        t0 = time.monotonic()
        res = run_h2load(url)
        took = time.monotonic() - t0
        summary = {k: v for k, v in res.items() if k != "out"}
        assert res["protocol"] == proto, f"{url}: negotiated {res['protocol']!r}, want {proto}\n{res['out'][-2000:]}"
        assert res["total"] == 10000 and res["done"] == 10000, summary
        assert res["succeeded"] == 10000 and res["failed"] == 0 and res["errored"] == 0 and res["timeout"] == 0, \
            f"{url}: {summary}\n{res['out'][-2000:]}"
        assert res["2xx"] == 10000, f"{url}: not all 2xx: {summary}"
        print(f"h2load {url}: 10000 requests in {took:.1f}s")
    assert gw.alive()
    stats = gw.admin_json("/upstreams")
    assert stats["echo"]["endpoints"][0]["healthy"] is True


# --------------------------------------------------------------------------- gRPC server

class EchoServer:
    """grpcio server on 127.0.0.1 (insecure = h2c) with generic bytes handlers for service echo.Echo."""

    def __init__(self):
        self.seen_metadata: list[dict] = []
        self.lock = threading.Lock()

        def record(context):
            md = {k: v for k, v in context.invocation_metadata()}
            with self.lock:
                self.seen_metadata.append(md)
            return md

        def unary(request: bytes, context):
            md = record(context)
            context.send_initial_metadata((("x-initial", "i1"),))
            context.set_trailing_metadata((("x-trailer", "t1"), ("x-client-echo", md.get("x-client", "")),
                                           ("x-len", str(len(request)))))
            return b"echo:" + request

        def fail(request: bytes, context):
            record(context)
            context.set_trailing_metadata((("x-why", "because"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "custom failure: " + request.decode())

        def slow(request: bytes, context):
            record(context)
            time.sleep(3)
            return b"late"

        def bidi(request_iterator, context):
            record(context)
            n = 0
            for msg in request_iterator:
                n += 1
                yield b"pong:" + msg
            context.set_trailing_metadata((("x-count", str(n)),))

        handler = grpc.method_handlers_generic_handler("echo.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop(grace=None)


def _jwt_route():
    return {"name": "secure", "match": {"path_prefix": "/secure.Echo/"}, "upstream": "grpc",
            "plugins": [{"jwt": {"algorithms": ["HS256"], "secret": "s3cret-s3cret-s3cret-s3cret-0123"}}]}


@pytest.fixture
def grpc_env(procs, tmp_path):
    pki = PKI(tmp_path / "pki").standard()
    server = EchoServer()
    procs.extra_cleanup.append(server.stop)
    dead_port, down_port = free_port(), free_port()   # nothing listens on either
    h2c_port, tls_port = free_port(), free_port()
    gw = procs.gateway({
        "listeners": [
            {"name": "h2c", "bind": f"127.0.0.1:{h2c_port}", "http2": True},
            {"name": "tls", "bind": f"127.0.0.1:{tls_port}", "http2": True,
             "tls": {"certificates": [cert_pair(pki.localhost)]}},
        ],
        "upstreams": {
            "grpc": {"endpoints": [server.address], "protocol": "h2c",
                     "timeouts": {"connect": "2s", "read": "30s"}},
            "dead": {"endpoints": [f"127.0.0.1:{dead_port}"], "protocol": "h2c", "timeouts": {"connect": "1s"}},
            "down": {"endpoints": [f"127.0.0.1:{down_port}"], "protocol": "h2c",
                     "health_check": {"path": "/healthz", "interval": "200ms", "timeout": "200ms",
                                      "healthy_threshold": 1, "unhealthy_threshold": 1}},
        },
        "routes": [
            {"name": "grpc", "match": {"path_prefix": "/echo.Echo/"}, "upstream": "grpc"},
            {"name": "slow", "match": {"path": "/slow.Echo/Slow"}, "upstream": "grpc", "timeout": "500ms",
             "rewrite": {"path_regex": "^/slow\\.Echo/", "replacement": "/echo.Echo/"}},
            {"name": "dead", "match": {"path_prefix": "/dead.Echo/"}, "upstream": "dead"},
            {"name": "down", "match": {"path_prefix": "/down.Echo/"}, "upstream": "down"},
            _jwt_route(),
        ],
    })
    channels = {
        "h2c": grpc.insecure_channel(f"127.0.0.1:{h2c_port}"),
        "tls": grpc.secure_channel(f"127.0.0.1:{tls_port}",
                                   grpc.ssl_channel_credentials(root_certificates=pki.ca_crt.read_bytes()),
                                   options=[("grpc.ssl_target_name_override", "localhost")]),
    }
    try:
        yield {"gw": gw, "server": server, "channels": channels}
    finally:
        for ch in channels.values():
            ch.close()


@needs_grpc
@pytest.mark.parametrize("via", ["h2c", "tls"])
def test_grpc_unary_through_gateway(grpc_env, via):
    ch = grpc_env["channels"][via]
    server = grpc_env["server"]
    unary = ch.unary_unary("/echo.Echo/Unary")
    for size in (0, 1, 1000, 256 * 1024, 1024 * 1024 - 64):
        payload = bytes((i * 7) % 251 for i in range(size))
        resp, call = unary.with_call(payload, metadata=(("x-client", f"c-{size}"),), timeout=20)
        assert resp == b"echo:" + payload, f"size {size}: echo mismatch ({len(resp)} bytes back)"
        assert call.code() == grpc.StatusCode.OK
        init = dict(call.initial_metadata())
        trail = dict(call.trailing_metadata())
        assert init.get("x-initial") == "i1", init
        assert trail.get("x-trailer") == "t1" and trail.get("x-client-echo") == f"c-{size}", trail
        assert trail.get("x-len") == str(size), trail
    # it really went through the gateway
    md = server.seen_metadata[-1]
    assert md.get("x-forwarded-proto") == ("https" if via == "tls" else "http"), md
    assert md.get("x-request-id"), md


@needs_grpc
@pytest.mark.parametrize("via", ["h2c", "tls"])
def test_grpc_bidi_stream_through_gateway(grpc_env, via):
    ch = grpc_env["channels"][via]
    bidi = ch.stream_stream("/echo.Echo/Bidi")
    n = 100
    sent = []
    got = []
    gate = threading.Semaphore(0)

    def requests():
        # ping-pong: each message waits for the previous answer, so the stream is truly interleaved
        for i in range(n):
            msg = f"ping-{i}".encode() * (1 + i % 5)
            sent.append(msg)
            yield msg
            if not gate.acquire(timeout=20):
                return

    call = bidi(requests(), metadata=(("x-client", "bidi"),), timeout=60)
    for resp in call:
        got.append(resp)
        gate.release()
    assert call.code() == grpc.StatusCode.OK, call.details()
    assert len(got) == n, f"{len(got)} answers for {n} messages"
    assert got == [b"pong:" + m for m in sent]
    assert dict(call.trailing_metadata()).get("x-count") == str(n), call.trailing_metadata()

    # and a burst: 100 messages sent at once, all answered in order
    burst = [f"b{i}".encode() for i in range(n)]
    call = bidi(iter(burst), timeout=60)
    answers = list(call)
    assert answers == [b"pong:" + m for m in burst]
    assert dict(call.trailing_metadata()).get("x-count") == str(n)


@needs_grpc
@pytest.mark.parametrize("via", ["h2c", "tls"])
def test_grpc_custom_status_and_trailers(grpc_env, via):
    ch = grpc_env["channels"][via]
    with pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary("/echo.Echo/Fail")(b"nope", timeout=10)
    err = ei.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (err.code(), err.details())
    assert err.details() == "custom failure: nope", err.details()
    assert dict(err.trailing_metadata()).get("x-why") == "because", err.trailing_metadata()


GATEWAY_ERROR_CASES = {
    # case: (path, expected code, text in grpc-message)
    "no_endpoint_answers": ("/dead.Echo/Unary", "UNAVAILABLE", "bad_gateway"),        # 502: connect refused
    "health_check_down": ("/down.Echo/Unary", "UNAVAILABLE", "no_healthy_upstream"),  # 503
    "no_route": ("/nope.Svc/Method", "UNIMPLEMENTED", "no_route"),                     # 404
    "jwt_missing": ("/secure.Echo/Unary", "UNAUTHENTICATED", ""),                      # 401
    "route_timeout": ("/slow.Echo/Slow", "DEADLINE_EXCEEDED", "upstream_timeout"),     # 504
}


@pytest.mark.parametrize("case", list(GATEWAY_ERROR_CASES))
@needs_grpc
@pytest.mark.parametrize("via", ["h2c", "tls"])
def test_grpc_gateway_errors_are_grpc_statuses(grpc_env, via, case):
    """A gateway-made error reaches a real gRPC client as the mapped status (trailers-only answer)."""
    gw = grpc_env["gw"]
    server = grpc_env["server"]
    ch = grpc_env["channels"][via]
    path, want, text = GATEWAY_ERROR_CASES[case]
    if case == "health_check_down":
        wait_until(lambda: gw.admin_json("/upstreams")["down"]["endpoints"][0]["healthy"] is False, 10,
                   what="health check marking the `down` endpoint unhealthy")
    before = len(server.seen_metadata)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        # the client allows 15 s: a DEADLINE_EXCEEDED here must come from the gateway's 500ms route timeout
        ch.unary_unary(path)(b"x", timeout=15)
    took = time.monotonic() - t0
    e = ei.value
    assert e.code() == getattr(grpc.StatusCode, want), \
        f"{case} over {via}: got {e.code()} {e.details()!r}, want {want}"
    assert text in (e.details() or ""), f"{case}: grpc-message {e.details()!r} lacks {text!r}"
    assert dict(e.trailing_metadata() or ()).get("x-request-id"), e.trailing_metadata()
    if case == "route_timeout":
        assert took < 2.5, f"the gateway's 500ms route timeout answered after {took:.2f}s"
    else:
        assert len(server.seen_metadata) == before, "the gRPC server saw a call the gateway refused"
    # the channel (one HTTP/2 connection) is still usable after the error
    assert ch.unary_unary("/echo.Echo/Unary")(b"still ok", timeout=10) == b"echo:still ok"


@needs_grpc
def test_grpc_many_concurrent_calls(grpc_env):
    """200 concurrent unary calls multiplexed on one h2c connection, all OK."""
    ch = grpc_env["channels"]["h2c"]
    unary = ch.unary_unary("/echo.Echo/Unary")
    futs = [unary.future(f"m{i}".encode(), timeout=60) for i in range(200)]
    results = [f.result() for f in futs]
    assert results == [f"echo:m{i}".encode() for i in range(200)]
