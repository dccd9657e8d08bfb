//! Write-protect faults on the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{next_faults, skip, uffd, Toucher};
use uffd_sys::{
    CopyMode, EventBuf, FaultKind, Features, Ioctls, Mapping, MemoryKind, RegisterMode, Uffd, Wake,
};

const PAGE: usize = 4096;

#[test]
fn a_write_to_a_protected_page_blocks_until_unprotected() {
    let test = "a_write_to_a_protected_page_blocks_until_unprotected";
    let Some(uffd) = uffd(test, Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, 2 * PAGE).unwrap());
    map.store_u64(PAGE, 1).unwrap(); // populate page 1
    let ioctls = uffd
        .register(map.addr(), map.len() as u64, RegisterMode::WP)
        .unwrap();
    assert!(ioctls.contains(Ioctls::WRITEPROTECT));
    uffd.write_protect(map.addr() + PAGE as u64, PAGE as u64)
        .unwrap();

    assert_eq!(
        map.load_u64(PAGE).unwrap(),
        1,
        "reads of a protected page do not fault"
    );
    let m = Arc::clone(&map);
    let writer = Toucher::spawn(move || m.store_u64(PAGE + 64, 0xdead_beef).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.kind, FaultKind::WriteProtect);
    assert!(f.write);
    assert_eq!(f.address, map.addr() + PAGE as u64);
    assert!(
        !writer.is_done(),
        "the writer must be blocked while the page is protected"
    );
    assert_eq!(
        map.load_u64(PAGE + 64).unwrap(),
        0,
        "the write has not happened yet"
    );

    uffd.write_unprotect(f.address, PAGE as u64, Wake::Yes)
        .unwrap();
    writer.join();
    assert_eq!(
        map.load_u64(PAGE + 64).unwrap(),
        0xdead_beef,
        "the writer's data is in place"
    );
    assert_eq!(
        map.load_u64(PAGE).unwrap(),
        1,
        "the rest of the page is kept"
    );
}

#[test]
fn unpopulated_pages_are_protected_only_with_wp_unpopulated() {
    let test = "unpopulated_pages_are_protected_only_with_wp_unpopulated";
    // Without WP_UNPOPULATED, protecting a never-touched anonymous page does nothing:
    // the first write allocates the page and no fault is reported.
    let Some(plain) = uffd(test, Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, PAGE).unwrap());
    plain
        .register(map.addr(), PAGE as u64, RegisterMode::WP)
        .unwrap();
    plain.write_protect(map.addr(), PAGE as u64).unwrap();
    let m = Arc::clone(&map);
    std::thread::spawn(move || m.store_u8(0, 7).unwrap())
        .join()
        .unwrap();
    assert_eq!(map.load_u8(0).unwrap(), 7);
    let mut buf = EventBuf::new(4);
    assert!(
        plain.read_events(&mut buf).unwrap().is_empty(),
        "no fault without WP_UNPOPULATED"
    );

    // With it, the same write blocks as a WP fault.
    let Some(uffd) = uffd(test, Features::PAGEFAULT_FLAG_WP | Features::WP_UNPOPULATED) else {
        return;
    };
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, PAGE).unwrap());
    uffd.register(map.addr(), PAGE as u64, RegisterMode::WP)
        .unwrap();
    uffd.write_protect(map.addr(), PAGE as u64).unwrap();
    let m = Arc::clone(&map);
    let writer = Toucher::spawn(move || m.store_u8(0, 9).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!((f.kind, f.address), (FaultKind::WriteProtect, map.addr()));
    assert!(!writer.is_done());
    uffd.write_unprotect(map.addr(), PAGE as u64, Wake::Yes)
        .unwrap();
    writer.join();
    assert_eq!(map.load_u8(0).unwrap(), 9);
}

#[test]
fn copy_with_wp_mode_places_a_protected_page() {
    let test = "copy_with_wp_mode_places_a_protected_page";
    let Some(uffd) = uffd(test, Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, PAGE).unwrap());
    uffd.register(
        map.addr(),
        PAGE as u64,
        RegisterMode::MISSING | RegisterMode::WP,
    )
    .unwrap();
    // SAFETY: `map` is only accessed through copies and atomics.
    unsafe { uffd.copy(map.addr(), &[3u8; PAGE], CopyMode::WP) }.unwrap();
    assert_eq!(map.load_u8(10).unwrap(), 3, "readable at once");
    let m = Arc::clone(&map);
    let writer = Toucher::spawn(move || m.store_u8(10, 4).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(
        f.kind,
        FaultKind::WriteProtect,
        "the copied page came in protected"
    );
    assert!(!writer.is_done());
    uffd.write_unprotect(map.addr(), PAGE as u64, Wake::Yes)
        .unwrap();
    writer.join();
    assert_eq!(map.load_u8(10).unwrap(), 4);
}

#[test]
fn wp_on_shmem_where_the_kernel_offers_it() {
    let test = "wp_on_shmem_where_the_kernel_offers_it";
    let Some(uffd) = uffd(test, Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    if !uffd
        .available_features()
        .contains(Features::WP_HUGETLBFS_SHMEM)
    {
        skip(test, "the kernel lacks WP_HUGETLBFS_SHMEM");
        return;
    }
    drop(uffd);
    let uffd = Uffd::builder()
        .require(Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM)
        .open()
        .unwrap();
    let map = Arc::new(Mapping::new(MemoryKind::Shmem, PAGE).unwrap());
    map.store_u8(0, 1).unwrap();
    uffd.register(map.addr(), PAGE as u64, RegisterMode::WP)
        .unwrap();
    uffd.write_protect(map.addr(), PAGE as u64).unwrap();
    let m = Arc::clone(&map);
    let writer = Toucher::spawn(move || m.store_u8(0, 2).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.kind, FaultKind::WriteProtect);
    assert!(!writer.is_done());
    assert_eq!(map.load_u8(0).unwrap(), 1);
    uffd.write_unprotect(map.addr(), PAGE as u64, Wake::Yes)
        .unwrap();
    writer.join();
    assert_eq!(map.load_u8(0).unwrap(), 2);
}
