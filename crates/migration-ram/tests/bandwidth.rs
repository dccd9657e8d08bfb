//! `max_bandwidth`: a floor on the time a limited pass takes, and changes
//! of the shared parameters during a pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use migration_ram::{PrecopyParams, PrecopySaver, RamStats, SharedParams, VmmDirtyLog};
use migration_stream::StreamWriter;
use parking_lot::Mutex;

/// Most credit the limiter may have banked: 100 ms of bandwidth.
fn burst(limit: u64) -> f64 {
    limit as f64 * 0.1
}

/// Bytes of a pass not subject to the limit: EndOfSection and Sync.
const UNLIMITED_TAIL: f64 = 11.0;

fn saver_over(
    mem: &Arc<migration_ram::GuestMemoryMmap>,
    params: &SharedParams,
    log: Arc<dyn migration_ram::DirtyLog>,
) -> (PrecopySaver, Arc<RamStats>) {
    let stats = Arc::new(RamStats::new());
    let saver = PrecopySaver::new(
        mem.clone(),
        blocks(mem),
        log,
        params.clone(),
        stats.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    (saver, stats)
}

#[test]
fn a_limited_pass_is_not_faster_than_the_limit() {
    // 64 KiB + 3 MiB of data (one zero page per region).
    let mem = memory(64 << 10, 3 << 20);
    fill(&mem, 1 << 40, 5);
    let limit: u64 = 6 << 20;
    let params = PrecopyParams {
        max_bandwidth: limit,
        downtime_limit: Duration::from_millis(300),
    }
    .shared();
    let (mut saver, stats) = saver_over(&mem, &params, Arc::new(VmmDirtyLog::new(mem.clone())));
    let mut w = StreamWriter::new(io::sink());
    saver.setup(&mut w).unwrap();
    let before = stats.snapshot().transferred;
    let start = Instant::now();
    let out = saver.iterate(&mut w).unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = (stats.snapshot().transferred - before) as f64;
    assert!(bytes > f64::from(3u32 << 20));
    // Sent bytes <= banked credit + limit * time.
    let floor = (bytes - UNLIMITED_TAIL - burst(limit)) / limit as f64;
    assert!(
        elapsed >= floor,
        "{bytes} bytes in {elapsed:.3}s, floor {floor:.3}s"
    );
    assert!(
        out.bandwidth <= limit as f64 + burst(limit) / elapsed,
        "measured {} B/s over a {limit} B/s limit",
        out.bandwidth
    );
    let mbps = stats.snapshot().mbps;
    assert!((mbps - out.bandwidth * 8.0 / 1e6).abs() < 1e-9);
}

#[test]
fn lowering_the_limit_during_a_pass_slows_the_rest_of_it() {
    // Chunks: "pc.ram" (16 pages), then three 1 MiB chunks of "pc.ram.high".
    let mem = memory(64 << 10, 3 << 20);
    fill(&mem, 1 << 40, 6);
    let params = PrecopyParams {
        max_bandwidth: 0,
        downtime_limit: Duration::from_millis(300),
    }
    .shared();
    let new_limit: u64 = 4 << 20;
    let log = Arc::new(Recording::new(VmmDirtyLog::new(mem.clone())));
    let (mut saver, stats) = saver_over(&mem, &params, log.clone());
    // Just before the second chunk is read, an operator lowers the limit.
    let changed: Arc<Mutex<Option<(Instant, u64)>>> = Arc::default();
    {
        let (params, stats, changed) = (params.clone(), stats.clone(), changed.clone());
        *log.on_clear.lock() = Some(Box::new(move |n| {
            if n == 2 {
                params.set_max_bandwidth(new_limit);
                *changed.lock() = Some((Instant::now(), stats.snapshot().transferred));
            }
        }));
    }
    let mut w = StreamWriter::new(io::sink());
    saver.setup(&mut w).unwrap();
    saver.iterate(&mut w).unwrap();
    let end = Instant::now();
    let (at, transferred_then) = changed.lock().expect("the hook ran");
    let after = (stats.snapshot().transferred - transferred_then) as f64;
    assert!(
        after > f64::from(3u32 << 20),
        "three chunks after the change"
    );
    let floor = (after - UNLIMITED_TAIL - burst(new_limit)) / new_limit as f64;
    let took = (end - at).as_secs_f64();
    assert!(
        took >= floor,
        "{after} bytes in {took:.3}s, floor {floor:.3}s"
    );
}

#[test]
fn raising_the_limit_wakes_a_throttled_pass() {
    // 1 MiB of data at 64 KiB/s would take 16 s.
    let mem = memory(64 << 10, 1 << 20);
    fill(&mem, 1 << 40, 7);
    let params = PrecopyParams {
        max_bandwidth: 64 << 10,
        downtime_limit: Duration::from_millis(300),
    }
    .shared();
    let (mut saver, _) = saver_over(&mem, &params, Arc::new(VmmDirtyLog::new(mem.clone())));
    let mut w = StreamWriter::new(io::sink());
    saver.setup(&mut w).unwrap();
    let start = Instant::now();
    let raiser = {
        let params = params.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            params.set_max_bandwidth(0);
        })
    };
    let out = saver.iterate(&mut w).unwrap();
    let took = start.elapsed();
    raiser.join().unwrap();
    assert_eq!(out.pages_sent, (64 << 10) / PAGE + (1 << 20) / PAGE);
    // Before the raise at most ~26 KiB could go: the pass cannot have
    // ended earlier, and after it nothing holds it back.
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[test]
fn mbps_moves_during_a_long_first_pass() {
    // 8 MiB of data at 16 MiB/s: a first pass of about half a second, in
    // chunks of 1 MiB. A query between chunks must never see mbps 0 once
    // data flows, although no pass has ended yet.
    let mem = memory(64 << 10, 8 << 20);
    fill(&mem, 1 << 40, 8);
    let params = PrecopyParams {
        max_bandwidth: 16 << 20,
        downtime_limit: Duration::from_millis(300),
    }
    .shared();
    let log = Arc::new(Recording::new(VmmDirtyLog::new(mem.clone())));
    let (mut saver, stats) = saver_over(&mem, &params, log.clone());
    let seen: Arc<Mutex<Vec<(u64, f64, u64)>>> = Arc::default();
    {
        let (stats, seen) = (stats.clone(), seen.clone());
        *log.on_clear.lock() = Some(Box::new(move |_| {
            let s = stats.snapshot();
            seen.lock().push((s.transferred, s.mbps, s.iterations));
        }));
    }
    let mut w = StreamWriter::new(io::sink());
    saver.setup(&mut w).unwrap();
    let setup_bytes = stats.snapshot().transferred;
    saver.iterate(&mut w).unwrap();
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 9, "one clear per chunk: {seen:?}");
    // From the third chunk on, two chunks were sent and measured.
    for &(transferred, mbps, iterations) in &seen[2..] {
        assert_eq!(iterations, 0, "still the first pass");
        assert!(transferred > setup_bytes + (64 << 10));
        assert!(mbps > 0.0, "mbps 0 after {transferred} bytes: {seen:?}");
    }
}
