//! End-to-end tests over real sockets: every behaviour of docs/protocol.md
//! sections 1 to 5 and 7. One test binary (faster to link), one module per
//! section, and every module twice: `warp::<module>::<test>` against the
//! warp adapter (`pgdn_server::Pgdn`) and `axum::<module>::<test>` against
//! the axum example (`examples/examples/axum.rs`), the same test bodies.
//!
//! A new suite file `server/x.rs` starts with `use super::common::*;` and
//! is listed as `mod x;` in both modules below.

// Each suite file is compiled twice, once per server, on purpose.
#![allow(clippy::duplicate_mod)]

mod common;

/// `TestServer` is `TestServer<Warp>` here.
#[path = "server"]
mod warp {
    mod common {
        pub use crate::common::*;
        pub type TestServer = crate::common::TestServer<Warp>;
    }

    mod api;
    mod auth;
    mod delivery;
    mod frames;
    mod lifecycle;
    mod lifetime;
    mod metrics;
    mod presence;
    mod resume;
    mod security;
    mod sse;
    mod stalled;
}

/// `TestServer` is `TestServer<Axum>` here.
#[path = "server"]
mod axum {
    mod common {
        pub use crate::common::*;
        pub type TestServer = crate::common::TestServer<Axum>;
    }

    mod api;
    mod auth;
    mod delivery;
    mod frames;
    mod lifecycle;
    mod lifetime;
    mod metrics;
    mod presence;
    mod resume;
    mod security;
    mod sse;
    mod stalled;
}
