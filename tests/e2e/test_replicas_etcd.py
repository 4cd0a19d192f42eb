"""Replicated gateways sharing one registry in a real etcd (`registry.backend: etcd`).

A real `etcd` 3.4 (Debian's etcd-server) runs on free loopback ports with its data in
the test's tmp dir. Three gateways listen on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with the
same config (only the listener address and admin port differ) and route `/` to the
registry service `app`. Checked:

(a) an instance registered through one gateway is routed by all three within 1 s, and
    a client spreading its requests over the three sees it; deregistration likewise;
(b) TTLs are etcd leases: heartbeats through any gateway keep an instance, and once they
    stop it leaves every gateway after its TTL;
(c) etcd killed: every gateway keeps routing the last known instances and admin writes
    answer 503 JSON; etcd restarted on the same data dir and ports: a new registration
    propagates again;
(d) an orchestrator deployment in one gateway: its replicas are routed by the other two;
    kill -9 of that gateway: they leave the others' routing after the lease TTL;
(e) one gateway cut off from etcd (through a TCP relay) while the others change the
    registry: it keeps its last known instances, logs the outage once, and on
    reconnection re-lists and applies the difference;
plus `portico check` errors for the `registry.etcd` section.

Measured propagation times (registration through one gateway -> routed by another) are
printed (run with `-s` to see them).
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import struct
import threading
import time
import uuid

import pytest

from conftest import (
    GATEWAY_READY_TIMEOUT,
    PORTICO_BIN,
    Managed,
    free_port,
    run_cli,
    wait_http_ok,
    wait_until,
)
from test_discovery import exe  # noqa: F401 - fixture: a private link to the binary for orchestrators

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/setup.sh)")

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
LEASE_TTL = 3  # seconds: the orchestrator lease of each gateway


class EtcdServer:
    """One etcd member on free loopback ports; restartable on the same ports and data."""

    def __init__(self, procs):
        self.procs = procs
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = procs.dir / "etcd-data"
        self.m: Managed | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self):
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.client_port}"
        self.m = Managed("etcd", [
            ETCD, "--name", "t", "--data-dir", self.data_dir,
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"t={peer}", "--initial-cluster-state", "new",
            "--log-level", "warn",
        ], self.procs.dir / "etcd.log")
        self.procs.track(self.m)
        self.m.start()
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 20.0):
        def healthy():
            if not self.m.alive():
                raise AssertionError(f"etcd exited: {self.m.log_tail()}")
            c = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=1.0)
            try:
                c.request("GET", "/health")
                r = c.getresponse()
                return r.status == 200 and json.loads(r.read()).get("health") == "true"
            finally:
                c.close()
        wait_until(healthy, timeout, interval=0.1, what="etcd /health")

    def kill(self):
        self.m.kill()


def req(host: str, port: int, method="GET", path="/", body=None, timeout=5.0):
    """(status, headers dict, body bytes) of one request on a fresh connection."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = {}
        if body is not None:
            body = body.encode() if isinstance(body, str) else body
            hdrs["Content-Length"] = str(len(body))
        elif method in ("PUT", "POST"):
            hdrs["Content-Length"] = "0"
        c.request(method, path, body=body, headers=hdrs)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


class Node:
    """One gateway of the fleet: `host` for traffic, admin on 127.0.0.1."""

    def __init__(self, gw, host):
        self.gw = gw
        self.host = host

    @property
    def label(self):
        return f"{self.host}:{self.gw.port}"

    def get(self, path="/"):
        return req(self.host, self.gw.port, "GET", path, timeout=3.0)

    def served_by(self) -> str | None:
        """Who answered GET / (x-served-by), or None for a gateway error / refusal."""
        try:
            status, h, _ = self.get()
        except OSError:
            return None
        return h.get("x-served-by") if status == 200 else None

    def admin(self, method, path, body=None, timeout=10.0):
        status, _, data = req("127.0.0.1", self.gw.admin_port, method, path, body, timeout)
        return status, (json.loads(data) if data else None)

    def register(self, iid, address, ttl=None, service="app"):
        body = {"address": address}
        if ttl:
            body["ttl"] = ttl
        return self.admin("PUT", f"/registry/services/{service}/instances/{iid}", json.dumps(body))

    def instances(self, service="app"):
        _, reg = self.admin("GET", "/registry/services")
        return (reg.get(service) or {}).get("instances", [])


def fleet_config(etcd: EtcdServer, prefix: str) -> dict:
    return {
        "registry": {"backend": "etcd",
                     "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix,
                              "lease_ttl": f"{LEASE_TTL}s", "timeout": "1s"}},
        "upstreams": {"app": {"discovery": {"service": "app"},
                              "timeouts": {"connect": "500ms", "read": "5s"}}},
        "routes": [{"name": "app", "match": {"path_prefix": "/"}, "upstream": "app"}],
    }


def start_fleet(procs, etcd, extra=None, exe=None, endpoint=None) -> list[Node]:
    """Three gateways with the same config; `extra[i]` adds keys to gateway i's config,
    `exe[i]` runs gateway i from another binary path and `endpoint[i]` gives it another
    etcd endpoint (a proxy)."""
    prefix = f"/portico-test-{uuid.uuid4().hex[:8]}"
    nodes = []
    for i, host in enumerate(HOSTS):
        cfg = fleet_config(etcd, prefix)
        cfg.update((extra or {}).get(i, {}))
        if i in (endpoint or {}):
            cfg["registry"]["etcd"]["endpoints"] = [endpoint[i]]
        gw = procs.gateway(cfg, name=f"gw{i + 1}", start=False)
        gw.write_config({**cfg, "listeners": [{"name": "web", "bind": f"{host}:{gw.port}"}]})
        binary = (exe or {}).get(i, PORTICO_BIN)
        gw.m = Managed(f"gateway gw{i + 1} ({host})", [binary, "run", "-c", gw.config_path], gw.log_path)
        procs.track(gw.m)
        gw.m.start()
        nodes.append(Node(gw, host))
    for n in nodes:
        wait_http_ok(n.gw.admin_port, "/readyz", GATEWAY_READY_TIMEOUT, n.gw.m)
    return nodes


def wait_routed_everywhere(nodes, served: str, timeout: float, since: float) -> dict[str, float]:
    """Polls every gateway in parallel until one of its answers comes from `served`;
    returns each gateway's delay since `since` (monotonic), or raises."""
    out: dict[str, float] = {}
    errors = []

    def poll(n: Node):
        deadline = since + timeout
        while time.monotonic() < deadline:
            if n.served_by() == served:
                out[n.label] = time.monotonic() - since
                return
            time.sleep(0.01)
        errors.append(f"{n.label} did not route to {served} within {timeout}s")

    ts = [threading.Thread(target=poll, args=(n,)) for n in nodes]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, "; ".join(errors)
    return out


def wait_gone_everywhere(nodes, served: str, timeout: float, since: float, service="app") -> dict[str, float]:
    """Until no gateway lists an instance answering as `served` (by address) nor routes to it."""
    port = served.rsplit(":", 1)[1]
    out: dict[str, float] = {}

    def gone(n: Node):
        if any(i["address"].endswith(f":{port}") for i in n.instances(service)):
            return False
        return all(n.served_by() != served for _ in range(5))

    deadline = since + timeout
    while len(out) < len(nodes) and time.monotonic() < deadline:
        for n in nodes:
            if n.label not in out and gone(n):
                out[n.label] = time.monotonic() - since
        time.sleep(0.02)
    missing = [n.label for n in nodes if n.label not in out]
    assert not missing, f"{served} still known or routed by {missing} after {timeout}s"
    return out


def spread(nodes, rounds: int) -> dict[str, dict[str, int]]:
    """A client that spreads requests over all gateways: per gateway, who answered."""
    seen: dict[str, dict[str, int]] = {n.label: {} for n in nodes}
    for _ in range(rounds):
        for n in nodes:
            who = n.served_by() or "error"
            seen[n.label][who] = seen[n.label].get(who, 0) + 1
    return seen


def report(what: str, delays: dict[str, float]):
    vals = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in sorted(delays.items()))
    print(f"\n[measure] {what}: {vals}")


@pytest.fixture
def etcd(procs):
    return EtcdServer(procs).start()


# --------------------------------------------------------------------------- (a)

def test_registration_through_one_gateway_is_routed_by_all_within_1s(procs, etcd):
    nodes = start_fleet(procs, etcd)
    b1, b2 = procs.backends("b1", "b2")
    for n in nodes:
        assert n.served_by() is None, f"{n.label} routes before anything is registered"

    t0 = time.monotonic()
    assert nodes[0].register("b1", b1.address) == (200, {"status": "registered", "service": "app", "id": "b1"})
    delays = wait_routed_everywhere(nodes, b1.served_by, 1.0, t0)
    report("b1 registered via gw1 -> routed", delays)
    # Every gateway mirrors it as coming from etcd.
    for n in nodes:
        insts = n.instances()
        assert [(i["id"], i["address"], i["source"]) for i in insts] == [("b1", b1.address, "etcd")], insts

    t0 = time.monotonic()
    assert nodes[1].register("b2", b2.address)[0] == 200
    delays = wait_routed_everywhere(nodes, b2.served_by, 1.0, t0)
    report("b2 registered via gw2 -> routed", delays)
    seen = spread(nodes, 20)
    for label, who in seen.items():
        assert set(who) == {b1.served_by, b2.served_by}, f"{label} answered from {who}"

    # Deregistration through the third gateway leaves every gateway within 1 s.
    t0 = time.monotonic()
    assert nodes[2].admin("DELETE", "/registry/services/app/instances/b1") == (200, {"status": "deregistered"})
    delays = wait_gone_everywhere(nodes, b1.served_by, 1.0, t0)
    report("b1 deregistered via gw3 -> gone", delays)
    seen = spread(nodes, 15)
    for label, who in seen.items():
        assert who == {b2.served_by: 15}, f"{label} answered from {who} after b1 was deregistered"
    # A second delete is a 404, from any gateway.
    status, body = nodes[0].admin("DELETE", "/registry/services/app/instances/b1")
    assert status == 404 and body["error"] == "not_found", (status, body)


# --------------------------------------------------------------------------- (b)

def test_ttl_is_a_lease_heartbeats_through_any_gateway(procs, etcd):
    nodes = start_fleet(procs, etcd)
    (b,) = procs.backends("lease")
    t0 = time.monotonic()
    assert nodes[0].register("t1", b.address, ttl="2s")[0] == 200
    wait_routed_everywhere(nodes, b.served_by, 1.0, t0)
    # Heartbeats through the other two gateways keep it for well past its TTL.
    until = time.monotonic() + 4.0
    k = 0
    while time.monotonic() < until:
        n = nodes[1 + k % 2]
        status, body = n.admin("PUT", "/registry/services/app/instances/t1/heartbeat", body=b"")
        assert (status, body) == (200, {"status": "renewed"}), f"heartbeat via {n.label}: {status} {body}"
        last = time.monotonic()
        k += 1
        time.sleep(0.5)
    for n in nodes:
        assert n.served_by() == b.served_by, f"{n.label} lost t1 although it was kept alive"
    # Heartbeats stop: gone from all after the TTL (etcd checks leases every 500 ms).
    delays = wait_gone_everywhere(nodes, b.served_by, 5.0, last)
    report("t1 (ttl 2s) after its last heartbeat -> gone", delays)
    assert min(delays.values()) > 1.5, f"t1 left before its TTL: {delays}"
    status, body = nodes[2].admin("PUT", "/registry/services/app/instances/t1/heartbeat", body=b"")
    assert status == 404 and body["error"] == "not_found", (status, body)


# --------------------------------------------------------------------------- (c)

def test_etcd_down_keeps_last_known_and_recovers(procs, etcd):
    nodes = start_fleet(procs, etcd)
    b1, b2 = procs.backends("keep", "late")
    t0 = time.monotonic()
    assert nodes[0].register("keep", b1.address)[0] == 200
    wait_routed_everywhere(nodes, b1.served_by, 1.0, t0)

    etcd.kill()
    # Routing keeps the last known instance on every gateway, for longer than the
    # reconnection attempts and HTTP/2 keep-alive deadlines involved.
    until = time.monotonic() + 4.0
    while time.monotonic() < until:
        seen = spread(nodes, 1)
        for label, who in seen.items():
            assert who == {b1.served_by: 1}, f"{label} answered from {who} with etcd down"
        time.sleep(0.1)
    # Writes cannot be taken: 503 JSON, in bounded time.
    t = time.monotonic()
    status, body = nodes[1].register("late", b2.address)
    assert status == 503 and body["error"] == "registry_unavailable", (status, body)
    assert time.monotonic() - t < 5.0
    status, body = nodes[2].admin("DELETE", "/registry/services/app/instances/keep")
    assert status == 503 and body["error"] == "registry_unavailable", (status, body)
    for n in nodes:
        assert n.served_by() == b1.served_by

    # etcd back on the same data and ports: a new registration propagates again.
    etcd.start()
    t_up = time.monotonic()

    def registered():
        return nodes[1].register("late", b2.address)[0] == 200
    wait_until(registered, 10.0, interval=0.2, what="a registration accepted after etcd restarted")
    t0 = time.monotonic()
    delays = wait_routed_everywhere(nodes, b2.served_by, 3.0, t0)
    report(f"after etcd restart (write accepted {t0 - t_up:.2f}s after etcd was healthy) -> routed", delays)
    seen = spread(nodes, 12)
    for label, who in seen.items():
        assert set(who) == {b1.served_by, b2.served_by}, f"{label} answered from {who}"


# --------------------------------------------------------------------------- (d)

def test_orchestrated_replicas_shared_and_gone_after_owner_dies(procs, etcd, exe):
    deployment = {"name": "web", "service": "app", "replicas": 2,
                  "command": ["portico", "demo-backend", "--name", "web", "--port", "{port}"],
                  "readiness": {"path": "/healthz", "interval": "200ms"},
                  "restart_backoff": {"min": "200ms", "max": "5s"}, "grace_period": "2s"}
    nodes = start_fleet(procs, etcd, extra={0: {"orchestrator": {"deployments": [deployment]}}},
                        exe={0: exe})
    owner, others = nodes[0], nodes[1:]

    def ports_of(n):
        return sorted(int(i["address"].rsplit(":", 1)[1]) for i in n.instances() if i["state"] == "ready")

    ports = wait_until(lambda: len(ports_of(owner)) == 2 and ports_of(owner), 20.0, what="2 ready replicas")
    for n in others:
        wait_until(lambda: ports_of(n) == ports, 3.0, what=f"{n.label} to list the replicas {ports}")
        srcs = {(i["source"], i["id"].split(".")[0]) for i in n.instances()}
        assert {s for s, _ in srcs} == {"etcd"}, srcs
    # The owner routes them from its own orchestrator; the others through etcd.
    assert {i["source"] for i in owner.instances()} == {"orchestrator"}
    seen = spread(nodes, 20)
    for label, who in seen.items():
        assert set(who) == {f"web:{p}" for p in ports}, f"{label} answered from {who}"

    # kill -9 of the owner: its lease is no longer kept alive, so after its TTL its
    # replicas are gone from the others (its replicas die with it, too).
    owner.gw.m.proc.send_signal(signal.SIGKILL)
    owner.gw.m.proc.wait(timeout=10)
    t_kill = time.monotonic()
    wait_until(lambda: not any(n.instances() for n in others), LEASE_TTL + 4.0, interval=0.05,
               what="the dead gateway's replicas to leave the other gateways")
    gone_after = time.monotonic() - t_kill
    print(f"\n[measure] replicas of a kill -9'd gateway left the others {gone_after * 1000:.0f} ms later "
          f"(lease TTL {LEASE_TTL}s)")
    assert gone_after > LEASE_TTL - 1.5, f"gone after {gone_after:.2f}s: earlier than the lease could lapse"
    for n in others:
        assert n.served_by() is None, f"{n.label} still routes somewhere"


# --------------------------------------------------------------------------- (e)

class TcpProxy:
    """A TCP relay to etcd that can be cut (connections reset, port refusing) and restored."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            with self.lock:
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for x in (src, dst):
            try:
                x.close()
            except OSError:
                pass

    def cut(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            socks, self.socks = self.socks, []
        for x in socks:
            try:
                x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                x.close()
            except OSError:
                pass


def test_one_gateway_cut_off_keeps_last_known_then_resyncs_by_diff(procs, etcd):
    """gw3 alone loses etcd while the others change the registry: it keeps its last
    known instances, logs the outage once, and on reconnection re-lists and applies the
    difference (an instance deleted meanwhile leaves, one added meanwhile arrives)."""
    proxy = TcpProxy(etcd.client_port)
    procs.extra_cleanup.append(proxy.cut)
    nodes = start_fleet(procs, etcd, endpoint={2: f"127.0.0.1:{proxy.port}"})
    cut_off = nodes[2]
    old, new, stay = procs.backends("old", "new", "stay")
    t0 = time.monotonic()
    assert nodes[0].register("old", old.address)[0] == 200
    assert nodes[0].register("stay", stay.address)[0] == 200
    wait_routed_everywhere(nodes, old.served_by, 1.0, t0)
    wait_routed_everywhere(nodes, stay.served_by, 1.0, t0)

    proxy.cut()
    # gw3 notices and answers writes with 503; the others still take them.
    wait_until(lambda: cut_off.register("probe", stay.address)[0] == 503, 5.0, interval=0.2,
               what="gw3 to refuse writes while cut off")
    assert nodes[0].admin("DELETE", "/registry/services/app/instances/old")[0] == 200
    assert nodes[1].register("new", new.address)[0] == 200
    t_change = time.monotonic()
    wait_gone_everywhere(nodes[:2], old.served_by, 1.0, t_change)
    wait_routed_everywhere(nodes[:2], new.served_by, 1.0, t_change)
    # Several reconnection attempts fail meanwhile; gw3 keeps what it knew.
    time.sleep(3.0)
    ids = sorted(i["id"] for i in cut_off.instances())
    assert ids == ["old", "stay"], f"gw3 while cut off lists {ids}"
    seen = spread([cut_off], 12)[cut_off.label]
    assert set(seen) == {old.served_by, stay.served_by}, f"gw3 answered from {seen}"

    proxy.restore()
    t_back = time.monotonic()
    wait_until(lambda: sorted(i["id"] for i in cut_off.instances()) == ["new", "stay"], 5.0,
               interval=0.05, what="gw3 to re-list and apply the difference")
    # Routing follows the registry within 1 s.
    t_listed = time.monotonic()
    wait_gone_everywhere([cut_off], old.served_by, 1.0, t_listed)
    wait_routed_everywhere([cut_off], new.served_by, 1.0, t_listed)
    print(f"\n[measure] gw3 resynced (registry and routing) {1000 * (time.monotonic() - t_back):.0f} ms "
          f"after etcd became reachable again")
    seen = spread([cut_off], 12)[cut_off.label]
    assert set(seen) == {new.served_by, stay.served_by}, f"gw3 answered from {seen}"
    # One line per state change, not one per failed attempt.
    log = cut_off.gw.log_path.read_text()
    assert log.count("etcd registry: unreachable") == 1, cut_off.gw.log_tail(40)
    assert log.count("etcd registry: connected") == 2, cut_off.gw.log_tail(40)


# --------------------------------------------------------------------------- config

def check(tmp_path, registry_yaml: str) -> tuple[str, int, str]:
    """`portico check` on a config with this `registry:` section: (file, exit code, output)."""
    cfg = tmp_path / "check.yaml"
    cfg.write_text("listeners:\n  - { name: web, bind: \"127.0.0.1:18080\" }\nregistry:\n" + registry_yaml)
    r = run_cli(["check", "-c", cfg])
    return str(cfg), r.returncode, r.stdout + r.stderr


def test_etcd_config_errors_have_positions(tmp_path):
    f, rc, out = check(tmp_path, "  backend: etcd\n"
                                 "  etcd:\n"
                                 "    endpoints: []\n"
                                 "    prefix: portico/\n"
                                 "    lease_ttl: 1s\n")
    assert rc != 0
    assert f"{f}:6:16: at least one etcd endpoint is needed" in out, out
    assert f"{f}:7:13: invalid prefix `portico/`" in out, out
    assert f"{f}:8:16: lease_ttl must be at least 2s" in out, out

    f, rc, out = check(tmp_path, "  backend: etcd\n  etcd:\n    endpoints: [\"127.0.0.1:2379\"]\n    prefx: /p\n")
    assert rc != 0 and f"{f}:7:5: unknown field `prefx`" in out, out

    f, rc, out = check(tmp_path, "  backend: etcd\n  etcd:\n"
                                 "    endpoints: [\"127.0.0.1:2379\", \"https://e:2379\", \"nohost\"]\n")
    assert rc != 0
    assert f"{f}:6:35: `https://e:2379`: TLS to etcd is not supported" in out, out
    assert f"{f}:6:53: invalid etcd endpoint `nohost`" in out, out

    f, rc, out = check(tmp_path, "  backend: etcd\n")
    assert rc != 0 and f"{f}:4:12: the etcd backend needs" in out, out

    f, rc, out = check(tmp_path, "  etcd: { endpoints: [\"127.0.0.1:2379\"] }\n")
    assert rc != 0 and f"{f}:4:3: `registry.etcd` is only used with `backend: etcd`" in out, out

    f, rc, out = check(tmp_path, "  backend: etcd\n  etcd: { endpoints: [\"127.0.0.1:2379\"], prefix: /fleet/a }\n")
    assert rc == 0, out
