//! Cluster mode with the real binary: several `pgdn-server` processes on
//! one private `redis-server` (started here on a free port by
//! pgdn-testkit), surviving `kill -9` of a node and a Redis restart.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Client, WAIT};
use pgdn_server::JwtAuthenticator;
use pgdn_testkit::RedisServer;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_pgdn-server");
const SECRET: &str = "cluster-secret-of-at-least-32-bytes";
const KEY: &str = "cluster-publish-key";

/// One node: the real binary in cluster mode.
struct Node {
    child: Child,
    addr: String,
}

impl Node {
    fn start(redis: &RedisServer, id: &str) -> Node {
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("PGDN_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args([
                "--addr",
                "127.0.0.1:0",
                "--redis-url",
                &redis.url(),
                "--node-id",
                id,
            ])
            .args([
                "--jwt-secret",
                SECRET,
                "--publish-key",
                KEY,
                "--node-ttl",
                "1s",
            ])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgdn-server starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("pgdn-server listening on http://") {
                addr = Some(a.to_string());
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Node {
            child,
            addr: addr.expect("the node prints its address"),
        }
    }

    /// `kill -9`.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn connect(&self, user: &str, groups: &[&str], since: Option<&str>) -> Client {
        let token = JwtAuthenticator::new(SECRET)
            .issue(user, groups, Duration::from_secs(600))
            .unwrap();
        let mut url = format!("ws://{}/ws?token={token}", self.addr);
        if let Some(s) = since {
            url.push_str(&format!("&since={s}"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client::after_upgrade(ws).await
    }

    async fn post(&self, body: Value) -> (u16, Value) {
        let res = reqwest::Client::new()
            .post(format!("http://{}/api/v1/publish", self.addr))
            .bearer_auth(KEY)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json().await.unwrap())
    }

    async fn publish(&self, body: Value) -> String {
        let (status, reply) = self.post(body).await;
        assert_eq!(status, 200, "{reply}");
        reply["id"].as_str().unwrap().to_string()
    }

    async fn stats(&self) -> Value {
        reqwest::Client::new()
            .get(format!("http://{}/api/v1/stats", self.addr))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the cluster stats until `ok` holds (the state lives in Redis
    /// and changes with TTLs, so there is no event to wait on).
    async fn wait_stats(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = self.stats().await;
            if ok(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {what}: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The next notification's payload field `n`.
async fn next_n(c: &mut Client) -> u64 {
    let v = c.next().await;
    v["payload"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("not a numbered notification: {v}"))
}

fn user(u: &str, n: u64) -> Value {
    json!({"target":{"user":u},"type":"info","payload":{"n":n}})
}

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
    let out = Command::new(BIN)
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

/// Sends `PUBLISH channel payload` to the Redis on `port` over a plain TCP
/// connection (any bytes, not only UTF-8); returns the receivers count.
fn redis_publish(port: u16, channel: &str, payload: &[u8]) -> i64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut cmd = Vec::new();
    cmd.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
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
        .unwrap_or_else(|_| panic!("PUBLISH answered {reply:?}"))
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
        b"1\nx\nbad-1\n{\"broadcast\":{}}\n{\"id\":\"bad-1\",\"type\":\"info\",\"x\":\"\xff\xfe\"}",
        // UTF-8, but not a message.
        b"hello",
        // A header, then a frame that is not JSON.
        b"2\nx\nbad-2\n{\"broadcast\":{}}\nnot json",
        // A protocol frame smuggled as a notification.
        b"3\nx\nbad-3\n{\"user\":\"alice\"}\n{\"type\":\"connection\",\"id\":\"bad-3\"}",
        // A notification whose id is not the header's.
        format!("4\nx\nbad-4\n{{\"group\":\"staff\"}}\n{{\"id\":\"other\",\"type\":\"info\",\"payload\":{{}},\"timestamp\":\"{ts}\"}}").leak().as_bytes(),
        // A bad target.
        format!("5\nx\nbad-5\n{{\"users\":[]}}\n{{\"id\":\"bad-5\",\"type\":\"info\",\"payload\":{{}},\"timestamp\":\"{ts}\"}}").leak().as_bytes(),
    ];
    for payload in garbage {
        assert_eq!(redis_publish(redis.port(), "pgdn:all", payload), 2);
        assert_eq!(redis_publish(redis.port(), "pgdn:node:g1", payload), 1);
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
