//! `demovm`'s balloon, as an operator sees it over QMP: a `builtin:balloon` guest
//! (soft and KVM vCPUs, one and two) makes requests that the balloon honours, and the
//! RAM it leaves passes `balloon_check`; while `x-balloon-inhibit` says so (as the
//! session will while a postcopy migration runs) the requests are dropped and counted,
//! and nothing is given back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod demovm_common;

use demovm_common::{kvm_or_skip, Vm, WORKLOAD_START};
use serde_json::json;
use vmm_glue::guest::balloon::halves;
use vmm_glue::guest::{balloon_check, slices, BalloonSummary};

/// Guest RAM in MiB: 3840 workload pages, so one or two vCPUs get equal areas.
const MEM_MIB: u64 = 16;

/// Each vCPU's balloon area.
fn areas(vcpus: usize) -> Vec<(u64, u64)> {
    slices(WORKLOAD_START, MEM_MIB << 20, vcpus)
        .unwrap()
        .into_iter()
        .map(|s| halves(s).unwrap().1)
        .collect()
}

fn start(name: &str, accel: &str, vcpus: usize, paused: bool) -> Vm {
    let n = vcpus.to_string();
    let mut args = vec![
        "--guest",
        "builtin:balloon",
        "--vcpus",
        &n,
        "--accel",
        accel,
    ];
    if paused {
        args.push("-S");
    }
    Vm::start(name, MEM_MIB, &args)
}

/// Checks a paused guest's RAM with `balloon_check`, bounding markers by the `B`s on
/// COM1 (one per completed pass) plus one.
fn check_ram(vm: &mut Vm, vcpus: usize) -> BalloonSummary {
    let passes = vm.serial_bytes() + 1;
    let words = vm.page_words(WORKLOAD_START, MEM_MIB << 20);
    balloon_check(&words, vcpus, passes).unwrap_or_else(|e| panic!("balloon_check: {e}"))
}

/// Requests arrive and are honoured; the counters and the RAM agree.
fn honoured(name: &str, accel: &str, vcpus: usize) {
    let mut vm = start(name, accel, vcpus, false);
    let want = 4 * vcpus as u64;
    vm.wait("honoured balloon requests", |vm| {
        vm.balloon("honoured") >= want
    });
    vm.cmd("stop", json!({}));
    let info = vm.info();
    assert_eq!(info["accel"], accel, "{info}");
    assert_eq!(info["guest"], "builtin:balloon");
    let b = &info["balloon"];
    let n = |k: &str| b[k].as_u64().unwrap();
    assert_eq!(b["inhibited"], false, "{b}");
    assert_eq!(n("requests"), n("honoured"), "every request honoured: {b}");
    assert_eq!((n("dropped"), n("refused")), (0, 0), "{b}");
    let area_pages = (areas(vcpus)[0].1 - areas(vcpus)[0].0) / 4096;
    assert_eq!(
        n("pages-given-back"),
        n("honoured") * area_pages,
        "each request gives a whole area back: {b}"
    );
    let serial = info["serial-bytes"].as_u64().unwrap();
    assert!(
        serial <= n("requests") && n("requests") <= serial + vcpus as u64,
        "one B after each request: {info}"
    );
    if accel == "kvm" {
        assert_eq!(
            info["unhandled-io"]["pio-writes"], 0,
            "the balloon ports are handled: {info}"
        );
    }
    let s = check_ram(&mut vm, vcpus);
    eprintln!("{name}: {b}; RAM {s:?}");
}

/// Requests made while inhibited are dropped and counted, nothing is given back;
/// once the inhibitor lets go, requests are honoured again.
fn dropped(name: &str, accel: &str) {
    let vcpus = 2;
    let mut vm = start(name, accel, vcpus, true);
    vm.cmd("x-balloon-inhibit", json!({ "inhibit": true }));
    assert_eq!(vm.info()["balloon"]["inhibited"], true);
    vm.cmd("cont", json!({}));
    // Until every vCPU has marked its whole area at least once.
    let areas = areas(vcpus);
    vm.wait("every balloon area marked, requests dropped", |vm| {
        vm.balloon("dropped") >= 2
            && areas
                .iter()
                .all(|a| vm.sample(a.1 - 4096, a.1, 4096)[0] != 0)
    });
    vm.cmd("stop", json!({}));
    let b = vm.info()["balloon"].clone();
    let n = |k: &str| b[k].as_u64().unwrap();
    assert_eq!(n("requests"), n("dropped"), "{b}");
    assert_eq!(
        (n("honoured"), n("pages-given-back"), n("refused")),
        (0, 0, 0),
        "{b}"
    );
    let s = check_ram(&mut vm, vcpus);
    assert_eq!(s.zero_pages, 0, "nothing given back: {s:?}");

    // The inhibitor lets go: the next requests are honoured.
    vm.cmd("x-balloon-inhibit", json!({ "inhibit": false }));
    let dropped = n("dropped");
    vm.cmd("cont", json!({}));
    vm.wait("honoured requests after the inhibitor let go", |vm| {
        vm.balloon("honoured") >= 2
    });
    vm.cmd("stop", json!({}));
    assert_eq!(vm.balloon("dropped"), dropped, "no drop once let go");
    check_ram(&mut vm, vcpus);
}

#[test]
fn soft_one_vcpu_balloon_requests_are_honoured() {
    honoured("soft-1", "soft", 1);
}

#[test]
fn soft_two_vcpus_balloon_requests_are_honoured() {
    honoured("soft-2", "soft", 2);
}

#[test]
fn kvm_one_vcpu_balloon_requests_are_honoured() {
    if kvm_or_skip("kvm_one_vcpu_balloon_requests_are_honoured") {
        honoured("kvm-1", "kvm", 1);
    }
}

#[test]
fn kvm_two_vcpus_balloon_requests_are_honoured() {
    if kvm_or_skip("kvm_two_vcpus_balloon_requests_are_honoured") {
        honoured("kvm-2", "kvm", 2);
    }
}

#[test]
fn soft_inhibited_balloon_drops_requests() {
    dropped("soft-inhibited", "soft");
}

#[test]
fn kvm_inhibited_balloon_drops_requests() {
    if kvm_or_skip("kvm_inhibited_balloon_drops_requests") {
        dropped("kvm-inhibited", "kvm");
    }
}

#[test]
fn x_balloon_inhibit_checks_its_arguments() {
    let mut vm = start("inhibit-args", "soft", 1, true);
    for (args, says) in [
        (json!({}), "Parameter 'inhibit' is missing"),
        (
            json!({ "inhibit": 1 }),
            "Invalid parameter type for 'inhibit', expected: boolean",
        ),
        (
            json!({ "inhibit": true, "why": "x" }),
            "Parameter 'why' is unexpected",
        ),
    ] {
        let (class, desc) = vm.execute("x-balloon-inhibit", args.clone()).unwrap_err();
        assert_eq!(
            (class.as_str(), desc.as_str()),
            ("GenericError", says),
            "{args}"
        );
    }
    assert_eq!(vm.info()["balloon"]["inhibited"], false);
}
