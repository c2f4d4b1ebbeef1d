//! The README's Python publisher runs as written: the ```python block
//! after `<!-- readme-test: python-publisher -->` in README.md, run with
//! `python3` against the `pgdn-server` binary, with the URL and key in
//! the environment variables it reads (`PGDN_URL`, `PGDN_PUBLISH_KEY`,
//! `PGDN_TIMEOUT`).
//!
//! - It publishes, and a subscriber receives the message.
//! - A retry after a lost reply re-sends the same id: a proxy the test
//!   controls passes the first request to pgdn but swallows its reply, so
//!   the script times out and tries again; the subscriber gets the message
//!   once.
//! - With a wrong key it fails at once, showing the server's `{"error":...}`.
//!
//! python3 with `requests` is required (`cargo xtask test` installs
//! `python3-requests` when it can).

mod common;
mod spawn;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Client, KEY, SECRET, WAIT};
use pgdn_server::JwtAuthenticator;
use serde_json::{Value, json};
use spawn::{Running, clean_command};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const MARKER: &str = "<!-- readme-test: python-publisher -->";

fn start_server() -> Running {
    let mut cmd = clean_command();
    cmd.args(["--addr", "127.0.0.1:0"])
        .env("PGDN_JWT_SECRET", std::str::from_utf8(SECRET).unwrap())
        .env("PGDN_PUBLISH_KEY", KEY);
    Running::start(cmd)
}

/// The README's Python block after [`MARKER`].
fn python_snippet() -> String {
    let readme = include_str!("../../README.md");
    let after = &readme[readme.find(MARKER).expect("the marker is in README.md")..];
    let start = after
        .find("```python\n")
        .expect("a python block after the marker")
        + 10;
    let len = after[start..].find("\n```").expect("the block ends");
    after[start..start + len].to_string()
}

/// Runs the snippet with `url`, `key` and `timeout` (seconds); its exit
/// status, stdout and stderr.
async fn run_python(url: &str, key: &str, timeout: &str) -> (bool, String, String) {
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(python_snippet())
        .env("PGDN_URL", url)
        .env("PGDN_PUBLISH_KEY", key)
        .env("PGDN_TIMEOUT", timeout)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT * 3, out)
        .await
        .expect("the script ends in time")
        .expect("python3 runs (install python3 and python3-requests)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn subscribe(server: &Running) -> Client {
    let token = JwtAuthenticator::new(SECRET)
        .issue("demo-user", &[], Duration::from_secs(600))
        .unwrap();
    let url = format!("ws://{}/ws?token={token}", server.addr());
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    Client::after_upgrade(ws).await
}

/// Publishes a marker straight to the server: once it arrives, anything
/// published before it (a duplicate) would have arrived first.
async fn publish_marker(server: &Running) -> String {
    let reply: Value = reqwest::Client::new()
        .post(format!("http://{}/api/v1/publish", server.addr()))
        .bearer_auth(KEY)
        .json(&json!({"target": {"user": "demo-user"}, "type": "marker"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_python_snippet_publishes_to_a_subscriber() {
    let server = start_server();
    let mut client = subscribe(&server).await;
    let url = format!("http://{}", server.addr());
    let (ok, stdout, stderr) = run_python(&url, KEY, "10").await;
    assert!(ok, "the script failed:\n{stderr}");
    assert!(stdout.contains("'delivered': 1"), "{stdout}");
    let n = client.next().await;
    assert_eq!(n["type"], "info");
    assert_eq!(n["payload"], json!({"title": "Hello from Python"}));
    assert_eq!(n["user_id"], "demo-user");
    assert!(stdout.contains(n["id"].as_str().unwrap()), "{stdout}");
}

/// A proxy in front of `upstream`: its first connection reaches pgdn but
/// the reply is swallowed (held open, so the client times out); later ones
/// pass through. Counts the connections.
async fn reply_losing_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let mut server = TcpStream::connect(upstream).await.unwrap();
                if first {
                    let (mut from_client, _to_client) = client.split();
                    let (mut from_server, mut to_server) = server.split();
                    let forward = tokio::io::copy(&mut from_client, &mut to_server);
                    let mut swallowed = Vec::new();
                    let swallow = from_server.read_to_end(&mut swallowed);
                    let _ = tokio::join!(forward, swallow);
                } else {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn the_python_snippet_retries_a_lost_reply_with_the_same_id() {
    let server = start_server();
    let mut client = subscribe(&server).await;
    let (proxy, connections) = reply_losing_proxy(server.addr().parse().unwrap()).await;
    // A read timeout of 1 s: the first reply never comes.
    let (ok, stdout, stderr) = run_python(&format!("http://{proxy}"), KEY, "1").await;
    assert!(ok, "the script failed:\n{stderr}");
    assert_eq!(connections.load(Ordering::SeqCst), 2, "one retry");
    // The retry's reply repeats the first one's.
    assert!(stdout.contains("'delivered': 1"), "{stdout}");
    let n = client.next().await;
    assert_eq!(n["payload"], json!({"title": "Hello from Python"}));
    assert!(stdout.contains(n["id"].as_str().unwrap()), "{stdout}");
    // Delivered once: the next message is the marker, not the retry.
    let marker = publish_marker(&server).await;
    assert_eq!(client.next().await["id"], marker.as_str());
}

#[tokio::test]
async fn the_python_snippet_shows_the_servers_error_on_a_4xx() {
    let server = start_server();
    let url = format!("http://{}", server.addr());
    let wrong = "a-wrong-publish-key-of-some-length";
    let expected = reqwest::Client::new()
        .post(format!("{url}/api/v1/publish"))
        .bearer_auth(wrong)
        .json(&json!({"target": {"user": "demo-user"}, "type": "info"}))
        .send()
        .await
        .unwrap();
    assert_eq!(expected.status(), 401);
    let body = expected.text().await.unwrap();
    assert!(body.starts_with(r#"{"error":"#), "{body}");
    let (ok, _, stderr) = run_python(&url, wrong, "10").await;
    assert!(!ok, "a wrong key must fail");
    assert!(
        stderr.contains(&format!("pgdn refused the publish: 401 {body}")),
        "the server's error is shown:\n{stderr}"
    );
}
