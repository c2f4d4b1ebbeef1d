//! Removing what dead nodes left behind, with SCAN (never KEYS) and bounded
//! work per pass. Every node runs a pass periodically on every shard;
//! `pgdn-server cleanup --redis-url ...` runs a full one from the command
//! line (what pgdn-ws leaves to a hand-written Celery job).

use std::collections::{HashMap, HashSet};

use redis::aio::ConnectionLike;

use crate::cluster::Shared;
use crate::error::Result;
use crate::keys::Keys;
use crate::scripts::{self, Call};

/// What a cleanup pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupReport {
    /// Where the next pass continues the SCAN; 0 once a full cycle ended.
    pub cursor: u64,
    /// User and group keys looked at.
    pub keys_scanned: usize,
    /// Stale user (group) -> node mappings removed.
    pub mappings_removed: usize,
    /// Dead nodes whose bookkeeping was removed.
    pub nodes_removed: usize,
}

impl CleanupReport {
    fn add(&mut self, other: &CleanupReport) {
        self.keys_scanned += other.keys_scanned;
        self.mappings_removed += other.mappings_removed;
        self.nodes_removed += other.nodes_removed;
    }
}

/// The nodes alive now and the nodes just found dead (forgotten from the
/// node set), on the shard of partition 0.
struct Nodes {
    live: HashSet<String>,
    dead: Vec<String>,
}

/// Forgets the nodes whose liveness expired (on the shard of partition
/// 0).
async fn forget_dead<C>(conn: &mut C, keys: &Keys) -> Result<Nodes>
where
    C: ConnectionLike + Send + Sync,
{
    let mut forget = Call::new(&scripts::FORGET);
    forget.key(keys.nodes());
    let dead: Vec<String> = scripts::run(conn, &forget).await?;
    let mut live = Call::new(&scripts::LIVE);
    live.key(keys.nodes());
    let live: Vec<String> = scripts::run(conn, &live).await?;
    Ok(Nodes {
        live: live.into_iter().collect(),
        dead,
    })
}

/// What a key under the prefix is, from its name.
enum Kind<'a> {
    /// A user's or a group's map.
    Map,
    /// A node's counts.
    Counts(&'a str),
    Other,
}

fn kind<'a>(prefix: &str, key: &'a str) -> Kind<'a> {
    let Some(rest) = key.strip_prefix(prefix) else {
        return Kind::Other;
    };
    let Some((_, rest)) = rest.split_once("}:") else {
        return Kind::Other;
    };
    if rest.starts_with("user:") || rest.starts_with("group:") {
        Kind::Map
    } else if let Some(node) = rest
        .strip_prefix("conns:")
        .or_else(|| rest.strip_prefix("groups:"))
        .or_else(|| rest.strip_prefix("since:"))
    {
        Kind::Counts(node)
    } else if let Some((_, node)) = rest
        .strip_prefix("members:")
        .and_then(|r| r.rsplit_once(':'))
    {
        Kind::Counts(node)
    } else {
        Kind::Other
    }
}

/// One bounded pass over the keys of one shard, from `cursor`: removes the
/// entries of user and group maps that expired or point to a node just
/// found dead, and the counts of nodes not alive.
async fn clean_shard<C>(
    conn: &mut C,
    keys: &Keys,
    nodes: &Nodes,
    batch: usize,
    cursor: u64,
) -> Result<CleanupReport>
where
    C: ConnectionLike + Send + Sync,
{
    let mut report = CleanupReport::default();
    let mut cursor = cursor;
    let pattern = format!("{}{{*", keys.prefix);
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(200)
            .query_async(conn)
            .await?;
        let mut calls = Vec::new();
        let mut dead = Vec::new();
        for k in &found {
            match kind(&keys.prefix, k) {
                Kind::Map => {
                    // One key per call: keys of different partitions may
                    // be in different slots.
                    let mut c = Call::new(&scripts::CLEAN);
                    c.key(k.clone());
                    for n in &nodes.dead {
                        c.arg(n);
                    }
                    calls.push(c);
                }
                Kind::Counts(node) if !nodes.live.contains(node) => dead.push(k.clone()),
                _ => {}
            }
        }
        report.keys_scanned += calls.len();
        for r in scripts::run_all(conn, &calls).await? {
            if let redis::Value::Int(n) = r {
                report.mappings_removed += n.max(0) as usize;
            }
        }
        for k in dead {
            let _: () = redis::cmd("DEL").arg(k).query_async(conn).await?;
        }
        cursor = next;
        if cursor == 0 || report.keys_scanned >= batch {
            break;
        }
    }
    report.cursor = cursor;
    Ok(report)
}

/// One bounded pass on a single Redis (every partition on `conn`):
/// forgets dead nodes (whose liveness expired) and their counts, then
/// scans from `cursor` at most about `batch` user and group keys and
/// removes their mappings that expired. For several shards, use
/// [`Cluster::cleanup`](crate::Cluster::cleanup).
pub async fn cleanup_pass<C>(
    conn: &mut C,
    prefix: &str,
    batch: usize,
    cursor: u64,
) -> Result<CleanupReport>
where
    C: ConnectionLike + Send + Sync,
{
    let keys = Keys::new(prefix, 1);
    let nodes = forget_dead(conn, &keys).await?;
    let mut report = clean_shard(conn, &keys, &nodes, batch, cursor).await?;
    report.nodes_removed = nodes.dead.len();
    Ok(report)
}

/// Full cleanup of a single Redis: passes until the SCAN has gone round
/// once. For the command line; [`Cluster::cleanup`](crate::Cluster::cleanup)
/// does the same on any deployment.
pub async fn cleanup_all(url: &str, prefix: &str) -> Result<CleanupReport> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut total = CleanupReport::default();
    let mut cursor = 0;
    loop {
        let r = cleanup_pass(&mut conn, prefix, 1000, cursor).await?;
        total.add(&r);
        cursor = r.cursor;
        if cursor == 0 {
            return Ok(total);
        }
    }
}

/// One bounded pass on every shard of the node's deployment, each from
/// its own cursor in `cursors` (by shard name).
pub(crate) async fn cleanup_shards(
    shared: &Shared,
    batch: usize,
    cursors: &mut HashMap<String, u64>,
) -> Result<CleanupReport> {
    let keys = &shared.keys;
    let topology = shared.topology()?;
    let nodes = forget_dead(&mut topology.shard(0).conn()?, keys).await?;
    let mut total = CleanupReport {
        nodes_removed: nodes.dead.len(),
        ..CleanupReport::default()
    };
    for shard in &topology.shards {
        let cursor = cursors.get(&shard.name).copied().unwrap_or(0);
        let r = clean_shard(&mut shard.conn()?, keys, &nodes, batch, cursor).await?;
        cursors.insert(shard.name.clone(), r.cursor);
        total.add(&r);
    }
    total.cursor = cursors.values().copied().max().unwrap_or(0);
    Ok(total)
}

/// A full cycle on every shard (every shard's SCAN has gone round once).
pub(crate) async fn cleanup_everything(shared: &Shared) -> Result<CleanupReport> {
    let mut cursors = HashMap::new();
    let mut total = cleanup_shards(shared, usize::MAX, &mut cursors).await?;
    // A batch of usize::MAX runs each SCAN to its end in one pass.
    total.cursor = 0;
    Ok(total)
}
