//! One subscriber connection, from authentication to close (PROTOCOL.md
//! sections 1 to 3): the shape of warp's chat example (`user_connected`,
//! `user_message`, `user_disconnected`), with a bounded outbound queue.
//!
//! Each connection is one task that `select!`s between frames from the hub
//! (written in batches with a single flush), frames from the client, and
//! the connection being closed by the hub (slow consumer, shutdown). The
//! loop is generic over `Sink + Stream` so that it does not depend on how
//! the socket was made.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use pgdn_core::frame::{ConnectionFrame, ErrorCode, ErrorFrame};
use pgdn_core::{AuthError, Connection, DisconnectReason, Outbox, Replay};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::server::Shared;

/// A token bucket: `rate` frames per second, at most `burst` at once.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token; false when the client is over its limit.
    pub(crate) fn allow(&mut self) -> bool {
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

fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

async fn close_with<S>(ws: &mut S, shared: &Shared, code: u16, reason: &str)
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(reason),
    };
    // A client that does not read must not hold the task forever.
    let _ = tokio::time::timeout(shared.config.close_timeout, async {
        ws.send(Message::Close(Some(frame))).await?;
        ws.close().await
    })
    .await;
}

/// Runs one connection to its end.
pub(crate) async fn run<S>(
    mut ws: S,
    shared: Arc<Shared>,
    token: Option<String>,
    since: Option<String>,
) where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let identity = match token.as_deref() {
        None | Some("") => Err(AuthError::MissingToken),
        Some(t) => shared.auth.authenticate(t).await,
    };
    let identity = match identity {
        Ok(id) => id,
        Err(e) => {
            // `e` names what failed, never the token.
            tracing::debug!(error = %e, "websocket authentication failed");
            shared.metrics.auth_failure(e.close_reason());
            close_with(&mut ws, &shared, 1008, e.close_reason()).await;
            return;
        }
    };
    let (conn, outbox) = match shared.hub.connect(identity).await {
        Ok(pair) => pair,
        Err(e) => {
            // The hub refuses an identity without a user id, whatever the
            // authenticator said.
            tracing::debug!(error = %e, "identity refused");
            shared.metrics.auth_failure("invalid identity");
            close_with(&mut ws, &shared, 1008, "invalid identity").await;
            return;
        }
    };
    if shared.shutdown.is_cancelled() {
        // Shutdown began while this connection authenticated; checked after
        // registering, so that `close_all` cannot miss it.
        conn.close(DisconnectReason::ServerShutdown);
    }
    tracing::debug!(
        connection = conn.wire_id(),
        user = &*conn.identity().user_id,
        "subscriber connected"
    );
    // Registered first, then the connection frame: a publish made after the
    // client saw this frame reaches it (frames queued meanwhile follow it).
    let replay = match since.as_deref() {
        Some(since) if !since.is_empty() => {
            Some(replay(&shared, &conn.identity().user_id, since).await)
        }
        _ => None,
    };
    let reason = match greet(&mut ws, &conn, &outbox, replay).await {
        Ok(()) => serve(&mut ws, &shared, &conn, &outbox).await,
        Err(_) => DisconnectReason::TransportError,
    };
    let reason = outbox.mark_closed(reason);
    if let Some((code, why)) = reason.close_frame() {
        close_with(&mut ws, &shared, code, why).await;
    }
    shared.hub.disconnect(&conn, reason).await;
    tracing::debug!(
        connection = conn.wire_id(),
        reason = reason.as_str(),
        "subscriber disconnected"
    );
}

/// Reads what a resuming client missed. A history that fails is reported
/// to the client as a gap, so that it refetches state.
async fn replay(shared: &Shared, user_id: &str, since: &str) -> Replay {
    match shared.hub.replay(user_id, since).await {
        Ok(replay) => replay,
        Err(e) => {
            tracing::warn!(error = %e, "history unavailable for a resuming client");
            Replay {
                gap: true,
                frames: Vec::new(),
            }
        }
    }
}

/// Sends the connection frame, then, for a resuming client, `history_gap`
/// if the window does not reach back and the replayed messages, all before
/// any live traffic (PROTOCOL.md section 4).
async fn greet<S>(
    ws: &mut S,
    conn: &Connection,
    outbox: &Outbox,
    replay: Option<Replay>,
) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let hello = ConnectionFrame::new(&conn.identity().user_id, conn.wire_id()).to_json();
    ws.feed(text(hello)).await?;
    if let Some(replay) = replay {
        if replay.gap {
            let gap = ErrorFrame::new(
                ErrorCode::HistoryGap,
                "history does not reach back to the requested message; refetch state",
            );
            ws.feed(text(gap.to_json())).await?;
        }
        outbox.skip_replayed(replay.frames.iter().map(|(seq, _)| *seq));
        let mut frames: Vec<Bytes> = replay.frames.into_iter().map(|(_, f)| f).collect();
        return write_batch(ws, &mut frames).await;
    }
    ws.flush().await
}

/// The connection's main loop; returns why it ended.
async fn serve<S>(
    ws: &mut S,
    shared: &Shared,
    conn: &Connection,
    outbox: &Outbox,
) -> DisconnectReason
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let mut limiter = RateLimiter::new(
        shared.config.rate_limit_per_sec,
        shared.config.rate_limit_burst,
    );
    let mut batch: Vec<Bytes> = Vec::new();
    let interval = shared.config.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first of our Pings that the peer has not answered (by sending
    // anything at all) yet.
    let mut unanswered_since: Option<tokio::time::Instant> = None;
    let mut batches = 0u32;
    loop {
        // Biased, outbound first: a wake-up for queued frames then costs no
        // read attempt. So that a flood of outbound frames cannot starve
        // the reader (pings, closes), the socket is also read, without
        // waiting, after every 8th batch.
        let inbound = tokio::select! {
            biased;
            queued = outbox.recv_many(&mut batch) => {
                if let Err(reason) = queued {
                    return reason;
                }
                if let Err(reason) = write_queued(ws, shared, outbox, &mut batch).await {
                    return reason;
                }
                batches = batches.wrapping_add(1);
                if batches % 8 != 0 {
                    continue;
                }
                match ws.next().now_or_never() {
                    Some(inbound) => inbound,
                    None => continue,
                }
            }
            inbound = ws.next() => inbound,
            _ = ping.tick() => {
                // Dead only if a Ping went unanswered for long enough: while
                // a flood of outbound frames keeps this branch from running,
                // no Ping goes out and a live peer is never blamed for it.
                let patience = shared.config.idle_timeout.saturating_sub(interval);
                if unanswered_since.is_some_and(|t| t.elapsed() >= patience) {
                    return DisconnectReason::IdleTimeout;
                }
                if ws.send(Message::Ping(Bytes::new())).await.is_err() {
                    return DisconnectReason::TransportError;
                }
                unanswered_since.get_or_insert_with(tokio::time::Instant::now);
                continue;
            }
        };
        unanswered_since = None;
        if let Err(reason) = on_inbound(ws, shared, conn, outbox, &mut limiter, inbound).await {
            return reason;
        }
    }
}

/// Writes a drained batch with one flush. If the hub closes the
/// connection while the socket is slow (a slow consumer, a kick), stops at
/// once; at shutdown, finishes the batch within the close timeout so that
/// nothing already queued is lost.
async fn write_queued<S>(
    ws: &mut S,
    shared: &Shared,
    outbox: &Outbox,
    batch: &mut Vec<Bytes>,
) -> Result<(), DisconnectReason>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let mut write = std::pin::pin!(write_batch(ws, batch));
    // Most writes complete at once; only a pending one needs to watch for
    // the connection being closed meanwhile.
    let written = match futures_util::poll!(write.as_mut()) {
        std::task::Poll::Ready(written) => written,
        std::task::Poll::Pending => tokio::select! {
            written = &mut write => written,
            reason = outbox.closed() => {
                if reason != DisconnectReason::ServerShutdown {
                    return Err(reason);
                }
                match tokio::time::timeout(shared.config.close_timeout, write).await {
                    Ok(written) => written,
                    Err(_) => return Err(reason),
                }
            }
        },
    };
    written.map_err(|_| DisconnectReason::TransportError)
}

/// Handles one thing read from the socket: a client frame (answered
/// through the queue), a Ping (its Pong flushed), or the end.
async fn on_inbound<S>(
    ws: &mut S,
    shared: &Shared,
    conn: &Connection,
    outbox: &Outbox,
    limiter: &mut RateLimiter,
    inbound: Option<Result<Message, WsError>>,
) -> Result<(), DisconnectReason>
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let reply = match inbound {
        None => return Err(DisconnectReason::ClientClosed),
        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
            return Err(DisconnectReason::FrameTooLarge);
        }
        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
            return Err(DisconnectReason::ClientClosed);
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "websocket read error");
            return Err(DisconnectReason::TransportError);
        }
        Some(Ok(Message::Close(_))) => return Err(DisconnectReason::ClientClosed),
        Some(Ok(msg)) => {
            if matches!(msg, Message::Text(_) | Message::Binary(_)) && !limiter.allow() {
                return Err(DisconnectReason::RateLimited);
            }
            user_message(shared, conn, msg).await
        }
    };
    let handled = match reply {
        // Through the queue, so that a reply keeps its place after what
        // the hub queued before it (a handler's own publishes, say) and
        // obeys the same bound.
        Some(reply) => conn.try_send(Bytes::from(reply)).map_err(|_| ()),
        // tungstenite queues the Pong for a Ping; flush sends it.
        None => ws.flush().await.map_err(|_| ()),
    };
    // A full queue already marked the connection closed; otherwise the
    // socket failed.
    handled.map_err(|()| outbox.mark_closed(DisconnectReason::TransportError))
}

async fn write_batch<S>(ws: &mut S, batch: &mut Vec<Bytes>) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    for frame in batch.drain(..) {
        // The hub serialized this frame once; every connection shares its
        // bytes. Checking UTF-8 again here is the cost of keeping
        // tungstenite's types out of pgdn-core (and of forbidding unsafe):
        // linear in the frame, a few tens of ns for a typical notification.
        let text = Utf8Bytes::try_from(frame).map_err(|_| WsError::Utf8("notification".into()))?;
        ws.feed(Message::Text(text)).await?;
    }
    ws.flush().await
}

/// Answers one client frame (PROTOCOL.md section 3): the reply, if any.
async fn user_message(shared: &Shared, conn: &Connection, msg: Message) -> Option<String> {
    match msg {
        Message::Text(t) => shared.hub.handle_text(conn, t.as_str()).await,
        Message::Binary(_) => Some(
            ErrorFrame::new(
                ErrorCode::InvalidMessage,
                "binary frames are not supported; send JSON text",
            )
            .to_json(),
        ),
        // Ping is answered by tungstenite; Pong and raw frames need nothing.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_burst_then_refuses() {
        let mut l = RateLimiter::new(1.0, 3.0);
        assert!(l.allow() && l.allow() && l.allow());
        assert!(!l.allow());
    }
}
