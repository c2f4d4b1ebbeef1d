//! De-duplication of publisher-chosen message ids for a time window
//! (PROTOCOL.md section 5: 5 minutes).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::message::MessageId;
use crate::target::PublishReceipt;

/// What [`Dedup::claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The id is new and now reserved; publish it and call `complete`.
    New,
    /// The id was taken within the window; repeat this receipt.
    Duplicate(PublishReceipt),
}

#[derive(Debug, Default)]
struct Inner {
    seen: HashMap<MessageId, (Instant, Option<usize>)>,
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
        if let Some((t, delivered)) = inner.seen.get(id)
            && now.duration_since(*t) < self.ttl
        {
            return Claim::Duplicate(PublishReceipt {
                id: id.clone(),
                delivered: *delivered,
            });
        }
        inner.seen.insert(id.clone(), (now, None));
        inner.order.push_back((now, id.clone()));
        Claim::New
    }

    /// Records what the publish of a claimed id delivered.
    pub(crate) fn complete(&self, id: &MessageId, delivered: Option<usize>) {
        if let Some(entry) = self.lock().seen.get_mut(id) {
            entry.1 = delivered;
        }
    }

    /// Releases a claimed id whose publish failed, so a retry can go through.
    pub(crate) fn release(&self, id: &MessageId) {
        self.lock().seen.remove(id);
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

    #[test]
    fn capacity_bounds_memory() {
        let d = Dedup::new(Duration::from_secs(300), 3);
        for i in 0..10 {
            d.claim(&MessageId::new(format!("m{i}")).unwrap());
        }
        assert!(d.lock().seen.len() <= 4);
    }
}
