//! [`Service`]: everything a pgdn server does, free of any web framework.
//! An adapter (warp in pgdn-server, axum in the examples, your own) routes
//! requests to it and moves bytes:
//!
//! - a WebSocket (or any bidirectional transport): after the upgrade,
//!   [`Service::serve`] with a [`Transport`];
//! - Server-Sent Events: [`Service::sse`] gives the response to send;
//! - the publish API, `/healthz`, `/readyz`, `/metrics`, `/pgdn.js` and
//!   the demo page: [`Service::route`] says whether a path is ours, and
//!   [`Service::respond`] answers it.
//!
//! Before an upgrade, [`Service::admit`] refuses requests while shutting
//! down or past the connection limit, as an HTTP answer.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::config::Config;
use crate::connection::DisconnectReason;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{ConnectInfo, Session};
use crate::sse::{self, SseStream};
use crate::transport::Transport;

/// An HTTP answer of the service: status, headers and a JSON (or text)
/// body, for the adapter to send as is.
pub type HttpResponse = http::Response<Bytes>;

/// A JSON error answer: `{"error":"<text>"}`.
pub fn json_error(status: StatusCode, message: &str) -> HttpResponse {
    let body = serde_json::json!({ "error": message }).to_string();
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body))
        .expect("a valid response")
}

pub(crate) struct Inner {
    /// Routes publishes to connections.
    pub(crate) hub: Hub,
    /// Turns requests into identities.
    pub(crate) auth: Arc<dyn Authenticator>,
    /// Limits and paths.
    pub(crate) config: Config,
    /// The key publishers must present.
    pub(crate) publish_key: String,
    /// Prometheus counters.
    pub(crate) metrics: Metrics,
    /// Every connection task, so that shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when the service starts shutting down.
    pub(crate) shutdown: CancellationToken,
}

/// A pgdn service: the hub, the authenticator, the publish key and the
/// limits, behind one cheap-clone handle. One per process (or per app).
///
/// ```
/// use pgdn_core::{Identity, Service, StaticAuthenticator};
///
/// let service = Service::builder()
///     .authenticator(StaticAuthenticator::new().with_token("t1", Identity::new("u1", ["staff"])))
///     .publish_key("a publish key of some length")
///     .build()
///     .unwrap();
/// // Route `service.config().ws_path` to a WebSocket upgrade that calls
/// // `service.serve(info, transport)`, `sse_path` to `service.sse(info)`,
/// // and everything `service.route(...)` knows to `service.respond(...)`.
/// assert_eq!(service.hub().connection_count(), 0);
/// ```
#[derive(Clone)]
pub struct Service {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("hub", &self.inner.hub)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Service`]. An authenticator and a publish key are required:
/// there is no insecure default.
#[derive(Default)]
pub struct ServiceBuilder {
    config: Config,
    hub: Option<Hub>,
    auth: Option<Arc<dyn Authenticator>>,
    publish_key: Option<String>,
}

impl std::fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ServiceBuilder {
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

    /// Sets how subscribers are authenticated.
    pub fn authenticator(mut self, auth: impl Authenticator) -> Self {
        self.auth = Some(Arc::new(auth));
        self
    }

    /// Sets an authenticator already shared elsewhere.
    pub fn authenticator_arc(mut self, auth: Arc<dyn Authenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Uses the built-in HS256 JWT authenticator with `secret`.
    #[cfg(feature = "jwt")]
    pub fn jwt_secret(self, secret: impl AsRef<[u8]>) -> Self {
        self.authenticator(crate::jwt::JwtAuthenticator::new(secret))
    }

    /// Sets the key publishers send as `Authorization: Bearer <key>`.
    pub fn publish_key(mut self, key: impl Into<String>) -> Self {
        self.publish_key = Some(key.into());
        self
    }

    /// Builds the service, checking the configuration.
    pub fn build(self) -> Result<Service> {
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
        Ok(Service {
            inner: Arc::new(Inner {
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

impl Service {
    /// A builder.
    pub fn builder() -> ServiceBuilder {
        ServiceBuilder::default()
    }

    /// The hub, for publishing in-process, registering message handlers
    /// and reading stats.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The authenticator.
    pub fn authenticator(&self) -> &dyn Authenticator {
        &*self.inner.auth
    }

    /// The tracker of connection tasks: adapters spawn each connection's
    /// task on it, so that [`Service::shutdown`] waits for them.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Checks, before an upgrade (or an SSE stream), whether a new
    /// connection may open: 503 while shutting down or at the connection
    /// limit.
    #[allow(clippy::result_large_err)] // a refusal is the answer to send; cold path
    pub fn admit(&self) -> std::result::Result<(), HttpResponse> {
        if self.is_shutting_down() {
            return Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server shutting down",
            ));
        }
        let max = self.inner.config.max_connections;
        if self.inner.hub.connection_count() >= max {
            tracing::warn!(max, "connection limit reached, refusing a connection");
            return Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections",
            ));
        }
        Ok(())
    }

    /// Authenticates a connecting request, registers its connection and
    /// reads what a resuming client missed. Frames published from now on
    /// wait in the connection's queue until [`Session::run`].
    pub async fn open(&self, info: ConnectInfo) -> std::result::Result<Session, AuthError> {
        let identity = match self.inner.auth.authenticate(&info.auth_request()).await {
            Ok(identity) => identity,
            Err(e) => {
                // `e` names what failed, never the token.
                tracing::debug!(error = %e, "authentication failed");
                self.inner.metrics.auth_failure(e.close_reason());
                return Err(e);
            }
        };
        drop(info.headers);
        let (conn, outbox) = match self.inner.hub.connect(identity).await {
            Ok(pair) => pair,
            Err(e) => {
                // The hub refuses an identity without a user id, whatever
                // the authenticator said.
                tracing::debug!(error = %e, "identity refused");
                self.inner.metrics.auth_failure("invalid identity");
                return Err(AuthError::InvalidIdentity);
            }
        };
        if self.is_shutting_down() {
            // Shutdown began while this connection authenticated; checked
            // after registering, so that `close_all` cannot miss it.
            conn.close(DisconnectReason::ServerShutdown);
        }
        let replay = match info.since.as_deref() {
            Some(since) => Some(match self.inner.hub.replay(conn.user_id(), since).await {
                Ok(replay) => replay,
                Err(e) => {
                    // Reported to the client as a gap, so it refetches state.
                    tracing::warn!(error = %e, "history unavailable for a resuming client");
                    crate::history::Replay {
                        gap: true,
                        frames: Vec::new(),
                    }
                }
            }),
            None => None,
        };
        Ok(Session {
            service: self.clone(),
            conn,
            outbox,
            replay,
        })
    }

    /// Runs one connection over a bidirectional transport (a WebSocket
    /// right after its upgrade): authenticates, and on failure closes with
    /// 1008 and the reason of PROTOCOL.md section 1; otherwise runs the
    /// session to its end. Returns why the connection ended (`None` when
    /// it was refused).
    pub async fn serve<T: Transport>(
        &self,
        info: ConnectInfo,
        mut transport: T,
    ) -> Option<DisconnectReason> {
        match self.open(info).await {
            Ok(session) => Some(session.run(transport).await),
            Err(e) => {
                let close = transport.close(1008, e.close_reason());
                let _ = tokio::time::timeout(self.inner.config.close_timeout, close).await;
                None
            }
        }
    }

    /// Answers a Server-Sent Events request (PROTOCOL.md section 7):
    /// 401 with the reason when authentication fails, 503 when
    /// [`Service::admit`] refuses; otherwise a 200 `text/event-stream`
    /// whose body the session (spawned on [`Service::tasks`]) feeds.
    pub async fn sse(
        &self,
        info: ConnectInfo,
    ) -> std::result::Result<http::Response<SseStream>, HttpResponse> {
        // Origin checks (PROTOCOL.md section 1) are not enforced yet, for
        // SSE as for WebSocket: a cross-origin page may read the stream,
        // without credentials (no `Access-Control-Allow-Credentials`), so
        // only with a token it holds itself.
        let origin = info.headers.get(http::header::ORIGIN).cloned();
        let allow = |h: &mut http::HeaderMap| {
            if let Some(origin) = &origin {
                h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                h.insert(http::header::VARY, http::HeaderValue::from_static("origin"));
            }
        };
        let cors = |mut res: HttpResponse| {
            allow(res.headers_mut());
            res
        };
        self.admit().map_err(cors)?;
        let session = self
            .open(info.with_last_event_id())
            .await
            .map_err(|e| cors(json_error(StatusCode::UNAUTHORIZED, e.close_reason())))?;
        let (transport, stream) = sse::channel();
        self.inner.tasks.spawn(session.run(transport));
        let mut res = sse::response(stream);
        allow(res.headers_mut());
        Ok(res)
    }

    /// Spawns `fut` on [`Service::tasks`] (a connection's task).
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(fut);
    }

    /// Begins shutting down: refuses new connections and asks every open
    /// one to close with 1001 (queued frames are written first).
    pub fn begin_shutdown(&self) {
        if !self.inner.shutdown.is_cancelled() {
            tracing::info!("shutting down: closing every connection with 1001");
        }
        self.inner.shutdown.cancel();
        self.inner.hub.close_all(DisconnectReason::ServerShutdown);
    }

    /// Closes every connection with 1001 and waits for their tasks to end
    /// (at most [`Config::shutdown_timeout`]).
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.inner.tasks.close();
        if tokio::time::timeout(self.inner.config.shutdown_timeout, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.inner.tasks.len(),
                "shutdown timed out with connections still open"
            );
        }
    }

    /// Resolves once shutdown has begun.
    pub async fn shutting_down(&self) {
        self.inner.shutdown.cancelled().await
    }
}
