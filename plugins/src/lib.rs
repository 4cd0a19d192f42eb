#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
//! Portico's plugin API. A plugin is a value built once from its typed, strictly
//! deserialized settings when a config is compiled; the gateway calls its hooks on the
//! request path through a narrow context and never the other way round: this crate does
//! not depend on the gateway. Plugins are registered explicitly in a [`Registry`]
//! (no life-before-main); a chain runs in the order the config lists it, and a hook's
//! result is an explicit [`Flow`]: go on, or answer the client with this response.

pub mod api_key;
pub mod basic_auth;
pub mod cache;
pub mod compression;
pub mod cors;
pub mod fault;
pub mod headers;
pub mod ip_filter;
pub mod jwks;
pub mod jwt;
pub mod rate_limit;
pub mod request_size;
pub mod services;
pub mod units;
pub mod util;

use bytes::Bytes;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// What a hook decides.
#[derive(Debug)]
pub enum Flow {
    /// Go on with the next plugin / the proxy.
    Continue,
    /// Answer the client with this response; nothing (more) reaches the upstream.
    Respond(Reply),
}

/// A response made by a plugin.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// Header fields, in order (the gateway adds `x-request-id` and the context's
    /// `response_headers`).
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// A JSON error in the gateway's format: `{"error", "message", "request_id"}`.
    pub fn error(status: u16, code: &str, message: &str, ctx: &Context) -> Reply {
        let body = serde_json::json!({
            "error": code,
            "message": message,
            "request_id": ctx.request_id,
        });
        let mut b = serde_json::to_vec(&body).unwrap_or_default();
        b.push(b'\n');
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(b),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// Header changes requested by plugins.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Removed first.
    pub remove: Vec<http::HeaderName>,
    /// Then set (replacing any value).
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Then appended as further lines, keeping the values already there.
    pub append: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl HeaderEdits {
    /// Removes `name` and forgets any earlier `set`/`append` of it in these edits.
    pub fn remove(&mut self, name: http::HeaderName) {
        self.set.retain(|(k, _)| *k != name);
        self.append.retain(|(k, _)| *k != name);
        if !self.remove.contains(&name) {
            self.remove.push(name);
        }
    }

    /// Sets `name` to `value`, replacing an earlier `set` of it in these edits.
    pub fn set(&mut self, name: http::HeaderName, value: http::HeaderValue) {
        self.set.retain(|(k, _)| *k != name);
        self.set.push((name, value));
    }
}

/// Adds `token` to the response's `Vary` list, merging the upstream's value and what
/// earlier plugins of the chain already asked for (they share `resp.edits`), so two
/// plugins that both vary the response (CORS on `Origin`, compression on
/// `Accept-Encoding`) never overwrite each other.
pub fn add_vary(resp: &mut ResponseView<'_>, token: &str) {
    let vary = http::header::VARY;
    let current: String = match resp.edits.set.iter().rev().find(|(k, _)| *k == vary) {
        Some((_, v)) => v.to_str().unwrap_or("").to_string(),
        None if resp.edits.remove.contains(&vary) => String::new(),
        None => resp
            .headers
            .get_all(&vary)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let present = current.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.eq_ignore_ascii_case(token)
    });
    if present {
        return;
    }
    let merged = if current.trim().is_empty() {
        token.to_string()
    } else {
        format!("{current}, {token}")
    };
    if let Ok(v) = http::HeaderValue::from_str(&merged) {
        resp.edits.set(vary, v);
    }
}

/// Deserializes a plugin's settings strictly into `T` (a `#[serde(deny_unknown_fields)]`
/// struct). An entry written without settings (`- cors:`) counts as an empty map.
/// Errors start with the path of the offending setting (`per: ...`, `inner.key: ...`;
/// an unknown field's error with the path of the map that has it), which
/// [`EntryError::location`] turns back into a place in the file.
pub fn settings<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value) -> Result<T, String> {
    let empty = serde_yaml::Value::Mapping(serde_yaml::Mapping::new());
    let v = if v.is_null() { &empty } else { v };
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let at = if inner.starts_with("unknown field") {
            // The path ends with the unknown key itself: name the map that has it.
            match path.rfind('.') {
                Some(i) => path[..i].to_string(),
                None => String::new(),
            }
        } else {
            path
        };
        if at.is_empty() || at == "." {
            inner
        } else {
            format!("{at}: {inner}")
        }
    })
}

/// Where in a plugin entry's settings an error points, relative to the settings map:
/// `burts`, `allow[1]`, `request.set.x-env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Dotted keys, `[i]` for list items.
    pub path: String,
    /// The error is about the key itself (an unknown field), not its value.
    pub key: bool,
}

/// The value at `path` (`a.b[1].c`) inside `v`.
fn lookup<'a>(v: &'a serde_yaml::Value, path: &str) -> Option<&'a serde_yaml::Value> {
    let mut cur = v;
    for seg in path.split('.') {
        let (key, idx) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !key.is_empty() {
            cur = cur
                .as_mapping()?
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v)?;
        }
        for part in idx.split('[').filter(|p| !p.is_empty()) {
            let i: usize = part.strip_suffix(']')?.parse().ok()?;
            cur = cur.as_sequence()?.get(i)?;
        }
    }
    Some(cur)
}

fn scalar_text(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Finds the setting a plugin's error message is about (see [`settings`]).
fn locate(settings: &serde_yaml::Value, message: &str) -> Option<Location> {
    // The longest leading part of `p` (cut at dots) that names a setting.
    let resolve = |p: &str| -> Option<String> {
        let mut cand = p;
        loop {
            if !cand.is_empty() && lookup(settings, cand).is_some() {
                return Some(cand.to_string());
            }
            cand = &cand[..cand.rfind('.')?];
        }
    };
    let (prefix, rest) = match message.split_once(": ") {
        Some((p, r)) if !p.chars().any(char::is_control) => match resolve(p) {
            Some(found) => (Some(found), r),
            None => (None, message),
        },
        _ => (None, message),
    };
    let prefix = prefix.as_deref();
    if let Some(field) = rest
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
    {
        let path = match prefix {
            Some(p) => format!("{p}.{field}"),
            None => field.to_string(),
        };
        return lookup(settings, &path).map(|_| Location { path, key: true });
    }
    let p = prefix?;
    if let Some(seq) = lookup(settings, p).and_then(|v| v.as_sequence()) {
        for (i, item) in seq.iter().enumerate() {
            if let Some(t) = scalar_text(item) {
                if rest.contains(&format!("{t:?}")) || rest.contains(&format!("`{t}`")) {
                    return Some(Location {
                        path: format!("{p}[{i}]"),
                        key: false,
                    });
                }
            }
        }
    }
    Some(Location {
        path: p.to_string(),
        key: false,
    })
}

/// The request as plugins see it: method, path, query and headers (read-only), and
/// the header edits plugins ask for, applied by the gateway before the request goes
/// upstream (later plugins see the original headers, not the edits).
pub struct RequestView<'a> {
    /// The request method.
    pub method: &'a http::Method,
    /// The normalized path (no query).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The request headers as the client sent them.
    pub headers: &'a http::HeaderMap,
    /// Header changes for the upstream request, shared by the whole chain.
    pub edits: &'a mut HeaderEdits,
}

/// The response header as plugins see it, with the request's method and headers.
pub struct ResponseView<'a> {
    /// The response status.
    pub status: u16,
    /// The response headers as the upstream sent them.
    pub headers: &'a http::HeaderMap,
    /// Header changes for the client's response, shared by the whole chain.
    pub edits: &'a mut HeaderEdits,
    /// The request's method.
    pub request_method: &'a http::Method,
    /// The request's headers as the client sent them.
    pub request_headers: &'a http::HeaderMap,
}

/// The narrow per-request context handed to plugins. It lives for the whole request,
/// so what one hook (or one plugin) learns, a later one can use.
#[derive(Debug, Default)]
pub struct Context {
    /// The request id (`x-request-id`).
    pub request_id: String,
    /// The route's name.
    pub route: Arc<str>,
    /// Path parameters of the route (`{id}` segments, named regex groups).
    pub params: Vec<(String, String)>,
    /// The client's address (after `trusted_proxies`).
    pub client_ip: Option<IpAddr>,
    /// Who the request is from, set by an authentication plugin.
    pub consumer: Option<String>,
    /// Verified JWT claims, set by the `jwt` plugin.
    pub claims: Option<serde_json::Value>,
    /// Headers added to whatever response the client gets (also to rejections).
    pub response_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// A per-response body transformer (compression, ...), made by `on_response`.
pub trait BodyFilter: Send + Sync {
    /// Takes the next chunk (`None` when the upstream sent none) and returns what to
    /// send instead; `end` is true on the last call.
    fn filter(&mut self, chunk: Option<Bytes>, end: bool) -> Option<Bytes>;
}

/// A plugin instance. Every hook has a default that does nothing; hooks are called in
/// the chain's order (global plugins first, then the route's).
#[async_trait::async_trait]
pub trait Plugin: Send + Sync {
    /// The config name (`jwt`, `rate_limit`, ...).
    fn name(&self) -> &'static str;
    /// After routing, before anything goes upstream; may answer the request itself.
    async fn on_request(&self, _req: &mut RequestView<'_>, _ctx: &mut Context) -> Flow {
        Flow::Continue
    }
    /// Each chunk of the request body as it streams to the upstream (`len` bytes so
    /// far, including this chunk). Answering stops the request (e.g. 413).
    fn on_request_body(&self, _chunk: Option<&Bytes>, _total: u64, _ctx: &mut Context) -> Flow {
        Flow::Continue
    }
    /// The response header, before it goes to the client; may return a body filter.
    fn on_response(
        &self,
        _resp: &mut ResponseView<'_>,
        _ctx: &mut Context,
    ) -> Option<Box<dyn BodyFilter>> {
        None
    }
    /// After the response is done (status 0 if none was sent).
    fn on_log(&self, _status: u16, _ctx: &Context) {}
    /// Drops cached entries whose path starts with `prefix` (all with `None`) and
    /// returns how many; plugins that cache nothing keep the default (0).
    fn purge(&self, _prefix: Option<&str>) -> usize {
        0
    }
}

/// Builds plugin instances of one kind from their settings.
pub trait Factory: Send + Sync {
    /// The config name this factory answers to.
    fn name(&self) -> &'static str;
    /// Checks and compiles settings; the error says what is wrong with them.
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String>;
    /// Like [`Factory::build`], with the entry's scope and the config's shared
    /// services; plugins that need neither keep this default.
    fn build_with(
        &self,
        settings: &serde_yaml::Value,
        _env: &services::BuildEnv<'_>,
    ) -> Result<Arc<dyn Plugin>, String> {
        self.build(settings)
    }
}

/// Why a plugin entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The entry is not a one-key map, or names no known plugin.
    #[error("{0}")]
    Shape(String),
    /// The plugin refused its settings.
    #[error("plugin `{plugin}`: {message}")]
    Settings {
        /// The plugin's name.
        plugin: String,
        /// What is wrong.
        message: String,
    },
}

impl EntryError {
    /// Where in `entry`'s settings this error points, for line/column reporting: the
    /// gateway reports it at `<entry path>.<plugin>.<location.path>` (the key itself
    /// when `location.key`), else at the entry.
    pub fn location(&self, entry: &serde_yaml::Value) -> Option<Location> {
        let EntryError::Settings { message, .. } = self else {
            return None;
        };
        let (_, settings) = Registry::split(entry).ok()?;
        locate(settings, message)
    }
}

/// The known plugin factories, by name.
#[derive(Default)]
pub struct Registry {
    factories: HashMap<&'static str, Arc<dyn Factory>>,
}

impl Registry {
    /// The registry with every built-in plugin.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        r.register(Arc::new(jwt::JwtFactory));
        r.register(Arc::new(api_key::ApiKeyFactory));
        r.register(Arc::new(basic_auth::BasicAuthFactory));
        r.register(Arc::new(rate_limit::RateLimitFactory));
        r.register(Arc::new(compression::CompressionFactory));
        r.register(Arc::new(cors::CorsFactory));
        r.register(Arc::new(ip_filter::IpFilterFactory));
        r.register(Arc::new(request_size::RequestSizeFactory));
        r.register(Arc::new(headers::HeadersFactory));
        r.register(Arc::new(fault::FaultFactory));
        r.register(Arc::new(cache::CacheFactory));
        r
    }

    /// Adds a factory.
    pub fn register(&mut self, f: Arc<dyn Factory>) {
        self.factories.insert(f.name(), f);
    }

    /// Names of the registered plugins, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.factories.keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn split(entry: &serde_yaml::Value) -> Result<(&str, &serde_yaml::Value), EntryError> {
        let m = entry.as_mapping().filter(|m| m.len() == 1).ok_or_else(|| {
            EntryError::Shape("a plugin entry is a one-key map: `- NAME: { settings }`".into())
        })?;
        let (k, v) = m
            .iter()
            .next()
            .ok_or_else(|| EntryError::Shape("empty plugin entry".into()))?;
        let name = k
            .as_str()
            .ok_or_else(|| EntryError::Shape("a plugin name must be a string".into()))?;
        Ok((name, v))
    }

    /// Builds one `- NAME: settings` entry (global scope, no shared services).
    pub fn build(&self, entry: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, EntryError> {
        self.build_with(entry, &services::BuildEnv::bare())
    }

    /// Builds one `- NAME: settings` entry in `env` (its scope and shared services).
    pub fn build_with(
        &self,
        entry: &serde_yaml::Value,
        env: &services::BuildEnv<'_>,
    ) -> Result<Arc<dyn Plugin>, EntryError> {
        let (name, settings) = Self::split(entry)?;
        let f = self.factories.get(name).ok_or_else(|| {
            let known = self.names();
            EntryError::Shape(if known.is_empty() {
                format!("unknown plugin `{name}` (this build has no plugins yet)")
            } else {
                format!(
                    "unknown plugin `{name}`, expected one of {}",
                    known.join(", ")
                )
            })
        })?;
        f.build_with(settings, env)
            .map_err(|message| EntryError::Settings {
                plugin: name.to_string(),
                message,
            })
    }

    /// Checks one entry without keeping the instance.
    pub fn validate(&self, entry: &serde_yaml::Value) -> Result<(), EntryError> {
        self.build(entry).map(|_| ())
    }

    /// Checks one entry in `env` without keeping the instance.
    pub fn validate_with(
        &self,
        entry: &serde_yaml::Value,
        env: &services::BuildEnv<'_>,
    ) -> Result<(), EntryError> {
        self.build_with(entry, env).map(|_| ())
    }
}

/// The README's worked example (a complete plugin and its registration), compiled and
/// run by `cargo test` as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Helpers for the plugins' unit tests: requests, contexts and hook runners.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A request for tests.
    pub struct Req {
        pub method: http::Method,
        pub path: String,
        pub query: Option<String>,
        pub headers: http::HeaderMap,
    }

    impl Req {
        /// `GET path?query`.
        pub fn get(target: &str) -> Req {
            Req::new("GET", target)
        }
        /// `METHOD path?query`.
        pub fn new(method: &str, target: &str) -> Req {
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (target.to_string(), None),
            };
            Req {
                method: method.parse().unwrap(),
                path,
                query,
                headers: http::HeaderMap::new(),
            }
        }
        /// Adds a header.
        pub fn header(mut self, k: &str, v: &str) -> Req {
            self.headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
            self
        }
    }

    /// A context as the gateway makes it, from 127.0.0.1 on route `r`.
    pub fn ctx() -> Context {
        Context {
            request_id: "req-1".into(),
            route: Arc::from("r"),
            client_ip: Some("127.0.0.1".parse().unwrap()),
            ..Context::default()
        }
    }

    /// Builds a plugin from `NAME: settings` YAML with the built-in registry.
    pub fn build(yaml: &str) -> Result<Arc<dyn Plugin>, String> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        Registry::builtin().build(&v).map_err(|e| e.to_string())
    }

    /// Runs `on_request`; returns the flow and the header edits.
    pub async fn request(p: &dyn Plugin, r: &Req, ctx: &mut Context) -> (Flow, HeaderEdits) {
        let mut edits = HeaderEdits::default();
        let mut view = RequestView {
            method: &r.method,
            path: &r.path,
            query: r.query.as_deref(),
            headers: &r.headers,
            edits: &mut edits,
        };
        let flow = p.on_request(&mut view, ctx).await;
        (flow, edits)
    }

    /// Runs `on_response` for a response with `status` and `headers`.
    pub fn response(
        p: &dyn Plugin,
        r: &Req,
        status: u16,
        headers: &[(&str, &str)],
        ctx: &mut Context,
    ) -> (Option<Box<dyn BodyFilter>>, HeaderEdits) {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut edits = HeaderEdits::default();
        let mut view = ResponseView {
            status,
            headers: &h,
            edits: &mut edits,
            request_method: &r.method,
            request_headers: &r.headers,
        };
        let f = p.on_response(&mut view, ctx);
        (f, edits)
    }

    /// The reply of a flow that must be a reply.
    pub fn reply(f: Flow) -> Reply {
        match f {
            Flow::Respond(r) => r,
            Flow::Continue => panic!("expected a reply, got Continue"),
        }
    }

    /// A reply's header.
    pub fn reply_header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value an edit sets for `name`.
    pub fn set_value(e: &HeaderEdits, name: &str) -> Option<String> {
        e.set
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap().to_string())
    }

    /// The context's response header `name`.
    pub fn ctx_header(c: &Context, name: &str) -> Option<String> {
        c.response_headers
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap().to_string())
    }

    /// A fresh temporary folder for one test.
    pub fn temp_dir(tag: &str) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "portico-plugins-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vary_merges_across_plugins() {
        let mut h = http::HeaderMap::new();
        h.insert("vary", "Cookie".parse().unwrap());
        let mut edits = HeaderEdits::default();
        let m = http::Method::GET;
        let rh = http::HeaderMap::new();
        let mut view = ResponseView {
            status: 200,
            headers: &h,
            edits: &mut edits,
            request_method: &m,
            request_headers: &rh,
        };
        add_vary(&mut view, "Origin");
        add_vary(&mut view, "Accept-Encoding");
        add_vary(&mut view, "origin");
        assert_eq!(edits.set.len(), 1);
        assert_eq!(edits.set[0].1, "Cookie, Origin, Accept-Encoding");
    }

    #[test]
    fn builtin_names() {
        assert_eq!(
            Registry::builtin().names(),
            [
                "api_key",
                "basic_auth",
                "cache",
                "compression",
                "cors",
                "fault",
                "headers",
                "ip_filter",
                "jwt",
                "rate_limit",
                "request_size"
            ]
        );
    }

    #[test]
    fn error_locations() {
        let r = Registry::builtin();
        let loc = |y: &str| {
            let v: serde_yaml::Value = serde_yaml::from_str(y).unwrap();
            let e = r.build(&v).err().unwrap();
            e.location(&v).map(|l| (l.path, l.key))
        };
        assert_eq!(
            loc("rate_limit: { requests: 10, per: 1s, burts: 5 }"),
            Some(("burts".into(), true))
        );
        assert_eq!(
            loc("ip_filter: { allow: [10.0.0.0/8, 10.0.0.0/33] }"),
            Some(("allow[1]".into(), false))
        );
        assert_eq!(
            loc("rate_limit: { requests: x, per: 1s }"),
            Some(("requests".into(), false))
        );
        assert_eq!(
            loc("rate_limit: { requests: 1, per: 1 }"),
            Some(("per".into(), false))
        );
        assert_eq!(
            loc("headers: { request: { sett: {} } }"),
            Some(("request.sett".into(), true))
        );
        assert_eq!(
            loc("headers: { request: { set: { 'bad name': x } } }"),
            Some(("request.set.bad name".into(), false))
        );
        assert_eq!(
            loc("jwt: { algorithms: [HS256, XX1], secret: s }"),
            Some(("algorithms[1]".into(), false))
        );
        assert_eq!(loc("jwt: { algorithms: [HS256] }"), None);
        assert_eq!(
            loc("jwt: { algorithms: [HS256], secret: s, forward_claims: { a.b: 'x y' } }"),
            Some(("forward_claims".into(), false))
        );
        assert_eq!(
            loc("rate_limit: { per: 1s }"),
            None,
            "missing field: the entry"
        );
    }

    #[test]
    fn settings_are_strict() {
        let v: serde_yaml::Value =
            serde_yaml::from_str("ip_filter: { allow: [1.2.3.4], bogus: 1 }").unwrap();
        let e = Registry::builtin().build(&v).err().unwrap().to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    struct Deny;
    #[async_trait::async_trait]
    impl Plugin for Deny {
        fn name(&self) -> &'static str {
            "deny"
        }
        async fn on_request(&self, _r: &mut RequestView<'_>, c: &mut Context) -> Flow {
            Flow::Respond(Reply::error(403, "denied", "no", c))
        }
    }
    struct DenyFactory;
    impl Factory for DenyFactory {
        fn name(&self) -> &'static str {
            "deny"
        }
        fn build(&self, s: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
            if s.is_null() {
                Ok(Arc::new(Deny))
            } else {
                Err("takes no settings".into())
            }
        }
    }

    #[test]
    fn registry_builds_and_refuses() {
        let mut r = Registry::default();
        r.register(Arc::new(DenyFactory));
        let ok: serde_yaml::Value = serde_yaml::from_str("deny: ~").unwrap();
        assert!(r.build(&ok).is_ok());
        let bad: serde_yaml::Value = serde_yaml::from_str("deny: 3").unwrap();
        assert!(matches!(r.build(&bad), Err(EntryError::Settings { .. })));
        let unknown: serde_yaml::Value = serde_yaml::from_str("nope: {}").unwrap();
        assert!(matches!(r.build(&unknown), Err(EntryError::Shape(_))));
    }
}
