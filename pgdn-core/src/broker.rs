//! Cross-node fan-out.
//!
//! The hub always delivers a publish to this node's connections itself; a
//! [`Broker`] carries it to the other nodes, whose brokers hand it to their
//! own hub with [`Hub::deliver_local`](crate::Hub::deliver_local).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};

use crate::error::Error;
use crate::hub::WeakHub;
use crate::message::{MessageId, MessageType, Notification, timestamp_now};
use crate::target::{PublishRequest, Target};

/// A publish as it travels between nodes: the target and the notification,
/// already serialized once.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The message id.
    pub id: MessageId,
    /// Who receives it.
    pub target: Target,
    /// The notification's JSON text, sent as is to every matching connection.
    pub frame: Bytes,
    /// The node that accepted the publish.
    pub origin: Arc<str>,
    /// Whether the publisher chose the id (then it is de-duplicated across
    /// the cluster); generated ids are unique by construction.
    pub chosen_id: bool,
    /// The cluster-wide sequence number, when a broker assigned one; the
    /// hub then uses it as the delivery order (for resume). `None` on a
    /// single node: the hub numbers deliveries itself.
    pub seq: Option<u64>,
}

impl Envelope {
    /// Builds the notification for a validated publish, serializes it once
    /// and wraps it for the brokers: what the hub does for every publish,
    /// and what a publisher that bypasses HTTP (such as a Redis emitter)
    /// must do to produce the same wire message.
    pub fn from_request(req: PublishRequest, origin: Arc<str>) -> Envelope {
        let chosen_id = req.id.is_some();
        let id = req.id.unwrap_or_else(MessageId::generate);
        let notification = Notification {
            id: id.clone(),
            kind: req.kind,
            payload: req.payload,
            timestamp: timestamp_now(),
            user_id: match &req.target {
                Target::User(u) => Some(u.clone()),
                _ => None,
            },
            group_ids: match &req.target {
                Target::Group(g) => Some(vec![g.clone()]),
                _ => None,
            },
        };
        Envelope {
            id,
            target: req.target,
            frame: Bytes::from(notification.to_json()),
            origin,
            chosen_id,
            seq: None,
        }
    }
}

impl Envelope {
    /// Checks an envelope that came from outside this process (another
    /// node, through a broker's channel) before it is delivered: the
    /// target is valid and the frame is a notification pgdn could have
    /// built, UTF-8 JSON with this envelope's id, a publishable type, an
    /// object payload and a timestamp. Whatever else is on a channel must
    /// be dropped (and counted, [`Hub::drop_invalid`](crate::Hub::drop_invalid)),
    /// never sent to a client: bytes that are not UTF-8 would make every
    /// WebSocket that gets them fail.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |what: String| Error::InvalidPublish(format!("message {}: {what}", self.id));
        self.target.validate().map_err(|e| bad(e.to_string()))?;
        let text =
            std::str::from_utf8(&self.frame).map_err(|_| bad("frame is not UTF-8".into()))?;
        let frame: FrameCheck = serde_json::from_str(text)
            .map_err(|e| bad(format!("frame is not a notification: {e}")))?;
        if frame.id != self.id {
            return Err(bad(format!("frame has another id ({})", frame.id)));
        }
        Ok(())
    }
}

/// The fields every notification frame has, for [`Envelope::check`]
/// (others are allowed and ignored).
#[derive(Deserialize)]
struct FrameCheck {
    id: MessageId,
    #[serde(rename = "type")]
    _kind: MessageType,
    #[serde(rename = "payload")]
    _payload: AnyObject,
    #[serde(rename = "timestamp")]
    _timestamp: String,
}

/// Any JSON object, read and thrown away.
struct AnyObject;

impl<'de> Deserialize<'de> for AnyObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyObject, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnyObject)
            }
        }
        d.deserialize_map(V)
    }
}

/// What [`Broker::publish`] did with an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Published {
    /// It is on its way to the other nodes.
    Sent,
    /// Taken, but no node holds a connection it targets (the broker knows
    /// where users and groups are): it reaches nobody.
    Unrouted,
    /// Another node already took a publish with this id within the
    /// de-duplication window: it is not delivered again.
    Duplicate,
}

/// Carries publishes to the other nodes of a cluster.
///
/// Promise: when [`Broker::publish`] returns `Ok`, every other live node will
/// deliver the envelope to its matching connections; when it returns `Err`,
/// the publisher is told (HTTP 503) and may retry with the same id. It never
/// drops a message silently.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Called once when the hub is built, with a handle through which
    /// messages from other nodes are delivered here.
    fn attach(&self, _hub: WeakHub) {}

    /// Sends `envelope` to every other node (and, when
    /// [`Broker::delivers_locally`], to this one too).
    async fn publish(&self, envelope: &Envelope) -> Result<Published, Error>;

    /// Refuses a request this broker cannot carry (e.g. a `users` target
    /// longer than one bounded Redis call allows) with
    /// [`Error::InvalidPublish`] (400 at the API). The hub asks before it
    /// publishes anything, for every item of a batch first. Default: every
    /// valid request is accepted.
    fn validate(&self, _req: &PublishRequest) -> Result<(), Error> {
        Ok(())
    }

    /// True when the broker also brings this node's own publishes back to
    /// it (through [`Hub::deliver_local`](crate::Hub::deliver_local)), so
    /// that every node delivers in the one order the broker sets. The hub
    /// then does not deliver a publish locally itself, and a publish's
    /// `delivered` count is unknown (`None`). Default false.
    fn delivers_locally(&self) -> bool {
        false
    }

    /// Whether this node can deliver what it accepts right now: `Ok`, or
    /// `Err` with why not (e.g. "redis unreachable", "subscribing to
    /// redis"). `GET /readyz` answers 503 with that reason, and a publish
    /// made meanwhile should fail (503) rather than be accepted and lost.
    /// Cheap: called on every readiness probe and metrics scrape. Default:
    /// always ready.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The single-node broker: there are no other nodes, so publishing is done
/// once the hub has delivered locally.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalBroker;

#[async_trait]
impl Broker for LocalBroker {
    async fn publish(&self, _envelope: &Envelope) -> Result<Published, Error> {
        Ok(Published::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;
    use crate::target::PublishRequest;

    fn envelope(target: Target, frame: &[u8]) -> Envelope {
        Envelope {
            id: MessageId::new("m1").unwrap(),
            target,
            frame: Bytes::copy_from_slice(frame),
            origin: Arc::from("n"),
            chosen_id: true,
            seq: Some(1),
        }
    }

    #[test]
    fn only_notifications_pass_the_check() {
        let req = PublishRequest::new(Target::group("g"), MessageType::info())
            .with_id(MessageId::new("m1").unwrap());
        let good = Envelope::from_request(req, Arc::from("n"));
        good.check().unwrap();
        let ts = r#""timestamp":"2026-11-27T03:30:16.123Z""#;
        let ok = format!(r#"{{"id":"m1","type":"x","payload":{{"a":[1]}},{ts},"extra":1}}"#);
        envelope(Target::user("u"), ok.as_bytes()).check().unwrap();
        let bad: [(Target, String); 7] = [
            (Target::user("u"), "not json".into()),
            (
                Target::user("u"),
                format!(r#"{{"id":"m2","type":"x","payload":{{}},{ts}}}"#),
            ),
            (
                Target::user("u"),
                format!(r#"{{"id":"m1","type":"close","payload":{{}},{ts}}}"#),
            ),
            (
                Target::user("u"),
                format!(r#"{{"id":"m1","type":"x","payload":[],{ts}}}"#),
            ),
            (
                Target::user("u"),
                r#"{"id":"m1","type":"x","payload":{}}"#.into(),
            ),
            (
                Target::user("u"),
                r#"{"type":"connection","id":"m1"}"#.into(),
            ),
            (Target::users(Vec::<&str>::new()), ok.clone()),
        ];
        for (target, frame) in bad {
            assert!(
                envelope(target, frame.as_bytes()).check().is_err(),
                "{frame}"
            );
        }
        let mut not_utf8 = ok.into_bytes();
        not_utf8[30] = 0xff;
        assert!(envelope(Target::user("u"), &not_utf8).check().is_err());
    }
}
