//! Lifecycle events: a user came online, went offline, or missed a
//! notification; and where the hub sends them ([`LifecycleSink`], the
//! server's webhooks).
//!
//! The hub decides *when* an event happens (once per cluster, with the
//! offline debounce); a sink only carries it, and must never block the
//! caller: it queues, and delivers in the background.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::message::timestamp_now;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// The first connection of a user anywhere in the cluster.
    #[serde(rename = "user.online")]
    UserOnline,
    /// The last connection of a user closed, and none came back within
    /// the debounce window.
    #[serde(rename = "user.offline")]
    UserOffline,
    /// A publish that asked for it (`"notify_undelivered": true`) reached
    /// no connection.
    #[serde(rename = "notification.undelivered")]
    NotificationUndelivered,
}

impl EventKind {
    /// The wire name (`user.online`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::UserOnline => "user.online",
            EventKind::UserOffline => "user.offline",
            EventKind::NotificationUndelivered => "notification.undelivered",
        }
    }
}

/// One event, as a webhook receiver gets it (in `{"events":[...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// Unique per event: a receiver de-duplicates retries by it.
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The user it is about (for `notification.undelivered`, the target
    /// user when the target was one user).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    /// When it happened, RFC 3339 UTC.
    pub timestamp: String,
    /// More fields by kind: for `notification.undelivered`, `message_id`,
    /// `message_type` and `target`.
    #[serde(flatten)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl LifecycleEvent {
    /// A new event of `kind` about `user`, now, with a fresh id.
    pub fn new(kind: EventKind, user: Option<&str>) -> LifecycleEvent {
        LifecycleEvent {
            id: format!("evt_{}", uuid::Uuid::now_v7().simple()),
            kind,
            user: user.map(str::to_string),
            timestamp: timestamp_now(),
            detail: serde_json::Map::new(),
        }
    }

    /// Adds a field of the event's detail.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.detail.insert(key.to_string(), value.into());
        self
    }
}

/// Where the hub sends lifecycle events. Implementations queue and deliver
/// in the background: `emit` is called on the connect, disconnect and
/// publish paths and must return at once.
pub trait LifecycleSink: Send + Sync + 'static {
    /// Takes one event.
    fn emit(&self, event: LifecycleEvent);
}

/// A sink that drops everything (the default: no webhook configured).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLifecycleSink;

impl LifecycleSink for NoLifecycleSink {
    fn emit(&self, _: LifecycleEvent) {}
}

impl<S: LifecycleSink + ?Sized> LifecycleSink for Arc<S> {
    fn emit(&self, event: LifecycleEvent) {
        (**self).emit(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_as_documented() {
        let e = LifecycleEvent::new(EventKind::NotificationUndelivered, Some("u1"))
            .with("message_id", "m1")
            .with("message_type", "info")
            .with("target", serde_json::json!({"user": "u1"}));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "notification.undelivered");
        assert_eq!(v["user"], "u1");
        assert_eq!(v["message_id"], "m1");
        assert_eq!(v["target"]["user"], "u1");
        assert!(v["id"].as_str().unwrap().starts_with("evt_"));
        let back: LifecycleEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let online = serde_json::to_value(LifecycleEvent::new(EventKind::UserOnline, Some("a")));
        assert_eq!(online.unwrap()["type"], "user.online");
    }
}
