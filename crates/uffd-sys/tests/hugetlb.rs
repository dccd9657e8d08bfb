//! MISSING and WP faults on hugetlbfs memory, on the real kernel: what a VMM with
//! huge-page-backed guest RAM relies on for postcopy and background snapshots.
//!
//! The host needs free huge pages (`vm.nr_hugepages`); `.ci/run` reserves a few.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{huge_mapping, next_faults, range_err, uffd, Toucher};
use uffd_sys::{CopyMode, FaultKind, Features, Ioctls, Op, RegisterMode, Wake};

const PAGE: u64 = 4096;

/// Without `EXACT_ADDRESS` the kernel reports a base-page-aligned address inside the huge
/// page of the access (kernels differ on which one: this host's reports the huge page's
/// start), so a handler must round down to the huge page itself.
fn in_huge_page_of(reported: u64, accessed: u64, huge: usize) {
    let mask = !(huge as u64 - 1);
    assert_eq!(reported % PAGE, 0, "{reported:#x} is not page-aligned");
    assert_eq!(
        reported & mask,
        accessed & mask,
        "fault at {reported:#x} outside the huge page of the access at {accessed:#x}"
    );
}

#[test]
fn missing_huge_page_is_placed_whole_by_one_copy() {
    let test = "missing_huge_page_is_placed_whole_by_one_copy";
    let Some(uffd) = uffd(test, Features::MISSING_HUGETLBFS) else {
        return;
    };
    let Some(map) = huge_mapping(test, 2) else {
        return;
    };
    let map = Arc::new(map);
    let huge = map.page_size();
    assert!(huge > PAGE as usize && map.len() >= 2 * huge);
    let ioctls = uffd
        .register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .unwrap();
    assert!(ioctls.contains(Ioctls::COPY));
    assert!(
        !ioctls.contains(Ioctls::ZEROPAGE),
        "hugetlbfs has no UFFDIO_ZEROPAGE: zero huge pages must be copied"
    );

    // A read deep inside the second huge page.
    let touched = huge + 12345;
    let m = Arc::clone(&map);
    let toucher = Toucher::spawn(move || m.load_u8(touched).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.kind, FaultKind::Missing);
    assert!(!f.write);
    in_huge_page_of(f.address, map.addr() + touched as u64, huge);

    // Only whole huge pages can be placed; a refused attempt leaves the toucher asleep.
    let e = map
        .copy_in(&uffd, huge, &[0u8; PAGE as usize], CopyMode::empty())
        .unwrap_err();
    assert_eq!(range_err(&e), (Op::Copy, libc::EINVAL));
    let e = map.zero_in(&uffd, huge, huge, Wake::Yes).unwrap_err();
    assert_eq!(range_err(&e).0, Op::ZeroPage);
    assert!(!toucher.is_done(), "woken although nothing was placed");

    let content = vec![0x5au8; huge];
    assert_eq!(
        map.copy_in(&uffd, huge, &content, CopyMode::empty())
            .unwrap(),
        huge as u64
    );
    assert_eq!(toucher.join(), 0x5a);
    assert_eq!(map.load_u8(huge).unwrap(), 0x5a);
    assert_eq!(map.load_u8(2 * huge - 1).unwrap(), 0x5a);
}

#[test]
fn write_to_protected_huge_page_blocks_until_unprotected() {
    let test = "write_to_protected_huge_page_blocks_until_unprotected";
    let Some(uffd) = uffd(
        test,
        Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM,
    ) else {
        return;
    };
    let Some(map) = huge_mapping(test, 1) else {
        return;
    };
    let map = Arc::new(map);
    let huge = map.page_size();
    map.store_u8(0, 0x11).unwrap();
    let ioctls = uffd
        .register(map.addr(), huge as u64, RegisterMode::WP)
        .unwrap();
    assert!(ioctls.contains(Ioctls::WRITEPROTECT));
    uffd.write_protect(map.addr(), huge as u64).unwrap();
    // Reads still go through.
    assert_eq!(map.load_u8(0).unwrap(), 0x11);

    let at = huge / 2 + 100;
    let m = Arc::clone(&map);
    let writer = Toucher::spawn(move || m.store_u8(at, 0x77).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.kind, FaultKind::WriteProtect);
    assert!(f.write);
    in_huge_page_of(f.address, map.addr() + at as u64, huge);
    assert!(!writer.is_done(), "the write went through a protected page");

    // Protection is per huge page: clearing part of it is refused.
    let e = uffd
        .write_unprotect(map.addr(), PAGE, Wake::Yes)
        .unwrap_err();
    assert_eq!(range_err(&e), (Op::WriteProtect, libc::EINVAL));
    uffd.write_unprotect(map.addr(), huge as u64, Wake::Yes)
        .unwrap();
    writer.join();
    assert_eq!(map.load_u8(at).unwrap(), 0x77);
    assert_eq!(map.load_u8(0).unwrap(), 0x11);
}
