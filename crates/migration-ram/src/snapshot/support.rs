//! Can this host write-protect these blocks? Asked before the guest is
//! paused, so that a refusal costs it nothing.

use std::sync::Arc;

use uffd_sys::{Features, Ioctls, MemoryKind, RegisterMode, Uffd};

use super::SnapshotError;
use crate::block::RamBlocks;
use crate::error::{Error, Result};
use crate::postcopy::block_backing;
use crate::GuestMemoryMmap;

/// The userfaultfd feature WP registration of `kind` needs.
fn feature_for(kind: MemoryKind) -> Features {
    match kind {
        MemoryKind::Anonymous => Features::PAGEFAULT_FLAG_WP,
        MemoryKind::Shmem | MemoryKind::Hugetlbfs => {
            Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM
        }
    }
}

/// Checks that this host can write-protect `blocks` of `mem`, and opens the
/// userfaultfd to do it with.
///
/// 1. Each block's memory kind is told from its region, and its page size
///    checked against the block's.
/// 2. A userfaultfd is opened that receives kernel-mode faults (KVM writes
///    guest memory from the kernel), with `PAGEFAULT_FLAG_WP`, and
///    `WP_HUGETLBFS_SHMEM` for shmem or hugetlbfs blocks; `WP_UNPOPULATED`
///    where the kernel has it (Linux 6.4), so never-touched pages are
///    protected without being populated first.
/// 3. Each block is registered for WP faults and unregistered again, to see
///    that `UFFDIO_WRITEPROTECT` is offered.
///
/// Errors ([`SnapshotError::BlockUnsupported`],
/// [`SnapshotError::Unavailable`]) name the block, its memory and what is
/// missing. Nothing stays registered.
pub fn check_support(mem: &GuestMemoryMmap, blocks: &RamBlocks) -> Result<Arc<Uffd>> {
    blocks.check_memory(mem)?;
    let backings = blocks
        .iter()
        .map(|b| {
            block_backing(mem, b).map_err(|e| match e {
                // The same words, without "postcopy".
                Error::Postcopy(crate::PostcopyError::BlockUnsupported {
                    name,
                    memory,
                    missing,
                    source,
                }) => SnapshotError::BlockUnsupported {
                    name,
                    memory,
                    missing,
                    source,
                }
                .into(),
                e => e,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let needed = backings
        .iter()
        .fold(Features::empty(), |f, b| f | feature_for(b.kind));
    let unavailable = |why: String, source| -> Error {
        SnapshotError::Unavailable {
            why,
            source: Some(source),
        }
        .into()
    };
    let uffd = Uffd::builder()
        .require(needed)
        .request(Features::WP_UNPOPULATED | Features::THREAD_ID)
        .open()
        .map_err(|e| match e {
            uffd_sys::Error::MissingFeatures { missing, .. } => unavailable(
                format!("the kernel lacks userfaultfd features {missing}"),
                e,
            ),
            uffd_sys::Error::Open { .. } => unavailable(
                "no userfaultfd can be opened: give this process read-write access to \
                 /dev/userfaultfd, or CAP_SYS_PTRACE, or set vm.unprivileged_userfaultfd=1"
                    .into(),
                e,
            ),
            e => unavailable("the userfaultfd handshake failed".into(), e),
        })?;
    match uffd.check_kernel_mode_faults() {
        Ok(true) => {}
        Ok(false) => {
            return Err(SnapshotError::Unavailable {
                why: format!(
                    "a userfaultfd opened through {} does not receive the kernel's faults, \
                     and KVM writes guest memory from the kernel",
                    uffd.open_path()
                ),
                source: None,
            }
            .into())
        }
        Err(e) => {
            return Err(unavailable(
                "trying whether kernel-mode faults arrive failed".into(),
                e,
            ))
        }
    }
    for (block, backing) in blocks.iter().zip(&backings) {
        let host = block.host_addr(mem).unwrap_or(0);
        let unsupported = |missing: String, source| -> Error {
            SnapshotError::BlockUnsupported {
                name: block.name().to_owned(),
                memory: backing.to_string(),
                missing,
                source,
            }
            .into()
        };
        let ioctls = uffd
            .register(host, block.size(), RegisterMode::WP)
            .map_err(|e| unsupported("the kernel refuses WP registration".into(), Some(e)))?;
        uffd.unregister(host, block.size()).map_err(|source| {
            Error::from(SnapshotError::Memory {
                op: "UFFDIO_UNREGISTER",
                name: block.name().to_owned(),
                offset: 0,
                len: block.size(),
                source,
            })
        })?;
        if !ioctls.contains(Ioctls::WRITEPROTECT | Ioctls::WAKE) {
            return Err(unsupported(
                format!("WP registration does not offer UFFDIO_WRITEPROTECT (it offers {ioctls})"),
                None,
            ));
        }
    }
    Ok(Arc::new(uffd))
}
