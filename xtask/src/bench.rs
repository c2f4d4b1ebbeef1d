//! `cargo xtask bench`: pgdn's throughput, latency and memory, read as
//! ratios to a bare tokio-tungstenite server measured in the same run.
//!
//! ```text
//! cargo xtask bench [--n 1000,10000] [--transport ws|sse|both] [--messages M] [--quick] [...]
//! ```
//!
//! It builds the release `pgdn-server` and this tool in release (then
//! re-runs itself from there, so that the clients are optimized too). For
//! each N it measures `--rounds` runs of each server, alternating the order
//! (pgdn, pgdn-sse, baseline, then baseline, pgdn-sse, pgdn, ...) so that a
//! slow spell of this shared machine hits all alike. "pgdn" is pgdn-server
//! with WebSocket subscribers (`/ws`), "pgdn-sse" the same server with
//! Server-Sent Events subscribers (`/sse`, docs/protocol.md section 7; the
//! client is in `bench/sse.rs`); `--transport ws` or `sse` measures only
//! one of them (default: both). One run:
//!
//! 1. starts the server as its own process on 127.0.0.1 and reads its
//!    resident memory (`VmRSS`) after one warm-up publish to nobody;
//! 2. connects N subscribers (pgdn: each with its own HS256 JWT, counted
//!    once its `connection` frame, or event, arrived), waits for the
//!    server's memory to settle and reads it again: (after - before) / N is
//!    the memory of an idle connection;
//! 3. **fan-out latency**: broadcasts one at a time, each once the previous
//!    one reached every subscriber;
//! 4. **broadcast throughput**, `--repeat` times: M broadcasts with at most
//!    `--window` of them not yet fully delivered (a per-connection queue
//!    then holds at most about that many frames, far below pgdn's 1024);
//!    deliveries/s is every frame received / the time from the first
//!    publish to the last receipt, and the server's CPU time (utime +
//!    stime from `/proc/<pid>/stat`) over the same span / deliveries is
//!    its CPU per delivery;
//! 5. **user-targeted**: messages to one user each, from 16 concurrent
//!    publishers;
//! 6. reads the server's memory once more, after all that traffic;
//!
//! and stops the server (pgdn: SIGTERM; the baseline: its stdin closes).
//!
//! then prints a Markdown table of the medians over every run, the ratios
//! (pgdn over WebSocket / baseline, pgdn over SSE / baseline and SSE / WS)
//! and whether pgdn meets its targets (broadcast deliveries/s at least 0.8x
//! the baseline's, CPU per delivery at most 1/0.8 = 1.25x, memory per idle
//! connection at most 1.5x; judged on the WebSocket ratios, or on the SSE
//! ones when only SSE is measured), and every sample under it. Every run
//! also checks that each subscriber got each broadcast exactly once (the
//! count of every broadcast phase is exact).
//!
//! Publish-to-receive latency is the receipt time minus the send time that
//! the publisher wrote into the payload, on one clock since publisher and
//! subscribers share this process. The baseline is described in
//! `bench/baseline.rs`. The bench's clients run on the same cores as the
//! server, the same for both servers. All traffic is on 127.0.0.1.
//!
//! Three other runs measure other things, with the same client code:
//!
//! - `cargo xtask bench --publisher`: publishes/s and call latency of
//!   `pgdn_client::blocking::Publisher` from plain threads (`bench/publishers.rs`);
//! - `cargo xtask bench --cluster`: several nodes on Redis, in four parts
//!   (`--cluster-parts`, all by default): broadcast fan-out over three
//!   nodes on one private redis-server against one node, in the same run
//!   (`bench/cluster.rs`); what a publish costs Redis, before and after
//!   the partitioned data model (`bench/redis_cost.rs`, with
//!   `--before-bin`); user-targeted deliveries/s on 1, 2 and 3 Redis shards
//!   (`bench/shards.rs`); and which nodes Redis brings each message to
//!   (`bench/routing.rs`). `bench/scale.rs` starts their nodes,
//!   `bench/redis_probe.rs` reads Redis's own counters;
//! - `cargo xtask bench --load`: one node under load, in the six parts of
//!   issue 11 (`--load-parts`, all by default): concurrent broadcast
//!   publishers, user-targeted latency and new-connection latency during
//!   broadcasts, single and batch publishes/s, new connections/s, each
//!   against its target (`bench/load.rs` and `bench/load/`).
//! - `cargo xtask bench --scale`: many connections on one box, K nodes on
//!   one Redis (default 5 x 19,000 = 95,000 WebSocket connections, each
//!   side of them in processes of at most one node's share): RSS per
//!   connection, time to connect everyone, broadcast deliveries/s and CPU
//!   per delivery, Redis's CPU idle and during broadcasts, and a
//!   projection to 1,000,000 connections (`bench/scale_run.rs`, the load
//!   generators in `bench/scale_worker.rs`, the report in
//!   `bench/scale_report.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;

mod baseline;
mod client;
mod cluster;
mod load;
mod procs;
mod publishers;
mod redis_cost;
mod redis_probe;
mod routing;
mod scale;
mod scale_report;
mod scale_run;
mod scale_worker;
mod shards;
mod sse;

use client::{Publisher, Recorder};
use procs::ServerProcess;

const USAGE: &str = "\
usage: cargo xtask bench [options]
       cargo xtask bench --publisher [options]
       cargo xtask bench --cluster [options]
       cargo xtask bench --load [options]
       cargo xtask bench --scale [options]

By default: pgdn against a bare tokio-tungstenite baseline, at each N, with
WebSocket subscribers (pgdn) and with Server-Sent Events subscribers
(pgdn-sse).

  --n LIST            subscriber counts, comma-separated (default 1000,10000;
                      --cluster: 3000,9000)
  --messages M        broadcasts per throughput repetition
                      (default: about --deliveries / N)
  --deliveries D      deliveries per throughput repetition when --messages
                      is not given (default 1000000; --cluster 600000;
                      --quick 300000)
  --rounds R          runs of each server (or set-up) per N, alternating
                      which goes first; medians are reported (default 3;
                      --quick 1)
  --repeat R          throughput repetitions within a run (default 1)
  --window W          broadcasts in flight at most (default 32)
  --user-messages U   user-targeted messages (default 20000; --quick 4000)
  --padding B         filler bytes in each payload (default 100)
  --transport ws|sse|both  pgdn's subscribers: WebSocket (/ws), Server-Sent
                      Events (/sse) or both, each its own run (default both)
  --only pgdn|baseline  measure pgdn only (over --transport) or the
                      baseline only (no ratios to the baseline)
  --baseline-coalesce K  let the baseline write up to K pending publishes
                      with one write per socket (default 1: one write per
                      socket per message, as the issue specifies)
  --baseline-read-buffer B  the baseline's tungstenite read buffer
                      (default 4096)
  --baseline-nodelay  set TCP_NODELAY on the baseline's sockets, as pgdn
                      does on every connection (default off: Nagle's
                      algorithm then merges a socket's writes while an
                      ACK is outstanding)
  --quick             a short run: fewer messages and repetitions
  --check             exit with failure when pgdn misses a target
  --no-build          do not run cargo build first
  --no-pin            let the servers and the bench share every CPU. By
                      default (with 2 CPUs or more, on Linux) each server
                      under test, pgdn or the baseline, runs on the first
                      CPU the bench may use and the bench on the others, as
                      issue 11 measured: the load generator then does not
                      compete with the server for its core. Also applies
                      to --load; not to --publisher, --cluster, --scale
  --pgdn-bin PATH     the pgdn-server binary to measure (default: the
                      release build of this workspace, built first)

--publisher: publishes/s and publish call latency of
pgdn_client::blocking::Publisher, user-targeted to one user with one
connected subscriber (every delivery checked), against one release
pgdn-server: from one std::thread, from T threads sharing one Publisher and
from T threads with a Publisher each; the async pgdn_client::Publisher from
1 and from the largest T tasks as a reference. Uses --rounds (default 3;
--quick 1), --padding and:
  --publishes P       publishes per configuration (default 20000; --quick
                      4000)
  --threads LIST      thread counts, comma-separated (default 1,4,16)

--cluster: several release pgdn-servers on private Redis servers
(pgdn-testkit), in the parts --cluster-parts names. Part broadcast: a
redis-server and --nodes pgdn-server processes on it (--redis-url,
--node-id n1..), N subscribers spread evenly over the nodes, broadcasts
published over HTTP to node 1 only; against one pgdn-server without Redis
with the same N, in the same run. Broadcast deliveries/s and
publish-to-receive p50/p99 (also apart for the subscribers of node 1 and
of the other nodes), publish request time, CPU of the pgdn processes and
of redis-server. Uses --n, --rounds (also for redis-cost and shards),
--deliveries, --messages, --window, --padding and:
  --nodes K           nodes in the cluster (default 3; 1 = one node on
                      Redis against one without)
  --publishers LIST   publish requests outstanding at once; one throughput
                      phase per value, within the window (default 1,8; 1 is
                      what the default comparison does)
  --cluster-parts LIST  what --cluster measures, comma-separated (default
                      all four):
                      broadcast   the comparison above;
                      redis-cost  Redis CPU, commands and network bytes per
                                  1,000 user, group and broadcast publishes,
                                  3 nodes on one Redis, before and after;
                      shards      user-targeted deliveries/s, 3 nodes on 1,
                                  2 and 3 Redis shards (--redis-mode shards);
                      routing     messages Redis brings to each node against
                                  the nodes that need them
  --before-bin PATH   a pgdn-server built from the commit before the
                      partitioned data model (b8b4e73), measured as before
                      by redis-cost and routing (only --redis-url and
                      --node-id are passed to it); without it only the
                      current build is measured
  --cost-publishes P  redis-cost: publishes of each kind per run, offered
                      at 1,500/s (default 3000; --quick 1500)
  --shards LIST       shards: the shard counts (default 1,2,3)
  --shard-publishes P shards: publishes per run (default 30000; --quick
                      10000)
  --routing-publishes M  routing: publishes of each kind (default 200)
  --routing-redis LIST   routing: the current build's Redis layouts,
                      single and/or cluster (default single,cluster)

--load: one release pgdn-server (or --pgdn-bin) under load, in the parts
--load-parts names, each against its target (bench/load.rs). Uses --n
(default 10000), --publishers (default 1,8), --window, --deliveries,
--messages, --rounds, --padding, --check and:
  --load-parts LIST   comma-separated (default all six):
                      publishers       broadcast deliveries/s at N idle
                                       subscribers, last --publishers value
                                       over the first (>= 1.5x);
                      user-latency     user-targeted publish-to-receive p99
                                       during back-to-back broadcasts to N
                                       (<= 5 ms), and without them;
                      connect-latency  new-connection p99 during broadcasts
                                       over idle, at N (<= 2x);
                      single           user-targeted single publishes/s
                                       (>= 30,000) and request p99 (<= 20 ms);
                      batch            user-targeted messages/s in batches
                                       of 100 (>= 300,000);
                      connections      new authenticated connections/s
                                       (>= 10,000)
  --load-secs S       seconds of each timed phase of user-latency, single
                      and batch (default 10; --quick 3)
  --load-rate R       user-latency: user-targeted publishes/s (default 1000)
  --load-connects C   connect-latency: connections per phase, 100/s
                      (default 1000; --quick 100)
  --load-conns K      single: keep-alive HTTP connections; connections:
                      connecting tasks (default 64)
  --load-targets T    single, batch: connected subscribers targeted
                      (default 2000)
  --load-batch-users U  batch: the users a batch's 100 messages go to,
                      in turn (default 100: every message to another)
  --load-connections C  connections: connections in all, in sets of at
                      most 3,000 (default 15000; --quick 5000)

--scale: many connections on one box: --scale-nodes release pgdn-servers
on one private redis-server, each holding --scale-per-node WebSocket
connections (users with their own JWTs, held by one load-generating
process per node: `xtask bench __scale-worker`), every broadcast published
to node 1 and checked to reach every connection exactly once. Reports RSS
per connection (per node and in all), the time to connect everyone,
broadcast deliveries/s, pgdn CPU per delivery, Redis CPU idle and during
the broadcasts, and a projection to 1,000,000 connections. Uses
--pgdn-bin, --window, --padding and:
  --scale-nodes K      nodes, each its own process (default 5)
  --scale-per-node C   connections per node (default 19000; --quick 2000);
                       a node or worker needs C + 256 open files
  --broadcasts M       broadcasts of the throughput phase (default 20)
  --scale-handshakes H WebSocket handshakes in flight, over all workers
                       (default 256)
  --scale-idle S       seconds of each idle window, with no connection and
                       with everyone connected (default 30; --quick 10)";

/// Target: pgdn's broadcast deliveries/s over the baseline's, at least.
const TARGET_THROUGHPUT: f64 = 0.8;
/// Target: pgdn's CPU per delivery over the baseline's, at most.
const TARGET_CPU: f64 = 1.0 / 0.8;
/// Target: pgdn's memory per idle connection over the baseline's, at most.
const TARGET_RSS: f64 = 1.5;

/// Phase numbers, carried in every payload as `"p"`.
const PHASE_WARMUP: usize = 0;
const PHASE_FANOUT: usize = 1;
const PHASE_FIRST_REPETITION: usize = 2;

/// Concurrent publishers in the user-targeted phase.
const USER_PUBLISHERS: usize = 16;

/// The publish target of a broadcast.
const BROADCAST: &str = r#"{"broadcast":{}}"#;

/// The server under test, with the subscribers' transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// pgdn-server, WebSocket subscribers.
    Pgdn,
    /// pgdn-server, Server-Sent Events subscribers.
    Sse,
    Baseline,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Pgdn => "pgdn",
            Server::Sse => "pgdn-sse",
            Server::Baseline => "baseline",
        }
    }

    /// The column heading of its figures.
    fn heading(self) -> &'static str {
        match self {
            Server::Pgdn => "pgdn WS",
            Server::Sse => "pgdn SSE",
            Server::Baseline => "baseline",
        }
    }
}

/// pgdn's subscribers in the default comparison (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Ws,
    Sse,
    Both,
}

/// Command-line options.
#[derive(Debug, Clone)]
struct Options {
    ns: Vec<usize>,
    messages: Option<usize>,
    deliveries: usize,
    rounds: usize,
    repeat: usize,
    window: usize,
    user_messages: usize,
    padding: usize,
    only: Option<Server>,
    transport: Transport,
    check: bool,
    no_build: bool,
    /// Whether `--no-pin` was given (see [`procs::Pinning`]).
    no_pin: bool,
    pgdn_bin: Option<PathBuf>,
    baseline_coalesce: usize,
    baseline_read_buffer: usize,
    baseline_nodelay: bool,
    /// What to measure: the comparison with the baseline (default), the
    /// blocking publisher, or the cluster.
    mode: Mode,
    /// Publishes per publisher configuration (`--publisher`).
    publishes: usize,
    /// Thread counts of the publisher configurations (`--publisher`).
    threads: Vec<usize>,
    /// Nodes of the cluster (`--cluster`).
    nodes: usize,
    /// Publish requests outstanding at once, one throughput phase per
    /// value (`--cluster`).
    publishers: Vec<usize>,
    /// What `--cluster` measures (`--cluster-parts`).
    parts: Vec<ClusterPart>,
    /// The pgdn-server before the partitioned data model
    /// (`--before-bin`).
    before_bin: Option<PathBuf>,
    /// redis-cost: publishes of each kind per run.
    cost_publishes: usize,
    /// shards: the shard counts.
    shards: Vec<usize>,
    /// shards: publishes per run.
    shard_publishes: usize,
    /// routing: publishes of each kind.
    routing_publishes: usize,
    /// routing: the Redis layouts of the current build.
    routing_redis: Vec<String>,
    /// What `--load` measures, and its own options.
    load: load::LoadOptions,
    /// `--scale`: nodes.
    scale_nodes: usize,
    /// `--scale`: connections per node.
    scale_per_node: usize,
    /// `--scale`: broadcasts of the throughput phase.
    scale_broadcasts: u64,
    /// `--scale`: handshakes in flight over all workers.
    scale_handshakes: usize,
    /// `--scale`: seconds of each idle window.
    scale_idle: u64,
}

/// A part of `--cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterPart {
    /// Broadcast fan-out: K nodes on one Redis against one node.
    Broadcast,
    /// Redis's cost per publish, before and after.
    RedisCost,
    /// Deliveries/s on 1, 2 and 3 shards.
    Shards,
    /// Messages per node against the nodes that need them.
    Routing,
}

impl ClusterPart {
    const ALL: [ClusterPart; 4] = [
        ClusterPart::Broadcast,
        ClusterPart::RedisCost,
        ClusterPart::Shards,
        ClusterPart::Routing,
    ];

    fn name(self) -> &'static str {
        match self {
            ClusterPart::Broadcast => "broadcast",
            ClusterPart::RedisCost => "redis-cost",
            ClusterPart::Shards => "shards",
            ClusterPart::Routing => "routing",
        }
    }
}

/// What `cargo xtask bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// pgdn against the baseline.
    Compare,
    /// `pgdn_client::blocking::Publisher` against one node (`--publisher`).
    Publisher,
    /// Several nodes on one Redis against one node (`--cluster`).
    Cluster,
    /// One node under load, against the targets of issue 11 (`--load`).
    Load,
    /// Many connections over several nodes on one box (`--scale`).
    Scale,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let quick = args.iter().any(|a| a == "--quick");
        let cluster = args.iter().any(|a| a == "--cluster");
        let load = args.iter().any(|a| a == "--load");
        let mode = match (cluster, args.iter().any(|a| a == "--publisher"), load) {
            (false, false, false) => Mode::Compare,
            (false, true, false) => Mode::Publisher,
            (true, false, false) => Mode::Cluster,
            (false, false, true) => Mode::Load,
            _ => return Err("--cluster, --publisher and --load are separate runs".into()),
        };
        let mode = match (mode, args.iter().any(|a| a == "--scale")) {
            (mode, false) => mode,
            (Mode::Compare, true) => Mode::Scale,
            (_, true) => return Err("--scale is a run of its own".into()),
        };
        let mut o = Options {
            ns: if cluster {
                vec![3000, 9000]
            } else if load {
                vec![10_000]
            } else {
                vec![1000, 10_000]
            },
            messages: None,
            deliveries: match (quick, cluster) {
                (true, _) => 300_000,
                (false, true) => 600_000,
                (false, false) => 1_000_000,
            },
            rounds: if quick { 1 } else { 3 },
            repeat: 1,
            window: 32,
            user_messages: if quick { 4_000 } else { 20_000 },
            padding: 100,
            only: None,
            transport: Transport::Both,
            check: false,
            no_build: false,
            no_pin: false,
            pgdn_bin: None,
            baseline_coalesce: 1,
            baseline_read_buffer: 4096,
            baseline_nodelay: false,
            mode,
            publishes: if quick { 4_000 } else { 20_000 },
            threads: vec![1, 4, 16],
            nodes: 3,
            publishers: vec![1, 8],
            parts: ClusterPart::ALL.to_vec(),
            before_bin: None,
            cost_publishes: if quick { 1_500 } else { 3_000 },
            shards: vec![1, 2, 3],
            shard_publishes: if quick { 10_000 } else { 30_000 },
            routing_publishes: 200,
            routing_redis: vec!["single".into(), "cluster".into()],
            load: load::LoadOptions::new(quick),
            scale_nodes: 5,
            scale_per_node: if quick { 2_000 } else { 19_000 },
            scale_broadcasts: 20,
            scale_handshakes: 256,
            scale_idle: if quick { 10 } else { 30 },
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            let number = |s: String| -> Result<usize, String> {
                s.replace('_', "")
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("not a positive number: {s}"))
            };
            match arg.as_str() {
                "--quick" | "--publisher" | "--cluster" | "--load" | "--scale" => {}
                "--scale-nodes" => o.scale_nodes = number(value("--scale-nodes")?)?,
                "--scale-per-node" => o.scale_per_node = number(value("--scale-per-node")?)?,
                "--broadcasts" => o.scale_broadcasts = number(value("--broadcasts")?)? as u64,
                "--scale-handshakes" => {
                    o.scale_handshakes = number(value("--scale-handshakes")?)?;
                }
                "--scale-idle" => o.scale_idle = number(value("--scale-idle")?)? as u64,
                "--publishes" => o.publishes = number(value("--publishes")?)?,
                "--threads" => {
                    o.threads = value("--threads")?
                        .split(',')
                        .map(|s| number(s.trim().to_string()))
                        .collect::<Result<_, _>>()?;
                }
                "--nodes" => o.nodes = number(value("--nodes")?)?,
                "--publishers" => {
                    o.publishers = value("--publishers")?
                        .split(',')
                        .map(|s| number(s.trim().to_string()))
                        .collect::<Result<_, _>>()?;
                }
                "--cluster-parts" => {
                    o.parts = value("--cluster-parts")?
                        .split(',')
                        .map(|p| {
                            let p = p.trim();
                            ClusterPart::ALL
                                .into_iter()
                                .find(|c| c.name() == p)
                                .ok_or_else(|| {
                                    format!(
                                        "--cluster-parts: broadcast, redis-cost, shards or routing, not {p}"
                                    )
                                })
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--before-bin" => o.before_bin = Some(PathBuf::from(value("--before-bin")?)),
                "--cost-publishes" => o.cost_publishes = number(value("--cost-publishes")?)?,
                "--shards" => {
                    o.shards = value("--shards")?
                        .split(',')
                        .map(|s| number(s.trim().to_string()))
                        .collect::<Result<_, _>>()?;
                }
                "--shard-publishes" => o.shard_publishes = number(value("--shard-publishes")?)?,
                "--routing-publishes" => {
                    o.routing_publishes = number(value("--routing-publishes")?)?;
                }
                "--routing-redis" => {
                    o.routing_redis = value("--routing-redis")?
                        .split(',')
                        .map(|m| match m.trim() {
                            m @ ("single" | "cluster") => Ok(m.to_string()),
                            other => Err(format!("--routing-redis single|cluster, not {other}")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--check" => o.check = true,
                "--no-build" => o.no_build = true,
                "--no-pin" => o.no_pin = true,
                "--n" => {
                    o.ns = value("--n")?
                        .split(',')
                        .map(|s| number(s.trim().to_string()))
                        .collect::<Result<_, _>>()?;
                }
                "--pgdn-bin" => o.pgdn_bin = Some(PathBuf::from(value("--pgdn-bin")?)),
                "--messages" => o.messages = Some(number(value("--messages")?)?),
                "--deliveries" => o.deliveries = number(value("--deliveries")?)?,
                "--baseline-coalesce" => {
                    o.baseline_coalesce = number(value("--baseline-coalesce")?)?;
                }
                "--baseline-read-buffer" => {
                    o.baseline_read_buffer = number(value("--baseline-read-buffer")?)?;
                }
                "--baseline-nodelay" => o.baseline_nodelay = true,
                "--rounds" => o.rounds = number(value("--rounds")?)?,
                "--repeat" => o.repeat = number(value("--repeat")?)?,
                "--window" => o.window = number(value("--window")?)?,
                "--user-messages" => o.user_messages = number(value("--user-messages")?)?,
                "--padding" => {
                    o.padding = value("--padding")?.parse().map_err(|_| "bad --padding")?
                }
                "--only" => {
                    o.only = Some(match value("--only")?.as_str() {
                        "pgdn" => Server::Pgdn,
                        "baseline" => Server::Baseline,
                        other => return Err(format!("--only pgdn|baseline, not {other}")),
                    })
                }
                "--transport" => {
                    o.transport = match value("--transport")?.as_str() {
                        "ws" => Transport::Ws,
                        "sse" => Transport::Sse,
                        "both" => Transport::Both,
                        other => return Err(format!("--transport ws|sse|both, not {other}")),
                    }
                }
                "-h" | "--help" => return Err(String::new()),
                other => {
                    if !o.load.parse_arg(other, &mut value)? {
                        return Err(format!("unknown option {other}"));
                    }
                }
            }
        }
        if PHASE_FIRST_REPETITION + o.repeat.max(o.publishers.len()) >= client::PHASES {
            return Err(format!(
                "--repeat (or the --publishers list) is at most {}",
                client::PHASES - PHASE_FIRST_REPETITION - 1
            ));
        }
        Ok(o)
    }

    /// The servers of the default comparison, in the order of the first
    /// round.
    fn servers(&self) -> Vec<Server> {
        let pgdn = match self.transport {
            Transport::Ws => vec![Server::Pgdn],
            Transport::Sse => vec![Server::Sse],
            Transport::Both => vec![Server::Pgdn, Server::Sse],
        };
        match self.only {
            Some(Server::Baseline) => vec![Server::Baseline],
            Some(_) => pgdn,
            None => pgdn.into_iter().chain([Server::Baseline]).collect(),
        }
    }

    /// Broadcasts per throughput repetition for `n` subscribers.
    fn broadcasts(&self, n: usize) -> usize {
        self.messages.unwrap_or((self.deliveries / n).max(20))
    }
}

/// Entry point of `cargo xtask bench`.
pub fn main(args: &[String]) -> ExitCode {
    if args.first().map(String::as_str) == Some(baseline::SUBCOMMAND) {
        return baseline::main(&args[1..]);
    }
    if args.first().map(String::as_str) == Some(scale_worker::SUBCOMMAND) {
        return scale_worker::main(&args[1..]);
    }
    let opts = match Options::parse(args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("xtask bench: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let release = target_dir().join("release");
    if cfg!(debug_assertions) {
        // Build the server and this tool in release, then measure from the
        // optimized build: unoptimized clients would be the bottleneck.
        let packages: &[&str] = if opts.pgdn_bin.is_some() {
            &["-p", "xtask"]
        } else {
            &["-p", "pgdn-server", "-p", "xtask"]
        };
        if !opts.no_build && !build(packages) {
            return ExitCode::FAILURE;
        }
        let mut cmd = Command::new(release.join("xtask"));
        cmd.arg("bench").args(args);
        if !opts.no_build {
            cmd.arg("--no-build");
        }
        eprintln!("xtask bench: running the release build: {cmd:?}");
        return match cmd.status() {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("xtask bench: could not run {cmd:?}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !opts.no_build && opts.pgdn_bin.is_none() && !build(&["-p", "pgdn-server"]) {
        return ExitCode::FAILURE;
    }
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or(release);
    match run(&opts, &bin_dir) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("xtask bench: pgdn missed a target (--check)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("xtask bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .join("target")
}

/// `cargo build --release <packages>`; false when it fails.
fn build(packages: &[&str]) -> bool {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--release"]).args(packages);
    eprintln!("xtask bench: running {cmd:?}");
    matches!(cmd.status(), Ok(s) if s.success())
}

/// Figures of one phase.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    /// Frames received by the subscribers.
    deliveries: u64,
    /// From the first publish to the last receipt.
    secs: f64,
    /// The server's CPU time over that span, in clock ticks.
    server_ticks: u64,
    /// The bench's own CPU time over that span, in clock ticks.
    bench_ticks: u64,
    /// Publish-to-receive latency, nanoseconds.
    p50_ns: u64,
    /// Publish-to-receive latency, nanoseconds.
    p99_ns: u64,
}

impl Phase {
    fn per_sec(&self) -> f64 {
        self.deliveries as f64 / self.secs.max(1e-9)
    }

    fn cpu_us_per_delivery(&self, ticks_per_sec: u64) -> f64 {
        self.server_ticks as f64 * 1e6 / ticks_per_sec as f64 / self.deliveries.max(1) as f64
    }
}

/// Everything measured for one server at one N.
#[derive(Debug, Clone)]
struct Run {
    server: Server,
    /// Which round of `--rounds` (from 0).
    round: usize,
    n: usize,
    connect_secs: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// RSS once every phase is over and the server has settled.
    rss_traffic_kib: u64,
    fanout: Option<Phase>,
    broadcast: Vec<Phase>,
    user: Option<Phase>,
    /// What went wrong, if anything.
    errors: Vec<String>,
}

impl Run {
    /// Memory per idle connection, in KB.
    fn rss_per_connection(&self) -> f64 {
        per_connection_kb(self.rss_before_kib, self.rss_after_kib, self.n)
    }
}

/// The median of `values`; None when there are none.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Runs every N against every server; prints the details as it goes and
/// the table at the end. Ok(false) when `--check` and a target is missed.
fn run(opts: &Options, bin_dir: &Path) -> Result<bool, String> {
    let max_n = opts.ns.iter().copied().max().unwrap_or(0) as u64;
    let nofile =
        rlimit::increase_nofile_limit(u64::MAX).map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    if nofile < max_n + 512 {
        return Err(format!(
            "the open-file limit is {nofile}, too low for {max_n} subscribers (raise `ulimit -n`)"
        ));
    }
    let ticks_per_sec = procs::clock_ticks_per_sec();
    let mut machine = procs::machine_description();
    // Before the bench starts a thread of its own: they inherit it.
    if matches!(opts.mode, Mode::Compare | Mode::Load) {
        let pinned = if opts.no_pin {
            "not pinned (--no-pin)".into()
        } else {
            procs::Pinning::apply()
        };
        machine = format!("{machine}; {pinned}");
    }
    eprintln!("xtask bench: {machine}; {}", procs::rustc_version());
    let revision = procs::git_revision();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    match opts.mode {
        Mode::Compare => {}
        Mode::Load => {
            return load::run(opts, bin_dir, &runtime, ticks_per_sec, &machine, &revision);
        }
        Mode::Publisher => {
            let report = publishers::run(opts, bin_dir, &runtime, ticks_per_sec)?;
            print_header(&machine, &revision);
            publishers::print(&report, opts, ticks_per_sec);
            return Ok(true);
        }
        Mode::Cluster => {
            if let Some(bin) = &opts.before_bin
                && !bin.is_file()
            {
                return Err(format!("--before-bin {}: no such file", bin.display()));
            }
            if pgdn_testkit::redis_server_path().is_none() {
                return Err(format!(
                    "redis-server is not installed; install it with `{}`",
                    pgdn_testkit::INSTALL_HINT
                ));
            }
            let has = |p: ClusterPart| opts.parts.contains(&p);
            let started = Instant::now();
            let load_before = procs::load_average();
            let broadcast = has(ClusterPart::Broadcast)
                .then(|| cluster::run(opts, bin_dir, &runtime, ticks_per_sec))
                .transpose()?;
            let cost = has(ClusterPart::RedisCost)
                .then(|| redis_cost::run(opts, bin_dir, &runtime))
                .transpose()?;
            let shards = has(ClusterPart::Shards)
                .then(|| shards::run(opts, bin_dir, &runtime, ticks_per_sec))
                .transpose()?;
            let routing = has(ClusterPart::Routing)
                .then(|| routing::run(opts, bin_dir, &runtime))
                .transpose()?;
            print_header(&machine, &revision);
            println!(
                "The run took {:.0} s; load average (1, 5, 15 min) {load_before} when it started, \
                 {} when it ended. Parts: {}. Before: {}.\n",
                started.elapsed().as_secs_f64(),
                procs::load_average(),
                opts.parts
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                opts.before_bin
                    .as_ref()
                    .map_or("not measured (no --before-bin)".into(), |b| b
                        .display()
                        .to_string())
            );
            if let Some(report) = &broadcast {
                cluster::print(report, opts, ticks_per_sec);
            }
            if let Some(report) = &cost {
                redis_cost::print(report, opts);
            }
            if let Some(report) = &shards {
                shards::print(report, opts, ticks_per_sec);
            }
            if let Some(report) = &routing {
                routing::print(report, opts);
            }
            return Ok(true);
        }
        Mode::Scale => {
            let report = scale_run::run(opts, bin_dir, &runtime)?;
            print_header(&machine, &revision);
            scale_report::print(&report, opts, ticks_per_sec, &revision);
            if !report.errors.is_empty() {
                return Err(format!(
                    "--scale: {} problem(s), listed at the end of the report",
                    report.errors.len()
                ));
            }
            return Ok(true);
        }
    }
    let servers = opts.servers();
    let mut runs = Vec::new();
    for &n in &opts.ns {
        for round in 0..opts.rounds {
            let mut order = servers.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &server in &order {
                eprintln!(
                    "\nxtask bench: {} with N = {n}, round {} of {} ({} broadcasts x {} repetitions, {} user-targeted)",
                    server.name(),
                    round + 1,
                    opts.rounds,
                    opts.broadcasts(n),
                    opts.repeat,
                    opts.user_messages
                );
                let run = run_one(&runtime, server, round, n, opts, bin_dir, ticks_per_sec)?;
                for e in &run.errors {
                    eprintln!("  problem: {e}");
                }
                runs.push(run);
            }
        }
    }
    print_header(&machine, &revision);
    let mut all_met = true;
    for &n in &opts.ns {
        let columns: Vec<(Server, Vec<&Run>)> = [Server::Pgdn, Server::Sse, Server::Baseline]
            .into_iter()
            .filter(|s| servers.contains(s))
            .map(|s| {
                (
                    s,
                    runs.iter().filter(|r| r.n == n && r.server == s).collect(),
                )
            })
            .collect();
        all_met &= print_table(n, &columns, opts, ticks_per_sec);
    }
    Ok(all_met || !opts.check)
}

/// Prints the heading of the results: the command, the machine and the
/// revision measured (`revision`, taken when the run started; also the
/// current one if the checkout moved meanwhile).
fn print_header(machine: &str, revision: &str) {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--no-build")
        .collect();
    println!("\n## cargo xtask {}\n", args.join(" "));
    let now = procs::git_revision();
    let moved = if now == revision {
        String::new()
    } else {
        format!(" (the checkout is at {now} now)")
    };
    println!(
        "Machine: {machine}; {}; pgdn at {revision}{moved}.\n",
        procs::rustc_version()
    );
}

/// Where a started server listens.
struct Endpoints {
    subscribers: Subscribers,
    publish_url: String,
    authorization: Option<String>,
}

/// How the subscribers connect.
enum Subscribers {
    /// One WebSocket URL per subscriber; with `hello`, each counts as
    /// connected once its `connection` frame arrived.
    Ws { urls: Vec<String>, hello: bool },
    /// One request target (`/sse?token=...`) per subscriber, on the server
    /// at `addr`.
    Sse { addr: String, targets: Vec<String> },
}

fn random_hex(bytes: usize) -> String {
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    (0..bytes)
        .map(|_| {
            // splitmix64: only needs to differ between runs.
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            format!("{:02x}", (z ^ (z >> 31)) as u8)
        })
        .collect()
}

/// The JWT secret and publish key of one run's pgdn nodes (every node of a
/// cluster shares them), random per run.
struct Credentials {
    secret: String,
    key: String,
}

impl Credentials {
    fn new() -> Credentials {
        Credentials {
            secret: random_hex(32),
            key: random_hex(24),
        }
    }

    /// One subscriber URL for the pgdn node at `addr` per user `u<i>`,
    /// each with its own HS256 JWT (`sub`, `groups`, `exp`).
    fn ws_urls(
        &self,
        addr: &str,
        users: impl Iterator<Item = usize>,
    ) -> Result<Vec<String>, String> {
        Ok(self
            .tokens(users)?
            .into_iter()
            .map(|token| format!("ws://{addr}/ws?token={token}"))
            .collect())
    }

    /// One HS256 JWT (`sub`, `groups`, `exp`) per user `u<i>`, each in
    /// group `bench`.
    fn tokens(&self, users: impl Iterator<Item = usize>) -> Result<Vec<String>, String> {
        users
            .map(|i| self.token(&format!("u{i}"), &["bench"]))
            .collect()
    }

    /// An HS256 JWT for `user` in `groups`, valid for a day.
    fn token(&self, user: &str, groups: &[&str]) -> Result<String, String> {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 24 * 3600;
        let encoding = jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes());
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        let claims = serde_json::json!({"sub": user, "groups": groups, "exp": exp});
        jsonwebtoken::encode(&header, &claims, &encoding).map_err(|e| format!("minting a JWT: {e}"))
    }
}

/// The pgdn-server binary to measure.
fn pgdn_bin(opts: &Options, bin_dir: &Path) -> PathBuf {
    opts.pgdn_bin
        .clone()
        .unwrap_or_else(|| bin_dir.join("pgdn-server"))
}

/// Starts `bin` (a pgdn-server) on a free port of 127.0.0.1 with `creds`,
/// warnings-only logging, no demo page and the `extra` arguments; returns
/// the process and the `host:port` it listens on.
fn start_pgdn(
    bin: &Path,
    name: &'static str,
    creds: &Credentials,
    extra: &[&str],
) -> Result<(ServerProcess, String), String> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--addr",
        "127.0.0.1:0",
        "--log",
        "warn",
        "--demo-page",
        "false",
    ])
    .args(["--jwt-secret", &creds.secret, "--publish-key", &creds.key])
    .args(extra);
    let prefix = "pgdn-server listening on http://";
    let (process, line) = ServerProcess::start(name, cmd, prefix, Duration::from_secs(30))?;
    let addr = line[prefix.len()..].trim().to_string();
    Ok((process, addr))
}

/// Starts `server` and says where it listens, with one subscriber URL per
/// user `u0`..`u{n-1}`.
fn launch(
    server: Server,
    n: usize,
    bin_dir: &Path,
    opts: &Options,
) -> Result<(ServerProcess, Endpoints), String> {
    match server {
        Server::Pgdn | Server::Sse => {
            let creds = Credentials::new();
            let max = (n + 1000).to_string();
            let (process, addr) = start_pgdn(
                &pgdn_bin(opts, bin_dir),
                "pgdn-server",
                &creds,
                &["--max-connections", &max],
            )?;
            let subscribers = if server == Server::Pgdn {
                Subscribers::Ws {
                    urls: creds.ws_urls(&addr, 0..n)?,
                    hello: true,
                }
            } else {
                let targets = creds.tokens(0..n)?;
                Subscribers::Sse {
                    targets: targets
                        .into_iter()
                        .map(|token| format!("/sse?token={token}"))
                        .collect(),
                    addr: addr.clone(),
                }
            };
            Ok((
                process,
                Endpoints {
                    subscribers,
                    publish_url: format!("http://{addr}/api/v1/publish"),
                    authorization: Some(format!("Bearer {}", creds.key)),
                },
            ))
        }
        Server::Baseline => {
            let mut cmd = Command::new(bin_dir.join("xtask"));
            cmd.args(["bench", baseline::SUBCOMMAND])
                .args(["--coalesce", &opts.baseline_coalesce.to_string()])
                .args(["--read-buffer", &opts.baseline_read_buffer.to_string()])
                .args(["--nodelay", if opts.baseline_nodelay { "1" } else { "0" }]);
            let (process, line) =
                ServerProcess::start("baseline", cmd, baseline::READY, Duration::from_secs(30))?;
            let addr_of = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_string)
                    .ok_or_else(|| format!("baseline printed `{line}`"))
            };
            let (ws, http) = (addr_of("ws=")?, addr_of("http=")?);
            Ok((
                process,
                Endpoints {
                    subscribers: Subscribers::Ws {
                        urls: (0..n).map(|i| format!("ws://{ws}/ws?user=u{i}")).collect(),
                        hello: false,
                    },
                    publish_url: format!("http://{http}/publish"),
                    authorization: None,
                },
            ))
        }
    }
}

/// Starts one server, measures it at `n` subscribers and stops it.
fn run_one(
    runtime: &tokio::runtime::Runtime,
    server: Server,
    round: usize,
    n: usize,
    opts: &Options,
    bin_dir: &Path,
    ticks_per_sec: u64,
) -> Result<Run, String> {
    let (process, endpoints) = launch(server, n, bin_dir, opts)?;
    let mut run = Run {
        server,
        round,
        n,
        connect_secs: 0.0,
        rss_before_kib: 0,
        rss_after_kib: 0,
        rss_traffic_kib: 0,
        fanout: None,
        broadcast: Vec::new(),
        user: None,
        errors: Vec::new(),
    };
    let pid = process.pid();
    if let Err(e) = runtime.block_on(measure(&mut run, pid, endpoints, opts, ticks_per_sec)) {
        eprintln!("xtask bench: {} at N = {n}: {e}", server.name());
        run.errors.push(e);
    }
    eprintln!("xtask bench: {}", process.stop(Duration::from_secs(20)));
    Ok(run)
}

/// Waits until the server's RSS stops moving (at most 10 s) and returns it.
async fn settled_rss(pid: u32) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = procs::rss_kib(pid)?;
    let mut stable = 0;
    while Instant::now() < deadline && stable < 3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = procs::rss_kib(pid)?;
        if now.abs_diff(last) * 1000 <= last {
            stable += 1;
        } else {
            stable = 0;
        }
        last = now;
    }
    Ok(last)
}

/// The CPU clocks at the start of a phase.
struct Clocks {
    start: Instant,
    server: u64,
    bench: u64,
}

impl Clocks {
    fn start(pid: u32) -> Result<Clocks, String> {
        Ok(Clocks {
            start: Instant::now(),
            server: procs::cpu_ticks(pid)?,
            bench: procs::own_cpu_ticks(),
        })
    }

    fn finish(self, pid: u32, rec: &Recorder, phase: usize) -> Result<Phase, String> {
        let secs = self.start.elapsed().as_secs_f64();
        let hist = rec.histogram(phase);
        Ok(Phase {
            deliveries: rec.count(phase),
            secs,
            server_ticks: procs::cpu_ticks(pid)?.saturating_sub(self.server),
            bench_ticks: procs::own_cpu_ticks().saturating_sub(self.bench),
            p50_ns: hist.quantile(0.50),
            p99_ns: hist.quantile(0.99),
        })
    }
}

/// Connects the subscribers and runs every phase, filling `run`.
async fn measure(
    run: &mut Run,
    pid: u32,
    endpoints: Endpoints,
    opts: &Options,
    ticks_per_sec: u64,
) -> Result<(), String> {
    let rec = Recorder::new();
    let publisher = Arc::new(Publisher::new(
        endpoints.publish_url,
        endpoints.authorization,
        opts.padding,
    ));
    // One publish to nobody first, so that whatever the publish path
    // allocates once is in the "before" figure of both servers.
    publisher.publish(BROADCAST, PHASE_WARMUP).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.rss_before_kib = settled_rss(pid).await?;

    let mut subscribers = JoinSet::new();
    let started = Instant::now();
    let sse_stats = Arc::new(sse::SseStats::default());
    let connected = match endpoints.subscribers {
        Subscribers::Ws { urls, hello } => {
            let urls = urls.into_iter().map(|u| (u, 0)).collect();
            client::connect_all(urls, hello, &rec, &mut subscribers).await
        }
        Subscribers::Sse { addr, targets } => {
            sse::connect_all(&addr, targets, &rec, &sse_stats, &mut subscribers).await
        }
    };
    run.connect_secs = started.elapsed().as_secs_f64();
    let result = match connected {
        Ok(()) => phases(run, pid, &rec, &publisher, opts, ticks_per_sec).await,
        Err(e) => Err(format!("connecting the subscribers: {e}")),
    };
    if run.server == Server::Sse {
        let ids = sse_stats.ids.load(std::sync::atomic::Ordering::Relaxed);
        let missing = sse_stats
            .missing_ids
            .load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("  SSE: {ids} events with an id, {missing} notifications without one");
        if missing > 0 {
            run.errors.push(format!(
                "{missing} SSE notification events had no `id:` line"
            ));
        }
    }
    // Close the subscribers and the publisher's connections before the
    // server is stopped.
    subscribers.shutdown().await;
    drop(publisher);
    tokio::time::sleep(Duration::from_millis(300)).await;
    result
}

async fn phases(
    run: &mut Run,
    pid: u32,
    rec: &Recorder,
    publisher: &Arc<Publisher>,
    opts: &Options,
    ticks_per_sec: u64,
) -> Result<(), String> {
    let n = run.n as u64;
    run.rss_after_kib = settled_rss(pid).await?;
    eprintln!(
        "  {} subscribers connected in {:.1} s; server RSS {} -> {} KiB: {:.1} KB per idle connection",
        run.n,
        run.connect_secs,
        run.rss_before_kib,
        run.rss_after_kib,
        run.rss_per_connection()
    );

    // Fan-out latency: one broadcast at a time.
    let count = (200_000 / run.n).clamp(10, 200) as u64;
    let clocks = Clocks::start(pid)?;
    for i in 0..count {
        publisher.publish(BROADCAST, PHASE_FANOUT).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        rec.wait_for(PHASE_FANOUT, (i + 1) * n, deadline).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let fanout = clocks.finish(pid, rec, PHASE_FANOUT)?;
    eprintln!(
        "  fan-out, {count} broadcasts one at a time: latency p50 {:.2} ms, p99 {:.2} ms",
        ms(fanout.p50_ns),
        ms(fanout.p99_ns)
    );
    run.fanout = Some(fanout);

    // Broadcast throughput.
    let m = opts.broadcasts(run.n) as u64;
    let window = opts.window as u64;
    for r in 0..opts.repeat {
        let phase = PHASE_FIRST_REPETITION + r;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let clocks = Clocks::start(pid)?;
        let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_micros(m * n);
        let mut short = 0u64;
        for i in 0..m {
            if i >= window {
                rec.wait_for(phase, (i + 1 - window) * n, deadline).await?;
            }
            if publisher.publish(BROADCAST, phase).await? != Some(n) {
                short += 1;
            }
        }
        rec.wait_for(phase, m * n, deadline).await?;
        let p = clocks.finish(pid, rec, phase)?;
        eprintln!(
            "  broadcast repetition {}: {} deliveries in {:.2} s = {:.0}/s; server CPU {:.2} µs/delivery ({:.0} % of a core), bench CPU {:.2} µs/delivery; latency p50 {:.1} ms, p99 {:.1} ms",
            r + 1,
            p.deliveries,
            p.secs,
            p.per_sec(),
            p.cpu_us_per_delivery(ticks_per_sec),
            p.server_ticks as f64 * 100.0 / ticks_per_sec as f64 / p.secs,
            p.bench_ticks as f64 * 1e6 / ticks_per_sec as f64 / p.deliveries.max(1) as f64,
            ms(p.p50_ns),
            ms(p.p99_ns)
        );
        if short > 0 {
            run.errors.push(format!(
                "repetition {}: {short} broadcasts reported fewer than {n} deliveries",
                r + 1
            ));
        }
        run.broadcast.push(p);
    }

    // User-targeted messages, from several concurrent publishers.
    let phase = PHASE_FIRST_REPETITION + opts.repeat;
    let total = opts.user_messages as u64;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let clocks = Clocks::start(pid)?;
    let mut publishers = JoinSet::new();
    for j in 0..USER_PUBLISHERS as u64 {
        let publisher = publisher.clone();
        publishers.spawn(async move {
            for i in (j..total).step_by(USER_PUBLISHERS) {
                let user = (i * 7919) % n;
                publisher
                    .publish(&format!(r#"{{"user":"u{user}"}}"#), phase)
                    .await?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = publishers.join_next().await {
        done.map_err(|e| format!("publisher task: {e}"))??;
    }
    rec.wait_for(phase, total, Instant::now() + Duration::from_secs(60))
        .await?;
    let user = clocks.finish(pid, rec, phase)?;
    eprintln!(
        "  user-targeted: {} deliveries in {:.2} s = {:.0}/s; server CPU {:.2} µs/delivery; latency p50 {:.2} ms, p99 {:.2} ms",
        user.deliveries,
        user.secs,
        user.per_sec(),
        user.cpu_us_per_delivery(ticks_per_sec),
        ms(user.p50_ns),
        ms(user.p99_ns)
    );
    run.user = Some(user);
    run.rss_traffic_kib = settled_rss(pid).await?;
    eprintln!(
        "  server RSS after the traffic: {} KiB: {:.1} KB per connection",
        run.rss_traffic_kib,
        per_connection_kb(run.rss_before_kib, run.rss_traffic_kib, run.n)
    );
    // Every subscriber got every broadcast exactly once: the counts are
    // exact, not merely reached (a duplicate would show here).
    let expected = [(PHASE_FANOUT, count * n)]
        .into_iter()
        .chain((0..opts.repeat).map(|r| (PHASE_FIRST_REPETITION + r, m * n)))
        .chain([(PHASE_FIRST_REPETITION + opts.repeat, total)]);
    rec.check_exact(expected, &mut run.errors);
    let (closed, failed) = rec.ended();
    if closed + failed > 0 {
        run.errors.push(format!(
            "{closed} connections closed by the server, {failed} failed"
        ));
    }
    Ok(())
}

/// (after - before) KiB spread over `n` connections, in KB.
fn per_connection_kb(before_kib: u64, after_kib: u64, n: usize) -> f64 {
    (after_kib as f64 - before_kib as f64) * 1.024 / n as f64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Formats `x` with thousands separators.
fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A metric's samples from a set of runs.
type Metric<'a> = &'a dyn Fn(&Run) -> Vec<f64>;

/// Prints the Markdown table of one N (a column per server in `columns`,
/// then the ratios: pgdn over WebSocket and over SSE to the baseline, SSE
/// to WebSocket), then every sample of the metrics with a target; true
/// when every target is met (or there is nothing to compare). The targets
/// are judged on the WebSocket ratios, or on the SSE ones when only SSE is
/// measured.
fn print_table(
    n: usize,
    columns: &[(Server, Vec<&Run>)],
    opts: &Options,
    ticks_per_sec: u64,
) -> bool {
    println!(
        "### N = {} subscribers\n\n{} broadcasts x {} repetition(s) per run, window {}, {} user-targeted messages, \
         baseline coalescing {}; medians of {} run(s) per server.\n",
        thousands(n as f64),
        opts.broadcasts(n),
        opts.repeat,
        opts.window,
        opts.user_messages,
        opts.baseline_coalesce,
        opts.rounds
    );
    let index = |s: Server| columns.iter().position(|(c, _)| *c == s);
    let (ws, sse, base) = (
        index(Server::Pgdn),
        index(Server::Sse),
        index(Server::Baseline),
    );
    let judged = ws.or(sse);
    // (label, numerator column, denominator column, with the targets)
    let mut ratios: Vec<(&str, usize, usize, bool)> = Vec::new();
    for (pgdn, label) in [(ws, "WS / baseline"), (sse, "SSE / baseline")] {
        if let (Some(p), Some(b)) = (pgdn, base) {
            ratios.push((label, p, b, Some(p) == judged));
        }
    }
    if let (Some(s), Some(w)) = (sse, ws) {
        ratios.push(("SSE / WS", s, w, false));
    }
    let mut heading = String::from("| |");
    let mut rule = String::from("|---|");
    for (server, _) in columns {
        heading += &format!(" {} |", server.heading());
        rule += "---:|";
    }
    for &(label, _, _, targets) in &ratios {
        heading += &format!(" {label} |");
        rule += "---:|";
        if targets {
            heading += " target |";
            rule += "---|";
        }
    }
    println!("{heading}\n{rule}");
    let samples =
        |runs: &[&Run], get: Metric| -> Vec<f64> { runs.iter().flat_map(|r| get(r)).collect() };
    let mut all_met = true;
    let mut row =
        |label: &str, get: Metric, fmt: &dyn Fn(f64) -> String, target: Option<(bool, f64)>| {
            let medians: Vec<Option<f64>> = columns
                .iter()
                .map(|(_, runs)| median(samples(runs, get)))
                .collect();
            let mut line = format!("| {label} |");
            for m in &medians {
                line += &format!(" {} |", m.map_or("-".to_string(), fmt));
            }
            for &(_, a, b, targets) in &ratios {
                let ratio = match (medians[a], medians[b]) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                    _ => None,
                };
                let (ratio_text, verdict) = match (target, ratio) {
                    (Some((at_least, t)), Some(r)) => {
                        let met = if at_least { r >= t } else { r <= t };
                        let op = if at_least { ">=" } else { "<=" };
                        if targets {
                            all_met &= met;
                        }
                        (
                            format!("**{r:.3}**"),
                            format!("{op} {t:.2}: {}", if met { "PASS" } else { "FAIL" }),
                        )
                    }
                    (Some((at_least, t)), None) => (
                        "-".into(),
                        format!(
                            "{} {t:.2}: not measured",
                            if at_least { ">=" } else { "<=" }
                        ),
                    ),
                    (None, r) => (
                        r.map_or("-".to_string(), |r| format!("{r:.2}")),
                        String::new(),
                    ),
                };
                line += &format!(" {ratio_text} |");
                if targets {
                    line += &format!(" {verdict} |");
                }
            }
            println!("{line}");
        };
    let rate: Metric = &|r| r.broadcast.iter().map(Phase::per_sec).collect();
    let cpu: Metric = &|r| {
        r.broadcast
            .iter()
            .map(|p| p.cpu_us_per_delivery(ticks_per_sec))
            .collect()
    };
    let rss: Metric = &|r| {
        (r.rss_after_kib > 0)
            .then(|| r.rss_per_connection())
            .into_iter()
            .collect()
    };
    row(
        "broadcast deliveries/s",
        rate,
        &thousands,
        Some((true, TARGET_THROUGHPUT)),
    );
    row(
        "server CPU per broadcast delivery (µs)",
        cpu,
        &|v| format!("{v:.2}"),
        Some((false, TARGET_CPU)),
    );
    row(
        "server RSS per idle connection (KB)",
        rss,
        &|v| format!("{v:.1}"),
        Some((false, TARGET_RSS)),
    );
    row(
        "server RSS per connection after the traffic (KB)",
        &|r| {
            (r.rss_traffic_kib > 0)
                .then(|| per_connection_kb(r.rss_before_kib, r.rss_traffic_kib, r.n))
                .into_iter()
                .collect()
        },
        &|v| format!("{v:.1}"),
        None,
    );
    let two = |v: f64| format!("{v:.2}");
    let one = |v: f64| format!("{v:.1}");
    row(
        "broadcast latency p50, one at a time (ms)",
        &|r| r.fanout.iter().map(|p| ms(p.p50_ns)).collect(),
        &two,
        None,
    );
    row(
        "broadcast latency p99, one at a time (ms)",
        &|r| r.fanout.iter().map(|p| ms(p.p99_ns)).collect(),
        &two,
        None,
    );
    row(
        "broadcast latency p50, under load (ms)",
        &|r| r.broadcast.iter().map(|p| ms(p.p50_ns)).collect(),
        &one,
        None,
    );
    row(
        "broadcast latency p99, under load (ms)",
        &|r| r.broadcast.iter().map(|p| ms(p.p99_ns)).collect(),
        &one,
        None,
    );
    row(
        "user-targeted deliveries/s",
        &|r| r.user.iter().map(Phase::per_sec).collect(),
        &thousands,
        None,
    );
    row(
        "server CPU per user-targeted delivery (µs)",
        &|r| {
            r.user
                .iter()
                .map(|p| p.cpu_us_per_delivery(ticks_per_sec))
                .collect()
        },
        &one,
        None,
    );
    row(
        "user-targeted latency p50 (ms)",
        &|r| r.user.iter().map(|p| ms(p.p50_ns)).collect(),
        &two,
        None,
    );
    row(
        "user-targeted latency p99 (ms)",
        &|r| r.user.iter().map(|p| ms(p.p99_ns)).collect(),
        &two,
        None,
    );
    row(
        "time to connect N subscribers (s)",
        &|r| vec![r.connect_secs],
        &two,
        None,
    );
    println!();
    let show = |label: &str, get: Metric, fmt: &dyn Fn(f64) -> String| {
        let list = |runs: &[&Run]| {
            let mut runs = runs.to_vec();
            runs.sort_by_key(|r| r.round);
            runs.iter()
                .flat_map(|r| get(r))
                .map(fmt)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let lists: Vec<String> = columns
            .iter()
            .map(|(server, runs)| format!("{} {}", server.name(), list(runs)))
            .collect();
        println!("- {label}: {}", lists.join("; "));
    };
    println!("Every sample, in round order:\n");
    show("broadcast deliveries/s", rate, &thousands);
    show("server CPU µs per broadcast delivery", cpu, &|v| {
        format!("{v:.2}")
    });
    show("server RSS KB per idle connection", rss, &|v| {
        format!("{v:.1}")
    });
    for r in columns.iter().flat_map(|(_, runs)| runs) {
        for e in &r.errors {
            println!("- problem, {} round {}: {e}", r.server.name(), r.round + 1);
        }
    }
    println!();
    all_met
}
