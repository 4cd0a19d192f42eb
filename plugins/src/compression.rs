//! The `compression` plugin: compresses response bodies with gzip, brotli (`br`), zstd
//! or deflate, whichever the client's `Accept-Encoding` ranks highest (q-values; `q=0`
//! excludes; ties go to the order of `algorithms`, the server's preference; `*`
//! stands for every coding not listed; an explicitly preferred `identity` wins).
//! It streams: the body filter compresses each chunk as it arrives and flushes at
//! the chunk's end, so nothing waits for the whole body and memory stays flat.
//!
//! Skipped: HEAD, 1xx/204/304, 206 and requests with `Range`, responses that already
//! have a `Content-Encoding`, `Cache-Control: no-transform`, a `Content-Length` below
//! `min_size` (default 1 KiB; an unknown length is compressed), and content types not
//! matched by `content_types`. When it compresses it sets `Content-Encoding`, adds
//! `Accept-Encoding` to `Vary`, drops `Content-Length` and `Accept-Ranges` (the body
//! goes chunked), and weakens a strong `ETag` (`"x"` becomes `W/"x"`).

use crate::units::Size;
use crate::{add_vary, BodyFilter, Context, Factory, Plugin, ResponseView};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// A content coding this plugin produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coding {
    /// gzip (RFC 1952).
    Gzip,
    /// brotli (RFC 7932).
    Br,
    /// Zstandard (RFC 8878).
    Zstd,
    /// zlib-wrapped deflate, as HTTP's `deflate` means (RFC 9110).
    Deflate,
}

impl Coding {
    fn token(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Br => "br",
            Coding::Zstd => "zstd",
            Coding::Deflate => "deflate",
        }
    }
    fn levels(self) -> (i32, i32, i32) {
        // (min, max, default)
        match self {
            Coding::Gzip | Coding::Deflate => (0, 9, 6),
            Coding::Br => (0, 11, 4),
            Coding::Zstd => (1, 22, 3),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Level {
    All(i32),
    Each(BTreeMap<Coding, i32>),
}

fn default_algorithms() -> Vec<Coding> {
    vec![Coding::Gzip, Coding::Br, Coding::Zstd]
}
fn default_min_size() -> Size {
    Size(1024)
}
fn default_types() -> Vec<String> {
    [
        "text/*",
        "application/json",
        "application/*+json",
        "application/x-ndjson",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "application/xml",
        "application/*+xml",
        "application/wasm",
        "application/graphql-response+json",
        "image/svg+xml",
        "image/x-icon",
        "image/bmp",
        "font/ttf",
        "font/otf",
        "application/vnd.ms-fontobject",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The `compression` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_algorithms")]
    algorithms: Vec<Coding>,
    #[serde(default = "default_min_size")]
    min_size: Size,
    #[serde(default = "default_types")]
    content_types: Vec<String>,
    #[serde(default)]
    level: Option<Level>,
}

/// A content-type pattern: `type/sub`, `type/*`, `type/*+suffix` or `*/*`.
#[derive(Debug)]
struct TypePattern {
    main: String,
    /// `None` = any subtype.
    sub: Option<String>,
    /// `*+json`: any subtype with this suffix.
    suffix: Option<String>,
}

impl TypePattern {
    fn parse(s: &str) -> Result<TypePattern, String> {
        let t = s.trim().to_ascii_lowercase();
        let (main, sub) = t
            .split_once('/')
            .ok_or_else(|| format!("content_types: {s:?} is not a media type (type/subtype)"))?;
        if main.is_empty() || sub.is_empty() || sub.contains(';') {
            return Err(format!(
                "content_types: {s:?} is not a media type (type/subtype)"
            ));
        }
        Ok(if sub == "*" {
            TypePattern {
                main: main.into(),
                sub: None,
                suffix: None,
            }
        } else if let Some(suffix) = sub.strip_prefix("*+") {
            TypePattern {
                main: main.into(),
                sub: None,
                suffix: Some(format!("+{suffix}")),
            }
        } else {
            TypePattern {
                main: main.into(),
                sub: Some(sub.into()),
                suffix: None,
            }
        })
    }

    fn matches(&self, main: &str, sub: &str) -> bool {
        (self.main == "*" || self.main == main)
            && match (&self.sub, &self.suffix) {
                (Some(s), _) => s == sub,
                (None, Some(suf)) => sub.ends_with(suf.as_str()),
                (None, None) => true,
            }
    }
}

/// The `compression` plugin instance.
pub struct Compression {
    algorithms: Vec<(Coding, i32)>,
    min_size: u64,
    types: Vec<TypePattern>,
}

/// Builds [`Compression`] instances.
pub struct CompressionFactory;

impl Factory for CompressionFactory {
    fn name(&self) -> &'static str {
        "compression"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(Compression::new(crate::settings(settings)?)?))
    }
}

impl Compression {
    fn new(s: Settings) -> Result<Compression, String> {
        if s.algorithms.is_empty() {
            return Err("algorithms: list at least one of gzip, br, zstd, deflate".into());
        }
        let mut algorithms = vec![];
        for a in &s.algorithms {
            if algorithms.iter().any(|(b, _)| b == a) {
                return Err(format!("algorithms: {} is listed twice", a.token()));
            }
            let (min, max, default) = a.levels();
            let level = match &s.level {
                None => default,
                Some(Level::All(l)) => *l,
                Some(Level::Each(m)) => m.get(a).copied().unwrap_or(default),
            };
            if !(min..=max).contains(&level) {
                return Err(format!(
                    "level: {level} is out of range for {} ({min}..={max})",
                    a.token()
                ));
            }
            algorithms.push((*a, level));
        }
        if let Some(Level::Each(m)) = &s.level {
            if let Some(c) = m.keys().find(|c| !s.algorithms.contains(c)) {
                return Err(format!("level: {} is not in algorithms", c.token()));
            }
        }
        let types = s
            .content_types
            .iter()
            .map(|t| TypePattern::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Compression {
            algorithms,
            min_size: s.min_size.0,
            types,
        })
    }

    /// The coding to use for this `Accept-Encoding` (all its lines, joined).
    fn negotiate(&self, accept: &str) -> Option<(Coding, i32)> {
        let mut star: Option<f32> = None;
        let mut identity: Option<f32> = None;
        let mut listed: Vec<(String, f32)> = vec![];
        for item in accept.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            let mut q = 1.0f32;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0);
                    }
                }
            }
            match name.as_str() {
                "*" => star = Some(q),
                "identity" => identity = Some(q),
                "x-gzip" => listed.push(("gzip".into(), q)),
                _ => listed.push((name, q)),
            }
        }
        let mut best: Option<(Coding, i32, f32)> = None;
        for (c, level) in &self.algorithms {
            let q = listed
                .iter()
                .filter(|(n, _)| n == c.token())
                .map(|(_, q)| *q)
                .fold(None, |acc: Option<f32>, q| {
                    Some(acc.map_or(q, |a| a.max(q)))
                })
                .or(star)
                .unwrap_or(0.0);
            if q > 0.0 && best.is_none_or(|(_, _, bq)| q > bq) {
                best = Some((*c, *level, q));
            }
        }
        let (c, level, q) = best?;
        if identity.is_some_and(|iq| iq > q) {
            return None;
        }
        Some((c, level))
    }

    fn compressible(&self, content_type: Option<&str>) -> bool {
        let Some(ct) = content_type else {
            return false;
        };
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let Some((main, sub)) = media.split_once('/') else {
            return false;
        };
        self.types.iter().any(|t| t.matches(main, sub))
    }
}

fn header_str(h: &http::HeaderMap, n: http::header::HeaderName) -> Option<&str> {
    h.get(n).and_then(|v| v.to_str().ok())
}

impl Plugin for Compression {
    fn name(&self) -> &'static str {
        "compression"
    }

    fn on_response(
        &self,
        resp: &mut ResponseView<'_>,
        _ctx: &mut Context,
    ) -> Option<Box<dyn BodyFilter>> {
        use http::header::*;
        let status = resp.status;
        if *resp.request_method == http::Method::HEAD
            || status < 200
            || status == 204
            || status == 304
            || status == 206
            || resp.request_headers.contains_key(RANGE)
        {
            return None;
        }
        let h = resp.headers;
        if header_str(h, CONTENT_ENCODING)
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"))
        {
            return None;
        }
        let no_transform = h
            .get_all(CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
        if no_transform {
            return None;
        }
        if let Some(len) = header_str(h, CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok())
        {
            if len < self.min_size {
                return None;
            }
        }
        if !self.compressible(header_str(h, CONTENT_TYPE)) {
            return None;
        }
        let accept = resp
            .request_headers
            .get_all(ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        // Whatever was chosen, the answer depended on Accept-Encoding.
        add_vary(resp, "Accept-Encoding");
        let (coding, level) = self.negotiate(&accept)?;
        let encoder = Encoder::new(coding, level)?;
        resp.edits
            .set(CONTENT_ENCODING, HeaderValue::from_static(coding.token()));
        resp.edits.remove(CONTENT_LENGTH);
        resp.edits.remove(ACCEPT_RANGES);
        // Without a length, an HTTP/1.1 body must be chunked (HTTP/2 drops this field).
        resp.edits
            .set(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        if let Some(etag) = header_str(h, ETAG) {
            let etag = etag.trim();
            if etag.starts_with('"') {
                if let Ok(v) = HeaderValue::from_str(&format!("W/{etag}")) {
                    resp.edits.set(ETAG, v);
                }
            }
        }
        Some(Box::new(encoder))
    }
}

/// A streaming compressor (the body filter).
pub enum Encoder {
    /// gzip.
    Gzip(Option<flate2::write::GzEncoder<Vec<u8>>>),
    /// deflate (zlib).
    Deflate(Option<flate2::write::ZlibEncoder<Vec<u8>>>),
    /// brotli.
    Br(Option<Box<brotli::CompressorWriter<Vec<u8>>>>),
    /// zstd (its encoder is not `Sync`; the mutex is never contended).
    Zstd(Option<Mutex<zstd::stream::write::Encoder<'static, Vec<u8>>>>),
}

impl Encoder {
    /// A compressor for `coding` at `level`.
    pub fn new(coding: Coding, level: i32) -> Option<Encoder> {
        let l = level.max(0) as u32;
        Some(match coding {
            Coding::Gzip => Encoder::Gzip(Some(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(l),
            ))),
            Coding::Deflate => Encoder::Deflate(Some(flate2::write::ZlibEncoder::new(
                Vec::new(),
                flate2::Compression::new(l),
            ))),
            Coding::Br => Encoder::Br(Some(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                l,
                // A 512 KiB window (as Pingora's own compressor): bounded memory per stream.
                19,
            )))),
            Coding::Zstd => Encoder::Zstd(Some(Mutex::new(
                zstd::stream::write::Encoder::new(Vec::new(), level).ok()?,
            ))),
        })
    }

    /// Compresses `input`; flushes (end of a chunk) or finishes (end of the body).
    /// Returns the compressed bytes produced so far.
    pub fn encode(&mut self, input: &[u8], end: bool) -> std::io::Result<Vec<u8>> {
        fn step<W: Write>(
            slot: &mut Option<W>,
            input: &[u8],
            end: bool,
            buf: fn(&mut W) -> &mut Vec<u8>,
            finish: fn(W) -> std::io::Result<Vec<u8>>,
        ) -> std::io::Result<Vec<u8>> {
            let Some(w) = slot.as_mut() else {
                return Ok(Vec::new());
            };
            if !input.is_empty() {
                w.write_all(input)?;
            }
            if end {
                let w = slot.take().ok_or(std::io::ErrorKind::Other)?;
                finish(w)
            } else {
                w.flush()?;
                Ok(std::mem::take(buf(w)))
            }
        }
        match self {
            Encoder::Gzip(s) => step(s, input, end, |w| w.get_mut(), |w| w.finish()),
            Encoder::Deflate(s) => step(s, input, end, |w| w.get_mut(), |w| w.finish()),
            Encoder::Br(s) => step(s, input, end, |w| w.get_mut(), |w| Ok(w.into_inner())),
            Encoder::Zstd(s) => {
                let Some(m) = s.as_mut() else {
                    return Ok(Vec::new());
                };
                let w = m.get_mut().map_err(|_| std::io::ErrorKind::Other)?;
                if !input.is_empty() {
                    w.write_all(input)?;
                }
                if end {
                    let m = s.take().ok_or(std::io::ErrorKind::Other)?;
                    let w = m.into_inner().map_err(|_| std::io::ErrorKind::Other)?;
                    w.finish()
                } else {
                    w.flush()?;
                    Ok(std::mem::take(w.get_mut()))
                }
            }
        }
    }
}

impl BodyFilter for Encoder {
    fn filter(&mut self, chunk: Option<Bytes>, end: bool) -> Option<Bytes> {
        let input = chunk.unwrap_or_default();
        match self.encode(&input, end) {
            // Nothing to send yet (or any more): no data for this call.
            Ok(out) if out.is_empty() => None,
            Ok(out) => Some(Bytes::from(out)),
            Err(e) => {
                log::warn!("compression failed mid-stream: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::io::Read;

    fn comp(yaml: &str) -> Compression {
        Compression::new(crate::settings(&serde_yaml::from_str(yaml).unwrap()).unwrap()).unwrap()
    }

    fn decode(c: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match c {
            Coding::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Deflate => {
                flate2::read::ZlibDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Br => {
                brotli::Decompressor::new(data, 4096)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Zstd => {
                out = zstd::stream::decode_all(data).unwrap();
            }
        }
        out
    }

    #[test]
    fn negotiation() {
        let c = comp("{}");
        let n = |a: &str| c.negotiate(a).map(|(c, _)| c);
        assert_eq!(n("gzip, br, zstd"), Some(Coding::Gzip), "tie: server order");
        assert_eq!(n("br;q=1, gzip;q=0.5"), Some(Coding::Br));
        assert_eq!(n("gzip;q=0.2, zstd;q=0.9, br;q=0.5"), Some(Coding::Zstd));
        assert_eq!(n("gzip;q=0, br;q=0"), None);
        assert_eq!(n("*"), Some(Coding::Gzip));
        assert_eq!(n("*;q=0.5, gzip;q=0"), Some(Coding::Br));
        assert_eq!(n("identity"), None);
        assert_eq!(n("gzip;q=0.5, identity"), None, "identity preferred");
        assert_eq!(n("gzip, identity;q=0.1"), Some(Coding::Gzip));
        assert_eq!(n(""), None);
        assert_eq!(n("deflate"), None, "not configured");
        assert_eq!(n("x-gzip"), Some(Coding::Gzip));
        assert_eq!(n("GZIP;Q=0.5"), Some(Coding::Gzip));
        let c = comp("algorithms: [zstd, br, deflate]");
        assert_eq!(
            c.negotiate("gzip, br, deflate, zstd").unwrap().0,
            Coding::Zstd
        );
        assert_eq!(c.negotiate("deflate").unwrap().0, Coding::Deflate);
    }

    #[test]
    fn streaming_round_trip_every_coding() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i} {}\n", i % 7).into_bytes())
            .collect();
        for c in [Coding::Gzip, Coding::Br, Coding::Zstd, Coding::Deflate] {
            let mut e = Encoder::new(c, c.levels().2).unwrap();
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = data.chunks(64 * 1024).collect();
            for (i, ch) in chunks.iter().enumerate() {
                let piece = e.filter(Some(Bytes::copy_from_slice(ch)), false).unwrap();
                // Flushed at every chunk boundary: each chunk produces output.
                assert!(!piece.is_empty(), "{c:?} chunk {i} produced nothing");
                out.extend_from_slice(&piece);
            }
            out.extend_from_slice(&e.filter(None, true).unwrap());
            assert!(
                out.len() < data.len() / 3,
                "{c:?} compressed to {}",
                out.len()
            );
            assert_eq!(decode(c, &out), data, "{c:?}");
            // The flushed prefix decodes on its own (a client can render as it arrives).
        }
    }

    #[test]
    fn empty_body_and_last_chunk_with_data() {
        for c in [Coding::Gzip, Coding::Br, Coding::Zstd, Coding::Deflate] {
            let mut e = Encoder::new(c, 1).unwrap();
            let out = e.filter(None, true).unwrap();
            assert_eq!(decode(c, &out), b"");
            let mut e = Encoder::new(c, 1).unwrap();
            let out = e.filter(Some(Bytes::from_static(b"hello")), true).unwrap();
            assert_eq!(decode(c, &out), b"hello");
            // Nothing after the end.
            assert!(e.filter(None, true).is_none());
        }
    }

    fn run(
        p: &dyn Plugin,
        req: &Req,
        status: u16,
        headers: &[(&str, &str)],
    ) -> (Option<Box<dyn BodyFilter>>, crate::HeaderEdits) {
        response(p, req, status, headers, &mut ctx())
    }

    #[test]
    fn headers_when_compressing() {
        let p = build("compression: {}").unwrap();
        let r = Req::get("/").header("accept-encoding", "br, gzip;q=0.8");
        let (f, e) = run(
            &*p,
            &r,
            200,
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("content-length", "5000"),
                ("etag", "\"abc\""),
                ("vary", "Origin"),
                ("accept-ranges", "bytes"),
            ],
        );
        assert!(f.is_some());
        assert_eq!(set_value(&e, "content-encoding").as_deref(), Some("br"));
        assert_eq!(
            set_value(&e, "vary").as_deref(),
            Some("Origin, Accept-Encoding")
        );
        assert_eq!(set_value(&e, "etag").as_deref(), Some("W/\"abc\""));
        assert_eq!(
            set_value(&e, "transfer-encoding").as_deref(),
            Some("chunked")
        );
        assert!(e.remove.iter().any(|h| h == "content-length"));
        assert!(e.remove.iter().any(|h| h == "accept-ranges"));
        // A weak ETag stays as it is.
        let (_, e) = run(
            &*p,
            &r,
            200,
            &[("content-type", "text/html"), ("etag", "W/\"x\"")],
        );
        assert_eq!(set_value(&e, "etag"), None);
        assert_eq!(set_value(&e, "content-encoding").as_deref(), Some("br"));
    }

    #[test]
    fn skipped_cases() {
        let p = build("compression: { min_size: 1KiB }").unwrap();
        let gz = Req::get("/").header("accept-encoding", "gzip");
        let json = [("content-type", "application/json")];
        assert!(
            run(&*p, &gz, 200, &json).0.is_some(),
            "unknown length compresses"
        );
        let skip =
            |req: &Req, status: u16, h: &[(&str, &str)]| run(&*p, req, status, h).0.is_none();
        assert!(skip(
            &gz,
            200,
            &[
                ("content-type", "application/json"),
                ("content-length", "1023")
            ]
        ));
        assert!(!skip(
            &gz,
            200,
            &[
                ("content-type", "application/json"),
                ("content-length", "1024")
            ]
        ));
        assert!(skip(&gz, 200, &[("content-type", "image/png")]));
        assert!(skip(
            &gz,
            200,
            &[("content-type", "application/octet-stream")]
        ));
        assert!(skip(&gz, 200, &[]), "no content type");
        assert!(skip(
            &gz,
            200,
            &[("content-type", "text/plain"), ("content-encoding", "gzip")]
        ));
        assert!(skip(
            &gz,
            200,
            &[
                ("content-type", "text/plain"),
                ("cache-control", "public, no-transform")
            ]
        ));
        assert!(skip(&gz, 204, &json));
        assert!(skip(&gz, 304, &json));
        assert!(skip(&gz, 206, &json));
        assert!(skip(
            &Req::new("HEAD", "/").header("accept-encoding", "gzip"),
            200,
            &json
        ));
        assert!(skip(&gz.header("range", "bytes=0-10"), 200, &json));
        assert!(skip(&Req::get("/"), 200, &json), "no Accept-Encoding");
        // Vary is still added when the answer depended on Accept-Encoding.
        let (_, e) = run(&*p, &Req::get("/"), 200, &json);
        assert_eq!(set_value(&e, "vary").as_deref(), Some("Accept-Encoding"));
        // Suffix and wildcard patterns.
        let p = build(
            "compression: { content_types: ['application/*+json', 'application/octet-stream'] }",
        )
        .unwrap();
        let gz = Req::get("/").header("accept-encoding", "gzip");
        assert!(run(
            &*p,
            &gz,
            200,
            &[("content-type", "application/problem+json")]
        )
        .0
        .is_some());
        assert!(run(
            &*p,
            &gz,
            200,
            &[("content-type", "application/octet-stream")]
        )
        .0
        .is_some());
        assert!(run(&*p, &gz, 200, &[("content-type", "text/plain")])
            .0
            .is_none());
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("compression: { algorithms: [lzma] }").contains("unknown variant"));
        assert!(e("compression: { algorithms: [] }").contains("at least one"));
        assert!(e("compression: { algorithms: [gzip, gzip] }").contains("twice"));
        assert!(e("compression: { level: 12 }").contains("out of range"));
        assert!(e("compression: { level: { br: 11, gzip: 10 } }").contains("gzip"));
        assert!(e("compression: { algorithms: [gzip], level: { br: 5 } }")
            .contains("not in algorithms"));
        assert!(e("compression: { content_types: [json] }").contains("media type"));
        assert!(e("compression: { min_size: 1XB }").contains("unknown unit"));
        assert!(build("compression: { level: { br: 11, zstd: 19 } }").is_ok());
        assert!(build("compression:").is_ok());
    }
}

/// A micro-benchmark of one whole small-response compression (encoder set-up, the
/// body, the trailer), ignored by default. Run it with a release build:
/// `cargo test --release -p portico-plugins -- --ignored compression_bench --nocapture`.
/// It prints `compression_bench: CODING level L: NS ns/response (OUT bytes)` for a
/// 2 KiB JSON body, the size the plugin-chain benchmark in bench/ uses.
#[cfg(test)]
mod bench {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn compression_bench() {
        let body: Vec<u8> = (0..40)
            .flat_map(|i| {
                format!("{{\"id\":{i},\"name\":\"user-{i}\",\"active\":true}},").into_bytes()
            })
            .collect();
        let body = &body[..body.len().min(2048)];
        for (c, level) in [
            (Coding::Gzip, 1),
            (Coding::Gzip, 6),
            (Coding::Br, 1),
            (Coding::Br, 4),
            (Coding::Zstd, 1),
            (Coding::Zstd, 3),
        ] {
            let iters = 20_000u32;
            let mut out_len = 0;
            let mut best = u128::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..iters {
                    let Some(mut e) = Encoder::new(c, level) else {
                        panic!("no encoder for {c:?}")
                    };
                    let Ok(out) = e.encode(body, true) else {
                        panic!("{c:?} failed")
                    };
                    out_len = std::hint::black_box(out).len();
                }
                best = best.min(t.elapsed().as_nanos() / iters as u128);
            }
            println!(
                "compression_bench: {} level {level}: {best} ns/response ({} -> {out_len} bytes)",
                c.token(),
                body.len()
            );
        }
    }
}
