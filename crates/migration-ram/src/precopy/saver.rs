//! The precopy source, and the source of postcopy: see the
//! [module docs](super).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use migration_stream::limits::MAX_DISCARD_RANGES;
use migration_stream::{BlockId, Command, DiscardRange, StreamWriter};
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

use super::{is_zero, CHUNK_BYTES};
use crate::bitmap::TAKE_MAX_PAGES;
use crate::block::{RamBlock, RamBlocks};
use crate::channel::ChannelSet;
use crate::dirty_log::DirtyLog;
use crate::error::{Error, Result};
use crate::keepalive::{self, Keepalive, KeepaliveState};
use crate::rate::{Bandwidth, RateLimiter, SLICE};
use crate::schedule::{Batch, LinearScan, PageRequester, PageScheduler, RequestFirst};
use crate::stats::{Phase, RamStats, SharedParams};
use crate::{GuestMemoryMmap, GuestRegionMmap};

/// Bytes of a page record's head when its block is named (the most a head
/// takes: tag, flags, block id, offset).
const PAGE_HEAD_BYTES: u64 = 14;

/// What one precopy pass achieved.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct IterationOutcome {
    /// Bytes of the pages dirty after the pass (and its closing sync; an
    /// interrupted pass does not sync, so this lacks the writes since the
    /// last one).
    pub remaining_bytes: u64,
    /// Measured bandwidth in bytes per second.
    pub bandwidth: f64,
    /// Whether `remaining_bytes` fits in the downtime limit at
    /// `bandwidth`: the caller may pause the guest and call
    /// [`PrecopySaver::complete`]. Never for an interrupted pass.
    pub switchover: bool,
    /// Pages sent by the pass (normal and zero).
    pub pages_sent: u64,
    /// Whether the pass ended early because the
    /// [interrupt](PrecopySaver::set_interrupt) flag was raised: the pages
    /// it did not reach are still dirty.
    pub interrupted: bool,
}

/// What the postcopy switch ([`PrecopySaver::start_postcopy`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostcopySwitch {
    /// Pages the destination was told to drop: sent before, dirty again.
    pub discarded_pages: u64,
    /// Ranges of consecutive such pages.
    pub discarded_ranges: u64,
    /// `Discard` commands that carried them.
    pub discard_commands: u64,
    /// Pages left to send in postcopy (dirty now, whether sent before or
    /// not).
    pub remaining_pages: u64,
    /// Their bytes.
    pub remaining_bytes: u64,
}

/// What [`PrecopySaver::postcopy_send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostcopyOutcome {
    /// Pages sent (normal and zero), requested or in the background.
    pub pages_sent: u64,
    /// Requested pages sent ahead of the background scan.
    pub requests_served: u64,
    /// Requests for pages already sent, seen while sending (not sent
    /// again). Later ones are counted in
    /// [`RamStatsSnapshot::postcopy_requests_ignored`](crate::RamStatsSnapshot::postcopy_requests_ignored).
    pub requests_ignored: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Active,
    Postcopy,
    Completed,
    Aborted,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Active => "active",
            State::Postcopy => "postcopy",
            State::Completed => "completed",
            State::Aborted => "aborted",
        }
    }
}

/// What a pass is: it decides the bandwidth limit, whether the pass may
/// be interrupted and whether the dirty log is re-armed per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// A precopy iteration: `max_bandwidth`, interruptible, log running.
    Precopy,
    /// The completion pass, guest paused: no limit, log running.
    Completion,
    /// Postcopy: `max_postcopy_bandwidth`, charged by the caller after
    /// each chunk; the log is stopped.
    Postcopy,
}

/// Bandwidth measurement of the current pass: bytes flushed since the last
/// chunk boundary that was measured, and when that was.
#[derive(Debug, Clone, Copy)]
struct Meter {
    mark: Instant,
    bytes: u64,
}

/// The source side of precopy, and of postcopy after it.
pub struct PrecopySaver {
    mem: Arc<GuestMemoryMmap>,
    blocks: Arc<RamBlocks>,
    dirty_log: Arc<dyn DirtyLog>,
    /// Whether the dirty log was started and not stopped yet.
    log_running: bool,
    params: SharedParams,
    stats: Arc<RamStats>,
    cancel: Arc<AtomicBool>,
    interrupt: Arc<AtomicBool>,
    scheduler: Box<dyn PageScheduler>,
    /// The postcopy scheduler, made by `page_requester` or `postcopy_send`.
    postcopy: Option<RequestFirst>,
    keepalive: Option<KeepaliveState>,
    /// Pages of a chunk, read before the chunk is admitted and written.
    buf: Vec<u8>,
    /// Which pages of `buf` are zero.
    zero: Vec<bool>,
    state: State,
    iteration: u64,
    limiter: RateLimiter,
    bandwidth: Bandwidth,
    meter: Meter,
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
            .field("keepalive", &self.keepalive.is_some())
            .field("postcopy", &self.postcopy.is_some())
            .finish_non_exhaustive()
    }
}

impl PrecopySaver {
    /// A saver of `blocks` of `mem`, with dirty pages from `dirty_log`,
    /// sending through a [`LinearScan`] and with no keepalive.
    ///
    /// `params` may change at any time and apply from the next chunk;
    /// `stats` is updated as chunks go; raising `cancel` makes the current
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
        let now = Instant::now();
        PrecopySaver {
            mem,
            blocks: blocks.into(),
            dirty_log,
            log_running: false,
            params,
            stats,
            cancel,
            interrupt: Arc::new(AtomicBool::new(false)),
            scheduler: Box::new(LinearScan::new()),
            postcopy: None,
            keepalive: None,
            buf: Vec::new(),
            zero: Vec::new(),
            state: State::Created,
            iteration: 0,
            limiter: RateLimiter::new(),
            bandwidth: Bandwidth::default(),
            meter: Meter {
                mark: now,
                bytes: 0,
            },
            last_sync: now,
            remaining: 0,
        }
    }

    /// This saver, sending through `scheduler` (see
    /// [`set_scheduler`](PrecopySaver::set_scheduler)).
    pub fn with_scheduler(mut self, scheduler: Box<dyn PageScheduler>) -> Self {
        self.scheduler = scheduler;
        self
    }

    /// Sends through `scheduler` from the next precopy or completion pass
    /// on. Every pass calls its [`new_pass`](PageScheduler::new_pass), then
    /// sends its batches until it has none, each on the channel it names.
    /// Postcopy sends through its own [`RequestFirst`] (see
    /// [`page_requester`](PrecopySaver::page_requester)).
    pub fn set_scheduler(&mut self, scheduler: Box<dyn PageScheduler>) {
        self.scheduler = scheduler;
    }

    /// Passes a destination's request for page `page` (index) of block
    /// `block` to the precopy scheduler; see [`PageScheduler::request`].
    /// Postcopy requests go through [`page_requester`](PrecopySaver::page_requester).
    pub fn request_page(&mut self, block: BlockId, page: u64) -> Result<()> {
        self.scheduler.request(&self.blocks, block, page)
    }

    /// Pings the peer on the main channel while the saver runs, and fails
    /// with [`Error::PeerSilent`] when it stops answering; `None` (the
    /// default, and what a file migration uses) turns it off. See
    /// [`crate::keepalive`].
    pub fn set_keepalive(&mut self, keepalive: Option<Keepalive>) {
        self.keepalive = keepalive.map(KeepaliveState::new);
    }

    /// Ends precopy passes early when `interrupt` is raised (QEMU's
    /// `migrate-start-postcopy`): [`iterate`](PrecopySaver::iterate)
    /// returns at the next chunk boundary, once the chunk being sent is
    /// flushed, with [`IterationOutcome::interrupted`] set; the pages it did
    /// not reach stay dirty. It is read once per chunk. While it stays
    /// raised every `iterate` returns at once; the completion pass and
    /// postcopy ignore it.
    pub fn set_interrupt(&mut self, interrupt: Arc<AtomicBool>) {
        self.interrupt = interrupt;
    }

    /// The handle the return-path thread queues the destination's page
    /// requests with (and reports its own failure through) during
    /// [`postcopy_send`](PrecopySaver::postcopy_send). Take it before the
    /// destination may run, that is before writing `Run`: requests queue
    /// up until `postcopy_send` serves them, requested pages ahead of the
    /// background scan. See
    /// [who does what](crate::schedule#who-does-what-with-a-request).
    ///
    /// Every call makes a new queue: the handles of an earlier one then
    /// fail with [`Error::SchedulerGone`] (a postcopy recovery takes a new
    /// one for its new return path).
    pub fn page_requester(&mut self) -> PageRequester {
        let blocks = self.blocks.clone();
        self.request_first().requester(blocks)
    }

    /// A [`PreemptSender`](crate::PreemptSender) for the return-path
    /// thread: it sends the pages the destination asks for itself, on
    /// `writer` (a postcopy preempt channel whose preamble was written),
    /// while [`postcopy_send`](PrecopySaver::postcopy_send) sends the rest
    /// on the main channel and moves its scan to where the requests were.
    /// Take it, as [`page_requester`](PrecopySaver::page_requester) (which it
    /// calls), before the destination may run; see [`crate::preempt`].
    pub fn preempt_sender<W: Write>(&mut self, writer: StreamWriter<W>) -> crate::PreemptSender<W> {
        let requester = self.page_requester();
        crate::PreemptSender::new(
            self.mem.clone(),
            self.blocks.clone(),
            requester,
            self.stats.clone(),
            writer,
        )
    }

    /// The blocks, with their dirty and sent bitmaps.
    pub fn blocks(&self) -> &Arc<RamBlocks> {
        &self.blocks
    }

    /// The statistics.
    pub fn stats(&self) -> &Arc<RamStats> {
        &self.stats
    }

    /// The measured bandwidth in bytes per second (0 before the first
    /// chunk was measured).
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

    fn request_first(&mut self) -> &mut RequestFirst {
        let stats = &self.stats;
        self.postcopy
            .get_or_insert_with(|| RequestFirst::new(false).with_stats(stats.clone()))
    }

    /// Runs the keepalive with a fresh clock read.
    fn tick<C: ChannelSet>(&mut self, ch: &mut C) -> Result<()> {
        if self.keepalive.is_none() {
            return Ok(());
        }
        keepalive::tick(&mut self.keepalive, Instant::now(), ch.main(), &self.stats)
    }

    /// Starts the dirty log, marks every page dirty (and none sent), syncs
    /// once and writes the `RamSetup` record on the main channel (flushed).
    /// Fails if a block is not inside one region of the memory.
    pub fn setup<C: ChannelSet>(&mut self, ch: &mut C) -> Result<()> {
        self.expect_state("setup", State::Created)?;
        self.check_cancel()?;
        self.blocks.check_memory(&self.mem)?;
        let page = u64::from(self.blocks.max_page_size());
        let buf_len = CHUNK_BYTES.max(page);
        self.buf = vec![0; usize::try_from(buf_len).unwrap_or(usize::MAX)];
        self.zero = vec![false; TAKE_MAX_PAGES as usize];
        self.stats.set_phase(Phase::Precopy);
        self.dirty_log.start()?;
        // From here on, abort() must stop the log.
        self.log_running = true;
        self.state = State::Active;
        for b in self.blocks.iter() {
            b.dirty().set_all();
            b.sent().clear_all();
        }
        self.sync()?;
        self.stats.set_total(self.blocks.total_bytes());
        let w = ch.main();
        let before = w.bytes_written();
        let result = w
            .write_ram_setup(&self.blocks.infos())
            .and_then(|()| w.flush());
        self.stats.add_transferred(w.bytes_written() - before);
        result?;
        self.limiter = RateLimiter::new();
        Ok(())
    }

    /// One pass: sends every dirty page once under `max_bandwidth`, writes
    /// `EndOfSection` and `Sync` on the main channel (flushed), syncs the
    /// dirty log, and returns the remaining dirty bytes and whether they
    /// fit in the downtime limit at the measured bandwidth.
    ///
    /// When the [interrupt](PrecopySaver::set_interrupt) flag is raised the
    /// pass ends at the next chunk boundary: it writes `EndOfSection` only
    /// (flushed; `Sync` marks whole passes), does not sync the dirty log
    /// (the postcopy switch that follows does), and returns with
    /// [`IterationOutcome::interrupted`] set.
    pub fn iterate<C: ChannelSet>(&mut self, ch: &mut C) -> Result<IterationOutcome> {
        self.expect_state("iterate", State::Active)?;
        self.check_cancel()?;
        self.tick(ch)?;
        let (pages_sent, interrupted) = self.send_pass(ch, Pass::Precopy)?;
        if !interrupted {
            self.iteration += 1;
        }
        let iteration = self.iteration;
        let w = ch.main();
        let tail = w.bytes_written();
        let mut result = w.write_end_of_section();
        if !interrupted {
            result = result.and_then(|()| w.write_sync(iteration));
        }
        let result = result.and_then(|()| w.flush());
        let tail = w.bytes_written() - tail;
        self.stats.add_transferred(tail);
        result?;
        let bandwidth = self.measure(Instant::now(), tail);
        if !interrupted {
            self.sync()?;
            self.stats.add_iteration();
        }
        self.tick(ch)?;
        let downtime = self.params.downtime_limit();
        let switchover =
            !interrupted && self.remaining as f64 <= bandwidth * downtime.as_secs_f64();
        log::debug!(
            "precopy pass {}: {pages_sent} pages, {} bytes remaining, {bandwidth:.0} B/s, switchover {switchover}, interrupted {interrupted}",
            self.iteration,
            self.remaining
        );
        Ok(IterationOutcome {
            remaining_bytes: self.remaining,
            bandwidth,
            switchover,
            pages_sent,
            interrupted,
        })
    }

    /// The last pass, with the vCPUs paused by the caller: syncs the dirty
    /// log, sends every dirty page without bandwidth limit, writes
    /// `EndOfSection` on the main channel (flushed) and stops the dirty
    /// log. The caller then writes device state and `Complete`.
    pub fn complete<C: ChannelSet>(&mut self, ch: &mut C) -> Result<()> {
        self.expect_state("complete", State::Active)?;
        self.check_cancel()?;
        self.stats.set_phase(Phase::Downtime);
        self.sync()?;
        self.tick(ch)?;
        self.send_pass(ch, Pass::Completion)?;
        let w = ch.main();
        let tail = w.bytes_written();
        let result = w.write_end_of_section().and_then(|()| w.flush());
        let tail = w.bytes_written() - tail;
        self.stats.add_transferred(tail);
        result?;
        self.measure(Instant::now(), tail);
        self.remaining = self.blocks.dirty_bytes();
        self.stats.set_remaining(self.remaining);
        self.state = State::Completed;
        self.stop_log()
    }

    /// The postcopy switch, with the vCPUs paused by the caller (QEMU's
    /// `postcopy_start`): syncs the dirty log a last time and stops it (the
    /// guest will not run here again), then tells the destination to drop
    /// every page it has that is stale, that is both sent before and dirty
    /// now: `Discard` commands on the main channel, one block each,
    /// consecutive pages merged into ranges, at most
    /// [`MAX_DISCARD_RANGES`] ranges per command (a block with nothing to
    /// discard gets no command), flushed. Pages never sent need no discard:
    /// the destination has nothing of them yet.
    ///
    /// The caller then writes the device state packaged with `Listen` and
    /// `Run`, and calls [`postcopy_send`](PrecopySaver::postcopy_send). A
    /// failure after the dirty log was stopped aborts the saver: the
    /// destination never ran the guest, so it may run here again.
    pub fn start_postcopy<C: ChannelSet>(&mut self, ch: &mut C) -> Result<PostcopySwitch> {
        self.expect_state("start_postcopy", State::Active)?;
        self.check_cancel()?;
        self.stats.set_phase(Phase::Downtime);
        self.sync()?;
        self.stop_log()?;
        let result = self.write_discards(ch);
        let d = match result {
            Ok(d) => d,
            Err(e) => {
                self.abort();
                return Err(e);
            }
        };
        self.state = State::Postcopy;
        self.limiter = RateLimiter::new();
        let switch = PostcopySwitch {
            discarded_pages: d.pages,
            discarded_ranges: d.ranges,
            discard_commands: d.commands,
            remaining_pages: self.blocks.dirty_pages(),
            remaining_bytes: self.remaining,
        };
        log::debug!("postcopy switch: {switch:?}");
        Ok(switch)
    }

    fn write_discards<C: ChannelSet>(&mut self, ch: &mut C) -> Result<Discarded> {
        self.tick(ch)?;
        let w = ch.main();
        let before = w.bytes_written();
        let result = write_discards(&self.blocks, w)
            .and_then(|d| w.flush().map(|()| d).map_err(Error::from));
        self.stats.add_transferred(w.bytes_written() - before);
        result
    }

    /// Postcopy: sends every page still dirty, the pages the destination
    /// asks for (through the [`page_requester`](PrecopySaver::page_requester))
    /// first, each alone and flushed at once, and the others in a
    /// background scan that goes on just after the last requested page
    /// (see [`RequestFirst`]). Then writes `EndOfSection` on the main
    /// channel (flushed) and returns; the caller writes `Complete`. From
    /// then on, requests are counted and ignored.
    ///
    /// The background stream is limited by `max_postcopy_bandwidth` (0:
    /// unlimited; never by `max_bandwidth`); a requested page never waits
    /// for the limiter, and a wait for it ends as soon as a request comes.
    /// While [`Params::postcopy_background_paused`](crate::Params::postcopy_background_paused)
    /// is set only requested pages go, each as soon as its request comes;
    /// the scan resumes when it is cleared. Pings go on as in precopy. Per
    /// chunk: two clock reads, one read of the parameters, one atomic load
    /// for a failure of the requester and one look at the request queue;
    /// nothing per page, no lock.
    ///
    /// A failure the requester reported (a hostile request, a return-path
    /// error) ends it with that error at the next chunk boundary. On any
    /// error every page not flushed is still dirty and the saver stays in
    /// postcopy: a recovery may call it again on new channels.
    pub fn postcopy_send<C: ChannelSet>(&mut self, ch: &mut C) -> Result<PostcopyOutcome> {
        self.expect_state("postcopy_send", State::Postcopy)?;
        self.check_cancel()?;
        self.stats.set_phase(Phase::Postcopy);
        let blocks = self.blocks.clone();
        let mem = self.mem.clone();
        let ignored_before = self.request_first().ignored();
        self.request_first().new_pass();
        self.tick(ch)?;
        self.meter = Meter {
            mark: Instant::now(),
            bytes: 0,
        };
        let (mut pages_sent, mut requests_served) = (0, 0);
        loop {
            self.check_cancel()?;
            if let Some(e) = self.request_first().take_failure() {
                return Err(e);
            }
            if self.params.postcopy_background_paused() {
                // Requested pages only: wait for one (a request ends the
                // wait at once), then look at the flag again.
                let batch = match self.request_first().next_requested(&blocks) {
                    Some(batch) => batch,
                    None => {
                        self.wait_for_request(ch)?;
                        match self.request_first().next_requested(&blocks) {
                            Some(batch) => batch,
                            // Every page was asked for: nothing is left.
                            None if blocks.dirty_pages() == 0 => break,
                            None => continue,
                        }
                    }
                };
                let (pages, bytes) = self.send_one(ch, &mem, &blocks, &batch, Pass::Postcopy)?;
                self.limiter
                    .charge(bytes, self.params.max_postcopy_bandwidth());
                pages_sent += pages;
                requests_served += u64::from(pages > 0);
                continue;
            }
            self.postcopy_credit(ch)?;
            let Some(batch) = self.request_first().next(&blocks) else {
                // A round visits every page and, the log being stopped,
                // nothing gets dirty again: check that in one walk, and go
                // round again if something did.
                if blocks.dirty_pages() == 0 {
                    break;
                }
                self.request_first().new_pass();
                continue;
            };
            let (pages, bytes) = self.send_one(ch, &mem, &blocks, &batch, Pass::Postcopy)?;
            self.limiter
                .charge(bytes, self.params.max_postcopy_bandwidth());
            pages_sent += pages;
            requests_served += u64::from(batch.requested && pages > 0);
        }
        let w = ch.main();
        let tail = w.bytes_written();
        let result = w.write_end_of_section().and_then(|()| w.flush());
        let tail = w.bytes_written() - tail;
        self.stats.add_transferred(tail);
        result?;
        self.measure(Instant::now(), tail);
        let rf = self.request_first();
        rf.finish();
        let requests_ignored = rf.ignored() - ignored_before;
        self.remaining = 0;
        self.stats.set_remaining(0);
        self.state = State::Completed;
        let out = PostcopyOutcome {
            pages_sent,
            requests_served,
            requests_ignored,
        };
        log::debug!("postcopy done: {out:?}");
        Ok(out)
    }

    /// Waits while the postcopy bandwidth limit holds the next background
    /// chunk back: in slices of at most 10 ms, each re-reading the limit,
    /// running the keepalive and checking cancel and the requester; a
    /// request (which never waits) ends the wait as soon as it comes.
    fn postcopy_credit<C: ChannelSet>(&mut self, ch: &mut C) -> Result<()> {
        let mut now = Instant::now();
        loop {
            let wait = self.limiter.debt(now, self.params.max_postcopy_bandwidth());
            if wait.is_zero() || self.request_first().has_request() {
                return Ok(());
            }
            self.check_cancel()?;
            if let Some(e) = self.request_first().take_failure() {
                return Err(e);
            }
            if self.request_first().wait_request(wait.min(SLICE)) {
                return Ok(());
            }
            now = Instant::now();
            keepalive::tick(&mut self.keepalive, now, ch.main(), &self.stats)?;
        }
    }

    /// While the background stream is paused: waits up to 10 ms for a
    /// request (it ends the wait as soon as it comes), checking cancel and
    /// the requester first and running the keepalive after.
    fn wait_for_request<C: ChannelSet>(&mut self, ch: &mut C) -> Result<()> {
        self.check_cancel()?;
        if let Some(e) = self.request_first().take_failure() {
            return Err(e);
        }
        if !self.request_first().wait_request(SLICE) {
            keepalive::tick(&mut self.keepalive, Instant::now(), ch.main(), &self.stats)?;
        }
        Ok(())
    }

    /// Ends the migration after a failure or cancel: stops the dirty log if
    /// it runs (errors are logged) and drops the postcopy requester's queue
    /// (its handles then fail with [`Error::SchedulerGone`]). Every page not
    /// known to be handed to the channel is still dirty. Idempotent.
    pub fn abort(&mut self) {
        if self.log_running {
            if let Err(e) = self.stop_log() {
                log::warn!("stopping the dirty log on abort: {e}");
            }
        }
        self.postcopy = None;
        if self.state != State::Completed {
            self.state = State::Aborted;
        }
        self.remaining = self.blocks.dirty_bytes();
        self.stats.set_remaining(self.remaining);
    }

    /// Stops the dirty log (once, even if that fails).
    fn stop_log(&mut self) -> Result<()> {
        if !self.log_running {
            return Ok(());
        }
        self.log_running = false;
        self.dirty_log.stop()
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

    /// Adds `bytes` written since the last mark, measures the span up to
    /// `now` and publishes the estimate (which moves once the spans cover
    /// the measuring window). Returns the estimate.
    fn measure(&mut self, now: Instant, bytes: u64) -> f64 {
        let bytes = self.meter.bytes + bytes;
        if bytes == 0 {
            // Nothing went since the mark (the first chunk of a pass is
            // still being read): no span to measure yet.
            return self.bandwidth.estimate();
        }
        let span = now.saturating_duration_since(self.meter.mark);
        self.meter = Meter {
            mark: now,
            bytes: 0,
        };
        let estimate = self.bandwidth.record(bytes, span);
        self.stats.set_bandwidth(estimate);
        estimate
    }

    /// Sends the scheduler's batches until the pass is over, or, for a
    /// precopy pass, until the interrupt flag is raised (checked at each
    /// chunk boundary, before a batch is taken). Returns the pages sent and
    /// whether the pass was interrupted.
    fn send_pass<C: ChannelSet>(&mut self, ch: &mut C, pass: Pass) -> Result<(u64, bool)> {
        let blocks = self.blocks.clone();
        let mem = self.mem.clone();
        self.scheduler.new_pass();
        // Time between passes (syncs) is not sending time.
        self.meter = Meter {
            mark: Instant::now(),
            bytes: 0,
        };
        let mut sent = 0;
        loop {
            if pass == Pass::Precopy && self.interrupt.load(Ordering::Relaxed) {
                return Ok((sent, true));
            }
            let Some(batch) = self.scheduler.next(&blocks) else {
                return Ok((sent, false));
            };
            sent += self.send_one(ch, &mem, &blocks, &batch, pass)?.0;
        }
    }

    /// Sends one batch of a scheduler and flushes it; returns its pages and
    /// the bytes written. If it fails, its pages are dirty again.
    fn send_one<C: ChannelSet>(
        &mut self,
        ch: &mut C,
        mem: &GuestMemoryMmap,
        blocks: &RamBlocks,
        batch: &Batch,
        pass: Pass,
    ) -> Result<(u64, u64)> {
        let Some(block) = blocks.iter().nth(batch.block) else {
            return Err(Error::BadBatch {
                block: batch.block,
                blocks: blocks.len(),
            });
        };
        if batch.pages.is_empty() {
            return Ok((0, 0));
        }
        let result = self
            .check_cancel()
            .and_then(|()| self.send_batch(ch, mem, block, batch, pass));
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(e) => {
                block.dirty().restore(&batch.pages);
                return Err(e);
            }
        };
        let count = batch.pages.count();
        self.remaining = self
            .remaining
            .saturating_sub(count * u64::from(block.page_size()));
        self.stats.set_remaining(self.remaining);
        if batch.requested {
            self.stats.add_postcopy_requests(1);
        }
        Ok((count, bytes))
    }

    /// Sends one batch and flushes its channel: the pages are read in
    /// groups that fit the chunk buffer, each group admitted whole by the
    /// rate limiter in a precopy pass (one clock read and one parameter
    /// read per group), then written. The pages are recorded as sent before
    /// they are read; the page counters are updated only once the flush
    /// succeeded. Returns the bytes written.
    fn send_batch<C: ChannelSet>(
        &mut self,
        ch: &mut C,
        mem: &GuestMemoryMmap,
        block: &RamBlock,
        batch: &Batch,
        pass: Pass,
    ) -> Result<u64> {
        if !ch.has(batch.channel) {
            return Err(Error::NoChannel {
                channel: batch.channel,
            });
        }
        let id = BlockId(u32::try_from(batch.block).map_err(|_| Error::BadBatch {
            block: batch.block,
            blocks: self.blocks.len(),
        })?);
        let region = block.region(mem).ok_or_else(|| Error::NotInMemory {
            name: block.name().to_owned(),
            guest_addr: block.guest_addr().0,
            size: block.size(),
        })?;
        let taken = &batch.pages;
        if pass != Pass::Postcopy {
            self.dirty_log.clear(batch.block, taken)?;
        }
        // The destination may get any of them from here on.
        block.mark_sent(taken);
        let page_size = u64::from(block.page_size());
        let ps = block.page_size() as usize;
        let group = (self.buf.len() / ps).clamp(1, TAKE_MAX_PAGES as usize);
        let (mut zero, mut normal, mut flushed, mut total) = (0u64, 0u64, 0u64, 0u64);
        let mut pages = taken.iter().peekable();
        while pages.peek().is_some() {
            let first = pages.clone();
            let mut bytes = 0;
            let mut n = 0;
            for (i, page) in pages.by_ref().take(group).enumerate() {
                let buf = &mut self.buf[i * ps..(i + 1) * ps];
                read_page(region, block, page, buf)?;
                self.zero[i] = is_zero(buf);
                bytes += PAGE_HEAD_BYTES + if self.zero[i] { 0 } else { page_size };
                n += 1;
            }
            // One clock read for the group: bandwidth, keepalive, limiter.
            let now = Instant::now();
            self.measure(now, flushed);
            flushed = 0;
            keepalive::tick(&mut self.keepalive, now, ch.main(), &self.stats)?;
            if pass == Pass::Precopy {
                let (keepalive, stats) = (&mut self.keepalive, &self.stats);
                self.limiter
                    .admit(bytes, now, &self.params, &self.cancel, |t| {
                        keepalive::tick(keepalive, t, ch.main(), stats)
                    })?;
            }
            let w = ch.channel(batch.channel).ok_or(Error::NoChannel {
                channel: batch.channel,
            })?;
            let before = w.bytes_written();
            let mut result = Ok(());
            for (i, page) in first.take(n).enumerate() {
                let offset = page * page_size;
                result = if self.zero[i] {
                    w.write_zero_page(id, offset)
                } else {
                    w.write_page(id, offset, &self.buf[i * ps..(i + 1) * ps])
                };
                if result.is_err() {
                    break;
                }
                if self.zero[i] {
                    zero += 1;
                } else {
                    normal += 1;
                }
            }
            if result.is_ok() && pages.peek().is_none() {
                result = w.flush();
            }
            let written = w.bytes_written() - before;
            self.stats.add_transferred(written);
            flushed += written;
            total += written;
            result?;
        }
        self.meter.bytes += flushed;
        self.stats.add_zero_pages(zero);
        self.stats.add_normal_pages(normal, page_size);
        Ok(total)
    }
}

/// What [`write_discards`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Discarded {
    pages: u64,
    ranges: u64,
    commands: u64,
}

/// Calls `f(first, count)` for each run of consecutive pages of `block`
/// that are both sent and dirty, in order, each run as long as it goes
/// (across bitmap words). One pass over the words, no allocation.
fn stale_runs(block: &RamBlock, mut f: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
    let mut run: Option<(u64, u64)> = None;
    for w in 0..block.dirty().words() {
        let mut bits = block.dirty().load_word(w) & block.sent().load_word(w);
        let base = w as u64 * 64;
        while bits != 0 {
            let low = bits.trailing_zeros();
            // Ones from `low` up: at most 64 - low.
            let ones = (!(bits >> low)).trailing_zeros().min(64 - low);
            let (start, end) = (base + u64::from(low), base + u64::from(low + ones));
            run = match run {
                Some((s, e)) if e == start => Some((s, end)),
                Some((s, e)) => {
                    f(s, e - s)?;
                    Some((start, end))
                }
                None => Some((start, end)),
            };
            bits = if low + ones >= 64 {
                0
            } else {
                bits & !(((1u64 << ones) - 1) << low)
            };
        }
    }
    match run {
        Some((s, e)) => f(s, e - s),
        None => Ok(()),
    }
}

/// Writes the `Discard` commands for every block's stale pages (sent and
/// dirty) to `w` (not flushed): one block per command, at most
/// [`MAX_DISCARD_RANGES`] ranges each, none for a block with nothing stale.
fn write_discards<W: Write>(blocks: &RamBlocks, w: &mut StreamWriter<W>) -> Result<Discarded> {
    let mut out = Discarded::default();
    let max = MAX_DISCARD_RANGES as usize;
    for (index, block) in blocks.iter().enumerate() {
        let id = BlockId(u32::try_from(index).map_err(|_| Error::BadBatch {
            block: index,
            blocks: blocks.len(),
        })?);
        let page = u64::from(block.page_size());
        let mut ranges: Vec<DiscardRange> = Vec::new();
        let mut send = |ranges: Vec<DiscardRange>, out: &mut Discarded| -> Result<()> {
            w.write_command(&Command::Discard { block: id, ranges })?;
            out.commands += 1;
            Ok(())
        };
        stale_runs(block, |first, count| {
            ranges.push(DiscardRange {
                offset: first * page,
                len: count * page,
            });
            out.pages += count;
            out.ranges += 1;
            if ranges.len() == max {
                send(std::mem::take(&mut ranges), &mut out)?;
            }
            Ok(())
        })?;
        if !ranges.is_empty() {
            send(ranges, &mut out)?;
        }
    }
    Ok(out)
}

/// Reads page `page` of `block` (which lies in `region`) into `buf`.
pub(crate) fn read_page(
    region: &GuestRegionMmap,
    block: &RamBlock,
    page: u64,
    buf: &mut [u8],
) -> Result<()> {
    let offset = page * u64::from(block.page_size());
    let base = block.guest_addr().0 - region.start_addr().0;
    region
        .read_slice(buf, MemoryRegionAddress(base + offset))
        .map_err(|source| Error::Memory {
            op: "reading",
            name: block.name().to_owned(),
            offset,
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::io;

    use migration_stream::StreamWriter;
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
    fn postcopy_state_machine() {
        let (_, mut s) = saver(PrecopyParams::default());
        let mut w = StreamWriter::new(io::sink());
        assert!(matches!(
            s.start_postcopy(&mut w),
            Err(Error::InvalidState {
                op: "start_postcopy",
                state: "created"
            })
        ));
        s.setup(&mut w).unwrap();
        assert!(matches!(
            s.postcopy_send(&mut w),
            Err(Error::InvalidState {
                op: "postcopy_send",
                state: "active"
            })
        ));
        // Straight from setup: nothing was sent, nothing to discard.
        let switch = s.start_postcopy(&mut w).unwrap();
        assert_eq!((switch.discarded_pages, switch.discard_commands), (0, 0));
        assert_eq!(switch.remaining_pages, 16 + 256);
        assert!(matches!(
            s.iterate(&mut w),
            Err(Error::InvalidState {
                state: "postcopy",
                ..
            })
        ));
        assert!(s.complete(&mut w).is_err());
        assert!(s.start_postcopy(&mut w).is_err());
        let out = s.postcopy_send(&mut w).unwrap();
        assert_eq!(out.pages_sent, 16 + 256);
        assert!(matches!(
            s.postcopy_send(&mut w),
            Err(Error::InvalidState {
                state: "completed",
                ..
            })
        ));
    }

    /// Runs of pages both sent and dirty, from a model.
    fn model_runs(sent: &[bool], dirty: &[bool]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (p, (s, d)) in sent.iter().zip(dirty).enumerate() {
            if *s && *d {
                let p = p as u64;
                match out.last_mut() {
                    Some((first, n)) if *first + *n == p => *n += 1,
                    _ => out.push((p, 1)),
                }
            }
        }
        out
    }

    fn block_with(pages: u64, page_size: u32) -> RamBlock {
        RamBlock::new(
            "b",
            GuestAddress(0),
            pages * u64::from(page_size),
            page_size,
        )
        .unwrap()
    }

    proptest::proptest! {
        #[test]
        fn stale_runs_match_a_vec_bool_model(
            bits in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY), 1..400),
        ) {
            let b = block_with(bits.len() as u64, 4096);
            let (sent, dirty): (Vec<bool>, Vec<bool>) = bits.iter().copied().unzip();
            for (p, (s, d)) in bits.iter().enumerate() {
                if *s { b.sent().set(p as u64); }
                if *d { b.dirty().set(p as u64); }
            }
            let mut runs = Vec::new();
            stale_runs(&b, |first, n| { runs.push((first, n)); Ok(()) }).unwrap();
            proptest::prop_assert_eq!(runs, model_runs(&sent, &dirty));
        }
    }

    #[test]
    fn discards_merge_pages_split_at_the_cap_and_skip_clean_blocks() {
        use migration_stream::{Record, StreamReader};

        let max = u64::from(MAX_DISCARD_RANGES);
        let runs = RamBlock::new("runs", GuestAddress(0), 1024 * 4096, 4096).unwrap();
        // Runs inside a word, across a word boundary, across several words,
        // at the end of the block; a page dirty but never sent and one sent
        // but clean are no part of it.
        for (first, n) in [(3, 2), (62, 68), (191, 65), (1000, 24)] {
            runs.sent().set_range(first, n);
            runs.dirty().set_range(first, n);
        }
        runs.dirty().set(500);
        runs.sent().set(501);
        let clean = RamBlock::new("clean", GuestAddress(0), 64 * 4096, 4096).unwrap();
        clean.dirty().set_all();
        // 2 * max + 1 lone pages: three commands.
        let many = RamBlock::new("many", GuestAddress(0), (4 * max + 2) * 4096, 4096).unwrap();
        many.sent().set_all();
        for p in (0..4 * max + 2).step_by(2) {
            many.dirty().set(p);
        }
        let huge = RamBlock::new("huge", GuestAddress(0), 4 << 21, 2 << 20).unwrap();
        huge.sent().set_all();
        huge.dirty().set_range(1, 2);
        let blocks = RamBlocks::new(vec![runs, clean, many, huge]).unwrap();

        let mut w = StreamWriter::new(Vec::new());
        let d = write_discards(&blocks, &mut w).unwrap();
        let stream = w.into_inner().unwrap();
        assert_eq!(
            d,
            Discarded {
                pages: 2 + 68 + 65 + 24 + (2 * max + 1) + 2,
                ranges: 4 + (2 * max + 1) + 1,
                commands: 1 + 3 + 1,
            }
        );
        let mut r = StreamReader::new(&stream[..]);
        let mut commands = Vec::new();
        while let Ok(record) = r.read_record(&blocks) {
            let Record::Command(Command::Discard { block, ranges }) = record else {
                panic!("{record:?}");
            };
            commands.push((block.0, ranges));
        }
        assert_eq!(r.bytes_read(), stream.len() as u64, "every command decodes");
        let ps = 4096;
        assert_eq!(commands.len(), 5);
        assert_eq!(commands[0].0, 0);
        assert_eq!(
            commands[0].1,
            [(3, 2), (62, 68), (191, 65), (1000, 24)]
                .map(|(first, n)| DiscardRange {
                    offset: first * ps,
                    len: n * ps
                })
                .to_vec()
        );
        let lens: Vec<(u32, usize)> = commands.iter().map(|(b, r)| (*b, r.len())).collect();
        assert_eq!(
            lens[1..4],
            [(2, max as usize), (2, max as usize), (2, 1)],
            "block 1 has nothing stale: no command"
        );
        assert_eq!(commands[2].1[0].offset, 2 * max * ps);
        assert_eq!(commands[3].1[0].offset, 4 * max * ps);
        assert!(commands[1..4]
            .iter()
            .flat_map(|(_, r)| r)
            .all(|r| r.len == ps));
        assert_eq!(
            commands[4],
            (
                3,
                vec![DiscardRange {
                    offset: 2 << 20,
                    len: 4 << 20
                }]
            )
        );
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

    #[test]
    fn a_raised_interrupt_ends_the_pass_before_the_next_chunk() {
        let (_, mut s) = saver(PrecopyParams::default());
        let flag = Arc::new(AtomicBool::new(true));
        s.set_interrupt(flag.clone());
        let mut w = StreamWriter::new(Vec::new());
        s.setup(&mut w).unwrap();
        let setup_len = w.bytes_written();
        let out = s.iterate(&mut w).unwrap();
        assert!(out.interrupted && !out.switchover);
        assert_eq!(
            (out.pages_sent, out.remaining_bytes),
            (0, (16 + 256) * 4096)
        );
        assert_eq!(w.bytes_written() - setup_len, 2, "EndOfSection only");
        assert_eq!(s.iterations(), 0);
        // Lowered: a whole pass.
        flag.store(false, Ordering::Relaxed);
        let out = s.iterate(&mut w).unwrap();
        assert!(!out.interrupted);
        assert_eq!(out.pages_sent, 16 + 256);
        assert_eq!(s.iterations(), 1);
    }
}
