//! Cross-node fan-out, and the one path by which messages reach this
//! node's connections.
//!
//! A [`Broker`] carries every publish to every node of the cluster, this
//! one included, and each node's broker hands what it receives to its own
//! hub through the [`Delivery`] it was given at [`Broker::start`]: the
//! single-node [`LocalBroker`] at once, a Redis broker when Redis brings
//! the message back (so that every node delivers in the one order the
//! cluster sets). The hub never delivers a publish by another way
//! (centrifuge's memory and Redis brokers likewise call one handler).

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};

use crate::error::Error;
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
    /// be dropped (and counted, [`Deliver::drop_invalid`]),
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

/// What a node does with the messages its broker brings: implemented by
/// the hub, reached by brokers through a [`Delivery`].
pub trait Deliver: Send + Sync + 'static {
    /// Records an envelope in the history and queues its frame to the
    /// matching connections on this node; returns how many took it. A
    /// connection whose queue is full is disconnected (1013) and not
    /// counted.
    fn deliver(&self, envelope: &Envelope) -> usize;

    /// Begins the same delivery and returns the rest of its fan-out, to be
    /// run in steps ([`FanOut::step`]) with other work in between, as
    /// [`Delivery::deliver_async`] does. By default the whole delivery
    /// happens here and nothing is left.
    fn deliver_stepwise(self: Arc<Self>, envelope: &Envelope) -> FanOut {
        FanOut::done(self.deliver(envelope))
    }

    /// Delivers `envelopes`, in order, as one: each is numbered and
    /// recorded as by [`deliver`](Deliver::deliver), then their fan-outs
    /// run together, so that a connection several of them reach takes
    /// them in one write. Meant for short fan-outs (user-targeted
    /// messages: [`LocalBroker`]'s batches); a broadcast here would hold
    /// the thread for all of its fan-out. Returns how many connections
    /// took each. By default, one [`deliver`](Deliver::deliver) after
    /// another.
    fn deliver_many(&self, envelopes: &[Envelope]) -> Vec<usize> {
        envelopes.iter().map(|e| self.deliver(e)).collect()
    }

    /// Drops a message that came from the broker's channel but is not one
    /// pgdn could have sent ([`Envelope::check`] failed, or it could not
    /// be read): nothing is delivered, and it is counted and logged
    /// ([`Stats::messages_dropped_invalid`](crate::Stats::messages_dropped_invalid)).
    fn drop_invalid(&self, why: &dyn std::fmt::Display);
}

/// A delivery under way ([`Deliver::deliver_stepwise`]): what is left of
/// its fan-out. Dropping it before it is done finishes it at once, so a
/// message that was numbered and recorded always reaches every
/// connection it names.
pub struct FanOut {
    /// What is left to do, if anything.
    steps: Option<Steps>,
    /// The count of a delivery done at once.
    delivered: usize,
}

type Steps = Box<dyn FnMut() -> Option<usize> + Send>;

impl FanOut {
    /// A delivery already done: it reached `delivered` connections.
    pub fn done(delivered: usize) -> FanOut {
        FanOut {
            steps: None,
            delivered,
        }
    }

    /// A delivery whose every call to `step` does part of the fan-out and
    /// returns how many connections took the message once it is done.
    pub fn steps(step: impl FnMut() -> Option<usize> + Send + 'static) -> FanOut {
        FanOut {
            steps: Some(Box::new(step)),
            delivered: 0,
        }
    }

    /// Does the next part: how many connections took the message once the
    /// whole fan-out is done, `None` while some is left.
    pub fn step(&mut self) -> Option<usize> {
        let Some(step) = self.steps.as_mut() else {
            return Some(self.delivered);
        };
        let done = step();
        if let Some(n) = done {
            self.steps = None;
            self.delivered = n;
        }
        done
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        // Not while a step is panicking: a second panic would abort. What
        // is left waits in the shards' inboxes for the next message there.
        if std::thread::panicking() {
            return;
        }
        while self.steps.is_some() {
            self.step();
        }
    }
}

impl std::fmt::Debug for FanOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanOut")
            .field("done", &self.steps.is_none())
            .finish()
    }
}

/// A broker's handle to its node: where it hands every message it
/// carries. Cheap to clone; it does not keep the hub alive, so a broker's
/// background tasks can end once the hub is gone ([`Delivery::is_open`]).
#[derive(Clone)]
pub struct Delivery(Weak<dyn Deliver>);

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("open", &self.is_open())
            .finish()
    }
}

impl Delivery {
    /// A handle to `node`, which it does not keep alive.
    pub fn new(node: Weak<dyn Deliver>) -> Self {
        Delivery(node)
    }

    /// Delivers `envelope` on this node ([`Deliver::deliver`]): how many
    /// connections took it, or `None` when the hub is gone.
    pub fn deliver(&self, envelope: &Envelope) -> Option<usize> {
        Some(self.0.upgrade()?.deliver(envelope))
    }

    /// Delivers `envelope` like [`Delivery::deliver`], yielding to the
    /// runtime between the steps of a long fan-out
    /// ([`Deliver::deliver_stepwise`]), so that a broadcast to every
    /// connection does not hold up other tasks on its thread (a new
    /// connection's upgrade, the next publish request) for all of it.
    /// Cancel-safe: dropped midway, the rest of the fan-out runs at once.
    pub async fn deliver_async(&self, envelope: &Envelope) -> Option<usize> {
        let mut fan_out = self.0.upgrade()?.deliver_stepwise(envelope);
        loop {
            if let Some(delivered) = fan_out.step() {
                return Some(delivered);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Delivers `envelopes` together ([`Deliver::deliver_many`]): how many
    /// connections took each, or `None` when the hub is gone.
    pub fn deliver_many(&self, envelopes: &[Envelope]) -> Option<Vec<usize>> {
        Some(self.0.upgrade()?.deliver_many(envelopes))
    }

    /// Drops an invalid message ([`Deliver::drop_invalid`]); false when
    /// the hub is gone.
    pub fn drop_invalid(&self, why: &dyn std::fmt::Display) -> bool {
        match self.0.upgrade() {
            Some(node) => {
                node.drop_invalid(why);
                true
            }
            None => false,
        }
    }

    /// Whether the hub still exists: a broker's background tasks end once
    /// it does not.
    pub fn is_open(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// What [`Broker::publish`] did with an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Published {
    /// Delivered on this node, the only one, to this many connections
    /// (the [`LocalBroker`]).
    Delivered(usize),
    /// It is on its way to the nodes (this one included), which deliver
    /// it when it arrives: how many connections take it is not known.
    Sent,
    /// Taken, but no node holds a connection it targets (the broker knows
    /// where users and groups are): it reaches nobody.
    Unrouted,
    /// Another node already took a publish with this id within the
    /// de-duplication window: it is not delivered again.
    Duplicate,
}

/// Carries publishes to every node of a cluster.
///
/// Promise: when [`Broker::publish`] returns `Ok`, every live node (this
/// one included) will deliver the envelope to its matching connections,
/// through the [`Delivery`] its broker was given; when it returns `Err`,
/// the publisher is told (HTTP 503) and may retry with the same id. It never
/// drops a message silently.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Called once when the hub is built, with the handle through which
    /// every message for this node is delivered, from this node's own
    /// publishes as from other nodes'. A broker starts its background
    /// tasks here; they end once [`Delivery::is_open`] turns false.
    fn start(&self, node: Delivery);

    /// Sends `envelope` to every node, this one included.
    async fn publish(&self, envelope: &Envelope) -> Result<Published, Error>;

    /// Sends `envelopes`, in order, to every node: what
    /// [`Hub::publish_batch`](crate::Hub::publish_batch) calls for the
    /// items without a publisher-chosen id. Returns what became of each;
    /// on an error, those before it may have been sent. Default: one
    /// [`publish`](Broker::publish) after another.
    async fn publish_many(&self, envelopes: &[Envelope]) -> Result<Vec<Published>, Error> {
        let mut out = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            out.push(self.publish(envelope).await?);
        }
        Ok(out)
    }

    /// Refuses a request this broker cannot carry (e.g. a `users` target
    /// longer than one bounded Redis call allows) with
    /// [`Error::InvalidPublish`] (400 at the API). The hub asks before it
    /// publishes anything, for every item of a batch first. Default: every
    /// valid request is accepted.
    fn validate(&self, _req: &PublishRequest) -> Result<(), Error> {
        Ok(())
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

/// [`LocalBroker`]'s error when no hub started it, or its hub is gone.
fn no_hub() -> Error {
    Error::Broker("the local broker has no hub".into())
}

/// The single-node broker: there are no other nodes, so publishing is
/// delivering here, at once, through the same [`Delivery`] a cluster's
/// broker uses.
#[derive(Debug, Default)]
pub struct LocalBroker {
    node: OnceLock<Delivery>,
}

impl LocalBroker {
    /// A broker for a single node.
    pub fn new() -> Self {
        LocalBroker::default()
    }
}

#[async_trait]
impl Broker for LocalBroker {
    fn start(&self, node: Delivery) {
        if self.node.set(node).is_err() {
            tracing::warn!("LocalBroker started by a second hub; ignoring it");
        }
    }

    async fn publish(&self, envelope: &Envelope) -> Result<Published, Error> {
        let delivered = match self.node.get() {
            Some(node) => node.deliver_async(envelope).await,
            None => None,
        }
        .ok_or_else(no_hub)?;
        Ok(Published::Delivered(delivered))
    }

    /// Each run of consecutive user-targeted envelopes is delivered as one
    /// ([`Deliver::deliver_many`]): numbered and recorded in order, then
    /// written together, so that a user who gets several messages of a
    /// batch gets them in one write rather than one write each.
    /// Broadcasts and groups go one at a time, in steps, as
    /// [`publish`](Broker::publish) sends them.
    async fn publish_many(&self, envelopes: &[Envelope]) -> Result<Vec<Published>, Error> {
        let node = self.node.get().ok_or_else(no_hub)?;
        let mut out = Vec::with_capacity(envelopes.len());
        let mut rest = envelopes;
        while let Some(first) = rest.first() {
            let users = rest
                .iter()
                .take_while(|e| matches!(e.target, Target::User(_) | Target::Users(_)))
                .count();
            if users == 0 {
                out.push(self.publish(first).await?);
                rest = &rest[1..];
                continue;
            }
            let (run, after) = rest.split_at(users);
            let delivered = node.deliver_many(run).ok_or_else(no_hub)?;
            out.extend(delivered.into_iter().map(Published::Delivered));
            rest = after;
        }
        Ok(out)
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
