//! The `ip_filter` plugin: allows or denies requests by client address (`ctx.client_ip`,
//! which the gateway resolves through `trusted_proxies`). `allow` and `deny` are lists
//! of CIDRs (IPv4 or IPv6; a plain address is a single host). `deny` wins; when `allow`
//! is not empty, anything it does not cover is denied. IPv4-mapped IPv6 addresses
//! (`::ffff:192.0.2.1`) are checked as the IPv4 address they carry. A refusal is a 403.

use crate::{Context, Factory, Flow, Plugin, Reply, RequestView};
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;
use std::sync::Arc;

/// The `ip_filter` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// The `ip_filter` plugin instance.
pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

/// Builds [`IpFilter`] instances.
pub struct IpFilterFactory;

impl Factory for IpFilterFactory {
    fn name(&self) -> &'static str {
        "ip_filter"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(IpFilter::new(crate::settings(settings)?)?))
    }
}

/// Parses `10.0.0.0/8`, `2001:db8::/32`, or a plain address (a single host).
pub fn parse_net(setting: &str, s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    t.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{setting}: {s:?} is not an IP address or CIDR"))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl IpFilter {
    fn new(s: Settings) -> Result<IpFilter, String> {
        if s.allow.is_empty() && s.deny.is_empty() {
            return Err("set allow and/or deny (lists of CIDRs)".into());
        }
        let allow = s
            .allow
            .iter()
            .map(|n| parse_net("allow", n))
            .collect::<Result<_, _>>()?;
        let deny = s
            .deny
            .iter()
            .map(|n| parse_net("deny", n))
            .collect::<Result<_, _>>()?;
        Ok(IpFilter { allow, deny })
    }

    /// Whether `ip` may pass.
    pub fn permits(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip.map(canonical) else {
            return self.allow.is_empty();
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

#[async_trait::async_trait]
impl Plugin for IpFilter {
    fn name(&self) -> &'static str {
        "ip_filter"
    }

    async fn on_request(&self, _req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        if self.permits(ctx.client_ip) {
            Flow::Continue
        } else {
            let msg = match ctx.client_ip {
                Some(ip) => format!("client address {ip} is not allowed"),
                None => "client address unknown".to_string(),
            };
            Flow::Respond(Reply::error(403, "forbidden", &msg, ctx))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn f(yaml: &str) -> IpFilter {
        IpFilter::new(crate::settings(&serde_yaml::from_str(yaml).unwrap()).unwrap()).unwrap()
    }
    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn allow_and_deny() {
        let x = f("allow: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7]\ndeny: [10.1.0.0/16, '2001:db8:bad::1']");
        assert!(x.permits(ip("10.2.3.4")));
        assert!(!x.permits(ip("10.1.2.3")), "deny wins");
        assert!(x.permits(ip("192.0.2.7")));
        assert!(!x.permits(ip("192.0.2.8")), "plain address = one host");
        assert!(x.permits(ip("2001:db8::5")));
        assert!(!x.permits(ip("2001:db8:bad::1")));
        assert!(x.permits(ip("2001:db8:bad::2")));
        assert!(!x.permits(ip("::1")));
        assert!(!x.permits(ip("8.8.8.8")));
        assert!(x.permits(ip("::ffff:10.2.3.4")), "mapped IPv4");
        assert!(!x.permits(None));
        let d = f("deny: ['::1', 127.0.0.2]");
        assert!(!d.permits(ip("::1")));
        assert!(!d.permits(ip("127.0.0.2")));
        assert!(d.permits(ip("127.0.0.1")));
        assert!(d.permits(None));
        // Host bits in a CIDR are ignored.
        let h = f("allow: [10.1.2.3/8]");
        assert!(h.permits(ip("10.200.0.1")));
    }

    #[tokio::test]
    async fn refusal_is_403() {
        let p = build("ip_filter: { deny: [127.0.0.1] }").unwrap();
        let r = reply(request(&*p, &Req::get("/"), &mut ctx()).await.0);
        assert_eq!(r.status, 403);
        assert!(String::from_utf8_lossy(&r.body).contains("\"forbidden\""));
        let p = build("ip_filter: { allow: [127.0.0.1] }").unwrap();
        assert!(matches!(
            request(&*p, &Req::get("/"), &mut ctx()).await.0,
            Flow::Continue
        ));
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("ip_filter: {}").contains("allow and/or deny"));
        assert!(e("ip_filter: { allow: [10.0.0.0/33] }").contains("not an IP"));
        assert!(e("ip_filter: { deny: [example.com] }").contains("deny"));
    }
}
