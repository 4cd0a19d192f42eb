//! The `jwt` plugin: verifies a JSON Web Token (HS256/384/512, RS256/384/512,
//! PS256/384/512, ES256/384, EdDSA) from the `Authorization: Bearer` header (or a
//! configured header, cookie or query parameter) and answers 401 when it is missing
//! or invalid. The algorithms are pinned by the config: a token's `alg` must be one of
//! them *and* fit the key's type, so `alg: none` and the "HS256 signed with the RSA
//! public key as secret" attack never verify; configs that pair HS* with an
//! asymmetric key source are refused outright. Keys come from `secret`, `secret_env`,
//! `public_key` (a PEM file) or `jwks` (a file or URL, see [`crate::jwks`]).
//! On success the verified claims go to `ctx.claims`, the consumer (`sub`, or
//! `consumer_claim`) to `ctx.consumer`, and `forward_claims` become upstream headers;
//! client-sent copies of those headers are always removed first.

use crate::jwks::{Jwks, Source};
use crate::units::Dur;
use crate::{Context, Factory, Flow, Plugin, Reply, RequestView};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The kind of key an algorithm needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// HS256/384/512: a shared secret.
    Hmac,
    /// RS*/PS*: an RSA public key.
    Rsa,
    /// ES256/ES384: an EC public key.
    Ec,
    /// EdDSA: an Ed25519 public key.
    Ed,
}

/// The key family of `alg`.
pub fn family(alg: Algorithm) -> Family {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => Family::Hmac,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
        ES256 | ES384 => Family::Ec,
        EdDSA => Family::Ed,
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

fn default_refresh() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_min_refetch() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_required() -> Vec<String> {
    vec!["exp".into()]
}

/// The `jwt` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Accepted algorithms (required).
    algorithms: Vec<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    public_key: Option<PathBuf>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default = "default_refresh")]
    jwks_refresh: Dur,
    #[serde(default = "default_min_refetch")]
    jwks_min_refetch: Dur,
    #[serde(default)]
    issuer: Option<OneOrMany>,
    #[serde(default)]
    audience: Option<OneOrMany>,
    #[serde(default)]
    leeway: Dur,
    #[serde(default = "default_required")]
    required_claims: Vec<String>,
    #[serde(default)]
    forward_claims: BTreeMap<String, String>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    cookie: Option<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    consumer_claim: Option<String>,
}

enum Keys {
    Static { key: DecodingKey, family: Family },
    Jwks(Arc<Jwks>),
}

enum TokenFrom {
    Bearer,
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
}

/// The `jwt` plugin instance.
pub struct Jwt {
    keys: Keys,
    /// The accepted algorithms, each with its validation (leeway, iss, aud, required
    /// spec claims) pinned to it: built once, so a request clones no sets of strings.
    validations: Vec<(Algorithm, Validation)>,
    required: Vec<String>,
    forward: Vec<(String, http::HeaderName)>,
    from: TokenFrom,
    consumer_claim: String,
}

/// Builds [`Jwt`] instances.
pub struct JwtFactory;

impl Factory for JwtFactory {
    fn name(&self) -> &'static str {
        "jwt"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(Jwt::new(crate::settings(settings)?)?))
    }
}

fn parse_alg(s: &str) -> Result<Algorithm, String> {
    if s.eq_ignore_ascii_case("none") {
        return Err("algorithms: `none` (unsigned tokens) is never accepted".into());
    }
    Algorithm::from_str(s).map_err(|_| {
        format!(
            "algorithms: unknown algorithm {s:?}, expected HS256, HS384, HS512, RS256, RS384, \
             RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
        )
    })
}

impl Jwt {
    fn new(s: Settings) -> Result<Jwt, String> {
        if s.algorithms.is_empty() {
            return Err("algorithms: list at least one algorithm".into());
        }
        let algorithms: Vec<Algorithm> = s
            .algorithms
            .iter()
            .map(|a| parse_alg(a))
            .collect::<Result<_, _>>()?;
        let sources = [
            s.secret.is_some(),
            s.secret_env.is_some(),
            s.public_key.is_some(),
            s.jwks.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if sources != 1 {
            return Err(format!(
                "set exactly one key source of secret, secret_env, public_key or jwks ({sources} given)"
            ));
        }
        let families: Vec<Family> = algorithms.iter().map(|a| family(*a)).collect();
        let has_hmac = families.contains(&Family::Hmac);
        let symmetric = s.secret.is_some() || s.secret_env.is_some();
        if symmetric && families.iter().any(|f| *f != Family::Hmac) {
            return Err(
                "algorithms: a secret only verifies HS256/HS384/HS512; use public_key or jwks \
                 for the others"
                    .into(),
            );
        }
        if !symmetric && has_hmac {
            return Err(
                "algorithms: HS256/HS384/HS512 cannot be used with an asymmetric key source \
                 (public_key, jwks): that is the \"HMAC signed with the public key\" attack"
                    .into(),
            );
        }
        let keys = if let Some(secret) = &s.secret {
            if secret.is_empty() {
                return Err("secret: must not be empty".into());
            }
            Keys::Static {
                key: DecodingKey::from_secret(secret.as_bytes()),
                family: Family::Hmac,
            }
        } else if let Some(var) = &s.secret_env {
            let secret = std::env::var(var)
                .map_err(|_| format!("secret_env: environment variable {var} is not set"))?;
            if secret.is_empty() {
                return Err(format!("secret_env: environment variable {var} is empty"));
            }
            Keys::Static {
                key: DecodingKey::from_secret(secret.as_bytes()),
                family: Family::Hmac,
            }
        } else if let Some(path) = &s.public_key {
            let fam = families[0];
            if families.iter().any(|f| *f != fam) {
                return Err(
                    "algorithms: with one public_key, every algorithm must need the same key \
                     type (RS*/PS* for RSA, ES* for EC, EdDSA for Ed25519)"
                        .into(),
                );
            }
            let pem = std::fs::read(path)
                .map_err(|e| format!("public_key: cannot read {}: {e}", path.display()))?;
            let key = match fam {
                Family::Rsa => DecodingKey::from_rsa_pem(&pem),
                Family::Ec => DecodingKey::from_ec_pem(&pem),
                Family::Ed => DecodingKey::from_ed_pem(&pem),
                Family::Hmac => return Err("algorithms: HS* need a secret".into()),
            }
            .map_err(|e| {
                let kind = match fam {
                    Family::Rsa => "an RSA",
                    Family::Ec => "an EC",
                    _ => "an Ed25519",
                };
                format!(
                    "public_key: {} is not {kind} public key in PEM form ({e})",
                    path.display()
                )
            })?;
            Keys::Static { key, family: fam }
        } else if let Some(j) = &s.jwks {
            let source = Source::parse(j)?;
            if s.jwks_refresh.0 < Duration::from_secs(1) {
                return Err("jwks_refresh: must be at least 1s".into());
            }
            Keys::Jwks(Arc::new(
                Jwks::new(source, s.jwks_refresh.0, s.jwks_min_refetch.0)
                    .map_err(|e| format!("jwks: {e}"))?,
            ))
        } else {
            return Err("no key source".into());
        };

        let from_count = [s.header.is_some(), s.cookie.is_some(), s.query.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if from_count > 1 {
            return Err("set at most one of header, cookie or query (where the token is)".into());
        }
        let from = if let Some(h) = &s.header {
            let name = crate::util::header_name("header", h)?;
            if name == http::header::AUTHORIZATION {
                TokenFrom::Bearer
            } else {
                TokenFrom::Header(name)
            }
        } else if let Some(c) = s.cookie {
            if c.is_empty() {
                return Err("cookie: name must not be empty".into());
            }
            TokenFrom::Cookie(c)
        } else if let Some(q) = s.query {
            if q.is_empty() {
                return Err("query: name must not be empty".into());
            }
            TokenFrom::Query(q)
        } else {
            TokenFrom::Bearer
        };

        let mut forward = vec![];
        for (claim, header) in &s.forward_claims {
            let name = crate::util::header_name(&format!("forward_claims.{claim}"), header)?;
            forward.push((claim.clone(), name));
        }

        let mut validation = Validation::new(algorithms[0]);
        validation.leeway = s.leeway.0.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut spec: Vec<String> = s
            .required_claims
            .iter()
            .filter(|c| ["exp", "nbf", "iss", "aud", "sub"].contains(&c.as_str()))
            .cloned()
            .collect();
        if let Some(iss) = s.issuer {
            let iss = iss.into_vec();
            if iss.is_empty() {
                return Err("issuer: list at least one issuer".into());
            }
            validation.set_issuer(&iss);
            spec.push("iss".into());
        }
        match s.audience {
            Some(aud) => {
                let aud = aud.into_vec();
                if aud.is_empty() {
                    return Err("audience: list at least one audience".into());
                }
                validation.set_audience(&aud);
                spec.push("aud".into());
            }
            // Without a configured audience, a token's `aud` is not checked.
            None => validation.validate_aud = false,
        }
        spec.sort();
        spec.dedup();
        validation.set_required_spec_claims(&spec);

        let validations = algorithms
            .iter()
            .map(|a| {
                let mut v = validation.clone();
                v.algorithms = vec![*a];
                (*a, v)
            })
            .collect();
        Ok(Jwt {
            keys,
            validations,
            required: s.required_claims,
            forward,
            from,
            consumer_claim: s.consumer_claim.unwrap_or_else(|| "sub".into()),
        })
    }

    fn token<'a>(&self, req: &'a RequestView<'_>) -> Option<std::borrow::Cow<'a, str>> {
        use std::borrow::Cow;
        let strip_bearer = |v: &'a str| -> Option<&'a str> {
            let v = v.trim();
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim())
                .filter(|t| !t.is_empty())
        };
        match &self.from {
            TokenFrom::Bearer => req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(strip_bearer)
                .map(Cow::Borrowed),
            TokenFrom::Header(h) => req
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(|v| strip_bearer(v).unwrap_or(v.trim()))
                .filter(|t| !t.is_empty())
                .map(Cow::Borrowed),
            TokenFrom::Cookie(c) => crate::util::cookie(req.headers, c)
                .filter(|t| !t.is_empty())
                .map(Cow::Borrowed),
            TokenFrom::Query(q) => crate::util::query_param(req.query, q).filter(|t| !t.is_empty()),
        }
    }

    /// Verifies `token`, returning its claims or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<serde_json::Value, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("token longer than {MAX_TOKEN_BYTES} bytes"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("malformed token header: {}", describe(e.kind())))?;
        let alg = header.alg;
        let validation = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("algorithm {alg:?} is not accepted"))?;
        let fam = family(alg);
        let held;
        let key: &DecodingKey = match &self.keys {
            Keys::Static { key, family } => {
                if *family != fam {
                    return Err(format!("algorithm {alg:?} does not fit the key"));
                }
                key
            }
            Keys::Jwks(j) => {
                let k = j
                    .key(header.kid.as_deref())
                    .await
                    .ok_or_else(|| match &header.kid {
                        Some(kid) => format!("unknown key id {kid:?}"),
                        None => "the token has no key id (kid)".to_string(),
                    })?;
                if k.family != fam || k.alg.is_some_and(|a| a != alg) {
                    return Err(format!("algorithm {alg:?} does not fit the key"));
                }
                held = k;
                &held.key
            }
        };
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, validation)
            .map_err(|e| describe(e.kind()))?;
        let claims = data.claims;
        let obj = claims
            .as_object()
            .ok_or("the claims are not a JSON object")?;
        for (name, what) in [("exp", "expiry"), ("nbf", "not-before time")] {
            if let Some(x) = obj.get(name) {
                if !x.is_number() {
                    return Err(format!("the {what} ({name}) is not a number"));
                }
            }
        }
        for c in &self.required {
            if obj.get(c).is_none_or(|v| v.is_null()) {
                return Err(format!("required claim {c:?} is missing"));
            }
        }
        Ok(claims)
    }
}

fn describe(k: &ErrorKind) -> String {
    match k {
        ErrorKind::InvalidToken => "malformed token".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidSubject => "wrong subject".into(),
        ErrorKind::InvalidAlgorithm => "algorithm does not fit the key".into(),
        ErrorKind::InvalidAlgorithmName => "unsupported algorithm".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("required claim {c:?} is missing"),
        ErrorKind::Base64(_) => "malformed base64".into(),
        ErrorKind::Json(_) => "malformed JSON in the token".into(),
        ErrorKind::Utf8(_) => "malformed UTF-8 in the token".into(),
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => {
            "the key cannot verify this token".into()
        }
        other => format!("invalid token ({other:?})"),
    }
}

/// A claim by name; a dotted name (`realm.role`) walks into objects when no top-level
/// claim has that exact name.
fn claim<'a>(claims: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    name.split('.').try_fold(claims, |v, part| v.get(part))
}

/// A claim as a header value: strings as they are, string lists comma-joined, other
/// values as compact JSON.
fn claim_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_string()) => Some(
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

fn unauthorized(ctx: &Context, why: Option<&str>) -> Flow {
    Flow::Respond(match why {
        None => Reply::error(401, "unauthorized", "missing bearer token", ctx)
            .with_header("www-authenticate", "Bearer"),
        Some(w) => Reply::error(401, "invalid_token", w, ctx)
            .with_header("www-authenticate", "Bearer error=\"invalid_token\""),
    })
}

#[async_trait::async_trait]
impl Plugin for Jwt {
    fn name(&self) -> &'static str {
        "jwt"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        // Whatever happens next, the client never sets the forwarded-claim headers.
        for (_, h) in &self.forward {
            req.edits.remove(h.clone());
        }
        let token = match self.token(req) {
            Some(t) => t.into_owned(),
            None => return unauthorized(ctx, None),
        };
        let claims = match self.verify(&token).await {
            Ok(c) => c,
            Err(why) => return unauthorized(ctx, Some(&why)),
        };
        for (c, h) in &self.forward {
            if let Some(v) = claim(&claims, c).and_then(claim_text) {
                if let Ok(v) = http::HeaderValue::from_str(&v) {
                    req.edits.set(h.clone(), v);
                }
            }
        }
        if let Some(c) = claim(&claims, &self.consumer_claim).and_then(claim_text) {
            ctx.consumer = Some(c);
        }
        ctx.claims = Some(claims);
        Flow::Continue
    }
}

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
