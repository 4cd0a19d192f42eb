//! Upstreams at run time: endpoints with their health and in-flight counts, and the
//! balancer that picks one per request. An `Upstream` is immutable once compiled;
//! per-endpoint state lives in `Endpoint` atomics, so a reload that keeps an upstream
//! (or an endpoint address) keeps its health, ejection and in-flight state as well.

pub mod balance;
pub mod health;
pub mod outlier;
pub mod resilience;

use crate::config::model::{self, Balance};
use balance::{Balancer, HashOn};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the process started: a cheap monotonic clock for atomics.
pub fn now_ms() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The `Instant` of a `now_ms` value.
pub fn instant_of_ms(ms: u64) -> Instant {
    *START.get_or_init(Instant::now) + Duration::from_millis(ms)
}

/// One backend address and its live state.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The address as written in the config (used in metrics and logs).
    pub label: String,
    pub weight: u32,
    /// Active health check verdict (true until a check says otherwise).
    pub healthy: AtomicBool,
    /// Passive ejection: not used before this time (`now_ms`).
    pub ejected_until: AtomicU64,
    pub connect_failures: AtomicU32,
    pub inflight: AtomicI64,
    /// Consecutive active-check results in the current direction.
    pub hc_streak: AtomicU32,
    pub breaker: resilience::Breaker,
    pub outlier: resilience::OutlierStats,
}

impl Endpoint {
    fn new(addr: SocketAddr, label: &str, weight: u32) -> Endpoint {
        Endpoint {
            addr,
            label: label.to_string(),
            weight,
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            inflight: AtomicI64::new(0),
            hc_streak: AtomicU32::new(0),
            breaker: resilience::Breaker::default(),
            outlier: resilience::OutlierStats::default(),
        }
    }

    /// True when the endpoint may take new requests.
    pub fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now_ms()
    }

    /// True when a request may be sent now: available, and the circuit breaker admits
    /// it (claiming the half-open trial when there is one).
    pub fn admits(&self, cb: Option<&model::CircuitBreaker>) -> bool {
        self.available() && self.breaker.admits(cb)
    }
}

/// Compiled upstream TLS settings.
#[derive(Clone)]
pub struct UpstreamTlsRt {
    pub sni: String,
    pub verify: bool,
    pub ca: Option<Arc<Box<[pingora::tls::x509::X509]>>>,
    pub client: Option<Arc<pingora::utils::tls::CertKey>>,
}

impl UpstreamTlsRt {
    /// Reads the CA bundle and client certificate named in the config.
    pub fn load(t: &model::UpstreamTls) -> Result<UpstreamTlsRt, String> {
        use pingora::tls::pkey::PKey;
        use pingora::tls::x509::X509;
        let ca = match &t.ca {
            Some(f) => {
                let pem = std::fs::read(f).map_err(|e| format!("ca {f}: {e}"))?;
                let certs = X509::stack_from_pem(&pem).map_err(|e| format!("ca {f}: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("ca {f}: no certificate"));
                }
                Some(Arc::new(certs.into_boxed_slice()))
            }
            None => None,
        };
        let client = match (&t.client_cert, &t.client_key) {
            (Some(c), Some(k)) => {
                let pem = std::fs::read(c).map_err(|e| format!("client_cert {c}: {e}"))?;
                let certs =
                    X509::stack_from_pem(&pem).map_err(|e| format!("client_cert {c}: {e}"))?;
                let kp = std::fs::read(k).map_err(|e| format!("client_key {k}: {e}"))?;
                let key =
                    PKey::private_key_from_pem(&kp).map_err(|e| format!("client_key {k}: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("client_cert {c}: no certificate"));
                }
                Some(Arc::new(pingora::utils::tls::CertKey::new(certs, key)))
            }
            (None, None) => None,
            _ => return Err("give both `client_cert` and `client_key`".into()),
        };
        Ok(UpstreamTlsRt {
            sni: t.sni.clone().unwrap_or_default(),
            verify: t.verify,
            ca,
            client,
        })
    }
}

/// Timeouts applied to connections to an upstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub read: Option<Duration>,
    pub write: Option<Duration>,
    /// Total time to the response, across retries (a route's `timeout` overrides it).
    pub total: Option<Duration>,
}

/// A compiled upstream.
pub struct Upstream {
    pub name: Arc<str>,
    /// The config it was compiled from: reused as-is when a reload leaves it equal.
    pub spec: model::Upstream,
    /// The endpoint list it was built from (config or discovery).
    pub resolved: Vec<model::EndpointSpec>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub balancer: Balancer,
    pub host: Option<http::HeaderValue>,
    pub timeouts: Timeouts,
    pub passive: model::PassiveHealth,
    pub health_check: Option<model::HealthCheck>,
    pub breaker: Option<model::CircuitBreaker>,
    pub outlier: Option<model::OutlierDetection>,
    pub tls: Option<UpstreamTlsRt>,
    /// HTTP versions to speak (max, min): (1, 1), or (2, 2) for h2/h2c.
    pub http_version: (u8, u8),
    /// Pingora's connection-pool group: connections are never shared between upstreams
    /// (two upstreams on one address may have different TLS settings).
    pub pool_group: u64,
    pub budget: resilience::Budget,
    /// Requests in flight to any endpoint of this upstream.
    pub inflight: AtomicI64,
    /// Requests waiting for a replica to start (scale from zero).
    pub waiting: AtomicI64,
    /// `now_ms` of the last request sent or waiting (0: never).
    pub last_used: AtomicU64,
}

impl Upstream {
    /// Builds an upstream, reusing endpoint state from `prev` for addresses it had.
    /// `resolved` is the endpoint list: `spec.endpoints`, or what discovery found.
    pub fn compile(
        name: &str,
        spec: &model::Upstream,
        resolved: Vec<model::EndpointSpec>,
        prev: Option<&Upstream>,
    ) -> Upstream {
        let old: HashMap<&str, &Arc<Endpoint>> = prev
            .map(|p| p.endpoints.iter().map(|e| (e.label.as_str(), e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Endpoint>> = resolved
            .iter()
            .filter_map(|e| {
                let label = e.address();
                match old.get(label) {
                    Some(ep) if ep.weight == e.weight() => Some(Arc::clone(ep)),
                    _ => crate::config::validate::resolve(label)
                        .map(|a| Arc::new(Endpoint::new(a, label, e.weight()))),
                }
            })
            .collect();
        let hash_on = spec
            .hash_on
            .as_deref()
            .map(HashOn::parse)
            .unwrap_or(HashOn::ClientIp);
        let balancer = Balancer::new(spec.balance, &endpoints, hash_on);
        let t = &spec.timeouts;
        Upstream {
            name: Arc::from(name),
            spec: spec.clone(),
            resolved,
            balancer,
            host: spec
                .host
                .as_deref()
                .and_then(|h| http::HeaderValue::from_str(h).ok()),
            timeouts: Timeouts {
                connect: t.connect.map(|d| d.0).or(Some(Duration::from_secs(5))),
                read: t.read.map(|d| d.0).or(Some(Duration::from_secs(60))),
                write: t.write.map(|d| d.0).or(Some(Duration::from_secs(60))),
                total: t.total.map(|d| d.0),
            },
            passive: spec.passive_health.clone().unwrap_or_default(),
            health_check: spec.health_check.clone(),
            breaker: spec.circuit_breaker.clone(),
            outlier: spec.outlier_detection.clone(),
            tls: spec.tls.as_ref().and_then(|t| {
                let mut rt = UpstreamTlsRt::load(t).ok()?;
                if rt.sni.is_empty() {
                    // Without an explicit `sni`, the Host the upstream sets names the server.
                    rt.sni = spec.host.clone().unwrap_or_default();
                }
                Some(rt)
            }),
            pool_group: balance::hash64(name.as_bytes()),
            http_version: match spec.protocol.as_deref() {
                Some("h2") | Some("h2c") => (2, 2),
                _ => (1, 1),
            },
            budget: resilience::Budget::new(&spec.retry_budget),
            inflight: AtomicI64::new(0),
            waiting: AtomicI64::new(0),
            last_used: AtomicU64::new(
                prev.map(|p| p.last_used.load(Ordering::Relaxed))
                    .unwrap_or(0),
            ),
            endpoints,
        }
    }

    /// The balancing policy's config name.
    pub fn balance_name(&self) -> &'static str {
        match self.spec.balance {
            Balance::RoundRobin => "round_robin",
            b => b.as_str(),
        }
    }

    /// Records a failed connection attempt; ejects the endpoint after enough of them.
    pub fn connect_failed(&self, ep: &Endpoint) {
        let n = ep.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.passive.consecutive_failures.max(1) {
            let until = now_ms() + self.passive.eject_for.0.as_millis() as u64;
            ep.ejected_until.store(until, Ordering::Relaxed);
            ep.connect_failures.store(0, Ordering::Relaxed);
            log::warn!(
                "upstream {}: endpoint {} ejected for {:?} after {n} connect failures",
                self.name,
                ep.label,
                self.passive.eject_for.0
            );
        }
    }

    /// Records a successful connection.
    pub fn connect_ok(&self, ep: &Endpoint) {
        if ep.connect_failures.load(Ordering::Relaxed) != 0 {
            ep.connect_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records the result of one try at `ep` for the breaker and outlier detection.
    pub fn record_result(&self, ep: &Endpoint, ok: bool) {
        ep.outlier.total.fetch_add(1, Ordering::Relaxed);
        if !ok {
            ep.outlier.errors.fetch_add(1, Ordering::Relaxed);
        }
        if ep.breaker.record(self.breaker.as_ref(), ok) {
            log::warn!(
                "upstream {}: circuit breaker for {} opened",
                self.name,
                ep.label
            );
        }
    }

    /// Endpoints whose breaker is open (or half-open).
    pub fn open_breakers(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.breaker.is_open())
            .count()
    }

    /// Whether the upstream-wide concurrency limit is reached.
    pub fn saturated(&self) -> bool {
        self.breaker.as_ref().is_some_and(|b| {
            b.max_connections > 0
                && self.inflight.load(Ordering::Relaxed) >= b.max_connections as i64
        })
    }
}
