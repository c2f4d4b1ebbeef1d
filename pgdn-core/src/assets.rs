//! The demo page at `/` and the browser client at `/pgdn.js`: plain HTML
//! and JS, no build step, served by every adapter through
//! [`Service::respond`](crate::Service::respond).

/// The page, compiled into the binary.
pub const INDEX_HTML: &str = include_str!("../static/index.html");

/// The browser client (`window.Pgdn`), compiled into the binary. Served
/// whether or not the demo page is on, since apps load it too.
pub const PGDN_JS: &str = include_str!("../static/pgdn.js");

/// The content type `/pgdn.js` is served with.
pub const JS_CONTENT_TYPE: &str = "application/javascript; charset=utf-8";
