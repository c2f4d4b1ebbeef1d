//! pgdn in an axum 0.8 app, on pgdn-core alone (no warp, no pgdn-server):
//! the whole wire contract of the `pgdn-server` binary, with its defaults.
//!
//! ```text
//! cargo run -p pgdn-examples --example axum
//! ```
//!
//! Listens on `PGDN_ADDR` (default `127.0.0.1:8000`) with `PGDN_JWT_SECRET`
//! and `PGDN_PUBLISH_KEY`; with neither set it makes throwaway dev
//! credentials and prints them with a token and a curl command.
//!
//! Everything pgdn does is [`pgdn_core::Service`]'s; this file only routes
//! and translates: [`router`] mounts the WebSocket path (axum's
//! `WebSocketUpgrade`, [`Service::admit`], then [`Service::serve`] over
//! [`AxumWs`]), the SSE
//! path ([`Service::sse`]) and a fallback for the publish API, `/healthz`,
//! `/readyz`, `/metrics`, `/pgdn.js` and the demo page
//! ([`Service::route`] and [`Service::respond`]). Nest it anywhere:
//! `Router::new().nest("/rt", router(service))` serves `/rt/ws`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{
    CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade,
    rejection::WebSocketUpgradeRejection,
};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{StatusCode, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::{SinkExt, StreamExt};
use pgdn_core::{
    ConnectInfo, Frame, Inbound, JwtAuthenticator, Service, Transport, TransportError,
};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Error as WsError;

/// Every pgdn route, relative to where the router is mounted.
pub fn router(service: Service) -> Router {
    let config = service.config();
    Router::new()
        .route(&config.ws_path, any(websocket))
        .route(&config.sse_path, get(sse))
        .fallback(http)
        .with_state(service)
}

/// Token, `since`, headers and peer address of a connecting request.
fn connect_info(parts: Parts) -> ConnectInfo {
    let remote = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>();
    let remote = remote.map(|info| info.0);
    ConnectInfo::from_request(parts.uri.query(), parts.headers).with_remote_addr(remote)
}

async fn websocket(State(service): State<Service>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(not_an_upgrade) => {
            let message = match not_an_upgrade {
                WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_) => {
                    "unsupported Sec-WebSocket-Version, expected 13"
                }
                WebSocketUpgradeRejection::WebSocketKeyHeaderMissing(_) => {
                    "missing Sec-WebSocket-Key"
                }
                _ => "expected a WebSocket upgrade request",
            };
            return pgdn_core::json_error(StatusCode::BAD_REQUEST, message).map(Body::from);
        }
    };
    let admission = match service.admit(connect_info(parts)).await {
        Ok(admission) => admission,
        Err(refused) => return refused.map(Body::from),
    };
    let c = service.config();
    // The same tungstenite settings as pgdn-server (see its `ws_config`).
    let upgrade = upgrade
        .read_buffer_size(c.read_buffer_size)
        .write_buffer_size(4096)
        .max_write_buffer_size(c.queue.max_bytes.saturating_mul(2).max(64 * 1024))
        .max_message_size(c.max_frame_size)
        .max_frame_size(c.max_frame_size);
    // axum spawns the connection's task itself; the token makes the
    // service's shutdown wait for it all the same.
    let tracked = service.tasks().token();
    upgrade.on_upgrade(move |socket| async move {
        service.serve(admission, AxumWs::new(socket)).await;
        drop(tracked);
    })
}

async fn sse(State(service): State<Service>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    match service.sse(connect_info(parts)).await {
        Ok(stream) => stream.map(Body::from_stream),
        Err(refused) => refused.map(Body::from),
    }
}

async fn http(State(service): State<Service>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path(), |p| p.as_str());
    let Some(route) = service.route(request.method(), path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (parts, body) = request.into_parts();
    let remote = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let reply = service.respond_from(route, &parts.headers, body.into_data_stream(), remote);
    reply.await.map(Body::from)
}

/// axum's WebSocket as a pgdn [`Transport`]: messages in and out, errors
/// as [`Inbound`] variants. The protocol is the service's.
struct AxumWs {
    ws: WebSocket,
    /// tungstenite queued a Pong for a Ping we read; flushed before the
    /// next read, so that a dropped `recv` cannot lose it.
    pong_pending: bool,
}

impl AxumWs {
    /// Wraps an upgraded socket.
    fn new(ws: WebSocket) -> Self {
        AxumWs {
            ws,
            pong_pending: false,
        }
    }
}

fn failed(e: axum::Error) -> TransportError {
    TransportError::new(e.to_string())
}

/// What a read error means. axum wraps tungstenite's error (the same
/// tungstenite as this crate's, 0.29), so the cause is a downcast away.
fn inbound_error(e: axum::Error) -> Inbound {
    let cause = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<WsError>());
    match cause {
        Some(WsError::Capacity(_)) => Inbound::TooLarge,
        Some(WsError::Utf8(_)) => Inbound::InvalidUtf8,
        Some(WsError::Protocol(_)) => Inbound::ProtocolError,
        Some(WsError::ConnectionClosed | WsError::AlreadyClosed) => Inbound::Closed,
        _ => Inbound::Failed(failed(e)),
    }
}

impl Transport for AxumWs {
    async fn send(&mut self, frames: &mut Vec<Frame>) -> Result<(), TransportError> {
        for frame in frames.drain(..) {
            let text = Utf8Bytes::try_from(frame.data)
                .map_err(|_| TransportError::new("frame is not UTF-8"))?;
            self.ws.feed(Message::Text(text)).await.map_err(failed)?;
        }
        self.pong_pending = false;
        self.ws.flush().await.map_err(failed)
    }

    async fn keepalive(&mut self) -> Result<(), TransportError> {
        self.ws
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(failed)
    }

    async fn recv(&mut self) -> Inbound {
        if self.pong_pending {
            if let Err(e) = self.ws.flush().await {
                return Inbound::Failed(failed(e));
            }
            self.pong_pending = false;
        }
        match self.ws.next().await {
            None | Some(Ok(Message::Close(_))) => Inbound::Closed,
            Some(Ok(Message::Text(text))) => Inbound::Text(text.as_str().to_owned()),
            Some(Ok(Message::Binary(_))) => Inbound::Binary,
            Some(Ok(Message::Ping(_))) => {
                self.pong_pending = true;
                Inbound::Ping
            }
            Some(Ok(Message::Pong(_))) => Inbound::Control,
            Some(Err(e)) => inbound_error(e),
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        if self.ws.send(Message::Close(Some(frame))).await.is_ok() {
            let _ = self.ws.close().await;
        }
    }
}

/// Serves `app` (which holds `router(service)`) on `listener` until
/// `shutdown` resolves, then closes every connection with 1001 and waits
/// for them, at most the config's `shutdown_timeout` (so an HTTP
/// connection that never finishes, a stalled stream, cannot hold it).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = service.clone();
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        stopping.begin_shutdown();
    });
    let deadline = async {
        service.shutting_down().await;
        tokio::time::sleep(service.config().shutdown_timeout).await;
    };
    tokio::select! {
        served = server.into_future() => served?,
        _ = deadline => tracing::warn!("HTTP connections still open after the shutdown timeout"),
    }
    service.shutdown().await;
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => drop(s.recv().await),
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    let addr: SocketAddr = var("PGDN_ADDR")
        .as_deref()
        .unwrap_or("127.0.0.1:8000")
        .parse()?;
    let (secret, key) = match (var("PGDN_JWT_SECRET"), var("PGDN_PUBLISH_KEY")) {
        (Some(secret), Some(key)) => (secret, key),
        (None, None) => (random_hex(32), random_hex(24)),
        _ => {
            return Err(
                "set both PGDN_JWT_SECRET and PGDN_PUBLISH_KEY, or neither (dev mode)".into(),
            );
        }
    };
    let dev_mode = var("PGDN_JWT_SECRET").is_none();
    let service = Service::builder()
        .jwt_secret(&secret)
        .publish_key(&key)
        .build()?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    // One parseable line on stdout, like the binary's.
    println!("pgdn axum example listening on http://{addr}");
    if dev_mode {
        let day = Duration::from_secs(24 * 3600);
        let token = JwtAuthenticator::new(&secret).issue("demo-user", &["demo"], day)?;
        println!("DEV MODE: throwaway credentials (set PGDN_JWT_SECRET and PGDN_PUBLISH_KEY)");
        println!(" JWT secret: {secret}\n Publish key: {key}\n Token for demo-user: {token}");
        println!(" Demo page: http://{addr}/?token={token}");
        println!(
            " curl -sS -X POST http://{addr}/api/v1/publish -H 'Authorization: Bearer {key}' \
             -H 'Content-Type: application/json' \
             -d '{{\"target\":{{\"user\":\"demo-user\"}},\"type\":\"info\",\"payload\":{{\"title\":\"Hello\"}}}}'"
        );
    }
    serve(
        listener,
        router(service.clone()),
        service,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}
