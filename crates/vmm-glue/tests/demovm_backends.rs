//! `demovm --mem-backend memfd|hugetlbfs`, as a user meets it: the guest runs on
//! shared memory and on 2 MiB huge pages (soft and KVM vCPUs), `x-guest-info` shows
//! the backend and each region's page size, `x-ram-digest` names every RAM block and
//! follows the guest, the `ab` check holds across the regions; and a hugetlbfs VM
//! the host cannot back fails at start with an error naming `vm.nr_hugepages`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod demovm_common;

use demovm_common::{free_huge_pages, huge_pages_or_skip, kvm_or_skip, run_to_failure, Vm};
use serde_json::{json, Value};
use vmm_glue::guest::ab_check;

/// Guest RAM of these tests, in MiB: 3 huge pages above 2 MiB.
const MEM_MIB: u64 = 8;

/// A region as `x-guest-info` lists it: name, start, size, page size, backing.
type Region = (&'static str, u64, u64, u64, &'static str);

/// Runs an `ab` guest on two vCPUs on `backend` and checks what a user would.
fn runs(name: &str, backend: &str, accel: &str, regions: &[Region]) {
    let mut vm = Vm::start(
        name,
        MEM_MIB,
        &[
            "--mem-backend",
            backend,
            "--accel",
            accel,
            "--vcpus",
            "2",
            "--guest",
            "builtin:ab",
        ],
    );
    let info = vm.info();
    assert_eq!(info["mem-backend"], backend, "{info}");
    assert_eq!(info["accel"], accel, "{info}");
    let listed: Vec<Value> = info["ram"].as_array().unwrap().clone();
    let want: Vec<Value> = regions
        .iter()
        .map(|&(name, start, size, page, backing)| {
            json!({"name": name, "start": start, "size": size, "page-size": page, "backing": backing})
        })
        .collect();
    assert_eq!(listed, want, "x-guest-info ram");
    // The host backs it as asked: a memfd, or huge pages.
    let maps = vm.mappings();
    match backend {
        "memfd" => assert!(
            maps.iter()
                .filter(|m| m.0.contains("/memfd:"))
                .map(|m| m.1)
                .sum::<u64>()
                >= (MEM_MIB << 10) - 1024,
            "no memfd mapping of guest RAM: {maps:#?}"
        ),
        _ => assert!(
            maps.iter()
                .any(|m| m.2 == 2048 && m.1 == (MEM_MIB - 2) << 10),
            "no mapping of 2 MiB pages for pc.ram: {maps:#?}"
        ),
    }
    // x-ram-digest names every block, and follows the guest while it runs.
    let d0 = vm.digest();
    let names: Vec<&str> = d0.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = regions.iter().map(|r| r.0).collect();
    assert_eq!(names, want_names);
    vm.wait("the guest's RAM to change", |vm| vm.digest() != d0);
    vm.wait("passes on COM1", |vm| vm.serial_bytes() >= 4);
    vm.cmd("stop", json!({}));
    let d1 = vm.digest();
    assert_eq!(vm.digest(), d1, "a paused guest's digest is stable");
    ab_check(&vm.page_bytes(), 2).unwrap_or_else(|e| panic!("{name}: {e}"));
}

const MEMFD: &[Region] = &[
    ("pc.ram.low", 0, 0xa_0000, 4096, "memfd"),
    (
        "pc.ram",
        0x10_0000,
        (MEM_MIB << 20) - 0x10_0000,
        4096,
        "memfd",
    ),
];

const HUGETLBFS: &[Region] = &[
    ("pc.ram.low", 0, 0xa_0000, 4096, "anonymous"),
    ("pc.ram.mid", 0x10_0000, 0x10_0000, 4096, "anonymous"),
    (
        "pc.ram",
        0x20_0000,
        (MEM_MIB << 20) - 0x20_0000,
        2 << 20,
        "hugetlbfs",
    ),
];

#[test]
fn memfd_guest_runs_on_soft_vcpus() {
    runs("memfd-soft", "memfd", "soft", MEMFD);
}

#[test]
fn memfd_guest_runs_on_kvm() {
    if kvm_or_skip("memfd_guest_runs_on_kvm") {
        runs("memfd-kvm", "memfd", "kvm", MEMFD);
    }
}

/// One test for both accelerators, one after the other: the host may have only
/// the huge pages of one VM.
#[test]
fn hugetlbfs_guest_runs_on_soft_vcpus_and_kvm() {
    let name = "hugetlbfs_guest_runs_on_soft_vcpus_and_kvm";
    if !huge_pages_or_skip(name, (MEM_MIB - 2) / 2) {
        return;
    }
    runs("hugetlbfs-soft", "hugetlbfs", "soft", HUGETLBFS);
    if kvm_or_skip(name) {
        runs("hugetlbfs-kvm", "hugetlbfs", "kvm", HUGETLBFS);
    }
}

#[test]
fn anon_is_the_default_and_says_so() {
    let mut vm = Vm::start("anon", MEM_MIB, &["--accel", "soft", "-S"]);
    let info = vm.info();
    assert_eq!(info["mem-backend"], "anon");
    let pages: Vec<u64> = info["ram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["page-size"].as_u64().unwrap())
        .collect();
    assert_eq!(pages, [4096, 4096]);
}

#[test]
fn hugetlbfs_that_the_host_cannot_back_is_a_clear_error() {
    let (code, err) = run_to_failure(&["--mem", "7M", "--mem-backend", "hugetlbfs"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("whole 2 MiB huge pages"), "{err}");
    // More huge pages than the host has free, by a margin no other test closes.
    let (free, _) = free_huge_pages();
    let mem = format!("{}M", (free + 16) * 2 + 2);
    let (code, err) = run_to_failure(&["--mem", &mem, "--mem-backend", "hugetlbfs"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("vm.nr_hugepages"), "{err}");
}

#[test]
fn help_lists_the_backends_and_the_balloon_guest() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_demovm"))
        .arg("--help")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    for s in [
        "--mem-backend",
        "anon",
        "memfd",
        "hugetlbfs",
        "builtin:balloon",
        "same --mem-backend",
    ] {
        assert!(out.contains(s), "{s} missing from --help:\n{out}");
    }
}
