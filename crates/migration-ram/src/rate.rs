//! Bandwidth limiting and measurement for the sender.
//!
//! [`RateLimiter`] is a token bucket that admits a whole chunk of pages at
//! once: tokens accrue at `max_bandwidth` bytes per second up to [`BURST`]
//! worth (or one chunk, if larger), and a chunk is written only once there
//! are tokens for all of its bytes. The bytes sent over any period
//! therefore never exceed the limit times the period plus one burst. The
//! caller reads the clock and the limit once per chunk; only a chunk that
//! has to wait reads them again, in slices of at most [`SLICE`], checking
//! the cancel flag and running the caller's keepalive each time, so a new
//! limit or a cancel ends a wait within a slice.
//!
//! Postcopy uses the same bucket another way ([`RateLimiter::debt`] and
//! [`RateLimiter::charge`]): a chunk is charged after it went, which may
//! leave the bucket in debt, and the next background chunk waits until the
//! debt is paid. A page the destination waits for is never held back: it
//! goes at once and is charged like the others, so the background stream
//! makes room for it. The bytes sent over any period then never exceed
//! `max_postcopy_bandwidth` times the period plus one burst and one chunk.
//!
//! [`Bandwidth`] turns the bytes and time between chunk boundaries into an
//! estimate, accumulating until they cover [`MIN_WINDOW`], so the estimate
//! (and `mbps`) moves during a long pass, at most every 100 ms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::stats::Params;

/// Most credit the limiter keeps: 100 ms of bandwidth, as QEMU's
/// `BUFFER_DELAY`.
pub(crate) const BURST: Duration = Duration::from_millis(100);

/// Longest single sleep of the limiter.
pub(crate) const SLICE: Duration = Duration::from_millis(10);

/// Shortest span of sending that makes a new bandwidth estimate.
pub(crate) const MIN_WINDOW: Duration = Duration::from_millis(100);

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

    /// Waits until a chunk of `bytes` may be sent under the current limit,
    /// then takes them. `now` is the caller's clock read for this chunk.
    /// While it waits, it sleeps in slices of at most [`SLICE`] and after
    /// each calls `waiting` with the time (a keepalive); an error of
    /// `waiting`, or [`Error::Cancelled`] when `cancel` is raised, ends the
    /// wait.
    pub(crate) fn admit(
        &mut self,
        bytes: u64,
        mut now: Instant,
        params: &Params,
        cancel: &AtomicBool,
        mut waiting: impl FnMut(Instant) -> Result<()>,
    ) -> Result<()> {
        loop {
            let limit = params.max_bandwidth();
            if limit == 0 {
                self.tokens = 0.0;
                self.last = now;
                return Ok(());
            }
            let rate = limit as f64;
            let need = bytes as f64;
            self.refill(now, rate, (rate * BURST.as_secs_f64()).max(need));
            if self.tokens >= need {
                self.tokens -= need;
                return Ok(());
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let wait = Duration::from_secs_f64((need - self.tokens) / rate);
            std::thread::sleep(wait.min(SLICE));
            now = Instant::now();
            waiting(now)?;
        }
    }
}

impl RateLimiter {
    /// Adds the credit earned at `rate` bytes per second since the last
    /// refill, up to `cap` bytes.
    fn refill(&mut self, now: Instant, rate: f64, cap: f64) {
        let earned = rate * now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + earned).min(cap);
        self.last = self.last.max(now);
    }

    /// Postcopy: how long from `now` until the bucket is out of debt under
    /// `limit` bytes per second (zero: the next chunk may go). A `limit` of
    /// 0 (unlimited) never waits and forgets any debt.
    pub(crate) fn debt(&mut self, now: Instant, limit: u64) -> Duration {
        if limit == 0 {
            self.tokens = 0.0;
            self.last = now;
            return Duration::ZERO;
        }
        let rate = limit as f64;
        self.refill(now, rate, rate * BURST.as_secs_f64());
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    /// Postcopy: takes `bytes` that went, possibly into debt; nothing
    /// under an unlimited `limit` (0).
    pub(crate) fn charge(&mut self, bytes: u64, limit: u64) {
        if limit != 0 {
            self.tokens -= bytes as f64;
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
    /// Adds `bytes` sent in `time`; returns the estimate in bytes per
    /// second (0 until something was measured). The first measurement
    /// counts at once; later ones once they cover [`MIN_WINDOW`].
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
    use crate::stats::{PrecopyParams, SharedParams};

    fn params(max_bandwidth: u64) -> SharedParams {
        PrecopyParams {
            max_bandwidth,
            downtime_limit: Duration::from_millis(300),
        }
        .shared()
    }

    fn no_keepalive(_: Instant) -> Result<()> {
        Ok(())
    }

    #[test]
    fn limited_admission_takes_at_least_bytes_over_rate() {
        let p = params(1 << 20);
        let cancel = AtomicBool::new(false);
        let mut l = RateLimiter::new();
        let start = Instant::now();
        // Four chunks of 64 KiB.
        for _ in 0..4 {
            l.admit(64 << 10, Instant::now(), &p, &cancel, no_keepalive)
                .unwrap();
        }
        // 256 KiB at 1 MiB/s, less at most one burst of credit (100 KiB).
        let floor = Duration::from_secs_f64((256.0 - 102.4) / 1024.0);
        assert!(start.elapsed() >= floor, "{:?}", start.elapsed());
    }

    #[test]
    fn a_chunk_larger_than_the_burst_is_admitted_whole() {
        // 100 ms of 4 MiB/s is 400 KiB: a 1 MiB chunk is admitted once its
        // own bytes have accrued (250 ms), not refused for ever.
        let p = params(4 << 20);
        let cancel = AtomicBool::new(false);
        let mut l = RateLimiter::new();
        let start = Instant::now();
        let mut waits = 0;
        l.admit(1 << 20, Instant::now(), &p, &cancel, |_| {
            waits += 1;
            Ok(())
        })
        .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert!(waits >= 1, "the keepalive runs while it waits");
    }

    #[test]
    fn unlimited_admission_does_not_wait_and_cancel_interrupts() {
        let p = params(0);
        let cancel = Arc::new(AtomicBool::new(false));
        let mut l = RateLimiter::new();
        for _ in 0..100_000 {
            l.admit(1 << 20, Instant::now(), &p, &cancel, |_| {
                panic!("no wait without a limit")
            })
            .unwrap();
        }
        // A limit so low the next chunk would take hours: cancel ends it.
        p.set_max_bandwidth(1);
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            c.store(true, Ordering::Relaxed);
        });
        assert!(matches!(
            l.admit(4096, Instant::now(), &p, &cancel, no_keepalive),
            Err(Error::Cancelled)
        ));
        t.join().unwrap();
    }

    #[test]
    fn an_error_of_the_keepalive_ends_the_wait() {
        let p = params(1);
        let cancel = AtomicBool::new(false);
        let mut l = RateLimiter::new();
        let mut n = 0;
        let err = l
            .admit(4096, Instant::now(), &p, &cancel, |_| {
                n += 1;
                if n == 3 {
                    Err(Error::SchedulerGone)
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        assert!(matches!(err, Error::SchedulerGone));
    }

    #[test]
    fn debt_is_paid_at_the_limit_and_forgotten_without_one() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut l = RateLimiter::new();
        l.last = t0;
        // An empty bucket lets a chunk go; 1000 bytes at 10 kB/s then take
        // 100 ms to pay back.
        assert_eq!(l.debt(ms(0), 10_000), Duration::ZERO);
        l.charge(1000, 10_000);
        assert_eq!(l.debt(ms(0), 10_000), Duration::from_millis(100));
        assert_eq!(l.debt(ms(40), 10_000), Duration::from_millis(60));
        assert_eq!(l.debt(ms(100), 10_000), Duration::ZERO);
        // Credit never exceeds one burst (100 ms worth: 1000 bytes).
        assert_eq!(l.debt(ms(10_000), 10_000), Duration::ZERO);
        l.charge(3000, 10_000);
        assert_eq!(l.debt(ms(10_000), 10_000), Duration::from_millis(200));
        // Unlimited: no wait, and the debt is gone once a limit returns.
        assert_eq!(l.debt(ms(10_000), 0), Duration::ZERO);
        l.charge(1 << 30, 0);
        assert_eq!(l.debt(ms(10_000), 10_000), Duration::ZERO);
    }

    #[test]
    fn bandwidth_waits_for_a_window() {
        let mut b = Bandwidth::default();
        assert_eq!(b.record(0, Duration::from_millis(1)), 0.0);
        // First measurement counts at once.
        let e = b.record(1000, Duration::from_millis(1));
        assert!((e - 500_000.0).abs() < 1e-6, "{e}");
        // Short spans accumulate until they cover 100 ms.
        assert_eq!(b.record(10, Duration::from_millis(10)), e);
        assert_eq!(b.record(90, Duration::from_millis(80)), e);
        let e = b.record(100, Duration::from_millis(10));
        assert!((e - 2000.0).abs() < 1e-6, "{e}");
        assert_eq!(b.estimate(), e);
    }
}
