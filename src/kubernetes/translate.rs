//! Cluster state -> config model. (Being written: the rules land in the next commit.)

use super::objects::ClusterState;
use crate::config::model::{Config, Kubernetes};

/// The result of a translation.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    /// The config to run: the base file plus the generated upstreams and routes.
    pub config: Config,
    /// Certificates from TLS Secrets, for the TLS listeners' SNI.
    pub certificates: Vec<crate::tls::PemCert>,
    /// Objects left out, with why.
    pub rejected: Vec<Rejected>,
}

/// An object left out of the translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl Rejected {
    /// `Kind ns/name` (or `Kind name` when cluster-scoped).
    pub fn object(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Translates `state` onto `base`.
pub fn translate(_state: &ClusterState, base: &Config, _settings: &Kubernetes) -> Translation {
    Translation {
        config: base.clone(),
        ..Default::default()
    }
}
