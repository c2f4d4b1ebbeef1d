//! Jittered exponential backoff ("full jitter"): each wait is a random
//! duration between zero and an exponentially growing cap, so that many
//! clients retrying at once spread out instead of arriving together.

use std::time::Duration;

use rand::Rng;

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// Cap of the first wait.
    pub(crate) initial: Duration,
    /// Largest cap.
    pub(crate) max: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (1 for the first retry).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let low = cap / 2;
        // Half fixed, half random: never zero, never in lockstep.
        low + rand::rng().random_range(Duration::ZERO..=cap - low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for _ in 0..100 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d4 = b.delay(4);
            assert!(d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800));
            assert!(b.delay(30) <= Duration::from_secs(2));
        }
    }
}
