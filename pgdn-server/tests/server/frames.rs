//! docs/protocol.md section 3: what clients send.

use futures_util::{SinkExt, StreamExt};
use pgdn_server::core::HandlerError;
use pgdn_server::{Config, Identity};
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::common::*;

#[tokio::test]
async fn ping_gets_pong_with_the_same_timestamp() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    c.send(r#"{"type":"ping","timestamp":1732680000123}"#).await;
    assert_eq!(
        c.next().await,
        json!({"type":"pong","timestamp":1732680000123u64})
    );
    c.send(r#"{"type":"ping","timestamp":{"any":"json"}}"#)
        .await;
    assert_eq!(
        c.next().await,
        json!({"type":"pong","timestamp":{"any":"json"}})
    );
    c.send(r#"{"type":"ping"}"#).await;
    assert_eq!(c.next().await, json!({"type":"pong","timestamp":null}));
    s.stop().await;
}

#[tokio::test]
async fn websocket_level_ping_is_answered_with_pong() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    c.ws.send(Message::Ping(b"hello".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, c.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"hello".to_vec().into()));
    s.stop().await;
}

#[tokio::test]
async fn invalid_frames_get_error_frames_and_the_connection_stays_open() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    let mut other = s.connect("u2", &[]).await;
    let cases = [
        ("{not json", "invalid_json"),
        ("", "invalid_json"),
        ("[1,2,3]", "invalid_message"),
        ("\"ping\"", "invalid_message"),
        ("42", "invalid_message"),
        (r#"{"no":"type"}"#, "invalid_message"),
        (r#"{"type":7}"#, "invalid_message"),
        (r#"{"type":""}"#, "invalid_message"),
        (r#"{"type":"no_such_handler"}"#, "unknown_type"),
    ];
    for (frame, code) in cases {
        c.send(frame).await;
        let e = c.next().await;
        assert_eq!(e["type"], "error", "{frame:?}");
        assert_eq!(e["code"], code, "{frame:?}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let e = c.next().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_message"))
    );
    // Still open, still receiving; the other connection never noticed.
    c.roundtrip("still-open").await;
    s.publish(json!({"target":{"broadcast":{}},"type":"info","payload":{"after":"errors"}}))
        .await;
    assert_eq!(c.next().await["payload"]["after"], "errors");
    assert_eq!(other.next().await["payload"]["after"], "errors");
    s.stop().await;
}

#[tokio::test]
async fn custom_handlers_get_the_senders_identity_and_can_reply() {
    let s = TestServer::start().await;
    let hub = s.service.hub().clone();
    let relay = hub.clone();
    hub.register_handler("chat", move |who: Identity, frame: Map<String, Value>| {
        let relay = relay.clone();
        async move {
            let text = frame
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| HandlerError::new("chat needs a text"))?;
            relay
                .notify_group(
                    "room",
                    pgdn_server::MessageType::new("chat").unwrap(),
                    json!({"from": &*who.user_id, "text": text}),
                )
                .await
                .map_err(|e| HandlerError::new(e.to_string()))?;
            Ok(Some(json!({"type":"chat_ack","ok":true})))
        }
    })
    .unwrap();
    let mut alice = s.connect("alice", &["room"]).await;
    let mut bob = s.connect("bob", &["room"]).await;
    alice.send(r#"{"type":"chat","text":"hello"}"#).await;
    // Alice gets the group message and the ack, in the order they happened.
    let first = alice.next().await;
    let second = alice.next().await;
    assert_eq!(first["payload"], json!({"from":"alice","text":"hello"}));
    assert_eq!(second, json!({"type":"chat_ack","ok":true}));
    assert_eq!(bob.next().await["payload"]["from"], "alice");
    alice.send(r#"{"type":"chat"}"#).await;
    let e = alice.next().await;
    assert_eq!(e["code"], "handler_error");
    assert_eq!(e["message"], "chat needs a text");
    alice.roundtrip("open").await;
    s.stop().await;
}

#[tokio::test]
async fn a_frame_above_the_size_limit_closes_with_1009() {
    let mut config = Config::default();
    config.max_frame_size = 1024;
    let s = TestServer::start_with(config).await;
    let mut c = s.connect("u1", &[]).await;
    let mut other = s.connect("u2", &[]).await;
    c.send(&format!(
        r#"{{"type":"ping","timestamp":"{}"}}"#,
        "x".repeat(900)
    ))
    .await;
    assert_eq!(c.next().await["type"], "pong", "under the limit is fine");
    c.send(&format!(
        r#"{{"type":"ping","timestamp":"{}"}}"#,
        "x".repeat(2000)
    ))
    .await;
    assert_eq!(c.expect_close().await.0, 1009);
    s.wait_connections(1).await;
    other.roundtrip("unharmed").await;
    assert_eq!(s.stats().await["disconnects"]["frame_too_large"], 1);
    assert_eq!(Config::default().max_frame_size, 64 * 1024);
    s.stop().await;
}

#[tokio::test]
async fn a_client_over_its_rate_limit_is_closed_with_1008() {
    let mut config = Config::default();
    config.rate_limit_per_sec = 0.001;
    config.rate_limit_burst = 5.0;
    let s = TestServer::start_with(config).await;
    let mut c = s.connect("u1", &[]).await;
    for i in 0..5 {
        c.roundtrip(&format!("ok-{i}")).await;
    }
    c.send(r#"{"type":"ping","timestamp":"one too many"}"#)
        .await;
    assert_eq!(
        c.expect_close().await,
        (1008, "rate limit exceeded".to_string())
    );
    // The close goes out before the connection is unregistered and counted.
    s.wait_connections(0).await;
    assert_eq!(s.stats().await["disconnects"]["rate_limited"], 1);
    s.stop().await;
}

#[tokio::test]
async fn the_websocket_path_is_configurable() {
    let mut config = Config::default();
    config.ws_path = "/realtime/socket".into();
    let s = TestServer::start_with(config).await;
    let url = format!(
        "ws://{}/realtime/socket?token={}",
        s.addr,
        s.token("u1", &[])
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let c = Client::after_upgrade(ws).await;
    assert_eq!(c.user_id(), "u1");
    let res = s.http.get(s.url("/ws")).send().await.unwrap();
    assert_eq!(res.status(), 404, "the default path is not served");
    s.stop().await;
}

#[tokio::test]
async fn every_route_works_mounted_under_a_path_prefix() {
    // warp: `warp::path("rt").and(pgdn.routes())`; axum: `nest("/rt", router(service))`.
    let s = TestServer::start_under("/rt", build(Config::default())).await;
    // The WebSocket at /rt/ws, the API at /rt/api/v1.
    let mut c = s.connect("u1", &[]).await;
    let reply = s
        .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":1}}))
        .await;
    assert_eq!(reply["delivered"], 1);
    assert_eq!(c.next().await["id"], reply["id"]);
    c.roundtrip("under-prefix").await;
    // Server-Sent Events at /rt/sse.
    let res = s
        .http
        .get(s.url(&format!("/sse?token={}", s.token("u2", &[]))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(WAIT, body.next()).await.unwrap();
        text.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    let hello: Value = serde_json::from_str(text.trim().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(hello["user_id"], "u2", "{text}");
    assert_eq!(s.stats().await["total_connections"], 2);
    let health = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(health.text().await.unwrap(), "ok");
    // Nothing is served outside the prefix.
    for path in ["/ws", "/sse", "/api/v1/stats", "/healthz"] {
        let res = s
            .http
            .get(format!("http://{}{path}", s.addr))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{path}");
    }
    drop(body);
    s.stop().await;
}

/// On warp the harness gives the server a session runtime (as the
/// `pgdn-server` binary does): a connection's frames are handled on its
/// threads once the connection frame is out, and everything else (greeting,
/// delivery, replies, shutdown) works the same. On axum nothing moves.
#[tokio::test]
async fn connections_run_on_the_session_runtime_when_there_is_one() {
    let s = TestServer::start().await;
    s.service
        .hub()
        .register_handler(
            "where",
            |_who: Identity, _frame: Map<String, Value>| async {
                let thread = std::thread::current().name().unwrap_or("").to_string();
                Ok(Some(json!({"type":"here","thread": thread})))
            },
        )
        .unwrap();
    let mut c = s.connect("u1", &[]).await;
    c.send(r#"{"type":"where"}"#).await;
    let here = c.next().await;
    assert_eq!(here["type"], "here");
    let thread = here["thread"].as_str().unwrap();
    match s.backend() {
        Backend::Warp => assert_eq!(thread, "pgdn-session", "the handler ran on {thread:?}"),
        Backend::Axum => assert_ne!(thread, "pgdn-session"),
    }
    // Delivery and the end of the connection at shutdown are unchanged.
    s.publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":1}}))
        .await;
    assert_eq!(c.next().await["payload"]["n"], 1);
    let stop = tokio::spawn(s.stop());
    assert_eq!(expect_close(&mut c.ws).await.0, 1001);
    stop.await.unwrap();
}
