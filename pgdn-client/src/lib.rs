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
//! # #[cfg(feature = "publisher")]
//! # async fn run() -> Result<(), pgdn_client::Error> {
//! use serde_json::json;
//! let publisher = pgdn_client::Publisher::new("http://127.0.0.1:8000", "publish key")?;
//! let receipt = publisher.notify_user("u1", "info", json!({"title": "Hi"})).await?;
//! println!("{} reached {:?} connections", receipt.id, receipt.delivered);
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! | feature      | default | what it gives                                                  |
//! |--------------|---------|----------------------------------------------------------------|
//! | `publisher`  | yes     | [`Publisher`], [`PublisherBuilder`], [`ServerStats`] (reqwest) |
//! | `blocking`   | yes     | [`blocking::Publisher`] (implies `publisher`)                  |
//! | `subscriber` | yes     | [`Subscriber`] and its [`Event`]s (tokio-tungstenite)          |
//! | `rustls`     | yes     | `https://` and `wss://` with rustls and the webpki roots       |
//! | `native-tls` | no      | `https://` and `wss://` with the platform's TLS (OpenSSL)      |
//!
//! A batch job that only publishes compiles no WebSocket stack:
//!
//! ```toml
//! pgdn-client = { version = "0.1", default-features = false, features = ["blocking", "rustls"] }
//! ```
//!
//! A client built for an `https://` or `wss://` URL without `rustls` or
//! `native-tls` is refused when built, with [`Error::TlsNotEnabled`]. A
//! private CA is trusted with `root_certificate(pem)` on
//! [`PublisherBuilder`] and [`SubscriberBuilder`].
//!
//! # Layout
//!
//! - [`publisher`] (feature `publisher`): the async [`Publisher`] and its
//!   builder.
//! - [`blocking`] (feature `blocking`): the same methods for code without
//!   an async runtime.
//! - [`subscriber`] (feature `subscriber`): the reconnecting, resuming
//!   [`Subscriber`].
//! - `tls`: the TLS features, the check that refuses a secure URL without
//!   one, the added root certificates.
//! - `retry`: jittered exponential backoff.
//! - [`error`]: the crate's [`Error`].

#[cfg(feature = "blocking")]
pub mod blocking;
pub mod error;
#[cfg(feature = "publisher")]
pub mod publisher;
#[cfg(any(feature = "publisher", feature = "subscriber"))]
mod retry;
#[cfg(feature = "subscriber")]
pub mod subscriber;
#[cfg(any(feature = "publisher", feature = "subscriber"))]
mod tls;

pub use error::{Error, Result};
pub use pgdn_core::{
    GroupMember, GroupPresence, MessageId, MessageType, Notification, PublishReceipt,
    PublishRequest, Target, UserPresence,
};
#[cfg(feature = "publisher")]
pub use publisher::{Publisher, PublisherBuilder, ServerStats};
#[cfg(feature = "subscriber")]
pub use subscriber::{Event, Subscriber, SubscriberBuilder, Subscription};
