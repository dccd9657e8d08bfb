//! The precopy source: see the [module docs](super).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use migration_stream::{BlockId, StreamWriter};
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

use super::{chunk_pages, is_zero};
use crate::bitmap::TakenPages;
use crate::block::{RamBlock, RamBlocks};
use crate::dirty_log::DirtyLog;
use crate::error::{Error, Result};
use crate::rate::{Bandwidth, RateLimiter};
use crate::stats::{RamStats, SharedParams};
use crate::{GuestMemoryMmap, GuestRegionMmap};

/// Bytes of a page record's head when its block is named (the most a head
/// takes: tag, flags, block id, offset).
const PAGE_HEAD_BYTES: u64 = 14;

/// What one precopy pass achieved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IterationOutcome {
    /// Bytes of the pages dirty after the pass (and its closing sync).
    pub remaining_bytes: u64,
    /// Measured bandwidth in bytes per second.
    pub bandwidth: f64,
    /// Whether `remaining_bytes` fits in the downtime limit at
    /// `bandwidth`: the caller may pause the guest and call
    /// [`PrecopySaver::complete`].
    pub switchover: bool,
    /// Pages sent by the pass (normal and zero).
    pub pages_sent: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Active,
    Completed,
    Aborted,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Active => "active",
            State::Completed => "completed",
            State::Aborted => "aborted",
        }
    }
}

/// Whether a pass honours `max_bandwidth` (iterations) or not (completion,
/// with the guest paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Bandwidth,
    None,
}

/// The source side of precopy.
pub struct PrecopySaver {
    mem: Arc<GuestMemoryMmap>,
    blocks: Arc<RamBlocks>,
    dirty_log: Arc<dyn DirtyLog>,
    params: SharedParams,
    stats: Arc<RamStats>,
    cancel: Arc<AtomicBool>,
    page: Vec<u8>,
    state: State,
    iteration: u64,
    limiter: RateLimiter,
    bandwidth: Bandwidth,
    last_sync: Instant,
    remaining: u64,
}

impl std::fmt::Debug for PrecopySaver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopySaver")
            .field("blocks", &self.blocks.len())
            .field("state", &self.state)
            .field("iteration", &self.iteration)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl PrecopySaver {
    /// A saver of `blocks` of `mem`, with dirty pages from `dirty_log`.
    ///
    /// `params` may change at any time and apply from the next page;
    /// `stats` is updated as pages go; raising `cancel` makes the current
    /// and later calls fail with [`Error::Cancelled`] (a write blocked on a
    /// stalled channel is not interrupted: shut the connection down too).
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        blocks: impl Into<Arc<RamBlocks>>,
        dirty_log: Arc<dyn DirtyLog>,
        params: SharedParams,
        stats: Arc<RamStats>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        PrecopySaver {
            mem,
            blocks: blocks.into(),
            dirty_log,
            params,
            stats,
            cancel,
            page: Vec::new(),
            state: State::Created,
            iteration: 0,
            limiter: RateLimiter::new(),
            bandwidth: Bandwidth::default(),
            last_sync: Instant::now(),
            remaining: 0,
        }
    }

    /// The blocks, with their dirty bitmaps.
    pub fn blocks(&self) -> &Arc<RamBlocks> {
        &self.blocks
    }

    /// The statistics.
    pub fn stats(&self) -> &Arc<RamStats> {
        &self.stats
    }

    /// The measured bandwidth in bytes per second (0 before the first
    /// pass).
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth.estimate()
    }

    /// Passes completed so far.
    pub fn iterations(&self) -> u64 {
        self.iteration
    }

    fn expect_state(&self, op: &'static str, state: State) -> Result<()> {
        if self.state == state {
            Ok(())
        } else {
            Err(Error::InvalidState {
                op,
                state: self.state.name(),
            })
        }
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Starts the dirty log, marks every page dirty, syncs once and writes
    /// the `RamSetup` record (flushed). Fails if a block is not inside one
    /// region of the memory.
    pub fn setup<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<()> {
        self.expect_state("setup", State::Created)?;
        self.check_cancel()?;
        self.blocks.check_memory(&self.mem)?;
        self.page = vec![0; self.blocks.max_page_size() as usize];
        self.dirty_log.start()?;
        // From here on, abort() must stop the log.
        self.state = State::Active;
        for b in self.blocks.iter() {
            b.dirty().set_all();
        }
        self.sync()?;
        self.stats.set_total(self.blocks.total_bytes());
        let before = w.bytes_written();
        w.write_ram_setup(&self.blocks.infos())?;
        w.flush()?;
        self.stats.add_transferred(w.bytes_written() - before);
        self.limiter = RateLimiter::new();
        Ok(())
    }

    /// One pass: sends every dirty page once under `max_bandwidth`, writes
    /// `EndOfSection` and `Sync` (flushed), syncs the dirty log, and
    /// returns the remaining dirty bytes and whether they fit in the
    /// downtime limit at the measured bandwidth.
    pub fn iterate<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<IterationOutcome> {
        self.expect_state("iterate", State::Active)?;
        self.check_cancel()?;
        let start = Instant::now();
        let before = w.bytes_written();
        let pages_sent = self.send_dirty(w, Limit::Bandwidth)?;
        let tail = w.bytes_written();
        self.iteration += 1;
        w.write_end_of_section()?;
        w.write_sync(self.iteration)?;
        w.flush()?;
        self.stats.add_transferred(w.bytes_written() - tail);
        let bandwidth = self
            .bandwidth
            .record(w.bytes_written() - before, start.elapsed());
        self.stats.set_bandwidth(bandwidth);
        self.sync()?;
        self.stats.add_iteration();
        let downtime = self.params.downtime_limit();
        let switchover = self.remaining as f64 <= bandwidth * downtime.as_secs_f64();
        log::debug!(
            "precopy pass {}: {pages_sent} pages, {} bytes remaining, {bandwidth:.0} B/s, switchover {switchover}",
            self.iteration,
            self.remaining
        );
        Ok(IterationOutcome {
            remaining_bytes: self.remaining,
            bandwidth,
            switchover,
            pages_sent,
        })
    }

    /// The last pass, with the vCPUs paused by the caller: syncs the dirty
    /// log, sends every dirty page without bandwidth limit, writes
    /// `EndOfSection` (flushed) and stops the dirty log. The caller then
    /// writes device state and `Complete`.
    pub fn complete<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<()> {
        self.expect_state("complete", State::Active)?;
        self.check_cancel()?;
        self.sync()?;
        self.send_dirty(w, Limit::None)?;
        let tail = w.bytes_written();
        w.write_end_of_section()?;
        w.flush()?;
        self.stats.add_transferred(w.bytes_written() - tail);
        self.remaining = self.blocks.dirty_bytes();
        self.stats.set_remaining(self.remaining);
        self.state = State::Completed;
        self.dirty_log.stop()
    }

    /// Ends the migration after a failure or cancel: stops the dirty log
    /// (errors are logged). Every page not known to be handed to the
    /// channel is still dirty. Idempotent.
    pub fn abort(&mut self) {
        if self.state == State::Active {
            if let Err(e) = self.dirty_log.stop() {
                log::warn!("stopping the dirty log on abort: {e}");
            }
        }
        if self.state != State::Completed {
            self.state = State::Aborted;
        }
        self.remaining = self.blocks.dirty_bytes();
        self.stats.set_remaining(self.remaining);
    }

    /// Syncs the dirty log into the blocks and updates the rate and
    /// remaining bytes.
    fn sync(&mut self) -> Result<()> {
        let newly = self.dirty_log.sync(&self.blocks)?;
        let now = Instant::now();
        let secs = now.duration_since(self.last_sync).as_secs_f64();
        self.last_sync = now;
        let rate = if secs > 0.0 {
            (newly as f64 / secs) as u64
        } else {
            0
        };
        self.stats.add_sync(rate);
        self.remaining = self.blocks.dirty_bytes();
        self.stats.set_remaining(self.remaining);
        Ok(())
    }

    /// Sends every page dirty now, block by block, chunk by chunk; returns
    /// the pages sent.
    fn send_dirty<W: Write>(&mut self, w: &mut StreamWriter<W>, limit: Limit) -> Result<u64> {
        let blocks = self.blocks.clone();
        let mem = self.mem.clone();
        let mut sent = 0;
        for (index, block) in blocks.iter().enumerate() {
            let id = BlockId(u32::try_from(index).map_err(|_| Error::UnknownBlock {
                block: BlockId(u32::MAX),
            })?);
            let region = block.region(&mem).ok_or_else(|| Error::NotInMemory {
                name: block.name().to_owned(),
                guest_addr: block.guest_addr().0,
                size: block.size(),
            })?;
            let chunk = chunk_pages(block.page_size());
            let mut from = 0;
            while let Some(next) = block.dirty().next_set(from) {
                self.check_cancel()?;
                let taken = block.dirty().take_range(next - next % chunk, chunk);
                from = taken.end();
                if taken.is_empty() {
                    continue;
                }
                let before = w.bytes_written();
                let result = self.send_chunk(w, id, index, block, region, &taken, limit);
                self.stats.add_transferred(w.bytes_written() - before);
                if let Err(e) = result {
                    block.dirty().restore(&taken);
                    return Err(e);
                }
                sent += taken.count();
                let bytes = taken.count() * u64::from(block.page_size());
                self.remaining = self.remaining.saturating_sub(bytes);
                self.stats.set_remaining(self.remaining);
            }
        }
        Ok(sent)
    }

    /// Sends the pages of one chunk and flushes. The counters are updated
    /// only once the flush succeeded.
    #[allow(clippy::too_many_arguments)]
    fn send_chunk<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        id: BlockId,
        index: usize,
        block: &RamBlock,
        region: &GuestRegionMmap,
        taken: &TakenPages,
        limit: Limit,
    ) -> Result<()> {
        self.dirty_log
            .clear(index, taken.start(), taken.end() - taken.start())?;
        let page_size = u64::from(block.page_size());
        let base = block.guest_addr().0 - region.start_addr().0;
        let buf = &mut self.page[..block.page_size() as usize];
        let (mut zero, mut normal) = (0u64, 0u64);
        for page in taken {
            let offset = page * page_size;
            region
                .read_slice(buf, MemoryRegionAddress(base + offset))
                .map_err(|source| Error::Memory {
                    op: "reading",
                    name: block.name().to_owned(),
                    offset,
                    source,
                })?;
            let is_zero = is_zero(buf);
            if limit == Limit::Bandwidth {
                let bytes = PAGE_HEAD_BYTES + if is_zero { 0 } else { page_size };
                self.limiter.admit(bytes, &self.params, &self.cancel)?;
            }
            if is_zero {
                w.write_zero_page(id, offset)?;
                zero += 1;
            } else {
                w.write_page(id, offset, buf)?;
                normal += 1;
            }
        }
        w.flush()?;
        self.stats.add_zero_pages(zero);
        self.stats.add_normal_pages(normal, page_size);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::stats::PrecopyParams;
    use crate::VmmDirtyLog;

    fn saver(params: PrecopyParams) -> (Arc<GuestMemoryMmap>, PrecopySaver) {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 64 << 10),
                (GuestAddress(1 << 20), 1 << 20),
            ])
            .unwrap(),
        );
        let blocks = RamBlocks::from_guest_memory(&mem, &["lo", "hi"]).unwrap();
        let s = PrecopySaver::new(
            mem.clone(),
            blocks,
            Arc::new(VmmDirtyLog::new(mem.clone())),
            params.shared(),
            Arc::new(RamStats::new()),
            Arc::new(AtomicBool::new(false)),
        );
        (mem, s)
    }

    #[test]
    fn state_machine() {
        let (_, mut s) = saver(PrecopyParams::default());
        let mut w = StreamWriter::new(io::sink());
        assert!(matches!(
            s.iterate(&mut w),
            Err(Error::InvalidState {
                op: "iterate",
                state: "created"
            })
        ));
        assert!(s.complete(&mut w).is_err());
        s.setup(&mut w).unwrap();
        assert!(matches!(s.setup(&mut w), Err(Error::InvalidState { .. })));
        s.iterate(&mut w).unwrap();
        s.complete(&mut w).unwrap();
        assert!(matches!(
            s.iterate(&mut w),
            Err(Error::InvalidState {
                state: "completed",
                ..
            })
        ));
        s.abort();
        assert!(s.complete(&mut w).is_err());
    }

    #[test]
    fn zero_pages_go_as_flags_only() {
        let (mem, mut s) = saver(PrecopyParams::default());
        mem.write_slice(&[1], GuestAddress(4096)).unwrap();
        mem.write_slice(&[2], GuestAddress((1 << 20) + 8191))
            .unwrap();
        let mut w = StreamWriter::new(Vec::new());
        s.setup(&mut w).unwrap();
        let setup_len = w.bytes_written();
        let out = s.iterate(&mut w).unwrap();
        let pages = (64 << 10) / 4096 + (1 << 20) / 4096;
        assert_eq!(out.pages_sent, pages);
        assert_eq!(out.remaining_bytes, 0);
        assert!(out.switchover);
        let st = s.stats().snapshot();
        assert_eq!(st.normal, 2);
        assert_eq!(st.normal_bytes, 8192);
        assert_eq!(st.duplicate, pages - 2);
        assert_eq!(st.iterations, 1);
        assert_eq!(st.dirty_sync_count, 2);
        // Two full pages (one naming each block), zero pages of 14 bytes
        // for the first of a block and 10 after, EndOfSection and Sync.
        let expected = 2 * (4096 + 10) + 2 * 4 + (pages - 2) * 10 + 2 + 9;
        assert_eq!(w.bytes_written() - setup_len, expected);
        assert_eq!(st.transferred, w.bytes_written());
        assert!(st.mbps > 0.0);
    }
}
