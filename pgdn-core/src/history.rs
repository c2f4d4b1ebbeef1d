//! What was sent to each user lately, so that a client that reconnects with
//! `since=<id>` gets what it missed (PROTOCOL.md section 4).
//!
//! The hub records every message it delivers, in delivery order, under a
//! node-local sequence number. For `user` and `users` targets the frame is
//! kept in each user's window (bounded by count and age); for every message,
//! group and broadcast ones too, the id's position is kept, because a client
//! may resume from any id it received.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Error;
use crate::message::MessageId;

/// Bounds of the history kept per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryConfig {
    /// Most messages kept per user. Default 100.
    pub max_messages: usize,
    /// Oldest message kept. Default 10 minutes.
    pub max_age: Duration,
    /// Most message ids remembered for resuming (every message, not only
    /// user ones). Default 200,000.
    pub max_ids: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_messages: 100,
            max_age: Duration::from_secs(600),
            max_ids: 200_000,
        }
    }
}

impl HistoryConfig {
    /// Sets [`HistoryConfig::max_messages`].
    pub fn max_messages(mut self, n: usize) -> Self {
        self.max_messages = n;
        self
    }
    /// Sets [`HistoryConfig::max_age`].
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }
    /// Sets [`HistoryConfig::max_ids`].
    pub fn max_ids(mut self, n: usize) -> Self {
        self.max_ids = n.max(1);
        self
    }
}

/// One delivered message, as the hub records it.
#[derive(Debug, Clone)]
pub struct HistoryRecord<'a> {
    /// Position in this node's delivery order.
    pub seq: u64,
    /// The message id.
    pub id: &'a MessageId,
    /// The users whose window keeps the frame: the `user`/`users` target,
    /// empty for group and broadcast messages.
    pub users: &'a [Arc<str>],
    /// The notification's JSON text.
    pub frame: &'a Bytes,
}

/// What a resuming client is sent before live traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// True when the window does not reach back to `since` or the id is
    /// unknown: the client gets `history_gap` first and should refetch state.
    pub gap: bool,
    /// The retained messages after `since`, in delivery order, with their
    /// sequence numbers.
    pub frames: Vec<(u64, Bytes)>,
}

/// Keeps recent messages per user for resume.
///
/// Promise: `record` is called once per delivered message, in delivery
/// order, and must not block (the hub calls it under its ordering lock);
/// `replay` returns, in that order, every retained message of the user
/// recorded after `since`, and says when it cannot reach back that far.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Records a delivered message.
    fn record(&self, record: &HistoryRecord<'_>);
    /// The messages of `user_id` after the message `since`.
    async fn replay(&self, user_id: &str, since: &str) -> Result<Replay, Error>;
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    at: Instant,
    frame: Bytes,
}

#[derive(Debug, Default)]
struct UserLog {
    entries: VecDeque<Entry>,
    /// Highest sequence number dropped because the window was full.
    evicted_upto: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// id -> sequence number, for every recent message.
    ids: HashMap<MessageId, u64>,
    /// (recorded at, id, seq) in order, to expire `ids`.
    id_order: VecDeque<(Instant, MessageId, u64)>,
    users: HashMap<Arc<str>, UserLog>,
    /// (recorded at, user, seq) in order, to expire user entries by age.
    user_order: VecDeque<(Instant, Arc<str>, u64)>,
}

/// The single-node history: windows in memory.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    config: HistoryConfig,
    inner: Mutex<Inner>,
}

impl MemoryHistory {
    /// A history with `config`'s bounds.
    pub fn new(config: HistoryConfig) -> Self {
        MemoryHistory {
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Users with a non-empty window.
    pub fn user_count(&self) -> usize {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        inner.users.len()
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        let max_age = self.config.max_age;
        while let Some((at, _, _)) = inner.id_order.front() {
            if now.duration_since(*at) < max_age && inner.id_order.len() <= self.config.max_ids {
                break;
            }
            let (_, id, seq) = inner.id_order.pop_front().expect("front exists");
            if inner.ids.get(&id) == Some(&seq) {
                inner.ids.remove(&id);
            }
        }
        while let Some((at, _, _)) = inner.user_order.front() {
            if now.duration_since(*at) < max_age {
                break;
            }
            let (_, user, seq) = inner.user_order.pop_front().expect("front exists");
            if let Some(log) = inner.users.get_mut(&user) {
                while log.entries.front().is_some_and(|e| e.seq <= seq) {
                    log.entries.pop_front();
                }
                if log.entries.is_empty() {
                    inner.users.remove(&user);
                }
            }
        }
    }
}

#[async_trait]
impl History for MemoryHistory {
    fn record(&self, record: &HistoryRecord<'_>) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        inner.ids.insert(record.id.clone(), record.seq);
        inner
            .id_order
            .push_back((now, record.id.clone(), record.seq));
        if self.config.max_messages == 0 {
            return;
        }
        for user in record.users {
            let log = inner.users.entry(user.clone()).or_default();
            log.entries.push_back(Entry {
                seq: record.seq,
                at: now,
                frame: record.frame.clone(),
            });
            while log.entries.len() > self.config.max_messages {
                let dropped = log.entries.pop_front().expect("non-empty");
                log.evicted_upto = log.evicted_upto.max(dropped.seq);
            }
            inner.user_order.push_back((now, user.clone(), record.seq));
        }
    }

    async fn replay(&self, user_id: &str, since: &str) -> Result<Replay, Error> {
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let since_seq = MessageId::new(since)
            .ok()
            .and_then(|id| inner.ids.get(&id).copied());
        let Some(log) = inner.users.get(user_id) else {
            return Ok(Replay {
                gap: since_seq.is_none(),
                frames: Vec::new(),
            });
        };
        let max_age = self.config.max_age;
        let live = log
            .entries
            .iter()
            .filter(|e| now.duration_since(e.at) < max_age);
        Ok(match since_seq {
            None => Replay {
                gap: true,
                frames: live.map(|e| (e.seq, e.frame.clone())).collect(),
            },
            Some(after) => Replay {
                gap: log.evicted_upto > after,
                frames: live
                    .filter(|e| e.seq > after)
                    .map(|e| (e.seq, e.frame.clone()))
                    .collect(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(h: &MemoryHistory, seq: u64, id: &str, users: &[&str]) {
        let id = MessageId::new(id).unwrap();
        let users: Vec<Arc<str>> = users.iter().map(|u| Arc::from(*u)).collect();
        let frame = Bytes::from(format!("frame-{seq}"));
        h.record(&HistoryRecord {
            seq,
            id: &id,
            users: &users,
            frame: &frame,
        });
    }

    fn seqs(r: &Replay) -> Vec<u64> {
        r.frames.iter().map(|(s, _)| *s).collect()
    }

    #[tokio::test]
    async fn replays_after_any_known_id_in_order() {
        let h = MemoryHistory::new(HistoryConfig::default());
        rec(&h, 1, "m1", &["a"]);
        rec(&h, 2, "b1", &[]); // a broadcast
        rec(&h, 3, "m2", &["a", "b"]);
        rec(&h, 4, "m3", &["b"]);
        rec(&h, 5, "m4", &["a"]);
        let r = h.replay("a", "m1").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (false, vec![3, 5]));
        let r = h.replay("a", "b1").await.unwrap();
        assert_eq!(
            (r.gap, seqs(&r)),
            (false, vec![3, 5]),
            "from a broadcast id"
        );
        let r = h.replay("a", "m4").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (false, vec![]));
        let r = h.replay("nobody", "m4").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (false, vec![]));
    }

    #[tokio::test]
    async fn unknown_id_is_a_gap_with_everything_retained() {
        let h = MemoryHistory::new(HistoryConfig::default());
        rec(&h, 1, "m1", &["a"]);
        rec(&h, 2, "m2", &["a"]);
        let r = h.replay("a", "never-seen").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (true, vec![1, 2]));
        let r = h.replay("a", "not a valid id").await.unwrap();
        assert!(r.gap);
        let r = h.replay("nobody", "never-seen").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (true, vec![]));
    }

    #[tokio::test]
    async fn a_full_window_is_a_gap() {
        let h = MemoryHistory::new(HistoryConfig::default().max_messages(3));
        for i in 1..=6 {
            rec(&h, i, &format!("m{i}"), &["a"]);
        }
        let r = h.replay("a", "m1").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (true, vec![4, 5, 6]));
        let r = h.replay("a", "m3").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (false, vec![4, 5, 6]));
    }

    #[tokio::test]
    async fn old_messages_age_out() {
        let h = MemoryHistory::new(HistoryConfig::default().max_age(Duration::ZERO));
        rec(&h, 1, "m1", &["a"]);
        let r = h.replay("a", "m1").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (true, vec![]), "the id itself aged out");
        assert_eq!(h.user_count(), 0, "no empty windows left behind");
    }

    #[tokio::test]
    async fn id_index_is_bounded() {
        let h = MemoryHistory::new(HistoryConfig::default().max_ids(2));
        for i in 1..=5 {
            rec(&h, i, &format!("m{i}"), &["a"]);
        }
        assert!(h.lock().ids.len() <= 3);
        assert!(h.replay("a", "m1").await.unwrap().gap);
    }
}
