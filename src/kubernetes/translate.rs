//! Cluster state -> the config model a file gives. A pure function: the same state
//! and base always give the same config, with stable, readable names
//! (`ingress/NS/NAME/rule-0/path-1`, `httproute/NS/NAME/rule-0/match-0`,
//! `svc/NS/NAME:PORT`), so an unchanged Service keeps its compiled upstream (health,
//! pools, breakers) across translations.
//!
//! The rules, in the order they are applied:
//! - **Which Ingresses.** Portico's classes are `kubernetes.ingress_class` and every
//!   IngressClass whose `spec.controller` is `portico.io/ingress-controller` (an
//!   IngressClass of the configured name with another controller is not ours). An
//!   Ingress is Portico's when its `spec.ingressClassName` is one of them; without a
//!   class name, when its legacy `kubernetes.io/ingress.class` annotation is; without
//!   either, when one of our IngressClasses is annotated
//!   `ingressclass.kubernetes.io/is-default-class: "true"`. `kubernetes.namespaces`,
//!   when not empty, limits every kind to those namespaces.
//! - **Hosts.** `host: a.example.com` is an exact host, `*.example.com` a wildcard (in
//!   Portico a wildcard matches one or more labels; the Ingress spec says exactly one).
//!   A rule without host matches every host.
//! - **Paths.** `Exact` is an exact path; `Prefix` is segment-wise (`/foo` matches
//!   `/foo` and `/foo/bar`, never `/foobar`; a trailing slash is ignored);
//!   `ImplementationSpecific` means `Prefix` in Portico. The router's precedence
//!   applies across Ingresses: exact host before wildcard before none, `Exact` before
//!   longer prefixes before shorter ones.
//! - **Conflicts.** Ingresses are taken oldest first (creationTimestamp, then
//!   namespace/name). A (host, path, pathType) already served by an older Ingress is
//!   left out of the newer one, and so is a second `defaultBackend` or a second
//!   Secret for a TLS host; each such loss is reported as a rejection of the newer
//!   Ingress (the rest of it is served).
//! - **Backends.** A Service port, by number or name, resolves to the EndpointSlices
//!   labelled `kubernetes.io/service-name`: endpoints whose `ready` condition is not
//!   false (unset means ready), on the EndpointSlice port named like the Service port.
//!   When none is ready, endpoints that are `serving` while `terminating` are used,
//!   as the EndpointSlice documentation allows, so a rollout's last connections can
//!   drain. A missing Service or a Service without endpoints gives a route answering
//!   503 (the route still claims its path). `resource` backends and ExternalName
//!   Services are rejected.
//! - **Default backend.** An Ingress's `defaultBackend` becomes a host-less `/`
//!   route, which the router tries after every host-specific route: it serves what
//!   no rule matches.
//! - **TLS.** Each `tls` entry's `kubernetes.io/tls` Secret (same namespace) serves
//!   its `hosts` (or the names in its certificate) on every TLS listener of the base
//!   config, through SNI. A missing or bad Secret is reported; the routes stay.
//! - **Annotations** (`portico.io/...`): `rate-limit`, `jwt`, `api-key`, `cors`,
//!   `compression` hold the plugin's settings as YAML (`"true"` for defaults);
//!   `rewrite-target` replaces the matched prefix; `timeout` is a duration; `retries`
//!   is a count or a retries mapping. They are checked by the plugin registry and the
//!   config validation; an unknown or bad annotation leaves that Ingress out.
//! - **Gateway API.** An HTTPRoute is Portico's when a `parentRef` names a Gateway
//!   whose `gatewayClassName` is one of our classes (a GatewayClass of that name must
//!   name our controller, if it exists), in the route's namespace or one whose
//!   listeners allow routes from all namespaces. Each rule's match becomes a route:
//!   path (`Exact`, `PathPrefix`, `RegularExpression`), headers, query parameters,
//!   method; filters `RequestHeaderModifier`, `ResponseHeaderModifier`,
//!   `RequestRedirect`, `URLRewrite`; weighted `backendRefs` become a split.

use super::objects::{
    ClusterState, HttpBackendRef, HttpRoute, HttpRouteMatch, HttpRouteRule, Key, PathModifier,
};
use super::CONTROLLER_NAME;
use crate::config::model::{
    Config, EndpointSpec, HeaderEdit, HeaderRules, Kubernetes, Match, Redirect, Respond, Retries,
    Rewrite, Route, SplitEntry, Upstream,
};
use crate::config::units::Dur;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The result of a translation.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    /// The config to run: the base file plus the generated upstreams and routes.
    pub config: Config,
    /// Certificates from TLS Secrets, for the TLS listeners' SNI.
    pub certificates: Vec<crate::tls::PemCert>,
    /// Objects (or parts of them) left out, with why.
    pub rejected: Vec<Rejected>,
}

/// An object left out of the translation, in whole or in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl Rejected {
    /// `Kind ns/name` (or `Kind name` when cluster-scoped).
    pub fn object(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const ANNOTATION_PREFIX: &str = "portico.io/";

/// What one object contributes before it is merged.
#[derive(Default)]
struct Fragment {
    routes: Vec<Route>,
    upstreams: BTreeMap<String, Upstream>,
}

/// The Services and their ready endpoints, indexed once per translation.
struct Backends<'a> {
    state: &'a ClusterState,
    /// (namespace, service name) -> its EndpointSlices.
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

/// A resolved backend: an upstream to create, or why there is none.
enum Resolved {
    Upstream(String, Box<Upstream>),
    /// The route answers 503: the Service or its endpoints are missing.
    Unavailable(String),
}

impl<'a> Backends<'a> {
    fn new(state: &'a ClusterState) -> Backends<'a> {
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for ((ns, _), s) in &state.endpoint_slices {
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                slices
                    .entry((ns.as_str(), svc.as_str()))
                    .or_default()
                    .push(s);
            }
        }
        Backends { state, slices }
    }

    /// Resolves Service `name` in `ns` at `port` (a number or a port name).
    fn resolve(&self, ns: &str, name: &str, port: PortRef<'_>) -> Result<Resolved, String> {
        let Some(svc) = self.state.services.get(&(ns.to_string(), name.to_string())) else {
            return Ok(Resolved::Unavailable(format!(
                "Service {ns}/{name} does not exist"
            )));
        };
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            return Err(format!(
                "Service {ns}/{name} is of type ExternalName, which Portico does not route to"
            ));
        }
        let ports = spec.ports.unwrap_or_default();
        let sp = match port {
            PortRef::Number(n) => ports.iter().find(|p| p.port == n),
            PortRef::Name(n) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
        };
        let Some(sp) = sp else {
            return Err(format!("Service {ns}/{name} has no port {port}"));
        };
        let upstream_name = format!("svc/{ns}/{name}:{}", sp.port);
        let port_name = sp.name.clone().unwrap_or_default();
        let mut ready = BTreeSet::new();
        let mut draining = BTreeSet::new();
        for slice in self
            .slices
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let Some(ep_port) = slice.ports.as_ref().and_then(|ps| {
                ps.iter()
                    .find(|p| p.name.clone().unwrap_or_default() == port_name)
                    .and_then(|p| p.port)
            }) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let Some(addr) = ep.addresses.first() else {
                    continue;
                };
                let address = if addr.contains(':') {
                    format!("[{addr}]:{ep_port}")
                } else {
                    format!("{addr}:{ep_port}")
                };
                let c = ep.conditions.clone().unwrap_or_default();
                if c.ready != Some(false) {
                    ready.insert(address);
                } else if c.serving == Some(true) && c.terminating == Some(true) {
                    draining.insert(address);
                }
            }
        }
        let chosen = if ready.is_empty() { draining } else { ready };
        if chosen.is_empty() {
            return Ok(Resolved::Unavailable(format!(
                "Service {ns}/{name} port {} has no ready endpoints",
                sp.port
            )));
        }
        Ok(Resolved::Upstream(
            upstream_name,
            Box::new(Upstream {
                endpoints: chosen.into_iter().map(EndpointSpec::Plain).collect(),
                ..Default::default()
            }),
        ))
    }
}

/// A Service port reference.
#[derive(Clone, Copy)]
enum PortRef<'a> {
    Number(i32),
    Name(&'a str),
}

impl std::fmt::Display for PortRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => write!(f, "`{n}`"),
        }
    }
}

/// Points `route` at `backend`: an upstream (added to `frag`) or a 503 answer.
fn point_at(route: &mut Route, r: Resolved, frag: &mut Fragment) {
    match r {
        Resolved::Upstream(name, u) => {
            route.upstream = Some(name.clone());
            frag.upstreams.insert(name, *u);
        }
        Resolved::Unavailable(why) => route.respond = Some(unavailable(&why)),
    }
}

fn unavailable(why: &str) -> Respond {
    Respond {
        status: 503,
        body: serde_json::json!({"error": "no_endpoints", "message": why}).to_string(),
        headers: BTreeMap::from([("content-type".to_string(), "application/json".to_string())]),
    }
}

/// Translates `state` onto `base`.
pub fn translate(state: &ClusterState, base: &Config, settings: &Kubernetes) -> Translation {
    let mut out = Translation {
        config: base.clone(),
        ..Default::default()
    };
    let in_scope =
        |ns: &str| settings.namespaces.is_empty() || settings.namespaces.iter().any(|n| n == ns);
    let classes = our_classes(state, settings);
    let backends = Backends::new(state);

    // Oldest first: creationTimestamp, then namespace/name (the map's order).
    let mut ingresses: Vec<(&Key, &Ingress)> = state
        .ingresses
        .iter()
        .filter(|((ns, _), ing)| in_scope(ns) && is_ours(ing, state, &classes))
        .collect();
    ingresses.sort_by(|a, b| {
        a.1.metadata
            .creation_timestamp
            .cmp(&b.1.metadata.creation_timestamp)
            .then_with(|| a.0.cmp(b.0))
    });
    let mut claimed: HashMap<(String, String, String), String> = HashMap::new();
    let mut default_claimed: Option<String> = None;
    let mut tls_claimed: HashMap<String, (String, String)> = HashMap::new();
    let mut upstreams: BTreeMap<String, Upstream> = BTreeMap::new();
    let mut routes: Vec<Route> = vec![];
    for ((ns, name), ing) in ingresses {
        let reject = |reason: String| Rejected {
            kind: "Ingress".into(),
            namespace: ns.clone(),
            name: name.clone(),
            reason,
        };
        let owner = format!("{ns}/{name}");
        let frag = match ingress_fragment(ns, name, ing, &backends, base) {
            Ok(f) => f,
            Err(reason) => {
                out.rejected.push(reject(reason));
                continue;
            }
        };
        for r in frag.routes {
            let key = (
                r.matcher.hosts.first().cloned().unwrap_or_default(),
                r.matcher
                    .path
                    .clone()
                    .or_else(|| r.matcher.path_regex.clone())
                    .map(|p| format!("={p}"))
                    .or_else(|| {
                        r.matcher
                            .path_prefix
                            .as_ref()
                            .map(|p| format!("^{}", p.trim_end_matches('/')))
                    })
                    .unwrap_or_default(),
                String::new(),
            );
            let is_default = r.name.ends_with("/default");
            if is_default {
                if let Some(first) = &default_claimed {
                    out.rejected.push(reject(format!(
                        "defaultBackend ignored: Ingress {first} (older) already gives the default backend"
                    )));
                    continue;
                }
                default_claimed = Some(owner.clone());
            } else if let Some(first) = claimed.get(&key) {
                if first != &owner {
                    let host = if key.0.is_empty() {
                        "*any host*"
                    } else {
                        &key.0
                    };
                    out.rejected.push(reject(format!(
                        "path {} on host {host} is already served by Ingress {first} (older)",
                        key.1.get(1..).unwrap_or("")
                    )));
                    continue;
                }
            } else {
                claimed.insert(key, owner.clone());
            }
            routes.push(r);
        }
        for (n, u) in frag.upstreams {
            upstreams.insert(n, u);
        }
        // TLS: the Secrets' certificates for SNI.
        for t in ing
            .spec
            .as_ref()
            .and_then(|s| s.tls.as_ref())
            .into_iter()
            .flatten()
        {
            let Some(secret_name) = &t.secret_name else {
                continue;
            };
            let hosts = t.hosts.clone().unwrap_or_default();
            let mut free = vec![];
            for h in &hosts {
                match tls_claimed.get(h) {
                    Some((o, s)) if o != &owner && s != secret_name => {
                        out.rejected.push(reject(format!(
                            "TLS host {h} already uses Secret {s} of Ingress {o} (older)"
                        )));
                    }
                    _ => {
                        tls_claimed.insert(h.clone(), (owner.clone(), secret_name.clone()));
                        free.push(h.clone());
                    }
                }
            }
            if !hosts.is_empty() && free.is_empty() {
                continue;
            }
            match secret_pem(state, ns, secret_name, free) {
                Ok(p) => {
                    if !out.certificates.contains(&p) {
                        out.certificates.push(p)
                    }
                }
                Err(e) => out.rejected.push(reject(format!("tls: {e}"))),
            }
        }
    }

    // Gateway API.
    let gateways = our_gateways(state, &classes, &in_scope);
    for ((ns, name), hr) in &state.http_routes {
        if !in_scope(ns) {
            continue;
        }
        match attached(ns, hr, &gateways) {
            Attach::No => continue,
            Attach::Refused(reason) => {
                out.rejected.push(Rejected {
                    kind: "HTTPRoute".into(),
                    namespace: ns.clone(),
                    name: name.clone(),
                    reason,
                });
                continue;
            }
            Attach::Yes => {}
        }
        match httproute_fragment(ns, name, hr, &backends, base) {
            Ok(f) => {
                routes.extend(f.routes);
                upstreams.extend(f.upstreams);
            }
            Err(reason) => out.rejected.push(Rejected {
                kind: "HTTPRoute".into(),
                namespace: ns.clone(),
                name: name.clone(),
                reason,
            }),
        }
    }

    out.config.upstreams.extend(upstreams);
    out.config.routes.extend(routes);
    out
}

/// The class names that are Portico's.
fn our_classes(state: &ClusterState, settings: &Kubernetes) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let configured = state
        .ingress_classes
        .get(&(String::new(), settings.ingress_class.clone()));
    let configured_ours = configured
        .map(|c| c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER_NAME))
        .unwrap_or(true);
    if configured_ours {
        out.insert(settings.ingress_class.clone());
    }
    for ((_, name), c) in &state.ingress_classes {
        if c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER_NAME) {
            out.insert(name.clone());
        }
    }
    out
}

fn is_ours(ing: &Ingress, state: &ClusterState, classes: &BTreeSet<String>) -> bool {
    if let Some(c) = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_ref())
    {
        return classes.contains(c);
    }
    if let Some(c) = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION))
    {
        return classes.contains(c);
    }
    state.ingress_classes.iter().any(|((_, name), c)| {
        classes.contains(name)
            && c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                .is_some_and(|v| v == "true")
    })
}

/// Route fields set by `portico.io/...` annotations.
#[derive(Default)]
struct Annotated {
    plugins: Vec<serde_yaml::Value>,
    rewrite_target: Option<String>,
    timeout: Option<Dur>,
    retries: Option<Retries>,
}

fn annotations(meta: &ObjectMeta) -> Result<Annotated, String> {
    let mut a = Annotated::default();
    let Some(ann) = &meta.annotations else {
        return Ok(a);
    };
    for (k, v) in ann {
        let Some(key) = k.strip_prefix(ANNOTATION_PREFIX) else {
            continue;
        };
        let yaml = || -> Result<serde_yaml::Value, String> {
            if v.trim() == "true" {
                return Ok(serde_yaml::Value::Mapping(Default::default()));
            }
            serde_yaml::from_str(v).map_err(|e| format!("annotation {k}: not YAML: {e}"))
        };
        let plugin = match key {
            "rate-limit" => Some("rate_limit"),
            "jwt" => Some("jwt"),
            "api-key" => Some("api_key"),
            "cors" => Some("cors"),
            "compression" => Some("compression"),
            _ => None,
        };
        if let Some(p) = plugin {
            let mut m = serde_yaml::Mapping::new();
            m.insert(p.into(), yaml()?);
            let entry = serde_yaml::Value::Mapping(m);
            portico_plugins::Registry::builtin()
                .validate(&entry)
                .map_err(|e| format!("annotation {k}: {e}"))?;
            a.plugins.push(entry);
            continue;
        }
        match key {
            "rewrite-target" => {
                if !v.starts_with('/') {
                    return Err(format!("annotation {k}: `{v}` must start with /"));
                }
                a.rewrite_target = Some(v.clone());
            }
            "timeout" => {
                let d: Dur = serde_yaml::from_value(serde_yaml::Value::String(v.clone()))
                    .map_err(|e| format!("annotation {k}: {e}"))?;
                a.timeout = Some(d);
            }
            "retries" => {
                let val = match v.trim().parse::<u32>() {
                    Ok(n) => serde_yaml::from_str(&format!("{{attempts: {n}}}")),
                    Err(_) => serde_yaml::from_str(v),
                };
                let r: Retries = val.map_err(|e| format!("annotation {k}: {e}"))?;
                a.retries = Some(r);
            }
            other => {
                return Err(format!(
                    "unknown annotation {ANNOTATION_PREFIX}{other} (known: rate-limit, jwt, \
                     api-key, cors, compression, rewrite-target, timeout, retries)"
                ))
            }
        }
    }
    Ok(a)
}

/// Checks a fragment with the config validation (plugins, regexes, references).
fn validate_fragment(frag: &Fragment, base: &Config) -> Result<(), String> {
    let cfg = Config {
        upstreams: frag.upstreams.clone(),
        routes: frag.routes.clone(),
        kubernetes: base.kubernetes.clone(),
        redis: base.redis.clone(),
        ..Default::default()
    };
    let pos = crate::config::load::Positions::default();
    let mut errs = crate::config::load::Errors {
        file: "translated",
        pos: &pos,
        list: vec![],
        maps: HashMap::new(),
    };
    let known: BTreeSet<String> = cfg.upstreams.keys().cloned().collect();
    crate::config::validate::validate(&cfg, &known, true, &mut errs);
    if errs.list.is_empty() {
        Ok(())
    } else {
        Err(errs
            .list
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("; "))
    }
}

fn port_ref(b: &IngressBackend) -> Result<(&str, PortRef<'_>), String> {
    if b.resource.is_some() {
        return Err("resource backends are not supported (use a Service)".into());
    }
    let Some(s) = &b.service else {
        return Err("a backend needs a service".into());
    };
    let p = s.port.as_ref();
    let port = match (p.and_then(|p| p.number), p.and_then(|p| p.name.as_deref())) {
        (Some(n), _) => PortRef::Number(n),
        (None, Some(n)) => PortRef::Name(n),
        (None, None) => return Err(format!("backend service {} has no port", s.name)),
    };
    Ok((&s.name, port))
}

/// An escaped, anchored regex for a literal path.
fn literal_regex(p: &str) -> String {
    format!("^{}$", regex::escape(p))
}

fn ingress_fragment(
    ns: &str,
    name: &str,
    ing: &Ingress,
    backends: &Backends,
    base: &Config,
) -> Result<Fragment, String> {
    let ann = annotations(&ing.metadata)?;
    let mut frag = Fragment::default();
    let spec = ing.spec.clone().unwrap_or_default();
    let decorate = |r: &mut Route| {
        r.plugins = ann.plugins.clone();
        r.timeout = ann.timeout;
        r.retries = ann.retries.clone();
    };
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let host = rule.host.clone().filter(|h| !h.is_empty());
        for (j, path) in rule
            .http
            .as_ref()
            .map(|h| h.paths.as_slice())
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            let p = path.path.clone().unwrap_or_else(|| "/".into());
            if !p.starts_with('/') {
                return Err(format!("rule {i} path {j}: `{p}` must start with /"));
            }
            let mut m = Match {
                hosts: host.iter().cloned().collect(),
                ..Default::default()
            };
            let prefix = match path.path_type.as_str() {
                "Exact" => {
                    if p.contains(['{', '}']) {
                        m.path_regex = Some(literal_regex(&p));
                    } else {
                        m.path = Some(p.clone());
                    }
                    None
                }
                "Prefix" | "ImplementationSpecific" => {
                    let pre = if p == "/" {
                        "/".to_string()
                    } else {
                        p.trim_end_matches('/').to_string()
                    };
                    m.path_prefix = Some(pre.clone());
                    Some(pre)
                }
                other => return Err(format!("rule {i} path {j}: unknown pathType `{other}`")),
            };
            let mut r = Route {
                name: format!("ingress/{ns}/{name}/rule-{i}/path-{j}"),
                matcher: m,
                ..Default::default()
            };
            decorate(&mut r);
            if let Some(t) = &ann.rewrite_target {
                r.rewrite = Some(match &prefix {
                    Some(pre) => Rewrite {
                        path_regex: format!("^{}/?(.*)$", regex::escape(pre.trim_end_matches('/'))),
                        replacement: format!("{}/${{1}}", t.trim_end_matches('/')),
                    },
                    None => Rewrite {
                        path_regex: "^.*$".into(),
                        replacement: t.clone(),
                    },
                });
            }
            let (svc, port) =
                port_ref(&path.backend).map_err(|e| format!("rule {i} path {j}: {e}"))?;
            let res = backends
                .resolve(ns, svc, port)
                .map_err(|e| format!("rule {i} path {j}: {e}"))?;
            point_at(&mut r, res, &mut frag);
            frag.routes.push(r);
        }
    }
    if let Some(b) = &spec.default_backend {
        let mut r = Route {
            name: format!("ingress/{ns}/{name}/default"),
            matcher: Match {
                path_prefix: Some("/".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        decorate(&mut r);
        let (svc, port) = port_ref(b).map_err(|e| format!("defaultBackend: {e}"))?;
        let res = backends
            .resolve(ns, svc, port)
            .map_err(|e| format!("defaultBackend: {e}"))?;
        point_at(&mut r, res, &mut frag);
        frag.routes.push(r);
    }
    validate_fragment(&frag, base)?;
    Ok(frag)
}

fn secret_pem(
    state: &ClusterState,
    ns: &str,
    name: &str,
    hosts: Vec<String>,
) -> Result<crate::tls::PemCert, String> {
    let Some(s) = state.secrets.get(&(ns.to_string(), name.to_string())) else {
        return Err(format!("Secret {ns}/{name} does not exist"));
    };
    if s.type_.as_deref() != Some("kubernetes.io/tls") {
        return Err(format!(
            "Secret {ns}/{name} is not of type kubernetes.io/tls"
        ));
    }
    let get = |k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .or_else(|| {
                s.string_data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .map(|v| v.clone().into_bytes())
            })
            .ok_or_else(|| format!("Secret {ns}/{name} has no {k}"))
    };
    let p = crate::tls::PemCert {
        source: format!("secret {ns}/{name}"),
        names: hosts,
        cert_pem: get("tls.crt")?,
        key_pem: get("tls.key")?,
    };
    crate::tls::load_pem(&p)?;
    Ok(p)
}

// ---- Gateway API ----

/// Our Gateways: key -> whether routes from every namespace may attach.
fn our_gateways(
    state: &ClusterState,
    classes: &BTreeSet<String>,
    in_scope: &dyn Fn(&str) -> bool,
) -> BTreeMap<Key, bool> {
    state
        .gateways
        .iter()
        .filter(|((ns, _), g)| {
            let class = &g.spec.gateway_class_name;
            let class_ok = match state.gateway_classes.get(&(String::new(), class.clone())) {
                Some(gc) => gc.spec.controller_name == CONTROLLER_NAME,
                None => classes.contains(class),
            };
            in_scope(ns) && class_ok
        })
        .map(|(k, g)| {
            let all = g.spec.listeners.iter().any(|l| {
                l.allowed_routes
                    .as_ref()
                    .and_then(|a| a.namespaces.as_ref())
                    .and_then(|n| n.from.as_deref())
                    == Some("All")
            });
            (k.clone(), all)
        })
        .collect()
}

enum Attach {
    Yes,
    No,
    Refused(String),
}

fn attached(ns: &str, hr: &HttpRoute, gateways: &BTreeMap<Key, bool>) -> Attach {
    let mut refused = None;
    for p in &hr.spec.parent_refs {
        let group_ok = p
            .group
            .as_deref()
            .is_none_or(|g| g == "gateway.networking.k8s.io");
        let kind_ok = p.kind.as_deref().is_none_or(|k| k == "Gateway");
        if !group_ok || !kind_ok {
            continue;
        }
        let gns = p.namespace.clone().unwrap_or_else(|| ns.to_string());
        if let Some(&all) = gateways.get(&(gns.clone(), p.name.clone())) {
            if gns == ns || all {
                return Attach::Yes;
            }
            refused = Some(format!(
                "Gateway {gns}/{} does not allow routes from namespace {ns} \
                 (allowedRoutes.namespaces.from: All)",
                p.name
            ));
        }
    }
    refused.map_or(Attach::No, Attach::Refused)
}

fn httproute_fragment(
    ns: &str,
    name: &str,
    hr: &HttpRoute,
    backends: &Backends,
    base: &Config,
) -> Result<Fragment, String> {
    let mut frag = Fragment::default();
    for (i, rule) in hr.spec.rules.iter().enumerate() {
        let matches: Vec<HttpRouteMatch> = if rule.matches.is_empty() {
            vec![HttpRouteMatch::default()]
        } else {
            rule.matches.clone()
        };
        for (j, m) in matches.iter().enumerate() {
            let ctx = format!("rule {i} match {j}");
            let mut r = Route {
                name: format!("httproute/{ns}/{name}/rule-{i}/match-{j}"),
                matcher: Match {
                    hosts: hr.spec.hostnames.clone(),
                    ..Default::default()
                },
                ..Default::default()
            };
            let prefix = route_match(m, &mut r.matcher).map_err(|e| format!("{ctx}: {e}"))?;
            filters(rule, &prefix, &hr.spec.hostnames, &mut r)
                .map_err(|e| format!("{ctx}: {e}"))?;
            if r.redirect.is_none() {
                backend_refs(ns, rule, backends, &mut r, &mut frag)
                    .map_err(|e| format!("{ctx}: {e}"))?;
            }
            frag.routes.push(r);
        }
    }
    validate_fragment(&frag, base)?;
    Ok(frag)
}

/// Fills the matcher; returns the path prefix matched, if any (for URLRewrite).
fn route_match(m: &HttpRouteMatch, out: &mut Match) -> Result<Option<String>, String> {
    let mut prefix = Some("/".to_string());
    if let Some(p) = &m.path {
        let v = p.value.clone().unwrap_or_else(|| "/".into());
        match p.kind.as_deref().unwrap_or("PathPrefix") {
            "PathPrefix" => {
                let pre = if v == "/" {
                    v
                } else {
                    v.trim_end_matches('/').to_string()
                };
                out.path_prefix = Some(pre.clone());
                prefix = Some(pre);
            }
            "Exact" => {
                if v.contains(['{', '}']) {
                    out.path_regex = Some(literal_regex(&v));
                } else {
                    out.path = Some(v);
                }
                prefix = None;
            }
            "RegularExpression" => {
                out.path_regex = Some(v);
                prefix = None;
            }
            other => return Err(format!("unknown path match type `{other}`")),
        }
    } else {
        out.path_prefix = Some("/".into());
    }
    for h in &m.headers {
        let v = match h.kind.as_deref().unwrap_or("Exact") {
            "Exact" if !h.value.starts_with('~') => h.value.clone(),
            "Exact" => format!("~{}", literal_regex(&h.value)),
            "RegularExpression" => format!("~{}", h.value),
            other => return Err(format!("unknown header match type `{other}`")),
        };
        out.headers.insert(h.name.to_ascii_lowercase(), v);
    }
    for q in &m.query_params {
        match q.kind.as_deref().unwrap_or("Exact") {
            "Exact" => {
                out.query.insert(q.name.clone(), q.value.clone());
            }
            other => {
                return Err(format!(
                    "query parameter match type `{other}` is not supported"
                ))
            }
        }
    }
    if let Some(method) = &m.method {
        out.methods = vec![method.clone()];
    }
    Ok(prefix)
}

fn header_edit(m: &super::objects::HeaderModifier) -> HeaderEdit {
    let mut e = HeaderEdit::default();
    // `add` appends in the Gateway API; Portico's header edits replace, so an added
    // header replaces a client's header of the same name.
    for h in m.add.iter().chain(&m.set) {
        e.set.insert(h.name.to_ascii_lowercase(), h.value.clone());
    }
    e.remove = m.remove.iter().map(|h| h.to_ascii_lowercase()).collect();
    e
}

fn path_rewrite(pm: &PathModifier, prefix: &Option<String>) -> Result<Rewrite, String> {
    match pm.kind.as_str() {
        "ReplaceFullPath" => Ok(Rewrite {
            path_regex: "^.*$".into(),
            replacement: pm.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        }),
        "ReplacePrefixMatch" => {
            let Some(pre) = prefix else {
                return Err("ReplacePrefixMatch needs a PathPrefix match".into());
            };
            let to = pm
                .replace_prefix_match
                .clone()
                .unwrap_or_else(|| "/".into());
            Ok(Rewrite {
                path_regex: format!("^{}/?(.*)$", regex::escape(pre.trim_end_matches('/'))),
                replacement: format!("{}/${{1}}", to.trim_end_matches('/')),
            })
        }
        other => Err(format!("unknown path modifier `{other}`")),
    }
}

fn filters(
    rule: &HttpRouteRule,
    prefix: &Option<String>,
    hostnames: &[String],
    r: &mut Route,
) -> Result<(), String> {
    for f in &rule.filters {
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                let m = f
                    .request_header_modifier
                    .as_ref()
                    .ok_or("RequestHeaderModifier without settings")?;
                r.headers.get_or_insert_with(HeaderRules::default).request = header_edit(m);
            }
            "ResponseHeaderModifier" => {
                let m = f
                    .response_header_modifier
                    .as_ref()
                    .ok_or("ResponseHeaderModifier without settings")?;
                r.headers.get_or_insert_with(HeaderRules::default).response = header_edit(m);
            }
            "URLRewrite" => {
                let u = f
                    .url_rewrite
                    .as_ref()
                    .ok_or("URLRewrite without settings")?;
                if let Some(pm) = &u.path {
                    r.rewrite = Some(path_rewrite(pm, prefix)?);
                }
                if let Some(h) = &u.hostname {
                    r.headers
                        .get_or_insert_with(HeaderRules::default)
                        .request
                        .set
                        .insert("host".into(), h.clone());
                }
            }
            "RequestRedirect" => {
                let rd = f
                    .request_redirect
                    .as_ref()
                    .ok_or("RequestRedirect without settings")?;
                let path = match &rd.path {
                    Some(pm) if pm.kind == "ReplaceFullPath" => {
                        pm.replace_full_path.clone().unwrap_or_else(|| "/".into())
                    }
                    Some(_) => {
                        return Err(
                            "RequestRedirect: only ReplaceFullPath paths are supported".into()
                        )
                    }
                    None => match &r.matcher.path {
                        Some(p) => p.clone(),
                        None if rd.scheme.is_none() && rd.hostname.is_none() => {
                            return Err("RequestRedirect changes nothing".into())
                        }
                        None => "/".into(),
                    },
                };
                let to = if rd.scheme.is_some() || rd.hostname.is_some() || rd.port.is_some() {
                    let host = match (&rd.hostname, hostnames) {
                        (Some(h), _) => h.clone(),
                        (None, [h]) if !h.starts_with('*') => h.clone(),
                        _ => {
                            return Err("RequestRedirect without hostname needs exactly one \
                                        non-wildcard route hostname"
                                .into())
                        }
                    };
                    let scheme = rd.scheme.clone().unwrap_or_else(|| "http".into());
                    let port = rd.port.map(|p| format!(":{p}")).unwrap_or_default();
                    format!("{scheme}://{host}{port}{path}")
                } else {
                    path
                };
                r.redirect = Some(Redirect {
                    to,
                    status: rd.status_code.unwrap_or(302),
                    keep_query: true,
                });
            }
            other => return Err(format!("filter `{other}` is not supported")),
        }
    }
    Ok(())
}

fn backend_refs(
    ns: &str,
    rule: &HttpRouteRule,
    backends: &Backends,
    r: &mut Route,
    frag: &mut Fragment,
) -> Result<(), String> {
    let mut arms: Vec<(Resolved, u32)> = vec![];
    for b in &rule.backend_refs {
        let weight = b.weight.unwrap_or(1);
        if weight < 0 {
            return Err(format!("backendRef {}: negative weight", b.name));
        }
        if weight == 0 {
            continue;
        }
        arms.push((resolve_ref(ns, b, backends)?, weight as u32));
    }
    let live: Vec<(String, Upstream, u32)> = arms
        .iter()
        .filter_map(|(res, w)| match res {
            Resolved::Upstream(n, u) => Some((n.clone(), (**u).clone(), *w)),
            Resolved::Unavailable(_) => None,
        })
        .collect();
    if live.is_empty() {
        let why = arms
            .iter()
            .find_map(|(res, _)| match res {
                Resolved::Unavailable(w) => Some(w.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "no backendRefs with weight above 0".into());
        // The Gateway API asks for 500 when no backend is valid.
        let mut resp = unavailable(&why);
        resp.status = 500;
        r.respond = Some(resp);
        return Ok(());
    }
    if live.len() == 1 && arms.len() == 1 {
        let (n, u, _) = live.into_iter().next().ok_or("no backend")?;
        point_at(r, Resolved::Upstream(n, Box::new(u)), frag);
        return Ok(());
    }
    r.split = Some(
        live.iter()
            .map(|(n, _, w)| SplitEntry {
                upstream: n.clone(),
                weight: *w,
            })
            .collect(),
    );
    for (n, u, _) in live {
        frag.upstreams.insert(n, u);
    }
    Ok(())
}

fn resolve_ref(ns: &str, b: &HttpBackendRef, backends: &Backends) -> Result<Resolved, String> {
    if b.group.as_deref().is_some_and(|g| !g.is_empty())
        || b.kind.as_deref().is_some_and(|k| k != "Service")
    {
        return Err(format!(
            "backendRef {}: only Services are supported",
            b.name
        ));
    }
    let bns = b.namespace.clone().unwrap_or_else(|| ns.to_string());
    if bns != ns {
        return Err(format!(
            "backendRef {bns}/{}: cross-namespace backends need a ReferenceGrant, which Portico does not read",
            b.name
        ));
    }
    let Some(port) = b.port else {
        return Err(format!(
            "backendRef {}: a Service backend needs a port",
            b.name
        ));
    };
    backends.resolve(ns, &b.name, PortRef::Number(port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::objects::Object;

    fn state(yaml: &str) -> ClusterState {
        let mut st = ClusterState::default();
        let mut problems = vec![];
        crate::kubernetes::manifests::load_text(yaml, "t", &mut st, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        st
    }

    const SVC: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: n}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: n, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.0.0.1], conditions: {ready: true}}
  - {addresses: [10.0.0.2]}
  - {addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.0.0.4], conditions: {ready: false}}
";

    fn ing(name: &str, created: &str, extra: &str) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n\
             metadata: {{name: {name}, namespace: n, creationTimestamp: '{created}'{extra}}}\n\
             spec:\n  ingressClassName: portico\n  rules:\n  - host: a.test\n    http:\n      paths:\n\
             \x20     - {{path: /x/, pathType: Prefix, backend: {{service: {{name: web, port: {{name: http}}}}}}}}\n"
        )
    }

    fn run(yaml: &str) -> Translation {
        translate(&state(yaml), &Config::default(), &Kubernetes::default())
    }

    #[test]
    fn ready_endpoints_named_port_and_stable_names() {
        let t = run(&format!("{SVC}{}", ing("one", "2024-01-01T00:00:00Z", "")));
        assert!(t.rejected.is_empty(), "{:?}", t.rejected);
        let u = &t.config.upstreams["svc/n/web:80"];
        let eps: Vec<&str> = u.endpoints.iter().map(|e| e.address()).collect();
        assert_eq!(eps, ["10.0.0.1:8080", "10.0.0.2:8080"]);
        let r = &t.config.routes[0];
        assert_eq!(r.name, "ingress/n/one/rule-0/path-0");
        assert_eq!(r.matcher.path_prefix.as_deref(), Some("/x"));
        assert_eq!(r.matcher.hosts, ["a.test"]);
        assert_eq!(r.upstream.as_deref(), Some("svc/n/web:80"));
    }

    #[test]
    fn terminating_serving_endpoints_only_when_none_is_ready() {
        let yaml = SVC
            .replace(
                "  - {addresses: [10.0.0.1], conditions: {ready: true}}\n",
                "",
            )
            .replace("  - {addresses: [10.0.0.2]}\n", "");
        let t = run(&format!("{yaml}{}", ing("one", "2024-01-01T00:00:00Z", "")));
        let eps: Vec<&str> = t.config.upstreams["svc/n/web:80"]
            .endpoints
            .iter()
            .map(|e| e.address())
            .collect();
        assert_eq!(eps, ["10.0.0.3:8080"]);
    }

    #[test]
    fn oldest_wins_a_conflict_and_the_loser_is_reported() {
        let t = run(&format!(
            "{SVC}{}{}",
            ing("young", "2024-05-01T00:00:00Z", ""),
            ing("old", "2024-01-01T00:00:00Z", "")
        ));
        assert_eq!(t.config.routes.len(), 1);
        assert_eq!(t.config.routes[0].name, "ingress/n/old/rule-0/path-0");
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(t.rejected[0].object(), "Ingress n/young");
        assert!(t.rejected[0].reason.contains("Ingress n/old (older)"));
    }

    #[test]
    fn bad_annotation_leaves_only_that_ingress_out() {
        let t = run(&format!(
            "{SVC}{}{}",
            ing(
                "bad",
                "2024-01-01T00:00:00Z",
                ", annotations: {portico.io/timeout: soon}"
            ),
            ing(
                "good",
                "2024-02-01T00:00:00Z",
                ", annotations: {portico.io/retries: '2'}"
            )
        ));
        assert_eq!(t.config.routes.len(), 1, "{:?}", t.rejected);
        assert_eq!(
            t.config.routes[0].retries.as_ref().map(|r| r.attempts),
            Some(2)
        );
        assert_eq!(t.rejected[0].object(), "Ingress n/bad");
        assert!(t.rejected[0].reason.contains("portico.io/timeout"));
    }

    #[test]
    fn class_selection() {
        let mk = |name: &str, class: &str| {
            ing(name, "2024-01-01T00:00:00Z", "")
                .replace("ingressClassName: portico", class)
                .replace("host: a.test", &format!("host: {name}.test"))
        };
        let yaml = format!(
            "{SVC}{}{}{}",
            mk("ours", "ingressClassName: portico"),
            mk("theirs", "ingressClassName: nginx"),
            mk("classless", "ingressClassName: null")
        );
        assert_eq!(run(&yaml).config.routes.len(), 1);
        // a default IngressClass of ours adopts class-less Ingresses
        let dflt = "---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\n\
            metadata: {name: portico, annotations: {ingressclass.kubernetes.io/is-default-class: 'true'}}\n\
            spec: {controller: portico.io/ingress-controller}\n";
        assert_eq!(run(&format!("{yaml}{dflt}")).config.routes.len(), 2);
        // an IngressClass named like ours but of another controller is not ours
        let foreign = dflt.replace("portico.io/ingress-controller", "example.com/other");
        assert_eq!(run(&format!("{yaml}{foreign}")).config.routes.len(), 0);
    }

    #[test]
    fn missing_service_answers_503_and_exact_paths() {
        let yaml = ing("one", "2024-01-01T00:00:00Z", "").replace(
            "path: /x/, pathType: Prefix",
            "path: '/x/{y}', pathType: Exact",
        );
        let t = run(&yaml);
        let r = &t.config.routes[0];
        assert_eq!(r.respond.as_ref().map(|x| x.status), Some(503));
        assert_eq!(r.matcher.path_regex.as_deref(), Some("^/x/\\{y\\}$"));
        let _ = Object::from_json(serde_json::json!({})).unwrap_err();
    }

    #[test]
    fn httproute_split_header_match_and_attachment() {
        let yaml = format!(
            "{SVC}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: n}}
spec: {{gatewayClassName: portico, listeners: [{{name: http, port: 80}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: n}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [a.test]
  rules:
  - matches: [{{headers: [{{name: X-V, value: v2}}], method: GET, queryParams: [{{name: q, value: '1'}}]}}]
    backendRefs: [{{name: web, port: 80, weight: 9}}, {{name: gone, port: 80, weight: 1}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: stray, namespace: other}}
spec: {{parentRefs: [{{name: gw, namespace: n}}], rules: [{{}}]}}
"
        );
        let t = run(&yaml);
        let r = &t.config.routes[0];
        assert_eq!(r.name, "httproute/n/r/rule-0/match-0");
        assert_eq!(r.matcher.headers["x-v"], "v2");
        assert_eq!(r.matcher.methods, ["GET"]);
        assert_eq!(r.matcher.query["q"], "1");
        let split = r.split.as_ref().expect("a split");
        assert_eq!(split.len(), 1, "the missing Service's arm is left out");
        assert_eq!(t.config.routes.len(), 1);
        assert_eq!(t.rejected.len(), 1);
        assert!(t.rejected[0]
            .reason
            .contains("does not allow routes from namespace other"));
    }

    /// Translate + compile time at the scale (5,000 Ingresses, 50,000
    /// endpoints). `cargo test --release -- --ignored --nocapture large_state`.
    #[test]
    #[ignore]
    fn large_state() {
        let mut st = ClusterState::default();
        for i in 0..5000 {
            let svc = format!("svc-{i}");
            st.upsert(
                Object::from_json(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": svc, "namespace": "bench"},
                    "spec": {"ports": [{"name": "http", "port": 80}]}}))
                .unwrap(),
            );
            let eps: Vec<_> = (0..10)
                .map(|j| serde_json::json!({"addresses": [format!("10.{}.{}.{}", i / 250, i % 250, j + 1)], "conditions": {"ready": true}}))
                .collect();
            st.upsert(
                Object::from_json(serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{svc}-a"), "namespace": "bench", "labels": {SERVICE_NAME_LABEL: svc}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps}))
                .unwrap(),
            );
            st.upsert(
                Object::from_json(serde_json::json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                    "metadata": {"name": format!("ing-{i}"), "namespace": "bench"},
                    "spec": {"ingressClassName": "portico", "rules": [{"host": format!("h{i}.bench.test"), "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": svc, "port": {"number": 80}}}}]}}]}}))
                .unwrap(),
            );
        }
        let base = Config::default();
        let m = crate::metrics::Metrics::new();
        let t0 = std::time::Instant::now();
        let t = translate(&st, &base, &Kubernetes::default());
        let t_translate = t0.elapsed();
        let snap = crate::snapshot::compile(&t.config, None, None, &m, 1, None).unwrap();
        let t_first = t0.elapsed();
        assert_eq!(snap.table.routes().len(), 5000);
        // one EndpointSlice changes: full translate + compile against the previous snapshot
        let key = ("bench".to_string(), "svc-7-a".to_string());
        if let Some(s) = st.endpoint_slices.get_mut(&key) {
            if let Some(e) = s.endpoints.as_mut().and_then(|e| e.first_mut()) {
                e.conditions = Some(Default::default());
                e.addresses = vec!["10.99.0.1".into()];
            }
        }
        let t1 = std::time::Instant::now();
        let t2 = translate(&st, &base, &Kubernetes::default());
        let t_retranslate = t1.elapsed();
        let _snap2 = crate::snapshot::compile(&t2.config, Some(&snap), None, &m, 2, None).unwrap();
        let t_change = t1.elapsed();
        println!(
            "5000 ingresses / 50000 endpoints: first translate {t_translate:?}, translate+compile {t_first:?}; \
             one EndpointSlice change: translate {t_retranslate:?}, translate+compile {t_change:?}"
        );
    }
}
