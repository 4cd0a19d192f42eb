//! The embedded service registry: services -> instances (id, address, labels, state,
//! TTL, last heartbeat). It is fed by the admin API, the orchestrator, DNS discovery and
//! static config entries, each owning its own instances. Every change that alters what
//! upstreams would route to bumps a `watch` channel; the gateway listens and recompiles
//! its snapshot through the same compile-and-swap path as a config reload.

pub mod dns;
pub mod etcd;
pub mod selector;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

/// Who registered an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Api,
    Orchestrator,
    Static,
    Dns,
    /// Mirrored from the shared etcd registry (written there by any gateway).
    Etcd,
}

/// Whether an instance takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Ready,
    /// Registered but not taking new requests (being drained).
    Draining,
}

/// One instance of a service.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub state: State,
    pub ttl: Option<Duration>,
    pub last_heartbeat: Instant,
    pub source: Source,
}

impl Instance {
    fn same_routing(&self, o: &Instance) -> bool {
        self.address == o.address && self.labels == o.labels && self.state == o.state
    }
}

/// The registry.
pub struct Registry {
    services: RwLock<BTreeMap<String, BTreeMap<String, Instance>>>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The shared backend (`registry.backend: etcd`), set once at start.
    shared: OnceLock<Arc<etcd::Etcd>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            services: RwLock::new(BTreeMap::new()),
            changed: tokio::sync::watch::channel(0).0,
            shared: OnceLock::new(),
        }
    }
}

impl Registry {
    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// A receiver that sees every routing-relevant change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Adds or replaces an instance; returns whether routing changed.
    pub fn upsert(&self, service: &str, inst: Instance) -> bool {
        let changed = {
            let mut g = self.services.write().unwrap_or_else(|e| e.into_inner());
            let svc = g.entry(service.to_string()).or_default();
            let changed = svc.get(&inst.id).is_none_or(|old| !old.same_routing(&inst));
            svc.insert(inst.id.clone(), inst);
            changed
        };
        if changed {
            self.bump();
        }
        changed
    }

    /// Renews an instance's TTL; false if it is not registered.
    pub fn heartbeat(&self, service: &str, id: &str) -> bool {
        let mut g = self.services.write().unwrap_or_else(|e| e.into_inner());
        match g.get_mut(service).and_then(|s| s.get_mut(id)) {
            Some(i) => {
                i.last_heartbeat = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Sets an instance's state (draining instances get no new requests).
    pub fn set_state(&self, service: &str, id: &str, state: State) {
        let changed = {
            let mut g = self.services.write().unwrap_or_else(|e| e.into_inner());
            match g.get_mut(service).and_then(|s| s.get_mut(id)) {
                Some(i) if i.state != state => {
                    i.state = state;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.bump();
        }
    }

    /// The shared etcd backend, when `registry.backend` is `etcd`: admin API writes go
    /// there instead of into this registry (which mirrors it).
    pub fn shared(&self) -> Option<&Arc<etcd::Etcd>> {
        self.shared.get()
    }

    /// Installs the shared backend (once).
    pub fn set_shared(&self, e: Arc<etcd::Etcd>) {
        let _ = self.shared.set(e);
    }

    /// Adds an instance this gateway runs itself (an orchestrated replica): here, and
    /// in the shared backend (under this gateway's lease) when there is one.
    pub fn upsert_owned(&self, service: &str, inst: Instance) -> bool {
        if let Some(e) = self.shared() {
            e.publish(service, &inst);
        }
        self.upsert(service, inst)
    }

    /// `set_state` for an instance this gateway runs itself.
    pub fn set_state_owned(&self, service: &str, id: &str, state: State) {
        if let Some(e) = self.shared() {
            e.publish_state(service, id, state);
        }
        self.set_state(service, id, state);
    }

    /// `remove` for an instance this gateway runs itself.
    pub fn remove_owned(&self, service: &str, id: &str) -> Option<Instance> {
        if let Some(e) = self.shared() {
            e.unpublish(service, id);
        }
        self.remove(service, id)
    }

    /// Deregisters an instance, if `source` registered it.
    pub fn remove_from(&self, source: Source, service: &str, id: &str) -> Option<Instance> {
        let owned = {
            let g = self.services.read().unwrap_or_else(|e| e.into_inner());
            g.get(service)
                .and_then(|s| s.get(id))
                .is_some_and(|i| i.source == source)
        };
        if owned {
            self.remove(service, id)
        } else {
            None
        }
    }

    /// Deregisters an instance.
    pub fn remove(&self, service: &str, id: &str) -> Option<Instance> {
        let removed = {
            let mut g = self.services.write().unwrap_or_else(|e| e.into_inner());
            let r = g.get_mut(service).and_then(|s| s.remove(id));
            if g.get(service).is_some_and(|s| s.is_empty()) {
                g.remove(service);
            }
            r
        };
        if removed.is_some() {
            self.bump();
        }
        removed
    }

    /// Makes `instances` the complete set owned by `source` for `service`.
    pub fn sync_source(&self, source: Source, service: &str, instances: Vec<Instance>) {
        let changed = {
            let mut g = self.services.write().unwrap_or_else(|e| e.into_inner());
            let svc = g.entry(service.to_string()).or_default();
            let mut changed = false;
            let keep: std::collections::HashSet<String> =
                instances.iter().map(|i| i.id.clone()).collect();
            svc.retain(|id, i| {
                let stay = i.source != source || keep.contains(id);
                changed |= !stay;
                stay
            });
            for inst in instances {
                changed |= svc.get(&inst.id).is_none_or(|o| !o.same_routing(&inst));
                svc.insert(inst.id.clone(), inst);
            }
            if svc.is_empty() {
                g.remove(service);
            }
            changed
        };
        if changed {
            self.bump();
        }
    }

    /// Removes every static instance of services not in `keep`.
    pub fn drop_static_except(&self, keep: &[String]) {
        let services: Vec<String> = {
            let g = self.services.read().unwrap_or_else(|e| e.into_inner());
            g.keys().filter(|s| !keep.contains(s)).cloned().collect()
        };
        for s in services {
            self.sync_source(Source::Static, &s, vec![]);
        }
    }

    /// Removes instances whose TTL lapsed; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let n = {
            let mut g = self.services.write().unwrap_or_else(|e| e.into_inner());
            let mut n = 0;
            for svc in g.values_mut() {
                svc.retain(|_, i| {
                    let alive = i
                        .ttl
                        .is_none_or(|t| now.duration_since(i.last_heartbeat) <= t);
                    if !alive {
                        log::info!("registry: instance {} ({}) expired", i.id, i.address);
                        n += 1;
                    }
                    alive
                });
            }
            g.retain(|_, s| !s.is_empty());
            n
        };
        if n > 0 {
            self.bump();
        }
        n
    }

    /// Ready instances of `service` matching `sel`, as (address, label text) sorted by id.
    pub fn endpoints(&self, service: &str, sel: &selector::Selector) -> Vec<String> {
        let g = self.services.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = g
            .get(service)
            .map(|s| {
                s.values()
                    .filter(|i| i.state == State::Ready && sel.matches(&i.labels))
                    .map(|i| i.address.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.dedup();
        v
    }

    /// The registry as JSON for the admin API.
    pub fn to_json(&self) -> serde_json::Value {
        let g = self.services.read().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut out = serde_json::Map::new();
        for (name, svc) in g.iter() {
            let insts: Vec<serde_json::Value> = svc
                .values()
                .map(|i| {
                    serde_json::json!({
                        "id": i.id,
                        "address": i.address,
                        "labels": i.labels,
                        "state": i.state,
                        "source": i.source,
                        "ttl_ms": i.ttl.map(|t| t.as_millis() as u64),
                        "since_heartbeat_ms": now.duration_since(i.last_heartbeat).as_millis() as u64,
                    })
                })
                .collect();
            out.insert(name.clone(), serde_json::json!({ "instances": insts }));
        }
        serde_json::Value::Object(out)
    }

    /// (service, state, count) for the `portico_registry_instances` gauge.
    pub fn counts(&self) -> Vec<(String, &'static str, i64)> {
        let g = self.services.read().unwrap_or_else(|e| e.into_inner());
        let mut out = vec![];
        for (name, svc) in g.iter() {
            let ready = svc.values().filter(|i| i.state == State::Ready).count() as i64;
            let draining = svc.len() as i64 - ready;
            out.push((name.clone(), "ready", ready));
            out.push((name.clone(), "draining", draining));
        }
        out
    }
}

/// Builds an instance, resolving its address.
pub fn instance(
    id: &str,
    address: &str,
    labels: BTreeMap<String, String>,
    ttl: Option<Duration>,
    source: Source,
) -> Result<Instance, String> {
    crate::config::validate::resolve(address)
        .ok_or_else(|| format!("invalid address `{address}` (expected host:port)"))?;
    Ok(Instance {
        id: id.to_string(),
        address: address.to_string(),
        labels,
        state: State::Ready,
        ttl,
        last_heartbeat: Instant::now(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_expiry_and_change_detection() {
        let r = Registry::default();
        let rx = r.subscribe();
        let i = instance(
            "a",
            "127.0.0.1:1",
            BTreeMap::new(),
            Some(Duration::from_millis(20)),
            Source::Api,
        )
        .unwrap();
        assert!(r.upsert("svc", i.clone()));
        assert!(!r.upsert("svc", i), "same instance again is not a change");
        assert_eq!(
            r.endpoints("svc", &selector::Selector::default()),
            vec!["127.0.0.1:1"]
        );
        assert!(r.heartbeat("svc", "a"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(r.expire(), 1);
        assert!(r
            .endpoints("svc", &selector::Selector::default())
            .is_empty());
        assert!(rx.has_changed().unwrap());
    }
}
