//! The saver sends through a page scheduler, on the channels it names:
//! requested pages first and on the preempt channel, the rest on the main
//! one; a batch for a channel the caller lacks fails and loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::*;
use migration_ram::{
    Channel, Channels, Error, ErrorKind, GuestMemoryMmap, PrecopyLoader, PrecopyParams,
    PrecopySaver, RamStats, RequestFirst, VmmDirtyLog,
};
use migration_stream::{BlockId, Error as StreamError, Record, StreamReader, StreamWriter};

fn saver(src: &Arc<GuestMemoryMmap>) -> PrecopySaver {
    PrecopySaver::new(
        src.clone(),
        blocks(src),
        Arc::new(VmmDirtyLog::new(src.clone())),
        PrecopyParams {
            max_bandwidth: 0,
            ..PrecopyParams::default()
        }
        .shared(),
        Arc::new(RamStats::new()),
        Arc::new(AtomicBool::new(false)),
    )
}

/// The (block, offset) of every page record of a stream, in order.
fn pages_of(stream: &[u8], src: &GuestMemoryMmap) -> Vec<(u32, u64)> {
    let b = blocks(src);
    let mut r = StreamReader::new(stream);
    let mut out = Vec::new();
    loop {
        match r.read_record(&b) {
            Ok(Record::Page(h)) => {
                r.skip_page().unwrap();
                out.push((h.block.0, h.offset));
            }
            Ok(Record::ZeroPage(h)) => out.push((h.block.0, h.offset)),
            Ok(_) => {}
            Err(StreamError::Closed) => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn requested_pages_go_first_on_the_preempt_channel_and_the_rest_on_main() {
    let src = memory(640 << 10, 3 << 20);
    fill(&src, 4, 31);
    let total_pages = (640 << 10) / PAGE + (3 << 20) / PAGE;
    let mut saver = saver(&src).with_scheduler(Box::new(RequestFirst::new(true)));
    let mut ch =
        Channels::with_preempt(StreamWriter::new(Vec::new()), StreamWriter::new(Vec::new()));
    saver.setup(&mut ch).unwrap();
    // Requests of a faulting destination: two pages of the high block
    // (one of them zero), one of the low one; one asked twice.
    let requests = [(1, 700), (1, 700), (0, 3), (1, 4)];
    for (b, p) in requests {
        saver.request_page(BlockId(b), p).unwrap();
    }
    let out = saver.iterate(&mut ch).unwrap();
    assert_eq!(out.pages_sent, total_pages);
    saver.complete(&mut ch).unwrap();
    ch.main.write_complete().unwrap();
    let main = ch.main.into_inner().unwrap();
    let preempt = ch.preempt.take().unwrap().into_inner().unwrap();

    // The preempt channel has exactly the requested pages, once each, in
    // request order; the main channel everything else, once.
    let on_preempt = pages_of(&preempt, &src);
    assert_eq!(
        on_preempt,
        vec![(1, 700 * PAGE), (0, 3 * PAGE), (1, 4 * PAGE)]
    );
    let on_main = pages_of(&main, &src);
    assert_eq!(on_main.len() as u64, total_pages - 3);
    for p in &on_preempt {
        assert!(!on_main.contains(p), "{p:?} sent on both channels");
    }
    // After the last request the scan went on in block 1 from page 5's
    // chunk (pages 0..256 of it, less page 4).
    assert_eq!(on_main[0], (1, 0));
    assert_eq!(on_main[4], (1, 5 * PAGE));

    // Both streams together rebuild the guest.
    let dst = fresh_like(&src);
    let mut loader = PrecopyLoader::new(dst.clone(), blocks(&dst), Arc::new(RamStats::new()));
    let mut r = StreamReader::new(&main[..]);
    assert_eq!(loader.load(&mut r).unwrap(), Record::Complete);
    let mut r = StreamReader::new(&preempt[..]);
    assert!(matches!(
        loader.load(&mut r),
        Err(Error::Stream(StreamError::Closed))
    ));
    assert_eq!(loader.received_pages(), total_pages);
    assert_same(&src, &dst);
}

#[test]
fn a_batch_for_a_missing_channel_fails_and_keeps_its_pages_dirty() {
    let src = memory(64 << 10, 1 << 20);
    fill(&src, 1 << 40, 32);
    let mut saver = saver(&src).with_scheduler(Box::new(RequestFirst::new(true)));
    // One writer: only the main channel.
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    let setup_len = w.bytes_written();
    saver.request_page(BlockId(1), 9).unwrap();
    let err = saver.iterate(&mut w).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoChannel {
                channel: Channel::Preempt
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Local);
    assert_eq!(w.bytes_written(), setup_len, "nothing was written");
    let total: u64 = saver.blocks().iter().map(|b| b.pages()).sum();
    assert_eq!(saver.blocks().dirty_pages(), total, "no dirty bit lost");
    saver.abort();
}

#[test]
fn hostile_requests_to_the_saver_change_nothing() {
    let src = memory(64 << 10, 1 << 20);
    let mut saver = saver(&src).with_scheduler(Box::new(RequestFirst::new(false)));
    let mut w = StreamWriter::new(Vec::new());
    saver.setup(&mut w).unwrap();
    let e = saver.request_page(BlockId(7), 0).unwrap_err();
    assert!(matches!(e, Error::UnknownBlock { .. }), "{e:?}");
    let e = saver.request_page(BlockId(0), 16).unwrap_err();
    assert!(
        matches!(
            e,
            Error::PageOutOfRange {
                page: 16,
                pages: 16,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::Protocol);
    // The default scheduler serves no requests at all.
    let mut plain = saver_default(&src);
    let e = plain.request_page(BlockId(0), 0).unwrap_err();
    assert!(matches!(e, Error::RequestsUnsupported { .. }), "{e:?}");
    // The pass is the plain scan.
    let out = saver.iterate(&mut w).unwrap();
    assert_eq!(out.pages_sent, 16 + 256);
    let stream = w.into_inner().unwrap();
    let sent = pages_of(&stream, &src);
    let mut sorted = sent.clone();
    sorted.sort_unstable();
    assert_eq!(sent, sorted, "in order");
}

fn saver_default(src: &Arc<GuestMemoryMmap>) -> PrecopySaver {
    saver(src)
}
