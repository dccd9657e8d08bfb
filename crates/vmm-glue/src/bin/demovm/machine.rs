//! The VM of `demovm`, built only from the public API of `vmm-glue`, as any
//! VMM would build its own: guest memory like a small PC on the backend asked
//! for ([`crate::memory`]), vCPUs on KVM (or the soft stand-in), COM1 with its
//! interrupt on KVM, the balloon ([`crate::balloon`]), the guest (a built-in
//! workload, a boot sector or a Linux kernel), and a migration session over
//! all of it.

use std::path::PathBuf;
use std::sync::Arc;

use migration_ram::balloon::BalloonInhibitor;
use migration_ram::{DirtyLog, VmmDirtyLog};
use serde_json::{json, Map, Value};
use uffd_sys::host_memory::MlockMode;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_glue::boot::linux::{self as linux_boot, LinuxImage};
use vmm_glue::guest::{self, boot_sector, builtin, Workload};
use vmm_glue::io::IoHandler;
use vmm_glue::kvm::{self, KvmVcpus, KvmVm, KvmVmConfig, LongModeEntry};
use vmm_glue::qmp::adapter::QmpExtension;
use vmm_glue::qmp::server::QmpError;
use vmm_glue::serial::{Serial, SerialConfig, COM1_IRQ};
use vmm_glue::session::{DeviceState, GuestRam, Machine, Session, Vcpus};
use vmm_glue::soft::SoftVcpus;
use vmm_glue::verify;

use crate::balloon::{Balloon, OperatorInhibit};
use crate::memory::{self, MemBackend, RegionInfo, HIGH_RAM_START};

/// What the guest runs.
#[derive(Debug, Clone)]
pub enum GuestSpec {
    /// A built-in 64-bit workload.
    Builtin(Workload),
    /// A boot sector, started in real mode at 0000:7c00 (KVM only).
    BootSector(PathBuf),
    /// A Linux bzImage through the 64-bit boot protocol (KVM only).
    Linux(LinuxImage),
}

impl GuestSpec {
    /// Parses `builtin:ab|random|idle|balloon` or a file path.
    pub fn parse(s: &str) -> Result<GuestSpec, String> {
        match s.strip_prefix("builtin:") {
            Some(w) => Workload::parse(w)
                .map(GuestSpec::Builtin)
                .ok_or_else(|| format!("unknown built-in guest {w:?} (ab, random, idle, balloon)")),
            None => Ok(GuestSpec::BootSector(PathBuf::from(s))),
        }
    }
}

impl std::fmt::Display for GuestSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestSpec::Builtin(w) => write!(f, "builtin:{}", w.name()),
            GuestSpec::BootSector(p) => write!(f, "{}", p.display()),
            GuestSpec::Linux(l) => write!(f, "linux:{}", l.kernel.display()),
        }
    }
}

/// Which accelerator runs the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM where `/dev/kvm` works, soft vCPUs otherwise (said loudly).
    Auto,
    /// KVM, or a clear error.
    Kvm,
    /// Soft vCPUs: host threads running the built-in workloads.
    Soft,
}

/// What `demovm` is built from.
pub struct Config {
    /// Top of guest-physical memory in bytes (RAM minus the hole).
    pub mem: u64,
    /// What backs guest RAM.
    pub mem_backend: MemBackend,
    /// vCPUs.
    pub vcpus: usize,
    /// The guest.
    pub guest: GuestSpec,
    /// COM1's backends.
    pub serial: SerialConfig,
    /// The accelerator asked for.
    pub accel: Accel,
    /// Dirty ring entries per vCPU (KVM), or the dirty bitmap.
    pub dirty_ring: Option<u32>,
    /// Whether guest memory is locked in RAM.
    pub mlock: bool,
    /// Whether the guest comes from an incoming migration (nothing is loaded).
    pub incoming: bool,
    /// Whether RAM's digest is taken at every background snapshot's instant.
    pub snapshot_digest: bool,
}

/// COM1 and the balloon, on the port bus.
struct Bus {
    com1: Arc<Serial>,
    balloon: Arc<Balloon>,
}

impl IoHandler for Bus {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match (self.com1.port_read(port), data) {
            (Some(v), [b]) => {
                *b = v;
                true
            }
            _ => false,
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match data {
            [b] => self.com1.port_write(port, *b),
            _ => self.balloon.port_write(port, data),
        }
    }
    fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
        false
    }
    fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
        false
    }
}

/// A built VM.
pub struct Demo {
    /// The migration session over it.
    pub session: Arc<Session>,
    /// What `x-guest-info` answers.
    pub info: Arc<GuestInfo>,
}

/// `x-guest-info`: what runs and how it fares.
pub struct GuestInfo {
    /// `kvm` or `soft`.
    pub accel: &'static str,
    /// Why this accelerator, when it was not asked for.
    pub accel_note: Option<String>,
    /// vCPUs.
    pub vcpus: usize,
    /// The guest, as given.
    pub guest: String,
    /// What backs guest RAM.
    pub mem_backend: MemBackend,
    /// The RAM regions.
    pub ram: Vec<RegionInfo>,
    com1: Arc<Serial>,
    balloon: Arc<Balloon>,
    /// The operator's balloon inhibitor (`x-balloon-inhibit`).
    inhibit: Arc<OperatorInhibit>,
    kvm: Option<Arc<KvmVcpus>>,
    /// Which dirty log a migration reads.
    pub dirty_log: &'static str,
    /// The RAM digest taken at the last background snapshot's instant
    /// (`--x-snapshot-digest`, for tests).
    snapshot_digest: Option<Arc<parking_lot::Mutex<Option<Value>>>>,
}

impl GuestInfo {
    /// `x-guest-info`.
    fn guest_info(&self) -> Value {
        let unhandled = self.kvm.as_ref().map(|v| {
            let u = v.unhandled_io();
            json!({
                "pio-reads": u.pio_reads,
                "pio-writes": u.pio_writes,
                "mmio-reads": u.mmio_reads,
                "mmio-writes": u.mmio_writes,
            })
        });
        let ram: Vec<Value> = self
            .ram
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "start": r.start,
                    "size": r.size,
                    "page-size": r.page_size,
                    "backing": r.backing,
                })
            })
            .collect();
        let b = self.balloon.counters();
        json!({
            "accel": self.accel,
            "accel-note": self.accel_note,
            "vcpus": self.vcpus,
            "guest": self.guest,
            "mem-backend": self.mem_backend.name(),
            "ram": ram,
            "dirty-log": self.dirty_log,
            "serial-bytes": self.com1.tx_count(),
            "unhandled-io": unhandled,
            "balloon": {
                "requests": b.requests,
                "honoured": b.honoured,
                "dropped": b.dropped,
                "refused": b.refused,
                "pages-given-back": b.pages_given_back,
                "inhibited": self.balloon.inhibited(),
            },
        })
    }

    /// `x-balloon-inhibit {"inhibit": bool}`: drop balloon requests as while a
    /// postcopy migration runs, or stop dropping them.
    fn balloon_inhibit(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if let Some(k) = args.keys().find(|k| *k != "inhibit") {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let on = match args.get("inhibit") {
            None => return Err(QmpError::generic("Parameter 'inhibit' is missing")),
            Some(v) => v.as_bool().ok_or_else(|| {
                QmpError::generic("Invalid parameter type for 'inhibit', expected: boolean")
            })?,
        };
        self.inhibit.set(on);
        Ok(json!({}))
    }
}

impl QmpExtension for GuestInfo {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>> {
        match command {
            "x-guest-info" => Some(match args.keys().next() {
                Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
                None => Ok(self.guest_info()),
            }),
            "x-balloon-inhibit" => Some(self.balloon_inhibit(args)),
            "x-snapshot-digest" => Some(match &self.snapshot_digest {
                None => Err(QmpError::generic(
                    "no snapshot digest is taken: start demovm with --x-snapshot-digest",
                )),
                Some(d) => d
                    .lock()
                    .clone()
                    .ok_or_else(|| QmpError::generic("no background snapshot has been taken yet")),
            }),
            _ => None,
        }
    }
}

/// A digest as `x-ram-digest` answers it.
fn digest_reply(d: &[verify::RegionDigest]) -> Value {
    let blocks: Vec<Value> = d
        .iter()
        .map(|d| json!({ "name": d.name, "size": d.size, "digest": d.sha256 }))
        .collect();
    json!({ "algorithm": verify::DIGEST_ALGORITHM, "blocks": blocks })
}

/// The accelerator to use, and why when it was not asked for.
fn choose_accel(asked: Accel) -> Result<(&'static str, Option<String>), String> {
    match (asked, kvm::host_facts()) {
        (Accel::Soft, _) => Ok(("soft", Some("soft vCPUs asked for (--accel soft)".into()))),
        (Accel::Kvm | Accel::Auto, Ok(_)) => Ok(("kvm", None)),
        (Accel::Kvm, Err(e)) => Err(format!(
            "--accel kvm: KVM is not usable here: {}",
            vmm_glue::error_chain(&e)
        )),
        (Accel::Auto, Err(e)) => Ok((
            "soft",
            Some(format!(
                "KVM is not usable here ({}): soft vCPUs run the guest",
                vmm_glue::error_chain(&e)
            )),
        )),
    }
}

/// Reads and checks a boot sector.
fn read_boot_sector(path: &PathBuf) -> Result<Vec<u8>, String> {
    let data = std::fs::read(path)
        .map_err(|e| format!("cannot read boot sector {}: {e}", path.display()))?;
    if data.len() != boot_sector::SECTOR_SIZE {
        return Err(format!(
            "boot sector {} is {} bytes, not {}",
            path.display(),
            data.len(),
            boot_sector::SECTOR_SIZE
        ));
    }
    if data[510..] != [0x55, 0xaa] {
        return Err(format!(
            "{} has no boot signature (0x55 0xAA at offset 510)",
            path.display()
        ));
    }
    Ok(data)
}

/// Builds the VM: memory, devices, vCPUs with the guest loaded (unless it comes
/// from a migration), and a session over them.
pub fn build(c: &Config) -> Result<Demo, String> {
    let ram_built = memory::build(c.mem, c.mem_backend).map_err(|e| vmm_glue::error_chain(&e))?;
    let mem = Arc::clone(&ram_built.mem);
    let mut ram = GuestRam::new(Arc::clone(&mem), ram_built.ram_regions())
        .map_err(|e| vmm_glue::error_chain(&e))?;
    if c.mlock {
        for region in mem.iter() {
            let len = usize::try_from(region.len()).map_err(|e| e.to_string())?;
            uffd_sys::host_memory::mlock_guest(&mem, region.start_addr(), len, MlockMode::Populate)
                .map_err(|e| {
                    format!(
                        "--mlock: cannot lock guest memory at {:#x}: {} (RLIMIT_MEMLOCK?)",
                        region.start_addr().0,
                        vmm_glue::error_chain(&e)
                    )
                })?;
        }
        ram = ram.with_locked(MlockMode::Populate);
    }
    let com1 = Arc::new(Serial::com1(&c.serial).map_err(|e| format!("COM1: {e}"))?);
    // One inhibitor: the session holds it while postcopy runs, the operator
    // through x-balloon-inhibit.
    let inhibitor = Arc::new(BalloonInhibitor::new());
    let inhibit = Arc::new(OperatorInhibit::new(Arc::clone(&inhibitor)));
    let balloon = Arc::new(Balloon::new(
        Arc::clone(&mem),
        c.vcpus,
        Arc::clone(&inhibitor),
    ));
    let bus: Arc<dyn IoHandler> = Arc::new(Bus {
        com1: Arc::clone(&com1),
        balloon: Arc::clone(&balloon),
    });
    let sector = match &c.guest {
        GuestSpec::BootSector(p) if !c.incoming => Some(read_boot_sector(p)?),
        _ => None,
    };
    let (accel, accel_note) = choose_accel(c.accel)?;
    let mut devices: Vec<Arc<dyn DeviceState>> = Vec::new();
    let (vcpus, dirty_log, kvm_vcpus, dirty_name): (
        Arc<dyn Vcpus>,
        Arc<dyn DirtyLog>,
        _,
        &'static str,
    ) = if accel == "kvm" {
        let mut config = KvmVmConfig::new(c.vcpus);
        if let Some(n) = c.dirty_ring {
            config = config.with_dirty_ring_or_bitmap(n);
        }
        let vm = KvmVm::new(&ram, config).map_err(|e| vmm_glue::error_chain(&e))?;
        let vcpus = vm.vcpus();
        vcpus.set_io_handler(Arc::clone(&bus));
        // COM1's interrupt; the built-in guests and boot sectors poll and
        // never enable it.
        let irq = vm.irqfd(COM1_IRQ).map_err(|e| vmm_glue::error_chain(&e))?;
        com1.connect_interrupt(irq);
        let kerr = |e: kvm::KvmError| vmm_glue::error_chain(&e);
        if !c.incoming {
            match (&c.guest, &sector) {
                (GuestSpec::Builtin(w), _) => {
                    let prog = builtin::program(*w);
                    mem.write_slice(&prog.code, GuestAddress(prog.load_addr))
                        .map_err(|e| format!("loading the guest: {e}"))?;
                    let entries: Vec<LongModeEntry> = guest::slices(HIGH_RAM_START, c.mem, c.vcpus)
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .zip(0u64..)
                        .map(|((start, end), i)| {
                            LongModeEntry::new(prog.entry, 0).with_args([start, end, i, 0])
                        })
                        .collect();
                    vcpus.boot_long_mode(&entries).map_err(kerr)?;
                }
                (GuestSpec::BootSector(_), Some(sector)) => {
                    mem.write_slice(sector, GuestAddress(u64::from(boot_sector::LOAD_ADDR)))
                        .map_err(|e| format!("loading the boot sector: {e}"))?;
                    vcpus.boot_real_mode().map_err(kerr)?;
                }
                (GuestSpec::BootSector(_), None) => {}
                (GuestSpec::Linux(image), _) => {
                    let loaded = linux_boot::load(&mem, image, c.vcpus)
                        .map_err(|e| vmm_glue::error_chain(&e))?;
                    log::info!(
                        "Linux loaded: kernel {:#x}..{:#x} (boot protocol {:#06x}), initrd {:?}",
                        loaded.kernel.0,
                        loaded.kernel.1,
                        loaded.protocol,
                        loaded.initrd
                    );
                    vcpus.boot_linux(loaded.entry).map_err(kerr)?;
                }
            }
        }
        devices.extend(vm.device_states());
        let name = if vm.dirty_ring_entries().is_some() {
            "kvm-dirty-ring"
        } else if vm.manual_protect() {
            "kvm-bitmap-manual-protect"
        } else {
            "kvm-bitmap"
        };
        (
            Arc::clone(&vcpus) as Arc<dyn Vcpus>,
            vm.dirty_log(Arc::clone(&mem)),
            Some(vcpus),
            name,
        )
    } else {
        let GuestSpec::Builtin(w) = c.guest else {
            return Err(format!(
                "boot-sector and Linux guests need KVM ({}); soft vCPUs run only the built-in \
                 guests",
                accel_note.as_deref().unwrap_or("soft vCPUs asked for")
            ));
        };
        let vcpus = SoftVcpus::new(Arc::clone(&mem), bus, w, c.vcpus, HIGH_RAM_START, c.mem)
            .map_err(|e| vmm_glue::error_chain(&e))?;
        (
            Arc::new(vcpus) as Arc<dyn Vcpus>,
            Arc::new(VmmDirtyLog::new(Arc::clone(&mem))) as Arc<dyn DirtyLog>,
            None,
            "vm-memory-bitmap",
        )
    };
    balloon.attach(vcpus.thread_ids());
    devices.push(Arc::clone(&com1) as Arc<dyn DeviceState>);
    devices.push(Arc::clone(&balloon) as Arc<dyn DeviceState>);
    let mut machine = Machine::new(ram, dirty_log, vcpus).with_balloon_inhibitor(inhibitor);
    for d in devices {
        machine = machine
            .with_device(d)
            .map_err(|e| vmm_glue::error_chain(&e))?;
    }
    let session = Arc::new(Session::new(machine));
    let snapshot_digest = c.snapshot_digest.then(|| {
        let slot: Arc<parking_lot::Mutex<Option<Value>>> = Arc::default();
        let hook_slot = Arc::clone(&slot);
        session.on_snapshot_instant(Box::new(move |m| {
            *hook_slot.lock() = Some(digest_reply(&verify::digest(m.ram())));
        }));
        slot
    });
    Ok(Demo {
        session,
        info: Arc::new(GuestInfo {
            snapshot_digest,
            accel,
            accel_note,
            vcpus: c.vcpus,
            guest: c.guest.to_string(),
            mem_backend: ram_built.backend,
            ram: ram_built.regions,
            com1,
            balloon,
            inhibit,
            kvm: kvm_vcpus,
            dirty_log: dirty_name,
        }),
    })
}
