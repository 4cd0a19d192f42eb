//! `portico run`: builds the Pingora server (one proxy service over every listener,
//! the admin service, a background runtime for health checks and reloads) and runs it.
//! Shutdown is ours, not Pingora's fixed sleep: at SIGTERM `/readyz` turns 503, after
//! `server.drain_delay` the listeners close, and the process exits as soon as the last
//! in-flight request is done (or when `server.grace_period` runs out).

use crate::accesslog::AccessLog;
use crate::admin::Admin;
use crate::config;
use crate::gateway::Gateway;
use crate::proxy::Proxy;
use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Signals {
    gw: Arc<Gateway>,
    drain_delay: Duration,
    grace: Duration,
    /// Pingora's execution phases: an upgrade may exit only once the sockets are handed over.
    phases:
        std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>>>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!("cannot install signal handlers");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {
                log::info!("SIGTERM: draining (readyz 503), listeners close in {:?}", self.drain_delay);
                self.gw.draining.store(true, Ordering::SeqCst);
                tokio::time::sleep(self.drain_delay).await;
                exit_when_idle(Arc::clone(&self.gw), self.grace);
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                if let Some(o) = self.gw.orchestrator.lock().ok().and_then(|g| g.clone()) {
                    let _ = tokio::task::spawn_blocking(move || o.shutdown(Duration::from_secs(5))).await;
                }
                self.gw.access_log.flush();
                ShutdownSignal::FastShutdown
            }
            _ = quit.recv() => {
                // Binary upgrade: the new process (started with `run --upgrade`) takes the
                // listening sockets; this one finishes its requests and exits.
                log::info!("SIGQUIT: handing the listeners to the new process");
                self.gw.draining.store(true, Ordering::SeqCst);
                if let Some(mut phases) = self.phases.lock().ok().and_then(|mut p| p.take()) {
                    let gw = Arc::clone(&self.gw);
                    let grace = self.grace;
                    tokio::spawn(async move {
                        // Wait until Pingora sent the sockets and stopped accepting here.
                        loop {
                            match phases.recv().await {
                                Ok(pingora::server::ExecutionPhase::ShutdownStarted) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                        exit_when_idle(gw, grace);
                    });
                }
                ShutdownSignal::GracefulUpgrade
            }
        }
    }
}

/// Exits the process once no request is in flight, or when the grace period ends.
fn exit_when_idle(gw: Arc<Gateway>, grace: Duration) {
    let _ = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            let deadline = Instant::now() + grace;
            let mut quiet = 0;
            while Instant::now() < deadline {
                if gw.metrics.inflight.get() <= 0 {
                    quiet += 1;
                    if quiet >= 3 {
                        break;
                    }
                } else {
                    quiet = 0;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let left = gw.metrics.inflight.get();
            if left > 0 {
                log::warn!("grace period over with {left} requests still in flight");
            } else {
                log::info!("all requests finished; exiting");
            }
            if let Some(o) = gw.orchestrator.lock().ok().and_then(|g| g.clone()) {
                o.shutdown(Duration::from_secs(15));
            }
            gw.access_log.flush();
            std::process::exit(0);
        });
}

/// Waits until every listener accepts connections, then marks the gateway ready.
fn mark_ready_when_bound(gw: Arc<Gateway>, addrs: Vec<String>) {
    let rt = gw.bg.clone();
    rt.spawn(async move {
        loop {
            let mut all = true;
            for a in &addrs {
                if tokio::net::TcpStream::connect(a.as_str()).await.is_err() {
                    all = false;
                }
            }
            if all {
                gw.ready.store(true, Ordering::SeqCst);
                log::info!("ready: listening on {}", addrs.join(", "));
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Forwards the `tracing` events of dependencies (the Kubernetes client logs through
/// `tracing`) to `log`, and turns their spans off where they are declared. Without a
/// subscriber, `tracing` (whose `log` feature the Kubernetes client turns on) checks
/// every span of the HTTP/2 stack against `log` each time it is created, entered and
/// left — h2 enters one on every poll — which cost about 5,700 instructions per
/// proxied HTTP/2 request (callgrind); with spans disabled at their call sites that
/// work is gone.
struct TracingToLog;

fn log_level(l: &tracing::Level) -> log::Level {
    match *l {
        tracing::Level::ERROR => log::Level::Error,
        tracing::Level::WARN => log::Level::Warn,
        tracing::Level::INFO => log::Level::Info,
        tracing::Level::DEBUG => log::Level::Debug,
        tracing::Level::TRACE => log::Level::Trace,
    }
}

impl tracing::Subscriber for TracingToLog {
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if meta.is_span() {
            tracing::subscriber::Interest::never()
        } else {
            // Events are rare: ask `log` each time (its filter decides).
            tracing::subscriber::Interest::sometimes()
        }
    }

    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        let level = log_level(meta.level());
        meta.is_event()
            && level <= log::max_level()
            && log::logger().enabled(
                &log::Metadata::builder()
                    .level(level)
                    .target(meta.target())
                    .build(),
            )
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(match log::max_level() {
            log::LevelFilter::Off => tracing::level_filters::LevelFilter::OFF,
            log::LevelFilter::Error => tracing::level_filters::LevelFilter::ERROR,
            log::LevelFilter::Warn => tracing::level_filters::LevelFilter::WARN,
            log::LevelFilter::Info => tracing::level_filters::LevelFilter::INFO,
            log::LevelFilter::Debug => tracing::level_filters::LevelFilter::DEBUG,
            log::LevelFilter::Trace => tracing::level_filters::LevelFilter::TRACE,
        })
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        // Not called: every span call site has interest "never".
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        let mut text = String::new();
        event.record(&mut EventText(&mut text));
        log::logger().log(
            &log::Record::builder()
                .level(log_level(meta.level()))
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .args(format_args!("{text}"))
                .build(),
        );
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// An event's message and `name=value` fields, as one line.
struct EventText<'a>(&'a mut String);

impl tracing::field::Visit for EventText<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = if field.name() == "message" {
            write!(self.0, "{value:?}")
        } else {
            write!(self.0, "{}={value:?}", field.name())
        };
    }
}

/// Runs the gateway with `path`; returns the exit code.
pub fn run(path: PathBuf, upgrade: bool) -> i32 {
    run_with(path, upgrade, None)
}

/// Runs the gateway; with `manifests`, in ingress mode on the manifests of that folder
/// (`portico ingress`). Returns the exit code.
pub fn run_with(path: PathBuf, upgrade: bool, manifests: Option<PathBuf>) -> i32 {
    // Fails only when a subscriber is already installed (then that one stays).
    let _ = tracing::subscriber::set_global_default(TracingToLog);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}:1:1: cannot read the config file: {e}", path.display());
            return 1;
        }
    };
    let cfg = match config::load_str(&path.display().to_string(), &text) {
        Ok((c, _)) => c,
        Err(errs) => {
            for e in &errs {
                eprintln!("{e}");
            }
            return 1;
        }
    };
    if cfg.listeners.is_empty() {
        eprintln!("{}:1:1: no listeners configured", path.display());
        return 1;
    }
    let bg_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("portico-bg")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the background runtime: {e}");
            return 2;
        }
    };
    let access_log = match AccessLog::open(&cfg.access_log.path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot open access log {}: {e}", cfg.access_log.path);
            return 2;
        }
    };
    let gw = match Gateway::new(
        cfg.clone(),
        &text,
        path.clone(),
        bg_rt.handle().clone(),
        access_log,
    ) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return 1;
        }
    };
    let token = match &cfg.admin.token_env {
        Some(var) => std::env::var(var).ok().filter(|t| !t.is_empty()),
        None => None,
    };

    let conf = ServerConf {
        threads: cfg.server.threads,
        work_stealing: false,
        grace_period_seconds: Some(cfg.server.grace_period.0.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: cfg.server.upgrade_sock.clone(),
        // Idle upstream connections kept per worker thread (Pingora's default is 128).
        // Each request in flight holds its own HTTP/1 upstream connection, so a pool
        // smaller than the concurrency closes and reopens connections all the time: 10
        // HTTP/2 clients with 100 streams each opened a new upstream connection for
        // every second request with 128 (and spent 60 instead of 32 µs of CPU per
        // request). Idle pooled connections still close after the peer's idle timeout.
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    // One proxy service per listener: each has its own scheme, TLS acceptor and edge
    // settings. Listeners with `http2: true` speak h2 (ALPN on TLS, h2c on plain).
    // Plain HTTP/1 reads go straight into the session's own buffer, so a plain
    // connection needs no read buffer of its own (an idle one then holds none); a TLS
    // one keeps a small one, which saves a read per TLS record.
    let l4 = |tls: bool| L4BufferSettings {
        read: Some(if tls { 4 * 1024 } else { 0 }),
        write: None,
    };
    let mut addrs = vec![];
    let mut watched_certs = vec![];
    for l in &cfg.listeners {
        let edge = match crate::proxy::ListenerRt::new(l, &cfg.listeners) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("{}: listener {}: {e}", path.display(), l.name);
                return 1;
            }
        };
        let deadlines = Arc::new(crate::proxy::edge::SocketDeadlines::default());
        let mut proxy = pingora::proxy::http_proxy(
            &server.configuration,
            Proxy {
                gw: Arc::clone(&gw),
                deadlines: Arc::clone(&deadlines),
                edge: Arc::new(edge),
                keepalive_secs: cfg.server.keepalive_timeout.0.as_secs().max(1),
            },
        );
        let mut opts = pingora::apps::HttpServerOptions::default();
        opts.h2c = l.http2 && l.tls.is_none();
        proxy.server_options = Some(opts);
        // A bounded decoded header list (h2's default is 16 MiB): the configured header
        // limit plus h2's 32 bytes per header, so that the proxy's own check (431 with
        // the gateway's JSON body) decides up to the configured size. h2's flow-control
        // windows (64 KiB) and frame size (16 KiB) stay: they only pace bodies, and a
        // larger receive window lets each stream hold more unread request body.
        let header_list = (cfg.server.max_header_bytes.0 as usize)
            .saturating_add(32 * cfg.server.max_headers)
            .min(u32::MAX as usize) as u32;
        let mut h2 = pingora::protocols::http::v2::server::H2Options::new();
        h2.max_header_list_size(header_list)
            .max_concurrent_streams(cfg.server.h2_max_concurrent_streams)
            // Rapid reset (CVE-2023-44487): bound streams reset before being handled.
            .max_pending_accept_reset_streams(64)
            .max_local_error_reset_streams(Some(256));
        proxy.h2_options = Some(h2);
        let edge_app = crate::proxy::edge::Edge {
            inner: Arc::new(proxy),
            limits: crate::proxy::edge::EdgeLimits {
                header_timeout: cfg.server.header_timeout.0,
                max_header_bytes: cfg.server.max_header_bytes.0 as usize,
                max_request_line: cfg.server.max_request_line.0 as usize,
                max_headers: cfg.server.max_headers,
                max_connections: cfg.server.max_connections,
                keepalive: cfg.server.keepalive_timeout.0,
            },
            open: std::sync::atomic::AtomicUsize::new(0),
            metrics: Arc::clone(&gw.metrics),
            deadlines: Arc::clone(&deadlines),
        };
        let mut listeners = pingora::listeners::Listeners::new();
        listeners.set_pre_tls_callback(Arc::new(crate::proxy::edge::HelloDeadline {
            timeout: cfg.server.header_timeout.0,
            deadlines,
        }));
        let mut proxy = pingora::services::listening::Service::with_listeners(
            format!("portico {}", l.name),
            listeners,
            edge_app,
        );
        let mut lc = ListenerConfig::tcp(&l.bind).l4_buffer(l4(l.tls.is_some()));
        if let Some(t) = &l.tls {
            // Ingress mode: certificates may all come from TLS Secrets.
            let ingress = cfg.kubernetes.is_some() || manifests.is_some();
            match crate::tls::settings_with(&l.name, t, l.http2, ingress) {
                Ok((settings, sni)) => {
                    lc = lc.tls(settings);
                    gw.tls
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Arc::clone(&sni));
                    watched_certs.push((sni, t.clone()));
                }
                Err(e) => {
                    eprintln!("{}: listener {}: {e}", path.display(), l.name);
                    return 1;
                }
            }
        }
        proxy.add_listener(lc);
        addrs.push(l.bind.clone());
        server.add_service(proxy);
    }
    crate::tls::watch(watched_certs);
    let mut admin = pingora::services::listening::Service::new(
        "portico-admin".to_string(),
        Admin {
            gw: Arc::clone(&gw),
            token,
        },
    );
    admin.add_tcp(&cfg.admin.bind);
    server.add_service(admin);

    if let Err(e) = crate::reload::watch(Arc::clone(&gw), cfg.server.watch_debounce.0) {
        log::warn!(
            "cannot watch {} for changes: {e}; use SIGHUP or POST /reload",
            path.display()
        );
    }
    crate::reload::on_sighup(Arc::clone(&gw));
    gw.start_registry_tasks();
    {
        // Always there, so a reload that adds deployments starts them.
        let weak = Arc::downgrade(&gw);
        let load: crate::orchestrator::LoadFn = Arc::new(move |service: &str| {
            weak.upgrade()
                .map(|g| g.load_for_service(service))
                .unwrap_or_default()
        });
        let o = crate::orchestrator::Orchestrator::start(
            &cfg,
            Arc::clone(&gw.registry),
            gw.bg.clone(),
            Arc::clone(&gw.metrics),
            load,
        );
        if let Ok(mut g) = gw.orchestrator.lock() {
            *g = Some(o);
        }
    }
    if cfg.kubernetes.is_some() || manifests.is_some() {
        // Ingress controller mode: routing comes from the cluster (or manifests).
        if let Err(e) = crate::kubernetes::start(&gw, cfg.clone(), manifests.clone()) {
            eprintln!("{}: kubernetes: {e}", path.display());
            return 2;
        }
    }
    mark_ready_when_bound(Arc::clone(&gw), addrs);
    log::info!("portico starting with {}", path.display());
    let signals = Signals {
        gw: Arc::clone(&gw),
        drain_delay: cfg.server.drain_delay.0,
        grace: cfg.server.grace_period.0,
        phases: std::sync::Mutex::new(Some(server.watch_execution_phase())),
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    gw.access_log.flush();
    drop(bg_rt);
    0
}
