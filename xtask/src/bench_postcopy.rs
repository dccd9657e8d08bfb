//! `postcopy.remote_fault_*` figures of `cargo xtask bench`: how long a thread that
//! touches a page still at the source waits, through the real stack, against the floor
//! of what such a wait must cost, side by side in one run.
//!
//! **Measured path.** A source and a destination in this process, over a loopback TCP
//! connection of `migration-stream`'s transport (the source's main channel keeps
//! Nagle, the destination's end sets `TCP_NODELAY`, as between two VMMs), built from
//! the public API only:
//!
//! ```text
//!  source                                     destination
//!  ------                                     -----------
//!  PrecopySaver: setup, start_postcopy        PrecopyLoader reads the stream; at Listen,
//!  (nothing sent before: every page            PostcopyIncoming::listen registers guest RAM
//!  missing), Listen, postcopy_send with        and starts the fault thread; the loader
//!  the background stream paused               places pages through its UFFDIO_COPY placer
//!  return-path thread: PageRequest ->         fault thread: a request per faulting page,
//!    PageRequester::request_range               on the return path (a PageRequestSink)
//!                                             toucher: reads one page, then the next
//! ```
//!
//! The toucher reads the clock, reads a word of a page that has not arrived, and reads
//! the clock again: one sample is the whole remote fault, from the fault through the
//! fault thread, the request on the return path, the source's return-path thread and
//! saver, the page on the main channel and the loader's `UFFDIO_COPY`, to the toucher
//! running again. With the background stream paused
//! ([`Params::set_postcopy_background_paused`](migration_ram::Params::set_postcopy_background_paused))
//! the source sends only requested pages, so nothing else is on the link; the run
//! checks that the source sent exactly one page per fault meanwhile, and that every
//! word read equals the source's. Then the pause is lifted, the rest of RAM follows,
//! and the destination must equal the source.
//!
//! **Floor.** One thread writes a message of the size of a page request (as the return
//! path encodes it) on a loopback TCP connection (`TCP_NODELAY` both ways), an echo
//! thread answers with a message of the size of a page record (as the stream encodes
//! it), and the first thread copies the page into a registered, missing page with one
//! `UFFDIO_COPY`. No fault, no extra thread: what any remote fault must at least pay.
//!
//! **With background traffic.** A third kind of round leaves the background stream
//! on: the toucher faults while the rest of RAM goes at full speed on the same
//! connection, so a requested page waits behind whatever the socket buffers hold.
//! The reads of pages that had landed are told from the faults by count: a round
//! with `n` requests had `n` faults, its `n` slowest reads. Its p50 is shown against
//! the p50 without traffic.
//!
//! **With postcopy preempt.** The same rounds, paused and with background traffic,
//! with the source's return-path thread sending each requested page itself on a
//! second connection ([`PreemptSender`]) and a loader thread of its own placing
//! them at the destination (`PrecopyLoader::load_preempt`), as the session does
//! with `postcopy-preempt`: no hand-over to the saver thread, and no queue behind
//! the background stream. Its readahead is off here (one page per fault, as the count
//! check wants): it sends pages after the requested one, which does not change
//! when that one lands.
//!
//! Rounds alternate measured and floor; the samples of all rounds are pooled, and each
//! figure is a percentile of the measured samples with the same percentile of the floor
//! as its baseline.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use migration_ram::postcopy::{PageRequestSink, PostcopyIncoming};
use migration_ram::vm_memory::{Bytes, GuestAddress};
use migration_ram::{
    GuestMemoryMmap, PrecopyLoader, PrecopyParams, PrecopySaver, PreemptSender, RamBlocks,
    RamStats, SharedParams, VmmDirtyLog,
};
use migration_stream::{
    connect, BlockId, BoxedWriter, Command, Listener, Record, ReturnMessage, ReturnPathReader,
    ReturnPathWriter, Role, StreamReader, StreamWriter,
};
use uffd_sys::{CopyMode, Mapping, MemoryKind, RegisterMode, Uffd};

use crate::bench::{Figure, Report};

/// Guest page size.
const PAGE: u64 = 4096;
/// Guest memory of each round: 64 MiB.
const MEM: u64 = 64 << 20;
/// Faults timed per round.
const FAULTS: u64 = 2000;
/// Rounds of each path.
const ROUNDS: usize = 5;
/// Pages apart the toucher's pages are (a prime, so it visits FAULTS distinct pages).
const STRIDE: u64 = 7919;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// The word the source holds at `addr` (every page non-zero, every word distinct).
fn word(addr: u64) -> u64 {
    addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn source_memory() -> Result<Arc<GuestMemoryMmap>, String> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).map_err(e)?;
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..MEM).step_by(buf.len()) {
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word(off + i as u64 * 8).to_le_bytes());
        }
        mem.write_slice(&buf, GuestAddress(off)).map_err(e)?;
    }
    Ok(Arc::new(mem))
}

fn blocks(mem: &GuestMemoryMmap) -> Result<Arc<RamBlocks>, String> {
    Ok(Arc::new(
        RamBlocks::from_guest_memory(mem, &["pc.ram"]).map_err(e)?,
    ))
}

/// The page the toucher reads `i`-th.
fn touched_page(i: u64) -> u64 {
    (i * STRIDE) % (MEM / PAGE)
}

/// Bytes of a page request and of a page record on the wire, as they go once the
/// block was named (every request and page after the first).
fn message_sizes() -> Result<(usize, usize), String> {
    let req = |offset| ReturnMessage::PageRequest {
        block: BlockId(0),
        offset,
        len: PAGE,
    };
    let mut rp = ReturnPathWriter::new(Vec::new());
    rp.write_message(&req(0)).map_err(e)?;
    rp.flush().map_err(e)?;
    let first = rp.get_ref().len();
    rp.write_message(&req(PAGE)).map_err(e)?;
    let request = rp.into_inner().map_err(e)?.len() - first;
    let page = vec![0xa5u8; PAGE as usize];
    let mut w = StreamWriter::new(std::io::sink());
    w.write_page(BlockId(0), 0, &page).map_err(e)?;
    let first = w.bytes_written();
    w.write_page(BlockId(0), PAGE, &page).map_err(e)?;
    let record = w.bytes_written() - first;
    Ok((request, usize::try_from(record).map_err(e)?))
}

/// Page requests of the fault thread, on the shared return path.
struct Sink(Arc<Mutex<ReturnPathWriter<BoxedWriter>>>);

impl PageRequestSink for Sink {
    fn request(&self, block: BlockId, offset: u64, len: u64) -> migration_ram::Result<()> {
        let mut rp = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rp.write_message(&ReturnMessage::PageRequest { block, offset, len })?;
        Ok(())
    }

    fn flush(&self) -> migration_ram::Result<()> {
        let mut rp = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rp.flush()?;
        Ok(())
    }
}

/// The destination: loads the stream, starts fault handling at `Listen` (then says so
/// on `listening`), ends it at `Complete`, answers `Shut`. Returns the pages the fault
/// thread asked for.
fn destination(
    listener: Listener,
    mem: Arc<GuestMemoryMmap>,
    listening: mpsc::Sender<()>,
    path: RequestPath,
) -> Result<u64, String> {
    let conn = listener.accept().map_err(e)?;
    // The preempt channel is the second connection.
    let mut preempt = match path {
        RequestPath::Queue => None,
        RequestPath::Preempt => Some(listener.accept().map_err(e)?),
    };
    // As the session does for postcopy without preempt: a bounded backlog, so
    // a requested page does not queue behind megabytes of background pages.
    if path == RequestPath::Queue {
        conn.handle
            .limit_backlog(migration_stream::POSTCOPY_BACKLOG)
            .map_err(e)?;
    }
    let blocks = blocks(&mem)?;
    let mut pc = PostcopyIncoming::new(Arc::clone(&mem), Arc::clone(&blocks)).map_err(e)?;
    let mut loader = PrecopyLoader::new(Arc::clone(&mem), blocks, Arc::new(RamStats::new()));
    let rp = Arc::new(Mutex::new(ReturnPathWriter::new(conn.writer)));
    let mut r = StreamReader::new(conn.reader);
    std::thread::scope(|s| -> Result<(), String> {
        let mut preempt_thread = None;
        loop {
            match loader.load(&mut r).map_err(e)? {
                Record::Command(Command::Listen) => {
                    let sink: Arc<dyn PageRequestSink> = Arc::new(Sink(Arc::clone(&rp)));
                    loader.set_placer(pc.listen(sink, Vec::new(), None).map_err(e)?);
                    if let Some(conn) = preempt.take() {
                        let mut pl = loader.preempt_loader();
                        preempt_thread = Some(s.spawn(move || {
                            // As the session's preempt loader.
                            let _ =
                                uffd_sys::sched::prefer_short_slices(uffd_sys::sched::SHORT_SLICE);
                            pl.load_preempt(&mut StreamReader::new(conn.reader))
                                .map_err(e)
                        }));
                    }
                    listening.send(()).map_err(e)?;
                }
                Record::Complete => break,
                other => return Err(format!("destination: unexpected {other:?}")),
            }
        }
        if let Some(t) = preempt_thread {
            t.join().map_err(|_| "the preempt loader panicked")??;
        }
        Ok(())
    })?;
    let stats = pc.finish().map_err(e)?;
    rp.lock()
        .map_err(|_| "return path poisoned")?
        .send(&ReturnMessage::Shut { status: 0 })
        .map_err(e)?;
    Ok(stats.requests)
}

/// The toucher: reads a word of each page in turn once fault handling is on, timing
/// each read; checks every word against the source's.
fn toucher(mem: &GuestMemoryMmap, listening: &mpsc::Receiver<()>) -> Result<Vec<u64>, String> {
    listening
        .recv()
        .map_err(|_| "the destination failed before Listen")?;
    let mut samples = Vec::with_capacity(FAULTS as usize);
    for i in 0..FAULTS {
        let addr = touched_page(i) * PAGE + 8 * (i % 512);
        let start = Instant::now();
        let v: u64 = mem.read_obj(GuestAddress(addr)).map_err(e)?;
        let took = start.elapsed();
        if v != word(addr) {
            return Err(format!(
                "the toucher read {v:#x} at {addr:#x}, the source has {:#x}",
                word(addr)
            ));
        }
        samples.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(samples)
}

/// The preempt sender, shared by the source's return-path thread (which serves
/// requests with it) and the saver's thread (which ends it once every page went), as
/// the session shares it.
type SharedSender = Arc<Mutex<Option<PreemptSender<BoxedWriter>>>>;

/// The source's return-path thread: page requests to the saver's requester, or, with
/// a preempt sender, sent on the preempt channel by this thread; until `Shut`.
fn source_return_path(
    reader: migration_stream::BoxedReader,
    blocks: &RamBlocks,
    requester: &migration_ram::PageRequester,
    sender: Option<SharedSender>,
) -> Result<(), String> {
    // As the session's return-path thread.
    let _ = uffd_sys::sched::prefer_short_slices(uffd_sys::sched::SHORT_SLICE);
    let mut rp = ReturnPathReader::new(reader);
    loop {
        match rp.read_message(blocks) {
            Ok(ReturnMessage::PageRequest { block, offset, len }) => {
                match &sender {
                    Some(shared) => {
                        let mut guard = shared.lock().map_err(|_| "sender poisoned")?;
                        // None once finished: every page went.
                        if let Some(sender) = guard.as_mut() {
                            sender.serve(block, offset, len).map_err(e)?;
                        }
                    }
                    None => requester.request_range(block, offset, len).map_err(e)?,
                }
            }
            Ok(ReturnMessage::Shut { status: 0 }) => return Ok(()),
            Ok(other) => return Err(format!("source return path: unexpected {other:?}")),
            Err(err) => {
                let text = err.to_string();
                requester.fail(err.into());
                return Err(format!("source return path: {text}"));
            }
        }
    }
}

/// What one measured round saw.
struct Round {
    samples: Vec<u64>,
    /// Pages the source had sent when the toucher was done.
    sent_while_touching: u64,
    /// Pages the destination asked for.
    requests: u64,
}

/// What else is on the link while the toucher faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// Nothing: the background stream is paused until the toucher is done.
    Paused,
    /// The background stream sends the rest of RAM at full speed meanwhile.
    Background,
}

/// How the source serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestPath {
    /// The return-path thread queues it; the saver sends the page on the main
    /// channel.
    Queue,
    /// `postcopy-preempt`: the return-path thread sends the page itself, on a second
    /// connection.
    Preempt,
}

/// One round of the measured path (see the module documentation).
fn remote_faults(
    src: &Arc<GuestMemoryMmap>,
    traffic: Traffic,
    path: RequestPath,
) -> Result<Round, String> {
    let dst =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).map_err(e)?);
    let listener = Listener::bind_str("tcp:127.0.0.1:0").map_err(e)?;
    let uri = listener.local_uri().clone();
    let params: SharedParams = PrecopyParams {
        max_bandwidth: 0,
        downtime_limit: Duration::from_secs(1),
    }
    .shared();
    params.set_postcopy_background_paused(traffic == Traffic::Paused);
    let stats = Arc::new(RamStats::new());
    let blocks = blocks(src)?;
    let (listening_tx, listening_rx) = mpsc::channel();
    std::thread::scope(|s| -> Result<Round, String> {
        let dst_thread = {
            let dst = Arc::clone(&dst);
            s.spawn(move || destination(listener, dst, listening_tx, path))
        };
        let conn = connect(&uri, Role::Main).map_err(e)?;
        if path == RequestPath::Queue {
            conn.handle
                .limit_backlog(migration_stream::POSTCOPY_BACKLOG)
                .map_err(e)?;
        }
        let preempt = match path {
            RequestPath::Queue => None,
            RequestPath::Preempt => {
                let p = connect(&uri, Role::PostcopyPreempt).map_err(e)?;
                p.handle.set_nodelay(true).map_err(e)?;
                Some(p.writer)
            }
        };
        let mut saver = PrecopySaver::new(
            Arc::clone(src),
            Arc::clone(&blocks),
            Arc::new(VmmDirtyLog::new(Arc::clone(src))),
            Arc::clone(&params),
            Arc::clone(&stats),
            Arc::new(AtomicBool::new(false)),
        );
        let mut w = StreamWriter::new(conn.writer);
        saver.setup(&mut w).map_err(e)?;
        let switch = saver.start_postcopy(&mut w).map_err(e)?;
        if switch.remaining_pages != MEM / PAGE {
            return Err(format!("{} pages to send, not all", switch.remaining_pages));
        }
        let (requester, sender) = match preempt {
            None => (saver.page_requester(), None),
            Some(writer) => {
                let mut sender = saver.preempt_sender(StreamWriter::new(writer));
                // One page per fault: the latency of a remote fault, and the count
                // check below (the session's default readahead would send more).
                sender.set_readahead(0);
                let requester = sender.requester().clone();
                (requester, Some(Arc::new(Mutex::new(Some(sender)))))
            }
        };
        w.write_command(&Command::Listen).map_err(e)?;
        w.flush().map_err(e)?;
        let rp_thread = {
            let blocks = Arc::clone(&blocks);
            let reader = conn.reader;
            let sender = sender.clone();
            s.spawn(move || source_return_path(reader, &blocks, &requester, sender))
        };
        let saver_thread = s.spawn(move || -> Result<(), String> {
            saver.postcopy_send(&mut w).map_err(e)?;
            if let Some(sender) = sender {
                let taken = sender.lock().map_err(|_| "sender poisoned")?.take();
                if let Some(sender) = taken {
                    sender.finish().map_err(e)?;
                }
            }
            w.write_complete().map_err(e)?;
            w.flush().map_err(e)
        });
        let touched = toucher(&dst, &listening_rx);
        // The saver counts a requested page once its flush returned, which may be
        // after the toucher ran on: wait for the count (a hang guard, not a limit).
        let counted = Instant::now();
        while traffic == Traffic::Paused
            && touched.is_ok()
            && stats.snapshot().postcopy_requests < FAULTS
            && counted.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let sent_while_touching = stats.snapshot().normal;
        // The rest of RAM follows, and the migration ends.
        params.set_postcopy_background_paused(false);
        let saved = saver_thread.join().map_err(|_| "the saver panicked")?;
        let requests = dst_thread.join().map_err(|_| "the destination panicked")?;
        let rp = rp_thread.join().map_err(|_| "the return path panicked")?;
        let samples = touched?;
        saved?;
        let requests = requests?;
        rp?;
        if traffic == Traffic::Paused && requests != FAULTS {
            return Err(format!("{requests} page requests for {FAULTS} faults"));
        }
        Ok(Round {
            samples,
            sent_while_touching,
            requests,
        })
    })
    .and_then(|round| {
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        for off in (0..MEM).step_by(a.len()) {
            src.read_slice(&mut a, GuestAddress(off)).map_err(e)?;
            dst.read_slice(&mut b, GuestAddress(off)).map_err(e)?;
            if a != b {
                return Err(format!(
                    "the destination differs at {off:#x} after postcopy"
                ));
            }
        }
        Ok(round)
    })
}

/// An echo thread on a loopback TCP listener (`TCP_NODELAY`): for every
/// `request`-byte message, a `record`-byte answer. Returns its address and handle; it
/// ends when the client closes.
type Echo = (
    std::net::SocketAddr,
    std::thread::JoinHandle<Result<(), String>>,
);

fn echo(request: usize, record: usize) -> Result<Echo, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(e)?;
    let addr = listener.local_addr().map_err(e)?;
    let handle = std::thread::spawn(move || -> Result<(), String> {
        let (mut s, _) = listener.accept().map_err(e)?;
        s.set_nodelay(true).map_err(e)?;
        let mut req = vec![0u8; request];
        let page = vec![0xa5u8; record];
        while s.read_exact(&mut req).is_ok() {
            s.write_all(&page).map_err(e)?;
        }
        Ok(())
    });
    Ok((addr, handle))
}

/// What a floor round times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    /// A round trip and one `UFFDIO_COPY` in one thread: no fault, no wake-up.
    RoundTrip,
    /// A toucher faults; one handler thread reads the fault, makes the round trip and
    /// places the page with `UFFDIO_COPY`, which wakes the toucher: the least any
    /// design with a thread reading faults pays.
    OneHandler,
}

/// One round of a floor: request-sized messages out, page-record-sized messages back,
/// each page placed with one `UFFDIO_COPY` into a missing page.
fn floor(kind: Floor, request: usize, record: usize) -> Result<Vec<u64>, String> {
    let (addr, echo) = echo(request, record)?;
    let result = (|| -> Result<Vec<u64>, String> {
        let mut c = TcpStream::connect(addr).map_err(e)?;
        c.set_nodelay(true).map_err(e)?;
        let uffd = Uffd::new().map_err(e)?;
        let pages = usize::try_from(FAULTS).map_err(e)?;
        let map = Arc::new(Mapping::new(MemoryKind::Anonymous, pages * PAGE as usize).map_err(e)?);
        uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
            .map_err(e)?;
        let req = vec![1u8; request];
        let mut msg = vec![0u8; record];
        let payload = record - PAGE as usize;
        let mut fetch = |at: usize| -> Result<(), String> {
            c.write_all(&req).map_err(e)?;
            c.read_exact(&mut msg).map_err(e)?;
            map.copy_in(&uffd, at, &msg[payload..], CopyMode::empty())
                .map_err(e)?;
            Ok(())
        };
        let samples = match kind {
            Floor::RoundTrip => {
                let mut samples = Vec::with_capacity(pages);
                for i in 0..pages {
                    let start = Instant::now();
                    fetch(i * PAGE as usize)?;
                    samples.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                }
                samples
            }
            Floor::OneHandler => {
                let m = Arc::clone(&map);
                let toucher = std::thread::spawn(move || -> Result<Vec<u64>, String> {
                    let mut samples = Vec::with_capacity(pages);
                    for i in 0..pages {
                        let start = Instant::now();
                        let v = m.load_u8(i * PAGE as usize).map_err(e)?;
                        samples.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        if v != 0xa5 {
                            return Err(format!("the toucher read {v:#x}"));
                        }
                    }
                    Ok(samples)
                });
                let mut events = uffd_sys::EventBuf::new(64);
                let mut placed = 0;
                while placed < pages {
                    if !uffd
                        .wait_readable(Some(Duration::from_secs(60)))
                        .map_err(e)?
                    {
                        return Err("the toucher stopped faulting".into());
                    }
                    for ev in uffd.read_events(&mut events).map_err(e)? {
                        let uffd_sys::Event::PageFault(pf) = ev else {
                            continue;
                        };
                        let off = usize::try_from(pf.address - map.addr()).map_err(e)?;
                        fetch(off - off % PAGE as usize)?;
                        placed += 1;
                    }
                }
                toucher.join().map_err(|_| "the toucher panicked")??
            }
        };
        if map.load_u8((pages - 1) * PAGE as usize).map_err(e)? != 0xa5 {
            return Err("the floor's last page did not land".into());
        }
        Ok(samples)
    })();
    echo.join().map_err(|_| "the echo thread panicked")??;
    result
}

/// The `n` largest of `samples`: with the background stream on, the toucher's reads
/// of pages that had already landed take well under a microsecond and its faults tens
/// of microseconds at least, and each fault made one request, so the `n` slowest
/// reads of a round with `n` requests are its faults.
fn slowest(mut samples: Vec<u64>, n: u64) -> Vec<u64> {
    samples.sort_unstable_by(|a, b| b.cmp(a));
    samples.truncate(usize::try_from(n).unwrap_or(usize::MAX));
    samples
}

/// The `q`-quantile of sorted `v`, in µs.
fn quantile_us(v: &[u64], q: f64) -> f64 {
    let last = v.len().saturating_sub(1);
    let at = ((v.len() as f64 * q) as usize).min(last);
    v.get(at).map_or(0.0, |&ns| ns as f64 / 1000.0)
}

/// The remote fault latency figures against the floor.
pub fn figures() -> Result<Vec<Report>, String> {
    if let Err(err) = Uffd::new() {
        return Ok(vec![Report::Skipped {
            name: "postcopy.remote_fault_*".into(),
            why: format!("userfaultfd unusable: {err} (cargo xtask doctor says more)"),
        }]);
    }
    let (request, record) = message_sizes()?;
    let src = source_memory()?;
    let (mut ours, mut base, mut one) = (Vec::new(), Vec::new(), Vec::new());
    let (mut busy, mut pre, mut pre_busy) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        for (path, paused, busy) in [
            (RequestPath::Queue, &mut ours, &mut busy),
            (RequestPath::Preempt, &mut pre, &mut pre_busy),
        ] {
            let round = remote_faults(&src, Traffic::Paused, path)?;
            if round.sent_while_touching != FAULTS {
                return Err(format!(
                    "round {} ({path:?}): the source sent {} pages while {FAULTS} were asked \
                     for: the background stream was not paused",
                    r + 1,
                    round.sent_while_touching
                ));
            }
            paused.extend(round.samples);
            let round = remote_faults(&src, Traffic::Background, path)?;
            busy.extend(slowest(round.samples, round.requests));
        }
        base.extend(floor(Floor::RoundTrip, request, record)?);
        one.extend(floor(Floor::OneHandler, request, record)?);
    }
    for v in [
        &mut ours,
        &mut base,
        &mut one,
        &mut busy,
        &mut pre,
        &mut pre_busy,
    ] {
        v.sort_unstable();
    }
    let note = format!(
        "remote 4 KiB page faults through the real stack over loopback TCP (fault \
         thread, return path, source request handling, UFFDIO_COPY placer), from the \
         fault to the toucher running again, background stream paused (the source sent \
         exactly the {FAULTS} requested pages per round); baseline: the floor, a loopback \
         TCP round trip of a {request}-byte request and a {record}-byte page record plus \
         one UFFDIO_COPY; {FAULTS} faults x {ROUNDS} rounds each, alternating, pooled"
    );
    let figure = |name: &str, q: f64| -> Report {
        Figure::new(
            format!("postcopy.remote_fault_{name}"),
            quantile_us(&ours, q),
            "us",
        )
        .baseline(quantile_us(&base, q))
        .note(&note)
        .into()
    };
    let one_note = format!(
        "the same remote faults against a design with one thread that reads each fault \
         from the userfaultfd, makes the same TCP round trip and places the page with \
         UFFDIO_COPY, waking the toucher (the least a fault-reading thread pays: the \
         floor plus a fault delivery and a wake-up); {FAULTS} faults x {ROUNDS} rounds, \
         alternating with the others, pooled"
    );
    let busy_note = format!(
        "the same remote faults while the background stream sends the rest of RAM at \
         full speed on the same connection (the requested page queues behind what is \
         already in the socket buffers); a fault is one of the slowest reads, as many \
         as the destination sent requests ({} in {ROUNDS} rounds); baseline: the \
         remote faults without background traffic above",
        busy.len()
    );
    let pre_note = format!(
        "the same remote faults with postcopy-preempt: the source's return-path thread \
         sends each requested page itself on a second connection (TCP_NODELAY), read by \
         a loader thread of its own at the destination; no hand-over to the saver; \
         baseline: the floor as above; {FAULTS} faults x {ROUNDS} rounds, alternating \
         with the others, pooled"
    );
    let pre_figure = |name: &str, q: f64| -> Report {
        Figure::new(
            format!("postcopy.remote_fault_preempt_{name}"),
            quantile_us(&pre, q),
            "us",
        )
        .baseline(quantile_us(&base, q))
        .note(&pre_note)
        .into()
    };
    let pre_busy_note = format!(
        "remote faults with postcopy-preempt while the background stream sends the rest \
         of RAM at full speed on the main connection (requested pages go on the preempt \
         connection, not behind it); faults told from reads as above ({} in {ROUNDS} \
         rounds); baseline: the same without preempt (postcopy.remote_fault_p50_with_background)",
        pre_busy.len()
    );
    Ok(vec![
        figure("p50", 0.5),
        figure("p99", 0.99),
        figure("max", 1.0),
        pre_figure("p50", 0.5),
        pre_figure("p99", 0.99),
        pre_figure("max", 1.0),
        Figure::new(
            "postcopy.remote_fault_preempt_p50_with_background",
            quantile_us(&pre_busy, 0.5),
            "us",
        )
        .baseline(quantile_us(&busy, 0.5))
        .note(pre_busy_note)
        .into(),
        Figure::new(
            "postcopy.remote_fault_p50_vs_one_handler",
            quantile_us(&ours, 0.5),
            "us",
        )
        .baseline(quantile_us(&one, 0.5))
        .note(one_note)
        .into(),
        Figure::new(
            "postcopy.remote_fault_p50_with_background",
            quantile_us(&busy, 0.5),
            "us",
        )
        .baseline(quantile_us(&ours, 0.5))
        .note(busy_note)
        .into(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_uses_the_sizes_the_wire_format_gives() {
        // A short page request (block named before) and a page record whose block
        // was named before: a 4 KiB payload and its head.
        let (request, record) = message_sizes().unwrap();
        assert_eq!(request, 21);
        assert!(
            record > PAGE as usize && record < PAGE as usize + 32,
            "{record}"
        );
    }

    #[test]
    fn the_toucher_visits_distinct_pages() {
        let mut seen: Vec<u64> = (0..FAULTS).map(touched_page).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len() as u64, FAULTS);
    }

    #[test]
    fn the_faults_are_the_slowest_reads() {
        assert_eq!(slowest(vec![3, 90, 1, 70, 2], 2), vec![90, 70]);
        assert_eq!(slowest(vec![3, 1], 5), vec![3, 1]);
        assert!(slowest(vec![3, 1], 0).is_empty());
    }

    #[test]
    fn quantiles_of_sorted_samples() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(quantile_us(&v, 0.5), 51.0);
        assert_eq!(quantile_us(&v, 0.99), 100.0);
        assert_eq!(quantile_us(&v, 1.0), 100.0);
        assert_eq!(quantile_us(&[], 0.5), 0.0);
    }
}
