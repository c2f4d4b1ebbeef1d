//! The bench's client side, the same for pgdn and the baseline: N
//! WebSocket subscribers that time every notification they receive, and an
//! HTTP publisher. (The Server-Sent Events subscribers are in `sse.rs` and
//! report into the same [`Recorder`].)
//!
//! Every published payload carries the phase it belongs to (`"p"`) and the
//! time it was sent (`"t"`, nanoseconds since [`now_ns`]'s epoch, which the
//! publisher and the subscribers share because they live in this one
//! process). A subscriber finds both with a substring search instead of a
//! JSON parse, to keep the client's own cost per delivery small.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Phases a [`Recorder`] can tell apart (the `"p"` of a payload).
pub(crate) const PHASES: usize = 64;

/// Handshakes in flight at once while connecting the subscribers.
const CONNECT_CONCURRENCY: usize = 64;

/// Nanoseconds since the first call in this process: the clock of the
/// `"t"` a publisher puts in a payload and of its receipt.
pub(crate) fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A latency histogram with relative precision of about 1.5 % (64
/// sub-buckets per power of two), filled concurrently by every subscriber.
pub(crate) struct Histogram {
    buckets: Vec<AtomicU64>,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    /// An empty histogram.
    pub(crate) fn new() -> Self {
        let n = ((64 - SUB_BITS as usize) + 1) << SUB_BITS;
        Histogram {
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let sub = (v >> shift) & (SUB - 1);
        ((((shift as u64) + 1) << SUB_BITS) | sub) as usize
    }

    /// The middle of the values bucket `i` holds.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = (i >> SUB_BITS) - 1;
        let low = (SUB + (i & (SUB - 1))) << shift;
        low + ((1u64 << shift) >> 1)
    }

    /// Records one value.
    pub(crate) fn record(&self, v: u64) {
        self.buckets[Self::index(v)].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds every value recorded in `other`.
    fn add(&self, other: &Histogram) {
        for (a, b) in self.buckets.iter().zip(&other.buckets) {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// How many values were recorded.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) of the recorded values; 0 when empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(self.buckets.len() - 1)
    }
}

/// What every subscriber of one run reports into: deliveries and latency
/// per phase, and connections that ended. Subscribers may be told apart by
/// a slot (e.g. the cluster node they are connected to): deliveries and
/// latency are also kept per phase and slot.
pub(crate) struct Recorder {
    /// Deliveries per phase, every slot together.
    counts: Vec<AtomicU64>,
    /// Slots a subscriber may report under.
    slots: usize,
    /// Deliveries per phase and slot, at `phase * slots + slot`.
    slot_counts: Vec<AtomicU64>,
    /// Latency per phase and slot, at `phase * slots + slot`.
    hists: Vec<Histogram>,
    /// The count at which the waiter in [`Recorder::wait_for`] wants waking.
    wake_at: AtomicU64,
    wake: Notify,
    /// Connections the server closed with a close frame (e.g. 1013).
    closed: AtomicU64,
    /// Connections that failed or ended without a close frame.
    errors: AtomicU64,
}

/// `"key":<digits>` in `s`, as a number; `None` when there is no `key`
/// or no digits follow it (`null`). A plain byte scan: cheaper than
/// `str::find`'s searcher on frames of a few hundred bytes, and no JSON
/// parse. Every bench client reads frames and answers with it.
pub(crate) fn number_after(s: &[u8], key: &[u8]) -> Option<u64> {
    let start = s.windows(key.len()).position(|w| w == key)? + key.len();
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in &s[start..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

impl Recorder {
    /// A recorder with one slot and every count at zero.
    pub(crate) fn new() -> Arc<Self> {
        Self::with_slots(1)
    }

    /// A recorder with `slots` slots (at least 1) and every count at zero.
    pub(crate) fn with_slots(slots: usize) -> Arc<Self> {
        let slots = slots.max(1);
        Arc::new(Recorder {
            counts: (0..PHASES).map(|_| AtomicU64::new(0)).collect(),
            slots,
            slot_counts: (0..PHASES * slots).map(|_| AtomicU64::new(0)).collect(),
            hists: (0..PHASES * slots).map(|_| Histogram::new()).collect(),
            wake_at: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
            closed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// Records one text frame received by a subscriber in `slot` (ignored
    /// unless it is a bench notification).
    pub(crate) fn on_text(&self, s: &str, slot: usize) {
        let s = s.as_bytes();
        let (Some(phase), Some(sent)) = (number_after(s, b"\"p\":"), number_after(s, b"\"t\":"))
        else {
            return;
        };
        let Some(count) = self.counts.get(phase as usize) else {
            return;
        };
        let at = phase as usize * self.slots + slot.min(self.slots - 1);
        self.hists[at].record(now_ns().saturating_sub(sent));
        self.slot_counts[at].fetch_add(1, Ordering::Relaxed);
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.wake_at.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Records a connection closed by the server (a close frame or event).
    pub(crate) fn on_closed(&self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }

    /// Records a connection that failed or ended without a close.
    pub(crate) fn on_failed(&self) {
        self.errors.fetch_add(1, Ordering::SeqCst);
    }

    /// Deliveries received in `phase`.
    pub(crate) fn count(&self, phase: usize) -> u64 {
        self.counts[phase].load(Ordering::SeqCst)
    }

    /// Checks that each `(phase, deliveries)` of `expected` got exactly that
    /// many (a duplicate shows as one too many); each miss goes into
    /// `errors`.
    pub(crate) fn check_exact(
        &self,
        expected: impl IntoIterator<Item = (usize, u64)>,
        errors: &mut Vec<String>,
    ) {
        for (phase, want) in expected {
            let got = self.count(phase);
            if got != want {
                errors.push(format!(
                    "phase {phase}: {got} deliveries, expected exactly {want}"
                ));
            }
        }
    }

    /// Deliveries received in `phase` by the subscribers in `slot`.
    pub(crate) fn slot_count(&self, phase: usize, slot: usize) -> u64 {
        self.slot_counts[phase * self.slots + slot].load(Ordering::Relaxed)
    }

    /// The latency histogram of `phase`, every slot together, in
    /// nanoseconds.
    pub(crate) fn histogram(&self, phase: usize) -> Histogram {
        self.slot_histogram(phase, 0..self.slots)
    }

    /// The latency histogram of `phase` for the subscribers in `slots`, in
    /// nanoseconds.
    pub(crate) fn slot_histogram(&self, phase: usize, slots: std::ops::Range<usize>) -> Histogram {
        let h = Histogram::new();
        for slot in slots.filter(|&s| s < self.slots) {
            h.add(&self.hists[phase * self.slots + slot]);
        }
        h
    }

    /// Connections that ended so far (closed by the server or failed).
    pub(crate) fn ended(&self) -> (u64, u64) {
        (
            self.closed.load(Ordering::SeqCst),
            self.errors.load(Ordering::SeqCst),
        )
    }

    /// Waits until `phase` has `target` deliveries. Fails at `deadline`, or
    /// as soon as a connection ends (its deliveries would never come).
    pub(crate) async fn wait_for(
        &self,
        phase: usize,
        target: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        let ended_before = self.ended();
        loop {
            let notified = self.wake.notified();
            self.wake_at.store(target, Ordering::SeqCst);
            let have = self.count(phase);
            if have >= target {
                self.wake_at.store(u64::MAX, Ordering::SeqCst);
                return Ok(());
            }
            let ended = self.ended();
            if ended != ended_before {
                return Err(format!(
                    "connections ended during the phase (closed by the server: {}, failed: {}); \
                     {have} of {target} deliveries arrived",
                    ended.0 - ended_before.0,
                    ended.1 - ended_before.1
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out: {have} of {target} deliveries arrived"));
            }
            let _ =
                tokio::time::timeout((deadline - now).min(Duration::from_millis(200)), notified)
                    .await;
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Reads one subscriber's frames until the connection ends, reporting
/// them under `slot`.
async fn subscriber(mut ws: Ws, rec: Arc<Recorder>, slot: usize) {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) => rec.on_text(t.as_str(), slot),
            Ok(Message::Close(_)) => {
                rec.on_closed();
                return;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    rec.on_failed();
}

async fn connect_one(url: String, expect_hello: bool) -> Result<Ws, String> {
    // The subscribers' own read buffer; the same for both servers.
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let mut last_error = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        let attempt = async {
            let (mut ws, _) =
                tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
            if expect_hello {
                match ws.next().await {
                    Some(Ok(Message::Text(t)))
                        if t.as_str().contains("\"type\":\"connection\"") => {}
                    other => return Err(format!("expected the connection frame, got {other:?}")),
                }
            }
            Ok(ws)
        };
        match tokio::time::timeout(Duration::from_secs(20), attempt).await {
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "handshake timed out".into(),
        }
    }
    Err(last_error)
}

/// Connects one subscriber per URL (a few at a time) and starts a task
/// reading each into `rec`, under the slot paired with its URL. With
/// `expect_hello`, a subscriber counts as connected once it has its
/// `{"type":"connection"}` frame.
pub(crate) async fn connect_all(
    urls: Vec<(String, usize)>,
    expect_hello: bool,
    rec: &Arc<Recorder>,
    tasks: &mut JoinSet<()>,
) -> Result<(), String> {
    let mut pending =
        futures_util::stream::iter(urls)
            .map(|(url, slot)| async move {
                Ok::<_, String>((connect_one(url, expect_hello).await?, slot))
            })
            .buffer_unordered(CONNECT_CONCURRENCY);
    while let Some(connected) = pending.next().await {
        let (ws, slot) = connected?;
        tasks.spawn(subscriber(ws, rec.clone(), slot));
    }
    Ok(())
}

/// Publishes bench notifications over HTTP, the same JSON body for both
/// servers (docs/protocol.md section 5).
pub(crate) struct Publisher {
    http: reqwest::Client,
    url: String,
    authorization: Option<String>,
    padding: String,
}

impl Publisher {
    /// A publisher posting to `url`, with `Authorization: <authorization>`
    /// when given, and `padding` bytes of filler in every payload.
    pub(crate) fn new(url: String, authorization: Option<String>, padding: usize) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a plain HTTP client builds");
        Publisher {
            http,
            url,
            authorization,
            padding: "x".repeat(padding),
        }
    }

    /// The body of one publish to `target` in `phase`, stamped now.
    fn body(&self, target: &str, phase: usize) -> String {
        format!(
            r#"{{"target":{target},"type":"bench","payload":{{"p":{phase},"pad":"{}","t":{}}}}}"#,
            self.padding,
            now_ns()
        )
    }

    /// Posts `body` to `url` and returns the parsed reply.
    async fn post(&self, url: &str, body: String) -> Result<serde_json::Value, String> {
        let mut req = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(a) = &self.authorization {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.map_err(|e| format!("publish: {e}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| format!("publish: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "publish: {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("publish reply: {e}"))
    }

    /// Publishes one notification to `target` (a JSON target, e.g.
    /// `{"broadcast":{}}`) in `phase`, stamped with the current time.
    /// Returns the `delivered` count of the reply.
    pub(crate) async fn publish(&self, target: &str, phase: usize) -> Result<Option<u64>, String> {
        let reply = self.post(&self.url, self.body(target, phase)).await?;
        Ok(reply["delivered"].as_u64())
    }

    /// Publishes one notification per target in one request to the batch
    /// endpoint (`<url>/batch`, docs/protocol.md section 5), each in
    /// `phase` and stamped with the current time.
    pub(crate) async fn publish_batch(
        &self,
        targets: &[String],
        phase: usize,
    ) -> Result<(), String> {
        let items: Vec<String> = targets.iter().map(|t| self.body(t, phase)).collect();
        let reply = self
            .post(
                &format!("{}/batch", self.url),
                format!("[{}]", items.join(",")),
            )
            .await?;
        match reply.as_array() {
            Some(answers) if answers.len() == targets.len() => Ok(()),
            _ => Err(format!(
                "publish batch: {} items answered with {reply}",
                targets.len()
            )),
        }
    }

    /// GETs `url` (e.g. a node's `/metrics`) without the publish key and
    /// returns the body.
    pub(crate) async fn get(&self, url: &str) -> Result<String, String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("GET {url}: {status}: {text}"));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 / 50_000_000.0 - 1.0).abs() < 0.02, "{p50}");
        assert!((p99 / 99_000_000.0 - 1.0).abs() < 0.02, "{p99}");
        assert_eq!(h.quantile(0.0), Histogram::value(Histogram::index(1000)));
        for v in [0, 1, 63, 64, 65, 1 << 20, u64::MAX] {
            let i = Histogram::index(v);
            assert!(i < h.buckets.len(), "{v}");
        }
    }

    #[test]
    fn slots_are_counted_apart_and_together() {
        let rec = Recorder::with_slots(3);
        let frame = |phase: u64| format!(r#"{{"payload":{{"p":{phase},"t":0}}}}"#);
        rec.on_text(&frame(2), 0);
        rec.on_text(&frame(2), 2);
        rec.on_text(&frame(2), 2);
        rec.on_text(&frame(3), 1);
        rec.on_text("{\"type\":\"connection\"}", 1);
        assert_eq!(rec.count(2), 3);
        assert_eq!(rec.slot_count(2, 0), 1);
        assert_eq!(rec.slot_count(2, 1), 0);
        assert_eq!(rec.slot_count(2, 2), 2);
        assert_eq!(rec.histogram(2).count(), 3);
        assert_eq!(rec.slot_histogram(2, 1..3).count(), 2);
        assert_eq!(rec.count(3), 1);
    }

    #[test]
    fn finds_phase_and_time() {
        let frame = r#"{"id":"x","type":"bench","payload":{"p":3,"pad":"xx","t":123456},"timestamp":"2026-01-01T00:00:00.000Z"}"#;
        assert_eq!(number_after(frame.as_bytes(), b"\"p\":"), Some(3));
        assert_eq!(number_after(frame.as_bytes(), b"\"t\":"), Some(123456));
        let hello = r#"{"type":"connection","status":"connected","user_id":"u1","connection_id":"a-1","timestamp":"2026-01-01T00:00:00.000Z"}"#;
        assert_eq!(number_after(hello.as_bytes(), b"\"t\":"), None);
    }
}
