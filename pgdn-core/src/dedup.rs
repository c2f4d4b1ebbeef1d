//! De-duplication of publisher-chosen message ids for a time window
//! (docs/protocol.md section 5: 5 minutes).
//!
//! An id is claimed while its publish is in flight and completed when it
//! is done. A retry that arrives while the first attempt is still in
//! flight waits for it ([`Claim::Wait`]) instead of being answered at
//! once: the first attempt may yet be cancelled (its publisher hung up)
//! and release the id, and answering "accepted" for a message that then
//! never goes out would lose it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::message::MessageId;
use crate::target::PublishReceipt;

/// What [`Dedup::claim`] found.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The id is new and now reserved; publish it and call `complete`.
    New,
    /// The id was taken within the window; repeat this receipt.
    Duplicate(PublishReceipt),
    /// The id's first publish is still in flight: wait until this changes
    /// (completed or released), then claim again.
    Wait(watch::Receiver<()>),
}

impl PartialEq for Claim {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Claim::New, Claim::New) => true,
            (Claim::Duplicate(a), Claim::Duplicate(b)) => a == b,
            _ => false,
        }
    }
}

/// Where a claimed id stands.
#[derive(Debug)]
enum State {
    /// Being published; dropping the sender wakes whoever waits.
    InFlight(watch::Sender<()>),
    /// Published; what it delivered.
    Done(Option<usize>),
}

#[derive(Debug, Default)]
struct Inner {
    seen: HashMap<MessageId, (Instant, State)>,
    order: VecDeque<(Instant, MessageId)>,
}

/// Remembers publisher-chosen ids for `ttl`, at most `capacity` of them
/// (the oldest are forgotten first past that).
#[derive(Debug)]
pub(crate) struct Dedup {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

impl Dedup {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Dedup {
            ttl,
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `id`, or reports the receipt it was first published with.
    pub(crate) fn claim(&self, id: &MessageId) -> Claim {
        let now = Instant::now();
        let mut inner = self.lock();
        // Forget what expired or what is past capacity, oldest first. An id
        // claimed again after expiring has a newer entry: keep that one.
        while let Some((t, _)) = inner.order.front() {
            if now.duration_since(*t) < self.ttl && inner.order.len() < self.capacity {
                break;
            }
            let (t, old) = inner.order.pop_front().expect("front exists");
            if inner.seen.get(&old).is_some_and(|(t0, _)| *t0 == t) {
                inner.seen.remove(&old);
            }
        }
        if let Some((t, state)) = inner.seen.get(id)
            && now.duration_since(*t) < self.ttl
        {
            return match state {
                State::Done(delivered) => Claim::Duplicate(PublishReceipt {
                    id: id.clone(),
                    delivered: *delivered,
                }),
                State::InFlight(tx) => Claim::Wait(tx.subscribe()),
            };
        }
        let (tx, _) = watch::channel(());
        inner.seen.insert(id.clone(), (now, State::InFlight(tx)));
        inner.order.push_back((now, id.clone()));
        Claim::New
    }

    /// Records what the publish of a claimed id delivered.
    pub(crate) fn complete(&self, id: &MessageId, delivered: Option<usize>) {
        // Replacing the in-flight state drops its sender: waiters wake.
        if let Some(entry) = self.lock().seen.get_mut(id) {
            entry.1 = State::Done(delivered);
        }
    }

    /// Releases a claimed id whose publish failed or was cancelled, so a
    /// retry can go through (waiters wake and claim again).
    pub(crate) fn release(&self, id: &MessageId) {
        let removed = self.lock().seen.remove(id);
        drop(removed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_first_receipt_within_window() {
        let d = Dedup::new(Duration::from_secs(300), 100);
        let id = MessageId::new("job-1").unwrap();
        assert_eq!(d.claim(&id), Claim::New);
        d.complete(&id, Some(3));
        assert_eq!(
            d.claim(&id),
            Claim::Duplicate(PublishReceipt {
                id: id.clone(),
                delivered: Some(3)
            })
        );
    }

    #[test]
    fn forgets_after_ttl_and_release() {
        let d = Dedup::new(Duration::ZERO, 100);
        let id = MessageId::new("a").unwrap();
        assert_eq!(d.claim(&id), Claim::New);
        assert_eq!(
            d.claim(&id),
            Claim::New,
            "expired immediately with a zero ttl"
        );
        let d = Dedup::new(Duration::from_secs(300), 100);
        assert_eq!(d.claim(&id), Claim::New);
        d.release(&id);
        assert_eq!(d.claim(&id), Claim::New);
    }

    #[tokio::test]
    async fn a_retry_waits_for_the_first_attempt() {
        let d = Dedup::new(Duration::from_secs(300), 100);
        let id = MessageId::new("job-2").unwrap();
        assert_eq!(d.claim(&id), Claim::New);
        let Claim::Wait(mut rx) = d.claim(&id) else {
            panic!("in flight: wait")
        };
        d.release(&id);
        assert!(rx.changed().await.is_err(), "woken by the release");
        assert_eq!(d.claim(&id), Claim::New, "released: the retry publishes");
        let Claim::Wait(mut rx) = d.claim(&id) else {
            panic!("in flight: wait")
        };
        d.complete(&id, Some(1));
        assert!(rx.changed().await.is_err(), "woken by the completion");
        assert_eq!(
            d.claim(&id),
            Claim::Duplicate(PublishReceipt {
                id: id.clone(),
                delivered: Some(1)
            })
        );
    }

    #[test]
    fn capacity_bounds_memory() {
        let d = Dedup::new(Duration::from_secs(300), 3);
        for i in 0..10 {
            d.claim(&MessageId::new(format!("m{i}")).unwrap());
        }
        assert!(d.lock().seen.len() <= 4);
    }
}
