//! Dropping a KVM VM joins every thread it started, whatever its guest was
//! doing (spinning, halted, stopped on a triple fault). Alone in its binary
//! so no other test's threads change the count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kvm_common;

use kvm_common::*;
use vmm_glue::session::Vcpus;

#[test]
fn every_thread_is_joined_when_the_vm_is_dropped() {
    if !kvm_or_skip("every_thread_is_joined_when_the_vm_is_dropped") {
        return;
    }
    let before = task_count();
    {
        // Spinning, not paused before the drop.
        let (vm, _ram) = small_vm(3);
        boot(&vm, COUNTER);
        vm.vcpus().resume().unwrap();
        let mem = vm.memory().clone();
        wait_until(|| (0..3).all(|i| read_u64(&mem, DATA + i * 0x1000) > 0));
        assert!(task_count() >= before + 3);
    }
    {
        // Halted with interrupts off, not paused.
        let (vm, _ram) = small_vm(2);
        boot(&vm, HALT);
        vm.vcpus().resume().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    {
        // Stopped on its own.
        let (vm, _ram) = small_vm(1);
        boot(&vm, TRIPLE_FAULT);
        vm.vcpus().resume().unwrap();
        let vcpus = vm.vcpus();
        wait_until(|| vcpus.last_exit().is_some());
    }
    {
        // Never started.
        let _ = small_vm(4);
    }
    // KVM's own per-VM worker (kvm-nx-lpage-recovery, a task of this
    // process) goes when the last fd of its VM closes; vCPU threads were
    // joined before the drop returned.
    let vcpu_threads = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|c| c.starts_with("kvm-vcpu"))
            .count()
    };
    wait_until(|| vcpu_threads() == 0 && task_count() == before);
    assert_eq!(task_count(), before);
}
