//! Handlers for custom inbound client frames (docs/protocol.md section 3).

use std::future::Future;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::identity::Identity;

/// A handler's failure; the sender gets an error frame with code
/// `handler_error` and this message. The connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl HandlerError {
    /// A handler error with a message for the client.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError(message.into())
    }
}

/// Handles client frames of one `type`, registered with
/// [`Hub::register_handler`](crate::Hub::register_handler).
///
/// Promise: called once per frame, in the order a connection sent them, with
/// the sender's identity and the whole frame object. A returned value is sent
/// back to the sender alone, as one JSON text frame.
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles one frame.
    async fn handle(
        &self,
        sender: &Identity,
        frame: Map<String, Value>,
    ) -> Result<Option<Value>, HandlerError>;
}

#[async_trait]
impl<F, Fut> MessageHandler for F
where
    F: Fn(Identity, Map<String, Value>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Value>, HandlerError>> + Send + 'static,
{
    async fn handle(
        &self,
        sender: &Identity,
        frame: Map<String, Value>,
    ) -> Result<Option<Value>, HandlerError> {
        (self)(sender.clone(), frame).await
    }
}
