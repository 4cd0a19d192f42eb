//! Unit tests of the `jwt` plugin: every supported algorithm verifies, every listed
//! attack is refused, and a JWKS file rotates without a restart. Keys are generated
//! at test time with OpenSSL; no private key is stored in the repository.

use super::*;
use crate::testutil::*;
use crate::HeaderEdits;
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use serde_json::json;
use std::path::Path;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> serde_json::Value {
    json!({"sub": "alice", "exp": now() + 600, "iss": "https://issuer.test", "aud": "api", "role": "admin"})
}

struct Keys {
    rsa: PKey<Private>,
    p256: PKey<Private>,
    p384: PKey<Private>,
    ed: PKey<Private>,
}

fn keys() -> &'static Keys {
    static K: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        let ec = |nid| {
            let g = EcGroup::from_curve_name(nid).unwrap();
            PKey::from_ec_key(EcKey::generate(&g).unwrap()).unwrap()
        };
        Keys {
            rsa: PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap(),
            p256: ec(Nid::X9_62_PRIME256V1),
            p384: ec(Nid::SECP384R1),
            ed: PKey::generate_ed25519().unwrap(),
        }
    })
}

fn encoding(alg: Algorithm, k: &PKey<Private>) -> EncodingKey {
    let pem = k.private_key_to_pem_pkcs8().unwrap();
    match family(alg) {
        Family::Rsa => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Family::Ec => EncodingKey::from_ec_pem(&pem).unwrap(),
        Family::Ed => EncodingKey::from_ed_pem(&pem).unwrap(),
        Family::Hmac => unreachable!(),
    }
}

fn sign(alg: Algorithm, k: &PKey<Private>, kid: Option<&str>, c: &serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, c, &encoding(alg, k)).unwrap()
}

fn hs(alg: Algorithm, secret: &[u8], c: &serde_json::Value) -> String {
    encode(&Header::new(alg), c, &EncodingKey::from_secret(secret)).unwrap()
}

fn write_pub(dir: &Path, name: &str, k: &PKey<Private>) -> String {
    let p = dir.join(name);
    std::fs::write(&p, k.public_key_to_pem().unwrap()).unwrap();
    p.display().to_string()
}

/// A JWK for the public half of `k`.
fn jwk(k: &PKey<Private>, kid: &str, alg: Option<&str>) -> serde_json::Value {
    let mut j = match k.id() {
        openssl::pkey::Id::RSA => {
            let r = k.rsa().unwrap();
            json!({"kty": "RSA", "n": b64(&r.n().to_vec()), "e": b64(&r.e().to_vec())})
        }
        openssl::pkey::Id::EC => {
            let ec = k.ec_key().unwrap();
            let mut ctx = openssl::bn::BigNumContext::new().unwrap();
            let (mut x, mut y) = (
                openssl::bn::BigNum::new().unwrap(),
                openssl::bn::BigNum::new().unwrap(),
            );
            ec.public_key()
                .affine_coordinates(ec.group(), &mut x, &mut y, &mut ctx)
                .unwrap();
            let n = if ec.group().curve_name() == Some(Nid::SECP384R1) {
                48
            } else {
                32
            };
            let crv = if n == 48 { "P-384" } else { "P-256" };
            json!({"kty": "EC", "crv": crv,
                   "x": b64(&x.to_vec_padded(n).unwrap()), "y": b64(&y.to_vec_padded(n).unwrap())})
        }
        _ => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&k.raw_public_key().unwrap())}),
    };
    j["kid"] = json!(kid);
    j["use"] = json!("sig");
    if let Some(a) = alg {
        j["alg"] = json!(a);
    }
    j
}

fn jwks_doc(keys: &[serde_json::Value]) -> String {
    json!({ "keys": keys }).to_string()
}

async fn check(p: &dyn Plugin, token: &str) -> (Flow, HeaderEdits, Context) {
    let r = Req::get("/x").header("authorization", &format!("Bearer {token}"));
    let mut c = ctx();
    let (f, e) = request(p, &r, &mut c).await;
    (f, e, c)
}

async fn accepted(p: &dyn Plugin, token: &str) -> Context {
    let (f, _, c) = check(p, token).await;
    if let Flow::Respond(r) = f {
        panic!("refused: {}", String::from_utf8_lossy(&r.body));
    }
    c
}

/// The refusal's message (asserting 401 + `Bearer error="invalid_token"`).
async fn refused(p: &dyn Plugin, token: &str) -> String {
    let (f, _, _) = check(p, token).await;
    let r = reply(f);
    assert_eq!(r.status, 401);
    assert_eq!(
        reply_header(&r, "www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
    let j: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(j["error"], "invalid_token");
    j["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn hmac_algorithms_pass() {
    let p = build("jwt: { algorithms: [HS256, HS384, HS512], secret: s3cret }").unwrap();
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let c = accepted(&*p, &hs(alg, b"s3cret", &claims())).await;
        assert_eq!(c.consumer.as_deref(), Some("alice"));
        assert_eq!(c.claims.unwrap()["role"], "admin");
    }
    let m = refused(&*p, &hs(Algorithm::HS256, b"other", &claims())).await;
    assert!(m.contains("bad signature"), "{m}");
}

#[tokio::test]
async fn every_asymmetric_algorithm_passes_with_a_pem_key() {
    let d = temp_dir("jwt-pem");
    let k = keys();
    let cases: Vec<(&str, &PKey<Private>, Vec<Algorithm>)> = vec![
        (
            "rsa.pem",
            &k.rsa,
            vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
        ),
        ("p256.pem", &k.p256, vec![Algorithm::ES256]),
        ("p384.pem", &k.p384, vec![Algorithm::ES384]),
        ("ed.pem", &k.ed, vec![Algorithm::EdDSA]),
    ];
    for (file, key, algs) in cases {
        let path = write_pub(&d, file, key);
        let names: Vec<String> = algs.iter().map(|a| format!("{a:?}")).collect();
        let p = build(&format!(
            "jwt: {{ algorithms: [{}], public_key: {path} }}",
            names.join(", ")
        ))
        .unwrap();
        for alg in algs {
            let c = accepted(&*p, &sign(alg, key, None, &claims())).await;
            assert_eq!(c.consumer.as_deref(), Some("alice"), "{alg:?}");
        }
    }
}

#[tokio::test]
async fn every_asymmetric_algorithm_passes_with_a_jwks() {
    let d = temp_dir("jwt-jwks");
    let k = keys();
    let doc = jwks_doc(&[
        jwk(&k.rsa, "rsa", None),
        jwk(&k.p256, "p256", Some("ES256")),
        jwk(&k.p384, "p384", Some("ES384")),
        jwk(&k.ed, "ed", Some("EdDSA")),
    ]);
    std::fs::write(d.join("jwks.json"), doc).unwrap();
    let p = build(&format!(
        "jwt: {{ algorithms: [RS256, RS384, RS512, PS256, ES256, ES384, EdDSA], jwks: {} }}",
        d.join("jwks.json").display()
    ))
    .unwrap();
    for (alg, key, kid) in [
        (Algorithm::RS256, &k.rsa, "rsa"),
        (Algorithm::RS384, &k.rsa, "rsa"),
        (Algorithm::RS512, &k.rsa, "rsa"),
        (Algorithm::PS256, &k.rsa, "rsa"),
        (Algorithm::ES256, &k.p256, "p256"),
        (Algorithm::ES384, &k.p384, "p384"),
        (Algorithm::EdDSA, &k.ed, "ed"),
    ] {
        accepted(&*p, &sign(alg, key, Some(kid), &claims())).await;
    }
    // A key pinned to ES256 does not verify an RS256 token even if the kid says so.
    let m = refused(&*p, &sign(Algorithm::ES256, &k.p256, Some("ed"), &claims())).await;
    assert!(m.contains("does not fit"), "{m}");
    let m = refused(
        &*p,
        &sign(Algorithm::RS256, &k.rsa, Some("nope"), &claims()),
    )
    .await;
    assert!(m.contains("unknown key id"), "{m}");
    let m = refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &claims())).await;
    assert!(m.contains("no key id"), "{m}");
}

#[tokio::test]
async fn attacks_are_refused() {
    let d = temp_dir("jwt-attacks");
    let k = keys();
    let pem_path = write_pub(&d, "rsa.pem", &k.rsa);
    let p = build(&format!(
        "jwt: {{ algorithms: [RS256], public_key: {pem_path}, issuer: https://issuer.test, audience: api }}"
    ))
    .unwrap();
    let good = sign(Algorithm::RS256, &k.rsa, None, &claims());
    accepted(&*p, &good).await;

    // alg none, unsigned.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    let m = refused(&*p, &none).await;
    assert!(m.contains("malformed"), "{m}");
    // The same with a bogus signature, and with "None" spelled differently.
    let none2 = format!("{}.{}.c2ln", b64(br#"{"alg":"None"}"#), b64(b"{}"));
    refused(&*p, &none2).await;

    // HS256 signed with the RSA public key (PEM) as the HMAC secret.
    let pem = std::fs::read(&pem_path).unwrap();
    let m = refused(&*p, &hs(Algorithm::HS256, &pem, &claims())).await;
    assert!(m.contains("not accepted"), "{m}");

    // Expired, not yet valid, wrong issuer, wrong audience.
    let mut c = claims();
    c["exp"] = json!(now() - 3600);
    let m = refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &c)).await;
    assert!(m.contains("expired"), "{m}");
    let mut c = claims();
    c["nbf"] = json!(now() + 3600);
    let m = refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &c)).await;
    assert!(m.contains("nbf"), "{m}");
    let mut c = claims();
    c["iss"] = json!("https://evil.test");
    let m = refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &c)).await;
    assert!(m.contains("issuer"), "{m}");
    let mut c = claims();
    c.as_object_mut().unwrap().remove("iss");
    let m = refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &c)).await;
    assert!(m.contains("iss"), "{m}");
    let mut c = claims();
    c["aud"] = json!("other");
    let m = refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &c)).await;
    assert!(m.contains("audience"), "{m}");
    let mut c = claims();
    c["exp"] = json!("tomorrow");
    refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &c)).await;
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    let m = refused(&*p, &sign(Algorithm::RS256, &k.rsa, None, &c)).await;
    assert!(m.contains("exp"), "{m}");

    // Bad signature: a valid token with its payload swapped.
    let parts: Vec<&str> = good.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("mallory");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(c.to_string().as_bytes()),
        parts[2]
    );
    let m = refused(&*p, &forged).await;
    assert!(m.contains("signature"), "{m}");
    // Signed by another RSA key.
    let other = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let m = refused(&*p, &sign(Algorithm::RS256, &other, None, &claims())).await;
    assert!(m.contains("signature"), "{m}");

    // Malformed base64 and garbage.
    // (The signature is checked first, so a mangled payload fails as a bad signature.)
    let m = refused(&*p, &format!("{}.!!!not-base64!!!.{}", parts[0], parts[2])).await;
    assert!(m.contains("signature") || m.contains("base64"), "{m}");
    let m = refused(&*p, &format!("{}.{}.***", parts[0], parts[1])).await;
    assert!(m.contains("base64") || m.contains("malformed"), "{m}");
    let m = refused(&*p, &format!("%%%.{}.{}", parts[1], parts[2])).await;
    assert!(m.contains("malformed"), "{m}");
    refused(&*p, "abc").await;
    refused(&*p, "a.b.c.d").await;

    // A 64 KiB token is refused before parsing.
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(64 * 1024), parts[2]);
    let m = refused(&*p, &huge).await;
    assert!(m.contains("longer than"), "{m}");
}

#[tokio::test]
async fn missing_token_and_wrong_place() {
    let p = build("jwt: { algorithms: [HS256], secret: s }").unwrap();
    let t = hs(Algorithm::HS256, b"s", &claims());
    for r in [
        Req::get("/x"),
        Req::get(&format!("/x?access_token={t}")),
        Req::get("/x").header("cookie", &format!("token={t}")),
        Req::get("/x").header("authorization", &format!("Basic {t}")),
        Req::get("/x").header("authorization", "Bearer "),
    ] {
        let mut c = ctx();
        let rep = reply(request(&*p, &r, &mut c).await.0);
        assert_eq!(rep.status, 401);
        assert_eq!(reply_header(&rep, "www-authenticate"), Some("Bearer"));
        assert!(c.consumer.is_none() && c.claims.is_none());
    }
    // Configured sources.
    let q = build("jwt: { algorithms: [HS256], secret: s, query: access_token }").unwrap();
    let mut c = ctx();
    let (f, _) = request(&*q, &Req::get(&format!("/x?a=1&access_token={t}")), &mut c).await;
    assert!(matches!(f, Flow::Continue));
    let ck = build("jwt: { algorithms: [HS256], secret: s, cookie: token }").unwrap();
    let r = Req::get("/x").header("cookie", &format!("a=b; token={t}"));
    assert!(matches!(
        request(&*ck, &r, &mut ctx()).await.0,
        Flow::Continue
    ));
    // With the cookie configured, the header is the wrong place.
    let r = Req::get("/x").header("authorization", &format!("Bearer {t}"));
    assert_eq!(reply(request(&*ck, &r, &mut ctx()).await.0).status, 401);
    let h = build("jwt: { algorithms: [HS256], secret: s, header: x-token }").unwrap();
    let r = Req::get("/x").header("x-token", &t);
    assert!(matches!(
        request(&*h, &r, &mut ctx()).await.0,
        Flow::Continue
    ));
}

#[tokio::test]
async fn forward_claims_and_spoofed_headers() {
    let p = build(
        "jwt: { algorithms: [HS256], secret: s, consumer_claim: email, \
         forward_claims: { sub: x-user-id, role: x-role, groups: x-groups, missing: x-missing } }",
    )
    .unwrap();
    let mut c = claims();
    c["email"] = json!("alice@example.com");
    c["groups"] = json!(["a", "b"]);
    let t = hs(Algorithm::HS256, b"s", &c);
    let r = Req::get("/x")
        .header("authorization", &format!("Bearer {t}"))
        .header("x-user-id", "mallory")
        .header("x-missing", "spoofed");
    let mut cx = ctx();
    let (f, e) = request(&*p, &r, &mut cx).await;
    assert!(matches!(f, Flow::Continue));
    for h in ["x-user-id", "x-role", "x-groups", "x-missing"] {
        assert!(e.remove.iter().any(|n| n == h), "{h} not removed");
    }
    assert_eq!(set_value(&e, "x-user-id").as_deref(), Some("alice"));
    assert_eq!(set_value(&e, "x-role").as_deref(), Some("admin"));
    assert_eq!(set_value(&e, "x-groups").as_deref(), Some("a,b"));
    assert_eq!(set_value(&e, "x-missing"), None);
    assert_eq!(cx.consumer.as_deref(), Some("alice@example.com"));
    // Rejected requests still lose the spoofed headers.
    let r = Req::get("/x").header("x-user-id", "mallory");
    let (f, e) = request(&*p, &r, &mut ctx()).await;
    assert!(matches!(f, Flow::Respond(_)));
    assert!(e.remove.iter().any(|n| n == "x-user-id"));
}

#[tokio::test]
async fn leeway_and_required_claims() {
    let p = build(
        "jwt: { algorithms: [HS256], secret: s, leeway: 2m, required_claims: [exp, tenant] }",
    )
    .unwrap();
    let mut c = claims();
    c["exp"] = json!(now() - 30);
    c["tenant"] = json!("t1");
    accepted(&*p, &hs(Algorithm::HS256, b"s", &c)).await;
    c.as_object_mut().unwrap().remove("tenant");
    let m = refused(&*p, &hs(Algorithm::HS256, b"s", &c)).await;
    assert!(m.contains("tenant"), "{m}");
    // No required claims: a token without exp passes.
    let p = build("jwt: { algorithms: [HS256], secret: s, required_claims: [] }").unwrap();
    accepted(&*p, &hs(Algorithm::HS256, b"s", &json!({"sub": "x"}))).await;
}

#[tokio::test]
async fn jwks_rotation_from_a_file() {
    let d = temp_dir("jwt-rotate");
    let k = keys();
    let path = d.join("jwks.json");
    std::fs::write(&path, jwks_doc(&[jwk(&k.p256, "k1", None)])).unwrap();
    let p = build(&format!(
        "jwt: {{ algorithms: [ES256], jwks: {}, jwks_min_refetch: 0s }}",
        path.display()
    ))
    .unwrap();
    let t1 = sign(Algorithm::ES256, &k.p256, Some("k1"), &claims());
    accepted(&*p, &t1).await;
    // Rotate: k2 appears, k1 goes.
    let k2 = {
        let g = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        PKey::from_ec_key(EcKey::generate(&g).unwrap()).unwrap()
    };
    std::fs::write(&path, jwks_doc(&[jwk(&k2, "k2", None)])).unwrap();
    let t2 = sign(Algorithm::ES256, &k2, Some("k2"), &claims());
    accepted(&*p, &t2).await;
    let m = refused(&*p, &t1).await;
    assert!(m.contains("unknown key id"), "{m}");
}

#[tokio::test]
async fn unknown_kid_refetch_is_rate_limited() {
    let d = temp_dir("jwt-minrefetch");
    let k = keys();
    let path = d.join("jwks.json");
    std::fs::write(&path, jwks_doc(&[jwk(&k.ed, "a", None)])).unwrap();
    let p = build(&format!(
        "jwt: {{ algorithms: [EdDSA], jwks: {}, jwks_min_refetch: 1h }}",
        path.display()
    ))
    .unwrap();
    // The first unknown kid refetches (and fails: still unknown)...
    refused(&*p, &sign(Algorithm::EdDSA, &k.ed, Some("b"), &claims())).await;
    // ...then the key appears, but the next refetch is not due for an hour.
    std::fs::write(
        &path,
        jwks_doc(&[jwk(&k.ed, "a", None), jwk(&k.ed, "b", None)]),
    )
    .unwrap();
    let m = refused(&*p, &sign(Algorithm::EdDSA, &k.ed, Some("b"), &claims())).await;
    assert!(m.contains("unknown key id"), "{m}");
}

#[tokio::test]
async fn jwks_from_a_url() {
    use std::io::{Read, Write};
    let k = keys();
    let doc = jwks_doc(&[jwk(&k.rsa, "r1", Some("RS256"))]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = Arc::clone(&hits);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut b = [0u8; 2048];
            let _ = s.read(&mut b);
            h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{doc}",
                doc.len()
            );
        }
    });
    let p = build(&format!(
        "jwt: {{ algorithms: [RS256], jwks: 'http://127.0.0.1:{port}/jwks.json' }}"
    ))
    .unwrap();
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "not fetched at build"
    );
    accepted(&*p, &sign(Algorithm::RS256, &k.rsa, Some("r1"), &claims())).await;
    accepted(&*p, &sign(Algorithm::RS256, &k.rsa, Some("r1"), &claims())).await;
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

#[test]
fn settings_errors() {
    let e = |y: &str| build(y).err().unwrap();
    assert!(e("jwt: { algorithms: [none], secret: s }").contains("never accepted"));
    assert!(e("jwt: { algorithms: [XX1], secret: s }").contains("unknown algorithm"));
    assert!(e("jwt: { algorithms: [], secret: s }").contains("at least one"));
    assert!(e("jwt: { algorithms: [HS256] }").contains("exactly one key source"));
    assert!(e("jwt: { algorithms: [HS256], secret: a, jwks: b }").contains("exactly one"));
    assert!(e("jwt: { algorithms: [RS256], secret: s }").contains("only verifies HS"));
    assert!(e("jwt: { algorithms: [HS256, RS256], jwks: /nope }").contains("attack"));
    assert!(e("jwt: { algorithms: [RS256, ES256], public_key: /nope }").contains("same key"));
    assert!(e("jwt: { algorithms: [RS256], public_key: /nope/x.pem }").contains("cannot read"));
    assert!(
        e("jwt: { algorithms: [HS256], secret_env: PORTICO_TEST_UNSET_VAR }").contains("not set")
    );
    assert!(
        e("jwt: { algorithms: [HS256], secret: s, cookie: a, query: b }").contains("at most one")
    );
    assert!(e("jwt: { algorithms: [HS256], secret: s, leeway: 5 }").contains("missing unit"));
    assert!(e("jwt: { algorithms: [HS256], secret: s, colour: red }").contains("unknown field"));
    assert!(e("jwt: { algorithms: [ES256], jwks: 'ftp://x' }").contains("http"));
    let d = temp_dir("jwt-settings");
    let p = write_pub(&d, "ed.pem", &keys().ed);
    assert!(e(&format!("jwt: {{ algorithms: [RS256], public_key: {p} }}")).contains("not an RSA"));
    std::fs::write(d.join("bad.json"), "{}").unwrap();
    assert!(e(&format!(
        "jwt: {{ algorithms: [RS256], jwks: {} }}",
        d.join("bad.json").display()
    ))
    .contains("keys"));
}

#[test]
fn secret_env() {
    std::env::set_var("PORTICO_TEST_JWT_SECRET", "from-env");
    let p = build("jwt: { algorithms: [HS256], secret_env: PORTICO_TEST_JWT_SECRET }").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        accepted(&*p, &hs(Algorithm::HS256, b"from-env", &claims())).await;
    });
}
