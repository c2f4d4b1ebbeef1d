//! Presence (`/api/v1/presence`, `/api/v1/groups/{group}/presence`) and
//! lifecycle events (`user.online`, `user.offline` after the debounce,
//! `notification.undelivered`) on one node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgdn_server::core::{EventKind, LifecycleEvent, LifecycleSink};
use serde_json::{Value, json};

use super::common::*;

async fn get(s: &TestServer, path: &str) -> (u16, Value) {
    let res = s
        .http
        .get(s.url(path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn presence_counts_a_users_connections_and_says_since_when() {
    let s = TestServer::start().await;
    let (status, p) = get(&s, "/api/v1/presence/alice").await;
    assert_eq!(status, 200);
    assert_eq!(
        p,
        json!({"user":"alice","online":false,"connections":0,"since":null})
    );
    let _a1 = s.connect("alice", &["ops"]).await;
    let _a2 = s.connect("alice", &["ops"]).await;
    let _b = s.connect("bob", &["ops"]).await;
    let _c = s.connect("carol", &[]).await;
    let (_, p) = get(&s, "/api/v1/presence/alice").await;
    assert_eq!(
        (p["online"].clone(), p["connections"].clone()),
        (json!(true), json!(2))
    );
    let since = p["since"].as_str().unwrap();
    assert!(since.ends_with('Z') && since.starts_with("20"), "{since}");
    // A user id that needs escaping in a path.
    let _odd = s.connect("a b/c", &[]).await;
    let (status, p) = get(&s, "/api/v1/presence/a%20b%2Fc").await;
    assert_eq!((status, p["connections"].clone()), (200, json!(1)), "{p}");

    // Several at once, in order.
    let (status, many) = s
        .post(
            "/api/v1/presence",
            Some(KEY),
            json!({"users":["carol","nobody","alice"]}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{many}");
    let users: Vec<(&str, u64)> = many["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["user"].as_str().unwrap(),
                p["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(users, vec![("carol", 1), ("nobody", 0), ("alice", 2)]);

    // A group's online members, a page at a time.
    let (_, page) = get(&s, "/api/v1/groups/ops/presence?limit=1").await;
    assert_eq!(
        page,
        json!({"group":"ops","members":[{"user":"alice","connections":2}],"next":"alice"})
    );
    let (_, page) = get(&s, "/api/v1/groups/ops/presence?limit=1&after=alice").await;
    assert_eq!(page["members"], json!([{"user":"bob","connections":1}]));
    assert_eq!(page["next"], Value::Null, "the last page");
    let (_, page) = get(&s, "/api/v1/groups/nobody-here/presence").await;
    assert_eq!(page["members"], json!([]));
}

#[tokio::test]
async fn presence_is_behind_the_key_and_refuses_bad_requests() {
    let s = TestServer::start().await;
    for path in ["/api/v1/presence/alice", "/api/v1/groups/ops/presence"] {
        let res = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    let (status, _) = s
        .post("/api/v1/presence", None, json!({"users":["a"]}).to_string())
        .await;
    assert_eq!(status, 401);
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    for (body, why) in [
        (json!({"users": too_many}).to_string(), "more than 1000"),
        (json!({"users": ["a", ""]}).to_string(), "an empty user id"),
        (json!({"user": "a"}).to_string(), "unknown field"),
        ("not json".to_string(), "json"),
    ] {
        let (status, reply) = s.post("/api/v1/presence", Some(KEY), body).await;
        assert_eq!(status, 400, "{why}: {reply}");
        assert!(reply["error"].is_string());
    }
    for limit in ["0", "1001", "x"] {
        let (status, reply) = get(&s, &format!("/api/v1/groups/g/presence?limit={limit}")).await;
        assert_eq!(status, 400, "limit={limit}: {reply}");
    }
    let (status, _) = get(&s, "/api/v1/presence/").await;
    assert_eq!(status, 404);
    let res = s
        .http
        .delete(s.url("/api/v1/presence/alice"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
}

/// Collects lifecycle events, and wakes whoever waits for one.
#[derive(Default)]
struct Events {
    seen: Mutex<Vec<LifecycleEvent>>,
    changed: tokio::sync::Notify,
}

impl LifecycleSink for Events {
    fn emit(&self, event: LifecycleEvent) {
        self.seen.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }
}

impl Events {
    /// Waits until `n` events arrived; returns them all.
    async fn wait(&self, n: usize) -> Vec<LifecycleEvent> {
        tokio::time::timeout(WAIT, async {
            loop {
                let notified = self.changed.notified();
                {
                    let seen = self.seen.lock().unwrap();
                    if seen.len() >= n {
                        return seen.clone();
                    }
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never {n} events: {:?}", self.seen.lock().unwrap()))
    }

    fn kinds(&self) -> Vec<(EventKind, Option<String>)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.kind, e.user.clone()))
            .collect()
    }
}

async fn with_events(debounce: Duration) -> (TestServer, Arc<Events>) {
    let events = Arc::new(Events::default());
    let hub = pgdn_server::Hub::builder()
        .lifecycle_sink(events.clone())
        .offline_debounce(debounce)
        .build();
    let pgdn = pgdn_server::Pgdn::builder()
        .hub(hub)
        .jwt_secret(SECRET)
        .publish_key(KEY)
        .build()
        .unwrap();
    (TestServer::start_pgdn(pgdn).await, events)
}

#[tokio::test]
async fn a_user_comes_online_once_and_a_reload_is_not_offline() {
    let (s, events) = with_events(Duration::from_millis(800)).await;
    let tab1 = s.connect("alice", &[]).await;
    events.wait(1).await;
    let tab2 = s.connect("alice", &[]).await;
    // A reload: the last tab closes and a new one opens within the
    // debounce. Neither is an event.
    drop(tab1);
    drop(tab2);
    s.wait_connections(0).await;
    let tab3 = s.connect("alice", &[]).await;
    // bob's online event comes after any event alice's reload could have
    // caused: if there was one, it is before bob's.
    let _bob = s.connect("bob", &[]).await;
    events.wait(2).await;
    assert_eq!(
        events.kinds(),
        vec![
            (EventKind::UserOnline, Some("alice".into())),
            (EventKind::UserOnline, Some("bob".into())),
        ]
    );
    // Gone for good: offline after the debounce, once.
    drop(tab3);
    let seen = events.wait(3).await;
    assert_eq!(seen[2].kind, EventKind::UserOffline);
    assert_eq!(seen[2].user.as_deref(), Some("alice"));
    let ids: std::collections::BTreeSet<_> = seen.iter().map(|e| &e.id).collect();
    assert_eq!(ids.len(), 3, "every event has its own id");
}

#[tokio::test]
async fn a_publish_that_reaches_nobody_says_so_when_asked() {
    let (s, events) = with_events(Duration::from_secs(60)).await;
    let mut bob = s.connect("bob", &[]).await;
    events.wait(1).await; // bob online
    let to_nobody = s
        .publish(json!({"target":{"user":"alice"},"type":"invoice","payload":{},"notify_undelivered":true}))
        .await;
    // To an online user: no event (and the order shows it: the next one
    // is the next undelivered publish).
    s.publish(json!({"target":{"user":"bob"},"type":"info","notify_undelivered":true}))
        .await;
    bob.next().await;
    // Not asked: no event either.
    s.publish(json!({"target":{"user":"alice"},"type":"info"}))
        .await;
    let to_group = s
        .publish(json!({"target":{"group":"empty"},"type":"info","notify_undelivered":true}))
        .await;
    let seen = events.wait(3).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    let e = serde_json::to_value(&seen[1]).unwrap();
    assert_eq!(e["type"], "notification.undelivered");
    assert_eq!(e["user"], "alice");
    assert_eq!(e["message_id"], to_nobody["id"]);
    assert_eq!(e["message_type"], "invoice");
    assert_eq!(e["target"], json!({"user":"alice"}));
    let g = serde_json::to_value(&seen[2]).unwrap();
    assert_eq!(g["message_id"], to_group["id"]);
    assert_eq!(g["target"], json!({"group":"empty"}));
    assert!(g.get("user").is_none());
}
