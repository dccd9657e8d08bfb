//! A hostile or broken source against the loader: each bad stream is a
//! clear error, and guest memory is left exactly as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use migration_ram::{Error, GuestMemoryMmap, PrecopyLoader, RamStats};
use migration_stream::{BlockId, BlockInfo, Error as StreamError, StreamReader, StreamWriter};
use vm_memory::{Bytes, GuestAddress};

/// A destination whose memory holds a pattern, so that any write shows.
fn destination() -> (Arc<GuestMemoryMmap>, PrecopyLoader, Vec<Vec<u8>>) {
    let mem = memory(640 << 10, 1 << 20);
    fill(&mem, 5, 77);
    let before = snapshot(&mem);
    let loader = PrecopyLoader::new(mem.clone(), blocks(&mem), Arc::new(RamStats::new()));
    (mem, loader, before)
}

fn good_setup() -> Vec<BlockInfo> {
    vec![
        BlockInfo {
            name: NAMES[0].into(),
            size: 640 << 10,
            page_size: 4096,
        },
        BlockInfo {
            name: NAMES[1].into(),
            size: 1 << 20,
            page_size: 4096,
        },
    ]
}

fn stream(f: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    f(&mut w);
    w.into_inner().unwrap()
}

fn load(loader: &mut PrecopyLoader, bytes: &[u8]) -> (Error, u64) {
    let mut r = StreamReader::new(bytes);
    let err = loader.load(&mut r).unwrap_err();
    (err, r.bytes_read())
}

#[test]
fn a_page_before_ram_setup_is_refused() {
    let (mem, mut loader, before) = destination();
    let bytes = stream(|w| w.write_page(BlockId(0), 0x2000, &[0xee; 4096]).unwrap());
    let (err, _) = load(&mut loader, &bytes);
    assert!(
        matches!(
            err,
            Error::PageBeforeSetup {
                block: BlockId(0),
                offset: 0x2000
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "page for RAM block #0 at offset 0x2000 before the RAM setup record"
    );
    assert_eq!(snapshot(&mem), before);
    // Zero pages too.
    let bytes = stream(|w| w.write_zero_page(BlockId(1), 0).unwrap());
    assert!(matches!(
        load(&mut loader, &bytes).0,
        Error::PageBeforeSetup { .. }
    ));
    assert_eq!(snapshot(&mem), before);
    assert_eq!(loader.received_pages(), 0);
}

#[test]
fn a_ram_setup_that_does_not_match_is_refused_by_name() {
    let mut cases: Vec<(Vec<BlockInfo>, &str)> = Vec::new();
    let mut bad = good_setup();
    bad[1].name = "pc.ram.other".into();
    cases.push((
        bad,
        "RAM block #1 is named \"pc.ram.other\" by the source, \"pc.ram.high\" here",
    ));
    let mut bad = good_setup();
    bad[0].size = 1 << 20;
    cases.push((
        bad,
        "RAM block \"pc.ram\" has size 0x100000 on the source, 0xa0000 here",
    ));
    let mut bad = good_setup();
    bad[1].page_size = 2 << 20;
    bad[1].size = 2 << 20;
    cases.push((
        bad,
        "RAM block \"pc.ram.high\" has size 0x200000 on the source, 0x100000 here",
    ));
    let mut bad = good_setup();
    bad[1].page_size = 64 << 10;
    cases.push((
        bad,
        "RAM block \"pc.ram.high\" has page size 0x10000 on the source, 0x1000 here",
    ));
    let bad = good_setup()[..1].to_vec();
    cases.push((bad, "source announced 1 RAM blocks, destination has 2"));

    for (announced, message) in cases {
        let (mem, mut loader, before) = destination();
        let bytes = stream(|w| {
            w.write_ram_setup(&announced).unwrap();
            w.write_page(BlockId(0), 0, &[1; 4096]).unwrap();
        });
        let (err, _) = load(&mut loader, &bytes);
        assert_eq!(err.to_string(), message);
        assert_eq!(snapshot(&mem), before);
        // The loader still refuses pages.
        let page = stream(|w| w.write_zero_page(BlockId(0), 0).unwrap());
        assert!(matches!(
            load(&mut loader, &page).0,
            Error::PageBeforeSetup { .. }
        ));
    }
}

#[test]
fn offsets_are_checked_against_the_destination_before_the_payload() {
    // (block, offset, what the decoder says)
    let cases = [
        (0u32, 640u64 << 10, "outside"),
        (1, 1 << 20, "outside"),
        (0, 0x100, "not aligned"),
        (7, 0, "unknown RAM block #7"),
    ];
    for (block, offset, says) in cases {
        let (mem, mut loader, before) = destination();
        let setup = stream(|w| w.write_ram_setup(&good_setup()).unwrap());
        let bytes = stream(|w| {
            w.write_ram_setup(&good_setup()).unwrap();
            w.write_page(BlockId(block), offset, &[0xcc; 4096]).unwrap();
        });
        let (err, read) = load(&mut loader, &bytes);
        let Error::Stream(inner) = &err else {
            panic!("{err:?}");
        };
        assert!(
            matches!(
                inner,
                StreamError::OutOfRange { .. }
                    | StreamError::Misaligned { .. }
                    | StreamError::UnknownBlock { .. }
            ),
            "{inner:?}"
        );
        assert!(inner.to_string().contains(says), "{inner}");
        // The record head (14 bytes) was read, not one payload byte.
        assert_eq!(read, setup.len() as u64 + 14);
        assert_eq!(snapshot(&mem), before);
    }
}

#[test]
fn a_truncated_payload_never_reaches_guest_memory() {
    let (mem, mut loader, before) = destination();
    let mut bytes = stream(|w| {
        w.write_ram_setup(&good_setup()).unwrap();
        w.write_page(BlockId(1), 0x3000, &[0xdd; 4096]).unwrap();
        w.write_page(BlockId(1), 0x4000, &[0xdd; 4096]).unwrap();
    });
    // The second payload loses its last 100 bytes.
    bytes.truncate(bytes.len() - 100);
    let (err, _) = load(&mut loader, &bytes);
    assert!(err.is_disconnect(), "{err:?}");
    // The first page landed, the second did not, not even in part.
    let after = snapshot(&mem);
    assert_eq!(&after[1][0x3000..0x4000], &[0xdd; 4096][..]);
    assert_eq!(after[0], before[0]);
    assert_eq!(after[1][..0x3000], before[1][..0x3000]);
    assert_eq!(after[1][0x4000..], before[1][0x4000..]);
    assert_eq!(loader.received_pages(), 1);
    let high = loader.blocks().by_name(NAMES[1]).unwrap().1;
    assert!(high.received().test(3) && !high.received().test(4));
}

#[test]
fn a_second_ram_setup_is_refused() {
    let (_, mut loader, _) = destination();
    let bytes = stream(|w| {
        w.write_ram_setup(&good_setup()).unwrap();
        w.write_ram_setup(&good_setup()).unwrap();
    });
    assert!(matches!(load(&mut loader, &bytes).0, Error::SetupRepeated));
}

#[test]
fn zero_pages_clear_whatever_memory_held() {
    // Non-zero memory on purpose: whatever the destination held (firmware,
    // an earlier failed attempt) is replaced by what the source sends.
    let (mem, mut loader, _) = destination();
    let bytes = stream(|w| {
        w.write_ram_setup(&good_setup()).unwrap();
        // Page 1 of "pc.ram" arrives, then turns into zeros.
        w.write_page(BlockId(0), 0x1000, &[0xab; 4096]).unwrap();
        w.write_zero_page(BlockId(0), 0x1000).unwrap();
        // Page 2 was never received, and held something here.
        w.write_zero_page(BlockId(0), 0x2000).unwrap();
        w.write_complete().unwrap();
    });
    let mut r = StreamReader::new(&bytes[..]);
    loader.load(&mut r).unwrap();
    let after = snapshot(&mem);
    assert_eq!(&after[0][0x1000..0x2000], &[0u8; 4096][..]);
    assert_eq!(&after[0][0x2000..0x3000], &[0u8; 4096][..]);
    assert_eq!(loader.received_pages(), 2);
    let s = loader.stats().snapshot();
    assert_eq!((s.normal, s.duplicate), (1, 2));

    // A destination that is not fresh writes every zero page.
    let (mem, mut loader, _) = destination();
    loader.set_fresh_memory(false);
    let mut r = StreamReader::new(&bytes[..]);
    loader.load(&mut r).unwrap();
    let mut page = [1u8; 4096];
    mem.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
    assert_eq!(page, [0u8; 4096]);
}
