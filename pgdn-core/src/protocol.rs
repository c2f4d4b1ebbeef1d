//! The connection protocol (docs/protocol.md sections 1 to 4), once, for every
//! transport: what a subscriber connection does from its request to its
//! close, minus the bytes on a socket.
//!
//! [`Service::admit`](crate::Service::admit) checks and authenticates a
//! [`ConnectInfo`], [`Service::open`](crate::Service::open) registers the
//! connection and reads the resume replay; [`Session::run`] then drives a
//! [`Transport`]:
//!
//! 1. **Register, then greet.** The connection is registered before the
//!    connection frame is written, so a publish made after the client saw
//!    that frame reaches it; whatever is published meanwhile waits in the
//!    connection's queue.
//! 2. **Replay before live.** For `since=`, `history_gap` (if the window
//!    does not reach back) and the replayed messages follow the connection
//!    frame, before anything from the queue; messages both replayed and
//!    queued are skipped once (the skip set).
//! 3. **Live.** One task `select!`s, outbound first, between the queue
//!    (written in batches), the peer (client frames, answered through the
//!    queue so replies keep their place), the keepalive timer and the
//!    token's expiry.
//! 4. **Close** with the code of the [`DisconnectReason`], bounded by the
//!    close timeout, then unregister.
//!
//! Limits enforced here for every transport: the inbound rate limit (every
//! inbound frame counts), the frame size (reported by the transport), the
//! write timeout and the queue bound (slow consumer, 1013), the idle
//! timeout (for transports whose peer answers keepalives), token expiry
//! (4001) and in-band refresh.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use futures_util::FutureExt;
use http::HeaderMap;

use crate::auth::AuthRequest;
use crate::connection::{Connection, DisconnectReason, Outbox};
use crate::frame::{ClientFrame, ConnectionFrame, ErrorCode, ErrorFrame, refreshed_json};
use crate::history::Replay;
use crate::service::Service;
use crate::transport::{Frame, Inbound, Transport};

/// What a connecting request carries: the token, the resume point, the
/// headers (for authenticators that read cookies) and the peer's address.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConnectInfo {
    /// From `?token=`, else `Authorization: Bearer`.
    pub token: Option<String>,
    /// From `?since=` (or, for Server-Sent Events, `Last-Event-ID`).
    pub since: Option<String>,
    /// The request's headers; handed to the authenticator, then dropped.
    pub headers: HeaderMap,
    /// The peer's address, where the adapter knows it.
    pub remote_addr: Option<SocketAddr>,
}

impl ConnectInfo {
    /// Reads the token and `since` from a request's raw query string
    /// (URL-encoded, without `?`) and headers: the token from `token=`
    /// first (what browsers can send), then `Authorization: Bearer`.
    pub fn from_request(query: Option<&str>, headers: HeaderMap) -> Self {
        let mut token = None;
        let mut since = None;
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "token" if token.is_none() => token = Some(v.into_owned()),
                "since" if since.is_none() => since = Some(v.into_owned()),
                _ => {}
            }
        }
        if token.is_none() {
            token = bearer(&headers).map(str::to_string);
        }
        ConnectInfo {
            token,
            since: since.filter(|s| !s.is_empty()),
            headers,
            remote_addr: None,
        }
    }

    /// For Server-Sent Events: a `Last-Event-ID` header (what a browser's
    /// `EventSource` sends when it reconnects by itself) wins over `since=`
    /// (docs/protocol.md section 7).
    pub fn with_last_event_id(mut self) -> Self {
        if let Some(id) = self
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            self.since = Some(id.to_string());
        }
        self
    }

    /// Sets the peer's address.
    pub fn with_remote_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.remote_addr = addr;
        self
    }

    /// What the authenticator sees of this request.
    pub fn auth_request(&self) -> AuthRequest<'_> {
        AuthRequest::connect(self.token.as_deref(), &self.headers)
            .with_remote_addr(self.remote_addr)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// A token bucket: `rate` frames per second, at most `burst` at once. The
/// session's inbound rate limit; transports that count wire frames
/// themselves use it too.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled at `rate` per second.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token; false when the client is over its limit.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A registered connection, ready to be driven over a transport. Made by
/// [`Service::open`](crate::Service::open); frames published from then on
/// wait in its queue until [`Session::run`] writes them.
#[derive(Debug)]
pub struct Session {
    pub(crate) service: Service,
    pub(crate) conn: Connection,
    pub(crate) outbox: Outbox,
    pub(crate) replay: Option<Replay>,
    /// Its connection slots (per node, user and address), given back when
    /// it ends.
    pub(crate) slots: crate::limits::Slots,
}

/// The tokio instant at which `at` passes (far in the future for `None`).
fn deadline(at: Option<SystemTime>) -> (bool, tokio::time::Instant) {
    const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    match at {
        None => (false, tokio::time::Instant::now() + FAR),
        Some(at) => {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(FAR);
            (true, tokio::time::Instant::now() + left)
        }
    }
}

impl Session {
    /// The connection, e.g. for its id or user.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Runs the connection over `transport` to its end (see the module
    /// docs for the order of things), closes it with the matching code and
    /// unregisters it. Returns why it ended.
    pub async fn run<T: Transport>(self, transport: T) -> DisconnectReason {
        let greeted = Box::pin(self.greet(transport)).await;
        greeted.run().await
    }

    /// The first part of [`Session::run`]: writes the connection frame
    /// (and a resuming client's replay), then hands the connection its
    /// transport's direct writer. What is left runs in [`Greeted::run`],
    /// possibly on another runtime ([`Service::serve`]).
    pub(crate) async fn greet<T: Transport>(self, mut transport: T) -> Greeted<T> {
        let Session {
            service,
            conn,
            outbox,
            replay,
            mut slots,
        } = self;
        slots.open_as(transport.kind());
        tracing::debug!(
            connection = conn.wire_id(),
            user = conn.user_id(),
            "subscriber connected"
        );
        // Boxed: it runs once, and its state would otherwise stay part of
        // every idle connection's future (memory per idle connection).
        let greeting = Box::pin(greet(&mut transport, &service, &conn, &outbox, replay));
        let greeted = greeting.await;
        if greeted.is_ok()
            && let Some(direct) = transport.direct()
        {
            outbox.set_direct(direct);
        }
        Greeted {
            service,
            conn,
            outbox,
            slots,
            transport,
            greeted,
        }
    }
}

/// A session whose greeting is done (or failed): what is left of
/// [`Session::run`].
pub(crate) struct Greeted<T> {
    service: Service,
    conn: Connection,
    outbox: Outbox,
    slots: crate::limits::Slots,
    transport: T,
    /// Why the greeting failed, if it did.
    greeted: Result<(), DisconnectReason>,
}

impl<T: Transport> Greeted<T> {
    /// Serves the connection to its end, closes it with the matching code
    /// and unregisters it. Returns why it ended.
    pub(crate) async fn run(self) -> DisconnectReason {
        let Greeted {
            service,
            conn,
            outbox,
            slots,
            mut transport,
            greeted,
        } = self;
        let config = service.config();
        let reason = match greeted {
            Ok(()) => serve(&mut transport, &service, &conn, &outbox).await,
            Err(reason) => reason,
        };
        let reason = outbox.mark_closed(reason);
        // Logged before the close frame goes out: whoever sees the close
        // can find the line.
        log_end(&conn, &slots, reason);
        // Closing and unregistering are boxed like the greeting: they run
        // once, at the end.
        if let Some((code, why)) = reason.close_frame() {
            let close = tokio::time::timeout(config.close_timeout, transport.close(code, why));
            let _ = Box::pin(close).await;
        }
        // The connection is over: its slots go back before it is
        // unregistered, so a client that saw it leave can take its place.
        drop(slots);
        Box::pin(service.hub().disconnect(&conn, reason)).await;
        reason
    }
}

/// One line for a connection's end: a limit the client hit at `info`, a
/// slow consumer cut off at `warn` (a capacity signal), anything else at
/// `debug`.
fn log_end(conn: &Connection, slots: &crate::limits::Slots, reason: DisconnectReason) {
    let remote = crate::service::Remote(slots.ip());
    let code = reason.close_frame().map(|(code, _)| code);
    macro_rules! end {
        ($level:ident, $message:literal) => {
            tracing::$level!(
                user = conn.user_id(),
                %remote,
                connection = conn.wire_id(),
                reason = reason.as_str(),
                code,
                $message
            )
        };
    }
    match reason {
        DisconnectReason::SlowConsumer => end!(warn, "connection closed: slow consumer"),
        DisconnectReason::RateLimited | DisconnectReason::FrameTooLarge => {
            end!(info, "connection closed: limit exceeded")
        }
        _ => end!(debug, "subscriber disconnected"),
    }
}

/// Writes the connection frame, then, for a resuming client, `history_gap`
/// if the window does not reach back and the replayed messages, all before
/// any live traffic (docs/protocol.md section 4).
///
/// The replay counts toward the connection's outbound bound: what does not
/// fit is dropped, oldest first, and reported as a gap (the client
/// refetches state rather than being cut off at every resume); while it
/// is written, live frames queue against what is left of the bound. The
/// write has the write timeout, and stops at once when the hub closes the
/// connection meanwhile (its queue overflowed: 1013).
async fn greet<T: Transport>(
    t: &mut T,
    service: &Service,
    conn: &Connection,
    outbox: &Outbox,
    replay: Option<Replay>,
) -> Result<(), DisconnectReason> {
    let hello = ConnectionFrame::new(conn.user_id(), conn.wire_id()).to_json();
    let mut frames = vec![Frame::reply(hello)];
    if let Some(mut replay) = replay {
        // Room for the connection frame and `history_gap`, and for at
        // least one live frame to queue meanwhile.
        let limits = outbox.limits();
        let max_frames = limits.max_frames.saturating_sub(3);
        let max_bytes = limits.max_bytes.saturating_sub(1024);
        let mut bytes = 0usize;
        let mut keep = 0usize;
        for (_, frame) in replay.frames.iter().rev() {
            if keep == max_frames || bytes + frame.len() > max_bytes {
                break;
            }
            bytes += frame.len();
            keep += 1;
        }
        if keep < replay.frames.len() {
            replay.frames.drain(..replay.frames.len() - keep);
            replay.gap = true;
        }
        if replay.gap {
            let gap = ErrorFrame::new(
                ErrorCode::HistoryGap,
                "history does not reach back to the requested message; refetch state",
            );
            frames.push(Frame::reply(gap.to_json()));
        }
        outbox.reserve(keep, bytes);
        outbox.skip_replayed(replay.frames.iter().map(|(seq, _)| *seq));
        frames.extend(
            replay
                .frames
                .into_iter()
                .map(|(seq, data)| Frame { seq, data }),
        );
    }
    let written = write_queued(t, service, outbox, &mut frames).await;
    outbox.release_reserved();
    written
}

/// The connection's main loop; returns why it ended.
async fn serve<T: Transport>(
    t: &mut T,
    service: &Service,
    conn: &Connection,
    outbox: &Outbox,
) -> DisconnectReason {
    let config = service.config();
    let mut limiter = RateLimiter::new(config.rate_limit_per_sec, config.rate_limit_burst);
    let mut batch: Vec<Frame> = Vec::new();
    let interval = config.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_applies = t.answers_keepalive();
    let counts_frames = t.counts_frames();
    // The first of our keepalives that the peer has not answered (by
    // sending anything at all) yet.
    let mut unanswered_since: Option<tokio::time::Instant> = None;
    let (mut expires, at) = deadline(conn.identity().expires_at);
    let expiry = tokio::time::sleep_until(at);
    tokio::pin!(expiry);
    let mut batches = 0u32;
    loop {
        // Biased, outbound first: a wake-up for queued frames then costs no
        // read attempt. So that a flood of outbound frames cannot starve
        // the reader (pings, closes), the peer is also read, without
        // waiting, after every 8th batch.
        let inbound = tokio::select! {
            biased;
            queued = outbox.recv_many(&mut batch) => {
                if let Err(reason) = queued {
                    return reason;
                }
                // The batch's oldest message (0: none), timed once written.
                // A plain u64, not an Option: it lives across the write,
                // in every connection's future.
                let oldest = batch.iter().find(|f| f.is_notification()).map_or(0, |f| f.seq);
                if let Err(reason) = write_queued(t, service, outbox, &mut batch).await {
                    return reason;
                }
                outbox.written();
                if oldest != 0 {
                    service.hub().delivery_clock().written(oldest);
                }
                batches = batches.wrapping_add(1);
                if batches % 8 != 0 {
                    continue;
                }
                match t.recv().now_or_never() {
                    Some(inbound) => inbound,
                    None => continue,
                }
            }
            inbound = t.recv() => inbound,
            _ = &mut expiry, if expires => {
                tracing::debug!(connection = conn.wire_id(), "token expired");
                return DisconnectReason::TokenExpired;
            }
            _ = ping.tick() => {
                // Dead only if a keepalive went unanswered for long enough:
                // while a flood of outbound frames keeps this branch from
                // running, none goes out and a live peer is never blamed.
                // (The interval is read from the config again rather than
                // kept across the loop: one less field in every
                // connection's future.)
                let patience = config.idle_timeout.saturating_sub(config.ping_interval);
                if unanswered_since.is_some_and(|t| t.elapsed() >= patience) {
                    return DisconnectReason::IdleTimeout;
                }
                match tokio::time::timeout(config.write_timeout, t.keepalive()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return DisconnectReason::TransportError,
                    Err(_) => return DisconnectReason::SlowConsumer,
                }
                if idle_applies {
                    unanswered_since.get_or_insert_with(tokio::time::Instant::now);
                }
                continue;
            }
        };
        unanswered_since = None;
        // Boxed: client frames are rare next to deliveries, and the state of
        // handlers and refreshes would otherwise make every idle
        // connection's future larger.
        let handled = Box::pin(on_inbound(
            counts_frames,
            service,
            conn,
            outbox,
            &mut limiter,
            inbound,
        ));
        match handled.await {
            Err(reason) => return reason,
            Ok(Some(new_expiry)) => {
                let (has, at) = deadline(new_expiry);
                expires = has;
                expiry.as_mut().reset(at);
            }
            Ok(None) => {}
        }
    }
}

/// Writes a drained batch. If the hub closes the connection while the
/// transport is slow (a slow consumer, a kick), stops at once; at
/// shutdown, finishes the batch within the close timeout so that nothing
/// already queued is lost. A write that makes no progress for the write
/// timeout closes the connection as a slow consumer.
async fn write_queued<T: Transport>(
    t: &mut T,
    service: &Service,
    outbox: &Outbox,
    batch: &mut Vec<Frame>,
) -> Result<(), DisconnectReason> {
    let config = service.config();
    let mut write = std::pin::pin!(t.send(batch));
    // Most writes complete at once; only a pending one needs to watch for
    // the connection being closed meanwhile.
    let written = match futures_util::poll!(write.as_mut()) {
        std::task::Poll::Ready(written) => written,
        // Boxed: the slow path's timers would otherwise be part of every
        // connection's future.
        std::task::Poll::Pending => {
            Box::pin(async {
                tokio::select! {
                    written = &mut write => Ok(written),
                    _ = tokio::time::sleep(config.write_timeout) => {
                        Err(DisconnectReason::SlowConsumer)
                    }
                    reason = outbox.closed() => {
                        if reason != DisconnectReason::ServerShutdown {
                            return Err(reason);
                        }
                        match tokio::time::timeout(config.close_timeout, write).await {
                            Ok(written) => Ok(written),
                            Err(_) => Err(reason),
                        }
                    }
                }
            })
            .await?
        }
    };
    written.map_err(|_| DisconnectReason::TransportError)
}

/// Handles one thing read from the peer. `Ok(Some(expiry))` when a refresh
/// changed the connection's expiry.
async fn on_inbound(
    counts_frames: bool,
    service: &Service,
    conn: &Connection,
    outbox: &Outbox,
    limiter: &mut RateLimiter,
    inbound: Inbound,
) -> Result<Option<Option<SystemTime>>, DisconnectReason> {
    let reply = match inbound {
        Inbound::Closed => return Err(DisconnectReason::ClientClosed),
        Inbound::Failed(e) => {
            tracing::debug!(error = %e, "read failed");
            return Err(DisconnectReason::TransportError);
        }
        Inbound::TooLarge => return Err(DisconnectReason::FrameTooLarge),
        Inbound::InvalidUtf8 => return Err(DisconnectReason::InvalidUtf8),
        Inbound::ProtocolError => return Err(DisconnectReason::ProtocolError),
        Inbound::RateLimited => return Err(DisconnectReason::RateLimited),
        counted => {
            // Every frame counts, control frames included (docs/protocol.md
            // section 3): a Ping flood costs the flooder its connection.
            // A transport that counts wire frames itself has done so.
            if !counts_frames && !limiter.allow() {
                return Err(DisconnectReason::RateLimited);
            }
            match counted {
                Inbound::Text(text) => match ClientFrame::parse(&text) {
                    Ok(ClientFrame::Refresh { token }) => {
                        service.hub().count_frame();
                        let (reply, expiry) = refresh(service, conn, token).await;
                        send_reply(conn, outbox, reply)?;
                        return Ok(expiry);
                    }
                    Ok(frame) => service.hub().handle_frame(conn, frame).await,
                    Err(e) => {
                        service.hub().count_frame();
                        Some(e.to_frame().to_json())
                    }
                },
                Inbound::Binary => Some(
                    ErrorFrame::new(
                        ErrorCode::InvalidMessage,
                        "binary frames are not supported; send JSON text",
                    )
                    .to_json(),
                ),
                _ => None,
            }
        }
    };
    match reply {
        Some(reply) => send_reply(conn, outbox, reply).map(|()| None),
        None => Ok(None),
    }
}

/// Queues a reply, so that it keeps its place after what the hub queued
/// before it (a handler's own publishes, say) and obeys the same bound.
fn send_reply(conn: &Connection, outbox: &Outbox, reply: String) -> Result<(), DisconnectReason> {
    conn.try_send(bytes::Bytes::from(reply))
        // A full queue already marked the connection closed.
        .map_err(|_| outbox.mark_closed(DisconnectReason::SlowConsumer))
}

/// An in-band token refresh (docs/protocol.md section 1): the reply, and the
/// new expiry when it was accepted.
async fn refresh(
    service: &Service,
    conn: &Connection,
    token: Option<String>,
) -> (String, Option<Option<SystemTime>>) {
    let failed = |why: &str| {
        ErrorFrame::new(ErrorCode::RefreshFailed, format!("refresh refused: {why}")).to_json()
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return (failed("a refresh needs a string `token`"), None);
    };
    let identity = match service
        .authenticator()
        .authenticate(&AuthRequest::refresh(&token))
        .await
    {
        Ok(identity) => identity,
        Err(e) => {
            tracing::debug!(connection = conn.wire_id(), error = %e, "refresh refused");
            return (failed(e.close_reason()), None);
        }
    };
    if &*identity.user_id != conn.user_id() {
        tracing::debug!(
            connection = conn.wire_id(),
            "refresh for another user refused"
        );
        return (failed("the token names another user"), None);
    }
    if identity.is_expired_at(SystemTime::now()) {
        return (failed("the token has expired"), None);
    }
    let expires_at = identity.expires_at;
    if !service.hub().update_identity(conn, identity).await {
        return (failed("the connection is closing"), None);
    }
    (refreshed_json(expires_at), Some(expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TransportError;
    use crate::{Config, Identity, MessageType, StaticAuthenticator};
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    /// What the session did to the transport.
    #[derive(Debug)]
    enum Out {
        Frames(Vec<Value>),
        Keepalive,
        Close(u16, String),
    }

    /// An in-memory transport: the test reads what the session wrote and
    /// feeds what the peer sends.
    struct Mem {
        out: mpsc::UnboundedSender<Out>,
        inbound: mpsc::UnboundedReceiver<Inbound>,
        answers: bool,
    }

    impl Transport for Mem {
        async fn send(&mut self, frames: &mut Vec<Frame>) -> Result<(), TransportError> {
            let values = frames
                .drain(..)
                .map(|f| serde_json::from_slice(&f.data).unwrap())
                .collect();
            let _ = self.out.send(Out::Frames(values));
            Ok(())
        }
        async fn keepalive(&mut self) -> Result<(), TransportError> {
            let _ = self.out.send(Out::Keepalive);
            Ok(())
        }
        async fn recv(&mut self) -> Inbound {
            self.inbound.recv().await.unwrap_or(Inbound::Closed)
        }
        async fn close(&mut self, code: u16, reason: &str) {
            let _ = self.out.send(Out::Close(code, reason.into()));
        }
        fn answers_keepalive(&self) -> bool {
            self.answers
        }
    }

    struct Peer {
        out: mpsc::UnboundedReceiver<Out>,
        inbound: mpsc::UnboundedSender<Inbound>,
    }

    impl Peer {
        /// The next batch of frames (skipping keepalives).
        async fn frames(&mut self) -> Vec<Value> {
            loop {
                match self.out.recv().await.expect("session alive") {
                    Out::Frames(f) => return f,
                    Out::Keepalive => continue,
                    other => panic!("expected frames, got {other:?}"),
                }
            }
        }
        /// The close code and reason (skipping frames and keepalives).
        async fn close(&mut self) -> (u16, String) {
            loop {
                match self.out.recv().await.expect("session alive") {
                    Out::Close(c, r) => return (c, r),
                    _ => continue,
                }
            }
        }
    }

    fn mem(answers: bool) -> (Mem, Peer) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        (
            Mem {
                out: out_tx,
                inbound: in_rx,
                answers,
            },
            Peer {
                out: out_rx,
                inbound: in_tx,
            },
        )
    }

    fn service(config: Config, identity: Identity) -> Service {
        Service::builder()
            .config(config)
            .authenticator(StaticAuthenticator::new().with_token("t", identity))
            .publish_key("a-publish-key-for-tests")
            .build()
            .unwrap()
    }

    fn info(since: Option<&str>) -> ConnectInfo {
        let mut i = ConnectInfo::from_request(Some("token=t"), HeaderMap::new());
        i.since = since.map(str::to_string);
        i
    }

    #[tokio::test]
    async fn register_then_greet_then_replay_then_live() {
        let svc = service(Config::default(), Identity::new("u1", ["g"]));
        let hub = svc.hub().clone();
        let first = hub
            .notify_user("u1", MessageType::info(), json!({"n": 1}))
            .await
            .unwrap();
        hub.notify_user("u1", MessageType::info(), json!({"n": 2}))
            .await
            .unwrap();
        let admitted = svc.admit(info(Some(first.id.as_str()))).await.unwrap();
        let session = svc.open(admitted).await.unwrap();
        // Registered before anything is written: this one is queued.
        hub.notify_group("g", MessageType::info(), json!({"n": 3}))
            .await
            .unwrap();
        let (t, mut peer) = mem(true);
        let task = tokio::spawn(session.run(t));
        let greeting = peer.frames().await;
        assert_eq!(greeting[0]["type"], "connection");
        assert_eq!(greeting[1]["payload"]["n"], 2, "the replay follows at once");
        assert_eq!(greeting.len(), 2);
        assert_eq!(peer.frames().await[0]["payload"]["n"], 3, "then live");
        drop(peer);
        assert_eq!(task.await.unwrap(), DisconnectReason::ClientClosed);
        assert_eq!(hub.connection_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_expiry_closes_with_4001() {
        let expiry = SystemTime::now() + Duration::from_secs(3600);
        let svc = service(
            Config::default(),
            Identity::new("u1", Vec::<&str>::new()).with_expiry(Some(expiry)),
        );
        let (t, mut peer) = mem(true);
        let task = tokio::spawn({
            let svc = svc.clone();
            async move { svc.serve(svc.admit(info(None)).await.unwrap(), t).await }
        });
        assert_eq!(peer.frames().await[0]["type"], "connection");
        // Keepalives are answered meanwhile, so only the expiry can end it.
        let inbound = peer.inbound.clone();
        tokio::spawn(async move {
            while inbound.send(Inbound::Control).is_ok() {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        });
        assert_eq!(peer.close().await, (4001, "token expired".into()));
        assert_eq!(task.await.unwrap(), Some(DisconnectReason::TokenExpired));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dropped_unless_its_transport_cannot_answer() {
        let svc = service(Config::default(), Identity::new("u1", Vec::<&str>::new()));
        let (t, mut peer) = mem(true);
        let task = tokio::spawn({
            let svc = svc.clone();
            async move { svc.serve(svc.admit(info(None)).await.unwrap(), t).await }
        });
        peer.frames().await;
        assert_eq!(task.await.unwrap(), Some(DisconnectReason::IdleTimeout));
        assert!(matches!(peer.out.recv().await, Some(Out::Keepalive)));

        // An SSE-like transport: keepalives go out, silence is normal.
        let (t, mut peer) = mem(false);
        let task = tokio::spawn({
            let svc = svc.clone();
            async move { svc.serve(svc.admit(info(None)).await.unwrap(), t).await }
        });
        peer.frames().await;
        for _ in 0..10 {
            assert!(matches!(peer.out.recv().await, Some(Out::Keepalive)));
        }
        assert!(!task.is_finished());
        svc.begin_shutdown();
        assert_eq!(peer.close().await, (1001, "server shutting down".into()));
        assert_eq!(task.await.unwrap(), Some(DisconnectReason::ServerShutdown));
    }

    #[tokio::test]
    async fn every_inbound_frame_counts_toward_the_rate_limit() {
        let config = Config {
            rate_limit_per_sec: 1.0,
            rate_limit_burst: 3.0,
            ..Config::default()
        };
        let svc = service(config, Identity::new("u1", Vec::<&str>::new()));
        let (t, mut peer) = mem(true);
        let task = tokio::spawn({
            let svc = svc.clone();
            async move { svc.serve(svc.admit(info(None)).await.unwrap(), t).await }
        });
        peer.frames().await;
        for _ in 0..4 {
            peer.inbound.send(Inbound::Control).unwrap();
        }
        assert_eq!(peer.close().await, (1008, "rate limit exceeded".into()));
        assert_eq!(task.await.unwrap(), Some(DisconnectReason::RateLimited));
    }

    #[tokio::test]
    async fn a_refused_token_closes_with_1008_and_registers_nothing() {
        let svc = service(Config::default(), Identity::new("u1", Vec::<&str>::new()));
        let (t, mut peer) = mem(true);
        let bad = ConnectInfo::from_request(Some("token=nope"), HeaderMap::new());
        let admitted = svc.admit(bad).await.unwrap();
        assert!(
            admitted.identity().is_err(),
            "admitted, to be closed with 1008"
        );
        assert_eq!(svc.serve(admitted, t).await, None);
        assert_eq!(peer.close().await, (1008, "invalid token".into()));
        assert_eq!(svc.hub().stats().connections_opened, 0);
    }

    #[test]
    fn rate_limiter_allows_burst_then_refuses() {
        let mut l = RateLimiter::new(1.0, 3.0);
        assert!(l.allow() && l.allow() && l.allow());
        assert!(!l.allow());
    }

    #[test]
    fn connect_info_reads_query_and_headers() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer hdr".parse().unwrap());
        let i = ConnectInfo::from_request(Some("token=a%2Bb&since=m-1&x=y"), h.clone());
        assert_eq!(i.token.as_deref(), Some("a+b"));
        assert_eq!(i.since.as_deref(), Some("m-1"));
        let i = ConnectInfo::from_request(Some("since="), h.clone());
        assert_eq!(i.token.as_deref(), Some("hdr"));
        assert_eq!(i.since, None, "an empty since is no since");
        h.insert("last-event-id", "m-9".parse().unwrap());
        let i = ConnectInfo::from_request(Some("since=m-1"), h).with_last_event_id();
        assert_eq!(i.since.as_deref(), Some("m-9"), "Last-Event-ID wins");
    }
}
