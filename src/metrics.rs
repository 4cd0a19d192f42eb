//! The Prometheus registry and the metrics of the operations contract. One `Metrics`
//! value is created at start and shared by `Arc`; nothing here is a global static, so
//! tests and `portico check` can build their own.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// All gateway metrics.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub endpoint_healthy: IntGaugeVec,
    pub inflight: IntGauge,
    pub reloads: IntCounterVec,
    pub config_version: IntGauge,
    pub plugin_rejections: IntCounterVec,
    pub breaker_open: IntGaugeVec,
    pub registry_instances: IntGaugeVec,
    pub orchestrator_restarts: IntCounterVec,
    pub aggregate_calls: IntCounterVec,
    pub aggregate_duration: HistogramVec,
    pub rate_limit_store_errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric. Start-up only: the definitions are static,
    /// so a failure here is a programming error caught by the first test run.
    #[allow(clippy::expect_used)]
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "portico_requests_total",
                "Requests answered, by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("static metric definition");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "portico_request_duration_seconds",
                "Time from request start to the end of the response, by route",
            ),
            &["route"],
        )
        .expect("static metric definition");
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "portico_upstream_requests_total",
                "Tries sent to upstream endpoints, by outcome",
            ),
            &["upstream", "endpoint", "outcome"],
        )
        .expect("static metric definition");
        let endpoint_healthy = IntGaugeVec::new(
            Opts::new(
                "portico_upstream_endpoint_healthy",
                "1 when the endpoint takes requests, 0 when unhealthy or ejected",
            ),
            &["upstream", "endpoint"],
        )
        .expect("static metric definition");
        let inflight = IntGauge::new("portico_inflight_requests", "Requests being served")
            .expect("static metric definition");
        let reloads = IntCounterVec::new(
            Opts::new("portico_config_reloads_total", "Config loads, by result"),
            &["result"],
        )
        .expect("static metric definition");
        let config_version = IntGauge::new(
            "portico_config_version",
            "Version of the running config (1 at start, +1 per applied reload)",
        )
        .expect("static metric definition");
        let plugin_rejections = IntCounterVec::new(
            Opts::new(
                "portico_plugin_rejections_total",
                "Requests answered by a plugin instead of the upstream",
            ),
            &["route", "plugin", "status"],
        )
        .expect("static metric definition");
        let breaker_open = IntGaugeVec::new(
            Opts::new(
                "portico_circuit_breaker_open",
                "Endpoints of the upstream whose circuit breaker is open or half-open",
            ),
            &["upstream"],
        )
        .expect("static metric definition");
        let registry_instances = IntGaugeVec::new(
            Opts::new(
                "portico_registry_instances",
                "Registry instances, by service and state",
            ),
            &["service", "state"],
        )
        .expect("static metric definition");
        let orchestrator_restarts = IntCounterVec::new(
            Opts::new(
                "portico_orchestrator_restarts_total",
                "Replica restarts after an exit or failed liveness probe",
            ),
            &["deployment"],
        )
        .expect("static metric definition");
        let aggregate_calls = IntCounterVec::new(
            Opts::new(
                "portico_aggregate_calls_total",
                "Calls made by aggregations, by outcome",
            ),
            &["route", "call", "outcome"],
        )
        .expect("static metric definition");
        let aggregate_duration = HistogramVec::new(
            HistogramOpts::new(
                "portico_aggregate_call_duration_seconds",
                "Duration of each aggregation call",
            ),
            &["route", "call"],
        )
        .expect("static metric definition");
        let rate_limit_store_errors = IntCounterVec::new(
            Opts::new(
                "portico_rate_limit_store_errors_total",
                "Requests whose shared rate-limit store (Redis) could not answer, by route and \
                 the on_store_error fallback applied",
            ),
            &["route", "fallback"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_requests.clone()),
            Box::new(endpoint_healthy.clone()),
            Box::new(inflight.clone()),
            Box::new(reloads.clone()),
            Box::new(config_version.clone()),
            Box::new(plugin_rejections.clone()),
            Box::new(breaker_open.clone()),
            Box::new(registry_instances.clone()),
            Box::new(orchestrator_restarts.clone()),
            Box::new(aggregate_calls.clone()),
            Box::new(aggregate_duration.clone()),
            Box::new(rate_limit_store_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        reloads.with_label_values(&["ok"]);
        reloads.with_label_values(&["error"]);
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_requests,
            endpoint_healthy,
            inflight,
            reloads,
            config_version,
            plugin_rejections,
            breaker_open,
            registry_instances,
            orchestrator_restarts,
            aggregate_calls,
            aggregate_duration,
            rate_limit_store_errors,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = vec![];
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A bounded method label (unknown methods are `OTHER`).
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}
