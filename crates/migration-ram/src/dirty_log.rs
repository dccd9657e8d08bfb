//! Where dirty pages come from: the [`DirtyLog`] trait and two
//! implementations.
//!
//! A hypervisor implements [`DirtyLog`] over its own tracking (KVM's
//! `KVM_GET_DIRTY_LOG`/`KVM_CLEAR_DIRTY_LOG`, a dirty ring, ...). This
//! crate provides:
//!
//! - [`VmmDirtyLog`]: the writes the VMM itself makes through vm-memory's
//!   API (device emulation, virtio queues), which vm-memory records in each
//!   region's [`AtomicBitmap`]. KVM does not see those writes.
//! - [`CompositeDirtyLog`]: several logs as one (typically the KVM log and
//!   a [`VmmDirtyLog`]); every call goes to each of them.
//!
//! [`conformance`] is a test suite any implementation can run.
//!
//! # Protocol
//!
//! ```text
//!  start ──> ( sync ──> clear(chunk)* )* ──> stop
//! ```
//!
//! `sync` ORs into the blocks' [`DirtyBitmap`](crate::DirtyBitmap)s every
//! page written since the previous `sync` (or since `start`) and re-arms
//! tracking; a page is reported by exactly one `sync` per write. `clear` is
//! called for a chunk of pages after their dirty bits were taken and before
//! they are read for sending: with KVM's manual dirty-log protect this is
//! where the pages are write-protected again, so a write after it shows up
//! in the next `sync`.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::bitmap::TakenPages;
use crate::block::{RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// A source of dirty-page information.
pub trait DirtyLog: Send + Sync {
    /// Starts tracking writes (called once at migration setup).
    fn start(&self) -> Result<()>;

    /// Adds every page written since the last sync into the blocks' dirty
    /// bitmaps (OR) and returns how many were newly marked. A log may report
    /// a page again until [`DirtyLog::clear`] re-arms it (KVM's manual
    /// protect does): it is then already dirty in the block's bitmap, or was
    /// just sent, and either way no write is lost.
    fn sync(&self, blocks: &RamBlocks) -> Result<u64>;

    /// Called with the pages of block `index` just taken from its dirty
    /// bitmap, before they are read for sending. With KVM's manual dirty-log
    /// protect this is where exactly those pages are write-protected again
    /// (`KVM_CLEAR_DIRTY_LOG`), so a write after it shows up in the next
    /// `sync`. It must not forget a write to any page not in `pages`: that
    /// page is not being sent now, and only the next `sync` can report it.
    /// Default: nothing.
    fn clear(&self, index: usize, pages: &TakenPages) -> Result<()> {
        let _ = (index, pages);
        Ok(())
    }

    /// Stops tracking (migration finished, failed or cancelled).
    fn stop(&self) -> Result<()>;
}

/// The page size of an [`AtomicBitmap`], which vm-memory does not expose:
/// its byte size over its bit count, rounded up to a power of two (exact
/// for any region of at least one page).
fn bitmap_page_size(bitmap: &AtomicBitmap) -> Option<u64> {
    let bits = bitmap.len() as u64;
    if bits == 0 {
        return None;
    }
    Some(
        (bitmap.byte_size() as u64 / bits)
            .max(1)
            .next_power_of_two(),
    )
}

/// ORs the set bits of a region bitmap (`words`, `bitmap_page` bytes per
/// bit, starting at guest address `region_start`) into `block`'s dirty
/// bitmap; returns the pages newly marked.
fn merge_region_bits(block: &RamBlock, region_start: u64, bitmap_page: u64, words: &[u64]) -> u64 {
    let page = u64::from(block.page_size());
    let block_start = block.guest_addr().0;
    let block_end = block_start + block.size();
    let dirty = block.dirty();
    // Fast path: same granularity, block starts on a bitmap word.
    if bitmap_page == page && block_start >= region_start {
        let offset = block_start - region_start;
        if offset % (64 * page) == 0 {
            let base = usize::try_from(offset / page / 64).unwrap_or(usize::MAX);
            return (0..dirty.words())
                .map(|i| {
                    let bits = words.get(base.saturating_add(i)).copied().unwrap_or(0);
                    dirty.or_word(i, bits)
                })
                .sum();
        }
    }
    let mut newly = 0;
    for (w, &bits) in words.iter().enumerate() {
        let mut bits = bits;
        while bits != 0 {
            let bit = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let lo = region_start + bit * bitmap_page;
            let hi = lo + bitmap_page;
            let (lo, hi) = (lo.max(block_start), hi.min(block_end));
            if lo < hi {
                let first = (lo - block_start) / page;
                let last = (hi - 1 - block_start) / page;
                newly += dirty.set_range(first, last - first + 1);
            }
        }
    }
    newly
}

/// The writes the VMM makes through vm-memory's API, as recorded in each
/// region's [`AtomicBitmap`].
///
/// `sync` reads and resets each region's bitmap atomically (word by word,
/// so a concurrent write is reported by this sync or the next, never lost)
/// and maps its bits onto the blocks, whatever the two page sizes: a
/// bitmap page larger than a block page marks every block page it covers,
/// a smaller one marks the block page containing it. It allocates one
/// `Vec<u64>` per region and sync (vm-memory's `get_and_reset`), never per
/// page.
#[derive(Debug, Clone)]
pub struct VmmDirtyLog {
    mem: Arc<GuestMemoryMmap>,
}

impl VmmDirtyLog {
    /// A log over the bitmaps of `mem`'s regions.
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        VmmDirtyLog { mem }
    }
}

impl DirtyLog for VmmDirtyLog {
    /// Forgets every write made before.
    fn start(&self) -> Result<()> {
        for region in self.mem.iter() {
            MmapRegion::bitmap(region).reset();
        }
        Ok(())
    }

    fn sync(&self, blocks: &RamBlocks) -> Result<u64> {
        let mut newly = 0;
        for region in self.mem.iter() {
            let bitmap = MmapRegion::bitmap(region);
            let Some(bitmap_page) = bitmap_page_size(bitmap) else {
                continue;
            };
            let words = bitmap.get_and_reset();
            if words.iter().all(|&w| w == 0) {
                continue;
            }
            let start = region.start_addr().0;
            let end = start + region.len();
            for block in blocks {
                let b_start = block.guest_addr().0;
                if b_start < end && b_start + block.size() > start {
                    newly += merge_region_bits(block, start, bitmap_page, &words);
                }
            }
        }
        Ok(newly)
    }

    /// vm-memory always records writes: nothing to stop.
    fn stop(&self) -> Result<()> {
        Ok(())
    }
}

/// Several [`DirtyLog`]s as one: each call goes to every log in order.
///
/// `sync` returns the pages newly marked by all of them together (a page
/// reported by two logs counts once). `start` stops the logs it already
/// started if a later one fails; `stop` stops every log and returns the
/// first error.
#[derive(Clone)]
pub struct CompositeDirtyLog(pub Vec<Arc<dyn DirtyLog>>);

impl std::fmt::Debug for CompositeDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompositeDirtyLog")
            .field("logs", &self.0.len())
            .finish()
    }
}

impl CompositeDirtyLog {
    /// The logs, called in this order.
    pub fn new(logs: Vec<Arc<dyn DirtyLog>>) -> Self {
        CompositeDirtyLog(logs)
    }
}

impl DirtyLog for CompositeDirtyLog {
    fn start(&self) -> Result<()> {
        for (i, log) in self.0.iter().enumerate() {
            if let Err(e) = log.start() {
                for started in &self.0[..i] {
                    if let Err(stop) = started.stop() {
                        log::warn!("stopping a dirty log after a failed start: {stop}");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn sync(&self, blocks: &RamBlocks) -> Result<u64> {
        let mut newly = 0;
        for log in &self.0 {
            newly += log.sync(blocks)?;
        }
        Ok(newly)
    }

    fn clear(&self, index: usize, pages: &TakenPages) -> Result<()> {
        self.0.iter().try_for_each(|log| log.clear(index, pages))
    }

    fn stop(&self) -> Result<()> {
        let mut first = None;
        for log in &self.0 {
            if let Err(e) = log.stop() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// A write into guest memory that the log under test must see, for
/// [`conformance`]: `data` at a guest address, or a description of why it
/// failed.
pub type GuestWrite<'a> = dyn FnMut(GuestAddress, &[u8]) -> std::result::Result<(), String> + 'a;

/// A generic test suite for [`DirtyLog`] implementations.
///
/// `write` must write `data` at a guest address in a way the log under
/// test tracks (through vm-memory's `Bytes` API for [`VmmDirtyLog`], from a
/// vCPU for a KVM log). The guest must be otherwise quiet: the suite checks
/// that exactly the written pages are reported.
///
/// It checks that, with one block per region of `mem` (4 KiB pages, every
/// region a multiple of that): writes to the first, a middle and the last
/// page of each block, and one write straddling two pages, are all reported
/// by the next `sync`, with the right count of newly marked pages and no
/// other page; that a second `sync` marks nothing new; that once a sender
/// took and cleared the pages, a page already dirty in the block's bitmap
/// is not counted as newly marked; that `clear` re-arms exactly the pages it is given: a
/// write made after a `sync` to a page beside them is reported by the next
/// `sync`, and so is a write to a cleared page after its `clear`; and that
/// `stop` succeeds.
pub fn conformance(
    mem: &GuestMemoryMmap,
    log: &dyn DirtyLog,
    write: &mut GuestWrite<'_>,
) -> std::result::Result<(), String> {
    let names: Vec<String> = (0..mem.num_regions()).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let blocks = RamBlocks::from_guest_memory(mem, &refs).map_err(|e| e.to_string())?;
    let fail = |what: &str, e: Error| format!("{what}: {e}");
    log.start().map_err(|e| fail("start", e))?;
    // Forget whatever the log reports at first (a KVM log may start full),
    // as a sender would: take every page and clear it.
    log.sync(&blocks).map_err(|e| fail("first sync", e))?;
    let send_all = |what: &str| -> std::result::Result<(), String> {
        for (i, b) in blocks.iter().enumerate() {
            let mut from = 0;
            while from < b.pages() {
                let taken = b.dirty().take_range(from, 256);
                if !taken.is_empty() {
                    log.clear(i, &taken).map_err(|e| fail(what, e))?;
                }
                from = taken.end();
            }
        }
        Ok(())
    };
    send_all("clear after the first sync")?;

    let check = |expected: &[Vec<u64>], what: &str| -> std::result::Result<(), String> {
        for (b, want) in blocks.iter().zip(expected) {
            let got: Vec<u64> = b.dirty().iter_set().collect();
            if &got != want {
                return Err(format!(
                    "{what}: block {} has dirty pages {got:?}, expected {want:?}",
                    b.name()
                ));
            }
        }
        Ok(())
    };

    let mut expected: Vec<Vec<u64>> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let last = b.pages() - 1;
        let mut pages = vec![0, last / 2, last];
        for &p in &pages {
            write(b.page_addr(p), &[0x5a, i as u8, p as u8])?;
        }
        if i == 0 && b.pages() >= 4 {
            // A write across the boundary of pages 1 and 2.
            write(GuestAddress(b.page_addr(2).0 - 2), &[1, 2, 3, 4])?;
            pages.extend([1, 2]);
        }
        pages.sort_unstable();
        pages.dedup();
        expected.push(pages);
    }
    let total: u64 = expected.iter().map(|p| p.len() as u64).sum();
    let newly = log.sync(&blocks).map_err(|e| fail("sync", e))?;
    if newly != total {
        return Err(format!(
            "sync reported {newly} newly dirty pages, expected {total}"
        ));
    }
    check(&expected, "after the writes")?;

    let again = log.sync(&blocks).map_err(|e| fail("second sync", e))?;
    if again != 0 {
        return Err(format!("second sync with no write reported {again} pages"));
    }
    check(&expected, "after a second sync")?;

    send_all("clear after the second sync")?;

    // A page already dirty in the bitmap is not newly marked.
    let b0 = blocks.iter().next().ok_or("no block")?;
    b0.dirty().set(0);
    write(b0.page_addr(0), &[7])?;
    write(b0.page_addr(1), &[7])?;
    let newly = log.sync(&blocks).map_err(|e| fail("third sync", e))?;
    if newly != 1 {
        return Err(format!(
            "sync counted {newly} newly dirty pages, expected 1 (page 0 was already dirty)"
        ));
    }
    let mut expected: Vec<Vec<u64>> = blocks.iter().map(|_| Vec::new()).collect();
    expected[0] = vec![0, 1];
    check(&expected, "after the third sync")?;

    // clear() re-arms exactly the pages it is given. Page 1 is written after
    // the sync, so only the log knows; the sender takes page 0 alone (its
    // chunk covers page 1 too) and clears it: page 1's write must survive,
    // and page 0 must be reported again when written after its clear.
    send_all("clear after the third sync")?;
    if b0.pages() >= 4 {
        write(b0.page_addr(1), &[9])?;
        b0.dirty().set(0);
        let taken = b0.dirty().take_range(0, b0.pages());
        if taken.iter().collect::<Vec<_>>() != [0] {
            return Err("take_range took other pages than page 0".into());
        }
        log.clear(0, &taken).map_err(|e| fail("clear", e))?;
        write(b0.page_addr(0), &[10])?;
        log.sync(&blocks).map_err(|e| fail("sync after clear", e))?;
        let mut expected: Vec<Vec<u64>> = blocks.iter().map(|_| Vec::new()).collect();
        expected[0] = vec![0, 1];
        check(
            &expected,
            "after clearing page 0 alone (page 1 written before, page 0 after)",
        )?;
    }
    log.stop().map_err(|e| fail("stop", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use parking_lot::Mutex;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::Bytes;

    use super::*;
    use crate::GuestRegionMmap;

    fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 640 << 10),
                (GuestAddress(1 << 20), 4 << 20),
            ])
            .unwrap(),
        )
    }

    fn bytes_writer(
        mem: &GuestMemoryMmap,
    ) -> impl FnMut(GuestAddress, &[u8]) -> std::result::Result<(), String> + '_ {
        |addr, data| mem.write_slice(data, addr).map_err(|e| e.to_string())
    }

    #[test]
    fn vmm_dirty_log_conformance() {
        let mem = mem();
        let log = VmmDirtyLog::new(mem.clone());
        conformance(&mem, &log, &mut bytes_writer(&mem)).unwrap();
    }

    /// A log fed by hand, standing in for a hypervisor's log.
    #[derive(Default)]
    struct FakeLog {
        pending: Mutex<Vec<(usize, u64)>>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl DirtyLog for FakeLog {
        fn start(&self) -> Result<()> {
            self.calls.lock().push("start");
            Ok(())
        }
        fn sync(&self, blocks: &RamBlocks) -> Result<u64> {
            self.calls.lock().push("sync");
            let mut newly = 0;
            for (b, p) in self.pending.lock().drain(..) {
                newly += u64::from(blocks.iter().nth(b).unwrap().dirty().set(p));
            }
            Ok(newly)
        }
        fn clear(&self, _: usize, _: &TakenPages) -> Result<()> {
            self.calls.lock().push("clear");
            Ok(())
        }
        fn stop(&self) -> Result<()> {
            self.calls.lock().push("stop");
            Ok(())
        }
    }

    /// A log with manual protect done wrong: `clear` re-arms every page of
    /// the range its pages span, forgetting writes no sync reported yet
    /// there (the bug a range-based clear of KVM's log has).
    struct RangeClearingLog {
        inner: VmmDirtyLog,
        mem: Arc<GuestMemoryMmap>,
        carry: Mutex<Vec<(usize, u64)>>,
    }

    impl DirtyLog for RangeClearingLog {
        fn start(&self) -> Result<()> {
            self.inner.start()
        }
        fn sync(&self, blocks: &RamBlocks) -> Result<u64> {
            let mut newly = self.inner.sync(blocks)?;
            for (i, p) in self.carry.lock().drain(..) {
                newly += u64::from(blocks.iter().nth(i).unwrap().dirty().set(p));
            }
            Ok(newly)
        }
        fn clear(&self, index: usize, pages: &TakenPages) -> Result<()> {
            // Take what was written since the last sync; forget the pages of
            // the range, keep the others for the next sync.
            let scratch = RamBlocks::from_guest_memory(&self.mem, &["r0", "r1"])?;
            self.inner.sync(&scratch)?;
            for (i, b) in scratch.iter().enumerate() {
                for p in b.dirty().iter_set() {
                    if i != index || p < pages.start() || p >= pages.end() {
                        self.carry.lock().push((i, p));
                    }
                }
            }
            Ok(())
        }
        fn stop(&self) -> Result<()> {
            self.inner.stop()
        }
    }

    #[test]
    fn conformance_catches_a_clear_that_forgets_pages_beside_those_given() {
        let mem = mem();
        let log = RangeClearingLog {
            inner: VmmDirtyLog::new(mem.clone()),
            mem: mem.clone(),
            carry: Mutex::new(Vec::new()),
        };
        let e = conformance(&mem, &log, &mut bytes_writer(&mem)).unwrap_err();
        assert!(e.contains("after clearing page 0 alone"), "{e}");
    }

    #[test]
    fn composite_dirty_log_conformance() {
        let mem = mem();
        let fake = Arc::new(FakeLog::default());
        let log = CompositeDirtyLog::new(vec![
            fake.clone() as Arc<dyn DirtyLog>,
            Arc::new(VmmDirtyLog::new(mem.clone())),
        ]);
        conformance(&mem, &log, &mut bytes_writer(&mem)).unwrap();
        assert_eq!(fake.calls.lock().first(), Some(&"start"));
        assert_eq!(fake.calls.lock().last(), Some(&"stop"));
        assert!(fake.calls.lock().contains(&"clear"));
    }

    #[test]
    fn composite_merges_and_counts_pages_once() {
        let mem = mem();
        let blocks = RamBlocks::from_guest_memory(&mem, &["lo", "hi"]).unwrap();
        let fake = Arc::new(FakeLog::default());
        let log = CompositeDirtyLog::new(vec![
            fake.clone() as Arc<dyn DirtyLog>,
            Arc::new(VmmDirtyLog::new(mem.clone())),
        ]);
        log.start().unwrap();
        // The hypervisor saw pages 3 and 5 of "hi", the VMM wrote 5 and 7.
        fake.pending.lock().extend([(1, 3), (1, 5)]);
        mem.write_slice(&[1], GuestAddress((1 << 20) + 5 * 4096))
            .unwrap();
        mem.write_slice(&[1], GuestAddress((1 << 20) + 7 * 4096))
            .unwrap();
        assert_eq!(log.sync(&blocks).unwrap(), 3);
        let hi = blocks.by_name("hi").unwrap().1;
        assert_eq!(hi.dirty().iter_set().collect::<Vec<_>>(), vec![3, 5, 7]);
        assert_eq!(log.sync(&blocks).unwrap(), 0);
    }

    #[test]
    fn a_failing_start_stops_the_logs_already_started() {
        struct Failing;
        impl DirtyLog for Failing {
            fn start(&self) -> Result<()> {
                Err(Error::dirty_log("start", "no dirty logging here"))
            }
            fn sync(&self, _: &RamBlocks) -> Result<u64> {
                Ok(0)
            }
            fn stop(&self) -> Result<()> {
                Ok(())
            }
        }
        let fake = Arc::new(FakeLog::default());
        let log = CompositeDirtyLog::new(vec![fake.clone(), Arc::new(Failing)]);
        let err = log.start().unwrap_err();
        assert!(matches!(err, Error::DirtyLog { op: "start", .. }));
        assert_eq!(*fake.calls.lock(), vec!["start", "stop"]);
    }

    /// A region whose vm-memory bitmap tracks `bitmap_page` byte pages.
    fn region_with_bitmap_page(addr: u64, size: usize, bitmap_page: usize) -> GuestRegionMmap {
        let bitmap = AtomicBitmap::new(size, NonZeroUsize::new(bitmap_page).unwrap());
        // PROT_READ | PROT_WRITE on Linux.
        let mapping = MmapRegionBuilder::new_with_bitmap(size, bitmap)
            .with_mmap_prot(0x1 | 0x2)
            .build()
            .unwrap();
        GuestRegionMmap::new(mapping, GuestAddress(addr)).unwrap()
    }

    #[test]
    fn bitmap_pages_larger_than_block_pages() {
        // 64 KiB bitmap pages (a 64 KiB-page host), 4 KiB block pages.
        let mem = Arc::new(
            GuestMemoryMmap::from_regions(vec![region_with_bitmap_page(0, 1 << 20, 64 << 10)])
                .unwrap(),
        );
        let blocks = RamBlocks::from_guest_memory(&mem, &["ram"]).unwrap();
        let log = VmmDirtyLog::new(mem.clone());
        log.start().unwrap();
        mem.write_slice(&[1], GuestAddress(0x10_0ff)).unwrap();
        assert_eq!(log.sync(&blocks).unwrap(), 16);
        let dirty: Vec<u64> = blocks.iter().next().unwrap().dirty().iter_set().collect();
        assert_eq!(dirty, (16..32).collect::<Vec<_>>());
    }

    #[test]
    fn bitmap_pages_smaller_than_block_pages() {
        // 4 KiB bitmap pages, 64 KiB block pages, block at an offset.
        let mem = Arc::new(
            GuestMemoryMmap::from_regions(vec![region_with_bitmap_page(0, 4 << 20, 4096)]).unwrap(),
        );
        let blocks = RamBlocks::new(vec![
            RamBlock::new("a", GuestAddress(0), 1 << 20, 64 << 10).unwrap(),
            RamBlock::new("b", GuestAddress(1 << 20), 3 << 20, 64 << 10).unwrap(),
        ])
        .unwrap();
        let log = VmmDirtyLog::new(mem.clone());
        log.start().unwrap();
        // Two 4 KiB writes in "b"'s page 2, one in its last page, one in "a".
        mem.write_slice(&[1], GuestAddress((1 << 20) + 2 * 65536 + 4096))
            .unwrap();
        mem.write_slice(&[1], GuestAddress((1 << 20) + 2 * 65536 + 8192))
            .unwrap();
        mem.write_slice(&[1], GuestAddress((4 << 20) - 1)).unwrap();
        mem.write_slice(&[1], GuestAddress(65536)).unwrap();
        assert_eq!(log.sync(&blocks).unwrap(), 3);
        let (_, a) = blocks.by_name("a").unwrap();
        let (_, b) = blocks.by_name("b").unwrap();
        assert_eq!(a.dirty().iter_set().collect::<Vec<_>>(), vec![1]);
        assert_eq!(b.dirty().iter_set().collect::<Vec<_>>(), vec![2, 47]);
    }

    #[test]
    fn start_forgets_earlier_writes() {
        let mem = mem();
        let blocks = RamBlocks::from_guest_memory(&mem, &["lo", "hi"]).unwrap();
        mem.write_slice(&[1], GuestAddress(0)).unwrap();
        let log = VmmDirtyLog::new(mem.clone());
        log.start().unwrap();
        assert_eq!(log.sync(&blocks).unwrap(), 0);
        assert_eq!(blocks.dirty_pages(), 0);
    }
}
