//! The postcopy destination on the real kernel, with 4 KiB anonymous memory,
//! 4 KiB memfd (shmem) memory and 2 MiB hugetlbfs memory.
//!
//! Each scenario does what a destination does: the host check; half of the
//! pages placed by precopy's copy placer (zero pages left unwritten, some of
//! them then dropped, as a zero page the copy placer never allocated is); the
//! source's discards; fault handling; then threads standing in for vCPUs (and
//! one other thread) touch pages of every kind and block, a fake source
//! answers each request after a delay through the handler's placer while
//! another thread places the rest in the background. It checks what a user
//! would: every thread read the right bytes, every page ends right, each page
//! was asked for at most once, pages that must read zero were served here
//! without a request, blocktime is charged to the right threads, and `finish`
//! leaves no thread behind and the memory readable.
//!
//! Without userfaultfd the tests print SKIPPED (REQUIRE_UFFD=1 makes them
//! fail); without free huge pages the hugetlbfs one does (REQUIRE_HUGETLB=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postcopy_dest_common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use migration_ram::postcopy::{check_support, Discarder, FaultHandler, PageRequestSink};
use migration_ram::vm_memory::{Bytes, GuestAddress};
use migration_ram::{CopyPlacer, PagePlacer, RamBlock, RamBlocks, Result};
use migration_stream::{BlockId, DiscardRange};
use postcopy_dest_common::*;
use uffd_sys::{Features, ThpMode};

/// The tests of this binary, whose harness threads come and go meanwhile.
const TESTS: &[&str] = &[
    "postcopy_destination_on_4k_anonymous_memory",
    "postcopy_destination_on_4k_memfd_memory",
    "postcopy_destination_on_2m_hugetlbfs_memory",
    "dropping_the_handler_releases_blocked_threads_and_joins_its_own",
];

/// What the "other" thread writes into its page after reading it.
const MARKER: u64 = 0x6d61_726b_6572_2121;

/// A page of the guest, numbered over all blocks (`g`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Pg {
    block: usize,
    page: u64,
    g: u64,
}

/// What happened to a page before postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cat {
    /// Placed by precopy with its bytes.
    Data,
    /// A zero page precopy left unwritten; it reads zero (mapped).
    ZeroPresent,
    /// A zero page precopy left unwritten and nothing is mapped: received, but
    /// it faults as missing.
    ZeroMissing,
    /// Placed by precopy, then dirtied at the source and discarded.
    Discarded,
    /// Never sent before postcopy.
    Never,
}

struct Plan {
    pages: Vec<Pg>,
    cat: Vec<Cat>,
    /// Per toucher (the vCPUs, then the other thread): pages only a request
    /// brings (the background sender skips them), touched first.
    reserved: Vec<Vec<u64>>,
    /// Per vCPU toucher: the other pages it touches.
    touches: Vec<Vec<u64>>,
}

fn is_zero(g: u64) -> bool {
    g % 3 == 0
}

/// The bytes of page `g` at the source: version 2 for pages dirtied again
/// (discarded), version 1 for the rest.
fn source_page(plan: &Plan, g: u64, buf: &mut [u8]) {
    if is_zero(g) {
        buf.fill(0);
    } else {
        let version = if plan.cat[g as usize] == Cat::Discarded {
            2
        } else {
            1
        };
        pattern(buf, g.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version);
    }
}

/// The bytes precopy sent for page `g` (version 1).
fn precopy_page(g: u64, buf: &mut [u8]) {
    if is_zero(g) {
        buf.fill(0);
    } else {
        pattern(buf, g.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1);
    }
}

fn plan(blocks: &RamBlocks, vcpus: usize, touches: usize) -> Plan {
    let mut pages = Vec::new();
    for (block, b) in blocks.iter().enumerate() {
        for page in 0..b.pages() {
            let g = pages.len() as u64;
            pages.push(Pg { block, page, g });
        }
    }
    let cat: Vec<Cat> = pages
        .iter()
        .map(|p| {
            let g = p.g;
            if g % 2 == 1 {
                Cat::Never
            } else if g % 8 == 4 {
                Cat::Discarded
            } else if is_zero(g) && g % 12 == 0 {
                Cat::ZeroMissing
            } else if is_zero(g) {
                Cat::ZeroPresent
            } else {
                Cat::Data
            }
        })
        .collect();
    let of = |c: Cat| -> Vec<u64> {
        (0..pages.len() as u64)
            .filter(|&g| cat[g as usize] == c)
            .collect()
    };
    let (never, discarded) = (of(Cat::Never), of(Cat::Discarded));
    let mut reserved: Vec<Vec<u64>> = (0..=vcpus).map(|t| vec![never[t]]).collect();
    for (t, r) in reserved.iter_mut().take(vcpus).enumerate() {
        if let Some(&d) = discarded.get(t) {
            r.push(d);
        }
    }
    let taken: HashSet<u64> = reserved.iter().flatten().copied().collect();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let touches = (0..vcpus)
        .map(|t| {
            // One page of each kind first, then random ones.
            let mut list: Vec<u64> = [
                Cat::ZeroMissing,
                Cat::Data,
                Cat::ZeroPresent,
                Cat::Never,
                Cat::Discarded,
            ]
            .into_iter()
            .filter_map(|c| {
                let all: Vec<u64> = of(c).into_iter().filter(|g| !taken.contains(g)).collect();
                (!all.is_empty()).then(|| all[t % all.len()])
            })
            .collect();
            while list.len() < touches {
                let g = rng.below(pages.len() as u64);
                if !taken.contains(&g) {
                    list.push(g);
                }
            }
            list
        })
        .collect();
    Plan {
        pages,
        cat,
        reserved,
        touches,
    }
}

enum Msg {
    Request(u32, u64, u64),
    Stop,
}

/// The return path as the test sees it: requests are buffered per batch and
/// handed to the fake source on `flush`; every request is logged.
struct FakeReturnPath {
    pending: Mutex<Vec<(u32, u64, u64)>>,
    log: Mutex<Vec<(u32, u64, u64)>>,
    flushes: AtomicU64,
    sent: AtomicU64,
    tx: Mutex<mpsc::Sender<Msg>>,
}

impl PageRequestSink for FakeReturnPath {
    fn request(&self, block: BlockId, offset: u64, len: u64) -> Result<()> {
        self.pending.lock().unwrap().push((block.0, offset, len));
        self.log.lock().unwrap().push((block.0, offset, len));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let tx = self.tx.lock().unwrap();
        for (b, o, l) in self.pending.lock().unwrap().drain(..) {
            tx.send(Msg::Request(b, o, l)).unwrap();
            self.sent.fetch_add(1, Ordering::SeqCst);
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn block(blocks: &RamBlocks, index: usize) -> &RamBlock {
    blocks.iter().nth(index).unwrap()
}

/// Places page `g` as the source has it.
fn place_source_page(placer: &dyn PagePlacer, blocks: &RamBlocks, plan: &Plan, g: u64) {
    let p = plan.pages[g as usize];
    let b = block(blocks, p.block);
    if is_zero(g) {
        placer.place_zero(b, p.page).unwrap();
    } else {
        let mut buf = vec![0u8; b.page_size() as usize];
        source_page(plan, g, &mut buf);
        placer.place(b, p.page, &buf).unwrap();
    }
}

/// Joins `h`, failing if it has not finished within the hang guard (a thread
/// left blocked on a page nobody places) or fault handling failed.
fn join_within<T>(what: &str, h: std::thread::JoinHandle<T>, handler: Option<&FaultHandler>) -> T {
    wait_until(what, handler, || h.is_finished());
    h.join().expect("thread panicked")
}

/// Waits until `done`, failing after the hang guard or when fault handling
/// failed.
fn wait_until(what: &str, handler: Option<&FaultHandler>, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        if let Some(e) = handler.and_then(FaultHandler::error_text) {
            panic!("waiting for {what}: fault handling failed: {e}");
        }
        assert!(
            start.elapsed() < HANG_GUARD,
            "{what}: still waiting after the hang guard"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until no thread named `postcopy-fault` is left (hang guard). A
/// joined thread leaves `/proc/self/task` a moment after its join returned
/// (the kernel wakes the joiner before it releases the task), so this waits
/// for that moment rather than reading the list once.
fn fault_thread_gone() {
    wait_until("the fault thread to be gone", None, || {
        threads_named("postcopy-fault") == 0
    });
}

/// The whole destination side of postcopy over `guest`, with `vcpus` vCPU
/// threads making `touches` touches each.
fn scenario(test: &str, guest: Guest, vcpus: usize, touches: usize) {
    let Guest { kind, mem, blocks } = guest;
    let threads_before = threads();
    fault_thread_gone();

    // 1. Before anything is received: can this host serve postcopy?
    let uffd = check_support(&mem, &blocks).unwrap();
    let plan = plan(&blocks, vcpus, touches);
    let n = plan.pages.len();

    // 2. Precopy: the even pages, through the copy placer.
    let copy = CopyPlacer::new(mem.clone());
    for p in plan.pages.iter().filter(|p| p.g % 2 == 0) {
        let b = block(&blocks, p.block);
        if is_zero(p.g) {
            copy.place_zero(b, p.page).unwrap();
        } else {
            let mut buf = vec![0u8; b.page_size() as usize];
            precopy_page(p.g, &mut buf);
            copy.place(b, p.page, &buf).unwrap();
        }
    }
    // A zero page the copy placer skipped reads zero; reading it mapped the
    // kernel's zero page (anonymous memory) or allocated one (shmem,
    // hugetlbfs). Some are dropped again, received bit kept: the state the
    // fault path must serve with a local zero page.
    for p in plan
        .pages
        .iter()
        .filter(|p| plan.cat[p.g as usize] == Cat::ZeroMissing)
    {
        let b = block(&blocks, p.block);
        uffd_sys::discard_guest(&mem, b.page_addr(p.page), b.page_size() as usize).unwrap();
        assert!(b.received().test(p.page));
    }
    let received_before = blocks.received_pages();
    assert_eq!(received_before, n.div_ceil(2) as u64);

    // 3. The source's discards, one command per block, consecutive pages
    // merged into ranges.
    let mut discarder = Discarder::new(mem.clone(), blocks.clone());
    let mut discarded = 0;
    for (index, b) in blocks.iter().enumerate() {
        let ps = u64::from(b.page_size());
        let mut ranges: Vec<DiscardRange> = Vec::new();
        for p in plan
            .pages
            .iter()
            .filter(|p| p.block == index && plan.cat[p.g as usize] == Cat::Discarded)
        {
            match ranges.last_mut() {
                Some(r) if r.offset + r.len == p.page * ps => r.len += ps,
                _ => ranges.push(DiscardRange {
                    offset: p.page * ps,
                    len: ps,
                }),
            }
        }
        let id = BlockId(u32::try_from(index).unwrap());
        discarded += discarder.discard(id, &ranges).unwrap();
    }
    let expect_discarded = plan.cat.iter().filter(|&&c| c == Cat::Discarded).count() as u64;
    assert_eq!(discarded, expect_discarded);
    assert_eq!(blocks.received_pages(), received_before - discarded);
    for p in &plan.pages {
        let received = block(&blocks, p.block).received().test(p.page);
        let expected = !matches!(plan.cat[p.g as usize], Cat::Discarded | Cat::Never);
        assert_eq!(
            received, expected,
            "page {} ({:?})",
            p.g, plan.cat[p.g as usize]
        );
    }
    let thp = uffd_sys::thp_mode();
    let host0 = block(&blocks, 0).host_addr(&mem).unwrap();
    if kind != "hugetlbfs" && thp.is_some() {
        assert!(
            vma_flags(host0).iter().any(|f| f == "nh"),
            "transparent huge pages advised off for the discards"
        );
    }

    // 4. The vCPUs and another thread; they wait until fault handling runs.
    let go = Arc::new(Barrier::new(vcpus + 2));
    let (tid_tx, tid_rx) = mpsc::channel();
    let plan = Arc::new(plan);
    let touchers: Vec<_> = (0..=vcpus)
        .map(|t| {
            let (mem, blocks, plan, go, tid_tx) = (
                mem.clone(),
                blocks.clone(),
                plan.clone(),
                go.clone(),
                tid_tx.clone(),
            );
            named(
                &format!("pc-toucher-{t}"),
                move || -> std::result::Result<usize, String> {
                    tid_tx.send((t, gettid())).unwrap();
                    go.wait();
                    let mut rng = Rng(0xfeed_0000 + t as u64);
                    let other = t == vcpus;
                    let list: Vec<u64> = if other {
                        plan.reserved[t].clone()
                    } else {
                        plan.reserved[t]
                            .iter()
                            .chain(&plan.touches[t])
                            .copied()
                            .collect()
                    };
                    let mut expect = Vec::new();
                    for &g in &list {
                        let p = plan.pages[g as usize];
                        let b = block(&blocks, p.block);
                        let ps = u64::from(b.page_size());
                        let off = rng.below(ps / 8) * 8;
                        let got: u64 = mem
                            .read_obj(GuestAddress(b.page_addr(p.page).0 + off))
                            .map_err(|e| e.to_string())?;
                        expect.resize(ps as usize, 0);
                        source_page(&plan, g, &mut expect);
                        let want = u64::from_le_bytes(
                            expect[off as usize..off as usize + 8].try_into().unwrap(),
                        );
                        if got != want {
                            return Err(format!(
                                "thread {t} read {got:#x} at offset {off:#x} of page {g} ({:?}), \
                             expected {want:#x}",
                                plan.cat[g as usize]
                            ));
                        }
                        if other {
                            mem.write_obj(MARKER, GuestAddress(b.page_addr(p.page).0 + 8))
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    Ok(list.len())
                },
            )
        })
        .collect();
    drop(tid_tx);
    let mut tids = vec![0u32; vcpus + 1];
    for _ in 0..=vcpus {
        let (t, tid) = tid_rx.recv().unwrap();
        tids[t] = tid;
    }

    // 5. Listen: fault handling starts; the vCPU threads' ids map faults to
    // vCPUs (the last thread is no vCPU).
    let (tx, rx) = mpsc::channel();
    let sink = Arc::new(FakeReturnPath {
        pending: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
        flushes: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        tx: Mutex::new(tx.clone()),
    });
    let handler = FaultHandler::start(
        uffd.clone(),
        mem.clone(),
        blocks.clone(),
        sink.clone(),
        tids[..vcpus].to_vec(),
    )
    .unwrap();
    // A new thread names itself as it starts.
    let start = Instant::now();
    while threads_named("postcopy-fault") != 1 {
        assert!(start.elapsed() < HANG_GUARD, "no fault thread");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        handler.missing_pages(),
        (n as u64) - blocks.received_pages()
    );
    let placer = handler.placer();

    // 6. Run: the threads touch; the fake source answers requests after a
    // delay; the rest of the pages arrive in the background.
    go.wait();
    let answerer = {
        let (placer, blocks, plan) = (placer.clone(), blocks.clone(), plan.clone());
        named("pc-fake-source", move || {
            let mut answered = 0u64;
            while let Ok(Msg::Request(b, offset, len)) = rx.recv() {
                std::thread::sleep(Duration::from_millis(1));
                let index = b as usize;
                let bl = block(&blocks, index);
                assert_eq!(len, u64::from(bl.page_size()), "one whole page per request");
                let page = offset / len;
                let g = plan
                    .pages
                    .iter()
                    .find(|p| p.block == index && p.page == page)
                    .unwrap()
                    .g;
                place_source_page(&*placer, &blocks, &plan, g);
                answered += 1;
            }
            answered
        })
    };
    let background = {
        let (placer, blocks, plan) = (placer.clone(), blocks.clone(), plan.clone());
        named("pc-background", move || {
            let reserved: HashSet<u64> = plan.reserved.iter().flatten().copied().collect();
            let mut placed = 0u64;
            for p in &plan.pages {
                if reserved.contains(&p.g) || block(&blocks, p.block).received().test(p.page) {
                    continue;
                }
                place_source_page(&*placer, &blocks, &plan, p.g);
                placed += 1;
                // Slower than the touchers, so that they find missing pages.
                if placed % 32 == 0 || u64::from(block(&blocks, p.block).page_size()) > PAGE {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            placed
        })
    };
    for (t, h) in touchers.into_iter().enumerate() {
        let touched = join_within(&format!("toucher {t}"), h, Some(&handler)).unwrap();
        assert!(touched > 0);
    }
    let background_placed = join_within("the background sender", background, Some(&handler));
    // Every page there, and every request the fault thread logged handed to
    // the fake source (a request can race with the background placing its
    // page; it is answered all the same).
    wait_until("the last pages", Some(&handler), || {
        handler.missing_pages() == 0
            && sink.sent.load(Ordering::SeqCst) == sink.log.lock().unwrap().len() as u64
    });
    tx.send(Msg::Stop).unwrap();
    let answered = join_within("the fake source", answerer, Some(&handler));
    let during = handler.stats();

    // 7. Complete: fault handling ends, huge pages are advised on again.
    let stats = handler.finish().unwrap();
    discarder.finish().unwrap();
    fault_thread_gone();
    assert_eq!(
        threads_started_since(&threads_before, TESTS),
        Vec::<String>::new(),
        "every thread started was joined"
    );
    assert_eq!(stats.missing_pages, 0);
    assert!(stats.faults >= during.faults);
    if kind != "hugetlbfs" && matches!(thp, Some(ThpMode::Madvise | ThpMode::Always)) {
        assert!(
            vma_flags(host0).iter().any(|f| f == "hg"),
            "transparent huge pages advised on again"
        );
    }

    let bt = &stats.blocktime;
    eprintln!(
        "{test}: {} pages, {} discarded; {} faults: {} remote, {} zero pages here, {} late; \
         {} requests in {} flushes, {} answered, {} placed in the background; \
         blocktime per vCPU {:?} (faults {:?}), other {:?} ({}), all vCPUs at once {:?}, \
         latency histogram {:?}",
        n,
        discarded,
        stats.faults,
        stats.remote_faults,
        stats.zero_pages,
        stats.late_faults,
        stats.requests,
        sink.flushes.load(Ordering::Relaxed),
        answered,
        background_placed,
        bt.vcpu_blocked,
        bt.vcpu_faults,
        bt.other_blocked,
        bt.other_faults,
        bt.all_vcpus_blocked,
        bt.latency_histogram
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, c)| format!("2^{i}us:{c}"))
            .collect::<Vec<_>>(),
    );

    // Requests: whole pages, each at most once, only for pages that had to
    // come from the source, every reserved page among them.
    let log = sink.log.lock().unwrap().clone();
    let mut requested = HashSet::new();
    for &(b, offset, len) in &log {
        let bl = block(&blocks, b as usize);
        assert_eq!(len, u64::from(bl.page_size()));
        assert_eq!(offset % len, 0);
        assert!(
            requested.insert((b, offset)),
            "page {offset:#x} of block {b} requested twice"
        );
    }
    let requested_g: HashSet<u64> = plan
        .pages
        .iter()
        .filter(|p| {
            let ps = u64::from(block(&blocks, p.block).page_size());
            requested.contains(&(p.block as u32, p.page * ps))
        })
        .map(|p| p.g)
        .collect();
    for &g in &requested_g {
        assert!(
            matches!(plan.cat[g as usize], Cat::Never | Cat::Discarded),
            "page {g} ({:?}) was requested",
            plan.cat[g as usize]
        );
    }
    for &g in plan.reserved.iter().flatten() {
        assert!(
            requested_g.contains(&g),
            "reserved page {g} never requested"
        );
    }
    assert_eq!(stats.requests, log.len() as u64);
    assert_eq!(answered, log.len() as u64);
    assert!(sink.flushes.load(Ordering::Relaxed) >= 1);
    assert!(
        sink.pending.lock().unwrap().is_empty(),
        "every batch flushed"
    );
    assert_eq!(stats.request_errors, 0);

    // Zero pages the copy placer skipped: served here, never requested.
    let zero_touched: Vec<u64> = plan
        .touches
        .iter()
        .flatten()
        .copied()
        .filter(|&g| plan.cat[g as usize] == Cat::ZeroMissing)
        .collect();
    assert!(!zero_touched.is_empty());
    assert!(zero_touched.iter().all(|g| !requested_g.contains(g)));
    assert!(
        stats.zero_pages >= 1,
        "a missing received page was served with a local zero page: {stats:?}"
    );
    assert_eq!(
        stats.faults,
        stats.remote_faults + stats.zero_pages + stats.late_faults
    );

    // Blocktime: every wait closed, charged to the thread that waited.
    assert_eq!(bt.untracked_faults, 0);
    assert_eq!(bt.faults(), stats.remote_faults, "{stats:?}");
    assert_eq!(bt.latency_histogram.iter().sum::<u64>(), bt.faults());
    assert!(bt.total_blocked() > Duration::ZERO);
    assert!(bt.postcopy_latency_ns() > 0);
    assert_eq!(bt.vcpu_blocked.len(), vcpus);
    if uffd.features().contains(Features::THREAD_ID) {
        for v in 0..vcpus {
            assert!(
                bt.vcpu_faults[v] >= plan.reserved[v].len() as u64,
                "vCPU {v} waited on its reserved pages: {bt:?}"
            );
            assert!(bt.vcpu_blocked[v] > Duration::ZERO);
        }
        assert_eq!(bt.other_faults, 1, "the other thread waited once: {bt:?}");
        assert!(bt.other_blocked > Duration::ZERO);
        assert_eq!(bt.postcopy_vcpu_blocktime_ms().len(), vcpus);
    } else {
        eprintln!("{test}: no THREAD_ID on this kernel; every wait counts as another thread's");
    }

    // 8. The memory is readable, and right, page by page.
    let other_page = plan.reserved[vcpus][0];
    for p in &plan.pages {
        let b = block(&blocks, p.block);
        let ps = b.page_size() as usize;
        let mut want = vec![0u8; ps];
        source_page(&plan, p.g, &mut want);
        if p.g == other_page {
            want[8..16].copy_from_slice(&MARKER.to_le_bytes());
        }
        let mut got = vec![0u8; ps];
        mem.read_slice(&mut got, b.page_addr(p.page)).unwrap();
        assert!(
            got == want,
            "{test}: page {} ({:?}) is wrong after postcopy",
            p.g,
            plan.cat[p.g as usize]
        );
    }
}

#[test]
fn postcopy_destination_on_4k_anonymous_memory() {
    let test = "postcopy_destination_on_4k_anonymous_memory";
    let _serial = serial();
    if !have_uffd(test) {
        return;
    }
    scenario(test, anonymous(), 3, 200);
}

#[test]
fn postcopy_destination_on_4k_memfd_memory() {
    let test = "postcopy_destination_on_4k_memfd_memory";
    let _serial = serial();
    if !have_uffd(test) {
        return;
    }
    scenario(test, memfd(), 3, 200);
}

#[test]
fn postcopy_destination_on_2m_hugetlbfs_memory() {
    let test = "postcopy_destination_on_2m_hugetlbfs_memory";
    let _serial = serial();
    if !have_uffd(test) {
        return;
    }
    // 16 MiB: every kind of page, two vCPUs. CI reserves only 4 huge pages
    // (.ci/run); with those, 8 MiB and one vCPU (no discarded page then).
    match try_hugetlbfs(8) {
        Ok(guest) => scenario(test, guest, 2, 8),
        Err(e) => {
            eprintln!(
                "{test}: 8 huge pages cannot be had ({e}); the scenario runs on 4, without a \
                 discarded page"
            );
            let Some(guest) = hugetlbfs(test, 4) else {
                return;
            };
            scenario(test, guest, 1, 4);
        }
    }
}

/// A sink that records requests and never answers.
struct Silent(Mutex<Vec<(u32, u64)>>);

impl PageRequestSink for Silent {
    fn request(&self, block: BlockId, offset: u64, _len: u64) -> Result<()> {
        self.0.lock().unwrap().push((block.0, offset));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn dropping_the_handler_releases_blocked_threads_and_joins_its_own() {
    let test = "dropping_the_handler_releases_blocked_threads_and_joins_its_own";
    let _serial = serial();
    if !have_uffd(test) {
        return;
    }
    let guest = anonymous();
    let uffd = check_support(&guest.mem, &guest.blocks).unwrap();
    let sink = Arc::new(Silent(Mutex::new(Vec::new())));
    let before = threads();
    let handler = FaultHandler::start(
        uffd,
        guest.mem.clone(),
        guest.blocks.clone(),
        sink.clone(),
        vec![],
    )
    .unwrap();
    let at = GuestAddress((1 << 30) + 5 * PAGE);
    let mem = guest.mem.clone();
    let reader = named("pc-reader", move || mem.read_obj::<u64>(at).unwrap());
    let start = Instant::now();
    while sink.0.lock().unwrap().is_empty() {
        assert!(start.elapsed() < HANG_GUARD, "no request");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(*sink.0.lock().unwrap(), vec![(1, 5 * PAGE)]);
    assert!(!reader.is_finished(), "the reader waits for its page");
    let placer = handler.placer();
    drop(handler);
    // Unregistered: the reader faults normally and reads an empty page.
    assert_eq!(join_within("the reader", reader, None), 0);
    fault_thread_gone();
    assert_eq!(threads_started_since(&before, TESTS), Vec::<String>::new());
    // The placer outlives the handler but can no longer place.
    let b = block(&guest.blocks, 1);
    assert!(placer.place(b, 6, &[1; PAGE as usize]).is_err());
}
