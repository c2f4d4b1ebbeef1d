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
