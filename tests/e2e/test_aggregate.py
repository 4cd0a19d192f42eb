"""Request aggregation (`aggregate:` routes) end to end.

One client request fans out to several upstream calls whose JSON answers come back as one
object keyed by call name. Checked here with real demo backends:

* the `/profile/{user_id}` example (user + orders + a dependent call), `select` as a JSON
  pointer and as a field list, and parallelism: calls of 200, 300 and 100 ms answer in
  well under their sum;
* failures: an optional call that times out gives `null` plus an `_errors` entry within
  its own timeout; a required call answering 503, refusing connections, timing out or
  answering too much fails the whole answer (502/504 naming it); a call depending on a
  failed optional call is skipped;
* a `depends_on` chain of three calls passes values hop by hop (and runs in order);
  cycles and bad references are refused by `portico check` with FILE:LINE:COL;
* template escaping: `/`, `?`, `%`, `..`, CR/LF in a path parameter, a query value or a
  header value never change the upstream path or inject a header;
* JWT claims in call paths, headers and query;
* method/body templates, forwarded headers, `max_concurrency`, request id and trace
  context on every call, the access log's `calls` list, metrics, the overall timeout,
  and `portico routes` showing the call graph.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import urllib.parse

import pytest

from conftest import (REQUEST_ID_HEADER, assert_gateway_error, free_port, http_request, metric_samples, metric_sum,
                      run_cli, wait_until)

TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
JWT_SECRET = "aggregate-e2e-hs256-secret-0123456789"
CHECK_ERR_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$")


# --------------------------------------------------------------------------- helpers

def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256_token(claims: dict, secret: str = JWT_SECRET) -> str:
    head = b64u(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64u(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64u(sig)}"


def timed_get(gw, path, headers=None, timeout=30.0):
    t0 = time.monotonic()
    r = gw.get(path, headers or {}, timeout=timeout)
    return r, time.monotonic() - t0


def ok_json(gw, path, headers=None):
    r = gw.get(path, headers or {})
    assert r.status == 200, f"GET {path}: {r}"
    assert (r.header("content-type") or "").startswith("application/json"), r
    return r, r.json()


def segments(path: str) -> list[str]:
    return path.strip("/").split("/")


def call_error(r, status: int, call: str) -> dict:
    """A failed aggregation: `status`, JSON {"error": "aggregate_call_failed", "call": call, ...}."""
    j = assert_gateway_error(r, status, "aggregate_call_failed")
    assert j.get("call") == call, f"error should name call {call!r}: {j}"
    assert call in j["message"], f"message should name call {call!r}: {j}"
    return j


def agg_route(name, path, calls, methods=("GET",), **agg):
    a = {"calls": calls}
    a.update(agg)
    return {"name": name, "match": {"path": path, "methods": list(methods)}, "aggregate": a}


# --------------------------------------------------------------------------- the gateway

@pytest.fixture(scope="module")
def env(module_procs):
    users, orders, echo = module_procs.backends("users", "orders", "echo")
    dead_port = free_port()  # nothing listens there
    cfg = {
        "upstreams": {
            "users": {"endpoints": [users.address]},
            "orders": {"endpoints": [orders.address]},
            "echo": {"endpoints": [echo.address]},
            "dead": {"endpoints": [f"127.0.0.1:{dead_port}"], "timeouts": {"connect": "1s", "read": "5s"}},
            "mixed": {"endpoints": [f"127.0.0.1:{dead_port}", echo.address], "balance": "round_robin"},
        },
        "routes": [
            # the example from the issue / config contract
            agg_route("profile", "/profile/{user_id}", {
                "user": {"upstream": "users", "path": "/users/{user_id}"},
                "orders": {"upstream": "orders", "path": "/orders?user={user_id}", "optional": True,
                           "select": "/orders", "timeout": "500ms"},
                "city": {"upstream": "users", "path": "/echo/{user.address.city}", "depends_on": ["user"],
                         "select": ["path", "query"]},
            }, timeout="2s", forward_headers=["authorization"], max_response_size="1MiB", max_concurrency=16),
            # parallelism: 200 + 300 + 100 ms
            agg_route("fanout", "/fanout/{user_id}", {
                "user": {"upstream": "users", "path": "/users/{user_id}?delay=200ms"},
                "orders": {"upstream": "orders", "path": "/orders?user={user_id}&delay=300ms"},
                "ping": {"upstream": "echo", "path": "/ping/{user_id}?delay=100ms"},
            }, timeout="2s"),
            # max_concurrency 1 serialises the same three calls
            agg_route("serial", "/serial/{user_id}", {
                "user": {"upstream": "users", "path": "/users/{user_id}?delay=150ms"},
                "orders": {"upstream": "orders", "path": "/orders?user={user_id}&delay=150ms"},
                "ping": {"upstream": "echo", "path": "/ping/{user_id}?delay=150ms"},
            }, timeout="3s", max_concurrency=1),
            # an optional call that times out
            agg_route("optslow", "/optslow/{user_id}", {
                "user": {"upstream": "users", "path": "/users/{user_id}"},
                "slow": {"upstream": "echo", "path": "/slow?delay=3s", "optional": True, "timeout": "500ms"},
            }, timeout="2s"),
            # a required call answering 503
            agg_route("reqfail", "/reqfail/{user_id}", {
                "user": {"upstream": "users", "path": "/users/{user_id}"},
                "bad": {"upstream": "echo", "path": "/bad?status=503"},
            }),
            # an optional call answering 503, and a call depending on it
            agg_route("optfail", "/optfail/{user_id}", {
                "user": {"upstream": "users", "path": "/users/{user_id}"},
                "bad": {"upstream": "echo", "path": "/bad?status=503", "optional": True},
                "after": {"upstream": "echo", "path": "/after/{bad.path}", "depends_on": ["bad"],
                          "optional": True},
            }),
            # a required call to an upstream refusing connections
            agg_route("refused", "/refused", {
                "fine": {"upstream": "echo", "path": "/fine"},
                "down": {"upstream": "dead", "path": "/down"},
            }),
            # a required call that times out
            agg_route("reqslow", "/reqslow", {
                "fine": {"upstream": "echo", "path": "/fine"},
                "slow": {"upstream": "echo", "path": "/slow?delay=3s", "timeout": "400ms"},
            }, timeout="2s"),
            # a required call answering more than max_response_size
            agg_route("big", "/big", {
                "fine": {"upstream": "echo", "path": "/fine"},
                "huge": {"upstream": "echo", "path": "/bytes/200000"},
            }, max_response_size="64KiB"),
            # the whole aggregation bounded by its timeout
            agg_route("overall", "/overall", {
                "fine": {"upstream": "echo", "path": "/fine"},
                "slow": {"upstream": "echo", "path": "/slow?delay=3s"},
            }, timeout="400ms"),
            # an optional call still running when the whole aggregation times out
            agg_route("overallopt", "/overallopt", {
                "fine": {"upstream": "echo", "path": "/fine"},
                "slow": {"upstream": "echo", "path": "/slow?delay=3s", "optional": True},
            }, timeout="400ms"),
            # a template variable without a value
            agg_route("missing", "/missing", {
                "q": {"upstream": "echo", "path": "/m/{query.x}"},
                "opt": {"upstream": "echo", "path": "/m2", "optional": True, "headers": {"x-h": "{header.x-nope}"}},
            }),
            # calls go through the upstream's balancer: a refused endpoint fails over to the live one
            agg_route("failover", "/failover", {
                "e": {"upstream": "mixed", "path": "/fo"},
            }),
            # a depends_on chain a -> b -> c, each 100 ms
            agg_route("chain", "/chain/{user_id}", {
                "a": {"upstream": "users", "path": "/users/{user_id}?delay=100ms"},
                "b": {"upstream": "echo", "path": "/city/{a.address.city}?name={a.name}&delay=100ms",
                      "depends_on": ["a"]},
                "c": {"upstream": "echo", "path": "/hop/{b.path}", "query": {"q": "{b.query}", "delay": "100ms"},
                      "depends_on": ["b"]},
            }, timeout="3s"),
            # escaping of template values
            agg_route("esc", "/esc/{v}", {
                "p": {"upstream": "echo", "path": "/seg/{v}/end"},
                "q": {"upstream": "echo", "path": "/q/{query.x}/end?x={query.x}&k=fixed"},
                "h": {"upstream": "echo", "path": "/h/{header.x-evil}/end"},
                "hv": {"upstream": "echo", "path": "/hv", "optional": True,
                       "headers": {"x-from-query": "{query.x}", "x-from-param": "{v}",
                                   "x-from-header": "{header.x-evil}"}},
            }),
            # JWT claims
            {"name": "me", "match": {"path": "/me", "methods": ["GET"]},
             "plugins": [{"jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET}}],
             "aggregate": {"calls": {
                 "who": {"upstream": "echo", "path": "/who/{claim.sub}/{claim.org.name}",
                         "query": {"role": "{claim.role}"}, "headers": {"x-user": "{claim.sub}"}},
                 "user": {"upstream": "users", "path": "/users/{claim.uid}"},
             }}},
            # method, body templates, forwarded headers, request id and trace context
            agg_route("post", "/post/{user_id}", {
                "user": {"upstream": "users", "path": "/users/{user_id}"},
                "send": {"upstream": "echo", "method": "POST", "path": "/send", "depends_on": ["user"],
                         "body": {"id": "{user_id}", "n": 3, "flag": True, "city": "{user.address.city}",
                                  "address": "{user.address}", "label": "user {user.name} in {user.address.city}",
                                  "list": ["{query.tag}", 1]}},
            }),
            agg_route("ids", "/ids", {
                "e1": {"upstream": "echo", "path": "/e1"},
                "e2": {"upstream": "echo", "path": "/e2"},
                "e3": {"upstream": "echo", "path": "/e3", "forward_headers": ["x-tenant"]},
            }),
        ],
    }
    gw = module_procs.gateway(cfg)
    return {"gw": gw, "users": users, "orders": orders, "echo": echo, "cfg": cfg}


# --------------------------------------------------------------------------- 1. the example, parallelism

def test_profile_example_answers_user_orders_and_dependent_call(env):
    gw = env["gw"]
    r, j = ok_json(gw, "/profile/7")
    assert set(j) == {"user", "orders", "city"}, f"answer keys: {j}"
    user = j["user"]
    assert user["id"] == "7" and user["name"] == "user-7" and user["email"] == "user-7@example.com", user
    assert user["address"]["city"] == "Lisbon", user
    # select: /orders (a JSON pointer) keeps only the list
    assert isinstance(j["orders"], list) and [o["id"] for o in j["orders"]] == ["7-1", "7-2"], j["orders"]
    # select: [path, query] keeps only those fields; the path carries the user's city
    assert j["city"] == {"path": "/echo/Lisbon", "query": None}, j["city"]
    assert "_errors" not in j, j
    assert r.header(REQUEST_ID_HEADER), r


def test_calls_run_in_parallel(env):
    gw = env["gw"]
    ok_json(gw, "/fanout/1")  # warm the upstream connection pools
    times = []
    for uid in ("41", "42", "43"):
        r, dt = timed_get(gw, f"/fanout/{uid}")
        assert r.status == 200, r
        j = r.json()
        assert j["user"]["id"] == uid and j["orders"]["user"] == uid, j
        assert [o["id"] for o in j["orders"]["orders"]] == [f"{uid}-1", f"{uid}-2"], j
        assert j["ping"]["path"] == f"/ping/{uid}" and j["ping"]["query"] == "delay=100ms", j["ping"]
        times.append(dt)
    # 200 + 300 + 100 = 600 ms in sequence; in parallel close to the slowest (300 ms). The best of
    # three must be under 400 ms, and none may come near the 600 ms sum (slack for a loaded machine).
    assert all(t >= 0.29 for t in times), f"fan-out answered in {times} s, faster than its 300 ms call"
    assert min(times) < 0.4, f"fan-out answered in {times} s (want < 0.4: calls run in parallel)"
    assert max(times) < 0.55, f"fan-out answered in {times} s (600 ms would mean calls in sequence)"


def test_max_concurrency_one_runs_calls_one_at_a_time(env):
    gw = env["gw"]
    r, dt = timed_get(gw, "/serial/5")
    assert r.status == 200, r
    assert set(r.json()) == {"user", "orders", "ping"}, r
    assert dt >= 0.44, f"max_concurrency 1: three 150 ms calls took only {dt:.3f} s"


# --------------------------------------------------------------------------- 2. failures

def test_optional_call_timeout_gives_null_and_error_within_its_timeout(env):
    gw = env["gw"]
    r, dt = timed_get(gw, "/optslow/9")
    assert r.status == 200, r
    j = r.json()
    assert j["user"]["id"] == "9", j
    assert "slow" in j and j["slow"] is None, f"timed-out optional call should be null: {j}"
    err = j.get("_errors", {}).get("slow")
    assert isinstance(err, dict), f"no _errors entry for `slow`: {j}"
    assert err.get("status") == 504, err
    assert "time" in str(err.get("reason", "")).lower(), err
    assert set(j["_errors"]) == {"slow"}, j
    assert dt < 0.55, f"answered after {dt:.3f} s; the optional call's timeout is 500 ms (+50 ms allowed)"
    assert dt >= 0.45, f"answered after {dt:.3f} s, before the call's 500 ms timeout"


def test_required_call_503_fails_with_502_naming_it(env):
    gw = env["gw"]
    r = gw.get("/reqfail/3")
    j = call_error(r, 502, "bad")
    assert "503" in j["message"], j


def test_optional_call_503_and_its_dependent_are_null(env):
    gw = env["gw"]
    r, j = ok_json(gw, "/optfail/3")
    assert j["user"]["id"] == "3", j
    assert j["bad"] is None and j["after"] is None, j
    errs = j.get("_errors", {})
    assert errs.get("bad", {}).get("status") == 503, j
    assert "after" in errs and errs["after"].get("status") is None, j
    assert "depend" in errs["after"].get("reason", ""), j


def test_required_call_connection_refused_fails_with_502_naming_it(env):
    gw = env["gw"]
    r, dt = timed_get(gw, "/refused")
    call_error(r, 502, "down")
    assert dt < 2.0, f"connection refused took {dt:.3f} s"


def test_required_call_timeout_gives_504_naming_it(env):
    gw = env["gw"]
    r, dt = timed_get(gw, "/reqslow")
    call_error(r, 504, "slow")
    assert 0.35 <= dt < 0.6, f"required call with 400 ms timeout answered after {dt:.3f} s"


def test_required_call_too_large_fails_with_502(env):
    gw = env["gw"]
    r = gw.get("/big")
    j = call_error(r, 502, "huge")
    assert "larger" in j["message"] or "large" in j["message"], j


def test_overall_timeout_gives_504_aggregate_timeout(env):
    gw = env["gw"]
    codes = []
    for _ in range(3):
        r, dt = timed_get(gw, "/overall")
        codes.append((r.status, (r.json() if r.body.startswith(b"{") else {}).get("error"), round(dt, 3)))
        assert 0.38 <= dt < 0.6, f"aggregation with a 400 ms timeout answered after {dt:.3f} s"
    bad = [c for c in codes if c[:2] != (504, "aggregate_timeout")]
    assert not bad, f"expected 504 aggregate_timeout every time, got (status, error, seconds): {codes}"
    j = assert_gateway_error(r, 504, "aggregate_timeout")
    assert j.get("call") == "slow", f"the timeout should name the pending call: {j}"
    assert "slow" in j["message"], j


def test_optional_call_cut_by_overall_timeout(env):
    gw = env["gw"]
    r, dt = timed_get(gw, "/overallopt")
    assert dt < 0.6, f"aggregation with a 400 ms timeout answered after {dt:.3f} s"
    if r.status == 200:
        j = r.json()
        assert j["fine"]["path"] == "/fine" and j["slow"] is None and "slow" in j.get("_errors", {}), j
    else:
        assert_gateway_error(r, 504, "aggregate_timeout")


def test_template_without_value_fails_the_call(env):
    gw = env["gw"]
    r, j = ok_json(gw, "/missing?x=1")
    assert j["q"]["path"] == "/m/1", j
    assert j["opt"] is None and "no value" in j["_errors"]["opt"]["reason"], j
    r = gw.get("/missing")
    j = call_error(r, 502, "q")
    assert "query.x" in j["message"], j


def test_calls_fail_over_to_a_live_endpoint(env):
    gw = env["gw"]
    for i in range(6):
        r, j = ok_json(gw, f"/failover?i={i}")
        assert j["e"]["path"] == "/fo" and j["e"]["port"] == env["echo"].port, j


# --------------------------------------------------------------------------- 3. depends_on

def test_depends_on_chain_passes_values_hop_by_hop(env):
    gw = env["gw"]
    ok_json(gw, "/chain/1")  # warm
    r, dt = timed_get(gw, "/chain/12")
    assert r.status == 200, r
    j = r.json()
    # a: the user
    assert j["a"]["name"] == "user-12" and j["a"]["address"]["city"] == "Lisbon", j["a"]
    # b: path from a.address.city, query from a.name
    assert j["b"]["path"] == "/city/Lisbon", j["b"]
    assert j["b"]["query"] == "name=user-12&delay=100ms", j["b"]
    # c: path from b.path (one escaped segment), query from b.query (one escaped component)
    assert j["c"]["path"] == "/hop/%2Fcity%2FLisbon", j["c"]
    q = urllib.parse.parse_qs(j["c"]["query"])
    assert q == {"q": ["name=user-12&delay=100ms"], "delay": ["100ms"]}, j["c"]["query"]
    # three 100 ms hops in order
    assert dt >= 0.3, f"a -> b -> c (100 ms each) answered after {dt:.3f} s: calls did not wait for their dependencies"
    assert dt < 0.6, f"a -> b -> c took {dt:.3f} s"


CYCLE_CFG = """\
listeners:
  - name: web
    bind: 127.0.0.1:{port}
upstreams:
  users:
    endpoints: ["127.0.0.1:{uport}"]
routes:
  - name: loop
    match: {{ path: "/loop/{{id}}" }}
    aggregate:
      calls:
        a: {{ upstream: users, path: "/a/{{c.x}}", depends_on: [c] }}
        b: {{ upstream: users, path: "/b/{{a.x}}", depends_on: [a] }}
        c: {{ upstream: users, path: "/c/{{b.y}}", depends_on: [b] }}
"""


def _check_errors(path):
    p = run_cli(["check", "-c", path])
    errs = []
    for line in p.stderr.splitlines():
        m = CHECK_ERR_RE.match(line.strip())
        if m:
            errs.append((m["file"], int(m["line"]), int(m["col"]), m["msg"]))
    return p, errs


def test_depends_on_cycle_is_refused_by_check(tmp_path):
    path = tmp_path / "cycle.yaml"
    text = CYCLE_CFG.format(port=free_port(), uport=free_port())
    path.write_text(text)
    p, errs = _check_errors(path)
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stderr}\n{p.stdout}"
    cyc = [e for e in errs if "cycle" in e[3].lower()]
    assert cyc, f"no FILE:LINE:COL error mentioning the cycle: {p.stderr!r}"
    f, line, col, msg = cyc[0]
    assert f in (str(path), str(path.resolve()), path.name), cyc[0]
    lines = text.splitlines()
    # the error points at the calls (the `calls:` line or one of the calls' lines)
    first = next(i for i, l in enumerate(lines, 1) if l.strip() == "calls:")
    assert first <= line <= len(lines) and col >= 1, f"cycle error at {line}:{col}, not at the calls: {cyc[0]}"
    assert all(n in msg for n in ("a", "b", "c")), msg
    # the same file with the loop broken passes
    fixed = text.replace('path: "/a/{c.x}", depends_on: [c]', 'path: "/a/{id}"')
    path.write_text(fixed)
    p2, _ = _check_errors(path)
    assert p2.returncode == 0, f"the acyclic file should pass: {p2.stderr}"
    # and `portico run` refuses the cyclic one
    path.write_text(text)
    p3 = run_cli(["run", "-c", path], timeout=30)
    assert p3.returncode == 1, f"run with a cycle: exit {p3.returncode} {p3.stderr}"


BAD_REFS_CFG = """\
listeners:
  - name: web
    bind: 127.0.0.1:{port}
upstreams:
  users:
    endpoints: ["127.0.0.1:{uport}"]
routes:
  - name: refs
    match: {{ path: "/refs/{{id}}" }}
    aggregate:
      calls:
        a: {{ upstream: users, path: "/a/{{nope}}" }}
        b: {{ upstream: users, path: "/b/{{a.x}}" }}
        c: {{ upstream: nowhere, path: "/c/{{id}}", depends_on: [zzz] }}
"""


def test_check_refuses_bad_references(tmp_path):
    path = tmp_path / "refs.yaml"
    text = BAD_REFS_CFG.format(port=free_port(), uport=free_port())
    path.write_text(text)
    p, errs = _check_errors(path)
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stderr}"
    lines = text.splitlines()

    def line_of(marker):
        return next(i for i, l in enumerate(lines, 1) if marker in l)

    want = [("{nope}", "nope"), ("{a.x}", "depends_on"), ("nowhere", "nowhere"), ("zzz", "zzz")]
    missing = [w for w in want if not any(w[1] in m for _, _, _, m in errs)]
    assert not missing, f"errors not reported: {missing}\n{p.stderr}"
    for marker, word in want:
        hit = [e for e in errs if word in e[3]]
        assert any(e[1] == line_of(marker) for e in hit), f"error about {word!r} not on line {line_of(marker)}: {hit}"


# --------------------------------------------------------------------------- 4. escaping

EVIL_HEADER = "../../admin?z=1%41#frag"


def _esc(gw, raw_param, x_value):
    path = f"/esc/{raw_param}?x={urllib.parse.quote(x_value, safe='')}"
    r = gw.get(path, {"x-evil": EVIL_HEADER})
    assert r.status == 200, f"GET {path}: {r}"
    return r.json()


def _one_segment(seen_path, prefix, value):
    """`seen_path` is /prefix/ONE-SEGMENT/end and that segment decodes to `value`."""
    segs = segments(seen_path)
    assert len(segs) == 3 and segs[0] == prefix and segs[2] == "end", \
        f"value {value!r} changed the upstream path: {seen_path!r}"
    assert "/" not in segs[1] and "?" not in segs[1] and "\r" not in segs[1] and "\n" not in segs[1], seen_path
    assert segs[1] not in (".", ".."), seen_path
    assert urllib.parse.unquote(segs[1]) == value, \
        f"segment {segs[1]!r} of {seen_path!r} decodes to {urllib.parse.unquote(segs[1])!r}, want {value!r}"


@pytest.mark.parametrize("raw_param,value", [
    ("..%2Fadmin", "../admin"),
    ("%2E%2E", ".."),
    ("a%3Fb%3D1%26c", "a?b=1&c"),
    ("100%25", "100%"),
    ("a%0D%0AX-Injected%3A%20yes", "a\r\nX-Injected: yes"),
    ("caf%C3%A9%20au%20lait", "café au lait"),
])
def test_path_param_stays_in_one_segment(env, raw_param, value):
    gw = env["gw"]
    j = _esc(gw, raw_param, "plain")
    seen = j["p"]
    assert seen["query"] is None, f"param {value!r} added a query: {seen}"
    assert "x-injected" not in seen["headers"], seen["headers"]
    _one_segment(seen["path"], "seg", value)


@pytest.mark.parametrize("value", [
    "../admin",
    "..",
    "a/b?c=d&e=f#g",
    "100%",
    "%2e%2e%2f",
    "line\r\nX-Injected: yes",
])
def test_query_value_stays_in_one_segment_and_component(env, value):
    gw = env["gw"]
    j = _esc(gw, "plain", value)
    q = j["q"]
    _one_segment(q["path"], "q", value)
    assert urllib.parse.parse_qs(q["query"], keep_blank_values=True) == {"x": [value], "k": ["fixed"]}, \
        f"query value {value!r} changed the query: {q['query']!r}"
    for call in ("p", "q", "h"):
        assert "x-injected" not in j[call]["headers"], (call, j[call]["headers"])
    if "\r" in value or "\n" in value:
        # the header template refuses the value: that call fails, nothing is injected
        assert j["hv"] is None, j["hv"]
        assert "hv" in j.get("_errors", {}), j
        assert "line break" in j["_errors"]["hv"].get("reason", ""), j["_errors"]
    else:
        assert j["hv"]["headers"].get("x-from-query") == value, j["hv"]


def test_header_value_stays_in_one_segment(env):
    gw = env["gw"]
    j = _esc(gw, "plain", "plain")
    _one_segment(j["h"]["path"], "h", EVIL_HEADER)
    assert j["h"]["query"] is None, j["h"]
    assert j["hv"]["headers"].get("x-from-header") == EVIL_HEADER, j["hv"]


def test_crlf_in_header_template_fails_that_call_not_injects(env):
    gw = env["gw"]
    r = gw.get("/esc/ok?x=" + urllib.parse.quote("v\r\nX-Injected: yes\r\n\r\nGET /smuggled HTTP/1.1", safe=""),
               {"x-evil": "e"})
    assert r.status == 200, r
    j = r.json()
    assert j["hv"] is None and "line break" in j["_errors"]["hv"]["reason"], j
    for call in ("p", "q", "h"):
        assert "x-injected" not in j[call]["headers"], j[call]
    entry = wait_until(lambda: next((e for e in gw.access_log_entries()
                                     if e.get("request_id") == r.header(REQUEST_ID_HEADER)), None),
                       5, what="access log line")
    hv = [c for c in entry.get("calls", []) if c["name"] == "hv"]
    assert hv and hv[0]["outcome"] == "bad_template" and hv[0]["status"] == 0, entry


# --------------------------------------------------------------------------- 5. JWT claims

def test_jwt_claims_flow_into_calls(env):
    gw = env["gw"]
    claims = {"sub": "alice/../admin", "uid": "77", "role": "ops team", "org": {"name": "acme?x=1"},
              "exp": int(time.time()) + 600}
    r, j = ok_json(gw, "/me", {"Authorization": f"Bearer {hs256_token(claims)}"})
    who = j["who"]
    segs = segments(who["path"])
    assert len(segs) == 3 and segs[0] == "who", f"claims changed the path: {who['path']!r}"
    assert urllib.parse.unquote(segs[1]) == "alice/../admin", who["path"]
    assert urllib.parse.unquote(segs[2]) == "acme?x=1", who["path"]
    assert urllib.parse.parse_qs(who["query"]) == {"role": ["ops team"]}, who["query"]
    assert who["headers"].get("x-user") == "alice/../admin", who["headers"]
    # the Authorization header is forwarded by default
    assert who["headers"].get("authorization", "").startswith("Bearer "), who["headers"]
    assert j["user"]["id"] == "77" and j["user"]["name"] == "user-77", j["user"]


def test_jwt_claim_with_crlf_fails_the_header_call(env):
    gw = env["gw"]
    claims = {"sub": "eve\r\nX-Injected: yes", "uid": "5", "org": {"name": "o"}, "role": "r",
              "exp": int(time.time()) + 600}
    r = gw.get("/me", {"Authorization": f"Bearer {hs256_token(claims)}"})
    # `who` puts {claim.sub} in a header: the value is refused, the (required) call fails
    j = call_error(r, 502, "who")
    assert "line break" in j["message"], j


def test_jwt_route_rejects_bad_tokens_before_any_call(env):
    gw = env["gw"]
    before = metric_sum(gw.metrics(), "portico_aggregate_calls_total", route="me")
    r = gw.get("/me")
    assert r.status == 401, r
    bad = hs256_token({"sub": "mallory", "uid": "1", "exp": int(time.time()) + 600}, secret="wrong-secret")
    r = gw.get("/me", {"Authorization": f"Bearer {bad}"})
    assert r.status == 401, r
    after = metric_sum(gw.metrics(), "portico_aggregate_calls_total", route="me")
    assert after == before, f"rejected requests made aggregate calls ({before} -> {after})"


# --------------------------------------------------------------------------- method, body, headers, ids, trace

def test_method_and_json_body_templates(env):
    gw = env["gw"]
    r, j = ok_json(gw, "/post/8?tag=" + urllib.parse.quote('x"y', safe=""))
    send = j["send"]
    assert send["method"] == "POST", send
    assert send["headers"].get("content-type") == "application/json", send["headers"]
    body = json.loads(send["body_preview"])
    assert body == {"id": "8", "n": 3, "flag": True, "city": "Lisbon",
                    "address": {"city": "Lisbon", "country": "PT"},
                    "label": "user user-8 in Lisbon", "list": ['x"y', 1]}, body
    assert send["body_bytes"] == len(send["body_preview"].encode()), send


def test_forwarded_headers(env):
    gw = env["gw"]
    r, j = ok_json(gw, "/ids", {"Authorization": "Bearer abc", "Cookie": "session=secret",
                                "x-tenant": "t-1", "x-other": "no"})
    for call in ("e1", "e2"):
        h = j[call]["headers"]
        assert h.get("authorization") == "Bearer abc", (call, h)
        assert "cookie" not in h and "x-tenant" not in h and "x-other" not in h, (call, h)
    h3 = j["e3"]["headers"]  # its own forward_headers replaces the default list
    assert h3.get("x-tenant") == "t-1" and "authorization" not in h3 and "cookie" not in h3, h3


def test_request_id_forwarded_to_every_call(env):
    gw = env["gw"]
    r, j = ok_json(gw, "/ids", {"x-request-id": "agg-client-id-42"})
    assert r.header(REQUEST_ID_HEADER) == "agg-client-id-42", r
    for call in ("e1", "e2", "e3"):
        assert j[call]["headers"].get("x-request-id") == "agg-client-id-42", (call, j[call]["headers"])
    # without one, the gateway's own id is used for the answer and every call
    r, j = ok_json(gw, "/ids")
    rid = r.header(REQUEST_ID_HEADER)
    assert rid, r
    assert {j[c]["headers"].get("x-request-id") for c in ("e1", "e2", "e3")} == {rid}, j


def test_traceparent_on_calls_is_a_child_of_the_clients(env):
    gw = env["gw"]
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r, j = ok_json(gw, "/ids", {"traceparent": f"00-{trace}-{parent}-01"})
    parents = set()
    for call in ("e1", "e2", "e3"):
        tp = j[call]["headers"].get("traceparent", "")
        m = TRACEPARENT_RE.match(tp)
        assert m, f"{call}: traceparent {tp!r}"
        assert m.group(1) == trace, f"{call}: trace id not kept: {tp!r}"
        assert m.group(2) != parent and m.group(2) != "0" * 16, f"{call}: parent id not replaced: {tp!r}"
        parents.add(m.group(2))
    assert len(parents) == 3, f"calls share a span id: {parents}"
    # without a client traceparent the calls still share one (new) trace
    r, j = ok_json(gw, "/ids")
    tps = [TRACEPARENT_RE.match(j[c]["headers"].get("traceparent", "")) for c in ("e1", "e2", "e3")]
    assert all(tps), j
    assert len({m.group(1) for m in tps}) == 1 and tps[0].group(1) != "0" * 32, [m.group(0) for m in tps]


# --------------------------------------------------------------------------- access log, metrics, CLI

def test_access_log_lists_calls(env):
    gw = env["gw"]
    r = gw.get("/profile/21", {"x-request-id": "agg-log-1"})
    assert r.status == 200, r
    r2 = gw.get("/optslow/22", {"x-request-id": "agg-log-2"})
    assert r2.status == 200, r2

    def entry(rid):
        return next((e for e in gw.access_log_entries() if e.get("request_id") == rid), None)

    e = wait_until(lambda: entry("agg-log-1"), 5, what="access log line of agg-log-1")
    assert e["route"] == "profile" and e["status"] == 200 and e["path"] == "/profile/21", e
    calls = {c["name"]: c for c in e.get("calls", [])}
    assert set(calls) == {"user", "orders", "city"}, e
    for c in calls.values():
        assert c["status"] == 200 and c["outcome"] == "ok", c
        assert isinstance(c["duration_ms"], (int, float)) and c["duration_ms"] >= 0, c
        assert c["endpoint"], c
    assert calls["user"]["endpoint"].endswith(str(env["users"].port)), calls["user"]
    assert calls["orders"]["endpoint"].endswith(str(env["orders"].port)), calls["orders"]
    e2 = wait_until(lambda: entry("agg-log-2"), 5, what="access log line of agg-log-2")
    calls2 = {c["name"]: c for c in e2.get("calls", [])}
    assert calls2["slow"]["outcome"] == "timeout" and calls2["slow"]["status"] == 504, e2
    assert 450 <= calls2["slow"]["duration_ms"] < 700, calls2["slow"]
    assert calls2["user"]["outcome"] == "ok", e2


def test_metrics_count_outcomes(env):
    gw = env["gw"]
    name = "portico_aggregate_calls_total"
    m0 = gw.metrics()

    def delta(m1, **labels):
        return metric_sum(m1, name, **labels) - metric_sum(m0, name, **labels)

    assert gw.get("/optslow/1").status == 200
    assert gw.get("/optslow/2").status == 200
    assert gw.get("/reqfail/1").status == 502
    assert gw.get("/optfail/1").status == 200
    m1 = gw.metrics()
    assert delta(m1, route="optslow", call="user", outcome="ok") == 2, metric_samples(m1, name, route="optslow")
    assert delta(m1, route="optslow", call="slow", outcome="timeout") == 2, metric_samples(m1, name, route="optslow")
    assert delta(m1, route="reqfail", call="bad", outcome="error") == 1, metric_samples(m1, name, route="reqfail")
    assert delta(m1, route="optfail", call="bad", outcome="error") == 1, metric_samples(m1, name, route="optfail")
    assert delta(m1, route="optfail", call="after", outcome="dependency_failed") == 1, \
        metric_samples(m1, name, route="optfail")
    hname = "portico_aggregate_call_duration_seconds_count"
    d = metric_sum(m1, hname, route="optslow", call="slow") - metric_sum(m0, hname, route="optslow", call="slow")
    assert d == 2, metric_samples(m1, hname, route="optslow")
    s1 = metric_sum(m1, "portico_aggregate_call_duration_seconds_sum", route="optslow", call="slow")
    s0 = metric_sum(m0, "portico_aggregate_call_duration_seconds_sum", route="optslow", call="slow")
    assert 0.9 <= s1 - s0 < 1.4, f"two 500 ms timeouts observed as {s1 - s0:.3f} s"


def test_routes_cli_shows_call_graph(env):
    gw = env["gw"]
    p = run_cli(["routes", "-c", gw.config_path, "GET", "http://127.0.0.1/profile/7"])
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "route: profile" in out, out
    assert "call graph:" in out, out
    graph = out.split("call graph:", 1)[1].splitlines()
    lines = [l.strip() for l in graph if l.strip()]
    user = next((l for l in lines if l.startswith("user ")), None)
    orders = next((l for l in lines if l.startswith("orders ")), None)
    city = next((l for l in lines if l.startswith("city ")), None)
    assert user and "users" in user and "/users/{user_id}" in user, out
    assert orders and "/orders" in orders and "(optional)" in orders, out
    assert city and "/echo/{user.address.city}" in city and "after user" in city, out
    assert "optional" not in user and "after" not in user, user
    p = run_cli(["routes", "-c", gw.config_path, "GET", "http://127.0.0.1/profile/7", "--json"])
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["route"] == "profile", j
    calls = j.get("calls")
    assert isinstance(calls, list) and len(calls) == 3, j
    assert any(c.startswith("city ") and "after user" in c for c in calls), calls
    # a non-aggregate answer has no call list
    p = run_cli(["routes", "-c", gw.config_path, "GET", "http://127.0.0.1/nothing-here", "--json"])
    assert json.loads(p.stdout).get("calls") is None, p.stdout


def test_route_retries_apply_to_idempotent_calls_only(procs):
    """The route's retry policy applies to calls; a POST call (not idempotent) is not retried on a 503,
    as the proxy does for POST requests unless `non_idempotent: true`."""
    get_be, post_be = procs.backends("retry-get", "retry-post")
    cfg = {
        "upstreams": {"g": {"endpoints": [get_be.address]}, "p": {"endpoints": [post_be.address]}},
        "routes": [
            {"name": "rget", "match": {"path": "/rget"}, "retries": {"attempts": 2, "on": ["503"]},
             "aggregate": {"calls": {"x": {"upstream": "g", "path": "/x?status=503"}}}},
            {"name": "rpost", "match": {"path": "/rpost"}, "retries": {"attempts": 2, "on": ["503"]},
             "aggregate": {"calls": {"x": {"upstream": "p", "method": "POST", "path": "/x?status=503",
                                           "body": {"a": 1}}}}},
        ],
    }
    gw = procs.gateway(cfg)

    def served(be):
        return json.loads(http_request(be.port, "GET", "/_stats").body)["requests"]

    call_error(gw.get("/rget"), 502, "x")
    assert served(get_be) == 3, f"GET call with attempts: 2 on 503: {served(get_be)} upstream requests, want 3"
    call_error(gw.get("/rpost"), 502, "x")
    assert served(post_be) == 1, (f"POST call retried on 503: {served(post_be)} upstream requests, want 1 "
                                  f"(non-idempotent calls must not be retried unless non_idempotent: true)")


def test_routes_call_graph_separates_upstream_and_path(env):
    """Each call graph line reads NAME METHOD UPSTREAM PATH [after DEPS] [(optional)]."""
    gw = env["gw"]
    p = run_cli(["routes", "-c", gw.config_path, "GET", "http://127.0.0.1/profile/7"])
    assert p.returncode == 0, p.stderr
    lines = [l.split() for l in p.stdout.split("call graph:", 1)[1].splitlines() if l.strip()]
    by_name = {l[0]: l for l in lines if l[0] in ("user", "orders", "city")}
    assert by_name["user"] == ["user", "GET", "users", "/users/{user_id}"], f"call graph line {by_name['user']}"
    assert by_name["orders"][:4] == ["orders", "GET", "orders", "/orders?user={user_id}"], f"call graph line {by_name['orders']}"
    assert by_name["city"][:4] == ["city", "GET", "users", "/echo/{user.address.city}"], \
        f"call graph line {by_name['city']}"
