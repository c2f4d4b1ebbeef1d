//! The HTTP side of a pgdn service, free of any web framework
//! (docs/protocol.md section 5): the publish API behind the publish key,
//! `/healthz`, `/readyz`, `/metrics`, the browser client and the demo
//! page. An adapter asks [`Service::route`] whether a request is ours and
//! hands it to [`Service::respond`] with its headers and body stream; it
//! sends back the [`HttpResponse`] as is.
//!
//! Order of checks for the API: route and method, then the key (so a
//! request without it learns nothing and its body is never read), then
//! the body, read up to the limit (also when chunked), then the publish.

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Method, StatusCode, header};
use subtle::ConstantTimeEq;

use std::net::SocketAddr;
use std::time::Instant;

use crate::error::Error;
use crate::limits::client_ip;
use crate::protocol::bearer;
use crate::service::{HttpResponse, Remote, Service, json_error};
use crate::target::PublishRequest;

/// Most users `POST /api/v1/presence` may ask about at once.
pub const MAX_PRESENCE_USERS: usize = 1_000;

/// Most members one page of `GET /api/v1/groups/{group}/presence` holds.
pub const MAX_PRESENCE_PAGE: usize = 1_000;

/// A presence lookup failed: the cluster's store is away (503).
fn presence_error(e: Error) -> HttpResponse {
    tracing::debug!(error = %e, "presence unavailable");
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("presence unavailable: {e}"),
    )
}

/// The presence routes, with their path and query parameters; `None` for
/// any other path. An empty or undecodable user or group is
/// [`Route::ApiNotFound`], a bad `limit` [`Route::ApiBadQuery`].
fn presence_route(method: &Method, path: &str, query: &str) -> Option<Route> {
    let get = method == Method::GET || method == Method::HEAD;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
            .filter(|c| !c.is_empty())
    };
    if path == "/api/v1/presence" {
        return Some(if method == Method::POST {
            Route::PresenceMany
        } else {
            Route::ApiMethodNotAllowed
        });
    }
    if let Some(user) = path.strip_prefix("/api/v1/presence/") {
        // One path segment (a `/` in a user id comes as `%2F`).
        let user = decode(user).filter(|_| !user.contains('/'));
        return Some(match (get, user) {
            (false, _) => Route::ApiMethodNotAllowed,
            (true, Some(user)) => Route::PresenceOf(user),
            _ => Route::ApiNotFound,
        });
    }
    let group = path
        .strip_prefix("/api/v1/groups/")?
        .strip_suffix("/presence")?;
    if !get {
        return Some(Route::ApiMethodNotAllowed);
    }
    let Some(group) = decode(group).filter(|_| !group.contains('/')) else {
        return Some(Route::ApiNotFound);
    };
    let mut after = None;
    let mut limit = 100;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "after" => after = decode(v),
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_PRESENCE_PAGE).contains(&n) => limit = n,
                _ => return Some(Route::ApiBadQuery),
            },
            _ => {}
        }
    }
    Some(Route::GroupPresence {
        group,
        after,
        limit,
    })
}

/// A request path the service answers (see [`Service::route`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// `POST /api/v1/publish`.
    Publish,
    /// `POST /api/v1/publish/batch`.
    PublishBatch,
    /// `GET /api/v1/stats`.
    Stats,
    /// `GET /api/v1/presence/{user}`.
    PresenceOf(String),
    /// `POST /api/v1/presence` with `{"users":[...]}`.
    PresenceMany,
    /// `GET /api/v1/groups/{group}/presence[?after=<user>&limit=<n>]`.
    GroupPresence {
        /// The group.
        group: String,
        /// The page starts after this user id.
        after: Option<String>,
        /// At most this many members (1 to 1,000; default 100).
        limit: usize,
    },
    /// A path under `/api` with the wrong method (405, behind the key).
    ApiMethodNotAllowed,
    /// A presence route with an unusable query (a `limit` not in 1 to
    /// 1,000): 400, behind the key.
    ApiBadQuery,
    /// Any other path under `/api` (404, behind the key).
    ApiNotFound,
    /// `GET /healthz`: liveness.
    Health,
    /// `GET /readyz`: readiness.
    Ready,
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// `GET /pgdn.js`: the browser client.
    Script,
    /// `GET /`: the demo page, when [`Config::demo_page`](crate::Config::demo_page) is on.
    DemoPage,
}

fn ok_text(content_type: &'static str, body: impl Into<Bytes>) -> HttpResponse {
    http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .expect("a valid response")
}

fn json_ok<T: serde::Serialize>(value: &T) -> HttpResponse {
    ok_text(
        "application/json",
        serde_json::to_vec(value).expect("replies serialize"),
    )
}

impl Service {
    /// Which of the service's HTTP routes `path` (relative to where the
    /// routes are mounted) and `method` name; `None` for paths that are
    /// not the service's, which the adapter answers itself (its own
    /// routes, a 404). The WebSocket and SSE paths are not among these:
    /// the adapter routes [`Config::ws_path`](crate::Config::ws_path) and
    /// [`Config::sse_path`](crate::Config::sse_path) itself.
    ///
    /// `path` may carry its query (`/api/v1/groups/g/presence?limit=10`);
    /// the presence routes read theirs.
    pub fn route(&self, method: &Method, path: &str) -> Option<Route> {
        let get = method == Method::GET || method == Method::HEAD;
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        if let Some(route) = presence_route(method, path, query) {
            return Some(route);
        }
        let route = match path {
            "/api/v1/publish" if method == Method::POST => Route::Publish,
            "/api/v1/publish/batch" if method == Method::POST => Route::PublishBatch,
            "/api/v1/stats" if get => Route::Stats,
            "/api/v1/publish" | "/api/v1/publish/batch" | "/api/v1/stats" => {
                Route::ApiMethodNotAllowed
            }
            p if p == "/api" || p.starts_with("/api/") => Route::ApiNotFound,
            "/healthz" if get => Route::Health,
            "/readyz" if get => Route::Ready,
            "/metrics" if get => Route::Metrics,
            "/pgdn.js" if get => Route::Script,
            "/" if get && self.inner.config.demo_page => Route::DemoPage,
            _ => return None,
        };
        Some(route)
    }

    /// Answers a request [`Service::route`] matched. `body` is the
    /// request body as a stream of chunks; it is read only for a publish
    /// with the right key, and never past the body limit. (Adapters that
    /// know the peer's address call [`Service::respond_from`], so that
    /// refusals are logged with it.)
    pub async fn respond<S, E>(&self, route: Route, headers: &HeaderMap, body: S) -> HttpResponse
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
    {
        self.respond_from(route, headers, body, None).await
    }

    /// [`Service::respond`] for a request from `remote` (the peer's
    /// address): a refused publish (wrong key, body too large) is logged
    /// with the client's address.
    pub async fn respond_from<S, E>(
        &self,
        route: Route,
        headers: &HeaderMap,
        body: S,
        remote: Option<SocketAddr>,
    ) -> HttpResponse
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
    {
        let remote = || {
            Remote(client_ip(
                remote,
                headers,
                &self.inner.config.trusted_proxies,
            ))
        };
        match route {
            Route::Health => self.health(),
            Route::Ready => self.ready(),
            Route::Metrics => ok_text(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.inner.metrics.render(),
            ),
            Route::Script => {
                let mut res = ok_text(crate::assets::JS_CONTENT_TYPE, crate::assets::PGDN_JS);
                // Revalidate on every load, so pages pick up a new server's client.
                res.headers_mut()
                    .insert(header::CACHE_CONTROL, "no-cache".parse().expect("valid"));
                res
            }
            Route::DemoPage => ok_text("text/html; charset=utf-8", self.inner.demo_page.clone()),
            api => {
                let started = Instant::now();
                let res = match self.check_key(headers, remote) {
                    Err(res) => res,
                    Ok(()) => match &api {
                        Route::Publish => self.publish(headers, body, remote).await,
                        Route::PublishBatch => self.publish_batch(headers, body, remote).await,
                        Route::Stats => self.stats().await,
                        Route::PresenceOf(user) => self.presence_of(user).await,
                        Route::PresenceMany => self.presence_many(headers, body, remote).await,
                        Route::GroupPresence {
                            group,
                            after,
                            limit,
                        } => self.group_presence(group, after.as_deref(), *limit).await,
                        Route::ApiMethodNotAllowed => {
                            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
                        }
                        Route::ApiBadQuery => json_error(
                            StatusCode::BAD_REQUEST,
                            &format!("limit must be a number from 1 to {MAX_PRESENCE_PAGE}"),
                        ),
                        _ => json_error(StatusCode::NOT_FOUND, "not found"),
                    },
                };
                let endpoint = match api {
                    Route::Publish => "publish",
                    Route::PublishBatch => "publish_batch",
                    _ => return res,
                };
                let outcome = match res.status() {
                    s if s.is_success() => "ok",
                    StatusCode::UNAUTHORIZED => "unauthorized",
                    s if s.is_server_error() => "unavailable",
                    _ => "bad_request",
                };
                self.inner
                    .metrics
                    .publish_request(endpoint, outcome, started.elapsed());
                res
            }
        }
    }

    /// `GET /healthz`: `ok` while the process serves; 503 while shutting
    /// down.
    pub fn health(&self) -> HttpResponse {
        if self.is_shutting_down() {
            let mut res = ok_text("text/plain; charset=utf-8", "shutting down");
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            res
        } else {
            ok_text("text/plain; charset=utf-8", "ok")
        }
    }

    /// `GET /readyz` (docs/protocol.md section 5): `ready`, or 503 with why not.
    pub fn ready(&self) -> HttpResponse {
        if self.is_shutting_down() {
            json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
        } else if let Err(why) = self.hub().readiness() {
            json_error(StatusCode::SERVICE_UNAVAILABLE, &why)
        } else {
            ok_text("text/plain; charset=utf-8", "ready")
        }
    }

    /// Requires `Authorization: Bearer <publish key>`, compared in
    /// constant time.
    #[allow(clippy::result_large_err)] // a refusal is the answer to send; cold path
    fn check_key(
        &self,
        headers: &HeaderMap,
        remote: impl Fn() -> Remote,
    ) -> std::result::Result<(), HttpResponse> {
        let metrics = &self.inner.metrics;
        let refuse = |reason: &'static str, message: &str| {
            // Never the key that was sent, only that it was wrong.
            tracing::info!(
                remote = %remote(),
                reason,
                code = 401,
                "api request refused: authentication failed"
            );
            metrics.api_request("unauthorized");
            Err(json_error(StatusCode::UNAUTHORIZED, message))
        };
        if headers.get(header::AUTHORIZATION).is_none() {
            return refuse("missing_publish_key", "missing publish key");
        }
        let given = bearer(headers).unwrap_or("").as_bytes();
        // Every key is compared, in constant time, whichever matches: the
        // time taken does not tell which key (or how much of one) matched.
        let matched = self
            .inner
            .publish_keys
            .iter()
            .fold(subtle::Choice::from(0), |any, key| {
                any | given.ct_eq(key.as_bytes())
            });
        if bool::from(matched) {
            Ok(())
        } else {
            refuse("invalid_publish_key", "invalid publish key")
        }
    }

    /// Reads a JSON body up to the limit and within the body timeout and
    /// parses it; 400/413/408 otherwise.
    async fn read_json<T, S, E>(
        &self,
        headers: &HeaderMap,
        body: S,
        remote: impl Fn() -> Remote,
    ) -> std::result::Result<T, HttpResponse>
    where
        T: serde::de::DeserializeOwned,
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
    {
        let limit = self.inner.config.max_body_size;
        let bad = |status, message: String| {
            self.inner.metrics.api_request("bad_request");
            json_error(status, &message)
        };
        let too_large = || {
            tracing::info!(
                remote = %remote(),
                reason = "body_too_large",
                code = 413,
                limit,
                "api request refused: limit exceeded"
            );
            bad(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {limit} bytes"),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|l| l > limit) {
            return Err(too_large());
        }
        let mut body = std::pin::pin!(body);
        let mut buf = BytesMut::new();
        let read = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .map_err(|_| bad(StatusCode::BAD_REQUEST, "could not read body".into()))?;
                if (buf.len() + chunk.len()) as u64 > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(())
        };
        // A body that trickles in must not hold the request (and its
        // connection) open: 408, and the connection is closed, since the
        // rest of the body would otherwise be read as the next request.
        let timeout = self.inner.config.body_timeout;
        match tokio::time::timeout(timeout, read).await {
            Ok(read) => read?,
            Err(_) => {
                let mut res = bad(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "body not received within {}",
                        humantime::format_duration(timeout)
                    ),
                );
                res.headers_mut()
                    .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                return Err(res);
            }
        }
        if buf.is_empty() {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "empty body: expected JSON".into(),
            ));
        }
        serde_json::from_slice(&buf)
            .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))
    }

    fn publish_error(&self, e: Error) -> HttpResponse {
        match e {
            Error::InvalidPublish(m) => {
                self.inner.metrics.api_request("bad_request");
                json_error(StatusCode::BAD_REQUEST, &m)
            }
            other => {
                // While the broker is away every publish fails the same
                // way; the broker logs the outage itself, once.
                if matches!(other, Error::Broker(_)) {
                    tracing::debug!(error = %other, "publish refused (503)");
                } else {
                    tracing::warn!(error = %other, "publish failed");
                }
                self.inner.metrics.api_request("unavailable");
                json_error(StatusCode::SERVICE_UNAVAILABLE, &other.to_string())
            }
        }
    }

    /// `POST /api/v1/publish`. The publish is cancel-safe
    /// ([`Hub::publish`](crate::Hub::publish)): a publisher that hangs up
    /// mid-way leaves its id free for the retry.
    async fn publish<S, E>(
        &self,
        headers: &HeaderMap,
        body: S,
        remote: impl Fn() -> Remote,
    ) -> HttpResponse
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
    {
        let req: PublishRequest = match self.read_json(headers, body, remote).await {
            Ok(req) => req,
            Err(res) => return res,
        };
        match self.inner.hub.publish(req).await {
            Ok(receipt) => {
                self.inner.metrics.api_request("ok");
                json_ok(&receipt)
            }
            Err(e) => self.publish_error(e),
        }
    }

    /// `POST /api/v1/publish/batch`: all or nothing for malformed items.
    async fn publish_batch<S, E>(
        &self,
        headers: &HeaderMap,
        body: S,
        remote: impl Fn() -> Remote,
    ) -> HttpResponse
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
    {
        let reqs: Vec<PublishRequest> = match self.read_json(headers, body, remote).await {
            Ok(reqs) => reqs,
            Err(res) => return res,
        };
        let max = self.inner.config.max_batch_len;
        if reqs.len() > max {
            self.inner.metrics.api_request("bad_request");
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("batch larger than {max} items"),
            );
        }
        match self.inner.hub.publish_batch(reqs).await {
            Ok(receipts) => {
                self.inner.metrics.api_request("ok");
                json_ok(&receipts)
            }
            Err(e) => self.publish_error(e),
        }
    }

    /// `GET /api/v1/stats`: this node's numbers; in cluster mode the totals,
    /// `users` and `groups` are the cluster's, `nodes` lists the live nodes
    /// and `node` keeps this node's own numbers.
    /// `GET /api/v1/presence/{user}`.
    async fn presence_of(&self, user: &str) -> HttpResponse {
        match self.inner.hub.presence(user).await {
            Ok(p) => json_ok(&p),
            Err(e) => presence_error(e),
        }
    }

    /// `POST /api/v1/presence` with `{"users":[...]}` (at most
    /// [`MAX_PRESENCE_USERS`]): `{"users":[<presence>...]}`, in order.
    async fn presence_many<S, E>(
        &self,
        headers: &HeaderMap,
        body: S,
        remote: impl Fn() -> Remote,
    ) -> HttpResponse
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
    {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            users: Vec<String>,
        }
        let req: Body = match self.read_json(headers, body, remote).await {
            Ok(req) => req,
            Err(res) => return res,
        };
        if req.users.len() > MAX_PRESENCE_USERS {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "users lists {} users, more than {MAX_PRESENCE_USERS}",
                    req.users.len()
                ),
            );
        }
        if req.users.iter().any(String::is_empty) {
            return json_error(StatusCode::BAD_REQUEST, "users: an empty user id");
        }
        let users: Vec<&str> = req.users.iter().map(String::as_str).collect();
        match self.inner.hub.presence_of(&users).await {
            Ok(p) => json_ok(&serde_json::json!({ "users": p })),
            Err(e) => presence_error(e),
        }
    }

    /// `GET /api/v1/groups/{group}/presence`.
    async fn group_presence(&self, group: &str, after: Option<&str>, limit: usize) -> HttpResponse {
        match self.inner.hub.group_presence(group, after, limit).await {
            Ok(p) => json_ok(&p),
            Err(e) => presence_error(e),
        }
    }

    async fn stats(&self) -> HttpResponse {
        let hub = &self.inner.hub;
        let local = hub.stats();
        let cluster = match hub.cluster_stats().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cluster stats unavailable");
                return json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cluster stats unavailable: {e}"),
                );
            }
        };
        let mut body = serde_json::to_value(&local).expect("stats serialize");
        if let Some(c) = cluster {
            let node = body.clone();
            let obj = body.as_object_mut().expect("stats are an object");
            obj.insert("total_users".into(), c.total_users.into());
            obj.insert("total_connections".into(), c.total_connections.into());
            obj.insert("total_groups".into(), c.groups.len().into());
            obj.insert("users".into(), serde_json::json!(c.users));
            obj.insert("groups".into(), serde_json::json!(c.groups));
            obj.insert("nodes".into(), serde_json::json!(c.nodes));
            obj.insert("node".into(), node);
        }
        json_ok(&body)
    }
}
