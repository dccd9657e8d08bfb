//! A guest that dirties faster than the link drains: no switchover, a
//! prompt cancel, and no dirty page lost by the abort.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use migration_ram::{DirtyLog, Error, PrecopyParams, PrecopySaver, RamStats, VmmDirtyLog};
use migration_stream::StreamWriter;

#[test]
fn a_writer_faster_than_bandwidth_times_downtime_never_gets_switchover() {
    let mem = memory(64 << 10, 64 << 10);
    // 256 KiB/s and 1 ms: less than one page may remain.
    let params = PrecopyParams {
        max_bandwidth: 256 << 10,
        downtime_limit: Duration::from_millis(1),
    }
    .shared();
    let stats = Arc::new(RamStats::new());
    let mut saver = PrecopySaver::new(
        mem.clone(),
        blocks(&mem),
        Arc::new(VmmDirtyLog::new(mem.clone())),
        params,
        stats.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    let mut w = StreamWriter::new(io::sink());
    saver.setup(&mut w).unwrap();
    let high: Vec<u64> = (0..16).map(|p| (1 << 20) + p * PAGE).collect();
    let dirtier = Dirtier::start(mem.clone(), high);
    for pass in 0..6 {
        // Writes after the previous pass's closing sync: this pass's
        // closing sync must find them.
        dirtier.wait_for(dirtier.writes() + 50);
        let out = saver.iterate(&mut w).unwrap();
        assert!(out.remaining_bytes >= PAGE, "pass {pass}: {out:?}");
        assert!(!out.switchover, "pass {pass}: {out:?}");
    }
    dirtier.finish();
    let s = stats.snapshot();
    assert_eq!(s.iterations, 6);
    assert!(s.dirty_pages_rate > 0);
    assert!(s.remaining >= PAGE);
}

#[test]
fn cancel_ends_a_throttled_pass_promptly_and_abort_loses_no_dirty_page() {
    let src = memory(64 << 10, 1 << 20);
    fill(&src, 4, 11);
    // 1 MiB at 128 KiB/s: about 6 s if nothing stops it.
    let params = PrecopyParams {
        max_bandwidth: 128 << 10,
        downtime_limit: Duration::from_millis(300),
    }
    .shared();
    let cancel = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Recording::new(VmmDirtyLog::new(src.clone())));
    let mut saver = PrecopySaver::new(
        src.clone(),
        blocks(&src),
        log.clone(),
        params,
        Arc::new(RamStats::new()),
        cancel.clone(),
    );
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    // The guest keeps writing the first 32 pages of "pc.ram.high".
    let hot: Vec<u64> = (0..32).map(|p| (1 << 20) + p * PAGE).collect();
    let dirtier = Dirtier::start(src.clone(), hot);
    let canceller = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            // Late enough for the 16 pages of "pc.ram" (one chunk, about
            // 48 KiB of data) to go, long before the 1 MiB block is done.
            std::thread::sleep(Duration::from_millis(500));
            cancel.store(true, Ordering::SeqCst);
            Instant::now()
        })
    };
    let err = saver.iterate(&mut w).unwrap_err();
    let returned = Instant::now();
    let cancelled_at = canceller.join().unwrap();
    assert!(matches!(err, Error::Cancelled), "{err:?}");
    assert!(
        returned.duration_since(cancelled_at) < Duration::from_secs(1),
        "iterate took {:?} to notice the cancel",
        returned.duration_since(cancelled_at)
    );
    assert!(matches!(saver.iterate(&mut w), Err(Error::Cancelled)));
    saver.abort();
    assert!(log.stopped.load(Ordering::SeqCst));
    dirtier.finish();

    // Writes since the last sync are still in vm-memory's bitmap: fold
    // them in as the next migration attempt's first sync would.
    VmmDirtyLog::new(src.clone()).sync(saver.blocks()).unwrap();
    // Everything the destination would have got, applied to fresh memory.
    let dst = fresh_like(&src);
    let stream = w.into_inner().unwrap();
    assert_ne!(load_partial(&dst, &stream), StreamEnd::Complete);
    let blocks = saver.blocks();
    let dirty = blocks.dirty_pages();
    let total: u64 = blocks.iter().map(|b| b.pages()).sum();
    assert!(dirty > 0 && dirty < total, "{dirty} of {total} dirty");
    assert_eq!(blocks.iter().next().unwrap().dirty().count(), 0);
    // Nothing lost: every page the destination does not have right is
    // still dirty.
    let differing = differing_pages(&src, &dst);
    assert!(!differing.is_empty());
    for (b, p) in differing {
        let block = blocks.iter().nth(b).unwrap();
        assert!(block.dirty().test(p), "page {p} of {} lost", block.name());
    }
}
