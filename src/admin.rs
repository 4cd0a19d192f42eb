//! The admin listener: health, readiness, metrics and the state of the running
//! gateway as JSON. It binds to loopback by default; on any other address every
//! request must carry `Authorization: Bearer <token>` (the token comes from the
//! environment variable named by `admin.token_env`). `/config` never shows secrets.

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
        // Drain any body so the connection stays usable.
        while let Ok(Some(_)) = session.read_request_body().await {}
        if !self.authorized(session) {
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
                } else if !self.gw.ready.load(Ordering::Relaxed) {
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
