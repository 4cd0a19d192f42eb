//! The edge of a listener, in front of Pingora's HTTP handling: it counts open
//! connections (closing those over `max_connections` at once) and, for each new plain
//! HTTP/1 connection, reads the first request header itself within `header_timeout`
//! (a client trickling bytes, slowloris-style, is closed at the deadline), answers a
//! malformed one with the gateway's JSON errors (400, 414, 431) instead of Pingora's
//! empty ones, and hands the bytes back to Pingora unread. TLS and HTTP/2 connections
//! go straight through; Pingora's own limits and timeouts apply after the first header.

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Limits applied before Pingora sees a request.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_request_line: usize,
    pub max_headers: usize,
    pub max_connections: usize,
    /// How long a kept-alive plain connection may wait for its next request.
    pub keepalive: Duration,
}

/// Wraps a Pingora HTTP app (the proxy) with the edge checks.
pub struct Edge<A> {
    pub inner: Arc<A>,
    pub limits: EdgeLimits,
    pub open: AtomicUsize,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// TLS handshakes and first request headers under way (see [`SocketDeadlines`]).
    pub deadlines: Arc<SocketDeadlines>,
}

fn close_fd(fd: i32) {
    // SAFETY: `fd` is a duplicate this module made and owns; it is closed once.
    unsafe {
        libc::close(fd);
    }
}

/// Sockets that must get somewhere before a deadline: through the TLS handshake (armed
/// by [`HelloDeadline`] when the ClientHello is in, disarmed when Pingora hands the
/// finished connection to the edge) and, on a TLS HTTP/1 connection, to a complete
/// first request header (armed by the edge, disarmed by the proxy: the header is read
/// inside Pingora, behind TLS, so the edge cannot read it itself). A timer shuts the
/// socket down if its entry is still armed at the deadline. An entry may carry a
/// duplicate of the descriptor, and the timer then goes through it: after a failed
/// handshake Pingora closes the descriptor and its number may be reused before the
/// deadline, while the duplicate reaches that connection's socket only.
#[derive(Default)]
pub struct SocketDeadlines {
    pending: std::sync::Mutex<std::collections::HashMap<i32, Armed>>,
    armed: AtomicUsize,
    next: std::sync::atomic::AtomicU64,
}

#[derive(Clone, Copy)]
struct Armed {
    gen: u64,
    dup: Option<i32>,
}

impl SocketDeadlines {
    /// Arms `fd` until `at` (shutting it down through `dup` when given); returns the
    /// entry's generation and its timer, which the caller may abort once disarmed.
    fn arm(
        self: &Arc<Self>,
        fd: i32,
        dup: Option<i32>,
        at: Instant,
    ) -> (u64, tokio::task::JoinHandle<()>) {
        let gen = self.next.fetch_add(1, Ordering::Relaxed);
        let old = match self.pending.lock() {
            Ok(mut p) => {
                let old = p.insert(fd, Armed { gen, dup });
                self.armed.store(p.len(), Ordering::Relaxed);
                old
            }
            Err(_) => None,
        };
        // An entry left by an earlier socket with this number (its handshake failed).
        if let Some(Armed { dup: Some(d), .. }) = old {
            close_fd(d);
        }
        let watch = Arc::clone(self);
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            if let Some(a) = watch.take(fd, Some(gen)) {
                // SAFETY: an entry without a duplicate belongs to a connection its
                // owner keeps open until it disarms the entry; a duplicate refers to
                // this connection's socket only. shutdown(2) makes the pending read or
                // handshake fail.
                unsafe {
                    libc::shutdown(a.dup.unwrap_or(fd), libc::SHUT_RDWR);
                }
                if let Some(d) = a.dup {
                    close_fd(d);
                }
            }
        });
        (gen, timer)
    }

    /// Removes `fd`'s entry (of generation `gen`, or any when None).
    fn take(&self, fd: i32, gen: Option<u64>) -> Option<Armed> {
        let mut p = self.pending.lock().ok()?;
        let a = *p.get(&fd)?;
        if gen.is_some_and(|g| g != a.gen) {
            return None;
        }
        p.remove(&fd);
        self.armed.store(p.len(), Ordering::Relaxed);
        Some(a)
    }

    /// Disarms `fd` (the entry of `gen`, or any when None) and closes its duplicate.
    fn disarm(&self, fd: i32, gen: Option<u64>) {
        if self.armed.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(Armed { dup: Some(d), .. }) = self.take(fd, gen) {
            close_fd(d);
        }
    }

    /// The first request header of the connection on `fd` arrived.
    pub fn header_arrived(&self, fd: i32) {
        self.disarm(fd, None);
    }
}

struct OpenGuard<'a>(&'a AtomicUsize);
impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the first header was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Close without an answer (timeout with nothing useful, or the client left).
    Close,
    Status(u16, &'static str, &'static str),
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`
const H2_PREFACE_LEN: usize = 24;

fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Checks a complete header block the way the proxy would rely on it.
fn validate(buf: &[u8], limits: &EdgeLimits) -> Result<(), Refusal> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers.clamp(16, 512)];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(()),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::Status(
                431,
                "headers_too_large",
                "too many request headers",
            ))
        }
        Err(_) => return Err(Refusal::Status(400, "bad_request", "malformed request")),
    }
    let mut cl: Option<&[u8]> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = h.value;
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(Refusal::Status(
                    400,
                    "bad_request",
                    "invalid Content-Length",
                ));
            }
            if cl.is_some_and(|c| c != v) {
                return Err(Refusal::Status(
                    400,
                    "bad_request",
                    "conflicting Content-Length values",
                ));
            }
            cl = Some(v);
        }
    }
    Ok(())
}

/// Reads the first header of a plain connection into `buf`.
async fn first_header(
    s: &mut L4Stream,
    limits: &EdgeLimits,
    buf: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let deadline = Instant::now() + limits.header_timeout;
    // Read straight into `buf` (no array in this future: an idle connection's task
    // keeps the future's full size for its whole life).
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(2048);
        }
        if buf.starts_with(b"PRI ") && buf.len() >= H2_PREFACE_LEN {
            // HTTP/2 with prior knowledge, preface complete: Pingora handles it from here.
            return Ok(());
        }
        if buf.starts_with(b"PRI ") {
            // The rest of the h2c preface must arrive within the header timeout too.
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.read_buf(buf)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => return Err(Refusal::Close),
            }
        }
        let line_end = buf.windows(2).position(|w| w == b"\r\n");
        if line_end.map_or(buf.len(), |p| p) > limits.max_request_line {
            return Err(Refusal::Status(
                414,
                "uri_too_long",
                "the request line is too long",
            ));
        }
        if let Some(end) = find_end(buf) {
            if end > limits.max_header_bytes {
                return Err(Refusal::Status(
                    431,
                    "headers_too_large",
                    "request headers are too large",
                ));
            }
            return validate(&buf[..end], limits);
        }
        if line_end.is_none() && buf.len() > limits.max_request_line {
            return Err(Refusal::Status(
                414,
                "uri_too_long",
                "the request line is too long",
            ));
        }
        if buf.len() > limits.max_header_bytes {
            return Err(Refusal::Status(
                431,
                "headers_too_large",
                "request headers are too large",
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if buf.is_empty() {
                Refusal::Close
            } else {
                Refusal::Status(
                    408,
                    "request_timeout",
                    "the request header did not arrive in time",
                )
            });
        }
        match tokio::time::timeout(left, s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Refusal::Close),
            Ok(Ok(_)) => {}
            Err(_) => {
                return Err(if buf.is_empty() {
                    Refusal::Close
                } else {
                    Refusal::Status(
                        408,
                        "request_timeout",
                        "the request header did not arrive in time",
                    )
                })
            }
        }
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Edge<A> {
    /// Serves a plain HTTP/1 connection request by request. Between two requests the
    /// connection waits here, in a small future, for the first byte of the next one;
    /// Pingora's per-request state (its session, the proxy's request future) exists
    /// only while a request is being handled, so an idle kept-alive connection costs
    /// little more than its socket. The wait ends at the keep-alive timeout and at
    /// shutdown (an idle connection is then closed: no request is lost).
    async fn serve_h1(
        self: &Arc<Self>,
        l4: Box<L4Stream>,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream: Stream = l4;
        let mut persisted: Option<HttpPersistentSettings> = None;
        let mut first = true;
        loop {
            // The session is built and handed over in a plain function: kept as a local
            // here, its ~0.7 KB would stay in the state of every idle connection.
            let request = self.start_request(stream, persisted.take(), first, shutdown);
            first = false;
            let (s, p) = request.await?.consume();
            persisted = p;
            stream = self.next_request(s, shutdown).await?;
        }
    }

    /// Pingora's handling of one request on `stream`, with the connection's settings.
    fn start_request<'a>(
        self: &'a Arc<Self>,
        stream: Stream,
        persisted: Option<HttpPersistentSettings>,
        first: bool,
        shutdown: &'a ShutdownWatch,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<ReusedHttpStream>> + Send + 'a>>
    {
        let mut session = ServerSession::new_http1(stream);
        match persisted {
            Some(p) => p.apply_to_session(&mut session),
            None if first => {
                // What Pingora sets on a new connection (the proxy refines it per request).
                session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
                session.set_keepalive_reuses_remaining(
                    self.inner
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            }
            None => {}
        }
        self.inner.process_new_http(session, shutdown)
    }

    /// Waits for the next request on a kept-alive connection and gives the connection
    /// back with the bytes that came unread; `None` closes it. The keep-alive deadline
    /// is Pingora's coarse timer (the one it uses for its own idle reads): a tokio
    /// timer is a cache-padded entry in every idle connection's state and a wheel
    /// insertion per request.
    async fn next_request(&self, s: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut l4 = match s.into_any().downcast::<L4Stream>() {
            Ok(l4) => l4,
            Err(_) => return None,
        };
        if *shutdown.borrow() {
            return None;
        }
        let mut shutdown = shutdown.clone();
        tokio::select! {
            r = pingora::time::fast_timeout::fast_timeout(self.limits.keepalive, NextBytes(&mut l4)) => match r {
                Ok(true) => Some(l4),
                _ => None,
            },
            _ = shutdown.changed() => None,
        }
    }
}

thread_local! {
    /// Scratch space for [`NextBytes`]: used only inside one synchronous poll, so one
    /// buffer per thread serves every idle connection.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; 4096].into_boxed_slice());
}

/// Waits until a kept-alive connection has bytes, reads what is there (up to 4 KiB,
/// usually the whole next request) and puts it back in front of the stream for
/// Pingora: `true` when bytes came, `false` at end of stream or on an error. The bytes
/// land in a per-thread scratch buffer, so a waiting connection holds no buffer, and
/// the request is read with one `read` call instead of a one-byte read and another.
struct NextBytes<'a>(&'a mut L4Stream);

impl std::future::Future for NextBytes<'_> {
    type Output = bool;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<bool> {
        let l4 = &mut *self.0;
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => poll_rewind(l4, cx, &mut scratch[..]),
            // Not reachable (no poll inside a poll); a byte's worth does it too.
            Err(_) => poll_rewind(l4, cx, &mut [0u8; 1]),
        })
    }
}

/// Polls one read into `buf` and puts what came back in front of `l4`.
fn poll_rewind(
    l4: &mut L4Stream,
    cx: &mut std::task::Context<'_>,
    buf: &mut [u8],
) -> std::task::Poll<bool> {
    use std::task::Poll;
    use tokio::io::{AsyncRead, ReadBuf};
    let mut rb = ReadBuf::new(buf);
    match std::pin::Pin::new(&mut *l4).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
            l4.rewind(rb.filled());
            Poll::Ready(true)
        }
        Poll::Ready(_) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}

thread_local! {
    static TICKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keeps a one-second ticker on the calling worker thread's runtime, for two jobs.
/// Timers: tokio wakes its driver through an eventfd (a `write` and one more
/// `epoll_wait`) whenever a new timer is due before the driver's next planned wakeup,
/// and with nothing else scheduled that is every new connection's header timer. With
/// a timer always due within a second, those timers (seconds away) never move the
/// wakeup earlier. Memory: each tick lets the allocator return this thread's
/// long-freed pages (see `release_freed_memory` in main.rs).
fn start_worker_ticker() {
    TICKING.with(|t| {
        if t.get() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        t.set(true);
        tokio::spawn(async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                crate::release_freed_memory();
            }
        });
    });
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Edge<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        start_worker_ticker();
        let n = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let _guard = OpenGuard(&self.open);
        if n > self.limits.max_connections {
            log::warn!("connection refused: {n} open connections (max_connections)");
            return None;
        }
        let plain = stream.get_ssl_digest().is_none() && stream.as_any().is::<L4Stream>();
        if !plain {
            // The handshake is done.
            self.deadlines.disarm(stream.id(), None);
            let h2 = matches!(
                stream.selected_alpn_proto(),
                Some(pingora::protocols::ALPN::H2)
            );
            if h2 || stream.get_ssl_digest().is_none() {
                return self.inner.process_new(stream, shutdown).await;
            }
            let fd = stream.id();
            // TLS HTTP/1: the first header must arrive within the header timeout.
            let at = Instant::now() + self.limits.header_timeout;
            let (gen, timer) = self.deadlines.arm(fd, None, at);
            let r = self.inner.process_new(stream, shutdown).await;
            self.deadlines.disarm(fd, Some(gen));
            timer.abort();
            return r;
        }
        let Ok(mut l4) = stream.into_any().downcast::<L4Stream>() else {
            return None; // checked above
        };
        let mut buf = Vec::with_capacity(1024);
        match Box::pin(first_header(&mut l4, &self.limits, &mut buf)).await {
            Ok(()) if buf.starts_with(b"PRI ") => {
                l4.rewind(&buf);
                self.inner.process_new(l4, shutdown).await
            }
            Ok(()) => {
                l4.rewind(&buf);
                drop(buf);
                self.serve_h1(l4, shutdown).await
            }
            Err(Refusal::Close) => None,
            Err(Refusal::Status(status, code, msg)) => {
                let id = format!("{:032x}", rand::random::<u128>());
                let body = super::respond::error_body(code, msg, &id);
                let reason = http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("Error");
                let head = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = l4.write_all(head.as_bytes()).await;
                let _ = l4.write_all(&body).await;
                let _ = l4.flush().await;
                let _ = l4.shutdown().await;
                self.metrics
                    .requests
                    .with_label_values(&["", "OTHER", &status.to_string()])
                    .inc();
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Before a TLS handshake: the ClientHello must arrive within the header timeout, so
/// connections that never start (or trickle) a handshake are closed, not held; and the
/// rest of the handshake must be done by the same deadline (a client that stops after
/// its ClientHello is shut down then, not after Pingora's fixed 60 s).
pub struct HelloDeadline {
    pub timeout: Duration,
    pub deadlines: Arc<SocketDeadlines>,
}

#[async_trait]
impl pingora::listeners::PreTlsProcess for HelloDeadline {
    async fn process(&self, s: &mut L4Stream) -> pingora::Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        let mut chunk = [0u8; 2048];
        loop {
            if buf.len() >= 5 {
                // A TLS record: type 0x16 (handshake), then version, then the length.
                let need = 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize;
                if buf[0] != 0x16 || buf.len() >= need {
                    break;
                }
            }
            if buf.len() > 20_000 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let read = tokio::time::timeout(left, s.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => {
                    return pingora::Error::e_explain(
                        pingora::ErrorType::ConnectionClosed,
                        "closed before the TLS handshake",
                    )
                }
                Err(_) => {
                    return pingora::Error::e_explain(
                        pingora::ErrorType::ReadTimedout,
                        "no TLS ClientHello within the header timeout",
                    )
                }
            }
        }
        s.rewind(&buf);
        self.watch_handshake(s, deadline);
        Ok(())
    }
}

impl HelloDeadline {
    /// Arms the handshake deadline for the socket of `s`.
    fn watch_handshake(&self, s: &L4Stream, deadline: Instant) {
        use std::os::fd::AsRawFd;
        let fd = s.as_raw_fd();
        // SAFETY: duplicating a descriptor this connection owns; the duplicate is
        // owned by the entry and closed exactly once (`disarm`, the timer, or `arm`).
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return;
        }
        self.deadlines.arm(fd, Some(dup), deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> EdgeLimits {
        EdgeLimits {
            header_timeout: Duration::from_secs(1),
            max_header_bytes: 64 * 1024,
            max_request_line: 8192,
            max_headers: 100,
            max_connections: 10,
            keepalive: Duration::from_secs(60),
        }
    }

    #[test]
    fn validation() {
        let l = limits();
        assert_eq!(validate(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &l), Ok(()));
        assert!(validate(b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", &l).is_err());
        assert!(validate(b"GARBAGE\r\n\r\n", &l).is_err());
        assert!(validate(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            &l
        )
        .is_err());
        assert!(validate(b"POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n", &l).is_err());
        assert_eq!(
            validate(
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                &l
            ),
            Ok(())
        );
    }
}
