//! The source side of postcopy, over in-memory streams: a precopy pass
//! interrupted mid-way, the switch (`Discard` of the pages sent and dirty
//! again), and the postcopy send (requested pages first, the background
//! scan after them, `max_postcopy_bandwidth`), checked by a destination
//! that loads the streams and drops the discarded pages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use migration_ram::{
    Error, ErrorKind, GuestMemoryMmap, Keepalive, PageRequester, PeerLiveness, PrecopyLoader,
    PrecopyParams, PrecopySaver, RamBlocks, RamStats, SharedParams, VmmDirtyLog,
};
use migration_stream::{
    BlockId, Command, DiscardRange, Error as StreamError, Record, ReturnMessage, ReturnPathReader,
    ReturnPathWriter, StreamReader, StreamWriter,
};
use vm_memory::{Bytes, GuestAddress};

const TOTAL_LO: u64 = (640 << 10) / PAGE;

fn params(max_bandwidth: u64, max_postcopy_bandwidth: u64) -> SharedParams {
    let p = PrecopyParams {
        max_bandwidth,
        ..PrecopyParams::default()
    }
    .shared();
    p.set_max_postcopy_bandwidth(max_postcopy_bandwidth);
    p
}

/// A source: the saver, its statistics, its (recording) dirty log and its
/// interrupt flag.
struct Source {
    saver: PrecopySaver,
    stats: Arc<RamStats>,
    log: Arc<Recording<VmmDirtyLog>>,
    interrupt: Arc<AtomicBool>,
}

fn source(src: &Arc<GuestMemoryMmap>, params: SharedParams) -> Source {
    let stats = Arc::new(RamStats::new());
    let log = Arc::new(Recording::new(VmmDirtyLog::new(src.clone())));
    let interrupt = Arc::new(AtomicBool::new(false));
    let mut saver = PrecopySaver::new(
        src.clone(),
        blocks(src),
        log.clone(),
        params,
        stats.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    saver.set_interrupt(interrupt.clone());
    Source {
        saver,
        stats,
        log,
        interrupt,
    }
}

/// Guest address of page `p` of the low (0) or high (1) block.
fn addr(block: u32, p: u64) -> u64 {
    if block == 0 {
        p * PAGE
    } else {
        (1 << 20) + p * PAGE
    }
}

/// Writes new contents into the pages at `addrs`, as a vCPU would.
fn guest_writes(mem: &GuestMemoryMmap, addrs: &[u64]) {
    let mut buf = vec![0u8; PAGE as usize];
    for &a in addrs {
        pattern(&mut buf, a ^ 0xfeed_f00d);
        mem.write_slice(&buf, GuestAddress(a)).unwrap();
    }
}

/// The `Packaged` command a session writes after the switch.
fn listen_and_run() -> Command {
    let mut p = StreamWriter::new(Vec::new());
    p.write_command(&Command::Listen).unwrap();
    p.write_command(&Command::Run).unwrap();
    Command::Packaged(p.into_inner().unwrap())
}

/// (block, page) of every dirty page.
fn dirty_set(blocks: &RamBlocks) -> Vec<(u32, u64)> {
    blocks
        .iter()
        .enumerate()
        .flat_map(|(i, b)| b.dirty().iter_set().map(move |p| (i as u32, p)))
        .collect()
}

/// What a stream carries, record by record (page payloads skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    Page(u32, u64),
    Discard(u32, Vec<(u64, u64)>),
    EndOfSection,
    Sync,
    Ping,
    Other,
}

fn records(stream: &[u8], blocks: &RamBlocks) -> Vec<Rec> {
    let mut r = StreamReader::new(stream);
    let mut out = Vec::new();
    loop {
        let rec = match r.read_record(blocks) {
            Ok(Record::Page(h)) => {
                r.skip_page().unwrap();
                Rec::Page(h.block.0, h.offset / PAGE)
            }
            Ok(Record::ZeroPage(h)) => Rec::Page(h.block.0, h.offset / PAGE),
            Ok(Record::Command(Command::Discard { block, ranges })) => Rec::Discard(
                block.0,
                ranges
                    .iter()
                    .map(|r| (r.offset / PAGE, r.len / PAGE))
                    .collect(),
            ),
            Ok(Record::EndOfSection) => Rec::EndOfSection,
            Ok(Record::Sync { .. }) => Rec::Sync,
            Ok(Record::Command(Command::Ping { .. })) => Rec::Ping,
            Ok(_) => Rec::Other,
            Err(StreamError::Closed) => return out,
            Err(e) => panic!("{e}"),
        };
        out.push(rec);
    }
}

fn pages_in(recs: &[Rec]) -> Vec<(u32, u64)> {
    recs.iter()
        .filter_map(|r| match r {
            Rec::Page(b, p) => Some((*b, *p)),
            _ => None,
        })
        .collect()
}

/// How a destination's load stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// At the `Packaged` command of the switch: the guest would run now.
    Packaged,
    Complete,
    /// The stream ended (closed or cut).
    End,
}

/// A destination as the postcopy one will act on RAM: the precopy loader,
/// and on `Discard` the pages dropped (zero, no longer received).
struct Dest {
    mem: Arc<GuestMemoryMmap>,
    loader: PrecopyLoader,
    discards: Vec<Rec>,
}

impl Dest {
    fn new(like: &GuestMemoryMmap) -> Self {
        let mem = fresh_like(like);
        let loader = PrecopyLoader::new(mem.clone(), blocks(&mem), Arc::new(RamStats::new()));
        Dest {
            mem,
            loader,
            discards: Vec::new(),
        }
    }

    /// Loads a whole stream with a new reader.
    fn load(&mut self, stream: &[u8]) -> Stop {
        self.load_from(&mut StreamReader::new(stream))
    }

    /// Loads until the switch, the end of the migration or of the stream.
    fn load_from(&mut self, r: &mut StreamReader<&[u8]>) -> Stop {
        loop {
            match self.loader.load(r) {
                Ok(Record::Command(Command::Discard { block, ranges })) => {
                    self.discard(block, &ranges)
                }
                Ok(Record::Command(Command::Packaged(_))) => return Stop::Packaged,
                Ok(Record::Command(Command::Ping { .. })) => {}
                Ok(Record::Complete) => return Stop::Complete,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(Error::Stream(StreamError::Closed)) => return Stop::End,
                Err(e) if e.is_disconnect() => return Stop::End,
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    fn discard(&mut self, block: BlockId, ranges: &[DiscardRange]) {
        let b = self.loader.blocks().get(block).unwrap();
        for r in ranges {
            for p in r.offset / PAGE..(r.offset + r.len) / PAGE {
                self.mem
                    .write_slice(&[0; PAGE as usize], b.page_addr(p))
                    .unwrap();
                b.received().clear(p);
            }
        }
        self.discards.push(Rec::Discard(
            block.0,
            ranges
                .iter()
                .map(|r| (r.offset / PAGE, r.len / PAGE))
                .collect(),
        ));
    }

    /// (block, page) of every page that has not arrived (or was dropped).
    fn missing(&self) -> Vec<(u32, u64)> {
        self.loader
            .blocks()
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                (0..b.pages())
                    .filter(|&p| !b.received().test(p))
                    .map(move |p| (i as u32, p))
            })
            .collect()
    }

    /// Asserts that every page that arrived holds the source's bytes: the
    /// guest may run on them.
    fn assert_arrived_pages_current(&self, src: &GuestMemoryMmap) {
        let (mut a, mut b) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
        for (i, block) in self.loader.blocks().iter().enumerate() {
            for p in block.received().iter_set() {
                src.read_slice(&mut a, block.page_addr(p)).unwrap();
                self.mem.read_slice(&mut b, block.page_addr(p)).unwrap();
                assert!(a == b, "page {p} of block {i} arrived but is stale");
            }
        }
    }
}

/// An in-memory channel that runs a hook on its flushes (the saver flushes
/// once per chunk) and may break after `limit` bytes.
struct Hooked {
    bytes: Vec<u8>,
    flushes: usize,
    on_flush: Option<Box<dyn FnMut(usize) + Send>>,
    limit: Option<usize>,
}

impl Hooked {
    fn new() -> Self {
        Hooked {
            bytes: Vec::new(),
            flushes: 0,
            on_flush: None,
            limit: None,
        }
    }
}

impl Write for Hooked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.map_or(buf.len(), |l| l - self.bytes.len());
        if room == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = room.min(buf.len());
        self.bytes.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        if let Some(hook) = self.on_flush.as_mut() {
            hook(self.flushes);
        }
        Ok(())
    }
}

/// Queues `requests` (block, page) from another thread and waits for it.
fn request_from_another_thread(r: &PageRequester, requests: &[(u32, u64)]) {
    let (r, requests) = (r.clone(), requests.to_vec());
    std::thread::spawn(move || {
        for (b, p) in requests {
            r.request_range(BlockId(b), p * PAGE, PAGE).unwrap();
        }
    })
    .join()
    .unwrap();
}

#[test]
fn an_interrupt_ends_the_pass_once_the_chunk_being_sent_is_flushed() {
    let src = memory(640 << 10, 15 << 20);
    fill(&src, 2, 7);
    let total = TOTAL_LO + (15 << 20) / PAGE;
    let mut s = source(&src, params(0, 0));
    // The flag goes up while the third chunk is being taken.
    let flag = s.interrupt.clone();
    *s.log.on_clear.lock() = Some(Box::new(move |n| {
        if n == 3 {
            flag.store(true, Ordering::SeqCst);
        }
    }));
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    let setup_len = w.bytes_written() as usize;
    let out = s.saver.iterate(&mut w).unwrap();
    assert!(out.interrupted);
    assert!(
        !out.switchover,
        "an interrupted pass never claims switchover"
    );
    let clears = s.log.clears.lock().clone();
    assert_eq!(clears.len(), 3, "no chunk is taken once the flag is up");
    // The low block is one chunk of 160 pages, then two of 256.
    assert_eq!(out.pages_sent, 160 + 256 + 256);
    assert_eq!(
        s.saver.blocks().dirty_pages(),
        total - out.pages_sent,
        "the pages not reached stay dirty"
    );
    assert_eq!(s.saver.blocks().sent_pages(), out.pages_sent);
    assert_eq!(out.remaining_bytes, (total - out.pages_sent) * PAGE);
    let st = s.stats.snapshot();
    assert_eq!((st.iterations, st.dirty_sync_count), (0, 1), "no sync");
    let recs = records(&w.get_ref()[setup_len..], s.saver.blocks());
    assert_eq!(pages_in(&recs).len() as u64, out.pages_sent);
    assert_eq!(recs.last(), Some(&Rec::EndOfSection));
    assert!(!recs.contains(&Rec::Sync), "Sync marks whole passes");

    // Lowered, the next pass sends the rest, nothing twice.
    s.interrupt.store(false, Ordering::SeqCst);
    let rest = s.saver.iterate(&mut w).unwrap();
    assert!(!rest.interrupted);
    assert_eq!(rest.pages_sent, total - out.pages_sent);
    s.saver.complete(&mut w).unwrap();
    w.write_complete().unwrap();
    let mut d = Dest::new(&src);
    assert_eq!(d.load(&w.into_inner().unwrap()), Stop::Complete);
    assert_same(&src, &d.mem);
}

#[test]
fn an_interrupt_from_another_thread_ends_a_huge_rate_limited_first_pass() {
    // 8.6 MiB at 1 MiB/s: the pass alone would take over 8 s.
    let src = memory(640 << 10, 8 << 20);
    fill(&src, 1 << 40, 3);
    let total = TOTAL_LO + (8 << 20) / PAGE;
    let mut s = source(&src, params(1 << 20, 0));
    let mut w = StreamWriter::new(io::sink());
    s.saver.setup(&mut w).unwrap();
    // migrate-start-postcopy once 1 MiB went.
    let raiser = {
        let (stats, flag) = (s.stats.clone(), s.interrupt.clone());
        std::thread::spawn(move || {
            while stats.snapshot().transferred < 1 << 20 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            flag.store(true, Ordering::SeqCst);
        })
    };
    let out = s.saver.iterate(&mut w).unwrap();
    raiser.join().unwrap();
    assert!(out.interrupted);
    assert!(
        out.pages_sent > 0 && out.pages_sent < total,
        "{} of {total} pages",
        out.pages_sent
    );
    assert_eq!(s.saver.blocks().dirty_pages(), total - out.pages_sent);
    // Straight to the switch: nothing was dirtied again, nothing to drop.
    let switch = s.saver.start_postcopy(&mut w).unwrap();
    assert_eq!((switch.discarded_pages, switch.discard_commands), (0, 0));
    assert_eq!(switch.remaining_pages, total - out.pages_sent);
    assert!(s.log.stopped.load(Ordering::SeqCst));
}

#[test]
fn discards_are_exactly_the_pages_sent_and_dirtied_again_merged() {
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 4, 11);
    let mut s = source(&src, params(0, 0));
    // While the third chunk (high pages 256..512) is being taken, the
    // guest writes pages of the first two chunks (sent) and one ahead (not
    // sent), and migrate-start-postcopy comes.
    let written = [
        addr(0, 10),
        addr(0, 11),
        addr(0, 12),
        addr(0, 63),
        addr(0, 64),
        addr(0, 159),
        addr(1, 0),
        addr(1, 1),
        addr(1, 4),
        addr(1, 255),
        addr(1, 700),
    ];
    let (mem, flag) = (src.clone(), s.interrupt.clone());
    *s.log.on_clear.lock() = Some(Box::new(move |n| {
        if n == 3 {
            guest_writes(&mem, &written);
            flag.store(true, Ordering::SeqCst);
        }
    }));
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    assert!(s.saver.iterate(&mut w).unwrap().interrupted);
    let sent: Vec<(usize, u64, u64)> = s.log.clears.lock().clone();
    assert_eq!(sent, vec![(0, 0, 160), (1, 0, 256), (1, 256, 256)]);

    // The vCPUs are paused: the switch.
    let before = w.bytes_written() as usize;
    let switch = s.saver.start_postcopy(&mut w).unwrap();
    assert!(s.log.stopped.load(Ordering::SeqCst), "the log is stopped");
    let recs = records(&w.get_ref()[before..], s.saver.blocks());
    // Consecutive pages merged, across a bitmap word (63, 64) too; the
    // two blocks apart; high page 700 (never sent) not at all.
    let expected = vec![
        Rec::Discard(0, vec![(10, 3), (63, 2), (159, 1)]),
        Rec::Discard(1, vec![(0, 2), (4, 1), (255, 1)]),
    ];
    assert_eq!(recs, expected);
    assert_eq!(
        (
            switch.discarded_pages,
            switch.discarded_ranges,
            switch.discard_commands
        ),
        (10, 6, 2)
    );
    // Left to send: the ten, and the high pages not reached (700 among).
    assert_eq!(switch.remaining_pages, 10 + 256);
    assert_eq!(switch.remaining_bytes, (10 + 256) * PAGE);
    assert_eq!(s.stats.snapshot().remaining, switch.remaining_bytes);
    let to_send = dirty_set(s.saver.blocks());
    w.write_command(&listen_and_run()).unwrap();

    let out = s.saver.postcopy_send(&mut w).unwrap();
    assert_eq!(out.pages_sent, 10 + 256);
    w.write_complete().unwrap();
    let stream = w.into_inner().unwrap();

    let mut d = Dest::new(&src);
    let mut r = StreamReader::new(&stream[..]);
    assert_eq!(d.load_from(&mut r), Stop::Packaged);
    assert_eq!(d.discards, expected);
    // Where the guest starts at the destination: what it lacks is exactly
    // what the source still has to send, and what it has is current.
    assert_eq!(d.missing(), to_send);
    d.assert_arrived_pages_current(&src);
    assert_eq!(d.load_from(&mut r), Stop::Complete);
    assert_same(&src, &d.mem);
}

#[test]
fn a_destination_that_loads_the_whole_stream_equals_the_source() {
    let src = memory(640 << 10, 7 << 20);
    fill(&src, 3, 5);
    let total = TOTAL_LO + (7 << 20) / PAGE;
    let mut s = source(&src, params(0, 0));
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();

    // A running guest writing everywhere during precopy.
    let dirtier = Dirtier::start(src.clone(), all_pages(&src));
    let first = s.saver.iterate(&mut w).unwrap();
    assert_eq!(first.pages_sent, total);
    dirtier.wait_for(dirtier.writes() + 200);
    // migrate-start-postcopy during the second pass, at its second chunk.
    let start = s.log.clears.lock().len();
    let flag = s.interrupt.clone();
    *s.log.on_clear.lock() = Some(Box::new(move |n| {
        if n == start + 2 {
            flag.store(true, Ordering::SeqCst);
        }
    }));
    let second = s.saver.iterate(&mut w).unwrap();
    assert!(second.interrupted);
    // The guest writes on a little, then its vCPUs pause.
    dirtier.wait_for(dirtier.writes() + 200);
    dirtier.finish();

    let switch = s.saver.start_postcopy(&mut w).unwrap();
    assert!(
        switch.discarded_pages > 0,
        "pages sent in the first pass were written after it"
    );
    let before = w.bytes_written();
    w.write_command(&listen_and_run()).unwrap();
    s.stats.add_transferred(w.bytes_written() - before);
    let to_send = dirty_set(s.saver.blocks());
    assert_eq!(to_send.len() as u64, switch.remaining_pages);

    let out = s.saver.postcopy_send(&mut w).unwrap();
    assert_eq!(out.pages_sent, switch.remaining_pages);
    w.write_complete().unwrap();
    w.flush().unwrap();
    let stream = w.into_inner().unwrap();

    let mut d = Dest::new(&src);
    let mut r = StreamReader::new(&stream[..]);
    // Up to the switch, then the rest on the same reader.
    assert_eq!(d.load_from(&mut r), Stop::Packaged);
    assert_eq!(d.missing(), to_send);
    d.assert_arrived_pages_current(&src);
    assert_eq!(d.load_from(&mut r), Stop::Complete);
    assert!(d.missing().is_empty());
    assert_same(&src, &d.mem);

    let st = s.stats.snapshot();
    assert_eq!(st.remaining, 0);
    assert_eq!(st.transferred, stream.len() as u64 - 1, "all but Complete");
    assert_eq!(
        st.precopy_bytes + st.downtime_bytes + st.postcopy_bytes,
        st.transferred
    );
    assert!(st.precopy_bytes > 0 && st.downtime_bytes > 0 && st.postcopy_bytes > 0);
    assert_eq!(st.postcopy_requests, 0);
}

#[test]
fn requests_from_other_threads_go_first_in_order_and_the_scan_resumes_after_them() {
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 1 << 40, 17);
    let mut s = source(&src, params(0, 0));
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    s.saver.start_postcopy(&mut w).unwrap();
    // The return-path thread gets its requester before Run is written.
    let requester = s.saver.page_requester();
    w.write_command(&listen_and_run()).unwrap();
    let switch_part = w.into_inner().unwrap();

    // Faults before the saver starts: one page asked twice.
    request_from_another_thread(&requester, &[(1, 700), (0, 3), (1, 700), (1, 10)]);
    // More while it sends: after the fifth flush (the second background
    // chunk, 64 KiB in postcopy), one page it already sent, then two it has
    // not.
    let mut ch = Hooked::new();
    let r = requester.clone();
    ch.on_flush = Some(Box::new(move |n| {
        if n == 5 {
            request_from_another_thread(&r, &[(1, 20), (1, 600), (0, 100)]);
        }
    }));
    let mut w = StreamWriter::new(ch);
    let out = s.saver.postcopy_send(&mut w).unwrap();
    w.write_complete().unwrap();
    let postcopy_part = w.into_inner().unwrap().bytes;

    let sent = pages_in(&records(&postcopy_part, s.saver.blocks()));
    let mut expected = vec![(1, 700), (0, 3), (1, 10)];
    // The scan from the chunk of high page 11: the first two chunks.
    expected.extend((0..32).filter(|&p| p != 10).map(|p| (1, p)));
    // The requests that came meanwhile; high page 20 went already.
    expected.extend([(1, 600), (0, 100)]);
    // The scan from the chunk of low page 101 (96..112), round to the end.
    expected.extend((96..160).filter(|&p| p != 100).map(|p| (0, p)));
    expected.extend((32..768).filter(|&p| p != 600 && p != 700).map(|p| (1, p)));
    expected.extend((0..96).filter(|&p| p != 3).map(|p| (0, p)));
    assert_eq!(sent.len(), expected.len());
    assert_eq!(sent, expected);
    assert_eq!(out.pages_sent, TOTAL_LO + 768);
    assert_eq!((out.requests_served, out.requests_ignored), (5, 2));

    // A fault that raced with its page: accepted, counted, not sent.
    assert!(requester.is_finished());
    request_from_another_thread(&requester, &[(1, 5)]);
    let st = s.stats.snapshot();
    assert_eq!((st.postcopy_requests, st.postcopy_requests_ignored), (5, 3));
    assert_eq!(st.remaining, 0);

    let mut d = Dest::new(&src);
    assert_eq!(d.load(&switch_part), Stop::Packaged);
    assert_eq!(d.load(&postcopy_part), Stop::Complete);
    assert_same(&src, &d.mem);
}

#[test]
fn a_request_for_a_page_already_sent_is_not_sent_again() {
    let src = memory(640 << 10, 1 << 20);
    fill(&src, 1 << 40, 9);
    let mut s = source(&src, params(0, 0));
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    assert!(!s.saver.iterate(&mut w).unwrap().interrupted);
    guest_writes(&src, &[addr(0, 20), addr(1, 30)]);
    let switch = s.saver.start_postcopy(&mut w).unwrap();
    assert_eq!(switch.discarded_pages, 2);
    let requester = s.saver.page_requester();
    // Low page 5 went in precopy and was not written since; high page 30
    // was; low page 5 asked again.
    request_from_another_thread(&requester, &[(0, 5), (1, 30), (0, 5)]);
    let mut w = StreamWriter::new(Vec::new());
    let out = s.saver.postcopy_send(&mut w).unwrap();
    let recs = records(w.get_ref(), s.saver.blocks());
    assert_eq!(pages_in(&recs), vec![(1, 30), (0, 20)]);
    assert_eq!(
        (out.pages_sent, out.requests_served, out.requests_ignored),
        (2, 1, 2)
    );
    let st = s.stats.snapshot();
    assert_eq!((st.postcopy_requests, st.postcopy_requests_ignored), (1, 2));
}

#[test]
fn max_postcopy_bandwidth_limits_postcopy_and_max_bandwidth_does_not() {
    let src = memory(64 << 10, 4 << 20);
    fill(&src, 1 << 40, 23);
    let limit: u64 = 4 << 20;
    // 1 byte/s for precopy: postcopy would never end if it applied.
    let mut s = source(&src, params(1, limit));
    let mut w = StreamWriter::new(io::sink());
    s.saver.setup(&mut w).unwrap();
    s.saver.start_postcopy(&mut w).unwrap();
    let started = Instant::now();
    s.saver.postcopy_send(&mut w).unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let bytes = s.stats.snapshot().postcopy_bytes as f64;
    assert!(bytes > f64::from(4 << 20));
    // At most one chunk (1 MiB of pages and their heads) and one burst
    // (100 ms) ahead of the limit.
    let ahead = f64::from(1 << 20) * 1.01 + limit as f64 * 0.1;
    let floor = (bytes - ahead) / limit as f64;
    assert!(floor > 0.5);
    assert!(elapsed >= floor, "{elapsed:.3} s < {floor:.3} s");

    // Unlimited postcopy with the same 1 byte/s precopy limit: it ends.
    let mut s = source(&src, params(1, 0));
    s.saver.setup(&mut w).unwrap();
    s.saver.start_postcopy(&mut w).unwrap();
    let out = s.saver.postcopy_send(&mut w).unwrap();
    assert_eq!(out.pages_sent, (64 << 10) / PAGE + (4 << 20) / PAGE);
}

/// The return-path thread as a session runs it: decode against the
/// saver's blocks, queue requests, report a failure to the saver.
fn return_path_thread(
    messages: &[ReturnMessage],
    blocks: Arc<RamBlocks>,
    requester: PageRequester,
) -> std::thread::JoinHandle<Option<ErrorKind>> {
    let mut rp = ReturnPathWriter::new(Vec::new());
    for m in messages {
        rp.write_message(m).unwrap();
    }
    let bytes = rp.into_inner().unwrap();
    std::thread::spawn(move || {
        let mut r = ReturnPathReader::new(&bytes[..]);
        loop {
            match r.read_message(&*blocks) {
                Ok(ReturnMessage::PageRequest { block, offset, len }) => {
                    if let Err(e) = requester.request_range(block, offset, len) {
                        // Already reported to the saver by the requester.
                        return Some(e.kind());
                    }
                }
                Ok(_) => {}
                Err(StreamError::Closed) => return None,
                Err(e) => {
                    let kind = e.kind();
                    requester.fail(e.into());
                    return Some(kind);
                }
            }
        }
    })
}

fn request(block: u32, offset: u64, len: u64) -> ReturnMessage {
    ReturnMessage::PageRequest {
        block: BlockId(block),
        offset,
        len,
    }
}

#[test]
fn a_hostile_request_fails_the_migration_with_a_protocol_error_and_touches_nothing() {
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 1 << 40, 29);
    let mut s = source(&src, params(0, 0));
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    let switch = s.saver.start_postcopy(&mut w).unwrap();
    let requester = s.saver.page_requester();

    // A good request, then one for a block the source does not have: the
    // return-path decoder refuses it and the thread reports it.
    let blocks = s.saver.blocks().clone();
    let rp = return_path_thread(
        &[request(1, 4 * PAGE, PAGE), request(7, 2 * PAGE, PAGE)],
        blocks.clone(),
        requester.clone(),
    );
    assert_eq!(rp.join().unwrap(), Some(ErrorKind::Protocol));
    let mut ch = StreamWriter::new(Vec::new());
    let err = s.saver.postcopy_send(&mut ch).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert!(
        matches!(
            err,
            Error::Stream(StreamError::UnknownBlock { block: BlockId(7) })
        ),
        "{err:?}"
    );
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "unknown RAM block #7"
    );
    // Nothing sent, nothing taken.
    assert_eq!(ch.bytes_written(), 0);
    assert_eq!(blocks.dirty_pages(), switch.remaining_pages);
    assert_eq!(s.stats.snapshot().postcopy_requests, 0);

    // A request past the end of a block, checked by the requester, in the
    // middle of the send (after the second flush).
    let mut hooked = Hooked::new();
    let r = requester.clone();
    hooked.on_flush = Some(Box::new(move |n| {
        if n == 2 {
            let r = r.clone();
            let err = std::thread::spawn(move || r.request_range(BlockId(1), 3 << 20, PAGE))
                .join()
                .unwrap()
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Protocol);
        }
    }));
    let mut ch = StreamWriter::new(hooked);
    let err = s.saver.postcopy_send(&mut ch).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert_eq!(
        err.to_string(),
        "page request for 0x1000 bytes at offset 0x300000 of RAM block #1 (\"pc.ram.high\") refused"
    );
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "range 0x300000+0x1000 is outside RAM block #1 of size 0x300000"
    );
    // The request queued before the first failure went first, then the
    // scan after it (one 64 KiB chunk, less the requested page); every
    // other page is still to send.
    let sent = pages_in(&records(&ch.get_ref().bytes, &blocks));
    assert_eq!(sent[0], (1, 4));
    assert_eq!(sent.len(), 16);
    let mut left = dirty_set(&blocks);
    left.extend(sent);
    left.sort_unstable();
    let all: Vec<(u32, u64)> = (0..TOTAL_LO)
        .map(|p| (0, p))
        .chain((0..768).map(|p| (1, p)))
        .collect();
    assert_eq!(left, all, "each page either sent or still dirty");

    // The session aborts: the requester's handles fail from then on.
    s.saver.abort();
    assert!(matches!(
        requester.request_range(BlockId(0), 0, PAGE),
        Err(Error::SchedulerGone)
    ));
}

#[test]
fn nothing_is_lost_when_a_postcopy_write_fails_mid_chunk() {
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 1 << 40, 37);
    let mut s = source(&src, params(0, 0));
    // Precopy sends the low block, then migrate-start-postcopy.
    let flag = s.interrupt.clone();
    *s.log.on_clear.lock() = Some(Box::new(move |n| {
        if n == 1 {
            flag.store(true, Ordering::SeqCst);
        }
    }));
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    assert_eq!(s.saver.iterate(&mut w).unwrap().pages_sent, TOTAL_LO);
    guest_writes(&src, &[addr(0, 1), addr(0, 2)]);
    let switch = s.saver.start_postcopy(&mut w).unwrap();
    assert_eq!(switch.discarded_pages, 2);
    assert_eq!(switch.remaining_pages, 2 + 768);
    w.write_command(&listen_and_run()).unwrap();
    let switch_part = w.into_inner().unwrap();

    // The link breaks 1.5 MB into postcopy: in the 23rd high chunk (64 KiB
    // of pages, 65.7 kB with their heads, after the two low pages).
    let mut broken = Hooked::new();
    broken.limit = Some(1_500_000);
    let mut ch = StreamWriter::new(broken);
    let err = s.saver.postcopy_send(&mut ch).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Link, "{err:?}");
    let blocks = s.saver.blocks().clone();
    // The two low pages and the first 22 high chunks went.
    assert_eq!(blocks.dirty_pages(), 768 - 22 * 16);

    // What reached the destination, up to the cut: every page it lacks
    // is still dirty at the source, and every page it has is current.
    let mut d = Dest::new(&src);
    assert_eq!(d.load(&switch_part), Stop::Packaged);
    assert_eq!(d.load(&ch.get_ref().bytes), Stop::End);
    let dirty = dirty_set(&blocks);
    for page in d.missing() {
        assert!(dirty.contains(&page), "{page:?} is neither there nor dirty");
    }
    d.assert_arrived_pages_current(&src);

    // A retry on a new channel (as recovery will) sends the rest.
    let mut retry = StreamWriter::new(Vec::new());
    let out = s.saver.postcopy_send(&mut retry).unwrap();
    assert_eq!(out.pages_sent, 768 - 22 * 16);
    retry.write_complete().unwrap();
    assert_eq!(d.load(&retry.into_inner().unwrap()), Stop::Complete);
    assert_same(&src, &d.mem);
}

/// A channel another thread watches while the saver writes: the records
/// up to the last flush (the saver flushes at record boundaries), and a
/// condition variable notified at each flush.
#[derive(Clone, Default)]
struct Tap(Arc<(Mutex<Tapped>, Condvar)>);

/// The bytes written, and how many of them were flushed.
type Tapped = (Vec<u8>, usize);

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 .0.lock().unwrap().0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut st = self.0 .0.lock().unwrap();
        st.1 = st.0.len();
        self.0 .1.notify_all();
        Ok(())
    }
}

impl Tap {
    /// Waits until `done` accepts the records flushed so far, and returns
    /// them. A hang guard, not a performance limit: a saver that stops
    /// flushing for ten minutes is stuck.
    fn wait_for(&self, blocks: &RamBlocks, done: impl Fn(&[Rec]) -> bool) -> Vec<Rec> {
        let deadline = Instant::now() + Duration::from_secs(600);
        let (lock, cv) = &*self.0;
        let mut st = lock.lock().unwrap();
        loop {
            let recs = records(&st.0[..st.1], blocks);
            if done(&recs) {
                return recs;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the saver stopped flushing: {recs:?}");
            st = cv.wait_timeout(st, left).unwrap().0;
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.0 .0.lock().unwrap().0.clone()
    }
}

/// Whether the saver waits with nothing to send after `pages` pages (two pings
/// after the last one) or has ended its stream.
fn waits_after(recs: &[Rec], pages: usize) -> bool {
    let pings = recs
        .iter()
        .rev()
        .take_while(|r| !matches!(r, Rec::Page(..)))
        .filter(|r| **r == Rec::Ping)
        .count();
    (pages_in(recs).len() >= pages && pings >= 2) || recs.contains(&Rec::EndOfSection)
}

#[test]
fn a_paused_background_stream_sends_only_requested_pages_until_resumed() {
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 1 << 40, 41);
    let params = params(0, 0);
    params.set_postcopy_background_paused(true);
    let mut s = source(&src, params.clone());
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    s.saver.start_postcopy(&mut w).unwrap();
    let requester = s.saver.page_requester();
    w.write_command(&listen_and_run()).unwrap();
    let switch_part = w.into_inner().unwrap();
    // A ping at every chance (a peer that is never silent for long enough):
    // the pings show the saver waiting with nothing to send.
    s.saver.set_keepalive(Some(Keepalive::new(
        Duration::from_millis(1),
        Duration::from_secs(24 * 3600),
        PeerLiveness::shared(),
    )));
    request_from_another_thread(&requester, &[(1, 700), (0, 3)]);
    let blocks = s.saver.blocks().clone();
    let tap = Tap::default();
    let mut saver = s.saver;
    let saver_thread = {
        let tap = tap.clone();
        std::thread::spawn(move || {
            let mut w = StreamWriter::new(tap);
            let out = saver.postcopy_send(&mut w).unwrap();
            w.write_complete().unwrap();
            w.flush().unwrap();
            out
        })
    };

    // The two requested pages, then the saver waits: pings, no other page.
    let recs = tap.wait_for(&blocks, |r| waits_after(r, 2));
    assert_eq!(pages_in(&recs), vec![(1, 700), (0, 3)]);
    // A request while it waits is served, alone; one for a page that went
    // already is not served again.
    request_from_another_thread(&requester, &[(1, 10), (0, 3)]);
    let recs = tap.wait_for(&blocks, |r| waits_after(r, 3));
    assert_eq!(pages_in(&recs), vec![(1, 700), (0, 3), (1, 10)]);
    assert_eq!(blocks.dirty_pages(), TOTAL_LO + 768 - 3);

    // Resumed: the scan goes on from the last request (low page 3, which
    // was skipped), round to the end.
    params.set_postcopy_background_paused(false);
    let out = saver_thread.join().unwrap();
    assert_eq!(out.pages_sent, TOTAL_LO + 768);
    assert_eq!((out.requests_served, out.requests_ignored), (3, 1));
    let postcopy_part = tap.bytes();
    let sent = pages_in(&records(&postcopy_part, &blocks));
    let mut expected = vec![(1, 700), (0, 3), (1, 10)];
    expected.extend((0..TOTAL_LO).filter(|&p| p != 3).map(|p| (0, p)));
    expected.extend((0..768).filter(|&p| p != 10 && p != 700).map(|p| (1, p)));
    assert_eq!(sent, expected);

    let mut d = Dest::new(&src);
    assert_eq!(d.load(&switch_part), Stop::Packaged);
    assert_eq!(d.load(&postcopy_part), Stop::Complete);
    assert_same(&src, &d.mem);
}

#[test]
fn a_paused_background_stream_ends_once_every_page_was_asked_for() {
    let src = memory(64 << 10, 64 << 10);
    fill(&src, 1 << 40, 43);
    let params = params(0, 0);
    params.set_postcopy_background_paused(true);
    let mut s = source(&src, params);
    let mut w = StreamWriter::new(Vec::new());
    s.saver.setup(&mut w).unwrap();
    s.saver.start_postcopy(&mut w).unwrap();
    let requester = s.saver.page_requester();
    w.write_command(&listen_and_run()).unwrap();
    let switch_part = w.into_inner().unwrap();
    let every: Vec<(u32, u64)> = (0..2)
        .flat_map(|b| (0..(64 << 10) / PAGE).map(move |p| (b, p)))
        .collect();
    request_from_another_thread(&requester, &every);
    let mut w = StreamWriter::new(Vec::new());
    let out = s.saver.postcopy_send(&mut w).unwrap();
    w.write_complete().unwrap();
    assert_eq!(out.requests_served, every.len() as u64);
    let postcopy_part = w.into_inner().unwrap();
    assert_eq!(pages_in(&records(&postcopy_part, s.saver.blocks())), every);
    let mut d = Dest::new(&src);
    assert_eq!(d.load(&switch_part), Stop::Packaged);
    assert_eq!(d.load(&postcopy_part), Stop::Complete);
    assert_same(&src, &d.mem);
}
