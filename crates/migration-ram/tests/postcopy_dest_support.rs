//! The postcopy destination's host check and its session-level steps, on the
//! real kernel: what `check_support` refuses and how it says so, that it
//! leaves nothing registered, and `PostcopyIncoming` undoing what it did
//! (memory locking, huge page advice, balloon inhibition) at the end.
//!
//! Without userfaultfd the tests print SKIPPED (REQUIRE_UFFD=1 makes them
//! fail); without free huge pages the hugetlbfs parts do (REQUIRE_HUGETLB=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postcopy_dest_common;

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_ram::postcopy::{
    check_blocks, check_support, MlockMode, PageRequestSink, PostcopyError, PostcopyIncoming,
};
use migration_ram::vm_memory::bitmap::AtomicBitmap;
use migration_ram::vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use migration_ram::vm_memory::{Bytes, FileOffset, GuestAddress};
use migration_ram::{
    BalloonInhibitor, Error, ErrorKind, GuestMemoryMmap, GuestRegionMmap, RamBlock, RamBlocks,
    Result,
};
use migration_stream::{BlockId, DiscardRange};
use postcopy_dest_common::*;
use uffd_sys::{Features, Ioctls, MemoryKind, RegisterMode, Uffd};

const TESTS: &[&str] = &[
    "check_support_accepts_every_kind_and_leaves_nothing_registered",
    "check_support_refuses_clearly_what_it_cannot_serve",
    "postcopy_incoming_unlocks_inhibits_and_undoes_it_all",
];

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

/// A sink that answers nothing (the test places pages itself).
struct Requests(std::sync::Mutex<Vec<(u32, u64)>>);

impl PageRequestSink for Requests {
    fn request(&self, block: BlockId, offset: u64, _len: u64) -> Result<()> {
        self.0.lock().unwrap().push((block.0, offset));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn postcopy_incoming_unlocks_inhibits_and_undoes_it_all() {
    let test = "postcopy_incoming_unlocks_inhibits_and_undoes_it_all";
    let _serial = serial();
    if !have_uffd(test) {
        return;
    }
    let before = threads();
    let mem =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (4 * MIB) as usize)]).unwrap());
    let blocks = Arc::new(one_block(&mem, "pc.ram", 4096));
    let b = blocks.get(BlockId(0)).unwrap();
    let host = b.host_addr(&mem).unwrap();
    // Precopy placed every page.
    mem.write_slice(&vec![0x11; (4 * MIB) as usize], GuestAddress(0))
        .unwrap();
    b.received().set_all();
    // The VMM locks its guest memory.
    uffd_sys::mlock_guest(
        &mem,
        GuestAddress(0),
        (4 * MIB) as usize,
        MlockMode::OnFault,
    )
    .unwrap();
    assert!(vma_flags(host).iter().any(|f| f == "lo"));

    let mut incoming = PostcopyIncoming::new(mem.clone(), blocks.clone()).unwrap();
    let page3 = [DiscardRange {
        offset: 3 * PAGE,
        len: PAGE,
    }];
    // Locked memory refuses the discard.
    let e = incoming.discard(BlockId(0), &page3).unwrap_err();
    eprintln!("{test}: discard of locked memory: {}", chain(&e));
    assert!(
        matches!(&e, Error::Postcopy(PostcopyError::Memory { source, .. }) if source.errno() == Some(libc::EINVAL)),
        "{e:?}"
    );
    assert!(
        b.received().test(3),
        "nothing is forgotten when a discard fails"
    );
    incoming.unlock_memory(MlockMode::OnFault).unwrap();
    assert!(!vma_flags(host).iter().any(|f| f == "lo"));
    assert_eq!(incoming.discard(BlockId(0), &page3).unwrap(), 1);
    assert!(!b.received().test(3));
    assert_eq!(incoming.missing_pages(), 1);

    let balloon = Arc::new(BalloonInhibitor::new());
    let sink = Arc::new(Requests(std::sync::Mutex::new(Vec::new())));
    let placer = incoming
        .listen(sink.clone(), vec![gettid()], Some(&balloon))
        .unwrap();
    assert!(balloon.is_inhibited());
    assert!(balloon.try_discard().is_none());
    let e = incoming.discard(BlockId(0), &page3).unwrap_err();
    assert!(
        matches!(e, Error::InvalidState { op: "discard", .. }),
        "{e:?}"
    );
    assert!(incoming.listen(sink.clone(), vec![], None).is_err());

    // A thread reads the discarded page: it is requested, then placed.
    let m = mem.clone();
    let reader = named("pc-reader", move || {
        m.read_obj::<u8>(GuestAddress(3 * PAGE + 7)).unwrap()
    });
    let start = Instant::now();
    while sink.0.lock().unwrap().is_empty() {
        assert!(start.elapsed() < HANG_GUARD, "no request");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(*sink.0.lock().unwrap(), vec![(0, 3 * PAGE)]);
    placer.place(b, 3, &[0x22; PAGE as usize]).unwrap();
    assert_eq!(reader.join().unwrap(), 0x22);
    let stats = incoming.stats().unwrap();
    assert_eq!((stats.requests, stats.missing_pages), (1, 0));
    assert_eq!(stats.blocktime.other_faults, 1, "the reader is no vCPU");

    let stats = incoming.finish().unwrap();
    assert_eq!(stats.requests, 1);
    assert!(!balloon.is_inhibited(), "the balloon may discard again");
    let flags = vma_flags(host);
    assert!(flags.iter().any(|f| f == "lo"), "locked again: {flags:?}");
    if matches!(
        uffd_sys::thp_mode(),
        Some(uffd_sys::ThpMode::Madvise | uffd_sys::ThpMode::Always)
    ) {
        assert!(
            flags.iter().any(|f| f == "hg"),
            "huge pages on again: {flags:?}"
        );
    }
    assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * PAGE)).unwrap(), 0x22);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(4 * PAGE)).unwrap(), 0x11);
    assert_eq!(threads_started_since(&before, TESTS), Vec::<String>::new());
    uffd_sys::munlock_guest(&mem, GuestAddress(0), (4 * MIB) as usize).unwrap();
}
