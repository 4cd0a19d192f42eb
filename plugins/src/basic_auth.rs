//! The `basic_auth` plugin: HTTP Basic credentials checked against bcrypt hashes from
//! `users: { name: hash }` and/or an `htpasswd` file (`$2y$`/`$2b$`/`$2a$` entries; the
//! file is re-read when it changes). A missing or wrong credential is a 401 with
//! `WWW-Authenticate: Basic realm="portico"`. bcrypt is deliberately slow (tens to
//! hundreds of milliseconds), so a verification runs on Tokio's blocking pool, at most
//! as many at once as there are cores, and a success is remembered for `cache_ttl`
//! (default 60 s) under the SHA-256 of user, password and stored hash, in a bounded
//! map: repeated requests cost a hash lookup. An unknown user is verified against a
//! dummy hash so that the answer takes as long as for a known one.

use crate::units::Dur;
use crate::util::{header_name, sha256, WatchedFile};
use crate::{Context, Factory, Flow, Plugin, Reply, RequestView};
use base64::Engine;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Most successful logins remembered at once.
const CACHE_MAX: usize = 10_000;

fn default_realm() -> String {
    "portico".into()
}
fn default_ttl() -> Dur {
    Dur(Duration::from_secs(60))
}

/// The `basic_auth` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    users: Option<BTreeMap<String, String>>,
    #[serde(default)]
    htpasswd: Option<PathBuf>,
    #[serde(default = "default_realm")]
    realm: String,
    #[serde(default = "default_ttl")]
    cache_ttl: Dur,
    #[serde(default)]
    forward_header: Option<String>,
    #[serde(default)]
    hide_credentials: bool,
}

type Users = HashMap<String, Arc<str>>;

fn check_hash(user: &str, hash: &str) -> Result<(), String> {
    if !(hash.starts_with("$2y$")
        || hash.starts_with("$2b$")
        || hash.starts_with("$2a$")
        || hash.starts_with("$2x$"))
    {
        return Err(format!(
            "user {user:?}: only bcrypt hashes ($2y$, $2b$, $2a$) are supported"
        ));
    }
    hash.parse::<bcrypt::HashParts>()
        .map(|_| ())
        .map_err(|e| format!("user {user:?}: invalid bcrypt hash ({e})"))
}

fn parse_htpasswd(text: &str) -> Result<Users, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected `user:hash`", i + 1))?;
        check_hash(user, hash).map_err(|e| format!("line {}: {e}", i + 1))?;
        users.insert(user.to_string(), Arc::from(hash));
    }
    Ok(users)
}

/// The `basic_auth` plugin instance.
pub struct BasicAuth {
    inline: Users,
    file: Option<WatchedFile<Users>>,
    challenge: String,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    permits: Arc<tokio::sync::Semaphore>,
    dummy_cost: u32,
    forward: Option<http::HeaderName>,
    hide: bool,
}

/// Builds [`BasicAuth`] instances.
pub struct BasicAuthFactory;

impl Factory for BasicAuthFactory {
    fn name(&self) -> &'static str {
        "basic_auth"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(BasicAuth::new(crate::settings(settings)?)?))
    }
}

/// A bcrypt hash of a password nobody knows, with `cost`, to spend the same time on
/// unknown users.
fn dummy_hash(cost: u32) -> Option<&'static str> {
    static H: OnceLock<Option<String>> = OnceLock::new();
    H.get_or_init(|| bcrypt::hash(format!("{:x}", rand_u64()), cost).ok())
        .as_deref()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

impl BasicAuth {
    fn new(s: Settings) -> Result<BasicAuth, String> {
        if s.users.is_none() && s.htpasswd.is_none() {
            return Err("set users ({ name: bcrypt-hash }) or htpasswd (a file)".into());
        }
        let mut inline = HashMap::new();
        for (u, h) in s.users.unwrap_or_default() {
            if u.is_empty() || u.contains(':') {
                return Err(format!("users: {u:?} is not a valid user name"));
            }
            check_hash(&u, &h).map_err(|e| format!("users: {e}"))?;
            inline.insert(u, Arc::from(h.as_str()));
        }
        let file = match &s.htpasswd {
            Some(p) => {
                Some(WatchedFile::open(p, parse_htpasswd).map_err(|e| format!("htpasswd: {e}"))?)
            }
            None => None,
        };
        if s.realm.contains('"') || s.realm.contains('\\') {
            return Err("realm: must not contain quotes or backslashes".into());
        }
        let dummy_cost = inline
            .values()
            .next()
            .and_then(|h: &Arc<str>| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .unwrap_or(10);
        let forward = match s.forward_header.as_deref() {
            None => Some(http::HeaderName::from_static("x-consumer")),
            Some("") => None,
            Some(h) => Some(header_name("forward_header", h)?),
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Ok(BasicAuth {
            inline,
            file,
            challenge: format!("Basic realm=\"{}\"", s.realm),
            ttl: s.cache_ttl.0,
            cache: Mutex::new(HashMap::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(cores.max(2))),
            dummy_cost,
            forward,
            hide: s.hide_credentials,
        })
    }

    fn stored_hash(&self, user: &str) -> Option<Arc<str>> {
        if let Some(h) = self.inline.get(user) {
            return Some(Arc::clone(h));
        }
        let file = self.file.as_ref()?;
        let (users, reloaded) = file.get();
        if reloaded {
            self.cache_clear();
        }
        users.get(user).cloned()
    }

    fn cache_clear(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }

    fn cache_hit(&self, key: &[u8; 32]) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let Ok(mut c) = self.cache.lock() else {
            return false;
        };
        match c.get(key) {
            Some(exp) if *exp > Instant::now() => true,
            Some(_) => {
                c.remove(key);
                false
            }
            None => false,
        }
    }

    fn cache_put(&self, key: [u8; 32]) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut c) = self.cache.lock() else {
            return;
        };
        let now = Instant::now();
        if c.len() >= CACHE_MAX {
            c.retain(|_, exp| *exp > now);
            if c.len() >= CACHE_MAX {
                c.clear();
            }
        }
        c.insert(key, now + self.ttl);
    }

    /// Checks `user`/`password`; true when they match.
    async fn check(&self, user: &str, password: &str) -> bool {
        let stored = self.stored_hash(user);
        let key = {
            let mut m = Vec::with_capacity(user.len() + password.len() + 80);
            m.extend_from_slice(user.as_bytes());
            m.push(0);
            m.extend_from_slice(password.as_bytes());
            m.push(0);
            m.extend_from_slice(stored.as_deref().unwrap_or("").as_bytes());
            sha256(&m)
        };
        if stored.is_some() && self.cache_hit(&key) {
            return true;
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let password = password.to_string();
        let cost = self.dummy_cost;
        let known = stored.is_some();
        let ok = tokio::task::spawn_blocking(move || match stored {
            Some(h) => bcrypt::verify(password, &h).unwrap_or(false),
            None => {
                if let Some(d) = dummy_hash(cost) {
                    let _ = bcrypt::verify(password, d);
                }
                false
            }
        })
        .await
        .unwrap_or(false);
        if ok && known {
            self.cache_put(key);
        }
        ok && known
    }
}

/// `user:password` from an `Authorization: Basic ...` header.
fn credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    let v = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[async_trait::async_trait]
impl Plugin for BasicAuth {
    fn name(&self) -> &'static str {
        "basic_auth"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        if let Some(f) = &self.forward {
            req.edits.remove(f.clone());
        }
        let refuse = |msg: &str, ctx: &Context| {
            Flow::Respond(
                Reply::error(401, "unauthorized", msg, ctx)
                    .with_header("www-authenticate", self.challenge.clone()),
            )
        };
        let Some((user, password)) = credentials(req.headers) else {
            return refuse("missing Basic credentials", ctx);
        };
        if !self.check(&user, &password).await {
            return refuse("invalid user name or password", ctx);
        }
        if self.hide {
            req.edits.remove(http::header::AUTHORIZATION);
        }
        if let Some(f) = &self.forward {
            if let Ok(v) = http::HeaderValue::from_str(&user) {
                req.edits.set(f.clone(), v);
            }
        }
        ctx.consumer = Some(user);
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    fn hash(p: &str) -> String {
        // The minimum cost keeps the tests fast; `$2y$` is what htpasswd writes.
        bcrypt::hash_with_result(p, 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY)
    }

    #[tokio::test]
    async fn users_inline() {
        let p = build(&format!(
            "basic_auth: {{ users: {{ alice: '{}', bob: '{}' }} }}",
            hash("wonderland"),
            hash("builder")
        ))
        .unwrap();
        let mut c = ctx();
        let r = Req::get("/").header("authorization", &basic("alice", "wonderland"));
        let (f, e) = request(&*p, &r, &mut c).await;
        assert!(matches!(f, Flow::Continue));
        assert_eq!(c.consumer.as_deref(), Some("alice"));
        assert_eq!(set_value(&e, "x-consumer").as_deref(), Some("alice"));
        // Cached now: the second check is a lookup.
        let (f, _) = request(&*p, &r, &mut ctx()).await;
        assert!(matches!(f, Flow::Continue));

        for r in [
            Req::get("/"),
            Req::get("/").header("authorization", &basic("alice", "wrong")),
            Req::get("/").header("authorization", &basic("carol", "wonderland")),
            Req::get("/").header("authorization", &basic("bob", "wonderland")),
            Req::get("/").header("authorization", "Basic !!!"),
            Req::get("/").header("authorization", "Bearer abc"),
        ] {
            let mut c = ctx();
            let rep = reply(request(&*p, &r, &mut c).await.0);
            assert_eq!(rep.status, 401);
            assert_eq!(
                reply_header(&rep, "www-authenticate"),
                Some("Basic realm=\"portico\"")
            );
            assert!(c.consumer.is_none());
        }
    }

    #[tokio::test]
    async fn htpasswd_file_and_reload() {
        let d = temp_dir("basic");
        let path = d.join("htpasswd");
        std::fs::write(&path, format!("# users\nalice:{}\n", hash("pw1"))).unwrap();
        let p = build(&format!(
            "basic_auth: {{ htpasswd: {}, realm: staff, hide_credentials: true }}",
            path.display()
        ))
        .unwrap();
        let r = Req::get("/").header("authorization", &basic("alice", "pw1"));
        let (f, e) = request(&*p, &r, &mut ctx()).await;
        assert!(matches!(f, Flow::Continue));
        assert!(e.remove.iter().any(|h| h == "authorization"));
        let r2 = Req::get("/").header("authorization", &basic("alice", "nope"));
        let rep = reply(request(&*p, &r2, &mut ctx()).await.0);
        assert_eq!(
            reply_header(&rep, "www-authenticate"),
            Some("Basic realm=\"staff\"")
        );
        // The password changes in the file: the old one (even cached) stops working.
        std::fs::write(&path, format!("alice:{}\n# longer file\n", hash("pw2"))).unwrap();
        std::thread::sleep(Duration::from_millis(2100));
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Respond(_)
        ));
        let r3 = Req::get("/").header("authorization", &basic("alice", "pw2"));
        assert!(matches!(
            request(&*p, &r3, &mut ctx()).await.0,
            Flow::Continue
        ));
    }

    #[tokio::test]
    async fn cache_is_bounded_and_expires() {
        let s: Settings = crate::settings(
            &serde_yaml::from_str(&format!("users: {{ u: '{}' }}\ncache_ttl: 50ms", hash("p")))
                .unwrap(),
        )
        .unwrap();
        let b = BasicAuth::new(s).unwrap();
        assert!(b.check("u", "p").await);
        assert_eq!(b.cache.lock().unwrap().len(), 1);
        for i in 0..CACHE_MAX + 10 {
            b.cache_put(sha256(&i.to_le_bytes()));
        }
        assert!(b.cache.lock().unwrap().len() <= CACHE_MAX);
        std::thread::sleep(Duration::from_millis(60));
        let k = sha256(&0usize.to_le_bytes());
        assert!(!b.cache_hit(&k), "expired");
        assert!(!b.check("u", "wrong").await);
        assert!(!b.check("nobody", "p").await);
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("basic_auth: {}").contains("users"));
        assert!(e("basic_auth: { users: { a: '$1$abc$def' } }").contains("only bcrypt"));
        assert!(e("basic_auth: { users: { a: '$2y$10$short' } }").contains("invalid bcrypt"));
        let d = temp_dir("basic-bad");
        std::fs::write(d.join("h"), "alice:{SHA}abc\n").unwrap();
        let m = e(&format!(
            "basic_auth: {{ htpasswd: {} }}",
            d.join("h").display()
        ));
        assert!(m.contains("line 1") && m.contains("only bcrypt"), "{m}");
    }
}
