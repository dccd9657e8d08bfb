//! `demovm`'s command line, as a user meets it: help on stdout, clear errors
//! with a non-zero exit, and never a silent fallback from `--accel kvm`.

use std::process::{Command, Output};

fn demovm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_demovm"))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    let o = demovm().arg("--help").output().expect("demovm runs");
    let (out, _) = text(&o);
    assert!(o.status.success(), "{o:?}");
    for flag in [
        "--mem",
        "--vcpus",
        "--guest",
        "--qmp",
        "--serial",
        "--incoming",
        "--accel",
        "--dirty-ring",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help:\n{out}");
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let o = demovm().output().expect("demovm runs");
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--mem"), "{o:?}");

    let o = demovm()
        .args(["--mem", "12X"])
        .output()
        .expect("demovm runs");
    assert!(!o.status.success());
    assert!(text(&o).1.contains("bad size"), "{o:?}");

    let dir = std::env::temp_dir().join(format!("demovm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("short.bin");
    std::fs::write(&short, [0u8; 100]).unwrap();
    let unsigned = dir.join("unsigned.bin");
    std::fs::write(&unsigned, [0u8; 512]).unwrap();
    for (file, why) in [
        (&short, "is 100 bytes, not 512"),
        (&unsigned, "no boot signature"),
    ] {
        // --accel soft refuses boot sectors; with KVM the sector is checked.
        let o = demovm()
            .args(["--mem", "16M", "--guest"])
            .arg(file)
            .output()
            .expect("demovm runs");
        assert!(!o.status.success(), "{o:?}");
        let err = text(&o).1;
        assert!(
            err.contains(why) || err.contains("need KVM"),
            "{}: {err}",
            file.display()
        );
    }
    let signed = dir.join("signed.bin");
    let mut sector = [0u8; 512];
    sector[510..].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(&signed, sector).unwrap();
    let o = demovm()
        .args(["--mem", "16M", "--accel", "soft", "--guest"])
        .arg(&signed)
        .output()
        .expect("demovm runs");
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("boot-sector and Linux guests need KVM"),
        "{o:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs demovm where `/dev/kvm` is not KVM: a mount namespace of its own with
/// /dev/null over /dev/kvm (root and util-linux's `unshare` needed).
fn without_kvm(args: &str) -> Option<Output> {
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec timeout 3 {} {args}",
        env!("CARGO_BIN_EXE_demovm")
    );
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output();
    match o {
        Ok(o) if !String::from_utf8_lossy(&o.stderr).contains("mount:") => Some(o),
        other => {
            eprintln!(
                "\n*** SKIPPED demovm without KVM: cannot hide /dev/kvm in a mount namespace \
                 (root and unshare needed): {other:?} ***\n"
            );
            None
        }
    }
}

#[test]
fn accel_kvm_without_kvm_is_an_error_and_auto_says_soft() {
    let Some(o) = without_kvm("--mem 16M --accel kvm") else {
        return;
    };
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--accel kvm: KVM is not usable here"), "{err}");
    // auto: soft vCPUs, and the banner says why (timeout ends the VM).
    let Some(o) = without_kvm("--mem 16M") else {
        return;
    };
    let err = text(&o).1;
    assert!(err.contains("accel soft [KVM is not usable here"), "{err}");
}
