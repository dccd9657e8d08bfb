//! The errors of the postcopy destination.
//!
//! They reach callers inside [`crate::Error::Postcopy`], whose
//! [`kind`](crate::Error::kind) is [`PostcopyError::kind`]: a host that
//! cannot do postcopy, a failed system call or a wiring mistake is
//! [`ErrorKind::Local`]; a source whose commands do not fit this side (a
//! discard outside a block, `Complete` with pages never sent) is
//! [`ErrorKind::Protocol`].

use migration_stream::ErrorKind;

/// An error of the postcopy destination.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostcopyError {
    /// No userfaultfd that sees kernel-mode faults could be had.
    #[error("userfaultfd unusable for postcopy: {why}")]
    Unavailable {
        /// What is missing and how to get it.
        why: String,
        /// The error of uffd-sys, if there is one.
        #[source]
        source: Option<uffd_sys::Error>,
    },
    /// A block whose memory postcopy cannot serve on this host.
    #[error("RAM block {name:?} ({memory}): {missing}")]
    BlockUnsupported {
        /// The block's name.
        name: String,
        /// Its memory: kind and page size, or what could be told of it.
        memory: String,
        /// What is missing.
        missing: String,
        /// The error of uffd-sys, if there is one.
        #[source]
        source: Option<uffd_sys::Error>,
    },
    /// A system call on a block's memory (registration, discard, huge page
    /// advice, locking) failed.
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
    /// A discard range that is not whole pages inside its block.
    #[error(
        "discard of [{offset:#x}, +{len:#x}) does not fit RAM block {name:?} (size {size:#x}, page size {page_size:#x})"
    )]
    BadDiscard {
        /// The block's name.
        name: String,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the block.
        size: u64,
        /// Page size of the block.
        page_size: u32,
    },
    /// The operating system refused a resource the fault handler needs
    /// (its eventfd, its thread).
    #[error("{what} failed")]
    Os {
        /// What was asked for.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The fault thread could not wait for or read faults; it stopped.
    #[error("the postcopy fault thread stopped: reading the userfaultfd failed")]
    FaultRead {
        /// The error of uffd-sys.
        #[source]
        source: uffd_sys::Error,
    },
    /// A fault outside every block (a registration this handler did not make).
    #[error("page fault at host address {addr:#x}, outside every RAM block")]
    FaultOutside {
        /// The faulting host address.
        addr: u64,
    },
    /// A placement into a [`RamBlock`](crate::RamBlock) that is not one of the
    /// blocks the fault handler was started with (the loader and the handler
    /// must share one `Arc<RamBlocks>`, the single record of what arrived).
    #[error("RAM block {name:?} is not one of the blocks the postcopy fault handler serves")]
    ForeignBlock {
        /// The block's name.
        name: String,
    },
    /// Postcopy ended with pages that never arrived.
    #[error("postcopy ended with {missing} pages never received (the first: page {page} of RAM block {name:?})")]
    Incomplete {
        /// Pages never received.
        missing: u64,
        /// The block of the first one.
        name: String,
        /// Its page index.
        page: u64,
    },
}

impl PostcopyError {
    /// Whose fault this error is: [`ErrorKind::Protocol`] for a discard range
    /// that does not fit its block and for pages the source never sent;
    /// [`ErrorKind::Local`] for everything else (this host, its memory, its
    /// threads, or the VMM's wiring).
    pub fn kind(&self) -> ErrorKind {
        match self {
            PostcopyError::BadDiscard { .. } | PostcopyError::Incomplete { .. } => {
                ErrorKind::Protocol
            }
            PostcopyError::Unavailable { .. }
            | PostcopyError::BlockUnsupported { .. }
            | PostcopyError::Memory { .. }
            | PostcopyError::Os { .. }
            | PostcopyError::FaultRead { .. }
            | PostcopyError::FaultOutside { .. }
            | PostcopyError::ForeignBlock { .. } => ErrorKind::Local,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn kinds_and_messages() {
        let name = || "pc.ram".to_owned();
        let cases = [
            (
                PostcopyError::Unavailable {
                    why: "no".into(),
                    source: None,
                },
                ErrorKind::Local,
            ),
            (
                PostcopyError::BlockUnsupported {
                    name: name(),
                    memory: "shmem (memfd) with 4 KiB pages".into(),
                    missing: "the kernel lacks userfaultfd feature MISSING_SHMEM".into(),
                    source: None,
                },
                ErrorKind::Local,
            ),
            (
                PostcopyError::Memory {
                    op: "madvise(MADV_DONTNEED)",
                    name: name(),
                    offset: 0x1000,
                    len: 0x1000,
                    source: uffd_sys::Error::ShortRead(1),
                },
                ErrorKind::Local,
            ),
            (
                PostcopyError::BadDiscard {
                    name: name(),
                    offset: 0x800,
                    len: 0x1000,
                    size: 0x10000,
                    page_size: 0x1000,
                },
                ErrorKind::Protocol,
            ),
            (
                PostcopyError::Os {
                    what: "creating the eventfd",
                    source: std::io::Error::from_raw_os_error(libc::EMFILE),
                },
                ErrorKind::Local,
            ),
            (
                PostcopyError::FaultRead {
                    source: uffd_sys::Error::ShortRead(3),
                },
                ErrorKind::Local,
            ),
            (
                PostcopyError::FaultOutside { addr: 0x1000 },
                ErrorKind::Local,
            ),
            (
                PostcopyError::ForeignBlock { name: name() },
                ErrorKind::Local,
            ),
            (
                PostcopyError::Incomplete {
                    missing: 3,
                    name: name(),
                    page: 7,
                },
                ErrorKind::Protocol,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e:?}");
            let wrapped = crate::Error::from(e);
            assert_eq!(wrapped.kind(), kind);
        }
        let e = PostcopyError::BlockUnsupported {
            name: name(),
            memory: "shmem (memfd) with 4 KiB pages".into(),
            missing: "the kernel lacks userfaultfd feature MISSING_SHMEM".into(),
            source: None,
        };
        assert_eq!(
            e.to_string(),
            "RAM block \"pc.ram\" (shmem (memfd) with 4 KiB pages): \
             the kernel lacks userfaultfd feature MISSING_SHMEM"
        );
        let e = PostcopyError::Memory {
            op: "madvise(MADV_DONTNEED)",
            name: name(),
            offset: 0x1000,
            len: 0x2000,
            source: uffd_sys::Error::ShortRead(1),
        };
        assert_eq!(
            e.to_string(),
            "madvise(MADV_DONTNEED) of [0x1000, +0x2000) of RAM block \"pc.ram\" failed"
        );
        assert!(e.source().is_some(), "the source is kept, not repeated");
    }
}
