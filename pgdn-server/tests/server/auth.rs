//! docs/protocol.md section 1: authentication and the connection frame.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgdn_server::jwt::Claims;
use serde_json::json;

use super::common::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn each_auth_failure_closes_1008_with_its_reason_and_registers_nothing() {
    let s = TestServer::start().await;
    let expired = s
        .auth
        .encode(&Claims {
            sub: Some("u1".into()),
            groups: vec![],
            exp: now() - 3600,
        })
        .unwrap();
    let no_sub = s
        .auth
        .encode(&Claims {
            sub: None,
            groups: vec!["g".into()],
            exp: now() + 600,
        })
        .unwrap();
    let empty_sub = s
        .auth
        .encode(&Claims {
            sub: Some("".into()),
            groups: vec![],
            exp: now() + 600,
        })
        .unwrap();
    let forged = pgdn_server::JwtAuthenticator::new(b"not the secret")
        .issue("u1", &[], Duration::from_secs(600))
        .unwrap();
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &Claims {
            sub: Some("u1".into()),
            groups: vec![],
            exp: now() + 600,
        },
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let cases = [
        ("".to_string(), "missing token"),
        ("?token=".to_string(), "missing token"),
        ("?token=garbage".to_string(), "invalid token"),
        (format!("?token={expired}"), "invalid token"),
        (format!("?token={forged}"), "invalid token"),
        (format!("?token={hs512}"), "invalid token"),
        (format!("?token={no_sub}"), "invalid identity"),
        (format!("?token={empty_sub}"), "invalid identity"),
    ];
    for (query, reason) in cases {
        let mut ws = s.ws_raw(&query).await;
        assert_eq!(
            expect_close(&mut ws).await,
            (1008, reason.to_string()),
            "query {query}"
        );
    }
    let stats = s.stats().await;
    assert_eq!(stats["total_connections"], 0);
    assert_eq!(
        stats["connections_opened"], 0,
        "nothing was ever registered"
    );
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(r#"pgdn_auth_failures_total{reason="invalid token"} 4"#),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn connection_frame_comes_first_and_has_the_protocol_shape() {
    let s = TestServer::start().await;
    let c = s.connect("u1", &["admins"]).await;
    let hello = &c.hello;
    assert_eq!(hello["type"], "connection");
    assert_eq!(hello["status"], "connected");
    assert_eq!(hello["user_id"], "u1");
    assert!(
        hello["connection_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let ts = hello["timestamp"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && humantime::parse_rfc3339(ts).is_ok(),
        "{ts}"
    );
    assert_eq!(hello.as_object().unwrap().len(), 5, "{hello}");
    s.stop().await;
}

#[tokio::test]
async fn bearer_header_authenticates_too() {
    let s = TestServer::start().await;
    let ws = s.connect_bearer(&s.token("u9", &[])).await;
    let mut c = Client::after_upgrade(ws).await;
    assert_eq!(c.user_id(), "u9");
    s.publish(json!({"target":{"user":"u9"},"type":"info","payload":{"n":1}}))
        .await;
    assert_eq!(c.next().await["payload"], json!({"n":1}));

    let mut bad = s.connect_bearer("nope").await;
    assert_eq!(
        expect_close(&mut bad).await,
        (1008, "invalid token".to_string())
    );
    s.stop().await;
}

#[tokio::test]
async fn a_publish_after_the_connection_frame_reaches_the_socket() {
    let s = TestServer::start().await;
    for i in 0..20 {
        let mut c = s.connect(&format!("race{i}"), &[]).await;
        s.publish(json!({"target":{"user":format!("race{i}")},"type":"info"}))
            .await;
        assert_eq!(c.next().await["type"], "info");
    }
    s.stop().await;
}

/// An app's own authenticator sees the request's headers and the peer's
/// address: a logged-in browser connects with its session cookie alone.
#[tokio::test]
async fn an_authenticator_can_read_cookies_and_the_peer_address() {
    use pgdn_server::{AuthError, AuthRequest, Authenticator, Identity, Pgdn};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    struct CookieSessions;

    #[async_trait::async_trait]
    impl Authenticator for CookieSessions {
        async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
            let peer = req.remote_addr.ok_or(AuthError::InvalidIdentity)?;
            assert!(peer.ip().is_loopback(), "{peer}");
            match req.cookie("sid") {
                Some("alice-session") => Ok(Identity::new("alice", ["staff"])),
                Some(_) => Err(AuthError::InvalidToken("unknown session".into())),
                None => Err(AuthError::MissingToken),
            }
        }
    }

    let pgdn = Pgdn::builder()
        .authenticator(CookieSessions)
        .publish_key(KEY)
        .build()
        .unwrap();
    let s = TestServer::start_pgdn(pgdn).await;
    let mut req = s.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("cookie", "theme=dark; sid=alice-session".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let c = Client::after_upgrade(ws).await;
    assert_eq!(c.user_id(), "alice");
    // Over SSE too; a wrong cookie is refused with the reason.
    let res = s
        .http
        .get(s.url("/sse"))
        .header("cookie", "sid=mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = s
        .http
        .get(s.url("/sse"))
        .header("cookie", "sid=alice-session")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    s.wait_connections(2).await;
    s.stop().await;
}
