//! Compiles a C probe against the system's `<linux/userfaultfd.h>` and compares every
//! number it defines with the hand-written ABI. Constants newer than the installed
//! headers are compared where the headers define them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use uffd_sys::abi;

#[test]
fn abi_matches_the_system_headers() {
    let test = "abi_matches_the_system_headers";
    let header = std::path::Path::new("/usr/include/linux/userfaultfd.h");
    if !header.exists() {
        // Not a userfaultfd absence: headers are optional, so no REQUIRE_UFFD failure.
        std::io::Write::write_all(
            &mut std::io::stderr(),
            format!(
                "\n*** SKIPPED {test}: {} is not installed ***\n",
                header.display()
            )
            .as_bytes(),
        )
        .unwrap();
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = std::env::temp_dir().join(format!("uffd-sys-cprobe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("probe.c");
    let exe = dir.join("probe");
    let mut c = String::from(
        "#include <stdio.h>\n#include <sys/ioctl.h>\n#include <linux/userfaultfd.h>\nint main(void) {\n",
    );
    let names = [
        "USERFAULTFD_IOC_NEW",
        "UFFDIO_API",
        "UFFDIO_REGISTER",
        "UFFDIO_UNREGISTER",
        "UFFDIO_WAKE",
        "UFFDIO_COPY",
        "UFFDIO_ZEROPAGE",
        "UFFDIO_MOVE",
        "UFFDIO_WRITEPROTECT",
        "UFFDIO_CONTINUE",
        "UFFDIO_POISON",
        "UFFD_API",
        "UFFD_EVENT_PAGEFAULT",
        "UFFD_EVENT_FORK",
        "UFFD_EVENT_REMAP",
        "UFFD_EVENT_REMOVE",
        "UFFD_EVENT_UNMAP",
        "UFFD_PAGEFAULT_FLAG_WRITE",
        "UFFD_PAGEFAULT_FLAG_WP",
        "UFFD_PAGEFAULT_FLAG_MINOR",
        "UFFDIO_REGISTER_MODE_MISSING",
        "UFFDIO_REGISTER_MODE_WP",
        "UFFDIO_REGISTER_MODE_MINOR",
        "UFFDIO_COPY_MODE_DONTWAKE",
        "UFFDIO_COPY_MODE_WP",
        "UFFDIO_ZEROPAGE_MODE_DONTWAKE",
        "UFFDIO_WRITEPROTECT_MODE_WP",
        "UFFDIO_WRITEPROTECT_MODE_DONTWAKE",
        "UFFDIO_CONTINUE_MODE_DONTWAKE",
        "UFFDIO_CONTINUE_MODE_WP",
    ];
    for n in names {
        c.push_str(&format!(
            "#ifdef {n}\n printf(\"{n} %llu\\n\", (unsigned long long)({n}));\n#endif\n"
        ));
    }
    for s in [
        "uffdio_api",
        "uffdio_range",
        "uffdio_register",
        "uffdio_copy",
        "uffdio_zeropage",
        "uffdio_writeprotect",
        "uffdio_continue",
        "uffd_msg",
    ] {
        c.push_str(&format!(
            " printf(\"sizeof_{s} %zu\\n\", sizeof(struct {s}));\n"
        ));
    }
    for (name, _) in uffd_sys::Features::all().iter_names() {
        let n = format!("UFFD_FEATURE_{name}");
        c.push_str(&format!(
            "#ifdef {n}\n printf(\"{n} %llu\\n\", (unsigned long long)({n}));\n#endif\n"
        ));
    }
    c.push_str(" return 0;\n}\n");
    std::fs::write(&src, c).unwrap();
    let built = Command::new(&cc).arg("-o").arg(&exe).arg(&src).output();
    match built {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the C probe does not compile: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("\n*** SKIPPED {test}: no C compiler ({cc}: {e}) ***\n").as_bytes(),
            )
            .unwrap();
            return;
        }
    }
    let out = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8(out.stdout).unwrap();

    let ours = |name: &str| -> Option<u64> {
        use std::mem::size_of;
        Some(match name {
            "USERFAULTFD_IOC_NEW" => abi::USERFAULTFD_IOC_NEW,
            "UFFDIO_API" => abi::UFFDIO_API,
            "UFFDIO_REGISTER" => abi::UFFDIO_REGISTER,
            "UFFDIO_UNREGISTER" => abi::UFFDIO_UNREGISTER,
            "UFFDIO_WAKE" => abi::UFFDIO_WAKE,
            "UFFDIO_COPY" => abi::UFFDIO_COPY,
            "UFFDIO_ZEROPAGE" => abi::UFFDIO_ZEROPAGE,
            "UFFDIO_MOVE" => abi::UFFDIO_MOVE,
            "UFFDIO_WRITEPROTECT" => abi::UFFDIO_WRITEPROTECT,
            "UFFDIO_CONTINUE" => abi::UFFDIO_CONTINUE,
            "UFFDIO_POISON" => abi::UFFDIO_POISON,
            "UFFD_API" => abi::UFFD_API,
            "UFFD_EVENT_PAGEFAULT" => abi::UFFD_EVENT_PAGEFAULT.into(),
            "UFFD_EVENT_FORK" => abi::UFFD_EVENT_FORK.into(),
            "UFFD_EVENT_REMAP" => abi::UFFD_EVENT_REMAP.into(),
            "UFFD_EVENT_REMOVE" => abi::UFFD_EVENT_REMOVE.into(),
            "UFFD_EVENT_UNMAP" => abi::UFFD_EVENT_UNMAP.into(),
            "UFFD_PAGEFAULT_FLAG_WRITE" => abi::UFFD_PAGEFAULT_FLAG_WRITE,
            "UFFD_PAGEFAULT_FLAG_WP" => abi::UFFD_PAGEFAULT_FLAG_WP,
            "UFFD_PAGEFAULT_FLAG_MINOR" => abi::UFFD_PAGEFAULT_FLAG_MINOR,
            "UFFDIO_REGISTER_MODE_MISSING" => abi::UFFDIO_REGISTER_MODE_MISSING,
            "UFFDIO_REGISTER_MODE_WP" => abi::UFFDIO_REGISTER_MODE_WP,
            "UFFDIO_REGISTER_MODE_MINOR" => abi::UFFDIO_REGISTER_MODE_MINOR,
            "UFFDIO_COPY_MODE_DONTWAKE" => abi::UFFDIO_COPY_MODE_DONTWAKE,
            "UFFDIO_COPY_MODE_WP" => abi::UFFDIO_COPY_MODE_WP,
            "UFFDIO_ZEROPAGE_MODE_DONTWAKE" => abi::UFFDIO_ZEROPAGE_MODE_DONTWAKE,
            "UFFDIO_WRITEPROTECT_MODE_WP" => abi::UFFDIO_WRITEPROTECT_MODE_WP,
            "UFFDIO_WRITEPROTECT_MODE_DONTWAKE" => abi::UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
            "UFFDIO_CONTINUE_MODE_DONTWAKE" => abi::UFFDIO_CONTINUE_MODE_DONTWAKE,
            "UFFDIO_CONTINUE_MODE_WP" => abi::UFFDIO_CONTINUE_MODE_WP,
            "sizeof_uffdio_api" => size_of::<abi::uffdio_api>() as u64,
            "sizeof_uffdio_range" => size_of::<abi::uffdio_range>() as u64,
            "sizeof_uffdio_register" => size_of::<abi::uffdio_register>() as u64,
            "sizeof_uffdio_copy" => size_of::<abi::uffdio_copy>() as u64,
            "sizeof_uffdio_zeropage" => size_of::<abi::uffdio_zeropage>() as u64,
            "sizeof_uffdio_writeprotect" => size_of::<abi::uffdio_writeprotect>() as u64,
            "sizeof_uffdio_continue" => size_of::<abi::uffdio_continue>() as u64,
            "sizeof_uffd_msg" => size_of::<abi::uffd_msg>() as u64,
            n if n.starts_with("UFFD_FEATURE_") => {
                uffd_sys::Features::from_name(&n["UFFD_FEATURE_".len()..])?.bits()
            }
            _ => return None,
        })
    };
    let mut compared = 0;
    for line in out.lines() {
        let (name, value) = line.split_once(' ').unwrap();
        let theirs: u64 = value.parse().unwrap();
        let ours = ours(name).unwrap_or_else(|| panic!("the probe printed unknown {name}"));
        assert_eq!(ours, theirs, "{name}: ours {ours:#x}, headers {theirs:#x}");
        compared += 1;
    }
    // The oldest headers with USERFAULTFD_IOC_NEW (6.1) define at least these many.
    assert!(compared >= 40, "only {compared} values compared:\n{out}");
}
