#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
//! Portico's plugin API. A plugin is a value built once from its typed, strictly
//! deserialized settings when a config is compiled; the gateway calls its hooks on the
//! request path through a narrow context and never the other way round: this crate does
//! not depend on the gateway. Plugins are registered explicitly in a [`Registry`]
//! (no life-before-main); a chain runs in the order the config lists it, and a hook's
//! result is an explicit [`Flow`]: go on, or answer the client with this response.

use bytes::Bytes;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// What a hook decides.
#[derive(Debug)]
pub enum Flow {
    /// Go on with the next plugin / the proxy.
    Continue,
    /// Answer the client with this response; nothing reaches the upstream.
    Respond(Reply),
}

/// A response made by a plugin.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// The request as plugins see it: method, path, query and headers (read-only), and
/// the header edits plugins ask for, applied by the gateway in order after the chain.
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub edits: &'a mut HeaderEdits,
}

/// Header changes requested by plugins.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Removed first.
    pub remove: Vec<http::HeaderName>,
    /// Then set (replacing any value).
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// The narrow per-request context handed to plugins.
pub struct Context<'a> {
    pub request_id: &'a str,
    pub route: &'a str,
    pub params: &'a [(String, String)],
    pub client_ip: Option<IpAddr>,
    /// Set by an authentication plugin; read by later plugins (rate-limit keys).
    pub consumer: Option<String>,
}

/// A plugin instance. Every hook has a default that does nothing.
pub trait Plugin: Send + Sync {
    /// The config name (`jwt`, `rate_limit`, ...).
    fn name(&self) -> &'static str;
    /// Runs before routing to the upstream; may answer the request itself.
    fn on_request(&self, _req: &mut RequestView<'_>, _ctx: &mut Context<'_>) -> Flow {
        Flow::Continue
    }
    /// Edits the response headers before they go to the client.
    fn on_response(&self, _status: u16, _headers: &mut http::HeaderMap, _ctx: &Context<'_>) {}
}

/// Builds plugin instances of one kind from their settings.
pub trait Factory: Send + Sync {
    /// The config name this factory answers to.
    fn name(&self) -> &'static str;
    /// Checks and compiles settings; the error says what is wrong with them.
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String>;
}

/// Why a plugin entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The entry is not a one-key map, or names no known plugin.
    #[error("{0}")]
    Shape(String),
    /// The plugin refused its settings.
    #[error("plugin `{plugin}`: {message}")]
    Settings { plugin: String, message: String },
}

/// The known plugin factories, by name.
#[derive(Default)]
pub struct Registry {
    factories: HashMap<&'static str, Arc<dyn Factory>>,
}

impl Registry {
    /// The registry with every built-in plugin.
    pub fn builtin() -> Registry {
        // Built-in plugins are registered here explicitly as they land.
        Registry::default()
    }

    /// Adds a factory.
    pub fn register(&mut self, f: Arc<dyn Factory>) {
        self.factories.insert(f.name(), f);
    }

    /// Names of the registered plugins, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.factories.keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn split(entry: &serde_yaml::Value) -> Result<(&str, &serde_yaml::Value), EntryError> {
        let m = entry.as_mapping().filter(|m| m.len() == 1).ok_or_else(|| {
            EntryError::Shape("a plugin entry is a one-key map: `- NAME: { settings }`".into())
        })?;
        let (k, v) = m
            .iter()
            .next()
            .ok_or_else(|| EntryError::Shape("empty plugin entry".into()))?;
        let name = k
            .as_str()
            .ok_or_else(|| EntryError::Shape("a plugin name must be a string".into()))?;
        Ok((name, v))
    }

    /// Builds one `- NAME: settings` entry.
    pub fn build(&self, entry: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, EntryError> {
        let (name, settings) = Self::split(entry)?;
        let f = self.factories.get(name).ok_or_else(|| {
            let known = self.names();
            EntryError::Shape(if known.is_empty() {
                format!("unknown plugin `{name}` (this build has no plugins yet)")
            } else {
                format!(
                    "unknown plugin `{name}`, expected one of {}",
                    known.join(", ")
                )
            })
        })?;
        f.build(settings).map_err(|message| EntryError::Settings {
            plugin: name.to_string(),
            message,
        })
    }

    /// Checks one entry without keeping the instance.
    pub fn validate(&self, entry: &serde_yaml::Value) -> Result<(), EntryError> {
        self.build(entry).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Deny;
    impl Plugin for Deny {
        fn name(&self) -> &'static str {
            "deny"
        }
        fn on_request(&self, _r: &mut RequestView<'_>, _c: &mut Context<'_>) -> Flow {
            Flow::Respond(Reply {
                status: 403,
                headers: vec![],
                body: Bytes::from_static(b"no"),
            })
        }
    }
    struct DenyFactory;
    impl Factory for DenyFactory {
        fn name(&self) -> &'static str {
            "deny"
        }
        fn build(&self, s: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
            if s.is_null() {
                Ok(Arc::new(Deny))
            } else {
                Err("takes no settings".into())
            }
        }
    }

    #[test]
    fn registry_builds_and_refuses() {
        let mut r = Registry::default();
        r.register(Arc::new(DenyFactory));
        let ok: serde_yaml::Value = serde_yaml::from_str("deny: ~").unwrap();
        assert!(r.build(&ok).is_ok());
        let bad: serde_yaml::Value = serde_yaml::from_str("deny: 3").unwrap();
        assert!(matches!(r.build(&bad), Err(EntryError::Settings { .. })));
        let unknown: serde_yaml::Value = serde_yaml::from_str("nope: {}").unwrap();
        assert!(matches!(r.build(&unknown), Err(EntryError::Shape(_))));
    }
}
