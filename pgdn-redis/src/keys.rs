//! Every Redis key and channel pgdn uses, under one prefix (default
//! `pgdn:`), so that several deployments can share a Redis.
//!
//! Users, groups and message ids are hashed to one of P *partitions*
//! ([`Keys::partition`]; P is fixed for a deployment). Every key and
//! channel that belongs to a partition carries it as a Redis Cluster hash
//! tag, `pgdn:{17}:user:alice`, so that everything one publish to one user
//! touches (its sequence, history, user -> nodes map, de-duplication) is
//! in one slot: one script on one shard, on a single Redis, on independent
//! shards or on Redis Cluster alike.

/// Most partitions a deployment may have: a message's number packs its
/// partition into its low 10 bits ([`seq`]).
pub(crate) const MAX_PARTITIONS: u16 = 1024;

/// The cluster-wide number of a message: the partition's counter (which
/// follows Redis's clock in microseconds, so numbers of different
/// partitions compare by time) with the partition in the low bits, so no
/// two partitions ever give the same number.
pub(crate) fn seq(counter: u64, partition: u16) -> u64 {
    (counter << 10) | u64::from(partition)
}

/// Key and channel names.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) prefix: String,
    pub(crate) partitions: u16,
}

/// FNV-1a, 32 bits: small, fast, and the same on every node and in every
/// emitter (written here because the partition function is part of the
/// data layout, and must never change with a dependency's version).
fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Keys {
    pub(crate) fn new(prefix: &str, partitions: u16) -> Self {
        Keys {
            prefix: prefix.to_string(),
            partitions: partitions.max(1),
        }
    }

    /// The partition of a user, a group or a message id.
    pub(crate) fn partition(&self, name: &str) -> u16 {
        (fnv1a(name) % u32::from(self.partitions)) as u16
    }

    /// The start of every key of partition `p`: `pgdn:{p}:`.
    pub(crate) fn part(&self, p: u16) -> String {
        format!("{}{{{p}}}:", self.prefix)
    }

    /// The partition's counter, which numbers its messages.
    pub(crate) fn seq(&self, p: u16) -> String {
        format!("{}seq", self.part(p))
    }
    /// When a node last reached the partition's Redis (the clock).
    pub(crate) fn clock(&self, p: u16) -> String {
        format!("{}clock", self.part(p))
    }
    /// The run id of the master that last served the partition.
    pub(crate) fn master(&self, p: u16) -> String {
        format!("{}master", self.part(p))
    }
    /// Set while the partition settles after an outage.
    pub(crate) fn settling(&self, p: u16) -> String {
        format!("{}settling", self.part(p))
    }
    /// A message id taken in the partition: its number (for resume) and,
    /// while it exists, the claim that makes a repeated id a duplicate.
    pub(crate) fn id(&self, p: u16, id: &str) -> String {
        format!("{}id:{id}", self.part(p))
    }
    /// A user message's frame, stored once.
    pub(crate) fn message(&self, p: u16, id: &str) -> String {
        format!("{}msg:{id}", self.part(p))
    }
    /// Resume window of one user: a sorted set of `counter:ms:q:id`
    /// references (the frame is in `message(q, id)`), scored by counter.
    pub(crate) fn history(&self, user: &str) -> String {
        format!("{}hist:{user}", self.part(self.partition(user)))
    }
    /// Highest counter dropped from a user's full window.
    pub(crate) fn history_evicted(&self, user: &str) -> String {
        format!("{}hist_evicted:{user}", self.part(self.partition(user)))
    }
    /// Hash node -> expiry (ms since the epoch, Redis clock), of one user.
    pub(crate) fn user(&self, user: &str) -> String {
        format!("{}user:{user}", self.part(self.partition(user)))
    }
    /// Hash node -> expiry, of one group.
    pub(crate) fn group(&self, group: &str) -> String {
        format!("{}group:{group}", self.part(self.partition(group)))
    }
    /// Hash user -> open connections, of one node, in one partition.
    pub(crate) fn node_conns(&self, p: u16, node: &str) -> String {
        format!("{}conns:{node}", self.part(p))
    }
    /// Hash group -> open connections, of one node, in one partition.
    pub(crate) fn node_groups(&self, p: u16, node: &str) -> String {
        format!("{}groups:{node}", self.part(p))
    }
    /// Hash user -> when the node's first current connection of the user
    /// opened (ms), of one node, in one partition.
    pub(crate) fn node_since(&self, p: u16, node: &str) -> String {
        format!("{}since:{node}", self.part(p))
    }
    /// Hash user -> connections listing the group, of one node.
    pub(crate) fn group_members(&self, group: &str, node: &str) -> String {
        format!("{}members:{group}:{node}", self.part(self.partition(group)))
    }
    /// Sorted set of the users announced online (score: when their last
    /// mapping expires), in lifecycle partition `p`.
    pub(crate) fn online(&self, p: u16) -> String {
        format!("{}online", self.part(p))
    }
    /// Sorted set of the users due offline (score: when), in lifecycle
    /// partition `p`.
    pub(crate) fn offline_due(&self, p: u16) -> String {
        format!("{}offline_due", self.part(p))
    }
    /// Hash node -> liveness expiry (ms, Redis clock), in partition 0.
    pub(crate) fn nodes(&self) -> String {
        format!("{}nodes", self.part(0))
    }
    /// Channel of one node in one partition: the partition's user and
    /// group messages for it.
    pub(crate) fn node_channel(&self, p: u16, node: &str) -> String {
        format!("{}node:{node}", self.part(p))
    }
    /// Channel every node listens to in one partition: broadcasts whose id
    /// hashes there.
    pub(crate) fn all_channel(&self, p: u16) -> String {
        format!("{}all", self.part(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        let k = Keys::new("pgdn:", 128);
        // The layout is a contract between nodes and emitters of different
        // versions: these values must never change.
        assert_eq!(fnv1a(""), 0x811c_9dc5);
        assert_eq!(fnv1a("a"), 0xe40c_292c);
        assert_eq!(k.partition("alice"), (fnv1a("alice") % 128) as u16);
        let mut hits = [0u32; 128];
        for i in 0..12_800 {
            hits[k.partition(&format!("user-{i}")) as usize] += 1;
        }
        assert!(hits.iter().all(|&n| (50..=150).contains(&n)), "{hits:?}");
        assert_eq!(
            k.user("alice"),
            format!("pgdn:{{{}}}:user:alice", k.partition("alice"))
        );
    }

    #[test]
    fn numbers_keep_the_partition_and_the_order() {
        assert_eq!(seq(1_790_000_000_000_000, 127) >> 10, 1_790_000_000_000_000);
        assert!(seq(5, 1023) < seq(6, 0));
        assert_ne!(seq(5, 1), seq(5, 2));
    }
}
