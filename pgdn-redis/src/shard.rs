//! Shards: the Redis masters a deployment spreads its partitions over,
//! and how a node finds them.
//!
//! One code path serves every deployment ([`RedisMode`]): a single Redis is
//! one shard holding every partition; independent shards split the
//! partitions by number; Sentinel is one shard whose address the sentinels
//! give (again after a failover); Redis Cluster has a shard per master,
//! each holding the partitions whose hash tag falls in its slots (and the
//! node follows the slots when they move).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use redis::aio::ConnectionManager;
use tokio::sync::{Notify, watch};

use crate::cluster::LinkState;
use crate::error::{Error, Result};

/// How the deployment's Redis is laid out. The same data model and the
/// same scripts run on each; only how a node finds the shard of a
/// partition differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisMode {
    /// One Redis (or Valkey): every partition on it. The default.
    #[default]
    Single,
    /// Several independent Redis instances (a list of URLs): partition `p`
    /// lives on the `p mod n`-th. The simplest way to grow: each shard
    /// carries its share of users, history and pub/sub. The list (its
    /// order too) must be the same on every node and emitter.
    Shards,
    /// Redis Cluster 7+ (any of its nodes' URLs, a list for more seeds):
    /// each partition lives on the master owning its hash tag's slot, and
    /// messages travel by sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) to
    /// that master only.
    Cluster,
    /// Redis Sentinel (the sentinels' URLs): one master, found through the
    /// sentinels, and found again after a failover.
    Sentinel,
}

impl std::str::FromStr for RedisMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "single" => Ok(RedisMode::Single),
            "shards" => Ok(RedisMode::Shards),
            "cluster" => Ok(RedisMode::Cluster),
            "sentinel" => Ok(RedisMode::Sentinel),
            other => Err(format!(
                "unknown redis mode {other:?}: use single, shards, cluster or sentinel"
            )),
        }
    }
}

impl std::fmt::Display for RedisMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisMode::Single => "single",
            RedisMode::Shards => "shards",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        })
    }
}

/// Splits a comma-separated list of URLs.
pub(crate) fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

/// How a shard's current master is found.
#[derive(Debug, Clone)]
pub(crate) enum Locator {
    /// A fixed address.
    Fixed(redis::Client),
    /// Ask the sentinels (in order) for the master's address.
    Sentinel {
        sentinels: Vec<redis::Client>,
        master: String,
        /// Scheme of the master's URL (`redis` or `rediss`).
        secure: bool,
        ca_cert: Option<Vec<u8>>,
    },
}

impl Locator {
    /// A client for the shard's master now.
    pub(crate) async fn client(&self, timeout: std::time::Duration) -> Result<redis::Client> {
        match self {
            Locator::Fixed(c) => Ok(c.clone()),
            Locator::Sentinel {
                sentinels,
                master,
                secure,
                ca_cert,
            } => {
                let mut last = None;
                for s in sentinels {
                    let ask = async {
                        let mut conn = s.get_multiplexed_async_connection().await?;
                        redis::cmd("SENTINEL")
                            .arg("get-master-addr-by-name")
                            .arg(master)
                            .query_async::<Option<(String, u16)>>(&mut conn)
                            .await
                    };
                    match tokio::time::timeout(timeout, ask).await {
                        Ok(Ok(Some((host, port)))) => {
                            let scheme = if *secure { "rediss" } else { "redis" };
                            return crate::tls::client(
                                &format!("{scheme}://{host}:{port}"),
                                ca_cert.as_deref(),
                            );
                        }
                        Ok(Ok(None)) => {
                            last = Some(format!("sentinels do not know master {master:?}"))
                        }
                        Ok(Err(e)) => last = Some(format!("sentinel: {e}")),
                        Err(_) => last = Some("sentinel did not answer in time".into()),
                    }
                }
                Err(Error::Unavailable(
                    last.unwrap_or_else(|| "no sentinel configured".into()),
                ))
            }
        }
    }

    /// Whether a connection must check that it reached a master (the
    /// sentinels' answer may be out of date during a failover).
    pub(crate) fn must_be_master(&self) -> bool {
        matches!(self, Locator::Sentinel { .. })
    }
}

/// One Redis master and the partitions it holds, with this node's link
/// to it: the command connection and the state the link tasks keep
/// ([`LinkState`]).
pub(crate) struct Shard {
    /// For logs: the master's address, or the sentinels' master name.
    pub(crate) name: String,
    pub(crate) locator: Locator,
    /// The client of the master last found ([`Locator::client`]).
    pub(crate) client: Mutex<Option<redis::Client>>,
    /// The run id of the master the command connection reached: the
    /// partitions' clocks settle when it changes (a failover).
    pub(crate) run_id: Mutex<String>,
    /// The command connection; `None` while Redis is unreachable or after
    /// it stopped answering (then the link task makes a new one: a
    /// half-open connection is not waited out).
    pub(crate) conn: Mutex<Option<ConnectionManager>>,
    /// The partitions this shard holds, in order.
    pub(crate) partitions: Vec<u16>,
    /// See [`LinkState`].
    pub(crate) state: watch::Sender<LinkState>,
    /// Bumped whenever the node's registration on this shard may have been
    /// lost (a new subscription, a failed command): a heartbeat that
    /// started before does not count.
    pub(crate) epoch: AtomicU64,
    /// Wakes the heartbeat at once (after a reconnect or a failure).
    pub(crate) heartbeat_now: Notify,
    /// Wakes the command link's PING (the clock's touch) at once.
    pub(crate) touch_now: Notify,
    /// Set when the shard is no longer part of the topology (its slots
    /// moved): its tasks end.
    pub(crate) retired: AtomicBool,
    /// Set once the subscription and heartbeat tasks run.
    pub(crate) node_tasks: AtomicBool,
    /// The node's own change signal, bumped with every state change here.
    pub(crate) changed: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("name", &self.name)
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

impl Shard {
    pub(crate) fn new(
        name: String,
        locator: Locator,
        partitions: Vec<u16>,
        changed: Arc<watch::Sender<u64>>,
    ) -> Shard {
        let client = match &locator {
            Locator::Fixed(c) => Some(c.clone()),
            Locator::Sentinel { .. } => None,
        };
        Shard {
            name,
            locator,
            client: Mutex::new(client),
            run_id: Mutex::new(String::new()),
            conn: Mutex::new(None),
            partitions,
            state: watch::Sender::new(LinkState {
                // Unknown until the first touch of the clock.
                settling: true,
                ..LinkState::default()
            }),
            epoch: AtomicU64::new(0),
            heartbeat_now: Notify::new(),
            touch_now: Notify::new(),
            retired: AtomicBool::new(false),
            node_tasks: AtomicBool::new(false),
            changed,
        }
    }

    /// The command connection, or an error while there is none.
    pub(crate) fn conn(&self) -> Result<ConnectionManager> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::Unavailable(format!("redis {} unreachable", self.name)))
    }

    pub(crate) fn run_id(&self) -> String {
        self.run_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_run_id(&self, run_id: String) {
        *self.run_id.lock().unwrap_or_else(|e| e.into_inner()) = run_id;
    }

    pub(crate) fn set_conn(&self, conn: Option<ConnectionManager>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// The master's client last found, if any.
    pub(crate) fn client(&self) -> Option<redis::Client> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_client(&self, client: redis::Client) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut LinkState)) {
        let modified = self.state.send_if_modified(|s| {
            let before = *s;
            f(s);
            before != *s
        });
        if modified {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// This node's registration on the shard may be gone (Redis failed a
    /// command, restarted, or the subscription was renewed): refuse
    /// publishes until a heartbeat has written it again, and run one now.
    ///
    /// Whether the shard's partitions are settling is unknown too until
    /// the clocks are touched again (at once): Redis may have restarted.
    pub(crate) fn registration_lost(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.update(|s| {
            s.registered = false;
            s.settling = true;
        });
        self.heartbeat_now.notify_one();
        self.touch_now.notify_one();
    }
}

/// Which shard holds each partition.
#[derive(Debug)]
pub(crate) struct Topology {
    pub(crate) shards: Vec<Arc<Shard>>,
    /// Partition -> index in `shards`.
    pub(crate) owner: Vec<usize>,
}

impl Topology {
    /// The shard of partition `p`.
    pub(crate) fn shard(&self, p: u16) -> &Arc<Shard> {
        &self.shards[self.owner[p as usize]]
    }

    /// Spreads `partitions` over `n` shards: partition `p` on shard `p mod
    /// n`.
    pub(crate) fn by_modulo(partitions: u16, n: usize) -> Vec<Vec<u16>> {
        let mut out = vec![Vec::new(); n];
        for p in 0..partitions {
            out[p as usize % n].push(p);
        }
        out
    }

    /// Builds the owner table of `shards`.
    pub(crate) fn new(shards: Vec<Arc<Shard>>, partitions: u16) -> Topology {
        let mut owner = vec![0; partitions as usize];
        for (i, s) in shards.iter().enumerate() {
            for &p in &s.partitions {
                owner[p as usize] = i;
            }
        }
        Topology { shards, owner }
    }
}

/// The Redis Cluster slot of a key's hash tag (CRC16/XMODEM mod 16384, as
/// Redis computes it). Written here (a dozen lines) rather than reaching
/// into redis-rs's cluster internals.
pub(crate) fn slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("123456789"), 12739);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("Cluster".parse::<RedisMode>(), Ok(RedisMode::Cluster));
        assert!("raft".parse::<RedisMode>().unwrap_err().contains("single"));
    }
}
