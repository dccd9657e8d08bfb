//! The error type of this crate.
//!
//! Variants carry what is needed to find the fault: block names, offsets in
//! hex, the announced and local values of a mismatch, and the underlying
//! wire-format or guest-memory error as `#[source]` (the Display text does
//! not repeat it).
//!
//! [`Error::kind`] sorts every error into the three kinds a migration tells
//! apart ([`ErrorKind`]): a broken link (recoverable by reconnecting), a
//! peer whose stream disagrees with this side, and a failure of this host.

use migration_stream::{BlockId, ErrorKind};

/// An error of RAM migration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `RamBlocks::from_guest_memory` got a different number of names than
    /// the memory has regions.
    #[error("{names} RAM block names given for {regions} guest memory regions")]
    NameCount {
        /// Regions in the guest memory.
        regions: usize,
        /// Names given.
        names: usize,
    },
    /// A block that breaks the wire format's rules (name, size, page size).
    #[error("invalid RAM block {name:?}")]
    InvalidBlock {
        /// The block's name.
        name: String,
        /// What the format says is wrong.
        #[source]
        source: migration_stream::Error,
    },
    /// A block list that breaks the wire format's rules (count, duplicate
    /// names).
    #[error("invalid RAM block list")]
    InvalidBlockList {
        /// What the format says is wrong.
        #[source]
        source: migration_stream::Error,
    },
    /// A block that no single guest memory region holds in full.
    #[error(
        "RAM block {name:?} at guest address {guest_addr:#x} (size {size:#x}) is not inside one guest memory region"
    )]
    NotInMemory {
        /// The block's name.
        name: String,
        /// Its guest physical address.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// The source announced another number of blocks than the destination
    /// has.
    #[error("source announced {announced} RAM blocks, destination has {local}")]
    BlockCountMismatch {
        /// Blocks in the `RamSetup` record.
        announced: usize,
        /// Blocks of the destination.
        local: usize,
    },
    /// The source's block `index` has another name than the destination's.
    #[error("RAM block #{index} is named {announced:?} by the source, {local:?} here")]
    BlockNameMismatch {
        /// Index of the block.
        index: usize,
        /// The source's name.
        announced: String,
        /// The destination's name.
        local: String,
    },
    /// A block whose size differs between source and destination.
    #[error("RAM block {name:?} has size {announced:#x} on the source, {local:#x} here")]
    BlockSizeMismatch {
        /// The block's name.
        name: String,
        /// The source's size.
        announced: u64,
        /// The destination's size.
        local: u64,
    },
    /// A block whose page size differs between source and destination.
    #[error("RAM block {name:?} has page size {announced:#x} on the source, {local:#x} here")]
    PageSizeMismatch {
        /// The block's name.
        name: String,
        /// The source's page size.
        announced: u32,
        /// The destination's page size.
        local: u32,
    },
    /// A block id this side does not have.
    #[error("unknown RAM block {block}")]
    UnknownBlock {
        /// The id.
        block: BlockId,
    },
    /// A page record that does not fit its block (only when the caller
    /// decoded it with another resolver than the loader's blocks).
    #[error(
        "page at offset {offset:#x} (page size {page_size:#x}) does not fit RAM block {name:?} (size {size:#x}, page size {block_page_size:#x})"
    )]
    BadPage {
        /// The block's name.
        name: String,
        /// Offset of the page.
        offset: u64,
        /// Page size in the record.
        page_size: u32,
        /// Size of the block.
        size: u64,
        /// Page size of the block.
        block_page_size: u32,
    },
    /// A page arrived before the `RamSetup` record was checked.
    #[error("page for RAM block {block} at offset {offset:#x} before the RAM setup record")]
    PageBeforeSetup {
        /// The block of the page.
        block: BlockId,
        /// The offset of the page.
        offset: u64,
    },
    /// A second `RamSetup` record.
    #[error("RAM setup record received twice")]
    SetupRepeated,
    /// Reading or writing guest memory failed.
    #[error("{op} page at offset {offset:#x} of RAM block {name:?}")]
    Memory {
        /// `"reading"` or `"writing"`.
        op: &'static str,
        /// The block's name.
        name: String,
        /// Offset of the page in the block.
        offset: u64,
        /// The error of vm-memory.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The wire format or its channel failed.
    #[error("migration stream error")]
    Stream(
        /// The error of the stream.
        #[from]
        migration_stream::Error,
    ),
    /// A [`crate::DirtyLog`] implementation failed.
    #[error("dirty log {op} failed")]
    DirtyLog {
        /// `"start"`, `"sync"`, `"clear"` or `"stop"`.
        op: &'static str,
        /// The implementation's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The cancel flag was raised.
    #[error("migration cancelled")]
    Cancelled,
    /// The peer did not answer the keepalive for longer than its timeout.
    #[error(
        "no answer from the peer for {:.3} s (timeout {:.3} s)",
        silent.as_secs_f64(),
        timeout.as_secs_f64()
    )]
    PeerSilent {
        /// How long the peer has been silent (counted from the first ping at
        /// the earliest).
        silent: std::time::Duration,
        /// The keepalive's timeout.
        timeout: std::time::Duration,
    },
    /// A batch names a channel the caller's channel set does not have.
    #[error("a batch of pages is for the {channel} channel, which this migration does not have")]
    NoChannel {
        /// The channel.
        channel: crate::Channel,
    },
    /// A scheduler handed out a batch for a block that does not exist.
    #[error("page scheduler chose block index {block} of {blocks}")]
    BadBatch {
        /// The index it chose.
        block: usize,
        /// Number of blocks.
        blocks: usize,
    },
    /// A page request names a page past the end of its block.
    #[error("page {page} is past the end of RAM block {name:?} ({pages} pages)")]
    PageOutOfRange {
        /// The block's name.
        name: String,
        /// The page index asked for.
        page: u64,
        /// Pages of the block.
        pages: u64,
    },
    /// A page request reached a scheduler that serves none.
    #[error("page scheduler {scheduler} does not serve page requests")]
    RequestsUnsupported {
        /// The scheduler's name.
        scheduler: &'static str,
    },
    /// A page request could not be queued: its scheduler is gone (dropped,
    /// or it gave out a newer requester).
    #[error("the page scheduler behind this requester is gone")]
    SchedulerGone,
    /// A postcopy destination asked for bytes that are no whole pages of a
    /// block of this side (an unknown block, a misaligned or empty range,
    /// or one past the block's end).
    #[error(
        "page request for {len:#x} bytes at offset {offset:#x} of RAM block {block}{} refused",
        name.as_deref().map(|n| format!(" ({n:?})")).unwrap_or_default()
    )]
    BadPageRequest {
        /// The block id asked for.
        block: BlockId,
        /// Its name, if this side has such a block.
        name: Option<String>,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// What is wrong with it.
        #[source]
        source: migration_stream::Error,
    },
    /// The postcopy preempt channel carried something other than pages and
    /// its closing `EndOfSection`.
    #[error("the postcopy preempt channel carries pages only, not {record}")]
    NotAPreemptRecord {
        /// What came.
        record: String,
    },
    /// A page buffer whose length is not the block's page size.
    #[error("page buffer of {len:#x} bytes for RAM block {name:?} (page size {page_size:#x})")]
    PageBuffer {
        /// The block's name.
        name: String,
        /// The buffer's length.
        len: usize,
        /// The block's page size.
        page_size: u32,
    },
    /// A userfaultfd placement failed.
    #[error("{op} of the page at offset {offset:#x} of RAM block {name:?} failed")]
    Uffd {
        /// `"UFFDIO_COPY"` or `"UFFDIO_ZEROPAGE"`.
        op: &'static str,
        /// The block's name.
        name: String,
        /// Offset of the page in the block.
        offset: u64,
        /// The error of uffd-sys (with the kernel's errno).
        #[source]
        source: uffd_sys::Error,
    },
    /// A method was called in a state that does not allow it.
    #[error("{op} is not allowed in state {state}")]
    InvalidState {
        /// The method.
        op: &'static str,
        /// The state.
        state: &'static str,
    },
    /// The postcopy destination failed (see [`crate::postcopy`]).
    #[error("postcopy destination")]
    Postcopy(
        /// The postcopy error, which has its own kind.
        #[from]
        crate::postcopy::PostcopyError,
    ),
    /// A background snapshot or a restore failed (see [`crate::snapshot`]).
    #[error("background snapshot")]
    Snapshot(
        /// The snapshot error, which has its own kind (boxed: it is rare and
        /// large).
        #[source]
        Box<crate::snapshot::SnapshotError>,
    ),
}

impl From<crate::snapshot::SnapshotError> for Error {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        Error::Snapshot(Box::new(e))
    }
}

impl Error {
    /// Wraps the error of a [`crate::DirtyLog`] implementation.
    pub fn dirty_log<E>(op: &'static str, source: E) -> Self
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Error::DirtyLog {
            op,
            source: source.into(),
        }
    }

    /// Whose fault this error is.
    ///
    /// - [`ErrorKind::Link`]: the channel ended or broke (the stream error's
    ///   own kind), or the peer stopped answering the keepalive.
    /// - [`ErrorKind::Protocol`]: the peer's stream disagrees with this side:
    ///   another block count, name, size or page size, a block or page this
    ///   side does not have (in a page record or a page request), a page
    ///   before `RamSetup`, a second `RamSetup`, a page request for bytes
    ///   that are no pages of a block here, or a malformed stream.
    /// - [`ErrorKind::Local`]: guest memory (and userfaultfd placement), the
    ///   dirty log, this side's own block list, channels or scheduler, or a
    ///   method called in the wrong state.
    /// - [`Error::Postcopy`]: the postcopy error's own
    ///   [`kind`](crate::postcopy::PostcopyError::kind).
    ///
    /// [`Error::Cancelled`] is [`ErrorKind::Local`] too, but it is nobody's
    /// fault: the operator asked for it. Callers test for it first (a
    /// cancelled migration reports `cancelled`, not `failed`) and use the
    /// kind only for the other errors.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Stream(e) => e.kind(),
            Error::Postcopy(e) => e.kind(),
            Error::Snapshot(e) => e.kind(),
            Error::BlockCountMismatch { .. }
            | Error::BlockNameMismatch { .. }
            | Error::BlockSizeMismatch { .. }
            | Error::PageSizeMismatch { .. }
            | Error::UnknownBlock { .. }
            | Error::BadPage { .. }
            | Error::PageBeforeSetup { .. }
            | Error::PageOutOfRange { .. }
            | Error::SetupRepeated => ErrorKind::Protocol,
            Error::BadPageRequest { .. } | Error::NotAPreemptRecord { .. } => ErrorKind::Protocol,
            Error::PeerSilent { .. } => ErrorKind::Link,
            Error::NameCount { .. }
            | Error::InvalidBlock { .. }
            | Error::InvalidBlockList { .. }
            | Error::NotInMemory { .. }
            | Error::Memory { .. }
            | Error::DirtyLog { .. }
            | Error::Cancelled
            | Error::NoChannel { .. }
            | Error::BadBatch { .. }
            | Error::RequestsUnsupported { .. }
            | Error::SchedulerGone
            | Error::PageBuffer { .. }
            | Error::Uffd { .. }
            | Error::InvalidState { .. } => ErrorKind::Local,
        }
    }

    /// Whether this is [`Error::Cancelled`]: the operator's cancel, which
    /// callers report apart from failures.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Error::Cancelled)
    }

    /// Whether this error says the channel ended or broke (see
    /// [`migration_stream::Error::is_disconnect`]).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::Stream(e) if e.is_disconnect())
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use std::io;

    use migration_stream::Error as StreamError;

    use super::*;

    fn stream_io(kind: io::ErrorKind) -> Error {
        Error::Stream(StreamError::Io {
            context: "writing a page",
            source: io::Error::from(kind),
        })
    }

    #[test]
    fn every_variant_has_its_kind() {
        let name = || "pc.ram".to_owned();
        let mem_err =
            || vm_memory::GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(0));
        let cases: Vec<(Error, ErrorKind)> = vec![
            (Error::Stream(StreamError::Closed), ErrorKind::Link),
            (
                Error::Stream(StreamError::Truncated { what: "page" }),
                ErrorKind::Link,
            ),
            (stream_io(io::ErrorKind::BrokenPipe), ErrorKind::Link),
            (stream_io(io::ErrorKind::ConnectionReset), ErrorKind::Link),
            (stream_io(io::ErrorKind::StorageFull), ErrorKind::Local),
            (
                Error::Stream(StreamError::UnknownBlock { block: BlockId(9) }),
                ErrorKind::Protocol,
            ),
            (
                Error::BlockCountMismatch {
                    announced: 1,
                    local: 2,
                },
                ErrorKind::Protocol,
            ),
            (
                Error::BlockNameMismatch {
                    index: 0,
                    announced: "a".into(),
                    local: name(),
                },
                ErrorKind::Protocol,
            ),
            (
                Error::BlockSizeMismatch {
                    name: name(),
                    announced: 1,
                    local: 2,
                },
                ErrorKind::Protocol,
            ),
            (
                Error::PageSizeMismatch {
                    name: name(),
                    announced: 4096,
                    local: 8192,
                },
                ErrorKind::Protocol,
            ),
            (
                Error::UnknownBlock { block: BlockId(3) },
                ErrorKind::Protocol,
            ),
            (
                Error::BadPage {
                    name: name(),
                    offset: 0x1001,
                    page_size: 4096,
                    size: 0x10000,
                    block_page_size: 4096,
                },
                ErrorKind::Protocol,
            ),
            (
                Error::PageBeforeSetup {
                    block: BlockId(0),
                    offset: 0,
                },
                ErrorKind::Protocol,
            ),
            (Error::SetupRepeated, ErrorKind::Protocol),
            (
                Error::NotAPreemptRecord {
                    record: "Complete".into(),
                },
                ErrorKind::Protocol,
            ),
            (
                Error::Memory {
                    op: "writing",
                    name: name(),
                    offset: 0,
                    source: mem_err(),
                },
                ErrorKind::Local,
            ),
            (
                Error::dirty_log("sync", "KVM_GET_DIRTY_LOG: EINVAL"),
                ErrorKind::Local,
            ),
            (
                Error::NotInMemory {
                    name: name(),
                    guest_addr: 0,
                    size: 4096,
                },
                ErrorKind::Local,
            ),
            (
                Error::NameCount {
                    regions: 2,
                    names: 1,
                },
                ErrorKind::Local,
            ),
            (
                Error::InvalidBlock {
                    name: String::new(),
                    source: StreamError::NestedPackage,
                },
                ErrorKind::Local,
            ),
            (
                Error::InvalidBlockList {
                    source: StreamError::NestedPackage,
                },
                ErrorKind::Local,
            ),
            (
                Error::InvalidState {
                    op: "iterate",
                    state: "created",
                },
                ErrorKind::Local,
            ),
            (Error::Cancelled, ErrorKind::Local),
            (
                Error::PeerSilent {
                    silent: std::time::Duration::from_secs(11),
                    timeout: std::time::Duration::from_secs(10),
                },
                ErrorKind::Link,
            ),
            (
                Error::PageOutOfRange {
                    name: name(),
                    page: 9,
                    pages: 9,
                },
                ErrorKind::Protocol,
            ),
            (
                Error::NoChannel {
                    channel: crate::Channel::Preempt,
                },
                ErrorKind::Local,
            ),
            (
                Error::BadBatch {
                    block: 3,
                    blocks: 2,
                },
                ErrorKind::Local,
            ),
            (
                Error::RequestsUnsupported {
                    scheduler: "LinearScan",
                },
                ErrorKind::Local,
            ),
            (Error::SchedulerGone, ErrorKind::Local),
            (
                Error::BadPageRequest {
                    block: BlockId(1),
                    name: Some(name()),
                    offset: 0x10_0000,
                    len: 0x1000,
                    source: StreamError::OutOfRange {
                        block: BlockId(1),
                        offset: 0x10_0000,
                        len: 0x1000,
                        block_size: 0x10_0000,
                    },
                },
                ErrorKind::Protocol,
            ),
            (
                Error::PageBuffer {
                    name: name(),
                    len: 1,
                    page_size: 4096,
                },
                ErrorKind::Local,
            ),
            (
                Error::Uffd {
                    op: "UFFDIO_COPY",
                    name: name(),
                    offset: 0,
                    source: uffd_sys::Error::ShortRead(1),
                },
                ErrorKind::Local,
            ),
            (
                Error::Postcopy(crate::postcopy::PostcopyError::ForeignBlock { name: name() }),
                ErrorKind::Local,
            ),
            (
                Error::Postcopy(crate::postcopy::PostcopyError::Incomplete {
                    missing: 1,
                    name: name(),
                    page: 0,
                }),
                ErrorKind::Protocol,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e:?}");
            assert_eq!(e.is_cancelled(), matches!(e, Error::Cancelled), "{e:?}");
        }
    }

    #[test]
    fn display_does_not_repeat_the_source() {
        let e = stream_io(io::ErrorKind::BrokenPipe);
        assert_eq!(e.to_string(), "migration stream error");
        assert!(e.is_disconnect());
        assert_eq!(e.kind(), ErrorKind::Link);
    }
}
