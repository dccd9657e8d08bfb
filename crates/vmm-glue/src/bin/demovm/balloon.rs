//! The balloon of `demovm`: a minimal paravirtual balloon on two I/O ports, through
//! which a guest gives memory back to the host.
//!
//! The port protocol is the one of `vmm_glue::guest::balloon` (which the
//! `builtin:balloon` guest speaks): a 4-byte write to port `0x600` sets the writing
//! vCPU's PFN register (first page frame number of a range), and a 4-byte write of a
//! page count to port `0x604` is a request to take back `count` pages from there.
//! Each vCPU has its own PFN register, so vCPUs need no lock between their two
//! writes; the device tells them apart by host thread (`Vcpus::thread_ids`,
//! known once the vCPUs exist: their threads live as long as they do).
//!
//! ```text
//!  count written to 0x604
//!        |
//!   range [PFN << 12, +count pages) all guest RAM, count > 0? --no--> refused
//!        | yes
//!   inhibited (a postcopy migration runs)? --yes--> dropped (pages keep their data)
//!        | no
//!   zero every page through vm-memory's Bytes API --> honoured, pages given back
//! ```
//!
//! Giving a page back zeroes it through vm-memory, so vm-memory's dirty bitmap
//! records it and a precopy migration running meanwhile resends it: the destination
//! sees the zeros. (A real discard, `MADV_DONTNEED` or a hole punched in the memfd,
//! which frees host memory, is planned once `uffd-sys` offers it for guest memory.)
//! While a postcopy migration runs, the destination fills pages on demand and a
//! discard at the source would be lost or undo a page already placed; QEMU inhibits
//! its balloon then, and so does this one: [`BalloonInhibitor`] says when. The guest is
//! told nothing either way. Other writes to the two ports (another size) and every
//! read are not handled, and count as unhandled I/O like any other port.
//!
//! Counters (requests, honoured, dropped, refused, pages given back) are this
//! process's and do not migrate; the PFN registers are device state (section
//! `balloon`): a vCPU paused between its two writes completes its request on the
//! destination.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use migration_ram::balloon::{BalloonInhibitor, InhibitGuard};
use parking_lot::Mutex;
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_glue::guest::balloon::{COUNT_PORT, PFN_PORT};
use vmm_glue::session::{DeviceState, StateError};
use vmm_glue::GuestMemoryMmap;

/// The size of a balloon page: a page frame number counts these.
const PAGE: u64 = 4096;
/// Version of the `balloon` section: the vCPU count (u32), then each vCPU's PFN
/// register (u32), little-endian.
const STATE_VERSION: u32 = 1;
/// Zeros written per call when a range is given back.
const ZERO_CHUNK: usize = 64 << 10;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// The operator's hold on the balloon inhibitor (QMP `x-balloon-inhibit`):
/// the same inhibitor the session holds while a postcopy migration runs.
pub struct OperatorInhibit {
    inhibitor: Arc<BalloonInhibitor>,
    guard: Mutex<Option<InhibitGuard>>,
}

impl OperatorInhibit {
    /// A hold on `inhibitor`, released at first.
    pub fn new(inhibitor: Arc<BalloonInhibitor>) -> Self {
        OperatorInhibit {
            inhibitor,
            guard: Mutex::new(None),
        }
    }

    /// Holds the inhibitor (`true`) or releases the operator's hold.
    pub fn set(&self, inhibit: bool) {
        let mut g = self.guard.lock();
        match (inhibit, g.is_some()) {
            (true, false) => *g = Some(self.inhibitor.inhibit()),
            (false, true) => *g = None,
            _ => {}
        }
    }
}

/// What the balloon did with the requests it got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests (writes of a page count).
    pub requests: u64,
    /// Requests whose pages were given back.
    pub honoured: u64,
    /// Requests dropped because the balloon was inhibited.
    pub dropped: u64,
    /// Requests refused: a range that is not all guest RAM, no pages, or a writer
    /// that is no vCPU.
    pub refused: u64,
    /// Pages given back (zeroed) by honoured requests.
    pub pages_given_back: u64,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The write came from a thread that is not a vCPU of this VM.
    #[error("balloon request from a thread that is no vCPU of this VM")]
    NotAVcpu,
    /// The range is empty or not all guest RAM.
    #[error("vCPU {vcpu}: balloon request for {pages} page(s) at {start:#x}: not all guest RAM")]
    OutsideRam {
        /// The requesting vCPU.
        vcpu: usize,
        /// First byte of the range.
        start: u64,
        /// Pages asked for.
        pages: u32,
    },
    /// Zeroing failed (cannot happen once the range is checked).
    #[error("vCPU {vcpu}: zeroing the balloon range at {addr:#x}")]
    Zero {
        /// The requesting vCPU.
        vcpu: usize,
        /// Where it failed.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The balloon device.
pub struct Balloon {
    mem: Arc<GuestMemoryMmap>,
    inhibitor: Arc<BalloonInhibitor>,
    /// Each vCPU's host thread id, to tell them apart; set once they exist.
    threads: OnceLock<Vec<u32>>,
    /// Each vCPU's PFN register.
    pfn: Vec<AtomicU32>,
    counters: Mutex<Counters>,
}

thread_local! {
    /// This thread's host thread id, read once.
    static THREAD_ID: u32 = vmm_glue::thread_id();
}

impl Balloon {
    /// A balloon over `mem` for `vcpus` vCPUs, which gives memory back only
    /// with a permit of `inhibitor` (the session's: none while postcopy runs).
    /// It tells vCPUs apart once [`Balloon::attach`] gave it their threads.
    pub fn new(mem: Arc<GuestMemoryMmap>, vcpus: usize, inhibitor: Arc<BalloonInhibitor>) -> Self {
        Balloon {
            mem,
            inhibitor,
            threads: OnceLock::new(),
            pfn: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
            counters: Mutex::new(Counters::default()),
        }
    }

    /// The host thread ids of the vCPUs whose writes this balloon serves, in vCPU
    /// order (`Vcpus::thread_ids`; 0 for a thread not known, whose requests are then
    /// refused). Later calls change nothing: a vCPU keeps its thread for life.
    pub fn attach(&self, thread_ids: Vec<u32>) {
        if let Some(i) = thread_ids.iter().position(|&t| t == 0) {
            log::warn!("balloon: vCPU {i}'s thread is not known: its requests will be refused");
        }
        let _ = self.threads.set(thread_ids);
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        *self.counters.lock()
    }

    /// Whether requests are dropped now.
    pub fn inhibited(&self) -> bool {
        self.inhibitor.is_inhibited()
    }

    /// The index of the vCPU running on this thread.
    fn this_vcpu(&self) -> Option<usize> {
        let tid = THREAD_ID.with(|t| *t);
        let i = self
            .threads
            .get()?
            .iter()
            .position(|&t| t == tid && t != 0)?;
        (i < self.pfn.len()).then_some(i)
    }

    /// A guest write to `port`: whether the balloon handled it.
    pub fn port_write(&self, port: u16, data: &[u8]) -> bool {
        let value = match <[u8; 4]>::try_from(data) {
            Ok(v) if port == PFN_PORT || port == COUNT_PORT => u32::from_le_bytes(v),
            _ => return false,
        };
        let vcpu = self.this_vcpu();
        if port == PFN_PORT {
            match vcpu {
                Some(v) => self.pfn[v].store(value, Ordering::Relaxed),
                None => log::warn!("{}: PFN write ignored", Refusal::NotAVcpu),
            }
            return true;
        }
        let outcome = self.request(vcpu, value);
        let mut c = self.counters.lock();
        c.requests += 1;
        match outcome {
            Ok(Some(pages)) => {
                c.honoured += 1;
                c.pages_given_back += u64::from(pages);
            }
            Ok(None) => c.dropped += 1,
            Err(e) => {
                c.refused += 1;
                // A guest may refuse itself in a loop: log the 1st, 2nd, 4th, ...
                if c.refused.is_power_of_two() {
                    log::warn!("{} (refusal #{})", vmm_glue::error_chain(&e), c.refused);
                }
            }
        }
        true
    }

    /// Serves a request for `count` pages: `Some(pages)` given back, `None` dropped.
    fn request(&self, vcpu: Option<usize>, count: u32) -> Result<Option<u32>, Refusal> {
        let vcpu = vcpu.ok_or(Refusal::NotAVcpu)?;
        let start = u64::from(self.pfn[vcpu].load(Ordering::Relaxed)) * PAGE;
        let len = u64::from(count) * PAGE;
        let inside = usize::try_from(len)
            .is_ok_and(|l| l > 0 && self.mem.check_range(GuestAddress(start), l));
        if !inside {
            return Err(Refusal::OutsideRam {
                vcpu,
                start,
                pages: count,
            });
        }
        // The permit is held across the give-back, so a postcopy switch
        // cannot start halfway through it.
        let Some(_permit) = self.inhibitor.try_discard() else {
            return Ok(None);
        };
        if self.discard(start, len).is_err() {
            // A range the backing cannot drop (4 KiB of a 2 MiB huge page):
            // zeros, written through vm-memory, which records them.
            let end = start + len;
            let mut addr = start;
            while addr < end {
                let n = usize::try_from(end - addr).map_or(ZERO_CHUNK, |left| left.min(ZERO_CHUNK));
                self.mem
                    .write_slice(&ZEROS[..n], GuestAddress(addr))
                    .map_err(|source| Refusal::Zero { vcpu, addr, source })?;
                addr += n as u64;
            }
        }
        Ok(Some(count))
    }

    /// Gives `[start, start + len)` back to the host (`MADV_DONTNEED`, or a hole
    /// in a memfd) and marks it dirty in vm-memory's bitmap: KVM's dirty log
    /// does not see it, and a precopy migration must send those pages again
    /// (as zero pages).
    fn discard(&self, start: u64, len: u64) -> Result<(), String> {
        let n = usize::try_from(len).map_err(|e| e.to_string())?;
        uffd_sys::host_memory::discard_guest(&self.mem, GuestAddress(start), n)
            .map_err(|e| e.to_string())?;
        let region = self
            .mem
            .find_region(GuestAddress(start))
            .ok_or("not in guest memory")?;
        let offset = usize::try_from(start - region.start_addr().0).map_err(|e| e.to_string())?;
        region.bitmap().mark_dirty(offset, n);
        Ok(())
    }
}

impl DeviceState for Balloon {
    fn name(&self) -> &str {
        "balloon"
    }

    fn version(&self) -> u32 {
        STATE_VERSION
    }

    fn save(&self) -> Result<Vec<u8>, StateError> {
        let n = u32::try_from(self.pfn.len())
            .map_err(|_| StateError::InvalidState("more vCPUs than a u32 counts".into()))?;
        let mut v = n.to_le_bytes().to_vec();
        for p in &self.pfn {
            v.extend_from_slice(&p.load(Ordering::Relaxed).to_le_bytes());
        }
        Ok(v)
    }

    fn load(&self, version: u32, data: &[u8]) -> Result<(), StateError> {
        if version != STATE_VERSION {
            return Err(StateError::malformed(
                "balloon",
                format!("version {version}, this side reads {STATE_VERSION}"),
            ));
        }
        let words: Vec<u32> = data
            .chunks(4)
            .map(|c| <[u8; 4]>::try_from(c).map(u32::from_le_bytes))
            .collect::<Result<_, _>>()
            .map_err(|_| StateError::malformed("balloon", format!("{} bytes", data.len())))?;
        let Some((&n, regs)) = words.split_first() else {
            return Err(StateError::malformed("balloon", "empty"));
        };
        if usize::try_from(n).ok() != Some(regs.len()) {
            return Err(StateError::malformed(
                "balloon",
                format!("{n} vCPUs announced, {} PFN registers sent", regs.len()),
            ));
        }
        if regs.len() != self.pfn.len() {
            return Err(StateError::incompatible(
                "balloon",
                format!(
                    "the source has {} vCPUs, this VM {}",
                    regs.len(),
                    self.pfn.len()
                ),
            ));
        }
        for (p, &v) in self.pfn.iter().zip(regs) {
            p.store(v, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use vm_memory::GuestMemoryRegion;

    use super::*;

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0xa_0000),
                (GuestAddress(0x10_0000), 0x30_0000),
            ])
            .unwrap(),
        )
    }

    /// A balloon whose vCPU 0 is this thread, asking `inhibitor`.
    fn balloon(inhibitor: Arc<BalloonInhibitor>) -> Balloon {
        let b = Balloon::new(memory(), 1, inhibitor);
        b.attach(vec![vmm_glue::thread_id()]);
        b
    }

    fn ask(b: &Balloon, addr: u64, pages: u32) {
        assert!(b.port_write(PFN_PORT, &u32::try_from(addr / PAGE).unwrap().to_le_bytes()));
        assert!(b.port_write(COUNT_PORT, &pages.to_le_bytes()));
    }

    #[test]
    fn a_request_zeroes_its_pages_and_marks_them_dirty() {
        use vm_memory::bitmap::Bitmap;
        let b = balloon(Arc::default());
        let mem = Arc::clone(&b.mem);
        for a in (0x20_0000..0x20_4000).step_by(4096) {
            mem.write_obj(0xfeed_u64, GuestAddress(a)).unwrap();
        }
        let high = mem.iter().nth(1).unwrap();
        vm_memory::MmapRegion::bitmap(high).reset();
        ask(&b, 0x20_1000, 2);
        let words: Vec<u64> = (0x20_0000..0x20_4000)
            .step_by(4096)
            .map(|a| mem.read_obj(GuestAddress(a)).unwrap())
            .collect();
        assert_eq!(words, [0xfeed, 0, 0, 0xfeed], "exactly the two pages");
        for (off, dirty) in [
            (0x10_0000, false),
            (0x10_1000, true),
            (0x10_2000, true),
            (0x10_3000, false),
        ] {
            assert_eq!(high.bitmap().dirty_at(off), dirty, "offset {off:#x}");
        }
        assert_eq!(
            b.counters(),
            Counters {
                requests: 1,
                honoured: 1,
                pages_given_back: 2,
                ..Counters::default()
            }
        );
    }

    #[test]
    fn inhibited_requests_are_dropped_and_counted() {
        let inhibitor = Arc::new(BalloonInhibitor::new());
        let guard = inhibitor.inhibit();
        let b = balloon(Arc::clone(&inhibitor));
        b.mem.write_obj(7u64, GuestAddress(0x20_0000)).unwrap();
        assert!(b.inhibited());
        ask(&b, 0x20_0000, 1);
        ask(&b, 0x20_0000, 1);
        assert_eq!(b.mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 7);
        drop(guard);
        ask(&b, 0x20_0000, 1);
        assert_eq!(b.mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 0);
        let c = b.counters();
        assert_eq!((c.requests, c.dropped, c.honoured), (3, 2, 1), "{c:?}");
    }

    #[test]
    fn ranges_outside_ram_are_refused() {
        let b = balloon(Arc::default());
        // Across the hole, past the top, empty, and a PFN overflowing nothing.
        ask(&b, 0x9_f000, 2);
        ask(&b, 0x3f_f000, 2);
        ask(&b, 0x20_0000, 0);
        assert!(b.port_write(PFN_PORT, &u32::MAX.to_le_bytes()));
        assert!(b.port_write(COUNT_PORT, &u32::MAX.to_le_bytes()));
        let c = b.counters();
        assert_eq!((c.requests, c.refused, c.honoured), (4, 4, 0), "{c:?}");
        // The last page of RAM is fine.
        ask(&b, 0x3f_f000, 1);
        assert_eq!(b.counters().honoured, 1);
    }

    #[test]
    fn other_writes_are_not_the_balloons() {
        let b = balloon(Arc::default());
        assert!(!b.port_write(PFN_PORT, &[1]), "a byte write");
        assert!(!b.port_write(COUNT_PORT, &[1, 0]), "a word write");
        assert!(!b.port_write(PFN_PORT + 1, &[0; 4]));
        assert!(!b.port_write(0x3f8, &[0; 4]));
        assert_eq!(b.counters(), Counters::default());
        // A thread that is no vCPU is refused.
        let b = Arc::new(b);
        let b2 = Arc::clone(&b);
        std::thread::spawn(move || assert!(b2.port_write(COUNT_PORT, &1u32.to_le_bytes())))
            .join()
            .unwrap();
        assert_eq!(b.counters().refused, 1);
    }

    #[test]
    fn pfn_registers_migrate() {
        let a = balloon(Arc::default());
        assert!(a.port_write(PFN_PORT, &0x200u32.to_le_bytes()));
        let state = a.save().unwrap();
        let b = balloon(Arc::default());
        b.load(STATE_VERSION, &state).unwrap();
        // The destination's vCPU completes the request the source's began.
        b.mem.write_obj(9u64, GuestAddress(0x20_0000)).unwrap();
        assert!(b.port_write(COUNT_PORT, &1u32.to_le_bytes()));
        assert_eq!(b.mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 0);
        assert!(b.load(STATE_VERSION + 1, &state).is_err());
        assert!(b.load(STATE_VERSION, &state[..6]).is_err());
        let two = [2u32, 1, 1]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect::<Vec<_>>();
        let e = b.load(STATE_VERSION, &two).unwrap_err();
        assert!(e.to_string().contains("2 vCPUs"), "{e}");
    }
}
