//! The `cache` plugin: an in-memory HTTP cache for GET/HEAD responses on the same
//! principles as Pingora's cache (a shared cache in the sense of RFC 9111), with
//! request coalescing and S3-FIFO eviction in a byte budget.
//!
//! - **Key**: route, `Host`, path and query (method-independent: a HEAD is answered
//!   from a GET's entry; a request without `Host` is not cached), plus, per variant, the values of the request headers the
//!   response's `Vary` names (up to 16 variants per key; `Vary: *` is not stored).
//! - **Stored**: answers to GET with status 200, 203, 204, 300, 301, 404 or 410 and
//!   a freshness lifetime (`s-maxage`, else `max-age`, else `Expires` − `Date`, else
//!   `ttl`; `ttl: 0s` stores only responses that state one), minus the `Age` they
//!   arrived with. Not stored: `no-store`, `private`, `no-cache` (it would need a
//!   revalidation before every use), `Set-Cookie` unless `public` (and then stored
//!   without it), answers to requests with `Authorization` unless `public`,
//!   `s-maxage` or `must-revalidate`, and objects larger than `max_object_size`
//!   (default `max_size / 8`). What is stored is the response as this plugin sees it:
//!   after the edits and body filters of the plugins listed before it (so put
//!   `compression` before `cache` to store compressed variants), without hop-by-hop
//!   fields, `Content-Length`, `Age`, `x-request-id` and `x-cache`.
//! - **Requests**: `Cache-Control: no-store` bypasses the cache; `no-cache`,
//!   `max-age=0` (or `Pragma: no-cache`) goes upstream and stores the answer. Other
//!   methods bypass it, and unsafe ones (POST, PUT, PATCH, DELETE, ...) invalidate the
//!   key's entries. Every answer carries `x-cache`: `HIT`, `MISS`, `STALE` (served
//!   past its freshness within the `stale-while-revalidate` window) or `BYPASS`.
//! - **Hits** are answered by the plugin itself, with the stored status, fields and
//!   body, `Age` and `x-cache: HIT`; plugins listed after `cache` do not run for them
//!   (list authentication and rate limiting before it).
//! - **Coalescing**: of concurrent misses for a key, the first goes upstream; the
//!   others wait (up to `lock_timeout`) until its answer is stored and are then
//!   served from the cache, or go upstream themselves when it was not cacheable.
//!   Requests with `Range` or conditional fields never fill the cache for others.
//! - **Stale while revalidate**: an entry past its freshness but within its window
//!   (the response's `stale-while-revalidate`, else the setting; none with
//!   `must-revalidate`) sends one request upstream to refresh it while concurrent
//!   ones get the stale copy. The plugin has no client of its own, so the refreshing
//!   request is a client's.
//! - **Purge**: [`Plugin::purge`] drops entries by path prefix (or all).
//!
//! Per-request state (the key being filled and the coalescing lock) is kept in the
//! instance, keyed by the address of the request's [`Context`] (which the gateway
//! boxes for the request's whole life) checked against its request id; each request
//! clears its slot when it starts, and `on_log` clears it at the end.

mod lock;
mod policy;
mod store;

use crate::units::{Dur, Size};
use crate::{
    BodyFilter, Context, Factory, Flow, HeaderEdits, Plugin, Reply, RequestView, ResponseView,
};
use bytes::Bytes;
use lock::{Acquired, Guard, Locks, Outcome};
use policy::{Candidate, RequestMode};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use store::{Entry, State, Store};

/// How many times a waiting request looks again after its leader finished (all within
/// one `lock_timeout`).
const MAX_ROUNDS: usize = 4;

fn default_ttl() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_max_size() -> Size {
    Size(64 << 20)
}
fn default_lock_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

/// The `cache` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_ttl")]
    ttl: Dur,
    #[serde(default = "default_max_size")]
    max_size: Size,
    #[serde(default)]
    max_object_size: Option<Size>,
    #[serde(default)]
    stale_while_revalidate: Dur,
    #[serde(default = "default_lock_timeout")]
    lock_timeout: Dur,
}

/// What the instance, its body filters and its locks share.
struct Shared {
    store: Mutex<Store>,
    locks: Arc<Locks>,
    lock_timeout: Duration,
    max_object: usize,
    ttl: Duration,
    swr: Duration,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        match self.store.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A request between `on_request` and `on_response`/`on_log`.
struct Pending {
    request_id: String,
    key: String,
    path: String,
    /// Set when this request leads a fill others wait for.
    guard: Option<Guard>,
}

/// The `cache` plugin instance.
pub struct Cache {
    shared: Arc<Shared>,
    pending: Mutex<HashMap<usize, Pending>>,
}

/// Builds [`Cache`] instances.
pub struct CacheFactory;

impl Factory for CacheFactory {
    fn name(&self) -> &'static str {
        "cache"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(Cache::new(crate::settings(settings)?)?))
    }
}

/// The request's slot in the pending map.
fn token(ctx: &Context) -> usize {
    (ctx as *const Context).addr()
}

fn label(ctx: &mut Context, value: &'static str) {
    let name = http::HeaderName::from_static("x-cache");
    ctx.response_headers.retain(|(k, _)| *k != name);
    ctx.response_headers
        .push((name, http::HeaderValue::from_static(value)));
}

/// The primary key: route, host, path and query; `None` without a `Host` field (the
/// plugin cannot tell which site the request is for, so it is not cached).
fn primary_key(route: &str, req: &RequestView<'_>) -> Option<String> {
    let host = req
        .headers
        .get(http::header::HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .filter(|h| !h.is_empty())?;
    let mut k = String::with_capacity(route.len() + host.len() + req.path.len() + 8);
    k.push_str(route);
    k.push('\n');
    k.push_str(&host);
    k.push('\n');
    k.push_str(req.path);
    if let Some(q) = req.query {
        k.push('?');
        k.push_str(q);
    }
    Some(k)
}

/// Whether the request asks for part of a response or a conditional answer, which
/// may not be a complete response to store.
fn partial_or_conditional(h: &http::HeaderMap) -> bool {
    use http::header::*;
    [
        RANGE,
        IF_NONE_MATCH,
        IF_MODIFIED_SINCE,
        IF_MATCH,
        IF_UNMODIFIED_SINCE,
        IF_RANGE,
    ]
    .iter()
    .any(|n| h.contains_key(n))
}

/// The response header with the edits of the plugins before this one applied.
fn effective_headers(h: &http::HeaderMap, edits: &HeaderEdits) -> http::HeaderMap {
    let mut out = h.clone();
    for n in &edits.remove {
        out.remove(n);
    }
    for (k, v) in &edits.set {
        out.insert(k.clone(), v.clone());
    }
    for (k, v) in &edits.append {
        out.append(k.clone(), v.clone());
    }
    out
}

/// Fields never replayed from the cache.
fn per_response(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "age"
            | "x-cache"
            | "x-request-id"
            | "set-cookie"
    )
}

/// The fields to store, one line per name (repeated fields joined with `, `).
fn stored_headers(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.keys()
        .filter(|k| !per_response(k.as_str()))
        .map(|k| {
            let v = h
                .get_all(k)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            (k.as_str().to_string(), v)
        })
        .collect()
}

/// A response from the cache.
fn answer(e: &Entry, label: &'static str, now: Instant) -> Reply {
    let mut headers = Vec::with_capacity(e.headers.len() + 2);
    headers.extend(e.headers.iter().cloned());
    headers.push(("age".into(), e.age(now).as_secs().to_string()));
    headers.push(("x-cache".into(), label.into()));
    Reply {
        status: e.status,
        headers,
        body: e.body.clone(),
    }
}

impl Cache {
    fn new(s: Settings) -> Result<Cache, String> {
        let max_size = usize::try_from(s.max_size.0)
            .map_err(|_| "max_size: too large for this machine".to_string())?;
        if max_size < 1024 {
            return Err("max_size: must be at least 1KiB".into());
        }
        let max_object = match s.max_object_size {
            Some(Size(n)) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n == 0 || n > max_size {
                    return Err(format!(
                        "max_object_size: must be more than 0 and at most max_size ({max_size} bytes)"
                    ));
                }
                n
            }
            None => max_size / 8,
        };
        if s.lock_timeout.0.is_zero() || s.lock_timeout.0 > Duration::from_secs(300) {
            return Err("lock_timeout: must be more than 0s and at most 5m".into());
        }
        Ok(Cache {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::new(max_size)),
                locks: Locks::new(s.lock_timeout.0),
                lock_timeout: s.lock_timeout.0,
                max_object,
                ttl: s.ttl.0,
                swr: s.stale_while_revalidate.0,
            }),
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<usize, Pending>> {
        match self.pending.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Takes this request's pending state (dropping a stale one left at its slot).
    fn take_pending(&self, ctx: &Context) -> Option<Pending> {
        let p = self.pending().remove(&token(ctx))?;
        (p.request_id == ctx.request_id).then_some(p)
    }

    fn add_pending(&self, ctx: &Context, key: String, path: &str, guard: Option<Guard>) {
        let p = Pending {
            request_id: ctx.request_id.clone(),
            key,
            path: path.to_string(),
            guard,
        };
        self.pending().insert(token(ctx), p);
    }

    /// Stores a body-less answer right away.
    fn store_now(&self, key: &str, entry: Entry) -> bool {
        let ok = entry.cost(key.len()) <= self.shared.max_object;
        ok && self.shared.store().insert(key, entry)
    }
}

#[async_trait::async_trait]
impl Plugin for Cache {
    fn name(&self) -> &'static str {
        "cache"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        // Whatever an earlier request left at this slot is over.
        drop(self.take_pending(ctx));
        let Some(key) = primary_key(&ctx.route, req) else {
            label(ctx, "BYPASS");
            return Flow::Continue;
        };
        let head = *req.method == http::Method::HEAD;
        if *req.method != http::Method::GET && !head {
            if !req.method.is_safe() {
                self.shared.store().invalidate(&key);
            }
            label(ctx, "BYPASS");
            return Flow::Continue;
        }
        match policy::request_mode(req.headers) {
            RequestMode::Bypass => {
                label(ctx, "BYPASS");
                return Flow::Continue;
            }
            RequestMode::Refresh => {
                label(ctx, "BYPASS");
                if !head {
                    self.add_pending(ctx, key, req.path, None);
                }
                return Flow::Continue;
            }
            RequestMode::Normal => {}
        }
        let may_lead = !head && !partial_or_conditional(req.headers);
        // However many leaders come and go, a request waits at most this long.
        let give_up = Instant::now() + self.shared.lock_timeout;
        for _ in 0..MAX_ROUNDS {
            let now = Instant::now();
            let found = self.shared.store().lookup(&key, req.headers, now);
            let stale = match found {
                Some((e, State::Fresh)) => return Flow::Respond(answer(&e, "HIT", now)),
                Some((e, State::Stale)) => Some(e),
                _ => None,
            };
            let waiter = if may_lead {
                match self.shared.locks.acquire(&key) {
                    Acquired::Leader(g) => {
                        label(ctx, "MISS");
                        self.add_pending(ctx, key, req.path, Some(g));
                        return Flow::Continue;
                    }
                    Acquired::Wait(w) => w,
                }
            } else {
                match self.shared.locks.wait_on(&key) {
                    Some(w) => w,
                    None => match stale {
                        // Nobody is refreshing it, and this request cannot: serve it
                        // within its window all the same.
                        Some(e) => return Flow::Respond(answer(&e, "STALE", now)),
                        None => break,
                    },
                }
            };
            if let Some(e) = stale {
                // Someone is refreshing it: serve the stale copy meanwhile.
                return Flow::Respond(answer(&e, "STALE", now));
            }
            match waiter.wait(give_up).await {
                Some(Outcome::Stored) | Some(Outcome::Failed) => continue,
                Some(Outcome::Uncacheable) | Some(Outcome::Pending) | None => break,
            }
        }
        label(ctx, "MISS");
        if !head {
            self.add_pending(ctx, key, req.path, None);
        }
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseView<'_>,
        ctx: &mut Context,
    ) -> Option<Box<dyn BodyFilter>> {
        if resp.status < 200 {
            // An interim answer; the final one follows.
            return None;
        }
        let p = self.take_pending(ctx)?;
        let refuse = |p: Pending, why: &str| {
            log::debug!("cache: not storing {:?}: {why}", p.path);
            if let Some(g) = p.guard {
                g.release(Outcome::Uncacheable);
            }
            None
        };
        if *resp.request_method != http::Method::GET {
            return refuse(p, "not a GET");
        }
        let headers = effective_headers(resp.headers, resp.edits);
        let verdict = policy::storable(&Candidate {
            status: resp.status,
            headers: &headers,
            authorized: resp
                .request_headers
                .contains_key(http::header::AUTHORIZATION),
            default_ttl: self.shared.ttl,
            default_swr: self.shared.swr,
            now: SystemTime::now(),
        });
        let freshness = match verdict {
            Ok(f) => f,
            Err(why) => return refuse(p, why),
        };
        let declared: Option<usize> = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        if declared.is_some_and(|n| n > self.shared.max_object) {
            return refuse(p, "larger than max_object_size");
        }
        let vary = policy::vary_names(&headers)
            .unwrap_or_default()
            .into_iter()
            .map(|n| {
                let v = policy::vary_value(resp.request_headers, &n);
                (n, v)
            })
            .collect();
        let entry = Entry {
            status: resp.status,
            headers: stored_headers(&headers),
            body: Bytes::new(),
            vary,
            path: p.path,
            stored_at: Instant::now(),
            freshness,
        };
        if resp.status == 204 || declared == Some(0) {
            let ok = self.store_now(&p.key, entry);
            if let Some(g) = p.guard {
                g.release(if ok {
                    Outcome::Stored
                } else {
                    Outcome::Uncacheable
                });
            }
            return None;
        }
        let fixed = entry.cost(p.key.len());
        if fixed >= self.shared.max_object {
            log::debug!("cache: not storing {:?}: header too large", entry.path);
            if let Some(g) = p.guard {
                g.release(Outcome::Uncacheable);
            }
            return None;
        }
        Some(Box::new(Fill {
            shared: Arc::clone(&self.shared),
            key: p.key,
            entry: Some(entry),
            buf: Vec::with_capacity(declared.unwrap_or(0)),
            limit: self.shared.max_object - fixed,
            declared,
            guard: p.guard,
        }))
    }

    fn on_log(&self, _status: u16, ctx: &Context) {
        // A request that never got to `on_response` (upstream failure, a later plugin
        // answered): its guard, if any, reports a failure as it drops.
        drop(self.take_pending(ctx));
    }

    fn purge(&self, prefix: Option<&str>) -> usize {
        self.shared.store().purge(prefix)
    }
}

/// Collects a cacheable response's body and stores the entry at the end of the
/// stream; passes every chunk through unchanged.
struct Fill {
    shared: Arc<Shared>,
    key: String,
    /// `None` once stored or abandoned.
    entry: Option<Entry>,
    buf: Vec<u8>,
    /// Body bytes allowed.
    limit: usize,
    declared: Option<usize>,
    guard: Option<Guard>,
}

impl Fill {
    fn done(&mut self, outcome: Outcome) {
        self.entry = None;
        self.buf = Vec::new();
        if let Some(g) = self.guard.take() {
            g.release(outcome);
        }
    }

    fn finish(&mut self) {
        let Some(mut e) = self.entry.take() else {
            return;
        };
        if self.declared.is_some_and(|n| n != self.buf.len()) {
            log::debug!(
                "cache: not storing {:?}: body shorter than declared",
                e.path
            );
            self.done(Outcome::Failed);
            return;
        }
        e.body = Bytes::from(std::mem::take(&mut self.buf).into_boxed_slice());
        let ok = self.shared.store().insert(&self.key, e);
        self.done(if ok {
            Outcome::Stored
        } else {
            Outcome::Uncacheable
        });
    }
}

impl BodyFilter for Fill {
    fn filter(&mut self, chunk: Option<Bytes>, end: bool) -> Option<Bytes> {
        if self.entry.is_some() {
            if let Some(c) = &chunk {
                if self.buf.len() + c.len() > self.limit {
                    log::debug!("cache: not storing: larger than max_object_size");
                    self.done(Outcome::Uncacheable);
                } else {
                    self.buf.extend_from_slice(c);
                }
            }
            if end {
                self.finish();
            }
        }
        chunk
    }
}

impl Drop for Fill {
    /// Dropped before the end of the stream (client gone, upstream broken): report a
    /// failure so waiters look again (one of them leads next) instead of hanging.
    fn drop(&mut self) {
        if self.guard.is_some() {
            self.done(Outcome::Failed);
        }
    }
}

#[cfg(test)]
mod tests;
