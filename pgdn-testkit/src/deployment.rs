//! [`RedisDeployment`]: any of the Redis layouts pgdn runs on, started the
//! same way, so that one test runs on each.

use crate::{RedisCluster, RedisSentinel, RedisServer};

/// The layouts, by the name pgdn's `--redis-mode` gives them.
pub const REDIS_MODES: [&str; 4] = ["single", "shards", "cluster", "sentinel"];

/// A private Redis in one of pgdn's layouts. Killed when dropped.
#[derive(Debug)]
pub enum RedisDeployment {
    /// One `redis-server`.
    Single(RedisServer),
    /// Three independent `redis-server`s.
    Shards(Vec<RedisServer>),
    /// A Redis Cluster of three masters with one replica each.
    Cluster(RedisCluster),
    /// A master, a replica and three sentinels.
    Sentinel(RedisSentinel),
}

impl RedisDeployment {
    /// Starts the layout named `mode` (one of [`REDIS_MODES`]).
    ///
    /// # Panics
    /// On an unknown mode, or when the servers cannot be started.
    pub fn start(mode: &str) -> RedisDeployment {
        match mode {
            "single" => RedisDeployment::Single(RedisServer::start()),
            "shards" => RedisDeployment::Shards(RedisServer::start_many(3)),
            "cluster" => RedisDeployment::Cluster(RedisCluster::start(3, 1)),
            "sentinel" => RedisDeployment::Sentinel(RedisSentinel::start()),
            other => panic!("unknown redis mode {other:?}; one of {REDIS_MODES:?}"),
        }
    }

    /// The layout's `--redis-mode`.
    pub fn mode(&self) -> &'static str {
        match self {
            RedisDeployment::Single(_) => "single",
            RedisDeployment::Shards(_) => "shards",
            RedisDeployment::Cluster(_) => "cluster",
            RedisDeployment::Sentinel(_) => "sentinel",
        }
    }

    /// The layout's `--redis-url`: the server, the shards in order, the
    /// cluster's nodes or the sentinels, comma-separated.
    pub fn url(&self) -> String {
        match self {
            RedisDeployment::Single(r) => r.url(),
            RedisDeployment::Shards(rs) => rs
                .iter()
                .map(RedisServer::url)
                .collect::<Vec<_>>()
                .join(","),
            RedisDeployment::Cluster(c) => c.urls().join(","),
            RedisDeployment::Sentinel(s) => s.sentinel_urls().join(","),
        }
    }

    /// The URL of one server holding data, for tests that look inside:
    /// the single server, the first shard, the cluster's first master, the
    /// sentinels' master.
    pub fn data_url(&self) -> String {
        match self {
            RedisDeployment::Single(r) => r.url(),
            RedisDeployment::Shards(rs) => rs[0].url(),
            RedisDeployment::Cluster(c) => c.seed_url(),
            RedisDeployment::Sentinel(s) => s.master_url(),
        }
    }
}
