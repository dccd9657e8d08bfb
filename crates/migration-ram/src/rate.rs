//! Bandwidth limiting and measurement for the sender.
//!
//! [`RateLimiter`] is a token bucket: tokens accrue at `max_bandwidth` bytes
//! per second up to [`BURST`] worth (or one page, if larger), and a page is
//! written only once there are tokens for all of its bytes. The bytes sent
//! over any period therefore never exceed the limit times the period plus
//! one burst. It waits in slices of at most [`SLICE`], re-reading the
//! parameters (a new limit applies at once) and the cancel flag each time.
//!
//! [`Bandwidth`] turns the bytes and time of each pass into an estimate,
//! accumulating short passes until they cover [`MIN_WINDOW`] so that a pass
//! of a few pages does not decide the estimate alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::stats::SharedParams;

/// Most credit the limiter keeps: 100 ms of bandwidth, as QEMU's
/// `BUFFER_DELAY`.
pub(crate) const BURST: Duration = Duration::from_millis(100);

/// Longest single sleep of the limiter.
pub(crate) const SLICE: Duration = Duration::from_millis(10);

/// Shortest span of passes that makes a new bandwidth estimate.
pub(crate) const MIN_WINDOW: Duration = Duration::from_millis(50);

/// A token bucket over the shared `max_bandwidth` parameter.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// An empty bucket.
    pub(crate) fn new() -> Self {
        RateLimiter {
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Waits until `bytes` may be sent under the current limit, then takes
    /// them. Fails with [`Error::Cancelled`] if `cancel` is raised while
    /// waiting.
    pub(crate) fn admit(
        &mut self,
        bytes: u64,
        params: &SharedParams,
        cancel: &AtomicBool,
    ) -> Result<()> {
        loop {
            let limit = params.max_bandwidth();
            let now = Instant::now();
            if limit == 0 {
                self.tokens = 0.0;
                self.last = now;
                return Ok(());
            }
            let rate = limit as f64;
            let need = bytes as f64;
            let cap = (rate * BURST.as_secs_f64()).max(need);
            let earned = rate * now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + earned).min(cap);
            self.last = now;
            if self.tokens >= need {
                self.tokens -= need;
                return Ok(());
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let wait = Duration::from_secs_f64((need - self.tokens) / rate);
            std::thread::sleep(wait.min(SLICE));
        }
    }
}

/// A bandwidth estimate from the bytes and durations of passes.
#[derive(Debug, Default)]
pub(crate) struct Bandwidth {
    bytes: u64,
    time: Duration,
    estimate: f64,
}

impl Bandwidth {
    /// Adds a pass of `bytes` in `time`; returns the estimate in bytes per
    /// second (0 until something was measured).
    pub(crate) fn record(&mut self, bytes: u64, time: Duration) -> f64 {
        self.bytes += bytes;
        self.time += time;
        let first = self.estimate == 0.0 && self.bytes > 0;
        if (self.time >= MIN_WINDOW || first) && !self.time.is_zero() {
            self.estimate = self.bytes as f64 / self.time.as_secs_f64();
            self.bytes = 0;
            self.time = Duration::ZERO;
        }
        self.estimate
    }

    /// The current estimate in bytes per second.
    pub(crate) fn estimate(&self) -> f64 {
        self.estimate
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::stats::PrecopyParams;

    fn params(max_bandwidth: u64) -> SharedParams {
        PrecopyParams {
            max_bandwidth,
            downtime_limit: Duration::from_millis(300),
        }
        .shared()
    }

    #[test]
    fn limited_admission_takes_at_least_bytes_over_rate() {
        let p = params(1 << 20);
        let cancel = AtomicBool::new(false);
        let mut l = RateLimiter::new();
        let start = Instant::now();
        for _ in 0..64 {
            l.admit(4096, &p, &cancel).unwrap();
        }
        // 256 KiB at 1 MiB/s, less at most one burst of credit (100 KiB).
        let floor = Duration::from_secs_f64((256.0 - 102.4) / 1024.0);
        assert!(start.elapsed() >= floor, "{:?}", start.elapsed());
    }

    #[test]
    fn unlimited_admission_does_not_wait_and_cancel_interrupts() {
        let p = params(0);
        let cancel = Arc::new(AtomicBool::new(false));
        let mut l = RateLimiter::new();
        for _ in 0..100_000 {
            l.admit(1 << 20, &p, &cancel).unwrap();
        }
        // A limit so low the next page would take hours: cancel ends it.
        p.set_max_bandwidth(1);
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            c.store(true, Ordering::Relaxed);
        });
        assert!(matches!(l.admit(4096, &p, &cancel), Err(Error::Cancelled)));
        t.join().unwrap();
    }

    #[test]
    fn bandwidth_waits_for_a_window() {
        let mut b = Bandwidth::default();
        assert_eq!(b.record(0, Duration::from_millis(1)), 0.0);
        // First measurement counts at once.
        let e = b.record(1000, Duration::from_millis(1));
        assert!((e - 500_000.0).abs() < 1e-6, "{e}");
        // Short passes accumulate.
        assert_eq!(b.record(10, Duration::from_millis(10)), e);
        let e = b.record(90, Duration::from_millis(40));
        assert!((e - 2000.0).abs() < 1e-6, "{e}");
        assert_eq!(b.estimate(), e);
    }
}
