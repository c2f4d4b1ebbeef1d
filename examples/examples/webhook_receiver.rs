//! A receiver of pgdn's lifecycle webhooks: checks each request's
//! signature (HMAC-SHA256, compared in constant time), refuses stale
//! timestamps, drops events it has already seen (deliveries are at least
//! once) and prints each new event as one line of JSON.
//!
//! ```text
//! PGDN_WEBHOOK_SECRET=<32+ bytes> cargo run -p pgdn-examples --example webhook_receiver
//! PGDN_WEBHOOK_SECRET=<same> cargo run -p pgdn-server -- --webhook-url http://127.0.0.1:9000/hooks
//! ```
//!
//! `PGDN_RECEIVER_ADDR` sets where it listens (default `127.0.0.1:9000`;
//! port 0 picks a free one). It answers 401 to a request whose signature
//! does not verify or whose `Pgdn-Timestamp` is more than 5 minutes from
//! its clock, 400 to a body that is not `{"events":[...]}`, and 200
//! otherwise, a replay included (its events are not printed again).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Reply};

/// How many event ids are remembered for de-duplication (the oldest are
/// forgotten first; pgdn retries for as long as a receiver fails, so a
/// real receiver keeps them in its database instead).
const REMEMBERED: usize = 100_000;

/// Whether a request is pgdn's: its `Pgdn-Timestamp` is within 5 minutes
/// of `now` (unix seconds), and one `v1=` entry of its `Pgdn-Signature`
/// is the HMAC-SHA256 of `"{timestamp}.{body}"` with `secret`.
pub fn verify(secret: &[u8], timestamp: &str, signature: &str, body: &[u8], now: u64) -> bool {
    match timestamp.parse::<u64>() {
        Ok(ts) if ts.abs_diff(now) <= 300 => {}
        _ => return false, // missing, or stale: a replay
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    signature
        .split(',')
        .filter_map(|entry| from_hex(entry.trim().strip_prefix("v1=")?))
        // `verify_slice` compares in constant time.
        .any(|given| mac.clone().verify_slice(&given).is_ok())
}

/// Hex to bytes.
fn from_hex(hex: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16);
    hex.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(((digit(*hi)? << 4) | digit(*lo)?) as u8),
            _ => None,
        })
        .collect()
}

/// Event ids already printed, the oldest forgotten past [`REMEMBERED`].
#[derive(Default)]
pub struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// True the first time `id` is given.
    pub fn first_time(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_string()) {
            return false;
        }
        self.order.push_back(id.to_string());
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Handles one delivery: the status to answer, and the new events (as
/// JSON lines) to print.
pub fn receive(
    secret: &[u8],
    seen: &Mutex<Seen>,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, Vec<String>) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let (timestamp, signature) = (header("pgdn-timestamp"), header("pgdn-signature"));
    if !verify(secret, timestamp, signature, body, unix_now()) {
        tracing::warn!(
            timestamp,
            "refused a delivery: stale, or not signed with our secret"
        );
        return (StatusCode::UNAUTHORIZED, Vec::new());
    }
    let Ok(serde_json::Value::Object(mut delivery)) = serde_json::from_slice(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let Some(serde_json::Value::Array(events)) = delivery.remove("events") else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let lines = events
        .into_iter()
        .filter(|event| match event["id"].as_str() {
            Some(id) => seen.first_time(id),
            None => false,
        })
        .map(|event| event.to_string())
        .collect();
    (StatusCode::OK, lines)
}

/// The receiver's route: `POST` on any path, bodies up to 1 MiB; each new
/// event is printed on stdout as one line.
pub fn app(
    secret: String,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let secret: Arc<[u8]> = secret.into_bytes().into();
    let seen = Arc::new(Mutex::new(Seen::default()));
    warp::post()
        .and(warp::body::content_length_limit(1024 * 1024))
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .map(move |headers: HeaderMap, body: Bytes| {
            let (status, lines) = receive(&secret, &seen, &headers, &body);
            for line in lines {
                println!("{line}");
            }
            warp::reply::with_status(warp::reply(), status).into_response()
        })
}

#[tokio::main]
async fn main() {
    // Logs on stderr: stdout is the events'.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Ok(secret) = std::env::var("PGDN_WEBHOOK_SECRET") else {
        eprintln!("set PGDN_WEBHOOK_SECRET to the secret pgdn-server signs with");
        std::process::exit(2);
    };
    let addr: SocketAddr = std::env::var("PGDN_RECEIVER_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:9000".into())
        .parse()
        .expect("PGDN_RECEIVER_ADDR is host:port");
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("the address is free");
    let addr = listener.local_addr().expect("a bound address");
    // One parseable line for scripts and tests; events follow, one a line.
    println!("webhook receiver listening on http://{addr}");
    tokio::select! {
        _ = warp::serve(app(secret)).incoming(listener).run() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
