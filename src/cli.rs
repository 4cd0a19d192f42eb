//! The commands: `run` (the default), `check`, `routes`, `demo-backend`. Exit codes
//! follow the operations contract: 0 ok, 1 invalid input, 2 runtime failure.

use crate::config;
use crate::snapshot;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Portico: an API gateway and ingress controller on Pingora.
#[derive(Parser, Debug)]
#[command(name = "portico", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Config file (for the default `run` command).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace); PORTICO_LOG overrides.
    #[arg(short = 'v', action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Registry change -> routing at scale.
    Registry {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 10000)]
        instances: usize,
    },
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the gateway.
    Run {
        /// Take the listening sockets over from a running Portico (graceful binary
        /// upgrade): start the new binary with this flag, then send SIGQUIT to the old one.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file without serving; prints every error as FILE:LINE:COL.
    Check,
    /// Kubernetes ingress mode on manifests: serves the Ingress, IngressClass, Service,
    /// EndpointSlice, Secret (and Gateway API Gateway, HTTPRoute) objects found in the
    /// *.yaml, *.yml and *.json files of DIR, re-read when they change. The config file
    /// (-c) gives listeners, admin and defaults, as in cluster mode; its `kubernetes:`
    /// section picks the ingress class (default `portico`).
    Ingress {
        /// Folder of manifests (multi-document YAML and `kind: List` are read).
        #[arg(long, value_name = "DIR")]
        manifests: PathBuf,
    },
    /// Explain which route a request would take, and why.
    Routes {
        /// Request method, e.g. GET.
        method: String,
        /// URL (http://host/path?query) or a path.
        url: String,
        /// Request headers, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Micro-benchmarks of Portico's own machinery (see bench/README.md).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// (internal) Supervises one orchestrated replica; see orchestrator/shim.rs.
    #[command(hide = true)]
    ReplicaShim {
        #[arg(long, default_value_t = 10_000)]
        grace_ms: u64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// A small HTTP service for demos and tests.
    DemoBackend {
        /// Service name reported in answers.
        #[arg(long, default_value = "demo")]
        name: String,
        /// Port (default: $PORT, else 8000).
        #[arg(long)]
        port: Option<u16>,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        // The Kubernetes client logs every failed retry; the watchers log state changes.
        0 => "warn,portico=info,kube_client=off,kube_runtime=off",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let env = env_logger::Env::default().filter_or("PORTICO_LOG", default);
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .try_init();
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let cfg_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config/portico.yaml"));
    match cli.cmd.unwrap_or(Cmd::Run { upgrade: false }) {
        Cmd::Run { upgrade } => crate::server::run(cfg_path, upgrade),
        Cmd::Ingress { manifests } => match crate::kubernetes::manifests::check_dir(&manifests) {
            // Invalid input, like a bad config file: exit 1 before anything starts.
            Err(e) => {
                eprintln!("portico ingress: --manifests {e}");
                1
            }
            Ok(()) => crate::server::run_with(cfg_path, false, Some(manifests)),
        },
        Cmd::Check => check(&cfg_path),
        Cmd::Routes {
            method,
            url,
            headers,
            json,
        } => routes(&cfg_path, &method, &url, &headers, json),
        Cmd::Bench {
            what:
                BenchCmd::Registry {
                    services,
                    instances,
                },
        } => crate::benchcmd::registry(services, instances),
        Cmd::ReplicaShim { grace_ms, cmd } => {
            crate::orchestrator::shim::run(&cmd, std::time::Duration::from_millis(grace_ms))
        }
        Cmd::DemoBackend { name, port, bind } => {
            let port = port
                .or_else(|| std::env::var("PORT").ok().and_then(|p| p.parse().ok()))
                .unwrap_or(8000);
            crate::demo_backend::run(name, &bind, port)
        }
    }
}

fn print_errors(errs: &[config::ConfigError]) {
    for e in errs {
        eprintln!("{e}");
    }
    eprintln!(
        "{} error{} found",
        errs.len(),
        if errs.len() == 1 { "" } else { "s" }
    );
}

fn check(path: &std::path::Path) -> i32 {
    match config::load_file(path) {
        Ok(cfg) => {
            let m = crate::metrics::Metrics::new();
            match snapshot::compile(
                &cfg,
                None,
                None,
                &m,
                1,
                Some(&crate::gateway::static_registry(&cfg)),
            ) {
                Ok(s) => {
                    println!(
                        "{}: ok ({} listeners, {} upstreams, {} routes)",
                        path.display(),
                        cfg.listeners.len(),
                        s.upstreams.len(),
                        s.table.routes().len()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("{}:1:1: {e}", path.display());
                    1
                }
            }
        }
        Err(errs) => {
            print_errors(&errs);
            1
        }
    }
}

fn routes(path: &std::path::Path, method: &str, url: &str, headers: &[String], json: bool) -> i32 {
    let cfg = match config::load_file(path) {
        Ok(c) => c,
        Err(errs) => {
            print_errors(&errs);
            return 1;
        }
    };
    let m = crate::metrics::Metrics::new();
    let snap = match snapshot::compile(
        &cfg,
        None,
        None,
        &m,
        1,
        Some(&crate::gateway::static_registry(&cfg)),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return 1;
        }
    };
    let Ok(method) = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
        eprintln!("invalid method `{method}`");
        return 1;
    };
    let Ok(uri) = url.parse::<http::Uri>() else {
        eprintln!("invalid URL `{url}`");
        return 1;
    };
    let mut hm = http::HeaderMap::new();
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            eprintln!("invalid header `{h}` (expected `Name: value`)");
            return 1;
        };
        match (
            http::HeaderName::from_bytes(k.trim().as_bytes()),
            http::HeaderValue::from_str(v.trim()),
        ) {
            (Ok(k), Ok(v)) => {
                hm.append(k, v);
            }
            _ => {
                eprintln!("invalid header `{h}`");
                return 1;
            }
        }
    }
    let raw_host = hm
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let host = crate::router::normalize_host(&raw_host);
    let path_n = crate::router::normalize_path(uri.path()).into_owned();
    let info = crate::router::RequestInfo {
        method: &method,
        host: &host,
        path: &path_n,
        query: uri.query(),
        headers: &hm,
    };
    let mut params = vec![];
    let chosen = snap.table.find(&info, &mut params).cloned();
    let explained = snap.table.explain(&info);
    let routes = snap.table.routes();
    let mut cands = vec![];
    for (i, host_note, res) in &explained {
        let r = &routes[*i];
        let is_chosen = chosen.as_ref().is_some_and(|c| c.index == r.index);
        let reason = match res {
            Ok(()) if is_chosen => format!("{host_note}; matches; chosen"),
            Ok(()) => format!(
                "{host_note}; matches, but `{}` takes precedence",
                chosen.as_ref().map(|c| &*c.name).unwrap_or("?")
            ),
            Err(e) => format!("{host_note}; {e}"),
        };
        cands.push((r.name.to_string(), res.is_ok(), is_chosen, reason));
    }
    let plugins: Vec<&str> = chosen
        .as_ref()
        .map(|r| r.plugins.iter().map(|p| p.name()).collect())
        .unwrap_or_default();
    if json {
        let v = serde_json::json!({
            "request": { "method": method.as_str(), "host": host, "path": path_n, "query": uri.query() },
            "route": chosen.as_ref().map(|r| r.name.to_string()),
            "action": chosen.as_ref().map(|r| r.action.describe()),
            "params": params.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "plugins": plugins,
            "calls": chosen.as_ref().and_then(|r| match &r.action {
                crate::snapshot::Action::Aggregate(a) => Some(a.compiled.describe()),
                _ => None,
            }),
            "candidates": cands.iter().map(|(n, m, c, r)| serde_json::json!({"name": n, "matched": m, "chosen": c, "reason": r})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{method} host={host:?} path={path_n:?} query={:?}",
            uri.query().unwrap_or("")
        );
        match &chosen {
            Some(r) => {
                println!("route: {} -> {}", r.name, r.action.describe());
                if !params.is_empty() {
                    let p: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("params: {}", p.join(", "));
                }
                println!(
                    "plugins: {}",
                    if plugins.is_empty() {
                        "(none)".to_string()
                    } else {
                        plugins.join(" -> ")
                    }
                );
                if let crate::snapshot::Action::Aggregate(a) = &r.action {
                    println!("call graph:");
                    for line in a.compiled.describe() {
                        println!("  {line}");
                    }
                }
            }
            None => println!("route: none (the gateway answers 404 no_route)"),
        }
        println!("candidates, in precedence order:");
        for (n, m, c, r) in &cands {
            let mark = if *c {
                "*"
            } else if *m {
                "+"
            } else {
                "-"
            };
            println!("  {mark} {n:<24} {r}");
        }
    }
    0
}
