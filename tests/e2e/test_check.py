"""`portico check`: every error at once, each as FILE:LINE:COL: message; exit 1 invalid, 0 valid.
Also: every shipped config/*.yaml passes, and `portico run` refuses an invalid file with exit 1."""

import re
import subprocess
import time

import pytest

from conftest import PORTICO_BIN, REPO_ROOT, free_port, run_cli

ERR_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$")


def pos(text, line_marker, token):
    """1-based (line, column) of `token` on the first line containing `line_marker`."""
    for i, line in enumerate(text.splitlines(), 1):
        if line_marker in line:
            c = line.index(token)
            return i, c + 1
    raise ValueError(line_marker)


def run_check(path):
    p = run_cli(["check", "-c", path])
    errors = []
    for line in p.stderr.splitlines():
        m = ERR_RE.match(line.strip())
        if m:
            errors.append((m["file"], int(m["line"]), int(m["col"]), m["msg"]))
    return p, errors


def find_error(errors, path, line, cols, words):
    """The error at (line, one of cols) whose message mentions one of `words` (case-insensitive)."""
    for f, l, c, msg in errors:
        if l == line and c in cols and f in (str(path), str(path.resolve()), path.name):
            if any(w.lower() in msg.lower() for w in words):
                return msg
    return None


def describe(p):
    return f"exit {p.returncode}\n--- stderr:\n{p.stderr}\n--- stdout:\n{p.stdout}"


BAD1 = """\
listeners:
  - name: web
    bind: 127.0.0.1:18080
upstreams:
  users:
    endpoints: ["127.0.0.1:9001"]
    balanse: round_robin
routes:
  - name: a
    match:
      path_prefix: /a
    upstream: users
    timeout: 5 parsecs
  - name: b
    match:
      path_prefix: /b
    upstream: nowhere
"""


def test_three_mistakes_all_reported(tmp_path):
    path = tmp_path / "bad1.yaml"
    path.write_text(BAD1)
    p, errors = run_check(path)
    assert p.returncode == 1, describe(p)
    want = {
        "unknown key": (pos(BAD1, "balanse", "balanse"), None, ["balanse"]),
        "bad duration": (pos(BAD1, "parsecs", "timeout"), pos(BAD1, "parsecs", "5 parsecs"),
                         ["duration", "parsecs", "timeout"]),
        "dangling upstream": (pos(BAD1, "nowhere", "upstream"), pos(BAD1, "nowhere", "nowhere"), ["nowhere"]),
    }
    missing = []
    for what, (key_pos, val_pos, words) in want.items():
        cols = {key_pos[1]} | ({val_pos[1]} if val_pos else set())
        if not find_error(errors, path, key_pos[0], cols, words):
            missing.append(f"{what} at {path}:{key_pos[0]}:{sorted(cols)}")
    assert not missing, f"errors not reported (or at the wrong place): {missing}\n{describe(p)}"
    wrong_lines = [e for e in errors if e[1] not in {v[0][0] for v in want.values()}]
    assert not wrong_lines, f"errors reported on lines without a mistake: {wrong_lines}"


BAD2 = """\
listeners:
  - name: web
    bind: 127.0.0.1:18080
upstreams:
  app:
    endpoints: ["127.0.0.1:9001"]
routes:
  - name: one
    match:
      path_regex: "/items/(unclosed"
    upstream: app
  - name: two
    match:
      path_prefix: /two
      headers:
        x-ver: "~v[0-9"
    upstream: app
  - name: one
    match:
      path_prefix: /three
    upstream: app
"""


def test_invalid_regexes_and_duplicate_route_names(tmp_path):
    path = tmp_path / "bad2.yaml"
    path.write_text(BAD2)
    p, errors = run_check(path)
    assert p.returncode == 1, describe(p)
    dup_line = [i for i, l in enumerate(BAD2.splitlines(), 1) if l.strip() == "- name: one"][1]
    want = [
        ("invalid path_regex", pos(BAD2, "unclosed", "path_regex")[0],
         {pos(BAD2, "unclosed", "path_regex")[1], pos(BAD2, "unclosed", '"/items')[1]}, ["regex", "unclosed", "parse"]),
        ("invalid header regex", pos(BAD2, "~v[0-9", "x-ver")[0],
         {pos(BAD2, "~v[0-9", "x-ver")[1], pos(BAD2, "~v[0-9", '"~v')[1]}, ["regex", "class", "parse", "x-ver"]),
        ("duplicate route name", dup_line, {3, 5, 11}, ["duplicate", "one"]),
    ]
    missing = [f"{w} at line {l} col {sorted(c)}" for w, l, c, words in want
               if not find_error(errors, path, l, c, words)]
    assert not missing, f"errors not reported (or at the wrong place): {missing}\n{describe(p)}"
    wrong_lines = [e for e in errors if e[1] not in {w[1] for w in want}]
    assert not wrong_lines, f"errors reported on lines without a mistake: {wrong_lines}"


BAD3 = """\
listeners:
  - name: web
    bind: 127.0.0.1:18080
upstreams:
  app:
    endpoints: ["127.0.0.1:9001"]
routes:
  - name: filtered
    match:
      path_prefix: /f
    upstream: app
    plugins:
      - ip_filter:
          allow: ["10.0.0.0/8", "10.0.0.0/33"]
      - rate_limit: { requests: 10, per: 1s, burts: 5, key: client_ip }
"""


def test_invalid_cidr_and_unknown_plugin_setting(tmp_path):
    path = tmp_path / "bad3.yaml"
    path.write_text(BAD3)
    p, errors = run_check(path)
    assert p.returncode == 1, describe(p)
    cidr_line, allow_col = pos(BAD3, "10.0.0.0/33", "allow")
    cidr_cols = {allow_col, pos(BAD3, "10.0.0.0/33", "[")[1], pos(BAD3, "10.0.0.0/33", '"10.0.0.0/33"')[1]}
    burts = pos(BAD3, "burts", "burts")
    missing = []
    if not find_error(errors, path, cidr_line, cidr_cols, ["cidr", "10.0.0.0/33", "prefix", "network", "invalid"]):
        missing.append(f"invalid CIDR at line {cidr_line} col {sorted(cidr_cols)}")
    if not find_error(errors, path, burts[0], {burts[1]}, ["burts"]):
        missing.append(f"unknown rate_limit setting at {burts}")
    assert not missing, f"errors not reported (or at the wrong place): {missing}\n{describe(p)}"


def test_yaml_syntax_error_has_position(tmp_path):
    text = "listeners:\n  - name: web\n    bind: 127.0.0.1:18080\nroutes: [ {name: x\n"
    path = tmp_path / "syntax.yaml"
    path.write_text(text)
    p, errors = run_check(path)
    assert p.returncode == 1, describe(p)
    assert errors, f"no FILE:LINE:COL error printed\n{describe(p)}"
    assert all(e[1] >= 4 for e in errors), f"syntax error reported before the broken line: {errors}"


VALID = """\
listeners:
  - name: web
    bind: 127.0.0.1:18080
admin:
  bind: 127.0.0.1:19901
upstreams:
  users:
    endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]
    balance: round_robin
    health_check: { path: /healthz, interval: 2s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3 }
    timeouts: { connect: 1s, read: 10s }
  orders:
    endpoints:
      - { address: "127.0.0.1:9011", weight: 3 }
      - { address: "127.0.0.1:9012", weight: 1 }
    balance: weighted
  carts:
    endpoints: ["127.0.0.1:9021", "127.0.0.1:9022", "127.0.0.1:9023"]
    balance: consistent_hash
    hash_on: header:x-user-id
routes:
  - name: users
    match:
      hosts: ["api.example.com", "*.example.com"]
      path_prefix: /users
      methods: [GET, POST]
    upstream: users
    timeout: 5s
    strip_prefix: true
    headers:
      request: { set: { x-from: portico }, remove: [x-debug] }
      response: { set: { x-gateway: portico }, remove: [server] }
  - name: orders
    match: { path_prefix: /orders }
    split:
      - { upstream: orders, weight: 90 }
      - { upstream: users, weight: 10 }
  - name: carts
    match: { path_regex: "/carts/(?P<id>[0-9]+)", headers: { x-version: "~^v[0-9]+$" }, query: { debug: "1" } }
    upstream: carts
    rewrite: { path_regex: "^/carts/(.*)$", replacement: "/c/$1" }
  - name: legacy
    match: { path_prefix: /old }
    redirect: { to: "/new", status: 301 }
  - name: teapot
    match: { path: /ping }
    respond: { status: 200, body: "pong\\n", headers: { content-type: text/plain } }
"""


def test_valid_file_exits_0(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(VALID)
    p, errors = run_check(path)
    assert p.returncode == 0, describe(p)
    assert not errors, describe(p)


def test_run_refuses_invalid_file(tmp_path):
    path = tmp_path / "bad1.yaml"
    path.write_text(BAD1.replace("18080", str(free_port())))
    t0 = time.monotonic()
    try:
        p = subprocess.run([str(PORTICO_BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=20,
                           cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("`portico run` with an invalid config did not exit within 20s")
    assert p.returncode == 1, f"`portico run` on an invalid file: {describe(p)}"
    assert "balanse" in p.stderr, describe(p)
    assert time.monotonic() - t0 < 20


CONFIG_FILES = sorted((REPO_ROOT / "config").glob("*.yaml")) + sorted((REPO_ROOT / "config").glob("*.yml"))


@pytest.mark.parametrize("path", CONFIG_FILES or [None], ids=[p.name for p in CONFIG_FILES] or ["none"])
def test_shipped_configs_pass_check(path):
    if path is None:
        pytest.skip("no config/*.yaml files yet")
    p, _ = run_check(path)
    assert p.returncode == 0, f"portico check {path}: {describe(p)}"
