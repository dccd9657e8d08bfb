//! A channel that breaks in the middle of a pass: the error says so, the
//! chunk being sent is dirty again, and nothing the destination lacks is
//! clean.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use migration_ram::{PrecopyParams, PrecopySaver, RamStats, VmmDirtyLog};
use migration_stream::{memory_pair, StreamWriter};

#[test]
fn a_broken_channel_fails_the_pass_and_redirties_the_chunk() {
    // No zero pages but the first of each region: chunks end at about
    // 0.63, 1.63, 2.63 and 3.63 MiB of stream.
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 1 << 40, 21);
    let (a, b) = memory_pair();
    // The peer reads 2 MiB, then the connection dies.
    let cut = 2u64 << 20;
    let peer = {
        let mut reader = b.reader;
        let handle = b.handle;
        std::thread::spawn(move || {
            let mut got = Vec::new();
            (&mut reader).take(cut).read_to_end(&mut got).unwrap();
            handle.shutdown().unwrap();
            got
        })
    };
    let log = Arc::new(Recording::new(VmmDirtyLog::new(src.clone())));
    let mut saver = PrecopySaver::new(
        src.clone(),
        blocks(&src),
        log.clone(),
        PrecopyParams {
            max_bandwidth: 0,
            ..PrecopyParams::default()
        }
        .shared(),
        Arc::new(RamStats::new()),
        Arc::new(AtomicBool::new(false)),
    );
    let mut w = StreamWriter::new(a.writer);
    saver.setup(&mut w).unwrap();
    let err = saver.iterate(&mut w).unwrap_err();
    assert!(err.is_disconnect(), "{err:?}");
    let received = peer.join().unwrap();
    assert_eq!(received.len() as u64, cut);
    saver.abort();
    assert!(log.stopped.load(Ordering::SeqCst));

    // The chunks whose clear was called: all but the last were flushed.
    let clears = log.clears.lock().clone();
    assert!(clears.len() >= 2, "{clears:?}");
    let (failed, done) = clears.split_last().unwrap();
    let blocks = saver.blocks();
    let block = |i: usize| blocks.iter().nth(i).unwrap();
    for &(i, first, n) in done {
        for p in first..first + n {
            assert!(!block(i).dirty().test(p), "sent page {p} still dirty");
        }
    }
    let (fi, ffirst, fn_) = *failed;
    for p in ffirst..ffirst + fn_ {
        assert!(
            block(fi).dirty().test(p),
            "page {p} of the failed chunk is clean"
        );
    }
    let total: u64 = blocks.iter().map(|b| b.pages()).sum();
    let sent: u64 = done.iter().map(|c| c.2).sum();
    assert_eq!(blocks.dirty_pages(), total - sent);

    // What reached the peer, applied to fresh memory: every page it lacks
    // is dirty on the source.
    let dst = fresh_like(&src);
    assert_ne!(load_partial(&dst, &received), StreamEnd::Complete);
    for (b, p) in differing_pages(&src, &dst) {
        assert!(block(b).dirty().test(p), "page {p} of block {b} lost");
    }
}
