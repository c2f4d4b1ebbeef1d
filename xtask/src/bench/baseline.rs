//! The bare baseline: the least a tokio-tungstenite fan-out server can do,
//! run as its own process (`xtask bench __baseline-server`) so that its CPU
//! time and memory are measured apart from the bench's clients.
//!
//! - WebSocket port: raw `TcpListener` accept, then
//!   `tokio_tungstenite::accept_hdr_async_with_config` with
//!   `WebSocketConfig::default().read_buffer_size(4096)` (the header
//!   callback only reads `?user=` from the URL; there is no
//!   authentication). The socket is split: its sink goes to a registry
//!   shard, its stream to a task that reads until the client leaves.
//! - HTTP port (hyper, HTTP/1.1 keep-alive, like warp underneath pgdn):
//!   `POST /publish` takes pgdn's publish body, builds a frame of the same
//!   shape as pgdn's (`id`, `type`, `payload`, `timestamp`, `user_id`),
//!   serializes it once into a `Message::Text` whose bytes every socket
//!   shares, and hands it to the shards. `POST /publish/batch` takes an
//!   array of such bodies and does the same for each, one after another
//!   (`cargo xtask bench --load`, part 5).
//! - One registry shard per core, each a task that owns its sinks. By
//!   default (`--coalesce 1`) it takes one publish at a time and writes
//!   that one frame to every socket (`feed` + `flush`: one write per socket
//!   per message). With `--coalesce K` it takes up to K pending publishes
//!   at once, feeds them all to every socket and then flushes each socket
//!   once, so that under load several frames share one write.
//!
//! There is no per-connection queue, bound or slow-consumer handling: a
//! socket that does not drain stalls its shard. That is what makes it a
//! floor to compare with, not a server to run.

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;

/// The hidden subcommand of `xtask bench` that runs this server.
pub(crate) const SUBCOMMAND: &str = "__baseline-server";

/// The line the server prints on stdout once it listens; followed by
/// `ws=<addr> http=<addr>`.
pub(crate) const READY: &str = "baseline listening";

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;

enum Cmd {
    /// A new connection: id, user, sink.
    Add(u64, Arc<str>, Sink),
    /// The connection's reader saw it end.
    Remove(u64),
    /// A frame for every connection.
    All(Message),
    /// A frame for every connection of one user.
    User(Arc<str>, Message),
}

struct State {
    shards: Vec<mpsc::UnboundedSender<Cmd>>,
    connections: AtomicUsize,
    next_connection: AtomicU64,
    next_message: AtomicU64,
}

impl State {
    fn shard_of(&self, user: &str) -> &mpsc::UnboundedSender<Cmd> {
        // FNV-1a: a user's connections all live in one shard.
        let h = user.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        &self.shards[(h % self.shards.len() as u64) as usize]
    }
}

/// Runs the baseline server until its stdin closes. Arguments:
/// `[--read-buffer BYTES] [--coalesce K]` (defaults 4096 and 1).
pub(crate) fn main(args: &[String]) -> ExitCode {
    let mut read_buffer = 4096usize;
    let mut coalesce = 1usize;
    let mut nodelay = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next().and_then(|v| v.parse().ok())) {
            ("--read-buffer", Some(v)) if v > 0 => read_buffer = v,
            ("--coalesce", Some(v)) if v > 0 => coalesce = v,
            ("--nodelay", Some(v)) => nodelay = v != 0,
            _ => {
                eprintln!("baseline: usage: {SUBCOMMAND} [--read-buffer BYTES] [--coalesce K]");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baseline: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(read_buffer, coalesce, nodelay)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(read_buffer: usize, coalesce: usize, nodelay: bool) -> std::io::Result<()> {
    let ws_listener = TcpListener::bind("127.0.0.1:0").await?;
    let http_listener = TcpListener::bind("127.0.0.1:0").await?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut shards = Vec::with_capacity(cores);
    for _ in 0..cores {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(shard(rx, coalesce));
        shards.push(tx);
    }
    let state = Arc::new(State {
        shards,
        connections: AtomicUsize::new(0),
        next_connection: AtomicU64::new(1),
        next_message: AtomicU64::new(1),
    });
    println!(
        "{READY} ws={} http={}",
        ws_listener.local_addr()?,
        http_listener.local_addr()?
    );
    // The bench holds our stdin open; when it closes (the bench is done or
    // died), so do we.
    tokio::spawn(async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        std::process::exit(0);
    });
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let http_state = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = http_listener.accept().await else {
                continue;
            };
            let state = http_state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| publish(req, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    loop {
        let (stream, _) = ws_listener.accept().await?;
        if nodelay {
            stream.set_nodelay(true)?;
        }
        tokio::spawn(connection(stream, state.clone(), config));
    }
}

/// One WebSocket connection: handshake, registration, then reading until
/// the client leaves.
#[allow(
    clippy::result_large_err,
    reason = "the callback's signature is tungstenite's `Callback`"
)]
async fn connection(stream: TcpStream, state: Arc<State>, config: WebSocketConfig) {
    let mut user: Option<String> = None;
    let callback = |req: &WsRequest, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        user = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("user=")))
            .map(str::to_owned);
        Ok(resp)
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let id = state.next_connection.fetch_add(1, Ordering::Relaxed);
    let user: Arc<str> = user.unwrap_or_else(|| format!("anonymous-{id}")).into();
    let (sink, mut stream) = ws.split();
    let shard = state.shard_of(&user).clone();
    if shard.send(Cmd::Add(id, user, sink)).is_err() {
        return;
    }
    state.connections.fetch_add(1, Ordering::Relaxed);
    // Nothing is expected from clients; reading answers their Pings and
    // notices when they leave.
    while let Some(Ok(_)) = stream.next().await {}
    state.connections.fetch_sub(1, Ordering::Relaxed);
    let _ = shard.send(Cmd::Remove(id));
}

/// A shard of the registry: owns its sinks and writes to them, taking up
/// to `coalesce` commands at a time.
async fn shard(mut rx: mpsc::UnboundedReceiver<Cmd>, coalesce: usize) {
    let mut conns: Vec<(u64, Arc<str>, Sink)> = Vec::new();
    let mut position: HashMap<u64, usize> = HashMap::new();
    let mut users: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
    let mut cmds = Vec::with_capacity(coalesce);
    let mut dirty: Vec<usize> = Vec::new();
    let mut gone: Vec<u64> = Vec::new();
    while rx.recv_many(&mut cmds, coalesce).await > 0 {
        let mut everyone = false;
        for cmd in cmds.drain(..) {
            match cmd {
                Cmd::Add(id, user, sink) => {
                    position.insert(id, conns.len());
                    users.entry(user.clone()).or_default().push(id);
                    conns.push((id, user, sink));
                }
                Cmd::Remove(id) => gone.push(id),
                Cmd::All(msg) => {
                    everyone = true;
                    for (id, _, sink) in conns.iter_mut() {
                        if sink.feed(msg.clone()).await.is_err() {
                            gone.push(*id);
                        }
                    }
                }
                Cmd::User(user, msg) => {
                    for id in users.get(&user).into_iter().flatten() {
                        let i = position[id];
                        if conns[i].2.feed(msg.clone()).await.is_err() {
                            gone.push(*id);
                        }
                        dirty.push(i);
                    }
                }
            }
        }
        if everyone {
            for (id, _, sink) in conns.iter_mut() {
                if sink.flush().await.is_err() {
                    gone.push(*id);
                }
            }
        } else {
            dirty.sort_unstable();
            dirty.dedup();
            for &i in &dirty {
                if conns[i].2.flush().await.is_err() {
                    gone.push(conns[i].0);
                }
            }
        }
        dirty.clear();
        for id in gone.drain(..) {
            let Some(i) = position.remove(&id) else {
                continue;
            };
            let (_, user, _) = conns.swap_remove(i);
            if let Some((moved, _, _)) = conns.get(i) {
                position.insert(*moved, i);
            }
            if let Some(ids) = users.get_mut(&user) {
                ids.retain(|c| *c != id);
                if ids.is_empty() {
                    users.remove(&user);
                }
            }
        }
    }
}

/// A notification as pgdn puts it on the wire (docs/protocol.md section 2).
#[derive(Serialize)]
struct Frame<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'a str,
    payload: &'a Value,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `POST /publish` with pgdn's publish body, `broadcast` and `user`
/// targets; `POST /publish/batch` (any path ending in `/batch`) with a JSON
/// array of them, published one after another as pgdn's batch endpoint
/// does (user-targeted: one write per message to a different socket).
async fn publish(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let bad = |m: &str| {
        Ok(reply(
            StatusCode::BAD_REQUEST,
            format!(r#"{{"error":"{m}"}}"#),
        ))
    };
    let batch = req.uri().path().ends_with("/batch");
    let Ok(body) = req.into_body().collect().await else {
        return bad("unreadable body");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return bad("not JSON");
    };
    if !batch {
        return match publish_one(&body, &state) {
            Ok(answer) => Ok(reply(StatusCode::OK, answer)),
            Err(m) => bad(m),
        };
    }
    let Some(items) = body.as_array() else {
        return bad("a batch is an array");
    };
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        match publish_one(item, &state) {
            Ok(answer) => answers.push(answer),
            Err(m) => return bad(m),
        }
    }
    Ok(reply(StatusCode::OK, format!("[{}]", answers.join(","))))
}

/// Publishes one message of pgdn's publish body and returns its answer.
fn publish_one(body: &Value, state: &State) -> Result<String, &'static str> {
    let Some(kind) = body["type"].as_str() else {
        return Err("no type");
    };
    let user = body["target"]["user"].as_str();
    if user.is_none() && body["target"].get("broadcast").is_none() {
        return Err("only user and broadcast targets");
    }
    // A uuid-shaped id, as long as pgdn's.
    let n = state.next_message.fetch_add(1, Ordering::Relaxed);
    let frame = Frame {
        id: format!("00000000-0000-7000-8000-{n:012x}"),
        kind,
        payload: &body["payload"],
        timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        user_id: user,
    };
    let text = serde_json::to_string(&frame).expect("a frame serializes");
    let id = frame.id;
    let msg = Message::Text(Utf8Bytes::from(text));
    let delivered = match user {
        Some(user) => {
            let _ = state.shard_of(user).send(Cmd::User(user.into(), msg));
            "null".to_string()
        }
        None => {
            for shard in &state.shards {
                let _ = shard.send(Cmd::All(msg.clone()));
            }
            state.connections.load(Ordering::Relaxed).to_string()
        }
    };
    Ok(format!(r#"{{"id":"{id}","delivered":{delivered}}}"#))
}
