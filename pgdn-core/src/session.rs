//! Which node holds which user's connections.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::Serialize;

use crate::error::Error;
use crate::identity::Identity;

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
}

/// The single-process tracker: a map in memory.
#[derive(Debug, Default)]
pub struct MemorySessionTracker {
    // user -> (connection id -> node)
    users: Mutex<HashMap<String, HashMap<String, String>>>,
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
}

#[async_trait]
impl SessionTracker for MemorySessionTracker {
    async fn register(
        &self,
        node: &str,
        identity: &Identity,
        connection_id: &str,
    ) -> Result<(), Error> {
        let user_id = &*identity.user_id;
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user_id.to_string())
            .or_default()
            .insert(connection_id.to_string(), node.to_string());
        Ok(())
    }

    async fn unregister(
        &self,
        _node: &str,
        identity: &Identity,
        connection_id: &str,
    ) -> Result<(), Error> {
        let user_id = &*identity.user_id;
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conns) = users.get_mut(user_id) {
            conns.remove(connection_id);
            if conns.is_empty() {
                users.remove(user_id);
            }
        }
        Ok(())
    }

    async fn nodes_of(&self, user_id: &str) -> Result<Vec<String>, Error> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let nodes: BTreeSet<&String> = users
            .get(user_id)
            .into_iter()
            .flat_map(|c| c.values())
            .collect();
        Ok(nodes.into_iter().cloned().collect())
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
