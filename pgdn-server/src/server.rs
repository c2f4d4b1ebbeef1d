//! [`Pgdn`]: the routes a warp app mounts, the handle it publishes with, and
//! `serve` for running it on a listener of the caller's.

use std::future::Future;
use std::sync::Arc;

use pgdn_core::{Authenticator, DisconnectReason, Hub};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::http::{StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::api::{self, json_error};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::jwt::JwtAuthenticator;
use crate::metrics::Metrics;
use crate::upgrade::{NotAnUpgrade, UpgradeRequest, upgrade_request};

/// State shared by every route and connection task.
pub(crate) struct Shared {
    /// Routes publishes to connections.
    pub(crate) hub: Hub,
    /// Turns tokens into identities.
    pub(crate) auth: Arc<dyn Authenticator>,
    /// Limits and paths.
    pub(crate) config: Config,
    /// The key publishers must present.
    pub(crate) publish_key: String,
    /// Prometheus counters.
    pub(crate) metrics: Metrics,
    /// Every connection task, so that shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when the server starts shutting down.
    pub(crate) shutdown: CancellationToken,
}

/// A pgdn server: cheap to clone, one per process (or per warp app).
///
/// Mount [`Pgdn::routes`] in a warp app and publish in-process through
/// [`Pgdn::hub`], or run it standalone with [`Pgdn::serve`].
#[derive(Clone)]
pub struct Pgdn {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pgdn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pgdn")
            .field("hub", &self.shared.hub)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Pgdn`]. An authenticator and a publish key are required:
/// there is no insecure default.
#[derive(Default)]
pub struct PgdnBuilder {
    config: Config,
    hub: Option<Hub>,
    auth: Option<Arc<dyn Authenticator>>,
    publish_key: Option<String>,
}

impl PgdnBuilder {
    /// Sets every limit at once (default: [`Config::default`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Uses an existing hub (e.g. one built with a Redis broker). By
    /// default a single-node hub with the config's queue limits and history
    /// bounds is built.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Sets how subscriber tokens are verified.
    pub fn authenticator(mut self, auth: impl Authenticator) -> Self {
        self.auth = Some(Arc::new(auth));
        self
    }

    /// Uses the built-in HS256 JWT authenticator with `secret`.
    pub fn jwt_secret(self, secret: impl AsRef<[u8]>) -> Self {
        self.authenticator(JwtAuthenticator::new(secret))
    }

    /// Sets the key publishers send as `Authorization: Bearer <key>`.
    pub fn publish_key(mut self, key: impl Into<String>) -> Self {
        self.publish_key = Some(key.into());
        self
    }

    /// Builds the server, checking the configuration.
    pub fn build(self) -> Result<Pgdn> {
        self.config.validate()?;
        let auth = self.auth.ok_or_else(|| {
            Error::Config("no authenticator: call .jwt_secret(...) or .authenticator(...)".into())
        })?;
        let publish_key = self
            .publish_key
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Error::Config("a non-empty publish key is required".into()))?;
        let hub = self.hub.unwrap_or_else(|| {
            Hub::builder()
                .queue_limits(self.config.queue)
                .history_config(self.config.history)
                .build()
        });
        Ok(Pgdn {
            shared: Arc::new(Shared {
                metrics: Metrics::new(hub.clone()),
                hub,
                auth,
                config: self.config,
                publish_key,
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
            }),
        })
    }
}

impl Pgdn {
    /// A builder.
    pub fn builder() -> PgdnBuilder {
        PgdnBuilder::default()
    }

    /// The hub, for publishing from your own handlers
    /// (`pgdn.hub().notify_user(...)`), registering message handlers and
    /// reading stats.
    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    fn ws_config(&self) -> WebSocketConfig {
        let c = &self.shared.config;
        WebSocketConfig::default()
            .read_buffer_size(c.read_buffer_size)
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
        let path = self.shared.config.ws_path.clone();
        let this = self.clone();
        warp::path::full()
            .and_then(move |full: warp::path::FullPath| {
                let matches = full.as_str() == path;
                async move {
                    if matches {
                        Ok(())
                    } else {
                        Err(warp::reject::not_found())
                    }
                }
            })
            .untuple_one()
            .and(
                upgrade_request()
                    .map(move |req: UpgradeRequest| this.accept(req))
                    .recover(|err: Rejection| async move {
                        let message = err
                            .find::<NotAnUpgrade>()
                            .map(|e| e.message())
                            .unwrap_or("expected a WebSocket upgrade request");
                        Ok::<_, std::convert::Infallible>(json_error(
                            StatusCode::BAD_REQUEST,
                            message,
                        ))
                    })
                    .unify(),
            )
    }

    fn accept(&self, req: UpgradeRequest) -> Response {
        let shared = self.shared.clone();
        if shared.shutdown.is_cancelled() {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
        }
        if shared.hub.connection_count() >= shared.config.max_connections {
            tracing::warn!(
                max = shared.config.max_connections,
                "connection limit reached, refusing an upgrade"
            );
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "too many connections");
        }
        req.accept(
            self.ws_config(),
            &self.shared.tasks,
            move |socket, token, since| crate::socket::run(socket, shared, token, since),
        )
    }

    /// The publish API under `/api/v1`, behind the publish key.
    pub fn api_routes(
        &self,
    ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        api::routes(self.shared.clone())
    }

    /// `GET /healthz` (`ok` while serving) and `GET /metrics` (Prometheus).
    pub fn ops_routes(
        &self,
    ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        let shared = self.shared.clone();
        let health = warp::path!("healthz").and(warp::get()).map(move || {
            if shared.shutdown.is_cancelled() {
                warp::reply::with_status("shutting down", StatusCode::SERVICE_UNAVAILABLE)
                    .into_response()
            } else {
                "ok".into_response()
            }
        });
        let shared = self.shared.clone();
        let metrics = warp::path!("metrics").and(warp::get()).map(move || {
            warp::reply::with_header(
                shared.metrics.render(),
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .into_response()
        });
        health.or(metrics).unify()
    }

    /// The demo page at `/` (when [`Config::demo_page`] is on) and the
    /// browser client at `/pgdn.js` (always: apps load it too).
    pub fn demo_route(
        &self,
    ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        let enabled = self.shared.config.demo_page;
        let page = warp::path::end()
            .and(warp::get())
            .and_then(move || async move {
                if enabled {
                    Ok(warp::reply::html(crate::demo::INDEX_HTML).into_response())
                } else {
                    Err(warp::reject::not_found())
                }
            });
        let script = warp::path!("pgdn.js").and(warp::get()).map(|| {
            let mut res = crate::demo::PGDN_JS.into_response();
            let headers = res.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::demo::JS_CONTENT_TYPE),
            );
            // Revalidate on every load, so pages pick up a new server's client.
            headers.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            );
            res
        });
        page.or(script).unify()
    }

    /// Every route: WebSocket, API, health, metrics and the demo page.
    pub fn routes(&self) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
        self.ws_route()
            .or(self.api_routes())
            .unify()
            .or(self.ops_routes())
            .unify()
            .or(self.demo_route())
            .unify()
    }

    /// Serves [`Pgdn::routes`] on `listener` until `shutdown` resolves, then
    /// stops accepting, closes every WebSocket with 1001 and returns once
    /// they are closed (or [`Config::shutdown_timeout`] passed).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let this = self.clone();
        let signal = async move {
            shutdown.await;
            this.begin_shutdown();
        };
        warp::serve(self.routes())
            .incoming(listener)
            .graceful(signal)
            .run()
            .await;
        self.shutdown().await;
    }

    fn begin_shutdown(&self) {
        if !self.shared.shutdown.is_cancelled() {
            tracing::info!("shutting down: closing every connection with 1001");
        }
        self.shared.shutdown.cancel();
        self.shared.hub.close_all(DisconnectReason::ServerShutdown);
    }

    /// Closes every WebSocket with 1001 and waits for their tasks to end
    /// (at most [`Config::shutdown_timeout`]). For apps that serve the
    /// routes themselves; [`Pgdn::serve`] calls it.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.shared.tasks.close();
        if tokio::time::timeout(
            self.shared.config.shutdown_timeout,
            self.shared.tasks.wait(),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                left = self.shared.tasks.len(),
                "shutdown timed out with connections still open"
            );
        }
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
