//! Precopy end to end, in one process: a source guest memory with a hole,
//! a thread dirtying it during the iterations, an in-memory connection, a
//! loader thread, and a byte-for-byte comparison at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use migration_ram::{
    GuestMemoryMmap, IterationOutcome, PrecopyLoader, PrecopyParams, PrecopySaver, RamStats,
    RamStatsSnapshot, VmmDirtyLog,
};
use migration_stream::{
    memory_pair, read_preamble, Hello, MigrationId, Record, Role, StreamReader, StreamWriter,
};

#[test]
fn live_precopy_with_a_dirtying_writer_converges_and_copies_everything() {
    // 640 KiB below the hole, 1 MiB..16 MiB above it.
    let src = memory(640 << 10, 15 << 20);
    fill(&src, 3, 0x1234);
    let dst = fresh_like(&src);
    let total_pages = (640 << 10) / PAGE + (15 << 20) / PAGE;

    let (a, b) = memory_pair();
    let id = MigrationId::generate();

    // Destination: a thread loading until Complete.
    let dst_stats = Arc::new(RamStats::new());
    let loader_thread = {
        let dst = dst.clone();
        let stats = dst_stats.clone();
        let mut reader = b.reader;
        std::thread::spawn(move || {
            read_preamble(&mut reader)
                .unwrap()
                .expect(Role::Main, id)
                .unwrap();
            let mut loader = PrecopyLoader::new(dst.clone(), blocks(&dst), stats);
            let mut r = StreamReader::new(reader);
            let end = loader.load(&mut r).unwrap();
            assert_eq!(end, Record::Complete);
            loader.received_pages()
        })
    };

    // Source.
    let src_stats = Arc::new(RamStats::new());
    let log = Arc::new(Recording::new(VmmDirtyLog::new(src.clone())));
    let mut saver = PrecopySaver::new(
        src.clone(),
        blocks(&src),
        log.clone(),
        PrecopyParams {
            max_bandwidth: 0,
            downtime_limit: Duration::from_millis(300),
        }
        .shared(),
        src_stats.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    let mut w = StreamWriter::new(a.writer);
    w.write_preamble(&Hello::new(Role::Main, id)).unwrap();
    saver.setup(&mut w).unwrap();

    // Dirty pages on both sides of the hole while iterating.
    let dirtier = Dirtier::start(src.clone(), all_pages(&src));
    let mut sent = Vec::new();
    let first = saver.iterate(&mut w).unwrap();
    assert_eq!(first.pages_sent, total_pages, "the first pass sends all");
    sent.push(first.pages_sent);
    for _ in 0..3 {
        // Make sure the writer dirties pages after the last pass's closing
        // sync: the next sync reports them, the pass after resends them.
        dirtier.wait_for(dirtier.writes() + 200);
        let out = saver.iterate(&mut w).unwrap();
        sent.push(out.pages_sent);
    }
    assert!(
        sent[2] > 0 && sent[3] > 0,
        "dirtied pages are resent: {sent:?}"
    );
    let writes = dirtier.finish();
    assert!(writes > 600);

    // With the writer stopped, at most two more passes leave nothing
    // behind: one for the pages the last sync found, one for the writes
    // made between that sync and the stop.
    loop {
        let out = saver.iterate(&mut w).unwrap();
        sent.push(out.pages_sent);
        if out.remaining_bytes == 0 {
            assert!(out.switchover);
            assert!(out.bandwidth > 0.0);
            break;
        }
        assert!(sent.len() < 6, "no convergence without a writer: {sent:?}");
    }

    // "Pause the vCPUs": nothing writes any more. Complete.
    saver.complete(&mut w).unwrap();
    assert!(log.stopped.load(std::sync::atomic::Ordering::SeqCst));
    w.write_complete().unwrap();
    w.flush().unwrap();
    drop(w);

    let received = loader_thread.join().unwrap();
    assert_eq!(received, total_pages, "every page was received");
    assert_same(&src, &dst);

    let s: RamStatsSnapshot = src_stats.snapshot();
    let d = dst_stats.snapshot();
    let sent_by_passes: u64 = sent.iter().sum();
    assert!(s.normal + s.duplicate >= sent_by_passes);
    assert_eq!(
        (s.normal, s.duplicate),
        (d.normal, d.duplicate),
        "each side counts the same page records"
    );
    assert_eq!(s.normal_bytes, s.normal * PAGE);
    assert!(s.duplicate >= total_pages / 3, "zero pages go as flags");
    assert!(s.transferred > s.normal_bytes);
    // The destination also read the final Complete byte.
    assert_eq!(d.transferred, s.transferred + 1);
    assert_eq!(s.total, total_pages * PAGE);
    assert_eq!(s.remaining, 0);
    assert_eq!(s.iterations, sent.len() as u64);
    // Setup, one per pass, and completion.
    assert_eq!(s.dirty_sync_count, sent.len() as u64 + 2);
    assert!(s.mbps > 0.0);
    assert_eq!(s.postcopy_requests, 0);
}

/// The whole stream of a stopped guest's precopy (setup, one pass,
/// completion, `Complete`) with the default parameters, the source's
/// statistics and the pass's outcome.
fn stopped_stream(src: &Arc<GuestMemoryMmap>) -> (Vec<u8>, Arc<RamStats>, IterationOutcome) {
    let stats = Arc::new(RamStats::new());
    let mut saver = PrecopySaver::new(
        src.clone(),
        blocks(src),
        Arc::new(VmmDirtyLog::new(src.clone())),
        PrecopyParams::default().shared(),
        stats.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    let out = saver.iterate(&mut w).unwrap();
    saver.complete(&mut w).unwrap();
    w.write_complete().unwrap();
    (w.into_inner().unwrap(), stats, out)
}

#[test]
fn stopped_guest_precopy_over_a_vec() {
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 4, 99);
    let (stream, stats, out) = stopped_stream(&src);
    assert!(out.switchover);

    let dst = fresh_like(&src);
    assert_eq!(load_partial(&dst, &stream), StreamEnd::Complete);
    assert_same(&src, &dst);
    let s = stats.snapshot();
    assert_eq!(s.normal + s.duplicate, out.pages_sent);
    assert_eq!(s.transferred + 1, stream.len() as u64);
    assert_eq!(s.dirty_sync_count, 3);
}

#[test]
fn a_page_zeroed_after_it_was_sent_is_zeroed_on_the_destination() {
    use vm_memory::{Bytes, GuestAddress};
    let src = memory(64 << 10, 64 << 10);
    src.write_slice(&[7; 4096], GuestAddress(8192)).unwrap();
    let mut saver = PrecopySaver::new(
        src.clone(),
        blocks(&src),
        Arc::new(VmmDirtyLog::new(src.clone())),
        PrecopyParams::default().shared(),
        Arc::new(RamStats::new()),
        Arc::new(AtomicBool::new(false)),
    );
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    saver.iterate(&mut w).unwrap();
    src.write_slice(&[0; 4096], GuestAddress(8192)).unwrap();
    // The pass sends what the previous sync found (nothing); its closing
    // sync finds the page.
    let out = saver.iterate(&mut w).unwrap();
    assert_eq!(out.pages_sent, 0);
    assert_eq!(out.remaining_bytes, 4096);
    let out = saver.iterate(&mut w).unwrap();
    assert_eq!((out.pages_sent, out.remaining_bytes), (1, 0));
    saver.complete(&mut w).unwrap();
    w.write_complete().unwrap();
    let stream = w.into_inner().unwrap();
    let dst = fresh_like(&src);
    assert_eq!(load_partial(&dst, &stream), StreamEnd::Complete);
    assert_same(&src, &dst);
}

#[test]
fn the_loader_places_every_page_through_its_placer() {
    use std::sync::atomic::{AtomicU64, Ordering};

    use migration_ram::{CopyPlacer, PagePlacer, RamBlock};

    /// Counts placements, then lets a CopyPlacer do them.
    struct Counting {
        inner: CopyPlacer,
        pages: AtomicU64,
        zeros: AtomicU64,
    }
    impl PagePlacer for Counting {
        fn place(&self, block: &RamBlock, page: u64, data: &[u8]) -> migration_ram::Result<()> {
            self.pages.fetch_add(1, Ordering::Relaxed);
            self.inner.place(block, page, data)
        }
        fn place_zero(&self, block: &RamBlock, page: u64) -> migration_ram::Result<()> {
            self.zeros.fetch_add(1, Ordering::Relaxed);
            self.inner.place_zero(block, page)
        }
    }

    let src = memory(64 << 10, 1 << 20);
    fill(&src, 4, 77);
    let mut saver = PrecopySaver::new(
        src.clone(),
        blocks(&src),
        Arc::new(VmmDirtyLog::new(src.clone())),
        PrecopyParams {
            max_bandwidth: 0,
            downtime_limit: Duration::from_millis(300),
        }
        .shared(),
        Arc::new(RamStats::new()),
        Arc::new(AtomicBool::new(false)),
    );
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    saver.iterate(&mut w).unwrap();
    saver.complete(&mut w).unwrap();
    w.write_complete().unwrap();
    let stream = w.into_inner().unwrap();

    let dst = fresh_like(&src);
    let placer = Arc::new(Counting {
        inner: CopyPlacer::new(dst.clone()),
        pages: AtomicU64::new(0),
        zeros: AtomicU64::new(0),
    });
    let mut loader = PrecopyLoader::with_placer(
        dst.clone(),
        blocks(&dst),
        Arc::new(RamStats::new()),
        placer.clone(),
    );
    let mut r = StreamReader::new(&stream[..]);
    assert_eq!(loader.load(&mut r).unwrap(), Record::Complete);
    assert_same(&src, &dst);
    let total = (64 << 10) / PAGE + (1 << 20) / PAGE;
    let (pages, zeros) = (
        placer.pages.load(Ordering::Relaxed),
        placer.zeros.load(Ordering::Relaxed),
    );
    assert_eq!(pages + zeros, total);
    assert_eq!(zeros, 16 / 4 + 256 / 4, "every 4th page is zero");
    assert_eq!(loader.received_pages(), total, "the placer recorded them");
}

/// Zero pages arrive in runs (a guest's untouched memory), which the
/// default loader places a run at a time: over memory that held other bytes
/// (an earlier attempt, or what the VMM loaded) every page must still end
/// as the source's, and the counts must be the pages sent.
#[test]
fn runs_of_zero_pages_clear_stale_memory_and_are_counted() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    let src = memory(256 << 10, 2 << 20);
    // Pages 16 to 63 of each 64 hold data; the rest are zero: runs of 48
    // zero pages with data between them, and a long run at the end of the
    // low region.
    for r in src.iter() {
        let pages = r.len() / PAGE;
        for p in 0..pages {
            let data = if p % 64 >= 16 {
                [0u8; 4096]
            } else {
                [p as u8 | 1; 4096]
            };
            src.write_slice(&data, GuestAddress(r.start_addr().0 + p * PAGE))
                .unwrap();
        }
    }
    let (stream, stats, _) = stopped_stream(&src);

    let dst = fresh_like(&src);
    for r in dst.iter() {
        for p in 0..r.len() / PAGE {
            dst.write_slice(&[0xee; 4096], GuestAddress(r.start_addr().0 + p * PAGE))
                .unwrap();
        }
    }
    let dst_stats = Arc::new(RamStats::new());
    let mut loader = PrecopyLoader::new(dst.clone(), blocks(&dst), dst_stats.clone());
    let mut r = StreamReader::new(&stream[..]);
    assert_eq!(loader.load(&mut r).unwrap(), Record::Complete);
    assert_same(&src, &dst);
    let (sent, got) = (stats.snapshot(), dst_stats.snapshot());
    assert_eq!(got.duplicate, sent.duplicate);
    assert_eq!(got.normal, sent.normal);
    let total = ((256 << 10) + (2 << 20)) / PAGE;
    assert_eq!(sent.duplicate, total * 48 / 64);
    assert_eq!(loader.received_pages(), total);
}

/// The loader gathers pages in a row to place them together, but never
/// holds one back while it waits for the peer: a vCPU in postcopy may be
/// waiting for it. Three pages of a run are sent and the stream then
/// stalls: all three are placed while the loader waits for more.
#[test]
fn pages_held_for_a_run_are_placed_before_the_loader_waits() {
    use std::sync::mpsc;

    use migration_stream::BlockId;
    use vm_memory::{Bytes, GuestAddress};

    let dst = memory(64 << 10, 64 << 10);
    let (a, b) = memory_pair();
    let blocks = Arc::new(blocks(&dst));
    let mut w = StreamWriter::new(a.writer);
    w.write_ram_setup(&blocks.infos()).unwrap();
    for p in 0..3u64 {
        w.write_page(BlockId(0), p * PAGE, &[p as u8 + 1; 4096])
            .unwrap();
    }
    w.flush().unwrap();
    let (tx, rx) = mpsc::channel();
    let loader = {
        let (dst, blocks) = (dst.clone(), blocks.clone());
        std::thread::spawn(move || {
            let mut loader = PrecopyLoader::new(dst, blocks, Arc::new(RamStats::new()));
            let mut r = StreamReader::new(b.reader);
            let end = loader.load(&mut r);
            tx.send(()).unwrap();
            end
        })
    };
    // The loader waits for the rest of the stream now; the pages must be
    // there before it comes (a hang guard, not a time limit).
    let started = std::time::Instant::now();
    while blocks.received_pages() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "pages held back while the loader waits: {} of 3 placed",
            blocks.received_pages()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(rx.try_recv().is_err(), "the loader returned early");
    for p in 0..3u64 {
        assert_eq!(
            dst.read_obj::<u8>(GuestAddress(p * PAGE)).unwrap(),
            p as u8 + 1
        );
    }
    w.write_complete().unwrap();
    w.flush().unwrap();
    drop(w);
    assert_eq!(loader.join().unwrap().unwrap(), Record::Complete);
}
