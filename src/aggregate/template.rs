//! Templates of aggregation calls: `{param}`, `{query.NAME}`, `{header.NAME}`,
//! `{claim.a.b}` and `{call.a.b}` pieces, parsed once at compile time. Rendering
//! escapes for where the value lands: a path segment (so `/`, `?`, `%`, `..` and CR/LF
//! cannot change the path), a query component, a header value (CR/LF/NUL refused), or
//! JSON.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use std::collections::HashMap;

/// Everything but RFC 3986 unreserved characters is encoded in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Query components keep the same set (so `&`, `=`, `#`, `+` are encoded too).
const COMPONENT: &AsciiSet = SEGMENT;

/// A variable of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    Param(String),
    Query(String),
    Header(String),
    Claim(Vec<String>),
    /// A field of an earlier call's JSON answer.
    Call(String, Vec<String>),
}

/// Parsed template text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Lit(String),
    Var(Var),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template(pub Vec<Piece>);

/// What templates are rendered from.
pub struct Inputs<'a> {
    pub params: &'a [(String, String)],
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub claims: Option<&'a Value>,
    pub calls: &'a HashMap<String, Value>,
}

/// Where a rendered value goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    Segment,
    Component,
    Header,
    Raw,
}

impl Template {
    /// Parses `text`; `known_var` says whether a variable may be used here.
    pub fn parse(
        text: &str,
        known_var: &dyn Fn(&Var) -> Result<(), String>,
    ) -> Result<Template, String> {
        let mut out = vec![];
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            if start > 0 {
                out.push(Piece::Lit(rest[..start].to_string()));
            }
            let after = &rest[start + 1..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{text}`"))?;
            let expr = after[..end].trim();
            let var = parse_var(expr)
                .ok_or_else(|| format!("invalid template variable `{{{expr}}}` in `{text}`"))?;
            known_var(&var)?;
            out.push(Piece::Var(var));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            out.push(Piece::Lit(rest.to_string()));
        }
        Ok(Template(out))
    }

    /// The single variable, when the template is exactly one (for JSON bodies).
    pub fn only_var(&self) -> Option<&Var> {
        match self.0.as_slice() {
            [Piece::Var(v)] => Some(v),
            _ => None,
        }
    }

    /// Renders with escaping; an unresolvable variable or a forbidden value is an error.
    pub fn render(&self, inp: &Inputs<'_>, esc: Escape) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Lit(l) => out.push_str(l),
                Piece::Var(v) => {
                    let raw = resolve_text(v, inp)?;
                    match esc {
                        Escape::Segment if raw.is_empty() => {
                            // An empty segment would change the path (`/users/` is a list).
                            return Err(format!("{} is empty", describe(v)));
                        }
                        Escape::Segment => {
                            let enc = utf8_percent_encode(&raw, SEGMENT).to_string();
                            // `.` and `..` alone would still be dot segments.
                            if enc == "." || enc == ".." {
                                out.push_str(&enc.replace('.', "%2E"));
                            } else {
                                out.push_str(&enc);
                            }
                        }
                        Escape::Component => {
                            out.push_str(&utf8_percent_encode(&raw, COMPONENT).to_string())
                        }
                        Escape::Header => {
                            if raw.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                                return Err(format!(
                                    "value of {} contains a line break",
                                    describe(v)
                                ));
                            }
                            out.push_str(&raw);
                        }
                        Escape::Raw => out.push_str(&raw),
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parse_var(expr: &str) -> Option<Var> {
    if expr.is_empty() {
        return None;
    }
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    };
    let parts: Vec<&str> = expr.split('.').collect();
    if !parts.iter().all(|p| ok(p)) {
        return None;
    }
    Some(match parts.as_slice() {
        [name] => Var::Param(name.to_string()),
        ["query", name] => Var::Query(name.to_string()),
        ["header", name] => Var::Header(name.to_ascii_lowercase()),
        ["claim", path @ ..] if !path.is_empty() => {
            Var::Claim(path.iter().map(|s| s.to_string()).collect())
        }
        [call, path @ ..] => Var::Call(
            call.to_string(),
            path.iter().map(|s| s.to_string()).collect(),
        ),
        [] => return None,
    })
}

/// A short name of a variable for error messages.
pub fn describe(v: &Var) -> String {
    match v {
        Var::Param(n) => format!("{{{n}}}"),
        Var::Query(n) => format!("{{query.{n}}}"),
        Var::Header(n) => format!("{{header.{n}}}"),
        Var::Claim(p) => format!("{{claim.{}}}", p.join(".")),
        Var::Call(c, p) => format!("{{{c}.{}}}", p.join(".")),
    }
}

fn walk<'a>(mut v: &'a Value, path: &[String]) -> Option<&'a Value> {
    for seg in path {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// The JSON value of a variable.
pub fn resolve(v: &Var, inp: &Inputs<'_>) -> Result<Value, String> {
    let missing = || format!("{} has no value", describe(v));
    match v {
        Var::Param(n) => inp
            .params
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, val)| Value::String(val.clone()))
            .ok_or_else(missing),
        Var::Query(n) => inp
            .query
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('=').or(Some((p, ""))))
            .find(|(k, _)| {
                percent_encoding::percent_decode_str(k).decode_utf8_lossy() == n.as_str()
            })
            .map(|(_, val)| {
                let val = val.replace('+', " ");
                Value::String(
                    percent_encoding::percent_decode_str(&val)
                        .decode_utf8_lossy()
                        .into_owned(),
                )
            })
            .ok_or_else(missing),
        Var::Header(n) => inp
            .headers
            .get(n.as_str())
            .and_then(|h| h.to_str().ok())
            .map(|s| Value::String(s.to_string()))
            .ok_or_else(missing),
        Var::Claim(p) => inp
            .claims
            .and_then(|c| walk(c, p))
            .cloned()
            .ok_or_else(missing),
        Var::Call(c, p) => inp
            .calls
            .get(c)
            .and_then(|v| walk(v, p))
            .cloned()
            .ok_or_else(missing),
    }
}

fn resolve_text(v: &Var, inp: &Inputs<'_>) -> Result<String, String> {
    Ok(match resolve(v, inp)? {
        Value::String(s) => s,
        Value::Null => return Err(format!("{} is null", describe(v))),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &Var) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn escaping_cannot_change_the_path_or_headers() {
        let t = Template::parse("/users/{id}/x", &any).unwrap();
        let headers = http::HeaderMap::new();
        let calls = HashMap::new();
        for (evil, want) in [
            ("../admin", "/users/..%2Fadmin/x"),
            ("..", "/users/%2E%2E/x"),
            ("a?b=1#c", "/users/a%3Fb%3D1%23c/x"),
            ("100%", "/users/100%25/x"),
            ("a\r\nX: 1", "/users/a%0D%0AX%3A%201/x"),
        ] {
            let params = vec![("id".to_string(), evil.to_string())];
            let inp = Inputs {
                params: &params,
                query: None,
                headers: &headers,
                claims: None,
                calls: &calls,
            };
            assert_eq!(t.render(&inp, Escape::Segment).unwrap(), want);
        }
        let h = Template::parse("{id}", &any).unwrap();
        let params = vec![("id".to_string(), "a\r\nX-Evil: 1".to_string())];
        let inp = Inputs {
            params: &params,
            query: None,
            headers: &headers,
            claims: None,
            calls: &calls,
        };
        assert!(h.render(&inp, Escape::Header).is_err());
    }

    #[test]
    fn variables() {
        assert_eq!(parse_var("user_id"), Some(Var::Param("user_id".into())));
        assert_eq!(parse_var("query.page"), Some(Var::Query("page".into())));
        assert_eq!(
            parse_var("header.X-Tenant"),
            Some(Var::Header("x-tenant".into()))
        );
        assert_eq!(parse_var("claim.sub"), Some(Var::Claim(vec!["sub".into()])));
        assert_eq!(
            parse_var("user.address.city"),
            Some(Var::Call(
                "user".into(),
                vec!["address".into(), "city".into()]
            ))
        );
        assert_eq!(parse_var("a b"), None);
        assert!(Template::parse("/x/{oops", &any).is_err());
    }
}
