//! loadgen: the load generator of Portico's `bench/run.sh`.
//!
//! Two modes, both single-threaded (pin the process with `taskset`), both
//! HTTP/1.1 over plain TCP to a loopback URL, and both print one JSON object on
//! stdout:
//!
//! * `loadgen rate --url URL -c CONNS -R RATE -d SECS [--warmup SECS] [--pid PID]...`
//!   Open-loop, fixed-rate load. CONNS keep-alive connections each follow their
//!   own evenly spaced schedule (aggregate RATE requests/s, the connections
//!   offset from each other), one request in flight per connection. Latency is
//!   corrected for coordinated omission: when a connection is still busy with
//!   the previous response at a request's scheduled time, the request's latency
//!   counts from that scheduled time, not from when it could actually be sent.
//!   When the connection was idle, it counts from the actual send (tokio's
//!   timer has 1 ms granularity; that lateness is ours, not the server's, and is
//!   reported separately as `send_lag_*`). For every `--pid`, the CPU time
//!   (utime+stime of /proc/PID/stat, all threads) is read at the start and at
//!   the end of the measured window and reported per completed request.
//!
//! * `loadgen idle --url URL -n N [--pid PID]... [--hold SECS]`
//!   Memory per idle keep-alive connection: reads the summed VmRSS of the
//!   `--pid` processes, opens N keep-alive connections, sends one request on
//!   each and reads the response, lets them sit idle, reads VmRSS again and
//!   reports the difference per connection.
//!
//! Every run is bounded in time: the rate mode stops sending at its deadline and
//! waits at most `--timeout` for answers still in flight; the idle mode gives up
//! on connections that do not answer within `--timeout`.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::process::exit;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, sleep_until, timeout};

// ---------------------------------------------------------------- arguments

struct Target {
    addr: SocketAddr,
    request: Vec<u8>,
}

fn parse_url(url: &str) -> Target {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| die(&format!("only http:// URLs are supported: {url}")));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .unwrap_or_else(|_| die(&format!("the URL needs a literal IP:PORT: {url}")));
    if !addr.ip().is_loopback() {
        die("this load generator only targets loopback addresses");
    }
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: portico-loadgen\r\nAccept: */*\r\n\r\n"
    )
    .into_bytes();
    Target { addr, request }
}

fn die(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    eprintln!(
        "usage: loadgen rate --url URL -c CONNS -R RATE -d SECS [--warmup SECS] [--timeout SECS] [--pid PID]...\n       \
         loadgen idle --url URL -n CONNS [--parallel K] [--hold SECS] [--settle SECS] [--timeout SECS] [--pid PID]..."
    );
    exit(2)
}

#[derive(Default)]
struct Opts {
    url: Option<String>,
    conns: Option<usize>,
    rate: Option<f64>,
    duration: Option<f64>,
    warmup: f64,
    timeout: f64,
    pids: Vec<u32>,
    parallel: usize,
    hold: f64,
    settle: f64,
}

fn parse_opts(args: &[String]) -> Opts {
    let mut o = Opts {
        timeout: 5.0,
        parallel: 100,
        settle: 1.0,
        ..Default::default()
    };
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        let val = args
            .get(i + 1)
            .unwrap_or_else(|| die(&format!("{flag} needs a value")));
        let num = |v: &str| -> f64 {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .unwrap_or_else(|| die(&format!("bad value for {flag}: {v}")))
        };
        match flag {
            "--url" => o.url = Some(val.clone()),
            "-c" | "-n" | "--conns" => o.conns = Some(num(val) as usize),
            "-R" | "--rate" => o.rate = Some(num(val)),
            "-d" | "--duration" => o.duration = Some(num(val)),
            "--warmup" => o.warmup = num(val),
            "--timeout" => o.timeout = num(val),
            "--pid" => o.pids.push(num(val) as u32),
            "--parallel" => o.parallel = (num(val) as usize).max(1),
            "--hold" => o.hold = num(val),
            "--settle" => o.settle = num(val),
            _ => die(&format!("unknown argument {flag}")),
        }
        i += 2;
    }
    o
}

// ---------------------------------------------------------------- /proc

/// utime+stime of a process (all its threads, live and exited) in microseconds.
fn proc_cpu_us(pid: u32, tick_hz: u64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after the comm: state is field 3 of the man page, utime 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 1_000_000 / tick_hz)
}

/// On-CPU time of the live threads of a process from schedstat, in
/// microseconds (nanosecond resolution, unlike the 10 ms ticks of stat).
fn proc_sched_us(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?;
        let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total / 1000)
}

fn proc_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn sum_over<F: Fn(u32) -> Option<u64>>(pids: &[u32], f: F) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| f(*p)).sum()
}

// ---------------------------------------------------------------- HTTP/1.1

enum Parsed {
    /// Need more bytes.
    Partial,
    /// A full response: bytes consumed, status, whether the server closes.
    Done(usize, u16, bool),
    /// The body runs until the server closes (no length, not chunked).
    UntilClose(u16),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(buf: &[u8]) -> Result<Parsed, &'static str> {
    let Some(hend) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("response header too large");
        }
        return Ok(Parsed::Partial);
    };
    let head = std::str::from_utf8(&buf[..hend]).map_err(|_| "non-UTF-8 header")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    if !status_line.starts_with("HTTP/1.") {
        return Err("not an HTTP/1 response");
    }
    let status: u16 = status_line
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().map_err(|_| "bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let body = hend + 4;
    if (100..200).contains(&status) {
        // Interim response (e.g. 100 Continue): skip it; the caller re-parses.
        return Ok(Parsed::Done(body, status, false));
    }
    if status == 204 || status == 304 {
        return Ok(Parsed::Done(body, status, close));
    }
    if chunked {
        let mut pos = body;
        loop {
            let Some(le) = find(&buf[pos..], b"\r\n") else {
                return Ok(Parsed::Partial);
            };
            let line = std::str::from_utf8(&buf[pos..pos + le]).map_err(|_| "bad chunk")?;
            let hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16).map_err(|_| "bad chunk size")?;
            pos += le + 2;
            if size == 0 {
                // Trailers, then an empty line.
                loop {
                    let Some(le) = find(&buf[pos..], b"\r\n") else {
                        return Ok(Parsed::Partial);
                    };
                    pos += le + 2;
                    if le == 0 {
                        return Ok(Parsed::Done(pos, status, close));
                    }
                }
            }
            if buf.len() < pos + size + 2 {
                return Ok(Parsed::Partial);
            }
            pos += size + 2;
        }
    }
    match content_length {
        Some(n) if buf.len() >= body + n => Ok(Parsed::Done(body + n, status, close)),
        Some(_) => Ok(Parsed::Partial),
        None => Ok(Parsed::UntilClose(status)),
    }
}

/// Sends one request and reads one full response. Returns the status and
/// whether the connection can be reused.
async fn exchange(
    stream: &mut TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<(u16, bool)> {
    stream.write_all(req).await?;
    buf.clear();
    loop {
        match parse_response(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            Parsed::Done(n, status, close) => {
                if (100..200).contains(&status) {
                    buf.drain(..n);
                    continue;
                }
                if n != buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bytes after the response",
                    ));
                }
                return Ok((status, !close));
            }
            Parsed::Partial => {
                if stream.read_buf(buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Parsed::UntilClose(status) => {
                if stream.read_buf(buf).await? == 0 {
                    return Ok((status, false));
                }
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

// ---------------------------------------------------------------- rate mode

#[derive(Default)]
struct ConnStats {
    sent: u64,
    completed: u64,
    /// Completed requests whose response arrived inside the measured window.
    completed_in_window: u64,
    non_2xx: u64,
    errors: u64,
    timeouts: u64,
    reconnects: u64,
    /// Scheduled slots of the measured window that were never sent because the
    /// deadline came first (the connection was behind schedule).
    unsent: u64,
    latencies_us: Vec<u32>,
    send_lag_us: Vec<u32>,
}

struct Sched {
    measure_start: Instant,
    end: Instant,
    first: Instant,
    interval: Duration,
    resp_timeout: Duration,
}

async fn rate_conn(
    target: std::rc::Rc<Target>,
    s: Sched,
    mut stream: Option<TcpStream>,
) -> ConnStats {
    let mut st = ConnStats::default();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut next = s.first;
    let mut prev_done = s.first;
    while next < s.end {
        let now = Instant::now();
        if now >= s.end {
            break;
        }
        if next > now {
            sleep_until(next.into()).await;
        }
        let recorded = next >= s.measure_start;
        if stream.is_none() {
            match timeout(s.resp_timeout, connect(target.addr)).await {
                Ok(Ok(c)) => {
                    stream = Some(c);
                    st.reconnects += 1;
                }
                _ => {
                    if recorded {
                        st.errors += 1;
                    }
                    prev_done = Instant::now();
                    next += s.interval;
                    sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let conn = stream.as_mut().expect("connected");
        let send_at = Instant::now();
        let busy = prev_done > next;
        let res = timeout(s.resp_timeout, exchange(conn, &target.request, &mut buf)).await;
        let done = Instant::now();
        if recorded {
            st.sent += 1;
        }
        match res {
            Ok(Ok((status, keep))) => {
                if recorded {
                    st.completed += 1;
                    if !(200..300).contains(&status) {
                        st.non_2xx += 1;
                    }
                    let from = if busy { next } else { send_at };
                    st.latencies_us
                        .push(done.duration_since(from).as_micros().min(u32::MAX as u128) as u32);
                    if !busy {
                        st.send_lag_us.push(
                            send_at
                                .duration_since(next)
                                .as_micros()
                                .min(u32::MAX as u128) as u32,
                        );
                    }
                }
                if done >= s.measure_start && done <= s.end + s.resp_timeout {
                    st.completed_in_window += 1;
                }
                if !keep {
                    stream = None;
                }
            }
            Ok(Err(_)) => {
                if recorded {
                    st.errors += 1;
                }
                stream = None;
            }
            Err(_) => {
                if recorded {
                    st.errors += 1;
                    st.timeouts += 1;
                }
                stream = None;
            }
        }
        prev_done = done;
        next += s.interval;
    }
    // Slots of the window that the deadline cut off.
    while next < s.end {
        if next >= s.measure_start {
            st.unsent += 1;
        }
        next += s.interval;
    }
    st
}

fn pct(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as u64
}

fn run_rate(o: Opts) {
    let url = o.url.clone().unwrap_or_else(|| die("--url is required"));
    let conns = o.conns.unwrap_or(50).max(1);
    let rate = o.rate.unwrap_or_else(|| die("-R RATE is required"));
    let duration = o.duration.unwrap_or_else(|| die("-d SECS is required"));
    if rate <= 0.0 || duration <= 0.0 {
        die("RATE and SECS must be positive");
    }
    let target = std::rc::Rc::new(parse_url(&url));
    let tick_hz = clock_ticks();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let pids = o.pids.clone();
    let out = local.block_on(&rt, async move {
        // Connect everything first (not part of the schedule).
        let mut streams = Vec::with_capacity(conns);
        for _ in 0..conns {
            match timeout(Duration::from_secs(5), connect(target.addr)).await {
                Ok(Ok(s)) => streams.push(Some(s)),
                _ => streams.push(None),
            }
        }
        let connect_failures = streams.iter().filter(|s| s.is_none()).count();
        let interval = Duration::from_secs_f64(conns as f64 / rate);
        let t0 = Instant::now() + Duration::from_millis(20);
        let measure_start = t0 + Duration::from_secs_f64(o.warmup);
        let end = measure_start + Duration::from_secs_f64(duration);
        let resp_timeout = Duration::from_secs_f64(o.timeout.max(0.1));
        // CPU sample at the start of the measured window.
        let pids2 = pids.clone();
        let cpu_start = tokio::task::spawn_local(async move {
            sleep_until(measure_start.into()).await;
            (
                Instant::now(),
                sum_over(&pids2, |p| proc_cpu_us(p, tick_hz)),
                sum_over(&pids2, proc_sched_us),
            )
        });
        let mut handles = Vec::with_capacity(conns);
        for (i, s) in streams.into_iter().enumerate() {
            let first = t0 + interval.mul_f64(i as f64 / conns as f64);
            let sched = Sched {
                measure_start,
                end,
                first,
                interval,
                resp_timeout,
            };
            let tgt = target.clone();
            handles.push(tokio::task::spawn_local(rate_conn(tgt, sched, s)));
        }
        let mut all = ConnStats::default();
        for h in handles {
            let st = h.await.expect("connection task");
            all.sent += st.sent;
            all.completed += st.completed;
            all.completed_in_window += st.completed_in_window;
            all.non_2xx += st.non_2xx;
            all.errors += st.errors;
            all.timeouts += st.timeouts;
            all.reconnects += st.reconnects;
            all.unsent += st.unsent;
            all.latencies_us.extend(st.latencies_us);
            all.send_lag_us.extend(st.send_lag_us);
        }
        let t_end = Instant::now();
        let cpu_end = sum_over(&pids, |p| proc_cpu_us(p, tick_hz));
        let sched_end = sum_over(&pids, proc_sched_us);
        let (t_start, cpu_begin, sched_begin) = cpu_start.await.expect("cpu sampler");
        (
            all,
            connect_failures,
            t_end.duration_since(t_start),
            cpu_begin.zip(cpu_end).map(|(a, b)| b.saturating_sub(a)),
            sched_begin.zip(sched_end).map(|(a, b)| b.saturating_sub(a)),
        )
    });
    let (mut all, connect_failures, window, cpu_us, sched_us) = out;
    all.latencies_us.sort_unstable();
    all.send_lag_us.sort_unstable();
    let scheduled = all.sent + all.unsent;
    let self_cpu_us = proc_cpu_us(std::process::id(), tick_hz).unwrap_or(0);
    let mut j = String::new();
    let _ = write!(
        j,
        "{{\"mode\":\"rate\",\"url\":\"{url}\",\"connections\":{conns},\"target_rate\":{rate},\
         \"duration_s\":{duration},\"warmup_s\":{},\"scheduled\":{scheduled},\"sent\":{},\
         \"completed\":{},\"errors\":{},\"timeouts\":{},\"non_2xx\":{},\"unsent\":{},\
         \"connect_failures\":{connect_failures},\"reconnects\":{},\"achieved_rate\":{:.1},\
         \"sustained\":{},\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\
         \"send_lag_us\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"window_s\":{:.3},\
         \"self_cpu_us\":{self_cpu_us}",
        o.warmup,
        all.sent,
        all.completed,
        all.errors,
        all.timeouts,
        all.non_2xx,
        all.unsent,
        all.reconnects,
        all.completed as f64 / duration,
        all.unsent as f64 <= 0.01 * scheduled as f64 && all.errors == 0,
        pct(&all.latencies_us, 50.0),
        pct(&all.latencies_us, 90.0),
        pct(&all.latencies_us, 99.0),
        pct(&all.latencies_us, 99.9),
        all.latencies_us.last().copied().unwrap_or(0),
        pct(&all.send_lag_us, 50.0),
        pct(&all.send_lag_us, 99.0),
        all.send_lag_us.last().copied().unwrap_or(0),
        window.as_secs_f64(),
    );
    if !o.pids.is_empty() {
        let per = |v: Option<u64>| match v {
            Some(us) if all.completed_in_window > 0 => {
                format!("{:.2}", us as f64 / all.completed_in_window as f64)
            }
            _ => "null".to_string(),
        };
        let num = |v: Option<u64>| v.map_or("null".to_string(), |x| x.to_string());
        let _ = write!(
            j,
            ",\"pids\":{:?},\"completed_in_window\":{},\"cpu_us\":{},\"cpu_us_per_req\":{},\
             \"cpu_sched_us\":{},\"cpu_sched_us_per_req\":{},\"cpu_util\":{}",
            o.pids,
            all.completed_in_window,
            num(cpu_us),
            per(cpu_us),
            num(sched_us),
            per(sched_us),
            cpu_us.map_or("null".to_string(), |c| format!(
                "{:.3}",
                c as f64 / 1e6 / window.as_secs_f64()
            )),
        );
    }
    j.push('}');
    println!("{j}");
}

// ---------------------------------------------------------------- idle mode

fn run_idle(o: Opts) {
    let url = o.url.clone().unwrap_or_else(|| die("--url is required"));
    let n = o.conns.unwrap_or_else(|| die("-n CONNS is required"));
    let target = std::rc::Rc::new(parse_url(&url));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let pids = o.pids.clone();
    let resp_timeout = Duration::from_secs_f64(o.timeout.max(0.1));
    local.block_on(&rt, async move {
        // Warm the proxy up (lazy initialisation, upstream connection), then
        // take the baseline.
        let mut warm_buf = Vec::new();
        if let Ok(Ok(mut s)) = timeout(resp_timeout, connect(target.addr)).await {
            for _ in 0..200 {
                if timeout(resp_timeout, exchange(&mut s, &target.request, &mut warm_buf))
                    .await
                    .map(|r| r.is_err())
                    .unwrap_or(true)
                {
                    break;
                }
            }
        }
        sleep(Duration::from_secs_f64(o.settle)).await;
        let rss_before = sum_over(&pids, proc_rss_kb);
        let started = Instant::now();
        let mut held: Vec<TcpStream> = Vec::with_capacity(n);
        let mut failed = 0usize;
        let mut non_2xx = 0usize;
        let mut remaining = n;
        while remaining > 0 {
            let batch = remaining.min(o.parallel);
            remaining -= batch;
            let mut hs = Vec::with_capacity(batch);
            for _ in 0..batch {
                let t = target.clone();
                hs.push(tokio::task::spawn_local(async move {
                    let mut buf = Vec::with_capacity(1024);
                    let mut s = timeout(resp_timeout, connect(t.addr)).await.ok()?.ok()?;
                    let (status, keep) =
                        timeout(resp_timeout, exchange(&mut s, &t.request, &mut buf)).await.ok()?.ok()?;
                    keep.then_some((s, status))
                }));
            }
            for h in hs {
                match h.await.ok().flatten() {
                    Some((s, status)) => {
                        if !(200..300).contains(&status) {
                            non_2xx += 1;
                        }
                        held.push(s);
                    }
                    None => failed += 1,
                }
            }
        }
        let open_s = started.elapsed().as_secs_f64();
        sleep(Duration::from_secs_f64(o.settle)).await;
        let rss_after = sum_over(&pids, proc_rss_kb);
        // Still open? A server that closed idle connections makes them readable (EOF).
        let mut closed = 0usize;
        for s in &held {
            let mut b = [0u8; 1];
            if let Ok(0) = s.try_read(&mut b) {
                closed += 1;
            }
        }
        sleep(Duration::from_secs_f64(o.hold)).await;
        let num = |v: Option<u64>| v.map_or("null".to_string(), |x| x.to_string());
        let per_conn = match (rss_before, rss_after) {
            (Some(a), Some(b)) if !held.is_empty() => format!(
                "{:.1}",
                (b as f64 - a as f64) * 1024.0 / held.len() as f64
            ),
            _ => "null".to_string(),
        };
        println!(
            "{{\"mode\":\"idle\",\"url\":\"{url}\",\"requested\":{n},\"established\":{},\"failed\":{failed},\
             \"non_2xx\":{non_2xx},\"closed_by_server\":{closed},\"open_s\":{open_s:.3},\"pids\":{:?},\
             \"rss_before_kb\":{},\"rss_after_kb\":{},\"bytes_per_conn\":{per_conn}}}",
            held.len(),
            pids,
            num(rss_before),
            num(rss_after),
        );
        drop(held);
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        die("a mode is required: rate or idle")
    };
    let o = parse_opts(&args[1..]);
    match mode.as_str() {
        "rate" => run_rate(o),
        "idle" => run_idle(o),
        _ => die(&format!("unknown mode {mode}")),
    }
}
