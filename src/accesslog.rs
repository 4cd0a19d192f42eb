//! The access log: one JSON line per request. Lines are formatted on the request's
//! thread and handed to one writer thread over a bounded channel, which writes them
//! through a buffer and flushes whenever it runs out of work. When the writer cannot
//! keep up, lines are dropped and counted rather than slowing requests down.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// A handle to the access log (cheap to clone).
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    pub dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens `path` (`stdout`, `stderr`, `off` or a file, appended to).
    pub fn open(path: &str) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match path {
            "off" => {
                return Ok(AccessLog {
                    tx: None,
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
        let (tx, rx) = sync_channel::<String>(65536);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out))?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped: Arc::default(),
        })
    }

    /// Whether lines are written at all.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one line (without the newline).
    pub fn write(&self, line: String) {
        if let Some(tx) = &self.tx {
            match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Waits (briefly) until queued lines are written; used at shutdown.
    pub fn flush(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(String::new());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn writer(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let mut write = |l: String| {
            if !l.is_empty() {
                let _ = w.write_all(l.as_bytes());
                let _ = w.write_all(b"\n");
            }
        };
        write(line);
        while let Ok(more) = rx.try_recv() {
            write(more);
        }
        let _ = w.flush();
    }
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
