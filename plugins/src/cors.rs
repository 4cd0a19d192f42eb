//! The `cors` plugin: Cross-Origin Resource Sharing. A preflight (`OPTIONS` with
//! `Origin` and `Access-Control-Request-Method`) is answered by the gateway and never
//! reaches the backend: 204 with the allow headers when the origin, method and
//! headers are allowed, else 403 JSON (`cors_forbidden`) without any CORS header, so
//! a misconfiguration is visible in the browser's network tab. An actual request from
//! an allowed origin gets `Access-Control-Allow-Origin` with that origin echoed (never
//! `*`, so it also works with credentials), `Access-Control-Allow-Credentials` and
//! `Access-Control-Expose-Headers` as configured — also on rejections by later
//! plugins (a 401 or 429 stays readable by the page); other origins get no CORS
//! header, and the request goes on (the browser enforces the policy). Every answer
//! varies on `Origin`. Put `cors` first in a chain, before authentication: preflights
//! carry no credentials.
//!
//! `allow_origins` entries are `*` (any origin but `null`), exact origins
//! (`https://app.example.com`), or wildcard hosts (`https://*.example.com`, one or more
//! labels; without a scheme, http and https both match).

use crate::units::Dur;
use crate::{add_vary, Context, Factory, Flow, Plugin, Reply, RequestView, ResponseView};
use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The `cors` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    allow_origins: Vec<String>,
    #[serde(default = "default_methods")]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Option<Vec<String>>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    max_age: Option<Dur>,
    #[serde(default)]
    allow_credentials: bool,
}

enum OriginRule {
    Any,
    Exact(String),
    /// Scheme (None = http or https) and host suffix (`.example.com[:port]`).
    Wildcard(Option<String>, String),
}

impl OriginRule {
    fn parse(s: &str) -> Result<OriginRule, String> {
        let t = s.trim().to_ascii_lowercase();
        if t == "*" {
            return Ok(OriginRule::Any);
        }
        if t.ends_with('/') || t.matches("://").count() > 1 {
            return Err(format!(
                "allow_origins: {s:?} is not an origin (scheme://host[:port], no path)"
            ));
        }
        let (scheme, rest) = match t.split_once("://") {
            Some((sc, r)) => (Some(sc.to_string()), r.to_string()),
            None => (None, t.clone()),
        };
        if let Some(suffix) = rest.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                return Err(format!(
                    "allow_origins: {s:?}: a wildcard is written *.example.com"
                ));
            }
            return Ok(OriginRule::Wildcard(scheme, suffix.to_string()));
        }
        if rest.contains('*') || rest.contains('/') {
            return Err(format!("allow_origins: {s:?} is not an origin"));
        }
        if scheme.is_none() && t != "null" {
            return Err(format!("allow_origins: {s:?} needs a scheme (https://{t})"));
        }
        Ok(OriginRule::Exact(t))
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            OriginRule::Any => origin != "null",
            OriginRule::Exact(o) => origin.eq_ignore_ascii_case(o),
            OriginRule::Wildcard(scheme, suffix) => {
                let o = origin.to_ascii_lowercase();
                let Some((sc, rest)) = o.split_once("://") else {
                    return false;
                };
                let scheme_ok = match scheme {
                    Some(s) => s == sc,
                    None => sc == "http" || sc == "https",
                };
                let Some(labels) = rest.strip_suffix(suffix.as_str()) else {
                    return false;
                };
                scheme_ok
                    && !labels.is_empty()
                    && !labels.starts_with('.')
                    && labels
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            }
        }
    }
}

/// The `cors` plugin instance.
pub struct Cors {
    origins: Vec<OriginRule>,
    methods: Vec<String>,
    methods_value: String,
    /// `None` = reflect what the preflight asks for.
    headers: Option<Vec<String>>,
    headers_value: String,
    expose: Option<http::HeaderValue>,
    max_age: Option<String>,
    credentials: bool,
}

/// Builds [`Cors`] instances.
pub struct CorsFactory;

impl Factory for CorsFactory {
    fn name(&self) -> &'static str {
        "cors"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(Cors::new(crate::settings(settings)?)?))
    }
}

fn token_list(setting: &str, v: &[String]) -> Result<Vec<String>, String> {
    v.iter()
        .map(|t| {
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                Err(format!("{setting}: {t:?} is not a valid token"))
            } else {
                Ok(t.to_string())
            }
        })
        .collect()
}

impl Cors {
    fn new(s: Settings) -> Result<Cors, String> {
        if s.allow_origins.is_empty() {
            return Err("allow_origins: list at least one origin (or \"*\")".into());
        }
        let origins = s
            .allow_origins
            .iter()
            .map(|o| OriginRule::parse(o))
            .collect::<Result<Vec<_>, _>>()?;
        let methods: Vec<String> = token_list("allow_methods", &s.allow_methods)?
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        if methods.is_empty() {
            return Err("allow_methods: list at least one method".into());
        }
        let headers = match &s.allow_headers {
            Some(h) if h.iter().any(|x| x.trim() == "*") => None,
            Some(h) => Some(
                token_list("allow_headers", h)?
                    .into_iter()
                    .map(|x| x.to_ascii_lowercase())
                    .collect::<Vec<_>>(),
            ),
            None => None,
        };
        let expose = token_list("expose_headers", &s.expose_headers)?;
        let expose = if expose.is_empty() {
            None
        } else {
            Some(
                http::HeaderValue::from_str(&expose.join(", "))
                    .map_err(|_| "expose_headers: invalid header names".to_string())?,
            )
        };
        Ok(Cors {
            origins,
            methods_value: methods.join(", "),
            methods,
            headers_value: headers.as_ref().map(|h| h.join(", ")).unwrap_or_default(),
            headers,
            expose,
            max_age: s.max_age.map(|d| d.0.as_secs().to_string()),
            credentials: s.allow_credentials,
        })
    }

    fn allowed(&self, origin: &str) -> bool {
        self.origins.iter().any(|r| r.allows(origin))
    }

    fn preflight(&self, req: &RequestView<'_>, origin: &str, ctx: &Context) -> Reply {
        let forbid = |why: String| Reply::error(403, "cors_forbidden", &why, ctx);
        if !self.allowed(origin) {
            return forbid(format!("origin {origin} is not allowed"));
        }
        let method = req
            .headers
            .get("access-control-request-method")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim();
        if !self.methods.iter().any(|m| m == method) {
            return forbid(format!("method {method} is not allowed"));
        }
        let requested: Vec<String> = req
            .headers
            .get_all("access-control-request-headers")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let allow_headers = match &self.headers {
            None => requested.join(", "),
            Some(list) => {
                if let Some(h) = requested.iter().find(|h| !list.contains(h)) {
                    return forbid(format!("header {h} is not allowed"));
                }
                self.headers_value.clone()
            }
        };
        let mut r = Reply {
            status: 204,
            headers: vec![],
            body: Bytes::new(),
        }
        .with_header("access-control-allow-origin", origin)
        .with_header("access-control-allow-methods", self.methods_value.clone());
        if !allow_headers.is_empty() {
            r = r.with_header("access-control-allow-headers", allow_headers);
        }
        if self.credentials {
            r = r.with_header("access-control-allow-credentials", "true");
        }
        if let Some(m) = &self.max_age {
            r = r.with_header("access-control-max-age", m.clone());
        }
        r.with_header(
            "vary",
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        )
    }
}

#[async_trait::async_trait]
impl Plugin for Cors {
    fn name(&self) -> &'static str {
        "cors"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        let Some(origin) = req
            .headers
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .map(|o| o.trim().to_string())
        else {
            return Flow::Continue;
        };
        if *req.method == http::Method::OPTIONS
            && req.headers.contains_key("access-control-request-method")
        {
            return Flow::Respond(self.preflight(req, &origin, ctx));
        }
        // Vary is merged with the upstream's in on_response; this copy serves the
        // answers made without one (rejections by later plugins).
        ctx.response_headers
            .push((http::header::VARY, http::HeaderValue::from_static("Origin")));
        if !self.allowed(&origin) {
            return Flow::Continue;
        }
        let Ok(o) = http::HeaderValue::from_str(&origin) else {
            return Flow::Continue;
        };
        ctx.response_headers
            .push((http::header::ACCESS_CONTROL_ALLOW_ORIGIN, o));
        if self.credentials {
            ctx.response_headers.push((
                http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                http::HeaderValue::from_static("true"),
            ));
        }
        if let Some(e) = &self.expose {
            ctx.response_headers
                .push((http::header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone()));
        }
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseView<'_>,
        ctx: &mut Context,
    ) -> Option<Box<dyn crate::BodyFilter>> {
        let had = ctx.response_headers.len();
        ctx.response_headers
            .retain(|(k, v)| !(*k == http::header::VARY && v == "Origin"));
        if ctx.response_headers.len() != had || resp.request_headers.contains_key("origin") {
            add_vary(resp, "Origin");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn preflight(origin: &str, method: &str, headers: Option<&str>) -> Req {
        let mut r = Req::new("OPTIONS", "/api")
            .header("origin", origin)
            .header("access-control-request-method", method);
        if let Some(h) = headers {
            r = r.header("access-control-request-headers", h);
        }
        r
    }

    #[tokio::test]
    async fn preflights() {
        let p = build(
            "cors: { allow_origins: ['https://app.example.com', 'https://*.corp.test'], \
             allow_methods: [GET, POST], allow_headers: [content-type, authorization], \
             max_age: 10m, allow_credentials: true }",
        )
        .unwrap();
        let r = reply(
            request(
                &*p,
                &preflight(
                    "https://app.example.com",
                    "POST",
                    Some("Content-Type, Authorization"),
                ),
                &mut ctx(),
            )
            .await
            .0,
        );
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        let h = |n| reply_header(&r, n);
        assert_eq!(
            h("access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(h("access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(
            h("access-control-allow-headers"),
            Some("content-type, authorization")
        );
        assert_eq!(h("access-control-allow-credentials"), Some("true"));
        assert_eq!(h("access-control-max-age"), Some("600"));
        assert!(h("vary").unwrap().contains("Origin"));

        let ok = reply(
            request(
                &*p,
                &preflight("https://a.b.corp.test", "GET", None),
                &mut ctx(),
            )
            .await
            .0,
        );
        assert_eq!(ok.status, 204);
        for req in [
            preflight("https://evil.test", "GET", None),
            preflight("https://corp.test", "GET", None),
            preflight("http://a.corp.test", "GET", None),
            preflight("https://app.example.com", "DELETE", None),
            preflight("https://app.example.com", "GET", Some("x-secret")),
        ] {
            let r = reply(request(&*p, &req, &mut ctx()).await.0);
            assert_eq!(r.status, 403);
            assert!(reply_header(&r, "access-control-allow-origin").is_none());
        }
        // A plain OPTIONS (no Access-Control-Request-Method) is an actual request.
        let r = Req::new("OPTIONS", "/").header("origin", "https://app.example.com");
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Continue
        ));
    }

    #[tokio::test]
    async fn actual_requests() {
        let p = build(
            "cors: { allow_origins: ['*'], expose_headers: [x-total, x-page], allow_credentials: true }",
        )
        .unwrap();
        let r = Req::get("/").header("origin", "https://x.test");
        let mut c = ctx();
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));
        assert_eq!(
            ctx_header(&c, "access-control-allow-origin").as_deref(),
            Some("https://x.test"),
            "echoed, never * with credentials"
        );
        assert_eq!(
            ctx_header(&c, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
        assert_eq!(
            ctx_header(&c, "access-control-expose-headers").as_deref(),
            Some("x-total, x-page")
        );
        assert_eq!(ctx_header(&c, "vary").as_deref(), Some("Origin"));
        // The response merges Vary with the upstream's, and drops the placeholder.
        let (_, e) = response(&*p, &r, 200, &[("vary", "Accept-Encoding")], &mut c);
        assert_eq!(
            set_value(&e, "vary").as_deref(),
            Some("Accept-Encoding, Origin")
        );
        assert_eq!(ctx_header(&c, "vary"), None);
        // The null origin is not matched by *.
        let mut c = ctx();
        let r = Req::get("/").header("origin", "null");
        request(&*p, &r, &mut c).await;
        assert_eq!(ctx_header(&c, "access-control-allow-origin"), None);
        // No Origin: untouched.
        let mut c = ctx();
        request(&*p, &Req::get("/"), &mut c).await;
        assert!(c.response_headers.is_empty());
        // Preflight with the default allow_headers reflects what is asked.
        let rep = reply(
            request(
                &*p,
                &preflight("https://x.test", "PUT", Some("X-A, x-b")),
                &mut ctx(),
            )
            .await
            .0,
        );
        assert_eq!(
            reply_header(&rep, "access-control-allow-headers"),
            Some("x-a, x-b")
        );
    }

    #[tokio::test]
    async fn disallowed_origin_gets_nothing() {
        let p = build("cors: { allow_origins: ['https://good.test'] }").unwrap();
        let mut c = ctx();
        let r = Req::get("/").header("origin", "https://bad.test");
        assert!(matches!(request(&*p, &r, &mut c).await.0, Flow::Continue));
        assert_eq!(ctx_header(&c, "access-control-allow-origin"), None);
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("cors: {}").contains("allow_origins"));
        assert!(e("cors: { allow_origins: [] }").contains("at least one"));
        assert!(e("cors: { allow_origins: ['example.com'] }").contains("needs a scheme"));
        assert!(e("cors: { allow_origins: ['https://example.com/'] }").contains("no path"));
        assert!(e("cors: { allow_origins: ['https://a.*.com'] }").contains("not an origin"));
        assert!(e("cors: { allow_origins: ['*'], max_age: 10 }").contains("missing unit"));
        assert!(
            e("cors: { allow_origins: ['*'], allow_methods: ['GET, POST'] }").contains("token")
        );
        assert!(build("cors: { allow_origins: ['*.example.com', 'null'] }").is_ok());
    }
}
