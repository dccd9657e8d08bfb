//! The KVM VM: its fd, memory slots and vCPUs, and the pieces a migration
//! session takes from it (vCPUs, dirty log, device state).
//!
//! [`KvmVm::new`] does, in this order (KVM-NOTES section 1):
//!
//! 1. `KVM_CREATE_VM`;
//! 2. the dirty ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`) when asked, which
//!    must come before any vCPU;
//! 3. the x86 set-up in [`x86_64`]: `KVM_SET_TSS_ADDR`,
//!    `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`;
//! 4. one memory slot per vm-memory region (slot `i` = region `i` =
//!    `ram.regions()[i]`);
//! 5. manual dirty-log protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, with
//!    `KVM_DIRTY_LOG_INITIALLY_SET` where offered) when there is no ring
//!    and the configuration does not turn it off;
//! 6. the vCPUs, each on its own thread, paused ([`KvmVcpus`]).

pub mod x86_64;

use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, CpuId, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use migration_ram::{CompositeDirtyLog, DirtyLog, VmmDirtyLog};
use parking_lot::Mutex;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::dirty_log::{KvmDirtyLog, KvmDirtyRing, RingShared};
use super::vcpu::KvmVcpus;
use super::{errno_to_io, KvmError};
use crate::session::{DeviceState, GuestRam};
use crate::GuestMemoryMmap;

/// Size of one dirty ring entry (`struct kvm_dirty_gfn`).
const DIRTY_GFN_BYTES: u32 = 16;

/// How to build a [`KvmVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvmVmConfig {
    /// Number of vCPUs (at least 1).
    pub vcpus: usize,
    /// Dirty ring entries per vCPU (a power of two, at least 1024; KVM
    /// recommends 4096 or more), or `None` for the dirty bitmap. The VM
    /// fails to build if the host lacks the ring, unless `ring_fallback`.
    pub dirty_ring: Option<u32>,
    /// With `dirty_ring`: use the dirty bitmap where the host has no ring
    /// (saying so in the log) instead of failing.
    pub ring_fallback: bool,
    /// Use manual dirty-log protect (`KVM_CLEAR_DIRTY_LOG`) where the host
    /// offers it (the default); off, `KVM_GET_DIRTY_LOG` re-protects whole
    /// slots itself.
    pub manual_protect: bool,
    /// `KVM_SET_TSS_ADDR`: three pages below 4 GiB that no RAM slot or MMIO
    /// range overlaps.
    pub tss_addr: u64,
    /// `KVM_SET_IDENTITY_MAP_ADDR`: one page below 4 GiB outside RAM.
    pub identity_map_addr: u64,
}

impl KvmVmConfig {
    /// `vcpus` vCPUs, the dirty bitmap, TSS at `0xfffb_d000` and the
    /// identity map page at `0xfffb_c000`, just below the BIOS area at the
    /// top of the 4 GiB space.
    pub fn new(vcpus: usize) -> Self {
        KvmVmConfig {
            vcpus,
            dirty_ring: None,
            ring_fallback: false,
            manual_protect: true,
            tss_addr: 0xfffb_d000,
            identity_map_addr: 0xfffb_c000,
        }
    }

    /// With a dirty ring of `entries` per vCPU; building fails where the
    /// host has none.
    pub fn with_dirty_ring(mut self, entries: u32) -> Self {
        self.dirty_ring = Some(entries);
        self.ring_fallback = false;
        self
    }

    /// With a dirty ring of `entries` per vCPU where the host has one, else
    /// the dirty bitmap ([`KvmVm::dirty_ring_entries`] tells which).
    pub fn with_dirty_ring_or_bitmap(mut self, entries: u32) -> Self {
        self.dirty_ring = Some(entries);
        self.ring_fallback = true;
        self
    }

    /// Without manual dirty-log protect, even where the host offers it.
    pub fn without_manual_protect(mut self) -> Self {
        self.manual_protect = false;
        self
    }

    /// With the TSS (3 pages) and identity map (1 page) at these addresses.
    pub fn with_system_pages(mut self, tss_addr: u64, identity_map_addr: u64) -> Self {
        self.tss_addr = tss_addr;
        self.identity_map_addr = identity_map_addr;
        self
    }
}

/// One memory slot: a vm-memory region as KVM sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    /// The slot id (= the region's index).
    pub(crate) id: u32,
    /// Guest physical address.
    pub(crate) guest_addr: u64,
    /// Size in bytes.
    pub(crate) size: u64,
    /// Host virtual address of the mapping.
    pub(crate) host_addr: u64,
}

/// What every part of the KVM VM shares: the fds, the slots and what the
/// host offers.
pub(crate) struct VmShared {
    /// The VM fd. Declared before `mem`, so it closes first.
    pub(crate) fd: VmFd,
    /// The system fd.
    pub(crate) kvm: Kvm,
    /// The slots, in region order.
    pub(crate) slots: Vec<Slot>,
    /// The flags the slots are registered with now.
    slot_flags: Mutex<u32>,
    /// Manual dirty-log protect flags enabled (0: off).
    pub(crate) manual_protect: u32,
    /// Dirty ring size in bytes per vCPU (0: no ring).
    pub(crate) ring_bytes: u32,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`: the XSAVE area size, 0 without
    /// the extension (then the legacy 4096 bytes).
    pub(crate) xsave2_size: usize,
    /// The CPUID every vCPU gets (supported CPUID, TSC deadline added).
    pub(crate) cpuid: CpuId,
    /// What this host offers a guest, for checking an incoming CPUID: the
    /// supported CPUID ORed with what vCPU 0 reports back after
    /// `KVM_SET_CPUID2` (some hosts, PVM among them, give vCPUs more than
    /// `KVM_GET_SUPPORTED_CPUID` lists). Set when vCPU 0 is created.
    pub(crate) offered_cpuid: OnceLock<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    /// The MSRs to migrate, found readable at the first save.
    pub(crate) msrs: OnceLock<Vec<u32>>,
    /// The guest memory, mapped for as long as the VM lives.
    pub(crate) mem: Arc<GuestMemoryMmap>,
}

impl VmShared {
    /// Registers every slot again with `flags` (`KVM_MEM_LOG_DIRTY_PAGES` on
    /// or off).
    pub(crate) fn set_slot_flags(&self, flags: u32) -> Result<(), KvmError> {
        let mut cur = self.slot_flags.lock();
        for s in &self.slots {
            self.register(s, flags)?;
        }
        *cur = flags;
        Ok(())
    }

    /// Whether the slots log dirty pages now.
    pub(crate) fn logging(&self) -> bool {
        *self.slot_flags.lock() & KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    fn register(&self, s: &Slot, flags: u32) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: s.id,
            flags,
            guest_phys_addr: s.guest_addr,
            memory_size: s.size,
            userspace_addr: s.host_addr,
        };
        // SAFETY: `userspace_addr..+memory_size` is the mapping of one
        // vm-memory region of `self.mem`, which this struct keeps alive for
        // as long as the VM fd (declared first, so closed first) can reach
        // it; the kernel only reads and writes guest RAM there, which the
        // VMM treats as shared, volatile memory through vm-memory anyway.
        // Slots never overlap: vm-memory regions do not.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| {
            KvmError::ioctl(
                format!(
                    "KVM_SET_USER_MEMORY_REGION slot {} at {:#x} (size {:#x}, flags {flags:#x})",
                    s.id, s.guest_addr, s.size
                ),
                e,
            )
        })
    }
}

/// A KVM VM over a VMM's guest RAM, with its vCPUs.
///
/// Dropping it stops and joins every vCPU thread (when no other holder of
/// [`KvmVm::vcpus`] is left).
pub struct KvmVm {
    shared: Arc<VmShared>,
    ring: Option<Arc<RingShared>>,
    vcpus: Arc<KvmVcpus>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("slots", &self.shared.slots)
            .field("vcpus", &self.vcpus.count_vcpus())
            .field("dirty_ring_bytes", &self.shared.ring_bytes)
            .finish()
    }
}

impl KvmVm {
    /// Builds the VM (see the module documentation for the steps): one
    /// memory slot per region of `ram.memory()`, `config.vcpus` paused
    /// vCPUs. Errors name the ioctl that failed.
    pub fn new(ram: &GuestRam, config: KvmVmConfig) -> Result<KvmVm, KvmError> {
        let mem = ram.memory().clone();
        if ram.regions().len() != mem.num_regions() {
            return Err(KvmError::Config {
                why: format!(
                    "{} region names for {} memory regions",
                    ram.regions().len(),
                    mem.num_regions()
                ),
            });
        }
        if config.vcpus == 0 {
            return Err(KvmError::Config {
                why: "a VM needs at least one vCPU".into(),
            });
        }
        let kvm = Kvm::new().map_err(|e| KvmError::Open(errno_to_io(e)))?;
        let max = kvm.get_max_vcpus();
        if config.vcpus > max {
            return Err(KvmError::Config {
                why: format!("{} vCPUs, this host allows {max}", config.vcpus),
            });
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| KvmError::ioctl("KVM_CREATE_VM", e))?;

        let ring_bytes = match config.dirty_ring {
            None => 0,
            Some(entries) => match enable_dirty_ring(&fd, entries) {
                Err(KvmError::Unsupported { what }) if config.ring_fallback => {
                    log::warn!("this host's KVM lacks {what}: using the dirty bitmap instead");
                    0
                }
                other => other?,
            },
        };

        let slots = mem
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let id = u32::try_from(i).map_err(|_| KvmError::Config {
                    why: format!("too many memory regions ({})", mem.num_regions()),
                })?;
                // vm-memory gives the host address of the region's mapping.
                let host = r.as_ptr() as u64;
                Ok(Slot {
                    id,
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                    host_addr: host,
                })
            })
            .collect::<Result<Vec<_>, KvmError>>()?;

        x86_64::check_system_pages(&slots, &config)?;
        x86_64::setup_vm(&fd, &config)?;

        let manual_protect = if ring_bytes == 0 && config.manual_protect {
            enable_manual_protect(&fd)?
        } else {
            0
        };
        let xsave2_size =
            usize::try_from(fd.check_extension_raw(x86_64::KVM_CAP_XSAVE2.into())).unwrap_or(0);
        let cpuid = x86_64::vm_cpuid(&kvm)?;

        let shared = Arc::new(VmShared {
            fd,
            kvm,
            slots,
            slot_flags: Mutex::new(0),
            manual_protect,
            ring_bytes,
            xsave2_size,
            cpuid,
            offered_cpuid: OnceLock::new(),
            msrs: OnceLock::new(),
            mem,
        });
        for s in &shared.slots {
            shared.register(s, 0)?;
        }
        let ring = (ring_bytes > 0).then(|| Arc::new(RingShared::new(&shared, config.vcpus)));
        let vcpus = Arc::new(KvmVcpus::create(&shared, config.vcpus, ring.clone())?);
        Ok(KvmVm {
            shared,
            ring,
            vcpus,
        })
    }

    /// The vCPUs (a [`crate::session::Vcpus`]).
    pub fn vcpus(&self) -> Arc<KvmVcpus> {
        self.vcpus.clone()
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.shared.mem
    }

    /// Dirty ring entries per vCPU, or `None` when the VM uses the bitmap.
    pub fn dirty_ring_entries(&self) -> Option<u32> {
        (self.shared.ring_bytes > 0).then_some(self.shared.ring_bytes / DIRTY_GFN_BYTES)
    }

    /// Whether manual dirty-log protect (`KVM_CLEAR_DIRTY_LOG`) is on.
    pub fn manual_protect(&self) -> bool {
        self.shared.manual_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
    }

    /// KVM's own dirty log of this VM: the ring when the VM was built with
    /// one ([`KvmDirtyRing`]), else the bitmap ([`KvmDirtyLog`]). It sees
    /// what the vCPUs write, not what the VMM writes.
    pub fn kvm_dirty_log(&self) -> Arc<dyn DirtyLog> {
        match &self.ring {
            Some(ring) => Arc::new(KvmDirtyRing::new(ring.clone(), self.vcpus.clone())),
            None => Arc::new(KvmDirtyLog::new(self.shared.clone())),
        }
    }

    /// The dirty log a migration session reads: KVM's log
    /// ([`KvmVm::kvm_dirty_log`]) merged with the writes the VMM makes
    /// through vm-memory ([`VmmDirtyLog`] over `mem`, normally
    /// [`KvmVm::memory`]).
    pub fn dirty_log(&self, mem: Arc<GuestMemoryMmap>) -> Arc<dyn DirtyLog> {
        Arc::new(CompositeDirtyLog::new(vec![
            self.kvm_dirty_log(),
            Arc::new(VmmDirtyLog::new(mem)),
        ]))
    }

    /// An interrupt line on `gsi` through an irqfd (`KVM_IRQFD`): each
    /// [`Interrupt::trigger`](crate::io::Interrupt::trigger) injects one
    /// edge into the in-kernel irqchip (GSIs 0 to 15 reach both the PIC and
    /// the IOAPIC pin of that number, 16 to 23 the IOAPIC), without a vCPU
    /// exit or a lock of the VMM. The line stays registered as long as the
    /// VM lives.
    pub fn irqfd(&self, gsi: u32) -> Result<Arc<KvmIrq>, KvmError> {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
            KvmError::Ioctl {
                op: "eventfd for an irqfd".into(),
                source,
            }
        })?;
        self.shared
            .fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| KvmError::ioctl(format!("KVM_IRQFD on GSI {gsi}"), e))?;
        Ok(Arc::new(KvmIrq { evt, gsi }))
    }

    /// The VM-wide state sections, in load order: `kvm.pit`, `kvm.clock`,
    /// `kvm.pic0`, `kvm.pic1`, `kvm.ioapic` (see [`x86_64`]). A session
    /// loads them before the vCPU state, and the vCPUs run only after both.
    pub fn device_states(&self) -> Vec<Arc<dyn DeviceState>> {
        x86_64::device_states(&self.shared, &self.vcpus)
    }
}

/// An interrupt line of a [`KvmVm`] (see [`KvmVm::irqfd`]).
#[derive(Debug)]
pub struct KvmIrq {
    evt: vmm_sys_util::eventfd::EventFd,
    gsi: u32,
}

impl KvmIrq {
    /// The GSI it raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl crate::io::Interrupt for KvmIrq {
    fn trigger(&self) -> std::io::Result<()> {
        match self.evt.write(1) {
            Ok(()) => Ok(()),
            // The counter is full: interrupts are pending anyway.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Enables the dirty ring (`_ACQ_REL` where offered) with `entries` per
/// vCPU; returns its size in bytes.
fn enable_dirty_ring(fd: &VmFd, entries: u32) -> Result<u32, KvmError> {
    let acq_rel = fd.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
    let plain = fd.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
    let (cap, name, max) = if acq_rel > 0 {
        (
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            acq_rel,
        )
    } else if plain > 0 {
        (KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING", plain)
    } else {
        return Err(KvmError::Unsupported {
            what: "a dirty ring (KVM_CAP_DIRTY_LOG_RING)".into(),
        });
    };
    let bytes = entries
        .checked_mul(DIRTY_GFN_BYTES)
        .filter(|b| entries >= 1024 && b.is_power_of_two())
        .ok_or_else(|| KvmError::Config {
            why: format!("dirty ring of {entries} entries: must be a power of two, at least 1024"),
        })?;
    let max = u32::try_from(max).unwrap_or(0);
    if bytes > max {
        return Err(KvmError::Unsupported {
            what: format!("a dirty ring of {bytes} bytes ({name} allows {max})"),
        });
    }
    let mut cap = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    fd.enable_cap(&cap)
        .map_err(|e| KvmError::ioctl(format!("KVM_ENABLE_CAP {name} ({bytes} bytes)"), e))?;
    Ok(bytes)
}

/// Turns manual dirty-log protect on where offered (with initially-set where
/// offered); returns the flags enabled (0 when absent).
fn enable_manual_protect(fd: &VmFd) -> Result<u32, KvmError> {
    let offered = u32::try_from(fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()))
        .unwrap_or(0);
    let flags = offered & (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    if flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return Ok(0);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(flags);
    fd.enable_cap(&cap).map_err(|e| {
        KvmError::ioctl(
            format!("KVM_ENABLE_CAP KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ({flags:#x})"),
            e,
        )
    })?;
    Ok(flags)
}
