//! The x86_64 parts of the VM: system pages, in-kernel irqchip and PIT, the
//! CPUID the vCPUs get, and the VM-wide state sections.
//!
//! # State sections
//!
//! Each is a [`DeviceState`] of version 1, its data one kvm-bindings struct
//! as its bytes (little-endian x86_64 layout, size asserted below):
//!
//! | name | data | ioctls |
//! | --- | --- | --- |
//! | `kvm.pit` | `kvm_pit_state2` (112 bytes) | `KVM_GET/SET_PIT2` |
//! | `kvm.clock` | `kvm_clock_data` (48 bytes) | `KVM_GET/SET_CLOCK` |
//! | `kvm.pic0` | `kvm_irqchip`, chip 0 (520 bytes) | `KVM_GET/SET_IRQCHIP` |
//! | `kvm.pic1` | `kvm_irqchip`, chip 1 | same |
//! | `kvm.ioapic` | `kvm_irqchip`, chip 2 | same |
//!
//! They are listed, and loaded, in that order (Firecracker's: PIT, clock,
//! then the irqchips), all before the vCPUs run. The clock is loaded with
//! `flags = 0`: kvmclock goes on from the value it had when the source
//! paused, so guest time neither jumps back nor forward over the downtime.
//! When `KVM_GET_CLOCK` lacks `KVM_CLOCK_TSC_STABLE` (no master clock: each
//! vCPU's pvclock page runs on its own), the saved value is the latest of
//! it and what each vCPU's pvclock page gives at that vCPU's TSC now, as
//! QEMU does: the guest's kvmclock never goes back, so a value behind what
//! it has read would stop its clock until kvmclock caught up.

use std::sync::{Arc, Weak};

use kvm_bindings::KVM_CLOCK_TSC_STABLE;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, CpuId, KVM_CAP_TSC_DEADLINE_TIMER,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};

use super::{KvmVmConfig, Slot, VmShared};
use crate::kvm::vcpu::KvmVcpus;
use crate::kvm::wire::{Reader, Writer};
use crate::kvm::{errno_to_io, KvmError};
use crate::session::{DeviceState, StateError, Vcpus};

pub(crate) use kvm_bindings::KVM_CAP_XSAVE2;

const _: () = assert!(std::mem::size_of::<kvm_pit_state2>() == 112);
const _: () = assert!(std::mem::size_of::<kvm_clock_data>() == 48);
const _: () = assert!(std::mem::size_of::<kvm_irqchip>() == 520);

/// CPUID leaf 1 ECX bit 24: TSC deadline timer.
pub(crate) const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID leaf 1 ECX bit 31: running under a hypervisor.
pub(crate) const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Fails when the TSS (3 pages) or identity-map page is above 4 GiB or
/// overlaps a RAM slot.
pub(crate) fn check_system_pages(slots: &[Slot], config: &KvmVmConfig) -> Result<(), KvmError> {
    for (what, addr, len) in [
        ("TSS", config.tss_addr, 3 * 4096u64),
        ("identity map", config.identity_map_addr, 4096),
    ] {
        if addr.checked_add(len).is_none_or(|end| end > 1 << 32) || addr % 4096 != 0 {
            return Err(KvmError::Config {
                why: format!("{what} at {addr:#x} must be page-aligned and below 4 GiB"),
            });
        }
        if let Some(s) = slots
            .iter()
            .find(|s| addr < s.guest_addr + s.size && s.guest_addr < addr + len)
        {
            return Err(KvmError::Config {
                why: format!(
                    "{what} at {addr:#x} overlaps RAM slot {} at {:#x} (size {:#x})",
                    s.id, s.guest_addr, s.size
                ),
            });
        }
    }
    if config.identity_map_addr + 4096 > config.tss_addr
        && config.tss_addr + 3 * 4096 > config.identity_map_addr
    {
        return Err(KvmError::Config {
            why: "the TSS and identity map pages overlap".into(),
        });
    }
    Ok(())
}

/// TSS, identity map, irqchip and PIT, in that order, before any vCPU.
pub(crate) fn setup_vm(fd: &VmFd, config: &KvmVmConfig) -> Result<(), KvmError> {
    let tss = usize::try_from(config.tss_addr).map_err(|_| KvmError::Config {
        why: format!("TSS address {:#x}", config.tss_addr),
    })?;
    fd.set_tss_address(tss)
        .map_err(|e| KvmError::ioctl(format!("KVM_SET_TSS_ADDR {tss:#x}"), e))?;
    fd.set_identity_map_address(config.identity_map_addr)
        .map_err(|e| {
            KvmError::ioctl(
                format!("KVM_SET_IDENTITY_MAP_ADDR {:#x}", config.identity_map_addr),
                e,
            )
        })?;
    fd.create_irq_chip()
        .map_err(|e| KvmError::ioctl("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit)
        .map_err(|e| KvmError::ioctl("KVM_CREATE_PIT2 (KVM_PIT_SPEAKER_DUMMY)", e))?;
    Ok(())
}

/// The CPUID the vCPUs get: `KVM_GET_SUPPORTED_CPUID`, with the TSC-deadline
/// bit set when `KVM_CAP_TSC_DEADLINE_TIMER` says the in-kernel LAPIC has
/// it (KVM always reports that bit as 0), and the hypervisor bit set, so a
/// guest kernel looks for KVM's leaves (`0x4000_0000`: kvmclock, PV EOI,
/// steal time) as it does under QEMU, Firecracker and Cloud Hypervisor.
pub(crate) fn vm_cpuid(kvm: &Kvm) -> Result<CpuId, KvmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| KvmError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    let deadline = kvm.check_extension_raw(KVM_CAP_TSC_DEADLINE_TIMER.into()) > 0;
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= CPUID_1_ECX_HYPERVISOR;
            if deadline {
                e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
            }
        }
    }
    Ok(cpuid)
}

/// The VM-wide state sections, in load order.
pub(crate) fn device_states(
    vm: &Arc<VmShared>,
    vcpus: &Arc<KvmVcpus>,
) -> Vec<Arc<dyn DeviceState>> {
    let vcpus = Arc::downgrade(vcpus);
    let mk = |piece: Piece, name: &'static str| -> Arc<dyn DeviceState> {
        Arc::new(VmPiece {
            vm: vm.clone(),
            vcpus: vcpus.clone(),
            piece,
            name,
        })
    };
    vec![
        mk(Piece::Pit, "kvm.pit"),
        mk(Piece::Clock, "kvm.clock"),
        mk(Piece::Irqchip(KVM_IRQCHIP_PIC_MASTER), "kvm.pic0"),
        mk(Piece::Irqchip(KVM_IRQCHIP_PIC_SLAVE), "kvm.pic1"),
        mk(Piece::Irqchip(KVM_IRQCHIP_IOAPIC), "kvm.ioapic"),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Piece {
    Pit,
    Clock,
    Irqchip(u32),
}

/// One VM-wide state section.
struct VmPiece {
    vm: Arc<VmShared>,
    vcpus: Weak<KvmVcpus>,
    piece: Piece,
    name: &'static str,
}

impl VmPiece {
    fn check_paused(&self, op: &str) -> Result<(), StateError> {
        match self.vcpus.upgrade() {
            Some(v) if v.running() => Err(StateError::InvalidState(format!(
                "cannot {op} {} while the vCPUs run",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    fn host(&self, op: &str, e: kvm_ioctls::Error) -> StateError {
        StateError::host(format!("{op} ({})", self.name), errno_to_io(e))
    }
}

impl DeviceState for VmPiece {
    fn name(&self) -> &str {
        self.name
    }

    fn version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<Vec<u8>, StateError> {
        self.check_paused("save")?;
        let fd = &self.vm.fd;
        let mut w = Writer::new();
        match self.piece {
            Piece::Pit => {
                let pit = fd.get_pit2().map_err(|e| self.host("KVM_GET_PIT2", e))?;
                w.raw(&pit);
            }
            Piece::Clock => {
                let mut clock = fd.get_clock().map_err(|e| self.host("KVM_GET_CLOCK", e))?;
                if clock.flags & KVM_CLOCK_TSC_STABLE == 0 {
                    // Without a stable TSC each vCPU's pvclock page runs on
                    // its own, and the guest may have read a time ahead of
                    // KVM_GET_CLOCK. Its clocksource never goes back, so a
                    // destination starting from the lower value would leave
                    // guest time standing still until kvmclock caught up.
                    // Carry the latest time the guest can have seen.
                    let guest = match self.vcpus.upgrade() {
                        Some(v) => v.pvclock_max()?,
                        None => None,
                    };
                    clock.clock = clock.clock.max(guest.unwrap_or(0));
                }
                w.raw(&clock);
            }
            Piece::Irqchip(chip) => {
                let mut ic = kvm_irqchip {
                    chip_id: chip,
                    ..Default::default()
                };
                fd.get_irqchip(&mut ic)
                    .map_err(|e| self.host("KVM_GET_IRQCHIP", e))?;
                w.raw(&ic);
            }
        }
        Ok(w.finish())
    }

    fn load(&self, version: u32, data: &[u8]) -> Result<(), StateError> {
        if version != 1 {
            return Err(StateError::malformed(
                self.name,
                format!("version {version}, this side reads 1"),
            ));
        }
        self.check_paused("load")?;
        let fd = &self.vm.fd;
        let mut r = Reader::new(self.name, data);
        match self.piece {
            Piece::Pit => {
                let pit: kvm_pit_state2 = r.raw()?;
                r.end()?;
                fd.set_pit2(&pit)
                    .map_err(|e| self.host("KVM_SET_PIT2", e))?;
            }
            Piece::Clock => {
                let saved: kvm_clock_data = r.raw()?;
                r.end()?;
                let clock = kvm_clock_data {
                    clock: saved.clock,
                    ..Default::default()
                };
                fd.set_clock(&clock)
                    .map_err(|e| self.host("KVM_SET_CLOCK", e))?;
            }
            Piece::Irqchip(chip) => {
                let ic: kvm_irqchip = r.raw()?;
                r.end()?;
                if ic.chip_id != chip {
                    return Err(
                        r.malformed(format!("holds irqchip {}, expected {chip}", ic.chip_id))
                    );
                }
                fd.set_irqchip(&ic)
                    .map_err(|e| self.host("KVM_SET_IRQCHIP", e))?;
            }
        }
        Ok(())
    }
}
