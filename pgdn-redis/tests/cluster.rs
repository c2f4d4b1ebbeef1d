//! pgdn-redis against a real, private `redis-server` (started here on a
//! free port by pgdn-testkit): several in-process nodes share it. Faults,
//! cleanup and what lands in Redis; delivery, order, resume and
//! de-duplication run on every layout in `tests/deployments.rs`.

use std::time::Duration;

use pgdn_core::{MessageType, PublishRequest, Target};
use pgdn_redis::{Cluster, ClusterConfig, Emitter};
use pgdn_testkit::RedisServer;
use serde_json::{Value, json};

mod common;

use common::*;

#[tokio::test]
async fn a_dead_nodes_mappings_expire_and_cleanup_removes_them() {
    let redis = RedisServer::start();
    let (ca, a) = node(&redis, "a").await;
    let (cb, b) = node(&redis, "b").await;
    let (_t1, _o1) = a.connect(id("alive-user")).await.unwrap();
    let _o1 = Rx::from(_o1);
    let (_t2, _o2) = b.connect(id("doomed")).await.unwrap();
    let _o2 = Rx::from(_o2);
    let tracker = ca.session_tracker();
    assert_eq!(
        tracker
            .get_client_server("doomed")
            .await
            .unwrap()
            .as_deref(),
        Some("b")
    );
    // Node b stops heart-beating (as if killed): its tasks end with its hub.
    drop((b, _o2, _t2, cb));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = a.cluster_stats().await.unwrap().unwrap();
        if stats.nodes == vec!["a"] {
            assert_eq!(stats.total_connections, 1);
            assert_eq!(stats.users, vec!["alive-user"]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node b never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        tracker.get_client_server("doomed").await.unwrap(),
        None,
        "expired"
    );
    let report = pgdn_redis::cleanup_all(&redis.url(), "pgdn:")
        .await
        .unwrap();
    assert_eq!(report.nodes_removed, 1);
    assert!(report.mappings_removed >= 1);
    let again = pgdn_redis::cleanup_all(&redis.url(), "pgdn:")
        .await
        .unwrap();
    assert_eq!((again.nodes_removed, again.mappings_removed), (0, 0));
    assert_eq!(
        tracker
            .get_client_server("alive-user")
            .await
            .unwrap()
            .as_deref(),
        Some("a")
    );
}

#[tokio::test]
async fn redis_restart_fails_publishes_visibly_then_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let (ca, a) = node(&redis, "a").await;
    let (cb, b) = node(&redis, "b").await;
    let (_t, tab) = b.connect(id("u")).await.unwrap();
    let tab = Rx::from(tab);
    a.notify_user("u", MessageType::info(), json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(recv(&tab).await["payload"]["n"], 1);

    redis.kill();
    let err = a
        .notify_user("u", MessageType::info(), json!({"n": 2}))
        .await;
    assert!(err.is_err(), "a publish while Redis is down fails: {err:?}");
    // Local connections are still served.
    assert_eq!(b.connection_count(), 1);

    redis.start_again();
    assert!(ca.wait_ready(WAIT).await && cb.wait_ready(WAIT).await);
    // The node re-registers its sessions in the empty Redis by itself.
    let tracker = ca.session_tracker();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tracker
        .get_client_server("u")
        .await
        .ok()
        .flatten()
        .as_deref()
        != Some("b")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions never re-registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.notify_user("u", MessageType::info(), json!({"n": 3}))
        .await
        .unwrap();
    assert_eq!(recv(&tab).await["payload"]["n"], 3);
}

#[tokio::test]
async fn every_node_cleans_up_periodically_by_itself() {
    let redis = RedisServer::start();
    let mut fast = config();
    fast.cleanup_interval = Duration::from_millis(200);
    let ca = Cluster::connect(&redis.url(), "cleaner", fast)
        .await
        .unwrap();
    let _a = ca.hub_builder().build();
    assert!(ca.wait_subscribed(WAIT).await);
    let (cb, b) = node(&redis, "dies").await;
    let (_t, _o) = b.connect(id("ghost")).await.unwrap();
    drop((b, cb, _t, _o));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let nodes: Vec<String> = redis::cmd("HKEYS")
            .arg("pgdn:{0}:nodes")
            .query_async(&mut conn)
            .await
            .unwrap();
        // The user's map, in whichever partition it hashes to.
        let (_, maps): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg("pgdn:{*}:user:ghost")
            .arg("COUNT")
            .arg(100_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut ghost: Vec<String> = Vec::new();
        for m in maps {
            let fields: Vec<String> = redis::cmd("HKEYS")
                .arg(m)
                .query_async(&mut conn)
                .await
                .unwrap();
            ghost.extend(fields);
        }
        if nodes == vec!["cleaner"] && ghost.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never cleaned: {nodes:?} {ghost:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes Redis reports for every key (`MEMORY USAGE ... SAMPLES 0`).
async fn keys_memory(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
    let mut total = 0;
    for k in keys {
        let n: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&k)
            .arg("SAMPLES")
            .arg(0)
            .query_async(conn)
            .await
            .unwrap();
        total += n.unwrap_or(0);
    }
    total
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_frame_for_many_users_is_stored_once_in_redis() {
    let redis = RedisServer::start();
    let (_ca, a) = node(&redis, "a").await;
    let (_cb, b) = node(&redis, "b").await;
    let (_t, tab) = a.connect(id("user-7")).await.unwrap();
    let tab = Rx::from(tab);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // A message both users got, from which each resumes.
    let start = a
        .notify_users(&["user-7", "user-123"], MessageType::info(), json!({}))
        .await
        .unwrap();
    recv(&tab).await;
    let (keys_before, used_before) = (keys_memory(&mut conn).await, used_memory(&mut conn).await);
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let blob = "x".repeat(100 << 10);
    let big = a
        .notify_users(&users, MessageType::info(), json!({ "blob": blob }))
        .await
        .unwrap();
    assert_eq!(recv(&tab).await["id"], big.id.as_str());
    let keys_added = keys_memory(&mut conn).await - keys_before;
    let used_added = used_memory(&mut conn).await - used_before;
    eprintln!("a 100 KiB frame to 200 users: keys +{keys_added} B, used_memory +{used_added} B");
    // The frame once (100 KiB), plus each user's window entry and each
    // partition's counter, clock and id: about 1 KiB per user.
    assert!(
        keys_added < 400 << 10,
        "stored once: +{keys_added} B in keys (200 copies would be 20 MiB)"
    );
    assert!(used_added < 1 << 20, "used_memory +{used_added} B");
    // Resume on another node still gets the frame, from the one copy.
    let replay = b.replay("user-123", start.id.as_str()).await.unwrap();
    assert!(!replay.gap);
    assert_eq!(replay.frames.len(), 1);
    let frame: Value = serde_json::from_slice(&replay.frames[0].1).unwrap();
    assert_eq!(
        frame["payload"]["blob"].as_str().map(str::len),
        Some(100 << 10)
    );
    let replay = b.replay("user-7", start.id.as_str()).await.unwrap();
    assert_eq!(replay.frames.len(), 1, "user-7's own window");
}

#[tokio::test]
async fn a_huge_users_target_never_blocks_redis() {
    let redis = RedisServer::start();
    let (_ca, a) = node(&redis, "a").await;
    let max = ClusterConfig::default().max_users_per_publish;
    let (_t, tab) = a.connect(id(&format!("user-{}", max - 1))).await.unwrap();
    let tab = Rx::from(tab);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for (k, v) in [
        ("slowlog-log-slower-than", "1000"),
        ("slowlog-max-len", "1000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // Meanwhile, another client PINGs: how long does Redis keep it waiting?
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = tokio::spawn({
        let (stop, client) = (stop.clone(), client.clone());
        async move {
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                // An error (a timeout) counts as waiting that long.
                let _: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            worst
        }
    });
    let users: Vec<String> = (0..50_000).map(|i| format!("user-{i}")).collect();
    let huge = a
        .notify_users(&users, MessageType::info(), json!({"n": 1}))
        .await;
    let emitter = Emitter::connect(&redis.url(), config()).await.unwrap();
    let huge_emitted = emitter.notify_users(&users, "info", json!({"n": 2})).await;
    // A batch with one such item publishes none of them.
    let small = PublishRequest::new(
        Target::user(format!("user-{}", max - 1)),
        MessageType::info(),
    );
    let batch = a
        .publish_batch(vec![
            small,
            PublishRequest::new(
                Target::users(users.iter().map(String::as_str)),
                MessageType::info(),
            ),
        ])
        .await;
    assert!(
        matches!(batch, Err(pgdn_core::Error::InvalidPublish(_))),
        "{batch:?}"
    );
    // The largest `users` target allowed goes through.
    let largest = a
        .notify_users(&users[..max], MessageType::info(), json!({"n": 3}))
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst_ping = pinger.await.unwrap();
    let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let longest_script_us = slow
        .iter()
        .filter_map(|e| match e {
            redis::Value::Array(fields) => match (&fields[2], &fields[3]) {
                (redis::Value::Int(us), redis::Value::Array(args)) => {
                    let cmd = match &args[0] {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b).to_uppercase(),
                        _ => String::new(),
                    };
                    cmd.starts_with("EVAL").then_some(*us)
                }
                _ => None,
            },
            _ => None,
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "50,000 users: {}; {max} users: longest script {longest_script_us} us, worst concurrent PING {worst_ping:?}",
        if huge.is_ok() { "accepted" } else { "refused" }
    );
    assert_eq!(
        recv(&tab).await["id"],
        largest.id.as_str(),
        "nothing else came first"
    );
    let err = huge.expect_err("50,000 users in one publish are refused");
    assert!(matches!(err, pgdn_core::Error::InvalidPublish(_)), "{err}");
    assert!(huge_emitted.is_err(), "the emitter refuses them too");
    assert!(longest_script_us < 50_000, "{longest_script_us} us");
    assert!(worst_ping < Duration::from_millis(100), "{worst_ping:?}");
}
