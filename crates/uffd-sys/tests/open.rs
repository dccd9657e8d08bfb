//! Opening through each path: close-on-exec, non-blocking, and kernel-mode faults
//! delivered (KVM writes guest memory from the kernel).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::{next_faults, skip, Toucher};
use uffd_sys::{Mapping, MemoryKind, OpenPath, OpenPreference, RegisterMode, Uffd, Wake};

fn check_path(pref: OpenPreference, expect: OpenPath) {
    let test = format!("open_{expect:?}");
    let uffd = match Uffd::builder().open_preference(pref).open() {
        Ok(u) => u,
        Err(e) => return skip(&test, &format!("{expect} unusable here: {e}")),
    };
    assert_eq!(uffd.open_path(), expect);
    // SAFETY: F_GETFD/F_GETFL read flags of a descriptor we own.
    let (fd_flags, fl_flags) = unsafe {
        (
            libc::fcntl(uffd.as_raw_fd(), libc::F_GETFD),
            libc::fcntl(uffd.as_raw_fd(), libc::F_GETFL),
        )
    };
    assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "close-on-exec");
    assert_ne!(fl_flags & libc::O_NONBLOCK, 0, "non-blocking");

    // A kernel-mode write into a registered missing page: read(2) from a pipe.
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, 4096).unwrap());
    uffd.register(map.addr(), 4096, RegisterMode::MISSING)
        .unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe(2) to fill.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: writes 5 bytes from a static buffer into the pipe we just made.
    let written = unsafe { libc::write(fds[1], b"guest".as_ptr().cast(), 5) };
    assert_eq!(written, 5);
    let (rfd, dst) = (fds[0], map.addr());
    let reader = Toucher::spawn(move || {
        // SAFETY: the destination is 5 bytes inside a live mapping the test only accesses
        // through copies and atomics; the kernel writes into it from kernel mode.
        unsafe { libc::read(rfd, dst as *mut libc::c_void, 5) }
    });
    let f = next_faults(&uffd, 1)[0];
    assert_eq!(f.address, map.addr());
    assert!(f.write, "the kernel's copy_to_user is a write");
    uffd.zeropage(f.address, 4096, Wake::Yes).unwrap();
    assert_eq!(
        reader.join(),
        5,
        "read(2) completes instead of failing with EFAULT"
    );
    let mut got = [0u8; 5];
    map.read(0, &mut got).unwrap();
    assert_eq!(&got, b"guest");
    // SAFETY: closing the two pipe descriptors we own.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

#[test]
fn dev_node_path_handles_kernel_mode_faults() {
    check_path(OpenPreference::DevNodeOnly, OpenPath::DevNode);
}

#[test]
fn syscall_path_handles_kernel_mode_faults() {
    check_path(OpenPreference::SyscallOnly, OpenPath::Syscall);
}

#[test]
fn auto_prefers_the_dev_node() {
    let Ok(u) = Uffd::new() else {
        return skip("auto_prefers_the_dev_node", "userfaultfd unusable here");
    };
    if std::path::Path::new(uffd_sys::DEV_USERFAULTFD).exists()
        && uffd_sys::open_raw(OpenPreference::DevNodeOnly).is_ok()
    {
        assert_eq!(u.open_path(), OpenPath::DevNode);
    } else {
        assert_eq!(u.open_path(), OpenPath::Syscall);
    }
}
