//! Guest memory operations of a postcopy destination on the real kernel: a page
//! discarded from a registered range faults as missing again (anonymous, memfd and
//! hugetlbfs memory), a handle sees kernel-mode faults, and a fault thread's wait
//! wakes for either the userfaultfd or a second descriptor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::{next_faults, uffd, Toucher, HANG_GUARD};
use uffd_sys::{
    discard_guest, guest_backing, guest_host_range, CopyMode, DiscardMethod, Features, MemoryKind,
    RegisterMode,
};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

const PAGE: usize = 4096;

#[test]
fn kernel_mode_faults_reach_a_default_handle() {
    let test = "kernel_mode_faults_reach_a_default_handle";
    let Some(uffd) = uffd(test, Features::empty()) else {
        return;
    };
    assert!(uffd.check_kernel_mode_faults().unwrap());
    // The check leaves nothing registered: a second run works the same.
    assert!(uffd.check_kernel_mode_faults().unwrap());
}

#[test]
fn wait_readable_or_wakes_for_either_descriptor() {
    let test = "wait_readable_or_wakes_for_either_descriptor";
    let Some(uffd) = uffd(test, Features::empty()) else {
        return;
    };
    let (mut tx, rx) = UnixStream::pair().unwrap();
    let r = uffd
        .wait_readable_or(&rx, Some(Duration::from_millis(1)))
        .unwrap();
    assert!(!r.uffd && !r.other, "nothing is readable yet");
    tx.write_all(&[1]).unwrap();
    let r = uffd.wait_readable_or(&rx, Some(HANG_GUARD)).unwrap();
    assert!(r.other && !r.uffd);
    (&rx).read_exact(&mut [0u8; 1]).unwrap();

    let mem: Arc<GuestMemoryMmap<()>> =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * PAGE)]).unwrap());
    let host = guest_host_range(&mem, GuestAddress(0), 4 * PAGE, PAGE).unwrap();
    uffd.register(host, 4 * PAGE as u64, RegisterMode::MISSING)
        .unwrap();
    let m = Arc::clone(&mem);
    let toucher = Toucher::spawn(move || m.read_obj::<u8>(GuestAddress(0)).unwrap());
    let r = uffd.wait_readable_or(&rx, Some(HANG_GUARD)).unwrap();
    assert!(r.uffd);
    next_faults(&uffd, 1);
    uffd.copy_to_guest(&mem, GuestAddress(0), &[9; PAGE], PAGE, CopyMode::empty())
        .unwrap();
    assert_eq!(toucher.join(), 9);
}

/// Places page 1 of `mem` (registered), discards it, and checks that the next read
/// faults again and gets the newly placed bytes, not the old ones.
fn discarded_page_faults_again(test: &str, mem: Arc<GuestMemoryMmap<()>>, features: Features) {
    let Some(uffd) = uffd(test, features) else {
        return;
    };
    let backing = guest_backing(&mem, GuestAddress(0)).unwrap();
    let ps = backing.page_size;
    let len = mem.iter().map(|r| r.len() as usize).sum::<usize>();
    let host = guest_host_range(&mem, GuestAddress(0), len, ps).unwrap();
    uffd.register(host, len as u64, RegisterMode::MISSING)
        .unwrap();
    let page1 = GuestAddress(ps as u64);
    uffd.copy_to_guest(&mem, page1, &vec![1; ps], ps, CopyMode::empty())
        .unwrap();
    assert_eq!(mem.read_obj::<u8>(page1).unwrap(), 1);

    discard_guest(&mem, page1, ps).unwrap();
    let m = Arc::clone(&mem);
    let toucher = Toucher::spawn(move || m.read_obj::<u8>(GuestAddress(page1.0 + 5)).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.address & !(ps as u64 - 1), host + ps as u64);
    assert!(
        !toucher.is_done(),
        "a discarded page was read without a fault"
    );
    uffd.copy_to_guest(&mem, page1, &vec![2; ps], ps, CopyMode::empty())
        .unwrap();
    assert_eq!(toucher.join(), 2, "the old page came back");
}

#[test]
fn discarded_anonymous_page_faults_again() {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * PAGE)]).unwrap());
    let b = guest_backing(&mem, GuestAddress(0)).unwrap();
    assert_eq!(
        (b.kind, b.discard),
        (MemoryKind::Anonymous, DiscardMethod::DontNeed)
    );
    discarded_page_faults_again(
        "discarded_anonymous_page_faults_again",
        mem,
        Features::empty(),
    );
}

#[test]
fn discarded_memfd_page_faults_again() {
    let fd = uffd_sys::mapping::memfd(MemoryKind::Shmem, 4 * PAGE).unwrap();
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            4 * PAGE,
            Some(FileOffset::new(File::from(fd), 0)),
        )])
        .unwrap(),
    );
    let b = guest_backing(&mem, GuestAddress(0)).unwrap();
    assert_eq!(
        (b.kind, b.discard),
        (MemoryKind::Shmem, DiscardMethod::PunchHole)
    );
    discarded_page_faults_again(
        "discarded_memfd_page_faults_again",
        mem,
        Features::MISSING_SHMEM,
    );
}

#[test]
fn discarded_hugetlbfs_page_faults_again() {
    let test = "discarded_hugetlbfs_page_faults_again";
    let huge = uffd_sys::mapping::default_huge_page_size().unwrap_or(2 << 20);
    // A shared mapping of a hugetlbfs memfd reserves its pages when made, so a host
    // without free ones fails here rather than with a SIGBUS later.
    let region = uffd_sys::mapping::memfd(MemoryKind::Hugetlbfs, 2 * huge).and_then(|fd| {
        MmapRegion::<()>::build(
            Some(FileOffset::new(File::from(fd), 0)),
            2 * huge,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(std::io::Error::other)
    });
    let region = match region {
        Ok(r) => r,
        Err(e) => {
            let why = format!(
                "cannot map 2 huge pages of hugetlbfs memory ({e}): reserve huge pages with vm.nr_hugepages"
            );
            if std::env::var("REQUIRE_HUGETLB").as_deref() == Ok("1") {
                panic!("{test}: huge pages required (REQUIRE_HUGETLB=1) but {why}");
            }
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
            return;
        }
    };
    let mem = Arc::new(
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap(),
    );
    let b = guest_backing(&mem, GuestAddress(0)).unwrap();
    assert_eq!(
        (b.kind, b.page_size, b.discard),
        (MemoryKind::Hugetlbfs, huge, DiscardMethod::PunchHole)
    );
    // Part of a huge page cannot be discarded (it would be zeroed, not dropped).
    let e = discard_guest(&mem, GuestAddress(0), PAGE).unwrap_err();
    assert!(matches!(e, uffd_sys::Error::GuestRange { .. }), "{e}");
    discarded_page_faults_again(test, mem, Features::MISSING_HUGETLBFS);
}

#[test]
fn pagemap_counts_write_protected_pages_and_populate_write_waits_for_them() {
    let test = "pagemap_counts_write_protected_pages_and_populate_write_waits_for_them";
    let Some(uffd) = uffd(test, Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let uffd = Arc::new(uffd);
    let base = GuestAddress(0x10_0000);
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(base, 16 * PAGE)]).unwrap();
    mem.write_slice(&[5; 16 * PAGE], base).unwrap();
    let host = guest_host_range(&mem, base, 16 * PAGE, PAGE).unwrap();
    assert_eq!(
        uffd_sys::write_protected_pages(&mem, base, 16 * PAGE).unwrap(),
        0
    );
    uffd.register(host, 16 * PAGE as u64, RegisterMode::WP)
        .unwrap();
    // Pages 4..12 protected.
    uffd.write_protect(host + 4 * PAGE as u64, 8 * PAGE as u64)
        .unwrap();
    assert_eq!(
        uffd_sys::write_protected_pages(&mem, base, 16 * PAGE).unwrap(),
        8
    );
    // A read populate neither blocks nor lifts the protection.
    uffd_sys::populate_guest(&mem, base, 16 * PAGE, uffd_sys::Populate::Read).unwrap();
    assert_eq!(
        uffd_sys::write_protected_pages(&mem, base, 16 * PAGE).unwrap(),
        8
    );
    // A write populate is a writer to every page: it blocks on the first
    // protected page until that page is unprotected.
    let writer = {
        let mem = mem.clone();
        std::thread::spawn(move || {
            uffd_sys::populate_guest(&mem, base, 16 * PAGE, uffd_sys::Populate::Write)
        })
    };
    let mut unprotected = 0;
    let mut buf = uffd_sys::EventBuf::new(16);
    while !writer.is_finished() {
        if !uffd.wait_readable(Some(Duration::from_millis(50))).unwrap() {
            continue;
        }
        for ev in uffd.read_events(&mut buf).unwrap() {
            let uffd_sys::Event::PageFault(pf) = ev else {
                panic!("unexpected event {ev:?}");
            };
            assert_eq!(pf.kind, uffd_sys::FaultKind::WriteProtect);
            let page = pf.address & !(PAGE as u64 - 1);
            uffd.write_unprotect(page, PAGE as u64, uffd_sys::Wake::Yes)
                .unwrap();
            unprotected += 1;
        }
    }
    writer.join().unwrap().unwrap();
    assert_eq!(unprotected, 8, "one write fault per protected page");
    assert_eq!(
        uffd_sys::write_protected_pages(&mem, base, 16 * PAGE).unwrap(),
        0
    );
    // No byte changed.
    let mut got = vec![0u8; 16 * PAGE];
    mem.read_slice(&mut got, base).unwrap();
    assert!(got.iter().all(|&b| b == 5));
    // Outside guest memory: refused before any call.
    assert!(uffd_sys::write_protected_pages(&mem, base, 17 * PAGE).is_err());
}
