//! [`Pgdn`]: pgdn-core's [`Service`] behind warp filters, the handle a
//! warp app publishes with, and `serve` for running it on a listener of
//! the caller's. Every route only translates between warp and the
//! service; paths are matched relative to where the routes are mounted,
//! so `warp::path("rt").and(pgdn.routes())` serves `/rt/ws` too.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use pgdn_core::{Authenticator, ConnectInfo, Hub, Route, Service, ServiceBuilder};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::config::Config;
use crate::error::Result;
use crate::socket::WsTransport;
use crate::upgrade::{NotAnUpgrade, UpgradeRequest, upgrade_request};

/// A pgdn server: cheap to clone, one per process (or per warp app).
///
/// Mount [`Pgdn::routes`] in a warp app and publish in-process through
/// [`Pgdn::hub`], or run it standalone with [`Pgdn::serve`].
#[derive(Clone, Debug)]
pub struct Pgdn {
    service: Service,
}

/// Builds a [`Pgdn`]. An authenticator and a publish key are required:
/// there is no insecure default.
#[derive(Default, Debug)]
pub struct PgdnBuilder {
    inner: ServiceBuilder,
}

impl PgdnBuilder {
    /// Sets every limit at once (default: [`Config::default`]).
    pub fn config(mut self, config: Config) -> Self {
        self.inner = self.inner.config(config);
        self
    }

    /// Uses an existing hub (e.g. one built with a Redis broker). By
    /// default a single-node hub with the config's queue limits and history
    /// bounds is built.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.inner = self.inner.hub(hub);
        self
    }

    /// Sets how subscribers are authenticated.
    pub fn authenticator(mut self, auth: impl Authenticator) -> Self {
        self.inner = self.inner.authenticator(auth);
        self
    }

    /// Uses the built-in HS256 JWT authenticator with `secret`, at least 32
    /// bytes ([`PgdnBuilder::build`] refuses a shorter one).
    pub fn jwt_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.inner = self.inner.jwt_secret(secret);
        self
    }

    /// Sets the key publishers send as `Authorization: Bearer <key>` (at
    /// least 16 bytes).
    pub fn publish_key(mut self, key: impl Into<String>) -> Self {
        self.inner = self.inner.publish_key(key);
        self
    }

    /// Sets several publish keys, any of which is accepted (for rotation).
    pub fn publish_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        self.inner = self.inner.publish_keys(keys);
        self
    }

    /// Adds a collector's metrics to `/metrics`, after pgdn's own (e.g.
    /// [`WebhookSink::metrics`](crate::webhooks::WebhookSink::metrics));
    /// see [`ServiceBuilder::collector`].
    pub fn collector(
        mut self,
        collector: impl pgdn_core::prometheus_client::collector::Collector,
    ) -> Self {
        self.inner = self.inner.collector(collector);
        self
    }

    /// Runs WebSocket connections' main loops on `runtime` once their
    /// connection frame is written, apart from accepting, upgrading and
    /// HTTP; see [`ServiceBuilder::session_runtime`]. The `pgdn-server`
    /// binary does this by default (`--session-threads`).
    pub fn session_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.inner = self.inner.session_runtime(runtime);
        self
    }

    /// Builds the server, checking the configuration.
    pub fn build(self) -> Result<Pgdn> {
        Ok(Pgdn {
            service: self.inner.build()?,
        })
    }
}

/// The raw query string, if any (`warp::query::raw` rejects an empty one).
pub(crate) fn raw_query() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}

/// Matches when the path left to route (relative to the mount point) is
/// exactly `path`.
fn exact_path(path: String) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::path::tail()
        .and_then(move |tail: warp::path::Tail| {
            let matches = tail.as_str() == &path[1..];
            async move {
                if matches {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            }
        })
        .untuple_one()
}

/// A request body as the byte chunks pgdn-core reads.
fn body_chunks<S, B>(body: S) -> impl Stream<Item = std::result::Result<Bytes, warp::Error>> + Send
where
    S: Stream<Item = std::result::Result<B, warp::Error>> + Send,
    B: Buf,
{
    body.map(|chunk| chunk.map(|mut b| b.copy_to_bytes(b.remaining())))
}

impl Pgdn {
    /// A builder.
    pub fn builder() -> PgdnBuilder {
        PgdnBuilder::default()
    }

    /// The transport-agnostic service behind the routes.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// The hub, for publishing from your own handlers
    /// (`pgdn.hub().notify_user(...)`), registering message handlers and
    /// reading stats.
    pub fn hub(&self) -> &Hub {
        self.service.hub()
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        self.service.config()
    }

    fn ws_config(&self) -> WebSocketConfig {
        let c = self.config();
        WebSocketConfig::default()
            // The socket is read in `read_buffer_size` chunks by the
            // connection's `FrameCounter`, into a buffer that exists only
            // while there is something to read; tungstenite's own buffer,
            // which every connection keeps for its life, stays tiny.
            .read_buffer_size(crate::frames::TUNGSTENITE_READ_BUFFER)
            // Frames are fed in batches and flushed once per batch: a 4 KiB
            // write buffer turns a batch into few writes (with 0, every
            // frame is its own send; `cargo xtask bench` measured CPU per
            // delivery halving at 10,000 subscribers). It grows only when
            // a connection writes, so idle connections stay small.
            .write_buffer_size(4096)
            .max_write_buffer_size(c.queue.max_bytes.saturating_mul(2).max(64 * 1024))
            .max_message_size(Some(c.max_frame_size))
            .max_frame_size(Some(c.max_frame_size))
    }

    /// The WebSocket route at the configured path (default `/ws`).
    pub fn ws_route(
        &self,
    ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        let this = self.clone();
        exact_path(self.config().ws_path.clone()).and(
            upgrade_request()
                .then(move |req: UpgradeRequest| {
                    let this = this.clone();
                    async move { this.accept(req).await }
                })
                .recover(|err: Rejection| async move {
                    let message = err
                        .find::<NotAnUpgrade>()
                        .map(|e| e.message())
                        .unwrap_or("expected a WebSocket upgrade request");
                    Ok::<_, Infallible>(
                        pgdn_core::json_error(StatusCode::BAD_REQUEST, message).into_response(),
                    )
                })
                .unify(),
        )
    }

    async fn accept(&self, mut req: UpgradeRequest) -> Response {
        let admission = match self.service.admit(std::mem::take(&mut req.info)).await {
            Ok(admission) => admission,
            Err(refused) => return refused.into_response(),
        };
        let service = self.service.clone();
        let c = self.config();
        req.accept(
            self.ws_config(),
            (c.rate_limit_per_sec, c.rate_limit_burst),
            c.read_buffer_size,
            self.service.tasks(),
            move |socket| async move {
                let direct = socket.get_ref().get_ref().direct();
                service
                    .serve(admission, WsTransport::counting(socket).with_direct(direct))
                    .await;
            },
        )
    }

    /// The Server-Sent Events route at the configured path (default
    /// `/sse`, docs/protocol.md section 7).
    pub fn sse_route(
        &self,
    ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        let service = self.service.clone();
        exact_path(self.config().sse_path.clone())
            .and(warp::get())
            .and(raw_query())
            .and(warp::header::headers_cloned())
            .and(crate::listener::remote_addr())
            .then(
                move |query: Option<String>, headers: HeaderMap, remote: Option<SocketAddr>| {
                    let service = service.clone();
                    async move {
                        let info = ConnectInfo::from_request(query.as_deref(), headers)
                            .with_remote_addr(remote);
                        match service.sse(info).await {
                            Ok(res) => {
                                let (parts, body) = res.into_parts();
                                let mut reply = warp::reply::stream(body).into_response();
                                *reply.status_mut() = parts.status;
                                *reply.headers_mut() = parts.headers;
                                reply
                            }
                            Err(refused) => refused.into_response(),
                        }
                    }
                },
            )
    }

    /// The publish API under `/api` (behind the publish key), `/healthz`,
    /// `/readyz`, `/metrics`, `/pgdn.js` and the demo page at `/`.
    pub fn http_routes(
        &self,
    ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        let service = self.service.clone();
        // The presence routes read their query (`?after=...&limit=...`).
        let query = warp::query::raw().or(warp::any().map(String::new)).unify();
        let routed = warp::method().and(warp::path::tail()).and(query).and_then(
            move |method: Method, tail: warp::path::Tail, query: String| {
                let path = if query.is_empty() {
                    format!("/{}", tail.as_str())
                } else {
                    format!("/{}?{query}", tail.as_str())
                };
                let route = service.route(&method, &path);
                async move { route.ok_or_else(warp::reject::not_found) }
            },
        );
        let service = self.service.clone();
        routed
            .and(warp::header::headers_cloned())
            .and(crate::listener::remote_addr())
            .and(warp::body::stream())
            .then(
                move |route: Route, headers: HeaderMap, remote: Option<SocketAddr>, body| {
                    let service = service.clone();
                    async move {
                        service
                            .respond_from(route, &headers, body_chunks(body), remote)
                            .await
                            .into_response()
                    }
                },
            )
    }

    /// Every route: WebSocket, Server-Sent Events, the API, health,
    /// readiness, metrics, the browser client and the demo page.
    pub fn routes(&self) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        self.ws_route()
            .or(self.sse_route())
            .unify()
            .or(self.http_routes())
            .unify()
    }

    /// Serves [`Pgdn::routes`] on `listener` until `shutdown` resolves, then
    /// stops accepting, closes every connection with 1001 and returns once
    /// they are closed, or once [`Config::shutdown_timeout`] has passed:
    /// an HTTP connection that never finishes (a client that stopped
    /// reading its stream) cannot hold the process.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let routes = self.routes();
        // pgdn's own routes only: the SSE path is known to be this one.
        let direct = crate::sse_direct::DirectSse {
            service: self.service.clone(),
            path: self.config().sse_path.as_str().into(),
        };
        crate::listener::serve(
            routes,
            listener,
            None,
            &self.service,
            Some(direct),
            shutdown,
        )
        .await;
    }

    /// Like [`Pgdn::serve`], for an app's own routes that include pgdn's
    /// (`app.or(pgdn.routes())`). Use it rather than `warp::serve`: warp
    /// has no HTTP timeouts (a client that never finishes its request holds
    /// its connection for ever) and its graceful shutdown waits for open
    /// HTTP connections, where Server-Sent Events streams end only once
    /// pgdn begins its shutdown.
    ///
    /// Connections are HTTP/1.1 (with upgrades), bounded by
    /// [`Config::header_read_timeout`], [`Config::keep_alive_timeout`] and
    /// [`Config::body_timeout`]. Your routes read the peer address with
    /// [`remote_addr`](crate::remote_addr), not `warp::addr::remote()`.
    pub async fn serve_routes<F>(
        &self,
        routes: F,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) where
        F: Filter<Error = Rejection> + Clone + Send + Sync + 'static,
        F::Extract: Reply,
    {
        crate::listener::serve(routes, listener, None, &self.service, None, shutdown).await;
    }

    /// [`Pgdn::serve`] over TLS (`https://`, `wss://`): every connection
    /// completes its TLS handshake in its own task, within
    /// [`Config::header_read_timeout`] (a peer that never finishes it is
    /// dropped then), before its first request. Needs the `tls` feature.
    #[cfg(feature = "tls")]
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        tls: crate::TlsConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let routes = self.routes();
        self.serve_routes_tls(routes, listener, tls, shutdown).await;
    }

    /// [`Pgdn::serve_routes`] over TLS, as [`Pgdn::serve_tls`]. Needs the
    /// `tls` feature.
    #[cfg(feature = "tls")]
    pub async fn serve_routes_tls<F>(
        &self,
        routes: F,
        listener: TcpListener,
        tls: crate::TlsConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) where
        F: Filter<Error = Rejection> + Clone + Send + Sync + 'static,
        F::Extract: Reply,
    {
        let acceptor = tls.acceptor().clone();
        let tls = Some(acceptor);
        crate::listener::serve(routes, listener, tls, &self.service, None, shutdown).await;
    }

    /// Closes every connection with 1001 and waits for their tasks to end
    /// (at most [`Config::shutdown_timeout`]). For apps that serve the
    /// routes themselves; [`Pgdn::serve`] calls it.
    pub async fn shutdown(&self) {
        self.service.shutdown().await;
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: for binaries to pass to
/// [`Pgdn::serve`].
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
