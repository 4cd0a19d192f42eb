//! The headers the gateway adds to, or takes from, the request it sends upstream:
//! `x-forwarded-for`, `-proto`, `-host`, `forwarded`, `x-request-id`, `traceparent`,
//! the listener's client-certificate rules and the route's own edits.
//!
//! Pingora's [`RequestHeader`] keeps a second, case-preserving map of header names
//! next to the `http` map, and each `insert_header` parses the name, allocates it and
//! inserts into both maps (about 1.5k instructions per header, measured with
//! callgrind). The upstream request is Pingora's own copy of the client's header, so
//! [`Plain`] turns it into a plain `http` request head for the edits and back: names
//! are then prebuilt statics and each edit is one hash-map operation. What changes on
//! the wire is only the spelling of header names: they go upstream in lower case (the
//! well-known ones title-cased by Pingora), as HAProxy and Envoy send them. Names are
//! case-insensitive in HTTP.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use std::net::IpAddr;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The upstream request head as plain `http` parts, taken out of a [`RequestHeader`]
/// and put back by [`Plain::restore`]. What the conversion would lose is carried
/// across: a request-target that the URI does not reproduce byte for byte
/// (absolute-form, non-UTF-8) and the HTTP/2 end-of-stream flag.
pub struct Plain {
    pub parts: http::request::Parts,
    raw_target: Option<Vec<u8>>,
    end_stream: Option<bool>,
}

impl Plain {
    pub fn take(req: &mut RequestHeader) -> Plain {
        let from_uri = req.uri.path_and_query().map(|p| p.as_str().as_bytes());
        let raw_target = (from_uri != Some(req.raw_path())).then(|| req.raw_path().to_vec());
        let end_stream = req.send_end_stream();
        let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
        let parts = std::mem::replace(req, empty).into();
        Plain {
            parts,
            raw_target,
            end_stream,
        }
    }

    pub fn restore(self, req: &mut RequestHeader) {
        *req = RequestHeader::from(self.parts);
        if let Some(raw) = self.raw_target {
            // It was this request's target a moment ago, so it parses again.
            let _ = req.set_raw_path(&raw);
        }
        if let Some(eos) = self.end_stream {
            req.set_send_end_stream(eos);
        }
    }
}

/// The response head as plain `http` parts, for the response filter's edits, as
/// [`Plain`] is for the request. A reason phrase other than the status's canonical one
/// is carried across (the canonical one is what Pingora writes anyway). Names reach
/// the client in lower case (the well-known ones title-cased by Pingora), as they do
/// over HTTP/2.
pub struct PlainResponse {
    pub parts: http::response::Parts,
    reason: Option<Box<str>>,
}

impl PlainResponse {
    pub fn take(resp: &mut ResponseHeader) -> PlainResponse {
        let reason = resp
            .get_reason_phrase()
            .filter(|r| Some(*r) != resp.status.canonical_reason())
            .map(Box::from);
        let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
        PlainResponse {
            parts: std::mem::replace(resp, empty).into(),
            reason,
        }
    }

    pub fn restore(self, resp: &mut ResponseHeader) {
        *resp = ResponseHeader::from(self.parts);
        if let Some(r) = self.reason {
            // It was this response's reason phrase a moment ago.
            let _ = resp.set_reason_phrase(Some(&r));
        }
    }
}

/// What the forwarding headers say about this hop.
pub struct Hop<'a> {
    /// The TCP peer (none for a Unix socket).
    pub peer: Option<IpAddr>,
    /// The peer is a trusted proxy: what it says about earlier hops is kept.
    pub trusted: bool,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The client's Host (or the authority of an absolute-form target).
    pub host: Option<&'a HeaderValue>,
}

/// Sets `x-forwarded-for`, `x-forwarded-proto`, `x-forwarded-host` and `forwarded`
/// for `hop`. Earlier hops' `x-forwarded-for` and `forwarded` are kept only from a
/// trusted peer; anyone else could forge them.
pub fn set_forwarding(h: &mut HeaderMap, hop: &Hop) {
    let mut xff = String::with_capacity(48);
    if hop.trusted {
        for v in h.get_all(&X_FORWARDED_FOR) {
            if let Ok(s) = v.to_str() {
                if !xff.is_empty() {
                    xff.push_str(", ");
                }
                xff.push_str(s);
            }
        }
    }
    if let Some(ip) = hop.peer {
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        push_ip(&mut xff, ip);
    }
    if let Ok(v) = HeaderValue::try_from(xff) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(hop.scheme),
    );
    if let Some(host) = hop.host {
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
    }

    let mut fwd = String::with_capacity(64);
    if hop.trusted {
        if let Some(prev) = h.get(http::header::FORWARDED).and_then(|v| v.to_str().ok()) {
            fwd.push_str(prev);
            fwd.push_str(", ");
        }
    }
    fwd.push_str("for=");
    match hop.peer {
        Some(IpAddr::V6(ip)) => {
            fwd.push_str("\"[");
            push_ip(&mut fwd, IpAddr::V6(ip));
            fwd.push_str("]\"");
        }
        Some(ip) => push_ip(&mut fwd, ip),
        None => {}
    }
    fwd.push_str(";proto=");
    fwd.push_str(hop.scheme);
    if let Some(host) = hop.host.and_then(|h| h.to_str().ok()) {
        if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        {
            fwd.push_str(";host=");
            fwd.push_str(host);
        }
    }
    if let Ok(v) = HeaderValue::try_from(fwd) {
        h.insert(http::header::FORWARDED, v);
    }
}

/// Appends `ip` in its usual text form (IPv4 without the formatting machinery).
pub fn push_ip(s: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(s, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop<'a>(peer: &str, trusted: bool, host: Option<&'a HeaderValue>) -> Hop<'a> {
        Hop {
            peer: Some(peer.parse().expect("an IP")),
            trusted,
            scheme: "http",
            host,
        }
    }

    #[test]
    fn ips_print_as_std_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.168.9.99",
            "::1",
            "fe80::1:2",
        ] {
            let ip: IpAddr = ip.parse().expect("an IP");
            let mut s = String::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string());
        }
    }

    #[test]
    fn untrusted_peers_cannot_add_hops() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("6.6.6.6"));
        h.insert(
            http::header::FORWARDED,
            HeaderValue::from_static("for=6.6.6.6"),
        );
        let host = HeaderValue::from_static("example.com:8080");
        set_forwarding(&mut h, &hop("10.0.0.7", false, Some(&host)));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com:8080");
        assert_eq!(
            h[http::header::FORWARDED],
            "for=10.0.0.7;proto=http;host=example.com:8080"
        );
    }

    #[test]
    fn trusted_peers_keep_earlier_hops() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("2.2.2.2"));
        h.insert(
            http::header::FORWARDED,
            HeaderValue::from_static("for=1.1.1.1"),
        );
        set_forwarding(&mut h, &hop("::1", true, None));
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, ::1");
        assert_eq!(
            h[http::header::FORWARDED],
            "for=1.1.1.1, for=\"[::1]\";proto=http"
        );
        assert!(h.get(&X_FORWARDED_HOST).is_none());
    }

    #[test]
    fn a_host_with_odd_bytes_stays_out_of_forwarded() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("a;b=c");
        set_forwarding(&mut h, &hop("127.0.0.1", false, Some(&host)));
        assert_eq!(h[http::header::FORWARDED], "for=127.0.0.1;proto=http");
        assert_eq!(h[&X_FORWARDED_HOST], "a;b=c");
    }

    #[test]
    fn plain_round_trip_keeps_target_and_headers() {
        let mut req = RequestHeader::build("GET", b"/a/b?x=1", None).expect("a request");
        req.insert_header("X-Custom", "1").expect("a header");
        let mut plain = Plain::take(&mut req);
        plain
            .parts
            .headers
            .insert(X_REQUEST_ID.clone(), HeaderValue::from_static("id"));
        plain.restore(&mut req);
        assert_eq!(req.raw_path(), b"/a/b?x=1");
        assert_eq!(req.headers["x-custom"], "1");
        assert_eq!(req.headers["x-request-id"], "id");
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).expect("text");
        assert!(wire.contains("x-custom: 1\r\n"), "{wire}");

        // An absolute-form target is not what the URI gives back: it is carried over.
        let mut req =
            RequestHeader::build("GET", b"http://h.example/p?q", None).expect("a request");
        assert_eq!(req.raw_path(), b"http://h.example/p?q");
        Plain::take(&mut req).restore(&mut req);
        assert_eq!(req.raw_path(), b"http://h.example/p?q");
    }

    #[test]
    fn plain_round_trip_keeps_the_http2_end_stream_flag() {
        for eos in [false, true] {
            let mut req = RequestHeader::build("POST", b"/grpc.S/M", None).expect("a request");
            req.set_version(http::Version::HTTP_2);
            req.set_send_end_stream(eos);
            Plain::take(&mut req).restore(&mut req);
            assert_eq!(req.send_end_stream(), Some(eos));
        }
    }

    #[test]
    fn plain_response_round_trip_keeps_status_reason_and_headers() {
        let mut resp = ResponseHeader::build(299, None).expect("a response");
        resp.set_reason_phrase(Some("Fine Indeed"))
            .expect("a reason");
        resp.insert_header("X-Up", "1").expect("a header");
        let mut plain = PlainResponse::take(&mut resp);
        plain
            .parts
            .headers
            .insert(X_REQUEST_ID.clone(), HeaderValue::from_static("id"));
        plain.restore(&mut resp);
        assert_eq!(resp.status.as_u16(), 299);
        assert_eq!(resp.get_reason_phrase(), Some("Fine Indeed"));
        assert_eq!(resp.headers["x-up"], "1");
        assert_eq!(resp.headers["x-request-id"], "id");

        let mut resp = ResponseHeader::build(404, None).expect("a response");
        let plain = PlainResponse::take(&mut resp);
        assert!(plain.reason.is_none(), "the canonical phrase is not copied");
        plain.restore(&mut resp);
        assert_eq!(resp.get_reason_phrase(), Some("Not Found"));
    }
}
