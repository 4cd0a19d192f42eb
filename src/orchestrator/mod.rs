//! The embedded orchestrator: keeps each deployment's replicas running as local
//! processes and in the registry. Every replica has a supervisor task that starts the
//! process (a free port in `PORT` and `{port}`, its own process group, killed if the
//! gateway dies), forwards its output to the gateway's log, registers it once its
//! readiness probe passes, restarts it with exponential backoff when it exits or fails
//! its liveness probe, and drains it (deregister, SIGTERM, SIGKILL after the grace
//! period) when told to stop. A reconcile loop per deployment decides how many
//! replicas of which generation should exist: scaling, rolling updates
//! (`max_surge`/`max_unavailable`) and autoscaling on the gateway's in-flight counts.

pub mod shim;

use crate::config::model::{self, Deployment};
use crate::registry::{instance, Registry, Source, State};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{watch, Notify};

/// What a replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Ready,
    Draining,
    BackingOff,
    Stopped,
}

/// The visible state of one replica.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaState {
    pub id: String,
    pub generation: u64,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub phase: Phase,
    pub restarts: u32,
}

struct Replica {
    state: Arc<Mutex<ReplicaState>>,
    stop: watch::Sender<bool>,
}

impl Replica {
    fn phase(&self) -> Phase {
        self.state.lock().map(|s| s.phase).unwrap_or(Phase::Stopped)
    }
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
    fn generation(&self) -> u64 {
        self.state.lock().map(|s| s.generation).unwrap_or(0)
    }
}

/// What the gateway knows of a service's traffic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Requests in flight to its replicas (plus requests waiting for a cold start).
    pub inflight: i64,
    /// When a request last went to (or waited for) one of its replicas.
    pub last_used: Option<Instant>,
}

/// Returns the gateway's load for a service.
pub type LoadFn = Arc<dyn Fn(&str) -> Load + Send + Sync>;

struct DeploymentRt {
    spec: Mutex<Deployment>,
    generation: AtomicU64,
    desired: AtomicU32,
    replicas: Mutex<Vec<Replica>>,
    next_id: AtomicU64,
    wake: Notify,
    removed: AtomicBool,
    last_scale: Mutex<Instant>,
    last_busy: Mutex<Instant>,
}

/// The orchestrator.
pub struct Orchestrator {
    registry: Arc<Registry>,
    rt: tokio::runtime::Handle,
    metrics: Arc<crate::metrics::Metrics>,
    load: LoadFn,
    deployments: Mutex<BTreeMap<String, Arc<DeploymentRt>>>,
    shutting_down: AtomicBool,
    /// The gateway's binary, resolved at start (it may be replaced on disk later).
    exe: String,
}

fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()
}

async fn http_probe(port: u16, probe: &model::Probe) -> bool {
    let ep = crate::upstream::health::ProbeTarget {
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        host: format!("127.0.0.1:{port}"),
    };
    crate::upstream::health::probe_target(&ep, &probe.path, probe.timeout.0).await
}

/// Sends `sig` to the process group of `pid`.
fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is shared.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

impl Orchestrator {
    /// Creates the orchestrator and starts the deployments of `cfg`.
    pub fn start(
        cfg: &model::Config,
        registry: Arc<Registry>,
        rt: tokio::runtime::Handle,
        metrics: Arc<crate::metrics::Metrics>,
        load: LoadFn,
    ) -> Arc<Orchestrator> {
        let o = Arc::new(Orchestrator {
            registry,
            rt,
            metrics,
            load,
            deployments: Mutex::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
            exe: std::env::current_exe()
                .map(|p| {
                    p.display()
                        .to_string()
                        .trim_end_matches(" (deleted)")
                        .to_string()
                })
                .unwrap_or_else(|_| "portico".into()),
        });
        o.apply(cfg);
        o
    }

    /// Applies a (re)loaded config: new deployments start, removed ones stop, changed
    /// ones roll over to the new spec.
    pub fn apply(self: &Arc<Self>, cfg: &model::Config) {
        let wanted: Vec<Deployment> = cfg
            .orchestrator
            .as_ref()
            .map(|o| o.deployments.clone())
            .unwrap_or_default();
        let mut g = self.deployments.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|name, d| {
            let keep = wanted.iter().any(|w| &w.name == name);
            if !keep {
                log::info!("orchestrator: deployment {name} removed; stopping its replicas");
                d.removed.store(true, Ordering::SeqCst);
                d.wake.notify_one();
            }
            keep
        });
        for spec in wanted {
            match g.get(&spec.name) {
                Some(d) => {
                    let mut cur = d.spec.lock().unwrap_or_else(|e| e.into_inner());
                    if *cur != spec {
                        let replicas_only = {
                            let mut a = cur.clone();
                            a.replicas = spec.replicas;
                            a.autoscale = spec.autoscale.clone();
                            a == spec
                        };
                        if cur.replicas != spec.replicas {
                            d.desired.store(spec.replicas, Ordering::SeqCst);
                        }
                        if !replicas_only {
                            d.generation.fetch_add(1, Ordering::SeqCst);
                            log::info!(
                                "orchestrator: deployment {} changed; rolling update",
                                spec.name
                            );
                        }
                        *cur = spec;
                        d.wake.notify_one();
                    }
                }
                None => {
                    let initial = match &spec.autoscale {
                        Some(a) => spec.replicas.clamp(a.min, a.max),
                        None => spec.replicas,
                    };
                    let d = Arc::new(DeploymentRt {
                        desired: AtomicU32::new(initial),
                        spec: Mutex::new(spec.clone()),
                        generation: AtomicU64::new(1),
                        replicas: Mutex::new(vec![]),
                        next_id: AtomicU64::new(0),
                        wake: Notify::new(),
                        removed: AtomicBool::new(false),
                        last_scale: Mutex::new(Instant::now()),
                        last_busy: Mutex::new(Instant::now()),
                    });
                    g.insert(spec.name.clone(), Arc::clone(&d));
                    let me = Arc::clone(self);
                    self.rt.spawn(async move { me.reconcile_loop(d).await });
                }
            }
        }
    }

    /// Sets a deployment's replica count; false if there is no such deployment.
    pub fn scale(&self, name: &str, replicas: u32) -> bool {
        let g = self.deployments.lock().unwrap_or_else(|e| e.into_inner());
        match g.get(name) {
            Some(d) => {
                d.desired.store(replicas, Ordering::SeqCst);
                *d.last_scale.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                d.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Asks deployments of `service` that scaled to zero for a replica; returns whether
    /// one is (being) started.
    pub fn wake_service(&self, service: &str) -> bool {
        let g = self.deployments.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for d in g.values() {
            let spec = d.spec.lock().unwrap_or_else(|e| e.into_inner());
            if spec.service == service {
                any = true;
                *d.last_busy.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                if d.desired.load(Ordering::SeqCst) == 0 {
                    log::info!("orchestrator: {} scaled from zero by a request", spec.name);
                    d.desired.store(1, Ordering::SeqCst);
                    d.wake.notify_one();
                }
            }
        }
        any
    }

    /// Desired and actual state, for the admin API.
    pub fn to_json(&self) -> serde_json::Value {
        let g = self.deployments.lock().unwrap_or_else(|e| e.into_inner());
        let list: Vec<serde_json::Value> = g
            .iter()
            .map(|(name, d)| {
                let spec = d.spec.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let reps: Vec<ReplicaState> = d
                    .replicas
                    .lock()
                    .map(|r| {
                        r.iter()
                            .filter_map(|x| x.state.lock().ok().map(|s| s.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let ready = reps.iter().filter(|r| r.phase == Phase::Ready).count();
                serde_json::json!({
                    "name": name,
                    "service": spec.service,
                    "desired": d.desired.load(Ordering::SeqCst),
                    "actual": ready,
                    "generation": d.generation.load(Ordering::SeqCst),
                    "autoscale": spec.autoscale,
                    "replicas": reps,
                })
            })
            .collect();
        serde_json::json!({ "deployments": list })
    }

    /// Stops every replica (SIGTERM, SIGKILL after each deployment's grace period) and
    /// waits, at most `limit`, for them to be gone. Called at gateway shutdown.
    pub fn shutdown(&self, limit: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let all: Vec<Arc<DeploymentRt>> = self
            .deployments
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default();
        for d in &all {
            if let Ok(reps) = d.replicas.lock() {
                for r in reps.iter() {
                    let _ = r.stop.send(true);
                }
            }
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let running = all.iter().any(|d| {
                d.replicas
                    .lock()
                    .map(|r| r.iter().any(|x| x.phase() != Phase::Stopped))
                    .unwrap_or(false)
            });
            if !running {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left does not outlive the gateway.
        for d in &all {
            if let Ok(reps) = d.replicas.lock() {
                for r in reps.iter() {
                    if let Some(pid) = r.state.lock().ok().and_then(|s| s.pid) {
                        signal_group(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }

    async fn reconcile_loop(self: Arc<Self>, d: Arc<DeploymentRt>) {
        loop {
            let removed =
                d.removed.load(Ordering::SeqCst) || self.shutting_down.load(Ordering::SeqCst);
            self.reconcile(&d, removed);
            if removed {
                let empty = d.replicas.lock().map(|r| r.is_empty()).unwrap_or(true);
                if empty {
                    return;
                }
            }
            tokio::select! {
                _ = d.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    fn reconcile(self: &Arc<Self>, d: &Arc<DeploymentRt>, removed: bool) {
        let spec = d.spec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !removed {
            self.autoscale(d, &spec);
        }
        let desired = if removed {
            0
        } else {
            d.desired.load(Ordering::SeqCst) as usize
        };
        let gen = d.generation.load(Ordering::SeqCst);
        let mut reps = d.replicas.lock().unwrap_or_else(|e| e.into_inner());
        reps.retain(|r| r.phase() != Phase::Stopped);
        let live: Vec<usize> = (0..reps.len()).filter(|&i| !reps[i].stopping()).collect();
        let new_gen: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| reps[i].generation() == gen)
            .collect();
        let old_gen: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| reps[i].generation() != gen)
            .collect();
        let ready = |i: &usize| reps[*i].phase() == Phase::Ready;
        let ready_total = live.iter().filter(|i| ready(i)).count();
        let mut to_start = 0usize;
        let mut to_stop: Vec<usize> = vec![];
        if old_gen.is_empty() {
            if new_gen.len() < desired {
                to_start = desired - new_gen.len();
            } else if new_gen.len() > desired {
                // Stop the ones not ready first, then the newest.
                let mut order = new_gen.clone();
                order.sort_by_key(|&i| (ready(&i), std::cmp::Reverse(i)));
                to_stop.extend(order.into_iter().take(new_gen.len() - desired));
            }
        } else {
            // Rolling update: surge new replicas, retire old ones as availability allows.
            let surge =
                spec.max_surge
                    .max(if spec.max_unavailable == 0 { 1 } else { 0 }) as usize;
            if new_gen.len() < desired && live.len() < desired + surge {
                to_start = (desired + surge - live.len()).min(desired - new_gen.len());
            }
            let min_available = desired.saturating_sub(spec.max_unavailable as usize);
            let mut available = ready_total;
            let mut old_sorted = old_gen.clone();
            old_sorted.sort_by_key(|&i| ready(&i)); // not-ready old ones go first, for free
            for i in old_sorted {
                let counts = ready(&i);
                let excess = live.len() - to_stop.len() > desired;
                if !counts || (available > min_available && (excess || new_gen.len() >= desired)) {
                    to_stop.push(i);
                    if counts {
                        available -= 1;
                    }
                }
            }
        }
        for i in to_stop {
            let _ = reps[i].stop.send(true);
        }
        for _ in 0..to_start {
            let n = d.next_id.fetch_add(1, Ordering::SeqCst);
            let id = format!("{}-{}", spec.name, n);
            let state = Arc::new(Mutex::new(ReplicaState {
                id: id.clone(),
                generation: gen,
                pid: None,
                port: None,
                phase: Phase::Starting,
                restarts: 0,
            }));
            let (tx, rx) = watch::channel(false);
            reps.push(Replica {
                state: Arc::clone(&state),
                stop: tx,
            });
            let me = Arc::clone(self);
            let spec = spec.clone();
            let wake = Arc::clone(d);
            self.rt.spawn(async move {
                me.supervise(spec, id, state, rx).await;
                wake.wake.notify_one();
            });
        }
    }

    fn autoscale(&self, d: &DeploymentRt, spec: &Deployment) {
        let Some(a) = &spec.autoscale else { return };
        let seen = (self.load)(&spec.service);
        let load = seen.inflight.max(0) as u32;
        let now = Instant::now();
        {
            let mut busy = d.last_busy.lock().unwrap_or_else(|e| e.into_inner());
            if load > 0 {
                *busy = now;
            } else if let Some(t) = seen.last_used {
                if t > *busy {
                    *busy = t;
                }
            }
        }
        let mut last = d.last_scale.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(*last) < a.cooldown.0 {
            return;
        }
        let cur = d.desired.load(Ordering::SeqCst);
        let want_for_load = load.div_ceil(a.target_inflight.max(1));
        let mut next = cur;
        if want_for_load > cur {
            next = want_for_load.min(cur + 2).min(a.max); // grow quickly but stepwise
        } else if cur > 1 && want_for_load < cur {
            next = (cur - 1).max(a.min).max(want_for_load).max(1);
        } else if cur == 1 && a.min == 0 && load == 0 {
            let idle = now.duration_since(*d.last_busy.lock().unwrap_or_else(|e| e.into_inner()));
            if idle >= a.idle_after.0 {
                next = 0;
            }
        }
        let next = next.clamp(a.min, a.max);
        if next != cur {
            log::info!(
                "orchestrator: autoscaling {} from {cur} to {next} (in flight {load})",
                spec.name
            );
            d.desired.store(next, Ordering::SeqCst);
            *last = now;
        }
    }

    async fn supervise(
        self: Arc<Self>,
        spec: Deployment,
        id: String,
        state: Arc<Mutex<ReplicaState>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff_exp = 0u32;
        let set = |f: &dyn Fn(&mut ReplicaState)| {
            if let Ok(mut s) = state.lock() {
                f(&mut s);
            }
        };
        loop {
            if *stop.borrow() {
                break;
            }
            let Some(port) = free_port() else {
                log::error!("orchestrator {id}: no free port");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let started = Instant::now();
            let mut child = match self.spawn_process(&spec, &id, port) {
                Ok(c) => c,
                Err(e) => {
                    log::error!("orchestrator {id}: cannot start {:?}: {e}", spec.command);
                    set(&|s| s.phase = Phase::BackingOff);
                    if self.backoff(&spec, &mut backoff_exp, &mut stop).await {
                        break;
                    }
                    continue;
                }
            };
            let pid = child.id();
            set(&|s| {
                s.pid = pid;
                s.port = Some(port);
                s.phase = Phase::Starting;
            });
            let outcome = self
                .run_replica(&spec, &id, port, &mut child, &mut stop, &state)
                .await;
            if let Some(pid) = pid {
                // Make sure nothing of this replica's process group survives.
                signal_group(pid, libc::SIGKILL);
            }
            let _ = child.wait().await;
            self.registry.remove_owned(&spec.service, &id);
            if outcome == Outcome::Stopped
                || *stop.borrow()
                || self.shutting_down.load(Ordering::SeqCst)
            {
                break;
            }
            self.metrics
                .orchestrator_restarts
                .with_label_values(&[&spec.name])
                .inc();
            set(&|s| {
                s.restarts += 1;
                s.phase = Phase::BackingOff;
                s.pid = None;
            });
            if started.elapsed() > Duration::from_secs(10) {
                backoff_exp = 0;
            }
            if self.backoff(&spec, &mut backoff_exp, &mut stop).await {
                break;
            }
        }
        set(&|s| {
            s.phase = Phase::Stopped;
            s.pid = None;
        });
    }

    /// Sleeps the next backoff step; true when told to stop meanwhile.
    async fn backoff(
        &self,
        spec: &Deployment,
        exp: &mut u32,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let d = spec
            .restart_backoff
            .min
            .0
            .saturating_mul(1u32 << (*exp).min(16))
            .min(spec.restart_backoff.max.0);
        *exp += 1;
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stopped(stop) => return true,
        }
        let s = *stop.borrow();
        s
    }

    fn spawn_process(
        &self,
        spec: &Deployment,
        id: &str,
        port: u16,
    ) -> std::io::Result<tokio::process::Child> {
        let args: Vec<String> = spec
            .command
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let me = self.exe.clone();
        let mut inner = args.clone();
        if inner[0] == "portico" {
            // The gateway's own binary, so demos work without `portico` on PATH.
            inner[0] = me.clone();
        }
        // Every replica runs under `portico replica-shim`, which takes its whole
        // process group down with it when the gateway goes (see shim.rs).
        let mut cmd = tokio::process::Command::new(&me);
        cmd.arg("replica-shim")
            .arg("--grace-ms")
            .arg(spec.grace_period.0.as_millis().to_string())
            .arg("--")
            .args(&inner)
            .env("PORT", port.to_string())
            .env("PORTICO_REPLICA_ID", id)
            .envs(&spec.env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = cmd.spawn()?;
        let tag = format!("{}/{}", spec.name, id);
        if let Some(out) = child.stdout.take() {
            forward_lines(&self.rt, tag.clone(), out);
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(&self.rt, tag, err);
        }
        log::info!(
            "orchestrator: started {id} (pid {:?}) on port {port}",
            child.id()
        );
        Ok(child)
    }

    async fn run_replica(
        &self,
        spec: &Deployment,
        id: &str,
        port: u16,
        child: &mut tokio::process::Child,
        stop: &mut watch::Receiver<bool>,
        state: &Arc<Mutex<ReplicaState>>,
    ) -> Outcome {
        // Starting: probe readiness until it passes.
        loop {
            tokio::select! {
                r = child.wait() => {
                    log::warn!("orchestrator: {id} exited before it was ready ({r:?})");
                    return Outcome::Exited;
                }
                _ = stopped(stop) => {
                    self.drain(spec, id, child).await;
                    return Outcome::Stopped;
                }
                _ = tokio::time::sleep(spec.readiness.interval.0) => {
                    if http_probe(port, &spec.readiness).await {
                        break;
                    }
                }
            }
        }
        let mut labels = spec.labels.clone();
        labels.insert("deployment".into(), spec.name.clone());
        match instance(
            id,
            &format!("127.0.0.1:{port}"),
            labels,
            None,
            Source::Orchestrator,
        ) {
            Ok(i) => {
                self.registry.upsert_owned(&spec.service, i);
            }
            Err(e) => log::error!("orchestrator {id}: {e}"),
        }
        if let Ok(mut s) = state.lock() {
            s.phase = Phase::Ready;
        }
        log::info!("orchestrator: {id} is ready on port {port}");
        let mut failures = 0u32;
        let liveness = spec.liveness.clone();
        let every = liveness
            .as_ref()
            .map(|l| l.interval.0)
            .unwrap_or(Duration::from_secs(3600));
        loop {
            tokio::select! {
                r = child.wait() => {
                    log::warn!("orchestrator: {id} exited ({r:?}); restarting");
                    return Outcome::Exited;
                }
                _ = stopped(stop) => {
                    if let Ok(mut s) = state.lock() {
                        s.phase = Phase::Draining;
                    }
                    self.drain(spec, id, child).await;
                    return Outcome::Stopped;
                }
                _ = tokio::time::sleep(every) => {
                    if let Some(l) = &liveness {
                        if http_probe(port, l).await {
                            failures = 0;
                        } else {
                            failures += 1;
                            if failures >= l.failure_threshold.max(1) {
                                log::warn!("orchestrator: {id} failed {failures} liveness probes; restarting");
                                return Outcome::Exited;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Takes a replica out of rotation, lets in-flight requests finish, then stops it.
    async fn drain(&self, spec: &Deployment, id: &str, child: &mut tokio::process::Child) {
        self.registry
            .set_state_owned(&spec.service, id, State::Draining);
        // Give routing a moment to swap the endpoint out before the process goes.
        tokio::time::sleep(Duration::from_millis(150)).await;
        self.registry.remove_owned(&spec.service, id);
        if let Some(pid) = child.id() {
            signal_group(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(spec.grace_period.0, child.wait())
            .await
            .is_err()
        {
            log::warn!(
                "orchestrator: {id} did not stop within {:?}; killing it",
                spec.grace_period.0
            );
            if let Some(pid) = child.id() {
                signal_group(pid, libc::SIGKILL);
            }
        }
        log::info!("orchestrator: {id} stopped");
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Exited,
    Stopped,
}

fn forward_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    rt: &tokio::runtime::Handle,
    tag: String,
    r: R,
) {
    rt.spawn(async move {
        let mut lines = tokio::io::BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log::info!(target: "replica", "[{tag}] {line}");
        }
    });
}
