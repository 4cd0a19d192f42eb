"""Route matching and precedence (config.md, "Route matching rules").

One config, many `respond` routes (body and `x-route` header name the route), and a
table of requests, each with the route that must win.  Routes are written least
specific first, so that a gateway that picks by file order alone gets them wrong.
"""

import json

import pytest

from conftest import assert_gateway_error, respond_route, run_cli

R = respond_route

ROUTES = [
    # ---- hosts (least specific first)
    R("host-any", {"path_prefix": "/h"}),
    R("host-wild-short", {"hosts": ["*.com"], "path_prefix": "/h"}),
    R("host-wild-long", {"hosts": ["*.example.com"], "path_prefix": "/h"}),
    R("host-exact", {"hosts": ["api.example.com", "other.example.net"], "path_prefix": "/h"}),
    R("nohost-exact-path", {"path": "/h/x"}),
    R("host-wild-short-path", {"hosts": ["*.com"], "path": "/h/y"}),
    # ---- path kinds (least specific first)
    R("p-regex", {"path_regex": "/p/(?P<rest>.+)"}),
    R("p-prefix-short", {"path_prefix": "/p"}),
    R("p-prefix-long", {"path_prefix": "/p/items"}),
    R("p-exact", {"path": "/p/items/{id}"}),
    R("users", {"path_prefix": "/users"}),
    R("r-regex", {"path_regex": "/r/[a-z]+"}),
    R("r-regex-num", {"path_regex": "/r/(?P<n>[0-9]+)/info"}),
    # ---- methods / headers / query (fewest conditions first)
    R("c-plain", {"path_prefix": "/c"}),
    R("c-get", {"path_prefix": "/c", "methods": ["GET"]}),
    R("c-hdr", {"path_prefix": "/c", "headers": {"x-env": "staging"}}),
    R("c-hdr-re", {"path_prefix": "/c", "headers": {"x-ver": "~^v[0-9]+$"}}),
    R("c-query", {"path_prefix": "/c", "query": {"debug": "1"}}),
    R("c-two", {"path_prefix": "/c", "methods": ["POST"], "headers": {"x-env": "staging"}}),
    R("c-tie-first", {"path_prefix": "/c/tie", "headers": {"x-tie": "1"}}),
    R("c-tie-second", {"path_prefix": "/c/tie", "query": {"tie": "1"}}),
]

# (id, method, host, path, extra headers, expected route or None for no_route)
CASES = [
    # hosts: exact > wildcard (longer suffix first) > none; case-insensitive; port ignored
    ("exact-host", "GET", "api.example.com", "/h", {}, "host-exact"),
    ("exact-host-case-and-port", "GET", "API.Example.COM:8080", "/h", {}, "host-exact"),
    ("exact-host-port-deeper-path", "GET", "api.example.com:443", "/h/deeper", {}, "host-exact"),
    ("exact-host-second-name", "GET", "other.example.net", "/h", {}, "host-exact"),
    ("wildcard-long", "GET", "www.example.com", "/h", {}, "host-wild-long"),
    ("wildcard-two-labels", "GET", "a.b.example.com", "/h", {}, "host-wild-long"),
    ("wildcard-case", "GET", "WWW.EXAMPLE.COM", "/h", {}, "host-wild-long"),
    ("wildcard-with-port", "GET", "www.example.com:8443", "/h", {}, "host-wild-long"),
    ("wildcard-short", "GET", "foo.com", "/h", {}, "host-wild-short"),
    ("wildcard-not-bare-domain", "GET", "example.com", "/h", {}, "host-wild-short"),
    ("no-host-route", "GET", "example.org", "/h", {}, "host-any"),
    ("host-suffix-trick", "GET", "api.example.com.evil.org", "/h", {}, "host-any"),
    ("host-beats-path-kind", "GET", "api.example.com", "/h/x", {}, "host-exact"),
    ("exact-path-without-host", "GET", "example.org", "/h/x", {}, "nohost-exact-path"),
    ("exact-path-same-wildcard", "GET", "foo.com", "/h/y", {}, "host-wild-short-path"),
    ("longer-wildcard-beats-path-kind", "GET", "www.example.com", "/h/y", {}, "host-wild-long"),
    ("prefix-segment-wise-hx", "GET", "example.org", "/hx", {}, None),
    # path kinds: path > path_prefix (longer first) > path_regex
    ("exact-with-param", "GET", "t.test", "/p/items/42", {}, "p-exact"),
    ("exact-with-param-and-query", "GET", "t.test", "/p/items/42?x=1", {}, "p-exact"),
    ("param-is-one-segment", "GET", "t.test", "/p/items/42/more", {}, "p-prefix-long"),
    ("prefix-equal-path", "GET", "t.test", "/p/items", {}, "p-prefix-long"),
    ("prefix-not-inside-segment", "GET", "t.test", "/p/itemsx", {}, "p-prefix-short"),
    ("prefix-beats-regex", "GET", "t.test", "/p/zzz", {}, "p-prefix-short"),
    ("prefix-bare", "GET", "t.test", "/p", {}, "p-prefix-short"),
    ("prefix-trailing-slash", "GET", "t.test", "/p/", {}, "p-prefix-short"),
    ("users-prefix", "GET", "t.test", "/users", {}, "users"),
    ("users-prefix-child", "GET", "t.test", "/users/7", {}, "users"),
    ("usersx-not-users", "GET", "t.test", "/usersx", {}, None),
    ("regex", "GET", "t.test", "/r/abc", {}, "r-regex"),
    ("regex-anchored-end", "GET", "t.test", "/r/abc1", {}, None),
    ("regex-anchored-start", "GET", "t.test", "/x/r/abc", {}, None),
    ("regex-named-capture", "GET", "t.test", "/r/12/info", {}, "r-regex-num"),
    # methods, headers (exact and ~regex), query; more conditions win; then file order
    ("method-get", "GET", "t.test", "/c", {}, "c-get"),
    ("method-not-listed", "DELETE", "t.test", "/c", {}, "c-plain"),
    ("header-exact-name-case", "DELETE", "t.test", "/c", {"X-ENV": "staging"}, "c-hdr"),
    ("header-value-exact", "DELETE", "t.test", "/c", {"x-env": "Staging"}, "c-plain"),
    ("more-conditions-win", "POST", "t.test", "/c", {"x-env": "staging"}, "c-two"),
    ("tie-file-order", "GET", "t.test", "/c", {"x-env": "staging"}, "c-get"),
    ("header-regex", "DELETE", "t.test", "/c", {"x-ver": "v12"}, "c-hdr-re"),
    ("header-regex-no-match", "DELETE", "t.test", "/c", {"x-ver": "v12a"}, "c-plain"),
    ("query", "DELETE", "t.test", "/c?debug=1", {}, "c-query"),
    ("query-among-others", "DELETE", "t.test", "/c?a=b&debug=1", {}, "c-query"),
    ("query-wrong-value", "DELETE", "t.test", "/c?debug=2", {}, "c-plain"),
    ("longer-prefix-before-conditions", "GET", "t.test", "/c/tie?tie=1", {"x-tie": "1"}, "c-tie-first"),
    ("tie-second-alone", "GET", "t.test", "/c/tie?tie=1", {}, "c-tie-second"),
    ("conditions-on-shorter-prefix", "GET", "t.test", "/c/tie", {}, "c-get"),
    ("segment-wise-c-tiex", "POST", "t.test", "/c/tiex", {}, "c-plain"),
    # nothing at all
    ("no-route", "GET", "t.test", "/nothing/here", {}, None),
]

ROUTES_CLI_CASES = ["exact-host-case-and-port", "wildcard-long", "host-beats-path-kind", "exact-with-param",
                    "param-is-one-segment", "prefix-beats-regex", "more-conditions-win", "tie-file-order",
                    "header-regex", "query", "longer-prefix-before-conditions", "usersx-not-users"]


@pytest.fixture(scope="module")
def gw(module_procs):
    return module_procs.gateway({"routes": ROUTES})


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_route_chosen(gw, case):
    _id, method, host, path, headers, expected = case
    hdrs = {"Host": host}
    hdrs.update(headers)
    r = gw.request(method, path, hdrs)
    if expected is None:
        assert_gateway_error(r, 404, "no_route")
    else:
        assert r.status == 200, f"{method} {path} Host={host} {headers}: expected route {expected}, got {r}"
        assert r.header("x-route") == expected and r.text == expected, (
            f"{method} {path} Host={host} {headers}: expected route {expected!r}, "
            f"got x-route={r.header('x-route')!r} body={r.text!r}")
    assert r.header("x-request-id"), f"response without x-request-id: {r}"


@pytest.mark.parametrize("case_id", ROUTES_CLI_CASES)
def test_routes_command_agrees(gw, case_id):
    _id, method, host, path, headers, expected = next(c for c in CASES if c[0] == case_id)
    args = ["routes", "-c", gw.config_path, method, f"http://{host}{path}"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    args.append("--json")
    p = run_cli(args)
    assert p.returncode == 0, f"portico {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}"
    try:
        out = json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"`portico routes --json` did not print JSON: {p.stdout!r} {p.stderr!r}")
    assert out.get("route") == expected, f"routes --json for {method} {host}{path} {headers}: {out}"
    cands = out.get("candidates")
    assert isinstance(cands, list), f"no candidates list: {out}"
    for c in cands:
        assert {"name", "matched", "reason"} <= set(c), f"candidate lacks name/matched/reason: {c}"
    matched = {c["name"] for c in cands if c["matched"]}
    if expected is None:
        assert not matched, f"no route expected but candidates matched: {out}"
    else:
        assert expected in matched, f"winner {expected} not among matched candidates: {out}"
    assert isinstance(out.get("plugins"), list), f"no plugins list: {out}"
