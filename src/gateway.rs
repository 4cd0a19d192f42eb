//! The gateway's shared state: the current snapshot behind an `ArcSwap`, the metrics,
//! the config file it came from, and the load/reload path every change goes through
//! (start-up, file watcher, SIGHUP, `POST /reload`): load, validate, compile against
//! the previous snapshot, swap. A failed load leaves the running snapshot in place.

use crate::accesslog::AccessLog;
use crate::config::{self, Config, ConfigError};
use crate::metrics::Metrics;
use crate::registry::{Registry, Source};
use crate::snapshot::{self, Snapshot};
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The outcome of the last failed reload, for `GET /config`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReloadError {
    pub at: String,
    pub errors: Vec<String>,
}

/// Shared by the proxy, the admin API and the background tasks.
pub struct Gateway {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub config_path: PathBuf,
    pub loaded_at: Mutex<String>,
    pub last_error: Mutex<Option<ReloadError>>,
    /// Set at SIGTERM: `/readyz` answers 503 and new connections are not kept alive.
    pub draining: AtomicBool,
    pub ready: AtomicBool,
    /// False while a source routing depends on has not delivered its first full state
    /// (the Kubernetes API in cluster mode): `/readyz` answers 503 until then.
    pub sources_synced: AtomicBool,
    /// Hash of the file text last applied (the watcher skips identical rewrites).
    last_text_hash: AtomicU64,
    reload_lock: Mutex<()>,
    /// Runs health checks and other background work.
    pub bg: tokio::runtime::Handle,
    pub access_log: AccessLog,
    pub registry: Arc<Registry>,
    /// The embedded orchestrator, when the config has deployments.
    pub orchestrator: Mutex<Option<Arc<crate::orchestrator::Orchestrator>>>,
    /// Upstream connections of aggregation calls (pooled, like the proxy's).
    pub connector: pingora::connectors::http::Connector,
    /// Aggregation calls running at once, gateway-wide.
    pub aggregate_slots: Arc<tokio::sync::Semaphore>,
    /// Where a re-read config file goes instead of straight to `apply_config` (ingress
    /// mode: the file is only the base the cluster state is translated onto).
    pub source_hook: Mutex<Option<SourceHook>>,
    /// The certificate resolvers of the TLS listeners (ingress mode adds certificates
    /// from TLS Secrets to them).
    pub tls: Mutex<Vec<Arc<crate::tls::Sni>>>,
}

/// Takes a freshly parsed config file and applies what it implies; see
/// `Gateway::source_hook`.
pub type SourceHook = Arc<dyn Fn(Config, &str) -> Result<u64, Vec<String>> + Send + Sync>;

/// Puts the config's static registry instances into `reg` (and drops stale ones).
pub fn sync_static(reg: &Registry, cfg: &Config) {
    let mut keep = vec![];
    if let Some(r) = &cfg.registry {
        for (svc, insts) in &r.services {
            keep.push(svc.clone());
            let list = insts
                .iter()
                .enumerate()
                .filter_map(|(i, si)| {
                    let id = si.id.clone().unwrap_or_else(|| format!("static-{i}"));
                    crate::registry::instance(
                        &id,
                        &si.address,
                        si.labels.clone(),
                        None,
                        Source::Static,
                    )
                    .ok()
                })
                .collect();
            reg.sync_source(Source::Static, svc, list);
        }
    }
    reg.drop_static_except(&keep);
}

/// A registry holding only the config's static instances (for `check` and `routes`).
pub fn static_registry(cfg: &Config) -> Arc<Registry> {
    let r = Arc::new(Registry::default());
    sync_static(&r, cfg);
    r
}

/// RFC 3339 UTC time of now (the date part is computed once a second per thread).
pub fn now_rfc3339() -> String {
    let mut s = String::with_capacity(24);
    push_now_rfc3339(&mut s);
    s
}

/// Appends the RFC 3339 UTC time of now, with milliseconds, to `out`: the part up to
/// the seconds is formatted once a second per thread, the rest without `fmt`.
pub fn push_now_rfc3339(out: &mut String) {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        if l.0 != secs {
            let (y, mo, d) = civil_from_days((secs / 86400) as i64);
            let s = secs % 86400;
            l.1 = format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
                s / 3600,
                (s / 60) % 60,
                s % 60
            );
            l.0 = secs;
        }
        out.push_str(&l.1);
    });
    let ms = now.subsec_millis();
    out.push('.');
    for digit in [ms / 100, (ms / 10) % 10, ms % 10] {
        out.push(char::from(b'0' + digit as u8));
    }
    out.push('Z');
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn text_hash(t: &str) -> u64 {
    crate::upstream::balance::hash64(t.as_bytes())
}

impl Gateway {
    /// Creates the gateway state around an already loaded config.
    pub fn new(
        cfg: Config,
        text: &str,
        config_path: PathBuf,
        bg: tokio::runtime::Handle,
        access_log: AccessLog,
    ) -> Result<Arc<Gateway>, String> {
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::default());
        sync_static(&registry, &cfg);
        let snap = snapshot::compile(&cfg, None, Some(&bg), &metrics, 1, Some(&registry))?;
        metrics.config_version.set(1);
        metrics.reloads.with_label_values(&["ok"]).inc();
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snap),
            metrics,
            config_path,
            loaded_at: Mutex::new(now_rfc3339()),
            last_error: Mutex::new(None),
            draining: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            sources_synced: AtomicBool::new(true),
            last_text_hash: AtomicU64::new(text_hash(text)),
            reload_lock: Mutex::new(()),
            bg,
            access_log,
            registry,
            orchestrator: Mutex::new(None),
            connector: pingora::connectors::http::Connector::new(None),
            aggregate_slots: Arc::new(tokio::sync::Semaphore::new(512)),
            source_hook: Mutex::new(None),
            tls: Mutex::new(vec![]),
        }))
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Reloads the config file. `force: false` skips a file whose text did not change.
    /// Returns the new version, or every error (the running config stays).
    pub fn reload(&self, force: bool, why: &str) -> Result<u64, Vec<String>> {
        let name = self.config_path.display().to_string();
        let result = std::fs::read_to_string(&self.config_path)
            .map_err(|e| {
                vec![ConfigError {
                    file: name.clone(),
                    line: 1,
                    col: 1,
                    message: format!("cannot read the config file: {e}"),
                }]
            })
            .and_then(|text| {
                if !force && text_hash(&text) == self.last_text_hash.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                config::load_str(&name, &text).map(|(c, _)| Some((c, text)))
            });
        match result {
            Ok(None) => Ok(self.current().version),
            Ok(Some((cfg, text))) => {
                let hook = self
                    .source_hook
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let r = match hook {
                    Some(h) => h(cfg, why),
                    None => self.apply_config(cfg, why),
                };
                if r.is_ok() {
                    self.last_text_hash
                        .store(text_hash(&text), Ordering::Relaxed);
                }
                r
            }
            Err(errs) => Err(self.refused(errs.iter().map(|e| e.to_string()).collect(), why)),
        }
    }

    /// Compiles `cfg` against the running snapshot and swaps it in (the path every
    /// config change takes: file reloads, and the translated cluster state in ingress
    /// mode). `cfg` must be validated already. Returns the new version, or the errors
    /// (the running config stays).
    pub fn apply_config(&self, cfg: Config, why: &str) -> Result<u64, Vec<String>> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let name = self.config_path.display().to_string();
        let prev = self.current();
        let version = prev.version + 1;
        let cfg = Arc::new(cfg);
        sync_static(&self.registry, &cfg);
        match snapshot::compile_shared(
            &cfg,
            Some(&prev),
            Some(&self.bg),
            &self.metrics,
            version,
            Some(&self.registry),
        ) {
            Ok(snap) => {
                if let Some(o) = self.orchestrator.lock().ok().and_then(|g| g.clone()) {
                    o.apply(&cfg);
                }
                warn_static_changes(&prev.config, &cfg);
                self.snapshot.store(Arc::new(snap));
                *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = now_rfc3339();
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                self.metrics.config_version.set(version as i64);
                log::info!("config reloaded ({why}): version {version}");
                Ok(version)
            }
            Err(e) => Err(self.refused(vec![format!("{name}: {e}")], why)),
        }
    }

    /// Records and logs a refused config change; returns the errors.
    pub fn refused(&self, errors: Vec<String>, why: &str) -> Vec<String> {
        self.metrics.reloads.with_label_values(&["error"]).inc();
        for e in &errors {
            log::error!("config reload ({why}) refused: {e}");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(ReloadError {
            at: now_rfc3339(),
            errors: errors.clone(),
        });
        errors
    }
}

impl Gateway {
    /// Recompiles the running config against the registry's current contents (the
    /// config version stays: only discovered endpoints changed).
    pub fn recompile(&self, why: &str) {
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let prev = self.current();
        match snapshot::compile_shared(
            &prev.config,
            Some(&prev),
            Some(&self.bg),
            &self.metrics,
            prev.version,
            Some(&self.registry),
        ) {
            Ok(snap) => {
                self.snapshot.store(Arc::new(snap));
                log::debug!("routing recompiled ({why})");
            }
            Err(e) => log::error!("recompile after {why} failed: {e}"),
        }
    }

    /// Traffic to upstreams that discover `service` (for autoscaling).
    pub fn load_for_service(&self, service: &str) -> crate::orchestrator::Load {
        let snap = self.current();
        let mut load = crate::orchestrator::Load::default();
        for u in snap.upstreams.values().filter(|u| {
            u.spec.discovery.as_ref().and_then(|d| d.service.as_deref()) == Some(service)
        }) {
            load.inflight += u.inflight.load(std::sync::atomic::Ordering::Relaxed)
                + u.waiting.load(std::sync::atomic::Ordering::Relaxed);
            let used = u.last_used.load(std::sync::atomic::Ordering::Relaxed);
            if used > 0 {
                let t = crate::upstream::instant_of_ms(used);
                load.last_used = Some(load.last_used.map_or(t, |l: std::time::Instant| l.max(t)));
            }
        }
        load
    }

    /// Starts the registry's background work: TTL expiry, and recompiling routing
    /// whenever the registry changes (debounced a little, so a burst is one swap).
    pub fn start_registry_tasks(self: &Arc<Self>) {
        // `registry.backend: etcd`: mirror the shared registry (waits for its first sync).
        crate::registry::etcd::start_for(&self.current().config, &self.registry, &self.bg);
        let gw = Arc::clone(self);
        self.bg.spawn(async move {
            let mut rx = gw.registry.subscribe();
            // Changes made before this subscription (DNS answers, replicas registered
            // while starting) must reach routing too: begin with one recompile.
            rx.mark_changed();
            while rx.changed().await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                rx.borrow_and_update();
                let g = Arc::clone(&gw);
                let _ = tokio::task::spawn_blocking(move || g.recompile("registry change")).await;
            }
        });
        let gw = Arc::clone(self);
        self.bg.spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                gw.registry.expire();
            }
        });
    }
}

/// Listeners, admin and server settings are read once at start.
fn warn_static_changes(old: &Config, new: &Config) {
    if old.listeners != new.listeners {
        log::warn!("listener changes take effect at the next restart or binary upgrade");
    }
    if old.admin != new.admin {
        log::warn!("admin listener changes take effect at the next restart");
    }
    if old.server != new.server {
        log::warn!("`server` settings take effect at the next restart");
    }
    if old.access_log != new.access_log {
        log::warn!("`access_log` changes take effect at the next restart");
    }
    let shared = |c: &Config| {
        c.registry
            .as_ref()
            .map(|r| (r.backend.clone(), r.etcd.clone()))
    };
    if shared(old) != shared(new) {
        log::warn!(
            "`registry.backend` and `registry.etcd` changes take effect at the next restart"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_000), (2024, 10, 4));
    }

    #[test]
    fn rfc3339_now_has_the_access_log_shape() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = super::now_rfc3339();
        // 2026-11-27T05:15:28.111Z
        assert_eq!(t.len(), 24, "{t}");
        let b = t.as_bytes();
        for (i, c) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
            (23, b'Z'),
        ] {
            assert_eq!(b[i], c, "{t}");
        }
        assert!(t[20..23].bytes().all(|c| c.is_ascii_digit()), "{t}");
        let (y, _, _) = super::civil_from_days((before / 86400) as i64);
        assert!(
            t.starts_with(&y.to_string()) || t.starts_with(&(y + 1).to_string()),
            "{t}"
        );
    }
}
