//! What triggers a reload: a change in the config file's folder (watched, not the file
//! itself, because editors and `mv` replace files; debounced so a burst of writes is
//! one reload), and SIGHUP. Both call `Gateway::reload`; `POST /reload` is in `admin`.

use crate::gateway::Gateway;
use notify::{RecursiveMode, Watcher};
use std::sync::Arc;
use std::time::Duration;

/// Starts the folder watcher on its own thread. Returns an error when the folder
/// cannot be watched (the gateway still runs; SIGHUP and the admin API work).
pub fn watch(gw: Arc<Gateway>, debounce: Duration) -> notify::Result<()> {
    let path = gw.config_path.clone();
    let file_name = path.file_name().map(|f| f.to_os_string());
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|f| f.to_os_string()) == file_name);
            if ours && !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let _keep = watcher;
            while rx.recv().is_ok() {
                // Debounce: wait until the folder has been quiet for `debounce`.
                while rx.recv_timeout(debounce).is_ok() {}
                let _ = gw.reload(false, "file changed");
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(())
}

/// Reloads on SIGHUP (runs on the background runtime).
pub fn on_sighup(gw: Arc<Gateway>) {
    let rt = gw.bg.clone();
    rt.spawn(async move {
        let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            log::error!("cannot install the SIGHUP handler");
            return;
        };
        while s.recv().await.is_some() {
            let gw = Arc::clone(&gw);
            let _ = tokio::task::spawn_blocking(move || gw.reload(true, "SIGHUP")).await;
        }
    });
}
