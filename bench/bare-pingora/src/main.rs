//! bare-pingora: the smallest useful Pingora HTTP proxy, used by `bench/run.sh`
//! as the reference point for Portico's overhead. It listens on one address and
//! forwards every request, unchanged, to a single plaintext HTTP/1.1 upstream
//! through `ProxyHttp::upstream_peer`; every other hook keeps Pingora's default,
//! and the server runs with Pingora's default configuration (1 worker thread,
//! upstream keep-alive pool of 128) unless `--threads N` or `--keepalive-pool N` is
//! given. With `--tls CERT KEY` the listener terminates TLS (Pingora's
//! Mozilla-intermediate OpenSSL settings) and offers HTTP/2 by ALPN with Pingora's
//! default HTTP/2 options: the reference for Portico's HTTP/2 path in
//! `bench/scenarios.sh`.
//!
//! Usage: `bare-pingora --listen 127.0.0.1:8081 --upstream 127.0.0.1:8000 [--threads N]
//! [--keepalive-pool N] [--tls CERT KEY]`

use std::net::SocketAddr;
use std::process::exit;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// Proxies everything to one fixed upstream.
struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

struct Args {
    listen: String,
    upstream: SocketAddr,
    threads: Option<usize>,
    /// Idle upstream connections kept (Pingora's `upstream_keepalive_pool_size`).
    keepalive_pool: Option<usize>,
    /// Certificate and key files: TLS with HTTP/2 (ALPN h2, http/1.1).
    tls: Option<(String, String)>,
}

fn usage(msg: &str) -> ! {
    eprintln!("bare-pingora: {msg}");
    eprintln!(
        "usage: bare-pingora --listen ADDR:PORT --upstream ADDR:PORT [--threads N] [--keepalive-pool N] [--tls CERT KEY]"
    );
    exit(2);
}

/// The value of `flag`, parsed, or exit with a usage message.
fn parsed<T: std::str::FromStr>(flag: &str, v: String) -> T
where
    T::Err: std::fmt::Display,
{
    v.parse::<T>()
        .unwrap_or_else(|e| usage(&format!("bad {flag} {v}: {e}")))
}

fn parse_args() -> Args {
    let mut listen = None;
    let mut upstream = None;
    let mut threads = None;
    let mut tls = None;
    let mut keepalive_pool = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--listen" => listen = Some(value()),
            "--upstream" => upstream = Some(parsed::<SocketAddr>(&flag, value())),
            "--threads" => match parsed::<usize>(&flag, value()) {
                0 => usage("bad --threads 0: at least 1"),
                n => threads = Some(n),
            },
            "--keepalive-pool" => keepalive_pool = Some(parsed::<usize>(&flag, value())),
            "--tls" => {
                let cert = value();
                let key = value();
                tls = Some((cert, key));
            }
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    Args {
        listen: listen.unwrap_or_else(|| usage("--listen is required")),
        upstream: upstream.unwrap_or_else(|| usage("--upstream is required")),
        threads,
        keepalive_pool,
        tls,
    }
}

fn main() {
    let args = parse_args();

    let mut conf = ServerConf::new().expect("default Pingora configuration");
    if let Some(n) = args.threads {
        conf.threads = n;
    }
    if let Some(n) = args.keepalive_pool {
        conf.upstream_keepalive_pool_size = n;
    }
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: args.upstream,
        },
    );
    match &args.tls {
        Some((cert, key)) => {
            let mut tls = TlsSettings::intermediate(cert, key)
                .unwrap_or_else(|e| usage(&format!("bad --tls {cert} {key}: {e}")));
            tls.enable_h2();
            proxy.add_tls_with_settings(&args.listen, None, tls);
        }
        None => proxy.add_tcp(&args.listen),
    }
    server.add_service(proxy);
    server.run_forever();
}
