//! Lifecycle webhooks over real sockets: a local receiver records what
//! [`WebhookSink`] POSTs (batches, signatures, retries, a full queue, a
//! receiver down or hanging), and the `pgdn-server` binary refuses a
//! webhook URL without a good secret.
//!
//! The tests run on tokio's single-threaded test runtime: events emitted
//! in a row (`emit` is synchronous) are all queued before the delivery
//! task first runs, which makes the batches exact.

mod common;
mod nodes;
mod spawn;

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use pgdn_server::core::{EventKind, LifecycleEvent, LifecycleSink};
use pgdn_server::webhooks::{RetryPolicy, WebhookConfig, WebhookSink};
use serde_json::Value;
use sha2::Sha256;
use spawn::{Running, TempDir, clean_command};
use tokio::sync::{Notify, mpsc};
use warp::Filter;
use warp::http::HeaderMap;

const SECRET: &str = "a-webhook-secret-of-32-bytes-min";

/// Fast retries, so that the tests do not wait for the default 0.5 s.
fn fast() -> RetryPolicy {
    RetryPolicy::default()
        .initial(Duration::from_millis(20))
        .max(Duration::from_millis(100))
}

/// One request a receiver got.
#[derive(Debug)]
struct Request {
    path_and_query: String,
    content_type: String,
    timestamp: String,
    signature: String,
    body: Bytes,
}

impl Request {
    /// The events of the body, checking that it is `{"events":[...]}`
    /// and nothing else.
    fn events(&self) -> Vec<Value> {
        let v: Value = serde_json::from_slice(&self.body).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 1, "only `events`: {v}");
        obj["events"].as_array().unwrap().clone()
    }

    fn users(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e["user"].as_str().unwrap().to_string())
            .collect()
    }

    /// Checks the request as a receiver would: a timestamp within 5
    /// minutes of now, JSON, and a signature that verifies with `secret`.
    fn assert_signed_with(&self, secret: &str) {
        let ts: u64 = self.timestamp.parse().expect("unix seconds");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(ts) < 300, "a fresh timestamp: {ts} vs {now}");
        assert_eq!(self.content_type, "application/json");
        assert!(
            self.verifies_with(secret),
            "signature {} does not match",
            self.signature
        );
    }

    /// Whether the signature verifies with `secret`, computed
    /// independently of pgdn's own code: HMAC-SHA256 of
    /// `"{timestamp}.{body}"`, lowercase hex, in one `v1=` entry.
    fn verifies_with(&self, secret: &str) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(self.timestamp.as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.signature.split(',').any(|s| s == format!("v1={hex}"))
    }
}

/// How a receiver answers its next request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
}

/// A local HTTP receiver: records every request (any path), answers
/// from its script, then 200.
struct Receiver {
    addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Request>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        Receiver::on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(listener: tokio::net::TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let answers = script.clone();
        let route = warp::post()
            .and(warp::filters::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(
                move |path: warp::filters::path::FullPath,
                      query: String,
                      headers: HeaderMap,
                      body: Bytes| {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default()
                    };
                    let _ = tx.send(Request {
                        path_and_query: format!("{}?{query}", path.as_str()),
                        content_type: header("content-type"),
                        timestamp: header("pgdn-timestamp"),
                        signature: header("pgdn-signature"),
                        body,
                    });
                    let answer = answers.lock().unwrap().pop_front();
                    let Answer::Status(code) = answer.unwrap_or(Answer::Status(200));
                    warp::http::StatusCode::from_u16(code).unwrap()
                },
            );
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Receiver {
            addr,
            requests,
            script,
        }
    }

    fn answer_next(&self, answers: &[Answer]) {
        self.script.lock().unwrap().extend(answers);
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// The next request (within 10 s, a bound for a broken test, not a
    /// measurement).
    async fn next(&mut self) -> Request {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("a request within 10 s")
            .expect("the receiver runs")
    }

    /// Requests until they hold `n` events in all.
    async fn events(&mut self, n: usize) -> Vec<Request> {
        let mut got = Vec::new();
        let mut count = 0;
        while count < n {
            let r = self.next().await;
            count += r.events().len();
            got.push(r);
        }
        assert_eq!(count, n, "exactly {n} events");
        got
    }
}

/// A port with nothing listening on it (bound, then closed): connecting
/// is refused until someone binds it again.
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn event(user: &str) -> LifecycleEvent {
    LifecycleEvent::new(EventKind::UserOnline, Some(user))
}

#[tokio::test]
async fn events_arrive_in_signed_batches_in_order() {
    let mut rx = Receiver::start().await;
    let sink = WebhookSink::start(
        WebhookConfig::new([format!("{}?tenant=t1", rx.url())], SECRET).max_batch(3),
    )
    .unwrap();
    let undelivered = LifecycleEvent::new(EventKind::NotificationUndelivered, Some("u6"))
        .with("message_id", "m1")
        .with("message_type", "info")
        .with("target", serde_json::json!({"user": "u6"}));
    let mut sent = Vec::new();
    for i in 0..6 {
        sent.push(event(&format!("u{i}")));
    }
    sent.push(undelivered);
    for e in &sent {
        sink.emit(e.clone());
    }
    let requests = rx.events(7).await;
    let sizes: Vec<usize> = requests.iter().map(|r| r.events().len()).collect();
    assert_eq!(sizes, [3, 3, 1], "batches of at most 3, in order");
    let mut got = Vec::new();
    for r in &requests {
        r.assert_signed_with(SECRET);
        assert_eq!(r.path_and_query, "/hooks?tenant=t1");
        got.extend(r.events());
    }
    let want: Vec<Value> = sent
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    assert_eq!(got, want, "every event as it serializes, in order");
    assert_eq!(got[6]["type"], "notification.undelivered");
    assert_eq!(got[6]["message_id"], "m1");
    assert!(got[0]["id"].as_str().unwrap().starts_with("evt_"));

    // The check above can fail: another secret does not verify, nor
    // another body.
    assert!(!requests[0].verifies_with("another-secret-of-32-bytes-or-more"));
    let tampered = Request {
        path_and_query: String::new(),
        content_type: String::new(),
        timestamp: requests[0].timestamp.clone(),
        signature: requests[0].signature.clone(),
        body: requests[1].body.clone(),
    };
    assert!(!tampered.verifies_with(SECRET));
    // Shutdown returns once the last 2xx is taken in.
    assert_eq!(sink.shutdown(Duration::from_secs(10)).await, 0);
    let stats = &sink.stats()[0];
    assert_eq!((stats.delivered, stats.dropped, stats.queued), (7, 0, 0));
}

#[tokio::test]
async fn failed_answers_are_retried_with_the_same_event_ids() {
    let mut rx = Receiver::start().await;
    rx.answer_next(&[Answer::Status(500), Answer::Status(503)]);
    let sink = WebhookSink::start(WebhookConfig::new([rx.url()], SECRET).retry(fast())).unwrap();
    sink.emit(event("a"));
    sink.emit(event("b"));
    let first = rx.next().await;
    let second = rx.next().await;
    let third = rx.next().await;
    let ids = |r: &Request| -> Vec<Value> { r.events().iter().map(|e| e["id"].clone()).collect() };
    assert_eq!(ids(&first).len(), 2);
    assert_eq!(ids(&first), ids(&second));
    assert_eq!(ids(&first), ids(&third));
    for r in [&first, &second, &third] {
        // Each attempt is signed afresh.
        r.assert_signed_with(SECRET);
    }
    // The 200 of the third attempt is what removes them: wait for the
    // queue to drain (an event: shutdown returns when it does).
    assert_eq!(sink.shutdown(Duration::from_secs(10)).await, 0);
    let stats = &sink.stats()[0];
    assert_eq!((stats.delivered, stats.failed_attempts), (2, 2));
}

/// Log lines of the current thread, one per message, to a channel.
#[derive(Clone)]
struct Logs(mpsc::UnboundedSender<String>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The next log line that contains `text`, and the lines before it.
async fn log_line(logs: &mut mpsc::UnboundedReceiver<String>, text: &str) -> (String, Vec<String>) {
    let mut others = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = logs.recv().await.unwrap();
            if line.contains(text) {
                return line;
            }
            others.push(line);
        }
    })
    .await;
    match found {
        Ok(line) => (line, others),
        Err(_) => panic!("no log line with {text:?}, only {others:#?}"),
    }
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_and_the_newest_arrive_once_the_receiver_is_up() {
    let (log_tx, mut logs) = mpsc::unbounded_channel();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || Logs(log_tx.clone()))
        .finish();
    // The delivery task runs on this thread (single-threaded runtime).
    let _guard = tracing::subscriber::set_default(subscriber);
    // With a single registered subscriber, tracing caches a log call's
    // interest from whichever thread reaches it first (another test's,
    // with none): a second one, kept alive, makes it ask them all.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());

    let addr = closed_port().await;
    let url = format!("http://{addr}/hooks?token=query-token-not-logged");
    let sink = WebhookSink::start(
        WebhookConfig::new([url], SECRET)
            .queue_limit(5)
            .retry(fast()),
    )
    .unwrap();
    for i in 0..8 {
        sink.emit(event(&format!("u{i}")));
    }
    let stats = &sink.stats()[0];
    assert_eq!((stats.dropped, stats.queued), (3, 5));

    // The receiver is down: the failure is logged with the URL, without
    // its query, and never the secret.
    let (failed, _) = log_line(&mut logs, "webhook delivery failed;").await;
    assert!(failed.contains("WARN"), "{failed}");
    assert!(failed.contains(&format!("http://{addr}/hooks")), "{failed}");
    assert!(
        !failed.contains("query-token") && !failed.contains(SECRET),
        "{failed}"
    );
    // Failing again is not a warning again (not within 30 s).
    for _ in 0..2 {
        let (again, _) = log_line(&mut logs, "webhook delivery failed again").await;
        assert!(again.contains("DEBUG"), "{again}");
    }

    // /metrics of a server that carries the sink says so too.
    let pgdn = pgdn_server::Pgdn::builder()
        .jwt_secret("a-jwt-secret-of-thirty-two-bytes")
        .publish_key("a-publish-key-16")
        .collector(sink.metrics())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    let serving = tokio::spawn(pgdn.serve(listener, async move { stopped.notified().await }));
    let metrics = || async {
        reqwest::get(format!("http://{server}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = metrics().await;
    for line in [
        "pgdn_webhook_events_total{receiver=\"0\",outcome=\"dropped\"} 3",
        "pgdn_webhook_events_total{receiver=\"0\",outcome=\"delivered\"} 0",
        "pgdn_webhook_queue_depth{receiver=\"0\"} 5",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in {text}");
    }
    assert!(
        text.contains("pgdn_webhook_attempts_failed_total{receiver=\"0\"} "),
        "{text}"
    );
    assert!(!text.contains("pgdn_webhook_attempts_failed_total{receiver=\"0\"} 0\n"));

    // Up it comes, on the same port: the five newest arrive, in order.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut rx = Receiver::on(listener);
    let requests = rx.events(5).await;
    let users: Vec<String> = requests.iter().flat_map(Request::users).collect();
    assert_eq!(users, ["u3", "u4", "u5", "u6", "u7"]);
    let (recovered, before) = log_line(&mut logs, "webhook delivery recovered").await;
    assert!(!recovered.contains("query-token"), "{recovered}");
    assert!(recovered.contains("dropped_total=3"), "{recovered}");
    for line in before {
        assert!(!line.contains("WARN"), "one warning per outage: {line}");
    }

    assert_eq!(sink.shutdown(Duration::from_secs(1)).await, 0);
    let text = metrics().await;
    for line in [
        "pgdn_webhook_events_total{receiver=\"0\",outcome=\"dropped\"} 3",
        "pgdn_webhook_events_total{receiver=\"0\",outcome=\"delivered\"} 5",
        "pgdn_webhook_queue_depth{receiver=\"0\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in {text}");
    }
    stop.notify_one();
    serving.await.unwrap();
}

#[tokio::test]
async fn emit_never_waits_for_a_receiver_that_does_not_answer() {
    // Accepts connections and never reads or answers them.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hang.local_addr().unwrap();
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = hang.accept().await {
            held.push(conn);
            let _ = accepted_tx.send(());
        }
    });
    let sink = WebhookSink::start(
        WebhookConfig::new([format!("http://{addr}/")], SECRET).timeout(Duration::from_secs(600)),
    )
    .unwrap();
    sink.emit(event("first"));
    // A request is in flight, and will not end.
    tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("the sink connects")
        .unwrap();

    // From another thread (as the hub's publish path would), 1000 more.
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let emitter = sink.clone();
    std::thread::spawn(move || {
        for i in 0..1000 {
            emitter.emit(event(&format!("u{i}")));
        }
        let _ = done_tx.send(());
    });
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("emit returns while the receiver hangs")
        .unwrap();
    let stats = &sink.stats()[0];
    assert_eq!((stats.queued, stats.delivered, stats.dropped), (1001, 0, 0));
    // Shutdown gives up after its bound and says how many were left.
    assert_eq!(sink.shutdown(Duration::from_millis(200)).await, 1001);
}

#[tokio::test]
async fn a_receiver_that_is_down_does_not_hold_back_another() {
    let down = closed_port().await;
    let mut up = Receiver::start().await;
    let sink = WebhookSink::start(
        WebhookConfig::new([format!("http://{down}/"), up.url()], SECRET).retry(fast()),
    )
    .unwrap();
    for i in 0..10 {
        sink.emit(event(&format!("u{i}")));
    }
    let requests = up.events(10).await;
    let users: Vec<String> = requests.iter().flat_map(Request::users).collect();
    let want: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    assert_eq!(users, want);
    // One request in flight per URL: once a later event arrives, the 2xx
    // for the first ten has been taken in.
    sink.emit(event("probe"));
    assert_eq!(up.next().await.users(), ["probe"]);
    let stats = sink.stats();
    assert_eq!((stats[0].delivered, stats[0].queued), (0, 11));
    assert!(stats[1].delivered >= 10, "{stats:?}");
    assert_eq!(stats[1].delivered + stats[1].queued as u64, 11);
    assert_eq!(stats[0].url, format!("http://{down}/"));
    // Shutdown gives up on the one that is down.
    assert!(sink.shutdown(Duration::from_millis(200)).await >= 11);
}

#[tokio::test]
async fn shutdown_retries_at_once_instead_of_waiting_for_the_backoff() {
    let mut rx = Receiver::start().await;
    rx.answer_next(&[Answer::Status(500)]);
    // A first retry an hour away: only shutdown can make it sooner.
    let hour = Duration::from_secs(3600);
    let sink = WebhookSink::start(
        WebhookConfig::new([rx.url()], SECRET)
            .retry(RetryPolicy::default().initial(hour).max(hour)),
    )
    .unwrap();
    sink.emit(event("late"));
    let first = rx.next().await;
    assert_eq!(first.users(), ["late"]);
    assert_eq!(sink.shutdown(Duration::from_secs(10)).await, 0);
    assert_eq!(rx.next().await.users(), ["late"]);
    // After shutdown, events are dropped and counted.
    sink.emit(event("after"));
    let stats = &sink.stats()[0];
    assert_eq!((stats.delivered, stats.dropped, stats.queued), (1, 1, 0));
}

#[tokio::test]
async fn invalid_configurations_are_refused_without_echoing_the_secret() {
    let weak = "too-short-secret";
    for (config, named) in [
        (
            WebhookConfig::new(["http://127.0.0.1:9/"], weak),
            "16 bytes",
        ),
        (WebhookConfig::new(Vec::<String>::new(), SECRET), "no URL"),
        (
            WebhookConfig::new(["ftp://127.0.0.1/"], SECRET),
            "http or https",
        ),
        (WebhookConfig::new(["not a url"], SECRET), "not a URL"),
        (
            WebhookConfig::new(["http://127.0.0.1:9/"], SECRET).queue_limit(0),
            "must not be 0",
        ),
    ] {
        let err = WebhookSink::start(config).unwrap_err().to_string();
        assert!(err.contains(named), "{err}");
        assert!(!err.contains(weak) && !err.contains(SECRET), "{err}");
    }
}

/// Runs the binary to its exit (a refused configuration exits at once):
/// its exit code and stderr.
fn exit_of(mut cmd: std::process::Command) -> (Option<i32>, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn the_binary_refuses_a_webhook_url_without_a_good_secret() {
    let dir = TempDir::new("webhook-secret");
    let weak_file = dir.file("secret", "weak-webhook-secret\n");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--webhook-url", "http://127.0.0.1:9/hooks"],
            vec![],
            "--webhook-secret",
        ),
        (
            vec![],
            vec![(
                "PGDN_WEBHOOK_URL",
                "http://127.0.0.1:9/a,http://127.0.0.1:9/b",
            )],
            "--webhook-secret",
        ),
        (
            vec!["--webhook-url", "http://127.0.0.1:9/hooks"],
            vec![("PGDN_WEBHOOK_SECRET", "weak-webhook-secret")],
            "--webhook-secret (PGDN_WEBHOOK_SECRET)",
        ),
        (
            vec![
                "--webhook-url",
                "http://127.0.0.1:9/hooks",
                "--webhook-secret-file",
                &weak_file,
            ],
            vec![],
            "--webhook-secret-file (PGDN_WEBHOOK_SECRET_FILE)",
        ),
        (vec!["--webhook-secret", SECRET], vec![], "--webhook-url"),
        (
            vec![
                "--webhook-url",
                "ftp://127.0.0.1/hooks",
                "--webhook-secret",
                SECRET,
            ],
            vec![],
            "--webhook-url",
        ),
    ];
    for (args, env, named) in cases {
        let mut cmd = clean_command();
        cmd.args(["--addr", "127.0.0.1:0"])
            .args(&args)
            .envs(env.clone());
        let (code, err) = exit_of(cmd);
        assert_eq!(code, Some(1), "{args:?} {env:?}: {err}");
        assert!(err.contains(named), "{args:?} {env:?}: {err}");
        assert!(
            !err.contains("weak-webhook-secret") && !err.contains(SECRET),
            "never echoed: {err}"
        );
    }
}

#[test]
fn print_config_masks_the_webhook_secret() {
    let mut cmd = clean_command();
    cmd.args([
        "--print-config",
        "--webhook-url",
        "https://hooks.example.com/in",
    ])
    .env("PGDN_WEBHOOK_SECRET", SECRET);
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains(SECRET), "{printed}");
    assert!(printed.contains("webhook-secret = \"***\""), "{printed}");
    assert!(
        printed.contains("webhook-url = [\"https://hooks.example.com/in\"]"),
        "{printed}"
    );
    assert!(printed.contains("webhook-queue-limit = 10000"), "{printed}");
}

#[tokio::test]
async fn the_binary_serves_the_webhook_metrics() {
    let rx = Receiver::start().await;
    let mut cmd = clean_command();
    cmd.args(["--addr", "127.0.0.1:0", "--webhook-url", &rx.url()])
        .env("PGDN_WEBHOOK_SECRET", SECRET);
    let server = Running::start(cmd);
    let text = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "pgdn_webhook_queue_depth{receiver=\"0\"} 0",
        "pgdn_webhook_events_total{receiver=\"0\",outcome=\"delivered\"} 0",
        "pgdn_webhook_attempts_failed_total{receiver=\"0\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in {text}");
    }
}

/// The README's Python block after `<!-- readme-test: python-webhook-verify -->`.
fn python_verify_snippet() -> String {
    const MARKER: &str = "<!-- readme-test: python-webhook-verify -->";
    let readme = include_str!("../../README.md");
    let after = &readme[readme.find(MARKER).expect("the marker is in README.md")..];
    let start = after.find("```python\n").expect("a python block") + 10;
    let len = after[start..].find("\n```").expect("the block ends");
    after[start..start + len].to_string()
}

/// Runs the README's Python verification with `secret` in its
/// environment, on `input` (`{"mode", "headers", "body", "now"}`): its
/// stdout.
async fn run_python_verify(secret: &str, input: Value) -> String {
    const DRIVER: &str = r#"
import sys
req = json.load(sys.stdin)
headers, body = req["headers"], req["body"].encode()
if req["mode"] == "verify":
    try:
        print(json.dumps([e["id"] for e in verify(headers, body, now=req.get("now"))]))
    except ValueError as e:
        print("refused:", e)
else:
    handle(headers, body)
    handle(headers, body)
"#;
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(format!("{}\n{DRIVER}", python_verify_snippet()))
        .env("PGDN_WEBHOOK_SECRET", secret)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (it is required by the README tests)");
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, input.to_string().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_readme_python_verifies_what_the_server_sends() {
    let mut rx = Receiver::start().await;
    let sink = WebhookSink::start(WebhookConfig::new([rx.url()], SECRET)).unwrap();
    let events = [event("u0"), event("u1")];
    for e in &events {
        sink.emit(e.clone());
    }
    let genuine = rx.events(2).await;
    assert_eq!(genuine.len(), 1, "one batch");
    sink.emit(event("u2"));
    let other = rx.next().await;
    let r = &genuine[0];
    let body = std::str::from_utf8(&r.body).unwrap();
    let headers = |ts: &str, sig: &str| serde_json::json!({"Pgdn-Timestamp": ts, "Pgdn-Signature": sig, "Content-Type": "application/json"});
    let input = |headers: Value, body: &str, now: Option<u64>| serde_json::json!({"mode": "verify", "headers": headers, "body": body, "now": now});
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();

    let out = run_python_verify(
        SECRET,
        input(headers(&r.timestamp, &r.signature), body, None),
    )
    .await;
    let printed: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(printed, ids);
    // Another request's body under these headers.
    let tampered = std::str::from_utf8(&other.body).unwrap();
    let out = run_python_verify(
        SECRET,
        input(headers(&r.timestamp, &r.signature), tampered, None),
    )
    .await;
    assert_eq!(out.trim(), "refused: bad signature");
    // Another secret.
    let out = run_python_verify(
        "another-secret-of-32-bytes-or-more",
        input(headers(&r.timestamp, &r.signature), body, None),
    )
    .await;
    assert_eq!(out.trim(), "refused: bad signature");
    // Replayed more than 5 minutes later.
    let later = r.timestamp.parse::<u64>().unwrap() + 301;
    let out = run_python_verify(
        SECRET,
        input(headers(&r.timestamp, &r.signature), body, Some(later)),
    )
    .await;
    assert_eq!(out.trim(), "refused: stale timestamp");
    let out = run_python_verify(SECRET, input(headers("", &r.signature), body, None)).await;
    assert_eq!(out.trim(), "refused: no timestamp");
    // `handle` takes a retried delivery's events once.
    let twice = serde_json::json!({
        "mode": "handle", "headers": headers(&r.timestamp, &r.signature), "body": body,
    });
    let out = run_python_verify(SECRET, twice).await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["user.online u0", "user.online u1"]
    );
    sink.shutdown(Duration::from_secs(10)).await;
}

/// Three real nodes on Redis, each with the webhook: the receiver sees
/// `user.online` once for the cluster, nothing for a reload across nodes
/// within the debounce, `user.offline` once after it, for a publish to
/// nobody one `notification.undelivered`; every request is signed, and a
/// 500 is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_send_each_transition_once() {
    use serde_json::json;
    let redis = pgdn_testkit::RedisServer::start();
    let mut receiver = Receiver::start().await;
    // The first request fails: it is retried.
    receiver.answer_next(&[Answer::Status(500)]);
    let hook = receiver.url();
    let args = [
        "--node-ttl",
        "1s",
        "--webhook-url",
        hook.as_str(),
        "--webhook-secret",
        SECRET,
        "--offline-debounce",
        "1s",
    ];
    let nodes: Vec<nodes::Node> = ["w1", "w2", "w3"]
        .iter()
        .map(|id| nodes::Node::launch(&redis.url(), id, &args))
        .collect();
    for n in &nodes {
        n.ready().await;
    }
    let mut events: Vec<Value> = Vec::new();
    let mut failed_once = false;
    let next_events = async |receiver: &mut Receiver, events: &mut Vec<Value>, n: usize| {
        while events.len() < n {
            let r = receiver.next().await;
            r.assert_signed_with(SECRET);
            events.extend(r.events());
        }
    };
    let tab1 = nodes[0].connect("alice", &[], None).await;
    let tab2 = nodes[1].connect("alice", &[], None).await;
    next_events(&mut receiver, &mut events, 1).await;
    // The 500 came first; the same event was sent again.
    let first = events[0]["id"].clone();
    if events.len() == 1 {
        let again = receiver.next().await;
        again.assert_signed_with(SECRET);
        let ids: Vec<Value> = again.events().iter().map(|e| e["id"].clone()).collect();
        failed_once = ids.contains(&first);
        events.extend(again.events().into_iter().filter(|e| e["id"] != first));
    }
    assert!(failed_once, "the event refused with 500 was sent again");
    // A reload across nodes within the debounce: no event.
    drop(tab1);
    drop(tab2);
    nodes[0]
        .wait_stats("alice gone", |s| s["total_connections"] == 0)
        .await;
    let tab3 = nodes[2].connect("alice", &[], None).await;
    // bob's online follows anything the reload could have caused.
    let _bob = nodes[2].connect("bob", &[], None).await;
    next_events(&mut receiver, &mut events, 2).await;
    drop(tab3);
    next_events(&mut receiver, &mut events, 3).await;
    nodes[1]
        .publish(json!({"target":{"user":"nobody"},"type":"invoice","notify_undelivered":true}))
        .await;
    next_events(&mut receiver, &mut events, 4).await;
    let kinds: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["user"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("user.online", "alice"),
            ("user.online", "bob"),
            ("user.offline", "alice"),
            ("notification.undelivered", "nobody"),
        ]
        .map(|(k, u)| (k.to_string(), u.to_string()))
    );
    assert_eq!(events[3]["message_type"], "invoice");
    // Nothing more: a marker's event is the next one.
    let _carol = nodes[0].connect("carol", &[], None).await;
    next_events(&mut receiver, &mut events, 5).await;
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(events[4]["user"], "carol");
}
