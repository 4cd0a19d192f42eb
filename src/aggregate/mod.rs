//! Request aggregation (scatter/gather): one client request becomes several upstream
//! calls whose JSON answers come back as one object keyed by call name. Calls form a
//! DAG through `depends_on` (a cycle is a config error) and run with as much
//! parallelism as the DAG and the limits allow. Each call goes through the same
//! machinery as proxied requests: the upstream's balancer, health, circuit breaker,
//! timeouts, the route's retry policy and the retry budget, over Pingora's connector.
//! A failing optional call gives `null` plus an `_errors` entry; a failing required
//! call fails the whole answer with 502 (504 on a timeout) naming the call.

pub mod template;

use crate::config::model::{self, Aggregate, Select};
use crate::snapshot::RetryPolicy;
use crate::upstream::Upstream;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use template::{Escape, Inputs, Template, Var};

/// A compiled call.
#[derive(Debug)]
pub struct Call {
    pub name: String,
    pub upstream: String,
    pub method: http::Method,
    pub path: Template,
    /// The query part written inside `path` (after `?`), as (key, value) templates.
    pub query: Vec<(String, Template)>,
    pub headers: Vec<(http::HeaderName, Template)>,
    pub body: Option<BodyTemplate>,
    pub depends_on: Vec<usize>,
    pub select: Option<Select>,
    pub optional: bool,
    pub timeout: Option<Duration>,
    pub forward: Vec<http::HeaderName>,
}

/// A JSON body whose strings are templates.
#[derive(Debug)]
pub enum BodyTemplate {
    Str(Template),
    Arr(Vec<BodyTemplate>),
    Obj(Vec<(String, BodyTemplate)>),
    Lit(Value),
}

/// A compiled aggregation.
#[derive(Debug)]
pub struct Compiled {
    pub calls: Vec<Call>,
    pub timeout: Duration,
    pub max_response_size: usize,
    pub max_concurrency: usize,
}

type Errs = Vec<(String, String)>;

fn body_template(
    v: &serde_yaml::Value,
    known: &dyn Fn(&Var) -> Result<(), String>,
) -> Result<BodyTemplate, String> {
    Ok(match v {
        serde_yaml::Value::String(s) => BodyTemplate::Str(Template::parse(s, known)?),
        serde_yaml::Value::Sequence(a) => BodyTemplate::Arr(
            a.iter()
                .map(|x| body_template(x, known))
                .collect::<Result<_, _>>()?,
        ),
        serde_yaml::Value::Mapping(m) => BodyTemplate::Obj(
            m.iter()
                .map(|(k, v)| {
                    Ok((
                        k.as_str().unwrap_or_default().to_string(),
                        body_template(v, known)?,
                    ))
                })
                .collect::<Result<_, String>>()?,
        ),
        other => BodyTemplate::Lit(serde_json::to_value(other).map_err(|e| e.to_string())?),
    })
}

impl Compiled {
    /// Compiles and checks an `aggregate` block; errors come as (path suffix, message).
    pub fn compile(
        agg: &Aggregate,
        route_params: &[String],
        upstream_exists: &dyn Fn(&str) -> bool,
    ) -> Result<Compiled, Errs> {
        let mut errs: Errs = vec![];
        let names: Vec<&String> = agg.calls.keys().collect();
        if names.is_empty() {
            errs.push((
                ".calls".into(),
                "an aggregation needs at least one call".into(),
            ));
        }
        let index = |n: &str| names.iter().position(|x| x.as_str() == n);
        let default_forward = agg
            .forward_headers
            .clone()
            .unwrap_or_else(|| vec!["authorization".into()]);
        let mut calls = vec![];
        for (name, c) in &agg.calls {
            let p = format!(".calls.{name}");
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                || name.starts_with('_')
            {
                errs.push((
                    p.clone(),
                    format!(
                        "call name `{name}` must be letters, digits, - and _ (not starting with _)"
                    ),
                ));
            }
            if !upstream_exists(&c.upstream) {
                errs.push((
                    format!("{p}.upstream"),
                    format!("unknown upstream `{}`", c.upstream),
                ));
            }
            let mut deps = vec![];
            for d in &c.depends_on {
                match index(d) {
                    Some(i) => deps.push(i),
                    None => errs.push((format!("{p}.depends_on"), format!("unknown call `{d}`"))),
                }
            }
            let known = |v: &Var| -> Result<(), String> {
                match v {
                    Var::Param(n) if !route_params.contains(n) => Err(format!(
                        "`{{{n}}}` is not a parameter of the route's path (have: {})",
                        if route_params.is_empty() {
                            "none".to_string()
                        } else {
                            route_params.join(", ")
                        }
                    )),
                    Var::Call(call, _) if !c.depends_on.contains(call) => Err(format!(
                        "`{}` uses call `{call}`, which must be listed in depends_on",
                        template::describe(v)
                    )),
                    _ => Ok(()),
                }
            };
            let (path_part, query_part) = match c.path.split_once('?') {
                Some((a, b)) => (a, Some(b)),
                None => (c.path.as_str(), None),
            };
            if !path_part.starts_with('/') {
                errs.push((format!("{p}.path"), "path must start with /".into()));
            }
            let path = Template::parse(path_part, &known).unwrap_or_else(|e| {
                errs.push((format!("{p}.path"), e));
                Template::default()
            });
            let mut query = vec![];
            for pair in query_part
                .unwrap_or("")
                .split('&')
                .filter(|s| !s.is_empty())
            {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                match Template::parse(v, &known) {
                    Ok(t) => query.push((k.to_string(), t)),
                    Err(e) => errs.push((format!("{p}.path"), e)),
                }
            }
            for (k, v) in &c.query {
                match Template::parse(v, &known) {
                    Ok(t) => query.push((k.clone(), t)),
                    Err(e) => errs.push((format!("{p}.query.{k}"), e)),
                }
            }
            let mut headers = vec![];
            for (k, v) in &c.headers {
                match (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    Template::parse(v, &known),
                ) {
                    (Ok(n), Ok(t)) => headers.push((n, t)),
                    (Err(_), _) => errs.push((
                        format!("{p}.headers.{k}"),
                        format!("invalid header name `{k}`"),
                    )),
                    (_, Err(e)) => errs.push((format!("{p}.headers.{k}"), e)),
                }
            }
            let body = match &c.body {
                Some(b) => match body_template(b, &known) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        errs.push((format!("{p}.body"), e));
                        None
                    }
                },
                None => None,
            };
            let method =
                match http::Method::from_bytes(c.method.as_deref().unwrap_or("GET").as_bytes()) {
                    Ok(m) => m,
                    Err(_) => {
                        errs.push((format!("{p}.method"), "invalid method".into()));
                        http::Method::GET
                    }
                };
            if let Some(Select::Pointer(ptr)) = &c.select {
                if !ptr.is_empty() && !ptr.starts_with('/') {
                    errs.push((
                        format!("{p}.select"),
                        "a JSON pointer starts with / (or give a list of fields)".into(),
                    ));
                }
            }
            let forward = c
                .forward_headers
                .clone()
                .unwrap_or_else(|| default_forward.clone())
                .iter()
                .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                .collect();
            calls.push(Call {
                name: name.clone(),
                upstream: c.upstream.clone(),
                method,
                path,
                query,
                headers,
                body,
                depends_on: deps,
                select: c.select.clone(),
                optional: c.optional,
                timeout: c.timeout.map(|t| t.0),
                forward,
            });
        }
        // depends_on must form a DAG.
        if let Some(cycle) = find_cycle(&calls) {
            errs.push((
                ".calls".into(),
                format!("depends_on forms a cycle: {}", cycle.join(" -> ")),
            ));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Compiled {
            calls,
            timeout: agg.timeout.0,
            max_response_size: agg.max_response_size.0 as usize,
            max_concurrency: agg.max_concurrency.max(1) as usize,
        })
    }

    /// The call graph, one line per call, for `portico routes`.
    pub fn describe(&self) -> Vec<String> {
        self.calls
            .iter()
            .map(|c| {
                let deps: Vec<&str> = c
                    .depends_on
                    .iter()
                    .map(|&i| self.calls[i].name.as_str())
                    .collect();
                let mut path = render_shape(&c.path);
                for (i, (k, t)) in c.query.iter().enumerate() {
                    path.push(if i == 0 { '?' } else { '&' });
                    path.push_str(&format!("{k}={}", render_shape(t)));
                }
                format!(
                    "{} {} {} {}{}{}",
                    c.name,
                    c.method,
                    c.upstream,
                    path,
                    if deps.is_empty() {
                        String::new()
                    } else {
                        format!(" after {}", deps.join(", "))
                    },
                    if c.optional { " (optional)" } else { "" }
                )
            })
            .collect()
    }
}

fn render_shape(t: &Template) -> String {
    t.0.iter()
        .map(|p| match p {
            template::Piece::Lit(l) => l.clone(),
            template::Piece::Var(v) => template::describe(v),
        })
        .collect()
}

fn find_cycle(calls: &[Call]) -> Option<Vec<String>> {
    // 0 = unvisited, 1 = on stack, 2 = done
    fn visit(
        i: usize,
        calls: &[Call],
        state: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        state[i] = 1;
        stack.push(i);
        for &d in &calls[i].depends_on {
            if state[d] == 1 {
                let pos = stack.iter().position(|&x| x == d).unwrap_or(0);
                let mut cyc: Vec<String> = stack[pos..]
                    .iter()
                    .map(|&x| calls[x].name.clone())
                    .collect();
                cyc.push(calls[d].name.clone());
                return Some(cyc);
            }
            if state[d] == 0 {
                if let Some(c) = visit(d, calls, state, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        state[i] = 2;
        None
    }
    let mut state = vec![0u8; calls.len()];
    for i in 0..calls.len() {
        if state[i] == 0 {
            if let Some(c) = visit(i, calls, &mut state, &mut vec![]) {
                return Some(c);
            }
        }
    }
    None
}

/// An aggregation bound to the upstreams of one snapshot.
pub struct Runtime {
    pub compiled: Compiled,
    pub upstreams: Vec<Arc<Upstream>>,
    pub retry: Option<RetryPolicy>,
}

/// What one call did, for the access log.
#[derive(Debug, Clone)]
pub struct CallLog {
    pub name: String,
    pub status: u16,
    pub outcome: &'static str,
    pub ms: f64,
    pub endpoint: String,
}

/// What the gateway hands to an aggregation.
pub struct Env<'a> {
    pub route: &'a str,
    pub request_id: &'a str,
    pub trace_id: String,
    pub params: &'a [(String, String)],
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub claims: Option<&'a Value>,
}

/// The answer of an aggregation.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub calls: Vec<CallLog>,
}

#[derive(Debug)]
struct Failure {
    status: u16,
    reason: String,
    timeout: bool,
}

/// A finished call: (index, start, result, endpoint).
type Finished = (usize, Instant, Result<(u16, Bytes), Failure>, String);

struct Prepared {
    req: RequestHeader,
    body: Option<Bytes>,
}

fn render_body(t: &BodyTemplate, inp: &Inputs<'_>) -> Result<Value, String> {
    Ok(match t {
        BodyTemplate::Str(s) => match s.only_var() {
            Some(v) => template::resolve(v, inp)?,
            None => Value::String(s.render(inp, Escape::Raw)?),
        },
        BodyTemplate::Arr(a) => Value::Array(
            a.iter()
                .map(|x| render_body(x, inp))
                .collect::<Result<_, _>>()?,
        ),
        BodyTemplate::Obj(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), render_body(v, inp)?)))
                .collect::<Result<_, String>>()?,
        ),
        BodyTemplate::Lit(v) => v.clone(),
    })
}

fn prepare(
    call: &Call,
    up: &Upstream,
    env: &Env<'_>,
    results: &HashMap<String, Value>,
) -> Result<Prepared, String> {
    let inp = Inputs {
        params: env.params,
        query: env.query,
        headers: env.headers,
        claims: env.claims,
        calls: results,
    };
    let mut uri = call.path.render(&inp, Escape::Segment)?;
    for (i, (k, t)) in call.query.iter().enumerate() {
        uri.push(if i == 0 { '?' } else { '&' });
        uri.push_str(
            &percent_encoding::utf8_percent_encode(k, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
        uri.push('=');
        uri.push_str(&t.render(&inp, Escape::Component)?);
    }
    let mut req = RequestHeader::build(call.method.clone(), uri.as_bytes(), None)
        .map_err(|e| e.to_string())?;
    let host = up
        .host
        .clone()
        .or_else(|| env.headers.get(http::header::HOST).cloned())
        .unwrap_or_else(|| http::HeaderValue::from_static("localhost"));
    req.insert_header(http::header::HOST, host)
        .map_err(|e| e.to_string())?;
    for h in &call.forward {
        for v in env.headers.get_all(h) {
            req.append_header(h.clone(), v.clone())
                .map_err(|e| e.to_string())?;
        }
    }
    for (k, t) in &call.headers {
        let v = t.render(&inp, Escape::Header)?;
        req.insert_header(k.clone(), v).map_err(|e| e.to_string())?;
    }
    req.insert_header("x-request-id", env.request_id)
        .map_err(|e| e.to_string())?;
    // A child span of the client's trace for every call.
    req.insert_header(
        "traceparent",
        format!("00-{}-{:016x}-01", env.trace_id, rand::random::<u64>() | 1),
    )
    .map_err(|e| e.to_string())?;
    let body = match &call.body {
        Some(b) => {
            let v = render_body(b, &inp)?;
            let bytes = Bytes::from(serde_json::to_vec(&v).map_err(|e| e.to_string())?);
            req.insert_header(http::header::CONTENT_TYPE, "application/json")
                .map_err(|e| e.to_string())?;
            req.insert_header(http::header::CONTENT_LENGTH, bytes.len().to_string())
                .map_err(|e| e.to_string())?;
            Some(bytes)
        }
        None => None,
    };
    Ok(Prepared { req, body })
}

/// How one upstream try failed.
pub(crate) enum TryError {
    Connect(String),
    Timeout,
    Reset(String),
    TooLarge,
}

/// One request over Pingora's connector, the answer read whole (up to `max` bytes).
pub(crate) async fn one_try(
    connector: &Connector,
    peer: &pingora::upstreams::peer::HttpPeer,
    req: &RequestHeader,
    body: &Option<Bytes>,
    max: usize,
) -> Result<(Box<pingora::http::ResponseHeader>, Bytes), TryError> {
    let (mut s, _reused) = connector
        .get_http_session(peer)
        .await
        .map_err(|e| TryError::Connect(e.to_string()))?;
    let res: Result<(Box<pingora::http::ResponseHeader>, Bytes), TryError> = async {
        let io = |e: Box<pingora::Error>| match e.etype() {
            pingora::ErrorType::ReadTimedout | pingora::ErrorType::WriteTimedout => {
                TryError::Timeout
            }
            _ => TryError::Reset(e.to_string()),
        };
        s.write_request_header(Box::new(req.clone()))
            .await
            .map_err(io)?;
        if let Some(b) = body {
            s.write_request_body(b.clone(), true).await.map_err(io)?;
        }
        s.finish_request_body().await.map_err(io)?;
        s.read_response_header().await.map_err(io)?;
        let head = Box::new(
            s.response_header()
                .cloned()
                .ok_or_else(|| TryError::Reset("no response header".into()))?,
        );
        let mut buf = BytesMut::new();
        while let Some(chunk) = s.read_response_body().await.map_err(io)? {
            if buf.len() + chunk.len() > max {
                return Err(TryError::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok((head, buf.freeze()))
    }
    .await;
    if res.is_ok() {
        connector
            .release_http_session(s, peer, Some(Duration::from_secs(60)))
            .await;
    }
    res
}

struct CallCtx {
    up: Arc<Upstream>,
    prepared: Prepared,
    timeout: Duration,
    max: usize,
    retry: Option<RetryPolicy>,
    deadline: Instant,
}

/// Runs one call with retries; returns (status, body, endpoint) or a failure.
async fn run_call(
    c: CallCtx,
    gw: Arc<crate::gateway::Gateway>,
) -> (Result<(u16, Bytes), Failure>, String) {
    let up = &c.up;
    let mut tried: Vec<usize> = vec![];
    let mut endpoint = String::new();
    let retries = c.retry.as_ref().map(|r| r.attempts).unwrap_or(0);
    // Like proxied requests: a call that may have effects is retried only after a
    // failed connect, unless it is idempotent or says it is safe.
    let idempotent = matches!(
        c.prepared.req.method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
    ) || c.prepared.req.headers.contains_key("idempotency-key")
        || c.retry.as_ref().is_some_and(|p| p.non_idempotent);
    let mut attempt = 0u32;
    up.budget.deposit();
    loop {
        attempt += 1;
        let cb = up.breaker.as_ref();
        let pick = up
            .balancer
            .pick(&up.endpoints, None, &tried, cb)
            .or_else(|| up.balancer.pick(&up.endpoints, None, &[], cb));
        let Some(i) = pick else {
            return (
                Err(Failure {
                    status: 503,
                    reason: format!("upstream `{}` has no healthy endpoint", up.name),
                    timeout: false,
                }),
                endpoint,
            );
        };
        if !tried.contains(&i) {
            tried.push(i);
        }
        let ep = Arc::clone(&up.endpoints[i]);
        endpoint = ep.label.clone();
        let left = c
            .deadline
            .saturating_duration_since(Instant::now())
            .min(c.timeout);
        if left.is_zero() {
            return (
                Err(Failure {
                    status: 504,
                    reason: "timed out".into(),
                    timeout: true,
                }),
                endpoint,
            );
        }
        let peer = crate::proxy::build_peer(up, &ep, Some(left));
        ep.inflight.fetch_add(1, Ordering::Relaxed);
        up.inflight.fetch_add(1, Ordering::Relaxed);
        let r = tokio::time::timeout(
            left,
            one_try(
                &gw.connector,
                &peer,
                &c.prepared.req,
                &c.prepared.body,
                c.max,
            ),
        )
        .await;
        ep.inflight.fetch_sub(1, Ordering::Relaxed);
        up.inflight.fetch_sub(1, Ordering::Relaxed);
        let (outcome, kind, failure) = match r {
            Ok(Ok((head, body))) => {
                let status = head.status.as_u16();
                let failed = status >= 500;
                up.record_result(&ep, !failed);
                count(&gw, up, &ep, if failed { "http_5xx" } else { "ok" });
                let retry_status = idempotent
                    && c.retry
                        .as_ref()
                        .is_some_and(|p| p.on_status.contains(&status));
                if !retry_status || attempt > retries || !up.budget.withdraw() {
                    return (Ok((status, body)), endpoint);
                }
                ("http_5xx", "status", None)
            }
            Ok(Err(TryError::Connect(e))) => {
                up.connect_failed(&ep);
                up.record_result(&ep, false);
                (
                    "connect_failure",
                    "connect_failure",
                    Some(Failure {
                        status: 502,
                        reason: format!("connect: {e}"),
                        timeout: false,
                    }),
                )
            }
            Ok(Err(TryError::Reset(e))) => {
                up.record_result(&ep, false);
                (
                    "reset",
                    "reset",
                    Some(Failure {
                        status: 502,
                        reason: e,
                        timeout: false,
                    }),
                )
            }
            Ok(Err(TryError::TooLarge)) => {
                return (
                    Err(Failure {
                        status: 502,
                        reason: format!("answer larger than {} bytes", c.max),
                        timeout: false,
                    }),
                    endpoint,
                )
            }
            Ok(Err(TryError::Timeout)) | Err(_) => {
                up.record_result(&ep, false);
                (
                    "timeout",
                    "timeout",
                    Some(Failure {
                        status: 504,
                        reason: "timed out".into(),
                        timeout: true,
                    }),
                )
            }
        };
        if outcome != "http_5xx" {
            count(&gw, up, &ep, outcome);
        }
        let policy_allows = (idempotent || kind == "connect_failure")
            && c.retry.as_ref().is_some_and(|p| match kind {
                "connect_failure" => p.on_connect_failure,
                "reset" => p.on_reset,
                "timeout" => p.on_timeout,
                _ => true,
            });
        let free_failover = kind == "connect_failure" && attempt < 2;
        let can = attempt <= retries.max(u32::from(free_failover))
            && (policy_allows || free_failover)
            && Instant::now() < c.deadline
            && up.budget.withdraw();
        match failure {
            Some(f) if !can => return (Err(f), endpoint),
            _ => {}
        }
        if let Some(p) = &c.retry {
            tokio::time::sleep(
                p.backoff(attempt)
                    .min(c.deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
    }
}

fn count(
    gw: &crate::gateway::Gateway,
    up: &Upstream,
    ep: &crate::upstream::Endpoint,
    outcome: &str,
) {
    gw.metrics
        .upstream_requests
        .with_label_values(&[&up.name, &ep.label, outcome])
        .inc();
}

fn shape(v: Value, sel: &Option<Select>) -> Value {
    match sel {
        None => v,
        Some(Select::Pointer(p)) if p.is_empty() => v,
        Some(Select::Pointer(p)) => v.pointer(p).cloned().unwrap_or(Value::Null),
        Some(Select::Fields(fs)) => match v {
            Value::Object(m) => {
                Value::Object(m.into_iter().filter(|(k, _)| fs.contains(k)).collect())
            }
            other => other,
        },
    }
}

fn parse_body(b: &Bytes) -> Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned()))
}

fn error_answer(
    status: u16,
    code: &str,
    msg: &str,
    call: &str,
    rid: &str,
    calls: Vec<CallLog>,
) -> Answer {
    let body = serde_json::json!({"error": code, "message": msg, "call": call, "request_id": rid});
    let mut b = serde_json::to_vec(&body).unwrap_or_default();
    b.push(b'\n');
    Answer {
        status,
        body: Bytes::from(b),
        calls,
    }
}

/// Runs an aggregation to its answer.
pub async fn execute(rt: &Runtime, env: Env<'_>, gw: Arc<crate::gateway::Gateway>) -> Answer {
    let comp = &rt.compiled;
    let n = comp.calls.len();
    let started = Instant::now();
    let deadline = started + comp.timeout;
    let mut results: HashMap<String, Value> = HashMap::new();
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    let mut errors = serde_json::Map::new();
    let mut logs: Vec<CallLog> = vec![];
    // 0 pending, 1 running, 2 ok, 3 failed
    let mut state = vec![0u8; n];
    let mut set: tokio::task::JoinSet<Finished> = tokio::task::JoinSet::new();
    let mut running = 0usize;
    let metrics = &gw.metrics;
    let finish = |i: usize,
                  status: u16,
                  outcome: &'static str,
                  t0: Instant,
                  endpoint: String,
                  logs: &mut Vec<CallLog>| {
        let name = &comp.calls[i].name;
        metrics
            .aggregate_calls
            .with_label_values(&[env.route, name, outcome])
            .inc();
        metrics
            .aggregate_duration
            .with_label_values(&[env.route, name])
            .observe(t0.elapsed().as_secs_f64());
        logs.push(CallLog {
            name: name.clone(),
            status,
            outcome,
            ms: t0.elapsed().as_secs_f64() * 1000.0,
            endpoint,
        });
    };
    loop {
        // Start every call whose dependencies are done, as limits allow.
        for i in 0..n {
            if state[i] != 0 {
                continue;
            }
            let call = &comp.calls[i];
            let dep_failed = call.depends_on.iter().any(|&d| state[d] == 3);
            if !dep_failed
                && (!call.depends_on.iter().all(|&d| state[d] == 2)
                    || running >= comp.max_concurrency)
            {
                continue;
            }
            let up = Arc::clone(&rt.upstreams[i]);
            // A call that cannot start (a dependency failed, or its template has no
            // value) fails like a call that ran: the whole answer if required, else null.
            let prepared = if dep_failed {
                Err((
                    "dependency_failed",
                    "a call it depends on failed".to_string(),
                ))
            } else {
                prepare(call, &up, &env, &results).map_err(|e| ("bad_template", e))
            };
            let prepared = match prepared {
                Ok(p) => p,
                Err((outcome, reason)) => {
                    state[i] = 3;
                    finish(i, 0, outcome, Instant::now(), String::new(), &mut logs);
                    if !call.optional {
                        return error_answer(
                            502,
                            "aggregate_call_failed",
                            &format!("call `{}`: {reason}", call.name),
                            &call.name,
                            env.request_id,
                            logs,
                        );
                    }
                    out.insert(call.name.clone(), Value::Null);
                    errors.insert(
                        call.name.clone(),
                        serde_json::json!({"status": null, "reason": reason}),
                    );
                    continue;
                }
            };
            state[i] = 1;
            running += 1;
            let ctx = CallCtx {
                timeout: call.timeout.or(up.timeouts.read).unwrap_or(comp.timeout),
                up,
                prepared,
                max: comp.max_response_size,
                retry: rt.retry.clone(),
                deadline,
            };
            let gw2 = Arc::clone(&gw);
            let slots = Arc::clone(&gw.aggregate_slots);
            set.spawn(async move {
                let t0 = Instant::now();
                let _permit = slots.acquire_owned().await;
                let (r, ep) = run_call(ctx, gw2).await;
                (i, t0, r, ep)
            });
        }
        if running == 0 {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let next = match tokio::time::timeout(left, set.join_next()).await {
            Ok(Some(Ok(x))) => x,
            Ok(Some(Err(e))) => {
                set.abort_all();
                return error_answer(
                    500,
                    "internal",
                    &format!("aggregation task failed: {e}"),
                    "",
                    env.request_id,
                    logs,
                );
            }
            Ok(None) => break,
            Err(_) => {
                set.abort_all();
                let pending: Vec<&str> = (0..n)
                    .filter(|&i| state[i] == 1)
                    .map(|i| comp.calls[i].name.as_str())
                    .collect();
                let first = pending.first().copied().unwrap_or("");
                return error_answer(
                    504,
                    "aggregate_timeout",
                    &format!(
                        "the aggregation timed out after {:?} waiting for {}",
                        comp.timeout,
                        pending.join(", ")
                    ),
                    first,
                    env.request_id,
                    logs,
                );
            }
        };
        running -= 1;
        let (i, t0, r, endpoint) = next;
        let call = &comp.calls[i];
        match r {
            Ok((status, body)) if (200..300).contains(&status) => {
                state[i] = 2;
                finish(i, status, "ok", t0, endpoint, &mut logs);
                let v = parse_body(&body);
                out.insert(call.name.clone(), shape(v.clone(), &call.select));
                results.insert(call.name.clone(), v);
            }
            other => {
                state[i] = 3;
                let f = match other {
                    Ok((status, _)) => Failure {
                        status,
                        reason: format!("upstream answered {status}"),
                        timeout: false,
                    },
                    Err(f) => f,
                };
                finish(
                    i,
                    f.status,
                    if f.timeout { "timeout" } else { "error" },
                    t0,
                    endpoint,
                    &mut logs,
                );
                if f.timeout && Instant::now() + Duration::from_millis(5) >= deadline {
                    // The call ran into the aggregation's own deadline.
                    set.abort_all();
                    let mut pending: Vec<&str> = (0..n)
                        .filter(|&j| state[j] == 1)
                        .map(|j| comp.calls[j].name.as_str())
                        .collect();
                    pending.insert(0, call.name.as_str());
                    return error_answer(
                        504,
                        "aggregate_timeout",
                        &format!(
                            "the aggregation timed out after {:?} waiting for {}",
                            comp.timeout,
                            pending.join(", ")
                        ),
                        &call.name,
                        env.request_id,
                        logs,
                    );
                }
                if !call.optional {
                    set.abort_all();
                    let status = if f.timeout { 504 } else { 502 };
                    return error_answer(
                        status,
                        "aggregate_call_failed",
                        &format!("call `{}` failed: {}", call.name, f.reason),
                        &call.name,
                        env.request_id,
                        logs,
                    );
                }
                out.insert(call.name.clone(), Value::Null);
                errors.insert(
                    call.name.clone(),
                    serde_json::json!({"status": f.status, "reason": f.reason}),
                );
            }
        }
    }
    let mut obj: serde_json::Map<String, Value> = out.into_iter().collect();
    if !errors.is_empty() {
        obj.insert("_errors".into(), Value::Object(errors));
    }
    let mut b = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    b.push(b'\n');
    Answer {
        status: 200,
        body: Bytes::from(b),
        calls: logs,
    }
}

/// Binds a compiled aggregation to a snapshot's upstreams.
pub fn bind(
    agg: &model::Aggregate,
    route_params: &[String],
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    retry: Option<RetryPolicy>,
) -> Result<Runtime, String> {
    let compiled =
        Compiled::compile(agg, route_params, &|u| upstreams.contains_key(u)).map_err(|e| {
            e.into_iter()
                .map(|(p, m)| format!("aggregate{p}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
    let ups = compiled
        .calls
        .iter()
        .map(|c| {
            upstreams
                .get(&c.upstream)
                .cloned()
                .ok_or_else(|| format!("unknown upstream {}", c.upstream))
        })
        .collect::<Result<_, _>>()?;
    Ok(Runtime {
        compiled,
        upstreams: ups,
        retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(yaml: &str) -> Aggregate {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn cycles_and_references_are_refused() {
        let a = agg("calls:\n  a: { upstream: u, path: \"/a/{b.x}\", depends_on: [b] }\n  b: { upstream: u, path: \"/b/{a.y}\", depends_on: [a] }\n");
        let e = Compiled::compile(&a, &[], &|_| true).unwrap_err();
        assert!(e.iter().any(|(_, m)| m.contains("cycle")), "{e:?}");
        let a = agg("calls:\n  a: { upstream: u, path: \"/a/{nope}\" }\n");
        assert!(Compiled::compile(&a, &["id".into()], &|_| true).is_err());
        let a = agg(
            "calls:\n  a: { upstream: u, path: \"/a/{c.x}\" }\n  c: { upstream: u, path: /c }\n",
        );
        assert!(
            Compiled::compile(&a, &[], &|_| true).is_err(),
            "call used without depends_on"
        );
        let a = agg("calls:\n  a: { upstream: u, path: \"/a/{id}?page={query.page}\" }\n");
        let c = Compiled::compile(&a, &["id".into()], &|_| true).unwrap();
        assert_eq!(c.calls[0].query.len(), 1);
    }

    #[test]
    fn select_shapes() {
        let v = serde_json::json!({"id": 1, "name": "a", "address": {"city": "x"}});
        assert_eq!(
            shape(v.clone(), &Some(Select::Pointer("/address/city".into()))),
            serde_json::json!("x")
        );
        assert_eq!(
            shape(v, &Some(Select::Fields(vec!["id".into(), "name".into()]))),
            serde_json::json!({"id": 1, "name": "a"})
        );
    }
}
