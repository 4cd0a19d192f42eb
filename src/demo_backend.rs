//! `portico demo-backend`: the small HTTP service behind the demo and the tests. It
//! echoes each request as JSON (method, path, query, headers, body size), serves
//! `/healthz`, fake `/users/{id}` and `/orders?user=ID` data, streams `/bytes/N`, and
//! obeys `?delay=250ms` and `?status=503`. Request bodies are read and counted in
//! chunks, never held whole, so gigabyte uploads pass through in constant memory.
//!
//! For resilience tests it can misbehave on cue: `?reset=0.3` drops the connection
//! after reading the request, before answering, for that share of requests, and `PUT /_control/mode/{ok|fail|hang|reset}`
//! switches every later request to answer normally, 503, never, or by a reset.
//! `GET /_stats` counts the requests served (control, stats and health requests aside).

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use serde_json::json;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

struct Demo {
    name: String,
    port: u16,
    /// 0 ok, 1 fail (503), 2 hang, 3 reset.
    mode: AtomicU8,
    requests: AtomicU64,
}

/// The demo backend's way of saying "drop this connection now".
fn reset_error() -> pingora::BError {
    pingora::Error::explain(pingora::ErrorType::ConnectionClosed, "reset on purpose")
}

fn query_param<'a>(q: Option<&'a str>, key: &str) -> Option<&'a str> {
    q?.split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

impl Demo {
    async fn handle(&self, s: &mut ServerSession) -> pingora::Result<()> {
        let req = s.req_header().clone();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);
        // Read (and count) the request body as it streams in.
        let mut body_bytes: u64 = 0;
        let mut first = Vec::new();
        while let Some(chunk) = s.read_request_body().await? {
            if first.len() < 4096 {
                first.extend_from_slice(&chunk[..chunk.len().min(4096 - first.len())]);
            }
            body_bytes += chunk.len() as u64;
        }
        if let Some(d) = query_param(query.as_deref(), "delay") {
            if let Ok(d) = crate::config::units::parse_duration(d) {
                tokio::time::sleep(d.min(std::time::Duration::from_secs(300))).await;
            }
        }
        let mut status: u16 = query_param(query.as_deref(), "status")
            .and_then(|s| s.parse().ok())
            .filter(|s| (200..600).contains(s))
            .unwrap_or(200);
        let served_by = format!("{}:{}", self.name, self.port);
        if let Some(mode) = path.strip_prefix("/_control/mode/") {
            let m = match mode {
                "ok" => 0,
                "fail" => 1,
                "hang" => 2,
                "reset" => 3,
                _ => 255,
            };
            if m != 255 {
                self.mode.store(m, Ordering::SeqCst);
            }
            return self
                .small(
                    s,
                    if m == 255 { 400 } else { 200 },
                    &served_by,
                    json!({"mode": mode}),
                )
                .await;
        }
        if path == "/_stats" {
            let n = self.requests.load(Ordering::SeqCst);
            return self
                .small(
                    s,
                    200,
                    &served_by,
                    json!({"requests": n, "service": self.name, "port": self.port}),
                )
                .await;
        }
        if path != "/healthz" {
            self.requests.fetch_add(1, Ordering::SeqCst);
        }
        let reset_share: f64 = query_param(query.as_deref(), "reset")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0.0);
        match self.mode.load(Ordering::SeqCst) {
            1 if path != "/healthz" => status = 503,
            2 if path != "/healthz" => {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            }
            3 if path != "/healthz" => return Err(reset_error()),
            _ => {}
        }
        if reset_share > 0.0 && rand::random::<f64>() < reset_share {
            // The request was read; the connection drops before any answer.
            return Err(reset_error());
        }

        if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            let mut resp = ResponseHeader::build(status, Some(4))?;
            resp.insert_header("content-type", "application/octet-stream")?;
            resp.insert_header("content-length", n.to_string())?;
            resp.insert_header("x-served-by", &served_by)?;
            s.write_response_header(Box::new(resp)).await?;
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                left -= k as u64;
                s.write_response_body(chunk.slice(..k), left == 0).await?;
            }
            return Ok(());
        }

        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    json!(String::from_utf8_lossy(v.as_bytes())),
                )
            })
            .collect();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let body = match segs.as_slice() {
            ["healthz"] => json!({"status": "ok", "service": self.name}),
            ["users", id] => json!({
                "id": id, "name": format!("user-{id}"), "email": format!("user-{id}@example.com"),
                "address": {"city": "Lisbon", "country": "PT"},
                "service": self.name, "port": self.port,
            }),
            ["orders"] => {
                let user = query_param(query.as_deref(), "user").unwrap_or("0");
                json!({
                    "user": user,
                    "orders": [
                        {"id": format!("{user}-1"), "total": 42.5},
                        {"id": format!("{user}-2"), "total": 7.0},
                    ],
                    "service": self.name, "port": self.port,
                })
            }
            _ => json!({
                "service": self.name,
                "port": self.port,
                "method": req.method.as_str(),
                "path": path,
                "query": query,
                "headers": headers,
                "body_bytes": body_bytes,
                "body_preview": String::from_utf8_lossy(&first[..first.len().min(256)]),
            }),
        };
        let mut out = serde_json::to_vec(&body).unwrap_or_default();
        out.push(b'\n');
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", out.len().to_string())?;
        resp.insert_header("x-served-by", &served_by)?;
        let head = req.method == http::Method::HEAD;
        s.write_response_header(Box::new(resp)).await?;
        if !head {
            s.write_response_body(Bytes::from(out), true).await?;
        }
        Ok(())
    }
}

impl Demo {
    async fn small(
        &self,
        s: &mut ServerSession,
        status: u16,
        served_by: &str,
        v: serde_json::Value,
    ) -> pingora::Result<()> {
        let mut out = serde_json::to_vec(&v).unwrap_or_default();
        out.push(b'\n');
        let mut resp = ResponseHeader::build(status, Some(3))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", out.len().to_string())?;
        resp.insert_header("x-served-by", served_by)?;
        s.write_response_header(Box::new(resp)).await?;
        s.write_response_body(Bytes::from(out), true).await?;
        Ok(())
    }
}

#[async_trait]
impl HttpServerApp for Demo {
    async fn process_new_http(
        self: &Arc<Self>,
        mut s: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match s.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        s.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        if let Err(e) = self.handle(&mut s).await {
            log::debug!("demo-backend: {e}");
            return None;
        }
        let settings = pingora::apps::HttpPersistentSettings::for_session(&s);
        match s.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }
}

/// Runs the demo backend until SIGTERM/SIGINT; returns the exit code.
pub fn run(name: String, bind: &str, port: u16) -> i32 {
    let addr = format!("{bind}:{port}");
    if let Err(e) = std::net::TcpListener::bind(&addr) {
        eprintln!("demo-backend: cannot bind {addr}: {e}");
        return 2;
    }
    let conf = ServerConf {
        threads: 2,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::services::listening::Service::new(
        format!("demo-backend {name}"),
        Demo {
            name: name.clone(),
            port,
            mode: AtomicU8::new(0),
            requests: AtomicU64::new(0),
        },
    );
    svc.add_tcp(&addr);
    server.add_service(svc);
    log::info!("demo-backend {name} listening on {addr}");
    server.run(pingora::server::RunArgs::default());
    0
}
