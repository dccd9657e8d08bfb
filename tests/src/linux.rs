//! Linux guests: where the test image is, and the scenarios that migrate a running
//! Linux kernel between two `demovm` processes.
//!
//! The image is Debian's kernel and an initramfs with busybox and the project's
//! workload (`guests/linux`), made by `cargo xtask linux-guest` into
//! `target/linux-guest`, or given with [`KERNEL_ENV`] and [`INITRD_ENV`].

use std::path::PathBuf;

use crate::Failure;

/// The environment variable naming a bzImage to use instead of the cached one.
pub const KERNEL_ENV: &str = "DEMOVM_LINUX_KERNEL";
/// The environment variable naming the initramfs that goes with [`KERNEL_ENV`].
pub const INITRD_ENV: &str = "DEMOVM_LINUX_INITRD";

/// Where `cargo xtask linux-guest` puts the image: `linux-guest` in the target
/// directory (`CARGO_TARGET_DIR`, else `target` at the top of the workspace).
pub fn default_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
        .join("linux-guest")
}

/// The Linux test image: bzImage and initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The image: from [`KERNEL_ENV`] and [`INITRD_ENV`], else the cached one.
/// Missing, it is a loud skip that says how to get one (a failure with
/// `REQUIRE_LINUX=1`).
pub fn image() -> Result<Image, Failure> {
    let (kernel, initrd) = match (std::env::var_os(KERNEL_ENV), std::env::var_os(INITRD_ENV)) {
        (Some(k), Some(i)) => (PathBuf::from(k), PathBuf::from(i)),
        (None, None) => {
            let d = default_dir();
            (d.join("bzImage"), d.join("initramfs.cpio"))
        }
        _ => {
            return Err(Failure::Failed(format!(
                "set both {KERNEL_ENV} and {INITRD_ENV}, or neither"
            )))
        }
    };
    if kernel.is_file() && initrd.is_file() {
        return Ok(Image { kernel, initrd });
    }
    let why = format!(
        "no Linux guest image at {} and {}: run `cargo xtask linux-guest` (Debian: it \
         fetches the kernel and busybox-static with apt-get download), or set {KERNEL_ENV} \
         and {INITRD_ENV}",
        kernel.display(),
        initrd.display()
    );
    if std::env::var("REQUIRE_LINUX").as_deref() == Ok("1") {
        Err(Failure::Failed(format!("{why} (REQUIRE_LINUX=1)")))
    } else {
        Err(Failure::Skipped(why))
    }
}
