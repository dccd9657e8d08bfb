//! The one error type of this crate.

use std::{fmt, io};

use crate::Features;

/// A userfaultfd operation on a range, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `UFFDIO_REGISTER`.
    Register,
    /// `UFFDIO_UNREGISTER`.
    Unregister,
    /// `UFFDIO_COPY`.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    ZeroPage,
    /// `UFFDIO_WRITEPROTECT`.
    WriteProtect,
    /// `UFFDIO_CONTINUE`.
    Continue,
    /// `UFFDIO_WAKE`.
    Wake,
    /// `UFFDIO_MOVE`.
    Move,
    /// `UFFDIO_POISON`.
    Poison,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Register => "UFFDIO_REGISTER",
            Op::Unregister => "UFFDIO_UNREGISTER",
            Op::Copy => "UFFDIO_COPY",
            Op::ZeroPage => "UFFDIO_ZEROPAGE",
            Op::WriteProtect => "UFFDIO_WRITEPROTECT",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Wake => "UFFDIO_WAKE",
            Op::Move => "UFFDIO_MOVE",
            Op::Poison => "UFFDIO_POISON",
        })
    }
}

/// A system call on guest memory other than a userfaultfd ioctl, named in
/// [`Error::Memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryOp {
    /// `madvise(MADV_DONTNEED)`: drops private pages.
    DontNeed,
    /// `madvise(MADV_REMOVE)`: frees the backing of shared anonymous memory.
    Remove,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)`: drops pages of a memfd or hugetlbfs file.
    PunchHole,
    /// `madvise(MADV_HUGEPAGE)`.
    HugePage,
    /// `madvise(MADV_NOHUGEPAGE)`.
    NoHugePage,
    /// `mlock2(0)`: lock and populate.
    Mlock,
    /// `mlock2(MLOCK_ONFAULT)`: lock pages as they are faulted in.
    MlockOnFault,
    /// `munlock`.
    Munlock,
    /// `fstatfs` of a region's backing file.
    Fstatfs,
    /// `mmap` of a scratch mapping.
    Mmap,
    /// `madvise(MADV_POPULATE_READ)`: map pages readable without a byte changed.
    PopulateRead,
    /// `madvise(MADV_POPULATE_WRITE)`: map pages writable without a byte changed.
    PopulateWrite,
    /// A read of `/proc/self/pagemap`.
    Pagemap,
}

impl fmt::Display for MemoryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemoryOp::DontNeed => "madvise(MADV_DONTNEED)",
            MemoryOp::Remove => "madvise(MADV_REMOVE)",
            MemoryOp::PunchHole => "fallocate(PUNCH_HOLE)",
            MemoryOp::HugePage => "madvise(MADV_HUGEPAGE)",
            MemoryOp::NoHugePage => "madvise(MADV_NOHUGEPAGE)",
            MemoryOp::Mlock => "mlock",
            MemoryOp::MlockOnFault => "mlock2(MLOCK_ONFAULT)",
            MemoryOp::Munlock => "munlock",
            MemoryOp::Fstatfs => "fstatfs",
            MemoryOp::Mmap => "mmap",
            MemoryOp::PopulateRead => "madvise(MADV_POPULATE_READ)",
            MemoryOp::PopulateWrite => "madvise(MADV_POPULATE_WRITE)",
            MemoryOp::Pagemap => "reading /proc/self/pagemap",
        })
    }
}

/// Errors of userfaultfd operations. Every variant keeps the kernel's errno unchanged in
/// its `io::Error` source; [`Error::errno`] returns it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither `/dev/userfaultfd` nor the `userfaultfd(2)` system call gave a descriptor.
    #[error("cannot open a userfaultfd: /dev/userfaultfd: {dev}; userfaultfd(2): {syscall}")]
    Open {
        /// Why `/dev/userfaultfd` (open or `USERFAULTFD_IOC_NEW`) failed.
        dev: io::Error,
        /// Why the system call failed.
        syscall: io::Error,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake requesting features {requested} failed")]
    Api {
        /// The features asked for.
        requested: Features,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The kernel does not offer features the caller requires.
    #[error("the kernel lacks userfaultfd features {missing} (it offers {available})")]
    MissingFeatures {
        /// Required features the kernel does not offer.
        missing: Features,
        /// Everything the kernel offers.
        available: Features,
    },
    /// An operation on a range failed, possibly after completing part of it.
    #[error("{op} of [{start:#x}, {end:#x}) failed after {done:#x} bytes", end = start.wrapping_add(*len))]
    Range {
        /// The operation.
        op: Op,
        /// Start of the range (host virtual address).
        start: u64,
        /// Length of the range in bytes.
        len: u64,
        /// Bytes completed before the failure (from the kernel's own count).
        done: u64,
        /// The kernel's error, errno unchanged.
        #[source]
        source: io::Error,
    },
    /// A range given relative to a [`crate::Mapping`] does not fit inside it.
    #[error("[{offset:#x}, +{len:#x}) is outside the {size:#x}-byte mapping")]
    OutOfBounds {
        /// Offset into the mapping.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the mapping.
        size: u64,
    },
    /// A guest memory range that cannot take a whole-page placement: outside
    /// one region, not aligned to the page size, or an invalid page size.
    #[error("guest range [{addr:#x}, +{len:#x}) with page size {page_size:#x}: {reason}")]
    GuestRange {
        /// Guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The page size the placement was asked in.
        page_size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Reading events from the descriptor failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] io::Error),
    /// The kernel returned a byte count that is not a whole number of messages.
    #[error("userfaultfd read returned {0} bytes, not a multiple of the 32-byte message")]
    ShortRead(usize),
    /// Waiting for the descriptor to become readable failed.
    #[error("polling the userfaultfd failed")]
    Poll(#[source] io::Error),
    /// A system call on guest memory (discard, huge page advice, locking, or
    /// telling the backing) failed.
    #[error("{op} of host range [{start:#x}, +{len:#x}) failed")]
    Memory {
        /// The call.
        op: MemoryOp,
        /// Start of the host range (or, for a file offset, the file offset).
        start: u64,
        /// Length of the range.
        len: u64,
        /// The kernel's error, errno unchanged.
        #[source]
        source: io::Error,
    },
    /// Guest memory whose backing userfaultfd cannot serve missing faults for
    /// (a private mapping of a file, a file on a disk filesystem).
    #[error("guest memory at {addr:#x} (+{len:#x}): {reason}")]
    UnsupportedMemory {
        /// Guest physical address of the region.
        addr: u64,
        /// Length of the region.
        len: u64,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// The kernel's errno behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Api { source, .. } | Error::Range { source, .. } => source.raw_os_error(),
            Error::Read(e) | Error::Poll(e) => e.raw_os_error(),
            Error::Memory { source, .. } => source.raw_os_error(),
            Error::Open { .. }
            | Error::MissingFeatures { .. }
            | Error::OutOfBounds { .. }
            | Error::GuestRange { .. }
            | Error::UnsupportedMemory { .. }
            | Error::ShortRead(_) => None,
        }
    }

    /// `EEXIST`: the target page was already present (placed by another path).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// `EAGAIN` on a range operation: only part was done (see `done`), retry the rest.
    pub fn is_again(&self) -> bool {
        self.errno() == Some(libc::EAGAIN)
    }

    /// Bytes completed before a range operation failed; 0 for other errors.
    pub fn done(&self) -> u64 {
        match self {
            Error::Range { done, .. } => *done,
            _ => 0,
        }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
