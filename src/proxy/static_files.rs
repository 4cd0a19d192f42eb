//! The `static` action: files from a folder, with `ETag`/`Last-Modified` validators,
//! single `Range` requests and no way out of the folder (`..`, symlinks leaving the
//! root and absolute paths are refused). Bodies are streamed in 64 KiB chunks.

use super::respond;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "xml" => "application/xml",
        _ => "application/octet-stream",
    }
}

/// Resolves `rel` (the request path below the route) inside `root`.
fn resolve(root: &Path, rel: &str, index: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(rel)
        .decode_utf8()
        .ok()?;
    let mut p = root.to_path_buf();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return None,
            s if s.contains('\\') || s.contains('\0') => return None,
            s => p.push(s),
        }
    }
    let canon_root = root.canonicalize().ok()?;
    let mut canon = p.canonicalize().ok()?;
    if !canon.starts_with(&canon_root) {
        return None;
    }
    if canon.is_dir() {
        canon = canon.join(index).canonicalize().ok()?;
        if !canon.starts_with(&canon_root) {
            return None;
        }
    }
    canon.is_file().then_some(canon)
}

/// Parses `bytes=a-b`, `bytes=a-`, `bytes=-n` against `len`.
fn parse_range(h: &str, len: u64) -> Option<(u64, u64)> {
    let spec = h.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (len.saturating_sub(n), len.checked_sub(1)?)
    } else {
        let s: u64 = a.parse().ok()?;
        let e = if b.is_empty() {
            len.checked_sub(1)?
        } else {
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
        };
        (s, e)
    };
    (start <= end && end < len).then_some((start, end))
}

/// Serves `rel` from `root`; returns the status written.
pub async fn serve(
    session: &mut Session,
    root: &Path,
    index: &str,
    rel: &str,
    request_id: &str,
) -> pingora::Result<u16> {
    let method = session.req_header().method.clone();
    if method != http::Method::GET && method != http::Method::HEAD {
        respond::error(
            session,
            405,
            "method_not_allowed",
            "static files answer GET and HEAD",
            request_id,
        )
        .await?;
        return Ok(405);
    }
    let Some(path) = resolve(root, rel, index) else {
        respond::error(session, 404, "not_found", "no such file", request_id).await?;
        return Ok(404);
    };
    let Ok(meta) = tokio::fs::metadata(&path).await else {
        respond::error(session, 404, "not_found", "no such file", request_id).await?;
        return Ok(404);
    };
    let len = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let etag = format!("\"{:x}-{:x}\"", len, mtime.as_secs());
    let last_modified = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime.as_secs()),
    );
    let req = session.req_header();
    let inm = req
        .headers
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    let ims = req
        .headers
        .get(http::header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let not_modified = match (inm, ims) {
        (Some(tags), _) => tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"),
        (None, Some(since)) => {
            mtime.as_secs()
                <= since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
        }
        _ => false,
    };
    let range = req
        .headers
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| parse_range(r, len));
    let mut resp = ResponseHeader::build(200, Some(8))?;
    resp.insert_header("etag", &etag)?;
    resp.insert_header("last-modified", &last_modified)?;
    resp.insert_header("accept-ranges", "bytes")?;
    resp.insert_header("x-request-id", request_id)?;
    if not_modified {
        resp.set_status(304)?;
        session.write_response_header(Box::new(resp), true).await?;
        return Ok(304);
    }
    resp.insert_header("content-type", content_type(&path))?;
    let (status, start, end) = match range {
        Some(Some((s, e))) => (206, s, e),
        Some(None) => {
            resp.set_status(416)?;
            resp.insert_header("content-range", format!("bytes */{len}"))?;
            resp.insert_header("content-length", "0")?;
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(416);
        }
        None => (200, 0, len.saturating_sub(1)),
    };
    let body_len = if len == 0 { 0 } else { end - start + 1 };
    resp.set_status(status)?;
    if status == 206 {
        resp.insert_header("content-range", format!("bytes {start}-{end}/{len}"))?;
    }
    resp.insert_header("content-length", body_len.to_string())?;
    let head_only = method == http::Method::HEAD || body_len == 0;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if head_only {
        return Ok(status);
    }
    let mut f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| pingora::Error::because(pingora::ErrorType::FileReadError, "open", e))?;
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| pingora::Error::because(pingora::ErrorType::FileReadError, "seek", e))?;
    let mut left = body_len;
    while left > 0 {
        let mut buf = vec![0u8; (64 * 1024).min(left as usize)];
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| pingora::Error::because(pingora::ErrorType::FileReadError, "read", e))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        left -= n as u64;
        session
            .write_response_body(Some(Bytes::from(buf)), left == 0)
            .await?;
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
    }

    #[test]
    fn no_traversal() {
        let dir = std::env::temp_dir().join(format!("portico-static-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.txt"), "a").unwrap();
        assert!(resolve(&dir, "/sub/a.txt", "index.html").is_some());
        assert!(resolve(&dir, "/../etc/passwd", "index.html").is_none());
        assert!(resolve(&dir, "/sub/%2e%2e/%2e%2e/etc/passwd", "index.html").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
