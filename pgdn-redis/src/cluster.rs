//! [`Cluster`]: one node's link to the shared Redis, and the factory of its
//! broker, session tracker and history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use pgdn_core::{HistoryConfig, Hub, HubBuilder, WeakHub};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, watch};

use crate::broker::RedisBroker;
use crate::error::{Error, Result};
use crate::history::RedisHistory;
use crate::keys::Keys;
use crate::session::RedisSessionTracker;

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
    /// Most users one `users` target may list. A publish runs as one Lua
    /// script, which blocks Redis while it writes each user's history and
    /// looks up each user's nodes; a longer list is refused (400 at the
    /// API, [`pgdn_core::Error::InvalidPublish`] to a caller) rather than
    /// split, because a split publish could no longer be numbered and
    /// stored atomically with its delivery. Default 1,000: a few
    /// milliseconds of Redis time (about 4 commands per user; 80,000 users
    /// once blocked Redis for 645 ms). Send longer lists as several
    /// publishes (a batch takes up to 1,000), or use a group.
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
    /// has written its sessions).
    pub(crate) fn settle_time(&self) -> Duration {
        self.ping_interval + self.command_timeout
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
        }
    }
}

/// What this node holds: connections per user and per group, for the
/// heartbeat.
#[derive(Debug, Default)]
pub(crate) struct Local {
    pub(crate) users: HashMap<String, u64>,
    pub(crate) groups: HashMap<String, u64>,
}

/// How the node stands with Redis. It takes publishes only when all three
/// hold: otherwise a publish could be answered 200 and reach nobody (a
/// message published while this node is not subscribed is lost for it; a
/// message to a user whose mapping Redis lost, after a restart or a stall
/// longer than the node TTL, is routed nowhere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LinkState {
    /// The command connection answered its last PING.
    pub(crate) connected: bool,
    /// The pub/sub subscription is live (and answered its last PING).
    pub(crate) subscribed: bool,
    /// A heartbeat completed since the last subscription and since the last
    /// failure: Redis holds this node's liveness key and every mapping of
    /// its users and groups.
    pub(crate) registered: bool,
    /// The last attempt to connect failed.
    pub(crate) unreachable: bool,
    /// Redis was away or restarted, and the cluster waits for every node
    /// to register again (the publish script's clock).
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
    pub(crate) client: redis::Client,
    /// The command connection; `None` while Redis is unreachable or after
    /// it stopped answering (then the link task makes a new one: a
    /// half-open connection is not waited out).
    pub(crate) conn: Mutex<Option<ConnectionManager>>,
    pub(crate) node: String,
    pub(crate) config: ClusterConfig,
    pub(crate) keys: Keys,
    pub(crate) local: Mutex<Local>,
    pub(crate) hub: OnceLock<WeakHub>,
    /// See [`LinkState`].
    pub(crate) state: watch::Sender<LinkState>,
    /// Bumped whenever the node's registration in Redis may have been lost
    /// (a new subscription, a failed command): a heartbeat that started
    /// before does not count.
    pub(crate) epoch: AtomicU64,
    /// Wakes the heartbeat at once (after a reconnect or a failure).
    pub(crate) heartbeat_now: Notify,
    /// Wakes the command link's PING (the clock's touch) at once.
    pub(crate) touch_now: Notify,
}

impl Shared {
    pub(crate) fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The command connection, or an error while there is none.
    pub(crate) fn conn(&self) -> Result<ConnectionManager> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::Unavailable("redis unreachable".into()))
    }

    pub(crate) fn set_conn(&self, conn: Option<ConnectionManager>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    pub(crate) fn ttl_ms(&self) -> u64 {
        self.config.node_ttl.as_millis() as u64
    }

    pub(crate) fn hub(&self) -> Option<Hub> {
        self.hub.get().and_then(WeakHub::upgrade)
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut LinkState)) {
        self.state.send_if_modified(|s| {
            let before = *s;
            f(s);
            before != *s
        });
    }

    /// Whether the node can take publishes now, or why not.
    pub(crate) fn readiness(&self) -> std::result::Result<(), &'static str> {
        self.state.borrow().readiness()
    }

    /// This node's registration in Redis may be gone (Redis failed a
    /// command, restarted, or the subscription was renewed): refuse
    /// publishes until a heartbeat has written it again, and run one now.
    ///
    /// Whether the cluster is settling is unknown too until the clock is
    /// touched again (at once): Redis may have restarted.
    pub(crate) fn registration_lost(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.update(|s| {
            s.registered = false;
            s.settling = true;
        });
        self.heartbeat_now.notify_one();
        self.touch_now.notify_one();
    }
}

/// One node's connection to the shared Redis. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.shared.node)
            .finish_non_exhaustive()
    }
}

/// A connection manager on `client` that fails fast: commands time out
/// after `timeout`, and so does connecting.
pub(crate) async fn manager(
    client: &redis::Client,
    timeout: Duration,
) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2));
    let connect = async {
        let mut conn = client.get_connection_manager_with_config(config).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok::<_, Error>(conn)
    };
    // The manager's own timeouts do not cover every step of a handshake
    // with a Redis that accepts TCP but never answers (stopped, half-open).
    tokio::time::timeout(timeout * 2, connect)
        .await
        .map_err(|_| Error::Unavailable("redis did not answer in time".into()))?
}

pub(crate) async fn connect_manager(
    url: &str,
    timeout: Duration,
    ca_cert: Option<&[u8]>,
) -> Result<(redis::Client, ConnectionManager)> {
    let client = crate::tls::client(url, ca_cert)?;
    let conn = manager(&client, timeout).await?;
    Ok((client, conn))
}

impl Cluster {
    /// Connects node `node` to the Redis at `url` (e.g.
    /// `redis://127.0.0.1:6379`). Fails if Redis cannot be reached now;
    /// later outages are survived. A server that must come up while Redis
    /// is still down uses [`Cluster::start`].
    pub async fn connect(url: &str, node: &str, config: ClusterConfig) -> Result<Cluster> {
        check_node_id(node)?;
        let (client, conn) =
            connect_manager(url, config.command_timeout, config.redis_ca_cert.as_deref()).await?;
        Ok(Cluster::with(client, Some(conn), node, config))
    }

    /// Starts node `node` on the Redis at `url` without waiting for it:
    /// the node connects in the background, retrying with backoff (and
    /// logging why) for as long as Redis is away. Until it is connected,
    /// subscribed and registered, [`Cluster::readiness`] says why not, and
    /// publishes fail (503) rather than being accepted and lost. Fails only
    /// on a malformed URL or node id. Call inside a tokio runtime.
    pub fn start(url: &str, node: &str, config: ClusterConfig) -> Result<Cluster> {
        check_node_id(node)?;
        let client = crate::tls::client(url, config.redis_ca_cert.as_deref())?;
        Ok(Cluster::with(client, None, node, config))
    }

    fn with(
        client: redis::Client,
        conn: Option<ConnectionManager>,
        node: &str,
        config: ClusterConfig,
    ) -> Cluster {
        let connected = conn.is_some();
        let shared = Arc::new(Shared {
            client,
            conn: Mutex::new(conn),
            node: node.to_string(),
            keys: Keys::new(&config.prefix),
            config,
            local: Mutex::new(Local::default()),
            hub: OnceLock::new(),
            state: watch::Sender::new(LinkState {
                connected,
                // Unknown until the first touch of the clock.
                settling: true,
                ..LinkState::default()
            }),
            epoch: AtomicU64::new(0),
            heartbeat_now: Notify::new(),
            touch_now: Notify::new(),
        });
        tokio::spawn(crate::link::command_link(Arc::downgrade(&shared)));
        Cluster { shared }
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
    /// subscription, heartbeat and periodic cleanup; they stop when the
    /// hub is dropped.
    pub fn hub_builder(&self) -> HubBuilder {
        Hub::builder()
            .node_id(self.shared.node.clone())
            .broker(Arc::new(self.broker()))
            .session_tracker(Arc::new(self.session_tracker()))
            .history(Arc::new(self.history()))
    }

    /// Whether the node's subscription to Redis is live.
    pub fn is_subscribed(&self) -> bool {
        self.shared.state.borrow().subscribed
    }

    /// Whether the node can take publishes now: connected to Redis,
    /// subscribed, and its sessions registered there. `Err` says why not.
    pub fn readiness(&self) -> std::result::Result<(), &'static str> {
        self.shared.readiness()
    }

    /// Waits until the subscription is live, at most `timeout`; true if it
    /// is.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |s| s.subscribed).await
    }

    /// Waits until the node can take publishes ([`Cluster::readiness`]),
    /// at most `timeout`; true if it can. Returns false early when an
    /// attempt to connect to Redis failed (the node keeps trying in the
    /// background).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |s| s.readiness().is_ok() || s.unreachable)
            .await
            && self.readiness().is_ok()
    }

    async fn wait_for(&self, timeout: Duration, f: impl Fn(&LinkState) -> bool) -> bool {
        let mut rx = self.shared.state.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| f(s))).await,
            Ok(Ok(_))
        )
    }
}

fn check_node_id(node: &str) -> Result<()> {
    if node.is_empty() || node.contains(['\n', ':', '*', ' ']) {
        return Err(Error::Corrupt(format!(
            "node id {node:?} must be non-empty without newlines, colons, spaces or `*`"
        )));
    }
    Ok(())
}
