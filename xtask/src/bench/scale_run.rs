//! `cargo xtask bench --scale`: many connections on one box. K pgdn-server
//! nodes (default 5) on one private redis-server hold C WebSocket
//! connections each (default 19,000: 95,000 in all), broadcasts published
//! to node 1 reach every one of them exactly once, and the run measures
//! what that costs.
//!
//! The machine allows at most 20,000 open files per process, so nothing
//! holds more than one node's share: each node is its own pgdn-server
//! process (`--max-connections C + 100`, started by `scale.rs` with
//! `--redis-mode single`), and the subscribers of node k live in their own
//! load-generating process, this binary re-executed as
//! `xtask bench __scale-worker` (`scale_worker.rs`), users
//! `u<k*C>..u<(k+1)*C>`, each with its own HS256 JWT and no groups. The
//! coordinator (this file) talks to the workers over their stdin and
//! stdout, one line a command or an answer. Each connection is one
//! loopback port towards its node: C must stay below the ephemeral port
//! range (`/proc/sys/net/ipv4/ip_local_port_range`).
//!
//! One run:
//!
//! 1. starts Redis and the nodes, waits until every node takes a publish,
//!    and reads each node's RSS (`VmRSS`), Redis's `used_memory` and the
//!    kernel's memory (slab from `/proc/meminfo`, TCP buffers from
//!    `/proc/net/sockstat`);
//! 2. **idle, empty**: Redis's CPU (`INFO cpu` and `/proc`) and commands
//!    over `--scale-idle` seconds with no connection; then 200 broadcasts
//!    to nobody, one request at a time: what a broadcast costs Redis (CPU,
//!    commands, bytes; less the idle rate), which depends on the nodes and
//!    not on the connections, measured here because with everyone
//!    connected the heartbeats' work would drown it;
//! 3. **connect**: every worker connects its share at once, at most
//!    `--scale-handshakes` / K handshakes in flight each; the time from the
//!    order to the last worker's answer is the time to connect everyone
//!    (Redis's and pgdn's CPU over it / connections is their cost per
//!    connect). Then the nodes' RSS settles and is read again:
//!    (after - before) / connections is the RSS per connection, per node
//!    and over all nodes;
//! 4. **idle, full**: the same window with everyone connected (the nodes'
//!    heartbeats rewrite their sessions in Redis every 5 s, and the nodes
//!    ping every connection every 25 s);
//! 5. **one at a time**: a few broadcasts, each once the previous one
//!    reached everybody: how long one broadcast takes to reach every
//!    connection;
//! 6. **throughput**: `--broadcasts` M broadcasts with at most `--window`
//!    not yet delivered everywhere and at most 8 publish requests in
//!    flight (node 1 answers slowly while it delivers). Deliveries/s is
//!    every delivery / the time from the first publish to the last
//!    receipt; the CPU time of all nodes over that span / deliveries is the
//!    server CPU per delivery; Redis's CPU over it is reported as is;
//! 7. **close**: every worker closes its connections in waves, 4,000 a
//!    second over all workers (all at once, the nodes' unregistrations
//!    queue up in Redis past their command timeout); Redis's CPU until 3 s
//!    after the last close / connections is its cost per disconnect.
//!
//! Every broadcast is checked per subscriber: each connected subscriber
//! must get each one exactly once (a miss, a duplicate, a frame of no
//! armed broadcast, or a connection that ended is a problem in the report,
//! and the bench exits with failure). The figures and a projection to
//! 1,000,000 connections are printed by `scale_report.rs`. Everything runs
//! on this machine's cores, load generators included.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::redis_probe::{Probe, Snapshot, Usage, Value};
use super::scale::{Build, Nodes};
use super::scale_worker::{self, BUCKETS, unix_ns};
use super::{Credentials, Options, pgdn_bin, procs, settled_rss};

/// Broadcasts of the one-at-a-time phase.
const ONE_AT_A_TIME: u64 = 5;
/// Broadcasts to nobody that measure Redis's cost of one.
const REDIS_COST_BROADCASTS: u64 = 200;
/// Publish requests in flight at once in the throughput phase.
const PUBLISHERS: usize = 8;
/// Connections closed per second at the end, over all workers.
const CLOSE_RATE: u64 = 4_000;
/// Phase numbers carried in the payloads.
const PHASE_ONE_AT_A_TIME: u64 = 1;
const PHASE_THROUGHPUT: u64 = 2;
const PHASE_REDIS_COST: u64 = 9;

/// What a stretch of time cost the processes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Window {
    /// Its length.
    pub(crate) secs: f64,
    /// Redis's own counters (`INFO`), the probe's requests left out.
    pub(crate) redis: Usage,
    /// redis-server's CPU from `/proc`, in clock ticks.
    pub(crate) redis_ticks: Option<u64>,
    /// Each node's CPU, in clock ticks.
    pub(crate) node_ticks: Vec<u64>,
    /// Every worker's CPU together, in clock ticks.
    pub(crate) worker_ticks: u64,
}

impl Window {
    /// Every node's CPU together, in clock ticks.
    pub(crate) fn nodes(&self) -> u64 {
        self.node_ticks.iter().sum()
    }
}

/// What one broadcast phase measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Broadcasts {
    /// Broadcasts published.
    pub(crate) m: u64,
    /// Deliveries expected: m x connected subscribers.
    pub(crate) expected: u64,
    /// First receipts counted by the workers.
    pub(crate) deliveries: u64,
    /// From the first publish to the last receipt, seconds.
    pub(crate) secs: f64,
    /// The processes' cost over the phase (until every broadcast was
    /// complete).
    pub(crate) window: Window,
    /// Per broadcast, from its publish to its last receipt, ms.
    pub(crate) reach_ms: Vec<f64>,
    /// Per broadcast, from its publish to its first receipt, ms.
    pub(crate) first_ms: Vec<f64>,
    /// How long each publish request took, ms.
    pub(crate) request_ms: Vec<f64>,
    /// Publish-to-receive latency of every delivery, by
    /// `scale_worker::bucket`.
    pub(crate) hist: Vec<u64>,
    /// A subscriber's second receipt of a broadcast.
    pub(crate) duplicates: u64,
    /// Bench frames of no armed broadcast.
    pub(crate) strays: u64,
    /// Broadcasts connected subscribers never got, summed.
    pub(crate) missing: u64,
    /// Subscribers that missed at least one.
    pub(crate) short: u64,
}

impl Broadcasts {
    /// Deliveries per second.
    pub(crate) fn per_sec(&self) -> f64 {
        self.deliveries as f64 / self.secs.max(1e-9)
    }

    /// The `q` quantile of the publish-to-receive latency, ms.
    pub(crate) fn latency_ms(&self, q: f64) -> f64 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in self.hist.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return scale_worker::bucket_us(i) / 1000.0;
            }
        }
        0.0
    }

    /// Whether every connected subscriber got every broadcast once.
    pub(crate) fn exact(&self) -> bool {
        self.deliveries == self.expected
            && self.duplicates == 0
            && self.strays == 0
            && self.missing == 0
    }
}

/// Everything `--scale` measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// Nodes.
    pub(crate) nodes: usize,
    /// Connections asked of each node.
    pub(crate) per_node: usize,
    /// Handshakes in flight per worker.
    pub(crate) handshakes: usize,
    /// Seconds of each idle window.
    pub(crate) idle_secs: u64,
    /// Connections made, per node.
    pub(crate) connected: Vec<u64>,
    /// Connections that failed after every retry.
    pub(crate) connect_failed: u64,
    /// From the order to connect to the last worker's answer.
    pub(crate) connect_secs: f64,
    /// Connections made by then, about every 5 s while connecting:
    /// (seconds since the order, connections).
    pub(crate) connect_timeline: Vec<(f64, u64)>,
    /// Each worker's own time to connect its share.
    pub(crate) worker_connect_secs: Vec<f64>,
    /// Each node's RSS before any connection, KiB.
    pub(crate) rss_base_kib: Vec<u64>,
    /// Each node's RSS with everyone connected, settled, KiB.
    pub(crate) rss_conn_kib: Vec<u64>,
    /// Each node's RSS after the broadcasts, settled, KiB.
    pub(crate) rss_traffic_kib: Vec<u64>,
    /// Each worker's RSS with everyone connected, KiB.
    pub(crate) worker_rss_kib: Vec<u64>,
    /// Redis `used_memory` before and with everyone connected, bytes.
    pub(crate) redis_used: (u64, u64),
    /// redis-server's RSS before and with everyone connected, KiB.
    pub(crate) redis_rss_kib: (u64, u64),
    /// The kernel's TCP buffer memory (`/proc/net/sockstat` `mem`),
    /// pages, before and with everyone connected.
    pub(crate) tcp_mem_pages: (Option<u64>, Option<u64>),
    /// The kernel's slab memory (`/proc/meminfo` `Slab`, the whole
    /// machine), KiB, before and with everyone connected.
    pub(crate) slab_kib: (Option<u64>, Option<u64>),
    /// Redis's cost of broadcasts to nobody (before any connection), less
    /// the idle rate, and how many there were.
    pub(crate) redis_per_broadcast: Option<(Usage, u64)>,
    /// The connect phase's cost.
    pub(crate) connect: Window,
    /// Idle with no connection.
    pub(crate) idle_empty: Window,
    /// Idle with everyone connected.
    pub(crate) idle_full: Window,
    /// One broadcast at a time.
    pub(crate) one_at_a_time: Option<Broadcasts>,
    /// The throughput phase.
    pub(crate) throughput: Option<Broadcasts>,
    /// Connections closed per second at the end, over all workers.
    pub(crate) close_rate: u64,
    /// From the order to close to the last worker's answer.
    pub(crate) close_secs: f64,
    /// The closing's cost, until 3 s after the last close.
    pub(crate) close: Option<Window>,
    /// The ephemeral port range and `somaxconn`, as read.
    pub(crate) kernel: String,
    /// What went wrong.
    pub(crate) errors: Vec<String>,
}

impl Report {
    /// Connections made, in all.
    pub(crate) fn total(&self) -> u64 {
        self.connected.iter().sum()
    }
}

/// A first line of a `/proc/sys` file, trimmed.
fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `mem` of the `TCP:` line of `/proc/net/sockstat`, in pages.
fn tcp_mem_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "mem")?;
    words.get(at + 1)?.parse().ok()
}

/// `Slab` of `/proc/meminfo`, KiB.
fn slab_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Slab:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Checks what the machine allows before anything starts.
fn preflight(opts: &Options) -> Result<String, String> {
    if pgdn_testkit::redis_server_path().is_none() {
        return Err(format!(
            "redis-server is not installed; install it with `{}`",
            pgdn_testkit::INSTALL_HINT
        ));
    }
    // The bench raised its soft limit to the hard one; the nodes and the
    // workers inherit it.
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map_err(|e| format!("RLIMIT_NOFILE: {e}"))?
        .0;
    let need = opts.scale_per_node as u64 + 256;
    if nofile < need {
        return Err(format!(
            "the open-file limit is {nofile}: a node or worker holding {} connections needs {need} \
             (lower --scale-per-node or raise the hard limit)",
            opts.scale_per_node
        ));
    }
    let range = sysctl("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ports: Vec<u64> = range
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let [low, high] = ports[..]
        && high.saturating_sub(low) < opts.scale_per_node as u64 + 500
    {
        return Err(format!(
            "the ephemeral port range {low}..{high} is too small for {} connections to one node",
            opts.scale_per_node
        ));
    }
    Ok(format!(
        "open files {nofile} per process, ephemeral ports {range}, somaxconn {}, tcp_max_syn_backlog {}",
        sysctl("/proc/sys/net/core/somaxconn").unwrap_or_else(|| "?".into()),
        sysctl("/proc/sys/net/ipv4/tcp_max_syn_backlog").unwrap_or_else(|| "?".into())
    ))
}

/// Runs the whole scale bench and stops everything it started.
pub(crate) fn run(
    opts: &Options,
    bin_dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Result<Report, String> {
    let kernel = preflight(opts)?;
    let bin = pgdn_bin(opts, bin_dir);
    if !bin.is_file() {
        return Err(format!("no pgdn-server at {}", bin.display()));
    }
    let mut report = Report {
        nodes: opts.scale_nodes,
        per_node: opts.scale_per_node,
        handshakes: (opts.scale_handshakes / opts.scale_nodes).max(8),
        idle_secs: opts.scale_idle,
        kernel,
        ..Report::default()
    };
    eprintln!(
        "\nxtask bench: --scale, {} nodes x {} connections on one redis-server ({})",
        report.nodes, report.per_node, report.kernel
    );
    let redis = pgdn_testkit::RedisServer::start();
    let redis_pid = procs::child_pid("redis-server");
    if redis_pid.is_none() {
        report
            .errors
            .push("could not find redis-server's pid: its /proc CPU is not read".into());
    }
    let creds = Credentials::new();
    let nodes = Nodes::start(
        &bin,
        Build::After,
        &creds,
        opts.scale_nodes,
        ("single", &redis.url()),
        opts.scale_per_node + 100,
        opts.padding,
    )?;
    let result = runtime.block_on(measure(
        &mut report,
        opts,
        bin_dir,
        &creds,
        &nodes,
        redis.port(),
        redis_pid,
    ));
    nodes.stop();
    drop(redis);
    result.map(|()| report)
}

/// The processes a [`Meter`] reads.
struct Meter {
    probe: Probe,
    redis_pid: Option<u32>,
    node_pids: Vec<u32>,
    worker_pids: Vec<u32>,
}

/// The clocks at the start of a [`Window`].
struct Mark {
    at: Instant,
    snapshot: Snapshot,
    redis_ticks: Option<u64>,
    nodes: Vec<u64>,
    workers: u64,
}

impl Meter {
    /// Every clock now.
    fn mark(&mut self) -> Result<Mark, String> {
        Ok(Mark {
            at: Instant::now(),
            snapshot: self.probe.snapshot()?,
            redis_ticks: self.redis_pid.and_then(|p| procs::cpu_ticks(p).ok()),
            nodes: self
                .node_pids
                .iter()
                .map(|&p| procs::cpu_ticks(p))
                .collect::<Result<_, _>>()?,
            workers: self
                .worker_pids
                .iter()
                .filter_map(|&p| procs::cpu_ticks(p).ok())
                .sum(),
        })
    }

    /// What the processes did since `mark`.
    fn since(&mut self, mark: Mark) -> Result<Window, String> {
        let secs = mark.at.elapsed().as_secs_f64();
        let redis = mark.snapshot.until(&self.probe.snapshot()?);
        let redis_ticks = match (self.redis_pid, mark.redis_ticks) {
            (Some(pid), Some(before)) => {
                procs::cpu_ticks(pid).ok().map(|t| t.saturating_sub(before))
            }
            _ => None,
        };
        let mut node_ticks = Vec::new();
        for (&pid, before) in self.node_pids.iter().zip(&mark.nodes) {
            node_ticks.push(procs::cpu_ticks(pid)?.saturating_sub(*before));
        }
        let workers: u64 = self
            .worker_pids
            .iter()
            .filter_map(|&p| procs::cpu_ticks(p).ok())
            .sum();
        Ok(Window {
            secs,
            redis,
            redis_ticks,
            node_ticks,
            worker_ticks: workers.saturating_sub(mark.workers),
        })
    }

    /// `used_memory` of Redis, bytes.
    fn redis_used_memory(&mut self) -> Result<u64, String> {
        let Value::Text(info) = self.probe.call(&["INFO", "memory"])? else {
            return Err("INFO memory: not a text".into());
        };
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix("used_memory:"))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| "INFO memory has no used_memory".into())
    }
}

/// One worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The workers, and what they said so far.
struct Fleet {
    workers: Vec<Worker>,
    /// Every worker's stdout lines, tagged with its index; `None` when its
    /// stdout ended.
    lines: mpsc::UnboundedReceiver<(usize, Option<String>)>,
    /// The phase whose `complete` lines count.
    phase: u64,
    /// Per worker, broadcasts of `phase` complete.
    complete: Vec<u64>,
    /// Per worker, connections made so far (`progress`).
    progress: Vec<u64>,
    /// When progress was last printed.
    printed: Instant,
    /// When the order to connect went out.
    connect_started: Instant,
    /// (seconds since `connect_started`, connections) at each print.
    timeline: Vec<(f64, u64)>,
}

impl Fleet {
    /// Starts one worker per node (`addrs`), node k's for users
    /// `k*per_node..(k+1)*per_node`, and waits until each is ready.
    async fn start(
        bin_dir: &Path,
        addrs: &[String],
        creds: &Credentials,
        per_node: usize,
        handshakes: usize,
        max_broadcasts: u64,
    ) -> Result<Fleet, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut workers = Vec::new();
        for (k, addr) in addrs.iter().enumerate() {
            let mut cmd = Command::new(bin_dir.join("xtask"));
            cmd.args(["bench", scale_worker::SUBCOMMAND])
                .args(["--url", &format!("ws://{addr}/ws")])
                .args(["--secret", &creds.secret])
                .args([
                    "--users",
                    &format!("{}..{}", k * per_node, (k + 1) * per_node),
                ])
                .args(["--handshakes", &handshakes.to_string()])
                .args(["--max-broadcasts", &max_broadcasts.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("could not start a worker ({cmd:?}): {e}"))?;
            let stdin = child.stdin.take().expect("stdin is piped");
            let stdout = child.stdout.take().expect("stdout is piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((k, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((k, None));
            });
            workers.push(Worker { child, stdin });
        }
        let n = workers.len();
        let mut fleet = Fleet {
            workers,
            lines: rx,
            phase: 0,
            complete: vec![0; n],
            progress: vec![0; n],
            printed: Instant::now(),
            connect_started: Instant::now(),
            timeline: Vec::new(),
        };
        fleet
            .gather(
                scale_worker::READY,
                Instant::now() + Duration::from_secs(120),
            )
            .await?;
        Ok(fleet)
    }

    /// Each worker's process id.
    fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    /// Sends `line` to every worker.
    fn send_all(&mut self, line: &str) -> Result<(), String> {
        for (k, w) in self.workers.iter_mut().enumerate() {
            writeln!(w.stdin, "{line}")
                .and_then(|()| w.stdin.flush())
                .map_err(|e| format!("worker {}: {e}", k + 1))?;
        }
        Ok(())
    }

    /// The next line of any worker: `None` for a `complete` or `progress`
    /// line, which only updates the fleet's state. Fails at `deadline` or
    /// when a worker's stdout ends.
    async fn next(&mut self, deadline: Instant) -> Result<Option<(usize, String)>, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let (k, line) = match tokio::time::timeout(left, self.lines.recv()).await {
            Ok(Some((k, Some(line)))) => (k, line),
            Ok(Some((k, None))) => return Err(format!("worker {} exited", k + 1)),
            Ok(None) => return Err("every worker exited".into()),
            Err(_) => return Err("timed out waiting for the workers".into()),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["complete", phase, n] => {
                if phase.parse() == Ok(self.phase) {
                    self.complete[k] = n.parse().unwrap_or(0);
                }
            }
            ["progress", n] => {
                self.progress[k] = n.parse().unwrap_or(0);
                if self.printed.elapsed() >= Duration::from_secs(5) {
                    self.printed = Instant::now();
                    let total = self.progress.iter().sum::<u64>();
                    let at = self.connect_started.elapsed().as_secs_f64();
                    self.timeline.push((at, total));
                    eprintln!(
                        "  ... {} connections after {at:.0} s",
                        super::thousands(total as f64)
                    );
                }
            }
            _ => return Ok(Some((k, line))),
        }
        Ok(None)
    }

    /// Waits for one line starting with `prefix` from every worker and
    /// returns them, worker 1 first.
    async fn gather(&mut self, prefix: &str, deadline: Instant) -> Result<Vec<String>, String> {
        let mut got: Vec<Option<String>> = vec![None; self.workers.len()];
        while got.iter().any(Option::is_none) {
            let next = self.next(deadline).await.map_err(|e| {
                let waiting = got.iter().filter(|g| g.is_none()).count();
                format!("{e} (waiting for `{prefix}` from {waiting} worker(s))")
            })?;
            let Some((k, line)) = next else { continue };
            if line.starts_with(prefix) {
                got[k] = Some(line);
            } else {
                eprintln!("  worker {}: unexpected `{line}`", k + 1);
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Waits until every worker has `k` broadcasts of the armed phase
    /// complete.
    async fn wait_complete(&mut self, k: u64, deadline: Instant) -> Result<(), String> {
        while self.complete.iter().any(|&c| c < k) {
            let next = self.next(deadline).await.map_err(|e| {
                format!(
                    "{e}: broadcasts complete per worker {:?}, waiting for {k}",
                    self.complete
                )
            })?;
            if let Some((w, line)) = next {
                eprintln!("  worker {}: unexpected `{line}`", w + 1);
            }
        }
        Ok(())
    }

    /// Tells every worker to quit and waits (at most 30 s) until they
    /// exited.
    fn stop(mut self) {
        let _ = self.send_all("quit");
        let deadline = Instant::now() + Duration::from_secs(30);
        for w in &mut self.workers {
            while matches!(w.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Drop kills any that did not.
    }
}

/// Publishes the bench's broadcasts to node 1.
struct Caster {
    http: reqwest::Client,
    url: String,
    authorization: String,
    padding: String,
}

impl Caster {
    /// Publishes broadcast `seq` of `phase`, stamped now (Unix ns);
    /// returns that stamp and how long the request took, ms.
    async fn publish(&self, phase: u64, seq: u64) -> Result<(u64, f64), String> {
        let sent = unix_ns();
        let body = format!(
            r#"{{"target":{{"broadcast":{{}}}},"type":"bench","payload":{{"p":{phase},"s":{seq},"t":{sent},"pad":"{}"}}}}"#,
            self.padding
        );
        let started = Instant::now();
        let resp = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("authorization", &self.authorization)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("publish: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("publish: {e}"))?;
        if !status.is_success() {
            return Err(format!("publish: {status}: {text}"));
        }
        Ok((sent, started.elapsed().as_secs_f64() * 1e3))
    }
}

/// `key=value` words of a worker's report line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// A number field of a report line.
fn field(map: &BTreeMap<&str, &str>, key: &str) -> Result<u64, String> {
    map.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("a worker's line has no number {key}"))
}

/// A comma-separated list field of a report line.
fn list(map: &BTreeMap<&str, &str>, key: &str) -> Vec<u64> {
    map.get(key)
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// The settled RSS of every node, KiB.
async fn nodes_rss(pids: &[u32]) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for &pid in pids {
        out.push(settled_rss(pid).await?);
    }
    Ok(out)
}

/// Runs every phase, filling `report`.
async fn measure(
    report: &mut Report,
    opts: &Options,
    bin_dir: &Path,
    creds: &Credentials,
    nodes: &Nodes,
    redis_port: u16,
    redis_pid: Option<u32>,
) -> Result<(), String> {
    nodes.wait_ready().await?;
    let node_pids = nodes.pids();
    let mut meter = Meter {
        probe: Probe::connect(redis_port)?,
        redis_pid,
        node_pids: node_pids.clone(),
        worker_pids: Vec::new(),
    };
    let max_broadcasts = opts.scale_broadcasts.max(ONE_AT_A_TIME);
    let mut fleet = Fleet::start(
        bin_dir,
        &nodes.addrs(),
        creds,
        opts.scale_per_node,
        report.handshakes,
        max_broadcasts,
    )
    .await?;
    meter.worker_pids = fleet.pids();
    let result = phases(report, opts, nodes, &creds.key, &mut meter, &mut fleet).await;
    fleet.stop();
    result
}

/// The phases, once the workers are ready.
async fn phases(
    report: &mut Report,
    opts: &Options,
    nodes: &Nodes,
    key: &str,
    meter: &mut Meter,
    fleet: &mut Fleet,
) -> Result<(), String> {
    let node_pids = meter.node_pids.clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.rss_base_kib = nodes_rss(&node_pids).await?;
    report.redis_used.0 = meter.redis_used_memory()?;
    report.redis_rss_kib.0 = meter
        .redis_pid
        .and_then(|p| procs::rss_kib(p).ok())
        .unwrap_or(0);
    report.tcp_mem_pages.0 = tcp_mem_pages();
    report.slab_kib.0 = slab_kib();

    eprintln!("  idle with no connection, {} s ...", report.idle_secs);
    let mark = meter.mark()?;
    tokio::time::sleep(Duration::from_secs(report.idle_secs)).await;
    report.idle_empty = meter.since(mark)?;

    let caster = Arc::new(Caster {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?,
        url: format!("http://{}/api/v1/publish", nodes.addrs()[0]),
        authorization: format!("Bearer {key}"),
        padding: "x".repeat(opts.padding),
    });
    // What a broadcast costs Redis, measured while nothing else happens
    // (with everyone connected the heartbeats would drown it): it does not
    // depend on the connections, only on the nodes.
    let mark = meter.mark()?;
    for i in 0..REDIS_COST_BROADCASTS {
        caster.publish(PHASE_REDIS_COST, i).await?;
    }
    let cost = meter.since(mark)?;
    report.redis_per_broadcast = Some((
        cost.redis.less(&report.idle_empty.redis.per_sec()),
        REDIS_COST_BROADCASTS,
    ));

    let want = (opts.scale_nodes * opts.scale_per_node) as f64;
    eprintln!(
        "  connecting {} subscribers, {} handshakes at a time per worker ...",
        super::thousands(want),
        report.handshakes
    );
    let mark = meter.mark()?;
    let started = Instant::now();
    (fleet.connect_started, fleet.printed) = (started, started);
    fleet.send_all("connect")?;
    let deadline =
        Instant::now() + Duration::from_secs(120) + Duration::from_millis(5 * want as u64);
    let lines = fleet.gather("connected", deadline).await?;
    report.connect_secs = started.elapsed().as_secs_f64();
    report.connect = meter.since(mark)?;
    report.connect_timeline = std::mem::take(&mut fleet.timeline);
    for line in &lines {
        let f = fields(line);
        report.connected.push(field(&f, "ok")?);
        report.connect_failed += field(&f, "failed")?;
        report.worker_connect_secs.push(
            f.get("secs")
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN),
        );
    }
    eprintln!(
        "  {} connected in {:.1} s ({:.0}/s), {} failed",
        super::thousands(report.total() as f64),
        report.connect_secs,
        report.total() as f64 / report.connect_secs.max(1e-9),
        report.connect_failed
    );
    if report.connect_failed > 0 {
        report.errors.push(format!(
            "{} connections failed after 5 tries",
            report.connect_failed
        ));
    }
    // Let the registrations finish, then read the memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.rss_conn_kib = nodes_rss(&node_pids).await?;
    report.redis_used.1 = meter.redis_used_memory()?;
    report.redis_rss_kib.1 = meter
        .redis_pid
        .and_then(|p| procs::rss_kib(p).ok())
        .unwrap_or(0);
    report.tcp_mem_pages.1 = tcp_mem_pages();
    report.slab_kib.1 = slab_kib();
    report.worker_rss_kib = meter
        .worker_pids
        .iter()
        .map(|&p| procs::rss_kib(p).unwrap_or(0))
        .collect();
    for (k, (a, b)) in report
        .rss_base_kib
        .iter()
        .zip(&report.rss_conn_kib)
        .enumerate()
    {
        eprintln!(
            "  node {}: RSS {a} -> {b} KiB, {:.1} KB per connection",
            k + 1,
            super::per_connection_kb(*a, *b, report.connected[k].max(1) as usize)
        );
    }

    eprintln!("  idle with everyone connected, {} s ...", report.idle_secs);
    let mark = meter.mark()?;
    tokio::time::sleep(Duration::from_secs(report.idle_secs)).await;
    report.idle_full = meter.since(mark)?;

    let total = report.total();
    eprintln!("  {ONE_AT_A_TIME} broadcasts one at a time ...");
    let one = broadcast_phase(
        fleet,
        meter,
        &caster,
        (PHASE_ONE_AT_A_TIME, ONE_AT_A_TIME, 1),
        total,
        &mut report.errors,
    )
    .await?;
    eprintln!(
        "  one at a time: reached everyone in {:?} ms",
        one.reach_ms.iter().map(|v| v.round()).collect::<Vec<_>>()
    );
    report.one_at_a_time = Some(one);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = opts.scale_broadcasts;
    eprintln!("  {m} broadcasts, at most {} in flight ...", opts.window);
    let through = broadcast_phase(
        fleet,
        meter,
        &caster,
        (PHASE_THROUGHPUT, m, opts.window as u64),
        total,
        &mut report.errors,
    )
    .await?;
    let ticks = procs::clock_ticks_per_sec() as f64;
    eprintln!(
        "  throughput: {} deliveries in {:.2} s = {:.0}/s; pgdn CPU {:.2} µs/delivery; latency p50 {:.0} ms, p99 {:.0} ms",
        through.deliveries,
        through.secs,
        through.per_sec(),
        through.window.nodes() as f64 * 1e6 / ticks / through.deliveries.max(1) as f64,
        through.latency_ms(0.5),
        through.latency_ms(0.99)
    );
    report.throughput = Some(through);
    report.rss_traffic_kib = nodes_rss(&node_pids).await?;

    // Close everyone in waves: each close makes its node unregister the
    // session in Redis.
    report.close_rate = CLOSE_RATE;
    let per_worker = CLOSE_RATE.div_ceil(fleet.workers.len() as u64);
    eprintln!("  closing every connection, {CLOSE_RATE}/s ...");
    let mark = meter.mark()?;
    let started = Instant::now();
    fleet.send_all(&format!("close {per_worker}"))?;
    let deadline =
        Instant::now() + Duration::from_secs(60) + Duration::from_secs(total / per_worker.max(1));
    fleet.gather("closed", deadline).await?;
    report.close_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    report.close = Some(meter.since(mark)?);
    Ok(())
}

/// Arms the workers for `phase`, publishes its `m` broadcasts to node 1
/// with at most `window` not yet complete everywhere, waits until all are
/// complete (or the deadline: then the reports say what is missing) and
/// collects the workers' reports.
async fn broadcast_phase(
    fleet: &mut Fleet,
    meter: &mut Meter,
    caster: &Arc<Caster>,
    (phase, m, window): (u64, u64, u64),
    connected: u64,
    errors: &mut Vec<String>,
) -> Result<Broadcasts, String> {
    fleet.send_all(&format!("arm {phase} {m}"))?;
    fleet
        .gather("armed", Instant::now() + Duration::from_secs(30))
        .await?;
    fleet.phase = phase;
    fleet.complete.fill(0);
    let deadline =
        Instant::now() + Duration::from_secs(60) + Duration::from_micros(m * connected * 20);
    let mark = meter.mark()?;
    let mut sent = vec![0u64; m as usize];
    let mut request_ms = Vec::with_capacity(m as usize);
    let mut timed_out = None;
    type Task = tokio::task::JoinHandle<Result<(u64, f64), String>>;
    let mut in_flight: VecDeque<(u64, Task)> = VecDeque::new();
    let mut join = async |(i, task): (u64, Task)| -> Result<(), String> {
        let (at, ms) = task.await.map_err(|e| format!("publish task: {e}"))??;
        sent[i as usize] = at;
        request_ms.push(ms);
        Ok(())
    };
    for i in 0..m {
        if i >= window
            && let Err(e) = fleet.wait_complete(i + 1 - window, deadline).await
        {
            timed_out = Some(e);
            break;
        }
        if in_flight.len() >= PUBLISHERS
            && let Some(task) = in_flight.pop_front()
        {
            join(task).await?;
        }
        let caster = caster.clone();
        in_flight.push_back((
            i,
            tokio::spawn(async move { caster.publish(phase, i).await }),
        ));
    }
    while let Some(task) = in_flight.pop_front() {
        join(task).await?;
    }
    if timed_out.is_none()
        && let Err(e) = fleet.wait_complete(m, deadline).await
    {
        timed_out = Some(e);
    }
    let window_cost = meter.since(mark)?;
    if let Some(e) = timed_out {
        errors.push(format!("phase {phase}: {e}"));
    }
    // Anything late (a duplicate) arrives before the reports.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.send_all("report")?;
    let lines = fleet
        .gather("report", Instant::now() + Duration::from_secs(60))
        .await?;
    let mut b = Broadcasts {
        m,
        expected: m * connected,
        window: window_cost,
        request_ms,
        hist: vec![0; BUCKETS],
        ..Broadcasts::default()
    };
    let mut first = vec![u64::MAX; m as usize];
    let mut last = vec![0u64; m as usize];
    let (mut closed, mut failed) = (0, 0);
    for line in &lines {
        let f = fields(line);
        b.deliveries += field(&f, "received")?;
        b.duplicates += field(&f, "duplicates")?;
        b.strays += field(&f, "strays")?;
        b.missing += field(&f, "missing")?;
        b.short += field(&f, "short")?;
        closed += field(&f, "closed")?;
        failed += field(&f, "failed")?;
        for (s, v) in list(&f, "first").into_iter().enumerate() {
            if v > 0 && s < first.len() {
                first[s] = first[s].min(v);
            }
        }
        for (s, v) in list(&f, "last").into_iter().enumerate() {
            if s < last.len() {
                last[s] = last[s].max(v);
            }
        }
        for pair in f.get("hist").copied().unwrap_or("").split(',') {
            if let Some((i, c)) = pair.split_once(':')
                && let (Ok(i), Ok(c)) = (i.parse::<usize>(), c.parse::<u64>())
                && i < BUCKETS
            {
                b.hist[i] += c;
            }
        }
    }
    let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
    b.reach_ms = last
        .iter()
        .zip(&sent)
        .filter(|(_, s)| **s > 0)
        .map(|(&l, &s)| ms(l, s))
        .collect();
    b.first_ms = first
        .iter()
        .zip(&sent)
        .filter(|(f, s)| **f != u64::MAX && **s > 0)
        .map(|(&f, &s)| ms(f, s))
        .collect();
    let end = last.iter().copied().max().unwrap_or(0);
    let start = sent.iter().copied().filter(|&s| s > 0).min();
    b.secs = start.map_or(0.0, |s| ms(end, s) / 1e3);
    if !b.exact() {
        errors.push(format!(
            "phase {phase}: {} deliveries of {} expected; {} duplicates, {} frames of no armed \
             broadcast, {} broadcasts missed by {} subscribers",
            b.deliveries, b.expected, b.duplicates, b.strays, b.missing, b.short
        ));
    }
    if closed + failed > 0 {
        errors.push(format!(
            "by the end of phase {phase}: {closed} connections closed by the server, {failed} failed"
        ));
    }
    Ok(b)
}
