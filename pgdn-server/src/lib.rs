//! The warp adapter and standalone server of pgdn.
//!
//! Mount [`Pgdn::routes`] into your own warp app, or run the `pgdn-server`
//! binary. Either way the wire is PROTOCOL.md: `/ws` for subscribers,
//! `/api/v1/*` for publishers, `/healthz`, `/metrics` and a demo page at `/`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pgdn_server::{JwtAuthenticator, Pgdn, shutdown_signal};
//! let pgdn = Pgdn::builder()
//!     .authenticator(JwtAuthenticator::new(b"jwt secret"))
//!     .publish_key("publish key")
//!     .build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! pgdn.serve(listener, shutdown_signal()).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`Config`], every limit with its default.
//! - [`jwt`]: [`JwtAuthenticator`], the built-in HS256 authenticator.
//! - `upgrade`: the WebSocket upgrade with pgdn's own tungstenite settings.
//! - `socket`: one subscriber connection, from auth to close.
//! - `api`: the publish API and the JSON error replies.
//! - `metrics`: the Prometheus text at `/metrics`.
//! - `demo`: the demo page at `/`.
//! - [`server`]: [`Pgdn`], its builder, the routes and `serve`.
//! - [`error`]: the crate's [`Error`].

pub mod config;
pub mod error;
pub mod jwt;
pub mod server;

mod api;
mod demo;
mod metrics;
mod socket;
mod upgrade;

pub use config::Config;
pub use error::{Error, Result};
pub use jwt::JwtAuthenticator;
pub use server::{Pgdn, PgdnBuilder, shutdown_signal};

/// pgdn-core, re-exported so that a warp app needs one dependency.
pub use pgdn_core as core;
pub use pgdn_core::{
    AuthError, Authenticator, Hub, Identity, MessageType, PublishReceipt, PublishRequest,
    StaticAuthenticator, Target,
};
