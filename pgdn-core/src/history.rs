//! What was sent to each user lately, so that a client that reconnects with
//! `since=<id>` gets what it missed (docs/protocol.md section 4).
//!
//! The hub records every message it delivers, in delivery order, under a
//! node-local sequence number. For `user` and `users` targets the frame is
//! kept in each user's window (bounded by count and age); for every message,
//! group and broadcast ones too, the id's position is kept, because a client
//! may resume from any id it received.
//!
//! Whatever publishers do, the in-memory history stays within
//! [`HistoryConfig::max_users`] windows and about
//! [`HistoryConfig::max_bytes`] bytes: a frame is stored once however many
//! windows hold it, and past a bound the oldest entries go first, whoever
//! they belong to. A client whose window lost messages that way gets
//! `history_gap` on resume.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
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
    /// Most users with a window, in the in-memory history. Past it the
    /// oldest entries are dropped until a window empties, so the users
    /// written to least recently go first. Default 100,000 (the default
    /// connection limit: every connected user keeps a window, and so do as
    /// many who are not connected). The Redis history is bounded by Redis's
    /// own `maxmemory` instead.
    pub max_users: usize,
    /// Most bytes the in-memory history holds, as estimated: each stored
    /// frame once (however many windows share it), plus a fixed cost per
    /// window entry, per window and per frame for the bookkeeping. Past it
    /// the oldest entries are dropped. Default 256 MiB: 10 minutes of about
    /// 400 messages of 1 KiB a second, well under the memory of a typical
    /// node. The id index is bounded separately by `max_ids`.
    pub max_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_messages: 100,
            max_age: Duration::from_secs(600),
            max_ids: 200_000,
            max_users: 100_000,
            max_bytes: 256 << 20,
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
    /// Sets [`HistoryConfig::max_users`].
    pub fn max_users(mut self, n: usize) -> Self {
        self.max_users = n;
        self
    }
    /// Sets [`HistoryConfig::max_bytes`].
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
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

/// Estimated bytes of one window entry: its place in the window and in the
/// queue of entries.
const ENTRY_COST: usize = 64;
/// Estimated bytes of one window, besides the user id.
const USER_COST: usize = 96;
/// Estimated bytes of one stored frame's bookkeeping, besides its bytes.
const FRAME_COST: usize = 64;

/// A recorded frame, shared by the windows of its users.
#[derive(Debug)]
struct Stored {
    seq: u64,
    at: Instant,
    frame: Bytes,
    /// Windows that still hold it; its bytes are released at zero.
    refs: usize,
}

#[derive(Debug, Default)]
struct UserLog {
    /// Record numbers of the retained frames, oldest first.
    entries: VecDeque<u64>,
    /// Highest sequence number dropped while the window still mattered
    /// (full window, or a memory bound).
    evicted_upto: u64,
}

/// Why an entry leaves the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// Older than `max_age`: a client resuming from a known id cannot
    /// have missed it.
    Age,
    /// A memory bound: a client resuming from before it has a gap.
    Bound,
}

#[derive(Debug, Default)]
struct Inner {
    /// id -> sequence number, for every recent message. Both maps hash
    /// with foldhash: each message costs several lookups here, under the
    /// lock every publish takes.
    ids: foldhash::HashMap<MessageId, u64>,
    /// (recorded at, id, seq) in order, to expire `ids`.
    id_order: VecDeque<(Instant, MessageId, u64)>,
    users: foldhash::HashMap<Arc<str>, UserLog>,
    /// Every window entry ever added and not yet expired or evicted, oldest
    /// first: (user, record number). An entry already dropped from its
    /// full window stays here until its turn, and counts until then.
    entries: VecDeque<(Arc<str>, u64)>,
    /// The frames of messages with users, by record number from
    /// `first_record`; released ones stay as empty slots until they reach
    /// the front.
    frames: VecDeque<Stored>,
    /// Record number of `frames[0]`.
    first_record: u64,
    /// Estimated bytes held, see [`HistoryConfig::max_bytes`].
    bytes: usize,
    /// Highest sequence number in a window that a memory bound removed
    /// whole. A window created later starts from it, and a user without a
    /// window resuming from before it gets a gap: the history cannot tell
    /// whether that user's window was one of them.
    gone_upto: u64,
}

impl Inner {
    /// Where record `record` is in `frames`.
    fn slot(&self, record: u64) -> Option<usize> {
        slot(self.first_record, record)
    }

    fn frame(&self, record: u64) -> Option<&Stored> {
        self.frames.get(self.slot(record)?)
    }

    /// One window lets go of a frame; returns its sequence number.
    fn release(&mut self, record: u64) -> u64 {
        release(&mut self.frames, self.first_record, &mut self.bytes, record)
    }

    /// Drops the oldest entry; false when there is none.
    fn pop_entry(&mut self, why: Removal) -> bool {
        let Some((user, record)) = self.entries.pop_front() else {
            return false;
        };
        self.bytes -= ENTRY_COST;
        // One lookup: the entry is still in its window only if it is the
        // oldest one there.
        if let Entry::Occupied(mut log) = self.users.entry(user)
            && log.get().entries.front() == Some(&record)
        {
            let seq = release(&mut self.frames, self.first_record, &mut self.bytes, record);
            let window = log.get_mut();
            window.entries.pop_front();
            if why == Removal::Bound {
                window.evicted_upto = window.evicted_upto.max(seq);
            }
            if window.entries.is_empty() {
                let (user, _) = log.remove_entry();
                self.bytes -= USER_COST + user.len();
                if why == Removal::Bound {
                    self.gone_upto = self.gone_upto.max(seq);
                }
            }
        }
        while self.frames.front().is_some_and(|f| f.refs == 0) {
            self.frames.pop_front();
            self.first_record += 1;
            self.bytes -= FRAME_COST;
        }
        true
    }
}

/// Where record `record` is in frames that start at record `first`.
fn slot(first: u64, record: u64) -> Option<usize> {
    usize::try_from(record.checked_sub(first)?).ok()
}

/// A window lets go of record `record` of `frames` (which starts at
/// record `first`): the frame's bytes go when no window holds it. Returns
/// its sequence number (0 if it is gone). A function of the fields it
/// needs, so that a caller may hold an entry of the users' map meanwhile.
fn release(frames: &mut VecDeque<Stored>, first: u64, bytes: &mut usize, record: u64) -> u64 {
    let Some(stored) = slot(first, record).and_then(|i| frames.get_mut(i)) else {
        return 0;
    };
    stored.refs -= 1;
    if stored.refs == 0 {
        *bytes -= stored.frame.len();
        stored.frame = Bytes::new();
    }
    stored.seq
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

    /// The estimated bytes held (see [`HistoryConfig::max_bytes`]).
    pub fn bytes(&self) -> usize {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        inner.bytes
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        let max_age = self.config.max_age;
        while let Some((at, _, _)) = inner.id_order.front() {
            if now.duration_since(*at) < max_age && inner.id_order.len() <= self.config.max_ids {
                break;
            }
            let (_, id, seq) = inner.id_order.pop_front().expect("front exists");
            // Unless a later message reused the id.
            if let Entry::Occupied(e) = inner.ids.entry(id)
                && *e.get() == seq
            {
                e.remove();
            }
        }
        while let Some((_, record)) = inner.entries.front() {
            // An entry whose frame is gone was dropped from its window
            // already: it can go now.
            let fresh = inner
                .frame(*record)
                .is_some_and(|f| now.duration_since(f.at) < max_age);
            if fresh {
                break;
            }
            inner.pop_entry(Removal::Age);
        }
    }

    /// Drops the oldest entries until the memory bounds hold.
    fn evict(&self, inner: &mut Inner) {
        while inner.bytes > self.config.max_bytes || inner.users.len() > self.config.max_users {
            if !inner.pop_entry(Removal::Bound) {
                break;
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
        if self.config.max_messages == 0 || record.users.is_empty() {
            return;
        }
        let inner = &mut *inner;
        let number = inner.first_record + inner.frames.len() as u64;
        inner.frames.push_back(Stored {
            seq: record.seq,
            at: now,
            frame: record.frame.clone(),
            refs: 0,
        });
        inner.bytes += FRAME_COST + record.frame.len();
        for user in record.users {
            let gone_upto = inner.gone_upto;
            let mut created = false;
            let log = inner.users.entry(user.clone()).or_insert_with(|| {
                created = true;
                UserLog {
                    entries: VecDeque::new(),
                    evicted_upto: gone_upto,
                }
            });
            log.entries.push_back(number);
            let full = log.entries.len() > self.config.max_messages;
            let dropped = if full { log.entries.pop_front() } else { None };
            if created {
                inner.bytes += USER_COST + user.len();
            }
            inner.frames.back_mut().expect("just pushed").refs += 1;
            inner.entries.push_back((user.clone(), number));
            inner.bytes += ENTRY_COST;
            if let Some(old) = dropped {
                let seq = inner.release(old);
                let log = inner.users.get_mut(user).expect("just written");
                log.evicted_upto = log.evicted_upto.max(seq);
            }
        }
        self.evict(inner);
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
                gap: since_seq.is_none_or(|after| inner.gone_upto > after),
                frames: Vec::new(),
            });
        };
        let live = log.entries.iter().filter_map(|r| inner.frame(*r));
        Ok(match since_seq {
            None => Replay {
                gap: true,
                frames: live.map(|f| (f.seq, f.frame.clone())).collect(),
            },
            Some(after) => Replay {
                gap: log.evicted_upto > after,
                frames: live
                    .filter(|f| f.seq > after)
                    .map(|f| (f.seq, f.frame.clone()))
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

    #[tokio::test]
    async fn users_tracked_are_bounded_by_default() {
        let h = MemoryHistory::new(HistoryConfig::default());
        rec(&h, 1, "before", &[]);
        let many: Vec<Arc<str>> = (0..150_000).map(|i| Arc::from(format!("u{i}"))).collect();
        let id = MessageId::new("big").unwrap();
        let frame = Bytes::from(vec![b'x'; 1024]);
        h.record(&HistoryRecord {
            seq: 2,
            id: &id,
            users: &many,
            frame: &frame,
        });
        assert!(h.user_count() <= 100_000, "{} users", h.user_count());
        let evicted = h.replay("u0", "before").await.unwrap();
        assert_eq!((evicted.gap, seqs(&evicted)), (true, vec![]));
        let kept = h.replay("u149999", "before").await.unwrap();
        assert_eq!((kept.gap, seqs(&kept)), (false, vec![2]));
    }
    fn rec_frame(h: &MemoryHistory, seq: u64, id: &str, users: &[Arc<str>], frame: &Bytes) {
        let id = MessageId::new(id).unwrap();
        h.record(&HistoryRecord {
            seq,
            id: &id,
            users,
            frame,
        });
    }

    #[tokio::test]
    async fn big_frames_to_many_users_stay_within_the_bounds() {
        let (max_bytes, max_users) = (1 << 20, 50);
        let config = HistoryConfig::default()
            .max_bytes(max_bytes)
            .max_users(max_users);
        let h = MemoryHistory::new(config);
        rec(&h, 1, "start", &[]);
        // 40 frames of 100 KiB, each to 5 new users: 4 MiB and 200 users.
        let big = Bytes::from(vec![b'x'; 100 << 10]);
        for i in 0..40u64 {
            let users: Vec<Arc<str>> = (0..5)
                .map(|j| Arc::from(format!("u{}", i * 5 + j)))
                .collect();
            rec_frame(&h, i + 2, &format!("m{i}"), &users, &big);
            assert!(h.bytes() <= max_bytes, "{} bytes", h.bytes());
            assert!(h.user_count() <= max_users);
        }
        assert!(h.bytes() > max_bytes / 2, "the bound is used, not undercut");
        let evicted = h.replay("u0", "start").await.unwrap();
        assert_eq!(
            (evicted.gap, seqs(&evicted)),
            (true, vec![]),
            "oldest first"
        );
        let recent = h.replay("u199", "m38").await.unwrap();
        assert_eq!((recent.gap, seqs(&recent)), (false, vec![41]));
        assert!(
            h.replay("u199", "start").await.unwrap().gap,
            "from before the evictions, the history cannot vouch"
        );
    }

    #[tokio::test]
    async fn a_frame_shared_by_many_users_is_counted_once() {
        let h = MemoryHistory::new(HistoryConfig::default());
        let users: Vec<Arc<str>> = (0..1000).map(|i| Arc::from(format!("user-{i}"))).collect();
        let frame = Bytes::from(vec![b'x'; 100 << 10]);
        rec_frame(&h, 1, "m1", &users, &frame);
        let bytes = h.bytes();
        // 100 KiB once, plus a few hundred bytes of bookkeeping per user.
        assert!(
            (100 << 10..(100 << 10) + 1000 * 256).contains(&bytes),
            "{bytes}"
        );
        let r = h.replay("user-999", "nope").await.unwrap();
        assert_eq!(r.frames[0].1.as_ptr(), frame.as_ptr(), "the same buffer");
        // Once every window let go of it, nothing is left.
        let h = MemoryHistory::new(HistoryConfig::default().max_messages(1));
        rec_frame(&h, 1, "m1", &users, &frame);
        rec_frame(&h, 2, "m2", &users, &Bytes::from_static(b"small"));
        assert!(h.bytes() < 1000 * 256, "{}", h.bytes());
    }

    #[tokio::test]
    async fn a_window_evicted_whole_and_written_again_reports_its_gap() {
        let h = MemoryHistory::new(HistoryConfig::default().max_users(2));
        rec(&h, 1, "start", &[]);
        rec(&h, 2, "a1", &["a"]);
        rec(&h, 3, "b1", &["b"]);
        rec(&h, 4, "c1", &["c"]); // a, written least recently, goes
        rec(&h, 5, "a2", &["a"]); // then b
        assert_eq!(h.user_count(), 2);
        let r = h.replay("a", "start").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (true, vec![5]), "a1 was lost");
        let r = h.replay("b", "start").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (true, vec![]));
        let r = h.replay("c", "a1").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (false, vec![4]));
        let r = h.replay("a", "a2").await.unwrap();
        assert_eq!((r.gap, seqs(&r)), (false, vec![]));
    }
}
