//! Clients of a pgdn server.
//!
//! - [`Publisher`] (async) and [`blocking::Publisher`] publish over HTTP
//!   with the publish key, retrying connection errors, 5xx and 429 with
//!   jittered exponential backoff up to a deadline. Every publish carries an
//!   id generated here, so a retry is never delivered twice.
//! - [`Subscriber`] connects over WebSocket with a token, yields
//!   notifications as a `Stream`, reconnects by itself, resumes with
//!   `since=` so nothing is missed, and stops on an auth failure (1008).
//!   With a token callback it refreshes a JWT in band before it expires,
//!   and after a 4001 `token expired` reconnects at once with a fresh one
//!   ([`subscriber`], "Token lifetime").
//!
//! ```no_run
//! # async fn run() -> Result<(), pgdn_client::Error> {
//! use serde_json::json;
//! let publisher = pgdn_client::Publisher::new("http://127.0.0.1:8000", "publish key")?;
//! let receipt = publisher.notify_user("u1", "info", json!({"title": "Hi"})).await?;
//! println!("{} reached {:?} connections", receipt.id, receipt.delivered);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`publisher`]: the async [`Publisher`] and its builder.
//! - [`blocking`]: the same methods for code without an async runtime.
//! - [`subscriber`]: the reconnecting, resuming [`Subscriber`].
//! - `retry`: jittered exponential backoff.
//! - [`error`]: the crate's [`Error`].

pub mod blocking;
pub mod error;
pub mod publisher;
mod retry;
pub mod subscriber;

pub use error::{Error, Result};
pub use pgdn_core::{MessageId, MessageType, Notification, PublishReceipt, PublishRequest, Target};
pub use publisher::{Publisher, PublisherBuilder, ServerStats};
pub use subscriber::{Event, Subscriber, SubscriberBuilder, Subscription};
