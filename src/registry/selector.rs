//! Kubernetes-style label selectors: equality (`version=v2`, or a map entry), `!=`,
//! `in (a,b)`, `notin (a,b)`, existence (`tier`) and non-existence (`!tier`). Parsed
//! once when the config is compiled; matching is a walk over a handful of rules.

use crate::config::model::SelectorSpec;
use std::collections::BTreeMap;

/// One requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// All requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(pub Vec<Req>);

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .ok_or_else(|| format!("expected a set like (a, b), got `{s}`"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl Selector {
    /// Parses either form of a selector.
    pub fn parse(spec: &SelectorSpec) -> Result<Selector, String> {
        match spec {
            SelectorSpec::Map(m) => {
                for k in m.keys() {
                    if !valid_key(k) {
                        return Err(format!("invalid label key `{k}`"));
                    }
                }
                Ok(Selector(
                    m.iter()
                        .map(|(k, v)| Req::Eq(k.clone(), v.clone()))
                        .collect(),
                ))
            }
            SelectorSpec::Expr(s) => Self::parse_expr(s),
        }
    }

    fn parse_expr(s: &str) -> Result<Selector, String> {
        let mut reqs = vec![];
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            let req = if let Some(k) = p.strip_prefix('!') {
                Req::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = p.split_once("!=") {
                Req::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Req::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = p.split_once(" notin ") {
                Req::NotIn(k.trim().to_string(), parse_set(v)?)
            } else if let Some((k, v)) = p.split_once(" in ") {
                Req::In(k.trim().to_string(), parse_set(v)?)
            } else {
                Req::Exists(p.to_string())
            };
            let key = match &req {
                Req::Eq(k, _)
                | Req::NotEq(k, _)
                | Req::In(k, _)
                | Req::NotIn(k, _)
                | Req::Exists(k)
                | Req::NotExists(k) => k,
            };
            if !valid_key(key) {
                return Err(format!("invalid label key `{key}` in selector `{s}`"));
            }
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => labels.get(k) == Some(v),
            Req::NotEq(k, v) => labels.get(k) != Some(v),
            Req::In(k, vs) => labels.get(k).is_some_and(|x| vs.contains(x)),
            Req::NotIn(k, vs) => labels.get(k).is_none_or(|x| !vs.contains(x)),
            Req::Exists(k) => labels.contains_key(k),
            Req::NotExists(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expressions() {
        let s = Selector::parse(&SelectorSpec::Expr(
            "version in (v1, v2), tier != canary, !legacy, zone".into(),
        ))
        .unwrap();
        assert!(s.matches(&labels(&[("version", "v1"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[("version", "v3"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[
            ("version", "v1"),
            ("zone", "a"),
            ("legacy", "1")
        ])));
        assert!(!s.matches(&labels(&[
            ("version", "v1"),
            ("tier", "canary"),
            ("zone", "a")
        ])));
        assert!(!s.matches(&labels(&[("version", "v1")])));
        let n = Selector::parse(&SelectorSpec::Expr("env notin (prod)".into())).unwrap();
        assert!(n.matches(&labels(&[])));
        assert!(!n.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn map_form_and_errors() {
        let mut m = BTreeMap::new();
        m.insert("version".to_string(), "v2".to_string());
        let s = Selector::parse(&SelectorSpec::Map(m)).unwrap();
        assert!(s.matches(&labels(&[("version", "v2")])));
        assert!(!s.matches(&labels(&[("version", "v1")])));
        assert!(Selector::parse(&SelectorSpec::Expr("a in b".into())).is_err());
        assert!(Selector::parse(&SelectorSpec::Expr("bad key=1".into())).is_err());
    }
}
