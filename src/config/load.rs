//! Loading a config file: YAML text -> `Config`, with every mistake reported at once as
//! `FILE:LINE:COL: message`. serde_yaml gives typed values but no positions, so a second
//! pass over yaml-rust2's marked events records where each path (`routes[2].match.path`)
//! starts; each list item and map entry is then deserialized on its own, so one bad route
//! does not hide the next one's error, and validation errors find their line the same way.

use super::model::Config;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One config mistake with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Where each path of the document starts: the key (for map entries) and the value.
/// A line and column, both 1-based.
pub type LineCol = (usize, usize);

#[derive(Default, Debug)]
pub struct Positions {
    map: HashMap<String, (Option<LineCol>, LineCol)>,
}

impl Positions {
    /// Position of a path's value, falling back to the closest enclosing path.
    pub fn value(&self, path: &str) -> (usize, usize) {
        self.find(path, false)
    }
    /// Position of a path's key (where an "unknown key" should point).
    pub fn key(&self, path: &str) -> (usize, usize) {
        self.find(path, true)
    }
    fn find(&self, path: &str, key: bool) -> (usize, usize) {
        let mut p = path.to_string();
        loop {
            if let Some((k, v)) = self.map.get(&p) {
                return if key { k.unwrap_or(*v) } else { *v };
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return self.map.get("").map(|x| x.1).unwrap_or((1, 1)),
            }
        }
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<(String, Marker)>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

#[derive(Default)]
struct Recorder {
    stack: Vec<Frame>,
    out: Positions,
}

fn pos(m: &Marker) -> (usize, usize) {
    // yaml-rust2 markers: line is 1-based, column 0-based.
    (m.line(), m.col() + 1)
}

impl Recorder {
    /// Where the next value goes: returns its path, and its key's marker if in a map.
    fn next_path(&mut self) -> Option<(String, Option<Marker>)> {
        match self.stack.last_mut() {
            None => Some((String::new(), None)),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some((p, None))
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some((k, m)) => {
                    let p = if path.is_empty() {
                        k
                    } else {
                        format!("{path}.{k}")
                    };
                    Some((p, Some(m)))
                }
                None => None, // this event is a key
            },
        }
    }

    fn value_at(&mut self, mark: Marker) -> String {
        match self.next_path() {
            Some((p, k)) => {
                self.out
                    .map
                    .insert(p.clone(), (k.as_ref().map(pos), pos(&mark)));
                p
            }
            None => String::new(),
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(s, ..) => {
                let is_key = matches!(self.stack.last(), Some(Frame::Map { key: None, .. }));
                if is_key {
                    if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                        *key = Some((s, mark));
                    }
                } else {
                    self.value_at(mark);
                }
            }
            Event::Alias(_) => {
                let is_key = matches!(self.stack.last(), Some(Frame::Map { key: None, .. }));
                if is_key {
                    if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                        *key = Some(("*alias".into(), mark));
                    }
                } else {
                    self.value_at(mark);
                }
            }
            Event::MappingStart(..) => {
                let is_key = matches!(self.stack.last(), Some(Frame::Map { key: None, .. }));
                let path = if is_key {
                    "?complex-key".to_string()
                } else {
                    self.value_at(mark)
                };
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let is_key = matches!(self.stack.last(), Some(Frame::Map { key: None, .. }));
                let path = if is_key {
                    "?complex-key".to_string()
                } else {
                    self.value_at(mark)
                };
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// Records the position of every path in `text` (empty on a syntax error).
pub fn positions(text: &str) -> Positions {
    let mut rec = Recorder::default();
    let mut parser = Parser::new_from_str(text);
    if parser.load(&mut rec, false).is_err() {
        return Positions::default();
    }
    rec.out
}

/// Collects errors for one file.
pub struct Errors<'a> {
    pub file: &'a str,
    pub pos: &'a Positions,
    pub list: Vec<ConfigError>,
    /// For lists whose bad items were left out: the original index of each kept item.
    pub maps: HashMap<String, Vec<usize>>,
}

impl<'a> Errors<'a> {
    /// The path of item `i` of list `key` as written in the file (items that failed to
    /// parse are missing from the parsed list, so indices may differ).
    pub fn item(&self, key: &str, i: usize) -> String {
        let orig = self
            .maps
            .get(key)
            .and_then(|m| m.get(i))
            .copied()
            .unwrap_or(i);
        format!("{key}[{orig}]")
    }

    /// An error about the value at `path`.
    pub fn at(&mut self, path: &str, message: impl Into<String>) {
        let (line, col) = self.pos.value(path);
        self.push(line, col, message.into());
    }
    /// An error about the key at `path` (unknown keys).
    pub fn at_key(&mut self, path: &str, message: impl Into<String>) {
        let (line, col) = self.pos.key(path);
        self.push(line, col, message.into());
    }
    fn push(&mut self, line: usize, col: usize, message: String) {
        let e = ConfigError {
            file: self.file.to_string(),
            line,
            col,
            message,
        };
        if !self.list.contains(&e) {
            self.list.push(e);
        }
    }
}

fn join(prefix: &str, seg: &str) -> String {
    if prefix.is_empty() {
        seg.to_string()
    } else if seg.starts_with('[') {
        format!("{prefix}{seg}")
    } else {
        format!("{prefix}.{seg}")
    }
}

/// Deserializes one value strictly, turning the first error into a positioned one.
pub fn check<T: DeserializeOwned>(
    v: &serde_yaml::Value,
    prefix: &str,
    errs: &mut Errors,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            let mut path = prefix.to_string();
            for seg in e.path().iter() {
                use serde_path_to_error::Segment;
                match seg {
                    Segment::Seq { index } => path = format!("{path}[{index}]"),
                    Segment::Map { key } => path = join(&path, key),
                    Segment::Enum { .. } | Segment::Unknown => {}
                }
            }
            let msg = e.into_inner().to_string();
            let msg = clean_serde_message(&msg);
            if let Some(field) = unknown_field(&msg) {
                let kp = join(&path, &field);
                errs.at_key(&kp, msg);
            } else {
                errs.at(&path, msg);
            }
            None
        }
    }
}

/// serde_yaml appends " at line X column Y" for some errors; positions are ours.
fn clean_serde_message(m: &str) -> String {
    let m = match m.find(" at line ") {
        Some(i) => &m[..i],
        None => m,
    };
    m.replace(
        "data did not match any variant of untagged enum EndpointSpec",
        "an endpoint is either \"host:port\" or { address: \"host:port\", weight: N }",
    )
}

fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

/// Parses `text` (named `file` in messages) into a `Config`, or every error found.
pub fn load_str(file: &str, text: &str) -> Result<(Config, Positions), Vec<ConfigError>> {
    let root: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let (line, col) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            return Err(vec![ConfigError {
                file: file.into(),
                line,
                col,
                message: format!("YAML syntax: {}", clean_serde_message(&e.to_string())),
            }]);
        }
    };
    let pos = positions(text);
    let mut errs = Errors {
        file,
        pos: &pos,
        list: vec![],
        maps: HashMap::new(),
    };
    let root = match root {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
        v @ serde_yaml::Value::Mapping(_) => v,
        _ => {
            errs.at("", "the config file must be a mapping of top-level keys");
            return Err(errs.list);
        }
    };
    // Item-by-item pass: each list entry / map entry reports its own first error, and
    // the entries that did parse are still validated, so every mistake shows at once.
    let mut cfg = Config::default();
    let mut known_upstreams = std::collections::BTreeSet::new();
    if let serde_yaml::Value::Mapping(m) = &root {
        for (k, v) in m {
            let key = k.as_str().unwrap_or("?");
            match key {
                "listeners" => cfg.listeners = each_item(v, key, &mut errs),
                "routes" => cfg.routes = each_item(v, key, &mut errs),
                "plugins" => cfg.plugins = each_item(v, key, &mut errs),
                "upstreams" => match v {
                    serde_yaml::Value::Mapping(ups) => {
                        for (name, u) in ups {
                            let name = name.as_str().unwrap_or("?").to_string();
                            known_upstreams.insert(name.clone());
                            let p = join(key, &name);
                            if let Some(u) = check::<super::model::Upstream>(u, &p, &mut errs) {
                                cfg.upstreams.insert(name, u);
                            }
                        }
                    }
                    serde_yaml::Value::Null => {}
                    _ => errs.at(key, "`upstreams` must be a mapping of name -> upstream"),
                },
                "admin" => {
                    if let Some(a) = check(v, key, &mut errs) {
                        cfg.admin = a;
                    }
                }
                "server" => {
                    if let Some(a) = check(v, key, &mut errs) {
                        cfg.server = a;
                    }
                }
                "access_log" => {
                    if let Some(a) = check(v, key, &mut errs) {
                        cfg.access_log = a;
                    }
                }
                "trusted_proxies" => {
                    if let Some(a) = check(v, key, &mut errs) {
                        cfg.trusted_proxies = a;
                    }
                }
                "registry" => cfg.registry = check(v, key, &mut errs),
                "orchestrator" => {
                    if let serde_yaml::Value::Mapping(m) = v {
                        for (k2, v2) in m {
                            match k2.as_str() {
                                Some("deployments") => {
                                    let deployments =
                                        each_item(v2, "orchestrator.deployments", &mut errs);
                                    cfg.orchestrator =
                                        Some(super::model::Orchestrator { deployments });
                                }
                                other => errs.at_key(
                                    &format!("orchestrator.{}", other.unwrap_or("?")),
                                    format!(
                                        "unknown key `{}`, expected deployments",
                                        other.unwrap_or("?")
                                    ),
                                ),
                            }
                        }
                    } else if !v.is_null() {
                        errs.at(key, "`orchestrator` must be a mapping with `deployments`");
                    }
                }
                "redis" => cfg.redis = check(v, key, &mut errs),
                "kubernetes" => {
                    cfg.kubernetes = if v.is_null() {
                        Some(Default::default())
                    } else {
                        check(v, key, &mut errs)
                    }
                }
                other => errs.at_key(
                    other,
                    format!(
                        "unknown key `{other}`, expected one of listeners, admin, server, \
                         access_log, trusted_proxies, upstreams, routes, plugins, registry, \
                         orchestrator, redis, kubernetes"
                    ),
                ),
            }
        }
    }
    let parsed_cleanly = errs.list.is_empty();
    super::validate::validate(&cfg, &known_upstreams, parsed_cleanly, &mut errs);
    if errs.list.is_empty() {
        Ok((cfg, pos))
    } else {
        errs.list.sort_by_key(|e| (e.line, e.col));
        Err(errs.list)
    }
}

fn each_item<T: DeserializeOwned>(v: &serde_yaml::Value, key: &str, errs: &mut Errors) -> Vec<T> {
    match v {
        serde_yaml::Value::Sequence(items) => {
            let mut kept = vec![];
            let mut out = vec![];
            for (i, item) in items.iter().enumerate() {
                if let Some(t) = check::<T>(item, &format!("{key}[{i}]"), errs) {
                    kept.push(i);
                    out.push(t);
                }
            }
            errs.maps.insert(key.to_string(), kept);
            out
        }
        serde_yaml::Value::Null => vec![],
        _ => {
            errs.at(key, format!("`{key}` must be a list"));
            vec![]
        }
    }
}

/// Reads and loads a file.
pub fn load_file(path: &std::path::Path) -> Result<Config, Vec<ConfigError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: name.clone(),
            line: 1,
            col: 1,
            message: format!("cannot read the config file: {e}"),
        }]
    })?;
    load_str(&name, &text).map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_nested_paths() {
        let text = "routes:\n  - name: a\n    match:\n      path: /x\n";
        let p = positions(text);
        assert_eq!(p.value("routes[0].match.path"), (4, 13));
        assert_eq!(p.key("routes[0].match.path"), (4, 7));
        assert_eq!(p.value("routes[0].name"), (2, 11));
    }

    #[test]
    fn all_errors_reported() {
        let text = "listeners:\n  - name: web\n    bind: 127.0.0.1:8080\n    bogus: 1\nupstreams:\n  a:\n    endpoints: [\"127.0.0.1:1\"]\n    timeouts: { connect: 10 }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: missing\n";
        let errs = load_str("f.yaml", text).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].col), (4, 5));
        assert!(errs[0].message.contains("unknown field `bogus`"));
        assert_eq!(errs[1].line, 8);
        assert_eq!((errs[2].line, errs[2].col), (12, 15));
    }

    #[test]
    fn redis_section_and_store_redis() {
        let route = "routes:\n  - name: r\n    match: { path_prefix: / }\n    respond: { status: 200 }\n    plugins:\n      - rate_limit: { requests: 1, per: 1s, store: redis }\n";
        // store: redis without the section: an error at `store`.
        let errs = load_str("f.yaml", route).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].col), (6, 52));
        assert!(errs[0].message.contains("top-level `redis`"), "{errs:?}");
        // With it: defaults filled in.
        let ok = format!("redis: {{ url: \"redis://127.0.0.1:6379\" }}\n{route}");
        let (cfg, _) = load_str("f.yaml", &ok).unwrap();
        let r = cfg.redis.unwrap();
        assert_eq!(r.timeout.0, std::time::Duration::from_millis(25));
        assert_eq!(r.key_prefix, "portico:");
        // A bad URL, a zero timeout and an unknown key, each where it is.
        let bad = "redis:\n  url: \"http://x\"\n  timeout: 0s\n";
        let errs = load_str("f.yaml", bad).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].line, 2);
        assert!(errs[0].message.contains("Redis URL"), "{errs:?}");
        assert_eq!(errs[1].line, 3);
        let errs = load_str("f.yaml", "redis: { url: \"redis://h:1\", urll: 1 }\n").unwrap_err();
        assert!(errs[0].message.contains("unknown field `urll`"), "{errs:?}");
    }
}
