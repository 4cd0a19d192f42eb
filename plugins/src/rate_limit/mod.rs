//! The `rate_limit` plugin: GCRA (governor's generic cell rate algorithm) per key,
//! `requests` per `per` with a burst capacity of `burst` (default `requests`): one
//! request is allowed every `per / requests`, and up to `burst` at once from a full
//! bucket. The key is the client IP (default), a request header, a JWT claim, the
//! consumer set by an auth plugin, or the route; a request without the chosen key is
//! limited by its client IP instead. A refused request gets 429 with `Retry-After`;
//! every answer (accepted or not) carries `RateLimit-Limit`, `RateLimit-Remaining`
//! and `RateLimit-Reset`.
//!
//! The state lives in the instance (the gateway reuses an instance across reloads
//! while its settings are unchanged, so buckets survive), in a sharded map of 64-bit
//! key digests (SipHash with a per-instance random key) to GCRA arrival times: a
//! few dozen bytes per key whatever the key's length. Keys idle long enough to be
//! indistinguishable from a fresh bucket are dropped at most once a second, and the
//! map never holds more than `max_keys` (default 100,000): at the cap, a new key
//! evicts the emptiest of a few sampled buckets.
//!
//! With `store: redis` the bucket lives in Redis and is shared by every replica that
//! has the same config (the `redis` submodule has the script and the lease cache). The
//! Redis connection is the top-level `redis:` section, handed to the factory in its
//! [`BuildEnv`](crate::services::BuildEnv). When Redis cannot answer (down,
//! reconnecting, or slower than `redis.timeout`), `on_store_error` decides: `allow`
//! lets the request through, `deny` answers 503 with `Retry-After: 1`, and `local`
//! (the default) decides with this instance's own in-process bucket, so each replica
//! then enforces the limit on its own (N replicas admit up to N times the limit).

mod redis;

use crate::units::Dur;
use crate::{Context, Factory, Flow, Plugin, Reply, RequestView};
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: usize = 64;
/// Housekeeping (dropping idle keys) runs at most this often.
const GC_EVERY: Duration = Duration::from_secs(1);
/// How many buckets a new key looks at when the map is full.
const EVICT_SAMPLE: usize = 8;

fn default_key() -> String {
    "client_ip".into()
}
fn default_store() -> String {
    "local".into()
}
fn default_max_keys() -> usize {
    100_000
}

/// The `rate_limit` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    requests: u32,
    per: Dur,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default = "default_key")]
    key: String,
    #[serde(default = "default_store")]
    store: String,
    #[serde(default)]
    on_store_error: Option<String>,
    /// `store: redis`: most tokens leased from Redis at once for a key well under its
    /// limit (1 = ask Redis for every request).
    #[serde(default)]
    batch: Option<u32>,
    #[serde(default = "default_max_keys")]
    max_keys: usize,
}

/// What `store: redis` does when Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum OnStoreError {
    Allow,
    Deny,
    Local,
}

/// A request's key bytes, without an allocation for client addresses.
enum RawKey<'r> {
    Bytes(std::borrow::Cow<'r, [u8]>),
    V4([u8; 4]),
    V6([u8; 16]),
}

impl RawKey<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            RawKey::Bytes(b) => b,
            RawKey::V4(a) => a,
            RawKey::V6(a) => a,
        }
    }
}

/// What the shared store (or its fallback) decided.
enum Shared {
    Decided(Verdict),
    /// `on_store_error: allow`.
    Pass,
    /// `on_store_error: deny`.
    Deny,
}

/// A decision for one request.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// Admitted; `remaining` requests fit now, the bucket is full again in `reset`.
    Allow { remaining: u32, reset: Duration },
    /// Refused; one request fits in `retry`, the bucket is full again in `reset`.
    Limit { retry: Duration, reset: Duration },
}

enum Key {
    ClientIp,
    Header(http::HeaderName),
    Claim(String),
    Consumer,
    Route,
}

/// Keys are already SipHash digests: hash them as they are.
#[derive(Default)]
struct Identity(u64);
impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Shard = HashMap<u64, u64, BuildHasherDefault<Identity>>;

/// A bounded, sharded GCRA state store (key digest -> theoretical arrival time).
pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    cap_per_shard: usize,
}

impl Store {
    fn new(max_keys: usize) -> Store {
        Store {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            cap_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        // The middle bits: the map itself uses the low bits and the top seven.
        let i = ((key >> 32) as usize) % SHARDS;
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl StateStore for Store {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = self.shard(*key);
        let prev = shard.get(key).copied();
        let (t, new) = f(prev.map(Nanos::new))?;
        if prev.is_none() && shard.len() >= self.cap_per_shard {
            // Full: evict the sampled bucket closest to fresh (smallest arrival time).
            let victim = shard
                .iter()
                .take(EVICT_SAMPLE)
                .min_by_key(|(_, tat)| **tat)
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                shard.remove(&v);
            }
        }
        shard.insert(*key, new.as_u64());
        Ok(t)
    }
}

impl ShrinkableKeyedStateStore<u64> for Store {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = drop_below.as_u64();
        for s in self.shards.iter() {
            let mut s = match s.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            s.retain(|_, tat| *tat > below);
            if s.capacity() > 4 * s.len() + 64 {
                s.shrink_to_fit();
            }
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|g| g.len()).unwrap_or(0))
            .sum()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Limiter = RateLimiter<u64, Store, MonotonicClock, StateInformationMiddleware>;

/// The `rate_limit` plugin instance.
pub struct RateLimit {
    /// The shared bucket (`store: redis`).
    remote: Option<redis::Remote>,
    on_store_error: OnStoreError,
    /// Where store errors are reported (metrics).
    events: Option<Arc<dyn crate::services::Events>>,
    /// The in-process buckets (`store: local`, and `on_store_error: local`).
    limiter: Limiter,
    clock: MonotonicClock,
    key: Key,
    hasher: std::collections::hash_map::RandomState,
    burst: u32,
    interval: Duration,
    limit_value: http::HeaderValue,
    base: Instant,
    last_gc_ms: AtomicU64,
}

/// Builds [`RateLimit`] instances.
pub struct RateLimitFactory;

impl Factory for RateLimitFactory {
    fn name(&self) -> &'static str {
        "rate_limit"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        self.build_with(settings, &crate::services::BuildEnv::bare())
    }
    fn build_with(
        &self,
        settings: &serde_yaml::Value,
        env: &crate::services::BuildEnv<'_>,
    ) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(RateLimit::new(crate::settings(settings)?, env)?))
    }
}

/// The lease cache's default batch (`batch`).
const DEFAULT_BATCH: u32 = 10;
/// The longest a leased token stays good (and never longer than `per`).
const LEASE_HOLD: Duration = Duration::from_secs(1);

fn parse_key(s: &str) -> Result<Key, String> {
    Ok(match s {
        "client_ip" => Key::ClientIp,
        "consumer" => Key::Consumer,
        "route" => Key::Route,
        _ => {
            if let Some(h) = s.strip_prefix("header:") {
                Key::Header(crate::util::header_name("key", h)?)
            } else if let Some(c) = s.strip_prefix("claim:") {
                if c.is_empty() {
                    return Err("key: claim:NAME needs a claim name".into());
                }
                Key::Claim(c.to_string())
            } else {
                return Err(format!(
                    "key: {s:?} is not one of client_ip, header:NAME, claim:NAME, consumer, route"
                ));
            }
        }
    })
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl RateLimit {
    fn new(s: Settings, env: &crate::services::BuildEnv<'_>) -> Result<RateLimit, String> {
        let shared = match s.store.as_str() {
            "local" => None,
            "redis" => Some(env.services.redis.clone().ok_or(
                "store: redis needs a valid top-level `redis` section (redis: { url: redis://HOST:PORT })",
            )?),
            other => return Err(format!("store: {other:?} is not one of local, redis")),
        };
        let on_store_error = match (s.on_store_error.as_deref(), &shared) {
            (Some(o), None) => {
                return Err(format!(
                    "on_store_error: {o:?} applies to store: redis only (this limit is local)"
                ))
            }
            (None | Some("local"), _) => OnStoreError::Local,
            (Some("allow"), _) => OnStoreError::Allow,
            (Some("deny"), _) => OnStoreError::Deny,
            (Some(o), _) => {
                return Err(format!(
                    "on_store_error: {o:?} is not one of allow, deny, local"
                ))
            }
        };
        if s.batch.is_some() && shared.is_none() {
            return Err("batch: applies to store: redis only (this limit is local)".into());
        }
        let batch = s.batch.unwrap_or(DEFAULT_BATCH);
        if batch == 0 {
            return Err("batch: must be at least 1".into());
        }
        if s.requests == 0 {
            return Err("requests: must be at least 1".into());
        }
        if s.per.0.is_zero() {
            return Err("per: must be longer than 0s".into());
        }
        let burst = s.burst.unwrap_or(s.requests);
        let burst_nz = NonZeroU32::new(burst).ok_or("burst: must be at least 1")?;
        if s.max_keys == 0 {
            return Err("max_keys: must be at least 1".into());
        }
        let interval = s.per.0 / s.requests;
        let quota = Quota::with_period(interval)
            .ok_or("requests/per: more than one request per nanosecond")?
            .allow_burst(burst_nz);
        let clock = MonotonicClock;
        let limiter = RateLimiter::<u64, Store, MonotonicClock, NoOpMiddleware<Instant>>::new(
            quota,
            Store::new(s.max_keys),
            clock.clone(),
        )
        .with_middleware::<StateInformationMiddleware>();
        let remote = shared.map(|r| {
            let id = format!(
                "{}\0{}\0{}\0{}\0{}",
                env.scope,
                s.requests,
                s.per.0.as_nanos(),
                burst,
                s.key
            );
            redis::Remote::new(
                r,
                &id,
                interval,
                burst,
                batch,
                LEASE_HOLD.min(s.per.0),
                s.max_keys,
            )
        });
        Ok(RateLimit {
            remote,
            on_store_error,
            events: env.services.events.clone(),
            limiter,
            clock,
            key: parse_key(&s.key)?,
            hasher: std::collections::hash_map::RandomState::new(),
            burst,
            interval,
            limit_value: http::HeaderValue::from(burst),
            base: Instant::now(),
            last_gc_ms: AtomicU64::new(0),
        })
    }

    /// This request's key: a tag (1: the configured key, 2: the client IP fallback,
    /// a separate key space) and its bytes.
    fn raw_key<'r>(&self, req: &'r RequestView<'_>, ctx: &'r Context) -> (u8, RawKey<'r>) {
        let found: Option<std::borrow::Cow<'_, [u8]>> = match &self.key {
            Key::ClientIp => None,
            Key::Header(n) => req.headers.get(n).map(|v| v.as_bytes().into()),
            Key::Claim(c) => ctx
                .claims
                .as_ref()
                .and_then(|cl| cl.get(c))
                .and_then(|v| match v {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s.as_bytes().into()),
                    other => Some(other.to_string().into_bytes().into()),
                }),
            Key::Consumer => ctx.consumer.as_deref().map(|c| c.as_bytes().into()),
            Key::Route => Some(ctx.route.as_bytes().into()),
        };
        match found {
            Some(k) => (1, RawKey::Bytes(k)),
            None => match ctx.client_ip {
                Some(std::net::IpAddr::V4(a)) => (2, RawKey::V4(a.octets())),
                Some(std::net::IpAddr::V6(a)) => (2, RawKey::V6(a.octets())),
                None => (2, RawKey::V4([0; 4])),
            },
        }
    }

    /// The digest of a key from [`RateLimit::raw_key`].
    fn digest(&self, tag: u8, key: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u8(tag);
        h.write(key);
        h.finish()
    }

    fn housekeeping(&self) {
        let now = self.base.elapsed().as_millis() as u64 + GC_EVERY.as_millis() as u64;
        let last = self.last_gc_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < GC_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .last_gc_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.limiter.retain_recent();
            if let Some(r) = &self.remote {
                r.cache.expire(Instant::now());
            }
        }
    }

    /// Decides for one key: Ok(remaining, reset) or Err(retry_after).
    fn decide(&self, key: u64) -> Result<(u32, Duration), Duration> {
        match self.limiter.check_key(&key) {
            Ok(snap) => {
                let remaining = snap.remaining_burst_capacity().min(self.burst);
                let reset = self.interval * (self.burst - remaining);
                Ok((remaining, reset))
            }
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Decides with the in-process buckets.
    fn decide_local(&self, key: u64) -> Verdict {
        match self.decide(key) {
            Ok((remaining, reset)) => Verdict::Allow { remaining, reset },
            // Full again once the wait is over and the rest of the bucket refills.
            Err(wait) => Verdict::Limit {
                retry: wait,
                reset: wait + self.interval * (self.burst - 1),
            },
        }
    }

    /// Decides with the shared bucket, or as `on_store_error` says when Redis cannot
    /// answer: `None` lets the request through without a decision (`allow`), a `Limit`
    /// of zero means deny (`deny`).
    async fn decide_shared(
        &self,
        remote: &redis::Remote,
        digest: u64,
        tag: u8,
        raw: &[u8],
        route: &str,
    ) -> Shared {
        match remote.decide(digest, || remote.redis_key(tag, raw)).await {
            Ok(v) => Shared::Decided(v),
            Err(e) => {
                log::debug!("rate_limit: {e}; on_store_error: {:?}", self.on_store_error);
                if let Some(ev) = &self.events {
                    let fallback = match self.on_store_error {
                        OnStoreError::Allow => "allow",
                        OnStoreError::Deny => "deny",
                        OnStoreError::Local => "local",
                    };
                    ev.store_error("rate_limit", route, fallback);
                }
                match self.on_store_error {
                    OnStoreError::Allow => Shared::Pass,
                    OnStoreError::Local => Shared::Decided(self.decide_local(digest)),
                    OnStoreError::Deny => Shared::Deny,
                }
            }
        }
    }

    /// Number of keys held.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

#[async_trait::async_trait]
impl Plugin for RateLimit {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        self.housekeeping();
        let (tag, raw) = self.raw_key(req, ctx);
        let raw = raw.as_bytes();
        let digest = self.digest(tag, raw);
        let verdict = match &self.remote {
            None => self.decide_local(digest),
            Some(remote) => match self
                .decide_shared(remote, digest, tag, raw, &ctx.route)
                .await
            {
                Shared::Decided(v) => v,
                Shared::Pass => return Flow::Continue,
                Shared::Deny => {
                    return Flow::Respond(
                        Reply::error(
                            503,
                            "rate_limit_unavailable",
                            "the shared rate-limit store cannot answer",
                            ctx,
                        )
                        .with_header("retry-after", "1"),
                    )
                }
            },
        };
        let limit = (
            http::HeaderName::from_static("ratelimit-limit"),
            self.limit_value.clone(),
        );
        match verdict {
            Verdict::Allow { remaining, reset } => {
                ctx.response_headers.push(limit);
                ctx.response_headers.push((
                    http::HeaderName::from_static("ratelimit-remaining"),
                    http::HeaderValue::from(remaining),
                ));
                ctx.response_headers.push((
                    http::HeaderName::from_static("ratelimit-reset"),
                    http::HeaderValue::from(ceil_secs(reset)),
                ));
                Flow::Continue
            }
            Verdict::Limit { retry, reset } => {
                let retry = ceil_secs(retry).max(1);
                ctx.response_headers.push(limit);
                ctx.response_headers.push((
                    http::HeaderName::from_static("ratelimit-remaining"),
                    http::HeaderValue::from(0u32),
                ));
                ctx.response_headers.push((
                    http::HeaderName::from_static("ratelimit-reset"),
                    http::HeaderValue::from(ceil_secs(reset).max(retry)),
                ));
                Flow::Respond(
                    Reply::error(429, "rate_limited", "too many requests", ctx)
                        .with_header("retry-after", retry.to_string()),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn limiter(yaml: &str) -> RateLimit {
        RateLimit::new(
            crate::settings(&serde_yaml::from_str(yaml).unwrap()).unwrap(),
            &crate::services::BuildEnv::bare(),
        )
        .unwrap()
    }

    /// Services whose Redis never connects (no runtime): every call is a store error.
    fn unreachable_redis() -> (crate::services::Services, Arc<Recorded>) {
        let settings = crate::services::RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            timeout: Duration::from_millis(25),
            connect_timeout: Duration::from_millis(100),
            key_prefix: "portico:".into(),
        };
        let events = Arc::new(Recorded::default());
        let services = crate::services::Services {
            redis: Some(crate::services::SharedRedis::new(settings, None).unwrap()),
            events: Some(Arc::clone(&events) as Arc<dyn crate::services::Events>),
        };
        (services, events)
    }

    /// Records store errors as the gateway's metrics would count them.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);
    impl crate::services::Events for Recorded {
        fn store_error(&self, plugin: &'static str, route: &str, fallback: &'static str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{plugin} {route} {fallback}"));
        }
    }

    fn build_in(
        yaml: &str,
        services: &crate::services::Services,
    ) -> Result<Arc<dyn Plugin>, String> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        crate::Registry::builtin()
            .build_with(
                &v,
                &crate::services::BuildEnv {
                    scope: "r",
                    services,
                },
            )
            .map_err(|e| e.to_string())
    }

    #[test]
    fn redis_settings() {
        let none = crate::services::Services::default();
        let e = build_in("rate_limit: { requests: 1, per: 1s, store: redis }", &none)
            .err()
            .unwrap();
        assert!(
            e.contains("store: redis needs a valid top-level `redis` section"),
            "{e}"
        );
        let (redis, _) = unreachable_redis();
        assert!(build_in("rate_limit: { requests: 1, per: 1s, store: redis }", &redis).is_ok());
        for ok in ["allow", "deny", "local"] {
            let y = format!(
                "rate_limit: {{ requests: 1, per: 1s, store: redis, on_store_error: {ok}, batch: 4 }}"
            );
            assert!(build_in(&y, &redis).is_ok(), "{ok}");
        }
        let e = |y: &str| build_in(y, &redis).err().unwrap();
        assert!(
            e("rate_limit: { requests: 1, per: 1s, store: redis, on_store_error: drop }")
                .contains("not one of allow, deny, local")
        );
        assert!(
            e("rate_limit: { requests: 1, per: 1s, store: redis, batch: 0 }")
                .contains("batch: must be at least 1")
        );
        assert!(
            e("rate_limit: { requests: 1, per: 1s, on_store_error: allow }")
                .contains("store: redis only")
        );
        assert!(e("rate_limit: { requests: 1, per: 1s, batch: 3 }").contains("store: redis only"));
    }

    #[tokio::test]
    async fn on_store_error_behaviours() {
        let (redis, events) = unreachable_redis();
        let r = Req::get("/");
        // allow: through, without a decision's headers.
        let p = build_in(
            "rate_limit: { requests: 1, per: 1m, store: redis, on_store_error: allow }",
            &redis,
        )
        .unwrap();
        for _ in 0..3 {
            let mut c = ctx();
            assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));
            assert_eq!(ctx_header(&c, "ratelimit-limit"), None);
        }
        // deny: 503 with Retry-After.
        let p = build_in(
            "rate_limit: { requests: 1, per: 1m, store: redis, on_store_error: deny }",
            &redis,
        )
        .unwrap();
        let rep = reply(request(&*p, &r, &mut ctx()).await.0);
        assert_eq!(rep.status, 503);
        assert_eq!(reply_header(&rep, "retry-after"), Some("1"));
        assert!(String::from_utf8_lossy(&rep.body).contains("rate_limit_unavailable"));
        // local (the default): this process's own bucket.
        let p = build_in("rate_limit: { requests: 2, per: 1m, store: redis }", &redis).unwrap();
        for _ in 0..2 {
            let mut c = ctx();
            assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));
            assert_eq!(ctx_header(&c, "ratelimit-limit").as_deref(), Some("2"));
        }
        assert_eq!(reply(request(&*p, &r, &mut ctx()).await.0).status, 429);
        // Every store error was reported, with the fallback applied.
        let seen = events.0.lock().unwrap().clone();
        let count = |f: &str| seen.iter().filter(|s| *s == f).count();
        assert_eq!(count("rate_limit r allow"), 3, "{seen:?}");
        assert_eq!(count("rate_limit r deny"), 1, "{seen:?}");
        assert_eq!(count("rate_limit r local"), 3, "{seen:?}");
    }

    #[tokio::test]
    async fn burst_then_refill() {
        let p = build("rate_limit: { requests: 10, per: 1s, burst: 5 }").unwrap();
        let r = Req::get("/");
        for i in 0..5 {
            let mut c = ctx();
            let (f, _) = request(&*p, &r, &mut c).await;
            assert!(matches!(f, Flow::Continue), "request {i}");
            assert_eq!(ctx_header(&c, "ratelimit-limit").as_deref(), Some("5"));
            assert_eq!(
                ctx_header(&c, "ratelimit-remaining"),
                Some((4 - i).to_string())
            );
        }
        let mut c = ctx();
        let rep = reply(request(&*p, &r, &mut c).await.0);
        assert_eq!(rep.status, 429);
        assert_eq!(reply_header(&rep, "retry-after"), Some("1"));
        assert_eq!(ctx_header(&c, "ratelimit-remaining").as_deref(), Some("0"));
        assert_eq!(ctx_header(&c, "ratelimit-reset").as_deref(), Some("1"));
        // One interval later, one more fits.
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Continue
        ));
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Respond(_)
        ));
    }

    #[test]
    fn acceptance_rate_over_two_seconds() {
        // 10/s with burst 5: 100 requests spread over 2 s -> 5 + 20 accepted.
        let l = limiter("requests: 10\nper: 1s\nburst: 5");
        let start = Instant::now();
        let mut ok: i64 = 0;
        let mut last = Duration::ZERO;
        for i in 0..100u32 {
            let due = Duration::from_millis(20 * u64::from(i));
            if let Some(w) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(w);
            }
            last = start.elapsed();
            if l.decide(7).is_ok() {
                ok += 1;
            }
        }
        // The burst, plus one per 100 ms between the first and the last request.
        let expected = 5 + (last.as_millis() / 100) as i64;
        assert!((ok - expected).abs() <= 1, "{ok} accepted over {last:?}");
        if last < Duration::from_millis(2050) {
            assert!((24..=26).contains(&ok), "{ok} accepted");
        }
    }

    #[tokio::test]
    async fn keys_are_independent() {
        let p = build("rate_limit: { requests: 1, per: 1m, key: 'header:x-user' }").unwrap();
        let a = Req::get("/").header("x-user", "a");
        let b = Req::get("/").header("x-user", "b");
        assert!(matches!(
            request(&*p, &a, &mut ctx()).await.0,
            Flow::Continue
        ));
        assert!(matches!(
            request(&*p, &a, &mut ctx()).await.0,
            Flow::Respond(_)
        ));
        assert!(matches!(
            request(&*p, &b, &mut ctx()).await.0,
            Flow::Continue
        ));
        // Without the header: limited by client IP, separately from header values.
        let none = Req::get("/");
        assert!(matches!(
            request(&*p, &none, &mut ctx()).await.0,
            Flow::Continue
        ));
        let mut other_ip = ctx();
        other_ip.client_ip = Some("10.0.0.2".parse().unwrap());
        assert!(matches!(
            request(&*p, &none, &mut other_ip).await.0,
            Flow::Continue
        ));
        assert!(matches!(
            request(&*p, &none, &mut ctx()).await.0,
            Flow::Respond(_)
        ));

        // Client IPs.
        let p = build("rate_limit: { requests: 1, per: 1m }").unwrap();
        let mut c1 = ctx();
        let mut c2 = ctx();
        c2.client_ip = Some("::1".parse().unwrap());
        assert!(matches!(
            request(&*p, &none, &mut c1).await.0,
            Flow::Continue
        ));
        assert!(matches!(
            request(&*p, &none, &mut c2).await.0,
            Flow::Continue
        ));
        assert!(matches!(
            request(&*p, &none, &mut ctx()).await.0,
            Flow::Respond(_)
        ));
    }

    #[tokio::test]
    async fn claim_consumer_and_route_keys() {
        let p = build("rate_limit: { requests: 1, per: 1m, key: 'claim:sub' }").unwrap();
        let r = Req::get("/");
        let mut c = ctx();
        c.claims = Some(serde_json::json!({"sub": "u1"}));
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));
        let mut c = ctx();
        c.claims = Some(serde_json::json!({"sub": "u1"}));
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Respond(_)));
        let mut c = ctx();
        c.claims = Some(serde_json::json!({"sub": "u2"}));
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));

        let p = build("rate_limit: { requests: 1, per: 1m, key: consumer }").unwrap();
        let mut c = ctx();
        c.consumer = Some("x".into());
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));
        let mut c = ctx();
        c.consumer = Some("y".into());
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));

        let p = build("rate_limit: { requests: 1, per: 1m, key: route }").unwrap();
        let mut c = ctx();
        c.client_ip = Some("10.9.9.9".parse().unwrap());
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Respond(_)
        ));
    }

    #[test]
    fn memory_is_bounded() {
        let l = limiter("requests: 1\nper: 1h\nmax_keys: 1000");
        for k in 0..50_000u64 {
            let _ = l.decide(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        assert!(l.keys() <= 1000 + SHARDS, "{} keys", l.keys());
        // Idle keys go away: with 100/s, a bucket is fresh again after 10 ms.
        let l = limiter("requests: 100\nper: 1s\nburst: 1");
        for k in 0..10_000u64 {
            let _ = l.decide(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        assert_eq!(l.keys(), 10_000);
        std::thread::sleep(Duration::from_millis(20));
        l.limiter.retain_recent();
        assert_eq!(l.keys(), 0);
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("rate_limit: { per: 1s }").contains("requests"));
        assert!(e("rate_limit: { requests: 0, per: 1s }").contains("at least 1"));
        assert!(e("rate_limit: { requests: 1, per: 0s }").contains("longer"));
        assert!(e("rate_limit: { requests: 1, per: 1s, burst: 0 }").contains("burst"));
        assert!(e("rate_limit: { requests: 1, per: 1s, key: ip }").contains("not one of"));
        assert!(e("rate_limit: { requests: 1, per: 1s, store: redis }").contains("top-level"));
        assert!(
            e("rate_limit: { requests: 1, per: 1s, on_store_error: allow }")
                .contains("store: redis")
        );
        assert!(e("rate_limit: { requests: 1, per: 1s, store: memcache }").contains("local, redis"));
        assert!(e("rate_limit: { requests: 1, per: 1 }").contains("missing unit"));
    }
}
