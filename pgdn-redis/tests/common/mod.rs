//! What the Redis tests share: nodes in this process, a connection's
//! queue read one frame at a time.
#![allow(dead_code)]

use std::time::Duration;

use pgdn_core::{Hub, Identity, MessageType, Outbox};
use pgdn_redis::{Cluster, ClusterConfig};
use pgdn_testkit::RedisServer;
use serde_json::{Value, json};

pub const WAIT: Duration = Duration::from_secs(10);

pub fn config() -> ClusterConfig {
    let mut c = ClusterConfig::default();
    c.node_ttl = Duration::from_millis(600);
    c.heartbeat_interval = Duration::from_millis(150);
    c.cleanup_interval = Duration::from_secs(3600);
    c
}

pub async fn node(redis: &RedisServer, id: &str) -> (Cluster, Hub) {
    let cluster = Cluster::connect(&redis.url(), id, config()).await.unwrap();
    let hub = cluster.hub_builder().build();
    assert!(cluster.wait_ready(WAIT).await, "node {id} ready");
    (cluster, hub)
}

/// A connection's queue, read one frame at a time.
pub struct Rx {
    outbox: Outbox,
    buf: std::sync::Mutex<std::collections::VecDeque<bytes::Bytes>>,
}

impl From<Outbox> for Rx {
    fn from(outbox: Outbox) -> Self {
        Rx {
            outbox,
            buf: Default::default(),
        }
    }
}

pub async fn recv(rx: &Rx) -> Value {
    let queued = rx.buf.lock().unwrap().pop_front();
    let frame = match queued {
        Some(f) => f,
        None => {
            let mut batch = Vec::new();
            tokio::time::timeout(WAIT, rx.outbox.recv_many(&mut batch))
                .await
                .expect("a frame in time")
                .unwrap();
            let mut buf = rx.buf.lock().unwrap();
            buf.extend(batch.into_iter().map(|f| f.data));
            buf.pop_front().unwrap()
        }
    };
    serde_json::from_slice(&frame).unwrap()
}

/// Publishes a marker to `user` and checks it is the next frame on each of
/// `tabs` (all of that user's): nothing else was queued before it.
pub async fn nothing_else(hub: &Hub, tabs: &[&Rx], user: &str) {
    let marker = hub
        .notify_user(user, MessageType::new("marker").unwrap(), json!({}))
        .await
        .unwrap();
    for tab in tabs {
        let next = recv(tab).await;
        assert_eq!(next["id"], marker.id.as_str(), "unexpected frame {next}");
    }
}

pub fn id(s: &str) -> Identity {
    Identity::new(s, ["staff"])
}

/// The test configuration, in the mode of `dep`.
pub fn config_for(dep: &pgdn_testkit::RedisDeployment) -> ClusterConfig {
    let mut c = config();
    c.mode = dep.mode().parse().unwrap();
    c
}

/// A node on any deployment.
pub async fn node_on(dep: &pgdn_testkit::RedisDeployment, id: &str) -> (Cluster, Hub) {
    let cluster = Cluster::connect(&dep.url(), id, config_for(dep))
        .await
        .unwrap();
    let hub = cluster.hub_builder().build();
    assert!(
        cluster.wait_ready(WAIT).await,
        "node {id} ready on {}: {:?}",
        dep.mode(),
        cluster.readiness()
    );
    (cluster, hub)
}

/// Collects lifecycle events (of every node it is given to), and wakes
/// whoever waits for one.
#[derive(Default)]
pub struct Events {
    seen: std::sync::Mutex<Vec<pgdn_core::LifecycleEvent>>,
    changed: tokio::sync::Notify,
}

impl pgdn_core::LifecycleSink for Events {
    fn emit(&self, event: pgdn_core::LifecycleEvent) {
        self.seen.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }
}

impl Events {
    /// Waits until `n` events arrived (at most 20 s); returns them all.
    pub async fn wait(&self, n: usize) -> Vec<pgdn_core::LifecycleEvent> {
        tokio::time::timeout(Duration::from_secs(20), async {
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

    /// (type, user) of every event so far.
    pub fn kinds(&self) -> Vec<(String, String)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e.kind.as_str().to_string(),
                    e.user.clone().unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// A node on any deployment that sends lifecycle events to `events`.
pub async fn node_with_events(
    dep: &pgdn_testkit::RedisDeployment,
    id: &str,
    events: &std::sync::Arc<Events>,
    debounce: Duration,
) -> (Cluster, Hub) {
    let cluster = Cluster::connect(&dep.url(), id, config_for(dep))
        .await
        .unwrap();
    let hub = cluster
        .hub_builder()
        .lifecycle_sink(events.clone())
        .offline_debounce(debounce)
        .build();
    assert!(cluster.wait_ready(WAIT).await, "node {id} ready");
    (cluster, hub)
}
