//! Public-key JWTs on the wire: RS256 and ES256 tokens verified with a PEM
//! public key or the keys of a JWKS URL served by a local HTTP server, in
//! process and through the `pgdn-server` binary's flags. Keys are
//! generated at test time; no private key is committed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgdn_server::jwks::HttpJwks;
use pgdn_server::jwt::JwksKeys;
use pgdn_server::{AuthRequest, Authenticator, JwtAuthenticator, Pgdn};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const BIN: &str = env!("CARGO_BIN_EXE_pgdn-server");
const PUBLISH_KEY: &str = "publish-key-for-jwt-key-tests";
const WAIT: Duration = Duration::from_secs(20);

// ---- keys and tokens -------------------------------------------------

/// The `n`-th RSA key (2048 bits) of this test binary.
fn rsa_key(n: usize) -> &'static rsa::RsaPrivateKey {
    static KEYS: [OnceLock<rsa::RsaPrivateKey>; 2] = [OnceLock::new(), OnceLock::new()];
    KEYS[n].get_or_init(|| rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
}

fn rsa_public_pem(key: &rsa::RsaPrivateKey) -> String {
    key.to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap()
}

fn rsa_jwk(key: &rsa::RsaPrivateKey, kid: &str) -> Value {
    json!({
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
        "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be()),
    })
}

fn ec_jwk(key: &p256::SecretKey, kid: &str) -> Value {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let point = key.public_key().to_encoded_point(false);
    json!({"kty": "EC", "crv": "P-256", "kid": kid,
           "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "groups": ["staff"], "exp": now() + 600, "iat": now(),
           "iss": "https://idp.test", "aud": "pgdn"})
}

fn rs256(key: &rsa::RsaPrivateKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    let der = key.to_pkcs1_der().unwrap();
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_der(der.as_bytes())).unwrap()
}

fn es256(key: &p256::SecretKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_string);
    let der = key.to_pkcs8_der().unwrap();
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(der.as_bytes())).unwrap()
}

fn b64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..chunk.len() + 1 {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// ---- a local JWKS server ------------------------------------------------

/// Answers every request with the current document (or a status), on
/// port 0, and counts the requests.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<(u16, String)>>,
    requests: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new((200, json!({ "keys": keys }).to_string())));
        let requests = Arc::new(AtomicUsize::new(0));
        let (d, r) = (doc.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (doc, requests) = (d.clone(), r.clone());
                tokio::spawn(async move {
                    // One request per connection: read its head, answer, close.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = doc.lock().unwrap().clone();
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        JwksServer {
            addr,
            doc,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn serve(&self, keys: Vec<Value>) {
        *self.doc.lock().unwrap() = (200, json!({ "keys": keys }).to_string());
    }

    fn fail(&self) {
        *self.doc.lock().unwrap() = (503, "{}".into());
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn check(auth: &JwtAuthenticator, token: &str) -> Result<String, String> {
    auth.authenticate(&AuthRequest::token(token))
        .await
        .map(|id| id.user_id.to_string())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn jwks_over_http_is_cached_and_refetched_on_an_unknown_kid_at_most_once_per_interval() {
    let interval = Duration::from_secs(2);
    let server = JwksServer::start(vec![rsa_jwk(rsa_key(0), "k1")]).await;
    let keys = JwksKeys::new(HttpJwks::new(&server.url()).unwrap()).min_refresh_interval(interval);
    let auth = JwtAuthenticator::jwks(keys.clone())
        .issuer("https://idp.test")
        .audience("pgdn");
    let k1 = rs256(rsa_key(0), Some("k1"), &claims("u1"));
    assert_eq!(server.requests(), 0);

    // First token: one fetch. Same kid again: cached.
    assert_eq!(check(&auth, &k1).await, Ok("u1".into()));
    assert_eq!(server.requests(), 1);
    assert_eq!(check(&auth, &k1).await, Ok("u1".into()));
    assert_eq!(server.requests(), 1, "same kid: no fetch");

    // The provider rotates to k2 (RSA) and e1 (P-256).
    let ec = p256::SecretKey::random(&mut OsRng);
    server.serve(vec![rsa_jwk(rsa_key(1), "k2"), ec_jwk(&ec, "e1")]);
    let k2 = rs256(rsa_key(1), Some("k2"), &claims("u2"));
    let spray: Vec<String> = (0..100)
        .map(|i| rs256(rsa_key(1), Some(&format!("random-{i}")), &claims("u3")))
        .collect();
    tokio::time::sleep(interval).await;
    // Unknown kid: refetched once, the rotated key is accepted.
    assert_eq!(check(&auth, &k2).await, Ok("u2".into()));
    assert_eq!(server.requests(), 2, "unknown kid: one refetch");
    assert_eq!(
        check(&auth, &es256(&ec, Some("e1"), &claims("u4"))).await,
        Ok("u4".into())
    );
    // The removed key is refused.
    assert_eq!(
        check(&auth, &k1).await,
        Err("invalid token: unknown key".into())
    );
    // A spray of random kids right after a fetch: no fetch at all.
    for token in &spray {
        assert_eq!(
            check(&auth, token).await,
            Err("invalid token: unknown key".into())
        );
    }
    assert_eq!(server.requests(), 2, "100 random kids within the interval");
    assert_eq!(keys.fetch_count(), 2);

    // Past the interval, a spray costs at most one fetch more.
    tokio::time::sleep(interval).await;
    for token in &spray {
        assert!(check(&auth, token).await.is_err());
    }
    assert_eq!(server.requests(), 3, "one fetch per interval");

    // The provider fails: the keys known so far keep working.
    server.fail();
    tokio::time::sleep(interval).await;
    assert!(check(&auth, &spray[0]).await.is_err());
    assert_eq!(server.requests(), 4);
    assert_eq!(check(&auth, &k2).await, Ok("u2".into()));
}

#[tokio::test]
async fn a_jwks_fetch_that_fails_is_reported_at_refresh() {
    let server = JwksServer::start(vec![]).await;
    let keys = JwksKeys::new(HttpJwks::new(&server.url()).unwrap());
    let err = keys.refresh().await.unwrap_err();
    assert!(err.contains("no usable key"), "{err}");
    server.fail();
    let err = keys.refresh().await.unwrap_err();
    assert!(err.contains("503"), "{err}");
    server.serve(vec![rsa_jwk(rsa_key(0), "k1")]);
    assert_eq!(keys.refresh().await, Ok(1));
    // Nothing listens there any more.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", closed.local_addr().unwrap());
    drop(closed);
    assert!(
        JwksKeys::new(HttpJwks::new(&url).unwrap())
            .refresh()
            .await
            .is_err()
    );
}

// ---- on the wire --------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: SocketAddr, token: &str) -> Ws {
    let url = format!("ws://{addr}/ws?token={token}");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connects in time")
        .expect("upgrade accepted");
    ws
}

/// The first message: the `connection` frame, or the close frame.
async fn first(ws: &mut Ws) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a frame in time")
        .expect("a frame")
        .expect("a readable frame")
}

async fn assert_connected(addr: SocketAddr, token: &str, user: &str) {
    let mut ws = open(addr, token).await;
    match first(&mut ws).await {
        Message::Text(text) => {
            let frame: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(frame["type"], "connection", "{frame}");
            assert_eq!(frame["user_id"], user, "{frame}");
        }
        other => panic!("expected the connection frame, got {other:?}"),
    }
}

async fn assert_refused(addr: SocketAddr, token: &str) {
    let mut ws = open(addr, token).await;
    match first(&mut ws).await {
        Message::Close(Some(close)) => {
            assert_eq!(close.code, CloseCode::Policy);
            assert_eq!(close.reason.as_str(), "invalid token");
        }
        other => panic!("expected a 1008 close, got {other:?}"),
    }
}

#[tokio::test]
async fn an_rs256_token_connects_to_an_in_process_server_with_a_pem_key() {
    let pem = rsa_public_pem(rsa_key(0));
    let pgdn = Pgdn::builder()
        .authenticator(JwtAuthenticator::rs256_pem(&pem).unwrap())
        .publish_key(PUBLISH_KEY)
        .build()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        pgdn.serve(listener, async {
            let _ = stopped.await;
        })
        .await
    });

    assert_connected(addr, &rs256(rsa_key(0), None, &claims("u1")), "u1").await;
    // Another key, and HS256 signed with the public key as secret.
    assert_refused(addr, &rs256(rsa_key(1), None, &claims("u1"))).await;
    let confused = JwtAuthenticator::new(pem.as_bytes())
        .encode(&claims("u1"))
        .unwrap();
    assert_refused(addr, &confused).await;

    let _ = stop.send(());
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
}

// ---- the binary -----------------------------------------------------------

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("PGDN_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["--addr", "127.0.0.1:0", "--log", "warn"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Starts the binary and reads its address from the listening line.
fn start(args: &[&str]) -> (Running, SocketAddr) {
    let mut child = command(args).spawn().expect("binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let running = Running(child);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "stdout ended before the listening line"
        );
        if let Some(addr) = line.trim().strip_prefix("pgdn-server listening on http://") {
            let addr = addr.parse().unwrap();
            std::thread::spawn(move || for _ in stdout.lines() {});
            return (running, addr);
        }
    }
}

/// Runs the binary to its exit; returns its stderr.
fn refused_at_start(args: &[&str]) -> String {
    let out = command(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pem_file(pem: &str) -> tempfile_path::TempPath {
    tempfile_path::write(pem)
}

/// A file that is removed when dropped.
mod tempfile_path {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct TempPath(pub PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub fn write(contents: &str) -> TempPath {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "pgdn-jwt-test-{}-{}.pem",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).unwrap();
        TempPath(path)
    }
}

#[tokio::test]
async fn the_binary_verifies_rs256_with_a_public_key_file() {
    let pem = pem_file(&rsa_public_pem(rsa_key(0)));
    let path = pem.0.to_str().unwrap();
    let (_server, addr) = start(&[
        "--jwt-public-key-file",
        path,
        "--publish-key",
        PUBLISH_KEY,
        "--jwt-issuer",
        "https://idp.test",
        "--jwt-audience",
        "pgdn",
        "--jwt-max-lifetime",
        "1h",
    ]);
    assert_connected(addr, &rs256(rsa_key(0), None, &claims("u1")), "u1").await;
    // The flags' rules hold: wrong audience, too long a lifetime.
    let mut other_aud = claims("u1");
    other_aud["aud"] = "billing".into();
    assert_refused(addr, &rs256(rsa_key(0), None, &other_aud)).await;
    let mut long = claims("u1");
    long["exp"] = (now() + 7200).into();
    assert_refused(addr, &rs256(rsa_key(0), None, &long)).await;
    // HS256 signed with the public key file's bytes.
    let confused = JwtAuthenticator::new(rsa_public_pem(rsa_key(0)).as_bytes())
        .encode(&claims("u1"))
        .unwrap();
    assert_refused(addr, &confused).await;
}

// Multi-threaded: the JWKS server answers the binary's fetch at start
// while this test blocks reading the binary's stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_verifies_es256_and_rs256_with_a_jwks_url() {
    let ec = p256::SecretKey::random(&mut OsRng);
    let jwks = JwksServer::start(vec![rsa_jwk(rsa_key(0), "k1"), ec_jwk(&ec, "e1")]).await;
    let url = jwks.url();
    let (_server, addr) = start(&["--jwks-url", &url, "--publish-key", PUBLISH_KEY]);
    // Fetched once at start, to find a wrong URL early.
    assert_eq!(jwks.requests(), 1);
    assert_connected(addr, &es256(&ec, Some("e1"), &claims("u1")), "u1").await;
    assert_connected(addr, &rs256(rsa_key(0), Some("k1"), &claims("u2")), "u2").await;
    assert_refused(addr, &rs256(rsa_key(1), Some("k1"), &claims("u1"))).await;
    assert_refused(addr, &rs256(rsa_key(1), Some("nope"), &claims("u1"))).await;
    assert_eq!(
        jwks.requests(),
        1,
        "the unknown kid is within 30 s of the fetch"
    );
}

#[test]
fn the_binary_takes_exactly_one_key_source() {
    let pem = pem_file(&rsa_public_pem(rsa_key(0)));
    let path = pem.0.to_str().unwrap();
    let secret = "a-jwt-secret-of-at-least-32-bytes-long";
    for args in [
        vec!["--jwt-public-key-file", path, "--jwt-secret", secret],
        vec![
            "--jwks-url",
            "https://idp.test/jwks",
            "--jwt-secret",
            secret,
        ],
        vec![
            "--jwks-url",
            "https://idp.test/jwks",
            "--jwt-public-key-file",
            path,
        ],
    ] {
        let mut args = args;
        args.extend(["--publish-key", PUBLISH_KEY]);
        let stderr = refused_at_start(&args);
        assert!(stderr.contains("cannot be used with"), "{args:?}: {stderr}");
    }
    // A public key without a publish key is half a configuration.
    let stderr = refused_at_start(&["--jwt-public-key-file", path]);
    assert!(stderr.contains("--publish-key"), "{stderr}");
    // Not a public key.
    let private = rsa_key(0).to_pkcs8_pem(LineEnding::LF).unwrap();
    let private = pem_file(&private);
    let stderr = refused_at_start(&[
        "--jwt-public-key-file",
        private.0.to_str().unwrap(),
        "--publish-key",
        PUBLISH_KEY,
    ]);
    assert!(stderr.contains("private key"), "{stderr}");
    assert!(!stderr.contains("BEGIN"), "the key is not echoed: {stderr}");
    // Plain http to another host.
    let stderr = refused_at_start(&[
        "--jwks-url",
        "http://idp.test/jwks",
        "--publish-key",
        PUBLISH_KEY,
    ]);
    assert!(stderr.contains("https"), "{stderr}");
}
