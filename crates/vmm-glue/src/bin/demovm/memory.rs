//! Guest RAM of `demovm`: where it lies (a small PC's layout) and what host memory
//! backs it (`--mem-backend`).
//!
//! | backend | regions (guest-physical) | host memory | page size |
//! |---------|--------------------------|-------------|-----------|
//! | `anon` (default) | `pc.ram.low` [0, 640 KiB), `pc.ram` [1 MiB, top) | private anonymous | 4 KiB |
//! | `memfd` | `pc.ram.low` [0, 640 KiB), `pc.ram` [1 MiB, top) | one memfd (shared memory, tmpfs), mapped shared | 4 KiB |
//! | `hugetlbfs` | `pc.ram.low` [0, 640 KiB), `pc.ram.mid` [1 MiB, 2 MiB), `pc.ram` [2 MiB, top) | the first two private anonymous; `pc.ram` a hugetlbfs memfd, mapped shared | 4 KiB, 4 KiB, 2 MiB |
//!
//! Each region's [`RamRegion::page_size`] is the host page size that backs it: pages
//! move, are requested and are placed whole, so a 2 MiB region moves in 2 MiB pages.
//! A hugetlbfs region must start 2 MiB-aligned and hold whole huge pages, hence the
//! third layout: `--mem` must then be a multiple of 2 MiB, at least 4 MiB, and the
//! host needs `(top - 2 MiB) / 2 MiB` free huge pages of the default size, 2 MiB
//! (`vm.nr_hugepages`). They are reserved when the memory is mapped, so a host that
//! runs out fails at start with an error that says so, never later with a `SIGBUS`.
//!
//! # Source and destination use the same backend
//!
//! A migration moves RAM blocks by name, size and page size. A `hugetlbfs` VM has
//! other blocks (three, one of 2 MiB pages) than an `anon` or `memfd` one, and a
//! destination refuses a source whose blocks differ from its own. `anon` and `memfd`
//! have the same blocks, so a migration between them goes through today; do not rely
//! on it: postcopy resolves faults on the two kinds differently, and the backend is
//! part of the VM's configuration like `--mem` is.
//!
//! The built-in guests work on [1 MiB, top) whatever the backend.

use std::fs::File;
use std::io;
use std::sync::Arc;

use uffd_sys::mapping::{self, MemoryKind};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};
use vmm_glue::session::RamRegion;
use vmm_glue::GuestMemoryMmap;

/// Where RAM stops below 1 MiB (the VGA and BIOS hole starts).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Where RAM starts again above the hole; the built-in guests work from here to
/// the top.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Where the hugetlbfs region `pc.ram` starts: the first 2 MiB boundary above the
/// hole.
pub const HUGE_RAM_START: u64 = 0x20_0000;
/// The huge page size the `hugetlbfs` layout is built for.
pub const HUGE_PAGE: u64 = 2 << 20;
/// The smallest `--mem`: 1 MiB above the hole.
const MIN_MEM: u64 = 2 * HIGH_RAM_START;
/// The page size of the anonymous and memfd regions.
const SMALL_PAGE: u64 = 4096;

/// What backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MemBackend {
    /// Private anonymous memory, 4 KiB pages.
    Anon,
    /// A memfd (shared memory), 4 KiB pages.
    Memfd,
    /// A hugetlbfs memfd (2 MiB pages) above 2 MiB; anonymous memory below.
    Hugetlbfs,
}

impl MemBackend {
    /// The name `--mem-backend` takes and `x-guest-info` reports.
    pub fn name(self) -> &'static str {
        match self {
            MemBackend::Anon => "anon",
            MemBackend::Memfd => "memfd",
            MemBackend::Hugetlbfs => "hugetlbfs",
        }
    }
}

/// Why guest RAM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `--mem` breaks the rule of every backend.
    #[error("--mem must be a multiple of 4 KiB and at least 2 MiB, not {mem:#x}")]
    Size {
        /// `--mem`.
        mem: u64,
    },
    /// `--mem` breaks the hugetlbfs layout's rule.
    #[error(
        "--mem-backend hugetlbfs needs --mem in whole 2 MiB huge pages and at least 4 MiB \
         (pc.ram starts at 2 MiB), not {mem:#x}"
    )]
    HugeSize {
        /// `--mem`.
        mem: u64,
    },
    /// `--mem` does not fit this host's address space.
    #[error("--mem {mem:#x} is too large for this host")]
    TooLarge {
        /// `--mem`.
        mem: u64,
    },
    /// The host has no huge pages, or not of 2 MiB.
    #[error(
        "--mem-backend hugetlbfs needs 2 MiB huge pages; this host's default huge page size \
         is {found}"
    )]
    HugePageSize {
        /// What `/proc/meminfo` says (or that it says nothing).
        found: String,
    },
    /// Fewer free huge pages than the region needs.
    #[error(
        "--mem-backend hugetlbfs needs {needed} free 2 MiB huge pages for pc.ram, the host has \
         {free}: raise vm.nr_hugepages (sysctl vm.nr_hugepages=N, or echo N > \
         /proc/sys/vm/nr_hugepages)"
    )]
    FewHugePages {
        /// Huge pages `pc.ram` needs.
        needed: u64,
        /// Free (and unreserved) huge pages.
        free: u64,
    },
    /// The memfd could not be made.
    #[error("cannot create the {kind} memfd of {len:#x} bytes for guest RAM")]
    Memfd {
        /// What kind of memfd.
        kind: MemoryKind,
        /// Its size.
        len: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// Mapping a region failed.
    #[error("cannot map {name} ({len:#x} bytes of {backing}){hint}")]
    Map {
        /// The region.
        name: &'static str,
        /// Its size.
        len: u64,
        /// What backs it.
        backing: &'static str,
        /// What to do about it, if we know.
        hint: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the set of regions.
    #[error("cannot assemble guest memory from its regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// What backs one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// Private anonymous memory.
    Anonymous,
    /// The VM's shared-memory memfd, at this offset.
    Shmem(u64),
    /// The VM's hugetlbfs memfd, at this offset.
    Hugetlbfs(u64),
}

impl Backing {
    fn name(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::Shmem(_) => "memfd",
            Backing::Hugetlbfs(_) => "hugetlbfs",
        }
    }

    fn page_size(self) -> u64 {
        match self {
            Backing::Hugetlbfs(_) => HUGE_PAGE,
            _ => SMALL_PAGE,
        }
    }
}

/// One region of guest RAM, as laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Its RAM block name.
    pub name: &'static str,
    /// Guest-physical start.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The host page size backing it.
    pub page_size: u32,
    /// `anonymous`, `memfd` or `hugetlbfs`.
    pub backing: &'static str,
}

/// Guest RAM, built.
pub struct Ram {
    /// The memory, one vm-memory region per [`RegionInfo`].
    pub mem: Arc<GuestMemoryMmap>,
    /// Its regions, in address order.
    pub regions: Vec<RegionInfo>,
    /// The backend asked for.
    pub backend: MemBackend,
}

impl Ram {
    /// The regions as the migration session names them.
    pub fn ram_regions(&self) -> Vec<RamRegion> {
        self.regions
            .iter()
            .map(|r| RamRegion::with_page_size(r.name, r.page_size))
            .collect()
    }
}

/// The regions of `mem` bytes of guest RAM (the top of guest-physical memory) on
/// `backend`: `(name, start, size, backing)`.
fn layout(
    mem: u64,
    backend: MemBackend,
) -> Result<Vec<(&'static str, u64, u64, Backing)>, MemoryError> {
    if mem < MIN_MEM || mem % SMALL_PAGE != 0 {
        return Err(MemoryError::Size { mem });
    }
    let low = ("pc.ram.low", 0, LOW_RAM_END);
    Ok(match backend {
        MemBackend::Anon => vec![
            (low.0, low.1, low.2, Backing::Anonymous),
            (
                "pc.ram",
                HIGH_RAM_START,
                mem - HIGH_RAM_START,
                Backing::Anonymous,
            ),
        ],
        MemBackend::Memfd => vec![
            (low.0, low.1, low.2, Backing::Shmem(0)),
            (
                "pc.ram",
                HIGH_RAM_START,
                mem - HIGH_RAM_START,
                Backing::Shmem(LOW_RAM_END),
            ),
        ],
        MemBackend::Hugetlbfs => {
            if mem < HUGE_RAM_START + HUGE_PAGE || mem % HUGE_PAGE != 0 {
                return Err(MemoryError::HugeSize { mem });
            }
            vec![
                (low.0, low.1, low.2, Backing::Anonymous),
                (
                    "pc.ram.mid",
                    HIGH_RAM_START,
                    HUGE_RAM_START - HIGH_RAM_START,
                    Backing::Anonymous,
                ),
                (
                    "pc.ram",
                    HUGE_RAM_START,
                    mem - HUGE_RAM_START,
                    Backing::Hugetlbfs(0),
                ),
            ]
        }
    })
}

/// A `/proc/meminfo` field (the number before any unit).
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Checks that the host has `needed` free 2 MiB huge pages of the default size.
fn check_huge_pages(needed: u64) -> Result<(), MemoryError> {
    match mapping::default_huge_page_size() {
        Some(size) if size as u64 == HUGE_PAGE => {}
        Some(size) => {
            return Err(MemoryError::HugePageSize {
                found: format!("{} KiB", size >> 10),
            })
        }
        None => {
            return Err(MemoryError::HugePageSize {
                found: "unknown (no Hugepagesize in /proc/meminfo)".into(),
            })
        }
    }
    // Pages reserved by mappings that have not touched them yet are not free.
    let free = meminfo("HugePages_Free")
        .unwrap_or(0)
        .saturating_sub(meminfo("HugePages_Rsvd").unwrap_or(0));
    if free < needed {
        return Err(MemoryError::FewHugePages { needed, free });
    }
    Ok(())
}

/// Makes a memfd of `kind` and `len` bytes.
fn make_memfd(kind: MemoryKind, len: u64) -> Result<Arc<File>, MemoryError> {
    let err = |source| MemoryError::Memfd { kind, len, source };
    let size =
        usize::try_from(len).map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let fd = mapping::memfd(kind, size).map_err(err)?;
    Ok(Arc::new(File::from(fd)))
}

/// The memfds of a VM, made on first use: one per kind, as long as all the regions of
/// that kind together.
struct Memfds {
    lens: [u64; 2],
    files: [Option<Arc<File>>; 2],
}

impl Memfds {
    /// The memfd of `kind` (shmem or hugetlbfs), at `offset`.
    fn at(&mut self, kind: MemoryKind, offset: u64) -> Result<FileOffset, MemoryError> {
        let i = usize::from(kind == MemoryKind::Hugetlbfs);
        let file = match &self.files[i] {
            Some(f) => Arc::clone(f),
            None => {
                let len = self.lens[i];
                if kind == MemoryKind::Hugetlbfs {
                    check_huge_pages(len / HUGE_PAGE)?;
                }
                let f = make_memfd(kind, len)?;
                self.files[i] = Some(Arc::clone(&f));
                f
            }
        };
        Ok(FileOffset::from_arc(file, offset))
    }
}

/// Builds `mem` bytes of guest RAM on `backend`.
pub fn build(mem: u64, backend: MemBackend) -> Result<Ram, MemoryError> {
    let plan = layout(mem, backend)?;
    let total =
        |pick: fn(Backing) -> bool| -> u64 { plan.iter().filter(|r| pick(r.3)).map(|r| r.2).sum() };
    let mut memfds = Memfds {
        lens: [
            total(|b| matches!(b, Backing::Shmem(_))),
            total(|b| matches!(b, Backing::Hugetlbfs(_))),
        ],
        files: [None, None],
    };
    let mut regions = Vec::with_capacity(plan.len());
    let mut infos = Vec::with_capacity(plan.len());
    for &(name, start, size, backing) in &plan {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge { mem })?;
        let builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        let (builder, hint) = match backing {
            Backing::Anonymous => (
                builder
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
                "",
            ),
            Backing::Shmem(off) => (
                builder
                    .with_file_offset(memfds.at(MemoryKind::Shmem, off)?)
                    .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE),
                "",
            ),
            // No MAP_NORESERVE: mapping reserves the huge pages, so a host without
            // enough fails here rather than with a SIGBUS when the guest touches one.
            Backing::Hugetlbfs(off) => (
                builder
                    .with_file_offset(memfds.at(MemoryKind::Hugetlbfs, off)?)
                    .with_mmap_flags(libc::MAP_SHARED)
                    .with_hugetlbfs(true),
                ": too few free huge pages? raise vm.nr_hugepages",
            ),
        };
        let region = builder.build().map_err(|source| MemoryError::Map {
            name,
            len: size,
            backing: backing.name(),
            hint,
            source,
        })?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or(MemoryError::TooLarge { mem })?;
        regions.push(region);
        infos.push(RegionInfo {
            name,
            start,
            size,
            // 4 KiB or 2 MiB: both fit a u32.
            page_size: u32::try_from(backing.page_size()).unwrap_or(u32::MAX),
            backing: backing.name(),
        });
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    Ok(Ram {
        mem: Arc::new(mem),
        regions: infos,
        backend,
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn layouts_keep_the_hole_and_align_huge_pages() {
        for backend in [MemBackend::Anon, MemBackend::Memfd, MemBackend::Hugetlbfs] {
            let l = layout(8 << 20, backend).unwrap();
            assert_eq!(l[0].1..l[0].1 + l[0].2, 0..LOW_RAM_END, "{backend:?}");
            assert_eq!(l.last().unwrap().1 + l.last().unwrap().2, 8 << 20);
            // From 1 MiB to the top without a gap: the built-ins' workload memory.
            let mut at = HIGH_RAM_START;
            for r in &l[1..] {
                assert_eq!(r.1, at, "{backend:?}: {r:?}");
                at += r.2;
                if let Backing::Hugetlbfs(_) = r.3 {
                    assert_eq!((r.1 % HUGE_PAGE, r.2 % HUGE_PAGE), (0, 0), "{r:?}");
                }
            }
        }
        assert!(matches!(
            layout(8 << 20 | 4096, MemBackend::Hugetlbfs),
            Err(MemoryError::HugeSize { .. })
        ));
        assert!(matches!(
            layout(2 << 20, MemBackend::Hugetlbfs),
            Err(MemoryError::HugeSize { .. })
        ));
        assert!(layout(2 << 20, MemBackend::Memfd).is_ok());
        assert!(matches!(
            layout(1 << 20, MemBackend::Anon),
            Err(MemoryError::Size { .. })
        ));
        let e = layout(5 << 20, MemBackend::Hugetlbfs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole 2 MiB huge pages"), "{e}");
    }

    #[test]
    fn memfd_ram_is_shared_memory_that_records_writes() {
        let ram = build(4 << 20, MemBackend::Memfd).unwrap();
        assert_eq!(ram.regions.len(), 2);
        for (r, info) in ram.mem.iter().zip(&ram.regions) {
            assert!(r.file_offset().is_some(), "{info:?}");
            assert_eq!(info.page_size, 4096);
            assert_eq!(info.backing, "memfd");
        }
        ram.mem.write_obj(0x5au8, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(
            ram.mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
            0x5a
        );
        // vm-memory's dirty bitmap sees the write (precopy resends it).
        let high = ram.mem.iter().nth(1).unwrap();
        assert!(high.bitmap().dirty_at(0x20_0000));
        let names: Vec<_> = ram.ram_regions().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["pc.ram.low", "pc.ram"]);
    }
}
