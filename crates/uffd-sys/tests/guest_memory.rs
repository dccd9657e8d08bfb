//! Whole-page placement into vm-memory guest memory on the real kernel: a
//! vCPU-like reader blocked on a missing page is woken by `copy_to_guest` with the
//! right bytes, and a second placement of the same page is `EEXIST`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{next_faults, range_err, uffd, Toucher};
use uffd_sys::{guest_host_range, CopyMode, Features, Op, RegisterMode, Wake};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: usize = 4096;

#[test]
fn copy_and_zero_into_guest_memory_wake_a_blocked_reader() {
    let test = "copy_and_zero_into_guest_memory_wake_a_blocked_reader";
    let Some(uffd) = uffd(test, Features::empty()) else {
        return;
    };
    let base = GuestAddress(1 << 20);
    let mem: Arc<GuestMemoryMmap<()>> =
        Arc::new(GuestMemoryMmap::from_ranges(&[(base, 16 * PAGE)]).unwrap());
    let host = guest_host_range(&mem, base, 16 * PAGE, PAGE).unwrap();
    uffd.register(host, 16 * PAGE as u64, RegisterMode::MISSING)
        .unwrap();

    let page3 = GuestAddress(base.0 + 3 * PAGE as u64);
    let m = Arc::clone(&mem);
    let reader = Toucher::spawn(move || {
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(page3.0 + 100)).unwrap();
        b
    });
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.address & !(PAGE as u64 - 1), host + 3 * PAGE as u64);
    assert!(!reader.is_done());
    let data: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        uffd.copy_to_guest(&mem, page3, &data, PAGE, CopyMode::empty())
            .unwrap(),
        PAGE as u64
    );
    assert_eq!(reader.join(), data[100..108]);
    // The page is there: a second copy is EEXIST and changes nothing.
    let e = uffd
        .copy_to_guest(&mem, page3, &[0xff; PAGE], PAGE, CopyMode::empty())
        .unwrap_err();
    assert_eq!(range_err(&e), (Op::Copy, libc::EEXIST));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(page3.0 + 1)).unwrap(), 1);

    let page5 = GuestAddress(base.0 + 5 * PAGE as u64);
    let m = Arc::clone(&mem);
    let reader = Toucher::spawn(move || m.read_obj::<u64>(page5).unwrap());
    next_faults(&uffd, 1);
    uffd.zero_guest(&mem, page5, PAGE, PAGE, Wake::Yes).unwrap();
    assert_eq!(reader.join(), 0);

    // Outside the region: refused before any ioctl.
    let e = uffd
        .copy_to_guest(
            &mem,
            GuestAddress(base.0 + 15 * PAGE as u64),
            &[0; 2 * PAGE],
            PAGE,
            CopyMode::empty(),
        )
        .unwrap_err();
    assert!(matches!(e, uffd_sys::Error::GuestRange { .. }), "{e:?}");
}
