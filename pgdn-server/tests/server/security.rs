//! Security hardening over real sockets: origin checks (docs/protocol.md v1.1
//! section 1), connection limits per user and per client address (429
//! before any upgrade or stream, counted race-free), and several publish
//! keys at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use pgdn_core::{AuthError, AuthRequest, Authenticator, Identity};
use pgdn_server::{Config, Pgdn};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::common::*;

/// Why an upgrade was refused: the HTTP status and JSON body.
#[derive(Debug)]
struct Refused {
    status: u16,
    body: Value,
    allow_origin: Option<String>,
}

/// Opens a WebSocket with `query` and extra headers: the socket after the
/// connection frame, or the HTTP answer that refused the upgrade.
async fn try_ws(s: &TestServer, query: &str, headers: &[(&str, &str)]) -> Result<Client, Refused> {
    let mut req = format!("{}{query}", s.ws_url())
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().append(name, v.parse().unwrap());
    }
    let attempt = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("an answer in time");
    match attempt {
        Ok((ws, _)) => Ok(Client::after_upgrade(ws).await),
        Err(tungstenite::Error::Http(res)) => Err(Refused {
            status: res.status().as_u16(),
            body: serde_json::from_slice(res.body().as_deref().unwrap_or_default())
                .expect("a JSON body"),
            allow_origin: res
                .headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_string()),
        }),
        Err(e) => panic!("neither upgraded nor refused: {e}"),
    }
}

/// A GET on the SSE path with `query` and extra headers: the status, the
/// `Access-Control-Allow-Origin` and, for a refusal, the JSON body (for a
/// stream, the first event's data).
async fn try_sse(
    s: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let mut req = s.http.get(s.url(&format!("/sse{query}")));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut res = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("an answer in time")
        .unwrap();
    let status = res.status().as_u16();
    let allow = res
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_string());
    let body = if status == 200 {
        let chunk = tokio::time::timeout(WAIT, res.chunk())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("a first event");
        let text = std::str::from_utf8(&chunk).unwrap();
        let data = text.trim().strip_prefix("data: ").expect("a data line");
        serde_json::from_str(data).unwrap()
    } else {
        serde_json::from_slice(&res.bytes().await.unwrap()).unwrap()
    };
    (status, allow, body)
}

fn with_config(f: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::default();
    f(&mut config);
    config
}

#[tokio::test]
async fn a_foreign_origin_gets_403_before_any_upgrade_or_stream() {
    let s = TestServer::start().await;
    let token = format!("?token={}", s.token("u1", &[]));
    let evil = [("origin", "http://evil.example")];
    let refused = try_ws(&s, &token, &evil).await.err().expect("refused");
    assert_eq!(refused.status, 403);
    assert_eq!(refused.body, json!({"error": "origin not allowed"}));
    assert_eq!(refused.allow_origin, None);
    let (status, allow, body) = try_sse(&s, &token, &evil).await;
    assert_eq!((status, allow), (403, None), "no CORS for a refused origin");
    assert_eq!(body, json!({"error": "origin not allowed"}));
    // Before authentication too: a bad token learns nothing more.
    assert_eq!(
        try_ws(&s, "?token=bad", &evil).await.err().unwrap().status,
        403
    );
    // Another port of the same host is another origin.
    let other_port = format!("http://127.0.0.1:{}", s.addr.port() + 1);
    let refused = try_ws(&s, &token, &[("origin", &other_port)]).await;
    assert_eq!(refused.err().unwrap().status, 403);
    assert_eq!(s.stats().await["connections_opened"], 0);
    s.stop().await;
}

#[tokio::test]
async fn the_own_origin_and_listed_origins_are_served_and_others_not() {
    let s = TestServer::start_with(with_config(|c| {
        c.allowed_origins = vec![
            "http://app.example:3000".into(),
            "https://site.example".into(),
        ];
    }))
    .await;
    let token = format!("?token={}", s.token("u1", &[]));
    let own = format!("http://{}", s.addr);
    for origin in [
        own.as_str(),
        "http://app.example:3000",
        "https://site.example",
    ] {
        let mut c = try_ws(&s, &token, &[("origin", origin)])
            .await
            .unwrap_or_else(|r| panic!("{origin} refused: {r:?}"));
        c.roundtrip(origin).await;
        let (status, allow, hello) = try_sse(&s, &token, &[("origin", origin)]).await;
        assert_eq!(status, 200, "{origin}");
        assert_eq!(
            allow.as_deref(),
            Some(origin),
            "the stream may be read by it"
        );
        assert_eq!(hello["type"], "connection");
    }
    // Without an Origin (a server, a batch job): unaffected, no CORS.
    try_ws(&s, &token, &[]).await.unwrap();
    let (status, allow, _) = try_sse(&s, &token, &[]).await;
    assert_eq!((status, allow), (200, None));
    for origin in ["http://app.example:3001", "http://site.example", "null"] {
        let refused = try_ws(&s, &token, &[("origin", origin)]).await;
        assert_eq!(refused.err().unwrap().status, 403, "{origin}");
        assert_eq!(try_sse(&s, &token, &[("origin", origin)]).await.0, 403);
    }
    // An allowed page can read why it was refused.
    let (status, allow, body) = try_sse(&s, "", &[("origin", "https://site.example")]).await;
    assert_eq!(
        (status, allow.as_deref()),
        (401, Some("https://site.example"))
    );
    assert_eq!(body, json!({"error": "missing token"}));
    s.stop().await;
}

#[tokio::test]
async fn a_star_allows_every_origin() {
    let s = TestServer::start_with(with_config(|c| c.allowed_origins = vec!["*".into()])).await;
    let token = format!("?token={}", s.token("u1", &[]));
    try_ws(&s, &token, &[("origin", "http://anywhere.example")])
        .await
        .unwrap();
    let (status, allow, _) = try_sse(&s, &token, &[("origin", "http://anywhere.example")]).await;
    assert_eq!(
        (status, allow.as_deref()),
        (200, Some("http://anywhere.example"))
    );
    s.stop().await;
}

#[tokio::test]
async fn a_user_past_its_connection_limit_gets_429_before_the_upgrade() {
    let s = TestServer::start_with(with_config(|c| c.max_connections_per_user = 2)).await;
    let token = format!("?token={}", s.token("u1", &[]));
    let mut first = try_ws(&s, &token, &[]).await.unwrap();
    // An SSE stream is a connection of its user too; kept open meanwhile.
    let stream = s
        .http
        .get(s.url(&format!("/sse{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    s.wait_connections(2).await;
    let refused = try_ws(&s, &token, &[]).await.err().expect("refused");
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.body,
        json!({"error": "too many connections for this user"})
    );
    let (status, _, body) = try_sse(&s, &token, &[]).await;
    assert_eq!(status, 429);
    assert_eq!(body, json!({"error": "too many connections for this user"}));
    // Other users are not affected.
    let _u2 = s.connect("u2", &[]).await;
    // A bad token is still closed with 1008 after the upgrade.
    let mut bad = s.ws_raw("?token=bad").await;
    assert_eq!(expect_close(&mut bad).await, (1008, "invalid token".into()));
    // When one leaves, its slot is free again.
    first.ws.close(None).await.unwrap();
    s.wait_connections(2).await;
    try_ws(&s, &token, &[]).await.expect("a free slot");
    assert_eq!(s.stats().await["connections_opened"], 4);
    drop(stream);
    s.stop().await;
}

/// Lets `n` authentications through only once all `n` have started: the
/// worst case for a check-then-count limit.
struct Gate {
    barrier: tokio::sync::Barrier,
    calls: AtomicUsize,
}

#[async_trait]
impl Authenticator for Gate {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        let user = req.require_token()?.to_string();
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.barrier.wait().await;
        Ok(Identity::new(user, Vec::<&str>::new()))
    }
}

#[tokio::test]
async fn connections_authenticating_at_once_cannot_both_take_the_last_slot() {
    const N: usize = 4;
    let gate = Arc::new(Gate {
        barrier: tokio::sync::Barrier::new(N),
        calls: AtomicUsize::new(0),
    });
    let mut config = Config::default();
    config.max_connections_per_user = 1;
    let pgdn = Pgdn::builder()
        .config(config)
        .authenticator(GateRef(gate.clone()))
        .publish_key(KEY)
        .build()
        .unwrap();
    let s = TestServer::start_pgdn(pgdn).await;
    // WebSocket and SSE requests for one user, all in authentication at once.
    let attempts = (0..N).map(|i| {
        let s = &s;
        async move {
            if i % 2 == 0 {
                match try_ws(s, "?token=racer", &[]).await {
                    Ok(c) => (200, Some(Ok(c))),
                    Err(r) => (r.status, None),
                }
            } else {
                let res = s.http.get(s.url("/sse?token=racer")).send().await.unwrap();
                // A stream that got through stays open until the end.
                (res.status().as_u16(), Some(Err(res)))
            }
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut statuses: Vec<u16> = results.iter().map(|(s, _)| *s).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 429, 429, 429], "exactly one gets the slot");
    assert_eq!(
        gate.calls.load(Ordering::SeqCst),
        N,
        "one authentication each"
    );
    s.wait_connections(1).await;
    s.stop().await;
}

/// A shared [`Gate`].
struct GateRef(Arc<Gate>);

#[async_trait]
impl Authenticator for GateRef {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        self.0.authenticate(req).await
    }
}

#[tokio::test]
async fn the_per_address_limit_is_off_by_default_and_counts_the_peer_when_set() {
    let s = TestServer::start().await;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(s.connect(&format!("u{i}"), &[]).await);
    }
    s.wait_connections(3).await;
    drop(open);
    s.stop().await;

    let s = TestServer::start_with(with_config(|c| c.max_connections_per_ip = Some(2))).await;
    let mut open = Vec::new();
    for i in 0..2 {
        open.push(s.connect(&format!("u{i}"), &[]).await);
    }
    // X-Forwarded-For from a peer that is not a trusted proxy is ignored.
    let token = format!("?token={}", s.token("u9", &[]));
    let spoofed = [("x-forwarded-for", "203.0.113.5")];
    let refused = try_ws(&s, &token, &spoofed).await.err().expect("refused");
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.body,
        json!({"error": "too many connections from this address"})
    );
    let (status, _, body) = try_sse(&s, &token, &spoofed).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"], "too many connections from this address");
    // Refused before authentication: a bad token gets 429 too, not 1008.
    assert_eq!(
        try_ws(&s, "?token=bad", &[]).await.err().unwrap().status,
        429
    );
    drop(open);
    s.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_address_counts() {
    let s = TestServer::start_with(with_config(|c| {
        c.max_connections_per_ip = Some(1);
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    }))
    .await;
    let token = |user: &str| format!("?token={}", s.token(user, &[]));
    let via = |xff: &'static str| [("x-forwarded-for", xff)];
    let _a = try_ws(&s, &token("a"), &via("203.0.113.5")).await.unwrap();
    // Another client behind the same proxy has its own count.
    let _b = try_ws(&s, &token("b"), &via("203.0.113.6")).await.unwrap();
    // The same client again, however it dresses its own header: the
    // right-most address the proxy did not add is the client.
    for xff in [
        "203.0.113.5",
        "198.51.100.1, 203.0.113.5",
        "203.0.113.5, 127.0.0.2",
    ] {
        let refused = try_ws(&s, &token("c"), &via(xff)).await;
        assert_eq!(refused.err().unwrap().status, 429, "{xff}");
    }
    // Two X-Forwarded-For headers read as one list.
    let refused = try_ws(
        &s,
        &token("c"),
        &[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "203.0.113.5"),
        ],
    )
    .await;
    assert_eq!(refused.err().unwrap().status, 429);
    // Without the header the proxy itself is the client.
    let _c = try_ws(&s, &token("c"), &[]).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn any_of_several_publish_keys_is_accepted_and_nothing_else() {
    const OLD: &str = "the-old-publish-key";
    const NEW: &str = "the-new-publish-key";
    let pgdn = Pgdn::builder()
        .jwt_secret(SECRET)
        .publish_keys([OLD, NEW])
        .build()
        .unwrap();
    let s = TestServer::start_pgdn(pgdn).await;
    let mut c = s.connect("u1", &[]).await;
    let body = json!({"target": {"user": "u1"}, "type": "info"}).to_string();
    for key in [OLD, NEW] {
        let (status, reply) = s.post("/api/v1/publish", Some(key), body.clone()).await;
        assert_eq!(status, 200, "{key}: {reply}");
        assert_eq!(c.next().await["type"], "info");
    }
    for key in [
        "the-old-publish-ke",
        "the-new-publish-key-",
        "",
        "the-old-publish-key,the-new-publish-key",
    ] {
        let (status, reply) = s.post("/api/v1/publish", Some(key), body.clone()).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(reply, json!({"error": "invalid publish key"}));
    }
    s.stop().await;
}
