//! Small helpers the built-in plugins share: reading a query parameter or a cookie from
//! the request, checked header names and values for settings, SHA-256 digests, and a
//! file whose parsed contents are re-read when it changes on disk (API key files and
//! htpasswd files), checked at most every few seconds from the request path.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

/// The first value of query parameter `name`, percent-decoded (`+` is a space).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    query?
        .split('&')
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .find(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes and `+`; invalid escapes are kept as written.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (
                    b.get(i + 1).and_then(|c| hex(*c)),
                    b.get(i + 2).and_then(|c| hex(*c)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// A header name from settings, with an error that says which setting is wrong.
pub fn header_name(setting: &str, s: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(s.trim().as_bytes())
        .map_err(|_| format!("{setting}: {s:?} is not a valid header name"))
}

/// A header value from settings, with an error that says which setting is wrong.
pub fn header_value(setting: &str, s: &str) -> Result<http::HeaderValue, String> {
    http::HeaderValue::from_str(s)
        .map_err(|_| format!("{setting}: {s:?} is not a valid header value"))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    openssl::sha::sha256(data)
}

/// How often a [`WatchedFile`] looks at its file's modification time.
const WATCH_INTERVAL_MS: u64 = 2_000;

/// Parsed contents of a file, re-read (and re-parsed) when the file's modification
/// time or size changes. A file that cannot be read or parsed any more keeps the last
/// good contents (and the failure is logged).
pub struct WatchedFile<T> {
    path: PathBuf,
    parse: fn(&str) -> Result<T, String>,
    value: RwLock<Arc<T>>,
    stamp: Mutex<Option<(SystemTime, u64)>>,
    base: Instant,
    last_check_ms: AtomicU64,
}

fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl<T> WatchedFile<T> {
    /// Reads and parses `path` now; the error names the file.
    pub fn open(path: &Path, parse: fn(&str) -> Result<T, String>) -> Result<Self, String> {
        let stamp = stamp_of(path);
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(WatchedFile {
            path: path.to_path_buf(),
            parse,
            value: RwLock::new(Arc::new(value)),
            stamp: Mutex::new(stamp),
            base: Instant::now(),
            last_check_ms: AtomicU64::new(0),
        })
    }

    /// The current contents; at most every two seconds this first checks whether the
    /// file changed, and re-reads it if so. Returns whether it was reloaded, too.
    pub fn get(&self) -> (Arc<T>, bool) {
        let now = self.base.elapsed().as_millis() as u64 + WATCH_INTERVAL_MS;
        let last = self.last_check_ms.load(Ordering::Relaxed);
        let mut reloaded = false;
        if now.saturating_sub(last) >= WATCH_INTERVAL_MS
            && self
                .last_check_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            reloaded = self.check();
        }
        let v = match self.value.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        };
        (v, reloaded)
    }

    fn check(&self) -> bool {
        let new = stamp_of(&self.path);
        let mut stamp = match self.stamp.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if new.is_none() || new == *stamp {
            return false;
        }
        *stamp = new;
        let parsed = std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|t| (self.parse)(&t));
        match parsed {
            Ok(v) => {
                match self.value.write() {
                    Ok(mut g) => *g = Arc::new(v),
                    Err(p) => *p.into_inner() = Arc::new(v),
                }
                log::info!("reloaded {}", self.path.display());
                true
            }
            Err(e) => {
                log::warn!(
                    "{}: {e}; keeping the previous contents",
                    self.path.display()
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_cookie() {
        assert_eq!(
            query_param(Some("a=1&tok=x%2By+z&b"), "tok").as_deref(),
            Some("x+y z")
        );
        assert_eq!(query_param(Some("b"), "b").as_deref(), Some(""));
        assert_eq!(query_param(Some("a=1"), "tok"), None);
        assert_eq!(query_param(None, "tok"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        let mut h = http::HeaderMap::new();
        h.insert("cookie", "a=1; session=abc; c=\"q\"".parse().unwrap());
        assert_eq!(cookie(&h, "session"), Some("abc"));
        assert_eq!(cookie(&h, "c"), Some("q"));
        assert_eq!(cookie(&h, "zz"), None);
    }

    #[test]
    fn watched_file_reloads() {
        let dir = std::env::temp_dir().join(format!("portico-wf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.txt");
        std::fs::write(&p, "one").unwrap();
        let w = WatchedFile::open(&p, |s| Ok(s.trim().to_string())).unwrap();
        assert_eq!(*w.get().0, "one");
        std::fs::write(&p, "two!").unwrap();
        w.last_check_ms.store(0, Ordering::Relaxed);
        let (v, reloaded) = w.get();
        assert!(reloaded);
        assert_eq!(*v, "two!");
        match WatchedFile::open(&dir.join("missing"), |s| Ok(s.to_string())) {
            Err(e) => assert!(e.contains("cannot read"), "{e}"),
            Ok(_) => panic!("a missing file opened"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
