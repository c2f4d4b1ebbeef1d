//! The demo page at `/`: plain HTML and JS, no build step.

/// The page, compiled into the binary.
pub(crate) const INDEX_HTML: &str = include_str!("../static/index.html");
