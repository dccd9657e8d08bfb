//! The errors of background snapshots and of restoring them.
//!
//! They reach callers inside [`crate::Error::Snapshot`], whose
//! [`kind`](crate::Error::kind) is [`SnapshotError::kind`]: a host that
//! cannot write-protect, a failed system call or a wiring mistake is
//! [`ErrorKind::Local`]; a snapshot file that does not fit this machine is
//! [`ErrorKind::Protocol`].

use migration_stream::ErrorKind;

/// An error of a background snapshot or of a restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// No userfaultfd with write protection could be had.
    #[error("userfaultfd unusable for background snapshots: {why}")]
    Unavailable {
        /// What is missing and how to get it.
        why: String,
        /// The error of uffd-sys, if there is one.
        #[source]
        source: Option<uffd_sys::Error>,
    },
    /// A block whose memory cannot be write-protected on this host.
    #[error("RAM block {name:?} ({memory}): {missing}")]
    BlockUnsupported {
        /// The block's name.
        name: String,
        /// Its memory: kind and page size.
        memory: String,
        /// What is missing.
        missing: String,
        /// The error of uffd-sys, if there is one.
        #[source]
        source: Option<uffd_sys::Error>,
    },
    /// A system call on a block's memory (registration, protection,
    /// population) failed.
    #[error("{op} of [{offset:#x}, +{len:#x}) of RAM block {name:?} failed")]
    Memory {
        /// The call.
        op: &'static str,
        /// The block's name.
        name: String,
        /// Offset of the range in the block.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The error of uffd-sys (with the kernel's errno).
        #[source]
        source: uffd_sys::Error,
    },
    /// The operating system refused a resource (an eventfd, a thread).
    #[error("{what} failed")]
    Os {
        /// What was asked for.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The fault thread could not wait for or read faults; it stopped.
    #[error("reading write faults failed")]
    FaultRead {
        /// The error of uffd-sys.
        #[source]
        source: uffd_sys::Error,
    },
    /// A write fault outside every block (a registration mistake).
    #[error("write fault at host address {addr:#x}, outside every RAM block")]
    FaultOutside {
        /// The faulting address.
        addr: u64,
    },
    /// The save ended with pages that were never saved (a bug: every page
    /// is saved once, by the scan or on a write fault).
    #[error("{missing} pages were never saved, the first at page {page} of RAM block {name:?}")]
    Unsaved {
        /// Pages not saved.
        missing: u64,
        /// The first block with such a page.
        name: String,
        /// Its first such page.
        page: u64,
    },
    /// The snapshot file's RAM does not fit this machine's RAM.
    #[error("the snapshot's RAM does not fit this machine: {why}")]
    Mismatch {
        /// What differs.
        why: String,
    },
}

impl SnapshotError {
    /// The kind of error: [`ErrorKind::Protocol`] for a snapshot that does
    /// not fit this machine, [`ErrorKind::Local`] for everything else.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::Mismatch { .. } => ErrorKind::Protocol,
            _ => ErrorKind::Local,
        }
    }
}
