//! `kvm.dirty_sync_*` figures of `cargo xtask bench`: what one dirty-log sync of a KVM
//! guest costs with each of KVM's dirty logs, side by side in one run.
//!
//! Three KVM VMs of the same size (1 GiB by default) run on one vCPU each, built with
//! [`vmm_glue::kvm::KvmVm`] through the public API:
//!
//! - `bitmap`: `KVM_GET_DIRTY_LOG`, which also clears and re-protects
//!   ([`KvmVmConfig::without_manual_protect`]); the baseline of the other two;
//! - `manual_protect`: `KVM_GET_DIRTY_LOG` plus `KVM_CLEAR_DIRTY_LOG`
//!   ([`KvmVmConfig::new`] where the host offers manual protect);
//! - `ring`: the dirty ring ([`KvmVmConfig::with_dirty_ring`]), sized to hold every
//!   page dirtied between two syncs, so the sync harvests them all (a smaller ring is
//!   partly harvested by the vCPU itself when it fills, which a sync then does not pay).
//!
//! Each round, in each VM in turn, a small guest of this module's own ([`fill_code`])
//! writes one byte into every 4 KiB page of the same range (128 MiB from 1 MiB by
//! default), reports on a port and halts with its vCPU still in `KVM_RUN` (so the ring's
//! sync kicks it, as a running guest is kicked). Then one measured step does what a
//! precopy sender does for a pass: [`DirtyLog::sync`] of KVM's own log
//! ([`KvmVm::kvm_dirty_log`]) into the RAM blocks, then `take_range` of every 1 MiB chunk
//! of the dirty bitmap and [`DirtyLog::clear`] of what was taken. `clear` re-protects
//! the taken pages with manual protect and is a no-op for the two others, so every
//! log pays its whole re-arming cost. The sync must report at least every page the
//! guest wrote, or the run fails. The guest is restarted for the next round with
//! `boot_long_mode`.
//!
//! Where the ring cannot be measured it is reported as SKIPPED with the reason: a host
//! without one, and PVM (module `kvm_pvm`), which lets a dirty ring overfill; the skip
//! line says how to run the figure in the kvm-box, on real (nested) KVM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::code_asm::{al, byte_ptr, dl, rcx, rdi, rsi, CodeAssembler};
use migration_ram::vm_memory::{Bytes, GuestAddress};
use migration_ram::{DirtyLog, GuestMemoryMmap, RamBlocks};
use vmm_glue::kvm::{IoHandler, KvmError, KvmVm, KvmVmConfig, LongModeEntry};
use vmm_glue::session::{GuestRam, RamRegion, Vcpus};

use crate::bench::{median, Figure, Report};
use crate::guests::show_size;

/// Rounds per log (the median is reported).
const ROUNDS: usize = 7;
/// Where the guest's code goes: past the long-mode tables (`0x500..0x7000`).
const CODE: u64 = 0x8000;
/// Where its stack pointer points (the code uses no stack).
const STACK: u64 = 0x7ff0;
/// The port the guest writes once it has dirtied its range.
const DONE_PORT: u16 = 0x10;
/// Start of the range the guest dirties.
const DIRTY_START: u64 = 1 << 20;
/// KVM tracks 4 KiB pages.
const PAGE: u64 = 4096;
/// What a sender takes from a dirty bitmap at once: 1 MiB.
const CHUNK_BYTES: u64 = 1 << 20;
/// The largest dirty ring KVM allows, in entries.
const RING_MAX: u32 = 65536;
/// Entries KVM keeps free at the end of a ring (its soft limit is below the size).
const RING_SLACK: u64 = 1024;
/// How long a guest may take to dirty its range before the run is declared hung. A
/// hang guard, not a performance limit.
const HANG_GUARD: Duration = Duration::from_secs(600);

/// The kvm-box command line that measures these figures on real (nested) KVM.
const BOX_HINT: &str = "cargo build --release -p xtask && KVM_BOX_FORCE=1 KVM_BOX_CPUS=1 \
     /work/shared/kvm-box/run target/release/xtask bench --only dirty-sync";

/// The guest: writes DL into the first byte of every 4 KiB page of `[RDI, RSI)`, writes
/// DL to port [`DONE_PORT`], then halts with interrupts off, for good.
///
/// ```text
///         mov rcx, rdi
/// fill:   mov byte [rcx], dl
///         add rcx, 0x1000
///         cmp rcx, rsi
///         jb fill
///         mov al, dl
///         out 0x10, al
/// halt:   cli
///         hlt
///         jmp halt
/// ```
pub fn fill_code() -> Result<Vec<u8>, String> {
    let asm = |e: iced_x86::IcedError| format!("the dirty-sync guest does not assemble: {e}");
    let mut a = CodeAssembler::new(64).map_err(asm)?;
    let mut fill = a.create_label();
    let mut halt = a.create_label();
    a.mov(rcx, rdi).map_err(asm)?;
    a.set_label(&mut fill).map_err(asm)?;
    a.mov(byte_ptr(rcx), dl).map_err(asm)?;
    a.add(rcx, 0x1000).map_err(asm)?;
    a.cmp(rcx, rsi).map_err(asm)?;
    a.jb(fill).map_err(asm)?;
    a.mov(al, dl).map_err(asm)?;
    a.out(u32::from(DONE_PORT), al).map_err(asm)?;
    a.set_label(&mut halt).map_err(asm)?;
    a.cli().map_err(asm)?;
    a.hlt().map_err(asm)?;
    a.jmp(halt).map_err(asm)?;
    a.assemble(CODE).map_err(asm)
}

/// Counts the guest's writes to [`DONE_PORT`]; every other access is unhandled.
#[derive(Default)]
struct DonePort(AtomicU64);

impl IoHandler for DonePort {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> bool {
        false
    }

    fn pio_write(&self, port: u16, _: &[u8]) -> bool {
        if port != DONE_PORT {
            return false;
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
        false
    }

    fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
        false
    }
}

/// Which of KVM's dirty logs a VM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Log {
    Bitmap,
    ManualProtect,
    Ring,
}

impl Log {
    fn name(self) -> &'static str {
        match self {
            Log::Bitmap => "bitmap",
            Log::ManualProtect => "manual_protect",
            Log::Ring => "ring",
        }
    }
}

/// One VM whose guest dirties a known range on demand.
struct SyncVm {
    log_kind: Log,
    vm: KvmVm,
    log: Arc<dyn DirtyLog>,
    blocks: RamBlocks,
    done: Arc<DonePort>,
    /// `[start, end)` the guest dirties.
    range: (u64, u64),
    rounds: u64,
}

/// What one measured step saw.
struct Step {
    /// The sync, and the take and clear of every chunk.
    elapsed: Duration,
    /// The sync alone.
    sync: Duration,
    /// Pages the sync reported.
    reported: u64,
}

impl SyncVm {
    /// Builds the VM, loads the guest and starts KVM's dirty log. `Ok(Err(why))` when
    /// this host cannot give this log.
    fn new(
        log_kind: Log,
        mem: u64,
        dirty: u64,
        ring: u32,
    ) -> Result<Result<SyncVm, String>, String> {
        let size = usize::try_from(mem).map_err(|e| e.to_string())?;
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| format!("guest memory of {}: {e}", show_size(mem)))?;
        let ram = GuestRam::new(Arc::new(guest), vec![RamRegion::new("pc.ram")])
            .map_err(|e| vmm_glue::error_chain(&e))?;
        let config = match log_kind {
            Log::Bitmap => KvmVmConfig::new(1).without_manual_protect(),
            Log::ManualProtect => KvmVmConfig::new(1),
            Log::Ring => KvmVmConfig::new(1).with_dirty_ring(ring),
        };
        let vm = match KvmVm::new(&ram, config) {
            Ok(vm) => vm,
            Err(KvmError::Unsupported { what }) => {
                return Ok(Err(format!("this host's KVM lacks {what}")))
            }
            Err(e) => return Err(vmm_glue::error_chain(&e)),
        };
        if log_kind == Log::ManualProtect && !vm.manual_protect() {
            return Ok(Err(
                "this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2".into(),
            ));
        }
        let code = fill_code()?;
        vm.memory()
            .write_slice(&code, GuestAddress(CODE))
            .map_err(|e| format!("loading the guest: {e}"))?;
        let done = Arc::new(DonePort::default());
        vm.vcpus().set_io_handler(done.clone());
        let log = vm.kvm_dirty_log();
        log.start().map_err(|e| vmm_glue::error_chain(&e))?;
        let blocks = ram.blocks().map_err(|e| vmm_glue::error_chain(&e))?;
        let mut this = SyncVm {
            log_kind,
            vm,
            log,
            blocks,
            done,
            range: (DIRTY_START, DIRTY_START + dirty),
            rounds: 0,
        };
        // A first, unmeasured round: the guest's pages are populated, and what the
        // start reports (everything, with KVM_DIRTY_LOG_INITIALLY_SET) is taken.
        this.step()?;
        Ok(Ok(this))
    }

    /// Runs the guest over its range, then measures one sync and the take and clear
    /// of every chunk.
    fn step(&mut self) -> Result<Step, String> {
        let kvm = |e: &dyn std::error::Error| {
            format!(
                "dirty-sync VM ({}): {}",
                self.log_kind.name(),
                vmm_glue::error_chain(e)
            )
        };
        self.rounds += 1;
        let vcpus = self.vm.vcpus();
        // The byte written changes every round (and is never zero).
        let value = self.rounds % 255 + 1;
        let entry =
            LongModeEntry::new(CODE, STACK).with_args([self.range.0, self.range.1, value, 0]);
        vcpus.boot_long_mode(&[entry]).map_err(|e| kvm(&e))?;
        let before = self.done.0.load(Ordering::SeqCst);
        vcpus.resume().map_err(|e| kvm(&e))?;
        let started = Instant::now();
        while self.done.0.load(Ordering::SeqCst) == before {
            if let Some(exit) = vcpus.last_exit() {
                return Err(format!(
                    "dirty-sync guest ({}) stopped: {exit:?}",
                    self.log_kind.name()
                ));
            }
            if started.elapsed() > HANG_GUARD {
                return Err(format!(
                    "dirty-sync guest ({}) did not finish dirtying {} in {} s",
                    self.log_kind.name(),
                    show_size(self.range.1 - self.range.0),
                    HANG_GUARD.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }

        let t = Instant::now();
        let reported = self.log.sync(&self.blocks).map_err(|e| kvm(&e))?;
        let sync = t.elapsed();
        for (index, block) in self.blocks.iter().enumerate() {
            let chunk = (CHUNK_BYTES / u64::from(block.page_size())).max(1);
            let dirty = block.dirty();
            let mut page = 0;
            while page < dirty.pages() {
                let taken = dirty.take_range(page, chunk);
                self.log.clear(index, &taken).map_err(|e| kvm(&e))?;
                page = taken.end().max(page + 1);
            }
        }
        let elapsed = t.elapsed();

        vcpus.pause().map_err(|e| kvm(&e))?;
        let written = (self.range.1 - self.range.0) / PAGE;
        if reported < written {
            return Err(format!(
                "dirty-sync VM ({}): the sync reported {reported} pages, the guest wrote \
                 {written}",
                self.log_kind.name()
            ));
        }
        Ok(Step {
            elapsed,
            sync,
            reported,
        })
    }
}

/// The dirty-sync figures for a guest of `mem` bytes dirtying `dirty` bytes per round.
pub fn figures(mem: u64, dirty: u64) -> Result<Vec<Report>, String> {
    let prefix = format!("kvm.dirty_sync_{}", size_label(mem));
    let skip_all = |why: String| {
        Ok(vec![Report::Skipped {
            name: format!("{prefix}.*"),
            why,
        }])
    };
    if let Err(e) = vmm_glue::kvm::host_facts() {
        return skip_all(format!("no usable KVM: {}", vmm_glue::error_chain(&e)));
    }
    if dirty == 0 || dirty % PAGE != 0 || DIRTY_START + dirty > mem {
        return Err(format!(
            "--sync-dirty {} must be whole 4 KiB pages that fit a {} guest above 1 MiB",
            show_size(dirty),
            show_size(mem)
        ));
    }
    let pages = dirty / PAGE;
    let ring = ring_entries(pages);

    let mut vms = Vec::new();
    let mut skipped = Vec::new();
    for kind in [Log::Bitmap, Log::ManualProtect, Log::Ring] {
        let name = format!("{prefix}.{}", kind.name());
        if kind == Log::Ring && e2e::harness::kvm_is_pvm() {
            skipped.push(Report::Skipped {
                name,
                why: format!(
                    "this /dev/kvm is PVM (/sys/module/kvm_pvm), which lets a dirty ring \
                     overfill; measure it on real KVM in the kvm-box: {BOX_HINT}"
                ),
            });
            continue;
        }
        eprintln!(
            "dirty-sync: building the {} VM ({})",
            kind.name(),
            show_size(mem)
        );
        match SyncVm::new(kind, mem, dirty, ring)? {
            Ok(vm) => vms.push(vm),
            Err(why) if kind == Log::Bitmap => return skip_all(why),
            Err(why) => skipped.push(Report::Skipped { name, why }),
        }
    }

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); vms.len()];
    let mut reported: Vec<Vec<f64>> = vec![Vec::new(); vms.len()];
    for round in 0..ROUNDS {
        let mut line = Vec::new();
        for (i, vm) in vms.iter_mut().enumerate() {
            let step = vm.step()?;
            times[i].push(us(step.elapsed));
            reported[i].push(step.reported as f64);
            line.push(format!(
                "{} {:.0} us (sync {:.0} + chunks {:.0}, {} pages)",
                vm.log_kind.name(),
                us(step.elapsed),
                us(step.sync),
                us(step.elapsed - step.sync),
                step.reported
            ));
        }
        eprintln!(
            "dirty-sync round {}/{ROUNDS}: {}",
            round + 1,
            line.join("; ")
        );
    }

    let ring_note = if vms.iter().any(|vm| vm.log_kind == Log::Ring) {
        format!("; dirty ring of {ring} entries")
    } else {
        String::new()
    };
    let reported: Vec<String> = vms
        .iter()
        .zip(reported)
        .map(|(vm, r)| format!("{} {}", vm.log_kind.name(), median(r)))
        .collect();
    let note = format!(
        "{} KVM guest, 1 vCPU, {} ({pages} pages) written by the guest between syncs; \
         each figure: one DirtyLog::sync of KVM's log plus take_range and clear of every \
         1 MiB chunk (clear re-protects with manual protect, no-op otherwise){ring_note}; \
         median of {ROUNDS} rounds, logs alternating; pages reported per sync (median): {}",
        show_size(mem),
        show_size(dirty),
        reported.join(", ")
    );
    let mut out = Vec::new();
    let base = times.first().map(|t| median(t.clone())).unwrap_or_default();
    for (vm, t) in vms.iter().zip(times) {
        let mut f = Figure::new(format!("{prefix}.{}", vm.log_kind.name()), median(t), "us")
            .note(note.clone());
        if vm.log_kind != Log::Bitmap {
            f = f.baseline(base);
        }
        out.push(Report::Figure(f));
    }
    out.extend(skipped);
    Ok(out)
}

/// A ring that holds `pages` entries below KVM's soft limit, as a power of two, at
/// most [`RING_MAX`] (and what the host allows).
fn ring_entries(pages: u64) -> u32 {
    let host_max = vmm_glue::kvm::host_facts()
        .map(|f| f.dirty_ring_bytes / 16)
        .unwrap_or(RING_MAX)
        .clamp(1024, RING_MAX);
    let want = (pages + RING_SLACK).next_power_of_two().max(1024);
    u32::try_from(want).unwrap_or(RING_MAX).min(host_max)
}

/// `1g`, `256m`, or the size in KiB: the part of a figure name that says the guest size.
fn size_label(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}g", bytes >> 30)
    } else if bytes % (1 << 20) == 0 {
        format!("{}m", bytes >> 20)
    } else {
        format!("{}k", bytes >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_assembles_reports_and_halts() {
        let code = fill_code().unwrap();
        assert!(!code.is_empty() && code.len() < 64, "{} bytes", code.len());
        // The port write and the halt loop are there: `out 0x10, al` (e6 10), `hlt`.
        assert!(code.windows(2).any(|w| w == [0xe6, 0x10]));
        assert!(code.contains(&0xf4));
    }

    #[test]
    fn ring_holds_a_round_of_pages() {
        assert!(
            u64::from(ring_entries(32768)) >= 32768 + RING_SLACK || ring_entries(32768) == RING_MAX
        );
        assert_eq!(ring_entries(1).count_ones(), 1);
        assert!(ring_entries(1) >= 1024);
        assert!(ring_entries(1 << 30) <= RING_MAX);
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(1 << 30), "1g");
        assert_eq!(size_label(256 << 20), "256m");
        assert_eq!(size_label(3 << 29), "1536m");
    }
}
