//! What a KVM destination refuses, and how: another vCPU count, another
//! accelerator's state, corrupt sections, a CPU or XSAVE area this host
//! lacks, an MSR it refuses; and the VM-wide sections (clock, irqchips).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kvm_common;

use std::time::Instant;

use kvm_common::*;
use vmm_glue::kvm::{KvmVm, KvmVmConfig};
use vmm_glue::session::{GuestRam, Section, StateError, Vcpus};

/// A VM whose guest counted for a while, paused, and its vCPU sections.
fn saved(vcpus: usize) -> (KvmVm, GuestRam, Vec<Section>) {
    let (vm, ram) = small_vm(vcpus);
    boot(&vm, COUNTER);
    vm.vcpus().resume().unwrap();
    let mem = vm.memory().clone();
    wait_until(|| read_u64(&mem, DATA) > 100);
    vm.vcpus().pause().unwrap();
    let sections = vm.vcpus().save_state().unwrap();
    (vm, ram, sections)
}

fn section<'a>(sections: &'a mut [Section], name: &str) -> &'a mut Section {
    sections.iter_mut().find(|s| s.name == name).unwrap()
}

fn incompatible(e: StateError) -> (String, String) {
    match e {
        StateError::Incompatible { what, why } => (what, why),
        other => panic!("expected Incompatible, got {other:?}"),
    }
}

fn malformed(e: StateError) -> (String, String) {
    match e {
        StateError::Malformed { what, why } => (what, why),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn another_vcpu_count_is_incompatible() {
    if !kvm_or_skip("another_vcpu_count_is_incompatible") {
        return;
    }
    let (_vm, _ram, sections) = saved(2);
    let (dest, _ram) = small_vm(1);
    let (what, why) = incompatible(dest.vcpus().restore_state(&sections).unwrap_err());
    assert_eq!(what, "kvm.vcpus");
    assert!(why.contains("2 vCPUs") && why.contains("1"), "{why}");
    assert!(!dest.vcpus().running());
}

#[test]
fn soft_state_is_incompatible() {
    if !kvm_or_skip("soft_state_is_incompatible") {
        return;
    }
    let (dest, _ram) = small_vm(1);
    let soft = vec![Section::new("soft.vcpu0", 1, vec![0; 32])];
    let (what, why) = incompatible(dest.vcpus().restore_state(&soft).unwrap_err());
    assert_eq!(what, "soft.vcpu0");
    assert!(why.contains("\"soft\"") && why.contains("kvm"), "{why}");
    // One foreign section among KVM's is refused as well.
    let (_vm, _ram, mut sections) = saved(1);
    sections.push(Section::new("soft.vcpus", 1, vec![1, 0, 0, 0]));
    let (what, _) = incompatible(dest.vcpus().restore_state(&sections).unwrap_err());
    assert_eq!(what, "soft.vcpus");
}

#[test]
fn corrupt_sections_are_malformed() {
    if !kvm_or_skip("corrupt_sections_are_malformed") {
        return;
    }
    let (_vm, _ram, good) = saved(1);
    let (dest, _ram) = small_vm(1);
    let refuse = |edit: &dyn Fn(&mut Vec<Section>)| {
        let mut s = good.clone();
        edit(&mut s);
        malformed(dest.vcpus().restore_state(&s).unwrap_err())
    };
    let (what, why) = refuse(&|s| {
        section(s, "kvm.vcpu0.regs").data.truncate(100);
    });
    assert_eq!(what, "kvm.vcpu0.regs");
    assert!(why.contains("100 bytes"), "{why}");
    let (what, why) = refuse(&|s| section(s, "kvm.vcpu0.lapic").version = 2);
    assert_eq!(what, "kvm.vcpu0.lapic");
    assert!(why.contains("version 2"), "{why}");
    let (what, _) = refuse(&|s| s.retain(|x| x.name != "kvm.vcpu0.events"));
    assert_eq!(what, "kvm.vcpu0.events");
    let (what, _) = refuse(&|s| {
        let dup = section(s, "kvm.vcpu0.sregs").clone();
        s.push(dup);
    });
    assert_eq!(what, "kvm.vcpu0.sregs");
    // A hostile count never makes the reader allocate.
    let (what, _) = refuse(&|s| {
        section(s, "kvm.vcpu0.msrs").data[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    });
    assert_eq!(what, "kvm.vcpu0.msrs");
    let (what, _) = refuse(&|s| section(s, "kvm.vcpu0.xsave").data.push(0));
    assert_eq!(what, "kvm.vcpu0.xsave");
    // The good state still restores and runs.
    dest.vcpus().restore_state(&good).unwrap();
}

#[test]
fn a_cpu_feature_this_host_lacks_is_incompatible() {
    if !kvm_or_skip("a_cpu_feature_this_host_lacks_is_incompatible") {
        return;
    }
    let (_vm, _ram, mut sections) = saved(1);
    // cpuid: u32 count, then 40-byte kvm_cpuid_entry2 (function, index,
    // flags, eax, ebx, ecx, edx, padding). Claim every leaf 7 EBX feature.
    let data = &mut section(&mut sections, "kvm.vcpu0.cpuid").data;
    let n = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    let e = (0..n)
        .map(|i| 4 + i * 40)
        .find(|&o| data[o..o + 4] == 7u32.to_le_bytes() && data[o + 4..o + 8] == [0; 4])
        .expect("leaf 7 subleaf 0");
    data[e + 16..e + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    let (dest, _ram) = small_vm(1);
    let (what, why) = incompatible(dest.vcpus().restore_state(&sections).unwrap_err());
    assert_eq!(what, "kvm.vcpu0.cpuid");
    assert!(why.contains("CPUID leaf 0x7 subleaf 0 Ebx"), "{why}");
}

#[test]
fn an_xsave_area_larger_than_this_hosts_is_incompatible() {
    if !kvm_or_skip("an_xsave_area_larger_than_this_hosts_is_incompatible") {
        return;
    }
    let (_vm, _ram, mut sections) = saved(1);
    let data = &mut section(&mut sections, "kvm.vcpu0.xsave").data;
    let size = u32::from_le_bytes(data[..4].try_into().unwrap()) + 64 * 1024;
    data[..4].copy_from_slice(&size.to_le_bytes());
    data.resize(4 + size as usize, 0);
    let (dest, _ram) = small_vm(1);
    let (what, why) = incompatible(dest.vcpus().restore_state(&sections).unwrap_err());
    assert_eq!(what, "kvm.vcpu0.xsave");
    assert!(why.contains(&format!("{size} bytes")), "{why}");
}

#[test]
fn an_msr_this_host_refuses_is_incompatible_and_the_vm_stays_paused() {
    if !kvm_or_skip("an_msr_this_host_refuses_is_incompatible_and_the_vm_stays_paused") {
        return;
    }
    let (_vm, ram, good) = saved(1);
    let mut sections = good.clone();
    // msrs: u32 count, then 16-byte kvm_msr_entry (index, reserved, data).
    let data = &mut section(&mut sections, "kvm.vcpu0.msrs").data;
    let n = u32::from_le_bytes(data[..4].try_into().unwrap());
    data[..4].copy_from_slice(&(n + 1).to_le_bytes());
    data.extend_from_slice(&0xdead_0000u32.to_le_bytes());
    data.extend_from_slice(&[0; 12]);
    let ram2 = copy_ram(&ram);
    let dest = KvmVm::new(&ram2, KvmVmConfig::new(1)).unwrap();
    let (what, why) = incompatible(dest.vcpus().restore_state(&sections).unwrap_err());
    assert_eq!(what, "kvm.vcpu0.msrs");
    assert!(why.contains("0xdead0000"), "{why}");
    assert!(!dest.vcpus().running());
    // A good state then restores, and the guest counts on.
    dest.vcpus().restore_state(&good).unwrap();
    dest.vcpus().resume().unwrap();
    let mem = dest.memory().clone();
    let at = read_u64(&mem, DATA);
    wait_until(|| read_u64(&mem, DATA) > at);
    dest.vcpus().pause().unwrap();
}

#[test]
fn vm_sections_refuse_bad_data_and_the_clock_goes_on_from_the_saved_value() {
    if !kvm_or_skip("vm_sections_refuse_bad_data_and_the_clock_goes_on_from_the_saved_value") {
        return;
    }
    let (src, _ram) = small_vm(1);
    let (dest, _ram2) = small_vm(1);
    let names: Vec<String> = src
        .device_states()
        .iter()
        .map(|d| d.name().to_owned())
        .collect();
    assert_eq!(
        names,
        ["kvm.pit", "kvm.clock", "kvm.pic0", "kvm.pic1", "kvm.ioapic"]
    );
    let (s, d) = (src.device_states(), dest.device_states());
    for (a, b) in s.iter().zip(&d) {
        let data = a.save().unwrap();
        let (what, _) = malformed(b.load(a.version(), &data[..data.len() - 1]).unwrap_err());
        assert_eq!(what, a.name());
        let (what, _) = malformed(b.load(a.version() + 1, &data).unwrap_err());
        assert_eq!(what, a.name());
    }
    // The master PIC's state is not the slave's.
    let pic0 = s[2].save().unwrap();
    malformed(d[3].load(1, &pic0).unwrap_err());

    // kvm.clock: kvm_clock_data, its first 8 bytes the clock in ns.
    let clock = |data: &[u8]| u64::from_le_bytes(data[..8].try_into().unwrap());
    // Let the source's clock run ahead of the fresh destination's.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let t0 = Instant::now();
    let saved = s[1].save().unwrap();
    d[1].load(1, &saved).unwrap();
    let now = clock(&d[1].save().unwrap());
    let elapsed = u64::try_from(t0.elapsed().as_nanos()).unwrap();
    assert!(now >= clock(&saved), "guest time went back");
    assert!(
        now - clock(&saved) <= elapsed,
        "guest time jumped {} ns in {elapsed} ns",
        now - clock(&saved)
    );
    for (a, b) in s.iter().zip(&d) {
        b.load(a.version(), &a.save().unwrap()).unwrap();
    }
}
