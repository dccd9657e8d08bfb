//! MINOR faults on shmem resolved with UFFDIO_CONTINUE, on the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{next_faults, uffd, Toucher};
use uffd_sys::{FaultKind, Features, Ioctls, Mapping, MemoryKind, RegisterMode, Wake};

const PAGE: usize = 4096;

#[test]
fn minor_fault_on_memfd_resolved_by_continue() {
    let test = "minor_fault_on_memfd_resolved_by_continue";
    let Some(uffd) = uffd(test, Features::MINOR_SHMEM) else {
        return;
    };
    // The guest view is registered; the second view fills the page cache behind it.
    let guest = Arc::new(Mapping::new(MemoryKind::Shmem, 2 * PAGE).unwrap());
    let fill = guest.alias().unwrap();
    fill.write(0, &[0x11u8; PAGE]).unwrap();
    let ioctls = uffd
        .register(guest.addr(), guest.len() as u64, RegisterMode::MINOR)
        .unwrap();
    assert!(ioctls.contains(Ioctls::CONTINUE));

    let g = Arc::clone(&guest);
    let toucher = Toucher::spawn(move || g.load_u8(100).unwrap());
    let f = next_faults(&uffd, 1)[0];
    assert_eq!((f.kind, f.address), (FaultKind::Minor, guest.addr()));
    assert!(
        !toucher.is_done(),
        "blocked although the page is in the page cache"
    );

    // The handler updates the page through the other view, then maps it.
    fill.write(100, &[0x22]).unwrap();
    assert_eq!(
        uffd.continue_range(f.address, PAGE as u64, Wake::Yes)
            .unwrap(),
        PAGE as u64
    );
    assert_eq!(
        toucher.join(),
        0x22,
        "the toucher sees the page-cache contents"
    );
    assert_eq!(guest.load_u8(0).unwrap(), 0x11);
}
