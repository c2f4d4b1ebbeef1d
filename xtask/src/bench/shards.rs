//! `cargo xtask bench --cluster --cluster-parts shards`: user-targeted
//! deliveries/s with the same three pgdn nodes on 1, 2 and 3 independent
//! Redis shards (`--redis-mode shards`, `--shards` sets the counts).
//!
//! For each shard count and round (the order of the counts reversed in odd
//! rounds): that many private `redis-server`s (pgdn-testkit), three nodes
//! with `--redis-mode shards --redis-url <every shard, in order>`, and
//! [`USERS`] users `u0..`, user `u<i>` connected once to node `i mod 3`
//! (the users hash to all the partitions, so to every shard). Then
//! `--shard-publishes` user-targeted publishes, one user each (user
//! `7 i mod USERS` for publish `i`), sent as batches of [`BATCH`] to the
//! **batch endpoint of every node**, [`BATCHES_PER_NODE`] batches in flight
//! per node: one HTTP request carries 50 publishes, so the publishers
//! cost the nodes little next to the publish scripts in Redis. A node
//! publishes a batch's items one after another, each a publish script on
//! the shard of its user's partition.
//!
//! Deliveries/s is every frame received over the time from the first
//! publish to the last receipt. Over the same span: each shard's CPU
//! (`INFO cpu`) and publish scripts run, the pgdn processes' CPU and the
//! bench's (`/proc`). Everything runs on the same cores.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::client::{self, Recorder};
use super::procs;
use super::redis_probe::{self, Probes, Usage};
use super::scale::{Build, Nodes};
use super::{Credentials, Options, median, ms, thousands};

/// Subscribers, one user each.
const USERS: usize = 3000;
/// Nodes.
const NODES: usize = 3;
/// Publishes per batch request.
const BATCH: usize = 50;
/// Batch requests in flight per node.
const BATCHES_PER_NODE: usize = 8;
/// The recorder's phase of the publishes.
const PHASE: usize = 2;

/// What one shard count measured in one round.
#[derive(Debug, Clone)]
struct Sample {
    shards: usize,
    round: usize,
    /// Frames received.
    deliveries: u64,
    /// From the first publish to the last receipt.
    secs: f64,
    /// Each shard's usage over that span.
    redis: Vec<Usage>,
    /// CPU ticks of the three nodes together.
    pgdn_ticks: u64,
    /// CPU ticks of the bench.
    bench_ticks: u64,
    /// Publish-to-receive latency, nanoseconds.
    p50_ns: u64,
    p99_ns: u64,
    errors: Vec<String>,
}

impl Sample {
    fn per_sec(&self) -> f64 {
        self.deliveries as f64 / self.secs.max(1e-9)
    }

    /// Redis CPU of every shard together, µs per publish.
    fn redis_us_per_publish(&self) -> f64 {
        self.redis.iter().map(|u| u.cpu_secs).sum::<f64>() * 1e6 / self.deliveries.max(1) as f64
    }
}

/// Everything the part measured.
pub(crate) struct Report {
    samples: Vec<Sample>,
}

/// Runs every shard count, `--rounds` times.
pub(crate) fn run(
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Result<Report, String> {
    let mut samples = Vec::new();
    for round in 0..opts.rounds {
        let mut order = opts.shards.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for &shards in &order {
            eprintln!(
                "\nxtask bench: {shards} shard(s), round {} of {} ({} user-targeted publishes)",
                round + 1,
                opts.rounds,
                opts.shard_publishes
            );
            let mut sample = Sample {
                shards,
                round,
                deliveries: 0,
                secs: 0.0,
                redis: Vec::new(),
                pgdn_ticks: 0,
                bench_ticks: 0,
                p50_ns: 0,
                p99_ns: 0,
                errors: Vec::new(),
            };
            if let Err(e) = run_one(&mut sample, opts, bin_dir, runtime, ticks_per_sec) {
                eprintln!("  problem: {e}");
                sample.errors.push(e);
            }
            samples.push(sample);
        }
    }
    Ok(Report { samples })
}

fn run_one(
    sample: &mut Sample,
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Result<(), String> {
    let redis = pgdn_testkit::RedisServer::start_many(sample.shards);
    let url = redis
        .iter()
        .map(pgdn_testkit::RedisServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let ports: Vec<u16> = redis.iter().map(pgdn_testkit::RedisServer::port).collect();
    let creds = Credentials::new();
    let nodes = Nodes::start(
        &Build::After.bin(opts, bin_dir),
        Build::After,
        &creds,
        NODES,
        ("shards", &url),
        USERS + 1000,
        opts.padding,
    )?;
    let result = runtime.block_on(async {
        nodes.wait_ready().await?;
        let rec = Recorder::with_slots(NODES);
        let mut urls = Vec::with_capacity(USERS);
        for (k, addr) in nodes.addrs().iter().enumerate() {
            let users = (k..USERS).step_by(NODES);
            urls.extend(creds.ws_urls(addr, users)?.into_iter().map(|u| (u, k)));
        }
        let mut subscribers = JoinSet::new();
        let result = match client::connect_all(urls, true, &rec, &mut subscribers).await {
            Ok(()) => publish(sample, &nodes, &rec, &ports, opts, ticks_per_sec).await,
            Err(e) => Err(format!("connecting the subscribers: {e}")),
        };
        subscribers.shutdown().await;
        result
    });
    nodes.stop();
    drop(redis);
    result
}

async fn publish(
    sample: &mut Sample,
    nodes: &Nodes,
    rec: &Arc<Recorder>,
    ports: &[u16],
    opts: &Options,
    ticks_per_sec: u64,
) -> Result<(), String> {
    // Let the registrations settle.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pids = nodes.pids();
    let total = opts.shard_publishes as u64;
    let batches = total.div_ceil(BATCH as u64);
    let mut probes = Probes::connect(ports)?;
    let before = probes.snapshot()?;
    let pgdn_before: u64 = pids
        .iter()
        .map(|&p| procs::cpu_ticks(p))
        .sum::<Result<u64, _>>()?;
    let bench_before = procs::own_cpu_ticks();
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for publisher in &nodes.publishers {
        for _ in 0..BATCHES_PER_NODE {
            let (next, publisher) = (next.clone(), publisher.clone());
            tasks.spawn(async move {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok::<(), String>(());
                    }
                    let first = b * BATCH as u64;
                    let targets: Vec<String> = (first..(first + BATCH as u64).min(total))
                        .map(|i| format!(r#"{{"user":"u{}"}}"#, (i * 7) % USERS as u64))
                        .collect();
                    publisher.publish_batch(&targets, PHASE).await?;
                }
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| format!("publisher task: {e}"))??;
    }
    rec.wait_for(PHASE, total, Instant::now() + Duration::from_secs(60))
        .await?;
    sample.secs = started.elapsed().as_secs_f64();
    let after = probes.snapshot()?;
    sample.redis = redis_probe::usages(&before, &after);
    sample.pgdn_ticks = pids
        .iter()
        .map(|&p| procs::cpu_ticks(p))
        .sum::<Result<u64, _>>()?
        .saturating_sub(pgdn_before);
    sample.bench_ticks = procs::own_cpu_ticks().saturating_sub(bench_before);
    sample.deliveries = rec.count(PHASE);
    let h = rec.histogram(PHASE);
    sample.p50_ns = h.quantile(0.50);
    sample.p99_ns = h.quantile(0.99);
    let core = |ticks: u64| ticks as f64 * 100.0 / ticks_per_sec as f64 / sample.secs;
    eprintln!(
        "  {} deliveries in {:.2} s = {:.0}/s; Redis CPU per shard {} % of a core ({:.1} µs per publish); \
         pgdn {:.0} %, bench {:.0} %; latency p50 {:.1} ms, p99 {:.1} ms",
        sample.deliveries,
        sample.secs,
        sample.per_sec(),
        sample
            .redis
            .iter()
            .map(|u| format!("{:.0}", u.cpu_secs * 100.0 / sample.secs))
            .collect::<Vec<_>>()
            .join(" / "),
        sample.redis_us_per_publish(),
        core(sample.pgdn_ticks),
        core(sample.bench_ticks),
        ms(sample.p50_ns),
        ms(sample.p99_ns),
    );
    // Give a late duplicate the time to show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if rec.count(PHASE) != total {
        sample.errors.push(format!(
            "{} deliveries for {total} publishes to one connection each",
            rec.count(PHASE)
        ));
    }
    let (closed, failed) = rec.ended();
    if closed + failed > 0 {
        sample.errors.push(format!(
            "{closed} connections closed by the server, {failed} failed"
        ));
    }
    Ok(())
}

/// Prints the part's table: medians per shard count, and the ratio of
/// deliveries/s to one shard in the same round.
pub(crate) fn print(report: &Report, opts: &Options, ticks_per_sec: u64) {
    println!(
        "### User-targeted deliveries/s on 1, 2 and 3 Redis shards, 3 nodes\n\n\
         {} user-targeted publishes per run, batches of {BATCH} to the batch endpoint of every node \
         ({BATCHES_PER_NODE} batches in flight per node); {} users, one connection each, spread over the 3 nodes; \
         `--redis-mode shards`; medians of {} round(s). Every process shares the same cores.\n",
        thousands(opts.shard_publishes as f64),
        thousands(USERS as f64),
        opts.rounds
    );
    let ok = |s: &&Sample| s.errors.is_empty() && s.deliveries > 0;
    let of = |k: usize| -> Vec<&Sample> {
        let mut v: Vec<&Sample> = report
            .samples
            .iter()
            .filter(|s| s.shards == k)
            .filter(ok)
            .collect();
        v.sort_by_key(|s| s.round);
        v
    };
    let base = opts.shards.first().copied().unwrap_or(1);
    let mut heading = String::from("| |");
    let mut rule = String::from("|---|");
    for &k in &opts.shards {
        heading += &format!(" {k} shard{} |", if k == 1 { "" } else { "s" });
        rule += "---:|";
    }
    println!("{heading}\n{rule}");
    let row = |label: &str, get: &dyn Fn(&Sample) -> Option<f64>, fmt: &dyn Fn(f64) -> String| {
        let mut line = format!("| {label} |");
        for &k in &opts.shards {
            let v = median(of(k).iter().filter_map(|s| get(s)).collect());
            line += &format!(" {} |", v.map_or("-".into(), fmt));
        }
        println!("{line}");
    };
    let core = |ticks: u64, s: &Sample| ticks as f64 * 100.0 / ticks_per_sec as f64 / s.secs;
    row(
        "**user-targeted deliveries/s**",
        &|s| Some(s.per_sec()),
        &thousands,
    );
    // The ratio to the base count measured in the same round.
    let same_round = |s: &Sample| {
        report
            .samples
            .iter()
            .find(|b| b.shards == base && b.round == s.round && ok(b))
            .map(|b| s.per_sec() / b.per_sec())
    };
    row(
        &format!("**ratio to {base} shard(s), same round (median of the rounds)**"),
        &same_round,
        &|v| format!("{v:.2}"),
    );
    // Each shard's CPU, as "a / b / c".
    let mut line = String::from("| Redis CPU per shard (% of a core) |");
    for &k in &opts.shards {
        let per: Vec<String> = (0..k)
            .map(|i| {
                median(
                    of(k)
                        .iter()
                        .filter_map(|s| s.redis.get(i).map(|u| u.cpu_secs * 100.0 / s.secs))
                        .collect(),
                )
                .map_or("-".into(), |v| format!("{v:.0}"))
            })
            .collect();
        line += &format!(" {} |", per.join(" / "));
    }
    println!("{line}");
    row(
        "Redis CPU, all shards (% of a core)",
        &|s| Some(s.redis.iter().map(|u| u.cpu_secs).sum::<f64>() * 100.0 / s.secs),
        &|v| format!("{v:.0}"),
    );
    row(
        "Redis CPU per publish, all shards (µs)",
        &|s| Some(s.redis_us_per_publish()),
        &|v| format!("{v:.1}"),
    );
    row(
        "publishes/s the shards could take at one core each (shards x 10^6 / µs per publish)",
        &|s| Some(s.shards as f64 * 1e6 / s.redis_us_per_publish().max(1e-9)),
        &thousands,
    );
    let mut line = String::from("| publish scripts run per shard (share) |");
    for &k in &opts.shards {
        let per: Vec<String> = (0..k)
            .map(|i| {
                median(
                    of(k)
                        .iter()
                        .filter_map(|s| {
                            let all: f64 = s.redis.iter().map(|u| u.calls_of(&["evalsha"])).sum();
                            s.redis
                                .get(i)
                                .map(|u| 100.0 * u.calls_of(&["evalsha"]) / all.max(1.0))
                        })
                        .collect(),
                )
                .map_or("-".into(), |v| format!("{v:.0} %"))
            })
            .collect();
        line += &format!(" {} |", per.join(" / "));
    }
    println!("{line}");
    row(
        "pgdn CPU, 3 nodes (% of a core)",
        &|s| Some(core(s.pgdn_ticks, s)),
        &|v| format!("{v:.0}"),
    );
    row(
        "bench (publishers and subscribers) CPU (% of a core)",
        &|s| Some(core(s.bench_ticks, s)),
        &|v| format!("{v:.0}"),
    );
    row(
        "publish-to-receive latency p50 (ms)",
        &|s| Some(ms(s.p50_ns)),
        &|v| format!("{v:.1}"),
    );
    row(
        "publish-to-receive latency p99 (ms)",
        &|s| Some(ms(s.p99_ns)),
        &|v| format!("{v:.1}"),
    );
    println!();
    println!("Every sample of deliveries/s, in round order:\n");
    for &k in &opts.shards {
        let list: Vec<String> = report
            .samples
            .iter()
            .filter(|s| s.shards == k)
            .map(|s| {
                if ok(&s) {
                    thousands(s.per_sec())
                } else {
                    "failed".into()
                }
            })
            .collect();
        println!("- {k} shard(s): {}", list.join(", "));
    }
    for s in &report.samples {
        for e in &s.errors {
            println!(
                "- problem, {} shard(s) round {}: {e}",
                s.shards,
                s.round + 1
            );
        }
    }
    println!();
}
