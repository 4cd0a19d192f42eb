//! The YAML contract as plain serde types. These are the *external* schema: every
//! struct denies unknown keys so a typo is an error, and nothing here is used on the
//! request path. `snapshot::compile` turns a validated `Config` into the internal
//! model the proxy runs on, so the file format can stay stable while internals move.

use super::units::{Dur, Size};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub access_log: AccessLog,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub plugins: Vec<PluginEntry>,
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    #[serde(default)]
    pub orchestrator: Option<Orchestrator>,
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub kubernetes: Option<Kubernetes>,
}

/// Ingress controller mode (`portico ingress`, or cluster watching).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// Ingresses of this class (and Gateways of the GatewayClass of this name) are
    /// Portico's.
    #[serde(default = "default_ingress_class")]
    pub ingress_class: String,
    /// Namespaces watched; all when empty.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Cluster mode: the kubeconfig file to use (else `KUBECONFIG`, `~/.kube/config`,
    /// or the in-cluster service account).
    #[serde(default)]
    pub kubeconfig: Option<String>,
    /// Cluster mode: the address (IP or hostname) written to the
    /// `status.loadBalancer.ingress` of the Ingresses Portico serves; none: no status.
    #[serde(default)]
    pub status_address: Option<String>,
}

fn default_ingress_class() -> String {
    "portico".into()
}

impl Default for Kubernetes {
    fn default() -> Self {
        Kubernetes {
            ingress_class: default_ingress_class(),
            namespaces: vec![],
            kubeconfig: None,
            status_address: None,
        }
    }
}

/// One listening socket.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub bind: String,
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// HTTP/2: ALPN `h2` on TLS listeners, prior-knowledge h2c on plain ones.
    #[serde(default)]
    pub http2: bool,
    /// Plain listeners: answer every request with a redirect to HTTPS (`true` for
    /// port 443, or `{ port: 8443 }`).
    #[serde(default)]
    pub redirect_https: Option<RedirectHttps>,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificate and key files; SNI picks one by the names in its SANs, the first is
    /// the default.
    #[serde(default)]
    pub certificates: Vec<CertPair>,
    /// A folder of `NAME.crt` + `NAME.key` pairs (also `.pem`/`.key`).
    #[serde(default)]
    pub dir: Option<String>,
    /// "1.2" (default) or "1.3".
    #[serde(default)]
    pub min_version: Option<String>,
    /// CA bundle for client certificates (mTLS).
    #[serde(default)]
    pub client_ca: Option<String>,
    /// `required` (default when `client_ca` is set) or `optional`.
    #[serde(default)]
    pub client_auth: Option<String>,
    /// Header carrying the verified client certificate's subject upstream.
    #[serde(default = "default_subject_header")]
    pub client_subject_header: String,
    /// Adds `Strict-Transport-Security` to responses.
    #[serde(default)]
    pub hsts: Option<Hsts>,
}

fn default_subject_header() -> String {
    "x-client-cert-subject".into()
}

/// A certificate chain file and its key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

/// HSTS settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hsts {
    #[serde(default = "default_hsts_age")]
    pub max_age: Dur,
    #[serde(default)]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

fn default_hsts_age() -> Dur {
    Dur(std::time::Duration::from_secs(31_536_000))
}

/// `redirect_https: true` or `{ port: N }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum RedirectHttps {
    Flag(bool),
    Port { port: u16 },
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_bind")]
    pub bind: String,
    /// Name of the environment variable holding the bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
}

fn default_admin_bind() -> String {
    "127.0.0.1:9901".into()
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            bind: default_admin_bind(),
            token_env: None,
        }
    }
}

/// Process-level settings (read at start; a reload does not change them).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Worker threads per listener service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long in-flight requests get to finish after SIGTERM.
    #[serde(default = "default_grace")]
    pub grace_period: Dur,
    /// How long `/readyz` answers 503 before listeners close, so load balancers notice.
    #[serde(default)]
    pub drain_delay: Dur,
    /// Largest request header block accepted (431 beyond).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: Size,
    /// Most request headers accepted (431 beyond).
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Idle keep-alive timeout for client connections.
    #[serde(default = "default_keepalive")]
    pub keepalive_timeout: Dur,
    /// Debounce for the config file watcher.
    #[serde(default = "default_debounce")]
    pub watch_debounce: Dur,
    /// A new connection must deliver its first request header within this time
    /// (slowloris protection).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Dur,
    /// Longest request line accepted (414 beyond).
    #[serde(default = "default_max_request_line")]
    pub max_request_line: Size,
    /// Most open client connections per listener; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams per client connection.
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
    /// Unix socket over which a binary upgrade hands the listening sockets over.
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
}

fn default_upgrade_sock() -> String {
    "/tmp/portico-upgrade.sock".into()
}

fn default_header_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_max_request_line() -> Size {
    Size(8 * 1024)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_h2_streams() -> u32 {
    100
}

fn default_threads() -> usize {
    1
}
fn default_grace() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_max_header_bytes() -> Size {
    Size(64 * 1024)
}
fn default_max_headers() -> usize {
    100
}
fn default_keepalive() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}
fn default_debounce() -> Dur {
    Dur(std::time::Duration::from_millis(100))
}

impl Default for Server {
    fn default() -> Self {
        Server {
            threads: default_threads(),
            grace_period: default_grace(),
            drain_delay: Dur::default(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            keepalive_timeout: default_keepalive(),
            watch_debounce: default_debounce(),
            header_timeout: default_header_timeout(),
            max_request_line: default_max_request_line(),
            max_connections: default_max_connections(),
            h2_max_concurrent_streams: default_h2_streams(),
            upgrade_sock: default_upgrade_sock(),
        }
    }
}

/// Where access log lines go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `stdout`, `stderr`, `off`, or a file path.
    #[serde(default = "default_log_path")]
    pub path: String,
}

fn default_log_path() -> String {
    "stdout".into()
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            path: default_log_path(),
        }
    }
}

/// An upstream: a named set of endpoints with a balancing policy.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub discovery: Option<Discovery>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub hash_on: Option<String>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub passive_health: Option<PassiveHealth>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub retry_budget: RetryBudget,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Host header sent to this upstream instead of the client's.
    #[serde(default)]
    pub host: Option<String>,
    /// `http1` (default), `h2` (over TLS, ALPN) or `h2c` (plain, prior knowledge).
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

/// TLS to an upstream.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name sent and verified (default: the Host the upstream sets, or none).
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the upstream's certificate (default true).
    #[serde(default = "yes")]
    pub verify: bool,
    /// CA bundle to verify against (default: the system's).
    #[serde(default)]
    pub ca: Option<String>,
    /// Client certificate and key for mTLS to the upstream.
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
}

/// An endpoint: `"host:port"` or `{ address, weight }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum EndpointSpec {
    Plain(String),
    Weighted(WeightedEndpoint),
}

/// The long form of an endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct WeightedEndpoint {
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl EndpointSpec {
    /// The `host:port` string.
    pub fn address(&self) -> &str {
        match self {
            EndpointSpec::Plain(a) => a,
            EndpointSpec::Weighted(w) => &w.address,
        }
    }
    /// The weight (1 for the short form).
    pub fn weight(&self) -> u32 {
        match self {
            EndpointSpec::Plain(_) => 1,
            EndpointSpec::Weighted(w) => w.weight,
        }
    }
}

/// Balancing policies.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Weighted,
    LeastRequest,
    ConsistentHash,
    Random,
}

impl Balance {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Weighted => "weighted",
            Balance::LeastRequest => "least_request",
            Balance::ConsistentHash => "consistent_hash",
            Balance::Random => "random",
        }
    }
}

/// Active HTTP health checks.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "default_hc_path")]
    pub path: String,
    #[serde(default = "default_hc_interval")]
    pub interval: Dur,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_two")]
    pub healthy_threshold: u32,
    #[serde(default = "default_three")]
    pub unhealthy_threshold: u32,
    /// Host header for the probe (defaults to the endpoint address).
    #[serde(default)]
    pub host: Option<String>,
}

fn default_hc_path() -> String {
    "/healthz".into()
}
fn default_hc_interval() -> Dur {
    Dur(std::time::Duration::from_secs(2))
}
fn default_hc_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn default_two() -> u32 {
    2
}
fn default_three() -> u32 {
    3
}

/// Passive ejection after consecutive connect failures.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    #[serde(default = "default_three")]
    pub consecutive_failures: u32,
    #[serde(default = "default_eject")]
    pub eject_for: Dur,
}

fn default_eject() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            consecutive_failures: 3,
            eject_for: default_eject(),
        }
    }
}

/// Per-upstream timeouts (routes may override `read`/`total` through `timeout`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default)]
    pub connect: Option<Dur>,
    #[serde(default)]
    pub read: Option<Dur>,
    #[serde(default)]
    pub write: Option<Dur>,
    #[serde(default)]
    pub total: Option<Dur>,
}

/// One route.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: Match,
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub split: Option<Vec<SplitEntry>>,
    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[serde(default)]
    pub respond: Option<Respond>,
    #[serde(default, rename = "static")]
    pub static_files: Option<StaticFiles>,
    #[serde(default)]
    pub aggregate: Option<Aggregate>,
    #[serde(default)]
    pub strip_prefix: Option<StripPrefix>,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Hedged requests for idempotent, bodiless requests.
    #[serde(default)]
    pub hedge: Option<Hedge>,
    #[serde(default)]
    pub headers: Option<HeaderRules>,
    #[serde(default)]
    pub plugins: Vec<PluginEntry>,
}

/// The conditions of a route; all given ones must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_regex: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// `*.suffix` hosts cover exactly one label (`a.suffix`, not `a.b.suffix`), as a
    /// Kubernetes Ingress host does. Set by the Kubernetes translation of Ingresses
    /// only; not a file key (file wildcards, like Gateway API hostnames, cover one or
    /// more labels).
    #[serde(skip)]
    pub one_label_wildcards: bool,
}

/// One arm of a weighted split.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitEntry {
    pub upstream: String,
    pub weight: u32,
}

/// A redirect answered by the gateway.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    pub to: String,
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// Append the original query string to `to` (default true).
    #[serde(default = "yes")]
    pub keep_query: bool,
}

fn default_redirect_status() -> u16 {
    302
}
fn yes() -> bool {
    true
}

/// A fixed response answered by the gateway.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Respond {
    #[serde(default = "default_respond_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_respond_status() -> u16 {
    200
}

/// Files served from a folder.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticFiles {
    pub dir: String,
    #[serde(default = "default_index")]
    pub index: String,
}

fn default_index() -> String {
    "index.html".into()
}

/// `strip_prefix: true` strips the route's `path_prefix`; a string strips that prefix.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StripPrefix {
    Flag(bool),
    Prefix(String),
}

/// Regex rewrite of the path sent upstream.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    pub path_regex: String,
    pub replacement: String,
}

/// Request and response header edits.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    #[serde(default)]
    pub request: HeaderEdit,
    #[serde(default)]
    pub response: HeaderEdit,
}

/// `set` replaces or adds; `remove` deletes.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdit {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A plugin entry: a one-key map `NAME: settings`, checked by the plugin registry.
pub type PluginEntry = serde_yaml::Value;

/// Per-endpoint circuit breaker and upstream-wide concurrency limits.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Open after this many failures in a row (5xx answers, connect failures, resets).
    #[serde(default = "default_cb_failures")]
    pub consecutive_failures: u32,
    /// Or open when this share of requests in `window` failed (0 disables), once the
    /// window holds at least `min_requests`.
    #[serde(default)]
    pub failure_ratio: Option<RatioValue>,
    #[serde(default = "default_window")]
    pub window: Dur,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// Open this long, then half-open: one trial request decides.
    #[serde(default = "default_open_for")]
    pub open_for: Dur,
    /// Most requests in flight to the whole upstream (0 = no limit); beyond, 503 at once.
    #[serde(default)]
    pub max_connections: u32,
    /// Accepted for compatibility: the gateway never queues, so pending requests are
    /// answered 503 as soon as `max_connections` is reached.
    #[serde(default)]
    pub max_pending: u32,
}

/// A ratio written as a number between 0 and 1.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(transparent)]
pub struct RatioValue(pub f64);
impl Eq for RatioValue {}
impl std::hash::Hash for RatioValue {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.to_bits().hash(h)
    }
}

fn default_cb_failures() -> u32 {
    5
}
fn default_window() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_min_requests() -> u32 {
    20
}
fn default_open_for() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

/// Ejects endpoints whose 5xx rate is far above their peers'.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// How often rates are compared.
    #[serde(default = "default_outlier_interval")]
    pub interval: Dur,
    /// An endpoint is an outlier when its 5xx rate is this many times its peers' mean…
    #[serde(default = "default_outlier_factor")]
    pub factor: RatioValue,
    /// …and at least this rate (so 1% vs 0.1% is not an outlier).
    #[serde(default = "default_outlier_min_rate")]
    pub min_rate: RatioValue,
    /// Requests an endpoint needs in an interval to be judged.
    #[serde(default = "default_outlier_min_requests")]
    pub min_requests: u32,
    /// First ejection time; each further ejection adds this much.
    #[serde(default = "default_outlier_ejection")]
    pub base_ejection: Dur,
    /// Never eject more than this percentage of the upstream's endpoints.
    #[serde(default = "default_outlier_max_percent")]
    pub max_ejection_percent: u32,
}

fn default_outlier_interval() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_outlier_factor() -> RatioValue {
    RatioValue(3.0)
}
fn default_outlier_min_rate() -> RatioValue {
    RatioValue(0.2)
}
fn default_outlier_min_requests() -> u32 {
    10
}
fn default_outlier_ejection() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_outlier_max_percent() -> u32 {
    50
}

/// Limits retries to a share of requests so failures cannot turn into a retry storm.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per request sent (0.2 = 20%).
    #[serde(default = "default_budget_ratio")]
    pub ratio: RatioValue,
    /// Retries always allowed per second, whatever the traffic.
    #[serde(default = "default_budget_floor")]
    pub min_per_second: u32,
}

fn default_budget_ratio() -> RatioValue {
    RatioValue(0.2)
}
fn default_budget_floor() -> u32 {
    3
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: default_budget_ratio(),
            min_per_second: default_budget_floor(),
        }
    }
}

/// A route's retry policy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try.
    pub attempts: u32,
    /// When to retry: `connect_failure`, `reset`, `timeout`, and status codes ("503").
    #[serde(default = "default_retry_on")]
    pub on: Vec<String>,
    /// Exponential backoff between tries, with full jitter.
    #[serde(default)]
    pub backoff: Backoff,
    /// Retry methods that are not idempotent (POST, PATCH) too. Off by default: those
    /// are retried only when they carry an `Idempotency-Key` header.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Request bodies up to this size are kept so a retry can replay them (at most
    /// 64KiB, Pingora's retry buffer); a request with a bigger body is not retried.
    #[serde(default = "default_replay_body")]
    pub max_replay_body: Size,
}

fn default_replay_body() -> Size {
    Size(64 * 1024)
}

fn default_retry_on() -> Vec<String> {
    vec!["connect_failure".into(), "reset".into(), "timeout".into()]
}

/// Backoff bounds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "default_backoff_base")]
    pub base: Dur,
    #[serde(default = "default_backoff_max")]
    pub max: Dur,
}

fn default_backoff_base() -> Dur {
    Dur(std::time::Duration::from_millis(10))
}
fn default_backoff_max() -> Dur {
    Dur(std::time::Duration::from_millis(250))
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

/// The service registry.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `embedded` (default) or `etcd`.
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    /// Static instances: service -> list of `{ id, address, labels }`.
    #[serde(default)]
    pub services: BTreeMap<String, Vec<StaticInstance>>,
}

/// `registry.etcd`: where the shared registry lives (used with `backend: etcd`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `host:port` or `http://host:port` client URLs of the etcd cluster.
    pub endpoints: Vec<String>,
    /// Key prefix of this gateway fleet (`/portico`): instances live under
    /// `<prefix>/services/<service>/<id>`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// TTL of the lease this gateway keeps alive for the replicas it orchestrates.
    #[serde(default = "default_etcd_lease_ttl")]
    pub lease_ttl: Dur,
    /// Deadline of one etcd request (a write through the admin API, a list).
    #[serde(default = "default_etcd_timeout")]
    pub timeout: Dur,
}

fn default_etcd_prefix() -> String {
    "/portico".into()
}
fn default_etcd_lease_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_etcd_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(2))
}

/// An instance written in the config file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticInstance {
    #[serde(default)]
    pub id: Option<String>,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Where an upstream's endpoints come from instead of `endpoints`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// Registry service name.
    #[serde(default)]
    pub service: Option<String>,
    /// Label selector: a map of equalities, or a string such as
    /// `"version in (v1,v2), tier != canary, !legacy, zone"`.
    #[serde(default)]
    pub selector: Option<SelectorSpec>,
    /// DNS name and port (`name:port`), resolved for A/AAAA, or an SRV name
    /// (`_http._tcp.example.internal`), whose records carry the ports.
    #[serde(default)]
    pub dns: Option<String>,
    /// How often DNS is resolved again.
    #[serde(default)]
    pub refresh: Option<Dur>,
    /// DNS server to ask (`IP:PORT`); the system's resolvers by default.
    #[serde(default)]
    pub resolver: Option<String>,
}

/// A selector in either written form.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum SelectorSpec {
    Map(BTreeMap<String, String>),
    Expr(String),
}

/// The embedded orchestrator.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Orchestrator {
    #[serde(default)]
    pub deployments: Vec<Deployment>,
}

/// Replicas of one local service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub name: String,
    /// Registry service the replicas register under.
    pub service: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "one_u32")]
    pub replicas: u32,
    /// Program and arguments; `{port}` is replaced by the replica's port.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub readiness: Probe,
    #[serde(default)]
    pub liveness: Option<Probe>,
    #[serde(default)]
    pub restart_backoff: RestartBackoff,
    /// Extra replicas allowed during a rolling update.
    #[serde(default = "one_u32")]
    pub max_surge: u32,
    /// Replicas that may be missing during a rolling update.
    #[serde(default)]
    pub max_unavailable: u32,
    /// SIGTERM, then SIGKILL after this long.
    #[serde(default = "default_stop_grace")]
    pub grace_period: Dur,
    #[serde(default)]
    pub autoscale: Option<Autoscale>,
}

fn one_u32() -> u32 {
    1
}
fn default_stop_grace() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

/// An HTTP probe.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    #[serde(default = "default_hc_path")]
    pub path: String,
    #[serde(default = "default_probe_interval")]
    pub interval: Dur,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Dur,
    /// Failures in a row before acting (liveness: restart).
    #[serde(default = "default_three")]
    pub failure_threshold: u32,
}

fn default_probe_interval() -> Dur {
    Dur(std::time::Duration::from_millis(500))
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            path: default_hc_path(),
            interval: default_probe_interval(),
            timeout: default_hc_timeout(),
            failure_threshold: default_three(),
        }
    }
}

/// Exponential restart backoff bounds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RestartBackoff {
    #[serde(default = "default_backoff_min")]
    pub min: Dur,
    #[serde(default = "default_backoff_max_restart")]
    pub max: Dur,
}

fn default_backoff_min() -> Dur {
    Dur(std::time::Duration::from_millis(500))
}
fn default_backoff_max_restart() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff {
            min: default_backoff_min(),
            max: default_backoff_max_restart(),
        }
    }
}

/// Scaling driven by the gateway's own in-flight measurements.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    /// Wanted in-flight requests per replica.
    pub target_inflight: u32,
    #[serde(default = "default_cooldown")]
    pub cooldown: Dur,
    /// With `min: 0`: idle this long before scaling to zero.
    #[serde(default = "default_idle")]
    pub idle_after: Dur,
}

fn default_cooldown() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_idle() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}

/// One client request fanned out to several upstream calls, answered as one JSON object.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    /// Bound on the whole aggregation.
    #[serde(default = "default_agg_timeout")]
    pub timeout: Dur,
    /// Named calls; each answer appears under its name.
    pub calls: BTreeMap<String, AggregateCall>,
    /// Client headers passed to every call (default: `authorization`).
    #[serde(default)]
    pub forward_headers: Option<Vec<String>>,
    /// Largest answer accepted from one call.
    #[serde(default = "default_agg_max_response")]
    pub max_response_size: Size,
    /// Calls of one aggregation running at the same time.
    #[serde(default = "default_agg_concurrency")]
    pub max_concurrency: u32,
}

fn default_agg_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_agg_max_response() -> Size {
    Size(1 << 20)
}
fn default_agg_concurrency() -> u32 {
    16
}

/// One call of an aggregation. `path`, `query`, `headers` and `body` may hold
/// templates: `{param}`, `{query.NAME}`, `{header.NAME}`, `{claim.NAME}`, and
/// `{call.field.sub}` for fields of a call listed in `depends_on`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AggregateCall {
    pub upstream: String,
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body (strings in it are templates).
    #[serde(default)]
    pub body: Option<serde_yaml::Value>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// A JSON pointer (`/address/city`) or a list of top-level fields to keep.
    #[serde(default)]
    pub select: Option<Select>,
    /// A failing optional call gives `null` and an `_errors` entry instead of failing
    /// the whole answer.
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Client headers for this call (replaces the aggregation's list).
    #[serde(default)]
    pub forward_headers: Option<Vec<String>>,
}

/// How a call's answer is shaped.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Select {
    Pointer(String),
    Fields(Vec<String>),
}

/// Hedging: a second try to another endpoint when the first is slow.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hedge {
    /// Wait this long for the first answer before sending the second try.
    pub delay: Dur,
    /// Largest answer a hedged request buffers (bigger answers fail with 502).
    #[serde(default = "default_hedge_max")]
    pub max_body: Size,
}

fn default_hedge_max() -> Size {
    Size(4 << 20)
}

/// The top-level `redis:` section: the Redis that replicas share (used by `rate_limit`
/// with `store: redis`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `redis+unix:///path` (no TLS in this
    /// build: `rediss://` is refused).
    pub url: String,
    /// Deadline of one Redis call made for a request; past it the caller's fallback
    /// applies (`on_store_error`).
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    /// Deadline of one connection attempt (reconnects back off from 100ms to 5s).
    #[serde(default = "default_redis_connect_timeout")]
    pub connect_timeout: Dur,
    /// Prepended to every key Portico writes, so fleets can share one Redis.
    #[serde(default = "default_redis_key_prefix")]
    pub key_prefix: String,
}

fn default_redis_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(25))
}
fn default_redis_connect_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(500))
}
fn default_redis_key_prefix() -> String {
    "portico:".into()
}

impl RedisConfig {
    /// The settings plugins get (see `portico_plugins::services`).
    pub fn plugin_settings(&self) -> portico_plugins::services::RedisSettings {
        portico_plugins::services::RedisSettings {
            url: self.url.clone(),
            timeout: self.timeout.0,
            connect_timeout: self.connect_timeout.0,
            key_prefix: self.key_prefix.clone(),
        }
    }
}
