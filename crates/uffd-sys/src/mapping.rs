//! Small owned mappings of each memory kind userfaultfd distinguishes: anonymous,
//! shmem (memfd) and hugetlbfs.
//!
//! They serve the host probe, tests and benchmarks. Guest memory itself comes from
//! `vm-memory`; this type never hands out references into the mapping, only copies and
//! atomic accesses, so a range under userfaultfd can change beneath it without breaking
//! Rust's aliasing rules.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::{CopyMode, Uffd, Wake};

/// The memory kinds userfaultfd treats differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    Anonymous,
    /// Shared memory from a memfd (`MAP_SHARED` of a tmpfs file).
    Shmem,
    /// Huge pages of the default size from hugetlbfs (`MAP_HUGETLB`, private).
    Hugetlbfs,
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryKind::Anonymous => "anonymous",
            MemoryKind::Shmem => "shmem (memfd)",
            MemoryKind::Hugetlbfs => "hugetlbfs",
        })
    }
}

/// The base page size of this host.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf reads a constant of the running system and touches no memory.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).unwrap_or(4096)
}

/// The default huge page size (`Hugepagesize` in /proc/meminfo), if the host has one.
pub fn default_huge_page_size() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("Hugepagesize:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An owned mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: *mut u8,
    len: usize,
    kind: MemoryKind,
    page_size: usize,
    /// The backing memfd of a shmem mapping, kept to map it again (MINOR faults).
    memfd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain process memory owned by this value; the pointer is never
// handed out as a reference, and all accesses through `&self` are copies or atomics, so
// sharing and sending it between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: see `Send` above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes (rounded up to the kind's page size) of `kind`. Pages are not
    /// populated.
    pub fn new(kind: MemoryKind, len: usize) -> io::Result<Self> {
        let page_size = match kind {
            MemoryKind::Hugetlbfs => default_huge_page_size()
                .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "no huge page size"))?,
            _ => host_page_size(),
        };
        let len = len.max(1).div_ceil(page_size) * page_size;
        let (flags, memfd) = match kind {
            MemoryKind::Anonymous => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None),
            MemoryKind::Hugetlbfs => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                None,
            ),
            MemoryKind::Shmem => (libc::MAP_SHARED, Some(memfd(MemoryKind::Shmem, len)?)),
        };
        let fd = memfd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at an address the kernel chooses; it aliases nothing of
        // ours, and `fd` (if any) is a live memfd at least `len` bytes long.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr.cast(),
            len,
            kind,
            page_size,
            memfd,
        })
    }

    /// Maps the same memfd again at a second address (shmem only): the second view shares
    /// the page cache with this one, as MINOR-fault users (one view registered, one to
    /// fill the page cache through) need.
    pub fn alias(&self) -> io::Result<Mapping> {
        let memfd = self
            .memfd
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "only shmem has aliases"))?
            .try_clone()?;
        // SAFETY: a fresh shared mapping of a live memfd of `self.len` bytes at an address
        // the kernel chooses; it aliases no Rust object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr.cast(),
            len: self.len,
            kind: self.kind,
            page_size: self.page_size,
            memfd: Some(memfd),
        })
    }

    /// Start address (host virtual), page-aligned.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The kind of memory.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The page size of the mapping (huge page size for hugetlbfs).
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> io::Result<()> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) || offset % align != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "[{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping or misaligned",
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping. A fault on a registered
    /// page blocks until it is resolved.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len(), 1)?;
        // SAFETY: the source range is inside the live mapping (checked) and `buf` is a
        // distinct exclusive buffer; raw bytes have no invalid values.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr.add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `buf` into the mapping at `offset`.
    pub fn write(&self, offset: usize, buf: &[u8]) -> io::Result<()> {
        self.check(offset, buf.len(), 1)?;
        // SAFETY: the destination range is inside the live mapping (checked), no reference
        // into the mapping exists, and `buf` does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.addr.add(offset), buf.len()) };
        Ok(())
    }

    fn atomic_u8(&self, offset: usize) -> io::Result<&AtomicU8> {
        self.check(offset, 1, 1)?;
        // SAFETY: the byte is inside the live mapping (checked), lives as long as `&self`,
        // and is only ever accessed atomically or by raw copies, never through references.
        Ok(unsafe { AtomicU8::from_ptr(self.addr.add(offset)) })
    }

    fn atomic_u64(&self, offset: usize) -> io::Result<&AtomicU64> {
        self.check(offset, 8, 8)?;
        // SAFETY: 8 aligned bytes inside the live mapping (checked; the mapping is
        // page-aligned), valid for as long as `&self`, accessed only atomically or by copies.
        Ok(unsafe { AtomicU64::from_ptr(self.addr.add(offset).cast()) })
    }

    /// Reads one byte atomically (a "touch" that faults like a vCPU access would).
    pub fn load_u8(&self, offset: usize) -> io::Result<u8> {
        Ok(self.atomic_u8(offset)?.load(Ordering::Acquire))
    }

    /// Writes one byte atomically.
    pub fn store_u8(&self, offset: usize, v: u8) -> io::Result<()> {
        self.atomic_u8(offset)?.store(v, Ordering::Release);
        Ok(())
    }

    /// Reads an aligned u64 atomically.
    pub fn load_u64(&self, offset: usize) -> io::Result<u64> {
        Ok(self.atomic_u64(offset)?.load(Ordering::Acquire))
    }

    /// Writes an aligned u64 atomically.
    pub fn store_u64(&self, offset: usize, v: u64) -> io::Result<()> {
        self.atomic_u64(offset)?.store(v, Ordering::Release);
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` over a page-aligned range: anonymous pages become
    /// missing again (reads give zero, or fault if registered); shmem pages are unmapped
    /// from this view but stay in the page cache.
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        self.check(offset, len, self.page_size)?;
        // SAFETY: the range is inside the live mapping (checked); no reference into the
        // mapping exists, so its contents may change under us.
        let ret = unsafe { libc::madvise(self.addr.add(offset).cast(), len, libc::MADV_DONTNEED) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `fallocate(PUNCH_HOLE)` on a shmem mapping's memfd: drops the pages from the page
    /// cache itself, so the next access is a MISSING fault rather than a MINOR one.
    pub fn punch_hole(&self, offset: usize, len: usize) -> io::Result<()> {
        self.check(offset, len, self.page_size)?;
        let memfd = self
            .memfd
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "only shmem has holes"))?;
        let (off, l) = (
            libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        );
        // SAFETY: fallocate on a descriptor we own; it touches no memory of ours directly.
        let ret = unsafe {
            libc::fallocate(
                memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Mapping {
    fn check_uffd(&self, offset: usize, len: usize) -> crate::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr() + offset as u64),
            _ => Err(crate::Error::OutOfBounds {
                offset: offset as u64,
                len: len as u64,
                size: self.len as u64,
            }),
        }
    }

    /// Places `src` at `offset` with `UFFDIO_COPY` through `uffd`, on which the range
    /// must be MISSING-registered; see [`Uffd::copy`] for the errors. Safe, unlike
    /// [`Uffd::copy`] itself: a `Mapping` hands out no references into its memory.
    pub fn copy_in(
        &self,
        uffd: &Uffd,
        offset: usize,
        src: &[u8],
        mode: CopyMode,
    ) -> crate::Result<u64> {
        let dst = self.check_uffd(offset, src.len())?;
        // SAFETY: the range lies inside this mapping (checked), whose memory is only ever
        // accessed through copies and atomics, never through Rust references.
        unsafe { uffd.copy(dst, src, mode) }
    }

    /// Places zero pages at `offset` with `UFFDIO_ZEROPAGE` through `uffd`, bounds-checked.
    pub fn zero_in(
        &self,
        uffd: &Uffd,
        offset: usize,
        len: usize,
        wake: Wake,
    ) -> crate::Result<u64> {
        let start = self.check_uffd(offset, len)?;
        uffd.zeropage(start, len as u64, wake)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned, and this value owns the
        // mapping; no reference into it can outlive `self`.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// A new memfd of `len` bytes (close-on-exec): tmpfs pages for
/// [`MemoryKind::Shmem`], huge pages of the default size for
/// [`MemoryKind::Hugetlbfs`] (`MFD_HUGETLB`; `len` must then be a multiple of
/// the huge page size, and mapping it needs free huge pages). Map it with
/// `MAP_SHARED` (vm-memory's file-backed regions do) to get guest memory of that
/// kind. [`MemoryKind::Anonymous`] has no file: `Unsupported`.
pub fn memfd(kind: MemoryKind, len: usize) -> io::Result<OwnedFd> {
    const NAME: &CStr = c"uffd-sys";
    let flags = match kind {
        MemoryKind::Shmem => libc::MFD_CLOEXEC,
        MemoryKind::Hugetlbfs => libc::MFD_CLOEXEC | libc::MFD_HUGETLB,
        MemoryKind::Anonymous => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "anonymous memory has no memfd",
            ))
        }
    };
    // SAFETY: NAME is a valid NUL-terminated string; the call creates a new descriptor.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create succeeded, so `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let flen =
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: ftruncate on the descriptor we own; no memory of ours is touched.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), flen) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_and_bounds() {
        let m = Mapping::new(MemoryKind::Anonymous, 10_000).unwrap();
        assert_eq!(m.len() % host_page_size(), 0);
        m.write(100, b"hello").unwrap();
        let mut b = [0u8; 5];
        m.read(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(m.read(m.len() - 2, &mut b).is_err());
        assert!(m.load_u64(3).is_err(), "misaligned u64 rejected");
        assert!(m.store_u8(m.len(), 1).is_err());
        m.discard(0, m.page_size()).unwrap();
        assert_eq!(m.load_u8(100).unwrap(), 0, "DONTNEED drops anonymous pages");
    }

    #[test]
    fn memfds_of_each_kind() {
        let fd = memfd(MemoryKind::Shmem, 8192).unwrap();
        let f = std::fs::File::from(fd);
        assert_eq!(f.metadata().unwrap().len(), 8192);
        let e = memfd(MemoryKind::Anonymous, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        // A hugetlbfs memfd needs a size in whole huge pages.
        if let Some(huge) = default_huge_page_size() {
            assert!(memfd(MemoryKind::Hugetlbfs, huge + 4096).is_err());
        }
    }

    #[test]
    fn shmem_alias_shares_pages() {
        let m = Mapping::new(MemoryKind::Shmem, 8192).unwrap();
        let a = m.alias().unwrap();
        a.store_u64(4096, 0xfeed).unwrap();
        assert_eq!(m.load_u64(4096).unwrap(), 0xfeed);
        m.punch_hole(4096, 4096).unwrap();
        assert_eq!(a.load_u64(4096).unwrap(), 0);
    }
}
