//! A custom authenticator and a custom inbound message handler.
//!
//! ```text
//! cargo run -p pgdn-examples --example auth
//! ```
//!
//! - [`SessionStore`] implements [`Authenticator`]: subscriber tokens (or
//!   the app's `session` cookie, for a logged-in browser) are
//!   opaque session ids looked up in a table (standing in for your database
//!   or session store), not JWTs. Unlike a JWT, a session can be revoked:
//!   `POST /logout` with `Authorization: Bearer <token>` deletes it and
//!   disconnects the user's open WebSockets (close 1008).
//! - A handler for client frames of type `chat`:
//!   `{"type":"chat","room":"lobby","text":"hi"}` is sent as a `chat`
//!   notification to every member of the group `room`; the sender gets
//!   `{"type":"chat_sent","id":"...","delivered":N}` back, or an `error`
//!   frame with code `handler_error`.
//!
//! Demo sessions: `alice-token` (alice: groups lobby, admins), `bob-token`
//! (bob: lobby), `carol-token` (carol: no groups). It listens on
//! `127.0.0.1:3001` (or `127.0.0.1:$PORT`); the demo page at `/` works with
//! these tokens and can send chat frames from the browser console with
//! `pgdnDemo.send({type: "chat", room: "lobby", text: "hi"})`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pgdn_examples::{DEV_PUBLISH_KEY, env_or, init_tracing, key_for_curl};
use pgdn_server::core::{HandlerError, Hub};
use pgdn_server::{
    AuthError, AuthRequest, Authenticator, Identity, MessageType, Pgdn, shutdown_signal,
};
use serde_json::{Map, Value, json};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

/// The demo sessions: token, user, groups.
pub const DEMO_SESSIONS: &[(&str, &str, &[&str])] = &[
    ("alice-token", "alice", &["lobby", "admins"]),
    ("bob-token", "bob", &["lobby"]),
    ("carol-token", "carol", &[]),
];

/// Sessions by token: a stand-in for a database table or Redis.
///
/// Cheap to clone; every clone sees the same sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionStore {
    sessions: Arc<RwLock<HashMap<String, Identity>>>,
}

impl SessionStore {
    /// A store holding [`DEMO_SESSIONS`].
    pub fn with_demo_sessions() -> Self {
        let store = SessionStore::default();
        for (token, user, groups) in DEMO_SESSIONS {
            store.insert(token, Identity::new(*user, groups.iter().copied()));
        }
        store
    }

    /// Opens a session: `token` now authenticates as `identity`.
    pub fn insert(&self, token: &str, identity: Identity) {
        self.write().insert(token.to_string(), identity);
    }

    /// Closes a session; returns whose it was.
    pub fn revoke(&self, token: &str) -> Option<Identity> {
        self.write().remove(token)
    }

    /// The identity of a session, if it exists.
    pub fn get(&self, token: &str) -> Option<Identity> {
        self.sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Identity>> {
        self.sessions.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Authenticator for SessionStore {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        // The session id comes as `?token=` (or Bearer) from scripts, or
        // as the app's `session` cookie from a logged-in browser.
        let token = match req.token.filter(|t| !t.is_empty()) {
            Some(t) => t,
            None => req.cookie("session").ok_or(AuthError::MissingToken)?,
        };
        // A real store would be an async query here (sqlx, redis, an HTTP
        // call to an auth service). Never log `token`.
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.get(token)
            .ok_or_else(|| AuthError::InvalidToken("no such session".into()))
    }
}

/// Builds pgdn with the session store as its authenticator and registers the
/// `chat` handler.
pub fn build_pgdn(sessions: SessionStore, publish_key: &str) -> pgdn_server::Result<Pgdn> {
    let pgdn = Pgdn::builder()
        .authenticator(sessions)
        .publish_key(publish_key)
        .build()?;
    // The hub owns its handlers, so a handler holds a weak handle to it.
    let hub = pgdn.hub().downgrade();
    pgdn.hub().register_handler(
        "chat",
        move |sender: Identity, frame: Map<String, Value>| {
            let hub = hub.upgrade();
            async move {
                let hub = hub.ok_or_else(|| HandlerError::new("server shutting down"))?;
                chat(&hub, &sender, &frame).await
            }
        },
    )?;
    Ok(pgdn)
}

/// Handles `{"type":"chat","room":"<group>","text":"<text>"}` from `sender`:
/// posts the text to the room (a group) if the sender is a member.
async fn chat(
    hub: &Hub,
    sender: &Identity,
    frame: &Map<String, Value>,
) -> Result<Option<Value>, HandlerError> {
    let room = frame
        .get("room")
        .and_then(Value::as_str)
        .ok_or_else(|| HandlerError::new("`room` must be a string"))?;
    let text = frame
        .get("text")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.chars().count() <= 2000)
        .ok_or_else(|| HandlerError::new("`text` must be 1 to 2000 characters"))?;
    if !sender.in_group(room) {
        return Err(HandlerError::new(format!("you are not in room `{room}`")));
    }
    let kind = MessageType::new("chat").map_err(|e| HandlerError::new(e.to_string()))?;
    let payload = json!({
        "title": format!("{} in #{room}", sender.user_id),
        "message": text,
        "from": &*sender.user_id,
        "room": room,
    });
    let receipt = hub
        .notify_group(room, kind, payload)
        .await
        .map_err(|e| HandlerError::new(e.to_string()))?;
    // Sent back to the sender alone.
    Ok(Some(json!({
        "type": "chat_sent",
        "id": receipt.id,
        "delivered": receipt.delivered,
    })))
}

/// The app: `POST /logout`, then everything pgdn serves.
pub fn app(
    pgdn: &Pgdn,
    sessions: &SessionStore,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + use<> {
    let routes = pgdn.routes();
    let (pgdn, sessions) = (pgdn.clone(), sessions.clone());
    let logout = warp::path!("logout")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .map(move |auth: Option<String>| {
            let token = auth.as_deref().and_then(|h| h.strip_prefix("Bearer "));
            match token.and_then(|t| sessions.revoke(t)) {
                Some(identity) => {
                    // Revoking the session alone would not end open sockets.
                    let closed = pgdn.hub().disconnect_user(&identity.user_id);
                    warp::reply::json(&json!({ "user_id": &*identity.user_id, "closed": closed }))
                        .into_response()
                }
                None => warp::reply::with_status(
                    warp::reply::json(&json!({ "error": "no such session" })),
                    StatusCode::UNAUTHORIZED,
                )
                .into_response(),
            }
        });
    logout.or(routes).unify()
}

/// Serves the app until Ctrl-C or SIGTERM.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();

    let publish_key = env_or("PGDN_PUBLISH_KEY", DEV_PUBLISH_KEY);
    let key = key_for_curl();
    let sessions = SessionStore::with_demo_sessions();
    let pgdn = build_pgdn(sessions.clone(), &publish_key)?;

    let port = match std::env::var("PORT") {
        Ok(p) => p.parse()?,
        Err(_) => 3001,
    };
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let addr = listener.local_addr()?;

    println!("auth example listening on http://{addr}\n\nDemo sessions (token: user, groups):");
    for (token, user, groups) in DEMO_SESSIONS {
        println!("  {token:<12} {user}, [{}]", groups.join(", "));
    }
    println!(
        r#"
Open as alice and as bob (two tabs):
  http://{addr}/?token=alice-token
  http://{addr}/?token=bob-token
then in alice's browser console:
  pgdnDemo.send({{type: "chat", room: "lobby", text: "hi bob"}})

WebSocket:  ws://{addr}/ws?token=alice-token
  send {{"type":"chat","room":"lobby","text":"hi"}}   -> a "chat" notification to the lobby
Publish:    curl -sS http://{addr}/api/v1/publish -H "Authorization: Bearer {key}" \
              -H 'Content-Type: application/json' \
              -d '{{"target":{{"group":"admins"}},"type":"warning","payload":{{"message":"for admins"}}}}'
Log out:    curl -sS -X POST http://{addr}/logout -H 'Authorization: Bearer bob-token'
            (revokes the session and closes bob's sockets with 1008)
"#
    );

    pgdn.serve_routes(app(&pgdn, &sessions), listener, shutdown_signal())
        .await;
    Ok(())
}
