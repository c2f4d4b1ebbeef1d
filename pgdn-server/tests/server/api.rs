//! docs/protocol.md section 5: the publish API.

use serde_json::{Value, json};

use super::common::*;

#[tokio::test]
async fn missing_or_wrong_key_gets_401_and_publishes_nothing() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    let body = json!({"target":{"user":"u1"},"type":"info"}).to_string();
    for key in [None, Some("wrong"), Some(""), Some(&KEY[..KEY.len() - 1])] {
        let (status, reply) = s.post("/api/v1/publish", key, body.clone()).await;
        assert_eq!(status, 401, "key {key:?}");
        assert!(reply["error"].is_string(), "{reply}");
        let (status, _) = s
            .post("/api/v1/publish/batch", key, format!("[{body}]"))
            .await;
        assert_eq!(status, 401);
    }
    let res = s.http.get(s.url("/api/v1/stats")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = s
        .http
        .get(s.url("/api/v1/stats"))
        .header("authorization", format!("Basic {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "only the Bearer scheme");
    // Nothing reached the subscriber: its next frame is the pong.
    c.roundtrip("after-401").await;
    assert_eq!(s.stats().await["messages_published"], 0);
    s.stop().await;
}

#[tokio::test]
async fn malformed_bodies_get_400_with_a_json_error() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    let bad = [
        "",
        "not json",
        "[]",
        "42",
        r#"{"target":{"room":"x"},"type":"info"}"#,
        r#"{"target":{"user":"u1","group":"g"},"type":"info"}"#,
        r#"{"target":{"user":"u1"}}"#,
        r#"{"target":{"user":"u1"},"type":""}"#,
        r#"{"target":{"user":"u1"},"type":"connection"}"#,
        r#"{"target":{"user":"u1"},"type":"ping"}"#,
        r#"{"target":{"user":"u1"},"type":"pong"}"#,
        r#"{"target":{"user":"u1"},"type":"info","payload":[1,2]}"#,
        r#"{"target":{"user":"u1"},"type":"info","payload":"text"}"#,
        r#"{"target":{"user":"u1"},"type":"info","id":"white space"}"#,
        r#"{"target":{"user":""},"type":"info"}"#,
        r#"{"target":{"users":[]},"type":"info"}"#,
        r#"{"target":{"group":""},"type":"info"}"#,
    ];
    for body in bad {
        let (status, reply) = s.post("/api/v1/publish", Some(KEY), body).await;
        assert_eq!(status, 400, "body {body:?}: {reply}");
        let msg = reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("error text for {body:?}"));
        assert!(!msg.is_empty());
    }
    let (_, reply) = s
        .post(
            "/api/v1/publish",
            Some(KEY),
            r#"{"target":{"user":"u1"},"type":"ping"}"#,
        )
        .await;
    assert!(
        reply["error"].as_str().unwrap().contains("reserved"),
        "{reply}"
    );
    c.roundtrip("nothing-published").await;
    s.stop().await;
}

#[tokio::test]
async fn payload_may_be_left_out_and_is_then_empty() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    s.publish(json!({"target":{"user":"u1"},"type":"info"}))
        .await;
    assert_eq!(c.next().await["payload"], json!({}));
    s.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let mut config = pgdn_server::Config::default();
    config.max_body_size = 1024;
    let s = TestServer::start_with(config).await;
    let mut c = s.connect("u1", &[]).await;
    let big = json!({"target":{"user":"u1"},"type":"info","payload":{"pad":"x".repeat(2000)}})
        .to_string();
    let (status, reply) = s.post("/api/v1/publish", Some(KEY), big.clone()).await;
    assert_eq!(status, 413);
    assert!(reply["error"].as_str().unwrap().contains("1024"), "{reply}");
    // Also when the body is streamed without a Content-Length.
    let stream = futures_util::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let res = s
        .http
        .post(s.url("/api/v1/publish"))
        .bearer_auth(KEY)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let reply: Value = res.json().await.unwrap();
    assert!(reply["error"].is_string());
    c.roundtrip("nothing").await;
    // The default limit is 1 MiB.
    assert_eq!(pgdn_server::Config::default().max_body_size, 1024 * 1024);
    s.stop().await;
}

#[tokio::test]
async fn a_repeated_publish_id_is_delivered_once_and_the_reply_repeats() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    let body = json!({"id":"job-7:step.1","target":{"user":"u1"},"type":"info","payload":{"n":1}});
    let first = s.publish(body.clone()).await;
    assert_eq!(first, json!({"id":"job-7:step.1","delivered":1}));
    let again = s.publish(body.clone()).await;
    assert_eq!(again, first);
    let n = c.next().await;
    assert_eq!(n["id"], "job-7:step.1");
    c.roundtrip("once").await;
    let batch_again = s
        .post("/api/v1/publish/batch", Some(KEY), format!("[{body}]"))
        .await;
    assert_eq!(batch_again, (200, json!([first])));
    c.roundtrip("still-once").await;
    assert_eq!(s.stats().await["duplicates_suppressed"], 2);
    s.stop().await;
}

#[tokio::test]
async fn batch_is_all_or_nothing() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &["g"]).await;
    let good = json!([
        {"target":{"user":"u1"},"type":"info","payload":{"i":0}},
        {"target":{"group":"g"},"type":"success","payload":{"i":1}},
        {"target":{"broadcast":{}},"type":"warning"}
    ]);
    let (status, reply) = s
        .post("/api/v1/publish/batch", Some(KEY), good.to_string())
        .await;
    assert_eq!(status, 200, "{reply}");
    let receipts = reply.as_array().unwrap();
    assert_eq!(receipts.len(), 3);
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(r["delivered"], 1);
        let n = c.next().await;
        assert_eq!(n["id"], r["id"], "item {i} in order");
    }
    let bad = json!([
        {"target":{"user":"u1"},"type":"info"},
        {"target":{"user":"u1"},"type":"pong"}
    ]);
    let (status, reply) = s
        .post("/api/v1/publish/batch", Some(KEY), bad.to_string())
        .await;
    assert_eq!(status, 400);
    assert!(reply["error"].is_string());
    let (status, _) = s
        .post("/api/v1/publish/batch", Some(KEY), r#"{"not":"an array"}"#)
        .await;
    assert_eq!(status, 400);
    c.roundtrip("none-of-the-bad-batch").await;
    s.stop().await;
}

#[tokio::test]
async fn stats_count_users_connections_and_groups() {
    let s = TestServer::start().await;
    let a1 = s.connect("a", &["g1"]).await;
    let a2 = s.connect("a", &["g2"]).await;
    let b = s.connect("b", &["g1"]).await;
    let stats = s.stats().await;
    assert_eq!(stats["total_users"], 2);
    assert_eq!(stats["total_connections"], 3);
    assert_eq!(stats["users"], json!(["a", "b"]));
    assert_eq!(stats["groups"], json!(["g1", "g2"]));
    drop((a1, a2, b));
    s.wait_connections(0).await;
    let stats = s.stats().await;
    assert_eq!(stats["total_users"], 0);
    assert_eq!(stats["total_connections"], 0);
    assert_eq!(stats["users"], json!([]));
    assert_eq!(stats["groups"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn health_metrics_and_unknown_api_paths() {
    let s = TestServer::start().await;
    let res = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ok");
    s.publish(json!({"target":{"broadcast":{}},"type":"info"}))
        .await;
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("pgdn_messages_published_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE pgdn_connections gauge"),
        "{metrics}"
    );
    let res = s
        .http
        .get(s.url("/api/v1/nope"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let reply: Value = res.json().await.unwrap();
    assert_eq!(reply["error"], "not found");
    let res = s.http.get(s.url("/api/v1/nope")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = s.http.get(s.url("/ws")).send().await.unwrap();
    assert_eq!(res.status(), 400, "a plain GET on the WebSocket path");
    let page = s.http.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.text()
            .await
            .unwrap()
            .to_lowercase()
            .contains("<!doctype html")
    );
    s.stop().await;
}
