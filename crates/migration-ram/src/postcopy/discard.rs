//! Discards: pages the source sent during precopy and the guest dirtied
//! again. At the switch to postcopy the source names them in `Discard`
//! commands; the destination drops their contents, so that the next access
//! faults as missing and the page is requested, and clears their bits in the
//! block's `received` bitmap.
//!
//! | memory | how a page is dropped |
//! |--------|------------------------|
//! | anonymous (private), private hugetlb | `madvise(MADV_DONTNEED)` |
//! | memfd (shmem), hugetlbfs file | `fallocate(PUNCH_HOLE)` over the file range |
//! | shared anonymous | `madvise(MADV_REMOVE)` |
//!
//! Transparent huge pages are advised off (`MADV_NOHUGEPAGE`) on the
//! anonymous and shmem blocks before the first discard, so that dropping a
//! 4 KiB page really empties it (a huge page would be split, and no huge page
//! is made again around the hole), and advised on again (`MADV_HUGEPAGE`)
//! when postcopy ends, where the host's THP mode is `madvise` or `always`; a
//! [`ThpGuard`] does both. Doing it at the first discard rather than before
//! precopy leaves the pages precopy placed in huge pages.
//!
//! Discarding needs the memory unlocked (the kernel refuses `MADV_DONTNEED`
//! on locked memory): see [`MunlockGuard`](super::MunlockGuard).

use std::sync::Arc;

use migration_stream::{BlockId, DiscardRange};
use uffd_sys::{MemoryKind, ThpAdvice, ThpMode};
use vm_memory::GuestAddress;

use super::support::block_backing;
use super::PostcopyError;
use crate::block::{RamBlock, RamBlocks};
use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// Transparent huge pages advised off on guest RAM, and on again when
/// restored or dropped.
///
/// Only anonymous and shmem blocks are touched (hugetlbfs has no transparent
/// huge pages). The restore advises `MADV_HUGEPAGE` only where the host's THP
/// mode is `madvise` or `always`, read when restoring.
#[derive(Debug)]
pub struct ThpGuard {
    mem: Arc<GuestMemoryMmap>,
    /// Block name, guest address and length of each range advised off.
    ranges: Vec<(String, GuestAddress, usize)>,
    restored: bool,
}

impl ThpGuard {
    /// Advises transparent huge pages off on the anonymous and shmem blocks of
    /// `blocks`. On error, what was advised off already is restored.
    pub fn disable(mem: Arc<GuestMemoryMmap>, blocks: &RamBlocks) -> Result<Self> {
        let mut guard = ThpGuard {
            mem,
            ranges: Vec::new(),
            restored: false,
        };
        for block in blocks.iter() {
            let backing = block_backing(&guard.mem, block)?;
            if backing.kind == MemoryKind::Hugetlbfs {
                continue;
            }
            let len = usize::try_from(block.size()).map_err(|_| Error::NotInMemory {
                name: block.name().to_owned(),
                guest_addr: block.guest_addr().0,
                size: block.size(),
            })?;
            uffd_sys::advise_guest_thp(&guard.mem, block.guest_addr(), len, ThpAdvice::NoHuge)
                .map_err(|source| PostcopyError::Memory {
                    op: "madvise(MADV_NOHUGEPAGE)",
                    name: block.name().to_owned(),
                    offset: 0,
                    len: block.size(),
                    source,
                })?;
            guard
                .ranges
                .push((block.name().to_owned(), block.guest_addr(), len));
        }
        Ok(guard)
    }

    /// Advises transparent huge pages on again (where the host's mode wants
    /// advice); returns the first error, after trying every block.
    pub fn restore(mut self) -> Result<()> {
        self.restore_inner()
    }

    fn restore_inner(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.restored, true) {
            return Ok(());
        }
        if !matches!(
            uffd_sys::thp_mode(),
            Some(ThpMode::Madvise | ThpMode::Always)
        ) {
            return Ok(());
        }
        let mut first = None;
        for (name, addr, len) in &self.ranges {
            if let Err(source) = uffd_sys::advise_guest_thp(&self.mem, *addr, *len, ThpAdvice::Huge)
            {
                first.get_or_insert(Error::from(PostcopyError::Memory {
                    op: "madvise(MADV_HUGEPAGE)",
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

impl Drop for ThpGuard {
    fn drop(&mut self) {
        if let Err(e) = self.restore_inner() {
            log::warn!("postcopy: advising huge pages on again: {e}");
        }
    }
}

/// Applies the source's `Discard` commands to guest memory and the blocks'
/// `received` bitmaps; advises transparent huge pages off before the first
/// one (and on again when dropped or [finished](Discarder::finish)).
#[derive(Debug)]
pub struct Discarder {
    mem: Arc<GuestMemoryMmap>,
    blocks: Arc<RamBlocks>,
    thp: Option<ThpGuard>,
    pages: u64,
}

impl Discarder {
    /// A discarder for `blocks` of `mem` (the loader's blocks: their
    /// `received` bitmaps are cleared).
    pub fn new(mem: Arc<GuestMemoryMmap>, blocks: Arc<RamBlocks>) -> Self {
        Discarder {
            mem,
            blocks,
            thp: None,
            pages: 0,
        }
    }

    /// Applies one `Discard` command: drops the pages of each range of block
    /// `block` and clears their `received` bits. Returns the pages dropped.
    /// Ranges are checked first (whole pages inside the block, else
    /// [`PostcopyError::BadDiscard`], a protocol error) and nothing is
    /// dropped if one is bad.
    pub fn discard(&mut self, block: BlockId, ranges: &[DiscardRange]) -> Result<u64> {
        let b = self
            .blocks
            .get(block)
            .ok_or(Error::UnknownBlock { block })?;
        for r in ranges {
            check_range(b, r)?;
        }
        if self.thp.is_none() {
            self.thp = Some(ThpGuard::disable(Arc::clone(&self.mem), &self.blocks)?);
        }
        let ps = u64::from(b.page_size());
        let mut pages = 0;
        for r in ranges {
            // Checked above: whole pages inside the block, so the length fits
            // the block's region and a usize.
            let len = usize::try_from(r.len).map_err(|_| bad_range(b, r))?;
            uffd_sys::discard_guest(&self.mem, GuestAddress(b.guest_addr().0 + r.offset), len)
                .map_err(|source| PostcopyError::Memory {
                    op: "discard",
                    name: b.name().to_owned(),
                    offset: r.offset,
                    len: r.len,
                    source,
                })?;
            // Only after the contents are gone: a set bit never covers a page
            // that will not fault.
            b.received().clear_range(r.offset / ps, r.len / ps);
            pages += r.len / ps;
        }
        self.pages += pages;
        Ok(pages)
    }

    /// Pages dropped so far.
    pub fn discarded_pages(&self) -> u64 {
        self.pages
    }

    /// Takes the huge page guard out (to keep huge pages off until postcopy
    /// ends, after this discarder is gone); `None` before the first discard.
    pub fn take_thp_guard(&mut self) -> Option<ThpGuard> {
        self.thp.take()
    }

    /// Advises transparent huge pages on again, if they were advised off.
    pub fn finish(mut self) -> Result<()> {
        self.thp.take().map_or(Ok(()), ThpGuard::restore)
    }
}

fn bad_range(b: &RamBlock, r: &DiscardRange) -> Error {
    PostcopyError::BadDiscard {
        name: b.name().to_owned(),
        offset: r.offset,
        len: r.len,
        size: b.size(),
        page_size: b.page_size(),
    }
    .into()
}

fn check_range(b: &RamBlock, r: &DiscardRange) -> Result<()> {
    let ps = u64::from(b.page_size());
    let fits = r.len > 0
        && r.offset % ps == 0
        && r.len % ps == 0
        && r.offset
            .checked_add(r.len)
            .is_some_and(|end| end <= b.size());
    if fits {
        Ok(())
    } else {
        Err(bad_range(b, r))
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::ErrorKind;

    const PAGE: u64 = 4096;

    fn setup() -> (Arc<GuestMemoryMmap>, Arc<RamBlocks>) {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 16 * PAGE as usize),
                (GuestAddress(1 << 20), 16 * PAGE as usize),
            ])
            .unwrap(),
        );
        let blocks = Arc::new(RamBlocks::from_guest_memory(&mem, &["low", "high"]).unwrap());
        (mem, blocks)
    }

    #[test]
    fn discard_drops_pages_and_clears_received_bits() {
        let (mem, blocks) = setup();
        let high = blocks.get(BlockId(1)).unwrap();
        mem.write_slice(&[5; 16 * PAGE as usize], high.guest_addr())
            .unwrap();
        high.received().set_all();
        let mut d = Discarder::new(mem.clone(), blocks.clone());
        let ranges = [
            DiscardRange {
                offset: PAGE,
                len: 2 * PAGE,
            },
            DiscardRange {
                offset: 10 * PAGE,
                len: PAGE,
            },
        ];
        assert_eq!(d.discard(BlockId(1), &ranges).unwrap(), 3);
        assert_eq!(d.discarded_pages(), 3);
        let mut got = vec![0u8; 16 * PAGE as usize];
        mem.read_slice(&mut got, high.guest_addr()).unwrap();
        for p in 0..16u64 {
            let dropped = matches!(p, 1 | 2 | 10);
            let page = &got[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
            assert_eq!(page.iter().all(|&b| b == 0), dropped, "page {p}");
            assert_eq!(high.received().test(p), !dropped, "page {p}");
        }
        d.finish().unwrap();
    }

    #[test]
    fn bad_ranges_are_refused_before_anything_is_dropped() {
        let (mem, blocks) = setup();
        let low = blocks.get(BlockId(0)).unwrap();
        mem.write_slice(&[5; PAGE as usize], low.guest_addr())
            .unwrap();
        low.received().set_all();
        let mut d = Discarder::new(mem.clone(), blocks.clone());
        for bad in [
            (PAGE + 1, PAGE),
            (0, PAGE / 2),
            (0, 0),
            (15 * PAGE, 2 * PAGE),
            (u64::MAX - PAGE + 1, PAGE),
        ] {
            let ranges = [
                DiscardRange {
                    offset: 0,
                    len: PAGE,
                },
                DiscardRange {
                    offset: bad.0,
                    len: bad.1,
                },
            ];
            let e = d.discard(BlockId(0), &ranges).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            assert!(matches!(
                e,
                Error::Postcopy(PostcopyError::BadDiscard { .. })
            ));
        }
        assert_eq!(mem.read_obj::<u8>(low.guest_addr()).unwrap(), 5);
        assert_eq!(low.received().count(), 16);
        let e = d.discard(BlockId(7), &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
    }
}
