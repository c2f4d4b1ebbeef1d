//! The WebSocket transport: tungstenite messages to and from pgdn-core's
//! [`Transport`]. Translation only; the protocol (greeting, replay, rate
//! limit, keepalive, expiry, close codes) is pgdn-core's
//! [`Session`](pgdn_core::Session).

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::sync::Arc;

use pgdn_core::{DirectWrite, Frame, Inbound, Transport, TransportError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A WebSocket (any `Sink + Stream` of tungstenite messages) as a
/// [`Transport`].
pub struct WsTransport<S> {
    ws: S,
    /// tungstenite queued a Pong for a Ping we read; flushed before the
    /// next read, so that a dropped `recv` cannot lose it.
    pong_pending: bool,
    /// The socket under `ws` counts every frame toward the rate limit
    /// (`FrameCounter`), so the session must not count again.
    counts_frames: bool,
    /// The socket under `ws`, for the hub's direct writes.
    direct: Option<Arc<dyn DirectWrite>>,
}

impl<S> WsTransport<S> {
    /// Wraps a WebSocket stream; the session counts each message and
    /// control frame toward the rate limit.
    pub fn new(ws: S) -> Self {
        WsTransport {
            ws,
            pong_pending: false,
            counts_frames: false,
            direct: None,
        }
    }

    /// Wraps a WebSocket stream whose socket counts every wire frame,
    /// fragments included.
    pub(crate) fn counting(ws: S) -> Self {
        WsTransport {
            counts_frames: true,
            ..WsTransport::new(ws)
        }
    }

    /// Lets the hub write frames straight to `direct`, the socket under
    /// `ws`, which takes tungstenite's writes whole
    /// ([`SharedIo`](crate::direct::SharedIo)).
    pub(crate) fn with_direct(mut self, direct: Arc<dyn DirectWrite>) -> Self {
        self.direct = Some(direct);
        self
    }
}

fn failed(e: WsError) -> TransportError {
    TransportError::new(e.to_string())
}

impl<S> Transport for WsTransport<S>
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin + Send,
{
    async fn send(&mut self, frames: &mut Vec<Frame>) -> Result<(), TransportError> {
        for frame in frames.drain(..) {
            // The hub serialized this frame once; every connection shares its
            // bytes. Checking UTF-8 again here is the cost of keeping
            // tungstenite's types out of pgdn-core (and of forbidding unsafe):
            // linear in the frame, a few tens of ns for a typical notification.
            let text = Utf8Bytes::try_from(frame.data)
                .map_err(|_| TransportError::new("frame is not UTF-8"))?;
            self.ws.feed(Message::Text(text)).await.map_err(failed)?;
        }
        self.pong_pending = false;
        self.ws.flush().await.map_err(failed)
    }

    async fn keepalive(&mut self) -> Result<(), TransportError> {
        self.ws
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(failed)
    }

    async fn recv(&mut self) -> Inbound {
        if self.pong_pending {
            if let Err(e) = self.ws.flush().await {
                return Inbound::Failed(failed(e));
            }
            self.pong_pending = false;
        }
        match self.ws.next().await {
            None => Inbound::Closed,
            Some(Ok(Message::Text(t))) => Inbound::Text(t.as_str().to_owned()),
            Some(Ok(Message::Binary(_))) => Inbound::Binary,
            Some(Ok(Message::Ping(_))) => {
                // tungstenite queued the Pong; it goes out with the next
                // flush, before the next read at the latest.
                self.pong_pending = true;
                Inbound::Ping
            }
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => Inbound::Control,
            Some(Ok(Message::Close(_))) => Inbound::Closed,
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => Inbound::TooLarge,
            Some(Err(WsError::Capacity(_))) => Inbound::TooLarge,
            Some(Err(WsError::Utf8(_))) => Inbound::InvalidUtf8,
            Some(Err(WsError::Protocol(_))) => Inbound::ProtocolError,
            Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => Inbound::Closed,
            Some(Err(WsError::Io(e)))
                if e.get_ref()
                    .is_some_and(|inner| inner.is::<crate::frames::FrameFlood>()) =>
            {
                Inbound::RateLimited
            }
            Some(Err(e)) => Inbound::Failed(failed(e)),
        }
    }

    fn counts_frames(&self) -> bool {
        self.counts_frames
    }

    fn direct(&self) -> Option<Arc<dyn DirectWrite>> {
        self.direct.clone()
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(reason),
        };
        if self.ws.send(Message::Close(Some(frame))).await.is_ok() {
            let _ = self.ws.close().await;
        }
    }
}
