//! `--load` parts 1 to 3, on one pgdn-server with N idle WebSocket
//! subscribers (`--n`, default 10,000; users `u0`..`u{N-1}`, each with its
//! own JWT, counted once its `connection` frame arrived):
//!
//! 1. **publishers**: broadcast throughput with K concurrent publishers,
//!    once per `--publishers` value (default 1 and 8). M broadcasts (about
//!    `--deliveries` / N) with at most `--window` of them not yet fully
//!    delivered and at most K publish requests outstanding at once: each
//!    of the K publishers (a keep-alive HTTP connection of its own) sends
//!    its next broadcast as soon as its last one was answered, unless the
//!    window is full. Deliveries/s is every frame received / the time from
//!    the first publish to the last receipt; the server's CPU time (utime +
//!    stime) over that span / deliveries is its CPU per delivery. Every
//!    subscriber must get every broadcast exactly once.
//! 2. **user-latency**: user-targeted publishes at a steady rate
//!    (`--load-rate`, default 1,000/s) for `--load-secs` seconds, each to
//!    a user drawn at random among the last [`PROBES`] of the N (the probe
//!    subscribers, below), from [`USER_SENDERS`] senders on keep-alive
//!    connections, each on a fixed schedule; publish-to-receive latency is
//!    the receipt time minus the send time in the payload (the clock of
//!    `client.rs`). Measured once with nothing else going on (the
//!    reference) and once while broadcasts run back to back: one publisher
//!    sends broadcast after broadcast, at most [`BACKGROUND_WINDOW`] of
//!    them not yet fully delivered (so the server is always fanning one
//!    out, while each subscriber's queue holds at most that many
//!    broadcasts ahead of a user-targeted message).
//! 3. **connect-latency**: `--load-connects` new WebSocket connections
//!    (default 1,000: the p99 is then the tenth largest, steadier than
//!    the third of 300), each with its own JWT (users `x<i>`), started at
//!    [`CONNECT_RATE`] per second; each is timed from the start of its TCP
//!    connect to the arrival of its `{"type":"connection",...}` frame, then
//!    closed. Once with the server idle (the N subscribers connected, no
//!    traffic) and once during back-to-back broadcasts as in part 2.
//!
//! What parts 2 and 3 time runs on a thread of its own with its own
//! current-thread tokio runtime ([`Probe`]): the probe subscribers, the
//! senders of the user-targeted publishes and the new connections. The
//! rest of the N subscribers are on the bench's main runtime, where every
//! broadcast wakes thousands of tasks at once; a receipt timed behind
//! them would measure the bench's own queue, not the server's.
//!
//! The parts run in this order on one server: connect latency idle,
//! user-targeted latency idle, broadcast throughput, user-targeted latency
//! during broadcasts, connect latency during broadcasts. The background
//! broadcasts also reach the connections of part 3 while they are open;
//! deliveries are counted at the N subscribers only, and each must get each
//! broadcast exactly once.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::{JoinHandle, JoinSet};

use super::super::client::{self, Histogram, Recorder};
use super::super::{BROADCAST, Clocks, Credentials, Options, Phase, ms, pgdn_bin, start_pgdn};
use super::LoadOptions;
use super::connect::connect_hello;
use super::http::{self, HttpConn, PUBLISH, Rng};

/// Broadcasts not yet fully delivered, at most, in the background load of
/// parts 2 and 3.
pub(crate) const BACKGROUND_WINDOW: u64 = 2;
/// New connections started per second in part 3.
pub(crate) const CONNECT_RATE: f64 = 100.0;
/// Senders of the steady user-targeted publishes of part 2, each with its
/// own keep-alive connection.
pub(crate) const USER_SENDERS: usize = 8;

/// Part 1 at one `--publishers` value.
#[derive(Debug, Clone)]
pub(crate) struct Throughput {
    /// Publish requests outstanding at once, at most.
    pub(crate) publishers: usize,
    /// Deliveries, time, CPU and publish-to-receive latency.
    pub(crate) phase: Phase,
    /// How long a publish request took, p50, nanoseconds.
    pub(crate) call_p50_ns: u64,
    /// The same, p99.
    pub(crate) call_p99_ns: u64,
}

/// What the background broadcasts of parts 2 and 3 did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Background {
    /// Broadcasts published.
    pub(crate) broadcasts: u64,
    /// From the first publish until the last one reached every subscriber.
    pub(crate) secs: f64,
    /// Deliveries to the N subscribers.
    pub(crate) deliveries: u64,
}

impl Background {
    /// Deliveries per second to the N subscribers.
    pub(crate) fn per_sec(&self) -> f64 {
        self.deliveries as f64 / self.secs.max(1e-9)
    }
}

/// Part 2, with or without background broadcasts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UserLatency {
    /// User-targeted publishes made (each delivered once).
    pub(crate) sent: u64,
    /// Over how long they were sent.
    pub(crate) secs: f64,
    /// Publish-to-receive latency p50, nanoseconds.
    pub(crate) p50_ns: u64,
    /// The same, p99.
    pub(crate) p99_ns: u64,
    /// The same, the largest.
    pub(crate) max_ns: u64,
    /// The broadcasts running meanwhile, if any.
    pub(crate) background: Option<Background>,
}

/// Part 3, with or without background broadcasts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectLatency {
    /// Connections made (each got its `connection` frame).
    pub(crate) connects: u64,
    /// Connect-to-`connection`-frame time p50, nanoseconds.
    pub(crate) p50_ns: u64,
    /// The same, p99.
    pub(crate) p99_ns: u64,
    /// The same, the largest.
    pub(crate) max_ns: u64,
    /// The broadcasts running meanwhile, if any.
    pub(crate) background: Option<Background>,
}

/// Everything parts 1 to 3 measured in one round at one N.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    /// Which round of `--rounds` (from 0).
    pub(crate) round: usize,
    /// Idle subscribers.
    pub(crate) n: usize,
    /// How long connecting them took.
    pub(crate) connect_secs: f64,
    /// Part 1: one per `--publishers` value.
    pub(crate) publishers: Vec<Throughput>,
    /// Part 2 without broadcasts.
    pub(crate) user_idle: Option<UserLatency>,
    /// Part 2 during broadcasts.
    pub(crate) user_busy: Option<UserLatency>,
    /// Part 3 with the server idle.
    pub(crate) connect_idle: Option<ConnectLatency>,
    /// Part 3 during broadcasts.
    pub(crate) connect_busy: Option<ConnectLatency>,
    /// What went wrong, if anything.
    pub(crate) errors: Vec<String>,
}

/// Starts a pgdn-server, measures the parts of 1 to 3 that `load.parts`
/// names at `n` subscribers, and stops the server.
pub(crate) fn run_round(
    round: usize,
    n: usize,
    opts: &Options,
    load: &LoadOptions,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Round {
    let mut out = Round {
        round,
        n,
        connect_secs: 0.0,
        publishers: Vec::new(),
        user_idle: None,
        user_busy: None,
        connect_idle: None,
        connect_busy: None,
        errors: Vec::new(),
    };
    let creds = Credentials::new();
    let max = (n + 2 * load.connects + 1000).to_string();
    match start_pgdn(
        &pgdn_bin(opts, bin_dir),
        "pgdn-server",
        &creds,
        &["--max-connections", &max],
    ) {
        Ok((process, addr)) => {
            let server = Server {
                addr: &addr,
                creds: &creds,
                pid: process.pid(),
                ticks_per_sec,
            };
            if let Err(e) = runtime.block_on(measure(&mut out, &server, opts, load)) {
                out.errors.push(e);
            }
            eprintln!(
                "xtask bench: {}",
                process.stop(std::time::Duration::from_secs(20))
            );
        }
        Err(e) => out.errors.push(e),
    }
    for e in &out.errors {
        eprintln!("  problem: {e}");
    }
    out
}

/// The server of one round.
struct Server<'a> {
    /// Where it listens, `host:port`.
    addr: &'a str,
    /// Its JWT secret and publish key.
    creds: &'a Credentials,
    /// Its process id.
    pid: u32,
    /// Clock ticks per second of its CPU time.
    ticks_per_sec: u64,
}

/// The phases of a round, numbered as they are used.
struct Phases {
    next: usize,
    /// (phase, deliveries it must have in the end).
    expected: Vec<(usize, u64)>,
}

impl Phases {
    fn take(&mut self) -> Result<usize, String> {
        self.next += 1;
        if self.next >= client::PHASES {
            return Err("more phases than the bench tells apart".into());
        }
        Ok(self.next)
    }
}

/// Connects the subscribers and runs the parts, filling `out`.
async fn measure(
    out: &mut Round,
    server: &Server<'_>,
    opts: &Options,
    load: &LoadOptions,
) -> Result<(), String> {
    let rec = Recorder::new();
    let probe = Probe::start(out.n)?;
    let mut urls = server.creds.ws_urls(server.addr, 0..out.n)?;
    let probe_urls: Vec<_> = urls
        .split_off(out.n - probe.users)
        .into_iter()
        .map(|u| (u, 0))
        .collect();
    let urls = urls.into_iter().map(|u| (u, 0)).collect();
    let mut subscribers = JoinSet::new();
    let started = Instant::now();
    client::connect_all(urls, true, &rec, &mut subscribers)
        .await
        .map_err(|e| format!("connecting the subscribers: {e}"))?;
    let probe_rec = rec.clone();
    let mut probes = probe
        .run(async move {
            let mut probes = JoinSet::new();
            client::connect_all(probe_urls, true, &probe_rec, &mut probes)
                .await
                .map(|()| probes)
        })
        .await
        .map_err(|e| format!("connecting the probe subscribers: {e}"))?;
    out.connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  {} subscribers connected in {:.2} s ({} of them on the probe thread)",
        out.n, out.connect_secs, probe.users
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let result = parts(out, server, &rec, &probe, opts, load).await;
    probes.shutdown().await;
    subscribers.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    result
}

/// Subscribers at the end of the N (users `u{N-P}`..`u{N-1}`) that run on
/// their own thread, and the targets of part 2.
pub(crate) const PROBES: usize = 100;

/// A current-thread tokio runtime on a thread of its own, for what parts 2
/// and 3 time: the last [`PROBES`] of the N subscribers (the targets of the
/// user-targeted publishes), the senders of those publishes and the new
/// connections. The other subscribers are on the bench's main runtime,
/// where a broadcast wakes thousands of tasks at once: a receipt or a
/// connect timed there would wait behind them, which is the bench's delay,
/// not the server's. The probes still get every broadcast, like every
/// subscriber.
struct Probe {
    /// Where tasks are spawned onto the probe thread.
    handle: tokio::runtime::Handle,
    /// Subscribers on the probe thread.
    users: usize,
    /// Stops the thread's runtime when dropped.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// Starts the thread, with [`PROBES`] of the `n` subscribers (all if
    /// fewer).
    fn start(n: usize) -> Result<Probe, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("probe runtime: {e}"))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-probe".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| format!("probe thread: {e}"))?;
        Ok(Probe {
            handle,
            users: PROBES.min(n),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `task` on the probe thread and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        self.handle
            .spawn(task)
            .await
            .map_err(|e| format!("probe task: {e}"))?
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs the parts in order once the subscribers are connected, then
/// checks every count.
async fn parts(
    out: &mut Round,
    server: &Server<'_>,
    rec: &Arc<Recorder>,
    probe: &Probe,
    opts: &Options,
    load: &LoadOptions,
) -> Result<(), String> {
    use super::Part;
    let n = out.n as u64;
    let pad: Arc<str> = "x".repeat(opts.padding).into();
    let mut phases = Phases {
        next: 0,
        expected: Vec::new(),
    };
    let has = |p: Part| load.parts.contains(&p);
    // Tokens of part 3, minted before anything is timed.
    let connect_urls: Vec<String> = if has(Part::ConnectLatency) {
        (0..2 * load.connects)
            .map(|i| {
                let token = server.creds.token(&format!("x{i}"), &["bench"])?;
                Ok(format!("/ws?token={token}"))
            })
            .collect::<Result<_, String>>()?
    } else {
        Vec::new()
    };
    let (idle_urls, busy_urls) = connect_urls.split_at(connect_urls.len() / 2);

    if has(Part::ConnectLatency) {
        let c = probe
            .run(paced_connects(server.addr.to_string(), idle_urls.to_vec()))
            .await?;
        eprintln!(
            "  connect latency, idle: {} connections, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            c.connects,
            ms(c.p50_ns),
            ms(c.p99_ns),
            ms(c.max_ns)
        );
        out.connect_idle = Some(c);
    }
    if has(Part::UserLatency) {
        let phase = phases.take()?;
        let u = user_latency(server, rec, probe, &pad, phase, n, load, None).await?;
        phases.expected.push((phase, u.sent));
        report_user("no broadcasts", &u);
        out.user_idle = Some(u);
    }
    if has(Part::Publishers) {
        let m = opts.broadcasts(out.n) as u64;
        for &k in &opts.publishers {
            let phase = phases.take()?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut pool = connect_pool(server, k).await?;
            let clocks = Clocks::start(server.pid)?;
            let sent = broadcast_window(
                &mut pool,
                &pad,
                rec,
                phase,
                n,
                opts.window as u64,
                Until::Count(m),
            )
            .await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            rec.wait_for(phase, m * n, deadline).await?;
            let p = clocks.finish(server.pid, rec, phase)?;
            let ticks = server.ticks_per_sec;
            eprintln!(
                "  broadcast, {k} publisher(s): {} deliveries in {:.2} s = {:.0}/s; server CPU {:.2} µs/delivery \
                 ({:.0} % of a core), bench CPU {:.2} µs/delivery; latency p50 {:.1} ms, p99 {:.1} ms; \
                 publish requests p50 {:.2} ms, p99 {:.2} ms",
                p.deliveries,
                p.secs,
                p.per_sec(),
                p.cpu_us_per_delivery(ticks),
                p.server_ticks as f64 * 100.0 / ticks as f64 / p.secs,
                p.bench_ticks as f64 * 1e6 / ticks as f64 / p.deliveries.max(1) as f64,
                ms(p.p50_ns),
                ms(p.p99_ns),
                ms(sent.calls.quantile(0.5)),
                ms(sent.calls.quantile(0.99)),
            );
            if sent.wrong_replies > 0 {
                out.errors.push(format!(
                    "{k} publisher(s): {} publish replies did not say delivered {n}",
                    sent.wrong_replies
                ));
            }
            phases.expected.push((phase, m * n));
            out.publishers.push(Throughput {
                publishers: k,
                phase: p,
                call_p50_ns: sent.calls.quantile(0.5),
                call_p99_ns: sent.calls.quantile(0.99),
            });
        }
    }
    if has(Part::UserLatency) {
        let phase = phases.take()?;
        let background = phases.take()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let u = user_latency(server, rec, probe, &pad, phase, n, load, Some(background)).await?;
        phases.expected.push((phase, u.sent));
        if let Some(b) = u.background {
            phases.expected.push((background, b.deliveries));
        }
        report_user("during broadcasts", &u);
        out.user_busy = Some(u);
    }
    if has(Part::ConnectLatency) {
        let background = phases.take()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pool = connect_pool(server, 1).await?;
        let bg = Broadcasts::start(pool, pad.clone(), rec.clone(), background, n);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let connects = probe
            .run(paced_connects(server.addr.to_string(), busy_urls.to_vec()))
            .await;
        let b = bg.stop().await?;
        let mut c = connects?;
        c.background = Some(b);
        phases.expected.push((background, b.deliveries));
        eprintln!(
            "  connect latency during broadcasts ({} broadcasts, {:.0} deliveries/s): {} connections, \
             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            b.broadcasts,
            b.per_sec(),
            c.connects,
            ms(c.p50_ns),
            ms(c.p99_ns),
            ms(c.max_ns)
        );
        out.connect_busy = Some(c);
    }

    // Every count is exact: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rec.check_exact(phases.expected, &mut out.errors);
    let (closed, failed) = rec.ended();
    if closed + failed > 0 {
        out.errors.push(format!(
            "{closed} subscriber connections closed by the server, {failed} failed"
        ));
    }
    Ok(())
}

fn report_user(what: &str, u: &UserLatency) {
    eprintln!(
        "  user-targeted, {what}{}: {} publishes in {:.1} s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        u.background.map_or(String::new(), |b| format!(
            " ({} broadcasts, {:.0} deliveries/s)",
            b.broadcasts,
            b.per_sec()
        )),
        u.sent,
        u.secs,
        ms(u.p50_ns),
        ms(u.p99_ns),
        ms(u.max_ns)
    );
}

/// `count` keep-alive connections to the server.
async fn connect_pool(server: &Server<'_>, count: usize) -> Result<Vec<HttpConn>, String> {
    let mut pool = Vec::with_capacity(count);
    for _ in 0..count {
        pool.push(HttpConn::connect(server.addr, &server.creds.key).await?);
    }
    Ok(pool)
}

/// Part 2: user-targeted publishes at `--load-rate` for `--load-secs`, in
/// `phase`; with `background`, while broadcasts run back to back in that
/// phase.
#[allow(clippy::too_many_arguments)]
async fn user_latency(
    server: &Server<'_>,
    rec: &Arc<Recorder>,
    probe: &Probe,
    pad: &Arc<str>,
    phase: usize,
    n: u64,
    load: &LoadOptions,
    background: Option<usize>,
) -> Result<UserLatency, String> {
    let bg = match background {
        Some(phase) => {
            let pool = connect_pool(server, 1).await?;
            let bg = Broadcasts::start(pool, pad.clone(), rec.clone(), phase, n);
            // Into the steady state first.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some(bg)
        }
        None => None,
    };
    let sent = probe
        .run(paced_users(
            Sender {
                addr: server.addr.to_string(),
                key: server.creds.key.clone(),
                pad: pad.clone(),
                phase,
                rate: load.rate as f64,
                secs: load.secs,
            },
            n - probe.users as u64..n,
        ))
        .await;
    let background = match bg {
        Some(bg) => Some(bg.stop().await?),
        None => None,
    };
    let (sent, wrong, secs) = sent?;
    if wrong > 0 {
        return Err(format!(
            "{wrong} user-targeted publish replies did not say delivered 1"
        ));
    }
    rec.wait_for(phase, sent, Instant::now() + Duration::from_secs(30))
        .await?;
    let h = rec.histogram(phase);
    Ok(UserLatency {
        sent,
        secs,
        p50_ns: h.quantile(0.5),
        p99_ns: h.quantile(0.99),
        max_ns: h.quantile(1.0),
        background,
    })
}

/// What [`paced_users`] sends.
struct Sender {
    /// The server, `host:port`.
    addr: String,
    /// Its publish key.
    key: String,
    /// Filler of each payload.
    pad: Arc<str>,
    /// The phase of the publishes.
    phase: usize,
    /// Publishes per second.
    rate: f64,
    /// For how long.
    secs: f64,
}

/// Sends user-targeted publishes in `phase` to users `u<i>` drawn among
/// `users`, at `rate` per second for `secs`, from [`USER_SENDERS`]
/// connections each on its own schedule. Returns (publishes, replies that
/// did not say delivered 1, seconds).
async fn paced_users(
    sender: Sender,
    users: std::ops::Range<u64>,
) -> Result<(u64, u64, f64), String> {
    let Sender {
        addr,
        key,
        pad,
        phase,
        rate,
        secs,
    } = sender;
    let mut pool = Vec::with_capacity(USER_SENDERS);
    for _ in 0..USER_SENDERS {
        pool.push(HttpConn::connect(&addr, &key).await?);
    }
    let period = Duration::from_secs_f64(USER_SENDERS as f64 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let end = start + Duration::from_secs_f64(secs);
    let mut senders = JoinSet::new();
    for (j, mut conn) in pool.into_iter().enumerate() {
        let pad = pad.clone();
        let first = start + period * j as u32 / USER_SENDERS as u32;
        senders.spawn(async move {
            let mut rng = Rng::new(client::now_ns() ^ j as u64);
            let mut body = Vec::with_capacity(256);
            let (mut sent, mut wrong) = (0u64, 0u64);
            for k in 0u32.. {
                let at = first + period * k;
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                body.clear();
                http::write_body(
                    &mut body,
                    format_args!(
                        r#"{{"user":"u{}"}}"#,
                        users.start + rng.below(users.end - users.start)
                    ),
                    phase,
                    &pad,
                );
                let answer = conn.post(PUBLISH, &body).await?;
                if http::number_after(answer, b"\"delivered\":") != Some(1) {
                    wrong += 1;
                }
                sent += 1;
            }
            Ok::<_, String>((sent, wrong))
        });
    }
    let (mut sent, mut wrong) = (0, 0);
    while let Some(done) = senders.join_next().await {
        let (s, w) = done.map_err(|e| format!("sender task: {e}"))??;
        sent += s;
        wrong += w;
    }
    Ok((sent, wrong, (end - start).as_secs_f64()))
}

/// Opens one connection to the server at `addr` per target (`/ws?token=`),
/// [`CONNECT_RATE`] per second, each timed until its `connection` frame and
/// then closed.
async fn paced_connects(addr: String, targets: Vec<String>) -> Result<ConnectLatency, String> {
    let addr: Arc<str> = addr.into();
    let start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for (i, url) in targets.into_iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / CONNECT_RATE)).await;
        let addr = addr.clone();
        tasks.spawn(async move {
            let started = Instant::now();
            let ws = connect_hello(&addr, &url).await?;
            let ns = started.elapsed().as_nanos() as u64;
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.close()).await;
            Ok::<u64, String>(ns)
        });
    }
    let times = Histogram::new();
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.map_err(|e| format!("connect task: {e}"))? {
            Ok(ns) => times.record(ns),
            Err(e) => failures.push(e),
        }
    }
    if let Some(first) = failures.first() {
        return Err(format!(
            "{} of the new connections failed; the first: {first}",
            failures.len()
        ));
    }
    Ok(ConnectLatency {
        connects: times.count(),
        p50_ns: times.quantile(0.5),
        p99_ns: times.quantile(0.99),
        max_ns: times.quantile(1.0),
        background: None,
    })
}

/// When [`broadcast_window`] stops.
enum Until<'a> {
    /// After this many broadcasts.
    Count(u64),
    /// Once the flag is set.
    Stopped(&'a AtomicBool),
}

/// What [`broadcast_window`] sent.
struct Sent {
    /// Broadcasts published.
    broadcasts: u64,
    /// How long each publish request took, nanoseconds.
    calls: Histogram,
    /// Replies that did not say `delivered: <n>` (for [`Until::Count`]) or
    /// at least n (for [`Until::Stopped`], where the connections of part 3
    /// may count too).
    wrong_replies: u64,
}

/// Publishes broadcasts in `phase` to the `n` subscribers until `until`,
/// with at most `window` of them not yet fully delivered and at most one
/// publish request outstanding per connection of `pool`; returns once
/// every request was answered (not every delivery made).
async fn broadcast_window(
    pool: &mut Vec<HttpConn>,
    pad: &Arc<str>,
    rec: &Recorder,
    phase: usize,
    n: u64,
    window: u64,
    until: Until<'_>,
) -> Result<Sent, String> {
    type Task = JoinHandle<(HttpConn, Result<Option<u64>, String>, u64)>;
    let exact = matches!(until, Until::Count(_));
    let mut sent = Sent {
        broadcasts: 0,
        calls: Histogram::new(),
        wrong_replies: 0,
    };
    let mut in_flight: VecDeque<Task> = VecDeque::new();
    let join = async |task: Task, pool: &mut Vec<HttpConn>, sent: &mut Sent| {
        let (conn, delivered, ns) = task.await.map_err(|e| format!("publish task: {e}"))?;
        pool.push(conn);
        sent.calls.record(ns);
        let delivered = delivered?;
        let right = if exact {
            delivered == Some(n)
        } else {
            delivered.is_some_and(|d| d >= n)
        };
        if !right {
            sent.wrong_replies += 1;
        }
        Ok::<(), String>(())
    };
    let mut i = 0u64;
    loop {
        let more = match &until {
            Until::Count(m) => i < *m,
            Until::Stopped(flag) => !flag.load(Ordering::Relaxed),
        };
        if !more {
            break;
        }
        if i >= window {
            let deadline = Instant::now() + Duration::from_secs(60);
            rec.wait_for(phase, (i + 1 - window) * n, deadline).await?;
        }
        if pool.is_empty()
            && let Some(task) = in_flight.pop_front()
        {
            join(task, pool, &mut sent).await?;
        }
        let mut conn = pool.pop().ok_or("no publisher connection")?;
        let pad = pad.clone();
        in_flight.push_back(tokio::spawn(async move {
            let mut body = Vec::with_capacity(256);
            http::write_body(&mut body, format_args!("{BROADCAST}"), phase, &pad);
            let started = Instant::now();
            let delivered = conn
                .post(PUBLISH, &body)
                .await
                .map(|answer| http::number_after(answer, b"\"delivered\":"));
            (conn, delivered, started.elapsed().as_nanos() as u64)
        }));
        i += 1;
    }
    while let Some(task) = in_flight.pop_front() {
        join(task, pool, &mut sent).await?;
    }
    sent.broadcasts = i;
    Ok(sent)
}

/// Broadcasts back to back in the background (parts 2 and 3): one
/// publisher, at most [`BACKGROUND_WINDOW`] broadcasts not yet fully
/// delivered.
struct Broadcasts {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<Background, String>>,
}

impl Broadcasts {
    /// Starts publishing in `phase` to the `n` subscribers recorded by
    /// `rec`, over the connections of `pool`.
    fn start(
        pool: Vec<HttpConn>,
        pad: Arc<str>,
        rec: Arc<Recorder>,
        phase: usize,
        n: u64,
    ) -> Broadcasts {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut pool = pool;
            let started = Instant::now();
            let sent = broadcast_window(
                &mut pool,
                &pad,
                &rec,
                phase,
                n,
                BACKGROUND_WINDOW,
                Until::Stopped(&flag),
            )
            .await?;
            rec.wait_for(
                phase,
                sent.broadcasts * n,
                Instant::now() + Duration::from_secs(60),
            )
            .await?;
            if sent.wrong_replies > 0 {
                return Err(format!(
                    "background broadcasts: {} replies said fewer than {n} deliveries",
                    sent.wrong_replies
                ));
            }
            Ok(Background {
                broadcasts: sent.broadcasts,
                secs: started.elapsed().as_secs_f64(),
                deliveries: sent.broadcasts * n,
            })
        });
        Broadcasts { stop, task }
    }

    /// Stops publishing and waits until every broadcast reached every
    /// subscriber.
    async fn stop(self) -> Result<Background, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .map_err(|e| format!("background broadcasts: {e}"))?
    }
}
