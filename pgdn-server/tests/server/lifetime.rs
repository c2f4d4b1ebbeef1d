//! docs/protocol.md v1.1 section 1 (token lifetime and in-band refresh) and the
//! close codes of section 2 that protect the server from a misbehaving
//! peer (every inbound frame counts toward the rate limit; 1002, 1007).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use pgdn_server::Config;
use pgdn_server::jwt::Claims;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use super::common::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `user` in `groups` that expires `secs` seconds from now
/// (whole seconds, as JWT `exp` is).
fn token_expiring(s: &TestServer, user: &str, groups: &[&str], secs: u64) -> String {
    s.auth
        .encode(&Claims {
            sub: Some(user.into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            exp: now() + secs,
        })
        .unwrap()
}

/// A server whose JWTs expire exactly at `exp` (no leeway).
async fn start_exact_expiry(config: Config) -> TestServer {
    let pgdn = pgdn_server::Pgdn::builder()
        .config(config)
        .authenticator(pgdn_server::JwtAuthenticator::new(SECRET).leeway(Duration::ZERO))
        .publish_key(KEY)
        .build()
        .unwrap();
    TestServer::start_pgdn(pgdn).await
}

async fn connect_with(s: &TestServer, token: &str) -> Client {
    Client::after_upgrade(s.ws_raw(&format!("?token={token}")).await).await
}

#[tokio::test]
async fn an_expired_token_closes_the_live_connection_with_4001() {
    let s = start_exact_expiry(Config::default()).await;
    let mut c = connect_with(&s, &token_expiring(&s, "u1", &[], 2)).await;
    let id = s
        .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":1}}))
        .await["id"]
        .clone();
    assert_eq!(
        c.next().await["id"],
        id,
        "delivered while the token is valid"
    );
    assert_eq!(c.expect_close().await, (4001, "token expired".to_string()));
    // Nothing is delivered after the close: the stream has ended.
    s.wait_connections(0).await;
    s.publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":2}}))
        .await;
    let after = tokio::time::timeout(WAIT, c.ws.next()).await.unwrap();
    assert!(
        !matches!(after, Some(Ok(Message::Text(_)))),
        "no frame after 4001: {after:?}"
    );
    assert_eq!(s.stats().await["disconnects"]["token_expired"], 1);
    s.stop().await;
}

#[tokio::test]
async fn a_refresh_extends_the_connection_and_takes_the_new_groups() {
    let s = start_exact_expiry(Config::default()).await;
    let mut c = connect_with(&s, &token_expiring(&s, "u1", &[], 2)).await;
    let fresh = token_expiring(&s, "u1", &["admins"], 3600);
    c.send(&json!({"type":"refresh","token":fresh}).to_string())
        .await;
    let answer = c.next().await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    let at = answer["expires_at"].as_str().expect("an RFC 3339 expiry");
    let at = humantime::parse_rfc3339(at).unwrap();
    assert!(
        at > SystemTime::now() + Duration::from_secs(3000),
        "{answer}"
    );
    // The new group reaches the connection.
    let id = s
        .publish(json!({"target":{"group":"admins"},"type":"info"}))
        .await["id"]
        .clone();
    assert_eq!(c.next().await["id"], id);
    assert_eq!(s.stats().await["groups"], json!(["admins"]));
    // Past the old expiry (at most 2 s away) the connection is still open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.roundtrip("still open after the old expiry").await;
    s.stop().await;
}

#[tokio::test]
async fn a_refused_refresh_changes_nothing() {
    let s = start_exact_expiry(Config::default()).await;
    let mut c = connect_with(&s, &token_expiring(&s, "u1", &["staff"], 3)).await;
    let forged = pgdn_server::JwtAuthenticator::new(b"another secret")
        .issue("u1", &["admins"], Duration::from_secs(3600))
        .unwrap();
    let cases = [
        json!({"type":"refresh","token": token_expiring(&s, "u2", &["admins"], 3600)}),
        json!({"type":"refresh","token": forged}),
        json!({"type":"refresh","token": "garbage"}),
        json!({"type":"refresh"}),
        json!({"type":"refresh","token": 42}),
    ];
    for frame in cases {
        c.send(&frame.to_string()).await;
        let e = c.next().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("refresh_failed")),
            "{frame}: {e}"
        );
    }
    // Groups unchanged: a publish to the old group arrives, to the other not.
    s.publish(json!({"target":{"group":"admins"},"type":"info"}))
        .await;
    let id = s
        .publish(json!({"target":{"group":"staff"},"type":"info"}))
        .await["id"]
        .clone();
    assert_eq!(c.next().await["id"], id);
    // Expiry unchanged: the old token still ends the connection.
    assert_eq!(c.expect_close().await, (4001, "token expired".to_string()));
    s.stop().await;
}

#[tokio::test]
async fn reserved_types_cannot_be_published() {
    let s = TestServer::start().await;
    for kind in ["refresh", "refreshed", "close"] {
        let (status, reply) = s
            .post(
                "/api/v1/publish",
                Some(KEY),
                json!({"target":{"user":"u1"},"type":kind}).to_string(),
            )
            .await;
        assert_eq!(status, 400, "{kind}: {reply}");
    }
    s.stop().await;
}

#[tokio::test]
async fn websocket_pings_count_toward_the_rate_limit() {
    let mut config = Config::default();
    config.rate_limit_per_sec = 1.0;
    config.rate_limit_burst = 5.0;
    let s = TestServer::start_with(config).await;
    let mut c = s.connect("u1", &[]).await;
    let mut other = s.connect("u2", &[]).await;
    for _ in 0..20 {
        // The server may close before all are written.
        if c.ws
            .send(Message::Ping(b"x".to_vec().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(
        c.expect_close().await,
        (1008, "rate limit exceeded".to_string())
    );
    other.roundtrip("unaffected").await;
    s.stop().await;
}

/// A raw WebSocket handshake on a plain TCP socket, for frames no client
/// library will send.
async fn raw_socket(s: &TestServer) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.token("u1", &[]),
        s.addr
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    tcp
}

/// Reads frames until a close frame and returns its code (skipping the
/// text frames before it).
async fn raw_close_code(tcp: &mut tokio::net::TcpStream) -> u16 {
    loop {
        let b0 = tcp.read_u8().await.unwrap();
        let b1 = tcp.read_u8().await.unwrap();
        let len = match b1 & 0x7f {
            126 => u64::from(tcp.read_u16().await.unwrap()),
            127 => tcp.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut payload = vec![0; len as usize];
        tcp.read_exact(&mut payload).await.unwrap();
        if b0 & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// A masked client frame with `opcode` and `payload` (< 126 bytes).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_protocol_errors_with_1002() {
    let s = TestServer::start().await;
    let mut tcp = raw_socket(&s).await;
    tcp.write_all(&client_frame(0x1, &[b'{', 0xff, 0xfe, b'}']))
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, raw_close_code(&mut tcp))
            .await
            .unwrap(),
        1007
    );
    let mut tcp = raw_socket(&s).await;
    // Opcode 0x3 is reserved.
    tcp.write_all(&client_frame(0x3, b"?")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, raw_close_code(&mut tcp))
            .await
            .unwrap(),
        1002
    );
    s.wait_connections(0).await;
    let stats: Value = s.stats().await;
    assert_eq!(stats["disconnects"]["invalid_utf8"], 1);
    assert_eq!(stats["disconnects"]["protocol_error"], 1);
    s.stop().await;
}

/// A flood of empty continuation frames never completes a message, so
/// only a transport that sees wire frames can count it: the warp adapter
/// does (its socket counts every frame); axum's WebSocket hides frames
/// from its users, so the axum example counts messages and control frames.
#[tokio::test]
async fn every_fragment_counts_toward_the_rate_limit() {
    if TestServer::BACKEND_SEES_FRAMES {
        let mut config = Config::default();
        config.rate_limit_per_sec = 1.0;
        config.rate_limit_burst = 20.0;
        let s = TestServer::start_with(config).await;
        let mut tcp = raw_socket(&s).await;
        // A text message begun and never finished, then 1,000 empty
        // continuation frames.
        let mut flood = client_frame(0x1, b"{")[..].to_vec();
        flood[0] &= 0x7f; // FIN off
        for _ in 0..1000 {
            let mut f = client_frame(0x0, b"");
            f[0] &= 0x7f;
            flood.extend(f);
        }
        // The server may close before all is written.
        let _ = tcp.write_all(&flood).await;
        assert_eq!(
            tokio::time::timeout(WAIT, raw_close_code(&mut tcp))
                .await
                .unwrap(),
            1008
        );
        s.wait_connections(0).await;
        assert_eq!(s.stats().await["disconnects"]["rate_limited"], 1);
        s.stop().await;
    }
}
