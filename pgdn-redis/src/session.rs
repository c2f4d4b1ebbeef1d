//! [`RedisSessionTracker`]: which nodes hold each user, liveness keys, the
//! heartbeat, and cluster-wide stats (pgdn-ws's RedisSessionTracker, made
//! correct for users with several connections on several nodes).
//!
//! Layout in Redis (prefix `pgdn:`):
//! - `alive:{node}`: liveness key, expires after `node_ttl` unless the
//!   heartbeat refreshes it.
//! - `nodes`: set of node ids seen.
//! - `user:{user}`: hash node -> expiry (ms, Redis clock); a node's entry
//!   is refreshed by its heartbeat and expires with it.
//! - `conns:{node}` / `groups:{node}`: hash user (group) -> open
//!   connections on that node, for stats and for reconciling.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use pgdn_core::{ClusterStats, Identity, SessionTracker};
use redis::AsyncCommands;

use crate::cluster::Shared;
use crate::error::Result;
use crate::scripts;

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

async fn register_delta(shared: &Shared, identity: &Identity, delta: i64) -> Result<()> {
    let mut inv = scripts::REGISTER.prepare_invoke();
    inv.arg(&shared.keys.prefix)
        .arg(&shared.node)
        .arg(&*identity.user_id)
        .arg(delta)
        .arg(shared.ttl_ms());
    for g in &identity.groups {
        inv.arg(&**g);
    }
    let _: i64 = inv.invoke_async(&mut shared.conn()?).await?;
    Ok(())
}

/// (name, open connections) pairs, for users or groups.
type Counts = Vec<(String, u64)>;

/// Users (and groups) per heartbeat script call.
const CHUNK: usize = 500;

/// Refreshes this node's liveness key and every mapping of its users;
/// rewrites its counts; removes counts Redis has for users the node no
/// longer holds (an unregister lost while Redis was away).
pub(crate) async fn heartbeat(shared: &Shared) -> Result<()> {
    let mut conn = shared.conn()?;
    let in_redis: Vec<String> = conn.hkeys(shared.keys.node_conns(&shared.node)).await?;
    let (users, groups): (Counts, Counts) = {
        let local = shared.local();
        (
            local.users.iter().map(|(u, c)| (u.clone(), *c)).collect(),
            local.groups.iter().map(|(g, c)| (g.clone(), *c)).collect(),
        )
    };
    let held: std::collections::HashSet<&str> = users.iter().map(|(u, _)| u.as_str()).collect();
    for stale in in_redis.iter().filter(|u| !held.contains(u.as_str())) {
        let _: () = redis::pipe()
            .hdel(shared.keys.node_conns(&shared.node), stale)
            .hdel(shared.keys.user(stale), &shared.node)
            .query_async(&mut conn)
            .await?;
    }
    let mut user_chunks = users.chunks(CHUNK).peekable();
    let mut group_chunks = groups.chunks(CHUNK);
    loop {
        let us = user_chunks.next().unwrap_or(&[]);
        let gs = group_chunks.next().unwrap_or(&[]);
        let mut inv = scripts::HEARTBEAT.prepare_invoke();
        inv.arg(&shared.keys.prefix)
            .arg(&shared.node)
            .arg(shared.ttl_ms())
            .arg(us.len());
        for (u, c) in us {
            inv.arg(u).arg(*c);
        }
        for (g, c) in gs {
            inv.arg(g).arg(*c);
        }
        let _: i64 = inv.invoke_async(&mut conn).await?;
        if user_chunks.peek().is_none() && gs.len() < CHUNK {
            return Ok(());
        }
    }
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

    /// pgdn-ws's `heartbeat`: refreshes this node's liveness key and its
    /// users' mappings now (it also runs every heartbeat interval).
    pub async fn heartbeat(&self) -> Result<()> {
        heartbeat(&self.shared).await
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
            self.shared.registration_lost();
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
        let mut nodes: Vec<String> = scripts::NODES_OF
            .prepare_invoke()
            .arg(&self.shared.keys.prefix)
            .arg(user_id)
            .invoke_async(&mut self.shared.conn()?)
            .await
            .map_err(crate::Error::from)?;
        nodes.sort();
        Ok(nodes)
    }

    async fn cluster_stats(&self) -> pgdn_core::Result<Option<ClusterStats>> {
        Ok(Some(cluster_stats(&self.shared).await?))
    }
}

async fn cluster_stats(shared: &Shared) -> Result<ClusterStats> {
    let keys = &shared.keys;
    let mut conn = shared.conn()?;
    let known: Vec<String> = conn.smembers(keys.nodes()).await?;
    let mut alive_pipe = redis::pipe();
    for n in &known {
        alive_pipe.exists(keys.alive(n));
    }
    let alive: Vec<bool> = alive_pipe.query_async(&mut conn).await?;
    let nodes: Vec<String> = known
        .into_iter()
        .zip(alive)
        .filter_map(|(n, a)| a.then_some(n))
        .collect();
    let mut pipe = redis::pipe();
    for n in &nodes {
        pipe.hgetall(keys.node_conns(n)).hkeys(keys.node_groups(n));
    }
    let replies: Vec<(Counts, Vec<String>)> = if nodes.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut conn).await?
    };
    let mut users = BTreeSet::new();
    let mut groups = BTreeSet::new();
    let mut total_connections = 0usize;
    for (conns, gs) in replies {
        for (u, c) in conns {
            total_connections += c as usize;
            users.insert(u);
        }
        groups.extend(gs);
    }
    let mut nodes = nodes;
    nodes.sort();
    Ok(ClusterStats::new(
        nodes,
        total_connections,
        users.into_iter().collect(),
        groups.into_iter().collect(),
    ))
}
