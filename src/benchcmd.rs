//! `portico bench registry`: measures how long a registry change takes to reach
//! routing at scale (many services and instances), and the CPU time of re-applying
//! it, on the real compile-and-swap path without network noise.

use crate::config::model::{Config, Discovery, Route, Upstream};
use crate::registry::{instance, Registry, Source};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the calling thread's CPU clock into `ts`.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs the registry benchmark; prints JSON; returns the exit code.
pub fn registry(services: usize, instances: usize) -> i32 {
    let per = (instances / services.max(1)).max(1);
    let mut cfg = Config::default();
    for s in 0..services {
        let name = format!("svc{s}");
        cfg.upstreams.insert(
            name.clone(),
            Upstream {
                discovery: Some(Discovery {
                    service: Some(name.clone()),
                    selector: None,
                    dns: None,
                    refresh: None,
                    resolver: None,
                }),
                ..Default::default()
            },
        );
        let mut r = Route {
            name: name.clone(),
            upstream: Some(name.clone()),
            ..Default::default()
        };
        r.matcher.path_prefix = Some(format!("/{name}"));
        cfg.routes.push(r);
    }
    let reg = Arc::new(Registry::default());
    let t0 = Instant::now();
    for s in 0..services {
        for i in 0..per {
            let port = 10000 + ((s * per + i) % 50000) as u16;
            if let Ok(inst) = instance(
                &format!("i{i}"),
                &format!("127.0.0.{}:{port}", 1 + s % 200),
                BTreeMap::new(),
                None,
                Source::Api,
            ) {
                reg.upsert(&format!("svc{s}"), inst);
            }
        }
    }
    let fill = t0.elapsed();
    let m = crate::metrics::Metrics::new();
    let c0 = thread_cpu();
    let t1 = Instant::now();
    let first = match crate::snapshot::compile(&cfg, None, None, &m, 1, Some(&reg)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let first_wall = t1.elapsed();
    let first_cpu = thread_cpu() - c0;
    // One change: a new instance of one service, then the recompile that applies it.
    let mut rounds = vec![];
    let mut prev = first;
    for k in 0..5 {
        let svc = format!("svc{}", (k * 7919) % services);
        if let Ok(inst) = instance(
            &format!("new{k}"),
            "127.0.0.250:1",
            BTreeMap::new(),
            None,
            Source::Api,
        ) {
            reg.upsert(&svc, inst);
        }
        let c = thread_cpu();
        let t = Instant::now();
        let next = match crate::snapshot::compile(&cfg, Some(&prev), None, &m, 1, Some(&reg)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        };
        let wall = t.elapsed();
        let cpu = thread_cpu() - c;
        let reused = next
            .upstreams
            .iter()
            .filter(|(n, u)| prev.upstreams.get(*n).is_some_and(|p| Arc::ptr_eq(p, u)))
            .count();
        rounds.push(serde_json::json!({
            "wall_ms": wall.as_secs_f64() * 1000.0,
            "cpu_ms": cpu.as_secs_f64() * 1000.0,
            "upstreams_reused": reused,
        }));
        prev = next;
    }
    let out = serde_json::json!({
        "services": services,
        "instances": services * per,
        "registry_fill_ms": fill.as_secs_f64() * 1000.0,
        "first_compile": { "wall_ms": first_wall.as_secs_f64() * 1000.0, "cpu_ms": first_cpu.as_secs_f64() * 1000.0 },
        "change_applied": rounds,
        "note": "a registry change reaches routing after the 20 ms debounce plus one recompile",
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    0
}
