//! Errors of the encoders and decoders.
//!
//! Every way a stream can be malformed has its own variant with the context
//! needed to find the bad byte (block ids, offsets in hex, lengths and their
//! caps). A decoder returns one of these for any input; it never panics.

use std::io;

use crate::block::BlockId;
use crate::header::{MigrationId, Role};

/// Which tag enum a tag byte belonged to, for [`Error::UnknownTag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    /// A frame tag on the main or preempt channel.
    Frame,
    /// A command tag.
    Command,
    /// A return-path message tag.
    ReturnPath,
    /// The role byte of a hello.
    Role,
}

impl std::fmt::Display for TagKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TagKind::Frame => "frame",
            TagKind::Command => "command",
            TagKind::ReturnPath => "return-path message",
            TagKind::Role => "channel role",
        })
    }
}

/// An error of the migration wire format: a malformed, hostile or truncated
/// stream, an I/O failure of the underlying channel, or a caller asking to
/// encode something the format cannot carry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The underlying reader or writer failed.
    #[error("I/O error while {context}")]
    Io {
        /// What was being read or written.
        context: &'static str,
        /// The error of the channel.
        #[source]
        source: io::Error,
    },
    /// The peer closed the channel cleanly between two frames.
    #[error("channel closed by the peer at a frame boundary")]
    Closed,
    /// The stream ended in the middle of a frame.
    #[error("stream truncated while reading {what}")]
    Truncated {
        /// The field that could not be read in full.
        what: &'static str,
    },
    /// The stream does not start with the format's magic.
    #[error("bad stream magic {found:#010x} (expected {expected:#010x})")]
    BadMagic {
        /// The four bytes found, big-endian.
        found: u32,
        /// The magic of this format.
        expected: u32,
    },
    /// The stream declares a format version this crate does not speak.
    #[error("unsupported wire format version {found} (this side speaks {supported})")]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
        /// The version this crate speaks.
        supported: u32,
    },
    /// A tag byte with no meaning (including the reserved `Invalid = 0`).
    #[error("unknown {kind} tag {value:#04x}")]
    UnknownTag {
        /// The enum the tag belongs to.
        kind: TagKind,
        /// The tag byte.
        value: u8,
    },
    /// Flag bits that are undefined or form an invalid combination.
    #[error("invalid {what} flags {bits:#x}")]
    InvalidFlags {
        /// Which flag word.
        what: &'static str,
        /// The bits as received.
        bits: u32,
    },
    /// A declared length or count exceeds its cap.
    #[error("{what} length {len} exceeds the cap of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// The declared length or count.
        len: u64,
        /// The cap from [`crate::limits`].
        max: u64,
    },
    /// A frame body length that does not match what its contents require.
    #[error("{what} body is {len} bytes, expected {expected}")]
    BadLength {
        /// The frame.
        what: &'static str,
        /// The declared body length.
        len: u64,
        /// The length its contents require.
        expected: u64,
    },
    /// A name that is empty, too long or not UTF-8.
    #[error("invalid {what} name: {reason}")]
    InvalidName {
        /// Block or device.
        what: &'static str,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Two blocks of one block table share a name.
    #[error("duplicate RAM block name {name:?}")]
    DuplicateBlockName {
        /// The repeated name.
        name: String,
    },
    /// A page size that is not a power of two between 4 KiB and 1 GiB.
    #[error("invalid page size {page_size:#x}")]
    InvalidPageSize {
        /// The page size.
        page_size: u64,
    },
    /// A block whose size is zero, too large, or not a multiple of its page
    /// size.
    #[error("invalid size {size:#x} of RAM block {name:?} (page size {page_size:#x})")]
    InvalidBlockSize {
        /// The block's name.
        name: String,
        /// The declared size.
        size: u64,
        /// The declared page size.
        page_size: u32,
    },
    /// A block id that the caller's block table does not know.
    #[error("unknown RAM block {block}")]
    UnknownBlock {
        /// The id.
        block: BlockId,
    },
    /// A record or request said "same block as before" with no block before.
    #[error("{what} refers to the previous block but none was named yet")]
    NoCurrentBlock {
        /// The record or message.
        what: &'static str,
    },
    /// An offset not aligned to the block's page size.
    #[error(
        "offset {offset:#x} in RAM block {block} is not aligned to its page size {page_size:#x}"
    )]
    Misaligned {
        /// The block.
        block: BlockId,
        /// The offset.
        offset: u64,
        /// The block's page size.
        page_size: u32,
    },
    /// A range that does not lie inside its block.
    #[error("range {offset:#x}+{len:#x} is outside RAM block {block} of size {block_size:#x}")]
    OutOfRange {
        /// The block.
        block: BlockId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the block.
        block_size: u64,
    },
    /// A range length that is zero or not a multiple of the page size.
    #[error("length {len:#x} in RAM block {block} is not a non-zero multiple of its page size {page_size:#x}")]
    BadRangeLength {
        /// The block.
        block: BlockId,
        /// The length.
        len: u64,
        /// The block's page size.
        page_size: u32,
    },
    /// A received bitmap whose bit count does not match its block.
    #[error("received bitmap of RAM block {block} has {bits} bits, block has {expected} pages")]
    BitmapSizeMismatch {
        /// The block.
        block: BlockId,
        /// Bits declared.
        bits: u64,
        /// Pages of the block.
        expected: u64,
    },
    /// Bits set past the end of a received bitmap.
    #[error("received bitmap of RAM block {block} has bits set past bit {bits}")]
    BitmapTrailingBits {
        /// The block.
        block: BlockId,
        /// Bits declared.
        bits: u64,
    },
    /// A frame body with bytes left over after its contents.
    #[error("{what} body has {extra} trailing bytes")]
    TrailingBytes {
        /// The frame.
        what: &'static str,
        /// Bytes left over.
        extra: u64,
    },
    /// A `Packaged` command inside a `Packaged` command.
    #[error("nested packaged command")]
    NestedPackage,
    /// The caller read the next frame while a page payload was still unread.
    #[error("page payload of {remaining} bytes not consumed (block {block}, offset {offset:#x})")]
    PayloadPending {
        /// Block of the pending page.
        block: BlockId,
        /// Offset of the pending page.
        offset: u64,
        /// Bytes of payload still unread.
        remaining: u64,
    },
    /// The caller asked for a page payload but none is pending.
    #[error("no page payload is pending")]
    NoPayloadPending,
    /// A page buffer whose length differs from the page size.
    #[error("page buffer is {actual} bytes, the page is {expected} bytes")]
    BufferSize {
        /// The page size.
        expected: u64,
        /// The buffer's length.
        actual: u64,
    },
    /// A hello naming another role than the one expected on this channel.
    #[error("channel hello names role {found:?}, expected {expected:?}")]
    RoleMismatch {
        /// The expected role.
        expected: Role,
        /// The role in the hello.
        found: Role,
    },
    /// A listener closed a connection without reading its hello because
    /// `max` others were already waiting to send theirs
    /// ([`crate::Listener::accept_hello`]).
    #[error(
        "{max} connections are already waiting to send their hello; this one was closed unread"
    )]
    TooManyPendingHellos {
        /// [`crate::transport::MAX_PENDING_HELLOS`].
        max: usize,
    },
    /// A hello naming another migration than this one.
    #[error("channel hello names migration {found}, expected {expected}")]
    MigrationMismatch {
        /// The expected migration id.
        expected: MigrationId,
        /// The migration id in the hello.
        found: MigrationId,
    },
    /// A snapshot file could not be opened or created.
    #[error("cannot open snapshot file {}", path.display())]
    SnapshotOpen {
        /// The file.
        path: std::path::PathBuf,
        /// The error of the open.
        #[source]
        source: io::Error,
    },
    /// Reading, writing or syncing a snapshot file failed (a full disk, a
    /// file that shrank under its reader).
    #[error("snapshot file I/O failed while {context}")]
    SnapshotIo {
        /// What was being done.
        context: &'static str,
        /// The error of the file system.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the snapshot magic `"RSNAPSHT"`.
    #[error("not a snapshot file: it starts with {found:02x?}, not \"RSNAPSHT\"")]
    SnapshotBadMagic {
        /// The first bytes of the file (up to 8).
        found: Vec<u8>,
    },
    /// The snapshot file has a format version this crate does not read.
    #[error("unsupported snapshot format version {found} (this side reads {supported})")]
    SnapshotVersion {
        /// The version in the header.
        found: u32,
        /// The version this crate reads and writes.
        supported: u32,
    },
    /// The snapshot's header says it was never finished.
    #[error("the snapshot was not finished (its save failed or was cancelled)")]
    SnapshotIncomplete,
    /// The snapshot file is shorter than its header (or the header's
    /// `file_len`) says.
    #[error("snapshot file is truncated: it is {actual} bytes, {what} needs {expected}")]
    SnapshotTruncated {
        /// What needs the missing bytes: the header, or the file length the
        /// header records.
        what: &'static str,
        /// Bytes needed.
        expected: u64,
        /// Bytes the file has.
        actual: u64,
    },
    /// The snapshot file is longer than its header's `file_len` says.
    #[error("snapshot file is {actual} bytes, longer than the {expected} its header records")]
    SnapshotTooLong {
        /// `file_len` from the header.
        expected: u64,
        /// Bytes the file has.
        actual: u64,
    },
    /// A SHA-256 in the snapshot header does not match the bytes it covers.
    #[error("snapshot {what} checksum mismatch: the file is corrupt")]
    SnapshotChecksum {
        /// `header` or `meta area`.
        what: &'static str,
    },
    /// A reserved byte of the snapshot header is not zero.
    #[error("snapshot header byte at offset {offset:#x} is reserved and must be zero")]
    SnapshotReserved {
        /// Offset of the first non-zero reserved byte.
        offset: u64,
    },
    /// A field of the snapshot header or meta area has a value the format
    /// does not allow.
    #[error("snapshot {field} is {found:#x}, expected {expected:#x}")]
    SnapshotField {
        /// The field.
        field: &'static str,
        /// Its value in the file.
        found: u64,
        /// The value the format requires.
        expected: u64,
    },
    /// The snapshot's meta area ends inside one of its fields.
    #[error("snapshot meta area ends inside {what}")]
    SnapshotMetaTruncated {
        /// The field that does not fit.
        what: &'static str,
    },
    /// A block's data in a snapshot file is not aligned to
    /// `max(4096, page size)`.
    #[error("data of RAM block {block} at file offset {offset:#x} is not aligned to {align:#x}")]
    SnapshotMisaligned {
        /// The block.
        block: BlockId,
        /// Its data offset.
        offset: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A block's data in a snapshot file starts before the end of the meta
    /// area or of the previous block.
    #[error(
        "data of RAM block {block} at file offset {offset:#x} overlaps {previous}, which ends at {previous_end:#x}"
    )]
    SnapshotOverlap {
        /// The block.
        block: BlockId,
        /// Its data offset.
        offset: u64,
        /// What it overlaps: the meta area or the previous block.
        previous: &'static str,
        /// Where that ends.
        previous_end: u64,
    },
    /// A region named by a snapshot file lies (partly) past its `file_len`.
    #[error(
        "{what} at {offset:#x}+{len:#x} extends past the end of the snapshot file at {file_len:#x}"
    )]
    SnapshotOutOfFile {
        /// The region: the meta area or a block's data.
        what: String,
        /// Its start.
        offset: u64,
        /// Its length.
        len: u64,
        /// `file_len` from the header.
        file_len: u64,
    },
    /// Bits set past the last page of a block's present bitmap.
    #[error("present bitmap of RAM block {block} has bits set past its {pages} pages")]
    SnapshotBitmapTail {
        /// The block.
        block: BlockId,
        /// Pages of the block.
        pages: u64,
    },
}

/// Whose fault an error is, as the three kinds a migration tells apart.
///
/// Every error type of the stack (this crate's [`Error`], `migration-ram`'s,
/// `vmm-glue`'s session errors) answers `kind()`, so the kind stays known
/// from the socket up to what the operator sees. Postcopy recovery acts on
/// [`ErrorKind::Link`] only: a broken link can be mended by reconnecting, a
/// bad stream or a local failure cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The link to the peer broke: closed, reset, timed out or stalled. What
    /// arrived before the break was valid.
    Link,
    /// The peer sent bytes that break the format or the protocol: a hostile
    /// or corrupt stream, or a peer that disagrees with this side (another
    /// RAM layout, a state this side cannot parse).
    Protocol,
    /// Something on this host failed: guest memory, KVM, userfaultfd, a file
    /// system (a full disk), a resource limit.
    Local,
}

impl ErrorKind {
    /// `link`, `protocol` or `local`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Link => "link",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Local => "local",
        }
    }

    /// The kind of an I/O error of a channel: the errors a broken or stalled
    /// connection gives are [`ErrorKind::Link`], anything else (a full disk, a
    /// descriptor limit) is [`ErrorKind::Local`].
    pub fn of_io(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock => ErrorKind::Link,
            _ => ErrorKind::Local,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of this crate's encoders and decoders.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whose fault this is: an ended or broken channel is
    /// [`ErrorKind::Link`], another I/O failure [`ErrorKind::Local`], and
    /// every malformed byte [`ErrorKind::Protocol`]. A caller's own misuse
    /// (a wrong buffer size, a payload left unread) is [`ErrorKind::Local`],
    /// and so is a listener turning a connection away at its limit of
    /// pending hellos. A snapshot file that cannot be opened, read or
    /// written is [`ErrorKind::Local`]; one that is corrupt, truncated or
    /// unfinished is [`ErrorKind::Protocol`]. A link timeout ([`crate::ConnectionHandle::set_link_timeout`])
    /// is an I/O error of kind `TimedOut`, so [`ErrorKind::Link`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Closed | Error::Truncated { .. } => ErrorKind::Link,
            Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::SnapshotOpen { .. } | Error::SnapshotIo { .. } => ErrorKind::Local,
            Error::PayloadPending { .. }
            | Error::NoPayloadPending
            | Error::BufferSize { .. }
            | Error::TooManyPendingHellos { .. } => ErrorKind::Local,
            _ => ErrorKind::Protocol,
        }
    }

    /// Whether this error says the channel ended (cleanly between frames or
    /// in the middle of one), as opposed to carrying malformed bytes. A
    /// postcopy destination uses this to enter `postcopy-paused` rather than
    /// fail.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::Closed | Error::Truncated { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}
