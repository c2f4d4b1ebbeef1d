//! The publish API (PROTOCOL.md section 5): `POST /api/v1/publish`,
//! `POST /api/v1/publish/batch`, `GET /api/v1/stats`, all behind the
//! publish key, plus JSON error replies.
//!
//! Once a request's path is one of ours, every failure becomes a JSON reply
//! here (`recover` scoped to these routes), so a warp app that mounts pgdn
//! beside its own routes still reaches its own routes for other paths.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use pgdn_core::{Hub, PublishRequest};
use serde::Serialize;
use subtle::ConstantTimeEq;
use warp::http::{StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::server::Shared;

/// A JSON error reply: `{"error":"<text>"}`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
    }
    warp::reply::with_status(warp::reply::json(&Body { error: message }), status).into_response()
}

/// An API failure, carried as a rejection until `recover` turns it into JSON.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl warp::reject::Reject for ApiError {}

fn reject(status: StatusCode, message: impl Into<String>) -> Rejection {
    warp::reject::custom(ApiError {
        status,
        message: message.into(),
    })
}

/// Turns any rejection under our API paths into a JSON reply.
pub(crate) async fn recover(err: Rejection) -> Result<Response, Infallible> {
    let (status, message) = if let Some(e) = err.find::<ApiError>() {
        (e.status, e.message.clone())
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
    } else if err.is_not_found() {
        (StatusCode::NOT_FOUND, "not found".into())
    } else {
        (StatusCode::BAD_REQUEST, "bad request".into())
    };
    Ok(json_error(status, &message))
}

fn with_shared(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Arc<Shared>,), Error = Infallible> + Clone {
    warp::any().map(move || shared.clone())
}

/// Requires `Authorization: Bearer <publish key>`, compared in constant time.
fn authorized(shared: Arc<Shared>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>(header::AUTHORIZATION.as_str())
        .and(with_shared(shared))
        .and_then(|value: Option<String>, shared: Arc<Shared>| async move {
            let Some(value) = value else {
                shared.metrics.api_request("unauthorized");
                return Err(reject(StatusCode::UNAUTHORIZED, "missing publish key"));
            };
            let given = value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, key)| key.trim())
                .unwrap_or("");
            if bool::from(given.as_bytes().ct_eq(shared.publish_key.as_bytes())) {
                Ok(())
            } else {
                shared.metrics.api_request("unauthorized");
                Err(reject(StatusCode::UNAUTHORIZED, "invalid publish key"))
            }
        })
        .untuple_one()
}

/// Reads the body up to `limit` bytes, also when it is chunked; 413 past it.
fn body_limited(limit: u64) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>(header::CONTENT_LENGTH.as_str())
        .and(warp::body::stream())
        .and_then(move |len: Option<u64>, body| async move {
            if len.is_some_and(|l| l > limit) {
                return Err(too_large(limit));
            }
            read_limited(body, limit).await
        })
}

fn too_large(limit: u64) -> Rejection {
    reject(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("body larger than {limit} bytes"),
    )
}

async fn read_limited<S, B>(body: S, limit: u64) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|_| reject(StatusCode::BAD_REQUEST, "could not read body"))?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(too_large(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// Turns the rejections of a route whose path and method matched into a
/// JSON reply, so that they never mix with other routes' rejections.
fn answered<F>(route: F) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone
where
    F: Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static,
{
    route.recover(recover).unify()
}

/// The API routes: publish, batch, stats, and a JSON 404 for other paths
/// under `/api` (behind the key too).
pub(crate) fn routes(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let limit = shared.config.max_body_size;
    let publish = warp::path!("api" / "v1" / "publish")
        .and(warp::post())
        .and(answered(
            authorized(shared.clone())
                .and(body_limited(limit))
                .and(with_shared(shared.clone()))
                .and_then(publish),
        ));
    let batch = warp::path!("api" / "v1" / "publish" / "batch")
        .and(warp::post())
        .and(answered(
            authorized(shared.clone())
                .and(body_limited(limit))
                .and(with_shared(shared.clone()))
                .and_then(publish_batch),
        ));
    let stats = warp::path!("api" / "v1" / "stats")
        .and(warp::get())
        .and(answered(
            authorized(shared.clone())
                .and(with_shared(shared.clone()))
                .and_then(stats),
        ));
    let fallback = warp::path("api")
        .and(answered(authorized(shared).and_then(|| async {
            Err::<Response, _>(reject(StatusCode::NOT_FOUND, "not found"))
        })));
    publish
        .or(batch)
        .unify()
        .or(stats)
        .unify()
        .or(fallback)
        .unify()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Rejection> {
    if body.is_empty() {
        return Err(reject(StatusCode::BAD_REQUEST, "empty body: expected JSON"));
    }
    serde_json::from_slice(body)
        .map_err(|e| reject(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))
}

fn publish_error(shared: &Shared, e: pgdn_core::Error) -> Rejection {
    match e {
        pgdn_core::Error::InvalidPublish(m) => {
            shared.metrics.api_request("bad_request");
            reject(StatusCode::BAD_REQUEST, m)
        }
        other => {
            tracing::error!(error = %other, "publish failed");
            shared.metrics.api_request("unavailable");
            reject(StatusCode::SERVICE_UNAVAILABLE, other.to_string())
        }
    }
}

/// Runs a publish in its own task, so that it completes even when the
/// publisher gives up waiting and hangs up (hyper then drops the request's
/// future): its retry with the same id must find the first publish done,
/// not abandoned half-way with the id already taken.
async fn detached<T, F, Fut>(shared: &Shared, f: F) -> pgdn_core::Result<T>
where
    T: Send + 'static,
    F: FnOnce(Hub) -> Fut,
    Fut: Future<Output = pgdn_core::Result<T>> + Send + 'static,
{
    tokio::spawn(f(shared.hub.clone()))
        .await
        .unwrap_or_else(|e| {
            Err(pgdn_core::Error::Broker(format!(
                "publish task failed: {e}"
            )))
        })
}

async fn publish(body: Bytes, shared: Arc<Shared>) -> Result<Response, Rejection> {
    let req: PublishRequest =
        parse(&body).inspect_err(|_| shared.metrics.api_request("bad_request"))?;
    let receipt = detached(&shared, async move |hub: Hub| hub.publish(req).await)
        .await
        .map_err(|e| publish_error(&shared, e))?;
    shared.metrics.api_request("ok");
    Ok(warp::reply::json(&receipt).into_response())
}

/// `GET /api/v1/stats`: this node's numbers; in cluster mode the totals,
/// `users` and `groups` are the cluster's, `nodes` lists the live nodes and
/// `node` keeps this node's own numbers.
async fn stats(shared: Arc<Shared>) -> Result<Response, Rejection> {
    let local = shared.hub.stats();
    let cluster = shared.hub.cluster_stats().await.map_err(|e| {
        tracing::warn!(error = %e, "cluster stats unavailable");
        reject(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cluster stats unavailable: {e}"),
        )
    })?;
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
    Ok(warp::reply::json(&body).into_response())
}

async fn publish_batch(body: Bytes, shared: Arc<Shared>) -> Result<Response, Rejection> {
    let reqs: Vec<PublishRequest> =
        parse(&body).inspect_err(|_| shared.metrics.api_request("bad_request"))?;
    if reqs.len() > shared.config.max_batch_len {
        shared.metrics.api_request("bad_request");
        return Err(reject(
            StatusCode::BAD_REQUEST,
            format!("batch larger than {} items", shared.config.max_batch_len),
        ));
    }
    let receipts = detached(&shared, async move |hub: Hub| hub.publish_batch(reqs).await)
        .await
        .map_err(|e| publish_error(&shared, e))?;
    shared.metrics.api_request("ok");
    Ok(warp::reply::json(&receipts).into_response())
}
