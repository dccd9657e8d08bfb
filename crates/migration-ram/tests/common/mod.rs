//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use migration_ram::{
    DirtyLog, GuestMemoryMmap, PrecopyLoader, RamBlocks, RamStats, Result, TakenPages,
};
use migration_stream::{Error as StreamError, Record, StreamReader};
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const PAGE: u64 = 4096;
pub const NAMES: [&str; 2] = ["pc.ram", "pc.ram.high"];

/// Guest memory below and above a hole: `[0, low)` and `[1 MiB, 1 MiB +
/// high)`.
pub fn memory(low: usize, high: usize) -> Arc<GuestMemoryMmap> {
    Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), low), (GuestAddress(1 << 20), high)])
            .unwrap(),
    )
}

/// The same layout as `mem`, fresh.
pub fn fresh_like(mem: &GuestMemoryMmap) -> Arc<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = mem
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    Arc::new(GuestMemoryMmap::from_ranges(&ranges).unwrap())
}

pub fn blocks(mem: &GuestMemoryMmap) -> RamBlocks {
    RamBlocks::from_guest_memory(mem, &NAMES).unwrap()
}

/// Deterministic page contents: every `zero_every`-th page is zero, the
/// others a pattern of the page's address and `seed`.
pub fn fill(mem: &GuestMemoryMmap, zero_every: u64, seed: u64) {
    let mut buf = vec![0u8; PAGE as usize];
    for r in mem.iter() {
        for p in 0..r.len() / PAGE {
            let addr = r.start_addr().0 + p * PAGE;
            if p % zero_every == 0 {
                buf.fill(0);
            } else {
                pattern(&mut buf, addr ^ seed);
            }
            mem.write_slice(&buf, GuestAddress(addr)).unwrap();
        }
    }
}

pub fn pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// The bytes of every region.
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).unwrap();
            v
        })
        .collect()
}

/// Asserts two memories are equal, naming the first differing page.
pub fn assert_same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) {
    for (i, (x, y)) in snapshot(a).iter().zip(snapshot(b)).enumerate() {
        if let Some(p) = x
            .chunks(PAGE as usize)
            .zip(y.chunks(PAGE as usize))
            .position(|(u, v)| u != v)
        {
            panic!("region {i}: page {p} differs");
        }
    }
}

/// Pages (block index, page) whose contents differ between `a` and `b`.
pub fn differing_pages(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    for (i, (x, y)) in snapshot(a).iter().zip(snapshot(b)).enumerate() {
        for (p, (u, v)) in x
            .chunks(PAGE as usize)
            .zip(y.chunks(PAGE as usize))
            .enumerate()
        {
            if u != v {
                out.push((i, p as u64));
            }
        }
    }
    out
}

/// Loads a possibly cut stream into `dst` until it ends or breaks;
/// returns how it ended.
pub fn load_partial(dst: &Arc<GuestMemoryMmap>, stream: &[u8]) -> StreamEnd {
    let mut loader = PrecopyLoader::new(dst.clone(), blocks(dst), Arc::new(RamStats::new()));
    let mut r = StreamReader::new(stream);
    match loader.load(&mut r) {
        Ok(Record::Complete) => StreamEnd::Complete,
        Ok(other) => panic!("unexpected record {other:?}"),
        Err(migration_ram::Error::Stream(StreamError::Closed)) => StreamEnd::Closed,
        Err(e) if e.is_disconnect() => StreamEnd::Cut,
        Err(e) => panic!("stream error {e:?}"),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    Complete,
    Closed,
    Cut,
}

/// Called with the number of `clear` calls so far (from 1).
pub type ClearHook = Box<dyn FnMut(usize) + Send>;

/// A dirty log that forwards to another and records the chunks cleared,
/// optionally running a hook on each `clear`.
pub struct Recording<L> {
    pub inner: L,
    pub clears: Mutex<Vec<(usize, u64, u64)>>,
    pub on_clear: Mutex<Option<ClearHook>>,
    pub stopped: AtomicBool,
}

impl<L: DirtyLog> Recording<L> {
    pub fn new(inner: L) -> Self {
        Recording {
            inner,
            clears: Mutex::new(Vec::new()),
            on_clear: Mutex::new(None),
            stopped: AtomicBool::new(false),
        }
    }
}

impl<L: DirtyLog> DirtyLog for Recording<L> {
    fn start(&self) -> Result<()> {
        self.inner.start()
    }
    fn sync(&self, blocks: &RamBlocks) -> Result<u64> {
        self.inner.sync(blocks)
    }
    fn clear(&self, index: usize, pages: &TakenPages) -> Result<()> {
        let count = {
            let mut c = self.clears.lock();
            c.push((index, pages.start(), pages.end() - pages.start()));
            c.len()
        };
        if let Some(hook) = self.on_clear.lock().as_mut() {
            hook(count);
        }
        self.inner.clear(index, pages)
    }
    fn stop(&self) -> Result<()> {
        self.stopped.store(true, Ordering::SeqCst);
        self.inner.stop()
    }
}

/// A thread writing pages of `mem` (`pages`: guest addresses) round robin
/// until stopped; every 5th write is zeros, so pages go from data to zero
/// and back. Returns the stop flag, the write counter and the handle.
pub struct Dirtier {
    pub stop: Arc<AtomicBool>,
    pub writes: Arc<std::sync::atomic::AtomicU64>,
    pub handle: Option<std::thread::JoinHandle<()>>,
}

impl Dirtier {
    pub fn start(mem: Arc<GuestMemoryMmap>, pages: Vec<u64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, n) = (stop.clone(), writes.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = vec![0u8; PAGE as usize];
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let addr = pages[(i as usize * 7919) % pages.len()];
                if i % 5 == 0 {
                    buf.fill(0);
                } else {
                    pattern(&mut buf, addr ^ (i << 32));
                }
                mem.write_slice(&buf, GuestAddress(addr)).unwrap();
                i += 1;
                n.store(i, Ordering::Relaxed);
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        Dirtier {
            stop,
            writes,
            handle: Some(handle),
        }
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn wait_for(&self, n: u64) {
        while self.writes() < n {
            std::thread::yield_now();
        }
    }

    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.writes()
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Guest addresses of every page of `mem`.
pub fn all_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    mem.iter()
        .flat_map(|r| {
            let start = r.start_addr().0;
            (0..r.len() / PAGE).map(move |p| start + p * PAGE)
        })
        .collect()
}
