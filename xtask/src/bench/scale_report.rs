//! The printed report of `cargo xtask bench --scale` (`scale_run.rs`
//! measures): one Markdown table of the figures, with the machine, the
//! commit and the command in it, then a projection of those figures to
//! 1,000,000 connections (memory, nodes, Redis load), then any problem.
//!
//! The projection is arithmetic on the measured figures, assuming that
//! what was measured per connection, per delivery and per node stays the
//! same at a larger scale: RSS grows by the measured KB per connection plus
//! each node's base; a broadcast costs the measured pgdn CPU per delivery
//! for each of the 1,000,000 deliveries; Redis's idle work is the measured
//! per-node part (no connection) plus the measured per-connection part
//! (the heartbeat rewrites every connected user every 5 s); a connect
//! costs Redis and pgdn what it cost here; Redis memory grows by the
//! measured `used_memory` per connection.

use super::scale_run::{Broadcasts, Report, Window};
use super::{Options, median, per_connection_kb, procs, thousands};

/// The connections the projection is for.
const TARGET: f64 = 1_000_000.0;

/// Connections per node in the projection's first layout: what one
/// process may hold on this box (20,000 open files).
const CAPPED_NODE: f64 = 19_000.0;

/// Connections per node in the projection's second layout (a node whose
/// open-file limit allows it).
const BIG_NODE: f64 = 100_000.0;

/// The page size of `/proc/net/sockstat`'s `mem` (`getconf PAGESIZE`; 4096
/// if that fails).
fn page_size() -> f64 {
    std::process::Command::new("getconf")
        .arg("PAGESIZE")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096.0)
}

/// Figures derived from a [`Report`], shared by the table and the
/// projection.
struct Derived {
    /// Connections made.
    n: f64,
    /// Clock ticks per second.
    tps: f64,
    /// pgdn RSS per connection over all nodes, KB.
    rss_kb: f64,
    /// A node's RSS before any connection (the mean), MiB.
    base_mib: f64,
    /// Kernel TCP buffer memory per connection, both ends, KB (None: not
    /// read).
    tcp_kb: Option<f64>,
    /// Kernel slab memory per connection, both ends, KB (None: not read).
    slab_kb: Option<f64>,
    /// Redis `used_memory` per connection, bytes.
    redis_bytes: f64,
    /// Redis CPU per connect, µs, less the idle work meanwhile (see
    /// [`less_idle`]).
    redis_connect_us: f64,
    /// pgdn CPU per connect, all nodes, µs, less the idle work meanwhile.
    pgdn_connect_us: f64,
    /// Redis CPU per disconnect (in waves), µs, less the idle work
    /// meanwhile.
    redis_close_us: Option<f64>,
    /// pgdn RSS per connection after the broadcasts, KB.
    rss_traffic_kb: Option<f64>,
    /// Redis idle CPU with no connection, share of a core.
    redis_idle_empty: f64,
    /// Redis idle CPU with everyone connected, share of a core.
    redis_idle_full: f64,
    /// pgdn CPU per broadcast delivery, µs (throughput phase).
    cpu_per_delivery_us: Option<f64>,
    /// pgdn CPU per broadcast delivery one broadcast at a time, µs, less
    /// the nodes' idle rate (the phase also waits between broadcasts).
    cpu_per_delivery_one_us: Option<f64>,
    /// Redis CPU per broadcast, less the idle rate, µs.
    redis_per_broadcast_us: Option<f64>,
    /// Redis bytes sent per broadcast, less the idle rate.
    redis_out_per_broadcast: Option<f64>,
    /// Redis commands per broadcast, less the idle rate.
    redis_commands_per_broadcast: Option<f64>,
}

impl Derived {
    fn new(r: &Report, ticks_per_sec: u64) -> Derived {
        let n = r.total().max(1) as f64;
        let tps = ticks_per_sec as f64;
        let sum = |v: &[u64]| v.iter().sum::<u64>();
        let t = r.throughput.as_ref();
        let cost = r
            .redis_per_broadcast
            .as_ref()
            .map(|(u, m)| (u, (*m).max(1) as f64));
        Derived {
            n,
            tps,
            rss_kb: per_connection_kb(sum(&r.rss_base_kib), sum(&r.rss_conn_kib), n as usize),
            base_mib: sum(&r.rss_base_kib) as f64 / r.rss_base_kib.len().max(1) as f64 / 1024.0,
            tcp_kb: match r.tcp_mem_pages {
                (Some(a), Some(b)) => Some((b as f64 - a as f64) * page_size() / 1000.0 / n),
                _ => None,
            },
            slab_kb: match r.slab_kib {
                (Some(a), Some(b)) => Some((b as f64 - a as f64) * 1.024 / n),
                _ => None,
            },
            redis_bytes: (r.redis_used.1 as f64 - r.redis_used.0 as f64) / n,
            redis_connect_us: less_idle(
                r.connect.redis.cpu_secs,
                r.connect.secs,
                (&r.idle_empty, &r.idle_full),
                |w| w.redis.cpu_secs,
            ) * 1e6
                / n,
            pgdn_connect_us: less_idle(
                r.connect.nodes() as f64 / tps,
                r.connect.secs,
                (&r.idle_empty, &r.idle_full),
                |w| w.nodes() as f64 / tps,
            ) * 1e6
                / n,
            redis_close_us: r.close.as_ref().map(|w| {
                less_idle(
                    w.redis.cpu_secs,
                    w.secs,
                    (&r.idle_empty, &r.idle_full),
                    |w| w.redis.cpu_secs,
                ) * 1e6
                    / n
            }),
            rss_traffic_kb: (!r.rss_traffic_kib.is_empty()).then(|| {
                per_connection_kb(sum(&r.rss_base_kib), sum(&r.rss_traffic_kib), n as usize)
            }),
            redis_idle_empty: r.idle_empty.redis.cpu_secs / r.idle_empty.secs.max(1e-9),
            redis_idle_full: r.idle_full.redis.cpu_secs / r.idle_full.secs.max(1e-9),
            cpu_per_delivery_us: t
                .map(|b| b.window.nodes() as f64 / tps * 1e6 / b.deliveries.max(1) as f64),
            cpu_per_delivery_one_us: r.one_at_a_time.as_ref().map(|b| {
                let idle = r.idle_full.nodes() as f64 / tps / r.idle_full.secs.max(1e-9);
                let busy = b.window.nodes() as f64 / tps - idle * b.window.secs;
                busy.max(0.0) * 1e6 / b.deliveries.max(1) as f64
            }),
            redis_per_broadcast_us: cost.map(|(u, m)| u.cpu_secs * 1e6 / m),
            redis_out_per_broadcast: cost.map(|(u, m)| u.net_out / m),
            redis_commands_per_broadcast: cost.map(|(u, m)| u.commands() / m),
        }
    }
}

/// `cpu` seconds used over `secs` while the connections went from none to
/// all (or back), less the idle work meanwhile: the mean of the idle rate
/// with no connection and with everyone connected (`rate` of each idle
/// window, per its length), as if the connections came (or went) at a
/// steady pace. The heartbeats rewrite every connected user every 5 s, so
/// with many connections this is most of what Redis does meanwhile.
fn less_idle(
    cpu: f64,
    secs: f64,
    (empty, full): (&Window, &Window),
    rate: impl Fn(&Window) -> f64,
) -> f64 {
    let per_sec = |w: &Window| rate(w) / w.secs.max(1e-9);
    cpu - secs * (per_sec(empty) + per_sec(full)) / 2.0
}

/// Share of a core → "12.3 %".
fn pct(share: f64) -> String {
    format!("{:.1} %", share * 100.0)
}

/// A window's redis-server CPU from `/proc`, share of a core.
fn proc_share(w: &Window, tps: f64) -> String {
    w.redis_ticks
        .map_or("-".into(), |t| pct(t as f64 / tps / w.secs.max(1e-9)))
}

/// Prints the table, the projection and the problems.
pub(crate) fn print(report: &Report, opts: &Options, ticks_per_sec: u64, revision: &str) {
    let r = report;
    let d = Derived::new(r, ticks_per_sec);
    let command: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--no-build")
        .collect();
    println!(
        "### {} nodes x {} connections on one Redis\n",
        r.nodes,
        thousands(r.per_node as f64)
    );
    println!("| | |\n|---|---:|");
    let row = |label: &str, value: String| println!("| {label} | {value} |");
    row("machine", procs::machine_description());
    row("commit", revision.to_string());
    row("command", format!("`cargo xtask {}`", command.join(" ")));
    row("kernel limits", r.kernel.clone());
    row(
        "connections held",
        format!(
            "**{}** of {} ({} per node: {})",
            thousands(d.n),
            thousands((r.nodes * r.per_node) as f64),
            thousands(r.per_node as f64),
            r.connected
                .iter()
                .map(|&c| thousands(c as f64))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row(
        "**time to connect everyone**",
        format!(
            "**{:.1} s** ({} connections/s; {} handshakes in flight per worker; workers {})",
            r.connect_secs,
            thousands(d.n / r.connect_secs.max(1e-9)),
            r.handshakes,
            r.worker_connect_secs
                .iter()
                .map(|s| format!("{s:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    if !r.connect_timeline.is_empty() {
        row(
            "connections made after (s)",
            r.connect_timeline
                .iter()
                .map(|(at, c)| format!("{at:.0}: {}", thousands(*c as f64)))
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
    row(
        "**pgdn RSS per connection, all nodes**",
        format!("**{:.2} KB**", d.rss_kb),
    );
    for (k, (a, b)) in r.rss_base_kib.iter().zip(&r.rss_conn_kib).enumerate() {
        let c = r.connected.get(k).copied().unwrap_or(0).max(1) as usize;
        row(
            &format!("pgdn RSS per connection, node {}", k + 1),
            format!(
                "{:.2} KB ({:.0} -> {:.0} MiB)",
                per_connection_kb(*a, *b, c),
                *a as f64 / 1024.0,
                *b as f64 / 1024.0
            ),
        );
    }
    if let Some(kb) = d.rss_traffic_kb {
        row(
            "pgdn RSS per connection after the broadcasts, all nodes",
            format!("{kb:.2} KB"),
        );
    }
    row(
        "kernel memory per connection, both ends",
        format!(
            "slab {} (the whole machine's /proc/meminfo), TCP buffers {} (sockstat)",
            d.slab_kb.map_or("-".into(), |v| format!("{v:.2} KB")),
            d.tcp_kb.map_or("-".into(), |v| format!("{v:.2} KB"))
        ),
    );
    row(
        "Redis memory per connection (used_memory)",
        format!(
            "{:.0} bytes (redis-server RSS {:.0} -> {:.0} MiB)",
            d.redis_bytes,
            r.redis_rss_kib.0 as f64 / 1024.0,
            r.redis_rss_kib.1 as f64 / 1024.0
        ),
    );
    row(
        "load generators' RSS per connection (client side)",
        format!(
            "{:.2} KB",
            r.worker_rss_kib.iter().sum::<u64>() as f64 * 1.024 / d.n
        ),
    );
    row(
        "CPU per connect: pgdn, all nodes / Redis (less the idle work meanwhile)",
        format!(
            "{:.0} µs / {:.1} µs (Redis at {} of a core while connecting)",
            d.pgdn_connect_us,
            d.redis_connect_us,
            pct(r.connect.redis.cpu_secs / r.connect.secs.max(1e-9))
        ),
    );
    if let (Some(w), Some(us)) = (&r.close, d.redis_close_us) {
        row(
            "Redis CPU per disconnect (less the idle work meanwhile)",
            format!(
                "{us:.1} µs (closed {}/s in {:.1} s; Redis at {} of a core)",
                thousands(r.close_rate as f64),
                r.close_secs,
                pct(w.redis.cpu_secs / w.secs.max(1e-9))
            ),
        );
    }
    let both = |b: &Option<Broadcasts>| b.as_ref().is_some_and(Broadcasts::exact);
    let exact = both(&r.one_at_a_time) && both(&r.throughput);
    row(
        "**every broadcast reached every connection exactly once**",
        if exact {
            "**yes**".into()
        } else {
            "**NO** (see the problems below)".into()
        },
    );
    if let Some(b) = &r.one_at_a_time {
        row(
            "**time for one broadcast to reach everyone**, one at a time (ms)",
            format!(
                "**median {:.0}**, max {:.0} (first receipt median {:.1}; {} broadcasts; pgdn \
                 CPU {:.2} µs per delivery)",
                median(b.reach_ms.clone()).unwrap_or(0.0),
                b.reach_ms.iter().copied().fold(0.0, f64::max),
                median(b.first_ms.clone()).unwrap_or(0.0),
                b.m,
                d.cpu_per_delivery_one_us.unwrap_or(0.0)
            ),
        );
    }
    if let Some(b) = &r.throughput {
        let w = &b.window;
        row(
            "**broadcast deliveries/s**",
            format!(
                "**{}** ({} broadcasts x {} = {} deliveries in {:.2} s, at most {} in flight)",
                thousands(b.per_sec()),
                b.m,
                thousands(d.n),
                thousands(b.deliveries as f64),
                b.secs,
                opts.window
            ),
        );
        row(
            "latency under load p50 / p99 / last receipt (ms)",
            format!(
                "{:.0} / {:.0} / {:.0}",
                b.latency_ms(0.5),
                b.latency_ms(0.99),
                b.secs * 1e3
            ),
        );
        row(
            "publish request to node 1 p50 (ms)",
            format!("{:.2}", median(b.request_ms.clone()).unwrap_or(0.0)),
        );
        row(
            "**pgdn CPU per delivery, all nodes**",
            format!(
                "**{:.2} µs** ({} of a core over the phase)",
                d.cpu_per_delivery_us.unwrap_or(0.0),
                pct(w.nodes() as f64 / d.tps / w.secs.max(1e-9))
            ),
        );
        row(
            "load generators' CPU per delivery (same cores)",
            format!(
                "{:.2} µs",
                w.worker_ticks as f64 / d.tps * 1e6 / b.deliveries.max(1) as f64
            ),
        );
        row(
            "**Redis CPU during the broadcasts**",
            format!(
                "**{}** of a core (INFO; /proc {}), heartbeats included",
                pct(w.redis.cpu_secs / w.secs.max(1e-9)),
                proc_share(w, d.tps),
            ),
        );
    }
    if let (Some(us), Some(c), Some(out)) = (
        d.redis_per_broadcast_us,
        d.redis_commands_per_broadcast,
        d.redis_out_per_broadcast,
    ) {
        row(
            "**Redis cost of one broadcast** (to nobody, before connecting, less the idle rate)",
            format!(
                "**{us:.0} µs** of CPU, {c:.1} commands, {} bytes sent ({} broadcasts)",
                thousands(out),
                r.redis_per_broadcast.as_ref().map_or(0, |(_, m)| *m)
            ),
        );
    }
    row(
        "**Redis CPU idle, everyone connected**",
        format!(
            "**{}** of a core (INFO; /proc {}), {} commands/s, over {:.0} s",
            pct(d.redis_idle_full),
            proc_share(&r.idle_full, d.tps),
            thousands(r.idle_full.redis.commands() / r.idle_full.secs.max(1e-9)),
            r.idle_full.secs
        ),
    );
    row(
        "Redis CPU idle, no connection",
        format!(
            "{} of a core (INFO; /proc {}), {} commands/s",
            pct(d.redis_idle_empty),
            proc_share(&r.idle_empty, d.tps),
            thousands(r.idle_empty.redis.commands() / r.idle_empty.secs.max(1e-9))
        ),
    );
    row(
        "pgdn CPU idle, everyone connected, all nodes",
        pct(r.idle_full.nodes() as f64 / d.tps / r.idle_full.secs.max(1e-9)),
    );
    println!();
    print_projection(r, &d);
    let problems: Vec<&String> = r.errors.iter().collect();
    if !problems.is_empty() {
        println!("Problems:\n");
        for e in problems {
            println!("- {e}");
        }
        println!();
    }
}

/// The connect rate in the first and in the last interval of the
/// timeline, when the last is below half the first.
fn connect_slowdown(r: &Report) -> Option<(f64, f64)> {
    let mut points = vec![(0.0, 0u64)];
    points.extend(r.connect_timeline.iter().copied());
    points.push((r.connect_secs, r.total()));
    let rates: Vec<f64> = points
        .windows(2)
        .filter(|w| w[1].0 > w[0].0 + 0.5)
        .map(|w| (w[1].1 as f64 - w[0].1 as f64) / (w[1].0 - w[0].0))
        .collect();
    let (&first, &last) = (rates.first()?, rates.last()?);
    (rates.len() >= 3 && last < first / 2.0).then_some((first, last))
}

/// Prints the projection to [`TARGET`] connections.
fn print_projection(r: &Report, d: &Derived) {
    let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
    let small_nodes = (TARGET / CAPPED_NODE).ceil();
    let big_nodes = (TARGET / BIG_NODE).ceil();
    let node_gib = |conns: f64| gib(conns * d.rss_kb * 1000.0) + d.base_mib / 1024.0;
    println!(
        "#### What this means for {} connections\n",
        thousands(TARGET)
    );
    println!(
        "Linear arithmetic on the figures above. This box's 2 cores are shared by every node, \
         Redis and the load generators, so CPU figures are per unit of work, not capacity; on \
         loopback a sender's CPU also pays the kernel's TCP receive work for its peer, which a \
         network card's interrupts would take elsewhere.\n"
    );
    println!(
        "- **Memory**: {:.2} KB of pgdn RSS per idle connection is {:.1} GiB for {} connections \
         ({}), plus {:.0} MiB per node before any connection{}.",
        d.rss_kb,
        gib(TARGET * d.rss_kb * 1000.0),
        thousands(TARGET),
        d.rss_traffic_kb.map_or(String::new(), |kb| format!(
            "{:.1} GiB at the {kb:.2} KB measured after the broadcasts, whose buffers stay",
            gib(TARGET * kb * 1000.0)
        )),
        d.base_mib,
        d.slab_kb.map_or(String::new(), |kb| format!(
            ", plus the kernel's memory for the sockets (here {kb:.2} KB of slab per connection \
             for both ends together, so about {:.1} GiB at the servers' end; idle sockets hold \
             almost no buffers)",
            gib(TARGET * kb / 2.0 * 1000.0)
        ))
    );
    println!(
        "- **Nodes**: at {} connections per node (what this box's 20,000 open files per \
         process allow) that is {} nodes of about {:.2} GiB each; nodes allowed {} open files \
         (e.g. systemd `LimitNOFILE=`) would need {} nodes of about {:.1} GiB each.",
        thousands(CAPPED_NODE),
        small_nodes,
        node_gib(CAPPED_NODE),
        thousands(BIG_NODE + 1000.0),
        big_nodes,
        node_gib(BIG_NODE)
    );
    if let Some(us) = d.cpu_per_delivery_us {
        let core_secs = us * TARGET / 1e6;
        let cores = big_nodes * 2.0;
        let one = d.cpu_per_delivery_one_us.unwrap_or(us);
        println!(
            "- **Broadcast CPU**: under load, {us:.2} µs of pgdn CPU per delivery makes one \
             broadcast to {} connections {core_secs:.1} core-seconds: {} nodes of 2 cores each \
             sustain about {:.1} broadcasts/s to everyone. One broadcast alone costs {one:.2} µs \
             per delivery (fewer frames per write), so it reaches everyone after about {:.2} s of \
             CPU-bound work on those {} cores, against the {} ms measured here for {} connections \
             on 2 cores shared with Redis and the load generators.",
            thousands(TARGET),
            big_nodes,
            cores / core_secs.max(1e-9),
            one * TARGET / 1e6 / cores,
            cores,
            r.one_at_a_time
                .as_ref()
                .and_then(|b| median(b.reach_ms.clone()))
                .map_or("-".into(), |v| format!("{v:.0}")),
            thousands(d.n)
        );
    }
    let per_conn_idle = (d.redis_idle_full - d.redis_idle_empty).max(0.0) / d.n;
    let per_node_idle = d.redis_idle_empty / r.nodes.max(1) as f64;
    let idle_at = |nodes: f64| per_node_idle * nodes + per_conn_idle * TARGET;
    println!(
        "- **Redis, idle**: here {} of a core with no connection ({} per node) and {} with {} \
         connections (the heartbeat rewrites every connected user every 5 s): {:.2} µs of Redis CPU \
         per connection per second. For {} connections: about {} of a core with {} nodes, {} with \
         {} nodes.{}",
        pct(d.redis_idle_empty),
        pct(per_node_idle),
        pct(d.redis_idle_full),
        thousands(d.n),
        per_conn_idle * 1e6,
        thousands(TARGET),
        pct(idle_at(big_nodes)),
        big_nodes,
        pct(idle_at(small_nodes)),
        small_nodes,
        if idle_at(big_nodes) > 0.5 {
            " That is past half of Redis's one core: spread the partitions over shards \
             (--redis-mode shards or cluster) or lengthen the heartbeat."
        } else {
            ""
        }
    );
    println!(
        "- **Redis, memory**: {:.0} bytes of used_memory per connection is {:.2} GiB for {} \
         connections.",
        d.redis_bytes,
        gib(d.redis_bytes * TARGET),
        thousands(TARGET)
    );
    let slowed = connect_slowdown(r).map_or(String::new(), |(first, last)| {
        format!(
            " Here connecting slowed from {}/s at first to {}/s at the end as the nodes filled \
             up, likely because each node's heartbeat holds off its registrations while it \
             rewrites all of its sessions in Redis (pgdn-redis `session::heartbeat`).",
            thousands(first),
            thousands(last)
        )
    });
    println!(
        "- **Redis, connects**: {:.1} µs of Redis CPU per connect: everyone (re)connecting at once \
         keeps Redis's core busy for at least {:.0} s{}; pgdn spends {:.0} µs per connect, {:.0} \
         core-seconds for everyone.{slowed}",
        d.redis_connect_us,
        d.redis_connect_us * TARGET / 1e6,
        d.redis_close_us.map_or(String::new(), |us| format!(
            ", and everyone leaving ({us:.1} µs per disconnect) for {:.0} s",
            us * TARGET / 1e6
        )),
        d.pgdn_connect_us,
        d.pgdn_connect_us * TARGET / 1e6
    );
    if let (Some(us), Some(out)) = (d.redis_per_broadcast_us, d.redis_out_per_broadcast) {
        let nodes = r.nodes.max(1) as f64;
        let per_node_out = out / nodes;
        // Upper estimate: all of it grows with the nodes Redis sends to.
        let us_big = us.max(0.0) * big_nodes / nodes;
        println!(
            "- **Redis, broadcasts**: a broadcast costs Redis the same whatever the number of \
             connections, one message to each node: here {us:.0} µs of CPU and {} bytes sent \
             per node. With {} nodes, \
             counting all of it as growing with the nodes: at most about {us_big:.0} µs and {} \
             bytes per broadcast, {} of a core at 10 broadcasts/s.",
            thousands(per_node_out),
            big_nodes,
            thousands(per_node_out * big_nodes),
            pct(us_big * 10.0 / 1e6)
        );
    }
    println!();
}
