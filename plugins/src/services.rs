//! Shared services the gateway hands to plugin factories at build time, and the one
//! such service today: a shared, self-reconnecting Redis connection.
//!
//! The plugin crate never depends on the gateway, so whatever a plugin needs from
//! outside its own settings arrives here, explicitly: the gateway builds one
//! [`Services`] per config (from the top-level `redis:` section and its background
//! runtime) and passes it with the plugin's scope in a [`BuildEnv`] to
//! [`crate::Factory::build_with`]. `portico check` builds the same `Services` without a
//! runtime: settings are checked, nothing connects.
//!
//! [`SharedRedis`] is one multiplexed connection shared by every plugin instance that
//! uses Redis. It never makes a request wait for a connection: while it is down, calls
//! fail at once (the caller applies its fallback) and a single background task
//! reconnects with exponential backoff (first try at once, then 100 ms doubling up to
//! 5 s). Each call has a short deadline (`redis.timeout`, 25 ms by default). A call
//! that fails on the connection (I/O, protocol) marks it down at once; calls that run
//! past the deadline do after three in a row (one slow answer on a busy machine is not
//! a dead Redis, and reconnecting costs more than waiting), so a hung Redis costs at
//! most three deadlines plus one per request in flight at that moment, not one per
//! request after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// What a factory gets besides its settings.
pub struct BuildEnv<'a> {
    /// Where the plugin entry is: `""` for the global list, else the route's name.
    pub scope: &'a str,
    /// Shared services of this config.
    pub services: &'a Services,
}

impl BuildEnv<'static> {
    /// The global scope without shared services (tests, plugins built on their own).
    pub fn bare() -> BuildEnv<'static> {
        static NONE: Services = Services {
            redis: None,
            events: None,
        };
        BuildEnv {
            scope: "",
            services: &NONE,
        }
    }
}

/// Shared services for plugins, one set per compiled config.
#[derive(Clone, Default)]
pub struct Services {
    /// The top-level `redis:` connection, when the config has one.
    pub redis: Option<Arc<SharedRedis>>,
    /// Where plugins report what the gateway counts (metrics); none in `portico check`.
    pub events: Option<Arc<dyn Events>>,
}

/// Events plugins report to the gateway beyond their hooks' results (the gateway
/// turns them into metrics).
pub trait Events: Send + Sync {
    /// A shared store could not answer for a request of `route`; `fallback` is what
    /// the plugin did instead (`allow`, `deny` or `local`).
    fn store_error(&self, plugin: &'static str, route: &str, fallback: &'static str);
}

/// The top-level `redis:` settings as the plugins see them.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://[user:pass@]host:port[/db]` or `redis+unix:///path`.
    pub url: String,
    /// Deadline of one call (script evaluation).
    pub timeout: Duration,
    /// Deadline of one connection attempt (connect + handshake + PING).
    pub connect_timeout: Duration,
    /// Prepended to every key Portico writes.
    pub key_prefix: String,
}

/// Why a Redis call did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No connection right now (down, reconnecting, or no runtime to connect from).
    #[error("redis is not connected")]
    Down,
    /// The call did not finish within `redis.timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The call failed (I/O, protocol or a script error).
    #[error("redis call failed: {0}")]
    Failed(String),
}

enum Conn {
    Up(redis::aio::MultiplexedConnection, u64),
    Down,
}

/// One shared Redis connection with reconnection in the background.
pub struct SharedRedis {
    settings: RedisSettings,
    client: redis::Client,
    rt: Option<tokio::runtime::Handle>,
    conn: Mutex<Conn>,
    /// Set while the reconnect task runs, so only one runs.
    reconnecting: std::sync::atomic::AtomicBool,
    generation: AtomicU64,
    errors: AtomicU64,
    /// Calls in a row that ran past the deadline.
    timeouts: std::sync::atomic::AtomicU32,
}

/// Calls in a row past the deadline that mark the connection down.
const TIMEOUTS_TO_DOWN: u32 = 3;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl SharedRedis {
    /// Checks the URL and, with a runtime, starts connecting on it in the background
    /// (without one, e.g. in `portico check`, it never connects).
    pub fn new(
        settings: RedisSettings,
        rt: Option<tokio::runtime::Handle>,
    ) -> Result<Arc<SharedRedis>, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("url: not a usable Redis URL: {e}"))?;
        let r = Arc::new(SharedRedis {
            settings,
            client,
            rt,
            conn: Mutex::new(Conn::Down),
            reconnecting: std::sync::atomic::AtomicBool::new(false),
            generation: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: std::sync::atomic::AtomicU32::new(0),
        });
        r.reconnect();
        Ok(r)
    }

    /// The settings this connection was made from.
    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    /// Calls that failed (down, timed out or errored) since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// True while a connection is up.
    pub fn is_up(&self) -> bool {
        matches!(*self.lock(), Conn::Up(..))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        match self.conn.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Starts the reconnect task unless one runs (or there is no runtime).
    fn reconnect(self: &Arc<Self>) {
        let Some(rt) = &self.rt else { return };
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<SharedRedis> = Arc::downgrade(self);
        rt.spawn(async move {
            let mut backoff = Duration::ZERO;
            loop {
                if !backoff.is_zero() {
                    tokio::time::sleep(backoff).await;
                }
                // The gateway dropped this connection (new URL): stop.
                let Some(me) = weak.upgrade() else { return };
                match me.connect().await {
                    Ok(c) => {
                        let generation = me.generation.fetch_add(1, Ordering::AcqRel) + 1;
                        *me.lock() = Conn::Up(c, generation);
                        me.reconnecting.store(false, Ordering::Release);
                        log::info!("redis: connected to {}", redacted(&me.settings.url));
                        return;
                    }
                    Err(e) => {
                        backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                        log::warn!(
                            "redis: cannot connect to {}: {e}; next try in {backoff:?}",
                            redacted(&me.settings.url)
                        );
                    }
                }
            }
        });
    }

    async fn connect(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(None);
        let fut = async {
            let mut c = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<()>(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(c)
        };
        match tokio::time::timeout(self.settings.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {:?}",
                self.settings.connect_timeout
            )),
        }
    }

    /// Marks the connection of `generation` down and starts reconnecting.
    fn failed(self: &Arc<Self>, generation: u64) {
        {
            let mut c = self.lock();
            if matches!(*c, Conn::Up(_, g) if g == generation) {
                *c = Conn::Down;
            }
        }
        self.reconnect();
    }

    /// Runs `cmd` within the deadline. Any failure counts as a store error and, unless
    /// it is an error the script itself raised, marks the connection down.
    pub async fn query<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let r = self.query_once(cmd).await;
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        r.map_err(|(e, _)| e)
    }

    /// Runs `script` (EVALSHA, then EVAL when Redis answers NOSCRIPT) within the
    /// deadline of one call each.
    pub async fn eval<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        script: &redis::Script,
        source: &str,
        keys: &[&str],
        args: &[String],
    ) -> Result<T, StoreError> {
        let build = |head: &str, first: &str| {
            let mut c = redis::cmd(head);
            c.arg(first).arg(keys.len()).arg(keys).arg(args);
            c
        };
        let r = match self.query_once(&build("EVALSHA", script.get_hash())).await {
            Err((_, true)) => self.query_once(&build("EVAL", source)).await,
            other => other,
        };
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        r.map_err(|(e, _)| e)
    }

    /// One call; the error's flag is true when Redis answered NOSCRIPT.
    async fn query_once<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        cmd: &redis::Cmd,
    ) -> Result<T, (StoreError, bool)> {
        let (mut conn, generation) = match &*self.lock() {
            Conn::Up(c, g) => (c.clone(), *g),
            Conn::Down => return Err((StoreError::Down, false)),
        };
        let r = tokio::time::timeout(self.settings.timeout, cmd.query_async::<T>(&mut conn)).await;
        if r.is_ok() {
            self.timeouts.store(0, Ordering::Relaxed);
        }
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code() == Some("NOSCRIPT") => {
                Err((StoreError::Failed(e.to_string()), true))
            }
            Ok(Err(e)) => {
                // A server-side error reply (a script bug, a wrong type) leaves the
                // connection usable; anything else (I/O, protocol) does not.
                if e.code().is_none() || e.is_unrecoverable_error() {
                    self.failed(generation);
                }
                Err((StoreError::Failed(e.to_string()), false))
            }
            Err(_) => {
                if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_TO_DOWN {
                    self.timeouts.store(0, Ordering::Relaxed);
                    self.failed(generation);
                }
                Err((StoreError::Timeout(self.settings.timeout), false))
            }
        }
    }
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://<redacted>@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// When the connection comes up (tests and start-up logs).
pub async fn wait_up(r: &SharedRedis, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if r.is_up() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.is_up()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        assert_eq!(
            redacted("redis://u:secret@h:6379/0"),
            "redis://<redacted>@h:6379/0"
        );
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_redis_costs_three_deadlines_then_fails_fast() {
        let server = testredis::RedisServer::start();
        let mut settings = server.settings();
        settings.timeout = Duration::from_millis(50);
        let r = SharedRedis::new(settings, Some(tokio::runtime::Handle::current())).unwrap();
        assert!(wait_up(&r, Duration::from_secs(5)).await);
        let ping = redis::cmd("PING");
        assert_eq!(r.query::<String>(&ping).await.unwrap(), "PONG");
        server.signal("STOP");
        for i in 0..TIMEOUTS_TO_DOWN {
            let t = Instant::now();
            let e = r.query::<String>(&ping).await.unwrap_err();
            assert_eq!(
                e,
                StoreError::Timeout(Duration::from_millis(50)),
                "call {i}"
            );
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{:?}",
                t.elapsed()
            );
        }
        let t = Instant::now();
        assert_eq!(r.query::<String>(&ping).await, Err(StoreError::Down));
        assert!(t.elapsed() < Duration::from_millis(5), "{:?}", t.elapsed());
        server.signal("CONT");
        assert!(wait_up(&r, Duration::from_secs(8)).await, "reconnected");
        assert_eq!(r.query::<String>(&ping).await.unwrap(), "PONG");
        assert_eq!(r.errors(), u64::from(TIMEOUTS_TO_DOWN) + 1);
    }

    #[test]
    fn bad_url_is_refused_without_a_runtime() {
        let s = |url: &str| RedisSettings {
            url: url.into(),
            timeout: Duration::from_millis(25),
            connect_timeout: Duration::from_millis(500),
            key_prefix: "portico:".into(),
        };
        assert!(SharedRedis::new(s("http://x"), None).is_err());
        let r = SharedRedis::new(s("redis://127.0.0.1:1"), None).unwrap();
        assert!(!r.is_up());
    }
}

/// A real `redis-server` on a free loopback port for unit tests, killed on drop.
#[cfg(test)]
pub(crate) mod testredis {
    use super::*;

    pub struct RedisServer {
        pub port: u16,
        child: Option<std::process::Child>,
    }

    impl RedisServer {
        /// Starts one on a free port and waits until it answers.
        pub fn start() -> RedisServer {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let mut s = RedisServer { port, child: None };
            s.restart();
            s
        }

        /// Starts (again) on the same port.
        pub fn restart(&mut self) {
            let child = std::process::Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (scripts/setup.sh installs it) must be on PATH");
            self.child = Some(child);
            let end = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                assert!(Instant::now() < end, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Sends a signal to it (`STOP`, `CONT`).
        pub fn signal(&self, sig: &str) {
            let pid = self.child.as_ref().map(|c| c.id()).unwrap();
            let ok = std::process::Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -{sig} {pid}");
        }

        /// Kills it (SIGKILL) and waits.
        pub fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        pub fn settings(&self) -> RedisSettings {
            RedisSettings {
                url: format!("redis://127.0.0.1:{}", self.port),
                timeout: Duration::from_millis(500),
                connect_timeout: Duration::from_millis(500),
                key_prefix: "portico-test:".into(),
            }
        }

        /// A connection from the current runtime, up.
        pub async fn connect(&self) -> Arc<SharedRedis> {
            let r =
                SharedRedis::new(self.settings(), Some(tokio::runtime::Handle::current())).unwrap();
            assert!(wait_up(&r, Duration::from_secs(5)).await, "not connected");
            r
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            if let Some(c) = &self.child {
                // A stopped server must be woken to die quickly.
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
            }
            self.kill();
        }
    }
}
