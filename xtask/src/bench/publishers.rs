//! `cargo xtask bench --publisher`: how many publishes per second
//! `pgdn_client::blocking::Publisher` makes, and how long one call takes,
//! from plain `std::thread`s.
//!
//! It starts one release `pgdn-server` and connects one subscriber, user
//! `u0`. Every publish is user-targeted to `u0` (`notify_user`), so every
//! one is a delivery that the subscriber counts and times; a configuration
//! passes only when each of its publishes was answered with `delivered: 1`
//! and reached the subscriber exactly once. The configurations, each
//! `--publishes` publishes:
//!
//! - one thread with one blocking `Publisher`;
//! - T threads (each `--threads` value above 1) sharing one `Publisher`,
//!   which is how its docs suggest using it ("cheap to clone; calls from
//!   several threads run concurrently");
//! - T threads with a `Publisher` each (each has its own worker thread and
//!   connection pool);
//! - as a reference without the blocking wrapper: the async
//!   `pgdn_client::Publisher` from 1 task and from the largest T tasks on
//!   the bench's tokio runtime.
//!
//! The threads start together behind a barrier, after one untimed warm-up
//! publish per `Publisher` (which opens its first connection). Publishes/s
//! is the publishes over the time from the start until the last call
//! returned. Call latency is the time of each `notify_user` call, as the
//! calling thread sees it. Publish-to-receive latency is the subscriber's
//! receipt time minus the send time written in the payload. Server CPU is
//! the server's utime + stime from the start until the last receipt, per
//! publish. Every `--rounds` round runs every configuration, in reverse
//! order in odd rounds; medians are reported.

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::client::{self, Histogram, Recorder, now_ns};
use super::procs::{self, ServerProcess};
use super::{Credentials, Options, median, ms, pgdn_bin, start_pgdn, thousands};

/// The one subscriber's user.
const USER: &str = "u0";

/// How the publishing threads (or tasks) get their publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `blocking::Publisher`, one for all threads.
    Shared,
    /// `blocking::Publisher`, one per thread.
    PerThread,
    /// The async `pgdn_client::Publisher`, one for all tasks.
    Async,
}

/// One configuration: how many callers, with which publisher.
#[derive(Debug, Clone, Copy)]
struct Config {
    /// Which publisher, shared or not.
    kind: Kind,
    /// Threads (or tasks) calling it.
    callers: usize,
}

impl Config {
    /// How tables and messages name it.
    fn label(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        match (self.kind, self.callers) {
            (Kind::Shared, 1) => "blocking, 1 thread".into(),
            (Kind::Shared, t) => format!("blocking, {t} threads, one shared Publisher"),
            (Kind::PerThread, t) => format!("blocking, {t} threads, a Publisher each"),
            (Kind::Async, t) => format!("async (reference), {}", plural(t, "task")),
        }
    }
}

/// What one configuration measured in one round.
#[derive(Debug, Clone)]
struct Sample {
    /// Index into [`Report::configs`].
    config: usize,
    /// Which round of `--rounds` (from 0).
    round: usize,
    /// Publishes made (and deliveries received).
    publishes: u64,
    /// From the start until the last call returned.
    secs: f64,
    /// Call latency p50, nanoseconds.
    call_p50_ns: u64,
    /// Call latency p99, nanoseconds.
    call_p99_ns: u64,
    /// Publish-to-receive latency p50, nanoseconds.
    recv_p50_ns: u64,
    /// Publish-to-receive latency p99, nanoseconds.
    recv_p99_ns: u64,
    /// The server's CPU time from the start until the last receipt.
    server_ticks: u64,
    /// The bench's own CPU time over the same span.
    bench_ticks: u64,
}

impl Sample {
    /// Publishes per second.
    fn per_sec(&self) -> f64 {
        self.publishes as f64 / self.secs.max(1e-9)
    }
}

/// Everything `--publisher` measured.
pub(crate) struct Report {
    /// The configurations, in table order.
    configs: Vec<Config>,
    /// Every configuration's sample of every round.
    samples: Vec<Sample>,
    /// What went wrong, if anything.
    errors: Vec<String>,
}

/// The payload of every publish: phase, filler and send time, which the
/// subscriber finds as `"p":` and `"t":`.
#[derive(Serialize)]
struct Payload<'a> {
    /// The phase (one per configuration and round).
    p: usize,
    /// Filler.
    pad: &'a str,
    /// Send time, [`now_ns`].
    t: u64,
}

/// The configurations for `--threads`.
fn configs(threads: &[usize]) -> Vec<Config> {
    let mut out = vec![Config {
        kind: Kind::Shared,
        callers: 1,
    }];
    for &t in threads.iter().filter(|&&t| t > 1) {
        out.push(Config {
            kind: Kind::Shared,
            callers: t,
        });
        out.push(Config {
            kind: Kind::PerThread,
            callers: t,
        });
    }
    let most = threads.iter().copied().max().unwrap_or(1);
    out.push(Config {
        kind: Kind::Async,
        callers: 1,
    });
    if most > 1 {
        out.push(Config {
            kind: Kind::Async,
            callers: most,
        });
    }
    out
}

/// Runs every configuration `--rounds` times against one pgdn-server.
pub(crate) fn run(
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Result<Report, String> {
    let configs = configs(&opts.threads);
    if 1 + configs.len() * opts.rounds >= client::PHASES {
        return Err(format!(
            "{} configurations x {} rounds is more phases than the bench tells apart ({})",
            configs.len(),
            opts.rounds,
            client::PHASES - 1
        ));
    }
    let creds = Credentials::new();
    let (process, addr) = start_pgdn(&pgdn_bin(opts, bin_dir), "pgdn-server", &creds, &[])?;
    let mut report = Report {
        configs,
        samples: Vec::new(),
        errors: Vec::new(),
    };
    let result = measure(
        &mut report,
        &process,
        &addr,
        &creds,
        opts,
        runtime,
        ticks_per_sec,
    );
    eprintln!("xtask bench: {}", process.stop(Duration::from_secs(20)));
    result.map(|()| report)
}

/// Connects the subscriber and measures every configuration.
fn measure(
    report: &mut Report,
    process: &ServerProcess,
    addr: &str,
    creds: &Credentials,
    opts: &Options,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Result<(), String> {
    let base_url = format!("http://{addr}");
    let rec = Recorder::new();
    let mut subscribers = JoinSet::new();
    let urls = creds
        .ws_urls(addr, 0..1)?
        .into_iter()
        .map(|u| (u, 0))
        .collect();
    runtime.block_on(client::connect_all(urls, true, &rec, &mut subscribers))?;
    let pad = "x".repeat(opts.padding);
    let mut phase = 0;
    for round in 0..opts.rounds {
        let mut order: Vec<usize> = (0..report.configs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            phase += 1;
            let config = report.configs[i];
            eprintln!(
                "\nxtask bench: {}, round {} of {}: {} user-targeted publishes",
                config.label(),
                round + 1,
                opts.rounds,
                opts.publishes
            );
            std::thread::sleep(Duration::from_millis(300));
            match one(
                config,
                &base_url,
                &creds.key,
                &rec,
                phase,
                &pad,
                opts.publishes as u64,
                process.pid(),
                runtime,
            ) {
                Ok(mut sample) => {
                    sample.config = i;
                    sample.round = round;
                    eprintln!(
                        "  {} publishes in {:.2} s = {:.0}/s; call p50 {:.3} ms, p99 {:.3} ms; \
                         publish-to-receive p50 {:.3} ms, p99 {:.3} ms; server CPU {:.1} µs/publish, bench CPU {:.1} µs/publish",
                        sample.publishes,
                        sample.secs,
                        sample.per_sec(),
                        ms(sample.call_p50_ns),
                        ms(sample.call_p99_ns),
                        ms(sample.recv_p50_ns),
                        ms(sample.recv_p99_ns),
                        us_per(sample.server_ticks, sample.publishes, ticks_per_sec),
                        us_per(sample.bench_ticks, sample.publishes, ticks_per_sec),
                    );
                    report.samples.push(sample);
                }
                Err(e) => {
                    eprintln!("  problem: {e}");
                    report
                        .errors
                        .push(format!("{}, round {}: {e}", config.label(), round + 1));
                }
            }
        }
    }
    let (closed, failed) = rec.ended();
    if closed + failed > 0 {
        report.errors.push(format!(
            "the subscriber's connection ended ({closed} closed by the server, {failed} failed)"
        ));
    }
    runtime.block_on(subscribers.shutdown());
    Ok(())
}

/// CPU microseconds per item.
fn us_per(ticks: u64, items: u64, ticks_per_sec: u64) -> f64 {
    ticks as f64 * 1e6 / ticks_per_sec as f64 / items.max(1) as f64
}

/// Measures one configuration: `total` publishes in `phase`.
#[allow(clippy::too_many_arguments)]
fn one(
    config: Config,
    base_url: &str,
    key: &str,
    rec: &Arc<Recorder>,
    phase: usize,
    pad: &str,
    total: u64,
    pid: u32,
    runtime: &tokio::runtime::Runtime,
) -> Result<Sample, String> {
    let calls = Histogram::new();
    let problems = Mutex::new(Vec::<String>::new());
    let server_before = procs::cpu_ticks(pid)?;
    let bench_before = procs::own_cpu_ticks();
    let secs = match config.kind {
        Kind::Shared | Kind::PerThread => {
            let new = || {
                pgdn_client::blocking::Publisher::new(base_url, key)
                    .map_err(|e| format!("blocking::Publisher::new: {e}"))
            };
            let publishers = match config.kind {
                Kind::Shared => vec![new()?],
                _ => (0..config.callers)
                    .map(|_| new())
                    .collect::<Result<_, _>>()?,
            };
            // Untimed: the first call of each opens its connection.
            for p in &publishers {
                p.notify_user(
                    USER,
                    "bench",
                    Payload {
                        p: 0,
                        pad,
                        t: now_ns(),
                    },
                )
                .map_err(|e| format!("warm-up publish: {e}"))?;
            }
            let barrier = Barrier::new(config.callers + 1);
            let started = std::thread::scope(|s| {
                for j in 0..config.callers {
                    let publisher = publishers[j % publishers.len()].clone();
                    let (barrier, calls, problems) = (&barrier, &calls, &problems);
                    s.spawn(move || {
                        barrier.wait();
                        for _ in (j as u64..total).step_by(config.callers) {
                            let payload = Payload {
                                p: phase,
                                pad,
                                t: now_ns(),
                            };
                            let call = Instant::now();
                            let result = publisher.notify_user(USER, "bench", payload);
                            calls.record(call.elapsed().as_nanos() as u64);
                            if let Some(problem) = check(result.map(|r| r.delivered)) {
                                problems
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(problem);
                                return;
                            }
                        }
                    });
                }
                barrier.wait();
                Instant::now()
            });
            // The scope joined every thread before it returned.
            started.elapsed().as_secs_f64()
        }
        Kind::Async => runtime.block_on(async {
            let publisher = pgdn_client::Publisher::new(base_url, key)
                .map_err(|e| format!("Publisher::new: {e}"))?;
            publisher
                .notify_user(
                    USER,
                    "bench",
                    Payload {
                        p: 0,
                        pad,
                        t: now_ns(),
                    },
                )
                .await
                .map_err(|e| format!("warm-up publish: {e}"))?;
            let calls = &calls;
            let started = Instant::now();
            let tasks = (0..config.callers).map(|j| {
                let publisher = publisher.clone();
                async move {
                    for _ in (j as u64..total).step_by(config.callers) {
                        let payload = Payload {
                            p: phase,
                            pad,
                            t: now_ns(),
                        };
                        let call = Instant::now();
                        let result = publisher.notify_user(USER, "bench", payload).await;
                        calls.record(call.elapsed().as_nanos() as u64);
                        if let Some(problem) = check(result.map(|r| r.delivered)) {
                            return Err(problem);
                        }
                    }
                    Ok(())
                }
            });
            for done in futures_util::future::join_all(tasks).await {
                if let Err(problem) = done {
                    problems
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(problem);
                }
            }
            Ok::<_, String>(started.elapsed().as_secs_f64())
        })?,
    };
    let problems = problems.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(first) = problems.first() {
        return Err(format!(
            "{} publishers failed; the first: {first}",
            problems.len()
        ));
    }
    runtime.block_on(rec.wait_for(phase, total, Instant::now() + Duration::from_secs(60)))?;
    let server_ticks = procs::cpu_ticks(pid)?.saturating_sub(server_before);
    let bench_ticks = procs::own_cpu_ticks().saturating_sub(bench_before);
    // Anything past `total` would be a repeated delivery.
    std::thread::sleep(Duration::from_millis(100));
    let received = rec.count(phase);
    if received != total {
        return Err(format!("{received} deliveries for {total} publishes"));
    }
    let recv = rec.histogram(phase);
    Ok(Sample {
        config: 0,
        round: 0,
        publishes: total,
        secs,
        call_p50_ns: calls.quantile(0.50),
        call_p99_ns: calls.quantile(0.99),
        recv_p50_ns: recv.quantile(0.50),
        recv_p99_ns: recv.quantile(0.99),
        server_ticks,
        bench_ticks,
    })
}

/// A problem with one publish's result, if any: an error, or a reply
/// that does not say it reached the one connection.
fn check(delivered: pgdn_client::Result<Option<usize>>) -> Option<String> {
    match delivered {
        Ok(Some(1)) => None,
        Ok(other) => Some(format!("the reply said delivered {other:?}, not 1")),
        Err(e) => Some(format!("publish: {e}")),
    }
}

/// Prints the Markdown table: medians per configuration, then every
/// sample.
pub(crate) fn print(report: &Report, opts: &Options, ticks_per_sec: u64) {
    println!(
        "### Blocking publisher\n\n{} user-targeted publishes per configuration (one user, one \
         connected subscriber), {} filler bytes; medians of {} round(s).\n",
        thousands(opts.publishes as f64),
        opts.padding,
        opts.rounds
    );
    println!(
        "| publisher | publishes/s | call p50 (ms) | call p99 (ms) | publish-to-receive p50 (ms) | publish-to-receive p99 (ms) | server CPU per publish (µs) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let of = |i: usize| -> Vec<&Sample> {
        let mut v: Vec<&Sample> = report.samples.iter().filter(|s| s.config == i).collect();
        v.sort_by_key(|s| s.round);
        v
    };
    let med = |v: &[&Sample], f: &dyn Fn(&Sample) -> f64| median(v.iter().map(|s| f(s)).collect());
    for (i, config) in report.configs.iter().enumerate() {
        let v = of(i);
        let cell = |x: Option<f64>, fmt: &dyn Fn(f64) -> String| x.map_or("-".into(), fmt);
        let three = |x: f64| format!("{x:.3}");
        let two = |x: f64| format!("{x:.2}");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            config.label(),
            cell(med(&v, &Sample::per_sec), &thousands),
            cell(med(&v, &|s| ms(s.call_p50_ns)), &three),
            cell(med(&v, &|s| ms(s.call_p99_ns)), &three),
            cell(med(&v, &|s| ms(s.recv_p50_ns)), &three),
            cell(med(&v, &|s| ms(s.recv_p99_ns)), &two),
            cell(
                med(&v, &|s| us_per(s.server_ticks, s.publishes, ticks_per_sec)),
                &|x| format!("{x:.1}")
            ),
        );
    }
    println!("\nEvery sample of publishes/s, in round order:\n");
    for (i, config) in report.configs.iter().enumerate() {
        let list: Vec<String> = of(i).iter().map(|s| thousands(s.per_sec())).collect();
        println!("- {}: {}", config.label(), list.join(", "));
    }
    for e in &report.errors {
        println!("- problem: {e}");
    }
    println!();
}
