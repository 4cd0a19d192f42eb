//! bare-pingora: the smallest useful Pingora HTTP proxy, used by `bench/run.sh`
//! as the reference point for Portico's overhead. It listens on one address and
//! forwards every request, unchanged, to a single plaintext HTTP/1.1 upstream
//! through `ProxyHttp::upstream_peer`; every other hook keeps Pingora's default,
//! and the server runs with Pingora's default configuration (1 worker thread,
//! upstream keep-alive pool of 128) unless `--threads N` is given.
//!
//! Usage: `bare-pingora --listen 127.0.0.1:8081 --upstream 127.0.0.1:8000 [--threads N]`

use std::net::SocketAddr;
use std::process::exit;

use async_trait::async_trait;
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
}

fn usage(msg: &str) -> ! {
    eprintln!("bare-pingora: {msg}");
    eprintln!("usage: bare-pingora --listen ADDR:PORT --upstream ADDR:PORT [--threads N]");
    exit(2);
}

fn parse_args() -> Args {
    let mut listen = None;
    let mut upstream = None;
    let mut threads = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--listen" => listen = Some(value()),
            "--upstream" => {
                let v = value();
                upstream = Some(
                    v.parse::<SocketAddr>()
                        .unwrap_or_else(|e| usage(&format!("bad --upstream {v}: {e}"))),
                );
            }
            "--threads" => {
                let v = value();
                threads = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .unwrap_or_else(|| usage(&format!("bad --threads {v}"))),
                );
            }
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    Args {
        listen: listen.unwrap_or_else(|| usage("--listen is required")),
        upstream: upstream.unwrap_or_else(|| usage("--upstream is required")),
        threads,
    }
}

fn main() {
    let args = parse_args();

    let mut conf = ServerConf::new().expect("default Pingora configuration");
    if let Some(n) = args.threads {
        conf.threads = n;
    }
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: args.upstream,
        },
    );
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run_forever();
}
