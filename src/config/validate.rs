//! Whole-file validation after parsing: references between sections, regexes, CIDRs,
//! addresses, exclusive choices. Each check names the path it is about so the error
//! lands on the right line; nothing here stops at the first problem.

use super::load::Errors;
use super::model::{Balance, Config, Route, StripPrefix};
use std::collections::{BTreeSet, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};

/// Checks `cfg`; `known_upstreams` includes upstreams that failed to parse (so their
/// names do not also show up as dangling references).
pub fn validate(
    cfg: &Config,
    known_upstreams: &BTreeSet<String>,
    _parsed_cleanly: bool,
    errs: &mut Errors,
) {
    let mut names = HashSet::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let p = errs.item("listeners", i);
        if !names.insert(l.name.clone()) {
            errs.at(
                &format!("{p}.name"),
                format!("duplicate listener name `{}`", l.name),
            );
        }
        if l.bind.parse::<SocketAddr>().is_err() {
            errs.at(
                &format!("{p}.bind"),
                format!("invalid bind address `{}` (expected IP:PORT)", l.bind),
            );
        }
        if let Some(tls) = &l.tls {
            let tp = format!("{p}.tls");
            // In ingress mode certificates may all come from TLS Secrets.
            if tls.certificates.is_empty() && tls.dir.is_none() && cfg.kubernetes.is_none() {
                errs.at(&tp, "a TLS listener needs `certificates` or `dir`");
            }
            if let Err(e) = crate::tls::load_store(tls) {
                if !(tls.certificates.is_empty() && tls.dir.is_none()) {
                    errs.at(&tp, e);
                }
            }
            if !matches!(tls.min_version.as_deref(), None | Some("1.2") | Some("1.3")) {
                errs.at(
                    &format!("{tp}.min_version"),
                    "min_version is \"1.2\" or \"1.3\"",
                );
            }
            if !matches!(
                tls.client_auth.as_deref(),
                None | Some("required") | Some("optional")
            ) {
                errs.at(
                    &format!("{tp}.client_auth"),
                    "client_auth is `required` or `optional`",
                );
            }
            if tls.client_auth.is_some() && tls.client_ca.is_none() {
                errs.at(
                    &format!("{tp}.client_auth"),
                    "client_auth needs `client_ca`",
                );
            }
            if let Some(ca) = &tls.client_ca {
                if !std::path::Path::new(ca).is_file() {
                    errs.at(&format!("{tp}.client_ca"), format!("cannot read `{ca}`"));
                }
            }
            if http::HeaderName::from_bytes(tls.client_subject_header.as_bytes()).is_err() {
                errs.at(
                    &format!("{tp}.client_subject_header"),
                    "invalid header name",
                );
            }
            if l.redirect_https.is_some() {
                errs.at(
                    &format!("{p}.redirect_https"),
                    "`redirect_https` belongs on a plain listener",
                );
            }
        }
    }
    if cfg.admin.bind.parse::<SocketAddr>().is_err() {
        errs.at(
            "admin.bind",
            format!(
                "invalid bind address `{}` (expected IP:PORT)",
                cfg.admin.bind
            ),
        );
    } else if let Ok(a) = cfg.admin.bind.parse::<SocketAddr>() {
        if !a.ip().is_loopback() && cfg.admin.token_env.is_none() {
            errs.at(
                "admin.bind",
                "an admin listener on a non-loopback address needs `token_env` (a bearer token)",
            );
        }
    }
    if let Some(var) = &cfg.admin.token_env {
        if std::env::var(var).map(|v| v.is_empty()).unwrap_or(true) {
            errs.at(
                "admin.token_env",
                format!("environment variable `{var}` is not set or empty"),
            );
        }
    }
    if cfg.server.threads == 0 {
        errs.at("server.threads", "threads must be at least 1");
    }
    for (i, c) in cfg.trusted_proxies.iter().enumerate() {
        if parse_cidr(c).is_none() {
            errs.at(
                &format!("trusted_proxies[{i}]"),
                format!("invalid CIDR `{c}`"),
            );
        }
    }
    for (name, u) in &cfg.upstreams {
        let p = format!("upstreams.{name}");
        if u.endpoints.is_empty() && u.discovery.is_none() {
            errs.at(&p, format!("upstream `{name}` has no `endpoints`"));
        }
        if !u.endpoints.is_empty() && u.discovery.is_some() {
            errs.at(
                &format!("{p}.discovery"),
                "use either `endpoints` or `discovery`, not both",
            );
        }
        if let Some(d) = &u.discovery {
            let dp = format!("{p}.discovery");
            match (&d.service, &d.dns) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => errs.at(
                    &dp,
                    "discovery needs exactly one of `service` (registry) and `dns`",
                ),
            }
            if let Some(sel) = &d.selector {
                if let Err(e) = crate::registry::selector::Selector::parse(sel) {
                    errs.at(&format!("{dp}.selector"), e);
                }
                if d.dns.is_some() {
                    errs.at(
                        &format!("{dp}.selector"),
                        "a selector applies to registry services, not to DNS",
                    );
                }
            }
            if let Some(dns) = &d.dns {
                let ok = dns.starts_with('_')
                    || dns
                        .rsplit_once(':')
                        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
                if !ok {
                    errs.at(&format!("{dp}.dns"), format!("`{dns}` must be `name:port` or an SRV name such as `_http._tcp.example`"));
                }
            }
            if let Some(r) = &d.resolver {
                if r.parse::<SocketAddr>().is_err() {
                    errs.at(
                        &format!("{dp}.resolver"),
                        format!("invalid resolver `{r}` (expected IP:PORT)"),
                    );
                }
            }
            if d.refresh.is_some_and(|r| r.0.is_zero()) {
                errs.at(&format!("{dp}.refresh"), "must be above zero");
            }
        }
        for (j, e) in u.endpoints.iter().enumerate() {
            let ep = format!("{p}.endpoints[{j}]");
            if resolve(e.address()).is_none() {
                errs.at(
                    &ep,
                    format!("invalid endpoint `{}` (expected host:port)", e.address()),
                );
            }
            if e.weight() == 0 {
                errs.at(&ep, "endpoint weight must be at least 1");
            }
        }
        if let Some(h) = &u.hash_on {
            if !valid_hash_on(h) {
                errs.at(
                    &format!("{p}.hash_on"),
                    format!(
                        "invalid hash_on `{h}` (header:NAME, cookie:NAME, client_ip, path or query:NAME)"
                    ),
                );
            } else if u.balance != Balance::ConsistentHash {
                errs.at(
                    &format!("{p}.hash_on"),
                    "hash_on needs `balance: consistent_hash`",
                );
            }
        }
        if let Some(hc) = &u.health_check {
            let hp = format!("{p}.health_check");
            if !hc.path.starts_with('/') {
                errs.at(&format!("{hp}.path"), "health check path must start with /");
            }
            if hc.interval.0.is_zero() {
                errs.at(&format!("{hp}.interval"), "interval must be above zero");
            }
            if hc.timeout.0.is_zero() {
                errs.at(&format!("{hp}.timeout"), "timeout must be above zero");
            }
            if hc.healthy_threshold == 0 {
                errs.at(&format!("{hp}.healthy_threshold"), "must be at least 1");
            }
            if hc.unhealthy_threshold == 0 {
                errs.at(&format!("{hp}.unhealthy_threshold"), "must be at least 1");
            }
        }
        match (u.protocol.as_deref(), u.tls.is_some()) {
            (None | Some("http1"), _) | (Some("h2"), true) | (Some("h2c"), false) => {}
            (Some("h2"), false) => errs.at(
                &format!("{p}.protocol"),
                "`h2` needs `tls` (use `h2c` for plain HTTP/2)",
            ),
            (Some("h2c"), true) => errs.at(
                &format!("{p}.protocol"),
                "`h2c` is plain HTTP/2; with `tls` use `h2`",
            ),
            (Some(other), _) => errs.at(
                &format!("{p}.protocol"),
                format!("unknown protocol `{other}` (http1, h2, h2c)"),
            ),
        }
        if let Some(t) = &u.tls {
            if let Err(e) = crate::upstream::UpstreamTlsRt::load(t) {
                errs.at(&format!("{p}.tls"), e);
            }
        }
        if let Some(cb) = &u.circuit_breaker {
            let cp = format!("{p}.circuit_breaker");
            if cb.consecutive_failures == 0 {
                errs.at(&format!("{cp}.consecutive_failures"), "must be at least 1");
            }
            if let Some(r) = cb.failure_ratio {
                if !(0.0..=1.0).contains(&r.0) {
                    errs.at(&format!("{cp}.failure_ratio"), "must be between 0 and 1");
                }
            }
            if cb.open_for.0.is_zero() {
                errs.at(&format!("{cp}.open_for"), "must be above zero");
            }
            if cb.window.0.is_zero() {
                errs.at(&format!("{cp}.window"), "must be above zero");
            }
        }
        if let Some(od) = &u.outlier_detection {
            let op = format!("{p}.outlier_detection");
            if od.interval.0.is_zero() {
                errs.at(&format!("{op}.interval"), "must be above zero");
            }
            if od.factor.0 <= 1.0 {
                errs.at(&format!("{op}.factor"), "must be above 1");
            }
            if od.max_ejection_percent > 100 {
                errs.at(&format!("{op}.max_ejection_percent"), "must be at most 100");
            }
        }
        if !(0.0..=10.0).contains(&u.retry_budget.ratio.0) {
            errs.at(
                &format!("{p}.retry_budget.ratio"),
                "must be between 0 and 10",
            );
        }
        if let Some(h) = &u.host {
            if http::HeaderValue::from_str(h).is_err() {
                errs.at(&format!("{p}.host"), "invalid Host header value");
            }
        }
    }
    let mut route_names = HashSet::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        let p = errs.item("routes", i);
        if r.name.is_empty() {
            errs.at(&format!("{p}.name"), "route name must not be empty");
        } else if !route_names.insert(r.name.clone()) {
            errs.at(
                &format!("{p}.name"),
                format!("duplicate route name `{}`", r.name),
            );
        }
        validate_route(r, &p, cfg, known_upstreams, errs);
    }
    for (i, e) in cfg.plugins.iter().enumerate() {
        let p = errs.item("plugins", i);
        validate_plugin(e, &p, "", cfg, errs);
    }
    if let Some(r) = &cfg.registry {
        match r.backend.as_deref() {
            None | Some("embedded") => {}
            Some("etcd") => {
                if r.etcd.is_none() {
                    errs.at(
                        "registry.backend",
                        "the etcd backend needs `registry.etcd: { endpoints: [\"host:port\"] }`",
                    );
                }
            }
            Some(b) => errs.at(
                "registry.backend",
                format!("unknown backend `{b}` (embedded or etcd)"),
            ),
        }
        if let Some(e) = &r.etcd {
            if r.backend.as_deref() != Some("etcd") {
                errs.at_key(
                    "registry.etcd",
                    "`registry.etcd` is only used with `backend: etcd`",
                );
            }
            crate::registry::etcd::validate(e, errs);
        }
        for (svc, insts) in &r.services {
            for (j, i) in insts.iter().enumerate() {
                if resolve(&i.address).is_none() {
                    errs.at(
                        &format!("registry.services.{svc}[{j}].address"),
                        format!("invalid address `{}` (expected host:port)", i.address),
                    );
                }
            }
        }
    }
    if let Some(o) = &cfg.orchestrator {
        let mut seen = HashSet::new();
        for (i, d) in o.deployments.iter().enumerate() {
            let p = errs.item("orchestrator.deployments", i);
            if !seen.insert(d.name.clone()) {
                errs.at(
                    &format!("{p}.name"),
                    format!("duplicate deployment name `{}`", d.name),
                );
            }
            if d.command.is_empty() || d.command[0].is_empty() {
                errs.at(
                    &format!("{p}.command"),
                    "command needs at least the program to run",
                );
            }
            if d.service.is_empty() {
                errs.at(&format!("{p}.service"), "service must not be empty");
            }
            if !d.readiness.path.starts_with('/') {
                errs.at(&format!("{p}.readiness.path"), "must start with /");
            }
            if d.replicas > 64 {
                errs.at(
                    &format!("{p}.replicas"),
                    "at most 64 replicas per deployment",
                );
            }
            if d.restart_backoff.min.0 > d.restart_backoff.max.0 {
                errs.at(
                    &format!("{p}.restart_backoff"),
                    "`min` must not exceed `max`",
                );
            }
            if let Some(a) = &d.autoscale {
                if a.max == 0 || a.min > a.max || a.max > 64 {
                    errs.at(
                        &format!("{p}.autoscale"),
                        "needs 0 <= min <= max, 1 <= max <= 64",
                    );
                }
                if a.target_inflight == 0 {
                    errs.at(
                        &format!("{p}.autoscale.target_inflight"),
                        "must be at least 1",
                    );
                }
            }
        }
    }
    if let Some(r) = &cfg.redis {
        if let Err(e) = portico_plugins::services::SharedRedis::new(r.plugin_settings(), None) {
            errs.at("redis.url", e.trim_start_matches("url: ").to_string());
        }
        for (field, d) in [
            ("timeout", r.timeout),
            ("connect_timeout", r.connect_timeout),
        ] {
            if d.0.is_zero() {
                errs.at(&format!("redis.{field}"), "must be longer than 0s");
            }
        }
    }
    if let Some(k) = &cfg.kubernetes {
        if !valid_dns_name(&k.ingress_class) {
            errs.at(
                "kubernetes.ingress_class",
                format!("invalid class name `{}` (a DNS name)", k.ingress_class),
            );
        }
        for (i, ns) in k.namespaces.iter().enumerate() {
            if !valid_dns_name(ns) || ns.contains('.') {
                errs.at(
                    &format!("kubernetes.namespaces[{i}]"),
                    format!("invalid namespace `{ns}`"),
                );
            }
        }
        if let Some(a) = &k.status_address {
            let host = a.to_ascii_lowercase();
            if a.parse::<std::net::IpAddr>().is_err() && !valid_dns_name(&host) {
                errs.at(
                    "kubernetes.status_address",
                    format!("`{a}` is neither an IP address nor a hostname"),
                );
            }
        }
        if let Some(path) = &k.kubeconfig {
            if let Err(e) = std::fs::metadata(path) {
                errs.at(
                    "kubernetes.kubeconfig",
                    format!("cannot read `{path}`: {e}"),
                );
            }
        }
    }
}

/// A lowercase RFC 1123 DNS name (Kubernetes object and namespace names).
fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn validate_route(r: &Route, p: &str, cfg: &Config, known: &BTreeSet<String>, errs: &mut Errors) {
    let m = &r.matcher;
    let mp = format!("{p}.match");
    let paths = [
        m.path.is_some(),
        m.path_prefix.is_some(),
        m.path_regex.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if paths > 1 {
        errs.at(
            &mp,
            "use only one of `path`, `path_prefix` and `path_regex` in a route",
        );
    }
    for (field, v) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(v) = v {
            if !v.starts_with('/') {
                errs.at(
                    &format!("{mp}.{field}"),
                    format!("`{field}` must start with /"),
                );
            }
        }
    }
    if let Some(path) = &m.path {
        for seg in path.split('/') {
            if seg.contains('{') || seg.contains('}') {
                let ok = seg.len() > 2
                    && seg.starts_with('{')
                    && seg.ends_with('}')
                    && seg[1..seg.len() - 1]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    errs.at(
                        &format!("{mp}.path"),
                        format!("invalid parameter segment `{seg}` (write `{{name}}` as a whole segment)"),
                    );
                }
            }
        }
    }
    if let Some(re) = &m.path_regex {
        if let Err(e) = regex::Regex::new(&format!("^(?:{re})$")) {
            errs.at(
                &format!("{mp}.path_regex"),
                format!("invalid regex: {}", one_line(&e.to_string())),
            );
        }
    }
    for (j, h) in m.hosts.iter().enumerate() {
        let bad = h.is_empty()
            || h.contains('/')
            || h.contains(' ')
            || (h.contains('*') && !(h.starts_with("*.") && !h[2..].contains('*') && h.len() > 2));
        if bad {
            errs.at(
                &format!("{mp}.hosts[{j}]"),
                format!("invalid host `{h}` (a name, or `*.suffix`)"),
            );
        }
    }
    for (j, meth) in m.methods.iter().enumerate() {
        if http::Method::from_bytes(meth.as_bytes()).is_err()
            || meth.chars().any(|c| c.is_ascii_lowercase())
        {
            errs.at(
                &format!("{mp}.methods[{j}]"),
                format!("invalid method `{meth}` (use upper case, e.g. GET)"),
            );
        }
    }
    for (name, v) in &m.headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            errs.at_key(
                &format!("{mp}.headers.{name}"),
                format!("invalid header name `{name}`"),
            );
        }
        if let Some(re) = v.strip_prefix('~') {
            if let Err(e) = regex::Regex::new(re) {
                errs.at(
                    &format!("{mp}.headers.{name}"),
                    format!("invalid regex: {}", one_line(&e.to_string())),
                );
            }
        }
    }
    // exactly one action
    let actions: Vec<&str> = [
        ("upstream", r.upstream.is_some()),
        ("split", r.split.is_some()),
        ("redirect", r.redirect.is_some()),
        ("respond", r.respond.is_some()),
        ("static", r.static_files.is_some()),
        ("aggregate", r.aggregate.is_some()),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| *n)
    .collect();
    if actions.len() != 1 {
        errs.at(
            p,
            format!(
                "route `{}` needs exactly one action of upstream, split, aggregate, redirect, respond, static (found {})",
                r.name,
                if actions.is_empty() { "none".to_string() } else { actions.join(", ") }
            ),
        );
    }
    let exists = |u: &str| cfg.upstreams.contains_key(u) || known.contains(u);
    if let Some(u) = &r.upstream {
        if !exists(u) {
            errs.at(&format!("{p}.upstream"), format!("unknown upstream `{u}`"));
        }
    }
    if let Some(split) = &r.split {
        if split.is_empty() || split.iter().all(|s| s.weight == 0) {
            errs.at(
                &format!("{p}.split"),
                "a split needs at least one arm with weight above 0",
            );
        }
        for (j, s) in split.iter().enumerate() {
            if !exists(&s.upstream) {
                errs.at(
                    &format!("{p}.split[{j}].upstream"),
                    format!("unknown upstream `{}`", s.upstream),
                );
            }
        }
    }
    if let Some(rd) = &r.redirect {
        if ![301, 302, 303, 307, 308].contains(&rd.status) {
            errs.at(
                &format!("{p}.redirect.status"),
                format!(
                    "redirect status {} is not one of 301, 302, 303, 307, 308",
                    rd.status
                ),
            );
        }
        if http::HeaderValue::from_str(&rd.to).is_err() || rd.to.is_empty() {
            errs.at(&format!("{p}.redirect.to"), "invalid redirect target");
        }
    }
    if let Some(rs) = &r.respond {
        if !(100..=599).contains(&rs.status) {
            errs.at(
                &format!("{p}.respond.status"),
                format!("invalid status {}", rs.status),
            );
        }
        check_header_map(&rs.headers, &format!("{p}.respond.headers"), errs);
    }
    if let Some(st) = &r.static_files {
        if !std::path::Path::new(&st.dir).is_dir() {
            errs.at(
                &format!("{p}.static.dir"),
                format!("`{}` is not a readable folder", st.dir),
            );
        }
    }
    if let Some(agg) = &r.aggregate {
        let ap = format!("{p}.aggregate");
        let params = route_params(m);
        if let Err(e) = crate::aggregate::Compiled::compile(agg, &params, &|u: &str| exists(u)) {
            for (path, msg) in e {
                errs.at(&format!("{ap}{path}"), msg);
            }
        }
    }
    if r.hedge.is_some() && r.upstream.is_none() && r.split.is_none() {
        errs.at(
            &format!("{p}.hedge"),
            "hedging applies to `upstream` and `split` routes",
        );
    }
    if let Some(rt) = &r.retries {
        for (j, on) in rt.on.iter().enumerate() {
            let ok = matches!(on.as_str(), "connect_failure" | "reset" | "timeout")
                || on
                    .parse::<u16>()
                    .is_ok_and(|c| (500..=599).contains(&c) || c == 429 || c == 408);
            if !ok {
                errs.at(
                    &format!("{p}.retries.on[{j}]"),
                    format!("unknown retry condition `{on}` (connect_failure, reset, timeout, or a status such as \"503\")"),
                );
            }
        }
        if rt.max_replay_body.0 > 64 * 1024 {
            errs.at(
                &format!("{p}.retries.max_replay_body"),
                "at most 64KiB (the retry buffer)",
            );
        }
        if rt.attempts > 10 {
            errs.at(&format!("{p}.retries.attempts"), "at most 10 retries");
        }
        if rt.backoff.base.0 > rt.backoff.max.0 {
            errs.at(
                &format!("{p}.retries.backoff"),
                "`base` must not exceed `max`",
            );
        }
    }
    match &r.strip_prefix {
        Some(StripPrefix::Flag(true)) if m.path_prefix.is_none() => errs.at(
            &format!("{p}.strip_prefix"),
            "`strip_prefix: true` needs a `path_prefix` matcher (or give the prefix to strip)",
        ),
        Some(StripPrefix::Prefix(s)) if !s.starts_with('/') => {
            errs.at(&format!("{p}.strip_prefix"), "the prefix must start with /")
        }
        _ => {}
    }
    if let Some(rw) = &r.rewrite {
        if let Err(e) = regex::Regex::new(&rw.path_regex) {
            errs.at(
                &format!("{p}.rewrite.path_regex"),
                format!("invalid regex: {}", one_line(&e.to_string())),
            );
        }
    }
    if let Some(h) = &r.headers {
        for (side, edit) in [("request", &h.request), ("response", &h.response)] {
            check_header_map(&edit.set, &format!("{p}.headers.{side}.set"), errs);
            for (j, n) in edit.remove.iter().enumerate() {
                if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                    errs.at(
                        &format!("{p}.headers.{side}.remove[{j}]"),
                        format!("invalid header name `{n}`"),
                    );
                }
            }
        }
    }
    for (j, e) in r.plugins.iter().enumerate() {
        validate_plugin(e, &format!("{p}.plugins[{j}]"), &r.name, cfg, errs);
    }
}

/// The parameters a route's path matcher captures.
pub fn route_params(m: &crate::config::model::Match) -> Vec<String> {
    let mut out = vec![];
    if let Some(p) = &m.path {
        for seg in p.split('/') {
            if let Some(n) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                out.push(n.to_string());
            }
        }
    }
    if let Some(re) = &m.path_regex {
        if let Ok(re) = regex::Regex::new(re) {
            out.extend(re.capture_names().flatten().map(str::to_string));
        }
    }
    out
}

fn check_header_map(m: &std::collections::BTreeMap<String, String>, p: &str, errs: &mut Errors) {
    for (k, v) in m {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            errs.at_key(&format!("{p}.{k}"), format!("invalid header name `{k}`"));
        } else if http::HeaderValue::from_str(v).is_err() {
            errs.at(
                &format!("{p}.{k}"),
                format!("invalid value for header `{k}`"),
            );
        }
    }
}

/// Checks one plugin entry of `scope` (a route's name, `""` for the global list) with
/// the config's shared services, unconnected.
fn validate_plugin(
    entry: &serde_yaml::Value,
    p: &str,
    scope: &str,
    cfg: &Config,
    errs: &mut Errors,
) {
    let services = crate::snapshot::plugin_services(cfg.redis.as_ref(), None, None);
    let env = portico_plugins::services::BuildEnv {
        scope,
        services: &services,
    };
    match portico_plugins::Registry::builtin().validate_with(entry, &env) {
        Ok(()) => {}
        Err(portico_plugins::EntryError::Shape(m)) => errs.at(p, m),
        Err(e @ portico_plugins::EntryError::Settings { .. }) => {
            // Point at the field the plugin complains about, when it can be found.
            let loc = e.location(entry);
            if let portico_plugins::EntryError::Settings { plugin, message } = e {
                match loc {
                    Some(l) if l.key => errs.at_key(&format!("{p}.{plugin}.{}", l.path), message),
                    Some(l) => errs.at(&format!("{p}.{plugin}.{}", l.path), message),
                    None => errs.at(&format!("{p}.{plugin}"), message),
                }
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `10.0.0.0/8`, `::1/128` or a plain address (as a single-host network).
pub fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Resolves `host:port` once (at compile time).
pub fn resolve(addr: &str) -> Option<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Some(a);
    }
    if !addr.contains(':') {
        return None;
    }
    addr.to_socket_addrs().ok()?.next()
}

fn valid_hash_on(h: &str) -> bool {
    match h.split_once(':') {
        Some(("header", n)) | Some(("cookie", n)) | Some(("query", n)) => !n.is_empty(),
        None => matches!(h, "client_ip" | "path"),
        _ => false,
    }
}
