//! A private Redis Cluster for tests: `masters` masters with `replicas`
//! replicas each, every node a `redis-server` on free ports (client port and
//! cluster bus port, `cluster-port`) in its own temporary directory, with
//! no persistence, made into a cluster by `redis-cli --cluster create`.
//!
//! The node timeout (`cluster-node-timeout`) is short, 1 s unless chosen
//! with [`RedisCluster::start_with_node_timeout`], so that a killed or
//! paused master fails over in a few seconds.
//!
//! `cluster-require-full-coverage` keeps Redis's default, `yes`: while a
//! master is down and not yet replaced, the cluster is down
//! (`CLUSTERDOWN`) for every slot, as a production cluster with the
//! default configuration is; a client under test sees those errors until
//! the failover ends.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::free_port;
use crate::node::{Node, poll};
use crate::resp::{Reply, call, info_field, redis_cli_bin};

/// The number of hash slots of a Redis Cluster (slots `0..16384`).
pub const CLUSTER_SLOT_COUNT: u16 = 16384;

/// The node timeout of [`RedisCluster::start`].
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(1000);

/// How long creating the cluster and waiting for it to settle may take.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Log lines of each node shown in a panic message.
const LOG_LINES: usize = 15;

/// A range of slots as a node sees it (`CLUSTER SLOTS`): its master's port
/// and its replicas' ports (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SlotRange {
    start: u16,
    end: u16,
    master: u16,
    replicas: Vec<u16>,
}

/// A node's view of the slots, sorted by first slot.
type View = Vec<SlotRange>;

/// Reads a `CLUSTER SLOTS` reply.
fn parse_slots(reply: &Reply) -> Result<View, String> {
    let port_of = |node: &Reply| {
        node.array()
            .get(1)
            .and_then(Reply::int)
            .and_then(|p| u16::try_from(p).ok())
    };
    let mut view = Vec::new();
    for entry in reply.array() {
        let items = entry.array();
        let slot = |i: usize| {
            items
                .get(i)
                .and_then(Reply::int)
                .and_then(|s| u16::try_from(s).ok())
        };
        let (Some(start), Some(end), Some(master)) =
            (slot(0), slot(1), items.get(2).and_then(port_of))
        else {
            return Err(format!("unexpected CLUSTER SLOTS entry {entry:?}"));
        };
        let mut replicas: Vec<u16> = items[3..].iter().filter_map(port_of).collect();
        replicas.sort_unstable();
        view.push(SlotRange {
            start,
            end,
            master,
            replicas,
        });
    }
    view.sort_by_key(|r| r.start);
    Ok(view)
}

/// A view in short: `0-5460@40001[40004] ...`.
fn describe(view: &[SlotRange]) -> String {
    let ranges: Vec<String> = view
        .iter()
        .map(|r| format!("{}-{}@{}{:?}", r.start, r.end, r.master, r.replicas))
        .collect();
    format!("[{}]", ranges.join(" "))
}

/// The port of the master of `slot` in `view`.
fn master_at(view: &[SlotRange], slot: u16) -> Option<u16> {
    view.iter()
        .find(|r| (r.start..=r.end).contains(&slot))
        .map(|r| r.master)
}

/// `127.0.0.1:<port>`'s view of the slots.
fn slots_view(port: u16) -> Result<View, String> {
    parse_slots(&call(port, &["CLUSTER", "SLOTS"])?)
}

/// `Ok` when `127.0.0.1:<port>` says `cluster_state:ok`.
fn state_ok(port: u16) -> Result<(), String> {
    let info = call(port, &["CLUSTER", "INFO"])?;
    match info.text().and_then(|i| info_field(i, "cluster_state")) {
        Some("ok") => Ok(()),
        state => Err(format!(
            "127.0.0.1:{port} says cluster_state:{}",
            state.unwrap_or("?")
        )),
    }
}

/// `Ok` when `127.0.0.1:<port>` answers `ROLE` as a master.
fn is_master(port: u16) -> Result<(), String> {
    let role = call(port, &["ROLE"])?;
    match role.array().first().and_then(Reply::text) {
        Some("master") => Ok(()),
        other => Err(format!("127.0.0.1:{port} answers ROLE {other:?}")),
    }
}

/// A private Redis Cluster; every node is killed, and its directory
/// removed, when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// In start order (redis-cli makes the first `masters` the masters).
    nodes: Vec<Node>,
    node_timeout: Duration,
    /// The slot ranges each master served when it was killed or paused
    /// here: what [`RedisCluster::wait_failover`] waits for a new master of.
    stopped: Mutex<HashMap<u16, Vec<(u16, u16)>>>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each, with the
    /// [`DEFAULT_NODE_TIMEOUT`]; see
    /// [`start_with_node_timeout`](Self::start_with_node_timeout).
    ///
    /// # Panics
    /// As [`start_with_node_timeout`](Self::start_with_node_timeout).
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        Self::start_with_node_timeout(masters, replicas, DEFAULT_NODE_TIMEOUT)
    }

    /// Starts `masters` masters with `replicas` replicas each and
    /// `cluster-node-timeout` set to `node_timeout`, creates the cluster
    /// (`redis-cli --cluster create ... --cluster-replicas <replicas>`) and
    /// waits until it has settled: every node says `cluster_state:ok`,
    /// every node sees the same masters and replicas for the same slots,
    /// all 16384 slots are served, and every replica's link to its master
    /// is up.
    ///
    /// # Panics
    /// When `masters` is less than 3 (`redis-cli` creates no smaller
    /// cluster), when `redis-server` or `redis-cli` is not installed (with
    /// the command to install them), or when the cluster is not created or
    /// has not settled within 20 s (with the last thing still missing and
    /// the end of each node's log).
    pub fn start_with_node_timeout(
        masters: usize,
        replicas: usize,
        node_timeout: Duration,
    ) -> RedisCluster {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters (redis-cli creates no smaller one), not {masters}"
        );
        let timeout_ms = node_timeout.as_millis().max(1);
        let nodes = (0..masters * (1 + replicas))
            .map(|_| {
                Node::start("cluster-node", &[], |_| {
                    format!(
                        "cluster-enabled yes\n\
                         cluster-config-file nodes.conf\n\
                         cluster-node-timeout {timeout_ms}\n\
                         cluster-port {}",
                        free_port()
                    )
                })
            })
            .collect();
        let cluster = RedisCluster {
            nodes,
            node_timeout,
            stopped: Mutex::new(HashMap::new()),
        };
        cluster.create(replicas);
        if let Err(e) = poll(READY_DEADLINE, || cluster.settled(masters, replicas)) {
            panic!(
                "the Redis Cluster did not settle within {READY_DEADLINE:?}: {e}\n{}",
                cluster.logs()
            );
        }
        cluster
    }

    /// Runs `redis-cli --cluster create` on every node.
    fn create(&self, replicas: usize) {
        let mut out = tempfile::tempfile().expect("a temporary file");
        let mut child = Command::new(redis_cli_bin())
            .arg("--cluster")
            .arg("create")
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("a file handle"))
            .stderr(out.try_clone().expect("a file handle"))
            .spawn()
            .expect("redis-cli starts");
        // redis-cli waits for the nodes to agree with no deadline of its own.
        let deadline = Instant::now() + READY_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut output = String::new();
        let _ = out.rewind();
        let _ = out.read_to_string(&mut output);
        let failed = match status {
            None => format!("did not end within {READY_DEADLINE:?}"),
            Some(s) if !s.success() || output.contains("[ERR]") => format!("failed ({s})"),
            Some(_) => return,
        };
        panic!(
            "`redis-cli --cluster create` {failed}; its output:\n{output}\n{}",
            self.logs()
        );
    }

    /// `Ok` once the cluster has settled (see
    /// [`start_with_node_timeout`](Self::start_with_node_timeout)), else
    /// what is still missing.
    fn settled(&self, masters: usize, replicas: usize) -> Result<(), String> {
        let (_, view) = self.agreed_view(None)?;
        let covered: usize = view.iter().map(|r| usize::from(r.end - r.start) + 1).sum();
        if covered != usize::from(CLUSTER_SLOT_COUNT) {
            return Err(format!(
                "{covered} slots of {CLUSTER_SLOT_COUNT} are served: {}",
                describe(&view)
            ));
        }
        let mut seen_masters: Vec<u16> = view.iter().map(|r| r.master).collect();
        seen_masters.sort_unstable();
        seen_masters.dedup();
        if seen_masters.len() != masters || view.iter().any(|r| r.replicas.len() != replicas) {
            return Err(format!(
                "the nodes see {} masters, not {masters} with {replicas} replicas each: {}",
                seen_masters.len(),
                describe(&view)
            ));
        }
        for replica in view.iter().flat_map(|r| &r.replicas) {
            let info = call(*replica, &["INFO", "replication"])?;
            let link = info
                .text()
                .and_then(|i| info_field(i, "master_link_status"));
            if link != Some("up") {
                return Err(format!(
                    "replica 127.0.0.1:{replica} has master_link_status:{}",
                    link.unwrap_or("?")
                ));
            }
        }
        Ok(())
    }

    /// The view of the slots that every live node except `except` shares,
    /// each saying `cluster_state:ok`, with the port of one of them; else
    /// which node is not ok or which two disagree.
    fn agreed_view(&self, except: Option<u16>) -> Result<(u16, View), String> {
        let mut agreed: Option<(u16, View)> = None;
        for node in self.live().filter(|n| Some(n.port()) != except) {
            let port = node.port();
            state_ok(port)?;
            let view = slots_view(port)?;
            match &agreed {
                None => agreed = Some((port, view)),
                Some((first, seen)) if *seen != view => {
                    return Err(format!(
                        "127.0.0.1:{first} and 127.0.0.1:{port} disagree on the slots: {} and {}",
                        describe(seen),
                        describe(&view)
                    ));
                }
                Some(_) => {}
            }
        }
        agreed.ok_or_else(|| "no node is running and unpaused".to_string())
    }

    /// The view of the first live node (other than `except`) that answers.
    fn any_view(&self, except: Option<u16>) -> Result<View, String> {
        let mut last = "no node is running and unpaused".to_string();
        for node in self.live().filter(|n| Some(n.port()) != except) {
            match slots_view(node.port()) {
                Ok(view) => return Ok(view),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The nodes that run and are not paused.
    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.is_live())
    }

    fn index(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .unwrap_or_else(|| {
                panic!(
                    "no node of this cluster has port {port}; its ports: {:?}",
                    self.ports()
                )
            })
    }

    /// The end of every node's log, for panic messages.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.log_tail("cluster node", LOG_LINES))
            .collect()
    }

    /// The number of nodes, masters and replicas, killed ones included.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The `cluster-node-timeout` of every node.
    pub fn node_timeout(&self) -> Duration {
        self.node_timeout
    }

    /// The client port of every node, in start order (killed and paused
    /// ones included).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(Node::port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every node, in start order (killed
    /// and paused ones included, as a client's list of seeds may be).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// `redis://127.0.0.1:<port>` of the first of
    /// [`master_ports`](Self::master_ports): a node to start from.
    ///
    /// # Panics
    /// As [`master_ports`](Self::master_ports).
    pub fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.master_ports()[0])
    }

    /// The ports of the masters that serve slots, as the first running and
    /// unpaused node that answers sees them now, in the order of their
    /// lowest slot (the master of slot 0 first).
    ///
    /// # Panics
    /// When no node answers, or none sees a master.
    pub fn master_ports(&self) -> Vec<u16> {
        let view = self
            .any_view(None)
            .unwrap_or_else(|e| panic!("no node of the cluster tells its masters: {e}"));
        let mut masters: Vec<u16> = Vec::new();
        for range in &view {
            if !masters.contains(&range.master) {
                masters.push(range.master);
            }
        }
        assert!(!masters.is_empty(), "no node of the cluster sees a master");
        masters
    }

    /// The ports of the replicas of the master on `master_port`, as the
    /// first running and unpaused node that answers sees them now (sorted;
    /// failed replicas left out).
    ///
    /// # Panics
    /// When no node answers.
    pub fn replica_ports(&self, master_port: u16) -> Vec<u16> {
        let view = self
            .any_view(None)
            .unwrap_or_else(|e| panic!("no node of the cluster tells its replicas: {e}"));
        view.iter()
            .find(|r| r.master == master_port)
            .map(|r| r.replicas.clone())
            .unwrap_or_default()
    }

    /// The port of the master that serves `slot`, as the first running and
    /// unpaused node that answers sees it now (`CLUSTER SLOTS`).
    ///
    /// # Panics
    /// When `slot` is not below 16384, when no node answers, or when the
    /// slot has no master.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        assert!(
            slot < CLUSTER_SLOT_COUNT,
            "slot {slot} is not below {CLUSTER_SLOT_COUNT}"
        );
        let view = self.any_view(None).unwrap_or_else(|e| {
            panic!("no node of the cluster tells the master of slot {slot}: {e}")
        });
        master_at(&view, slot)
            .unwrap_or_else(|| panic!("slot {slot} has no master: {}", describe(&view)))
    }

    /// Moves `slot` and its keys to the master on `to` (a resharding, as
    /// `redis-cli --cluster reshard` does it, for one slot): marks it
    /// importing on `to` and migrating on its master, `MIGRATE`s its keys,
    /// hands it over on every master, and waits until every live node
    /// agrees. Clients meanwhile get `ASK`/`TRYAGAIN`, then `MOVED`.
    ///
    /// # Panics
    /// When `to` is not a master, already holds the slot, or a step fails.
    pub fn migrate_slot(&self, slot: u16, to: u16) {
        let from = self.master_of_slot(slot);
        assert_ne!(from, to, "127.0.0.1:{to} already holds slot {slot}");
        assert!(
            self.master_ports().contains(&to),
            "127.0.0.1:{to} is not a master; the masters are {:?}",
            self.master_ports()
        );
        let id = |port: u16| crate::redis_cli(port, &["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from), id(to));
        let slot_s = slot.to_string();
        let ok = |port: u16, args: &[&str]| {
            let out = crate::redis_cli(port, args);
            assert!(
                !out.starts_with("ERR") && !out.contains("ERR "),
                "127.0.0.1:{port} `{}`: {out}",
                args.join(" ")
            );
            out
        };
        ok(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]);
        loop {
            let keys = ok(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_s = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_s, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            ok(from, &args);
        }
        for master in self.master_ports() {
            ok(master, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
        }
        poll(Duration::from_secs(20), || {
            for n in self.live() {
                let at = slots_view(n.port()).ok().and_then(|v| master_at(&v, slot));
                if at != Some(to) {
                    return Err(format!(
                        "127.0.0.1:{} still sees slot {slot} on {at:?}, not {to}",
                        n.port()
                    ));
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("slot {slot} never moved: {e}"));
    }

    /// The slot ranges (first and last slot) the master on `master_port`
    /// serves, as the first running and unpaused node that answers sees
    /// them now, sorted; none for a replica or a replaced master.
    ///
    /// # Panics
    /// When no node answers.
    pub fn slot_ranges(&self, master_port: u16) -> Vec<(u16, u16)> {
        let view = self
            .any_view(None)
            .unwrap_or_else(|e| panic!("no node of the cluster tells the slots: {e}"));
        view.iter()
            .filter(|r| r.master == master_port)
            .map(|r| (r.start, r.end))
            .collect()
    }

    /// The slot ranges `port` serves as a master, as another live node sees
    /// them.
    fn ranges_of(&self, port: u16) -> Vec<(u16, u16)> {
        let view = self.any_view(Some(port)).unwrap_or_else(|e| {
            panic!("no other node of the cluster tells the slots of {port}: {e}")
        });
        view.iter()
            .filter(|r| r.master == port)
            .map(|r| (r.start, r.end))
            .collect()
    }

    /// Kills the master on `port` (`SIGKILL`, as a crash) and waits for the
    /// process to end. Its slots, as another node saw them just before, are
    /// what [`wait_failover`](Self::wait_failover) then waits for.
    ///
    /// # Panics
    /// When `port` is not a node of this cluster, or not a master that
    /// serves slots.
    pub fn kill_master(&mut self, port: u16) {
        let i = self.index(port);
        let ranges = self.ranges_of(port);
        assert!(
            !ranges.is_empty(),
            "127.0.0.1:{port} is not a master that serves slots; the masters are {:?}",
            self.master_ports()
        );
        self.stopped
            .lock()
            .expect("not poisoned")
            .insert(port, ranges);
        self.nodes[i].kill();
    }

    /// Waits until a replica of the master on `old_port` (killed with
    /// [`kill_master`](Self::kill_master) or paused with
    /// [`pause`](Self::pause)) has replaced it: every running, unpaused
    /// node says `cluster_state:ok` and sees the same slots, every slot the
    /// old master served is served by one new master, and that one answers
    /// `ROLE` as a master. Returns the new master's port.
    ///
    /// # Panics
    /// When `old_port` was not killed or paused as a master here, or when
    /// the failover has not happened within `timeout` (with the last thing
    /// still missing and the end of each node's log).
    pub fn wait_failover(&self, old_port: u16, timeout: Duration) -> u16 {
        let ranges = self
            .stopped
            .lock()
            .expect("not poisoned")
            .get(&old_port)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "127.0.0.1:{old_port} was not killed (kill_master) or paused as a master of \
                     this cluster: there is no failover to wait for"
                )
            });
        let replaced = || {
            let (seen_by, view) = self.agreed_view(Some(old_port))?;
            let mut new_master = None;
            for slot in ranges.iter().flat_map(|&(start, end)| start..=end) {
                let master = master_at(&view, slot);
                if master.is_none()
                    || master == Some(old_port)
                    || new_master.is_some_and(|m| Some(m) != master)
                {
                    return Err(format!(
                        "127.0.0.1:{seen_by} sees slot {slot} of {old_port} served by {master:?}: {}",
                        describe(&view)
                    ));
                }
                new_master = master;
            }
            let new_master = new_master.ok_or("the old master served no slot")?;
            is_master(new_master)?;
            Ok(new_master)
        };
        poll(timeout, replaced).unwrap_or_else(|e| {
            panic!(
                "no failover of 127.0.0.1:{old_port} within {timeout:?}: {e}\n{}",
                self.logs()
            )
        })
    }

    /// Stops the node on `port` (`SIGSTOP`): it keeps its connections but
    /// answers nothing, to clients or to the other nodes, until
    /// [`resume`](Self::resume); after the node timeout the others take it
    /// for failed, and a paused master is replaced by a replica as a
    /// killed one is ([`wait_failover`](Self::wait_failover)).
    ///
    /// # Panics
    /// When `port` is not a running node of this cluster.
    pub fn pause(&self, port: u16) {
        let i = self.index(port);
        let ranges = self.ranges_of(port);
        if !ranges.is_empty() {
            self.stopped
                .lock()
                .expect("not poisoned")
                .insert(port, ranges);
        }
        self.nodes[i].pause();
    }

    /// Resumes the paused node on `port` (`SIGCONT`). A master that was
    /// replaced meanwhile rejoins as a replica of its replacement.
    ///
    /// # Panics
    /// When `port` is not a running node of this cluster.
    pub fn resume(&self, port: u16) {
        let i = self.index(port);
        self.nodes[i].resume();
        self.stopped.lock().expect("not poisoned").remove(&port);
    }

    /// The log of the node on `port` so far.
    ///
    /// # Panics
    /// When `port` is not a node of this cluster.
    pub fn log(&self, port: u16) -> String {
        self.nodes[self.index(port)].log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: i64) -> Reply {
        Reply::Array(vec![
            Reply::Text("127.0.0.1".into()),
            Reply::Int(port),
            Reply::Text("id".into()),
            Reply::Array(vec![]),
        ])
    }

    #[test]
    fn reads_cluster_slots() {
        let reply = Reply::Array(vec![
            Reply::Array(vec![
                Reply::Int(5461),
                Reply::Int(16383),
                node(7002),
                node(7005),
                node(7004),
            ]),
            Reply::Array(vec![Reply::Int(0), Reply::Int(5460), node(7001)]),
        ]);
        let view = parse_slots(&reply).unwrap();
        assert_eq!(
            describe(&view),
            "[0-5460@7001[] 5461-16383@7002[7004, 7005]]"
        );
        assert_eq!(master_at(&view, 0), Some(7001));
        assert_eq!(master_at(&view, 5461), Some(7002));
        assert_eq!(master_at(&view, 16384), None);
        assert!(parse_slots(&Reply::Array(vec![Reply::Array(vec![Reply::Int(0)])])).is_err());
    }
}
