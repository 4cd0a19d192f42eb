//! `portico ingress --manifests DIR`: the cluster state read from manifest files
//! instead of an API server, for trying a cluster's routing on a laptop and for tests.
//! Every `*.yaml`, `*.yml` and `*.json` file of DIR (not its subfolders) is read; a
//! YAML file may hold several documents, and a `kind: List` its `items`. Kinds Portico
//! does not read (Deployments, ...) are skipped; a document that does not parse is
//! reported and skipped, never fatal. The folder is watched like the config file
//! (debounced, see `reload.rs`), and each change re-reads it whole and applies it
//! through the controller.

use super::objects::{ClusterState, Object, ObjectError};
use super::Controller;
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Reads every manifest of `dir`. Returns the state and the problems found (one line
/// each, `FILE: message`); fails only when the folder cannot be read.
pub fn load_dir(dir: &Path) -> Result<(ClusterState, Vec<String>), String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("yaml") | Some("yml") | Some("json")
                )
        })
        .collect();
    files.sort();
    let mut state = ClusterState::default();
    let mut problems = vec![];
    for f in files {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        load_text(&text, &f.display().to_string(), &mut state, &mut problems);
    }
    Ok((state, problems))
}

/// Adds the objects of one file's text to `state`.
pub fn load_text(text: &str, file: &str, state: &mut ClusterState, problems: &mut Vec<String>) {
    use serde::Deserialize;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{file}: document {}: {e}", i + 1));
                // A syntax error ends the stream: nothing after it can be trusted.
                break;
            }
        };
        let items = if v.get("kind").and_then(|k| k.as_str()) == Some("List") {
            v.get("items")
                .and_then(|x| x.as_array())
                .cloned()
                .unwrap_or_default()
        } else {
            vec![v]
        };
        for item in items {
            match Object::from_json(item) {
                Ok(o) => state.upsert(o),
                Err(e @ ObjectError::Unsupported { .. }) => {
                    log::debug!("{file}: document {}: skipped: {e}", i + 1)
                }
                Err(e) => problems.push(format!("{file}: document {}: {e}", i + 1)),
            }
        }
    }
}

/// Checks that `dir` is a folder Portico can read manifests from; the error says
/// which path and why.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{}: not a folder", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{}: no such folder", dir.display()))
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// Reads `dir` and applies it once, then re-reads it on every change.
pub fn start(ctl: Arc<Controller>, dir: PathBuf) -> Result<(), String> {
    check_dir(&dir)?;
    apply_dir(&ctl, &dir)?;
    let debounce = ctl.debounce();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| !matches!(ev.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    std::thread::Builder::new()
        .name("manifest-watch".into())
        .spawn(move || {
            let _keep = watcher;
            while rx.recv().is_ok() {
                while rx.recv_timeout(debounce).is_ok() {}
                if let Err(e) = apply_dir(&ctl, &dir) {
                    log::error!("manifests: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the manifest watcher: {e}"))?;
    Ok(())
}

fn apply_dir(ctl: &Controller, dir: &Path) -> Result<u64, String> {
    let t0 = std::time::Instant::now();
    let (state, problems) = load_dir(dir)?;
    for p in &problems {
        log::warn!("manifests: {p}");
    }
    let v = ctl.apply(&state).map_err(|e| e.join("; "))?;
    log::info!(
        "manifests: {} objects from {} applied as config version {v} in {:?}",
        state.len(),
        dir.display(),
        t0.elapsed()
    );
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_and_lists() {
        let text = "\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: n}
---
# a comment-only document is skipped
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: b, namespace: n}
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: d}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: bad, namespace: n}
spec: {rules: 7}
";
        let mut st = ClusterState::default();
        let mut problems = vec![];
        load_text(text, "f.yaml", &mut st, &mut problems);
        assert_eq!(st.services.len(), 2);
        assert!(st.ingresses.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("Ingress n/bad"), "{problems:?}");
    }
}
