//! DNS discovery: an upstream with `discovery: { dns: ... }` gets its endpoints from
//! DNS, refreshed every `refresh`. `name:port` is resolved for A and AAAA records (a
//! headless service); a name starting with `_` is an SRV name whose records carry the
//! targets and ports. Results go into the registry under the service `dns:<spec>`, so
//! they reach routing through the usual compile-and-swap path.

use super::{instance, Registry, Source};
use crate::config::model::Discovery;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The registry service name DNS results are stored under.
pub fn service_name(d: &Discovery) -> String {
    format!("dns:{}", d.dns.as_deref().unwrap_or(""))
}

fn resolver(d: &Discovery) -> Result<TokioAsyncResolver, String> {
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0; // every refresh asks again
    opts.timeout = Duration::from_secs(2);
    match &d.resolver {
        Some(addr) => {
            let sa: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| format!("invalid resolver `{addr}` (expected IP:PORT)"))?;
            let group = NameServerConfigGroup::from_ips_clear(&[sa.ip()], sa.port(), true);
            Ok(TokioAsyncResolver::tokio(
                ResolverConfig::from_parts(None, vec![], group),
                opts,
            ))
        }
        None => {
            let (cfg, mut sys) = hickory_resolver::system_conf::read_system_conf()
                .unwrap_or_else(|_| (ResolverConfig::default(), ResolverOpts::default()));
            sys.cache_size = 0;
            sys.timeout = Duration::from_secs(2);
            Ok(TokioAsyncResolver::tokio(cfg, sys))
        }
    }
}

/// Resolves once: the `host:port` addresses.
pub async fn resolve_once(r: &TokioAsyncResolver, spec: &str) -> Result<Vec<String>, String> {
    if spec.starts_with('_') {
        let srv = r.srv_lookup(spec).await.map_err(|e| e.to_string())?;
        let mut out = vec![];
        for rec in srv.iter() {
            let target = rec.target().to_utf8();
            let target = target.trim_end_matches('.');
            let ips = r.lookup_ip(target).await.map_err(|e| e.to_string())?;
            for ip in ips.iter() {
                out.push(std::net::SocketAddr::new(ip, rec.port()).to_string());
            }
        }
        out.sort();
        out.dedup();
        return Ok(out);
    }
    let (host, port) = spec
        .rsplit_once(':')
        .ok_or_else(|| format!("`{spec}` needs a port (name:port) or must be an SRV name"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid port in `{spec}`"))?;
    let ips = r.lookup_ip(host).await.map_err(|e| e.to_string())?;
    let mut out: Vec<String> = ips
        .iter()
        .map(|ip| std::net::SocketAddr::new(ip, port).to_string())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Keeps the registry's `dns:<spec>` service in line with DNS while `owner` lives.
pub fn spawn<T: Send + Sync + 'static>(
    rt: &tokio::runtime::Handle,
    owner: &Arc<T>,
    d: Discovery,
    registry: Arc<Registry>,
) {
    let weak: Weak<T> = Arc::downgrade(owner);
    rt.spawn(async move {
        let Some(spec) = d.dns.clone() else { return };
        let r = match resolver(&d) {
            Ok(r) => r,
            Err(e) => {
                log::error!("dns discovery {spec}: {e}");
                return;
            }
        };
        let every = d.refresh.map(|x| x.0).unwrap_or(Duration::from_secs(5));
        let service = service_name(&d);
        loop {
            if weak.upgrade().is_none() {
                return;
            }
            match resolve_once(&r, &spec).await {
                Ok(addrs) => {
                    let insts = addrs
                        .iter()
                        .filter_map(|a| instance(a, a, BTreeMap::new(), None, Source::Dns).ok())
                        .collect();
                    registry.sync_source(Source::Dns, &service, insts);
                }
                // Keep the last good answer: a DNS hiccup must not empty an upstream.
                Err(e) => log::warn!("dns discovery {spec}: {e} (keeping the last answer)"),
            }
            tokio::time::sleep(every).await;
        }
    });
}
