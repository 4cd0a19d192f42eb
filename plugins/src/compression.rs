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
//!
//! Cost: a zlib-ng deflate stream is a ~330 KB allocation, so gzip and deflate streams
//! are kept in a small per-thread pool and reset (`deflateReset`) for the next
//! response instead of being made afresh; zstd contexts are pooled the same way
//! (a session reset keeps their tables). brotli encoders are still made per response.
//! The default gzip/deflate level is 1, as nginx's: on a 2 KiB JSON answer level 6
//! costs about three times as much CPU as level 1 for output about a quarter smaller
//! (see the `compression_bench` test).

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
        // (min, max, default). gzip/deflate default to 1, as nginx's `gzip_comp_level`:
        // on a 2 KiB JSON answer level 1 costs about a third of level 6 and its output
        // is about a third larger (zlib-ng's level 1 uses fixed Huffman codes).
        match self {
            Coding::Gzip | Coding::Deflate => (0, 9, 1),
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

    /// The coding to use for this `Accept-Encoding` (all its lines, joined). No
    /// allocation: this runs for every compressible answer.
    fn negotiate(&self, accept: &str) -> Option<(Coding, i32)> {
        let mut star: Option<f32> = None;
        let mut identity: Option<f32> = None;
        // The highest q given to each configured coding (at most four: no repeats).
        let mut listed = [None::<f32>; 4];
        for item in accept.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
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
            if name == "*" {
                star = Some(q);
            } else if name.eq_ignore_ascii_case("identity") {
                identity = Some(q);
            } else {
                let name = if name.eq_ignore_ascii_case("x-gzip") {
                    "gzip"
                } else {
                    name
                };
                for (slot, (c, _)) in listed.iter_mut().zip(&self.algorithms) {
                    if name.eq_ignore_ascii_case(c.token()) {
                        *slot = Some(slot.map_or(q, |a| a.max(q)));
                    }
                }
            }
        }
        let mut best: Option<(Coding, i32, f32)> = None;
        for ((c, level), q) in self.algorithms.iter().zip(listed) {
            let q = q.or(star).unwrap_or(0.0);
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
        // Usually one Accept-Encoding line: read it in place; several are joined.
        let mut lines = resp.request_headers.get_all(ACCEPT_ENCODING).iter();
        let accept: std::borrow::Cow<'_, str> = match (lines.next(), lines.next()) {
            (None, _) => "".into(),
            (Some(v), None) => v.to_str().unwrap_or("").into(),
            _ => resp
                .request_headers
                .get_all(ACCEPT_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        };
        let chosen = self.negotiate(&accept);
        // Whatever was chosen, the answer depended on Accept-Encoding.
        add_vary(resp, "Accept-Encoding");
        let (coding, level) = chosen?;
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
    /// gzip or deflate (zlib): a pooled zlib-ng stream, see [`DeflateStream`].
    Deflate(Option<DeflateStream>),
    /// brotli.
    Br(Option<Box<brotli::CompressorWriter<Vec<u8>>>>),
    /// zstd: a pooled compression context, see [`ZstdStream`].
    Zstd(Option<ZstdStream>),
}

/// What a pooled deflate stream was made for: gzip or zlib framing, and the level.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct DeflateKind {
    gzip: bool,
    level: u32,
}

/// How many idle deflate streams each thread keeps for reuse. One zlib-ng stream
/// holds about 330 KB (window, chains, a 128 KB hash table, the pending buffer); a
/// stream busy with a long response is not idle, so this bounds only the cache.
const POOL_PER_THREAD: usize = 8;

/// A per-thread pool of idle compressors of one kind, keyed by what they were made for.
type Pool<K, T> = std::thread::LocalKey<std::cell::RefCell<Vec<(K, T)>>>;

thread_local! {
    /// Idle deflate streams of this thread, reset when taken.
    static DEFLATE_POOL: std::cell::RefCell<Vec<(DeflateKind, flate2::Compress)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// Idle zstd contexts of this thread (keyed by level), reset when taken.
    static ZSTD_POOL: std::cell::RefCell<Vec<(i32, zstd::stream::raw::Encoder<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// An idle compressor made for `key`, if this thread has one.
fn pool_take<K: PartialEq + 'static, T: 'static>(pool: &'static Pool<K, T>, key: &K) -> Option<T> {
    pool.try_with(|p| {
        let mut p = p.try_borrow_mut().ok()?;
        let i = p.iter().rposition(|(k, _)| k == key)?;
        Some(p.swap_remove(i).1)
    })
    .ok()
    .flatten()
}

/// Keeps `item` for reuse unless the pool is full (or gone: thread teardown).
fn pool_put<K: 'static, T: 'static>(pool: &'static Pool<K, T>, key: K, item: T) {
    let _ = pool.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < POOL_PER_THREAD {
                p.push((key, item));
            }
        }
    });
}

/// Grows `out` (doubling, at least 1 KiB) when fewer than 64 bytes are free: a
/// compressor writes into the spare capacity.
fn make_room(out: &mut Vec<u8>) {
    if out.capacity() - out.len() < 64 {
        out.reserve(out.capacity().max(1024));
    }
}

/// A zstd compression context taken from (and given back to, on drop) a per-thread
/// pool. A reused context keeps its tables: zstd resets a session without clearing
/// them, where a new one allocates and initialises them for every response.
pub struct ZstdStream {
    level: i32,
    /// The context is not `Sync`; the mutex is never contended.
    enc: Option<Mutex<zstd::stream::raw::Encoder<'static>>>,
}

impl ZstdStream {
    fn take(level: i32) -> Option<ZstdStream> {
        use zstd::stream::raw::Operation;
        let enc = match pool_take(&ZSTD_POOL, &level) {
            Some(mut e) => {
                e.reinit().ok()?;
                e
            }
            None => zstd::stream::raw::Encoder::new(level).ok()?,
        };
        Some(ZstdStream {
            level,
            enc: Some(Mutex::new(enc)),
        })
    }

    /// Compresses all of `input` into `out`, then flushes or ends the frame.
    fn run(&mut self, input: &[u8], end: bool, out: &mut Vec<u8>) -> std::io::Result<()> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let enc = self
            .enc
            .as_mut()
            .ok_or(std::io::ErrorKind::Other)?
            .get_mut()
            .map_err(|_| std::io::ErrorKind::Other)?;
        out.reserve(input.len() / 2 + 64);
        let mut inb = InBuffer::around(input);
        loop {
            make_room(out);
            let pos = out.len();
            let mut outb = OutBuffer::around_pos(out, pos);
            if inb.pos() < input.len() {
                enc.run(&mut inb, &mut outb)?;
                continue;
            }
            // What zstd still holds back; 0 once all of it is out.
            let left = if end {
                enc.finish(&mut outb, true)?
            } else {
                enc.flush(&mut outb)?
            };
            if left == 0 {
                return Ok(());
            }
        }
    }
}

impl Drop for ZstdStream {
    fn drop(&mut self) {
        if let Some(Ok(e)) = self.enc.take().map(Mutex::into_inner) {
            pool_put(&ZSTD_POOL, self.level, e);
        }
    }
}

/// A zlib-ng deflate stream taken from (and given back to, on drop) a per-thread
/// pool. Allocating a stream costs a ~330 KB allocation with 64 KB zeroed; a reused
/// one only needs `deflateReset` (which clears the 128 KB hash table), so a small
/// response pays the compression and not the set-up.
pub struct DeflateStream {
    kind: DeflateKind,
    compress: Option<flate2::Compress>,
}

impl DeflateStream {
    fn take(kind: DeflateKind) -> DeflateStream {
        let compress = match pool_take(&DEFLATE_POOL, &kind) {
            Some(mut c) => {
                c.reset();
                c
            }
            None => {
                let level = flate2::Compression::new(kind.level);
                if kind.gzip {
                    flate2::Compress::new_gzip(level, 15)
                } else {
                    flate2::Compress::new(level, true)
                }
            }
        };
        DeflateStream {
            kind,
            compress: Some(compress),
        }
    }

    /// Compresses all of `input` into `out`, then flushes (`Sync`) or ends the stream
    /// (`Finish`, which writes the gzip/zlib trailer).
    fn run(
        &mut self,
        mut input: &[u8],
        flush: flate2::FlushCompress,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let c = self.compress.as_mut().ok_or(std::io::ErrorKind::Other)?;
        // Compressible text shrinks several times; grow when it does not.
        out.reserve(input.len() / 2 + 64);
        let finish = matches!(flush, flate2::FlushCompress::Finish);
        loop {
            make_room(out);
            let (in0, out0) = (c.total_in(), c.total_out());
            let status = c
                .compress_vec(input, out, flush)
                .map_err(std::io::Error::other)?;
            input = &input[(c.total_in() - in0) as usize..];
            if matches!(status, flate2::Status::StreamEnd) {
                return Ok(());
            }
            // zlib-ng stops early only when the output is full: with room to spare,
            // everything given so far has been compressed and flushed.
            let room_left = out.len() < out.capacity();
            if input.is_empty() && room_left && !finish {
                return Ok(());
            }
            if room_left && c.total_in() == in0 && c.total_out() == out0 {
                return Err(std::io::Error::other("deflate made no progress"));
            }
        }
    }
}

impl Drop for DeflateStream {
    fn drop(&mut self) {
        if let Some(c) = self.compress.take() {
            pool_put(&DEFLATE_POOL, self.kind, c);
        }
    }
}

impl Encoder {
    /// A compressor for `coding` at `level`.
    pub fn new(coding: Coding, level: i32) -> Option<Encoder> {
        let l = level.max(0) as u32;
        Some(match coding {
            Coding::Gzip | Coding::Deflate => {
                Encoder::Deflate(Some(DeflateStream::take(DeflateKind {
                    gzip: coding == Coding::Gzip,
                    level: l,
                })))
            }
            Coding::Br => Encoder::Br(Some(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                l,
                // A 512 KiB window (as Pingora's own compressor): bounded memory per stream.
                19,
            )))),
            Coding::Zstd => Encoder::Zstd(Some(ZstdStream::take(level)?)),
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
            Encoder::Deflate(s) => pooled_step(s, end, |d, out| {
                let flush = if end {
                    flate2::FlushCompress::Finish
                } else {
                    flate2::FlushCompress::Sync
                };
                d.run(input, flush, out)
            }),
            Encoder::Br(s) => step(s, input, end, |w| w.get_mut(), |w| Ok(w.into_inner())),
            Encoder::Zstd(s) => pooled_step(s, end, |z, out| z.run(input, end, out)),
        }
    }
}

/// One step of a pooled stream: `run` compresses into a fresh buffer; at the end (or
/// on an error) the stream goes back to its pool at once, not when the response's
/// context is dropped.
fn pooled_step<S>(
    slot: &mut Option<S>,
    end: bool,
    run: impl FnOnce(&mut S, &mut Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    let Some(stream) = slot.as_mut() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let r = run(stream, &mut out);
    if end || r.is_err() {
        *slot = None;
    }
    r.map(|()| out)
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
        // Each coding at its default level, and gzip/deflate at 6 as well. zlib-ng's
        // level 1 (the gzip/deflate default) uses fixed Huffman codes and shrinks this
        // digit-heavy text about 2.3x, the others 3x or more: the bound is per case.
        let cases = [
            (Coding::Gzip, Coding::Gzip.levels().2, 2),
            (Coding::Gzip, 6, 3),
            (Coding::Br, Coding::Br.levels().2, 3),
            (Coding::Zstd, Coding::Zstd.levels().2, 3),
            (Coding::Deflate, Coding::Deflate.levels().2, 2),
            (Coding::Deflate, 6, 3),
        ];
        for (c, level, ratio) in cases {
            let mut e = Encoder::new(c, level).unwrap();
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = data.chunks(64 * 1024).collect();
            for (i, ch) in chunks.iter().enumerate() {
                let piece = e.filter(Some(Bytes::copy_from_slice(ch)), false).unwrap();
                // Flushed at every chunk boundary: each chunk produces output.
                assert!(!piece.is_empty(), "{c:?} chunk {i} produced nothing");
                out.extend_from_slice(&piece);
                // The flushed prefix decodes on its own (a client can render as it arrives).
                if i == 0 && c != Coding::Zstd {
                    let mut prefix = Vec::new();
                    let _ = match c {
                        Coding::Gzip => {
                            flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut prefix)
                        }
                        Coding::Deflate => {
                            flate2::read::ZlibDecoder::new(&out[..]).read_to_end(&mut prefix)
                        }
                        _ => brotli::Decompressor::new(&out[..], 4096).read_to_end(&mut prefix),
                    };
                    assert_eq!(
                        prefix,
                        ch.to_vec(),
                        "{c:?} level {level}: first chunk alone"
                    );
                }
            }
            out.extend_from_slice(&e.filter(None, true).unwrap());
            assert!(
                out.len() < data.len() / ratio,
                "{c:?} level {level} compressed {} to {}",
                data.len(),
                out.len()
            );
            assert_eq!(decode(c, &out), data, "{c:?} level {level}");
        }
    }

    #[test]
    fn pooled_streams_start_clean() {
        // A stream abandoned mid-body (client gone) and one that finished both go back
        // to this thread's pool; whatever comes out of the pool next must be a fresh
        // stream: complete, decodable output with no bytes of the earlier responses.
        let a: Vec<u8> = (0..5_000u32)
            .flat_map(|i| format!("a{i},").into_bytes())
            .collect();
        let b: Vec<u8> = (0..5_000u32)
            .flat_map(|i| format!("b{i};").into_bytes())
            .collect();
        for c in [Coding::Gzip, Coding::Deflate, Coding::Zstd] {
            for _ in 0..3 {
                let mut abandoned = Encoder::new(c, 1).unwrap();
                assert!(abandoned
                    .filter(Some(Bytes::from(a.clone())), false)
                    .is_some());
                drop(abandoned);
                let mut done = Encoder::new(c, 1).unwrap();
                let out = done.filter(Some(Bytes::from(b.clone())), true).unwrap();
                assert_eq!(decode(c, &out), b, "{c:?}");
                drop(done);
                let mut e = Encoder::new(c, 1).unwrap();
                let mut out = e
                    .filter(Some(Bytes::from(a.clone())), false)
                    .unwrap()
                    .to_vec();
                out.extend_from_slice(&e.filter(Some(Bytes::from(b.clone())), true).unwrap());
                assert_eq!(decode(c, &out), [a.clone(), b.clone()].concat(), "{c:?}");
            }
            // Another level is another stream, not a reused one at the wrong level.
            let mut l9 = Encoder::new(c, 9).unwrap();
            let out = l9.filter(Some(Bytes::from(a.clone())), true).unwrap();
            assert_eq!(decode(c, &out), a, "{c:?} level 9");
        }
        for pooled in [
            DEFLATE_POOL.with(|p| p.borrow().len()),
            ZSTD_POOL.with(|p| p.borrow().len()),
        ] {
            assert!((1..=POOL_PER_THREAD).contains(&pooled), "{pooled} pooled");
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
/// It prints `compression_bench: CODING level L: NS ns/response (IN -> OUT bytes)` for
/// a 2 KiB JSON order list shaped like the one bench/scenarios uses (ids, SKUs, prices,
/// timestamps, hex digests: it compresses about 2.4x, like a real API answer; a run of
/// repeated records compresses 10x and makes deflate look several times cheaper),
/// through the plugin's pooled encoders and, for reference, a gzip stream made afresh
/// for every response (what the plugin did before the pool).
#[cfg(test)]
mod bench {
    use super::*;
    use std::time::Instant;

    /// A deterministic ~2 KiB JSON order list (xorshift; no external data).
    pub(super) fn order_json(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x2026_1126_7f3a_9c01;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let words = [
            "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
            "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
        ];
        let mut s =
            String::from(r#"{"order":"ord-7f3a9c","customer":{"id":4711,"tier":"gold"},"items":["#);
        while s.len() < len {
            let (a, b) = (next(), next());
            s.push_str(&format!(
                r#"{{"id":{},"sku":"SKU-{:06X}","name":"{} {}","qty":{},"price":{}.{:02},"updated":"2026-11-{:02}T{:02}:{:02}:{:02}Z","digest":"{:016x}"}},"#,
                100_000 + a % 900_000,
                b & 0xff_ffff,
                words[(a >> 20) as usize % 16],
                words[(a >> 24) as usize % 16],
                1 + (a >> 28) % 8,
                1 + (b >> 24) % 500,
                (b >> 33) % 100,
                1 + (a >> 36) % 28,
                (a >> 41) % 24,
                (a >> 46) % 60,
                (b >> 40) % 60,
                next()
            ));
        }
        s.truncate(len);
        s.into_bytes()
    }

    fn time(iters: u32, mut f: impl FnMut() -> usize) -> (u128, usize) {
        let mut out_len = 0;
        let mut best = u128::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..iters {
                out_len = std::hint::black_box(f());
            }
            best = best.min(t.elapsed().as_nanos() / iters as u128);
        }
        (best, out_len)
    }

    #[test]
    #[ignore]
    fn compression_bench() {
        let body = order_json(2048);
        for (c, level) in [
            (Coding::Gzip, 0),
            (Coding::Gzip, 1),
            (Coding::Gzip, 2),
            (Coding::Gzip, 3),
            (Coding::Gzip, 4),
            (Coding::Gzip, 6),
            (Coding::Br, 1),
            (Coding::Br, 4),
            (Coding::Zstd, 1),
            (Coding::Zstd, 3),
        ] {
            let (ns, out_len) = time(20_000, || {
                let Some(mut e) = Encoder::new(c, level) else {
                    panic!("no encoder for {c:?}")
                };
                let Ok(out) = e.encode(&body, true) else {
                    panic!("{c:?} failed")
                };
                out.len()
            });
            println!(
                "compression_bench: {} level {level}: {ns} ns/response ({} -> {out_len} bytes)",
                c.token(),
                body.len()
            );
        }
        // The fixed part of every pooled gzip response: deflateReset clears zlib-ng's
        // 128 KB hash table whatever the body's size.
        let mut c = flate2::Compress::new_gzip(flate2::Compression::new(1), 15);
        let (ns, _) = time(20_000, || {
            c.reset();
            0
        });
        println!("compression_bench: deflateReset alone: {ns} ns/response");
        for level in [1, 6] {
            let (ns, out_len) = time(20_000, || {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
                let Ok(()) = e.write_all(&body) else {
                    panic!("gzip write failed")
                };
                e.finish().map(|o| o.len()).unwrap_or(0)
            });
            println!(
                "compression_bench: gzip level {level} unpooled (a new stream per response): {ns} ns/response ({} -> {out_len} bytes)",
                body.len()
            );
        }
    }
}
