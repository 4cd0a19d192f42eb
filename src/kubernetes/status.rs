//! Ingress status: after each applied cluster state, every Ingress Portico serves gets
//! `status.loadBalancer.ingress` set to the configured `kubernetes.status_address` (an
//! IP becomes `ip`, anything else `hostname`), with a JSON merge patch to the `status`
//! subresource. An Ingress whose status already says so is left alone, and one patch
//! per object version is sent at most, so the watch event a patch causes does not cause
//! another. Patches run on a background task, one at a time, in the order asked; a
//! failed patch is logged and tried again at the next apply.

use super::objects::{ClusterState, Key};
use crate::config::model::{Config, Kubernetes};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, Patch, PatchParams};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// One wanted patch: the Ingress, the resourceVersion it was computed from, the body.
struct Job {
    key: Key,
    version: String,
    body: serde_json::Value,
}

/// Writes Ingress statuses (does nothing without `status_address`).
pub struct StatusWriter {
    address: Option<String>,
    tx: Option<mpsc::UnboundedSender<Job>>,
    /// Ingress -> the resourceVersion a patch was last sent for.
    sent: Arc<Mutex<BTreeMap<Key, String>>>,
}

/// The Ingresses Portico serves: those the translation made at least one route of
/// (routes are named `ingress/NS/NAME/...`) in the running config.
fn served_ingresses(config: &Config) -> BTreeSet<Key> {
    config
        .routes
        .iter()
        .filter_map(|r| {
            let mut parts = r.name.strip_prefix("ingress/")?.splitn(3, '/');
            let ns = parts.next()?;
            let name = parts.next()?;
            parts.next()?;
            Some((ns.to_string(), name.to_string()))
        })
        .collect()
}

/// The `status.loadBalancer.ingress` entry for `address`.
pub fn load_balancer_entry(address: &str) -> serde_json::Value {
    if address.parse::<std::net::IpAddr>().is_ok() {
        serde_json::json!({ "ip": address })
    } else {
        serde_json::json!({ "hostname": address })
    }
}

impl StatusWriter {
    /// A writer that patches through `client` on `rt`.
    pub fn new(client: kube::Client, k: &Kubernetes, rt: tokio::runtime::Handle) -> StatusWriter {
        let sent: Arc<Mutex<BTreeMap<Key, String>>> = Arc::default();
        let Some(address) = k.status_address.clone() else {
            return StatusWriter {
                address: None,
                tx: None,
                sent,
            };
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let forget = Arc::clone(&sent);
        rt.spawn(async move {
            while let Some(job) = rx.recv().await {
                let (ns, name) = &job.key;
                let api: Api<Ingress> = Api::namespaced(client.clone(), ns);
                match api
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&job.body))
                    .await
                {
                    Ok(_) => log::info!("kubernetes: Ingress {ns}/{name} status updated"),
                    Err(e) => {
                        log::warn!("kubernetes: Ingress {ns}/{name} status not updated: {e}");
                        let mut sent = forget.lock().unwrap_or_else(|e| e.into_inner());
                        if sent.get(&job.key) == Some(&job.version) {
                            sent.remove(&job.key);
                        }
                    }
                }
            }
        });
        StatusWriter {
            address: Some(address),
            tx: Some(tx),
            sent,
        }
    }

    /// Queues the patches `state` needs once it is applied as `config`.
    pub fn update(&self, config: &Config, state: &ClusterState) {
        let (Some(address), Some(tx)) = (&self.address, &self.tx) else {
            return;
        };
        let want = serde_json::Value::Array(vec![load_balancer_entry(address)]);
        let served = served_ingresses(config);
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.retain(|k, _| state.ingresses.contains_key(k));
        for key in served {
            let Some(ing) = state.ingresses.get(&key) else {
                continue;
            };
            let have = ing
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| serde_json::to_value(&lb.ingress).ok())
                .unwrap_or(serde_json::Value::Null);
            if have == want {
                continue;
            }
            let version = ing.metadata.resource_version.clone().unwrap_or_default();
            if sent.get(&key) == Some(&version) {
                continue;
            }
            sent.insert(key.clone(), version.clone());
            let body = serde_json::json!({ "status": { "loadBalancer": { "ingress": want } } });
            let _ = tx.send(Job { key, version, body });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_from_route_names() {
        let cfg: Config = crate::config::load_str(
            "t.yaml",
            "listeners: [{name: w, bind: '127.0.0.1:1'}]\nroutes:\n\
             - {name: ingress/ns/a/rule-0/path-0, match: {path_prefix: /a}, respond: {status: 200}}\n\
             - {name: ingress/ns/a/default, match: {path_prefix: /}, respond: {status: 200}}\n\
             - {name: httproute/ns/b/rule-0/match-0, match: {path_prefix: /b}, respond: {status: 200}}\n\
             - {name: ingress-like, match: {path_prefix: /c}, respond: {status: 200}}\n",
        )
        .map(|(c, _)| c)
        .unwrap();
        let served: Vec<Key> = served_ingresses(&cfg).into_iter().collect();
        assert_eq!(served, vec![("ns".to_string(), "a".to_string())]);
    }

    #[test]
    fn ip_or_hostname() {
        assert_eq!(load_balancer_entry("10.0.0.7")["ip"], "10.0.0.7");
        assert_eq!(load_balancer_entry("2001:db8::1")["ip"], "2001:db8::1");
        assert_eq!(
            load_balancer_entry("lb.example.com")["hostname"],
            "lb.example.com"
        );
    }
}
