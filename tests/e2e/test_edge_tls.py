"""TLS at the edge, end to end with real clients (openssl s_client, curl, Python ssl).

* SNI: exact name, then `*.wildcard`, else the first certificate; checked with
  `openssl s_client -servername` and `curl --resolve ... --cacert`.
* Protocol floor and ciphers: TLS 1.1 and CBC/SHA-1 suites are refused by the server (it
  answers with an alert), `min_version: "1.3"` refuses TLS 1.2.
* HSTS on every answer of a TLS listener (never on plain ones); `redirect_https` answers
  308 to `https://HOST:PORT/path?query`.
* Hot certificate swap under a steady loop of new handshakes: the new certificate is
  served within 2 s, a broken key or certificate is refused (log line, old one kept),
  and no request fails.
* mTLS: `client_auth: required` refuses clients without a certificate; the verified
  subject reaches the upstream in `x-client-cert-subject`; a forged copy of that header
  never does.
* Upstream TLS: CA verification, SNI, `verify: false`, client certificate.

Certificates are generated at run time with the openssl CLI (see `PKI`); the other edge
test files import `PKI` from here.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import atomic_write, free_port, http_request, wait_until

OPENSSL_TIMEOUT = 20
CURL_TIMEOUT = 20


# --------------------------------------------------------------------------- certificates

def _openssl(*args, cwd=None) -> str:
    r = subprocess.run(["openssl", *[str(a) for a in args]], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr}")
    return r.stdout


class PKI:
    """A throw-away CA (ECDSA P-256) in a folder, and leaf certificates signed by it.

    `leaf()` takes an explicit serial so tests can tell certificates apart."""

    def __init__(self, directory: Path, ca_name: str = "ca", ca_cn: str = "Portico Test CA"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_crt, self.ca_key = self.make_ca(ca_name, ca_cn)

    def make_ca(self, name: str, cn: str):
        key, crt = self.dir / f"{name}.key", self.dir / f"{name}.crt"
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        _openssl("req", "-x509", "-new", "-key", key, "-sha256", "-days", "30", "-subj", f"/CN={cn}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", crt)
        return crt, key

    def leaf(self, name: str, cn: str, sans: list[str], serial: int, org: str = "Portico Test",
             eku: str = "serverAuth", out_dir: Path | None = None, ca=None):
        """Writes NAME.crt / NAME.key (into `out_dir`, default the PKI folder); returns (crt, key)."""
        ca_crt, ca_key = ca or (self.ca_crt, self.ca_key)
        out = Path(out_dir or self.dir)
        out.mkdir(parents=True, exist_ok=True)
        key, crt = out / f"{name}.key", out / f"{name}.crt"
        work = self.dir / f".work-{name}-{serial}"
        work.mkdir(exist_ok=True)
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", work / "k.pem")
        subj = f"/CN={cn}" + (f"/O={org}" if org else "")
        _openssl("req", "-new", "-key", work / "k.pem", "-subj", subj, "-out", work / "r.csr")
        (work / "ext").write_text(f"subjectAltName={','.join(sans)}\nextendedKeyUsage={eku}\n"
                                  "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", work / "r.csr", "-CA", ca_crt, "-CAkey", ca_key,
                 "-set_serial", str(serial), "-days", "30", "-sha256", "-extfile", work / "ext",
                 "-out", work / "c.pem")
        # write through temp + rename so a watcher never sees a half-written file
        os.replace(work / "k.pem", key)
        os.replace(work / "c.pem", crt)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        return crt, key

    def standard(self):
        """The usual set: localhost (default), a.portico.test (exact), *.portico.test, a client."""
        self.localhost = self.leaf("localhost", "localhost", ["DNS:localhost", "IP:127.0.0.1"], 0x1001)
        self.exact = self.leaf("exact", "a.portico.test", ["DNS:a.portico.test"], 0x1002)
        self.wildcard = self.leaf("wildcard", "*.portico.test", ["DNS:*.portico.test"], 0x1003)
        self.client = self.leaf("client", "portico-dev-client", ["DNS:portico-dev-client"], 0x1004,
                                eku="clientAuth")
        return self


def cert_pair(crt_key) -> dict:
    return {"cert": str(crt_key[0]), "key": str(crt_key[1])}


def cert_info(pem: str) -> dict:
    """subject / serial / SAN of a PEM certificate, via `openssl x509`."""
    p = subprocess.run(["openssl", "x509", "-noout", "-subject", "-serial", "-ext", "subjectAltName",
                        "-nameopt", "RFC2253"], input=pem, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT)
    out = p.stdout
    m_sub = re.search(r"^subject=(.*)$", out, re.M)
    m_ser = re.search(r"^serial=([0-9A-Fa-f]+)$", out, re.M)
    sans = re.findall(r"DNS:([^,\s]+)", out)
    subject = m_sub.group(1).strip() if m_sub else ""
    m_cn = re.search(r"(?:^|,)CN=((?:\\.|[^,])*)", subject)
    return {"subject": subject, "cn": m_cn.group(1) if m_cn else None,
            "serial": int(m_ser.group(1), 16) if m_ser else None, "sans": sans, "raw": out}


def s_client(port: int, *args, servername: str | None = None) -> tuple[int, str]:
    """`openssl s_client` against 127.0.0.1:PORT; returns (exit code, stdout+stderr)."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
    if servername is None:
        argv.append("-noservername")
    else:
        argv += ["-servername", servername]
    argv += list(args)
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT)
    return p.returncode, p.stdout + p.stderr


def served_cert(port: int, servername: str | None) -> dict:
    rc, out = s_client(port, "-showcerts", servername=servername)
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
    assert m, f"s_client -servername {servername} got no certificate (rc {rc}):\n{out[-2000:]}"
    return cert_info(m.group(0))


def handshake_ok(out: str) -> bool:
    return bool(re.search(r"Cipher is (?!\(NONE\))\S+", out))


def client_hello_sent(out: str) -> bool:
    m = re.search(r"handshake has read (\d+) bytes and written (\d+) bytes", out)
    return bool(m and int(m.group(2)) > 0)


def curl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=CURL_TIMEOUT)


class SNIConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with SNI / verification for `host` (no DNS needed)."""

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def https_get(port: int, name: str, path: str = "/", ctx: ssl.SSLContext | None = None, headers=None,
              timeout: float = 10.0):
    """New TLS connection, one GET; returns (status, headers, body, peer cert dict)."""
    conn = SNIConnection(name, port, context=ctx, timeout=timeout)
    try:
        conn.connect()
        cert = conn.sock.getpeercert()
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), body, cert
    finally:
        conn.close()


def client_ctx(ca: Path, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def wait_tls_port(port: int, timeout: float = 10.0):
    def up():
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    wait_until(up, timeout, what=f"TLS listener 127.0.0.1:{port}")


RESPOND_ALL = [{"name": "hello", "match": {"path_prefix": "/"},
                "respond": {"status": 200, "body": "hello\n", "headers": {"content-type": "text/plain"}}}]


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path / "pki").standard()


# --------------------------------------------------------------------------- 1. SNI, versions, ciphers

@pytest.fixture
def sni_gw(procs, pki):
    tls_port, tls13_port = free_port(), free_port()
    gw = procs.gateway({
        "listeners": [
            {"name": "tls", "bind": f"127.0.0.1:{tls_port}",
             # the default first; the wildcard before the exact name so order cannot decide
             "tls": {"certificates": [cert_pair(pki.localhost), cert_pair(pki.wildcard), cert_pair(pki.exact)]}},
            {"name": "tls13", "bind": f"127.0.0.1:{tls13_port}",
             "tls": {"min_version": "1.3", "certificates": [cert_pair(pki.localhost)]}},
        ],
        "routes": RESPOND_ALL,
    })
    gw.tls_port, gw.tls13_port = tls_port, tls13_port
    return gw


SNI_CASES = [
    # server name, expected subject CN, expected serial
    ("a.portico.test", "a.portico.test", 0x1002),     # exact beats the wildcard
    ("b.portico.test", "*.portico.test", 0x1003),     # wildcard
    ("A.Portico.Test", "a.portico.test", 0x1002),     # names are case-insensitive
    ("localhost", "localhost", 0x1001),               # exact (the default's own name)
    ("x.y.portico.test", "localhost", 0x1001),        # a wildcard covers one label only
    ("portico.test", "localhost", 0x1001),            # nor the bare parent
    ("unknown.example", "localhost", 0x1001),         # no match: the first certificate
    (None, "localhost", 0x1001),                      # no SNI at all: the first certificate
]


def test_sni_selects_certificate_openssl(sni_gw):
    seen = {}
    for name, cn, serial in SNI_CASES:
        info = served_cert(sni_gw.tls_port, name)
        seen[name] = info
        assert info["cn"] == cn, f"SNI {name!r}: expected CN={cn}, got {info['subject']!r}"
        assert info["serial"] == serial, f"SNI {name!r}: expected serial {serial:#x}, got {info['serial']}"
    assert seen["b.portico.test"]["sans"] == ["*.portico.test"]
    assert seen["a.portico.test"]["sans"] == ["a.portico.test"]


def test_sni_selects_certificate_curl(sni_gw, pki):
    port = sni_gw.tls_port
    for name, cn in [("a.portico.test", "a.portico.test"), ("b.portico.test", "*.portico.test"),
                     ("localhost", "localhost")]:
        # --cacert without -k: curl verifies chain and host name, so the right certificate must be served
        r = curl("-v", "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", pki.ca_crt, f"https://{name}:{port}/")
        assert r.returncode == 0, f"curl https://{name}: rc {r.returncode}\n{r.stderr[-2000:]}"
        assert r.stdout == "hello\n", f"curl https://{name}: body {r.stdout!r}"
        m = re.search(r"subject: (.*)", r.stderr)
        assert m and m.group(1).startswith(f"CN={cn}"), f"curl https://{name}: subject line {m and m.group(1)!r}"
    # a name that no certificate covers gets the default one, which curl then refuses to trust
    r = curl("--resolve", f"nobody.example:{port}:127.0.0.1", "--cacert", pki.ca_crt, f"https://nobody.example:{port}/")
    assert r.returncode == 60, f"expected curl to reject the default cert for nobody.example (60), got {r.returncode}: {r.stderr}"
    r = curl("-v", "-k", "--resolve", f"nobody.example:{port}:127.0.0.1", f"https://nobody.example:{port}/")
    assert r.returncode == 0 and "subject: CN=localhost" in r.stderr, r.stderr[-2000:]


def test_old_protocols_and_weak_ciphers_refused(sni_gw):
    port = sni_gw.tls_port
    # TLS 1.1 (client security level lowered so the client really offers it): the server says no
    rc, out = s_client(port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", servername="localhost")
    assert client_hello_sent(out), f"the client did not even try TLS 1.1:\n{out[-1500:]}"
    assert rc != 0 and not handshake_ok(out), f"TLS 1.1 handshake succeeded:\n{out[-1500:]}"
    assert "alert protocol version" in out, f"expected a protocol_version alert from the server:\n{out[-1500:]}"
    rc, out = s_client(port, "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0", servername="localhost")
    assert rc != 0 and not handshake_ok(out), f"TLS 1.0 handshake succeeded:\n{out[-1500:]}"

    # TLS 1.2 with CBC / SHA-1 suites (one usable with the ECDSA certificate, so only policy refuses it)
    for cipher in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA256", "AES128-SHA"):
        rc, out = s_client(port, "-tls1_2", "-cipher", cipher + ":@SECLEVEL=0", servername="localhost")
        assert client_hello_sent(out), f"{cipher}: no ClientHello sent:\n{out[-1500:]}"
        assert rc != 0 and not handshake_ok(out), f"weak cipher {cipher} was accepted:\n{out[-1500:]}"
        assert "alert handshake failure" in out, f"{cipher}: expected a handshake_failure alert:\n{out[-1500:]}"

    # controls: TLS 1.2 with an AEAD suite, and TLS 1.3, work
    rc, out = s_client(port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256", servername="localhost")
    assert rc == 0 and "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in out, out[-1500:]
    rc, out = s_client(port, "-tls1_3", servername="localhost")
    assert rc == 0 and "TLSv1.3" in out and handshake_ok(out), out[-1500:]


def test_min_version_13_refuses_tls12(sni_gw):
    port = sni_gw.tls13_port
    rc, out = s_client(port, "-tls1_2", servername="localhost")
    assert client_hello_sent(out)
    assert rc != 0 and not handshake_ok(out), f"TLS 1.2 accepted on a min_version 1.3 listener:\n{out[-1500:]}"
    assert "alert protocol version" in out, out[-1500:]
    rc, out = s_client(port, "-tls1_3", servername="localhost")
    assert rc == 0 and "New, TLSv1.3" in out, out[-1500:]


# --------------------------------------------------------------------------- HSTS and redirect_https

def test_hsts_and_redirect_https(procs, pki):
    backend = procs.backend("hsts-echo")
    tls_port, redir_port, redir443_port = free_port(), free_port(), free_port()
    procs.gateway({
        "listeners": [
            {"name": "tls", "bind": f"127.0.0.1:{tls_port}", "http2": True,
             "tls": {"certificates": [cert_pair(pki.localhost)],
                     "hsts": {"max_age": "1h", "include_subdomains": True}}},
            {"name": "redir", "bind": f"127.0.0.1:{redir_port}", "redirect_https": {"port": tls_port}},
            {"name": "redir443", "bind": f"127.0.0.1:{redir443_port}", "redirect_https": True},
        ],
        "upstreams": {"echo": {"endpoints": [backend.address]}},
        "routes": [
            {"name": "hello", "match": {"path": "/hello"}, "respond": {"status": 200, "body": "hello\n"}},
            {"name": "echo", "match": {"path_prefix": "/echo"}, "upstream": "echo"},
        ],
    })
    ctx = client_ctx(pki.ca_crt)
    want = "max-age=3600; includeSubDomains"
    # a respond route, a proxied answer, and a gateway-made 404: all carry HSTS over TLS
    for path, status in [("/hello", 200), ("/echo/x", 200), ("/nothing-here", 404)]:
        st, hdrs, body, _ = https_get(tls_port, "localhost", path, ctx)
        assert st == status, f"GET {path} over TLS: {st} {body[:200]!r}"
        assert hdrs.get("strict-transport-security") == want, f"GET {path}: HSTS header {hdrs}"
    # HTTP/2 answers too (curl negotiates h2 through ALPN)
    r = curl("-si", "--http2", "--resolve", f"localhost:{tls_port}:127.0.0.1", "--cacert", pki.ca_crt,
             f"https://localhost:{tls_port}/hello")
    assert r.returncode == 0 and r.stdout.startswith("HTTP/2 200"), r.stdout[:300] + r.stderr
    assert f"strict-transport-security: {want}".lower() in r.stdout.lower(), r.stdout[:500]

    # plain listeners never send HSTS (RFC 6797 7.2) and redirect with 308, keeping path and query
    r = http_request(redir_port, "GET", "/a/b?x=1&y=2", {"Host": "shop.example.com"})
    assert r.status == 308, r
    assert r.header("location") == f"https://shop.example.com:{tls_port}/a/b?x=1&y=2", r
    assert r.header("strict-transport-security") is None, r
    r = http_request(redir_port, "POST", "/form", {"Host": f"shop.example.com:{redir_port}"}, body=b"a=1")
    assert r.status == 308, r   # 308 keeps the method and body on the retry
    assert r.header("location") == f"https://shop.example.com:{tls_port}/form", r
    r = http_request(redir443_port, "GET", "/p?q=1", {"Host": f"Shop.Example.com:{redir443_port}"})
    assert r.status == 308, r
    assert r.header("location") == "https://shop.example.com/p?q=1", r
    # the redirect is never routed or proxied: the backend saw no request for these paths
    # and a real client following it ends up on the TLS listener
    r = curl("-sL", "-o", "-", "-w", "\n%{http_code} %{url_effective}", "--resolve", f"localhost:{tls_port}:127.0.0.1",
             "--resolve", f"localhost:{redir_port}:127.0.0.1", "--cacert", pki.ca_crt,
             f"http://localhost:{redir_port}/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(f"\n200 https://localhost:{tls_port}/hello"), r.stdout
    assert r.stdout.startswith("hello\n"), r.stdout
    stats = http_request(backend.port, "GET", "/_stats").json()
    assert stats["requests"] == 1, f"only /echo/x should have reached the backend: {stats}"


def test_redirect_https_host_edge_cases(procs, pki):
    """The Location of redirect_https must be a valid https URL built from the request's host."""
    tls_port, redir_port = free_port(), free_port()
    procs.gateway({
        "listeners": [
            {"name": "tls", "bind": f"127.0.0.1:{tls_port}", "tls": {"certificates": [cert_pair(pki.localhost)]}},
            {"name": "redir", "bind": f"127.0.0.1:{redir_port}", "redirect_https": {"port": tls_port}},
        ],
        "routes": RESPOND_ALL,
    })
    problems = []
    # an IPv6 literal must keep its brackets: https://[::1]:PORT/
    r = http_request(redir_port, "GET", "/v6", {"Host": f"[::1]:{redir_port}"})
    if not (r.status == 308 and r.header("location") == f"https://[::1]:{tls_port}/v6"):
        problems.append(f"Host [::1]:{redir_port} -> {r.status} Location {r.header('location')!r} "
                        f"(want https://[::1]:{tls_port}/v6)")
    # a Host that is not a host name must not be pasted into the Location
    for bad in ("evil.example/x?", "a b", "user@evil.example"):
        r = http_request(redir_port, "GET", "/p", {"Host": bad})
        loc = r.header("location")
        if r.status == 308:
            u = urllib.parse.urlsplit(loc or "")
            if u.scheme != "https" or u.path != "/p" or u.query or not u.hostname or "@" in u.netloc:
                problems.append(f"Host {bad!r} -> 308 Location {loc!r} (should be 400)")
    # HTTP/1.0 without Host: there is no host to redirect to
    s = socket.create_connection(("127.0.0.1", redir_port), timeout=5)
    try:
        s.sendall(b"GET /nohost HTTP/1.0\r\n\r\n")
        data = b""
        s.settimeout(3)
        try:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
    finally:
        s.close()
    m = re.search(rb"(?im)^location:\s*(\S+)", data)
    if m and not urllib.parse.urlsplit(m.group(1).decode()).hostname:
        problems.append(f"HTTP/1.0 without Host -> Location {m.group(1).decode()!r} (empty host; should be 400)")
    assert not problems, "redirect_https builds invalid Locations:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- 2. hot certificate swap

class SteadyTLSClient(threading.Thread):
    """New TLS connection + one request, over and over; records (start, end, serial, O=, error)."""

    def __init__(self, port: int, name: str, ca: Path):
        super().__init__(daemon=True)
        self.port, self.name = port, name
        self.ctx = client_ctx(ca)
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.log: list[tuple[float, float, int | None, str | None, str | None]] = []

    def run(self):
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            serial = org = err = None
            try:
                st, _, body, cert = https_get(self.port, self.name, "/", self.ctx, timeout=5)
                serial = int(cert["serialNumber"], 16)
                org = dict(x[0] for x in cert["subject"]).get("organizationName")
                if st != 200 or body != b"hello\n":
                    err = f"status {st} body {body[:100]!r}"
            except Exception as e:  # noqa: BLE001 - every failure counts
                err = repr(e)
            with self.lock:
                self.log.append((t0, time.monotonic(), serial, org, err))
            time.sleep(0.005)

    def snapshot(self):
        with self.lock:
            return list(self.log)

    def failures(self):
        return [e for e in self.snapshot() if e[4]]

    def stop(self):
        self.stop_ev.set()
        self.join(10)


def _write_pair_atomically(src_crt: Path, src_key: Path, dst_dir: Path, name: str):
    """Replace DST/NAME.key then DST/NAME.crt, each through a temp file + os.replace."""
    atomic_write(dst_dir / f"{name}.key", Path(src_key).read_text())
    atomic_write(dst_dir / f"{name}.crt", Path(src_crt).read_text())


def test_hot_certificate_swap_under_load(procs, tmp_path):
    pki = PKI(tmp_path / "pki")
    live = tmp_path / "live"
    live.mkdir()
    pki.leaf("site", "a.portico.test", ["DNS:a.portico.test"], 0x2001, org="Gen One", out_dir=live)
    gen2 = pki.leaf("gen2", "a.portico.test", ["DNS:a.portico.test"], 0x2002, org="Gen Two",
                    out_dir=tmp_path / "staging")
    gen3 = pki.leaf("gen3", "a.portico.test", ["DNS:a.portico.test"], 0x2003, org="Gen Three",
                    out_dir=tmp_path / "staging")
    other = pki.leaf("other", "a.portico.test", ["DNS:a.portico.test"], 0x2099, org="Mismatch",
                     out_dir=tmp_path / "staging")
    tls_port = free_port()
    gw = procs.gateway({
        "listeners": [{"name": "tls", "bind": f"127.0.0.1:{tls_port}", "tls": {"dir": str(live)}}],
        "routes": RESPOND_ALL,
    })
    refused_re = re.compile(r"certificate reload refused")

    def refused_count():
        return len(refused_re.findall(gw.log_path.read_text(errors="replace")))

    client = SteadyTLSClient(tls_port, "a.portico.test", pki.ca_crt)
    client.start()
    try:
        wait_until(lambda: len(client.snapshot()) >= 20, 15, what="steady client warm-up")
        assert {e[2] for e in client.snapshot() if not e[4]} == {0x2001}
        assert not client.failures(), client.failures()[:5]

        # --- swap to generation 2
        _write_pair_atomically(gen2[0], gen2[1], live, "site")
        t_swap = time.monotonic()
        first_new = wait_until(
            lambda: next((e for e in client.snapshot() if e[0] >= t_swap and e[2] == 0x2002), None),
            5, interval=0.02, what="a handshake serving the new certificate")
        took = first_new[0] - t_swap
        print(f"new certificate served {took * 1000:.0f} ms after the swap")
        assert took <= 2.0, f"new certificate first served {took:.2f}s after the swap (> 2 s)"
        # keep going for a second: every handshake started 2 s after the swap sees generation 2
        time.sleep(max(0.0, t_swap + 3.0 - time.monotonic()))
        late = [e for e in client.snapshot() if e[0] >= t_swap + 2.0 and not e[4]]
        assert late and {e[2] for e in late} == {0x2002}, \
            f"serials served 2 s after the swap: {sorted({e[2] for e in late})}"
        assert {e[3] for e in late} == {"Gen Two"}
        assert not client.failures(), f"failed requests during the swap: {client.failures()[:5]}"

        # --- broken files: each refused, the old certificate stays, nobody fails
        good_key = (live / "site.key").read_text()
        good_crt = (live / "site.crt").read_text()
        broken_cases = [
            ("garbage key", lambda: atomic_write(live / "site.key", "-----BEGIN PRIVATE KEY-----\nnot a key\n"
                                                                     "-----END PRIVATE KEY-----\n")),
            ("garbage certificate", lambda: atomic_write(live / "site.crt", "this is not a certificate\n")),
            ("key of another certificate", lambda: atomic_write(live / "site.key", Path(other[1]).read_text())),
            ("truncated certificate", lambda: atomic_write(live / "site.crt", good_crt[: len(good_crt) // 2])),
        ]
        for what, breakit in broken_cases:
            before = refused_count()
            t_break = time.monotonic()
            breakit()
            wait_until(lambda: refused_count() > before, 5, interval=0.05,
                       what=f"'certificate reload refused' logged for the {what}")
            time.sleep(0.5)
            after = [e for e in client.snapshot() if e[0] >= t_break and not e[4]]
            assert after and {e[2] for e in after} == {0x2002}, \
                f"after writing a {what}: served serials {sorted({e[2] for e in after})} (want only 0x2002)"
            # put the good pair back (and let that reload settle) before the next case
            atomic_write(live / "site.key", good_key)
            atomic_write(live / "site.crt", good_crt)
            time.sleep(0.6)
            assert not client.failures(), f"failed requests after the {what}: {client.failures()[:5]}"
        assert gw.alive()

        # --- the watcher still works after refusals: generation 3 goes live
        _write_pair_atomically(gen3[0], gen3[1], live, "site")
        t3 = time.monotonic()
        wait_until(lambda: next((e for e in client.snapshot() if e[0] >= t3 and e[2] == 0x2003), None),
                   5, interval=0.02, what="generation 3 served")
        time.sleep(0.3)
    finally:
        client.stop()
    log = client.snapshot()
    assert not client.failures(), f"{len(client.failures())} of {len(log)} requests failed: {client.failures()[:5]}"
    assert len(log) >= 100, f"the steady client made only {len(log)} requests"
    # serials only ever move forward (no flapping back to an older certificate)
    order = [e[2] for e in log]
    gens = [0x2001, 0x2002, 0x2003]
    idx = [gens.index(s) for s in order]
    assert idx == sorted(idx), "a later handshake got an older certificate"
    text = gw.log_path.read_text(errors="replace")
    assert "certificates reloaded" in text


# --------------------------------------------------------------------------- 6. mTLS

@pytest.fixture
def mtls_gw(procs, pki, tmp_path):
    backend = procs.backend("mtls-echo")
    req_port, opt_port, plain_port = free_port(), free_port(), free_port()
    gw = procs.gateway({
        "listeners": [
            {"name": "plain", "bind": f"127.0.0.1:{plain_port}"},
            {"name": "required", "bind": f"127.0.0.1:{req_port}",
             "tls": {"certificates": [cert_pair(pki.localhost)], "client_ca": str(pki.ca_crt),
                     "client_auth": "required"}},
            {"name": "optional", "bind": f"127.0.0.1:{opt_port}",
             "tls": {"certificates": [cert_pair(pki.localhost)], "client_ca": str(pki.ca_crt),
                     "client_auth": "optional"}},
        ],
        "upstreams": {"echo": {"endpoints": [backend.address]}},
        "routes": [{"name": "echo", "match": {"path_prefix": "/"}, "upstream": "echo"}],
    })
    gw.req_port, gw.opt_port, gw.plain_port = req_port, opt_port, plain_port
    gw.backend = backend
    return gw


def _tls_request_error(port: int, ctx: ssl.SSLContext) -> str | None:
    """None if a request over a new TLS connection got an answer, else the error."""
    try:
        st, _, _, _ = https_get(port, "localhost", "/x", ctx, timeout=5)
        return None if st else "no status"
    except (ssl.SSLError, ConnectionError, OSError, http.client.HTTPException) as e:
        return repr(e)


def test_mtls_required(mtls_gw, pki, tmp_path):
    port = mtls_gw.req_port
    # no certificate: refused (TLS 1.3 reports it at the first read, TLS 1.2 in the handshake)
    err = _tls_request_error(port, client_ctx(pki.ca_crt))
    assert err is not None, "a client without a certificate was served on a client_auth: required listener"
    ctx12 = client_ctx(pki.ca_crt)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    err12 = _tls_request_error(port, ctx12)
    assert err12 is not None and ("HANDSHAKE" in err12.upper() or "CERTIFICATE" in err12.upper()
                                  or "ALERT" in err12.upper()), err12
    r = curl("--resolve", f"localhost:{port}:127.0.0.1", "--cacert", pki.ca_crt, f"https://localhost:{port}/x")
    assert r.returncode != 0, f"curl without a client certificate got an answer: {r.stdout[:200]}"

    # a certificate from another CA: refused
    rogue = PKI(tmp_path / "rogue", ca_cn="Rogue CA")
    rogue_client = rogue.leaf("client", "portico-dev-client", ["DNS:portico-dev-client"], 0x66, eku="clientAuth")
    err = _tls_request_error(port, client_ctx(pki.ca_crt, rogue_client))
    assert err is not None, "a client certificate from an unknown CA was accepted"

    # the right certificate: served, and the upstream learns the subject (a forged header is replaced)
    ctx = client_ctx(pki.ca_crt, pki.client)
    st, _, body, _ = https_get(port, "localhost", "/who", ctx,
                               headers={"x-client-cert-subject": "CN=admin", "X-Client-Cert-Subject": "CN=root"})
    assert st == 200, body[:300]
    seen = json.loads(body)["headers"]
    subject = seen.get("x-client-cert-subject")
    assert subject is not None, f"upstream did not get x-client-cert-subject: {seen}"
    assert "CN=portico-dev-client" in subject and "O=Portico Test" in subject, subject
    assert "admin" not in subject and "root" not in subject, subject
    assert seen.get("x-forwarded-proto") == "https", seen
    # curl with the client certificate
    r = curl("--resolve", f"localhost:{port}:127.0.0.1", "--cacert", pki.ca_crt, "--cert", pki.client[0],
             "--key", pki.client[1], f"https://localhost:{port}/curl")
    assert r.returncode == 0, r.stderr
    assert "CN=portico-dev-client" in json.loads(r.stdout)["headers"].get("x-client-cert-subject", ""), r.stdout


def test_mtls_optional_strips_forged_subject(mtls_gw, pki, tmp_path):
    port = mtls_gw.opt_port
    forged = {"x-client-cert-subject": "CN=admin,O=Portico Test"}
    # no certificate: served, and the forged header is removed
    st, _, body, _ = https_get(port, "localhost", "/anon", client_ctx(pki.ca_crt), headers=forged)
    assert st == 200, body[:300]
    seen = json.loads(body)["headers"]
    assert "x-client-cert-subject" not in seen, f"a forged subject header reached the upstream: {seen}"
    # with a certificate: the verified subject, not the forged one
    st, _, body, _ = https_get(port, "localhost", "/cert", client_ctx(pki.ca_crt, pki.client), headers=forged)
    assert st == 200
    subject = json.loads(body)["headers"].get("x-client-cert-subject", "")
    assert "CN=portico-dev-client" in subject and "admin" not in subject, subject
    # an untrusted certificate on an optional listener: refused, or at least never vouched for
    rogue = PKI(tmp_path / "rogue", ca_cn="Rogue CA")
    rogue_client = rogue.leaf("client", "rogue-client", ["DNS:rogue-client"], 0x67, eku="clientAuth")
    try:
        st, _, body, _ = https_get(port, "localhost", "/rogue", client_ctx(pki.ca_crt, rogue_client), headers=forged)
    except (ssl.SSLError, ConnectionError, OSError, http.client.HTTPException):
        pass
    else:
        hdrs = json.loads(body)["headers"]
        assert "x-client-cert-subject" not in hdrs, f"untrusted certificate vouched for: {hdrs}"
    # and with curl (a different client stack): the forged header is removed too
    r = curl("--resolve", f"localhost:{port}:127.0.0.1", "--cacert", pki.ca_crt, "-H",
             "x-client-cert-subject: CN=admin", f"https://localhost:{port}/curl")
    assert r.returncode == 0, r.stderr
    assert "x-client-cert-subject" not in json.loads(r.stdout)["headers"], r.stdout


def test_forged_subject_header_stripped_on_listeners_without_client_ca(mtls_gw, pki):
    """The subject header is the gateway's word on every listener: a plain-HTTP client of the same
    gateway must not be able to hand the upstream a forged one either."""
    r = http_request(mtls_gw.plain_port, "GET", "/plain", {"x-client-cert-subject": "CN=portico-dev-client"})
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert "x-client-cert-subject" not in seen, \
        f"a plain-listener client forged x-client-cert-subject for the upstream: {seen.get('x-client-cert-subject')!r}"


def test_mtls_subject_is_escaped(procs, pki, tmp_path):
    """A CN holding ',' or '=' must not be able to pose as extra RDNs in the subject header (RFC 4514 escaping)."""
    backend = procs.backend("mtls-esc")
    port = free_port()
    procs.gateway({
        "listeners": [{"name": "required", "bind": f"127.0.0.1:{port}",
                       "tls": {"certificates": [cert_pair(pki.localhost)], "client_ca": str(pki.ca_crt)}}],
        "upstreams": {"echo": {"endpoints": [backend.address]}},
        "routes": [{"name": "echo", "match": {"path_prefix": "/"}, "upstream": "echo"}],
    })
    tricky = pki.leaf("tricky", "mallory\\,O=Admins", ["DNS:mallory"], 0x77, org="Portico Test", eku="clientAuth")
    info = cert_info(Path(tricky[0]).read_text())
    assert "mallory\\,O=Admins" in (info["subject"] or ""), info  # the CN really holds a comma
    st, _, body, _ = https_get(port, "localhost", "/", client_ctx(pki.ca_crt, tricky))
    assert st == 200
    subject = json.loads(body)["headers"].get("x-client-cert-subject", "")
    rdns = re.split(r"(?<!\\),", subject)
    assert rdns.count("O=Admins") == 0, \
        f"CN 'mallory,O=Admins' is forwarded unescaped, so it reads as an extra O=Admins RDN: {subject!r}"


# --------------------------------------------------------------------------- upstream TLS

class TLSUpstream:
    """A Python HTTPS server: echoes the SNI it saw and the client certificate subject as JSON."""

    def __init__(self, crt: Path, key: Path, client_ca: Path | None = None):
        self.sni_seen: list[str | None] = []
        self.handshake_errors: list[str] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(crt), str(key))
        if client_ca:
            ctx.load_verify_locations(str(client_ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
        outer = self

        def sni_cb(sslobj, name, _ctx):
            outer.sni_seen.append(name)
        ctx.sni_callback = sni_cb
        self.ctx = ctx

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                peer = self.connection.getpeercert() or {}
                subject = ",".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
                body = json.dumps({"tls_upstream": True, "path": self.path, "client_subject": subject}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request, client_address):
                try:
                    request = ctx.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    outer.handshake_errors.append(repr(e))
                    return
                super().finish_request(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _tls_upstream_gateway(procs, pki, tmp_path):
    up = TLSUpstream(pki.localhost[0], pki.localhost[1], client_ca=pki.ca_crt)
    procs.extra_cleanup.append(up.close)
    other = PKI(tmp_path / "other", ca_cn="Other CA")
    addr = f"127.0.0.1:{up.port}"
    quick = {"connect": "2s", "read": "5s"}
    gw = procs.gateway({
        "upstreams": {
            "good": {"endpoints": [addr], "timeouts": quick, "tls": {"ca": str(pki.ca_crt), "sni": "localhost"}},
            "wrongca": {"endpoints": [addr], "timeouts": quick, "tls": {"ca": str(other.ca_crt), "sni": "localhost"}},
            "noverify": {"endpoints": [addr], "timeouts": quick,
                         "tls": {"ca": str(other.ca_crt), "sni": "localhost", "verify": False}},
            "wrongname": {"endpoints": [addr], "timeouts": quick,
                          "tls": {"ca": str(pki.ca_crt), "sni": "not-this.example"}},
            "mtls": {"endpoints": [addr], "timeouts": quick,
                     "tls": {"ca": str(pki.ca_crt), "sni": "localhost", "client_cert": str(pki.client[0]),
                             "client_key": str(pki.client[1])}},
        },
        "routes": [{"name": n, "match": {"path_prefix": f"/{n}"}, "upstream": n}
                   for n in ("good", "wrongca", "noverify", "wrongname", "mtls")],
    })
    return gw, up


def test_upstream_tls(procs, pki, tmp_path):
    gw, up = _tls_upstream_gateway(procs, pki, tmp_path)
    # failures first, while no pooled upstream connection exists
    r = gw.get("/wrongca/a")
    assert r.status == 502, f"an upstream certificate from an untrusted CA was accepted: {r}"
    assert r.json()["error"] == "bad_gateway", r
    r = gw.get("/wrongname/a")
    assert r.status == 502, f"an upstream certificate for another name was accepted: {r}"
    assert up.handshake_errors, "the upstream saw no refused handshake"

    r = gw.get("/good/a")
    assert r.status == 200, r
    assert r.json()["tls_upstream"] is True and r.json()["path"] == "/good/a"
    assert "localhost" in up.sni_seen, f"SNI sent to the upstream: {up.sni_seen}"
    assert r.json()["client_subject"] == "", "no client certificate was configured for `good`"

    r = gw.get("/noverify/a")
    assert r.status == 200, f"verify: false should accept any certificate: {r}"

    r = gw.get("/mtls/a")
    assert r.status == 200, r
    assert "commonName=portico-dev-client" in r.json()["client_subject"], r.json()


def test_upstream_tls_pooled_connection_keeps_ca_check(procs, pki, tmp_path):
    """A connection verified with upstream A's CA must not be reused for upstream B with another CA."""
    gw, up = _tls_upstream_gateway(procs, pki, tmp_path)
    for _ in range(3):
        assert gw.get("/good/warm").status == 200   # leaves a pooled, verified connection
    r = gw.get("/wrongca/a")
    assert r.status == 502, ("upstream `wrongca` (CA: Other CA) was served over a pooled connection that was "
                             f"verified for upstream `good` (CA: Portico Test CA): {r}")
