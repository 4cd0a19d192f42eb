"""DNS discovery end to end: `discovery: { dns: "name:port" }` (A/AAAA, here `localhost`
through the system resolver) and `discovery: { dns: "_srv._tcp.name", resolver: IP:PORT }`
against a real dnsmasq whose records the test changes while traffic flows."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import time

import pytest

from conftest import BACKEND_READY_TIMEOUT, PORTICO_BIN, KeepAliveClient, Managed, free_port, wait_until

RETRIES = {"attempts": 2, "on": ["connect_failure", "reset"]}


def _served(gw, n: int, path="/dns") -> list[tuple[object, str | None]]:
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


def _endpoints(gw, upstream: str) -> set[str]:
    return {e["address"] for e in gw.admin_json("/upstreams")[upstream]["endpoints"]}


# --------------------------------------------------------------------------- A / AAAA

def test_dns_name_port_via_system_resolver(procs):
    port = free_port()
    v4 = procs.backend("dns4", port=port)
    # localhost may also resolve to ::1; serve there too when the host has IPv6 loopback
    v6 = None
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", port))
        s.close()
    except OSError:
        pass
    else:
        v6 = Managed("demo-backend dns6 [::1]", [PORTICO_BIN, "demo-backend", "--name", "dns6",
                                                "--bind", "[::1]", "--port", str(port)],
                     procs.dir / "backend-dns6.log")
        procs.track(v6)
        v6.start()

        def v6_ok():
            with socket.create_connection(("::1", port), timeout=0.5):
                return True
        wait_until(v6_ok, BACKEND_READY_TIMEOUT, what="the [::1] demo backend")

    gw = procs.gateway({
        "upstreams": {"byname": {"discovery": {"dns": f"localhost:{port}", "refresh": "500ms"},
                                 "timeouts": {"connect": "1s"}}},
        "routes": [{"name": "byname", "match": {"path_prefix": "/"}, "upstream": "byname", "retries": RETRIES}],
    })
    try:
        wait_until(lambda: f"127.0.0.1:{port}" in _endpoints(gw, "byname"), 5,
                   what=f"localhost:{port} to resolve to 127.0.0.1:{port}")
    except AssertionError as e:
        raise AssertionError(f"{e}; upstream endpoints {_endpoints(gw, 'byname')}, registry "
                             f"{json.dumps(gw.admin_json('/registry/services'))}") from None
    eps = _endpoints(gw, "byname")
    assert eps <= {f"127.0.0.1:{port}", f"[::1]:{port}"}, f"unexpected endpoints for localhost: {eps}"
    reg = gw.admin_json("/registry/services")
    svc = reg.get(f"dns:localhost:{port}")
    assert svc, f"DNS results are not in the registry: {list(reg)}"
    assert all(i["source"] == "dns" for i in svc["instances"]), svc

    res = _served(gw, 40)
    bad = [s for s, _ in res if s != 200]
    assert not bad, f"requests through DNS discovery failed: {bad[:5]} (endpoints {eps})"
    served = {sb for _, sb in res}
    allowed = {v4.served_by} | ({f"dns6:{port}"} if v6 else set())
    assert v4.served_by in served and served <= allowed, f"served by {served}, endpoints {eps}"

    # refresh keeps working and does not churn the upstream
    time.sleep(1.5)
    assert _endpoints(gw, "byname") == eps
    res = _served(gw, 10)
    assert all(s == 200 for s, _ in res), res


# --------------------------------------------------------------------------- SRV with dnsmasq

def _dnsmasq_binary() -> str | None:
    path = shutil.which("dnsmasq") or (shutil.which("dnsmasq", path="/usr/sbin:/sbin"))
    if path:
        return path
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-q", "dnsmasq"], capture_output=True, timeout=300, env=env)
        if r.returncode != 0:  # stale or missing package lists
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300, env=env)
            subprocess.run(["apt-get", "install", "-y", "-q", "dnsmasq"], capture_output=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")


def _dns_query(port: int, name: str, qtype: int) -> tuple[int, int]:
    """(rcode, answer count) of one UDP query to 127.0.0.1:port."""
    tid = random.randint(0, 65535)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    pkt = struct.pack(">HHHHHH", tid, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    try:
        s.sendto(pkt, ("127.0.0.1", port))
        data = s.recv(4096)
    finally:
        s.close()
    _, flags, _, an, _, _ = struct.unpack(">HHHHHH", data[:12])
    return flags & 0xF, an


class Dnsmasq:
    SRV = "_http._tcp.portico.test"

    def __init__(self, procs, binary: str):
        self.procs = procs
        self.binary = binary
        self.port = free_port()
        self.m: Managed | None = None
        self.n = 0

    def start(self, targets: list[tuple[str, int]]):
        """targets: [(host label, port)]; every host resolves to 127.0.0.1."""
        self.n += 1
        args = [self.binary, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=",
                "--user=root", "--local=/portico.test/", "--log-queries"]
        for host, port in targets:
            args.append(f"--srv-host={self.SRV},{host}.portico.test,{port}")
            args.append(f"--host-record={host}.portico.test,127.0.0.1")
        self.m = Managed(f"dnsmasq #{self.n}", args, self.procs.dir / f"dnsmasq-{self.n}.log")
        self.procs.track(self.m)
        self.m.start()

        def answers():
            if not self.m.alive():
                raise AssertionError(f"dnsmasq exited: {self.m.log_tail()}")
            rcode, an = _dns_query(self.port, self.SRV, 33)
            return rcode == 0 and an == len(targets)
        wait_until(answers, 10, what="dnsmasq to answer the SRV query")
        return self

    def stop(self):
        if self.m:
            self.m.stop()
            self.m = None


@pytest.fixture
def dnsmasq_bin():
    b = _dnsmasq_binary()
    if not b:
        pytest.skip("dnsmasq is not installed and `apt-get install -y dnsmasq` did not provide it")
    return b


def test_dns_srv_discovery_follows_record_changes(procs, dnsmasq_bin):
    b1, b2 = procs.backends("srv1", "srv2")
    dns = Dnsmasq(procs, dnsmasq_bin).start([("b1", b1.port)])
    # The SRV upstream arrives with a reload, so this test does not depend on the first
    # DNS answer at startup (test_dns_name_port_via_system_resolver covers that).
    gw = procs.gateway({"routes": [{"name": "hello", "match": {"path": "/hello"},
                                    "respond": {"status": 200, "body": "hi"}}]})
    gw.write_config({
        "upstreams": {"srv": {"discovery": {"dns": Dnsmasq.SRV, "resolver": f"127.0.0.1:{dns.port}",
                                            "refresh": "500ms"},
                              "timeouts": {"connect": "1s"}}},
        "routes": [{"name": "srv", "match": {"path_prefix": "/"}, "upstream": "srv", "retries": RETRIES}],
    })
    r = gw.reload()
    assert r.status == 200, r

    def only(want: set[str], n=20):
        res = _served(gw, n)
        return all(s == 200 for s, _ in res) and {sb for _, sb in res} == want

    wait_until(lambda: _endpoints(gw, "srv") == {b1.address}, 5, what="the SRV record to reach routing")
    assert only({b1.served_by}, 40), _served(gw, 10)
    reg = gw.admin_json("/registry/services").get(f"dns:{Dnsmasq.SRV}")
    assert reg and [i["address"] for i in reg["instances"]] == [b1.address], reg

    # DNS goes away: the last good answer stays in use
    dns.stop()
    time.sleep(1.6)  # three refreshes
    assert _endpoints(gw, "srv") == {b1.address}, "a DNS outage emptied the upstream"
    assert only({b1.served_by}), _served(gw, 10)

    # the record moves to another port: routing follows
    t0 = time.monotonic()
    dns.start([("b2", b2.port)])
    wait_until(lambda: only({b2.served_by}), 6, interval=0.1, what="routing to follow the SRV record to b2")
    moved = time.monotonic() - t0
    assert _endpoints(gw, "srv") == {b2.address}
    assert moved < 6

    # two records: both serve
    dns.stop()
    dns.start([("b1", b1.port), ("b2", b2.port)])
    wait_until(lambda: _endpoints(gw, "srv") == {b1.address, b2.address}, 6, what="both SRV targets")
    assert only({b1.served_by, b2.served_by}, 40), _served(gw, 10)
