//! Background snapshots on the real kernel, with 4 KiB anonymous memory (with
//! and without `WP_UNPOPULATED`), 4 KiB memfd memory and 2 MiB hugetlbfs
//! memory.
//!
//! Each scenario protects RAM with some pages never touched, then lets
//! writer threads hammer random pages (touched or not) while the saver runs
//! under a bandwidth limit, so that many writes hit pages not saved yet. It
//! checks what a user would: the snapshot is RAM as it was at the instant of
//! protection, every page is saved exactly once, writers were held only until
//! their page was saved, and afterwards no page is write-protected and every
//! writer thread finished. Cancel and a failing sink leave no protection
//! behind either.
//!
//! Without userfaultfd the tests print SKIPPED (REQUIRE_UFFD=1 makes them
//! fail); without free huge pages the hugetlbfs one does (REQUIRE_HUGETLB=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postcopy_dest_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use migration_ram::snapshot::{check_support, BackgroundSnapshot, SnapshotSink};
use migration_ram::vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
use migration_ram::{Error, Params, PrecopyParams, RamBlock, RamStats, Result};
use migration_stream::BlockId;
use postcopy_dest_common::*;
use uffd_sys::{Features, Uffd};

const TESTS: &[&str] = &[
    "snapshot_of_4k_anonymous_memory_is_one_instant",
    "snapshot_of_4k_anonymous_memory_without_wp_unpopulated",
    "snapshot_of_4k_memfd_memory_is_one_instant",
    "snapshot_of_2m_hugetlbfs_memory_is_one_instant",
    "cancel_and_a_failing_sink_leave_no_page_protected",
];

/// Collects the pages, as a file would.
#[derive(Default)]
struct Collect {
    pages: HashMap<(u32, u64), Vec<u8>>,
    duplicates: u64,
    /// Fails the write after this many pages (a full disk).
    fail_after: Option<u64>,
    /// Raises this flag after this many pages (an operator's cancel).
    cancel_after: Option<(u64, Arc<AtomicBool>)>,
}

impl SnapshotSink for Collect {
    fn write_pages(
        &mut self,
        id: BlockId,
        block: &RamBlock,
        first: u64,
        data: &[u8],
        zero: &[bool],
    ) -> Result<u64> {
        let ps = block.page_size() as usize;
        assert_eq!(data.len(), zero.len() * ps);
        for (i, page) in data.chunks_exact(ps).enumerate() {
            assert_eq!(zero[i], page.iter().all(|&b| b == 0), "zero flag of a page");
            if self
                .pages
                .insert((id.0, first + i as u64), page.to_vec())
                .is_some()
            {
                self.duplicates += 1;
            }
        }
        let n = self.pages.len() as u64;
        if self.fail_after.is_some_and(|f| n >= f) {
            return Err(Error::Stream(migration_stream::Error::Io {
                context: "writing the snapshot",
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            }));
        }
        if let Some((at, flag)) = &self.cancel_after {
            if n >= *at {
                flag.store(true, Ordering::Relaxed);
            }
        }
        Ok(data.len() as u64)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Fills every page but every fifth (never touched) with its pattern, and
/// returns RAM as it is now, page by page (untouched pages are zero).
fn fill(g: &Guest) -> HashMap<(u32, u64), Vec<u8>> {
    let mut reference = HashMap::new();
    for (i, b) in g.blocks.iter().enumerate() {
        let ps = b.page_size() as usize;
        let mut buf = vec![0u8; ps];
        for p in 0..b.pages() {
            if p % 5 == 4 {
                reference.insert((i as u32, p), vec![0u8; ps]);
                continue;
            }
            pattern(&mut buf, (i as u64) << 32 | p);
            g.mem.write_slice(&buf, b.page_addr(p)).unwrap();
            reference.insert((i as u32, p), buf.clone());
        }
    }
    reference
}

/// Threads writing random u64s into random pages until told to stop.
struct Writers {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Writers {
    fn start(g: &Guest, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|w| {
                let (mem, blocks) = (Arc::clone(&g.mem), Arc::clone(&g.blocks));
                let (stop, writes) = (Arc::clone(&stop), Arc::clone(&writes));
                named(&format!("writer-{w}"), move || {
                    let mut rng = Rng(0x5eed + w as u64);
                    while !stop.load(Ordering::Relaxed) {
                        let b = &blocks.iter().as_slice()[rng.below(blocks.len() as u64) as usize];
                        let p = rng.below(b.pages());
                        let off = rng.below(u64::from(b.page_size()) / 8) * 8;
                        let addr = b.page_addr(p).unchecked_add(off);
                        mem.write_obj(rng.next(), addr).unwrap();
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Writers {
            stop,
            writes,
            threads,
        }
    }

    /// Stops them; they can only finish if no page is protected any more.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.writes.load(Ordering::Relaxed)
    }
}

fn protected_pages(g: &Guest) -> u64 {
    g.mem
        .iter()
        .map(|r| uffd_sys::write_protected_pages(&g.mem, r.start_addr(), r.len() as usize).unwrap())
        .sum()
}

fn params(max_bandwidth: u64) -> Params {
    Params::new(PrecopyParams {
        max_bandwidth,
        ..PrecopyParams::default()
    })
}

/// The whole scenario on `g` with `uffd`.
fn one_instant(test: &str, g: &Guest, uffd: Arc<Uffd>) {
    let before = threads();
    let reference = fill(g);
    let total_pages: u64 = g.blocks.iter().map(RamBlock::pages).sum();
    let mut snap =
        BackgroundSnapshot::protect(uffd, Arc::clone(&g.mem), Arc::clone(&g.blocks)).unwrap();
    // The instant is now: everything written from here on is after it.
    let writers = Writers::start(g, 2);
    let mut sink = Collect::default();
    let stats = RamStats::new();
    // 32 MiB at 64 MiB/s: writers meet many pages not saved yet.
    let out = snap
        .save(
            &mut sink,
            &params(64 << 20),
            &AtomicBool::new(false),
            &stats,
        )
        .unwrap();
    snap.release().unwrap();
    assert_eq!(protected_pages(g), 0, "{test}: pages still protected");
    let writes = writers.finish();
    let faults = snap.fault_stats();
    drop(snap);

    assert_eq!(sink.duplicates, 0, "{test}: a page saved twice");
    assert_eq!(sink.pages.len() as u64, total_pages, "{test}: pages saved");
    assert_eq!(out.pages, total_pages);
    let differ: Vec<_> = reference
        .iter()
        .filter(|(k, v)| sink.pages.get(k) != Some(v))
        .map(|(k, _)| *k)
        .collect();
    assert!(
        differ.is_empty(),
        "{test}: {} pages differ from RAM at the instant of protection, e.g. {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );
    assert!(writes > 0, "{test}: the writers wrote nothing");
    assert!(
        faults.fault_pages > 0 && out.fault_pages == faults.fault_pages,
        "{test}: no page saved on a write fault ({faults:?}, {out:?})"
    );
    assert!(faults.faults >= faults.fault_pages);
    assert!(
        faults.stall_max_us >= faults.stall_p99_us && faults.stall_p99_us >= faults.stall_p50_us
    );
    assert_eq!(
        faults.stall_histogram.iter().sum::<u64>(),
        faults.fault_pages,
        "{test}: one stall per page saved on a fault"
    );
    let expected_zero = reference
        .values()
        .filter(|v| v.iter().all(|&b| b == 0))
        .count() as u64;
    assert_eq!(out.zero_pages, expected_zero, "{test}: zero pages");
    let s = stats.snapshot();
    assert_eq!(s.remaining, 0);
    assert_eq!(s.normal + s.duplicate, total_pages);
    let left = threads_started_since(&before, TESTS);
    assert!(left.is_empty(), "{test}: threads left behind: {left:?}");
    eprintln!(
        "{test}: {total_pages} pages, {} saved on write faults ({} writes), stall p50 {} us p99 {} us max {} us",
        faults.fault_pages, writes, faults.stall_p50_us, faults.stall_p99_us, faults.stall_max_us
    );
}

fn support(test: &str, g: &Guest) -> Option<Arc<Uffd>> {
    if !have_uffd(test) {
        return None;
    }
    Some(check_support(&g.mem, &g.blocks).unwrap())
}

#[test]
fn snapshot_of_4k_anonymous_memory_is_one_instant() {
    let _s = serial();
    let test = "snapshot_of_4k_anonymous_memory_is_one_instant";
    let g = anonymous();
    let Some(uffd) = support(test, &g) else {
        return;
    };
    one_instant(test, &g, uffd);
}

#[test]
fn snapshot_of_4k_anonymous_memory_without_wp_unpopulated() {
    let _s = serial();
    let test = "snapshot_of_4k_anonymous_memory_without_wp_unpopulated";
    if !have_uffd(test) {
        return;
    }
    let g = anonymous();
    // A handle without WP_UNPOPULATED, as on a kernel before 6.4: untouched
    // pages are populated for reading first.
    let uffd = Arc::new(
        Uffd::builder()
            .require(Features::PAGEFAULT_FLAG_WP)
            .open()
            .unwrap(),
    );
    assert!(!uffd.features().contains(Features::WP_UNPOPULATED));
    let probe =
        BackgroundSnapshot::protect(Arc::clone(&uffd), Arc::clone(&g.mem), Arc::clone(&g.blocks))
            .unwrap();
    assert!(probe.populated_first());
    drop(probe);
    assert_eq!(protected_pages(&g), 0);
    one_instant(test, &g, uffd);
}

#[test]
fn snapshot_of_4k_memfd_memory_is_one_instant() {
    let _s = serial();
    let test = "snapshot_of_4k_memfd_memory_is_one_instant";
    let g = memfd();
    let Some(uffd) = support(test, &g) else {
        return;
    };
    one_instant(test, &g, uffd);
}

#[test]
fn snapshot_of_2m_hugetlbfs_memory_is_one_instant() {
    let _s = serial();
    let test = "snapshot_of_2m_hugetlbfs_memory_is_one_instant";
    if !have_uffd(test) {
        return;
    }
    let Some(g) = hugetlbfs(test, 4) else {
        return;
    };
    let uffd = check_support(&g.mem, &g.blocks).unwrap();
    one_instant(test, &g, uffd);
}

#[test]
fn cancel_and_a_failing_sink_leave_no_page_protected() {
    let _s = serial();
    let test = "cancel_and_a_failing_sink_leave_no_page_protected";
    let g = anonymous();
    let Some(uffd) = support(test, &g) else {
        return;
    };
    fill(&g);
    let before = threads();
    for failing in [false, true] {
        let mut snap = BackgroundSnapshot::protect(
            Arc::clone(&uffd),
            Arc::clone(&g.mem),
            Arc::clone(&g.blocks),
        )
        .unwrap();
        let writers = Writers::start(&g, 2);
        let cancel = Arc::new(AtomicBool::new(false));
        let mut sink = Collect::default();
        if failing {
            sink.fail_after = Some(2000);
        } else {
            sink.cancel_after = Some((2000, Arc::clone(&cancel)));
        }
        let e = snap
            .save(&mut sink, &params(64 << 20), &cancel, &RamStats::new())
            .unwrap_err();
        if failing {
            let source = std::error::Error::source(&e).map(ToString::to_string);
            assert!(
                matches!(&e, Error::Stream(_)) && source.is_some_and(|s| s.contains("I/O error")),
                "{e}"
            );
        } else {
            assert!(e.is_cancelled(), "{e}");
        }
        assert!(snap.saved_pages() < g.blocks.iter().map(RamBlock::pages).sum());
        // Protected pages remain until the release, which every way out runs
        // (here: dropping the snapshot).
        assert!(protected_pages(&g) > 0);
        drop(snap);
        assert_eq!(protected_pages(&g), 0, "{test}: pages still protected");
        // Every writer finishes: none is left waiting on a page.
        assert!(writers.finish() > 0);
    }
    let left = threads_started_since(&before, TESTS);
    assert!(left.is_empty(), "{test}: threads left behind: {left:?}");
}
