//! Which pages a source sends next, and on which channel.
//!
//! A [`PageScheduler`] hands the saver [`Batch`]es: pages *taken* from a
//! block's dirty bitmap (their bits cleared, see
//! [`DirtyBitmap::take_range`](crate::DirtyBitmap::take_range)) with the
//! [`Channel`] to write them on. The saver sends a batch and flushes it, or,
//! if anything fails, puts its bits back
//! ([`DirtyBitmap::restore`](crate::DirtyBitmap::restore)): a scheduler
//! never loses a dirty bit by choosing.
//!
//! | scheduler | order | requests |
//! |-----------|-------|----------|
//! | [`LinearScan`] (default) | block by block, chunk by chunk (1 MiB), one round per pass | refused ([`Error::RequestsUnsupported`]) |
//! | [`RequestFirst`] | requested host pages first, one batch each; then the scan (64 KiB chunks, so a request waits for little), resumed just after the last request | served on [`Channel::Preempt`] if enabled, else [`Channel::Main`] |
//!
//! # Passes and rounds
//!
//! [`PageScheduler::new_pass`] starts a round at the first page of the first
//! block. A round visits every page position once, in order, wrapping
//! around the end of the last block back to where it started; pages dirtied
//! ahead of the scan in the meantime are sent in the same round, pages
//! dirtied behind it wait for the next. A request moves the round: it
//! restarts at the chunk of the requested page and runs round from there,
//! so the pages around a page the guest touched go next (locality), and
//! still every page is visited before the round ends.
//!
//! # Requests
//!
//! A postcopy destination asks for the host page a vCPU faulted on. The
//! request names the block by id and the page by index (offset / page
//! size); both are checked against the source's blocks before anything is
//! queued, and a bad one is an error of kind
//! [`ErrorKind::Protocol`](crate::ErrorKind::Protocol) that changes
//! nothing. A requested page that is no longer dirty (already sent) is not
//! sent again. [`RequestFirst::requester`] gives another thread (the
//! return-path reader) a handle that checks and queues requests while the
//! saver runs.
//!
//! ## Who does what with a request
//!
//! ```text
//!  return-path thread                       saver thread (postcopy_send)
//!  ------------------                       ----------------------------
//!  read_message(&saver_blocks)              at every chunk boundary:
//!    PageRequest { block, offset, len }       requester failed? -> return its error
//!      requester.request_range(..)            a request queued? -> send that page,
//!        Ok: queued (dropped, counted,                             alone, flushed
//!            once the saver finished)         else: the next background chunk,
//!        Err: already reported to the               once the rate limiter allows
//!            saver; stop reading                    (a request ends the wait);
//!    a decode or read error                         background paused: wait for
//!      requester.fail(e.into()); stop               a request (it ends the wait)
//!                                           all sent: EndOfSection, finish()
//! ```
//!
//! - The return-path thread decodes each message against the saver's
//!   blocks ([`RamBlocks`] is a [`BlockResolver`](migration_stream::BlockResolver)),
//!   which already refuses a request outside a block, and hands the
//!   request to [`PageRequester::request_range`], which checks it again.
//!   Either way a bad request fails the migration: `request_range` reports
//!   [`Error::BadPageRequest`] to the saver by itself (and returns it), a
//!   decode error the thread reports with [`PageRequester::fail`]. A
//!   rejected request queues nothing and changes no bitmap.
//! - The saver ([`PrecopySaver::postcopy_send`](crate::PrecopySaver::postcopy_send))
//!   checks for a reported failure at every chunk boundary and in every
//!   slice of a rate-limiter wait, and returns that error, of the kind it
//!   has ([`ErrorKind::Protocol`](crate::ErrorKind::Protocol) for a hostile
//!   request), with every page not yet flushed still dirty.
//! - Once every page went, the saver calls [`RequestFirst::finish`]: later
//!   requests (a fault that raced with its page) are accepted, counted in
//!   [`RamStatsSnapshot::postcopy_requests_ignored`](crate::RamStatsSnapshot::postcopy_requests_ignored)
//!   and dropped, and never block the return-path thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use migration_stream::BlockId;

use crate::bitmap::TakenPages;
use crate::block::{RamBlock, RamBlocks};
use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::precopy::{chunk_pages_of, CHUNK_BYTES, POSTCOPY_CHUNK_BYTES};
use crate::stats::RamStats;

/// Pages taken from one block's dirty bitmap, to be written on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Index of the block in the [`RamBlocks`] (its [`BlockId`]).
    pub block: usize,
    /// The pages, already cleared from the block's dirty bitmap.
    pub pages: TakenPages,
    /// Where to write them.
    pub channel: Channel,
    /// Whether the batch answers a destination's page request (the
    /// saver counts it as served once it is flushed).
    pub requested: bool,
}

/// Decides which dirty pages go next and on which channel.
pub trait PageScheduler: Send {
    /// Starts a pass (a precopy iteration, the completion pass, or the
    /// postcopy background stream): the next batches come from a new round.
    fn new_pass(&mut self);

    /// The next batch of the pass, its pages taken from `blocks`; `None`
    /// when the pass is over. Never returns an empty batch.
    fn next(&mut self, blocks: &RamBlocks) -> Option<Batch>;

    /// A destination's request for page `page` (index, in the block's page
    /// size) of block `block`. Fails, changing nothing, for an unknown block
    /// or a page past its end, or if this scheduler serves no requests.
    fn request(&mut self, blocks: &RamBlocks, block: BlockId, page: u64) -> Result<()>;
}

/// The block of a request and its index, or the error a bad request gets.
fn check_request(blocks: &RamBlocks, block: BlockId, page: u64) -> Result<(usize, &RamBlock)> {
    let b = blocks.get(block).ok_or(Error::UnknownBlock { block })?;
    if page >= b.pages() {
        return Err(Error::PageOutOfRange {
            name: b.name().to_owned(),
            page,
            pages: b.pages(),
        });
    }
    // `get` succeeded, so the id is an index of the list.
    let index = usize::try_from(block.0).map_err(|_| Error::UnknownBlock { block })?;
    Ok((index, b))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    block: usize,
    page: u64,
}

const ORIGIN: Pos = Pos { block: 0, page: 0 };

/// Today's dirty scan: block by block, in chunks of 1 MiB (aligned, as
/// `KVM_CLEAR_DIRTY_LOG` wants), one round per [pass](PageScheduler::new_pass),
/// everything on [`Channel::Main`]. Refuses requests
/// ([`Error::RequestsUnsupported`]): a precopy-only source that receives
/// one is wired wrong; use [`RequestFirst`].
#[derive(Debug, Clone)]
pub struct LinearScan {
    /// Where the round started (chunk-aligned).
    start: Pos,
    cursor: Pos,
    wrapped: bool,
    done: bool,
    /// Chunk size in bytes.
    chunk_bytes: u64,
}

impl Default for LinearScan {
    fn default() -> Self {
        Self::new()
    }
}

impl LinearScan {
    /// A scan at the start of a pass, in chunks of 1 MiB.
    pub fn new() -> Self {
        Self::with_chunk_bytes(CHUNK_BYTES)
    }

    /// A scan at the start of a pass, in chunks of `bytes` (rounded down to
    /// whole pages; at least one page and at most
    /// [`TAKE_MAX_PAGES`](crate::bitmap::TAKE_MAX_PAGES)).
    fn with_chunk_bytes(bytes: u64) -> Self {
        LinearScan {
            start: ORIGIN,
            cursor: ORIGIN,
            wrapped: false,
            done: false,
            chunk_bytes: bytes,
        }
    }

    fn chunk_pages(&self, page_size: u32) -> u64 {
        chunk_pages_of(self.chunk_bytes, page_size)
    }

    /// Restarts the round just after page `page` of block `block`: it runs
    /// from the (aligned) chunk that holds page `page + 1` to the end, wraps
    /// around, and ends there. Out-of-range positions are ignored.
    pub fn resume_after(&mut self, blocks: &RamBlocks, block: usize, page: u64) {
        let Some(b) = blocks.iter().nth(block) else {
            return;
        };
        let at = page.saturating_add(1).min(b.pages());
        let chunk = self.chunk_pages(b.page_size());
        self.start = Pos {
            block,
            page: at - at % chunk,
        };
        self.cursor = self.start;
        self.wrapped = false;
        self.done = false;
    }

    /// Whether the current round is over.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

impl PageScheduler for LinearScan {
    fn new_pass(&mut self) {
        *self = LinearScan::with_chunk_bytes(self.chunk_bytes);
    }

    fn next(&mut self, blocks: &RamBlocks) -> Option<Batch> {
        loop {
            if self.done {
                return None;
            }
            if self.cursor.block >= blocks.len() {
                if self.wrapped || self.start == ORIGIN {
                    self.done = true;
                    return None;
                }
                self.wrapped = true;
                self.cursor = ORIGIN;
                continue;
            }
            if self.wrapped && self.cursor.block > self.start.block {
                self.done = true;
                return None;
            }
            let index = self.cursor.block;
            let block = blocks.iter().nth(index)?;
            let at_start = self.wrapped && index == self.start.block;
            let limit = if at_start {
                self.start.page
            } else {
                block.pages()
            };
            let found = block
                .dirty()
                .next_set(self.cursor.page)
                .filter(|&p| p < limit);
            let Some(page) = found else {
                if at_start {
                    self.done = true;
                    return None;
                }
                self.cursor = Pos {
                    block: index + 1,
                    page: 0,
                };
                continue;
            };
            // Chunks are aligned, and so is the round's start: a chunk never
            // straddles it.
            let chunk = self.chunk_pages(block.page_size());
            let taken = block.dirty().take_range(page - page % chunk, chunk);
            self.cursor.page = taken.end().max(page + 1);
            if !taken.is_empty() {
                return Some(Batch {
                    block: index,
                    pages: taken,
                    channel: Channel::Main,
                    requested: false,
                });
            }
        }
    }

    fn request(&mut self, _: &RamBlocks, _: BlockId, _: u64) -> Result<()> {
        Err(Error::RequestsUnsupported {
            scheduler: "LinearScan",
        })
    }
}

/// Most requests a [`PageRequester`] queues before it waits for the saver.
pub const REQUEST_QUEUE: usize = 4096;

/// A [`LinearScan`] that serves the destination's page requests first.
///
/// Each requested host page that is still dirty goes alone, in its own
/// batch, on [`Channel::Preempt`] when preempt is enabled (else on
/// [`Channel::Main`]); then the scan resumes just after it (see the
/// [module docs](self)). Requests are served in the order they came; a
/// request for a page that is no longer dirty is skipped and counted
/// ([`RequestFirst::ignored`], and in the statistics given to
/// [`RequestFirst::with_stats`]).
#[derive(Debug)]
pub struct RequestFirst {
    scan: LinearScan,
    preempt: bool,
    queue: VecDeque<(usize, u64)>,
    incoming: Option<mpsc::Receiver<(usize, u64)>>,
    /// Shared with the handles of the latest requester.
    shared: Arc<RequestShared>,
    stats: Option<Arc<RamStats>>,
    ignored: u64,
}

/// What a [`RequestFirst`] and the handles of its latest requester share.
#[derive(Debug)]
struct RequestShared {
    /// Whether `failure` holds an error (one load per chunk, no lock).
    failed: AtomicBool,
    /// The first failure reported.
    failure: Mutex<Option<Error>>,
    /// The saver sent every page: requests are ignored from now on.
    finished: AtomicBool,
    /// The last page another thread sent itself (a [`PreemptSender`](crate::preempt::PreemptSender)),
    /// packed by [`pack_served`]; [`NO_PAGE`] when none since the saver looked.
    served: AtomicU64,
    stats: Option<Arc<RamStats>>,
}

impl Default for RequestShared {
    fn default() -> Self {
        RequestShared {
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            finished: AtomicBool::new(false),
            served: AtomicU64::new(NO_PAGE),
            stats: None,
        }
    }
}

/// [`RequestShared::served`] when no page was served since the saver looked.
const NO_PAGE: u64 = u64::MAX;
/// Bits of a packed page index (the block index goes above them).
const PAGE_BITS: u32 = 48;

/// A block index and page packed into one word, or `None` if they do not
/// fit (then the saver's scan simply does not move).
fn pack_served(index: usize, page: u64) -> Option<u64> {
    let index = u64::try_from(index).ok().filter(|&i| i < (1 << 15))?;
    (page < (1 << PAGE_BITS)).then_some((index << PAGE_BITS) | page)
}

impl RequestShared {
    fn fail(&self, error: Error) {
        let mut slot = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(error);
            self.failed.store(true, Ordering::Release);
        }
    }

    fn take_failure(&self) -> Option<Error> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn ignore(&self, n: u64) {
        if let Some(stats) = &self.stats {
            stats.add_postcopy_requests_ignored(n);
        }
    }
}

impl RequestFirst {
    /// A request-first scheduler; `preempt`: requested pages go on the
    /// preempt channel.
    pub fn new(preempt: bool) -> Self {
        RequestFirst {
            scan: LinearScan::with_chunk_bytes(POSTCOPY_CHUNK_BYTES),
            preempt,
            queue: VecDeque::new(),
            incoming: None,
            shared: Arc::default(),
            stats: None,
            ignored: 0,
        }
    }

    /// This scheduler, counting the requests it skips (page already sent)
    /// in `stats` (`postcopy_requests_ignored`), as do its requesters once
    /// it is [finished](RequestFirst::finish). Give it before
    /// [`requester`](RequestFirst::requester).
    pub fn with_stats(mut self, stats: Arc<RamStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// A handle for another thread (the return-path reader) to queue
    /// requests while the saver runs; each one is checked against `blocks`
    /// (the saver's) before it is queued. Every call makes a new queue; the
    /// handles of an earlier one then fail with [`Error::SchedulerGone`],
    /// and a failure they reported is forgotten.
    pub fn requester(&mut self, blocks: Arc<RamBlocks>) -> PageRequester {
        let (tx, rx) = mpsc::sync_channel(REQUEST_QUEUE);
        self.incoming = Some(rx);
        self.shared = Arc::new(RequestShared {
            stats: self.stats.clone(),
            ..RequestShared::default()
        });
        PageRequester {
            blocks,
            tx,
            shared: self.shared.clone(),
        }
    }

    /// Requests waiting to be served (those of a requester are counted
    /// once the scheduler has seen them).
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Whether a request waits to be served (one of a requester is taken
    /// into the queue). The saver asks before it waits for the rate
    /// limiter: a request does not wait.
    pub fn has_request(&mut self) -> bool {
        if self.queue.is_empty() {
            if let Some(r) = self.incoming.as_ref().and_then(|rx| rx.try_recv().ok()) {
                self.queue.push_back(r);
            }
        }
        !self.queue.is_empty()
    }

    /// Waits up to `timeout` for a request: returns `true` at once if one
    /// is queued, or as soon as one of the requester comes (it is taken
    /// into the queue), and `false` once `timeout` passed without one (or
    /// after sleeping `timeout`, when there is no requester or every handle
    /// of it is gone). A saver with nothing else to do waits here, so a
    /// request is served as soon as it comes, not at the end of a sleep.
    pub fn wait_request(&mut self, timeout: Duration) -> bool {
        if self.has_request() {
            return true;
        }
        match self.incoming.as_ref().map(|rx| rx.recv_timeout(timeout)) {
            Some(Ok(r)) => {
                self.queue.push_back(r);
                true
            }
            Some(Err(RecvTimeoutError::Timeout)) => false,
            Some(Err(RecvTimeoutError::Disconnected)) | None => {
                std::thread::sleep(timeout);
                false
            }
        }
    }

    /// The next requested page that is still dirty, as a batch of its own
    /// (taken from its block's dirty bitmap; the background scan then
    /// resumes just after it), or `None` when no request waits. Requests
    /// for pages no longer dirty are skipped and counted as
    /// [ignored](RequestFirst::ignored). [`next`](PageScheduler::next) is
    /// this, then the background scan; a saver whose background stream is
    /// paused calls this alone.
    pub fn next_requested(&mut self, blocks: &RamBlocks) -> Option<Batch> {
        while let Some((index, page)) = self.next_request() {
            let Some(block) = blocks.iter().nth(index) else {
                continue;
            };
            let taken = block.dirty().take_range(page, 1);
            self.scan.resume_after(blocks, index, page);
            if taken.is_empty() {
                self.ignore(1);
            } else {
                return Some(Batch {
                    block: index,
                    pages: taken,
                    channel: self.channel(),
                    requested: true,
                });
            }
        }
        None
    }

    /// The failure the latest requester reported (a bad request, or an
    /// error of the return-path thread given to [`PageRequester::fail`]),
    /// once: the caller ends the migration with it. One atomic load when
    /// there is none.
    pub fn take_failure(&mut self) -> Option<Error> {
        self.shared.take_failure()
    }

    /// Requests skipped so far because their page was no longer dirty.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// Ends serving requests, once every page was sent: the requests still
    /// queued are skipped (counted as ignored), and from now on the
    /// requester's handles accept requests without queuing them (counted
    /// too) and never wait. Returns how many queued requests were skipped
    /// (a request queued in the instant `finish` runs may be dropped
    /// uncounted).
    pub fn finish(&mut self) -> u64 {
        self.shared.finished.store(true, Ordering::Release);
        let mut skipped = self.queue.len() as u64;
        self.queue.clear();
        if let Some(rx) = self.incoming.take() {
            skipped += rx.try_iter().count() as u64;
        }
        self.ignore(skipped);
        skipped
    }

    fn ignore(&mut self, n: u64) {
        self.ignored += n;
        if let Some(stats) = &self.stats {
            stats.add_postcopy_requests_ignored(n);
        }
    }

    fn channel(&self) -> Channel {
        if self.preempt {
            Channel::Preempt
        } else {
            Channel::Main
        }
    }

    /// Moves the scan just after the last page a requester's handle sent
    /// itself ([`PageRequester::served`]), if any since the last look: one
    /// atomic swap.
    fn follow_served(&mut self, blocks: &RamBlocks) {
        let packed = self.shared.served.swap(NO_PAGE, Ordering::AcqRel);
        if packed != NO_PAGE {
            let index = (packed >> PAGE_BITS) as usize;
            self.scan
                .resume_after(blocks, index, packed & ((1 << PAGE_BITS) - 1));
        }
    }

    fn next_request(&mut self) -> Option<(usize, u64)> {
        if let Some(r) = self.queue.pop_front() {
            return Some(r);
        }
        self.incoming.as_ref()?.try_recv().ok()
    }
}

impl PageScheduler for RequestFirst {
    fn new_pass(&mut self) {
        self.scan.new_pass();
    }

    fn next(&mut self, blocks: &RamBlocks) -> Option<Batch> {
        self.follow_served(blocks);
        self.next_requested(blocks)
            .or_else(|| self.scan.next(blocks))
    }

    fn request(&mut self, blocks: &RamBlocks, block: BlockId, page: u64) -> Result<()> {
        let (index, _) = check_request(blocks, block, page)?;
        self.queue.push_back((index, page));
        Ok(())
    }
}

/// Queues page requests for a [`RequestFirst`] from another thread (the
/// return-path reader), and reports that thread's failure to the saver;
/// see [who does what](self#who-does-what-with-a-request).
#[derive(Debug, Clone)]
pub struct PageRequester {
    blocks: Arc<RamBlocks>,
    tx: mpsc::SyncSender<(usize, u64)>,
    shared: Arc<RequestShared>,
}

impl PageRequester {
    /// Checks a request against the saver's blocks and queues it; waits
    /// while [`REQUEST_QUEUE`] requests are queued. Fails, queuing nothing,
    /// for an unknown block or a page past its end (and reports that
    /// failure to the saver, as [`fail`](PageRequester::fail) does), and
    /// with [`Error::SchedulerGone`] once the scheduler was dropped or gave
    /// out a newer requester. Once the scheduler is
    /// [finished](RequestFirst::finish) a good request is counted as
    /// ignored and dropped.
    pub fn request(&self, block: BlockId, page: u64) -> Result<()> {
        let index = match check_request(&self.blocks, block, page) {
            Ok((index, _)) => index,
            Err(e) => {
                // The same error again for the saver (its fields are plain).
                if let Err(again) = check_request(&self.blocks, block, page) {
                    self.shared.fail(again);
                }
                return Err(e);
            }
        };
        self.queue(index, page)
    }

    /// Checks a request as the return path carries it, `len` bytes at
    /// `offset` of `block`, and queues each of its pages in order (it waits
    /// while [`REQUEST_QUEUE`] requests are queued). A range that is not
    /// whole pages inside a block of the saver fails with
    /// [`Error::BadPageRequest`] (of kind
    /// [`ErrorKind::Protocol`](crate::ErrorKind::Protocol), naming the
    /// block and offset), queues nothing, and is reported to the saver,
    /// which then fails the migration with the same error. Otherwise as
    /// [`request`](PageRequester::request).
    pub fn request_range(&self, block: BlockId, offset: u64, len: u64) -> Result<()> {
        let (index, pages) = self.check_range(block, offset, len)?;
        for page in pages {
            self.queue(index, page)?;
        }
        Ok(())
    }

    /// Checks a request as the return path carries it, `len` bytes at
    /// `offset` of `block`, as [`request_range`](PageRequester::request_range)
    /// does (a bad one is reported to the saver and returned), queuing
    /// nothing: the block's index and its pages. For a thread that sends
    /// the pages itself ([`PreemptSender`](crate::preempt::PreemptSender)).
    pub fn check_range(
        &self,
        block: BlockId,
        offset: u64,
        len: u64,
    ) -> Result<(usize, std::ops::Range<u64>)> {
        use migration_stream::BlockResolver;

        let bad = |source| Error::BadPageRequest {
            block,
            name: self.blocks.get(block).map(|b| b.name().to_owned()),
            offset,
            len,
            source,
        };
        let check = || self.blocks.check_range(block, offset, len);
        let geometry = match check() {
            Ok(g) => g,
            Err(source) => {
                // Checking is pure: it fails again, with an error for the
                // saver.
                if let Err(again) = check() {
                    self.shared.fail(bad(again));
                }
                return Err(bad(source));
            }
        };
        // The block exists, so its id is an index of the list.
        let index = usize::try_from(block.0).map_err(|_| Error::UnknownBlock { block })?;
        let page_size = u64::from(geometry.page_size);
        // `check_range` proved `offset + len` fits in the block.
        Ok((index, offset / page_size..(offset + len) / page_size))
    }

    /// Tells the saver that page `page` of the block of index `index` was
    /// sent by this thread (taken from the dirty bitmap, written on the
    /// preempt channel): its background scan goes on just after it
    /// (locality), at its next chunk. One atomic store; never waits.
    pub fn served(&self, index: usize, page: u64) {
        if let Some(packed) = pack_served(index, page) {
            self.shared.served.store(packed, Ordering::Release);
        }
    }

    /// Counts `n` requests whose page was already sent, as the scheduler
    /// counts its own.
    pub fn ignored(&self, n: u64) {
        self.shared.ignore(n);
    }

    /// Reports a failure of the return-path thread (a message it could not
    /// decode, a hostile one, a read error): the saver's
    /// [`postcopy_send`](crate::PrecopySaver::postcopy_send) returns `error`
    /// at its next chunk boundary. Until the saver took it, later failures
    /// are dropped: the first one is the cause.
    pub fn fail(&self, error: Error) {
        self.shared.fail(error);
    }

    /// Whether the saver sent every page: requests are ignored from now on.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }

    fn queue(&self, index: usize, page: u64) -> Result<()> {
        if self.is_finished() {
            self.shared.ignore(1);
            return Ok(());
        }
        match self.tx.send((index, page)) {
            Ok(()) => Ok(()),
            // The scheduler finished while this waited for room.
            Err(_) if self.is_finished() => {
                self.shared.ignore(1);
                Ok(())
            }
            Err(_) => Err(Error::SchedulerGone),
        }
    }
}

#[cfg(test)]
mod tests {
    use migration_stream::ErrorKind;
    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::block::RamBlock;

    /// Blocks of the given page counts (4 KiB pages: 256-page chunks).
    fn blocks(pages: &[u64]) -> RamBlocks {
        RamBlocks::new(
            pages
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    RamBlock::new(format!("b{i}"), GuestAddress(0), n * 4096, 4096).unwrap()
                })
                .collect(),
        )
        .unwrap()
    }

    fn drain(s: &mut dyn PageScheduler, b: &RamBlocks) -> Vec<(usize, u64, Channel)> {
        let mut out = Vec::new();
        while let Some(batch) = s.next(b) {
            assert!(!batch.pages.is_empty());
            out.extend(batch.pages.iter().map(|p| (batch.block, p, batch.channel)));
        }
        out
    }

    #[test]
    fn linear_scan_sends_each_dirty_page_once_per_pass_in_order() {
        let b = blocks(&[300, 10, 600]);
        for (i, pages) in [[0, 255, 256, 299], [3, 4, 9, 9], [1, 257, 512, 599]]
            .iter()
            .enumerate()
        {
            for &p in pages {
                b.iter().nth(i).unwrap().dirty().set(p);
            }
        }
        let mut s = LinearScan::new();
        let sent = drain(&mut s, &b);
        let expected: Vec<_> = [
            (0, 0),
            (0, 255),
            (0, 256),
            (0, 299),
            (1, 3),
            (1, 4),
            (1, 9),
            (2, 1),
            (2, 257),
            (2, 512),
            (2, 599),
        ]
        .iter()
        .map(|&(b, p)| (b, p, Channel::Main))
        .collect();
        assert_eq!(sent, expected);
        assert_eq!(b.dirty_pages(), 0);
        // The pass is over: a page dirtied now waits for the next one.
        b.iter().next().unwrap().dirty().set(7);
        assert!(s.next(&b).is_none());
        s.new_pass();
        assert_eq!(drain(&mut s, &b), vec![(0, 7, Channel::Main)]);
        assert!(s.next(&b).is_none());
    }

    #[test]
    fn linear_scan_takes_aligned_chunks() {
        let b = blocks(&[1000]);
        b.iter().next().unwrap().dirty().set_range(300, 400);
        let mut s = LinearScan::new();
        let mut ranges = Vec::new();
        while let Some(batch) = s.next(&b) {
            ranges.push((batch.pages.start(), batch.pages.end(), batch.pages.count()));
        }
        assert_eq!(ranges, vec![(256, 512, 212), (512, 768, 188)]);
    }

    #[test]
    fn linear_scan_refuses_requests() {
        let b = blocks(&[10]);
        let err = LinearScan::new().request(&b, BlockId(0), 1).unwrap_err();
        assert!(matches!(err, Error::RequestsUnsupported { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Local);
    }

    #[test]
    fn request_first_serves_requests_first_then_continues_after_them() {
        let b = blocks(&[1024, 64]);
        for blk in b.iter() {
            blk.dirty().set_all();
        }
        for preempt in [true, false] {
            let ch = if preempt {
                Channel::Preempt
            } else {
                Channel::Main
            };
            for blk in b.iter() {
                blk.dirty().set_all();
            }
            let mut s = RequestFirst::new(preempt);
            s.new_pass();
            s.request(&b, BlockId(0), 700).unwrap();
            s.request(&b, BlockId(1), 5).unwrap();
            let first = s.next(&b).unwrap();
            assert_eq!((first.block, first.channel), (0, ch));
            assert_eq!(first.pages.iter().collect::<Vec<_>>(), vec![700]);
            let second = s.next(&b).unwrap();
            assert_eq!((second.block, second.channel), (1, ch));
            assert_eq!(second.pages.iter().collect::<Vec<_>>(), vec![5]);
            // The scan goes on just after the last request: the rest of
            // block 1, then wraps round to block 0 and ends where it began.
            let third = s.next(&b).unwrap();
            assert_eq!((third.block, third.channel), (1, Channel::Main));
            assert_eq!(third.pages.iter().next(), Some(0));
            let rest = drain(&mut s, &b);
            // Background chunks are 64 KiB (16 pages): block 1 goes on from
            // page 16, then block 0 from its start.
            assert_eq!(third.pages.count(), 15);
            assert_eq!(rest.first().map(|r| (r.0, r.1)), Some((1, 16)));
            let wrapped = rest.iter().position(|r| r.0 == 0).unwrap();
            assert_eq!(rest[wrapped].1, 0);
            assert!(rest[wrapped..].iter().all(|r| r.0 == 0));
            assert!(rest.iter().all(|r| r.2 == Channel::Main));
            assert_eq!(b.dirty_pages(), 0, "every page went once");
            let total = 1 + 1 + third.pages.count() + rest.len() as u64;
            assert_eq!(total, 1024 + 64);

            // An already sent page is not sent twice.
            s.new_pass();
            s.request(&b, BlockId(0), 700).unwrap();
            assert!(s.next(&b).is_none());
        }
    }

    #[test]
    fn a_request_resumes_the_scan_after_the_requested_page() {
        let b = blocks(&[1024]);
        let blk = b.iter().next().unwrap();
        blk.dirty().set_all();
        let mut s = RequestFirst::new(false);
        let batch = s.next(&b).unwrap();
        // Background chunks are 64 KiB: 16 pages.
        assert_eq!((batch.pages.start(), batch.pages.count()), (0, 16));
        s.request(&b, BlockId(0), 600).unwrap();
        assert_eq!(
            s.next(&b).unwrap().pages.iter().collect::<Vec<_>>(),
            vec![600]
        );
        // The chunk of page 601 (592..608), less page 600.
        let next = s.next(&b).unwrap();
        assert_eq!((next.pages.start(), next.pages.count()), (592, 15));
        let rest = drain(&mut s, &b);
        assert_eq!(rest.first().map(|r| r.1), Some(608));
        assert_eq!(rest.len(), 1024 - 16 - 1 - 15);
        assert_eq!(blk.dirty().count(), 0);
    }

    #[test]
    fn next_requested_gives_requests_alone_and_never_the_scan() {
        let b = blocks(&[1024]);
        let blk = b.iter().next().unwrap();
        blk.dirty().set_all();
        let mut s = RequestFirst::new(false);
        s.new_pass();
        assert!(s.next_requested(&b).is_none(), "no request: no batch");
        s.request(&b, BlockId(0), 300).unwrap();
        s.request(&b, BlockId(0), 300).unwrap();
        s.request(&b, BlockId(0), 9).unwrap();
        let first = s.next_requested(&b).unwrap();
        assert!(first.requested);
        assert_eq!(first.pages.iter().collect::<Vec<_>>(), vec![300]);
        // The second request for page 300 is skipped: it went already.
        let second = s.next_requested(&b).unwrap();
        assert_eq!(second.pages.iter().collect::<Vec<_>>(), vec![9]);
        assert_eq!(s.ignored(), 1);
        assert!(s.next_requested(&b).is_none());
        assert_eq!(blk.dirty().count(), 1022, "the scan took nothing");
        // The scan resumes after the last request: the chunk of page 10.
        let next = s.next(&b).unwrap();
        assert!(!next.requested);
        assert_eq!(next.pages.start(), 0);
        // Its 64 KiB chunk (0..16), less page 9.
        assert_eq!(next.pages.count(), 15);
    }

    #[test]
    fn wait_request_ends_when_a_request_comes_and_times_out_without_one() {
        let b = Arc::new(blocks(&[64]));
        b.iter().next().unwrap().dirty().set(5);
        let mut s = RequestFirst::new(false);
        // No requester: a plain sleep.
        assert!(!s.wait_request(Duration::from_millis(1)));
        let r = s.requester(b.clone());
        assert!(!s.wait_request(Duration::from_millis(1)));
        // A wait far longer than any test run ends with the request.
        let sender = std::thread::spawn(move || r.request(BlockId(0), 5).unwrap());
        assert!(s.wait_request(Duration::from_secs(24 * 3600)));
        sender.join().unwrap();
        assert_eq!(s.pending(), 1);
        // Queued already: at once, whatever the timeout.
        assert!(s.wait_request(Duration::from_secs(24 * 3600)));
        let batch = s.next_requested(&b).unwrap();
        assert_eq!(batch.pages.iter().collect::<Vec<_>>(), vec![5]);
        // Every handle gone: the wait sleeps rather than spin.
        assert!(!s.wait_request(Duration::from_millis(1)));
    }

    #[test]
    fn hostile_requests_are_errors_that_touch_nothing() {
        let b = blocks(&[16, 8]);
        for blk in b.iter() {
            blk.dirty().set_all();
        }
        let mut s = RequestFirst::new(true);
        let err = s.request(&b, BlockId(2), 0).unwrap_err();
        assert!(
            matches!(err, Error::UnknownBlock { block: BlockId(2) }),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Protocol);
        let err = s.request(&b, BlockId(1), 8).unwrap_err();
        assert_eq!(
            err.to_string(),
            "page 8 is past the end of RAM block \"b1\" (8 pages)"
        );
        assert_eq!(err.kind(), ErrorKind::Protocol);
        assert!(s.request(&b, BlockId(u32::MAX), u64::MAX).is_err());
        assert_eq!(s.pending(), 0);
        assert_eq!(b.dirty_pages(), 24);
        // The scan is as if nothing had been asked.
        let first = s.next(&b).unwrap();
        assert_eq!(
            (first.block, first.pages.start(), first.channel),
            (0, 0, Channel::Main)
        );
    }

    #[test]
    fn a_requester_queues_from_another_thread() {
        let b = Arc::new(blocks(&[64]));
        b.iter().next().unwrap().dirty().set_all();
        let mut s = RequestFirst::new(true);
        let r = s.requester(b.clone());
        let t = {
            let r = r.clone();
            std::thread::spawn(move || {
                r.request(BlockId(0), 9).unwrap();
                r.request(BlockId(1), 0).unwrap_err()
            })
        };
        let err = t.join().unwrap();
        assert!(matches!(err, Error::UnknownBlock { .. }));
        let batch = s.next(&b).unwrap();
        assert_eq!(batch.pages.iter().collect::<Vec<_>>(), vec![9]);
        assert_eq!(batch.channel, Channel::Preempt);
        drop(s);
        assert!(matches!(
            r.request(BlockId(0), 1),
            Err(Error::SchedulerGone)
        ));
    }

    #[test]
    fn a_requester_takes_ranges_reports_bad_ones_and_ignores_requests_once_finished() {
        let b = Arc::new(blocks(&[64, 8]));
        for blk in b.iter() {
            blk.dirty().set_all();
        }
        let stats = Arc::new(RamStats::new());
        let mut s = RequestFirst::new(false).with_stats(stats.clone());
        let r = s.requester(b.clone());
        // Two pages in one request: each goes alone, in order.
        r.request_range(BlockId(0), 4 * 4096, 2 * 4096).unwrap();
        assert!(s.take_failure().is_none());
        assert!(s.has_request());
        for page in [4, 5] {
            let batch = s.next(&b).unwrap();
            assert!(batch.requested);
            assert_eq!(batch.pages.iter().collect::<Vec<_>>(), vec![page]);
        }
        // Already sent: skipped and counted; the scan goes on.
        r.request_range(BlockId(0), 4 * 4096, 4096).unwrap();
        let next = s.next(&b).unwrap();
        assert!(!next.requested);
        assert_eq!(s.ignored(), 1);
        assert_eq!(stats.snapshot().postcopy_requests_ignored, 1);

        // Hostile requests: refused, nothing queued, the saver told.
        let err = r.request_range(BlockId(1), 8 * 4096, 4096).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
        assert_eq!(
            err.to_string(),
            "page request for 0x1000 bytes at offset 0x8000 of RAM block #1 (\"b1\") refused"
        );
        let why = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(
            why,
            "range 0x8000+0x1000 is outside RAM block #1 of size 0x8000"
        );
        assert!(!s.has_request());
        let seen = s.take_failure().unwrap();
        assert_eq!(seen.to_string(), err.to_string());
        assert!(s.take_failure().is_none(), "reported once");
        for (block, offset, len) in [(9, 0, 4096), (0, 100, 4096), (0, 0, 0), (0, 0, 4095)] {
            let err = r.request_range(BlockId(block), offset, len).unwrap_err();
            assert!(matches!(err, Error::BadPageRequest { .. }), "{err:?}");
            assert_eq!(err.kind(), ErrorKind::Protocol);
            assert_eq!(s.take_failure().unwrap().to_string(), err.to_string());
        }
        let err = r.request_range(BlockId(9), 0x5000, 4096).unwrap_err();
        assert_eq!(
            err.to_string(),
            "page request for 0x1000 bytes at offset 0x5000 of RAM block #9 refused"
        );
        assert!(s.take_failure().is_some());
        // The page-index form reports its failure too.
        assert!(r.request(BlockId(0), 64).is_err());
        assert!(matches!(
            s.take_failure(),
            Some(Error::PageOutOfRange { page: 64, .. })
        ));
        // A failure from the return-path thread itself.
        r.fail(Error::Stream(migration_stream::Error::Closed));
        r.fail(Error::SchedulerGone);
        assert!(
            matches!(s.take_failure(), Some(Error::Stream(_))),
            "the first one"
        );
        assert_eq!(
            b.iter().next().unwrap().dirty().count(),
            64 - 2 - next.pages.count()
        );

        // Finished: queued requests and later ones are counted and dropped.
        r.request_range(BlockId(1), 0, 4096).unwrap();
        assert_eq!(s.finish(), 1);
        assert!(r.is_finished());
        r.request_range(BlockId(1), 4096, 4096).unwrap();
        r.request(BlockId(1), 2).unwrap();
        assert!(!s.has_request());
        assert!(s.next(&b).is_some_and(|batch| !batch.requested));
        assert_eq!(stats.snapshot().postcopy_requests_ignored, 4);
    }

    #[test]
    fn finish_releases_a_requester_that_waits_for_room() {
        let b = Arc::new(blocks(&[64]));
        let mut s = RequestFirst::new(false);
        let r = s.requester(b.clone());
        let t = std::thread::spawn(move || {
            for _ in 0..REQUEST_QUEUE + 10 {
                r.request(BlockId(0), 1).unwrap();
            }
            r.is_finished()
        });
        // Whether it is blocked on a full queue yet or not, finishing lets
        // every request return.
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.finish();
        assert!(t.join().unwrap());
        assert!(!s.has_request());
    }

    /// A round over a model: every page dirty at the start of the pass is
    /// sent exactly once, requested pages (still dirty) right after their
    /// request, alone, on the request channel.
    #[derive(Debug, Clone)]
    enum Step {
        Next,
        Request(usize, u64),
    }

    proptest! {
        #[test]
        fn linear_scan_matches_a_vec_bool_model(
            sizes in proptest::collection::vec(1..700u64, 1..4),
            seed in any::<u64>(),
        ) {
            let b = blocks(&sizes);
            let mut model: Vec<Vec<bool>> = Vec::new();
            let mut x = seed | 1;
            for (i, &n) in sizes.iter().enumerate() {
                let mut m = vec![false; n as usize];
                for (p, bit) in m.iter_mut().enumerate() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    if x % 3 == 0 {
                        *bit = true;
                        b.iter().nth(i).unwrap().dirty().set(p as u64);
                    }
                }
                model.push(m);
            }
            let expected: Vec<(usize, u64, Channel)> = model
                .iter()
                .enumerate()
                .flat_map(|(i, m)| {
                    m.iter().enumerate().filter(|(_, d)| **d).map(move |(p, _)| (i, p as u64, Channel::Main))
                })
                .collect();
            let mut s = LinearScan::new();
            prop_assert_eq!(drain(&mut s, &b), expected);
            prop_assert_eq!(b.dirty_pages(), 0);
        }

        #[test]
        fn request_first_matches_a_vec_bool_model(
            sizes in proptest::collection::vec(1..700u64, 1..4),
            steps in proptest::collection::vec(
                prop_oneof![
                    3 => Just(Step::Next),
                    1 => (0..4usize, 0..800u64).prop_map(|(b, p)| Step::Request(b, p)),
                ],
                0..80,
            ),
            preempt in any::<bool>(),
        ) {
            let b = blocks(&sizes);
            for blk in b.iter() {
                blk.dirty().set_range(0, blk.pages() / 2);
                blk.dirty().set(blk.pages() - 1);
            }
            let mut dirty: Vec<Vec<bool>> =
                b.iter().map(|blk| (0..blk.pages()).map(|p| blk.dirty().test(p)).collect()).collect();
            let ch = if preempt { Channel::Preempt } else { Channel::Main };
            let mut s = RequestFirst::new(preempt);
            let mut queued: VecDeque<(usize, u64)> = VecDeque::new();
            for step in steps.into_iter().chain(std::iter::repeat_n(Step::Next, 2000)) {
                match step {
                    Step::Request(blk, page) => {
                        let ok = blk < sizes.len() && page < sizes[blk];
                        let id = BlockId(u32::try_from(blk).unwrap());
                        prop_assert_eq!(s.request(&b, id, page).is_ok(), ok);
                        if ok {
                            queued.push_back((blk, page));
                        }
                    }
                    Step::Next => {
                        // Requests of pages already sent are skipped.
                        while queued.front().is_some_and(|&(blk, p)| !dirty[blk][p as usize]) {
                            queued.pop_front();
                        }
                        let Some(batch) = s.next(&b) else {
                            prop_assert!(queued.is_empty());
                            break;
                        };
                        let pages: Vec<u64> = batch.pages.iter().collect();
                        if let Some((blk, p)) = queued.pop_front() {
                            prop_assert_eq!((batch.block, pages.clone(), batch.channel), (blk, vec![p], ch));
                        } else {
                            prop_assert_eq!(batch.channel, Channel::Main);
                        }
                        for p in pages {
                            prop_assert!(dirty[batch.block][p as usize], "page {} of {} sent twice", p, batch.block);
                            dirty[batch.block][p as usize] = false;
                        }
                    }
                }
            }
            prop_assert!(dirty.iter().flatten().all(|d| !d), "a dirty page was never sent");
            prop_assert_eq!(b.dirty_pages(), 0);
        }
    }
}
