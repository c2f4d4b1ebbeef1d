//! What the parts of `cargo xtask bench --cluster` that look past one
//! Redis share (`redis_cost.rs`, `shards.rs`, `routing.rs`): which
//! pgdn-server build runs, starting three nodes on a Redis layout and
//! waiting until they take publishes, and publishing many messages from
//! several tasks.
//!
//! Two builds can be measured: **after**, the pgdn-server of this
//! workspace (or `--pgdn-bin`), run with `--redis-mode`; and **before**,
//! the binary `--before-bin` names, built from the commit before the
//! partitioned data model (`b8b4e73`), which has no `--redis-mode` and is
//! only given `--redis-url` and `--node-id`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::client::Publisher;
use super::procs::ServerProcess;
use super::{BROADCAST, Credentials, Options, PHASE_WARMUP, pgdn_bin, start_pgdn};

/// Which pgdn-server build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Build {
    /// `--before-bin`: one global counter, group and broadcast messages on
    /// one channel every node listens to.
    Before,
    /// This workspace's: partitions, sharded pub/sub to the nodes that
    /// need a message.
    After,
}

impl Build {
    /// How tables name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Build::Before => "before",
            Build::After => "after",
        }
    }

    /// The binary of this build.
    pub(crate) fn bin(self, opts: &Options, bin_dir: &Path) -> PathBuf {
        match self {
            Build::Before => opts
                .before_bin
                .clone()
                .expect("Build::Before is only measured with --before-bin"),
            Build::After => pgdn_bin(opts, bin_dir),
        }
    }

    /// The builds to compare: before (when `--before-bin` is given) and
    /// after.
    pub(crate) fn all(opts: &Options) -> Vec<Build> {
        if opts.before_bin.is_some() {
            vec![Build::Before, Build::After]
        } else {
            vec![Build::After]
        }
    }
}

/// Running pgdn nodes on one Redis layout.
pub(crate) struct Nodes {
    /// Each node's process and `host:port`, node 1 first.
    servers: Vec<(ServerProcess, String)>,
    /// One publisher per node.
    pub(crate) publishers: Vec<Arc<Publisher>>,
}

impl Nodes {
    /// Starts `count` nodes `n1..` of `build` on the Redis layout
    /// `(mode, url)` (`--redis-url <url>`, and for the after build
    /// `--redis-mode <mode>`), each taking up to `max_connections`
    /// connections; publishes carry `padding` filler bytes.
    pub(crate) fn start(
        bin: &Path,
        build: Build,
        creds: &Credentials,
        count: usize,
        (mode, url): (&str, &str),
        max_connections: usize,
        padding: usize,
    ) -> Result<Nodes, String> {
        let max = max_connections.to_string();
        let mut servers = Vec::new();
        for k in 0..count {
            let node_id = format!("n{}", k + 1);
            let mut args = vec![
                "--max-connections",
                &max,
                "--redis-url",
                url,
                "--node-id",
                &node_id,
            ];
            if build == Build::After {
                args.extend(["--redis-mode", mode]);
            }
            servers.push(start_pgdn(bin, "pgdn-server", creds, &args)?);
        }
        let publishers = servers
            .iter()
            .map(|(_, addr)| {
                Arc::new(Publisher::new(
                    format!("http://{addr}/api/v1/publish"),
                    Some(format!("Bearer {}", creds.key)),
                    padding,
                ))
            })
            .collect();
        Ok(Nodes {
            servers,
            publishers,
        })
    }

    /// Each node's `host:port`, node 1 first.
    pub(crate) fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|(_, a)| a.clone()).collect()
    }

    /// Each node's process id, node 1 first.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.servers.iter().map(|(p, _)| p.pid()).collect()
    }

    /// Waits (at most 60 s) until every node answers a publish: a
    /// broadcast in the warm-up phase, retried while the node says 503
    /// (on an empty Redis the partitions settle for a few seconds first).
    pub(crate) async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (k, publisher) in self.publishers.iter().enumerate() {
            loop {
                match publisher.publish(BROADCAST, PHASE_WARMUP).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!("node {} never took a publish: {e}", k + 1));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        Ok(())
    }

    /// Stops every node.
    pub(crate) fn stop(self) {
        drop(self.publishers);
        for (process, _) in self.servers {
            eprintln!("xtask bench: {}", process.stop(Duration::from_secs(20)));
        }
    }
}

/// Publishes `count` messages in `phase` from `tasks` concurrent tasks,
/// message `i` to `target(i)` through node `i mod nodes`, and with a
/// `rate` (per second) not before `i / rate` seconds from the start;
/// returns once every publish was answered.
pub(crate) async fn publish_many(
    publishers: &[Arc<Publisher>],
    target: Arc<dyn Fn(u64) -> String + Send + Sync>,
    phase: usize,
    count: u64,
    tasks: usize,
    rate: Option<f64>,
) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let (next, target) = (next.clone(), target.clone());
        let publishers = publishers.to_vec();
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), String>(());
                }
                if let Some(rate) = rate {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate))
                        .await;
                }
                let publisher = &publishers[i as usize % publishers.len()];
                publisher.publish(&target(i), phase).await?;
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.map_err(|e| format!("publisher task: {e}"))??;
    }
    Ok(())
}

/// The WebSocket URL of `user` in `groups` on the node at `addr`.
pub(crate) fn ws_url(
    creds: &Credentials,
    addr: &str,
    user: &str,
    groups: &[&str],
) -> Result<String, String> {
    Ok(format!(
        "ws://{addr}/ws?token={}",
        creds.token(user, groups)?
    ))
}
