//! The precopy destination: see the [module docs](super).

use std::io::Read;
use std::sync::Arc;

use migration_stream::{BlockId, BlockInfo, PageHeader, Record, StreamReader};

use crate::block::{RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::placer::{CopyPlacer, PagePlacer};
use crate::stats::RamStats;
use crate::GuestMemoryMmap;

/// The destination side of precopy.
pub struct PrecopyLoader {
    mem: Arc<GuestMemoryMmap>,
    blocks: Arc<RamBlocks>,
    stats: Arc<RamStats>,
    placer: Arc<dyn PagePlacer>,
    /// The placer when it is the default one, for `set_fresh_memory`.
    copy: Option<Arc<CopyPlacer>>,
    page: Vec<u8>,
    setup_done: bool,
    /// Zero pages in a row read by [`load`](PrecopyLoader::load) and not
    /// placed yet: block, first page, count. Only with the default placer
    /// (no vCPU waits for them); placed as one run before any other record
    /// is handled.
    zeros: Option<(BlockId, u64, u64)>,
    /// Pages in a row read by [`load`](PrecopyLoader::load) into `run_buf`
    /// and not placed yet: block, first page, count. Placed as one run
    /// ([`PagePlacer::place_run`]) when the buffer is full, before any other
    /// record is handled, and before a read that may wait for the peer.
    run: Option<(BlockId, u64, u64)>,
    run_buf: Vec<u8>,
}

/// The most bytes of pages in a row [`PrecopyLoader::load`] gathers to place
/// together: 64 KiB, a postcopy background chunk. Pages larger than half of
/// it are placed one by one.
const RUN_BYTES: usize = 64 << 10;

impl std::fmt::Debug for PrecopyLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopyLoader")
            .field("blocks", &self.blocks.len())
            .field("setup_done", &self.setup_done)
            .field("default_placer", &self.copy.is_some())
            .finish_non_exhaustive()
    }
}

impl PrecopyLoader {
    /// A loader into `blocks` of `mem`, placing pages with a
    /// [`CopyPlacer`].
    ///
    /// It assumes `mem` is fresh (all zeros) where no page was received
    /// yet, and skips writing zero pages there, so untouched guest memory
    /// stays unallocated; see [`set_fresh_memory`] otherwise.
    ///
    /// [`set_fresh_memory`]: PrecopyLoader::set_fresh_memory
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        blocks: impl Into<Arc<RamBlocks>>,
        stats: Arc<RamStats>,
    ) -> Self {
        let copy = Arc::new(CopyPlacer::new(mem.clone()));
        let mut loader = Self::with_placer(mem, blocks, stats, copy.clone());
        loader.copy = Some(copy);
        loader
    }

    /// A loader into `blocks` of `mem` that places every page through
    /// `placer` (a [`UffdPlacer`](crate::UffdPlacer) for postcopy, say).
    pub fn with_placer(
        mem: Arc<GuestMemoryMmap>,
        blocks: impl Into<Arc<RamBlocks>>,
        stats: Arc<RamStats>,
        placer: Arc<dyn PagePlacer>,
    ) -> Self {
        let blocks = blocks.into();
        stats.set_total(blocks.total_bytes());
        PrecopyLoader {
            page: vec![0; blocks.max_page_size() as usize],
            mem,
            blocks,
            stats,
            placer,
            copy: None,
            setup_done: false,
            zeros: None,
            run: None,
            run_buf: vec![0; RUN_BYTES],
        }
    }

    /// Places pages through `placer` from now on.
    pub fn set_placer(&mut self, placer: Arc<dyn PagePlacer>) {
        self.placer = placer;
        self.copy = None;
    }

    /// The placer pages go through.
    pub fn placer(&self) -> &Arc<dyn PagePlacer> {
        &self.placer
    }

    /// Whether guest memory is known to be zero where no page was received
    /// (default `true`). With `false`, every zero page is written. Applies
    /// to the default [`CopyPlacer`] only; another placer is configured
    /// where it is made.
    pub fn set_fresh_memory(&mut self, fresh: bool) {
        if let Some(copy) = &self.copy {
            copy.set_fresh_memory(fresh);
        }
    }

    /// The destination's blocks: the [`BlockResolver`] to pass to
    /// [`StreamReader::read_record`], so that offsets are checked against
    /// this side's memory.
    ///
    /// [`BlockResolver`]: migration_stream::BlockResolver
    pub fn blocks(&self) -> &RamBlocks {
        &self.blocks
    }

    /// The blocks, shared (for a postcopy fault thread, say).
    pub fn blocks_arc(&self) -> &Arc<RamBlocks> {
        &self.blocks
    }

    /// The statistics.
    pub fn stats(&self) -> &Arc<RamStats> {
        &self.stats
    }

    /// Checks a `RamSetup` record against the destination's blocks and
    /// memory. Must succeed before any page is accepted; a second call
    /// fails.
    pub fn check_setup(&mut self, announced: &[BlockInfo]) -> Result<()> {
        if self.setup_done {
            return Err(Error::SetupRepeated);
        }
        self.blocks.check_against(announced)?;
        self.blocks.check_memory(&self.mem)?;
        self.setup_done = true;
        Ok(())
    }

    /// The block and page number of a page record, checked again here
    /// (the decoder may have used another resolver).
    fn locate<'b>(
        blocks: &'b RamBlocks,
        setup_done: bool,
        hdr: &PageHeader,
    ) -> Result<(&'b RamBlock, u64)> {
        if !setup_done {
            return Err(Error::PageBeforeSetup {
                block: hdr.block,
                offset: hdr.offset,
            });
        }
        let block = blocks
            .get(hdr.block)
            .ok_or(Error::UnknownBlock { block: hdr.block })?;
        let page = u64::from(block.page_size());
        let fits = hdr.page_size == block.page_size()
            && hdr.offset % page == 0
            && hdr.offset < block.size();
        if !fits {
            return Err(Error::BadPage {
                name: block.name().to_owned(),
                offset: hdr.offset,
                page_size: hdr.page_size,
                size: block.size(),
                block_page_size: block.page_size(),
            });
        }
        Ok((block, hdr.offset / page))
    }

    /// Reads the payload of page `hdr` from `r` into a page buffer, then
    /// places it (the placer marks it received). A payload that cannot be
    /// read in full leaves guest memory untouched. Allocation-free.
    pub fn load_page<R: Read>(&mut self, hdr: PageHeader, r: &mut StreamReader<R>) -> Result<()> {
        let (block, page) = Self::locate(&self.blocks, self.setup_done, &hdr)?;
        let buf = &mut self.page[..block.page_size() as usize];
        r.read_page_into(buf)?;
        self.placer.place(block, page, buf)?;
        self.stats.add_normal_pages(1, u64::from(block.page_size()));
        Ok(())
    }

    /// Handles a zero page: the placer places it (the default one leaves a
    /// fresh page that never arrived alone) and marks it received.
    pub fn load_zero_page(&mut self, hdr: PageHeader) -> Result<()> {
        let (block, page) = Self::locate(&self.blocks, self.setup_done, &hdr)?;
        self.placer.place_zero(block, page)?;
        self.stats.add_zero_pages(1);
        Ok(())
    }

    /// Takes zero page `hdr` into the run of zero pages not placed yet when
    /// it extends it and the default placer places pages (precopy: no vCPU
    /// waits for them); otherwise places the run and then this page, or this
    /// page at once.
    fn queue_zero_page(&mut self, hdr: PageHeader) -> Result<()> {
        if self.copy.is_none() {
            return self.load_zero_page(hdr);
        }
        let (_, page) = Self::locate(&self.blocks, self.setup_done, &hdr)?;
        match &mut self.zeros {
            Some((block, first, count)) if *block == hdr.block && *first + *count == page => {
                *count += 1;
            }
            _ => {
                self.place_zeros()?;
                self.zeros = Some((hdr.block, page, 1));
            }
        }
        Ok(())
    }

    /// Places the run of zero pages not placed yet, if any (see
    /// [`PagePlacer::place_zero_run`]).
    fn place_zeros(&mut self) -> Result<()> {
        let Some((block, first, count)) = self.zeros.take() else {
            return Ok(());
        };
        let b = self
            .blocks
            .get(block)
            .ok_or(Error::UnknownBlock { block })?;
        self.placer.place_zero_run(b, first, count)?;
        self.stats.add_zero_pages(count);
        Ok(())
    }

    /// Reads the payload of page `hdr` into the run of pages not placed yet
    /// when it extends it (placing the run once full), else places that run
    /// and starts another with it. Pages too large to gather are placed at
    /// once ([`load_page`](PrecopyLoader::load_page)).
    fn queue_page<R: Read>(&mut self, hdr: PageHeader, r: &mut StreamReader<R>) -> Result<()> {
        let (ps, page) = {
            let (block, page) = Self::locate(&self.blocks, self.setup_done, &hdr)?;
            (block.page_size() as usize, page)
        };
        let room = self.run_buf.len();
        if ps * 2 > room {
            self.place_run()?;
            return self.load_page(hdr, r);
        }
        let extends = matches!(self.run, Some((block, first, count))
            if block == hdr.block && first + count == page);
        if !extends {
            self.place_run()?;
            self.run = Some((hdr.block, page, 0));
        }
        let Some((_, _, count)) = self.run.as_mut() else {
            return Ok(());
        };
        let at = *count as usize * ps;
        r.read_page_into(&mut self.run_buf[at..at + ps])?;
        *count += 1;
        if at + 2 * ps > room {
            self.place_run()?;
        }
        Ok(())
    }

    /// Places the run of pages not placed yet, if any.
    fn place_run(&mut self) -> Result<()> {
        let Some((block, first, count)) = self.run.take() else {
            return Ok(());
        };
        if count == 0 {
            return Ok(());
        }
        let b = self
            .blocks
            .get(block)
            .ok_or(Error::UnknownBlock { block })?;
        let ps = u64::from(b.page_size());
        let len = usize::try_from(count * ps).unwrap_or(usize::MAX);
        self.placer.place_run(b, first, &self.run_buf[..len])?;
        self.stats.add_normal_pages(count, ps);
        Ok(())
    }

    /// Places what [`load`](PrecopyLoader::load) holds back: a run of pages
    /// or of zero pages.
    fn place_held(&mut self) -> Result<()> {
        self.place_run()?;
        self.place_zeros()
    }

    /// Pages received so far (each counted once).
    pub fn received_pages(&self) -> u64 {
        self.blocks.received_pages()
    }

    /// A loader for the postcopy preempt channel: it shares this one's
    /// memory, blocks, statistics and placer (set the postcopy placer
    /// first), and what setup checked. See [`crate::preempt`].
    pub fn preempt_loader(&self) -> PrecopyLoader {
        PrecopyLoader {
            mem: self.mem.clone(),
            blocks: self.blocks.clone(),
            stats: self.stats.clone(),
            placer: self.placer.clone(),
            copy: self.copy.clone(),
            page: vec![0; self.page.len()],
            setup_done: self.setup_done,
            zeros: None,
            run: None,
            run_buf: Vec::new(),
        }
    }

    /// Loads the postcopy preempt channel: pages, placed as they come, up
    /// to its `EndOfSection`; returns the pages placed. Anything else on
    /// it is [`Error::NotAPreemptRecord`].
    pub fn load_preempt<R: Read>(&mut self, r: &mut StreamReader<R>) -> Result<u64> {
        let mut pages = 0;
        loop {
            let before = r.bytes_read();
            let record = r.read_record(&*self.blocks)?;
            match record {
                Record::Page(hdr) => self.load_page(hdr, r)?,
                Record::ZeroPage(hdr) => self.load_zero_page(hdr)?,
                Record::EndOfSection => {
                    self.stats.add_transferred(r.bytes_read() - before);
                    return Ok(pages);
                }
                other => {
                    return Err(Error::NotAPreemptRecord {
                        record: format!("{other:?}"),
                    })
                }
            }
            self.stats.add_transferred(r.bytes_read() - before);
            pages += 1;
        }
    }

    /// Reads and applies RAM records (`RamSetup`, pages, zero pages,
    /// `EndOfSection`, `Sync`) until another record (a command or
    /// `Complete`), which it returns for the caller to handle.
    ///
    /// Pages in a row are placed together ([`PagePlacer::place_run`], up to
    /// 64 KiB), and so are zero pages in a row with the default placer
    /// ([`PagePlacer::place_zero_run`]): when the run ends (at the next other
    /// record), when it fills, before a read that may wait for the peer (a
    /// vCPU may wait for one of its pages), or when the stream fails. Every
    /// page read is placed before this returns.
    pub fn load<R: Read>(&mut self, r: &mut StreamReader<R>) -> Result<Record> {
        loop {
            if r.buffered() == 0 {
                self.place_held()?;
            }
            let before = r.bytes_read();
            let record = match r.read_record(&*self.blocks) {
                Ok(record) => record,
                Err(e) => {
                    // What was read before the stream broke is placed: the
                    // received bitmaps then say all that arrived.
                    if let Err(placing) = self.place_held() {
                        log::warn!("placing the last pages read: {placing}");
                    }
                    return Err(e.into());
                }
            };
            if !matches!(record, Record::Page(_)) {
                self.place_run()?;
            }
            if !matches!(record, Record::ZeroPage(_)) {
                self.place_zeros()?;
            }
            match record {
                Record::RamSetup(announced) => self.check_setup(&announced)?,
                Record::Page(hdr) => {
                    if let Err(e) = self.queue_page(hdr, r) {
                        // The pages before it were read whole.
                        if let Err(placing) = self.place_held() {
                            log::warn!("placing the last pages read: {placing}");
                        }
                        return Err(e);
                    }
                }
                Record::ZeroPage(hdr) => self.queue_zero_page(hdr)?,
                Record::EndOfSection | Record::Sync { .. } => {}
                other => {
                    self.stats.add_transferred(r.bytes_read() - before);
                    return Ok(other);
                }
            }
            self.stats.add_transferred(r.bytes_read() - before);
        }
    }
}
