//! Outlier detection: every `interval`, each endpoint's 5xx rate is compared with the
//! mean of its peers'. One far above (by `factor`, and at least `min_rate`) is ejected
//! for `base_ejection` times the number of its ejections so far, while no more than
//! `max_ejection_percent` of the upstream is ejected at once. Like the health checker,
//! the task holds a `Weak` and ends when a reload drops the upstream.

use super::{now_ms, Upstream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// Starts outlier detection for `up` if configured.
pub fn spawn(rt: &tokio::runtime::Handle, up: &Arc<Upstream>) {
    let Some(cfg) = up.outlier.clone() else {
        return;
    };
    let weak: Weak<Upstream> = Arc::downgrade(up);
    rt.spawn(async move {
        loop {
            tokio::time::sleep(cfg.interval.0).await;
            let Some(up) = weak.upgrade() else { return };
            sweep(&up);
        }
    });
}

/// One detection round.
pub fn sweep(up: &Upstream) {
    let Some(cfg) = &up.outlier else { return };
    let now = now_ms();
    let stats: Vec<(u32, u32)> = up
        .endpoints
        .iter()
        .map(|e| {
            (
                e.outlier.total.swap(0, Ordering::Relaxed),
                e.outlier.errors.swap(0, Ordering::Relaxed),
            )
        })
        .collect();
    let n = up.endpoints.len();
    let max_ejected = (n * cfg.max_ejection_percent as usize) / 100;
    let mut ejected = up
        .endpoints
        .iter()
        .filter(|e| e.ejected_until.load(Ordering::Relaxed) > now)
        .count();
    for (i, ep) in up.endpoints.iter().enumerate() {
        let (total, errors) = stats[i];
        if total < cfg.min_requests {
            continue;
        }
        let rate = errors as f64 / total as f64;
        let peers: Vec<f64> = stats
            .iter()
            .enumerate()
            .filter(|(j, (t, _))| *j != i && *t > 0)
            .map(|(_, (t, e))| *e as f64 / *t as f64)
            .collect();
        let mean = if peers.is_empty() {
            0.0
        } else {
            peers.iter().sum::<f64>() / peers.len() as f64
        };
        let outlier = !peers.is_empty() && rate >= cfg.min_rate.0 && rate >= mean * cfg.factor.0;
        if !outlier {
            // Good behaviour slowly forgives past ejections.
            let _ = ep
                .outlier
                .ejections
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| x.checked_sub(1));
            continue;
        }
        if ep.ejected_until.load(Ordering::Relaxed) > now {
            continue;
        }
        if ejected >= max_ejected {
            log::warn!(
                "upstream {}: {} is an outlier ({:.0}% 5xx vs {:.0}%) but {ejected} of {n} endpoints are already ejected",
                up.name,
                ep.label,
                rate * 100.0,
                mean * 100.0
            );
            continue;
        }
        let k = ep.outlier.ejections.fetch_add(1, Ordering::Relaxed) as u64 + 1;
        let dur = cfg.base_ejection.0.as_millis() as u64 * k;
        ep.ejected_until.store(now + dur, Ordering::Relaxed);
        ejected += 1;
        log::warn!(
            "upstream {}: ejected outlier {} for {dur} ms ({:.0}% 5xx vs peers' {:.0}%)",
            up.name,
            ep.label,
            rate * 100.0,
            mean * 100.0
        );
    }
}
