//! `cargo xtask bench --cluster --cluster-parts redis-cost`: what a publish
//! costs Redis, before and after the partitioned data model, with three
//! pgdn nodes on one Redis.
//!
//! For each build (before only with `--before-bin`) and round, alternating
//! which build goes first: a private `redis-server` (pgdn-testkit), three
//! nodes on it (the after build with `--redis-mode single`) and
//! [`USERS`] users `u0..` each connected once to **every** node, the first
//! [`MEMBERS`] of them in group `bench`. Then:
//!
//! 1. an **idle** window of [`IDLE`] (the heartbeat interval): what the
//!    nodes cost Redis without publishing (PINGs, clock touches,
//!    heartbeats), per second;
//! 2. `--cost-publishes` publishes of each kind at [`RATE`] per second (the
//!    same offered load for both builds: how many commands Redis reads per
//!    wake-up, and so its CPU per command, depends on the load), from
//!    [`TASKS`] concurrent HTTP publishers spread over the three nodes:
//!    **user-targeted** (one
//!    user each, round robin over the users, so each reaches a connection
//!    on each node; with up to 4,000 publishes no user's 100-message
//!    history window fills, so no publish evicts), **group** (group
//!    `bench`: its members' connections on every node) and **broadcast**.
//!    Each kind's window runs from the first publish until every
//!    subscriber got every message.
//!
//! Around each window the bench reads `INFO stats cpu commandstats` on its
//! own connection: network bytes in and out
//! (`total_net_input_bytes`/`total_net_output_bytes`), commands
//! (`cmdstat_*` calls, which count the commands a script runs too) and CPU
//! (`used_cpu_sys + used_cpu_user`). Its own requests and replies are left
//! out exactly (it counts their bytes). A window's figures, less the idle
//! rate over the window's length, per 1,000 publishes, are the cost of
//! the publishes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::client::{self, Recorder};
use super::redis_probe::{Probe, Usage};
use super::scale::{self, Build, Nodes};
use super::{BROADCAST, Credentials, Options, median, thousands};

/// Users, each connected to every node.
const USERS: usize = 40;
/// Users in group `bench`: `u0..`.
const MEMBERS: usize = 10;
/// Nodes.
const NODES: usize = 3;
/// Concurrent publish requests.
const TASKS: usize = 8;
/// Publishes per second offered.
const RATE: f64 = 1500.0;
/// The idle window: one heartbeat interval of the nodes.
const IDLE: Duration = Duration::from_secs(5);

/// The kinds of publish, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Group,
    Broadcast,
}

const KINDS: [Kind; 3] = [Kind::User, Kind::Group, Kind::Broadcast];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::User => "user-targeted",
            Kind::Group => "group",
            Kind::Broadcast => "broadcast",
        }
    }

    /// The target of publish `i`.
    fn target(self, i: u64) -> String {
        match self {
            Kind::User => format!(r#"{{"user":"u{}"}}"#, i % USERS as u64),
            Kind::Group => r#"{"group":"bench"}"#.into(),
            Kind::Broadcast => BROADCAST.into(),
        }
    }

    /// Deliveries of one publish.
    fn deliveries(self) -> u64 {
        match self {
            Kind::User => NODES as u64,
            Kind::Group => (MEMBERS * NODES) as u64,
            Kind::Broadcast => (USERS * NODES) as u64,
        }
    }

    /// The recorder's phase of this kind.
    fn phase(self) -> usize {
        2 + self as usize
    }
}

/// What one build measured in one round.
#[derive(Debug, Clone)]
struct Sample {
    build: Build,
    round: usize,
    /// The idle cost, per second.
    idle: Option<Usage>,
    /// Per kind ([`KINDS`] order): the window's cost, less the idle
    /// rate, per 1,000 publishes.
    net: Vec<Option<Usage>>,
    /// The same without taking the idle rate off.
    gross: Vec<Option<Usage>>,
    /// Publishes per second of each window.
    rate: Vec<Option<f64>>,
    errors: Vec<String>,
}

/// Everything the part measured.
pub(crate) struct Report {
    builds: Vec<Build>,
    samples: Vec<Sample>,
}

/// Runs every build, `--rounds` times.
pub(crate) fn run(
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Result<Report, String> {
    let builds = Build::all(opts);
    let mut samples = Vec::new();
    for round in 0..opts.rounds {
        let mut order = builds.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for &build in &order {
            eprintln!(
                "\nxtask bench: redis cost, {} build, round {} of {} ({} publishes of each kind)",
                build.name(),
                round + 1,
                opts.rounds,
                opts.cost_publishes
            );
            let mut sample = Sample {
                build,
                round,
                idle: None,
                net: vec![None; KINDS.len()],
                gross: vec![None; KINDS.len()],
                rate: vec![None; KINDS.len()],
                errors: Vec::new(),
            };
            if let Err(e) = run_one(&mut sample, opts, bin_dir, runtime) {
                eprintln!("  problem: {e}");
                sample.errors.push(e);
            }
            samples.push(sample);
        }
    }
    Ok(Report { builds, samples })
}

fn run_one(
    sample: &mut Sample,
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Result<(), String> {
    let redis = pgdn_testkit::RedisServer::start();
    let creds = Credentials::new();
    let nodes = Nodes::start(
        &sample.build.bin(opts, bin_dir),
        sample.build,
        &creds,
        NODES,
        ("single", &redis.url()),
        USERS + 1000,
        opts.padding,
    )?;
    let result = runtime.block_on(measure(sample, &nodes, &creds, redis.port(), opts));
    nodes.stop();
    drop(redis);
    result
}

async fn measure(
    sample: &mut Sample,
    nodes: &Nodes,
    creds: &Credentials,
    port: u16,
    opts: &Options,
) -> Result<(), String> {
    nodes.wait_ready().await?;
    let rec = Recorder::with_slots(NODES);
    let mut urls = Vec::new();
    for (k, addr) in nodes.addrs().iter().enumerate() {
        for i in 0..USERS {
            let groups: &[&str] = if i < MEMBERS { &["bench"] } else { &[] };
            urls.push((scale::ws_url(creds, addr, &format!("u{i}"), groups)?, k));
        }
    }
    let mut subscribers = JoinSet::new();
    let result = match client::connect_all(urls, true, &rec, &mut subscribers).await {
        Ok(()) => windows(sample, nodes, &rec, port, opts).await,
        Err(e) => Err(format!("connecting the subscribers: {e}")),
    };
    subscribers.shutdown().await;
    result
}

/// The idle window, then one window per kind.
async fn windows(
    sample: &mut Sample,
    nodes: &Nodes,
    rec: &Arc<Recorder>,
    port: u16,
    opts: &Options,
) -> Result<(), String> {
    // Let the registrations settle.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut probe = Probe::connect(port)?;
    let start = probe.snapshot()?;
    tokio::time::sleep(IDLE).await;
    let idle = start.until(&probe.snapshot()?).per_sec();
    eprintln!(
        "  idle: {:.0} commands/s ({:.0} scripts/s), {:.1} KB/s in, {:.1} KB/s out, Redis CPU {:.2} % of a core",
        idle.commands(),
        idle.calls_of(&["evalsha", "eval"]),
        idle.net_in / 1e3,
        idle.net_out / 1e3,
        idle.cpu_secs * 100.0
    );
    let count = opts.cost_publishes as u64;
    for (k, kind) in KINDS.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = probe.snapshot()?;
        let started = Instant::now();
        scale::publish_many(
            &nodes.publishers,
            Arc::new(move |i| kind.target(i)),
            kind.phase(),
            count,
            TASKS,
            Some(RATE),
        )
        .await?;
        let want = count * kind.deliveries();
        rec.wait_for(kind.phase(), want, Instant::now() + Duration::from_secs(60))
            .await?;
        let secs = started.elapsed().as_secs_f64();
        let gross = before.until(&probe.snapshot()?);
        let per = 1000.0 / count as f64;
        let net = gross.less(&idle).scaled(per);
        eprintln!(
            "  {}: {count} publishes in {secs:.2} s ({:.0}/s); per 1,000 publishes: Redis CPU {:.1} ms, \
             {:.0} commands ({:.0} scripts, {:.0} pub/sub sends), {:.1} KB in, {:.1} KB out",
            kind.name(),
            count as f64 / secs,
            net.cpu_secs * 1e3,
            net.commands(),
            net.calls_of(&["evalsha", "eval"]),
            net.calls_of(&["publish", "spublish"]),
            net.net_in / 1e3,
            net.net_out / 1e3,
        );
        sample.net[k] = Some(net);
        sample.gross[k] = Some(gross.scaled(per));
        sample.rate[k] = Some(count as f64 / secs);
        let got = rec.count(kind.phase());
        if got != want {
            sample.errors.push(format!(
                "{}: {got} deliveries, expected exactly {want}",
                kind.name()
            ));
        }
    }
    sample.idle = Some(idle);
    let (closed, failed) = rec.ended();
    if closed + failed > 0 {
        sample.errors.push(format!(
            "{closed} connections closed by the server, {failed} failed"
        ));
    }
    Ok(())
}

/// A figure of a [`Usage`], with its label and format.
struct Figure {
    label: &'static str,
    get: fn(&Usage) -> f64,
    fmt: fn(f64) -> String,
}

const FIGURES: [Figure; 6] = [
    Figure {
        label: "Redis CPU (ms)",
        get: |u| u.cpu_secs * 1e3,
        fmt: |v| format!("{v:.1}"),
    },
    Figure {
        label: "commands Redis ran (those inside scripts included)",
        get: Usage::commands,
        fmt: |v| thousands(v),
    },
    Figure {
        label: "... scripts (EVALSHA)",
        get: |u| u.calls_of(&["evalsha", "eval"]),
        fmt: |v| thousands(v),
    },
    Figure {
        label: "... pub/sub sends (PUBLISH, SPUBLISH)",
        get: |u| u.calls_of(&["publish", "spublish"]),
        fmt: |v| thousands(v),
    },
    Figure {
        label: "network in (KB)",
        get: |u| u.net_in / 1e3,
        fmt: |v| format!("{v:.0}"),
    },
    Figure {
        label: "network out (KB)",
        get: |u| u.net_out / 1e3,
        fmt: |v| format!("{v:.0}"),
    },
];

/// Prints the part's tables: per 1,000 publishes of each kind, and idle
/// per second; medians over the rounds.
pub(crate) fn print(report: &Report, opts: &Options) {
    let before = report.builds.contains(&Build::Before);
    println!(
        "### Redis cost per publish, 3 nodes on one Redis\n\n\
         {} publishes of each kind per round, offered at {RATE} per second by {TASKS} concurrent HTTP \
         publishers over the 3 nodes; \
         {USERS} users, each connected to every node ({} messages per user: {}), the first {MEMBERS} \
         of them in group `bench`; medians of {} round(s){}.\n",
        thousands(opts.cost_publishes as f64),
        opts.cost_publishes.div_ceil(USERS),
        if opts.cost_publishes.div_ceil(USERS) <= 100 {
            "the 100-message history window never fills"
        } else {
            "**the 100-message history window fills, so publishes also evict**"
        },
        opts.rounds,
        if before {
            ""
        } else {
            "; **after only**: no `--before-bin` was given, so there is no before column"
        }
    );
    let of = |build: Build| -> Vec<&Sample> {
        report.samples.iter().filter(|s| s.build == build).collect()
    };
    let (old, new) = (of(Build::Before), of(Build::After));
    let med = |samples: &[&Sample], get: &dyn Fn(&Sample) -> Option<f64>| {
        median(samples.iter().filter_map(|s| get(s)).collect())
    };
    let cell = |v: Option<f64>, fmt: fn(f64) -> String| v.map_or("-".into(), fmt);
    if before {
        println!("| per 1,000 publishes | before | after | after / before |");
        println!("|---|---:|---:|---:|");
    } else {
        println!("| per 1,000 publishes | after |");
        println!("|---|---:|");
    }
    let line = |label: String, get: &dyn Fn(&Sample) -> Option<f64>, fmt: fn(f64) -> String| {
        let b = med(&new, get);
        if before {
            let a = med(&old, get);
            let ratio = match (a, b) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
                _ => "-".into(),
            };
            println!(
                "| {label} | {} | {} | {ratio} |",
                cell(a, fmt),
                cell(b, fmt)
            );
        } else {
            println!("| {label} | {} |", cell(b, fmt));
        }
    };
    for (k, kind) in KINDS.into_iter().enumerate() {
        for (i, f) in FIGURES.iter().enumerate() {
            let label = if i == 0 {
                format!("**{}**: {}", kind.name(), f.label)
            } else {
                format!("{}: {}", kind.name(), f.label)
            };
            line(label, &|s: &Sample| s.net[k].as_ref().map(f.get), f.fmt);
        }
        line(
            format!("{}: publishes/s of the window", kind.name()),
            &|s: &Sample| s.rate[k],
            thousands,
        );
    }
    println!();
    println!(
        "Idle, per second, 3 nodes and {} connections:\n",
        USERS * NODES
    );
    if before {
        println!("| idle, per second | before | after | after / before |");
        println!("|---|---:|---:|---:|");
    } else {
        println!("| idle, per second | after |");
        println!("|---|---:|");
    }
    for f in &FIGURES {
        line(
            f.label.to_string(),
            &|s: &Sample| s.idle.as_ref().map(f.get),
            f.fmt,
        );
    }
    println!();
    println!(
        "Every sample of Redis CPU per 1,000 publishes (ms), in round order, net of idle (gross in brackets):\n"
    );
    for (k, kind) in KINDS.into_iter().enumerate() {
        let list = |samples: &[&Sample]| {
            samples
                .iter()
                .filter_map(|s| {
                    Some(format!(
                        "{:.1} ({:.1})",
                        s.net[k].as_ref()?.cpu_secs * 1e3,
                        s.gross[k].as_ref()?.cpu_secs * 1e3
                    ))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if before {
            println!(
                "- {}: before {}; after {}",
                kind.name(),
                list(&old),
                list(&new)
            );
        } else {
            println!("- {}: after {}", kind.name(), list(&new));
        }
    }
    println!();
    println!("Commands per publish by name, net of idle (medians):\n");
    for (k, kind) in KINDS.into_iter().enumerate() {
        for (build, samples) in [(Build::Before, &old), (Build::After, &new)] {
            if samples.is_empty() {
                continue;
            }
            let mut names: Vec<String> = samples
                .iter()
                .filter_map(|s| s.net[k].as_ref())
                .flat_map(|u| u.calls.keys().cloned())
                .collect();
            names.sort();
            names.dedup();
            let per: Vec<String> = names
                .iter()
                .filter_map(|n| {
                    let v = med(samples, &|s: &Sample| {
                        s.net[k]
                            .as_ref()
                            .map(|u| u.calls.get(n).copied().unwrap_or(0.0))
                    })? / 1000.0;
                    (v >= 0.05).then(|| format!("{} {v:.1}", n.to_uppercase()))
                })
                .collect();
            println!("- {}, {}: {}", kind.name(), build.name(), per.join(", "));
        }
    }
    for s in &report.samples {
        for e in &s.errors {
            println!(
                "- problem, {} build round {}: {e}",
                s.build.name(),
                s.round + 1
            );
        }
    }
    println!();
}
