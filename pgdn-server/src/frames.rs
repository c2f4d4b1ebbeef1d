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

/// The connection, counting the client's frames as they are read.
pub(crate) struct FrameCounter<IO> {
    io: IO,
    scan: Scan,
    limiter: RateLimiter,
    flooded: bool,
}

impl<IO> FrameCounter<IO> {
    /// Wraps `io`, allowing `rate` frames per second in bursts of `burst`.
    pub(crate) fn new(io: IO, rate: f64, burst: f64) -> Self {
        FrameCounter {
            io,
            scan: Scan::Header {
                buf: [0; 14],
                have: 0,
            },
            limiter: RateLimiter::new(rate, burst),
            flooded: false,
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
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !this.follow(&buf.filled()[before..]) {
                    this.flooded = true;
                    // Hand nothing of this read to tungstenite.
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::other(FrameFlood)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
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
            let mut ok = FrameCounter::new((), 0.001, 6.0);
            assert!(bytes.chunks(chunk).all(|c| ok.follow(c)), "chunk {chunk}");
            let mut over = FrameCounter::new((), 0.001, 5.0);
            assert!(
                !bytes.chunks(chunk).all(|c| over.follow(c)),
                "chunk {chunk}"
            );
        }
    }
}
