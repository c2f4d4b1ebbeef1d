//! Transport-agnostic core of pgdn, a real-time notification server.
//!
//! Everything here is independent of warp, HTTP and Redis: the adapters
//! (`pgdn-server`, `pgdn-redis`) translate between their wire and this crate.
//!
//! # Layout
//!
//! - [`message`]: message types, ids, timestamps and the [`Notification`] frame.
//! - [`frame`]: the other server frames (connection, pong, error) and inbound
//!   client frame parsing.
//! - [`identity`]: who a connection belongs to ([`Identity`]).
//! - [`target`]: who a publish is for ([`Target`]) and the publish body
//!   ([`PublishRequest`]).
//! - [`connection`]: a connection's bounded outbound queue ([`Connection`],
//!   [`Outbox`]) and why it ended ([`DisconnectReason`]).
//! - [`registry`]: user -> connections and group -> connections.
//! - [`hub`]: routes a publish to connections ([`Hub`], the facade).
//! - [`auth`], [`handler`], [`broker`], [`session`], [`history`]: the traits
//!   other crates implement, each with an in-process default.
//! - [`error`]: the crate's [`Error`] enum.

pub mod auth;
pub mod broker;
pub mod connection;
mod dedup;
pub mod error;
pub mod frame;
pub mod handler;
pub mod history;
pub mod hub;
pub mod identity;
pub mod message;
pub mod registry;
pub mod session;
pub mod target;

pub use auth::{AuthError, Authenticator, StaticAuthenticator};
pub use broker::{Broker, Envelope, LocalBroker, Published};
pub use connection::{Connection, DisconnectReason, Outbox, QueueLimits, SendError};
pub use error::{Error, Result};
pub use frame::{ClientFrame, ErrorFrame, FrameError};
pub use handler::{HandlerError, MessageHandler};
pub use history::{History, HistoryConfig, HistoryRecord, MemoryHistory, Replay};
pub use hub::{Hub, HubBuilder, HubConfig, Stats, WeakHub};
pub use identity::Identity;
pub use message::{MessageId, MessageType, Notification};
pub use session::{ClusterStats, MemorySessionTracker, SessionTracker};
pub use target::{PublishReceipt, PublishRequest, Target};
