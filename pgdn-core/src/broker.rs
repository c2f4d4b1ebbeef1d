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
use crate::message::MessageId;
use crate::target::Target;

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

    /// Sends `envelope` to every other node.
    async fn publish(&self, envelope: &Envelope) -> Result<(), Error>;
}

/// The single-node broker: there are no other nodes, so publishing is done
/// once the hub has delivered locally.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalBroker;

#[async_trait]
impl Broker for LocalBroker {
    async fn publish(&self, _envelope: &Envelope) -> Result<(), Error> {
        Ok(())
    }
}
