//! No anonymous resource pinning: the five slowloris variants (a silent
//! socket, trickled headers, a half-sent upgrade, a slow body, an idle
//! kept-alive connection) are closed within their timeouts, while
//! WebSockets and Server-Sent Events streams outlive them; shutdown
//! returns within `shutdown_timeout` whatever is open, in process and as
//! the binary on SIGTERM; the binary survives running out of file
//! descriptors and serves again once they are free.
//!
//! Waits are on events (a close, a log line, a reply), each bounded; the
//! only sleeps are the trickle's pace and letting the timeouts pass where
//! the point is that nothing closes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{KEY, WAIT, Warp, expect_close};
use futures_util::StreamExt;
use pgdn_server::{Config, JwtAuthenticator};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type TestServer = common::TestServer<Warp>;
type AxumServer = common::TestServer<common::Axum>;

const HEADER: Duration = Duration::from_secs(2);
/// Longer than `HEADER`, so that the idle test tells them apart.
const KEEP_ALIVE: Duration = Duration::from_secs(3);
const BODY: Duration = Duration::from_secs(2);
/// What a close may take beyond its timeout on a loaded machine.
const SLACK: Duration = Duration::from_secs(3);

fn short_timeouts() -> Config {
    let mut c = Config::default();
    c.header_read_timeout = HEADER;
    c.keep_alive_timeout = KEEP_ALIVE;
    c.body_timeout = BODY;
    c
}

/// Reads until the server closes the connection (end of stream or reset)
/// and returns what it sent; panics if it is still open after `within`.
async fn read_until_closed(sock: &mut TcpStream, within: Duration) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => panic!(
                "still open after {within:?}; received {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0) | Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Asserts that `elapsed` is at least (about) `timeout`: the close came
/// from that timeout, not an earlier one.
fn assert_not_before(elapsed: Duration, timeout: Duration, what: &str) {
    assert!(
        elapsed >= timeout.mul_f64(0.9),
        "{what} closed after {elapsed:?}, before its {timeout:?} timeout"
    );
}

async fn connect(addr: impl tokio::net::ToSocketAddrs) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Reads one response whose body has a Content-Length, leaving the
/// connection open; returns the head and the body.
async fn read_response(sock: &mut TcpStream) -> (String, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .expect("a Content-Length");
            if data.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + len]).to_string();
                return (head, body);
            }
        }
        let n = tokio::time::timeout(WAIT, sock.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed mid-response: {data:?}");
        data.extend_from_slice(&buf[..n]);
    }
}

/// `POST /api/v1/publish` declaring 100 bytes of body, of which it sends 10.
fn slow_publish_head(host: &str, key: &str) -> String {
    format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"target\":"
    )
}

/// A WebSocket upgrade request without its final empty line.
fn half_upgrade(host: &str) -> String {
    format!(
        "GET /ws?token=t HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n"
    )
}

#[tokio::test]
async fn a_silent_socket_is_closed_at_the_header_read_timeout() {
    let server = TestServer::start_with(short_timeouts()).await;
    let mut sock = connect(server.addr).await;
    let start = Instant::now();
    let got = read_until_closed(&mut sock, HEADER + SLACK).await;
    assert_not_before(start.elapsed(), HEADER, "a silent socket");
    assert!(got.is_empty(), "{got:?}");
    server.stop().await;
}

#[tokio::test]
async fn trickled_headers_are_closed_at_the_header_read_timeout() {
    let server = TestServer::start_with(short_timeouts()).await;
    let sock = connect(server.addr).await;
    let (mut rd, mut wr) = sock.into_split();
    let start = Instant::now();
    // One byte a second, never finishing the head: arriving bytes do not
    // extend the timeout.
    let trickle = tokio::spawn(async move {
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(HEADER + SLACK, rd.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_not_before(start.elapsed(), HEADER, "trickled headers");
    trickle.abort();
    server.stop().await;
}

#[tokio::test]
async fn a_half_sent_upgrade_is_closed_at_the_header_read_timeout() {
    let server = TestServer::start_with(short_timeouts()).await;
    let mut sock = connect(server.addr).await;
    let start = Instant::now();
    sock.write_all(half_upgrade(&server.addr.to_string()).as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut sock, HEADER + SLACK).await;
    assert_not_before(start.elapsed(), HEADER, "a half-sent upgrade");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    server.stop().await;
}

#[tokio::test]
async fn a_slow_publish_body_gets_408_at_the_body_timeout_and_is_closed() {
    let server = TestServer::start_with(short_timeouts()).await;
    let mut sock = connect(server.addr).await;
    let start = Instant::now();
    sock.write_all(slow_publish_head(&server.addr.to_string(), KEY).as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut sock, BODY + SLACK).await;
    assert_not_before(start.elapsed(), BODY, "a slow body");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("body not received within 2s"), "{got}");
    // Nothing was published.
    let stats = server.stats().await;
    assert_eq!(stats["messages_published"], 0, "{stats}");
    server.stop().await;
}

#[tokio::test]
async fn a_slow_body_refused_with_401_is_closed() {
    let server = TestServer::start_with(short_timeouts()).await;
    let mut sock = connect(server.addr).await;
    sock.write_all(slow_publish_head(&server.addr.to_string(), "wrong-key").as_bytes())
        .await
        .unwrap();
    // 401 at once (the body is never read), then the connection is closed
    // once the rest of the body is overdue.
    let (head, _) = read_response(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    read_until_closed(&mut sock, BODY + SLACK).await;
    server.stop().await;
}

/// An app's own routes beside pgdn's, served by `serve_routes`: `POST
/// /echo` answers with the peer address and the body's length.
async fn start_app(config: Config) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    use warp::Filter;
    let pgdn = common::build(config);
    let echo = warp::path!("echo")
        .and(warp::post())
        .and(pgdn_server::remote_addr())
        .and(warp::body::bytes())
        .map(|peer: Option<std::net::SocketAddr>, body: bytes::Bytes| {
            format!(
                "{} {}",
                peer.map(|p| p.to_string()).unwrap_or_default(),
                body.len()
            )
        });
    let routes = echo.or(pgdn.routes());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        pgdn.serve_routes(routes, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    (addr, tx)
}

#[tokio::test]
async fn app_routes_get_the_peer_address_and_their_slow_bodies_are_closed() {
    let (addr, _stop) = start_app(short_timeouts()).await;
    let mut sock = connect(addr).await;
    let me = sock.local_addr().unwrap();
    sock.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, body) = read_response(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, format!("{me} 5"));

    // No API timeout here: the connection's own body deadline (the body
    // timeout and a grace second) drops it.
    let mut slow = connect(addr).await;
    let start = Instant::now();
    slow.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let got = read_until_closed(&mut slow, BODY + SLACK).await;
    assert_not_before(start.elapsed(), BODY, "a slow body");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn the_axum_adapter_answers_a_slow_publish_body_with_408_too() {
    let server = AxumServer::start_with(short_timeouts()).await;
    let mut sock = connect(server.addr).await;
    let start = Instant::now();
    sock.write_all(slow_publish_head(&server.addr.to_string(), KEY).as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut sock, BODY + SLACK).await;
    assert_not_before(start.elapsed(), BODY, "a slow body");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    server.stop().await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_at_the_keep_alive_timeout() {
    let server = TestServer::start_with(short_timeouts()).await;
    let mut sock = connect(server.addr).await;
    // Two requests on the connection, then silence.
    for _ in 0..2 {
        sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut sock).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "ok");
    }
    let idle = Instant::now();
    let got = read_until_closed(&mut sock, KEEP_ALIVE + SLACK).await;
    assert!(got.is_empty(), "{got:?}");
    // The keep-alive timeout, not the (shorter) header timeout.
    assert_not_before(idle.elapsed(), KEEP_ALIVE, "an idle connection");
    server.stop().await;
}

#[tokio::test]
async fn websockets_and_event_streams_outlive_the_http_timeouts() {
    let server = TestServer::start_with(short_timeouts()).await;
    let mut ws = server.connect("u1", &[]).await;
    let res = server
        .http
        .get(server.url(&format!("/sse?token={}", server.token("u1", &[]))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut sse = res.bytes_stream();
    let first = tokio::time::timeout(WAIT, sse.next()).await.unwrap();
    assert!(first.is_some());
    server.wait_connections(2).await;
    // Past every HTTP timeout: the point is that nothing closes.
    tokio::time::sleep(KEEP_ALIVE + Duration::from_secs(1)).await;
    server
        .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":1}}))
        .await;
    assert_eq!(ws.next().await["payload"]["n"], 1);
    let mut text = String::new();
    while !text.contains("\"n\":1") {
        let chunk = tokio::time::timeout(WAIT, sse.next())
            .await
            .expect("the event in time")
            .expect("stream open")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    server.stop().await;
}

/// `Pgdn::serve` answers a plain-TCP SSE request itself, without hyper
/// (what keeps an idle stream small): the same head and events, chunked;
/// a refused token gets its 401 with a length; an oversized head gets 431;
/// a silent client is still cut at the header-read timeout; and the
/// connection closes once the stream ends.
#[tokio::test]
async fn sse_is_served_without_hyper_with_the_same_answers() {
    let server = TestServer::start_with(short_timeouts()).await;
    let token = server.token("u1", &[]);
    let mut sock = connect(server.addr).await;
    sock.write_all(
        format!("GET /sse?token={token} HTTP/1.1\r\nHost: x\r\nOrigin: http://x\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"type\":\"connection\"") {
        let n = tokio::time::timeout(WAIT, sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text}");
    assert!(
        text.contains("content-type: text/event-stream\r\n"),
        "{text}"
    );
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    // A chunk: its size in hex, then `data: {...}`.
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let (size, rest) = body.split_once("\r\n").unwrap();
    assert_eq!(
        usize::from_str_radix(size, 16).unwrap(),
        rest.find("\r\n").unwrap()
    );
    assert!(rest.starts_with("data: {"), "{rest}");
    server.wait_connections(1).await;

    let mut bad = connect(server.addr).await;
    bad.write_all(b"GET /sse?token=nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut bad).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(body.contains("error"), "{body}");

    let mut huge = connect(server.addr).await;
    let filler = "a".repeat(20 * 1024);
    huge.write_all(format!("GET /sse HTTP/1.1\r\nX-Big: {filler}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut huge).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    let mut silent = connect(server.addr).await;
    silent.write_all(b"GET /sse?tok").await.unwrap();
    let start = Instant::now();
    read_until_closed(&mut silent, HEADER + SLACK).await;
    assert_not_before(
        start.elapsed(),
        HEADER - Duration::from_millis(500),
        "a half-sent SSE request",
    );

    // Shutdown ends the stream: a close event, the last chunk, then EOF.
    let stopping = tokio::spawn(server.stop());
    let rest = read_until_closed(&mut sock, Duration::from_secs(5)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\"type\":\"close\""), "{rest}");
    assert!(rest.ends_with("0\r\n\r\n"), "{rest}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn serve_returns_within_the_shutdown_timeout_whatever_is_open() {
    let mut config = Config::default();
    config.shutdown_timeout = Duration::from_secs(2);
    // Nothing closes by itself meanwhile.
    config.header_read_timeout = Duration::from_secs(60);
    config.keep_alive_timeout = Duration::from_secs(60);
    config.body_timeout = Duration::from_secs(60);
    let server = TestServer::start_with(config).await;
    let host = server.addr.to_string();
    let mut silent = connect(server.addr).await;
    let mut half = connect(server.addr).await;
    half.write_all(half_upgrade(&host).as_bytes())
        .await
        .unwrap();
    let mut slow = connect(server.addr).await;
    slow.write_all(slow_publish_head(&host, KEY).as_bytes())
        .await
        .unwrap();
    let mut idle = connect(server.addr).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut idle).await;
    let mut ws = server.connect("u1", &[]).await;

    let start = Instant::now();
    let stopping = tokio::spawn(server.stop());
    // Connections without a request in flight close at once.
    for sock in [&mut silent, &mut half, &mut idle] {
        read_until_closed(sock, Duration::from_secs(1)).await;
    }
    assert_eq!(
        ws.expect_close().await,
        (1001, "server shutting down".to_string())
    );
    // The stalled request is dropped at the shutdown timeout.
    read_until_closed(&mut slow, Duration::from_secs(2) + SLACK).await;
    tokio::time::timeout(Duration::from_secs(2) + SLACK, stopping)
        .await
        .expect("serve returns in time")
        .unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2) + SLACK,
        "shutdown took {took:?}"
    );
}

// ---- the binary ----

const BIN: &str = env!("CARGO_BIN_EXE_pgdn-server");
const BIN_SECRET: &str = "http-hygiene-test-jwt-secret-32-bytes";
const BIN_KEY: &str = "http-hygiene-test-publish-key";

/// The binary, killed when dropped; its stderr lines arrive on `stderr`.
struct Binary {
    child: Child,
    addr: String,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// Starts `pgdn-server` in configured mode on a free port, through
    /// `sh -c '<prefix>; exec pgdn-server "$@"'` (e.g. to set a ulimit).
    fn start(shell_prefix: &str, args: &[&str]) -> Binary {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{shell_prefix}exec \"$0\" \"$@\""))
            .arg(BIN)
            .args(["--addr", "127.0.0.1:0"])
            .args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("PGDN_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .env("PGDN_JWT_SECRET", BIN_SECRET)
            .env("PGDN_PUBLISH_KEY", BIN_KEY)
            .env("PGDN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let (tx, stderr) = mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        std::thread::spawn(move || for _ in out.lines() {});
        let addr = first
            .trim()
            .strip_prefix("pgdn-server listening on http://")
            .unwrap_or_else(|| {
                let err: Vec<String> = stderr.try_iter().collect();
                panic!("not the listening line: {first:?}; stderr: {err:#?}")
            })
            .to_string();
        Binary {
            child,
            addr,
            stderr,
        }
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    fn wait_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?} within {within:?}"),
            }
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; `None` if it has not within `within`.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Polling the child's status; not a synchronization sleep.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `GET /healthz` on a fresh connection: the body, or why not.
async fn healthz(addr: &str, within: Duration) -> Result<String, String> {
    let attempt = async {
        let mut sock = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        sock.read_to_end(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).to_string();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(format!("unexpected reply {text:?}")),
        }
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no reply within {within:?}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_shutdown_timeout_whatever_is_open() {
    let mut bin = Binary::start(
        "",
        &[
            "--shutdown-timeout",
            "2s",
            "--header-read-timeout",
            "60s",
            "--keep-alive-timeout",
            "60s",
            "--body-timeout",
            "60s",
        ],
    );
    let addr = bin.addr.clone();
    // Every kind of stalled socket, plus a subscriber.
    let _silent = connect(&addr).await;
    let mut trickled = connect(&addr).await;
    trickled
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut half = connect(&addr).await;
    half.write_all(half_upgrade(&addr).as_bytes())
        .await
        .unwrap();
    let mut slow = connect(&addr).await;
    slow.write_all(slow_publish_head(&addr, BIN_KEY).as_bytes())
        .await
        .unwrap();
    let mut idle = connect(&addr).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut idle).await;
    let token = JwtAuthenticator::new(BIN_SECRET.as_bytes())
        .issue("u1", &[], Duration::from_secs(60))
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .unwrap();
    assert_eq!(common::next_json(&mut ws).await["type"], "connection");

    let start = Instant::now();
    bin.sigterm();
    assert_eq!(
        expect_close(&mut ws).await,
        (1001, "server shutting down".to_string())
    );
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(2) + SLACK))
        .expect("the process exits in time");
    let took = start.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(2) + SLACK, "exit took {took:?}");
    // The stalled request held the process until the shutdown timeout.
    bin.wait_log("shutdown timed out", Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_running_out_of_file_descriptors() {
    let bin = Binary::start("ulimit -n 64 && ", &["--header-read-timeout", "1s"]);
    let addr = bin.addr.clone();
    // Far more silent sockets than the server has descriptors: it accepts
    // until it runs out, the rest wait in the listen queue.
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(connect(&addr).await);
    }
    tokio::task::block_in_place(|| bin.wait_log("accept failed", WAIT));
    // Still alive: the header timeout frees descriptors, the queue drains
    // (the silent sockets ahead of it included), and /healthz gets in.
    assert_eq!(
        healthz(&addr, Duration::from_secs(20)).await,
        Ok("ok".into())
    );
    tokio::task::block_in_place(|| bin.wait_log("accepting connections again", WAIT));
    drop(silent);
    // Everything is free again: normal service, at once.
    assert_eq!(
        healthz(&addr, Duration::from_secs(2)).await,
        Ok("ok".into())
    );
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/publish"))
        .bearer_auth(BIN_KEY)
        .body(r#"{"target":{"user":"nobody"},"type":"info"}"#)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let token = JwtAuthenticator::new(BIN_SECRET.as_bytes())
        .issue("u1", &[], Duration::from_secs(60))
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .unwrap();
    assert_eq!(common::next_json(&mut ws).await["type"], "connection");
}
