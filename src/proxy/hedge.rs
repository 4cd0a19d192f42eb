//! Hedged requests: for an idempotent request without a body on a route with
//! `hedge: { delay }`, the gateway sends the request to one endpoint and, if no answer
//! came within `delay`, a second copy to another endpoint; the first good answer wins
//! and the other try is dropped (cancelled). The second try is taken from the
//! upstream's retry budget, so hedging cannot double the load of a slow upstream.
//! Answers are read whole (up to `max_body`), which is what makes the race possible.

use crate::aggregate::{one_try, TryError};
use crate::upstream::{Endpoint, Upstream};
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A winning answer, or why both tries failed.
pub enum Outcome {
    Answer(Box<ResponseHeader>, Bytes, Arc<Endpoint>),
    Failed(u16, &'static str, String),
}

async fn attempt(
    gw: &crate::gateway::Gateway,
    up: &Upstream,
    ep: Arc<Endpoint>,
    req: &RequestHeader,
    max: usize,
    timeout: Option<Duration>,
) -> (
    Result<(Box<ResponseHeader>, Bytes), TryError>,
    Arc<Endpoint>,
) {
    let peer = super::build_peer(up, &ep, timeout);
    ep.inflight.fetch_add(1, Ordering::Relaxed);
    up.inflight.fetch_add(1, Ordering::Relaxed);
    let fut = one_try(&gw.connector, &peer, req, &None, max);
    let r = match timeout {
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .unwrap_or(Err(TryError::Timeout)),
        None => fut.await,
    };
    ep.inflight.fetch_sub(1, Ordering::Relaxed);
    up.inflight.fetch_sub(1, Ordering::Relaxed);
    let (outcome, ok) = match &r {
        Ok((h, _)) if h.status.is_server_error() => ("http_5xx", false),
        Ok(_) => ("ok", true),
        Err(TryError::Connect(_)) => {
            up.connect_failed(&ep);
            ("connect_failure", false)
        }
        Err(TryError::Timeout) => ("timeout", false),
        Err(TryError::Reset(_)) | Err(TryError::TooLarge) => ("reset", false),
    };
    up.record_result(&ep, ok);
    gw.metrics
        .upstream_requests
        .with_label_values(&[&up.name, &ep.label, outcome])
        .inc();
    (r, ep)
}

fn good(r: &Result<(Box<ResponseHeader>, Bytes), TryError>) -> bool {
    matches!(r, Ok((h, _)) if !h.status.is_server_error())
}

fn failure(r: Result<(Box<ResponseHeader>, Bytes), TryError>, ep: Arc<Endpoint>) -> Outcome {
    match r {
        Ok((h, b)) => Outcome::Answer(h, b, ep),
        Err(TryError::Timeout) => Outcome::Failed(
            504,
            "upstream_timeout",
            "the upstream did not answer in time".into(),
        ),
        Err(TryError::TooLarge) => Outcome::Failed(
            502,
            "bad_gateway",
            "the answer is larger than the hedging buffer".into(),
        ),
        Err(TryError::Connect(e)) | Err(TryError::Reset(e)) => {
            Outcome::Failed(502, "bad_gateway", e)
        }
    }
}

/// Runs the hedged race from `first` (already picked).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    gw: &crate::gateway::Gateway,
    up: &Arc<Upstream>,
    first: usize,
    req: &RequestHeader,
    delay: Duration,
    max: usize,
    timeout: Option<Duration>,
) -> Outcome {
    let ep_a = Arc::clone(&up.endpoints[first]);
    let a = attempt(gw, up, ep_a, req, max, timeout);
    tokio::pin!(a);
    tokio::select! {
        (r, ep) = &mut a => {
            return failure(r, ep);
        }
        _ = tokio::time::sleep(delay) => {}
    }
    // No answer yet: a second try elsewhere, if the budget and an endpoint allow.
    let second = up
        .balancer
        .pick(&up.endpoints, None, &[first], up.breaker.as_ref())
        .filter(|_| up.budget.withdraw());
    let Some(j) = second else {
        let (r, ep) = a.await;
        return failure(r, ep);
    };
    gw.metrics
        .upstream_requests
        .with_label_values(&[&up.name, &up.endpoints[j].label, "hedge"])
        .inc();
    let b = attempt(gw, up, Arc::clone(&up.endpoints[j]), req, max, timeout);
    tokio::pin!(b);
    tokio::select! {
        (ra, ea) = &mut a => {
            if good(&ra) { return failure(ra, ea); }
            let (rb, eb) = b.await;
            if good(&rb) { failure(rb, eb) } else { failure(ra, ea) }
        }
        (rb, eb) = &mut b => {
            if good(&rb) { return failure(rb, eb); }
            let (ra, ea) = a.await;
            if good(&ra) { failure(ra, ea) } else { failure(rb, eb) }
        }
    }
}
