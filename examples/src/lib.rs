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
//! Each prints, at startup, its address, ready tokens and curl commands.
//! `tests/examples.rs` runs both apps on a free port and checks them end to
//! end with a WebSocket client.
