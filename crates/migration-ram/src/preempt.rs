//! Postcopy preempt: requested pages on a connection of their own, sent by
//! the thread that reads the request.
//!
//! Without it a page a vCPU waits for goes from the source's return-path
//! thread to the saver through a queue ([`PageRequester::request_range`]),
//! and then out on the main channel behind whatever of the background
//! stream the socket buffers already hold. With it:
//!
//! ```text
//!  source                                       destination
//!  ------                                       -----------
//!  return-path thread                           fault thread
//!    PageRequest ─> PreemptSender::serve          (a vCPU faulted) ─> PageRequest
//!      check, take the page from the dirty
//!      bitmap, read it, write it, flush  ──────> preempt loader thread
//!      tell the saver where it was               PrecopyLoader::load_preempt:
//!                                                  places it (UFFDIO_COPY), wakes the vCPU
//!  saver (postcopy_send): background scan,
//!    resumed just after the served page          main loader: background pages
//!  once every page went: PreemptSender::finish
//!    ─> EndOfSection on the preempt channel ───> load_preempt returns; then Complete
//! ```
//!
//! - A page is taken from its block's dirty bitmap by exactly one thread
//!   (the bits are cleared atomically), so it crosses exactly one channel:
//!   no page is sent twice and the two loaders never place the same page.
//! - The request costs no thread switch at the source and never waits
//!   behind the background stream; the saver learns of it through one
//!   atomic word ([`PageRequester::served`]) and moves its scan there at its
//!   next chunk.
//! - Once requests come in order (the second one just after the first),
//!   the pages after each requested page that are still dirty follow it on
//!   the same channel once it is flushed (64 KiB, doubling up to 1 MiB while
//!   they stay in order; [`PreemptSender::set_readahead`]): a guest that
//!   reads memory in order finds them there rather than faulting on each
//!   behind the background stream's backlog. A guest whose touches are
//!   scattered gets none, so its next request never waits behind them.
//! - A page that failed to go is dirty again (its bits restored), for a
//!   recovery; a bad request fails the migration as it does without
//!   preempt, reported to the saver.
//! - The destination must not end postcopy on `Complete` before the
//!   preempt channel's `EndOfSection`: the last requested page may still be
//!   in flight there.

use std::io::Write;
use std::sync::Arc;

use migration_stream::{BlockId, StreamWriter};

use crate::block::{RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::precopy::{chunk_pages_of, is_zero, read_page, POSTCOPY_CHUNK_BYTES};
use crate::schedule::PageRequester;
use crate::stats::RamStats;
use crate::{GuestMemoryMmap, GuestRegionMmap};

/// What one [`PreemptSender::serve`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Pages asked for, written and flushed on the preempt channel.
    pub sent: u64,
    /// Huge pages asked for that were no longer dirty (sent already on the
    /// main channel, or asked for twice), not sent again.
    pub ignored: u64,
    /// Pages asked for that were no longer dirty, sent again on this
    /// channel (see [`PreemptSender::serve`]).
    pub resent: u64,
    /// Pages after them sent too, on the same channel ([readahead](PreemptSender::set_readahead)).
    pub ahead: u64,
}

/// The default [readahead](PreemptSender::set_readahead): 64 KiB after a
/// requested page, the size of a background chunk in postcopy.
pub const PREEMPT_READAHEAD: u64 = 64 << 10;

/// The largest readahead window a run of requests in order grows to: 1 MiB.
pub const PREEMPT_READAHEAD_MAX: u64 = 1 << 20;

/// Pages smaller than this that are asked for again are
/// [sent again](PreemptSender::serve); huge pages are not.
const RESEND_BELOW: u64 = 64 << 10;

/// Pages of the readahead window flushed at a time, so the first ones land
/// while the rest are read.
const AHEAD_FLUSH_PAGES: u64 = 16;

/// The last request served and its readahead window, to tell a guest that
/// reads in order.
#[derive(Debug, Clone, Copy)]
struct Window {
    block: BlockId,
    /// The requested page it followed.
    from: u64,
    /// The first page after it (`from + 1` when no readahead went).
    end: u64,
    /// Its size in pages (0: no readahead went).
    pages: u64,
}

/// The source's end of the preempt channel: serves a destination's page
/// request from the thread that read it; see the [module docs](self).
///
/// It shares the saver's blocks (their dirty and sent bitmaps) and its
/// [`PageRequester`] (for the checks, the failure it reports to the saver,
/// and the end of postcopy). Make it with
/// [`PrecopySaver::preempt_sender`](crate::PrecopySaver::preempt_sender).
pub struct PreemptSender<W: Write> {
    mem: Arc<GuestMemoryMmap>,
    blocks: Arc<RamBlocks>,
    requester: PageRequester,
    stats: Arc<RamStats>,
    writer: StreamWriter<W>,
    buf: Vec<u8>,
    readahead: u64,
    window: Option<Window>,
}

impl<W: Write> std::fmt::Debug for PreemptSender<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreemptSender")
            .field("blocks", &self.blocks.len())
            .field("bytes_written", &self.writer.bytes_written())
            .finish_non_exhaustive()
    }
}

impl<W: Write> PreemptSender<W> {
    /// A sender of the pages of `blocks` in `mem` on `writer` (a preempt
    /// channel whose preamble was written), checking requests with
    /// `requester` and counting in `stats`.
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        blocks: Arc<RamBlocks>,
        requester: PageRequester,
        stats: Arc<RamStats>,
        writer: StreamWriter<W>,
    ) -> Self {
        let page = usize::try_from(blocks.max_page_size()).unwrap_or(usize::MAX);
        PreemptSender {
            mem,
            blocks,
            requester,
            stats,
            writer,
            buf: vec![0; page],
            readahead: PREEMPT_READAHEAD,
            window: None,
        }
    }

    /// How many bytes after the last page of a request also go on the
    /// preempt channel, those still dirty, once the requested page was
    /// flushed, when requests come in order (default [`PREEMPT_READAHEAD`];
    /// 0 turns readahead off). A guest that touches memory in order then
    /// finds the next pages arrived instead of faulting on each one: the
    /// background stream, which moves to the request too, comes behind what
    /// the main channel's buffers already hold.
    ///
    /// A request is in order when it falls after the one before, within its
    /// window or one more window past it (within `bytes` past it if no
    /// window went). The first request in order gets a window of `bytes`,
    /// each next one twice the last, up to [`PREEMPT_READAHEAD_MAX`]; a
    /// request elsewhere gets none. A guest whose touches are scattered so
    /// gets no readahead at all, and its next request never waits behind one
    /// (with a window after every request, the random-writes guest of
    /// `cargo xtask bench --only vs-qemu-postcopy` blocked longer). The
    /// pages are taken from the dirty bitmap as requested ones are, so
    /// nothing is sent twice. Huge host pages (a request is 2 MiB already)
    /// get no readahead.
    pub fn set_readahead(&mut self, bytes: u64) {
        self.readahead = bytes;
        self.window = None;
    }

    /// The size in pages of the window after page `page` of `block`.
    fn window_pages(&self, block: BlockId, page: u64, page_size: u64) -> u64 {
        let base = self.readahead / page_size;
        if base == 0 {
            return 0;
        }
        let max = (PREEMPT_READAHEAD_MAX / page_size)
            .max(base)
            .min(crate::bitmap::TAKE_MAX_PAGES);
        match self.window {
            // In order: inside the last window or within one more of it.
            Some(w) if w.block == block && page > w.from && page <= w.end + w.pages.max(base) => {
                if w.pages == 0 {
                    base.min(max)
                } else {
                    (w.pages * 2).min(max)
                }
            }
            _ => 0,
        }
    }

    /// Serves a request as the return path carries it, `len` bytes at
    /// `offset` of `block`: each of its pages that is still dirty is taken
    /// from the dirty bitmap, read, written and flushed, at once, on this
    /// thread. A page no longer dirty was taken by the background stream and
    /// is on its way on the main channel (the destination would not ask for
    /// one it has): it is sent again here, as the guest would otherwise wait
    /// for it behind the main channel's buffers, milliseconds with the
    /// kernel's own (the source's memory no longer changes in postcopy, and
    /// the destination places whichever copy comes first). Huge pages are
    /// not sent twice, only counted as ignored: 2 MiB here costs about what
    /// waiting for them there does.
    ///
    /// A bad request fails with [`Error::BadPageRequest`] and is reported
    /// to the saver, sending nothing. If a write fails, the page is dirty
    /// again and the error is returned (of kind
    /// [`ErrorKind::Link`](crate::ErrorKind::Link) for a broken connection);
    /// the caller reports it to the saver with [`PageRequester::fail`].
    pub fn serve(&mut self, block: BlockId, offset: u64, len: u64) -> Result<Served> {
        let (index, pages) = self.requester.check_range(block, offset, len)?;
        let mut served = Served::default();
        // Two reference counts, so the block and region outlive the borrows
        // of `self` below.
        let (blocks, mem) = (self.blocks.clone(), self.mem.clone());
        let b = blocks.get(block).ok_or(Error::UnknownBlock { block })?;
        let region = b.region(&mem).ok_or_else(|| Error::NotInMemory {
            name: b.name().to_owned(),
            guest_addr: b.guest_addr().0,
            size: b.size(),
        })?;
        let page_size = u64::from(b.page_size());
        let mut last = None;
        let resend = page_size < RESEND_BELOW;
        for page in pages {
            let taken = b.dirty().take_range(page, 1);
            if taken.is_empty() {
                if resend {
                    self.resend(block, b, region, page)?;
                    served.resent += 1;
                } else {
                    served.ignored += 1;
                }
                continue;
            }
            // The destination may get it from here on.
            b.mark_sent(&taken);
            let buf = &mut self.buf[..b.page_size() as usize];
            let before = self.writer.bytes_written();
            let result = read_page(region, b, page, buf).and_then(|()| {
                let offset = page * page_size;
                let zero = is_zero(buf);
                if zero {
                    self.writer.write_zero_page(block, offset)?;
                } else {
                    self.writer.write_page(block, offset, buf)?;
                }
                self.writer.flush()?;
                Ok(zero)
            });
            self.stats
                .add_transferred(self.writer.bytes_written() - before);
            match result {
                Ok(true) => self.stats.add_zero_pages(1),
                Ok(false) => self.stats.add_normal_pages(1, page_size),
                Err(e) => {
                    b.dirty().restore(&taken);
                    return Err(e);
                }
            }
            self.stats.add_postcopy_requests(1);
            served.sent += 1;
            last = Some(page);
        }
        if served.ignored > 0 {
            self.requester.ignored(served.ignored);
        }
        if served.resent > 0 {
            self.stats.add_postcopy_pages_resent(served.resent);
        }
        if let Some(page) = last {
            let ahead = self.read_ahead(block, b, region, page)?;
            served.ahead = ahead.0;
            self.requester.served(index, ahead.1);
        }
        Ok(served)
    }

    /// Sends page `page` of block `b` again (see [`serve`](Self::serve)),
    /// flushed; its bitmaps are left as they are.
    fn resend(
        &mut self,
        block: BlockId,
        b: &RamBlock,
        region: &GuestRegionMmap,
        page: u64,
    ) -> Result<()> {
        let buf = &mut self.buf[..b.page_size() as usize];
        read_page(region, b, page, buf)?;
        let before = self.writer.bytes_written();
        let offset = page * u64::from(b.page_size());
        let result = if is_zero(buf) {
            self.writer.write_zero_page(block, offset)
        } else {
            self.writer.write_page(block, offset, buf)
        }
        .and_then(|()| self.writer.flush());
        self.stats
            .add_transferred(self.writer.bytes_written() - before);
        Ok(result?)
    }

    /// Sends the pages still dirty in the readahead window after page
    /// `last` of block `b`, flushed every [`AHEAD_FLUSH_PAGES`]; returns how
    /// many went and the page the background scan goes on after (past the
    /// room of the next window). If writing fails, every page of the window
    /// is dirty again.
    fn read_ahead(
        &mut self,
        block: BlockId,
        b: &RamBlock,
        region: &GuestRegionMmap,
        last: u64,
    ) -> Result<(u64, u64)> {
        let page_size = u64::from(b.page_size());
        let n = self.window_pages(block, last, page_size);
        let first = last + 1;
        if n == 0 || first >= b.pages() {
            self.window = Some(Window {
                block,
                from: last,
                end: first,
                pages: 0,
            });
            return Ok((0, last));
        }
        let taken = b.dirty().take_range(first, n);
        self.window = Some(Window {
            block,
            from: last,
            end: taken.end(),
            pages: n,
        });
        // The background scan goes on past the room the next window of a
        // guest reading in order takes: pages it took there would wait in
        // the main channel's backlog instead of coming on this channel.
        // The scan restarts at a chunk boundary: the first one past that room.
        let max = (PREEMPT_READAHEAD_MAX / page_size).min(crate::bitmap::TAKE_MAX_PAGES);
        let chunk = chunk_pages_of(POSTCOPY_CHUNK_BYTES, b.page_size());
        let room = taken.end() + (n * 2).min(max.max(n));
        let end = room
            .div_ceil(chunk)
            .saturating_mul(chunk)
            .min(b.pages())
            .saturating_sub(1)
            .max(last);
        if taken.is_empty() {
            return Ok((0, end));
        }
        b.mark_sent(&taken);
        let buf = &mut self.buf[..b.page_size() as usize];
        let before = self.writer.bytes_written();
        let (mut zero, mut normal) = (0, 0);
        let mut result = Ok(());
        for (i, page) in taken.iter().enumerate() {
            result = read_page(region, b, page, buf).and_then(|()| {
                let offset = page * page_size;
                if is_zero(buf) {
                    zero += 1;
                    self.writer.write_zero_page(block, offset)?;
                } else {
                    normal += 1;
                    self.writer.write_page(block, offset, buf)?;
                }
                if (i as u64 + 1) % AHEAD_FLUSH_PAGES == 0 {
                    self.writer.flush()?;
                }
                Ok(())
            });
            if result.is_err() {
                break;
            }
        }
        let result = result.and_then(|()| Ok(self.writer.flush()?));
        self.stats
            .add_transferred(self.writer.bytes_written() - before);
        if let Err(e) = result {
            b.dirty().restore(&taken);
            return Err(e);
        }
        self.stats.add_zero_pages(zero);
        self.stats.add_normal_pages(normal, page_size);
        Ok((zero + normal, end))
    }

    /// Ends the preempt channel once the saver sent every page
    /// ([`postcopy_send`](crate::PrecopySaver::postcopy_send) returned):
    /// writes `EndOfSection`, flushes, and gives the writer back. Requests
    /// that come later find their page sent and are ignored.
    pub fn finish(mut self) -> Result<W> {
        let before = self.writer.bytes_written();
        let result = self
            .writer
            .write_end_of_section()
            .and_then(|()| self.writer.flush());
        self.stats
            .add_transferred(self.writer.bytes_written() - before);
        result?;
        Ok(self.writer.into_inner()?)
    }

    /// The requester it checks requests with (for the requests that come
    /// after [`finish`](PreemptSender::finish)).
    pub fn requester(&self) -> &PageRequester {
        &self.requester
    }
}

#[cfg(test)]
mod tests {
    use migration_stream::{ErrorKind, PageHeader, Record, StreamReader};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::block::RamBlock;
    use crate::schedule::{PageScheduler, RequestFirst};
    use crate::PrecopyLoader;

    const PAGES: u64 = 256;

    /// 1 MiB of guest memory whose page `p` holds `p + 1` in its first
    /// byte (page 7 is all zeros), one block over it, every page dirty.
    fn setup() -> (Arc<GuestMemoryMmap>, Arc<RamBlocks>, Arc<RamStats>) {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * 4096) as usize)]).unwrap(),
        );
        for p in (0..PAGES).filter(|&p| p != 7) {
            mem.write_obj((p + 1) as u8, GuestAddress(p * 4096))
                .unwrap();
        }
        let blocks = Arc::new(
            RamBlocks::new(vec![RamBlock::new(
                "pc.ram",
                GuestAddress(0),
                PAGES * 4096,
                4096,
            )
            .unwrap()])
            .unwrap(),
        );
        blocks.iter().next().unwrap().dirty().set_all();
        (mem, blocks, Arc::new(RamStats::default()))
    }

    /// A sender over [`setup`]'s memory with `readahead` bytes of
    /// readahead; its scheduler (which counts in the same statistics), the
    /// blocks and the statistics.
    fn sender(
        readahead: u64,
    ) -> (
        RequestFirst,
        PreemptSender<Vec<u8>>,
        Arc<RamBlocks>,
        Arc<RamStats>,
    ) {
        let (mem, blocks, stats) = setup();
        let mut rf = RequestFirst::new(false).with_stats(stats.clone());
        let requester = rf.requester(blocks.clone());
        let mut s = PreemptSender::new(
            mem,
            blocks.clone(),
            requester,
            stats.clone(),
            StreamWriter::new(Vec::new()),
        );
        s.set_readahead(readahead);
        (rf, s, blocks, stats)
    }

    fn header(r: &mut StreamReader<&[u8]>, blocks: &RamBlocks) -> Record {
        r.read_record(blocks).unwrap()
    }

    #[test]
    fn a_request_is_sent_at_once_once_and_the_scan_follows_it() {
        let (mut rf, mut s, blocks, stats) = sender(0);
        let block = BlockId(0);
        assert_eq!(
            s.serve(block, 200 * 4096, 4096).unwrap(),
            Served {
                sent: 1,
                ..Served::default()
            }
        );
        // A zero page goes as a zero-page record; a range as its pages,
        // a page that went already (200) again.
        assert_eq!(s.serve(block, 7 * 4096, 4096).unwrap().sent, 1);
        assert_eq!(
            s.serve(block, 199 * 4096, 2 * 4096).unwrap(),
            Served {
                sent: 1,
                resent: 1,
                ..Served::default()
            }
        );
        assert_eq!(blocks.dirty_pages(), PAGES - 3);
        let snap = stats.snapshot();
        assert_eq!(snap.postcopy_requests, 3);
        assert_eq!(snap.postcopy_pages_resent, 1);
        assert_eq!(snap.postcopy_requests_ignored, 0);
        assert_eq!(
            (snap.normal, snap.duplicate),
            (2, 1),
            "pages sent again are not counted twice"
        );

        // The saver's scan goes on after the last page served (199), from
        // its chunk (64 KiB: pages 192..208), and skips what went.
        let first = rf.next(&blocks).unwrap();
        let pages: Vec<u64> = first.pages.iter().collect();
        assert_eq!(pages[0], 192);
        assert!(!pages.contains(&199) && !pages.contains(&200));
        assert!(!first.requested);

        // What went on the channel, in order, then EndOfSection.
        let bytes = s.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]);
        let page = |r: &mut StreamReader<&[u8]>| match header(r, &blocks) {
            Record::Page(PageHeader { offset, .. }) => {
                let mut buf = [0u8; 4096];
                r.read_page_into(&mut buf).unwrap();
                (offset, buf[0])
            }
            other => panic!("not a page: {other:?}"),
        };
        assert_eq!(page(&mut r), (200 * 4096, 201));
        assert!(matches!(
            header(&mut r, &blocks),
            Record::ZeroPage(PageHeader { offset, .. }) if offset == 7 * 4096
        ));
        assert_eq!(page(&mut r), (199 * 4096, 200));
        assert_eq!(page(&mut r), (200 * 4096, 201));
        assert_eq!(header(&mut r, &blocks), Record::EndOfSection);
    }

    #[test]
    fn the_pages_after_a_request_follow_it_each_once() {
        let (_rf, mut s, blocks, stats) = sender(4 * 4096);
        // Page 12 went already (in the background, say).
        let b = blocks.iter().next().unwrap();
        assert!(!b.dirty().take_range(12, 1).is_empty());
        let only = Served {
            sent: 1,
            ..Served::default()
        };
        // A first request: no readahead yet.
        assert_eq!(s.serve(BlockId(0), 9 * 4096, 4096).unwrap(), only);
        // The next one in order: its window follows, less what went.
        assert_eq!(
            s.serve(BlockId(0), 10 * 4096, 4096).unwrap(),
            Served {
                sent: 1,
                ahead: 3,
                ..Served::default()
            }
        );
        // At the end of the block, the window is cut there.
        assert_eq!(s.serve(BlockId(0), (PAGES - 3) * 4096, 4096).unwrap(), only);
        assert_eq!(
            s.serve(BlockId(0), (PAGES - 2) * 4096, 4096).unwrap(),
            Served {
                sent: 1,
                ahead: 1,
                ..Served::default()
            }
        );
        assert_eq!(blocks.dirty_pages(), PAGES - 1 - 5 - 3);
        let snap = stats.snapshot();
        assert_eq!(
            snap.postcopy_requests, 4,
            "read-ahead pages are no requests"
        );
        // Page 255 holds 256 as a byte: zero.
        assert_eq!((snap.normal, snap.duplicate), (7, 1));

        // The requested page first, then its window in order.
        let bytes = s.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]);
        let mut offsets = Vec::new();
        loop {
            match header(&mut r, &blocks) {
                Record::Page(PageHeader { offset, .. }) => {
                    let mut buf = [0u8; 4096];
                    r.read_page_into(&mut buf).unwrap();
                    assert_eq!(buf[0], (offset / 4096 + 1) as u8);
                    offsets.push(offset / 4096);
                }
                Record::ZeroPage(PageHeader { offset, .. }) => offsets.push(offset / 4096),
                Record::EndOfSection => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            offsets,
            [9, 10, 11, 13, 14, PAGES - 3, PAGES - 2, PAGES - 1]
        );
    }

    #[test]
    fn the_window_opens_and_doubles_while_requests_come_in_order_and_closes_elsewhere() {
        let (_rf, mut s, _blocks, _stats) = sender(4 * 4096);
        let mut ahead = |page: u64| s.serve(BlockId(0), page * 4096, 4096).unwrap().ahead;
        // 0 alone; 4 (within 4 pages past it), then 5..=8; 13 (just past),
        // then 14..=21; 22, then 23..=38.
        assert_eq!([ahead(0), ahead(4), ahead(13), ahead(22)], [0, 4, 8, 16]);
        // Elsewhere: none; in order again: it opens and grows again.
        assert_eq!([ahead(100), ahead(101), ahead(106)], [0, 4, 8]);
        // Behind the window is not in order; nor is too far past a request
        // that had none.
        assert_eq!([ahead(50), ahead(60)], [0, 0]);
    }

    #[test]
    fn the_scan_goes_on_past_the_room_of_the_next_window() {
        let (mut rf, mut s, blocks, _stats) = sender(4 * 4096);
        // 9 alone, 10, then 11..=14; the next window would be 15..=22: the
        // scan (64 KiB chunks, 16 pages) goes on at 32, leaving 15..32 dirty.
        assert_eq!(s.serve(BlockId(0), 9 * 4096, 4096).unwrap().ahead, 0);
        assert_eq!(s.serve(BlockId(0), 10 * 4096, 4096).unwrap().ahead, 4);
        let first = rf.next(&blocks).unwrap();
        assert_eq!(first.pages.iter().next(), Some(32));
        assert_eq!(s.serve(BlockId(0), 15 * 4096, 4096).unwrap().ahead, 8);
    }

    #[test]
    fn a_bad_request_sends_nothing_and_fails_the_saver() {
        let (mut rf, mut s, blocks, _stats) = sender(PREEMPT_READAHEAD);
        for (block, offset, len) in [
            (BlockId(1), 0, 4096),
            (BlockId(0), PAGES * 4096, 4096),
            (BlockId(0), 100, 4096),
        ] {
            let e = s.serve(block, offset, len).unwrap_err();
            assert!(matches!(e, Error::BadPageRequest { .. }), "{e}");
            assert_eq!(e.kind(), ErrorKind::Protocol);
        }
        assert!(matches!(
            rf.take_failure(),
            Some(Error::BadPageRequest { .. })
        ));
        assert_eq!(blocks.dirty_pages(), PAGES);
        assert!(s.finish().unwrap().len() <= 8, "only EndOfSection went");
    }

    #[test]
    fn after_the_saver_finished_a_request_is_sent_again() {
        let (mut rf, mut s, blocks, stats) = sender(PREEMPT_READAHEAD);
        // Every page went on the main channel (page 0 here), and the
        // destination asks for one still on its way there.
        let b = blocks.iter().next().unwrap();
        assert!(!b.dirty().take_range(0, 1).is_empty());
        rf.finish();
        assert_eq!(
            s.serve(BlockId(0), 0, 4096).unwrap(),
            Served {
                resent: 1,
                ..Served::default()
            }
        );
        assert_eq!(blocks.dirty_pages(), PAGES - 1);
        let snap = stats.snapshot();
        assert_eq!(
            (snap.postcopy_pages_resent, snap.postcopy_requests_ignored),
            (1, 0)
        );
        let bytes = s.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]);
        assert!(matches!(
            header(&mut r, &blocks),
            Record::Page(PageHeader { offset: 0, .. })
        ));
    }

    #[test]
    fn the_preempt_loader_places_pages_until_end_of_section_and_nothing_else() {
        let (_rf, mut s, _blocks, _stats) = sender(0);
        s.serve(BlockId(0), 5 * 4096, 4096).unwrap();
        let bytes = s.finish().unwrap();

        let dst_mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * 4096) as usize)]).unwrap(),
        );
        let dst_blocks = Arc::new(
            RamBlocks::new(vec![RamBlock::new(
                "pc.ram",
                GuestAddress(0),
                PAGES * 4096,
                4096,
            )
            .unwrap()])
            .unwrap(),
        );
        let mut main = PrecopyLoader::new(
            dst_mem.clone(),
            dst_blocks.clone(),
            Arc::new(RamStats::default()),
        );
        main.check_setup(&dst_blocks.infos()).unwrap();
        let mut preempt = main.preempt_loader();
        let pages = preempt
            .load_preempt(&mut StreamReader::new(&bytes[..]))
            .unwrap();
        assert_eq!(pages, 1);
        assert_eq!(dst_mem.read_obj::<u8>(GuestAddress(5 * 4096)).unwrap(), 6);
        assert_eq!(main.received_pages(), 1);

        // A command on the preempt channel is refused.
        let mut w = StreamWriter::new(Vec::new());
        w.write_complete().unwrap();
        let bytes = w.into_inner().unwrap();
        let e = preempt
            .load_preempt(&mut StreamReader::new(&bytes[..]))
            .unwrap_err();
        assert!(matches!(e, Error::NotAPreemptRecord { .. }), "{e}");
        assert_eq!(e.kind(), ErrorKind::Protocol);
    }
}
