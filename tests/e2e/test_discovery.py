"""Service discovery end to end: the embedded registry (admin API, TTLs and heartbeats,
label selectors, static instances), how fast registry changes reach routing, and the
embedded orchestrator (replica restarts after kill -9 under load, scaling through the
admin API, rolling updates under load, what happens to every process of a replica --
wrapped commands included -- when the gateway is SIGKILLed or SIGTERMed, scale to zero
and back, slow cold starts, and restarts after the gateway's binary is replaced on disk).

Orchestrator gateways run from a private hard link of the binary (fixture `exe`), so a
concurrent rebuild of target/debug/portico cannot break their replica starts. Every
replica process a test sees is remembered; anything still alive at teardown (after the
gateway is gone) is killed, so a broken parent-death mechanism cannot leak processes
into later tests."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from conftest import (GATEWAY_READY_TIMEOUT, PORTICO_BIN, KeepAliveClient, Managed, metric_samples, metric_sum,
                      wait_http_ok, wait_until)

READINESS = {"path": "/healthz", "interval": "200ms"}
BACKOFF = {"min": "200ms", "max": "5s"}
RETRIES = {"attempts": 2, "on": ["connect_failure", "reset"]}


# --------------------------------------------------------------------------- process helpers

_SEEN: dict[int, str] = {}  # pid -> what it was (for the teardown reaper)
_SEEN_LOCK = threading.Lock()


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces/parens: the state follows the last ')'
    return data.rsplit(")", 1)[1].split()[0]


def pid_running(pid: int) -> bool:
    """Alive and not a zombie (a reaped-late zombie is dead for our purposes)."""
    st = _proc_state(pid)
    return st is not None and st not in ("Z", "X", "x")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return out


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        for c in _children(stack.pop()):
            out.append(c)
            stack.append(c)
    return out


def process_tree(pid: int) -> dict[int, str]:
    """pid and everything below it, with command lines (to tell a reused pid apart later)."""
    return {p: _cmdline(p) for p in [pid] + descendants(pid)}


def still_running(tree: dict[int, str]) -> list[tuple[int, str]]:
    """The processes of `tree` that still run (same pid, same command line)."""
    return [(p, c) for p, c in tree.items() if pid_running(p) and _cmdline(p) == c]


def app_pid(pid: int) -> int:
    """The application process of a replica: `pid` itself, or -- when the orchestrator
    runs replicas under a `replica-shim` -- the command the shim started."""
    if "replica-shim" not in _cmdline(pid):
        return pid
    kids = [c for c in _children(pid) if "replica-shim" not in _cmdline(c)]
    assert kids, f"replica-shim {pid} has no child"
    return kids[0]


def remember(pid: int | None, what: str = "replica"):
    if pid:
        with _SEEN_LOCK:
            for p in [int(pid)] + descendants(int(pid)):
                _SEEN[p] = what


@pytest.fixture(autouse=True)
def _reap_leftover_replicas():
    """Runs after `procs` is torn down: kills replicas the gateway left behind."""
    with _SEEN_LOCK:
        _SEEN.clear()
    yield
    time.sleep(0.2)
    with _SEEN_LOCK:
        seen = dict(_SEEN)
        _SEEN.clear()
    for pid in seen:
        if pid_running(pid) and ("demo-backend" in _cmdline(pid) or "PORTICO_REPLICA_ID" in _environ(pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# --------------------------------------------------------------------------- gateway helpers

@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    """A private hard link to the portico binary. Orchestrator gateways run from it, so their
    replicas (`command: [portico, ...]` = the gateway's own binary) keep starting even when
    something rebuilds target/debug/portico meanwhile (falls back to PORTICO_BIN)."""
    deadline = time.monotonic() + 120
    while not PORTICO_BIN.exists() and time.monotonic() < deadline:
        time.sleep(1)  # a rebuild in progress
    link = tmp_path_factory.mktemp("bin") / "portico"
    try:
        os.link(PORTICO_BIN, link)
        return link
    except OSError:
        return PORTICO_BIN


def orch_gateway(procs, exe, config):
    """procs.gateway(config), but running `exe`."""
    gw = procs.gateway(config, start=False)
    gw.m = Managed(f"gateway {gw.name}", [exe, "run", "-c", gw.config_path], gw.log_path, env=gw.env)
    procs.track(gw.m)
    gw.m.start()
    wait_http_ok(gw.admin_port, "/readyz", GATEWAY_READY_TIMEOUT, gw.m)
    return gw


def demo_cmd(name: str) -> list[str]:
    return ["portico", "demo-backend", "--name", name, "--port", "{port}"]


def deployment(name="web", service="app", replicas=2, **extra) -> dict:
    d = {"name": name, "service": service, "replicas": replicas, "command": demo_cmd(name),
         "readiness": dict(READINESS), "restart_backoff": dict(BACKOFF), "grace_period": "2s"}
    d.update(extra)
    return d


def orch_config(deployments: list[dict], service="app", retries=True, upstream_extra=None, route_extra=None):
    up = {"discovery": {"service": service}, "timeouts": {"connect": "1s", "read": "10s"},
          "retry_budget": {"ratio": 1.0, "min_per_second": 50}}
    up.update(upstream_extra or {})
    route = {"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}
    if retries:
        route["retries"] = dict(RETRIES)
    route.update(route_extra or {})
    return {"upstreams": {"app": up}, "routes": [route], "orchestrator": {"deployments": deployments}}


def get_deployment(gw, name="web") -> dict:
    for d in gw.admin_json("/orchestrator/deployments")["deployments"]:
        for r in d.get("replicas", []):
            remember(r.get("pid"))
        if d["name"] == name:
            return d
    raise AssertionError(f"no deployment {name} in /orchestrator/deployments")


def ready_replicas(d: dict) -> list[dict]:
    return [r for r in d["replicas"] if r["phase"] == "ready"]


def wait_ready(gw, n: int, name="web", timeout=15.0) -> dict:
    def ok():
        d = get_deployment(gw, name)
        reps = d["replicas"]
        if len(ready_replicas(d)) == n and len(reps) == n:
            return d
        return None
    return wait_until(ok, timeout, interval=0.05, what=f"{n} ready replicas of {name}")


def registry_instances(gw, service: str, state="ready") -> list[dict]:
    svc = gw.admin_json("/registry/services").get(service) or {}
    return [i for i in svc.get("instances", []) if state is None or i["state"] == state]


def served_port(r) -> int | None:
    sb = r.header("x-served-by")
    if not sb:
        return None
    return int(sb.rsplit(":", 1)[1])


def burst(gw, n: int, path="/burst") -> list[tuple[int, str | None]]:
    """n requests over one keep-alive connection: [(status, x-served-by)]."""
    c = KeepAliveClient(gw.port, timeout=10)
    out = []
    try:
        for i in range(n):
            try:
                r = c.request("GET", f"{path}/{i}")
                out.append((r.status, r.header("x-served-by")))
            except Exception as e:  # noqa: BLE001
                out.append((repr(e), None))
    finally:
        c.close()
    return out


def ports_of(results) -> set[int]:
    return {int(sb.rsplit(":", 1)[1]) for _, sb in results if sb}


class Load:
    """Threads sending GETs continuously over keep-alive connections; records every outcome."""

    def __init__(self, port: int, threads: int = 3, path: str = "/load", pause: float = 0.003):
        self.port = port
        self.n = threads
        self.path = path
        self.pause = pause
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[float, object, str | None]] = []  # (t, status or error, x-served-by)
        self.threads: list[threading.Thread] = []

    def _run(self, k: int):
        c = KeepAliveClient(self.port, timeout=10)
        i = 0
        while not self.stop_ev.is_set():
            i += 1
            try:
                r = c.request("GET", f"{self.path}/{k}/{i}")
                rec = (time.monotonic(), r.status, r.header("x-served-by"))
                if r.status != 200:
                    rec = (rec[0], f"{r.status} {r.body[:200]!r}", rec[2])
            except Exception as e:  # noqa: BLE001
                rec = (time.monotonic(), repr(e), None)
                c.close()
            with self.lock:
                self.results.append(rec)
            if self.pause:
                time.sleep(self.pause)
        c.close()

    def __enter__(self):
        for k in range(self.n):
            t = threading.Thread(target=self._run, args=(k,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=15)

    def __exit__(self, *a):
        self.stop()

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def errors(self):
        with self.lock:
            return [r for r in self.results if r[1] != 200]

    def served_since(self, t0: float) -> set[str]:
        with self.lock:
            return {sb for t, s, sb in self.results if t >= t0 and sb}


# =========================================================================== registry

def test_registry_ttl_expiry_and_heartbeat(procs):
    keep = procs.backend("keep")
    lapse = procs.backend("lapse")
    gw = procs.gateway({
        "upstreams": {"ttl": {"discovery": {"service": "ttlsvc"}}},
        "routes": [{"name": "ttl", "match": {"path_prefix": "/"}, "upstream": "ttl"}],
    })

    # bad input is refused
    r = gw.admin("PUT", "/registry/services/ttlsvc/instances/x", body=json.dumps({"address": "nope"}))
    assert r.status == 400, r
    r = gw.admin("PUT", "/registry/services/ttlsvc/instances/x", body=json.dumps({"address": keep.address, "ttl": "soon"}))
    assert r.status == 400, r
    r = gw.admin("PUT", "/registry/services/ttlsvc/instances/ghost/heartbeat", body=b"")
    assert r.status == 404, f"heartbeat for an unknown instance: {r}"
    assert registry_instances(gw, "ttlsvc", None) == []

    # -- an instance with a 2 s TTL and no heartbeat is gone within 3 s
    t_before = time.monotonic()
    r = gw.admin("PUT", "/registry/services/ttlsvc/instances/lapse",
                 body=json.dumps({"address": lapse.address, "labels": {"k": "v"}, "ttl": "2s"}))
    t_put = time.monotonic()
    assert r.status == 200, r
    insts = registry_instances(gw, "ttlsvc")
    assert [i["id"] for i in insts] == ["lapse"], insts
    assert insts[0]["address"] == lapse.address and insts[0]["labels"] == {"k": "v"}, insts
    assert insts[0]["ttl_ms"] == 2000, insts
    # it is routed to while it lives
    wait_until(lambda: gw.get("/a").header("x-served-by") == lapse.served_by, 1.5,
               what="the TTL instance to receive traffic")
    gauge = metric_samples(gw.metrics(), "portico_registry_instances", service="ttlsvc", state="ready")
    assert gauge and gauge[0][1] == 1, f"portico_registry_instances for ttlsvc: {gauge}"

    gone_at = None
    while time.monotonic() - t_put < 4.0:
        if not any(i["id"] == "lapse" for i in registry_instances(gw, "ttlsvc", None)):
            gone_at = time.monotonic()
            break
        time.sleep(0.05)
    assert gone_at is not None, "an instance with ttl 2s and no heartbeat was still registered after 4 s"
    assert gone_at - t_put <= 3.0, f"expired only {gone_at - t_put:.2f}s after registration (limit 3 s)"
    assert gone_at - t_before >= 1.9, f"expired after {gone_at - t_before:.2f}s, before its 2 s TTL"
    # and routing dropped it
    time.sleep(0.3)
    r = gw.get("/after-expiry")
    assert r.header("x-served-by") != lapse.served_by, f"expired instance still routed to: {r}"
    assert r.status == 503, f"no instance left: expected 503, got {r}"
    gauge = metric_sum(gw.metrics(), "portico_registry_instances", service="ttlsvc", state="ready")
    assert gauge == 0, f"portico_registry_instances still counts the expired instance: {gauge}"

    # -- heartbeats keep an instance alive well beyond its TTL
    r = gw.admin("PUT", "/registry/services/ttlsvc/instances/keep",
                 body=json.dumps({"address": keep.address, "ttl": "2s"}))
    assert r.status == 200, r
    t0 = time.monotonic()
    last_hb = t0
    while time.monotonic() - t0 < 5.0:
        time.sleep(0.5)
        r = gw.admin("PUT", "/registry/services/ttlsvc/instances/keep/heartbeat", body=b"")
        assert r.status == 200, f"heartbeat at +{time.monotonic() - t0:.1f}s: {r}"
        last_hb = time.monotonic()
        ids = [i["id"] for i in registry_instances(gw, "ttlsvc")]
        assert ids == ["keep"], f"heartbeated instance missing at +{time.monotonic() - t0:.1f}s: {ids}"
    r = gw.get("/kept")
    assert r.status == 200 and r.header("x-served-by") == keep.served_by, \
        f"heartbeated instance not routed to after 5 s (TTL 2 s): {r}"
    # heartbeats stop: it lapses within TTL + 1 s
    gone = None
    while time.monotonic() - last_hb < 4.0:
        if not registry_instances(gw, "ttlsvc", None):
            gone = time.monotonic()
            break
        time.sleep(0.05)
    assert gone is not None and gone - last_hb <= 3.0, \
        f"instance not expired within 3 s of its last heartbeat ({None if gone is None else gone - last_hb})"
    r = gw.admin("PUT", "/registry/services/ttlsvc/instances/keep/heartbeat", body=b"")
    assert r.status == 404, f"heartbeat after expiry must be 404: {r}"


def test_label_selectors_route_only_matching_instances(procs):
    # a: v1  b: v1 tier=stable  c: v2  d: v2 tier=canary  e: v1 legacy  f: v3 (static, from the config file)
    a, b, c, d, e, f = procs.backends("sel-a", "sel-b", "sel-c", "sel-d", "sel-e", "sel-f")
    gw = procs.gateway({
        "registry": {"services": {"shop": [{"id": "f", "address": f.address, "labels": {"version": "v3"}}]}},
        "upstreams": {
            "v1": {"discovery": {"service": "shop", "selector": {"version": "v1"}}},
            "v2": {"discovery": {"service": "shop", "selector": {"version": "v2"}}},
            "expr": {"discovery": {"service": "shop", "selector": "version in (v1,v2), tier != canary, !legacy"}},
            "v3": {"discovery": {"service": "shop", "selector": {"version": "v3"}}},
            "notin": {"discovery": {"service": "shop", "selector": "version notin (v1, v3), tier"}},
        },
        "routes": [{"name": n, "match": {"path_prefix": f"/{n}/"}, "upstream": n}
                   for n in ("v1", "v2", "expr", "v3", "notin")],
    })
    regs = {a: {"version": "v1"}, b: {"version": "v1", "tier": "stable"}, c: {"version": "v2"},
            d: {"version": "v2", "tier": "canary"}, e: {"version": "v1", "legacy": "true"}}
    for be, labels in regs.items():
        r = gw.admin("PUT", f"/registry/services/shop/instances/{be.name}",
                     body=json.dumps({"address": be.address, "labels": labels}))
        assert r.status == 200, r
    ids = sorted(i["id"] for i in registry_instances(gw, "shop"))
    assert ids == ["f", "sel-a", "sel-b", "sel-c", "sel-d", "sel-e"], ids
    static = [i for i in registry_instances(gw, "shop") if i["id"] == "f"][0]
    assert static["source"] == "static" and static["labels"] == {"version": "v3"}, static

    expected = {
        "v1": {a.served_by, b.served_by, e.served_by},
        "v2": {c.served_by, d.served_by},
        "expr": {a.served_by, b.served_by, c.served_by},
        "v3": {f.served_by},
        "notin": {d.served_by},
    }

    def spread(name, n):
        res = burst(gw, n, f"/{name}")
        bad = [s for s, _ in res if s != 200]
        assert not bad, f"upstream {name}: failed requests {bad[:5]}"
        return {sb for _, sb in res}

    # routing follows the registry within 1 s; give it that, then check many requests
    wait_until(lambda: spread("v1", 12) == expected["v1"], 2.0, what="v1 to cover its three instances")
    for name, want in expected.items():
        got = spread(name, 60)
        assert got == want, f"upstream {name}: served by {sorted(got)}, expected exactly {sorted(want)}"

    # relabelling an instance moves it between upstreams
    r = gw.admin("PUT", "/registry/services/shop/instances/sel-d",
                 body=json.dumps({"address": d.address, "labels": {"version": "v2"}}))
    assert r.status == 200, r
    wait_until(lambda: spread("expr", 12) == {a.served_by, b.served_by, c.served_by, d.served_by}, 2.0,
               what="relabelled sel-d (no longer canary) to join the expression upstream")
    assert spread("v2", 30) == {c.served_by, d.served_by}
    res = burst(gw, 5, "/notin")
    assert all(s == 503 for s, _ in res), f"`notin` upstream should have no instance left: {res}"


def test_registry_changes_reach_routing_within_1s(procs):
    base, new = procs.backends("base", "fresh")
    gw = procs.gateway({
        "registry": {"services": {"live": [{"id": "base", "address": base.address, "labels": {"tier": "live"}}]}},
        "upstreams": {"live": {"discovery": {"service": "live", "selector": {"tier": "live"}}}},
        "routes": [{"name": "live", "match": {"path_prefix": "/"}, "upstream": "live"}],
    })
    c = KeepAliveClient(gw.port, timeout=5)

    def first_hit(t0, want, limit=3.0):
        """Seconds from t0 until a response is served by `want` (None if not within limit)."""
        while time.monotonic() - t0 < limit:
            r = c.request("GET", "/probe")
            assert r.status == 200, r
            if r.header("x-served-by") == want:
                return time.monotonic() - t0
        return None

    def last_hit(t0, unwanted, window=2.0):
        """Seconds from t0 to the last response served by `unwanted`, over `window` s (-1: none)."""
        last = -1.0
        n = 0
        while time.monotonic() - t0 < window:
            r = c.request("GET", "/probe")
            assert r.status == 200, r
            n += 1
            if r.header("x-served-by") == unwanted:
                last = time.monotonic() - t0
        assert n >= 20, f"only {n} requests in {window}s: the measurement is meaningless"
        return last

    assert burst(gw, 5)[0] == (200, base.served_by)
    timings = {}
    for round_ in range(2):
        # register
        t0 = time.monotonic()
        r = gw.admin("PUT", "/registry/services/live/instances/fresh",
                     body=json.dumps({"address": new.address, "labels": {"tier": "live"}}))
        assert r.status == 200, r
        dt = first_hit(t0, new.served_by)
        assert dt is not None and dt < 1.0, f"round {round_}: registration reached routing after {dt}s (limit 1 s)"
        timings[f"register{round_}"] = dt
        # relabel out of the selector
        t0 = time.monotonic()
        r = gw.admin("PUT", "/registry/services/live/instances/fresh",
                     body=json.dumps({"address": new.address, "labels": {"tier": "dark"}}))
        assert r.status == 200, r
        dt = last_hit(t0, new.served_by)
        assert dt < 1.0, f"round {round_}: relabelled instance still served {dt:.2f}s later (limit 1 s)"
        timings[f"relabel{round_}"] = dt
        # back in, then deregistered
        r = gw.admin("PUT", "/registry/services/live/instances/fresh",
                     body=json.dumps({"address": new.address, "labels": {"tier": "live"}}))
        assert r.status == 200, r
        dt = first_hit(time.monotonic(), new.served_by)
        assert dt is not None and dt < 1.0, f"relabelled back: reached routing after {dt}s"
        t0 = time.monotonic()
        r = gw.admin("DELETE", "/registry/services/live/instances/fresh")
        assert r.status == 200, r
        dt = last_hit(t0, new.served_by)
        assert dt < 1.0, f"round {round_}: deregistered instance still served {dt:.2f}s later (limit 1 s)"
        timings[f"deregister{round_}"] = dt
    c.close()
    r = gw.admin("DELETE", "/registry/services/live/instances/fresh")
    assert r.status == 404, f"deleting an unknown instance: {r}"
    assert [i["id"] for i in registry_instances(gw, "live")] == ["base"]


# =========================================================================== orchestrator

def test_replica_kill9_under_load_is_replaced_without_client_errors(procs, exe):
    gw = orch_gateway(procs, exe, orch_config([deployment(replicas=2)]))
    d = wait_ready(gw, 2)
    wait_until(lambda: len(registry_instances(gw, "app")) == 2, 3, what="both replicas registered")
    first, second = d["replicas"][0], d["replicas"][1]

    def replaced(victim):
        def check():
            dd = get_deployment(gw)
            for r in dd["replicas"]:
                if (r["id"] == victim["id"] and r["phase"] == "ready" and r["pid"]
                        and r["pid"] != victim["pid"] and r["restarts"] > victim["restarts"]):
                    return r
            return None
        return check

    with Load(gw.port, threads=3) as load:
        wait_until(lambda: load.count() >= 100, 15, what="load to get going")
        assert not load.errors(), f"errors before the kill: {load.errors()[:5]}"
        rounds = []
        # 1) the application process crashes (kill -9 of the server itself);
        # 2) kill -9 of the process the orchestrator started (the replica's pid)
        for victim, target in ((first, app_pid(first["pid"])), (second, second["pid"])):
            tree = process_tree(victim["pid"])
            assert "demo-backend" in _cmdline(target), (target, tree)
            t_kill = time.monotonic()
            os.kill(target, signal.SIGKILL)
            new = wait_until(replaced(victim), 15, what=f"replica {victim['id']} to be restarted and ready "
                                                        f"after kill -9 of pid {target}")
            t_back = time.monotonic()
            assert pid_running(new["pid"]), f"new pid {new['pid']} not running"
            wait_until(lambda: f"web:{new['port']}" in load.served_since(t_back), 5,
                       what="the restarted replica to receive traffic")
            wait_until(lambda: not still_running(tree), 3,
                       what=f"every process of the killed replica to be gone ({tree})")
            rounds.append((victim["id"], target, new, round(t_back - t_kill, 2)))
        time.sleep(0.5)
        count_during = load.count()
    errors = load.errors()
    assert count_during >= 300, f"only {count_during} requests under load; not a meaningful run"
    assert not errors, (f"{len(errors)} of {load.count()} requests failed around the kills "
                        f"(retries on connect_failure/reset configured): {errors[:5]}")
    dd = get_deployment(gw)
    assert dd["actual"] == 2 and len(ready_replicas(dd)) == 2, dd
    assert all(r["restarts"] == 1 for r in dd["replicas"]), f"each replica restarted once: {dd}"
    restarts = metric_sum(gw.metrics(), "portico_orchestrator_restarts_total", deployment="web")
    assert restarts >= 2, f"portico_orchestrator_restarts_total{{deployment=web}} = {restarts} after 2 kills"
    addrs = {i["address"] for i in registry_instances(gw, "app")}
    assert addrs == {f"127.0.0.1:{r[2]['port']}" for r in rounds}, (addrs, rounds)


def test_scale_up_and_down_registry_and_traffic_follow(procs, exe):
    gw = orch_gateway(procs, exe, orch_config([deployment(replicas=2)]))
    wait_ready(gw, 2)

    def reg_ports():
        return {int(i["address"].rsplit(":", 1)[1]) for i in registry_instances(gw, "app")}

    wait_until(lambda: len(reg_ports()) == 2, 3, what="2 registered replicas")
    assert len(ports_of(burst(gw, 10))) == 2

    # ---- 2 -> 5
    t0 = time.monotonic()
    r = gw.admin("PUT", "/orchestrator/deployments/web/replicas", body=json.dumps({"replicas": 5}))
    assert r.status == 200, r
    assert get_deployment(gw)["desired"] == 5
    wait_until(lambda: len(reg_ports()) == 5, 5.0, interval=0.05, what="the registry to list 5 ready replicas")
    t_reg = time.monotonic()
    five = reg_ports()
    seen_ok = None
    while time.monotonic() - t_reg < 2.0:
        res = burst(gw, 25)
        assert all(s == 200 for s, _ in res), res
        got = ports_of(res)
        assert got <= five, f"traffic reached ports outside the registry: {got - five}"
        if got == five:
            seen_ok = time.monotonic() - t_reg
            break
    assert seen_ok is not None, f"traffic did not spread over the 5 replicas within 2 s of them being registered"
    d = wait_ready(gw, 5, timeout=3)
    assert {r["port"] for r in d["replicas"]} == five, (d, five)
    gauge = metric_sum(gw.metrics(), "portico_registry_instances", service="app", state="ready")
    assert gauge == 5, f"portico_registry_instances{{service=app,state=ready}} = {gauge}"

    # ---- 5 -> 1
    before = {r["port"]: r["pid"] for r in d["replicas"]}
    trees = {r["port"]: process_tree(r["pid"]) for r in d["replicas"]}
    t0 = time.monotonic()
    r = gw.admin("PUT", "/orchestrator/deployments/web/replicas", body=json.dumps({"replicas": 1}))
    assert r.status == 200, r
    survivor = wait_until(lambda: (lambda rr: rr[0] if len(rr) == 1 else None)(ready_replicas(get_deployment(gw))),
                          2.0, interval=0.03, what="exactly one ready replica after scaling to 1")
    removed = set(before) - {survivor["port"]}
    assert survivor["port"] in before and len(removed) == 4, (survivor, before)
    clean_at = None
    while time.monotonic() - t0 < 2.0:
        res = burst(gw, 20)
        got = ports_of(res)
        if got == {survivor["port"]} and all(s == 200 for s, _ in res):
            clean_at = time.monotonic() - t0
            break
    assert clean_at is not None, f"removed replicas {sorted(removed)} still got traffic 2 s after scaling to 1"
    assert reg_ports() == {survivor["port"]}, f"registry still lists removed replicas: {reg_ports()}"
    res = burst(gw, 40)
    assert all(s == 200 for s, _ in res), res
    assert ports_of(res) == {survivor["port"]}, f"traffic after scale-down: {ports_of(res)}"
    # the removed processes are stopped (SIGTERM, SIGKILL after the 2 s grace period)
    wait_until(lambda: not any(still_running(trees[p]) for p in removed), 6,
               what="the processes of the 4 removed replicas to exit")
    # (a process that has just exited is reaped and marked stopped a moment later)
    wait_until(lambda: len(get_deployment(gw)["replicas"]) == 1, 2, what="stopped replicas to leave the list")
    d = get_deployment(gw)
    assert d["desired"] == 1 and d["actual"] == 1 and len(d["replicas"]) == 1, d


def test_rolling_update_under_load(procs, exe):
    dep = deployment(replicas=2, env={"APP_REV": "1"}, labels={"rev": "1"}, max_surge=1, max_unavailable=0)
    cfg = orch_config([dep])
    gw = orch_gateway(procs, exe, cfg)
    d1 = wait_ready(gw, 2)
    assert d1["generation"] == 1
    old = {r["port"]: r["pid"] for r in d1["replicas"]}
    old_trees = {r["port"]: process_tree(r["pid"]) for r in d1["replicas"]}
    for r in d1["replicas"]:
        assert _environ(app_pid(r["pid"])).get("APP_REV") == "1", f"replica env lacks APP_REV=1: {r}"
    wait_until(lambda: len(registry_instances(gw, "app")) == 2, 3, what="2 registered replicas")

    with Load(gw.port, threads=3) as load:
        wait_until(lambda: load.count() >= 100, 15, what="load to get going")
        dep2 = dict(dep, env={"APP_REV": "2"}, labels={"rev": "2"})
        t0 = time.monotonic()
        gw.write_config(orch_config([dep2]))  # atomic rewrite; the gateway watches the file

        ready_counts = []

        def rolled():
            d = get_deployment(gw)
            reps = d["replicas"]
            ready_counts.append(len(ready_replicas(d)))
            if (d["generation"] >= 2 and len(reps) == 2
                    and all(r["generation"] == d["generation"] and r["phase"] == "ready" for r in reps)):
                return d
            return None
        d2 = wait_until(rolled, 30, interval=0.1, what="the rolling update to finish (2 ready replicas of generation 2)")
        t_done = time.monotonic()
        new_ports = {r["port"] for r in d2["replicas"]}
        wait_until(lambda: load.served_since(time.monotonic() - 0.3) == {f"web:{p}" for p in new_ports}, 5,
                   what="traffic to reach only the new replicas")
        time.sleep(0.5)
    errors = load.errors()
    assert load.count() >= 300, f"only {load.count()} requests under load"
    assert not errors, (f"{len(errors)} of {load.count()} requests failed during the rolling update "
                        f"(retries on connect_failure/reset configured): {errors[:5]}")
    assert d2["generation"] == 2, f"generation should be 2 after one change: {d2}"
    assert min(ready_counts) >= 2, \
        f"ready replicas dropped below 2 during the update (max_unavailable 0): {ready_counts}"
    assert not (new_ports & set(old)), f"new replicas reuse old ports? {new_ports} vs {set(old)}"
    for r in d2["replicas"]:
        assert r["pid"] not in old.values(), f"replica {r} kept an old pid"
        assert _environ(app_pid(r["pid"])).get("APP_REV") == "2", f"new replica does not have the new env: {r}"
    # every old replica process is gone (drained with SIGTERM, SIGKILL after 2 s at worst)
    wait_until(lambda: not any(still_running(t) for t in old_trees.values()), 5,
               what="old-generation replica processes to exit")
    insts = registry_instances(gw, "app", None)
    assert {i["address"] for i in insts} == {f"127.0.0.1:{p}" for p in new_ports}, insts
    assert all(i["labels"].get("rev") == "2" for i in insts), f"registry labels not updated: {insts}"
    # traffic after the update: only new replicas
    assert ports_of(burst(gw, 30)) == new_ports
    assert t_done - t0 < 30


def _replica_trees(gw, exe, name="web") -> dict[int, dict[int, str]]:
    """{replica pid: its process tree}, once every tree contains its server process
    (`EXE demo-backend ...`, under whatever shim or wrapper)."""
    server = f"{exe} demo-backend"

    def trees():
        d = get_deployment(gw, name)
        out = {r["pid"]: process_tree(r["pid"]) for r in d["replicas"] if r.get("pid")}
        ok = all(any(c.startswith(server) for c in t.values()) for t in out.values())
        return out if out and ok else None
    out = wait_until(trees, 5, what=f"the server processes of {name}'s replicas")
    for pid in out:
        remember(pid)
    return out


def _wait_all_gone(trees: dict[int, dict[int, str]], within: float) -> list:
    everything = {p: c for t in trees.values() for p, c in t.items()}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and still_running(everything):
        time.sleep(0.05)
    return still_running(everything)


def test_gateway_sigkill_leaves_no_replica(procs, exe):
    gw = orch_gateway(procs, exe, orch_config([deployment(replicas=3)]))
    wait_ready(gw, 3)
    trees = _replica_trees(gw, exe)
    assert len(trees) == 3
    for pid, tree in trees.items():
        assert os.getpgid(pid) == pid, f"replica {pid} should lead its own process group"
        for p in tree:
            assert os.getpgid(p) == pid, f"process {p} of replica {pid} is outside its process group: {tree}"
    assert gw.get("/x").status == 200
    gw.signal(signal.SIGKILL)
    assert gw.wait_exit(5) is not None
    left = _wait_all_gone(trees, 1.5)
    assert not left, f"replica processes still running 1.5 s after the gateway was SIGKILLed: {left}"


def test_gateway_sigkill_leaves_no_process_of_a_wrapped_replica(procs, exe):
    """A replica whose command is a wrapper (a shell that starts the server as its child):
    the whole replica -- its process group -- must go when the gateway is SIGKILLed."""
    cmd = ["sh", "-c", f"{exe} demo-backend --name wrapped --port $PORT; echo exited"]
    gw = orch_gateway(procs, exe, orch_config([dict(deployment(name="wrapped", replicas=1), command=cmd)]))
    wait_ready(gw, 1, name="wrapped")
    trees = _replica_trees(gw, exe, "wrapped")
    tree = next(iter(trees.values()))
    assert any(c.startswith("sh ") for c in tree.values()), f"no wrapper shell in {tree}"
    assert gw.get("/x").status == 200
    gw.signal(signal.SIGKILL)
    assert gw.wait_exit(5) is not None
    left = _wait_all_gone(trees, 1.5)
    assert not left, f"processes of the wrapped replica survived the gateway's SIGKILL: {left} (tree {tree})"


def test_gateway_sigterm_stops_replicas_gracefully_and_exits_0(procs, exe, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # The wrapper records that the replica got SIGTERM (not SIGKILL) and exits 0; the
    # server it starts is in the same process group, so it gets SIGTERM too.
    wrapped = ["sh", "-c",
               f"trap 'echo term > {marks}/$PORT; exit 0' TERM; "
               f"{exe} demo-backend --name term --port $PORT & wait"]
    gw = orch_gateway(procs, exe, dict(orch_config([
        deployment(name="web", replicas=2),
        dict(deployment(name="term", service="app", replicas=2), command=wrapped),
    ]), server={"grace_period": "5s"}))
    wait_ready(gw, 2, name="web")
    d = wait_ready(gw, 2, name="term")
    trees = _replica_trees(gw, exe, "web")
    trees.update(_replica_trees(gw, exe, "term"))
    term_ports = sorted(r["port"] for r in d["replicas"])
    assert len(trees) == 4, trees
    res = burst(gw, 20)
    assert all(s == 200 for s, _ in res), res

    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    code = gw.wait_exit(15)
    elapsed = time.monotonic() - t0
    assert code == 0, f"gateway exit code after SIGTERM: {code} (after {elapsed:.1f}s)"
    left = _wait_all_gone(trees, 1.0)
    assert not left, f"replica processes still running after the gateway exited: {left}"
    got = sorted(int(p.name) for p in marks.iterdir())
    assert got == term_ports, f"replicas that saw SIGTERM (by port): {got}; expected all of {term_ports}"
    log = gw.log_path.read_text(errors="replace")
    killed = [l for l in log.splitlines() if "did not stop within" in l]
    assert not killed, f"replicas had to be SIGKILLed: {killed}"


def test_scale_to_zero_and_back_on_demand(procs, exe):
    auto = {"min": 0, "max": 2, "target_inflight": 5, "cooldown": "1s", "idle_after": "2s"}
    gw = orch_gateway(procs, exe, orch_config([deployment(replicas=0, autoscale=auto)], route_extra={"timeout": "20s"}))
    d = get_deployment(gw)
    assert d["desired"] == 0 and d["replicas"] == [], f"replicas: 0 should start nothing: {d}"
    time.sleep(1.0)
    d = get_deployment(gw)
    assert d["desired"] == 0 and d["replicas"] == [], f"nothing should start without traffic: {d}"

    for round_ in range(2):
        t0 = time.monotonic()
        r = gw.get(f"/cold/{round_}", timeout=25)
        waited = time.monotonic() - t0
        assert r.status == 200, f"round {round_}: first request after idle: {r} (after {waited:.1f}s)"
        assert waited < 15, f"cold start took {waited:.1f}s"
        port = served_port(r)
        d = get_deployment(gw)
        assert d["desired"] == 1, d
        assert [x["port"] for x in ready_replicas(d)] == [port], (d, port)
        tree = process_tree(ready_replicas(d)[0]["pid"])
        # warm requests go straight to it
        res = burst(gw, 10)
        assert res == [(200, f"web:{port}")] * 10, res
        t_last = time.monotonic()
        # idle: back to zero after idle_after (2 s) + cooldown (1 s) + slack
        def at_zero():
            dd = get_deployment(gw)
            return dd if dd["desired"] == 0 and not dd["replicas"] else None
        wait_until(at_zero, 2.0 + 1.0 + 3.0, interval=0.1, what=f"round {round_}: scale to zero after idling")
        t_zero = time.monotonic() - t_last
        left = _wait_all_gone({0: tree}, 1.0)
        assert not left, f"replica processes outlived scale to zero: {left}"
        assert not registry_instances(gw, "app", None), "registry still lists the scaled-down replica"
        assert t_zero >= 0.3, f"scaled to zero only {t_zero:.2f}s after traffic stopped"


def test_scale_to_zero_not_while_traffic_continues(procs, exe):
    """Steady light traffic (fast requests) must keep the replica: `idle_after` counts
    from the last request, not from the cold start."""
    auto = {"min": 0, "max": 2, "target_inflight": 5, "cooldown": "1s", "idle_after": "2s"}
    gw = orch_gateway(procs, exe, orch_config([deployment(replicas=0, autoscale=auto)], route_extra={"timeout": "20s"}))
    r = gw.get("/cold", timeout=25)
    assert r.status == 200, r
    pid = ready_replicas(get_deployment(gw))[0]["pid"]
    t0 = time.monotonic()
    c = KeepAliveClient(gw.port, timeout=25)
    slow, bad = [], []
    desired_seen = set()
    while time.monotonic() - t0 < 6.0:  # idle_after + cooldown + 3 s, one request every 200 ms
        ts = time.monotonic()
        try:
            r = c.request("GET", "/steady")
            if r.status != 200:
                bad.append(f"{r.status} {r.body[:120]!r}")
        except Exception as e:  # noqa: BLE001
            bad.append(repr(e))
        dt = time.monotonic() - ts
        if dt > 0.5:
            slow.append(round(dt, 2))
        desired_seen.add(get_deployment(gw)["desired"])
        time.sleep(0.2)
    c.close()
    d = get_deployment(gw)
    assert 0 not in desired_seen and not slow, (
        f"deployment scaled to zero under steady traffic (one request every 200 ms; desired values seen "
        f"{sorted(desired_seen)}; requests that waited for a cold start: {slow}; failed: {bad[:3]})")
    assert not bad, f"failed requests under steady traffic: {bad[:5]}"
    assert [x["pid"] for x in ready_replicas(d)] == [pid], f"replica was replaced under steady traffic: {d}"


def test_scale_from_zero_with_a_replica_slower_to_start_than_idle_after(procs, exe):
    """The request that wakes a scaled-to-zero deployment is waiting for it: the autoscaler
    must not scale back to zero (idle_after 2 s) while that request waits for a replica
    that needs 3 s to start."""
    auto = {"min": 0, "max": 2, "target_inflight": 5, "cooldown": "1s", "idle_after": "2s"}
    slow = ["sh", "-c", f"sleep 3; exec {exe} demo-backend --name slowstart --port $PORT"]
    gw = orch_gateway(procs, exe, orch_config([dict(deployment(name="web", replicas=0, autoscale=auto), command=slow)],
                                              route_extra={"timeout": "12s"}))
    time.sleep(1.2)  # past the cooldown since the deployment was created
    t0 = time.monotonic()
    r = gw.get("/cold", timeout=20)
    waited = time.monotonic() - t0
    log = [l for l in gw.log_path.read_text(errors="replace").splitlines()
           if "autoscaling" in l or "scaled from zero" in l or "stopped" in l]
    assert r.status == 200, (f"the waking request got {r.status} after {waited:.1f}s "
                             f"({r.body[:120]!r}); orchestrator log: {log}")
    assert r.header("x-served-by", "").startswith("slowstart:"), r
    assert 2.5 < waited < 10, f"cold start with a 3 s startup took {waited:.1f}s"


def test_replicas_restart_after_the_gateway_binary_is_replaced_on_disk(procs, exe, tmp_path):
    """`command: [portico, ...]` runs the gateway's own binary. Replacing that file on disk
    (an upgrade, a rebuild) must not stop the orchestrator from (re)starting replicas."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    own = bindir / "portico"
    os.link(exe, own)  # same file system; no 200 MB copy
    gw = orch_gateway(procs, own, orch_config([deployment(replicas=1)]))
    d = wait_ready(gw, 1)
    old = d["replicas"][0]
    assert gw.get("/x").status == 200

    # a new version lands at the same path (atomic rename of a different file over it)
    new = bindir / ".portico.new"
    new.write_text(f'#!/bin/sh\nexec {exe} "$@"\n')
    new.chmod(0o755)
    os.replace(new, own)

    os.kill(old["pid"], signal.SIGKILL)

    def restarted():
        dd = get_deployment(gw)
        r = dd["replicas"][0] if dd["replicas"] else None
        if r and r["phase"] == "ready" and r["pid"] and r["pid"] != old["pid"]:
            return r
        return None
    try:
        wait_until(restarted, 10, what="the killed replica to be restarted")
    except AssertionError:
        errs = [l for l in gw.log_tail(200).splitlines() if "cannot start" in l]
        raise AssertionError(f"replica not restarted after the binary was replaced on disk; "
                             f"gateway log: {errs[:2]}; deployment: {get_deployment(gw)}") from None
    # scaling up starts processes too
    r = gw.admin("PUT", "/orchestrator/deployments/web/replicas", body=json.dumps({"replicas": 2}))
    assert r.status == 200, r
    wait_ready(gw, 2, timeout=10)
