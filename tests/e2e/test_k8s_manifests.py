"""Kubernetes ingress translation, end to end, in manifest mode (`portico ingress -c FILE
--manifests DIR`): Ingress, IngressClass, Service, EndpointSlice and TLS Secret manifests
(and Gateway API Gateway + HTTPRoute) written to a folder; the EndpointSlices carry the
addresses of real demo backends; every rule is checked with real requests (and real TLS
handshakes for SNI), and a manifest change on disk changes routing."""

import json
import ssl
import socket
import time
import base64
from pathlib import Path

import pytest

from conftest import Gateway, Managed, PORTICO_BIN, atomic_write, free_port, run_cli, wait_http_ok, to_yaml
from test_edge_tls import PKI

WAIT = 20.0


class IngressGateway(Gateway):
    """`portico ingress -c FILE --manifests DIR`."""

    def __init__(self, procs, config, manifests: Path, name="ingress"):
        self.manifests = manifests
        super().__init__(procs, config, name=name)

    def start(self, wait=True, timeout=30.0):
        self.m = Managed(f"gateway {self.name}",
                         [PORTICO_BIN, "-v", "ingress", "-c", self.config_path, "--manifests", self.manifests],
                         self.log_path)
        self.procs.track(self.m)
        self.m.start()
        if wait:
            wait_http_ok(self.admin_port, "/readyz", timeout, self.m)
        return self


# --------------------------------------------------------------------------- manifests

def meta(ns, name, created="2024-01-01T00:00:00Z", annotations=None, labels=None):
    m = {"name": name, "creationTimestamp": created}
    if ns:
        m["namespace"] = ns
    if annotations:
        m["annotations"] = annotations
    if labels:
        m["labels"] = labels
    return m


def ingress_class(name="portico", default=False):
    ann = {"ingressclass.kubernetes.io/is-default-class": "true"} if default else None
    return {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": meta("", name, annotations=ann),
            "spec": {"controller": "portico.io/ingress-controller"}}


def service(ns, name, ports):
    """ports: [(name, port)]"""
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(ns, name),
            "spec": {"ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports]}}


def endpoint_slice(ns, svc, backends, port_name="http", slice_name=None, ready=True):
    """An EndpointSlice of Service `svc` whose endpoints are demo backends (127.0.0.1:PORT).
    Each backend listens on its own port, so each gets its own slice (a slice has one port list)."""
    docs = []
    for i, b in enumerate(backends):
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": meta(ns, f"{slice_name or svc}-{i}", labels={"kubernetes.io/service-name": svc}),
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": b.port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}],
        })
    return docs


def backend_objects(ns, name, backends, port=80, port_name="http"):
    return [service(ns, name, [(port_name, port)])] + endpoint_slice(ns, name, backends, port_name)


def path(p, svc, port=80, kind="Prefix"):
    port_ref = {"number": port} if isinstance(port, int) else {"name": port}
    return {"path": p, "pathType": kind, "backend": {"service": {"name": svc, "port": port_ref}}}


def ingress(ns, name, rules=(), created="2024-01-01T00:00:00Z", annotations=None, cls="portico",
            default_backend=None, tls=None):
    spec = {"rules": [{"host": h, "http": {"paths": ps}} if h else {"http": {"paths": ps}} for h, ps in rules]}
    if cls:
        spec["ingressClassName"] = cls
    if default_backend:
        spec["defaultBackend"] = {"service": {"name": default_backend[0], "port": {"number": default_backend[1]}}}
    if tls:
        spec["tls"] = [{"hosts": hosts, "secretName": secret} for hosts, secret in tls]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": meta(ns, name, created, annotations), "spec": spec}


def write_list(dir_: Path, file: str, items):
    atomic_write(dir_ / file, json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)}, indent=1))


def served_by(r):
    return (r.header("x-served-by") or "").split(":")[0]


def start(procs, tmp_path, objects, extra_cfg=None, yaml_docs=False):
    mdir = tmp_path / "manifests"
    mdir.mkdir(exist_ok=True)
    if yaml_docs:
        atomic_write(mdir / "all.yaml", "---\n".join(to_yaml(o) for o in objects))
    else:
        write_list(mdir, "all.json", objects)
    cfg = {"kubernetes": {"ingress_class": "portico"}}
    cfg.update(extra_cfg or {})
    gw = IngressGateway(procs, cfg, mdir)
    return gw.start(), mdir


def get(gw, host, p, headers=None):
    h = {"host": host}
    h.update(headers or {})
    return gw.get(p, headers=h)


# --------------------------------------------------------------------------- tests

def test_simple_fanout_and_exact_vs_prefix(procs, tmp_path):
    foo, bar, exact = procs.backends("foo", "bar", "exact")
    objs = [ingress_class()] + backend_objects("shop", "foo", [foo]) + backend_objects("shop", "bar", [bar]) \
        + backend_objects("shop", "exact", [exact], port=8080, port_name="web")
    objs.append(ingress("shop", "fanout", [("shop.k8s.test", [
        path("/foo", "foo"), path("/bar", "bar"),
        path("/foo/special", "exact", port="web", kind="Exact")])]))
    gw, _ = start(procs, tmp_path, objs, yaml_docs=True)
    assert served_by(get(gw, "shop.k8s.test", "/foo")) == "foo"
    assert served_by(get(gw, "shop.k8s.test", "/foo/x/y")) == "foo"
    assert served_by(get(gw, "shop.k8s.test", "/bar/1")) == "bar"
    # Prefix is segment-wise
    assert get(gw, "shop.k8s.test", "/foobar").status == 404
    # Exact beats the shorter Prefix, but only for the exact path
    assert served_by(get(gw, "shop.k8s.test", "/foo/special")) == "exact"
    assert served_by(get(gw, "shop.k8s.test", "/foo/special/more")) == "foo"
    # another host: no route
    assert get(gw, "other.k8s.test", "/foo").status == 404
    # the admin API shows the generated config and routes, with readable names
    cfg = gw.admin_json("/config")
    text = json.dumps(cfg)
    assert "ingress/shop/fanout/rule-0/path-0" in text and "svc/shop/foo:80" in text, text[:2000]
    assert f"127.0.0.1:{foo.port}" in text
    routes = json.dumps(gw.admin_json("/routes"))
    assert "ingress/shop/fanout/rule-0/path-2" in routes


def test_name_based_virtual_hosting_and_wildcards(procs, tmp_path):
    a, b, w = procs.backends("alpha", "beta", "wild")
    objs = [ingress_class()] + backend_objects("web", "alpha", [a]) + backend_objects("web", "beta", [b]) \
        + backend_objects("web", "wild", [w])
    objs.append(ingress("web", "vhosts", [("alpha.k8s.test", [path("/", "alpha")]),
                                          ("beta.k8s.test", [path("/", "beta")]),
                                          ("*.k8s.test", [path("/", "wild")])]))
    gw, _ = start(procs, tmp_path, objs)
    assert served_by(get(gw, "alpha.k8s.test", "/x")) == "alpha"
    assert served_by(get(gw, "beta.k8s.test", "/x")) == "beta"
    # exact hosts win over the wildcard; other names under it go to the wildcard
    assert served_by(get(gw, "gamma.k8s.test", "/x")) == "wild"
    assert served_by(get(gw, "alpha.k8s.test:8080", "/")) == "alpha"
    assert get(gw, "k8s.test", "/").status == 404
    # an Ingress wildcard covers exactly one label (unlike a file route's `*.` host)
    assert served_by(get(gw, "GAMMA.k8s.test.", "/x")) == "wild"
    assert get(gw, "a.b.k8s.test", "/x").status == 404
    assert get(gw, ".k8s.test", "/x").status == 404


def test_default_backend_class_selection_and_conflicts(procs, tmp_path):
    main, fallback, late, other = procs.backends("main", "fallback", "late", "other")
    objs = [ingress_class(default=True)] + backend_objects("a", "main", [main]) \
        + backend_objects("a", "fallback", [fallback]) + backend_objects("b", "late", [late]) \
        + backend_objects("a", "other", [other])
    objs.append(ingress("a", "main", [("app.k8s.test", [path("/api", "main")])], default_backend=("fallback", 80)))
    # same host+path, created later: loses
    objs.append(ingress("b", "late", [("app.k8s.test", [path("/api", "late"), path("/late", "late")])],
                        created="2024-06-01T00:00:00Z"))
    # no class name: the default IngressClass is Portico's, so this one is ours
    objs.append(ingress("a", "classless", [("classless.k8s.test", [path("/", "main")])], cls=None))
    # another controller's class: ignored
    objs.append(ingress("a", "nginx", [("nginx.k8s.test", [path("/", "other")])], cls="nginx"))
    # legacy annotation naming another class: ignored
    objs.append(ingress("a", "legacy", [("legacy.k8s.test", [path("/", "other")])], cls=None,
                        annotations={"kubernetes.io/ingress.class": "nginx"}))
    gw, _ = start(procs, tmp_path, objs)
    assert served_by(get(gw, "app.k8s.test", "/api/1")) == "main"          # oldest wins
    assert served_by(get(gw, "app.k8s.test", "/late")) == "late"           # the rest of the loser is served
    assert served_by(get(gw, "app.k8s.test", "/nothing")) == "fallback"    # default backend
    assert served_by(get(gw, "unknown.k8s.test", "/")) == "fallback"
    assert served_by(get(gw, "classless.k8s.test", "/")) == "main"
    assert served_by(get(gw, "nginx.k8s.test", "/")) == "fallback"        # not ours -> default backend
    assert served_by(get(gw, "legacy.k8s.test", "/")) == "fallback"
    log = gw.log_tail(400)
    assert "Ingress b/late left out: path /api on host app.k8s.test is already served by Ingress a/main" in log, log


def test_annotations_and_a_bad_annotation(procs, tmp_path):
    api, good = procs.backends("api", "good")
    objs = [ingress_class()] + backend_objects("n", "api", [api]) + backend_objects("n", "good", [good])
    objs.append(ingress("n", "limited", [("lim.k8s.test", [path("/v1", "api")])], annotations={
        "portico.io/rate-limit": "{requests: 3, per: 1m, burst: 3}",
        "portico.io/rewrite-target": "/users",  # /v1/7 -> /users/7 (the demo backend answers a user)
        "portico.io/timeout": "5s"}))
    objs.append(ingress("n", "broken", [("broken.k8s.test", [path("/", "api")])], annotations={
        "portico.io/rate-limit": "{requests: lots}"}))
    objs.append(ingress("n", "typo", [("typo.k8s.test", [path("/", "api")])], annotations={
        "portico.io/rate-limt": "{requests: 1, per: 1s}"}))
    objs.append(ingress("n", "fine", [("fine.k8s.test", [path("/", "good")])]))
    gw, _ = start(procs, tmp_path, objs)
    r = get(gw, "lim.k8s.test", "/v1/7")
    assert r.status == 200 and served_by(r) == "api", r
    assert r.json()["id"] == "7" and r.json()["name"] == "user-7", r.json()
    statuses = [get(gw, "lim.k8s.test", "/v1/7").status for _ in range(5)]
    assert statuses.count(429) >= 3, statuses
    # the bad annotations leave only their Ingresses out
    assert get(gw, "broken.k8s.test", "/").status == 404
    assert get(gw, "typo.k8s.test", "/").status == 404
    assert served_by(get(gw, "fine.k8s.test", "/")) == "good"
    log = gw.log_tail(400)
    assert "Ingress n/broken left out: annotation portico.io/rate-limit" in log, log
    assert "Ingress n/typo left out: unknown annotation portico.io/rate-limt" in log, log


def _tls_secret(ns, name, crt_key):
    crt, key = crt_key
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": meta(ns, name),
            "data": {"tls.crt": base64.b64encode(Path(crt).read_bytes()).decode(),
                     "tls.key": base64.b64encode(Path(key).read_bytes()).decode()}}


def _tls_get(port, ca, sni, p="/"):
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=sni) as t:
            cert = t.getpeercert()
            t.sendall(f"GET {p} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = t.recv(65536)
                if not chunk:
                    break
                data += chunk
    sans = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    return sans, data.decode("utf-8", "replace")


def test_tls_with_two_secrets(procs, tmp_path):
    pki = PKI(tmp_path / "pki")
    one = pki.leaf("one", "one.k8s.test", ["DNS:one.k8s.test"], 0x2001)
    two = pki.leaf("two", "two.k8s.test", ["DNS:two.k8s.test"], 0x2002)
    a, b = procs.backends("one", "two")
    objs = [ingress_class(), _tls_secret("t", "one-tls", one), _tls_secret("t", "two-tls", two)] \
        + backend_objects("t", "one", [a]) + backend_objects("t", "two", [b])
    objs.append(ingress("t", "one", [("one.k8s.test", [path("/", "one")])], tls=[(["one.k8s.test"], "one-tls")]))
    objs.append(ingress("t", "two", [("two.k8s.test", [path("/", "two")])], tls=[(["two.k8s.test"], "two-tls")]))
    tls_port = free_port()
    gw, _ = start(procs, tmp_path, objs, extra_cfg={"listeners": [
        {"name": "web", "bind": f"127.0.0.1:{free_port()}"},
        {"name": "tls", "bind": f"127.0.0.1:{tls_port}", "tls": {}}]})
    deadline = time.monotonic() + WAIT
    while True:
        try:
            sans1, body1 = _tls_get(tls_port, pki.ca_crt, "one.k8s.test")
            break
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert sans1 == ["one.k8s.test"] and "x-served-by: one:" in body1.lower(), body1[:500]
    sans2, body2 = _tls_get(tls_port, pki.ca_crt, "two.k8s.test")
    assert sans2 == ["two.k8s.test"] and "x-served-by: two:" in body2.lower(), body2[:500]


def _gateway_api(ns, v1, v2):
    return [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": meta("", "portico"),
         "spec": {"controllerName": "portico.io/ingress-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta(ns, "gw"),
         "spec": {"gatewayClassName": "portico", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta(ns, "store"),
         "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["store.k8s.test"], "rules": [
             {"matches": [{"path": {"type": "PathPrefix", "value": "/"},
                           "headers": [{"name": "x-version", "value": "v2"}]}],
              "filters": [{"type": "RequestHeaderModifier",
                           "requestHeaderModifier": {"set": [{"name": "x-routed", "value": "header-match"}]}}],
              "backendRefs": [{"name": "v2", "port": 80}]},
             {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
              "filters": [{"type": "RequestRedirect",
                           "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"},
                                               "statusCode": 301}}]},
             {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
              "filters": [{"type": "URLRewrite",
                           "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v"}}}],
              "backendRefs": [{"name": "v1", "port": 80, "weight": 3}, {"name": "v2", "port": 80, "weight": 1}]},
             {"backendRefs": [{"name": "v1", "port": 80, "weight": 3}, {"name": "v2", "port": 80, "weight": 1}]},
         ]}},
    ] + backend_objects(ns, "v1", [v1]) + backend_objects(ns, "v2", [v2])


def test_httproute_weighted_split_and_header_match(procs, tmp_path):
    v1, v2 = procs.backends("v1", "v2")
    gw, _ = start(procs, tmp_path, _gateway_api("gw", v1, v2))
    # header match: always v2, with the request header set
    for _ in range(10):
        r = get(gw, "store.k8s.test", "/items", {"x-version": "v2"})
        assert served_by(r) == "v2", r
    assert r.json()["headers"].get("x-routed") == "header-match", r.json()
    # weighted 3:1 split
    n = 400
    counts = {"v1": 0, "v2": 0}
    for _ in range(n):
        counts[served_by(get(gw, "store.k8s.test", "/items"))] += 1
    share = counts["v1"] / n
    assert 0.65 <= share <= 0.85, counts
    # URLRewrite ReplacePrefixMatch
    r = get(gw, "store.k8s.test", "/api/items/3")
    assert r.json()["path"] == "/v/items/3", r.json()
    # RequestRedirect
    r = get(gw, "store.k8s.test", "/old/x")
    assert r.status == 301 and r.header("location") == "/new", r
    # hostnames: other hosts are not routed
    assert get(gw, "elsewhere.k8s.test", "/items").status == 404


def test_manifest_change_on_disk_changes_routing(procs, tmp_path):
    a, b = procs.backends("blue", "green")
    base = [ingress_class()] + backend_objects("d", "blue", [a]) + backend_objects("d", "green", [b])
    objs = base + [ingress("d", "app", [("app.k8s.test", [path("/", "blue")])])]
    gw, mdir = start(procs, tmp_path, objs)
    assert served_by(get(gw, "app.k8s.test", "/")) == "blue"
    # switch the Ingress to green, on disk
    write_list(mdir, "all.json", base + [ingress("d", "app", [("app.k8s.test", [path("/", "green")])])])
    deadline = time.monotonic() + WAIT
    while served_by(get(gw, "app.k8s.test", "/")) != "green":
        assert time.monotonic() < deadline, gw.log_tail()
        time.sleep(0.05)
    # an EndpointSlice change: green's endpoint becomes not ready -> 503 no_endpoints
    slices = endpoint_slice("d", "green", [b], ready=False)
    write_list(mdir, "all.json", [ingress_class()] + backend_objects("d", "blue", [a])
               + [service("d", "green", [("http", 80)])] + slices
               + [ingress("d", "app", [("app.k8s.test", [path("/", "green")])])])
    deadline = time.monotonic() + WAIT
    while get(gw, "app.k8s.test", "/").status != 503:
        assert time.monotonic() < deadline, gw.log_tail()
        time.sleep(0.05)
    r = get(gw, "app.k8s.test", "/")
    assert r.json()["error"] == "no_endpoints", r
    # a broken file is reported and skipped; the rest still applies
    atomic_write(mdir / "zz-broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: nope}]}\n")
    write_list(mdir, "all.json", objs)
    deadline = time.monotonic() + WAIT
    while served_by(get(gw, "app.k8s.test", "/")) != "blue":
        assert time.monotonic() < deadline, gw.log_tail()
        time.sleep(0.05)
    assert "zz-broken.yaml" in gw.log_tail(400)


def test_ingress_help_and_bad_folder(tmp_path):
    r = run_cli(["ingress", "--help"])
    assert r.returncode == 0 and "--manifests" in r.stdout, r
    cfg = tmp_path / "p.yaml"
    cfg.write_text("listeners: [{name: web, bind: '127.0.0.1:0'}]\nadmin: {bind: '127.0.0.1:0'}\n")
    r = run_cli(["ingress", "-c", cfg, "--manifests", tmp_path / "missing"], timeout=30)
    # a missing folder is invalid input: exit 1, and the message names the folder
    assert r.returncode == 1 and "missing: no such folder" in r.stderr, r
    afile = tmp_path / "afile.yaml"
    afile.write_text("{}\n")
    r = run_cli(["ingress", "-c", cfg, "--manifests", afile], timeout=30)
    assert r.returncode == 1 and "afile.yaml: not a folder" in r.stderr, r
