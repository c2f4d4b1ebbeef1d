//! A subscriber that stays connected: it reconnects by itself with jittered
//! backoff, resumes with `since=<last id>` so that nothing published while
//! it was away is missed (docs/protocol.md section 4), keeps the connection alive
//! with pings, asks for a fresh token before each reconnect, and stops with
//! [`Error::Unauthorized`] on close code 1008 instead of retrying forever.
//!
//! # Token lifetime (docs/protocol.md section 1)
//!
//! A server closes a live connection whose token expired with 4001
//! `token expired`. With a token callback
//! ([`Subscriber::with_token_callback`]) the subscriber avoids that:
//!
//! - It reads the token's expiry from the JWT payload's `exp` claim
//!   (decoded, **not** verified: only the server verifies). An opaque,
//!   non-JWT token has no known expiry and is never refreshed in band.
//! - At `expiry - min(margin, remaining / 5)` (80 % of the remaining
//!   lifetime for short tokens, `margin` before expiry for long ones;
//!   `margin` defaults to 30 s, see [`SubscriberBuilder::refresh_margin`])
//!   it asks the callback for a fresh token and sends
//!   `{"type":"refresh","token":...}` on the open connection.
//! - The server's `{"type":"refreshed","expires_at":...}` answer extends the
//!   connection; its `expires_at` (which includes the server's leeway)
//!   becomes the expiry the next refresh is scheduled from (`null`: the
//!   connection no longer expires). It is yielded as
//!   [`Event::TokenRefreshed`], not as a [`Event::Frame`].
//! - If the callback fails or the server answers `refresh_failed` (or, a
//!   v1 server, `unknown_type`), [`Event::TokenRefreshFailed`] is yielded
//!   and the connection is kept as it is; no second in-band attempt is
//!   made on it. When the server then closes it with 4001, the subscriber
//!   asks the callback for a fresh token and reconnects at once (no
//!   backoff) with `since=<last id>`, so nothing is lost either way.
//!
//! With a fixed token ([`Subscriber::new`]) there is nothing to refresh: a
//! 4001 is followed by one reconnect attempt with the same, expired, token,
//! which the server refuses with 1008, ending the subscription with
//! [`Error::Unauthorized`]. [`SubscriberBuilder::in_band_refresh`] turns
//! in-band refresh off (then every expiry is a 4001 and a reconnect).
//!
//! Needs the `subscriber` feature (on by default); `wss://` needs `rustls`
//! (on by default) or `native-tls`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, Stream, StreamExt};
use pgdn_core::Notification;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::error::{Error, Result};
use crate::retry::Backoff;
use crate::tls::{self, Roots};

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
    /// The server accepted an in-band token refresh (module docs, "Token
    /// lifetime"): the connection now lasts until `expires_at` (`None`:
    /// it no longer expires).
    TokenRefreshed {
        /// The connection's new expiry, as the server stated it.
        expires_at: Option<SystemTime>,
    },
    /// An in-band token refresh failed: the token callback failed or the
    /// server refused the new token. The connection stays open until its
    /// token expires; the server then closes it with 4001 and the
    /// subscriber reconnects at once with a fresh token.
    TokenRefreshFailed {
        /// What failed: the callback's error or the server's message.
        reason: String,
    },
    /// Any other frame: a pong, a handler's reply, an error frame.
    Frame(Value),
    /// The connection ended; the subscriber reconnects after `retry_in`
    /// (zero after a 4001 `token expired`: it reconnects at once with a
    /// fresh token).
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

    /// The callback, when tokens can be renewed.
    fn callback(&self) -> Option<&Arc<dyn Fn() -> TokenFuture + Send + Sync>> {
        match self {
            TokenSource::Fixed(_) => None,
            TokenSource::Callback(f) => Some(f),
        }
    }
}

/// Default cap on how long before its expiry a token is refreshed in band.
const REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// After an accepted refresh, the next one is not scheduled sooner than
/// this, whatever the clocks say (a server clock far behind ours would
/// otherwise make every new expiry look past).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A connection lasting less than this before its 4001 is reconnected with
/// the usual backoff rather than at once: the token callback hands out
/// tokens about to expire, and reconnecting at once would spin.
const MIN_LIFETIME_FOR_QUICK_RECONNECT: Duration = Duration::from_secs(1);

/// Builds a [`Subscription`].
#[derive(Clone)]
pub struct SubscriberBuilder {
    url: String,
    token: TokenSource,
    since: Option<String>,
    backoff: Backoff,
    ping_interval: Duration,
    buffer: usize,
    refresh_margin: Duration,
    in_band_refresh: bool,
    roots: Roots,
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
    /// connection attempt (so an expired token is replaced) and, for a JWT,
    /// shortly before it expires, to refresh the open connection in band
    /// (module docs, "Token lifetime"). An error from it before a
    /// connection attempt ends the subscription with [`Error::Token`]; one
    /// during an in-band refresh is yielded as
    /// [`Event::TokenRefreshFailed`].
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
            refresh_margin: REFRESH_MARGIN,
            in_band_refresh: true,
            roots: Roots::default(),
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

    /// How long before its expiry a token is refreshed in band, at most:
    /// the refresh happens at `expiry - min(margin, remaining / 5)`, so a
    /// short-lived token is refreshed at 80 % of its remaining lifetime.
    /// Default 30 s. Only with a token callback and a JWT token.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = margin;
        self
    }

    /// Whether to refresh the token on the open connection before it
    /// expires (default `true`). With `false` the server closes the
    /// connection with 4001 at expiry and the subscriber reconnects at once
    /// with a fresh token and `since=`, which also loses nothing.
    pub fn in_band_refresh(mut self, enabled: bool) -> Self {
        self.in_band_refresh = enabled;
        self
    }

    /// Trusts the CA certificate(s) in `pem` for `wss://`, besides the
    /// built-in roots: for a server whose certificate a private CA signed.
    /// Call it once per PEM document; an unreadable one fails
    /// [`subscribe`](Self::subscribe). Needs the `rustls` or `native-tls`
    /// feature.
    #[cfg(any(feature = "rustls", feature = "native-tls"))]
    pub fn root_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.roots.add(pem.as_ref());
        self
    }

    /// Starts the subscription on the current tokio runtime.
    ///
    /// # Errors
    /// Before any connection attempt: [`Error::Invalid`] for a URL that is
    /// not `ws://` or `wss://` or an unreadable root certificate;
    /// [`Error::TlsNotEnabled`] for a `wss://` URL when pgdn-client was
    /// built without a TLS feature. Everything later (the server down, a
    /// refused token) comes from the [`Subscription`].
    pub fn subscribe(self) -> Result<Subscription> {
        let lower = self.url.to_ascii_lowercase();
        if !(lower.starts_with("ws://") || lower.starts_with("wss://")) {
            return Err(Error::Invalid(format!(
                "subscriber URL must start with ws:// or wss://, got {:?}",
                self.url
            )));
        }
        tls::check(&self.url)?;
        let connector = Connector::new(&self.url, &self.roots)?;
        let (tx, rx) = mpsc::channel(self.buffer.max(1));
        let last_id = Arc::new(Mutex::new(self.since.clone()));
        let task = tokio::spawn(drive(self, connector, tx, last_id.clone()));
        Ok(Subscription { rx, task, last_id })
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

/// How the subscriber opens its WebSocket: plain TCP, or TLS with the
/// roots decided once, at [`SubscriberBuilder::subscribe`].
struct Connector {
    #[cfg(any(feature = "rustls", feature = "native-tls"))]
    tls: Option<tokio_tungstenite::Connector>,
}

impl Connector {
    #[cfg_attr(
        not(any(feature = "rustls", feature = "native-tls")),
        allow(unused_variables, clippy::unnecessary_wraps)
    )]
    fn new(url: &str, roots: &Roots) -> Result<Connector> {
        Ok(Connector {
            #[cfg(any(feature = "rustls", feature = "native-tls"))]
            tls: tls::ws_connector(url, roots)?,
        })
    }

    async fn connect(
        &self,
        url: String,
    ) -> std::result::Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        tokio_tungstenite::tungstenite::Error,
    > {
        #[cfg(any(feature = "rustls", feature = "native-tls"))]
        let connected =
            tokio_tungstenite::connect_async_tls_with_config(url, None, false, self.tls.clone())
                .await;
        #[cfg(not(any(feature = "rustls", feature = "native-tls")))]
        let connected = tokio_tungstenite::connect_async(url).await;
        connected.map(|(ws, _)| ws)
    }
}

async fn drive(
    cfg: SubscriberBuilder,
    connector: Connector,
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
        let expiry = jwt_expiry(&token);
        let since = last_id.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sep = if cfg.url.contains('?') { '&' } else { '?' };
        let mut url = format!("{}{sep}token={}", cfg.url, encode(&token));
        if let Some(since) = &since {
            url.push_str(&format!("&since={}", encode(since)));
        }
        let started = Instant::now();
        let end = match connector.connect(url).await {
            Ok(ws) => session(ws, &cfg, &tx, &last_id, since.is_some(), expiry).await,
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
                // Token expired (docs/protocol.md section 1): a fresh token and
                // an immediate reconnect with since= lose nothing.
                let expired = code == Some(4001)
                    && connected
                    && started.elapsed() >= MIN_LIFETIME_FOR_QUICK_RECONNECT;
                let retry_in = if expired {
                    Duration::ZERO
                } else {
                    cfg.backoff.delay(failures)
                };
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

/// In-band token refresh on one connection (module docs, "Token
/// lifetime").
struct Refresher {
    /// The token callback; `None` when there is nothing to refresh (a
    /// fixed token, in-band refresh turned off, or a server without it).
    tokens: Option<Arc<dyn Fn() -> TokenFuture + Send + Sync>>,
    margin: Duration,
    /// When to ask the callback for the next token.
    at: Option<Instant>,
    /// The callback's answer, while awaited.
    fetching: Option<TokenFuture>,
    /// The JWT expiry of the token sent in a refresh frame, while its
    /// answer is awaited (`Some(None)`: sent, no known expiry).
    sent: Option<Option<SystemTime>>,
}

impl Refresher {
    fn new(cfg: &SubscriberBuilder, expiry: Option<SystemTime>) -> Self {
        let tokens = cfg
            .token
            .callback()
            .filter(|_| cfg.in_band_refresh)
            .cloned();
        let mut r = Refresher {
            tokens,
            margin: cfg.refresh_margin,
            at: None,
            fetching: None,
            sent: None,
        };
        r.schedule(expiry, Duration::ZERO);
        r
    }

    /// Schedules the next refresh before `expiry`, not sooner than `floor`.
    fn schedule(&mut self, expiry: Option<SystemTime>, floor: Duration) {
        self.at = match (&self.tokens, expiry) {
            (Some(_), Some(expiry)) => {
                Some(Instant::now() + refresh_delay(expiry, self.margin).max(floor))
            }
            _ => None,
        };
    }

    /// Waits until it is time to ask for a token (never, if not scheduled).
    async fn due(at: Option<Instant>) {
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Waits for the callback's answer (never, if none is awaited).
    async fn fetched(fetching: &mut Option<TokenFuture>) -> std::result::Result<String, String> {
        match fetching {
            Some(f) => f.await,
            None => std::future::pending().await,
        }
    }

    /// The server answered `refreshed`; `stated` is its `expires_at`
    /// (`None` when absent or unreadable: the sent token's own `exp` is
    /// used). Returns the new expiry.
    fn accepted(&mut self, stated: Option<Option<SystemTime>>) -> Option<SystemTime> {
        let sent = self.sent.take().flatten();
        let expiry = stated.unwrap_or(sent);
        self.schedule(expiry, MIN_REFRESH_INTERVAL);
        expiry
    }

    /// A refresh failed: no second attempt on this connection.
    fn failed(&mut self) {
        self.sent = None;
        self.at = None;
    }
}

/// How long from now to refresh a token expiring at `expiry`:
/// `remaining - min(margin, remaining / 5)`.
fn refresh_delay(expiry: SystemTime, margin: Duration) -> Duration {
    let remaining = expiry
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    remaining - (remaining / 5).min(margin)
}

async fn session<S>(
    mut ws: S,
    cfg: &SubscriberBuilder,
    tx: &mpsc::Sender<Result<Event>>,
    last_id: &Mutex<Option<String>>,
    resumed: bool,
    expiry: Option<SystemTime>,
) -> End
where
    S: Stream<Item = std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
{
    let mut connected = false;
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.tick().await;
    let mut last_seen = Instant::now();
    let mut refresh = Refresher::new(cfg, expiry);
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
            _ = Refresher::due(refresh.at) => {
                refresh.at = None;
                refresh.fetching = refresh.tokens.as_ref().map(|f| f());
                continue;
            }
            token = Refresher::fetched(&mut refresh.fetching) => {
                refresh.fetching = None;
                let event = match token {
                    Ok(token) => {
                        refresh.sent = Some(jwt_expiry(&token));
                        let frame = serde_json::json!({"type": "refresh", "token": token}).to_string();
                        if ws.send(Message::text(frame)).await.is_err() {
                            return End::Closed { code: None, reason: "send failed".into(), connected };
                        }
                        continue;
                    }
                    Err(e) => {
                        refresh.failed();
                        tracing::debug!(error = %e, "token callback failed; the connection expires");
                        Event::TokenRefreshFailed { reason: format!("token callback: {e}") }
                    }
                };
                if tx.send(Ok(event)).await.is_err() {
                    return End::Gone;
                }
                continue;
            }
        };
        last_seen = Instant::now();
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
            Ok(Parsed::Refreshed(stated)) => {
                let expires_at = refresh.accepted(stated);
                tracing::debug!(?expires_at, "token refreshed");
                Event::TokenRefreshed { expires_at }
            }
            Ok(Parsed::RefreshFailed(reason)) => {
                refresh.failed();
                tracing::debug!(%reason, "refresh refused; the connection expires");
                Event::TokenRefreshFailed { reason }
            }
            // A v1 server does not know `refresh`: stop trying.
            Ok(Parsed::Other(v))
                if refresh.sent.is_some()
                    && v.get("code").and_then(Value::as_str) == Some("unknown_type") =>
            {
                refresh.failed();
                refresh.tokens = None;
                Event::TokenRefreshFailed {
                    reason: "the server does not support in-band refresh".into(),
                }
            }
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

/// The `exp` claim of a JWT, read without verifying anything (only the
/// server verifies tokens; this only schedules the refresh). `None` for a
/// token that is not a JWT or has no numeric `exp`.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let claims: Value = serde_json::from_slice(&base64url_decode(payload)?).ok()?;
    let exp = claims.get("exp")?;
    // A NumericDate may have a fraction (RFC 7519 section 2).
    let secs = match exp.as_u64() {
        Some(s) => Duration::from_secs(s),
        None => Duration::try_from_secs_f64(exp.as_f64()?).ok()?,
    };
    UNIX_EPOCH.checked_add(secs)
}

/// Decodes unpadded (or padded) base64url, as in a JWT's segments.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
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
    /// `refreshed`, with its `expires_at`: `Some(None)` for `null`, `None`
    /// when absent or not RFC 3339.
    Refreshed(Option<Option<SystemTime>>),
    /// An error frame with code `refresh_failed`, and its message.
    RefreshFailed(String),
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
        "error" => match v.get("code").and_then(Value::as_str) {
            Some("history_gap") => Ok(Parsed::Gap),
            Some("refresh_failed") => Ok(Parsed::RefreshFailed(
                v.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("refresh refused")
                    .to_string(),
            )),
            _ => Ok(Parsed::Other(v)),
        },
        "refreshed" => Ok(Parsed::Refreshed(match v.get("expires_at") {
            Some(Value::Null) => Some(None),
            Some(Value::String(at)) => humantime::parse_rfc3339(at).ok().map(Some),
            _ => None,
        })),
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
        assert!(matches!(
            parse(r#"{"type":"refreshed","expires_at":"2026-11-27T03:30:16.123Z"}"#),
            Ok(Parsed::Refreshed(Some(Some(t))))
                if t == UNIX_EPOCH + Duration::from_millis(1_795_750_216_123)
        ));
        assert!(matches!(
            parse(r#"{"type":"refreshed","expires_at":null}"#),
            Ok(Parsed::Refreshed(Some(None)))
        ));
        assert!(matches!(
            parse(r#"{"type":"refreshed"}"#),
            Ok(Parsed::Refreshed(None))
        ));
        assert!(matches!(
            parse(r#"{"type":"error","code":"refresh_failed","message":"refresh refused: expired"}"#),
            Ok(Parsed::RefreshFailed(m)) if m == "refresh refused: expired"
        ));
    }

    #[test]
    fn decodes_base64url() {
        assert_eq!(base64url_decode("").unwrap(), b"");
        assert_eq!(base64url_decode("Zg").unwrap(), b"f");
        assert_eq!(base64url_decode("Zm8").unwrap(), b"fo");
        assert_eq!(base64url_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(base64url_decode("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(base64url_decode("-_8").unwrap(), [0xfb, 0xff]);
        assert!(base64url_decode("a+b/").is_none(), "not the url alphabet");
    }

    #[test]
    fn reads_a_jwt_expiry_without_verifying() {
        // {"alg":"HS256","typ":"JWT"} . {"sub":"u1","exp":1700000000} . junk
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
                   eyJzdWIiOiJ1MSIsImV4cCI6MTcwMDAwMDAwMH0.c2ln";
        assert_eq!(
            jwt_expiry(jwt),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        // {"exp":1700000000.5}
        let fractional = "e30.eyJleHAiOjE3MDAwMDAwMDAuNX0.x";
        assert_eq!(
            jwt_expiry(fractional),
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
        );
        // {"sub":"u1"}: no exp.
        assert_eq!(jwt_expiry("e30.eyJzdWIiOiJ1MSJ9.x"), None);
        assert_eq!(jwt_expiry("an-opaque-token"), None);
        assert_eq!(jwt_expiry("a.b.c.d"), None);
        assert_eq!(jwt_expiry("e30.!!!.x"), None);
    }

    #[test]
    fn refreshes_at_80_percent_or_the_margin_before_expiry() {
        let margin = Duration::from_secs(30);
        let short = refresh_delay(SystemTime::now() + Duration::from_secs(10), margin);
        assert!(short <= Duration::from_secs(8) && short > Duration::from_millis(7900));
        let long = refresh_delay(SystemTime::now() + Duration::from_secs(3600), margin);
        assert!(long <= Duration::from_secs(3570) && long > Duration::from_secs(3569));
        let past = refresh_delay(SystemTime::now() - Duration::from_secs(1), margin);
        assert_eq!(past, Duration::ZERO);
    }
}
