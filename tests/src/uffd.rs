//! Userfaultfd mechanism scenarios, in one process with real threads blocked on real
//! faults.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_sys::{
    CopyMode, Event, EventBuf, Features, Mapping, MemoryKind, RegisterMode, Uffd, Wake,
};

use crate::{Failure, Outcome};

const PAGE: usize = 4096;
const PAGES: usize = 16 * 1024;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

fn open(features: Features) -> Result<Uffd, Failure> {
    Uffd::builder()
        .require(features)
        .open()
        .map_err(|x| Failure::Skipped(format!("userfaultfd unusable: {x}")))
}

/// A small deterministic generator (xorshift) for page choices and contents.
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Source page `i`: every fourth page zero, the rest a pattern derived from `i`.
fn source_page(i: usize, out: &mut [u8]) {
    if i % 4 == 0 {
        out.fill(0);
        return;
    }
    let mut s = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&xorshift(&mut s).to_le_bytes()[..chunk.len()]);
    }
}

/// Places page `i` once: the first placer wins; a later one meets EEXIST, which also
/// wakes anybody waiting. Returns whether this call placed it.
fn place(
    uffd: &Uffd,
    map: &Mapping,
    received: &[AtomicU8],
    i: usize,
    buf: &mut [u8],
) -> Result<bool, String> {
    if received[i].load(Ordering::Acquire) != 0 {
        // Already placed; a waiter that faulted just before is woken by a wake.
        uffd.wake(map.addr() + (i * PAGE) as u64, PAGE as u64)
            .map_err(e)?;
        return Ok(false);
    }
    source_page(i, buf);
    let r = if buf.iter().all(|&b| b == 0) {
        map.zero_in(uffd, i * PAGE, PAGE, Wake::Yes)
    } else {
        map.copy_in(uffd, i * PAGE, buf, CopyMode::empty())
    };
    match r {
        Ok(_) => {
            received[i].store(1, Ordering::Release);
            Ok(true)
        }
        Err(x) if x.is_exists() => Ok(false),
        Err(x) => Err(e(x)),
    }
}

/// The `uffd-postcopy` scenario.
pub fn postcopy() -> Result<Outcome, Failure> {
    let uffd = Arc::new(open(Features::THREAD_ID)?);
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, PAGES * PAGE).map_err(e)?);
    uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .map_err(e)?;
    let received: Arc<Vec<AtomicU8>> = Arc::new((0..PAGES).map(|_| AtomicU8::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();

    // Two "vCPUs" read random pages and check them against the source.
    let vcpus: Vec<_> = (0..2u64)
        .map(|v| {
            let map = Arc::clone(&map);
            std::thread::spawn(move || -> Result<(), String> {
                let mut s = 0x1234_5678 + v;
                let mut expect = vec![0u8; PAGE];
                for _ in 0..2048 {
                    let i = (xorshift(&mut s) % PAGES as u64) as usize;
                    let off = (xorshift(&mut s) % (PAGE as u64 / 8)) as usize * 8;
                    let got = map.load_u64(i * PAGE + off).map_err(e)?;
                    source_page(i, &mut expect);
                    let want = u64::from_le_bytes(expect[off..off + 8].try_into().map_err(e)?);
                    if got != want {
                        return Err(format!(
                            "vCPU {v} read {got:#x} at page {i}, expected {want:#x}"
                        ));
                    }
                }
                Ok(())
            })
        })
        .collect();

    // The background sender places every page in order.
    let sender = {
        let (uffd, map, received, stop) = (
            Arc::clone(&uffd),
            Arc::clone(&map),
            Arc::clone(&received),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || -> Result<u64, String> {
            let mut buf = vec![0u8; PAGE];
            let mut placed = 0;
            for i in 0..PAGES {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                placed += u64::from(place(&uffd, &map, &received, i, &mut buf)?);
            }
            Ok(placed)
        })
    };

    // This thread is the fault thread: each fault is served at once.
    let mut faults = 0u64;
    let mut on_demand = 0u64;
    let mut events = EventBuf::new(64);
    let mut buf = vec![0u8; PAGE];
    let result = (|| -> Result<(), String> {
        while !(sender.is_finished() && vcpus.iter().all(|t| t.is_finished())) {
            if !uffd
                .wait_readable(Some(Duration::from_millis(20)))
                .map_err(e)?
            {
                continue;
            }
            for ev in uffd.read_events(&mut events).map_err(e)? {
                if let Event::PageFault(pf) = ev {
                    faults += 1;
                    let i = usize::try_from(pf.address - map.addr()).map_err(e)? / PAGE;
                    on_demand += u64::from(place(&uffd, &map, &received, i, &mut buf)?);
                }
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let background = sender.join().map_err(|_| "sender panicked")??;
    for v in vcpus {
        v.join().map_err(|_| "vCPU panicked")??;
    }
    result?;
    let total = start.elapsed();

    // Verify every page.
    let mut got = vec![0u8; PAGE];
    for i in 0..PAGES {
        map.read(i * PAGE, &mut got).map_err(e)?;
        source_page(i, &mut buf);
        if got != buf {
            return Err(Failure::Failed(format!(
                "destination page {i} differs from the source"
            )));
        }
    }
    let placed = background + on_demand;
    if placed != PAGES as u64 {
        return Err(Failure::Failed(format!(
            "{placed} pages placed, expected each of {PAGES} exactly once"
        )));
    }
    Ok(Outcome {
        total,
        pages: placed,
        faults,
        bytes: (PAGES * PAGE) as u64,
        downtime: None,
        accel: None,
        note: format!(
            "{on_demand} pages on demand, {background} in background; destination == source"
        ),
    })
}

/// The `uffd-snapshot` scenario.
pub fn snapshot() -> Result<Outcome, Failure> {
    let uffd = Arc::new(open(Features::PAGEFAULT_FLAG_WP)?);
    let map = Arc::new(Mapping::new(MemoryKind::Anonymous, PAGES * PAGE).map_err(e)?);
    let mut buf = vec![0u8; PAGE];
    for i in 0..PAGES {
        source_page(i, &mut buf);
        map.write(i * PAGE, &buf).map_err(e)?;
    }
    uffd.register(map.addr(), map.len() as u64, RegisterMode::WP)
        .map_err(e)?;

    // The reference: the region at the moment of protection (writers not yet started).
    let mut reference = vec![0u8; PAGES * PAGE];
    map.read(0, &mut reference).map_err(e)?;
    let start = Instant::now();
    uffd.write_protect(map.addr(), map.len() as u64)
        .map_err(e)?;

    // Page states: 0 unsaved, 1 being saved, 2 saved.
    let state: Arc<Vec<AtomicU8>> = Arc::new((0..PAGES).map(|_| AtomicU8::new(0)).collect());
    let snap = Arc::new(Mapping::new(MemoryKind::Anonymous, PAGES * PAGE).map_err(e)?);
    let save = {
        let (uffd, map, state, snap) = (
            Arc::clone(&uffd),
            Arc::clone(&map),
            Arc::clone(&state),
            Arc::clone(&snap),
        );
        move |i: usize, buf: &mut [u8]| -> Result<bool, String> {
            if state[i]
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Ok(false);
            }
            map.read(i * PAGE, buf).map_err(e)?;
            snap.write(i * PAGE, buf).map_err(e)?;
            state[i].store(2, Ordering::Release);
            uffd.write_unprotect(map.addr() + (i * PAGE) as u64, PAGE as u64, Wake::Yes)
                .map_err(e)?;
            Ok(true)
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (map, stop, writes) = (Arc::clone(&map), Arc::clone(&stop), Arc::clone(&writes));
            std::thread::spawn(move || -> Result<(), String> {
                let mut s = 0xdead_beef + w;
                while !stop.load(Ordering::Relaxed) {
                    let i = (xorshift(&mut s) % PAGES as u64) as usize;
                    map.store_u64(i * PAGE, xorshift(&mut s)).map_err(e)?;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();

    let saver = {
        let save = save.clone();
        std::thread::spawn(move || -> Result<u64, String> {
            let mut buf = vec![0u8; PAGE];
            let mut n = 0;
            for i in 0..PAGES {
                n += u64::from(save(i, &mut buf)?);
            }
            Ok(n)
        })
    };

    let mut faults = 0u64;
    let mut on_fault = 0u64;
    let mut events = EventBuf::new(64);
    let result = (|| -> Result<(), String> {
        while !saver.is_finished() {
            if !uffd
                .wait_readable(Some(Duration::from_millis(20)))
                .map_err(e)?
            {
                continue;
            }
            for ev in uffd.read_events(&mut events).map_err(e)? {
                if let Event::PageFault(pf) = ev {
                    faults += 1;
                    let i = usize::try_from(pf.address - map.addr()).map_err(e)? / PAGE;
                    // Save the page before the write lands; if the saver has it, it
                    // unprotects (and wakes) when done.
                    on_fault += u64::from(save(i, &mut buf)?);
                }
            }
        }
        Ok(())
    })();
    let background = saver.join().map_err(|_| "saver panicked")??;
    let total = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    // Anything still protected is released so the writers can stop.
    uffd.write_unprotect(map.addr(), map.len() as u64, Wake::Yes)
        .map_err(e)?;
    for w in writers {
        w.join().map_err(|_| "writer panicked")??;
    }
    result?;

    let mut got = vec![0u8; PAGE];
    for i in 0..PAGES {
        snap.read(i * PAGE, &mut got).map_err(e)?;
        if got[..] != reference[i * PAGE..(i + 1) * PAGE] {
            return Err(Failure::Failed(format!(
                "snapshot page {i} differs from the region at protection time"
            )));
        }
    }
    let saved = background + on_fault;
    if saved != PAGES as u64 {
        return Err(Failure::Failed(format!(
            "{saved} pages saved, expected {PAGES}"
        )));
    }
    Ok(Outcome {
        total,
        pages: saved,
        faults,
        bytes: (PAGES * PAGE) as u64,
        downtime: None,
        accel: None,
        note: format!(
            "{on_fault} pages saved on write faults, {} writes during the snapshot; snapshot == region at protection",
            writes.load(Ordering::Relaxed)
        ),
    })
}
