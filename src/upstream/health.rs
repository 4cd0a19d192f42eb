//! Active HTTP health checks. Each upstream with a `health_check` gets one task on the
//! background runtime that holds only a `Weak` to it: when a reload drops the upstream
//! the task ends by itself. An endpoint turns unhealthy after `unhealthy_threshold`
//! failed probes in a row and healthy again after `healthy_threshold` good ones.

use super::{Endpoint, Upstream};
use crate::config::model::HealthCheck;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts the checker for `up` if it has a `health_check`.
pub fn spawn(rt: &tokio::runtime::Handle, up: &Arc<Upstream>) {
    let Some(hc) = up.health_check.clone() else {
        return;
    };
    let weak: Weak<Upstream> = Arc::downgrade(up);
    // TLS and HTTP/2 upstreams are probed like requests are sent: through Pingora's
    // connector with the upstream's own peer settings.
    let connector = (up.tls.is_some() || up.http_version.0 == 2)
        .then(|| Arc::new(pingora::connectors::http::Connector::new(None)));
    rt.spawn(async move {
        loop {
            let Some(up) = weak.upgrade() else { return };
            let probes = up.endpoints.iter().map(|ep| {
                let ep = Arc::clone(ep);
                let hc = hc.clone();
                let name = Arc::clone(&up.name);
                let via = connector
                    .clone()
                    .map(|c| (c, crate::proxy::build_peer(&up, &ep, Some(hc.timeout.0))));
                async move {
                    let ok = match via {
                        Some((c, peer)) => probe_peer(&c, &peer, &hc).await,
                        None => probe(&ep, &hc).await,
                    };
                    record(&name, &ep, &hc, ok);
                }
            });
            futures_join_all(probes).await;
            drop(up);
            tokio::time::sleep(hc.interval.0).await;
        }
    });
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

fn record(upstream: &str, ep: &Endpoint, hc: &HealthCheck, ok: bool) {
    let healthy = ep.healthy.load(Ordering::Relaxed);
    if ok == healthy {
        ep.hc_streak.store(0, Ordering::Relaxed);
        return;
    }
    let streak = ep.hc_streak.fetch_add(1, Ordering::Relaxed) + 1;
    let threshold = if healthy {
        hc.unhealthy_threshold
    } else {
        hc.healthy_threshold
    };
    if streak >= threshold.max(1) {
        ep.healthy.store(ok, Ordering::Relaxed);
        ep.hc_streak.store(0, Ordering::Relaxed);
        if ok {
            // A recovered endpoint is no longer passively ejected either.
            ep.ejected_until.store(0, Ordering::Relaxed);
            log::info!(
                "upstream {upstream}: endpoint {} is healthy again",
                ep.label
            );
        } else {
            log::warn!(
                "upstream {upstream}: endpoint {} is unhealthy after {streak} failed checks",
                ep.label
            );
        }
    }
}

/// A probe over Pingora's connector (TLS, h2, h2c upstreams).
async fn probe_peer(
    c: &pingora::connectors::http::Connector,
    peer: &pingora::upstreams::peer::HttpPeer,
    hc: &HealthCheck,
) -> bool {
    let fut = async {
        let (mut s, _) = c.get_http_session(peer).await.ok()?;
        let mut req = pingora::http::RequestHeader::build("GET", hc.path.as_bytes(), None).ok()?;
        let host = hc.host.clone().unwrap_or_else(|| peer._address.to_string());
        req.insert_header(http::header::HOST, host).ok()?;
        req.insert_header(http::header::USER_AGENT, "portico-health-check")
            .ok()?;
        s.write_request_header(Box::new(req)).await.ok()?;
        s.finish_request_body().await.ok()?;
        s.read_response_header().await.ok()?;
        let status = s.response_header()?.status.as_u16();
        while let Ok(Some(_)) = s.read_response_body().await {}
        Some((200..400).contains(&status))
    };
    matches!(
        tokio::time::timeout(hc.timeout.0.max(Duration::from_millis(1)), fut).await,
        Ok(Some(true))
    )
}

/// Where a probe goes.
pub struct ProbeTarget {
    pub addr: std::net::SocketAddr,
    /// Host header.
    pub host: String,
}

/// One probe of an upstream endpoint.
pub async fn probe(ep: &Endpoint, hc: &HealthCheck) -> bool {
    let t = ProbeTarget {
        addr: ep.addr,
        host: hc.host.clone().unwrap_or_else(|| ep.label.clone()),
    };
    probe_target(&t, &hc.path, hc.timeout.0).await
}

/// `GET path` over a new connection; any 2xx or 3xx within `timeout` is healthy.
pub async fn probe_target(t: &ProbeTarget, path: &str, timeout: Duration) -> bool {
    let fut = async {
        let mut s = TcpStream::connect(t.addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: portico-health-check\r\nConnection: close\r\n\r\n",
            t.host
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut buf[n..]).await.ok()?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code: u16 = line.get(9..12)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(
        tokio::time::timeout(timeout.max(Duration::from_millis(1)), fut).await,
        Ok(Some(true))
    )
}
