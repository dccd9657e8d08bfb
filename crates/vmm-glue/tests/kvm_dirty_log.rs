//! KVM's dirty logs on the real kernel: the generic `DirtyLog` conformance
//! suite with writes made by a guest, the exact pages a guest writes, a
//! write after `clear`, block pages larger than KVM's, a ring that fills.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kvm_common;

use std::sync::Arc;

use kvm_common::*;
use migration_ram::dirty_log::conformance;
use migration_ram::{DirtyLog, GuestRegionMmap, RamBlock, RamBlocks};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_glue::kvm::{KvmError, KvmVm, KvmVmConfig};
use vmm_glue::session::{GuestRam, Vcpus};
use vmm_glue::GuestMemoryMmap;

const MIB: u64 = 1 << 20;
/// r0 holds the guest's code, tables and stacks; r1 and r2 are watched.
/// (r0 is not: on AMD, nested paging treats the CPU's page-table walks as
/// writes, so KVM reports the tables as dirty too.)
const R1: u64 = 2 * MIB;
const R1_SIZE: u64 = 16 * MIB;
const R2: u64 = 20 * MIB;
const R2_SIZE: u64 = 4 * MIB;

/// The smallest ring KVM takes (in entries).
const RING: u32 = 1024;

/// Which KVM log a test drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The bitmap, with manual protect where the host offers it.
    Bitmap,
    /// The bitmap, manual protect off: `KVM_GET_DIRTY_LOG` re-protects.
    BitmapAutoClear,
    /// The dirty ring.
    Ring,
}

/// A VM over r0, r1, r2 with one vCPU; `None` (with a loud skip) when a
/// ring is asked for and the host has none.
fn dirty_vm(mode: Mode, name: &str) -> Option<(KvmVm, GuestRam)> {
    let ram = ram(&[(0, 2 << 20), (R1, R1_SIZE as usize), (R2, R2_SIZE as usize)]);
    let config = match mode {
        Mode::Bitmap => KvmVmConfig::new(1),
        Mode::BitmapAutoClear => KvmVmConfig::new(1).without_manual_protect(),
        Mode::Ring => KvmVmConfig::new(1).with_dirty_ring(RING),
    };
    match KvmVm::new(&ram, config) {
        Ok(vm) => {
            if mode == Mode::BitmapAutoClear {
                assert!(!vm.manual_protect());
            }
            Some((vm, ram))
        }
        Err(KvmError::Unsupported { what }) if mode == Mode::Ring => {
            if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{name}: REQUIRE_KVM=1 but this host's KVM lacks {what}");
            }
            eprintln!("*** SKIPPED {name}: this host's KVM lacks {what} ***");
            None
        }
        Err(e) => panic!("{}", vmm_glue::error_chain(&e)),
    }
}

/// r1 and r2 only, sharing their mappings (and vm-memory bitmaps).
fn data_memory(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    GuestMemoryMmap::from_regions(
        mem.iter()
            .skip(1)
            .map(|r| GuestRegionMmap::with_arc(r.get_mmap(), r.start_addr()).unwrap())
            .collect(),
    )
    .unwrap()
}

/// Blocks of 4 KiB pages over r1 and r2.
fn watched_blocks(vm: &KvmVm) -> RamBlocks {
    RamBlocks::from_guest_memory(&data_memory(vm.memory()), &["r1", "r2"]).unwrap()
}

/// Boots the write server and runs it.
fn serve(vm: &KvmVm) -> Arc<TestIo> {
    let io = Arc::new(TestIo::default());
    vm.vcpus().set_io_handler(io.clone());
    boot(vm, WRITE_SERVER);
    vm.vcpus().resume().unwrap();
    io
}

fn dirty(blocks: &RamBlocks, name: &str) -> Vec<u64> {
    blocks.by_name(name).unwrap().1.dirty().iter_set().collect()
}

fn conformance_with_guest_writes(mode: Mode, name: &str) {
    if !kvm_or_skip(name) {
        return;
    }
    let Some((vm, _ram)) = dirty_vm(mode, name) else {
        return;
    };
    assert_eq!(vm.dirty_ring_entries().is_some(), mode == Mode::Ring);
    let io = serve(&vm);
    let data = data_memory(vm.memory());
    let log = vm.kvm_dirty_log();
    conformance(&data, &*log, &mut |addr, bytes| {
        io.guest_write(addr.0, bytes);
        Ok(())
    })
    .unwrap();
    vm.vcpus().pause().unwrap();
}

#[test]
fn bitmap_log_passes_the_conformance_suite_with_guest_writes() {
    conformance_with_guest_writes(
        Mode::Bitmap,
        "bitmap_log_passes_the_conformance_suite_with_guest_writes",
    );
}

#[test]
fn auto_clear_bitmap_log_passes_the_conformance_suite_with_guest_writes() {
    conformance_with_guest_writes(
        Mode::BitmapAutoClear,
        "auto_clear_bitmap_log_passes_the_conformance_suite_with_guest_writes",
    );
}

#[test]
fn ring_log_passes_the_conformance_suite_with_guest_writes() {
    conformance_with_guest_writes(
        Mode::Ring,
        "ring_log_passes_the_conformance_suite_with_guest_writes",
    );
}

#[test]
fn composite_log_passes_the_conformance_suite_with_vmm_writes() {
    let name = "composite_log_passes_the_conformance_suite_with_vmm_writes";
    if !kvm_or_skip(name) {
        return;
    }
    let Some((vm, _ram)) = dirty_vm(Mode::Bitmap, name) else {
        return;
    };
    let data = data_memory(vm.memory());
    let log = vm.dirty_log(vm.memory().clone());
    conformance(&data, &*log, &mut |addr, bytes| {
        data.write_slice(bytes, addr).map_err(|e| e.to_string())
    })
    .unwrap();
}

/// Forgets what the log reports now, as a sender would: sync, then take every
/// dirty page and clear it (with manual protect the log keeps reporting a
/// page until it is cleared).
fn drain(log: &dyn DirtyLog, blocks: &RamBlocks) {
    log.sync(blocks).unwrap();
    for (i, b) in blocks.iter().enumerate() {
        let mut from = 0;
        while from < b.pages() {
            let taken = b.dirty().take_range(from, 256);
            log.clear(i, &taken).unwrap();
            from = taken.end();
        }
    }
}

fn exact_pages_then_again_after_clear(mode: Mode, name: &str) {
    if !kvm_or_skip(name) {
        return;
    }
    let Some((vm, _ram)) = dirty_vm(mode, name) else {
        return;
    };
    let blocks = watched_blocks(&vm);
    let log = vm.kvm_dirty_log();
    log.start().unwrap();
    let io = serve(&vm);
    drain(&*log, &blocks);

    io.guest_write(R1 + 3 * 4096, &[1]);
    io.guest_write(R1 + 700 * 4096 + 4095, &[2]);
    io.guest_write(R2, &[3, 4]);
    let newly = log.sync(&blocks).unwrap();
    assert_eq!(dirty(&blocks, "r1"), vec![3, 700]);
    assert_eq!(dirty(&blocks, "r2"), vec![0]);
    assert_eq!(newly, 3);

    // Page 700 is written again after the sync, before the sender gets to
    // it. As a sender does: take the bits, clear the chunks, read the pages.
    io.guest_write(R1 + 700 * 4096, &[6]);
    for (i, b) in blocks.iter().enumerate() {
        for p in b.dirty().iter_set().collect::<Vec<_>>() {
            let taken = b.dirty().take_range(p, 1);
            log.clear(i, &taken).unwrap();
        }
    }
    // With manual protect, clear() re-protected page 700 just before it was
    // read: the write went out with it and is not reported again. Without,
    // the next sync reports it once more.
    let again = log.sync(&blocks).unwrap();
    if vm.manual_protect() {
        assert_eq!(again, 0);
    } else {
        assert_eq!(again, 1);
        assert_eq!(dirty(&blocks, "r1"), vec![700]);
        blocks.iter().for_each(|b| b.dirty().clear_all());
    }
    // A new write to a cleared page is reported again.
    io.guest_write(R1 + 3 * 4096 + 8, &[5]);
    assert_eq!(log.sync(&blocks).unwrap(), 1);
    assert_eq!(dirty(&blocks, "r1"), vec![3]);
    assert_eq!(dirty(&blocks, "r2"), Vec::<u64>::new());
    vm.vcpus().pause().unwrap();
    log.stop().unwrap();
}

#[test]
fn bitmap_log_reports_exactly_the_guest_writes_and_again_after_clear() {
    exact_pages_then_again_after_clear(
        Mode::Bitmap,
        "bitmap_log_reports_exactly_the_guest_writes_and_again_after_clear",
    );
}

#[test]
fn auto_clear_bitmap_log_reports_exactly_the_guest_writes_and_again_after_clear() {
    exact_pages_then_again_after_clear(
        Mode::BitmapAutoClear,
        "auto_clear_bitmap_log_reports_exactly_the_guest_writes_and_again_after_clear",
    );
}

#[test]
fn ring_log_reports_exactly_the_guest_writes_and_again_after_clear() {
    exact_pages_then_again_after_clear(
        Mode::Ring,
        "ring_log_reports_exactly_the_guest_writes_and_again_after_clear",
    );
}

fn large_block_pages(mode: Mode, name: &str) {
    if !kvm_or_skip(name) {
        return;
    }
    let Some((vm, _ram)) = dirty_vm(mode, name) else {
        return;
    };
    // 2 MiB block pages over KVM's 4 KiB ones.
    let blocks = RamBlocks::new(vec![
        RamBlock::new("r1", GuestAddress(R1), R1_SIZE, 2 << 20).unwrap(),
        RamBlock::new("r2", GuestAddress(R2), R2_SIZE, 2 << 20).unwrap(),
    ])
    .unwrap();
    let log = vm.kvm_dirty_log();
    log.start().unwrap();
    let io = serve(&vm);
    drain(&*log, &blocks);
    io.guest_write(R1 + 3 * 4096 + 5, &[1]);
    io.guest_write(R1 + 7 * MIB, &[1]);
    io.guest_write(R2 + 3 * MIB, &[1]);
    assert_eq!(log.sync(&blocks).unwrap(), 3);
    assert_eq!(dirty(&blocks, "r1"), vec![0, 3]);
    assert_eq!(dirty(&blocks, "r2"), vec![1]);
    for (i, b) in blocks.iter().enumerate() {
        for p in b.dirty().iter_set().collect::<Vec<_>>() {
            let taken = b.dirty().take_range(p, 1);
            log.clear(i, &taken).unwrap();
        }
    }
    io.guest_write(R2 + 3 * MIB + 4096, &[1]);
    assert_eq!(log.sync(&blocks).unwrap(), 1);
    assert_eq!(dirty(&blocks, "r2"), vec![1]);
    vm.vcpus().pause().unwrap();
    log.stop().unwrap();
}

#[test]
fn bitmap_log_maps_kvm_pages_onto_larger_block_pages() {
    large_block_pages(
        Mode::Bitmap,
        "bitmap_log_maps_kvm_pages_onto_larger_block_pages",
    );
}

#[test]
fn ring_log_maps_kvm_pages_onto_larger_block_pages() {
    large_block_pages(
        Mode::Ring,
        "ring_log_maps_kvm_pages_onto_larger_block_pages",
    );
}

/// A guest writing three rings' worth of pages in one go.
fn many_pages(mode: Mode, name: &str) {
    if !kvm_or_skip(name) {
        return;
    }
    let Some((vm, _ram)) = dirty_vm(mode, name) else {
        return;
    };
    let pages = 3 * u64::from(RING);
    let blocks = watched_blocks(&vm);
    let log = vm.kvm_dirty_log();
    log.start().unwrap();
    drain(&*log, &blocks);
    let io = Arc::new(TestIo::default());
    vm.vcpus().set_io_handler(io.clone());
    boot_args(&vm, FILL_PAGES, &[[R1, pages, 0, 0]]);
    vm.vcpus().resume().unwrap();
    wait_until(|| !io.writes.lock().is_empty());
    let newly = log.sync(&blocks).unwrap();
    assert_eq!(dirty(&blocks, "r1"), (0..pages).collect::<Vec<_>>());
    assert_eq!(newly, pages);
    // The guest finished: it never stalled on a full ring.
    vm.vcpus().pause().unwrap();
    let v: u8 = vm
        .memory()
        .read_obj(GuestAddress(R1 + (pages - 1) * 4096))
        .unwrap();
    assert_eq!(v, 1);
    log.stop().unwrap();
}

#[test]
fn bitmap_log_reports_thousands_of_guest_pages() {
    many_pages(Mode::Bitmap, "bitmap_log_reports_thousands_of_guest_pages");
}

#[test]
fn full_ring_is_harvested_by_the_vcpu_and_nothing_is_lost() {
    let name = "full_ring_is_harvested_by_the_vcpu_and_nothing_is_lost";
    // PVM (kvm_pvm) lets a ring fill past its soft limit without the
    // KVM_EXIT_DIRTY_RING_FULL exit, then loses count: its fault, not ours.
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "*** SKIPPED {name}: PVM overflows full dirty rings; run it with \
             KVM_BOX_FORCE=1 ../shared/kvm-box/run ***"
        );
        return;
    }
    many_pages(Mode::Ring, name);
}

#[test]
fn ring_falls_back_to_the_bitmap_only_when_allowed() {
    let name = "ring_falls_back_to_the_bitmap_only_when_allowed";
    if !kvm_or_skip(name) {
        return;
    }
    let ram = ram(&[(0, 2 << 20)]);
    let vm = KvmVm::new(&ram, KvmVmConfig::new(1).with_dirty_ring_or_bitmap(RING)).unwrap();
    let facts = vmm_glue::kvm::host_facts().unwrap();
    assert_eq!(
        vm.dirty_ring_entries().is_some(),
        facts.dirty_ring_bytes > 0
    );
    drop(vm);
    match KvmVm::new(&ram, KvmVmConfig::new(1).with_dirty_ring(RING)) {
        Ok(vm) => assert_eq!(vm.dirty_ring_entries(), Some(RING)),
        Err(e) => assert!(
            matches!(e, KvmError::Unsupported { .. }) && facts.dirty_ring_bytes == 0,
            "{e}"
        ),
    }
    // Not a power of two: refused whatever the host.
    assert!(KvmVm::new(&ram, KvmVmConfig::new(1).with_dirty_ring(1000)).is_err());
}

#[test]
fn ring_sync_kicks_a_halted_running_guest_and_returns() {
    let name = "ring_sync_kicks_a_halted_running_guest_and_returns";
    if !kvm_or_skip(name) {
        return;
    }
    let Some((vm, _ram)) = dirty_vm(Mode::Ring, name) else {
        return;
    };
    let blocks = watched_blocks(&vm);
    let log = vm.kvm_dirty_log();
    log.start().unwrap();
    let io = Arc::new(TestIo::default());
    vm.vcpus().set_io_handler(io.clone());
    boot_args(&vm, FILL_PAGES, &[[R2, 5, 0, 0]]);
    vm.vcpus().resume().unwrap();
    wait_until(|| !io.writes.lock().is_empty());
    // Running, halted in KVM_RUN: every sync kicks it out and back in.
    assert_eq!(log.sync(&blocks).unwrap(), 5);
    for _ in 0..20 {
        assert_eq!(log.sync(&blocks).unwrap(), 0);
    }
    assert!(vm.vcpus().running());
    assert_eq!(dirty(&blocks, "r2"), vec![0, 1, 2, 3, 4]);
    vm.vcpus().pause().unwrap();
    log.stop().unwrap();
}
