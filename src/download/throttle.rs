//! `download.max_rate`: one token bucket shared by every worker, so that all of them together receive at
//! most the cap, smoothly.
//!
//! The bucket holds at most a tenth of a second's bytes, so the cap is kept over any window longer than
//! that (no bursts of seconds after a pause). A worker that receives a chunk takes its size from the
//! bucket; the bucket may go into debt, and the taker waits until the debt is paid at the cap, before it
//! reads on. Reading is what pulls bytes from the network (TCP flow control holds the server back while a
//! worker waits), so waiting between reads caps the transfer itself. Written here rather than taken from
//! a crate (governor): its cells are `u32` and a request may not exceed the burst, while a chunk from
//! the HTTP stack has no fixed size, and the rate must change in place on SIGHUP with the debt kept.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The bucket holds at most this much of the rate.
const BURST: Duration = Duration::from_millis(100);
/// ... but never less than this many bytes, so a slow cap still passes a chunk without a debt.
const MIN_BURST: f64 = 16.0 * 1024.0;
/// A waiting taker looks again at least this often, so that a new rate (SIGHUP) applies to it at once.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// A shared cap on bytes per second; no cap while the rate is `None`.
#[derive(Debug, Default)]
pub struct Throttle {
    state: Mutex<Bucket>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Bytes per second; `None`: no cap.
    rate: Option<f64>,
    /// Bytes that may be taken now; negative: a debt the next takers wait for.
    tokens: f64,
    /// Bytes earned since the start, at whatever rates held: a taker in debt waits until this reaches
    /// the mark its take set.
    earned: f64,
    /// When `tokens` and `earned` were last brought up to date.
    at: Option<Instant>,
}

impl Bucket {
    fn burst(rate: f64) -> f64 {
        (rate * BURST.as_secs_f64()).max(MIN_BURST)
    }

    fn refill(&mut self, now: Instant) {
        if let (Some(rate), Some(at)) = (self.rate, self.at) {
            let earned = now.saturating_duration_since(at).as_secs_f64() * rate;
            self.earned += earned;
            self.tokens = (self.tokens + earned).min(Self::burst(rate));
        }
        self.at = Some(now);
    }
}

impl Throttle {
    /// A throttle at `rate` bytes per second (`None`: none).
    pub fn new(rate: Option<u64>) -> Throttle {
        let t = Throttle::default();
        t.set_rate_at(rate, Instant::now());
        t
    }

    /// Changes the cap in place (SIGHUP); a debt already run up is kept, and paid at the new rate.
    pub fn set_rate(&self, rate: Option<u64>) {
        self.set_rate_at(rate, Instant::now());
    }

    fn set_rate_at(&self, rate: Option<u64>, now: Instant) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.refill(now);
        b.rate = rate.filter(|r| *r > 0).map(|r| r as f64);
        match b.rate {
            Some(rate) => b.tokens = b.tokens.min(Bucket::burst(rate)),
            None => b.tokens = 0.0,
        }
    }

    /// The cap, in bytes per second.
    pub fn rate(&self) -> Option<u64> {
        let b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.rate.map(|r| r as u64)
    }

    /// Takes `bytes`: the mark of `earned` the taker must wait for, if the bucket went into debt.
    fn take_at(&self, bytes: usize, now: Instant) -> Option<f64> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.rate?;
        b.refill(now);
        b.tokens -= bytes as f64;
        (b.tokens < 0.0).then(|| b.earned - b.tokens)
    }

    /// How long until `earned` reaches `mark` at the rate now (zero without a cap).
    fn wait_for(&self, mark: f64, now: Instant) -> Duration {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rate) = b.rate else {
            return Duration::ZERO;
        };
        b.refill(now);
        Duration::from_secs_f64(((mark - b.earned) / rate).max(0.0))
    }

    /// Takes `bytes` received, and waits while the bucket is in debt.
    pub async fn take(&self, bytes: usize) {
        let Some(mark) = self.take_at(bytes, Instant::now()) else {
            return;
        };
        loop {
            let wait = self.wait_for(mark, Instant::now());
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait.min(LOOK_EVERY)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn about(wait: Duration, ms: u64) -> bool {
        wait.abs_diff(Duration::from_millis(ms)) < Duration::from_micros(1)
    }

    fn throttle(rate: Option<u64>, now: Instant) -> Throttle {
        let t = Throttle::default();
        t.set_rate_at(rate, now);
        t
    }

    #[test]
    fn takers_together_wait_as_long_as_the_rate_needs_with_no_burst_beyond_a_tenth_of_a_second() {
        let start = Instant::now();
        let t = throttle(Some(1_000_000), start);
        // The bucket starts empty: nothing is free before it is earned.
        let first = t.take_at(100_000, start).unwrap();
        assert!(about(t.wait_for(first, start), 100));
        // A second taker at the same moment waits behind the first's debt.
        let second = t.take_at(100_000, start).unwrap();
        assert!(about(t.wait_for(second, start), 200));
        assert!(about(
            t.wait_for(first, start + Duration::from_millis(50)),
            50
        ));
        // A long pause earns a tenth of a second at most: the rest of a large take is waited for.
        let later = start + Duration::from_secs(10);
        let third = t.take_at(1_000_000, later).unwrap();
        assert!(about(t.wait_for(third, later), 900));
    }

    #[test]
    fn a_new_rate_applies_at_once_to_those_already_waiting_and_none_means_no_wait() {
        let now = Instant::now();
        let t = throttle(None, now);
        assert_eq!(t.take_at(10_000_000, now), None);
        t.set_rate_at(Some(1_000), now);
        assert_eq!(t.rate(), Some(1_000));
        // A typo's cap: a minute's wait for 60 kB...
        let mark = t.take_at(60_000, now).unwrap();
        assert!(about(t.wait_for(mark, now), 60_000));
        // ...fixed by SIGHUP a second later: what is left of the debt is paid at the new rate.
        let fixed = now + Duration::from_secs(1);
        t.set_rate_at(Some(1_000_000), fixed);
        assert!(about(t.wait_for(mark, fixed), 59));
        t.set_rate_at(None, fixed);
        assert_eq!(t.wait_for(mark, fixed), Duration::ZERO);
    }
}
