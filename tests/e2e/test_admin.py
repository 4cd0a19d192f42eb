"""Admin API, metrics, forwarding headers, route actions, gateway errors and the access log."""

import collections
import json
import re
import time

import pytest

from conftest import (REQUEST_ID_HEADER, KeepAliveClient, assert_gateway_error, free_port, metric_samples, metric_sum,
                      run_cli,
                      parse_metrics, wait_until)

TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@pytest.fixture(scope="module")
def env(module_procs):
    echo, hosted, s1, s2, slow = module_procs.backends("echo", "hosted", "s1", "s2", "slowpoke")
    dead_port = free_port()   # nothing listens there
    cfg = {
        "upstreams": {
            "echo": {"endpoints": [echo.address]},
            "hosted": {"endpoints": [hosted.address], "host": "internal.svc"},
            "s1": {"endpoints": [s1.address]},
            "s2": {"endpoints": [s2.address]},
            "slowup": {"endpoints": [slow.address], "timeouts": {"connect": "1s", "read": "10s"}},
            "deadup": {"endpoints": [f"127.0.0.1:{dead_port}"], "timeouts": {"connect": "1s", "read": "5s"}},
        },
        "routes": [
            {"name": "echo", "match": {"path_prefix": "/echo"}, "upstream": "echo"},
            {"name": "hdrs", "match": {"path_prefix": "/hdrs"}, "upstream": "echo",
             "headers": {"request": {"set": {"x-added": "yes"}, "remove": ["x-remove-me"]},
                         "response": {"set": {"x-resp-added": "yes"}, "remove": ["x-served-by"]}}},
            {"name": "strip", "match": {"path_prefix": "/strip"}, "upstream": "echo", "strip_prefix": True},
            {"name": "strip-api", "match": {"path_prefix": "/api/v1"}, "upstream": "echo", "strip_prefix": "/api"},
            {"name": "rewrite", "match": {"path_prefix": "/rw"}, "upstream": "echo",
             "rewrite": {"path_regex": "^/rw/([a-z]+)/([0-9]+)$", "replacement": "/x/${2}/${1}"}},
            {"name": "hosted", "match": {"path_prefix": "/hosted"}, "upstream": "hosted"},
            {"name": "legacy", "match": {"path_prefix": "/old"}, "redirect": {"to": "/new", "status": 301}},
            {"name": "teapot", "match": {"path": "/ping"},
             "respond": {"status": 200, "body": "pong\n", "headers": {"content-type": "text/plain"}}},
            {"name": "split", "match": {"path_prefix": "/split"},
             "split": [{"upstream": "s1", "weight": 80}, {"upstream": "s2", "weight": 20}]},
            {"name": "timeout", "match": {"path_prefix": "/timeout"}, "upstream": "slowup", "timeout": "500ms"},
            {"name": "dead", "match": {"path_prefix": "/dead"}, "upstream": "deadup"},
        ],
    }
    gw = module_procs.gateway(cfg)
    return {"gw": gw, "echo": echo, "hosted": hosted, "s1": s1, "s2": s2, "slow": slow, "cfg": cfg}


def echo_req(gw, path, headers=None, method="GET", body=None):
    h = {"Host": "front.example"}
    h.update(headers or {})
    r = gw.request(method, path, h, body)
    assert r.status == 200, f"{method} {path}: {r}"
    return r, r.json()


def query_of(seen):
    q = seen.get("query")
    if isinstance(q, dict):
        return "&".join(f"{k}={v}" for k, v in q.items())
    return q or ""


# --------------------------------------------------------------------------- admin endpoints

def test_healthz_readyz(env):
    gw = env["gw"]
    r = gw.admin("GET", "/healthz")
    assert r.status == 200, r
    r = gw.admin("GET", "/readyz")
    assert r.status == 200, r


def test_config_endpoint(env):
    gw = env["gw"]
    doc = gw.admin_json("/config")
    assert isinstance(doc.get("version"), int), doc
    assert isinstance(doc.get("loaded_at"), str) and doc["loaded_at"], doc
    assert isinstance(doc.get("config"), dict), doc
    assert "last_reload_error" in doc and doc["last_reload_error"] is None, doc
    dumped = json.dumps(doc["config"])
    for route in env["cfg"]["routes"]:
        assert route["name"] in dumped
    assert env["echo"].address in dumped


def test_routes_endpoint(env):
    gw = env["gw"]
    r = gw.admin("GET", "/routes")
    assert r.status == 200, r
    dumped = json.dumps(r.json())
    for route in env["cfg"]["routes"]:
        assert f'"{route["name"]}"' in dumped, f"/routes lacks route {route['name']}: {dumped[:500]}"


def test_upstreams_endpoint(env):
    gw = env["gw"]
    ups = gw.admin_json("/upstreams")
    for name in env["cfg"]["upstreams"]:
        assert name in ups, f"/upstreams lacks {name}: {ups}"
    echo = ups["echo"]
    assert isinstance(echo.get("balance"), str), echo
    eps = echo["endpoints"]
    assert len(eps) == 1, eps
    ep = eps[0]
    assert ep["address"] == env["echo"].address, ep
    assert ep["weight"] == 1, ep
    assert ep["healthy"] is True, ep
    assert ep["inflight"] == 0, ep


def test_metrics_after_traffic(env):
    gw = env["gw"]
    for i in range(10):
        echo_req(gw, f"/echo/m{i}")
    assert gw.get("/nowhere-at-all").status == 404
    r = gw.reload()   # so that the reload counter has a sample
    assert r.status == 200, f"POST /reload of an unchanged file: {r}"
    assert isinstance(r.json().get("version"), int), r
    text = gw.metrics_text()
    samples = parse_metrics(text)
    names = {n for n, _, _ in samples}
    for required in ["portico_requests_total", "portico_request_duration_seconds_bucket",
                     "portico_request_duration_seconds_sum", "portico_request_duration_seconds_count",
                     "portico_upstream_requests_total", "portico_upstream_endpoint_healthy",
                     "portico_inflight_requests", "portico_config_reloads_total", "portico_config_version"]:
        assert required in names, f"/metrics lacks {required}; has {sorted(names)}"
    assert re.search(r"^# TYPE portico_request_duration_seconds histogram", text, re.M), "duration is not a histogram"
    assert re.search(r"^# TYPE portico_requests_total counter", text, re.M)
    assert metric_sum(samples, "portico_requests_total", route="echo", method="GET", status="200") >= 10
    assert metric_sum(samples, "portico_request_duration_seconds_count", route="echo") >= 10
    ups = metric_samples(samples, "portico_upstream_requests_total", upstream="echo", endpoint=env["echo"].address)
    assert ups and sum(v for _, v in ups) >= 10, f"portico_upstream_requests_total for echo: {ups}"
    assert all("outcome" in l for l, _ in ups), ups
    h = metric_samples(samples, "portico_upstream_endpoint_healthy", upstream="echo", endpoint=env["echo"].address)
    assert h and h[0][1] == 1, h
    assert metric_sum(samples, "portico_config_reloads_total", result="ok") >= 1
    doc = gw.admin_json("/config")
    assert metric_sum(samples, "portico_config_version") == doc["version"]
    assert metric_sum(samples, "portico_inflight_requests") >= 0


def test_config_redacts_secrets(procs):
    backend = procs.backend("sec")
    secret = "s3cr3t-jwt-value-do-not-show"
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [backend.address]}},
        "routes": [{"name": "secure", "match": {"path_prefix": "/secure"}, "upstream": "app",
                    "plugins": [{"jwt": {"algorithms": ["HS256"], "secret": secret}}]}],
    })
    r = gw.admin("GET", "/config")
    assert r.status == 200, r
    assert secret not in r.text, "the jwt secret is visible in GET /config"
    assert "<redacted>" in r.text, f"no <redacted> marker in /config: {r.text[:800]}"
    assert secret not in gw.admin("GET", "/routes").text, "the jwt secret is visible in GET /routes"


# --------------------------------------------------------------------------- forwarding headers

def test_forwarded_headers(env):
    gw = env["gw"]
    _, seen = echo_req(gw, "/echo/fwd")
    h = seen["headers"]
    assert h.get("x-forwarded-for") == "127.0.0.1", h
    assert h.get("x-forwarded-proto") == "http", h
    assert h.get("x-forwarded-host") == "front.example", h
    fwd = h.get("forwarded", "").lower().replace('"', "")
    parts = {kv.split("=", 1)[0].strip(): kv.split("=", 1)[1].strip()
             for kv in re.split(r"[;,]", fwd) if "=" in kv}
    assert parts.get("for") == "127.0.0.1", f"forwarded: {h.get('forwarded')!r}"
    assert parts.get("proto") == "http", f"forwarded: {h.get('forwarded')!r}"
    assert parts.get("host") == "front.example", f"forwarded: {h.get('forwarded')!r}"


def test_x_forwarded_for_appends_client(env):
    gw = env["gw"]
    _, seen = echo_req(gw, "/echo/fwd2", {"X-Forwarded-For": "203.0.113.9"})
    xff = seen["headers"].get("x-forwarded-for", "")
    assert [p.strip() for p in xff.split(",")][-1] == "127.0.0.1", xff


def test_request_id_generated_and_kept(env):
    gw = env["gw"]
    r, seen = echo_req(gw, "/echo/rid")
    rid = r.header(REQUEST_ID_HEADER)
    assert rid, r
    assert seen["headers"].get("x-request-id") == rid, (rid, seen["headers"])
    r2, _ = echo_req(gw, "/echo/rid")
    assert r2.header(REQUEST_ID_HEADER) != rid, "two requests got the same generated x-request-id"
    r3, seen3 = echo_req(gw, "/echo/rid", {"X-Request-Id": "client-chosen-id-123"})
    assert r3.header(REQUEST_ID_HEADER) == "client-chosen-id-123", r3
    assert seen3["headers"].get("x-request-id") == "client-chosen-id-123", seen3["headers"]


def test_every_response_has_request_id(env):
    gw = env["gw"]
    for path in ["/ping", "/old", "/nope-nothing", "/echo/x", "/split/x"]:
        r = gw.get(path, {"Host": "front.example"})
        assert r.header(REQUEST_ID_HEADER), f"GET {path}: no x-request-id: {r}"


def test_traceparent_passed_through(env):
    gw = env["gw"]
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    _, seen = echo_req(gw, "/echo/trace", {"traceparent": tp})
    got = seen["headers"].get("traceparent", "")
    m = TRACEPARENT_RE.match(got)
    assert m, f"backend saw traceparent {got!r}"
    assert m.group(1) == "0af7651916cd43dd8448eb211c80319c", f"trace id not kept: {got!r}"
    assert m.group(3) == "01", f"trace flags not kept: {got!r}"


def test_traceparent_created_when_absent(env):
    gw = env["gw"]
    _, seen = echo_req(gw, "/echo/trace")
    got = seen["headers"].get("traceparent", "")
    m = TRACEPARENT_RE.match(got)
    assert m, f"backend saw traceparent {got!r} (expected a new W3C 00-<32hex>-<16hex>-<2hex>)"
    assert m.group(1) != "0" * 32 and m.group(2) != "0" * 16, got
    _, seen2 = echo_req(gw, "/echo/trace")
    assert TRACEPARENT_RE.match(seen2["headers"].get("traceparent", "")).group(1) != m.group(1), "trace id reused"


def test_hop_by_hop_headers_not_forwarded(env):
    gw = env["gw"]
    _, seen = echo_req(gw, "/echo/hop", {
        "Connection": "keep-alive, X-Hop-Custom", "X-Hop-Custom": "secret-hop", "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive", "TE": "deflate", "Trailer": "x-some-trailer", "Upgrade": "foo/1.0",
        "X-End-To-End": "kept"})
    h = seen["headers"]
    assert h.get("x-end-to-end") == "kept", h
    leaked = {k: h[k] for k in ["x-hop-custom", "keep-alive", "proxy-connection", "trailer", "upgrade"] if k in h}
    if "deflate" in h.get("te", ""):
        leaked["te"] = h["te"]
    assert not leaked, f"hop-by-hop headers forwarded to the backend: {leaked}"


def test_host_passed_through_unless_overridden(env):
    gw = env["gw"]
    _, seen = echo_req(gw, "/echo/host")
    assert seen["headers"].get("host") == "front.example", seen["headers"]
    _, seen = echo_req(gw, "/hosted/x")
    assert seen["headers"].get("host") == "internal.svc", seen["headers"]
    assert seen["service"] == "hosted"


# --------------------------------------------------------------------------- route actions

def test_request_and_response_header_rules(env):
    gw = env["gw"]
    r, seen = echo_req(gw, "/hdrs/a", {"x-remove-me": "please", "x-added": "from-client", "x-other": "stays"})
    h = seen["headers"]
    assert h.get("x-added") == "yes", h
    assert "x-remove-me" not in h, h
    assert h.get("x-other") == "stays", h
    assert r.header("x-resp-added") == "yes", r
    assert r.header("x-served-by") is None, f"response header x-served-by should be removed: {r}"
    r, _ = echo_req(gw, "/echo/a")
    assert r.header("x-served-by") == env["echo"].served_by and r.header("x-resp-added") is None, r


def test_strip_prefix(env):
    gw = env["gw"]
    _, seen = echo_req(gw, "/strip/items/7?x=1")
    assert seen["path"] == "/items/7", seen
    assert query_of(seen) == "x=1", seen
    _, seen = echo_req(gw, "/strip")
    assert seen["path"] == "/", seen
    _, seen = echo_req(gw, "/api/v1/items")
    assert seen["path"] == "/v1/items", seen


def test_rewrite(env):
    gw = env["gw"]
    _, seen = echo_req(gw, "/rw/abc/42")
    assert seen["path"] == "/x/42/abc", seen


def test_redirect(env):
    gw = env["gw"]
    r = gw.get("/old", {"Host": "front.example"})
    assert r.status == 301, r
    assert r.header("location") == "/new", r


def test_respond(env):
    gw = env["gw"]
    r = gw.get("/ping", {"Host": "front.example"})
    assert r.status == 200, r
    assert r.body == b"pong\n", r
    assert r.header("content-type") == "text/plain", r


def test_split_weights(env):
    gw = env["gw"]
    counts = collections.Counter()
    c = KeepAliveClient(gw.port)
    n = 1000
    for i in range(n):
        r = c.request("GET", f"/split/{i}")
        assert r.status == 200, r
        counts[r.json()["service"]] += 1
    c.close()
    assert set(counts) <= {"s1", "s2"}, counts
    assert abs(counts["s1"] / n - 0.8) <= 0.05, f"split 80/20 over {n} requests gave {dict(counts)}"


# --------------------------------------------------------------------------- gateway errors

def test_no_route_404(env):
    r = env["gw"].get("/definitely/not/routed")
    assert_gateway_error(r, 404, "no_route")


def test_upstream_timeout_504(env):
    gw = env["gw"]
    t0 = time.monotonic()
    r = gw.get("/timeout/x?delay=3s")
    took = time.monotonic() - t0
    assert_gateway_error(r, 504, "upstream_timeout")
    assert took < 2.5, f"route timeout 500ms, but the 504 came after {took:.2f}s"


def test_bad_gateway_502(env):
    r = env["gw"].get("/dead/x")
    assert_gateway_error(r, 502, "bad_gateway")


# --------------------------------------------------------------------------- access log

ACCESS_FIELDS = ["time", "request_id", "client", "method", "host", "path", "status", "bytes_in", "bytes_out",
                 "duration_ms", "route", "upstream", "endpoint"]


def test_access_log(env):
    gw = env["gw"]
    body = b"z" * 1234
    r, _ = echo_req(gw, "/echo/logged", {"X-Request-Id": "access-log-probe-1"}, method="POST", body=body)
    r2 = gw.get("/ping", {"Host": "front.example", "X-Request-Id": "access-log-probe-2"})
    assert r2.status == 200

    def find(rid):
        return next((e for e in gw.access_log_entries() if e.get("request_id") == rid), None)

    e = wait_until(lambda: find("access-log-probe-1"), 10, what="access log line for the probe request")
    for f in ACCESS_FIELDS:
        assert f in e, f"access log line lacks {f!r}: {e}"
    assert e["method"] == "POST" and e["path"] == "/echo/logged" and e["status"] == 200, e
    assert e["host"] == "front.example", e
    assert str(e["client"]).startswith("127.0.0.1"), e
    assert e["route"] == "echo" and e["upstream"] == "echo", e
    assert e["endpoint"] == env["echo"].address, e
    assert isinstance(e["bytes_in"], int) and e["bytes_in"] >= len(body), e
    assert isinstance(e["bytes_out"], int) and e["bytes_out"] >= len(r.body), e
    assert isinstance(e["duration_ms"], (int, float)) and e["duration_ms"] >= 0, e
    assert isinstance(e["time"], str) and e["time"], e
    e2 = wait_until(lambda: find("access-log-probe-2"), 10, what="access log line for the respond route")
    assert e2["route"] == "teapot" and e2["status"] == 200 and e2["upstream"] in (None, ""), e2
    # every line is a JSON object with every field
    for entry in gw.access_log_entries():
        missing = [f for f in ACCESS_FIELDS if f not in entry]
        assert not missing, f"access log line lacks {missing}: {entry}"


def test_admin_off_loopback_needs_a_token(procs, tmp_path):
    """An admin listener on a non-loopback address is refused without `token_env`; with
    one, every admin request needs the bearer token except the health probes."""
    be = procs.backend("a")
    port = free_port()
    base = {"upstreams": {"a": {"endpoints": [be.address]}},
            "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "a"}]}
    open_cfg = dict(base, admin={"bind": f"0.0.0.0:{port}"})
    bad = procs.gateway(open_cfg, name="open", start=False)
    res = run_cli(["check", "-c", bad.config_path])
    assert res.returncode == 1, res
    assert "token" in (res.stdout + res.stderr), res

    token = "s3cret-admin-token-0123456789"
    gw = procs.gateway(dict(base, admin={"bind": f"0.0.0.0:{port}", "token_env": "PORTICO_TEST_ADMIN_TOKEN"}),
                       name="tokened", start=False, env={"PORTICO_TEST_ADMIN_TOKEN": token})
    gw.admin_port = port
    gw.start()
    # Probes answer without a token (load balancers and kubelets cannot send one).
    assert gw.admin("GET", "/healthz").status == 200
    assert gw.admin("GET", "/readyz").status == 200
    for method, path in [("GET", "/config"), ("GET", "/metrics"), ("GET", "/routes"), ("POST", "/reload"),
                         ("GET", "/upstreams"), ("GET", "/registry/services")]:
        for headers in [None, {"Authorization": "Bearer wrong"}, {"Authorization": token}]:
            r = gw.admin(method, path, headers=headers)
            assert r.status == 401, (method, path, headers, r)
            assert r.json()["error"] == "unauthorized"
    r = gw.admin("GET", "/config", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200, r
    assert token not in r.text
    assert gw.admin("POST", "/reload", headers={"Authorization": f"Bearer {token}"}).status == 200
    # The token never reaches the access log or the gateway's own log.
    assert gw.get("/").status == 200
    time.sleep(0.3)
    assert token not in gw.log_tail(2000)
