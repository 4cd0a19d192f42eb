"""Hot reload under load: >= 20,000 keep-alive requests while the config file is rewritten
50 times, valid and invalid alternating.  No request may fail; every valid version must be
observed; every invalid one must be refused while the previous config keeps serving."""

import json
import signal
import threading
import time

from conftest import KeepAliveClient, metric_sum, wait_until

WRITES = 50
MIN_REQUESTS = 20_000
THREADS = 6


def marker(k):
    return f"version-{k:03d}"


def valid_cfg(backend, k):
    return {
        "upstreams": {"app": {"endpoints": [backend.address], "timeouts": {"connect": "2s", "read": "10s"}}},
        "routes": [
            {"name": "app", "match": {"path_prefix": "/app"}, "upstream": "app",
             "headers": {"response": {"set": {"x-config-version": str(k)}}}},
            {"name": "version", "match": {"path": "/version"},
             "respond": {"status": 200, "body": marker(k),
                         "headers": {"x-config-version": str(k), "content-type": "text/plain"}}},
        ],
    }


def invalid_cfg(gw, backend, k):
    """Invalid configs still carry version k: if one were applied, the traffic would show it."""
    cfg = valid_cfg(backend, k)
    kind = (k // 2) % 5
    if kind == 0:
        cfg["routes"][0]["upstreem"] = "app"                      # unknown key
    elif kind == 1:
        cfg["routes"][0]["timeout"] = "5 parsecs"                 # bad duration
    elif kind == 2:
        cfg["routes"][0]["upstream"] = "no-such-upstream"         # dangling upstream
    elif kind == 3:
        cfg["routes"][1]["match"] = {"path_regex": "/version(["}  # invalid regex
    else:
        return gw.render(cfg) + "routes: [ {name: broken\n"       # YAML syntax error
    return gw.render(cfg)


class Load:
    def __init__(self, gw):
        self.gw = gw
        self.count = 0
        self.failures = []
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.reconnects = 0
        self.threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(THREADS)]

    def worker(self, idx):
        c = KeepAliveClient(self.gw.port, timeout=30)
        last_version = -1
        i = 0
        while not self.stop_ev.is_set():
            i += 1
            path = "/version" if i % 2 else f"/app/t{idx}/{i}"
            try:
                r = c.request("GET", path)
                ok, why = True, ""
                v = r.header("x-config-version")
                if r.status != 200:
                    ok, why = False, f"status {r.status}"
                elif v is None or not v.isdigit():
                    ok, why = False, f"bad x-config-version {v!r}"
                else:
                    v = int(v)
                    if v < last_version:
                        ok, why = False, f"version went back from {last_version} to {v}"
                    elif v % 2 == 0 and v != 0:
                        ok, why = False, f"invalid config version {v} was applied"
                    elif path == "/version" and r.text != marker(v):
                        ok, why = False, f"body {r.text!r} does not match header version {v}"
                    elif path != "/version" and json.loads(r.body).get("path") != path:
                        ok, why = False, f"backend saw path {json.loads(r.body).get('path')!r}"
                    last_version = max(last_version, v)
            except Exception as e:  # noqa: BLE001
                ok, why = False, repr(e)
            with self.lock:
                self.count += 1
                if not ok:
                    self.failures.append(f"thread {idx} GET {path}: {why}")
        with self.lock:
            self.reconnects += c.connects - 1
        c.close()

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(60)


def test_reload_under_load(procs):
    backend = procs.backend("app")
    gw = procs.gateway(valid_cfg(backend, 0))
    r = gw.get("/version")
    assert r.status == 200 and r.text == marker(0), r

    load = Load(gw)
    load.start()
    log = []
    try:
        for k in range(1, WRITES + 1):
            # spread the writes over the traffic
            target = (MIN_REQUESTS * (k - 1)) // WRITES
            wait_until(lambda: load.count >= target, 120, what=f"{target} requests before write {k}")
            samples = gw.metrics()
            err0 = metric_sum(samples, "portico_config_reloads_total", result="error")
            use_post = (k // 2) % 2 == 0
            t0 = time.monotonic()
            if k % 2 == 1:
                gw.write_config(valid_cfg(backend, k))
                if use_post:
                    r = gw.reload()
                    assert r.status == 200, f"write {k} (valid): POST /reload answered {r}"
                    assert isinstance(r.json().get("version"), int), f"POST /reload body: {r}"
                wait_until(lambda: gw.get("/version").text == marker(k), 15, interval=0.02,
                           what=f"valid config {k} to take effect ({'POST /reload' if use_post else 'file watcher'})")
                cfg_doc = gw.admin_json("/config")
                assert marker(k) in json.dumps(cfg_doc.get("config")), f"/config does not show config {k}"
                log.append((k, "valid", "post" if use_post else "watch", time.monotonic() - t0))
            else:
                text = invalid_cfg(gw, backend, k)
                gw.write_config(text)
                if use_post:
                    r = gw.reload()
                    assert r.status == 400, f"write {k} (invalid): POST /reload answered {r}"
                    body = r.json()
                    assert body.get("error") == "invalid_config", body
                    errs = body.get("errors")
                    assert isinstance(errs, list) and errs, f"no errors listed: {body}"
                    assert all(isinstance(e, str) and str(gw.config_path.name) in e for e in errs), (
                        f"errors are not FILE:LINE:COL: message strings: {errs}")
                else:
                    wait_until(lambda: metric_sum(gw.metrics(), "portico_config_reloads_total", result="error") > err0,
                               15, interval=0.05, what=f"invalid config {k} to be refused by the file watcher")
                assert metric_sum(gw.metrics(), "portico_config_reloads_total", result="error") > err0, (
                    f"portico_config_reloads_total{{result=\"error\"}} did not increase for invalid write {k}")
                cfg_doc = gw.admin_json("/config")
                lre = cfg_doc.get("last_reload_error")
                assert isinstance(lre, dict) and lre.get("errors"), f"/config last_reload_error after write {k}: {lre}"
                assert marker(k - 1) in json.dumps(cfg_doc.get("config")), "/config no longer shows the running config"
                r = gw.get("/version")
                assert r.status == 200 and r.text == marker(k - 1), (
                    f"after invalid write {k} the old config {k - 1} must keep serving, got {r}")
                log.append((k, "invalid", "post" if use_post else "watch", time.monotonic() - t0))
        wait_until(lambda: load.count >= MIN_REQUESTS, 180, what=f"{MIN_REQUESTS} requests")
    finally:
        load.stop()

    assert load.count >= MIN_REQUESTS
    assert not load.failures, (f"{len(load.failures)} of {load.count} requests failed during reloads; "
                               f"first: {load.failures[:10]}")
    # the last config (49) is the one serving, and the metrics agree with /config
    r = gw.get("/version")
    assert r.text == marker(WRITES - 1), r
    samples = gw.metrics()
    doc = gw.admin_json("/config")
    assert metric_sum(samples, "portico_config_version") == doc["version"], (
        f"portico_config_version {metric_sum(samples, 'portico_config_version')} != /config version {doc['version']}")
    assert metric_sum(samples, "portico_config_reloads_total", result="ok") >= WRITES // 2
    assert metric_sum(samples, "portico_config_reloads_total", result="error") >= WRITES // 2
    print(f"requests={load.count} reconnects={load.reconnects} reload latencies="
          f"{[(k, kind, how, round(t, 3)) for k, kind, how, t in log]}")


def test_sighup_reloads(procs):
    """SIGHUP re-reads the file. The file is not touched, so the file watcher cannot be the cause."""
    backend = procs.backend("app")
    gw = procs.gateway(valid_cfg(backend, 1))
    wait_until(lambda: gw.get("/version").text == marker(1), 10, what="config 1 serving")
    time.sleep(1.0)  # let any watcher event from the initial write settle
    samples = gw.metrics()
    ok0 = metric_sum(samples, "portico_config_reloads_total", result="ok")
    v0 = gw.admin_json("/config")["version"]
    gw.signal(signal.SIGHUP)
    wait_until(lambda: metric_sum(gw.metrics(), "portico_config_reloads_total", result="ok") > ok0
               or gw.admin_json("/config")["version"] > v0, 10, what="a reload after SIGHUP")
    assert gw.alive(), "gateway died on SIGHUP"
    # and a changed file + SIGHUP applies the change
    gw.write_config(valid_cfg(backend, 3))
    gw.signal(signal.SIGHUP)
    wait_until(lambda: gw.get("/version").text == marker(3), 10, what="config 3 after SIGHUP")
    assert gw.alive()
