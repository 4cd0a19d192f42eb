"""Failure handling end to end, with demo backends that misbehave on cue: retries around a
dead endpoint and around resets (never retrying a POST without an Idempotency-Key), the
retry budget under a full outage, the circuit breaker and its gauge, timeouts, and outlier
ejection."""

import concurrent.futures as cf
import time

from conftest import KeepAliveClient, assert_gateway_error, free_port, http_request, metric_samples, metric_sum, wait_until


def _stats(backend):
    return http_request(backend.port, "GET", "/_stats").json()["requests"]


def _mode(backend, mode):
    r = http_request(backend.port, "PUT", f"/_control/mode/{mode}", body=b"")
    assert r.status == 200, r


def _hammer(port, paths, workers=8, method="GET", headers=None, body=None):
    """Sends every path once over `workers` keep-alive connections; returns the statuses."""
    chunks = [paths[i::workers] for i in range(workers)]

    def run(chunk):
        c = KeepAliveClient(port, timeout=20)
        out = []
        for p in chunk:
            try:
                out.append(c.request(method, p, headers=headers, body=body).status)
            except Exception as e:  # noqa: BLE001
                out.append(repr(e))
                c.close()
                c = KeepAliveClient(port, timeout=20)
        c.close()
        return out

    with cf.ThreadPoolExecutor(workers) as ex:
        return [s for part in ex.map(run, chunks) for s in part]


def test_dead_endpoint_with_retries_no_failures(procs):
    a, b = procs.backends("ra", "rb")
    dead = free_port()  # nothing listens here
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [a.address, b.address, f"127.0.0.1:{dead}"],
                              "timeouts": {"connect": "500ms", "read": "5s"}}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app",
                    "retries": {"attempts": 2, "on": ["connect_failure", "reset", "503"]}}],
    })
    statuses = _hammer(gw.port, [f"/item/{i}" for i in range(10_000)])
    bad = [s for s in statuses if s != 200]
    assert not bad, f"{len(bad)} of 10000 failed: {bad[:5]}"
    samples = gw.metrics()
    cf_count = metric_sum(samples, "portico_upstream_requests_total", upstream="app", outcome="connect_failure")
    assert cf_count >= 1, "the dead endpoint was never tried (connect failures not counted)"


def test_resets_retried_for_get_not_for_post(procs):
    a, b = procs.backends("sa", "sb")
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [a.address, b.address], "timeouts": {"read": "5s"},
                              "retry_budget": {"ratio": 1.0, "min_per_second": 50}}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app",
                    "retries": {"attempts": 8, "on": ["reset", "connect_failure"]}}],
    })
    statuses = _hammer(gw.port, [f"/flaky/{i}?reset=0.3" for i in range(600)], workers=4)
    bad = [s for s in statuses if s != 200]
    assert not bad, f"{len(bad)} of 600 GETs failed despite retries: {bad[:5]}"
    samples = gw.metrics()
    resets = metric_sum(samples, "portico_upstream_requests_total", upstream="app", outcome="reset")
    assert resets >= 60, f"expected many resets retried, counted {resets}"

    # POST without Idempotency-Key: reaches the backend exactly once, the client sees the error.
    _mode(a, "reset")
    _mode(b, "reset")
    before = _stats(a) + _stats(b)
    r = http_request(gw.port, "POST", "/charge", body=b'{"amount": 10}', headers={"content-type": "application/json"})
    assert r.status == 502, f"POST over a reset should fail with 502: {r}"
    after = _stats(a) + _stats(b)
    assert after - before == 1, f"the POST reached the backends {after - before} times"

    # ... but with an Idempotency-Key it is retried.
    before = after
    r = http_request(gw.port, "POST", "/charge", body=b'{"amount": 10}',
                     headers={"content-type": "application/json", "idempotency-key": "k-1"})
    assert r.status == 502, r
    assert _stats(a) + _stats(b) - before == 9, "an idempotent POST gets the full retry policy (1 + 8 tries)"


def test_retry_budget_stops_storms(procs):
    a, b = procs.backends("ba", "bb")
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [a.address, b.address]}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app",
                    "retries": {"attempts": 2, "on": ["503"], "backoff": {"base": "1ms", "max": "5ms"}}}],
    })
    _mode(a, "fail")
    _mode(b, "fail")
    n = 2000
    statuses = _hammer(gw.port, [f"/down/{i}" for i in range(n)])
    assert all(s == 503 for s in statuses), set(map(str, statuses))
    received = _stats(a) + _stats(b)
    assert received <= 1.25 * n, f"backends received {received} for {n} client requests (> 1.25x)"
    assert received > n, "some retries should still have happened within the budget"


def test_circuit_breaker_opens_and_closes(procs):
    a = procs.backend("cb")
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [a.address],
                              "circuit_breaker": {"consecutive_failures": 5, "open_for": "1s"}}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}],
    })

    def gauge():
        s = metric_samples(gw.metrics(), "portico_circuit_breaker_open", upstream="app")
        return s[0][1] if s else None

    assert gauge() == 0
    _mode(a, "fail")
    for i in range(5):
        assert gw.get(f"/x/{i}").status == 503
    seen = _stats(a)
    # open: the gateway answers at once, nothing reaches the backend
    for i in range(20):
        r = gw.get(f"/open/{i}")
        assert_gateway_error(r, 503, "no_healthy_upstream")
    assert _stats(a) == seen, "requests reached the backend while the breaker was open"
    assert gauge() == 1
    # backend recovers; after open_for one trial closes the breaker
    _mode(a, "ok")
    time.sleep(1.2)
    wait_until(lambda: gw.get("/trial").status == 200, 5, what="breaker closing after recovery")
    assert gauge() == 0
    assert all(gw.get(f"/closed/{i}").status == 200 for i in range(10))


def test_hanging_backend_times_out(procs):
    a = procs.backend("hang")
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [a.address]}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app", "timeout": "500ms"}],
    })
    _mode(a, "hang")
    for _ in range(3):
        t0 = time.monotonic()
        r = gw.get("/slow")
        took = time.monotonic() - t0
        assert_gateway_error(r, 504, "upstream_timeout")
        assert took <= 0.5 + 0.1 + 0.05, f"504 after {took:.3f}s (timeout 500ms)"


def test_outlier_is_ejected(procs):
    good = procs.backends("oa", "ob", "oc")
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [b.address for b in good],
                              "outlier_detection": {"interval": "500ms", "min_requests": 5,
                                                    "base_ejection": "30s", "max_ejection_percent": 50}}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}],
    })
    _mode(good[2], "fail")

    def ejected():
        eps = gw.admin_json("/upstreams")["app"]["endpoints"]
        return {e["address"] for e in eps if e["ejected"]}

    def traffic_until_ejected():
        _hammer(gw.port, [f"/o/{i}" for i in range(60)], workers=2)
        return ejected() == {good[2].address}

    wait_until(traffic_until_ejected, 10, interval=0.1, what="the failing endpoint ejected")
    before = _stats(good[2])
    statuses = _hammer(gw.port, [f"/after/{i}" for i in range(60)], workers=2)
    assert all(s == 200 for s in statuses)
    assert _stats(good[2]) == before, "the ejected endpoint still received traffic"


def test_hedging_answers_from_the_fast_endpoint(procs):
    slow, fast = procs.backends("hslow", "hfast")
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [slow.address, fast.address], "balance": "round_robin",
                              "retry_budget": {"ratio": 1.0, "min_per_second": 100}}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app", "timeout": "5s",
                    "hedge": {"delay": "50ms"}}],
    })
    _mode(slow, "hang")
    times = []
    for i in range(20):
        t0 = time.monotonic()
        r = gw.get(f"/h/{i}")
        times.append(time.monotonic() - t0)
        assert r.status == 200, r
        assert r.header("x-served-by") == fast.served_by, r.header("x-served-by")
    assert max(times) < 1.0, f"hedged requests took up to {max(times):.2f}s"
    hedges = metric_sum(gw.metrics(), "portico_upstream_requests_total", upstream="app", outcome="hedge")
    assert hedges >= 5, f"about half the requests should have been hedged, counted {hedges}"
    # POST is never hedged: it waits for the hanging endpoint or the fast one, never both.
    before = _stats(slow) + _stats(fast)
    r = http_request(gw.port, "POST", "/once", body=b"x", timeout=10)
    assert _stats(slow) + _stats(fast) - before == 1


def test_bodies_over_max_replay_body_are_not_retried(procs):
    a, b = procs.backends("ma", "mb")
    gw = procs.gateway({
        "upstreams": {"app": {"endpoints": [a.address, b.address],
                              "retry_budget": {"ratio": 1.0, "min_per_second": 50}}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app",
                    "retries": {"attempts": 3, "on": ["reset"], "max_replay_body": "512"}}],
    })
    _mode(a, "reset")
    _mode(b, "reset")
    hdrs = {"content-type": "text/plain", "idempotency-key": "k-2"}
    before = _stats(a) + _stats(b)
    r = http_request(gw.port, "PUT", "/small", body=b"x" * 100, headers=hdrs)
    assert r.status == 502, r
    assert _stats(a) + _stats(b) - before == 4, "a small body is replayed (1 + 3 tries)"
    before = _stats(a) + _stats(b)
    r = http_request(gw.port, "PUT", "/big", body=b"x" * 2048, headers=hdrs)
    assert r.status == 502, r
    assert _stats(a) + _stats(b) - before == 1, "a body over max_replay_body is sent once"
