//! `cargo xtask bench --cluster`: broadcast fan-out across pgdn nodes that
//! share one Redis, next to one node on its own, measured in the same run.
//!
//! For each N and round it measures two set-ups, alternating which goes
//! first:
//!
//! - **one node**: one release `pgdn-server` without `--redis-url`;
//! - **cluster**: a private `redis-server` (pgdn-testkit, a free port on
//!   127.0.0.1, no persistence) and `--nodes` release `pgdn-server`s on it
//!   (`--redis-url <url> --node-id n1..nK`).
//!
//! N subscribers (user `u<i>` on node `i mod K`, each with its own JWT)
//! spread evenly over the nodes. Every broadcast is published over HTTP to
//! node 1 only, so with 3 nodes two thirds of the deliveries are
//! cross-node. In cluster mode every node, node 1 included, delivers what
//! comes back from Redis, and a publish's reply says `delivered: null`: the
//! bench counts deliveries at the subscribers (each subscriber must get
//! every broadcast exactly once).
//!
//! One run, after one warm-up broadcast to nobody:
//!
//! 1. connects the N subscribers (each counts once its `connection` frame
//!    arrived) and lets the nodes' registrations settle;
//! 2. **fan-out latency**: broadcasts one at a time, each once the previous
//!    one reached every subscriber;
//! 3. **broadcast throughput**, once per `--publishers` value K (default 1
//!    and 8): M broadcasts (about `--deliveries` / N) with at most
//!    `--window` of them not yet fully delivered and at most K publish
//!    requests outstanding at once. With K = 1 (what the default comparison
//!    does) the rate is bound by how long one publish request takes, which
//!    in cluster mode includes a round trip to Redis through a busy node 1;
//!    with K = 8 the window fills. Deliveries/s is every frame received /
//!    the time from the first publish to the last receipt. The CPU time
//!    (utime + stime) of all pgdn processes, and of redis-server, over the
//!    same span / deliveries is their CPU per delivery.
//!
//! Publish-to-receive latency is the receipt time minus the send time
//! written into the payload, for every subscriber, and apart for node 1's
//! subscribers and for the other nodes' (the cross-node deliveries).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::client::{self, Histogram, Publisher, Recorder};
use super::procs::{self, ServerProcess};
use super::{
    BROADCAST, Credentials, Options, PHASE_FANOUT, PHASE_FIRST_REPETITION, PHASE_WARMUP, median,
    ms, pgdn_bin, start_pgdn, thousands,
};

/// One node on its own, or the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// One pgdn-server without Redis.
    Single,
    /// `--nodes` pgdn-servers on one private redis-server.
    Cluster,
}

/// What one phase measured.
#[derive(Debug, Clone, Default)]
struct Measured {
    /// Frames received by every subscriber.
    deliveries: u64,
    /// Of those, frames received by the subscribers of nodes 2..K.
    remote_deliveries: u64,
    /// From the first publish to the last receipt.
    secs: f64,
    /// CPU time of every pgdn process over that span, in clock ticks.
    pgdn_ticks: u64,
    /// CPU time of node 1 alone.
    node1_ticks: u64,
    /// CPU time of redis-server (None: not found, or no Redis).
    redis_ticks: Option<u64>,
    /// CPU time of the bench (the clients) over the span.
    bench_ticks: u64,
    /// Publish-to-receive latency p50 of every subscriber, nanoseconds.
    p50_ns: u64,
    /// The same, p99.
    p99_ns: u64,
    /// p50 of node 1's subscribers.
    local_p50_ns: u64,
    /// p99 of node 1's subscribers.
    local_p99_ns: u64,
    /// p50 of the other nodes' subscribers (cross-node).
    remote_p50_ns: u64,
    /// p99 of the other nodes' subscribers (cross-node).
    remote_p99_ns: u64,
    /// How long a publish request took (sent to reply), p50, nanoseconds.
    publish_p50_ns: u64,
    /// The same, p99.
    publish_p99_ns: u64,
}

impl Measured {
    /// Deliveries per second.
    fn per_sec(&self) -> f64 {
        self.deliveries as f64 / self.secs.max(1e-9)
    }
}

/// Everything measured for one set-up at one N.
#[derive(Debug, Clone)]
struct Run {
    /// Which set-up.
    setup: Setup,
    /// Which round of `--rounds` (from 0).
    round: usize,
    /// Subscribers, over every node.
    n: usize,
    /// How long connecting them took.
    connect_secs: f64,
    /// The one-broadcast-at-a-time phase.
    fanout: Option<Measured>,
    /// One throughput phase per `--publishers` value.
    broadcast: Vec<Measured>,
    /// What went wrong, if anything.
    errors: Vec<String>,
}

/// Everything `--cluster` measured.
pub(crate) struct Report {
    /// Every run, in the order measured.
    runs: Vec<Run>,
}

/// The CPU clocks of the processes at the start of a phase.
struct Clocks {
    /// When the phase started.
    start: Instant,
    /// Each pgdn process's CPU ticks.
    pgdn: Vec<u64>,
    /// redis-server's CPU ticks, if measured.
    redis: Option<u64>,
    /// The bench's own CPU ticks.
    bench: u64,
}

impl Clocks {
    /// Reads every clock now.
    fn start(pids: &[u32], redis: Option<u32>) -> Result<Clocks, String> {
        Ok(Clocks {
            start: Instant::now(),
            pgdn: pids
                .iter()
                .map(|&p| procs::cpu_ticks(p))
                .collect::<Result<_, _>>()?,
            redis: redis.and_then(|p| procs::cpu_ticks(p).ok()),
            bench: procs::own_cpu_ticks(),
        })
    }

    /// Reads every clock again and the recorder's figures for `phase`.
    fn finish(
        self,
        pids: &[u32],
        redis: Option<u32>,
        rec: &Recorder,
        phase: usize,
        nodes: usize,
    ) -> Result<Measured, String> {
        let secs = self.start.elapsed().as_secs_f64();
        let mut pgdn = Vec::new();
        for (&pid, before) in pids.iter().zip(&self.pgdn) {
            pgdn.push(procs::cpu_ticks(pid)?.saturating_sub(*before));
        }
        let redis_ticks = match (redis, self.redis) {
            (Some(pid), Some(before)) => procs::cpu_ticks(pid).ok().map(|t| t - before.min(t)),
            _ => None,
        };
        let all = rec.histogram(phase);
        let local = rec.slot_histogram(phase, 0..1);
        let remote = rec.slot_histogram(phase, 1..nodes);
        Ok(Measured {
            deliveries: rec.count(phase),
            remote_deliveries: (1..nodes).map(|s| rec.slot_count(phase, s)).sum(),
            secs,
            pgdn_ticks: pgdn.iter().sum(),
            node1_ticks: pgdn.first().copied().unwrap_or(0),
            redis_ticks,
            bench_ticks: procs::own_cpu_ticks().saturating_sub(self.bench),
            p50_ns: all.quantile(0.50),
            p99_ns: all.quantile(0.99),
            local_p50_ns: local.quantile(0.50),
            local_p99_ns: local.quantile(0.99),
            remote_p50_ns: remote.quantile(0.50),
            remote_p99_ns: remote.quantile(0.99),
            publish_p50_ns: 0,
            publish_p99_ns: 0,
        })
    }
}

/// Runs both set-ups at every N, `--rounds` times each.
pub(crate) fn run(
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Result<Report, String> {
    if pgdn_testkit::redis_server_path().is_none() {
        return Err(format!(
            "redis-server is not installed; install it with `{}`",
            pgdn_testkit::INSTALL_HINT
        ));
    }
    let mut runs = Vec::new();
    for &n in &opts.ns {
        for round in 0..opts.rounds {
            let mut order = [Setup::Single, Setup::Cluster];
            if round % 2 == 1 {
                order.reverse();
            }
            for setup in order {
                let nodes = match setup {
                    Setup::Single => 1,
                    Setup::Cluster => opts.nodes,
                };
                eprintln!(
                    "\nxtask bench: {} with N = {n}, round {} of {} ({} broadcasts)",
                    setup_name(setup, opts.nodes),
                    round + 1,
                    opts.rounds,
                    opts.broadcasts(n)
                );
                let mut run = Run {
                    setup,
                    round,
                    n,
                    connect_secs: 0.0,
                    fanout: None,
                    broadcast: Vec::new(),
                    errors: Vec::new(),
                };
                if let Err(e) = run_one(&mut run, nodes, opts, bin_dir, runtime, ticks_per_sec) {
                    eprintln!("  problem: {e}");
                    run.errors.push(e);
                }
                runs.push(run);
            }
        }
    }
    Ok(Report { runs })
}

/// How tables and messages name a set-up.
fn setup_name(setup: Setup, nodes: usize) -> String {
    match setup {
        Setup::Single => "1 node".into(),
        Setup::Cluster if nodes == 1 => "1 node on Redis".into(),
        Setup::Cluster => format!("{nodes} nodes on Redis"),
    }
}

/// Starts the set-up, measures it and stops it.
fn run_one(
    run: &mut Run,
    nodes: usize,
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
) -> Result<(), String> {
    let redis = (run.setup == Setup::Cluster).then(pgdn_testkit::RedisServer::start);
    let redis_pid = redis
        .as_ref()
        .and_then(|_| procs::child_pid("redis-server"));
    if redis.is_some() && redis_pid.is_none() {
        run.errors
            .push("could not find redis-server's pid: its CPU is not measured".into());
    }
    let creds = Credentials::new();
    let bin = pgdn_bin(opts, bin_dir);
    let max = (run.n + 1000).to_string();
    let redis_url = redis.as_ref().map(pgdn_testkit::RedisServer::url);
    let mut servers: Vec<(ServerProcess, String)> = Vec::new();
    let started = (0..nodes).try_for_each(|k| {
        let node_id = format!("n{}", k + 1);
        let mut args: Vec<&str> = vec!["--max-connections", &max];
        if let Some(url) = &redis_url {
            args.extend(["--redis-url", url, "--node-id", &node_id]);
        }
        servers.push(start_pgdn(&bin, "pgdn-server", &creds, &args)?);
        Ok::<(), String>(())
    });
    let result = started.and_then(|()| {
        let pids: Vec<u32> = servers.iter().map(|(p, _)| p.pid()).collect();
        let mut urls = Vec::with_capacity(run.n);
        for (k, (_, addr)) in servers.iter().enumerate() {
            let users = (k..run.n).step_by(nodes);
            urls.extend(creds.ws_urls(addr, users)?.into_iter().map(|u| (u, k)));
        }
        let publisher = Arc::new(Publisher::new(
            format!("http://{}/api/v1/publish", servers[0].1),
            Some(format!("Bearer {}", creds.key)),
            opts.padding,
        ));
        let target = Target {
            pids: &pids,
            redis: redis_pid,
            nodes,
            cluster: run.setup == Setup::Cluster,
        };
        runtime.block_on(measure(run, &target, urls, &publisher, opts, ticks_per_sec))
    });
    for (process, _) in servers {
        eprintln!("xtask bench: {}", process.stop(Duration::from_secs(20)));
    }
    drop(redis);
    result
}

/// The processes of one set-up.
struct Target<'a> {
    /// The pgdn processes, node 1 first.
    pids: &'a [u32],
    /// redis-server, if found.
    redis: Option<u32>,
    /// How many nodes (slots of the recorder).
    nodes: usize,
    /// Whether the nodes run on Redis (publish replies say `delivered: null`).
    cluster: bool,
}

/// Connects the subscribers and runs the phases, filling `run`.
async fn measure(
    run: &mut Run,
    target: &Target<'_>,
    urls: Vec<(String, usize)>,
    publisher: &Arc<Publisher>,
    opts: &Options,
    ticks_per_sec: u64,
) -> Result<(), String> {
    let rec = Recorder::with_slots(target.nodes);
    publisher.publish(BROADCAST, PHASE_WARMUP).await?;
    let mut subscribers = JoinSet::new();
    let started = Instant::now();
    let connected = client::connect_all(urls, true, &rec, &mut subscribers).await;
    run.connect_secs = started.elapsed().as_secs_f64();
    let result = match connected {
        Ok(()) => phases(run, target, &rec, publisher, opts, ticks_per_sec).await,
        Err(e) => Err(format!("connecting the subscribers: {e}")),
    };
    subscribers.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    result
}

/// Publishes `m` broadcasts in `phase` to `n` subscribers, with at most
/// `window` of them not yet fully delivered and at most `publishers`
/// publish requests outstanding at once; waits until every one reached
/// every subscriber. Returns the publish requests' durations and every
/// reply's `delivered`.
async fn publish_window(
    publisher: &Arc<Publisher>,
    rec: &Recorder,
    phase: usize,
    m: u64,
    n: u64,
    window: usize,
    publishers: usize,
) -> Result<(Histogram, Vec<Option<u64>>), String> {
    type Task = tokio::task::JoinHandle<Result<(Option<u64>, u64), String>>;
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_micros(m * n);
    let calls = Histogram::new();
    let mut replies = Vec::with_capacity(m as usize);
    let mut in_flight: VecDeque<Task> = VecDeque::new();
    let mut join = async |task: Task| -> Result<(), String> {
        let (delivered, ns) = task.await.map_err(|e| format!("publish task: {e}"))??;
        calls.record(ns);
        replies.push(delivered);
        Ok(())
    };
    for i in 0..m {
        if i >= window as u64 {
            rec.wait_for(phase, (i + 1 - window as u64) * n, deadline)
                .await?;
        }
        if in_flight.len() >= publishers
            && let Some(task) = in_flight.pop_front()
        {
            join(task).await?;
        }
        let publisher = publisher.clone();
        in_flight.push_back(tokio::spawn(async move {
            let started = Instant::now();
            let delivered = publisher.publish(BROADCAST, phase).await?;
            Ok((delivered, started.elapsed().as_nanos() as u64))
        }));
    }
    while let Some(task) = in_flight.pop_front() {
        join(task).await?;
    }
    rec.wait_for(phase, m * n, deadline).await?;
    Ok((calls, replies))
}

/// Runs the phases once the subscribers are connected: fan-out latency,
/// then one throughput phase per `--publishers` value; then checks that
/// every subscriber got every broadcast exactly once.
async fn phases(
    run: &mut Run,
    target: &Target<'_>,
    rec: &Recorder,
    publisher: &Arc<Publisher>,
    opts: &Options,
    ticks_per_sec: u64,
) -> Result<(), String> {
    let n = run.n as u64;
    let nodes = target.nodes;
    // Let the nodes finish registering the connections (in Redis, for the
    // cluster) before anything is timed.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    eprintln!(
        "  {} subscribers connected in {:.2} s",
        run.n, run.connect_secs
    );
    // A broadcast's reply: the deliveries on node 1 for one node, null in
    // cluster mode (deliveries are counted at the subscribers).
    let expected_reply = (!target.cluster).then_some(n);
    let mut wrong_replies = 0u64;

    // Fan-out latency: one broadcast at a time.
    let count = (200_000 / run.n).clamp(10, 200) as u64;
    let clocks = Clocks::start(target.pids, target.redis)?;
    for i in 0..count {
        if publisher.publish(BROADCAST, PHASE_FANOUT).await? != expected_reply {
            wrong_replies += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        rec.wait_for(PHASE_FANOUT, (i + 1) * n, deadline).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let fanout = clocks.finish(target.pids, target.redis, rec, PHASE_FANOUT, nodes)?;
    eprintln!(
        "  fan-out, {count} broadcasts one at a time: latency p50 {:.2} ms, p99 {:.2} ms \
         (node 1's subscribers p50 {:.2}, p99 {:.2}; other nodes' p50 {:.2}, p99 {:.2})",
        ms(fanout.p50_ns),
        ms(fanout.p99_ns),
        ms(fanout.local_p50_ns),
        ms(fanout.local_p99_ns),
        ms(fanout.remote_p50_ns),
        ms(fanout.remote_p99_ns),
    );
    run.fanout = Some(fanout);

    // Broadcast throughput, once per `--publishers` value.
    let m = opts.broadcasts(run.n) as u64;
    let mut checks = vec![(PHASE_FANOUT, count)];
    for (r, &publishers) in opts.publishers.iter().enumerate() {
        let phase = PHASE_FIRST_REPETITION + r;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let clocks = Clocks::start(target.pids, target.redis)?;
        let (calls, wrong) =
            publish_window(publisher, rec, phase, m, n, opts.window, publishers).await?;
        wrong_replies += wrong.iter().filter(|&&d| d != expected_reply).count() as u64;
        let mut p = clocks.finish(target.pids, target.redis, rec, phase, nodes)?;
        p.publish_p50_ns = calls.quantile(0.50);
        p.publish_p99_ns = calls.quantile(0.99);
        let per =
            |ticks: u64| ticks as f64 * 1e6 / ticks_per_sec as f64 / p.deliveries.max(1) as f64;
        let core = |ticks: u64| ticks as f64 * 100.0 / ticks_per_sec as f64 / p.secs;
        eprintln!(
            "  broadcast, {publishers} publisher(s): {} deliveries ({} on nodes 2..) in {:.2} s = {:.0}/s; \
             latency p50 {:.1} ms, p99 {:.1} ms; publish requests p50 {:.2} ms, p99 {:.2} ms; \
             pgdn CPU {:.2} µs/delivery ({:.0} % of a core; node 1 {:.0} %), redis-server {}, bench {:.2} µs/delivery",
            p.deliveries,
            p.remote_deliveries,
            p.secs,
            p.per_sec(),
            ms(p.p50_ns),
            ms(p.p99_ns),
            ms(p.publish_p50_ns),
            ms(p.publish_p99_ns),
            per(p.pgdn_ticks),
            core(p.pgdn_ticks),
            core(p.node1_ticks),
            p.redis_ticks
                .map_or("-".into(), |t| format!("{:.0} % of a core", core(t))),
            per(p.bench_ticks),
        );
        run.broadcast.push(p);
        checks.push((phase, m));
    }

    // Every subscriber got every broadcast once: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (phase, broadcasts) in checks {
        for slot in 0..nodes {
            let subscribers = (slot..run.n).step_by(nodes).count() as u64;
            let got = rec.slot_count(phase, slot);
            if got != broadcasts * subscribers {
                run.errors.push(format!(
                    "node {}: {got} deliveries for {broadcasts} broadcasts to {subscribers} subscribers",
                    slot + 1
                ));
            }
        }
    }
    if wrong_replies > 0 {
        run.errors.push(format!(
            "{wrong_replies} publish replies did not say delivered {expected_reply:?}"
        ));
    }
    let (closed, failed) = rec.ended();
    if closed + failed > 0 {
        run.errors.push(format!(
            "{closed} connections closed by the server, {failed} failed"
        ));
    }
    Ok(())
}

/// Prints one Markdown table per N: the medians of both set-ups and their
/// ratio, then every sample of the headline figures.
pub(crate) fn print(report: &Report, opts: &Options, ticks_per_sec: u64) {
    type Get<'a> = &'a dyn Fn(&Run) -> Option<f64>;
    type Fmt<'a> = &'a dyn Fn(f64) -> String;
    let cluster_name = setup_name(Setup::Cluster, opts.nodes);
    let per = |ticks: u64, m: &Measured| {
        ticks as f64 * 1e6 / ticks_per_sec as f64 / m.deliveries.max(1) as f64
    };
    let core = |ticks: u64, m: &Measured| ticks as f64 * 100.0 / ticks_per_sec as f64 / m.secs;
    let two = |v: f64| format!("{v:.2}");
    let one = |v: f64| format!("{v:.1}");
    let pct = |v: f64| format!("{v:.0} %");
    let plural = |k: usize| {
        if k == 1 {
            "1 publisher".to_string()
        } else {
            format!("{k} concurrent publishers")
        }
    };
    for &n in &opts.ns {
        let of = |setup: Setup| -> Vec<&Run> {
            let mut v: Vec<&Run> = report
                .runs
                .iter()
                .filter(|r| r.n == n && r.setup == setup)
                .collect();
            v.sort_by_key(|r| r.round);
            v
        };
        let (single, cluster) = (of(Setup::Single), of(Setup::Cluster));
        println!(
            "### N = {} subscribers, {} per node in the cluster\n\n{} broadcasts per throughput phase \
             (window {}; once with each publisher count), {} one at a time; all published to node 1; \
             medians of {} run(s) per set-up.\n",
            thousands(n as f64),
            thousands((n / opts.nodes) as f64),
            opts.broadcasts(n),
            opts.window,
            (200_000 / n).clamp(10, 200),
            opts.rounds
        );
        println!("| | 1 node | {cluster_name} | cluster / 1 node |");
        println!("|---|---:|---:|---:|");
        let row = |label: &str, get: Get, fmt: Fmt, single_too: bool| {
            let med = |runs: &[&Run]| median(runs.iter().filter_map(|r| get(r)).collect());
            let a = if single_too { med(&single) } else { None };
            let b = med(&cluster);
            let ratio = match (a, b) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
                _ => "-".into(),
            };
            let cell = |v: Option<f64>| v.map_or("-".to_string(), fmt);
            println!("| {label} | {} | {} | {ratio} |", cell(a), cell(b));
        };
        for (idx, &k) in opts.publishers.iter().enumerate() {
            let b = move |r: &Run| r.broadcast.get(idx).cloned();
            let with = plural(k);
            row(
                &format!("**broadcast deliveries/s, {with}**"),
                &|r| b(r).map(|m| m.per_sec()),
                &thousands,
                true,
            );
            if idx == 0 {
                row(
                    "share of deliveries made by nodes 2.. (cross-node)",
                    &|r| {
                        b(r).map(|m| {
                            100.0 * m.remote_deliveries as f64 / m.deliveries.max(1) as f64
                        })
                    },
                    &pct,
                    false,
                );
            }
            row(
                &format!("**latency p50 under load, {with} (ms)**"),
                &|r| b(r).map(|m| ms(m.p50_ns)),
                &one,
                true,
            );
            row(
                &format!("**latency p99 under load, {with} (ms)**"),
                &|r| b(r).map(|m| ms(m.p99_ns)),
                &one,
                true,
            );
            row(
                &format!("latency p50 under load, {with}, node 1's subscribers (ms)"),
                &|r| b(r).map(|m| ms(m.local_p50_ns)),
                &one,
                false,
            );
            row(
                &format!("latency p99 under load, {with}, node 1's subscribers (ms)"),
                &|r| b(r).map(|m| ms(m.local_p99_ns)),
                &one,
                false,
            );
            row(
                &format!("latency p50 under load, {with}, other nodes' subscribers (ms)"),
                &|r| {
                    b(r).filter(|m| m.remote_deliveries > 0)
                        .map(|m| ms(m.remote_p50_ns))
                },
                &one,
                false,
            );
            row(
                &format!("latency p99 under load, {with}, other nodes' subscribers (ms)"),
                &|r| {
                    b(r).filter(|m| m.remote_deliveries > 0)
                        .map(|m| ms(m.remote_p99_ns))
                },
                &one,
                false,
            );
            row(
                &format!("publish request p50, {with} (ms)"),
                &|r| b(r).map(|m| ms(m.publish_p50_ns)),
                &two,
                true,
            );
            row(
                &format!("publish request p99, {with} (ms)"),
                &|r| b(r).map(|m| ms(m.publish_p99_ns)),
                &two,
                true,
            );
            row(
                &format!("pgdn CPU per delivery, all nodes, {with} (µs)"),
                &|r| b(r).map(|m| per(m.pgdn_ticks, &m)),
                &two,
                true,
            );
            row(
                &format!("pgdn CPU, all nodes, {with} (% of a core)"),
                &|r| b(r).map(|m| core(m.pgdn_ticks, &m)),
                &pct,
                true,
            );
            row(
                "  ... of which node 1 (% of a core)",
                &|r| b(r).map(|m| core(m.node1_ticks, &m)),
                &pct,
                true,
            );
            row(
                &format!("redis-server CPU, {with} (% of a core)"),
                &|r| b(r).and_then(|m| m.redis_ticks.map(|t| core(t, &m))),
                &pct,
                false,
            );
            row(
                &format!("bench (clients) CPU per delivery, {with} (µs)"),
                &|r| b(r).map(|m| per(m.bench_ticks, &m)),
                &two,
                true,
            );
        }
        let f = |r: &Run| r.fanout.clone();
        row(
            "**latency p50, one broadcast at a time (ms)**",
            &|r| f(r).map(|m| ms(m.p50_ns)),
            &two,
            true,
        );
        row(
            "**latency p99, one broadcast at a time (ms)**",
            &|r| f(r).map(|m| ms(m.p99_ns)),
            &two,
            true,
        );
        row(
            "latency p50 one at a time, node 1's subscribers (ms)",
            &|r| f(r).map(|m| ms(m.local_p50_ns)),
            &two,
            false,
        );
        row(
            "latency p99 one at a time, node 1's subscribers (ms)",
            &|r| f(r).map(|m| ms(m.local_p99_ns)),
            &two,
            false,
        );
        row(
            "latency p50 one at a time, other nodes' subscribers (ms)",
            &|r| {
                f(r).filter(|m| m.remote_deliveries > 0)
                    .map(|m| ms(m.remote_p50_ns))
            },
            &two,
            false,
        );
        row(
            "latency p99 one at a time, other nodes' subscribers (ms)",
            &|r| {
                f(r).filter(|m| m.remote_deliveries > 0)
                    .map(|m| ms(m.remote_p99_ns))
            },
            &two,
            false,
        );
        row(
            "time to connect N subscribers (s)",
            &|r| Some(r.connect_secs),
            &two,
            true,
        );
        println!();
        let list = |runs: &[&Run], get: Get, fmt: Fmt| {
            runs.iter()
                .filter_map(|r| get(r))
                .map(fmt)
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("Every sample, in round order:\n");
        for (idx, &k) in opts.publishers.iter().enumerate() {
            let b = move |r: &Run| r.broadcast.get(idx).cloned();
            let with = plural(k);
            let rate: Get = &|r| b(r).map(|m| m.per_sec());
            let p99: Get = &|r| b(r).map(|m| ms(m.p99_ns));
            let cpu: Get = &|r| b(r).map(|m| per(m.pgdn_ticks, &m));
            for (label, get, fmt) in [
                ("broadcast deliveries/s", rate, &thousands as Fmt),
                ("latency p99 under load (ms)", p99, &one),
                ("pgdn CPU µs per delivery", cpu, &two),
            ] {
                println!(
                    "- {label}, {with}: 1 node {}; {cluster_name} {}",
                    list(&single, get, fmt),
                    list(&cluster, get, fmt)
                );
            }
        }
        for r in single.iter().chain(&cluster) {
            for e in &r.errors {
                println!(
                    "- problem, {} round {}: {e}",
                    setup_name(r.setup, opts.nodes),
                    r.round + 1
                );
            }
        }
        println!();
    }
}
