//! The `api_key` plugin: the request carries a key in a header (default `x-api-key`)
//! or a query parameter; a known key names its consumer, anything else is a 401.
//! Keys are held only as SHA-256 digests and looked up by the digest of what the
//! client sent, so the comparison never runs over the secret bytes themselves (the
//! lookup's timing depends on digests an attacker cannot steer toward a key). Keys
//! come inline (`keys: { KEY: consumer }`) and/or from `keys_file` (a YAML map, or
//! `KEY CONSUMER` lines), which is re-read when it changes. The consumer goes to
//! `ctx.consumer` and upstream in `x-consumer` (`forward_header`); client-sent copies of
//! that header are always removed, and so is the key header (`hide_credentials`).

use crate::util::{header_name, sha256, WatchedFile};
use crate::{Context, Factory, Flow, Plugin, Reply, RequestView};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

fn default_true() -> bool {
    true
}

/// The `api_key` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    keys: Option<BTreeMap<String, String>>,
    #[serde(default)]
    keys_file: Option<PathBuf>,
    #[serde(default)]
    forward_header: Option<String>,
    #[serde(default = "default_true")]
    hide_credentials: bool,
}

type Digests = HashMap<[u8; 32], Arc<str>>;

/// The `api_key` plugin instance.
pub struct ApiKey {
    header: Option<http::HeaderName>,
    query: Option<String>,
    inline: Digests,
    file: Option<WatchedFile<Digests>>,
    forward: Option<http::HeaderName>,
    hide: bool,
}

/// Builds [`ApiKey`] instances.
pub struct ApiKeyFactory;

impl Factory for ApiKeyFactory {
    fn name(&self) -> &'static str {
        "api_key"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(ApiKey::new(crate::settings(settings)?)?))
    }
}

fn digest_map(keys: impl IntoIterator<Item = (String, String)>) -> Result<Digests, String> {
    let mut m = HashMap::new();
    for (k, c) in keys {
        if k.is_empty() {
            return Err("an empty key".into());
        }
        if c.is_empty() {
            return Err("a key with an empty consumer name".into());
        }
        if m.insert(sha256(k.as_bytes()), Arc::from(c.as_str()))
            .is_some()
        {
            return Err("a key is listed twice".into());
        }
    }
    Ok(m)
}

/// Parses a keys file: a YAML map `KEY: consumer`, or lines `KEY CONSUMER` (blank lines
/// and `#` comments skipped).
fn parse_keys_file(text: &str) -> Result<Digests, String> {
    if let Ok(serde_yaml::Value::Mapping(m)) = serde_yaml::from_str::<serde_yaml::Value>(text) {
        let mut pairs = vec![];
        for (k, v) in m {
            let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                return Err("a YAML keys file maps key strings to consumer names".into());
            };
            pairs.push((k.to_string(), v.to_string()));
        }
        return digest_map(pairs);
    }
    let mut pairs = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(c), None) => pairs.push((k.to_string(), c.to_string())),
            _ => return Err(format!("line {}: expected `KEY CONSUMER`", i + 1)),
        }
    }
    digest_map(pairs)
}

impl ApiKey {
    fn new(s: Settings) -> Result<ApiKey, String> {
        let header = match (&s.header, &s.query) {
            (Some(h), _) => Some(header_name("header", h)?),
            (None, Some(_)) => None,
            (None, None) => Some(http::HeaderName::from_static("x-api-key")),
        };
        if s.query.as_deref() == Some("") {
            return Err("query: parameter name must not be empty".into());
        }
        if s.keys.is_none() && s.keys_file.is_none() {
            return Err("set keys ({ KEY: consumer }) or keys_file".into());
        }
        let inline = digest_map(s.keys.unwrap_or_default()).map_err(|e| format!("keys: {e}"))?;
        let file = match &s.keys_file {
            Some(p) => {
                Some(WatchedFile::open(p, parse_keys_file).map_err(|e| format!("keys_file: {e}"))?)
            }
            None => None,
        };
        let forward = match s.forward_header.as_deref() {
            None => Some(http::HeaderName::from_static("x-consumer")),
            Some("") => None,
            Some(h) => Some(header_name("forward_header", h)?),
        };
        Ok(ApiKey {
            header,
            query: s.query,
            inline,
            file,
            forward,
            hide: s.hide_credentials,
        })
    }

    fn lookup(&self, key: &str) -> Option<Arc<str>> {
        let d = sha256(key.as_bytes());
        if let Some(c) = self.inline.get(&d) {
            return Some(Arc::clone(c));
        }
        let (file, _) = self.file.as_ref()?.get();
        file.get(&d).cloned()
    }
}

#[async_trait::async_trait]
impl Plugin for ApiKey {
    fn name(&self) -> &'static str {
        "api_key"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        if let Some(f) = &self.forward {
            req.edits.remove(f.clone());
        }
        let from_header = self
            .header
            .as_ref()
            .and_then(|h| req.headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(|v| std::borrow::Cow::Borrowed(v.trim()));
        let key = from_header.or_else(|| {
            self.query
                .as_deref()
                .and_then(|q| crate::util::query_param(req.query, q))
        });
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Flow::Respond(Reply::error(401, "unauthorized", "missing API key", ctx));
        };
        let Some(consumer) = self.lookup(&key) else {
            return Flow::Respond(Reply::error(401, "unauthorized", "invalid API key", ctx));
        };
        if self.hide {
            if let Some(h) = &self.header {
                req.edits.remove(h.clone());
            }
        }
        if let Some(f) = &self.forward {
            if let Ok(v) = http::HeaderValue::from_str(&consumer) {
                req.edits.set(f.clone(), v);
            }
        }
        ctx.consumer = Some(consumer.to_string());
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[tokio::test]
    async fn header_keys() {
        let p = build("api_key: { keys: { k-alice: alice, k-bob: bob } }").unwrap();
        let r = Req::get("/x")
            .header("x-api-key", "k-bob")
            .header("x-consumer", "admin");
        let mut c = ctx();
        let (f, e) = request(&*p, &r, &mut c).await;
        assert!(matches!(f, Flow::Continue));
        assert_eq!(c.consumer.as_deref(), Some("bob"));
        assert_eq!(set_value(&e, "x-consumer").as_deref(), Some("bob"));
        assert!(e.remove.iter().any(|h| h == "x-api-key"), "key hidden");

        for (r, msg) in [
            (Req::get("/x"), "missing API key"),
            (
                Req::get("/x").header("x-api-key", "k-carol"),
                "invalid API key",
            ),
            (
                Req::get("/x").header("x-api-key", "k-bo"),
                "invalid API key",
            ),
            (Req::get("/x?api_key=k-bob"), "missing API key"),
        ] {
            let mut c = ctx();
            let (f, e) = request(&*p, &r, &mut c).await;
            let rep = reply(f);
            assert_eq!(rep.status, 401);
            assert!(String::from_utf8_lossy(&rep.body).contains(msg));
            assert!(c.consumer.is_none());
            assert!(e.remove.iter().any(|h| h == "x-consumer"));
        }
    }

    #[tokio::test]
    async fn query_and_options() {
        let p = build(
            "api_key: { query: api_key, keys: { 's3cr%t': svc }, forward_header: x-client, hide_credentials: false }",
        )
        .unwrap();
        let mut c = ctx();
        let (f, e) = request(&*p, &Req::get("/x?a=1&api_key=s3cr%25t"), &mut c).await;
        assert!(matches!(f, Flow::Continue));
        assert_eq!(set_value(&e, "x-client").as_deref(), Some("svc"));
        // Query-only: the default header is not consulted.
        let r = Req::get("/x").header("x-api-key", "s3cr%t");
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Respond(_)
        ));
        // Header and query both configured.
        let p = build("api_key: { header: x-key, query: key, keys: { a: b } }").unwrap();
        let r = Req::get("/x").header("x-key", "a");
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Continue
        ));
        assert!(matches!(
            request(&*p, &Req::get("/?key=a"), &mut ctx()).await.0,
            Flow::Continue
        ));
    }

    #[tokio::test]
    async fn keys_files() {
        let d = temp_dir("api-key");
        std::fs::write(d.join("keys.yaml"), "k1: one\n'k 2': two\n").unwrap();
        std::fs::write(d.join("keys.txt"), "# comment\nk3 three\n\nk4  four\n").unwrap();
        for (file, key, who) in [("keys.yaml", "k 2", "two"), ("keys.txt", "k4", "four")] {
            let p = build(&format!(
                "api_key: {{ keys_file: {} }}",
                d.join(file).display()
            ))
            .unwrap();
            let mut c = ctx();
            let (f, _) = request(&*p, &Req::get("/").header("x-api-key", key), &mut c).await;
            assert!(matches!(f, Flow::Continue));
            assert_eq!(c.consumer.as_deref(), Some(who));
        }
        std::fs::write(d.join("bad.txt"), "k1 a b\n").unwrap();
        let e = build(&format!(
            "api_key: {{ keys_file: {} }}",
            d.join("bad.txt").display()
        ))
        .err()
        .unwrap();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("api_key: {}").contains("keys"));
        assert!(e("api_key: { keys: { a: b }, header: 'bad header' }").contains("header"));
        assert!(e("api_key: { keys: { '': b } }").contains("empty key"));
        assert!(e("api_key: { keys_file: /nope/keys }").contains("cannot read"));
        assert!(e("api_key: { keys: { a: b }, extra: 1 }").contains("unknown field"));
    }
}
