//! The fault handler and its placer; see [`FaultHandler`].

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use migration_stream::BlockId;
use uffd_sys::{CopyMode, Event, EventBuf, FaultKind, Ioctls, RegisterMode, Uffd, Wake};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::blocktime::{Blocktime, BlocktimeSnapshot};
use super::PostcopyError;
use crate::bitmap::DirtyBitmap;
use crate::block::{HostMap, RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::placer::{PagePlacer, UffdPlacer};
use crate::GuestMemoryMmap;

/// Faults read at once.
const FAULT_BATCH: usize = 64;

/// How often a local zero page the kernel answers with `EAGAIN` is tried
/// again (as the [`UffdPlacer`] does).
const AGAIN_RETRIES: u32 = 1000;

/// Where the fault thread sends its page requests: the return path to the
/// source, which the VMM's session implements.
///
/// The fault thread calls [`request`](PageRequestSink::request) for each page
/// of a batch of faults, then [`flush`](PageRequestSink::flush) once, so an
/// implementation can buffer the requests of a batch and write them together
/// (consecutive requests in one block can use the return path's short
/// `PageRequest` form). Both run on the fault thread: a call that blocks
/// delays the handling of other faults, including the local ones.
///
/// An error is kept (the first one is returned by
/// [`FaultHandler::finish`]); the page's request is forgotten, so postcopy
/// recovery can ask for it again. A broken link is an error of kind
/// [`ErrorKind::Link`](crate::ErrorKind::Link) (a
/// [`migration_stream::Error`] converts into [`Error::Stream`]).
pub trait PageRequestSink: Send + Sync {
    /// Asks the source for `len` bytes (one whole host page of the block) at
    /// `offset` of block `block`.
    fn request(&self, block: BlockId, offset: u64, len: u64) -> Result<()>;

    /// Sends what [`request`](PageRequestSink::request) buffered.
    fn flush(&self) -> Result<()>;
}

/// What the fault handler has done so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FaultStats {
    /// Missing-page faults read.
    pub faults: u64,
    /// Of those, faults on pages that had to come from the source.
    pub remote_faults: u64,
    /// Pages asked for (one request per host page).
    pub requests: u64,
    /// Faults resolved here with a zero page (pages the copy placer skipped
    /// because they read as zero).
    pub zero_pages: u64,
    /// Faults whose page was already placed when the fault was handled.
    pub late_faults: u64,
    /// Requests the sink refused.
    pub request_errors: u64,
    /// Pages not received yet.
    pub missing_pages: u64,
    /// Blocktime.
    pub blocktime: BlocktimeSnapshot,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    remote: AtomicU64,
    requests: AtomicU64,
    zero: AtomicU64,
    late: AtomicU64,
    request_errors: AtomicU64,
}

/// What the fault thread and the placer share.
struct Shared {
    mem: Arc<GuestMemoryMmap>,
    uffd: Arc<Uffd>,
    blocks: Arc<RamBlocks>,
    /// Where the blocks lie in this process.
    map: HostMap,
    requested: Vec<DirtyBitmap>,
    /// Pages a fault opened a wait on (the placer reads the clock only for
    /// those).
    faulted: Vec<DirtyBitmap>,
    blocktime: Blocktime,
    counters: Counters,
    /// A zero page of the largest page size, for blocks without
    /// `UFFDIO_ZEROPAGE` (hugetlbfs); empty if every block has it. Resident
    /// (see [`resident_zeros`]).
    zeros: Vec<u8>,
    base_page: u64,
    stop: AtomicBool,
    /// The first error of the fault thread or the sink (error paths only).
    error: Mutex<Option<Error>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("blocks", &self.blocks.len())
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Keeps the first error (and logs it); later ones are dropped, so a
    /// broken link does not log once per fault.
    fn record(&self, e: Error) {
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                log::error!("postcopy fault handling: {e}");
                *slot = Some(e);
            }
        }
    }

    fn failed(&self) -> bool {
        self.error.lock().map_or(true, |e| e.is_some())
    }

    /// The index of `block` in the handler's blocks (by identity: a copy of
    /// the list would have other `received` bitmaps).
    fn index_of(&self, block: &RamBlock) -> Result<usize> {
        self.blocks
            .iter()
            .position(|b| std::ptr::eq(b, block))
            .ok_or_else(|| {
                PostcopyError::ForeignBlock {
                    name: block.name().to_owned(),
                }
                .into()
            })
    }

    /// After page `page` of block `index` was placed: closes the waits on it,
    /// if it was faulted on (one atomic test otherwise).
    fn placed(&self, index: usize, page: u64, page_size: u64) {
        // Pairs with the fence of the fault thread (see `handle`): either this
        // sees the faulted bit, or the fault thread sees the received bit.
        fence(Ordering::SeqCst);
        if self.faulted[index].test(page) {
            let addr = self.map.host(index) + page * page_size;
            self.blocktime.close(addr, || self.blocktime.now_ns());
        }
    }

    /// Places a zero page at page `page` of `block`. Returns whether it did
    /// (`false`: the page was already there, and its waiters were woken).
    fn place_zero_here(&self, block: &RamBlock, page: u64) -> Result<bool> {
        let ps = block.page_size() as usize;
        let at = block.page_addr(page);
        let mut tries = 0;
        loop {
            let r = if ps as u64 > self.base_page {
                let zeros = self.zeros.get(..ps).ok_or(Error::PageBuffer {
                    name: block.name().to_owned(),
                    len: self.zeros.len(),
                    page_size: block.page_size(),
                })?;
                self.uffd
                    .copy_to_guest(&self.mem, at, zeros, ps, CopyMode::empty())
            } else {
                self.uffd.zero_guest(&self.mem, at, ps, ps, Wake::Yes)
            };
            match r {
                Ok(_) => return Ok(true),
                // uffd-sys has woken the page's waiters.
                Err(e) if e.is_exists() => return Ok(false),
                Err(e) if e.is_again() && tries < AGAIN_RETRIES => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(source) => {
                    return Err(Error::Uffd {
                        op: if ps as u64 > self.base_page {
                            "UFFDIO_COPY"
                        } else {
                            "UFFDIO_ZEROPAGE"
                        },
                        name: block.name().to_owned(),
                        offset: page * ps as u64,
                        source,
                    })
                }
            }
        }
    }
}

/// A zeroed buffer of `len` bytes whose pages are all mapped.
///
/// `UFFDIO_COPY` into hugetlbfs copies from the source buffer with page faults
/// disabled; where a source page is not mapped yet (a fresh zeroed allocation
/// maps nothing), the kernel falls back to copying through a temporary huge
/// page, which a host with no spare huge page refuses (`ENOMEM`), leaving the
/// faulting thread waiting. Writing every page once maps them for good.
pub(crate) fn resident_zeros(len: usize) -> Vec<u8> {
    let mut v = vec![1u8; len];
    // The writes above must happen (an allocation that is only ever zeroed
    // could become a fresh zeroed one, with nothing mapped).
    std::hint::black_box(&mut v);
    v.fill(0);
    v
}

/// The loop of a thread that serves userfaultfd events (the postcopy fault
/// thread, the snapshot saver's): waits on `uffd` and the `exit` eventfd,
/// returns once `exit` fired with `stop` set; reads events in batches and
/// hands each to `handle`, which returns whether to go on. A batch that did
/// not fill `events` emptied the queue (a fault that came since makes the
/// next wait return at once), so the thread sleeps right after it handled
/// it, with no read that finds nothing: what it sent on a vCPU's behalf is
/// not kept waiting for its CPU.
pub(crate) fn serve_events(
    uffd: &Uffd,
    exit: &EventFd,
    stop: &AtomicBool,
    events: &mut EventBuf,
    read_err: impl Fn(uffd_sys::Error) -> Error,
    mut handle: impl FnMut(&[Event]) -> Result<bool>,
) -> Result<()> {
    let capacity = events.capacity();
    loop {
        let ready = uffd.wait_readable_or(exit, None).map_err(&read_err)?;
        if ready.other {
            // Consume the wake-up; a spurious one (nothing to read) is fine.
            let _ = exit.read();
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
        }
        if !ready.uffd {
            continue;
        }
        loop {
            let batch = uffd.read_events(events).map_err(&read_err)?;
            if batch.is_empty() {
                break;
            }
            let full = batch.len() >= capacity;
            if !handle(batch)? {
                return Ok(());
            }
            if !full {
                break;
            }
        }
    }
}

/// The fault thread's own state.
struct FaultThread {
    shared: Arc<Shared>,
    sink: Arc<dyn PageRequestSink>,
    exit: EventFd,
    events: EventBuf,
    cursor: usize,
}

impl FaultThread {
    fn run(mut self) {
        // A vCPU waits while this thread sleeps: run as soon as it wakes.
        if let Err(e) = uffd_sys::sched::prefer_short_slices(uffd_sys::sched::SHORT_SLICE) {
            log::debug!("postcopy fault thread: no short scheduler slice: {e}");
        }
        if let Err(e) = self.serve() {
            self.shared.record(e);
        }
    }

    fn serve(&mut self) -> Result<()> {
        let (shared, sink, cursor) = (&self.shared, &*self.sink, &mut self.cursor);
        serve_events(
            &shared.uffd,
            &self.exit,
            &shared.stop,
            &mut self.events,
            |source| PostcopyError::FaultRead { source }.into(),
            |events| {
                Self::handle(shared, sink, cursor, events);
                Ok(true)
            },
        )
    }

    /// Handles one batch of events.
    fn handle(shared: &Shared, sink: &dyn PageRequestSink, cursor: &mut usize, events: &[Event]) {
        let bt = &shared.blocktime;
        // One clock read per batch: when these faults were read.
        let now = bt.now_ns();
        let (mut faults, mut remote, mut requests, mut zero, mut late, mut errors) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for ev in events {
            let Event::PageFault(pf) = ev else {
                continue;
            };
            if pf.kind != FaultKind::Missing {
                continue;
            }
            faults += 1;
            let Some((index, page, page_addr)) = shared.map.locate(pf.address) else {
                shared.record(PostcopyError::FaultOutside { addr: pf.address }.into());
                continue;
            };
            // `index` < blocks.len() <= 4096 (the wire format's cap).
            let id = BlockId(u32::try_from(index).unwrap_or(u32::MAX));
            let Some(block) = shared.blocks.get(id) else {
                continue;
            };
            if block.received().test(page) {
                // Received, yet missing: a zero page the copy placer skipped.
                match shared.place_zero_here(block, page) {
                    Ok(true) => zero += 1,
                    Ok(false) => late += 1,
                    Err(e) => shared.record(e),
                }
                continue;
            }
            remote += 1;
            bt.open(page_addr, pf.thread_id, now, cursor);
            shared.faulted[index].set(page);
            // Pairs with the fence of `Shared::placed`.
            fence(Ordering::SeqCst);
            if block.received().test(page) {
                // Placed meanwhile (its placement woke the thread); its placer
                // may have looked before the wait was open.
                bt.close(page_addr, || bt.now_ns());
                continue;
            }
            if shared.requested[index].set(page) {
                let ps = u64::from(block.page_size());
                match sink.request(id, page * ps, ps) {
                    Ok(()) => requests += 1,
                    Err(e) => {
                        shared.requested[index].clear(page);
                        errors += 1;
                        shared.record(e);
                    }
                }
            }
        }
        if requests > 0 {
            if let Err(e) = sink.flush() {
                errors += 1;
                shared.record(e);
            }
        }
        let c = &shared.counters;
        for (counter, n) in [
            (&c.faults, faults),
            (&c.remote, remote),
            (&c.requests, requests),
            (&c.zero, zero),
            (&c.late, late),
            (&c.request_errors, errors),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// The placer the loader uses from `Listen` on: a [`UffdPlacer`] that also
/// closes the waits of the threads that faulted on the page it places.
#[derive(Debug)]
struct PostcopyPlacer {
    inner: UffdPlacer,
    shared: Arc<Shared>,
}

impl PagePlacer for PostcopyPlacer {
    fn place(&self, block: &RamBlock, page: u64, data: &[u8]) -> Result<()> {
        let index = self.shared.index_of(block)?;
        self.inner.place(block, page, data)?;
        self.shared
            .placed(index, page, u64::from(block.page_size()));
        Ok(())
    }

    fn place_run(&self, block: &RamBlock, first: u64, data: &[u8]) -> Result<()> {
        let index = self.shared.index_of(block)?;
        self.inner.place_run(block, first, data)?;
        let ps = u64::from(block.page_size());
        for page in first..first + data.len() as u64 / ps {
            self.shared.placed(index, page, ps);
        }
        Ok(())
    }

    fn place_zero(&self, block: &RamBlock, page: u64) -> Result<()> {
        let index = self.shared.index_of(block)?;
        let ps = u64::from(block.page_size());
        if ps > self.shared.base_page {
            // A copy of zeros from this handler's resident buffer (see
            // `resident_zeros`), rather than the inner placer's.
            if page >= block.pages() {
                return Err(Error::PageOutOfRange {
                    name: block.name().to_owned(),
                    page,
                    pages: block.pages(),
                });
            }
            self.shared.place_zero_here(block, page)?;
            block.received().set(page);
        } else {
            self.inner.place_zero(block, page)?;
        }
        self.shared.placed(index, page, ps);
        Ok(())
    }
}

/// The destination's postcopy fault handling, from `Listen` to `Complete`.
///
/// [`start`](FaultHandler::start) registers every block for MISSING faults
/// and starts the fault thread; the loader places pages through
/// [`placer`](FaultHandler::placer) from then on;
/// [`finish`](FaultHandler::finish) (or dropping the handler) unregisters the
/// blocks, stops the thread and joins it.
///
/// ```text
///  vCPU / VMM thread            fault thread                    loader (main or preempt channel)
///  -----------------            ------------                    --------------------------------
///  touches a missing page
///  (blocks in the kernel) --->  reads a batch of faults
///                               per fault: block and host page
///                               received bit set?
///                                 yes: UFFDIO_ZEROPAGE here
///                                      (a zero page the copy
///                                      placer skipped) --------> thread runs
///                                 no:  open a wait (blocktime);
///                                      requested bit newly set?
///                                        request(block, offset, len)
///                               flush() once per batch  - - - >  source sends the page
///                                                                placer(): UFFDIO_COPY, received bit,
///  thread runs  <------------------------------------------------  close the waits on it
/// ```
///
/// The `received` bitmaps of the blocks are the single record of what
/// landed: the loader's placer sets them (the [`CopyPlacer`] during precopy,
/// this handler's placer from `Listen` on), a discard clears them. A page
/// whose bit is set and that still faults as missing is one the
/// [`CopyPlacer`] left unwritten because it already read as zero (nothing was
/// allocated); it must read as zero, so the fault thread places a zero page
/// itself, without asking the source. Every other missing page is asked for
/// once: a `requested` bitmap per block remembers which pages were, so a
/// second thread faulting on the same page, or the same thread again, adds
/// no second request.
///
/// [`CopyPlacer`]: crate::CopyPlacer
#[derive(Debug)]
pub struct FaultHandler {
    shared: Arc<Shared>,
    placer: Arc<PostcopyPlacer>,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
    torn_down: bool,
}

impl FaultHandler {
    /// Registers every block of `blocks` (which must lie in `mem`) with `uffd`
    /// for MISSING faults and starts the fault thread, which sends page
    /// requests to `sink`. `vcpu_tids` are the vCPU threads' ids, by vCPU
    /// index (0 where unknown), for blocktime.
    ///
    /// `uffd` must have the features the blocks' memory needs
    /// ([`check_support`](super::check_support) opens one), and `blocks` must
    /// be the very list the loader places into (its
    /// [`blocks_arc`](crate::PrecopyLoader::blocks_arc)): their `received`
    /// bitmaps say which pages are there. On error nothing stays registered.
    pub fn start(
        uffd: Arc<Uffd>,
        mem: Arc<GuestMemoryMmap>,
        blocks: Arc<RamBlocks>,
        sink: Arc<dyn PageRequestSink>,
        vcpu_tids: Vec<u32>,
    ) -> Result<FaultHandler> {
        let map = HostMap::new(&mem, &blocks)?;
        let base_page = uffd_sys::mapping::host_page_size() as u64;
        let largest = u64::from(blocks.max_page_size());
        let zeros = if largest > base_page {
            resident_zeros(usize::try_from(largest).unwrap_or(0))
        } else {
            Vec::new()
        };
        let os = |what| move |source| Error::from(PostcopyError::Os { what, source });
        let exit = EventFd::new(EFD_NONBLOCK).map_err(os("creating the fault thread's eventfd"))?;
        let thread_exit = exit
            .try_clone()
            .map_err(os("duplicating the fault thread's eventfd"))?;
        let shared = Arc::new(Shared {
            requested: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
            faulted: blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect(),
            blocktime: Blocktime::new(&vcpu_tids),
            counters: Counters::default(),
            zeros,
            base_page,
            map,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            uffd: Arc::clone(&uffd),
            mem: Arc::clone(&mem),
            blocks: Arc::clone(&blocks),
        });
        let placer = Arc::new(PostcopyPlacer {
            inner: UffdPlacer::new(mem, uffd, &blocks),
            shared: Arc::clone(&shared),
        });
        let mut handler = FaultHandler {
            shared,
            placer,
            exit,
            thread: None,
            torn_down: false,
        };
        // From here on, dropping `handler` unregisters what was registered.
        handler.register()?;
        let thread = FaultThread {
            shared: Arc::clone(&handler.shared),
            sink,
            exit: thread_exit,
            events: EventBuf::new(FAULT_BATCH),
            cursor: 0,
        };
        let handle = std::thread::Builder::new()
            .name("postcopy-fault".into())
            .spawn(move || thread.run())
            .map_err(os("starting the fault thread"))?;
        handler.thread = Some(handle);
        Ok(handler)
    }

    fn register(&mut self) -> Result<()> {
        let s = &self.shared;
        for (b, &host) in s.blocks.iter().zip(s.map.starts()) {
            let ioctls = s
                .uffd
                .register(host, b.size(), RegisterMode::MISSING)
                .map_err(|source| PostcopyError::Memory {
                    op: "UFFDIO_REGISTER(MISSING)",
                    name: b.name().to_owned(),
                    offset: 0,
                    len: b.size(),
                    source,
                })?;
            if !ioctls.contains(Ioctls::COPY | Ioctls::WAKE) {
                return Err(PostcopyError::BlockUnsupported {
                    name: b.name().to_owned(),
                    memory: "registered for MISSING faults".into(),
                    missing: format!("UFFDIO_COPY or UFFDIO_WAKE not offered (only {ioctls})"),
                    source: None,
                }
                .into());
            }
        }
        Ok(())
    }

    /// The placer the loader must use from `Listen` on (see
    /// [`PrecopyLoader::set_placer`](crate::PrecopyLoader::set_placer)): it
    /// places whole pages atomically with `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`
    /// (a zeroed copy on hugetlbfs), waking the threads waiting on them, and
    /// closes their waits. It refuses a block that is not one of the
    /// handler's ([`PostcopyError::ForeignBlock`]). After
    /// [`finish`](FaultHandler::finish) the blocks are no longer registered
    /// and it fails.
    pub fn placer(&self) -> Arc<dyn PagePlacer> {
        self.placer.clone()
    }

    /// Pages not received yet, over all blocks.
    pub fn missing_pages(&self) -> u64 {
        self.shared
            .blocks
            .iter()
            .map(|b| b.pages() - b.received().count())
            .sum()
    }

    /// Whether the fault thread or the sink has failed (the error is
    /// returned by [`finish`](FaultHandler::finish)).
    pub fn failed(&self) -> bool {
        self.shared.failed()
    }

    /// The first error of the fault thread or the sink, with its sources, as
    /// an operator reads it (for a status report while postcopy runs;
    /// [`finish`](FaultHandler::finish) returns it typed).
    pub fn error_text(&self) -> Option<String> {
        let guard = self.shared.error.lock().ok()?;
        let e: &dyn std::error::Error = guard.as_ref()?;
        let mut text = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cur = c.source();
        }
        Some(text)
    }

    /// What the handler has done so far.
    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            faults: load(&c.faults),
            remote_faults: load(&c.remote),
            requests: load(&c.requests),
            zero_pages: load(&c.zero),
            late_faults: load(&c.late),
            request_errors: load(&c.request_errors),
            missing_pages: self.missing_pages(),
            blocktime: self.shared.blocktime.snapshot(),
        }
    }

    /// Ends fault handling (the source sent `Complete` and the loader placed
    /// everything before it): unregisters the blocks (threads still waiting
    /// are woken and fault normally), stops the fault thread and joins it.
    /// Returns the final figures, or the first error of the fault thread or
    /// the sink, or [`PostcopyError::Incomplete`] if pages never arrived
    /// (they now read as zero). Everything is torn down in every case.
    pub fn finish(mut self) -> Result<FaultStats> {
        let first_missing = self.shared.blocks.iter().find_map(|b| {
            let missing = b.pages() - b.received().count();
            (missing > 0).then(|| {
                let page = (0..b.pages()).find(|&p| !b.received().test(p)).unwrap_or(0);
                (b.name().to_owned(), page)
            })
        });
        let missing = self.missing_pages();
        let teardown = self.teardown();
        let stats = self.stats();
        let error = self.shared.error.lock().ok().and_then(|mut e| e.take());
        if let Some(e) = error {
            return Err(e);
        }
        teardown?;
        if let Some((name, page)) = first_missing {
            return Err(PostcopyError::Incomplete {
                missing,
                name,
                page,
            }
            .into());
        }
        Ok(stats)
    }

    /// Unregisters every block, stops the thread and joins it. Returns the
    /// first unregistration error; runs once.
    fn teardown(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        let s = &self.shared;
        let mut first = None;
        for (b, &host) in s.blocks.iter().zip(s.map.starts()) {
            // A block that was never registered (start failed part way) gives
            // EINVAL or ENOENT here, which is fine.
            if let Err(source) = s.uffd.unregister(host, b.size()) {
                if self.thread.is_some() {
                    first.get_or_insert(Error::from(PostcopyError::Memory {
                        op: "UFFDIO_UNREGISTER",
                        name: b.name().to_owned(),
                        offset: 0,
                        len: b.size(),
                        source,
                    }));
                }
            }
        }
        if let Some(thread) = self.thread.take() {
            s.stop.store(true, Ordering::Release);
            if let Err(source) = self.exit.write(1) {
                // Without the wake-up the thread would never return: fail loudly
                // rather than hang in join.
                first.get_or_insert(
                    PostcopyError::Os {
                        what: "waking the fault thread",
                        source,
                    }
                    .into(),
                );
                log::error!("postcopy: cannot wake the fault thread; it is left running");
                return first.map_or(Ok(()), Err);
            }
            if thread.join().is_err() {
                log::error!("postcopy: the fault thread panicked");
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            log::error!("postcopy: ending fault handling: {e}");
        }
    }
}
