//! What a postcopy destination does to guest memory besides placing pages
//! (feature `vm-memory`): tell how a region is backed, drop pages so they fault
//! as missing again, advise transparent huge pages off and on, and unlock and
//! lock it.
//!
//! | function | system call | why |
//! |----------|-------------|-----|
//! | [`region_backing`], [`guest_backing`] | `fstatfs` of the region's file | the memory kind decides the userfaultfd features, whether `UFFDIO_ZEROPAGE` exists, and how to discard |
//! | [`discard_guest`] | `madvise(MADV_DONTNEED)`, `madvise(MADV_REMOVE)` or `fallocate(PUNCH_HOLE)` | pages the source dirtied again must fault and be requested |
//! | [`advise_guest_thp`] | `madvise(MADV_NOHUGEPAGE / MADV_HUGEPAGE)` | a discard must empty a 4 KiB page, not leave it inside a huge one |
//! | [`mlock_guest`], [`munlock_guest`] | `mlock2`, `munlock` | locked memory refuses `MADV_DONTNEED`, so a VMM that locks its guest RAM unlocks it for postcopy |
//! | [`populate_guest`] | `madvise(MADV_POPULATE_READ / MADV_POPULATE_WRITE)` | map every page without changing a byte: before write protection where the kernel cannot protect unpopulated pages, and as a writer to every page that proves none stays protected |
//! | [`write_protected_pages`] | a read of `/proc/self/pagemap` | how many pages of a range are still userfaultfd write-protected |
//!
//! Each takes a guest range, checks that it lies inside one region and is
//! aligned to the page size that matters (the backing's page size for a
//! discard, the host's base page for the rest), and only then makes the call.
//!
//! # Why a discard is safe
//!
//! A discard changes what guest memory reads as (to zeros, or to a missing page
//! that blocks the reader until a userfaultfd resolves it), under every other
//! accessor. As for [`Uffd::copy_to_guest`](crate::Uffd::copy_to_guest), that
//! breaks no Rust rule for a [`GuestMemoryMmap`]: vm-memory hands out no Rust
//! references into guest memory, only volatile accesses through raw pointers,
//! and raw bytes have no invalid values; the borrowed memory keeps the mapping
//! alive for the call.
//!
//! # How the backing is told
//!
//! | region | kind | page size | discard |
//! |--------|------|-----------|---------|
//! | no file, `MAP_PRIVATE` | anonymous | host base page | `MADV_DONTNEED` |
//! | no file, `MAP_PRIVATE \| MAP_HUGETLB` | hugetlbfs | the `MAP_HUGE_*` size, else the default huge page | `MADV_DONTNEED` |
//! | no file, `MAP_SHARED` (with or without `MAP_HUGETLB`) | shmem or hugetlbfs | as above | `MADV_REMOVE` (frees the hidden file's pages) |
//! | a file on tmpfs (memfd), `MAP_SHARED` | shmem | host base page | `fallocate(PUNCH_HOLE)` |
//! | a file on hugetlbfs (`MFD_HUGETLB` memfd), `MAP_SHARED` | hugetlbfs | the file system's block size | `fallocate(PUNCH_HOLE)` |
//! | a `MAP_PRIVATE` mapping of a file | refused | | a discard would show the file's page again instead of faulting |
//! | a file on any other file system | refused | | userfaultfd cannot register it for missing faults |
//!
//! The mapping flags are vm-memory's record of how the region was mapped
//! (`MmapRegion::flags`); a region built over a raw pointer must carry the
//! flags it was really mapped with.

use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::error::{Error, MemoryOp, Result};
use crate::guest::guest_host_range;
use crate::mapping::{default_huge_page_size, host_page_size};
use crate::MemoryKind;

/// `TMPFS_MAGIC` of `<linux/magic.h>`: memfds and shared anonymous memory.
const TMPFS_MAGIC: u64 = 0x0102_1994;
/// `HUGETLBFS_MAGIC` of `<linux/magic.h>`.
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// `MAP_HUGE_SHIFT` and `MAP_HUGE_MASK` of `<linux/mman.h>`: log2 of the huge
/// page size in the flags of a `MAP_HUGETLB` mapping (0 for the default size).
const MAP_HUGE_SHIFT: i32 = 26;
const MAP_HUGE_MASK: i32 = 0x3f;

/// How pages of a region are dropped so that the next access is a missing fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscardMethod {
    /// `madvise(MADV_DONTNEED)`: private memory, anonymous or hugetlb.
    DontNeed,
    /// `madvise(MADV_REMOVE)`: shared anonymous memory (its file is hidden).
    Remove,
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the region's file, which unmaps the
    /// pages from every mapping too.
    PunchHole,
}

/// How a guest memory region is backed, as userfaultfd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backing {
    /// The memory kind: which userfaultfd feature MISSING registration needs
    /// (`MISSING_SHMEM`, `MISSING_HUGETLBFS`) and whether `UFFDIO_ZEROPAGE` exists
    /// (not on hugetlbfs).
    pub kind: MemoryKind,
    /// The page size of the memory: the host's base page, or the huge page size.
    /// Pages are placed and discarded whole.
    pub page_size: usize,
    /// A `MAP_SHARED` mapping.
    pub shared: bool,
    /// The offset in its file of the region's first byte, for file-backed regions.
    pub file_offset: Option<u64>,
    /// How a discard drops pages.
    pub discard: DiscardMethod,
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ps = self.page_size;
        if ps >= 1 << 20 {
            write!(f, "{} with {} MiB pages", self.kind, ps >> 20)
        } else {
            write!(f, "{} with {} KiB pages", self.kind, ps >> 10)
        }
    }
}

/// `fstatfs` of a file: its file system's magic and block size.
fn statfs(file: &std::fs::File) -> std::io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is a writable buffer of exactly one `struct statfs`, which is what
    // fstatfs(2) fills on success; `file` is an open descriptor for the whole call.
    let ret = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between libcs and architectures (signed or not, 32 or
    // 64 bits); the values are a 32-bit magic and a block size, which fit a u64
    // either way, so the casts keep them.
    #[allow(clippy::unnecessary_cast)]
    let (magic, bsize) = (st.f_type as u64 & 0xffff_ffff, st.f_bsize as u64);
    Ok((magic, bsize))
}

/// How `region` is backed. Fails for memory userfaultfd cannot serve missing
/// faults for ([`Error::UnsupportedMemory`], with the reason) and when the file
/// cannot be inspected ([`Error::Memory`]).
pub fn region_backing<B: Bitmap>(region: &GuestRegionMmap<B>) -> Result<Backing> {
    let flags = region.flags();
    let shared = flags & libc::MAP_SHARED != 0;
    let unsupported = |reason: String| Error::UnsupportedMemory {
        addr: region.start_addr().0,
        len: region.len(),
        reason,
    };
    let huge_size = || -> Result<usize> {
        let log2 = (flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK;
        if log2 != 0 {
            return Ok(1usize << log2);
        }
        default_huge_page_size()
            .ok_or_else(|| unsupported("MAP_HUGETLB memory on a host without huge pages".into()))
    };
    let Some(fo) = region.file_offset() else {
        let hugetlb = flags & libc::MAP_HUGETLB != 0;
        let (kind, page_size) = if hugetlb {
            (MemoryKind::Hugetlbfs, huge_size()?)
        } else if shared {
            (MemoryKind::Shmem, host_page_size())
        } else {
            (MemoryKind::Anonymous, host_page_size())
        };
        return Ok(Backing {
            kind,
            page_size,
            shared,
            file_offset: None,
            discard: if shared {
                DiscardMethod::Remove
            } else {
                DiscardMethod::DontNeed
            },
        });
    };
    let (magic, bsize) = statfs(fo.file()).map_err(|source| Error::Memory {
        op: MemoryOp::Fstatfs,
        start: fo.start(),
        len: region.len(),
        source,
    })?;
    let (kind, page_size) = match magic {
        TMPFS_MAGIC => (MemoryKind::Shmem, host_page_size()),
        HUGETLBFS_MAGIC => (
            MemoryKind::Hugetlbfs,
            usize::try_from(bsize)
                .map_err(|_| unsupported("a huge page size past usize".into()))?,
        ),
        other => {
            let fs = match other {
                0xef53 => " (ext2/3/4)",
                0x5846_5342 => " (xfs)",
                0x9123_683e => " (btrfs)",
                0x794c_7630 => " (overlayfs)",
                0x6969 => " (nfs)",
                _ => "",
            };
            return Err(unsupported(format!(
                "a file on a file system with magic {other:#x}{fs}: userfaultfd serves \
                 missing faults only for anonymous memory, tmpfs (memfd) and hugetlbfs"
            )));
        }
    };
    if !shared {
        return Err(unsupported(format!(
            "a MAP_PRIVATE mapping of a {kind} file: a discarded page would show the \
             file's page again instead of faulting as missing; map it MAP_SHARED"
        )));
    }
    Ok(Backing {
        kind,
        page_size,
        shared,
        file_offset: Some(fo.start()),
        discard: DiscardMethod::PunchHole,
    })
}

/// How the region of `mem` holding `addr` is backed; see [`region_backing`].
pub fn guest_backing<B: Bitmap>(mem: &GuestMemoryMmap<B>, addr: GuestAddress) -> Result<Backing> {
    let region = mem.find_region(addr).ok_or(Error::GuestRange {
        addr: addr.0,
        len: 0,
        page_size: 0,
        reason: "the start is not in guest memory",
    })?;
    region_backing(region)
}

/// Runs `madvise(advice)` over a checked host range.
fn madvise(start: u64, len: usize, advice: libc::c_int, op: MemoryOp) -> Result<()> {
    // SAFETY: `[start, start + len)` lies inside one region of a guest memory the
    // caller borrows (checked by `guest_host_range`), so it is mapped for the call.
    // The advice values used here either leave the bytes alone (huge page advice)
    // or drop pages of guest memory, which vm-memory only ever reads through raw
    // pointers (see the module docs): no Rust reference observes the change.
    let ret = unsafe { libc::madvise(start as usize as *mut libc::c_void, len, advice) };
    if ret < 0 {
        return Err(Error::Memory {
            op,
            start,
            len: len as u64,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Drops the pages of `[addr, addr + len)` of `mem` so that the next access is a
/// missing-page fault (blocking on a userfaultfd where the range is registered,
/// reading zeros where it is not). The range must lie in one region and be whole
/// pages of its backing's page size (a partial huge page would be zeroed, not
/// dropped). Anonymous memory: `MADV_DONTNEED`; shared anonymous memory:
/// `MADV_REMOVE`; memfd and hugetlbfs files: `fallocate(PUNCH_HOLE)` over the
/// file range. Returns the backing it found.
///
/// The memory must not be locked (`mlock`): the kernel refuses `MADV_DONTNEED`
/// there ([`munlock_guest`] first).
pub fn discard_guest<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
) -> Result<Backing> {
    let region = mem.find_region(addr).ok_or(Error::GuestRange {
        addr: addr.0,
        len: len as u64,
        page_size: 0,
        reason: "the start is not in guest memory",
    })?;
    let backing = region_backing(region)?;
    let start = guest_host_range(mem, addr, len, backing.page_size)?;
    match backing.discard {
        DiscardMethod::DontNeed => madvise(start, len, libc::MADV_DONTNEED, MemoryOp::DontNeed)?,
        DiscardMethod::Remove => madvise(start, len, libc::MADV_REMOVE, MemoryOp::Remove)?,
        DiscardMethod::PunchHole => {
            let fo = region.file_offset().ok_or(Error::UnsupportedMemory {
                addr: addr.0,
                len: len as u64,
                reason: "the region lost its file".into(),
            })?;
            // `addr` is inside `region` (find_region), so the subtraction holds.
            let file_off = fo.start() + (addr.0 - region.start_addr().0);
            let bad = |source| Error::Memory {
                op: MemoryOp::PunchHole,
                start: file_off,
                len: len as u64,
                source,
            };
            let off = libc::off_t::try_from(file_off)
                .map_err(|_| bad(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
            let l = libc::off_t::try_from(len)
                .map_err(|_| bad(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
            // SAFETY: fallocate on a descriptor the region owns; it touches no memory of
            // ours directly. The pages it drops are guest memory, which vm-memory
            // only reads through raw pointers (see the module docs).
            let ret = unsafe {
                libc::fallocate(
                    fo.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    l,
                )
            };
            if ret < 0 {
                return Err(bad(std::io::Error::last_os_error()));
            }
        }
    }
    Ok(backing)
}

/// Transparent huge page advice for a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThpAdvice {
    /// `MADV_HUGEPAGE`: huge pages welcome (where the host's mode is `madvise` or
    /// `always`).
    Huge,
    /// `MADV_NOHUGEPAGE`: no huge page is made or refilled here.
    NoHuge,
}

/// Advises transparent huge pages on or off over `[addr, addr + len)` of `mem`
/// (inside one region, whole base pages). The bytes are left alone. Meant for
/// anonymous and shmem memory; hugetlbfs has no transparent huge pages.
pub fn advise_guest_thp<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
    advice: ThpAdvice,
) -> Result<()> {
    let start = guest_host_range(mem, addr, len, host_page_size())?;
    match advice {
        ThpAdvice::Huge => madvise(start, len, libc::MADV_HUGEPAGE, MemoryOp::HugePage),
        ThpAdvice::NoHuge => madvise(start, len, libc::MADV_NOHUGEPAGE, MemoryOp::NoHugePage),
    }
}

/// How [`mlock_guest`] locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlockMode {
    /// Lock and populate every page now (`mlock`).
    #[default]
    Populate,
    /// Lock pages as they are faulted in (`mlock2(MLOCK_ONFAULT)`).
    OnFault,
}

/// Locks `[addr, addr + len)` of `mem` (inside one region, whole base pages) in
/// RAM. The bytes are left alone; [`MlockMode::Populate`] faults every page in,
/// which blocks on missing pages of a range registered with a userfaultfd.
pub fn mlock_guest<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
    mode: MlockMode,
) -> Result<()> {
    let start = guest_host_range(mem, addr, len, host_page_size())?;
    let (flags, op) = match mode {
        MlockMode::Populate => (0, MemoryOp::Mlock),
        MlockMode::OnFault => (libc::MLOCK_ONFAULT, MemoryOp::MlockOnFault),
    };
    // SAFETY: the range lies inside one region of the borrowed guest memory
    // (checked), so it is mapped for the call; mlock2 changes no byte of it.
    let ret = unsafe { libc::mlock2(start as usize as *const libc::c_void, len, flags) };
    if ret < 0 {
        return Err(Error::Memory {
            op,
            start,
            len: len as u64,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Unlocks `[addr, addr + len)` of `mem` (inside one region, whole base pages).
/// The bytes are left alone.
pub fn munlock_guest<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
) -> Result<()> {
    let start = guest_host_range(mem, addr, len, host_page_size())?;
    // SAFETY: the range lies inside one region of the borrowed guest memory
    // (checked), so it is mapped for the call; munlock changes no byte of it.
    let ret = unsafe { libc::munlock(start as usize as *const libc::c_void, len) };
    if ret < 0 {
        return Err(Error::Memory {
            op: MemoryOp::Munlock,
            start,
            len: len as u64,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// How [`populate_guest`] maps pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// `MADV_POPULATE_READ`: map every page readable, as a read would.
    /// Anonymous memory never written maps the shared zero page (nothing is
    /// allocated); a write-protected page stays protected.
    Read,
    /// `MADV_POPULATE_WRITE`: map every page writable, as a write would,
    /// without writing. A page that is write-protected (or missing) under a
    /// userfaultfd blocks the call until the fault is resolved.
    Write,
}

/// Maps every page of `[addr, addr + len)` of `mem` (inside one region, whole
/// base pages) without changing a byte of it (Linux 5.14 and later).
///
/// [`Populate::Read`] before write-protecting anonymous memory makes its
/// unpopulated pages protectable where the kernel has no
/// `WP_UNPOPULATED` (a page table entry must exist to carry the protection).
/// [`Populate::Write`] is a writer to every page: it returns only once no page
/// of the range is write-protected any more.
pub fn populate_guest<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
    how: Populate,
) -> Result<()> {
    let start = guest_host_range(mem, addr, len, host_page_size())?;
    let (advice, op) = match how {
        Populate::Read => (libc::MADV_POPULATE_READ, MemoryOp::PopulateRead),
        Populate::Write => (libc::MADV_POPULATE_WRITE, MemoryOp::PopulateWrite),
    };
    madvise(start, len, advice, op)
}

/// `PM_UFFD_WP` of `Documentation/admin-guide/mm/pagemap.rst`: the page table
/// entry is userfaultfd write-protected (Linux 5.13 and later).
const PAGEMAP_UFFD_WP: u64 = 1 << 57;

/// Counts the base pages of `[addr, addr + len)` of `mem` (inside one region,
/// whole base pages) whose page table entry is userfaultfd write-protected,
/// from `/proc/self/pagemap` (bit 57). A write to any of them would block on
/// the userfaultfd, or fault forever if nobody reads it: after a write-protect
/// snapshot ends, this must be 0.
pub fn write_protected_pages<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;

    let base = host_page_size();
    let start = guest_host_range(mem, addr, len, base)?;
    let bad = |source| Error::Memory {
        op: MemoryOp::Pagemap,
        start,
        len: len as u64,
        source,
    };
    let file = std::fs::File::open("/proc/self/pagemap").map_err(bad)?;
    const ENTRIES: usize = 8192;
    let mut buf = vec![0u8; ENTRIES * 8];
    let pages = len / base;
    let first = start / base as u64;
    let mut protected = 0;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(ENTRIES);
        let bytes = &mut buf[..n * 8];
        file.read_exact_at(bytes, (first + done as u64) * 8)
            .map_err(bad)?;
        protected += bytes
            .chunks_exact(8)
            .filter(|e| {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                u64::from_ne_bytes(w) & PAGEMAP_UFFD_WP != 0
            })
            .count() as u64;
        done += n;
    }
    Ok(protected)
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use vm_memory::mmap::MmapRegion;
    use vm_memory::{Bytes, FileOffset};

    use super::*;
    use crate::mapping::memfd;

    const PAGE: usize = 4096;

    fn anon(len: usize) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), len)]).unwrap()
    }

    fn shmem(len: usize) -> GuestMemoryMmap<()> {
        let fd = memfd(MemoryKind::Shmem, len).unwrap();
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(File::from(fd), 0)),
        )])
        .unwrap()
    }

    #[test]
    fn backing_of_anonymous_and_memfd_memory() {
        let mem = anon(16 * PAGE);
        let b = guest_backing(&mem, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(b.kind, MemoryKind::Anonymous);
        assert_eq!(b.page_size, host_page_size());
        assert_eq!(b.discard, DiscardMethod::DontNeed);
        assert!(!b.shared && b.file_offset.is_none());
        assert_eq!(b.to_string(), "anonymous with 4 KiB pages");

        let mem = shmem(16 * PAGE);
        let b = guest_backing(&mem, GuestAddress(PAGE as u64)).unwrap();
        assert_eq!(b.kind, MemoryKind::Shmem);
        assert_eq!(b.discard, DiscardMethod::PunchHole);
        assert_eq!(b.file_offset, Some(0));
        assert!(b.shared);

        assert!(matches!(
            guest_backing(&mem, GuestAddress(1 << 30)),
            Err(Error::GuestRange { .. })
        ));
    }

    #[test]
    fn refused_backings_say_why() {
        // A private mapping of a memfd.
        let fd = memfd(MemoryKind::Shmem, 4 * PAGE).unwrap();
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(File::from(fd), 0)),
            4 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let e = region_backing(&region).unwrap_err();
        assert!(
            e.to_string().contains("MAP_PRIVATE mapping of a shmem"),
            "{e}"
        );
        assert_eq!(e.errno(), None);
    }

    #[test]
    fn discard_drops_anonymous_and_memfd_pages() {
        for mem in [anon(8 * PAGE), shmem(8 * PAGE)] {
            let base = mem.iter().next().unwrap().start_addr();
            mem.write_slice(&[7; 4 * PAGE], base).unwrap();
            discard_guest(&mem, GuestAddress(base.0 + PAGE as u64), 2 * PAGE).unwrap();
            let mut got = vec![0u8; 4 * PAGE];
            mem.read_slice(&mut got, base).unwrap();
            assert!(got[..PAGE].iter().all(|&b| b == 7));
            assert!(got[PAGE..3 * PAGE].iter().all(|&b| b == 0));
            assert!(got[3 * PAGE..].iter().all(|&b| b == 7));
            // Not whole pages: refused before any call.
            let e = discard_guest(&mem, GuestAddress(base.0 + 1), PAGE).unwrap_err();
            assert!(matches!(e, Error::GuestRange { .. }), "{e}");
        }
    }

    #[test]
    fn thp_advice_and_locking_leave_bytes_alone() {
        let mem = anon(8 * PAGE);
        let base = GuestAddress(0x10_0000);
        mem.write_slice(&[3; PAGE], base).unwrap();
        advise_guest_thp(&mem, base, 8 * PAGE, ThpAdvice::NoHuge).unwrap();
        advise_guest_thp(&mem, base, 8 * PAGE, ThpAdvice::Huge).unwrap_or_else(|e| {
            // A kernel without THP refuses MADV_HUGEPAGE with EINVAL.
            assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
        });
        // Locking may be refused by RLIMIT_MEMLOCK; unlocking never is.
        if mlock_guest(&mem, base, PAGE, MlockMode::OnFault).is_ok() {
            munlock_guest(&mem, base, PAGE).unwrap();
        }
        munlock_guest(&mem, base, 8 * PAGE).unwrap();
        assert_eq!(mem.read_obj::<u8>(base).unwrap(), 3);
        let e = munlock_guest(&mem, base, 9 * PAGE).unwrap_err();
        assert!(matches!(e, Error::GuestRange { .. }), "{e}");
    }
}
