//! Locked guest memory during postcopy.
//!
//! A VMM that locks its guest RAM (`mlock`, QEMU's `-overcommit
//! mem-lock=on`) cannot keep it locked while postcopy runs: the kernel
//! refuses `MADV_DONTNEED` on locked memory, so discards fail, and locking
//! populates pages, which is the opposite of leaving them missing for
//! userfaultfd. [`MunlockGuard`] unlocks the blocks for the duration and
//! locks them again when it is dropped or [relocked](MunlockGuard::relock),
//! after fault handling ended and every page is there.

use std::sync::Arc;

use uffd_sys::MlockMode;
use vm_memory::GuestAddress;

use super::PostcopyError;
use crate::block::RamBlocks;
use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// Guest RAM unlocked for postcopy, locked again (in the VMM's mode) when
/// relocked or dropped. Relocking happens after fault handling ended: with
/// [`MlockMode::Populate`] every page is faulted in, which would block on
/// pages still missing under userfaultfd.
#[derive(Debug)]
pub struct MunlockGuard {
    mem: Arc<GuestMemoryMmap>,
    ranges: Vec<(String, GuestAddress, usize)>,
    mode: MlockMode,
    relocked: bool,
}

impl MunlockGuard {
    /// Unlocks the memory of every block of `blocks`, which the VMM had
    /// locked with `mode` (and will be locked again with).
    pub fn unlock(mem: Arc<GuestMemoryMmap>, blocks: &RamBlocks, mode: MlockMode) -> Result<Self> {
        let mut ranges = Vec::with_capacity(blocks.len());
        for b in blocks.iter() {
            let len = usize::try_from(b.size()).map_err(|_| Error::NotInMemory {
                name: b.name().to_owned(),
                guest_addr: b.guest_addr().0,
                size: b.size(),
            })?;
            ranges.push((b.name().to_owned(), b.guest_addr(), len));
        }
        // Relock (on drop) only what was unlocked.
        let mut guard = MunlockGuard {
            mem,
            ranges: Vec::with_capacity(ranges.len()),
            mode,
            relocked: false,
        };
        for (name, addr, len) in ranges {
            uffd_sys::munlock_guest(&guard.mem, addr, len).map_err(|source| {
                PostcopyError::Memory {
                    op: "munlock",
                    name: name.clone(),
                    offset: 0,
                    len: len as u64,
                    source,
                }
            })?;
            guard.ranges.push((name, addr, len));
        }
        Ok(guard)
    }

    /// Locks the blocks again; returns the first error after trying every
    /// block (QEMU, in the same spot, reports and goes on: the VM is whole).
    pub fn relock(mut self) -> Result<()> {
        self.relock_inner()
    }

    fn relock_inner(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.relocked, true) {
            return Ok(());
        }
        let mut first = None;
        for (name, addr, len) in &self.ranges {
            if let Err(source) = uffd_sys::mlock_guest(&self.mem, *addr, *len, self.mode) {
                first.get_or_insert(Error::from(PostcopyError::Memory {
                    op: "mlock",
                    name: name.clone(),
                    offset: 0,
                    len: *len as u64,
                    source,
                }));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for MunlockGuard {
    fn drop(&mut self) {
        if let Err(e) = self.relock_inner() {
            log::warn!("postcopy: locking guest memory again: {e}");
        }
    }
}
