//! The demo page at `/` and the browser client at `/pgdn.js`: plain HTML
//! and JS, no build step, served by every adapter through
//! [`Service::respond`](crate::Service::respond).

/// The page, compiled into the binary, as written: its endpoint paths are
/// the defaults (`/ws`, `/sse`); [`demo_page`] fills in a service's own.
pub const INDEX_HTML: &str = include_str!("../static/index.html");

/// The page's meta tags that name the endpoints, as written in the file.
const WS_PATH_META: &str = r#"<meta name="pgdn-ws-path" content="/ws">"#;
const SSE_PATH_META: &str = r#"<meta name="pgdn-sse-path" content="/sse">"#;

/// The demo page of a service whose WebSocket and SSE endpoints are at
/// `ws_path` and `sse_path` (its configured paths): the page connects
/// there, so the dev banner's `/?token=...` works with any `--ws-path`.
pub fn demo_page(ws_path: &str, sse_path: &str) -> String {
    // The paths are attribute values: escaped by hand, since these four
    // characters are all an attribute in double quotes needs.
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('"', "&quot;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    INDEX_HTML
        .replacen(
            WS_PATH_META,
            &format!(
                r#"<meta name="pgdn-ws-path" content="{}">"#,
                escape(ws_path)
            ),
            1,
        )
        .replacen(
            SSE_PATH_META,
            &format!(
                r#"<meta name="pgdn-sse-path" content="{}">"#,
                escape(sse_path)
            ),
            1,
        )
}

/// The browser client (`window.Pgdn`), compiled into the binary. Served
/// whether or not the demo page is on, since apps load it too.
pub const PGDN_JS: &str = include_str!("../static/pgdn.js");

/// The content type `/pgdn.js` is served with.
pub const JS_CONTENT_TYPE: &str = "application/javascript; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_page_names_the_configured_paths() {
        assert!(INDEX_HTML.contains(WS_PATH_META) && INDEX_HTML.contains(SSE_PATH_META));
        assert_eq!(demo_page("/ws", "/sse"), INDEX_HTML);
        let page = demo_page("/rt/socket", "/a\"b<c>&d");
        assert!(page.contains(r#"<meta name="pgdn-ws-path" content="/rt/socket">"#));
        assert!(page.contains(r#"<meta name="pgdn-sse-path" content="/a&quot;b&lt;c&gt;&amp;d">"#));
        assert!(!page.contains(WS_PATH_META) && !page.contains(SSE_PATH_META));
    }
}
