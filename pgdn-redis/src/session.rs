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

use crate::cluster::{LifecycleLink, Shared};
use crate::error::Result;
use crate::scripts::{self, Call};
use crate::shard::Shard;
use async_trait::async_trait;
use pgdn_core::{
    ClusterStats, EventKind, GroupPresence, Identity, LifecycleEvent, LifecycleSink,
    SessionTracker, UserPresence,
};

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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records a connection of `identity` opening (1) or closing (-1): one
/// call for the user and one per group, on the shard of each one's
/// partition. Emits `user.online` when this was the user's first
/// connection anywhere.
async fn register_delta(
    shared: &Shared,
    identity: &Identity,
    delta: i64,
    since: u64,
) -> Result<()> {
    let keys = &shared.keys;
    let topology = shared.topology()?;
    let user = &*identity.user_id;
    let node = &shared.node;
    let lifecycle = shared.lifecycle.get();
    let p = keys.partition(user);
    let l = shared.lifecycle_partition(&topology, p);
    let mut user_call = Call::new(&scripts::USER);
    user_call
        .key(keys.node_conns(p, node))
        .key(keys.node_since(p, node))
        .key(keys.user(user))
        .key(keys.online(l))
        .key(keys.offline_due(l))
        .arg(node)
        .arg(user)
        .arg(delta)
        .arg(shared.ttl_ms())
        .arg(since)
        .arg(if lifecycle.is_some() { "1" } else { "0" })
        .arg(lifecycle.map_or(0, |l| l.debounce.as_millis() as u64));
    let mut by_shard: Vec<Vec<Call>> = vec![Vec::new(); topology.shards.len()];
    by_shard[topology.owner[p as usize]].push(user_call);
    for g in &identity.groups {
        let pg = keys.partition(g);
        let mut c = Call::new(&scripts::MEMBER);
        c.key(keys.node_groups(pg, node))
            .key(keys.group(g))
            .key(keys.group_members(g, node))
            .arg(node)
            .arg(&**g)
            .arg(user)
            .arg(delta)
            .arg(shared.ttl_ms());
        by_shard[topology.owner[pg as usize]].push(c);
    }
    for (i, calls) in by_shard.iter().enumerate() {
        if calls.is_empty() {
            continue;
        }
        let replies = scripts::run_all(&mut topology.shards[i].conn()?, calls).await?;
        if i == topology.owner[p as usize] {
            // The user's call is the first on its shard.
            if let (Some(l), Some(redis::Value::Array(r))) = (lifecycle, replies.first()) {
                if matches!(r.get(1), Some(redis::Value::Int(1))) {
                    l.sink
                        .emit(LifecycleEvent::new(EventKind::UserOnline, Some(user)));
                }
            }
        }
    }
    Ok(())
}

/// (user, open connections) pairs.
type Counts = Vec<(String, u64)>;
/// (name, open connections, since) of users.
type Users = Vec<(String, u64, u64)>;
/// (group, open connections, members by user) of groups.
type Groups = Vec<(String, u64, Vec<(String, u64)>)>;

/// Names per heartbeat script call.
const CHUNK: usize = 500;

/// Refreshes, on one shard, this node's liveness (if the shard holds
/// partition 0) and every mapping of its users and groups in the shard's
/// partitions, and rewrites its counts there (which forgets counts of
/// connections whose close was lost while Redis was away).
pub(crate) async fn heartbeat(shared: &Shared, shard: &Shard) -> Result<()> {
    let keys = &shared.keys;
    let node = &shared.node;
    let topology = shared.topology()?;
    let lifecycle = shared.lifecycle.get().is_some();
    let mut mine = vec![false; keys.partitions as usize];
    for &p in &shard.partitions {
        mine[p as usize] = true;
    }
    let mut users: Vec<Users> = vec![Vec::new(); keys.partitions as usize];
    let mut groups: Vec<Groups> = vec![Vec::new(); keys.partitions as usize];
    // No connection opens or closes between the snapshot and the rewrite.
    let _order = shared.registering.write().await;
    {
        let local = shared.local();
        for (u, (c, since)) in &local.users {
            let p = keys.partition(u) as usize;
            if mine[p] {
                users[p].push((u.clone(), *c, *since));
            }
        }
        for (g, members) in &local.groups {
            let p = keys.partition(g) as usize;
            if mine[p] {
                let members: Vec<(String, u64)> =
                    members.iter().map(|(u, n)| (u.clone(), *n)).collect();
                let total = members.iter().map(|(_, n)| n).sum();
                groups[p].push((g.clone(), total, members));
            }
        }
    }
    let mut calls = Vec::new();
    for &p in &shard.partitions {
        let l = shared.lifecycle_partition(&topology, p);
        let us = &users[p as usize];
        for (i, chunk) in us
            .chunks(CHUNK)
            .chain(us.is_empty().then_some(&us[..0]))
            .enumerate()
        {
            let mut c = Call::new(&scripts::HEARTBEAT_USERS);
            c.key(keys.node_conns(p, node))
                .key(keys.node_since(p, node))
                .key(keys.online(l));
            for (u, _, _) in chunk {
                c.key(keys.user(u));
            }
            c.arg(node)
                .arg(shared.ttl_ms())
                .arg(if i == 0 { "1" } else { "0" })
                .arg(if lifecycle { "1" } else { "0" });
            for (u, n, since) in chunk {
                c.arg(u).arg(*n).arg(*since);
            }
            calls.push(c);
        }
        let gs = &groups[p as usize];
        for (i, chunk) in gs
            .chunks(CHUNK)
            .chain(gs.is_empty().then_some(&gs[..0]))
            .enumerate()
        {
            let mut c = Call::new(&scripts::HEARTBEAT_GROUPS);
            c.key(keys.node_groups(p, node));
            for (g, _, _) in chunk {
                c.key(keys.group(g)).key(keys.group_members(g, node));
            }
            c.arg(node)
                .arg(shared.ttl_ms())
                .arg(if i == 0 { "1" } else { "0" });
            for (g, n, members) in chunk {
                c.arg(g).arg(*n).arg(members.len());
                for (u, k) in members {
                    c.arg(u).arg(*k);
                }
            }
            calls.push(c);
        }
    }
    // Liveness last: it never expires before the mappings it vouches for
    // (a node seen dead has no mapping left that outlives it by more than
    // a connection made since its last heartbeat).
    if mine[0] {
        let mut c = Call::new(&scripts::ALIVE);
        c.key(keys.nodes()).arg(node).arg(shared.ttl_ms());
        calls.push(c);
    }
    // Bounded pipelines: a node with many users does not send one huge
    // request.
    let mut conn = shard.conn()?;
    for batch in calls.chunks(64) {
        scripts::run_all(&mut conn, batch).await?;
    }
    Ok(())
}

/// One lifecycle sweep of `shard`'s sets: users whose nodes died become
/// due offline, and users due offline (still connected nowhere) are
/// announced `user.offline`, once for the cluster.
pub(crate) async fn sweep(shared: &Shared, shard: &Shard, link: &LifecycleLink) -> Result<usize> {
    let keys = &shared.keys;
    let topology = shared.topology()?;
    let mut sets: Vec<u16> = shard
        .partitions
        .iter()
        .map(|&p| shared.lifecycle_partition(&topology, p))
        .collect();
    sets.dedup();
    let calls: Vec<Call> = sets
        .iter()
        .map(|&l| {
            let mut c = Call::new(&scripts::SWEEP);
            c.key(keys.online(l))
                .key(keys.offline_due(l))
                .arg(link.debounce.as_millis() as u64)
                .arg(1000);
            c
        })
        .collect();
    let mut conn = shard.conn()?;
    let mut gone_calls = Vec::new();
    let mut due_users = Vec::new();
    for (reply, &l) in scripts::run_all(&mut conn, &calls)
        .await?
        .into_iter()
        .zip(&sets)
    {
        let due: Vec<String> = redis::from_redis_value(reply)
            .map_err(|e| crate::Error::Corrupt(format!("lifecycle sweep: {e}")))?;
        for u in due {
            let mut c = Call::new(&scripts::GONE);
            c.key(keys.user(&u))
                .key(keys.online(l))
                .key(keys.offline_due(l))
                .arg(&u);
            gone_calls.push(c);
            due_users.push(u);
        }
    }
    let mut announced = 0;
    for (reply, user) in scripts::run_all(&mut conn, &gone_calls)
        .await?
        .into_iter()
        .zip(due_users)
    {
        if matches!(reply, redis::Value::Int(1)) {
            link.sink
                .emit(LifecycleEvent::new(EventKind::UserOffline, Some(&user)));
            announced += 1;
        }
    }
    Ok(announced)
}

/// Sweeps every shard every half debounce (with jitter), while the cluster
/// lives.
pub(crate) async fn sweep_loop(weak: std::sync::Weak<Shared>) {
    use rand::Rng;
    loop {
        let pause = {
            let Some(shared) = weak.upgrade() else { return };
            let Some(link) = shared.lifecycle.get() else {
                return;
            };
            if let Ok(topology) = shared.topology() {
                for shard in &topology.shards {
                    if shard.state.borrow().connected {
                        if let Err(e) = sweep(&shared, shard, link).await {
                            tracing::debug!(error = %e, shard = %shard.name, "lifecycle sweep failed");
                        }
                    }
                }
            }
            let half = link.debounce / 2;
            half.max(std::time::Duration::from_millis(100))
                + rand::rng().random_range(std::time::Duration::ZERO..=half / 4)
        };
        tokio::time::sleep(pause).await;
    }
}

/// Cluster-wide presence of `users`, in order: their live nodes first,
/// then those nodes' counts and first-connection times.
pub(crate) async fn presence(shared: &Shared, users: &[&str]) -> Result<Vec<UserPresence>> {
    let keys = &shared.keys;
    let topology = shared.topology()?;
    let shard_of = |u: &str| topology.owner[keys.partition(u) as usize];
    let mut nodes: Vec<Vec<String>> = vec![Vec::new(); users.len()];
    for (i, shard) in topology.shards.iter().enumerate() {
        let mine: Vec<usize> = (0..users.len())
            .filter(|&k| shard_of(users[k]) == i)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let calls: Vec<Call> = mine
            .iter()
            .map(|&k| {
                let mut c = Call::new(&scripts::LIVE);
                c.key(keys.user(users[k]));
                c
            })
            .collect();
        let mut conn = shard.conn()?;
        for (k, reply) in mine.iter().zip(scripts::run_all(&mut conn, &calls).await?) {
            nodes[*k] = redis::from_redis_value(reply)
                .map_err(|e| crate::Error::Corrupt(format!("presence: {e}")))?;
        }
        let mut pipe = redis::pipe();
        for &k in &mine {
            let p = keys.partition(users[k]);
            for n in &nodes[k] {
                pipe.hget(keys.node_conns(p, n), users[k])
                    .hget(keys.node_since(p, n), users[k]);
            }
        }
        let got: Vec<(Option<u64>, Option<u64>)> = if mine.iter().all(|&k| nodes[k].is_empty()) {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await?
        };
        let mut got = got.into_iter();
        for &k in &mine {
            let (mut count, mut since) = (0u64, None::<u64>);
            for _ in &nodes[k] {
                let (c, s) = got.next().unwrap_or_default();
                count += c.unwrap_or(0);
                if let Some(s) = s {
                    since = Some(since.map_or(s, |x| x.min(s)));
                }
            }
            nodes[k] = vec![
                count.to_string(),
                since.map(|s| s.to_string()).unwrap_or_default(),
            ];
        }
    }
    Ok(users
        .iter()
        .zip(nodes)
        .map(|(u, v)| {
            let count: usize = v.first().and_then(|c| c.parse().ok()).unwrap_or(0);
            let since = v
                .get(1)
                .and_then(|s| s.parse::<u64>().ok())
                .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
            UserPresence::new(u, count, since)
        })
        .collect())
}

/// A page of a group's online members, cluster-wide.
pub(crate) async fn group_presence(
    shared: &Shared,
    group: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<GroupPresence> {
    let keys = &shared.keys;
    let shard = shared.shard(keys.partition(group))?;
    let mut conn = shard.conn()?;
    let mut live = Call::new(&scripts::LIVE);
    live.key(keys.group(group));
    let nodes: Vec<String> = scripts::run(&mut conn, &live).await?;
    let mut pipe = redis::pipe();
    for n in &nodes {
        pipe.hgetall(keys.group_members(group, n));
    }
    let per_node: Vec<Vec<(String, u64)>> = if nodes.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut conn).await?
    };
    let mut members: std::collections::BTreeMap<String, usize> = Default::default();
    for (u, n) in per_node.into_iter().flatten() {
        *members.entry(u).or_default() += n as usize;
    }
    Ok(GroupPresence::page(
        group,
        members.into_iter(),
        after,
        limit,
    ))
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
/// groups, forgetting what drops to zero. Returns when the node's first
/// current connection of the user opened (ms since the epoch).
fn adjust_local(shared: &Shared, identity: &Identity, delta: i64) -> u64 {
    let mut local = shared.local();
    let local = &mut *local;
    let user = &*identity.user_id;
    let entry = local.users.entry(user.to_string()).or_insert((0, now_ms()));
    entry.0 = entry.0.saturating_add_signed(delta);
    let since = entry.1;
    if entry.0 == 0 {
        local.users.remove(user);
    }
    for g in &identity.groups {
        let members = local.groups.entry(g.to_string()).or_default();
        let n = members.entry(user.to_string()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            members.remove(user);
        }
        if members.is_empty() {
            local.groups.remove(&**g);
        }
    }
    since
}

#[async_trait]
impl SessionTracker for RedisSessionTracker {
    async fn register(
        &self,
        _node: &str,
        identity: &Identity,
        _connection_id: &str,
    ) -> pgdn_core::Result<()> {
        let _order = self.shared.registering.read().await;
        let since = adjust_local(&self.shared, identity, 1);
        if let Err(e) = register_delta(&self.shared, identity, 1, since).await {
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
        let _order = self.shared.registering.read().await;
        let since = adjust_local(&self.shared, identity, -1);
        Ok(register_delta(&self.shared, identity, -1, since).await?)
    }

    async fn nodes_of(&self, user_id: &str) -> pgdn_core::Result<Vec<String>> {
        let mut nodes = live(&self.shared, &self.shared.keys.user(user_id), user_id).await?;
        nodes.sort();
        Ok(nodes)
    }

    async fn cluster_stats(&self) -> pgdn_core::Result<Option<ClusterStats>> {
        Ok(Some(cluster_stats(&self.shared).await?))
    }

    fn attach_lifecycle(&self, sink: Arc<dyn LifecycleSink>, debounce: std::time::Duration) {
        if self
            .shared
            .lifecycle
            .set(LifecycleLink { sink, debounce })
            .is_ok()
        {
            tokio::spawn(sweep_loop(Arc::downgrade(&self.shared)));
        }
    }

    async fn presence(&self, users: &[&str]) -> pgdn_core::Result<Option<Vec<UserPresence>>> {
        Ok(Some(presence(&self.shared, users).await?))
    }

    async fn group_presence(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> pgdn_core::Result<Option<GroupPresence>> {
        Ok(Some(
            group_presence(&self.shared, group, after, limit).await?,
        ))
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
