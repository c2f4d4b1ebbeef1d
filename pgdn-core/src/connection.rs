//! A connection's bounded outbound queue, and why a connection ended.
//!
//! The hub holds a [`Connection`] per open socket and pushes pre-serialized
//! frames into it with [`Connection::try_send`], which never waits: a full
//! queue disconnects that one connection (close 1013) instead of stalling the
//! publisher or the other connections. The transport holds the matching
//! [`Outbox`] and drains it into the socket.
//!
//! The queue is a `Mutex<VecDeque<Bytes>>` plus a `Notify` rather than a
//! `tokio::sync::mpsc` channel: an idle connection then costs no queue
//! allocation at all (mpsc allocates a 32-slot block per channel up front),
//! the byte bound and the close reason live under the same short lock, and
//! the transport drains every queued frame in one go to write them with a
//! single flush. The lock is never held across an `.await`.
//!
//! # Direct writes
//!
//! A transport that can write without waiting (the WebSocket adapter over
//! a socket) hands the connection a [`DirectWrite`] once the greeting is
//! out. From then on, a user-targeted message whose connection's task is
//! not writing is written to the socket by whoever delivers it (the hub's
//! fan-out), together with what is queued before it: no task woken, no
//! wait for that task to be scheduled behind the ones a broadcast woke.
//! Broadcasts and groups still go through the queue: their tasks write
//! several queued frames per call, which costs far less than one write per
//! frame (BENCHMARKS.md). Whatever cannot be written at once (a full socket
//! buffer, a partial write) falls back to the queue and the transport's
//! task, which keeps the write timeout and the slow-consumer bound.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::identity::Identity;
use crate::transport::Frame;

/// Bounds of a connection's outbound queue. A connection whose queue would
/// exceed either bound is disconnected as a slow consumer (close 1013).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueLimits {
    /// Most frames queued at once. Default 1024.
    pub max_frames: usize,
    /// Most bytes queued at once. Default 1 MiB.
    pub max_bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_frames: 1024,
            max_bytes: 1024 * 1024,
        }
    }
}

impl QueueLimits {
    /// Sets [`QueueLimits::max_frames`].
    pub fn max_frames(mut self, n: usize) -> Self {
        self.max_frames = n.max(1);
        self
    }
    /// Sets [`QueueLimits::max_bytes`].
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n.max(1);
        self
    }
}

/// Why a connection ended; decides the close code sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The client closed the connection or it dropped.
    ClientClosed,
    /// The outbound queue filled up (close 1013).
    SlowConsumer,
    /// An inbound frame was above the size limit (close 1009).
    FrameTooLarge,
    /// The client exceeded its inbound rate limit (close 1008).
    RateLimited,
    /// The server is shutting down (close 1001).
    ServerShutdown,
    /// The application disconnected the user (close 1008: the client must
    /// not reconnect with the same token).
    Kicked,
    /// The WebSocket protocol was violated or the transport failed.
    TransportError,
    /// Nothing was received for too long, not even a Pong to the server's
    /// Ping: the peer is presumed gone (a laptop asleep, a dead NAT entry).
    IdleTimeout,
    /// The connection's token expired and was not refreshed (close 4001):
    /// the client fetches a fresh token and reconnects with `since=`.
    TokenExpired,
    /// The peer broke the transport's protocol (close 1002).
    ProtocolError,
    /// The peer sent text that is not UTF-8 (close 1007).
    InvalidUtf8,
}

impl DisconnectReason {
    /// The close code and reason to send, or `None` when no close frame is
    /// sent (the peer is gone or closed first).
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            DisconnectReason::ClientClosed
            | DisconnectReason::TransportError
            | DisconnectReason::IdleTimeout => None,
            DisconnectReason::SlowConsumer => Some((1013, "slow consumer")),
            DisconnectReason::FrameTooLarge => Some((1009, "frame too large")),
            DisconnectReason::RateLimited => Some((1008, "rate limit exceeded")),
            DisconnectReason::ServerShutdown => Some((1001, "server shutting down")),
            DisconnectReason::Kicked => Some((1008, "disconnected by server")),
            DisconnectReason::TokenExpired => Some((4001, "token expired")),
            DisconnectReason::ProtocolError => Some((1002, "protocol error")),
            DisconnectReason::InvalidUtf8 => Some((1007, "invalid utf-8")),
        }
    }

    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::FrameTooLarge => "frame_too_large",
            DisconnectReason::RateLimited => "rate_limited",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::Kicked => "kicked",
            DisconnectReason::TransportError => "transport_error",
            DisconnectReason::IdleTimeout => "idle_timeout",
            DisconnectReason::TokenExpired => "token_expired",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::InvalidUtf8 => "invalid_utf8",
        }
    }
}

/// Why [`Connection::try_send`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The queue was full: the connection is now closing as a slow consumer.
    #[error("outbound queue full")]
    Full,
    /// The connection is already closing or closed.
    #[error("connection closed")]
    Closed,
}

/// What [`DirectWrite::try_write`] did with the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direct {
    /// The whole frame was handed to the socket.
    Written,
    /// The frame was taken, but part of it waits in the writer: the
    /// transport's next [`Transport::send`](crate::Transport::send) (even
    /// with no frames) must write it out.
    Buffered,
    /// Nothing was written (the socket is full, or the writer has earlier
    /// bytes waiting): the frame goes through the queue.
    Busy,
}

/// A transport's writer that the hub may use directly, from any thread,
/// for a frame that finds the connection's queue empty (see the module
/// docs). Only called while the transport is not writing itself, under
/// the connection's lock, so calls never overlap and never interleave with
/// the transport's own frames.
pub trait DirectWrite: Send + Sync + 'static {
    /// Writes `frames` (JSON text, each framed as the transport frames
    /// it; at most 8), in order, without waiting: all of them, or none
    /// ([`Direct::Busy`]).
    fn try_write(&self, frames: &[&[u8]]) -> Direct;
}

impl std::fmt::Debug for dyn DirectWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectWrite")
    }
}

/// What [`Connection::offer_many`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Offered {
    /// How many frames it took: a prefix of them.
    pub(crate) took: usize,
    /// They were written to the socket at once, not queued.
    pub(crate) written: bool,
    /// The rest overflowed the queue: the connection is now closing as a
    /// slow consumer. (Neither this nor all taken: it was closed.)
    pub(crate) full: bool,
}

#[derive(Debug, Default)]
struct Queue {
    /// Frames with their delivery sequence number (0 for replies).
    frames: VecDeque<Frame>,
    bytes: usize,
    closed: Option<DisconnectReason>,
    /// Frames and bytes of a resume replay being written outside the
    /// queue: they count toward the bounds until written, so that a replay
    /// plus what queues meanwhile never exceeds them.
    reserved_frames: usize,
    reserved_bytes: usize,
    /// Sequence numbers already sent by a resume replay, not to be sent
    /// again, and the highest of them. Boxed: only connections that resumed
    /// pay for it, and only until the queue moves past the highest.
    skip: Option<Box<(HashSet<u64>, u64)>>,
    /// The transport's direct writer, once the greeting is out.
    direct: Option<Arc<dyn DirectWrite>>,
    /// The transport is writing what it took from the queue: nothing may
    /// be written directly until it is done, or it would overtake.
    busy: bool,
    /// A direct write left bytes in the writer: the transport must write
    /// them out (wakes the outbox even with no frames queued).
    flush: bool,
}

#[derive(Debug)]
struct Shared {
    /// Node-local numeric id, the registry key.
    id: u64,
    /// The opaque id sent to the client.
    wire_id: Arc<str>,
    /// The user; fixed for the connection's life (a refresh must name the
    /// same user).
    user_id: Arc<str>,
    /// When the connection was registered (presence's `since`).
    connected_at: std::time::SystemTime,
    /// Groups and expiry change on an in-band refresh; the registry swaps
    /// them under its own write lock.
    identity: Mutex<Identity>,
    limits: QueueLimits,
    queue: Mutex<Queue>,
    /// Wakes the outbox when frames arrive or the connection closes.
    data: Notify,
    /// Wakes a transport blocked on a slow socket when the connection closes.
    kill: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every update is a single push/pop plus counter), so recover.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The hub's side of a connection: a cheap-clone handle that queues frames.
#[derive(Debug, Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

/// The transport's side of a connection: drains the queue into the socket.
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// Creates the two halves of a new connection.
pub fn channel(
    id: u64,
    wire_id: Arc<str>,
    identity: Identity,
    limits: QueueLimits,
) -> (Connection, Outbox) {
    let shared = Arc::new(Shared {
        id,
        wire_id,
        user_id: identity.user_id.clone(),
        connected_at: std::time::SystemTime::now(),
        identity: Mutex::new(identity),
        limits,
        queue: Mutex::new(Queue::default()),
        data: Notify::new(),
        kill: Notify::new(),
    });
    (
        Connection {
            shared: shared.clone(),
        },
        Outbox { shared },
    )
}

impl Connection {
    /// The node-local numeric id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Whether `other` is a handle to this same connection (a pointer
    /// comparison: nothing is read).
    pub fn same(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// When the connection was registered.
    pub fn connected_at(&self) -> std::time::SystemTime {
        self.shared.connected_at
    }

    /// The opaque id sent to the client in the connection frame.
    pub fn wire_id(&self) -> &str {
        &self.shared.wire_id
    }

    /// The user this connection belongs to.
    pub fn user_id(&self) -> &str {
        &self.shared.user_id
    }

    /// Who this connection belongs to now (groups and expiry may change
    /// on a refresh).
    pub fn identity(&self) -> Identity {
        self.shared
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the identity (same user). Only the registry calls this,
    /// under its write lock, so that group membership moves in one step.
    pub(crate) fn set_identity(&self, identity: Identity) -> Identity {
        let mut cur = self
            .shared
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *cur, identity)
    }

    /// Queues one frame without waiting. A full queue closes the connection
    /// as [`DisconnectReason::SlowConsumer`] and returns [`SendError::Full`].
    pub fn try_send(&self, frame: Bytes) -> Result<(), SendError> {
        self.try_send_seq(0, frame)
    }

    /// Like [`Connection::try_send`], for a message with delivery sequence
    /// number `seq` (so that a resume replay can skip it).
    pub fn try_send_seq(&self, seq: u64, frame: Bytes) -> Result<(), SendError> {
        self.offer(seq, frame).map(|_| ())
    }

    /// Delivers one frame: see [`Connection::offer_many`].
    pub(crate) fn offer(&self, seq: u64, frame: Bytes) -> Result<bool, SendError> {
        match self.offer_many(&[(seq, &frame)], true) {
            Offered {
                took: 1, written, ..
            } => Ok(written),
            Offered { full: true, .. } => Err(SendError::Full),
            _ => Err(SendError::Closed),
        }
    }

    /// Delivers frames, in order. With `direct`, when the transport has a
    /// direct writer and is not writing itself, they are written to the
    /// socket at once, after whatever is queued (at most 8 frames in all:
    /// the transport's task finds the queue empty), else queued.
    pub(crate) fn offer_many(&self, items: &[(u64, &Bytes)], direct: bool) -> Offered {
        let was_empty;
        let mut taken = 0;
        {
            let mut q = self.shared.lock();
            if q.closed.is_some() {
                return Offered::default();
            }
            let queued = q.frames.len();
            if direct
                && queued + items.len() <= crate::registry::BATCH
                && !q.busy
                && !q.flush
                && q.reserved_frames == 0
                && q.skip.is_none()
                && let Some(writer) = &q.direct
            {
                let mut frames = [&[][..]; crate::registry::BATCH];
                let all = q
                    .frames
                    .iter()
                    .map(|f| &f.data[..])
                    .chain(items.iter().map(|(_, frame)| &frame[..]));
                for (slot, frame) in frames.iter_mut().zip(all) {
                    *slot = frame;
                }
                let done = match writer.try_write(&frames[..queued + items.len()]) {
                    Direct::Written => true,
                    Direct::Buffered => {
                        q.flush = true;
                        true
                    }
                    Direct::Busy => false,
                };
                if done {
                    q.frames.clear();
                    q.bytes = 0;
                    let flush = q.flush;
                    drop(q);
                    if flush {
                        self.shared.data.notify_one();
                    }
                    return Offered {
                        took: items.len(),
                        written: true,
                        full: false,
                    };
                }
            }
            was_empty = q.frames.is_empty() && !q.flush;
            let limits = self.shared.limits;
            for (seq, frame) in items {
                if q.frames.len() + q.reserved_frames >= limits.max_frames
                    || q.bytes + q.reserved_bytes + frame.len() > limits.max_bytes
                {
                    q.closed = Some(DisconnectReason::SlowConsumer);
                    q.frames.clear();
                    q.bytes = 0;
                    q.direct = None;
                    drop(q);
                    self.wake_all();
                    return Offered {
                        took: taken,
                        written: false,
                        full: true,
                    };
                }
                q.bytes += frame.len();
                q.frames.push_back(Frame {
                    seq: *seq,
                    data: (*frame).clone(),
                });
                taken += 1;
            }
        }
        if was_empty {
            self.shared.data.notify_one();
        }
        Offered {
            took: taken,
            written: false,
            full: false,
        }
    }

    /// Asks the transport to close the connection for `reason`. Frames
    /// already queued are still written first, except for a slow consumer.
    /// Returns false when the connection was already closing.
    pub fn close(&self, reason: DisconnectReason) -> bool {
        {
            let mut q = self.shared.lock();
            if q.closed.is_some() {
                return false;
            }
            q.closed = Some(reason);
        }
        self.wake_all();
        true
    }

    /// Whether the connection is closing or closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Frames currently queued.
    pub fn queued_frames(&self) -> usize {
        self.shared.lock().frames.len()
    }

    fn wake_all(&self) {
        self.shared.data.notify_one();
        self.shared.kill.notify_one();
    }
}

impl Outbox {
    /// The hub's handle to this same connection.
    pub fn connection(&self) -> Connection {
        Connection {
            shared: self.shared.clone(),
        }
    }

    /// Waits for frames and moves every queued frame into `buf`. Returns the
    /// reason once the connection is closing and nothing more is to be
    /// written. Cancel-safe: frames are only taken when it returns.
    ///
    /// With a direct writer ([`Outbox::set_direct`]), it may also return
    /// with no frames, when a direct write left bytes to write out; and
    /// until [`Outbox::written`], nothing is written directly (the
    /// transport's writes must not be overtaken).
    pub async fn recv_many(&self, buf: &mut Vec<Frame>) -> Result<usize, DisconnectReason> {
        loop {
            {
                let mut q = self.shared.lock();
                if q.flush && q.frames.is_empty() {
                    q.flush = false;
                    q.busy = true;
                    return Ok(0);
                }
                if !q.frames.is_empty() {
                    q.flush = false;
                    q.busy = true;
                    let n = q.frames.len();
                    let Queue { frames, skip, .. } = &mut *q;
                    match skip.take() {
                        None => buf.extend(frames.drain(..)),
                        Some(set) => {
                            let (replayed, max) = &*set;
                            // Messages are queued in delivery order: once one
                            // is past the replay, no replayed one can follow.
                            let past = frames.iter().any(|f| f.seq > *max);
                            buf.extend(
                                frames
                                    .drain(..)
                                    .filter(|f| f.seq == 0 || !replayed.contains(&f.seq)),
                            );
                            if !past {
                                *skip = Some(set);
                            }
                        }
                    }
                    q.bytes = 0;
                    if q.frames.capacity() > 64 {
                        // Give back what a burst grew, so idle connections stay small.
                        q.frames.shrink_to_fit();
                    }
                    return Ok(n);
                }
                if let Some(reason) = q.closed {
                    return Err(reason);
                }
            }
            self.shared.data.notified().await;
        }
    }

    /// Hands the connection the transport's direct writer: from now on a
    /// frame that finds the queue empty and the transport idle is written
    /// at once, by whoever delivers it. Call once the greeting is written.
    pub fn set_direct(&self, direct: Arc<dyn DirectWrite>) {
        let mut q = self.shared.lock();
        if q.closed.is_none() {
            q.direct = Some(direct);
        }
    }

    /// The transport has written what [`Outbox::recv_many`] gave it:
    /// direct writes may go on.
    pub fn written(&self) {
        self.shared.lock().busy = false;
    }

    /// The queue's bounds.
    pub fn limits(&self) -> QueueLimits {
        self.shared.limits
    }

    /// Counts `frames` frames of `bytes` bytes, written outside the queue
    /// (a resume replay), toward its bounds until
    /// [`Outbox::release_reserved`].
    pub fn reserve(&self, frames: usize, bytes: usize) {
        let mut q = self.shared.lock();
        q.reserved_frames = frames;
        q.reserved_bytes = bytes;
    }

    /// Ends a [`Outbox::reserve`]: the replay was written.
    pub fn release_reserved(&self) {
        let mut q = self.shared.lock();
        q.reserved_frames = 0;
        q.reserved_bytes = 0;
    }

    /// Drops, from now on, queued messages whose sequence number is in
    /// `seqs`: the transport has just sent them in a resume replay. Only
    /// messages delivered before the replay was read can be among them.
    pub fn skip_replayed(&self, seqs: impl IntoIterator<Item = u64>) {
        let set: HashSet<u64> = seqs.into_iter().collect();
        if let Some(max) = set.iter().max().copied() {
            self.shared.lock().skip = Some(Box::new((set, max)));
        }
    }

    /// Resolves once the connection is closing: for a transport blocked on
    /// writing to a slow socket.
    pub async fn closed(&self) -> DisconnectReason {
        loop {
            if let Some(reason) = self.shared.lock().closed {
                return reason;
            }
            self.shared.kill.notified().await;
        }
    }

    /// Marks the connection closed (the transport saw it end) so that the
    /// hub stops queueing to it. Keeps the first reason set.
    pub fn mark_closed(&self, reason: DisconnectReason) -> DisconnectReason {
        let mut q = self.shared.lock();
        let reason = *q.closed.get_or_insert(reason);
        q.frames.clear();
        q.bytes = 0;
        // The writer holds the socket: let it go with the transport.
        q.direct = None;
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(frames: Vec<Frame>) -> Vec<Bytes> {
        frames.into_iter().map(|f| f.data).collect()
    }

    fn pair(limits: QueueLimits) -> (Connection, Outbox) {
        channel(1, "n-1".into(), Identity::new("u1", ["g"]), limits)
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_in_one_batch() {
        let (conn, outbox) = pair(QueueLimits::default());
        for i in 0..5u8 {
            conn.try_send(Bytes::from(vec![i])).unwrap();
        }
        let mut buf = Vec::new();
        assert_eq!(outbox.recv_many(&mut buf).await, Ok(5));
        assert_eq!(
            data(buf),
            (0..5u8).map(|i| Bytes::from(vec![i])).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn full_queue_closes_as_slow_consumer() {
        let (conn, outbox) = pair(QueueLimits::default().max_frames(2));
        conn.try_send(Bytes::from_static(b"a")).unwrap();
        conn.try_send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(
            conn.try_send(Bytes::from_static(b"c")),
            Err(SendError::Full)
        );
        assert_eq!(
            conn.try_send(Bytes::from_static(b"d")),
            Err(SendError::Closed)
        );
        assert_eq!(outbox.closed().await, DisconnectReason::SlowConsumer);
        let mut buf = Vec::new();
        assert_eq!(
            outbox.recv_many(&mut buf).await,
            Err(DisconnectReason::SlowConsumer)
        );
        assert!(buf.is_empty(), "a slow consumer's backlog is dropped");
    }

    #[tokio::test]
    async fn a_reserved_replay_counts_toward_the_bounds() {
        let (conn, outbox) = pair(QueueLimits::default().max_frames(4).max_bytes(100));
        outbox.reserve(3, 60);
        conn.try_send(Bytes::from(vec![0; 30])).unwrap();
        assert_eq!(conn.try_send(Bytes::from(vec![0; 1])), Err(SendError::Full));
        let (conn, outbox) = pair(QueueLimits::default().max_frames(4).max_bytes(100));
        outbox.reserve(3, 60);
        outbox.release_reserved();
        for _ in 0..3 {
            conn.try_send(Bytes::from(vec![0; 30])).unwrap();
        }
    }

    #[tokio::test]
    async fn byte_bound_counts() {
        let (conn, _outbox) = pair(QueueLimits::default().max_bytes(10));
        conn.try_send(Bytes::from(vec![0; 6])).unwrap();
        assert_eq!(conn.try_send(Bytes::from(vec![0; 5])), Err(SendError::Full));
    }

    #[tokio::test]
    async fn close_flushes_queued_frames_first() {
        let (conn, outbox) = pair(QueueLimits::default());
        conn.try_send(Bytes::from_static(b"last")).unwrap();
        assert!(conn.close(DisconnectReason::ServerShutdown));
        assert!(!conn.close(DisconnectReason::Kicked), "first reason wins");
        let mut buf = Vec::new();
        assert_eq!(outbox.recv_many(&mut buf).await, Ok(1));
        assert_eq!(
            outbox.recv_many(&mut buf).await,
            Err(DisconnectReason::ServerShutdown)
        );
    }

    #[tokio::test]
    async fn replayed_messages_are_skipped_until_the_queue_moves_past_them() {
        let (conn, outbox) = pair(QueueLimits::default());
        conn.try_send_seq(3, Bytes::from_static(b"m3")).unwrap();
        conn.try_send_seq(4, Bytes::from_static(b"broadcast4"))
            .unwrap();
        outbox.skip_replayed([3, 5]);
        let mut buf = Vec::new();
        outbox.recv_many(&mut buf).await.unwrap();
        assert_eq!(
            data(std::mem::take(&mut buf)),
            vec![Bytes::from_static(b"broadcast4")]
        );
        conn.try_send_seq(5, Bytes::from_static(b"m5")).unwrap();
        conn.try_send(Bytes::from_static(b"reply")).unwrap();
        conn.try_send_seq(6, Bytes::from_static(b"m6")).unwrap();
        outbox.recv_many(&mut buf).await.unwrap();
        assert_eq!(
            data(buf),
            vec![Bytes::from_static(b"reply"), Bytes::from_static(b"m6")]
        );
        assert!(
            conn.shared.lock().skip.is_none(),
            "the skip set is gone once passed"
        );
    }

    #[tokio::test]
    async fn wakes_a_waiting_outbox() {
        let (conn, outbox) = pair(QueueLimits::default());
        let task = tokio::spawn(async move {
            let mut buf = Vec::new();
            outbox.recv_many(&mut buf).await.map(|_| buf)
        });
        tokio::task::yield_now().await;
        conn.try_send(Bytes::from_static(b"x")).unwrap();
        assert_eq!(
            data(task.await.unwrap().unwrap()),
            vec![Bytes::from_static(b"x")]
        );
    }
}
