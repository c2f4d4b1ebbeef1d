//! docs/protocol.md section 4: resume after reconnect with `since=<id>`.

use std::collections::HashSet;

use pgdn_core::HistoryConfig;
use pgdn_server::Config;
use serde_json::{Value, json};

use super::common::*;

async fn connect_since(s: &TestServer, user: &str, since: &str) -> Client {
    let ws = s
        .ws_raw(&format!("?token={}&since={since}", s.token(user, &["g"])))
        .await;
    Client::after_upgrade(ws).await
}

async fn publish_user(s: &TestServer, user: &str, n: u64) -> String {
    s.publish(json!({"target":{"user":user},"type":"info","payload":{"n":n}}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn missed_user_messages_are_replayed_in_order_before_live_traffic() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &["g"]).await;
    let first = publish_user(&s, "u1", 1).await;
    assert_eq!(c.next().await["id"], first.as_str());
    drop(c);
    s.wait_connections(0).await;

    let m2 = publish_user(&s, "u1", 2).await;
    s.publish(json!({"target":{"group":"g"},"type":"info","payload":{"group":true}}))
        .await;
    s.publish(json!({"target":{"users":["u1","u2"]},"type":"success","payload":{"n":3}}))
        .await;
    publish_user(&s, "u2", 99).await;

    let mut c = connect_since(&s, "u1", &first).await;
    let a = c.next().await;
    let b = c.next().await;
    assert_eq!(
        (a["id"].as_str(), a["payload"]["n"].as_u64()),
        (Some(m2.as_str()), Some(2))
    );
    assert_eq!(b["payload"]["n"], 3, "users targets are retained too");
    // Group messages are not replayed; live traffic follows the replay.
    c.roundtrip("after-replay").await;
    publish_user(&s, "u1", 4).await;
    assert_eq!(c.next().await["payload"]["n"], 4);
    s.stop().await;
}

#[tokio::test]
async fn resuming_from_a_broadcast_id_replays_what_came_after_it() {
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &[]).await;
    let b = s
        .publish(json!({"target":{"broadcast":{}},"type":"info"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(c.next().await["id"], b.as_str());
    drop(c);
    s.wait_connections(0).await;
    publish_user(&s, "u1", 7).await;
    let mut c = connect_since(&s, "u1", &b).await;
    assert_eq!(c.next().await["payload"]["n"], 7);
    c.roundtrip("nothing-else").await;
    s.stop().await;
}

#[tokio::test]
async fn no_since_means_no_replay() {
    let s = TestServer::start().await;
    publish_user(&s, "u1", 1).await;
    let mut c = s.connect("u1", &[]).await;
    c.roundtrip("fresh").await;
    s.stop().await;
}

#[tokio::test]
async fn an_unknown_id_gets_history_gap_then_everything_retained() {
    let s = TestServer::start().await;
    publish_user(&s, "u1", 1).await;
    publish_user(&s, "u1", 2).await;
    let mut c = connect_since(&s, "u1", "no-such-id").await;
    let gap = c.next().await;
    assert_eq!(gap["type"], "error");
    assert_eq!(gap["code"], "history_gap");
    assert_eq!(c.next().await["payload"]["n"], 1);
    assert_eq!(c.next().await["payload"]["n"], 2);
    c.roundtrip("done").await;
    s.stop().await;
}

#[tokio::test]
async fn a_window_that_no_longer_reaches_back_gets_history_gap() {
    let mut config = Config::default();
    config.history = HistoryConfig::default().max_messages(3);
    let s = TestServer::start_with(config).await;
    let first = publish_user(&s, "u1", 0).await;
    for n in 1..=5 {
        publish_user(&s, "u1", n).await;
    }
    let mut c = connect_since(&s, "u1", &first).await;
    assert_eq!(c.next().await["code"], "history_gap");
    for n in 3..=5 {
        assert_eq!(c.next().await["payload"]["n"], n);
    }
    c.roundtrip("done").await;
    s.stop().await;
}

/// A publisher keeps going while the client drops and resumes twice: the
/// client ends up with every message exactly once, in order.
#[tokio::test]
async fn nothing_is_lost_or_duplicated_between_replay_and_live() {
    const TOTAL: u64 = 300;
    let s = std::sync::Arc::new(TestServer::start().await);
    let mut c = s.connect("u1", &[]).await;
    let publisher = {
        let s = s.clone();
        tokio::spawn(async move {
            for n in 0..TOTAL {
                publish_user(&s, "u1", n).await;
            }
        })
    };
    let mut got: Vec<u64> = Vec::new();
    let mut last_id = String::new();
    for cut_at in [50u64, 150] {
        while got.len() < cut_at as usize {
            let v: Value = c.next().await;
            got.push(v["payload"]["n"].as_u64().unwrap());
            last_id = v["id"].as_str().unwrap().to_string();
        }
        drop(c);
        c = connect_since(&s, "u1", &last_id).await;
    }
    while got.len() < TOTAL as usize {
        let v = c.next().await;
        assert_ne!(v["type"], "error", "no gap expected: {v}");
        got.push(v["payload"]["n"].as_u64().unwrap());
    }
    publisher.await.unwrap();
    assert_eq!(got, (0..TOTAL).collect::<Vec<_>>());
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), TOTAL as usize);
    c.roundtrip("nothing-more").await;
}
