//! `--load` part 6, **connections**: new authenticated WebSocket
//! connections per second, on a pgdn-server of its own with nothing else
//! connected.
//!
//! `--load-connections` connections in all (default 15,000), each with its
//! own HS256 JWT (users `k<i>`, every token minted before anything is
//! timed), opened in sets of at most [`SET`] so that the bench and the
//! server stay far below the machine's 20,000 open files per process.
//! Within a set `--load-conns` tasks (default 64) each open one connection
//! after the other as fast as they can: TCP connect, the upgrade request
//! with `?token=`, then the wait for the `{"type":"connection",...}`
//! frame, which is when a connection counts. The connections of a set stay
//! open until the whole set is in (the server holds a growing number of
//! them, as in a reconnect storm); then they are closed (untimed) and the
//! bench waits until the server's `/api/v1/stats` says
//! `total_connections: 0` before the next set. Connections/s is every
//! connection over the sum of the sets' times (first connect to last
//! `connection` frame); each connection's own time is also reported.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::super::client::Histogram;
use super::super::procs;
use super::super::{Credentials, Options, pgdn_bin, start_pgdn};
use super::LoadOptions;
use super::http::{self, HttpConn};

/// Connections opened in one set, at most.
pub(crate) const SET: usize = 3000;

/// The `Sec-WebSocket-Key` of every new connection (RFC 6455's example:
/// the server only needs a valid one).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A new WebSocket connection opened by [`connect_hello`]: only its
/// socket, as nothing more is read from it.
///
/// The handshake is written and read by hand, like the requests of
/// `http.rs`: tokio-tungstenite's client costs the bench about as much CPU
/// per connection as the server spends, and the two share the cores.
pub(crate) struct NewConnection {
    stream: TcpStream,
}

impl NewConnection {
    /// Sends a close frame (code 1000) and closes the socket.
    pub(crate) async fn close(mut self) {
        // A client's frames are masked; any key will do.
        const MASK: [u8; 4] = [0x5a, 0xc3, 0x3c, 0xa5];
        let code = 1000u16.to_be_bytes();
        let frame = [
            0x88,
            0x82,
            MASK[0],
            MASK[1],
            MASK[2],
            MASK[3],
            code[0] ^ MASK[0],
            code[1] ^ MASK[1],
        ];
        let _ = self.stream.write_all(&frame).await;
        let _ = self.stream.shutdown().await;
    }
}

/// Opens a WebSocket connection to `target` (e.g. `/ws?token=...`) on the
/// server at `addr` and returns it once its first frame, which must be the
/// `{"type":"connection",...}` frame, arrived (at most 10 s).
pub(crate) async fn connect_hello(addr: &str, target: &str) -> Result<NewConnection, String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("writing the upgrade request: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            read_more(&mut stream, &mut buf).await?;
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            let line = buf.split(|&b| b == b'\r').next().unwrap_or(&[]);
            return Err(format!(
                "upgrade refused: {}",
                String::from_utf8_lossy(line)
            ));
        }
        loop {
            match first_frame(&buf[head..]) {
                Some(Ok(text)) if text.windows(19).any(|w| w == b"\"type\":\"connection\"") => {
                    return Ok(NewConnection { stream });
                }
                Some(Ok(text)) => {
                    return Err(format!(
                        "expected the connection frame, got {}",
                        String::from_utf8_lossy(text)
                    ));
                }
                Some(Err(e)) => return Err(e),
                None => read_more(&mut stream, &mut buf).await?,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no connection frame within 10 s".to_string())?
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    buf.reserve(1024);
    match stream.read_buf(buf).await {
        Ok(0) => Err("the server closed the connection".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("reading: {e}")),
    }
}

/// The payload of the complete text frame at the start of `b`; None when
/// more bytes are needed.
fn first_frame(b: &[u8]) -> Option<Result<&[u8], String>> {
    if b.len() < 2 {
        return None;
    }
    let (fin, opcode, masked) = (b[0] & 0x80 != 0, b[0] & 0x0f, b[1] & 0x80 != 0);
    let (len, at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
        127 if b.len() >= 10 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(len) as usize, 10)
        }
        126 | 127 => return None,
        len => (usize::from(len), 2),
    };
    if masked || !fin || opcode != 1 {
        return Some(Err(format!(
            "the first frame is not one unmasked text frame (opcode {opcode}, fin {fin}, masked {masked})"
        )));
    }
    (b.len() >= at + len).then(|| Ok(&b[at..at + len]))
}

/// What part 6 measured in one round.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    /// Which round of `--rounds` (from 0).
    pub(crate) round: usize,
    /// Connections made (each got its `connection` frame).
    pub(crate) connections: u64,
    /// The sum of the sets' times.
    pub(crate) secs: f64,
    /// Connections/s of each set.
    pub(crate) set_rates: Vec<f64>,
    /// One connection's time (connect to `connection` frame), p50,
    /// nanoseconds.
    pub(crate) p50_ns: u64,
    /// The same, p99.
    pub(crate) p99_ns: u64,
    /// The server's CPU time over the sets, in clock ticks.
    pub(crate) server_ticks: u64,
    /// The bench's own CPU time over the sets, in clock ticks.
    pub(crate) bench_ticks: u64,
    /// What went wrong, if anything.
    pub(crate) errors: Vec<String>,
}

impl Round {
    /// Connections per second.
    pub(crate) fn per_sec(&self) -> f64 {
        self.connections as f64 / self.secs.max(1e-9)
    }
}

/// Starts a pgdn-server, opens `--load-connections` connections in sets,
/// and stops the server.
pub(crate) fn run_round(
    round: usize,
    opts: &Options,
    load: &LoadOptions,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Round {
    let mut out = Round {
        round,
        connections: 0,
        secs: 0.0,
        set_rates: Vec::new(),
        p50_ns: 0,
        p99_ns: 0,
        server_ticks: 0,
        bench_ticks: 0,
        errors: Vec::new(),
    };
    let creds = Credentials::new();
    let max = (SET + 1000).to_string();
    match start_pgdn(
        &pgdn_bin(opts, bin_dir),
        "pgdn-server",
        &creds,
        &["--max-connections", &max],
    ) {
        Ok((process, addr)) => {
            let result = runtime.block_on(measure(&mut out, &addr, &creds, process.pid(), load));
            if let Err(e) = result {
                out.errors.push(e);
            }
            eprintln!("xtask bench: {}", process.stop(Duration::from_secs(20)));
        }
        Err(e) => out.errors.push(e),
    }
    for e in &out.errors {
        eprintln!("  problem: {e}");
    }
    out
}

async fn measure(
    out: &mut Round,
    addr: &str,
    creds: &Credentials,
    pid: u32,
    load: &LoadOptions,
) -> Result<(), String> {
    let urls: Arc<Vec<String>> = Arc::new(
        (0..load.connections)
            .map(|i| {
                let token = creds.token(&format!("k{i}"), &["bench"])?;
                Ok(format!("/ws?token={token}"))
            })
            .collect::<Result<_, String>>()?,
    );
    let mut stats = HttpConn::connect(addr, &creds.key).await?;
    let times = Arc::new(Histogram::new());
    let mut from = 0;
    while from < urls.len() {
        let to = (from + SET).min(urls.len());
        let server_before = procs::cpu_ticks(pid)?;
        let bench_before = procs::own_cpu_ticks();
        let started = Instant::now();
        let next = Arc::new(AtomicUsize::new(from));
        let mut tasks = JoinSet::new();
        for _ in 0..load.conns {
            let (urls, next, times) = (urls.clone(), next.clone(), times.clone());
            let addr = addr.to_string();
            tasks.spawn(async move {
                let mut held = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= to {
                        return Ok::<_, String>(held);
                    }
                    let t = Instant::now();
                    held.push(connect_hello(&addr, &urls[i]).await?);
                    times.record(t.elapsed().as_nanos() as u64);
                }
            });
        }
        let mut held = Vec::with_capacity(to - from);
        let mut failure = None;
        while let Some(done) = tasks.join_next().await {
            match done.map_err(|e| format!("connect task: {e}"))? {
                Ok(mut h) => held.append(&mut h),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        let secs = started.elapsed().as_secs_f64();
        out.server_ticks += procs::cpu_ticks(pid)?.saturating_sub(server_before);
        out.bench_ticks += procs::own_cpu_ticks().saturating_sub(bench_before);
        let made = held.len();
        eprintln!(
            "  connections {from}..{to}: {made} in {secs:.2} s = {:.0}/s",
            made as f64 / secs
        );
        // Close them, untimed, and wait until the server has let go.
        futures_util::stream::iter(held)
            .for_each_concurrent(256, |ws| async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.close()).await;
            })
            .await;
        if let Some(e) = failure {
            return Err(format!("a connection failed after {made} of the set: {e}"));
        }
        out.connections += made as u64;
        out.secs += secs;
        out.set_rates.push(made as f64 / secs);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = stats.get("/api/v1/stats").await?;
            match http::number_after(answer, b"\"total_connections\":") {
                Some(0) => break,
                left if Instant::now() > deadline => {
                    return Err(format!(
                        "the server still counts {left:?} connections 20 s after they closed"
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        from = to;
    }
    out.p50_ns = times.quantile(0.5);
    out.p99_ns = times.quantile(0.99);
    eprintln!(
        "  connections: {} in {:.2} s = {:.0}/s; each p50 {:.2} ms, p99 {:.2} ms",
        out.connections,
        out.secs,
        out.per_sec(),
        out.p50_ns as f64 / 1e6,
        out.p99_ns as f64 / 1e6
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_frame() {
        let hello = br#"{"type":"connection"}"#;
        let mut frame = vec![0x81, hello.len() as u8];
        frame.extend_from_slice(hello);
        assert_eq!(first_frame(&frame), Some(Ok(&hello[..])));
        assert_eq!(first_frame(&frame[..frame.len() - 1]), None);
        assert_eq!(first_frame(&frame[..1]), None);
        let long = vec![b'x'; 300];
        let mut frame = vec![0x81, 126, 1, 44];
        frame.extend_from_slice(&long);
        assert_eq!(first_frame(&frame), Some(Ok(&long[..])));
        assert_eq!(first_frame(&frame[..3]), None);
        assert!(matches!(first_frame(&[0x82, 0]), Some(Err(_))));
        assert!(matches!(first_frame(&[0x01, 0]), Some(Err(_))));
    }
}
