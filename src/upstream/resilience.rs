//! What keeps a failing upstream from taking the gateway (and itself) down: the
//! per-endpoint circuit breaker, the per-endpoint counters outlier detection reads, and
//! the per-upstream retry budget. All state is atomics on long-lived `Endpoint` and
//! `Upstream` values, so a reload that keeps them keeps their state too.

use super::now_ms;
use crate::config::model::{CircuitBreaker, RetryBudget};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};

/// Breaker state of one endpoint. `open_until == 0` means closed.
#[derive(Debug, Default)]
pub struct Breaker {
    /// While `now < open_until` the endpoint takes no requests; at or after it, the
    /// first request to claim the slot (moving `open_until` forward) is the trial.
    open_until: AtomicU64,
    open: AtomicBool,
    consecutive: AtomicU32,
    window_start: AtomicU64,
    window_total: AtomicU32,
    window_failed: AtomicU32,
}

impl Breaker {
    /// Whether a request may go to this endpoint now (claims the half-open trial).
    pub fn admits(&self, cfg: Option<&CircuitBreaker>) -> bool {
        if !self.open.load(Ordering::Relaxed) {
            return true;
        }
        let Some(cfg) = cfg else { return true };
        let until = self.open_until.load(Ordering::Relaxed);
        let now = now_ms();
        if now < until {
            return false;
        }
        // Half-open: one request gets through; the others wait for its verdict.
        let next = now + cfg.open_for.0.as_millis() as u64;
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Whether the breaker is open (or half-open).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Records a try's result; returns true when this result opened the breaker.
    pub fn record(&self, cfg: Option<&CircuitBreaker>, ok: bool) -> bool {
        let Some(cfg) = cfg else { return false };
        let now = now_ms();
        let window = cfg.window.0.as_millis() as u64;
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) > window {
            self.window_start.store(now, Ordering::Relaxed);
            self.window_total.store(0, Ordering::Relaxed);
            self.window_failed.store(0, Ordering::Relaxed);
        }
        let total = self.window_total.fetch_add(1, Ordering::Relaxed) + 1;
        if ok {
            self.consecutive.store(0, Ordering::Relaxed);
            if self.open.swap(false, Ordering::AcqRel) {
                self.open_until.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let failed = self.window_failed.fetch_add(1, Ordering::Relaxed) + 1;
        let streak = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let was_open = self.open.load(Ordering::Relaxed);
        let ratio_trip = cfg.failure_ratio.is_some_and(|r| {
            r.0 > 0.0 && total >= cfg.min_requests && failed as f64 / total as f64 >= r.0
        });
        if was_open || streak >= cfg.consecutive_failures || ratio_trip {
            // A failed trial re-opens; a trip opens.
            self.open_until
                .store(now + cfg.open_for.0.as_millis() as u64, Ordering::Relaxed);
            let opened = !self.open.swap(true, Ordering::AcqRel);
            if opened {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            return opened;
        }
        false
    }
}

/// Counters outlier detection reads and resets every interval.
#[derive(Debug, Default)]
pub struct OutlierStats {
    pub total: AtomicU32,
    pub errors: AtomicU32,
    /// How many times the endpoint was ejected (the ejection time grows with it).
    pub ejections: AtomicU32,
}

/// A token bucket in thousandths of a retry: every request deposits `ratio`, every
/// retry withdraws one, and `min_per_second` trickle in regardless.
#[derive(Debug)]
pub struct Budget {
    tokens: AtomicI64,
    last_refill: AtomicU64,
    per_request: i64,
    per_second: i64,
    cap: i64,
}

impl Budget {
    /// A full-floor budget.
    pub fn new(cfg: &RetryBudget) -> Budget {
        let per_second = i64::from(cfg.min_per_second) * 1000;
        Budget {
            tokens: AtomicI64::new(per_second),
            last_refill: AtomicU64::new(now_ms()),
            per_request: (cfg.ratio.0 * 1000.0) as i64,
            per_second,
            cap: (per_second * 2).max(10_000),
        }
    }

    /// Called once per client request sent to the upstream.
    pub fn deposit(&self) {
        self.add(self.per_request);
    }

    fn add(&self, n: i64) {
        let v = self.tokens.fetch_add(n, Ordering::Relaxed) + n;
        if v > self.cap {
            self.tokens.fetch_min(self.cap, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let now = now_ms();
        let last = self.last_refill.load(Ordering::Relaxed);
        if now > last + 100
            && self
                .last_refill
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.add(self.per_second * (now - last) as i64 / 1000);
        }
        if self.tokens.fetch_sub(1000, Ordering::AcqRel) >= 1000 {
            true
        } else {
            self.tokens.fetch_add(1000, Ordering::AcqRel);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::RatioValue;
    use crate::config::units::Dur;
    use std::time::Duration;

    fn cb(n: u32) -> CircuitBreaker {
        CircuitBreaker {
            consecutive_failures: n,
            failure_ratio: None,
            window: Dur(Duration::from_secs(10)),
            min_requests: 20,
            open_for: Dur(Duration::from_millis(50)),
            max_connections: 0,
            max_pending: 0,
        }
    }

    #[test]
    fn opens_half_opens_and_closes() {
        let c = cb(3);
        let b = Breaker::default();
        assert!(!b.record(Some(&c), false));
        assert!(!b.record(Some(&c), false));
        assert!(b.record(Some(&c), false));
        assert!(!b.admits(Some(&c)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.admits(Some(&c)), "trial admitted");
        assert!(!b.admits(Some(&c)), "only one trial");
        b.record(Some(&c), true);
        assert!(!b.is_open());
        assert!(b.admits(Some(&c)));
    }

    #[test]
    fn budget_limits_retries_to_ratio() {
        let budget = Budget::new(&RetryBudget {
            ratio: RatioValue(0.2),
            min_per_second: 0,
        });
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert!((195..=205).contains(&retries), "{retries}");
    }
}
