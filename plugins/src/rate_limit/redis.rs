//! `store: redis`: one GCRA bucket per key in Redis, shared by every replica, and a
//! small per-replica lease cache that keeps Redis off the hot path.
//!
//! **The bucket.** A Lua script (run with EVALSHA, and EVAL when Redis answers
//! NOSCRIPT, e.g. after a restart) keeps the key's theoretical arrival time (TAT, in
//! microseconds of Redis's own clock, so replicas' clocks never matter) and does the
//! whole decision atomically: with emission interval `T = per / requests` and room for
//! `burst` requests, it grants up to `want` tokens out of those available, moves the TAT
//! by `T` per token, and sets the key to expire (PEXPIRE) when the bucket is full again,
//! so idle keys cost nothing. It answers granted, remaining, retry-after and reset.
//!
//! **The cache is a lease, never a guess.** A key that Redis reports as clearly under
//! its limit gets several tokens at once: the replica asks for
//! `clamp(remaining / 8, 1, batch)` tokens, Redis charges them all in the shared bucket,
//! and the replica hands the spare ones to the key's next requests without asking
//! Redis. Tokens are charged before they are used, so the replicas together can never
//! admit more than the shared bucket allows at the moment of charging; as the bucket
//! empties the asks shrink to one token, so the tokens held back by other replicas near
//! the limit stay few (at most `remaining / 8` each). A lease is good for
//! `min(1s, per)`: a token charged but not used by then is dropped (that replica admits
//! a little less, never more), which bounds how much later than its charge a token can
//! be spent. A refusal is cached too, until its `Retry-After`: other replicas can only
//! push a bucket's TAT further out, never bring it closer, so until then Redis would say
//! no as well. So a key far under its limit costs one Redis call per `batch` requests,
//! a key over its limit costs one per retry period, and the shared total stays exact up
//! to the tokens a replica leases and does not use in time.
//!
//! The cache is bounded like the local store (`max_keys`, expired entries dropped at
//! most once a second).

use super::Verdict;
use crate::services::{SharedRedis, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The GCRA script. KEYS[1]: the bucket. ARGV: emission interval (us), burst, want.
/// Returns {granted, remaining, retry_after_us, reset_us}.
pub(super) const GCRA_LUA: &str = r#"
-- Redis before 5 replicates scripts verbatim unless told otherwise (TIME is not
-- deterministic); later versions always replicate the effects (a no-op there).
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tau = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then tat = now end
local avail = math.floor((tau - (tat - now)) / interval + 1e-9)
if avail < 1 then
  return {0, 0, math.ceil(tat + interval - tau - now), math.ceil(tat - now)}
end
local granted = math.min(want, avail)
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.3f', tat))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((tat - now) / 1000)))
return {granted, avail - granted, 0, math.ceil(tat - now)}
"#;

const SHARDS: usize = 16;
/// The largest lease is `remaining / ASK_DIVISOR` tokens (and at most `batch`).
const ASK_DIVISOR: u32 = 8;

/// One key's cached state on this replica.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Tokens charged in Redis and not used yet.
    tokens: u32,
    /// The tokens are good until then.
    until: Instant,
    /// The bucket's remaining tokens when Redis last answered (not counting `tokens`).
    remaining: u32,
    /// When the bucket is full again, as of Redis's last answer.
    full_at: Instant,
    /// Refused until then (Redis said so).
    blocked_until: Option<Instant>,
}

/// The per-replica lease cache (key digest -> [`Entry`]).
pub(super) struct LeaseCache {
    shards: Box<[Mutex<HashMap<u64, Entry>>]>,
    cap_per_shard: usize,
    batch: u32,
    hold: Duration,
}

/// What the cache says about a request before Redis is asked.
#[derive(Debug, PartialEq)]
pub(super) enum Cached {
    /// Decided locally.
    Hit(Verdict),
    /// Ask Redis for this many tokens.
    Ask(u32),
}

impl LeaseCache {
    pub(super) fn new(max_keys: usize, batch: u32, hold: Duration) -> LeaseCache {
        LeaseCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            cap_per_shard: max_keys.div_ceil(SHARDS).max(1),
            batch: batch.max(1),
            hold,
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        let i = ((key >> 40) as usize) % SHARDS;
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Takes a leased token, repeats a cached refusal, or says how many tokens to ask
    /// Redis for.
    pub(super) fn check(&self, key: u64, now: Instant) -> Cached {
        let mut s = self.shard(key);
        let Some(e) = s.get_mut(&key) else {
            return Cached::Ask(1);
        };
        // Leased tokens first: they are already paid for in the shared bucket.
        if e.tokens > 0 && e.until > now {
            e.tokens -= 1;
            return Cached::Hit(Verdict::Allow {
                remaining: e.remaining + e.tokens,
                reset: e.full_at.saturating_duration_since(now),
            });
        }
        if let Some(b) = e.blocked_until {
            if b > now {
                return Cached::Hit(Verdict::Limit {
                    retry: b - now,
                    reset: e.full_at.saturating_duration_since(now),
                });
            }
        }
        Cached::Ask((e.remaining / ASK_DIVISOR).clamp(1, self.batch))
    }

    /// Records Redis's answer (`granted` tokens, one of which this request uses) and
    /// returns the request's verdict.
    pub(super) fn record(&self, key: u64, now: Instant, a: &Answer) -> Verdict {
        let full_at = now + a.reset;
        let mut s = self.shard(key);
        if !s.contains_key(&key) && s.len() >= self.cap_per_shard {
            // Full: drop expired entries, else any one (losing at most its lease).
            s.retain(|_, e| e.until > now || e.blocked_until.is_some_and(|b| b > now));
            if s.len() >= self.cap_per_shard {
                if let Some(k) = s.keys().next().copied() {
                    s.remove(&k);
                }
            }
        }
        // Unused tokens of a lease still good are kept: concurrent asks of this replica
        // add up, and a refusal does not throw away what a concurrent grant leased.
        let prev = s
            .get(&key)
            .copied()
            .filter(|e| e.until > now && e.tokens > 0);
        let kept = prev.map_or(0, |e| e.tokens);
        if a.granted == 0 {
            let mut e = Entry {
                tokens: kept,
                until: prev.map_or(now, |e| e.until),
                remaining: 0,
                full_at,
                blocked_until: Some(now + a.retry),
            };
            let verdict = if e.tokens > 0 {
                // Redis said no, but a concurrent grant left a token here.
                e.tokens -= 1;
                Verdict::Allow {
                    remaining: e.tokens,
                    reset: a.reset,
                }
            } else {
                Verdict::Limit {
                    retry: a.retry,
                    reset: a.reset,
                }
            };
            s.insert(key, e);
            return verdict;
        }
        let tokens = kept + a.granted - 1;
        s.insert(
            key,
            Entry {
                tokens,
                // Kept tokens keep their own deadline: none is spent later than `hold`
                // after Redis granted it.
                until: prev.map_or(now + self.hold, |e| e.until.min(now + self.hold)),
                remaining: a.remaining,
                full_at,
                blocked_until: None,
            },
        );
        Verdict::Allow {
            remaining: a.remaining + tokens,
            reset: a.reset,
        }
    }

    /// Drops entries with nothing left to say.
    pub(super) fn expire(&self, now: Instant) {
        for s in self.shards.iter() {
            let mut s = match s.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            s.retain(|_, e| {
                (e.tokens > 0 && e.until > now) || e.blocked_until.is_some_and(|b| b > now)
            });
            if s.capacity() > 4 * s.len() + 64 {
                s.shrink_to_fit();
            }
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|g| g.len()).unwrap_or(0))
            .sum()
    }
}

/// The script's answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Answer {
    pub granted: u32,
    pub remaining: u32,
    pub retry: Duration,
    pub reset: Duration,
}

impl Answer {
    fn from_reply(v: &[i64]) -> Result<Answer, StoreError> {
        let [g, r, retry, reset] = v else {
            return Err(StoreError::Failed(format!(
                "the rate-limit script answered {} values, expected 4",
                v.len()
            )));
        };
        let us = |x: i64| Duration::from_micros(x.max(0) as u64);
        Ok(Answer {
            granted: (*g).clamp(0, i64::from(u32::MAX)) as u32,
            remaining: (*r).clamp(0, i64::from(u32::MAX)) as u32,
            retry: us(*retry),
            reset: us(*reset),
        })
    }
}

/// The Redis side of one `rate_limit` instance.
pub(super) struct Remote {
    redis: Arc<SharedRedis>,
    script: redis::Script,
    /// `<key_prefix>rl:<limit digest>:`; the key's digest follows.
    key_base: String,
    interval_us: String,
    burst: String,
    pub(super) cache: LeaseCache,
}

impl Remote {
    /// `limit_id` names the limit (its scope and settings), so that two limits never
    /// share a bucket while every replica with the same config uses the same one.
    pub(super) fn new(
        redis: Arc<SharedRedis>,
        limit_id: &str,
        interval: Duration,
        burst: u32,
        batch: u32,
        hold: Duration,
        max_keys: usize,
    ) -> Remote {
        let key_base = format!(
            "{}rl:{}:",
            redis.settings().key_prefix,
            hex(&openssl::sha::sha256(limit_id.as_bytes())[..8])
        );
        Remote {
            redis,
            script: redis::Script::new(GCRA_LUA),
            key_base,
            interval_us: format!("{:.3}", interval.as_nanos() as f64 / 1000.0),
            burst: burst.to_string(),
            cache: LeaseCache::new(max_keys, batch, hold),
        }
    }

    /// The Redis key for a request key (`tag` separates the key kinds).
    pub(super) fn redis_key(&self, tag: u8, key: &[u8]) -> String {
        let mut h = openssl::sha::Sha256::new();
        h.update(&[tag]);
        h.update(key);
        let d = h.finish();
        let mut k = String::with_capacity(self.key_base.len() + 32);
        k.push_str(&self.key_base);
        k.push_str(&hex(&d[..16]));
        k
    }

    /// Decides one request: from the cache when it can, else with Redis.
    pub(super) async fn decide(
        &self,
        digest: u64,
        redis_key: impl FnOnce() -> String,
    ) -> Result<Verdict, StoreError> {
        let now = Instant::now();
        let want = match self.cache.check(digest, now) {
            Cached::Hit(v) => return Ok(v),
            Cached::Ask(n) => n,
        };
        let key = redis_key();
        let reply: Vec<i64> = self
            .redis
            .eval(
                &self.script,
                GCRA_LUA,
                &[key.as_str()],
                &[
                    self.interval_us.clone(),
                    self.burst.clone(),
                    want.to_string(),
                ],
            )
            .await?;
        let a = Answer::from_reply(&reply)?;
        Ok(self.cache.record(digest, Instant::now(), &a))
    }
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ans(granted: u32, remaining: u32, retry_ms: u64, reset_ms: u64) -> Answer {
        Answer {
            granted,
            remaining,
            retry: Duration::from_millis(retry_ms),
            reset: Duration::from_millis(reset_ms),
        }
    }

    #[test]
    fn asks_grow_with_headroom_and_shrink_near_the_limit() {
        let c = LeaseCache::new(1000, 10, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(c.check(1, t), Cached::Ask(1), "unknown key: one token");
        // Redis: 1 granted, 99 left -> next ask is capped by the batch.
        assert_eq!(
            c.record(1, t, &ans(1, 99, 0, 100)),
            Verdict::Allow {
                remaining: 99,
                reset: Duration::from_millis(100)
            }
        );
        assert_eq!(c.check(1, t), Cached::Ask(10));
        // 10 granted: this request uses one, nine are leased.
        c.record(1, t, &ans(10, 40, 0, 6000));
        for i in 0..9 {
            match c.check(1, t) {
                Cached::Hit(Verdict::Allow { remaining, .. }) => assert_eq!(remaining, 40 + 8 - i),
                other => panic!("token {i}: {other:?}"),
            }
        }
        // Lease used up: 40 left in Redis -> ask 40/8 = 5.
        assert_eq!(c.check(1, t), Cached::Ask(5));
        c.record(1, t, &ans(1, 7, 0, 9000));
        assert_eq!(
            c.check(1, t),
            Cached::Ask(1),
            "near the limit: one at a time"
        );
    }

    #[test]
    fn leases_expire_and_refusals_are_cached_until_retry_after() {
        let c = LeaseCache::new(1000, 10, Duration::from_millis(500));
        let t = Instant::now();
        c.record(7, t, &ans(5, 90, 0, 1000));
        assert!(matches!(c.check(7, t), Cached::Hit(Verdict::Allow { .. })));
        // Past the hold: the three left are dropped, Redis is asked again.
        assert_eq!(c.check(7, t + Duration::from_millis(600)), Cached::Ask(10));
        c.record(8, t, &ans(0, 0, 300, 10_000));
        match c.check(8, t + Duration::from_millis(100)) {
            Cached::Hit(Verdict::Limit { retry, reset }) => {
                assert_eq!(retry, Duration::from_millis(200));
                assert_eq!(reset, Duration::from_millis(9900));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.check(8, t + Duration::from_millis(300)), Cached::Ask(1));
        c.expire(t + Duration::from_secs(2));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn concurrent_grants_add_up() {
        let c = LeaseCache::new(1000, 10, Duration::from_secs(1));
        let t = Instant::now();
        c.record(3, t, &ans(4, 80, 0, 1000));
        c.record(3, t, &ans(4, 76, 0, 1000));
        let mut hits = 0;
        while let Cached::Hit(_) = c.check(3, t) {
            hits += 1;
        }
        assert_eq!(hits, 6, "3 spare tokens from each grant");
    }

    #[test]
    fn a_refusal_keeps_tokens_a_concurrent_grant_leased() {
        let c = LeaseCache::new(1000, 10, Duration::from_secs(1));
        let t = Instant::now();
        // Two asks in flight at once: one is granted 5, the other refused.
        c.record(4, t, &ans(5, 0, 0, 9000));
        assert_eq!(
            c.record(4, t, &ans(0, 0, 100, 9000)),
            Verdict::Allow {
                remaining: 3,
                reset: Duration::from_millis(9000)
            },
            "the refused request takes a leased token"
        );
        let mut hits = 0;
        while let Cached::Hit(Verdict::Allow { .. }) = c.check(4, t) {
            hits += 1;
        }
        assert_eq!(
            hits, 3,
            "the rest of the lease is used before the refusal applies"
        );
        assert!(matches!(c.check(4, t), Cached::Hit(Verdict::Limit { .. })));
    }

    #[test]
    fn cache_is_bounded() {
        let c = LeaseCache::new(64, 10, Duration::from_secs(1));
        let t = Instant::now();
        for k in 0..10_000u64 {
            c.record(
                k.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                t,
                &ans(3, 50, 0, 100),
            );
        }
        assert!(c.len() <= 64, "{}", c.len());
    }

    #[test]
    fn answers_are_checked() {
        assert!(Answer::from_reply(&[1, 2, 3]).is_err());
        assert_eq!(
            Answer::from_reply(&[2, 5, -1, 1500]).unwrap(),
            ans(2, 5, 0, 1)
                .clone()
                .tap(|a| a.reset = Duration::from_micros(1500))
        );
    }

    use crate::services::testredis::RedisServer;

    fn remote(
        r: Arc<SharedRedis>,
        id: &str,
        per_token: Duration,
        burst: u32,
        batch: u32,
    ) -> Remote {
        Remote::new(r, id, per_token, burst, batch, Duration::from_secs(1), 1000)
    }

    async fn redis_int(r: &Arc<SharedRedis>, args: &[&str]) -> i64 {
        let mut c = ::redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        r.query::<i64>(&c).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gcra_in_redis_burst_refusal_expiry_and_noscript() {
        let server = RedisServer::start();
        let r = server.connect().await;
        // 5 per second, burst 5, no lease (batch 1): every decision is Redis's.
        let rem = remote(Arc::clone(&r), "t1", Duration::from_millis(200), 5, 1);
        let key = rem.redis_key(1, b"alice");
        for i in 0..5 {
            match rem.decide(1, || key.clone()).await.unwrap() {
                Verdict::Allow { remaining, .. } => assert_eq!(remaining, 4 - i),
                v => panic!("request {i}: {v:?}"),
            }
        }
        let started = Instant::now();
        match rem.decide(1, || key.clone()).await.unwrap() {
            Verdict::Limit { retry, reset } => {
                assert!(retry <= Duration::from_millis(200), "{retry:?}");
                assert!(retry >= Duration::from_millis(100), "{retry:?}");
                assert!(reset > Duration::from_millis(900), "{reset:?}");
            }
            v => panic!("sixth: {v:?}"),
        }
        // The key expires when the bucket is full again (about 1 s from now).
        let pttl = redis_int(&r, &["PTTL", &key]).await;
        assert!((800..=1000).contains(&pttl), "pttl {pttl}");
        // The refusal is cached until Retry-After: no Redis call is needed.
        assert!(matches!(
            rem.cache.check(1, Instant::now()),
            Cached::Hit(Verdict::Limit { .. })
        ));
        // After the retry time, one more fits.
        tokio::time::sleep(Duration::from_millis(220).saturating_sub(started.elapsed())).await;
        assert!(matches!(
            rem.decide(1, || key.clone()).await.unwrap(),
            Verdict::Allow { .. }
        ));
        // A Redis without the script (restart, SCRIPT FLUSH): EVALSHA fails with
        // NOSCRIPT and the call is retried with EVAL.
        let mut flush = ::redis::cmd("SCRIPT");
        flush.arg("FLUSH");
        r.query::<()>(&flush).await.unwrap();
        let other = rem.redis_key(1, b"bob");
        assert!(matches!(
            rem.decide(2, || other.clone()).await.unwrap(),
            Verdict::Allow { remaining: 4, .. }
        ));
        assert_eq!(r.errors(), 0, "NOSCRIPT is not a store error");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn script_grants_at_most_what_is_available() {
        let server = RedisServer::start();
        let r = server.connect().await;
        let script = ::redis::Script::new(GCRA_LUA);
        let call = |want: u32| {
            let r = Arc::clone(&r);
            let script = script.clone();
            async move {
                r.eval::<Vec<i64>>(
                    &script,
                    GCRA_LUA,
                    &["k"],
                    &["1000000.000".into(), "4".into(), want.to_string()],
                )
                .await
                .unwrap()
            }
        };
        // 1 per second, burst 4.
        let a = call(3).await;
        assert_eq!(&a[..3], &[3, 1, 0]);
        assert!((2_900_000..=3_000_000).contains(&a[3]), "{a:?}");
        let b = call(3).await;
        assert_eq!(&b[..3], &[1, 0, 0], "only one left");
        let c = call(1).await;
        assert_eq!(&c[..2], &[0, 0]);
        assert!((900_000..=1_000_000).contains(&c[2]), "retry {c:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_share_one_bucket_exactly() {
        let server = RedisServer::start();
        // Two connections, as two gateway processes would have; no refill to speak of.
        let (a, b) = (server.connect().await, server.connect().await);
        let per_token = Duration::from_secs(36);
        let ra = remote(a, "shared", per_token, 100, 10);
        let rb = remote(b, "shared", per_token, 100, 10);
        let key = ra.redis_key(1, b"route");
        assert_eq!(key, rb.redis_key(1, b"route"), "same key on every replica");
        let mut admitted = 0;
        for i in 0..300u32 {
            let rem = if i % 3 == 0 { &rb } else { &ra };
            if let Verdict::Allow { .. } = rem.decide(9, || key.clone()).await.unwrap() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 100);
        // The leases kept most decisions off Redis.
        let mut info = ::redis::cmd("INFO");
        info.arg("commandstats");
        let stats: String = ra.redis.query(&info).await.unwrap();
        let calls: u32 = stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(calls < 60, "{calls} script calls for 300 decisions");
        eprintln!("two replicas: {admitted} admitted of 300 with {calls} script calls");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_down_fails_fast_and_reconnects() {
        let mut server = RedisServer::start();
        let r = server.connect().await;
        let rem = remote(Arc::clone(&r), "t3", Duration::from_millis(10), 100, 1);
        let key = rem.redis_key(1, b"k");
        assert!(rem.decide(1, || key.clone()).await.is_ok());
        server.kill();
        let t = Instant::now();
        assert!(rem.decide(1, || key.clone()).await.is_err());
        // Now known down: the next call does not even try.
        assert_eq!(rem.decide(1, || key.clone()).await, Err(StoreError::Down));
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        server.restart();
        assert!(crate::services::wait_up(&r, Duration::from_secs(8)).await);
        assert!(rem.decide(1, || key.clone()).await.is_ok());
        assert!(r.errors() >= 2);
    }

    trait Tap: Sized {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
    impl Tap for Answer {}
}
