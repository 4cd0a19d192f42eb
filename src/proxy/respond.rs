//! Responses the gateway makes itself: the JSON errors of the operations contract
//! (`{"error", "message", "request_id"}`), fixed `respond` bodies and redirects. Every
//! one carries the request id so a client report can be matched to the access log.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Writes a complete response (header and body) to the client.
pub async fn write(
    session: &mut Session,
    status: u16,
    headers: &[(http::HeaderName, http::HeaderValue)],
    body: Bytes,
    request_id: &str,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 3))?;
    for (k, v) in headers {
        resp.insert_header(k.clone(), v.clone())?;
    }
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header("x-request-id", request_id)?;
    let head_only = session.req_header().method == http::Method::HEAD;
    let empty = body.is_empty() || head_only;
    session.write_response_header(Box::new(resp), empty).await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// The JSON body of a gateway error.
pub fn error_body(code: &str, message: &str, request_id: &str) -> Bytes {
    let mut s = String::with_capacity(96 + message.len());
    s.push_str("{\"error\":");
    crate::accesslog::json_str(&mut s, code);
    s.push_str(",\"message\":");
    crate::accesslog::json_str(&mut s, message);
    s.push_str(",\"request_id\":");
    crate::accesslog::json_str(&mut s, request_id);
    s.push_str("}\n");
    Bytes::from(s)
}

/// Whether the request is a gRPC call (its errors must be gRPC errors).
pub fn is_grpc(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for an HTTP status the gateway would answer.
pub fn grpc_code(status: u16) -> u8 {
    match status {
        400 | 413 | 414 | 431 => 3, // INVALID_ARGUMENT
        401 => 16,                  // UNAUTHENTICATED
        403 => 7,                   // PERMISSION_DENIED
        404 => 12,                  // UNIMPLEMENTED
        408 | 504 => 4,             // DEADLINE_EXCEEDED
        429 => 8,                   // RESOURCE_EXHAUSTED
        502 | 503 => 14,            // UNAVAILABLE
        500 => 13,                  // INTERNAL
        _ => 2,                     // UNKNOWN
    }
}

/// Writes a gRPC error as a trailers-only response (HTTP 200 with `grpc-status`).
pub async fn grpc_error(
    session: &mut Session,
    grpc_status: u8,
    message: &str,
    request_id: &str,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(200, Some(5))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    resp.insert_header("grpc-status", grpc_status.to_string())?;
    // grpc-message is percent-encoded: everything outside printable ASCII, and '%'.
    let mut msg = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            msg.push(b as char);
        } else {
            msg.push_str(&format!("%{b:02X}"));
        }
    }
    resp.insert_header("grpc-message", msg)?;
    resp.insert_header("x-request-id", request_id)?;
    if !session.is_http2() {
        resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
    }
    // As a task with end-of-stream set, so HTTP/2 sends HEADERS with END_STREAM (a
    // trailers-only response), which gRPC clients require.
    session
        .write_response_tasks(vec![pingora::protocols::http::HttpTask::Header(
            Box::new(resp),
            true,
        )])
        .await
        .map(|_| ())
}

/// Writes a gateway error: JSON, or a gRPC error for gRPC calls.
pub async fn error(
    session: &mut Session,
    status: u16,
    code: &str,
    message: &str,
    request_id: &str,
) -> pingora::Result<()> {
    if is_grpc(session) {
        return grpc_error(
            session,
            grpc_code(status),
            &format!("{code}: {message}"),
            request_id,
        )
        .await;
    }
    let ct = (
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    write(
        session,
        status,
        &[ct],
        error_body(code, message, request_id),
        request_id,
    )
    .await
}
