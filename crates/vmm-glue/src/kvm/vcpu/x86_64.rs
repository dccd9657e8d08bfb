//! The x86_64 vCPU: creation (CPUID, LAPIC LINT pins), the boot helpers
//! (real mode, long mode), and the register, MSR and LAPIC state with its
//! save and restore order.
//!
//! # State sections
//!
//! A saved VM has one `kvm.vcpus` section (version 1: the vCPU count, a
//! `u32`) and, per vCPU `i`, eleven sections named `kvm.vcpu<i>.<piece>`,
//! all version 1, all little-endian:
//!
//! | piece | data |
//! | --- | --- |
//! | `mp_state` | `kvm_mp_state` (4 bytes) |
//! | `regs` | `kvm_regs` (144 bytes) |
//! | `sregs` | `kvm_sregs` (312 bytes) |
//! | `xsave` | `u32` size, then the XSAVE area (`size` bytes: 4096 from `KVM_GET_XSAVE`, or the `KVM_CAP_XSAVE2` size from `KVM_GET_XSAVE2`) |
//! | `xcrs` | `kvm_xcrs` (392 bytes) |
//! | `debugregs` | `kvm_debugregs` (128 bytes) |
//! | `lapic` | `kvm_lapic_state` (1024 bytes) |
//! | `tsc_khz` | `u32`, 0 when KVM could not tell (`KVM_GET_TSC_KHZ` failed) |
//! | `cpuid` | `u32` count, then `count` × `kvm_cpuid_entry2` (40 bytes), from `KVM_GET_CPUID2` |
//! | `msrs` | `u32` count, then `count` × `kvm_msr_entry` (16 bytes) |
//! | `events` | `kvm_vcpu_events` (64 bytes) |
//!
//! A kvm-bindings struct is its bytes in the kernel's x86_64 layout (sizes
//! asserted at compile time below).
//!
//! # Order
//!
//! Saved in the order of the table, `events` last: `KVM_GET_MP_STATE` may
//! change LAPIC state, so it goes first; the other GETs may change what
//! `KVM_GET_VCPU_EVENTS` reports, so it goes last (KVM-NOTES section 3).
//! Restored as: cpuid, mp_state, regs, sregs, xsave, xcrs, debugregs,
//! lapic, tsc_khz, MSRs (`IA32_TSC_DEADLINE` in a chunk of its own after
//! `IA32_TSC`), events, then `KVM_KVMCLOCK_CTRL` (errors ignored). The
//! reasons: `SET_REGS` clears pending exceptions that `SET_VCPU_EVENTS`
//! restores; `SET_SREGS` sets the APIC base that `SET_LAPIC` needs; the
//! deadline MSR sticks only once the LAPIC timer is in TSC-deadline mode
//! and is compared with the guest TSC, so it follows both.
//!
//! The kvmclock wall-clock MSRs (`MSR_KVM_WALL_CLOCK`, `_NEW`) are saved
//! but not written back: KVM takes a write to them as "write the host's
//! wall clock into guest memory at this address now" (`kvm_write_wall_clock`),
//! a command the guest gave once at boot, not state. Replaying it would
//! change a guest page behind the migration's back (a stopped guest's RAM
//! would no longer equal the source's), and the guest never reads that
//! page again.
//!
//! # What a destination refuses
//!
//! Before touching any vCPU, a restore refuses with
//! [`StateError::Incompatible`]: sections of another accelerator (a name
//! not under `kvm.`), another vCPU count, an XSAVE area larger than this
//! host's, a CPUID feature the source's guest had and this host cannot
//! offer, an unknown piece; and with [`StateError::Malformed`] a section of
//! another version, of the wrong size, missing or repeated. `KVM_SET_MSRS`
//! setting fewer MSRs than asked names the MSR this host refused.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, Xsave,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::VcpuCore;
use crate::boot::linux::LinuxEntry;
use crate::kvm::vm::VmShared;
use crate::kvm::wire::{Reader, Writer};
use crate::kvm::{errno_to_io, KvmError};
use crate::session::{Section, StateError};
use crate::GuestMemoryMmap;

const _: () = assert!(std::mem::size_of::<kvm_mp_state>() == 4);
const _: () = assert!(std::mem::size_of::<kvm_regs>() == 144);
const _: () = assert!(std::mem::size_of::<kvm_sregs>() == 312);
const _: () = assert!(std::mem::size_of::<kvm_xcrs>() == 392);
const _: () = assert!(std::mem::size_of::<kvm_debugregs>() == 128);
const _: () = assert!(std::mem::size_of::<kvm_lapic_state>() == 1024);
const _: () = assert!(std::mem::size_of::<kvm_cpuid_entry2>() == 40);
const _: () = assert!(std::mem::size_of::<kvm_msr_entry>() == 16);
const _: () = assert!(std::mem::size_of::<kvm_vcpu_events>() == 64);
const _: () = assert!(std::mem::size_of::<kvm_bindings::kvm_xsave>() == 4096);

/// Version of every vCPU section.
const VERSION: u32 = 1;
/// The legacy XSAVE area (`KVM_GET_XSAVE`).
const LEGACY_XSAVE: usize = 4096;
/// Largest XSAVE area a section may carry (the kernel's limit is far lower).
const MAX_XSAVE: usize = 1 << 20;

/// The vCPU pieces, in save order.
const PIECES: [&str; 11] = [
    "mp_state",
    "regs",
    "sregs",
    "xsave",
    "xcrs",
    "debugregs",
    "lapic",
    "tsc_khz",
    "cpuid",
    "msrs",
    "events",
];

/// Name of the header section.
const HEADER: &str = "kvm.vcpus";

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// kvmclock's wall clock, old and new numbers: written by the guest at boot,
/// not restored (see the module documentation).
const MSR_KVM_WALL_CLOCK: u32 = 0x11;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvmclock's per-vCPU time page, new and old numbers: bit 0 enables it,
/// the other bits are the page's guest physical address.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MTRR MSRs, which KVM's index list leaves out but guests program.
fn mtrr_msrs() -> impl Iterator<Item = u32> {
    (0x200..=0x20f)
        .chain([0x250, 0x258, 0x259])
        .chain(0x268..=0x26f)
        .chain([MSR_MTRR_DEF_TYPE])
}

/// LAPIC register offsets of LVT LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;

/// Creates vCPU `index` (APIC id = index) and gives it the VM's CPUID (with
/// its APIC ids) and the PC's LINT pins: LINT0 ExtINT (the PIC), LINT1 NMI.
pub(crate) fn create_vcpu(vm: &VmShared, index: usize) -> Result<VcpuFd, KvmError> {
    let fd = vm
        .fd
        .create_vcpu(index as u64)
        .map_err(|e| KvmError::ioctl(format!("KVM_CREATE_VCPU {index}"), e))?;
    let mut cpuid = vm.cpuid.clone();
    let apic_id = u32::try_from(index).unwrap_or(u32::MAX);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (apic_id << 24),
            0xb | 0x1f => e.edx = apic_id,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid)
        .map_err(|e| KvmError::ioctl(format!("KVM_SET_CPUID2 on vCPU {index}"), e))?;
    if index == 0 {
        let got = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::ioctl("KVM_GET_CPUID2 on vCPU 0", e))?;
        let mut offered = vm.cpuid.as_slice().to_vec();
        for e in &mut offered {
            if let Some(g) = cpuid_find(got.as_slice(), e.function, e.index) {
                e.eax |= g.eax;
                e.ebx |= g.ebx;
                e.ecx |= g.ecx;
                e.edx |= g.edx;
            }
        }
        let _ = vm.offered_cpuid.set(offered);
    }
    let mut lapic = fd
        .get_lapic()
        .map_err(|e| KvmError::ioctl(format!("KVM_GET_LAPIC on vCPU {index}"), e))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic)
        .map_err(|e| KvmError::ioctl(format!("KVM_SET_LAPIC on vCPU {index}"), e))?;
    Ok(fd)
}

fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| lapic.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, off: usize, mode: u32) {
    let v = (lapic_reg(lapic, off) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        lapic.regs[off + i] = b as std::os::raw::c_char;
    }
}

fn ioctl_err(core: &VcpuCore, op: &str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    let op = format!("{op} on vCPU {}", core.index);
    move |e| KvmError::ioctl(op.clone(), e)
}

/// The MSRs a vCPU starts with, as Firecracker and Cloud Hypervisor set
/// them: the syscall MSRs zero, fast strings on, MTRRs enabled with
/// write-back as the default type.
fn set_boot_msrs(core: &VcpuCore) -> Result<(), KvmError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Config {
        why: format!("boot MSR list: {e:?}"),
    })?;
    let n = core
        .fd
        .set_msrs(&msrs)
        .map_err(ioctl_err(core, "KVM_SET_MSRS (boot MSRs)"))?;
    if n != entries.len() {
        return Err(KvmError::Ioctl {
            op: format!("KVM_SET_MSRS (boot MSRs) on vCPU {}", core.index),
            source: std::io::Error::other(format!(
                "set {n} of {} MSRs, refused {:#x}",
                entries.len(),
                entries[n].index
            )),
        });
    }
    Ok(())
}

fn set_boot_fpu(core: &VcpuCore) -> Result<(), KvmError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    core.fd
        .set_fpu(&fpu)
        .map_err(ioctl_err(core, "KVM_SET_FPU"))
}

/// A PC BIOS's hand-over to a boot sector, on this vCPU: real mode, CS:IP =
/// `0000:7c00`, DS = ES = FS = GS = SS = 0 (bases 0, limits 64 KiB), SP =
/// `0x7000`, DL = `0x80` (the first hard disk), RFLAGS = 2 (interrupts
/// off). A20 is on: the VM has no A20 gate.
pub(crate) fn boot_real_mode(core: &mut VcpuCore) -> Result<(), KvmError> {
    let mut sregs = core
        .fd
        .get_sregs()
        .map_err(ioctl_err(core, "KVM_GET_SREGS"))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.selector = 0;
        seg.base = 0;
        seg.limit = 0xffff;
    }
    core.fd
        .set_sregs(&sregs)
        .map_err(ioctl_err(core, "KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: 0x7c00,
        rsp: 0x7000,
        rdx: 0x80,
        rflags: 2,
        ..Default::default()
    };
    core.fd
        .set_regs(&regs)
        .map_err(ioctl_err(core, "KVM_SET_REGS"))?;
    set_boot_fpu(core)?;
    set_boot_msrs(core)
}

/// Where a vCPU starts in long mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LongModeEntry {
    /// The first instruction (a guest virtual = physical address).
    pub rip: u64,
    /// The stack pointer.
    pub rsp: u64,
    /// RDI, RSI, RDX, RCX: the System V argument registers, so each vCPU
    /// can be given its own slice of RAM.
    pub args: [u64; 4],
}

impl LongModeEntry {
    /// Starts at `rip` with stack `rsp` and the argument registers zero.
    pub fn new(rip: u64, rsp: u64) -> Self {
        LongModeEntry {
            rip,
            rsp,
            args: [0; 4],
        }
    }

    /// With RDI, RSI, RDX, RCX = `args`.
    pub fn with_args(mut self, args: [u64; 4]) -> Self {
        self.args = args;
        self
    }
}

/// Guest address of the long-mode GDT: null, 64-bit code (selector `0x08`),
/// data (`0x10`), a 16-byte TSS descriptor (`0x18`); 40 bytes.
pub const LONG_MODE_GDT: u64 = 0x500;
/// Guest address of the long-mode page tables: PML4 here, the PDPT at
/// `+0x1000`, four page directories at `+0x2000..+0x6000` mapping the first
/// 4 GiB one to one with 2 MiB pages.
pub const LONG_MODE_PAGE_TABLES: u64 = 0x1000;
/// End of what [`KvmVcpus::boot_long_mode`](super::KvmVcpus::boot_long_mode)
/// writes: the VMM keeps `LONG_MODE_GDT..LONG_MODE_TABLES_END` free.
pub const LONG_MODE_TABLES_END: u64 = 0x7000;

const PML4: u64 = LONG_MODE_PAGE_TABLES;
const PDPT: u64 = LONG_MODE_PAGE_TABLES + 0x1000;
const PD: u64 = LONG_MODE_PAGE_TABLES + 0x2000;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;

/// GDT entries: flags and access bytes with the accessed bit already set.
const GDT: [u64; 5] = [
    0,
    // Code: base 0, limit 0xfffff pages, P, DPL 0, S, type 0xb
    // (execute/read, accessed), L = 1, G = 1.
    0x00af_9b00_0000_ffff,
    // Data: base 0, limit 4 GiB, P, S, type 3 (read/write, accessed), D/B,
    // G.
    0x00cf_9300_0000_ffff,
    // 64-bit TSS: base 0, limit 0x67, P, type 0xb (busy); the high half is
    // the next entry, zero.
    0x0000_8b00_0000_0067,
    0,
];

/// The GDT the Linux 64-bit boot protocol asks for: `__BOOT_CS` = `0x10`
/// (64-bit code), `__BOOT_DS` = `0x18` (data), both flat; a TSS at `0x20`.
const LINUX_GDT: [u64; 6] = [0, 0, GDT[1], GDT[2], GDT[3], 0];

/// The selectors a long-mode vCPU starts with.
#[derive(Clone, Copy)]
struct Selectors {
    cs: u16,
    ds: u16,
    tr: u16,
    /// GDT entries (8 bytes each).
    gdt_entries: usize,
}

/// [`GDT`]'s selectors.
const BUILTIN_SELECTORS: Selectors = Selectors {
    cs: 0x08,
    ds: 0x10,
    tr: 0x18,
    gdt_entries: GDT.len(),
};

/// [`LINUX_GDT`]'s selectors.
const LINUX_SELECTORS: Selectors = Selectors {
    cs: 0x10,
    ds: 0x18,
    tr: 0x20,
    gdt_entries: LINUX_GDT.len(),
};

/// Writes the GDT and the identity-map page tables (PML4, PDPT, 4 PDs of
/// 2 MiB pages: all of the first 4 GiB) at [`LONG_MODE_GDT`] and
/// [`LONG_MODE_PAGE_TABLES`]. Every entry has its accessed (and, for
/// pages, dirty) bit set, so the CPU never writes the tables or the GDT:
/// they stay out of the dirty log.
pub fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    write_tables(mem, &GDT)
}

/// [`write_long_mode_tables`] with the Linux boot protocol's GDT.
pub(crate) fn write_linux_tables(mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    write_tables(mem, &LINUX_GDT)
}

fn write_tables(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), KvmError> {
    let write = |what: &'static str, addr: u64, words: &[u64]| {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| KvmError::GuestMemory { what, addr, source })
    };
    write("the long-mode GDT", LONG_MODE_GDT, gdt)?;
    let table = PTE_PRESENT | PTE_WRITE | PTE_ACCESSED;
    write("the PML4", PML4, &[PDPT | table])?;
    let pdpt: Vec<u64> = (0..4).map(|i| (PD + i * 0x1000) | table).collect();
    write("the PDPT", PDPT, &pdpt)?;
    let pd: Vec<u64> = (0..4 * 512u64)
        .map(|i| (i << 21) | table | PTE_DIRTY | PTE_HUGE)
        .collect();
    write("the page directories", PD, &pd)
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode on this vCPU: paging on the identity map (CR3 =
/// [`LONG_MODE_PAGE_TABLES`]), CS = 64-bit code, the data selectors flat,
/// IDT empty (limit 0: an exception triple-faults until the guest loads its
/// own), the entry's RIP, RSP and argument registers, interrupts off, MP
/// state runnable (an AP needs no INIT/SIPI).
pub(crate) fn boot_long_mode(core: &mut VcpuCore, entry: LongModeEntry) -> Result<(), KvmError> {
    let [rdi, rsi, rdx, rcx] = entry.args;
    let regs = kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rdi,
        rsi,
        rdx,
        rcx,
        rflags: 2,
        ..Default::default()
    };
    set_long_mode(core, BUILTIN_SELECTORS, &regs)
}

/// The Linux 64-bit boot protocol on the boot vCPU: long mode on the
/// identity map, CS = `__BOOT_CS`, DS = ES = SS = `__BOOT_DS`, RSI = the
/// zero page, interrupts off, runnable.
pub(crate) fn boot_linux_bsp(core: &mut VcpuCore, entry: LinuxEntry) -> Result<(), KvmError> {
    let regs = kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rsi: entry.zero_page,
        rflags: 2,
        ..Default::default()
    };
    set_long_mode(core, LINUX_SELECTORS, &regs)
}

/// A Linux application processor: the boot MSRs and FPU state, and its MP
/// state left as KVM made it (waiting for INIT/SIPI, which the kernel
/// sends through its LAPIC).
pub(crate) fn boot_linux_ap(core: &mut VcpuCore) -> Result<(), KvmError> {
    set_boot_fpu(core)?;
    set_boot_msrs(core)
}

fn set_long_mode(core: &mut VcpuCore, sel: Selectors, regs: &kvm_regs) -> Result<(), KvmError> {
    let mut sregs = core
        .fd
        .get_sregs()
        .map_err(ioctl_err(core, "KVM_GET_SREGS"))?;
    sregs.cs = segment(sel.cs, 0xb, true);
    let data = segment(sel.ds, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: sel.tr,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = LONG_MODE_GDT;
    sregs.gdt.limit = (sel.gdt_entries * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // PE, MP, ET, NE, PG.
    sregs.cr0 = 0x8000_0033;
    // PAE, OSFXSR, OSXMMEXCPT.
    sregs.cr4 = 0x620;
    sregs.cr3 = PML4;
    // LME, LMA.
    sregs.efer |= 0x500;
    core.fd
        .set_sregs(&sregs)
        .map_err(ioctl_err(core, "KVM_SET_SREGS"))?;
    core.fd
        .set_regs(regs)
        .map_err(ioctl_err(core, "KVM_SET_REGS"))?;
    set_boot_fpu(core)?;
    set_boot_msrs(core)?;
    core.fd
        .set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(ioctl_err(core, "KVM_SET_MP_STATE"))
}

/// The `kvm.vcpus` header section.
pub(crate) fn header_section(count: usize) -> Section {
    let n = u32::try_from(count).unwrap_or(u32::MAX);
    Section::new(HEADER, VERSION, Writer::new().u32(n).finish())
}

fn name(index: usize, piece: &str) -> String {
    format!("kvm.vcpu{index}.{piece}")
}

fn host_err(core: &VcpuCore, op: &str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    let op = format!("{op} on vCPU {}", core.index);
    move |e| StateError::host(op.clone(), errno_to_io(e))
}

/// The MSRs this VM migrates: KVM's index list plus the MTRRs, keeping
/// those a vCPU can read (found once, at the first save).
fn msr_list(core: &VcpuCore) -> Result<Vec<u32>, StateError> {
    if let Some(l) = core.vm.msrs.get() {
        return Ok(l.clone());
    }
    let list = core
        .vm
        .kvm
        .get_msr_index_list()
        .map_err(|e| StateError::host("KVM_GET_MSR_INDEX_LIST", errno_to_io(e)))?;
    let mut candidates: Vec<u32> = list.as_slice().iter().copied().chain(mtrr_msrs()).collect();
    candidates.sort_unstable();
    candidates.dedup();
    let readable: Vec<u32> = candidates
        .into_iter()
        .filter(|&index| {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            Msrs::from_entries(&[entry])
                .ok()
                .and_then(|mut m| core.fd.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect();
    let _ = core.vm.msrs.set(readable.clone());
    Ok(readable)
}

/// Splits MSR indices into chunks KVM takes in one call, the TSC deadline
/// in a chunk of its own at the end (after `IA32_TSC`).
fn msr_chunks<T: Copy>(items: &[T], index: impl Fn(&T) -> u32) -> Vec<Vec<T>> {
    let (deadline, rest): (Vec<T>, Vec<T>) = items
        .iter()
        .partition(|e| index(e) == MSR_IA32_TSC_DEADLINE);
    let mut chunks: Vec<Vec<T>> = rest
        .chunks(KVM_MAX_MSR_ENTRIES)
        .map(<[T]>::to_vec)
        .collect();
    if !deadline.is_empty() {
        chunks.push(deadline);
    }
    chunks
}

fn msrs_of(entries: &[kvm_msr_entry], what: &str) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries)
        .map_err(|e| StateError::malformed(what, format!("{} MSRs: {e:?}", entries.len())))
}

/// The kvmclock time (ns) the guest reads on this vCPU now: its pvclock
/// page (`struct pvclock_vcpu_time_info`, found through
/// `MSR_KVM_SYSTEM_TIME_NEW` or the old `MSR_KVM_SYSTEM_TIME`) evaluated at
/// the vCPU's current TSC, the way the guest does. `None` when the guest
/// enabled no page or the page is outside guest RAM.
pub(crate) fn pvclock_now(core: &mut VcpuCore) -> Result<Option<u64>, StateError> {
    let entries: Vec<kvm_msr_entry> = [MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_SYSTEM_TIME]
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = msrs_of(&entries, "pvclock MSRs")?;
    // A host without one of the kvmclock MSRs stops early: what was read
    // still counts.
    let n = core
        .fd
        .get_msrs(&mut msrs)
        .map_err(host_err(core, "KVM_GET_MSRS"))?;
    let got = &msrs.as_slice()[..n];
    let Some(tsc) = got.first().map(|e| e.data) else {
        return Ok(None);
    };
    let Some(page) = got[1..].iter().map(|e| e.data).find(|d| d & 1 != 0) else {
        return Ok(None);
    };
    // version u32, pad u32, tsc_timestamp u64, system_time u64,
    // tsc_to_system_mul u32, tsc_shift i8, flags u8, pad [u8; 2].
    let mut b = [0u8; 32];
    if core
        .vm
        .mem
        .read_slice(&mut b, GuestAddress(page & !1))
        .is_err()
    {
        return Ok(None);
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let tsc_timestamp = u64_at(8);
    let system_time = u64_at(16);
    let mul = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    let shift = b[28] as i8;
    Ok(Some(pvclock_scale(
        tsc,
        tsc_timestamp,
        system_time,
        mul,
        shift,
    )))
}

/// `system_time + ((tsc - tsc_timestamp) << shift) * mul / 2^32`, the
/// guest's pvclock formula; a TSC behind the page's timestamp (a guest that
/// set its TSC back) counts as no time since, not as a wrapped huge delta.
fn pvclock_scale(tsc: u64, tsc_timestamp: u64, system_time: u64, mul: u32, shift: i8) -> u64 {
    let mut delta = tsc.saturating_sub(tsc_timestamp);
    if shift < 0 {
        delta >>= u32::from(shift.unsigned_abs()).min(63);
    } else {
        delta <<= u32::from(shift.unsigned_abs()).min(63);
    }
    let scaled = (u128::from(delta) * u128::from(mul)) >> 32;
    system_time.wrapping_add(scaled as u64)
}

/// Saves this vCPU's state (see the module documentation for the order).
pub(crate) fn save(core: &mut VcpuCore) -> Result<Vec<Section>, StateError> {
    let i = core.index;
    let fd = &core.fd;
    let mut out = Vec::with_capacity(PIECES.len());
    let mut put =
        |piece: &str, w: &mut Writer| out.push(Section::new(name(i, piece), VERSION, w.finish()));

    let mp = fd
        .get_mp_state()
        .map_err(host_err(core, "KVM_GET_MP_STATE"))?;
    put("mp_state", Writer::new().raw(&mp));
    let regs = fd.get_regs().map_err(host_err(core, "KVM_GET_REGS"))?;
    put("regs", Writer::new().raw(&regs));
    let sregs = fd.get_sregs().map_err(host_err(core, "KVM_GET_SREGS"))?;
    put("sregs", Writer::new().raw(&sregs));
    let xsave = get_xsave(core)?;
    put(
        "xsave",
        Writer::new()
            .u32(u32::try_from(xsave.len()).unwrap_or(u32::MAX))
            .bytes(&xsave),
    );
    let xcrs = fd.get_xcrs().map_err(host_err(core, "KVM_GET_XCRS"))?;
    put("xcrs", Writer::new().raw(&xcrs));
    let dregs = fd
        .get_debug_regs()
        .map_err(host_err(core, "KVM_GET_DEBUGREGS"))?;
    put("debugregs", Writer::new().raw(&dregs));
    let lapic = fd.get_lapic().map_err(host_err(core, "KVM_GET_LAPIC"))?;
    put("lapic", Writer::new().raw(&lapic));
    // EIO when the host TSC is unstable: 0 says "unknown".
    let khz = fd.get_tsc_khz().unwrap_or(0);
    put("tsc_khz", Writer::new().u32(khz));
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(host_err(core, "KVM_GET_CPUID2"))?;
    let mut w = Writer::new();
    w.u32(u32::try_from(cpuid.as_slice().len()).unwrap_or(0));
    for e in cpuid.as_slice() {
        w.raw(e);
    }
    put("cpuid", &mut w);
    let msrs = get_msrs(core)?;
    let mut w = Writer::new();
    w.u32(u32::try_from(msrs.len()).unwrap_or(0));
    for e in &msrs {
        w.raw(e);
    }
    put("msrs", &mut w);
    let events = fd
        .get_vcpu_events()
        .map_err(host_err(core, "KVM_GET_VCPU_EVENTS"))?;
    put("events", Writer::new().raw(&events));
    Ok(out)
}

fn get_xsave(core: &VcpuCore) -> Result<Vec<u8>, StateError> {
    let size = core.vm.xsave2_size;
    if size <= LEGACY_XSAVE {
        let x = core
            .fd
            .get_xsave()
            .map_err(host_err(core, "KVM_GET_XSAVE"))?;
        return Ok(zerocopy::IntoBytes::as_bytes(&x.region).to_vec());
    }
    let extra = (size - LEGACY_XSAVE).div_ceil(4);
    let mut x = Xsave::new(extra).map_err(|e| {
        StateError::host(
            "allocating the XSAVE2 buffer",
            std::io::Error::other(format!("{e:?}")),
        )
    })?;
    // SAFETY: `x` holds the 4096-byte legacy area plus `extra` u32s, i.e. at
    // least `size` bytes, the KVM_CAP_XSAVE2 size of this VM, which is the
    // most KVM_GET_XSAVE2 writes.
    unsafe { core.fd.get_xsave2(&mut x) }.map_err(host_err(core, "KVM_GET_XSAVE2"))?;
    let fam = x.as_fam_struct_ref();
    let mut bytes = zerocopy::IntoBytes::as_bytes(&fam.xsave.region).to_vec();
    bytes.extend(x.as_slice().iter().flat_map(|w| w.to_le_bytes()));
    bytes.truncate(size);
    Ok(bytes)
}

fn get_msrs(core: &VcpuCore) -> Result<Vec<kvm_msr_entry>, StateError> {
    let list = msr_list(core)?;
    let mut out = Vec::with_capacity(list.len());
    for chunk in msr_chunks(&list, |&i| i) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&entries, "MSR list")?;
        let n = core
            .fd
            .get_msrs(&mut msrs)
            .map_err(host_err(core, "KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(StateError::host(
                format!("KVM_GET_MSRS on vCPU {}", core.index),
                std::io::Error::other(format!(
                    "read {n} of {} MSRs, stopped at {:#x}",
                    entries.len(),
                    entries[n].index
                )),
            ));
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// One vCPU's state, decoded and checked against this host.
pub(crate) struct VcpuState {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: Vec<u8>,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    tsc_khz: u32,
    cpuid: Vec<kvm_cpuid_entry2>,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

/// Decodes and checks every vCPU's sections (see the module documentation
/// for what is refused), before any vCPU is touched.
pub(crate) fn parse(
    sections: &[Section],
    count: usize,
    vm: &VmShared,
) -> Result<Vec<VcpuState>, StateError> {
    // Another accelerator's state first: its names say what it is.
    if let Some(s) = sections.iter().find(|s| !s.name.starts_with("kvm.")) {
        let accel = s.name.split('.').next().unwrap_or(&s.name);
        return Err(StateError::incompatible(
            &s.name,
            format!("state of another accelerator ({accel:?}): this VM runs on kvm"),
        ));
    }
    let header = sections
        .iter()
        .find(|s| s.name == HEADER)
        .ok_or_else(|| StateError::malformed(HEADER, "missing"))?;
    if header.version != VERSION {
        return Err(StateError::malformed(
            HEADER,
            format!("version {}, this side reads {VERSION}", header.version),
        ));
    }
    let mut r = Reader::new(HEADER, &header.data);
    let theirs = r.u32()?;
    r.end()?;
    if usize::try_from(theirs).ok() != Some(count) {
        return Err(StateError::incompatible(
            HEADER,
            format!("the source has {theirs} vCPUs, this VM has {count}"),
        ));
    }
    // pieces[vcpu][piece]
    let mut pieces: Vec<[Option<&Section>; PIECES.len()]> = vec![[None; PIECES.len()]; count];
    for s in sections.iter().filter(|s| s.name != HEADER) {
        let rest = s.name.strip_prefix("kvm.vcpu").ok_or_else(|| {
            StateError::incompatible(&s.name, "a KVM section this side does not know")
        })?;
        let (idx, piece) = rest
            .split_once('.')
            .ok_or_else(|| StateError::malformed(&s.name, "not kvm.vcpu<i>.<piece>"))?;
        let i: usize = idx.parse().ok().filter(|&i| i < count).ok_or_else(|| {
            StateError::malformed(&s.name, format!("no vCPU {idx} among {count}"))
        })?;
        let p = PIECES.iter().position(|&n| n == piece).ok_or_else(|| {
            StateError::incompatible(&s.name, "a vCPU piece this side does not know")
        })?;
        if pieces[i][p].replace(s).is_some() {
            return Err(StateError::malformed(&s.name, "appears twice"));
        }
    }
    let host_xsave = vm.xsave2_size.max(LEGACY_XSAVE);
    let mut out = Vec::with_capacity(count);
    for (i, ps) in pieces.iter().enumerate() {
        let get = |p: usize| -> Result<Reader<'_>, StateError> {
            let s = ps[p].ok_or_else(|| StateError::malformed(name(i, PIECES[p]), "missing"))?;
            if s.version != VERSION {
                return Err(StateError::malformed(
                    &s.name,
                    format!("version {}, this side reads {VERSION}", s.version),
                ));
            }
            Ok(Reader::new(&s.name, &s.data))
        };
        let whole = |p: usize| -> Result<Reader<'_>, StateError> { get(p) };
        let mp_state = whole(0)?.only()?;
        let regs = whole(1)?.only()?;
        let sregs = whole(2)?.only()?;
        let mut r = whole(3)?;
        let size = r.count(1, MAX_XSAVE)?;
        if size < LEGACY_XSAVE || size % 4 != 0 {
            return Err(r.malformed(format!("XSAVE area of {size} bytes")));
        }
        let xsave = r.bytes(size)?.to_vec();
        r.end()?;
        if size > host_xsave {
            return Err(StateError::incompatible(
                name(i, "xsave"),
                format!("XSAVE area of {size} bytes, larger than this host's {host_xsave}"),
            ));
        }
        let xcrs = whole(4)?.only()?;
        let debugregs = whole(5)?.only()?;
        let lapic = whole(6)?.only()?;
        let mut r = whole(7)?;
        let tsc_khz = r.u32()?;
        r.end()?;
        let mut r = whole(8)?;
        let n = r.count(40, KVM_MAX_CPUID_ENTRIES)?;
        let cpuid = (0..n).map(|_| r.raw()).collect::<Result<Vec<_>, _>>()?;
        r.end()?;
        let offered = vm
            .offered_cpuid
            .get()
            .map_or(vm.cpuid.as_slice(), Vec::as_slice);
        check_cpuid(&name(i, "cpuid"), &cpuid, offered)?;
        let mut r = whole(9)?;
        let n = r.count(16, 4 * KVM_MAX_MSR_ENTRIES)?;
        let msrs = (0..n).map(|_| r.raw()).collect::<Result<Vec<_>, _>>()?;
        r.end()?;
        let events = whole(10)?.only()?;
        out.push(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            tsc_khz,
            cpuid,
            msrs,
            events,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The CPUID registers that list features: (leaf, subleaf, register, bits
/// KVM changes at run time, which are not features of the host).
const FEATURE_REGS: [(u32, u32, Reg, u32); 9] = [
    // OSXSAVE follows CR4.
    (1, 0, Reg::Ecx, 1 << 27),
    // APIC follows the APIC base MSR's enable bit.
    (1, 0, Reg::Edx, 1 << 9),
    (7, 0, Reg::Ebx, 0),
    // OSPKE follows CR4.
    (7, 0, Reg::Ecx, 1 << 4),
    (7, 0, Reg::Edx, 0),
    (7, 1, Reg::Eax, 0),
    (0xd, 1, Reg::Eax, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
];

fn cpuid_find(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == leaf && (e.index == sub || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    })
}

fn reg_of(e: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

/// Refuses a CPUID whose features this host's KVM cannot offer.
fn check_cpuid(
    what: &str,
    theirs: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Result<(), StateError> {
    for (leaf, sub, reg, dynamic) in FEATURE_REGS {
        let Some(src) = cpuid_find(theirs, leaf, sub) else {
            continue;
        };
        let have = cpuid_find(host, leaf, sub).map_or(0, |e| reg_of(e, reg));
        let missing = reg_of(src, reg) & !dynamic & !have;
        if missing != 0 {
            return Err(StateError::incompatible(
                what,
                format!(
                    "CPUID leaf {leaf:#x} subleaf {sub} {reg:?} bit {} (missing mask {missing:#x}): \
                     the source's guest had it, this host cannot offer it",
                    missing.trailing_zeros()
                ),
            ));
        }
    }
    Ok(())
}

/// Restores one vCPU in the order of the module documentation.
pub(crate) fn restore(core: &mut VcpuCore, s: VcpuState) -> Result<(), StateError> {
    let i = core.index;
    let fd = &core.fd;
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|e| StateError::malformed(name(i, "cpuid"), format!("{e:?}")))?;
    fd.set_cpuid2(&cpuid)
        .map_err(host_err(core, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(host_err(core, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs)
        .map_err(host_err(core, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs)
        .map_err(host_err(core, "KVM_SET_SREGS"))?;
    set_xsave(core, &s.xsave)?;
    fd.set_xcrs(&s.xcrs)
        .map_err(host_err(core, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(host_err(core, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .map_err(host_err(core, "KVM_SET_LAPIC"))?;
    set_tsc_khz(core, s.tsc_khz)?;
    let msrs: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .filter(|e| !matches!(e.index, MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW))
        .copied()
        .collect();
    for chunk in msr_chunks(&msrs, |e| e.index) {
        let msrs = msrs_of(&chunk, &name(i, "msrs"))?;
        let n = fd.set_msrs(&msrs).map_err(host_err(core, "KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError::incompatible(
                name(i, "msrs"),
                format!(
                    "this host refuses MSR {:#x} (KVM_SET_MSRS set {n} of {})",
                    chunk[n].index,
                    chunk.len()
                ),
            ));
        }
    }
    let mut events = s.events;
    // KVM_GET_VCPU_EVENTS fills these fields without flagging them valid.
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(host_err(core, "KVM_SET_VCPU_EVENTS"))?;
    // Tells a kvmclock guest it was paused, so its watchdogs do not fire;
    // EINVAL when the guest has no kvmclock page, which is fine.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

fn set_xsave(core: &VcpuCore, area: &[u8]) -> Result<(), StateError> {
    let host = core.vm.xsave2_size;
    let words: Vec<u32> = area
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if host <= LEGACY_XSAVE {
        let mut x = kvm_bindings::kvm_xsave::default();
        x.region.copy_from_slice(&words[..1024]);
        // SAFETY: `x` is a whole legacy `kvm_xsave` (4096 bytes), which is
        // all KVM_SET_XSAVE reads on a host without KVM_CAP_XSAVE2.
        return unsafe { core.fd.set_xsave(&x) }.map_err(host_err(core, "KVM_SET_XSAVE"));
    }
    let extra = (host - LEGACY_XSAVE).div_ceil(4);
    let mut x = Xsave::new(extra).map_err(|e| {
        StateError::host(
            "allocating the XSAVE2 buffer",
            std::io::Error::other(format!("{e:?}")),
        )
    })?;
    // SAFETY: only the legacy region of the header is written, never the
    // length field, so the wrapper's length still matches its allocation.
    unsafe { x.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(&words[..1024]);
    let tail = &words[1024..];
    x.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    // SAFETY: `x` holds at least this VM's KVM_CAP_XSAVE2 size (legacy area
    // plus `extra` u32s), the most the extended KVM_SET_XSAVE reads; a
    // smaller saved area was zero-extended.
    unsafe { core.fd.set_xsave2(&x) }.map_err(host_err(core, "KVM_SET_XSAVE"))
}

/// Scales the guest TSC when the source's frequency differs from this
/// vCPU's by more than 250 ppm (what NTP tolerates).
fn set_tsc_khz(core: &VcpuCore, khz: u32) -> Result<(), StateError> {
    if khz == 0 {
        return Ok(());
    }
    let here = core.fd.get_tsc_khz().unwrap_or(0);
    if here != 0 && u64::from(here.abs_diff(khz)) * 1_000_000 <= u64::from(here) * 250 {
        return Ok(());
    }
    core.fd.set_tsc_khz(khz).map_err(|e| {
        StateError::incompatible(
            name(core.index, "tsc_khz"),
            format!(
                "the source's TSC runs at {khz} kHz, this host's at {here} kHz and cannot scale it: {}",
                errno_to_io(e)
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_msr_goes_last_in_its_own_chunk() {
        let mut list: Vec<u32> = (0..600).collect();
        list.insert(3, MSR_IA32_TSC_DEADLINE);
        list.push(MSR_IA32_TSC);
        let chunks = msr_chunks(&list, |&i| i);
        assert_eq!(chunks.last().unwrap(), &vec![MSR_IA32_TSC_DEADLINE]);
        assert!(chunks.iter().all(|c| c.len() <= KVM_MAX_MSR_ENTRIES));
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), list.len());
    }

    #[test]
    fn pvclock_scale_follows_the_guest_formula() {
        // 1 GHz TSC: mul 2^31 with shift 1 is one ns per cycle.
        assert_eq!(pvclock_scale(1_500, 500, 7_000, 1 << 31, 1), 8_000);
        // Shift -1 halves the delta first.
        assert_eq!(pvclock_scale(2_500, 500, 0, 1 << 31, -1), 500);
        // A TSC behind the page's timestamp gives the page's time.
        assert_eq!(pvclock_scale(400, 500, 7_000, 1 << 31, 1), 7_000);
    }

    #[test]
    fn cpuid_check_names_the_missing_bit() {
        let e = |function, ecx| kvm_cpuid_entry2 {
            function,
            ecx,
            ..Default::default()
        };
        let host = [e(1, 0b0110)];
        assert!(check_cpuid("c", &[e(1, 0b0100)], &host).is_ok());
        // OSXSAVE is run-time state, not a feature.
        assert!(check_cpuid("c", &[e(1, 1 << 27)], &host).is_ok());
        let err = check_cpuid("c", &[e(1, 0b1100)], &host).unwrap_err();
        assert!(err.to_string().contains("bit 3"), "{err}");
    }

    #[test]
    fn lvt_mode_keeps_the_other_bits() {
        let mut l = kvm_lapic_state::default();
        l.regs[APIC_LVT0 + 2] = 1; // masked (bit 16)
        set_lvt_mode(&mut l, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x1_0700);
    }
}
