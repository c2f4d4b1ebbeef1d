//! `cargo xtask bench --cluster --cluster-parts routing`: which nodes Redis
//! brings each message to, against the nodes that need it.
//!
//! Three nodes, four subscribers: user `ru` on node 1 only; `rg1` on node
//! 1 and `rg2` on node 2, both in group `rg`; `rw` on node 3, in no group.
//! So a message to `ru` is needed by node 1 only, one to group `rg` by
//! nodes 1 and 2, and a broadcast by all three. `--routing-publishes` of
//! each kind are published from four concurrent tasks through the three
//! nodes in turn, and the subscribers must get every one exactly once.
//!
//! What each node received is read two ways:
//!
//! - the after build counts it itself: `pgdn_broker_messages_received_total
//!   {target="user"|"group"|"broadcast"}` in each node's `/metrics`, read
//!   before and after;
//! - on one Redis, a subscriber of the bench's own (the spy,
//!   `redis_probe.rs`) subscribes to every channel the nodes subscribe to
//!   (`PUBSUB NUMSUB` / `SHARDNUMSUB` first checks that each node is
//!   subscribed to its channels), and counts what Redis sends on each, by
//!   kind of target: a node received what came on its channels. This is
//!   how the before build is measured (it has no such counter); on the
//!   after build it checks the counter.
//!
//! Deployments: the after build on one Redis (`--redis-mode single`) and on
//! a Redis Cluster of three masters (`RedisCluster::start(3, 0)`,
//! `--redis-mode cluster`; `--routing-redis` picks them), and the before
//! build on one Redis when `--before-bin` is given.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::client::{self, Recorder};
use super::redis_probe::{self, ChannelCounts, Probe, Spy, Value};
use super::scale::{self, Build, Nodes};
use super::{BROADCAST, Credentials, Options};

/// Nodes.
const NODES: usize = 3;
/// pgdn-server's default `--redis-partitions`, which the bench keeps.
const PARTITIONS: u16 = 128;
/// Concurrent publish requests.
const TASKS: usize = 4;

/// The subscribers: user, groups, node (0-based).
const SUBSCRIBERS: [(&str, &[&str], usize); 4] = [
    ("ru", &[], 0),
    ("rg1", &["rg"], 0),
    ("rg2", &["rg"], 1),
    ("rw", &[], 2),
];

/// Per kind ([`redis_probe::KINDS`] order): the target, and which nodes
/// need such a message.
const TARGETS: [(&str, [bool; NODES]); 3] = [
    (r#"{"user":"ru"}"#, [true, false, false]),
    (r#"{"group":"rg"}"#, [true, true, false]),
    (BROADCAST, [true, true, true]),
];

/// Whether the subscriber `user` in `groups` gets messages of kind `k`.
fn wants(k: usize, user: &str, groups: &[&str]) -> bool {
    match k {
        0 => user == "ru",
        1 => groups.contains(&"rg"),
        _ => true,
    }
}

/// One deployment measured.
#[derive(Debug, Clone)]
struct Sample {
    build: Build,
    /// `single` or `cluster`.
    mode: String,
    /// Messages received per node and kind, from the nodes' counter.
    metric: Option<Vec<[u64; 3]>>,
    /// The same, from the spy.
    spy: Option<Vec<[u64; 3]>>,
    errors: Vec<String>,
}

/// Everything the part measured.
pub(crate) struct Report {
    samples: Vec<Sample>,
}

/// Measures each deployment once.
pub(crate) fn run(
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Result<Report, String> {
    let mut deployments: Vec<(Build, String)> = opts
        .routing_redis
        .iter()
        .map(|m| (Build::After, m.clone()))
        .collect();
    if opts.before_bin.is_some() {
        deployments.push((Build::Before, "single".into()));
    }
    let mut samples = Vec::new();
    for (build, mode) in deployments {
        eprintln!(
            "\nxtask bench: routing, {} build on {mode} Redis ({} publishes of each kind)",
            build.name(),
            opts.routing_publishes
        );
        let mut sample = Sample {
            build,
            mode,
            metric: None,
            spy: None,
            errors: Vec::new(),
        };
        if let Err(e) = run_one(&mut sample, opts, bin_dir, runtime) {
            eprintln!("  problem: {e}");
            sample.errors.push(e);
        }
        samples.push(sample);
    }
    Ok(Report { samples })
}

/// A private Redis of one layout.
enum Redis {
    Single(pgdn_testkit::RedisServer),
    Cluster(pgdn_testkit::RedisCluster),
}

fn run_one(
    sample: &mut Sample,
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Result<(), String> {
    let redis = match sample.mode.as_str() {
        "single" => Redis::Single(pgdn_testkit::RedisServer::start()),
        "cluster" => Redis::Cluster(pgdn_testkit::RedisCluster::start(3, 0)),
        other => return Err(format!("--routing-redis single|cluster, not {other}")),
    };
    let (url, spy_port) = match &redis {
        Redis::Single(r) => (r.url(), Some(r.port())),
        Redis::Cluster(c) => (c.urls().join(","), None),
    };
    let creds = Credentials::new();
    let nodes = Nodes::start(
        &sample.build.bin(opts, bin_dir),
        sample.build,
        &creds,
        NODES,
        (&sample.mode, &url),
        100,
        opts.padding,
    )?;
    let result = runtime.block_on(measure(sample, &nodes, &creds, spy_port, opts));
    nodes.stop();
    drop(redis);
    result
}

/// The channels node `n<k+1>` subscribes to.
fn channels(build: Build, k: usize) -> Vec<String> {
    match build {
        Build::Before => vec![format!("pgdn:node:n{}", k + 1)],
        Build::After => (0..PARTITIONS)
            .map(|p| format!("pgdn:{{{p}}}:node:n{}", k + 1))
            .collect(),
    }
}

/// The channels every node subscribes to (group and broadcast messages
/// before; broadcasts after).
fn shared_channels(build: Build) -> Vec<String> {
    match build {
        Build::Before => vec!["pgdn:all".into()],
        Build::After => (0..PARTITIONS)
            .map(|p| format!("pgdn:{{{p}}}:all"))
            .collect(),
    }
}

/// Checks that each node is subscribed to its channels and that nobody
/// else is, then starts the spy on them.
fn start_spy(build: Build, port: u16) -> Result<Spy, String> {
    let mut all = shared_channels(build);
    for k in 0..NODES {
        all.extend(channels(build, k));
    }
    let mut probe = Probe::connect(port)?;
    let sub = if build == Build::After {
        "SHARDNUMSUB"
    } else {
        "NUMSUB"
    };
    let mut args = vec!["PUBSUB", sub];
    args.extend(all.iter().map(String::as_str));
    let reply = probe.call(&args)?;
    let Value::Array(items) = reply else {
        return Err(format!("PUBSUB {sub} answered {reply:?}"));
    };
    for pair in items.chunks(2) {
        let want = if shared_channels(build)
            .iter()
            .any(|c| Value::Text(c.clone()) == pair[0])
        {
            NODES as i64
        } else {
            1
        };
        if pair.get(1) != Some(&Value::Int(want)) {
            return Err(format!(
                "PUBSUB {sub}: {:?} has {:?} subscribers, expected {want}",
                pair[0],
                pair.get(1)
            ));
        }
    }
    Spy::start(port, all, build == Build::After)
}

/// What node `k` received according to the spy.
fn spy_counts(build: Build, counts: &ChannelCounts, k: usize) -> [u64; 3] {
    let mut out = [0; 3];
    for c in shared_channels(build).into_iter().chain(channels(build, k)) {
        if let Some(n) = counts.get(&c) {
            for i in 0..3 {
                out[i] += n[i];
            }
        }
    }
    out
}

/// Each node's `pgdn_broker_messages_received_total`, by kind.
async fn read_metrics(nodes: &Nodes) -> Result<Vec<[u64; 3]>, String> {
    let mut out = Vec::new();
    for (addr, publisher) in nodes.addrs().iter().zip(&nodes.publishers) {
        let text = publisher.get(&format!("http://{addr}/metrics")).await?;
        let mut counts = [0; 3];
        for (i, kind) in redis_probe::KINDS.iter().enumerate() {
            let name = format!("pgdn_broker_messages_received_total{{target=\"{kind}\"}} ");
            counts[i] = text
                .lines()
                .find_map(|l| l.strip_prefix(&name))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("{addr}/metrics has no {name}"))?;
        }
        out.push(counts);
    }
    Ok(out)
}

async fn measure(
    sample: &mut Sample,
    nodes: &Nodes,
    creds: &Credentials,
    spy_port: Option<u16>,
    opts: &Options,
) -> Result<(), String> {
    nodes.wait_ready().await?;
    let rec = Recorder::with_slots(SUBSCRIBERS.len());
    let addrs = nodes.addrs();
    let mut urls = Vec::new();
    for (slot, (user, groups, node)) in SUBSCRIBERS.iter().enumerate() {
        urls.push((scale::ws_url(creds, &addrs[*node], user, groups)?, slot));
    }
    let mut subscribers = JoinSet::new();
    client::connect_all(urls, true, &rec, &mut subscribers)
        .await
        .map_err(|e| format!("connecting the subscribers: {e}"))?;
    // Let the registrations reach Redis.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let build = sample.build;
    let spy = match spy_port {
        Some(port) => Some(tokio::task::block_in_place(|| start_spy(build, port))?),
        None => None,
    };
    let metrics_before = if build == Build::After {
        Some(read_metrics(nodes).await?)
    } else {
        None
    };
    let m = opts.routing_publishes as u64;
    for (k, (target, _)) in TARGETS.iter().enumerate() {
        let phase = 2 + k;
        let target = target.to_string();
        scale::publish_many(
            &nodes.publishers,
            Arc::new(move |_| target.clone()),
            phase,
            m,
            TASKS,
            None,
        )
        .await?;
        let want = SUBSCRIBERS
            .iter()
            .filter(|(user, groups, _)| wants(k, user, groups))
            .count() as u64
            * m;
        rec.wait_for(phase, want, Instant::now() + Duration::from_secs(30))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(before) = metrics_before {
        let after = read_metrics(nodes).await?;
        sample.metric = Some(
            after
                .iter()
                .zip(&before)
                .map(|(a, b)| [a[0] - b[0], a[1] - b[1], a[2] - b[2]])
                .collect(),
        );
    }
    if let Some(spy) = spy {
        let counts = tokio::task::block_in_place(|| spy.stop())?;
        sample.spy = Some((0..NODES).map(|k| spy_counts(build, &counts, k)).collect());
    }
    // Exactly once per subscriber that should get it.
    for (slot, (user, groups, node)) in SUBSCRIBERS.iter().enumerate() {
        for k in 0..3 {
            let want = if wants(k, user, groups) { m } else { 0 };
            let got = rec.slot_count(2 + k, slot);
            if got != want {
                sample.errors.push(format!(
                    "{user} on node {}: {got} {} messages, expected {want}",
                    node + 1,
                    redis_probe::KINDS[k]
                ));
            }
        }
    }
    for (what, counts) in [("counter", &sample.metric), ("spy", &sample.spy)] {
        if let Some(c) = counts {
            eprintln!("  received per node ({what}): {c:?}");
        }
    }
    subscribers.shutdown().await;
    Ok(())
}

/// Prints one table: per deployment and node, what it received of each
/// kind against what it needed.
pub(crate) fn print(report: &Report, opts: &Options) {
    let m = opts.routing_publishes as u64;
    println!(
        "### Messages Redis brings to each node, against the nodes that need them\n\n\
         {m} publishes of each kind, through the 3 nodes in turn. Node 1 holds user `ru` and \
         `rg1` (group `rg`), node 2 `rg2` (group `rg`), node 3 `rw` (no group): a user message \
         is needed by node 1, a group message by nodes 1 and 2, a broadcast by all three. \
         Cells: received / needed. After: the nodes' own \
         `pgdn_broker_messages_received_total` (and, on one Redis, the spy's count agrees or \
         the table says so); before: the spy's count.\n"
    );
    println!("| deployment | node | user | group | broadcast |");
    println!("|---|---|---:|---:|---:|");
    for s in &report.samples {
        let (counts, source) = match (&s.metric, &s.spy) {
            (Some(c), _) => (c, "counter"),
            (None, Some(c)) => (c, "spy"),
            (None, None) => {
                println!(
                    "| {} build, {} Redis | - | not measured | | |",
                    s.build.name(),
                    s.mode
                );
                continue;
            }
        };
        let name = format!(
            "{} build, {}",
            s.build.name(),
            if s.mode == "single" {
                "one Redis".to_string()
            } else {
                "Redis Cluster (3 masters)".to_string()
            }
        );
        let mut totals = [0u64; 3];
        let mut ideal = [0u64; 3];
        for (k, node) in counts.iter().enumerate() {
            let mut line = format!("| {name} ({source}) | node {} |", k + 1);
            for i in 0..3 {
                let need = if TARGETS[i].1[k] { m } else { 0 };
                totals[i] += node[i];
                ideal[i] += need;
                line += &format!(" {} / {need} |", node[i]);
            }
            println!("{line}");
        }
        let mut line = format!("| {name} | **sent to nodes per publish** |");
        for i in 0..3 {
            line += &format!(
                " **{:.2}** / {:.2} |",
                totals[i] as f64 / m as f64,
                ideal[i] as f64 / m as f64
            );
        }
        println!("{line}");
        if let (Some(metric), Some(spy)) = (&s.metric, &s.spy) {
            if metric == spy {
                println!("| {name} | the spy counted the same | | | |");
            } else {
                println!("| {name} | **the spy counted** {spy:?} | | | |");
            }
        }
    }
    println!();
    for s in &report.samples {
        for e in &s.errors {
            println!(
                "- problem, {} build on {} Redis: {e}",
                s.build.name(),
                s.mode
            );
        }
    }
    println!();
}
