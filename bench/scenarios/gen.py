#!/usr/bin/env python3
"""Helpers for bench/scenarios.sh (standard library only).

  gen.py json2k                      print the fixed 2 KiB JSON body (exactly 2048 bytes)
  gen.py token SECRET                print an HS256 JWT (iss portico-bench, aud portico-api,
                                     exp in 24 h) signed with SECRET
  gen.py render TEMPLATE OUT K=V...  copy TEMPLATE to OUT replacing every @K@ by V
                                     (V may start with @file: to insert a file's text)
"""
import base64
import hashlib
import hmac
import json
import random
import sys
import time


def json2k() -> str:
    """A realistic-looking, deterministic JSON document of exactly 2048 bytes.

    An order list: ids, names, prices, timestamps and hex digests, so it compresses
    like a real API answer (about 3-4x with gzip), not like a run of one character.
    No `$`, `'` or `\\` (the body is written into an nginx `return` string)."""
    rnd = random.Random(20261126)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
             "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]
    items = []
    i = 0
    doc = {}
    while True:
        items.append({
            "id": 100000 + rnd.randrange(900000),
            "sku": "SKU-%06X" % rnd.randrange(1 << 24),
            "name": " ".join(rnd.choice(words) for _ in range(2)),
            "qty": rnd.randrange(1, 9),
            "price": round(rnd.uniform(1, 500), 2),
            "updated": "2026-11-%02dT%02d:%02d:%02dZ" % (rnd.randrange(1, 29), rnd.randrange(24),
                                                        rnd.randrange(60), rnd.randrange(60)),
            "digest": "%016x" % rnd.getrandbits(64),
        })
        i += 1
        doc = {"order": "ord-7f3a9c", "customer": {"id": 4711, "tier": "gold"}, "items": items, "pad": ""}
        if len(json.dumps(doc, separators=(",", ":"))) > 2048:
            items.pop()
            break
    doc = {"order": "ord-7f3a9c", "customer": {"id": 4711, "tier": "gold"}, "items": items, "pad": ""}
    short = 2048 - len(json.dumps(doc, separators=(",", ":")))
    doc["pad"] = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(short))
    s = json.dumps(doc, separators=(",", ":"))
    assert len(s.encode()) == 2048, len(s)
    assert not set("$'\\") & set(s)
    return s


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(secret: str) -> str:
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"iss": "portico-bench", "aud": "portico-api", "sub": "user-4711",
              "iat": now, "nbf": now - 60, "exp": now + 86400,
              "name": "Bench User", "email": "bench.user@example.com",
              "scope": "orders:read orders:write profile:read",
              "jti": "b3f1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"}
    signing = b64(json.dumps(header, separators=(",", ":")).encode()) + "." + \
        b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64(sig)


def render(template: str, out: str, pairs: list) -> None:
    text = open(template).read()
    for p in pairs:
        k, v = p.split("=", 1)
        if v.startswith("@file:"):
            v = open(v[len("@file:"):]).read().rstrip("\n")
        text = text.replace("@" + k + "@", v)
    if "@" in text:
        import re
        left = sorted(set(re.findall(r"@[A-Z0-9_]+@", text)))
        if left:
            sys.exit("render: %s: placeholders left: %s" % (template, " ".join(left)))
    open(out, "w").write(text)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "json2k":
        sys.stdout.write(json2k())
    elif cmd == "token":
        print(token(sys.argv[2]))
    elif cmd == "render":
        render(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
