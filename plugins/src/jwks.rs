//! JSON Web Key Sets for the `jwt` plugin: where they come from (a file, or an
//! http(s) URL), the parsed key set (keys by `kid`), and when it is fetched again.
//! A file source is read when the plugin is built (so `portico check` reports a
//! broken file); a URL is fetched on first use, never while a config compiles. The
//! set is refreshed in the background once it is older than `jwks_refresh`, and a
//! token whose `kid` is unknown triggers at most one refetch per `jwks_min_refetch`;
//! that request waits (at most [`UNKNOWN_KID_WAIT`]) for it, so a key rotation works
//! on its first request. A failed fetch keeps the previous keys.

use crate::jwt::{family, Family};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long a request with an unknown `kid` waits for the refetch it triggered.
pub const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);
/// Timeout of one JWKS download (connect, and each read and write).
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// One verification key of a set.
pub struct SetKey {
    /// The key itself.
    pub key: DecodingKey,
    /// Its kind (RSA, EC, Ed25519, HMAC).
    pub family: Family,
    /// The algorithm the set pins for this key (`alg` member), if any.
    pub alg: Option<Algorithm>,
}

/// A parsed key set.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<SetKey>>,
    all: Vec<Arc<SetKey>>,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`); keys that cannot be used for
    /// verification (private-use, unknown types, `use` other than `sig`) are skipped.
    /// A document without any usable key is an error.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("JWKS is not valid JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("JWKS has no \"keys\" array")?;
        let mut set = KeySet::default();
        let mut skipped = vec![];
        for (i, k) in keys.iter().enumerate() {
            match Self::one(k) {
                Ok((kid, key)) => {
                    let key = Arc::new(key);
                    if let Some(kid) = kid {
                        set.by_kid.insert(kid, Arc::clone(&key));
                    }
                    set.all.push(key);
                }
                Err(e) => skipped.push(format!("key {i}: {e}")),
            }
        }
        if set.all.is_empty() {
            let why = if skipped.is_empty() {
                "it is empty".to_string()
            } else {
                skipped.join("; ")
            };
            return Err(format!("JWKS has no usable key ({why})"));
        }
        for s in skipped {
            log::debug!("jwks: skipped {s}");
        }
        Ok(set)
    }

    fn one(v: &serde_json::Value) -> Result<(Option<String>, SetKey), String> {
        let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        if let Some(u) = &jwk.common.public_key_use {
            if *u != PublicKeyUse::Signature {
                return Err("not a signature key (\"use\" is not \"sig\")".into());
            }
        }
        let alg = match &jwk.common.key_algorithm {
            Some(a) => Some(
                Algorithm::from_str(&a.to_string())
                    .map_err(|_| format!("algorithm {a} is not a signature algorithm"))?,
            ),
            None => None,
        };
        let fam = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Family::Rsa,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => {
                return Err("symmetric (\"oct\") keys are not accepted from a JWKS".into())
            }
        };
        if let Some(a) = alg {
            if family(a) != fam {
                return Err(format!("\"alg\" {a:?} does not fit the key type"));
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
        Ok((
            jwk.common.key_id.clone(),
            SetKey {
                key,
                family: fam,
                alg,
            },
        ))
    }

    /// The key for `kid`; without a kid, the only key of the set (if it has one).
    pub fn get(&self, kid: Option<&str>) -> Option<Arc<SetKey>> {
        match kid {
            Some(k) => self.by_kid.get(k).cloned(),
            None if self.all.len() == 1 => self.all.first().cloned(),
            None => None,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether the set has no key.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

/// Where a key set comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A local file.
    File(PathBuf),
    /// An `http://` or `https://` URL.
    Url(Url),
}

impl Source {
    /// `http(s)://...` is a URL, anything else a file path.
    pub fn parse(s: &str) -> Result<Source, String> {
        if s.starts_with("http://") || s.starts_with("https://") {
            Url::parse(s).map(Source::Url)
        } else if s.contains("://") {
            Err(format!(
                "jwks: {s:?}: only http:// and https:// URLs are supported"
            ))
        } else {
            Ok(Source::File(PathBuf::from(s)))
        }
    }

    fn fetch_blocking(&self) -> Result<KeySet, String> {
        match self {
            Source::File(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                KeySet::parse(&text).map_err(|e| format!("{}: {e}", p.display()))
            }
            Source::Url(u) => {
                // A GET is idempotent: one quick second attempt rides over a dropped
                // connection or a garbled answer, since a failed unknown-kid refetch
                // otherwise waits `jwks_min_refetch` before the next.
                match Self::fetch_url(u) {
                    Ok(set) => Ok(set),
                    Err(e) => {
                        log::debug!("jwks: {e}; retrying once");
                        std::thread::sleep(Duration::from_millis(50));
                        Self::fetch_url(u)
                    }
                }
            }
        }
    }

    fn fetch_url(u: &Url) -> Result<KeySet, String> {
        let body = http_get(u, FETCH_TIMEOUT)?;
        let text = String::from_utf8(body).map_err(|_| format!("{}: JWKS is not UTF-8", u.raw))?;
        match KeySet::parse(&text) {
            Ok(set) => Ok(set),
            Err(e) => {
                let start: String = text.chars().take(48).collect();
                Err(format!(
                    "{}: {e} ({} bytes, starting {start:?})",
                    u.raw,
                    text.len()
                ))
            }
        }
    }
}

/// A key set with its refresh policy.
pub struct Jwks {
    source: Source,
    refresh: Duration,
    min_refetch: Duration,
    keys: RwLock<Arc<KeySet>>,
    /// Bumped by every successful fetch.
    generation: AtomicU64,
    base: Instant,
    /// Milliseconds since `base` (+1) of the last successful fetch; 0 = never.
    last_success_ms: AtomicU64,
    /// Milliseconds since `base` (+1) of the last background refresh attempt; 0 = never.
    last_refresh_ms: AtomicU64,
    /// When the last unknown-kid refetch started; serializes fetches.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    refreshing: AtomicBool,
}

impl Jwks {
    /// A key set from `source`; a file is read now (its errors are config errors), a URL
    /// on first use.
    pub fn new(source: Source, refresh: Duration, min_refetch: Duration) -> Result<Jwks, String> {
        let base = Instant::now();
        let (keys, last) = match &source {
            Source::File(_) => (source.fetch_blocking()?, 1),
            Source::Url(_) => (KeySet::default(), 0),
        };
        Ok(Jwks {
            source,
            refresh,
            min_refetch,
            keys: RwLock::new(Arc::new(keys)),
            generation: AtomicU64::new(0),
            base,
            last_success_ms: AtomicU64::new(last),
            last_refresh_ms: AtomicU64::new(0),
            fetch: tokio::sync::Mutex::new(None),
            refreshing: AtomicBool::new(false),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// The key for `kid`, refetching the set when the kid is unknown (see the module
    /// doc). Must run inside a Tokio runtime.
    pub async fn key(self: &Arc<Self>, kid: Option<&str>) -> Option<Arc<SetKey>> {
        self.maybe_refresh();
        if let Some(k) = self.current().get(kid) {
            return Some(k);
        }
        let seen = self.generation.load(Ordering::Acquire);
        let this = Arc::clone(self);
        // The fetch runs as its own task: if this request stops waiting, the fetch still
        // completes and serves the next one.
        let task = tokio::spawn(async move { this.refetch(seen, true).await });
        let _ = tokio::time::timeout(UNKNOWN_KID_WAIT, task).await;
        self.current().get(kid)
    }

    /// Starts a background refresh when the set is older than `jwks_refresh`; after a
    /// failed one, the next waits `jwks_min_refetch` (at least a second), so an
    /// unreachable key server is not hammered.
    fn maybe_refresh(self: &Arc<Self>) {
        let last = self.last_success_ms.load(Ordering::Relaxed);
        let now = self.base.elapsed().as_millis() as u64 + 1;
        let stale = last == 0 || now.saturating_sub(last) >= self.refresh.as_millis() as u64;
        let tried = self.last_refresh_ms.load(Ordering::Relaxed);
        let pause = self.min_refetch.max(Duration::from_secs(1)).as_millis() as u64;
        let due = tried == 0 || now.saturating_sub(tried) >= pause;
        if !stale || !due || self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last_refresh_ms.store(now, Ordering::Relaxed);
        let this = Arc::clone(self);
        let seen = self.generation.load(Ordering::Acquire);
        tokio::spawn(async move {
            this.refetch(seen, false).await;
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// Fetches the set unless another fetch succeeded since `seen`, or (for an
    /// unknown-kid refetch) one was started less than `jwks_min_refetch` ago.
    async fn refetch(&self, seen: u64, unknown_kid: bool) {
        let mut last_attempt = self.fetch.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return;
        }
        if unknown_kid {
            if let Some(t) = *last_attempt {
                if t.elapsed() < self.min_refetch {
                    return;
                }
            }
            *last_attempt = Some(Instant::now());
        }
        let source = self.source.clone();
        let res = tokio::task::spawn_blocking(move || source.fetch_blocking()).await;
        match res {
            Ok(Ok(set)) => {
                log::debug!("jwks: loaded {} keys", set.len());
                match self.keys.write() {
                    Ok(mut g) => *g = Arc::new(set),
                    Err(p) => *p.into_inner() = Arc::new(set),
                }
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.last_success_ms.store(
                    self.base.elapsed().as_millis() as u64 + 1,
                    Ordering::Relaxed,
                );
            }
            Ok(Err(e)) => log::warn!("jwks: {e}; keeping the previous keys"),
            Err(e) => log::warn!("jwks: fetch task failed: {e}"),
        }
    }
}

/// A parsed `http(s)://host[:port]/path` URL.
#[derive(Clone, Debug)]
pub struct Url {
    raw: String,
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl Url {
    /// Parses an absolute http or https URL.
    pub fn parse(s: &str) -> Result<Url, String> {
        let bad = |why: &str| format!("jwks: invalid URL {s:?}: {why}");
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("expected http:// or https://"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let path = path.split('#').next().unwrap_or("/").to_string();
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, after) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("garbage after ]")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if tls => 443,
            None => 80,
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("the path has spaces or control characters"));
        }
        Ok(Url {
            raw: s.to_string(),
            tls,
            host,
            port,
            path,
        })
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A minimal blocking HTTP/1.1 GET (no redirects): the body of a 200 answer.
fn http_get(u: &Url, timeout: Duration) -> Result<Vec<u8>, String> {
    let err = |e: &dyn std::fmt::Display| format!("GET {}: {e}", u.raw);
    let addrs: Vec<_> = (u.host.as_str(), u.port)
        .to_socket_addrs()
        .map_err(|e| err(&e))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = match (tcp, last) {
        (Some(t), _) => t,
        (None, Some(e)) => return Err(err(&e)),
        (None, None) => return Err(err(&"no address")),
    };
    tcp.set_read_timeout(Some(timeout)).map_err(|e| err(&e))?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| err(&e))?;
    let mut stream: Box<dyn Stream> = if u.tls {
        let connector = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
            .map_err(|e| err(&e))?
            .build();
        Box::new(connector.connect(&u.host, tcp).map_err(|e| err(&e))?)
    } else {
        Box::new(tcp)
    };
    let host_header = if u.host.contains(':') {
        format!("[{}]", u.host)
    } else {
        u.host.clone()
    };
    let default_port = if u.tls { 443 } else { 80 };
    let host_header = if u.port == default_port {
        host_header
    } else {
        format!("{host_header}:{}", u.port)
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\nUser-Agent: portico-jwks\r\nConnection: close\r\n\r\n",
        u.path
    );
    stream.write_all(req.as_bytes()).map_err(|e| err(&e))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_JWKS_BYTES + 64 * 1024 {
                    return Err(err(&"answer too large"));
                }
                if response_complete(&buf) {
                    break;
                }
            }
            // A TLS peer that closes without close_notify still sent what it sent.
            Err(_) if !buf.is_empty() && response_complete(&buf) => break,
            Err(e) => return Err(err(&e)),
        }
    }
    parse_response(&buf).map_err(|e| err(&e))
}

fn split_head(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&buf[..i], &buf[i + 4..]))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Whether the whole answer is in `buf` (Content-Length reached or last chunk seen).
fn response_complete(buf: &[u8]) -> bool {
    let Some((head, body)) = split_head(buf) else {
        return false;
    };
    let head = String::from_utf8_lossy(head);
    if let Some(n) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= n;
    }
    if header(&head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        return dechunk(body).is_ok();
    }
    false
}

fn parse_response(buf: &[u8]) -> Result<Vec<u8>, String> {
    let (head, body) = split_head(buf).ok_or("incomplete HTTP answer")?;
    let head = String::from_utf8_lossy(head);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("malformed HTTP status line")?;
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    let body = if header(&head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(body)?
    } else if let Some(n) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        if body.len() < n {
            return Err("answer shorter than its Content-Length".into());
        }
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    if body.len() > MAX_JWKS_BYTES {
        return Err("JWKS larger than 1 MiB".into());
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let i = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk")?;
        let size_line = String::from_utf8_lossy(&b[..i]);
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size_hex, 16).map_err(|_| "bad chunk size")?;
        b = &b[i + 2..];
        if n == 0 {
            return Ok(out);
        }
        if b.len() < n + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&b[..n]);
        b = &b[n + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://idp.example.com/.well-known/jwks.json").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("idp.example.com", 443));
        assert_eq!(u.path, "/.well-known/jwks.json");
        let u = Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8080, "/"));
        let u = Url::parse("http://[::1]:9000/k?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 9000, "/k?x=1")
        );
        assert!(Url::parse("http://:80/").is_err());
        assert!(Url::parse("http://a:b/").is_err());
        assert!(Source::parse("ftp://x/y").is_err());
        assert!(matches!(
            Source::parse("keys/jwks.json"),
            Ok(Source::File(_))
        ));
    }

    #[test]
    fn responses() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert!(response_complete(r));
        assert_eq!(parse_response(r).unwrap(), b"hello");
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n";
        assert!(response_complete(r));
        assert_eq!(parse_response(r).unwrap(), b"hello");
        assert!(!response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello"
        ));
        let r = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(r).unwrap_err().contains("404"));
    }

    #[test]
    fn key_sets() {
        assert!(KeySet::parse("{}").err().unwrap().contains("keys"));
        assert!(KeySet::parse("nope").err().unwrap().contains("JSON"));
        assert!(KeySet::parse(r#"{"keys": []}"#)
            .err()
            .unwrap()
            .contains("no usable key"));
        let oct = r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}"#;
        assert!(KeySet::parse(oct).err().unwrap().contains("symmetric"));
        let ed = r#"{"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "e1", "alg": "EdDSA"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "enc", "use": "enc"}
        ]}"#;
        let s = KeySet::parse(ed).unwrap();
        assert_eq!(s.len(), 1);
        assert!(s.get(Some("e1")).is_some());
        assert!(s.get(Some("enc")).is_none());
        assert!(
            s.get(None).is_some(),
            "a lone key serves tokens without kid"
        );
    }

    #[test]
    fn fetch_over_http() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).unwrap();
            let req = String::from_utf8_lossy(&b[..n]).to_string();
            s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            )
            .unwrap();
            req
        });
        let u = Url::parse(&format!("http://127.0.0.1:{port}/jwks")).unwrap();
        assert_eq!(http_get(&u, Duration::from_secs(2)).unwrap(), b"hello");
        let req = t.join().unwrap();
        assert!(req.starts_with("GET /jwks HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: 127.0.0.1:{port}")), "{req}");
    }
}
