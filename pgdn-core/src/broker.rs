//! Cross-node fan-out.
//!
//! The hub always delivers a publish to this node's connections itself; a
//! [`Broker`] carries it to the other nodes, whose brokers hand it to their
//! own hub with [`Hub::deliver_local`](crate::Hub::deliver_local).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Error;
use crate::hub::WeakHub;
use crate::message::{MessageId, Notification, timestamp_now};
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

/// What [`Broker::publish`] did with an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Published {
    /// It is on its way to the other nodes.
    Sent,
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

    /// True when the broker also brings this node's own publishes back to
    /// it (through [`Hub::deliver_local`](crate::Hub::deliver_local)), so
    /// that every node delivers in the one order the broker sets. The hub
    /// then does not deliver a publish locally itself, and a publish's
    /// `delivered` count is unknown (`None`). Default false.
    fn delivers_locally(&self) -> bool {
        false
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
