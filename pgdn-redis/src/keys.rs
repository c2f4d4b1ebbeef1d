//! Every Redis key and channel pgdn uses, under one prefix (default
//! `pgdn:`), so that several deployments can share a Redis.

/// Key and channel names.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    /// Channel every node listens to: groups and broadcasts.
    pub(crate) fn all_channel(&self) -> String {
        format!("{}all", self.prefix)
    }
    /// Channel of one node: messages for users it holds.
    pub(crate) fn node_channel(&self, node: &str) -> String {
        format!("{}node:{node}", self.prefix)
    }
    /// Liveness key of a node (expires unless refreshed).
    pub(crate) fn alive(&self, node: &str) -> String {
        format!("{}alive:{node}", self.prefix)
    }
    /// Set of node ids that registered.
    pub(crate) fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }
    /// Hash user -> open connections, of one node.
    pub(crate) fn node_conns(&self, node: &str) -> String {
        format!("{}conns:{node}", self.prefix)
    }
    /// Hash group -> open connections, of one node.
    pub(crate) fn node_groups(&self, node: &str) -> String {
        format!("{}groups:{node}", self.prefix)
    }
    /// Hash node -> expiry (ms since the epoch, Redis clock), of one user.
    pub(crate) fn user(&self, user: &str) -> String {
        format!("{}user:{user}", self.prefix)
    }
    /// Resume window of one user: a sorted set of `seq:ms` references,
    /// scored by sequence number.
    pub(crate) fn history(&self, user: &str) -> String {
        format!("{}hist:{user}", self.prefix)
    }
    /// Highest sequence number dropped from a user's full window.
    pub(crate) fn history_evicted(&self, user: &str) -> String {
        format!("{}hist_evicted:{user}", self.prefix)
    }
    /// A user message's frame, stored once for all its users' windows (the
    /// publish script writes it under the same name).
    pub(crate) fn message(&self, seq: u64) -> String {
        format!("{}msg:{seq}", self.prefix)
    }
    /// Pattern matching every user key, for SCAN.
    pub(crate) fn user_pattern(&self) -> String {
        format!("{}user:*", self.prefix)
    }
}
