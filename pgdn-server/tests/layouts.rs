//! Cluster mode with the real binary on every Redis layout pgdn runs on
//! (`--redis-mode single|shards|cluster|sentinel`, each started by
//! pgdn-testkit from `redis-server` on free ports): the same guarantees on
//! each, messages routed only to the nodes that need them (proved by each
//! node's `/metrics`), and nothing accepted lost when a Redis Cluster
//! master or a Sentinel master fails over.

mod common;
mod nodes;
mod spawn;

use std::collections::BTreeSet;
use std::time::Duration;

use nodes::*;
use pgdn_testkit::{RedisCluster, RedisDeployment, RedisSentinel};
use serde_json::json;

/// Runs each listed test on every layout.
macro_rules! on_every_layout {
    ($($test:ident),* $(,)?) => {
        on_every_layout!(@mode single $($test),*);
        on_every_layout!(@mode shards $($test),*);
        on_every_layout!(@mode cluster $($test),*);
        on_every_layout!(@mode sentinel $($test),*);
    };
    (@mode $mode:ident $($test:ident),*) => {
        mod $mode {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(pgdn_testkit::RedisDeployment::start(stringify!($mode))).await
                }
            )*
        }
    };
}

on_every_layout!(
    three_nodes_deliver_each_message_once_per_connection,
    a_subscriber_that_loses_its_node_resumes_on_another_without_loss,
);

async fn three_nodes_deliver_each_message_once_per_connection(dep: RedisDeployment) {
    let ttl = ["--node-ttl", "1s"];
    let nodes = [
        Node::start_on(&dep, "n1", &ttl),
        Node::start_on(&dep, "n2", &ttl),
        Node::start_on(&dep, "n3", &ttl),
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
    nodes[2].publish(user("alice", 1)).await;
    assert_eq!(next_n(&mut alice1).await, 1);
    assert_eq!(next_n(&mut alice2).await, 1);
    nodes[1]
        .publish(json!({"target":{"group":"staff"},"type":"info","payload":{"n":2}}))
        .await;
    for c in [&mut alice1, &mut alice2, &mut bob] {
        assert_eq!(next_n(c).await, 2);
    }
    nodes[0]
        .publish(json!({"target":{"broadcast":{"exclude_users":["alice"]}},"type":"info","payload":{"n":3}}))
        .await;
    assert_eq!(next_n(&mut bob).await, 3);
    assert_eq!(next_n(&mut carol).await, 3);
    // Users in many partitions in one publish: each tab once.
    let many: Vec<String> = (0..40)
        .map(|i| format!("x{i}"))
        .chain(["alice".into(), "carol".into()])
        .collect();
    nodes[1]
        .publish(json!({"target":{"users":many},"type":"info","payload":{"n":4}}))
        .await;
    for c in [&mut alice1, &mut alice2, &mut carol] {
        assert_eq!(next_n(c).await, 4);
    }
    nodes[0]
        .publish(json!({"target":{"broadcast":{}},"type":"info","payload":{"n":5}}))
        .await;
    for c in [&mut alice1, &mut alice2, &mut bob, &mut carol] {
        assert_eq!(next_n(c).await, 5, "no extra copies before");
    }
    let stats = nodes[1].stats().await;
    assert_eq!(stats["users"], json!(["alice", "bob", "carol"]));
    assert_eq!(stats["nodes"], json!(["n1", "n2", "n3"]));
}

async fn a_subscriber_that_loses_its_node_resumes_on_another_without_loss(dep: RedisDeployment) {
    let ttl = ["--node-ttl", "1s"];
    let mut n1 = Node::start_on(&dep, "s1", &ttl);
    let n2 = Node::start_on(&dep, "s2", &ttl);
    let mut c = n1.connect("alice", &["staff"], None).await;
    n2.wait_stats("alice registered", |s| s["total_connections"] == 1)
        .await;
    n2.publish(user("alice", 0)).await;
    assert_eq!(next_n(&mut c).await, 0);
    // The last thing the client saw is a group message: its id is kept in
    // another partition than alice's window, and still places the resume.
    n2.publish(json!({"target":{"group":"staff"},"type":"info","payload":{"n":1}}))
        .await;
    let v = c.next().await;
    assert_eq!(v["payload"]["n"], 1);
    let last = v["id"].as_str().unwrap().to_string();
    n1.kill();
    drop(c);
    for n in 2..7 {
        n2.publish(user("alice", n)).await;
    }
    let mut c = n2.connect("alice", &["staff"], Some(&last)).await;
    for n in 2..7 {
        assert_eq!(next_n(&mut c).await, n, "replayed in order");
    }
    n2.publish(user("alice", 7)).await;
    assert_eq!(next_n(&mut c).await, 7, "then live, nothing twice");
}

/// Messages received by a node, by target kind, from its `/metrics`.
async fn received(node: &Node) -> [u64; 3] {
    let mut out = [0; 3];
    for (i, kind) in ["user", "group", "broadcast"].iter().enumerate() {
        out[i] = node
            .metric(&format!(
                "pgdn_broker_messages_received_total{{target=\"{kind}\"}}"
            ))
            .await;
    }
    out
}

/// Three pgdn nodes on a Redis Cluster of three masters: a user message
/// reaches only the nodes holding that user, a group message only the
/// nodes with members, a broadcast each node once; each node's counters
/// say so.
#[tokio::test]
async fn on_redis_cluster_each_message_reaches_only_the_nodes_that_need_it() {
    let dep = RedisDeployment::Cluster(RedisCluster::start(3, 0));
    let ttl = ["--node-ttl", "1s"];
    let nodes = [
        Node::start_on(&dep, "r1", &ttl),
        Node::start_on(&dep, "r2", &ttl),
        Node::start_on(&dep, "r3", &ttl),
    ];
    // alice on r1 only; the group "ops" on r1 and r2; r3 holds carol.
    let mut alice = nodes[0].connect("alice", &["ops"], None).await;
    let mut bob = nodes[1].connect("bob", &["ops"], None).await;
    let mut carol = nodes[2].connect("carol", &[], None).await;
    nodes[0]
        .wait_stats("3 connections", |s| s["total_connections"] == 3)
        .await;
    let mut before = Vec::new();
    for n in &nodes {
        before.push(received(n).await);
    }
    const M: u64 = 10;
    for i in 0..M {
        // Published through the node that holds no one concerned.
        nodes[2].publish(user("alice", i)).await;
        nodes[2]
            .publish(json!({"target":{"group":"ops"},"type":"info","payload":{"n":i}}))
            .await;
        nodes[1]
            .publish(json!({"target":{"broadcast":{}},"type":"info","payload":{"n":i}}))
            .await;
    }
    // Every subscriber got what it should, and nothing else.
    let mut got = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
    for _ in 0..3 * M {
        got[0].insert(alice.next().await["id"].to_string());
    }
    for _ in 0..2 * M {
        got[1].insert(bob.next().await["id"].to_string());
    }
    for _ in 0..M {
        got[2].insert(carol.next().await["id"].to_string());
    }
    assert_eq!(
        got.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        [3 * M as usize, 2 * M as usize, M as usize]
    );
    let ideal = [[M, M, M], [0, M, M], [0, 0, M]];
    for (i, n) in nodes.iter().enumerate() {
        let after = received(n).await;
        let delta: Vec<u64> = (0..3).map(|k| after[k] - before[i][k]).collect();
        assert_eq!(
            delta,
            ideal[i],
            "node r{}: [user, group, broadcast] messages received",
            i + 1
        );
    }
}

/// The partition (default 128) of a name: the layout's FNV-1a, as
/// pgdn-redis hashes it (its unit tests pin the values).
fn partition(name: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 128) as u16
}

/// The Redis Cluster slot of `user`'s partition.
fn slot_of(cluster: &RedisCluster, user: &str) -> u16 {
    pgdn_testkit::redis_cli(
        cluster.master_ports()[0],
        &["CLUSTER", "KEYSLOT", &format!("{{{}}}", partition(user))],
    )
    .parse()
    .unwrap()
}

/// Two nodes (`ids`) on the Redis at `url` in `mode`, node TTL 3 s, ready,
/// with alice connected to both and registered: the set-up of the fault
/// tests below.
async fn alice_on_two_nodes(
    url: &str,
    mode: &str,
    ids: [&str; 2],
) -> (Node, Node, common::Client, common::Client) {
    let args = ["--redis-mode", mode, "--node-ttl", "3s"];
    let a = Node::launch(url, ids[0], &args);
    let b = Node::launch(url, ids[1], &args);
    a.ready().await;
    b.ready().await;
    let on_a = a.connect("alice", &[], None).await;
    let on_b = b.connect("alice", &[], None).await;
    a.wait_stats("alice registered twice", |s| s["total_connections"] == 2)
        .await;
    (a, b, on_a, on_b)
}

/// A steady publisher sends to alice through node A every 50 ms while the
/// master holding alice's partition is killed (`kill -9`) and its replica
/// takes over: every answer is 200 or 503, every 200 is delivered on both
/// nodes, and delivery resumes after the failover.
#[tokio::test]
async fn a_redis_cluster_master_failover_loses_nothing_accepted() {
    let mut cluster = RedisCluster::start(3, 1);
    let slot = slot_of(&cluster, "alice");
    let victim = cluster.master_of_slot(slot);
    // Seed the nodes with a master that survives.
    let seed = cluster
        .master_ports()
        .into_iter()
        .find(|p| *p != victim)
        .unwrap();
    let url = format!("redis://127.0.0.1:{seed}");
    let (a, b, mut on_a, mut on_b) = alice_on_two_nodes(&url, "cluster", ["fa", "fb"]).await;
    let cluster = failover_loses_nothing(&a, &b, &mut on_a, &mut on_b, move || {
        cluster.kill_master(victim);
        let new = cluster.wait_failover(victim, Duration::from_secs(30));
        assert_ne!(new, victim);
        cluster
    })
    .await;
    drop(cluster);
}

/// Redis Cluster moves the slot of alice's partition (with its keys) to
/// another master while a steady publisher sends to her: nodes follow the
/// slot (`MOVED`, the server's `sunsubscribe`, the slot check), subscribe
/// and register on the new master, and every publish answered 200 is
/// delivered on both nodes.
#[tokio::test]
async fn a_redis_cluster_slot_move_is_followed_and_loses_nothing_accepted() {
    let cluster = RedisCluster::start(3, 0);
    let slot = slot_of(&cluster, "alice");
    let from = cluster.master_of_slot(slot);
    let to = cluster
        .master_ports()
        .into_iter()
        .find(|p| *p != from)
        .unwrap();
    let url = cluster.urls().join(",");
    let (a, b, mut on_a, mut on_b) = alice_on_two_nodes(&url, "cluster", ["ma", "mb"]).await;
    let before = a.get("/metrics").await.1;
    let cluster = failover_loses_nothing(&a, &b, &mut on_a, &mut on_b, move || {
        cluster.migrate_slot(slot, to);
        cluster
    })
    .await;
    // Her history moved with the slot: a resume still finds it.
    let last = a.publish(user("alice", 42)).await;
    assert_eq!(next_n(&mut on_a).await, 42);
    assert_eq!(next_n(&mut on_b).await, 42);
    a.publish(user("alice", 43)).await;
    let mut again = b.connect("alice", &[], Some(&last)).await;
    assert_eq!(next_n(&mut again).await, 43);
    assert!(before.contains("pgdn_ready 1"));
    drop(cluster);
}

/// The same through a Sentinel failover.
#[tokio::test]
async fn a_sentinel_failover_loses_nothing_accepted() {
    let mut sentinel = RedisSentinel::start();
    let url = sentinel.sentinel_urls().join(",");
    let (a, b, mut on_a, mut on_b) = alice_on_two_nodes(&url, "sentinel", ["sa", "sb"]).await;
    let old = sentinel.master_port();
    let sentinel = failover_loses_nothing(&a, &b, &mut on_a, &mut on_b, move || {
        sentinel.kill_master();
        let new = sentinel.wait_failover(Duration::from_secs(30));
        assert_ne!(new, old);
        sentinel
    })
    .await;
    drop(sentinel);
}

/// Runs a steady publisher through `a` to alice (subscribed on `a` and
/// `b`), quiesces, makes the fault (`fault` kills the master and waits for
/// the failover, on a thread of its own; it hands back what it owns),
/// waits for a 503, then for 200s again, and checks that every 200
/// reached both subscribers.
async fn failover_loses_nothing<T: Send + 'static>(
    a: &Node,
    b: &Node,
    on_a: &mut common::Client,
    on_b: &mut common::Client,
    fault: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, mut statuses) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (hold, held) = tokio::sync::watch::channel(false);
    let publisher = steady_publisher(a.addr.clone(), tx, stopped, held);
    let mut seen = [BTreeSet::new(), BTreeSet::new()];
    quiesce(
        &hold,
        &mut statuses,
        b,
        [&mut *on_a, &mut *on_b],
        &mut seen,
        2_000_000,
    )
    .await;
    let fault = tokio::task::spawn_blocking(fault);
    hold.send_replace(false);
    wait_status(&mut statuses, 503).await;
    let owned = fault.await.unwrap();
    wait_status(&mut statuses, 200).await;
    for _ in 0..5 {
        wait_status(&mut statuses, 200).await;
    }
    let accepted =
        check_every_accepted_delivered(stop, publisher, a, &mut [on_a, on_b], seen).await;
    // One before the fault, six after it at least.
    assert!(accepted >= 7, "only {accepted} publishes were accepted");
    owned
}
