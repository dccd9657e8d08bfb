//! Live-migration wire format (version 1): records, commands, return-path
//! messages and the preamble of every channel, hardened against hostile input.
#![deny(unsafe_code)]

pub mod block;
pub mod command;
pub mod error;
pub mod header;
pub mod limits;
pub mod memory_pipe;
pub mod record;
pub mod retpath;
pub mod transport;
pub mod uri;
mod wire;

pub use block::{BlockGeometry, BlockId, BlockInfo, BlockResolver, BlockTable};
pub use command::{AdviseFlags, Command, CommandTag, DeviceState, DiscardRange};
pub use error::{Error, Result, TagKind};
pub use header::{
    read_preamble, write_preamble, Hello, MigrationId, Role, MAGIC, PREAMBLE_LEN, VERSION,
};
pub use record::{FrameTag, PageHeader, PagePayload, RamFlags, Record, StreamReader, StreamWriter};
pub use retpath::{ReceivedBitmap, ReturnMessage, ReturnPathReader, ReturnPathWriter, ReturnTag};
pub use transport::{
    connect, connect_str, memory_pair, memory_pair_with_capacity, BoxedReader, BoxedWriter,
    Connection, ConnectionHandle, Listener, ListenerCanceller, TransportError,
};
pub use uri::{MigrationUri, UriError};

#[cfg(test)]
mod hostile_tests;
