//! Live-migration wire format (version 1): records, commands, return-path
//! messages and the preamble of every channel, hardened against hostile input.
#![deny(unsafe_code)]

pub mod block;
pub mod command;
pub mod error;
pub mod header;
pub mod limits;
pub mod record;
pub mod retpath;
mod wire;

pub use block::{BlockGeometry, BlockId, BlockInfo, BlockResolver, BlockTable};
pub use command::{AdviseFlags, Command, CommandTag, DeviceState, DiscardRange};
pub use error::{Error, Result, TagKind};
pub use header::{
    read_preamble, write_preamble, Hello, MigrationId, Role, MAGIC, PREAMBLE_LEN, VERSION,
};
pub use record::{FrameTag, PageHeader, PagePayload, RamFlags, Record, StreamReader, StreamWriter};
pub use retpath::{ReceivedBitmap, ReturnMessage, ReturnPathReader, ReturnPathWriter, ReturnTag};

#[cfg(test)]
mod hostile_tests;
