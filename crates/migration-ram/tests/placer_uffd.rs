//! `UffdPlacer` on the real kernel: guest memory registered with a
//! userfaultfd for MISSING faults, a thread blocked reading a missing page,
//! woken by `place` (or `place_zero`) with the right bytes; placing twice is
//! harmless. With 4 KiB anonymous memory, and with 2 MiB hugetlbfs memory from
//! an `MFD_HUGETLB` memfd mapped through vm-memory's file-backed regions.
//!
//! Without userfaultfd the tests print SKIPPED (REQUIRE_UFFD=1 makes them
//! fail); without free huge pages the hugetlbfs one does (REQUIRE_HUGETLB=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use migration_ram::placer::conformance;
use migration_ram::vm_memory::bitmap::AtomicBitmap;
use migration_ram::vm_memory::mmap::MmapRegion;
use migration_ram::vm_memory::{Bytes, FileOffset, GuestAddress};
use migration_ram::{
    GuestMemoryMmap, GuestRegionMmap, PagePlacer, RamBlock, RamBlocks, UffdPlacer,
};
use uffd_sys::{Event, EventBuf, Features, MemoryKind, RegisterMode, Uffd};

/// A hang guard, not a performance limit.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn skip(test: &str, var: &str, why: &str) {
    if std::env::var(var).as_deref() == Ok("1") {
        panic!("{test}: required ({var}=1) but {why}");
    }
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

fn open_uffd(test: &str, features: Features) -> Option<Arc<Uffd>> {
    match Uffd::builder().require(features).open() {
        Ok(u) => Some(Arc::new(u)),
        Err(e) => {
            skip(
                test,
                "REQUIRE_UFFD",
                &format!("userfaultfd unusable here: {e}"),
            );
            None
        }
    }
}

/// Waits for one page fault and returns its address.
fn next_fault(uffd: &Uffd) -> u64 {
    let mut buf = EventBuf::new(4);
    loop {
        assert!(
            uffd.wait_readable(Some(HANG_GUARD)).unwrap(),
            "no fault within the hang guard"
        );
        if let Some(ev) = uffd.read_events(&mut buf).unwrap().first() {
            match ev {
                Event::PageFault(pf) => return pf.address,
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
}

/// A thread reading 8 bytes at `addr`, with a flag raised when it returns.
fn reader(
    mem: &Arc<GuestMemoryMmap>,
    addr: GuestAddress,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<[u8; 8]>) {
    let done = Arc::new(AtomicBool::new(false));
    let (m, d) = (Arc::clone(mem), Arc::clone(&done));
    let h = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        m.read_slice(&mut b, addr).unwrap();
        d.store(true, Ordering::SeqCst);
        b
    });
    (done, h)
}

/// The suite both memory kinds run: `block` (4 pages at least) of `mem`
/// registered for MISSING faults, nothing touched yet.
fn blocked_readers_are_woken_by_placement(
    mem: &Arc<GuestMemoryMmap>,
    uffd: &Arc<Uffd>,
    blocks: &RamBlocks,
) {
    let block: &RamBlock = blocks.iter().next().unwrap();
    let ps = block.page_size() as usize;
    let host = block.host_addr(mem).unwrap();
    let placer = UffdPlacer::new(Arc::clone(mem), Arc::clone(uffd), blocks);

    // Pages 0 and 1: the generic placer suite.
    conformance(&placer, mem, block).unwrap();

    // Page 2: a reader deep inside it blocks until the page is placed.
    let at = GuestAddress(block.page_addr(2).0 + ps as u64 / 2 + 8);
    let (done, h) = reader(mem, at);
    let fault = next_fault(uffd);
    assert_eq!(fault & !(ps as u64 - 1), host + 2 * ps as u64);
    assert!(!done.load(Ordering::SeqCst), "read a missing page");
    let data: Vec<u8> = (0..ps).map(|i| (i % 249) as u8).collect();
    placer.place(block, 2, &data).unwrap();
    let off = ps / 2 + 8;
    assert_eq!(h.join().unwrap(), data[off..off + 8]);
    // Placed again with other bytes: harmless, the page keeps its contents
    // and is counted once.
    placer.place(block, 2, &vec![0xee; ps]).unwrap();
    let mut whole = vec![0u8; ps];
    mem.read_slice(&mut whole, block.page_addr(2)).unwrap();
    assert!(whole == data);

    // Page 3: the same with a zero page.
    let (done, h) = reader(mem, block.page_addr(3));
    next_fault(uffd);
    assert!(!done.load(Ordering::SeqCst));
    placer.place_zero(block, 3).unwrap();
    assert_eq!(h.join().unwrap(), [0; 8]);
    placer.place_zero(block, 3).unwrap();

    assert_eq!(
        block.received().iter_set().collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
}

#[test]
fn uffd_placer_on_4k_anonymous_memory() {
    let test = "uffd_placer_on_4k_anonymous_memory";
    let Some(uffd) = open_uffd(test, Features::empty()) else {
        return;
    };
    let (mem, blocks) = anonymous_16_pages(&uffd);
    blocked_readers_are_woken_by_placement(&mem, &uffd, &blocks);
}

/// 16 pages of 4 KiB anonymous guest memory, one block over them, registered
/// with `uffd` for MISSING faults.
fn anonymous_16_pages(uffd: &Uffd) -> (Arc<GuestMemoryMmap>, RamBlocks) {
    let mem =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(1 << 20), 16 * 4096)]).unwrap());
    let blocks = RamBlocks::from_guest_memory(&mem, &["pc.ram"]).unwrap();
    let block = blocks.iter().next().unwrap();
    uffd.register(
        block.host_addr(&mem).unwrap(),
        block.size(),
        RegisterMode::MISSING,
    )
    .unwrap();
    (mem, blocks)
}

/// A run of pages placed at once, with a present page in its middle (one
/// that came on the preempt channel, say): the pages around it land, it
/// keeps its bytes, a reader blocked on a page after it wakes with the run's
/// bytes, and every page of the run is received.
#[test]
fn uffd_placer_places_a_run_around_a_present_page() {
    let test = "uffd_placer_places_a_run_around_a_present_page";
    let Some(uffd) = open_uffd(test, Features::empty()) else {
        return;
    };
    const PS: usize = 4096;
    let (mem, blocks) = anonymous_16_pages(&uffd);
    let block = blocks.iter().next().unwrap();
    let placer = UffdPlacer::new(Arc::clone(&mem), Arc::clone(&uffd), &blocks);
    placer.place(block, 6, &[6; PS]).unwrap();
    let (done, h) = reader(&mem, block.page_addr(9));
    next_fault(&uffd);
    assert!(!done.load(Ordering::SeqCst), "read a missing page");
    // Pages 4..12, each holding 0x40 + its number.
    let data: Vec<u8> = (4..12u8).flat_map(|p| [0x40 + p; PS]).collect();
    placer.place_run(block, 4, &data).unwrap();
    assert_eq!(h.join().unwrap(), [0x49; 8]);
    for p in 4..12u64 {
        let mut page = vec![0u8; PS];
        mem.read_slice(&mut page, block.page_addr(p)).unwrap();
        let want = if p == 6 { 6 } else { 0x40 + p as u8 };
        assert!(page.iter().all(|&b| b == want), "page {p}");
    }
    assert_eq!(
        block.received().iter_set().collect::<Vec<_>>(),
        (4..12).collect::<Vec<_>>()
    );
    // A run that is not whole pages, or goes past the block, is refused.
    assert!(placer.place_run(block, 12, &data[..PS + 1]).is_err());
    assert!(placer.place_run(block, 12, &data).is_err());
    assert_eq!(block.received().count(), 8);
}

#[test]
fn uffd_placer_on_2m_hugetlbfs_memory() {
    let test = "uffd_placer_on_2m_hugetlbfs_memory";
    let Some(uffd) = open_uffd(test, Features::MISSING_HUGETLBFS) else {
        return;
    };
    let huge = uffd_sys::mapping::default_huge_page_size().unwrap_or(2 << 20);
    let size = 4 * huge;
    // A shared mapping of a hugetlbfs memfd reserves its huge pages when it
    // is made (no MAP_NORESERVE), so a host without free ones fails here, not
    // with a SIGBUS later.
    let region = uffd_sys::mapping::memfd(MemoryKind::Hugetlbfs, size).and_then(|fd| {
        MmapRegion::<AtomicBitmap>::build(
            Some(FileOffset::new(File::from(fd), 0)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(std::io::Error::other)
    });
    let region = match region {
        Ok(r) => r,
        Err(e) => {
            let why = format!(
                "cannot map 4 huge pages of hugetlbfs memory ({e}): reserve huge pages with vm.nr_hugepages"
            );
            skip(test, "REQUIRE_HUGETLB", &why);
            return;
        }
    };
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    let mem = Arc::new(GuestMemoryMmap::from_regions(vec![region]).unwrap());
    let page_size = u32::try_from(huge).unwrap();
    let blocks = RamBlocks::new(vec![RamBlock::new(
        "pc.ram",
        GuestAddress(0),
        size as u64,
        page_size,
    )
    .unwrap()])
    .unwrap();
    let block = blocks.iter().next().unwrap();
    let ioctls = uffd
        .register(
            block.host_addr(&mem).unwrap(),
            block.size(),
            RegisterMode::MISSING,
        )
        .unwrap();
    assert!(
        !ioctls.contains(uffd_sys::Ioctls::ZEROPAGE),
        "hugetlbfs has no zeropage: the placer copies zeros"
    );
    blocked_readers_are_woken_by_placement(&mem, &uffd, &blocks);
}
