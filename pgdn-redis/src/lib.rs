//! Redis implementations of pgdn-core's cluster traits, so that many pgdn
//! nodes behind a load balancer share Redis: one server, independent
//! shards, Redis Cluster or Sentinel (docs/protocol.md section 6).
//!
//! ```no_run
//! # async fn run() -> Result<(), pgdn_redis::Error> {
//! let cluster = pgdn_redis::Cluster::connect(
//!     "redis://127.0.0.1:6379",
//!     "node-a",
//!     pgdn_redis::ClusterConfig::default(),
//! )
//! .await?;
//! let hub = cluster.hub_builder().build(); // starts the node's background tasks
//! # let _ = hub;
//! # Ok(())
//! # }
//! ```
//!
//! # What goes where
//!
//! Users, groups and message ids hash to partitions (128 by default); every
//! key carries its partition as a hash tag (`pgdn:{17}:user:alice`), so the
//! same scripts run on one Redis, on independent shards ([`RedisMode`]),
//! on Redis Cluster and behind Sentinel. A publish runs one Lua script per
//! partition it touches: it drops a repeated id, numbers the message with
//! the partition's counter (which follows Redis's clock), keeps it in the
//! history of each target user, and `SPUBLISH`es it only to the nodes that
//! need it: a user message to the nodes holding that user, a group message
//! to those holding a member, a broadcast once to every node. Every node,
//! the publishing one included, delivers what arrives on its sharded
//! subscriptions (one per shard), so a user's connections see one order.
//! Each node refreshes its liveness and its users' and groups' mappings on
//! a heartbeat; a cleanup pass (SCAN, bounded) removes what dead nodes
//! left.
//!
//! # Layout
//!
//! - [`cluster`]: [`Cluster`], the node's connection to Redis and the
//!   factory of the pieces below; [`ClusterConfig`].
//! - [`broker`]: [`RedisBroker`], cross-node fan-out.
//! - [`session`]: [`RedisSessionTracker`], user -> nodes, liveness,
//!   heartbeat and cluster stats.
//! - [`history`]: [`RedisHistory`], per-user windows for resume.
//! - [`cleanup`]: the stale-mapping cleanup pass.
//! - [`emitter`]: [`Emitter`], publishing straight into Redis from a batch
//!   job.
//! - `link`: the background tasks that keep the node's link to Redis
//!   (reconnect, PING, resubscribe, heartbeat) and decide when it is ready.
//! - `keys`, `scripts`: partitions, key names and the Lua scripts.
//! - `shard`, `slots`: the shards a deployment spreads its partitions over
//!   ([`RedisMode`]), and following Redis Cluster's slots.
//! - `subscriber`: the sharded pub/sub connection to one master.
//! - `tls`: the Redis client for `redis://` and `rediss://` URLs (feature
//!   `tls`, on by default), with a private CA from
//!   [`ClusterConfig::redis_ca_cert`].
//! - [`error`]: the crate's [`Error`].

pub mod broker;
pub mod cleanup;
pub mod cluster;
pub mod emitter;
pub mod error;
pub mod history;
mod keys;
mod link;
mod scripts;
pub mod session;
mod shard;
mod slots;
mod subscriber;
mod tls;

pub use broker::RedisBroker;
pub use cleanup::{CleanupReport, cleanup_all, cleanup_pass};
pub use cluster::{Cluster, ClusterConfig};
pub use emitter::Emitter;
pub use error::{Error, Result};
pub use history::RedisHistory;
pub use session::RedisSessionTracker;
pub use shard::RedisMode;

/// `url` with any password replaced by `***`, for logs and messages.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => format!("{}***{}", &url[..s + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}
