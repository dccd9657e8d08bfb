//! Feeds arbitrary bytes to the main-channel decoder: preamble (when the
//! first byte is even), then frames until an error or `Complete`, learning
//! the block table from `RamSetup` as a destination does and reading page
//! payloads into a caller buffer. Decoded `Packaged` blobs are decoded in
//! turn. Must never panic or allocate beyond the caps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_stream::{
    read_preamble, BlockInfo, BlockTable, Command, Record, StreamReader, StreamWriter,
};

fn default_table() -> BlockTable {
    BlockTable::new(vec![
        BlockInfo {
            name: "ram0".into(),
            size: 64 * 4096,
            page_size: 4096,
        },
        BlockInfo {
            name: "huge".into(),
            size: 4 << 21,
            page_size: 2 << 20,
        },
    ])
    .expect("valid table")
}

fn drain(mut r: StreamReader<&[u8]>, table: &mut BlockTable, buf: &mut [u8], depth: u8) {
    loop {
        let rec = match r.read_record(&*table) {
            Ok(rec) => rec,
            Err(_) => return,
        };
        match rec {
            Record::RamSetup(blocks) => {
                // Decoded blocks always pass the table's own validation.
                *table = BlockTable::new(blocks.clone()).expect("decoder validated blocks");
                // Round trip: what the decoder accepted, the encoder writes.
                let mut w = StreamWriter::new(Vec::new());
                w.write_ram_setup(&blocks).expect("re-encode setup");
            }
            Record::Page(p) => {
                let size = p.page_size as usize;
                let res = if size <= buf.len() {
                    r.read_page_into(&mut buf[..size])
                } else {
                    r.skip_page()
                };
                if res.is_err() {
                    return;
                }
            }
            Record::Command(Command::Packaged(data)) => {
                assert!(depth == 0, "nested package accepted");
                drain(StreamReader::for_package(&data), table, buf, depth + 1);
            }
            Record::Command(c) => {
                let mut out = Vec::new();
                c.encode(&mut out).expect("re-encode command");
            }
            Record::Complete => return,
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 && read_preamble(&mut rest).is_err() {
        return;
    }
    let mut table = default_table();
    let mut buf = vec![0u8; 64 << 10];
    drain(
        StreamReader::with_capacity(4096, rest),
        &mut table,
        &mut buf,
        0,
    );
});
