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
            .spawn(move || {
                // Two buffers take turns, so the request threads always append into
                // one that already has its capacity.
                let mut batch = Vec::with_capacity(64 * 1024);
                loop {
                    {
                        let g = s.buf.lock().unwrap_or_else(|e| e.into_inner());
                        let (mut g, _) = s
                            .wake
                            .wait_timeout(g, Duration::from_millis(50))
                            .unwrap_or_else(|e| e.into_inner());
                        std::mem::swap(&mut *g, &mut batch);
                    }
                    write_out(&s, &batch);
                    batch.clear();
                }
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

/// Appends `s` as a JSON string literal. Runs of bytes that need no escaping (nearly
/// every field of a request) are copied in one piece.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    let b = s.as_bytes();
    if b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &str = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            c if c < 0x20 => "",
            _ => continue,
        };
        // Every byte that ends a run is ASCII, so these are char boundaries.
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[(c >> 4) as usize] as char);
            out.push(HEX[(c & 15) as usize] as char);
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `n` in decimal (without the formatting machinery).
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or("0"));
}

/// Appends a duration in milliseconds with three decimals (`12.345`).
pub fn push_ms(out: &mut String, d: Duration) {
    let us = d.as_micros() as u64;
    push_u64(out, us / 1000);
    out.push('.');
    let frac = us % 1000;
    out.push((b'0' + (frac / 100) as u8) as char);
    out.push((b'0' + (frac / 10 % 10) as u8) as char);
    out.push((b'0' + (frac % 10) as u8) as char);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> String {
        let mut o = String::new();
        json_str(&mut o, s);
        o
    }

    #[test]
    fn json_strings_match_serde() {
        for s in [
            "",
            "plain",
            "a\"b",
            "back\\slash",
            "tab\tnl\ncr\r",
            "\u{1}\u{1f}x",
            "é ü 日本",
            "end\"",
        ] {
            assert_eq!(j(s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn numbers() {
        let mut o = String::new();
        push_u64(&mut o, 0);
        o.push(' ');
        push_u64(&mut o, u64::MAX);
        o.push(' ');
        push_ms(&mut o, Duration::from_micros(12_345));
        o.push(' ');
        push_ms(&mut o, Duration::from_micros(7));
        assert_eq!(o, format!("0 {} 12.345 0.007", u64::MAX));
    }
}
