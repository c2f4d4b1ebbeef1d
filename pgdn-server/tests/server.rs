//! End-to-end tests of pgdn-server over real sockets: every behaviour of
//! PROTOCOL.md sections 1, 2, 3 and 5. One test binary (faster to link),
//! one module per section.

mod common;

#[path = "server/api.rs"]
mod api;
#[path = "server/auth.rs"]
mod auth;
#[path = "server/delivery.rs"]
mod delivery;
#[path = "server/frames.rs"]
mod frames;
#[path = "server/lifecycle.rs"]
mod lifecycle;
#[path = "server/lifetime.rs"]
mod lifetime;
#[path = "server/resume.rs"]
mod resume;
#[path = "server/sse.rs"]
mod sse;
