//! The hub: registers connections, routes publishes to them, answers client
//! frames and keeps the numbers (pgdn-ws's NotificationManager and
//! NotificationClient in one cheap-clone handle).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::broker::{Broker, Deliver, Delivery, Envelope, FanOut, LocalBroker, Published};
use crate::connection::{self, Connection, DisconnectReason, Outbox, QueueLimits};
use crate::dedup::{Claim, Dedup};
use crate::error::{Error, Result};
use crate::frame::{ClientFrame, ErrorCode, ErrorFrame, pong_json};
use crate::handler::MessageHandler;
use crate::history::{History, HistoryConfig, HistoryRecord, MemoryHistory, Replay};
use crate::identity::Identity;
use crate::lifecycle::{EventKind, LifecycleEvent, LifecycleSink, NoLifecycleSink};
use crate::message::{MessageType, RESERVED_TYPES};
use crate::registry::{Job, Registry, Turns};
use crate::session::{
    ClusterStats, GroupPresence, MemorySessionTracker, SessionTracker, UserPresence,
};
use crate::target::{PublishReceipt, PublishRequest, Target};

/// Settings of a [`Hub`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// This node's id, part of every connection id. Default: 8 random hex
    /// characters.
    pub node_id: Arc<str>,
    /// Bounds of each connection's outbound queue. Default 1024 frames or
    /// 1 MiB.
    pub queue: QueueLimits,
    /// How long a publisher-chosen id is remembered. Default 5 minutes.
    pub dedup_window: Duration,
    /// Most publisher-chosen ids remembered at once. Default 1,000,000.
    pub dedup_capacity: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        let uuid = uuid::Uuid::now_v7().simple().to_string();
        HubConfig {
            node_id: Arc::from(&uuid[uuid.len() - 8..]),
            queue: QueueLimits::default(),
            dedup_window: Duration::from_secs(300),
            dedup_capacity: 1_000_000,
        }
    }
}

/// Builds a [`Hub`] with its broker and session tracker.
pub struct HubBuilder {
    config: HubConfig,
    broker: Arc<dyn Broker>,
    sessions: Arc<dyn SessionTracker>,
    history: Option<Arc<dyn History>>,
    history_config: HistoryConfig,
    lifecycle: Option<Arc<dyn LifecycleSink>>,
    offline_debounce: Duration,
}

impl Default for HubBuilder {
    fn default() -> Self {
        HubBuilder {
            config: HubConfig::default(),
            broker: Arc::new(LocalBroker::new()),
            sessions: Arc::new(MemorySessionTracker::new()),
            history: None,
            history_config: HistoryConfig::default(),
            lifecycle: None,
            offline_debounce: Duration::from_secs(5),
        }
    }
}

impl HubBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: HubConfig) -> Self {
        self.config = config;
        self
    }
    /// Sets the node id.
    pub fn node_id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.config.node_id = id.into();
        self
    }
    /// Sets the per-connection outbound queue bounds.
    pub fn queue_limits(mut self, limits: QueueLimits) -> Self {
        self.config.queue = limits;
        self
    }
    /// Sets the de-duplication window for publisher-chosen ids.
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.config.dedup_window = window;
        self
    }
    /// Sets the broker (default: [`LocalBroker`], single node).
    pub fn broker(mut self, broker: Arc<dyn Broker>) -> Self {
        self.broker = broker;
        self
    }
    /// Sets the session tracker (default: [`MemorySessionTracker`]).
    pub fn session_tracker(mut self, sessions: Arc<dyn SessionTracker>) -> Self {
        self.sessions = sessions;
        self
    }

    /// Sets the history kept for resume (default: a [`MemoryHistory`] with
    /// the bounds of [`HubBuilder::history_config`]).
    pub fn history(mut self, history: Arc<dyn History>) -> Self {
        self.history = Some(history);
        self
    }
    /// Sets the bounds of the default in-memory history (100 messages and
    /// 10 minutes per user, at most 100,000 users and 256 MiB in all).
    pub fn history_config(mut self, config: HistoryConfig) -> Self {
        self.history_config = config;
        self
    }

    /// Sets where lifecycle events go (`user.online`, `user.offline`,
    /// `notification.undelivered`; the server's webhooks). Default: nowhere.
    pub fn lifecycle_sink(mut self, sink: Arc<dyn LifecycleSink>) -> Self {
        self.lifecycle = Some(sink);
        self
    }
    /// How long a user whose last connection closed must stay away before
    /// `user.offline` (so a page reload or a reconnect is not an
    /// offline/online pair). Default 5 s.
    pub fn offline_debounce(mut self, debounce: Duration) -> Self {
        self.offline_debounce = debounce;
        self
    }
    /// Builds the hub and starts the broker with its [`Delivery`].
    pub fn build(self) -> Hub {
        // Only with a sink: a cluster's tracker then does the bookkeeping.
        if let Some(sink) = &self.lifecycle {
            self.sessions
                .attach_lifecycle(sink.clone(), self.offline_debounce);
        }
        let (connections, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            dedup: Dedup::new(self.config.dedup_window, self.config.dedup_capacity),
            config: self.config,
            registry: Registry::default(),
            handlers: RwLock::new(HashMap::new()),
            broker: self.broker,
            sessions: self.sessions,
            history: self
                .history
                .unwrap_or_else(|| Arc::new(MemoryHistory::new(self.history_config))),
            sequencer: Mutex::new(0),
            next_connection: AtomicU64::new(1),
            counters: Counters::default(),
            connections,
            started: Instant::now(),
            clock: Default::default(),
            lifecycle: self.lifecycle.unwrap_or_else(|| Arc::new(NoLifecycleSink)),
        });
        let node: Weak<dyn Deliver> = Arc::downgrade(&inner) as Weak<dyn Deliver>;
        inner.broker.start(Delivery::new(node));
        Hub { inner }
    }
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    deliveries: AtomicU64,
    duplicates: AtomicU64,
    connections_opened: AtomicU64,
    frames_received: AtomicU64,
    dropped_invalid: AtomicU64,
    disconnects: [AtomicU64; REASONS.len()],
    /// Messages the broker handed in ([`Deliver::deliver`]), by target
    /// kind ([`TARGET_KINDS`]).
    received: [AtomicU64; 3],
}

/// The target kinds messages are counted by.
const TARGET_KINDS: [&str; 3] = ["user", "group", "broadcast"];

fn target_kind(t: &Target) -> usize {
    match t {
        Target::User(_) | Target::Users(_) => 0,
        Target::Group(_) => 1,
        Target::Broadcast(_) => 2,
    }
}

const REASONS: [DisconnectReason; 11] = [
    DisconnectReason::ClientClosed,
    DisconnectReason::SlowConsumer,
    DisconnectReason::FrameTooLarge,
    DisconnectReason::RateLimited,
    DisconnectReason::ServerShutdown,
    DisconnectReason::Kicked,
    DisconnectReason::TransportError,
    DisconnectReason::IdleTimeout,
    DisconnectReason::TokenExpired,
    DisconnectReason::ProtocolError,
    DisconnectReason::InvalidUtf8,
];

/// Where a reason is counted: its place in [`REASONS`].
fn reason_index(r: DisconnectReason) -> usize {
    REASONS
        .iter()
        .position(|x| *x == r)
        .expect("every reason is listed in REASONS")
}

struct Inner {
    config: HubConfig,
    registry: Registry,
    handlers: RwLock<HashMap<String, Arc<dyn MessageHandler>>>,
    broker: Arc<dyn Broker>,
    sessions: Arc<dyn SessionTracker>,
    history: Arc<dyn History>,
    /// Where lifecycle events go ([`HubBuilder::lifecycle_sink`]).
    lifecycle: Arc<dyn LifecycleSink>,
    /// The sequencer: the last delivery sequence number. Held while a
    /// message is numbered, recorded in the history and put in the inboxes
    /// of the registry's shards ([`Registry::enqueue`]), so that every
    /// queue sees messages in sequence order (the order resume relies on);
    /// released before the fan-out. Never held across an `.await`.
    sequencer: Mutex<u64>,
    dedup: Dedup,
    next_connection: AtomicU64,
    counters: Counters,
    /// The number of open connections, for whoever waits on a change.
    connections: watch::Sender<usize>,
    started: Instant,
    /// When each message was taken, for the publish-to-write latency.
    clock: crate::latency::DeliveryClock,
}

impl Deliver for Inner {
    /// The one delivery path, for every broker: the sequencer numbers the
    /// message, records it and puts it in the registry's shards' inboxes
    /// under its lock; the fan-out then runs outside it, shard by shard,
    /// in parallel with other messages' but never ahead of them, serving
    /// whatever waits in each shard ([`Registry::fan_out`]).
    fn deliver(&self, envelope: &Envelope) -> usize {
        let (job, turns) = self.sequence(envelope);
        self.serve(turns);
        self.finish(&job)
    }

    /// The same fan-out in steps of [`FAN_OUT_STEP`] shards, so that a
    /// broadcast to every connection does not hold its thread for the
    /// whole of it: between steps, [`Delivery::deliver_async`] lets the
    /// runtime run what waits (a new connection's upgrade, a publish
    /// request). Order is kept as in [`deliver`](Deliver::deliver): a
    /// shard this fan-out has not reached yet is served, its job
    /// included, by whichever message reaches it first.
    fn deliver_stepwise(self: Arc<Self>, envelope: &Envelope) -> FanOut {
        let (job, mut turns) = self.sequence(envelope);
        if turns.len() <= FAN_OUT_STEP {
            self.serve(turns);
            return FanOut::done(self.finish(&job));
        }
        FanOut::steps(move || {
            let rest = turns.split_off(FAN_OUT_STEP);
            self.serve(std::mem::replace(&mut turns, rest));
            turns.is_empty().then(|| self.finish(&job))
        })
    }

    /// Every envelope is sequenced first, then their turns are served in
    /// order: serving a shard serves every job waiting there
    /// (`Registry::fan_out`), so the messages of the batch for one
    /// connection reach it together, in one write when they fit.
    fn deliver_many(&self, envelopes: &[Envelope]) -> Vec<usize> {
        let (jobs, turns): (Vec<_>, Vec<_>) = envelopes.iter().map(|e| self.sequence(e)).unzip();
        for turns in turns {
            self.serve(turns);
        }
        jobs.iter().map(|job| self.finish(job)).collect()
    }

    /// Logged the 1st, 2nd, 4th, 8th... time, so that a flood does not
    /// flood the log.
    fn drop_invalid(&self, why: &dyn std::fmt::Display) {
        let n = 1 + self
            .counters
            .dropped_invalid
            .fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(
                dropped = n,
                "dropping an invalid message from the broker: {why}"
            );
        }
    }
}

/// Shards a stepwise fan-out serves before it lets its thread do other
/// work ([`Deliver::deliver_stepwise`]): 8 of the 64, about an eighth of
/// the node's connections (a millisecond or less at 20,000).
const FAN_OUT_STEP: usize = 8;

impl Inner {
    /// Numbers `envelope`, records it and puts it in the inboxes of the
    /// shards it visits, under the sequencer's lock.
    fn sequence(&self, envelope: &Envelope) -> (Arc<Job>, Turns) {
        self.counters.received[target_kind(&envelope.target)].fetch_add(1, Ordering::Relaxed);
        let taken = Instant::now();
        let plan = self.registry.plan(&envelope.target);
        // Worked out before the lock, like the plan: under it, only what
        // must follow the sequence order.
        let users = envelope.target.user_recipients();
        {
            let mut last = self.sequencer.lock().unwrap_or_else(|e| e.into_inner());
            // A broker's cluster-wide number when there is one, else this node's.
            let seq = envelope.seq.unwrap_or(*last + 1);
            *last = seq;
            self.clock.stamp(seq, taken);
            self.history.record(&HistoryRecord {
                seq,
                id: &envelope.id,
                users: &users,
                frame: &envelope.frame,
            });
            let job = Job::new(plan, seq, envelope.frame.clone());
            let turns = self.registry.enqueue(&job);
            (job, turns)
        }
    }

    /// Serves `turns`, some or all of a message's fan-out. This thread may
    /// also serve other messages waiting in the shards it visits
    /// (`Registry::fan_out`): `items` can be theirs.
    fn serve(&self, turns: Turns) {
        self.registry.fan_out(turns, |c, items, direct| {
            let offered = c.offer_many(items, direct);
            if offered.written {
                for (seq, _) in items {
                    self.clock.written(*seq);
                }
            } else if offered.full {
                // The session logs the cut (with the client's address)
                // once it ends; this is the detail of why.
                tracing::debug!(
                    connection = c.wire_id(),
                    user = c.user_id(),
                    "outbound queue full: disconnecting slow consumer"
                );
            }
            offered.took
        });
    }

    /// How many connections took `job`, once every shard it visits was
    /// served; counted in the stats.
    fn finish(&self, job: &Job) -> usize {
        let delivered = job.delivered();
        self.counters
            .deliveries
            .fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }
}

/// A claimed publisher-chosen id: released when dropped unless the publish
/// completed (what makes [`Hub::publish`] cancel-safe).
struct ClaimGuard<'a> {
    dedup: &'a Dedup,
    id: Option<crate::message::MessageId>,
}

impl ClaimGuard<'_> {
    fn complete(mut self, delivered: Option<usize>) {
        if let Some(id) = self.id.take() {
            self.dedup.complete(&id, delivered);
        }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.dedup.release(&id);
        }
    }
}

/// Numbers about this node (`GET /api/v1/stats`): pgdn-ws's `total_users`,
/// `total_connections`, `groups` and `users`, and counters since start.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Users with at least one open connection.
    pub total_users: usize,
    /// Open connections.
    pub total_connections: usize,
    /// Groups with at least one open connection, sorted.
    pub groups: Vec<String>,
    /// Connected user ids, sorted.
    pub users: Vec<String>,
    /// Number of entries in `groups`.
    pub total_groups: usize,
    /// This node's id.
    pub node_id: String,
    /// Publishes accepted since start (duplicates not counted).
    pub messages_published: u64,
    /// Frames queued to connections since start.
    pub messages_delivered: u64,
    /// Publishes with an already-seen id, not delivered again.
    pub duplicates_suppressed: u64,
    /// Connections accepted since start.
    pub connections_opened: u64,
    /// Client frames received since start.
    pub frames_received: u64,
    /// Messages from other nodes dropped since start because they were not
    /// valid (not UTF-8, not a notification frame; see [`Deliver::drop_invalid`]).
    pub messages_dropped_invalid: u64,
    /// Connections closed since start, by reason (`slow_consumer`, ...).
    pub disconnects: BTreeMap<&'static str, u64>,
    /// Messages the broker brought to this node since start, by target
    /// kind (`user`, `group`, `broadcast`): on a single node every publish
    /// (the [`LocalBroker`] delivers through the same path); with a Redis
    /// broker, from any node, only the messages for the users and groups
    /// this node holds.
    pub messages_received: BTreeMap<&'static str, u64>,
    /// Seconds since the hub was built.
    pub uptime_seconds: u64,
}

/// The hub: a cheap-clone handle over shared state.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// A handle that does not keep the hub alive (e.g. for a task that must
/// not outlive it). Brokers hold a [`Delivery`] instead.
#[derive(Clone)]
pub struct WeakHub(Weak<Inner>);

impl WeakHub {
    /// The hub, if it still exists.
    pub fn upgrade(&self) -> Option<Hub> {
        self.0.upgrade().map(|inner| Hub { inner })
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("node_id", &self.inner.config.node_id)
            .finish_non_exhaustive()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// A single-node hub with default settings.
    pub fn new() -> Self {
        HubBuilder::default().build()
    }

    /// A builder to set the broker, session tracker and limits.
    pub fn builder() -> HubBuilder {
        HubBuilder::default()
    }

    /// Whether the hub's broker can deliver what it accepts now
    /// ([`Broker::readiness`]); `Err` says why not.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        self.inner.broker.readiness()
    }

    /// A handle that does not keep the hub alive.
    pub fn downgrade(&self) -> WeakHub {
        WeakHub(Arc::downgrade(&self.inner))
    }

    /// Where this hub sends lifecycle events
    /// ([`HubBuilder::lifecycle_sink`]); `emit` on it never blocks.
    pub fn lifecycle(&self) -> &Arc<dyn LifecycleSink> {
        &self.inner.lifecycle
    }

    /// The hub's settings.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    // ----- connections -----

    /// Registers a connection for `identity`. The transport drains the
    /// returned [`Outbox`] and must call [`Hub::disconnect`] when it ends.
    /// Refuses an identity without a user id.
    pub async fn connect(&self, identity: Identity) -> Result<(Connection, Outbox)> {
        if !identity.is_valid() {
            return Err(Error::InvalidIdentity);
        }
        let n = self.inner.next_connection.fetch_add(1, Ordering::Relaxed);
        let wire_id: Arc<str> = format!("{}-{n}", self.inner.config.node_id).into();
        let (conn, outbox) = connection::channel(n, wire_id, identity, self.inner.config.queue);
        self.inner.registry.insert(conn.clone());
        self.inner
            .counters
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        self.publish_connection_count();
        if let Err(e) = self
            .inner
            .sessions
            .register(self.node_id(), &conn.identity(), conn.wire_id())
            .await
        {
            // The connection still works on this node; other nodes may not
            // route its user's messages here until the next heartbeat.
            tracing::warn!(error = %e, "session tracker failed to register a connection");
        }
        Ok((conn, outbox))
    }

    /// Unregisters a connection that ended for `reason`. Idempotent.
    pub async fn disconnect(&self, conn: &Connection, reason: DisconnectReason) {
        conn.close(reason);
        if !self.inner.registry.remove(conn) {
            return;
        }
        self.inner.counters.disconnects[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
        self.publish_connection_count();
        if let Err(e) = self
            .inner
            .sessions
            .unregister(self.node_id(), &conn.identity(), conn.wire_id())
            .await
        {
            tracing::warn!(error = %e, "session tracker failed to unregister a connection");
        }
    }

    fn publish_connection_count(&self) {
        let n = self.inner.registry.connection_count();
        self.inner.connections.send_replace(n);
    }

    /// Watches the number of open connections on this node, e.g. to wait
    /// until every client has left.
    pub fn watch_connections(&self) -> watch::Receiver<usize> {
        self.inner.connections.subscribe()
    }

    /// Closes every connection of `user_id` with 1008; returns how many.
    pub fn disconnect_user(&self, user_id: &str) -> usize {
        let conns = self.inner.registry.connections_of(user_id);
        conns
            .iter()
            .filter(|c| c.close(DisconnectReason::Kicked))
            .count()
    }

    /// Asks every connection to close for `reason` (queued frames are
    /// written first). Returns how many were asked.
    pub fn close_all(&self, reason: DisconnectReason) -> usize {
        let conns = self.inner.registry.all();
        conns.iter().filter(|c| c.close(reason)).count()
    }

    /// Open connections on this node (cheaper than [`Hub::stats`]).
    pub fn connection_count(&self) -> usize {
        self.inner.registry.connection_count()
    }

    /// Whether `user_id` has a connection on this node.
    pub fn is_connected(&self, user_id: &str) -> bool {
        self.inner.registry.is_connected(user_id)
    }

    /// The open connections of `user_id` on this node.
    pub fn connections_of(&self, user_id: &str) -> Vec<Connection> {
        self.inner.registry.connections_of(user_id)
    }

    // ----- presence -----

    /// Whether `user_id` is online anywhere in the cluster, with how many
    /// connections and since when.
    pub async fn presence(&self, user_id: &str) -> Result<UserPresence> {
        Ok(self
            .presence_of(&[user_id])
            .await?
            .pop()
            .expect("one answer per user"))
    }

    /// [`Hub::presence`] for several users at once, in order.
    pub async fn presence_of(&self, users: &[&str]) -> Result<Vec<UserPresence>> {
        if let Some(found) = self.inner.sessions.presence(users).await? {
            return Ok(found);
        }
        Ok(users
            .iter()
            .map(|u| {
                let conns = self.inner.registry.connections_of(u);
                let since = conns.iter().map(Connection::connected_at).min();
                UserPresence::new(u, conns.len(), since)
            })
            .collect())
    }

    /// The online members of `group`, in user id order, after `after`, at
    /// most `limit` (at least 1).
    pub async fn group_presence(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GroupPresence> {
        let limit = limit.max(1);
        if let Some(page) = self
            .inner
            .sessions
            .group_presence(group, after, limit)
            .await?
        {
            return Ok(page);
        }
        let mut members: std::collections::BTreeMap<Arc<str>, usize> = Default::default();
        self.inner.registry.for_group(group, |c| {
            *members.entry(c.identity().user_id.clone()).or_default() += 1;
        });
        Ok(GroupPresence::page(
            group,
            members.into_iter().map(|(u, n)| (u.to_string(), n)),
            after,
            limit,
        ))
    }

    // ----- publishing -----

    /// Publishes a notification: validates it, drops a repeated
    /// publisher-chosen id, serializes it once and hands it to the broker,
    /// which brings it to every node, this one included ([`Deliver`]), where
    /// the same bytes are queued to every matching connection.
    ///
    /// Cancel-safe: if the returned future is dropped before it completes
    /// (the publisher hung up), the claim on a publisher-chosen id is
    /// released, so a retry with the same id is published, not answered
    /// as a duplicate of a publish that never finished. A broker that
    /// already took the message de-duplicates the retry itself.
    pub async fn publish(&self, req: PublishRequest) -> Result<PublishReceipt> {
        req.target.validate()?;
        self.inner.broker.validate(&req)?;
        let mut claim = ClaimGuard {
            dedup: &self.inner.dedup,
            id: None,
        };
        if let Some(id) = &req.id {
            loop {
                match self.inner.dedup.claim(id) {
                    Claim::New => break,
                    Claim::Duplicate(receipt) => {
                        self.inner
                            .counters
                            .duplicates
                            .fetch_add(1, Ordering::Relaxed);
                        return Ok(receipt);
                    }
                    // The first attempt is in flight: its outcome decides.
                    Claim::Wait(mut rx) => {
                        let _ = rx.changed().await;
                    }
                }
            }
            claim.id = Some(id.clone());
        }
        let notify_undelivered = req.notify_undelivered.then(|| req.kind.clone());
        let envelope = Envelope::from_request(req, self.inner.config.node_id.clone());
        // An error drops `claim`, which releases the id: a retry may publish.
        let published = self.inner.broker.publish(&envelope).await?;
        let receipt = self.settle(&envelope, published, notify_undelivered.as_ref());
        // A duplicate the broker caught leaves the claim to be released.
        if published != Published::Duplicate {
            claim.complete(receipt.delivered);
        }
        Ok(receipt)
    }

    /// What the broker did with `envelope`, counted and answered: the
    /// receipt, and the `notification_undelivered` event when the
    /// publisher asked for it (`notify` is then the message type) and
    /// nobody took the message.
    fn settle(
        &self,
        envelope: &Envelope,
        published: Published,
        notify: Option<&MessageType>,
    ) -> PublishReceipt {
        let counters = &self.inner.counters;
        let delivered = match published {
            Published::Duplicate => {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                return PublishReceipt {
                    id: envelope.id.clone(),
                    delivered: None,
                };
            }
            Published::Delivered(n) => Some(n),
            Published::Sent | Published::Unrouted => None,
        };
        counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = notify {
            // Reached nobody: no node holds a target (the broker knows), or
            // this node, the only one, queued it to no connection.
            if published == Published::Unrouted || delivered == Some(0) {
                self.emit_undelivered(envelope, kind.as_str());
            }
        }
        PublishReceipt {
            id: envelope.id.clone(),
            delivered,
        }
    }

    fn emit_undelivered(&self, envelope: &Envelope, kind: &str) {
        let user = match &envelope.target {
            Target::User(u) => Some(&**u),
            _ => None,
        };
        let target = serde_json::to_value(&envelope.target).expect("targets serialize");
        self.emit_event(
            LifecycleEvent::new(EventKind::NotificationUndelivered, user)
                .with("message_id", envelope.id.as_str())
                .with("message_type", kind)
                .with("target", target),
        );
    }

    /// Sends a lifecycle event to the hub's sink ([`HubBuilder::lifecycle_sink`]).
    pub fn emit_event(&self, event: LifecycleEvent) {
        tracing::debug!(kind = event.kind.as_str(), id = %event.id, "lifecycle event");
        self.inner.lifecycle.emit(event);
    }

    /// Publishes several requests, in order, after validating all of them:
    /// if any is malformed, none is published. Items with a
    /// publisher-chosen id go through [`Hub::publish`] one at a time (its
    /// de-duplication); each run of items without one goes to the broker
    /// together ([`Broker::publish_many`]), which on a single node writes
    /// a user's messages of the batch to each connection at once. On an
    /// error, the items before it may have been published.
    pub async fn publish_batch(&self, reqs: Vec<PublishRequest>) -> Result<Vec<PublishReceipt>> {
        for (i, r) in reqs.iter().enumerate() {
            r.target
                .validate()
                .and_then(|()| self.inner.broker.validate(r))
                .map_err(|e| Error::InvalidPublish(format!("item {i}: {e}")))?;
        }
        let mut out = Vec::with_capacity(reqs.len());
        // The run being gathered: envelopes, and the type of each whose
        // publisher asked to hear of it going undelivered.
        let mut run: Vec<Envelope> = Vec::new();
        let mut notify: Vec<Option<MessageType>> = Vec::new();
        for r in reqs {
            if r.id.is_some() {
                self.publish_run(&mut run, &mut notify, &mut out).await?;
                out.push(self.publish(r).await?);
                continue;
            }
            notify.push(r.notify_undelivered.then(|| r.kind.clone()));
            run.push(Envelope::from_request(r, self.inner.config.node_id.clone()));
        }
        self.publish_run(&mut run, &mut notify, &mut out).await?;
        Ok(out)
    }

    /// Publishes the envelopes of `run` together and empties it, adding
    /// their receipts to `out`.
    async fn publish_run(
        &self,
        run: &mut Vec<Envelope>,
        notify: &mut Vec<Option<MessageType>>,
        out: &mut Vec<PublishReceipt>,
    ) -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        let published = self.inner.broker.publish_many(run).await?;
        for ((envelope, published), notify) in run.iter().zip(published).zip(notify.iter()) {
            out.push(self.settle(envelope, published, notify.as_ref()));
        }
        run.clear();
        notify.clear();
        Ok(())
    }

    /// What a client of `user_id` that reconnects with `since` missed
    /// (docs/protocol.md section 4). The transport registers the connection
    /// first, then sends this replay, then calls
    /// [`Outbox::skip_replayed`] with its sequence numbers so that nothing
    /// is sent twice.
    pub async fn replay(&self, user_id: &str, since: &str) -> Result<Replay> {
        self.inner.history.replay(user_id, since).await
    }

    /// Sends a notification to every connection of one user.
    pub async fn notify_user(
        &self,
        user_id: &str,
        kind: MessageType,
        payload: Value,
    ) -> Result<PublishReceipt> {
        self.publish(PublishRequest::new(Target::user(user_id), kind).with_payload(payload)?)
            .await
    }

    /// Sends a notification to every connection of each listed user.
    pub async fn notify_users<S: AsRef<str>>(
        &self,
        user_ids: &[S],
        kind: MessageType,
        payload: Value,
    ) -> Result<PublishReceipt> {
        let target = Target::users(user_ids.iter().map(|u| u.as_ref()));
        self.publish(PublishRequest::new(target, kind).with_payload(payload)?)
            .await
    }

    /// Sends a notification to every connection in a group.
    pub async fn notify_group(
        &self,
        group: &str,
        kind: MessageType,
        payload: Value,
    ) -> Result<PublishReceipt> {
        self.publish(PublishRequest::new(Target::group(group), kind).with_payload(payload)?)
            .await
    }

    /// Sends a notification to everyone except `exclude_users`.
    pub async fn broadcast<S: AsRef<str>>(
        &self,
        kind: MessageType,
        payload: Value,
        exclude_users: &[S],
    ) -> Result<PublishReceipt> {
        let target = Target::broadcast(exclude_users.iter().map(|u| u.as_ref()));
        self.publish(PublishRequest::new(target, kind).with_payload(payload)?)
            .await
    }

    // ----- inbound frames -----

    /// Registers `handler` for client frames of `kind`, replacing any
    /// earlier one. `ping` is answered by the protocol and the other reserved
    /// types cannot be handled.
    pub fn register_handler(
        &self,
        kind: impl Into<String>,
        handler: impl MessageHandler,
    ) -> Result<()> {
        let kind = kind.into();
        if kind.is_empty() || RESERVED_TYPES.contains(&kind.as_str()) {
            return Err(Error::InvalidHandler(kind));
        }
        self.inner
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind, Arc::new(handler));
        Ok(())
    }

    /// Answers one client text frame from `conn` (docs/protocol.md section 3):
    /// the reply to send back, if any. Never fails: a bad frame or a failing
    /// (even panicking) handler yields an error frame. A `refresh` needs the
    /// authenticator and is answered by the [`Session`](crate::Session).
    pub async fn handle_text(&self, conn: &Connection, text: &str) -> Option<String> {
        match ClientFrame::parse(text) {
            Err(e) => {
                self.count_frame();
                Some(e.to_frame().to_json())
            }
            Ok(frame) => self.handle_frame(conn, frame).await,
        }
    }

    /// Answers one parsed client frame: a pong for a ping, a handler's
    /// reply (or error frame) for any other type.
    pub async fn handle_frame(&self, conn: &Connection, frame: ClientFrame) -> Option<String> {
        self.count_frame();
        match frame {
            ClientFrame::Ping { timestamp } => Some(pong_json(&timestamp)),
            ClientFrame::Custom { kind, data } => self.run_handler(conn, kind, data).await,
            ClientFrame::Refresh { .. } => Some(
                ErrorFrame::new(
                    ErrorCode::RefreshFailed,
                    "refresh is answered by the connection's session",
                )
                .to_json(),
            ),
        }
    }

    /// Counts one client frame received (for stats).
    pub(crate) fn count_frame(&self) {
        self.inner
            .counters
            .frames_received
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Gives a live connection a new identity of the same user, after an
    /// in-band refresh: its groups (group publishes reach the new ones
    /// from now on) and its expiry; the session tracker learns the new
    /// groups. False when the connection is gone or the user differs.
    pub async fn update_identity(&self, conn: &Connection, identity: Identity) -> bool {
        if &*identity.user_id != conn.user_id() {
            return false;
        }
        let groups_changed = {
            let Some(old) = self.inner.registry.update_identity(conn, identity.clone()) else {
                return false;
            };
            (old.groups != identity.groups).then_some(old)
        };
        if let Some(old) = groups_changed {
            // The tracker counts connections per group: move this one.
            let sessions = &self.inner.sessions;
            let node = self.node_id();
            if let Err(e) = sessions.unregister(node, &old, conn.wire_id()).await {
                tracing::warn!(error = %e, "session tracker failed to move a refreshed connection");
            }
            if let Err(e) = sessions.register(node, &identity, conn.wire_id()).await {
                tracing::warn!(error = %e, "session tracker failed to move a refreshed connection");
            }
        }
        true
    }

    async fn run_handler(
        &self,
        conn: &Connection,
        kind: String,
        data: Map<String, Value>,
    ) -> Option<String> {
        let handler = self
            .inner
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .cloned();
        let Some(handler) = handler else {
            return Some(
                ErrorFrame::new(
                    ErrorCode::UnknownType,
                    format!("no handler for message type `{kind}`"),
                )
                .to_json(),
            );
        };
        let identity = conn.identity();
        // Run in its own task so that a panicking handler becomes an error
        // frame instead of taking the connection down.
        let task = tokio::spawn(async move { handler.handle(&identity, data).await });
        match task.await {
            Ok(Ok(Some(reply))) => Some(reply.to_string()),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some(ErrorFrame::new(ErrorCode::HandlerError, e.0).to_json()),
            Err(join) => {
                tracing::error!(kind, error = %join, "message handler panicked");
                Some(ErrorFrame::new(ErrorCode::HandlerError, "handler failed").to_json())
            }
        }
    }

    // ----- numbers -----

    /// How often the registry listed every user or group (tests).
    #[cfg(test)]
    pub(crate) fn registry_listings(&self) -> usize {
        self.inner
            .registry
            .listings
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When each message was taken, for the publish-to-write latency.
    pub(crate) fn delivery_clock(&self) -> &crate::latency::DeliveryClock {
        &self.inner.clock
    }

    /// Numbers over every live node of the cluster, from the session
    /// tracker; `None` on a single node.
    pub async fn cluster_stats(&self) -> Result<Option<ClusterStats>> {
        self.inner.sessions.cluster_stats().await
    }

    /// Numbers about this node.
    pub fn stats(&self) -> Stats {
        let r = &self.inner.registry;
        let mut stats = self.totals();
        stats.groups = r.groups();
        stats.users = r.users();
        stats.total_groups = stats.groups.len();
        stats
    }

    /// [`Hub::stats`] without the lists of users and groups (left empty):
    /// counters and map sizes only, so it costs the same with a million
    /// users as with one (what `/metrics` reads at every scrape).
    pub(crate) fn totals(&self) -> Stats {
        let r = &self.inner.registry;
        let c = &self.inner.counters;
        Stats {
            total_users: r.user_count(),
            total_connections: r.connection_count(),
            total_groups: r.group_count(),
            groups: Vec::new(),
            users: Vec::new(),
            node_id: self.node_id().to_string(),
            messages_published: c.published.load(Ordering::Relaxed),
            messages_delivered: c.deliveries.load(Ordering::Relaxed),
            duplicates_suppressed: c.duplicates.load(Ordering::Relaxed),
            connections_opened: c.connections_opened.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            messages_dropped_invalid: c.dropped_invalid.load(Ordering::Relaxed),
            disconnects: REASONS
                .iter()
                .map(|r| {
                    (
                        r.as_str(),
                        c.disconnects[reason_index(*r)].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            messages_received: TARGET_KINDS
                .iter()
                .zip(&c.received)
                .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
                .collect(),
            uptime_seconds: self.inner.started.elapsed().as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;
    use serde_json::json;

    async fn recv(outbox: &Outbox) -> Vec<Value> {
        let mut buf = Vec::new();
        outbox.recv_many(&mut buf).await.unwrap();
        buf.iter()
            .map(|f| serde_json::from_slice(&f.data).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn routes_by_target_and_serializes_once() {
        let hub = Hub::new();
        let (_a1, a1) = hub.connect(Identity::new("a", ["staff"])).await.unwrap();
        let (_a2, a2) = hub
            .connect(Identity::new("a", Vec::<&str>::new()))
            .await
            .unwrap();
        let (_b, b) = hub.connect(Identity::new("b", ["staff"])).await.unwrap();

        let r = hub
            .notify_user("a", MessageType::info(), json!({"n":1}))
            .await
            .unwrap();
        assert_eq!(r.delivered, Some(2), "both tabs of a");
        let got1 = recv(&a1).await;
        let got2 = recv(&a2).await;
        assert_eq!(got1, got2);
        assert_eq!(got1[0]["user_id"], "a");

        let r = hub
            .notify_group("staff", MessageType::warning(), json!({}))
            .await
            .unwrap();
        assert_eq!(r.delivered, Some(2));
        assert_eq!(recv(&b).await[0]["group_ids"], json!(["staff"]));
        assert_eq!(recv(&a1).await[0]["type"], "warning");

        let r = hub
            .broadcast(MessageType::success(), json!({}), &["a"])
            .await
            .unwrap();
        assert_eq!(r.delivered, Some(1));
        assert_eq!(recv(&b).await[0]["type"], "success");

        let r = hub
            .notify_users(&["a", "b", "a"], MessageType::danger(), json!({}))
            .await
            .unwrap();
        assert_eq!(r.delivered, Some(3), "a repeated user is reached once");
    }

    /// A publish request to `target` with payload `{"n": n}`.
    fn numbered(target: Target, n: u64) -> PublishRequest {
        PublishRequest::new(target, MessageType::info())
            .with_payload(json!({ "n": n }))
            .unwrap()
    }

    /// The `n` of each frame in `frames`.
    fn numbers(frames: &[Value]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| f["payload"]["n"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_batch_keeps_its_order_for_every_connection() {
        let hub = Hub::new();
        let (_a1, a1) = hub.connect(Identity::new("a", ["g"])).await.unwrap();
        let (_a2, a2) = hub
            .connect(Identity::new("a", Vec::<&str>::new()))
            .await
            .unwrap();
        let (_b, b) = hub.connect(Identity::new("b", ["g"])).await.unwrap();
        let (_c, c) = hub
            .connect(Identity::new("c", Vec::<&str>::new()))
            .await
            .unwrap();
        let receipts = hub
            .publish_batch(vec![
                numbered(Target::user("a"), 1),
                numbered(Target::user("b"), 2),
                numbered(Target::user("a"), 3),
                numbered(Target::Broadcast(Default::default()), 4),
                numbered(Target::user("a"), 5).with_id(MessageId::new("five").unwrap()),
                numbered(Target::users(["c", "a"]), 6),
                numbered(Target::group("g"), 7),
                numbered(Target::user("a"), 8),
                numbered(Target::user("nobody"), 9),
            ])
            .await
            .unwrap();
        let delivered: Vec<_> = receipts.iter().map(|r| r.delivered).collect();
        assert_eq!(
            delivered,
            [2, 1, 2, 4, 2, 3, 2, 2, 0].map(Some),
            "{receipts:?}"
        );
        assert_eq!(receipts[4].id.as_str(), "five");
        assert_eq!(numbers(&recv(&a1).await), [1, 3, 4, 5, 6, 7, 8]);
        assert_eq!(numbers(&recv(&a2).await), [1, 3, 4, 5, 6, 8]);
        assert_eq!(numbers(&recv(&b).await), [2, 4, 7]);
        assert_eq!(numbers(&recv(&c).await), [4, 6]);
        let stats = hub.stats();
        assert_eq!(stats.messages_published, 9);
        assert_eq!(stats.messages_delivered, 18);
    }

    /// A direct writer that records the `n` of the frames of each write.
    #[derive(Default)]
    struct Writes(std::sync::Mutex<Vec<Vec<u64>>>);

    impl connection::DirectWrite for Writes {
        fn try_write(&self, frames: &[&[u8]]) -> connection::Direct {
            let frames: Vec<Value> = frames
                .iter()
                .map(|f| serde_json::from_slice(f).unwrap())
                .collect();
            self.0.lock().unwrap().push(numbers(&frames));
            connection::Direct::Written
        }
    }

    #[tokio::test]
    async fn a_users_messages_in_a_batch_go_out_in_one_write() {
        let hub = Hub::new();
        let mut writes = Vec::new();
        let mut conns = Vec::new();
        for user in ["a", "a", "b"] {
            let (conn, outbox) = hub
                .connect(Identity::new(user, Vec::<&str>::new()))
                .await
                .unwrap();
            let w = Arc::new(Writes::default());
            outbox.set_direct(w.clone());
            writes.push(w);
            conns.push((conn, outbox));
        }
        let batch = (1..=5)
            .map(|n| numbered(Target::user(if n == 2 { "b" } else { "a" }), n))
            .collect();
        let receipts = hub.publish_batch(batch).await.unwrap();
        assert!(receipts.iter().all(|r| r.delivered.is_some_and(|d| d > 0)));
        let written = |i: usize| writes[i].0.lock().unwrap().clone();
        // One write per connection, where one publish at a time made one
        // per message.
        assert_eq!(written(0), [vec![1, 3, 4, 5]]);
        assert_eq!(written(1), [vec![1, 3, 4, 5]]);
        assert_eq!(written(2), [vec![2]]);
    }

    /// `n` connections of users `u0`.. (spread over every shard).
    async fn connect_many(hub: &Hub, n: usize) -> Vec<(Connection, Outbox)> {
        let mut out = Vec::new();
        for i in 0..n {
            let c = hub
                .connect(Identity::new(format!("u{i}"), Vec::<&str>::new()))
                .await
                .unwrap();
            out.push(c);
        }
        out
    }

    /// Each outbox holds exactly one frame, the broadcast of type `kind`.
    async fn each_got_one(conns: &[(Connection, Outbox)], kind: &str) {
        for (_, o) in conns {
            let got = recv(o).await;
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0]["type"], kind);
        }
    }

    // The test runtime has one thread: a task spawned before the broadcast
    // can only run while the broadcast's fan-out is under way if the
    // fan-out gives the thread back between its steps.
    #[tokio::test]
    async fn a_long_fan_out_lets_other_tasks_run_and_reaches_everyone() {
        let hub = Hub::new();
        let conns = connect_many(&hub, 500).await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let other = tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
        let r = hub
            .broadcast(MessageType::info(), json!({}), &[] as &[&str])
            .await
            .unwrap();
        assert!(
            ran.load(Ordering::SeqCst),
            "the other task waited for the whole fan-out"
        );
        assert_eq!(r.delivered, Some(500));
        each_got_one(&conns, "info").await;
        other.await.unwrap();

        // A user-targeted message is one shard: one step, no yield needed.
        let r = hub
            .notify_user("u7", MessageType::success(), json!({}))
            .await
            .unwrap();
        assert_eq!(r.delivered, Some(1));
    }

    #[tokio::test]
    async fn a_fan_out_dropped_midway_still_reaches_everyone() {
        let hub = Hub::new();
        let conns = connect_many(&hub, 300).await;
        let req = PublishRequest::new(
            Target::broadcast(Vec::<&str>::new()),
            MessageType::warning(),
        );
        let envelope = Envelope::from_request(req, "node".into());
        let node: Arc<Inner> = hub.inner.clone();
        let mut fan_out = node.deliver_stepwise(&envelope);
        assert_eq!(fan_out.step(), None, "a broadcast takes several steps");
        // As when a publisher hangs up while its broadcast is under way.
        drop(fan_out);
        each_got_one(&conns, "warning").await;
        assert_eq!(hub.stats().messages_delivered, 300);
    }

    #[tokio::test]
    async fn every_connection_gets_the_same_bytes() {
        let hub = Hub::new();
        let mut outboxes = Vec::new();
        for i in 0..5 {
            let (_c, o) = hub
                .connect(Identity::new(format!("u{i}"), Vec::<&str>::new()))
                .await
                .unwrap();
            outboxes.push(o);
        }
        hub.broadcast(
            MessageType::info(),
            json!({"big": "x".repeat(1000)}),
            &[] as &[&str],
        )
        .await
        .unwrap();
        let mut frames = Vec::new();
        for o in &outboxes {
            let mut buf = Vec::new();
            o.recv_many(&mut buf).await.unwrap();
            frames.push(buf.pop().unwrap().data);
        }
        // Serialized once: every queue holds a handle to one buffer.
        assert!(frames.iter().all(|f| f.as_ptr() == frames[0].as_ptr()));
    }

    #[tokio::test]
    async fn duplicate_ids_are_delivered_once() {
        let hub = Hub::new();
        let (_c, outbox) = hub
            .connect(Identity::new("u", Vec::<&str>::new()))
            .await
            .unwrap();
        let req = PublishRequest::new(Target::user("u"), MessageType::info())
            .with_id(MessageId::new("job-1").unwrap());
        let first = hub.publish(req.clone()).await.unwrap();
        let again = hub.publish(req).await.unwrap();
        assert_eq!(first, again);
        assert_eq!(recv(&outbox).await.len(), 1);
        assert_eq!(hub.stats().duplicates_suppressed, 1);
    }

    /// A single-node broker whose first publish blocks until released.
    #[derive(Default)]
    struct Gate {
        calls: AtomicU64,
        open: tokio::sync::Notify,
        local: LocalBroker,
    }

    #[async_trait::async_trait]
    impl Broker for Gate {
        fn start(&self, node: Delivery) {
            self.local.start(node);
        }
        async fn publish(&self, e: &Envelope) -> Result<Published> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                self.open.notified().await;
            }
            self.local.publish(e).await
        }
    }

    #[tokio::test]
    async fn a_dropped_publish_releases_its_id() {
        let gate = Arc::new(Gate::default());
        let hub = Hub::builder().broker(gate.clone()).build();
        let (_c, outbox) = hub
            .connect(Identity::new("u", Vec::<&str>::new()))
            .await
            .unwrap();
        let req = PublishRequest::new(Target::user("u"), MessageType::info())
            .with_id(MessageId::new("job-9").unwrap());
        // The first attempt hangs in the broker, and its caller gives up.
        let first = tokio::time::timeout(Duration::from_millis(20), hub.publish(req.clone())).await;
        assert!(first.is_err(), "the first attempt was cancelled");
        // The retry is published, not answered as a duplicate of nothing.
        let retry = hub.publish(req.clone()).await.unwrap();
        assert_eq!(retry.delivered, Some(1));
        assert_eq!(recv(&outbox).await.len(), 1);
        assert_eq!(hub.publish(req).await.unwrap(), retry, "now a duplicate");
        assert_eq!(hub.stats().messages_published, 1);
    }

    #[tokio::test]
    async fn a_retry_during_the_first_attempt_waits_for_it() {
        let gate = Arc::new(Gate::default());
        let hub = Hub::builder().broker(gate.clone()).build();
        let (_c, outbox) = hub
            .connect(Identity::new("u", Vec::<&str>::new()))
            .await
            .unwrap();
        let req = PublishRequest::new(Target::user("u"), MessageType::info())
            .with_id(MessageId::new("job-10").unwrap());
        let first = tokio::spawn({
            let (hub, req) = (hub.clone(), req.clone());
            async move { hub.publish(req).await }
        });
        while gate.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let retry = tokio::spawn({
            let (hub, req) = (hub.clone(), req.clone());
            async move { hub.publish(req).await }
        });
        tokio::task::yield_now().await;
        assert!(
            !retry.is_finished(),
            "the retry waits for the first attempt"
        );
        gate.open.notify_one();
        let first = first.await.unwrap().unwrap();
        assert_eq!(retry.await.unwrap().unwrap(), first);
        assert_eq!(recv(&outbox).await.len(), 1, "delivered once");
    }

    #[tokio::test]
    async fn stats_return_to_zero() {
        let hub = Hub::new();
        let (c1, _o1) = hub.connect(Identity::new("u", ["g"])).await.unwrap();
        let (c2, _o2) = hub.connect(Identity::new("v", ["g"])).await.unwrap();
        let s = hub.stats();
        assert_eq!((s.total_users, s.total_connections), (2, 2));
        assert_eq!(s.groups, vec!["g"]);
        hub.disconnect(&c1, DisconnectReason::ClientClosed).await;
        hub.disconnect(&c2, DisconnectReason::SlowConsumer).await;
        hub.disconnect(&c2, DisconnectReason::SlowConsumer).await;
        let s = hub.stats();
        assert_eq!(
            (s.total_users, s.total_connections, s.total_groups),
            (0, 0, 0)
        );
        assert_eq!(s.disconnects["slow_consumer"], 1);
        assert_eq!(*hub.watch_connections().borrow(), 0);
    }

    #[tokio::test]
    async fn invalid_identity_is_refused() {
        let hub = Hub::new();
        assert!(hub.connect(Identity::new("", ["g"])).await.is_err());
        assert_eq!(hub.stats().total_connections, 0);
    }

    #[tokio::test]
    async fn handlers_answer_and_fail_gracefully() {
        let hub = Hub::new();
        hub.register_handler(
            "echo",
            |who: Identity, frame: Map<String, Value>| async move {
                Ok(Some(
                    json!({"type":"echo","from":&*who.user_id,"text":frame["text"]}),
                ))
            },
        )
        .unwrap();
        hub.register_handler("boom", |_: Identity, _: Map<String, Value>| async move {
            if true {
                panic!("handler bug");
            }
            Ok(None)
        })
        .unwrap();
        assert!(
            hub.register_handler("ping", |_: Identity, _: Map<String, Value>| async {
                Ok(None)
            })
            .is_err()
        );
        let (c, _o) = hub
            .connect(Identity::new("u", Vec::<&str>::new()))
            .await
            .unwrap();
        let reply = hub
            .handle_text(&c, r#"{"type":"echo","text":"hi"}"#)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&reply).unwrap(),
            json!({"type":"echo","from":"u","text":"hi"})
        );
        let reply = hub.handle_text(&c, r#"{"type":"boom"}"#).await.unwrap();
        assert!(reply.contains("handler_error"), "{reply}");
        let reply = hub.handle_text(&c, r#"{"type":"nope"}"#).await.unwrap();
        assert!(reply.contains("unknown_type"), "{reply}");
        let reply = hub
            .handle_text(&c, r#"{"type":"ping","timestamp":7}"#)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&reply).unwrap(),
            json!({"type":"pong","timestamp":7})
        );
    }

    #[tokio::test]
    async fn slow_consumer_is_cut_and_others_keep_receiving() {
        let hub = Hub::builder()
            .queue_limits(QueueLimits::default().max_frames(4))
            .build();
        let (slow, slow_out) = hub
            .connect(Identity::new("slow", Vec::<&str>::new()))
            .await
            .unwrap();
        let (_fast, fast_out) = hub
            .connect(Identity::new("fast", Vec::<&str>::new()))
            .await
            .unwrap();
        let mut fast_got = 0;
        for i in 0..10 {
            hub.broadcast(MessageType::info(), json!({"i": i}), &[] as &[&str])
                .await
                .unwrap();
            fast_got += recv(&fast_out).await.len();
        }
        assert_eq!(fast_got, 10);
        assert!(slow.is_closed());
        assert_eq!(slow_out.closed().await, DisconnectReason::SlowConsumer);
    }

    #[test]
    fn the_lifecycle_sink_is_the_builders() {
        use crate::lifecycle::{EventKind, LifecycleEvent};
        #[derive(Default)]
        struct Recorder(Mutex<Vec<LifecycleEvent>>);
        impl LifecycleSink for Recorder {
            fn emit(&self, event: LifecycleEvent) {
                self.0.lock().unwrap().push(event);
            }
        }
        let sink = Arc::new(Recorder::default());
        let hub = Hub::builder().lifecycle_sink(sink.clone()).build();
        let event = LifecycleEvent::new(EventKind::UserOnline, Some("u1"));
        hub.lifecycle().emit(event.clone());
        assert_eq!(*sink.0.lock().unwrap(), [event]);
        // Without one, events go nowhere (and nothing fails).
        Hub::new()
            .lifecycle()
            .emit(LifecycleEvent::new(EventKind::UserOffline, None));
    }
}
