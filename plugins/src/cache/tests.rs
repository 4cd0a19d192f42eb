//! Unit tests of the cache plugin: keys, freshness, variants, purges, bounded memory,
//! the stampede lock and stale-while-revalidate, driven through the plugin hooks.

use super::*;
use crate::testutil::*;

/// `GET target` with a `Host`.
fn get(target: &str) -> Req {
    Req::get(target).header("host", "h.test")
}

/// `METHOD target` with a `Host`.
fn req(method: &str, target: &str) -> Req {
    Req::new(method, target).header("host", "h.test")
}

fn cache(yaml: &str) -> Arc<dyn Plugin> {
    build(yaml).unwrap()
}

/// Runs `on_request` with a fresh context; returns the flow and the context.
async fn ask(p: &dyn Plugin, r: &Req) -> (Flow, Box<Context>) {
    // Boxed as the gateway does: the plugin finds a request's state by the context's
    // address.
    let mut c = Box::new(ctx());
    let (f, _) = request(p, r, &mut c).await;
    (f, c)
}

/// Plays the upstream's answer for a request that went on: `on_response`, the body
/// in `chunks`, then `on_log`. Returns whether a body filter was installed.
fn upstream(
    p: &dyn Plugin,
    r: &Req,
    c: &mut Context,
    status: u16,
    headers: &[(&str, &str)],
    chunks: &[&str],
) -> bool {
    let (f, _) = response(p, r, status, headers, c);
    let had = f.is_some();
    if let Some(mut f) = f {
        if chunks.is_empty() {
            assert!(f.filter(None, true).is_none());
        }
        for (i, ch) in chunks.iter().enumerate() {
            let out = f.filter(Some(Bytes::from(ch.to_string())), i + 1 == chunks.len());
            assert_eq!(
                out.as_deref(),
                Some(ch.as_bytes()),
                "passed through unchanged"
            );
        }
    }
    p.on_log(status, c);
    had
}

#[tokio::test]
async fn no_host_no_cache() {
    let p = cache("cache:");
    let (f, mut c) = ask(&*p, &Req::get("/nh")).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("BYPASS"));
    assert!(!upstream(&*p, &Req::get("/nh"), &mut c, 200, &[], &["x"]));
}

fn x_cache(c: &Context) -> Option<String> {
    ctx_header(c, "x-cache")
}

async fn miss_and_fill(p: &dyn Plugin, r: &Req, headers: &[(&str, &str)], body: &str) {
    let (f, mut c) = ask(p, r).await;
    assert!(matches!(f, Flow::Continue), "expected a miss");
    assert_eq!(x_cache(&c).as_deref(), Some("MISS"));
    upstream(p, r, &mut c, 200, headers, &[body]);
}

async fn hit(p: &dyn Plugin, r: &Req) -> Reply {
    let (f, _) = ask(p, r).await;
    let rep = reply(f);
    assert_eq!(reply_header(&rep, "x-cache"), Some("HIT"));
    rep
}

#[test]
fn settings_are_checked() {
    let err = |y: &str| build(y).err().unwrap();
    assert!(err("cache: { max_size: 10 }").contains("max_size"));
    assert!(err("cache: { max_size: 1MiB, max_object_size: 2MiB }").contains("max_object_size"));
    assert!(err("cache: { ttl: 5 }").contains("ttl"));
    assert!(err("cache: { lock_timeout: 0s }").contains("lock_timeout"));
    assert!(err("cache: { tll: 5s }").contains("unknown field `tll`"));
    assert!(build("cache:").is_ok());
    assert!(build("cache: { ttl: 0s, max_size: 1MiB, stale_while_revalidate: 10s }").is_ok());
}

#[tokio::test]
async fn miss_then_hit_and_head_from_get() {
    let p = cache("cache: { ttl: 60s }");
    let r = Req::get("/a?x=1").header("host", "Example.com");
    let (f, mut c) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("MISS"));
    let h = [
        ("content-type", "text/plain"),
        ("content-length", "11"),
        ("x-request-id", "req-1"),
        ("connection", "keep-alive"),
        ("link", "<a>"),
        ("link", "<b>"),
    ];
    assert!(upstream(&*p, &r, &mut c, 200, &h, &["hello", " world"]));

    let rep = hit(&*p, &r).await;
    assert_eq!(rep.status, 200);
    assert_eq!(&rep.body[..], b"hello world");
    assert_eq!(reply_header(&rep, "content-type"), Some("text/plain"));
    assert_eq!(reply_header(&rep, "age"), Some("0"));
    assert_eq!(reply_header(&rep, "link"), Some("<a>, <b>"));
    assert_eq!(
        reply_header(&rep, "content-length"),
        None,
        "the gateway sets it"
    );
    assert_eq!(reply_header(&rep, "x-request-id"), None);
    assert_eq!(reply_header(&rep, "connection"), None);

    // Host is case-insensitive; HEAD is answered from the GET entry (with its body,
    // which the gateway does not send but measures for Content-Length).
    let head = Req::new("HEAD", "/a?x=1").header("host", "example.com");
    let rep = hit(&*p, &head).await;
    assert_eq!(rep.body.len(), 11);
    // Other query, host or route: other keys.
    let (f, _) = ask(&*p, &Req::get("/a?x=2").header("host", "example.com")).await;
    assert!(matches!(f, Flow::Continue));
    let (f, _) = ask(&*p, &Req::get("/a?x=1").header("host", "other.com")).await;
    assert!(matches!(f, Flow::Continue));
    let mut c = ctx();
    c.route = Arc::from("r2");
    let (f, _) = request(&*p, &r, &mut c).await;
    assert!(matches!(f, Flow::Continue));
}

#[tokio::test]
async fn head_miss_is_not_stored() {
    let p = cache("cache:");
    let r = req("HEAD", "/h");
    let (f, mut c) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("MISS"));
    assert!(!upstream(
        &*p,
        &r,
        &mut c,
        200,
        &[("content-length", "5")],
        &[]
    ));
    let (f, _) = ask(&*p, &get("/h")).await;
    assert!(matches!(f, Flow::Continue));
}

#[tokio::test]
async fn expires_at_max_age() {
    let p = cache("cache: { ttl: 60s }");
    let r = get("/e");
    let (_, mut c) = ask(&*p, &r).await;
    upstream(
        &*p,
        &r,
        &mut c,
        200,
        &[("cache-control", "max-age=1")],
        &["x"],
    );
    hit(&*p, &r).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (f, c) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("MISS"));
}

#[tokio::test]
async fn uncacheable_responses() {
    let p = cache("cache: { ttl: 60s }");
    let cases: &[(u16, &[(&str, &str)])] = &[
        (200, &[("cache-control", "no-store")]),
        (200, &[("cache-control", "private, max-age=60")]),
        (200, &[("cache-control", "no-cache")]),
        (200, &[("set-cookie", "a=b")]),
        (200, &[("vary", "*")]),
        (500, &[]),
        (206, &[]),
        (302, &[]),
    ];
    for (i, (status, headers)) in cases.iter().enumerate() {
        let r = get(&format!("/u{i}"));
        let (_, mut c) = ask(&*p, &r).await;
        assert!(!upstream(&*p, &r, &mut c, *status, headers, &["x"]), "{i}");
        let (f, c) = ask(&*p, &r).await;
        assert!(matches!(f, Flow::Continue), "{i}: {headers:?}");
        assert_eq!(x_cache(&c).as_deref(), Some("MISS"));
    }
    // ttl 0: only explicit freshness.
    let p = cache("cache: { ttl: 0s }");
    let r = get("/z");
    let (_, mut c) = ask(&*p, &r).await;
    assert!(!upstream(&*p, &r, &mut c, 200, &[], &["x"]));
    let (_, mut c) = ask(&*p, &r).await;
    assert!(upstream(
        &*p,
        &r,
        &mut c,
        200,
        &[("expires", "Thu, 01 Jan 2099 00:00:00 GMT")],
        &["x"]
    ));
    hit(&*p, &r).await;
}

#[tokio::test]
async fn public_set_cookie_is_stored_without_it() {
    let p = cache("cache:");
    let r = get("/sc");
    let h = [
        ("set-cookie", "s=1"),
        ("cache-control", "public, max-age=60"),
    ];
    miss_and_fill(&*p, &r, &h, "x").await;
    let rep = hit(&*p, &r).await;
    assert_eq!(reply_header(&rep, "set-cookie"), None);
}

#[tokio::test]
async fn authorization_needs_public() {
    let p = cache("cache:");
    let r = get("/me").header("authorization", "Bearer t");
    let (_, mut c) = ask(&*p, &r).await;
    assert!(!upstream(
        &*p,
        &r,
        &mut c,
        200,
        &[("cache-control", "max-age=60")],
        &["x"]
    ));
    let (_, mut c) = ask(&*p, &r).await;
    assert!(upstream(
        &*p,
        &r,
        &mut c,
        200,
        &[("cache-control", "public, max-age=60")],
        &["x"]
    ));
    hit(&*p, &r).await;
}

#[tokio::test]
async fn request_directives() {
    let p = cache("cache:");
    let r = get("/d");
    miss_and_fill(&*p, &r, &[], "old").await;
    // no-store: bypass, nothing stored.
    let ns = get("/d").header("cache-control", "no-store");
    let (f, mut c) = ask(&*p, &ns).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("BYPASS"));
    assert!(!upstream(&*p, &ns, &mut c, 200, &[], &["nostore"]));
    assert_eq!(&hit(&*p, &r).await.body[..], b"old");
    // no-cache: upstream, and the answer refreshes the entry.
    let nc = get("/d").header("cache-control", "no-cache");
    let (f, mut c) = ask(&*p, &nc).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("BYPASS"));
    assert!(upstream(&*p, &nc, &mut c, 200, &[], &["new"]));
    assert_eq!(&hit(&*p, &r).await.body[..], b"new");
}

#[tokio::test]
async fn unsafe_methods_bypass_and_invalidate() {
    let p = cache("cache:");
    let r = get("/i");
    miss_and_fill(&*p, &r, &[], "x").await;
    hit(&*p, &r).await;
    let (f, c) = ask(&*p, &req("OPTIONS", "/i")).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("BYPASS"));
    hit(&*p, &r).await;
    let (f, c) = ask(&*p, &req("POST", "/i")).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&c).as_deref(), Some("BYPASS"));
    let (f, _) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue), "POST invalidated the entry");
}

#[tokio::test]
async fn vary_keeps_variants() {
    let p = cache("cache:");
    let gz = get("/v").header("accept-encoding", "gzip");
    let id = get("/v").header("accept-encoding", "identity");
    let h = [("vary", "Accept-Encoding"), ("cache-control", "max-age=60")];
    miss_and_fill(&*p, &gz, &h, "gzipped").await;
    // The other variant misses and is stored beside the first.
    miss_and_fill(&*p, &id, &h, "plain").await;
    assert_eq!(&hit(&*p, &gz).await.body[..], b"gzipped");
    assert_eq!(&hit(&*p, &id).await.body[..], b"plain");
    let (f, _) = ask(&*p, &get("/v").header("accept-encoding", "br")).await;
    assert!(matches!(f, Flow::Continue));
}

#[tokio::test]
async fn earlier_plugin_edits_are_stored() {
    // What an earlier plugin (compression) did to the header is what gets stored.
    let p = cache("cache:");
    let r = get("/c").header("accept-encoding", "gzip");
    let (_, mut c) = ask(&*p, &r).await;
    let mut h = http::HeaderMap::new();
    h.insert("content-length", "100".parse().unwrap());
    h.insert("etag", "\"x\"".parse().unwrap());
    let mut edits = HeaderEdits::default();
    edits.remove(http::header::CONTENT_LENGTH);
    edits.set(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
    edits.set(http::header::VARY, "Accept-Encoding".parse().unwrap());
    edits.set(http::header::ETAG, "W/\"x\"".parse().unwrap());
    let mut view = ResponseView {
        status: 200,
        headers: &h,
        edits: &mut edits,
        request_method: &r.method,
        request_headers: &r.headers,
    };
    let mut f = p.on_response(&mut view, &mut c).unwrap();
    f.filter(Some(Bytes::from_static(b"zz")), true);
    let rep = hit(&*p, &r).await;
    assert_eq!(reply_header(&rep, "content-encoding"), Some("gzip"));
    assert_eq!(reply_header(&rep, "etag"), Some("W/\"x\""));
    assert_eq!(&rep.body[..], b"zz");
    let (f, _) = ask(&*p, &get("/c")).await;
    assert!(matches!(f, Flow::Continue), "varies on Accept-Encoding");
}

#[tokio::test]
async fn too_large_objects_are_not_stored() {
    let p = cache("cache: { max_size: 64KiB, max_object_size: 2KiB }");
    let big = "x".repeat(3000);
    let r = get("/big");
    let (_, mut c) = ask(&*p, &r).await;
    let cl = big.len().to_string();
    assert!(!upstream(
        &*p,
        &r,
        &mut c,
        200,
        &[("content-length", &cl)],
        &[&big]
    ));
    let (_, mut c) = ask(&*p, &r).await;
    assert!(upstream(
        &*p,
        &r,
        &mut c,
        200,
        &[],
        &[&big[..1500], &big[1500..]]
    ));
    let (f, _) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue), "too large once streamed");
    // A body shorter than declared (broken upstream) is not stored.
    let r = get("/short");
    let (_, mut c) = ask(&*p, &r).await;
    upstream(&*p, &r, &mut c, 200, &[("content-length", "10")], &["abc"]);
    let (f, _) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue));
}

#[tokio::test]
async fn empty_bodies_are_stored_at_once() {
    let p = cache("cache:");
    let r = get("/204");
    let (_, mut c) = ask(&*p, &r).await;
    assert!(!upstream(&*p, &r, &mut c, 204, &[], &[]));
    let rep = hit(&*p, &r).await;
    assert_eq!(rep.status, 204);
    assert!(rep.body.is_empty());
}

#[tokio::test]
async fn memory_is_bounded() {
    let settings = serde_yaml::from_str("{ max_size: 256KiB }").unwrap();
    let c = Arc::new(Cache::new(crate::settings(&settings).unwrap()).unwrap());
    let p: Arc<dyn Plugin> = c.clone();
    let body = "y".repeat(4000);
    for i in 0..500 {
        let r = get(&format!("/m/{i}"));
        miss_and_fill(&*p, &r, &[], &body).await;
    }
    let (used, len) = {
        let s = c.shared.store();
        (s.used(), s.len())
    };
    assert!(used <= 256 * 1024);
    assert!(len > 40 && len < 64, "{len}");
    let (f, _) = ask(&*p, &get("/m/0")).await;
    assert!(matches!(f, Flow::Continue), "the oldest was evicted");
    hit(&*p, &get("/m/499")).await;
}

#[tokio::test]
async fn purge_by_prefix_or_all() {
    let p = cache("cache:");
    for path in ["/x/1", "/x/2", "/y/1"] {
        miss_and_fill(&*p, &get(path), &[], "b").await;
    }
    assert_eq!(p.purge(Some("/x")), 2);
    let (f, _) = ask(&*p, &get("/x/1")).await;
    assert!(matches!(f, Flow::Continue));
    hit(&*p, &get("/y/1")).await;
    assert_eq!(p.purge(None), 1);
    assert_eq!(p.purge(None), 0);
}

/// Starts `n` concurrent requests for `path`; returns their join handles.
fn spawn_many(
    p: &Arc<dyn Plugin>,
    path: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(Option<Reply>, Option<String>)>> {
    (0..n)
        .map(|i| {
            let p = Arc::clone(p);
            let path = path.to_string();
            tokio::spawn(async move {
                let mut c = ctx();
                c.request_id = format!("w{i}");
                let (f, _) = request(&*p, &get(&path), &mut c).await;
                let label = x_cache(&c);
                match f {
                    Flow::Respond(r) => (Some(r), label),
                    Flow::Continue => {
                        p.on_log(200, &c);
                        (None, label)
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_wait_for_the_leader() {
    let p = cache("cache:");
    let r = get("/co");
    let (f, mut lead) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue));
    let waiters = spawn_many(&p, "/co", 50);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(waiters.iter().all(|w| !w.is_finished()), "they wait");
    upstream(&*p, &r, &mut lead, 200, &[], &["once"]);
    for w in waiters {
        let (rep, _) = w.await.unwrap();
        let rep = rep.expect("served from the cache");
        assert_eq!(reply_header(&rep, "x-cache"), Some("HIT"));
        assert_eq!(&rep.body[..], b"once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uncacheable_leader_lets_waiters_go() {
    let p = cache("cache:");
    let r = get("/un");
    let (_, mut lead) = ask(&*p, &r).await;
    let waiters = spawn_many(&p, "/un", 20);
    tokio::time::sleep(Duration::from_millis(50)).await;
    upstream(
        &*p,
        &r,
        &mut lead,
        200,
        &[("cache-control", "private")],
        &["x"],
    );
    for w in waiters {
        let (rep, label) = w.await.unwrap();
        assert!(rep.is_none(), "went upstream");
        assert_eq!(label.as_deref(), Some("MISS"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vanished_leader_never_leaves_waiters_hanging() {
    // The leader's body filter is dropped before the end (client gone).
    let p = cache("cache: { lock_timeout: 30s }");
    let r = get("/gone");
    let (_, mut lead) = ask(&*p, &r).await;
    let w = {
        let p = Arc::clone(&p);
        tokio::spawn(async move {
            let r = get("/gone");
            let mut c = Box::new(ctx());
            c.request_id = "next".into();
            let t = Instant::now();
            let (f, _) = request(&*p, &r, &mut c).await;
            (matches!(f, Flow::Continue), x_cache(&c), t.elapsed(), c)
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (f, _) = response(&*p, &r, 200, &[], &mut lead);
    let mut f = f.unwrap();
    f.filter(Some(Bytes::from_static(b"part")), false);
    drop(f);
    p.on_log(200, &lead);
    let (went_on, label, waited, mut c) = w.await.unwrap();
    assert!(went_on && waited < Duration::from_secs(5));
    assert_eq!(label.as_deref(), Some("MISS"));
    // It became the next leader: a third request waits for it.
    let third = spawn_many(&p, "/gone", 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!third[0].is_finished());
    upstream(&*p, &r, &mut c, 200, &[], &["full"]);
    let (rep, _) = third.into_iter().next().unwrap().await.unwrap();
    assert_eq!(&rep.unwrap().body[..], b"full");

    // A leader that never gets a response (upstream failed): on_log releases.
    let r = get("/fail");
    let (_, lead) = ask(&*p, &r).await;
    let w = spawn_many(&p, "/fail", 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.on_log(502, &lead);
    let (rep, label) = w.into_iter().next().unwrap().await.unwrap();
    assert!(rep.is_none());
    assert_eq!(label.as_deref(), Some("MISS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_give_up_at_lock_timeout() {
    let p = cache("cache: { lock_timeout: 100ms }");
    let r = get("/slow");
    let (_, _lead) = ask(&*p, &r).await;
    let t = Instant::now();
    let w = spawn_many(&p, "/slow", 1);
    let (rep, label) = w.into_iter().next().unwrap().await.unwrap();
    assert!(rep.is_none());
    assert_eq!(label.as_deref(), Some("MISS"));
    assert!(t.elapsed() >= Duration::from_millis(80) && t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate() {
    let p = cache("cache:");
    let r = get("/swr");
    let h = [("cache-control", "max-age=0, stale-while-revalidate=60")];
    miss_and_fill(&*p, &r, &h, "v1").await;
    // Past its freshness: the first request refreshes it, the others get the stale copy.
    let (f, mut refresher) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue));
    assert_eq!(x_cache(&refresher).as_deref(), Some("MISS"));
    let (f, _) = ask(&*p, &r).await;
    let rep = reply(f);
    assert_eq!(reply_header(&rep, "x-cache"), Some("STALE"));
    assert_eq!(&rep.body[..], b"v1");
    upstream(
        &*p,
        &r,
        &mut refresher,
        200,
        &[("cache-control", "max-age=60")],
        &["v2"],
    );
    assert_eq!(&hit(&*p, &r).await.body[..], b"v2");
}

#[tokio::test]
async fn conditional_requests_do_not_lead() {
    let p = cache("cache:");
    let r = get("/cond").header("if-none-match", "\"a\"");
    let (f, mut c) = ask(&*p, &r).await;
    assert!(matches!(f, Flow::Continue));
    // A 304 is not stored; nobody was waiting on it.
    assert!(!upstream(&*p, &r, &mut c, 304, &[], &[]));
    let (f, _) = ask(&*p, &get("/cond")).await;
    assert!(matches!(f, Flow::Continue));
}

#[tokio::test]
async fn age_counts_from_arrival() {
    let p = cache("cache:");
    let r = get("/age");
    miss_and_fill(
        &*p,
        &r,
        &[("age", "30"), ("cache-control", "max-age=100")],
        "a",
    )
    .await;
    let rep = hit(&*p, &r).await;
    assert_eq!(reply_header(&rep, "age"), Some("30"));
}
