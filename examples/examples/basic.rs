//! pgdn's Quick Start: a warp app that mounts pgdn next to its own routes and
//! notifies users in-process.
//!
//! ```text
//! cargo run -p pgdn-examples --example basic
//! ```
//!
//! It serves, on `127.0.0.1:3000` (or `127.0.0.1:$PORT`):
//!
//! - pgdn's routes: subscribers at `/ws?token=<jwt>`, the publish API under
//!   `/api/v1`, `/healthz`, `/metrics` and the demo page at `/`;
//! - the app's own `POST /trigger` with a body like
//!   `{"user_id":"u1","message":"Your export is ready"}`, which calls
//!   `pgdn.hub().notify_user(...)`: no HTTP round trip, no publish key.
//!
//! Secrets come from `PGDN_JWT_SECRET` and `PGDN_PUBLISH_KEY`, with
//! development fallbacks. At startup it prints a token for user `u1`, the
//! demo page URL and a curl command for `/trigger`.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use pgdn_examples::{DEV_PUBLISH_KEY, env_or, init_tracing, key_for_curl};
use pgdn_server::{JwtAuthenticator, MessageType, Pgdn, shutdown_signal};
use serde::Deserialize;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

/// Used when `PGDN_JWT_SECRET` is not set. Never in production.
const DEV_JWT_SECRET: &str = "dev-only-jwt-secret-change-me-in-production";

/// The body of `POST /trigger`.
#[derive(Debug, Deserialize)]
pub struct Trigger {
    /// Who to notify.
    pub user_id: String,
    /// The notification text.
    pub message: String,
    /// An optional title (default "Notification").
    #[serde(default)]
    pub title: Option<String>,
}

/// Builds pgdn with the built-in JWT authenticator.
pub fn build_pgdn(jwt_secret: &str, publish_key: &str) -> pgdn_server::Result<Pgdn> {
    Pgdn::builder()
        .jwt_secret(jwt_secret)
        .publish_key(publish_key)
        .build()
}

/// The app: its own `POST /trigger`, then everything pgdn serves.
pub fn app(pgdn: &Pgdn) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
    let with_pgdn = {
        let pgdn = pgdn.clone();
        warp::any().map(move || pgdn.clone())
    };
    let trigger = warp::path!("trigger")
        .and(warp::post())
        .and(warp::body::content_length_limit(16 * 1024))
        .and(warp::body::json())
        .and(with_pgdn)
        .and_then(trigger);
    trigger.or(pgdn.routes()).unify()
}

/// `POST /trigger`: notifies one user from inside the app and returns the
/// receipt, `{"id":"...","delivered":N}`.
async fn trigger(body: Trigger, pgdn: Pgdn) -> Result<Response, Infallible> {
    let payload = json!({
        "title": body.title.as_deref().unwrap_or("Notification"),
        "message": body.message,
    });
    let reply = match pgdn
        .hub()
        .notify_user(&body.user_id, MessageType::info(), payload)
        .await
    {
        Ok(receipt) => warp::reply::json(&receipt).into_response(),
        Err(e) => {
            // A broker failure is worth a retry; anything else is a bad request.
            let status = match e {
                pgdn_server::core::Error::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            let body = warp::reply::json(&json!({ "error": e.to_string() }));
            warp::reply::with_status(body, status).into_response()
        }
    };
    Ok(reply)
}

/// Serves the app until Ctrl-C or SIGTERM.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();

    let jwt_secret = env_or("PGDN_JWT_SECRET", DEV_JWT_SECRET);
    let publish_key = env_or("PGDN_PUBLISH_KEY", DEV_PUBLISH_KEY);
    let pgdn = build_pgdn(&jwt_secret, &publish_key)?;

    let port = match std::env::var("PORT") {
        Ok(p) => p.parse()?,
        Err(_) => 3000,
    };
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let addr = listener.local_addr()?;

    // Your backend issues tokens like this one after its own login.
    let token = JwtAuthenticator::new(&jwt_secret).issue("u1", &[], Duration::from_secs(3600))?;
    let key = key_for_curl();
    println!(
        r#"basic example listening on http://{addr}

Token for user "u1" (1 h):
  {token}

Demo page:  http://{addr}/?token={token}
WebSocket:  ws://{addr}/ws?token=<token>

Notify u1 through the app's own route:
  curl -sS http://{addr}/trigger -H 'Content-Type: application/json' \
    -d '{{"user_id":"u1","message":"Your export is ready"}}'

Or through pgdn's publish API:
  curl -sS http://{addr}/api/v1/publish -H "Authorization: Bearer {key}" \
    -H 'Content-Type: application/json' \
    -d '{{"target":{{"user":"u1"}},"type":"success","payload":{{"title":"Done","message":"via the API"}}}}'
"#
    );

    // Stop accepting on Ctrl-C / SIGTERM, then close every connection with 1001.
    pgdn.serve_routes(app(&pgdn), listener, shutdown_signal())
        .await;
    Ok(())
}
