//! The etcd registry backend (`registry.backend: etcd`): one registry shared by every
//! gateway of a fleet. Each instance is one key, `<prefix>/services/<service>/<id>`,
//! whose value is a JSON [`Record`] (address, labels, state, TTL, who wrote it). TTLs
//! are etcd leases: an instance registered with a TTL gets a lease of its own, a
//! heartbeat is one keep-alive of that lease (through whichever gateway receives it),
//! and etcd deletes the key when the lease lapses; instances without a TTL have no
//! lease. Orchestrated replicas are written under one lease per gateway, kept alive by
//! that gateway, so a dead gateway's replicas vanish everywhere after the lease TTL;
//! their ids get the gateway's node name appended so equal deployments on several
//! gateways never collide.
//!
//! Every gateway mirrors the prefix into its embedded registry as the `etcd` source:
//! a list at revision R, then a watch from R+1; when the watch breaks or is compacted,
//! it lists again and applies the difference. While etcd is unreachable the last known
//! instances stay routed, reconnection backs off (100 ms doubling to 2 s) and state
//! changes are logged once; admin API writes fail with 503 instead of being lost
//! silently. The gateway's own replicas are routed from its local copy, so they never
//! depend on etcd for that gateway, and are written again after every reconnection.

use super::{Instance, Registry, Source, State};
use crate::config::load::Errors;
use crate::config::model::{Config, EtcdConfig};
use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The value stored at an instance's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "ready")]
    pub state: State,
    /// The TTL asked for at registration (the lease's TTL, for display).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// `api` (admin API) or `orchestrator` (a replica run by gateway `owner`).
    pub source: Source,
    /// Node name of the gateway that wrote the record.
    #[serde(default)]
    pub owner: String,
}

fn ready() -> State {
    State::Ready
}

/// (service, id) -> record: what a gateway mirrors.
pub type Mirror = BTreeMap<(String, String), Record>;

/// One step that turns one mirror into another.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put(String, String, Record),
    Delete(String, String),
}

/// The key of an instance.
pub fn key(prefix: &str, service: &str, id: &str) -> String {
    format!("{}{service}/{id}", services_prefix(prefix))
}

/// The prefix under which every instance key lives.
pub fn services_prefix(prefix: &str) -> String {
    format!("{}/services/", prefix.trim_end_matches('/'))
}

/// Service and instance names: what the admin API accepts.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// (service, id) of a key under `prefix`, or None for anything else.
pub fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(&services_prefix(prefix))?;
    let (svc, id) = rest.split_once('/')?;
    (valid_name(svc) && valid_name(id)).then_some((svc, id))
}

/// Decodes one key/value pair under `prefix`.
pub fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Option<((String, String), Record)> {
    let k = std::str::from_utf8(key).ok()?;
    let (svc, id) = parse_key(prefix, k)?;
    let rec: Record = serde_json::from_slice(value).ok()?;
    Some(((svc.to_string(), id.to_string()), rec))
}

/// The changes that turn `old` into `new` (puts only for records that differ).
pub fn diff(old: &Mirror, new: &Mirror) -> Vec<Change> {
    let mut out = vec![];
    for (k, _) in old.iter().filter(|(k, _)| !new.contains_key(*k)) {
        out.push(Change::Delete(k.0.clone(), k.1.clone()));
    }
    for (k, r) in new {
        if old.get(k) != Some(r) {
            out.push(Change::Put(k.0.clone(), k.1.clone(), r.clone()));
        }
    }
    out
}

/// Applies one change to the registry's `etcd` source.
fn apply(reg: &Registry, ch: Change) {
    match ch {
        Change::Put(svc, id, r) => {
            reg.upsert(
                &svc,
                Instance {
                    id,
                    address: r.address,
                    labels: r.labels,
                    state: r.state,
                    // etcd expires it (lease); locally it stays until etcd says so.
                    ttl: None,
                    last_heartbeat: Instant::now(),
                    source: Source::Etcd,
                },
            );
        }
        Change::Delete(svc, id) => {
            reg.remove_from(Source::Etcd, &svc, &id);
        }
    }
}

/// Checks `registry.etcd`.
pub fn validate(e: &EtcdConfig, errs: &mut Errors) {
    if e.endpoints.is_empty() {
        errs.at(
            "registry.etcd.endpoints",
            "at least one etcd endpoint is needed (\"host:port\")",
        );
    }
    for (i, ep) in e.endpoints.iter().enumerate() {
        if let Err(m) = check_endpoint(ep) {
            errs.at(&format!("registry.etcd.endpoints[{i}]"), m);
        }
    }
    if let Err(m) = check_prefix(&e.prefix) {
        errs.at("registry.etcd.prefix", m);
    }
    if e.lease_ttl.0 < Duration::from_secs(2) {
        errs.at(
            "registry.etcd.lease_ttl",
            "lease_ttl must be at least 2s (etcd's shortest lease)",
        );
    }
    if e.timeout.0.is_zero() {
        errs.at("registry.etcd.timeout", "timeout must be more than 0");
    }
}

fn check_endpoint(ep: &str) -> Result<(), String> {
    if ep.starts_with("https://") {
        return Err(format!(
            "`{ep}`: TLS to etcd is not supported by this build; use http:// or host:port"
        ));
    }
    let hp = ep.strip_prefix("http://").unwrap_or(ep);
    let hp = hp.strip_suffix('/').unwrap_or(hp);
    let ok = match hp.rsplit_once(':') {
        Some((h, p)) => {
            !h.is_empty() && !h.contains(['/', ' ', '@']) && p.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid etcd endpoint `{ep}` (expected host:port or http://host:port)"
        ))
    }
}

fn check_prefix(p: &str) -> Result<(), String> {
    let ok = p.len() > 1
        && p.starts_with('/')
        && !p.ends_with('/')
        && !p.contains("//")
        && p.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid prefix `{p}` (a key path such as /portico: starts with /, no trailing /, \
             no empty segments or spaces)"
        ))
    }
}

/// Why a list-and-watch round ended.
enum Broken {
    /// etcd is unreachable or failed: back off.
    Down(String),
    /// The watch was compacted or canceled: list again now.
    Resync(String),
    /// The gateway is gone.
    Done,
}

/// Why an admin API write did not happen.
#[derive(Debug)]
pub enum WriteError {
    NotFound,
    Unavailable(String),
}

/// The shared registry of one gateway: its connection, mirror task, lease and the
/// replicas it publishes.
pub struct Etcd {
    cfg: EtcdConfig,
    /// This gateway's name in records it writes (`host-pid-random`).
    node: String,
    registry: Weak<Registry>,
    rt: tokio::runtime::Handle,
    client: tokio::sync::OnceCell<Client>,
    up: AtomicBool,
    synced: AtomicBool,
    /// The lease of this gateway's replicas (0: none yet).
    lease: AtomicI64,
    /// key -> record of the replicas this gateway runs.
    owned: Mutex<BTreeMap<String, Record>>,
    /// Keys of `owned` to write (or delete, if no longer owned), in order.
    writes: mpsc::UnboundedSender<String>,
}

fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xffff)
        .unwrap_or(0);
    let host = if host.is_empty() {
        "gateway".into()
    } else {
        host
    };
    format!("{host}-{}-{salt:04x}", std::process::id())
}

/// Starts the etcd backend when `cfg` asks for it, and waits (at most `wait`) for the
/// first sync so the gateway starts with the fleet's instances.
pub fn start_for(cfg: &Config, registry: &Arc<Registry>, rt: &tokio::runtime::Handle) {
    let Some(r) = &cfg.registry else { return };
    let (Some("etcd"), Some(e)) = (r.backend.as_deref(), &r.etcd) else {
        return;
    };
    let e = Etcd::start(e.clone(), registry, rt.clone());
    let until = Instant::now() + e.cfg.timeout.0 + Duration::from_secs(1);
    while !e.synced.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !e.synced.load(Ordering::SeqCst) {
        log::warn!(
            "etcd registry: not synced at start ({}); starting with local instances only",
            e.cfg.endpoints.join(", ")
        );
    }
}

impl Etcd {
    /// Installs the backend in `registry` and starts its tasks on `rt`.
    pub fn start(
        cfg: EtcdConfig,
        registry: &Arc<Registry>,
        rt: tokio::runtime::Handle,
    ) -> Arc<Etcd> {
        let (tx, rx) = mpsc::unbounded_channel();
        let e = Arc::new(Etcd {
            cfg,
            node: node_name(),
            registry: Arc::downgrade(registry),
            rt: rt.clone(),
            client: tokio::sync::OnceCell::new(),
            up: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            lease: AtomicI64::new(0),
            owned: Mutex::new(BTreeMap::new()),
            writes: tx,
        });
        registry.set_shared(Arc::clone(&e));
        log::info!(
            "etcd registry: node {} mirroring {} from {}",
            e.node,
            services_prefix(&e.cfg.prefix),
            e.cfg.endpoints.join(", ")
        );
        rt.spawn(Arc::clone(&e).mirror_loop());
        rt.spawn(Arc::clone(&e).lease_loop());
        rt.spawn(Arc::clone(&e).writer(rx));
        e
    }

    async fn client(&self) -> Result<Client, String> {
        self.client
            .get_or_try_init(|| async {
                let opts = ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
                    .with_keep_alive_while_idle(true);
                Client::connect(&self.cfg.endpoints, Some(opts)).await
            })
            .await
            .cloned()
            .map_err(|e| format!("cannot set up the etcd client: {e}"))
    }

    /// Runs one etcd call with the configured deadline.
    async fn timed<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.cfg.timeout.0, f).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(format!("etcd {what}: {e}")),
            Err(_) => Err(format!(
                "etcd {what}: no answer within {:?}",
                self.cfg.timeout.0
            )),
        }
    }

    fn set_up(&self, up: bool, why: &str) {
        if self.up.swap(up, Ordering::SeqCst) != up {
            if up {
                log::info!(
                    "etcd registry: connected to {} and synced",
                    self.cfg.endpoints.join(", ")
                );
            } else {
                log::warn!(
                    "etcd registry: unreachable ({why}); routing keeps the last known \
                     instances, reconnecting with backoff"
                );
            }
        } else if !up {
            log::debug!("etcd registry: still unreachable ({why})");
        }
    }

    fn is_own(&self, r: &Record) -> bool {
        r.source == Source::Orchestrator && r.owner == self.node
    }

    /// Lists and watches the prefix for as long as the gateway lives.
    async fn mirror_loop(self: Arc<Self>) {
        let mut mirror = Mirror::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.list_and_watch(&mut mirror, &mut backoff).await {
                Broken::Done => return,
                Broken::Resync(why) => {
                    log::info!("etcd registry: {why}; listing again");
                    continue;
                }
                Broken::Down(why) => self.set_up(false, &why),
            }
            // Up to 25% jitter, so a fleet does not reconnect in lockstep.
            let jitter = backoff.mul_f64(
                (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() % 250)
                    .unwrap_or(0) as f64)
                    / 1000.0,
            );
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn list_and_watch(&self, mirror: &mut Mirror, backoff: &mut Duration) -> Broken {
        let mut c = match self.client().await {
            Ok(c) => c,
            Err(e) => return Broken::Down(e),
        };
        let dir = services_prefix(&self.cfg.prefix);
        let listed = self
            .timed(
                "list",
                c.get(dir.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await;
        let resp = match listed {
            Ok(r) => r,
            Err(e) => return Broken::Down(e),
        };
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut fresh = Mirror::new();
        let mut mine = BTreeMap::new();
        for kv in resp.kvs() {
            match decode(&self.cfg.prefix, kv.key(), kv.value()) {
                Some((k, r)) if self.is_own(&r) => {
                    mine.insert(key(&self.cfg.prefix, &k.0, &k.1), (r, kv.lease()));
                }
                Some((k, r)) => {
                    fresh.insert(k, r);
                }
                None => log::warn!(
                    "etcd registry: ignoring {} (not a Portico instance record)",
                    String::from_utf8_lossy(kv.key())
                ),
            }
        }
        let Some(reg) = self.registry.upgrade() else {
            return Broken::Done;
        };
        for ch in diff(mirror, &fresh) {
            apply(&reg, ch);
        }
        drop(reg);
        *mirror = fresh;
        self.reconcile_owned(&mine);
        self.synced.store(true, Ordering::SeqCst);
        self.set_up(true, "");
        *backoff = Duration::from_millis(100);

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let mut stream = match self.timed("watch", c.watch(dir.as_str(), Some(opts))).await {
            Ok(s) => s,
            Err(e) => return Broken::Down(e),
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Broken::Down("the watch stream ended".into()),
                Err(e) => return Broken::Down(format!("the watch broke: {e}")),
            };
            if resp.compact_revision() > 0 {
                return Broken::Resync(format!(
                    "the watch fell behind a compaction (revision {})",
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                return Broken::Resync(format!(
                    "the watch was canceled ({})",
                    resp.cancel_reason()
                ));
            }
            let Some(reg) = self.registry.upgrade() else {
                return Broken::Done;
            };
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some((svc, id)) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| parse_key(&self.cfg.prefix, k))
                else {
                    continue;
                };
                let k = (svc.to_string(), id.to_string());
                let rec = match ev.event_type() {
                    EventType::Put => decode(&self.cfg.prefix, kv.key(), kv.value())
                        .map(|(_, r)| r)
                        .filter(|r| !self.is_own(r)),
                    EventType::Delete => None,
                };
                match rec {
                    Some(r) if mirror.get(&k) != Some(&r) => {
                        mirror.insert(k.clone(), r.clone());
                        apply(&reg, Change::Put(k.0, k.1, r));
                    }
                    Some(_) => {}
                    None => {
                        if mirror.remove(&k).is_some() {
                            apply(&reg, Change::Delete(k.0, k.1));
                        }
                    }
                }
            }
        }
    }

    /// After a list: queue the writes that make etcd hold exactly this gateway's
    /// replicas (`found`: key -> (record, lease) of the ones it holds now).
    fn reconcile_owned(&self, found: &BTreeMap<String, (Record, i64)>) {
        let lease = self.lease.load(Ordering::SeqCst);
        let owned = self.owned();
        for k in found.keys().filter(|k| !owned.contains_key(*k)) {
            let _ = self.writes.send(k.clone());
        }
        for (k, r) in owned.iter() {
            if found.get(k) != Some(&(r.clone(), lease)) {
                let _ = self.writes.send(k.clone());
            }
        }
    }

    fn requeue_owned(&self) {
        let owned = self.owned();
        for k in owned.keys() {
            let _ = self.writes.send(k.clone());
        }
    }

    /// Writes queued keys of `owned` in order: put if still owned, delete otherwise.
    async fn writer(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<String>) {
        while let Some(k) = rx.recv().await {
            let rec = self.owned().get(&k).cloned();
            let lease = self.lease.load(Ordering::SeqCst);
            let r = match rec {
                // Written once the lease exists (the lease task queues them again).
                Some(_) if lease == 0 => continue,
                Some(rec) => self.put_owned(&k, &rec, lease).await,
                None => match self.client().await {
                    Ok(mut c) => self
                        .timed("delete", c.delete(k.as_str(), None))
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = r {
                log::debug!("etcd registry: writing {k} failed: {e}");
                if self.up.load(Ordering::SeqCst) {
                    // A passing failure: try again shortly. While etcd is down, the
                    // reconnection's reconcile writes everything again instead.
                    let tx = self.writes.clone();
                    self.rt.spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let _ = tx.send(k);
                    });
                }
            }
        }
    }

    async fn put_owned(&self, k: &str, rec: &Record, lease: i64) -> Result<(), String> {
        let v = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
        let mut c = self.client().await?;
        self.timed(
            "put",
            c.put(k, v, Some(PutOptions::new().with_lease(lease))),
        )
        .await
        .map(|_| ())
    }

    /// Keeps this gateway's lease alive (a third of its TTL apart); grants a new one
    /// when it lapsed, and writes the replicas again under it.
    async fn lease_loop(self: Arc<Self>) {
        let ttl = self.cfg.lease_ttl.0.as_secs().max(2) as i64;
        let every = self.cfg.lease_ttl.0 / 3;
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        loop {
            if self.registry.strong_count() == 0 {
                return;
            }
            match self.lease_tick(&mut keeper, ttl).await {
                Ok(true) => continue,
                Ok(false) => tokio::time::sleep(every).await,
                Err(e) => {
                    keeper = None;
                    log::debug!("etcd registry: lease keep-alive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// One keep-alive; Ok(true) when the lease was lost and a new one is due now.
    async fn lease_tick(
        &self,
        keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
        ttl: i64,
    ) -> Result<bool, String> {
        let mut c = self.client().await?;
        let id = self.lease.load(Ordering::SeqCst);
        if id == 0 {
            let g = self.timed("lease grant", c.lease_grant(ttl, None)).await?;
            self.lease.store(g.id(), Ordering::SeqCst);
            *keeper = None;
            log::info!(
                "etcd registry: lease {:x} ({ttl}s) holds the replicas of node {}",
                g.id(),
                self.node
            );
            self.requeue_owned();
            return Ok(false);
        }
        if keeper.is_none() {
            *keeper = Some(
                self.timed("lease keep-alive", c.lease_keep_alive(id))
                    .await?,
            );
        }
        let Some((k, s)) = keeper.as_mut() else {
            return Ok(false);
        };
        self.timed("lease keep-alive", k.keep_alive()).await?;
        let resp = self
            .timed("lease keep-alive", s.message())
            .await?
            .ok_or_else(|| "the keep-alive stream ended".to_string())?;
        if resp.ttl() <= 0 {
            log::warn!(
                "etcd registry: lease {id:x} lapsed; writing this gateway's replicas again \
                 under a new lease"
            );
            self.lease.store(0, Ordering::SeqCst);
            *keeper = None;
            return Ok(true);
        }
        Ok(false)
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owned_key(&self, service: &str, id: &str) -> String {
        key(&self.cfg.prefix, service, &format!("{id}.{}", self.node))
    }

    /// Publishes a replica this gateway runs (under its lease).
    pub fn publish(&self, service: &str, inst: &Instance) {
        let k = self.owned_key(service, &inst.id);
        let rec = Record {
            address: inst.address.clone(),
            labels: inst.labels.clone(),
            state: inst.state,
            ttl_ms: None,
            source: Source::Orchestrator,
            owner: self.node.clone(),
        };
        self.owned().insert(k.clone(), rec);
        let _ = self.writes.send(k);
    }

    /// Changes the state of a published replica.
    pub fn publish_state(&self, service: &str, id: &str, state: State) {
        let k = self.owned_key(service, id);
        let found = match self.owned().get_mut(&k) {
            Some(r) if r.state != state => {
                r.state = state;
                true
            }
            _ => false,
        };
        if found {
            let _ = self.writes.send(k);
        }
    }

    /// Withdraws a published replica.
    pub fn unpublish(&self, service: &str, id: &str) {
        let k = self.owned_key(service, id);
        let had = self.owned().remove(&k).is_some();
        if had {
            let _ = self.writes.send(k);
        }
    }

    /// Runs `f` on the registry's runtime (the admin API runs on another one).
    async fn on_rt<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, WriteError>> + Send + 'static,
    ) -> Result<T, WriteError> {
        self.rt
            .spawn(f)
            .await
            .map_err(|e| WriteError::Unavailable(format!("etcd task failed: {e}")))?
    }

    /// Registers an instance through the admin API: a lease of its own when it has a
    /// TTL (etcd rounds TTLs up to whole seconds, at least its 2 s minimum).
    pub async fn register(
        self: &Arc<Self>,
        service: &str,
        inst: &Instance,
    ) -> Result<(), WriteError> {
        let me = Arc::clone(self);
        let k = key(&self.cfg.prefix, service, &inst.id);
        let rec = Record {
            address: inst.address.clone(),
            labels: inst.labels.clone(),
            state: State::Ready,
            ttl_ms: inst.ttl.map(|t| t.as_millis() as u64),
            source: Source::Api,
            owner: self.node.clone(),
        };
        self.on_rt(async move {
            let v = serde_json::to_vec(&rec).map_err(|e| WriteError::Unavailable(e.to_string()))?;
            let mut c = me.client().await.map_err(WriteError::Unavailable)?;
            let lease = match rec.ttl_ms {
                Some(ms) => {
                    let secs = ms.div_ceil(1000).max(1) as i64;
                    me.timed("lease grant", c.lease_grant(secs, None))
                        .await
                        .map_err(WriteError::Unavailable)?
                        .id()
                }
                None => 0,
            };
            let mut opts = PutOptions::new().with_prev_key();
            if lease != 0 {
                opts = opts.with_lease(lease);
            }
            let put = me.timed("put", c.put(k.as_str(), v, Some(opts))).await;
            let put = match put {
                Ok(p) => p,
                Err(e) => {
                    if lease != 0 {
                        me.revoke_later(lease);
                    }
                    return Err(WriteError::Unavailable(e));
                }
            };
            if let Some(prev) = put.prev_key() {
                me.revoke_replaced(prev.value(), prev.lease(), lease);
            }
            Ok(())
        })
        .await
    }

    /// A re-registered or deleted API instance's own lease has no other use.
    fn revoke_replaced(self: &Arc<Self>, old_value: &[u8], old_lease: i64, new_lease: i64) {
        let api =
            serde_json::from_slice::<Record>(old_value).is_ok_and(|r| r.source == Source::Api);
        if api && old_lease != 0 && old_lease != new_lease {
            self.revoke_later(old_lease);
        }
    }

    fn revoke_later(self: &Arc<Self>, lease: i64) {
        let me = Arc::clone(self);
        self.rt.spawn(async move {
            if let Ok(mut c) = me.client().await {
                let _ = me.timed("lease revoke", c.lease_revoke(lease)).await;
            }
        });
    }

    /// Renews an instance's TTL: one keep-alive of its lease.
    pub async fn heartbeat(self: &Arc<Self>, service: &str, id: &str) -> Result<(), WriteError> {
        let me = Arc::clone(self);
        let k = key(&self.cfg.prefix, service, id);
        self.on_rt(async move {
            let mut c = me.client().await.map_err(WriteError::Unavailable)?;
            let got = me
                .timed("get", c.get(k.as_str(), None))
                .await
                .map_err(WriteError::Unavailable)?;
            let lease = got.kvs().first().ok_or(WriteError::NotFound)?.lease();
            if lease == 0 {
                return Ok(()); // no TTL: nothing to renew
            }
            let (mut keeper, mut stream) = me
                .timed("lease keep-alive", c.lease_keep_alive(lease))
                .await
                .map_err(WriteError::Unavailable)?;
            me.timed("lease keep-alive", keeper.keep_alive())
                .await
                .map_err(WriteError::Unavailable)?;
            match me.timed("lease keep-alive", stream.message()).await {
                Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                Ok(_) => Err(WriteError::NotFound),
                Err(e) => Err(WriteError::Unavailable(e)),
            }
        })
        .await
    }

    /// Deregisters an instance.
    pub async fn deregister(self: &Arc<Self>, service: &str, id: &str) -> Result<(), WriteError> {
        let me = Arc::clone(self);
        let k = key(&self.cfg.prefix, service, id);
        self.on_rt(async move {
            let mut c = me.client().await.map_err(WriteError::Unavailable)?;
            let d = me
                .timed(
                    "delete",
                    c.delete(k.as_str(), Some(DeleteOptions::new().with_prev_key())),
                )
                .await
                .map_err(WriteError::Unavailable)?;
            if d.deleted() == 0 {
                return Err(WriteError::NotFound);
            }
            if let Some(prev) = d.prev_kvs().first() {
                me.revoke_replaced(prev.value(), prev.lease(), 0);
            }
            Ok(())
        })
        .await
    }
}

/// The admin API's answer for a failed write: 404 or 503 JSON.
pub fn error_reply(e: WriteError, service: &str, id: &str) -> (u16, serde_json::Value) {
    match e {
        WriteError::NotFound => (
            404,
            serde_json::json!({"error": "not_found", "message": format!("{service}/{id} is not registered")}),
        ),
        WriteError::Unavailable(m) => (
            503,
            serde_json::json!({"error": "registry_unavailable",
                "message": format!("the etcd registry did not take the change ({m}); nothing was changed, try again")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(addr: &str) -> Record {
        Record {
            address: addr.into(),
            labels: BTreeMap::from([("version".to_string(), "v1".to_string())]),
            state: State::Ready,
            ttl_ms: Some(5000),
            source: Source::Api,
            owner: "gw-1".into(),
        }
    }

    #[test]
    fn keys_round_trip() {
        let k = key("/portico", "catalog", "catalog-7");
        assert_eq!(k, "/portico/services/catalog/catalog-7");
        assert_eq!(parse_key("/portico", &k), Some(("catalog", "catalog-7")));
        // Ids with the node suffix of orchestrated replicas.
        let k = key("/a/b", "s", "s-1.host-12-ab");
        assert_eq!(parse_key("/a/b", &k), Some(("s", "s-1.host-12-ab")));
        // Other prefixes, nested paths, empty parts and foreign keys are not ours.
        assert_eq!(parse_key("/portico", "/porticox/services/a/b"), None);
        assert_eq!(parse_key("/portico", "/other/services/a/b"), None);
        assert_eq!(parse_key("/portico", "/portico/services/a/b/c"), None);
        assert_eq!(parse_key("/portico", "/portico/services/a/"), None);
        assert_eq!(parse_key("/portico", "/portico/services//b"), None);
        assert_eq!(parse_key("/portico", "/portico/services/a"), None);
        assert_eq!(parse_key("/portico", "/portico/leases/a/b"), None);
    }

    #[test]
    fn records_decode_and_reject_garbage() {
        let r = rec("127.0.0.1:8080");
        let v = serde_json::to_vec(&r).unwrap();
        let text = String::from_utf8(v.clone()).unwrap();
        assert!(text.contains("\"source\":\"api\""), "{text}");
        assert!(text.contains("\"state\":\"ready\""), "{text}");
        let (k, back) = decode("/p", b"/p/services/s/i", &v).unwrap();
        assert_eq!(k, ("s".to_string(), "i".to_string()));
        assert_eq!(back, r);
        // Minimal records: state defaults to ready, labels to none.
        let (_, m) = decode(
            "/p",
            b"/p/services/s/i",
            br#"{"address":"10.0.0.1:80","source":"orchestrator","owner":"n"}"#,
        )
        .unwrap();
        assert_eq!(m.state, State::Ready);
        assert!(m.labels.is_empty());
        assert!(decode("/p", b"/p/services/s/i", b"not json").is_none());
        assert!(decode("/p", b"/p/services/s/i", br#"{"labels":{}}"#).is_none());
        assert!(decode("/p", b"/q/services/s/i", &v).is_none());
    }

    #[test]
    fn diff_puts_changed_and_deletes_gone() {
        let k = |s: &str, i: &str| (s.to_string(), i.to_string());
        let old: Mirror = [
            (k("a", "1"), rec("127.0.0.1:1")),
            (k("a", "2"), rec("127.0.0.1:2")),
            (k("b", "1"), rec("127.0.0.1:3")),
        ]
        .into_iter()
        .collect();
        let mut draining = rec("127.0.0.1:2");
        draining.state = State::Draining;
        let new: Mirror = [
            (k("a", "1"), rec("127.0.0.1:1")),
            (k("a", "2"), draining.clone()),
            (k("c", "9"), rec("127.0.0.1:9")),
        ]
        .into_iter()
        .collect();
        let d = diff(&old, &new);
        assert_eq!(
            d,
            vec![
                Change::Delete("b".into(), "1".into()),
                Change::Put("a".into(), "2".into(), draining),
                Change::Put("c".into(), "9".into(), rec("127.0.0.1:9")),
            ]
        );
        assert!(diff(&new, &new).is_empty());
        // Applying the diff to a registry mirrors `new` exactly, and leaves other
        // sources' instances alone.
        let reg = Registry::default();
        let local =
            super::super::instance("b-1", "127.0.0.1:7", BTreeMap::new(), None, Source::Api)
                .unwrap();
        reg.upsert("b", local);
        for ch in diff(&Mirror::new(), &old) {
            apply(&reg, ch);
        }
        for ch in diff(&old, &new) {
            apply(&reg, ch);
        }
        let sel = super::super::selector::Selector::default();
        assert_eq!(reg.endpoints("a", &sel), vec!["127.0.0.1:1"]);
        assert_eq!(reg.endpoints("b", &sel), vec!["127.0.0.1:7"]);
        assert_eq!(reg.endpoints("c", &sel), vec!["127.0.0.1:9"]);
        // A delete for an id held by another source does not touch it.
        apply(&reg, Change::Delete("b".into(), "b-1".into()));
        assert_eq!(reg.endpoints("b", &sel), vec!["127.0.0.1:7"]);
    }

    #[test]
    fn config_checks() {
        assert!(check_endpoint("127.0.0.1:2379").is_ok());
        assert!(check_endpoint("http://etcd-0.etcd:2379").is_ok());
        assert!(check_endpoint("[::1]:2379").is_ok());
        assert!(check_endpoint("127.0.0.1").is_err());
        assert!(check_endpoint("127.0.0.1:0").is_err());
        assert!(check_endpoint("https://e:2379").is_err());
        assert!(check_endpoint(":2379").is_err());
        assert!(check_prefix("/portico").is_ok());
        assert!(check_prefix("/a/b-c").is_ok());
        for bad in ["", "/", "portico", "/portico/", "/a//b", "/a b"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
