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
//!
//! The channel is a small queue under a mutex rather than a
//! `tokio::sync::mpsc` channel, which allocates a block of 32 slots up
//! front and another on first send (about 2 KB per idle connection, as
//! much as the rest of the connection's state).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::Notify;

use crate::transport::{Frame, Inbound, Transport, TransportError};

/// Chunks in flight between the session and the response body. Small: a
/// batch of frames is one chunk, and what does not fit waits in the
/// connection's own bounded queue.
const CHANNEL_CHUNKS: usize = 4;

/// The chunks between the session and the body, and who is still there.
#[derive(Debug, Default)]
struct Queue {
    chunks: VecDeque<Bytes>,
    /// The session closed the stream (or is gone): the body ends once
    /// drained.
    sender_gone: bool,
    /// The body was dropped: the client went away.
    body_gone: bool,
    /// The body waiting for a chunk.
    body_waker: Option<Waker>,
}

#[derive(Debug, Default)]
struct Channel {
    queue: Mutex<Queue>,
    /// Wakes the session when there is room, or when the body is gone.
    room: Notify,
}

impl Channel {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every update is a push, a pop or a flag: nothing to repair.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The session's side of an SSE response.
#[derive(Debug)]
pub struct SseTransport {
    /// `None` once closed.
    chan: Option<Arc<Channel>>,
}

/// The body of an SSE response: a stream of byte chunks that ends when the
/// session closes the connection. Dropping it (the client went away) ends
/// the session.
#[derive(Debug)]
pub struct SseStream {
    chan: Arc<Channel>,
}

/// A connected transport and body stream.
pub fn channel() -> (SseTransport, SseStream) {
    let chan = Arc::new(Channel::default());
    (
        SseTransport {
            chan: Some(chan.clone()),
        },
        SseStream { chan },
    )
}

impl Drop for SseTransport {
    fn drop(&mut self) {
        self.end();
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        self.chan.lock().body_gone = true;
        self.chan.room.notify_one();
    }
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

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut q = self.chan.lock();
        if let Some(chunk) = q.chunks.pop_front() {
            drop(q);
            self.chan.room.notify_one();
            return Poll::Ready(Some(Ok(chunk)));
        }
        if q.sender_gone {
            return Poll::Ready(None);
        }
        q.body_waker = Some(cx.waker().clone());
        Poll::Pending
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
    /// Queues `chunk` once there is room (at most [`CHANNEL_CHUNKS`]).
    async fn push(&mut self, chunk: Bytes) -> Result<(), TransportError> {
        let chan = self
            .chan
            .as_ref()
            .ok_or_else(|| TransportError::new("stream closed"))?;
        loop {
            {
                let mut q = chan.lock();
                if q.body_gone {
                    return Err(TransportError::new("client went away"));
                }
                if q.chunks.len() < CHANNEL_CHUNKS {
                    q.chunks.push_back(chunk);
                    let waker = q.body_waker.take();
                    drop(q);
                    if let Some(w) = waker {
                        w.wake();
                    }
                    return Ok(());
                }
            }
            // A permit left by an earlier wake makes this return at once;
            // the loop checks again.
            chan.room.notified().await;
        }
    }

    /// Ends the body once it has taken what is queued.
    fn end(&mut self) {
        if let Some(chan) = self.chan.take() {
            let waker = {
                let mut q = chan.lock();
                q.sender_gone = true;
                q.body_waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
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
        let Some(chan) = &self.chan else {
            return std::future::pending().await;
        };
        while !chan.lock().body_gone {
            chan.room.notified().await;
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
        self.end();
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
