//! Whole-page placement into vm-memory guest memory (feature `vm-memory`).
//!
//! A postcopy destination resolves a vCPU's missing-page fault by placing the
//! whole host page (4 KiB, or 2 MiB on hugetlbfs) atomically with
//! `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`. [`Uffd::copy`] is `unsafe` because it
//! writes under whatever references exist to the target. For a
//! [`GuestMemoryMmap`] that is never a problem, and these wrappers are safe:
//!
//! - vm-memory hands out no Rust references into guest memory, only volatile
//!   accesses through raw pointers, so bytes the kernel writes under it break
//!   no aliasing rule;
//! - the range is checked to lie inside one region, page-aligned on the host and
//!   a whole number of pages;
//! - the caller's `&Arc` keeps the mapping alive for the whole call.
//!
//! Kernel writes bypass vm-memory's dirty bitmap: a page placed this way is not
//! marked dirty there.
//!
//! [`guest_host_range`] gives the host address of a checked range, for
//! registering it.

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::{CopyMode, Uffd, Wake};

/// The host virtual address of `[addr, addr + len)` of `mem`, after checking
/// that `page_size` is a power of two, `len` a non-zero multiple of it, and the
/// range lies inside one region with its host start aligned to `page_size`.
pub fn guest_host_range<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
    page_size: usize,
) -> Result<u64> {
    let err = |reason| Error::GuestRange {
        addr: addr.0,
        len: len as u64,
        page_size: page_size as u64,
        reason,
    };
    if !page_size.is_power_of_two() {
        return Err(err("the page size is not a power of two"));
    }
    if len == 0 || len % page_size != 0 {
        return Err(err("the length is not a whole number of pages"));
    }
    let (region, offset) = mem
        .to_region_addr(addr)
        .ok_or_else(|| err("the start is not in guest memory"))?;
    let fits = offset
        .0
        .checked_add(len as u64)
        .is_some_and(|end| end <= region.len());
    if !fits {
        return Err(err("the range is not inside one guest memory region"));
    }
    let host = region
        .get_host_address(offset)
        .map_err(|_| err("the start is not in guest memory"))? as usize as u64;
    if host % page_size as u64 != 0 {
        return Err(err("the host address is not aligned to the page size"));
    }
    Ok(host)
}

impl Uffd {
    /// Places `src` (whole pages of `page_size`) at `addr` of `mem` with
    /// `UFFDIO_COPY`, on a MISSING-registered range, and wakes its waiters unless
    /// `DONTWAKE`. Returns the bytes placed. Errors are those of [`Uffd::copy`]
    /// (`EEXIST` for a page already present, with its waiters woken), or
    /// [`Error::GuestRange`] before any ioctl for a range that fails the checks
    /// of [`guest_host_range`].
    pub fn copy_to_guest<B: Bitmap>(
        &self,
        mem: &Arc<GuestMemoryMmap<B>>,
        addr: GuestAddress,
        src: &[u8],
        page_size: usize,
        mode: CopyMode,
    ) -> Result<u64> {
        let dst = guest_host_range(mem, addr, src.len(), page_size)?;
        // SAFETY: `[dst, dst + src.len())` lies inside one region of `mem`
        // (checked above), which the borrowed Arc keeps mapped for the whole call.
        // vm-memory gives out no Rust references into guest memory, only volatile
        // accesses through raw pointers, so the kernel writing these bytes under
        // any other accessor breaks no aliasing or validity rule (raw bytes have
        // no invalid values).
        unsafe { self.copy(dst, src, mode) }
    }

    /// Maps zero pages over the missing pages of `[addr, addr + len)` of `mem`
    /// with `UFFDIO_ZEROPAGE` (not on hugetlbfs, which lacks it: copy zeros
    /// there). Checks as [`Uffd::copy_to_guest`]; errors as [`Uffd::zeropage`].
    pub fn zero_guest<B: Bitmap>(
        &self,
        mem: &Arc<GuestMemoryMmap<B>>,
        addr: GuestAddress,
        len: usize,
        page_size: usize,
        wake: Wake,
    ) -> Result<u64> {
        let start = guest_host_range(mem, addr, len, page_size)?;
        self.zeropage(start, len as u64, wake)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_before_anything_is_done() {
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 64 << 10),
        ])
        .unwrap();
        let reason = |addr, len, ps| match guest_host_range(&mem, GuestAddress(addr), len, ps) {
            Err(Error::GuestRange { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        let host = guest_host_range(&mem, GuestAddress(0x1000), 0x2000, 0x1000).unwrap();
        assert_eq!(
            host,
            mem.get_host_address(GuestAddress(0x1000)).unwrap() as usize as u64
        );
        assert!(reason(0, 0x1000, 0x1800).contains("power of two"));
        assert!(reason(0, 0, 0x1000).contains("whole number"));
        assert!(reason(0, 0x1800, 0x1000).contains("whole number"));
        assert!(reason(0x80_0000, 0x1000, 0x1000).contains("not in guest memory"));
        // Past the end of the first region, into the hole.
        assert!(reason(0xf000, 0x2000, 0x1000).contains("inside one"));
        assert!(reason(0x800, 0x1000, 0x1000).contains("aligned"));
        let e = guest_host_range(&mem, GuestAddress(0x800), 0x1000, 0x1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest range [0x800, +0x1000) with page size 0x1000: \
             the host address is not aligned to the page size"
        );
        assert_eq!(e.errno(), None);
    }
}
