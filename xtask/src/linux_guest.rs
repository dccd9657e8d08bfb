//! `cargo xtask linux-guest`: the project's Linux test guest, made on a fresh Debian
//! machine with nothing installed by hand, and cached.
//!
//! 1. `apt-cache depends linux-image-amd64` names Debian's current kernel package
//!    (after an `apt-get update` when the package lists are empty);
//! 2. `apt-get download` fetches it and `busybox-static` into `OUT/debs`;
//! 3. `dpkg-deb` takes `/boot/vmlinuz-*` out of the kernel package (the bzImage) and
//!    `/bin/busybox` out of busybox-static;
//! 4. `rustc -C target-feature=+crt-static` builds the workload
//!    (`guests/linux/workload.rs`: dirties memory pass after pass, checks it, prints
//!    its progress; `workload now` prints the guest's clock with nanoseconds);
//! 5. an initramfs (`newc` cpio, uncompressed) is written with `guests/linux/init`,
//!    busybox, the workload and `/dev/console`.
//!
//! The result is `OUT/bzImage` and `OUT/initramfs.cpio` (`OUT` is `target/linux-guest`
//! unless `--out` says otherwise), with `OUT/manifest.txt` naming the packages. A
//! second run reuses the downloads and rebuilds the initramfs only when its inputs
//! changed. Where this is not Debian (no `apt-get` or `dpkg-deb`), it fails saying how
//! to pass a kernel instead: [`KERNEL_ENV`] and [`INITRD_ENV`], which the tests read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::linux::{INITRD_ENV, KERNEL_ENV};

/// `cargo xtask linux-guest`'s command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to put bzImage, initramfs.cpio and the downloads (default:
    /// target/linux-guest, where the tests look).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// The metapackage that depends on Debian's current kernel.
const KERNEL_META: &str = "linux-image-amd64";
/// busybox, statically linked.
const BUSYBOX: &str = "busybox-static";

/// Runs the command.
pub fn main(a: &Args) -> Result<bool, String> {
    let out = a.out.clone().unwrap_or_else(e2e::linux::default_dir);
    let (kernel, initrd) = build(&out)?;
    println!("{}", kernel.display());
    println!("{}", initrd.display());
    Ok(true)
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// How to go on where this machine cannot make the guest.
pub fn how_to_pass_a_kernel() -> String {
    format!(
        "set {KERNEL_ENV}=/path/to/bzImage and {INITRD_ENV}=/path/to/initramfs (with /init \
         starting a shell on ttyS0 and /bin/workload from guests/linux), or run \
         `cargo xtask linux-guest` on Debian"
    )
}

/// Runs `cmd`, failing with its stderr.
fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// The kernel package `linux-image-amd64` depends on.
fn kernel_package() -> Result<String, String> {
    let find = || -> Result<Option<String>, String> {
        let out = run(
            Command::new("apt-cache").args(["depends", KERNEL_META]),
            "apt-cache depends",
        )
        .unwrap_or_default();
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
            .map(str::to_owned))
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    eprintln!("linux-guest: apt-get update (the package lists know no {KERNEL_META})");
    run(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    find()?.ok_or_else(|| format!("Debian's package lists have no {KERNEL_META}"))
}

/// The one file in `dir` whose name starts with `prefix` and ends in `.deb`.
fn deb(dir: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
}

/// Builds (or finds cached) `bzImage` and `initramfs.cpio` in `out`.
pub fn build(out: &Path) -> Result<(PathBuf, PathBuf), String> {
    for tool in ["apt-get", "apt-cache", "dpkg-deb", "tar"] {
        if !have(tool) {
            return Err(format!(
                "making the Linux guest needs Debian's {tool}, which this machine lacks: {}",
                how_to_pass_a_kernel()
            ));
        }
    }
    let debs = out.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    let kpkg = match std::fs::read_to_string(out.join("kernel-package")) {
        Ok(p) if deb(&debs, &format!("{}_", p.trim())).is_some() => p.trim().to_owned(),
        _ => kernel_package()?,
    };
    let kdeb_prefix = format!("{kpkg}_");
    if deb(&debs, &kdeb_prefix).is_none() || deb(&debs, &format!("{BUSYBOX}_")).is_none() {
        eprintln!(
            "linux-guest: apt-get download {kpkg} {BUSYBOX} into {}",
            debs.display()
        );
        run(
            Command::new("apt-get")
                .args(["download", &kpkg, BUSYBOX])
                .current_dir(&debs),
            "apt-get download",
        )?;
    }
    std::fs::write(out.join("kernel-package"), &kpkg).map_err(|e| e.to_string())?;
    let kdeb = deb(&debs, &kdeb_prefix).ok_or("the kernel package was not downloaded")?;
    let bdeb = deb(&debs, &format!("{BUSYBOX}_")).ok_or("busybox-static was not downloaded")?;

    let kernel = out.join("bzImage");
    let initrd = out.join("initramfs.cpio");
    let sources = [
        root().join("guests/linux/init"),
        root().join("guests/linux/workload.rs"),
    ];
    let stamp = format!(
        "{}\n{}\n{}\n",
        kdeb.display(),
        bdeb.display(),
        sources
            .iter()
            .map(|p| std::fs::read(p).map(|b| format!("{}:{}", p.display(), fnv(&b))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("reading guests/linux: {e}"))?
            .join("\n")
    );
    let manifest = out.join("manifest.txt");
    if kernel.is_file()
        && initrd.is_file()
        && std::fs::read_to_string(&manifest).is_ok_and(|m| m == stamp)
    {
        eprintln!("linux-guest: cached in {}", out.display());
        return Ok((kernel, initrd));
    }

    let x = out.join("x");
    let _ = std::fs::remove_dir_all(&x);
    std::fs::create_dir_all(&x).map_err(|e| e.to_string())?;
    // Only the bzImage out of the kernel package (its modules are not needed).
    let tar = run(
        Command::new("dpkg-deb").arg("--fsys-tarfile").arg(&kdeb),
        "dpkg-deb --fsys-tarfile",
    )?;
    let mut child = Command::new("tar")
        .args(["-x", "--wildcards", "./boot/vmlinuz-*"])
        .current_dir(&x)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("tar has no stdin")?
        .write_all(&tar)
        .map_err(|e| format!("tar: {e}"))?;
    let st = child.wait().map_err(|e| format!("tar: {e}"))?;
    if !st.success() {
        return Err(format!(
            "tar could not take /boot/vmlinuz-* out of {}",
            kdeb.display()
        ));
    }
    let vmlinuz = std::fs::read_dir(x.join("boot"))
        .map_err(|e| format!("{}: {e}", x.join("boot").display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or("no /boot/vmlinuz-* in the kernel package")?;
    std::fs::copy(&vmlinuz, &kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(&bdeb).arg(&x),
        "dpkg-deb -x busybox-static",
    )?;
    let busybox = std::fs::read(x.join("bin/busybox")).map_err(|e| format!("busybox: {e}"))?;

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let workload_bin = x.join("workload");
    eprintln!("linux-guest: building the workload (static) with {rustc}");
    run(
        Command::new(&rustc)
            .args([
                "--edition",
                "2021",
                "-O",
                "-C",
                "target-feature=+crt-static",
            ])
            .args(["-C", "debuginfo=0", "-C", "strip=symbols", "-o"])
            .arg(&workload_bin)
            .arg(&sources[1]),
        "building guests/linux/workload.rs",
    )?;
    let workload = std::fs::read(&workload_bin).map_err(|e| e.to_string())?;
    let init = std::fs::read(&sources[0]).map_err(|e| e.to_string())?;

    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "root"] {
        cpio.dir(d);
    }
    // The console the kernel opens for /init before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, &init);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("bin/workload", 0o755, &workload);
    std::fs::write(&initrd, cpio.finish()).map_err(|e| format!("{}: {e}", initrd.display()))?;
    std::fs::write(&manifest, stamp).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&x);
    eprintln!(
        "linux-guest: {} ({kpkg}) and {} ({BUSYBOX}, guests/linux/init, workload)",
        kernel.display(),
        initrd.display()
    );
    Ok((kernel, initrd))
}

/// FNV-1a, to notice a changed source.
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A `newc` cpio archive (what the kernel unpacks as an initramfs), written in memory.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170_000 == 0o040_000 { 2 } else { 1 },
            0, // mtime
            u32::try_from(body.len()).unwrap_or(u32::MAX),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name_len).unwrap_or(u32::MAX),
            0, // checksum
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), body);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_four_byte_aligned() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let a = c.finish();
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        // The first header: 6 + 13 * 8 bytes, then "bin\0", padded to 4.
        assert_eq!(&a[110..114], b"bin\0");
        let init_at = a.windows(5).position(|w| w == b"init\0").unwrap();
        assert_eq!(&a[init_at - 110..init_at - 104], b"070701");
        // mode 0100755 in hex, the second field.
        assert_eq!(&a[init_at - 110 + 14..init_at - 110 + 22], b"000081ed");
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
