//! Non-cooperative events (REMOVE, UNMAP) on the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{next_event, next_faults, uffd, Toucher};
use uffd_sys::{Event, Features, Mapping, MemoryKind, RegisterMode, Wake};

const PAGE: usize = 4096;

#[test]
fn madv_dontneed_is_reported_as_remove_and_the_page_faults_again() {
    let test = "madv_dontneed_is_reported_as_remove_and_the_page_faults_again";
    let Some(uffd) = uffd(test, Features::EVENT_REMOVE) else {
        return;
    };
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, 4 * PAGE).unwrap());
    uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .unwrap();
    uffd.zeropage(map.addr(), map.len() as u64, Wake::Yes)
        .unwrap();

    // The discarding thread waits until the event is read (non-cooperative events are
    // synchronous), so it runs beside the reader.
    let m = Arc::clone(&map);
    let discarder = Toucher::spawn(move || m.discard(PAGE, 2 * PAGE).unwrap());
    match next_event(&uffd) {
        Event::Remove { start, end } => {
            assert_eq!(start, map.addr() + PAGE as u64);
            assert_eq!(end, map.addr() + 3 * PAGE as u64);
        }
        e => panic!("expected Remove, got {e:?}"),
    }
    discarder.join();

    // The removed page is missing again: touching it faults.
    let m = Arc::clone(&map);
    let toucher = Toucher::spawn(move || m.load_u8(PAGE).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.address, map.addr() + PAGE as u64);
    uffd.zeropage(f.address, PAGE as u64, Wake::Yes).unwrap();
    assert_eq!(toucher.join(), 0);
}

#[test]
fn munmap_is_reported_as_unmap() {
    let test = "munmap_is_reported_as_unmap";
    let Some(uffd) = uffd(test, Features::EVENT_UNMAP) else {
        return;
    };
    let map = Mapping::new(MemoryKind::Anonymous, 2 * PAGE).unwrap();
    let (addr, len) = (map.addr(), map.len() as u64);
    uffd.register(addr, len, RegisterMode::MISSING).unwrap();
    let unmapper = Toucher::spawn(move || drop(map));
    match next_event(&uffd) {
        Event::Unmap { start, end } => assert_eq!((start, end), (addr, addr + len)),
        e => panic!("expected Unmap, got {e:?}"),
    }
    unmapper.join();
}
