//! A whole migration session through the public API only, over in-memory
//! connections, with the threads a real controller runs: the source's
//! migration and return-path threads, the destination's main load thread
//! and its preempt thread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::thread;

use migration_stream::{
    memory_pair, read_preamble, AdviseFlags, BlockId, BlockInfo, BlockTable, Command, DeviceState,
    Hello, MigrationId, Record, ReturnMessage, ReturnPathReader, ReturnPathWriter, Role,
    StreamReader, StreamWriter,
};

const PAGES: u64 = 32;
const PAGE: usize = 4096;

fn blocks() -> Vec<BlockInfo> {
    vec![BlockInfo {
        name: "pc.ram".into(),
        size: PAGES * PAGE as u64,
        page_size: PAGE as u32,
    }]
}

fn guest_page(i: u64) -> Vec<u8> {
    if i % 4 == 0 {
        vec![0; PAGE]
    } else {
        vec![i as u8; PAGE]
    }
}

#[test]
fn precopy_then_postcopy_with_preempt() {
    let id = MigrationId::generate();
    let (src_main, dst_main) = memory_pair();
    let (src_pre, dst_pre) = memory_pair();

    // Source: migration thread on the main channel, return-path thread,
    // and urgent pages on the preempt channel.
    let source = thread::spawn(move || {
        let table = BlockTable::new(blocks()).unwrap();
        let (req_tx, req_rx) = mpsc::channel();
        let mut rp = src_main.reader;
        let rp_thread = thread::spawn(move || {
            read_preamble(&mut rp)
                .unwrap()
                .expect(Role::ReturnPath, id)
                .unwrap();
            let mut r = ReturnPathReader::new(rp);
            let mut pongs = Vec::new();
            loop {
                match r.read_message(&table).unwrap() {
                    ReturnMessage::Pong { value } => pongs.push(value),
                    m @ ReturnMessage::PageRequest { .. } => req_tx.send(m).unwrap(),
                    ReturnMessage::Shut { status } => return (pongs, status),
                    m => panic!("unexpected {m:?}"),
                }
            }
        });

        let mut pre = StreamWriter::new(src_pre.writer);
        pre.write_preamble(&Hello::new(Role::PostcopyPreempt, id))
            .unwrap();
        pre.flush().unwrap();

        let mut w = StreamWriter::new(src_main.writer);
        w.write_preamble(&Hello::new(Role::Main, id)).unwrap();
        w.write_ram_setup(&blocks()).unwrap();
        w.write_command(&Command::Advise(
            AdviseFlags::POSTCOPY_RAM | AdviseFlags::POSTCOPY_PREEMPT,
        ))
        .unwrap();
        // Precopy: the first half of the pages, then a sync and a ping.
        for i in 0..PAGES / 2 {
            let data = guest_page(i);
            if data.iter().all(|&b| b == 0) {
                w.write_zero_page(BlockId(0), i * PAGE as u64).unwrap();
            } else {
                w.write_page(BlockId(0), i * PAGE as u64, &data).unwrap();
            }
        }
        w.write_end_of_section().unwrap();
        w.write_sync(1).unwrap();
        w.write_command(&Command::Ping { value: 1 }).unwrap();
        w.flush().unwrap();

        // Postcopy switch.
        let mut pkg = StreamWriter::new(Vec::new());
        pkg.write_command(&Command::DeviceState(DeviceState {
            name: "cpu0".into(),
            version: 1,
            data: b"registers".to_vec(),
        }))
        .unwrap();
        pkg.write_command(&Command::Listen).unwrap();
        pkg.write_command(&Command::Run).unwrap();
        w.write_command(&Command::Packaged(pkg.into_inner().unwrap()))
            .unwrap();
        w.flush().unwrap();

        // The destination faults on the last page: answer on preempt.
        let ReturnMessage::PageRequest { block, offset, len } = req_rx.recv().unwrap() else {
            unreachable!()
        };
        assert_eq!((block, offset, len), (BlockId(0), (PAGES - 1) * 4096, 4096));
        pre.write_page(block, offset, &guest_page(PAGES - 1))
            .unwrap();
        pre.flush().unwrap();
        // Background pages on the main channel.
        for i in PAGES / 2..PAGES - 1 {
            w.write_page(BlockId(0), i * PAGE as u64, &guest_page(i))
                .unwrap();
        }
        w.write_end_of_section().unwrap();
        w.write_complete().unwrap();
        w.flush().unwrap();
        drop(pre);
        rp_thread.join().unwrap()
    });

    // Destination: preempt thread and main load thread share guest memory
    // through a channel of placed pages (a real one writes guest RAM).
    let (placed_tx, placed_rx) = mpsc::channel::<(u64, Vec<u8>)>();
    let pre_tx = placed_tx.clone();
    let preempt = thread::spawn(move || {
        let mut r = dst_pre.reader;
        read_preamble(&mut r)
            .unwrap()
            .expect(Role::PostcopyPreempt, id)
            .unwrap();
        let table = BlockTable::new(blocks()).unwrap();
        let mut r = StreamReader::new(r);
        let mut buf = vec![0u8; PAGE];
        loop {
            match r.read_record(&table) {
                Ok(Record::Page(p)) => {
                    r.read_page_into(&mut buf).unwrap();
                    pre_tx.send((p.offset, buf.clone())).unwrap();
                }
                Ok(other) => panic!("unexpected on preempt: {other:?}"),
                Err(e) => {
                    assert!(e.is_disconnect(), "{e}");
                    return;
                }
            }
        }
    });

    let mut r = dst_main.reader;
    read_preamble(&mut r)
        .unwrap()
        .expect(Role::Main, id)
        .unwrap();
    let mut rp = ReturnPathWriter::new(dst_main.writer);
    rp.write_preamble(&Hello::new(Role::ReturnPath, id))
        .unwrap();
    rp.flush().unwrap();
    let mut r = StreamReader::new(r);
    let Record::RamSetup(announced) = r.read_record(&()).unwrap() else {
        panic!("expected RAM setup");
    };
    assert_eq!(announced, blocks());
    let table = BlockTable::new(announced).unwrap();
    let mut buf = vec![0u8; PAGE];
    let mut devices = Vec::new();
    let mut syncs = 0;
    loop {
        match r.read_record(&table).unwrap() {
            Record::Page(p) => {
                r.read_page_into(&mut buf).unwrap();
                placed_tx.send((p.offset, buf.clone())).unwrap();
            }
            Record::ZeroPage(p) => placed_tx.send((p.offset, vec![0; PAGE])).unwrap(),
            Record::Sync { .. } => syncs += 1,
            Record::Command(Command::Ping { value }) => {
                rp.send(&ReturnMessage::Pong { value }).unwrap();
            }
            Record::Command(Command::Packaged(data)) => {
                let mut p = StreamReader::for_package(&data);
                loop {
                    match p.read_record(&table) {
                        Ok(Record::Command(Command::DeviceState(d))) => devices.push(d),
                        Ok(Record::Command(Command::Run)) => {
                            // vCPUs run and fault on the last page.
                            rp.send(&ReturnMessage::PageRequest {
                                block: BlockId(0),
                                offset: (PAGES - 1) * 4096,
                                len: 4096,
                            })
                            .unwrap();
                        }
                        Ok(_) => {}
                        Err(e) => {
                            assert!(e.is_disconnect());
                            break;
                        }
                    }
                }
            }
            Record::Command(_) | Record::EndOfSection | Record::RamSetup(_) => {}
            Record::Complete => break,
        }
    }
    preempt.join().unwrap();
    rp.send(&ReturnMessage::Shut { status: 0 }).unwrap();
    drop(placed_tx);

    let mut guest = vec![0xffu8; PAGES as usize * PAGE];
    for (offset, data) in placed_rx {
        guest[offset as usize..offset as usize + PAGE].copy_from_slice(&data);
    }
    for i in 0..PAGES {
        let at = i as usize * PAGE;
        assert_eq!(guest[at..at + PAGE], guest_page(i)[..], "page {i}");
    }
    assert_eq!(syncs, 1);
    assert_eq!(devices.len(), 1);
    let (pongs, status) = source.join().unwrap();
    assert_eq!(pongs, [1]);
    assert_eq!(status, 0);
}
