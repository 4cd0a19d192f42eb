"""Load balancing: weighted, least_request, consistent_hash (with reload), round_robin."""

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import KeepAliveClient


def _spray(gw, path, total, threads=4, headers_for=None):
    """Send `total` GETs over `threads` keep-alive connections; return (Counter of x-served-by, failures)."""
    counts = collections.Counter()
    failures = []
    lock = threading.Lock()

    def worker(idx):
        c = KeepAliveClient(gw.port)
        local = collections.Counter()
        bad = []
        for i in range(idx, total, threads):
            try:
                r = c.request("GET", path, headers_for(i) if headers_for else None)
            except Exception as e:  # noqa: BLE001
                bad.append(f"request {i}: {e!r}")
                continue
            if r.status != 200:
                bad.append(f"request {i}: {r}")
                continue
            local[r.header("x-served-by")] += 1
        c.close()
        with lock:
            counts.update(local)
            failures.extend(bad)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(worker, range(threads)))
    return counts, failures


def test_weighted_3_to_1(procs):
    a, b = procs.backends("wa", "wb")
    gw = procs.gateway({
        "upstreams": {"w": {"balance": "weighted", "endpoints": [
            {"address": a.address, "weight": 3}, {"address": b.address, "weight": 1}]}},
        "routes": [{"name": "w", "match": {"path_prefix": "/"}, "upstream": "w"}],
    })
    total = 4000
    counts, failures = _spray(gw, "/weighted", total)
    assert not failures, f"{len(failures)} failed requests, first: {failures[:5]}"
    assert set(counts) == {a.served_by, b.served_by}, f"unexpected x-served-by values: {counts}"
    share_a = counts[a.served_by] / total
    share_b = counts[b.served_by] / total
    # within +-5 percentage points of the configured 75% / 25%
    assert abs(share_a - 0.75) <= 0.05 and abs(share_b - 0.25) <= 0.05, (
        f"weights 3:1 over {total} requests gave {dict(counts)} ({share_a:.3f}/{share_b:.3f})")


def test_round_robin_even(procs):
    bs = procs.backends("r1", "r2", "r3")
    gw = procs.gateway({
        "upstreams": {"rr": {"balance": "round_robin", "endpoints": [b.address for b in bs]}},
        "routes": [{"name": "rr", "match": {"path_prefix": "/"}, "upstream": "rr"}],
    })
    total = 600
    counts, failures = _spray(gw, "/rr", total, threads=1)
    assert not failures, f"{len(failures)} failed requests, first: {failures[:5]}"
    expected = total / 3
    for b in bs:
        n = counts[b.served_by]
        assert abs(n - expected) <= 0.05 * expected, f"round_robin over 3 endpoints, {total} requests: {dict(counts)}"
    # also concurrently: still even
    counts, failures = _spray(gw, "/rr", total, threads=4)
    assert not failures, f"{len(failures)} failed requests, first: {failures[:5]}"
    for b in bs:
        n = counts[b.served_by]
        assert abs(n - expected) <= 0.05 * expected, f"round_robin, 4 clients, {total} requests: {dict(counts)}"


def test_least_request_avoids_slow_endpoint(procs):
    fast = procs.backend("fast")
    slow = procs.py_backend("slow", delay=0.3)   # every request takes 300 ms
    gw = procs.gateway({
        "upstreams": {"lr": {"balance": "least_request", "endpoints": [slow.address, fast.address],
                             "timeouts": {"connect": "2s", "read": "10s"}}},
        "routes": [{"name": "lr", "match": {"path_prefix": "/"}, "upstream": "lr"}],
    })
    counts = collections.Counter()
    failures = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 4.0

    def worker():
        c = KeepAliveClient(gw.port)
        while time.monotonic() < stop_at:
            try:
                r = c.request("GET", "/lr")
            except Exception as e:  # noqa: BLE001
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                if r.status == 200:
                    counts[r.header("x-served-by")] += 1
                else:
                    failures.append(repr(r))
        c.close()

    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not failures, f"{len(failures)} failed requests, first: {failures[:5]}"
    total = sum(counts.values())
    n_slow, n_fast = counts[slow.served_by], counts[fast.served_by]
    assert total == n_slow + n_fast, f"unexpected x-served-by: {counts}"
    assert total >= 100, f"too little traffic to judge ({counts})"
    # round robin would give the slow endpoint ~50%; least_request must give it very little
    assert n_slow / total < 0.15, f"least_request sent {n_slow}/{total} requests to the 300ms endpoint: {dict(counts)}"
    assert n_fast > 0


def test_consistent_hash_sticky_and_minimal_remap(procs):
    bs = procs.backends("h1", "h2", "h3")
    def cfg(endpoints):
        return {
            "upstreams": {"carts": {"balance": "consistent_hash", "hash_on": "header:x-user-id",
                                    "endpoints": [b.address for b in endpoints]}},
            "routes": [{"name": "carts", "match": {"path_prefix": "/"}, "upstream": "carts"}],
        }
    gw = procs.gateway(cfg(bs))
    keys = [f"user-{i}" for i in range(300)]

    def assign(rounds):
        where = collections.defaultdict(set)
        for _ in range(rounds):
            counts, failures = _spray_keys(gw, keys)
            assert not failures, f"{len(failures)} failed requests, first: {failures[:5]}"
            for k, served in counts.items():
                where[k].add(served)
        return where

    where = assign(3)
    moved = {k: v for k, v in where.items() if len(v) != 1}
    assert not moved, f"{len(moved)} keys were served by more than one endpoint, e.g. {list(moved.items())[:5]}"
    before = {k: next(iter(v)) for k, v in where.items()}
    per_ep = collections.Counter(before.values())
    for b in bs:
        assert per_ep[b.served_by] >= len(keys) * 0.10, f"key distribution very uneven: {dict(per_ep)}"

    # remove the third endpoint by a reload
    gw.write_config(cfg(bs[:2]))
    r = gw.reload()
    assert r.status == 200, f"POST /reload: {r}"
    where = assign(2)
    moved = {k: v for k, v in where.items() if len(v) != 1}
    assert not moved, f"after reload, keys served by more than one endpoint: {list(moved.items())[:5]}"
    after = {k: next(iter(v)) for k, v in where.items()}
    removed = bs[2].served_by
    assert removed not in after.values(), "removed endpoint still receives requests"
    remapped = [k for k in keys if before[k] != removed and after[k] != before[k]]
    assert not remapped, (f"{len(remapped)} keys that were not on the removed endpoint moved, e.g. "
                          f"{[(k, before[k], after[k]) for k in remapped[:5]]}")


def _spray_keys(gw, keys, threads=4):
    result = {}
    failures = []
    lock = threading.Lock()

    def worker(idx):
        c = KeepAliveClient(gw.port)
        for i in range(idx, len(keys), threads):
            k = keys[i]
            try:
                r = c.request("GET", f"/cart/{i}", {"x-user-id": k})
            except Exception as e:  # noqa: BLE001
                with lock:
                    failures.append(f"{k}: {e!r}")
                continue
            with lock:
                if r.status == 200:
                    result[k] = r.header("x-served-by")
                else:
                    failures.append(f"{k}: {r}")
        c.close()

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(worker, range(threads)))
    return result, failures
