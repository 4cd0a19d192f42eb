//! The Kubernetes objects Portico reads, and the in-memory cluster state they form.
//! Core kinds (Ingress, IngressClass, Service, EndpointSlice, Secret) use the
//! `k8s-openapi` types; the Gateway API kinds (`gateway.networking.k8s.io/v1` Gateway,
//! GatewayClass and HTTPRoute) are small serde structs of our own holding only the
//! fields the translation reads (unknown fields are ignored, as a client of a newer
//! API server must). `ClusterState` is filled by the cluster watchers or by the
//! manifest reader and handed whole to `translate`.

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// (namespace, name); cluster-scoped objects use "" as the namespace.
pub type Key = (String, String);

/// The Gateway API group and version Portico reads.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// Everything the translation needs, keyed by (namespace, name).
#[derive(Default, Clone, Debug)]
pub struct ClusterState {
    pub ingresses: BTreeMap<Key, Ingress>,
    pub ingress_classes: BTreeMap<Key, IngressClass>,
    pub services: BTreeMap<Key, Service>,
    pub endpoint_slices: BTreeMap<Key, EndpointSlice>,
    pub secrets: BTreeMap<Key, Secret>,
    pub gateway_classes: BTreeMap<Key, GatewayClass>,
    pub gateways: BTreeMap<Key, Gateway>,
    pub http_routes: BTreeMap<Key, HttpRoute>,
}

/// One object of a kind Portico reads.
#[derive(Clone, Debug)]
pub enum Object {
    Ingress(Box<Ingress>),
    IngressClass(Box<IngressClass>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Secret(Box<Secret>),
    GatewayClass(Box<GatewayClass>),
    Gateway(Box<Gateway>),
    HttpRoute(Box<HttpRoute>),
}

/// Why a document could not become an `Object`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// A kind Portico does not read (a Deployment in a manifest folder, say).
    #[error("{api_version} {kind} is not a kind Portico reads")]
    Unsupported { api_version: String, kind: String },
    /// A kind Portico reads, but its fields do not parse.
    #[error("{kind} {name}: {message}")]
    Invalid {
        kind: String,
        name: String,
        message: String,
    },
}

/// The key of an object from its metadata.
pub fn key_of(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn parse<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    kind: &str,
    name: &str,
) -> Result<Box<T>, ObjectError> {
    serde_json::from_value(v)
        .map(Box::new)
        .map_err(|e| ObjectError::Invalid {
            kind: kind.to_string(),
            name: name.to_string(),
            message: e.to_string(),
        })
}

impl Object {
    /// Parses one object, dispatching on `apiVersion` and `kind`.
    pub fn from_json(v: serde_json::Value) -> Result<Object, ObjectError> {
        let api_version = v
            .get("apiVersion")
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string();
        let kind = v
            .get("kind")
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string();
        let name = {
            let m = v.get("metadata");
            let ns = m
                .and_then(|m| m.get("namespace"))
                .and_then(|x| x.as_str())
                .unwrap_or("");
            let n = m
                .and_then(|m| m.get("name"))
                .and_then(|x| x.as_str())
                .unwrap_or("");
            if ns.is_empty() {
                n.to_string()
            } else {
                format!("{ns}/{n}")
            }
        };
        match (api_version.as_str(), kind.as_str()) {
            ("networking.k8s.io/v1", "Ingress") => parse(v, &kind, &name).map(Object::Ingress),
            ("networking.k8s.io/v1", "IngressClass") => {
                parse(v, &kind, &name).map(Object::IngressClass)
            }
            ("v1", "Service") => parse(v, &kind, &name).map(Object::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                parse(v, &kind, &name).map(Object::EndpointSlice)
            }
            ("v1", "Secret") => parse(v, &kind, &name).map(Object::Secret),
            (GATEWAY_API_VERSION, "GatewayClass") => {
                parse(v, &kind, &name).map(Object::GatewayClass)
            }
            (GATEWAY_API_VERSION, "Gateway") => parse(v, &kind, &name).map(Object::Gateway),
            (GATEWAY_API_VERSION, "HTTPRoute") => parse(v, &kind, &name).map(Object::HttpRoute),
            _ => Err(ObjectError::Unsupported { api_version, kind }),
        }
    }

    /// Parses one YAML document (see `from_json`).
    #[allow(dead_code)] // for callers holding one document (tests, tools)
    pub fn from_yaml(text: &str) -> Result<Object, ObjectError> {
        let v: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| ObjectError::Invalid {
                kind: "document".into(),
                name: String::new(),
                message: e.to_string(),
            })?;
        Object::from_json(v)
    }

    /// The kind as the API spells it (`Ingress`, `HTTPRoute`, ...).
    #[allow(dead_code)] // the name `ClusterState::remove` takes
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Ingress(_) => "Ingress",
            Object::IngressClass(_) => "IngressClass",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Secret(_) => "Secret",
            Object::GatewayClass(_) => "GatewayClass",
            Object::Gateway(_) => "Gateway",
            Object::HttpRoute(_) => "HTTPRoute",
        }
    }

    /// The object's (namespace, name).
    pub fn key(&self) -> Key {
        key_of(match self {
            Object::Ingress(o) => &o.metadata,
            Object::IngressClass(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
            Object::GatewayClass(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
        })
    }
}

impl ClusterState {
    /// Adds or replaces an object.
    pub fn upsert(&mut self, obj: Object) {
        let key = obj.key();
        match obj {
            Object::Ingress(o) => {
                self.ingresses.insert(key, *o);
            }
            Object::IngressClass(o) => {
                self.ingress_classes.insert(key, *o);
            }
            Object::Service(o) => {
                self.services.insert(key, *o);
            }
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(key, *o);
            }
            Object::Secret(o) => {
                self.secrets.insert(key, *o);
            }
            Object::GatewayClass(o) => {
                self.gateway_classes.insert(key, *o);
            }
            Object::Gateway(o) => {
                self.gateways.insert(key, *o);
            }
            Object::HttpRoute(o) => {
                self.http_routes.insert(key, *o);
            }
        }
    }

    /// Removes an object by kind (as `Object::kind` spells it) and key; returns
    /// whether it was there.
    pub fn remove(&mut self, kind: &str, key: &Key) -> bool {
        match kind {
            "Ingress" => self.ingresses.remove(key).is_some(),
            "IngressClass" => self.ingress_classes.remove(key).is_some(),
            "Service" => self.services.remove(key).is_some(),
            "EndpointSlice" => self.endpoint_slices.remove(key).is_some(),
            "Secret" => self.secrets.remove(key).is_some(),
            "GatewayClass" => self.gateway_classes.remove(key).is_some(),
            "Gateway" => self.gateways.remove(key).is_some(),
            "HTTPRoute" => self.http_routes.remove(key).is_some(),
            _ => false,
        }
    }

    /// Objects held, all kinds together.
    pub fn len(&self) -> usize {
        self.ingresses.len()
            + self.ingress_classes.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.secrets.len()
            + self.gateway_classes.len()
            + self.gateways.len()
            + self.http_routes.len()
    }

    /// True when no object is held.
    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---- Gateway API (gateway.networking.k8s.io/v1), the fields Portico reads ----

/// A GatewayClass: which controller implements Gateways of this class.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct GatewayClass {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewayClassSpec,
}

/// GatewayClass spec.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    #[serde(default)]
    pub controller_name: String,
}

/// A Gateway: listeners that routes attach to.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

/// Gateway spec.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<GatewayListener>,
}

/// One Gateway listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayListener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// Which routes may attach to a listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
}

/// `from: Same` (the default), `All` or `Selector` (treated as `Same`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct RouteNamespaces {
    #[serde(default)]
    pub from: Option<String>,
}

/// An HTTPRoute.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

/// HTTPRoute spec.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A reference from a route to the Gateway it attaches to.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
}

/// One rule: matches (any of), filters, backends.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// One match: all given conditions must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

/// A path match: `Exact`, `PathPrefix` (default) or `RegularExpression`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HttpPathMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter match: `Exact` (default) or `RegularExpression`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HttpValueMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

/// A filter of a rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

/// `RequestRedirect`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

/// `URLRewrite`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct UrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// `ReplaceFullPath` or `ReplacePrefixMatch`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// A weighted reference to a Service port.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HttpBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub weight: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_on_kind() {
        let o = Object::from_yaml(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: a, namespace: n}\nspec: {}\n",
        )
        .unwrap();
        assert_eq!(o.kind(), "Ingress");
        assert_eq!(o.key(), ("n".to_string(), "a".to_string()));
        let mut st = ClusterState::default();
        st.upsert(o);
        assert_eq!(st.ingresses.len(), 1);
        assert!(st.remove("Ingress", &("n".into(), "a".into())));
        assert!(st.is_empty());
        let e = Object::from_yaml("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
            .unwrap_err();
        assert!(matches!(e, ObjectError::Unsupported { .. }));
        let r = Object::from_yaml(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
             spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{name: s, port: 80, weight: 3}], futureField: 1}]}\n",
        )
        .unwrap();
        let Object::HttpRoute(r) = r else { panic!() };
        assert_eq!(r.spec.rules[0].backend_refs[0].weight, Some(3));
        let bad = Object::from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: nope}]}\n",
        )
        .unwrap_err();
        assert!(matches!(bad, ObjectError::Invalid { .. }), "{bad}");
    }
}
