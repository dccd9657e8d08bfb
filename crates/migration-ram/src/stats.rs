//! Migration parameters and statistics, as QEMU's `query-migrate-parameters`
//! and the `ram` object of `query-migrate` name them.
//!
//! [`RamStats`] is a set of atomics the saver (or loader) updates while it
//! works and any thread reads with [`RamStats::snapshot`]. [`Params`] is a
//! set of atomics too: the controller changes a parameter with one store,
//! the saver reads it once per chunk of pages, so a
//! `migrate-set-parameters` takes effect during a pass, and neither side
//! ever takes a lock.
//!
//! `transferred` is also split by when the bytes went, as QEMU's
//! `precopy-bytes`, `downtime-bytes` and `postcopy-bytes`: the saver says
//! which phase it is in (precopy while the guest runs at the source,
//! downtime while it is paused for completion or the postcopy switch,
//! postcopy once it runs at the destination) and every byte counted goes
//! to that phase too.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// QEMU's default `max-bandwidth` (`MAX_THROTTLE`, 128 MiB/s).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// QEMU's default `downtime-limit` (300 ms).
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(300);

/// The tunables of precopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecopyParams {
    /// Bandwidth cap of the iterations in bytes per second; 0 means
    /// unlimited. Not applied while the guest is paused (completion).
    pub max_bandwidth: u64,
    /// How long the guest may stay paused for the last pass: switchover is
    /// allowed once the remaining dirty bytes fit in this time at the
    /// measured bandwidth.
    pub downtime_limit: Duration,
}

impl Default for PrecopyParams {
    fn default() -> Self {
        PrecopyParams {
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
        }
    }
}

impl PrecopyParams {
    /// These parameters behind a shared handle (`max_postcopy_bandwidth`
    /// 0: unlimited, QEMU's default).
    pub fn shared(self) -> SharedParams {
        Arc::new(Params::new(self))
    }
}

/// The live parameters of a migration, shared between the controller (which
/// changes them) and the saver (which reads them while it runs).
///
/// Each parameter is an atomic: a getter is one load and a setter one
/// store, so a reader never waits for a writer. Parameters are independent
/// of one another; [`Params::snapshot`] reads each once, and a concurrent
/// [`Params::store`] may be seen half applied by it.
#[derive(Debug)]
pub struct Params {
    max_bandwidth: AtomicU64,
    downtime_limit_ns: AtomicU64,
    max_postcopy_bandwidth: AtomicU64,
    postcopy_background_paused: AtomicBool,
}

/// Parameters shared between the controller (which changes them) and the
/// saver (which reads them while it runs).
pub type SharedParams = Arc<Params>;

/// A duration as whole nanoseconds, saturating (584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Default for Params {
    fn default() -> Self {
        Params::new(PrecopyParams::default())
    }
}

impl Params {
    /// Parameters with the values of `p`, `max_postcopy_bandwidth` 0
    /// (unlimited).
    pub fn new(p: PrecopyParams) -> Self {
        Params {
            max_bandwidth: AtomicU64::new(p.max_bandwidth),
            downtime_limit_ns: AtomicU64::new(nanos(p.downtime_limit)),
            max_postcopy_bandwidth: AtomicU64::new(0),
            postcopy_background_paused: AtomicBool::new(false),
        }
    }

    /// Bandwidth cap of precopy passes in bytes per second; 0 means
    /// unlimited. See [`PrecopyParams::max_bandwidth`].
    pub fn max_bandwidth(&self) -> u64 {
        self.max_bandwidth.load(Ordering::Relaxed)
    }

    /// Sets `max_bandwidth`; the saver applies it from its next chunk.
    pub fn set_max_bandwidth(&self, bytes_per_sec: u64) {
        self.max_bandwidth.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The downtime limit. See [`PrecopyParams::downtime_limit`].
    pub fn downtime_limit(&self) -> Duration {
        Duration::from_nanos(self.downtime_limit_ns.load(Ordering::Relaxed))
    }

    /// Sets the downtime limit (saturating at 584 years); the saver applies
    /// it at the end of the current pass.
    pub fn set_downtime_limit(&self, limit: Duration) {
        self.downtime_limit_ns
            .store(nanos(limit), Ordering::Relaxed);
    }

    /// Bandwidth cap of the postcopy phase in bytes per second; 0 means
    /// unlimited (QEMU's `max-postcopy-bandwidth`).
    pub fn max_postcopy_bandwidth(&self) -> u64 {
        self.max_postcopy_bandwidth.load(Ordering::Relaxed)
    }

    /// Sets `max_postcopy_bandwidth`.
    pub fn set_max_postcopy_bandwidth(&self, bytes_per_sec: u64) {
        self.max_postcopy_bandwidth
            .store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Whether postcopy's background stream is paused (see
    /// [`set_postcopy_background_paused`](Params::set_postcopy_background_paused)).
    pub fn postcopy_background_paused(&self) -> bool {
        self.postcopy_background_paused.load(Ordering::Relaxed)
    }

    /// Pauses (`true`) or resumes postcopy's background stream. While it is
    /// paused, [`PrecopySaver::postcopy_send`](crate::PrecopySaver::postcopy_send)
    /// sends only the pages the destination asks for, each as soon as its
    /// request comes, and otherwise waits (pinging as usual); the link
    /// carries nothing else. Resumed, the background scan goes on from the
    /// last requested page. It applies at the saver's next chunk boundary,
    /// or within 10 ms while it waits.
    ///
    /// Postcopy cannot end while the stream is paused, unless the
    /// destination asks for every page: pause it for a while, not for good.
    /// It is for a VMM that wants its link for demand faults only during a
    /// latency-sensitive phase, and for measuring the latency of a remote
    /// fault with no other traffic (`cargo xtask bench`). Not a QEMU
    /// parameter; off by default. Precopy ignores it.
    pub fn set_postcopy_background_paused(&self, paused: bool) {
        self.postcopy_background_paused
            .store(paused, Ordering::Relaxed);
    }

    /// The precopy parameters now (each read once).
    pub fn snapshot(&self) -> PrecopyParams {
        PrecopyParams {
            max_bandwidth: self.max_bandwidth(),
            downtime_limit: self.downtime_limit(),
        }
    }

    /// Sets every precopy parameter to the values of `p` (the postcopy
    /// ones are left alone).
    pub fn store(&self, p: PrecopyParams) {
        self.set_max_bandwidth(p.max_bandwidth);
        self.set_downtime_limit(p.downtime_limit);
    }
}

/// Live RAM migration statistics.
#[derive(Debug, Default)]
pub struct RamStats {
    transferred: AtomicU64,
    remaining: AtomicU64,
    total: AtomicU64,
    duplicate: AtomicU64,
    normal: AtomicU64,
    normal_bytes: AtomicU64,
    mbps_bits: AtomicU64,
    dirty_sync_count: AtomicU64,
    postcopy_requests: AtomicU64,
    dirty_pages_rate: AtomicU64,
    iterations: AtomicU64,
    postcopy_requests_ignored: AtomicU64,
    postcopy_pages_resent: AtomicU64,
    /// The `Phase` that `add_transferred` counts bytes in.
    phase: AtomicU8,
    precopy_bytes: AtomicU64,
    downtime_bytes: AtomicU64,
    postcopy_bytes: AtomicU64,
}

/// When bytes go, for the split of `transferred`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// The guest runs at the source (setup and precopy passes).
    Precopy = 0,
    /// The guest is paused (completion, postcopy switch, device state).
    Downtime = 1,
    /// The guest runs at the destination.
    Postcopy = 2,
}

/// A copy of [`RamStats`] at one instant, with QEMU's field meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RamStatsSnapshot {
    /// Bytes written to the stream, record headers included.
    pub transferred: u64,
    /// Bytes of the pages still dirty.
    pub remaining: u64,
    /// Bytes of guest RAM.
    pub total: u64,
    /// Zero pages (sent as flags only).
    pub duplicate: u64,
    /// Full pages sent.
    pub normal: u64,
    /// Bytes of the full pages sent.
    pub normal_bytes: u64,
    /// Measured throughput in megabits (10^6 bits) per second.
    pub mbps: f64,
    /// Dirty-log syncs so far.
    pub dirty_sync_count: u64,
    /// Page requests of a postcopy destination that were served: the page
    /// was still to send and went ahead of the background scan.
    pub postcopy_requests: u64,
    /// Pages newly dirtied per second, measured between the last two syncs.
    pub dirty_pages_rate: u64,
    /// Completed precopy passes.
    pub iterations: u64,
    /// Page requests of a postcopy destination for pages already sent
    /// (not sent again): a fault that raced with the page in flight, a
    /// page asked twice, or a request after the last page went. With a
    /// preempt channel, only huge pages (the others are
    /// [resent](RamStatsSnapshot::postcopy_pages_resent)).
    pub postcopy_requests_ignored: u64,
    /// Pages sent a second time, on the postcopy preempt channel: the
    /// destination asked for them while they were on their way on the main
    /// channel, where the guest would wait for them behind that channel's
    /// buffers. The source's memory no longer changes, and the destination
    /// places whichever copy comes first.
    pub postcopy_pages_resent: u64,
    /// Bytes written while the guest ran at the source (QEMU's
    /// `precopy-bytes`).
    pub precopy_bytes: u64,
    /// Bytes written while the guest was paused: completion, the postcopy
    /// switch and the device state around it (QEMU's `downtime-bytes`).
    pub downtime_bytes: u64,
    /// Bytes written while the guest ran at the destination (QEMU's
    /// `postcopy-bytes`).
    pub postcopy_bytes: u64,
}

impl RamStats {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A consistent-enough copy of every counter (each read atomically).
    pub fn snapshot(&self) -> RamStatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RamStatsSnapshot {
            transferred: r(&self.transferred),
            remaining: r(&self.remaining),
            total: r(&self.total),
            duplicate: r(&self.duplicate),
            normal: r(&self.normal),
            normal_bytes: r(&self.normal_bytes),
            mbps: f64::from_bits(r(&self.mbps_bits)),
            dirty_sync_count: r(&self.dirty_sync_count),
            postcopy_requests: r(&self.postcopy_requests),
            dirty_pages_rate: r(&self.dirty_pages_rate),
            iterations: r(&self.iterations),
            postcopy_requests_ignored: r(&self.postcopy_requests_ignored),
            postcopy_pages_resent: r(&self.postcopy_pages_resent),
            precopy_bytes: r(&self.precopy_bytes),
            downtime_bytes: r(&self.downtime_bytes),
            postcopy_bytes: r(&self.postcopy_bytes),
        }
    }

    /// Adds `bytes` to `transferred` (for example device state the
    /// controller writes on the same stream), and to the bytes of the
    /// current phase (`precopy_bytes`, `downtime_bytes` or
    /// `postcopy_bytes`, as the saver last set it).
    pub fn add_transferred(&self, bytes: u64) {
        self.transferred.fetch_add(bytes, Ordering::Relaxed);
        let phase = match self.phase.load(Ordering::Relaxed) {
            0 => &self.precopy_bytes,
            1 => &self.downtime_bytes,
            _ => &self.postcopy_bytes,
        };
        phase.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `n` page requests of a postcopy destination that were served.
    pub fn add_postcopy_requests(&self, n: u64) {
        self.postcopy_requests.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` page requests for pages already sent.
    pub fn add_postcopy_requests_ignored(&self, n: u64) {
        self.postcopy_requests_ignored
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` pages sent a second time on the preempt channel.
    pub fn add_postcopy_pages_resent(&self, n: u64) {
        self.postcopy_pages_resent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts the bytes written from now on in `phase`.
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub(crate) fn set_remaining(&self, bytes: u64) {
        self.remaining.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_zero_pages(&self, n: u64) {
        self.duplicate.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_normal_pages(&self, n: u64, page_size: u64) {
        self.normal.fetch_add(n, Ordering::Relaxed);
        self.normal_bytes
            .fetch_add(n * page_size, Ordering::Relaxed);
    }

    pub(crate) fn set_bandwidth(&self, bytes_per_sec: f64) {
        let mbps = bytes_per_sec * 8.0 / 1e6;
        self.mbps_bits.store(mbps.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn add_sync(&self, dirty_pages_rate: u64) {
        self.dirty_sync_count.fetch_add(1, Ordering::Relaxed);
        self.dirty_pages_rate
            .store(dirty_pages_rate, Ordering::Relaxed);
    }

    pub(crate) fn add_iteration(&self) {
        self.iterations.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemus() {
        let p = PrecopyParams::default();
        assert_eq!(p.max_bandwidth, 134_217_728);
        assert_eq!(p.downtime_limit, Duration::from_millis(300));
    }

    #[test]
    fn shared_params_read_and_write_without_a_lock() {
        let p = PrecopyParams {
            max_bandwidth: 5,
            downtime_limit: Duration::from_micros(1500),
        }
        .shared();
        assert_eq!(p.max_bandwidth(), 5);
        assert_eq!(p.downtime_limit(), Duration::from_micros(1500));
        assert_eq!(p.max_postcopy_bandwidth(), 0);
        assert!(!p.postcopy_background_paused(), "off by default");
        p.set_postcopy_background_paused(true);
        assert!(p.postcopy_background_paused());
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || {
                while p.max_bandwidth() != 7 {
                    std::thread::yield_now();
                }
                p.snapshot()
            })
        };
        p.set_downtime_limit(Duration::from_millis(20));
        p.set_max_postcopy_bandwidth(1 << 30);
        p.set_max_bandwidth(7);
        let seen = reader.join().unwrap();
        // The reader saw the limit store that came before the bandwidth one
        // or the old value; never a torn one.
        assert!(
            seen.downtime_limit == Duration::from_millis(20)
                || seen.downtime_limit == Duration::from_micros(1500)
        );
        assert_eq!(p.max_postcopy_bandwidth(), 1 << 30);
        p.store(PrecopyParams::default());
        assert_eq!(p.snapshot(), PrecopyParams::default());
        assert_eq!(p.max_postcopy_bandwidth(), 1 << 30, "store leaves it alone");
        assert!(p.postcopy_background_paused(), "store leaves it alone");
        p.set_downtime_limit(Duration::MAX);
        assert_eq!(p.downtime_limit(), Duration::from_nanos(u64::MAX));
        assert_eq!(Params::default().snapshot(), PrecopyParams::default());
    }

    #[test]
    fn snapshot_reads_every_counter() {
        let s = RamStats::new();
        s.add_transferred(10);
        s.set_remaining(20);
        s.set_total(30);
        s.add_zero_pages(1);
        s.add_normal_pages(2, 4096);
        s.set_bandwidth(125_000_000.0);
        s.add_sync(77);
        s.add_postcopy_requests(3);
        s.add_postcopy_requests_ignored(2);
        s.add_postcopy_pages_resent(4);
        s.add_iteration();
        s.set_phase(Phase::Downtime);
        s.add_transferred(5);
        s.set_phase(Phase::Postcopy);
        s.add_transferred(7);
        assert_eq!(
            s.snapshot(),
            RamStatsSnapshot {
                transferred: 22,
                remaining: 20,
                total: 30,
                duplicate: 1,
                normal: 2,
                normal_bytes: 8192,
                mbps: 1000.0,
                dirty_sync_count: 1,
                postcopy_requests: 3,
                dirty_pages_rate: 77,
                iterations: 1,
                postcopy_requests_ignored: 2,
                postcopy_pages_resent: 4,
                precopy_bytes: 10,
                downtime_bytes: 5,
                postcopy_bytes: 7,
            }
        );
    }
}
