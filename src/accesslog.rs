//! The access log: one JSON line per request. Request threads append their line to a
//! shared in-memory buffer (a short, uncontended lock; no syscall, no thread wake-up per
//! request); one writer thread swaps the buffer out every 50 ms, or sooner when it grows
//! past 256 KiB, and writes it in one go. If the writer cannot keep up, the buffer is
//! capped and lines beyond it are dropped and counted rather than slowing requests.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const WAKE_AT: usize = 256 * 1024;
const CAP: usize = 64 * 1024 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
}

/// A handle to the access log (cheap to clone).
#[derive(Clone)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
    pub dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens `path` (`stdout`, `stderr`, `off` or a file, appended to).
    pub fn open(path: &str) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match path {
            "off" => {
                return Ok(AccessLog {
                    shared: None,
                    dropped: Arc::default(),
                })
            }
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            p => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::with_capacity(64 * 1024)),
            wake: Condvar::new(),
            out: Mutex::new(out),
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || loop {
                let batch = {
                    let g = s.buf.lock().unwrap_or_else(|e| e.into_inner());
                    let (mut g, _) = s
                        .wake
                        .wait_timeout(g, Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner());
                    std::mem::take(&mut *g)
                };
                write_out(&s, &batch);
            })?;
        Ok(AccessLog {
            shared: Some(shared),
            dropped: Arc::default(),
        })
    }

    /// Whether lines are written at all.
    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues one line (without the newline).
    pub fn write(&self, line: String) {
        let Some(s) = &self.shared else { return };
        let mut g = s.buf.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() + line.len() > CAP {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        g.extend_from_slice(line.as_bytes());
        g.push(b'\n');
        if g.len() >= WAKE_AT {
            s.wake.notify_one();
        }
    }

    /// Writes everything queued so far; used at shutdown.
    pub fn flush(&self) {
        if let Some(s) = &self.shared {
            let batch = std::mem::take(&mut *s.buf.lock().unwrap_or_else(|e| e.into_inner()));
            write_out(s, &batch);
        }
    }
}

fn write_out(s: &Shared, batch: &[u8]) {
    let mut out = s.out.lock().unwrap_or_else(|e| e.into_inner());
    if !batch.is_empty() {
        let _ = out.write_all(batch);
    }
    let _ = out.flush();
}

/// Appends `s` as a JSON string literal.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
