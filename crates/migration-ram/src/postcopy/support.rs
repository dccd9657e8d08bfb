//! Can this host serve postcopy for these blocks? Asked before anything is
//! received, so that a destination that cannot says so while the source can
//! still choose precopy.

use std::sync::Arc;

use uffd_sys::{Backing, Features, Ioctls, MemoryKind, RegisterMode, Uffd};

use super::PostcopyError;
use crate::block::{RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// What [`check_blocks`] found for one block.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockSupport {
    /// The block's name.
    pub name: String,
    /// How its memory is backed.
    pub backing: Backing,
    /// The ioctls a MISSING registration of it offers.
    pub ioctls: Ioctls,
}

/// How to get a userfaultfd that sees the kernel's faults, for errors.
const OPEN_HINT: &str = "KVM touches guest memory from the kernel, so postcopy needs a \
    userfaultfd that receives kernel-mode faults (uffd-sys never asks for user-mode-only \
    ones): give this process read-write access to /dev/userfaultfd (Linux 6.1 and later), \
    or CAP_SYS_PTRACE, or set vm.unprivileged_userfaultfd=1";

/// The userfaultfd feature MISSING registration of `kind` needs.
fn feature_for(kind: MemoryKind) -> Features {
    match kind {
        MemoryKind::Shmem => Features::MISSING_SHMEM,
        MemoryKind::Hugetlbfs => Features::MISSING_HUGETLBFS,
        MemoryKind::Anonymous => Features::empty(),
    }
}

fn unsupported(
    block: &RamBlock,
    memory: String,
    missing: String,
    source: Option<uffd_sys::Error>,
) -> Error {
    PostcopyError::BlockUnsupported {
        name: block.name().to_owned(),
        memory,
        missing,
        source,
    }
    .into()
}

/// How `block`'s memory is backed, checked against the block: its page size
/// must be the memory's, and its host start aligned to it.
pub(crate) fn block_backing(mem: &GuestMemoryMmap, block: &RamBlock) -> Result<Backing> {
    let region = block.region(mem).ok_or_else(|| Error::NotInMemory {
        name: block.name().to_owned(),
        guest_addr: block.guest_addr().0,
        size: block.size(),
    })?;
    let backing = uffd_sys::region_backing(region).map_err(|e| match e {
        // The reason says it all; no source to repeat it.
        uffd_sys::Error::UnsupportedMemory { reason, .. } => {
            unsupported(block, "unsupported backing".into(), reason, None)
        }
        e => unsupported(
            block,
            "unknown backing".into(),
            "its backing cannot be told".into(),
            Some(e),
        ),
    })?;
    if backing.page_size as u64 != u64::from(block.page_size()) {
        return Err(unsupported(
            block,
            backing.to_string(),
            format!(
                "the block's page size is {:#x}: pages are placed and discarded whole, so it \
                 must be the memory's page size",
                block.page_size()
            ),
            None,
        ));
    }
    let host = block.host_addr(mem).unwrap_or(0);
    if host % backing.page_size as u64 != 0 {
        return Err(unsupported(
            block,
            backing.to_string(),
            format!("its host address {host:#x} is not aligned to its page size"),
            None,
        ));
    }
    Ok(backing)
}

/// Checks that this host can serve postcopy for `blocks` of `mem`, and opens
/// the userfaultfd to serve it with.
///
/// 1. Each block's memory kind is told from its region ([`uffd_sys::region_backing`]:
///    anonymous, shmem from a memfd or shared anonymous memory, hugetlbfs), and
///    its page size checked against the block's.
/// 2. A userfaultfd is opened that receives kernel-mode faults (KVM's), with
///    the features the kinds need (`MISSING_SHMEM`, `MISSING_HUGETLBFS`) and,
///    where the kernel has it, `THREAD_ID` for blocktime; that the kernel's own
///    faults reach it is tried ([`Uffd::check_kernel_mode_faults`]).
/// 3. Each block is registered for MISSING faults and unregistered again
///    ([`check_blocks`]), to see that `UFFDIO_COPY` (and `UFFDIO_ZEROPAGE`,
///    except on hugetlbfs, which has none) are offered.
///
/// Errors ([`PostcopyError::BlockUnsupported`],
/// [`PostcopyError::Unavailable`]) name the block, its memory kind and what
/// is missing. Nothing stays registered.
pub fn check_support(mem: &GuestMemoryMmap, blocks: &RamBlocks) -> Result<Arc<Uffd>> {
    blocks.check_memory(mem)?;
    let backings = blocks
        .iter()
        .map(|b| block_backing(mem, b))
        .collect::<Result<Vec<_>>>()?;
    let needed = backings
        .iter()
        .fold(Features::empty(), |f, b| f | feature_for(b.kind));
    let uffd = Uffd::builder()
        .require(needed)
        .request(Features::THREAD_ID)
        .open()
        .map_err(|e| match e {
            uffd_sys::Error::MissingFeatures { missing, .. } => {
                let (block, backing) = blocks
                    .iter()
                    .zip(&backings)
                    .find(|(_, b)| missing.intersects(feature_for(b.kind)))
                    .map_or((None, None), |(bl, b)| (Some(bl), Some(b)));
                match (block, backing) {
                    (Some(block), Some(backing)) => unsupported(
                        block,
                        backing.to_string(),
                        format!(
                            "the kernel lacks userfaultfd feature {}",
                            missing & feature_for(backing.kind)
                        ),
                        Some(e),
                    ),
                    _ => PostcopyError::Unavailable {
                        why: format!("the kernel lacks userfaultfd features {missing}"),
                        source: Some(e),
                    }
                    .into(),
                }
            }
            uffd_sys::Error::Open { .. } => PostcopyError::Unavailable {
                why: format!("no userfaultfd can be opened. {OPEN_HINT}"),
                source: Some(e),
            }
            .into(),
            e => PostcopyError::Unavailable {
                why: "the userfaultfd handshake failed".into(),
                source: Some(e),
            }
            .into(),
        })?;
    match uffd.check_kernel_mode_faults() {
        Ok(true) => {}
        Ok(false) => {
            return Err(PostcopyError::Unavailable {
                why: format!(
                    "a userfaultfd opened through {} does not receive the kernel's faults. \
                     {OPEN_HINT}",
                    uffd.open_path()
                ),
                source: None,
            }
            .into())
        }
        Err(e) => {
            return Err(PostcopyError::Unavailable {
                why: "trying whether kernel-mode faults arrive failed".into(),
                source: Some(e),
            }
            .into())
        }
    }
    check_blocks(&uffd, mem, blocks)?;
    Ok(Arc::new(uffd))
}

/// Registers each block of `blocks` with `uffd` for MISSING faults and
/// unregisters it again, checking that `UFFDIO_COPY` and `UFFDIO_WAKE` (and
/// `UFFDIO_ZEROPAGE`, except on hugetlbfs) are offered; the last step of
/// [`check_support`], for a caller with its own handle. A refused
/// registration names the feature the handle lacks, if any.
pub fn check_blocks(
    uffd: &Uffd,
    mem: &GuestMemoryMmap,
    blocks: &RamBlocks,
) -> Result<Vec<BlockSupport>> {
    let mut out = Vec::with_capacity(blocks.len());
    for block in blocks.iter() {
        let backing = block_backing(mem, block)?;
        let host = block.host_addr(mem).unwrap_or(0);
        let ioctls = match uffd.register(host, block.size(), RegisterMode::MISSING) {
            Ok(i) => i,
            Err(e) => {
                let lacks = feature_for(backing.kind) - uffd.features();
                // EINVAL: the kernel will not register this memory in this mode.
                let refused = e
                    .errno()
                    .map(std::io::Error::from_raw_os_error)
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidInput);
                let missing = if refused && !lacks.is_empty() {
                    format!(
                        "the kernel refuses MISSING registration: the userfaultfd lacks \
                         feature {lacks}"
                    )
                } else if refused {
                    "the kernel refuses MISSING registration of this memory".to_owned()
                } else {
                    "MISSING registration failed".to_owned()
                };
                return Err(unsupported(block, backing.to_string(), missing, Some(e)));
            }
        };
        uffd.unregister(host, block.size())
            .map_err(|source| PostcopyError::Memory {
                op: "UFFDIO_UNREGISTER",
                name: block.name().to_owned(),
                offset: 0,
                len: block.size(),
                source,
            })?;
        let mut needed = Ioctls::COPY | Ioctls::WAKE;
        if backing.kind != MemoryKind::Hugetlbfs {
            needed |= Ioctls::ZEROPAGE;
        }
        let lacking = needed - ioctls;
        if !lacking.is_empty() {
            return Err(unsupported(
                block,
                backing.to_string(),
                format!("MISSING registration does not offer {lacking} (it offers {ioctls})"),
                None,
            ));
        }
        out.push(BlockSupport {
            name: block.name().to_owned(),
            backing,
            ioctls,
        });
    }
    Ok(out)
}
