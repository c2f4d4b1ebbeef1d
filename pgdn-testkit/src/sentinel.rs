//! A private Redis Sentinel setup for tests: one master, one replica
//! (`replicaof` the master) and three sentinels (`redis-server <conf>
//! --sentinel`) that monitor the master with a quorum of 2, each a process
//! on a free port in its own temporary directory (a sentinel rewrites its
//! config file, so the file is its own and writable), with no persistence.
//!
//! The master is taken for down after 1 s without an answer
//! (`down-after-milliseconds 1000`, [`DOWN_AFTER`]) and a failover may
//! take 5 s before it is retried (`failover-timeout 5000`), so a killed or
//! paused master is replaced in a few seconds.
//!
//! Two periods of each sentinel are shortened at start with `SENTINEL
//! DEBUG`, so that the setup settles, and a change is seen, in about a
//! second: it says hello to the other sentinels every 0.5 s (not 2 s), and
//! asks the master for `INFO` every second (not 10 s; e.g. a resumed old
//! master is made a replica of its replacement that much sooner).

use std::time::Duration;

use crate::node::{Node, poll};
use crate::resp::{Reply, call, info_field};

/// The master name of [`RedisSentinel::start`].
pub const DEFAULT_MASTER_NAME: &str = "mymaster";

/// How long the master must not answer before a sentinel takes it for
/// down (`sentinel down-after-milliseconds`).
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// How long a failover may take before another is tried
/// (`sentinel failover-timeout`).
const FAILOVER_TIMEOUT: Duration = Duration::from_millis(5000);

/// How often a sentinel says hello to the others through the master and
/// replica (`SENTINEL DEBUG publish-period`; 2 s by default).
const PUBLISH_PERIOD: Duration = Duration::from_millis(500);

/// How often a sentinel asks the master for `INFO` (`SENTINEL DEBUG
/// info-period`; 10 s by default).
const INFO_PERIOD: Duration = Duration::from_millis(1000);

/// How many sentinels run.
const SENTINELS: usize = 3;

/// How long the setup may take to settle.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Log lines of each process shown in a panic message.
const LOG_LINES: usize = 15;

/// A master, its replica and three sentinels; all killed, and their
/// directories removed, when dropped.
#[derive(Debug)]
pub struct RedisSentinel {
    name: String,
    sentinels: Vec<Node>,
    master: Node,
    replica: Node,
}

/// A `SENTINEL ...` field as an integer.
fn int_field(reply: &Reply, key: &str) -> Option<i64> {
    reply.field(key).and_then(Reply::int)
}

/// A `SENTINEL ...` field as text.
fn text_field<'a>(reply: &'a Reply, key: &str) -> Option<&'a str> {
    reply.field(key).and_then(Reply::text)
}

impl RedisSentinel {
    /// Starts the setup with the master name [`DEFAULT_MASTER_NAME`]
    /// (`mymaster`); see [`start_named`](Self::start_named).
    ///
    /// # Panics
    /// As [`start_named`](Self::start_named).
    pub fn start() -> RedisSentinel {
        Self::start_named(DEFAULT_MASTER_NAME)
    }

    /// Starts the master, then the replica, waits until the replica is in
    /// sync (`master_link_status:up`, and the master lists it online),
    /// then starts the sentinels, monitoring the master as `name`, and
    /// waits until every sentinel knows the master (flags `master`), the
    /// replica (`num-slaves` 1, flags `slave`) and the two other sentinels
    /// (`num-other-sentinels` 2).
    ///
    /// # Panics
    /// When `redis-server` is not installed (with the command to install
    /// it), or when the setup has not settled within 20 s (with the last
    /// thing still missing and the end of each process's log).
    pub fn start_named(name: &str) -> RedisSentinel {
        let master = Node::start("sentinel-master", &[], |_| String::new());
        let master_port = master.port();
        let replica = Node::start("sentinel-replica", &[], |_| {
            format!("replicaof 127.0.0.1 {master_port}")
        });
        let mut setup = RedisSentinel {
            name: name.to_string(),
            sentinels: Vec::new(),
            master,
            replica,
        };
        // Sentinels ask the master for its replicas when they connect, then
        // only every 10 s: the replica must be there first.
        setup.wait_ready("the replica is in sync", RedisSentinel::replica_synced);
        let down_after = DOWN_AFTER.as_millis();
        let failover_timeout = FAILOVER_TIMEOUT.as_millis();
        setup.sentinels = (0..SENTINELS)
            .map(|_| {
                Node::start("sentinel", &["--sentinel"], |_| {
                    format!(
                        "sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                         sentinel down-after-milliseconds {name} {down_after}\n\
                         sentinel failover-timeout {name} {failover_timeout}\n\
                         sentinel parallel-syncs {name} 1"
                    )
                })
            })
            .collect();
        for sentinel in &setup.sentinels {
            let port = sentinel.port();
            let periods = [
                ("publish-period", PUBLISH_PERIOD),
                ("info-period", INFO_PERIOD),
            ];
            for (what, period) in periods {
                let ms = period.as_millis().to_string();
                if let Err(e) = call(port, &["SENTINEL", "DEBUG", what, &ms]) {
                    panic!("sentinel 127.0.0.1:{port} refuses `SENTINEL DEBUG {what}`: {e}");
                }
            }
        }
        setup.wait_ready(
            "every sentinel knows the master, the replica and the other sentinels",
            RedisSentinel::sentinels_know_all,
        );
        setup
    }

    /// Polls `check` until `Ok`, else panics naming `what` and the logs.
    fn wait_ready(&self, what: &str, check: fn(&RedisSentinel) -> Result<(), String>) {
        if let Err(e) = poll(READY_DEADLINE, || check(self)) {
            panic!(
                "the Redis Sentinel setup did not settle within {READY_DEADLINE:?} (waiting until \
                 {what}): {e}\n{}",
                self.logs()
            );
        }
    }

    /// `Ok` when the replica's link to the master is up and the master
    /// lists it online.
    fn replica_synced(&self) -> Result<(), String> {
        let (master, replica) = (self.master.port(), self.replica.port());
        let info = call(replica, &["INFO", "replication"])?;
        let link = info
            .text()
            .and_then(|i| info_field(i, "master_link_status"));
        if link != Some("up") {
            return Err(format!(
                "replica 127.0.0.1:{replica} has master_link_status:{}",
                link.unwrap_or("?")
            ));
        }
        let info = call(master, &["INFO", "replication"])?;
        let slave0 = info.text().and_then(|i| info_field(i, "slave0"));
        if !slave0.is_some_and(|s| s.contains(&format!("port={replica},state=online"))) {
            return Err(format!(
                "master 127.0.0.1:{master} lists its replica as slave0:{}",
                slave0.unwrap_or("(none)")
            ));
        }
        Ok(())
    }

    /// `Ok` when every sentinel knows the master, the replica and the other
    /// sentinels.
    fn sentinels_know_all(&self) -> Result<(), String> {
        let name = self.name.as_str();
        for sentinel in &self.sentinels {
            let port = sentinel.port();
            let master = call(port, &["SENTINEL", "MASTER", name])?;
            let known = (
                text_field(&master, "flags"),
                int_field(&master, "num-slaves"),
                int_field(&master, "num-other-sentinels"),
            );
            if known != (Some("master"), Some(1), Some(2)) {
                return Err(format!(
                    "sentinel 127.0.0.1:{port} sees {name} with (flags, num-slaves, \
                     num-other-sentinels) = {known:?}"
                ));
            }
            let replicas = call(port, &["SENTINEL", "REPLICAS", name])?;
            let replica = replicas.array().first();
            let seen = replica.map(|r| (text_field(r, "port"), text_field(r, "flags")));
            let expected = self.replica.port().to_string();
            if seen != Some((Some(expected.as_str()), Some("slave"))) {
                return Err(format!(
                    "sentinel 127.0.0.1:{port} sees the replica's (port, flags) as {seen:?}"
                ));
            }
        }
        Ok(())
    }

    /// The end of every process's log, for panic messages.
    fn logs(&self) -> String {
        let mut logs = self.master.log_tail("master", LOG_LINES);
        logs.push_str(&self.replica.log_tail("replica", LOG_LINES));
        for sentinel in &self.sentinels {
            logs.push_str(&sentinel.log_tail("sentinel", LOG_LINES));
        }
        logs
    }

    /// The name the sentinels monitor the master as.
    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// The ports of the sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(Node::port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Node::url).collect()
    }

    /// The port of the node started as the master (after a failover, no
    /// longer the master: [`wait_failover`](Self::wait_failover) tells the
    /// new one).
    pub fn master_port(&self) -> u16 {
        self.master.port()
    }

    /// `redis://127.0.0.1:<port>` of the node started as the master.
    pub fn master_url(&self) -> String {
        self.master.url()
    }

    /// The port of the node started as the replica.
    pub fn replica_port(&self) -> u16 {
        self.replica.port()
    }

    /// `redis://127.0.0.1:<port>` of the node started as the replica.
    pub fn replica_url(&self) -> String {
        self.replica.url()
    }

    /// Kills the node started as the master (`SIGKILL`, as a crash) and
    /// waits for the process to end.
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// Stops the node started as the master (`SIGSTOP`): it keeps its
    /// connections but answers nothing until
    /// [`resume_master`](Self::resume_master); after [`DOWN_AFTER`] the
    /// sentinels take it for down and fail over as for a killed one.
    ///
    /// # Panics
    /// When it was killed.
    pub fn pause_master(&self) {
        self.master.pause();
    }

    /// Resumes the paused master (`SIGCONT`). When it was replaced
    /// meanwhile, the sentinels make it a replica of its replacement.
    ///
    /// # Panics
    /// When it was killed.
    pub fn resume_master(&self) {
        self.master.resume();
    }

    /// Waits until the sentinels have replaced the node started as the
    /// master: every sentinel names another node for the master name
    /// (`SENTINEL GET-MASTER-ADDR-BY-NAME`), the same one, and that node
    /// answers `ROLE` as a master. Returns its port (the replica's: there
    /// is no other).
    ///
    /// # Panics
    /// When that has not happened within `timeout` (with the last thing
    /// still missing and the end of each process's log).
    pub fn wait_failover(&self, timeout: Duration) -> u16 {
        let old = self.master.port();
        let name = self.name.as_str();
        let replaced = || {
            let mut new_master = None;
            for sentinel in &self.sentinels {
                let port = sentinel.port();
                let addr = call(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", name])?;
                let named = addr
                    .array()
                    .get(1)
                    .and_then(Reply::int)
                    .and_then(|p| u16::try_from(p).ok());
                if named.is_none()
                    || named == Some(old)
                    || new_master.is_some_and(|m| Some(m) != named)
                {
                    return Err(format!(
                        "sentinel 127.0.0.1:{port} names {addr:?} for {name} (the old master is \
                         127.0.0.1:{old})"
                    ));
                }
                new_master = named;
            }
            let new_master = new_master.ok_or("no sentinel")?;
            let role = call(new_master, &["ROLE"])?;
            match role.array().first().and_then(Reply::text) {
                Some("master") => Ok(new_master),
                other => Err(format!("127.0.0.1:{new_master} answers ROLE {other:?}")),
            }
        };
        poll(timeout, replaced).unwrap_or_else(|e| {
            panic!(
                "no failover of {name} (127.0.0.1:{old}) within {timeout:?}: {e}\n{}",
                self.logs()
            )
        })
    }
}

impl Drop for RedisSentinel {
    /// Kills the sentinels first, so that none starts a failover while the
    /// master and replica go.
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            sentinel.kill();
        }
    }
}
