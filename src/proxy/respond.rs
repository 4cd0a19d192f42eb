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

/// Writes a gateway error as JSON.
pub async fn error(
    session: &mut Session,
    status: u16,
    code: &str,
    message: &str,
    request_id: &str,
) -> pingora::Result<()> {
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
