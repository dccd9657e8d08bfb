//! The generated guests, run for real in QEMU under TCG (no KVM needed).
//!
//! - The boot sectors boot as a PC BIOS starts them: `-drive file=IMG,format=raw`.
//! - The 64-bit built-ins run behind a test-only boot sector that does what the KVM
//!   backend will do before their entry (identity page tables, long mode, the register
//!   contract, the code copied to 0x8000), with every other register and RSP filled
//!   with junk, so a guest that relied on anything else, or used a stack, would fault
//!   and QEMU (`-no-reboot`) would exit.
//!
//! Each test reads COM1 from a file, then stops the guest through QEMU's monitor, saves
//! its RAM (`pmemsave`) and registers (`info registers`), and checks what a user
//! would: the banner, one `B` per pass, the a-b pattern, where the writes landed.
//!
//! Without `qemu-system-x86_64` the tests print `*** SKIPPED ... ***` and pass, unless
//! `REQUIRE_QEMU=1` says QEMU must be there.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::{
    al, ax, cr0, cr3, cr4, ds, dword_ptr, dx, eax, ecx, edi, edx, es, esi, ptr, r10, r11, r12, r13,
    r14, r15, r8, r9, rax, rbp, rbx, rcx, rsp, ss, CodeAssembler,
};
use iced_x86::{Code, Instruction};
use vmm_glue::guest::boot_sector::{self, SECTOR_SIZE, TOUCH_START};
use vmm_glue::guest::builtin::{self, Program};
use vmm_glue::guest::{ab_check, slices, Workload, PAGE_SIZE};

const QEMU: &str = "qemu-system-x86_64";
/// Guest RAM of every QEMU run, in MiB.
const RAM_MIB: u64 = 128;
/// Touch size of the boot sectors under test: small, so a pass is quick under TCG.
const TOUCH: u64 = 8 << 20;
/// Checked beyond the workload memory: must stay zero.
const MARGIN: u64 = 64 << 10;
/// Only a guard against a hung test, never a performance limit.
const HANG_GUARD: Duration = Duration::from_secs(600);
/// How long a guest with no progress output runs before it is inspected.
const RUN: Duration = Duration::from_secs(2);

/// Whether QEMU is installed; if not, says loudly that `name` is skipped (straight to
/// stderr, which the test harness does not capture), or fails under `REQUIRE_QEMU=1`.
fn have_qemu(name: &str) -> bool {
    let ok = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = format!("{QEMU} is not installed or does not run");
        if std::env::var("REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{name}: QEMU required (REQUIRE_QEMU=1) but {why}");
        }
        // One write, so parallel tests do not interleave their lines.
        let line = format!("\n*** SKIPPED {name}: {why} ***\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    ok
}

/// A QEMU process booting one sector, with COM1 in a file and the monitor on stdio.
struct Qemu {
    child: Option<Child>,
    dir: PathBuf,
}

/// What a stopped guest left: COM1's output, RAM ranges, `info registers`.
struct Stopped {
    serial: Vec<u8>,
    ram: Vec<Vec<u8>>,
    registers: String,
}

impl Qemu {
    fn boot(name: &str, sector: &[u8; SECTOR_SIZE]) -> Qemu {
        let dir = std::env::temp_dir().join(format!("vmm-glue-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, sector).unwrap();
        let child = Command::new(QEMU)
            .args(["-nodefaults", "-display", "none", "-machine", "pc"])
            .args(["-accel", "tcg", "-m", &RAM_MIB.to_string(), "-no-reboot"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", disk.display()))
            .arg("-serial")
            .arg(format!("file:{}", dir.join("com1").display()))
            .args(["-monitor", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Qemu {
            child: Some(child),
            dir,
        }
    }

    fn serial(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("com1")).unwrap_or_default()
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }

    /// Fails the test with QEMU's own words if it is no longer running.
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child().try_wait().unwrap() {
            let out = self.child.take().unwrap().wait_with_output().unwrap();
            panic!(
                "QEMU exited ({status}) {what}; COM1: {:?}; stderr: {}",
                String::from_utf8_lossy(&self.serial()),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Waits until COM1's output satisfies `done`.
    fn wait_serial(&mut self, what: &str, done: impl Fn(&[u8]) -> bool) {
        let t = Instant::now();
        while !done(&self.serial()) {
            self.assert_running(&format!("while waiting for {what}"));
            assert!(
                t.elapsed() < HANG_GUARD,
                "hang guard: no {what} on COM1 after {HANG_GUARD:?}: {:?}",
                String::from_utf8_lossy(&self.serial())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the guest, saves `ranges` of its RAM and its registers, and quits.
    fn stop(mut self, ranges: &[(u64, u64)]) -> Stopped {
        self.assert_running("before it was stopped");
        let mut cmds = String::from("stop\ninfo registers\n");
        let files: Vec<PathBuf> = (0..ranges.len())
            .map(|i| self.dir.join(format!("ram{i}")))
            .collect();
        for ((start, end), f) in ranges.iter().zip(&files) {
            cmds.push_str(&format!(
                "pmemsave {start:#x} {:#x} \"{}\"\n",
                end - start,
                f.display()
            ));
        }
        cmds.push_str("quit\n");
        let mut child = self.child.take().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(cmds.as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let monitor = String::from_utf8_lossy(&out.stdout).into_owned();
        let ram = files
            .iter()
            .map(|f| {
                std::fs::read(f)
                    .unwrap_or_else(|e| panic!("{}: {e}; monitor: {monitor}", f.display()))
            })
            .collect();
        Stopped {
            serial: self.serial(),
            ram,
            registers: monitor,
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Stopped {
    /// A register from `info registers`, e.g. `RIP`, `EIP`, `HLT`, `A20`.
    fn register(&self, name: &str) -> u64 {
        let key = format!("{name}=");
        let at = self
            .registers
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} in: {}", self.registers));
        let hex: String = self.registers[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        u64::from_str_radix(&hex, 16).unwrap()
    }

    /// RIP in long mode, EIP otherwise.
    fn ip(&self) -> u64 {
        if self.registers.contains("RIP=") {
            self.register("RIP")
        } else {
            self.register("EIP")
        }
    }
}

/// The first byte of each page.
fn first_bytes(ram: &[u8]) -> Vec<u8> {
    ram.iter().step_by(PAGE_SIZE as usize).copied().collect()
}

/// Whether `serial` is `banner` then only `B`s, at least `passes` of them.
fn banner_then_bs(serial: &[u8], banner: &[u8], passes: usize) -> bool {
    serial.starts_with(banner)
        && serial.len() >= banner.len() + passes
        && serial[banner.len()..].iter().all(|&b| b == b'B')
}

/// The checks of an `ab` guest run over `ram` (its slice) with `passes` `B`s printed.
fn assert_ab_ram(ram: &[u8], passes: usize) {
    let firsts = first_bytes(ram);
    ab_check(&firsts, 1).unwrap();
    let (n, n1) = (passes as u8, passes.wrapping_add(1) as u8);
    assert!(
        firsts.iter().all(|&b| b == n || b == n1),
        "after {passes} passes every page holds {n} or {n1}: {:?}",
        &firsts[..16.min(firsts.len())]
    );
    for (i, page) in ram.chunks(PAGE_SIZE as usize).enumerate() {
        assert!(
            page[1..].iter().all(|&b| b == 0),
            "page {i}: bytes other than the first were written"
        );
    }
}

#[test]
fn ab_boot_sector_prints_its_banner_then_one_b_per_pass() {
    let name = "ab_boot_sector_prints_its_banner_then_one_b_per_pass";
    if !have_qemu(name) {
        return;
    }
    let banner = boot_sector::AB_BANNER.as_bytes();
    let mut q = Qemu::boot("ab-sector", &boot_sector::ab(TOUCH).unwrap());
    q.wait_serial("the banner and 3 B", |s| banner_then_bs(s, banner, 3));
    let end = TOUCH_START + TOUCH;
    let st = q.stop(&[(TOUCH_START, end), (end, end + MARGIN)]);

    assert!(
        banner_then_bs(&st.serial, banner, 3),
        "{:?}",
        String::from_utf8_lossy(&st.serial)
    );
    let passes = st.serial.len() - banner.len();
    assert_ab_ram(&st.ram[0], passes);
    assert!(
        st.ram[1].iter().all(|&b| b == 0),
        "written beyond the touch size"
    );
    assert!(
        (0x7c00..0x7e00).contains(&st.ip()),
        "EIP {:#x} outside the sector",
        st.ip()
    );
    assert_eq!(st.register("A20"), 1);
    assert!(
        st.registers.contains("CS =0008 00000000 ffffffff"),
        "flat 32-bit code segment: {}",
        st.registers
    );
}

#[test]
fn random_boot_sector_prints_its_banner_and_keeps_writing() {
    let name = "random_boot_sector_prints_its_banner_and_keeps_writing";
    if !have_qemu(name) {
        return;
    }
    let banner = boot_sector::RANDOM_BANNER.as_bytes();
    let mut q = Qemu::boot("random-sector", &boot_sector::random(TOUCH).unwrap());
    q.wait_serial("the banner", |s| s.starts_with(banner));
    std::thread::sleep(RUN);
    q.assert_running("after printing its banner");
    let end = TOUCH_START + TOUCH;
    let st = q.stop(&[(TOUCH_START, end), (end, end + MARGIN)]);

    assert_eq!(st.serial, banner, "nothing after the banner");
    assert!((0x7c00..0x7e00).contains(&st.ip()));
    assert_eq!(st.register("HLT"), 0, "still running");
    assert!(
        st.ram[1].iter().all(|&b| b == 0),
        "written beyond the touch size"
    );
    // Every value sits where the documented formula puts it.
    let pages = TOUCH / PAGE_SIZE;
    let mut written = 0;
    for (i, w) in st.ram[0].chunks_exact(4).enumerate() {
        let r = u32::from_le_bytes(w.try_into().unwrap());
        if r == 0 {
            continue;
        }
        written += 1;
        let at = (i * 4) as u64;
        let want = (u64::from(r) % pages) * PAGE_SIZE + (u64::from(r >> 20) % 1024) * 4;
        assert_eq!(at, want, "value {r:#x} at offset {at:#x}");
    }
    assert!(written >= 1000, "only {written} values written");
}

// ---------------------------------------------------------------------------------
// The 64-bit built-ins behind a long-mode harness.

/// The harness's own layout: code, then the built-in program, then the GDT.
const PROGRAM_OFFSET: usize = 0x120;
const GDTR_OFFSET: usize = 0x1b0;
const GDT_OFFSET: usize = 0x1b8;
/// Identity map of the first 1 GiB with 2 MiB pages: PML4, PDPT, PD.
const PML4: u32 = 0x1000;
/// What the harness prints once in long mode, before it enters the program.
const LONG_MODE: &[u8] = b"64\r\n";
/// Workload memory of the built-in tests (two slices; the program runs the second).
const WORK: (u64, u64) = (16 << 20, 24 << 20);
const JUNK: u64 = 0xdead_beef_0bad_f00d;

/// A boot sector that enters long mode as the KVM backend will and starts `program`
/// with RDI, RSI, RDX = `slice` and `index`, every other register (RSP too) junk.
fn long_mode_harness(program: &Program, slice: (u64, u64), index: u64) -> [u8; SECTOR_SIZE] {
    let org = 0x7c00u32;
    let real = |pm: u32| -> Vec<u8> {
        let mut a = CodeAssembler::new(16).unwrap();
        a.add_instruction(Instruction::with_far_branch(Code::Jmp_ptr1616, 0, org + 5).unwrap())
            .unwrap();
        a.cli().unwrap();
        a.xor(ax, ax).unwrap();
        a.mov(ds, ax).unwrap();
        a.in_(al, 0x92u32).unwrap();
        a.or(al, 2u32).unwrap();
        a.and(al, 0xfeu32).unwrap();
        a.out(0x92u32, al).unwrap();
        a.lgdt(ptr(org + GDTR_OFFSET as u32)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(al, 1u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.add_instruction(Instruction::with_far_branch(Code::Jmp_ptr1616, 0x08, pm).unwrap())
            .unwrap();
        a.assemble(u64::from(org)).unwrap()
    };
    let protected = |at: u32, lm: u32| -> Vec<u8> {
        let mut a = CodeAssembler::new(32).unwrap();
        let mut fill = a.create_label();
        a.mov(ax, 0x10u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(es, ax).unwrap();
        a.mov(ss, ax).unwrap();
        // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = i * 2 MiB, present, writable, large.
        a.mov(edi, PML4).unwrap();
        a.xor(eax, eax).unwrap();
        a.mov(ecx, 3 * 1024u32).unwrap();
        a.rep().stosd().unwrap();
        a.mov(dword_ptr(PML4), PML4 + 0x1003).unwrap();
        a.mov(dword_ptr(PML4 + 0x1000), PML4 + 0x2003).unwrap();
        a.mov(edi, PML4 + 0x2000).unwrap();
        a.mov(eax, 0x83u32).unwrap();
        a.mov(ecx, 512u32).unwrap();
        a.set_label(&mut fill).unwrap();
        a.mov(dword_ptr(edi), eax).unwrap();
        a.add(eax, 0x20_0000u32).unwrap();
        a.add(edi, 8u32).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(fill).unwrap();
        // PAE, CR3, EFER.LME, paging.
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20u32).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PML4).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.add_instruction(Instruction::with_far_branch(Code::Jmp_ptr1632, 0x18, lm).unwrap())
            .unwrap();
        a.assemble(u64::from(at)).unwrap()
    };
    // Values below 4 GiB go through 32-bit moves, which zero the upper halves.
    let low = |v: u64| u32::try_from(v).unwrap();
    let long = |at: u32| -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        for &c in LONG_MODE {
            a.mov(al, u32::from(c)).unwrap();
            a.out(dx, al).unwrap();
        }
        a.mov(esi, org + PROGRAM_OFFSET as u32).unwrap();
        a.mov(edi, low(program.load_addr)).unwrap();
        a.mov(ecx, low(program.code.len() as u64)).unwrap();
        a.rep().movsb().unwrap();
        a.mov(rbx, JUNK).unwrap();
        for r in [rcx, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15] {
            a.mov(r, rbx).unwrap();
        }
        a.mov(edi, low(slice.0)).unwrap();
        a.mov(esi, low(slice.1)).unwrap();
        a.mov(edx, low(index)).unwrap();
        a.mov(eax, low(program.entry)).unwrap();
        a.jmp(rax).unwrap();
        a.assemble(u64::from(at)).unwrap()
    };
    // Stage sizes do not depend on the far jumps' targets: measure, then place.
    let pm = org + real(0).len() as u32;
    let lm = pm + protected(pm, 0).len() as u32;
    let code = [real(pm), protected(pm, lm), long(lm)].concat();
    assert!(
        code.len() <= PROGRAM_OFFSET,
        "harness code: {} bytes",
        code.len()
    );
    assert!(
        PROGRAM_OFFSET + program.code.len() <= GDTR_OFFSET,
        "program too long"
    );

    let mut s = [0u8; SECTOR_SIZE];
    s[..code.len()].copy_from_slice(&code);
    s[PROGRAM_OFFSET..PROGRAM_OFFSET + program.code.len()].copy_from_slice(&program.code);
    s[GDTR_OFFSET..GDTR_OFFSET + 2].copy_from_slice(&31u16.to_le_bytes());
    s[GDTR_OFFSET + 2..GDTR_OFFSET + 6].copy_from_slice(&(org + GDT_OFFSET as u32).to_le_bytes());
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff, // 32-bit code
        0x00cf_9300_0000_ffff, // data
        0x00af_9b00_0000_ffff, // 64-bit code
    ];
    for (i, d) in gdt.iter().enumerate() {
        s[GDT_OFFSET + 8 * i..][..8].copy_from_slice(&d.to_le_bytes());
    }
    s[510..].copy_from_slice(&[0x55, 0xaa]);
    s
}

/// Boots `workload` on the second of two slices of [`WORK`], as vCPU 1.
fn boot_builtin(name: &str, workload: Workload) -> (Qemu, Program, (u64, u64)) {
    let program = builtin::program(workload);
    let slice = slices(WORK.0, WORK.1, 2).unwrap()[1];
    let q = Qemu::boot(name, &long_mode_harness(&program, slice, 1));
    (q, program, slice)
}

fn in_program(p: &Program, ip: u64) -> bool {
    (p.load_addr..p.load_addr + p.code.len() as u64).contains(&ip)
}

/// RAM ranges saved by the built-in tests: the other vCPU's slice, this one's, and
/// the margin after the workload memory.
fn builtin_ranges(slice: (u64, u64)) -> [(u64, u64); 3] {
    [(WORK.0, slice.0), slice, (WORK.1, WORK.1 + MARGIN)]
}

#[test]
fn builtin_ab_runs_its_slice_in_long_mode() {
    let name = "builtin_ab_runs_its_slice_in_long_mode";
    if !have_qemu(name) {
        return;
    }
    let (mut q, program, slice) = boot_builtin("builtin-ab", Workload::Ab);
    q.wait_serial("long mode and 3 B", |s| banner_then_bs(s, LONG_MODE, 3));
    let st = q.stop(&builtin_ranges(slice));

    assert!(banner_then_bs(&st.serial, LONG_MODE, 3));
    let passes = st.serial.len() - LONG_MODE.len();
    assert_ab_ram(&st.ram[1], passes);
    // The a-b check of the whole workload memory, split as the VMM splits it.
    let all = [st.ram[0].as_slice(), st.ram[1].as_slice()].concat();
    ab_check(&first_bytes(&all), 2).unwrap();
    assert!(
        st.ram[0].iter().all(|&b| b == 0),
        "the other slice was written"
    );
    assert!(
        st.ram[2].iter().all(|&b| b == 0),
        "written beyond the slices"
    );
    assert!(in_program(&program, st.ip()), "RIP {:#x}", st.ip());
}

#[test]
fn builtin_random_writes_its_slice_only() {
    let name = "builtin_random_writes_its_slice_only";
    if !have_qemu(name) {
        return;
    }
    let (mut q, program, slice) = boot_builtin("builtin-random", Workload::Random);
    q.wait_serial("long mode", |s| s.starts_with(LONG_MODE));
    std::thread::sleep(RUN);
    q.assert_running("after entering the program");
    let st = q.stop(&builtin_ranges(slice));

    assert_eq!(st.serial, LONG_MODE, "random prints nothing");
    assert!(in_program(&program, st.ip()), "RIP {:#x}", st.ip());
    assert_eq!(st.register("HLT"), 0);
    assert!(
        st.ram[0].iter().all(|&b| b == 0),
        "the other slice was written"
    );
    assert!(
        st.ram[2].iter().all(|&b| b == 0),
        "written beyond the slices"
    );
    let pages = (slice.1 - slice.0) / PAGE_SIZE;
    let mut written = 0;
    for (i, w) in st.ram[1].chunks_exact(8).enumerate() {
        let r = u64::from_le_bytes(w.try_into().unwrap());
        if r == 0 {
            continue;
        }
        written += 1;
        let at = (i * 8) as u64;
        let want = (r % pages) * PAGE_SIZE + ((r >> 40) % 512) * 8;
        assert_eq!(at, want, "value {r:#x} at offset {at:#x}");
    }
    assert!(written >= 1000, "only {written} values written");
}

#[test]
fn builtin_idle_halts_and_an_empty_slice_halts_ab() {
    let name = "builtin_idle_halts_and_an_empty_slice_halts_ab";
    if !have_qemu(name) {
        return;
    }
    let program = builtin::program(Workload::Idle);
    let (mut idle, _, _) = boot_builtin("builtin-idle", Workload::Idle);
    // ab handed an empty slice (RSI = RDI) must halt and write nothing.
    let ab = builtin::program(Workload::Ab);
    let mut empty = Qemu::boot(
        "builtin-ab-empty",
        &long_mode_harness(&ab, (WORK.0, WORK.0), 0),
    );
    for q in [&mut idle, &mut empty] {
        q.wait_serial("long mode", |s| s.starts_with(LONG_MODE));
    }
    std::thread::sleep(RUN);
    for (q, p) in [(idle, &program), (empty, &ab)] {
        let st = q.stop(&[WORK]);
        assert_eq!(st.serial, LONG_MODE, "no output");
        assert_eq!(st.register("HLT"), 1, "halted: {}", st.registers);
        assert!(in_program(p, st.ip()), "RIP {:#x}", st.ip());
        assert!(st.ram[0].iter().all(|&b| b == 0), "memory written");
    }
}

#[test]
fn the_committed_boot_sectors_boot() {
    let name = "the_committed_boot_sectors_boot";
    if !have_qemu(name) {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
    let ab: [u8; SECTOR_SIZE] = std::fs::read(dir.join("ab.bin"))
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(boot_sector::touch(&ab), boot_sector::DEFAULT_TOUCH);
    let mut q = Qemu::boot("committed-ab", &ab);
    let banner = boot_sector::AB_BANNER.as_bytes();
    q.wait_serial("the banner and a B", |s| banner_then_bs(s, banner, 1));
}
