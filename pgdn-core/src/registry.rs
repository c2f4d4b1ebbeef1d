//! The connection registry, sharded by user, and the turns that let
//! messages fan out through it in parallel without ever overtaking one
//! another.
//!
//! # Shards
//!
//! Connections live in 64 shards, chosen by a hash of the user id,
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
//! # Turns, and serving each other's
//!
//! Per-connection order must be the order the hub's sequencer chose (a
//! client that resumes relies on it), yet several publishers fan out at
//! once. So each shard has an *inbox*: the sequencer, under its own lock,
//! appends the message (a job) to the inbox of every shard it visits
//! (`Registry::enqueue`; a short lock per shard, never held while
//! writing). The fan-out then visits those shards in ascending order
//! (`Registry::fan_out`): in each it takes the shard's lock and serves
//! *every* job waiting in the inbox, its own and any earlier or later
//! ones, in inbox order. A job already taken by another thread was served
//! under the same lock, so once the lock is taken it is done.
//!
//! The hub serves a broadcast's or a group's turns a few shards at a time
//! and lets its thread run other tasks in between
//! (`Delivery::deliver_async`); a shard it has not reached yet may be
//! served, its job included, by a later message that gets there first.
//!
//! No publisher ever waits for another's turn: whoever reaches a shard
//! first does the work there. A user-targeted message that arrives while
//! a broadcast is on its way serves the broadcast's share of its own
//! shard (a few hundred writes) and then itself, instead of waiting for
//! the broadcast to reach that shard. Two messages never overtake each
//! other within a shard, hence within a connection. Consecutive
//! broadcasts waiting in one inbox are written to each connection
//! together (8 at most), one write for several frames, which is
//! what keeps back-to-back broadcasts cheap.
//!
//! Group counts are kept in one small map (group -> connections) updated
//! on connect and disconnect, so that `/metrics` and the stats never walk
//! every user or group.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::connection::Connection;
use crate::target::Target;

/// How many shards the registry has. 64 keeps a shard's share of a
/// 20,000-connection node near 300 (a few dozen microseconds of
/// queueing) while costing a few kilobytes in all.
pub(crate) const SHARDS: usize = 64;

/// The most consecutive broadcasts written to a connection together.
pub(crate) const BATCH: usize = 8;

/// One frame for a connection: the message's sequence number and its
/// serialized frame.
pub(crate) type Item<'a> = (u64, &'a Bytes);

/// One shard's connections.
#[derive(Debug, Default)]
struct ShardState {
    /// Every connection in this shard, densely, for broadcasts (one
    /// pointer per connection to walk, rather than a map's buckets).
    conns: Vec<Connection>,
    /// Each user's connections in this shard (foldhash: a user-targeted
    /// message looks its user up here, under the shard's lock).
    users: foldhash::HashMap<Arc<str>, Vec<Connection>>,
    /// Each group's connections in this shard.
    groups: foldhash::HashMap<Arc<str>, Vec<Connection>>,
}

/// The messages sequenced for a shard and not served there yet.
#[derive(Debug, Default)]
struct Inbox {
    /// The turn the next job will hold.
    next: u64,
    /// Waiting jobs with their turns, in sequence order.
    jobs: VecDeque<(u64, Arc<Job>)>,
}

/// A shard: its connections and its inbox.
#[derive(Debug, Default)]
struct Shard {
    /// Held while a job is served here (writes included), and for
    /// connects and disconnects.
    state: Mutex<ShardState>,
    /// Held only to append or take jobs: the sequencer never waits for a
    /// shard that is busy writing.
    inbox: Mutex<Inbox>,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardState> {
        // Every update is a push or a remove plus counters: a panic while
        // holding the lock cannot leave the maps inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A message on its way through the shards.
#[derive(Debug)]
pub(crate) struct Job {
    plan: Plan,
    seq: u64,
    frame: Bytes,
    /// Connections that took it so far, over every shard.
    delivered: AtomicUsize,
}

impl Job {
    /// Message `seq`, serialized as `frame`, for the connections `plan`
    /// names.
    pub(crate) fn new(plan: Plan, seq: u64, frame: Bytes) -> Arc<Job> {
        Arc::new(Job {
            plan,
            seq,
            frame,
            delivered: AtomicUsize::new(0),
        })
    }

    /// Connections that took it. Complete once [`Registry::fan_out`] has
    /// returned.
    pub(crate) fn delivered(&self) -> usize {
        self.delivered.load(Ordering::Acquire)
    }

    fn plain_broadcast(&self) -> bool {
        matches!(&self.plan, Plan::Broadcast(Exclude::Few(v)) if v.is_empty())
    }

    /// Whether it is user-targeted: its frames may be written at once.
    fn to_users(&self) -> bool {
        matches!(self.plan, Plan::User(..) | Plan::Users(_))
    }
}

/// Who is connected to this node.
#[derive(Debug)]
pub struct Registry {
    shards: Box<[Shard]>,
    /// Picks a user's shard; randomly seeded, so that nobody can choose
    /// user ids that all land in one shard.
    hasher: foldhash::fast::RandomState,
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

impl Turns {
    /// How many shards the message visits.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it visits none (any more).
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The turns in shards `from..`, taken out of these (which keep the
    /// earlier ones): the part of a fan-out left for later.
    pub(crate) fn split_off(&mut self, from: usize) -> Turns {
        Turns(self.0.split_off(from.min(self.0.len())))
    }
}

/// The shards `plan` visits, ascending.
fn shards_of(plan: &Plan) -> Vec<usize> {
    match plan {
        Plan::User(s, _) => vec![*s],
        Plan::Users(v) => {
            let mut shards: Vec<usize> = v.iter().map(|(s, _)| *s).collect();
            shards.dedup();
            shards
        }
        Plan::Group(_) | Plan::Broadcast(_) => (0..SHARDS).collect(),
    }
}

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

    /// Puts `job` in the inbox of every shard it visits. The hub's
    /// sequencer calls this under its lock, so jobs wait in sequence order
    /// in every inbox. They must then be served with
    /// [`Registry::fan_out`], without an `.await` in between.
    pub(crate) fn enqueue(&self, job: &Arc<Job>) -> Turns {
        Turns(
            shards_of(&job.plan)
                .into_iter()
                .map(|s| {
                    let mut inbox = self.shards[s].inbox();
                    let turn = inbox.next;
                    inbox.next += 1;
                    inbox.jobs.push_back((turn, job.clone()));
                    (s, turn)
                })
                .collect(),
        )
    }

    /// Serves `turns`: in each shard, under its lock, serves every job
    /// waiting there, in order, unless another thread already served the
    /// one of `turns`. `f` is given a connection and the frames for it
    /// (several consecutive broadcasts at once) and returns how many it
    /// took, a prefix; its third argument says whether the frames may be
    /// written at once (user-targeted) or should be queued (broadcasts and
    /// groups). When it returns, the job of `turns` has been served
    /// in every shard it visits.
    ///
    /// A panic in `f` loses the jobs being served in that shard (for that
    /// shard only); no later job waits for them.
    pub(crate) fn fan_out(
        &self,
        turns: Turns,
        mut f: impl FnMut(&Connection, &[Item<'_>], bool) -> usize,
    ) {
        let mut batch: Vec<Arc<Job>> = Vec::new();
        for (s, turn) in turns.0 {
            let shard = &self.shards[s];
            let state = shard.lock();
            {
                let mut inbox = shard.inbox();
                if inbox.jobs.front().is_none_or(|(t, _)| *t > turn) {
                    // Served by another thread, under this same lock.
                    continue;
                }
                batch.extend(inbox.jobs.drain(..).map(|(_, job)| job));
            }
            serve(s, &state, &batch, &mut f);
            drop(state);
            batch.clear();
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

/// Serves `jobs`, in order, in shard `s`: runs of consecutive plain
/// broadcasts together, every other job on its own.
fn serve(
    s: usize,
    state: &ShardState,
    jobs: &[Arc<Job>],
    f: &mut impl FnMut(&Connection, &[Item<'_>], bool) -> usize,
) {
    let mut i = 0;
    while i < jobs.len() {
        let run = jobs[i..]
            .iter()
            .take(BATCH)
            .take_while(|j| j.plain_broadcast())
            .count();
        if run >= 2 {
            let run = &jobs[i..i + run];
            let items: Vec<Item<'_>> = run.iter().map(|j| (j.seq, &j.frame)).collect();
            let mut took = [0usize; BATCH];
            for c in &state.conns {
                let n = f(c, &items, false);
                for t in &mut took[..n] {
                    *t += 1;
                }
            }
            for (job, n) in run.iter().zip(took) {
                job.delivered.fetch_add(n, Ordering::Release);
            }
            i += run.len();
            continue;
        }
        let users = jobs[i..].iter().take_while(|j| j.to_users()).count();
        if users >= 2 {
            serve_users(s, state, &jobs[i..i + users], f);
            i += users;
            continue;
        }
        let job = &jobs[i];
        let item = [(job.seq, &job.frame)];
        let mut n = 0usize;
        // A few connections: written at once where they can be. Many: queued,
        // for their tasks to write (batching what queues meanwhile).
        let direct = job.to_users();
        let mut each = |c: &Connection| n += f(c, &item, direct);
        match &job.plan {
            Plan::User(..) | Plan::Users(_) => {
                user_connections(s, state, &job.plan).for_each(&mut each)
            }
            Plan::Group(g) => state
                .groups
                .get(g)
                .into_iter()
                .flatten()
                .for_each(&mut each),
            Plan::Broadcast(Exclude::Few(v)) if v.is_empty() => {
                state.conns.iter().for_each(&mut each)
            }
            Plan::Broadcast(exclude) => state
                .conns
                .iter()
                .filter(|c| !exclude.contains(c.user_id()))
                .for_each(&mut each),
        }
        job.delivered.fetch_add(n, Ordering::Release);
        i += 1;
    }
}

/// The connections in shard `s` of the users a user-targeted plan names
/// (none for a group or a broadcast).
fn user_connections<'a>(
    s: usize,
    state: &'a ShardState,
    plan: &'a Plan,
) -> impl Iterator<Item = &'a Connection> + 'a {
    let one = match plan {
        Plan::User(_, u) => Some(u),
        _ => None,
    };
    let many: &[(usize, Arc<str>)] = match plan {
        Plan::Users(v) => {
            let lo = v.partition_point(|(x, _)| *x < s);
            let hi = v.partition_point(|(x, _)| *x <= s);
            &v[lo..hi]
        }
        _ => &[],
    };
    one.into_iter()
        .chain(many.iter().map(|(_, u)| u))
        .filter_map(|u| state.users.get(u))
        .flatten()
}

/// Serves consecutive user-targeted jobs (several messages of a batch
/// publish that met in this shard) per connection rather than per job:
/// each connection is offered its frames of them all at once, in order,
/// so that they go out in one write (up to [`BATCH`] frames per offer).
fn serve_users<'a>(
    s: usize,
    state: &'a ShardState,
    run: &'a [Arc<Job>],
    f: &mut impl FnMut(&Connection, &[Item<'_>], bool) -> usize,
) {
    // Each connection the run reaches, with its frames in job order.
    let mut reached: Vec<(&'a Connection, Vec<(usize, Item<'a>)>)> = Vec::new();
    let mut at: foldhash::HashMap<u64, usize> = Default::default();
    for (k, job) in run.iter().enumerate() {
        let mut add = |c: &'a Connection| {
            let i = *at.entry(c.id()).or_insert_with(|| {
                reached.push((c, Vec::new()));
                reached.len() - 1
            });
            reached[i].1.push((k, (job.seq, &job.frame)));
        };
        user_connections(s, state, &job.plan).for_each(&mut add);
    }
    let mut took = vec![0usize; run.len()];
    let mut items: Vec<Item<'_>> = Vec::with_capacity(BATCH);
    for (c, frames) in &reached {
        for chunk in frames.chunks(BATCH) {
            items.clear();
            items.extend(chunk.iter().map(|(_, item)| *item));
            let n = f(c, &items, true);
            for (k, _) in &chunk[..n] {
                took[*k] += 1;
            }
            if n < chunk.len() {
                // Closed, or cut as a slow consumer: it takes no more.
                break;
            }
        }
    }
    for (job, n) in run.iter().zip(took) {
        job.delivered.fetch_add(n, Ordering::Release);
    }
}

/// Takes connection `id` out of each of `groups` in one shard, dropping
/// emptied entries.
fn remove_from_groups(
    map: &mut foldhash::HashMap<Arc<str>, Vec<Connection>>,
    groups: &[Arc<str>],
    id: u64,
) {
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
        let job = Job::new(r.plan(target), 1, Bytes::from_static(b"m"));
        let turns = r.enqueue(&job);
        let mut got = Vec::new();
        r.fan_out(turns, |c, items, _| {
            got.push(c.id());
            items.len()
        });
        got.sort();
        assert_eq!(job.delivered(), got.len());
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

    fn broadcast(r: &Registry, seq: u64) -> (Arc<Job>, Turns) {
        let job = Job::new(
            r.plan(&Target::broadcast(Vec::<&str>::new())),
            seq,
            Bytes::from(seq.to_string()),
        );
        let turns = r.enqueue(&job);
        (job, turns)
    }

    /// Jobs enqueued in one order reach every connection in that order,
    /// whichever publisher fans out first: the later one serves the
    /// earlier one's share, and consecutive broadcasts go out together.
    #[test]
    fn a_later_publisher_serves_earlier_jobs_first() {
        let r = Registry::default();
        for i in 0..100 {
            r.insert(conn(i, &format!("u{i}"), &[]));
        }
        let (first, first_turns) = broadcast(&r, 1);
        let (second, second_turns) = broadcast(&r, 2);
        let (user, user_turns) = {
            let job = Job::new(r.plan(&Target::user("u7")), 3, Bytes::from_static(b"3"));
            let turns = r.enqueue(&job);
            (job, turns)
        };
        let seen: std::cell::RefCell<HashMap<u64, Vec<u64>>> = Default::default();
        let batches = std::cell::Cell::new(0);
        let record = |c: &Connection, items: &[Item<'_>], _: bool| {
            if items.len() > 1 {
                batches.set(batches.get() + 1);
            }
            seen.borrow_mut()
                .entry(c.id())
                .or_default()
                .extend(items.iter().map(|(s, _)| *s));
            items.len()
        };
        // The user-targeted message fans out first: in its shard it
        // serves both broadcasts (together), then itself.
        r.fan_out(user_turns, record);
        assert_eq!(seen.borrow()[&7], vec![1, 2, 3]);
        assert_eq!(user.delivered(), 1);
        // The second broadcast serves the rest of both; the first finds
        // nothing left to do.
        r.fan_out(second_turns, record);
        r.fan_out(first_turns, record);
        let seen = seen.into_inner();
        assert_eq!(seen.len(), 100);
        for (id, got) in &seen {
            let want: &[u64] = if *id == 7 { &[1, 2, 3] } else { &[1, 2] };
            assert_eq!(got, want, "connection {id}");
        }
        assert_eq!(first.delivered(), 100);
        assert_eq!(second.delivered(), 100);
        assert!(
            batches.get() >= 99,
            "broadcasts waiting together are written together"
        );
    }

    /// Many threads fanning out at once keep one order per connection.
    #[test]
    fn concurrent_fan_outs_keep_the_sequence_order() {
        let r = Arc::new(Registry::default());
        for i in 0..300 {
            r.insert(conn(i, &format!("u{}", i % 50), &[]));
        }
        let seen: Arc<Mutex<HashMap<u64, Vec<u64>>>> = Default::default();
        let sequencer = Arc::new(Mutex::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (r, seen, sequencer) = (r.clone(), seen.clone(), sequencer.clone());
                std::thread::spawn(move || {
                    for k in 0..200 {
                        let target = if (k + t) % 3 == 0 {
                            Target::user(format!("u{}", k % 50))
                        } else {
                            Target::broadcast(Vec::<&str>::new())
                        };
                        let plan = r.plan(&target);
                        let turns = {
                            let mut seq = sequencer.lock().unwrap();
                            *seq += 1;
                            r.enqueue(&Job::new(plan, *seq, Bytes::new()))
                        };
                        r.fan_out(turns, |c, items, _| {
                            let mut seen = seen.lock().unwrap();
                            let got = seen.entry(c.id()).or_default();
                            got.extend(items.iter().map(|(s, _)| *s));
                            items.len()
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 300);
        for got in seen.values() {
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "in sequence order: {got:?}"
            );
        }
    }

    /// A panic while fanning out does not hold up later messages.
    #[test]
    fn a_panic_does_not_block_later_jobs() {
        let r = Arc::new(Registry::default());
        for i in 0..200 {
            r.insert(conn(i, &format!("u{i}"), &[]));
        }
        let (_, turns) = broadcast(&r, 1);
        let r2 = r.clone();
        let panicked = std::thread::spawn(move || {
            r2.fan_out(turns, |_, _, _| panic!("boom"));
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(
            deliver(&r, &Target::broadcast(Vec::<&str>::new())).len(),
            200
        );
    }
}
