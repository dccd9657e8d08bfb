//! Round trips against a model, and hostile input: truncation at every byte,
//! arbitrary bytes to every decoder, bit flips, oversized claims.
//!
//! Allocation is checked through the decoders' own accounting
//! ([`crate::wire::track_alloc`]): every buffer sized from a peer-supplied
//! length is recorded, and must stay proportional to the bytes the peer
//! actually sent.

use proptest::prelude::*;

use crate::block::{BlockId, BlockInfo, BlockTable};
use crate::command::tests::{all_commands, table};
use crate::command::{AdviseFlags, Command, DeviceState, DiscardRange};
use crate::error::Error;
use crate::header::{read_preamble, Hello, MigrationId, Role};
use crate::limits::READ_CHUNK;
use crate::record::{PageHeader, Record, StreamReader, StreamWriter};
use crate::retpath::tests::all_messages;
use crate::retpath::{ReceivedBitmap, ReturnMessage, ReturnPathReader, ReturnPathWriter};
use crate::wire::take_max_alloc;

/// Reads a whole main stream (preamble, frames up to `Complete`), learning
/// the block table from its `RamSetup` like a destination would, skipping
/// page payloads. Returns the number of frames.
pub(crate) fn drain_main(bytes: &[u8]) -> Result<usize, Error> {
    let mut src = bytes;
    read_preamble(&mut src)?;
    drain_frames(src)
}

fn drain_frames(bytes: &[u8]) -> Result<usize, Error> {
    let mut table = BlockTable::default();
    let mut r = StreamReader::new(bytes);
    let mut n = 0;
    loop {
        n += 1;
        match r.read_record(&table)? {
            Record::RamSetup(blocks) => table = BlockTable::new(blocks)?,
            Record::Page(_) => r.skip_page()?,
            Record::Command(Command::Packaged(data)) => {
                let mut p = StreamReader::for_package(&data);
                loop {
                    match p.read_record(&table) {
                        Ok(Record::Page(_)) => p.skip_page()?,
                        Ok(_) => {}
                        Err(Error::Closed) => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            Record::Complete => return Ok(n),
            _ => {}
        }
    }
}

fn drain_return_path(bytes: &[u8]) -> Result<usize, Error> {
    let t = table();
    let mut r = ReturnPathReader::new(bytes);
    let mut n = 0;
    loop {
        match r.read_message(&t) {
            Ok(_) => n += 1,
            Err(Error::Closed) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}

fn drain_commands(bytes: &[u8]) -> Result<usize, Error> {
    let t = table();
    let mut src = bytes;
    let mut n = 0;
    while !src.is_empty() {
        Command::decode(&mut src, &t)?;
        n += 1;
    }
    Ok(n)
}

/// A main stream using every frame and command; `huge` adds a 2 MiB page
/// before the end.
fn full_main_stream(huge: bool) -> Vec<u8> {
    let t = table();
    let mut w = StreamWriter::new(Vec::new());
    w.write_preamble(&Hello::new(Role::Main, MigrationId([9; 16])))
        .unwrap();
    w.write_ram_setup(t.blocks()).unwrap();
    w.write_command(&Command::Advise(AdviseFlags::POSTCOPY_RAM))
        .unwrap();
    w.write_page(BlockId(0), 0, &[0x5a; 4096]).unwrap();
    w.write_zero_page(BlockId(0), 4096).unwrap();
    w.write_page(BlockId(0), 8192, &[0xa5; 4096]).unwrap();
    w.write_zero_page(BlockId(1), 0).unwrap();
    w.write_end_of_section().unwrap();
    w.write_sync(1).unwrap();
    for c in all_commands() {
        if !matches!(c, Command::Packaged(_)) {
            w.write_command(&c).unwrap();
        }
    }
    let mut pkg = StreamWriter::new(Vec::new());
    pkg.write_command(&Command::DeviceState(DeviceState {
        name: "cpu0".into(),
        version: 1,
        data: vec![1, 2, 3],
    }))
    .unwrap();
    pkg.write_command(&Command::Listen).unwrap();
    pkg.write_command(&Command::Run).unwrap();
    w.write_command(&Command::Packaged(pkg.into_inner().unwrap()))
        .unwrap();
    if huge {
        w.write_page(BlockId(1), 2 << 20, &vec![7; 2 << 20][..])
            .unwrap();
    }
    w.write_complete().unwrap();
    w.into_inner().unwrap()
}

#[test]
fn full_stream_decodes() {
    assert_eq!(drain_main(&full_main_stream(true)).unwrap(), 23);
    assert_eq!(drain_main(&full_main_stream(false)).unwrap(), 22);
}

#[test]
fn truncated_main_stream_errors_at_every_byte() {
    let s = full_main_stream(true);
    // The 2 MiB page is long: test every byte up to it and a sample inside.
    let huge_start = s.len() - 1 - (2 << 20);
    let cuts = (0..huge_start + 64).chain((huge_start + 64..s.len()).step_by(4093));
    for cut in cuts {
        let err = drain_main(&s[..cut]).unwrap_err();
        assert!(err.is_disconnect(), "cut at {cut}: {err}");
    }
}

#[test]
fn truncated_return_path_errors_at_every_byte() {
    let mut w = ReturnPathWriter::new(Vec::new());
    for m in all_messages() {
        w.write_message(&m).unwrap();
    }
    let s = w.into_inner().unwrap();
    let mut boundaries = vec![0usize];
    {
        let t = table();
        let mut r = ReturnPathReader::new(&s[..]);
        while r.read_message(&t).is_ok() {
            boundaries.push(r.bytes_read() as usize);
        }
    }
    for cut in 0..s.len() {
        let res = drain_return_path(&s[..cut]);
        if boundaries.contains(&cut) {
            // A clean cut between messages is a clean close.
            assert!(res.is_ok(), "cut at {cut}");
        } else {
            assert!(
                matches!(res, Err(Error::Truncated { .. })),
                "cut at {cut}: {res:?}"
            );
        }
    }
}

#[test]
fn truncated_commands_error_at_every_byte() {
    for c in all_commands() {
        let mut buf = Vec::new();
        c.encode(&mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(
                matches!(
                    Command::decode(&mut &buf[..cut], &table()),
                    Err(Error::Truncated { .. })
                ),
                "{c:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn oversized_claims_allocate_nothing_big() {
    // A device state claiming the full 64 MiB but sending 10 bytes.
    let mut buf = vec![8u8];
    buf.extend_from_slice(&(6u32 + 1 + (64 << 20)).to_be_bytes());
    buf.extend_from_slice(&1u16.to_be_bytes());
    buf.extend_from_slice(b"d");
    buf.extend_from_slice(&0u32.to_be_bytes());
    buf.extend_from_slice(&[0; 10]);
    take_max_alloc();
    assert!(matches!(
        Command::decode(&mut &buf[..], &table()),
        Err(Error::Truncated { .. })
    ));
    assert!(take_max_alloc() <= READ_CHUNK);

    // A RAM setup claiming 4096 blocks and sending one.
    let mut buf = vec![1u8];
    buf.extend_from_slice(&4096u32.to_be_bytes());
    buf.extend_from_slice(&1u16.to_be_bytes());
    buf.push(b'a');
    buf.extend_from_slice(&4096u64.to_be_bytes());
    buf.extend_from_slice(&4096u32.to_be_bytes());
    take_max_alloc();
    assert!(StreamReader::new(&buf[..]).read_record(&()).is_err());
    assert!(take_max_alloc() < 4096);

    // A discard claiming 65536 ranges and sending none.
    let mut buf = vec![5u8];
    buf.extend_from_slice(&(8u32 + 16 * 65536).to_be_bytes());
    buf.extend_from_slice(&0u32.to_be_bytes());
    buf.extend_from_slice(&65536u32.to_be_bytes());
    take_max_alloc();
    assert!(Command::decode(&mut &buf[..], &table()).is_err());
    assert!(take_max_alloc() < 4096);

    // A received bitmap for a block of 2^40 pages, sending one word.
    let big = |b: BlockId| {
        (b.0 == 0).then_some(crate::block::BlockGeometry {
            size: 1 << 52,
            page_size: 4096,
        })
    };
    let mut buf = vec![5u8];
    buf.extend_from_slice(&u32::MAX.to_be_bytes());
    buf.extend_from_slice(&0u32.to_be_bytes());
    buf.extend_from_slice(&(1u64 << 40).to_be_bytes());
    buf.extend_from_slice(&[0; 8]);
    assert!(matches!(
        ReturnPathReader::new(&buf[..]).read_message(&big),
        Err(Error::TooLong { .. })
    ));
}

// ----- proptest strategies -----

fn arb_command() -> impl Strategy<Value = Command> {
    // Pages of block 0: 64 x 4 KiB; block 1: 4 x 2 MiB.
    let range0 = (0u64..64, 1u64..8).prop_filter_map("inside", |(p, n)| {
        (p + n <= 64).then_some(DiscardRange {
            offset: p * 4096,
            len: n * 4096,
        })
    });
    prop_oneof![
        (0u32..4).prop_filter_map("valid advise", |b| AdviseFlags::from_wire(b)
            .ok()
            .map(Command::Advise)),
        Just(Command::Listen),
        Just(Command::Run),
        Just(Command::Resume),
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(Command::Packaged),
        proptest::collection::vec(range0, 0..20).prop_map(|ranges| Command::Discard {
            block: BlockId(0),
            ranges
        }),
        (0u32..2).prop_map(|b| Command::RecvBitmapRequest { block: BlockId(b) }),
        (
            "[a-z0-9:/._-]{1,64}",
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(name, version, data)| Command::DeviceState(DeviceState {
                name,
                version,
                data
            })),
        any::<u32>().prop_map(|value| Command::Ping { value }),
    ]
}

fn arb_message() -> impl Strategy<Value = ReturnMessage> {
    prop_oneof![
        any::<u32>().prop_map(|status| ReturnMessage::Shut { status }),
        any::<u32>().prop_map(|value| ReturnMessage::Pong { value }),
        any::<u32>().prop_map(|value| ReturnMessage::ResumeAck { value }),
        (0u64..64, 1u64..=64).prop_filter_map("inside", |(p, n)| (p + n <= 64).then_some(
            ReturnMessage::PageRequest {
                block: BlockId(0),
                offset: p * 4096,
                len: n * 4096
            }
        )),
        (0u64..4).prop_map(|p| ReturnMessage::PageRequest {
            block: BlockId(1),
            offset: p << 21,
            len: 2 << 20
        }),
        proptest::collection::vec(any::<bool>(), 64).prop_map(|bits| {
            let mut bm = ReceivedBitmap::new(BlockId(0), 64).unwrap();
            for (i, b) in bits.into_iter().enumerate() {
                if b {
                    bm.set(i as u64);
                }
            }
            ReturnMessage::ReceivedBitmap(bm)
        }),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Page { block: u32, page: u64, fill: u8 },
    Zero { block: u32, page: u64 },
    EndOfSection,
    Sync(u64),
    Cmd(Command),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..64, any::<u8>()).prop_map(|(page, fill)| Op::Page { block: 0, page, fill }),
        1 => (0u64..4, any::<u8>()).prop_map(|(page, fill)| Op::Page { block: 1, page, fill }),
        3 => (0u32..2, 0u64..4).prop_map(|(block, page)| Op::Zero { block, page }),
        1 => Just(Op::EndOfSection),
        1 => any::<u64>().prop_map(Op::Sync),
        1 => arb_command().prop_map(Op::Cmd),
    ]
}

fn page_size(block: u32) -> u32 {
    if block == 0 {
        4096
    } else {
        2 << 20
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn commands_round_trip(cmds in proptest::collection::vec(arb_command(), 0..8)) {
        let mut buf = Vec::new();
        for c in &cmds {
            c.encode(&mut buf).unwrap();
        }
        let mut src = &buf[..];
        for c in &cmds {
            prop_assert_eq!(&Command::decode(&mut src, &table()).unwrap(), c);
        }
        prop_assert!(src.is_empty());
    }

    #[test]
    fn return_messages_round_trip(msgs in proptest::collection::vec(arb_message(), 0..16)) {
        let mut w = ReturnPathWriter::new(Vec::new());
        for m in &msgs {
            w.write_message(m).unwrap();
        }
        let buf = w.into_inner().unwrap();
        let mut r = ReturnPathReader::new(&buf[..]);
        for m in &msgs {
            prop_assert_eq!(&r.read_message(&table()).unwrap(), m);
        }
        prop_assert!(matches!(r.read_message(&table()), Err(Error::Closed)));
    }

    #[test]
    fn records_round_trip_against_model(ops in proptest::collection::vec(arb_op(), 0..24)) {
        let t = table();
        let mut w = StreamWriter::with_capacity(4096, Vec::new());
        w.write_ram_setup(t.blocks()).unwrap();
        for op in &ops {
            match op {
                Op::Page { block, page, fill } => {
                    let ps = page_size(*block);
                    let data = vec![*fill; ps as usize];
                    w.write_page(BlockId(*block), page * u64::from(ps), &data).unwrap();
                }
                Op::Zero { block, page } => {
                    w.write_zero_page(BlockId(*block), page * u64::from(page_size(*block))).unwrap();
                }
                Op::EndOfSection => w.write_end_of_section().unwrap(),
                Op::Sync(i) => w.write_sync(*i).unwrap(),
                Op::Cmd(c) => w.write_command(c).unwrap(),
            }
        }
        w.write_complete().unwrap();
        let buf = w.into_inner().unwrap();

        let mut r = StreamReader::new(&buf[..]);
        prop_assert_eq!(r.read_record(&()).unwrap(), Record::RamSetup(t.blocks().to_vec()));
        let mut dst = vec![0u8; 2 << 20];
        for op in &ops {
            let rec = r.read_record(&t).unwrap();
            match op {
                Op::Page { block, page, fill } => {
                    let ps = page_size(*block);
                    prop_assert_eq!(rec, Record::Page(PageHeader {
                        block: BlockId(*block), offset: page * u64::from(ps), page_size: ps,
                    }));
                    let dst = &mut dst[..ps as usize];
                    r.read_page_into(dst).unwrap();
                    prop_assert!(*dst == vec![*fill; ps as usize][..]);
                }
                Op::Zero { block, page } => {
                    let ps = page_size(*block);
                    prop_assert_eq!(rec, Record::ZeroPage(PageHeader {
                        block: BlockId(*block), offset: page * u64::from(ps), page_size: ps,
                    }));
                }
                Op::EndOfSection => prop_assert_eq!(rec, Record::EndOfSection),
                Op::Sync(i) => prop_assert_eq!(rec, Record::Sync { iteration: *i }),
                Op::Cmd(c) => prop_assert_eq!(rec, Record::Command(c.clone())),
            }
        }
        prop_assert_eq!(r.read_record(&t).unwrap(), Record::Complete);
    }

    #[test]
    fn block_lists_round_trip(blocks in proptest::collection::vec(
        ("[a-zA-Z0-9._/-]{1,40}", 12u32..=30, 1u64..1024), 0..16)
    ) {
        let mut seen = std::collections::HashSet::new();
        let blocks: Vec<BlockInfo> = blocks
            .into_iter()
            .filter(|(n, _, _)| seen.insert(n.clone()))
            .map(|(name, shift, pages)| BlockInfo { name, size: pages << shift, page_size: 1 << shift })
            .collect();
        let mut w = StreamWriter::new(Vec::new());
        w.write_ram_setup(&blocks).unwrap();
        let buf = w.into_inner().unwrap();
        prop_assert_eq!(
            StreamReader::new(&buf[..]).read_record(&()).unwrap(),
            Record::RamSetup(blocks)
        );
    }
}

/// Allocation allowed for an input of `len` bytes: one read chunk plus a
/// small multiple of the input.
fn alloc_bound(len: usize) -> usize {
    READ_CHUNK + 64 * len + 4096
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_main(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        take_max_alloc();
        let _ = drain_main(&bytes);
        let _ = drain_frames(&bytes);
        prop_assert!(take_max_alloc() <= alloc_bound(bytes.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic_commands(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        take_max_alloc();
        let _ = drain_commands(&bytes);
        prop_assert!(take_max_alloc() <= alloc_bound(bytes.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic_return_path(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        take_max_alloc();
        let _ = drain_return_path(&bytes);
        prop_assert!(take_max_alloc() <= alloc_bound(bytes.len()));
    }

    #[test]
    fn arbitrary_frames_after_valid_prefix(tail in proptest::collection::vec(any::<u8>(), 0..1024)) {
        // Hostile frames after a valid preamble and RAM setup reach the
        // deeper decoders (pages, commands) rather than failing on magic.
        let mut w = StreamWriter::new(Vec::new());
        w.write_preamble(&Hello::new(Role::Main, MigrationId::default())).unwrap();
        w.write_ram_setup(table().blocks()).unwrap();
        let mut buf = w.into_inner().unwrap();
        buf.extend_from_slice(&tail);
        take_max_alloc();
        let _ = drain_main(&buf);
        prop_assert!(take_max_alloc() <= alloc_bound(buf.len()));
    }

    #[test]
    fn bit_flips_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut s = full_main_stream(false);
        for (at, x) in flips {
            let i = at % s.len();
            s[i] ^= x;
        }
        take_max_alloc();
        let _ = drain_main(&s);
        prop_assert!(take_max_alloc() <= alloc_bound(s.len()));
    }
}
