//! The WebSocket upgrade, finished with pgdn's own tungstenite settings.
//!
//! warp 0.4's `ws()` filter always uses tungstenite's default
//! `read_buffer_size` of 128 KiB, allocated eagerly for every connection,
//! and offers no setter for it. That alone would cost ~140 KB per idle
//! subscriber. This filter does the same handshake checks as `warp::ws()`,
//! answers `101 Switching Protocols` itself, takes hyper's `OnUpgrade` from
//! the request extensions and builds the `WebSocketStream` with a
//! [`WebSocketConfig`] whose read buffer is tiny: the socket is read
//! through [`FrameCounter`](crate::frames::FrameCounter)'s read-ahead,
//! which exists only while there is something to read.

use std::net::SocketAddr;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use pgdn_core::ConnectInfo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::{Filter, Rejection, Reply};

/// The socket type every connection task works on.
/// Boxed: the stream (about 400 bytes) is handed down through several
/// async layers (this task, the session), each of which would otherwise
/// keep a slot of its size in its state: a box keeps memory per idle
/// connection about 1.2 KB lower.
pub(crate) type Socket = Box<WebSocketStream<crate::frames::FrameCounter<SocketIo>>>;

/// The upgraded connection, shared with the hub for direct writes
/// ([`SharedIo`](crate::direct::SharedIo)).
pub(crate) type SocketIo = crate::direct::SharedIo<TokioIo<hyper::upgrade::Upgraded>>;

/// A valid WebSocket upgrade request, with what the session needs of it.
pub(crate) struct UpgradeRequest {
    key: HeaderValue,
    on_upgrade: Option<OnUpgrade>,
    /// Token, `since`, headers and peer address, for the session.
    pub info: ConnectInfo,
}

/// Why a request to the WebSocket path is not an upgrade.
#[derive(Debug)]
pub(crate) struct NotAnUpgrade(&'static str);

impl warp::reject::Reject for NotAnUpgrade {}

impl NotAnUpgrade {
    pub(crate) fn message(&self) -> &'static str {
        self.0
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Matches a GET WebSocket upgrade request; rejects with [`NotAnUpgrade`]
/// otherwise.
pub(crate) fn upgrade_request()
-> impl Filter<Extract = (UpgradeRequest,), Error = Rejection> + Clone {
    warp::get()
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(crate::server::raw_query())
        .and(crate::listener::remote_addr())
        .and_then(
            |headers: HeaderMap,
             on_upgrade: Option<OnUpgrade>,
             query: Option<String>,
             remote: Option<SocketAddr>| async move {
                if !header_has_token(&headers, header::CONNECTION, "upgrade")
                    || !header_has_token(&headers, header::UPGRADE, "websocket")
                {
                    return Err(warp::reject::custom(NotAnUpgrade(
                        "expected a WebSocket upgrade request",
                    )));
                }
                if headers
                    .get(header::SEC_WEBSOCKET_VERSION)
                    .map(|v| v.as_bytes())
                    != Some(b"13")
                {
                    return Err(warp::reject::custom(NotAnUpgrade(
                        "unsupported Sec-WebSocket-Version, expected 13",
                    )));
                }
                let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
                    return Err(warp::reject::custom(NotAnUpgrade(
                        "missing Sec-WebSocket-Key",
                    )));
                };
                Ok(UpgradeRequest {
                    key,
                    on_upgrade,
                    info: ConnectInfo::from_request(query.as_deref(), headers)
                        .with_remote_addr(remote),
                })
            },
        )
}

impl UpgradeRequest {
    /// Answers `101 Switching Protocols` and, on `tasks`, runs `on_socket`
    /// with the upgraded socket once hyper hands it over. The caller takes
    /// [`UpgradeRequest::info`] first, to admit the connection.
    pub(crate) fn accept<F, Fut>(
        self,
        config: WebSocketConfig,
        rate_limit: (f64, f64),
        read_chunk: usize,
        tasks: &TaskTracker,
        on_socket: F,
    ) -> warp::reply::Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(on_upgrade) = self.on_upgrade else {
            // Only under test harnesses that cannot upgrade (e.g. HTTP/2).
            return pgdn_core::json_error(
                StatusCode::BAD_REQUEST,
                "this connection cannot be upgraded to a WebSocket",
            )
            .into_response();
        };
        let fut = async move {
            // The upgrade's state is boxed and freed once the socket is
            // made: the task itself (allocated once, for the connection's
            // life) then holds little more than `on_socket`'s future, so an
            // idle connection does not pay for the handshake.
            let upgraded = Box::pin(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let (rate, burst) = rate_limit;
                        let io = crate::frames::FrameCounter::new(
                            crate::direct::SharedIo::new(TokioIo::new(upgraded)),
                            rate,
                            burst,
                            read_chunk,
                        );
                        Some(Box::new(
                            WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await,
                        ))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "websocket upgrade failed");
                        None
                    }
                }
            })
            .await;
            if let Some(socket) = upgraded {
                on_socket(socket).await;
            }
        };
        tasks.spawn(fut);
        let mut res = warp::reply::Response::default();
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = res.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let accept = derive_accept_key(self.key.as_bytes());
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
        res
    }
}
