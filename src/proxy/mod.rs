//! The Pingora `ProxyHttp` implementation. The callbacks stay thin: `request_filter`
//! pins the snapshot, checks the request's shape, finds the route, runs its plugins
//! and either answers (respond, redirect, static, errors) or picks an endpoint;
//! `upstream_peer` hands that endpoint to Pingora; the header filters apply the
//! forwarding rules and the route's edits; `logging` records metrics and the access log.

pub mod edge;
pub mod forward;
pub mod hedge;
pub mod respond;
pub mod static_files;

use crate::gateway::Gateway;
use crate::snapshot::{Action, Route, Snapshot};
use crate::upstream::{Endpoint, Upstream};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use portico_plugins::{
    BodyFilter, Context as PluginCtx, Flow, HeaderEdits, Reply, RequestView, ResponseView,
};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// What a listener adds at the edge: its scheme, HSTS, client certificates, and the
/// redirect of plain HTTP to HTTPS.
pub struct ListenerRt {
    /// `http` or `https`, for `x-forwarded-proto`.
    pub scheme: &'static str,
    pub hsts: Option<http::HeaderValue>,
    /// Header that carries the verified client certificate subject upstream (on
    /// listeners that verify client certificates).
    pub subject_header: Option<http::HeaderName>,
    /// Subject headers of every listener: removed from what clients send, everywhere.
    pub strip_headers: Vec<http::HeaderName>,
    /// Redirect every request to HTTPS on this port.
    pub redirect_https: Option<u16>,
}

impl ListenerRt {
    /// Compiles a listener's edge settings.
    pub fn new(
        l: &crate::config::model::Listener,
        all: &[crate::config::model::Listener],
    ) -> std::result::Result<ListenerRt, String> {
        let mut strip: Vec<http::HeaderName> =
            vec![http::HeaderName::from_static("x-client-cert-subject")];
        for other in all {
            if let Some(t) = &other.tls {
                if let Ok(h) = http::HeaderName::from_bytes(t.client_subject_header.as_bytes()) {
                    if !strip.contains(&h) {
                        strip.push(h);
                    }
                }
            }
        }
        use crate::config::model::RedirectHttps;
        let tls = l.tls.as_ref();
        let hsts = tls.and_then(|t| t.hsts.as_ref()).map(|h| {
            let mut v = format!("max-age={}", h.max_age.0.as_secs());
            if h.include_subdomains {
                v.push_str("; includeSubDomains");
            }
            if h.preload {
                v.push_str("; preload");
            }
            v
        });
        Ok(ListenerRt {
            scheme: if tls.is_some() { "https" } else { "http" },
            hsts: match hsts {
                Some(h) => Some(http::HeaderValue::from_str(&h).map_err(|e| e.to_string())?),
                None => None,
            },
            subject_header: match tls.filter(|t| t.client_ca.is_some()) {
                Some(t) => Some(
                    http::HeaderName::from_bytes(t.client_subject_header.as_bytes())
                        .map_err(|e| e.to_string())?,
                ),
                None => None,
            },
            strip_headers: strip,
            redirect_https: match &l.redirect_https {
                Some(RedirectHttps::Flag(true)) => Some(443),
                Some(RedirectHttps::Port { port }) => Some(*port),
                _ => None,
            },
        })
    }
}

/// Adds `Strict-Transport-Security` to every response of a TLS listener, including the
/// ones the gateway makes itself.
struct HstsModule(http::HeaderValue);

#[async_trait]
impl pingora::modules::http::HttpModule for HstsModule {
    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        _end_of_stream: bool,
    ) -> Result<()> {
        resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, self.0.clone())?;
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

struct HstsBuilder(http::HeaderValue);

impl pingora::modules::http::HttpModuleBuilder for HstsBuilder {
    fn init(&self) -> pingora::modules::http::Module {
        Box::new(HstsModule(self.0.clone()))
    }
}

/// The proxy service of one listener.
pub struct Proxy {
    pub gw: Arc<Gateway>,
    /// Disarmed when a TLS connection's first header arrives (see edge.rs).
    pub deadlines: Arc<edge::SocketDeadlines>,
    pub edge: Arc<ListenerRt>,
    /// Idle keep-alive timeout for client connections, in seconds.
    pub keepalive_secs: u64,
}

/// Per-request state. Dropping it releases the in-flight counts it holds.
pub struct Ctx {
    snap: Arc<Snapshot>,
    gw: Arc<Gateway>,
    start: Instant,
    request_id: String,
    route: Option<Arc<Route>>,
    upstream: Option<Arc<Upstream>>,
    /// Index of the chosen endpoint in `upstream.endpoints`, while it is held.
    endpoint: Option<usize>,
    tried: Vec<usize>,
    params: Vec<(String, String)>,
    client_ip: Option<IpAddr>,
    host: String,
    /// Status of a response the gateway made itself, for the log.
    own_status: Option<u16>,
    error_code: Option<&'static str>,
    upstream_counted: bool,
    last_endpoint: Option<Arc<Endpoint>>,
    /// Plugin context, when the route has plugins.
    plugin_ctx: Option<Box<PluginCtx>>,
    body_filters: Vec<Box<dyn BodyFilter>>,
    /// A plugin's answer decided while the body streamed; written by `fail_to_proxy`.
    pending_reply: Option<Reply>,
    request_body_seen: u64,
    /// Tries started at the upstream (1 for the first).
    tries: u32,
    /// When the upstream must have answered (route `timeout` or upstream `total`).
    deadline: Option<Instant>,
    /// A retryable status was seen; the error raised for it must be retried.
    retry_status_pending: bool,
    /// What an aggregation's calls did, for the access log.
    aggregate_calls: Vec<crate::aggregate::CallLog>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.release_endpoint();
        self.gw.metrics.inflight.dec();
    }
}

impl Ctx {
    fn release_endpoint(&mut self) {
        if let (Some(up), Some(i)) = (&self.upstream, self.endpoint.take()) {
            if let Some(ep) = up.endpoints.get(i) {
                ep.inflight.fetch_sub(1, Ordering::Relaxed);
            }
            up.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn current_endpoint(&self) -> Option<(&Arc<Upstream>, &Arc<Endpoint>)> {
        let up = self.upstream.as_ref()?;
        Some((up, up.endpoints.get(self.endpoint?)?))
    }
}

/// A request id from the client is kept when it is short and printable.
fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic())
}

/// A fast thread-local random u64 (xorshift; ids, not secrets).
fn rand64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static S: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    S.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// 32 hex characters of randomness.
fn new_id() -> String {
    let mut b = [0u8; 32];
    put_hex(&mut b[..16], rand64());
    put_hex(&mut b[16..], rand64());
    // Only hex digits were written.
    std::str::from_utf8(&b).unwrap_or_default().to_owned()
}

/// Writes `v` as 16 lower-case hex digits into `out[..16]`.
fn put_hex(out: &mut [u8], v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().take(16).enumerate() {
        *o = HEX[((v >> (60 - 4 * i)) & 15) as usize];
    }
}

/// W3C traceparent: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, not all zero.
fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |p: &[u8], n: usize| {
        p.len() == n
            && p.iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let nonzero = |p: &[u8]| p.iter().any(|&b| b != b'0');
    let mut parts = v.split(|&b| b == b'-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let more = parts.next().is_some();
    hex(version, 2)
        && version != b"ff"
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2)
        && (version != b"00" || !more)
}

fn new_traceparent() -> Option<http::HeaderValue> {
    // `00-<32 hex trace id>-<16 hex span id>-01`, ids never all zero.
    let mut b = *b"00-00000000000000000000000000000000-0000000000000000-01";
    put_hex(&mut b[3..19], rand64());
    put_hex(&mut b[19..35], rand64() | 1);
    put_hex(&mut b[36..52], rand64() | 1);
    // Only hex digits and dashes: always a valid value.
    http::HeaderValue::from_bytes(&b).ok()
}

/// The Pingora peer for an endpoint of `up`, with the upstream's TLS, protocol and
/// timeouts (capped by `remaining`, the time left before the request's deadline).
pub fn build_peer(
    up: &Upstream,
    ep: &Endpoint,
    remaining: Option<std::time::Duration>,
) -> HttpPeer {
    let mut peer = match &up.tls {
        Some(t) => {
            let mut p = HttpPeer::new(ep.addr, true, t.sni.clone());
            p.options.verify_cert = t.verify;
            p.options.verify_hostname = t.verify && !t.sni.is_empty();
            p.options.ca = t.ca.clone();
            p.client_cert_key = t.client.clone();
            p
        }
        None => HttpPeer::new(ep.addr, false, String::new()),
    };
    peer.group_key = up.pool_group;
    if up.http_version.0 == 2 {
        peer.options.set_http_version(2, 2);
        peer.options.max_h2_streams = 100;
    }
    let t = &up.timeouts;
    let cap = |d: Option<std::time::Duration>| match (d, remaining) {
        (Some(d), Some(r)) => Some(d.min(r)),
        (d, r) => d.or(r),
    };
    peer.options.connection_timeout = cap(t.connect);
    peer.options.read_timeout = cap(t.read);
    peer.options.write_timeout = t.write;
    peer.options.idle_timeout = Some(std::time::Duration::from_secs(60));
    peer
}

/// Result of picking an endpoint.
enum Pick {
    Ok,
    NoEndpoint,
    Saturated,
}

/// Why a try failed, for the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryKind {
    ConnectFailure,
    Reset,
    Timeout,
    Status(u16),
}

/// The client address as the gateway will report it (honouring trusted proxies).
fn client_ip(session: &Session, snap: &Snapshot) -> Option<IpAddr> {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())?;
    if snap.trusted_proxies.is_empty() || !snap.trusted_proxies.iter().any(|n| n.contains(&peer)) {
        return Some(peer);
    }
    // Walk X-Forwarded-For from the right, skipping trusted hops.
    let xff = session
        .req_header()
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in xff.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if snap.trusted_proxies.iter().any(|n| n.contains(&ip)) => continue,
            Ok(ip) => return Some(ip),
            Err(_) => break,
        }
    }
    Some(peer)
}

fn hash_key(up: &Upstream, session: &Session, path: &str, ip: Option<IpAddr>) -> Vec<u8> {
    use crate::upstream::balance::HashOn;
    let req = session.req_header();
    match &up.balancer.hash_on {
        HashOn::Header(h) => req
            .headers
            .get(h)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        HashOn::Cookie(name) => req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes().to_vec())
            .unwrap_or_default(),
        HashOn::ClientIp => ip.map(|i| i.to_string().into_bytes()).unwrap_or_default(),
        HashOn::Path => path.as_bytes().to_vec(),
        HashOn::Query(name) => req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes().to_vec())
            .unwrap_or_default(),
    }
}

impl Proxy {
    fn pick(&self, ctx: &mut Ctx, session: &Session) -> Pick {
        let Some(up) = ctx.upstream.clone() else {
            return Pick::NoEndpoint;
        };
        if up.saturated() {
            return Pick::Saturated;
        }
        let key = if up.balancer.needs_key() {
            Some(hash_key(
                &up,
                session,
                session.req_header().uri.path(),
                ctx.client_ip,
            ))
        } else {
            None
        };
        let cb = up.breaker.as_ref();
        let mut choice = up
            .balancer
            .pick(&up.endpoints, key.as_deref(), &ctx.tried, cb);
        if choice.is_none() && !ctx.tried.is_empty() {
            // Every endpoint was tried: a retry may go back to one of them.
            choice = up.balancer.pick(&up.endpoints, key.as_deref(), &[], cb);
        }
        match choice {
            Some(i) => {
                ctx.release_endpoint();
                up.endpoints[i].inflight.fetch_add(1, Ordering::Relaxed);
                up.inflight.fetch_add(1, Ordering::Relaxed);
                up.last_used
                    .store(crate::upstream::now_ms(), Ordering::Relaxed);
                ctx.endpoint = Some(i);
                if !ctx.tried.contains(&i) {
                    ctx.tried.push(i);
                }
                ctx.last_endpoint = Some(Arc::clone(&up.endpoints[i]));
                Pick::Ok
            }
            None => Pick::NoEndpoint,
        }
    }

    /// Serves a request through the hedged race (see hedge.rs).
    async fn hedged(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        delay: std::time::Duration,
        max: usize,
    ) -> Result<bool> {
        let (Some(up), Some(first)) = (ctx.upstream.clone(), ctx.endpoint) else {
            return Ok(false);
        };
        let mut req = session.req_header().clone();
        self.upstream_request_filter(session, &mut req, ctx).await?;
        ctx.release_endpoint();
        let timeout = ctx
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        match hedge::run(&self.gw, &up, first, &req, delay, max, timeout).await {
            hedge::Outcome::Answer(mut head, body, ep) => {
                ctx.last_endpoint = Some(ep);
                ctx.upstream_counted = true;
                self.upstream_response_filter(session, &mut head, ctx)
                    .await?;
                head.remove_header(&http::header::TRANSFER_ENCODING);
                head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
                self.response_filter(session, &mut head, ctx).await?;
                ctx.own_status = Some(head.status.as_u16());
                let head_only =
                    session.req_header().method == http::Method::HEAD || body.is_empty();
                session.write_response_header(head, head_only).await?;
                if !head_only {
                    let mut b = Some(body);
                    for f in ctx.body_filters.iter_mut() {
                        b = f.filter(b.take(), true);
                    }
                    session.write_response_body(b, true).await?;
                }
            }
            hedge::Outcome::Failed(status, code, msg) => {
                ctx.own_status = Some(status);
                ctx.error_code = Some(code);
                respond::error(session, status, code, &msg, &ctx.request_id).await?;
            }
        }
        Ok(true)
    }

    /// An upstream discovered from a service scaled to zero: ask the orchestrator for
    /// a replica and wait (bounded) until routing has one.
    async fn wait_for_scale_up(&self, ctx: &mut Ctx) -> bool {
        let Some(up) = ctx.upstream.clone() else {
            return false;
        };
        let Some(service) = up.spec.discovery.as_ref().and_then(|d| d.service.clone()) else {
            return false;
        };
        if !up.endpoints.is_empty() {
            return false; // endpoints exist; they are just unhealthy
        }
        let Some(o) = self.gw.orchestrator.lock().ok().and_then(|g| g.clone()) else {
            return false;
        };
        if !o.wake_service(&service) {
            return false;
        }
        let limit = ctx
            .route
            .as_ref()
            .and_then(|r| r.timeout)
            .unwrap_or(std::time::Duration::from_secs(30))
            .min(std::time::Duration::from_secs(30));
        let deadline = Instant::now() + limit;
        let mut found = false;
        while Instant::now() < deadline && !found {
            // Counted as load while it waits, so the replica is not scaled away under it.
            let watched = self.gw.current().upstreams.get(&*up.name).cloned();
            if let Some(w) = &watched {
                w.waiting.fetch_add(1, Ordering::Relaxed);
                w.last_used
                    .store(crate::upstream::now_ms(), Ordering::Relaxed);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Some(w) = &watched {
                w.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            let snap = self.gw.current();
            if let Some(u) = snap.upstreams.get(&*up.name) {
                if !u.endpoints.is_empty() {
                    ctx.upstream = Some(Arc::clone(u));
                    found = true;
                }
            }
        }
        found
    }

    /// Whether this failed try may be retried under the route's policy; takes a token
    /// from the upstream's retry budget when it may.
    fn may_retry(&self, session: &Session, ctx: &Ctx, kind: RetryKind) -> bool {
        let (Some(route), Some(up)) = (&ctx.route, &ctx.upstream) else {
            return false;
        };
        let Some(pol) = &route.retry else {
            return false;
        };
        let wanted = match kind {
            RetryKind::ConnectFailure => pol.on_connect_failure,
            RetryKind::Reset => pol.on_reset,
            RetryKind::Timeout => pol.on_timeout,
            RetryKind::Status(s) => pol.on_status.contains(&s),
        };
        if !wanted || ctx.tries > pol.attempts {
            return false;
        }
        // Never once the client has seen any of the response.
        if session.response_written().is_some() {
            return false;
        }
        // A request that may have had effects is retried only when it says it is safe,
        // except after a failed connect (nothing was sent).
        let req = session.req_header();
        let idempotent = matches!(
            req.method,
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::PUT
                | http::Method::DELETE
        ) || req.headers.contains_key("idempotency-key")
            || pol.non_idempotent;
        if !idempotent && kind != RetryKind::ConnectFailure {
            return false;
        }
        // The body must be replayable: fully held in the retry buffer, and within the
        // route's `max_replay_body`.
        if session.as_ref().retry_buffer_truncated() || ctx.request_body_seen > pol.max_replay_body
        {
            return false;
        }
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > pol.max_replay_body) {
            return false;
        }
        if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        up.budget.withdraw()
    }

    fn count_try(&self, ctx: &mut Ctx, outcome: &'static str) {
        if let (Some(up), Some(ep)) = (&ctx.upstream, &ctx.last_endpoint) {
            count_upstream_try(&self.gw.metrics, &up.name, &ep.label, outcome);
        }
    }

    /// Writes a plugin's answer, with the headers plugins added for every response.
    async fn write_reply(&self, session: &mut Session, ctx: &mut Ctx, r: Reply) -> Result<()> {
        ctx.own_status = Some(r.status);
        let mut hs: Vec<(http::HeaderName, http::HeaderValue)> = r
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                    http::HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        if let Some(p) = &ctx.plugin_ctx {
            hs.extend(p.response_headers.iter().cloned());
        }
        if let Some(route) = &ctx.route {
            hs.retain(|(k, _)| !route.response_headers.remove.contains(k));
            hs.extend(route.response_headers.set.iter().cloned());
        }
        if respond::is_grpc(session) && r.status >= 400 {
            let msg = String::from_utf8_lossy(&r.body).trim().to_string();
            return respond::grpc_error(
                session,
                respond::grpc_code(r.status),
                &msg,
                &ctx.request_id,
            )
            .await;
        }
        // Keep the connection when the client sent no body (a 401 or 429 needs no close).
        let bodyless = session.is_body_empty() || session.is_body_done();
        if !bodyless {
            session.set_keepalive(None);
        }
        respond::write(session, r.status, &hs, r.body, &ctx.request_id).await
    }

    /// Answers a request the proxy refuses before routing.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        code: &'static str,
        msg: &str,
    ) -> Result<bool> {
        ctx.own_status = Some(status);
        ctx.error_code = Some(code);
        session.set_keepalive(None);
        respond::error(session, status, code, msg, &ctx.request_id).await?;
        Ok(true)
    }
}

fn upstream_path(route: &Route, path: &str, query: Option<&str>) -> Option<String> {
    if route.strip_prefix.is_none() && route.rewrite.is_none() {
        return None;
    }
    let mut p: String = path.to_string();
    if let Some(prefix) = &route.strip_prefix {
        if let Some(rest) = p.strip_prefix(prefix.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                p = if rest.is_empty() {
                    "/".into()
                } else {
                    rest.to_string()
                };
            }
        }
    }
    if let Some((re, rep)) = &route.rewrite {
        p = re.replace(&p, rep.as_str()).into_owned();
        if !p.starts_with('/') {
            p.insert(0, '/');
        }
    }
    if p == path && route.strip_prefix.is_none() && route.rewrite.is_none() {
        return None;
    }
    Some(match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    })
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        // No Pingora compression module: compression is a plugin. HSTS where configured.
        if let Some(h) = &self.edge.hsts {
            modules.add_module(Box::new(HstsBuilder(h.clone())));
        }
    }

    fn new_ctx(&self) -> Ctx {
        self.gw.metrics.inflight.inc();
        Ctx {
            snap: self.gw.current(),
            gw: Arc::clone(&self.gw),
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            upstream: None,
            endpoint: None,
            tried: Vec::new(),
            params: Vec::new(),
            client_ip: None,
            host: String::new(),
            own_status: None,
            error_code: None,
            upstream_counted: false,
            last_endpoint: None,
            plugin_ctx: None,
            body_filters: Vec::new(),
            pending_reply: None,
            request_body_seen: 0,
            tries: 0,
            deadline: None,
            retry_status_pending: false,
            aggregate_calls: Vec::new(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.edge.scheme == "https" {
            if let Some(s) = session.as_downstream().stream() {
                self.deadlines.header_arrived(s.id());
            }
        }
        let snap = Arc::clone(&ctx.snap);
        ctx.request_id = match session.req_header().headers.get("x-request-id") {
            Some(v) if valid_request_id(v.as_bytes()) => {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            }
            _ => new_id(),
        };
        if self.gw.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            // Only where the client keeps the connection (not HTTP/1.0 without keep-alive).
            session.set_keepalive(Some(self.keepalive_secs));
        }
        ctx.client_ip = client_ip(session, &snap);
        if let Some(port) = self.edge.redirect_https {
            let req = session.req_header();
            let authority = req
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| req.uri.authority().map(|a| a.as_str()))
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .filter(|a| {
                    !a.host().is_empty()
                        && a.as_str()
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
                });
            let Some(authority) = authority else {
                return self
                    .refuse(
                        session,
                        ctx,
                        400,
                        "bad_request",
                        "a redirect to HTTPS needs a valid Host header",
                    )
                    .await;
            };
            let host = authority.host().to_ascii_lowercase();
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let loc = if port == 443 {
                format!("https://{host}{pq}")
            } else {
                format!("https://{host}:{port}{pq}")
            };
            ctx.own_status = Some(308);
            let loc = http::HeaderValue::from_str(&loc)
                .unwrap_or_else(|_| http::HeaderValue::from_static("/"));
            respond::write(
                session,
                308,
                &[(http::header::LOCATION, loc)],
                Bytes::new(),
                &ctx.request_id,
            )
            .await?;
            return Ok(true);
        }

        // Shape checks Pingora leaves to the application.
        let req = session.req_header();
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if req.headers.len() > snap.max_headers || header_bytes > snap.max_header_bytes {
            return self
                .refuse(
                    session,
                    ctx,
                    431,
                    "headers_too_large",
                    "request headers are too large",
                )
                .await;
        }
        let te = req.headers.contains_key(http::header::TRANSFER_ENCODING);
        // Pingora drops Content-Length when Transfer-Encoding is also present (RFC 9112
        // lets a server do that); the gateway refuses such a request instead, since the
        // two framings disagreeing is the classic request-smuggling shape.
        let te_and_cl = te
            && session.as_downstream().as_http1().is_some_and(|h1| {
                h1.get_headers_raw_bytes()
                    .split(|b| *b == b'\n')
                    .any(|line| {
                        line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:")
                    })
            });
        let cls: Vec<&[u8]> = req
            .headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if te_and_cl || (te && !cls.is_empty()) || cls.windows(2).any(|w| w[0] != w[1]) {
            return self
                .refuse(
                    session,
                    ctx,
                    400,
                    "bad_request",
                    "conflicting Content-Length / Transfer-Encoding",
                )
                .await;
        }
        let raw_host = req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.host())
            .unwrap_or("");
        ctx.host = crate::router::normalize_host(raw_host);
        let path = crate::router::normalize_path(req.uri.path()).into_owned();
        let query = req.uri.query().map(str::to_string);
        let method = req.method.clone();

        let route = {
            let info = crate::router::RequestInfo {
                method: &method,
                host: &ctx.host,
                path: &path,
                query: query.as_deref(),
                headers: &req.headers,
            };
            snap.table.find(&info, &mut ctx.params).cloned()
        };
        let Some(route) = route else {
            let msg = format!("no route for {method} {}{path}", ctx.host);
            return self.refuse(session, ctx, 404, "no_route", &msg).await;
        };
        ctx.route = Some(Arc::clone(&route));

        if !route.plugins.is_empty() {
            // HTTP/2 requests carry the host in `:authority`; plugins (and HTTP/1
            // upstreams) see it as Host.
            if session
                .req_header()
                .headers
                .get(http::header::HOST)
                .is_none()
            {
                if let Some(a) = session
                    .req_header()
                    .uri
                    .authority()
                    .map(|a| a.as_str().to_string())
                {
                    session
                        .req_header_mut()
                        .insert_header(http::header::HOST, a)?;
                }
            }
            let mut pctx = Box::new(PluginCtx {
                request_id: ctx.request_id.clone(),
                route: Arc::clone(&route.name),
                params: ctx.params.clone(),
                client_ip: ctx.client_ip,
                ..PluginCtx::default()
            });
            let mut edits = HeaderEdits::default();
            let mut reply = None;
            for p in &route.plugins {
                let mut view = RequestView {
                    method: &method,
                    path: &path,
                    query: query.as_deref(),
                    headers: &session.req_header().headers,
                    edits: &mut edits,
                };
                if let Flow::Respond(r) = p.on_request(&mut view, &mut pctx).await {
                    // Answers such as cache hits or CORS preflights are not rejections.
                    if r.status >= 400 {
                        self.gw
                            .metrics
                            .plugin_rejections
                            .with_label_values(&[&route.name, p.name(), &r.status.to_string()])
                            .inc();
                    }
                    reply = Some(r);
                    break;
                }
            }
            let req = session.req_header_mut();
            for n in &edits.remove {
                req.remove_header(n);
            }
            for (k, v) in edits.set {
                req.insert_header(k, v)?;
            }
            for (k, v) in edits.append {
                req.append_header(k, v)?;
            }
            ctx.plugin_ctx = Some(pctx);
            if let Some(r) = reply {
                self.write_reply(session, ctx, r).await?;
                return Ok(true);
            }
        }

        match &route.action {
            Action::Upstream(u) => ctx.upstream = Some(Arc::clone(u)),
            Action::Split(arms, total) => {
                let roll = crate::upstream::balance::fastrand(*total as usize) as u32;
                let arm = arms.iter().find(|(_, bound)| roll < *bound).or(arms.last());
                ctx.upstream = arm.map(|(u, _)| Arc::clone(u));
            }
            Action::Respond {
                status,
                body,
                headers,
            } => {
                ctx.own_status = Some(*status);
                match ctx
                    .plugin_ctx
                    .as_ref()
                    .filter(|p| !p.response_headers.is_empty())
                {
                    Some(p) => {
                        let mut hs = headers.clone();
                        hs.extend(p.response_headers.iter().cloned());
                        respond::write(session, *status, &hs, body.clone(), &ctx.request_id)
                            .await?;
                    }
                    None => {
                        respond::write(session, *status, headers, body.clone(), &ctx.request_id)
                            .await?
                    }
                }
                return Ok(true);
            }
            Action::Redirect {
                to,
                status,
                keep_query,
            } => {
                ctx.own_status = Some(*status);
                let mut loc = to.clone();
                if *keep_query {
                    if let Some(q) = &query {
                        loc.push(if loc.contains('?') { '&' } else { '?' });
                        loc.push_str(q);
                    }
                }
                let loc = http::HeaderValue::from_str(&loc)
                    .unwrap_or_else(|_| http::HeaderValue::from_static("/"));
                let body = Bytes::from(format!("redirecting to {}\n", loc.to_str().unwrap_or("/")));
                let mut hs = vec![(http::header::LOCATION, loc)];
                hs.extend(route.response_headers.set.iter().cloned());
                respond::write(session, *status, &hs, body, &ctx.request_id).await?;
                return Ok(true);
            }
            Action::Aggregate(agg) => {
                let claims = ctx.plugin_ctx.as_ref().and_then(|p| p.claims.clone());
                let trace_id = session
                    .req_header()
                    .headers
                    .get("traceparent")
                    .filter(|v| valid_traceparent(v.as_bytes()))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split('-').nth(1))
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>() | 1));
                let env = crate::aggregate::Env {
                    route: &route.name,
                    request_id: &ctx.request_id,
                    trace_id,
                    params: &ctx.params,
                    query: query.as_deref(),
                    headers: &session.req_header().headers,
                    claims: claims.as_ref(),
                };
                // Boxed, as are the other rare paths below: inline, their state would be
                // part of every request's `request_filter` future (about 10 KB copied per
                // request when the future is created).
                let answer =
                    Box::pin(crate::aggregate::execute(agg, env, Arc::clone(&self.gw))).await;
                ctx.own_status = Some(answer.status);
                ctx.aggregate_calls = answer.calls;
                let ct = (
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                let mut hs = vec![ct];
                hs.extend(route.response_headers.set.iter().cloned());
                if let Some(p) = &ctx.plugin_ctx {
                    hs.extend(p.response_headers.iter().cloned());
                }
                respond::write(session, answer.status, &hs, answer.body, &ctx.request_id).await?;
                return Ok(true);
            }
            Action::Static { dir, index } => {
                let rel = match &route.strip_prefix {
                    Some(p) => path.strip_prefix(p.as_str()).unwrap_or(&path).to_string(),
                    None => path.clone(),
                };
                let status = Box::pin(static_files::serve(
                    session,
                    dir,
                    index,
                    &rel,
                    &ctx.request_id,
                ))
                .await?;
                ctx.own_status = Some(status);
                return Ok(true);
            }
        }
        let mut picked = self.pick(ctx, session);
        if matches!(picked, Pick::NoEndpoint) && Box::pin(self.wait_for_scale_up(ctx)).await {
            picked = self.pick(ctx, session);
        }
        match picked {
            Pick::Ok => {}
            p => {
                let name = ctx
                    .upstream
                    .as_ref()
                    .map(|u| u.name.to_string())
                    .unwrap_or_default();
                let (code, msg) = match p {
                    Pick::Saturated => (
                        "upstream_overloaded",
                        format!("upstream `{name}` is at its connection limit"),
                    ),
                    _ => (
                        "no_healthy_upstream",
                        format!("upstream `{name}` has no healthy endpoint"),
                    ),
                };
                ctx.own_status = Some(503);
                ctx.error_code = Some(code);
                respond::error(session, 503, code, &msg, &ctx.request_id).await?;
                return Ok(true);
            }
        }
        let total = route
            .timeout
            .or(ctx.upstream.as_ref().and_then(|u| u.timeouts.total));
        ctx.deadline = total.map(|t| ctx.start + t);
        if route.retry.is_some() {
            // Keep up to 64 KiB of the body so a retry can replay it.
            session.as_mut().enable_retry_buffering();
        }
        if let Some(up) = &ctx.upstream {
            up.budget.deposit();
        }
        if let Some((delay, max)) = route.hedge {
            let req = session.req_header();
            let idempotent = matches!(
                req.method,
                http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
            );
            let bodiless = !req.headers.contains_key(http::header::TRANSFER_ENCODING)
                && req
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .is_none_or(|v| v.as_bytes() == b"0");
            if idempotent && bodiless && !session.is_upgrade_req() {
                return Box::pin(self.hedged(session, ctx, delay, max)).await;
            }
        }
        // The request is routed and an endpoint is ready: invite the body now, as the
        // upstream will only see the request once the gateway starts forwarding it.
        let expects = session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects {
            session
                .req_header_mut()
                .remove_header(&http::header::EXPECT);
            if !session.is_http2() {
                session.write_continue_response().await?;
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.request_body_seen += body.as_ref().map(|b| b.len() as u64).unwrap_or(0);
        let (Some(route), Some(pctx)) = (ctx.route.clone(), ctx.plugin_ctx.as_mut()) else {
            return Ok(());
        };
        for p in &route.plugins {
            if let Flow::Respond(r) = p.on_request_body(body.as_ref(), ctx.request_body_seen, pctx)
            {
                self.gw
                    .metrics
                    .plugin_rejections
                    .with_label_values(&[&route.name, p.name(), &r.status.to_string()])
                    .inc();
                let status = r.status;
                ctx.pending_reply = Some(r);
                return Error::e_explain(
                    ErrorType::HTTPStatus(status),
                    "refused by a plugin while the body streamed",
                );
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        for f in ctx.body_filters.iter_mut() {
            *body = f.filter(body.take(), end_of_stream);
        }
        Ok(None)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.tries += 1;
        ctx.upstream_counted = false;
        if ctx.tries > 1 {
            if let Some(pol) = ctx.route.as_ref().and_then(|r| r.retry.as_ref()) {
                let mut wait = pol.backoff(ctx.tries - 1);
                if let Some(d) = ctx.deadline {
                    wait = wait.min(d.saturating_duration_since(Instant::now()));
                }
                tokio::time::sleep(wait).await;
            }
        }
        if ctx.endpoint.is_none() {
            match self.pick(ctx, session) {
                Pick::Ok => {}
                Pick::Saturated => {
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "upstream at its connection limit",
                    )
                }
                Pick::NoEndpoint => {
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "no healthy endpoint left to try",
                    )
                }
            }
        }
        let remaining = match ctx.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Error::e_explain(
                        ErrorType::HTTPStatus(504),
                        "timeout before the upstream answered",
                    );
                }
                Some(left)
            }
            None => None,
        };
        let Some((up, ep)) = ctx.current_endpoint() else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "no upstream");
        };
        let peer = build_peer(up, ep, remaining);
        Ok(Box::new(peer))
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        if ctx.retry_status_pending {
            // Decided (and budgeted) when the retryable status arrived.
            ctx.retry_status_pending = false;
            ctx.release_endpoint();
            e.set_retry(true);
            return e;
        }
        let kind = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Some(RetryKind::Timeout),
            ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::H1Error
            | ErrorType::H2Error => Some(RetryKind::Reset),
            _ => None,
        };
        let upstream_side = matches!(e.esource(), pingora::ErrorSource::Upstream);
        if let (Some(kind), true) = (kind, upstream_side) {
            if !ctx.upstream_counted {
                ctx.upstream_counted = true;
                self.count_try(
                    ctx,
                    if kind == RetryKind::Timeout {
                        "timeout"
                    } else {
                        "reset"
                    },
                );
                if let Some((up, ep)) = ctx.current_endpoint() {
                    up.record_result(ep, false);
                }
            }
            if self.may_retry(session, ctx, kind) {
                ctx.release_endpoint();
                e.set_retry(true);
                return e;
            }
        }
        // Pingora's own rule for a pooled connection the upstream had already closed:
        // an idempotent request is retried once on a fresh connection.
        let idempotent = session.req_header().method.is_idempotent();
        if upstream_side
            && idempotent
            && session.response_written().is_none()
            && !session.as_ref().retry_buffer_truncated()
        {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        e
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some((up, ep)) = ctx
            .current_endpoint()
            .map(|(u, e)| (Arc::clone(u), Arc::clone(e)))
        {
            up.connect_failed(&ep);
            up.record_result(&ep, false);
            ctx.upstream_counted = true;
            self.count_try(ctx, "connect_failure");
            ctx.release_endpoint();
            let retry = if ctx.route.as_ref().is_some_and(|r| r.retry.is_some()) {
                self.may_retry(session, ctx, RetryKind::ConnectFailure)
            } else {
                // Without a policy, a failed connect (nothing was sent) still fails over
                // once to another endpoint, if one is left.
                ctx.tries < 2
                    && up
                        .endpoints
                        .iter()
                        .enumerate()
                        .any(|(j, ep)| !ctx.tried.contains(&j) && ep.available())
            };
            if retry {
                e.set_retry(true);
            }
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (Some(up), Some(i)) = (&ctx.upstream, ctx.endpoint) {
            up.connect_ok(&up.endpoints[i]);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        if let Some(up) = &ctx.upstream {
            if let Some(h) = &up.host {
                req.insert_header(http::header::HOST, h.clone())?;
            }
        }
        let new_path = {
            let uri = &session.req_header().uri;
            let p = crate::router::normalize_path(uri.path());
            upstream_path(&route, &p, uri.query()).or_else(|| {
                (p != uri.path()).then(|| match uri.query() {
                    Some(q) => format!("{p}?{q}"),
                    None => p.into_owned(),
                })
            })
        };
        if let Some(p) = new_path {
            match p.parse::<http::Uri>() {
                Ok(uri) => req.set_uri(uri),
                Err(_) => {
                    return Error::e_explain(
                        ErrorType::HTTPStatus(400),
                        "rewritten path is not a valid URI",
                    )
                }
            }
        }
        // An HTTP/2 upstream needs `:authority`: take it from Host when the URI has none.
        if ctx.upstream.as_ref().is_some_and(|u| u.http_version.0 == 2)
            && req.uri.authority().is_none()
        {
            let host = req
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .or_else(|| ctx.last_endpoint.as_ref().map(|e| e.label.clone()))
                .unwrap_or_else(|| "localhost".into());
            let scheme = if ctx.upstream.as_ref().is_some_and(|u| u.tls.is_some()) {
                "https"
            } else {
                "http"
            };
            let pq = req
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            if let Ok(uri) = format!("{scheme}://{host}{pq}").parse::<http::Uri>() {
                req.set_uri(uri);
            }
        }
        // The header edits, on the plain `http` map (see `forward`).
        let mut plain = forward::Plain::take(req);
        let h = &mut plain.parts.headers;
        h.reserve(8);
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let down = session.req_header();
        let authority;
        let host = match down.headers.get(http::header::HOST) {
            Some(h) => Some(h),
            None => {
                authority = down
                    .uri
                    .authority()
                    .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok());
                authority.as_ref()
            }
        };
        forward::set_forwarding(
            h,
            &forward::Hop {
                peer,
                trusted: peer
                    .is_some_and(|p| ctx.snap.trusted_proxies.iter().any(|n| n.contains(&p))),
                scheme: self.edge.scheme,
                host,
            },
        );
        if let Ok(v) = http::HeaderValue::from_str(&ctx.request_id) {
            h.insert(forward::X_REQUEST_ID.clone(), v);
        }
        // Only the gateway says who a client certificate belongs to.
        for n in &self.edge.strip_headers {
            h.remove(n);
        }
        if let Some(n) = &self.edge.subject_header {
            let subject = session
                .digest()
                .and_then(|d| d.ssl_digest.as_ref())
                .and_then(|s| s.extension.get::<crate::tls::ClientCert>())
                .and_then(|c| http::HeaderValue::from_str(&c.subject).ok());
            if let Some(v) = subject {
                h.insert(n.clone(), v);
            }
        }
        let tp_ok = h
            .get(&forward::TRACEPARENT)
            .is_some_and(|v| valid_traceparent(v.as_bytes()));
        if !tp_ok {
            h.remove(&forward::TRACESTATE);
            if let Some(tp) = new_traceparent() {
                h.insert(forward::TRACEPARENT.clone(), tp);
            }
        }
        for n in &route.request_headers.remove {
            h.remove(n);
        }
        for (k, v) in &route.request_headers.set {
            h.insert(k.clone(), v.clone());
        }
        plain.restore(req);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Hop-by-hop fields of the upstream connection do not cross the gateway.
        let nominated: Vec<String> = resp
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive" && t != "upgrade")
            .collect();
        for n in nominated {
            resp.remove_header(n.as_str());
        }
        resp.remove_header(&forward::KEEP_ALIVE);
        resp.remove_header(&forward::PROXY_CONNECTION);
        if resp.status.is_informational() {
            return Ok(());
        }
        let status = resp.status.as_u16();
        if !ctx.upstream_counted {
            ctx.upstream_counted = true;
            let failed = resp.status.is_server_error();
            self.count_try(ctx, if failed { "http_5xx" } else { "ok" });
            if let Some((up, ep)) = ctx.current_endpoint() {
                up.record_result(ep, !failed);
            }
        }
        if ctx
            .route
            .as_ref()
            .and_then(|r| r.retry.as_ref())
            .is_some_and(|p| p.on_status.contains(&status))
            && self.may_retry(session, ctx, RetryKind::Status(status))
        {
            ctx.retry_status_pending = true;
            return Error::e_explain(ErrorType::HTTPStatus(status), "retrying on this status");
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let mut plain = forward::PlainResponse::take(resp);
        let h = &mut plain.parts.headers;
        if let Ok(v) = http::HeaderValue::from_str(&ctx.request_id) {
            h.insert(forward::X_REQUEST_ID.clone(), v);
        }
        if let (Some(route), Some(pctx)) = (ctx.route.clone(), ctx.plugin_ctx.as_mut()) {
            let mut edits = HeaderEdits::default();
            let req = session.req_header();
            for p in &route.plugins {
                let mut view = ResponseView {
                    status: plain.parts.status.as_u16(),
                    headers: &plain.parts.headers,
                    edits: &mut edits,
                    request_method: &req.method,
                    request_headers: &req.headers,
                };
                if let Some(f) = p.on_response(&mut view, pctx) {
                    ctx.body_filters.push(f);
                }
            }
            let h = &mut plain.parts.headers;
            for n in &edits.remove {
                h.remove(n);
            }
            for (k, v) in edits.set {
                h.insert(k, v);
            }
            for (k, v) in edits.append {
                h.append(k, v);
            }
            for (k, v) in &pctx.response_headers {
                h.insert(k.clone(), v.clone());
            }
        }
        if let Some(route) = &ctx.route {
            let h = &mut plain.parts.headers;
            for n in &route.response_headers.remove {
                h.remove(n);
            }
            for (k, v) in &route.response_headers.set {
                h.insert(k.clone(), v.clone());
            }
        }
        plain.restore(resp);
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let upstream_side = matches!(e.esource(), pingora::ErrorSource::Upstream);
        let (status, code, msg): (u16, &'static str, &str) = match e.etype() {
            ErrorType::HTTPStatus(s) => (
                *s,
                match *s {
                    503 => "no_healthy_upstream",
                    504 => "upstream_timeout",
                    _ => "error",
                },
                match *s {
                    503 => "no endpoint of the upstream can take the request",
                    504 => "the upstream did not answer in time",
                    _ => "the gateway refused the request",
                },
            ),
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::HandshakeError
            | ErrorType::InvalidCert
            | ErrorType::BindError
            | ErrorType::SocketError => (502, "bad_gateway", "could not connect to the upstream"),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout if upstream_side => (
                504,
                "upstream_timeout",
                "the upstream did not answer in time",
            ),
            _ if upstream_side => (502, "bad_gateway", "the upstream connection failed"),
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                (0, "client_closed", "")
            }
            ErrorType::ReadTimedout => (
                408,
                "request_timeout",
                "the request was not received in time",
            ),
            ErrorType::InvalidHTTPHeader
            | ErrorType::H1Error
            | ErrorType::H2Error
            | ErrorType::InvalidH2 => (400, "bad_request", "malformed request"),
            _ => (500, "internal", "internal gateway error"),
        };
        // Whatever the transport reported, a request past its deadline timed out.
        let (status, code, msg) = if status != 0
            && ctx.last_endpoint.is_some()
            && ctx
                .deadline
                .is_some_and(|d| Instant::now() + std::time::Duration::from_millis(5) >= d)
        {
            (
                504,
                "upstream_timeout",
                "the upstream did not answer in time",
            )
        } else {
            (status, code, msg)
        };
        ctx.error_code = Some(code);
        let written = session.response_written().is_some();
        if let Some(r) = ctx.pending_reply.take() {
            let status = r.status;
            if !written {
                let _ = self.write_reply(session, ctx, r).await;
            }
            ctx.error_code = Some("plugin");
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        if status > 0 && !written {
            if ctx.request_id.is_empty() {
                ctx.request_id = new_id();
            }
            // The connection closes after this answer: say so, so clients do not reuse it.
            session.set_keepalive(None);
            let _ = respond::error(session, status, code, msg, &ctx.request_id).await;
        }
        ctx.own_status = Some(status);
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        ctx.release_endpoint();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.own_status)
            .unwrap_or(0);
        if let (Some(route), Some(pctx)) = (&ctx.route, &ctx.plugin_ctx) {
            for p in &route.plugins {
                p.on_log(status, pctx);
            }
        }
        let elapsed = ctx.start.elapsed();
        let route_name: &str = ctx.route.as_ref().map(|r| &*r.name).unwrap_or("");
        let m = &self.gw.metrics;
        let req = session.req_header();
        let method = crate::metrics::method_label(&req.method);
        count_request(m, route_name, method, status);
        match &ctx.route {
            Some(r) => r.duration.observe(elapsed.as_secs_f64()),
            None => m
                .request_duration
                .with_label_values(&[""])
                .observe(elapsed.as_secs_f64()),
        }
        if self.gw.access_log.enabled() {
            use std::fmt::Write;
            let mut l = String::with_capacity(384);
            l.push_str("{\"time\":\"");
            crate::gateway::push_now_rfc3339(&mut l);
            l.push_str("\",\"request_id\":");
            crate::accesslog::json_str(&mut l, &ctx.request_id);
            l.push_str(",\"client\":");
            match session.client_addr() {
                // IP:port needs no escaping; write it without an intermediate String.
                Some(a) => match a.as_inet() {
                    Some(std::net::SocketAddr::V4(inet)) => {
                        l.push('"');
                        forward::push_ip(&mut l, IpAddr::V4(*inet.ip()));
                        l.push(':');
                        crate::accesslog::push_u64(&mut l, inet.port().into());
                        l.push('"');
                    }
                    Some(inet) => {
                        let _ = write!(l, "\"{inet}\"");
                    }
                    None => crate::accesslog::json_str(&mut l, &a.to_string()),
                },
                None => l.push_str("\"\""),
            }
            l.push_str(",\"method\":");
            crate::accesslog::json_str(&mut l, req.method.as_str());
            l.push_str(",\"host\":");
            crate::accesslog::json_str(&mut l, &ctx.host);
            l.push_str(",\"path\":");
            crate::accesslog::json_str(&mut l, req.uri.path());
            l.push_str(",\"status\":");
            crate::accesslog::push_u64(&mut l, status.into());
            l.push_str(",\"bytes_in\":");
            crate::accesslog::push_u64(&mut l, session.body_bytes_read() as u64);
            l.push_str(",\"bytes_out\":");
            crate::accesslog::push_u64(&mut l, session.body_bytes_sent() as u64);
            l.push_str(",\"duration_ms\":");
            crate::accesslog::push_ms(&mut l, elapsed);
            l.push_str(",\"route\":");
            crate::accesslog::json_str(&mut l, route_name);
            l.push_str(",\"upstream\":");
            crate::accesslog::json_str(
                &mut l,
                ctx.upstream.as_ref().map(|u| &*u.name).unwrap_or(""),
            );
            l.push_str(",\"endpoint\":");
            crate::accesslog::json_str(
                &mut l,
                ctx.last_endpoint
                    .as_ref()
                    .map(|e| e.label.as_str())
                    .unwrap_or(""),
            );
            if let Some(code) = ctx.error_code {
                l.push_str(",\"error\":");
                crate::accesslog::json_str(&mut l, code);
            } else if let Some(e) = e {
                l.push_str(",\"error\":");
                crate::accesslog::json_str(&mut l, e.etype().as_str());
            }
            if !ctx.aggregate_calls.is_empty() {
                l.push_str(",\"calls\":[");
                for (i, c) in ctx.aggregate_calls.iter().enumerate() {
                    if i > 0 {
                        l.push(',');
                    }
                    l.push_str("{\"name\":");
                    crate::accesslog::json_str(&mut l, &c.name);
                    let _ = write!(
                        l,
                        ",\"status\":{},\"outcome\":\"{}\",\"duration_ms\":{:.3},\"endpoint\":",
                        c.status, c.outcome, c.ms
                    );
                    crate::accesslog::json_str(&mut l, &c.endpoint);
                    l.push('}');
                }
                l.push(']');
            }
            l.push('}');
            self.gw.access_log.write(l);
        }
    }
}

/// `portico_requests_total` through [`inc_cached`].
fn count_request(m: &crate::metrics::Metrics, route: &str, method: &'static str, status: u16) {
    inc_cached(&m.requests, [route, method], status.into(), || {
        status.to_string()
    });
}

/// `portico_upstream_requests_total` through [`inc_cached`]; a `&'static str`'s
/// address and length identify its text.
fn count_upstream_try(m: &crate::metrics::Metrics, up: &str, ep: &str, outcome: &'static str) {
    let key = outcome.as_ptr() as u64 ^ ((outcome.len() as u64) << 48);
    inc_cached(&m.upstream_requests, [up, ep], key, || outcome.to_string());
}

/// Adds one to a counter of `vec` through a per-thread cache of handles, so the
/// request path skips the registry's label hashing and lock. The labels are the two
/// strings `names` and a third one, `render()`, which `last` must identify. The cache
/// is keyed by the strings' addresses and checked against their text, so a reused
/// address is harmless. Bounded: cleared at 10,000 entries.
fn inc_cached(
    vec: &prometheus::IntCounterVec,
    names: [&str; 2],
    last: u64,
    render: impl FnOnce() -> String,
) {
    use std::cell::RefCell;
    use std::collections::HashMap;
    type Key = (usize, usize, usize, u64);
    type Entry = ([Box<str>; 2], prometheus::IntCounter);
    thread_local! {
        static CACHE: RefCell<HashMap<Key, Entry, ahash::RandomState>> =
            RefCell::new(HashMap::default());
    }
    let key = (
        vec as *const _ as usize,
        names[0].as_ptr() as usize,
        names[1].as_ptr() as usize,
        last,
    );
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((n, counter)) = c.get(&key) {
            if *n[0] == *names[0] && *n[1] == *names[1] {
                counter.inc();
                return;
            }
        }
        let counter = vec.with_label_values(&[names[0], names[1], &render()]);
        counter.inc();
        if c.len() >= 10_000 {
            c.clear();
        }
        c.insert(key, ([names[0].into(), names[1].into()], counter));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation() {
        assert!(valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
        ));
        assert!(!valid_traceparent(b"zz"));
        let tp = new_traceparent().expect("a traceparent");
        assert!(valid_traceparent(tp.as_bytes()));
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 200]));
        assert_eq!(new_id().len(), 32);
    }
}
