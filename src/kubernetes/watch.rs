//! Cluster mode: watches the Kubernetes API and keeps one `ClusterState` current.
//!
//! One kube-rs `watcher` stream runs per watched kind and namespace (Ingresses,
//! IngressClasses, Services, EndpointSlices, `kubernetes.io/tls` Secrets, and the Gateway
//! API's GatewayClasses, Gateways and HTTPRoutes as dynamic objects). Every stream sends
//! what it sees to one sync task: a finished (re-)list replaces that stream's share of
//! the state, watch events upsert or remove single objects. The sync task gathers the
//! state until every stream has finished its first list (until then `/readyz` answers
//! 503: `Gateway::sources_synced`), hands it to the controller, and from then on changes
//! the controller's state in place (`Controller::update`: translate, validate, compile,
//! swap), debounced, so a burst of events is one swap and no apply copies the state. A
//! kind the API server does not serve (the Gateway API CRDs not installed: 404) counts as
//! listed and empty, and is retried slowly in case it appears.
//!
//! Failures never clear the state: while the API server is unreachable the gateway keeps
//! serving what it last applied, each stream reconnects with jittered exponential backoff,
//! and the change between reachable and unreachable is logged once each way. A watch that
//! expires (410 Gone) is re-listed by the watcher, and the re-list replaces the stream's
//! objects, so deletions missed meanwhile are noticed.

use super::objects::{ClusterState, Key, Object};
use super::status::StatusWriter;
use super::Controller;
use crate::config::model::Kubernetes;
use crate::gateway::Gateway;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::Resource;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Events closer together than `QUIET` are applied as one change: a burst ends when
/// none came for `QUIET`, or `DEBOUNCE_MAX` after its first event.
const QUIET: Duration = Duration::from_millis(10);
const DEBOUNCE_MAX: Duration = Duration::from_millis(100);
/// First and largest pause before a failed stream tries again.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a kind the API server does not serve (404) is asked for again.
const ABSENT_RETRY: Duration = Duration::from_secs(30);

/// What a watcher stream tells the sync task.
enum Msg {
    /// A complete (re-)list of stream `id`: these objects and no others.
    Listed { id: usize, objects: Vec<Object> },
    /// One object added or changed.
    Applied { id: usize, object: Object },
    /// One object deleted.
    Deleted {
        id: usize,
        kind: &'static str,
        key: Key,
    },
    /// The API server does not serve this kind (404): listed as empty.
    Absent { id: usize },
    /// The stream failed; it retries by itself.
    Failed {
        id: usize,
        error: String,
        gone: bool,
    },
}

/// One watched (kind, namespace).
struct Stream {
    kind: &'static str,
    /// `None`: all namespaces (or a cluster-scoped kind).
    namespace: Option<String>,
    listed: bool,
    failing: bool,
}

/// Builds the API client: the `kubeconfig` file of the config, else `KUBECONFIG` /
/// `~/.kube/config`, else the in-cluster service account.
pub async fn client(k: &Kubernetes) -> Result<kube::Client, String> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubernetes.kubeconfig {path}: {e}"))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubernetes.kubeconfig {path}: {e}"))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes credentials (KUBECONFIG, ~/.kube/config or in-cluster): {e}")
        })?,
    };
    log::info!("kubernetes: API server {}", config.cluster_url);
    kube::Client::try_from(config).map_err(|e| format!("kubernetes client: {e}"))
}

/// Cluster mode for `ctl`: connects (credentials as in `client`), then starts the
/// watchers on the gateway's background runtime. `/readyz` answers 503 until the first
/// full state is applied. Call from outside the runtime (start-up).
pub fn run(gw: &Arc<Gateway>, ctl: Arc<Controller>, k: &Kubernetes) -> Result<(), String> {
    let client = gw.bg.block_on(client(k))?;
    gw.sources_synced.store(false, Ordering::SeqCst);
    start(&gw.bg, client, k, ctl, Arc::clone(gw));
    Ok(())
}

/// Starts the watchers and the sync task on `rt`; `gw.sources_synced` turns true once
/// the first complete state has been applied.
pub fn start(
    rt: &tokio::runtime::Handle,
    client: kube::Client,
    k: &Kubernetes,
    controller: Arc<Controller>,
    gw: Arc<Gateway>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut streams = vec![];
    let namespaces: Vec<Option<String>> = if k.namespaces.is_empty() {
        vec![None]
    } else {
        k.namespaces.iter().cloned().map(Some).collect()
    };
    let cfg = watcher::Config::default();
    let mut add = |kind: &'static str, ns: Option<String>| {
        streams.push(Stream {
            kind,
            namespace: ns,
            listed: false,
            failing: false,
        });
        streams.len() - 1
    };
    // Cluster-scoped kinds.
    let id = add("IngressClass", None);
    rt.spawn(run_typed::<IngressClass>(
        id,
        "IngressClass",
        Api::all(client.clone()),
        cfg.clone(),
        tx.clone(),
        |o| Object::IngressClass(Box::new(o)),
    ));
    let id = add("GatewayClass", None);
    rt.spawn(run_dynamic(
        id,
        client.clone(),
        "GatewayClass",
        "gatewayclasses",
        None,
        cfg.clone(),
        tx.clone(),
    ));
    for ns in namespaces {
        macro_rules! typed {
            ($t:ty, $kind:literal, $variant:ident, $cfg:expr) => {{
                let id = add($kind, ns.clone());
                let api: Api<$t> = match &ns {
                    Some(n) => Api::namespaced(client.clone(), n),
                    None => Api::all(client.clone()),
                };
                rt.spawn(run_typed::<$t>(id, $kind, api, $cfg, tx.clone(), |o| {
                    Object::$variant(Box::new(o))
                }));
            }};
        }
        typed!(Ingress, "Ingress", Ingress, cfg.clone());
        typed!(Service, "Service", Service, cfg.clone());
        typed!(EndpointSlice, "EndpointSlice", EndpointSlice, cfg.clone());
        typed!(
            Secret,
            "Secret",
            Secret,
            cfg.clone().fields("type=kubernetes.io/tls")
        );
        for (kind, plural) in [("Gateway", "gateways"), ("HTTPRoute", "httproutes")] {
            let id = add(kind, ns.clone());
            rt.spawn(run_dynamic(
                id,
                client.clone(),
                kind,
                plural,
                ns.clone(),
                cfg.clone(),
                tx.clone(),
            ));
        }
    }
    drop(tx);
    let status = StatusWriter::new(client, k, rt.clone());
    rt.spawn(sync_task(rx, streams, controller, status, gw));
}

/// Watches one typed kind and reports to the sync task.
async fn run_typed<K>(
    id: usize,
    kind: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    tx: mpsc::UnboundedSender<Msg>,
    wrap: fn(K) -> Object,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    drive(id, watcher::watcher(api, cfg), tx, kind, |o: K| Ok(wrap(o))).await
}

/// Watches one Gateway API kind as dynamic objects (no CRD discovery).
async fn run_dynamic(
    id: usize,
    client: kube::Client,
    kind: &'static str,
    plural: &'static str,
    ns: Option<String>,
    cfg: watcher::Config,
    tx: mpsc::UnboundedSender<Msg>,
) {
    let ar = ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: super::objects::GATEWAY_API_VERSION.into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = match &ns {
        Some(n) => Api::namespaced_with(client, n, &ar),
        None => Api::all_with(client, &ar),
    };
    let convert = move |o: DynamicObject| -> Result<Object, String> {
        let mut v = serde_json::to_value(&o).map_err(|e| e.to_string())?;
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), ar.api_version.clone().into());
            m.insert("kind".into(), ar.kind.clone().into());
        }
        Object::from_json(v).map_err(|e| e.to_string())
    };
    drive(id, watcher::watcher(api, cfg), tx, kind, convert).await
}

/// Jittered exponential backoff, reset by any success.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        d.mul_f64(jitter)
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// Runs one watcher stream to its end (it never ends while the receiver lives).
async fn drive<K, S, F>(
    id: usize,
    stream: S,
    tx: mpsc::UnboundedSender<Msg>,
    kind: &'static str,
    convert: F,
) where
    K: Resource + Send + 'static,
    S: futures::Stream<Item = watcher::Result<Event<K>>> + Send,
    F: Fn(K) -> Result<Object, String>,
{
    let mut stream = std::pin::pin!(stream);
    let mut page: Vec<Object> = vec![];
    let mut backoff = Backoff(BACKOFF_MIN);
    let name_of = |o: &K| {
        let m = o.meta();
        format!(
            "{}/{}",
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or("")
        )
    };
    while let Some(ev) = stream.next().await {
        let msg = match ev {
            Ok(Event::Init) => {
                page.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                let name = name_of(&o);
                match convert(o) {
                    Ok(obj) => page.push(obj),
                    Err(e) => log::warn!("kubernetes: {kind} {name} ignored: {e}"),
                }
                continue;
            }
            Ok(Event::InitDone) => {
                backoff.reset();
                Msg::Listed {
                    id,
                    objects: std::mem::take(&mut page),
                }
            }
            Ok(Event::Apply(o)) => {
                backoff.reset();
                let name = name_of(&o);
                match convert(o) {
                    Ok(object) => Msg::Applied { id, object },
                    Err(e) => {
                        log::warn!("kubernetes: {kind} {name} ignored: {e}");
                        continue;
                    }
                }
            }
            Ok(Event::Delete(o)) => {
                backoff.reset();
                let m = o.meta();
                Msg::Deleted {
                    id,
                    kind,
                    key: (
                        m.namespace.clone().unwrap_or_default(),
                        m.name.clone().unwrap_or_default(),
                    ),
                }
            }
            Err(e) => {
                if is_not_found(&e) {
                    if tx.send(Msg::Absent { id }).is_err() {
                        return;
                    }
                    tokio::time::sleep(ABSENT_RETRY).await;
                    continue;
                }
                let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                if tx
                    .send(Msg::Failed {
                        id,
                        error: e.to_string(),
                        gone,
                    })
                    .is_err()
                {
                    return;
                }
                if !gone {
                    tokio::time::sleep(backoff.next()).await;
                }
                continue;
            }
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// The keys `state` holds of one kind, in one namespace or all.
fn keys_of(state: &ClusterState, kind: &str, ns: Option<&str>) -> Vec<Key> {
    fn pick<V>(m: &std::collections::BTreeMap<Key, V>, ns: Option<&str>) -> Vec<Key> {
        m.keys()
            .filter(|k| ns.is_none_or(|n| k.0 == n))
            .cloned()
            .collect()
    }
    match kind {
        "Ingress" => pick(&state.ingresses, ns),
        "IngressClass" => pick(&state.ingress_classes, ns),
        "Service" => pick(&state.services, ns),
        "EndpointSlice" => pick(&state.endpoint_slices, ns),
        "Secret" => pick(&state.secrets, ns),
        "GatewayClass" => pick(&state.gateway_classes, ns),
        "Gateway" => pick(&state.gateways, ns),
        "HTTPRoute" => pick(&state.http_routes, ns),
        _ => vec![],
    }
}

/// Folds stream messages into the state and applies it, debounced. Until the first full
/// sync the state is gathered here (a file reload meanwhile sees no partial state); then
/// it is handed to the controller, which holds it from then on and whose state each
/// burst of messages changes in place, so no apply copies the whole state.
async fn sync_task(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut streams: Vec<Stream>,
    controller: Arc<Controller>,
    status: StatusWriter,
    gw: Arc<Gateway>,
) {
    let mut local = Some(ClusterState::default());
    let mut dirty = false;
    let mut reachable = true;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        // Collect the rest of the burst.
        let end = tokio::time::Instant::now() + DEBOUNCE_MAX;
        loop {
            let quiet = (tokio::time::Instant::now() + QUIET).min(end);
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => return,
                },
                _ = tokio::time::sleep_until(quiet) => break,
            }
        }
        if let Some(state) = local.as_mut() {
            for m in batch.drain(..) {
                dirty |= fold(state, &mut streams, m, &mut reachable);
            }
            if !dirty {
                continue;
            }
            if !streams.iter().all(|s| s.listed) {
                let waiting: BTreeSet<&str> = streams
                    .iter()
                    .filter(|s| !s.listed)
                    .map(|s| s.kind)
                    .collect();
                log::debug!("kubernetes: waiting for the first list of {waiting:?}");
                continue;
            }
        }
        let handover = local.take();
        let first_sync = handover.is_some();
        let ctl = Arc::clone(&controller);
        let started = std::time::Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let result = ctl.update(|state| {
                let mut changed = false;
                if let Some(h) = handover {
                    *state = h;
                    changed = true;
                }
                for m in batch {
                    changed |= fold(state, &mut streams, m, &mut reachable);
                }
                changed
            });
            (result, streams, reachable)
        })
        .await;
        let result;
        (result, streams, reachable) = match joined {
            Ok(x) => x,
            Err(e) => {
                log::error!("kubernetes: applying the cluster state panicked: {e}");
                return;
            }
        };
        dirty = false;
        match result {
            None => continue,
            Some(Ok(version)) => {
                let snapshot = gw.current();
                let objects = controller.with_state(|state| {
                    status.update(&snapshot.config, state);
                    state.len()
                });
                log::info!(
                    "kubernetes: applied {objects} objects ({} left out) as version {version} in {:?}",
                    controller.rejected().len(),
                    started.elapsed()
                );
            }
            Some(Err(errors)) => {
                for e in &errors {
                    log::error!("kubernetes: cluster state refused: {e}");
                }
            }
        }
        if first_sync {
            gw.sources_synced.store(true, Ordering::SeqCst);
            log::info!("kubernetes: first full sync applied");
        }
    }
}

/// Folds one message into the state; true when the state changed.
fn fold(state: &mut ClusterState, streams: &mut [Stream], m: Msg, reachable: &mut bool) -> bool {
    let id = match &m {
        Msg::Listed { id, .. }
        | Msg::Applied { id, .. }
        | Msg::Deleted { id, .. }
        | Msg::Absent { id }
        | Msg::Failed { id, .. } => *id,
    };
    let Some(s) = streams.get_mut(id) else {
        return false;
    };
    let ok = !matches!(m, Msg::Failed { gone: false, .. });
    if ok && s.failing {
        s.failing = false;
        if !*reachable && streams.iter().all(|s| !s.failing) {
            *reachable = true;
            log::info!("kubernetes: API server reachable again; watches resumed");
        }
    }
    let Some(s) = streams.get_mut(id) else {
        return false;
    };
    match m {
        Msg::Listed { objects, .. } => {
            let first = !s.listed;
            s.listed = true;
            let fresh: BTreeSet<Key> = objects.iter().map(|o| o.key()).collect();
            let mut changed = first;
            for k in keys_of(state, s.kind, s.namespace.as_deref()) {
                if !fresh.contains(&k) {
                    changed |= state.remove(s.kind, &k);
                }
            }
            changed |= !objects.is_empty();
            log::debug!("kubernetes: listed {} {}(s)", objects.len(), s.kind);
            for o in objects {
                state.upsert(o);
            }
            changed
        }
        Msg::Applied { object, .. } => {
            state.upsert(object);
            true
        }
        Msg::Deleted { kind, key, .. } => state.remove(kind, &key),
        Msg::Absent { .. } => {
            let first = !s.listed;
            if first {
                log::info!(
                    "kubernetes: the API server does not serve {} (CRD not installed?); \
                     treated as none, asked again every {:?}",
                    s.kind,
                    ABSENT_RETRY
                );
            }
            s.listed = true;
            let mut changed = first;
            for k in keys_of(state, s.kind, s.namespace.as_deref()) {
                changed |= state.remove(s.kind, &k);
            }
            changed
        }
        Msg::Failed { error, gone, .. } => {
            if gone {
                log::debug!(
                    "kubernetes: {} watch expired (410 Gone); re-listing",
                    s.kind
                );
                return false;
            }
            s.failing = true;
            if *reachable {
                *reachable = false;
                log::warn!(
                    "kubernetes: API server unreachable ({}: {error}); serving the last \
                     known state and retrying with backoff",
                    s.kind
                );
            } else {
                log::debug!("kubernetes: {} watch: {error}", s.kind);
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    //! The shipped manifests (`deploy/*.yaml`) parse as the API types they claim to be,
    //! with no field the API would drop, their embedded config loads, and their RBAC
    //! grants exactly what the watchers read.
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use serde::Deserialize;

    /// Parses `v` as `T` and back; a field lost on the way is one the API does not know.
    fn strict<T: DeserializeOwned + serde::Serialize>(v: &serde_json::Value, what: &str) -> T {
        let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let back = serde_json::to_value(&t).unwrap();
        assert_eq!(&back, v, "{what}: fields the API type does not have");
        t
    }

    fn documents() -> Vec<(String, serde_json::Value)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        assert!(files.len() >= 6, "{files:?}");
        let mut out = vec![];
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde_yaml::Value::deserialize(doc).unwrap();
                if v.is_null() {
                    continue;
                }
                out.push((f.display().to_string(), serde_json::to_value(v).unwrap()));
            }
        }
        out
    }

    #[test]
    fn deploy_manifests_are_valid() {
        let mut kinds = BTreeSet::new();
        let mut role = None;
        let (mut tokens, mut probe_auth) = (vec![], vec![]);
        for (file, v) in documents() {
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let what = format!("{file}: {kind}");
            match kind.as_str() {
                "Namespace" => drop(strict::<Namespace>(&v, &what)),
                "ServiceAccount" => drop(strict::<ServiceAccount>(&v, &what)),
                "ClusterRole" => role = Some(strict::<ClusterRole>(&v, &what)),
                "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(&v, &what)),
                "Deployment" => {
                    let d = strict::<Deployment>(&v, &what);
                    let c = &d.spec.template.spec.unwrap().containers[0];
                    for probe in [&c.readiness_probe, &c.liveness_probe] {
                        let get = probe
                            .clone()
                            .and_then(|p| p.http_get)
                            .expect("an HTTP probe");
                        assert_eq!(get.port, IntOrString::String("admin".into()));
                        for h in get.http_headers.unwrap_or_default() {
                            probe_auth.push(h.value);
                        }
                    }
                }
                "PodDisruptionBudget" => drop(strict::<PodDisruptionBudget>(&v, &what)),
                "Service" => drop(strict::<Service>(&v, &what)),
                "Secret" => {
                    let token = strict::<Secret>(&v, &what).string_data.unwrap()["token"].clone();
                    tokens.push(format!("Bearer {token}"));
                }
                "IngressClass" => {
                    let c = strict::<IngressClass>(&v, &what);
                    let controller = c.spec.and_then(|s| s.controller);
                    assert_eq!(controller.as_deref(), Some(super::super::CONTROLLER_NAME));
                }
                "GatewayClass" => {
                    let Ok(Object::GatewayClass(c)) = Object::from_json(v.clone()) else {
                        panic!("{what}: not a GatewayClass");
                    };
                    assert_eq!(c.spec.controller_name, super::super::CONTROLLER_NAME);
                }
                "ConfigMap" => {
                    let cm = strict::<ConfigMap>(&v, &what);
                    let text = &cm.data.unwrap()["portico.yaml"];
                    // The Deployment sets it from the Secret.
                    std::env::set_var("PORTICO_ADMIN_TOKEN", "from-the-secret");
                    let (cfg, _) = crate::config::load_str("deploy/20-config.yaml", text)
                        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    assert!(cfg.kubernetes.is_some(), "{what}: no kubernetes section");
                }
                other => panic!("{what}: unexpected kind {other}"),
            }
            kinds.insert(kind);
        }
        for k in [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "IngressClass",
        ] {
            assert!(kinds.contains(k), "deploy/ has no {k}");
        }

        // The admin token lives in its Secret only: the probes need none.
        assert_eq!(tokens.len(), 1);
        assert!(probe_auth.is_empty(), "probes send headers: {probe_auth:?}");

        // RBAC: read (get/list/watch) exactly what the watchers read; patch only
        // Ingress status.
        fn gr<K: Resource<DynamicType = ()>>() -> (String, String) {
            (K::group(&()).to_string(), K::plural(&()).to_string())
        }
        let mut watched: BTreeSet<(String, String)> = [
            gr::<Ingress>(),
            gr::<IngressClass>(),
            gr::<Service>(),
            gr::<EndpointSlice>(),
            gr::<Secret>(),
        ]
        .into_iter()
        .collect();
        for plural in ["gatewayclasses", "gateways", "httproutes"] {
            watched.insert(("gateway.networking.k8s.io".into(), plural.into()));
        }
        let mut read = BTreeSet::new();
        let mut write = BTreeSet::new();
        for rule in role.expect("a ClusterRole").rules.unwrap_or_default() {
            for g in rule.api_groups.unwrap_or_default() {
                for r in rule.resources.clone().unwrap_or_default() {
                    let mut verbs = rule.verbs.clone();
                    verbs.sort();
                    if verbs == ["get", "list", "watch"] {
                        read.insert((g.clone(), r));
                    } else {
                        assert_eq!(verbs, ["patch"], "{g}/{r}: unexpected verbs");
                        write.insert((g.clone(), r));
                    }
                }
            }
        }
        assert_eq!(read, watched);
        let status: BTreeSet<_> = [(
            "networking.k8s.io".to_string(),
            "ingresses/status".to_string(),
        )]
        .into_iter()
        .collect();
        assert_eq!(write, status);
    }
}
