//! Counting every inbound WebSocket frame toward the rate limit
//! (docs/protocol.md v1.1 section 3: text, binary, Ping, Pong and each
//! fragment).
//!
//! tungstenite reassembles fragments and answers nothing for a stream of
//! empty continuation frames, so the frames a client sends are only
//! visible on the bytes. [`FrameCounter`] wraps the upgraded connection
//! and follows the client's frame headers as tungstenite reads them (a
//! few comparisons per frame; payload bytes are skipped, not inspected).
//! When the client goes over its limit, the read fails with
//! [`FrameFlood`], which the transport reports as
//! [`Inbound::RateLimited`](pgdn_core::Inbound): close 1008. Hand-written
//! because no crate offers frame-level hooks under tungstenite.
//!
//! It also reads ahead for tungstenite, so that an idle connection holds
//! no read buffer. tungstenite allocates its read buffer when the socket
//! is made and keeps it for the connection's life: at 4 KiB, half of what
//! an idle connection costs. pgdn gives tungstenite a tiny one
//! ([`TUNGSTENITE_READ_BUFFER`]) and reads the socket here, in chunks of
//! the configured read buffer size, into a buffer that exists only while
//! a read is under way: allocated when the socket has something to read,
//! freed as soon as tungstenite has taken every byte (or the socket had
//! nothing). Reads cost one socket read per chunk as before, plus an
//! allocation per burst of inbound data.

use bytes::{Buf, BytesMut};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use pgdn_core::protocol::RateLimiter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The read error of a client over its inbound frame rate.
#[derive(Debug, thiserror::Error)]
#[error("inbound frame rate limit exceeded")]
pub(crate) struct FrameFlood;

/// Where the scanner is in the client's byte stream.
#[derive(Debug)]
enum Scan {
    /// Reading a frame header: the bytes so far.
    Header { buf: [u8; 14], have: usize },
    /// Skipping this many payload bytes.
    Payload(u64),
}

/// tungstenite's own read buffer: it reads through [`FrameCounter`]'s
/// read-ahead, so a small one costs copies, not socket reads. It holds a
/// frame header and small frames; larger frames grow it while they are
/// read.
pub(crate) const TUNGSTENITE_READ_BUFFER: usize = 128;

/// The connection, counting the client's frames as they are read.
pub(crate) struct FrameCounter<IO> {
    io: IO,
    scan: Scan,
    limiter: RateLimiter,
    flooded: bool,
    /// Bytes read from the socket that tungstenite has not taken yet;
    /// unallocated while empty.
    ahead: BytesMut,
    /// How much one socket read asks for.
    chunk: usize,
}

impl<IO> FrameCounter<IO> {
    /// The connection under the counter.
    pub(crate) fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Wraps `io`, allowing `rate` frames per second in bursts of `burst`,
    /// reading the socket `chunk` bytes at a time.
    pub(crate) fn new(io: IO, rate: f64, burst: f64, chunk: usize) -> Self {
        FrameCounter {
            io,
            scan: Scan::Header {
                buf: [0; 14],
                have: 0,
            },
            limiter: RateLimiter::new(rate, burst),
            flooded: false,
            ahead: BytesMut::new(),
            chunk: chunk.max(1),
        }
    }

    /// Moves read-ahead bytes into `buf`; frees the read-ahead once empty.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ahead.len().min(buf.remaining());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            self.ahead = BytesMut::new();
        }
    }

    /// Follows `bytes` (just read); false once the client is over its limit.
    fn follow(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match &mut self.scan {
                Scan::Payload(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.scan = Scan::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                    }
                }
                Scan::Header { buf, have } => {
                    buf[*have] = bytes[0];
                    *have += 1;
                    bytes = &bytes[1..];
                    if *have < 2 {
                        continue;
                    }
                    let masked = buf[1] & 0x80 != 0;
                    let ext = match buf[1] & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    let need = 2 + ext + if masked { 4 } else { 0 };
                    if *have < need {
                        continue;
                    }
                    let len = match ext {
                        0 => u64::from(buf[1] & 0x7f),
                        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
                        _ => u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
                    };
                    // A whole frame header: one frame, whatever its kind.
                    if !self.limiter.allow() {
                        return false;
                    }
                    self.scan = if len == 0 {
                        Scan::Header {
                            buf: [0; 14],
                            have: 0,
                        }
                    } else {
                        Scan::Payload(len)
                    };
                }
            }
        }
        true
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FrameCounter<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.flooded {
            return Poll::Ready(Err(io::Error::other(FrameFlood)));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        if this.ahead.is_empty() {
            if buf.remaining() >= this.chunk {
                // Room for a whole chunk: read straight into it.
                match Pin::new(&mut this.io).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {}
                    other => return other,
                }
            } else {
                let mut ahead = BytesMut::with_capacity(this.chunk);
                match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut ahead) {
                    // Nothing to read: the buffer goes (that is the point).
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(_)) => {
                        this.ahead = ahead;
                        this.hand_over(buf);
                    }
                }
            }
        } else {
            this.hand_over(buf);
        }
        if !this.follow(&buf.filled()[before..]) {
            this.flooded = true;
            // Hand nothing of this read to tungstenite.
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::other(FrameFlood)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FrameCounter<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn counts_every_frame_across_any_split() {
        let mut bytes = Vec::new();
        bytes.extend(frame(0x1, false, b"he"));
        bytes.extend(frame(0x0, false, b""));
        bytes.extend(frame(0x0, true, b"llo"));
        bytes.extend(frame(0x9, true, b""));
        bytes.extend(frame(0x2, true, &[7; 300]));
        bytes.extend(frame(0x2, true, &[7; 70_000]));
        // Six frames: a burst of six passes, of five does not, whatever
        // the chunking of the reads.
        for chunk in [1, 3, 7, 4096] {
            let mut ok = FrameCounter::new((), 0.001, 6.0, 4096);
            assert!(bytes.chunks(chunk).all(|c| ok.follow(c)), "chunk {chunk}");
            let mut over = FrameCounter::new((), 0.001, 5.0, 4096);
            assert!(
                !bytes.chunks(chunk).all(|c| over.follow(c)),
                "chunk {chunk}"
            );
        }
    }

    /// Small reads get every byte, in order, through the read-ahead, and
    /// once tungstenite has taken them no buffer is left (what keeps an
    /// idle connection small); a read with room for a chunk goes straight
    /// to the socket.
    #[tokio::test]
    async fn reads_ahead_only_while_there_is_data() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sent = Vec::new();
        sent.extend(frame(0x1, true, &[b'a'; 300]));
        sent.extend(frame(0x9, true, b""));
        sent.extend(frame(0x1, true, &[b'b'; 5000]));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut counter = FrameCounter::new(server, 1000.0, 1000.0, 4096);
        let mut client = client;
        client.write_all(&sent).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 14];
        while got.len() < sent.len() {
            let n = counter.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(counter.ahead.capacity(), 0, "no buffer once all is taken");
        // A large read goes straight through.
        client.write_all(&frame(0x1, true, b"x")).await.unwrap();
        let mut large = vec![0u8; 8192];
        let n = counter.read(&mut large).await.unwrap();
        assert_eq!(&large[..n], &frame(0x1, true, b"x")[..]);
        assert_eq!(counter.ahead.capacity(), 0);
        // Nothing to read: a pending read leaves no buffer behind.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            counter.read(&mut small),
        )
        .await;
        assert!(pending.is_err());
        assert_eq!(counter.ahead.capacity(), 0);
    }
}
