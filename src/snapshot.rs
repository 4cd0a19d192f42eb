//! `compile(config, previous)` -> an immutable `Snapshot`: the route table with every
//! matcher, regex and header value built, `Arc`ed upstreams and plugin instances. A
//! request pins one snapshot for its whole life. Upstreams whose config did not change
//! are carried over from the previous snapshot as the same `Arc` (health, in-flight
//! counts and their checker survive), and changed ones keep the state of endpoints
//! whose address stayed. Plugins get the config's shared services (the `redis:`
//! connection, see [`plugin_services`]); a changed `redis` section makes a new
//! connection and rebuilds every plugin instance, since any of them may hold the old
//! one.

use crate::config::model::{self, Config, StripPrefix};
use crate::router::{self, Table};
use crate::upstream::{health, Upstream};
use bytes::Bytes;
use portico_plugins::Plugin;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What a route does.
pub enum Action {
    Upstream(Arc<Upstream>),
    /// Weighted arms; `u32` is the cumulative weight bound of each arm.
    Split(Vec<(Arc<Upstream>, u32)>, u32),
    Redirect {
        to: String,
        status: u16,
        keep_query: bool,
    },
    Respond {
        status: u16,
        body: Bytes,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    Static {
        dir: std::path::PathBuf,
        index: String,
    },
    Aggregate(Arc<crate::aggregate::Runtime>),
}

impl Action {
    /// A short name for `/routes` and explanations.
    pub fn describe(&self) -> String {
        match self {
            Action::Upstream(u) => format!("upstream {}", u.name),
            Action::Split(arms, total) => {
                let mut prev = 0;
                let parts: Vec<String> = arms
                    .iter()
                    .map(|(u, bound)| {
                        let w = bound - prev;
                        prev = *bound;
                        format!("{} {}%", u.name, (w as f64 * 100.0 / *total as f64).round())
                    })
                    .collect();
                format!("split {}", parts.join(", "))
            }
            Action::Redirect { to, status, .. } => format!("redirect {status} {to}"),
            Action::Respond { status, .. } => format!("respond {status}"),
            Action::Static { dir, .. } => format!("static {}", dir.display()),
            Action::Aggregate(a) => format!("aggregate {} calls", a.compiled.calls.len()),
        }
    }
}

/// Compiled header edits.
#[derive(Default)]
pub struct HeaderEdit {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderEdit {
    fn compile(e: &model::HeaderEdit) -> HeaderEdit {
        HeaderEdit {
            set: e
                .set
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                        http::HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            remove: e
                .remove
                .iter()
                .filter_map(|k| http::HeaderName::from_bytes(k.as_bytes()).ok())
                .collect(),
        }
    }
}

/// A route's compiled retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    pub on_status: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub non_idempotent: bool,
    pub max_replay_body: u64,
}

impl RetryPolicy {
    fn compile(r: &model::Retries) -> RetryPolicy {
        let has = |k: &str| r.on.iter().any(|o| o == k);
        RetryPolicy {
            attempts: r.attempts,
            on_connect_failure: has("connect_failure"),
            on_reset: has("reset"),
            on_timeout: has("timeout"),
            on_status: r.on.iter().filter_map(|o| o.parse().ok()).collect(),
            backoff_base: r.backoff.base.0,
            backoff_max: r.backoff.max.0,
            non_idempotent: r.non_idempotent,
            max_replay_body: r.max_replay_body.0,
        }
    }

    /// Full-jitter exponential backoff before retry number `n` (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.backoff_max);
        exp.mul_f64(rand::random::<f64>())
    }
}

/// A compiled route.
pub struct Route {
    pub name: Arc<str>,
    pub index: usize,
    pub action: Action,
    pub strip_prefix: Option<String>,
    pub rewrite: Option<(regex::Regex, String)>,
    /// Total time for the upstream to answer, across retries.
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// (delay, largest buffered answer) for hedged requests.
    pub hedge: Option<(Duration, usize)>,
    pub request_headers: HeaderEdit,
    pub response_headers: HeaderEdit,
    /// Global plugins first, then the route's own, in written order.
    pub plugins: Vec<Arc<dyn Plugin>>,
    /// The route's duration histogram, resolved once.
    pub duration: prometheus::Histogram,
}

/// Everything the proxy needs for one config version.
pub struct Snapshot {
    pub version: u64,
    pub config: Arc<Config>,
    pub table: Table<Route>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Every plugin instance with its scope (`""` for global, else the route name) and
    /// config entry, so the next compile can reuse instances whose settings are equal.
    pub plugin_instances: Vec<(String, serde_yaml::Value, Arc<dyn Plugin>)>,
    /// What plugins were built with (carried over while `redis` is unchanged).
    pub services: portico_plugins::services::Services,
}

/// The shared services plugins are built with. With a runtime, the Redis connection
/// starts connecting on it in the background; without one (`portico check`) nothing
/// connects. An unusable URL gives no connection (validation reports it).
pub fn plugin_services(
    redis: Option<&model::RedisConfig>,
    rt: Option<&tokio::runtime::Handle>,
    metrics: Option<&crate::metrics::Metrics>,
) -> portico_plugins::services::Services {
    portico_plugins::services::Services {
        redis: redis.and_then(|r| {
            portico_plugins::services::SharedRedis::new(r.plugin_settings(), rt.cloned()).ok()
        }),
        events: metrics.map(|m| {
            Arc::new(PluginEvents {
                store_errors: m.rate_limit_store_errors.clone(),
            }) as Arc<dyn portico_plugins::services::Events>
        }),
    }
}

/// Plugin events into the gateway's metrics.
struct PluginEvents {
    store_errors: prometheus::IntCounterVec,
}

impl portico_plugins::services::Events for PluginEvents {
    fn store_error(&self, _plugin: &'static str, route: &str, fallback: &'static str) {
        self.store_errors
            .with_label_values(&[route, fallback])
            .inc();
    }
}

/// Compiles a validated config. `rt` (when serving) runs the health checkers.
pub fn compile(
    cfg: &Config,
    prev: Option<&Snapshot>,
    rt: Option<&tokio::runtime::Handle>,
    metrics: &crate::metrics::Metrics,
    version: u64,
    registry: Option<&Arc<crate::registry::Registry>>,
) -> Result<Snapshot, String> {
    compile_shared(&Arc::new(cfg.clone()), prev, rt, metrics, version, registry)
}

/// `compile` of a config already behind an `Arc`, which the snapshot then shares
/// rather than copies (a Kubernetes config of thousands of routes and upstreams).
pub fn compile_shared(
    cfg: &Arc<Config>,
    prev: Option<&Snapshot>,
    rt: Option<&tokio::runtime::Handle>,
    metrics: &crate::metrics::Metrics,
    version: u64,
    registry: Option<&Arc<crate::registry::Registry>>,
) -> Result<Snapshot, String> {
    let config = Arc::clone(cfg);
    let cfg: &Config = cfg;
    let mut upstreams = BTreeMap::new();
    for (name, spec) in &cfg.upstreams {
        let old = prev.and_then(|p| p.upstreams.get(name));
        // An unchanged upstream with fixed endpoints is the same `Arc`, found without
        // copying its endpoint list (thousands of upstreams on a Kubernetes change).
        if let Some(o) = old.filter(|o| spec.discovery.is_none() && o.spec == *spec) {
            upstreams.insert(name.clone(), Arc::clone(o));
            continue;
        }
        let resolved: Vec<model::EndpointSpec> = match &spec.discovery {
            Some(d) => {
                let service = match &d.service {
                    Some(s) => s.clone(),
                    None => crate::registry::dns::service_name(d),
                };
                let sel = match &d.selector {
                    Some(s) => crate::registry::selector::Selector::parse(s)
                        .map_err(|e| format!("upstream {name}: {e}"))?,
                    None => Default::default(),
                };
                registry
                    .map(|r| r.endpoints(&service, &sel))
                    .unwrap_or_default()
                    .into_iter()
                    .map(model::EndpointSpec::Plain)
                    .collect()
            }
            None => spec.endpoints.clone(),
        };
        let up = match old {
            Some(o) if o.spec == *spec && o.resolved == resolved => Arc::clone(o),
            _ => {
                let up = Arc::new(Upstream::compile(
                    name,
                    spec,
                    resolved,
                    old.map(|o| o.as_ref()),
                ));
                if let Some(rt) = rt {
                    health::spawn(rt, &up);
                    crate::upstream::outlier::spawn(rt, &up);
                    if let (Some(d), Some(reg)) = (&spec.discovery, registry) {
                        if d.dns.is_some() {
                            crate::registry::dns::spawn(rt, &up, d.clone(), Arc::clone(reg));
                        }
                    }
                }
                up
            }
        };
        upstreams.insert(name.clone(), up);
    }
    let registry = portico_plugins::Registry::builtin();
    let mut instances: Vec<(String, serde_yaml::Value, Arc<dyn Plugin>)> = vec![];
    let same_services = prev.filter(|p| p.config.redis == cfg.redis);
    let services = match same_services {
        Some(p) => p.services.clone(),
        None => plugin_services(cfg.redis.as_ref(), rt, Some(metrics)),
    };
    // A plugin whose scope and settings (and shared services) are unchanged keeps its
    // instance (and state, such as rate-limit buckets) across reloads.
    let mut instance =
        |scope: &str, entry: &serde_yaml::Value| -> Result<Arc<dyn Plugin>, String> {
            let reused = same_services.and_then(|p| {
                p.plugin_instances
                    .iter()
                    .find(|(s, e, _)| s == scope && e == entry)
                    .map(|(_, _, i)| Arc::clone(i))
            });
            let inst = match reused {
                Some(i) => i,
                None => registry
                    .build_with(
                        entry,
                        &portico_plugins::services::BuildEnv {
                            scope,
                            services: &services,
                        },
                    )
                    .map_err(|e| e.to_string())?,
            };
            instances.push((scope.to_string(), entry.clone(), Arc::clone(&inst)));
            Ok(inst)
        };
    let global: Vec<Arc<dyn Plugin>> = cfg
        .plugins
        .iter()
        .map(|e| instance("", e))
        .collect::<Result<_, _>>()?;
    let mut routes = vec![];
    for (index, r) in cfg.routes.iter().enumerate() {
        let matcher = Arc::new(router::compile_matcher(&r.matcher)?);
        let get = |n: &str| {
            upstreams
                .get(n)
                .cloned()
                .ok_or_else(|| format!("route {}: unknown upstream {n}", r.name))
        };
        let action = if let Some(u) = &r.upstream {
            Action::Upstream(get(u)?)
        } else if let Some(split) = &r.split {
            let mut acc = 0;
            let mut arms = vec![];
            for s in split.iter().filter(|s| s.weight > 0) {
                acc += s.weight;
                arms.push((get(&s.upstream)?, acc));
            }
            Action::Split(arms, acc)
        } else if let Some(rd) = &r.redirect {
            Action::Redirect {
                to: rd.to.clone(),
                status: rd.status,
                keep_query: rd.keep_query,
            }
        } else if let Some(rs) = &r.respond {
            // The answer's headers and the route's response `set` edits, merged once.
            let mut headers = HeaderEdit::compile(&model::HeaderEdit {
                set: rs.headers.clone(),
                remove: vec![],
            })
            .set;
            if let Some(h) = &r.headers {
                headers.extend(HeaderEdit::compile(&h.response).set);
            }
            Action::Respond {
                status: rs.status,
                body: Bytes::from(rs.body.clone()),
                headers,
            }
        } else if let Some(st) = &r.static_files {
            Action::Static {
                dir: std::path::PathBuf::from(&st.dir),
                index: st.index.clone(),
            }
        } else if let Some(agg) = &r.aggregate {
            let params = crate::config::validate::route_params(&r.matcher);
            let retry = r.retries.as_ref().map(RetryPolicy::compile);
            Action::Aggregate(Arc::new(
                crate::aggregate::bind(agg, &params, &upstreams, retry)
                    .map_err(|e| format!("route {}: {e}", r.name))?,
            ))
        } else {
            return Err(format!("route {} has no action this build can run", r.name));
        };
        let strip_prefix = match &r.strip_prefix {
            Some(StripPrefix::Flag(true)) => r
                .matcher
                .path_prefix
                .as_ref()
                .map(|p| p.trim_end_matches('/').to_string()),
            Some(StripPrefix::Prefix(p)) => Some(p.trim_end_matches('/').to_string()),
            _ => None,
        };
        let rewrite = match &r.rewrite {
            Some(rw) => Some((
                regex::Regex::new(&rw.path_regex).map_err(|e| e.to_string())?,
                rw.replacement.clone(),
            )),
            None => None,
        };
        let mut plugins = global.clone();
        for e in &r.plugins {
            plugins.push(instance(&r.name, e)?);
        }
        let headers = r.headers.clone().unwrap_or_default();
        routes.push((
            Arc::new(Route {
                name: Arc::from(r.name.as_str()),
                index,
                action,
                strip_prefix,
                rewrite,
                timeout: r.timeout.map(|d| d.0),
                retry: r.retries.as_ref().map(RetryPolicy::compile),
                hedge: r.hedge.as_ref().map(|h| (h.delay.0, h.max_body.0 as usize)),
                request_headers: HeaderEdit::compile(&headers.request),
                response_headers: HeaderEdit::compile(&headers.response),
                plugins,
                duration: metrics.request_duration.with_label_values(&[&r.name]),
            }),
            matcher,
        ));
    }
    Ok(Snapshot {
        version,
        config,
        table: Table::new(routes),
        upstreams,
        trusted_proxies: cfg
            .trusted_proxies
            .iter()
            .filter_map(|c| crate::config::validate::parse_cidr(c))
            .collect(),
        max_header_bytes: cfg.server.max_header_bytes.0 as usize,
        max_headers: cfg.server.max_headers,
        plugin_instances: instances,
        services,
    })
}
