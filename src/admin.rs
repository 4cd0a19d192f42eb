//! The admin listener: health, readiness, metrics and the state of the running
//! gateway as JSON. It binds to loopback by default; on any other address every
//! request must carry `Authorization: Bearer <token>` (the token comes from the
//! environment variable named by `admin.token_env`), except `GET /healthz` and
//! `GET /readyz`, which tell nothing but up/ready and must answer load-balancer and
//! kubelet probes that cannot send a token. `/config` never shows secrets.

use crate::gateway::Gateway;
use crate::snapshot::Snapshot;
use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The admin application.
pub struct Admin {
    pub gw: Arc<Gateway>,
    /// Required bearer token, if any.
    pub token: Option<String>,
}

fn reply(status: u16, body: Value) -> http::Response<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(&body).unwrap_or_default();
    b.push(b'\n');
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", b.len())
        .body(b)
        .unwrap_or_default()
}

/// Keys whose values are secrets in any part of the config.
fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    if k.ends_with("_env") || k.ends_with("_file") {
        return false; // names of where secrets live, not secrets
    }
    matches!(
        k.as_str(),
        "secret"
            | "token"
            | "password"
            | "keys"
            | "users"
            | "key"
            | "private_key"
            | "api_key"
            | "client_secret"
    ) || k.ends_with("_secret")
        || k.ends_with("_token")
        || k.ends_with("_password")
}

/// Replaces secret values with `"<redacted>"`, recursively.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if is_secret_key(k) && !val.is_null() {
                    *val = Value::String("<redacted>".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        Value::String(s) if s.starts_with("redis://") || s.starts_with("rediss://") => {
            // credentials inside URLs
            if let Some(at) = s.find('@') {
                let scheme_end = s.find("://").map(|i| i + 3).unwrap_or(0);
                *s = format!("{}<redacted>{}", &s[..scheme_end], &s[at..]);
            }
        }
        _ => {}
    }
}

fn routes_json(snap: &Snapshot) -> Value {
    let routes: Vec<Value> = snap
        .table
        .routes()
        .iter()
        .map(|r| {
            let cfg = &snap.config.routes[r.index];
            json!({
                "name": &*r.name,
                "match": serde_json::to_value(&cfg.matcher).unwrap_or(Value::Null),
                "action": r.action.describe(),
                "plugins": r.plugins.iter().map(|p| p.name()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "version": snap.version, "routes": routes })
}

fn upstreams_json(snap: &Snapshot) -> Value {
    let mut out = serde_json::Map::new();
    for (name, up) in &snap.upstreams {
        let eps: Vec<Value> = up
            .endpoints
            .iter()
            .map(|e| {
                json!({
                    "address": e.label,
                    "weight": e.weight,
                    "healthy": e.available(),
                    "health_check_ok": e.healthy.load(Ordering::Relaxed),
                    "ejected": e.ejected_until.load(Ordering::Relaxed) > crate::upstream::now_ms(),
                    "circuit_open": e.breaker.is_open(),
                    "inflight": e.inflight.load(Ordering::Relaxed),
                })
            })
            .collect();
        out.insert(
            name.clone(),
            json!({ "balance": up.balance_name(), "endpoints": eps }),
        );
    }
    Value::Object(out)
}

impl Admin {
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let got = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(got.as_bytes(), token.as_bytes())
    }

    fn refresh_health_gauges(&self, snap: &Snapshot) {
        self.gw.metrics.registry_instances.reset();
        for (svc, state, n) in self.gw.registry.counts() {
            self.gw
                .metrics
                .registry_instances
                .with_label_values(&[&svc, state])
                .set(n);
        }
        for (name, up) in &snap.upstreams {
            self.gw
                .metrics
                .breaker_open
                .with_label_values(&[name])
                .set(up.open_breakers() as i64);
            for e in &up.endpoints {
                self.gw
                    .metrics
                    .endpoint_healthy
                    .with_label_values(&[name, &e.label])
                    .set(i64::from(e.available()));
            }
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    address: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Scale {
    replicas: u32,
}

/// The answer for a write the shared (etcd) registry refused or could not take.
fn shared_error(
    e: crate::registry::etcd::WriteError,
    svc: &str,
    id: &str,
) -> http::Response<Vec<u8>> {
    let (status, body) = crate::registry::etcd::error_reply(e, svc, id);
    reply(status, body)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl Admin {
    fn orchestrator(&self) -> Option<Arc<crate::orchestrator::Orchestrator>> {
        self.gw.orchestrator.lock().ok().and_then(|g| g.clone())
    }

    async fn registry_api(&self, method: &str, path: &str, body: &[u8]) -> http::Response<Vec<u8>> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // registry / services / {service} / instances / {id} [/ heartbeat]
        let (svc, id, heartbeat) = match parts.as_slice() {
            ["registry", "services", s, "instances", i] => (*s, *i, false),
            ["registry", "services", s, "instances", i, "heartbeat"] => (*s, *i, true),
            _ => {
                return reply(
                    404,
                    json!({"error": "not_found", "message": format!("no admin endpoint {path}")}),
                )
            }
        };
        if !valid_name(svc) || !valid_name(id) {
            return reply(
                400,
                json!({"error": "bad_request", "message": "service and instance ids are [A-Za-z0-9-_.:]"}),
            );
        }
        let reg = &self.gw.registry;
        let shared = reg.shared();
        match (method, heartbeat) {
            ("PUT", true) => {
                if let Some(e) = shared {
                    return match e.heartbeat(svc, id).await {
                        Ok(()) => reply(200, json!({"status": "renewed"})),
                        Err(err) => shared_error(err, svc, id),
                    };
                }
                if reg.heartbeat(svc, id) {
                    reply(200, json!({"status": "renewed"}))
                } else {
                    reply(
                        404,
                        json!({"error": "not_found", "message": format!("{svc}/{id} is not registered")}),
                    )
                }
            }
            ("PUT", false) => {
                let r: Registration = match serde_json::from_slice(body) {
                    Ok(r) => r,
                    Err(e) => {
                        return reply(
                            400,
                            json!({"error": "bad_request", "message": format!("invalid registration: {e}")}),
                        )
                    }
                };
                let ttl = match r.ttl.as_deref().map(crate::config::units::parse_duration) {
                    None => None,
                    Some(Ok(t)) if !t.is_zero() => Some(t),
                    Some(Ok(_)) => None,
                    Some(Err(e)) => {
                        return reply(400, json!({"error": "bad_request", "message": e}))
                    }
                };
                match crate::registry::instance(
                    id,
                    &r.address,
                    r.labels,
                    ttl,
                    crate::registry::Source::Api,
                ) {
                    Ok(i) => {
                        if let Some(e) = shared {
                            if let Err(err) = e.register(svc, &i).await {
                                return shared_error(err, svc, id);
                            }
                        } else {
                            reg.upsert(svc, i);
                        }
                        reply(
                            200,
                            json!({"status": "registered", "service": svc, "id": id}),
                        )
                    }
                    Err(e) => reply(400, json!({"error": "bad_request", "message": e})),
                }
            }
            ("DELETE", false) => {
                let gone = match shared {
                    Some(e) => match e.deregister(svc, id).await {
                        Ok(()) => true,
                        Err(crate::registry::etcd::WriteError::NotFound) => false,
                        Err(err) => return shared_error(err, svc, id),
                    },
                    None => reg.remove(svc, id).is_some(),
                };
                if gone {
                    reply(200, json!({"status": "deregistered"}))
                } else {
                    reply(
                        404,
                        json!({"error": "not_found", "message": format!("{svc}/{id} is not registered")}),
                    )
                }
            }
            _ => reply(
                405,
                json!({"error": "method_not_allowed", "message": format!("{method} is not allowed on {path}")}),
            ),
        }
    }

    fn orchestrator_api(&self, method: &str, path: &str, body: &[u8]) -> http::Response<Vec<u8>> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ["orchestrator", "deployments", name, "replicas"] = parts.as_slice() else {
            return reply(
                404,
                json!({"error": "not_found", "message": format!("no admin endpoint {path}")}),
            );
        };
        if method != "PUT" {
            return reply(
                405,
                json!({"error": "method_not_allowed", "message": "use PUT"}),
            );
        }
        let s: Scale = match serde_json::from_slice(body) {
            Ok(s) => s,
            Err(e) => {
                return reply(
                    400,
                    json!({"error": "bad_request", "message": format!("expected {{\"replicas\": N}}: {e}")}),
                )
            }
        };
        if s.replicas > 64 {
            return reply(
                400,
                json!({"error": "bad_request", "message": "at most 64 replicas"}),
            );
        }
        match self.orchestrator() {
            Some(o) if o.scale(name, s.replicas) => {
                reply(200, json!({"deployment": name, "replicas": s.replicas}))
            }
            _ => reply(
                404,
                json!({"error": "not_found", "message": format!("no deployment {name}")}),
            ),
        }
    }
}

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        // Read the body (bounded) so the connection stays usable.
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            if body.len() + chunk.len() > 1 << 20 {
                return reply(
                    413,
                    json!({"error": "too_large", "message": "admin request bodies are limited to 1 MiB"}),
                );
            }
            body.extend_from_slice(&chunk);
        }
        let probe = matches!(
            session.req_header().method,
            http::Method::GET | http::Method::HEAD
        ) && matches!(session.req_header().uri.path(), "/healthz" | "/readyz");
        if !probe && !self.authorized(session) {
            return reply(
                401,
                json!({"error": "unauthorized", "message": "admin API needs a bearer token"}),
            );
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let snap = self.gw.current();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => reply(200, json!({"status": "ok"})),
            ("GET", "/readyz") => {
                if self.gw.draining.load(Ordering::Relaxed) {
                    reply(503, json!({"status": "draining"}))
                } else if !self.gw.ready.load(Ordering::Relaxed)
                    || !self.gw.sources_synced.load(Ordering::Relaxed)
                {
                    reply(503, json!({"status": "starting"}))
                } else {
                    reply(200, json!({"status": "ready", "version": snap.version}))
                }
            }
            ("GET", "/metrics") => {
                self.refresh_health_gauges(&snap);
                let body = self.gw.metrics.render();
                http::Response::builder()
                    .status(200)
                    .header("content-type", "text/plain; version=0.0.4")
                    .header("content-length", body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            ("GET", "/config") => {
                let mut cfg = serde_json::to_value(&*snap.config).unwrap_or(Value::Null);
                redact(&mut cfg);
                let last_error = self.gw.last_error.lock().map(|e| e.clone()).unwrap_or(None);
                let loaded_at = self
                    .gw
                    .loaded_at
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default();
                reply(
                    200,
                    json!({
                        "version": snap.version,
                        "loaded_at": loaded_at,
                        "source": self.gw.config_path.display().to_string(),
                        "config": cfg,
                        "last_reload_error": last_error,
                    }),
                )
            }
            ("POST", "/reload") => {
                let gw = Arc::clone(&self.gw);
                let res = tokio::task::spawn_blocking(move || gw.reload(true, "admin API")).await;
                match res {
                    Ok(Ok(v)) => reply(200, json!({"status": "reloaded", "version": v})),
                    Ok(Err(errs)) => reply(
                        400,
                        json!({"error": "invalid_config", "message": "the new config was refused; the running config stays", "errors": errs}),
                    ),
                    Err(e) => reply(500, json!({"error": "internal", "message": e.to_string()})),
                }
            }
            ("GET", "/routes") => reply(200, routes_json(&snap)),
            ("POST", "/cache/purge") => {
                #[derive(serde::Deserialize, Default)]
                #[serde(deny_unknown_fields)]
                struct Purge {
                    #[serde(default)]
                    path_prefix: Option<String>,
                }
                let req: Purge = if body.iter().all(u8::is_ascii_whitespace) {
                    Purge::default()
                } else {
                    match serde_json::from_slice(&body) {
                        Ok(p) => p,
                        Err(e) => {
                            return reply(
                                400,
                                json!({"error": "bad_request", "message": format!("expected {{\"path_prefix\": \"/x\"}} or {{}}: {e}")}),
                            )
                        }
                    }
                };
                let purged: usize = snap
                    .plugin_instances
                    .iter()
                    .map(|(_, _, p)| p.purge(req.path_prefix.as_deref()))
                    .sum();
                reply(200, json!({"purged": purged}))
            }
            ("GET", "/registry/services") => reply(200, self.gw.registry.to_json()),
            ("GET", "/orchestrator/deployments") => match self.orchestrator() {
                Some(o) => reply(200, o.to_json()),
                None => reply(200, json!({"deployments": []})),
            },
            (m, p) if p.starts_with("/registry/services/") => self.registry_api(m, p, &body).await,
            (m, p) if p.starts_with("/orchestrator/deployments/") => {
                self.orchestrator_api(m, p, &body)
            }
            ("GET", "/upstreams") => reply(200, upstreams_json(&snap)),
            (
                _,
                "/healthz" | "/readyz" | "/metrics" | "/config" | "/reload" | "/routes"
                | "/upstreams",
            ) => reply(
                405,
                json!({"error": "method_not_allowed", "message": format!("{method} is not allowed on {path}")}),
            ),
            _ => reply(
                404,
                json!({"error": "not_found", "message": format!("no admin endpoint {path}")}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secrets_but_not_env_names() {
        let mut v = json!({"plugins": [{"jwt": {"secret": "s3cr3t", "secret_env": "JWT"}}],
                           "admin": {"token_env": "T"}, "redis": {"url": "redis://u:p@h:1"}});
        redact(&mut v);
        let s = v.to_string();
        assert!(!s.contains("s3cr3t"));
        assert!(s.contains("\"JWT\""));
        assert!(!s.contains("u:p"));
    }
}
