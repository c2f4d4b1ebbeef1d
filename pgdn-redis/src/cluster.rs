//! [`Cluster`]: one node's link to the shared Redis, and the factory of its
//! broker, session tracker and history.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use pgdn_core::{Delivery, HistoryConfig, Hub, HubBuilder};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, watch};

use crate::broker::RedisBroker;
use crate::error::{Error, Result};
use crate::history::RedisHistory;
use crate::keys::Keys;
use crate::session::RedisSessionTracker;
pub use crate::shard::RedisMode;
use crate::shard::{Locator, Shard, Topology};

/// Settings of a cluster node, each with its default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// Prefix of every key and channel. Default `pgdn:`.
    pub prefix: String,
    /// Lifetime of a node's liveness key and of its users' mappings unless
    /// refreshed: how long a dead node's users stay routed to it. Default
    /// 15 s.
    pub node_ttl: Duration,
    /// How often a node refreshes its liveness key and mappings. Default
    /// 5 s (a third of `node_ttl`).
    pub heartbeat_interval: Duration,
    /// How often each node runs a cleanup pass. Default 60 s.
    pub cleanup_interval: Duration,
    /// Most user keys one cleanup pass looks at. Default 1000.
    pub cleanup_batch: usize,
    /// Per-user history for resume: 100 messages, 10 minutes (its
    /// `max_users` and `max_bytes` bound the in-memory history only; bound
    /// Redis with its `maxmemory`). Each frame is stored once, for the age
    /// bound, and each user's window holds references to it.
    pub history: HistoryConfig,
    /// Most users one `users` target may list. A publish is split by
    /// partition, one Lua script each, which blocks its Redis while it
    /// writes each user's history and looks up each user's nodes; a longer
    /// list is refused (400 at the API, [`pgdn_core::Error::InvalidPublish`]
    /// to a caller). Default 1,000: a few milliseconds of Redis time. Send
    /// longer lists as several publishes (a batch takes up to 1,000), or
    /// use a group.
    pub max_users_per_publish: usize,
    /// De-duplication window of publisher-chosen ids. Default 5 minutes.
    pub dedup_window: Duration,
    /// How long a Redis command may take before it fails (so that a
    /// publish fails fast while Redis is away). Default 2 s.
    pub command_timeout: Duration,
    /// How often the node PINGs Redis on its command connection and on its
    /// subscription. Two PINGs in a row without an answer within
    /// `command_timeout` make it drop that connection and open a new one:
    /// a half-open connection (a peer or a middlebox that stopped
    /// answering without closing) is not waited out. Default 1 s.
    pub ping_interval: Duration,
    /// For a `rediss://` URL: the CA certificate(s), PEM, that the Redis
    /// server's certificate must chain to, instead of the public webpki
    /// roots (a private PKI). Default `None`. Needs the `tls` feature.
    pub redis_ca_cert: Option<Vec<u8>>,
    /// How the deployment's Redis is laid out: one Redis, independent
    /// shards, Redis Cluster or Sentinel. Default [`RedisMode::Single`].
    pub mode: RedisMode,
    /// How many partitions users, groups and message ids are hashed to
    /// (1 to 1024). Fixed for a deployment: every node and emitter must
    /// use the same number (and, in mode shards, the same list of URLs).
    /// Default 128.
    pub partitions: u16,
    /// Mode sentinel: the name the sentinels monitor the master under.
    /// Default `mymaster`.
    pub sentinel_master: String,
}

impl ClusterConfig {
    /// How long no node may have reached Redis before the cluster assumes
    /// that mappings expired meanwhile and settles: the node TTL less a
    /// heartbeat (the shortest outage that can expire a mapping), and at
    /// least three PINGs, so that a node that is merely slow does not make
    /// the cluster settle.
    pub(crate) fn settle_gap(&self) -> Duration {
        (self.node_ttl.saturating_sub(self.heartbeat_interval)).max(self.ping_interval * 3)
    }

    /// How long the cluster settles after such an outage (or on a Redis
    /// that starts empty): a PING interval (every node learns of it, and
    /// starts a heartbeat at once) plus a command timeout (the heartbeat
    /// has written its sessions). Where masters change (Redis Cluster,
    /// Sentinel), nodes learn of a new master up to a slot check (2 s)
    /// apart, which is added.
    pub(crate) fn settle_time(&self) -> Duration {
        let follow = match self.mode {
            RedisMode::Cluster | RedisMode::Sentinel => Duration::from_secs(2),
            _ => Duration::ZERO,
        };
        self.ping_interval + self.command_timeout + follow
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            prefix: "pgdn:".into(),
            node_ttl: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(5),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1000,
            history: HistoryConfig::default(),
            max_users_per_publish: 1_000,
            dedup_window: Duration::from_secs(300),
            command_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            redis_ca_cert: None,
            mode: RedisMode::Single,
            partitions: 128,
            sentinel_master: "mymaster".into(),
        }
    }
}

/// What this node holds, for the heartbeat: per user its connections and
/// when the first of them opened (ms since the epoch); per group its
/// connections by user.
#[derive(Debug, Default)]
pub(crate) struct Local {
    pub(crate) users: HashMap<String, (u64, u64)>,
    pub(crate) groups: HashMap<String, HashMap<String, u64>>,
}

/// Lifecycle events, once [`SessionTracker::attach_lifecycle`] gave a sink.
///
/// [`SessionTracker::attach_lifecycle`]: pgdn_core::SessionTracker::attach_lifecycle
pub(crate) struct LifecycleLink {
    pub(crate) sink: Arc<dyn pgdn_core::LifecycleSink>,
    pub(crate) debounce: Duration,
}

/// How the node stands with one shard. It takes publishes only when all
/// three hold on every shard: otherwise a publish could be answered 200
/// and reach nobody (a message published while this node is not
/// subscribed is lost for it; a message to a user whose mapping Redis
/// lost, after a restart or a stall longer than the node TTL, is routed
/// nowhere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LinkState {
    /// The command connection answered its last PING.
    pub(crate) connected: bool,
    /// The pub/sub subscription is live (and answered its last PING).
    pub(crate) subscribed: bool,
    /// A heartbeat completed since the last subscription and since the last
    /// failure: the shard holds every mapping of this node's users and
    /// groups in its partitions.
    pub(crate) registered: bool,
    /// The last attempt to connect failed.
    pub(crate) unreachable: bool,
    /// Redis was away or restarted, and the shard's partitions wait for
    /// every node to register again (the publish script's clock).
    pub(crate) settling: bool,
}

impl LinkState {
    pub(crate) fn readiness(&self) -> std::result::Result<(), &'static str> {
        if !self.connected {
            Err("redis unreachable")
        } else if !self.subscribed {
            Err("not subscribed to redis")
        } else if !self.registered {
            Err("registering this node's sessions in redis")
        } else if self.settling {
            Err("redis is back from an outage; waiting for every node to register again")
        } else {
            Ok(())
        }
    }
}

/// State shared by the broker, tracker, history and background tasks.
pub(crate) struct Shared {
    pub(crate) node: String,
    pub(crate) config: ClusterConfig,
    pub(crate) keys: Keys,
    pub(crate) local: Mutex<Local>,
    /// Where this node's messages are delivered, once the hub started the
    /// broker; the background tasks end when the hub is gone.
    pub(crate) node_delivery: OnceLock<Delivery>,
    /// Which shard holds each partition; replaced (never edited) when
    /// Redis Cluster's slots move. `None` until Redis Cluster's slots are
    /// first known.
    pub(crate) topology: RwLock<Option<Arc<Topology>>>,
    /// Bumped with every change of a shard's state or of the topology.
    pub(crate) changed: Arc<watch::Sender<u64>>,
    /// Redis Cluster: the URLs to ask for the slots.
    pub(crate) seeds: Vec<String>,
    /// Redis Cluster: wakes the slot check at once (a `MOVED`, a failed
    /// shard).
    pub(crate) refresh_now: Notify,
    /// Where lifecycle events go, if anywhere.
    pub(crate) lifecycle: OnceLock<LifecycleLink>,
    /// Orders a heartbeat (which rewrites the node's counts from a
    /// snapshot, write) against connections opening and closing (read):
    /// a count changed between the snapshot and the rewrite would be lost
    /// until the next heartbeat.
    pub(crate) registering: tokio::sync::RwLock<()>,
}

impl Shared {
    pub(crate) fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn ttl_ms(&self) -> u64 {
        self.config.node_ttl.as_millis() as u64
    }

    /// The hub's delivery, while the hub exists.
    pub(crate) fn delivery(&self) -> Option<&Delivery> {
        self.node_delivery.get().filter(|d| d.is_open())
    }

    /// Whether the hub still exists (the background tasks end when not).
    pub(crate) fn hub_open(&self) -> bool {
        self.delivery().is_some()
    }

    /// The current topology, or why there is none yet.
    pub(crate) fn topology(&self) -> Result<Arc<Topology>> {
        self.topology
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::Unavailable("redis cluster slots not known yet".into()))
    }

    /// The shard of partition `p`.
    pub(crate) fn shard(&self, p: u16) -> Result<Arc<Shard>> {
        Ok(self.topology()?.shard(p).clone())
    }

    /// Whose clock partition `p` follows (the scripts'
    /// CLOCK): its own on Redis Cluster (a script may only touch keys of
    /// its slot), else its shard's first partition's, so that a node's
    /// PING touches one clock per shard, not one per partition.
    pub(crate) fn clock_partition(&self, topology: &Topology, p: u16) -> u16 {
        match self.config.mode {
            RedisMode::Cluster => p,
            _ => topology.shard(p).partitions[0],
        }
    }

    /// The partition whose online and offline-due sets hold partition
    /// `p`'s users: as for [`Shared::clock_partition`].
    pub(crate) fn lifecycle_partition(&self, topology: &Topology, p: u16) -> u16 {
        self.clock_partition(topology, p)
    }

    /// The clocks a node's PING touches on `shard`.
    pub(crate) fn clock_partitions<'a>(&self, shard: &'a Shard) -> &'a [u16] {
        match self.config.mode {
            RedisMode::Cluster => &shard.partitions,
            _ => &shard.partitions[..1],
        }
    }

    /// Whether the node can take publishes now, or why not: every shard
    /// must be ready.
    pub(crate) fn readiness(&self) -> std::result::Result<(), &'static str> {
        let Ok(topology) = self.topology() else {
            return Err("redis cluster slots not known yet");
        };
        for shard in &topology.shards {
            shard.state.borrow().readiness()?;
        }
        Ok(())
    }

    /// Whether the last attempt to reach some shard failed.
    fn unreachable(&self) -> bool {
        self.topology().map_or(true, |t| {
            t.shards.iter().any(|s| s.state.borrow().unreachable)
        })
    }

    fn all(&self, f: impl Fn(&LinkState) -> bool) -> bool {
        self.topology()
            .is_ok_and(|t| t.shards.iter().all(|s| f(&s.state.borrow())))
    }

    /// Installs a new topology: retires the shards that left it and starts
    /// the link tasks of the new ones.
    pub(crate) fn install(self: &Arc<Self>, topology: Topology) {
        let topology = Arc::new(topology);
        let old = self
            .topology
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(topology.clone());
        let kept = |s: &Arc<Shard>| topology.shards.iter().any(|n| Arc::ptr_eq(n, s));
        for gone in old
            .iter()
            .flat_map(|t| t.shards.iter())
            .filter(|s| !kept(s))
        {
            gone.retired.store(true, Ordering::SeqCst);
            gone.touch_now.notify_one();
            gone.heartbeat_now.notify_one();
        }
        for shard in &topology.shards {
            let new = old
                .as_ref()
                .is_none_or(|t| !t.shards.iter().any(|o| Arc::ptr_eq(o, shard)));
            if new {
                tokio::spawn(crate::link::command_link(
                    Arc::downgrade(self),
                    shard.clone(),
                ));
                if self.node_delivery.get().is_some() {
                    self.start_node_tasks(shard);
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Starts a shard's subscription and heartbeat (once the hub is
    /// attached: they deliver to it and register its sessions).
    pub(crate) fn start_node_tasks(self: &Arc<Self>, shard: &Arc<Shard>) {
        if shard.node_tasks.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(crate::link::subscribe_loop(self.clone(), shard.clone()));
        tokio::spawn(crate::link::heartbeat_loop(self.clone(), shard.clone()));
    }
}

/// One node's connection to the deployment's Redis. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.shared.node)
            .field("mode", &self.shared.config.mode)
            .finish_non_exhaustive()
    }
}

/// A connection manager on `client` that fails fast: commands time out
/// after `timeout`, and so does connecting. With `must_be_master`, a
/// server that is not (or no longer) a master is refused.
pub(crate) async fn manager(
    client: &redis::Client,
    timeout: Duration,
    must_be_master: bool,
) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2));
    let connect = async {
        let mut conn = client.get_connection_manager_with_config(config).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        if must_be_master {
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
            if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                return Err(Error::Unavailable(
                    "the sentinels' master is not a master (a failover is under way)".into(),
                ));
            }
        }
        Ok::<_, Error>(conn)
    };
    // The manager's own timeouts do not cover every step of a handshake
    // with a Redis that accepts TCP but never answers (stopped, half-open).
    tokio::time::timeout(timeout * 2, connect)
        .await
        .map_err(|_| Error::Unavailable("redis did not answer in time".into()))?
}

impl Cluster {
    /// Connects node `node` to the deployment's Redis at `url` (e.g.
    /// `redis://127.0.0.1:6379`; a comma-separated list where
    /// [`ClusterConfig::mode`] needs several). Fails if Redis cannot be
    /// reached now; later outages are survived. A server that must come
    /// up while Redis is still down uses [`Cluster::start`].
    pub async fn connect(url: &str, node: &str, config: ClusterConfig) -> Result<Cluster> {
        let cluster = Cluster::start(url, node, config)?;
        let timeout = cluster.shared.config.command_timeout * 3;
        let mut rx = cluster.shared.changed.subscribe();
        let connected = tokio::time::timeout(
            timeout,
            rx.wait_for(|_| cluster.shared.all(|s| s.connected || s.unreachable)),
        )
        .await;
        if !matches!(connected, Ok(Ok(_))) || !cluster.shared.all(|s| s.connected) {
            let why = cluster
                .shared
                .topology()
                .ok()
                .and_then(|t| {
                    t.shards
                        .iter()
                        .find(|s| !s.state.borrow().connected)
                        .map(|s| format!("redis {} unreachable", s.name))
                })
                .unwrap_or_else(|| "redis cluster slots unknown".into());
            return Err(Error::Unavailable(why));
        }
        Ok(cluster)
    }

    /// Starts node `node` on the deployment's Redis at `url` (a
    /// comma-separated list where the mode needs several) without waiting
    /// for it: the node connects in the background, retrying with backoff
    /// (and logging why) for as long as Redis is away. Until it is
    /// connected, subscribed and registered on every shard,
    /// [`Cluster::readiness`] says why not, and publishes fail (503)
    /// rather than being accepted and lost. Fails only on a malformed URL,
    /// node id or configuration. Call inside a tokio runtime.
    pub fn start(url: &str, node: &str, config: ClusterConfig) -> Result<Cluster> {
        check_node_id(node)?;
        check_config(&config)?;
        let urls = crate::shard::split_urls(url);
        if urls.is_empty() {
            return Err(Error::Config("no redis URL given".into()));
        }
        let ca = config.redis_ca_cert.as_deref();
        let changed = Arc::new(watch::Sender::new(0u64));
        let partitions = config.partitions;
        let mut seeds = Vec::new();
        let topology = match config.mode {
            RedisMode::Single => {
                if urls.len() > 1 {
                    return Err(Error::Config(format!(
                        "redis mode single takes one URL, not {}; use mode shards, cluster \
                         or sentinel for several",
                        urls.len()
                    )));
                }
                let shard = Shard::new(
                    crate::redacted(&urls[0]),
                    Locator::Fixed(crate::tls::client(&urls[0], ca)?),
                    (0..partitions).collect(),
                    changed.clone(),
                );
                Some(Topology::new(vec![Arc::new(shard)], partitions))
            }
            RedisMode::Shards => {
                if usize::from(partitions) < urls.len() {
                    return Err(Error::Config(format!(
                        "{} shards need at least as many partitions (now {partitions})",
                        urls.len()
                    )));
                }
                let parts = Topology::by_modulo(partitions, urls.len());
                let mut shards = Vec::new();
                for (u, ps) in urls.iter().zip(parts) {
                    shards.push(Arc::new(Shard::new(
                        crate::redacted(u),
                        Locator::Fixed(crate::tls::client(u, ca)?),
                        ps,
                        changed.clone(),
                    )));
                }
                Some(Topology::new(shards, partitions))
            }
            RedisMode::Sentinel => {
                let secure = urls.iter().any(|u| u.starts_with("rediss://"));
                let sentinels = urls
                    .iter()
                    .map(|u| crate::tls::client(u, ca))
                    .collect::<Result<Vec<_>>>()?;
                let shard = Shard::new(
                    format!("sentinel master {}", config.sentinel_master),
                    Locator::Sentinel {
                        sentinels,
                        master: config.sentinel_master.clone(),
                        secure,
                        ca_cert: config.redis_ca_cert.clone(),
                    },
                    (0..partitions).collect(),
                    changed.clone(),
                );
                Some(Topology::new(vec![Arc::new(shard)], partitions))
            }
            RedisMode::Cluster => {
                for u in &urls {
                    crate::tls::client(u, ca)?;
                    seeds.push(u.clone());
                }
                None
            }
        };
        let shared = Arc::new(Shared {
            node: node.to_string(),
            keys: Keys::new(&config.prefix, partitions),
            config,
            local: Mutex::new(Local::default()),
            node_delivery: OnceLock::new(),
            topology: RwLock::new(None),
            changed,
            seeds,
            refresh_now: Notify::new(),
            lifecycle: OnceLock::new(),
            registering: tokio::sync::RwLock::new(()),
        });
        match topology {
            Some(t) => shared.install(t),
            None => {
                tokio::spawn(crate::slots::slot_watch(Arc::downgrade(&shared)));
            }
        }
        Ok(Cluster { shared })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node
    }

    /// The broker (cross-node fan-out).
    pub fn broker(&self) -> RedisBroker {
        RedisBroker {
            shared: self.shared.clone(),
        }
    }

    /// The session tracker (user -> nodes, liveness, cluster stats).
    pub fn session_tracker(&self) -> RedisSessionTracker {
        RedisSessionTracker {
            shared: self.shared.clone(),
        }
    }

    /// The history for resume, shared by all nodes.
    pub fn history(&self) -> RedisHistory {
        RedisHistory {
            shared: self.shared.clone(),
        }
    }

    /// A hub builder with this node's id, broker, tracker and history set.
    /// Building the hub (inside a tokio runtime) starts the node's
    /// subscriptions, heartbeat and periodic cleanup; they stop when the
    /// hub is dropped.
    pub fn hub_builder(&self) -> HubBuilder {
        Hub::builder()
            .node_id(self.shared.node.clone())
            .broker(Arc::new(self.broker()))
            .session_tracker(Arc::new(self.session_tracker()))
            .history(Arc::new(self.history()))
    }

    /// Whether the node's subscriptions (one per shard) are live.
    pub fn is_subscribed(&self) -> bool {
        self.shared.all(|s| s.subscribed)
    }

    /// Whether the node can take publishes now: connected to every shard,
    /// subscribed, and its sessions registered there. `Err` says why not.
    pub fn readiness(&self) -> std::result::Result<(), &'static str> {
        self.shared.readiness()
    }

    /// The shards this node uses now, by name (address), each with the
    /// number of partitions it holds.
    pub fn shards(&self) -> Vec<(String, usize)> {
        self.shared.topology().map_or_else(
            |_| Vec::new(),
            |t| {
                t.shards
                    .iter()
                    .map(|s| (s.name.clone(), s.partitions.len()))
                    .collect()
            },
        )
    }

    /// One full cleanup on every shard: forgets dead nodes and their
    /// counts, and removes expired user and group mappings (each node also
    /// runs a bounded pass every cleanup interval).
    pub async fn cleanup(&self) -> Result<crate::CleanupReport> {
        crate::cleanup::cleanup_everything(&self.shared).await
    }

    /// Waits until the subscriptions are live, at most `timeout`; true if
    /// they are.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |s| s.all(|l| l.subscribed)).await
    }

    /// Waits until the node can take publishes ([`Cluster::readiness`]),
    /// at most `timeout`; true if it can. Returns false early when an
    /// attempt to connect to Redis failed (the node keeps trying in the
    /// background).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |s| s.readiness().is_ok() || s.unreachable())
            .await
            && self.readiness().is_ok()
    }

    async fn wait_for(&self, timeout: Duration, f: impl Fn(&Shared) -> bool) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let shared = &self.shared;
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|_| f(shared))).await,
            Ok(Ok(_))
        )
    }
}

fn check_node_id(node: &str) -> Result<()> {
    if node.is_empty() || node.contains(['\n', ':', '*', ' ', '{', '}']) {
        return Err(Error::Config(format!(
            "node id {node:?} must be non-empty without newlines, colons, spaces, braces or `*`"
        )));
    }
    Ok(())
}

fn check_config(config: &ClusterConfig) -> Result<()> {
    if config.prefix.contains(['{', '}']) {
        return Err(Error::Config(format!(
            "key prefix {:?} must not contain braces: pgdn puts the partition in a hash tag",
            config.prefix
        )));
    }
    if config.partitions == 0 || config.partitions > crate::keys::MAX_PARTITIONS {
        return Err(Error::Config(format!(
            "partitions must be 1 to {}, not {}",
            crate::keys::MAX_PARTITIONS,
            config.partitions
        )));
    }
    Ok(())
}
