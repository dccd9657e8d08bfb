//! The KVM ABI that kvm-ioctls does not wrap: `KVM_RUN` (issued on our own
//! `kvm_run` mapping so another thread may set `immediate_exit`),
//! `KVM_CLEAR_DIRTY_LOG`, `KVM_RESET_DIRTY_RINGS` and the dirty ring entry
//! flags, from `include/uapi/linux/kvm.h`.
//!
//! Each request is encoded by vmm-sys-util (`ioctl_expr`, the `const fn`
//! its ioctl macros expand to) and asserted at compile time against the
//! `_IOC` formula written out here and the number the kernel header gives;
//! a unit test checks that the macros themselves agree. Struct sizes and field offsets are
//! asserted too, so a kvm-bindings layout change stops the build.

use std::mem::{offset_of, size_of};
use std::os::raw::c_ulong;

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn, kvm_run};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// The KVM ioctl type (`KVMIO`).
const KVMIO: u32 = 0xAE;

/// `_IOC(dir, KVMIO, nr, size)` written out, to check vmm-sys-util's
/// encoding independently.
const fn ioc(dir: u32, nr: u32, size: usize) -> c_ulong {
    // The size field has 14 bits; every struct here is far smaller.
    ((dir << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr) as c_ulong
}

/// `_IO(KVMIO, 0x80)`.
pub(crate) const KVM_RUN: c_ulong = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0);
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub(crate) const KVM_CLEAR_DIRTY_LOG: c_ulong = ioctl_expr(
    _IOC_READ | _IOC_WRITE,
    KVMIO,
    0xc0,
    size_of::<kvm_clear_dirty_log>() as u32,
);
/// `_IO(KVMIO, 0xc7)`.
pub(crate) const KVM_RESET_DIRTY_RINGS: c_ulong = ioctl_expr(_IOC_NONE, KVMIO, 0xc7, 0);

// vmm-sys-util's encoding, the formula, and the values of linux/kvm.h on
// x86_64 agree.
const _: () = assert!(KVM_RUN == ioc(0, 0x80, 0) && KVM_RUN == 0xae80);
const _: () = assert!(
    KVM_CLEAR_DIRTY_LOG == ioc(3, 0xc0, size_of::<kvm_clear_dirty_log>())
        && KVM_CLEAR_DIRTY_LOG == 0xc018_aec0
);
const _: () = assert!(KVM_RESET_DIRTY_RINGS == ioc(0, 0xc7, 0) && KVM_RESET_DIRTY_RINGS == 0xaec7);

// struct kvm_clear_dirty_log { __u32 slot; __u32 num_pages; __u64 first_page;
// union { void *dirty_bitmap; __u64 padding2; }; }
const _: () = assert!(size_of::<kvm_clear_dirty_log>() == 24);
const _: () = assert!(offset_of!(kvm_clear_dirty_log, slot) == 0);
const _: () = assert!(offset_of!(kvm_clear_dirty_log, num_pages) == 4);
const _: () = assert!(offset_of!(kvm_clear_dirty_log, first_page) == 8);
const _: () = assert!(offset_of!(kvm_clear_dirty_log, __bindgen_anon_1) == 16);

// struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; }
const _: () = assert!(size_of::<kvm_dirty_gfn>() == 16);
const _: () = assert!(offset_of!(kvm_dirty_gfn, flags) == 0);
const _: () = assert!(offset_of!(kvm_dirty_gfn, slot) == 4);
const _: () = assert!(offset_of!(kvm_dirty_gfn, offset) == 8);

// struct kvm_run: immediate_exit is byte 1, exit_reason at 8, the exit
// union at 32.
const _: () = assert!(offset_of!(kvm_run, immediate_exit) == 1);
const _: () = assert!(offset_of!(kvm_run, exit_reason) == 8);
const _: () = assert!(offset_of!(kvm_run, __bindgen_anon_1) == 32);

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry is dirty, for userspace to harvest.
pub(crate) const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: harvested, for `KVM_RESET_DIRTY_RINGS` to
/// recycle.
pub(crate) const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// The same requests through vmm-sys-util's macros (compared in a test).
#[cfg(test)]
mod macros {
    use kvm_bindings::kvm_clear_dirty_log;
    use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

    use super::KVMIO;

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_agree_with_the_header_values() {
        assert_eq!(macros::KVM_RUN(), KVM_RUN);
        assert_eq!(macros::KVM_CLEAR_DIRTY_LOG(), KVM_CLEAR_DIRTY_LOG);
        assert_eq!(macros::KVM_RESET_DIRTY_RINGS(), KVM_RESET_DIRTY_RINGS);
    }

    /// Compiles a C probe against the system's `<linux/kvm.h>` and compares
    /// what it defines with the constants and layouts above.
    #[test]
    fn abi_matches_the_system_headers() {
        let header = std::path::Path::new("/usr/include/linux/kvm.h");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        if !header.exists() {
            eprintln!(
                "\n*** SKIPPED abi_matches_the_system_headers: no {} ***",
                header.display()
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmm-glue-kvm-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, exe) = (dir.join("probe.c"), dir.join("probe"));
        let probe = r#"#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
int main(void) {
    printf("%lu %lu %lu %lu %lu %lu %lu %lu %lu\n",
        (unsigned long)KVM_RUN, (unsigned long)KVM_CLEAR_DIRTY_LOG,
        (unsigned long)KVM_RESET_DIRTY_RINGS, (unsigned long)KVM_DIRTY_GFN_F_DIRTY,
        (unsigned long)KVM_DIRTY_GFN_F_RESET, (unsigned long)KVM_DIRTY_LOG_PAGE_OFFSET,
        (unsigned long)sizeof(struct kvm_clear_dirty_log),
        (unsigned long)sizeof(struct kvm_dirty_gfn),
        (unsigned long)offsetof(struct kvm_run, immediate_exit));
    return 0;
}
"#;
        std::fs::write(&src, probe).unwrap();
        let built = std::process::Command::new(&cc)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status();
        if !built.map(|s| s.success()).unwrap_or(false) {
            eprintln!(
                "\n*** SKIPPED abi_matches_the_system_headers: {cc} cannot build the probe ***"
            );
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let out = std::process::Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let got: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let want = [
            KVM_RUN,
            KVM_CLEAR_DIRTY_LOG,
            KVM_RESET_DIRTY_RINGS,
            u64::from(KVM_DIRTY_GFN_F_DIRTY),
            u64::from(KVM_DIRTY_GFN_F_RESET),
            u64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET),
            size_of::<kvm_clear_dirty_log>() as u64,
            size_of::<kvm_dirty_gfn>() as u64,
            offset_of!(kvm_run, immediate_exit) as u64,
        ];
        assert_eq!(got, want);
    }
}
