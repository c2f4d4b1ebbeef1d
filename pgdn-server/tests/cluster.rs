//! Cluster mode with the real binary: several `pgdn-server` processes on
//! one private `redis-server` (started here on a free port by
//! pgdn-testkit), surviving `kill -9` of a node and a Redis restart.

mod common;
mod nodes;
mod spawn;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::WAIT;
use nodes::*;
use pgdn_testkit::RedisServer;
use serde_json::{Value, json};
use spawn::clean_command;

#[tokio::test]
async fn three_nodes_deliver_each_message_once_per_connection() {
    let redis = RedisServer::start();
    let nodes = [
        Node::start(&redis, "n1"),
        Node::start(&redis, "n2"),
        Node::start(&redis, "n3"),
    ];
    let mut alice1 = nodes[0].connect("alice", &["staff"], None).await;
    let mut alice2 = nodes[1].connect("alice", &["staff"], None).await;
    let mut bob = nodes[2].connect("bob", &["staff"], None).await;
    let mut carol = nodes[2].connect("carol", &[], None).await;
    nodes[0]
        .wait_stats("3 nodes with 4 connections", |s| {
            s["total_connections"] == 4 && s["nodes"].as_array().unwrap().len() == 3
        })
        .await;

    // A user with tabs on two nodes, published on a third: one copy per tab.
    nodes[2].publish(user("alice", 1)).await;
    assert_eq!(next_n(&mut alice1).await, 1);
    assert_eq!(next_n(&mut alice2).await, 1);
    // A group reaches its members on every node, once.
    nodes[1]
        .publish(json!({"target":{"group":"staff"},"type":"info","payload":{"n":2}}))
        .await;
    for c in [&mut alice1, &mut alice2, &mut bob] {
        assert_eq!(next_n(c).await, 2);
    }
    // A broadcast skips the excluded user on every node.
    nodes[0]
        .publish(json!({"target":{"broadcast":{"exclude_users":["alice"]}},"type":"info","payload":{"n":3}}))
        .await;
    assert_eq!(next_n(&mut bob).await, 3);
    assert_eq!(next_n(&mut carol).await, 3);
    // Markers published after everything come next: no extra copies.
    nodes[0]
        .publish(json!({"target":{"broadcast":{}},"type":"info","payload":{"n":4}}))
        .await;
    for c in [&mut alice1, &mut alice2, &mut bob, &mut carol] {
        assert_eq!(next_n(c).await, 4);
    }
    let stats = nodes[1].stats().await;
    assert_eq!(stats["total_users"], 3);
    assert_eq!(stats["users"], json!(["alice", "bob", "carol"]));
    assert_eq!(stats["nodes"], json!(["n1", "n2", "n3"]));
    assert_eq!(stats["node"]["total_connections"], 1, "n2's own numbers");
}

#[tokio::test]
async fn a_killed_node_expires_is_cleaned_up_and_the_others_go_on() {
    let redis = RedisServer::start();
    let mut nodes = vec![
        Node::start(&redis, "k1"),
        Node::start(&redis, "k2"),
        Node::start(&redis, "k3"),
    ];
    let mut alice = nodes[0].connect("alice", &[], None).await;
    let _doomed1 = nodes[1].connect("bob", &[], None).await;
    let _doomed2 = nodes[1].connect("carol", &[], None).await;
    nodes[0]
        .wait_stats("3 connections", |s| s["total_connections"] == 3)
        .await;

    nodes[1].kill();
    let survivor = &nodes[0];
    let stats = survivor
        .wait_stats("the dead node's connections dropped", |s| {
            s["nodes"] == json!(["k1", "k3"])
        })
        .await;
    assert_eq!(stats["total_connections"], 1);
    assert_eq!(stats["users"], json!(["alice"]));

    // The cleanup task of the command line removes what the dead node left.
    let out = clean_command()
        .args(["cleanup", "--redis-url", &redis.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("1 dead nodes removed"), "{report}");
    assert!(report.contains("2 stale mappings removed"), "{report}");

    // The others go on delivering.
    nodes[2].publish(user("alice", 7)).await;
    assert_eq!(next_n(&mut alice).await, 7);
    nodes.remove(1);
}

#[tokio::test]
async fn a_redis_restart_fails_publishes_visibly_then_delivery_resumes() {
    let mut redis = RedisServer::start();
    let nodes = [Node::start(&redis, "r1"), Node::start(&redis, "r2")];
    let mut alice = nodes[1].connect("alice", &[], None).await;
    nodes[0]
        .wait_stats("alice registered", |s| s["total_connections"] == 1)
        .await;
    nodes[0].publish(user("alice", 1)).await;
    assert_eq!(next_n(&mut alice).await, 1);

    redis.kill();
    let (status, reply) = nodes[0].post(user("alice", 2)).await;
    assert_eq!(status, 503, "{reply}");
    assert!(reply["error"].is_string());
    // The node keeps serving its local connections.
    alice.roundtrip("still-served").await;
    let health = reqwest::get(format!("http://{}/healthz", nodes[1].addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    redis.start_again();
    // No node restart: they reconnect and register their sessions again.
    nodes[0]
        .wait_stats("sessions re-registered", |s| {
            s["total_connections"] == 1 && s["nodes"].as_array().map(|n| n.len()) == Some(2)
        })
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = nodes[0].post(user("alice", 3)).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next_n(&mut alice).await, 3);
}

#[tokio::test]
async fn a_subscriber_that_loses_its_node_resumes_on_another_without_loss() {
    let redis = RedisServer::start();
    let mut n1 = Node::start(&redis, "s1");
    let n2 = Node::start(&redis, "s2");
    let mut c = n1.connect("alice", &[], None).await;
    n2.wait_stats("alice registered", |s| s["total_connections"] == 1)
        .await;
    let mut last = String::new();
    for n in 0..3 {
        n2.publish(user("alice", n)).await;
        let v = c.next().await;
        assert_eq!(v["payload"]["n"], n);
        last = v["id"].as_str().unwrap().to_string();
    }
    n1.kill();
    drop(c);
    for n in 3..8 {
        n2.publish(user("alice", n)).await;
    }
    let mut c = n2.connect("alice", &[], Some(&last)).await;
    for n in 3..8 {
        assert_eq!(next_n(&mut c).await, n, "replayed in order");
    }
    n2.publish(user("alice", 8)).await;
    assert_eq!(next_n(&mut c).await, 8, "then live, nothing twice");
}

/// Sends `SPUBLISH channel payload` (nodes subscribe with sharded pub/sub)
/// to the Redis on `port` over a plain TCP connection (any bytes, not only
/// UTF-8); returns the receivers count.
fn redis_publish(port: u16, channel: &str, payload: &[u8]) -> i64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut cmd = Vec::new();
    cmd.extend_from_slice(b"*3\r\n$8\r\nSPUBLISH\r\n");
    for arg in [channel.as_bytes(), payload] {
        cmd.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        cmd.extend_from_slice(arg);
        cmd.extend_from_slice(b"\r\n");
    }
    s.write_all(&cmd).unwrap();
    let mut reply = [0u8; 32];
    let n = s.read(&mut reply).unwrap();
    let reply = std::str::from_utf8(&reply[..n]).unwrap();
    reply
        .trim_start_matches(':')
        .trim_end()
        .parse()
        .unwrap_or_else(|_| panic!("SPUBLISH answered {reply:?}"))
}

#[tokio::test]
async fn bad_bytes_on_the_cluster_channels_are_dropped_and_counted() {
    let redis = RedisServer::start();
    let nodes = [Node::start(&redis, "g1"), Node::start(&redis, "g2")];
    let mut alice = nodes[0].connect("alice", &["staff"], None).await;
    let mut bob = nodes[1].connect("bob", &["staff"], None).await;
    nodes[0]
        .wait_stats("2 connections", |s| s["total_connections"] == 2)
        .await;
    let ts = "2026-11-27T03:30:16.123Z";
    let garbage: [&[u8]; 7] = [
        // Not UTF-8 at all.
        b"\xff\xfe\x00\x01garbage",
        // A well-formed header, a frame that is not UTF-8.
        b"1:0\nx\nbad-1\n{\"broadcast\":{}}\n{\"id\":\"bad-1\",\"type\":\"info\",\"x\":\"\xff\xfe\"}",
        // UTF-8, but not a message.
        b"hello",
        // A header, then a frame that is not JSON.
        b"2:0\nx\nbad-2\n{\"broadcast\":{}}\nnot json",
        // A protocol frame smuggled as a notification.
        b"3:0\nx\nbad-3\n{\"user\":\"alice\"}\n{\"type\":\"connection\",\"id\":\"bad-3\"}",
        // A notification whose id is not the header's.
        format!("4:0\nx\nbad-4\n{{\"group\":\"staff\"}}\n{{\"id\":\"other\",\"type\":\"info\",\"payload\":{{}},\"timestamp\":\"{ts}\"}}").leak().as_bytes(),
        // A bad target.
        format!("5:0\nx\nbad-5\n{{\"users\":[]}}\n{{\"id\":\"bad-5\",\"type\":\"info\",\"payload\":{{}},\"timestamp\":\"{ts}\"}}").leak().as_bytes(),
    ];
    for payload in garbage {
        // Every node listens to every partition's broadcast channel, and
        // to its own channel in every partition.
        assert_eq!(redis_publish(redis.port(), "pgdn:{0}:all", payload), 2);
        assert_eq!(redis_publish(redis.port(), "pgdn:{5}:node:g1", payload), 1);
    }
    // Everyone is still connected, and the next thing each gets is the
    // next real message.
    nodes[1]
        .publish(json!({"target":{"group":"staff"},"type":"info","payload":{"n":1}}))
        .await;
    assert_eq!(next_n(&mut alice).await, 1);
    assert_eq!(next_n(&mut bob).await, 1);
    alice.roundtrip("alive").await;
    bob.roundtrip("alive").await;
    let g1 = nodes[0].stats().await;
    assert_eq!(g1["node"]["messages_dropped_invalid"], 14, "{g1}");
    assert_eq!(g1["node"]["disconnects"]["transport_error"], 0, "{g1}");
    let g2 = nodes[1].stats().await;
    assert_eq!(g2["node"]["messages_dropped_invalid"], 7, "{g2}");
    let metrics = reqwest::get(format!("http://{}/metrics", nodes[0].addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pgdn_messages_dropped_invalid_total 14"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_users_target_longer_than_one_redis_call_allows_is_refused() {
    let redis = RedisServer::start();
    let node = Node::start(&redis, "l1");
    let mut last = node.connect("user-999", &[], None).await;
    node.wait_stats("connected", |s| s["total_connections"] == 1)
        .await;
    let users: Vec<String> = (0..1001).map(|i| format!("user-{i}")).collect();
    let (status, reply) = node
        .post(json!({"target":{"users":users},"type":"info","payload":{"n":0}}))
        .await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("1000"), "{reply}");
    node.publish(json!({"target":{"users":&users[..1000]},"type":"info","payload":{"n":1}}))
        .await;
    assert_eq!(next_n(&mut last).await, 1);
}

/// Redis is killed and restarted empty, then stalled (SIGSTOP) for twice
/// the node TTL, while a publisher sends every 50 ms through one node to a
/// user connected to both: every answer is 200 or 503, and every 200 is
/// delivered on both nodes. (Before, a node answered 200 after a restart
/// as soon as it had resubscribed, before its sessions were registered
/// again, and after a stall until its next heartbeat tick: those messages
/// were routed to nobody.)
#[tokio::test]
async fn nothing_accepted_is_lost_across_a_redis_restart_and_a_stall() {
    let mut redis = RedisServer::start();
    let ttl = ["--node-ttl", "3s"];
    let a = Node::launch(&redis.url(), "fa", &ttl);
    let b = Node::launch(&redis.url(), "fb", &ttl);
    a.ready().await;
    b.ready().await;
    let mut on_a = a.connect("alice", &[], None).await;
    let mut on_b = b.connect("alice", &[], None).await;
    a.wait_stats("alice registered twice", |s| s["total_connections"] == 2)
        .await;

    let (tx, mut statuses) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (hold, held) = tokio::sync::watch::channel(false);
    let publisher = steady_publisher(a.addr.clone(), tx, stopped, held);
    // Before each fault the publisher holds for a moment and both
    // subscribers catch up, so that no message is in flight at the
    // instant Redis dies: one that Redis has answered but not yet pushed
    // to a node dies with it (pub/sub has no redelivery, and a Redis
    // without persistence keeps no history across a restart).
    let mut seen = [BTreeSet::new(), BTreeSet::new()];
    let subs = [&mut on_a, &mut on_b];
    quiesce(&hold, &mut statuses, &b, subs, &mut seen, 2_000_000).await;

    // kill -9, then a restart with nothing in it.
    redis.kill();
    hold.send_replace(false);
    wait_status(&mut statuses, 503).await;
    redis.start_again();
    wait_status(&mut statuses, 200).await;

    // A stall longer than the node TTL: Redis expires every mapping.
    let subs = [&mut on_a, &mut on_b];
    quiesce(&hold, &mut statuses, &b, subs, &mut seen, 2_000_001).await;
    redis.pause();
    hold.send_replace(false);
    wait_status(&mut statuses, 503).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    redis.resume();
    wait_status(&mut statuses, 200).await;
    for _ in 0..5 {
        wait_status(&mut statuses, 200).await;
    }

    let accepted =
        check_every_accepted_delivered(stop, publisher, &a, &mut [&mut on_a, &mut on_b], seen)
            .await;
    assert!(accepted >= 8, "only {accepted} publishes were accepted");
}

/// A TCP proxy to Redis whose existing connections can be made to stop
/// answering (everything sent through them is swallowed, nothing is
/// closed) while new connections still work: a half-open link, as a
/// crashed middlebox or a failed-over VIP leaves behind.
struct BlackholeProxy {
    port: u16,
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

impl BlackholeProxy {
    async fn start(upstream: u16) -> BlackholeProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let current = epoch.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                for (mut from, mut to) in [(dr, uw), (ur, dw)].map(|(r, w)| {
                    (
                        Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(w) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    )
                }) {
                    let current = current.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if current.load(Ordering::SeqCst) != born {
                                continue; // swallowed
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        BlackholeProxy { port, epoch }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Every connection open now stops answering; later ones work.
    fn blackhole(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The node's connections to Redis go half-open (they stay open but
/// nothing comes back): the node notices with its PINGs, opens new ones,
/// resubscribes and serves again within 30 s, and nothing it answered 200
/// meanwhile is lost. (Before, it stayed at 503 for good.)
#[tokio::test]
async fn a_half_open_redis_connection_is_replaced_and_the_node_serves_again() {
    let redis = RedisServer::start();
    let proxy = BlackholeProxy::start(redis.port()).await;
    let node = Node::launch(&proxy.url(), "ho", &["--node-ttl", "3s"]);
    node.ready().await;
    let mut alice = node.connect("alice", &[], None).await;
    node.wait_stats("alice registered", |s| s["total_connections"] == 1)
        .await;

    node.publish(user("alice", 1_000_000)).await;
    assert_eq!(next_n(&mut alice).await, 1_000_000);

    // Nothing is in flight when the link goes half-open (a message Redis
    // has sent into a dead link is lost with it: pub/sub has no redelivery).
    proxy.blackhole();
    let (tx, mut statuses) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (_hold, held) = tokio::sync::watch::channel(false);
    let publisher = steady_publisher(node.addr.clone(), tx, stopped, held);
    let cut = tokio::time::Instant::now();
    wait_status(&mut statuses, 503).await;
    wait_status(&mut statuses, 200).await;
    let back_after = cut.elapsed();
    assert!(
        back_after < Duration::from_secs(30),
        "served again only after {back_after:?}"
    );
    for _ in 0..5 {
        wait_status(&mut statuses, 200).await;
    }
    check_every_accepted_delivered(stop, publisher, &node, &mut [&mut alice], []).await;
    assert!(node.logged("PING"), "the node says why it reconnected");
}

/// A node started while Redis is down does not exit: it retries with
/// backoff and logs why, serves `/healthz`, and answers 503 on `/readyz`
/// and on publishes until Redis is there; then it is ready and delivers.
#[tokio::test]
async fn a_node_started_before_redis_waits_for_it() {
    let mut redis = RedisServer::not_started();
    let mut node = Node::launch(&redis.url(), "early", &["--node-ttl", "3s"]);
    assert_eq!(node.get("/healthz").await, (200, "ok".to_string()));
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let why: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(why["error"], "redis unreachable", "{body}");
    let (status, reply) = node.post(user("alice", 0)).await;
    assert_eq!(status, 503, "{reply}");
    // A subscriber may already connect: its node serves it locally.
    let mut alice = node.connect("alice", &[], None).await;
    assert!(node.logged("redis is unreachable"), "{:?}", node.log);

    redis.start_again();
    node.ready().await;
    node.publish(user("alice", 1)).await;
    assert_eq!(next_n(&mut alice).await, 1);
    assert!(node.child.try_wait().unwrap().is_none(), "the node exited");
}

/// Presence over HTTP is cluster-wide: a user with tabs on two nodes counts
/// once with both connections, seen from a third node; after a `kill -9`
/// of one of them its connection drops out within the node TTL.
#[tokio::test]
async fn presence_is_cluster_wide_and_forgets_a_killed_node() {
    let redis = RedisServer::start();
    let mut nodes = vec![
        Node::start(&redis, "p1"),
        Node::start(&redis, "p2"),
        Node::start(&redis, "p3"),
    ];
    let _a1 = nodes[0].connect("alice", &["ops"], None).await;
    let _a2 = nodes[1].connect("alice", &["ops"], None).await;
    let _b = nodes[1].connect("bob", &["ops"], None).await;
    nodes[2]
        .wait_stats("3 connections", |s| s["total_connections"] == 3)
        .await;
    let (status, body) = nodes[2].get_with_key("/api/v1/presence/alice").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["online"].clone(), body["connections"].clone()),
        (json!(true), json!(2))
    );
    let (_, page) = nodes[2].get_with_key("/api/v1/groups/ops/presence").await;
    assert_eq!(
        page["members"],
        json!([{"user":"alice","connections":2},{"user":"bob","connections":1}])
    );
    nodes[0].kill();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = nodes[2].get_with_key("/api/v1/presence/alice").await;
        if body["connections"] == 1 {
            assert_eq!(body["online"], true);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dropped: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, page) = nodes[2].get_with_key("/api/v1/groups/ops/presence").await;
    assert_eq!(page["members"][0], json!({"user":"alice","connections":1}));
    nodes.remove(0);
}
