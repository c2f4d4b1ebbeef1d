//! Runnable examples of pgdn, as cargo examples of this package:
//!
//! - `basic` (`examples/basic.rs`): the Quick Start. A warp app mounts
//!   [`pgdn_server::Pgdn::routes`] next to its own `POST /trigger`, which
//!   notifies a user in-process with `pgdn.hub().notify_user(...)`.
//!
//!   ```text
//!   cargo run -p pgdn-examples --example basic
//!   ```
//!
//! - `auth` (`examples/auth.rs`): a custom [`pgdn_server::Authenticator`]
//!   backed by a session table (with revocation through `POST /logout`) and
//!   a custom inbound message handler (`chat`) that posts to a group.
//!
//!   ```text
//!   cargo run -p pgdn-examples --example auth
//!   ```
//!
//! - `batch_job` (`examples/batch_job.rs`): pgdn-ws's Celery example. Jobs
//!   on plain threads report `task_started`, `task_progress` (10..100) and
//!   `task_completed` to one user with the blocking publisher.
//!
//!   ```text
//!   PGDN_PUBLISH_KEY=<key> cargo run -p pgdn-examples --example batch_job -- demo-user
//!   ```
//!
//! - `subscriber` (`examples/subscriber.rs`): prints one user's
//!   notifications from Rust, across network cuts and server restarts.
//!
//!   ```text
//!   PGDN_TOKEN=<token> cargo run -p pgdn-examples --example subscriber
//!   ```
//!
//! - `emitter` (`examples/emitter.rs`): a batch job that publishes straight
//!   into the cluster's Redis, without an HTTP hop.
//!
//!   ```text
//!   PGDN_REDIS_URL=redis://127.0.0.1:6379 cargo run -p pgdn-examples --example emitter -- demo-user
//!   ```
//!
//! - `axum` (`examples/axum.rs`): the whole wire contract of the
//!   `pgdn-server` binary in an axum 0.8 app, on pgdn-core alone: routing
//!   and translation only (see "Embedding in an axum app" in the README).
//!
//!   ```text
//!   cargo run -p pgdn-examples --example axum
//!   ```
//!
//! - `webhook_receiver` (`examples/webhook_receiver.rs`): a receiver of
//!   the server's lifecycle webhooks (`--webhook-url`) that checks their
//!   signatures, refuses stale ones, and prints each event once.
//!
//!   ```text
//!   PGDN_WEBHOOK_SECRET=<32+ bytes> cargo run -p pgdn-examples --example webhook_receiver
//!   ```
//!
//! Each prints, at startup, its address, ready tokens and curl commands.
//! `tests/examples.rs` runs the apps on a free port (the axum one and the
//! webhook receiver as their own processes) and checks them end to end
//! with a WebSocket client, or with signed requests for the receiver.

/// Used when `PGDN_PUBLISH_KEY` is not set. Never in production.
pub const DEV_PUBLISH_KEY: &str = "dev-only-publish-key-change-me";

/// Logs through `tracing`, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// An environment variable, or `fallback` with a warning.
pub fn env_or(name: &str, fallback: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!("warning: {name} is not set, using a development value");
        fallback.to_string()
    })
}

/// How printed curl commands spell the publish key: a real key is never
/// printed, the shell expands the variable instead.
pub fn key_for_curl() -> &'static str {
    match std::env::var_os("PGDN_PUBLISH_KEY") {
        Some(_) => "$PGDN_PUBLISH_KEY",
        None => DEV_PUBLISH_KEY,
    }
}
