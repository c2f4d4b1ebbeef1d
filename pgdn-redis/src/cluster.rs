//! [`Cluster`]: one node's link to the shared Redis, and the factory of its
//! broker, session tracker and history.

use std::collections::HashMap;
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
    /// For a `rediss://` URL: the CA certificate(s), PEM, that the Redis
    /// server's certificate must chain to, instead of the public webpki
    /// roots (a private PKI). Default `None`. Needs the `tls` feature.
    pub redis_ca_cert: Option<Vec<u8>>,
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

/// State shared by the broker, tracker, history and background tasks.
pub(crate) struct Shared {
    pub(crate) client: redis::Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) node: String,
    pub(crate) config: ClusterConfig,
    pub(crate) keys: Keys,
    pub(crate) local: Mutex<Local>,
    pub(crate) hub: OnceLock<WeakHub>,
    /// Set while this node's subscription is live: without it the node
    /// would miss messages, so it refuses to take publishes.
    pub(crate) subscribed: watch::Sender<bool>,
    /// Wakes the heartbeat at once (after a reconnect to Redis).
    pub(crate) heartbeat_now: Notify,
}

impl Shared {
    pub(crate) fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(crate) fn ttl_ms(&self) -> u64 {
        self.config.node_ttl.as_millis() as u64
    }

    pub(crate) fn hub(&self) -> Option<Hub> {
        self.hub.get().and_then(WeakHub::upgrade)
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

pub(crate) async fn connect_manager(
    url: &str,
    timeout: Duration,
    ca_cert: Option<&[u8]>,
) -> Result<(redis::Client, ConnectionManager)> {
    let client = crate::tls::client(url, ca_cert)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2));
    let mut conn = client.get_connection_manager_with_config(config).await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok((client, conn))
}

impl Cluster {
    /// Connects node `node` to the Redis at `url` (e.g.
    /// `redis://127.0.0.1:6379`). Fails if Redis cannot be reached now;
    /// later outages are survived.
    pub async fn connect(url: &str, node: &str, config: ClusterConfig) -> Result<Cluster> {
        if node.is_empty() || node.contains(['\n', ':', '*', ' ']) {
            return Err(Error::Corrupt(format!(
                "node id {node:?} must be non-empty without newlines, colons, spaces or `*`"
            )));
        }
        let (client, conn) =
            connect_manager(url, config.command_timeout, config.redis_ca_cert.as_deref()).await?;
        Ok(Cluster {
            shared: Arc::new(Shared {
                client,
                conn,
                node: node.to_string(),
                keys: Keys::new(&config.prefix),
                config,
                local: Mutex::new(Local::default()),
                hub: OnceLock::new(),
                subscribed: watch::Sender::new(false),
                heartbeat_now: Notify::new(),
            }),
        })
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

    /// Whether the node's subscription to Redis is live (it takes
    /// publishes only then).
    pub fn is_subscribed(&self) -> bool {
        *self.shared.subscribed.borrow()
    }

    /// Waits until the subscription is live, at most `timeout`; true if it
    /// is.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.subscribed.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }
}
