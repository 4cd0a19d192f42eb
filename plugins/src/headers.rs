//! The `headers` plugin: request and response header changes as a plugin, so they can
//! sit at a chosen place in a chain (the route's own `headers:` block runs after every
//! plugin). Each side takes `remove` (names), `set` (replace: `name: value`) and `add`
//! (one more line: `name: value` or `name: [v1, v2]`), applied in that order.
//! Request changes reach the upstream; response changes reach the client for answers
//! that came from the upstream.

use crate::{Context, Factory, Flow, HeaderEdits, Plugin, RequestView, ResponseView};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(untagged)]
enum Values {
    One(String),
    Many(Vec<String>),
}

/// One side's changes, as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SideSettings {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, Values>,
    #[serde(default)]
    remove: Vec<String>,
}

/// The `headers` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    request: SideSettings,
    #[serde(default)]
    response: SideSettings,
}

type Pairs = Vec<(http::HeaderName, http::HeaderValue)>;

/// One side's compiled changes.
#[derive(Default)]
struct Side {
    remove: Vec<http::HeaderName>,
    set: Pairs,
    add: Pairs,
}

impl Side {
    fn compile(which: &str, s: SideSettings) -> Result<Side, String> {
        use crate::util::{header_name, header_value};
        let mut side = Side::default();
        for n in &s.remove {
            side.remove
                .push(header_name(&format!("{which}.remove"), n)?);
        }
        for (k, v) in &s.set {
            let at = format!("{which}.set.{k}");
            side.set.push((header_name(&at, k)?, header_value(&at, v)?));
        }
        for (k, vs) in s.add {
            let at = format!("{which}.add.{k}");
            let name = header_name(&at, &k)?;
            let vs = match vs {
                Values::One(v) => vec![v],
                Values::Many(v) => v,
            };
            for v in vs {
                side.add.push((name.clone(), header_value(&at, &v)?));
            }
        }
        Ok(side)
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    fn apply(&self, e: &mut HeaderEdits) {
        for n in &self.remove {
            e.remove(n.clone());
        }
        for (k, v) in &self.set {
            e.set(k.clone(), v.clone());
        }
        e.append.extend(self.add.iter().cloned());
    }
}

/// The `headers` plugin instance.
pub struct Headers {
    request: Side,
    response: Side,
}

/// Builds [`Headers`] instances.
pub struct HeadersFactory;

impl Factory for HeadersFactory {
    fn name(&self) -> &'static str {
        "headers"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        let s: Settings = crate::settings(settings)?;
        let h = Headers {
            request: Side::compile("request", s.request)?,
            response: Side::compile("response", s.response)?,
        };
        if h.request.is_empty() && h.response.is_empty() {
            return Err("set request and/or response changes (set, add, remove)".into());
        }
        Ok(Arc::new(h))
    }
}

#[async_trait::async_trait]
impl Plugin for Headers {
    fn name(&self) -> &'static str {
        "headers"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, _ctx: &mut Context) -> Flow {
        self.request.apply(req.edits);
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseView<'_>,
        _ctx: &mut Context,
    ) -> Option<Box<dyn crate::BodyFilter>> {
        self.response.apply(resp.edits);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[tokio::test]
    async fn both_sides() {
        let p = build(
            "headers: { request: { set: { x-env: prod }, add: { x-tag: [a, b] }, remove: [x-debug] }, \
             response: { set: { server: portico }, add: { set-cookie: 'a=1' }, remove: [x-powered-by] } }",
        )
        .unwrap();
        let r = Req::get("/");
        let (f, e) = request(&*p, &r, &mut ctx()).await;
        assert!(matches!(f, Flow::Continue));
        assert_eq!(e.remove, vec![http::HeaderName::from_static("x-debug")]);
        assert_eq!(set_value(&e, "x-env").as_deref(), Some("prod"));
        assert_eq!(e.append.len(), 2);
        let (_, e) = response(&*p, &r, 200, &[], &mut ctx());
        assert_eq!(
            e.remove,
            vec![http::HeaderName::from_static("x-powered-by")]
        );
        assert_eq!(set_value(&e, "server").as_deref(), Some("portico"));
        assert_eq!(e.append[0].0, "set-cookie");
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("headers: {}").contains("set request"));
        assert!(e("headers: { request: { set: { 'bad name': x } } }").contains("request.set"));
        assert!(e("headers: { response: { add: { x: \"a\\nb\" } } }").contains("response.add.x"));
        assert!(e("headers: { request: { replace: {} } }").contains("unknown field"));
    }
}
