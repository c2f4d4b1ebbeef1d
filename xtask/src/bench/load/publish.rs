//! `--load` parts 4 and 5, on a pgdn-server of their own with
//! `--load-targets` idle WebSocket subscribers (default 2,000; users
//! `u0`.., each with its own JWT) as the targets, then the same on the
//! bare baseline (`baseline.rs`) with as many subscribers:
//!
//! 4. **single**: user-targeted single publishes (`POST /api/v1/publish`,
//!    one message each) from `--load-conns` keep-alive HTTP connections
//!    (default 64), closed loop: each connection sends its next publish as
//!    soon as the last one was answered, for `--load-secs` seconds, each to
//!    a user drawn at random. Publishes/s is the publishes over the time
//!    from the start to the last answer or, if later, the last receipt
//!    (the baseline answers before it writes); the call time is each
//!    request's, as its connection sees it (the queueing of a closed loop
//!    included).
//! 5. **batch**: the batch endpoint (`POST /api/v1/publish/batch`,
//!    docs/protocol.md section 5) with [`BATCH`] user-targeted messages per
//!    request, each to a different user (`--load-batch-users` U: to U
//!    users in turn), from [`BATCH_CONNS`] connections,
//!    closed loop, for `--load-secs` seconds. Messages/s is every message
//!    of every answered batch over the same span.
//!
//! Both check that the subscribers received each message exactly once,
//! and pgdn's answers (`delivered: 1` for each message: every target is
//! connected once; the baseline does not count). Publish-to-receive
//! latency is the receipt time minus the send time in the payload. The
//! server's CPU time is taken from the start to the last receipt. The
//! bench writes its requests with its own small HTTP client (`http.rs`) to
//! leave the cores to the server.
//!
//! The baseline's figure is the ceiling of this machine for the same
//! requests at that moment: one write per message to a different socket,
//! with no history, no queue bound and no slow-consumer handling. On one
//! core, the writes alone (loopback TCP: the receiving side's kernel work
//! runs in the sender's `write`) take most of it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::super::client::{self, Histogram, Recorder};
use super::super::{
    Clocks, Credentials, Options, Server, Subscribers, launch, ms, pgdn_bin, start_pgdn,
};
use super::http::{self, HttpConn, PUBLISH, PUBLISH_BATCH, Rng};
use super::{LoadOptions, Part};

/// User-targeted messages per batch request (part 5).
pub(crate) const BATCH: usize = 100;
/// Keep-alive connections sending batches (part 5).
pub(crate) const BATCH_CONNS: usize = 16;

/// What one closed-loop phase measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    /// Messages published (and delivered).
    pub(crate) messages: u64,
    /// Requests made.
    pub(crate) requests: u64,
    /// From the start to the last answer or, if later, the last receipt.
    pub(crate) secs: f64,
    /// Request time p50, nanoseconds.
    pub(crate) call_p50_ns: u64,
    /// Request time p99, nanoseconds.
    pub(crate) call_p99_ns: u64,
    /// Publish-to-receive latency p50, nanoseconds.
    pub(crate) recv_p50_ns: u64,
    /// Publish-to-receive latency p99, nanoseconds.
    pub(crate) recv_p99_ns: u64,
    /// The server's CPU time from the start to the last receipt, in clock
    /// ticks.
    pub(crate) server_ticks: u64,
    /// The bench's own CPU time over the same span.
    pub(crate) bench_ticks: u64,
}

impl Rate {
    /// Messages per second.
    pub(crate) fn per_sec(&self) -> f64 {
        self.messages as f64 / self.secs.max(1e-9)
    }

    /// The server's CPU per message, in microseconds.
    pub(crate) fn server_us(&self, ticks_per_sec: u64) -> f64 {
        self.server_ticks as f64 * 1e6 / ticks_per_sec as f64 / self.messages.max(1) as f64
    }
}

/// What parts 4 and 5 measured in one round, on pgdn and on the bare
/// baseline.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    /// Which round of `--rounds` (from 0).
    pub(crate) round: usize,
    /// Part 4 on pgdn.
    pub(crate) single: Option<Rate>,
    /// Part 5 on pgdn.
    pub(crate) batch: Option<Rate>,
    /// Part 4 on the bare baseline (`baseline.rs`).
    pub(crate) bare_single: Option<Rate>,
    /// Part 5 on the bare baseline.
    pub(crate) bare_batch: Option<Rate>,
    /// What went wrong, if anything.
    pub(crate) errors: Vec<String>,
}

/// Starts a pgdn-server, connects the targets, measures the parts of 4
/// and 5 that `load.parts` names, and stops the server; then the same on
/// the bare baseline, so that each round has the ceiling of this machine
/// at that moment beside pgdn's figure: the baseline writes each message
/// to its socket with nothing else to do.
pub(crate) fn run_round(
    round: usize,
    opts: &Options,
    load: &LoadOptions,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Round {
    let mut out = Round {
        round,
        single: None,
        batch: None,
        bare_single: None,
        bare_batch: None,
        errors: Vec::new(),
    };
    let creds = Credentials::new();
    let max = (load.targets + 1000).to_string();
    match start_pgdn(
        &pgdn_bin(opts, bin_dir),
        "pgdn-server",
        &creds,
        &["--max-connections", &max],
    ) {
        Ok((process, addr)) => {
            let target = Target {
                addr: &addr,
                key: &creds.key,
                pid: process.pid(),
                ticks_per_sec,
                answers: true,
            };
            let result = creds.ws_urls(&addr, 0..load.targets).and_then(|urls| {
                runtime.block_on(measure(&target, urls, true, opts, load, &mut out.errors))
            });
            match result {
                Ok((single, batch)) => (out.single, out.batch) = (single, batch),
                Err(e) => out.errors.push(e),
            }
            eprintln!("xtask bench: {}", process.stop(Duration::from_secs(20)));
        }
        Err(e) => out.errors.push(e),
    }
    match launch(Server::Baseline, load.targets, bin_dir, opts) {
        Ok((process, endpoints)) => {
            let addr = endpoints
                .publish_url
                .strip_prefix("http://")
                .and_then(|a| a.strip_suffix("/publish"))
                .unwrap_or_default()
                .to_string();
            let target = Target {
                addr: &addr,
                key: "",
                pid: process.pid(),
                ticks_per_sec,
                // The baseline does not count who took a user-targeted
                // message; the subscribers' counts are checked instead.
                answers: false,
            };
            let result = match endpoints.subscribers {
                Subscribers::Ws { urls, hello } => {
                    runtime.block_on(measure(&target, urls, hello, opts, load, &mut out.errors))
                }
                Subscribers::Sse { .. } => Err("the baseline serves WebSocket only".into()),
            };
            match result {
                Ok((single, batch)) => (out.bare_single, out.bare_batch) = (single, batch),
                Err(e) => out.errors.push(format!("baseline: {e}")),
            }
            eprintln!("xtask bench: {}", process.stop(Duration::from_secs(20)));
        }
        Err(e) => out.errors.push(format!("baseline: {e}")),
    }
    for e in &out.errors {
        eprintln!("  problem: {e}");
    }
    out
}

/// The server of one round.
struct Target<'a> {
    /// Its HTTP `host:port`.
    addr: &'a str,
    /// The publish key.
    key: &'a str,
    pid: u32,
    ticks_per_sec: u64,
    /// Whether its answers say how many connections took each message
    /// (pgdn: `"delivered":1`), which is then checked.
    answers: bool,
}

/// Connects the subscribers at `urls` (each counted once connected, or
/// once its `connection` frame arrived with `hello`), then measures parts
/// 4 and 5 as `load.parts` says; the subscribers' problems go to
/// `errors`.
async fn measure(
    target: &Target<'_>,
    urls: Vec<String>,
    hello: bool,
    opts: &Options,
    load: &LoadOptions,
    errors: &mut Vec<String>,
) -> Result<(Option<Rate>, Option<Rate>), String> {
    let rec = Recorder::new();
    let mut subscribers = JoinSet::new();
    let started = Instant::now();
    client::connect_all(
        urls.into_iter().map(|u| (u, 0)).collect(),
        hello,
        &rec,
        &mut subscribers,
    )
    .await
    .map_err(|e| format!("connecting the subscribers: {e}"))?;
    eprintln!(
        "  {} target subscribers connected in {:.2} s",
        load.targets,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pad: Arc<str> = "x".repeat(opts.padding).into();
    let who = if target.answers { "pgdn" } else { "baseline" };
    let result = async {
        let mut single = None;
        let mut batch = None;
        if load.parts.contains(&Part::Single) {
            let r = closed_loop(target, &rec, &pad, 1, load, load.conns, 1).await?;
            report(
                &format!("{who}, single publishes"),
                &r,
                target.ticks_per_sec,
            );
            single = Some(r);
        }
        if load.parts.contains(&Part::Batch) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = closed_loop(target, &rec, &pad, 2, load, BATCH_CONNS, BATCH).await?;
            report(
                &format!("{who}, batches of {BATCH}, messages"),
                &r,
                target.ticks_per_sec,
            );
            batch = Some(r);
        }
        Ok::<_, String>((single, batch))
    }
    .await;
    let (closed, failed) = rec.ended();
    if closed + failed > 0 {
        errors.push(format!(
            "{who}: {closed} subscriber connections closed by the server, {failed} failed"
        ));
    }
    subscribers.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    result
}

fn report(what: &str, r: &Rate, ticks_per_sec: u64) {
    eprintln!(
        "  {what}: {} in {} requests in {:.2} s = {:.0}/s; request p50 {:.2} ms, p99 {:.2} ms; \
         publish-to-receive p50 {:.2} ms, p99 {:.2} ms; server CPU {:.2} µs/message, bench CPU {:.2} µs/message",
        r.messages,
        r.requests,
        r.secs,
        r.per_sec(),
        ms(r.call_p50_ns),
        ms(r.call_p99_ns),
        ms(r.recv_p50_ns),
        ms(r.recv_p99_ns),
        r.server_us(ticks_per_sec),
        r.bench_ticks as f64 * 1e6 / ticks_per_sec as f64 / r.messages.max(1) as f64,
    );
}

/// `conns` connections each publishing requests of `batch` user-targeted
/// messages (1: the single publish route) one after the other for
/// `--load-secs`, in `phase`; waits for every delivery and checks the
/// counts.
async fn closed_loop(
    target: &Target<'_>,
    rec: &Arc<Recorder>,
    pad: &Arc<str>,
    phase: usize,
    load: &LoadOptions,
    conns: usize,
    batch: usize,
) -> Result<Rate, String> {
    let users = load.targets as u64;
    let path = if batch == 1 { PUBLISH } else { PUBLISH_BATCH };
    let mut pool = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = HttpConn::connect(target.addr, target.key).await?;
        // Untimed, to a user nobody is: the server's first-time costs.
        let mut body = Vec::new();
        let nobody = format_args!(r#"{{"user":"nobody"}}"#);
        if batch == 1 {
            http::write_body(&mut body, nobody, 0, pad);
        } else {
            body.push(b'[');
            http::write_body(&mut body, nobody, 0, pad);
            body.push(b']');
        }
        conn.post(path, &body).await?;
        pool.push(conn);
    }
    let calls = Arc::new(Histogram::new());
    let clocks = Clocks::start(target.pid)?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(load.secs);
    let mut tasks = JoinSet::new();
    let answers = target.answers;
    let spread = load.batch_users as u64;
    for (j, mut conn) in pool.into_iter().enumerate() {
        let (calls, pad) = (calls.clone(), pad.clone());
        tasks.spawn(async move {
            let mut rng = Rng::new(client::now_ns() ^ (j as u64) << 32);
            let mut body = Vec::with_capacity(256 * batch);
            let (mut requests, mut wrong) = (0u64, 0u64);
            let mut last = Instant::now();
            while last < end {
                body.clear();
                if batch == 1 {
                    let user = rng.below(users);
                    http::write_body(
                        &mut body,
                        format_args!(r#"{{"user":"u{user}"}}"#),
                        phase,
                        &pad,
                    );
                } else {
                    let first = rng.below(users);
                    body.push(b'[');
                    for i in 0..batch as u64 {
                        if i > 0 {
                            body.push(b',');
                        }
                        let user = (first + i % spread) % users;
                        http::write_body(
                            &mut body,
                            format_args!(r#"{{"user":"u{user}"}}"#),
                            phase,
                            &pad,
                        );
                    }
                    body.push(b']');
                }
                let t = Instant::now();
                let answer = conn.post(path, &body).await?;
                let ok = !answers
                    || if batch == 1 {
                        http::number_after(answer, b"\"delivered\":") == Some(1)
                    } else {
                        http::count_values(answer, b"\"delivered\":", 1) == batch
                    };
                last = Instant::now();
                calls.record((last - t).as_nanos() as u64);
                requests += 1;
                if !ok {
                    wrong += 1;
                }
            }
            Ok::<_, String>((requests, wrong, last))
        });
    }
    let (mut requests, mut wrong, mut last) = (0, 0, start);
    let mut failure = None;
    while let Some(done) = tasks.join_next().await {
        match done.map_err(|e| format!("publisher task: {e}"))? {
            Ok((r, w, l)) => {
                requests += r;
                wrong += w;
                last = last.max(l);
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let secs = (last - start).as_secs_f64();
    let messages = requests * batch as u64;
    if wrong > 0 {
        return Err(format!(
            "{wrong} of {requests} answers did not say delivered 1 for every message"
        ));
    }
    rec.wait_for(phase, messages, Instant::now() + Duration::from_secs(60))
        .await?;
    let p = clocks.finish(target.pid, rec, phase)?;
    // Anything past `messages` would be a repeated delivery.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received = rec.count(phase);
    if received != messages {
        return Err(format!("{received} deliveries for {messages} messages"));
    }
    Ok(Rate {
        messages,
        requests,
        // A server that answers before it writes (the baseline queues
        // without a bound) is done when the last message arrived.
        secs: secs.max(p.secs),
        call_p50_ns: calls.quantile(0.5),
        call_p99_ns: calls.quantile(0.99),
        recv_p50_ns: p.p50_ns,
        recv_p99_ns: p.p99_ns,
        server_ticks: p.server_ticks,
        bench_ticks: p.bench_ticks,
    })
}
