//! KVM vCPUs on the real kernel: running, pausing (spinning and halted),
//! saving and restoring into a second VM, exits, unhandled I/O.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kvm_common;

use std::sync::Arc;

use kvm_common::*;
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress};
use vmm_glue::kvm::{KvmVm, KvmVmConfig};
use vmm_glue::session::{GuestExit, Vcpus};

#[test]
fn spinning_guest_pauses_saves_and_continues_in_a_second_vm() {
    if !kvm_or_skip("spinning_guest_pauses_saves_and_continues_in_a_second_vm") {
        return;
    }
    let (vm, ram) = small_vm(1);
    boot(&vm, COUNTER);
    let vcpus = vm.vcpus();
    vcpus.resume().unwrap();
    assert!(vcpus.running());
    let mem = vm.memory().clone();
    wait_until(|| read_u64(&mem, DATA) > 1000);
    vcpus.pause().unwrap();
    assert!(!vcpus.running());

    // Paused means paused: the counter no longer moves.
    let stopped_at = read_u64(&mem, DATA);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(read_u64(&mem, DATA), stopped_at);
    let regs = vcpus.regs(0).unwrap();
    assert!(
        regs.rip == CODE || regs.rip == CODE + 3,
        "RIP {:#x} outside the loop",
        regs.rip
    );
    assert_eq!(regs.rdi, DATA);

    let sections = vcpus.save_state().unwrap();
    let devices: Vec<(String, u32, Vec<u8>)> = vm
        .device_states()
        .iter()
        .map(|d| (d.name().to_owned(), d.version(), d.save().unwrap()))
        .collect();
    assert!(sections.iter().any(|s| s.name == "kvm.vcpu0.regs"));
    assert!(sections.iter().any(|s| s.name == "kvm.vcpu0.msrs"));

    // A second VM over a copy of the RAM.
    let ram2 = copy_ram(&ram);
    let vm2 = KvmVm::new(&ram2, KvmVmConfig::new(1)).unwrap();
    for (d, (name, version, data)) in vm2.device_states().iter().zip(&devices) {
        assert_eq!(d.name(), name);
        d.load(*version, data).unwrap();
    }
    let vcpus2 = vm2.vcpus();
    vcpus2.restore_state(&sections).unwrap();
    let regs2 = vcpus2.regs(0).unwrap();
    assert_eq!(regs2.rip, regs.rip);
    assert_eq!(regs2.rdi, regs.rdi);
    // The source stays paused; the copy goes on counting from where it was.
    drop(vcpus);
    drop(vm);
    vcpus2.resume().unwrap();
    let mem2 = vm2.memory().clone();
    wait_until(|| read_u64(&mem2, DATA) > stopped_at + 1000);
    vcpus2.pause().unwrap();
    assert_eq!(read_u64(&mem, DATA), stopped_at);
}

#[test]
fn halted_guest_pauses_and_resumes() {
    if !kvm_or_skip("halted_guest_pauses_and_resumes") {
        return;
    }
    let (vm, _ram) = small_vm(1);
    boot(&vm, HALT);
    let vcpus = vm.vcpus();
    for _ in 0..3 {
        vcpus.resume().unwrap();
        // Let it reach HLT and sleep in KVM_RUN.
        std::thread::sleep(std::time::Duration::from_millis(20));
        vcpus.pause().unwrap();
        let rip = vcpus.regs(0).unwrap().rip;
        assert!((CODE..CODE + 4).contains(&rip), "RIP {rip:#x}");
    }
    // Pause twice is fine; state can be saved.
    vcpus.pause().unwrap();
    assert!(!vcpus.save_state().unwrap().is_empty());
}

#[test]
fn two_vcpus_each_run_their_own_loop() {
    if !kvm_or_skip("two_vcpus_each_run_their_own_loop") {
        return;
    }
    let (vm, ram) = small_vm(2);
    boot(&vm, COUNTER);
    let vcpus = vm.vcpus();
    vcpus.resume().unwrap();
    let mem = vm.memory().clone();
    wait_until(|| read_u64(&mem, DATA) > 1000 && read_u64(&mem, DATA + 0x1000) > 1000);
    vcpus.pause().unwrap();
    let (a, b) = (read_u64(&mem, DATA), read_u64(&mem, DATA + 0x1000));
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        (read_u64(&mem, DATA), read_u64(&mem, DATA + 0x1000)),
        (a, b)
    );
    assert_eq!(vcpus.regs(0).unwrap().rdi, DATA);
    assert_eq!(vcpus.regs(1).unwrap().rdi, DATA + 0x1000);
    // Both saved, with a header naming two vCPUs.
    let sections = vcpus.save_state().unwrap();
    let names: Vec<&str> = sections.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"kvm.vcpus"));
    assert!(names.contains(&"kvm.vcpu1.lapic"));
    // Both go on in a second VM, each with its own counter.
    let ram2 = copy_ram(&ram);
    let vm2 = KvmVm::new(&ram2, KvmVmConfig::new(2)).unwrap();
    for (d, s) in vm2.device_states().iter().zip(vm.device_states()) {
        d.load(s.version(), &s.save().unwrap()).unwrap();
    }
    vm2.vcpus().restore_state(&sections).unwrap();
    vm2.vcpus().resume().unwrap();
    let mem2 = vm2.memory().clone();
    wait_until(|| read_u64(&mem2, DATA) > a + 1000 && read_u64(&mem2, DATA + 0x1000) > b + 1000);
    vm2.vcpus().pause().unwrap();
}

#[test]
fn triple_fault_is_a_shutdown_and_the_process_lives_on() {
    if !kvm_or_skip("triple_fault_is_a_shutdown_and_the_process_lives_on") {
        return;
    }
    let (vm, _ram) = small_vm(1);
    boot(&vm, TRIPLE_FAULT);
    let vcpus = vm.vcpus();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    vcpus.set_exit_handler(Box::new(move |e| s.lock().push(e)));
    vcpus.resume().unwrap();
    wait_until(|| !seen.lock().is_empty());
    let exits = seen.lock().clone();
    assert!(
        matches!(&exits[0], GuestExit::Shutdown { reason } if reason.contains("vCPU 0")),
        "{exits:?}"
    );
    wait_until(|| !vcpus.running());
    assert_eq!(vcpus.last_exit(), Some(exits[0].clone()));
    // Pause and save still work; resuming without a new state is refused.
    vcpus.pause().unwrap();
    assert!(!vcpus.save_state().unwrap().is_empty());
    let err = vcpus.resume().unwrap_err();
    assert!(err.to_string().contains("stopped"), "{err}");
    // Booting again makes it runnable.
    boot(&vm, COUNTER);
    vcpus.resume().unwrap();
    let mem = vm.memory().clone();
    wait_until(|| read_u64(&mem, DATA) > 100);
    vcpus.pause().unwrap();
}

#[test]
fn unhandled_port_reads_return_ff_and_are_counted() {
    if !kvm_or_skip("unhandled_port_reads_return_ff_and_are_counted") {
        return;
    }
    let (vm, _ram) = small_vm(1);
    boot(&vm, PIO_READ);
    let io = Arc::new(TestIo::default());
    let vcpus = vm.vcpus();
    vcpus.set_io_handler(io.clone());
    vm.memory()
        .write_obj(0x1234_5678u32, GuestAddress(DATA))
        .unwrap();
    vcpus.resume().unwrap();
    wait_until(|| !io.writes.lock().is_empty());
    vcpus.pause().unwrap();
    let v: u32 = vm.memory().read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(v, 0xffff_ffff);
    assert_eq!(*io.writes.lock(), vec![(0x10, 0xff)]);
    let u = vcpus.unhandled_io();
    assert_eq!(u.pio_reads, 1);
    assert_eq!(u.pio_writes, 0);
}

#[test]
fn real_mode_boot_sector_runs_at_7c00_with_dl_80() {
    if !kvm_or_skip("real_mode_boot_sector_runs_at_7c00_with_dl_80") {
        return;
    }
    let (vm, _ram) = small_vm(1);
    vm.memory()
        .write_slice(REAL_MODE, GuestAddress(0x7c00))
        .unwrap();
    let io = Arc::new(TestIo::default());
    let vcpus = vm.vcpus();
    vcpus.set_io_handler(io.clone());
    vcpus.boot_real_mode().unwrap();
    let regs = vcpus.regs(0).unwrap();
    assert_eq!(
        (regs.rip, regs.rsp, regs.rdx, regs.rflags),
        (0x7c00, 0x7000, 0x80, 2)
    );
    vcpus.resume().unwrap();
    wait_until(|| !io.writes.lock().is_empty());
    // Halted with interrupts off: pause must still get it out.
    vcpus.pause().unwrap();
    assert_eq!(*io.writes.lock(), vec![(0x10, 0x80)]);
}

#[test]
fn saving_while_running_is_refused() {
    if !kvm_or_skip("saving_while_running_is_refused") {
        return;
    }
    let (vm, _ram) = small_vm(1);
    boot(&vm, COUNTER);
    let vcpus = vm.vcpus();
    assert_eq!(vcpus.accel(), "kvm");
    vcpus.resume().unwrap();
    let err = vcpus.save_state().unwrap_err();
    assert!(
        matches!(err, vmm_glue::session::StateError::InvalidState(_)),
        "{err}"
    );
    assert!(vm.device_states()[0].save().is_err());
    vcpus.pause().unwrap();
    vcpus.save_state().unwrap();
}

#[test]
fn pause_completes_pending_port_reads_across_migrations() {
    if !kvm_or_skip("pause_completes_pending_port_reads_across_migrations") {
        return;
    }
    // The guest does nothing but `in`: nearly every pause lands right after
    // a port-read exit. Were that read not completed before the state is
    // saved, the next VM would execute it again and the guest would see a
    // value skipped.
    let io = Arc::new(TestIo::default());
    let (vm, ram) = small_vm(1);
    vm.vcpus().set_io_handler(io.clone());
    boot(&vm, PIO_SEQUENCE);
    let mut vm = vm;
    let mut ram = ram;
    for round in 0..6 {
        vm.vcpus().resume().unwrap();
        let mem = vm.memory().clone();
        let start = read_u64(&mem, DATA);
        wait_until(|| read_u64(&mem, DATA) > start + 200 || !io.writes.lock().is_empty());
        vm.vcpus().pause().unwrap();
        assert_eq!(
            *io.writes.lock(),
            vec![],
            "the guest saw a gap in round {round}"
        );
        let sections = vm.vcpus().save_state().unwrap();
        let ram2 = copy_ram(&ram);
        let vm2 = KvmVm::new(&ram2, KvmVmConfig::new(1)).unwrap();
        vm2.vcpus().set_io_handler(io.clone());
        vm2.vcpus().restore_state(&sections).unwrap();
        // The last value the device gave reached the guest's EAX: the
        // read completed before the state was taken.
        let regs = vm2.vcpus().regs(0).unwrap();
        let seq = u64::from(io.seq.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(regs.rax, seq, "round {round}");
        assert!(regs.rbx == seq || regs.rbx + 1 == seq, "round {round}");
        (vm, ram) = (vm2, ram2);
    }
    vm.vcpus().resume().unwrap();
    let mem = vm.memory().clone();
    let start = read_u64(&mem, DATA);
    wait_until(|| read_u64(&mem, DATA) > start + 200 || !io.writes.lock().is_empty());
    vm.vcpus().pause().unwrap();
    assert_eq!(*io.writes.lock(), vec![]);
}

#[test]
fn mmio_goes_to_the_io_handler_and_unhandled_reads_return_ff() {
    if !kvm_or_skip("mmio_goes_to_the_io_handler_and_unhandled_reads_return_ff") {
        return;
    }
    let (vm, _ram) = small_vm(1);
    boot(&vm, MMIO);
    let io = Arc::new(TestIo::default());
    let vcpus = vm.vcpus();
    vcpus.set_io_handler(io.clone());
    vcpus.resume().unwrap();
    wait_until(|| !io.writes.lock().is_empty() || vcpus.last_exit().is_some());
    vcpus.pause().unwrap();
    assert_eq!(vcpus.last_exit(), None);
    let read = |off: u64| -> u32 { vm.memory().read_obj(GuestAddress(DATA + off)).unwrap() };
    assert_eq!(read(0), MMIO_VALUE);
    assert_eq!(read(4), 0xffff_ffff);
    assert_eq!(
        *io.mmio_writes.lock(),
        vec![(MMIO_REG + 16, 0x1234_5678u32.to_le_bytes().to_vec())]
    );
    let u = vcpus.unhandled_io();
    assert_eq!((u.mmio_reads, u.mmio_writes), (1, 0));
}

#[test]
fn code_in_an_mmio_hole_is_an_internal_error_and_the_process_lives_on() {
    if !kvm_or_skip("code_in_an_mmio_hole_is_an_internal_error_and_the_process_lives_on") {
        return;
    }
    let (vm, _ram) = small_vm(1);
    boot(&vm, JUMP_TO_MMIO);
    let vcpus = vm.vcpus();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    vcpus.set_exit_handler(Box::new(move |e| s.lock().push(e)));
    vcpus.resume().unwrap();
    wait_until(|| !seen.lock().is_empty());
    let exits = seen.lock().clone();
    match &exits[0] {
        GuestExit::InternalError { vcpu, message } => {
            assert_eq!(*vcpu, 0);
            assert!(
                message.contains("emulation failure (suberror 1)"),
                "{message}"
            );
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
    wait_until(|| !vcpus.running());
    vcpus.pause().unwrap();
    assert!(!vcpus.save_state().unwrap().is_empty());
}
