//! The postcopy destination's host check on the real kernel: what
//! `check_support` refuses and how it says so, and that it leaves nothing
//! registered.
//!
//! Without userfaultfd the tests print SKIPPED (REQUIRE_UFFD=1 makes them
//! fail); without free huge pages the hugetlbfs parts do (REQUIRE_HUGETLB=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postcopy_dest_common;

use std::fs::File;

use migration_ram::postcopy::{check_blocks, check_support, PostcopyError};
use migration_ram::vm_memory::bitmap::AtomicBitmap;
use migration_ram::vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use migration_ram::vm_memory::{FileOffset, GuestAddress};
use migration_ram::{Error, ErrorKind, GuestMemoryMmap, GuestRegionMmap, RamBlock, RamBlocks};
use postcopy_dest_common::*;
use uffd_sys::{Features, Ioctls, MemoryKind, RegisterMode, Uffd};

fn one_block(mem: &GuestMemoryMmap, name: &str, page_size: u32) -> RamBlocks {
    use migration_ram::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let r = mem.iter().next().unwrap();
    RamBlocks::new(vec![RamBlock::new(
        name,
        r.start_addr(),
        r.len(),
        page_size,
    )
    .unwrap()])
    .unwrap()
}

/// A file of `len` bytes in the target's temporary directory (on disk, as a
/// rule), already unlinked.
fn disk_file(len: usize) -> File {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("postcopy-disk-ram-{}", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

/// Whether `file` is on tmpfs, where userfaultfd does serve it.
fn disk_is_on_tmpfs(file: &File) -> bool {
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        PAGE as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    uffd_sys::guest_backing(&mem, GuestAddress(0)).is_ok_and(|b| b.kind == MemoryKind::Shmem)
}

/// An error with its sources, as an operator would read it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The `BlockUnsupported` error inside `e`, as (block, memory, missing).
fn unsupported(e: &Error) -> (String, String, String) {
    match e {
        Error::Postcopy(PostcopyError::BlockUnsupported {
            name,
            memory,
            missing,
            ..
        }) => (name.clone(), memory.clone(), missing.clone()),
        e => panic!("expected BlockUnsupported, got {e:?}"),
    }
}

#[test]
fn check_support_accepts_every_kind_and_leaves_nothing_registered() {
    let test = "check_support_accepts_every_kind_and_leaves_nothing_registered";
    let _serial = serial();
    if !have_uffd(test) {
        return;
    }
    let mut guests = vec![anonymous(), memfd()];
    guests.extend(hugetlbfs(test, 2));
    for guest in guests {
        let uffd = check_support(&guest.mem, &guest.blocks).unwrap();
        let needed = match guest.kind {
            "memfd" => Features::MISSING_SHMEM,
            "hugetlbfs" => Features::MISSING_HUGETLBFS,
            _ => Features::empty(),
        };
        assert!(uffd.features().contains(needed), "{}", guest.kind);
        if uffd.available_features().contains(Features::THREAD_ID) {
            assert!(uffd.features().contains(Features::THREAD_ID));
        }
        let support = check_blocks(&uffd, &guest.mem, &guest.blocks).unwrap();
        for s in &support {
            assert!(s.ioctls.contains(Ioctls::COPY | Ioctls::WAKE));
            assert_eq!(
                s.ioctls.contains(Ioctls::ZEROPAGE),
                guest.kind != "hugetlbfs",
                "{}: only hugetlbfs lacks UFFDIO_ZEROPAGE",
                guest.kind
            );
        }
        // Nothing stays registered: a second handle can take every block
        // (a range registered with one userfaultfd refuses another, EBUSY).
        let other = Uffd::builder().require(needed).open().unwrap();
        for b in guest.blocks.iter() {
            let host = b.host_addr(&guest.mem).unwrap();
            other
                .register(host, b.size(), RegisterMode::MISSING)
                .unwrap();
            other.unregister(host, b.size()).unwrap();
        }
    }
}

#[test]
fn check_support_refuses_clearly_what_it_cannot_serve() {
    let test = "check_support_refuses_clearly_what_it_cannot_serve";
    let _serial = serial();
    if !have_uffd(test) {
        return;
    }

    // Memory the kernel will not register, simulated: a disk file mapped by
    // the VMM itself and handed to vm-memory as a raw mapping, whose flags
    // vm-memory takes as anonymous. The backing check believes them; the test
    // registration finds out.
    let len = (16 * PAGE) as usize;
    let disk = disk_file(len);
    // SAFETY: a fresh shared mapping of `disk` (len bytes long) at an address the
    // kernel picks; nothing else refers to it; it is unmapped at the end of
    // this test, after every user (the guest memory below) is gone.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&disk),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    {
        // SAFETY: `ptr` is the start of a live mapping of `len` bytes, page-aligned,
        // that outlives this region (unmapped below, after it is dropped).
        let region = unsafe {
            MmapRegionBuilder::<AtomicBitmap>::new(len).with_raw_mmap_pointer(ptr.cast())
        }
        .build()
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        match disk_is_on_tmpfs(&disk) {
            true => {
                eprintln!("{test}: CARGO_TARGET_TMPDIR is on tmpfs; the disk cases are not tried")
            }
            false => {
                let e = check_support(&mem, &one_block(&mem, "disguised", 4096)).unwrap_err();
                eprintln!("{test}: {}", chain(&e));
                let (name, memory, missing) = unsupported(&e);
                assert_eq!(name, "disguised");
                assert_eq!(
                    memory, "anonymous with 4 KiB pages",
                    "what vm-memory says it is"
                );
                assert_eq!(
                    missing,
                    "the kernel refuses MISSING registration of this memory"
                );
                assert_eq!(e.kind(), ErrorKind::Local);
            }
        }
    }
    // SAFETY: the mapping made above; the guest memory over it is dropped.
    assert_eq!(unsafe { libc::munmap(ptr, len) }, 0);

    // The same file through vm-memory's file-backed region: refused before
    // registering, from the file system it is on.
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(disk.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    if !disk_is_on_tmpfs(&disk) {
        let e = check_support(&mem, &one_block(&mem, "disk", 4096)).unwrap_err();
        eprintln!("{test}: {}", chain(&e));
        let (name, memory, missing) = unsupported(&e);
        assert_eq!(
            (name.as_str(), memory.as_str()),
            ("disk", "unsupported backing")
        );
        assert!(
            missing.contains("a file on a file system with magic"),
            "{missing}"
        );
    }

    // A private mapping of a memfd: a discarded page would show the file's.
    let fd = uffd_sys::mapping::memfd(MemoryKind::Shmem, (16 * PAGE) as usize).unwrap();
    let region = MmapRegion::<AtomicBitmap>::build(
        Some(FileOffset::new(File::from(fd), 0)),
        (16 * PAGE) as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE,
    )
    .unwrap();
    let mem =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    let e = check_support(&mem, &one_block(&mem, "private", 4096)).unwrap_err();
    eprintln!("{test}: {}", chain(&e));
    let (name, _, missing) = unsupported(&e);
    assert_eq!(name, "private");
    assert!(missing.contains("MAP_PRIVATE mapping"), "{missing}");

    // A block whose page size is not its memory's.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (4 * MIB) as usize)]).unwrap();
    let e = check_support(&mem, &one_block(&mem, "big", 2 << 20)).unwrap_err();
    eprintln!("{test}: {}", chain(&e));
    let (name, memory, missing) = unsupported(&e);
    assert_eq!(
        (name.as_str(), memory.as_str()),
        ("big", "anonymous with 4 KiB pages")
    );
    assert!(missing.contains("page size is 0x200000"), "{missing}");
    if let Some(guest) = hugetlbfs(test, 1) {
        let e = check_support(&guest.mem, &one_block(&guest.mem, "huge", 4096)).unwrap_err();
        eprintln!("{test}: {}", chain(&e));
        let (_, memory, missing) = unsupported(&e);
        assert_eq!(memory, "hugetlbfs with 2 MiB pages");
        assert!(missing.contains("page size is 0x1000"), "{missing}");
    }

    // A block outside guest memory.
    let blocks = RamBlocks::new(vec![RamBlock::new(
        "gone",
        GuestAddress(1 << 40),
        16 * PAGE,
        4096,
    )
    .unwrap()])
    .unwrap();
    let e = check_support(&mem, &blocks).unwrap_err();
    assert!(matches!(e, Error::NotInMemory { .. }), "{e:?}");
}
