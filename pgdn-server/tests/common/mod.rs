//! Test harness: a real pgdn server on port 0, real WebSocket clients and
//! real HTTP publishes. Waits are on events (frames, closes, watched
//! counts), each bounded by a generous timeout so a bug fails instead of
//! hanging.
//!
//! The server is either the warp adapter ([`pgdn_server::Pgdn`]) or the
//! axum example (`examples/examples/axum.rs`, compiled in here as
//! `axum_example`), both on the same [`Service`]: [`TestServer`] is
//! generic over the [`Adapter`], and `tests/server.rs` includes every
//! suite once per adapter, where `TestServer` names `TestServer<Warp>` or
//! `TestServer<Axum>`.
#![allow(dead_code, missing_docs)]

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgdn_core::Service;
use pgdn_server::{Config, JwtAuthenticator, Pgdn};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "../../../examples/examples/axum.rs"]
pub mod axum_example;

pub const SECRET: &[u8] = b"test-secret-of-at-least-32-bytes";
pub const KEY: &str = "test-publish-key";
/// Upper bound for any single wait; only reached when something is broken.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The web framework a [`TestServer`] serves pgdn with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `pgdn_server::Pgdn`: warp.
    Warp,
    /// The axum example's `router`.
    Axum,
}

/// A [`Backend`] as a type, so that `TestServer::start()` knows it.
pub trait Adapter: 'static {
    const BACKEND: Backend;
    /// Whether the adapter's transport sees every wire frame (fragments),
    /// so that it can count them toward the rate limit.
    const SEES_FRAMES: bool;
}

/// The warp adapter.
pub struct Warp;
/// The axum example.
pub struct Axum;

impl Adapter for Warp {
    const BACKEND: Backend = Backend::Warp;
    const SEES_FRAMES: bool = true;
}

impl Adapter for Axum {
    const BACKEND: Backend = Backend::Axum;
    // axum's `WebSocket` reassembles fragments and exposes no raw socket.
    const SEES_FRAMES: bool = false;
}

pub struct TestServer<A: Adapter> {
    pub addr: SocketAddr,
    /// The service behind the routes, whichever the adapter.
    pub service: Service,
    pub auth: JwtAuthenticator,
    pub http: reqwest::Client,
    /// Where the routes are mounted (`""` or e.g. `"/rt"`); [`TestServer::url`],
    /// [`TestServer::ws_raw`] and what builds on them prepend it.
    pub prefix: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    adapter: PhantomData<fn() -> A>,
}

impl<A: Adapter> TestServer<A> {
    /// See [`Adapter::SEES_FRAMES`].
    pub const BACKEND_SEES_FRAMES: bool = A::SEES_FRAMES;

    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    /// On warp, connections run on [`session_runtime`] once greeted, as in
    /// the `pgdn-server` binary; on axum, where they started (the
    /// library's default). Either way the same tests pass.
    pub async fn start_with(config: Config) -> Self {
        let pgdn = match A::BACKEND {
            Backend::Warp => builder(config).session_runtime(session_runtime()),
            Backend::Axum => builder(config),
        };
        Self::start_pgdn(pgdn.build().expect("valid config")).await
    }

    /// Serves `pgdn`'s service: with `pgdn` itself on warp, with the axum
    /// example's router on axum.
    pub async fn start_pgdn(pgdn: Pgdn) -> Self {
        Self::start_under("", pgdn).await
    }

    /// Serves the routes mounted under `prefix` (one segment, e.g. `/rt`):
    /// `warp::path("rt").and(pgdn.routes())`, or
    /// `Router::new().nest("/rt", router(service))`.
    pub async fn start_under(prefix: &str, pgdn: Pgdn) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let stop = async {
            let _ = rx.await;
        };
        let service = pgdn.service().clone();
        let task = match (A::BACKEND, prefix) {
            (Backend::Warp, "") => tokio::spawn(pgdn.serve(listener, stop)),
            (Backend::Warp, prefix) => {
                tokio::spawn(serve_warp_under(prefix.to_string(), pgdn, listener, stop))
            }
            (Backend::Axum, prefix) => {
                let mut app = axum_example::router(service.clone());
                if !prefix.is_empty() {
                    app = axum::Router::new().nest(prefix, app);
                }
                let service = service.clone();
                tokio::spawn(async move {
                    axum_example::serve(listener, app, service, stop)
                        .await
                        .unwrap()
                })
            }
        };
        TestServer {
            addr,
            service,
            auth: JwtAuthenticator::new(SECRET),
            http: reqwest::Client::new(),
            prefix: prefix.to_string(),
            stop: Some(tx),
            task: Some(task),
            adapter: PhantomData,
        }
    }

    /// Which framework serves this server.
    pub fn backend(&self) -> Backend {
        A::BACKEND
    }

    /// Triggers shutdown and waits until `serve` returned.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("server stops in time")
                .unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.addr, self.prefix, path)
    }

    /// The WebSocket URL (without query).
    pub fn ws_url(&self) -> String {
        let path = &self.service.config().ws_path;
        format!("ws://{}{}{}", self.addr, self.prefix, path)
    }

    pub fn token(&self, user: &str, groups: &[&str]) -> String {
        self.auth
            .issue(user, groups, Duration::from_secs(3600))
            .unwrap()
    }

    /// Opens a WebSocket to the WebSocket path with a raw query string.
    pub async fn ws_raw(&self, query: &str) -> Ws {
        let url = format!("{}{}", self.ws_url(), query);
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade succeeds");
        ws
    }

    /// Connects as `user` in `groups` and reads the connection frame.
    pub async fn connect(&self, user: &str, groups: &[&str]) -> Client {
        let ws = self
            .ws_raw(&format!("?token={}", self.token(user, groups)))
            .await;
        Client::after_upgrade(ws).await
    }

    /// Connects with the token in `Authorization: Bearer`.
    pub async fn connect_bearer(&self, token: &str) -> Ws {
        let mut req = self.ws_url().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws
    }
    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON reply, got {text:?}"));
        (status, value)
    }

    /// Publishes `body` with the right key and expects 200.
    pub async fn publish(&self, body: Value) -> Value {
        let (status, reply) = self
            .post("/api/v1/publish", Some(KEY), body.to_string())
            .await;
        assert_eq!(status, 200, "publish failed: {reply}");
        reply
    }

    pub async fn stats(&self) -> Value {
        let res = self
            .http
            .get(self.url("/api/v1/stats"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// The Prometheus text at `/metrics`.
    pub async fn metrics(&self) -> String {
        let res = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.text().await.unwrap()
    }

    /// Waits until this node has exactly `n` open connections.
    /// Whether the hub has closed (or already removed) `user`'s first
    /// connection: a slow consumer cut off, say.
    pub fn is_cut(&self, user: &str) -> bool {
        self.service
            .hub()
            .connections_of(user)
            .first()
            .is_none_or(|c| c.is_closed())
    }

    pub async fn wait_connections(&self, n: usize) {
        let mut rx = self.service.hub().watch_connections();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c == n))
            .await
            .unwrap_or_else(|_| panic!("never reached {n} connections"))
            .unwrap();
    }
}

/// A pgdn with the test secret and key.
pub fn build(config: Config) -> Pgdn {
    builder(config).build().expect("valid config")
}

/// A builder with the test secret and key.
pub fn builder(config: Config) -> pgdn_server::PgdnBuilder {
    Pgdn::builder()
        .config(config)
        .jwt_secret(SECRET)
        .publish_key(KEY)
}

/// A session runtime shared by the test binary's servers (threads named
/// `pgdn-session`), as `pgdn-server` makes by default.
pub fn session_runtime() -> tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("pgdn-session")
                .enable_all()
                .build()
                .expect("a session runtime")
        })
        .handle()
        .clone()
}

/// What `Pgdn::serve` does, for routes mounted under `prefix`.
async fn serve_warp_under(
    prefix: String,
    pgdn: Pgdn,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    use warp::Filter;
    let segment = prefix.trim_start_matches('/').to_string();
    let routes = warp::path(segment).and(pgdn.routes());
    pgdn.serve_routes(routes, listener, stop).await;
}

pub struct Client {
    pub ws: Ws,
    pub hello: Value,
}

impl Client {
    pub async fn after_upgrade(mut ws: Ws) -> Client {
        let hello = next_json(&mut ws).await;
        assert_eq!(hello["type"], "connection", "first frame: {hello}");
        Client { ws, hello }
    }

    pub fn user_id(&self) -> &str {
        self.hello["user_id"].as_str().unwrap()
    }

    pub async fn next(&mut self) -> Value {
        next_json(&mut self.ws).await
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends a ping frame and returns the pong: proves the connection is open
    /// and that nothing else was queued before it.
    pub async fn roundtrip(&mut self, marker: &str) {
        self.send(&format!(r#"{{"type":"ping","timestamp":"{marker}"}}"#))
            .await;
        let v = self.next().await;
        assert_eq!(v, serde_json::json!({"type":"pong","timestamp":marker}));
    }

    pub async fn expect_close(&mut self) -> (u16, String) {
        expect_close(&mut self.ws).await
    }
}

/// The next text frame as JSON (skipping WebSocket-level ping/pong).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame and returns its code and reason, skipping
/// any text frames before it.
pub async fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close in time");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (u16::from(CloseCode::Status), String::new()),
            Some(Ok(_)) => continue,
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                panic!("connection ended without a close frame")
            }
            Some(Err(e)) => panic!("error before close: {e}"),
        }
    }
}
