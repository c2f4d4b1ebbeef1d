//! Lifecycle webhooks (feature `webhooks`, on by default): [`WebhookSink`]
//! carries the hub's lifecycle events (`user.online`, `user.offline`,
//! `notification.undelivered`) to HTTP receivers, signed, in batches, in
//! the background.
//!
//! # The request
//!
//! Every receiver gets `POST <url>` with `Content-Type: application/json`
//! and the body `{"events":[...]}` (one to [`WebhookConfig::max_batch`]
//! events, oldest first, each as [`LifecycleEvent`] serializes), and two
//! headers:
//!
//! - `Pgdn-Timestamp: <unix seconds>`: when this attempt was signed (a
//!   retry is signed again, with a new timestamp);
//! - `Pgdn-Signature: v1=<hex>`: the lowercase hex HMAC-SHA256, keyed
//!   with the secret, of `"{timestamp}.{body}"` (the header's value, a
//!   dot, the raw body bytes). The header is a comma-separated list of
//!   `v1=` entries (one today): a receiver accepts the request if any of
//!   them matches ([`sign`] computes one).
//!
//! A receiver recomputes the signature over the body as received,
//! compares in constant time, refuses a timestamp more than 5 minutes
//! away from its clock (a replayed request), and answers 2xx once it has
//! the events (`examples/examples/webhook_receiver.rs` does all that).
//!
//! # Delivery
//!
//! At least once: a batch leaves the queue only on a 2xx answer. Anything
//! else (another status, a redirect, a timeout, a refused connection) is
//! retried with exponential backoff and jitter ([`RetryPolicy`]), for as
//! long as the process lives; a receiver de-duplicates by the events'
//! `id`. Each URL has its own queue, its own order and one request in
//! flight at a time: a receiver that is down or slow never holds back the
//! others (an event for two URLs is queued twice, and delivered to each
//! on its own schedule).
//!
//! A queue holds at most [`WebhookConfig::queue_limit`] events; past it
//! the oldest are dropped and counted. [`LifecycleSink::emit`] only takes
//! a lock to push (never across an `.await`) and returns: the hub's
//! connect, disconnect and publish paths never wait for a receiver.
//!
//! # Operating it
//!
//! [`WebhookSink::metrics`] is a collector for `/metrics`
//! ([`PgdnBuilder::collector`](crate::PgdnBuilder::collector)):
//! `pgdn_webhook_events_total{receiver,outcome="delivered"|"dropped"}`,
//! `pgdn_webhook_attempts_failed_total{receiver}` and
//! `pgdn_webhook_queue_depth{receiver}`, where `receiver` is the URL's
//! place in [`WebhookConfig::urls`] (0, 1, ...). A failing receiver is
//! logged at its first failure, then at most every 30 s while it lasts
//! (each failure in between at `debug`), then once
//! when it recovers, with its URL (without credentials or query) and the
//! status or error: never the secret or a body. On shutdown,
//! [`WebhookSink::shutdown`] retries at once and waits a bounded time for
//! the queues to drain.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use pgdn_server::webhooks::{WebhookConfig, WebhookSink};
//! use pgdn_server::{Hub, Pgdn};
//!
//! let sink = WebhookSink::start(WebhookConfig::new(
//!     ["https://app.example.com/hooks/pgdn"],
//!     "a webhook secret of at least 32 bytes",
//! ))?;
//! let hub = Hub::builder().lifecycle_sink(Arc::new(sink.clone())).build();
//! let pgdn = Pgdn::builder()
//!     .hub(hub)
//!     .collector(sink.metrics())
//!     .jwt_secret("a jwt secret of at least 32 bytes")
//!     .publish_key("a publish key of 16+ bytes")
//!     .build()?;
//! // ... pgdn.serve(listener, shutdown).await; then:
//! sink.shutdown(std::time::Duration::from_secs(2)).await;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use pgdn_core::prometheus_client::collector::Collector;
use pgdn_core::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use pgdn_core::prometheus_client::metrics::MetricType;
use pgdn_core::prometheus_client::metrics::counter::ConstCounter;
use pgdn_core::prometheus_client::metrics::gauge::ConstGauge;
use pgdn_core::{LifecycleEvent, LifecycleSink};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// The shortest secret [`WebhookSink::start`] accepts, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// The header holding the signing time, in unix seconds.
pub const TIMESTAMP_HEADER: &str = "Pgdn-Timestamp";

/// The header holding the signature(s), `v1=<lowercase hex>`.
pub const SIGNATURE_HEADER: &str = "Pgdn-Signature";

/// How far a receiver should let a request's timestamp be from its own
/// clock before refusing it as a replay: 5 minutes.
pub const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(300);

/// How often a failure that lasts is logged again.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// The `Pgdn-Signature` value of `body` signed at `timestamp` (unix
/// seconds) with `secret`: `v1=` and the lowercase hex HMAC-SHA256 of
/// `"{timestamp}.{body}"`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// How failed deliveries are retried: the n-th retry in a row waits
/// `initial * 2^(n-1)`, at most `max`, less a random part of up to half
/// (so that many nodes do not retry in step). Retries never stop while
/// the process lives; a success starts over at `initial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// The first wait. Default 0.5 s.
    pub initial: Duration,
    /// The longest wait. Default 60 s.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Sets the first wait.
    pub fn initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// Sets the longest wait.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// The wait before retry number `retry` (1 for the first), jitter
    /// included: in `[d/2, d]` for the doubled-and-capped `d`.
    pub fn delay(&self, retry: u32) -> Duration {
        let doubled = self
            .initial
            .saturating_mul(1u32 << retry.saturating_sub(1).min(31));
        let d = doubled.min(self.max.max(self.initial));
        d / 2 + d.mul_f64(rand::rng().random_range(0.0..=0.5))
    }
}

/// Settings of a [`WebhookSink`].
#[derive(Clone)]
#[non_exhaustive]
pub struct WebhookConfig {
    /// Where events are POSTed (`http` or `https`); each gets every event.
    pub urls: Vec<String>,
    /// The HMAC-SHA256 key the requests are signed with, at least
    /// [`MIN_SECRET_LEN`] bytes. Never logged.
    pub secret: String,
    /// Most events queued per URL; past it the oldest are dropped.
    /// Default 10,000.
    pub queue_limit: usize,
    /// Most events in one request. Default 100.
    pub max_batch: usize,
    /// How long one request may take, connecting and answering included.
    /// Default 10 s.
    pub timeout: Duration,
    /// How failed requests are retried. Default: [`RetryPolicy::default`].
    pub retry: RetryPolicy,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field(
                "urls",
                &self.urls.iter().map(|u| shown(u)).collect::<Vec<_>>(),
            )
            .field("secret", &"***")
            .field("queue_limit", &self.queue_limit)
            .field("max_batch", &self.max_batch)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

impl WebhookConfig {
    /// `urls` signed with `secret`, with the default limits.
    pub fn new<I, U>(urls: I, secret: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        WebhookConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            secret: secret.into(),
            queue_limit: 10_000,
            max_batch: 100,
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }

    /// Sets the most events queued per URL.
    pub fn queue_limit(mut self, limit: usize) -> Self {
        self.queue_limit = limit;
        self
    }

    /// Sets the most events in one request.
    pub fn max_batch(mut self, max: usize) -> Self {
        self.max_batch = max;
        self
    }

    /// Sets how long one request may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how failed requests are retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

/// A URL as logged: scheme, host, port and path; no credentials, query or
/// fragment (where tokens hide).
fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.path()
            )
        }
        Err(_) => "<invalid url>".into(),
    }
}

/// Numbers about one receiver ([`WebhookSink::stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiverStats {
    /// The URL without credentials or query.
    pub url: String,
    /// Events the receiver acknowledged with a 2xx.
    pub delivered: u64,
    /// Events dropped from the full queue before a 2xx.
    pub dropped: u64,
    /// Requests that failed (status, timeout, connection).
    pub failed_attempts: u64,
    /// Events waiting (the one batch in flight included).
    pub queued: usize,
}

/// One URL's queue and counters.
struct Receiver {
    url: reqwest::Url,
    /// [`shown`] `url`, for logs and stats.
    shown: String,
    queue: Mutex<Queue>,
    /// Woken on a push (a permit is kept if the worker is not waiting).
    wake: Notify,
    delivered: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// Events waiting for one receiver, each with its sequence number: a
/// batch is confirmed by its last number, so that events dropped from the
/// front while it was in flight are not confused with newer ones.
#[derive(Default)]
struct Queue {
    events: VecDeque<(u64, Arc<LifecycleEvent>)>,
    next_seq: u64,
}

impl Receiver {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `event`, dropping the oldest past `limit`.
    fn push(&self, event: Arc<LifecycleEvent>, limit: usize) {
        let dropped = {
            let mut q = self.queue();
            let seq = q.next_seq;
            q.next_seq += 1;
            q.events.push_back((seq, event));
            let over = q.events.len().saturating_sub(limit);
            q.events.drain(..over);
            over
        };
        if dropped > 0 {
            self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    /// The oldest `max` events and the sequence number of the last.
    fn peek(&self, max: usize) -> Option<(u64, Vec<Arc<LifecycleEvent>>)> {
        let q = self.queue();
        let n = q.events.len().min(max);
        let last = q.events.get(n.checked_sub(1)?)?.0;
        let events = q.events.range(..n).map(|(_, e)| e.clone()).collect();
        Some((last, events))
    }

    /// Removes what a 2xx acknowledged: every event up to `last`. True
    /// when the queue is now empty.
    fn confirm(&self, last: u64) -> bool {
        let (done, empty) = {
            let mut q = self.queue();
            let done = q.events.iter().take_while(|(s, _)| *s <= last).count();
            q.events.drain(..done);
            (done, q.events.is_empty())
        };
        self.delivered.fetch_add(done as u64, Ordering::Relaxed);
        empty
    }

    fn depth(&self) -> usize {
        self.queue().events.len()
    }
}

/// What the sink's handles and its workers share.
struct Shared {
    receivers: Vec<Receiver>,
    secret: String,
    queue_limit: usize,
    max_batch: usize,
    retry: RetryPolicy,
    client: reqwest::Client,
    /// Cancelled when the sink stops: workers end.
    stop: CancellationToken,
    /// Cancelled when shutdown begins: waiting retries happen at once.
    hurry: CancellationToken,
    /// Woken whenever a queue becomes empty.
    drained: Notify,
}

impl Shared {
    fn depth(&self) -> usize {
        self.receivers.iter().map(Receiver::depth).sum()
    }
}

/// Stops the workers when the last [`WebhookSink`] handle goes.
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The webhook [`LifecycleSink`]: a cheap-clone handle over one queue
/// and one background task per URL (see the [module](self) for the
/// request, the signature and the delivery rules). The tasks end when
/// the last handle is dropped, or at [`WebhookSink::shutdown`].
#[derive(Clone)]
pub struct WebhookSink {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<&str> = self.shared.receivers.iter().map(|r| &*r.shown).collect();
        f.debug_struct("WebhookSink")
            .field("urls", &urls)
            .finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// Checks `config` and starts one delivery task per URL on the
    /// current tokio runtime. Refused: no URL, a URL that is not `http`
    /// or `https`, a secret shorter than [`MIN_SECRET_LEN`], a zero
    /// limit or timeout, or no runtime.
    pub fn start(config: WebhookConfig) -> Result<WebhookSink, Error> {
        let invalid = |m: String| Err(Error::Config(format!("webhooks: {m}")));
        if config.urls.is_empty() {
            return invalid("no URL".into());
        }
        if config.secret.len() < MIN_SECRET_LEN {
            // Its length, never the secret.
            return invalid(format!(
                "the secret is {} bytes; at least {MIN_SECRET_LEN} are required",
                config.secret.len()
            ));
        }
        if config.queue_limit == 0 || config.max_batch == 0 || config.timeout.is_zero() {
            return invalid("the queue limit, the batch size and the timeout must not be 0".into());
        }
        let mut receivers = Vec::with_capacity(config.urls.len());
        for raw in &config.urls {
            let url = reqwest::Url::parse(raw).map_err(|e| {
                Error::Config(format!("webhooks: {} is not a URL: {e}", shown(raw)))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return invalid(format!("{} must be http or https", shown(raw)));
            }
            receivers.push(Receiver {
                shown: shown(raw),
                url,
                queue: Mutex::default(),
                wake: Notify::new(),
                delivered: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("webhooks: WebhookSink::start needs a tokio runtime".into())
        })?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            // A redirect is a failure: a POST must not turn into a GET,
            // nor a signed body go somewhere not configured.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pgdn/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("webhooks: cannot make the HTTP client: {e}")))?;
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            receivers,
            secret: config.secret,
            queue_limit: config.queue_limit,
            max_batch: config.max_batch,
            retry: config.retry,
            client,
            stop: stop.clone(),
            hurry: CancellationToken::new(),
            drained: Notify::new(),
        });
        for index in 0..shared.receivers.len() {
            runtime.spawn(deliver(shared.clone(), index));
        }
        Ok(WebhookSink {
            shared,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    /// Numbers about each receiver, in the order of
    /// [`WebhookConfig::urls`].
    pub fn stats(&self) -> Vec<ReceiverStats> {
        self.shared
            .receivers
            .iter()
            .map(|r| ReceiverStats {
                url: r.shown.clone(),
                delivered: r.delivered.load(Ordering::Relaxed),
                dropped: r.dropped.load(Ordering::Relaxed),
                failed_attempts: r.failed.load(Ordering::Relaxed),
                queued: r.depth(),
            })
            .collect()
    }

    /// The collector of the `pgdn_webhook_*` metrics, for
    /// [`PgdnBuilder::collector`](crate::PgdnBuilder::collector).
    pub fn metrics(&self) -> WebhookMetrics {
        WebhookMetrics {
            shared: self.shared.clone(),
        }
    }

    /// Ends delivery: retries waiting for their backoff happen at once,
    /// then, once every queue is empty or `within` has passed, the tasks
    /// stop (a request in flight is abandoned). Returns how many events
    /// were left undelivered (an event left for two URLs counts twice),
    /// and logs it. Events emitted afterwards are dropped.
    pub async fn shutdown(&self, within: Duration) -> usize {
        let shared = &self.shared;
        shared.hurry.cancel();
        let drained = async {
            loop {
                let notified = shared.drained.notified();
                tokio::pin!(notified);
                // Registered before the check: a queue emptied in between
                // still wakes it.
                notified.as_mut().enable();
                if shared.depth() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(within, drained).await;
        shared.stop.cancel();
        let left = shared.depth();
        if left > 0 {
            tracing::warn!(
                left,
                "webhooks stopped with events undelivered (the receivers were down or slow)"
            );
        } else {
            tracing::debug!("webhooks stopped, every event delivered");
        }
        left
    }
}

impl LifecycleSink for WebhookSink {
    fn emit(&self, event: LifecycleEvent) {
        let shared = &self.shared;
        if shared.stop.is_cancelled() {
            for r in &shared.receivers {
                r.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let event = Arc::new(event);
        for r in &shared.receivers {
            r.push(event.clone(), shared.queue_limit);
        }
    }
}

/// Why a request did not deliver.
enum Failure {
    /// The receiver answered, with a status other than 2xx.
    Status(u16),
    /// No answer within the timeout.
    Timeout,
    /// No connection, or it broke; the cause, without the URL.
    Transport(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "answered {code}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Transport(why) => f.write_str(why),
        }
    }
}

/// A reqwest error as text: its kind and causes, never the URL (its
/// query may hold a token).
fn describe(e: reqwest::Error) -> Failure {
    if e.is_timeout() {
        return Failure::Timeout;
    }
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    Failure::Transport(text)
}

/// The JSON body of a batch: `{"events":[...]}`.
fn body_of(events: &[Arc<LifecycleEvent>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + events.len() * 160);
    body.extend_from_slice(b"{\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &**event).expect("an event serializes");
    }
    body.extend_from_slice(b"]}");
    body
}

/// Sends one signed batch to `r`.
async fn post(shared: &Shared, r: &Receiver, body: Vec<u8>) -> Result<(), Failure> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let signature = sign(shared.secret.as_bytes(), timestamp, &body);
    let response = shared
        .client
        .post(r.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await
        .map_err(describe)?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(Failure::Status(status.as_u16()))
    }
}

/// A failure that lasts, for logging it at its start, every
/// [`LOG_EVERY`], and at its end.
struct Outage {
    since: Instant,
    logged: Instant,
    attempts: u64,
}

/// The delivery task of receiver `index`: waits for events, sends them in
/// batches, retries with backoff, until the sink stops.
async fn deliver(shared: Arc<Shared>, index: usize) {
    let r = &shared.receivers[index];
    let mut retries = 0u32;
    let mut outage: Option<Outage> = None;
    loop {
        let (last, events) = loop {
            if let Some(batch) = r.peek(shared.max_batch) {
                break batch;
            }
            tokio::select! {
                _ = r.wake.notified() => {}
                _ = shared.stop.cancelled() => return,
            }
        };
        let body = body_of(&events);
        let sent = tokio::select! {
            sent = post(&shared, r, body) => sent,
            _ = shared.stop.cancelled() => return,
        };
        match sent {
            Ok(()) => {
                retries = 0;
                if r.confirm(last) {
                    shared.drained.notify_waiters();
                }
                if let Some(o) = outage.take() {
                    tracing::info!(
                        url = %r.shown,
                        failed_attempts = o.attempts,
                        after = ?o.since.elapsed(),
                        dropped_total = r.dropped.load(Ordering::Relaxed),
                        "webhook delivery recovered"
                    );
                }
            }
            Err(why) => {
                r.failed.fetch_add(1, Ordering::Relaxed);
                retries = retries.saturating_add(1);
                match &mut outage {
                    None => {
                        tracing::warn!(
                            url = %r.shown,
                            error = %why,
                            queued = r.depth(),
                            "webhook delivery failed; retrying with backoff"
                        );
                        let now = Instant::now();
                        outage = Some(Outage {
                            since: now,
                            logged: now,
                            attempts: 1,
                        });
                    }
                    Some(o) => {
                        o.attempts += 1;
                        if o.logged.elapsed() >= LOG_EVERY {
                            o.logged = Instant::now();
                            tracing::warn!(
                                url = %r.shown,
                                error = %why,
                                failed_attempts = o.attempts,
                                failing_for = ?o.since.elapsed(),
                                queued = r.depth(),
                                dropped_total = r.dropped.load(Ordering::Relaxed),
                                "webhook delivery still failing"
                            );
                        } else {
                            tracing::debug!(
                                url = %r.shown,
                                error = %why,
                                failed_attempts = o.attempts,
                                "webhook delivery failed again"
                            );
                        }
                    }
                }
                backoff(&shared, retries).await;
                if shared.stop.is_cancelled() {
                    return;
                }
            }
        }
    }
}

/// How long retries wait once shutdown has begun, at most.
const HURRIED_RETRY: Duration = Duration::from_millis(250);

/// Waits before retry number `retry`: the policy's delay, cut short once
/// shutdown begins (and then at most [`HURRIED_RETRY`], so that a
/// receiver still down is tried a few times within the shutdown's bound,
/// not in a tight loop).
async fn backoff(shared: &Shared, retry: u32) {
    if shared.hurry.is_cancelled() {
        tokio::select! {
            _ = tokio::time::sleep(shared.retry.initial.min(HURRIED_RETRY)) => {}
            _ = shared.stop.cancelled() => {}
        }
    } else {
        tokio::select! {
            _ = tokio::time::sleep(shared.retry.delay(retry)) => {}
            _ = shared.hurry.cancelled() => {}
            _ = shared.stop.cancelled() => {}
        }
    }
}

/// The `pgdn_webhook_*` metrics of a [`WebhookSink`], read at scrape
/// time: a collector for [`PgdnBuilder::collector`](crate::PgdnBuilder::collector).
pub struct WebhookMetrics {
    shared: Arc<Shared>,
}

impl fmt::Debug for WebhookMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookMetrics").finish_non_exhaustive()
    }
}

impl Collector for WebhookMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let receivers: Vec<String> = (0..self.shared.receivers.len())
            .map(|i| i.to_string())
            .collect();
        let mut fam = enc.encode_descriptor(
            "pgdn_webhook_events",
            "Lifecycle events by webhook receiver (its place in --webhook-url, from 0) and outcome: \
             delivered (acknowledged with a 2xx) or dropped (the receiver's queue was full)",
            None,
            MetricType::Counter,
        )?;
        for (r, id) in self.shared.receivers.iter().zip(&receivers) {
            for (outcome, n) in [("delivered", &r.delivered), ("dropped", &r.dropped)] {
                let labels = [("receiver", id.as_str()), ("outcome", outcome)];
                ConstCounter::new(n.load(Ordering::Relaxed)).encode(fam.encode_family(&labels)?)?;
            }
        }
        let mut fam = enc.encode_descriptor(
            "pgdn_webhook_attempts_failed",
            "Webhook requests that failed (a status other than 2xx, a timeout, no connection), \
             by receiver; each is retried",
            None,
            MetricType::Counter,
        )?;
        for (r, id) in self.shared.receivers.iter().zip(&receivers) {
            let labels = [("receiver", id.as_str())];
            ConstCounter::new(r.failed.load(Ordering::Relaxed))
                .encode(fam.encode_family(&labels)?)?;
        }
        let mut fam = enc.encode_descriptor(
            "pgdn_webhook_queue_depth",
            "Lifecycle events waiting for delivery, by webhook receiver",
            None,
            MetricType::Gauge,
        )?;
        for (r, id) in self.shared.receivers.iter().zip(&receivers) {
            let labels = [("receiver", id.as_str())];
            ConstGauge::new(r.depth() as i64).encode(fam.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        let body = br#"{"events":[]}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"1700000000.{\"events\":[]}");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sign(b"key", 1_700_000_000, body), format!("v1={want}"));
        // A known vector: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_max_with_jitter_below() {
        let p = RetryPolicy::default();
        for _ in 0..50 {
            let d1 = p.delay(1);
            assert!(d1 >= Duration::from_millis(250) && d1 <= Duration::from_millis(500));
            let d3 = p.delay(3);
            assert!(d3 >= Duration::from_secs(1) && d3 <= Duration::from_secs(2));
            let d40 = p.delay(40);
            assert!(d40 >= Duration::from_secs(30) && d40 <= Duration::from_secs(60));
        }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_confirm_spares_newer_events() {
        let r = Receiver {
            url: reqwest::Url::parse("http://127.0.0.1:9/").unwrap(),
            shown: "http://127.0.0.1:9/".into(),
            queue: Mutex::default(),
            wake: Notify::new(),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        };
        let ev = |n: u32| {
            Arc::new(
                LifecycleEvent::new(pgdn_core::EventKind::UserOnline, Some(&format!("u{n}")))
                    .with("n", n),
            )
        };
        for n in 0..3 {
            r.push(ev(n), 3);
        }
        let (last, batch) = r.peek(2).unwrap();
        assert_eq!(batch.len(), 2);
        // While the batch (u0, u1) is in flight, two more arrive: u0 and
        // u1 go, and its 2xx must not take u2 or u3 for them.
        r.push(ev(3), 3);
        r.push(ev(4), 3);
        assert_eq!(r.dropped.load(Ordering::Relaxed), 2);
        assert!(!r.confirm(last));
        assert_eq!(r.delivered.load(Ordering::Relaxed), 0);
        let (last, rest) = r.peek(10).unwrap();
        let users: Vec<_> = rest.iter().map(|e| e.user.clone().unwrap()).collect();
        assert_eq!(users, ["u2", "u3", "u4"]);
        assert!(r.confirm(last));
        assert_eq!(r.delivered.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn urls_are_logged_without_credentials_or_query() {
        assert_eq!(
            shown("https://user:pw@hooks.example.com:8443/in?token=abc#x"),
            "https://hooks.example.com:8443/in"
        );
        assert_eq!(shown("not a url"), "<invalid url>");
    }
}
