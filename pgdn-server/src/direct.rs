//! The WebSocket's socket, shared between its connection task and the
//! hub's fan-out, so that a delivery can be written straight to the
//! socket ([`DirectWrite`]) instead of waking the connection's task.
//!
//! [`SharedIo`] holds the socket under a `std::sync::Mutex` (never held
//! across an `.await`: every use is one non-blocking poll). tungstenite
//! reads and writes through it as through any socket; the hub writes
//! through [`DirectWrite::try_write`], which frames the JSON text itself
//! (a server frame is a 2 to 10 byte header and the payload, unmasked:
//! too little to need tungstenite) and writes header and payload with one
//! vectored write, without copying the payload.
//!
//! Frames must never interleave on the wire, so every write here takes
//! whole frames: the task's writes are accepted in full (what the socket
//! did not take waits in `pending`, written out before anything else),
//! and a direct write is only tried when nothing is pending. pgdn-core
//! only tries one while the task is not writing
//! ([`Outbox::written`](pgdn_core::Outbox::written)), so the task's
//! frames are never overtaken.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use pgdn_core::{Direct, DirectWrite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The socket and what it has not taken yet.
struct IoState<IO> {
    io: IO,
    /// Bytes accepted (whole frames, or the rest of one) that the socket
    /// has not taken yet; unallocated while empty.
    pending: Vec<u8>,
    /// How much of `pending` was written.
    sent: usize,
    /// A direct write's flush did not complete (TLS): the task flushes.
    unflushed: bool,
}

impl<IO: AsyncWrite + Unpin> IoState<IO> {
    /// Writes out `pending`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.pending[self.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.pending.is_empty() {
            // Freed, not kept: an idle connection holds no write buffer.
            self.pending = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Keeps what the socket did not take of `bufs` (after its first
    /// `written` bytes) for later.
    fn keep_rest(&mut self, bufs: &[&[u8]], mut written: usize) {
        for b in bufs {
            if written >= b.len() {
                written -= b.len();
            } else {
                self.pending.extend_from_slice(&b[written..]);
                written = 0;
            }
        }
    }
}

/// A socket shared by its connection's task and the hub. Cheap to clone.
pub(crate) struct SharedIo<IO>(Arc<Locked<IO>>);

/// The socket under its lock: what the hub holds as a [`DirectWrite`].
pub(crate) struct Locked<IO>(Mutex<IoState<IO>>);

impl<IO> Locked<IO> {
    fn lock(&self) -> MutexGuard<'_, IoState<IO>> {
        // Every update is a write plus a counter: a panic cannot leave the
        // state inconsistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<IO> Clone for SharedIo<IO> {
    fn clone(&self) -> Self {
        SharedIo(self.0.clone())
    }
}

impl<IO> SharedIo<IO> {
    pub(crate) fn new(io: IO) -> Self {
        SharedIo(Arc::new(Locked(Mutex::new(IoState {
            io,
            pending: Vec::new(),
            sent: 0,
            unflushed: false,
        }))))
    }

    fn lock(&self) -> MutexGuard<'_, IoState<IO>> {
        self.0.lock()
    }
}

impl<IO: AsyncWrite + Unpin + Send + 'static> SharedIo<IO> {
    /// The hub's handle for direct writes to this socket.
    pub(crate) fn direct(&self) -> Arc<dyn DirectWrite> {
        self.0.clone()
    }
}

/// The header of an unmasked, final text frame of `len` bytes (RFC 6455
/// section 5.2), and its length.
fn text_header(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x81;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// Polls `f` once with a waker that does nothing, outside tokio's
/// cooperative budget: a fan-out makes thousands of writes in one poll of
/// its task, and the budget would otherwise turn all but the first 128
/// into `Pending` (the frame then simply goes through the queue; nothing
/// waits on this waker: a `Pending` here always hands the frame to the
/// connection's task, whose own poll registers its real waker).
fn poll_now<T>(f: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
    let attempt = std::pin::pin!(tokio::task::coop::unconstrained(std::future::poll_fn(f)));
    attempt.poll(&mut Context::from_waker(Waker::noop()))
}

/// The most frames one direct write takes (pgdn-core sends at most 8).
const MOST_FRAMES: usize = 8;

impl<IO: AsyncWrite + Unpin + Send + 'static> DirectWrite for Locked<IO> {
    fn try_write(&self, frames: &[&[u8]]) -> Direct {
        if frames.is_empty() || frames.len() > MOST_FRAMES {
            return Direct::Busy;
        }
        let mut state = self.lock();
        if !state.pending.is_empty() || state.unflushed {
            return Direct::Busy;
        }
        let mut headers = [([0u8; 10], 0usize); MOST_FRAMES];
        let mut bufs: [&[u8]; 2 * MOST_FRAMES] = [&[]; 2 * MOST_FRAMES];
        for (i, frame) in frames.iter().enumerate() {
            headers[i] = text_header(frame.len());
        }
        for (i, frame) in frames.iter().enumerate() {
            let (h, n) = &headers[i];
            bufs[2 * i] = &h[..*n];
            bufs[2 * i + 1] = frame;
        }
        let bufs = &bufs[..2 * frames.len()];
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let st = &mut *state;
        let written = poll_now(|cx| {
            if st.io.is_write_vectored() {
                let mut slices = [io::IoSlice::new(&[]); 2 * MOST_FRAMES];
                for (slice, b) in slices.iter_mut().zip(bufs) {
                    *slice = io::IoSlice::new(b);
                }
                Pin::new(&mut st.io).poll_write_vectored(cx, &slices[..bufs.len()])
            } else {
                // One contiguous write rather than a header on its own.
                let whole = bufs.concat();
                Pin::new(&mut st.io).poll_write(cx, &whole)
            }
        });
        match written {
            // Nothing written: the frames go through the queue, and an
            // error shows on the task's own next write.
            Poll::Pending | Poll::Ready(Err(_)) | Poll::Ready(Ok(0)) => Direct::Busy,
            Poll::Ready(Ok(w)) if w < total => {
                st.keep_rest(bufs, w);
                Direct::Buffered
            }
            Poll::Ready(Ok(_)) => match poll_now(|cx| Pin::new(&mut st.io).poll_flush(cx)) {
                Poll::Ready(_) => Direct::Written,
                Poll::Pending => {
                    st.unflushed = true;
                    Direct::Buffered
                }
            },
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SharedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.lock().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SharedIo<IO> {
    /// Takes all of `buf` (whole frames, from tungstenite) once what is
    /// pending is written: what the socket does not take now is kept and
    /// written before anything else.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.lock();
        std::task::ready!(state.poll_drain(cx))?;
        match Pin::new(&mut state.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) if n < buf.len() => {
                state.keep_rest(&[buf], n);
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        std::task::ready!(state.poll_drain(cx))?;
        std::task::ready!(Pin::new(&mut state.io).poll_flush(cx))?;
        state.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        std::task::ready!(state.poll_drain(cx))?;
        Pin::new(&mut state.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn headers_follow_rfc_6455() {
        assert_eq!(text_header(5).0[..2], [0x81, 5]);
        assert_eq!(text_header(125).0[..2], [0x81, 125]);
        assert_eq!(text_header(126).0[..4], [0x81, 126, 0, 126]);
        assert_eq!(text_header(65535).0[..4], [0x81, 126, 0xff, 0xff]);
        let (h, n) = text_header(65536);
        assert_eq!(n, 10);
        assert_eq!(h[..10], [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    /// A socket that takes `room` bytes, then would block.
    #[tokio::test]
    async fn a_full_socket_keeps_whole_frames_in_order() {
        let (near, mut far) = tokio::io::duplex(8);
        let shared = SharedIo::new(near);
        // 12 bytes: the duplex takes 8, the rest waits.
        let direct = shared.direct();
        assert_eq!(direct.try_write(&[b"01234", b"789"]), Direct::Buffered);
        // Something is pending: nothing more is written directly.
        assert_eq!(direct.try_write(&[b"x"]), Direct::Busy);
        // The task's write goes after what is pending, whole.
        let mut task = shared.clone();
        let writer = tokio::spawn(async move {
            task.write_all(&[0x81, 1, b'y']).await.unwrap();
            task.flush().await.unwrap();
        });
        let mut got = vec![0u8; 15];
        // 2 + 5 + 2 + 3 + 3 bytes.
        far.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, b"\x81\x0501234\x81\x03789\x81\x01y");
        assert!(shared.lock().pending.capacity() == 0, "freed once written");
        assert_eq!(direct.try_write(&[b"z"]), Direct::Written);
        let mut got = vec![0u8; 3];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"\x81\x01z");
    }
}
