//! The Server-Sent Events transport (docs/protocol.md section 7), free of any
//! web framework: [`Service::sse`](crate::Service::sse) returns an
//! `http::Response` whose body is an [`SseStream`] of byte chunks; the
//! adapter sends it as a streaming body. The session writes into the
//! stream through a small bounded channel, so a client that stops reading
//! fills it, the session's write timeout fires and the connection ends as
//! a slow consumer, like a WebSocket one.
//!
//! Each frame is one event, `data: <json>` and a blank line; a
//! notification's event also carries `id: <message id>`, which the
//! browser's `EventSource` sends back as `Last-Event-ID` when it
//! reconnects. A `: keepalive` comment goes out every ping interval, and
//! where a WebSocket would get a close code, the stream ends with
//! `data: {"type":"close","code":...,"reason":...}`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::transport::{Frame, Inbound, Transport, TransportError};

/// Chunks in flight between the session and the response body. Small: a
/// batch of frames is one chunk, and what does not fit waits in the
/// connection's own bounded queue.
const CHANNEL_CHUNKS: usize = 4;

/// The session's side of an SSE response.
#[derive(Debug)]
pub struct SseTransport {
    tx: Option<mpsc::Sender<Bytes>>,
}

/// The body of an SSE response: a stream of byte chunks that ends when the
/// session closes the connection. Dropping it (the client went away) ends
/// the session.
#[derive(Debug)]
pub struct SseStream {
    rx: mpsc::Receiver<Bytes>,
}

/// A connected transport and body stream.
pub fn channel() -> (SseTransport, SseStream) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    (SseTransport { tx: Some(tx) }, SseStream { rx })
}

/// The 200 answer that starts a stream, with the headers of docs/protocol.md
/// section 7 (and `X-Accel-Buffering: no`, so nginx does not buffer it).
pub fn response(stream: SseStream) -> http::Response<SseStream> {
    http::Response::builder()
        .status(http::StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(stream)
        .expect("a valid response")
}

impl Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(Ok))
    }
}

/// The message id at the start of a notification's JSON: the hub writes
/// `{"id":"<id>",...` first, and ids are `[A-Za-z0-9_.:-]` or a UUID, so
/// no escape can occur in them.
fn notification_id(json: &[u8]) -> Option<&[u8]> {
    let rest = json.strip_prefix(br#"{"id":""#)?;
    let end = rest.iter().position(|b| *b == b'"')?;
    Some(&rest[..end])
}

/// Appends one event for `frame`.
fn encode(out: &mut BytesMut, frame: &Frame) {
    if frame.is_notification()
        && let Some(id) = notification_id(&frame.data)
    {
        out.put_slice(b"id: ");
        out.put_slice(id);
        out.put_u8(b'\n');
    }
    // serde_json writes compact JSON: one line (newlines in strings are
    // escaped), as one `data:` line must be.
    out.put_slice(b"data: ");
    out.put_slice(&frame.data);
    out.put_slice(b"\n\n");
}

impl SseTransport {
    async fn push(&mut self, chunk: Bytes) -> Result<(), TransportError> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| TransportError::new("stream closed"))?;
        tx.send(chunk)
            .await
            .map_err(|_| TransportError::new("client went away"))
    }
}

impl Transport for SseTransport {
    async fn send(&mut self, frames: &mut Vec<Frame>) -> Result<(), TransportError> {
        let size: usize = frames.iter().map(|f| f.data.len() + 64).sum();
        let mut out = BytesMut::with_capacity(size);
        for frame in frames.drain(..) {
            encode(&mut out, &frame);
        }
        self.push(out.freeze()).await
    }

    async fn keepalive(&mut self) -> Result<(), TransportError> {
        self.push(Bytes::from_static(b": keepalive\n\n")).await
    }

    async fn recv(&mut self) -> Inbound {
        // Nothing comes from the client on SSE; the only event is its
        // leaving (the server dropped the response body).
        match &self.tx {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
        Inbound::Closed
    }

    async fn close(&mut self, code: u16, reason: &str) {
        #[derive(serde::Serialize)]
        struct CloseEvent<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            code: u16,
            reason: &'a str,
        }
        let event = CloseEvent {
            kind: "close",
            code,
            reason,
        };
        let json = serde_json::to_string(&event).expect("a close event serializes");
        let _ = self.push(Bytes::from(format!("data: {json}\n\n"))).await;
        // Dropping the sender ends the body.
        self.tx = None;
    }

    fn answers_keepalive(&self) -> bool {
        false
    }

    fn kind(&self) -> crate::transport::TransportKind {
        crate::transport::TransportKind::Sse
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn events_carry_ids_for_notifications_only() {
        let (mut t, mut s) = channel();
        let mut frames = vec![
            Frame::reply(r#"{"type":"connection","status":"connected"}"#),
            Frame {
                seq: 7,
                data: Bytes::from_static(br#"{"id":"m-7","type":"info","payload":{}}"#),
            },
            Frame::reply(r#"{"id":"not-a-message","type":"echo"}"#),
        ];
        t.send(&mut frames).await.unwrap();
        assert!(frames.is_empty());
        let chunk = s.next().await.unwrap().unwrap();
        assert_eq!(
            std::str::from_utf8(&chunk).unwrap(),
            concat!(
                "data: {\"type\":\"connection\",\"status\":\"connected\"}\n\n",
                "id: m-7\ndata: {\"id\":\"m-7\",\"type\":\"info\",\"payload\":{}}\n\n",
                "data: {\"id\":\"not-a-message\",\"type\":\"echo\"}\n\n",
            )
        );
        t.keepalive().await.unwrap();
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b": keepalive\n\n");
        t.close(4001, "token expired").await;
        assert_eq!(
            &s.next().await.unwrap().unwrap()[..],
            b"data: {\"type\":\"close\",\"code\":4001,\"reason\":\"token expired\"}\n\n"
        );
        assert!(s.next().await.is_none(), "the stream ends after close");
    }

    #[tokio::test]
    async fn a_dropped_body_is_a_closed_peer() {
        let (mut t, s) = channel();
        drop(s);
        assert_eq!(t.recv().await, Inbound::Closed);
        assert!(t.keepalive().await.is_err());
    }
}
