//! The built-in workloads as 64-bit x86 code for KVM vCPUs.
//!
//! [`program`] returns the code of a [`Workload`] and where it goes. The same code runs
//! on every vCPU; the registers the VMM sets at the entry tell each vCPU its slice of
//! RAM. The semantics are those of the soft vCPUs of [`crate::soft`], so the RAM of a
//! KVM guest passes the same checks ([`super::ab_check`]).
//!
//! # What the VMM must provide
//!
//! - **Mode**: 64-bit long mode, CPL 0, a flat 64-bit code segment, paging on with an
//!   identity map (virtual = guest-physical) that covers the code page and every
//!   vCPU's slice, writable. The guest sets up nothing: no paging, no GDT, no IDT.
//! - **Interrupts off**: RFLAGS.IF = 0 (the code also starts with `cli`). No IDT is
//!   needed: with the contract below the code raises no exception.
//! - **Code**: [`Program::code`] copied to guest-physical [`LOAD_ADDR`] (0x8000, below
//!   640 KiB, above the 0x0–0x7bff the VMM keeps for page tables, GDT and stacks). It
//!   is shorter than one page ([`MAX_LEN`]), so the guest fetches from
//!   `[0x8000, 0x9000)` only. Each vCPU starts at [`Program::entry`].
//! - **Registers at the entry** (each vCPU):
//!
//!   | register | value |
//!   |----------|-------|
//!   | RIP | [`Program::entry`] |
//!   | RDI | start of the vCPU's slice, 4 KiB-aligned |
//!   | RSI | end of the slice (exclusive), 4 KiB-aligned, above RDI |
//!   | RDX | the vCPU's index, 0 to count − 1 |
//!   | RSP | any value: the code never touches a stack |
//!   | others | any value: the code does not read them before writing them |
//!
//!   [`super::slices`] computes the RDI and RSI of each vCPU. Slices must not overlap
//!   each other, the code page, or anything the VMM keeps in guest memory. An empty
//!   slice (RSI ≤ RDI) makes the vCPU halt for good, and so does a slice of fewer
//!   than two pages for `balloon`.
//! - **Ports** (`ab` and `balloon`): reads of COM1's line status register (0x3fd)
//!   until bit 5 (transmitter empty) is set, then one write of `B` to 0x3f8 per pass.
//!   `balloon` also makes one balloon request per pass, before the `B`: a 4-byte write
//!   (`out dx, eax`) of its balloon area's first page frame number to port 0x600, then
//!   one of its page count to port 0x604 (the protocol of [`super::balloon`]); the
//!   VMM answers nothing. `random` and `idle` do no I/O.
//!
//! # Memory and state
//!
//! Every data access lies in `[RDI, RSI)`: `ab` increments the first byte of each page
//! (`inc byte [rcx]`, one instruction, so the a-b pattern holds at every instant),
//! `random` writes 8-byte-aligned quadwords (`mov [rdi + rdx], rbx`), `balloon` does
//! what `ab` does on the first half of the slice and writes its marker (`mov [rcx],
//! rbx`, 8 bytes) at the start of each page of the second. Nothing is kept in memory:
//! the whole state of a vCPU is in its general-purpose registers, RIP and RFLAGS,
//! which migrate with the vCPU (the VMM keeps the PFN register of a request in
//! flight, see [`super::balloon`]):
//!
//! | workload | state |
//! |----------|-------|
//! | `ab` | RDI slice start, RSI slice end, RCX cursor (the next page to increment); RAX and RDX scratch while writing `B` |
//! | `random` | RDI slice start, RSI slice end, RCX pages in the slice, RBX generator; RAX and RDX scratch |
//! | `idle` | none: `cli; hlt` in a loop |
//! | `balloon` | RDI slice start, RSI slice end, R8 balloon area start (the middle page), R9 its page frame number, R10 its page count, RCX cursor, RBX marker (the pass number + 1); RAX and RDX scratch |
//!
//! # The `random` generator
//!
//! xorshift64 (shifts 13, 7, 17) seeded with `0x9e37_79b9_7f4a_7c15 ^ (RDX + 1)`, the
//! seed of [`crate::soft`], so vCPUs write different sequences; a zero seed (which no
//! real vCPU index gives) is replaced, since xorshift would stay at zero. Each step
//! takes the next value `r` and writes it at
//! `RDI + (r % pages) * 4096 + ((r >> 40) % 512) * 8`.
//!
//! # Example
//!
//! ```
//! use vmm_glue::guest::builtin::{program, LOAD_ADDR};
//! use vmm_glue::guest::Workload;
//!
//! let p = program(Workload::Ab);
//! assert_eq!((p.load_addr, p.entry), (LOAD_ADDR, LOAD_ADDR));
//! // The VMM copies p.code to guest-physical p.load_addr and starts every vCPU at
//! // p.entry with RDI, RSI and RDX set from guest::slices.
//! assert!(!p.code.is_empty());
//! ```

use iced_x86::code_asm::{
    al, byte_ptr, dx, eax, ebx, edx, ptr, qword_ptr, r10, r10d, r8, r9, r9d, rax, rbx, rcx, rdi,
    rdx, rsi, CodeAssembler, CodeLabel,
};
use iced_x86::IcedError;

use super::balloon::{COUNT_PORT, PFN_PORT};
use super::{wait_com1_ready, Workload, PAGE_SIZE};

/// Guest-physical address every built-in program is loaded at (and its first byte
/// executed from): the page after the VMM's area `0x0`–`0x7bff`, below 640 KiB.
pub const LOAD_ADDR: u64 = 0x8000;

/// The longest a built-in program may be: one page, so it never crosses into memory
/// the VMM did not load.
pub const MAX_LEN: usize = 4096;

/// xorshift64 seed base of `random`: each vCPU's seed is this `^ (index + 1)`.
pub const RANDOM_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A built-in guest's code and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The machine code, to be copied to guest-physical [`Program::load_addr`].
    pub code: Vec<u8>,
    /// The guest-physical (and, identity-mapped, virtual) address of `code[0]`.
    pub load_addr: u64,
    /// Where every vCPU starts (its RIP).
    pub entry: u64,
}

/// The 64-bit code of `workload`, to be loaded at [`LOAD_ADDR`] and entered with the
/// registers of the module's contract.
pub fn program(workload: Workload) -> Program {
    // The code is fixed: assembling it depends on nothing but the workload, so it
    // either always fails or never does, and the unit tests assemble every workload.
    // A failure is a bug in this module, not a condition a caller could handle.
    let code = assemble(workload).unwrap_or_else(|e| {
        panic!("the built-in {workload} guest does not assemble (a bug in guest::builtin): {e}")
    });
    Program {
        code,
        load_addr: LOAD_ADDR,
        entry: LOAD_ADDR,
    }
}

fn assemble(workload: Workload) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut halt = a.create_label();
    match workload {
        Workload::Ab => ab(&mut a, halt)?,
        Workload::Random => random(&mut a, halt)?,
        Workload::Balloon => balloon(&mut a, halt)?,
        Workload::Idle => {}
    }
    // `idle`, and every vCPU handed an empty slice, ends here for good.
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;
    a.assemble(LOAD_ADDR)
}

/// `ab`: RDI start, RSI end, RCX cursor. Jumps to `halt` on an empty slice.
fn ab(a: &mut CodeAssembler, halt: CodeLabel) -> Result<(), IcedError> {
    let mut next = a.create_label();
    a.cli()?;
    a.mov(rcx, rdi)?;
    a.cmp(rdi, rsi)?;
    a.jae(halt)?;

    a.set_label(&mut next)?;
    a.inc(byte_ptr(rcx))?;
    a.add(rcx, PAGE_SIZE as i32)?;
    a.cmp(rcx, rsi)?;
    a.jb(next)?;
    // A pass is complete: start over, and say so on COM1.
    a.mov(rcx, rdi)?;
    wait_com1_ready(a)?;
    a.mov(al, u32::from(b'B'))?;
    a.out(dx, al)?;
    a.jmp(next)
}

/// `balloon`: RDI start, RSI end, R8 balloon area, R9 its page frame number, R10 its
/// page count, RCX cursor, RBX marker. Jumps to `halt` on a slice of fewer than two
/// pages.
fn balloon(a: &mut CodeAssembler, halt: CodeLabel) -> Result<(), IcedError> {
    let mut pass = a.create_label();
    let mut ab_page = a.create_label();
    let mut mark_page = a.create_label();
    a.cli()?;
    // RCX = the ab half's bytes: (pages / 2) * 4096.
    a.mov(rcx, rsi)?;
    a.sub(rcx, rdi)?;
    a.jbe(halt)?;
    a.shr(rcx, 13)?;
    a.jz(halt)?;
    a.shl(rcx, 12)?;
    a.lea(r8, ptr(rdi + rcx))?;
    a.mov(r9, r8)?;
    a.shr(r9, 12)?;
    a.mov(r10, rsi)?;
    a.sub(r10, r8)?;
    a.shr(r10, 12)?;
    // The marker of pass 0.
    a.mov(ebx, 1u32)?;

    a.set_label(&mut pass)?;
    a.mov(rcx, rdi)?;
    a.set_label(&mut ab_page)?;
    a.inc(byte_ptr(rcx))?;
    a.add(rcx, PAGE_SIZE as i32)?;
    a.cmp(rcx, r8)?;
    a.jb(ab_page)?;
    // RCX = R8: the balloon area.
    a.set_label(&mut mark_page)?;
    a.mov(qword_ptr(rcx), rbx)?;
    a.add(rcx, PAGE_SIZE as i32)?;
    a.cmp(rcx, rsi)?;
    a.jb(mark_page)?;
    // Give the area back: its first page frame, then its page count.
    a.mov(dx, u32::from(PFN_PORT))?;
    a.mov(eax, r9d)?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(COUNT_PORT))?;
    a.mov(eax, r10d)?;
    a.out(dx, eax)?;
    // A pass is complete: say so on COM1, and start the next with the next marker.
    wait_com1_ready(a)?;
    a.mov(al, u32::from(b'B'))?;
    a.out(dx, al)?;
    a.inc(rbx)?;
    a.jmp(pass)
}

/// `random`: RDI start, RSI end, RCX pages, RBX generator. Jumps to `halt` on an
/// empty slice.
fn random(a: &mut CodeAssembler, halt: CodeLabel) -> Result<(), IcedError> {
    let mut step = a.create_label();
    a.cli()?;
    a.mov(rcx, rsi)?;
    a.sub(rcx, rdi)?;
    a.jbe(halt)?;
    a.shr(rcx, 12)?;
    a.jz(halt)?;
    a.lea(rbx, ptr(rdx + 1))?;
    a.mov(rax, RANDOM_SEED)?;
    a.xor(rbx, rax)?;
    a.jnz(step)?;
    a.mov(rbx, rax)?;

    a.set_label(&mut step)?;
    for (left, shift) in [(true, 13), (false, 7), (true, 17)] {
        a.mov(rax, rbx)?;
        if left {
            a.shl(rax, shift)?;
        } else {
            a.shr(rax, shift)?;
        }
        a.xor(rbx, rax)?;
    }
    // RDX = page = r % pages, then its byte offset.
    a.mov(rax, rbx)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.shl(rdx, 12)?;
    // RAX = quadword within the page = (r >> 40) % 512.
    a.mov(rax, rbx)?;
    a.shr(rax, 40)?;
    a.and(eax, 511)?;
    a.lea(rdx, ptr(rdx + rax * 8))?;
    a.mov(qword_ptr(rdi + rdx), rbx)?;
    a.jmp(step)
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

    use super::*;

    fn decode(p: &Program) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, &p.code, p.load_addr, DecoderOptions::NONE);
        let mut out = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(
                !i.is_invalid(),
                "invalid instruction at {:#x}: {:02x?}",
                i.ip(),
                &p.code[(i.ip() - p.load_addr) as usize..]
            );
            out.push(i);
        }
        out
    }

    fn mnemonics(ins: &[Instruction]) -> Vec<Mnemonic> {
        ins.iter().map(Instruction::mnemonic).collect()
    }

    /// Instructions that write memory (an explicit memory destination operand).
    fn memory_writes(ins: &[Instruction]) -> Vec<Instruction> {
        ins.iter()
            .filter(|i| i.op_count() > 0 && i.op0_kind() == OpKind::Memory)
            .copied()
            .collect()
    }

    #[test]
    fn every_program_decodes_back_and_stays_in_its_page() {
        for w in Workload::ALL {
            let p = program(w);
            assert_eq!(p.load_addr, LOAD_ADDR);
            assert_eq!(p.entry, LOAD_ADDR);
            assert!(p.code.len() <= MAX_LEN, "{w}: {} bytes", p.code.len());
            let ins = decode(&p);
            let len: usize = ins.iter().map(Instruction::len).sum();
            assert_eq!(len, p.code.len(), "{w}: decoded length");
            let starts: Vec<u64> = ins.iter().map(Instruction::ip).collect();
            for i in &ins {
                if matches!(
                    i.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) && i.op_count() > 0
                {
                    assert!(
                        starts.contains(&i.near_branch_target()),
                        "{w}: branch at {:#x} to {:#x}, not an instruction of the program",
                        i.ip(),
                        i.near_branch_target()
                    );
                }
            }
            let m = mnemonics(&ins);
            assert_eq!(m[0], Mnemonic::Cli, "{w}: interrupts off first");
            // No stack and no mode changes: the state is all in registers.
            for bad in [
                Mnemonic::Push,
                Mnemonic::Pop,
                Mnemonic::Call,
                Mnemonic::Ret,
                Mnemonic::Pushfq,
                Mnemonic::Popfq,
                Mnemonic::Iretq,
                Mnemonic::Sti,
                Mnemonic::Lgdt,
                Mnemonic::Lidt,
                Mnemonic::Wrmsr,
                Mnemonic::Syscall,
            ] {
                assert!(!m.contains(&bad), "{w} uses {bad:?}");
            }
            // Every path ends in the halt loop or loops forever: the last three
            // instructions are `cli; hlt; jmp` back to the `cli`.
            let n = ins.len();
            assert_eq!(
                m[n - 3..],
                [Mnemonic::Cli, Mnemonic::Hlt, Mnemonic::Jmp],
                "{w}"
            );
            assert_eq!(ins[n - 1].near_branch_target(), ins[n - 3].ip(), "{w}");
        }
    }

    #[test]
    fn ab_increments_one_byte_and_writes_b_to_com1() {
        let ins = decode(&program(Workload::Ab));
        let writes = memory_writes(&ins);
        assert_eq!(writes.len(), 1, "one memory write");
        let w = writes[0];
        assert_eq!(w.mnemonic(), Mnemonic::Inc);
        assert_eq!(w.memory_base(), Register::RCX);
        assert_eq!(w.memory_index(), Register::None);
        assert_eq!(w.memory_displacement64(), 0);
        assert_eq!(
            w.memory_size(),
            iced_x86::MemorySize::UInt8,
            "a single byte"
        );
        // The cursor starts at RDI, steps a page, wraps at RSI.
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Add
            && i.op0_register() == Register::RCX
            && i.immediate(1) == PAGE_SIZE));
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Cmp
            && i.op0_register() == Register::RCX
            && i.op1_register() == Register::RSI));
        let outs: Vec<_> = ins
            .iter()
            .filter(|i| i.mnemonic() == Mnemonic::Out)
            .collect();
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].op0_register(), Register::DX);
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == Register::AL
            && i.immediate(1) == u64::from(b'B')));
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == Register::DX
            && i.immediate(1) == 0x3f8));
    }

    #[test]
    fn random_writes_quadwords_relative_to_rdi_only() {
        let ins = decode(&program(Workload::Random));
        let writes = memory_writes(&ins);
        assert_eq!(writes.len(), 1, "one memory write");
        let w = writes[0];
        assert_eq!(w.mnemonic(), Mnemonic::Mov);
        assert_eq!(w.memory_base(), Register::RDI);
        assert_eq!(w.memory_index(), Register::RDX);
        assert_eq!(w.memory_size(), iced_x86::MemorySize::UInt64);
        assert_eq!(w.op1_register(), Register::RBX, "the generator value");
        let m = mnemonics(&ins);
        assert!(
            !m.contains(&Mnemonic::Out) && !m.contains(&Mnemonic::In),
            "no I/O"
        );
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == Register::RAX
            && i.immediate(1) == RANDOM_SEED));
    }

    #[test]
    fn balloon_marks_pages_and_writes_both_ports_with_eax() {
        let ins = decode(&program(Workload::Balloon));
        let writes = memory_writes(&ins);
        assert_eq!(writes.len(), 2, "the ab increment and the marker");
        assert_eq!(writes[0].mnemonic(), Mnemonic::Inc);
        assert_eq!(writes[0].memory_size(), iced_x86::MemorySize::UInt8);
        assert_eq!(writes[0].memory_base(), Register::RCX);
        let mark = writes[1];
        assert_eq!(mark.mnemonic(), Mnemonic::Mov);
        assert_eq!(mark.memory_base(), Register::RCX);
        assert_eq!(mark.memory_index(), Register::None);
        assert_eq!(mark.memory_displacement64(), 0, "at the start of the page");
        assert_eq!(mark.memory_size(), iced_x86::MemorySize::UInt64);
        assert_eq!(mark.op1_register(), Register::RBX, "the marker");
        // Two 32-bit writes (PFN, then count) and the byte to COM1, in that order.
        let outs: Vec<Register> = ins
            .iter()
            .filter(|i| i.mnemonic() == Mnemonic::Out)
            .map(|i| i.op1_register())
            .collect();
        assert_eq!(outs, [Register::EAX, Register::EAX, Register::AL]);
        let ports: Vec<u64> = ins
            .iter()
            .filter(|i| {
                i.mnemonic() == Mnemonic::Mov
                    && i.op0_register() == Register::DX
                    && i.op1_kind() != OpKind::Register
            })
            .map(|i| i.immediate(1))
            .collect();
        assert_eq!(
            ports,
            [u64::from(PFN_PORT), u64::from(COUNT_PORT), 0x3fd, 0x3f8]
        );
        // The marker starts at 1 and grows by one per pass.
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == Register::EBX
            && i.immediate(1) == 1));
        assert!(ins
            .iter()
            .any(|i| i.mnemonic() == Mnemonic::Inc && i.op0_register() == Register::RBX));
    }

    #[test]
    fn idle_only_halts() {
        let ins = decode(&program(Workload::Idle));
        assert_eq!(
            mnemonics(&ins),
            [Mnemonic::Cli, Mnemonic::Hlt, Mnemonic::Jmp]
        );
        assert!(memory_writes(&ins).is_empty());
    }
}
