//! A small VMM, written the way an outside project would write it, that
//! migrates a running VM from one side to the other through the public API of
//! `vmm-glue`, then checks that RAM and its device's state arrived.
//!
//! ```text
//! cargo run --release -p vmm-glue --example embed
//! ```
//!
//! The VMM has:
//! - its own guest memory: 16 MiB in one vm-memory region, `ram`;
//! - a device of its own with state: a doorbell at I/O port 0x510 that counts
//!   the guest's rings and keeps the last value rung;
//! - its own vCPU: on KVM (where `/dev/kvm` works) one vCPU in long mode
//!   running a loop assembled here with iced-x86; elsewhere a stand-in thread
//!   that runs the same loop in Rust. The loop adds one to a counter, writes it
//!   to one page of a 4 MiB window (a different page each time), and rings the
//!   doorbell with it.
//!
//! Both sides run in this process and talk over a Unix socket pair; the
//! destination is held paused after loading so that its RAM can be compared
//! with the source's exactly, then resumed to show the guest goes on.
//! `EMBED_ACCEL=soft` forces the stand-in. It exits 0 when every check holds.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iced_x86::code_asm::{dx, eax, qword_ptr, rax, rcx, CodeAssembler};
use migration_ram::{DirtyLog, VmmDirtyLog};
use migration_stream::memory_pair;
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress};
use vmm_glue::io::IoHandler;
use vmm_glue::kvm::{KvmVm, KvmVmConfig, LongModeEntry};
use vmm_glue::session::{
    DeviceState, ExitHandler, GuestRam, Machine, MigrationStatus, RamRegion, Section, Session,
    StateError, Vcpus,
};
use vmm_glue::{verify, GuestMemoryMmap};

const RAM: u64 = 16 << 20;
const DOORBELL_PORT: u16 = 0x510;
/// Where the loop's code sits, and its counter.
const CODE: u64 = 0x8000;
const COUNTER: u64 = 0x10_0000;
/// The window of pages the loop writes to.
const WINDOW: u64 = 0x20_0000;
const WINDOW_PAGES: u64 = 1024;
/// A hang guard for waits, not a performance limit.
const GUARD: Duration = Duration::from_secs(300);

/// The doorbell: how many times the guest rang, and the last value.
#[derive(Default)]
struct Doorbell {
    rings: AtomicU64,
    last: AtomicU64,
}

impl Doorbell {
    fn ring(&self, value: u64) {
        self.rings.fetch_add(1, Ordering::Relaxed);
        self.last.store(value, Ordering::Relaxed);
    }
    fn state(&self) -> (u64, u64) {
        (
            self.rings.load(Ordering::Relaxed),
            self.last.load(Ordering::Relaxed),
        )
    }
}

impl DeviceState for Doorbell {
    fn name(&self) -> &str {
        "doorbell"
    }
    fn version(&self) -> u32 {
        1
    }
    fn save(&self) -> Result<Vec<u8>, StateError> {
        let (rings, last) = self.state();
        Ok([rings.to_le_bytes(), last.to_le_bytes()].concat())
    }
    fn load(&self, version: u32, data: &[u8]) -> Result<(), StateError> {
        if version != 1 || data.len() != 16 {
            return Err(StateError::malformed(
                "doorbell",
                format!("version {version}, {} bytes", data.len()),
            ));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        self.rings.store(word(0), Ordering::Relaxed);
        self.last.store(word(1), Ordering::Relaxed);
        Ok(())
    }
}

/// The port bus of the KVM vCPU: the doorbell and nothing else.
struct Bus(Arc<Doorbell>);

impl IoHandler for Bus {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> bool {
        false
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        if port != DOORBELL_PORT {
            return false;
        }
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        self.0.ring(u64::from_le_bytes(v));
        true
    }
    fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
        false
    }
    fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
        false
    }
}

/// The guest's loop in 64-bit code: counter += 1; the counter goes to page
/// (counter % 1024) of the window; `out 0x510, eax`; again.
fn guest_code() -> Result<Vec<u8>, iced_x86::IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.inc(qword_ptr(COUNTER))?;
    a.mov(rax, qword_ptr(COUNTER))?;
    a.mov(rcx, rax)?;
    a.and(rcx, (WINDOW_PAGES - 1) as i32)?;
    a.shl(rcx, 12)?;
    a.mov(qword_ptr(rcx + WINDOW as i32), rax)?;
    a.mov(dx, i32::from(DOORBELL_PORT))?;
    a.out(dx, eax)?;
    a.jmp(top)?;
    a.assemble(CODE)
}

/// The stand-in for a vCPU where KVM is missing: a thread running the same
/// loop, with its "registers" (the counter lives in RAM) saved as a section.
struct ThreadVcpu {
    mem: Arc<GuestMemoryMmap>,
    doorbell: Arc<Doorbell>,
    run: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    tid: Arc<AtomicU32>,
}

impl ThreadVcpu {
    fn step(mem: &GuestMemoryMmap, doorbell: &Doorbell) {
        let c = mem.read_obj::<u64>(GuestAddress(COUNTER)).unwrap_or(0) + 1;
        let page = c % WINDOW_PAGES;
        let _ = mem.write_obj(c, GuestAddress(COUNTER));
        let _ = mem.write_obj(c, GuestAddress(WINDOW + page * 4096));
        doorbell.ring(c);
    }
}

impl Vcpus for ThreadVcpu {
    fn accel(&self) -> &str {
        "thread"
    }
    fn count(&self) -> usize {
        1
    }
    fn resume(&self) -> Result<(), StateError> {
        let mut t = self.thread.lock();
        if t.is_some() {
            return Ok(());
        }
        self.run.store(true, Ordering::Release);
        let (mem, bell, run, tid) = (
            Arc::clone(&self.mem),
            Arc::clone(&self.doorbell),
            Arc::clone(&self.run),
            Arc::clone(&self.tid),
        );
        let h = std::thread::Builder::new()
            .name("embed-vcpu".into())
            .spawn(move || {
                tid.store(vmm_glue::thread_id(), Ordering::Relaxed);
                while run.load(Ordering::Acquire) {
                    ThreadVcpu::step(&mem, &bell);
                }
            })
            .map_err(|e| StateError::host("starting the vCPU thread", e))?;
        *t = Some(h);
        Ok(())
    }
    fn pause(&self) -> Result<(), StateError> {
        self.run.store(false, Ordering::Release);
        if let Some(h) = self.thread.lock().take() {
            h.join()
                .map_err(|_| StateError::InvalidState("the vCPU thread panicked".into()))?;
        }
        Ok(())
    }
    fn running(&self) -> bool {
        self.thread.lock().is_some()
    }
    fn save_state(&self) -> Result<Vec<Section>, StateError> {
        // Everything this "CPU" has lives in RAM.
        Ok(vec![Section::new("thread.vcpu0", 1, Vec::new())])
    }
    fn restore_state(&self, sections: &[Section]) -> Result<(), StateError> {
        match sections {
            [s] if s.name == "thread.vcpu0" && s.version == 1 => Ok(()),
            _ => Err(StateError::incompatible(
                "vCPUs",
                format!(
                    "expected one thread.vcpu0 section, got {:?}",
                    sections.iter().map(|s| &s.name).collect::<Vec<_>>()
                ),
            )),
        }
    }
    fn set_exit_handler(&self, _: ExitHandler) {}
    fn thread_ids(&self) -> Vec<u32> {
        vec![self.tid.load(Ordering::Relaxed)]
    }
}

impl Drop for ThreadVcpu {
    fn drop(&mut self) {
        let _ = self.pause();
    }
}

/// One side: a VM with its session.
struct Side {
    session: Session,
    doorbell: Arc<Doorbell>,
    accel: String,
}

fn side(kvm: bool, load_guest: bool) -> Result<Side, String> {
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)])
            .map_err(|e| e.to_string())?,
    );
    let ram =
        GuestRam::new(Arc::clone(&mem), vec![RamRegion::new("ram")]).map_err(|e| e.to_string())?;
    let doorbell = Arc::new(Doorbell::default());
    let (vcpus, dirty_log, vm_devices): (Arc<dyn Vcpus>, Arc<dyn DirtyLog>, Vec<_>) = if kvm {
        let vm = KvmVm::new(&ram, KvmVmConfig::new(1)).map_err(|e| e.to_string())?;
        let vcpus = vm.vcpus();
        vcpus.set_io_handler(Arc::new(Bus(Arc::clone(&doorbell))));
        if load_guest {
            let code = guest_code().map_err(|e| e.to_string())?;
            mem.write_slice(&code, GuestAddress(CODE))
                .map_err(|e| e.to_string())?;
            vcpus
                .boot_long_mode(&[LongModeEntry::new(CODE, 0)])
                .map_err(|e| e.to_string())?;
        }
        (
            vcpus as Arc<dyn Vcpus>,
            vm.dirty_log(Arc::clone(&mem)),
            vm.device_states(),
        )
    } else {
        let v = ThreadVcpu {
            mem: Arc::clone(&mem),
            doorbell: Arc::clone(&doorbell),
            run: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            tid: Arc::new(AtomicU32::new(0)),
        };
        (
            Arc::new(v) as Arc<dyn Vcpus>,
            Arc::new(VmmDirtyLog::new(Arc::clone(&mem))) as Arc<dyn DirtyLog>,
            Vec::new(),
        )
    };
    let accel = vcpus.accel().to_owned();
    let mut machine = Machine::new(ram, dirty_log, vcpus);
    for d in vm_devices {
        machine = machine.with_device(d).map_err(|e| e.to_string())?;
    }
    let machine = machine
        .with_device(Arc::clone(&doorbell) as Arc<dyn DeviceState>)
        .map_err(|e| e.to_string())?;
    Ok(Side {
        session: Session::new(machine),
        doorbell,
        accel,
    })
}

fn wait_rings(s: &Side, beyond: u64) -> Result<(), String> {
    let t = Instant::now();
    while s.doorbell.state().0 <= beyond {
        if t.elapsed() > GUARD {
            return Err("the guest does not ring the doorbell: it does not run".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn check(ok: bool, what: String) -> Result<(), String> {
    if ok {
        println!("  ok: {what}");
        Ok(())
    } else {
        Err(what)
    }
}

fn run() -> Result<(), String> {
    let kvm = std::env::var("EMBED_ACCEL").as_deref() != Ok("soft")
        && vmm_glue::kvm::host_facts().is_ok();
    let src = side(kvm, true)?;
    println!("vCPUs: {}", src.accel);
    src.session.start().map_err(|e| e.describe())?;
    wait_rings(&src, 1000)?;

    let dst = side(kvm, false)?;
    dst.session.defer_incoming().map_err(|e| e.describe())?;
    dst.session.stop().map_err(|e| e.describe())?;
    let (a, b) = memory_pair();
    dst.session.incoming_from(b).map_err(|e| e.describe())?;
    src.session
        .update_parameters(|p| {
            p.max_bandwidth = 0;
            p.downtime_limit = Duration::from_secs(1);
        })
        .map_err(|e| e.describe())?;
    let rings_before = src.doorbell.state().0;
    src.session.migrate_to(a).map_err(|e| e.describe())?;
    let s = src.session.wait(GUARD);
    let d = dst.session.wait(GUARD);
    let outcome = |side: &str, i: &vmm_glue::session::MigrationInfo| match &i.error {
        Some(e) => format!("{side}: {}: {}", i.status, e.describe()),
        None => format!("{side}: {}", i.status),
    };
    check(
        s.status == MigrationStatus::Completed,
        outcome("source", &s),
    )?;
    check(
        d.status == MigrationStatus::Completed,
        outcome("destination", &d),
    )?;
    let ram = s.ram.unwrap_or_default();
    println!(
        "  migrated {} KiB in {} ms, guest paused {} ms",
        ram.transferred >> 10,
        s.total_time.unwrap_or_default().as_millis(),
        s.downtime.unwrap_or_default().as_millis()
    );
    check(
        src.doorbell.state().0 > rings_before,
        "the guest ran on the source during the migration".into(),
    )?;
    let (a, b) = (
        verify::digest(src.session.machine().ram()),
        verify::digest(dst.session.machine().ram()),
    );
    check(
        a == b,
        format!("RAM equal on both sides (sha256 {})", &a[0].sha256[..16]),
    )?;
    let (sd, dd) = (src.doorbell.state(), dst.doorbell.state());
    check(
        sd == dd,
        format!(
            "the doorbell's state arrived: {} rings, last value {}",
            dd.0, dd.1
        ),
    )?;
    let counter = dst
        .session
        .machine()
        .ram()
        .memory()
        .read_obj::<u64>(GuestAddress(COUNTER))
        .map_err(|e| e.to_string())?;
    // Paused between its increment and its ring, the counter is one ahead.
    check(
        counter == dd.1 || counter == dd.1 + 1,
        format!(
            "the guest's counter in RAM ({counter}) agrees with the last value it rang ({})",
            dd.1
        ),
    )?;
    dst.session.cont().map_err(|e| e.describe())?;
    wait_rings(&dst, dd.0 + 1000)?;
    dst.session.stop().map_err(|e| e.describe())?;
    let after = dst.doorbell.state();
    check(
        after.1 > dd.1,
        format!(
            "the guest goes on at the destination: counter {} -> {}",
            dd.1, after.1
        ),
    )?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("embed: every check passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("embed: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
