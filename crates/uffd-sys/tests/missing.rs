//! MISSING-mode faults resolved by copy and zeropage, on the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{next_faults, uffd, Toucher};
use uffd_sys::{CopyMode, FaultKind, Features, Mapping, MemoryKind, RegisterMode, Wake};

const PAGE: usize = 4096;

fn registered(test: &str, pages: usize) -> Option<(uffd_sys::Uffd, Arc<Mapping>)> {
    let uffd = uffd(test, Features::empty())?;
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, pages * PAGE).unwrap());
    let ioctls = uffd
        .register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .unwrap();
    assert!(ioctls
        .contains(uffd_sys::Ioctls::COPY | uffd_sys::Ioctls::ZEROPAGE | uffd_sys::Ioctls::WAKE));
    Some((uffd, map))
}

#[test]
fn touching_a_missing_page_blocks_until_copy_resolves_it() {
    let Some((uffd, map)) = registered("touching_a_missing_page_blocks_until_copy_resolves_it", 4)
    else {
        return;
    };
    let m = Arc::clone(&map);
    let toucher = Toucher::spawn(move || m.load_u8(2 * PAGE + 17).unwrap());

    let faults = next_faults(&uffd, 1);
    assert_eq!(
        faults[0].address,
        map.addr() + 2 * PAGE as u64,
        "page-aligned fault address"
    );
    assert_eq!(faults[0].kind, FaultKind::Missing);
    assert!(!faults[0].write, "a load is a read fault");
    assert!(
        !toucher.is_done(),
        "the toucher must be blocked while the page is missing"
    );

    let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    // SAFETY: `map` is only accessed through copies and atomics.
    let placed = unsafe { uffd.copy(faults[0].address, &page, CopyMode::empty()) }.unwrap();
    assert_eq!(placed, PAGE as u64);
    assert_eq!(toucher.join(), page[17], "the toucher sees the copied byte");

    let mut back = vec![0u8; PAGE];
    map.read(2 * PAGE, &mut back).unwrap();
    assert_eq!(back, page, "the whole page holds what was copied");
}

#[test]
fn zeropage_resolves_read_and_write_faults() {
    let Some((uffd, map)) = registered("zeropage_resolves_read_and_write_faults", 2) else {
        return;
    };
    let m = Arc::clone(&map);
    let reader = Toucher::spawn(move || m.load_u64(8).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!((f.address, f.write), (map.addr(), false));
    assert_eq!(
        uffd.zeropage(f.address, PAGE as u64, Wake::Yes).unwrap(),
        PAGE as u64
    );
    assert_eq!(reader.join(), 0);

    let m = Arc::clone(&map);
    let writer = Toucher::spawn(move || m.store_u64(PAGE + 8, 0x1122_3344).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.address, map.addr() + PAGE as u64);
    assert!(f.write, "a store is a write fault");
    assert!(!writer.is_done());
    uffd.zeropage(f.address, PAGE as u64, Wake::Yes).unwrap();
    writer.join();
    assert_eq!(
        map.load_u64(PAGE + 8).unwrap(),
        0x1122_3344,
        "the write lands after resolution"
    );
    assert_eq!(
        map.load_u64(PAGE).unwrap(),
        0,
        "the rest of the page is zero"
    );
}

#[test]
fn copy_onto_a_present_page_gives_eexist_and_still_wakes_the_toucher() {
    let Some((uffd, map)) = registered(
        "copy_onto_a_present_page_gives_eexist_and_still_wakes_the_toucher",
        1,
    ) else {
        return;
    };
    let m = Arc::clone(&map);
    let toucher = Toucher::spawn(move || m.load_u8(5).unwrap());
    let f = next_faults(&uffd, 1)[0];

    // Another path places the page without waking anybody ...
    let first = [0x5au8; PAGE];
    // SAFETY: `map` is only accessed through copies and atomics.
    unsafe { uffd.copy(f.address, &first, CopyMode::DONTWAKE) }.unwrap();
    assert!(!toucher.is_done(), "DONTWAKE leaves the toucher asleep");

    // ... then a late copy of the same page finds it present.
    let late = [0x77u8; PAGE];
    // SAFETY: as above.
    let err = unsafe { uffd.copy(f.address, &late, CopyMode::empty()) }.unwrap_err();
    assert!(err.is_exists(), "EEXIST, errno unchanged: {err}");
    assert_eq!(err.errno(), Some(libc::EEXIST));
    assert_eq!(err.done(), 0);
    assert!(matches!(
        err,
        uffd_sys::Error::Range {
            op: uffd_sys::Op::Copy,
            ..
        }
    ));
    assert_eq!(
        toucher.join(),
        0x5a,
        "woken, and it sees the first copy, not the late one"
    );
}

#[test]
fn dontwake_copies_then_one_wake_release_every_waiter() {
    const N: usize = 4;
    let Some((uffd, map)) = registered("dontwake_copies_then_one_wake_release_every_waiter", N)
    else {
        return;
    };
    let touchers: Vec<_> = (0..N)
        .map(|i| {
            let m = Arc::clone(&map);
            Toucher::spawn(move || m.load_u8(i * PAGE).unwrap())
        })
        .collect();
    let mut faults = next_faults(&uffd, N);
    faults.sort_by_key(|f| f.address);
    for (i, f) in faults.iter().enumerate() {
        assert_eq!(f.address, map.addr() + (i * PAGE) as u64);
        let page = [i as u8 + 1; PAGE];
        // SAFETY: `map` is only accessed through copies and atomics.
        unsafe { uffd.copy(f.address, &page, CopyMode::DONTWAKE) }.unwrap();
    }
    assert!(
        touchers.iter().all(|t| !t.is_done()),
        "nobody woken before the wake"
    );
    uffd.wake(map.addr(), map.len() as u64).unwrap();
    for (i, t) in touchers.into_iter().enumerate() {
        assert_eq!(t.join(), i as u8 + 1);
    }
}

#[test]
fn a_copy_that_meets_a_present_page_reports_the_bytes_it_placed() {
    let Some((uffd, map)) = registered(
        "a_copy_that_meets_a_present_page_reports_the_bytes_it_placed",
        2,
    ) else {
        return;
    };
    // Page 1 present, page 0 missing: a two-page copy places page 0 and stops.
    uffd.zeropage(map.addr() + PAGE as u64, PAGE as u64, Wake::Yes)
        .unwrap();
    let two = [9u8; 2 * PAGE];
    // SAFETY: `map` is only accessed through copies and atomics.
    let err = unsafe { uffd.copy(map.addr(), &two, CopyMode::empty()) }.unwrap_err();
    assert!(err.is_again(), "a partial copy is EAGAIN: {err}");
    assert_eq!(
        err.done(),
        PAGE as u64,
        "the kernel's own count of bytes placed"
    );
    assert_eq!(map.load_u8(0).unwrap(), 9);
    // The rest, retried, meets the present page.
    // SAFETY: as above.
    let err = unsafe { uffd.copy(map.addr() + PAGE as u64, &two[PAGE..], CopyMode::empty()) }
        .unwrap_err();
    assert!(err.is_exists());
    assert_eq!(
        map.load_u8(PAGE).unwrap(),
        0,
        "the present page is untouched"
    );
}

#[test]
fn faults_name_the_faulting_thread_when_thread_id_is_negotiated() {
    let test = "faults_name_the_faulting_thread_when_thread_id_is_negotiated";
    let Some(uffd) = uffd(test, Features::THREAD_ID) else {
        return;
    };
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, PAGE).unwrap());
    uffd.register(map.addr(), PAGE as u64, RegisterMode::MISSING)
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let m = Arc::clone(&map);
    let toucher = Toucher::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        m.load_u8(0).unwrap()
    });
    let tid = rx.recv().unwrap();
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.thread_id, Some(u32::try_from(tid).unwrap()));
    uffd.zeropage(f.address, PAGE as u64, Wake::Yes).unwrap();
    toucher.join();
}
