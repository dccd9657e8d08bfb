//! How a destination puts a received page into guest memory.
//!
//! A [`PagePlacer`] writes **one whole host page** (the block's page size:
//! 4 KiB, or 2 MiB on hugetlbfs) and then sets its bit in the block's
//! [`received`](crate::RamBlock::received) bitmap. That bitmap is the single
//! record of what has landed: the loader counts from it, a postcopy fault
//! thread asks it whether a page still has to be requested, and recovery
//! sends it back to the source. A bit is set only after the page's bytes are
//! in place, so a reader that sees the bit sees the page.
//!
//! | placer | how | use |
//! |--------|-----|-----|
//! | [`CopyPlacer`] (default) | a plain copy through vm-memory; a zero page that never arrived before and already reads as zero is not written at all; a run of zero pages is discarded | precopy |
//! | [`UffdPlacer`] | one atomic `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`; a zeroed copy on hugetlbfs, which has none) into memory registered with a userfaultfd for MISSING faults, waking the vCPUs that wait on it | postcopy |
//!
//! Both take `&self` and are `Send + Sync`, so the loader of the main
//! channel, the loader of the preempt channel and a fault thread can share
//! one. They do not order two placements of the same page against each
//! other: a [`CopyPlacer`]'s last write wins, a [`UffdPlacer`]'s first
//! (later ones meet `EEXIST`: the page is already there, which is fine, as
//! a postcopy page is only ever sent with the contents it keeps).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use uffd_sys::{CopyMode, Uffd, Wake};
use vm_memory::{Bytes, GuestAddress};

use crate::block::{RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// Writes whole host pages into guest memory and records them as received.
pub trait PagePlacer: Send + Sync {
    /// Places `data` (exactly one page of the block's page size) as page
    /// `page` of `block`, then sets its `received` bit.
    fn place(&self, block: &RamBlock, page: u64, data: &[u8]) -> Result<()>;

    /// Places a zero page as page `page` of `block`, then sets its
    /// `received` bit.
    fn place_zero(&self, block: &RamBlock, page: u64) -> Result<()>;

    /// Places zero pages as the `count` pages of `block` from `first`, then
    /// sets their `received` bits. The default places them one by one with
    /// [`place_zero`](PagePlacer::place_zero); a placer that can empty a
    /// run of pages at once (the [`CopyPlacer`]) does so.
    fn place_zero_run(&self, block: &RamBlock, first: u64, count: u64) -> Result<()> {
        for page in first..first.saturating_add(count) {
            self.place_zero(block, page)?;
        }
        Ok(())
    }

    /// Places `data`, whole pages of the block's page size, as the pages of
    /// `block` from `first` on, then sets their `received` bits. The default
    /// places them one by one with [`place`](PagePlacer::place); the
    /// [`UffdPlacer`] places a run with one `UFFDIO_COPY`.
    fn place_run(&self, block: &RamBlock, first: u64, data: &[u8]) -> Result<()> {
        let ps = block.page_size() as usize;
        if data.len() % ps != 0 {
            return Err(Error::PageBuffer {
                name: block.name().to_owned(),
                len: data.len(),
                page_size: block.page_size(),
            });
        }
        for (page, bytes) in (first..).zip(data.chunks(ps)) {
            self.place(block, page, bytes)?;
        }
        Ok(())
    }
}

/// Checks a placement: the page exists and `len` (if given) is the block's
/// page size. Returns the page's guest address.
fn check(block: &RamBlock, page: u64, len: Option<usize>) -> Result<GuestAddress> {
    if page >= block.pages() {
        return Err(Error::PageOutOfRange {
            name: block.name().to_owned(),
            page,
            pages: block.pages(),
        });
    }
    if let Some(len) = len {
        if len as u64 != u64::from(block.page_size()) {
            return Err(Error::PageBuffer {
                name: block.name().to_owned(),
                len,
                page_size: block.page_size(),
            });
        }
    }
    Ok(block.page_addr(page))
}

/// Zeros for writing zero pages piece by piece, with no allocation.
static ZEROS: [u8; 4096] = [0; 4096];

/// The least a run of zero pages spans for the [`CopyPlacer`] to discard it
/// (one `madvise` or hole punch) rather than handle each page: 32 KiB, 8
/// small pages. Checking whether an untouched page reads as zero costs a
/// page fault (which maps the kernel's zero page), and a guest's untouched
/// memory arrives as long runs of zero pages.
pub const ZERO_RUN_DISCARD_BYTES: u64 = 32 << 10;

/// Places pages with plain copies through vm-memory.
///
/// A zero page whose `received` bit is clear and whose bytes already read
/// as zero is not written (the default, "fresh" mode), so untouched guest
/// memory stays unallocated: reading an untouched anonymous page maps the
/// kernel's shared zero page and allocates nothing. A VMM that loaded
/// something into the destination's RAM before the migration (firmware, a
/// previous failed attempt) is still right: those pages do not read as
/// zero and are cleared.
///
/// A run of zero pages of at least [`ZERO_RUN_DISCARD_BYTES`]
/// ([`place_zero_run`](PagePlacer::place_zero_run)) is discarded instead,
/// whatever it held: it then reads as zero and holds no memory, and no page
/// of it is read. Where guest memory cannot be discarded (locked with
/// `mlock`, say) the placer says so once in the log and handles such runs
/// page by page from then on.
#[derive(Debug)]
pub struct CopyPlacer {
    mem: Arc<GuestMemoryMmap>,
    fresh: AtomicBool,
    /// Whether runs of zero pages are discarded (cleared for good by the
    /// first discard that fails).
    discard_runs: AtomicBool,
}

impl CopyPlacer {
    /// A placer into `mem`, which is fresh.
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        CopyPlacer {
            mem,
            fresh: AtomicBool::new(true),
            discard_runs: AtomicBool::new(true),
        }
    }

    /// Whether a zero page that never arrived may be skipped when it already
    /// reads as zero (default `true`). With `false`, every zero page is
    /// written.
    pub fn set_fresh_memory(&self, fresh: bool) {
        self.fresh.store(fresh, Ordering::Relaxed);
    }

    /// See [`set_fresh_memory`](CopyPlacer::set_fresh_memory).
    pub fn fresh_memory(&self) -> bool {
        self.fresh.load(Ordering::Relaxed)
    }

    /// Whether the page at `at` reads as zero now (read in 4 KiB pieces,
    /// stopping at the first non-zero one).
    fn reads_zero(&self, block: &RamBlock, page: u64, at: GuestAddress) -> Result<bool> {
        let mut buf = [0u8; 4096];
        let size = u64::from(block.page_size());
        let piece = buf.len() as u64;
        for i in 0..size.div_ceil(piece) {
            let len = piece.min(size - i * piece) as usize;
            self.mem
                .read_slice(&mut buf[..len], GuestAddress(at.0 + i * piece))
                .map_err(|source| Error::Memory {
                    op: "reading",
                    name: block.name().to_owned(),
                    offset: page * size,
                    source,
                })?;
            if !crate::precopy::is_zero(&buf[..len]) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn write(&self, block: &RamBlock, page: u64, at: GuestAddress, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, at)
            .map_err(|source| Error::Memory {
                op: "writing",
                name: block.name().to_owned(),
                offset: page * u64::from(block.page_size()),
                source,
            })
    }
}

impl PagePlacer for CopyPlacer {
    fn place(&self, block: &RamBlock, page: u64, data: &[u8]) -> Result<()> {
        let at = check(block, page, Some(data.len()))?;
        self.write(block, page, at, data)?;
        block.received().set(page);
        Ok(())
    }

    fn place_zero(&self, block: &RamBlock, page: u64) -> Result<()> {
        let at = check(block, page, None)?;
        if !self.fresh_memory()
            || block.received().test(page)
            || !self.reads_zero(block, page, at)?
        {
            let size = u64::from(block.page_size());
            let piece = ZEROS.len() as u64;
            for i in 0..size.div_ceil(piece) {
                let len = piece.min(size - i * piece) as usize;
                self.write(block, page, GuestAddress(at.0 + i * piece), &ZEROS[..len])?;
            }
        }
        block.received().set(page);
        Ok(())
    }

    fn place_zero_run(&self, block: &RamBlock, first: u64, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let at = check(block, first, None)?;
        check(block, first.saturating_add(count - 1), None)?;
        let bytes = count * u64::from(block.page_size());
        if bytes >= ZERO_RUN_DISCARD_BYTES && self.discard_runs.load(Ordering::Relaxed) {
            // Checked above: whole pages inside the block's region.
            let len = usize::try_from(bytes).unwrap_or(usize::MAX);
            match uffd_sys::discard_guest(&self.mem, at, len) {
                Ok(_) => {
                    // Only after the contents are gone.
                    block.received().set_range(first, count);
                    return Ok(());
                }
                Err(e) => {
                    self.discard_runs.store(false, Ordering::Relaxed);
                    log::info!(
                        "zero pages: guest memory cannot be discarded ({e}); \
                         each zero page is handled by itself from now on"
                    );
                }
            }
        }
        for page in first..first + count {
            self.place_zero(block, page)?;
        }
        Ok(())
    }
}

/// How often a placement the kernel answers with `EAGAIN` (the address
/// space is changing, e.g. during a fork) is tried again.
const AGAIN_RETRIES: u32 = 1000;

/// Places pages atomically with a userfaultfd, waking the threads (vCPUs)
/// that fault on them.
///
/// `mem`'s blocks must be registered with `uffd` for MISSING faults (and,
/// for hugetlbfs memory, `uffd` opened with `MISSING_HUGETLBFS`). A page is
/// placed whole by one `UFFDIO_COPY`; a zero page by `UFFDIO_ZEROPAGE`, or,
/// for blocks whose page is larger than the host's base page (hugetlbfs,
/// which has no zeropage), by a copy of zeros. A page already present
/// (`EEXIST`) counts as placed; uffd-sys has then woken its waiters, as the
/// kernel does not.
#[derive(Debug)]
pub struct UffdPlacer {
    mem: Arc<GuestMemoryMmap>,
    uffd: Arc<Uffd>,
    base_page: u64,
    /// One zero page of the largest huge page size among the blocks
    /// (allocated zeroed: it costs no memory until read).
    zeros: Vec<u8>,
}

impl UffdPlacer {
    /// A placer into `mem` through `uffd`, for pages of `blocks`.
    pub fn new(mem: Arc<GuestMemoryMmap>, uffd: Arc<Uffd>, blocks: &RamBlocks) -> Self {
        let base_page = uffd_sys::mapping::host_page_size() as u64;
        let largest = u64::from(blocks.max_page_size());
        let zeros = if largest > base_page {
            // Mapped for good, or a hugetlbfs copy from it can fail with
            // ENOMEM on a host with no spare huge page.
            crate::postcopy::fault::resident_zeros(usize::try_from(largest).unwrap_or(0))
        } else {
            Vec::new()
        };
        UffdPlacer {
            mem,
            uffd,
            base_page,
            zeros,
        }
    }

    /// The userfaultfd it places through.
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    /// Runs `op` until it is not `EAGAIN`; `EEXIST` is success.
    fn run(
        &self,
        block: &RamBlock,
        page: u64,
        op: &'static str,
        f: impl Fn() -> uffd_sys::Result<u64>,
    ) -> Result<()> {
        let mut tries = 0;
        loop {
            match f() {
                Ok(_) => break,
                Err(e) if e.is_exists() => break,
                Err(e) if e.is_again() && tries < AGAIN_RETRIES => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(source) => {
                    return Err(Error::Uffd {
                        op,
                        name: block.name().to_owned(),
                        offset: page * u64::from(block.page_size()),
                        source,
                    })
                }
            }
        }
        block.received().set(page);
        Ok(())
    }
}

impl PagePlacer for UffdPlacer {
    fn place(&self, block: &RamBlock, page: u64, data: &[u8]) -> Result<()> {
        let at = check(block, page, Some(data.len()))?;
        let ps = data.len();
        self.run(block, page, "UFFDIO_COPY", || {
            self.uffd
                .copy_to_guest(&self.mem, at, data, ps, CopyMode::empty())
        })
    }

    /// One `UFFDIO_COPY` for the whole run (about a third less time per
    /// 4 KiB page than one each, measured on this project's hosts). Where a
    /// page of it is present already (it came on the preempt channel, or the
    /// fault thread placed it), the kernel stops there; the pages after it
    /// are placed with the next call, and that one is left as it is.
    fn place_run(&self, block: &RamBlock, first: u64, data: &[u8]) -> Result<()> {
        let ps = block.page_size() as usize;
        if data.is_empty() {
            return Ok(());
        }
        if data.len() % ps != 0 {
            return Err(Error::PageBuffer {
                name: block.name().to_owned(),
                len: data.len(),
                page_size: block.page_size(),
            });
        }
        let count = (data.len() / ps) as u64;
        let at = check(block, first, None)?;
        check(block, first + count - 1, None)?;
        let (mut off, mut tries) = (0usize, 0);
        while off < data.len() {
            let to = GuestAddress(at.0 + off as u64);
            match self
                .uffd
                .copy_to_guest(&self.mem, to, &data[off..], ps, CopyMode::empty())
            {
                Ok(n) => off += usize::try_from(n).unwrap_or(usize::MAX).max(ps),
                // The page after the ones placed is there already (its
                // waiters were woken): skip it.
                Err(e) if e.is_exists() => off += e.done() as usize + ps,
                // Stopped part way (at a present page, or the address space
                // changing): go on from there.
                Err(e) if e.is_again() && tries < AGAIN_RETRIES => {
                    tries += 1;
                    off += e.done() as usize;
                    if e.done() == 0 {
                        std::thread::yield_now();
                    }
                }
                Err(source) => {
                    return Err(Error::Uffd {
                        op: "UFFDIO_COPY",
                        name: block.name().to_owned(),
                        offset: first * ps as u64 + off as u64,
                        source,
                    })
                }
            }
        }
        block.received().set_range(first, count);
        Ok(())
    }

    fn place_zero(&self, block: &RamBlock, page: u64) -> Result<()> {
        let at = check(block, page, None)?;
        let size = u64::from(block.page_size());
        let ps = block.page_size() as usize;
        if size > self.base_page {
            let zeros = self.zeros.get(..ps).ok_or(Error::PageBuffer {
                name: block.name().to_owned(),
                len: self.zeros.len(),
                page_size: block.page_size(),
            })?;
            self.run(block, page, "UFFDIO_COPY", || {
                self.uffd
                    .copy_to_guest(&self.mem, at, zeros, ps, CopyMode::empty())
            })
        } else {
            self.run(block, page, "UFFDIO_ZEROPAGE", || {
                self.uffd.zero_guest(&self.mem, at, ps, ps, Wake::Yes)
            })
        }
    }
}

/// A generic test suite for [`PagePlacer`] implementations.
///
/// `block` (of `mem`, at least 2 pages) must have no page received yet, and
/// its pages 0 and 1 must be missing (fresh, or discarded), so that even a
/// placer that refuses to overwrite can place them; any fault handling the
/// memory needs must already be set up. Reads of pages 0 and 1 happen only
/// after they are placed.
///
/// It checks that a whole page lands with its bytes and its `received` bit;
/// that placing it again with the same bytes is harmless and counted once;
/// that a zero page reads as zeros; and that a buffer of the wrong length
/// and a page past the block's end are refused (as [`Error::PageBuffer`]
/// and [`Error::PageOutOfRange`]) with nothing received.
pub fn conformance(
    placer: &dyn PagePlacer,
    mem: &GuestMemoryMmap,
    block: &RamBlock,
) -> std::result::Result<(), String> {
    let ps = block.page_size() as usize;
    let read = |page: u64| -> std::result::Result<Vec<u8>, String> {
        let mut v = vec![0; ps];
        mem.read_slice(&mut v, block.page_addr(page))
            .map_err(|e| format!("reading page {page}: {e}"))?;
        Ok(v)
    };
    let fail = |what: &str, e: Error| format!("{what}: {e}");
    if block.pages() < 2 || block.received().count() != 0 {
        return Err("the block needs 2 pages and none received".into());
    }
    let data: Vec<u8> = (0..ps).map(|i| (i % 253) as u8 + 1).collect();
    placer
        .place(block, 0, &data)
        .map_err(|e| fail("place", e))?;
    if read(0)? != data {
        return Err("page 0 does not hold the bytes placed".into());
    }
    if !block.received().test(0) {
        return Err("page 0 placed but not received".into());
    }
    placer
        .place(block, 0, &data)
        .map_err(|e| fail("placing page 0 again", e))?;
    if read(0)? != data {
        return Err("page 0 changed when placed again".into());
    }
    placer
        .place_zero(block, 1)
        .map_err(|e| fail("place_zero", e))?;
    if read(1)?.iter().any(|&b| b != 0) {
        return Err("zero page 1 is not zero".into());
    }
    placer
        .place_zero(block, 1)
        .map_err(|e| fail("placing zero page 1 again", e))?;
    if block.received().count() != 2 {
        return Err(format!(
            "{} pages received, expected 2",
            block.received().count()
        ));
    }
    match placer.place(block, 1, &data[..ps - 1]) {
        Err(Error::PageBuffer { .. }) => {}
        other => return Err(format!("a short buffer gave {other:?}")),
    }
    match placer.place(block, block.pages(), &data) {
        Err(Error::PageOutOfRange { .. }) => {}
        other => return Err(format!("a page past the end gave {other:?}")),
    }
    match placer.place_zero(block, u64::MAX) {
        Err(Error::PageOutOfRange { .. }) => {}
        other => return Err(format!("a zero page past the end gave {other:?}")),
    }
    if block.received().count() != 2 {
        return Err("a refused placement was recorded as received".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Arc<GuestMemoryMmap>, RamBlocks) {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 16 * 4096)]).unwrap(),
        );
        let blocks = RamBlocks::from_guest_memory(&mem, &["ram"]).unwrap();
        (mem, blocks)
    }

    fn page_of(mem: &GuestMemoryMmap, block: &RamBlock, page: u64) -> Vec<u8> {
        let mut v = vec![0; block.page_size() as usize];
        mem.read_slice(&mut v, block.page_addr(page)).unwrap();
        v
    }

    #[test]
    fn copy_placer_conformance() {
        let (mem, blocks) = setup();
        let placer = CopyPlacer::new(mem.clone());
        conformance(&placer, &mem, blocks.iter().next().unwrap()).unwrap();
    }

    #[test]
    fn copy_placer_skips_only_zero_pages_that_already_read_zero() {
        let (mem, blocks) = setup();
        let block = blocks.iter().next().unwrap();
        let placer = CopyPlacer::new(mem.clone());
        // Untouched memory: nothing to write, and nothing is allocated.
        placer.place_zero(block, 4).unwrap();
        assert_eq!(page_of(&mem, block, 4), vec![0; 4096]);
        assert!(block.received().test(4));
        // A page the VMM wrote before the migration (firmware, an earlier
        // attempt), never received: the zero page clears it.
        mem.write_slice(&[7; 4096], block.page_addr(5)).unwrap();
        placer.place_zero(block, 5).unwrap();
        assert_eq!(page_of(&mem, block, 5), vec![0; 4096]);
        // Received before: a zero page overwrites it.
        placer.place(block, 6, &[9; 4096]).unwrap();
        placer.place_zero(block, 6).unwrap();
        assert_eq!(page_of(&mem, block, 6), vec![0; 4096]);
        // Not fresh: always written.
        placer.set_fresh_memory(false);
        assert!(!placer.fresh_memory());
        mem.write_slice(&[7; 4096], block.page_addr(8)).unwrap();
        placer.place_zero(block, 8).unwrap();
        assert_eq!(page_of(&mem, block, 8), vec![0; 4096]);
    }

    /// Fills every page of `block` with a byte of its own (page `p`: `p + 1`).
    fn fill(mem: &GuestMemoryMmap, block: &RamBlock) {
        for p in 0..block.pages() {
            mem.write_slice(&[p as u8 + 1; 4096], block.page_addr(p))
                .unwrap();
        }
    }

    /// Checks that pages `zeros` of `block` read as zero and are received,
    /// and that every other page still holds what [`fill`] wrote and is not.
    fn check_zero_run(mem: &GuestMemoryMmap, block: &RamBlock, zeros: std::ops::Range<u64>) {
        for p in 0..block.pages() {
            if zeros.contains(&p) {
                assert_eq!(page_of(mem, block, p), vec![0; 4096], "page {p}");
                assert!(block.received().test(p), "page {p} not received");
            } else {
                assert_eq!(page_of(mem, block, p), vec![p as u8 + 1; 4096], "page {p}");
                assert!(!block.received().test(p), "page {p} received");
            }
        }
    }

    #[test]
    fn copy_placer_zero_runs_clear_exactly_their_pages() {
        let (mem, blocks) = setup();
        let block = blocks.iter().next().unwrap();
        let placer = CopyPlacer::new(mem.clone());
        // Pages the VMM wrote: a long run (discarded) and a short one (page
        // by page) must both clear them, and nothing around them.
        fill(&mem, block);
        let long = ZERO_RUN_DISCARD_BYTES / 4096 + 3;
        placer.place_zero_run(block, 2, long).unwrap();
        check_zero_run(&mem, block, 2..2 + long);
        placer.place_zero_run(block, 14, 1).unwrap();
        placer.place_zero_run(block, 15, 0).unwrap();
        assert_eq!(page_of(&mem, block, 14), vec![0; 4096]);
        assert_eq!(page_of(&mem, block, 15), vec![16; 4096]);
        // A run past the block's end is refused, and nothing is cleared.
        match placer.place_zero_run(block, 12, 5) {
            Err(Error::PageOutOfRange { .. }) => {}
            other => panic!("a run past the end gave {other:?}"),
        }
        assert_eq!(page_of(&mem, block, 12), vec![0; 4096]);
        assert_eq!(page_of(&mem, block, 15), vec![16; 4096]);
    }

    #[test]
    fn copy_placer_zero_runs_in_locked_memory_are_cleared_page_by_page() {
        let (mem, blocks) = setup();
        let block = blocks.iter().next().unwrap();
        fill(&mem, block);
        let len = block.size() as usize;
        if let Err(e) =
            uffd_sys::mlock_guest(&mem, block.guest_addr(), len, uffd_sys::MlockMode::Populate)
        {
            println!(
                "*** SKIPPED copy_placer_zero_runs_in_locked_memory_are_cleared_page_by_page: \
                 cannot lock 64 KiB ({e}) ***"
            );
            return;
        }
        // Locked memory cannot be discarded: the run is written instead.
        let placer = CopyPlacer::new(mem.clone());
        placer.place_zero_run(block, 0, 12).unwrap();
        check_zero_run(&mem, block, 0..12);
        assert!(!placer.discard_runs.load(Ordering::Relaxed));
        uffd_sys::munlock_guest(&mem, block.guest_addr(), len).unwrap();
    }
}
