//! Reconnect pacing: capped exponential backoff with jitter. Pure arithmetic;
//! the randomness that spreads clients apart is passed in.
//!
//! Invariant: every delay lies between half of and the whole current step,
//! and no step exceeds the cap.

use std::time::Duration;

/// Capped exponential backoff with jitter, for reconnecting.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start near `base` and double up to `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, attempt: 0 }
    }

    /// The delay before the next attempt: between half and all of the current
    /// step, placed by `random`, so that many clients do not retry in step.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let step = self.base.saturating_mul(1 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(random % spread)
    }

    /// After a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d1 = b.next_delay(0);
        assert_eq!(d1, Duration::from_millis(50));
        let d2 = b.next_delay(u64::MAX);
        assert!(d2 >= Duration::from_millis(100) && d2 < Duration::from_millis(200), "{d2:?}");
        for _ in 0..20 {
            assert!(b.next_delay(12345) <= Duration::from_secs(2));
        }
        b.reset();
        assert!(b.next_delay(7) < Duration::from_millis(100));
    }
}
