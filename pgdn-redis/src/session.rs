//! [`RedisSessionTracker`]: which nodes hold each user, liveness keys, the
//! heartbeat, and cluster-wide stats (pgdn-ws's RedisSessionTracker, made
//! correct for users with several connections on several nodes).
//!
//! Layout in Redis (prefix `pgdn:`, `{p}` the partition of the user or
//! group):
//! - `{0}:nodes`: hash node -> liveness expiry (ms, Redis clock), written
//!   by each node's heartbeat.
//! - `{p}:user:{user}` / `{p}:group:{group}`: hash node -> expiry (ms,
//!   Redis clock); a node's entry is refreshed by its heartbeat and
//!   expires with it. Publishes are routed by these.
//! - `{p}:conns:{node}` / `{p}:groups:{node}`: hash user (group) -> open
//!   connections on that node, for stats; each heartbeat rewrites them.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::cluster::Shared;
use crate::error::Result;
use crate::scripts::{self, Call};
use crate::shard::Shard;
use async_trait::async_trait;
use pgdn_core::{ClusterStats, Identity, SessionTracker};

/// Session tracking in Redis. Created by
/// [`Cluster::session_tracker`](crate::Cluster::session_tracker).
#[derive(Clone)]
pub struct RedisSessionTracker {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisSessionTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionTracker")
            .field("node", &self.shared.node)
            .finish_non_exhaustive()
    }
}

/// Records a connection of `identity` opening (1) or closing (-1): one
/// call per name (the user and each group), on the shard of its partition.
async fn register_delta(shared: &Shared, identity: &Identity, delta: i64) -> Result<()> {
    let keys = &shared.keys;
    let topology = shared.topology()?;
    let mut by_shard: Vec<(usize, Call)> = Vec::new();
    let mut add = |p: u16, counts: String, map: String, name: &str| {
        let mut c = Call::new(&scripts::MEMBER);
        c.key(counts)
            .key(map)
            .arg(&shared.node)
            .arg(name)
            .arg(delta)
            .arg(shared.ttl_ms());
        by_shard.push((topology.owner[p as usize], c));
    };
    let user = &*identity.user_id;
    let p = keys.partition(user);
    add(p, keys.node_conns(p, &shared.node), keys.user(user), user);
    for g in &identity.groups {
        let p = keys.partition(g);
        add(p, keys.node_groups(p, &shared.node), keys.group(g), g);
    }
    for (i, shard) in topology.shards.iter().enumerate() {
        let calls: Vec<Call> = by_shard
            .iter_mut()
            .filter(|(s, _)| *s == i)
            .map(|(_, c)| std::mem::replace(c, Call::new(&scripts::MEMBER)))
            .collect();
        if !calls.is_empty() {
            scripts::run_all(&mut shard.conn()?, &calls).await?;
        }
    }
    Ok(())
}

/// (name, open connections) pairs, for users or groups.
type Counts = Vec<(String, u64)>;

/// Names per heartbeat script call.
const CHUNK: usize = 500;

/// Refreshes, on one shard, this node's liveness (if the shard holds
/// partition 0) and every mapping of its users and groups in the shard's
/// partitions, and rewrites its counts there (which forgets counts of
/// connections whose close was lost while Redis was away).
pub(crate) async fn heartbeat(shared: &Shared, shard: &Shard) -> Result<()> {
    let keys = &shared.keys;
    let mut mine = vec![false; keys.partitions as usize];
    for &p in &shard.partitions {
        mine[p as usize] = true;
    }
    let mut users: Vec<Counts> = vec![Vec::new(); keys.partitions as usize];
    let mut groups: Vec<Counts> = vec![Vec::new(); keys.partitions as usize];
    {
        let local = shared.local();
        for (u, c) in &local.users {
            let p = keys.partition(u) as usize;
            if mine[p] {
                users[p].push((u.clone(), *c));
            }
        }
        for (g, c) in &local.groups {
            let p = keys.partition(g) as usize;
            if mine[p] {
                groups[p].push((g.clone(), *c));
            }
        }
    }
    let mut calls = Vec::new();
    if mine[0] {
        let mut c = Call::new(&scripts::ALIVE);
        c.key(keys.nodes()).arg(&shared.node).arg(shared.ttl_ms());
        calls.push(c);
    }
    for &p in &shard.partitions {
        let (us, gs) = (&users[p as usize], &groups[p as usize]);
        let mut first = true;
        let (mut ui, mut gi) = (0, 0);
        while first || ui < us.len() || gi < gs.len() {
            let u_chunk = &us[ui..(ui + CHUNK).min(us.len())];
            let g_chunk = &gs[gi..(gi + CHUNK).min(gs.len())];
            ui += u_chunk.len();
            gi += g_chunk.len();
            let mut c = Call::new(&scripts::HEARTBEAT);
            c.key(keys.node_conns(p, &shared.node))
                .key(keys.node_groups(p, &shared.node));
            for (u, _) in u_chunk {
                c.key(keys.user(u));
            }
            for (g, _) in g_chunk {
                c.key(keys.group(g));
            }
            c.arg(&shared.node)
                .arg(shared.ttl_ms())
                .arg(if first { "1" } else { "0" })
                .arg(u_chunk.len());
            for (u, n) in u_chunk.iter().chain(g_chunk) {
                c.arg(u).arg(*n);
            }
            calls.push(c);
            first = false;
        }
    }
    // Bounded pipelines: a node with many users does not send one huge
    // request.
    let mut conn = shard.conn()?;
    for batch in calls.chunks(64) {
        scripts::run_all(&mut conn, batch).await?;
    }
    Ok(())
}

impl RedisSessionTracker {
    /// pgdn-ws's `register_client`: records a connection of `user_id` on
    /// this node.
    pub async fn register_client(&self, user_id: &str, connection_id: &str) -> Result<()> {
        let identity = Identity::new(user_id, Vec::<&str>::new());
        Ok(SessionTracker::register(self, &self.shared.node, &identity, connection_id).await?)
    }

    /// pgdn-ws's `unregister_client`.
    pub async fn unregister_client(&self, user_id: &str, connection_id: &str) -> Result<()> {
        let identity = Identity::new(user_id, Vec::<&str>::new());
        Ok(SessionTracker::unregister(self, &self.shared.node, &identity, connection_id).await?)
    }

    /// pgdn-ws's `get_client_server`: a live node holding `user_id`, if
    /// any (see [`SessionTracker::nodes_of`] for all of them).
    pub async fn get_client_server(&self, user_id: &str) -> Result<Option<String>> {
        Ok(SessionTracker::nodes_of(self, user_id)
            .await?
            .into_iter()
            .next())
    }

    /// pgdn-ws's `heartbeat`: refreshes this node's liveness and its
    /// users' mappings now, on every shard (it also runs every heartbeat
    /// interval).
    pub async fn heartbeat(&self) -> Result<()> {
        for shard in &self.shared.topology()?.shards {
            heartbeat(&self.shared, shard).await?;
        }
        Ok(())
    }
}

/// Adds `delta` (+1 or -1) to this node's counts of the identity's user and
/// groups, forgetting what drops to zero.
fn adjust_local(shared: &Shared, identity: &Identity, delta: i64) {
    let mut local = shared.local();
    let local = &mut *local;
    let adjust = |map: &mut std::collections::HashMap<String, u64>, key: &str| {
        let count = map.entry(key.to_string()).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            map.remove(key);
        }
    };
    adjust(&mut local.users, &identity.user_id);
    for g in &identity.groups {
        adjust(&mut local.groups, g);
    }
}

#[async_trait]
impl SessionTracker for RedisSessionTracker {
    async fn register(
        &self,
        _node: &str,
        identity: &Identity,
        _connection_id: &str,
    ) -> pgdn_core::Result<()> {
        adjust_local(&self.shared, identity, 1);
        if let Err(e) = register_delta(&self.shared, identity, 1).await {
            // Other nodes cannot route this user here until a heartbeat
            // writes the mapping: take no publishes until then.
            if let Ok(t) = self.shared.topology() {
                for shard in &t.shards {
                    shard.registration_lost();
                }
            }
            return Err(e.into());
        }
        Ok(())
    }

    async fn unregister(
        &self,
        _node: &str,
        identity: &Identity,
        _connection_id: &str,
    ) -> pgdn_core::Result<()> {
        adjust_local(&self.shared, identity, -1);
        Ok(register_delta(&self.shared, identity, -1).await?)
    }

    async fn nodes_of(&self, user_id: &str) -> pgdn_core::Result<Vec<String>> {
        let mut nodes = live(&self.shared, &self.shared.keys.user(user_id), user_id).await?;
        nodes.sort();
        Ok(nodes)
    }

    async fn cluster_stats(&self) -> pgdn_core::Result<Option<ClusterStats>> {
        Ok(Some(cluster_stats(&self.shared).await?))
    }
}

/// The live entries of a map in the partition of `name`.
pub(crate) async fn live(shared: &Shared, key: &str, name: &str) -> Result<Vec<String>> {
    let shard = shared.shard(shared.keys.partition(name))?;
    let mut c = Call::new(&scripts::LIVE);
    c.key(key.to_string());
    Ok(scripts::run(&mut shard.conn()?, &c).await?)
}

/// The nodes alive now.
pub(crate) async fn live_nodes(shared: &Shared) -> Result<Vec<String>> {
    let shard = shared.shard(0)?;
    let mut c = Call::new(&scripts::LIVE);
    c.key(shared.keys.nodes());
    Ok(scripts::run(&mut shard.conn()?, &c).await?)
}

async fn cluster_stats(shared: &Shared) -> Result<ClusterStats> {
    let keys = &shared.keys;
    let mut nodes = live_nodes(shared).await?;
    nodes.sort();
    let mut users = BTreeSet::new();
    let mut groups = BTreeSet::new();
    let mut total_connections = 0usize;
    if !nodes.is_empty() {
        for shard in &shared.topology()?.shards {
            let mut conn = shard.conn()?;
            for ps in shard.partitions.chunks(16) {
                let mut pipe = redis::pipe();
                for &p in ps {
                    for n in &nodes {
                        pipe.hgetall(keys.node_conns(p, n))
                            .hkeys(keys.node_groups(p, n));
                    }
                }
                let replies: Vec<(Counts, Vec<String>)> = pipe.query_async(&mut conn).await?;
                for (conns, gs) in replies {
                    for (u, c) in conns {
                        total_connections += c as usize;
                        users.insert(u);
                    }
                    groups.extend(gs);
                }
            }
        }
    }
    Ok(ClusterStats::new(
        nodes,
        total_connections,
        users.into_iter().collect(),
        groups.into_iter().collect(),
    ))
}
