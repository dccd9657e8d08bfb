//! The project's boot-sector guests: `ab` and `random` in 512 bytes.
//!
//! A boot sector is what a PC BIOS loads from the first sector of a disk: 512 bytes
//! at 0000:7c00, entered in 16-bit real mode, ending in the signature `55 aa`. These
//! run the same way under a BIOS (`qemu-system-x86_64 -drive file=ab.bin,format=raw`)
//! and under a VMM without any BIOS that copies the sector to guest-physical 0x7c00
//! and starts a vCPU in real mode at CS:IP = 0000:7c00 (DL = 0x80, as a BIOS sets it
//! for the first hard disk; the code does not use it). They never call the BIOS.
//!
//! # What they do
//!
//! 1. Normalise CS to 0 (a far jump to 0000:7c05; some BIOSes enter at 07c0:0000),
//!    disable interrupts, set DS = 0.
//! 2. Make sure the A20 line is on, touching hardware only if it is not: if the word
//!    at 0x107dfe does not follow writes to the signature's address 0x7dfe, A20 is
//!    already on (always the case under KVM); otherwise "fast A20" (port 0x92, bit 1,
//!    never bit 0, which resets the machine).
//! 3. Enter 32-bit protected mode: `lgdt` of the GDT inside the sector (null, a flat
//!    4 GiB code segment [`CODE_SELECTOR`], a flat 4 GiB data segment
//!    [`DATA_SELECTOR`], both with the accessed bit set so the CPU never writes the
//!    GDT), CR0.PE, a far jump into the code segment. DS, ES, FS, GS and SS get the
//!    data segment, ESP = 0x7c00. Paging stays off; nothing else is enabled.
//! 4. Print a banner on COM1: [`AB_BANNER`] or [`RANDOM_BANNER`].
//! 5. Read the touch size `T` from [`TOUCH_OFFSET`] and run over the whole 4 KiB pages
//!    of `[1 MiB, 1 MiB + T)` forever (a touch size of zero pages, or above
//!    [`MAX_TOUCH`], prints `bad touch` and halts):
//!    - `ab`: increments the first byte of each page in order (`inc byte [ecx]`),
//!      pass after pass, and writes `B` to COM1 after each pass, like the `ab`
//!      built-in, so [`super::ab_check`] verifies its RAM with one vCPU.
//!    - `random`: xorshift32 (shifts 13, 17, 5) from [`RANDOM_SEED`]; each value `r`
//!      is written as 4 bytes at `1 MiB + (r % pages) * 4096 + ((r >> 20) % 1024) *
//!      4`, as fast as it can, with no output after the banner.
//!
//! COM1 output waits for the line status register (0x3fd) bit 5, then writes 0x3f8;
//! the UART is not programmed (an emulated 16550 needs no baud rate). Ports used:
//! 0x3f8 (write), 0x3fd (read), and 0x92 only where A20 was off. The stack below
//! 0x7c00 holds one return address while a string is printed.
//!
//! # Layout
//!
//! | offset | size | contents |
//! |--------|------|----------|
//! | 0x000 | up to 0x198 | code: the real-mode stage, then the 32-bit stage and its strings |
//! | [`GDTR_OFFSET`] 0x198 | 6 (+2 zero) | GDTR: limit 23, base 0x7da0 |
//! | [`GDT_OFFSET`] 0x1a0 | 24 | GDT: null, flat code (0x08), flat data (0x10) |
//! | 0x1b8 | 66 | zero (the partition table area: no partitions) |
//! | [`TOUCH_OFFSET`] 0x1fa | 4 | touch size in bytes, u32 little-endian |
//! | [`SIGNATURE_OFFSET`] 0x1fe | 2 | `55 aa` |
//!
//! The touch size is a parameter of the image: [`ab`] and [`random`] store it, and a
//! sector can be re-targeted by rewriting those four bytes (the code reads them at
//! run time). The committed images in `guests/` use [`DEFAULT_TOUCH`] (64 MiB);
//! [`write_images`] regenerates them.
//!
//! # Example
//!
//! ```
//! use vmm_glue::guest::boot_sector::{self, SIGNATURE, TOUCH_OFFSET};
//!
//! let sector = boot_sector::ab(16 << 20).unwrap();
//! assert_eq!(sector[510..], SIGNATURE);
//! assert_eq!(sector[TOUCH_OFFSET..TOUCH_OFFSET + 4], (16u32 << 20).to_le_bytes());
//! assert_eq!(boot_sector::touch(&sector), 16 << 20);
//! ```

use std::ops::Range;
use std::path::{Path, PathBuf};

use iced_x86::code_asm::{
    al, ax, byte_ptr, cr0, ds, dword_ptr, dx, eax, ebx, ecx, edi, edx, es, esi, esp, fs, gs, ptr,
    ss, word_ptr, CodeAssembler, CodeLabel,
};
use iced_x86::{BlockEncoderOptions, Code, IcedError, Instruction};

use super::{wait_com1_ready, PAGE_SIZE};

/// Size of a boot sector.
pub const SECTOR_SIZE: usize = 512;
/// Guest-physical address a boot sector is loaded at and entered (CS:IP 0000:7c00).
pub const LOAD_ADDR: u32 = 0x7c00;
/// Offset of the GDTR operand of `lgdt` (limit u16, base u32, little-endian).
pub const GDTR_OFFSET: usize = 0x198;
/// Offset of the GDT (three 8-byte descriptors).
pub const GDT_OFFSET: usize = 0x1a0;
/// Offset of the touch size: bytes from 1 MiB the workload runs over, u32
/// little-endian.
pub const TOUCH_OFFSET: usize = 0x1fa;
/// Offset of the boot signature.
pub const SIGNATURE_OFFSET: usize = 0x1fe;
/// The boot signature a BIOS checks.
pub const SIGNATURE: [u8; 2] = [0x55, 0xaa];
/// Selector of the flat 32-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the flat 32-bit data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Where the workload memory starts: 1 MiB, above the BIOS area and the legacy hole.
pub const TOUCH_START: u64 = 0x10_0000;
/// Touch size of the committed images: 64 MiB.
pub const DEFAULT_TOUCH: u64 = 64 << 20;
/// The largest touch size: the workload then ends at 0xffff_f000, so the cursor never
/// wraps around 4 GiB.
pub const MAX_TOUCH: u64 = 0xffff_f000 - TOUCH_START;
/// xorshift32 seed of the `random` boot sector.
pub const RANDOM_SEED: u32 = 0x9e37_79b9;
/// What the `ab` boot sector prints first.
pub const AB_BANNER: &str = "ab\r\n";
/// What the `random` boot sector prints first.
pub const RANDOM_BANNER: &str = "random\r\n";

/// What is printed, instead of running, when the touch size is unusable.
const BAD_TOUCH: &str = "bad touch\r\n";

// The addresses the code uses, as the 32-bit (and, below 64 KiB, 16-bit) values it
// encodes. Sector offsets are below 512, so these casts are exact.
const GDTR_ADDR: u32 = LOAD_ADDR + GDTR_OFFSET as u32;
const GDT_ADDR: u32 = LOAD_ADDR + GDT_OFFSET as u32;
const TOUCH_ADDR: u32 = LOAD_ADDR + TOUCH_OFFSET as u32;
const SIGNATURE_ADDR: u32 = LOAD_ADDR + SIGNATURE_OFFSET as u32;
const START: u32 = 0x10_0000;
const PAGE: u32 = 4096;
const MAX_PAGES: u32 = 0xf_feff;
const _: () = assert!(START as u64 == TOUCH_START && PAGE as u64 == PAGE_SIZE);
const _: () = assert!(MAX_PAGES as u64 * PAGE_SIZE == MAX_TOUCH);

/// Flat 4 GiB code segment: base 0, limit 0xfffff in 4 KiB units, 32-bit, present,
/// ring 0, execute/read, accessed.
const GDT_CODE: u64 = 0x00cf_9b00_0000_ffff;
/// Flat 4 GiB data segment: as the code segment, read/write, accessed.
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
/// Bytes of a 16-bit far jump (`ea` ptr16:16): the first instruction.
const FAR_JMP16_LEN: u32 = 5;

/// A boot sector the project ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootSector {
    /// Increments the first byte of each page of the touch range, pass after pass.
    Ab,
    /// Writes xorshift32 values all over the touch range.
    Random,
}

impl BootSector {
    /// Every boot sector the project ships.
    pub const ALL: [BootSector; 2] = [BootSector::Ab, BootSector::Random];

    /// `ab` or `random`.
    pub fn name(self) -> &'static str {
        match self {
            BootSector::Ab => "ab",
            BootSector::Random => "random",
        }
    }

    /// The file name of the committed image in `guests/`: `ab.bin` or `random.bin`.
    pub fn file_name(self) -> &'static str {
        match self {
            BootSector::Ab => "ab.bin",
            BootSector::Random => "random.bin",
        }
    }

    /// What it prints on COM1 first.
    pub fn banner(self) -> &'static str {
        match self {
            BootSector::Ab => AB_BANNER,
            BootSector::Random => RANDOM_BANNER,
        }
    }

    /// The sector, running over `[1 MiB, 1 MiB + touch)`.
    pub fn generate(self, touch: u64) -> Result<[u8; SECTOR_SIZE], BootSectorError> {
        Ok(build(self, touch)?.sector)
    }
}

/// Why a boot sector could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum BootSectorError {
    /// The touch size is not a whole number of pages in range.
    #[error("touch size {touch:#x}: must be a multiple of 4 KiB from 4 KiB to {MAX_TOUCH:#x}")]
    Touch {
        /// The touch size asked for.
        touch: u64,
    },
    /// iced-x86 refused the code (a bug in this module).
    #[error("cannot assemble the {stage} of the {sector} boot sector")]
    Assemble {
        /// `ab` or `random`.
        sector: &'static str,
        /// `real-mode stage` or `32-bit stage`.
        stage: &'static str,
        /// The assembler's complaint.
        #[source]
        source: IcedError,
    },
    /// The code does not fit where the layout puts it (a bug in this module).
    #[error("the {sector} boot sector does not fit its layout: {what}")]
    Layout {
        /// `ab` or `random`.
        sector: &'static str,
        /// What went wrong.
        what: String,
    },
    /// An image could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The `ab` boot sector over `[1 MiB, 1 MiB + touch)`.
pub fn ab(touch: u64) -> Result<[u8; SECTOR_SIZE], BootSectorError> {
    BootSector::Ab.generate(touch)
}

/// The `random` boot sector over `[1 MiB, 1 MiB + touch)`.
pub fn random(touch: u64) -> Result<[u8; SECTOR_SIZE], BootSectorError> {
    BootSector::Random.generate(touch)
}

/// The touch size stored in a sector (the bytes at [`TOUCH_OFFSET`]).
pub fn touch(sector: &[u8; SECTOR_SIZE]) -> u64 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&sector[TOUCH_OFFSET..TOUCH_OFFSET + 4]);
    u64::from(u32::from_le_bytes(b))
}

/// Writes every [`BootSector`] with [`DEFAULT_TOUCH`] into `dir` under its
/// [`BootSector::file_name`] (the committed `guests/` images), and returns the paths.
pub fn write_images(dir: &Path) -> Result<Vec<PathBuf>, BootSectorError> {
    BootSector::ALL
        .into_iter()
        .map(|s| {
            let path = dir.join(s.file_name());
            let sector = s.generate(DEFAULT_TOUCH)?;
            std::fs::write(&path, sector).map_err(|source| BootSectorError::Write {
                path: path.clone(),
                source,
            })?;
            Ok(path)
        })
        .collect()
}

/// A sector and where its code is, for the tests that decode it.
// Only the tests read the ranges.
#[cfg_attr(not(test), allow(dead_code))]
struct Built {
    sector: [u8; SECTOR_SIZE],
    /// 16-bit code.
    real: Range<usize>,
    /// 32-bit code (its strings follow).
    protected: Range<usize>,
}

/// Addresses of the strings of the 32-bit stage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Strings {
    banner: u64,
    bad_touch: u64,
}

fn build(kind: BootSector, touch: u64) -> Result<Built, BootSectorError> {
    let pages = touch / PAGE_SIZE;
    let touch32 = match u32::try_from(touch) {
        Ok(t) if touch % PAGE_SIZE == 0 && pages > 0 && touch <= MAX_TOUCH => t,
        _ => return Err(BootSectorError::Touch { touch }),
    };
    let asm_err = |stage| {
        move |source| BootSectorError::Assemble {
            sector: kind.name(),
            stage,
            source,
        }
    };
    let layout = |what: String| BootSectorError::Layout {
        sector: kind.name(),
        what,
    };

    // The far jump's target does not change the real-mode stage's size: assemble
    // once to learn where the 32-bit stage starts, then for real.
    let probe = real_mode_stage(0).map_err(asm_err("real-mode stage"))?;
    let pm_entry = u32::try_from(probe.len())
        .ok()
        .filter(|&n| n < PAGE)
        .map(|n| LOAD_ADDR + n)
        .ok_or_else(|| layout(format!("{} bytes of real-mode code", probe.len())))?;
    let real = real_mode_stage(pm_entry).map_err(asm_err("real-mode stage"))?;

    // The strings follow the 32-bit code, and their addresses are immediates of
    // fixed size: a first pass finds them, the second uses them.
    let (_, strings, _) =
        protected_stage(kind, pm_entry, Strings::default()).map_err(asm_err("32-bit stage"))?;
    let (protected, again, strings_len) =
        protected_stage(kind, pm_entry, strings).map_err(asm_err("32-bit stage"))?;
    let len = real.len() + protected.len();
    if real.len() != probe.len() || again != strings {
        return Err(layout("code moved between assembly passes".into()));
    }
    if len > GDTR_OFFSET {
        return Err(layout(format!(
            "{len} bytes of code, {GDTR_OFFSET} fit before the GDTR"
        )));
    }

    let mut sector = [0u8; SECTOR_SIZE];
    sector[..real.len()].copy_from_slice(&real);
    sector[real.len()..len].copy_from_slice(&protected);
    sector[GDTR_OFFSET..GDTR_OFFSET + 2].copy_from_slice(&(3 * 8 - 1u16).to_le_bytes());
    sector[GDTR_OFFSET + 2..GDTR_OFFSET + 6].copy_from_slice(&GDT_ADDR.to_le_bytes());
    for (i, d) in [0, GDT_CODE, GDT_DATA].into_iter().enumerate() {
        let o = GDT_OFFSET + 8 * i;
        sector[o..o + 8].copy_from_slice(&d.to_le_bytes());
    }
    sector[TOUCH_OFFSET..TOUCH_OFFSET + 4].copy_from_slice(&touch32.to_le_bytes());
    sector[SIGNATURE_OFFSET..].copy_from_slice(&SIGNATURE);
    Ok(Built {
        sector,
        real: 0..real.len(),
        protected: real.len()..len - strings_len,
    })
}

/// Real mode at 0000:7c00: CS normalised, A20 on, GDT loaded, PE set, far jump to
/// `pm_entry` in the 32-bit code segment.
fn real_mode_stage(pm_entry: u32) -> Result<Vec<u8>, IcedError> {
    let signature = SIGNATURE_ADDR;
    // With ES = 0xffff, ES:alias is 1 MiB above the signature: the same memory as
    // the signature while A20 is off.
    let alias = signature + 0x10;
    let mut a = CodeAssembler::new(16)?;
    let mut a20_on = a.create_label();

    // CS = 0 whatever the BIOS used: jump to the next instruction, 0000:7c05.
    a.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1616,
        0,
        LOAD_ADDR + FAR_JMP16_LEN,
    )?)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;

    // A20: does the word 1 MiB above the signature alias it?
    a.mov(ax, 0xffff_u32)?;
    a.mov(es, ax)?;
    a.mov(ax, word_ptr(signature))?;
    a.cmp(ax, word_ptr(alias).es())?;
    a.jne(a20_on)?;
    a.inc(word_ptr(alias).es())?;
    a.cmp(ax, word_ptr(signature))?;
    a.je(a20_on)?;
    // It does: fast A20 on (bit 1), never the reset bit (bit 0).
    a.in_(al, 0x92_u32)?;
    a.or(al, 2_u32)?;
    a.and(al, 0xfe_u32)?;
    a.out(0x92_u32, al)?;

    a.set_label(&mut a20_on)?;
    a.lgdt(ptr(GDTR_ADDR))?;
    a.mov(eax, cr0)?;
    a.or(al, 1_u32)?;
    a.mov(cr0, eax)?;
    a.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1616,
        CODE_SELECTOR,
        pm_entry,
    )?)?;
    a.assemble(u64::from(LOAD_ADDR))
}

/// 32-bit protected mode from `org`: segments, banner, touch size check, workload.
/// Returns the code, the addresses its strings landed at, and the strings' length.
fn protected_stage(
    kind: BootSector,
    org: u32,
    strings: Strings,
) -> Result<(Vec<u8>, Strings, usize), IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut bad = a.create_label();
    let mut halt = a.create_label();
    let mut print = a.create_label();
    let mut printed = a.create_label();
    let mut banner = a.create_label();
    let mut bad_touch = a.create_label();

    a.mov(ax, u32::from(DATA_SELECTOR))?;
    for seg in [ds, es, fs, gs, ss] {
        a.mov(seg, ax)?;
    }
    a.mov(esp, LOAD_ADDR)?;
    a.mov(ebx, addr32(strings.banner))?;
    a.call(print)?;

    // ECX = whole pages to touch; refuse none, or more than fit below 4 GiB.
    a.mov(ecx, dword_ptr(TOUCH_ADDR))?;
    a.shr(ecx, 12)?;
    a.jz(bad)?;
    a.cmp(ecx, MAX_PAGES)?;
    a.ja(bad)?;
    match kind {
        BootSector::Ab => ab_loop(&mut a)?,
        BootSector::Random => random_loop(&mut a)?,
    }

    a.set_label(&mut bad)?;
    a.mov(ebx, addr32(strings.bad_touch))?;
    a.call(print)?;
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;

    // print: the NUL-terminated string at EBX to COM1. Clobbers EAX, EBX, EDX.
    a.set_label(&mut print)?;
    wait_com1_ready(&mut a)?;
    a.mov(al, byte_ptr(ebx))?;
    a.test(al, al)?;
    a.jz(printed)?;
    a.out(dx, al)?;
    a.inc(ebx)?;
    a.jmp(print)?;
    a.set_label(&mut printed)?;
    a.ret()?;

    let mut strings_len = 0;
    for (label, s) in [(&mut banner, kind.banner()), (&mut bad_touch, BAD_TOUCH)] {
        a.set_label(label)?;
        let z: Vec<u8> = s.bytes().chain([0]).collect();
        strings_len += z.len();
        a.db(&z)?;
    }

    let r = a.assemble_options(
        u64::from(org),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let ip = |l: &CodeLabel| r.label_ip(l);
    let at = Strings {
        banner: ip(&banner)?,
        bad_touch: ip(&bad_touch)?,
    };
    Ok((r.inner.code_buffer, at, strings_len))
}

/// A string's address as the 32-bit immediate that loads it. Addresses in the sector
/// always fit; were one not to, the value would differ from the label's address and
/// `build` would refuse the sector.
fn addr32(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

/// `ab` over ECX pages from 1 MiB: ESI start, EDI end, ECX cursor. Never returns.
fn ab_loop(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut next = a.create_label();
    a.shl(ecx, 12)?;
    a.mov(esi, START)?;
    a.lea(edi, ptr(esi + ecx))?;
    a.mov(ecx, esi)?;
    a.set_label(&mut next)?;
    a.inc(byte_ptr(ecx))?;
    a.add(ecx, PAGE)?;
    a.cmp(ecx, edi)?;
    a.jb(next)?;
    a.mov(ecx, esi)?;
    wait_com1_ready(a)?;
    a.mov(al, u32::from(b'B'))?;
    a.out(dx, al)?;
    a.jmp(next)
}

/// `random` over ECX pages from 1 MiB: ESI start, ECX pages, EBX generator. Never
/// returns.
fn random_loop(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut step = a.create_label();
    a.mov(esi, START)?;
    a.mov(ebx, RANDOM_SEED)?;
    a.set_label(&mut step)?;
    for (left, shift) in [(true, 13), (false, 17), (true, 5)] {
        a.mov(eax, ebx)?;
        if left {
            a.shl(eax, shift)?;
        } else {
            a.shr(eax, shift)?;
        }
        a.xor(ebx, eax)?;
    }
    // EDX = page = r % pages, then its byte offset.
    a.mov(eax, ebx)?;
    a.xor(edx, edx)?;
    a.div(ecx)?;
    a.shl(edx, 12)?;
    // EAX = dword within the page = (r >> 20) % 1024.
    a.mov(eax, ebx)?;
    a.shr(eax, 20)?;
    a.and(eax, 1023)?;
    a.lea(edx, ptr(edx + eax * 4))?;
    a.mov(dword_ptr(esi + edx), ebx)?;
    a.jmp(step)
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

    use super::*;

    fn decode(bitness: u32, sector: &[u8], range: Range<usize>) -> Vec<Instruction> {
        let ip = u64::from(LOAD_ADDR) + range.start as u64;
        let mut d = Decoder::with_ip(bitness, &sector[range.clone()], ip, DecoderOptions::NONE);
        let mut out = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(
                !i.is_invalid(),
                "invalid {bitness}-bit code at {:#x}",
                i.ip()
            );
            out.push(i);
        }
        let len: usize = out.iter().map(Instruction::len).sum();
        assert_eq!(len, range.len(), "{bitness}-bit code decodes to its end");
        out
    }

    #[test]
    fn sectors_have_the_signature_gdt_and_parameter_where_documented() {
        for kind in BootSector::ALL {
            for touch in [4096, 8 << 20, DEFAULT_TOUCH, 512 << 20, MAX_TOUCH] {
                let s = kind.generate(touch).unwrap();
                assert_eq!(s[510..], [0x55, 0xaa], "{kind:?}");
                assert_eq!(s[0x1fa..0x1fe], u32::try_from(touch).unwrap().to_le_bytes());
                assert_eq!(super::touch(&s), touch);
                // GDTR: limit 23, base = the GDT in the loaded sector.
                assert_eq!(s[0x198..0x19e], [23, 0, 0xa0, 0x7d, 0, 0]);
                let d = |i: usize| u64::from_le_bytes(s[0x1a0 + 8 * i..][..8].try_into().unwrap());
                assert_eq!(d(0), 0, "null descriptor");
                for (i, exec) in [(1, true), (2, false)] {
                    let v = d(i);
                    let base = (v >> 16) & 0xff_ffff | ((v >> 56) << 24);
                    let limit = (v & 0xffff) | ((v >> 48) & 0xf) << 16;
                    let access = (v >> 40) & 0xff;
                    let flags = (v >> 52) & 0xf;
                    assert_eq!((base, limit), (0, 0xfffff), "flat");
                    assert_eq!(flags, 0b1100, "4 KiB granularity, 32-bit");
                    assert_eq!(access & 0xf0, 0x90, "present, ring 0, code/data");
                    assert_eq!(access & 0x8 != 0, exec);
                    assert_eq!(access & 0x3, 0x3, "readable/writable, accessed");
                }
                // Zero between the GDT and the parameter: an empty partition table.
                assert!(s[0x1b8..0x1fa].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn unusable_touch_sizes_are_refused() {
        for touch in [0, 100, 4097, MAX_TOUCH + 4096, 1 << 32, u64::MAX] {
            let e = ab(touch).unwrap_err();
            assert!(matches!(e, BootSectorError::Touch { touch: t } if t == touch));
            assert!(random(touch).is_err());
        }
    }

    #[test]
    fn code_decodes_back_and_switches_modes_where_documented() {
        for kind in BootSector::ALL {
            let b = build(kind, DEFAULT_TOUCH).unwrap();
            let real = decode(16, &b.sector, b.real.clone());
            let prot = decode(32, &b.sector, b.protected.clone());
            // First a far jump to the next instruction with CS = 0.
            assert_eq!(real[0].code(), Code::Jmp_ptr1616);
            assert_eq!(real[0].far_branch_selector(), 0);
            assert_eq!(u64::from(real[0].far_branch32()), real[1].ip());
            assert_eq!(real[1].mnemonic(), Mnemonic::Cli);
            // lgdt reads the GDTR at its documented place.
            let lgdt = real
                .iter()
                .find(|i| i.mnemonic() == Mnemonic::Lgdt)
                .unwrap();
            assert_eq!(lgdt.memory_displacement64(), 0x7c00 + 0x198);
            assert_eq!(lgdt.memory_base(), Register::None);
            // Last a far jump into the code segment, right after the real-mode code.
            let last = real.last().unwrap();
            assert_eq!(last.code(), Code::Jmp_ptr1616);
            assert_eq!(last.far_branch_selector(), CODE_SELECTOR);
            assert_eq!(u64::from(last.far_branch32()), prot[0].ip());
            // The only port written besides COM1 is 0x92.
            let outs: Vec<_> = real
                .iter()
                .filter(|i| i.mnemonic() == Mnemonic::Out)
                .collect();
            assert_eq!(outs.len(), 1);
            assert_eq!(outs[0].op0_kind(), OpKind::Immediate8);
            assert_eq!(outs[0].immediate8(), 0x92);
            // Only stack use in 32-bit code: the print routine's call and ret.
            let m: Vec<_> = prot.iter().map(Instruction::mnemonic).collect();
            for bad in [Mnemonic::Int, Mnemonic::Sti, Mnemonic::Push, Mnemonic::Pop] {
                assert!(!m.contains(&bad), "{kind:?} uses {bad:?}");
            }
            // The touch size is read from its documented place.
            assert!(prot.iter().any(|i| i.mnemonic() == Mnemonic::Mov
                && i.op0_register() == Register::ECX
                && i.memory_displacement64() == 0x7c00 + 0x1fa));
            // Its strings follow the code.
            let strings = &b.sector[b.protected.end..];
            let banner = kind.banner().as_bytes();
            assert_eq!(&strings[..banner.len() + 1], [banner, &[0]].concat());
        }
    }

    #[test]
    fn each_workload_writes_memory_in_one_place() {
        for (kind, mnemonic, size) in [
            (BootSector::Ab, Mnemonic::Inc, iced_x86::MemorySize::UInt8),
            (
                BootSector::Random,
                Mnemonic::Mov,
                iced_x86::MemorySize::UInt32,
            ),
        ] {
            let b = build(kind, DEFAULT_TOUCH).unwrap();
            let prot = decode(32, &b.sector, b.protected.clone());
            let writes: Vec<_> = prot
                .iter()
                .filter(|i| i.op_count() > 0 && i.op0_kind() == OpKind::Memory)
                .collect();
            assert_eq!(writes.len(), 1, "{kind:?}");
            assert_eq!(writes[0].mnemonic(), mnemonic);
            assert_eq!(writes[0].memory_size(), size);
        }
    }

    /// The committed images are what the generator makes (`cargo xtask guests`
    /// rewrites them).
    #[test]
    fn committed_images_match_the_generator() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
        for kind in BootSector::ALL {
            let path = dir.join(kind.file_name());
            let committed =
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == kind.generate(DEFAULT_TOUCH).unwrap(),
                "{} differs from its generator: run `cargo xtask guests` and commit it",
                path.display()
            );
        }
    }
}
