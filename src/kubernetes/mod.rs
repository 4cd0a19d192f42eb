//! Kubernetes ingress controller mode. Cluster objects (Ingress, IngressClass,
//! Service, EndpointSlice, TLS Secret, and Gateway API GatewayClass/Gateway/HTTPRoute)
//! are gathered into a `ClusterState` (`objects`), either by watching an API server or
//! by reading manifests from a folder (`manifests`, `portico ingress --manifests`).
//! `translate` turns a state plus the base config file (listeners, admin, server
//! settings, the file's own upstreams and routes) into the same `Config` model a file
//! gives, and the `Controller` swaps it in through the gateway's normal
//! compile-and-swap path (`Gateway::apply_config`). There is no second routing path:
//! each change gives a whole new config, but the controller's `Translator` rebuilds
//! only the fragments of the objects a change touches (an Ingress, the Ingresses of a
//! changed Service or EndpointSlice, a changed TLS Secret), and the compile reuses
//! unchanged upstreams and plugins of the previous snapshot. A reload of the base
//! file (file watcher, SIGHUP, `POST /reload`) re-translates the last state onto the
//! new base.

pub mod manifests;
pub mod objects;
pub mod status;
pub mod translate;
pub mod watch;

use crate::config::model::{Config, Kubernetes};
use crate::gateway::Gateway;
use objects::ClusterState;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The controller name an IngressClass (or GatewayClass) must carry to be Portico's.
pub const CONTROLLER_NAME: &str = "portico.io/ingress-controller";

/// Applies cluster states to a gateway.
pub struct Controller {
    gw: Arc<Gateway>,
    inner: Mutex<Inner>,
}

struct Inner {
    base: Config,
    settings: Kubernetes,
    state: Option<ClusterState>,
    /// Rejections logged for the current state, `kind ns/name` -> reason, so each is
    /// logged once per change rather than on every apply.
    rejected: BTreeMap<String, String>,
    /// The Secret certificates last handed to the TLS listeners.
    certs: Vec<crate::tls::PemCert>,
    /// Remembers each object's translation, so a change re-translates what it touches.
    translator: translate::Translator,
}

impl Controller {
    /// A controller for `gw`, whose config file gave `base`. It takes over the
    /// gateway's file reloads: a re-read file becomes the new base.
    pub fn new(gw: Arc<Gateway>, base: Config, settings: Kubernetes) -> Arc<Controller> {
        let ctl = Arc::new(Controller {
            gw: Arc::clone(&gw),
            inner: Mutex::new(Inner {
                base,
                settings,
                state: None,
                rejected: BTreeMap::new(),
                certs: vec![],
                translator: translate::Translator::default(),
            }),
        });
        let weak = Arc::downgrade(&ctl);
        let hook: crate::gateway::SourceHook =
            Arc::new(move |cfg: Config, why: &str| match weak.upgrade() {
                Some(c) => c.rebase(cfg, why),
                None => Err(vec!["the ingress controller has stopped".to_string()]),
            });
        *gw.source_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
        ctl
    }

    /// Translates `state` onto the base config and swaps the result in. Rejected
    /// objects are logged (once per change) and left out; the rest is served.
    /// Returns the new config version, or the errors of a compile that failed (the
    /// running config stays).
    pub fn apply(&self, state: &ClusterState) -> Result<u64, Vec<String>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.state = Some(state.clone());
        self.apply_locked(&mut inner, "cluster change")
    }

    /// Changes the held state in place with `change` (no copy of the state: at 5,000
    /// Ingresses copying it took a third of an apply) and, when `change` returns
    /// true, translates and swaps it in as `apply` does. `None`: nothing was applied.
    pub fn update(
        &self,
        change: impl FnOnce(&mut ClusterState) -> bool,
    ) -> Option<Result<u64, Vec<String>>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let apply = change(inner.state.get_or_insert_with(ClusterState::default));
        apply.then(|| self.apply_locked(&mut inner, "cluster change"))
    }

    /// Reads the held state (empty before the first `apply` or `update`).
    pub fn with_state<R>(&self, read: impl FnOnce(&ClusterState) -> R) -> R {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &inner.state {
            Some(s) => read(s),
            None => read(&ClusterState::default()),
        }
    }

    /// A new base config (the file was re-read): re-translates the last state.
    fn rebase(&self, base: Config, why: &str) -> Result<u64, Vec<String>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.settings = base.kubernetes.clone().unwrap_or_default();
        inner.base = base;
        self.apply_locked(&mut inner, why)
    }

    fn apply_locked(&self, inner: &mut Inner, why: &str) -> Result<u64, Vec<String>> {
        let empty = ClusterState::default();
        let state = inner.state.as_ref().unwrap_or(&empty);
        let started = std::time::Instant::now();
        let t = inner
            .translator
            .translate(state, &inner.base, &inner.settings);
        log::debug!(
            "kubernetes: translated {} objects in {:?} ({} fragments rebuilt)",
            state.len(),
            started.elapsed(),
            inner.translator.rebuilt()
        );
        let now: BTreeMap<String, String> = t
            .rejected
            .iter()
            .map(|r| (r.object(), r.reason.clone()))
            .collect();
        for (obj, reason) in &now {
            if inner.rejected.get(obj) != Some(reason) {
                log::warn!("kubernetes: {obj} left out: {reason}");
            }
        }
        for obj in inner.rejected.keys() {
            if !now.contains_key(obj) {
                log::info!("kubernetes: {obj} is no longer rejected");
            }
        }
        inner.rejected = now;
        let version = self.gw.apply_config(t.config, why)?;
        if t.certificates != inner.certs {
            let snis = self
                .gw
                .tls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for sni in &snis {
                for e in sni.set_memory(&t.certificates) {
                    log::warn!("kubernetes: listener {}: {e}", sni.listener);
                }
            }
            inner.certs = t.certificates;
        }
        Ok(version)
    }

    /// The base config's file-watch debounce (manifest mode watches its folder alike).
    pub fn debounce(&self) -> std::time::Duration {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .base
            .server
            .watch_debounce
            .0
    }

    /// The objects rejected by the last translation: `kind ns/name` -> reason.
    pub fn rejected(&self) -> BTreeMap<String, String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rejected
            .clone()
    }
}

/// Starts ingress mode on a running gateway: from manifests in `manifests`, or (with
/// `None`) from the cluster's API server.
pub fn start(
    gw: &Arc<Gateway>,
    base: Config,
    manifests: Option<std::path::PathBuf>,
) -> Result<Arc<Controller>, String> {
    let settings = base.kubernetes.clone().unwrap_or_default();
    let ctl = Controller::new(Arc::clone(gw), base, settings.clone());
    match manifests {
        Some(dir) => manifests::start(Arc::clone(&ctl), dir)?,
        None => watch::run(gw, Arc::clone(&ctl), &settings)?,
    }
    Ok(ctl)
}
