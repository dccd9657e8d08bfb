//! Closing a handle's descriptor behind its back gives typed EBADF errors.
//!
//! This is its own test binary on purpose: the test closes a descriptor number while the
//! handle still holds it, and in a binary with other tests running on other threads the
//! kernel may hand that number to one of them, which would then have its descriptor used
//! (and closed) by this test. Alone in its process, the freed number stays unused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsRawFd;

use common::{range_err, uffd};
use uffd_sys::{CopyMode, Error, EventBuf, Features, Mapping, MemoryKind, Op, RegisterMode, Wake};

const PAGE: u64 = 4096;

#[test]
fn a_closed_descriptor_gives_typed_errors() {
    let test = "a_closed_descriptor_gives_typed_errors";
    let Some(u) = uffd(test, Features::empty()) else {
        return;
    };
    let map = Mapping::new(MemoryKind::Anonymous, PAGE as usize).unwrap();
    // SAFETY: closes the handle's own descriptor behind its back, which is exactly the
    // misuse under test; the handle is forgotten below so it is not closed twice.
    assert_eq!(unsafe { libc::close(u.as_raw_fd()) }, 0);

    let e = u
        .register(map.addr(), PAGE, RegisterMode::MISSING)
        .unwrap_err();
    assert_eq!(range_err(&e), (Op::Register, libc::EBADF));
    let e = u.zeropage(map.addr(), PAGE, Wake::Yes).unwrap_err();
    assert_eq!(range_err(&e), (Op::ZeroPage, libc::EBADF));
    // SAFETY: the descriptor is closed; the call can only fail.
    let e = unsafe { u.copy(map.addr(), &[0u8; PAGE as usize], CopyMode::empty()) }.unwrap_err();
    assert_eq!(range_err(&e), (Op::Copy, libc::EBADF));
    let e = u.wake(map.addr(), PAGE).unwrap_err();
    assert_eq!(range_err(&e), (Op::Wake, libc::EBADF));
    let e = u.read_events(&mut EventBuf::new(4)).unwrap_err();
    assert!(
        matches!(e, Error::Read(_)) && e.errno() == Some(libc::EBADF),
        "{e:?}"
    );
    let e = u
        .wait_readable(Some(std::time::Duration::ZERO))
        .unwrap_err();
    assert!(
        matches!(e, Error::Poll(_)) && e.errno() == Some(libc::EBADF),
        "{e:?}"
    );
    std::mem::forget(u);
}
