//! docs/protocol.md v1.1 section 7: the Server-Sent Events transport, on the
//! same session as WebSocket (same order, limits, stats and close codes).

use std::time::Duration;

use futures_util::StreamExt;
use pgdn_core::QueueLimits;
use pgdn_server::Config;
use serde_json::{Value, json};

use super::common::*;

/// One event of the stream: its `id:` (if any) and its `data:` as JSON;
/// comments come as `data: None` with the comment text in `comment`.
#[derive(Debug)]
struct Event {
    id: Option<String>,
    data: Option<Value>,
    comment: Option<String>,
}

/// A raw SSE client on reqwest, parsing `text/event-stream` itself.
struct Sse {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
    headers: reqwest::header::HeaderMap,
}

impl Sse {
    /// Opens `/sse` with `query` and extra headers; expects 200.
    async fn open(s: &TestServer, query: &str, headers: &[(&str, &str)]) -> Sse {
        let mut req = s.http.get(s.url(&format!("/sse{query}")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(res.status(), 200);
        let headers = res.headers().clone();
        Sse {
            body: Box::pin(res.bytes_stream()),
            buf: String::new(),
            headers,
        }
    }

    /// Opens as `user` in `groups` and reads the connection frame.
    async fn connect(s: &TestServer, user: &str, groups: &[&str]) -> (Sse, Value) {
        let mut sse = Sse::open(s, &format!("?token={}", s.token(user, groups)), &[]).await;
        let hello = sse.next_data().await;
        assert_eq!(hello["type"], "connection", "{hello}");
        (sse, hello)
    }

    /// The next event (or comment), `None` when the stream has ended.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut ev = Event {
                    id: None,
                    data: None,
                    comment: None,
                };
                for line in raw.lines().filter(|l| !l.is_empty()) {
                    if let Some(id) = line.strip_prefix("id: ") {
                        ev.id = Some(id.to_string());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        ev.data = Some(serde_json::from_str(d).expect("one JSON line"));
                    } else if let Some(c) = line.strip_prefix(':') {
                        ev.comment = Some(c.trim().to_string());
                    } else {
                        panic!("unexpected line {line:?}");
                    }
                }
                return Some(ev);
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("an event in time");
            match chunk {
                Some(Ok(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => return None,
            }
        }
    }

    /// The next event's data, skipping keepalive comments.
    async fn next_data(&mut self) -> Value {
        self.next_full().await.1
    }

    /// The next event with data, as (id, data), skipping comments.
    async fn next_full(&mut self) -> (Option<String>, Value) {
        loop {
            let ev = self.next_event().await.expect("stream open");
            if let Some(d) = ev.data {
                return (ev.id, d);
            }
        }
    }
}

#[tokio::test]
async fn sse_delivers_the_connection_frame_then_notifications_with_ids() {
    let s = TestServer::start().await;
    let (mut sse, hello) = Sse::connect(&s, "u1", &["staff"]).await;
    assert_eq!(hello["user_id"], "u1");
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    let id = s
        .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":1}}))
        .await["id"]
        .clone();
    let (event_id, n) = sse.next_full().await;
    assert_eq!(n["id"], id);
    assert_eq!(n["payload"], json!({"n":1}));
    assert_eq!(event_id.as_deref(), id.as_str(), "id: on notifications");
    s.publish(json!({"target":{"group":"staff"},"type":"warning"}))
        .await;
    assert_eq!(sse.next_data().await["group_ids"], json!(["staff"]));
    s.stop().await;
}

#[tokio::test]
async fn sse_auth_failures_get_401_before_any_stream() {
    let s = TestServer::start().await;
    let forged = pgdn_server::JwtAuthenticator::new(b"not the secret")
        .issue("u1", &[], Duration::from_secs(60))
        .unwrap();
    for (query, reason) in [
        (String::new(), "missing token"),
        ("?token=".to_string(), "missing token"),
        (format!("?token={forged}"), "invalid token"),
    ] {
        let res = s
            .http
            .get(s.url(&format!("/sse{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{query}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body, json!({"error": reason}));
    }
    assert_eq!(s.stats().await["total_connections"], 0);
    s.stop().await;
}

#[tokio::test]
async fn sse_takes_the_token_from_a_bearer_header() {
    let s = TestServer::start().await;
    let auth = format!("Bearer {}", s.token("u9", &[]));
    let mut sse = Sse::open(&s, "", &[("authorization", &auth)]).await;
    assert_eq!(sse.next_data().await["user_id"], "u9");
    s.stop().await;
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_which_wins_over_since() {
    let s = TestServer::start().await;
    let first = s
        .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":1}}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 2..=3 {
        s.publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":n}}))
            .await;
    }
    // `since` names an unknown id; the header wins, so there is no gap.
    let query = format!("?token={}&since=unknown-id", s.token("u1", &[]));
    let mut sse = Sse::open(&s, &query, &[("last-event-id", &first)]).await;
    assert_eq!(sse.next_data().await["type"], "connection");
    assert_eq!(sse.next_data().await["payload"]["n"], 2);
    assert_eq!(sse.next_data().await["payload"]["n"], 3);
    // With only `since` unknown: the gap first, then all that is kept.
    let mut sse = Sse::open(&s, &query, &[]).await;
    assert_eq!(sse.next_data().await["type"], "connection");
    assert_eq!(sse.next_data().await["code"], "history_gap");
    for n in 1..=3 {
        assert_eq!(sse.next_data().await["payload"]["n"], n);
    }
    s.stop().await;
}

#[tokio::test]
async fn sse_counts_as_a_connection_and_shares_user_messages_with_websocket() {
    let s = TestServer::start().await;
    let (mut sse, _) = Sse::connect(&s, "u1", &[]).await;
    let mut ws = s.connect("u1", &[]).await;
    let stats = s.stats().await;
    assert_eq!(stats["total_users"], 1);
    assert_eq!(stats["total_connections"], 2);
    let reply = s
        .publish(json!({"target":{"user":"u1"},"type":"info"}))
        .await;
    assert_eq!(reply["delivered"], 2);
    assert_eq!(sse.next_data().await["id"], reply["id"]);
    assert_eq!(ws.next().await["id"], reply["id"]);
    drop(sse);
    s.wait_connections(1).await;
    assert_eq!(s.stats().await["disconnects"]["client_closed"], 1);
    s.stop().await;
}

#[tokio::test]
async fn sse_keepalive_comments_and_close_events() {
    let mut config = Config::default();
    config.ping_interval = Duration::from_millis(100);
    config.idle_timeout = Duration::from_millis(300);
    let s = TestServer::start_with(config).await;
    let (mut sse, _) = Sse::connect(&s, "u1", &[]).await;
    // A keepalive comment arrives, and the stream is not cut as idle
    // (nothing ever comes back on SSE) although the idle timeout passed.
    for _ in 0..5 {
        let ev = sse.next_event().await.unwrap();
        assert_eq!(ev.comment.as_deref(), Some("keepalive"), "{ev:?}");
    }
    // Kicked: the close event with 1008, then the stream ends.
    assert_eq!(s.service.hub().disconnect_user("u1"), 1);
    let close = sse.next_data().await;
    assert_eq!(
        close,
        json!({"type":"close","code":1008,"reason":"disconnected by server"})
    );
    while let Some(ev) = sse.next_event().await {
        assert!(ev.data.is_none(), "nothing after the close event: {ev:?}");
    }
    // Shutdown: 1001.
    let (mut sse, _) = Sse::connect(&s, "u2", &[]).await;
    let stop = tokio::spawn(s.stop());
    let close = sse.next_data().await;
    assert_eq!(close["code"], 1001, "{close}");
    stop.await.unwrap();
}

#[tokio::test]
async fn a_slow_sse_consumer_is_cut_off_while_the_others_keep_receiving() {
    let mut config = Config::default();
    config.queue = QueueLimits::default().max_frames(16);
    config.write_timeout = Duration::from_millis(500);
    // The stalled stream's HTTP connection cannot finish; shutdown leaves it
    // after this long.
    config.shutdown_timeout = Duration::from_millis(500);
    let s = TestServer::start_with(config).await;
    // `slow` never reads; `fast` (WebSocket) reads everything.
    let (_slow, _) = Sse::connect(&s, "slow", &[]).await;
    let mut fast = s.connect("fast", &[]).await;
    let pad = "x".repeat(32 * 1024);
    let mut published = 0;
    while !s.is_cut("slow") {
        assert!(published < 5000, "slow consumer never cut off");
        s.publish(
            json!({"target":{"broadcast":{}},"type":"info","payload":{"i":published,"pad":pad}}),
        )
        .await;
        assert_eq!(fast.next().await["payload"]["i"], published);
        published += 1;
    }
    s.wait_connections(1).await;
    assert_eq!(s.stats().await["disconnects"]["slow_consumer"], 1);
    s.publish(json!({"target":{"broadcast":{}},"type":"info","payload":{"after":"cut"}}))
        .await;
    assert_eq!(fast.next().await["payload"]["after"], "cut");
    s.stop().await;
}

#[tokio::test]
async fn the_sse_path_is_configurable() {
    let mut config = Config::default();
    config.sse_path = "/events/stream".into();
    let s = TestServer::start_with(config).await;
    let res = s
        .http
        .get(s.url(&format!("/events/stream?token={}", s.token("u1", &[]))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = s.http.get(s.url("/sse")).send().await.unwrap();
    assert_eq!(res.status(), 404, "the default path is not served");
    s.stop().await;
}

#[tokio::test]
async fn a_listed_cross_origin_sse_request_gets_its_origin_allowed_without_credentials() {
    let mut config = Config::default();
    config.allowed_origins = vec!["http://app.example:3000".into()];
    let s = TestServer::start_with(config).await;
    let origin = "http://app.example:3000";
    let res = s
        .http
        .get(s.url(&format!("/sse?token={}", s.token("u1", &[]))))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], origin);
    assert!(
        res.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    let res = s
        .http
        .get(s.url("/sse"))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        origin,
        "so the page can read why"
    );
    s.stop().await;
}
