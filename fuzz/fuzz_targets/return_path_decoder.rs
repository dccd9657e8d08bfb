//! Feeds arbitrary bytes to the return-path decoder, message after message,
//! with a block table. Every accepted message sequence must re-encode and
//! decode to the same values. Must never panic or allocate beyond the caps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_stream::{BlockInfo, BlockTable, ReturnPathReader, ReturnPathWriter};

fuzz_target!(|data: &[u8]| {
    let table = BlockTable::new(vec![
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
    .expect("valid table");
    let mut r = ReturnPathReader::new(data);
    let mut msgs = Vec::new();
    while let Ok(m) = r.read_message(&table) {
        msgs.push(m);
    }
    let mut w = ReturnPathWriter::new(Vec::new());
    for m in &msgs {
        w.write_message(m).expect("accepted message re-encodes");
    }
    let out = w.into_inner().expect("flush to a Vec");
    let mut r = ReturnPathReader::new(&out[..]);
    for m in &msgs {
        assert_eq!(&r.read_message(&table).expect("re-decodes"), m);
    }
});
