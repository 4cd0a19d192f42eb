//! HTTP caching rules for a shared cache (RFC 9111), as the `cache` plugin applies
//! them: `Cache-Control` parsing (quoted values may contain commas; names are
//! case-insensitive; a repeated or unparsable delta-seconds takes the most restrictive
//! value), what a request asks for (`no-store`, `no-cache`, `max-age=0`,
//! `Pragma: no-cache`), whether a response may be stored, and for how long it is
//! fresh (`s-maxage`, then `max-age`, then `Expires` minus `Date`, then the configured
//! default), minus the `Age` it already had.

use std::time::{Duration, SystemTime};

/// Statuses stored by the cache.
pub const CACHEABLE_STATUSES: [u16; 7] = [200, 203, 204, 300, 301, 404, 410];

/// The `Cache-Control` directives a shared cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (with or without a field list).
    pub no_cache: bool,
    /// `private` (with or without a field list).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `max-age` in seconds.
    pub max_age: Option<u64>,
    /// `s-maxage` in seconds.
    pub s_maxage: Option<u64>,
    /// `must-revalidate` or `proxy-revalidate`.
    pub must_revalidate: bool,
    /// `stale-while-revalidate` in seconds.
    pub stale_while_revalidate: Option<u64>,
}

/// Splits a field value at commas outside double quotes.
fn split_list(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in v.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&v[start..]);
    out
}

/// Delta-seconds; anything else counts as 0 (stale), the safe reading.
fn seconds(v: Option<&str>) -> u64 {
    v.map(|s| s.trim().trim_matches('"'))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
}

fn min_opt(a: Option<u64>, b: u64) -> Option<u64> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Parses every `Cache-Control` line of `headers`.
pub fn directives(headers: &http::HeaderMap) -> Directives {
    let mut d = Directives::default();
    for line in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(line) = line.to_str() else {
            // Not text: be conservative.
            d.no_store = true;
            continue;
        };
        for item in split_list(line) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (item, None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "max-age" => d.max_age = min_opt(d.max_age, seconds(value)),
                "s-maxage" => d.s_maxage = min_opt(d.s_maxage, seconds(value)),
                "stale-while-revalidate" => {
                    d.stale_while_revalidate = min_opt(d.stale_while_revalidate, seconds(value))
                }
                _ => {}
            }
        }
    }
    d
}

/// What the request allows the cache to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMode {
    /// Serve from the cache and store the answer.
    Normal,
    /// Go to the upstream (`no-cache`, `max-age=0`, `Pragma: no-cache`), store the answer.
    Refresh,
    /// Neither serve from nor store into the cache (`no-store`).
    Bypass,
}

/// Reads the request's `Cache-Control` (and `Pragma` when it has none).
pub fn request_mode(headers: &http::HeaderMap) -> RequestMode {
    let d = directives(headers);
    if d.no_store {
        return RequestMode::Bypass;
    }
    if d.no_cache || d.max_age == Some(0) {
        return RequestMode::Refresh;
    }
    if !headers.contains_key(http::header::CACHE_CONTROL)
        && headers
            .get_all(http::header::PRAGMA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("no-cache"))
    {
        return RequestMode::Refresh;
    }
    RequestMode::Normal
}

/// The response header names listed in `Vary`, lowercased, deduplicated and sorted;
/// `None` for `Vary: *` (never matches a later request).
pub fn vary_names(headers: &http::HeaderMap) -> Option<Vec<http::HeaderName>> {
    let mut names: Vec<http::HeaderName> = Vec::new();
    for line in headers.get_all(http::header::VARY) {
        let line = line.to_str().ok()?;
        for t in line.split(',') {
            let t = t.trim();
            if t.is_empty() {
                continue;
            }
            if t == "*" {
                return None;
            }
            let n = http::HeaderName::from_bytes(t.as_bytes()).ok()?;
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

/// A request header's value as a `Vary` match sees it: every line joined with `,`,
/// whitespace around list items removed; `None` when absent.
pub fn vary_value(headers: &http::HeaderMap, name: &http::HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let text = String::from_utf8_lossy(v.as_bytes());
        for item in text.split(',') {
            let s = out.get_or_insert_with(String::new);
            if !s.is_empty() {
                s.push(',');
            }
            s.push_str(item.trim());
        }
    }
    out
}

/// How long a stored response stays fresh, and what it may do after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Freshness lifetime left when the response arrived (its lifetime minus its `Age`).
    pub fresh_for: Duration,
    /// How long after that it may still be served while one request revalidates.
    pub stale_for: Duration,
    /// The `Age` it arrived with.
    pub initial_age: Duration,
}

/// Why a response is not stored, or how long it is fresh.
pub type Verdict = Result<Freshness, &'static str>;

/// Input of [`storable`].
pub struct Candidate<'a> {
    /// The response status.
    pub status: u16,
    /// The response header as the client gets it from this plugin's point in the chain.
    pub headers: &'a http::HeaderMap,
    /// The request carried `Authorization`.
    pub authorized: bool,
    /// Default freshness when the response has none (`ttl`; zero: none).
    pub default_ttl: Duration,
    /// Default `stale-while-revalidate` window.
    pub default_swr: Duration,
    /// Now, for `Expires` without `Date`.
    pub now: SystemTime,
}

fn header_date(headers: &http::HeaderMap, name: http::header::HeaderName) -> Option<SystemTime> {
    let v = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(v.trim()).ok()
}

/// Decides whether a (GET) response may be stored by a shared cache, and for how long.
pub fn storable(c: &Candidate<'_>) -> Verdict {
    if !CACHEABLE_STATUSES.contains(&c.status) {
        return Err("status");
    }
    let d = directives(c.headers);
    if d.no_store {
        return Err("no-store");
    }
    if d.private {
        return Err("private");
    }
    if d.no_cache {
        // Stored entries would have to be revalidated before every use.
        return Err("no-cache");
    }
    if vary_names(c.headers).is_none() {
        return Err("vary *");
    }
    if c.headers.contains_key(http::header::SET_COOKIE) && !d.public {
        return Err("set-cookie");
    }
    if c.authorized && !(d.public || d.s_maxage.is_some() || d.must_revalidate) {
        return Err("authorization");
    }
    let lifetime = if let Some(s) = d.s_maxage {
        Duration::from_secs(s)
    } else if let Some(m) = d.max_age {
        Duration::from_secs(m)
    } else if c.headers.contains_key(http::header::EXPIRES) {
        // An invalid date (`0`, `-1`) means already expired.
        match header_date(c.headers, http::header::EXPIRES) {
            Some(exp) => {
                let base = header_date(c.headers, http::header::DATE).unwrap_or(c.now);
                exp.duration_since(base).unwrap_or(Duration::ZERO)
            }
            None => Duration::ZERO,
        }
    } else if !c.default_ttl.is_zero() {
        c.default_ttl
    } else {
        return Err("no explicit freshness and ttl is 0");
    };
    let initial_age = c
        .headers
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::ZERO);
    let stale_for = if d.must_revalidate {
        Duration::ZERO
    } else {
        d.stale_while_revalidate
            .map(Duration::from_secs)
            .unwrap_or(c.default_swr)
    };
    let fresh_for = lifetime.saturating_sub(initial_age);
    if fresh_for.is_zero() && stale_for.is_zero() {
        return Err("already stale");
    }
    Ok(Freshness {
        fresh_for,
        stale_for,
        initial_age,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn verdict(status: u16, pairs: &[(&str, &str)], authorized: bool, ttl: u64) -> Verdict {
        storable(&Candidate {
            status,
            headers: &hm(pairs),
            authorized,
            default_ttl: Duration::from_secs(ttl),
            default_swr: Duration::ZERO,
            now: SystemTime::now(),
        })
    }

    #[test]
    fn parses_directives() {
        let d = directives(&hm(&[
            (
                "cache-control",
                "Public, max-age=60, private=\"set-cookie, x\"",
            ),
            (
                "cache-control",
                "S-MaxAge=\"30\", max-age=90, stale-while-revalidate=5",
            ),
        ]));
        assert!(d.public && d.private && !d.no_store);
        assert_eq!(d.max_age, Some(60), "the more restrictive of two max-age");
        assert_eq!(d.s_maxage, Some(30));
        assert_eq!(d.stale_while_revalidate, Some(5));
        assert_eq!(
            directives(&hm(&[("cache-control", "max-age=abc")])).max_age,
            Some(0)
        );
        assert_eq!(split_list("a=\"x,\\\"y\", b"), vec!["a=\"x,\\\"y\"", " b"]);
    }

    #[test]
    fn request_modes() {
        assert_eq!(request_mode(&hm(&[])), RequestMode::Normal);
        assert_eq!(
            request_mode(&hm(&[("cache-control", "no-cache")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&hm(&[("cache-control", "max-age=0")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&hm(&[("pragma", "no-cache")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&hm(&[
                ("cache-control", "max-age=5"),
                ("pragma", "no-cache")
            ])),
            RequestMode::Normal
        );
        assert_eq!(
            request_mode(&hm(&[("cache-control", "no-cache, no-store")])),
            RequestMode::Bypass
        );
    }

    #[test]
    fn freshness_order() {
        let f = verdict(
            200,
            &[("cache-control", "max-age=60, s-maxage=10")],
            false,
            0,
        )
        .unwrap();
        assert_eq!(f.fresh_for, Duration::from_secs(10), "s-maxage wins");
        let f = verdict(
            200,
            &[("cache-control", "max-age=60"), ("age", "15")],
            false,
            0,
        )
        .unwrap();
        assert_eq!(f.fresh_for, Duration::from_secs(45));
        assert_eq!(f.initial_age, Duration::from_secs(15));
        let f = verdict(200, &[], false, 7).unwrap();
        assert_eq!(f.fresh_for, Duration::from_secs(7), "ttl is the default");
        assert_eq!(
            verdict(200, &[], false, 0),
            Err("no explicit freshness and ttl is 0")
        );
        let f = verdict(
            200,
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
            ],
            false,
            0,
        )
        .unwrap();
        assert_eq!(f.fresh_for, Duration::from_secs(60));
        assert_eq!(
            verdict(200, &[("expires", "0")], false, 60),
            Err("already stale")
        );
        assert_eq!(
            verdict(200, &[("cache-control", "max-age=0")], false, 60),
            Err("already stale")
        );
        let f = verdict(
            200,
            &[("cache-control", "max-age=0, stale-while-revalidate=30")],
            false,
            60,
        )
        .unwrap();
        assert_eq!(f.stale_for, Duration::from_secs(30));
        let f = verdict(
            200,
            &[(
                "cache-control",
                "max-age=1, must-revalidate, stale-while-revalidate=30",
            )],
            false,
            60,
        )
        .unwrap();
        assert_eq!(f.stale_for, Duration::ZERO);
    }

    #[test]
    fn refusals() {
        assert_eq!(verdict(500, &[], false, 60), Err("status"));
        assert_eq!(verdict(206, &[], false, 60), Err("status"));
        assert!(verdict(404, &[], false, 60).is_ok());
        assert!(verdict(301, &[], false, 60).is_ok());
        assert_eq!(
            verdict(200, &[("cache-control", "no-store")], false, 60),
            Err("no-store")
        );
        assert_eq!(
            verdict(200, &[("cache-control", "private")], false, 60),
            Err("private")
        );
        assert_eq!(
            verdict(200, &[("cache-control", "no-cache")], false, 60),
            Err("no-cache")
        );
        assert_eq!(
            verdict(200, &[("vary", "accept, *")], false, 60),
            Err("vary *")
        );
        assert_eq!(
            verdict(200, &[("set-cookie", "a=b")], false, 60),
            Err("set-cookie")
        );
        assert!(verdict(
            200,
            &[
                ("set-cookie", "a=b"),
                ("cache-control", "public, max-age=5")
            ],
            false,
            60
        )
        .is_ok());
        assert_eq!(verdict(200, &[], true, 60), Err("authorization"));
        assert!(verdict(200, &[("cache-control", "s-maxage=5")], true, 60).is_ok());
        assert!(verdict(200, &[("cache-control", "public")], true, 60).is_ok());
    }

    #[test]
    fn vary_helpers() {
        let names = vary_names(&hm(&[
            ("vary", "Accept-Encoding, origin"),
            ("vary", "accept-encoding"),
        ]))
        .unwrap();
        assert_eq!(names, vec!["accept-encoding", "origin"]);
        let h = hm(&[
            ("accept-encoding", "gzip,  br"),
            ("accept-encoding", "zstd"),
        ]);
        assert_eq!(
            vary_value(&h, &http::header::ACCEPT_ENCODING).as_deref(),
            Some("gzip,br,zstd")
        );
        assert_eq!(vary_value(&h, &http::header::ORIGIN), None);
    }
}
