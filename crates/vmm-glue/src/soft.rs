//! Software vCPUs: the built-in guest workloads run by host threads, for hosts without
//! KVM.
//!
//! Each soft vCPU executes the same workload the built-in KVM guests run (see
//! [`Workload`]), one page step at a time, writing guest memory through vm-memory's
//! `Bytes` API. vm-memory's dirty bitmap therefore records every write, as KVM's dirty
//! log does for a real guest. On a postcopy destination the threads fault on missing
//! pages exactly as vCPUs do, because they touch the same host mappings. The vCPU
//! state (position, pass count, generator) is saved and restored like registers, so
//! the workload continues exactly where it stopped.
//!
//! Soft vCPUs are a stand-in for KVM and say so: [`Vcpus::accel`] returns `soft`, and
//! `demovm` prints it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress};

use crate::serial::Serial;
use crate::vcpu::{VcpuError, Vcpus};
use crate::GuestMemoryMmap;

/// A built-in guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Increments the first byte of every 4 KiB page of the vCPU's slice in an endless
    /// loop and writes `B` to COM1 after each pass.
    Ab,
    /// Writes 8-byte values to pseudo-random pages of the slice as fast as it can.
    Random,
    /// Does nothing (a halted guest).
    Idle,
}

impl Workload {
    /// Parses `ab`, `random` or `idle`.
    pub fn parse(s: &str) -> Option<Workload> {
        match s {
            "ab" => Some(Workload::Ab),
            "random" => Some(Workload::Random),
            "idle" => Some(Workload::Idle),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Workload::Ab => 1,
            Workload::Random => 2,
            Workload::Idle => 3,
        }
    }
}

const PAGE: u64 = 4096;
/// Version of the soft vCPU state format.
pub const STATE_VERSION: u32 = 1;
const PER_VCPU: usize = 5 * 8;

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
    serial: Arc<Serial>,
    workload: Workload,
    run: AtomicBool,
    /// Completed passes of each vCPU, readable while it runs.
    passes: Vec<AtomicU64>,
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
    /// on its own contiguous slice. They start paused; [`Vcpus::resume`] runs them.
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        serial: Arc<Serial>,
        workload: Workload,
        count: usize,
        start: u64,
        end: u64,
    ) -> Result<Self, VcpuError> {
        let count = count.max(1);
        let pages = (end.saturating_sub(start)) / PAGE;
        if pages < count as u64 {
            return Err(VcpuError::Unsupported(format!(
                "{count} vCPUs need at least {count} pages of workload memory"
            )));
        }
        let per = pages / count as u64;
        let states = (0..count as u64)
            .map(|i| {
                let s = start + i * per * PAGE;
                let e = if i + 1 == count as u64 {
                    start + pages * PAGE
                } else {
                    s + per * PAGE
                };
                State {
                    start: s,
                    end: e,
                    cursor: s,
                    passes: 0,
                    rng: 0x9e37_79b9_7f4a_7c15 ^ (i + 1),
                }
            })
            .collect();
        let shared = Arc::new(Shared {
            mem,
            serial,
            workload,
            run: AtomicBool::new(false),
            passes: (0..count).map(|_| AtomicU64::new(0)).collect(),
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
                    .map_err(|source| VcpuError::Accel {
                        op: "spawning a vCPU thread",
                        source,
                    })
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

    /// Completed passes of each vCPU (`ab`), or writes (`random`): the guest's progress.
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

/// One step of the workload. Guest memory errors cannot happen for in-range addresses;
/// were one to, the vCPU stops stepping rather than panic.
fn step(sh: &Shared, i: usize, st: &mut State) -> bool {
    match sh.workload {
        Workload::Ab => {
            let a = GuestAddress(st.cursor);
            let Ok(b) = sh.mem.read_obj::<u8>(a) else {
                return false;
            };
            if sh.mem.write_obj(b.wrapping_add(1), a).is_err() {
                return false;
            }
            st.cursor += PAGE;
            if st.cursor >= st.end {
                st.cursor = st.start;
                st.passes += 1;
                sh.passes[i].store(st.passes, Ordering::Relaxed);
                sh.serial.transmit(b'B');
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
    fn accel(&self) -> &'static str {
        "soft"
    }

    fn count(&self) -> usize {
        self.threads.len()
    }

    fn resume(&self) -> Result<(), VcpuError> {
        let ctl = self.shared.ctl.lock();
        self.shared.run.store(true, Ordering::Release);
        self.shared.cv.notify_all();
        drop(ctl);
        Ok(())
    }

    fn pause(&self) -> Result<(), VcpuError> {
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

    fn save_state(&self) -> Result<(u32, Vec<u8>), VcpuError> {
        if self.running() {
            return Err(VcpuError::BadState(
                "vCPUs must be paused to save them".into(),
            ));
        }
        let ctl = self.shared.ctl.lock();
        let mut v = vec![self.shared.workload.code()];
        v.extend_from_slice(&(ctl.states.len() as u32).to_le_bytes());
        for s in &ctl.states {
            for w in [s.start, s.end, s.cursor, s.passes, s.rng] {
                v.extend_from_slice(&w.to_le_bytes());
            }
        }
        Ok((STATE_VERSION, v))
    }

    fn restore_state(&self, version: u32, data: &[u8]) -> Result<(), VcpuError> {
        if self.running() {
            return Err(VcpuError::BadState(
                "vCPUs must be paused to restore them".into(),
            ));
        }
        let bad = |m: String| VcpuError::BadState(m);
        if version != STATE_VERSION {
            return Err(bad(format!(
                "soft vCPU state version {version}, expected {STATE_VERSION}"
            )));
        }
        let n = self.threads.len();
        if data.len() != 5 + n * PER_VCPU {
            return Err(bad(format!(
                "{} bytes of soft vCPU state, expected {} for {n} vCPUs",
                data.len(),
                5 + n * PER_VCPU
            )));
        }
        if data[0] != self.shared.workload.code() {
            return Err(bad("the source ran a different built-in guest".into()));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut ctl = self.shared.ctl.lock();
        let mut states = Vec::with_capacity(n);
        for (i, mine) in ctl.states.iter().enumerate() {
            let o = 5 + i * PER_VCPU;
            let s = State {
                start: word(o),
                end: word(o + 8),
                cursor: word(o + 16),
                passes: word(o + 24),
                rng: word(o + 32),
            };
            if (s.start, s.end) != (mine.start, mine.end) || s.cursor < s.start || s.cursor >= s.end
            {
                return Err(bad(format!(
                    "vCPU {i}: slice or position does not fit this VM's memory"
                )));
            }
            states.push(s);
        }
        for (p, s) in self.shared.passes.iter().zip(&states) {
            p.store(s.passes, Ordering::Relaxed);
        }
        ctl.states = states;
        Ok(())
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
    use std::time::{Duration, Instant};

    use super::*;
    use crate::vm::{ab_check, memory_layout, HIGH_RAM_START};

    const MEM: u64 = 4 << 20;

    fn guest_memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&memory_layout(MEM).unwrap()).unwrap())
    }

    /// `count` vCPUs running `workload` over the whole high RAM of `mem`.
    fn vcpus(
        mem: &Arc<GuestMemoryMmap>,
        serial: &Arc<Serial>,
        workload: Workload,
        count: usize,
    ) -> SoftVcpus {
        SoftVcpus::new(
            Arc::clone(mem),
            Arc::clone(serial),
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
        let serial = Arc::new(Serial::new(None).unwrap());
        let v = vcpus(&mem, &serial, Workload::Ab, 2);
        assert!(!v.running());
        v.resume().unwrap();
        run_until(&v, 3);
        v.pause().unwrap();
        let bytes = first_bytes(&mem);
        ab_check(&bytes, 2).unwrap();
        assert_eq!(
            serial.tx_count(),
            v.passes().iter().sum::<u64>(),
            "one B per pass"
        );
        let (ver, state) = v.save_state().unwrap();

        // A second VM with a copy of memory and the saved state continues exactly.
        let mem2 = guest_memory();
        for a in (HIGH_RAM_START..MEM).step_by(PAGE as usize) {
            mem2.write_obj(
                mem.read_obj::<u8>(GuestAddress(a)).unwrap(),
                GuestAddress(a),
            )
            .unwrap();
        }
        let serial2 = Arc::new(Serial::new(None).unwrap());
        let v2 = vcpus(&mem2, &serial2, Workload::Ab, 2);
        v2.restore_state(ver, &state).unwrap();
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
        let serial = Arc::new(Serial::new(None).unwrap());
        let v = vcpus(&mem, &serial, Workload::Ab, 2);
        let (ver, state) = v.save_state().unwrap();
        assert!(v.restore_state(ver + 1, &state).is_err());
        assert!(v.restore_state(ver, &state[..state.len() - 1]).is_err());
        let one = vcpus(&mem, &serial, Workload::Ab, 1);
        assert!(
            one.restore_state(ver, &state).is_err(),
            "vCPU count differs"
        );
        let rnd = vcpus(&mem, &serial, Workload::Random, 2);
        assert!(rnd.restore_state(ver, &state).is_err(), "workload differs");
        let mut bad = state.clone();
        bad[5 + 16..5 + 24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            v.restore_state(ver, &bad).is_err(),
            "cursor outside the slice"
        );
        v.resume().unwrap();
        assert!(v.save_state().is_err(), "running vCPUs are not saved");
        v.pause().unwrap();
    }

    #[test]
    fn writes_are_recorded_in_the_dirty_bitmap() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        let mem = guest_memory();
        let v = vcpus(&mem, &Arc::new(Serial::new(None).unwrap()), Workload::Ab, 1);
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
