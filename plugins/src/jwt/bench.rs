//! A micro-benchmark of the `jwt` plugin's verification path, ignored by default.
//! Run it with a release build:
//!
//! ```sh
//! cargo test --release -p portico-plugins -- --ignored jwt_bench --nocapture
//! ```
//!
//! For HS256 (a 32-byte secret), RS256 (a 2048-bit key from a PEM file) and ES256
//! (P-256, for reference) it times, on a realistic token (issuer, audience, expiry,
//! subject, scopes, about 400 bytes for HS256), 100,000 calls of
//! [`Jwt::verify`](super::Jwt::verify) (header parse, algorithm and key checks,
//! signature, claims validation, required claims) and, for HS256 and RS256, of the
//! whole `on_request` hook (token extraction from `Authorization: Bearer`, verify,
//! claims and consumer into the context). Each measurement is repeated
//! [`RUNS`] times; one line per measurement is printed:
//! `jwt_bench: NAME: MEDIAN ns/op (min MIN, max MAX) over RUNS runs of ITERS`.
//! Targets (issue 4): HS256 < 5 µs, RS256 < 40 µs per request.

use super::*;
use crate::testutil::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use serde_json::json;
use std::hint::black_box;
use std::time::Instant;

/// Calls per run.
const ITERS: u32 = 100_000;
/// Runs per measurement (the median is reported).
const RUNS: usize = 5;

fn claims() -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "iss": "portico-bench", "aud": "portico-api", "sub": "user-4711",
        "iat": now, "nbf": now - 60, "exp": now + 86_400,
        "name": "Bench User", "email": "bench.user@example.com",
        "scope": "orders:read orders:write profile:read",
        "jti": "b3f1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
    })
}

/// Runs `f` `ITERS` times per run, `RUNS` runs; prints and returns the median ns/op.
fn measure(name: &str, mut f: impl FnMut()) -> f64 {
    // Warm-up: caches, lazy initialisation, CPU frequency.
    for _ in 0..ITERS / 10 {
        f();
    }
    let mut per_op: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..ITERS {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(ITERS)
        })
        .collect();
    per_op.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = per_op[RUNS / 2];
    println!(
        "jwt_bench: {name}: {median:.0} ns/op (min {:.0}, max {:.0}) over {RUNS} runs of {ITERS}",
        per_op[0],
        per_op[RUNS - 1]
    );
    median
}

fn jwt(yaml: &str) -> Jwt {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    Jwt::new(crate::settings(&v).unwrap()).unwrap()
}

#[test]
#[ignore = "micro-benchmark; run with --release -- --ignored jwt_bench --nocapture"]
fn jwt_bench() {
    if cfg!(debug_assertions) {
        println!(
            "jwt_bench: warning: a debug build; use `cargo test --release` for meaningful numbers"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir("jwt-bench");
    let c = claims();
    let common = "issuer: portico-bench, audience: portico-api, required_claims: [exp, sub]";

    // HS256
    let secret = "Zk3q9v2LwX8pR4tY7uB1nM6cE0hJ5sDa"; // 32 bytes
    let hs_token = encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let hs = jwt(&format!(
        "{{ algorithms: [HS256], secret: {secret}, {common} }}"
    ));

    // RS256, 2048-bit key from a PEM file
    let rsa = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let rs_pub = dir.join("rs256.pub.pem");
    std::fs::write(&rs_pub, rsa.public_key_to_pem().unwrap()).unwrap();
    let rs_token = encode(
        &Header::new(Algorithm::RS256),
        &c,
        &EncodingKey::from_rsa_pem(&rsa.private_key_to_pem_pkcs8().unwrap()).unwrap(),
    )
    .unwrap();
    let rs = jwt(&format!(
        "{{ algorithms: [RS256], public_key: {}, {common} }}",
        rs_pub.display()
    ));

    // ES256 (P-256), for reference
    let ec = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
    )
    .unwrap();
    let es_pub = dir.join("es256.pub.pem");
    std::fs::write(&es_pub, ec.public_key_to_pem().unwrap()).unwrap();
    let es_token = encode(
        &Header::new(Algorithm::ES256),
        &c,
        &EncodingKey::from_ec_pem(&ec.private_key_to_pem_pkcs8().unwrap()).unwrap(),
    )
    .unwrap();
    let es = jwt(&format!(
        "{{ algorithms: [ES256], public_key: {}, {common} }}",
        es_pub.display()
    ));

    println!(
        "jwt_bench: token sizes: HS256 {} bytes, RS256 {} bytes, ES256 {} bytes",
        hs_token.len(),
        rs_token.len(),
        es_token.len()
    );

    // Sanity: every token verifies, a tampered one does not.
    rt.block_on(async {
        for (p, t) in [(&hs, &hs_token), (&rs, &rs_token), (&es, &es_token)] {
            let cl = p.verify(t).await.unwrap();
            assert_eq!(cl["sub"], "user-4711");
        }
        let mut bad = hs_token.clone();
        bad.pop();
        bad.push(if hs_token.ends_with('A') { 'B' } else { 'A' });
        assert!(hs.verify(&bad).await.is_err());
    });

    // verify(): the path every request with a token takes. It never waits for a
    // static key, so each call is polled once, by hand (no runtime in the loop).
    let verify = |name: &str, p: &Jwt, token: &str| {
        measure(name, || {
            let r = futures_ready(p.verify(black_box(token)));
            black_box(r.unwrap());
        })
    };
    let hs_ns = verify("HS256.verify", &hs, &hs_token);
    let rs_ns = verify("RS256.verify", &rs, &rs_token);
    verify("ES256.verify", &es, &es_token);

    // on_request(): the whole plugin hook as the gateway calls it.
    let on_request = |name: &str, p: &Jwt, token: &str| {
        let r = Req::get("/json/plugins").header("authorization", &format!("Bearer {token}"));
        let mut cx = ctx();
        measure(name, || {
            let (flow, edits) = futures_ready(request(p, black_box(&r), &mut cx));
            assert!(matches!(flow, Flow::Continue));
            black_box(edits);
        })
    };
    on_request("HS256.on_request", &hs, &hs_token);
    on_request("RS256.on_request", &rs, &rs_token);

    println!(
        "jwt_bench: targets: HS256 verify {hs_ns:.0} ns < 5000 ns: {}; RS256 verify {rs_ns:.0} ns < 40000 ns: {}",
        if hs_ns < 5000.0 { "met" } else { "NOT met" },
        if rs_ns < 40000.0 { "met" } else { "NOT met" }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls a future that is ready at once (no I/O, no timer: `verify` with a static
/// key, `on_request` of this plugin); panics if it is not.
fn futures_ready<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context as TaskContext, Poll, RawWaker, RawWakerVTable, Waker};
    fn noop(_: *const ()) {}
    fn clone(p: *const ()) -> RawWaker {
        RawWaker::new(p, &VTABLE)
    }
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, noop, noop, noop);
    // SAFETY: the vtable's functions do nothing with the (null) data pointer.
    let waker = unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) };
    let mut cx = TaskContext::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the future was not ready at once"),
    }
}
