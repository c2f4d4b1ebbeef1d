//! The shipped nginx configuration (`deploy/nginx/pgdn.conf`) really
//! proxies pgdn: the `pgdn-server` binary, started with the flags
//! deploy/README.md asks for, behind an nginx that runs that very file
//! (pgdn-testkit's [`Nginx`]: only ports, upstream address, certificate
//! and log paths substituted), reached over TLS with the test's CA.
//!
//! Through nginx: a WebSocket subscriber (with its page's `Origin`, which
//! pgdn must see as its own) gets its `connection` frame and a message
//! published through nginx's API location; an SSE stream gets a message
//! while it stays open; pgdn sees each client's own address (the clients
//! connect from 127.0.0.2 and 127.0.0.3; nginx reaches pgdn from
//! 127.0.0.1, a trusted proxy, and `--max-connections-per-ip 1` refuses
//! only the second connection of one client); health, readiness, the
//! browser client and the metrics (this host only) answer; the access
//! log never holds a token.
//!
//! nginx is required: the test fails, naming the install command, when
//! it is missing (`cargo xtask test` installs it when it can).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod spawn;

use futures_util::{SinkExt, StreamExt};
use pgdn_server::JwtAuthenticator;
use pgdn_testkit::Nginx;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use spawn::{Running, clean_command};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The file under test, as shipped.
const SITE: &str = include_str!("../../deploy/nginx/pgdn.conf");
const SECRET: &str = "nginx-test-secret-of-at-least-32-bytes";
const KEY: &str = "nginx-test-publish-key";
/// Upper bound for any wait; only reached when something is broken.
const WAIT: Duration = Duration::from_secs(10);

/// Starts `pgdn-server` on a free port with the flags that must match the
/// nginx file, and reads its address from its first line (an event).
fn start_server() -> Running {
    let mut cmd = clean_command();
    cmd.args(["--addr", "127.0.0.1:0", "--trusted-proxies", "127.0.0.1"])
        .args(["--max-connections-per-ip", "1", "--demo-page", "false"])
        .env("PGDN_JWT_SECRET", SECRET)
        .env("PGDN_PUBLISH_KEY", KEY);
    Running::start(cmd)
}

fn token(user: &str) -> String {
    JwtAuthenticator::new(SECRET.as_bytes())
        .issue(user, &["g"], Duration::from_secs(600))
        .unwrap()
}

/// A TLS client configuration that trusts the test CA only.
fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("the CA certificate"))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// An HTTPS client that trusts the test CA only and connects from `from`.
fn https_client(nginx: &Nginx, from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(nginx.ca_pem().as_bytes()).unwrap())
        .local_address(IpAddr::from(from))
        .no_proxy()
        .build()
        .unwrap()
}

/// Opens `wss://localhost:<port>/ws?token=...` through nginx from the
/// local address `from`, as a page of nginx's own origin would.
async fn websocket(
    nginx: &Nginx,
    from: [u8; 4],
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], nginx.https_port())))
        .await
        .expect("connect to nginx");
    let tls = tokio_rustls::TlsConnector::from(tls_config(nginx.ca_pem()))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with nginx, verified by the test CA");
    let url = format!("wss://localhost:{}/ws?token={token}", nginx.https_port());
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", nginx.https_origin().parse().unwrap());
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, tls))
        .await
        .expect("upgrade in time")
        .expect("nginx passes the upgrade on and pgdn accepts it");
    assert_eq!(response.status(), 101);
    ws
}

/// The next text frame, as JSON (answering nothing: pgdn's pings are
/// answered by tungstenite on the next read).
async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket stays open")
            .expect("a frame");
        if let Message::Text(text) = msg {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// The next `data:` of an SSE stream, as JSON; `buf` keeps what was read
/// past it.
async fn next_event(res: &mut reqwest::Response, buf: &mut String) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if !data.is_empty() {
                return serde_json::from_str(&data.join("\n")).unwrap();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, res.chunk())
            .await
            .expect("an event in time: nginx must not buffer the stream")
            .expect("the stream stays open")
            .expect("the stream is not over");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

/// Publishes to `user` through nginx; returns the message id.
async fn publish(http: &reqwest::Client, nginx: &Nginx, user: &str, n: u64) -> String {
    let res = http
        .post(format!("{}/api/v1/publish", nginx.https_origin()))
        .bearer_auth(KEY)
        .json(&json!({"target": {"user": user}, "type": "info", "payload": {"n": n}}))
        .timeout(WAIT)
        .send()
        .await
        .expect("publish through nginx");
    assert_eq!(res.status(), 200);
    let reply: Value = res.json().await.unwrap();
    assert_eq!(reply["delivered"], 1, "{reply}");
    reply["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn websocket_and_sse_through_the_shipped_nginx_configuration() {
    let server = start_server();
    let nginx = Nginx::start(SITE, server.addr().parse().unwrap());
    let ws_token = token("ws-user");
    let sse_token = token("sse-user");
    let from_a = https_client(&nginx, [127, 0, 0, 2]);
    let from_b = https_client(&nginx, [127, 0, 0, 3]);
    let local = https_client(&nginx, [127, 0, 0, 1]);

    // A WebSocket from 127.0.0.2, over TLS, with its page's origin.
    let mut ws = websocket(&nginx, [127, 0, 0, 2], &ws_token).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "connection", "{hello}");
    assert_eq!(hello["user_id"], "ws-user");
    let id = publish(&from_b, &nginx, "ws-user", 1).await;
    let got = next_json(&mut ws).await;
    assert_eq!(
        (got["id"].as_str(), &got["payload"]),
        (Some(id.as_str()), &json!({"n": 1}))
    );
    // The socket is live both ways through nginx.
    ws.send(Message::text(r#"{"type":"ping","timestamp":5}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "pong", "timestamp": 5})
    );

    // An SSE stream from 127.0.0.3: pgdn sees another client, so the
    // per-address limit of 1 lets it in.
    let mut sse = from_b
        .get(format!("{}/sse?token={sse_token}", nginx.https_origin()))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    let hello = next_event(&mut sse, &mut buf).await;
    assert_eq!(
        (&hello["type"], &hello["user_id"]),
        (&json!("connection"), &json!("sse-user"))
    );
    // A message published now arrives while the stream stays open.
    let published = Instant::now();
    let id = publish(&from_a, &nginx, "sse-user", 2).await;
    let got = next_event(&mut sse, &mut buf).await;
    assert_eq!(got["id"], id.as_str());
    let latency = published.elapsed();
    assert!(latency < Duration::from_secs(2), "took {latency:?}");

    // A second connection from 127.0.0.2 is refused: pgdn read that
    // client's address from X-Forwarded-For (nginx itself, 127.0.0.1, is
    // trusted). Had it taken nginx's address for everyone, the stream
    // above would have been refused already.
    let refused = from_a
        .get(format!("{}/sse?token={sse_token}", nginx.https_origin()))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.json::<Value>().await.unwrap(),
        json!({"error": "too many connections from this address"})
    );

    // Health, readiness, the browser client; the metrics for this host
    // only; nothing else (the demo page is not proxied).
    let get = |client: &reqwest::Client, path: &str| {
        client
            .get(format!("{}{path}", nginx.https_origin()))
            .timeout(WAIT)
            .send()
    };
    let text = |r: reqwest::Response| async move { (r.status().as_u16(), r.text().await.unwrap()) };
    assert_eq!(
        text(get(&from_a, "/healthz").await.unwrap()).await,
        (200, "ok".into())
    );
    assert_eq!(text(get(&from_a, "/readyz").await.unwrap()).await.0, 200);
    assert_eq!(get(&from_a, "/pgdn.js").await.unwrap().status(), 200);
    assert_eq!(get(&from_a, "/metrics").await.unwrap().status(), 403);
    let (status, metrics) = text(get(&local, "/metrics").await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("pgdn_"), "{metrics}");
    assert_eq!(get(&from_a, "/").await.unwrap().status(), 404);

    // The access log names the paths but never a token: wait for the
    // WebSocket's and the stream's lines (written when they end).
    drop(ws);
    drop(sse);
    let deadline = Instant::now() + WAIT;
    let log = loop {
        let log = nginx.access_log();
        if log.contains("GET /ws ") && log.matches("GET /sse ").count() == 2 {
            break log;
        }
        assert!(Instant::now() < deadline, "access log:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        log.contains("127.0.0.2 ") && log.contains("127.0.0.3 "),
        "{log}"
    );
    for secret in [&ws_token, &sse_token, "token="] {
        assert!(!log.contains(secret), "a token in the access log:\n{log}");
    }
}
