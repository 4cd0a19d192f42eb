//! The `fault` plugin: fault injection for resilience testing. For a share of the
//! requests (`percent`, a float from 0 to 100, default 100) it delays the request by a
//! fixed `duration` before it goes on (`delay`), and/or answers it itself with a
//! status and the gateway's JSON error body, code `fault_injected`, without reaching
//! the upstream (`abort`). Delay and abort are rolled independently, delay first, so a
//! request can be delayed and then aborted. With `header` only requests carrying that
//! header are eligible (with `header_value`, only those where one of its values is
//! exactly that), so a test client can opt in while other traffic is untouched.
//!
//! ```yaml
//! - fault:
//!     abort: { percent: 20, status: 503 }
//!     delay: { percent: 50, duration: 200ms }
//!     header: x-fault
//! ```
//!
//! The dice are a per-thread wyrand generator seeded from the standard library's
//! random hasher keys: cheap, lock-free and good enough for sampling shares.

use crate::units::Dur;
use crate::{Context, Factory, Flow, Plugin, Reply, RequestView};
use serde::Deserialize;
use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

fn hundred() -> f64 {
    100.0
}

/// `abort: { percent, status }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortSettings {
    #[serde(default = "hundred")]
    percent: f64,
    status: u16,
    #[serde(default)]
    message: Option<String>,
}

/// `delay: { percent, duration }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelaySettings {
    #[serde(default = "hundred")]
    percent: f64,
    duration: Dur,
}

/// The `fault` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    abort: Option<AbortSettings>,
    #[serde(default)]
    delay: Option<DelaySettings>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    header_value: Option<String>,
}

struct Abort {
    /// Probability in 0..=1.
    share: f64,
    status: u16,
    message: String,
}

struct Delay {
    share: f64,
    duration: Duration,
}

/// The `fault` plugin instance.
pub struct Fault {
    abort: Option<Abort>,
    delay: Option<Delay>,
    header: Option<http::HeaderName>,
    header_value: Option<http::HeaderValue>,
}

fn share(setting: &str, percent: f64) -> Result<f64, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!(
            "{setting}: must be a number from 0 to 100, got {percent}"
        ));
    }
    Ok(percent / 100.0)
}

impl Fault {
    fn new(s: Settings) -> Result<Fault, String> {
        if s.abort.is_none() && s.delay.is_none() {
            return Err(
                "set `abort: { percent, status }`, `delay: { percent, duration }` or both".into(),
            );
        }
        let abort = match s.abort {
            Some(a) => {
                if !(200..=599).contains(&a.status) {
                    return Err(format!(
                        "abort.status: must be an HTTP status from 200 to 599, got {}",
                        a.status
                    ));
                }
                Some(Abort {
                    share: share("abort.percent", a.percent)?,
                    status: a.status,
                    message: a
                        .message
                        .unwrap_or_else(|| "fault injected by the gateway".into()),
                })
            }
            None => None,
        };
        let delay = match s.delay {
            Some(d) => {
                if d.duration.0 > Duration::from_secs(3600) {
                    return Err("delay.duration: must be at most 1h".into());
                }
                Some(Delay {
                    share: share("delay.percent", d.percent)?,
                    duration: d.duration.0,
                })
            }
            None => None,
        };
        let header = match &s.header {
            Some(h) => Some(crate::util::header_name("header", h)?),
            None => None,
        };
        let header_value = match (&s.header_value, &header) {
            (Some(_), None) => return Err("header_value: needs `header`".into()),
            (Some(v), Some(_)) => Some(crate::util::header_value("header_value", v)?),
            (None, _) => None,
        };
        Ok(Fault {
            abort,
            delay,
            header,
            header_value,
        })
    }

    /// Whether this request may get a fault at all.
    fn eligible(&self, headers: &http::HeaderMap) -> bool {
        let Some(name) = &self.header else {
            return true;
        };
        match &self.header_value {
            None => headers.contains_key(name),
            Some(want) => headers.get_all(name).iter().any(|v| v == want),
        }
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let s = std::collections::hash_map::RandomState::new();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    s.hash_one(t) | 1
}

/// A uniform number in `[0, 1)` (wyrand).
fn uniform() -> f64 {
    RNG.with(|c| {
        let s = c.get().wrapping_add(0xa076_1d64_78bd_642f);
        c.set(s);
        let m = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        let r = ((m >> 64) as u64) ^ (m as u64);
        (r >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// True with probability `share` (0..=1).
fn roll(share: f64) -> bool {
    share >= 1.0 || (share > 0.0 && uniform() < share)
}

#[async_trait::async_trait]
impl Plugin for Fault {
    fn name(&self) -> &'static str {
        "fault"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        if !self.eligible(req.headers) {
            return Flow::Continue;
        }
        if let Some(d) = &self.delay {
            if roll(d.share) {
                tokio::time::sleep(d.duration).await;
            }
        }
        if let Some(a) = &self.abort {
            if roll(a.share) {
                return Flow::Respond(Reply::error(a.status, "fault_injected", &a.message, ctx));
            }
        }
        Flow::Continue
    }
}

/// Builds [`Fault`] from `- fault: { abort: {...}, delay: {...} }`.
pub struct FaultFactory;

impl Factory for FaultFactory {
    fn name(&self) -> &'static str {
        "fault"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(Fault::new(crate::settings(settings)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn settings_are_checked() {
        let err = |y: &str| build(y).err().unwrap();
        assert!(err("fault: {}").contains("abort"));
        assert!(err("fault: { abort: { percent: 101, status: 503 } }").contains("abort.percent"));
        assert!(err("fault: { abort: { percent: -1, status: 503 } }").contains("0 to 100"));
        assert!(err("fault: { abort: { percent: 5, status: 99 } }").contains("abort.status"));
        assert!(err("fault: { abort: { percent: 5 } }").contains("status"));
        assert!(err("fault: { delay: { percent: 5, duration: 2 } }").contains("duration"));
        assert!(err("fault: { delay: { percent: 5 } }").contains("duration"));
        assert!(err("fault: { delay: { duration: 1s, pct: 3 } }").contains("unknown field `pct`"));
        assert!(err("fault: { abort: { status: 503 }, header_value: x }").contains("header_value"));
        assert!(err("fault: { abort: { status: 503 }, header: 'a b' }").contains("header"));
        assert!(build("fault: { abort: { percent: 12.5, status: 503 } }").is_ok());
        assert!(build("fault: { delay: { percent: 0, duration: 1ms } }").is_ok());
        assert!(
            build("fault: { abort: { status: 418 }, header: x-fault, header_value: on }").is_ok()
        );
    }

    #[tokio::test]
    async fn always_aborts_at_100_percent() {
        let p = build("fault: { abort: { status: 503 } }").unwrap();
        let (f, _) = request(&*p, &Req::get("/"), &mut ctx()).await;
        let r = reply(f);
        assert_eq!(r.status, 503);
        let j: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(j["error"], "fault_injected");
        assert_eq!(j["request_id"], "req-1");
    }

    #[tokio::test]
    async fn never_at_0_percent() {
        let p = build("fault: { abort: { percent: 0, status: 503 } }").unwrap();
        for _ in 0..1000 {
            let (f, _) = request(&*p, &Req::get("/"), &mut ctx()).await;
            assert!(matches!(f, Flow::Continue));
        }
    }

    #[tokio::test]
    async fn share_is_about_right() {
        let p = build("fault: { abort: { percent: 20, status: 500 } }").unwrap();
        let mut n = 0;
        for _ in 0..20_000 {
            let (f, _) = request(&*p, &Req::get("/"), &mut ctx()).await;
            if matches!(f, Flow::Respond(_)) {
                n += 1;
            }
        }
        // 4000 expected; the standard deviation is about 57.
        assert!((3700..=4300).contains(&n), "{n}");
    }

    #[tokio::test]
    async fn header_gates_eligibility() {
        let p = build("fault: { abort: { status: 503 }, header: x-fault }").unwrap();
        let (f, _) = request(&*p, &Req::get("/"), &mut ctx()).await;
        assert!(matches!(f, Flow::Continue));
        let (f, _) = request(&*p, &Req::get("/").header("x-fault", "1"), &mut ctx()).await;
        assert_eq!(reply(f).status, 503);

        let p =
            build("fault: { abort: { status: 503 }, header: x-fault, header_value: on }").unwrap();
        let (f, _) = request(&*p, &Req::get("/").header("x-fault", "off"), &mut ctx()).await;
        assert!(matches!(f, Flow::Continue));
        let (f, _) = request(&*p, &Req::get("/").header("x-fault", "on"), &mut ctx()).await;
        assert_eq!(reply(f).status, 503);
    }

    #[tokio::test]
    async fn delays() {
        let p = build("fault: { delay: { duration: 50ms } }").unwrap();
        let t = std::time::Instant::now();
        let (f, _) = request(&*p, &Req::get("/"), &mut ctx()).await;
        assert!(matches!(f, Flow::Continue));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn uniform_is_in_range() {
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let u = uniform();
            assert!((0.0..1.0).contains(&u));
            sum += u;
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.02);
    }
}
