//! Keepalive: the saver pings while it runs, also while the rate limiter
//! holds it back, and fails with a link error when the peer stops
//! answering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use migration_ram::{
    Error, ErrorKind, GuestMemoryMmap, Keepalive, PeerLiveness, PrecopyLoader, PrecopyParams,
    PrecopySaver, RamStats, VmmDirtyLog,
};
use migration_stream::{
    memory_pair, Command, Error as StreamError, Record, StreamReader, StreamWriter,
};

fn saver(src: &Arc<GuestMemoryMmap>, max_bandwidth: u64) -> PrecopySaver {
    PrecopySaver::new(
        src.clone(),
        blocks(src),
        Arc::new(VmmDirtyLog::new(src.clone())),
        PrecopyParams {
            max_bandwidth,
            downtime_limit: Duration::from_millis(300),
        }
        .shared(),
        Arc::new(RamStats::new()),
        Arc::new(AtomicBool::new(false)),
    )
}

/// Loads a stream into fresh memory, answering each ping by calling
/// `on_ping`; returns the ping values and how the stream ended.
fn load_with_pings<R: Read>(
    dst: &Arc<GuestMemoryMmap>,
    r: &mut StreamReader<R>,
    mut on_ping: impl FnMut(u32),
) -> (Vec<u32>, Result<Record, Error>) {
    let mut loader = PrecopyLoader::new(dst.clone(), blocks(dst), Arc::new(RamStats::new()));
    let mut pings = Vec::new();
    loop {
        match loader.load(r) {
            Ok(Record::Command(Command::Ping { value })) => {
                pings.push(value);
                on_ping(value);
            }
            other => return (pings, other),
        }
    }
}

#[test]
fn a_throttled_pass_pings_as_time_passes() {
    // 256 KiB of data at 512 KiB/s: about half a second.
    let src = memory(64 << 10, 192 << 10);
    fill(&src, 1 << 40, 41);
    let mut saver = saver(&src, 512 << 10);
    let liveness = PeerLiveness::shared();
    saver.set_keepalive(Some(Keepalive::new(
        Duration::from_millis(20),
        Duration::from_secs(3600),
        liveness,
    )));
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    let start = std::time::Instant::now();
    saver.iterate(&mut w).unwrap();
    let took = start.elapsed();
    saver.complete(&mut w).unwrap();
    w.write_complete().unwrap();
    let stream = w.into_inner().unwrap();
    let transferred = saver.stats().snapshot().transferred;
    // Everything but the caller's Complete byte, pings included.
    assert_eq!(transferred + 1, stream.len() as u64, "pings are counted");

    let dst = fresh_like(&src);
    let (pings, end) = load_with_pings(&dst, &mut StreamReader::new(&stream[..]), |_| {});
    assert_eq!(end.unwrap(), Record::Complete);
    assert_same(&src, &dst);
    // Pings every 20 ms at least, with the limiter holding the pass back
    // for most of its length.
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(pings.len() >= 5, "{} pings in {took:?}", pings.len());
    assert!(pings.windows(2).all(|p| p[1] == p[0] + 1), "{pings:?}");
}

#[test]
fn a_peer_that_answers_keeps_a_long_pass_alive() {
    // 1 MiB at 512 KiB/s: two seconds, against a timeout of 0.7 s.
    let src = memory(64 << 10, 1 << 20);
    fill(&src, 1 << 40, 42);
    let dst = fresh_like(&src);
    let (a, b) = memory_pair();
    let liveness = PeerLiveness::shared();
    let peer = {
        let (dst, liveness) = (dst.clone(), liveness.clone());
        let mut reader = b.reader;
        std::thread::spawn(move || {
            let mut r = StreamReader::new(&mut reader);
            // The return path's Pong, shortened: the reader hears it.
            load_with_pings(&dst, &mut r, |_| liveness.heard())
        })
    };
    let mut saver = saver(&src, 512 << 10);
    saver.set_keepalive(Some(Keepalive::new(
        Duration::from_millis(50),
        Duration::from_millis(700),
        liveness,
    )));
    let mut w = StreamWriter::new(a.writer);
    saver.setup(&mut w).unwrap();
    saver.iterate(&mut w).unwrap();
    saver.complete(&mut w).unwrap();
    w.write_complete().unwrap();
    w.flush().unwrap();
    drop(w);
    let (pings, end) = peer.join().unwrap();
    assert_eq!(end.unwrap(), Record::Complete);
    assert!(pings.len() >= 10, "{pings:?}");
    assert_same(&src, &dst);
}

#[test]
fn a_silent_peer_fails_even_a_one_byte_per_second_pass_with_a_link_error() {
    let src = memory(64 << 10, 1 << 20);
    fill(&src, 1 << 40, 43);
    // At 1 byte/s the first chunk would take days.
    let mut saver = saver(&src, 1);
    saver.set_keepalive(Some(Keepalive::new(
        Duration::from_millis(20),
        Duration::from_millis(200),
        PeerLiveness::shared(),
    )));
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    let err = saver.iterate(&mut w).unwrap_err();
    match &err {
        Error::PeerSilent { silent, timeout } => {
            assert!(silent > timeout, "{err}");
            assert_eq!(*timeout, Duration::from_millis(200));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Link);
    assert!(err.to_string().starts_with("no answer from the peer for "));
    saver.abort();
    // The chunk held back by the limiter is dirty again.
    let total: u64 = saver.blocks().iter().map(|b| b.pages()).sum();
    assert_eq!(saver.blocks().dirty_pages(), total);
    // What went out: RamSetup and pings only, all decodable.
    let stream = w.into_inner().unwrap();
    let dst = fresh_like(&src);
    let (pings, end) = load_with_pings(&dst, &mut StreamReader::new(&stream[..]), |_| {});
    assert!(
        matches!(end, Err(Error::Stream(StreamError::Closed))),
        "{end:?}"
    );
    assert!(pings.len() >= 2, "{pings:?}");
}

#[test]
fn no_keepalive_no_pings() {
    let src = memory(64 << 10, 64 << 10);
    let mut saver = saver(&src, 0);
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    saver.iterate(&mut w).unwrap();
    saver.complete(&mut w).unwrap();
    w.write_complete().unwrap();
    let stream = w.into_inner().unwrap();
    let dst = fresh_like(&src);
    let (pings, end) = load_with_pings(&dst, &mut StreamReader::new(&stream[..]), |_| {});
    assert_eq!(end.unwrap(), Record::Complete);
    assert!(pings.is_empty());
}
