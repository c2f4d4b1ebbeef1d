//! The warp adapter and standalone server of pgdn.
//!
//! Mount [`Pgdn::routes`] into your own warp app, or run the `pgdn-server`
//! binary. Either way the wire is pgdn's protocol: `/ws` (WebSocket) and
//! `/sse` (Server-Sent Events) for subscribers, `/api/v1/*` for
//! publishers, `/healthz`, `/readyz`, `/metrics`, the browser client at
//! `/pgdn.js` and a demo page at `/`. The protocol itself lives in
//! pgdn-core ([`pgdn_core::Service`]); this crate only translates
//! between warp (and tungstenite) and it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pgdn_server::{JwtAuthenticator, Pgdn, shutdown_signal};
//! let pgdn = Pgdn::builder()
//!     .authenticator(JwtAuthenticator::try_new(b"a jwt secret of at least 32 bytes")?)
//!     .publish_key("a publish key of 16+ bytes")
//!     .build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! pgdn.serve(listener, shutdown_signal()).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - `listener`: the accept loop: hyper HTTP/1.1 with header, keep-alive
//!   and body timeouts, graceful and bounded shutdown.
//! - `upgrade`: the WebSocket upgrade with pgdn's own tungstenite settings.
//! - `frames`: every inbound wire frame (fragments too) counted toward the
//!   rate limit, and the read-ahead that keeps idle connections small.
//! - `sse_direct`: Server-Sent Events on plain TCP without hyper's
//!   per-connection buffers (for [`Pgdn::serve`]).
//! - `socket`: tungstenite messages <-> pgdn-core's `Transport`.
//! - [`server`]: [`Pgdn`], its builder, the warp routes and `serve`.
//! - `tls` (feature `tls`, on by default): [`TlsConfig`], a certificate
//!   and key for [`Pgdn::serve_tls`].
//! - [`error`]: the crate's [`Error`].
//! - `jwks` (feature `jwks`, on by default): `HttpJwks`, JWT keys from a
//!   JWKS URL.
//! - `webhooks` (feature `webhooks`, on by default): `WebhookSink`, the
//!   hub's lifecycle events POSTed, signed, to HTTP receivers.
//!
//! [`Config`] and [`JwtAuthenticator`] are pgdn-core's, re-exported.
//!
//! # Features
//!
//! - `cli` (default): the `pgdn-server` binary's own dependencies (clap,
//!   tracing-subscriber, ...); an embedding app turns it off.
//! - `tls` (default): TLS termination, [`TlsConfig`] and
//!   [`Pgdn::serve_tls`].
//! - `redis` (default): cluster mode for the binary (pgdn-redis).
//! - `jwks` (default): `jwks::HttpJwks`, JWT keys from a JWKS URL.
//! - `webhooks` (default): `webhooks::WebhookSink`, lifecycle webhooks.

pub mod error;
#[cfg(feature = "jwks")]
pub mod jwks;
pub mod server;
#[cfg(feature = "webhooks")]
pub mod webhooks;

mod direct;
mod frames;
mod listener;
mod socket;
mod sse_direct;
#[cfg(feature = "tls")]
mod tls;
mod upgrade;

pub use error::{Error, Result};
pub use listener::remote_addr;
pub use server::{Pgdn, PgdnBuilder, shutdown_signal};
pub use socket::WsTransport;
#[cfg(feature = "tls")]
pub use tls::TlsConfig;

/// pgdn-core, re-exported so that a warp app needs one dependency.
pub use pgdn_core as core;
pub use pgdn_core::jwt;
pub use pgdn_core::{
    AuthError, AuthRequest, Authenticator, Config, Hub, Identity, JwtAuthenticator, MessageType,
    PublishReceipt, PublishRequest, Service, StaticAuthenticator, Target,
};

/// pgdn-core's settings module, re-exported under its old path.
pub mod config {
    pub use pgdn_core::Config;
}
