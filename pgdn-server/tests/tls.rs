//! TLS end to end with the real binary and certificates made at test time
//! (pgdn-testkit's `TestCa`, rcgen; no key is committed): `--tls-cert` and
//! `--tls-key` serve `https://` and `wss://` to pgdn-client and to an SSE
//! stream; a peer that never finishes its handshake is cut at the
//! header-read timeout while others are served; and cluster mode runs over
//! a TLS-only `redis-server` (`rediss://`, `--redis-ca-cert`).

use std::process::Command;
use std::time::Duration;

mod spawn;

use futures_util::StreamExt;
use pgdn_client::{Event, Publisher, Subscriber, Subscription};
use pgdn_server::JwtAuthenticator;
use pgdn_testkit::{RedisServer, TestCa};
use serde_json::{Value, json};
use spawn::{Running, clean_command};
use tokio::io::AsyncWriteExt;

const SECRET: &str = "tls-test-secret-of-at-least-32-bytes";
const KEY: &str = "tls-test-publish-key";
const WAIT: Duration = Duration::from_secs(15);

/// A node: the binary with the test credentials, killed when dropped.
type Node = Running;

/// Starts a node with `args` and waits for its `listening on` line.
fn start(args: &[&str]) -> Node {
    Running::start(command(args))
}

/// Starts a node serving TLS with `ca`'s server certificate.
fn start_tls(ca: &TestCa, extra: &[&str]) -> Node {
    let (cert, key) = (ca.cert_path(), ca.key_path());
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    start(&args)
}

/// The binary with the test credentials and `args`, its environment clean
/// of `PGDN_*`.
fn command(args: &[&str]) -> Command {
    let mut cmd = clean_command();
    cmd.args(["--addr", "127.0.0.1:0", "--jwt-secret", SECRET])
        .args(["--publish-key", KEY, "--log", "warn"])
        .args(args);
    cmd
}

fn token(user: &str, groups: &[&str]) -> String {
    JwtAuthenticator::new(SECRET)
        .issue(user, groups, Duration::from_secs(600))
        .unwrap()
}

/// A subscriber at `url` trusting `ca`, once it is connected.
async fn subscribe(url: String, ca: Option<&TestCa>, user: &str, groups: &[&str]) -> Subscription {
    let mut builder = Subscriber::new(url, token(user, groups));
    if let Some(ca) = ca {
        builder = builder.root_certificate(&ca.ca_pem);
    }
    let mut sub = builder.subscribe().expect("a valid subscriber");
    match next_event(&mut sub).await {
        Event::Connected { user_id, .. } => assert_eq!(user_id, user),
        other => panic!("expected Connected, got {other:?}"),
    }
    sub
}

async fn next_event(sub: &mut Subscription) -> Event {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("an event in time")
        .expect("the subscription goes on")
        .expect("no error")
}

/// The next `data:` of an SSE stream, as JSON (skipping comments).
async fn next_sse_data(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
) -> Value {
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                return serde_json::from_str(data).expect("one JSON line");
            }
        }
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("an SSE event in time")
            .expect("the stream goes on")
            .expect("no stream error");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn the_binary_serves_https_wss_and_sse_with_its_certificate() {
    let ca = TestCa::generate();
    let node = start_tls(&ca, &[]);
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);

    // A WebSocket subscriber over wss://, trusting the test CA.
    let mut ws = subscribe(node.ws(), Some(&ca), "tls-user", &[]).await;

    // An SSE stream over https://.
    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let res = https
        .get(format!("{}/sse?token={}", node.url, token("tls-user", &[])))
        .send()
        .await
        .expect("https reaches the server");
    assert_eq!(res.status(), 200);
    let mut sse = Box::pin(res.bytes_stream());
    let mut buf = String::new();
    assert_eq!(
        next_sse_data(&mut sse, &mut buf).await["type"],
        "connection"
    );

    // A publish over https://, trusting the test CA.
    let publisher = Publisher::builder(node.url.clone(), KEY)
        .root_certificate(&ca.ca_pem)
        .build()
        .unwrap();
    let receipt = publisher
        .notify_user("tls-user", "info", json!({"title": "over tls"}))
        .await
        .expect("the publish goes through");
    assert_eq!(receipt.delivered, Some(2), "{receipt:?}");

    let Event::Notification(n) = next_event(&mut ws).await else {
        panic!("expected the notification");
    };
    assert_eq!(
        (n.id.as_str(), n.payload["title"].as_str()),
        (receipt.id.as_str(), Some("over tls"))
    );
    let over_sse = next_sse_data(&mut sse, &mut buf).await;
    assert_eq!(over_sse["id"], receipt.id.as_str(), "{over_sse}");

    // Without the CA the server's certificate is not trusted.
    let untrusting = Publisher::builder(node.url.clone(), KEY)
        .retry_deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(untrusting.stats().await.is_err());
    // And plain HTTP on the TLS port is not served.
    let plain = reqwest::get(format!("http://{}/healthz", node.addr())).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_at_the_header_timeout_and_blocks_no_one() {
    let ca = TestCa::generate();
    let node = start_tls(&ca, &["--header-read-timeout", "4s"]);
    // One peer opens TCP and sends nothing; another starts a TLS record
    // (a handshake header announcing 512 bytes) and stops there.
    let mut silent = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let opened = tokio::time::Instant::now();

    // Meanwhile another client is served, long before the timeout.
    let publisher = Publisher::builder(node.url.clone(), KEY)
        .root_certificate(&ca.ca_pem)
        .build()
        .unwrap();
    let stats = publisher
        .stats()
        .await
        .expect("served while the others stall");
    assert_eq!(stats.total_connections, 0);
    let mut probe = [0u8; 1];
    for peer in [&silent, &partial] {
        let still_open = matches!(peer.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(
            still_open,
            "the stalled peers are still open when the other client is served"
        );
    }

    // Then both are cut: EOF (or a reset), at the header-read timeout.
    for peer in [&mut silent, &mut partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(peer, &mut buf))
            .await
            .expect("the stalled peer is cut");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(3),
        "cut by the 4 s header timeout, not earlier: {:?}",
        opened.elapsed()
    );
}

#[tokio::test]
async fn cluster_mode_over_rediss_delivers_across_nodes() {
    let ca = TestCa::generate();
    let redis = RedisServer::start_tls(&ca);
    assert!(redis.url().starts_with("rediss://"));
    let (url, ca_file) = (redis.url(), ca.ca_path());
    let node = |id| {
        let ca_file = ca_file.to_str().unwrap();
        start(&[
            "--redis-url",
            &url,
            "--redis-ca-cert",
            ca_file,
            "--node-id",
            id,
        ])
    };
    let (a, b) = (node("tls-a"), node("tls-b"));

    let mut sub = subscribe(a.ws(), None, "u-a", &["tls-group"]).await;
    let publisher = Publisher::new(b.url.clone(), KEY).unwrap();
    let receipt = publisher
        .notify_group("tls-group", "info", json!({"title": "across rediss"}))
        .await
        .expect("node b publishes through redis");
    let Event::Notification(n) = next_event(&mut sub).await else {
        panic!("expected the notification");
    };
    assert_eq!(n.id.as_str(), receipt.id.as_str());
    assert_eq!(n.payload["title"], "across rediss");

    // Without the CA the node cannot trust Redis: it serves, is not ready,
    // and says why (it keeps retrying: the CA may be fixed by a restart of
    // Redis with another certificate, not of every node).
    let mut child = command(&["--redis-url", &redis.url(), "--node-id", "tls-c"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let addr = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("pgdn-server listening on http://")
                .map(String::from)
        })
        .expect("the node listens");
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("redis unreachable"));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("redis is unreachable"), "{err}");
}

#[test]
fn half_a_tls_configuration_or_an_unreadable_file_stops_the_start() {
    let ca = TestCa::generate();
    let cert = ca.cert_path();
    let out = command(&["--tls-cert", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key (PGDN_TLS_KEY) is not"), "{err}");

    let out = command(&[])
        .env("PGDN_TLS_KEY", ca.key_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert (PGDN_TLS_CERT) is not"), "{err}");

    let out = command(&["--tls-cert", "/nonexistent/cert.pem"])
        .env("PGDN_TLS_KEY", ca.key_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the certificate /nonexistent/cert.pem"),
        "{err}"
    );

    // A key file that holds a certificate instead.
    let out = command(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        cert.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no usable private key"), "{err}");
}
