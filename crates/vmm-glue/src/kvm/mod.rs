//! KVM for the migration VMM: the system fd and host facts (here), the VM
//! ([`vm`]), its vCPUs ([`vcpu`]) and its dirty-page tracking ([`dirty_log`]).
//!
//! This is the only module of the crate allowed `unsafe` code; every block says
//! why it is sound. The layout follows one folder per concern and one file per
//! architecture:
//!
//! | file | what |
//! | --- | --- |
//! | `kvm/mod.rs` | `/dev/kvm`, [`host_facts`], [`KvmError`] |
//! | `kvm/vm.rs` | [`KvmVm`]: the VM fd, memory slots, vCPU creation |
//! | `kvm/vm/x86_64.rs` | TSS and identity map, irqchip, PIT, and the VM state sections (PIC, IOAPIC, PIT, kvmclock) |
//! | `kvm/vcpu.rs` | [`KvmVcpus`]: vCPU threads, the run loop, kicking, [`IoHandler`] |
//! | `kvm/vcpu/x86_64.rs` | CPUID, boot set-up (real mode, long mode), register/MSR/LAPIC state and its save/restore order |
//! | `kvm/dirty_log.rs` | [`KvmDirtyLog`] (bitmap, manual protect) and [`KvmDirtyRing`] |
//! | `kvm/wire.rs` | the little-endian encoding of the state sections |
//! | `kvm/abi.rs` | the ioctls kvm-ioctls lacks, checked against the kernel ABI |
//!
//! A VMM builds a [`KvmVm`] over its [`GuestRam`](crate::session::GuestRam),
//! plugs its devices in through [`KvmVcpus::set_io_handler`], sets the vCPUs
//! up with a boot helper and hands [`KvmVm::vcpus`], [`KvmVm::dirty_log`] and
//! [`KvmVm::device_states`] to a migration session. The session never touches
//! a KVM type; this module never touches the stream.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use vm_memory::GuestAddress;
//! use vmm_glue::kvm::{KvmVm, KvmVmConfig};
//! use vmm_glue::session::{GuestRam, RamRegion, Vcpus};
//! use vmm_glue::GuestMemoryMmap;
//!
//! let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)])?);
//! let ram = GuestRam::new(mem, vec![RamRegion::new("pc.ram")])?;
//! let vm = KvmVm::new(&ram, KvmVmConfig::new(1))?;
//! // Write a boot sector at 0x7c00, then:
//! vm.vcpus().boot_real_mode()?;
//! vm.vcpus().resume()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::Kvm;

mod abi;
pub mod dirty_log;
pub mod vcpu;
pub mod vm;
mod wire;

pub use dirty_log::{KvmDirtyLog, KvmDirtyRing};
pub use vcpu::x86_64::{
    write_long_mode_tables, LongModeEntry, LONG_MODE_GDT, LONG_MODE_PAGE_TABLES,
    LONG_MODE_TABLES_END,
};
pub use vcpu::{IoHandler, KvmVcpus, UnhandledIo};
pub use vm::{KvmIrq, KvmVm, KvmVmConfig};

/// The path of the KVM device.
pub const DEV_KVM: &str = "/dev/kvm";

/// What KVM offers on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    pub api_version: i32,
    /// Recommended vCPU count (`KVM_CAP_NR_VCPUS`).
    pub recommended_vcpus: usize,
    /// Maximum vCPU count (`KVM_CAP_MAX_VCPUS`).
    pub max_vcpus: usize,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags: 0 when absent, else a mask of
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` and `KVM_DIRTY_LOG_INITIALLY_SET`.
    pub manual_dirty_log_protect: u32,
    /// Largest dirty ring in bytes (`KVM_CAP_DIRTY_LOG_RING`), 0 when absent.
    pub dirty_ring_bytes: u32,
    /// Dirty ring with acquire/release ordering (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
    pub dirty_ring_acq_rel: bool,
}

/// Why KVM could not be used: facts read, a VM built, vCPUs set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    /// What answers at `/dev/kvm` does not speak KVM's API.
    #[error(
        "{DEV_KVM} does not speak KVM's API (KVM_GET_API_VERSION answered {found}, expected 12)"
    )]
    ApiVersion {
        /// The answer.
        found: i32,
    },
    /// `/dev/kvm` could not be opened.
    #[error("cannot open {DEV_KVM}")]
    Open(#[source] std::io::Error),
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl and its object (`KVM_SET_USER_MEMORY_REGION slot 1`).
        op: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// This host's KVM lacks something the configuration asks for.
    #[error("this host's KVM lacks {what}")]
    Unsupported {
        /// The capability or feature (`KVM_CAP_DIRTY_LOG_RING`).
        what: String,
    },
    /// The configuration or the guest RAM cannot make a VM.
    #[error("invalid KVM VM configuration: {why}")]
    Config {
        /// What is wrong.
        why: String,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} at guest address {addr:#x}")]
    GuestMemory {
        /// What was written (`page tables`).
        what: &'static str,
        /// Where.
        addr: u64,
        /// The error of vm-memory.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU thread could not be started, or is gone.
    #[error("vCPU {vcpu} thread: {why}")]
    Thread {
        /// The vCPU.
        vcpu: usize,
        /// What happened.
        why: String,
    },
    /// The operation needs paused vCPUs.
    #[error("vCPUs must be paused to {op}")]
    Running {
        /// What was attempted.
        op: &'static str,
    },
}

impl KvmError {
    /// A [`KvmError::Ioctl`] from a kvm-ioctls error.
    pub(crate) fn ioctl(op: impl Into<String>, e: kvm_ioctls::Error) -> Self {
        KvmError::Ioctl {
            op: op.into(),
            source: errno_to_io(e),
        }
    }
}

/// The `std::io::Error` of a kvm-ioctls (vmm-sys-util) errno.
pub(crate) fn errno_to_io(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl KvmFacts {
    /// Whether `KVM_CLEAR_DIRTY_LOG` with manual protect is available.
    pub fn has_manual_protect(&self) -> bool {
        self.manual_dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
    }
}

/// Reads the KVM facts of this host.
pub fn host_facts() -> Result<KvmFacts, KvmError> {
    let kvm = Kvm::new().map_err(|e| KvmError::Open(errno_to_io(e)))?;
    // Whatever answers at /dev/kvm must speak KVM's API (version 12 since
    // Linux 2.6.22): a device node that is not KVM fails here, not later.
    let api_version = kvm.get_api_version();
    if api_version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion { found: api_version });
    }
    let raw = |cap: u32| u32::try_from(kvm.check_extension_raw(cap.into())).unwrap_or(0);
    Ok(KvmFacts {
        api_version,
        recommended_vcpus: kvm.get_nr_vcpus(),
        max_vcpus: kvm.get_max_vcpus(),
        manual_dirty_log_protect: raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        dirty_ring_bytes: raw(KVM_CAP_DIRTY_LOG_RING),
        dirty_ring_acq_rel: raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) != 0,
    })
}

impl fmt::Display for KvmFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "kvm")?;
        writeln!(f, "  usable:                   yes ({DEV_KVM})")?;
        writeln!(f, "  API version:              {}", self.api_version)?;
        writeln!(
            f,
            "  vCPUs:                    {} recommended, {} max",
            self.recommended_vcpus, self.max_vcpus
        )?;
        writeln!(
            f,
            "  dirty log manual protect: {} (initially-set: {})",
            yes(self.has_manual_protect()),
            yes(self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET != 0)
        )?;
        match self.dirty_ring_bytes {
            0 => writeln!(f, "  dirty ring:               no")?,
            n => writeln!(
                f,
                "  dirty ring:               yes, up to {} KiB (acq/rel: {})",
                n / 1024,
                yes(self.dirty_ring_acq_rel)
            )?,
        }
        Ok(())
    }
}

/// A human-readable KVM report: the facts, or why KVM is unusable and what to check.
pub fn host_report() -> String {
    match host_facts() {
        Ok(f) => f.to_string(),
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!(
                "kvm\n  usable:                   NO: {e}{cause}\n  \
                 hint: the kernel log (dmesg | grep -i kvm) says why the KVM module did not bind;\n  \
                 \x20     nested guests need virtualization exposed by the outer hypervisor\n"
            )
        }
    }
}
