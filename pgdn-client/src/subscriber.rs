//! A subscriber that stays connected: it reconnects by itself with jittered
//! backoff, resumes with `since=<last id>` so that nothing published while
//! it was away is missed (PROTOCOL.md section 4), keeps the connection alive
//! with pings, asks for a fresh token before each reconnect, and stops with
//! [`Error::Unauthorized`] on close code 1008 instead of retrying forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use pgdn_core::Notification;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::error::{Error, Result};
use crate::retry::Backoff;

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A connection was established (first, and after each reconnect).
    Connected {
        /// The user the token belongs to.
        user_id: String,
        /// The server's id of this connection.
        connection_id: String,
        /// Whether it resumed from an earlier message (`since=`).
        resumed: bool,
    },
    /// A notification.
    Notification(Notification),
    /// The server could not replay everything missed since the last
    /// message (`history_gap`): refetch your state. What it still had
    /// follows.
    HistoryGap,
    /// Any other frame: a pong, a handler's reply, an error frame.
    Frame(Value),
    /// The connection ended; the subscriber reconnects after `retry_in`.
    Disconnected {
        /// The close code, when the server sent one.
        code: Option<u16>,
        /// The close reason or the error.
        reason: String,
        /// How long until the next attempt.
        retry_in: Duration,
    },
}

type TokenFuture = Pin<Box<dyn Future<Output = std::result::Result<String, String>> + Send>>;

#[derive(Clone)]
enum TokenSource {
    Fixed(String),
    Callback(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl TokenSource {
    async fn get(&self) -> std::result::Result<String, String> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::Callback(f) => f().await,
        }
    }
}

/// Builds a [`Subscription`].
#[derive(Clone)]
pub struct SubscriberBuilder {
    url: String,
    token: TokenSource,
    since: Option<String>,
    backoff: Backoff,
    ping_interval: Duration,
    buffer: usize,
}

impl std::fmt::Debug for SubscriberBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("SubscriberBuilder")
            .field("url", &self.url)
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

/// Entry point: `Subscriber::new(url, token).subscribe()`.
#[derive(Debug)]
pub struct Subscriber;

impl Subscriber {
    /// Subscribes at `url` (e.g. `ws://127.0.0.1:8000/ws`) with a fixed
    /// token.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> SubscriberBuilder {
        SubscriberBuilder::new(url.into(), TokenSource::Fixed(token.into()))
    }

    /// Subscribes at `url`, asking `tokens` for a token before every
    /// connection attempt (so an expired token is replaced). An error from
    /// it ends the subscription with [`Error::Token`].
    pub fn with_token_callback<F, Fut>(url: impl Into<String>, tokens: F) -> SubscriberBuilder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<String, String>> + Send + 'static,
    {
        let f = Arc::new(move || -> TokenFuture { Box::pin(tokens()) });
        SubscriberBuilder::new(url.into(), TokenSource::Callback(f))
    }
}

impl SubscriberBuilder {
    fn new(url: String, token: TokenSource) -> Self {
        SubscriberBuilder {
            url,
            token,
            since: None,
            backoff: Backoff {
                initial: Duration::from_millis(250),
                max: Duration::from_secs(30),
            },
            ping_interval: Duration::from_secs(25),
            buffer: 256,
        }
    }

    /// Resumes from this message id on the first connection (later ones
    /// resume from the last message received).
    pub fn since(mut self, id: impl Into<String>) -> Self {
        self.since = Some(id.into());
        self
    }

    /// Reconnect backoff: the first wait is at most `initial` (default
    /// 250 ms), doubling up to `max` (default 30 s), with jitter.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff { initial, max };
        self
    }

    /// How often to ping the server; a connection silent for twice this
    /// long is considered dead and replaced. Default 25 s.
    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    /// Starts the subscription on the current tokio runtime.
    pub fn subscribe(self) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer.max(1));
        let last_id = Arc::new(Mutex::new(self.since.clone()));
        let task = tokio::spawn(drive(self, tx, last_id.clone()));
        Subscription { rx, task, last_id }
    }
}

/// A running subscription: a `Stream` of [`Event`]s. It ends after an
/// `Err` (auth failure, token callback failure); dropping it disconnects.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<Event>>,
    task: JoinHandle<()>,
    last_id: Arc<Mutex<Option<String>>>,
}

impl Subscription {
    /// The id of the last notification received: where a resume starts.
    pub fn last_id(&self) -> Option<String> {
        self.last_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The next notification, skipping other events; `None` once the
    /// subscription ended, `Err` when it ended with an error.
    pub async fn next_notification(&mut self) -> Option<Result<Notification>> {
        while let Some(event) = self.next().await {
            match event {
                Ok(Event::Notification(n)) => return Some(Ok(n)),
                Ok(_) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

impl Stream for Subscription {
    type Item = Result<Event>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Percent-encodes a query value (tokens may be any string).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum End {
    /// 1008: stop.
    Unauthorized(String),
    /// The consumer dropped the subscription.
    Gone,
    /// Reconnect; `connected` says whether the connection got as far as
    /// the connection frame (then the backoff starts over).
    Closed {
        code: Option<u16>,
        reason: String,
        connected: bool,
    },
}

async fn drive(
    cfg: SubscriberBuilder,
    tx: mpsc::Sender<Result<Event>>,
    last_id: Arc<Mutex<Option<String>>>,
) {
    let mut failures = 0u32;
    loop {
        let token = match cfg.token.get().await {
            Ok(t) => t,
            Err(e) => {
                let _ = tx.send(Err(Error::Token(e))).await;
                return;
            }
        };
        let since = last_id.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sep = if cfg.url.contains('?') { '&' } else { '?' };
        let mut url = format!("{}{sep}token={}", cfg.url, encode(&token));
        if let Some(since) = &since {
            url.push_str(&format!("&since={}", encode(since)));
        }
        let end = match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => session(ws, &cfg, &tx, &last_id, since.is_some()).await,
            Err(e) => End::Closed {
                code: None,
                reason: e.to_string(),
                connected: false,
            },
        };
        match end {
            End::Unauthorized(reason) => {
                let _ = tx.send(Err(Error::Unauthorized(reason))).await;
                return;
            }
            End::Gone => return,
            End::Closed {
                code,
                reason,
                connected,
            } => {
                failures = if connected { 1 } else { failures + 1 };
                let retry_in = cfg.backoff.delay(failures);
                tracing::debug!(?code, %reason, ?retry_in, "subscriber disconnected");
                let event = Event::Disconnected {
                    code,
                    reason,
                    retry_in,
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

async fn session<S>(
    mut ws: S,
    cfg: &SubscriberBuilder,
    tx: &mpsc::Sender<Result<Event>>,
    last_id: &Mutex<Option<String>>,
    resumed: bool,
) -> End
where
    S: Stream<Item = std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
{
    let mut connected = false;
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.tick().await;
    let mut last_seen = tokio::time::Instant::now();
    loop {
        let msg = tokio::select! {
            msg = ws.next() => msg,
            _ = ping.tick() => {
                if last_seen.elapsed() >= cfg.ping_interval * 2 {
                    return End::Closed { code: None, reason: "no traffic from the server".into(), connected };
                }
                let ping = serde_json::json!({"type": "ping", "timestamp": now_ms()}).to_string();
                if ws.send(Message::text(ping)).await.is_err() {
                    return End::Closed { code: None, reason: "send failed".into(), connected };
                }
                continue;
            }
        };
        last_seen = tokio::time::Instant::now();
        let text = match msg {
            None => {
                return End::Closed {
                    code: None,
                    reason: "connection ended".into(),
                    connected,
                };
            }
            Some(Err(e)) => {
                return End::Closed {
                    code: None,
                    reason: e.to_string(),
                    connected,
                };
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                    .unwrap_or((None, String::new()));
                if code == Some(1008) {
                    return End::Unauthorized(reason);
                }
                return End::Closed {
                    code,
                    reason,
                    connected,
                };
            }
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
        };
        let event = match parse(text.as_str()) {
            Ok(Parsed::Connection(user_id, connection_id)) => {
                connected = true;
                Event::Connected {
                    user_id,
                    connection_id,
                    resumed,
                }
            }
            Ok(Parsed::Notification(n)) => {
                *last_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(n.id.to_string());
                Event::Notification(n)
            }
            Ok(Parsed::Gap) => Event::HistoryGap,
            Ok(Parsed::Other(v)) => Event::Frame(v),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a frame that is not pgdn's protocol");
                continue;
            }
        };
        if tx.send(Ok(event)).await.is_err() {
            return End::Gone;
        }
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

enum Parsed {
    Connection(String, String),
    Notification(Notification),
    Gap,
    Other(Value),
}

fn parse(text: &str) -> std::result::Result<Parsed, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    // A notification first: its type may be `error` (a built-in type),
    // and only the shape tells it from an error frame.
    let is_notification = v.get("id").is_some_and(Value::is_string)
        && v.get("payload").is_some_and(Value::is_object)
        && v.get("timestamp").is_some();
    if is_notification {
        return serde_json::from_value(v)
            .map(Parsed::Notification)
            .map_err(|e| e.to_string());
    }
    match kind {
        "connection" => Ok(Parsed::Connection(
            v["user_id"].as_str().unwrap_or_default().to_string(),
            v["connection_id"].as_str().unwrap_or_default().to_string(),
        )),
        "error" if v.get("code").and_then(Value::as_str) == Some("history_gap") => Ok(Parsed::Gap),
        _ => Ok(Parsed::Other(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("a.b-c_d~"), "a.b-c_d~");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
    }

    #[test]
    fn parses_frames() {
        assert!(matches!(
            parse(r#"{"type":"connection","status":"connected","user_id":"u","connection_id":"c","timestamp":"t"}"#),
            Ok(Parsed::Connection(u, c)) if u == "u" && c == "c"
        ));
        assert!(matches!(
            parse(r#"{"id":"m1","type":"info","payload":{},"timestamp":"2026-11-27T03:30:16.123Z"}"#),
            Ok(Parsed::Notification(n)) if n.id.as_str() == "m1"
        ));
        assert!(matches!(
            parse(r#"{"type":"error","code":"history_gap","message":"x"}"#),
            Ok(Parsed::Gap)
        ));
        assert!(matches!(
            parse(r#"{"type":"pong","timestamp":1}"#),
            Ok(Parsed::Other(_))
        ));
        assert!(parse("nope").is_err());
    }
}
