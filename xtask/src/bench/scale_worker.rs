//! `xtask bench __scale-worker`: one load-generating process of
//! `cargo xtask bench --scale` (`scale_run.rs`), holding the WebSocket
//! subscribers of one pgdn node.
//!
//! One process cannot hold 95,000 sockets here (at most 20,000 open files
//! per process), so the coordinator re-executes this binary once per node:
//!
//! ```text
//! xtask bench __scale-worker --url ws://127.0.0.1:PORT/ws --secret S \
//!     --users A..B --handshakes H --max-broadcasts M
//! ```
//!
//! It mints one HS256 JWT per user `u<A>`..`u<B-1>` (no groups), prints
//! `worker ready`, and then obeys one command per stdin line, answering on
//! stdout:
//!
//! - `connect`: opens every subscriber, at most H handshakes at once, each
//!   counted once its `connection` frame arrived (5 tries each); prints
//!   `progress <n>` every 2 s meanwhile, then
//!   `connected ok=<n> failed=<n> secs=<s>`;
//! - `arm <phase> <m>`: forgets the previous phase and expects broadcasts
//!   `0..m` of `phase`; answers `armed <phase>`. From then on, each time a
//!   broadcast has reached every connected subscriber it prints
//!   `complete <phase> <k>` (k: how many of the m broadcasts are complete);
//! - `report`: prints one line `report key=value ...` (see [`report`]):
//!   deliveries, duplicates, frames of no armed broadcast, broadcasts each
//!   subscriber missed, connections that ended, per broadcast the first and
//!   last receipt (Unix ns) and the latency histogram;
//! - `close <per_sec>`: closes every connection, a tenth of `per_sec`
//!   every 100 ms (each close makes its node unregister the session in
//!   Redis: all at once, they would queue up past the nodes' command
//!   timeout), then prints `closed secs=<s>`;
//! - `quit` (or stdin closing): drops every connection and exits.
//!
//! A broadcast's payload carries `"p"` (phase), `"s"` (its number in the
//! phase) and `"t"` (when it was sent, Unix ns: the coordinator's clock is
//! the same machine's). Each subscriber keeps one bit per broadcast, so a
//! duplicate (the bit already set) and a miss (a bit never set) are counted
//! exactly, per subscriber. The runtime is single-threaded: the coordinator
//! runs one worker per node on a 2-core machine, and one thread per worker
//! keeps the clients' own cost per delivery low.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};

use super::client::number_after;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::Credentials;

/// The hidden subcommand of `xtask bench` that runs a worker.
pub(crate) const SUBCOMMAND: &str = "__scale-worker";

/// The line a worker prints once its tokens are minted.
pub(crate) const READY: &str = "worker ready";

/// Latency histogram buckets: bucket `i > 0` holds latencies of about
/// `GROWTH^(i-1)` µs (2 % apart), up to about 2,000 s.
pub(crate) const BUCKETS: usize = 1100;

/// The ratio between neighbouring histogram buckets.
const GROWTH: f64 = 1.02;

/// The histogram bucket of a latency of `us` microseconds.
fn bucket(us: u64) -> usize {
    if us == 0 {
        return 0;
    }
    ((us as f64).ln() / GROWTH.ln()) as usize + 1
}

/// The latency, in microseconds, that bucket `i` stands for (its middle).
pub(crate) fn bucket_us(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        GROWTH.powf(i as f64 - 0.5)
    }
}

/// Nanoseconds since the Unix epoch: the clock that the coordinator
/// stamps broadcasts with and the workers time receipts with.
pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The worker's arguments.
struct Args {
    url: String,
    secret: String,
    first: usize,
    end: usize,
    handshakes: usize,
    max_broadcasts: usize,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let mut a = Args {
            url: String::new(),
            secret: String::new(),
            first: 0,
            end: 0,
            handshakes: 64,
            max_broadcasts: 64,
        };
        let mut it = args.iter();
        while let Some(name) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .clone();
            let number = |v: &str| v.parse::<usize>().map_err(|_| format!("{name}: {v}"));
            match name.as_str() {
                "--url" => a.url = value,
                "--secret" => a.secret = value,
                "--users" => {
                    let (x, y) = value
                        .split_once("..")
                        .ok_or_else(|| format!("--users A..B, not {value}"))?;
                    (a.first, a.end) = (number(x)?, number(y)?);
                }
                "--handshakes" => a.handshakes = number(&value)?.max(1),
                "--max-broadcasts" => a.max_broadcasts = number(&value)?.max(1),
                other => return Err(format!("unknown option {other}")),
            }
        }
        if a.url.is_empty() || a.secret.is_empty() || a.end <= a.first {
            return Err(format!(
                "usage: {SUBCOMMAND} --url WS_URL --secret S --users A..B \
                 [--handshakes H] [--max-broadcasts M]"
            ));
        }
        Ok(a)
    }
}

/// What every subscriber of this worker reports into.
struct State {
    /// Subscribers (users A..B).
    subs: usize,
    /// Words of the per-subscriber bitmaps (`max_broadcasts / 64`, up).
    words: usize,
    /// Whether subscriber i is connected (a failed one is not expected to
    /// receive anything).
    connected: Vec<AtomicBool>,
    /// How many are connected.
    connected_count: AtomicU64,
    /// The armed phase (0: none).
    phase: AtomicU64,
    /// Broadcasts in the armed phase.
    m: AtomicU64,
    /// Subscriber i has broadcast s: bit `s % 64` of `seen[i * words + s / 64]`.
    seen: Vec<AtomicU64>,
    /// Subscribers that received broadcast s.
    counts: Vec<AtomicU64>,
    /// Earliest receipt of broadcast s (Unix ns; u64::MAX: none yet).
    first: Vec<AtomicU64>,
    /// Latest receipt of broadcast s (Unix ns).
    last: Vec<AtomicU64>,
    /// Broadcasts of the armed phase that reached every connected subscriber.
    complete: AtomicU64,
    /// Woken when `complete` grows.
    completed: Notify,
    /// Second receipts of a broadcast by the same subscriber.
    duplicates: AtomicU64,
    /// Bench frames of another phase or beyond `m`.
    strays: AtomicU64,
    /// Publish-to-receive latency, by [`bucket`].
    hist: Vec<AtomicU64>,
    /// Connections the server closed (a close frame).
    closed: AtomicU64,
    /// Connections that failed or ended without a close frame.
    failed: AtomicU64,
}

impl State {
    fn new(subs: usize, max_broadcasts: usize) -> State {
        let words = max_broadcasts.div_ceil(64);
        let atomics = |n: usize, v: u64| (0..n).map(|_| AtomicU64::new(v)).collect::<Vec<_>>();
        State {
            subs,
            words,
            connected: (0..subs).map(|_| AtomicBool::new(false)).collect(),
            connected_count: AtomicU64::new(0),
            phase: AtomicU64::new(0),
            m: AtomicU64::new(0),
            seen: atomics(subs * words, 0),
            counts: atomics(max_broadcasts, 0),
            first: atomics(max_broadcasts, u64::MAX),
            last: atomics(max_broadcasts, 0),
            complete: AtomicU64::new(0),
            completed: Notify::new(),
            duplicates: AtomicU64::new(0),
            strays: AtomicU64::new(0),
            hist: atomics(BUCKETS, 0),
            closed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Forgets the previous phase and expects broadcasts `0..m` of `phase`.
    fn arm(&self, phase: u64, m: u64) {
        let r = Ordering::Relaxed;
        self.phase.store(0, r);
        for a in self.seen.iter().chain(&self.counts).chain(&self.last) {
            a.store(0, r);
        }
        for a in &self.first {
            a.store(u64::MAX, r);
        }
        for a in &self.hist {
            a.store(0, r);
        }
        for a in [&self.complete, &self.duplicates, &self.strays] {
            a.store(0, r);
        }
        self.m.store(m.min(self.counts.len() as u64), r);
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// One text frame received by subscriber `i`.
    fn on_text(&self, i: usize, s: &str) {
        let s = s.as_bytes();
        let (Some(phase), Some(seq), Some(sent)) = (
            number_after(s, b"\"p\":"),
            number_after(s, b"\"s\":"),
            number_after(s, b"\"t\":"),
        ) else {
            return; // not a bench broadcast (the connection frame)
        };
        let r = Ordering::Relaxed;
        if phase != self.phase.load(r) || seq >= self.m.load(r) {
            self.strays.fetch_add(1, r);
            return;
        }
        let seq = seq as usize;
        let bit = 1u64 << (seq % 64);
        if self.seen[i * self.words + seq / 64].fetch_or(bit, r) & bit != 0 {
            self.duplicates.fetch_add(1, r);
            return;
        }
        let now = unix_ns();
        let us = now.saturating_sub(sent) / 1000;
        self.hist[bucket(us).min(BUCKETS - 1)].fetch_add(1, r);
        self.first[seq].fetch_min(now, r);
        self.last[seq].fetch_max(now, r);
        let have = self.counts[seq].fetch_add(1, r) + 1;
        if have == self.connected_count.load(r) {
            self.complete.fetch_add(1, r);
            self.completed.notify_one();
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens one subscriber and waits for its `connection` frame; up to 5
/// tries.
async fn connect_one(url: &str) -> Result<Ws, String> {
    // A small read buffer: 19,000 clients in one process.
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let mut last_error = String::new();
    for attempt in 0..5u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        let attempt = async {
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str().contains("\"type\":\"connection\"") => {
                    Ok(ws)
                }
                other => Err(format!("expected the connection frame, got {other:?}")),
            }
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "handshake timed out".into(),
        }
    }
    Err(last_error)
}

/// Reads subscriber `i`'s frames until the connection ends.
async fn subscriber(mut ws: Ws, i: usize, state: Arc<State>) {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) => state.on_text(i, t.as_str()),
            Ok(Message::Close(_)) => {
                state.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    state.failed.fetch_add(1, Ordering::Relaxed);
}

/// Prints one line on stdout at once (the coordinator reads line by line).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Connects every subscriber, `handshakes` at a time, and starts a reader
/// task for each in `tasks`, its abort handle in `handles`. Returns
/// (connected, failed, first error).
async fn connect_all(
    urls: Vec<String>,
    handshakes: usize,
    state: &Arc<State>,
    tasks: &mut JoinSet<()>,
    handles: &mut Vec<AbortHandle>,
) -> (u64, u64, Option<String>) {
    let mut pending = futures_util::stream::iter(urls.into_iter().enumerate())
        .map(|(i, url)| async move { (i, connect_one(&url).await) })
        .buffer_unordered(handshakes);
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    let mut next_progress = Instant::now() + Duration::from_secs(2);
    while let Some((i, result)) = pending.next().await {
        match result {
            Ok(ws) => {
                ok += 1;
                state.connected[i].store(true, Ordering::Relaxed);
                state.connected_count.fetch_add(1, Ordering::Relaxed);
                handles.push(tasks.spawn(subscriber(ws, i, state.clone())));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        if Instant::now() >= next_progress {
            say(&format!("progress {ok}"));
            next_progress += Duration::from_secs(2);
        }
    }
    (ok, failed, first_error)
}

/// The `report` line: `phase`, `connected`, `m`, `received` (first
/// receipts), `duplicates`, `strays`, `missing` (broadcasts connected
/// subscribers never got, summed), `short` (subscribers missing at least
/// one), `closed`, `failed`, `first` and `last` (per broadcast, Unix ns,
/// comma-separated; 0 when none arrived) and `hist` (`bucket:count`
/// pairs, comma-separated).
fn report(state: &State) -> String {
    let r = Ordering::Relaxed;
    let m = state.m.load(r) as usize;
    let (mut missing, mut short) = (0u64, 0u64);
    for i in 0..state.subs {
        if !state.connected[i].load(r) {
            continue;
        }
        let have: u32 = (0..state.words)
            .map(|w| {
                let word = state.seen[i * state.words + w].load(r);
                let valid = m.saturating_sub(w * 64).min(64);
                let mask = if valid == 64 {
                    u64::MAX
                } else {
                    (1u64 << valid) - 1
                };
                (word & mask).count_ones()
            })
            .sum();
        let lacking = m as u64 - u64::from(have);
        missing += lacking;
        short += u64::from(lacking > 0);
    }
    let list = |v: &[AtomicU64]| {
        v[..m]
            .iter()
            .map(|a| match a.load(r) {
                u64::MAX => "0".to_string(),
                x => x.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let hist: Vec<String> = state
        .hist
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let c = c.load(r);
            (c > 0).then(|| format!("{i}:{c}"))
        })
        .collect();
    format!(
        "report phase={} connected={} m={m} received={} duplicates={} strays={} missing={missing} \
         short={short} closed={} failed={} first={} last={} hist={}",
        state.phase.load(r),
        state.connected_count.load(r),
        state.counts[..m].iter().map(|c| c.load(r)).sum::<u64>(),
        state.duplicates.load(r),
        state.strays.load(r),
        state.closed.load(r),
        state.failed.load(r),
        list(&state.first),
        list(&state.last),
        hist.join(",")
    )
}

/// Runs a worker until `quit` or the end of stdin.
pub(crate) fn main(args: &[String]) -> ExitCode {
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scale worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let subs = args.end - args.first;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit >= subs as u64 + 64 => {}
        Ok(limit) => {
            eprintln!(
                "scale worker: the open-file limit is {limit}, too low for {subs} subscribers"
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("scale worker: RLIMIT_NOFILE: {e}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scale worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Mints the tokens, then obeys the coordinator's commands.
async fn serve(args: Args) -> Result<(), String> {
    let creds = Credentials {
        secret: args.secret.clone(),
        key: String::new(),
    };
    let urls = (args.first..args.end)
        .map(|i| {
            let token = creds.token(&format!("u{i}"), &[])?;
            Ok(format!("{}?token={token}", args.url))
        })
        .collect::<Result<Vec<String>, String>>()?;
    let state = Arc::new(State::new(urls.len(), args.max_broadcasts));
    let mut tasks = JoinSet::new();
    let mut handles = Vec::new();
    // Prints `complete <phase> <k>` whenever broadcasts complete.
    let announcer = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut said = 0;
            loop {
                state.completed.notified().await;
                let (phase, k) = (
                    state.phase.load(Ordering::SeqCst),
                    state.complete.load(Ordering::SeqCst),
                );
                if k != said {
                    said = k;
                    say(&format!("complete {phase} {k}"));
                }
            }
        })
    };
    say(&format!("{READY} users={}..{}", args.first, args.end));
    let mut urls = Some(urls);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| format!("reading stdin: {e}"))?
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["connect"] => {
                let Some(urls) = urls.take() else {
                    return Err("connect twice".into());
                };
                let started = Instant::now();
                let (ok, failed, error) =
                    connect_all(urls, args.handshakes, &state, &mut tasks, &mut handles).await;
                if let Some(e) = error {
                    eprintln!("scale worker {}: first failed connection: {e}", args.url);
                }
                say(&format!(
                    "connected ok={ok} failed={failed} secs={:.3}",
                    started.elapsed().as_secs_f64()
                ));
            }
            ["arm", phase, m] => {
                let phase = phase.parse().map_err(|_| format!("bad line {line}"))?;
                let m = m.parse().map_err(|_| format!("bad line {line}"))?;
                state.arm(phase, m);
                say(&format!("armed {phase}"));
            }
            ["report"] => say(&report(&state)),
            ["close", per_sec] => {
                let per_sec: usize = per_sec.parse().map_err(|_| format!("bad line {line}"))?;
                let started = Instant::now();
                // A tenth of the rate every 100 ms.
                let wave = per_sec.div_ceil(10).max(1);
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                for chunk in handles.chunks(wave) {
                    tick.tick().await;
                    for h in chunk {
                        h.abort();
                    }
                }
                handles.clear();
                say(&format!(
                    "closed secs={:.3}",
                    started.elapsed().as_secs_f64()
                ));
            }
            ["quit"] => break,
            _ => return Err(format!("unknown command {line:?}")),
        }
    }
    announcer.abort();
    tasks.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(phase: u64, seq: u64) -> String {
        format!(
            r#"{{"id":"x","type":"bench","payload":{{"p":{phase},"s":{seq},"t":{},"pad":"xx"}},"timestamp":"2026-01-01T00:00:00.000Z"}}"#,
            unix_ns()
        )
    }

    #[test]
    fn counts_duplicates_misses_and_strays_per_subscriber() {
        let state = State::new(3, 70);
        for i in 0..3 {
            state.connected[i].store(true, Ordering::Relaxed);
        }
        state.connected_count.store(3, Ordering::Relaxed);
        state.arm(1, 66);
        for seq in 0..66 {
            state.on_text(0, &frame(1, seq));
            state.on_text(1, &frame(1, seq));
            if seq != 65 {
                state.on_text(2, &frame(1, seq));
            }
        }
        state.on_text(1, &frame(1, 3)); // a duplicate
        state.on_text(1, &frame(2, 3)); // another phase
        state.on_text(1, &frame(1, 66)); // beyond m
        state.on_text(1, r#"{"type":"connection"}"#);
        assert_eq!(state.complete.load(Ordering::Relaxed), 65);
        let line = report(&state);
        for part in [
            "received=197 ",
            "duplicates=1 ",
            "strays=2 ",
            "missing=1 ",
            "short=1 ",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
        state.arm(2, 1);
        state.on_text(0, &frame(2, 0));
        let line = report(&state);
        assert!(line.contains("received=1 "), "{line}");
        assert!(line.contains("missing=2 "), "{line}");
        assert!(line.contains("duplicates=0 "), "{line}");
    }

    #[test]
    fn buckets_are_two_percent_apart() {
        for us in [1u64, 10, 999, 12_345, 3_000_000] {
            let mid = bucket_us(bucket(us));
            assert!((mid / us as f64 - 1.0).abs() < 0.03, "{us}: {mid}");
        }
        assert!(bucket(2_000_000_000) < BUCKETS);
        assert_eq!(bucket(0), 0);
    }
}
