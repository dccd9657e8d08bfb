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

#[test]
fn mremap_is_reported_as_remap() {
    let test = "mremap_is_reported_as_remap";
    let Some(uffd) = uffd(test, Features::EVENT_REMAP) else {
        return;
    };
    let map = Mapping::new(MemoryKind::Anonymous, 2 * PAGE).unwrap();
    let (addr, len) = (map.addr(), map.len());
    uffd.register(addr, len as u64, RegisterMode::MISSING)
        .unwrap();
    // The range is moved onto a reserved target behind the two `Mapping`s' backs, so
    // neither may unmap anything later: both are forgotten, the moved range unmapped
    // by hand.
    let target = Mapping::new(MemoryKind::Anonymous, 2 * PAGE).unwrap();
    let to_addr = target.addr();
    std::mem::forget(map);
    std::mem::forget(target);
    let mover = Toucher::spawn(move || {
        // SAFETY: moves a mapping this test owns onto another range it owns (both
        // forgotten above); nothing else refers to either.
        unsafe {
            libc::mremap(
                addr as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to_addr as *mut libc::c_void,
            ) as u64
        }
    });
    match next_event(&uffd) {
        Event::Remap { from, to, len: l } => assert_eq!((from, to, l), (addr, to_addr, len as u64)),
        e => panic!("expected Remap, got {e:?}"),
    }
    assert_eq!(mover.join(), to_addr, "mremap moved the range");
    // SAFETY: unmaps the moved range, which this test owns.
    unsafe { libc::munmap(to_addr as *mut libc::c_void, len) };
}

#[test]
fn fork_is_reported_with_the_childs_descriptor() {
    let test = "fork_is_reported_with_the_childs_descriptor";
    let Some(uffd) = uffd(test, Features::EVENT_FORK) else {
        return;
    };
    let map = Mapping::new(MemoryKind::Anonymous, PAGE).unwrap();
    uffd.register(map.addr(), PAGE as u64, RegisterMode::MISSING)
        .unwrap();
    let forker = Toucher::spawn(|| {
        // SAFETY: the child calls only async-signal-safe _exit, so forking a
        // multi-threaded process is sound.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: _exit ends the child at once without running any Rust code.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child we just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        pid
    });
    match next_event(&uffd) {
        Event::Fork { uffd: child } => {
            use std::os::fd::AsRawFd;
            // SAFETY: F_GETFD on the descriptor we now own; it touches no memory.
            let flags = unsafe { libc::fcntl(child.as_raw_fd(), libc::F_GETFD) };
            assert!(flags >= 0, "a live descriptor");
        }
        e => panic!("expected Fork, got {e:?}"),
    }
    assert!(forker.join() > 0);
}
