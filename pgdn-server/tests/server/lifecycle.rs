//! Slow consumers, connection counts and shutdown.

use pgdn_core::QueueLimits;
use pgdn_server::Config;
use serde_json::json;

use super::common::*;

#[tokio::test]
async fn a_slow_consumer_is_cut_off_with_1013_while_the_others_keep_receiving() {
    let mut config = Config::default();
    config.queue = QueueLimits::default().max_frames(16);
    let s = TestServer::start_with(config).await;
    // `slow` never reads until the end; `fast` reads everything.
    let mut slow = s.connect("slow", &[]).await;
    let mut fast = s.connect("fast", &[]).await;
    let pad = "x".repeat(32 * 1024);
    let mut published = 0;
    // Publish until the hub has cut the slow consumer off. Loopback socket
    // buffers hold a few MiB, so this takes some hundreds of messages; the
    // bound only stops a broken server from looping forever.
    while !s.is_cut("slow") {
        assert!(published < 5000, "slow consumer never cut off");
        let reply = s
            .publish(json!({"target":{"broadcast":{}},"type":"info","payload":{"i":published,"pad":pad}}))
            .await;
        assert!(reply["delivered"].as_u64().unwrap() >= 1);
        let n = fast.next().await;
        assert_eq!(
            n["payload"]["i"], published,
            "fast consumer keeps up in order"
        );
        published += 1;
    }
    // The fast one is unaffected after the cut.
    s.publish(json!({"target":{"broadcast":{}},"type":"info","payload":{"after":"cut"}}))
        .await;
    assert_eq!(fast.next().await["payload"]["after"], "cut");
    // The slow one finally reads: what the socket buffered, then 1013.
    assert_eq!(
        slow.expect_close().await,
        (1013, "slow consumer".to_string())
    );
    s.wait_connections(1).await;
    let stats = s.stats().await;
    assert_eq!(stats["total_users"], 1);
    assert_eq!(stats["disconnects"]["slow_consumer"], 1);
    s.stop().await;
}

#[tokio::test]
async fn stats_go_back_to_zero_once_every_client_has_left() {
    let s = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(s.connect(&format!("u{}", i % 4), &["g1", "g2"]).await);
    }
    let stats = s.stats().await;
    assert_eq!(stats["total_connections"], 10);
    assert_eq!(stats["total_users"], 4);
    // Half close politely, half just drop the TCP connection.
    for (i, mut c) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            c.ws.close(None).await.unwrap();
        }
    }
    s.wait_connections(0).await;
    let stats = s.stats().await;
    assert_eq!(
        (
            stats["total_connections"].clone(),
            stats["total_users"].clone(),
            stats["groups"].clone(),
            stats["users"].clone()
        ),
        (json!(0), json!(0), json!([]), json!([]))
    );
    s.stop().await;
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001() {
    let s = TestServer::start().await;
    let mut a = s.connect("a", &[]).await;
    let mut b = s.connect("b", &[]).await;
    let service = s.service.clone();
    let addr = s.addr;
    s.stop().await;
    assert_eq!(
        a.expect_close().await,
        (1001, "server shutting down".to_string())
    );
    assert_eq!(
        b.expect_close().await,
        (1001, "server shutting down".to_string())
    );
    assert_eq!(service.hub().stats().total_connections, 0);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn kicking_a_user_closes_all_their_tabs_with_1008() {
    let s = TestServer::start().await;
    let mut t1 = s.connect("kick", &[]).await;
    let mut t2 = s.connect("kick", &[]).await;
    let mut other = s.connect("stay", &[]).await;
    assert_eq!(s.service.hub().disconnect_user("kick"), 2);
    assert_eq!(t1.expect_close().await.0, 1008);
    assert_eq!(t2.expect_close().await.0, 1008);
    s.wait_connections(1).await;
    other.roundtrip("stays").await;
    s.stop().await;
}

#[tokio::test]
async fn the_server_pings_and_drops_peers_that_stay_silent() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut config = Config::default();
    config.ping_interval = std::time::Duration::from_millis(50);
    config.idle_timeout = std::time::Duration::from_millis(400);
    let s = TestServer::start_with(config).await;
    let mut alive = s.connect("alive", &[]).await;
    // `silent` never polls its socket, so its client never answers a Ping.
    let _silent = s.connect("silent", &[]).await;
    // The live client reads; tungstenite answers each Ping with a Pong.
    let mut pings = 0;
    while pings < 3 {
        let msg = tokio::time::timeout(WAIT, alive.ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(msg, Message::Ping(_)) {
            pings += 1;
        }
    }
    s.wait_connections(1).await;
    assert_eq!(
        s.service.hub().connections_of("alive").len(),
        1,
        "the live one stays"
    );
    assert_eq!(s.stats().await["disconnects"]["idle_timeout"], 1);
    alive.roundtrip("still-here").await;
    s.stop().await;
}
