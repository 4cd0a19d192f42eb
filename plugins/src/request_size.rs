//! The `request_size` plugin: refuses request bodies larger than `max_body` with 413.
//! A declared `Content-Length` over the limit is refused before anything reaches the
//! upstream; a body without a declared length (chunked) is counted as it streams and
//! the request is stopped as soon as the running total passes the limit.

use crate::units::Size;
use crate::{Context, Factory, Flow, Plugin, Reply, RequestView};
use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;

/// The `request_size` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    max_body: Size,
}

/// The `request_size` plugin instance.
pub struct RequestSize {
    max: u64,
}

/// Builds [`RequestSize`] instances.
pub struct RequestSizeFactory;

impl Factory for RequestSizeFactory {
    fn name(&self) -> &'static str {
        "request_size"
    }
    fn build(&self, settings: &serde_yaml::Value) -> Result<Arc<dyn Plugin>, String> {
        let s: Settings = crate::settings(settings)?;
        Ok(Arc::new(RequestSize { max: s.max_body.0 }))
    }
}

impl RequestSize {
    fn too_large(&self, ctx: &Context) -> Flow {
        Flow::Respond(Reply::error(
            413,
            "payload_too_large",
            &format!("the request body is larger than {} bytes", self.max),
            ctx,
        ))
    }
}

#[async_trait::async_trait]
impl Plugin for RequestSize {
    fn name(&self) -> &'static str {
        "request_size"
    }

    async fn on_request(&self, req: &mut RequestView<'_>, ctx: &mut Context) -> Flow {
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match declared {
            Some(n) if n > self.max => self.too_large(ctx),
            _ => Flow::Continue,
        }
    }

    fn on_request_body(&self, _chunk: Option<&Bytes>, total: u64, ctx: &mut Context) -> Flow {
        if total > self.max {
            self.too_large(ctx)
        } else {
            Flow::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[tokio::test]
    async fn declared_and_streamed() {
        let p = build("request_size: { max_body: 1KiB }").unwrap();
        let r = Req::new("POST", "/").header("content-length", "1025");
        let rep = reply(request(&*p, &r, &mut ctx()).await.0);
        assert_eq!(rep.status, 413);
        assert!(String::from_utf8_lossy(&rep.body).contains("payload_too_large"));
        let r = Req::new("POST", "/").header("content-length", "1024");
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Continue
        ));
        let r = Req::new("POST", "/").header("transfer-encoding", "chunked");
        assert!(matches!(
            request(&*p, &r, &mut ctx()).await.0,
            Flow::Continue
        ));
        let chunk = Bytes::from(vec![0u8; 600]);
        let mut c = ctx();
        assert!(matches!(
            p.on_request_body(Some(&chunk), 600, &mut c),
            Flow::Continue
        ));
        assert_eq!(
            reply(p.on_request_body(Some(&chunk), 1200, &mut c)).status,
            413
        );
        assert!(matches!(
            p.on_request_body(None, 1024, &mut c),
            Flow::Continue
        ));
    }

    #[test]
    fn settings_errors() {
        let e = |y: &str| build(y).err().unwrap();
        assert!(e("request_size: {}").contains("max_body"));
        assert!(e("request_size: { max_body: 1PB }").contains("unknown unit"));
        assert!(build("request_size: { max_body: 1048576 }").is_ok());
    }
}
