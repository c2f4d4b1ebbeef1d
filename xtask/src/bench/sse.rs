//! The bench's Server-Sent Events subscribers (docs/protocol.md section 7): a
//! minimal HTTP/1.1 client on a raw `TcpStream`, so that its own cost per
//! delivery stays as small as the WebSocket client's.
//!
//! Each subscriber sends `GET /sse?token=<jwt> HTTP/1.1` with
//! `Accept: text/event-stream`, reads the response head (it must be a
//! `200`), and then scans the body for complete lines without parsing
//! HTTP's chunked framing: pgdn writes a batch of events as one chunk, so a
//! chunk-size line (`1a3\r`) or the empty line after a chunk never falls
//! inside an event's line, and it never starts with `data: ` or `id: `.
//! Every `data: <json>` line goes to the [`Recorder`] as one text frame
//! (it ignores anything that is not a bench notification, as for
//! WebSocket). A subscriber counts as connected once the connection event
//! (`{"type":"connection",...}`) has arrived; a `{"type":"close",...}`
//! event counts as a close by the server, the end of the stream without
//! one as a failure.
//!
//! As a check of the framing, every bench notification must follow its own
//! `id: <message id>` line; the events that do not are counted in
//! [`SseStats::missing_ids`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::client::Recorder;

/// Handshakes in flight at once while connecting the subscribers (as for
/// WebSocket).
const CONNECT_CONCURRENCY: usize = 64;

/// The subscribers' read buffer: the same size as the WebSocket client's.
const READ_BUFFER: usize = 16 * 1024;

/// The largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// What every SSE subscriber of one run adds up, besides the recorder.
#[derive(Debug, Default)]
pub(crate) struct SseStats {
    /// Bench notifications whose event carried no `id:` line.
    pub(crate) missing_ids: AtomicU64,
    /// `id:` lines seen.
    pub(crate) ids: AtomicU64,
}

/// What one `data:` line was.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Connection,
    Close,
    Other,
}

/// Splits a byte stream into lines, keeping an incomplete last line for the
/// next read.
#[derive(Debug)]
struct Lines {
    buf: Vec<u8>,
    /// Whether the last line was `id: ...` (reset by every other line
    /// except the `data:` line it belongs to).
    id_pending: bool,
}

impl Lines {
    fn new() -> Self {
        Lines {
            buf: Vec::with_capacity(READ_BUFFER),
            id_pending: false,
        }
    }

    /// Reads once from `stream` into the buffer; `Ok(false)` at the end of
    /// the stream.
    async fn read(&mut self, stream: &mut TcpStream) -> std::io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < READ_BUFFER / 4 {
            self.buf.reserve(READ_BUFFER);
        }
        Ok(stream.read_buf(&mut self.buf).await? > 0)
    }

    /// Hands every complete `data:` line in the buffer to `rec` (and
    /// `on_event`) and keeps the rest. Stops after a close event.
    fn scan(
        &mut self,
        rec: &Recorder,
        stats: &SseStats,
        mut on_event: impl FnMut(Event),
    ) -> Option<Event> {
        let mut start = 0;
        let mut last = None;
        while let Some(len) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.buf[start..start + len];
            start += len + 1;
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if line.starts_with(b"id: ") {
                self.id_pending = true;
                stats.ids.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(data) = line.strip_prefix(b"data: ") else {
                if !line.is_empty() {
                    // A chunk-size line or a comment: not part of an event.
                    self.id_pending = false;
                }
                continue;
            };
            let had_id = std::mem::take(&mut self.id_pending);
            let Ok(text) = std::str::from_utf8(data) else {
                continue;
            };
            let event = if text.starts_with(r#"{"type":"connection""#) {
                Event::Connection
            } else if text.starts_with(r#"{"type":"close""#) {
                Event::Close
            } else {
                if !had_id && text.contains(r#""type":"bench""#) {
                    stats.missing_ids.fetch_add(1, Ordering::Relaxed);
                }
                rec.on_text(text, 0);
                Event::Other
            };
            let close = event == Event::Close;
            on_event(event);
            if close {
                last = Some(Event::Close);
                break;
            }
        }
        self.buf.drain(..start);
        last
    }
}

/// Sends the request and reads the response head; returns the stream and
/// whatever of the body came with the head.
async fn request(addr: &str, target: &str) -> Result<(TcpStream, Lines), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut lines = Lines::new();
    let head_end = loop {
        if let Some(i) = lines.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if lines.buf.len() > MAX_HEAD {
            return Err("response head too large".into());
        }
        if !lines
            .read(&mut stream)
            .await
            .map_err(|e| format!("reading the response: {e}"))?
        {
            return Err("connection closed before the response head".into());
        }
    };
    let head = String::from_utf8_lossy(&lines.buf[..head_end]).into_owned();
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("expected 200, got `{status}`"));
    }
    if !head
        .to_ascii_lowercase()
        .contains("content-type: text/event-stream")
    {
        return Err(format!("not an event stream: {head:?}"));
    }
    lines.buf.drain(..head_end);
    Ok((stream, lines))
}

/// One subscriber, connected: its connection event has arrived.
struct Connected {
    stream: TcpStream,
    lines: Lines,
}

async fn connect_one(
    addr: &str,
    target: &str,
    rec: &Recorder,
    stats: &SseStats,
) -> Result<Connected, String> {
    let mut last_error = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        let attempt = async {
            let (mut stream, mut lines) = request(addr, target).await?;
            loop {
                let mut hello = false;
                let end = lines.scan(rec, stats, |e| hello |= e == Event::Connection);
                if end == Some(Event::Close) {
                    return Err("the server closed the stream".to_string());
                }
                if hello {
                    return Ok(Connected { stream, lines });
                }
                if !lines
                    .read(&mut stream)
                    .await
                    .map_err(|e| format!("reading the stream: {e}"))?
                {
                    return Err("the stream ended before the connection event".into());
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(20), attempt).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "handshake timed out".into(),
        }
    }
    Err(last_error)
}

/// Reads one subscriber's events until the stream ends.
async fn subscriber(mut c: Connected, rec: Arc<Recorder>, stats: Arc<SseStats>) {
    loop {
        if c.lines.scan(&rec, &stats, |_| {}) == Some(Event::Close) {
            rec.on_closed();
            return;
        }
        match c.lines.read(&mut c.stream).await {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
    }
    rec.on_failed();
}

/// Connects one SSE subscriber per request target (`/sse?token=...`) to
/// the server at `addr` (a few at a time) and starts a task reading each
/// into `rec`.
pub(crate) async fn connect_all(
    addr: &str,
    targets: Vec<String>,
    rec: &Arc<Recorder>,
    stats: &Arc<SseStats>,
    tasks: &mut JoinSet<()>,
) -> Result<(), String> {
    let mut pending = futures_util::stream::iter(targets)
        .map(|target| async move { connect_one(addr, &target, rec, stats).await })
        .buffer_unordered(CONNECT_CONCURRENCY);
    while let Some(connected) = pending.next().await {
        tasks.spawn(subscriber(connected?, rec.clone(), stats.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(events: &str) -> String {
        format!("{:x}\r\n{events}\r\n", events.len())
    }

    #[test]
    fn finds_events_across_reads_and_chunks() {
        let rec = Recorder::new();
        let stats = SseStats::default();
        let hello = r#"data: {"type":"connection","status":"connected","user_id":"u1"}"#;
        let note = |p: u32, id: &str| {
            format!(
                "id: {id}\ndata: {{\"id\":\"{id}\",\"type\":\"bench\",\"payload\":{{\"p\":{p},\"pad\":\"x\",\"t\":0}}}}\n\n"
            )
        };
        let body = chunk(&format!("{hello}\n\n"))
            + &chunk(&(note(2, "m-1") + &note(2, "m-2")))
            + &chunk(": keepalive\n\n")
            + &chunk(&note(3, "m-3"));
        let mut lines = Lines::new();
        let mut events = Vec::new();
        // Fed in pieces of 7 bytes: lines and chunks split anywhere.
        for piece in body.as_bytes().chunks(7) {
            lines.buf.extend_from_slice(piece);
            assert_eq!(lines.scan(&rec, &stats, |e| events.push(e)), None);
        }
        assert_eq!(events[0], Event::Connection);
        assert_eq!(events.len(), 4);
        assert_eq!(rec.count(2), 2);
        assert_eq!(rec.count(3), 1);
        assert_eq!(stats.ids.load(Ordering::Relaxed), 3);
        assert_eq!(stats.missing_ids.load(Ordering::Relaxed), 0);
        assert!(lines.buf.is_empty());

        lines
            .buf
            .extend_from_slice(br#"data: {"id":"m-4","type":"bench","payload":{"p":2,"t":0}}"#);
        lines.buf.extend_from_slice(b"\n\n");
        lines
            .buf
            .extend_from_slice(b"data: {\"type\":\"close\",\"code\":1001,\"reason\":\"x\"}\n\n");
        assert_eq!(lines.scan(&rec, &stats, |_| {}), Some(Event::Close));
        assert_eq!(rec.count(2), 3);
        assert_eq!(stats.missing_ids.load(Ordering::Relaxed), 1);
    }
}
