//! End-to-end checks of the examples: each app is served on a free port and
//! driven like a user would, with a WebSocket subscriber and HTTP calls.
//!
//! The example files are compiled into this test as modules, so the test
//! exercises exactly the code `cargo run --example ...` runs (minus `main`).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgdn_server::JwtAuthenticator;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use warp::Filter;
use warp::reply::Response;

#[allow(dead_code)]
#[path = "../examples/basic.rs"]
mod basic;

#[allow(dead_code)]
#[path = "../examples/auth.rs"]
mod auth;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Serves `app` on a free local port for the rest of the test.
async fn serve<F>(app: F) -> SocketAddr
where
    F: Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(app).incoming(listener).run());
    addr
}

async fn subscribe(addr: SocketAddr, token: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .unwrap();
    ws
}

/// The next text frame as JSON, or the close frame as `{"close":code,"reason":...}`.
async fn next(ws: &mut Ws) -> Value {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Close(Some(f)))) => {
                    return json!({"close": u16::from(f.code), "reason": f.reason.as_str()});
                }
                Some(Ok(_)) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a frame within 5 s")
}

/// Asserts that nothing arrives for a moment.
async fn quiet(ws: &mut Ws) {
    let got = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(got.is_err(), "unexpected frame: {got:?}");
}

#[tokio::test]
async fn basic_trigger_notifies_the_user() {
    let pgdn = basic::build_pgdn(
        "examples test secret for HS256 tokens",
        "examples test publish key",
    )
    .unwrap();
    let addr = serve(basic::app(&pgdn)).await;
    let token = JwtAuthenticator::new("examples test secret for HS256 tokens")
        .issue("u1", &[], Duration::from_secs(60))
        .unwrap();
    let mut ws = subscribe(addr, &token).await;
    assert_eq!(next(&mut ws).await["user_id"], "u1");

    let http = reqwest::Client::new();
    let reply = http
        .post(format!("http://{addr}/trigger"))
        .json(&json!({"user_id": "u1", "message": "Your export is ready"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let receipt: Value = reply.json().await.unwrap();
    assert_eq!(receipt["delivered"], 1);

    let note = next(&mut ws).await;
    assert_eq!(note["id"], receipt["id"]);
    assert_eq!(note["type"], "info");
    assert_eq!(note["payload"]["message"], "Your export is ready");

    // A bad body is refused; pgdn's own routes are mounted too.
    let bad = http
        .post(format!("http://{addr}/trigger"))
        .json(&json!({"user_id": "", "message": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let page = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("pgdnDemo"));
    pgdn.shutdown().await;
}

#[tokio::test]
async fn auth_sessions_and_chat_handler() {
    let sessions = auth::SessionStore::with_demo_sessions();
    let pgdn = auth::build_pgdn(sessions.clone(), "examples test publish key").unwrap();
    let addr = serve(auth::app(&pgdn, &sessions)).await;

    let mut bad = subscribe(addr, "no-such-token").await;
    assert_eq!(
        next(&mut bad).await,
        json!({"close": 1008, "reason": "invalid token"})
    );

    let mut alice = subscribe(addr, "alice-token").await;
    let mut bob = subscribe(addr, "bob-token").await;
    let mut carol = subscribe(addr, "carol-token").await;
    assert_eq!(next(&mut alice).await["user_id"], "alice");
    assert_eq!(next(&mut bob).await["user_id"], "bob");
    assert_eq!(next(&mut carol).await["user_id"], "carol");

    let chat = json!({"type": "chat", "room": "lobby", "text": "hi bob"});
    alice.send(Message::text(chat.to_string())).await.unwrap();
    let to_bob = next(&mut bob).await;
    assert_eq!(to_bob["type"], "chat");
    assert_eq!(to_bob["payload"]["from"], "alice");
    assert_eq!(to_bob["payload"]["message"], "hi bob");
    assert_eq!(next(&mut alice).await["id"], to_bob["id"]);
    let ack = next(&mut alice).await;
    assert_eq!(ack["type"], "chat_sent");
    assert_eq!(ack["id"], to_bob["id"]);
    assert_eq!(ack["delivered"], 2);
    quiet(&mut carol).await;

    // carol is not in the lobby: an error frame, and the socket stays open.
    carol.send(Message::text(chat.to_string())).await.unwrap();
    assert_eq!(next(&mut carol).await["code"], "handler_error");

    // Logging out revokes the session and closes bob's socket.
    let out = reqwest::Client::new()
        .post(format!("http://{addr}/logout"))
        .bearer_auth("bob-token")
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200);
    assert_eq!(next(&mut bob).await["close"], 1008);
    let mut again = subscribe(addr, "bob-token").await;
    assert_eq!(next(&mut again).await["reason"], "invalid token");
    pgdn.shutdown().await;
}

#[allow(dead_code)]
#[path = "../examples/batch_job.rs"]
mod batch_job;

#[allow(dead_code)]
#[path = "../examples/subscriber.rs"]
mod subscriber;

/// The batch job, on a plain thread, reaches the Rust subscriber of the
/// example through a real server: started, 10..100, completed, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_job_progress_reaches_the_subscriber() {
    let pgdn = basic::build_pgdn("batch-secret-of-at-least-32-bytes", "batch-publish-key").unwrap();
    let addr = serve(pgdn.routes()).await;
    let mut events = subscriber::subscriber(
        format!("ws://{addr}/ws"),
        None,
        Some("batch-secret-of-at-least-32-bytes".into()),
        "owner".into(),
    )
    .unwrap()
    .subscribe()
    .unwrap();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap();
        if matches!(e, Some(Ok(pgdn_client::Event::Connected { .. }))) {
            break;
        }
    }
    let url = format!("http://{addr}");
    let job = std::thread::spawn(move || {
        let p = pgdn_client::blocking::Publisher::new(url, "batch-publish-key").unwrap();
        batch_job::run_job(&p, "owner", "job-1", 10, |_| {})
    });
    let mut seen = Vec::new();
    while seen.len() < 12 {
        let n = tokio::time::timeout(Duration::from_secs(10), events.next_notification())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(match n.kind.as_str() {
            "task_progress" => format!("progress {}", n.payload["progress"]),
            other => other.to_string(),
        });
    }
    job.join().unwrap().unwrap();
    let mut want = vec!["task_started".to_string()];
    want.extend((1..=10).map(|i| format!("progress {}", i * 10)));
    want.push("task_completed".into());
    assert_eq!(seen, want);
}

#[allow(dead_code)]
#[path = "../examples/emitter.rs"]
mod emitter;

/// The emitter publishes into Redis; a cluster node delivers it.
#[tokio::test]
async fn emitter_progress_reaches_a_cluster_node() {
    let redis = pgdn_testkit::RedisServer::start();
    let cluster = pgdn_redis::Cluster::connect(&redis.url(), "ex-node", Default::default())
        .await
        .unwrap();
    let pgdn = pgdn_server::Pgdn::builder()
        .hub(cluster.hub_builder().build())
        .jwt_secret("em-secret-of-at-least-32-bytes!!")
        .publish_key("em-publish-key-16")
        .build()
        .unwrap();
    assert!(cluster.wait_ready(Duration::from_secs(10)).await);
    let addr = serve(pgdn.routes()).await;
    let token = JwtAuthenticator::new(b"em-secret-of-at-least-32-bytes!!")
        .issue("owner", &[], Duration::from_secs(60))
        .unwrap();
    let mut ws = subscribe(addr, &token).await;
    assert_eq!(next(&mut ws).await["type"], "connection");
    let mut watch = pgdn.hub().watch_connections();
    watch.wait_for(|n| *n == 1).await.unwrap();
    let emitter = pgdn_redis::Emitter::connect(&redis.url(), Default::default())
        .await
        .unwrap();
    emitter::report(&emitter, "owner", "job-x").await.unwrap();
    let mut kinds = Vec::new();
    for _ in 0..6 {
        kinds.push(next(&mut ws).await["type"].as_str().unwrap().to_string());
    }
    assert_eq!(
        kinds,
        [
            "task_started",
            "task_progress",
            "task_progress",
            "task_progress",
            "task_progress",
            "task_completed"
        ]
    );
}

/// The binary of the example `name`, built (or found fresh) with the
/// profile of this test: run as a user would, not compiled in as a module.
fn example_binary(name: &str) -> std::path::PathBuf {
    // One cargo at a time: concurrent builds would wait on its lock anyway.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let mut build = std::process::Command::new(env!("CARGO"));
    build.args(["build", "-q", "-p", "pgdn-examples", "--example", name]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    assert!(
        build.status().unwrap().success(),
        "the {name} example builds"
    );
    // This test runs from <target>/<profile>/deps; examples are next to it.
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().unwrap().parent().unwrap();
    profile_dir.join(format!("examples/{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The axum example's binary, built once.
fn axum_example_binary() -> &'static std::path::Path {
    static BINARY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| example_binary("axum"))
}

/// A running `cargo run -p pgdn-examples --example axum`; killed on drop.
struct AxumExample {
    child: std::process::Child,
    addr: SocketAddr,
    /// The stdout lines after the listening line (the dev banner, if any).
    banner: Vec<String>,
    /// Kept open: the example may still write.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Drop for AxumExample {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AxumExample {
    /// Starts the example on a free port with `env` (and no other
    /// `PGDN_*` variable); reads stdout through `banner_lines` lines
    /// after the listening line (blocking reads on a pipe: events).
    fn start(env: &[(&str, &str)], banner_lines: usize) -> AxumExample {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(axum_example_binary());
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PGDN_")) {
            cmd.env_remove(k);
        }
        cmd.env("PGDN_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("the example starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut read_line = || {
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "stdout ended");
            line.trim_end().to_string()
        };
        let listening = read_line();
        let addr = listening
            .strip_prefix("pgdn axum example listening on http://")
            .unwrap_or_else(|| panic!("a listening line, got {listening:?}"))
            .parse()
            .unwrap();
        let banner = (0..banner_lines).map(|_| read_line()).collect();
        AxumExample {
            child,
            addr,
            banner,
            _stdout: stdout,
        }
    }

    /// The value after `label` on the banner line that contains it.
    fn banner_value(&self, label: &str) -> String {
        let line = self.banner.iter().find(|l| l.contains(label)).unwrap();
        let value = line.split(label).nth(1).unwrap().trim();
        value.split_whitespace().next().unwrap().to_string()
    }
}

#[tokio::test]
async fn axum_example_binary_serves_subscribers_and_publishers() {
    let app = AxumExample::start(
        &[
            ("PGDN_JWT_SECRET", "axum-secret-of-at-least-32-bytes"),
            ("PGDN_PUBLISH_KEY", "axum-publish-key"),
        ],
        0,
    );
    let addr = app.addr;
    let token = JwtAuthenticator::new("axum-secret-of-at-least-32-bytes")
        .issue("u1", &["staff"], Duration::from_secs(60))
        .unwrap();
    let mut ws = subscribe(addr, &token).await;
    assert_eq!(next(&mut ws).await["user_id"], "u1");

    let http = reqwest::Client::new();
    let publish = |body: Value| {
        http.post(format!("http://{addr}/api/v1/publish"))
            .bearer_auth("axum-publish-key")
            .json(&body)
            .send()
    };
    let reply = publish(json!({"target":{"group":"staff"},"type":"info","payload":{"n":1}}))
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let receipt: Value = reply.json().await.unwrap();
    assert_eq!(receipt["delivered"], 1);
    let note = next(&mut ws).await;
    assert_eq!(
        (&note["id"], &note["payload"]),
        (&receipt["id"], &json!({"n":1}))
    );
    let health = http.get(format!("http://{addr}/healthz")).send().await;
    assert_eq!(health.unwrap().text().await.unwrap(), "ok");

    // SIGTERM: every socket gets 1001 and the process exits with 0.
    #[cfg(unix)]
    {
        let mut app = app;
        let pid = app.child.id().to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        assert!(kill.unwrap().success());
        assert_eq!(
            next(&mut ws).await,
            json!({"close": 1001, "reason": "server shutting down"})
        );
        assert!(app.child.wait().unwrap().success());
    }
}

#[tokio::test]
async fn axum_example_dev_mode_prints_working_credentials() {
    let app = AxumExample::start(&[], 6);
    let (key, token) = (
        app.banner_value("Publish key:"),
        app.banner_value("Token for demo-user:"),
    );
    let mut ws = subscribe(app.addr, &token).await;
    assert_eq!(next(&mut ws).await["user_id"], "demo-user");
    let reply = reqwest::Client::new()
        .post(format!("http://{}/api/v1/publish", app.addr))
        .bearer_auth(&key)
        .json(&json!({"target":{"user":"demo-user"},"type":"info","payload":{"title":"Hello"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(next(&mut ws).await["payload"]["title"], "Hello");
    assert!(
        app.banner
            .iter()
            .any(|l| l.contains(&format!("Bearer {key}"))),
        "a curl command with the key: {:#?}",
        app.banner
    );
}

/// `cargo run -p pgdn-examples --example webhook_receiver` on a free
/// port; killed on drop.
struct WebhookReceiver {
    child: std::process::Child,
    url: String,
    /// Its stdout lines after the listening line (a thread reads them:
    /// blocking reads on a pipe, events).
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WEBHOOK_SECRET: &str = "webhook-secret-of-32-bytes-or-so";

impl WebhookReceiver {
    fn start() -> WebhookReceiver {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(example_binary("webhook_receiver"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PGDN_")) {
            cmd.env_remove(k);
        }
        cmd.env("PGDN_RECEIVER_ADDR", "127.0.0.1:0")
            .env("PGDN_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("the example starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = stdout.next().expect("a line").unwrap();
        let url = listening
            .strip_prefix("webhook receiver listening on ")
            .unwrap_or_else(|| panic!("a listening line, got {listening:?}"))
            .to_string();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in stdout.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        WebhookReceiver { child, url, lines }
    }

    /// The next printed event.
    async fn next_event(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
            .await
            .expect("a line within 10 s")
            .expect("the example runs");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("one event a line: {line}"))
    }

    /// POSTs `body` with these headers; the status.
    async fn post(&self, body: &str, timestamp: u64, signature: Option<String>) -> u16 {
        let mut req = reqwest::Client::new()
            .post(format!("{}/hooks", self.url))
            .header("content-type", "application/json")
            .header("pgdn-timestamp", timestamp.to_string())
            .body(body.to_string());
        if let Some(signature) = signature {
            req = req.header("pgdn-signature", signature);
        }
        req.send().await.unwrap().status().as_u16()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A body of one event about `user`, and its id.
fn webhook_body(user: &str) -> (String, Value) {
    let event = serde_json::to_value(pgdn_core::LifecycleEvent::new(
        pgdn_core::EventKind::UserOffline,
        Some(user),
    ))
    .unwrap();
    (json!({ "events": [event] }).to_string(), event)
}

#[tokio::test]
async fn webhook_receiver_verifies_signatures_and_prints_each_event_once() {
    use pgdn_core::LifecycleSink;
    use pgdn_server::webhooks::{WebhookConfig, WebhookSink, sign};
    let mut rx = WebhookReceiver::start();

    // What pgdn-server sends is accepted and printed, one line each.
    let sink = WebhookSink::start(WebhookConfig::new(
        [format!("{}/hooks", rx.url)],
        WEBHOOK_SECRET,
    ))
    .unwrap();
    let online = pgdn_core::LifecycleEvent::new(pgdn_core::EventKind::UserOnline, Some("u1"));
    let offline = pgdn_core::LifecycleEvent::new(pgdn_core::EventKind::UserOffline, Some("u1"));
    sink.emit(online.clone());
    sink.emit(offline.clone());
    assert_eq!(
        rx.next_event().await,
        serde_json::to_value(&online).unwrap()
    );
    assert_eq!(
        rx.next_event().await,
        serde_json::to_value(&offline).unwrap()
    );
    assert_eq!(sink.shutdown(Duration::from_secs(10)).await, 0);
    assert_eq!(sink.stats()[0].delivered, 2);

    let secret = WEBHOOK_SECRET.as_bytes();
    let now = unix_now();
    let (body, event) = webhook_body("u2");
    let signed = |body: &str, ts: u64| Some(sign(secret, ts, body.as_bytes()));
    // Refused: another secret, no signature, a stale timestamp, a body
    // that is not the one signed.
    let other = Some(sign(
        b"another-secret-of-32-bytes-or-so",
        now,
        body.as_bytes(),
    ));
    assert_eq!(rx.post(&body, now, other).await, 401);
    assert_eq!(rx.post(&body, now, None).await, 401);
    assert_eq!(
        rx.post(&body, now - 600, signed(&body, now - 600)).await,
        401
    );
    let (other_body, _) = webhook_body("u3");
    assert_eq!(rx.post(&other_body, now, signed(&body, now)).await, 401);
    // Accepted, and printed.
    assert_eq!(rx.post(&body, now, signed(&body, now)).await, 200);
    assert_eq!(rx.next_event().await, event);
    // A retry of the same event: 200 (or pgdn would retry for ever), not
    // printed again: the next line is the next new event.
    assert_eq!(rx.post(&body, now + 1, signed(&body, now + 1)).await, 200);
    let (body4, event4) = webhook_body("u4");
    assert_eq!(rx.post(&body4, now, signed(&body4, now)).await, 200);
    assert_eq!(rx.next_event().await, event4);
}

/// The README's Rust verification is the example's own code (so it
/// compiles, and the test above runs it).
#[test]
fn the_readme_rust_webhook_check_is_the_examples() {
    const MARKER: &str = "<!-- readme-test: rust-webhook-verify -->";
    let readme = include_str!("../../README.md");
    let after = &readme[readme.find(MARKER).expect("the marker is in README.md")..];
    let start = after.find("```rust\n").expect("a rust block") + 8;
    let len = after[start..].find("\n```").expect("the block ends");
    let block = &after[start..start + len];
    assert!(block.contains("pub fn verify("), "{block}");
    let example = include_str!("../examples/webhook_receiver.rs");
    assert!(
        example.contains(block),
        "README.md's Rust check differs from examples/webhook_receiver.rs:\n{block}"
    );
}
