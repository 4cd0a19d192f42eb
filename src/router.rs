//! The route table. Routes are grouped by host (exact names in a map, wildcard
//! suffixes longest first, then host-less routes); inside each group they are sorted
//! once, at compile time, by the precedence rules (`path` > `path_prefix` (longer
//! first) > `path_regex` > no path, then more conditions, then file order), so a lookup
//! walks the groups in precedence order and the first route that matches wins.

use std::collections::HashMap;
use std::sync::Arc;

/// How a route matches the path.
#[derive(Debug)]
pub enum PathMatch {
    Any,
    /// Exact path; segments may be `{name}` captures.
    Exact(Vec<Seg>),
    /// Segment-wise prefix (stored without a trailing slash, "" for "/").
    Prefix(String),
    Regex(regex::Regex),
}

/// One segment of an exact path.
#[derive(Debug)]
pub enum Seg {
    Lit(String),
    Param(String),
}

/// How a header value must look.
#[derive(Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(regex::Regex),
}

/// The conditions of one route, compiled.
#[derive(Debug)]
pub struct Matcher {
    /// Lower-cased exact hosts and `*.suffix` wildcards (stored as `.suffix`).
    pub exact_hosts: Vec<String>,
    pub wildcard_hosts: Vec<String>,
    /// A wildcard covers exactly one label (Kubernetes routes), not one or more.
    pub one_label_wildcards: bool,
    pub path: PathMatch,
    pub methods: Vec<http::Method>,
    pub headers: Vec<(http::HeaderName, ValueMatch)>,
    pub query: Vec<(String, String)>,
}

/// The precedence of a route inside its host group: larger wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PathRank {
    pub kind: u8,
    pub len: usize,
    pub conditions: usize,
}

impl Matcher {
    /// Whether `host`, known to end with the wildcard `suffix` (`.example.com`), is
    /// covered: one or more labels before it, or exactly one for Kubernetes routes.
    fn wildcard_covers(&self, host: &str, suffix: &str) -> bool {
        let label = &host[..host.len() - suffix.len()];
        let too_deep = self.one_label_wildcards && label.contains('.');
        !label.is_empty() && !too_deep
    }

    /// The static part of the precedence.
    pub fn rank(&self) -> PathRank {
        let (kind, len) = match &self.path {
            PathMatch::Exact(_) => (3, 0),
            PathMatch::Prefix(p) => (2, p.len()),
            PathMatch::Regex(_) => (1, 0),
            PathMatch::Any => (0, 0),
        };
        PathRank {
            kind,
            len,
            conditions: self.headers.len()
                + self.query.len()
                + usize::from(!self.methods.is_empty()),
        }
    }

    /// Checks everything but the host; fills `params` on success.
    pub fn matches_rest(
        &self,
        req: &RequestInfo<'_>,
        params: &mut Vec<(String, String)>,
    ) -> Result<(), &'static str> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return Err("method does not match");
        }
        match &self.path {
            PathMatch::Any => {}
            PathMatch::Prefix(p) => {
                if !prefix_matches(p, req.path) {
                    return Err("path prefix does not match");
                }
            }
            PathMatch::Exact(segs) => {
                let start = params.len();
                let mut parts = req.path.strip_prefix('/').unwrap_or(req.path).split('/');
                for seg in segs {
                    let Some(part) = parts.next() else {
                        params.truncate(start);
                        return Err("path does not match");
                    };
                    match seg {
                        Seg::Lit(l) if l == part => {}
                        Seg::Param(n) if !part.is_empty() => params.push((
                            n.clone(),
                            percent_encoding::percent_decode_str(part)
                                .decode_utf8_lossy()
                                .into_owned(),
                        )),
                        _ => {
                            params.truncate(start);
                            return Err("path does not match");
                        }
                    }
                }
                if parts.next().is_some() {
                    params.truncate(start);
                    return Err("path does not match");
                }
            }
            PathMatch::Regex(re) => {
                let Some(c) = re.captures(req.path) else {
                    return Err("path regex does not match");
                };
                for name in re.capture_names().flatten() {
                    if let Some(m) = c.name(name) {
                        let v =
                            percent_encoding::percent_decode_str(m.as_str()).decode_utf8_lossy();
                        params.push((name.to_string(), v.into_owned()));
                    }
                }
            }
        }
        for (name, want) in &self.headers {
            let ok = req
                .headers
                .get_all(name)
                .iter()
                .any(|v| match (want, v.to_str()) {
                    (ValueMatch::Exact(w), Ok(s)) => w == s,
                    (ValueMatch::Regex(r), Ok(s)) => r.is_match(s),
                    _ => false,
                });
            if !ok {
                return Err("header condition does not match");
            }
        }
        for (k, want) in &self.query {
            if !query_has(req.query, k, want) {
                return Err("query condition does not match");
            }
        }
        Ok(())
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    // `prefix` has no trailing slash; "" is "/" and matches everything.
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

fn query_has(query: Option<&str>, key: &str, want: &str) -> bool {
    let Some(q) = query else { return false };
    q.split('&').any(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        decode(k) == key && decode(v) == want
    })
}

fn decode(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('%') || s.contains('+') {
        let s = s.replace('+', " ");
        std::borrow::Cow::Owned(
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned(),
        )
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// What the router looks at.
pub struct RequestInfo<'a> {
    pub method: &'a http::Method,
    /// Lower-cased host without port ("" if none).
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// A route table over routes of type `R` (each has a `Matcher`).
pub struct Table<R> {
    routes: Vec<Arc<R>>,
    matchers: Vec<Arc<Matcher>>,
    exact: HashMap<String, Vec<usize>>,
    /// (".suffix", sorted route indices), longest suffix first.
    wildcard: Vec<(String, Vec<usize>)>,
    any: Vec<usize>,
}

impl<R> Table<R> {
    /// Builds the table; `routes` are in file order.
    pub fn new(routes: Vec<(Arc<R>, Arc<Matcher>)>) -> Table<R> {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wild: HashMap<String, Vec<usize>> = HashMap::new();
        let mut any = vec![];
        let (rs, ms): (Vec<_>, Vec<_>) = routes.into_iter().unzip();
        for (i, m) in ms.iter().enumerate() {
            if m.exact_hosts.is_empty() && m.wildcard_hosts.is_empty() {
                any.push(i);
            }
            for h in &m.exact_hosts {
                let v = exact.entry(h.clone()).or_default();
                if !v.contains(&i) {
                    v.push(i);
                }
            }
            for w in &m.wildcard_hosts {
                let v = wild.entry(w.clone()).or_default();
                if !v.contains(&i) {
                    v.push(i);
                }
            }
        }
        let order = |v: &mut Vec<usize>| {
            // higher rank first, then file order
            v.sort_by(|a, b| ms[*b].rank().cmp(&ms[*a].rank()).then(a.cmp(b)));
        };
        exact.values_mut().for_each(order);
        order(&mut any);
        let mut wildcard: Vec<(String, Vec<usize>)> = wild.into_iter().collect();
        wildcard.iter_mut().for_each(|(_, v)| order(v));
        wildcard.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Table {
            routes: rs,
            matchers: ms,
            exact,
            wildcard,
            any,
        }
    }

    /// All routes, file order.
    pub fn routes(&self) -> &[Arc<R>] {
        &self.routes
    }

    /// The route for `req`, with its parameters.
    pub fn find(
        &self,
        req: &RequestInfo<'_>,
        params: &mut Vec<(String, String)>,
    ) -> Option<&Arc<R>> {
        let try_group = |ids: &[usize], params: &mut Vec<(String, String)>| {
            ids.iter()
                .copied()
                .find(|&i| self.matchers[i].matches_rest(req, params).is_ok())
        };
        if let Some(ids) = self.exact.get(req.host) {
            if let Some(i) = try_group(ids, params) {
                return Some(&self.routes[i]);
            }
        }
        for (suffix, ids) in &self.wildcard {
            if req.host.len() > suffix.len() && req.host.ends_with(suffix.as_str()) {
                let found = ids.iter().copied().find(|&i| {
                    let m = &self.matchers[i];
                    m.wildcard_covers(req.host, suffix) && m.matches_rest(req, params).is_ok()
                });
                if let Some(i) = found {
                    return Some(&self.routes[i]);
                }
            }
        }
        try_group(&self.any, params).map(|i| &self.routes[i])
    }

    /// Every route in the order they are tried, with whether and why it matched:
    /// (index in file order, host verdict, result).
    pub fn explain(&self, req: &RequestInfo<'_>) -> Vec<(usize, String, Result<(), String>)> {
        let mut out = vec![];
        let mut seen = std::collections::HashSet::new();
        let mut push = |i: usize, host: String, out: &mut Vec<_>| {
            if seen.insert(i) {
                let mut p = vec![];
                let r = self.matchers[i]
                    .matches_rest(req, &mut p)
                    .map_err(|e| e.to_string());
                out.push((i, host, r));
            }
        };
        if let Some(ids) = self.exact.get(req.host) {
            for &i in ids {
                push(i, format!("exact host {}", req.host), &mut out);
            }
        }
        for (suffix, ids) in &self.wildcard {
            if req.host.len() > suffix.len() && req.host.ends_with(suffix.as_str()) {
                for &i in ids {
                    if self.matchers[i].wildcard_covers(req.host, suffix) {
                        push(i, format!("wildcard host *{suffix}"), &mut out);
                    }
                }
            }
        }
        for &i in &self.any {
            push(i, "any host".into(), &mut out);
        }
        for i in 0..self.routes.len() {
            if !seen.contains(&i) {
                out.push((
                    i,
                    "host does not match".into(),
                    Err("host does not match".into()),
                ));
            }
        }
        out
    }
}

/// Compiles a validated `match` block.
pub fn compile_matcher(m: &crate::config::model::Match) -> Result<Matcher, String> {
    let mut exact_hosts = vec![];
    let mut wildcard_hosts = vec![];
    for h in &m.hosts {
        let h = h.to_ascii_lowercase();
        match h.strip_prefix('*') {
            Some(suffix) => wildcard_hosts.push(suffix.to_string()),
            None => exact_hosts.push(h),
        }
    }
    let path = if let Some(p) = &m.path {
        PathMatch::Exact(
            p.trim_start_matches('/')
                .split('/')
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => Seg::Param(name.to_string()),
                        None => Seg::Lit(s.to_string()),
                    },
                )
                .collect(),
        )
    } else if let Some(p) = &m.path_prefix {
        PathMatch::Prefix(p.trim_end_matches('/').to_string())
    } else if let Some(r) = &m.path_regex {
        PathMatch::Regex(regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| e.to_string())?)
    } else {
        PathMatch::Any
    };
    let methods = m
        .methods
        .iter()
        .map(|s| http::Method::from_bytes(s.as_bytes()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let headers = m
        .headers
        .iter()
        .map(|(k, v)| {
            let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
            let vm = match v.strip_prefix('~') {
                Some(re) => ValueMatch::Regex(regex::Regex::new(re).map_err(|e| e.to_string())?),
                None => ValueMatch::Exact(v.clone()),
            };
            Ok((name, vm))
        })
        .collect::<Result<_, String>>()?;
    Ok(Matcher {
        exact_hosts,
        wildcard_hosts,
        one_label_wildcards: m.one_label_wildcards,
        path,
        methods,
        headers,
        query: m
            .query
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// Host for routing: lower-cased, port removed, trailing dot removed.
pub fn normalize_host(raw: &str) -> String {
    let h = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        raw.rsplit_once(':')
            .map(|(h, p)| {
                if p.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    raw
                }
            })
            .unwrap_or(raw)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Removes `.` and `..` segments (RFC 3986 5.2.4) so `/a/../admin` routes as `/admin`.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    // A `.` or `..` segment after the first starts right after a `/`: most paths have
    // no "/." at all and are settled by that one scan.
    let needs = !path.starts_with('/')
        || (path.contains("/.") && path.split('/').any(|s| s == "." || s == ".."));
    if !needs {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = vec![];
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let last = segs.len().saturating_sub(1);
    let mut trailing = false;
    for (i, s) in segs.iter().enumerate() {
        match *s {
            "." => trailing = i == last,
            ".." => {
                out.pop();
                trailing = i == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if trailing && !p.ends_with('/') {
        p.push('/');
    }
    std::borrow::Cow::Owned(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_segment_wise() {
        assert!(prefix_matches("/users", "/users"));
        assert!(prefix_matches("/users", "/users/7"));
        assert!(!prefix_matches("/users", "/usersx"));
        assert!(prefix_matches("", "/anything"));
    }

    #[test]
    fn hosts_and_paths_normalize() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_path("/a/../admin"), "/admin");
        assert_eq!(normalize_path("/a/./b/"), "/a/b/");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path("/plain/path"), "/plain/path");
        assert_eq!(normalize_path("/a/.well-known/x"), "/a/.well-known/x");
        assert_eq!(normalize_path("/a/..b"), "/a/..b");
        assert_eq!(normalize_path("/a/."), "/a/");
        assert_eq!(normalize_path("/a/b/.."), "/a/");
        assert_eq!(normalize_path("a/../b"), "/b");
    }

    #[test]
    fn wildcards_cover_one_or_more_labels_or_exactly_one() {
        let route = |one: bool| {
            let m = crate::config::model::Match {
                hosts: vec!["*.example.com".into()],
                one_label_wildcards: one,
                ..Default::default()
            };
            (Arc::new(one), Arc::new(compile_matcher(&m).unwrap()))
        };
        let headers = http::HeaderMap::new();
        let find = |t: &Table<bool>, host: &str| {
            let req = RequestInfo {
                method: &http::Method::GET,
                host,
                path: "/",
                query: None,
                headers: &headers,
            };
            t.find(&req, &mut vec![]).map(|r| **r)
        };
        let file = Table::new(vec![route(false)]);
        assert_eq!(find(&file, "a.example.com"), Some(false));
        assert_eq!(find(&file, "a.b.example.com"), Some(false));
        assert_eq!(find(&file, "example.com"), None);
        let k8s = Table::new(vec![route(true)]);
        assert_eq!(find(&k8s, "a.example.com"), Some(true));
        assert_eq!(find(&k8s, "a.b.example.com"), None);
        assert_eq!(find(&k8s, ".example.com"), None);
        // both kinds on one suffix: each route keeps its own rule
        let both = Table::new(vec![route(true), route(false)]);
        assert_eq!(find(&both, "a.example.com"), Some(true));
        assert_eq!(find(&both, "a.b.example.com"), Some(false));
    }
}
