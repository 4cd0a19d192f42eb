"""Active health checks: an endpoint that dies is taken out within 3 intervals, comes back
when it recovers, and with every endpoint down the gateway answers 503 no_healthy_upstream."""

import threading
import time

from conftest import KeepAliveClient, assert_gateway_error, metric_samples, wait_until

INTERVAL = 0.5
# "within 3 intervals", plus a little for process-kill / scheduling noise on a loaded 2-core box
DEADLINE = 3 * INTERVAL + 0.5


def _cfg(endpoints):
    return {
        "upstreams": {"app": {
            "balance": "round_robin",
            "endpoints": [b.address for b in endpoints],
            "health_check": {"path": "/healthz", "interval": "500ms", "timeout": "400ms",
                             "healthy_threshold": 1, "unhealthy_threshold": 1},
            "timeouts": {"connect": "1s", "read": "5s"},
        }},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }


def _endpoint_state(gw, address):
    ups = gw.admin_json("/upstreams")
    assert "app" in ups, f"/upstreams lacks 'app': {ups}"
    for ep in ups["app"]["endpoints"]:
        if ep["address"] == address:
            return ep
    raise AssertionError(f"/upstreams has no endpoint {address}: {ups}")


class Traffic:
    """Background requests every ~10 ms, recording (t_sent, status, x-served-by or error)."""

    def __init__(self, gw):
        self.gw = gw
        self.log = []
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        c = KeepAliveClient(self.gw.port, timeout=10)
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            try:
                r = c.request("GET", "/traffic")
                self.log.append((t0, r.status, r.header("x-served-by") if r.status == 200 else r.text[:200]))
            except Exception as e:  # noqa: BLE001
                self.log.append((t0, None, repr(e)))
            time.sleep(0.01)
        c.close()

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop_ev.set()
        self.t.join(15)

    def since(self, t):
        return [e for e in list(self.log) if e[0] >= t]


def test_dead_endpoint_removed_then_readmitted(procs):
    a, b = procs.backends("ha", "hb")
    gw = procs.gateway(_cfg([a, b]))
    wait_until(lambda: _endpoint_state(gw, a.address)["healthy"] and _endpoint_state(gw, b.address)["healthy"],
               10, what="both endpoints healthy")

    with Traffic(gw) as traffic:
        time.sleep(1.0)
        served = {e[2] for e in traffic.log if e[1] == 200}
        assert {a.served_by, b.served_by} <= served, f"before the kill both should serve: {served}"

        b.kill()
        t_kill = time.monotonic()
        wait_until(lambda: _endpoint_state(gw, b.address)["healthy"] is False, 10, interval=0.02,
                   what=f"{b.address} reported unhealthy in /upstreams")
        took = time.monotonic() - t_kill
        assert took <= DEADLINE, f"killed endpoint marked unhealthy after {took:.2f}s (> 3 intervals)"
        assert _endpoint_state(gw, a.address)["healthy"] is True

        # from 3 intervals after the kill on, every request is served by the live endpoint
        time.sleep(max(0.0, t_kill + DEADLINE - time.monotonic()) + 1.5)
        later = traffic.since(t_kill + DEADLINE)
        assert len(later) >= 20, f"too little traffic after the kill: {len(later)}"
        bad = [e for e in later if e[1] != 200 or e[2] != a.served_by]
        assert not bad, f"{len(bad)}/{len(later)} requests after 3 intervals not served by {a.served_by}: {bad[:5]}"

        samples = gw.metrics()
        hb = metric_samples(samples, "portico_upstream_endpoint_healthy", upstream="app", endpoint=b.address)
        ha = metric_samples(samples, "portico_upstream_endpoint_healthy", upstream="app", endpoint=a.address)
        assert hb and hb[0][1] == 0, f"portico_upstream_endpoint_healthy for the dead endpoint: {hb}"
        assert ha and ha[0][1] == 1, f"portico_upstream_endpoint_healthy for the live endpoint: {ha}"

        # restart on the same port: readmitted within 3 intervals of being up again
        b.start()
        t_up = time.monotonic()
        wait_until(lambda: _endpoint_state(gw, b.address)["healthy"] is True, 10, interval=0.02,
                   what=f"{b.address} reported healthy again")
        took = time.monotonic() - t_up
        assert took <= DEADLINE, f"restarted endpoint readmitted after {took:.2f}s (> 3 intervals)"
        wait_until(lambda: any(e[2] == b.served_by and e[0] >= t_up for e in list(traffic.log)), 10,
                   what="traffic reaching the restarted endpoint")
        first_b = min(e[0] for e in list(traffic.log) if e[2] == b.served_by and e[0] >= t_up)
        assert first_b - t_up <= DEADLINE, f"restarted endpoint got traffic only {first_b - t_up:.2f}s after it was up"
        time.sleep(1.0)

    after_restart = [e for e in traffic.log if e[0] >= t_kill + DEADLINE]
    bad = [e for e in after_restart if e[1] != 200]
    assert not bad, f"failed requests while one endpoint stayed healthy: {bad[:5]}"


def test_all_endpoints_down_503(procs):
    a, b = procs.backends("da", "db")
    gw = procs.gateway(_cfg([a, b]))
    wait_until(lambda: _endpoint_state(gw, a.address)["healthy"] and _endpoint_state(gw, b.address)["healthy"],
               10, what="both endpoints healthy")
    r = gw.get("/before")
    assert r.status == 200, r
    a.kill()
    b.kill()
    t_kill = time.monotonic()
    wait_until(lambda: not _endpoint_state(gw, a.address)["healthy"] and not _endpoint_state(gw, b.address)["healthy"],
               10, interval=0.02, what="both endpoints unhealthy")
    assert time.monotonic() - t_kill <= DEADLINE
    for i in range(5):
        r = gw.get(f"/down/{i}")
        assert_gateway_error(r, 503, "no_healthy_upstream")
    assert gw.alive()
