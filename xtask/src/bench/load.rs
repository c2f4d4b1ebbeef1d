//! `cargo xtask bench --load`: one pgdn node under load, in the six parts
//! of issue 11 ("Performance"), each with its target:
//!
//! | part (`--load-parts`) | what | target |
//! |---|---|---|
//! | `publishers` | broadcast deliveries/s at N idle subscribers, 8 concurrent publishers over 1 | at least 1.5x |
//! | `user-latency` | user-targeted publish-to-receive p99 during back-to-back broadcasts to N | at most 5 ms |
//! | `connect-latency` | new-connection p99 during broadcasts over idle | at most 2x |
//! | `single` | user-targeted single publishes/s, and their request p99 | 30,000/s, 20 ms |
//! | `batch` | user-targeted messages/s in batches of 100 | 300,000/s |
//! | `connections` | new authenticated WebSocket connections/s | 10,000/s |
//!
//! How each is measured is in its file: parts 1 to 3 in
//! `load/broadcast.rs` (one server with N = `--n` subscribers, default
//! 10,000), parts 4 and 5 in `load/publish.rs` (one server with
//! `--load-targets` subscribers), part 6 in `load/connect.rs` (one server
//! with nothing else connected). The publish requests go through the
//! bench's own small HTTP/1.1 client (`load/http.rs`): the bench shares
//! the cores with the server, and reqwest's cost per request would take
//! much of one at these rates.
//!
//! Every part runs against `--pgdn-bin` when given (e.g. an older build),
//! otherwise the release build of this workspace; the server gets only
//! `--max-connections` on top of what `start_pgdn` passes (no rate limit
//! of pgdn applies to publishes or to new connections). `--rounds` rounds
//! (default 3; `--quick` 1), each starting fresh servers; the tables show
//! the medians over the rounds, then every sample. `--quick` also shortens
//! the timed phases (`--load-secs` 3 instead of 10, 100 connects per phase
//! in part 3, 5,000 connections in part 6, 300,000 deliveries per
//! broadcast phase). Every part checks its counts: each subscriber gets
//! each broadcast exactly once, each user-targeted message reaches its
//! user exactly once, and every publish answer says so.

use std::path::Path;
use std::time::Instant;

mod broadcast;
mod connect;
mod http;
mod publish;

use super::{Options, median, ms, print_header, procs, thousands};

/// Target of part 1: deliveries/s with the most publishers over with one,
/// at least.
const TARGET_PUBLISHERS: f64 = 1.5;
/// Target of part 2: user-targeted p99 during broadcasts, at most (ms).
const TARGET_USER_P99_MS: f64 = 5.0;
/// Target of part 3: connect p99 during broadcasts over idle, at most.
const TARGET_CONNECT_RATIO: f64 = 2.0;
/// Target of part 4: single publishes/s, at least.
const TARGET_SINGLE: f64 = 30_000.0;
/// Target of part 4: single publish request p99, at most (ms).
const TARGET_SINGLE_P99_MS: f64 = 20.0;
/// Target of part 5: batched messages/s, at least.
const TARGET_BATCH: f64 = 300_000.0;
/// Target of part 6: new connections/s, at least.
const TARGET_CONNECTIONS: f64 = 10_000.0;

/// A part of `--load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// 1: broadcast throughput, 1 publisher against 8.
    Publishers,
    /// 2: user-targeted latency during broadcasts.
    UserLatency,
    /// 3: new-connection latency during broadcasts.
    ConnectLatency,
    /// 4: single user-targeted publishes/s.
    Single,
    /// 5: batched user-targeted messages/s.
    Batch,
    /// 6: new authenticated connections/s.
    Connections,
}

impl Part {
    /// Every part, in the order they run and print.
    pub(crate) const ALL: [Part; 6] = [
        Part::Publishers,
        Part::UserLatency,
        Part::ConnectLatency,
        Part::Single,
        Part::Batch,
        Part::Connections,
    ];

    /// Its name in `--load-parts`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Part::Publishers => "publishers",
            Part::UserLatency => "user-latency",
            Part::ConnectLatency => "connect-latency",
            Part::Single => "single",
            Part::Batch => "batch",
            Part::Connections => "connections",
        }
    }
}

/// The options of `--load` (besides the shared `--n`, `--publishers`,
/// `--window`, `--deliveries`, `--messages`, `--rounds`, `--padding`,
/// `--pgdn-bin`, `--quick` and `--check`).
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    /// What to measure (`--load-parts`).
    pub(crate) parts: Vec<Part>,
    /// Seconds of each timed phase of parts 2, 4 and 5 (`--load-secs`).
    pub(crate) secs: f64,
    /// User-targeted publishes per second in part 2 (`--load-rate`).
    pub(crate) rate: usize,
    /// New connections per phase of part 3 (`--load-connects`).
    pub(crate) connects: usize,
    /// HTTP connections of part 4 and connecting tasks of part 6
    /// (`--load-conns`).
    pub(crate) conns: usize,
    /// Subscribers targeted in parts 4 and 5 (`--load-targets`).
    pub(crate) targets: usize,
    /// Connections opened in part 6 (`--load-connections`).
    pub(crate) connections: usize,
    /// Users each batch of part 5 goes to, in turn
    /// (`--load-batch-users`, at most [`publish::BATCH`]).
    pub(crate) batch_users: usize,
}

impl LoadOptions {
    /// The defaults, shorter with `--quick`.
    pub(crate) fn new(quick: bool) -> LoadOptions {
        LoadOptions {
            parts: Part::ALL.to_vec(),
            secs: if quick { 3.0 } else { 10.0 },
            rate: 1000,
            connects: if quick { 100 } else { 1000 },
            conns: 64,
            targets: 2000,
            connections: if quick { 5000 } else { 15_000 },
            batch_users: publish::BATCH,
        }
    }

    /// Takes `arg` if it is an option of `--load` (`value` gives its
    /// value); Ok(false) when it is not one.
    pub(crate) fn parse_arg(
        &mut self,
        arg: &str,
        value: &mut dyn FnMut(&str) -> Result<String, String>,
    ) -> Result<bool, String> {
        let number = |s: String| -> Result<usize, String> {
            s.replace('_', "")
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{arg}: not a positive number: {s}"))
        };
        match arg {
            "--load-parts" => {
                self.parts = value(arg)?
                    .split(',')
                    .map(|p| {
                        let p = p.trim();
                        Part::ALL
                            .into_iter()
                            .find(|c| c.name() == p)
                            .ok_or_else(|| {
                                let names: Vec<_> = Part::ALL.iter().map(|p| p.name()).collect();
                                format!("--load-parts: {}, not {p}", names.join(", "))
                            })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--load-secs" => {
                self.secs = value(arg)?
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0)
                    .ok_or("--load-secs: not a positive number")?;
            }
            "--load-rate" => self.rate = number(value(arg)?)?,
            "--load-connects" => self.connects = number(value(arg)?)?,
            "--load-conns" => self.conns = number(value(arg)?)?,
            "--load-targets" => {
                self.targets = number(value(arg)?)?;
                if self.targets < publish::BATCH {
                    return Err(format!(
                        "--load-targets: at least {} (a batch's users differ)",
                        publish::BATCH
                    ));
                }
            }
            "--load-connections" => self.connections = number(value(arg)?)?,
            "--load-batch-users" => {
                self.batch_users = number(value(arg)?)?;
                if self.batch_users > publish::BATCH {
                    return Err(format!(
                        "--load-batch-users: at most {} (a batch's size)",
                        publish::BATCH
                    ));
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn has(&self, part: Part) -> bool {
        self.parts.contains(&part)
    }
}

/// Everything `--load` measured.
struct Report {
    broadcast: Vec<broadcast::Round>,
    publish: Vec<publish::Round>,
    connect: Vec<connect::Round>,
}

/// Runs the parts `--load-parts` names, `--rounds` times, and prints the
/// tables; Ok(false) when `--check` and a target is missed.
pub(crate) fn run(
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    ticks_per_sec: u64,
    machine: &str,
    revision: &str,
) -> Result<bool, String> {
    let load = &opts.load;
    if opts.publishers.is_empty() {
        return Err("--publishers: at least one value".into());
    }
    let started = Instant::now();
    let load_before = procs::load_average();
    let mut steals = Vec::new();
    let mut report = Report {
        broadcast: Vec::new(),
        publish: Vec::new(),
        connect: Vec::new(),
    };
    for round in 0..opts.rounds {
        if [Part::Publishers, Part::UserLatency, Part::ConnectLatency]
            .iter()
            .any(|&p| load.has(p))
        {
            for &n in &opts.ns {
                eprintln!(
                    "\nxtask bench --load: parts {} with N = {n}, round {} of {}",
                    names(
                        load,
                        &[Part::Publishers, Part::UserLatency, Part::ConnectLatency]
                    ),
                    round + 1,
                    opts.rounds
                );
                let steal = procs::Steal::start();
                report.broadcast.push(broadcast::run_round(
                    round,
                    n,
                    opts,
                    load,
                    bin_dir,
                    runtime,
                    ticks_per_sec,
                ));
                steals.push(steal.percent());
            }
        }
        if load.has(Part::Single) || load.has(Part::Batch) {
            eprintln!(
                "\nxtask bench --load: parts {} with {} targets, round {} of {}",
                names(load, &[Part::Single, Part::Batch]),
                load.targets,
                round + 1,
                opts.rounds
            );
            let steal = procs::Steal::start();
            report.publish.push(publish::run_round(
                round,
                opts,
                load,
                bin_dir,
                runtime,
                ticks_per_sec,
            ));
            steals.push(steal.percent());
        }
        if load.has(Part::Connections) {
            eprintln!(
                "\nxtask bench --load: part connections, {} connections, round {} of {}",
                load.connections,
                round + 1,
                opts.rounds
            );
            let steal = procs::Steal::start();
            report
                .connect
                .push(connect::run_round(round, opts, load, bin_dir, runtime));
            steals.push(steal.percent());
        }
    }
    print_header(machine, revision);
    println!(
        "The run took {:.0} s; load average (1, 5, 15 min) {load_before} when it started, {} when it \
         ended; the hypervisor took {} of the CPU time (steal) during each server's run, in \
         order. pgdn-server: {}. Parts: {}; medians of {} round(s).\n",
        started.elapsed().as_secs_f64(),
        procs::load_average(),
        procs::describe_steal(&steals),
        opts.pgdn_bin
            .as_ref()
            .map_or("the release build of this workspace".into(), |b| b
                .display()
                .to_string()),
        names(load, &Part::ALL),
        opts.rounds
    );
    let mut all_met = true;
    for &n in &opts.ns {
        let rounds: Vec<&broadcast::Round> = report.broadcast.iter().filter(|r| r.n == n).collect();
        if rounds.is_empty() {
            continue;
        }
        if load.has(Part::Publishers) {
            all_met &= print_publishers(&rounds, n, opts, ticks_per_sec);
        }
        if load.has(Part::UserLatency) {
            all_met &= print_user_latency(&rounds, n, load);
        }
        if load.has(Part::ConnectLatency) {
            all_met &= print_connect_latency(&rounds, n, load);
        }
        if rounds.iter().any(|r| !r.errors.is_empty()) {
            println!("Problems in parts 1 to 3 at N = {}:\n", thousands(n as f64));
            problems(
                rounds
                    .iter()
                    .flat_map(|r| r.errors.iter().map(|e| (r.round, e.clone()))),
            );
            println!();
        }
    }
    if !report.publish.is_empty() {
        all_met &= print_publish(&report.publish, load, ticks_per_sec);
    }
    if !report.connect.is_empty() {
        all_met &= print_connections(&report.connect, load, ticks_per_sec);
    }
    Ok(all_met || !opts.check)
}

/// The names of the parts of `among` that `load` measures.
fn names(load: &LoadOptions, among: &[Part]) -> String {
    among
        .iter()
        .filter(|&&p| load.has(p))
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The median of the values, if any.
fn med(values: impl Iterator<Item = f64>) -> Option<f64> {
    median(values.collect())
}

/// A table cell: the value formatted, or `-`.
fn cell(x: Option<f64>, fmt: &dyn Fn(f64) -> String) -> String {
    x.map_or("-".into(), fmt)
}

fn two(x: f64) -> String {
    format!("{x:.2}")
}

/// `>= t: PASS` (or `<=`, or FAIL, or not measured); clears `all_met` on a
/// miss.
fn verdict(
    x: Option<f64>,
    at_least: bool,
    target: &str,
    threshold: f64,
    all_met: &mut bool,
) -> String {
    let op = if at_least { ">=" } else { "<=" };
    match x {
        None => format!("{op} {target}: not measured"),
        Some(x) => {
            let met = if at_least {
                x >= threshold
            } else {
                x <= threshold
            };
            *all_met &= met;
            format!("{op} {target}: {}", if met { "PASS" } else { "FAIL" })
        }
    }
}

/// Prints every sample of a figure, in round order, and the problems.
fn samples(label: &str, values: Vec<String>) {
    println!("- {label}: {}", values.join(", "));
}

fn problems(errors: impl Iterator<Item = (usize, String)>) {
    for (round, e) in errors {
        println!("- problem, round {}: {e}", round + 1);
    }
}

/// Part 1's table; true when its target is met.
fn print_publishers(
    rounds: &[&broadcast::Round],
    n: usize,
    opts: &Options,
    ticks_per_sec: u64,
) -> bool {
    println!(
        "### 1. Concurrent broadcast publishers, N = {}\n\n{} idle WebSocket subscribers; {} broadcasts per \
         phase, at most {} not yet fully delivered; K publishers each keep one publish request \
         outstanding.\n",
        thousands(n as f64),
        thousands(n as f64),
        opts.broadcasts(n),
        opts.window
    );
    let ks = &opts.publishers;
    let of = |k: usize| -> Vec<&broadcast::Throughput> {
        rounds
            .iter()
            .flat_map(|r| r.publishers.iter().filter(move |t| t.publishers == k))
            .collect()
    };
    let (first, last) = (ks[0], ks[ks.len() - 1]);
    let mut heading = String::from("| |");
    let mut rule = String::from("|---|");
    for &k in ks {
        heading += &format!(" {k} publisher{} |", if k == 1 { "" } else { "s" });
        rule += "---:|";
    }
    println!("{heading} {last} / {first} | target |\n{rule}---:|---|");
    let mut all_met = true;
    let mut row = |label: &str,
                   get: &dyn Fn(&broadcast::Throughput) -> f64,
                   fmt: &dyn Fn(f64) -> String,
                   target: Option<(bool, &str, f64)>| {
        let meds: Vec<Option<f64>> = ks
            .iter()
            .map(|&k| med(of(k).into_iter().map(get)))
            .collect();
        let mut line = format!("| {label} |");
        for m in &meds {
            line += &format!(" {} |", cell(*m, fmt));
        }
        let ratio = match (meds[meds.len() - 1], meds[0]) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        match target {
            Some((at_least, text, t)) => {
                line += &format!(
                    " **{}** | {} |",
                    cell(ratio, &two),
                    verdict(ratio, at_least, text, t, &mut all_met)
                );
            }
            None => line += &format!(" {} | |", cell(ratio, &two)),
        }
        println!("{line}");
    };
    row(
        "broadcast deliveries/s",
        &|t| t.phase.per_sec(),
        &thousands,
        Some((true, "1.50x", TARGET_PUBLISHERS)),
    );
    row(
        "server CPU per delivery (µs)",
        &|t| t.phase.cpu_us_per_delivery(ticks_per_sec),
        &two,
        None,
    );
    row(
        "server CPU (% of a core)",
        &|t| t.phase.server_ticks as f64 * 100.0 / ticks_per_sec as f64 / t.phase.secs,
        &|x| format!("{x:.0}"),
        None,
    );
    // The load generator shares the box: server and bench together at
    // about 100 % per core means the machine, not the server, set the pace.
    row(
        "bench CPU (% of a core)",
        &|t| t.phase.bench_ticks as f64 * 100.0 / ticks_per_sec as f64 / t.phase.secs,
        &|x| format!("{x:.0}"),
        None,
    );
    row(
        "publish request p50 (ms)",
        &|t| ms(t.call_p50_ns),
        &two,
        None,
    );
    row(
        "publish request p99 (ms)",
        &|t| ms(t.call_p99_ns),
        &two,
        None,
    );
    row(
        "publish-to-receive p50 (ms)",
        &|t| ms(t.phase.p50_ns),
        &|x| format!("{x:.1}"),
        None,
    );
    row(
        "publish-to-receive p99 (ms)",
        &|t| ms(t.phase.p99_ns),
        &|x| format!("{x:.1}"),
        None,
    );
    println!("\nEvery sample, in round order:\n");
    for &k in ks {
        samples(
            &format!("deliveries/s, {k} publisher(s)"),
            of(k).iter().map(|t| thousands(t.phase.per_sec())).collect(),
        );
    }
    println!();
    all_met
}

/// Part 2's table; true when its target is met.
fn print_user_latency(rounds: &[&broadcast::Round], n: usize, load: &LoadOptions) -> bool {
    println!(
        "### 2. User-targeted latency during broadcasts, N = {}\n\n{} user-targeted publishes/s for \
         {} s to users drawn among {} of the subscribers (read on a thread of their own), from {} \
         senders; during broadcasts: one publisher, broadcast after broadcast to every subscriber, \
         at most {} not yet fully delivered.\n",
        thousands(n as f64),
        thousands(load.rate as f64),
        load.secs,
        broadcast::PROBES.min(n),
        broadcast::USER_SENDERS,
        broadcast::BACKGROUND_WINDOW
    );
    let idle: Vec<_> = rounds.iter().filter_map(|r| r.user_idle).collect();
    let busy: Vec<_> = rounds.iter().filter_map(|r| r.user_busy).collect();
    let m = |v: &[broadcast::UserLatency], f: &dyn Fn(&broadcast::UserLatency) -> f64| {
        med(v.iter().map(f))
    };
    let mut all_met = true;
    println!("| | no broadcasts | during broadcasts | target |\n|---|---:|---:|---|");
    let p99 = m(&busy, &|u| ms(u.p99_ns));
    for (label, f, target) in [
        (
            "user-targeted publish-to-receive p50 (ms)",
            &(|u: &broadcast::UserLatency| ms(u.p50_ns)) as &dyn Fn(&broadcast::UserLatency) -> f64,
            String::new(),
        ),
        (
            "**user-targeted publish-to-receive p99 (ms)**",
            &|u| ms(u.p99_ns),
            verdict(p99, false, "5 ms", TARGET_USER_P99_MS, &mut all_met),
        ),
        (
            "user-targeted publish-to-receive, largest (ms)",
            &|u| ms(u.max_ns),
            String::new(),
        ),
        (
            "user-targeted publishes/s",
            &|u| u.sent as f64 / u.secs,
            String::new(),
        ),
    ] {
        println!(
            "| {label} | {} | {} | {target} |",
            cell(m(&idle, f), &two),
            cell(m(&busy, f), &two)
        );
    }
    println!(
        "| broadcast deliveries/s meanwhile | - | {} | |",
        cell(
            m(&busy, &|u| u.background.map_or(0.0, |b| b.per_sec())),
            &thousands
        )
    );
    println!("\nEvery sample, in round order:\n");
    samples(
        "p99 (ms), no broadcasts",
        idle.iter().map(|u| two(ms(u.p99_ns))).collect(),
    );
    samples(
        "p99 (ms), during broadcasts",
        busy.iter().map(|u| two(ms(u.p99_ns))).collect(),
    );
    println!();
    all_met
}

/// Part 3's table; true when its target is met.
fn print_connect_latency(rounds: &[&broadcast::Round], n: usize, load: &LoadOptions) -> bool {
    println!(
        "### 3. New connection latency, N = {}\n\n{} new authenticated WebSocket connections per phase, \
         {} started per second, each timed from its TCP connect to its `connection` frame, then \
         closed; idle: the {} subscribers connected, no traffic; during broadcasts: as in part \
         2.\n",
        thousands(n as f64),
        load.connects,
        broadcast::CONNECT_RATE,
        thousands(n as f64),
    );
    let idle: Vec<_> = rounds.iter().filter_map(|r| r.connect_idle).collect();
    let busy: Vec<_> = rounds.iter().filter_map(|r| r.connect_busy).collect();
    let m = |v: &[broadcast::ConnectLatency], f: &dyn Fn(&broadcast::ConnectLatency) -> f64| {
        med(v.iter().map(f))
    };
    let mut all_met = true;
    println!("| | idle | during broadcasts | during / idle | target |\n|---|---:|---:|---:|---|");
    for (label, f, judged) in [
        (
            "connect p50 (ms)",
            &(|c: &broadcast::ConnectLatency| ms(c.p50_ns))
                as &dyn Fn(&broadcast::ConnectLatency) -> f64,
            false,
        ),
        ("**connect p99 (ms)**", &|c| ms(c.p99_ns), true),
        ("connect, largest (ms)", &|c| ms(c.max_ns), false),
    ] {
        let (a, b) = (m(&idle, f), m(&busy, f));
        let ratio = match (b, a) {
            (Some(b), Some(a)) if a > 0.0 => Some(b / a),
            _ => None,
        };
        let (ratio_text, target) = if judged {
            (
                format!("**{}**", cell(ratio, &two)),
                verdict(ratio, false, "2.00x", TARGET_CONNECT_RATIO, &mut all_met),
            )
        } else {
            (cell(ratio, &two), String::new())
        };
        println!(
            "| {label} | {} | {} | {ratio_text} | {target} |",
            cell(a, &two),
            cell(b, &two)
        );
    }
    println!(
        "| broadcast deliveries/s meanwhile | - | {} | | |",
        cell(
            m(&busy, &|c| c.background.map_or(0.0, |b| b.per_sec())),
            &thousands
        )
    );
    println!("\nEvery sample, in round order:\n");
    samples(
        "p99 (ms), idle",
        idle.iter().map(|c| two(ms(c.p99_ns))).collect(),
    );
    samples(
        "p99 (ms), during broadcasts",
        busy.iter().map(|c| two(ms(c.p99_ns))).collect(),
    );
    println!();
    all_met
}

/// The tables of parts 4 and 5; true when their targets are met.
fn print_publish(rounds: &[publish::Round], load: &LoadOptions, ticks_per_sec: u64) -> bool {
    let mut all_met = true;
    for (part, title) in [
        (Part::Single, "4. Single publishes"),
        (Part::Batch, "5. Batch publishes"),
    ] {
        if !load.has(part) {
            continue;
        }
        let get = |r: &publish::Round| {
            if part == Part::Single {
                r.single
            } else {
                r.batch
            }
        };
        let get_bare = |r: &publish::Round| {
            if part == Part::Single {
                r.bare_single
            } else {
                r.bare_batch
            }
        };
        let v: Vec<publish::Rate> = rounds.iter().filter_map(get).collect();
        let bare: Vec<publish::Rate> = rounds.iter().filter_map(get_bare).collect();
        let single = part == Part::Single;
        if single {
            println!(
                "### {title}\n\nUser-targeted `POST /api/v1/publish`, one message each, from {} keep-alive \
                 connections, closed loop, for {} s, to users drawn among {} connected subscribers.\n",
                load.conns,
                load.secs,
                thousands(load.targets as f64)
            );
        } else {
            println!(
                "### {title}\n\n`POST /api/v1/publish/batch` with {} user-targeted messages each (to \
                 {} different users in turn), from {} keep-alive connections, closed loop, for {} s, \
                 among {} connected subscribers.\n",
                publish::BATCH,
                load.batch_users,
                publish::BATCH_CONNS,
                load.secs,
                thousands(load.targets as f64)
            );
        }
        println!(
            "The bare baseline gets the same requests in the same round, after pgdn, with as many \
             subscribers: it writes each message to its socket (one write per message) and does \
             nothing else, so its figure is about the most this machine's core can do at that \
             moment.\n"
        );
        println!("| | pgdn | bare baseline | pgdn / baseline | target |\n|---|---:|---:|---:|---|");
        // A row: pgdn's median, the baseline's, their ratio and a verdict
        // on pgdn's figure.
        let mut row = |label: &str,
                       f: &dyn Fn(&publish::Rate) -> f64,
                       fmt: &dyn Fn(f64) -> String,
                       target: Option<(bool, &str, f64)>| {
            let (x, y) = (med(v.iter().map(f)), med(bare.iter().map(f)));
            let ratio = match (x, y) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            };
            let verdict = target.map_or(String::new(), |(at_least, text, t)| {
                verdict(x, at_least, text, t, &mut all_met)
            });
            println!(
                "| {label} | {} | {} | {} | {verdict} |",
                cell(x, fmt),
                cell(y, fmt),
                cell(ratio, &two)
            );
        };
        if single {
            row(
                "**publishes/s**",
                &publish::Rate::per_sec,
                &thousands,
                Some((true, "30,000", TARGET_SINGLE)),
            );
            row(
                "**publish request p99 (ms)**",
                &|r| ms(r.call_p99_ns),
                &two,
                Some((false, "20 ms", TARGET_SINGLE_P99_MS)),
            );
        } else {
            row(
                "**messages/s**",
                &publish::Rate::per_sec,
                &thousands,
                Some((true, "300,000", TARGET_BATCH)),
            );
            row(
                "batch requests/s",
                &|r| r.requests as f64 / r.secs,
                &thousands,
                None,
            );
            row("batch request p99 (ms)", &|r| ms(r.call_p99_ns), &two, None);
        }
        row("request p50 (ms)", &|r| ms(r.call_p50_ns), &two, None);
        row(
            "publish-to-receive p50 (ms)",
            &|r| ms(r.recv_p50_ns),
            &two,
            None,
        );
        row(
            "publish-to-receive p99 (ms)",
            &|r| ms(r.recv_p99_ns),
            &two,
            None,
        );
        row(
            "server CPU per message (µs)",
            &|r| r.server_us(ticks_per_sec),
            &two,
            None,
        );
        let busy = |ticks: u64, r: &publish::Rate| {
            ticks as f64 * 100.0 / ticks_per_sec as f64 / r.secs.max(1e-9)
        };
        row(
            "server CPU (% of a core)",
            &|r| busy(r.server_ticks, r),
            &|x| format!("{x:.0}"),
            None,
        );
        row(
            "bench CPU (% of a core)",
            &|r| busy(r.bench_ticks, r),
            &|x| format!("{x:.0}"),
            None,
        );
        println!("\nEvery sample, in round order:\n");
        let what = if single { "publishes/s" } else { "messages/s" };
        samples(
            &format!("{what}, pgdn"),
            v.iter().map(|r| thousands(r.per_sec())).collect(),
        );
        samples(
            &format!("{what}, bare baseline"),
            bare.iter().map(|r| thousands(r.per_sec())).collect(),
        );
        problems(
            rounds
                .iter()
                .flat_map(|r| r.errors.iter().map(|e| (r.round, e.clone()))),
        );
        println!();
    }
    all_met
}

/// Part 6's table; true when its target is met.
fn print_connections(rounds: &[connect::Round], load: &LoadOptions, ticks_per_sec: u64) -> bool {
    println!(
        "### 6. New authenticated connections/s\n\n{} WebSocket connections, each with its own HS256 JWT, \
         in sets of at most {} (held open until the set is in, then closed, untimed), opened by {} \
         concurrent tasks; a connection counts once its `connection` frame arrived.\n",
        thousands(load.connections as f64),
        thousands(connect::SET as f64),
        load.conns
    );
    let m = |f: &dyn Fn(&connect::Round) -> f64| {
        med(rounds.iter().filter(|r| r.connections > 0).map(f))
    };
    let mut all_met = true;
    let rate = m(&connect::Round::per_sec);
    println!("| | measured | target |\n|---|---:|---|");
    println!(
        "| **connections/s** | {} | {} |",
        cell(rate, &thousands),
        verdict(rate, true, "10,000", TARGET_CONNECTIONS, &mut all_met)
    );
    println!(
        "| one connection p50 / p99 (ms) | {} / {} | |",
        cell(m(&|r| ms(r.p50_ns)), &two),
        cell(m(&|r| ms(r.p99_ns)), &two)
    );
    let per = |ticks: u64, r: &connect::Round| {
        ticks as f64 * 1e6 / ticks_per_sec as f64 / r.connections.max(1) as f64
    };
    println!(
        "| server / bench CPU per connection (µs) | {} / {} | |",
        cell(m(&|r| per(r.server_ticks, r)), &|x| format!("{x:.0}")),
        cell(m(&|r| per(r.bench_ticks, r)), &|x| format!("{x:.0}"))
    );
    println!("\nEvery sample, in round order:\n");
    samples(
        "connections/s",
        rounds.iter().map(|r| thousands(r.per_sec())).collect(),
    );
    samples(
        "connections/s of each set",
        rounds
            .iter()
            .flat_map(|r| r.set_rates.iter().map(|&x| thousands(x)))
            .collect(),
    );
    problems(
        rounds
            .iter()
            .flat_map(|r| r.errors.iter().map(|e| (r.round, e.clone()))),
    );
    println!();
    all_met
}
