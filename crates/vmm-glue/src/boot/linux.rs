//! Loading a Linux bzImage for the 64-bit boot protocol
//! (`Documentation/arch/x86/boot.rst`), with linux-loader (rust-vmm's, as
//! Firecracker and Cloud Hypervisor use it): the kernel, an initrd, the
//! command line, the zero page (`boot_params`) with an e820 map, and the MP
//! table ([`super::mptable`]).
//!
//! # Layout (guest-physical)
//!
//! | address | what |
//! | --- | --- |
//! | `0x500..0x7000` | GDT and identity-map page tables, written when the vCPUs are set up ([`crate::kvm::KvmVcpus::boot_linux`]) |
//! | [`ZERO_PAGE`] | `boot_params`: the kernel's setup header, the initrd, the command line pointer, the e820 map |
//! | [`BOOT_STACK`] | the boot CPU's stack pointer |
//! | [`CMDLINE`] | the command line (NUL-terminated, at most the kernel's `cmdline_size`) |
//! | [`MPTABLE_START`]`..`[`MPTABLE_END`] | the MP table, reserved in the e820 map |
//! | [`KERNEL_START`] | the protected-mode kernel (the bzImage after its setup sectors); it runs from `KERNEL_START + 0x200`, its 64-bit entry |
//! | the top of the RAM below 4 GiB | the initrd, page-aligned |
//!
//! The e820 map lists every region of guest memory as RAM, less the MP
//! table's area, which is reserved. The memory below [`KERNEL_START`] must
//! hold the first 640 KiB (a PC's base memory) for the tables above.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::mptable::{self, MpTableError, MPTABLE_END, MPTABLE_START};
use crate::GuestMemoryMmap;

/// Where the zero page (`boot_params`) goes.
pub const ZERO_PAGE: u64 = 0x7000;
/// The boot CPU's initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x2_0000;
/// Most bytes of command line this loader writes (with its NUL), whatever
/// the kernel allows.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Where the protected-mode kernel is loaded (1 MiB, the bzImage default).
pub const KERNEL_START: u64 = 0x10_0000;
/// The offset of the 64-bit entry point from the load address.
const ENTRY_64: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// The oldest boot protocol with `xloadflags` (2.12).
const PROTOCOL_XLOADFLAGS: u16 = 0x020c;
/// `type_of_loader`: a boot loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// e820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// How many e820 entries the zero page holds.
const E820_MAX: usize = 128;
/// The initrd stays below 4 GiB even where the kernel allows more.
const FOUR_GIB: u64 = 1 << 32;

/// A command line that suits a VM without ACPI, PCI or a keyboard
/// controller, with its console on COM1 and an MP table: what
/// `demovm --kernel` uses unless given `--cmdline`.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 acpi=off \
     pci=off no_timer_check i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxImage {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initrd (an initramfs cpio archive, compressed or not), if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

impl LinuxImage {
    /// `kernel` with no initrd and [`DEFAULT_CMDLINE`].
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        LinuxImage {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
        }
    }

    /// With this initrd.
    pub fn with_initrd(mut self, initrd: impl Into<PathBuf>) -> Self {
        self.initrd = Some(initrd.into());
        self
    }

    /// With this command line.
    pub fn with_cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = cmdline.into();
        self
    }
}

/// Where the boot CPU starts: the 64-bit entry point and the zero page
/// (RSI), for [`crate::kvm::KvmVcpus::boot_linux`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// The 64-bit entry point.
    pub rip: u64,
    /// The zero page's address.
    pub zero_page: u64,
    /// The stack pointer.
    pub rsp: u64,
}

/// What [`load`] put where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLinux {
    /// Where the boot CPU starts.
    pub entry: LinuxEntry,
    /// The protected-mode kernel's range.
    pub kernel: (u64, u64),
    /// The initrd's range, if any.
    pub initrd: Option<(u64, u64)>,
    /// The kernel's boot protocol version (`0x020f` is 2.15).
    pub protocol: u16,
    /// The e820 map given to the kernel: (start, size, type).
    pub e820: Vec<(u64, u64, u32)>,
}

/// Why a Linux image could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// A file could not be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The host's error.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the kernel.
    #[error("cannot load the kernel {path} as a bzImage")]
    Kernel {
        /// Its path.
        path: PathBuf,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel cannot be booted through the 64-bit protocol.
    #[error("the kernel {path} has no 64-bit entry point (boot protocol {protocol:#06x}, xloadflags {xloadflags:#x})")]
    Not64Bit {
        /// Its path.
        path: PathBuf,
        /// Its boot protocol version.
        protocol: u16,
        /// Its `xloadflags`.
        xloadflags: u16,
    },
    /// The command line is longer than the kernel takes.
    #[error("the command line is {len} bytes, the kernel takes at most {max}")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The kernel's limit (less the NUL).
        max: usize,
    },
    /// Guest memory cannot hold what must go there.
    #[error("guest memory: {why}")]
    Layout {
        /// What does not fit.
        why: String,
    },
    /// Writing into guest memory failed.
    #[error("cannot write {what} at {addr:#x}")]
    Memory {
        /// What.
        what: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
}

fn read_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BootError {
    let path = path.to_owned();
    move |source| BootError::Read { what, path, source }
}

/// Loads `image` for `vcpus` vCPUs into `mem` (see the module
/// documentation for the layout) and returns where the boot CPU starts.
pub fn load(
    mem: &GuestMemoryMmap,
    image: &LinuxImage,
    vcpus: usize,
) -> Result<LoadedLinux, BootError> {
    let low_ok = mem
        .find_region(GuestAddress(0))
        .is_some_and(|r| r.len() >= MPTABLE_END);
    if !low_ok {
        return Err(BootError::Layout {
            why: "the first 640 KiB must be RAM (boot tables and the MP table live there)".into(),
        });
    }
    let mut kfile = File::open(&image.kernel).map_err(read_err("kernel", &image.kernel))?;
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(KERNEL_START)),
        &mut kfile,
        Some(GuestAddress(KERNEL_START)),
    )
    .map_err(|source| BootError::Kernel {
        path: image.kernel.clone(),
        source,
    })?;
    let mut hdr = loaded.setup_header.ok_or_else(|| BootError::Layout {
        why: "linux-loader returned no setup header for a bzImage".into(),
    })?;
    let (protocol, xloadflags) = (hdr.version, hdr.xloadflags);
    if protocol < PROTOCOL_XLOADFLAGS || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit {
            path: image.kernel.clone(),
            protocol,
            xloadflags,
        });
    }
    mptable::write(mem, vcpus)?;

    // The command line.
    let max = (hdr.cmdline_size as usize).min(CMDLINE_MAX - 1);
    if image.cmdline.len() > max || image.cmdline.contains('\0') {
        return Err(BootError::Cmdline {
            len: image.cmdline.len(),
            max,
        });
    }
    let mut line = image.cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE))
        .map_err(|source| BootError::Memory {
            what: "the command line",
            addr: CMDLINE,
            source,
        })?;

    // The initrd, at the top of the highest RAM below the kernel's limit.
    let initrd = match &image.initrd {
        None => None,
        Some(path) => {
            let mut f = File::open(path).map_err(read_err("initrd", path))?;
            let size = f
                .seek(SeekFrom::End(0))
                .and_then(|s| f.seek(SeekFrom::Start(0)).map(|_| s))
                .map_err(read_err("initrd", path))?;
            // The kernel's init area (decompression and early allocations)
            // from its preferred address up; the initrd goes above it.
            let init_end = hdr.pref_address.max(KERNEL_START) + u64::from(hdr.init_size);
            let limit = (u64::from(hdr.initrd_addr_max) + 1).min(FOUR_GIB);
            let addr = initrd_address(mem, size, init_end.max(loaded.kernel_end), limit)
                .ok_or_else(|| BootError::Layout {
                    why: format!(
                        "no room for an initrd of {size} bytes above the kernel (which needs up \
                         to {init_end:#x}) and below {limit:#x}"
                    ),
                })?;
            let len = usize::try_from(size).map_err(|_| BootError::Layout {
                why: format!("initrd of {size} bytes"),
            })?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
                .map_err(|source| BootError::Memory {
                    what: "the initrd",
                    addr,
                    source,
                })?;
            hdr.ramdisk_image = u32::try_from(addr).map_err(|_| BootError::Layout {
                why: "initrd above 4 GiB".into(),
            })?;
            hdr.ramdisk_size = u32::try_from(size).map_err(|_| BootError::Layout {
                why: format!("initrd of {size} bytes"),
            })?;
            Some((addr, addr + size))
        }
    };

    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE as u32;
    let e820 = e820_map(mem);
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    if e820.len() > E820_MAX {
        return Err(BootError::Layout {
            why: format!(
                "{} e820 entries, the zero page holds {E820_MAX}",
                e820.len()
            ),
        });
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|source| BootError::Memory {
            what: "the zero page",
            addr: ZERO_PAGE,
            source,
        })?;
    Ok(LoadedLinux {
        entry: LinuxEntry {
            rip: loaded.kernel_load.0 + ENTRY_64,
            zero_page: ZERO_PAGE,
            rsp: BOOT_STACK,
        },
        kernel: (loaded.kernel_load.0, loaded.kernel_end),
        initrd,
        protocol,
        e820,
    })
}

/// The highest page-aligned address at which `size` bytes fit inside one
/// RAM region, at or above `floor` and ending at or below `limit`.
fn initrd_address(mem: &GuestMemoryMmap, size: u64, floor: u64, limit: u64) -> Option<u64> {
    mem.iter()
        .filter_map(|r| {
            let start = r.start_addr().0.max(floor);
            let end = (r.start_addr().0 + r.len()).min(limit);
            let addr = end.checked_sub(size)? & !0xfff;
            (addr >= start).then_some(addr)
        })
        .max()
}

/// Every region as RAM, less the MP table's area, which is reserved.
fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    let mut regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
        .collect();
    regions.sort_unstable();
    // Adjacent regions (several backends) make one RAM range.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in regions {
        match merged.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => merged.push((s, e)),
        }
    }
    for (s, e) in merged {
        if s < MPTABLE_END && MPTABLE_START < e {
            if s < MPTABLE_START {
                out.push((s, MPTABLE_START - s, E820_RAM));
            }
            out.push((MPTABLE_START, MPTABLE_END - MPTABLE_START, E820_RESERVED));
            if MPTABLE_END < e {
                out.push((MPTABLE_END, e - MPTABLE_END, E820_RAM));
            }
        } else {
            out.push((s, e - s, E820_RAM));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0xa_0000),
            (GuestAddress(0x10_0000), ((mib << 20) - 0x10_0000) as usize),
        ])
        .unwrap()
    }

    #[test]
    fn the_e820_map_reserves_the_mp_table_and_skips_the_hole() {
        let m = e820_map(&pc(64));
        assert_eq!(
            m,
            vec![
                (0, MPTABLE_START, E820_RAM),
                (MPTABLE_START, MPTABLE_END - MPTABLE_START, E820_RESERVED),
                (0x10_0000, (64 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn the_initrd_goes_to_the_top_page_aligned() {
        let mem = pc(64);
        let top = 64 << 20;
        assert_eq!(initrd_address(&mem, 4096, 0, u64::MAX), Some(top - 4096));
        assert_eq!(initrd_address(&mem, 5000, 0, u64::MAX), Some(top - 8192));
        assert_eq!(
            initrd_address(&mem, 4096, 0, 32 << 20),
            Some((32 << 20) - 4096)
        );
        assert_eq!(initrd_address(&mem, 64 << 20, 0, u64::MAX), None, "too big");
        assert_eq!(
            initrd_address(&mem, 1 << 20, top - 4096, u64::MAX),
            None,
            "above the floor"
        );
    }

    #[test]
    fn a_file_that_is_no_bzimage_is_refused_clearly() {
        let mem = pc(64);
        let p = std::env::temp_dir().join(format!("not-a-kernel-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let e = load(&mem, &LinuxImage::new(&p), 1).unwrap_err();
        assert!(matches!(e, BootError::Kernel { .. }), "{e}");
        let missing = load(&mem, &LinuxImage::new("/nonexistent/bzImage"), 1).unwrap_err();
        assert!(
            matches!(missing, BootError::Read { what: "kernel", .. }),
            "{missing}"
        );
        let _ = std::fs::remove_file(&p);
    }
}
