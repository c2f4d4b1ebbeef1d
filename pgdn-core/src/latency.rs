//! Publish-to-write latency: when this node took each message, and how
//! long it took to reach a subscriber's transport (`/metrics`).
//!
//! Nothing per connection and nothing per queued frame: the hub stamps
//! each message once, in a ring indexed by its delivery sequence number
//! (the number every queued frame already carries), and the session looks
//! the stamp up once per written batch, for the batch's oldest message.
//! An idle connection therefore costs nothing more, and a publish one
//! `Instant::now()` and two atomic stores.
//!
//! The histogram is hand-written on atomics rather than
//! `prometheus_client`'s `Histogram`, which takes a mutex on every
//! observation: this one is observed by every connection's task after
//! each write, so on a broadcast by thousands of tasks at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Messages remembered: a batch whose oldest message is further behind
/// than this is recorded with the stamp of the later message that took
/// its place, a lower bound of its latency.
const RING: usize = 8192;

/// Upper bounds of the buckets, in seconds (the last, +Inf, is implied).
const BOUNDS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// One remembered message: its sequence number (0 while being written)
/// and when it was taken, in nanoseconds since the clock's start.
#[derive(Debug, Default)]
struct Stamp {
    seq: AtomicU64,
    at: AtomicU64,
}

/// The hub's delivery clock.
#[derive(Debug)]
pub(crate) struct DeliveryClock {
    start: Instant,
    ring: Box<[Stamp]>,
    histogram: AtomicHistogram,
}

impl Default for DeliveryClock {
    fn default() -> Self {
        DeliveryClock {
            start: Instant::now(),
            ring: (0..RING).map(|_| Stamp::default()).collect(),
            histogram: AtomicHistogram::default(),
        }
    }
}

impl DeliveryClock {
    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_nanos() as u64
    }

    /// Remembers that message `seq` was taken (accepted by or received on
    /// this node) at `at`. Called by one writer at a time (under the
    /// hub's sequence lock).
    pub(crate) fn stamp(&self, seq: u64, at: Instant) {
        let slot = &self.ring[(seq % RING as u64) as usize];
        // Invalidate first, so that a reader never pairs the old sequence
        // number with the new time (the Release on `at` orders this store
        // before it; a reader that sees the new time sees this too).
        slot.seq.store(0, Ordering::Relaxed);
        slot.at.store(self.nanos(at), Ordering::Release);
        slot.seq.store(seq, Ordering::Release);
    }

    /// Records the latency of message `seq`, just written to a transport.
    pub(crate) fn written(&self, seq: u64) {
        let slot = &self.ring[(seq % RING as u64) as usize];
        let before = slot.seq.load(Ordering::Acquire);
        let at = slot.at.load(Ordering::Acquire);
        let after = slot.seq.load(Ordering::Acquire);
        // A later message in the same slot was taken later than `seq`: its
        // stamp is a lower bound. A slot being rewritten (0) or one that
        // changed meanwhile gives no sample.
        if before != after || before < seq {
            return;
        }
        let now = self.nanos(Instant::now());
        self.histogram
            .observe(Duration::from_nanos(now.saturating_sub(at)));
    }

    /// Writes the histogram as `name`.
    pub(crate) fn encode(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
    ) -> std::fmt::Result {
        self.histogram.encode(enc, name, help)
    }

    /// Observations so far.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.histogram.count.load(Ordering::Relaxed)
    }
}

/// A histogram of durations on atomics: per-bucket counts, the total
/// count and the sum in nanoseconds.
#[derive(Debug, Default)]
struct AtomicHistogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BOUNDS.partition_point(|b| *b < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn encode(&self, enc: &mut DescriptorEncoder, name: &str, help: &str) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so that the two always agree.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        enc.encode_descriptor(name, help, None, MetricType::Histogram)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_message_is_timed_from_its_stamp() {
        let clock = DeliveryClock {
            start: Instant::now() - Duration::from_secs(1),
            ..DeliveryClock::default()
        };
        let taken = Instant::now() - Duration::from_millis(30);
        clock.stamp(7, taken);
        clock.written(7);
        assert_eq!(clock.count(), 1);
        let secs = clock.histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        assert!((0.03..1.0).contains(&secs), "{secs}");
        // 30 ms: in the 0.05 bucket.
        let i = BOUNDS.iter().position(|b| *b == 0.05).unwrap();
        assert_eq!(clock.histogram.buckets[i].load(Ordering::Relaxed), 1);

        // Never stamped: no sample.
        clock.written(8);
        assert_eq!(clock.count(), 1);
        // Overwritten by a later message: the later stamp, a lower bound.
        clock.stamp(7 + RING as u64, Instant::now());
        clock.written(7);
        assert_eq!(clock.count(), 2);
    }
}
