//! `portico ingress --manifests DIR`. (Being written.)

use super::Controller;
use std::path::PathBuf;
use std::sync::Arc;

/// Reads DIR, applies it, and watches it for changes.
pub fn start(_ctl: Arc<Controller>, dir: PathBuf) -> Result<(), String> {
    Err(format!("{}: manifest mode is being written", dir.display()))
}
