//! What a transport must offer the connection protocol: write frames,
//! send a keepalive, read what the peer sends, close with a code. In the
//! spirit of centrifuge's `transport.go`: the protocol
//! ([`Session`](crate::Session)) lives in core, once; a transport
//! (WebSocket, Server-Sent Events, a test channel) only moves bytes.
//!
//! Everything here speaks core types: frames are pre-serialized JSON text
//! ([`Bytes`], shared by every connection a publish reaches), inbound
//! events are [`Inbound`]. An adapter converts its own socket type to and
//! from these, privately.

use std::future::Future;

use bytes::Bytes;

/// One frame for the peer: pre-serialized JSON text, shared by every
/// connection a publish reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message's delivery sequence number for a notification; 0 for
    /// every other frame (connection, pong, error, handler replies).
    pub seq: u64,
    /// The frame's JSON text.
    pub data: Bytes,
}

impl Frame {
    /// A frame that is not a notification.
    pub fn reply(data: impl Into<Bytes>) -> Self {
        Frame {
            seq: 0,
            data: data.into(),
        }
    }

    /// Whether this frame is a notification (it carries an `id`).
    pub fn is_notification(&self) -> bool {
        self.seq != 0
    }
}

/// Which kind of transport a connection uses: the `transport` label of
/// the connection metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// A WebSocket (or another bidirectional transport).
    WebSocket,
    /// Server-Sent Events.
    Sse,
}

impl TransportKind {
    /// Every kind, in the order of its metrics index.
    pub const ALL: [TransportKind; 2] = [TransportKind::WebSocket, TransportKind::Sse];

    /// The metric label: `websocket` or `sse`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::Sse => "sse",
        }
    }

    /// Its place in [`TransportKind::ALL`].
    pub(crate) fn index(self) -> usize {
        match self {
            TransportKind::WebSocket => 0,
            TransportKind::Sse => 1,
        }
    }
}

/// A transport failed (the socket broke, the peer went away). The session
/// ends the connection as [`DisconnectReason::TransportError`](crate::DisconnectReason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transport failed: {0}")]
pub struct TransportError(pub String);

impl TransportError {
    /// A transport error with a description (never a token).
    pub fn new(what: impl Into<String>) -> Self {
        TransportError(what.into())
    }
}

/// One thing read from the peer. Every variant but the terminal ones
/// counts toward the inbound rate limit (docs/protocol.md section 3: text,
/// binary, Ping, Pong and each fragment).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Inbound {
    /// A complete text message: a client frame (JSON).
    Text(String),
    /// A binary message: answered with an `invalid_message` error frame.
    Binary,
    /// A transport-level Ping. The transport answers it itself (for
    /// WebSocket, a Pong) before returning this.
    Ping,
    /// A transport-level Pong, or any other control frame or fragment the
    /// transport saw: proof the peer is alive, nothing to answer.
    Control,
    /// A message above the frame-size limit (close 1009).
    TooLarge,
    /// Text that is not UTF-8 (close 1007).
    InvalidUtf8,
    /// The peer broke the transport's protocol (close 1002).
    ProtocolError,
    /// The peer went over the inbound rate limit, as counted by a
    /// transport that sees more frames than it reports (every fragment of
    /// a WebSocket message; see [`Transport::counts_frames`]): close 1008.
    RateLimited,
    /// The peer closed the connection, or it went away.
    Closed,
    /// Reading failed.
    Failed(TransportError),
}

/// A connection's transport, driven by [`Session::run`](crate::Session::run).
///
/// Promise of the implementation: `send` writes every frame in order (each
/// one text message or event) and flushes; a future returned by any method
/// may be dropped before it completes (the session races them against its
/// queue and timers), so `recv` must be cancel-safe: a dropped `recv` loses
/// no message. The session never calls two methods at once.
///
/// ```
/// use pgdn_core::{Frame, Inbound, Transport, TransportError};
///
/// /// A transport that collects what the session writes (tests do this).
/// struct Collect(Vec<Frame>);
///
/// impl Transport for Collect {
///     async fn send(&mut self, frames: &mut Vec<Frame>) -> Result<(), TransportError> {
///         self.0.append(frames);
///         Ok(())
///     }
///     async fn keepalive(&mut self) -> Result<(), TransportError> {
///         Ok(())
///     }
///     async fn recv(&mut self) -> Inbound {
///         std::future::pending().await
///     }
///     async fn close(&mut self, _code: u16, _reason: &str) {}
/// }
/// ```
pub trait Transport: Send {
    /// Writes `frames` in order, each one JSON text frame, and flushes;
    /// leaves `frames` empty.
    fn send(
        &mut self,
        frames: &mut Vec<Frame>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Sends a keepalive: a WebSocket Ping (which the peer answers), an SSE
    /// comment (which it does not).
    fn keepalive(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The next thing the peer sent. A transport with no inbound direction
    /// (Server-Sent Events) resolves only with [`Inbound::Closed`] once
    /// the peer has gone. Must be cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;

    /// Ends the connection with `code` and `reason` (docs/protocol.md section
    /// 2): a WebSocket close frame, an SSE close event. The session bounds
    /// how long this may take.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;

    /// Whether the peer answers keepalives, so that silence means it is
    /// gone (the idle timeout applies). Default true; false for SSE.
    fn answers_keepalive(&self) -> bool {
        true
    }

    /// Whether the transport enforces the inbound rate limit itself, on
    /// every wire frame (fragments and control frames included), and
    /// reports [`Inbound::RateLimited`]; the session then does not count
    /// what it receives a second time. Default false: the session counts
    /// each [`Inbound`] (use [`RateLimiter`](crate::protocol::RateLimiter)
    /// with the config's rate and burst when implementing this).
    fn counts_frames(&self) -> bool {
        false
    }

    /// A writer the hub may use to write a frame straight to the socket,
    /// from the thread that delivers it, when the connection has nothing
    /// queued and the transport is not writing (see
    /// [`DirectWrite`](crate::connection::DirectWrite)). Default `None`:
    /// every frame goes through [`Transport::send`]. A transport that
    /// returns one must make its own writes (frames, keepalives, closes)
    /// go through the same writer, whole frames at a time, and
    /// [`Transport::send`] must write out what a direct write left
    /// buffered, even when given no frames.
    fn direct(&self) -> Option<std::sync::Arc<dyn crate::connection::DirectWrite>> {
        None
    }

    /// Which kind of transport this is, for the connection metrics.
    /// Default [`TransportKind::WebSocket`], the bidirectional transport
    /// [`Service::serve`](crate::Service::serve) is for; the SSE transport
    /// says [`TransportKind::Sse`].
    fn kind(&self) -> TransportKind {
        TransportKind::WebSocket
    }
}
