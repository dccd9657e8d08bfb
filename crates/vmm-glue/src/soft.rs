//! Software vCPUs: the built-in guest workloads run by host threads, for hosts without
//! KVM.
//!
//! Each soft vCPU executes the same workload the built-in KVM guests run (see
//! [`Workload`] and [`crate::guest::builtin`]: the same slices, the same
//! generator and address formula, the same balloon halves, markers and port
//! writes), one page step at a time, writing guest memory through vm-memory's
//! `Bytes` API. vm-memory's dirty bitmap therefore records every write, as KVM's dirty
//! log does for a real guest. On a postcopy destination the threads fault on missing
//! pages exactly as vCPUs do, because they touch the same host mappings. The vCPU
//! state (position, pass count, generator) is saved and restored like registers, so
//! the workload continues exactly where it stopped.
//!
//! Soft vCPUs are a stand-in for KVM and say so: [`Vcpus::accel`] returns `soft`, and
//! `demovm` prints it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::balloon::{self, COUNT_PORT, PFN_PORT};
use crate::guest::COM1;
use crate::io::IoHandler;
use crate::session::{ExitHandler, Section, StateError, Vcpus};
use crate::GuestMemoryMmap;

pub use crate::guest::Workload;

/// The workload's code in the saved state.
fn code(w: Workload) -> u8 {
    match w {
        Workload::Ab => 1,
        Workload::Random => 2,
        Workload::Idle => 3,
        Workload::Balloon => 4,
    }
}

const PAGE: u64 = 4096;
/// Version of the soft vCPU state format: per vCPU a section `soft.vcpu<i>`
/// of 41 bytes, the workload's code byte and five little-endian u64: slice
/// start and end, position, passes, generator state.
pub const STATE_VERSION: u32 = 1;
const STATE_LEN: usize = 1 + 5 * 8;
/// Prefix of the soft vCPU sections.
const SECTION_PREFIX: &str = "soft.vcpu";

/// One soft vCPU's architectural state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    start: u64,
    end: u64,
    cursor: u64,
    passes: u64,
    rng: u64,
}

struct Ctl {
    states: Vec<State>,
    parked: usize,
    exit: bool,
}

struct Shared {
    mem: Arc<GuestMemoryMmap>,
    io: Arc<dyn IoHandler>,
    workload: Workload,
    run: AtomicBool,
    /// Completed passes of each vCPU, readable while it runs.
    passes: Vec<AtomicU64>,
    /// Each vCPU thread's host thread id (0 until it started).
    tids: Vec<AtomicU32>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

/// The soft vCPUs of a VM.
pub struct SoftVcpus {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl SoftVcpus {
    /// Creates `count` vCPUs running `workload` over guest-physical `[start, end)`, each
    /// on its own contiguous slice, with port output to `io`. They start paused;
    /// [`Vcpus::resume`] runs them.
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        io: Arc<dyn IoHandler>,
        workload: Workload,
        count: usize,
        start: u64,
        end: u64,
    ) -> Result<Self, StateError> {
        let states: Vec<State> = crate::guest::slices(start, end, count)
            .map_err(|e| StateError::InvalidState(e.to_string()))?
            .into_iter()
            .zip(0u64..)
            .map(|((s, e), i)| State {
                start: s,
                end: e,
                cursor: s,
                passes: 0,
                rng: crate::guest::builtin::RANDOM_SEED ^ (i + 1),
            })
            .collect();
        let count = states.len();
        let shared = Arc::new(Shared {
            mem,
            io,
            workload,
            run: AtomicBool::new(false),
            passes: (0..count).map(|_| AtomicU64::new(0)).collect(),
            tids: (0..count).map(|_| AtomicU32::new(0)).collect(),
            ctl: Mutex::new(Ctl {
                states,
                parked: 0,
                exit: false,
            }),
            cv: Condvar::new(),
        });
        let threads = (0..count)
            .map(|i| {
                let sh = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("vcpu{i}"))
                    .spawn(move || vcpu_loop(&sh, i))
                    .map_err(|source| StateError::host("spawning a soft vCPU thread", source))
            })
            .collect::<Result<_, _>>()?;
        let v = SoftVcpus { shared, threads };
        v.wait_parked();
        Ok(v)
    }

    fn wait_parked(&self) {
        let mut ctl = self.shared.ctl.lock();
        while ctl.parked < self.threads.len() {
            self.shared.cv.wait(&mut ctl);
        }
    }

    /// Completed passes of each vCPU (`ab`, `balloon`), or writes (`random`): the
    /// guest's progress.
    pub fn passes(&self) -> Vec<u64> {
        self.shared
            .passes
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Increments the byte at `a`; false if it is not guest memory.
fn increment(sh: &Shared, a: u64) -> bool {
    let a = GuestAddress(a);
    match sh.mem.read_obj::<u8>(a) {
        Ok(b) => sh.mem.write_obj(b.wrapping_add(1), a).is_ok(),
        Err(_) => false,
    }
}

/// Ends a pass: back to the slice start, one more pass, `B` on COM1.
fn end_pass(sh: &Shared, i: usize, st: &mut State) {
    st.cursor = st.start;
    st.passes += 1;
    sh.passes[i].store(st.passes, Ordering::Relaxed);
    sh.io.pio_write(COM1, b"B");
}

/// One step of the workload. Guest memory errors cannot happen for in-range addresses;
/// were one to, the vCPU stops stepping rather than panic.
fn step(sh: &Shared, i: usize, st: &mut State) -> bool {
    match sh.workload {
        Workload::Ab => {
            if !increment(sh, st.cursor) {
                return false;
            }
            st.cursor += PAGE;
            if st.cursor >= st.end {
                end_pass(sh, i, st);
            }
            true
        }
        Workload::Balloon => {
            // A slice of fewer than two pages halts, as the KVM code does.
            let Some((_, (area, end))) = balloon::halves((st.start, st.end)) else {
                return false;
            };
            let wrote = if st.cursor < area {
                increment(sh, st.cursor)
            } else {
                // The marker of this pass: its number (from 0) + 1.
                sh.mem
                    .write_obj(st.passes + 1, GuestAddress(st.cursor))
                    .is_ok()
            };
            if !wrote {
                return false;
            }
            st.cursor += PAGE;
            if st.cursor >= end {
                // Guest RAM ends below 16 TiB, so page numbers fit the 32-bit ports.
                let pfn = u32::try_from(area / PAGE).unwrap_or(u32::MAX);
                let count = u32::try_from((end - area) / PAGE).unwrap_or(u32::MAX);
                sh.io.pio_write(PFN_PORT, &pfn.to_le_bytes());
                sh.io.pio_write(COUNT_PORT, &count.to_le_bytes());
                end_pass(sh, i, st);
            }
            true
        }
        Workload::Random => {
            let pages = (st.end - st.start) / PAGE;
            let r = xorshift(&mut st.rng);
            let page = r % pages;
            let off = (r >> 40) % (PAGE / 8) * 8;
            st.passes += 1;
            sh.passes[i].store(st.passes, Ordering::Relaxed);
            sh.mem
                .write_obj(r, GuestAddress(st.start + page * PAGE + off))
                .is_ok()
        }
        Workload::Idle => false,
    }
}

fn vcpu_loop(sh: &Shared, i: usize) {
    sh.tids[i].store(crate::thread_id(), Ordering::Relaxed);
    let mut st = sh.ctl.lock().states[i];
    loop {
        if !sh.run.load(Ordering::Acquire) {
            let mut ctl = sh.ctl.lock();
            ctl.states[i] = st;
            ctl.parked += 1;
            sh.cv.notify_all();
            while !sh.run.load(Ordering::Acquire) && !ctl.exit {
                sh.cv.wait(&mut ctl);
            }
            if ctl.exit {
                return;
            }
            ctl.parked -= 1;

            // The state may have been restored while parked.
            st = ctl.states[i];
            continue;
        }
        if !step(sh, i, &mut st) {
            // Nothing to do (idle guest): wait for a pause rather than spin.
            let mut ctl = sh.ctl.lock();
            while sh.run.load(Ordering::Acquire) && !ctl.exit {
                sh.cv.wait(&mut ctl);
            }
        }
    }
}

impl Vcpus for SoftVcpus {
    fn accel(&self) -> &str {
        "soft"
    }

    fn count(&self) -> usize {
        self.threads.len()
    }

    fn resume(&self) -> Result<(), StateError> {
        let ctl = self.shared.ctl.lock();
        self.shared.run.store(true, Ordering::Release);
        self.shared.cv.notify_all();
        drop(ctl);
        Ok(())
    }

    fn pause(&self) -> Result<(), StateError> {
        {
            let _ctl = self.shared.ctl.lock();
            self.shared.run.store(false, Ordering::Release);
            self.shared.cv.notify_all();
        }
        self.wait_parked();
        Ok(())
    }

    fn running(&self) -> bool {
        self.shared.run.load(Ordering::Acquire)
    }

    fn save_state(&self) -> Result<Vec<Section>, StateError> {
        if self.running() {
            return Err(StateError::InvalidState(
                "soft vCPUs must be paused to save them".into(),
            ));
        }
        let ctl = self.shared.ctl.lock();
        Ok(ctl
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut v = Vec::with_capacity(STATE_LEN);
                v.push(code(self.shared.workload));
                for w in [s.start, s.end, s.cursor, s.passes, s.rng] {
                    v.extend_from_slice(&w.to_le_bytes());
                }
                Section::new(format!("{SECTION_PREFIX}{i}"), STATE_VERSION, v)
            })
            .collect())
    }

    fn restore_state(&self, sections: &[Section]) -> Result<(), StateError> {
        if self.running() {
            return Err(StateError::InvalidState(
                "soft vCPUs must be paused to restore them".into(),
            ));
        }
        let n = self.threads.len();
        if let Some(other) = sections
            .iter()
            .find(|s| !s.name.starts_with(SECTION_PREFIX))
        {
            return Err(StateError::incompatible(
                "vCPUs",
                format!(
                    "the source sent vCPU state {:?}, not a soft vCPU's: this VM runs soft vCPUs",
                    other.name
                ),
            ));
        }
        if sections.len() != n {
            return Err(StateError::incompatible(
                "vCPUs",
                format!("the source has {} soft vCPUs, this VM {n}", sections.len()),
            ));
        }
        let mut ctl = self.shared.ctl.lock();
        let mut states = Vec::with_capacity(n);
        for (i, mine) in ctl.states.iter().enumerate() {
            let what = format!("{SECTION_PREFIX}{i}");
            let sec = sections
                .iter()
                .find(|s| s.name == what)
                .ok_or_else(|| StateError::malformed(&what, "missing"))?;
            if sec.version != STATE_VERSION {
                return Err(StateError::malformed(
                    &what,
                    format!("version {}, this side reads {STATE_VERSION}", sec.version),
                ));
            }
            let data = &sec.data;
            if data.len() != STATE_LEN {
                return Err(StateError::malformed(
                    &what,
                    format!("{} bytes, expected {STATE_LEN}", data.len()),
                ));
            }
            if data[0] != code(self.shared.workload) {
                return Err(StateError::incompatible(
                    &what,
                    "the source ran a different built-in guest",
                ));
            }
            let word = |k: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[1 + 8 * k..9 + 8 * k]);
                u64::from_le_bytes(b)
            };
            let s = State {
                start: word(0),
                end: word(1),
                cursor: word(2),
                passes: word(3),
                rng: word(4),
            };
            if (s.start, s.end) != (mine.start, mine.end) || s.cursor < s.start || s.cursor >= s.end
            {
                return Err(StateError::incompatible(
                    &what,
                    "its slice or position does not fit this VM's memory",
                ));
            }
            states.push(s);
        }
        for (p, s) in self.shared.passes.iter().zip(&states) {
            p.store(s.passes, Ordering::Relaxed);
        }
        ctl.states = states;
        Ok(())
    }

    fn thread_ids(&self) -> Vec<u32> {
        self.shared
            .tids
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect()
    }

    fn set_exit_handler(&self, _handler: ExitHandler) {
        // Soft vCPUs run workloads that never stop on their own.
    }
}

impl Drop for SoftVcpus {
    fn drop(&mut self) {
        {
            let mut ctl = self.shared.ctl.lock();
            ctl.exit = true;
            self.shared.run.store(false, Ordering::Release);
            self.shared.cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::guest::ab_check;
    use crate::session::ErrorKind;

    const HIGH_RAM_START: u64 = 0x10_0000;
    const MEM: u64 = 4 << 20;

    /// Counts the bytes written to COM1.
    #[derive(Default)]
    struct Com1Count(AtomicU64);

    impl IoHandler for Com1Count {
        fn pio_read(&self, _: u16, _: &mut [u8]) -> bool {
            false
        }
        fn pio_write(&self, port: u16, data: &[u8]) -> bool {
            if port == COM1 {
                self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            port == COM1
        }
        fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
            false
        }
        fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
            false
        }
    }

    fn guest_memory() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0xa_0000),
                (
                    GuestAddress(HIGH_RAM_START),
                    (MEM - HIGH_RAM_START) as usize,
                ),
            ])
            .unwrap(),
        )
    }

    /// `count` vCPUs running `workload` over the whole high RAM of `mem`.
    fn vcpus(
        mem: &Arc<GuestMemoryMmap>,
        io: &Arc<Com1Count>,
        workload: Workload,
        count: usize,
    ) -> SoftVcpus {
        SoftVcpus::new(
            Arc::clone(mem),
            Arc::clone(io) as Arc<dyn IoHandler>,
            workload,
            count,
            HIGH_RAM_START,
            MEM,
        )
        .unwrap()
    }

    fn first_bytes(mem: &GuestMemoryMmap) -> Vec<u8> {
        (HIGH_RAM_START..MEM)
            .step_by(PAGE as usize)
            .map(|a| mem.read_obj::<u8>(GuestAddress(a)).unwrap())
            .collect()
    }

    fn run_until(v: &SoftVcpus, passes: u64) {
        let t = Instant::now();
        while v.passes().iter().any(|&p| p < passes) {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "hang guard: vCPUs made no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn ab_survives_save_and_restore_into_another_vm() {
        let mem = guest_memory();
        let io = Arc::new(Com1Count::default());
        let v = vcpus(&mem, &io, Workload::Ab, 2);
        assert!(!v.running());
        let tids = v.thread_ids();
        assert!(
            tids.len() == 2 && tids[0] != 0 && tids[0] != tids[1],
            "{tids:?}"
        );
        v.resume().unwrap();
        run_until(&v, 3);
        v.pause().unwrap();
        let bytes = first_bytes(&mem);
        ab_check(&bytes, 2).unwrap();
        assert_eq!(
            io.0.load(Ordering::Relaxed),
            v.passes().iter().sum::<u64>(),
            "one B per pass"
        );
        let state = v.save_state().unwrap();
        assert_eq!(state.len(), 2, "one section per vCPU");

        // A second VM with a copy of memory and the saved state continues exactly.
        let mem2 = guest_memory();
        for a in (HIGH_RAM_START..MEM).step_by(PAGE as usize) {
            mem2.write_obj(
                mem.read_obj::<u8>(GuestAddress(a)).unwrap(),
                GuestAddress(a),
            )
            .unwrap();
        }
        let v2 = vcpus(&mem2, &Arc::new(Com1Count::default()), Workload::Ab, 2);
        v2.restore_state(&state).unwrap();
        let before = v2.passes();
        v2.resume().unwrap();
        run_until(&v2, before.iter().max().unwrap() + 2);
        v2.pause().unwrap();
        ab_check(&first_bytes(&mem2), 2).unwrap();
        // The first VM's memory is untouched by the second.
        assert_eq!(first_bytes(&mem), bytes);
    }

    #[test]
    fn bad_states_are_refused() {
        let mem = guest_memory();
        let io = Arc::new(Com1Count::default());
        let v = vcpus(&mem, &io, Workload::Ab, 2);
        let state = v.save_state().unwrap();
        let kind = |r: Result<(), StateError>| r.unwrap_err().kind();
        let mut newer = state.clone();
        newer[0].version += 1;
        assert_eq!(kind(v.restore_state(&newer)), ErrorKind::Protocol);
        let mut short = state.clone();
        short[1].data.pop();
        assert_eq!(kind(v.restore_state(&short)), ErrorKind::Protocol);
        let one = vcpus(&mem, &io, Workload::Ab, 1);
        assert_eq!(
            kind(one.restore_state(&state)),
            ErrorKind::Local,
            "vCPU count differs"
        );
        let rnd = vcpus(&mem, &io, Workload::Random, 2);
        assert_eq!(
            kind(rnd.restore_state(&state)),
            ErrorKind::Local,
            "workload differs"
        );
        let mut kvm = state.clone();
        kvm[0].name = "kvm.vcpu0.regs".into();
        let e = v.restore_state(&kvm).unwrap_err();
        assert!(e.to_string().contains("soft"), "{e}");
        let mut bad = state.clone();
        bad[0].data[1 + 16..1 + 24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(v.restore_state(&bad).is_err(), "cursor outside the slice");
        v.resume().unwrap();
        assert!(v.save_state().is_err(), "running vCPUs are not saved");
        v.pause().unwrap();
    }

    #[test]
    fn writes_are_recorded_in_the_dirty_bitmap() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        let mem = guest_memory();
        let v = vcpus(&mem, &Arc::new(Com1Count::default()), Workload::Ab, 1);
        v.resume().unwrap();
        run_until(&v, 1);
        v.pause().unwrap();
        let high = mem.iter().nth(1).unwrap();
        let dirty = (0..(MEM - HIGH_RAM_START) as usize)
            .step_by(PAGE as usize)
            .filter(|&o| high.bitmap().dirty_at(o))
            .count();
        assert_eq!(
            dirty as u64,
            (MEM - HIGH_RAM_START) / PAGE,
            "every page written is dirty"
        );
    }
}
