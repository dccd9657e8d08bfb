//! [`BackgroundSnapshot`]: RAM saved once, as it was at one instant, while
//! the guest runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use migration_stream::BlockId;
use uffd_sys::{
    Event, EventBuf, FaultKind, Features, Ioctls, MemoryKind, RegisterMode, Uffd, Wake,
};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{SnapshotError, SnapshotSink};
use crate::bitmap::DirtyBitmap;
use crate::block::{HostMap, RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::postcopy::{block_backing, latency_bucket, serve_events, LATENCY_BUCKETS};
use crate::precopy::{chunk_pages_of, is_zero, CHUNK_BYTES};
use crate::rate::RateLimiter;
use crate::stats::{Params, Phase, RamStats};
use crate::GuestMemoryMmap;

/// Faults read at once.
const FAULT_BATCH: usize = 64;

/// Bytes of pages captured on write faults that may wait for the sink at
/// once; past this, the fault thread waits for the sink (and writers wait
/// for the fault thread).
const QUEUE_BYTES: u64 = 64 << 20;

/// A page the fault thread saved before letting its writer go on.
struct Captured {
    index: usize,
    page: u64,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    fault_pages: AtomicU64,
    late: AtomicU64,
}

/// What the fault thread and the saver share.
struct Shared {
    mem: Arc<GuestMemoryMmap>,
    uffd: Arc<Uffd>,
    blocks: Arc<RamBlocks>,
    map: HostMap,
    /// Pages whose content is saved (by the scan or on a fault): the bit is
    /// taken before the page is read, so each page is read exactly once,
    /// while it is still protected.
    captured: Vec<DirtyBitmap>,
    counters: Counters,
    stop: AtomicBool,
    /// The first error of the fault thread.
    error: Mutex<Option<Error>>,
}

impl Shared {
    fn record(&self, e: Error) {
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                log::error!("background snapshot fault handling: {e}");
                *slot = Some(e);
            }
        }
    }

    fn take_error(&self) -> Option<Error> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    fn memory_error<'b>(
        block: &'b RamBlock,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> impl FnOnce(uffd_sys::Error) -> Error + 'b {
        move |source| {
            SnapshotError::Memory {
                op,
                name: block.name().to_owned(),
                offset,
                len,
                source,
            }
            .into()
        }
    }
}

/// What the write faults of a snapshot cost the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WriteFaultStats {
    /// Write faults read.
    pub faults: u64,
    /// Pages saved on a write fault, ahead of the scan.
    pub fault_pages: u64,
    /// Faults on pages already saved when the fault was read.
    pub late_faults: u64,
    /// How long writers waited, from the fault being read to their page
    /// being unprotected: median, 99th percentile and maximum, in µs.
    pub stall_p50_us: u64,
    /// See [`stall_p50_us`](WriteFaultStats::stall_p50_us).
    pub stall_p99_us: u64,
    /// See [`stall_p50_us`](WriteFaultStats::stall_p50_us).
    pub stall_max_us: u64,
    /// The same waits in power-of-two µs buckets (see
    /// [`crate::postcopy::latency_bucket`]).
    pub stall_histogram: Vec<u64>,
}

/// What [`BackgroundSnapshot::save`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SnapshotOutcome {
    /// Pages saved in all (every page of every block, once).
    pub pages: u64,
    /// Of those, pages saved on a write fault.
    pub fault_pages: u64,
    /// Of those, pages that were all zeros.
    pub zero_pages: u64,
    /// Bytes the sink wrote.
    pub bytes: u64,
}

/// A background snapshot: every page of guest RAM saved exactly once, as it
/// was at the instant [`protect`](BackgroundSnapshot::protect) returned,
/// while the guest runs (QEMU's `background-snapshot`).
///
/// ```text
///  caller (guest paused)      protect: WP registration, UFFDIO_WRITEPROTECT of all RAM
///                             (never-touched pages too: WP_UNPOPULATED, or populated for
///                             reading first), fault thread started
///  caller                     resumes the guest
///
///  vCPU / VMM thread          fault thread                    saver (save)
///  -----------------          ------------                    ------------
///  writes a protected page
///  (blocks in the kernel) --> reads a batch of faults          per chunk of 1 MiB:
///                             per fault: captured bit           take the captured bits
///                             newly set? copy the page,         not yet taken, copy those
///                             UFFDIO_WRITEPROTECT(off)          pages, unprotect the runs
///  runs on  <---------------  on the page (wakes the writer),   it took, write them to
///                             queue the copy  - - - - - - - ->  the sink; before each chunk
///                                                               and while the rate limiter
///                                                               waits, the queued copies go
///                                                               to the sink first
/// ```
///
/// A page's captured bit is taken before its bytes are read, by whichever of
/// the scan and the fault thread comes first, and a page is unprotected only
/// after it was read, by whoever took its bit: so each page is read once,
/// while nobody can have written it since the instant of the snapshot. The
/// scan never unprotects a page the fault thread took (that page may not be
/// read yet), and never page by page: each run of pages it took, in one call
/// (the whole chunk when the fault thread took none of it).
///
/// Every way out removes all write protection:
/// [`release`](BackgroundSnapshot::release), which dropping the snapshot also runs,
/// unprotects every block (waking any writer), stops and joins the fault
/// thread and unregisters the blocks, whether the save completed, was
/// cancelled or failed.
///
/// # Hot paths
///
/// The fault thread takes no lock; it reads the clock twice per batch of
/// faults (the stall of every fault of a batch is the batch's time). The
/// scan reads the clock once per chunk, for the rate limiter.
pub struct BackgroundSnapshot {
    shared: Arc<Shared>,
    queue: Option<Receiver<Captured>>,
    exit: EventFd,
    thread: Option<JoinHandle<Vec<u32>>>,
    stalls: Vec<u32>,
    released: bool,
    /// Whether never-touched pages were populated before protection.
    populated: bool,
}

impl std::fmt::Debug for BackgroundSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundSnapshot")
            .field("blocks", &self.shared.blocks.len())
            .field("released", &self.released)
            .field("populated", &self.populated)
            .finish_non_exhaustive()
    }
}

impl BackgroundSnapshot {
    /// Write-protects every block of `blocks` (which must lie in `mem`) with
    /// `uffd` (from [`check_support`](super::check_support)) and starts the
    /// fault thread. Call it with the guest paused: RAM is saved as it is when
    /// this returns, and the guest may run again at once.
    ///
    /// Pages never touched are protected too: with `WP_UNPOPULATED` where
    /// the handle has it; otherwise anonymous blocks are first populated for
    /// reading (`MADV_POPULATE_READ`: untouched pages map the shared zero
    /// page, nothing is allocated), since protection needs a page table
    /// entry to sit in. Shmem and hugetlbfs keep the protection of an
    /// unpopulated page in the page table on any kernel that can protect
    /// them at all. On error nothing stays registered or protected.
    pub fn protect(
        uffd: Arc<Uffd>,
        mem: Arc<GuestMemoryMmap>,
        blocks: Arc<RamBlocks>,
    ) -> Result<BackgroundSnapshot> {
        let map = HostMap::new(&mem, &blocks)?;
        let os = |what| move |source| Error::from(SnapshotError::Os { what, source });
        let exit = EventFd::new(EFD_NONBLOCK).map_err(os("creating the fault thread's eventfd"))?;
        let thread_exit = exit
            .try_clone()
            .map_err(os("duplicating the fault thread's eventfd"))?;
        let max_page = u64::from(blocks.max_page_size().max(1));
        let (tx, rx) = mpsc::sync_channel((QUEUE_BYTES / max_page).max(4) as usize);
        let shared = Arc::new(Shared {
            captured: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            uffd,
            mem,
            blocks,
            map,
        });
        let mut snap = BackgroundSnapshot {
            shared,
            queue: Some(rx),
            exit,
            thread: None,
            stalls: Vec::new(),
            released: false,
            populated: false,
        };
        // From here on, dropping `snap` undoes whatever was done.
        snap.register_and_protect()?;
        let thread = FaultThread {
            shared: Arc::clone(&snap.shared),
            queue: tx,
            exit: thread_exit,
            events: EventBuf::new(FAULT_BATCH),
            stalls: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("snapshot-fault".into())
            .spawn(move || thread.run())
            .map_err(os("starting the fault thread"))?;
        snap.thread = Some(handle);
        Ok(snap)
    }

    fn register_and_protect(&mut self) -> Result<()> {
        let s = &self.shared;
        let unpopulated = s.uffd.features().contains(Features::WP_UNPOPULATED);
        for (b, &host) in s.blocks.iter().zip(s.map.starts()) {
            let ioctls = s
                .uffd
                .register(host, b.size(), RegisterMode::WP)
                .map_err(Shared::memory_error(b, "UFFDIO_REGISTER(WP)", 0, b.size()))?;
            if !ioctls.contains(Ioctls::WRITEPROTECT) {
                return Err(SnapshotError::BlockUnsupported {
                    name: b.name().to_owned(),
                    memory: "registered for WP faults".into(),
                    missing: format!("UFFDIO_WRITEPROTECT not offered (only {ioctls})"),
                    source: None,
                }
                .into());
            }
            if !unpopulated && block_backing(&s.mem, b)?.kind == MemoryKind::Anonymous {
                let len = usize::try_from(b.size()).unwrap_or(usize::MAX);
                uffd_sys::populate_guest(&s.mem, b.guest_addr(), len, uffd_sys::Populate::Read)
                    .map_err(Shared::memory_error(
                        b,
                        "madvise(MADV_POPULATE_READ)",
                        0,
                        b.size(),
                    ))?;
                self.populated = true;
            }
        }
        for (b, &host) in s.blocks.iter().zip(s.map.starts()) {
            s.uffd
                .write_protect(host, b.size())
                .map_err(Shared::memory_error(b, "UFFDIO_WRITEPROTECT", 0, b.size()))?;
        }
        Ok(())
    }

    /// Whether never-touched pages had to be populated for reading before
    /// protection (the kernel lacks `WP_UNPOPULATED`).
    pub fn populated_first(&self) -> bool {
        self.populated
    }

    /// Saves every page once into `sink`: pages captured on write faults
    /// first, then block after block in page order, the scan under
    /// `params`' `max_bandwidth` (0: unlimited; captured pages are never
    /// held back by it). `stats` counts pages and bytes as they go
    /// (`remaining` is the bytes not saved yet). Raising `cancel` ends it
    /// with [`Error::Cancelled`] at the next chunk.
    ///
    /// Protection stays on pages not saved yet after an error: call
    /// [`release`](BackgroundSnapshot::release) (or drop the snapshot).
    pub fn save(
        &mut self,
        sink: &mut dyn SnapshotSink,
        params: &Params,
        cancel: &AtomicBool,
        stats: &RamStats,
    ) -> Result<SnapshotOutcome> {
        if self.released {
            return Err(Error::InvalidState {
                op: "save",
                state: "released",
            });
        }
        let queue = self.queue.take().ok_or(Error::InvalidState {
            op: "save",
            state: "saved",
        })?;
        let shared = Arc::clone(&self.shared);
        let total = shared.blocks.total_bytes();
        stats.set_phase(Phase::Precopy);
        stats.set_total(total);
        stats.set_remaining(total);
        let mut out = SnapshotOutcome::default();
        let mut saver = Saver {
            shared: &shared,
            sink,
            stats,
            out: &mut out,
            remaining: total,
        };
        let result = saver.scan(&queue, params, cancel).and_then(|()| {
            // Every page is captured: whatever the fault thread still holds
            // comes through the queue until it ends.
            self.stop_thread()?;
            while let Ok(c) = queue.recv() {
                saver.write_captured(c)?;
            }
            saver.sink.flush()
        });
        // A fault thread that waits on a full queue must not wait forever.
        drop(queue);
        result?;
        if let Some(e) = shared.take_error() {
            return Err(e);
        }
        self.check_complete()?;
        out.fault_pages = shared.counters.fault_pages.load(Ordering::Relaxed);
        Ok(out)
    }

    fn check_complete(&self) -> Result<()> {
        let s = &self.shared;
        let missing: u64 = s
            .blocks
            .iter()
            .zip(&s.captured)
            .map(|(b, c)| b.pages() - c.count())
            .sum();
        if missing == 0 {
            return Ok(());
        }
        let (name, page) = s
            .blocks
            .iter()
            .zip(&s.captured)
            .find_map(|(b, c)| {
                (0..b.pages())
                    .find(|&p| !c.test(p))
                    .map(|p| (b.name().to_owned(), p))
            })
            .unwrap_or_default();
        Err(SnapshotError::Unsaved {
            missing,
            name,
            page,
        }
        .into())
    }

    /// Asks the fault thread to end and joins it, keeping its stall samples.
    fn stop_thread(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.shared.stop.store(true, Ordering::Release);
        if let Err(source) = self.exit.write(1) {
            // Without the wake-up the thread would never return: leave it
            // rather than hang in join.
            log::error!("background snapshot: cannot wake the fault thread; it is left running");
            return Err(SnapshotError::Os {
                what: "waking the fault thread",
                source,
            }
            .into());
        }
        match thread.join() {
            Ok(stalls) => self.stalls = stalls,
            Err(_) => log::error!("background snapshot: the fault thread panicked"),
        }
        Ok(())
    }

    /// What write faults have cost so far (complete once the save ended or
    /// the snapshot was released: the stall figures come from the fault
    /// thread when it ends).
    pub fn fault_stats(&self) -> WriteFaultStats {
        let c = &self.shared.counters;
        let mut sorted = self.stalls.clone();
        sorted.sort_unstable();
        let pct = |p: usize| {
            if sorted.is_empty() {
                0
            } else {
                u64::from(sorted[(sorted.len() - 1) * p / 100])
            }
        };
        let mut histogram = vec![0u64; LATENCY_BUCKETS];
        for &us in &sorted {
            histogram[latency_bucket(u64::from(us))] += 1;
        }
        WriteFaultStats {
            faults: c.faults.load(Ordering::Relaxed),
            fault_pages: c.fault_pages.load(Ordering::Relaxed),
            late_faults: c.late.load(Ordering::Relaxed),
            stall_p50_us: pct(50),
            stall_p99_us: pct(99),
            stall_max_us: sorted.last().map_or(0, |&m| u64::from(m)),
            stall_histogram: histogram,
        }
    }

    /// Pages of `blocks` saved so far.
    pub fn saved_pages(&self) -> u64 {
        self.shared.captured.iter().map(DirtyBitmap::count).sum()
    }

    /// Ends the snapshot, whatever state it is in: removes write protection
    /// from every block (waking every writer still waiting), stops and joins
    /// the fault thread, and unregisters the blocks. Every step runs; the
    /// first error is returned. Runs once; dropping the snapshot runs it too.
    pub fn release(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.released, true) {
            return Ok(());
        }
        // A fault thread blocked on a full queue gets an error and ends.
        self.queue = None;
        let s = Arc::clone(&self.shared);
        let mut first: Option<Error> = None;
        for (b, &host) in s.blocks.iter().zip(s.map.starts()) {
            // A block that was never registered (protect failed part way)
            // answers with an error here, which is fine then.
            let r = s.uffd.write_unprotect(host, b.size(), Wake::Yes);
            if let Err(source) = r {
                if self.thread.is_some() {
                    first.get_or_insert(
                        SnapshotError::Memory {
                            op: "UFFDIO_WRITEPROTECT(off)",
                            name: b.name().to_owned(),
                            offset: 0,
                            len: b.size(),
                            source,
                        }
                        .into(),
                    );
                }
            }
        }
        if let Err(e) = self.stop_thread() {
            first.get_or_insert(e);
        }
        for (b, &host) in s.blocks.iter().zip(s.map.starts()) {
            if let Err(source) = s.uffd.unregister(host, b.size()) {
                log::debug!(
                    "background snapshot: unregistering RAM block {:?}: {source}",
                    b.name()
                );
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for BackgroundSnapshot {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::error!("background snapshot: releasing write protection: {e}");
        }
    }
}

/// The scan's side of [`BackgroundSnapshot::save`].
struct Saver<'a> {
    shared: &'a Shared,
    sink: &'a mut dyn SnapshotSink,
    stats: &'a RamStats,
    out: &'a mut SnapshotOutcome,
    remaining: u64,
}

impl Saver<'_> {
    fn scan(
        &mut self,
        queue: &Receiver<Captured>,
        params: &Params,
        cancel: &AtomicBool,
    ) -> Result<()> {
        let s = self.shared;
        let max_page = s.blocks.max_page_size();
        let mut buf =
            vec![0u8; (chunk_pages_of(CHUNK_BYTES, max_page) * u64::from(max_page)) as usize];
        let mut limiter = RateLimiter::new();
        for (index, block) in s.blocks.iter().enumerate() {
            let ps = u64::from(block.page_size());
            let per_chunk = chunk_pages_of(CHUNK_BYTES, block.page_size());
            let host = s.map.host(index);
            let mut claimed = vec![false; per_chunk as usize];
            let mut page = 0;
            while page < block.pages() {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                if let Some(e) = s.take_error() {
                    return Err(e);
                }
                self.drain(queue)?;
                let n = per_chunk.min(block.pages() - page);
                let mut count = 0;
                for (i, c) in claimed.iter_mut().enumerate().take(n as usize) {
                    *c = s.captured[index].set(page + i as u64);
                    count += u64::from(*c);
                }
                if count > 0 {
                    let len = (n * ps) as usize;
                    let data = &mut buf[..len];
                    block_read(s, block, page, data)?;
                    // Read: the pages this scan claimed may be written again,
                    // a run of them per call (the whole chunk unless the
                    // fault thread claimed some). A page the fault thread
                    // claimed stays protected until it has read it: a write
                    // let through here could land before that read.
                    let mut i = 0;
                    while i < n as usize {
                        if !claimed[i] {
                            i += 1;
                            continue;
                        }
                        let run = claimed[i..n as usize].iter().take_while(|c| **c).count();
                        let (at, len) = ((page + i as u64) * ps, run as u64 * ps);
                        s.uffd.write_unprotect(host + at, len, Wake::Yes).map_err(
                            Shared::memory_error(block, "UFFDIO_WRITEPROTECT(off)", at, len),
                        )?;
                        i += run;
                    }
                    self.write_claimed(index, block, page, data, &claimed[..n as usize])?;
                    let sink = &mut *self.sink;
                    let stats = self.stats;
                    let out = &mut *self.out;
                    let remaining = &mut self.remaining;
                    limiter.admit(count * ps, Instant::now(), params, cancel, |_| {
                        drain_into(s, queue, sink, stats, out, remaining)
                    })?;
                }
                page += n;
            }
        }
        Ok(())
    }

    /// Writes the pages of a chunk the scan claimed, in runs.
    fn write_claimed(
        &mut self,
        index: usize,
        block: &RamBlock,
        first: u64,
        data: &[u8],
        claimed: &[bool],
    ) -> Result<()> {
        let ps = block.page_size() as usize;
        let mut zero = Vec::with_capacity(claimed.len());
        let mut i = 0;
        while i < claimed.len() {
            if !claimed[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < claimed.len() && claimed[i] {
                i += 1;
            }
            zero.clear();
            zero.extend(data[start * ps..i * ps].chunks_exact(ps).map(is_zero));
            self.account(
                index,
                block,
                first + start as u64,
                &data[start * ps..i * ps],
                &zero,
            )?;
        }
        Ok(())
    }

    fn account(
        &mut self,
        index: usize,
        block: &RamBlock,
        first: u64,
        data: &[u8],
        zero: &[bool],
    ) -> Result<()> {
        account(
            &mut *self.sink,
            self.stats,
            self.out,
            &mut self.remaining,
            (index, block, first, data, zero),
        )
    }

    fn drain(&mut self, queue: &Receiver<Captured>) -> Result<()> {
        drain_into(
            self.shared,
            queue,
            &mut *self.sink,
            self.stats,
            self.out,
            &mut self.remaining,
        )
    }

    fn write_captured(&mut self, c: Captured) -> Result<()> {
        write_captured(
            self.shared,
            &mut *self.sink,
            self.stats,
            self.out,
            &mut self.remaining,
            c,
        )
    }
}

/// Reads `data.len()` bytes of `block` from page `first` on.
fn block_read(s: &Shared, block: &RamBlock, first: u64, data: &mut [u8]) -> Result<()> {
    s.mem
        .read_slice(data, block.page_addr(first))
        .map_err(|source| Error::Memory {
            op: "reading",
            name: block.name().to_owned(),
            offset: first * u64::from(block.page_size()),
            source,
        })
}

/// Writes every page the fault thread has queued.
fn drain_into(
    s: &Shared,
    queue: &Receiver<Captured>,
    sink: &mut dyn SnapshotSink,
    stats: &RamStats,
    out: &mut SnapshotOutcome,
    remaining: &mut u64,
) -> Result<()> {
    loop {
        match queue.try_recv() {
            Ok(c) => write_captured(s, sink, stats, out, remaining, c)?,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return Ok(()),
        }
    }
}

fn write_captured(
    s: &Shared,
    sink: &mut dyn SnapshotSink,
    stats: &RamStats,
    out: &mut SnapshotOutcome,
    remaining: &mut u64,
    c: Captured,
) -> Result<()> {
    let Some(block) = s.blocks.iter().nth(c.index) else {
        return Ok(());
    };
    let zero = [is_zero(&c.data)];
    account(
        sink,
        stats,
        out,
        remaining,
        (c.index, block, c.page, &c.data, &zero),
    )
}

/// Hands a run of pages to the sink and counts it.
fn account(
    sink: &mut dyn SnapshotSink,
    stats: &RamStats,
    out: &mut SnapshotOutcome,
    remaining: &mut u64,
    (index, block, first, data, zero): (usize, &RamBlock, u64, &[u8], &[bool]),
) -> Result<()> {
    // `index` < blocks.len() <= 4096 (the wire format's cap).
    let id = BlockId(u32::try_from(index).unwrap_or(u32::MAX));
    let bytes = sink.write_pages(id, block, first, data, zero)?;
    let n = zero.len() as u64;
    let zeros = zero.iter().filter(|&&z| z).count() as u64;
    let ps = u64::from(block.page_size());
    out.pages += n;
    out.zero_pages += zeros;
    out.bytes += bytes;
    stats.add_zero_pages(zeros);
    stats.add_normal_pages(n - zeros, ps);
    stats.add_transferred(bytes);
    *remaining = remaining.saturating_sub(n * ps);
    stats.set_remaining(*remaining);
    Ok(())
}

/// The fault thread's own state.
struct FaultThread {
    shared: Arc<Shared>,
    queue: SyncSender<Captured>,
    exit: EventFd,
    events: EventBuf,
    /// How long each saved fault's writer waited, in µs.
    stalls: Vec<u32>,
}

impl FaultThread {
    fn run(mut self) -> Vec<u32> {
        // A writer waits while this thread sleeps: run as soon as it wakes.
        if let Err(e) = uffd_sys::sched::prefer_short_slices(uffd_sys::sched::SHORT_SLICE) {
            log::debug!("snapshot fault thread: no short scheduler slice: {e}");
        }
        if let Err(e) = self.serve() {
            self.shared.record(e);
        }
        self.stalls
    }

    fn serve(&mut self) -> Result<()> {
        let (shared, queue, stalls) = (&self.shared, &self.queue, &mut self.stalls);
        serve_events(
            &shared.uffd,
            &self.exit,
            &shared.stop,
            &mut self.events,
            |source| SnapshotError::FaultRead { source }.into(),
            |events| {
                // Two clock reads per batch: every writer of the batch waited
                // about as long as the batch took.
                let start = Instant::now();
                let (saved, more) = Self::handle(shared, queue, events)?;
                let us = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
                stalls.extend(std::iter::repeat_n(us, saved));
                Ok(more)
            },
        )
    }

    /// Handles one batch: returns the pages it saved, and whether the saver
    /// still takes them.
    fn handle(s: &Shared, queue: &SyncSender<Captured>, events: &[Event]) -> Result<(usize, bool)> {
        let (mut faults, mut saved, mut late) = (0u64, 0usize, 0u64);
        let mut more = true;
        for ev in events {
            let Event::PageFault(pf) = ev else {
                continue;
            };
            if pf.kind != FaultKind::WriteProtect {
                continue;
            }
            faults += 1;
            let Some((index, page, page_addr)) = s.map.locate(pf.address) else {
                s.record(SnapshotError::FaultOutside { addr: pf.address }.into());
                continue;
            };
            let Some(block) = s.blocks.iter().nth(index) else {
                continue;
            };
            let ps = u64::from(block.page_size());
            if !s.captured[index].set(page) {
                // The scan has it (and unprotects it once read), or it was
                // saved already and this fault raced with that: a wake-up is
                // harmless either way.
                late += 1;
                let _ = s.uffd.wake(page_addr, ps);
                continue;
            }
            let mut data = vec![0u8; ps as usize];
            let read = block_read(s, block, page, &mut data);
            // Unprotect even if the read failed: a writer must never wait
            // forever (the error fails the snapshot).
            let unprotect =
                s.uffd
                    .write_unprotect(page_addr, ps, Wake::Yes)
                    .map_err(Shared::memory_error(
                        block,
                        "UFFDIO_WRITEPROTECT(off)",
                        page * ps,
                        ps,
                    ));
            read?;
            unprotect?;
            saved += 1;
            if more && queue.send(Captured { index, page, data }).is_err() {
                // The saver is gone (the snapshot was released).
                more = false;
            }
        }
        let c = &s.counters;
        c.faults.fetch_add(faults, Ordering::Relaxed);
        c.fault_pages.fetch_add(saved as u64, Ordering::Relaxed);
        c.late.fetch_add(late, Ordering::Relaxed);
        Ok((saved, more))
    }
}
