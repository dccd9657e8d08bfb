//! The live-migration wire format (version 1), its channels and transports.
//!
//! This crate is the byte layer under `migration-ram`: it encodes and
//! decodes everything the source and destination of a migration say to each
//! other, and opens the connections they say it over. Its only unsafe code
//! is one `setsockopt` call (in `transport/sockopt.rs`, for the socket
//! options the standard library lacks), and it has no KVM; the only threads it starts are the scoped ones
//! [`Listener::accept_hello`] reads hellos on, all joined before it returns.
//! It treats every byte it reads as hostile. The complete format, with byte
//! tables, is in `docs/wire-format.md`. It also defines the snapshot file
//! format ([`snapshot`], `docs/snapshot-format.md`): RAM pages at fixed
//! offsets, for background snapshots and lazy restore.
//!
//! # Modules
//!
//! | module        | holds                                                                 |
//! |---------------|-----------------------------------------------------------------------|
//! | [`header`]    | the preamble: magic, version, [`Hello`], [`MigrationId`] (a v4 UUID)  |
//! | [`record`]    | main and preempt channel frames: [`StreamWriter`], [`StreamReader`]   |
//! | [`command`]   | the [`Command`]s a `Command` frame carries                            |
//! | [`retpath`]   | return-path messages: [`ReturnPathWriter`], [`ReturnPathReader`]      |
//! | [`block`]     | RAM block tables and the [`BlockResolver`] pages are checked against  |
//! | [`limits`]    | the caps every length is checked against                              |
//! | [`error`]     | [`Error`] and [`ErrorKind`] (link, protocol, local)                   |
//! | [`transport`] | [`connect`], [`Listener`] ([`Listener::accept_hello`]), [`memory_pair`], [`ConnectionHandle`] (shutdown, link timeout) |
//! | [`uri`]       | [`MigrationUri`]: `tcp:`, `unix:`, `file:`                            |
//! | [`snapshot`]  | snapshot files (`docs/snapshot-format.md`): [`SnapshotWriter`], [`SnapshotReader`], [`SnapshotLayout`] |
//!
//! # Channels
//!
//! | channel          | direction     | role byte                 | carries                            |
//! |------------------|---------------|---------------------------|------------------------------------|
//! | main             | src -> dst    | [`Role::Main`]            | [`Record`]s: RAM, [`Command`]s     |
//! | return path      | dst -> src    | [`Role::ReturnPath`]      | [`ReturnMessage`]s                 |
//! | postcopy preempt | src -> dst    | [`Role::PostcopyPreempt`] | urgent [`Record::Page`]s only      |
//!
//! The return path is the reverse direction of the main connection; the
//! preempt channel is a second connection. Each direction of each connection
//! starts with the same preamble: magic `"RMIG"`, version 1, and a
//! [`Hello`] naming its role, the connection epoch and the migration id.
//!
//! # Session
//!
//! ```text
//!  main channel (source writes, destination reads)
//!
//!   [preamble Main] --> RamSetup --> Advise? --+--> Ram* EndOfSection ----+
//!                                              |    Sync, Ping            |
//!                                              +<-------------------------+
//!                                              |
//!              precopy completes               |   postcopy switch
//!        +-------------------------------------+----------------------+
//!        v                                                            v
//!   DeviceState* --> Complete          Discard* --> Packaged{DeviceState* Listen Run}
//!                       |                               |
//!                       v                               v
//!                     (end)             Ram* (requested + background) --> Complete
//!
//!  return path (destination writes, source reads)
//!
//!   [preamble ReturnPath] --> ( Pong | PageRequest | ReceivedBitmap
//!                               | ResumeAck )* --> Shut
//!
//!  postcopy preempt channel (source writes, destination reads)
//!
//!   [preamble PostcopyPreempt] --> ( Ram(page) | EndOfSection )*
//!
//!  postcopy recovery: new connections with epoch + 1, then
//!   src: RecvBitmapRequest(b)* --> dst: ReceivedBitmap(b)*
//!   src: Resume                --> dst: ResumeAck, and pages flow again
//! ```
//!
//! # Examples
//!
//! A source writes a preamble, its block list and a few pages; the
//! destination checks the blocks against its own memory, then reads each
//! page straight into its buffer after the offset was validated.
//!
//! ```
//! use migration_stream::{
//!     read_preamble, BlockId, BlockInfo, BlockTable, Hello, MigrationId, Record, Role,
//!     StreamReader, StreamWriter,
//! };
//!
//! # fn main() -> Result<(), migration_stream::Error> {
//! let id = MigrationId::generate();
//! let blocks = vec![BlockInfo { name: "pc.ram".into(), size: 16 * 4096, page_size: 4096 }];
//!
//! // Source.
//! let mut w = StreamWriter::new(Vec::new());
//! w.write_preamble(&Hello::new(Role::Main, id))?;
//! w.write_ram_setup(&blocks)?;
//! w.write_page(BlockId(0), 0, &[0xaa; 4096])?;
//! w.write_zero_page(BlockId(0), 4096)?;
//! w.write_page(BlockId(0), 2 * 4096, &[0xbb; 4096])?;
//! w.write_end_of_section()?;
//! w.write_complete()?;
//! let bytes = w.into_inner()?;
//!
//! // Destination.
//! let mut input = &bytes[..];
//! read_preamble(&mut input)?.expect(Role::Main, id)?;
//! let mut r = StreamReader::new(input);
//! let Record::RamSetup(announced) = r.read_record(&())? else { panic!("no setup") };
//! assert_eq!(announced, blocks); // a real loader compares with its own RAM
//! let table = BlockTable::new(announced)?;
//!
//! let mut guest = vec![0xffu8; 16 * 4096];
//! loop {
//!     match r.read_record(&table)? {
//!         Record::Page(p) => {
//!             let at = p.offset as usize;
//!             r.read_page_into(&mut guest[at..at + p.page_size as usize])?;
//!         }
//!         Record::ZeroPage(p) => {
//!             let at = p.offset as usize;
//!             guest[at..at + p.page_size as usize].fill(0);
//!         }
//!         Record::Complete => break,
//!         _ => {}
//!     }
//! }
//! assert_eq!(guest[0], 0xaa);
//! assert_eq!(guest[4096], 0);
//! assert_eq!(guest[2 * 4096], 0xbb);
//! # Ok(())
//! # }
//! ```
//!
//! # Hostile input
//!
//! - Every declared length and count is checked against [`limits`] before
//!   it is used; blobs are read in 64 KiB steps, so a lying length costs at
//!   most one step of memory before the stream ends.
//! - Tag 0 is reserved in every tag enum; unknown tags, flags, magic and
//!   versions fail with a typed [`Error`].
//! - Offsets are checked against the caller's [`BlockResolver`] before the
//!   payload is read; the payload then goes into the caller's buffer.
//! - The decoders are fuzzed (`fuzz/`), and tested with truncation at every
//!   byte, arbitrary bytes and bit flips.
#![deny(unsafe_code)]

pub mod block;
pub mod command;
pub mod error;
pub mod header;
pub mod limits;
pub mod record;
pub mod retpath;
pub mod snapshot;
pub mod transport;
pub mod uri;
mod wire;

pub use block::{BlockGeometry, BlockId, BlockInfo, BlockResolver, BlockTable};
pub use command::{AdviseFlags, Command, CommandTag, DeviceState, DiscardRange};
pub use error::{Error, ErrorKind, Result, TagKind};
pub use header::{
    read_preamble, write_preamble, Hello, MigrationId, Role, MAGIC, PREAMBLE_LEN, VERSION,
};
pub use record::{FrameTag, PageHeader, PagePayload, RamFlags, Record, StreamReader, StreamWriter};
pub use retpath::{ReceivedBitmap, ReturnMessage, ReturnPathReader, ReturnPathWriter, ReturnTag};
pub use snapshot::{
    is_snapshot, SnapshotLayout, SnapshotReader, SnapshotSummary, SnapshotWriter,
    SNAPSHOT_HEADER_LEN, SNAPSHOT_MAGIC, SNAPSHOT_VERSION,
};
pub use transport::{
    connect, connect_str, memory_pair, try_memory_pair, BoxedReader, BoxedWriter, Connection,
    ConnectionHandle, Listener, ListenerCanceller, TransportError, MAX_PENDING_HELLOS,
    POSTCOPY_BACKLOG,
};
pub use uri::{MigrationUri, UriError};

#[cfg(test)]
mod hostile_tests;
