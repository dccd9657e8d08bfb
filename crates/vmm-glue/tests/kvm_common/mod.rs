//! Helpers of the KVM tests: the skip rule, VMs over small RAM, and tiny
//! guests written as bytes with their assembly beside them.
//!
//! Every guest is 64-bit code run by `KvmVcpus::boot_long_mode` (identity
//! map, tables at 0x500..0x7000) from [`CODE`], except [`REAL_MODE`].

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_glue::kvm::{IoHandler, KvmVm, KvmVmConfig, LongModeEntry};
use vmm_glue::session::{GuestRam, RamRegion, Vcpus};
use vmm_glue::GuestMemoryMmap;

/// Where the guests' code goes.
pub const CODE: u64 = 0x8000;
/// Stacks: vCPU `i` gets `STACKS + (i + 1) * 0x1000`.
pub const STACKS: u64 = 0x1_0000;
/// Data the guests write: vCPU `i` gets `DATA + i * 0x1000`.
pub const DATA: u64 = 0x2_0000;

/// `counter:` loop incrementing the u64 at RDI.
/// ```text
/// 0: 48 ff 07    inc qword ptr [rdi]
/// 3: eb fb       jmp 0
/// ```
pub const COUNTER: &[u8] = &[0x48, 0xff, 0x07, 0xeb, 0xfb];

/// Halts with interrupts off, forever.
/// ```text
/// 0: fa          cli
/// 1: f4          hlt
/// 2: eb fc       jmp 0
/// ```
pub const HALT: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfc];

/// Reads port 0x1234 (no device there), stores the value at RDI, writes it
/// to port 0x10, then halts.
/// ```text
///  0: 66 ba 34 12    mov dx, 0x1234
///  4: ed             in eax, dx
///  5: 89 07          mov [rdi], eax
///  7: 66 ba 10 00    mov dx, 0x10
///  b: ee             out dx, al
///  c: fa             cli
///  d: f4             hlt
///  e: eb fc          jmp c
/// ```
pub const PIO_READ: &[u8] = &[
    0x66, 0xba, 0x34, 0x12, 0xed, 0x89, 0x07, 0x66, 0xba, 0x10, 0x00, 0xee, 0xfa, 0xf4, 0xeb, 0xfc,
];

/// An invalid opcode with no IDT (limit 0): #UD cannot be delivered, nor the
/// #GP/#DF that follow: a triple fault.
/// ```text
/// 0: 0f 0b       ud2
/// ```
pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

/// Jumps into the MMIO hole at 0xd000_0000: KVM cannot fetch an
/// instruction there (an emulation failure).
/// ```text
/// 0: b8 00 00 00 d0    mov eax, 0xd0000000
/// 5: ff e0             jmp rax
/// ```
pub const JUMP_TO_MMIO: &[u8] = &[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0];

/// A write server: asks port 0x500 for an address (low, high dword) and a
/// length, reads that many bytes from port 0x501 and stores them there,
/// acknowledges on port 0x502; a length of 0 asks again.
/// ```text
///  0: 66 ba 00 05    mov dx, 0x500
///  4: ed             in eax, dx
///  5: 89 c3          mov ebx, eax
///  7: ed             in eax, dx
///  8: 48 c1 e0 20    shl rax, 32
///  c: 48 09 d8       or rax, rbx
///  f: 48 89 c7       mov rdi, rax
/// 12: ed             in eax, dx
/// 13: 89 c1          mov ecx, eax
/// 15: 85 c9          test ecx, ecx
/// 17: 74 e7          jz 0
/// 19: 66 ba 01 05    mov dx, 0x501
/// 1d: ec             in al, dx
/// 1e: 88 07          mov [rdi], al
/// 20: 48 ff c7       inc rdi
/// 23: ff c9          dec ecx
/// 25: 75 f6          jnz 1d
/// 27: 66 ba 02 05    mov dx, 0x502
/// 2b: ee             out dx, al
/// 2c: eb d2          jmp 0
/// ```
pub const WRITE_SERVER: &[u8] = &[
    0x66, 0xba, 0x00, 0x05, 0xed, 0x89, 0xc3, 0xed, 0x48, 0xc1, 0xe0, 0x20, 0x48, 0x09, 0xd8, 0x48,
    0x89, 0xc7, 0xed, 0x89, 0xc1, 0x85, 0xc9, 0x74, 0xe7, 0x66, 0xba, 0x01, 0x05, 0xec, 0x88, 0x07,
    0x48, 0xff, 0xc7, 0xff, 0xc9, 0x75, 0xf6, 0x66, 0xba, 0x02, 0x05, 0xee, 0xeb, 0xd2,
];

/// Writes one byte into each of RSI pages from RDI on, then writes to port
/// 0x10 and halts.
/// ```text
///  0: c6 07 01                mov byte ptr [rdi], 1
///  3: 48 81 c7 00 10 00 00    add rdi, 0x1000
///  a: 48 ff ce                dec rsi
///  d: 75 f1                   jnz 0
///  f: 66 ba 10 00             mov dx, 0x10
/// 13: ee                      out dx, al
/// 14: fa                      cli
/// 15: f4                      hlt
/// 16: eb fc                   jmp 14
/// ```
pub const FILL_PAGES: &[u8] = &[
    0xc6, 0x07, 0x01, 0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x48, 0xff, 0xce, 0x75, 0xf1, 0x66,
    0xba, 0x10, 0x00, 0xee, 0xfa, 0xf4, 0xeb, 0xfc,
];

/// Reads port 0x600 forever, checking that each value is one more than
/// the last (from 1), storing the count at RDI; on a gap or repeat it
/// writes port 0x601 and halts.
/// ```text
///  0: 66 ba 00 06    mov dx, 0x600
///  4: ed             in eax, dx
///  5: ff c3          inc ebx
///  7: 39 d8          cmp eax, ebx
///  9: 75 05          jne 10
///  b: 48 89 1f       mov [rdi], rbx
///  e: eb f4          jmp 4
/// 10: 66 ba 01 06    mov dx, 0x601
/// 14: ee             out dx, al
/// 15: fa             cli
/// 16: f4             hlt
/// 17: eb fc          jmp 15
/// ```
pub const PIO_SEQUENCE: &[u8] = &[
    0x66, 0xba, 0x00, 0x06, 0xed, 0xff, 0xc3, 0x39, 0xd8, 0x75, 0x05, 0x48, 0x89, 0x1f, 0xeb, 0xf4,
    0x66, 0xba, 0x01, 0x06, 0xee, 0xfa, 0xf4, 0xeb, 0xfc,
];

/// MMIO at 0xd000_0000: reads +0 (a device register) and +8 (nothing
/// there) into RDI and RDI + 4, writes 0x12345678 at +16, then writes port
/// 0x10 and halts.
/// ```text
///  0: b8 00 00 00 d0          mov eax, 0xd0000000
///  5: 8b 08                   mov ecx, [rax]
///  7: 89 0f                   mov [rdi], ecx
///  9: 8b 48 08                mov ecx, [rax + 8]
///  c: 89 4f 04                mov [rdi + 4], ecx
///  f: c7 40 10 78 56 34 12    mov dword ptr [rax + 16], 0x12345678
/// 16: 66 ba 10 00             mov dx, 0x10
/// 1a: ee                      out dx, al
/// 1b: fa                      cli
/// 1c: f4                      hlt
/// 1d: eb fc                   jmp 1b
/// ```
pub const MMIO: &[u8] = &[
    0xb8, 0x00, 0x00, 0x00, 0xd0, 0x8b, 0x08, 0x89, 0x0f, 0x8b, 0x48, 0x08, 0x89, 0x4f, 0x04, 0xc7,
    0x40, 0x10, 0x78, 0x56, 0x34, 0x12, 0x66, 0xba, 0x10, 0x00, 0xee, 0xfa, 0xf4, 0xeb, 0xfc,
];

/// The MMIO register [`MMIO`] reads, and its value.
pub const MMIO_REG: u64 = 0xd000_0000;
/// What [`TestIo`] answers at [`MMIO_REG`].
pub const MMIO_VALUE: u32 = 0xcafe_f00d;

/// Real mode at 0000:7c00: writes DL (the boot drive) to port 0x10, halts.
/// ```text
/// 0: 88 d0       mov al, dl
/// 2: e6 10       out 0x10, al
/// 4: fa          cli
/// 5: f4          hlt
/// 6: eb f8       jmp 0
/// ```
pub const REAL_MODE: &[u8] = &[0x88, 0xd0, 0xe6, 0x10, 0xfa, 0xf4, 0xeb, 0xf8];

/// Whether KVM is usable; prints the loud skip line when not, and panics
/// instead when `REQUIRE_KVM=1`.
pub fn kvm_or_skip(name: &str) -> bool {
    match vmm_glue::kvm::host_facts() {
        Ok(_) => true,
        Err(e) => {
            let why = vmm_glue::error_chain(&e);
            if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{name}: REQUIRE_KVM=1 but no usable /dev/kvm: {why}");
            }
            eprintln!("*** SKIPPED {name}: no usable /dev/kvm: {why} ***");
            false
        }
    }
}

/// Guest memory of the given (address, size) ranges, named `r0`, `r1`, ...
pub fn ram(ranges: &[(u64, usize)]) -> GuestRam {
    let ranges: Vec<(GuestAddress, usize)> =
        ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&ranges).unwrap());
    let names = (0..ranges.len())
        .map(|i| RamRegion::new(format!("r{i}")))
        .collect();
    GuestRam::new(mem, names).unwrap()
}

/// A VM with `vcpus` vCPUs over 32 MiB at 0.
pub fn small_vm(vcpus: usize) -> (KvmVm, GuestRam) {
    let ram = ram(&[(0, 32 << 20)]);
    let vm = KvmVm::new(&ram, KvmVmConfig::new(vcpus)).unwrap();
    (vm, ram)
}

/// Writes `code` at [`CODE`] and starts every vCPU `i` there in long mode
/// with RDI = `DATA + i * 0x1000` and its own stack.
pub fn boot(vm: &KvmVm, code: &[u8]) {
    let n = vm.vcpus().count() as u64;
    let args: Vec<[u64; 4]> = (0..n).map(|i| [DATA + i * 0x1000, 0, 0, 0]).collect();
    boot_args(vm, code, &args);
}

/// Writes `code` at [`CODE`] and starts vCPU `i` there in long mode with
/// RDI, RSI, RDX, RCX = `args[i]` and its own stack.
pub fn boot_args(vm: &KvmVm, code: &[u8], args: &[[u64; 4]]) {
    vm.memory().write_slice(code, GuestAddress(CODE)).unwrap();
    let entries: Vec<LongModeEntry> = args
        .iter()
        .zip(0u64..)
        .map(|(&a, i)| LongModeEntry::new(CODE, STACKS + (i + 1) * 0x1000).with_args(a))
        .collect();
    vm.vcpus().boot_long_mode(&entries).unwrap();
}

/// Polls `f` until it holds (no time limit: a broken test hangs rather than
/// fail on a slow machine).
pub fn wait_until(mut f: impl FnMut() -> bool) {
    while !f() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The u64 at `addr`.
pub fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Threads of this process.
pub fn task_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A copy of `mem`'s contents into fresh memory of the same layout.
pub fn copy_ram(ram: &GuestRam) -> GuestRam {
    let mem = ram.memory();
    let ranges: Vec<(u64, usize)> = mem
        .iter()
        .map(|r| (r.start_addr().0, r.len() as usize))
        .collect();
    let copy = self::ram(&ranges);
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        mem.read_slice(&mut buf, r.start_addr()).unwrap();
        copy.memory().write_slice(&buf, r.start_addr()).unwrap();
    }
    copy
}

/// Records port writes (0x10, 0x601) and MMIO writes; counts up on port
/// 0x600; answers [`MMIO_REG`]; serves [`WRITE_SERVER`].
#[derive(Default)]
pub struct TestIo {
    /// (port, byte) of every write.
    pub writes: Mutex<Vec<(u16, u8)>>,
    /// The last value port 0x600 gave.
    pub seq: std::sync::atomic::AtomicU32,
    /// (address, bytes) of every handled MMIO write.
    pub mmio_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    server: Mutex<Server>,
    cv: Condvar,
}

#[derive(Default)]
struct Server {
    queue: VecDeque<(u64, Vec<u8>)>,
    cur: Option<(u64, Vec<u8>)>,
    phase: u8,
    pos: usize,
    submitted: u64,
    done: u64,
}

impl TestIo {
    /// Has the guest write `data` at `addr`, and waits until it did.
    pub fn guest_write(&self, addr: u64, data: &[u8]) {
        let mut s = self.server.lock();
        s.queue.push_back((addr, data.to_vec()));
        s.submitted += 1;
        let want = s.submitted;
        self.cv.notify_all();
        while s.done < want {
            self.cv.wait(&mut s);
        }
    }
}

impl IoHandler for TestIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let mut s = self.server.lock();
        let v: u32 = match port {
            0x500 => match s.phase {
                0 => {
                    if s.queue.is_empty() {
                        self.cv.wait_for(&mut s, Duration::from_millis(5));
                    }
                    s.cur = s.queue.pop_front();
                    s.pos = 0;
                    s.phase = 1;
                    s.cur.as_ref().map_or(0, |c| c.0 as u32)
                }
                1 => {
                    s.phase = 2;
                    s.cur.as_ref().map_or(0, |c| (c.0 >> 32) as u32)
                }
                _ => {
                    s.phase = 0;
                    s.cur.as_ref().map_or(0, |c| c.1.len() as u32)
                }
            },
            0x600 => {
                drop(s);
                self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
            }
            0x501 => {
                let pos = s.pos;
                s.pos += 1;
                s.cur.as_ref().map_or(0, |c| u32::from(c.1[pos]))
            }
            _ => return false,
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        true
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            0x10 | 0x601 => {
                self.writes.lock().push((port, data[0]));
                true
            }
            0x502 => {
                let mut s = self.server.lock();
                s.done += 1;
                s.cur = None;
                self.cv.notify_all();
                true
            }
            _ => false,
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if addr != MMIO_REG {
            return false;
        }
        data.copy_from_slice(&MMIO_VALUE.to_le_bytes()[..data.len()]);
        true
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if addr != MMIO_REG + 16 {
            return false;
        }
        self.mmio_writes.lock().push((addr, data.to_vec()));
        true
    }
}
