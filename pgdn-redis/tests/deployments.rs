//! The cluster's guarantees on every Redis layout pgdn runs on (the
//! functional ones; `tests/cluster.rs` keeps the faults and the Redis
//! internals, on one Redis): one Redis,
//! independent shards, Redis Cluster (sharded pub/sub) and Sentinel, each
//! started by pgdn-testkit from `redis-server` on free ports. Each test
//! runs once per layout (`single::`, `shards::`, `cluster::`,
//! `sentinel::`).

use pgdn_core::{MessageId, MessageType, PublishRequest, Target};
use pgdn_redis::Emitter;
use pgdn_testkit::RedisDeployment;
use serde_json::{Value, json};

mod common;

use common::*;

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
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(pgdn_testkit::RedisDeployment::start(stringify!($mode))).await
                }
            )*
        }
    };
}

on_every_layout!(
    user_group_and_broadcast_messages_reach_every_node_exactly_once,
    a_users_tabs_on_different_nodes_see_one_order,
    resume_works_on_another_node_from_any_id,
    ids_are_deduplicated_across_nodes_partitions_and_the_emitter,
    presence_and_lifecycle_events_are_cluster_wide,
);

async fn user_group_and_broadcast_messages_reach_every_node_exactly_once(dep: RedisDeployment) {
    let (_ca, a) = node_on(&dep, "a").await;
    let (_cb, b) = node_on(&dep, "b").await;
    let (_cc, c) = node_on(&dep, "c").await;
    let (_t1, tab_a) = a.connect(id("alice")).await.unwrap();
    let tab_a = Rx::from(tab_a);
    let (_t2, tab_b) = b.connect(id("alice")).await.unwrap();
    let tab_b = Rx::from(tab_b);
    let (_t3, bob_c) = c.connect(id("bob")).await.unwrap();
    let bob_c = Rx::from(bob_c);

    // A user with tabs on two nodes: one copy per tab, published from a
    // third node.
    let r = c
        .notify_user("alice", MessageType::info(), json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(r.delivered, None, "unknown in cluster mode");
    for tab in [&tab_a, &tab_b] {
        let n = recv(tab).await;
        assert_eq!(
            (n["payload"]["n"].as_u64(), n["user_id"].as_str()),
            (Some(1), Some("alice"))
        );
    }
    nothing_else(&c, &[&bob_c], "bob").await;
    a.notify_group("staff", MessageType::warning(), json!({"n": 2}))
        .await
        .unwrap();
    for o in [&tab_a, &tab_b, &bob_c] {
        assert_eq!(recv(o).await["payload"]["n"], 2);
    }
    b.broadcast(MessageType::success(), json!({"n": 3}), &["bob"])
        .await
        .unwrap();
    for o in [&tab_a, &tab_b] {
        assert_eq!(recv(o).await["payload"]["n"], 3);
    }
    // Users in many partitions, in one publish: each tab once.
    let many: Vec<String> = (0..50)
        .map(|i| format!("x{i}"))
        .chain(["alice".into(), "bob".into()])
        .collect();
    a.notify_users(&many, MessageType::info(), json!({"n": 4}))
        .await
        .unwrap();
    for o in [&tab_a, &tab_b, &bob_c] {
        assert_eq!(recv(o).await["payload"]["n"], 4);
    }
    nothing_else(&a, &[&tab_a, &tab_b], "alice").await;
    nothing_else(&c, &[&bob_c], "bob").await;

    let stats = a.cluster_stats().await.unwrap().unwrap();
    assert_eq!(stats.nodes, vec!["a", "b", "c"]);
    assert_eq!((stats.total_users, stats.total_connections), (2, 3));
    assert_eq!(stats.groups, vec!["staff"]);
}

async fn a_users_tabs_on_different_nodes_see_one_order(dep: RedisDeployment) {
    let (_ca, a) = node_on(&dep, "a").await;
    let (_cb, b) = node_on(&dep, "b").await;
    let (_t1, tab_a) = a.connect(id("u")).await.unwrap();
    let tab_a = Rx::from(tab_a);
    let (_t2, tab_b) = b.connect(id("u")).await.unwrap();
    let tab_b = Rx::from(tab_b);
    let mut tasks = Vec::new();
    for (i, hub) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..50 {
                hub.notify_user("u", MessageType::info(), json!({"from": i, "n": n}))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    for _ in 0..100 {
        seen_a.push(recv(&tab_a).await["id"].as_str().unwrap().to_string());
        seen_b.push(recv(&tab_b).await["id"].as_str().unwrap().to_string());
    }
    assert_eq!(seen_a, seen_b, "both tabs see the same order");
}

async fn resume_works_on_another_node_from_any_id(dep: RedisDeployment) {
    let (_ca, a) = node_on(&dep, "a").await;
    let (_cb, b) = node_on(&dep, "b").await;
    let (_t, tab) = a.connect(id("u")).await.unwrap();
    let tab = Rx::from(tab);
    let first = a
        .notify_user("u", MessageType::info(), json!({"n": 0}))
        .await
        .unwrap();
    recv(&tab).await;
    let bc = b
        .broadcast(MessageType::info(), json!({}), &[] as &[&str])
        .await
        .unwrap();
    recv(&tab).await;
    let gm = a
        .notify_group("staff", MessageType::info(), json!({}))
        .await
        .unwrap();
    recv(&tab).await;
    for n in 1..=3 {
        a.notify_users(&["u", "v", "w"], MessageType::info(), json!({"n": n}))
            .await
            .unwrap();
        recv(&tab).await;
    }
    for since in [first.id.as_str(), bc.id.as_str(), gm.id.as_str()] {
        let replay = b.replay("u", since).await.unwrap();
        assert!(!replay.gap, "since {since}");
        let ns: Vec<u64> = replay
            .frames
            .iter()
            .map(|(_, f)| {
                serde_json::from_slice::<Value>(f).unwrap()["payload"]["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, vec![1, 2, 3], "since {since}");
    }
    let unknown = b.replay("u", "never-published").await.unwrap();
    assert!(unknown.gap);
    assert_eq!(unknown.frames.len(), 4, "everything retained");
}

async fn ids_are_deduplicated_across_nodes_partitions_and_the_emitter(dep: RedisDeployment) {
    let (_ca, a) = node_on(&dep, "a").await;
    let (_cb, b) = node_on(&dep, "b").await;
    let (_t, tab) = a.connect(id("u")).await.unwrap();
    let tab = Rx::from(tab);
    let (_t2, tab2) = b.connect(id("u7")).await.unwrap();
    let tab2 = Rx::from(tab2);
    let emitter = Emitter::connect(&dep.url(), config_for(&dep))
        .await
        .unwrap();
    let req = PublishRequest::new(Target::user("u"), MessageType::info())
        .with_id(MessageId::new("job-9").unwrap());
    a.publish(req.clone()).await.unwrap();
    b.publish(req.clone()).await.unwrap();
    emitter.publish(req).await.unwrap();
    assert_eq!(recv(&tab).await["id"], "job-9");
    nothing_else(&a, &[&tab], "u").await;
    // A users publish spanning partitions, retried whole: nothing twice,
    // also when the retry names more users than the first try.
    let users: Vec<String> = (0..20)
        .map(|i| format!("u{i}"))
        .chain(["u".into()])
        .collect();
    let first = PublishRequest::new(
        Target::users(users.iter().take(10).map(String::as_str)),
        MessageType::info(),
    )
    .with_id(MessageId::new("batch-1").unwrap());
    let retry = PublishRequest::new(
        Target::users(users.iter().map(String::as_str)),
        MessageType::info(),
    )
    .with_id(MessageId::new("batch-1").unwrap());
    a.publish(first).await.unwrap();
    assert_eq!(recv(&tab2).await["id"], "batch-1");
    b.publish(retry.clone()).await.unwrap();
    emitter.publish(retry).await.unwrap();
    assert_eq!(recv(&tab).await["id"], "batch-1", "u was only in the retry");
    nothing_else(&a, &[&tab], "u").await;
    nothing_else(&b, &[&tab2], "u7").await;
    emitter
        .notify_group("staff", "task_progress", json!({"progress": 50}))
        .await
        .unwrap();
    let n = recv(&tab).await;
    assert_eq!(n["type"], "task_progress");
    assert_eq!(n["group_ids"], json!(["staff"]));
    assert!(n["timestamp"].as_str().unwrap().ends_with('Z'));
}

async fn presence_and_lifecycle_events_are_cluster_wide(dep: RedisDeployment) {
    use pgdn_core::DisconnectReason::ClientClosed;
    use std::sync::Arc;
    let events = Arc::new(Events::default());
    let debounce = std::time::Duration::from_millis(800);
    let (_ca, a) = node_with_events(&dep, "a", &events, debounce).await;
    let (_cb, b) = node_with_events(&dep, "b", &events, debounce).await;
    let (cc, c) = node_with_events(&dep, "c", &events, debounce).await;

    // alice comes online on a: one event for the cluster; a second tab on
    // b is none.
    let (a1, _o1) = a.connect(id("alice")).await.unwrap();
    events.wait(1).await;
    let (b1, _o2) = b.connect(id("alice")).await.unwrap();
    let p = c.presence("alice").await.unwrap();
    assert_eq!((p.online, p.connections), (true, 2), "{p:?}");
    assert!(p.since.as_deref().unwrap().ends_with('Z'));
    let nobody = c.presence("nobody").await.unwrap();
    assert_eq!((nobody.online, nobody.connections), (false, 0));
    let (_c1, _o3) = c.connect(id("carol")).await.unwrap();
    events.wait(2).await;
    let page = a.group_presence("staff", None, 10).await.unwrap();
    let members: Vec<(String, usize)> = page
        .members
        .iter()
        .map(|m| (m.user.clone(), m.connections))
        .collect();
    assert_eq!(members, vec![("alice".into(), 2), ("carol".into(), 1)]);
    let page = a.group_presence("staff", None, 1).await.unwrap();
    assert_eq!(page.next.as_deref(), Some("alice"));
    let page = a.group_presence("staff", Some("alice"), 1).await.unwrap();
    assert_eq!(page.members[0].user, "carol");

    // A reload across nodes: both tabs close, one opens on c within the
    // debounce. No event.
    a.disconnect(&a1, ClientClosed).await;
    b.disconnect(&b1, ClientClosed).await;
    let (c2, _o4) = c.connect(id("alice")).await.unwrap();
    // bob's online comes after anything the reload could have caused.
    let (_b2, _o5) = b.connect(id("bob")).await.unwrap();
    events.wait(3).await;
    // Gone for good: offline once, after the debounce.
    c.disconnect(&c2, ClientClosed).await;
    events.wait(4).await;
    assert_eq!(
        events.kinds(),
        [
            ("user.online", "alice"),
            ("user.online", "carol"),
            ("user.online", "bob"),
            ("user.offline", "alice"),
        ]
        .map(|(k, u)| (k.to_string(), u.to_string()))
    );
    assert_eq!(c.presence("alice").await.unwrap().connections, 0);

    // Node c dies (its heartbeat stops): carol, online nowhere else, goes
    // offline once, after her mappings expired and the debounce.
    drop((c, cc, _c1, _o3));
    events.wait(5).await;
    // A marker: dave's online event follows, and nothing came between.
    let (_d, _o6) = a.connect(id("dave")).await.unwrap();
    events.wait(6).await;
    let kinds = events.kinds();
    assert_eq!(kinds[4], ("user.offline".to_string(), "carol".to_string()));
    assert_eq!(kinds[5], ("user.online".to_string(), "dave".to_string()));
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    assert_eq!(a.presence("carol").await.unwrap().connections, 0);

    // notify_undelivered: to dave (online) nothing; to nobody, one event.
    for user in ["dave", "nobody"] {
        b.publish(
            PublishRequest::new(Target::user(user), MessageType::info()).notify_undelivered(),
        )
        .await
        .unwrap();
    }
    let seen = events.wait(7).await;
    assert_eq!(seen[6].kind.as_str(), "notification.undelivered");
    assert_eq!(seen[6].user.as_deref(), Some("nobody"));
    let (_e, _o7) = a.connect(id("erin")).await.unwrap();
    assert_eq!(
        events.wait(8).await[7].user.as_deref(),
        Some("erin"),
        "nothing between"
    );
}
