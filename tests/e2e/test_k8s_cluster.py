"""Cluster mode: the real watchers against the test API server (k8s_apiserver.py).

The gateway runs `portico run` with a `kubernetes:` section whose kubeconfig points at
an in-process API server that speaks the real list/watch protocol. Every check is made
with real requests through the gateway to real demo backends: Ingress and EndpointSlice
changes reach routing within 1 s, an API server outage keeps routing as it was and a
restart with a fresh history (410 Gone on the old resourceVersion) resyncs, Ingress
status gets the configured address, `/readyz` waits for the first full sync, missing
Gateway API CRDs do not stop Ingress handling, an HTTPRoute with a weighted split
and a header match routes as written, TLS Secrets arrive and rotate through the watch,
credentials come from the config or `KUBECONFIG` (none: exit 2), and the `kubernetes`
settings are validated.
"""

from __future__ import annotations

import time

import pytest

from conftest import free_port, run_cli, wait_http_ok, wait_until
from k8s_apiserver import ApiServer

CLASS = "portico"
CONTROLLER = "portico.io/ingress-controller"
CHANGE_DEADLINE = 1.0  # seconds from an API change to routing it


# --------------------------------------------------------------------------- objects

def ingress_class(default: bool = False) -> dict:
    meta = {"name": CLASS}
    if default:
        meta["annotations"] = {"ingressclass.kubernetes.io/is-default-class": "true"}
    return {"kind": "IngressClass", "metadata": meta, "spec": {"controller": CONTROLLER}}


def service(name: str, ns: str = "default") -> dict:
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def endpoint_slice(name: str, svc: str, port: int, ns: str = "default", ready: bool = True) -> dict:
    """One slice of `svc`: the demo backend on 127.0.0.1:`port`."""
    return {"kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"],
                           "conditions": {"ready": ready, "serving": ready, "terminating": False}}]}


def ingress(name: str, paths: list[tuple[str, str]], ns: str = "default", host: str | None = None,
            cls: str | None = CLASS) -> dict:
    """An Ingress routing each (path, service) with pathType Prefix to port 80."""
    rule = {"http": {"paths": [
        {"path": p, "pathType": "Prefix", "backend": {"service": {"name": s, "port": {"number": 80}}}}
        for p, s in paths]}}
    if host:
        rule["host"] = host
    spec = {"rules": [rule]}
    if cls:
        spec["ingressClassName"] = cls
    return {"kind": "Ingress", "metadata": {"name": name, "namespace": ns}, "spec": spec}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def api():
    server = ApiServer(bookmark_interval=1.0).start()
    yield server
    server.stop()


def cluster_gateway(procs, tmp_path, api: ApiServer, start: bool = True, **k8s):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    settings = {"ingress_class": CLASS, "kubeconfig": str(kubeconfig)}
    settings.update(k8s)
    return procs.gateway({"kubernetes": settings}, start=start)


def served_by(gw, path: str, headers=None) -> str | None:
    r = gw.get(path, headers=headers, timeout=5)
    return r.header("x-served-by") if r.status == 200 else f"status {r.status}"


def wait_route(gw, path: str, want, what: str, headers=None, timeout: float = CHANGE_DEADLINE):
    """Polls `path` until the answering backend (or `status N`) satisfies `want`;
    returns the seconds it took."""
    t0 = time.monotonic()
    pred = want if callable(want) else (lambda v: v == want)
    last = []

    def check():
        v = served_by(gw, path, headers)
        last[:] = [v]
        return pred(v)

    try:
        wait_until(check, timeout, interval=0.02, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; last answer {last}") from None
    return time.monotonic() - t0


def wait_only(gw, path: str, allowed: set[str], what: str, timeout: float = CHANGE_DEADLINE):
    """Polls until 8 answers in a row all come from `allowed` (round robin would show a
    backend still in rotation within 8)."""
    streak = []

    def check():
        v = served_by(gw, path)
        if v in allowed:
            streak.append(v)
        else:
            streak.clear()
        return len(streak) >= 8

    wait_until(check, timeout, interval=0.0, what=what)


def backends_seen(gw, path: str, n: int, headers=None) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(n):
        v = served_by(gw, path, headers)
        seen[v] = seen.get(v, 0) + 1
    return seen


def base_objects(api: ApiServer, b1, b2=None):
    api.put(ingress_class())
    api.put(service("web"))
    api.put(endpoint_slice("web-1", "web", b1.port))
    if b2 is not None:
        api.put(service("other"))
        api.put(endpoint_slice("other-1", "other", b2.port))


# --------------------------------------------------------------------------- tests

def test_ingress_and_endpointslice_changes_route_within_a_second(procs, tmp_path, api):
    b1, b2 = procs.backends("b1", "b2")
    base_objects(api, b1)
    api.put(ingress("app", [("/app", "web")]))
    gw = cluster_gateway(procs, tmp_path, api)
    assert served_by(gw, "/app/x") == b1.served_by
    assert served_by(gw, "/nothing") == "status 404"

    # A second EndpointSlice of the Service: both backends get traffic.
    api.put(endpoint_slice("web-2", "web", b2.port))
    wait_route(gw, "/app/x", b2.served_by, "the new endpoint in rotation")
    seen = backends_seen(gw, "/app/x", 20)
    assert set(seen) == {b1.served_by, b2.served_by}, seen

    # Deleting the first slice takes b1 out.
    api.delete("EndpointSlice", "default", "web-1")
    wait_only(gw, "/app/x", {b2.served_by}, "b1 out of rotation")
    assert set(backends_seen(gw, "/app/x", 10)) == {b2.served_by}

    # An endpoint that is not ready gets no traffic.
    api.put(endpoint_slice("web-1", "web", b1.port, ready=False))
    time.sleep(0.3)
    assert set(backends_seen(gw, "/app/x", 10)) == {b2.served_by}

    # A new Ingress, a changed Ingress, a deleted Ingress.
    api.put(ingress("shop", [("/shop", "web")]))
    wait_route(gw, "/shop/cart", b2.served_by, "the new Ingress served")
    api.put(ingress("app", [("/v2", "web")]))
    wait_route(gw, "/v2/x", b2.served_by, "the changed path served")
    wait_route(gw, "/app/x", "status 404", "the old path gone")
    api.delete("Ingress", "default", "app")
    wait_route(gw, "/v2/x", "status 404", "the deleted Ingress gone")
    assert served_by(gw, "/shop/cart") == b2.served_by

    # An Ingress of another class is not Portico's.
    api.put(ingress("theirs", [("/theirs", "web")], cls="nginx"))
    time.sleep(0.5)
    assert served_by(gw, "/theirs") == "status 404"


def test_outage_keeps_routing_and_a_fresh_history_resyncs(procs, tmp_path, api):
    b1, b2 = procs.backends("b1", "b2")
    base_objects(api, b1, b2)
    api.put(ingress("app", [("/app", "web")]))
    gw = cluster_gateway(procs, tmp_path, api)
    assert served_by(gw, "/app/x") == b1.served_by

    api.stop()
    # Routing stays as it was for as long as the API server is away.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert served_by(gw, "/app/x") == b1.served_by
        time.sleep(0.1)
    assert gw.admin("GET", "/readyz").status == 200
    # The cluster changes while the gateway cannot see it...
    api.delete("Ingress", "default", "app")
    api.put(ingress("other", [("/other", "other")]))
    assert served_by(gw, "/app/x") == b1.served_by
    # ... and comes back with a new history: the old resourceVersion is Gone, the
    # watchers re-list, and the deletion made during the outage is noticed.
    gone_before = api.gone_sent
    api.restart(fresh_history=True)
    wait_route(gw, "/other/x", b2.served_by, "the Ingress added during the outage", timeout=15)
    wait_route(gw, "/app/x", "status 404", "the Ingress deleted during the outage", timeout=5)
    assert api.gone_sent > gone_before, "the watchers never saw 410 Gone"
    # Each watcher reconnects on its own backoff; once all are back, that is logged once.
    wait_until(lambda: "API server reachable again" in gw.log_tail(400), 15,
               what="the reconnection logged")
    log = gw.log_tail(400)
    assert log.count("API server unreachable") == 1, log
    assert log.count("API server reachable again") == 1, log

    # Compaction while connected: open watches get 410 and re-list, routing follows.
    api.compact(expire_watches=True)
    api.put(ingress("app", [("/app", "web")]))
    wait_route(gw, "/app/x", b1.served_by, "an Ingress added after compaction", timeout=5)
    assert served_by(gw, "/other/x") == b2.served_by


def test_ingress_status_gets_the_configured_address(procs, tmp_path, api):
    b1 = procs.backend("b1")
    base_objects(api, b1)
    api.put(ingress("app", [("/app", "web")]))
    api.put(ingress("theirs", [("/theirs", "web")], cls="nginx"))
    cluster_gateway(procs, tmp_path, api, status_address="203.0.113.7")

    def lb(name):
        o = api.get("Ingress", "default", name) or {}
        return ((o.get("status") or {}).get("loadBalancer") or {}).get("ingress")

    wait_until(lambda: lb("app") == [{"ip": "203.0.113.7"}], 5, what="status of Ingress app")
    # A hostname address, on a second gateway with the same cluster, replaces it.
    assert lb("theirs") is None, "an Ingress of another class got Portico's address"
    patches = [p for p in api.status_patches if p[2] == "app"]
    assert len(patches) == 1, patches
    # Other changes do not re-send an unchanged status.
    api.put(endpoint_slice("web-2", "web", b1.port))
    api.put(ingress("app", [("/app", "web"), ("/more", "web")]))
    time.sleep(1.0)
    assert len([p for p in api.status_patches if p[2] == "app"]) == 1, api.status_patches
    # A status someone else changed is put back.
    api.store.patch_status("ingresses", "default", "app",
                           {"status": {"loadBalancer": {"ingress": [{"hostname": "elsewhere"}]}}})
    wait_until(lambda: lb("app") == [{"ip": "203.0.113.7"}], 5, what="status restored")
    for method, path in api.requests:
        if method == "PATCH":
            assert path.startswith("/apis/networking.k8s.io/v1/namespaces/default/ingresses/app/status"), path


def test_readyz_waits_for_the_first_full_sync(procs, tmp_path, api):
    b1 = procs.backend("b1")
    base_objects(api, b1)
    api.put(ingress("app", [("/app", "web")]))
    api.fail_with = 503  # the API server answers, but not with lists
    gw = cluster_gateway(procs, tmp_path, api, start=False)
    gw.start(wait=False)
    wait_until(lambda: gw.admin("GET", "/healthz").status == 200, 20, what="admin up")
    for _ in range(10):
        assert gw.admin("GET", "/readyz").status == 503
        time.sleep(0.1)
    api.fail_with = 0
    wait_http_ok(gw.admin_port, "/readyz", 15, gw.m)
    assert served_by(gw, "/app/x") == b1.served_by


def test_missing_gateway_api_crds_do_not_stop_ingress(procs, tmp_path):
    api = ApiServer(gateway_api=False).start()
    try:
        b1 = procs.backend("b1")
        base_objects(api, b1)
        api.put(ingress("app", [("/app", "web")]))
        gw = cluster_gateway(procs, tmp_path, api)
        assert served_by(gw, "/app/x") == b1.served_by
        api.put(ingress("more", [("/more", "web")]))
        wait_route(gw, "/more", b1.served_by, "an Ingress added later")
        assert any("/apis/gateway.networking.k8s.io/v1/httproutes" in p for _, p in api.requests)
        assert "does not serve HTTPRoute" in gw.log_tail(200)
    finally:
        api.stop()


def test_listed_namespaces_only(procs, tmp_path, api):
    b1 = procs.backend("b1")
    api.put(ingress_class())
    for ns in ("team-a", "team-b"):
        api.put(service("web", ns))
        api.put(endpoint_slice("web-1", "web", b1.port, ns=ns))
    api.put(ingress("a", [("/a", "web")], ns="team-a"))
    api.put(ingress("b", [("/b", "web")], ns="team-b"))
    gw = cluster_gateway(procs, tmp_path, api, namespaces=["team-a"])
    assert served_by(gw, "/a") == b1.served_by
    assert served_by(gw, "/b") == "status 404"
    namespaced = [p for m, p in api.requests if "/ingresses" in p]
    assert namespaced and all("/namespaces/team-a/ingresses" in p for p in namespaced), namespaced


def test_httproute_weighted_split_and_header_match(procs, tmp_path, api):
    b1, b2, b3 = procs.backends("b1", "b2", "b3")
    api.put({"kind": "GatewayClass", "metadata": {"name": CLASS}, "spec": {"controllerName": CONTROLLER}})
    api.put({"kind": "Gateway", "metadata": {"name": "edge", "namespace": "default"},
             "spec": {"gatewayClassName": CLASS,
                      "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}})
    for svc, b in (("v1", b1), ("v2", b2), ("canary", b3)):
        api.put(service(svc))
        api.put(endpoint_slice(f"{svc}-1", svc, b.port))
    api.put({"kind": "HTTPRoute", "metadata": {"name": "split", "namespace": "default"},
             "spec": {"parentRefs": [{"name": "edge"}],
                      "rules": [
                          {"matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                                        "headers": [{"name": "x-canary", "value": "yes"}]}],
                           "backendRefs": [{"name": "canary", "port": 80}]},
                          {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                           "backendRefs": [{"name": "v1", "port": 80, "weight": 3},
                                           {"name": "v2", "port": 80, "weight": 1}]}]}})
    gw = cluster_gateway(procs, tmp_path, api)
    wait_route(gw, "/api/x", lambda v: v in (b1.served_by, b2.served_by), "the HTTPRoute served",
               timeout=5)
    assert set(backends_seen(gw, "/api/x", 20, headers={"x-canary": "yes"})) == {b3.served_by}
    seen = backends_seen(gw, "/api/x", 400)
    assert set(seen) == {b1.served_by, b2.served_by}, seen
    share = seen[b1.served_by] / 400
    assert 0.65 <= share <= 0.85, f"v1 share {share:.2f}, want 0.75 ({seen})"
    # Changing the weights through the API reaches routing.
    route = api.get("HTTPRoute", "default", "split")
    route["spec"]["rules"][1]["backendRefs"][0]["weight"] = 0
    api.put(route)
    wait_only(gw, "/api/x", {b2.served_by}, "v1 weighted out")
    assert set(backends_seen(gw, "/api/x", 20)) == {b2.served_by}


def test_credentials_from_the_environment_or_exit_2(procs, tmp_path, api):
    b1 = procs.backend("b1")
    base_objects(api, b1)
    api.put(ingress("app", [("/app", "web")]))
    kubeconfig = tmp_path / "from-env"
    kubeconfig.write_text(api.kubeconfig())
    # No `kubeconfig:` key: KUBECONFIG names the file.
    gw = procs.gateway({"kubernetes": {"ingress_class": CLASS}}, start=False,
                       env={"KUBECONFIG": str(kubeconfig)})
    gw.start()
    assert served_by(gw, "/app/x") == b1.served_by
    # No credentials at all (no KUBECONFIG file, no ~/.kube/config, not in a pod):
    # a runtime failure at start, with the reason.
    home = tmp_path / "home"
    home.mkdir()
    bad = procs.gateway({"kubernetes": {"ingress_class": CLASS}}, name="nocreds", start=False,
                        env={"KUBECONFIG": str(tmp_path / "missing"), "HOME": str(home)})
    bad.start(wait=False)
    assert bad.wait_exit(20) == 2, bad.log_tail()
    assert "no Kubernetes credentials" in bad.log_tail(), bad.log_tail()


def test_kubernetes_settings_are_validated(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text('listeners: [{name: w, bind: "127.0.0.1:1"}]\n'
                   "kubernetes:\n"
                   '  status_address: "not an address!"\n'
                   f"  kubeconfig: {tmp_path / 'missing'}\n")
    r = run_cli(["check", "-c", cfg])
    assert r.returncode == 1, r
    out = r.stdout + r.stderr
    assert f"{cfg}:3:19: `not an address!` is neither an IP address nor a hostname" in out, out
    assert f"{cfg}:4:15: cannot read" in out, out
    good = tmp_path / "good.yaml"
    (tmp_path / "kc").write_text("{}")
    good.write_text('listeners: [{name: w, bind: "127.0.0.1:1"}]\n'
                    f"kubernetes: {{status_address: lb.example.com, kubeconfig: {tmp_path / 'kc'}}}\n")
    r = run_cli(["check", "-c", good])
    assert r.returncode == 0, r.stdout + r.stderr


def test_tls_secrets_through_the_watch(procs, tmp_path, api):
    from test_edge_tls import PKI
    from test_k8s_manifests import _tls_get, _tls_secret

    pki = PKI(tmp_path / "pki")
    first = pki.leaf("one", "one.k8s.test", ["DNS:one.k8s.test"], 0x3001)
    second = pki.leaf("one-b", "one.k8s.test", ["DNS:one.k8s.test", "DNS:alt.k8s.test"], 0x3002)
    b1 = procs.backend("b1")
    base_objects(api, b1)
    api.put({"kind": "Secret", "metadata": {"name": "opaque", "namespace": "default"},
             "type": "Opaque", "data": {"password": "c2VjcmV0"}})
    tls_port = free_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    gw = procs.gateway({"listeners": [{"name": "web", "bind": f"127.0.0.1:{free_port()}"},
                                      {"name": "tls", "bind": f"127.0.0.1:{tls_port}", "tls": {}}],
                        "kubernetes": {"ingress_class": CLASS, "kubeconfig": str(kubeconfig)}})
    tls_ingress = ingress("secure", [("/", "web")], host="one.k8s.test")
    tls_ingress["spec"]["tls"] = [{"hosts": ["one.k8s.test"], "secretName": "one-tls"}]
    api.put(tls_ingress)
    # The Secret arrives after the Ingress: the watch brings it, SNI serves it.
    api.put(_tls_secret("default", "one-tls", first))

    def sans():
        return _tls_get(tls_port, pki.ca_crt, "one.k8s.test")[0]

    wait_until(lambda: sans() == ["one.k8s.test"], 5, what="the Secret's certificate served")
    _, body = _tls_get(tls_port, pki.ca_crt, "one.k8s.test")
    assert f"x-served-by: {b1.served_by}" in body.lower(), body[:400]
    # A rotated Secret (MODIFIED) is served without a restart.
    api.put(_tls_secret("default", "one-tls", second))
    wait_until(lambda: sans() == ["one.k8s.test", "alt.k8s.test"], 5, what="the rotated certificate")
    # Only kubernetes.io/tls Secrets are asked for.
    secret_calls = [p for _, p in api.requests if "/secrets" in p]
    assert secret_calls and all("fieldSelector=type%3Dkubernetes.io%2Ftls" in p for p in secret_calls), \
        secret_calls
