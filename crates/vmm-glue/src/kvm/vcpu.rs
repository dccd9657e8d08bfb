//! KVM vCPUs: one thread each, its run loop, kicking it out of `KVM_RUN`,
//! and the [`IoHandler`] through which the VMM's devices see port I/O and
//! MMIO.
//!
//! # Threads and states
//!
//! Each vCPU is a thread that creates its vCPU fd, then parks. Every ioctl on
//! that fd comes from that thread (KVM-NOTES section 1): state save and
//! restore and the boot helpers are jobs the parked thread runs.
//!
//! ```text
//!            resume                      fatal exit (shutdown, internal error)
//!  Parked ─────────> Running ───────────────────────────────> Stopped
//!    ^  <───────────────┘  pause (kick, finish pending I/O)      │
//!    └───────────────────────────────────────────────────────────┘
//!                 restore_state / boot helper
//! ```
//!
//! # Kicking
//!
//! A kick sets the vCPU's `stop` flag, then `immediate_exit` in its
//! `kvm_run`, then sends it a real-time signal whose handler does nothing.
//! The thread clears `immediate_exit` and *then* reads `stop` before each
//! `KVM_RUN` (all sequentially consistent), so a kick is never lost: landing
//! before the clear, it is seen by the read; landing after it,
//! `immediate_exit` makes `KVM_RUN` return `EINTR` at once; landing inside
//! `KVM_RUN`, the signal ends it, also when the guest is halted (with the
//! in-kernel irqchip HLT sleeps in the kernel). Before parking, a vCPU whose
//! last exit was port I/O or MMIO enters `KVM_RUN` once more with
//! `immediate_exit` set, which completes that access and returns (KVM-NOTES
//! sections 3 and 5), so saved state never holds half an instruction.

pub mod x86_64;

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::raw::{c_int, c_void};
use std::os::unix::thread::JoinHandleExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_regs, kvm_run, KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT, KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
};
use kvm_ioctls::VcpuFd;
use parking_lot::{Condvar, Mutex, RwLock};

use super::abi;
use super::dirty_log::RingShared;
use super::vm::VmShared;
use super::KvmError;
use crate::session::{ExitHandler, GuestExit, Section, StateError, Vcpus};

pub use x86_64::LongModeEntry;

use crate::boot::linux::LinuxEntry;

pub use crate::io::IoHandler;
use crate::io::NoDevices;

/// Guest accesses no device handled, since the VM was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnhandledIo {
    /// Port reads (answered with `0xff` bytes).
    pub pio_reads: u64,
    /// Port writes (dropped).
    pub pio_writes: u64,
    /// MMIO reads (answered with `0xff` bytes).
    pub mmio_reads: u64,
    /// MMIO writes (dropped).
    pub mmio_writes: u64,
}

/// The real-time signal that kicks vCPUs: `SIGRTMIN + 2` (glibc keeps the
/// first real-time signals to itself below `SIGRTMIN`; +2 stays clear of
/// the offsets other rust-vmm VMMs pick, should a VMM link one).
fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

/// The kick signal's handler: it does nothing; being delivered is enough to
/// make `KVM_RUN` return `EINTR`.
extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {}

/// Installs [`on_kick`] once per process.
fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| KvmError::Ioctl {
            op: format!("sigaction for the vCPU kick signal {}", kick_signal()),
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// A vCPU's `kvm_run` page(s), mapped from its fd.
struct RunMap {
    ptr: NonNull<kvm_run>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value. Other
// threads only touch `immediate_exit`, through an `AtomicU8`; every other
// field is read and written by the vCPU thread alone, outside `KVM_RUN`.
unsafe impl Send for RunMap {}
// SAFETY: as for `Send`: the only shared access is atomic.
unsafe impl Sync for RunMap {}

impl RunMap {
    fn new(fd: &VcpuFd, len: usize) -> Result<RunMap, KvmError> {
        if len < std::mem::size_of::<kvm_run>() {
            return Err(KvmError::Config {
                why: format!("KVM_GET_VCPU_MMAP_SIZE is {len}, smaller than struct kvm_run"),
            });
        }
        // SAFETY: a fresh shared mapping of the vCPU fd at offset 0, which
        // is how KVM exposes `kvm_run`; the kernel picks the address, so no
        // existing memory is replaced. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::Ioctl {
                op: "mmap of kvm_run".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<kvm_run>()).ok_or_else(|| KvmError::Config {
            why: "mmap of kvm_run returned NULL".into(),
        })?;
        Ok(RunMap { ptr, len })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the byte lies inside the live mapping (offset 1, asserted
        // in `abi`), `AtomicU8` has the size and alignment of `u8`, and all
        // Rust accesses to it go through this atomic; the kernel only reads
        // it when KVM_RUN starts.
        unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*self.ptr.as_ptr()).immediate_exit)) }
    }

    fn exit_reason(&self) -> u32 {
        // SAFETY: in bounds of the mapping (checked in `new`); only this
        // (the vCPU) thread reads it, outside KVM_RUN, so the kernel is not
        // writing it.
        unsafe { std::ptr::addr_of!((*self.ptr.as_ptr()).exit_reason).read_volatile() }
    }

    /// The exit union, copied out (every variant is plain data).
    fn exit_union(&self) -> kvm_bindings::kvm_run__bindgen_ty_1 {
        // SAFETY: as for `exit_reason`; the union is `Copy` plain data, and
        // which member is meaningful is decided by `exit_reason`.
        unsafe { std::ptr::addr_of!((*self.ptr.as_ptr()).__bindgen_anon_1).read_volatile() }
    }

    /// Runs `f` on the bytes at `offset..offset + len` of the mapping (the
    /// port I/O data area); `None` when out of bounds.
    fn with_bytes<R>(&self, offset: u64, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        let off = usize::try_from(offset).ok()?;
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: in bounds (checked above) of the mapping, which lives as
        // long as `self`; only the vCPU thread calls this, between two
        // KVM_RUNs, so nothing else reads or writes these bytes while the
        // slice lives (it does not escape `f`), and the data area (at
        // `io.data_offset`, past the struct) does not overlap
        // `immediate_exit`, the one byte other threads write.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>().add(off), len) };
        Some(f(bytes))
    }

    /// Writes the data of an MMIO read back for KVM.
    fn set_mmio_data(&self, data: &[u8]) {
        // SAFETY: as for `exit_reason`; `mmio.data` is 8 bytes and `data`
        // at most 8 (the exit's `len`, capped by the caller).
        unsafe {
            let dst = std::ptr::addr_of_mut!((*self.ptr.as_ptr()).__bindgen_anon_1.mmio.data);
            let mut buf = dst.read_volatile();
            buf[..data.len()].copy_from_slice(data);
            dst.write_volatile(buf);
        }
    }
}

impl Drop for RunMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers to
        // it any more (its owner, the shared vCPU state, is being dropped).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// What a parked vCPU thread runs: a closure over its vCPU.
type Job = Box<dyn FnOnce(&mut VcpuCore) + Send>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum RunState {
    Parked,
    Running,
    /// Stopped on its own; the reason.
    Stopped(String),
}

struct Ctl {
    want_run: bool,
    quit: bool,
    state: RunState,
    jobs: VecDeque<Job>,
}

/// One vCPU as other threads see it.
struct Vcpu {
    stop: AtomicBool,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    run: OnceLock<RunMap>,
    thread: OnceLock<libc::pthread_t>,
    /// The host thread id of the vCPU's thread (0 until it started).
    tid: AtomicU32,
    /// Passes through the top of the run loop, out of KVM_RUN (to wait for
    /// a flush kick to land).
    exits: AtomicU64,
}

/// The vCPU as its own thread holds it.
pub(crate) struct VcpuCore {
    /// The vCPU fd.
    pub(crate) fd: VcpuFd,
    /// Its index (= APIC id).
    pub(crate) index: usize,
    /// The VM.
    pub(crate) vm: Arc<VmShared>,
    /// The last exit was port I/O or MMIO, which the next KVM_RUN completes.
    io_pending: bool,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits in a row that found nothing to
    /// harvest.
    empty_ring_exits: u32,
}

/// How many full-ring exits over an empty ring in a row mean KVM lost
/// count.
const EMPTY_RING_EXITS_MAX: u32 = 1000;

struct Shared {
    vcpus: Vec<Vcpu>,
    io: RwLock<Arc<dyn IoHandler>>,
    exit_handler: RwLock<Option<ExitHandler>>,
    last_exit: Mutex<Option<GuestExit>>,
    unhandled: [AtomicU64; 4],
    /// Kicks allowed (false once `Drop` has signalled every thread).
    kick_ok: RwLock<bool>,
    running: AtomicBool,
    ring: Option<Arc<RingShared>>,
}

impl Shared {
    /// Sets `stop`, `immediate_exit`, and signals the thread.
    fn kick(&self, i: usize) {
        let v = &self.vcpus[i];
        v.stop.store(true, Ordering::SeqCst);
        if let Some(run) = v.run.get() {
            run.immediate_exit().store(1, Ordering::SeqCst);
        }
        let ok = self.kick_ok.read();
        if *ok {
            if let Some(&t) = v.thread.get() {
                // SAFETY: `t` is the pthread_t of this vCPU's thread, which
                // is joinable and not joined: threads are joined only in
                // `Drop` after `kick_ok` was set false under the write lock
                // this read guard excludes, and a thread exits only after
                // `Drop` set its `quit` flag, i.e. after that too. The
                // signal has a handler (installed before any thread).
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
        }
    }

    /// After vCPU `index` stopped on its own: stop the others, tell the
    /// VMM.
    fn on_fatal(&self, index: usize, exit: GuestExit) {
        self.running.store(false, Ordering::SeqCst);
        for (i, v) in self.vcpus.iter().enumerate() {
            if i != index {
                v.ctl.lock().want_run = false;
                self.kick(i);
            }
        }
        log::warn!("KVM vCPU {index} stopped: {exit:?}");
        *self.last_exit.lock() = Some(exit.clone());
        if let Some(h) = self.exit_handler.read().as_ref() {
            h(exit);
        }
    }

    fn count_unhandled(&self, which: usize) {
        self.unhandled[which].fetch_add(1, Ordering::Relaxed);
    }
}

/// The vCPUs of a [`super::KvmVm`]: a [`Vcpus`] whose accelerator is `kvm`.
///
/// Created paused. Dropping it (the last `Arc`) stops and joins every
/// thread.
pub struct KvmVcpus {
    shared: Arc<Shared>,
    vm: Arc<VmShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for KvmVcpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpus")
            .field("count", &self.shared.vcpus.len())
            .field("running", &self.running())
            .finish()
    }
}

const UNHANDLED_PIO_READ: usize = 0;
const UNHANDLED_PIO_WRITE: usize = 1;
const UNHANDLED_MMIO_READ: usize = 2;
const UNHANDLED_MMIO_WRITE: usize = 3;

impl KvmVcpus {
    /// Starts `count` vCPU threads, each creating its vCPU and parking.
    pub(crate) fn create(
        vm: &Arc<VmShared>,
        count: usize,
        ring: Option<Arc<RingShared>>,
    ) -> Result<KvmVcpus, KvmError> {
        install_kick_handler()?;
        let run_size = vm
            .kvm
            .get_vcpu_mmap_size()
            .map_err(|e| KvmError::ioctl("KVM_GET_VCPU_MMAP_SIZE", e))?;
        let vcpus = (0..count)
            .map(|_| Vcpu {
                stop: AtomicBool::new(true),
                ctl: Mutex::new(Ctl {
                    want_run: false,
                    quit: false,
                    state: RunState::Parked,
                    jobs: VecDeque::new(),
                }),
                cv: Condvar::new(),
                run: OnceLock::new(),
                thread: OnceLock::new(),
                tid: AtomicU32::new(0),
                exits: AtomicU64::new(0),
            })
            .collect();
        let shared = Arc::new(Shared {
            vcpus,
            io: RwLock::new(Arc::new(NoDevices)),
            exit_handler: RwLock::new(None),
            last_exit: Mutex::new(None),
            unhandled: Default::default(),
            kick_ok: RwLock::new(true),
            running: AtomicBool::new(false),
            ring,
        });
        let this = KvmVcpus {
            shared: shared.clone(),
            vm: vm.clone(),
            threads: Mutex::new(Vec::with_capacity(count)),
        };
        for index in 0..count {
            let (tx, rx) = mpsc::sync_channel(1);
            let (s, v) = (shared.clone(), vm.clone());
            let handle = std::thread::Builder::new()
                .name(format!("kvm-vcpu{index}"))
                .spawn(move || vcpu_thread(s, v, index, run_size, tx))
                .map_err(|e| KvmError::Thread {
                    vcpu: index,
                    why: format!("cannot spawn: {e}"),
                })?;
            // pthread_t is an integer on Linux; set before any kick.
            let _ = shared.vcpus[index].thread.set(handle.as_pthread_t());
            this.threads.lock().push(handle);
            // On an error `this` is dropped, joining the threads so far.
            rx.recv().map_err(|_| KvmError::Thread {
                vcpu: index,
                why: "exited during set-up".into(),
            })??;
        }
        Ok(this)
    }

    /// How many vCPUs there are.
    pub(crate) fn count_vcpus(&self) -> usize {
        self.shared.vcpus.len()
    }

    /// Plugs the VMM's devices in (replacing the previous handler; the
    /// default handles nothing).
    pub fn set_io_handler(&self, handler: Arc<dyn IoHandler>) {
        *self.shared.io.write() = handler;
    }

    /// Accesses no device handled, since the VM was built.
    pub fn unhandled_io(&self) -> UnhandledIo {
        let n = |i: usize| self.shared.unhandled[i].load(Ordering::Relaxed);
        UnhandledIo {
            pio_reads: n(UNHANDLED_PIO_READ),
            pio_writes: n(UNHANDLED_PIO_WRITE),
            mmio_reads: n(UNHANDLED_MMIO_READ),
            mmio_writes: n(UNHANDLED_MMIO_WRITE),
        }
    }

    /// The last way the guest stopped on its own, if it did.
    pub fn last_exit(&self) -> Option<GuestExit> {
        self.shared.last_exit.lock().clone()
    }

    /// The general registers of vCPU `index` (paused).
    pub fn regs(&self, index: usize) -> Result<kvm_regs, KvmError> {
        self.on_vcpu(index, "read registers", |core| {
            core.fd
                .get_regs()
                .map_err(|e| KvmError::ioctl(format!("KVM_GET_REGS on vCPU {}", core.index), e))
        })?
    }

    /// Sets the vCPUs up as a PC BIOS hands a boot sector over: vCPU 0 in
    /// real mode, CS:IP = `0000:7c00`, DS = ES = FS = GS = SS = 0 (bases 0,
    /// limits 64 KiB), SP = `0x7000`, DL = `0x80` (the first hard disk),
    /// RFLAGS = 2 (interrupts off); A20 is on (the VM has no A20 gate). The
    /// other vCPUs wait for INIT/SIPI, as on a PC. Call it paused, before
    /// the first resume.
    pub fn boot_real_mode(&self) -> Result<(), KvmError> {
        self.on_vcpu(0, "boot", x86_64::boot_real_mode)??;
        self.clear_stopped();
        Ok(())
    }

    /// Sets every vCPU up in 64-bit long mode on an identity map that this
    /// writes into guest memory (see [`x86_64::write_long_mode_tables`]; the
    /// VMM keeps [`x86_64::LONG_MODE_GDT`] to
    /// [`x86_64::LONG_MODE_TABLES_END`] free):
    /// vCPU `i` starts at `entries[i]`, and every vCPU is runnable at once
    /// (no INIT/SIPI). Call it paused, before the first resume.
    pub fn boot_long_mode(&self, entries: &[LongModeEntry]) -> Result<(), KvmError> {
        if entries.len() != self.count_vcpus() {
            return Err(KvmError::Config {
                why: format!(
                    "{} long-mode entries for {} vCPUs",
                    entries.len(),
                    self.count_vcpus()
                ),
            });
        }
        x86_64::write_long_mode_tables(&self.vm.mem)?;
        for (i, &entry) in entries.iter().enumerate() {
            self.on_vcpu(i, "boot", move |core| x86_64::boot_long_mode(core, entry))??;
        }
        self.clear_stopped();
        Ok(())
    }

    /// Sets the vCPUs up for the Linux 64-bit boot protocol, after
    /// [`crate::boot::linux::load`] wrote the kernel and its tables: vCPU 0
    /// in long mode on an identity map of the first 4 GiB with the GDT the
    /// protocol asks for (`__BOOT_CS` = `0x10`, `__BOOT_DS` = `0x18`, at
    /// [`x86_64::LONG_MODE_GDT`]), RIP = the 64-bit entry, RSI = the zero
    /// page, interrupts off; the other vCPUs wait for the INIT/SIPI the
    /// kernel sends them. Every vCPU gets the boot MSRs and FPU state. Call
    /// it paused, before the first resume; the VMM keeps
    /// [`x86_64::LONG_MODE_GDT`] to [`x86_64::LONG_MODE_TABLES_END`] free.
    pub fn boot_linux(&self, entry: LinuxEntry) -> Result<(), KvmError> {
        x86_64::write_linux_tables(&self.vm.mem)?;
        self.on_vcpu(0, "boot", move |core| x86_64::boot_linux_bsp(core, entry))??;
        for i in 1..self.count_vcpus() {
            self.on_vcpu(i, "boot", x86_64::boot_linux_ap)??;
        }
        self.clear_stopped();
        Ok(())
    }

    /// The latest kvmclock time (ns) any vCPU's guest reads now from its
    /// pvclock page (see [`x86_64::pvclock_now`]); `None` when no vCPU has
    /// one. The vCPUs must be parked.
    pub(crate) fn pvclock_max(&self) -> Result<Option<u64>, StateError> {
        let mut max = None;
        for i in 0..self.count_vcpus() {
            let ns = self
                .on_vcpu(i, "read its pvclock", x86_64::pvclock_now)
                .map_err(|e| to_state_error(&e))??;
            max = max.max(ns);
        }
        Ok(max)
    }

    /// Runs `f` on vCPU `index`'s thread, which must be parked.
    pub(crate) fn on_vcpu<R: Send + 'static>(
        &self,
        index: usize,
        op: &'static str,
        f: impl FnOnce(&mut VcpuCore) -> R + Send + 'static,
    ) -> Result<R, KvmError> {
        let v = self
            .shared
            .vcpus
            .get(index)
            .ok_or_else(|| KvmError::Config {
                why: format!("no vCPU {index}"),
            })?;
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut c = v.ctl.lock();
            if c.want_run || c.state == RunState::Running {
                return Err(KvmError::Running { op });
            }
            c.jobs.push_back(Box::new(move |core| {
                let _ = tx.send(f(core));
            }));
        }
        v.cv.notify_all();
        rx.recv().map_err(|_| KvmError::Thread {
            vcpu: index,
            why: format!("gone before it could {op}"),
        })
    }

    /// After a restore or boot: vCPUs stopped on their own may run again.
    fn clear_stopped(&self) {
        for v in &self.shared.vcpus {
            let mut c = v.ctl.lock();
            if matches!(c.state, RunState::Stopped(_)) {
                c.state = RunState::Parked;
            }
        }
        *self.shared.last_exit.lock() = None;
    }

    /// Kicks every running vCPU and waits until each has been out of
    /// `KVM_RUN` since (so CPU-buffered dirty state, PML, reached KVM). A
    /// kick that lands while the thread handles an exit in user space is
    /// consumed there, but the thread then passes the top of its run loop,
    /// which is what this waits for.
    pub(crate) fn kick_and_wait_exits(&self) {
        let before: Vec<u64> = self
            .shared
            .vcpus
            .iter()
            .map(|v| v.exits.load(Ordering::SeqCst))
            .collect();
        for v in &self.shared.vcpus {
            if v.ctl.lock().state == RunState::Running {
                // A kick without a pause request: the thread sees `stop`
                // only while `want_run` is false, so it re-enters at once.
                if let Some(run) = v.run.get() {
                    run.immediate_exit().store(1, Ordering::SeqCst);
                }
                let ok = self.shared.kick_ok.read();
                if let (true, Some(&t)) = (*ok, v.thread.get()) {
                    // SAFETY: as in `Shared::kick`: a joinable, unjoined
                    // thread, while the `kick_ok` read guard is held.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
            }
        }
        for (v, b) in self.shared.vcpus.iter().zip(before) {
            let mut c = v.ctl.lock();
            while c.state == RunState::Running && v.exits.load(Ordering::SeqCst) == b {
                v.cv.wait_for(&mut c, std::time::Duration::from_millis(1));
            }
        }
    }

    fn check_paused(&self, op: &str) -> Result<(), StateError> {
        for (i, v) in self.shared.vcpus.iter().enumerate() {
            let c = v.ctl.lock();
            if c.want_run || c.state == RunState::Running {
                return Err(StateError::InvalidState(format!(
                    "cannot {op} while vCPU {i} runs: pause first"
                )));
            }
        }
        Ok(())
    }
}

impl Vcpus for KvmVcpus {
    fn accel(&self) -> &str {
        "kvm"
    }

    fn count(&self) -> usize {
        self.count_vcpus()
    }

    fn resume(&self) -> Result<(), StateError> {
        for (i, v) in self.shared.vcpus.iter().enumerate() {
            if let RunState::Stopped(why) = &v.ctl.lock().state {
                return Err(StateError::InvalidState(format!(
                    "vCPU {i} stopped ({why}): restore a state or boot it again first"
                )));
            }
        }
        self.shared.running.store(true, Ordering::SeqCst);
        for v in &self.shared.vcpus {
            let mut c = v.ctl.lock();
            c.want_run = true;
            v.stop.store(false, Ordering::SeqCst);
            drop(c);
            v.cv.notify_all();
        }
        Ok(())
    }

    fn pause(&self) -> Result<(), StateError> {
        self.shared.running.store(false, Ordering::SeqCst);
        for (i, v) in self.shared.vcpus.iter().enumerate() {
            v.ctl.lock().want_run = false;
            self.shared.kick(i);
        }
        for v in &self.shared.vcpus {
            let mut c = v.ctl.lock();
            while c.state == RunState::Running {
                v.cv.wait(&mut c);
            }
        }
        Ok(())
    }

    fn running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    fn save_state(&self) -> Result<Vec<Section>, StateError> {
        self.check_paused("save vCPU state")?;
        let mut out = vec![x86_64::header_section(self.count_vcpus())];
        for i in 0..self.count_vcpus() {
            let secs = self
                .on_vcpu(i, "save state", x86_64::save)
                .map_err(|e| to_state_error(&e))??;
            out.extend(secs);
        }
        Ok(out)
    }

    fn restore_state(&self, sections: &[Section]) -> Result<(), StateError> {
        self.check_paused("restore vCPU state")?;
        let states = x86_64::parse(sections, self.count_vcpus(), &self.vm)?;
        for (i, state) in states.into_iter().enumerate() {
            self.on_vcpu(i, "restore state", move |core| x86_64::restore(core, state))
                .map_err(|e| to_state_error(&e))??;
        }
        self.clear_stopped();
        Ok(())
    }

    fn thread_ids(&self) -> Vec<u32> {
        self.shared
            .vcpus
            .iter()
            .map(|v| v.tid.load(Ordering::Relaxed))
            .collect()
    }

    fn set_exit_handler(&self, handler: ExitHandler) {
        *self.shared.exit_handler.write() = Some(handler);
    }
}

/// A [`KvmError`] as the session's [`StateError`].
fn to_state_error(e: &KvmError) -> StateError {
    match e {
        KvmError::Running { op } => {
            StateError::InvalidState(format!("vCPUs must be paused to {op}"))
        }
        other => StateError::host(
            "vCPU thread",
            std::io::Error::other(crate::error_chain(other)),
        ),
    }
}

impl Drop for KvmVcpus {
    fn drop(&mut self) {
        {
            let mut ok = self.shared.kick_ok.write();
            for (i, v) in self.shared.vcpus.iter().enumerate() {
                // `want_run` false before the kick: a thread that sees
                // `stop` with `want_run` still true takes the kick for a
                // flush and runs on.
                v.ctl.lock().want_run = false;
                v.stop.store(true, Ordering::SeqCst);
                if let Some(run) = v.run.get() {
                    run.immediate_exit().store(1, Ordering::SeqCst);
                }
                if let Some(&t) = v.thread.get() {
                    // SAFETY: the thread is joinable, not joined, and has
                    // not exited: it exits only once `quit` is set, below,
                    // after this signal.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
                v.ctl.lock().quit = true;
                v.cv.notify_all();
                log::trace!("vCPU {i} told to quit");
            }
            *ok = false;
        }
        for (i, t) in self.threads.lock().drain(..).enumerate() {
            if t.join().is_err() {
                log::error!("KVM vCPU {i} thread panicked");
            }
        }
    }
}

/// How a run of the vCPU ended.
enum Outcome {
    Paused,
    Fatal(GuestExit),
}

fn vcpu_thread(
    shared: Arc<Shared>,
    vm: Arc<VmShared>,
    index: usize,
    run_size: usize,
    init: mpsc::SyncSender<Result<(), KvmError>>,
) {
    shared.vcpus[index]
        .tid
        .store(crate::thread_id(), Ordering::Relaxed);
    let setup = || -> Result<VcpuCore, KvmError> {
        vmm_sys_util::signal::unblock_signal(kick_signal()).map_err(|e| KvmError::Thread {
            vcpu: index,
            why: format!("cannot unblock the kick signal: {e}"),
        })?;
        let fd = x86_64::create_vcpu(&vm, index)?;
        let _ = shared.vcpus[index].run.set(RunMap::new(&fd, run_size)?);
        if let Some(ring) = &shared.ring {
            ring.map_vcpu(index, &fd)?;
        }
        Ok(VcpuCore {
            fd,
            index,
            vm: vm.clone(),
            io_pending: false,
            empty_ring_exits: 0,
        })
    };
    let mut core = match setup() {
        Ok(core) => core,
        Err(e) => {
            let _ = init.send(Err(e));
            return;
        }
    };
    if init.send(Ok(())).is_err() {
        return;
    }
    drop(init);
    park_loop(&shared, &mut core);
}

fn park_loop(shared: &Shared, core: &mut VcpuCore) {
    let v = &shared.vcpus[core.index];
    loop {
        let job = {
            let mut c = v.ctl.lock();
            loop {
                if c.quit {
                    return;
                }
                if let Some(job) = c.jobs.pop_front() {
                    break Some(job);
                }
                if c.want_run && c.state == RunState::Parked {
                    c.state = RunState::Running;
                    break None;
                }
                v.cv.wait(&mut c);
            }
        };
        if let Some(job) = job {
            job(core);
            continue;
        }
        let mut outcome = run_loop(shared, v, core);
        if core.io_pending {
            if let Some(exit) = complete_io(shared, v, core) {
                outcome = Outcome::Fatal(exit);
            }
        }
        let mut c = v.ctl.lock();
        let fatal = match outcome {
            Outcome::Paused => {
                c.state = RunState::Parked;
                None
            }
            Outcome::Fatal(exit) => {
                c.state = RunState::Stopped(describe(&exit));
                c.want_run = false;
                Some(exit)
            }
        };
        drop(c);
        v.cv.notify_all();
        if let Some(exit) = fatal {
            shared.on_fatal(core.index, exit);
        }
    }
}

fn describe(exit: &GuestExit) -> String {
    match exit {
        GuestExit::Shutdown { reason } => reason.clone(),
        GuestExit::InternalError { message, .. } => message.clone(),
    }
}

/// Issues KVM_RUN once.
fn kvm_run(core: &VcpuCore) -> Result<(), std::io::Error> {
    // SAFETY: KVM_RUN on a vCPU fd this thread owns; it takes no argument.
    // The kernel writes only the vCPU's `kvm_run` mapping, which outlives
    // the call (it is dropped with the shared vCPU state, after this thread
    // is joined).
    let r = unsafe { libc::ioctl(core.fd.as_raw_fd(), abi::KVM_RUN as _, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run_loop(shared: &Shared, v: &Vcpu, core: &mut VcpuCore) -> Outcome {
    let Some(run) = v.run.get() else {
        return Outcome::Fatal(GuestExit::InternalError {
            vcpu: core.index,
            message: "kvm_run is not mapped".into(),
        });
    };
    loop {
        run.immediate_exit().store(0, Ordering::SeqCst);
        // Out of KVM_RUN (so CPU-buffered dirty state reached KVM) with
        // `immediate_exit` clear: a flush kick that raced with the clear
        // above sees this count move and need not land.
        v.exits.fetch_add(1, Ordering::SeqCst);
        if v.stop.load(Ordering::SeqCst) {
            if v.ctl.lock().want_run {
                // A kick that asks for no pause (a dirty-ring flush).
                v.stop.store(false, Ordering::SeqCst);
            } else {
                return Outcome::Paused;
            }
        }
        let r = kvm_run(core);
        match r {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                core.io_pending = false;
                continue;
            }
            Err(e) => {
                return Outcome::Fatal(GuestExit::InternalError {
                    vcpu: core.index,
                    message: format!("KVM_RUN failed: {e}"),
                })
            }
        }
        core.io_pending = false;
        if let Some(exit) = handle_exit(shared, core, run) {
            return Outcome::Fatal(exit);
        }
    }
}

/// Re-enters KVM_RUN with `immediate_exit` set until KVM has completed the
/// pending I/O and returned `EINTR`.
fn complete_io(shared: &Shared, v: &Vcpu, core: &mut VcpuCore) -> Option<GuestExit> {
    let run = v.run.get()?;
    while core.io_pending {
        run.immediate_exit().store(1, Ordering::SeqCst);
        let r = kvm_run(core);
        core.io_pending = false;
        match r {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
            Err(e) => {
                return Some(GuestExit::InternalError {
                    vcpu: core.index,
                    message: format!("KVM_RUN completing I/O failed: {e}"),
                })
            }
            Ok(()) => {
                if let Some(exit) = handle_exit(shared, core, run) {
                    return Some(exit);
                }
            }
        }
    }
    None
}

/// Handles one exit; `Some` when the vCPU must stop.
fn handle_exit(shared: &Shared, core: &mut VcpuCore, run: &RunMap) -> Option<GuestExit> {
    let index = core.index;
    let reason = run.exit_reason();
    let u = run.exit_union();
    let internal = |message: String| {
        Some(GuestExit::InternalError {
            vcpu: index,
            message,
        })
    };
    match reason {
        KVM_EXIT_IO => {
            // SAFETY: `exit_reason` is KVM_EXIT_IO, so `io` is the member
            // KVM filled.
            let io = unsafe { u.io };
            let size = usize::from(io.size);
            let total = size.saturating_mul(io.count as usize);
            let dev = shared.io.read().clone();
            let handled = (size > 0).then(|| {
                run.with_bytes(io.data_offset, total, |data| {
                    for chunk in data.chunks_mut(size) {
                        if u32::from(io.direction) == KVM_EXIT_IO_IN {
                            if !dev.pio_read(io.port, chunk) {
                                chunk.fill(0xff);
                                shared.count_unhandled(UNHANDLED_PIO_READ);
                            }
                        } else if !dev.pio_write(io.port, chunk) {
                            shared.count_unhandled(UNHANDLED_PIO_WRITE);
                        }
                    }
                })
            });
            if handled.flatten().is_none() {
                return internal(format!(
                    "port I/O exit with data outside kvm_run (offset {:#x}, {total} bytes)",
                    io.data_offset
                ));
            }
            core.io_pending = true;
            None
        }
        KVM_EXIT_MMIO => {
            // SAFETY: `exit_reason` is KVM_EXIT_MMIO, so `mmio` is the member
            // KVM filled.
            let mmio = unsafe { u.mmio };
            let len = (mmio.len as usize).min(8);
            let dev = shared.io.read().clone();
            if mmio.is_write != 0 {
                if !dev.mmio_write(mmio.phys_addr, &mmio.data[..len]) {
                    shared.count_unhandled(UNHANDLED_MMIO_WRITE);
                }
            } else {
                let mut data = [0u8; 8];
                if !dev.mmio_read(mmio.phys_addr, &mut data[..len]) {
                    data.fill(0xff);
                    shared.count_unhandled(UNHANDLED_MMIO_READ);
                }
                run.set_mmio_data(&data[..len]);
            }
            core.io_pending = true;
            None
        }
        KVM_EXIT_HLT | KVM_EXIT_INTR | KVM_EXIT_IRQ_WINDOW_OPEN => None,
        KVM_EXIT_DIRTY_RING_FULL => {
            let ring = shared.ring.as_ref()?;
            match ring.harvest_full(index) {
                Ok(0) => {
                    // Another thread may have harvested just before; but a
                    // KVM that keeps saying "full" over an empty ring has
                    // lost count (seen on PVM hosts, which let a ring fill
                    // past its soft limit): stop rather than spin.
                    core.empty_ring_exits += 1;
                    if core.empty_ring_exits > EMPTY_RING_EXITS_MAX {
                        return internal(format!(
                            "vCPU {index}: KVM keeps exiting with a full dirty ring that holds no \
                             dirty entry ({} times): the host's dirty ring overflowed and lost pages",
                            core.empty_ring_exits
                        ));
                    }
                    None
                }
                Ok(_) => {
                    core.empty_ring_exits = 0;
                    None
                }
                Err(e) => internal(format!(
                    "dirty ring full and cannot be harvested: {}",
                    crate::error_chain(&e)
                )),
            }
        }
        KVM_EXIT_SHUTDOWN => Some(GuestExit::Shutdown {
            reason: format!("vCPU {index}: shutdown (a triple fault or a reset)"),
        }),
        KVM_EXIT_SYSTEM_EVENT => {
            // SAFETY: `exit_reason` is KVM_EXIT_SYSTEM_EVENT, so
            // `system_event` is the member KVM filled.
            let ev = unsafe { u.system_event };
            match ev.type_ {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Some(GuestExit::Shutdown {
                        reason: format!("vCPU {index}: system event {}", ev.type_),
                    })
                }
                t => internal(format!("vCPU {index}: system event {t}")),
            }
        }
        KVM_EXIT_INTERNAL_ERROR => {
            // SAFETY: `exit_reason` is KVM_EXIT_INTERNAL_ERROR, so
            // `internal` is the member KVM filled.
            let ie = unsafe { u.internal };
            let what = match ie.suberror {
                KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
                KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
                KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
                KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
                _ => "unknown",
            };
            let n = (ie.ndata as usize).min(ie.data.len());
            let data: Vec<String> = ie.data[..n].iter().map(|d| format!("{d:#x}")).collect();
            internal(format!(
                "vCPU {index}: KVM internal error: {what} (suberror {}), data [{}]",
                ie.suberror,
                data.join(", ")
            ))
        }
        KVM_EXIT_FAIL_ENTRY => {
            // SAFETY: `exit_reason` is KVM_EXIT_FAIL_ENTRY, so `fail_entry`
            // is the member KVM filled.
            let fe = unsafe { u.fail_entry };
            internal(format!(
                "vCPU {index}: VM entry failed: hardware reason {:#x} on host CPU {}",
                fe.hardware_entry_failure_reason, fe.cpu
            ))
        }
        other => internal(format!("vCPU {index}: unhandled KVM exit reason {other}")),
    }
}
