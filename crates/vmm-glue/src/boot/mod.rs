//! Booting a guest kernel on a PC layout: what a VMM writes into guest
//! memory before the first instruction runs.
//!
//! - [`linux`]: a Linux bzImage through the 64-bit boot protocol, with
//!   linux-loader: kernel, initrd, command line, zero page and e820 map;
//! - [`mptable`]: the MP table that tells the kernel its CPUs, its IOAPIC
//!   and how the ISA interrupts are wired, for a VM without ACPI.
//!
//! The vCPU side (long mode, the GDT the boot protocol asks for, RSI =
//! zero page, the other vCPUs waiting for INIT/SIPI) is
//! [`KvmVcpus::boot_linux`](crate::kvm::KvmVcpus::boot_linux). No `unsafe`
//! here: everything goes through vm-memory.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use vm_memory::GuestAddress;
//! use vmm_glue::boot::linux::{self, LinuxImage};
//! use vmm_glue::kvm::{KvmVm, KvmVmConfig};
//! use vmm_glue::session::{GuestRam, RamRegion, Vcpus};
//! use vmm_glue::GuestMemoryMmap;
//!
//! let mem = Arc::new(GuestMemoryMmap::from_ranges(&[
//!     (GuestAddress(0), 0xa_0000),
//!     (GuestAddress(0x10_0000), (256 << 20) - 0x10_0000),
//! ])?);
//! let ram = GuestRam::new(mem.clone(), vec![RamRegion::new("low"), RamRegion::new("high")])?;
//! let vm = KvmVm::new(&ram, KvmVmConfig::new(2))?;
//! let image = LinuxImage::new("bzImage").with_initrd("initramfs.cpio");
//! let loaded = linux::load(&mem, &image, 2)?;
//! vm.vcpus().boot_linux(loaded.entry)?;
//! vm.vcpus().resume()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod linux;
pub mod mptable;
