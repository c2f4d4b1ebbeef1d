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
//! Before an upgrade (or an SSE stream), [`Service::admit`] runs every
//! check that docs/protocol.md answers in HTTP: the `Origin` (403), shutdown
//! and the node's connection limit (503), the per-address and per-user
//! limits (429); it authenticates the request on the way, so that the
//! user is known before the answer. An authentication failure is not an
//! HTTP answer: it travels in the [`Admission`], and the WebSocket is
//! upgraded and then closed with 1008, as docs/protocol.md section 1 says (SSE
//! answers 401).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::config::Config;
use crate::connection::DisconnectReason;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::identity::Identity;
use crate::limits::{LimitExceeded, Limiter, Slots, client_ip};
use crate::metrics::Metrics;
use crate::origin::{OriginCheck, OriginPolicy};
use crate::protocol::{ConnectInfo, Session};
use crate::sse::{self, SseStream};
use crate::transport::Transport;

/// The shortest publish key [`ServiceBuilder::build`] accepts, in bytes.
pub const MIN_PUBLISH_KEY_LEN: usize = 16;

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
    /// The keys publishers may present (several while rotating).
    pub(crate) publish_keys: Vec<String>,
    /// Which origins may connect.
    pub(crate) origins: OriginPolicy,
    /// Connection slots per node, user and address.
    pub(crate) limiter: Arc<Limiter>,
    /// Prometheus counters.
    pub(crate) metrics: Metrics,
    /// Every connection task, so that shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when the service starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Where connections' main loops run once greeted
    /// ([`ServiceBuilder::session_runtime`]); `None`: where they started.
    pub(crate) session_runtime: Option<tokio::runtime::Handle>,
    /// The demo page with this service's endpoint paths, made once.
    pub(crate) demo_page: bytes::Bytes,
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
/// // Route `service.config().ws_path` to `service.admit(info)`, then a
/// // WebSocket upgrade that calls `service.serve(admission, transport)`,
/// // `sse_path` to `service.sse(info)`,
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
/// there is no insecure default. Publish keys must be at least
/// [`MIN_PUBLISH_KEY_LEN`] bytes, and a secret given to
/// [`ServiceBuilder::jwt_secret`] at least
/// [`jwt::MIN_SECRET_LEN`](crate::jwt::MIN_SECRET_LEN).
#[derive(Default)]
pub struct ServiceBuilder {
    config: Config,
    hub: Option<Hub>,
    auth: Option<Arc<dyn Authenticator>>,
    /// Why the last authenticator could not be made (a weak JWT secret).
    auth_error: Option<Error>,
    publish_keys: Vec<String>,
    /// More metrics for `/metrics` ([`ServiceBuilder::collector`]).
    collectors: Vec<Box<dyn prometheus_client::collector::Collector>>,
    session_runtime: Option<tokio::runtime::Handle>,
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
        self.auth_error = None;
        self
    }

    /// Sets an authenticator already shared elsewhere.
    pub fn authenticator_arc(mut self, auth: Arc<dyn Authenticator>) -> Self {
        self.auth = Some(auth);
        self.auth_error = None;
        self
    }

    /// Uses the built-in HS256 JWT authenticator with `secret`, which must
    /// be at least [`jwt::MIN_SECRET_LEN`](crate::jwt::MIN_SECRET_LEN)
    /// (32) bytes: [`ServiceBuilder::build`] refuses a shorter one. (A
    /// test that needs a short secret passes
    /// [`JwtAuthenticator::new`](crate::JwtAuthenticator::new) to
    /// [`ServiceBuilder::authenticator`].)
    #[cfg(feature = "jwt")]
    pub fn jwt_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        match crate::jwt::JwtAuthenticator::try_new(secret) {
            Ok(auth) => self.authenticator(auth),
            Err(e) => {
                self.auth = None;
                self.auth_error = Some(e);
                self
            }
        }
    }

    /// Sets the key publishers send as `Authorization: Bearer <key>`
    /// (at least [`MIN_PUBLISH_KEY_LEN`] bytes), replacing any set before.
    pub fn publish_key(mut self, key: impl Into<String>) -> Self {
        self.publish_keys = vec![key.into()];
        self
    }

    /// Sets several publish keys, any of which the API accepts: for
    /// rotating keys without downtime (add the new key, move publishers
    /// over, drop the old one). Each must be at least
    /// [`MIN_PUBLISH_KEY_LEN`] bytes.
    pub fn publish_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        self.publish_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Adds metrics of the embedding app (or of the server's webhooks) to
    /// `/metrics`: `collector` is asked for its samples at every scrape,
    /// after pgdn's own. Its names should not clash with pgdn's
    /// (`pgdn_*`), and a scrape should not wait on it: read counters, do
    /// not compute.
    pub fn collector(mut self, collector: impl prometheus_client::collector::Collector) -> Self {
        self.collectors.push(Box::new(collector));
        self
    }

    /// Runs each WebSocket connection's main loop, once its connection
    /// frame is written, on `runtime` (e.g. a multi-thread runtime of its
    /// own) rather than on the runtime that accepted it. Accepting,
    /// upgrading, greeting and answering HTTP then stay on the other
    /// runtime, whose threads the operating system schedules next to the
    /// connections': a broadcast that wakes thousands of connections does
    /// not queue a publish request or a new connection's greeting behind
    /// them. `runtime` must have time and I/O enabled and outlive the
    /// service's shutdown. Default: the connection stays where it started.
    ///
    /// ```
    /// # use pgdn_core::{Identity, Service, StaticAuthenticator};
    /// let sessions = tokio::runtime::Builder::new_multi_thread()
    ///     .worker_threads(2)
    ///     .thread_name("pgdn-session")
    ///     .enable_all()
    ///     .build()
    ///     .unwrap();
    /// let service = Service::builder()
    ///     .authenticator(StaticAuthenticator::new().with_token("t1", Identity::new("u1", ["staff"])))
    ///     .publish_key("a publish key of some length")
    ///     .session_runtime(sessions.handle().clone())
    ///     .build()
    ///     .unwrap();
    /// # drop(service);
    /// ```
    pub fn session_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.session_runtime = Some(runtime);
        self
    }

    /// Builds the service, checking the configuration.
    pub fn build(self) -> Result<Service> {
        self.config.validate()?;
        if let Some(e) = self.auth_error {
            return Err(e);
        }
        let auth = self.auth.ok_or_else(|| {
            Error::Config("no authenticator: call .jwt_secret(...) or .authenticator(...)".into())
        })?;
        if self.publish_keys.is_empty() {
            return Err(Error::Config("a publish key is required".into()));
        }
        for key in &self.publish_keys {
            // Never name the key itself.
            if key.len() < MIN_PUBLISH_KEY_LEN {
                return Err(Error::Config(format!(
                    "a publish key must be at least {MIN_PUBLISH_KEY_LEN} bytes; one has {}",
                    key.len()
                )));
            }
        }
        let origins = OriginPolicy::new(&self.config.allowed_origins).map_err(Error::Config)?;
        let hub = self.hub.unwrap_or_else(|| {
            Hub::builder()
                .queue_limits(self.config.queue)
                .history_config(self.config.history)
                .build()
        });
        let demo_page =
            crate::assets::demo_page(&self.config.ws_path, &self.config.sse_path).into();
        let limiter = Arc::<Limiter>::default();
        let shutdown = CancellationToken::new();
        Ok(Service {
            inner: Arc::new(Inner {
                demo_page,
                metrics: Metrics::new(
                    hub.clone(),
                    limiter.clone(),
                    shutdown.clone(),
                    self.collectors,
                ),
                hub,
                auth,
                config: self.config,
                publish_keys: self.publish_keys,
                origins,
                limiter,
                tasks: TaskTracker::new(),
                shutdown,
                session_runtime: self.session_runtime,
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

    /// Every check before a WebSocket upgrade (or an SSE stream), in
    /// order; a refusal is the HTTP answer to send instead of upgrading:
    ///
    /// 1. an `Origin` that is not allowed: 403 `origin not allowed`
    ///    (docs/protocol.md section 1; requests without `Origin` pass);
    /// 2. shutting down, or this node at `max_connections`: 503;
    /// 3. the client's address at `max_connections_per_ip` (when set): 429
    ///    `too many connections from this address`;
    /// 4. authentication: a failure is *not* refused here but kept in the
    ///    [`Admission`], so that [`Service::serve`] closes the upgraded
    ///    WebSocket with 1008 and the reason (and [`Service::sse`]
    ///    answers 401);
    /// 5. the user at `max_connections_per_user`: 429 `too many
    ///    connections for this user`.
    ///
    /// Each limit is a slot reserved atomically here and held by the
    /// admission, then by the connection, until it ends: two requests
    /// that authenticate at once cannot both take a user's last slot. A
    /// refusal that is allowed by origin carries
    /// `Access-Control-Allow-Origin`, so that a page can read it.
    pub async fn admit(&self, info: ConnectInfo) -> std::result::Result<Admission, HttpResponse> {
        let config = &self.inner.config;
        // The client's address, for the limits and for the log lines of
        // refusals (one line per refusal; docs in README "Logging").
        let ip = client_ip(info.remote_addr, &info.headers, &config.trusted_proxies);
        let remote = Remote(ip);
        let allow_origin = match self.inner.origins.check(&info.headers) {
            OriginCheck::Absent => None,
            OriginCheck::Allowed(origin) => Some(origin),
            OriginCheck::Refused => {
                tracing::info!(
                    %remote,
                    reason = "origin_not_allowed",
                    code = 403,
                    "connection refused"
                );
                return Err(json_error(StatusCode::FORBIDDEN, "origin not allowed"));
            }
        };
        let refuse = |status: StatusCode, message: &str| {
            let mut res = json_error(status, message);
            allow_cors(res.headers_mut(), allow_origin.as_ref());
            res
        };
        if self.is_shutting_down() {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "server shutting down",
            ));
        }
        let max = config.max_connections;
        let reserved = if self.inner.hub.connection_count() >= max {
            Err(LimitExceeded::Total)
        } else {
            self.inner
                .limiter
                .reserve(max, ip, config.max_connections_per_ip)
        };
        let mut slots = match reserved {
            Ok(slots) => slots,
            Err(LimitExceeded::Total) => {
                // This node is full: a capacity problem, hence `warn`.
                tracing::warn!(
                    %remote,
                    reason = "max_connections",
                    code = 503,
                    max,
                    "connection refused"
                );
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many connections",
                ));
            }
            Err(_) => {
                tracing::info!(
                    %remote,
                    reason = "max_connections_per_ip",
                    code = 429,
                    max = config.max_connections_per_ip,
                    "connection refused"
                );
                return Err(refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address",
                ));
            }
        };
        let identity = match self.inner.auth.authenticate(&info.auth_request()).await {
            Ok(identity) if identity.is_valid() => Ok(identity),
            Ok(_) => Err(AuthError::InvalidIdentity),
            Err(e) => Err(e),
        };
        match &identity {
            Ok(identity) => {
                let max = config.max_connections_per_user;
                if slots.reserve_user(&identity.user_id, max).is_err() {
                    tracing::info!(
                        user = &*identity.user_id,
                        %remote,
                        reason = "max_connections_per_user",
                        code = 429,
                        max,
                        "connection refused"
                    );
                    return Err(refuse(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many connections for this user",
                    ));
                }
            }
            Err(e) => {
                // `e` names what failed, never the token. Closed with 1008
                // (WebSocket) or answered 401 (SSE) later, not logged again.
                tracing::info!(
                    %remote,
                    reason = auth_label(e),
                    error = %e,
                    "connection refused: authentication failed"
                );
                self.inner.metrics.auth_failure(e.close_reason());
            }
        }
        Ok(Admission {
            since: info.since,
            identity,
            allow_origin,
            slots,
        })
    }

    /// Registers an admitted connection and reads what a resuming client
    /// missed. Frames published from now on wait in the connection's
    /// queue until [`Session::run`]. Fails with the admission's
    /// authentication error, if it had one.
    pub async fn open(&self, admission: Admission) -> std::result::Result<Session, AuthError> {
        let Admission {
            since,
            identity,
            slots,
            ..
        } = admission;
        let (conn, outbox) = match self.inner.hub.connect(identity?).await {
            Ok(pair) => pair,
            Err(e) => {
                // The hub refuses an identity without a user id, whatever
                // the authenticator said (`admit` has already checked it).
                tracing::info!(
                    remote = %Remote(slots.ip()),
                    reason = "invalid_identity",
                    error = %e,
                    "connection refused: authentication failed"
                );
                self.inner.metrics.auth_failure("invalid identity");
                return Err(AuthError::InvalidIdentity);
            }
        };
        if self.is_shutting_down() {
            // Shutdown began while this connection authenticated; checked
            // after registering, so that `close_all` cannot miss it.
            conn.close(DisconnectReason::ServerShutdown);
        }
        let replay = match since.as_deref() {
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
            slots,
        })
    }

    /// Runs one admitted connection over a bidirectional transport (a
    /// WebSocket right after its upgrade): when its authentication failed,
    /// closes with 1008 and the reason of docs/protocol.md section 1; otherwise
    /// runs the session to its end. Returns why the connection ended
    /// (`None` when it was refused). With a
    /// [session runtime](ServiceBuilder::session_runtime), the connection
    /// frame is written here and the rest is spawned there (tracked by
    /// [`Service::tasks`]); this then returns `None` at once.
    pub async fn serve<T: Transport + 'static>(
        &self,
        admission: Admission,
        mut transport: T,
    ) -> Option<DisconnectReason> {
        // Each phase is boxed: the caller's task (allocated once, for the
        // connection's life) then holds two pointers, not the larger of
        // the two states, and opening's state is freed once it is done.
        let open = Box::pin(self.open(admission));
        match open.await {
            Ok(session) => match self.elsewhere() {
                Some(runtime) => {
                    // Greeted here, then run there; this task ends.
                    let greeted = Box::pin(session.greet(transport)).await;
                    self.inner.tasks.spawn_on(greeted.run(), runtime);
                    None
                }
                None => Some(Box::pin(session.run(transport)).await),
            },
            Err(e) => {
                let close = transport.close(1008, e.close_reason());
                let close = tokio::time::timeout(self.inner.config.close_timeout, close);
                let _ = Box::pin(close).await;
                None
            }
        }
    }

    /// The session runtime, unless this task already runs on it.
    fn elsewhere(&self) -> Option<&tokio::runtime::Handle> {
        let runtime = self.inner.session_runtime.as_ref()?;
        match tokio::runtime::Handle::try_current() {
            Ok(here) if here.id() == runtime.id() => None,
            _ => Some(runtime),
        }
    }

    /// Answers a Server-Sent Events request (docs/protocol.md section 7): the
    /// refusals of [`Service::admit`] (403, 503, 429), 401 with the reason
    /// when authentication fails; otherwise a 200 `text/event-stream`
    /// whose body the session (spawned on [`Service::tasks`]) feeds. An
    /// allowed cross-origin request gets `Access-Control-Allow-Origin`
    /// (without credentials: a page reads the stream only with a token it
    /// holds itself); a refused origin gets none.
    pub async fn sse(
        &self,
        info: ConnectInfo,
    ) -> std::result::Result<http::Response<SseStream>, HttpResponse> {
        let admission = self.admit(info.with_last_event_id()).await?;
        let allow_origin = admission.allow_origin.clone();
        let session = self.open(admission).await.map_err(|e| {
            let mut res = json_error(StatusCode::UNAUTHORIZED, e.close_reason());
            allow_cors(res.headers_mut(), allow_origin.as_ref());
            res
        })?;
        let (transport, stream) = sse::channel();
        self.inner.tasks.spawn(session.run(transport));
        let mut res = sse::response(stream);
        allow_cors(res.headers_mut(), allow_origin.as_ref());
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

/// A client's address in a log line: the IP, or `unknown` when the
/// adapter does not know the peer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Remote(pub(crate) Option<std::net::IpAddr>);

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// The `reason` of an authentication failure in logs.
fn auth_label(e: &AuthError) -> &'static str {
    match e {
        AuthError::MissingToken => "missing_token",
        AuthError::InvalidToken(_) => "invalid_token",
        _ => "invalid_identity",
    }
}

/// Sets `Access-Control-Allow-Origin` to an allowed origin.
fn allow_cors(headers: &mut http::HeaderMap, origin: Option<&HeaderValue>) {
    if let Some(origin) = origin {
        headers.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(http::header::VARY, HeaderValue::from_static("origin"));
    }
}

/// A connecting request that passed [`Service::admit`]: its origin is
/// allowed and it holds its connection slots. Its authentication may
/// still have failed: [`Service::serve`] then closes the WebSocket with
/// 1008 (and [`Service::sse`] answers 401). Dropping it gives the slots
/// back.
#[derive(Debug)]
#[must_use = "an admission holds connection slots until it is served or dropped"]
pub struct Admission {
    since: Option<String>,
    identity: std::result::Result<Identity, AuthError>,
    allow_origin: Option<HeaderValue>,
    slots: Slots,
}

impl Admission {
    /// Who the request authenticated as, or why it failed.
    pub fn identity(&self) -> std::result::Result<&Identity, &AuthError> {
        self.identity.as_ref()
    }

    /// The `Access-Control-Allow-Origin` value for the answer: the
    /// request's origin when it sent one (and it is allowed).
    pub fn allow_origin(&self) -> Option<&HeaderValue> {
        self.allow_origin.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StaticAuthenticator;

    const KEY: &str = "sixteen-bytes!!!";

    fn refusal(builder: ServiceBuilder) -> String {
        builder.build().expect_err("refused").to_string()
    }

    #[test]
    fn short_publish_keys_are_refused_and_never_echoed() {
        let b = || Service::builder().authenticator(StaticAuthenticator::new());
        b().publish_key(KEY).build().unwrap();
        b().publish_keys([KEY, "another-sixteen!"]).build().unwrap();
        for weak in [
            b().publish_key("fifteen-bytes!!"),
            b().publish_key(""),
            b().publish_keys([KEY, "s3cr3t"]),
        ] {
            let e = refusal(weak);
            assert!(e.contains("at least 16 bytes"), "{e}");
            assert!(!e.contains("s3cr3t") && !e.contains("fifteen"), "{e}");
        }
        let e = refusal(b().publish_keys(Vec::<String>::new()));
        assert!(e.contains("publish key is required"), "{e}");
    }

    #[cfg(feature = "jwt")]
    #[test]
    fn short_jwt_secrets_are_refused_by_the_checked_paths() {
        use crate::JwtAuthenticator;
        for weak in ["", "short", &"x".repeat(31)] {
            let e = refusal(Service::builder().jwt_secret(weak).publish_key(KEY));
            assert!(e.contains("at least 32 bytes"), "{e}");
            assert!(JwtAuthenticator::try_new(weak).is_err());
        }
        Service::builder()
            .jwt_secret("x".repeat(32))
            .publish_key(KEY)
            .build()
            .unwrap();
        assert!(JwtAuthenticator::try_new([7u8; 32]).is_ok());
        // A deliberate choice overrides a refused secret; `new` is unchecked.
        Service::builder()
            .jwt_secret("short")
            .authenticator(JwtAuthenticator::new("short"))
            .publish_key(KEY)
            .build()
            .unwrap();
    }
}
