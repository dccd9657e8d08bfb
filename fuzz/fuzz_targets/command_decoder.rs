//! Feeds arbitrary bytes to the command decoder, command after command.
//! Every command it accepts must re-encode to the same bytes and decode to
//! the same value. Must never panic or allocate beyond the caps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_stream::{BlockInfo, BlockTable, Command};

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
    let mut input = data;
    while !input.is_empty() {
        let before = input;
        let Ok(cmd) = Command::decode(&mut input, &table) else {
            return;
        };
        let consumed = &before[..before.len() - input.len()];
        let mut out = Vec::new();
        cmd.encode(&mut out).expect("accepted command re-encodes");
        assert_eq!(out, consumed, "encoding is canonical");
        let again = Command::decode(&mut &out[..], &table).expect("re-decodes");
        assert_eq!(again, cmd);
    }
});
