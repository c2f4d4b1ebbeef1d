//! The connection registry, sharded by user, and the turns that let
//! messages fan out through it in parallel without ever overtaking one
//! another.
//!
//! # Shards
//!
//! Connections live in [`SHARDS`] shards, chosen by a hash of the user id,
//! so all of one user's tabs are in one shard: a user-targeted message
//! touches one shard, a group or a broadcast every shard. Each shard is a
//! `std::sync::Mutex` over its maps (user -> connections, group ->
//! connections). Connecting, disconnecting and delivering lock one shard
//! at a time, for non-blocking work only (queueing a frame never waits),
//! so a std lock is right here and cheaper than an async one; none is
//! held across an `.await`. A broadcast therefore holds up a connect or a
//! user-targeted message for one shard's worth of queueing at most, not
//! for its whole fan-out (centrifuge's hub shards the same way).
//!
//! # Turns
//!
//! Per-connection order must be the order the hub's sequencer chose (a
//! client that resumes relies on it), yet several publishers fan out at
//! once. So each shard hands out *turns*: the sequencer, under its own
//! lock, takes a turn in every shard a message will visit
//! ([`Registry::take_turns`], a few atomic increments), and the message
//! is queued in a shard only when that shard has served every earlier
//! turn ([`Registry::fan_out`]). Shards are visited in ascending order.
//! Two messages can thus fan out in different shards at the same time
//! (a pipeline), but never overtake each other within a shard, hence
//! within a connection. A waiting publisher waits only for an earlier
//! message that is being queued right now by another thread: turns are
//! taken and served in one synchronous call, never across an `.await`, so
//! the earliest outstanding turn always makes progress.
//!
//! Group counts are kept in one small map (group -> connections) updated
//! on connect and disconnect, so that `/metrics` and the stats never walk
//! every user or group.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::connection::Connection;
use crate::target::Target;

/// How many shards the registry has. 64 keeps a shard's share of a
/// 20,000-connection node near 300 (a few dozen microseconds of
/// queueing) while costing a few kilobytes in all.
pub(crate) const SHARDS: usize = 64;

/// One shard's connections.
#[derive(Debug, Default)]
struct ShardState {
    /// Every connection in this shard, densely, for broadcasts (one
    /// pointer per connection to walk, rather than a map's buckets).
    conns: Vec<Connection>,
    /// Each user's connections in this shard.
    users: HashMap<Arc<str>, Vec<Connection>>,
    /// Each group's connections in this shard.
    groups: HashMap<Arc<str>, Vec<Connection>>,
    /// Turns served so far: the next message to queue here holds turn
    /// `served`.
    served: u64,
}

/// A shard: its state, the turns handed out, and where waiters park.
#[derive(Debug, Default)]
struct Shard {
    state: Mutex<ShardState>,
    /// Turns handed out ([`Registry::take_turns`], under the sequencer's
    /// lock): an atomic, not under `state`, so that the sequencer never
    /// waits for a shard that is busy fanning out.
    issued: AtomicU64,
    /// Wakes publishers waiting for their turn.
    turn: Condvar,
    /// Publishers parked on `turn` right now (changed under `state`): a
    /// turn that ends with none skips the wake-up, a system call.
    waiting: AtomicUsize,
    /// How often a publisher parked here waiting for its turn (tests).
    #[cfg(test)]
    parked: AtomicUsize,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardState> {
        // Every update is a push or a remove plus counters: a panic while
        // holding the lock cannot leave the maps inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the shard once every turn before `turn` has been served.
    fn wait_turn(&self, turn: u64) -> MutexGuard<'_, ShardState> {
        let mut state = self.lock();
        while state.served != turn {
            #[cfg(test)]
            self.parked.fetch_add(1, Ordering::Relaxed);
            self.waiting.fetch_add(1, Ordering::Relaxed);
            state = self.turn.wait(state).unwrap_or_else(|e| e.into_inner());
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        state
    }

    /// Marks `state`'s current turn served and wakes the waiters.
    fn end_turn(&self, mut state: MutexGuard<'_, ShardState>) {
        state.served += 1;
        // Read under the lock: a publisher that is about to wait has
        // counted itself before it released the lock in `wait`.
        let waiting = self.waiting.load(Ordering::Relaxed) > 0;
        drop(state);
        if waiting {
            self.turn.notify_all();
        }
    }
}

/// Who is connected to this node.
#[derive(Debug)]
pub struct Registry {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    connections: AtomicUsize,
    users: AtomicUsize,
    /// Connections per group, over every shard.
    groups: Mutex<HashMap<Arc<str>, usize>>,
    /// How often every user or group was listed ([`Registry::users`],
    /// [`Registry::groups`]): tests check that `/metrics` never does.
    #[cfg(test)]
    pub(crate) listings: AtomicUsize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: Default::default(),
            connections: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            groups: Mutex::new(HashMap::new()),
            #[cfg(test)]
            listings: AtomicUsize::new(0),
        }
    }
}

/// Which shards a message visits, and for a user target which users in
/// each: worked out before the sequencer's lock is taken.
#[derive(Debug)]
pub(crate) enum Plan {
    /// One user, in one shard.
    User(usize, Arc<str>),
    /// Several users, sorted by shard.
    Users(Vec<(usize, Arc<str>)>),
    /// Every shard, and the group to look up in each.
    Group(Arc<str>),
    /// Every shard, every connection except those of these users.
    Broadcast(Exclude),
}

/// The users a broadcast leaves out: a set once there are more than a few.
#[derive(Debug)]
pub(crate) enum Exclude {
    /// A short list, searched.
    Few(Vec<Arc<str>>),
    /// A longer one, hashed.
    Many(HashSet<Arc<str>>),
}

impl Exclude {
    fn contains(&self, user: &str) -> bool {
        match self {
            Exclude::Few(v) => v.iter().any(|u| &**u == user),
            Exclude::Many(s) => s.contains(user),
        }
    }
}

/// The turns a message took, one per shard it visits, in ascending shard
/// order.
#[derive(Debug)]
pub(crate) struct Turns(Vec<(usize, u64)>);

impl Registry {
    fn shard_of(&self, user_id: &str) -> usize {
        (self.hasher.hash_one(user_id) % SHARDS as u64) as usize
    }

    fn groups_map(&self) -> MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_groups(&self, groups: &[Arc<str>], joined: bool) {
        if groups.is_empty() {
            return;
        }
        let mut map = self.groups_map();
        for g in groups {
            if joined {
                *map.entry(g.clone()).or_default() += 1;
            } else if let Some(n) = map.get_mut(g) {
                *n -= 1;
                if *n == 0 {
                    map.remove(g);
                }
            }
        }
    }

    /// Adds a connection under its user and groups.
    pub fn insert(&self, conn: Connection) {
        let identity = conn.identity();
        let shard = &self.shards[self.shard_of(conn.user_id())];
        {
            let mut state = shard.lock();
            for g in &identity.groups {
                state
                    .groups
                    .entry(g.clone())
                    .or_default()
                    .push(conn.clone());
            }
            let tabs = state.users.entry(identity.user_id.clone()).or_default();
            if tabs.is_empty() {
                self.users.fetch_add(1, Ordering::Relaxed);
            }
            tabs.push(conn.clone());
            state.conns.push(conn);
            self.connections.fetch_add(1, Ordering::Relaxed);
        }
        self.count_groups(&identity.groups, true);
    }

    /// Gives a registered connection a new identity of the same user (an
    /// in-band token refresh): its group memberships move in one step
    /// (under its shard's lock), so a group publish sees either the old
    /// groups or the new ones. Returns the identity it replaced, `None`
    /// when the connection is not registered.
    pub fn update_identity(
        &self,
        conn: &Connection,
        identity: crate::Identity,
    ) -> Option<crate::Identity> {
        let shard = &self.shards[self.shard_of(conn.user_id())];
        let old = {
            let mut state = shard.lock();
            let registered = state
                .users
                .get(conn.user_id())
                .is_some_and(|tabs| tabs.iter().any(|c| c.id() == conn.id()));
            if !registered {
                return None;
            }
            let old = conn.set_identity(identity.clone());
            remove_from_groups(&mut state.groups, &old.groups, conn.id());
            for g in &identity.groups {
                state
                    .groups
                    .entry(g.clone())
                    .or_default()
                    .push(conn.clone());
            }
            old
        };
        self.count_groups(&old.groups, false);
        self.count_groups(&identity.groups, true);
        Some(old)
    }

    /// Removes a connection; emptied user and group entries go with it.
    /// Returns whether it was registered.
    pub fn remove(&self, conn: &Connection) -> bool {
        let id = conn.id();
        let shard = &self.shards[self.shard_of(conn.user_id())];
        let groups = {
            let mut state = shard.lock();
            let Some(tabs) = state.users.get_mut(conn.user_id()) else {
                return false;
            };
            let Some(at) = tabs.iter().position(|c| c.id() == id) else {
                return false;
            };
            tabs.swap_remove(at);
            if tabs.is_empty() {
                state.users.remove(conn.user_id());
                self.users.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(at) = state.conns.iter().position(|c| c.same(conn)) {
                state.conns.swap_remove(at);
            }
            // The identity is only replaced under this lock, so these are
            // the groups it was registered under.
            let groups = conn.identity().groups;
            remove_from_groups(&mut state.groups, &groups, id);
            self.connections.fetch_sub(1, Ordering::Relaxed);
            groups
        };
        self.count_groups(&groups, false);
        true
    }

    /// Works out which shards a message to `target` visits. Users are
    /// de-duplicated.
    pub(crate) fn plan(&self, target: &Target) -> Plan {
        match target {
            Target::User(u) => Plan::User(self.shard_of(u), u.clone()),
            Target::Users(us) => {
                let mut v: Vec<(usize, Arc<str>)> =
                    us.iter().map(|u| (self.shard_of(u), u.clone())).collect();
                v.sort_unstable();
                v.dedup();
                Plan::Users(v)
            }
            Target::Group(g) => Plan::Group(g.clone()),
            Target::Broadcast(b) if b.exclude_users.len() > 8 => {
                Plan::Broadcast(Exclude::Many(b.exclude_users.iter().cloned().collect()))
            }
            Target::Broadcast(b) => Plan::Broadcast(Exclude::Few(b.exclude_users.clone())),
        }
    }

    /// Takes a turn in every shard `plan` visits. The hub's sequencer
    /// calls this under its lock, so turns follow the sequence order in
    /// every shard. The turns must then be served with
    /// [`Registry::fan_out`], without an `.await` in between.
    pub(crate) fn take_turns(&self, plan: &Plan) -> Turns {
        let take = |i: usize| (i, self.shards[i].issued.fetch_add(1, Ordering::Relaxed));
        Turns(match plan {
            Plan::User(s, _) => vec![take(*s)],
            Plan::Users(v) => {
                let mut turns: Vec<(usize, u64)> = Vec::new();
                for (s, _) in v {
                    if turns.last().is_none_or(|(last, _)| last != s) {
                        turns.push(take(*s));
                    }
                }
                turns
            }
            Plan::Group(_) | Plan::Broadcast(_) => (0..SHARDS).map(take).collect(),
        })
    }

    /// Serves `turns`: in each shard, once its earlier turns are served,
    /// calls `f` for each connection `plan` names there.
    pub(crate) fn fan_out(&self, plan: &Plan, turns: Turns, mut f: impl FnMut(&Connection)) {
        // Turns not served (a panic in `f`) are served empty on the way
        // out, or every later message would wait for them forever.
        struct Pending<'a> {
            registry: &'a Registry,
            turns: Vec<(usize, u64)>,
            /// The first turn not served yet.
            next: usize,
        }
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                for &(s, turn) in &self.turns[self.next..] {
                    let shard = &self.registry.shards[s];
                    shard.end_turn(shard.wait_turn(turn));
                }
            }
        }
        let mut pending = Pending {
            registry: self,
            turns: turns.0,
            next: 0,
        };
        let mut users = match plan {
            Plan::Users(v) => v.as_slice(),
            _ => &[],
        };
        while let Some(&(s, turn)) = pending.turns.get(pending.next) {
            let shard = &self.shards[s];
            let state = shard.wait_turn(turn);
            match plan {
                Plan::User(_, u) => state.users.get(u).into_iter().flatten().for_each(&mut f),
                Plan::Users(_) => {
                    let here = users.iter().take_while(|(us, _)| *us == s).count();
                    for (_, u) in &users[..here] {
                        state.users.get(u).into_iter().flatten().for_each(&mut f);
                    }
                    users = &users[here..];
                }
                Plan::Group(g) => state.groups.get(g).into_iter().flatten().for_each(&mut f),
                Plan::Broadcast(Exclude::Few(v)) if v.is_empty() => {
                    state.conns.iter().for_each(&mut f)
                }
                Plan::Broadcast(exclude) => state
                    .conns
                    .iter()
                    .filter(|c| !exclude.contains(c.user_id()))
                    .for_each(&mut f),
            }
            pending.next += 1;
            shard.end_turn(state);
        }
    }

    /// Calls `f` for each connection of `user_id`.
    pub fn for_user(&self, user_id: &str, f: impl FnMut(&Connection)) {
        let state = self.shards[self.shard_of(user_id)].lock();
        state.users.get(user_id).into_iter().flatten().for_each(f);
    }

    /// Calls `f` for each connection whose identity lists `group`.
    pub fn for_group(&self, group: &str, mut f: impl FnMut(&Connection)) {
        for shard in self.shards.iter() {
            let state = shard.lock();
            state
                .groups
                .get(group)
                .into_iter()
                .flatten()
                .for_each(&mut f);
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
        let mut out = Vec::with_capacity(self.connection_count());
        for shard in self.shards.iter() {
            out.extend(shard.lock().conns.iter().cloned());
        }
        out
    }

    /// Number of connected users.
    pub fn user_count(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Whether `user_id` has at least one connection here.
    pub fn is_connected(&self, user_id: &str) -> bool {
        self.shards[self.shard_of(user_id)]
            .lock()
            .users
            .contains_key(user_id)
    }

    /// Connected user ids, sorted.
    pub fn users(&self) -> Vec<String> {
        #[cfg(test)]
        self.listings.fetch_add(1, Ordering::Relaxed);
        let mut v: Vec<String> = Vec::with_capacity(self.user_count());
        for shard in self.shards.iter() {
            v.extend(shard.lock().users.keys().map(|u| u.to_string()));
        }
        v.sort();
        v
    }

    /// Groups with at least one connection, sorted.
    pub fn groups(&self) -> Vec<String> {
        #[cfg(test)]
        self.listings.fetch_add(1, Ordering::Relaxed);
        let mut v: Vec<String> = self.groups_map().keys().map(|g| g.to_string()).collect();
        v.sort();
        v
    }

    /// Number of distinct groups with at least one connection.
    pub fn group_count(&self) -> usize {
        self.groups_map().len()
    }
}

/// Takes connection `id` out of each of `groups` in one shard, dropping
/// emptied entries.
fn remove_from_groups(map: &mut HashMap<Arc<str>, Vec<Connection>>, groups: &[Arc<str>], id: u64) {
    for g in groups {
        if let Some(members) = map.get_mut(g) {
            if let Some(at) = members.iter().position(|c| c.id() == id) {
                members.swap_remove(at);
            }
            if members.is_empty() {
                map.remove(g);
            }
        }
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

    fn deliver(r: &Registry, target: &Target) -> Vec<u64> {
        let plan = r.plan(target);
        let turns = r.take_turns(&plan);
        let mut got = Vec::new();
        r.fan_out(&plan, turns, |c| got.push(c.id()));
        got.sort();
        got
    }

    #[test]
    fn tabs_groups_and_cleanup() {
        let r = Registry::default();
        let conns = [
            conn(1, "u1", &["a"]),
            conn(2, "u1", &["a", "b"]),
            conn(3, "u2", &["b"]),
        ];
        for c in &conns {
            r.insert(c.clone());
        }
        assert_eq!(r.user_count(), 2);
        assert_eq!(r.connection_count(), 3);
        assert_eq!(r.group_count(), 2);
        assert_eq!(r.connections_of("u1").len(), 2);
        let mut in_b = Vec::new();
        r.for_group("b", |c| in_b.push(c.id()));
        in_b.sort();
        assert_eq!(in_b, vec![2, 3]);
        assert_eq!(deliver(&r, &Target::group("b")), vec![2, 3]);
        assert_eq!(deliver(&r, &Target::broadcast(["u1"])), vec![3]);
        assert_eq!(deliver(&r, &Target::broadcast(["x"])), vec![1, 2, 3]);
        assert_eq!(
            deliver(&r, &Target::users(["u2", "u1", "u2"])),
            vec![1, 2, 3]
        );
        assert_eq!(deliver(&r, &Target::user("u1")), vec![1, 2]);
        assert_eq!(r.groups(), vec!["a", "b"]);

        // A refresh moves connection 2 from a and b to c.
        let old = r
            .update_identity(&conns[1], Identity::new("u1", ["c"]))
            .unwrap();
        assert_eq!(old.groups.len(), 2);
        assert_eq!(deliver(&r, &Target::group("b")), vec![3]);
        assert_eq!(deliver(&r, &Target::group("c")), vec![2]);
        assert_eq!(r.groups(), vec!["a", "b", "c"]);

        for c in &conns {
            assert!(r.remove(c));
        }
        assert!(!r.remove(&conns[0]));
        assert!(
            r.update_identity(&conns[0], Identity::new("u1", ["z"]))
                .is_none()
        );
        assert_eq!(r.user_count(), 0);
        assert_eq!(r.connection_count(), 0);
        assert_eq!(r.group_count(), 0, "no empty group entries left behind");
        assert!(r.users().is_empty());
        assert!(deliver(&r, &Target::broadcast(Vec::<&str>::new())).is_empty());
    }

    /// Turns taken in one order are served in that order in every shard,
    /// whichever thread gets there first.
    #[test]
    fn turns_keep_the_taking_order() {
        let r = Arc::new(Registry::default());
        let c = conn(1, "u1", &[]);
        r.insert(c.clone());
        let order = Arc::new(Mutex::new(Vec::new()));
        let plan = Arc::new(r.plan(&Target::broadcast(Vec::<&str>::new())));
        let first = r.take_turns(&plan);
        let second = r.take_turns(&plan);
        // The second message's fan-out starts first and must wait.
        let late = {
            let (r, plan, order) = (r.clone(), plan.clone(), order.clone());
            std::thread::spawn(move || {
                r.fan_out(&plan, second, |_| order.lock().unwrap().push(2));
            })
        };
        // Wait until the second is parked (at the first shard): it cannot
        // pass while the first message's turn there is not served.
        while r.shards[0].parked.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        assert!(order.lock().unwrap().is_empty());
        r.fan_out(&plan, first, |_| order.lock().unwrap().push(1));
        late.join().unwrap();
        assert_eq!(*order.lock().unwrap(), vec![1, 2]);
    }

    /// A panic while fanning out serves the remaining turns, so later
    /// messages are not stuck behind it.
    #[test]
    fn a_panic_does_not_block_later_turns() {
        let r = Arc::new(Registry::default());
        for i in 0..200 {
            r.insert(conn(i, &format!("u{i}"), &[]));
        }
        let plan = r.plan(&Target::broadcast(Vec::<&str>::new()));
        let turns = r.take_turns(&plan);
        let r2 = r.clone();
        let panicked = std::thread::spawn(move || {
            r2.fan_out(&plan, turns, |_| panic!("boom"));
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(
            deliver(&r, &Target::broadcast(Vec::<&str>::new())).len(),
            200
        );
    }
}
