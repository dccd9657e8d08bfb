//! Restoring a snapshot file into guest memory: eagerly, before the guest
//! runs, or lazily, while it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use migration_stream::{BlockId, DiscardRange, SnapshotReader};

use crate::balloon::BalloonInhibitor;
use crate::bitmap::DirtyBitmap;
use crate::block::{RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::placer::PagePlacer;
use crate::postcopy::{PageRequestSink, PostcopyIncoming};
use crate::precopy::{chunk_pages_of, CHUNK_BYTES};
use crate::stats::{Phase, RamStats};

/// What a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RestoreOutcome {
    /// Pages placed in all (every page of every block, once).
    pub pages: u64,
    /// Of those, pages read from the file (the rest were zero pages, which
    /// the file does not hold).
    pub stored_pages: u64,
    /// Of those, pages read because the guest touched them (lazy restore).
    pub requested_pages: u64,
    /// Bytes read from the file.
    pub bytes_read: u64,
}

/// Checks that the snapshot's blocks are `blocks` (same count, names, sizes
/// and page sizes, in order).
fn check_blocks(reader: &SnapshotReader, blocks: &RamBlocks) -> Result<()> {
    blocks.check_against(reader.blocks())
}

fn block_id(index: usize) -> BlockId {
    // `index` < blocks.len() <= 4096 (the format's cap).
    BlockId(u32::try_from(index).unwrap_or(u32::MAX))
}

/// Places pages `first..first + n` of block `index`, whose `pending` bits
/// the caller took: stored pages are read from the file in one call, zero
/// pages placed as such.
#[allow(clippy::too_many_arguments)]
fn place_run(
    reader: &SnapshotReader,
    placer: &dyn PagePlacer,
    index: usize,
    block: &RamBlock,
    first: u64,
    n: u64,
    buf: &mut [u8],
    out: &mut RestoreOutcome,
) -> Result<()> {
    let id = block_id(index);
    let ps = u64::from(block.page_size());
    let len = (n * ps) as usize;
    let stored = (first..first + n)
        .filter(|&p| reader.is_present(id, p))
        .count() as u64;
    if stored > 0 {
        reader.read_pages(id, first, &mut buf[..len])?;
        out.bytes_read += n * ps;
    }
    for i in 0..n {
        let page = first + i;
        if reader.is_present(id, page) {
            let at = (i * ps) as usize;
            placer.place(block, page, &buf[at..at + ps as usize])?;
        } else {
            placer.place_zero(block, page)?;
        }
    }
    out.pages += n;
    out.stored_pages += stored;
    Ok(())
}

/// Restores every page of `reader` into `blocks` through `placer` (a
/// [`CopyPlacer`](crate::CopyPlacer) for a guest that does not run yet),
/// block by block in page order, reading runs of stored pages in chunks of
/// up to 1 MiB. Zero pages are placed as zero pages (a fresh copy placer
/// writes nothing for them). `stats` counts progress (`total`,
/// `remaining`, `transferred` as bytes read); raising `cancel` ends it with
/// [`Error::Cancelled`] at the next chunk.
pub fn restore_eager(
    reader: &SnapshotReader,
    blocks: &RamBlocks,
    placer: &dyn PagePlacer,
    stats: &RamStats,
    cancel: &AtomicBool,
) -> Result<RestoreOutcome> {
    check_blocks(reader, blocks)?;
    let total = blocks.total_bytes();
    stats.set_phase(Phase::Precopy);
    stats.set_total(total);
    stats.set_remaining(total);
    let max_page = blocks.max_page_size();
    let mut buf = vec![0u8; (chunk_pages_of(CHUNK_BYTES, max_page) * u64::from(max_page)) as usize];
    let mut out = RestoreOutcome::default();
    let mut remaining = total;
    for (index, block) in blocks.iter().enumerate() {
        let per_chunk = chunk_pages_of(CHUNK_BYTES, block.page_size());
        let mut page = 0;
        while page < block.pages() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let n = per_chunk.min(block.pages() - page);
            let before = out;
            place_run(reader, placer, index, block, page, n, &mut buf, &mut out)?;
            count(stats, block, &before, &out, &mut remaining);
            page += n;
        }
    }
    Ok(out)
}

/// Adds what one run did to `stats`.
fn count(
    stats: &RamStats,
    block: &RamBlock,
    before: &RestoreOutcome,
    after: &RestoreOutcome,
    remaining: &mut u64,
) {
    let ps = u64::from(block.page_size());
    let stored = after.stored_pages - before.stored_pages;
    let pages = after.pages - before.pages;
    stats.add_normal_pages(stored, ps);
    stats.add_zero_pages(pages - stored);
    stats.add_transferred(after.bytes_read - before.bytes_read);
    *remaining = remaining.saturating_sub(pages * ps);
    stats.set_remaining(*remaining);
}

/// Page requests of the fault thread, queued for the filler.
struct Requests(Mutex<Sender<(BlockId, u64)>>);

impl PageRequestSink for Requests {
    fn request(&self, block: BlockId, offset: u64, _len: u64) -> Result<()> {
        // The filler only goes away once every page is placed, and then no
        // page faults any more.
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send((block, offset));
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Pages placed per step of the background fill (256 KiB of 4 KiB pages):
/// a request waits for at most one step.
const FILL_STEP_BYTES: u64 = 256 << 10;

/// A lazy restore: the guest runs at once on empty RAM, a page it touches is
/// read from the snapshot file and placed while it waits, and a background
/// fill places the rest, going on from the last page touched.
///
/// It is built on the postcopy destination's fault handling
/// ([`PostcopyIncoming`]: the blocks registered for MISSING faults, the fault
/// thread, blocktime), with the file in the place of the source: the fault
/// thread's page requests go to [`fill`](LazyRestore::fill), which serves
/// them before anything else.
///
/// ```text
///  start: blocks checked against the file, every page discarded (so each one
///         faults), fault handling on; the caller then loads the state and
///         runs the guest
///
///  vCPU touches a missing page --> fault thread: request(block, page) --+
///                                                                      v
///  fill (the caller's thread): requested pages first, read and placed (UFFDIO_COPY
///        or UFFDIO_ZEROPAGE, waking the vCPU); then the next 256 KiB not placed
///        yet, from just after the last page requested; until every page is there
///
///  then: the caller finishes the PostcopyIncoming (unregistered, thread joined)
/// ```
pub struct LazyRestore {
    reader: Arc<SnapshotReader>,
    blocks: Arc<RamBlocks>,
    placer: Arc<dyn PagePlacer>,
    requests: Receiver<(BlockId, u64)>,
    /// Pages not placed yet.
    pending: Vec<DirtyBitmap>,
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRestore")
            .field("blocks", &self.blocks.len())
            .field("pending", &self.pending_pages())
            .finish_non_exhaustive()
    }
}

impl LazyRestore {
    /// Starts a lazy restore of `reader` into the blocks of `incoming`,
    /// which the caller made with [`PostcopyIncoming::new`] (the check that
    /// this host can serve missing faults), unlocked if the VMM locked its
    /// memory, and keeps: its [`stats`](PostcopyIncoming::stats) are the
    /// restore's faults and blocktime, and its
    /// [`finish`](PostcopyIncoming::finish) ends fault handling once
    /// [`fill`](LazyRestore::fill) has placed every page. `vcpu_tids` are
    /// the vCPU threads' ids for blocktime; `balloon` is held off meanwhile.
    ///
    /// Every page of the blocks is discarded first, so that each one faults
    /// until it is placed from the file, whatever the VMM wrote there before.
    pub fn start(
        reader: Arc<SnapshotReader>,
        incoming: &mut PostcopyIncoming,
        vcpu_tids: Vec<u32>,
        balloon: Option<&Arc<BalloonInhibitor>>,
    ) -> Result<LazyRestore> {
        let blocks = Arc::clone(incoming.blocks());
        check_blocks(&reader, &blocks)?;
        for (index, block) in blocks.iter().enumerate() {
            incoming.discard(
                block_id(index),
                &[DiscardRange {
                    offset: 0,
                    len: block.size(),
                }],
            )?;
        }
        let (tx, rx) = mpsc::channel();
        let sink: Arc<dyn PageRequestSink> = Arc::new(Requests(Mutex::new(tx)));
        let placer = incoming.listen(sink, vcpu_tids, balloon)?;
        let pending = blocks
            .iter()
            .map(|b| {
                let p = DirtyBitmap::new(b.pages());
                p.set_all();
                p
            })
            .collect();
        Ok(LazyRestore {
            reader,
            blocks,
            placer,
            requests: rx,
            pending,
        })
    }

    /// Pages not placed yet.
    pub fn pending_pages(&self) -> u64 {
        self.pending.iter().map(DirtyBitmap::count).sum()
    }

    /// Places every page: requested pages first, then the background fill
    /// nearest-first after the last request. Returns when every page is
    /// there (then finish the [`PostcopyIncoming`]). `stats` counts
    /// progress; raising `cancel` ends it with [`Error::Cancelled`] (the
    /// guest's missing pages then stay missing until a new `fill`: pause the
    /// guest first).
    pub fn fill(&mut self, stats: &RamStats, cancel: &AtomicBool) -> Result<RestoreOutcome> {
        let total = self.blocks.total_bytes();
        stats.set_phase(Phase::Postcopy);
        stats.set_total(total);
        let mut remaining = self.pending_pages_bytes();
        stats.set_remaining(remaining);
        let max_page = self.blocks.max_page_size();
        let step = (FILL_STEP_BYTES / u64::from(max_page)).max(1);
        let mut buf = vec![0u8; (step * u64::from(max_page)) as usize];
        let mut out = RestoreOutcome::default();
        // Where the background fill goes on: block index and page.
        let (mut at_block, mut at_page) = (0usize, 0u64);
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            // Requested pages first.
            while let Ok((id, offset)) = self.requests.try_recv() {
                let index = usize::try_from(id.0).unwrap_or(usize::MAX);
                let Some(block) = self.blocks.get(id) else {
                    continue;
                };
                let page = offset / u64::from(block.page_size());
                if self.pending[index].test_and_clear(page) {
                    let before = out;
                    place_run(
                        &self.reader,
                        &*self.placer,
                        index,
                        block,
                        page,
                        1,
                        &mut buf,
                        &mut out,
                    )?;
                    out.requested_pages += 1;
                    count(stats, block, &before, &out, &mut remaining);
                }
                (at_block, at_page) = (index, page + 1);
            }
            // Then the next pages not placed yet, from where the fill is.
            let Some((index, first)) = self.next_pending(at_block, at_page) else {
                return Ok(out);
            };
            let block = &self.blocks.iter().as_slice()[index];
            let bstep = (FILL_STEP_BYTES / u64::from(block.page_size())).max(1);
            let mut n = 0;
            while n < bstep
                && first + n < block.pages()
                && self.pending[index].test_and_clear(first + n)
            {
                n += 1;
            }
            let before = out;
            place_run(
                &self.reader,
                &*self.placer,
                index,
                block,
                first,
                n,
                &mut buf,
                &mut out,
            )?;
            count(stats, block, &before, &out, &mut remaining);
            (at_block, at_page) = (index, first + n);
        }
    }

    fn pending_pages_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .zip(&self.pending)
            .map(|(b, p)| p.count() * u64::from(b.page_size()))
            .sum()
    }

    /// The first pending page at or after `page` of block `index`, then in
    /// the blocks after it, then from the start.
    fn next_pending(&self, index: usize, page: u64) -> Option<(usize, u64)> {
        let n = self.blocks.len();
        (0..=n).find_map(|k| {
            let i = (index + k) % n.max(1);
            let from = if k == 0 { page } else { 0 };
            let p = self.pending.get(i)?;
            (from < p.pages())
                .then(|| p.next_set(from))
                .flatten()
                .map(|pg| (i, pg))
        })
    }
}
