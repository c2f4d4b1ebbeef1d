//! The connection registry: user -> connections and group -> connections.
//!
//! One `std::sync::RwLock` guards all three maps. It is never held across an
//! `.await`: callers pass a closure that only does non-blocking work (queueing
//! a frame), so a std lock is right here and cheaper than an async one.
//! Removing a connection removes emptied user and group entries with it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::connection::Connection;

#[derive(Debug, Default)]
struct Inner {
    conns: HashMap<u64, Connection>,
    users: HashMap<Arc<str>, Vec<u64>>,
    groups: HashMap<Arc<str>, HashSet<u64>>,
}

/// Who is connected to this node.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    /// How often every user or group was listed ([`Registry::users`],
    /// [`Registry::groups`]): tests check that `/metrics` never does.
    #[cfg(test)]
    pub(crate) listings: std::sync::atomic::AtomicUsize,
}

impl Registry {
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection under its user and groups.
    pub fn insert(&self, conn: Connection) {
        let id = conn.id();
        let identity = conn.identity();
        let mut inner = self.write();
        inner
            .users
            .entry(identity.user_id.clone())
            .or_default()
            .push(id);
        for g in &identity.groups {
            inner.groups.entry(g.clone()).or_default().insert(id);
        }
        inner.conns.insert(id, conn);
    }

    /// Gives a registered connection a new identity of the same user (an
    /// in-band token refresh): its group memberships move in one step, so
    /// a group publish sees either the old groups or the new ones.
    /// Returns the identity it replaced, `None` when the connection is not
    /// registered.
    pub fn update_identity(
        &self,
        conn: &Connection,
        identity: crate::Identity,
    ) -> Option<crate::Identity> {
        let id = conn.id();
        let mut inner = self.write();
        if !inner.conns.contains_key(&id) {
            return None;
        }
        let old = conn.set_identity(identity.clone());
        for g in &old.groups {
            if let Some(ids) = inner.groups.get_mut(g) {
                ids.remove(&id);
                if ids.is_empty() {
                    inner.groups.remove(g);
                }
            }
        }
        for g in &identity.groups {
            inner.groups.entry(g.clone()).or_default().insert(id);
        }
        Some(old)
    }

    /// Removes a connection; emptied user and group entries go with it.
    /// Returns the connection if it was registered.
    pub fn remove(&self, id: u64) -> Option<Connection> {
        let mut inner = self.write();
        let conn = inner.conns.remove(&id)?;
        let identity = conn.identity();
        if let Some(ids) = inner.users.get_mut(&identity.user_id) {
            ids.retain(|c| *c != id);
            if ids.is_empty() {
                inner.users.remove(&identity.user_id);
            }
        }
        for g in &identity.groups {
            if let Some(ids) = inner.groups.get_mut(g) {
                ids.remove(&id);
                if ids.is_empty() {
                    inner.groups.remove(g);
                }
            }
        }
        Some(conn)
    }

    /// Calls `f` for each connection of `user_id`.
    pub fn for_user(&self, user_id: &str, mut f: impl FnMut(&Connection)) {
        let inner = self.read();
        if let Some(ids) = inner.users.get(user_id) {
            for id in ids {
                if let Some(c) = inner.conns.get(id) {
                    f(c);
                }
            }
        }
    }

    /// Calls `f` for each connection whose identity lists `group`.
    pub fn for_group(&self, group: &str, mut f: impl FnMut(&Connection)) {
        let inner = self.read();
        if let Some(ids) = inner.groups.get(group) {
            for id in ids {
                if let Some(c) = inner.conns.get(id) {
                    f(c);
                }
            }
        }
    }

    /// Calls `f` for every connection whose user is not in `exclude_users`.
    pub fn for_all_except(&self, exclude_users: &[Arc<str>], mut f: impl FnMut(&Connection)) {
        let inner = self.read();
        if exclude_users.is_empty() {
            inner.conns.values().for_each(f);
            return;
        }
        let excluded: HashSet<&str> = exclude_users.iter().map(|u| &**u).collect();
        for c in inner.conns.values() {
            if !excluded.contains(c.user_id()) {
                f(c);
            }
        }
    }

    /// The connections of `user_id`.
    pub fn connections_of(&self, user_id: &str) -> Vec<Connection> {
        let mut out = Vec::new();
        self.for_user(user_id, |c| out.push(c.clone()));
        out
    }

    /// Every connection.
    pub fn all(&self) -> Vec<Connection> {
        self.read().conns.values().cloned().collect()
    }

    /// Number of connected users.
    pub fn user_count(&self) -> usize {
        self.read().users.len()
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.read().conns.len()
    }

    /// Whether `user_id` has at least one connection here.
    pub fn is_connected(&self, user_id: &str) -> bool {
        self.read().users.contains_key(user_id)
    }

    /// Connected user ids, sorted.
    pub fn users(&self) -> Vec<String> {
        #[cfg(test)]
        self.listings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut v: Vec<String> = self.read().users.keys().map(|u| u.to_string()).collect();
        v.sort();
        v
    }

    /// Groups with at least one connection, sorted.
    pub fn groups(&self) -> Vec<String> {
        #[cfg(test)]
        self.listings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut v: Vec<String> = self.read().groups.keys().map(|g| g.to_string()).collect();
        v.sort();
        v
    }

    /// Number of distinct groups with at least one connection.
    pub fn group_count(&self) -> usize {
        self.read().groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{QueueLimits, channel};
    use crate::identity::Identity;

    fn conn(id: u64, user: &str, groups: &[&str]) -> Connection {
        channel(
            id,
            format!("n-{id}").into(),
            Identity::new(user, groups.iter().copied()),
            QueueLimits::default(),
        )
        .0
    }

    #[test]
    fn tabs_groups_and_cleanup() {
        let r = Registry::default();
        r.insert(conn(1, "u1", &["a"]));
        r.insert(conn(2, "u1", &["a", "b"]));
        r.insert(conn(3, "u2", &["b"]));
        assert_eq!(r.user_count(), 2);
        assert_eq!(r.connection_count(), 3);
        assert_eq!(r.connections_of("u1").len(), 2);
        let mut in_b = Vec::new();
        r.for_group("b", |c| in_b.push(c.id()));
        in_b.sort();
        assert_eq!(in_b, vec![2, 3]);
        let mut all_but_u1 = Vec::new();
        r.for_all_except(&["u1".into()], |c| all_but_u1.push(c.id()));
        assert_eq!(all_but_u1, vec![3]);
        assert_eq!(r.groups(), vec!["a", "b"]);

        for id in [1, 2, 3] {
            assert!(r.remove(id).is_some());
        }
        assert!(r.remove(1).is_none());
        assert_eq!(r.user_count(), 0);
        assert_eq!(r.connection_count(), 0);
        assert_eq!(r.group_count(), 0, "no empty group entries left behind");
        assert!(r.users().is_empty());
    }
}
