"""Authentication plugins end to end: `jwt` (valid tokens of several algorithms, every attack
refused with 401 and nothing reaching the backend, JWKS files and URLs rotating without a
restart), `api_key` and `basic_auth`.

Keys are generated at test time with the `openssl` CLI and tokens are signed with it (RS256,
ES256, EdDSA) or with hmac (HS256); nothing secret is stored in the repository. The bcrypt
hashes below are of throwaway test passwords."""

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import assert_gateway_error, metric_sum

SECRET = "e2e-hs256-secret"
# bcrypt of "wonderland" and "builder" at cost 4 (fast), and of "slowpass" at cost 10.
ALICE_HASH = "$2b$04$VAQ9TG.B4DZEvVuZO24F5OeyAuXFQIjSnX4Ud/pXy5dWq2BLHqx2."
BOB_HASH = "$2b$04$myt5oyuRcI8buXcig0AQxesX1ImNcohHBLjq7AuxtnM.pwbKcsG3y"
SLOW_HASH = "$2b$10$0zJF0tzKpWTBEOJG25QGbemnaSjxE2o22LUkYRbRe37iwSsnxXxiC"


# --------------------------------------------------------------------------- JWT helpers

def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def openssl(*args, data: bytes | None = None) -> bytes:
    r = subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr.decode()}"
    return r.stdout


class Key:
    """A private key file (PEM) made by `openssl genpkey`, and its public half."""

    def __init__(self, directory, name, *genargs):
        self.priv = directory / f"{name}.key"
        self.pub = directory / f"{name}.pub.pem"
        openssl("genpkey", *genargs, "-out", str(self.priv))
        openssl("pkey", "-in", str(self.priv), "-pubout", "-out", str(self.pub))
        self.dir = directory

    def sign(self, alg: str, msg: bytes) -> bytes:
        if alg == "RS256":
            return openssl("dgst", "-sha256", "-sign", str(self.priv), data=msg)
        if alg == "ES256":
            return der_to_raw(openssl("dgst", "-sha256", "-sign", str(self.priv), data=msg), 32)
        if alg == "EdDSA":
            m = self.dir / "msg.bin"
            m.write_bytes(msg)
            return openssl("pkeyutl", "-sign", "-inkey", str(self.priv), "-rawin", "-in", str(m))
        raise ValueError(alg)

    def ed_jwk(self, kid: str) -> dict:
        der = openssl("pkey", "-pubin", "-in", str(self.pub), "-outform", "DER")
        return {"kty": "OKP", "crv": "Ed25519", "x": b64u(der[-32:]), "kid": kid, "use": "sig", "alg": "EdDSA"}

    def ec_jwk(self, kid: str) -> dict:
        der = openssl("pkey", "-pubin", "-in", str(self.pub), "-outform", "DER")
        point = der[-65:]   # uncompressed P-256 point: 0x04 || X || Y
        assert point[0] == 4
        return {"kty": "EC", "crv": "P-256", "x": b64u(point[1:33]), "y": b64u(point[33:]), "kid": kid,
                "use": "sig"}


def der_to_raw(der: bytes, n: int) -> bytes:
    """An ECDSA signature in DER (SEQUENCE of two INTEGERs) as JWS wants it: r || s."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        ln = der[i + 1]
        v = der[i + 2:i + 2 + ln].lstrip(b"\x00")
        out += v.rjust(n, b"\x00")
        i += 2 + ln
    return out


def now() -> int:
    return int(time.time())


def claims(**extra) -> dict:
    c = {"sub": "alice", "exp": now() + 600, "iss": "https://issuer.test", "aud": "api", "role": "admin"}
    c.update(extra)
    return c


def token(alg: str, c: dict, key=None, secret: bytes | None = None, kid: str | None = None,
          header: dict | None = None) -> str:
    h = {"alg": alg, "typ": "JWT"}
    if kid:
        h["kid"] = kid
    if header is not None:
        h = header
    signing = f"{b64u(json.dumps(h).encode())}.{b64u(json.dumps(c).encode())}"
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        sig = hmac.new(secret, signing.encode(), digest).digest()
    elif alg == "none":
        return signing + "."
    else:
        sig = key.sign(alg, signing.encode())
    return f"{signing}.{b64u(sig)}"


def bearer(t: str) -> dict:
    return {"Authorization": f"Bearer {t}"}


class JwksServer:
    """Serves a JWKS document (changeable) at /jwks.json and counts the fetches."""

    def __init__(self):
        self.doc = {"keys": []}
        self.fetches = 0
        srv = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                body = json.dumps(srv.doc).encode()
                srv.fetches += 1
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the gateway

@pytest.fixture(scope="module")
def env(module_procs, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth-keys")
    rsa = Key(d, "rsa", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048")
    ec = Key(d, "ec", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    ed1 = Key(d, "ed1", "-algorithm", "ED25519")
    ed2 = Key(d, "ed2", "-algorithm", "ED25519")
    jwks_file = d / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [ec.ec_jwk("ec1"), ed1.ed_jwk("ed1")]}))
    jwks_srv = JwksServer()
    module_procs.extra_cleanup.append(jwks_srv.close)
    jwks_srv.doc = {"keys": [ed1.ed_jwk("u1")]}
    (d / "keys.txt").write_text("# key consumer\nfile-key-1 svc-a\nfile-key-2 svc-b\n")
    (d / "htpasswd").write_text(f"bob:{BOB_HASH.replace('$2b$', '$2y$', 1)}\nslow:{SLOW_HASH}\n")

    be = module_procs.py_backend("auth-backend")
    hs = {"algorithms": ["HS256"], "secret": SECRET,
          "forward_claims": {"sub": "x-user-id", "role": "x-role"}}
    routes = [
        {"name": "hs", "match": {"path_prefix": "/hs"}, "upstream": "be", "plugins": [{"jwt": hs}]},
        {"name": "rs", "match": {"path_prefix": "/rs"}, "upstream": "be", "plugins": [{"jwt": {
            "algorithms": ["RS256"], "public_key": str(rsa.pub), "issuer": "https://issuer.test",
            "audience": "api", "forward_claims": {"sub": "x-user-id"}}}]},
        {"name": "jwks", "match": {"path_prefix": "/jwks"}, "upstream": "be", "plugins": [{"jwt": {
            "algorithms": ["ES256", "EdDSA"], "jwks": str(jwks_file), "jwks_min_refetch": "2s"}}]},
        {"name": "jwksurl", "match": {"path_prefix": "/url"}, "upstream": "be", "plugins": [{"jwt": {
            "algorithms": ["EdDSA"], "jwks": f"http://127.0.0.1:{jwks_srv.port}/jwks.json",
            "jwks_min_refetch": "1h"}}]},
        {"name": "cookie", "match": {"path_prefix": "/cookie"}, "upstream": "be", "plugins": [{"jwt": {
            "algorithms": ["HS256"], "secret": SECRET, "cookie": "session"}}]},
        {"name": "key", "match": {"path_prefix": "/key"}, "upstream": "be", "plugins": [{"api_key": {
            "keys": {"k-alice-123": "alice", "k-bob-456": "bob"}}}]},
        {"name": "keyfile", "match": {"path_prefix": "/fkey"}, "upstream": "be", "plugins": [{"api_key": {
            "query": "api_key", "keys_file": str(d / "keys.txt"), "forward_header": "x-client"}}]},
        {"name": "basic", "match": {"path_prefix": "/basic"}, "upstream": "be", "plugins": [{"basic_auth": {
            "users": {"alice": ALICE_HASH}}}]},
        {"name": "htpasswd", "match": {"path_prefix": "/htpasswd"}, "upstream": "be", "plugins": [{"basic_auth": {
            "htpasswd": str(d / "htpasswd"), "realm": "staff"}}]},
    ]
    gw = module_procs.gateway({"upstreams": {"be": {"endpoints": [be.address]}}, "routes": routes})
    return {"gw": gw, "be": be, "rsa": rsa, "ec": ec, "ed1": ed1, "ed2": ed2, "jwks_file": jwks_file,
            "jwks_srv": jwks_srv, "dir": d}


def ok(env, path, headers=None):
    """A request that must pass: returns the headers the backend saw."""
    be = env["be"]
    before = be.count()
    r = env["gw"].get(path, headers or {})
    assert r.status == 200, f"GET {path}: {r}"
    assert be.count() == before + 1
    return be.requests[-1][2]


def refused(env, path, headers=None, status=401, code=None, challenge=None):
    be = env["be"]
    before = be.count()
    r = env["gw"].get(path, headers or {})
    if code:
        assert_gateway_error(r, status, code)
    assert r.status == status, f"GET {path}: expected {status}, got {r}"
    if challenge is not None:
        assert r.header("www-authenticate") == challenge, r
    assert be.count() == before, "a refused request reached the backend"
    return r


# --------------------------------------------------------------------------- jwt

def test_jwt_valid_tokens_of_several_algorithms(env):
    seen = ok(env, "/hs/a", {**bearer(token("HS256", claims(), secret=SECRET.encode())),
                             "x-user-id": "mallory", "X-Role": "root"})
    low = {k.lower(): v for k, v in seen.items()}
    assert low.get("x-user-id") == "alice", seen
    assert low.get("x-role") == "admin", seen
    ok(env, "/rs/a", bearer(token("RS256", claims(), key=env["rsa"])))
    ok(env, "/jwks/a", bearer(token("ES256", claims(), key=env["ec"], kid="ec1")))
    ok(env, "/jwks/a", bearer(token("EdDSA", claims(), key=env["ed1"], kid="ed1")))
    ok(env, "/cookie", {"Cookie": f"a=b; session={token('HS256', claims(), secret=SECRET.encode())}"})


def test_jwt_attacks_reach_no_backend(env):
    gw, rsa = env["gw"], env["rsa"]
    good = token("RS256", claims(), key=rsa)
    h, p, s = good.split(".")
    forged_payload = b64u(json.dumps(claims(sub="mallory", role="root")).encode())
    attacks = {
        "alg none": token("none", claims()),
        "alg none with a signature": token("none", claims())[:-1] + "." + s,
        "HS256 signed with the RSA public key": token("HS256", claims(), secret=rsa.pub.read_bytes()),
        "expired": token("RS256", claims(exp=now() - 3600), key=rsa),
        "nbf in the future": token("RS256", claims(nbf=now() + 3600), key=rsa),
        "wrong issuer": token("RS256", claims(iss="https://evil.test"), key=rsa),
        "wrong audience": token("RS256", claims(aud="other"), key=rsa),
        "bad signature": f"{h}.{forged_payload}.{s}",
        "malformed base64": f"{h}.{p}.%%%not*base64%%%",
        "malformed header": f"!!.{p}.{s}",
        "not a JWT": "abc.def",
        "16 KiB token": f"{h}.{'A' * 16384}.{s}",
    }
    rej_before = metric_sum(gw.metrics(), "portico_plugin_rejections_total", route="rs", plugin="jwt")
    for name, t in attacks.items():
        r = refused(env, "/rs/x", bearer(t), challenge='Bearer error="invalid_token"')
        j = assert_gateway_error(r, 401, "invalid_token")
        assert j["message"], name
    # Unknown kid on the JWKS route.
    refused(env, "/jwks/x", bearer(token("EdDSA", claims(), key=env["ed2"], kid="nope")),
            challenge='Bearer error="invalid_token"')
    # A 64 KiB token: refused (by the plugin, or earlier by the header size limit).
    r = gw.get("/rs/x", bearer(f"{h}.{'A' * 65536}.{s}"))
    assert r.status in (401, 431), r
    # No token, or the token in the wrong place: 401 with a bare Bearer challenge.
    refused(env, "/rs/x", challenge="Bearer")
    refused(env, f"/rs/x?access_token={good}", challenge="Bearer")
    refused(env, "/rs/x", {"Cookie": f"token={good}"}, challenge="Bearer")
    refused(env, "/rs/x", {"Authorization": f"Basic {good}"}, challenge="Bearer")
    refused(env, "/cookie", bearer(token("HS256", claims(), secret=SECRET.encode())), challenge="Bearer")
    rej_after = metric_sum(gw.metrics(), "portico_plugin_rejections_total", route="rs", plugin="jwt")
    assert rej_after - rej_before >= len(attacks) + 4
    # Nothing was forwarded for any of them.
    samples = gw.metrics()
    assert metric_sum(samples, "portico_upstream_requests_total", upstream="be") == env["be"].count()


def test_jwks_file_rotates_without_restart(env):
    f, ed2 = env["jwks_file"], env["ed2"]
    t2 = token("EdDSA", claims(), key=ed2, kid="ed2")
    # Not yet in the set.
    refused(env, "/jwks/rot", bearer(t2))
    doc = json.loads(f.read_text())
    doc["keys"].append(ed2.ed_jwk("ed2"))
    f.write_text(json.dumps(doc))
    # The next unknown-kid refetch is allowed jwks_min_refetch (2 s here) after the last one.
    deadline = time.monotonic() + 10
    while True:
        r = env["gw"].get("/jwks/rot", bearer(t2))
        if r.status == 200:
            break
        assert time.monotonic() < deadline, f"rotated key never accepted: {r}"
        time.sleep(0.5)


def test_jwks_url_fetched_on_first_use_and_rotated(env):
    srv, ed1, ed2 = env["jwks_srv"], env["ed1"], env["ed2"]
    ok(env, "/url/a", bearer(token("EdDSA", claims(), key=ed1, kid="u1")))
    fetched = srv.fetches
    assert fetched >= 1
    ok(env, "/url/a", bearer(token("EdDSA", claims(), key=ed1, kid="u1")))
    assert srv.fetches == fetched, "the key set is cached"
    # Rotation: u2 replaces u1 at the IdP; the first request with u2 triggers one refetch
    # and passes (no restart, no waiting for the periodic refresh).
    srv.doc = {"keys": [ed2.ed_jwk("u2")]}
    ok(env, "/url/a", bearer(token("EdDSA", claims(), key=ed2, kid="u2")))
    # One refetch (two GETs when the first answer was lost: the fetcher retries once).
    after = srv.fetches
    assert after in (fetched + 1, fetched + 2), (fetched, after)
    refused(env, "/url/a", bearer(token("EdDSA", claims(), key=ed1, kid="u1")))
    # Unknown kids do not hammer the IdP: at most one refetch per jwks_min_refetch (1h here).
    for i in range(5):
        refused(env, "/url/a", bearer(token("EdDSA", claims(), key=ed2, kid=f"x{i}")))
    assert srv.fetches == after


# --------------------------------------------------------------------------- api_key

def test_api_key(env):
    seen = ok(env, "/key", {"X-API-Key": "k-bob-456", "X-Consumer": "admin"})
    low = {k.lower(): v for k, v in seen.items()}
    assert low.get("x-consumer") == "bob", seen
    assert "x-api-key" not in low, "the key is hidden from the upstream"
    for h in ({}, {"X-API-Key": "k-bob-45"}, {"X-API-Key": "k-carol"}, {"X-API-Key": ""}):
        assert_gateway_error(refused(env, "/key", h), 401, "unauthorized")
    refused(env, "/key?x-api-key=k-bob-456")


def test_api_key_file_and_query(env):
    seen = ok(env, "/fkey?api_key=file-key-2")
    low = {k.lower(): v for k, v in seen.items()}
    assert low.get("x-client") == "svc-b", seen
    refused(env, "/fkey?api_key=file-key-3")
    # The file changes: the new key works without a reload.
    p = env["dir"] / "keys.txt"
    p.write_text(p.read_text() + "file-key-3 svc-c\n")
    deadline = time.monotonic() + 10
    while env["gw"].get("/fkey?api_key=file-key-3").status != 200:
        assert time.monotonic() < deadline, "the keys file was not re-read"
        time.sleep(0.3)


# --------------------------------------------------------------------------- basic_auth

def basic(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_basic_auth(env):
    seen = ok(env, "/basic", basic("alice", "wonderland"))
    assert {k.lower(): v for k, v in seen.items()}.get("x-consumer") == "alice"
    for h in ({}, basic("alice", "wrong"), basic("mallory", "wonderland"), {"Authorization": "Basic !!"}):
        r = refused(env, "/basic", h, challenge='Basic realm="portico"')
        assert_gateway_error(r, 401, "unauthorized")


def test_basic_auth_htpasswd_and_cache(env):
    ok(env, "/htpasswd", basic("bob", "builder"))          # a $2y$ entry
    refused(env, "/htpasswd", basic("bob", "nope"), challenge='Basic realm="staff"')
    # Cost 10: the first check runs bcrypt, later ones hit the cache.
    t0 = time.monotonic()
    ok(env, "/htpasswd", basic("slow", "slowpass"))
    first = time.monotonic() - t0
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        ok(env, "/htpasswd", basic("slow", "slowpass"))
        times.append(time.monotonic() - t0)
    assert min(times) < max(first / 2, 0.05), f"first {first:.3f}s, cached {times}"
