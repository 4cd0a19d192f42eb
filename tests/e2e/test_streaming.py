"""Streaming: 1 GiB request bodies (Content-Length and chunked) and a 1 GiB response body
pass through the gateway while its resident memory grows by less than 64 MiB.

Skipped with PORTICO_SKIP_SLOW=1; run by default."""

import http.client
import json
import threading
import time

import pytest

from conftest import slow

GIB = 1 << 30
MIB = 1 << 20
MAX_GROWTH = 64 * MIB
CHUNK = b"\xa5" * MIB

pytestmark = slow


class RssSampler:
    def __init__(self, gw, interval=0.02):
        self.gw = gw
        self.interval = interval
        self.samples = []
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop_ev.is_set():
            try:
                self.samples.append(self.gw.rss_bytes())
            except (OSError, RuntimeError):
                return
            time.sleep(self.interval)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop_ev.set()
        self.t.join(5)

    @property
    def peak(self):
        return max(self.samples) if self.samples else 0


@pytest.fixture(scope="module")
def gw(module_procs):
    backend = module_procs.backend("bulk")
    g = module_procs.gateway({
        "upstreams": {"bulk": {"endpoints": [backend.address], "timeouts": {"connect": "2s", "read": "120s"}}},
        "routes": [{"name": "bulk", "match": {"path_prefix": "/"}, "upstream": "bulk", "timeout": "600s"}],
    })
    # warm up: pools, buffers, allocator arenas
    for _ in range(2):
        _upload(g, 16 * MIB, chunked=False)
        _upload(g, 16 * MIB, chunked=True)
        assert _download(g, 16 * MIB) == 16 * MIB
    time.sleep(0.5)
    return g


def _upload(gw, size, chunked):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    try:
        conn.putrequest("POST", "/upload")
        conn.putheader("Content-Type", "application/octet-stream")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(size))
        conn.endheaders()
        sent = 0
        while sent < size:
            n = min(MIB, size - sent)
            piece = CHUNK if n == MIB else CHUNK[:n]
            if chunked:
                conn.send(b"%x\r\n" % n + piece + b"\r\n")
            else:
                conn.send(piece)
            sent += n
        if chunked:
            conn.send(b"0\r\n\r\n")
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, f"upload of {size} bytes answered {r.status}: {body[:300]!r}"
        got = json.loads(body)["body_bytes"]
        assert got == size, f"backend counted {got} body bytes, sent {size}"
        return got
    finally:
        conn.close()


def _download(gw, size, pause_after_first=0.0):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    try:
        conn.request("GET", f"/bytes/{size}")
        r = conn.getresponse()
        assert r.status == 200, f"GET /bytes/{size} answered {r.status}: {r.read(300)!r}"
        cl = r.getheader("content-length")
        if cl is not None:
            assert int(cl) == size, f"content-length {cl} for /bytes/{size}"
        buf = bytearray(MIB)
        view = memoryview(buf)
        total = 0
        paused = False
        while True:
            n = r.readinto(view)
            if not n:
                break
            total += n
            if pause_after_first and not paused:
                paused = True
                time.sleep(pause_after_first)   # a slow reader: the gateway must not buffer ahead
        return total
    finally:
        conn.close()


def _check_growth(gw, sampler, baseline, what):
    growth = sampler.peak - baseline
    print(f"{what}: baseline {baseline / MIB:.1f} MiB, peak {sampler.peak / MIB:.1f} MiB, "
          f"growth {growth / MIB:.1f} MiB over {len(sampler.samples)} samples")
    assert len(sampler.samples) >= 5, f"too few RSS samples ({len(sampler.samples)}) during {what}"
    assert growth < MAX_GROWTH, (f"{what}: gateway RSS grew by {growth / MIB:.1f} MiB "
                                 f"(baseline {baseline / MIB:.1f} MiB, peak {sampler.peak / MIB:.1f} MiB)")


def test_upload_1gib_content_length(gw):
    baseline = gw.rss_bytes()
    with RssSampler(gw) as s:
        assert _upload(gw, GIB, chunked=False) == GIB
    _check_growth(gw, s, baseline, "1 GiB Content-Length upload")


def test_upload_1gib_chunked(gw):
    baseline = gw.rss_bytes()
    with RssSampler(gw) as s:
        assert _upload(gw, GIB, chunked=True) == GIB
    _check_growth(gw, s, baseline, "1 GiB chunked upload")


def test_download_1gib(gw):
    baseline = gw.rss_bytes()
    with RssSampler(gw) as s:
        got = _download(gw, GIB, pause_after_first=2.0)
    assert got == GIB, f"received {got} bytes of {GIB}"
    _check_growth(gw, s, baseline, "1 GiB download")
