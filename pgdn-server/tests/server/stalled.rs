//! Clients that stop reading are always cut off (1013), whether their
//! queue overflows or a write makes no progress, also while the greeting
//! and a resume replay are written; a replay counts toward the outbound
//! bound.

use std::time::Duration;

use pgdn_core::QueueLimits;
use pgdn_server::Config;
use serde_json::json;

use super::common::*;

/// Waits until the hub has marked `user`'s connection closed.
async fn wait_cut(s: &TestServer, user: &str) {
    tokio::time::timeout(WAIT, async {
        while !s.is_cut(user) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stalled client is cut off in time");
}

#[tokio::test]
async fn a_write_that_makes_no_progress_ends_in_1013() {
    let mut config = Config::default();
    // A queue too large to overflow here: only the write timeout can act.
    config.queue = QueueLimits::default()
        .max_frames(100_000)
        .max_bytes(1 << 30);
    config.write_timeout = Duration::from_millis(500);
    // The close frame waits behind what the socket already holds: give the
    // client, once it reads, all the time it needs to drain it (on a busy
    // machine a debug-build client takes seconds for 32 MiB).
    config.close_timeout = Duration::from_secs(120);
    // Longer than the test: the idle timer is not what cuts it off.
    config.idle_timeout = Duration::from_secs(120);
    config.ping_interval = Duration::from_secs(60);
    let s = TestServer::start_with(config).await;
    let mut stalled = s.connect("stalled", &[]).await;
    let mut other = s.connect("other", &[]).await;
    let pad = "x".repeat(256 * 1024);
    // 32 MiB: more than loopback socket buffers hold, so a write stalls.
    for i in 0..128 {
        s.publish(json!({"target":{"user":"stalled"},"type":"info","payload":{"i":i,"pad":pad}}))
            .await;
    }
    wait_cut(&s, "stalled").await;
    other.roundtrip("unaffected").await;
    // The client reads at last: what was buffered, then 1013.
    assert_eq!(
        stalled.expect_close().await,
        (1013, "slow consumer".to_string())
    );
    s.wait_connections(1).await;
    assert_eq!(s.stats().await["disconnects"]["slow_consumer"], 1);
    s.stop().await;
}

#[tokio::test]
async fn a_resume_replay_counts_toward_the_outbound_bound() {
    let mut config = Config::default();
    config.queue = QueueLimits::default()
        .max_frames(1024)
        .max_bytes(512 * 1024);
    let s = TestServer::start_with(config).await;
    let pad = "x".repeat(32 * 1024);
    let mut first = None;
    // 100 messages of 32 KiB: 3.2 MiB of history, far above the bound.
    for i in 0..100 {
        let reply = s
            .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"i":i,"pad":pad}}))
            .await;
        first.get_or_insert(reply["id"].as_str().unwrap().to_string());
    }
    let since = first.unwrap();
    // A resuming client that does not read while live traffic arrives,
    // until its socket buffers and then its queue are full.
    let ws = s
        .ws_raw(&format!("?token={}&since={since}", s.token("u1", &[])))
        .await;
    for i in 100..3000 {
        s.publish(json!({"target":{"user":"u1"},"type":"info","payload":{"i":i,"pad":pad}}))
            .await;
        if s.is_cut("u1") {
            break;
        }
    }
    wait_cut(&s, "u1").await;
    // What it then reads: the connection frame, the gap (the replay was cut
    // to fit the bound, newest kept), part of the replay, and 1013.
    let mut c = Client::after_upgrade(ws).await;
    assert_eq!(c.next().await["code"], "history_gap");
    let oldest = c.next().await;
    assert!(
        oldest["payload"]["i"].as_u64().unwrap() > 80,
        "only the newest messages fit in 512 KiB: {}",
        oldest["payload"]["i"]
    );
    assert_eq!(c.expect_close().await, (1013, "slow consumer".to_string()));
    s.stop().await;
}

#[tokio::test]
async fn a_resume_replay_within_the_bound_is_whole() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..50 {
        let reply = s
            .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"i":i}}))
            .await;
        ids.push(reply["id"].as_str().unwrap().to_string());
    }
    let ws = s
        .ws_raw(&format!("?token={}&since={}", s.token("u1", &[]), ids[0]))
        .await;
    let mut c = Client::after_upgrade(ws).await;
    for i in 1..50 {
        assert_eq!(c.next().await["payload"]["i"], i, "no gap, all in order");
    }
    c.roundtrip("then live").await;
    s.stop().await;
}
