//! Runs `examples/embed.rs`, the VMM that is not demovm, as a user would, and
//! checks that it migrated its VM and said what it checked.

use std::path::PathBuf;
use std::process::Command;

/// The example as cargo built it for this test run (`cargo test` builds the
/// examples of the package beside the test executables).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    profile.join("examples").join("embed")
}

fn run(accel: Option<&str>) -> String {
    let path = example();
    assert!(
        path.is_file(),
        "{} is missing: cargo test builds the examples",
        path.display()
    );
    let mut cmd = Command::new(&path);
    if let Some(a) = accel {
        cmd.env("EMBED_ACCEL", a);
    }
    let out = cmd.output().expect("the example runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "embed failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for what in [
        "ok: source: completed",
        "ok: destination: completed",
        "ok: RAM equal on both sides",
        "ok: the doorbell's state arrived",
        "ok: the guest goes on at the destination",
        "every check passed",
    ] {
        assert!(stdout.contains(what), "no {what:?} in:\n{stdout}");
    }
    stdout
}

#[test]
fn the_embed_example_migrates_its_vm() {
    let out = run(None);
    let kvm = vmm_glue::kvm::host_facts().is_ok();
    if kvm {
        assert!(out.contains("vCPUs: kvm"), "KVM works here: {out}");
    } else {
        assert_ne!(
            std::env::var("REQUIRE_KVM").as_deref(),
            Ok("1"),
            "KVM required (REQUIRE_KVM=1): {}",
            vmm_glue::kvm::host_report()
        );
        eprintln!(
            "\n*** SKIPPED embed on KVM: no usable /dev/kvm; it ran on its stand-in vCPU ***\n"
        );
    }
}

#[test]
fn the_embed_example_migrates_its_stand_in_vcpu() {
    let out = run(Some("soft"));
    assert!(out.contains("vCPUs: thread"), "{out}");
}
