//! Which node holds which user's connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::identity::Identity;
use crate::lifecycle::{EventKind, LifecycleEvent, LifecycleSink};

/// Whether a user is online, cluster-wide (`GET /api/v1/presence/{user}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UserPresence {
    /// The user.
    pub user: String,
    /// Whether the user has at least one open connection anywhere.
    pub online: bool,
    /// Open connections over every live node.
    pub connections: usize,
    /// When the first of the current connections opened (RFC 3339 UTC);
    /// `None` while offline.
    pub since: Option<String>,
}

impl UserPresence {
    /// The presence of `user` from its connection count and the time its
    /// first current connection opened.
    pub fn new(user: &str, connections: usize, since: Option<SystemTime>) -> Self {
        UserPresence {
            user: user.to_string(),
            online: connections > 0,
            connections,
            since: since
                .filter(|_| connections > 0)
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        }
    }
}

/// One online member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupMember {
    /// The user.
    pub user: String,
    /// Connections of that user that list the group, over every node.
    pub connections: usize,
}

impl GroupMember {
    /// A member with its connection count.
    pub fn new(user: impl Into<String>, connections: usize) -> Self {
        GroupMember {
            user: user.into(),
            connections,
        }
    }
}

/// A page of a group's online members, ordered by user id
/// (`GET /api/v1/groups/{group}/presence`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupPresence {
    /// The group.
    pub group: String,
    /// Online members after the cursor, in user id order.
    pub members: Vec<GroupMember>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<String>,
}

impl GroupPresence {
    /// The page of `members` (user and connections, sorted by user) after
    /// `after`, at most `limit` (at least 1).
    pub fn page(
        group: &str,
        members: impl Iterator<Item = (String, usize)>,
        after: Option<&str>,
        limit: usize,
    ) -> GroupPresence {
        let limit = limit.max(1);
        let mut page: Vec<GroupMember> = members
            .filter(|(u, _)| after.is_none_or(|a| u.as_str() > a))
            .take(limit + 1)
            .map(|(u, n)| GroupMember::new(u, n))
            .collect();
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            page[limit - 1].user.clone()
        });
        GroupPresence {
            group: group.to_string(),
            members: page,
            next,
        }
    }
}

/// Numbers over every live node of a cluster (`GET /api/v1/stats` in
/// cluster mode).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Live nodes, sorted.
    pub nodes: Vec<String>,
    /// Distinct users connected anywhere.
    pub total_users: usize,
    /// Open connections over all live nodes.
    pub total_connections: usize,
    /// Connected user ids, sorted.
    pub users: Vec<String>,
    /// Groups with at least one connection anywhere, sorted.
    pub groups: Vec<String>,
}

impl ClusterStats {
    /// Cluster numbers from their parts; `total_users` is `users.len()`.
    pub fn new(
        nodes: Vec<String>,
        total_connections: usize,
        users: Vec<String>,
        groups: Vec<String>,
    ) -> Self {
        ClusterStats {
            nodes,
            total_users: users.len(),
            total_connections,
            users,
            groups,
        }
    }
}

/// Tracks which nodes hold each user's connections, so that a publish for a
/// user goes only where that user is (pgdn-ws's session tracker).
///
/// Promise: after `register` returns `Ok`, `nodes_of` lists that node for
/// that user until the matching `unregister` (or, for a shared store, until
/// the node stops heart-beating).
#[async_trait]
pub trait SessionTracker: Send + Sync + 'static {
    /// Records that `connection_id` of `identity` is open on `node`.
    async fn register(
        &self,
        node: &str,
        identity: &Identity,
        connection_id: &str,
    ) -> Result<(), Error>;
    /// Forgets `connection_id` of `identity` on `node`.
    async fn unregister(
        &self,
        node: &str,
        identity: &Identity,
        connection_id: &str,
    ) -> Result<(), Error>;
    /// The nodes that hold at least one connection of `user_id`.
    async fn nodes_of(&self, user_id: &str) -> Result<Vec<String>, Error>;
    /// Numbers over every live node; `None` for a single node (the hub's
    /// own stats are then the whole picture). Default `None`.
    async fn cluster_stats(&self) -> Result<Option<ClusterStats>, Error> {
        Ok(None)
    }
    /// Gives the tracker the sink of lifecycle events: a tracker that knows
    /// when a user's first connection anywhere opens and the last one
    /// closes emits `user.online` and, after `debounce` with none back,
    /// `user.offline`, once for the cluster. Called once, when the hub is
    /// built. Default: no events.
    fn attach_lifecycle(&self, sink: Arc<dyn LifecycleSink>, debounce: Duration) {
        let _ = (sink, debounce);
    }
    /// The cluster-wide presence of `users`, in order; `None` when this
    /// tracker sees only this node (the hub then answers from its own
    /// connections). Default `None`.
    async fn presence(&self, users: &[&str]) -> Result<Option<Vec<UserPresence>>, Error> {
        let _ = users;
        Ok(None)
    }
    /// The online members of `group` after user id `after`, at most
    /// `limit`, cluster-wide; `None` as for [`SessionTracker::presence`].
    async fn group_presence(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<GroupPresence>, Error> {
        let _ = (group, after, limit);
        Ok(None)
    }
}

/// The single-process tracker: a map in memory. It emits lifecycle
/// events: `user.online` on a user's first connection, `user.offline`
/// when the last one closed and none came back within the debounce.
#[derive(Debug, Default)]
pub struct MemorySessionTracker {
    /// user -> how many connections it has on each node. Counts, not
    /// connection ids: the hub's registry already knows the connections,
    /// and a second copy would cost every idle connection a few hundred
    /// bytes. The user id is the identity's own `Arc`, the node's name is
    /// shared ([`MemorySessionTracker::node`]).
    users: Mutex<HashMap<Arc<str>, NodeCounts>>,
    /// The node names seen, each kept once.
    nodes: Mutex<Vec<Arc<str>>>,
    lifecycle: OnceLock<Lifecycle>,
}

/// A user's connections on each node: (node, count).
type NodeCounts = Vec<(Arc<str>, u32)>;

/// The lifecycle state of the memory tracker.
struct Lifecycle {
    sink: Arc<dyn LifecycleSink>,
    debounce: Duration,
    /// Users whose last connection closed, not yet announced offline: the
    /// generation of that close (a newer close replaces it).
    pending: Arc<Mutex<HashMap<String, u64>>>,
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("debounce", &self.debounce)
            .finish_non_exhaustive()
    }
}

impl MemorySessionTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of users tracked.
    pub fn user_count(&self) -> usize {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `node`'s shared name.
    fn node(&self, node: &str) -> Arc<str> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = nodes.iter().find(|n| &***n == node) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(node);
        nodes.push(n.clone());
        n
    }
}

#[async_trait]
impl SessionTracker for MemorySessionTracker {
    async fn register(
        &self,
        node: &str,
        identity: &Identity,
        connection_id: &str,
    ) -> Result<(), Error> {
        let _ = connection_id;
        let user_id = &*identity.user_id;
        let node = self.node(node);
        let first = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let nodes = users.entry(identity.user_id.clone()).or_default();
            match nodes.iter_mut().find(|(n, _)| *n == node) {
                Some((_, count)) => *count += 1,
                None => nodes.push((node, 1)),
            }
            nodes.len() == 1 && nodes[0].1 == 1
        };
        if let (true, Some(l)) = (first, self.lifecycle.get()) {
            // Back within the debounce: no offline, no online.
            let was_pending = l
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(user_id)
                .is_some();
            if !was_pending {
                l.sink
                    .emit(LifecycleEvent::new(EventKind::UserOnline, Some(user_id)));
            }
        }
        Ok(())
    }

    async fn unregister(
        &self,
        node: &str,
        identity: &Identity,
        connection_id: &str,
    ) -> Result<(), Error> {
        let _ = connection_id;
        let user_id = &*identity.user_id;
        let last = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let emptied = users.get_mut(user_id).is_some_and(|nodes| {
                if let Some(at) = nodes.iter().position(|(n, _)| &**n == node) {
                    nodes[at].1 -= 1;
                    if nodes[at].1 == 0 {
                        nodes.swap_remove(at);
                    }
                }
                nodes.is_empty()
            });
            if emptied {
                users.remove(user_id);
            }
            emptied
        };
        if let (true, Some(l)) = (last, self.lifecycle.get()) {
            let generation = l
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            l.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(user_id.to_string(), generation);
            let (pending, sink, user) = (l.pending.clone(), l.sink.clone(), user_id.to_string());
            let debounce = l.debounce;
            tokio::spawn(async move {
                tokio::time::sleep(debounce).await;
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                // Still the same close: nobody came back.
                if pending.get(&user) == Some(&generation) {
                    pending.remove(&user);
                    drop(pending);
                    sink.emit(LifecycleEvent::new(EventKind::UserOffline, Some(&user)));
                }
            });
        }
        Ok(())
    }

    fn attach_lifecycle(&self, sink: Arc<dyn LifecycleSink>, debounce: Duration) {
        let _ = self.lifecycle.set(Lifecycle {
            sink,
            debounce,
            pending: Arc::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
    }

    async fn nodes_of(&self, user_id: &str) -> Result<Vec<String>, Error> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut nodes: Vec<String> = users
            .get(user_id)
            .into_iter()
            .flatten()
            .map(|(n, _)| n.to_string())
            .collect();
        nodes.sort();
        Ok(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tracks_and_forgets() {
        let t = MemorySessionTracker::new();
        let u1 = Identity::new("u1", Vec::<&str>::new());
        t.register("n1", &u1, "c1").await.unwrap();
        t.register("n2", &u1, "c2").await.unwrap();
        t.register("n1", &u1, "c3").await.unwrap();
        assert_eq!(t.nodes_of("u1").await.unwrap(), vec!["n1", "n2"]);
        t.unregister("n2", &u1, "c2").await.unwrap();
        assert_eq!(t.nodes_of("u1").await.unwrap(), vec!["n1"]);
        t.unregister("n1", &u1, "c1").await.unwrap();
        t.unregister("n1", &u1, "c3").await.unwrap();
        assert_eq!(t.cluster_stats().await.unwrap(), None);
        assert!(t.nodes_of("u1").await.unwrap().is_empty());
        assert_eq!(t.user_count(), 0);
    }
}
