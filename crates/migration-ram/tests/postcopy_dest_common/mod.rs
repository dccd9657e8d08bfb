//! Helpers of the postcopy destination tests: guest memory of each kind,
//! SKIPPED lines, thread and VMA facts from /proc.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use migration_ram::vm_memory::bitmap::AtomicBitmap;
use migration_ram::vm_memory::mmap::MmapRegion;
use migration_ram::vm_memory::{FileOffset, GuestAddress};
use migration_ram::{GuestMemoryMmap, GuestRegionMmap, RamBlock, RamBlocks};
use uffd_sys::MemoryKind;

/// A hang guard, not a performance limit.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;

/// The tests of one binary run one at a time: they count this process's
/// threads and share the host's few huge pages.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints a loud SKIPPED line, or fails when `var=1` says the capability is
/// required.
pub fn skip(test: &str, var: &str, why: &str) {
    if std::env::var(var).as_deref() == Ok("1") {
        panic!("{test}: required ({var}=1) but {why}");
    }
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

/// Whether userfaultfd can be opened here; prints SKIPPED if not.
pub fn have_uffd(test: &str) -> bool {
    match uffd_sys::Uffd::new() {
        Ok(_) => true,
        Err(e) => {
            skip(
                test,
                "REQUIRE_UFFD",
                &format!("userfaultfd unusable here: {e}"),
            );
            false
        }
    }
}

/// Guest memory with its blocks.
pub struct Guest {
    pub kind: &'static str,
    pub mem: Arc<GuestMemoryMmap>,
    pub blocks: Arc<RamBlocks>,
}

/// 4 KiB anonymous memory: 8 MiB below 1 GiB and 24 MiB above.
pub fn anonymous() -> Guest {
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (8 * MIB) as usize),
            (GuestAddress(1 << 30), (24 * MIB) as usize),
        ])
        .unwrap(),
    );
    let blocks = Arc::new(RamBlocks::from_guest_memory(&mem, &["pc.ram", "pc.ram.high"]).unwrap());
    Guest {
        kind: "anonymous",
        mem,
        blocks,
    }
}

/// 4 KiB shmem memory: one 32 MiB memfd, mapped shared as two regions (file
/// offsets 0 and 8 MiB).
pub fn memfd() -> Guest {
    let fd = File::from(uffd_sys::mapping::memfd(MemoryKind::Shmem, (32 * MIB) as usize).unwrap());
    let low = FileOffset::new(fd.try_clone().unwrap(), 0);
    let high = FileOffset::new(fd, 8 * MIB);
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges_with_files([
            (GuestAddress(0), (8 * MIB) as usize, Some(low)),
            (GuestAddress(1 << 30), (24 * MIB) as usize, Some(high)),
        ])
        .unwrap(),
    );
    let blocks = Arc::new(RamBlocks::from_guest_memory(&mem, &["pc.ram", "pc.ram.high"]).unwrap());
    Guest {
        kind: "memfd",
        mem,
        blocks,
    }
}

/// `pages` huge pages of hugetlbfs memory (an `MFD_HUGETLB` memfd mapped
/// shared, which reserves its pages when mapped), one block with huge pages;
/// `None` after printing SKIPPED when the host has too few free.
pub fn hugetlbfs(test: &str, pages: usize) -> Option<Guest> {
    match try_hugetlbfs(pages) {
        Ok(g) => Some(g),
        Err(e) => {
            skip(
                test,
                "REQUIRE_HUGETLB",
                &format!(
                    "cannot map {pages} huge pages of hugetlbfs memory ({e}): reserve huge \
                     pages with vm.nr_hugepages"
                ),
            );
            None
        }
    }
}

/// As [`hugetlbfs`], without printing anything.
pub fn try_hugetlbfs(pages: usize) -> std::io::Result<Guest> {
    let huge = uffd_sys::mapping::default_huge_page_size().unwrap_or(2 << 20);
    let size = pages * huge;
    let fd = uffd_sys::mapping::memfd(MemoryKind::Hugetlbfs, size)?;
    let region = MmapRegion::<AtomicBitmap>::build(
        Some(FileOffset::new(File::from(fd), 0)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(std::io::Error::other)?;
    let mem = Arc::new(
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap(),
    );
    let blocks = Arc::new(
        RamBlocks::new(vec![RamBlock::new(
            "pc.ram",
            GuestAddress(0),
            size as u64,
            u32::try_from(huge).unwrap(),
        )
        .unwrap()])
        .unwrap(),
    );
    Ok(Guest {
        kind: "hugetlbfs",
        mem,
        blocks,
    })
}

/// The calling thread's id.
pub fn gettid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

/// The ids of this process's threads.
pub fn threads() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The names of the threads that exist now and did not in `before`, except
/// the test harness's own (named after `tests`, which start and end while a
/// test runs). Every thread the tests and the library start is named, so a
/// thread left behind shows here. A thread joined a moment ago may still be
/// listed (the kernel wakes its joiner before it releases the task): the
/// list is read again, every millisecond for up to a second, until it is
/// empty, and returned as last read.
pub fn threads_started_since(before: &HashSet<u32>, tests: &[&str]) -> Vec<String> {
    let read = || -> Vec<String> {
        threads()
            .difference(before)
            .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok())
            .map(|c| c.trim().to_owned())
            // The kernel keeps 15 bytes of a thread's name.
            .filter(|c| !tests.iter().any(|t| t.len() >= c.len() && t.starts_with(c.as_str())))
            .collect()
    };
    let mut left = read();
    for _ in 0..1000 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        left = read();
    }
    left
}

/// Spawns a thread named `name`.
pub fn named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .unwrap()
}

/// Threads of this process named `name`.
pub fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let t = t.as_ref().unwrap();
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
        })
        .count()
}

/// The `VmFlags` of the mapping that holds host address `addr`.
pub fn vma_flags(addr: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().map(str::to_owned).collect();
            }
        }
    }
    panic!("no mapping holds {addr:#x}");
}

/// Deterministic page contents: xorshift from `seed`.
pub fn pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// A small deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
