//! Transport-agnostic core of pgdn, a real-time notification server.
//!
//! Everything here is independent of any web framework, HTTP server and
//! Redis: the adapters (`pgdn-server` for warp, an axum app, `pgdn-redis`)
//! translate between their wire and this crate. The connection protocol
//! ([`Session`]), the publish API ([`Service::respond`]) and the
//! Server-Sent Events transport ([`sse`]) live here, once, so every
//! adapter behaves alike.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pgdn_core::{Hub, Identity, MessageType};
//! use serde_json::json;
//!
//! let hub = Hub::new();
//! let (_conn, outbox) = hub.connect(Identity::new("u1", ["staff"])).await?;
//! let receipt = hub.notify_user("u1", MessageType::info(), json!({"n": 1})).await?;
//! assert_eq!(receipt.delivered, Some(1));
//! let mut frames = Vec::new();
//! outbox.recv_many(&mut frames).await.unwrap();
//! assert!(frames[0].is_notification());
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`message`]: message types, ids, timestamps and the [`Notification`] frame.
//! - [`frame`]: the other server frames (connection, pong, error,
//!   refreshed) and inbound client frame parsing.
//! - [`identity`]: who a connection belongs to ([`Identity`]).
//! - [`target`]: who a publish is for ([`Target`]) and the publish body
//!   ([`PublishRequest`]).
//! - [`connection`]: a connection's bounded outbound queue ([`Connection`],
//!   [`Outbox`]) and why it ended ([`DisconnectReason`]).
//! - [`registry`]: user -> connections and group -> connections, sharded by
//!   user, and the turns that keep per-connection order in a parallel fan-out.
//! - [`hub`]: routes a publish to connections ([`Hub`]).
//! - [`transport`]: what a transport offers the protocol ([`Transport`]).
//! - [`protocol`]: the connection protocol ([`Session`], [`ConnectInfo`]).
//! - [`service`]: the framework-free server facade ([`Service`]).
//! - [`api`]: the publish API and the other HTTP routes ([`Route`]).
//! - [`sse`]: the Server-Sent Events transport.
//! - [`config`]: every limit with its default ([`Config`]).
//! - [`limits`]: connection limits per node, user and address, and the
//!   client's address behind trusted proxies.
//! - `origin`: the `Origin` checks of docs/protocol.md section 1.
//! - [`auth`], [`handler`], [`broker`], [`session`], [`history`]: the traits
//!   other crates implement, each with an in-process default.
//! - [`jwt`] (feature `jwt`, on by default): [`JwtAuthenticator`].
//! - `metrics`: the Prometheus text at `/metrics`; `latency`: the
//!   publish-to-write latency it reports; `process`: the process's
//!   memory, CPU and file descriptors it reports.
//! - `assets`: the browser client `/pgdn.js` and the demo page.
//! - [`lifecycle`]: user online/offline and undelivered-notification
//!   events, and the [`LifecycleSink`] the server's webhooks implement.
//! - [`error`]: the crate's [`Error`] enum.

pub mod api;
pub mod assets;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
mod dedup;
pub mod error;
pub mod frame;
pub mod handler;
pub mod history;
pub mod hub;
pub mod identity;
#[cfg(feature = "jwt")]
pub mod jwt;
mod latency;
pub mod lifecycle;
pub mod limits;
pub mod message;
mod metrics;
mod origin;
mod process;
pub mod protocol;
pub mod registry;
pub mod service;
pub mod session;
pub mod sse;
pub mod target;
pub mod transport;

pub use api::Route;
pub use auth::{AuthError, AuthPurpose, AuthRequest, Authenticator, StaticAuthenticator};
pub use broker::{Broker, Deliver, Delivery, Envelope, FanOut, LocalBroker, Published};
pub use config::Config;
pub use connection::{
    Connection, Direct, DirectWrite, DisconnectReason, Outbox, QueueLimits, SendError,
};
pub use error::{Error, Result};
pub use frame::{ClientFrame, ErrorFrame, FrameError};
pub use handler::{HandlerError, MessageHandler};
pub use history::{History, HistoryConfig, HistoryRecord, MemoryHistory, Replay};
pub use hub::{Hub, HubBuilder, HubConfig, Stats, WeakHub};
pub use identity::Identity;
#[cfg(feature = "jwt")]
pub use jwt::JwtAuthenticator;
pub use lifecycle::{EventKind, LifecycleEvent, LifecycleSink, NoLifecycleSink};
pub use limits::IpNetwork;
pub use message::{MessageId, MessageType, Notification};
pub use protocol::{ConnectInfo, Session};
pub use service::{Admission, HttpResponse, Service, ServiceBuilder, json_error};
pub use session::{
    ClusterStats, GroupMember, GroupPresence, MemorySessionTracker, SessionTracker, UserPresence,
};
pub use sse::{SseStream, SseTransport};
pub use target::{PublishReceipt, PublishRequest, Target};
pub use transport::{Frame, Inbound, Transport, TransportError, TransportKind};

/// The `prometheus-client` crate that `/metrics` is built with, for
/// implementing a collector to pass to [`ServiceBuilder::collector`] (the
/// same version as pgdn's).
pub use prometheus_client;
