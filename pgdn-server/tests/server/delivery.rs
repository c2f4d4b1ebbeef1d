//! docs/protocol.md section 2: who receives what.

use serde_json::{Value, json};

use super::common::*;

#[tokio::test]
async fn a_user_with_three_tabs_gets_three_copies_and_nobody_else_does() {
    let s = TestServer::start().await;
    let mut tabs = vec![
        s.connect("alice", &[]).await,
        s.connect("alice", &[]).await,
        s.connect("alice", &[]).await,
    ];
    let mut bob = s.connect("bob", &[]).await;
    let reply = s
        .publish(json!({"target":{"user":"alice"},"type":"success","payload":{"title":"Hi"}}))
        .await;
    assert_eq!(reply["delivered"], 3);
    let id = reply["id"].as_str().unwrap().to_string();
    for tab in &mut tabs {
        let n = tab.next().await;
        assert_eq!(n["id"], id.as_str());
        assert_eq!(n["type"], "success");
        assert_eq!(n["payload"], json!({"title":"Hi"}));
        assert_eq!(n["user_id"], "alice");
        assert!(n.get("group_ids").is_none());
        assert!(humantime::parse_rfc3339(n["timestamp"].as_str().unwrap()).is_ok());
    }
    // Bob got nothing: the next thing he sees is the pong to his own ping.
    bob.roundtrip("bob-1").await;
    s.stop().await;
}

#[tokio::test]
async fn group_messages_reach_exactly_the_members() {
    let s = TestServer::start().await;
    let mut admin1 = s.connect("a1", &["admins", "staff"]).await;
    let mut admin2 = s.connect("a2", &["admins"]).await;
    let mut staff = s.connect("s1", &["staff"]).await;
    let reply = s
        .publish(json!({"target":{"group":"admins"},"type":"warning","payload":{}}))
        .await;
    assert_eq!(reply["delivered"], 2);
    for c in [&mut admin1, &mut admin2] {
        let n = c.next().await;
        assert_eq!(n["group_ids"], json!(["admins"]));
        assert!(n.get("user_id").is_none());
    }
    staff.roundtrip("s").await;
    let reply = s
        .publish(json!({"target":{"group":"nobody"},"type":"info"}))
        .await;
    assert_eq!(reply["delivered"], 0);
    s.stop().await;
}

#[tokio::test]
async fn broadcast_skips_excluded_users_on_all_their_tabs() {
    let s = TestServer::start().await;
    let mut u1 = s.connect("u1", &[]).await;
    let mut u2a = s.connect("u2", &[]).await;
    let mut u2b = s.connect("u2", &[]).await;
    let mut u3 = s.connect("u3", &["g"]).await;
    let reply = s
        .publish(json!({"target":{"broadcast":{"exclude_users":["u2"]}},"type":"danger","payload":{"x":1}}))
        .await;
    assert_eq!(reply["delivered"], 2);
    for c in [&mut u1, &mut u3] {
        let n = c.next().await;
        assert_eq!(n["type"], "danger");
        assert!(
            n.get("user_id").is_none() && n.get("group_ids").is_none(),
            "{n}"
        );
    }
    u2a.roundtrip("a").await;
    u2b.roundtrip("b").await;

    let reply = s
        .publish(json!({"target":{"broadcast":{}},"type":"info"}))
        .await;
    assert_eq!(reply["delivered"], 4);
    s.stop().await;
}

#[tokio::test]
async fn users_target_reaches_each_listed_user_once() {
    let s = TestServer::start().await;
    let mut a = s.connect("a", &[]).await;
    let mut b = s.connect("b", &[]).await;
    let mut c = s.connect("c", &[]).await;
    let reply = s
        .publish(json!({"target":{"users":["a","b","a","ghost"]},"type":"custom_type","payload":{"k":"v"}}))
        .await;
    assert_eq!(reply["delivered"], 2);
    assert_eq!(a.next().await["type"], "custom_type");
    assert_eq!(b.next().await["payload"]["k"], "v");
    a.roundtrip("only-once").await;
    c.roundtrip("c").await;
    s.stop().await;
}

#[tokio::test]
async fn a_users_connections_see_messages_in_publish_order() {
    let s = TestServer::start().await;
    let mut c = s.connect("ordered", &[]).await;
    let mut ids = Vec::new();
    for i in 0..200 {
        let reply = s
            .publish(json!({"target":{"user":"ordered"},"type":"info","payload":{"i":i}}))
            .await;
        ids.push(reply["id"].as_str().unwrap().to_string());
    }
    for (i, id) in ids.iter().enumerate() {
        let n: Value = c.next().await;
        assert_eq!(n["payload"]["i"], i);
        assert_eq!(n["id"], id.as_str());
    }
    s.stop().await;
}

#[tokio::test]
async fn in_process_publishing_through_the_hub() {
    use pgdn_server::MessageType;
    let s = TestServer::start().await;
    let mut c = s.connect("u1", &["g"]).await;
    let hub = s.service.hub();
    let r = hub
        .notify_user("u1", MessageType::info(), json!({"from":"handler"}))
        .await
        .unwrap();
    assert_eq!(r.delivered, Some(1));
    assert_eq!(c.next().await["payload"]["from"], "handler");
    hub.notify_group("g", MessageType::success(), json!({}))
        .await
        .unwrap();
    assert_eq!(c.next().await["group_ids"], json!(["g"]));
    hub.broadcast(MessageType::warning(), json!({}), &["u1"])
        .await
        .unwrap();
    hub.notify_users(&["u1"], MessageType::danger(), json!({}))
        .await
        .unwrap();
    assert_eq!(
        c.next().await["type"],
        "danger",
        "the broadcast excluded u1"
    );
    assert!(
        hub.notify_user("u1", MessageType::info(), json!([1]))
            .await
            .is_err()
    );
    s.stop().await;
}

/// Eight publishers at once, on a multi-threaded server, so that fan-outs
/// really overlap: every connection still sees one order. Each
/// publisher's messages arrive in the order it sent them, two tabs of a
/// user see the same sequence, any two connections agree on the order of
/// the messages they share, nothing is lost or doubled, and a resume from
/// the middle replays exactly the rest in that same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_keep_one_order_on_every_connection() {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 48;
    const USERS: usize = 6;
    let s = TestServer::start().await;
    let mut tabs = Vec::new();
    for u in 0..USERS {
        let groups: &[&str] = if u < 3 { &["g"] } else { &[] };
        for _ in 0..2 {
            tabs.push((u, s.connect(&format!("u{u}"), groups).await));
        }
    }
    // Bystanders in every shard make each broadcast's fan-out longer, so
    // that concurrent ones overlap. They never read; 1/4 of the messages
    // reach them, far below their queue's bound.
    let mut bystanders = Vec::new();
    for b in 0..150 {
        bystanders.push(s.connect(&format!("b{b}"), &[]).await);
    }
    let target = |p: usize, i: usize| -> (Value, Vec<usize>) {
        let (a, b) = ((p + i) % USERS, (p + 2 * i + 1) % USERS);
        match i % 4 {
            0 => (json!({"broadcast":{}}), (0..USERS).collect()),
            1 => (json!({"group":"g"}), vec![0, 1, 2]),
            2 => (json!({"user":format!("u{a}")}), vec![a]),
            _ => {
                let mut to = vec![a, b];
                to.dedup();
                (json!({"users":[format!("u{a}"), format!("u{b}")]}), to)
            }
        }
    };
    let publishers = (0..PUBLISHERS).map(|p| {
        let s = &s;
        async move {
            for i in 0..EACH {
                let (t, _) = target(p, i);
                s.publish(json!({"target":t,"type":"info","payload":{"p":p,"i":i}}))
                    .await;
            }
        }
    });
    futures_util::future::join_all(publishers).await;

    let mut seen: Vec<Vec<(u64, u64, String)>> = Vec::new();
    for (u, c) in &mut tabs {
        let expected = (0..PUBLISHERS)
            .flat_map(|p| (0..EACH).map(move |i| (p, i)))
            .filter(|&(p, i)| target(p, i).1.contains(u))
            .count();
        let mut got = Vec::with_capacity(expected);
        for _ in 0..expected {
            let n = c.next().await;
            let (p, i) = (n["payload"]["p"].as_u64(), n["payload"]["i"].as_u64());
            got.push((
                p.unwrap(),
                i.unwrap(),
                n["id"].as_str().unwrap().to_string(),
            ));
        }
        c.roundtrip("nothing-more").await;
        for p in 0..PUBLISHERS as u64 {
            let mine: Vec<u64> = got.iter().filter(|m| m.0 == p).map(|m| m.1).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "publisher {p}'s messages out of order at u{u}: {mine:?}"
            );
        }
        seen.push(got);
    }
    for a in 0..seen.len() {
        for b in a + 1..seen.len() {
            let ids = |x: &Vec<(u64, u64, String)>, y: &Vec<(u64, u64, String)>| -> Vec<String> {
                let other: std::collections::HashSet<&String> = y.iter().map(|m| &m.2).collect();
                x.iter()
                    .filter(|m| other.contains(&m.2))
                    .map(|m| m.2.clone())
                    .collect()
            };
            let (ab, ba) = (ids(&seen[a], &seen[b]), ids(&seen[b], &seen[a]));
            assert!(!ab.is_empty(), "every pair shares the broadcasts");
            assert_eq!(ab, ba, "connections {a} and {b} disagree on the order");
        }
        if a % 2 == 0 {
            assert_eq!(seen[a], seen[a + 1], "two tabs of one user, one sequence");
        }
    }

    // u0 resumes from the middle of what it got: the replay is the rest of
    // its user-targeted messages (group messages and broadcasts are not
    // kept per user), in the same order.
    let got = &seen[0];
    let middle = got.len() / 2;
    let rest: Vec<&str> = got[middle + 1..]
        .iter()
        .filter(|m| m.1 % 4 >= 2)
        .map(|m| m.2.as_str())
        .collect();
    assert!(rest.len() > 5, "enough user messages after the middle");
    let ws = s
        .ws_raw(&format!(
            "?token={}&since={}",
            s.token("u0", &["g"]),
            got[middle].2
        ))
        .await;
    let mut c = Client::after_upgrade(ws).await;
    for id in rest {
        assert_eq!(c.next().await["id"], id);
    }
    c.roundtrip("after-replay").await;
    drop(bystanders);
    s.stop().await;
}
