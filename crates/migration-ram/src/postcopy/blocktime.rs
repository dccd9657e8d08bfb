//! Blocktime: how long threads waited on pages that had to come from the
//! source (QEMU's `postcopy-blocktime` capability, measured on the
//! destination).
//!
//! For every fault on a page that was not there yet, the fault thread records
//! which thread faulted (the userfaultfd `THREAD_ID` feature gives its tid,
//! mapped to a vCPU index through the VMM's list of vCPU thread ids; any other
//! thread counts as "other") and when the fault was read. When the page is
//! placed, the placer closes the wait: the time from the fault being read to
//! the page being placed is added to the thread's total and counted in a
//! latency histogram of power-of-two microsecond buckets. While every vCPU
//! waits at once, the guest makes no progress at all: that time is QEMU's
//! `postcopy-blocktime`.
//!
//! # Cost
//!
//! Nothing here takes a lock. The fault thread reads the clock once per batch
//! of faults; a placer reads it only for a page that was faulted on (one
//! atomic test of a bit tells), so background pages cost no clock read.
//!
//! # How waits are matched to placements
//!
//! A wait lives in one of a fixed pool of slots: the page's host address (the
//! tag), the waiting thread and the time. The fault thread is the only one
//! that fills a free slot; a placer of a faulted page claims every slot whose
//! tag is its page with a compare-and-swap to empty, so each wait is closed
//! exactly once. A thread waits on one page at a time, so the pool (twice the
//! vCPUs, plus 64 for other threads) only runs out when many other threads
//! fault at once; such a fault is still served, and counted as untracked.
//! Between a claim reading a slot's time and emptying it, the slot cannot be
//! emptied and refilled with the same page: that takes a new fault on a page
//! already placed, which postcopy never makes missing again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Buckets of the latency histogram: bucket `n` counts waits of
/// `[2^n, 2^(n+1))` µs (bucket 0 also those under 1 µs, the last one
/// everything from 2^31 µs on).
pub const LATENCY_BUCKETS: usize = 32;

/// The vCPU index of a thread that is no vCPU.
const OTHER: u32 = u32::MAX;

/// Bits of the all-blocked word that count blocked vCPUs; the rest hold the
/// microsecond at which the last of them blocked.
const COUNT_BITS: u32 = 16;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const SINCE_MAX_US: u64 = u64::MAX >> COUNT_BITS;

/// The bucket of a wait of `us` microseconds.
pub fn latency_bucket(us: u64) -> usize {
    if us < 2 {
        0
    } else {
        // `us` >= 2, so the log is 1..=63 and fits a usize.
        ((63 - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// The page's host address with bit 0 set, or 0 when the slot is free.
    tag: AtomicU64,
    /// vCPU index, or [`OTHER`].
    who: AtomicU32,
    /// When the fault was read, ns since the start.
    since_ns: AtomicU64,
}

#[derive(Debug, Default)]
struct Waiter {
    /// Waits closed.
    faults: AtomicU64,
    /// Their total length, ns.
    blocked_ns: AtomicU64,
    /// Waits open (vCPUs only): 0 means the vCPU runs.
    open: AtomicU32,
}

/// The accounting of waits, shared by the fault thread and the placers.
#[derive(Debug)]
pub(crate) struct Blocktime {
    start: Instant,
    /// (tid, vCPU index), sorted by tid.
    tids: Vec<(u32, u32)>,
    vcpus: Box<[Waiter]>,
    other: Waiter,
    slots: Box<[Slot]>,
    histogram: [AtomicU64; LATENCY_BUCKETS],
    /// Blocked vCPUs (low bits) and when all were blocked (high bits, µs).
    all: AtomicU64,
    all_blocked_us: AtomicU64,
    untracked: AtomicU64,
}

impl Blocktime {
    /// Accounting for the vCPUs whose thread ids are `vcpu_tids` (index =
    /// vCPU index; 0 for a vCPU whose thread is unknown).
    pub(crate) fn new(vcpu_tids: &[u32]) -> Self {
        let mut tids: Vec<(u32, u32)> = vcpu_tids
            .iter()
            .enumerate()
            .filter(|(_, &tid)| tid != 0)
            // A vCPU list longer than u32 cannot exist; clamp rather than wrap.
            .map(|(i, &tid)| (tid, u32::try_from(i).unwrap_or(OTHER - 1)))
            .collect();
        tids.sort_unstable();
        let slots = vcpu_tids.len().saturating_mul(2).saturating_add(64);
        Blocktime {
            start: Instant::now(),
            tids,
            vcpus: (0..vcpu_tids.len()).map(|_| Waiter::default()).collect(),
            other: Waiter::default(),
            slots: (0..slots).map(|_| Slot::default()).collect(),
            histogram: std::array::from_fn(|_| AtomicU64::new(0)),
            all: AtomicU64::new(0),
            all_blocked_us: AtomicU64::new(0),
            untracked: AtomicU64::new(0),
        }
    }

    /// Nanoseconds since the accounting started (one clock read).
    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The vCPU index of thread `tid`, or "other".
    fn who(&self, tid: Option<u32>) -> u32 {
        tid.and_then(|t| {
            self.tids
                .binary_search_by_key(&t, |&(tid, _)| tid)
                .ok()
                .map(|i| self.tids[i].1)
        })
        .unwrap_or(OTHER)
    }

    fn vcpus_len(&self) -> u64 {
        self.vcpus.len() as u64
    }

    /// Opens a wait: thread `tid` faulted on the page at host address `page`,
    /// read at `at_ns`. `cursor` is the fault thread's own search position.
    /// Only the fault thread calls this.
    pub(crate) fn open(&self, page: u64, tid: Option<u32>, at_ns: u64, cursor: &mut usize) {
        let who = self.who(tid);
        let n = self.slots.len();
        let free = (0..n)
            .map(|i| (*cursor + i) % n)
            .find(|&i| self.slots[i].tag.load(Ordering::Acquire) == 0);
        let Some(i) = free else {
            self.untracked.fetch_add(1, Ordering::Relaxed);
            return;
        };
        *cursor = (i + 1) % n;
        if let Some(v) = self.vcpus.get(who as usize) {
            if v.open.fetch_add(1, Ordering::AcqRel) == 0 {
                self.vcpu_blocked(at_ns / 1000);
            }
        }
        let slot = &self.slots[i];
        slot.who.store(who, Ordering::Relaxed);
        slot.since_ns.store(at_ns, Ordering::Relaxed);
        // Publishes `who` and `since_ns` with the tag.
        slot.tag.store(page | 1, Ordering::Release);
    }

    /// Closes every open wait on the page at host address `page`, with the
    /// time from `now` (read once, only if a wait is found). Returns how many
    /// it closed.
    pub(crate) fn close(&self, page: u64, now: impl FnOnce() -> u64) -> usize {
        let tag = page | 1;
        let mut now = Some(now);
        let mut at = 0;
        let mut closed = 0;
        for slot in self.slots.iter() {
            if slot.tag.load(Ordering::Acquire) != tag {
                continue;
            }
            let who = slot.who.load(Ordering::Relaxed);
            let since = slot.since_ns.load(Ordering::Relaxed);
            if slot
                .tag
                .compare_exchange(tag, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            if let Some(f) = now.take() {
                at = f();
            }
            self.account(who, at.saturating_sub(since), at);
            closed += 1;
        }
        closed
    }

    fn account(&self, who: u32, waited_ns: u64, at_ns: u64) {
        let waiter = self.vcpus.get(who as usize).unwrap_or(&self.other);
        waiter.faults.fetch_add(1, Ordering::Relaxed);
        waiter.blocked_ns.fetch_add(waited_ns, Ordering::Relaxed);
        self.histogram[latency_bucket(waited_ns / 1000)].fetch_add(1, Ordering::Relaxed);
        if who != OTHER && waiter.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.vcpu_runs(at_ns / 1000);
        }
    }

    /// One more vCPU waits, at `at_us`; the last one to do so starts an
    /// all-blocked period.
    fn vcpu_blocked(&self, at_us: u64) {
        let n = self.vcpus_len();
        if n > COUNT_MASK {
            return;
        }
        let mut cur = self.all.load(Ordering::Acquire);
        loop {
            let count = (cur & COUNT_MASK) + 1;
            let since = if count == n {
                at_us.min(SINCE_MAX_US)
            } else {
                cur >> COUNT_BITS
            };
            let new = (since << COUNT_BITS) | count.min(COUNT_MASK);
            match self
                .all
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// One vCPU runs again, at `at_us`; if all were blocked, the period ends.
    fn vcpu_runs(&self, at_us: u64) {
        let n = self.vcpus_len();
        if n > COUNT_MASK {
            return;
        }
        let mut cur = self.all.load(Ordering::Acquire);
        loop {
            let count = cur & COUNT_MASK;
            let ended = (count == n).then(|| at_us.saturating_sub(cur >> COUNT_BITS));
            let new = count.saturating_sub(1);
            match self
                .all
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if let Some(us) = ended {
                        self.all_blocked_us.fetch_add(us, Ordering::Relaxed);
                    }
                    return;
                }
                Err(seen) => cur = seen,
            }
        }
    }

    /// The figures so far.
    pub(crate) fn snapshot(&self) -> BlocktimeSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlocktimeSnapshot {
            all_vcpus_blocked: Duration::from_micros(load(&self.all_blocked_us)),
            vcpu_blocked: self
                .vcpus
                .iter()
                .map(|v| Duration::from_nanos(load(&v.blocked_ns)))
                .collect(),
            vcpu_faults: self.vcpus.iter().map(|v| load(&v.faults)).collect(),
            other_blocked: Duration::from_nanos(load(&self.other.blocked_ns)),
            other_faults: load(&self.other.faults),
            latency_histogram: self.histogram.iter().map(load).collect(),
            untracked_faults: load(&self.untracked),
        }
    }
}

/// Blocktime figures at one moment, in the shape of QEMU's `query-migrate`
/// postcopy fields (see the methods).
///
/// For every fault on a page that had to come from the source, the fault
/// thread records which thread faulted (the userfaultfd `THREAD_ID` feature
/// gives its tid, mapped to a vCPU index through the VMM's list of vCPU
/// thread ids; any other thread counts as "other") and when it read the
/// fault. The wait ends when the page is placed: its length is added to the
/// thread's total and counted in a histogram of power-of-two microsecond
/// buckets. While every vCPU waits at once the guest makes no progress: that
/// time is QEMU's `postcopy-blocktime`. A page served locally (a zero page) is
/// not waited for and does not count.
///
/// Measuring takes no lock: the fault thread reads the clock once per batch
/// of faults, a placer only for a page some thread faulted on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BlocktimeSnapshot {
    /// Time during which every vCPU waited at once (none if there are no
    /// vCPUs).
    pub all_vcpus_blocked: Duration,
    /// Per vCPU (by index), the total of its waits.
    pub vcpu_blocked: Vec<Duration>,
    /// Per vCPU, its waits that ended.
    pub vcpu_faults: Vec<u64>,
    /// The total of the waits of threads that are no vCPU (the VMM's own).
    pub other_blocked: Duration,
    /// Their waits that ended.
    pub other_faults: u64,
    /// Waits by length: entry `n` counts those of `[2^n, 2^(n+1))` µs (entry 0
    /// also those under 1 µs, the last entry all longer ones);
    /// [`LATENCY_BUCKETS`] entries.
    pub latency_histogram: Vec<u64>,
    /// Faults whose wait could not be recorded (too many at once); they were
    /// served all the same.
    pub untracked_faults: u64,
}

fn ms_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn avg_ns(total: Duration, n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        u64::try_from(total.as_nanos() / u128::from(n)).unwrap_or(u64::MAX)
    }
}

impl BlocktimeSnapshot {
    /// Waits that ended, of every thread.
    pub fn faults(&self) -> u64 {
        self.vcpu_faults.iter().sum::<u64>() + self.other_faults
    }

    /// The total of every thread's waits.
    pub fn total_blocked(&self) -> Duration {
        self.vcpu_blocked.iter().sum::<Duration>() + self.other_blocked
    }

    /// QEMU's `postcopy-blocktime`: milliseconds during which every vCPU
    /// waited at once.
    pub fn postcopy_blocktime_ms(&self) -> u32 {
        ms_u32(self.all_vcpus_blocked)
    }

    /// QEMU's `postcopy-vcpu-blocktime`: per vCPU, milliseconds it waited.
    pub fn postcopy_vcpu_blocktime_ms(&self) -> Vec<u32> {
        self.vcpu_blocked.iter().copied().map(ms_u32).collect()
    }

    /// QEMU's `postcopy-latency`: the average wait, in ns.
    pub fn postcopy_latency_ns(&self) -> u64 {
        avg_ns(self.total_blocked(), self.faults())
    }

    /// QEMU's `postcopy-vcpu-latency`: per vCPU, its average wait, in ns.
    pub fn postcopy_vcpu_latency_ns(&self) -> Vec<u64> {
        self.vcpu_blocked
            .iter()
            .zip(&self.vcpu_faults)
            .map(|(&t, &n)| avg_ns(t, n))
            .collect()
    }

    /// QEMU's `postcopy-non-vcpu-latency`: the average wait of other threads,
    /// in ns.
    pub fn postcopy_non_vcpu_latency_ns(&self) -> u64 {
        avg_ns(self.other_blocked, self.other_faults)
    }

    /// QEMU's `postcopy-latency-dist`: the latency histogram.
    pub fn postcopy_latency_dist(&self) -> &[u64] {
        &self.latency_histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE_A: u64 = 0x7f00_0000_1000;
    const PAGE_B: u64 = 0x7f00_0000_2000;

    #[test]
    fn buckets_are_powers_of_two_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(2), 1);
        assert_eq!(latency_bucket(3), 1);
        assert_eq!(latency_bucket(256), 8);
        assert_eq!(latency_bucket(511), 8);
        assert_eq!(latency_bucket(512), 9);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn waits_are_charged_to_their_thread() {
        // vCPU 0 is tid 100, vCPU 1 tid 200, vCPU 2 unknown.
        let b = Blocktime::new(&[100, 200, 0]);
        let mut cursor = 0;
        b.open(PAGE_A, Some(100), 1_000, &mut cursor);
        b.open(PAGE_A, Some(7), 2_000, &mut cursor); // another thread, same page
        b.open(PAGE_B, Some(200), 3_000, &mut cursor);
        b.open(PAGE_B, None, 3_000, &mut cursor); // no THREAD_ID: other
        assert_eq!(b.close(PAGE_A, || 301_000), 2);
        assert_eq!(b.close(PAGE_A, || unreachable!("no wait left")), 0);
        assert_eq!(b.close(PAGE_B, || 4_003_000), 2);
        let s = b.snapshot();
        assert_eq!(
            s.vcpu_blocked,
            vec![
                Duration::from_micros(300),
                Duration::from_millis(4),
                Duration::ZERO
            ]
        );
        assert_eq!(s.vcpu_faults, vec![1, 1, 0]);
        assert_eq!(s.other_faults, 2);
        assert_eq!(s.other_blocked, Duration::from_nanos(299_000 + 4_000_000));
        assert_eq!(s.faults(), 4);
        assert_eq!(s.latency_histogram[8], 2, "299 and 300 µs: [256, 512)");
        assert_eq!(s.latency_histogram[11], 2, "4000 µs: [2048, 4096)");
        assert_eq!(s.postcopy_vcpu_blocktime_ms(), vec![0, 4, 0]);
        assert_eq!(s.postcopy_vcpu_latency_ns(), vec![300_000, 4_000_000, 0]);
        assert_eq!(s.postcopy_non_vcpu_latency_ns(), (299_000 + 4_000_000) / 2);
        // vCPU 2 never waited, so all three were never blocked at once.
        assert_eq!(s.postcopy_blocktime_ms(), 0);
    }

    #[test]
    fn all_blocked_time_is_the_overlap_of_every_vcpu() {
        let b = Blocktime::new(&[10, 20]);
        let mut cursor = 0;
        // vCPU 0 waits from 1 ms to 10 ms, vCPU 1 from 4 ms to 6 ms, then again
        // from 8 ms to 12 ms: all blocked 4..6 and 8..10 ms.
        b.open(PAGE_A, Some(10), 1_000_000, &mut cursor);
        b.open(PAGE_B, Some(20), 4_000_000, &mut cursor);
        b.close(PAGE_B, || 6_000_000);
        let page_c = PAGE_B + 0x1000;
        b.open(page_c, Some(20), 8_000_000, &mut cursor);
        b.close(PAGE_A, || 10_000_000);
        b.close(page_c, || 12_000_000);
        let s = b.snapshot();
        assert_eq!(s.all_vcpus_blocked, Duration::from_millis(4));
        assert_eq!(s.postcopy_blocktime_ms(), 4);
        assert_eq!(
            s.vcpu_blocked,
            vec![Duration::from_millis(9), Duration::from_millis(6)]
        );
    }

    #[test]
    fn a_full_pool_counts_faults_as_untracked() {
        let b = Blocktime::new(&[]);
        let mut cursor = 0;
        for i in 0..64u64 {
            b.open(PAGE_A + i * 0x1000, Some(1), 0, &mut cursor);
        }
        b.open(PAGE_B + 0x100_0000, Some(1), 0, &mut cursor);
        assert_eq!(b.snapshot().untracked_faults, 1);
        assert_eq!(b.close(PAGE_A, || 5), 1);
        // The freed slot is found again.
        b.open(PAGE_B + 0x100_0000, Some(1), 0, &mut cursor);
        assert_eq!(b.snapshot().untracked_faults, 1);
        assert_eq!(b.close(PAGE_B + 0x100_0000, || 5), 1);
    }

    #[test]
    fn concurrent_closes_close_each_wait_once() {
        let b = std::sync::Arc::new(Blocktime::new(&[1, 2, 3, 4]));
        let mut cursor = 0;
        for tid in 1..=4u32 {
            b.open(PAGE_A, Some(tid), 0, &mut cursor);
        }
        let closers: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || b.close(PAGE_A, || 1_000))
            })
            .collect();
        let closed: usize = closers.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(closed, 4);
        let s = b.snapshot();
        assert_eq!(s.vcpu_faults, vec![1, 1, 1, 1]);
        assert_eq!(s.faults(), 4);
    }
}
