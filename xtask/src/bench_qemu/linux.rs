//! The Linux row of `cargo xtask bench --vs-qemu` (`--only vs-qemu-linux`): the
//! project's Linux test image live-migrated by QEMU and by `demovm`, driven by the same
//! [`super::migrate_once`] as the `ab` row.
//!
//! The guest is the image of `cargo xtask linux-guest` (Debian's kernel, an initramfs
//! with busybox and the project's workload; [`e2e::linux::image`] finds it) with the
//! e2e Linux scenarios' parameters: [`VCPUS`] vCPUs, [`MEM_MIB`] MiB, the workload
//! dirtying [`WORKLOAD_MIB`] MiB pass after pass with a [`WORKLOAD_PAUSE_MS`] ms pause
//! and printing `workload: pass N ok` on the console (COM1, a file on both sides):
//!
//! ```text
//! qemu-system-x86_64 -enable-kvm -cpu host -smp 2 -m 256 -nodefaults \
//!     -kernel BZIMAGE -initrd INITRAMFS -append "QEMU_CMDLINE" \
//!     -display none -serial file:SERIAL -qmp unix:SOCKET,server=on,wait=off [-incoming URI]
//! demovm --mem 256M --vcpus 2 --kernel BZIMAGE --initrd INITRAMFS --cmdline "CMDLINE" \
//!     --qmp SOCKET --serial SERIAL [--incoming URI]
//! ```
//!
//! `CMDLINE` is `demovm`'s default command line (`console=ttyS0`, `acpi=off`,
//! `pci=off`, ...) plus `workload=64,200`; `QEMU_CMDLINE` is the same without
//! `acpi=off` ([`qemu_cmdline`]): QEMU's guest finds its CPUs in the MP table that
//! SeaBIOS writes or in QEMU's ACPI tables, and in kvm-box SeaBIOS's table listed one
//! CPU (with `acpi=off` the guest said "Allowing 1 CPUs"), so QEMU's guest keeps ACPI.
//! `-cpu host` gives QEMU's guest KVM's supported CPUID, as `demovm` gives its guest;
//! `-nodefaults` leaves out QEMU's default VGA card, NIC, parallel port and drives,
//! which `demovm` lacks too. QEMU still boots the kernel through SeaBIOS and its
//! linuxboot option ROM, with a PCI host bridge the guest does not probe (`pci=off`);
//! its extra RAM (BIOS, ROMs, ACPI tables) shows in `ram.total`, in the note.
//!
//! A round starts the source, waits for the guest's shell and a first workload pass,
//! sets [`LIMITS`] with `migrate-set-parameters` and migrates over loopback TCP. It
//! counts only when the source says `completed`, the destination's `query-status` says
//! `running` and its console prints a workload pass after the source's last one. Three
//! rounds each, alternating, QEMU first; the figures are demovm's medians of
//! `total-time`, `downtime` and `ram.transferred`, QEMU's as the baseline.
//!
//! Where `/dev/kvm` is PVM (module `kvm_pvm`), Linux does not boot: `demovm`'s fails
//! with an emulation failure, QEMU's prints nothing on its console (and `-cpu host`
//! stops QEMU at once: "failed to set MSR 0x10a"). There `cargo xtask bench` runs this
//! row in kvm-box ([`box_path`], with `KVM_BOX_FORCE=1`, and `KVM_BOX_CPUS=1` unless
//! set, as `.ci/run` does: the box's kernel crashed under TCG with 2). It starts its own
//! executable there with `bench --only vs-qemu-linux`, [`OUT_ENV`] naming a file under
//! the target directory (the box shares this machine's files but not its `/tmp`), and
//! `DEMOVM_BIN` and the image's paths; the child measures on the box's nested KVM and
//! writes its reports to the file as JSON; the parent prints them with "in kvm-box
//! (nested KVM under TCG), KVM_BOX_CPUS=1" in front of the note: the box runs host
//! code 10 to 30 times slower, and the guests' vCPUs share its one CPU, so these
//! ratios are not bare-metal ones. Without the box the row is SKIPPED with the reason;
//! without QEMU or the image, too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use e2e::linux::Image;
use e2e::Failure;
use serde::{Deserialize, Serialize};
use vmm_glue::boot::linux::DEFAULT_CMDLINE;

use super::{
    alternate, find_qemu, kvm_unusable, med, qemu_version, row_figures, Guest, Launcher, Limits,
    Scratch, Vmm, DOWNTIME_LIMIT_MS, MAX_BANDWIDTH,
};
use crate::bench::{Figure, Report};

/// Guest RAM in MiB (the e2e Linux scenarios').
pub(crate) const MEM_MIB: u64 = e2e::linux::MEM_MIB;
/// vCPUs.
pub(crate) const VCPUS: usize = e2e::linux::VCPUS;
/// MiB the workload dirties, pass after pass.
pub(crate) const WORKLOAD_MIB: u64 = e2e::linux::WORKLOAD_MIB;
/// Milliseconds the workload sleeps between passes.
pub(crate) const WORKLOAD_PAUSE_MS: u64 = e2e::linux::WORKLOAD_PAUSE_MS;
/// The parameters both VMMs get: the ab row's (in kvm-box too, both VMMs converge
/// within them while the workload runs).
pub(crate) const LIMITS: Limits = Limits {
    max_bandwidth: MAX_BANDWIDTH,
    downtime_limit_ms: DOWNTIME_LIMIT_MS,
};
/// Prefix of the figure names.
const PREFIX: &str = "vs_qemu.linux_2cpu_256m";
/// Set in the child run in kvm-box: the file its reports go to, as JSON.
pub const OUT_ENV: &str = "XTASK_VS_QEMU_LINUX_OUT";
/// Overrides where kvm-box's `run` script is.
pub const BOX_ENV: &str = "KVM_BOX_RUN";
/// What the notes of figures measured in kvm-box start with.
const IN_BOX: &str = "in kvm-box (nested KVM under TCG)";

/// `demovm`'s kernel command line: its default and the workload's parameters.
pub(crate) fn demovm_cmdline() -> String {
    format!("{DEFAULT_CMDLINE} workload={WORKLOAD_MIB},{WORKLOAD_PAUSE_MS}")
}

/// QEMU's kernel command line: `demovm`'s without `acpi=off` (see the module
/// documentation).
pub(crate) fn qemu_cmdline(demovm: &str) -> String {
    demovm
        .split_whitespace()
        .filter(|w| *w != "acpi=off")
        .collect::<Vec<_>>()
        .join(" ")
}

/// QEMU's machine and guest arguments (the caller adds display, serial, QMP and
/// incoming).
pub(crate) fn qemu_args(cmd: &mut Command, image: &Image) {
    cmd.arg("-enable-kvm")
        .arg("-cpu")
        .arg("host")
        .arg("-smp")
        .arg(VCPUS.to_string())
        .arg("-m")
        .arg(MEM_MIB.to_string())
        .arg("-nodefaults")
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(qemu_cmdline(&demovm_cmdline()));
}

/// `demovm`'s machine and guest arguments (the caller adds QMP, serial and incoming).
pub(crate) fn demovm_args(cmd: &mut Command, image: &Image) {
    cmd.arg("--mem")
        .arg(format!("{MEM_MIB}M"))
        .arg("--vcpus")
        .arg(VCPUS.to_string())
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&image.initrd)
        .arg("--cmdline")
        .arg(demovm_cmdline());
}

/// Whether the console output `text` shows the guest's shell and a workload pass.
pub(crate) fn ready(text: &str) -> bool {
    text.contains("linux-guest: shell ready") && e2e::linux::last_pass(text) > 0
}

/// Whether the destination's console `dst` shows a workload pass after the last one
/// the source's console `src` showed.
pub(crate) fn goes_on(src: &str, dst: &str) -> bool {
    e2e::linux::last_pass(dst) > e2e::linux::last_pass(src)
}

/// The Linux row's figures: measured here, or in kvm-box where `/dev/kvm` is PVM.
pub fn figures() -> Result<Vec<Report>, String> {
    let skip = |why: String| {
        Ok(vec![Report::Skipped {
            name: format!("{PREFIX}.*"),
            why,
        }])
    };
    let qemu = match find_qemu() {
        Ok(q) => q,
        Err(why) => return skip(why),
    };
    let image = match e2e::linux::image() {
        Ok(i) => i,
        Err(Failure::Skipped(why)) => return skip(why),
        Err(Failure::Failed(why)) => return Err(why),
    };
    let out = std::env::var_os(OUT_ENV).map(PathBuf::from);
    if out.is_none() && e2e::harness::kvm_is_pvm() {
        return in_box(&image);
    }
    let reports = match kvm_unusable() {
        None => measure(qemu, image)?,
        Some(why) => vec![Report::Skipped {
            name: format!("{PREFIX}.*"),
            why,
        }],
    };
    if let Some(out) = out {
        let json = serde_json::to_vec(&reports.iter().map(Shipped::from).collect::<Vec<_>>())
            .map_err(|e| format!("encoding the reports: {e}"))?;
        std::fs::write(&out, json).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(reports)
}

/// The row measured on this machine's KVM.
fn measure(qemu: PathBuf, image: Image) -> Result<Vec<Report>, String> {
    let demovm = e2e::harness::demovm_path()?;
    let scratch =
        Scratch(std::env::temp_dir().join(format!("xtask-vs-qemu-linux-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let version = qemu_version(&qemu);
    let guest = Guest::Linux(image.clone());
    let launchers = [
        Launcher {
            vmm: Vmm::Qemu,
            bin: qemu,
            guest: guest.clone(),
        },
        Launcher {
            vmm: Vmm::Demovm,
            bin: demovm,
            guest,
        },
    ];
    let kernel = kernel_name(&image);
    eprintln!(
        "vs-qemu-linux: {kernel}, {VCPUS} vCPUs, {MEM_MIB} MiB, workload dirtying \
         {WORKLOAD_MIB} MiB with {WORKLOAD_PAUSE_MS} ms pauses, max-bandwidth {} B/s, \
         downtime-limit {} ms, {} rounds each; {version}",
        LIMITS.max_bandwidth,
        LIMITS.downtime_limit_ms,
        super::ROUNDS
    );
    let rounds = alternate("vs-qemu-linux", &launchers, &scratch.0, LIMITS)?;
    let kvm = if e2e::harness::kvm_is_pvm() {
        "KVM (PVM, kvm_pvm)"
    } else {
        "KVM"
    };
    let note = format!(
        "{kernel} with the project's initramfs, {VCPUS} vCPUs, {MEM_MIB} MiB, workload \
         dirtying {WORKLOAD_MIB} MiB pass after pass with {WORKLOAD_PAUSE_MS} ms pauses, \
         {kvm}; value demovm, baseline {version} (-cpu host -nodefaults, booted through \
         SeaBIOS and its linuxboot ROM); same bzImage, initramfs and kernel command line \
         \"{}\", except that QEMU's lacks acpi=off (its guest finds its 2 vCPUs through \
         ACPI, demovm's through an MP table); both driven by the same QMP code: \
         migrate-set-parameters max-bandwidth {} (1 GiB/s), downtime-limit {} ms, migrate \
         over loopback TCP after the shell and a first workload pass; medians of {} rounds \
         each, alternating; every destination checked running with the workload going on \
         past the source's last pass; RAM migrated (ram.total): demovm {:.0} MiB, QEMU \
         {:.0} MiB (its BIOS, ROMs and ACPI tables too)",
        demovm_cmdline(),
        LIMITS.max_bandwidth,
        LIMITS.downtime_limit_ms,
        super::ROUNDS,
        med(&rounds[1], |r| r.ram_total_mib),
        med(&rounds[0], |r| r.ram_total_mib),
    );
    Ok(row_figures(PREFIX, &rounds, &note))
}

/// The Debian package the kernel came from (`kernel-package` beside it), else the
/// kernel's file name.
fn kernel_name(image: &Image) -> String {
    image
        .kernel
        .parent()
        .and_then(|d| std::fs::read_to_string(d.join("kernel-package")).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| image.kernel.display().to_string())
}

/// kvm-box's `run` script: [`BOX_ENV`], else `shared/kvm-box/run` beside the
/// workspace (as `.ci/run` finds it).
pub fn box_path() -> PathBuf {
    std::env::var_os(BOX_ENV).map_or_else(
        || {
            let p = PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/kvm-box/run"
            ));
            std::fs::canonicalize(&p).unwrap_or(p)
        },
        PathBuf::from,
    )
}

/// Where the child in the box writes its reports: under the target directory, which
/// the box sees (its `/tmp` is its own).
fn out_path() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let dir = std::path::absolute(target.join("bench-box"))
        .map_err(|e| format!("{}: {e}", target.display()))?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir.join(format!("vs-qemu-linux-{}.json", std::process::id())))
}

/// The command that measures the row in kvm-box: this executable, `bench --only
/// vs-qemu-linux`, with `KVM_BOX_FORCE=1` and what the child needs in its environment.
fn box_command(run: &Path, exe: &Path, demovm: &Path, image: &Image, out: &Path) -> Command {
    let mut cmd = Command::new(run);
    cmd.arg("--")
        .arg(exe)
        .args(["bench", "--only", "vs-qemu-linux"])
        .env("KVM_BOX_FORCE", "1")
        .env("KVM_BOX_CPUS", box_cpus())
        .env("DEMOVM_BIN", demovm)
        .env(e2e::linux::KERNEL_ENV, &image.kernel)
        .env(e2e::linux::INITRD_ENV, &image.initrd)
        .env(OUT_ENV, out);
    cmd
}

/// The box's CPUs: `KVM_BOX_CPUS`, else 1 (as in `.ci/run`: the box's kernel has
/// crashed under TCG with 2; the nested guest's 2 vCPUs then share one).
fn box_cpus() -> String {
    std::env::var("KVM_BOX_CPUS").unwrap_or_else(|_| "1".into())
}

/// Runs the row in kvm-box and returns the child's reports, their notes marked.
fn in_box(image: &Image) -> Result<Vec<Report>, String> {
    let run = box_path();
    if !is_executable(&run) {
        return Ok(vec![Report::Skipped {
            name: format!("{PREFIX}.*"),
            why: format!(
                "/dev/kvm is PVM (module kvm_pvm), where Linux does not boot (demovm's \
                 stops with an emulation failure, QEMU's prints nothing), and kvm-box is \
                 unavailable: no executable {} (set {BOX_ENV})",
                run.display()
            ),
        }]);
    }
    let exe = std::env::current_exe().map_err(|e| format!("this executable: {e}"))?;
    let demovm = std::path::absolute(e2e::harness::demovm_path()?)
        .map_err(|e| format!("demovm's path: {e}"))?;
    let image = Image {
        kernel: std::path::absolute(&image.kernel).map_err(|e| e.to_string())?,
        initrd: std::path::absolute(&image.initrd).map_err(|e| e.to_string())?,
    };
    let out = out_path()?;
    let _ = std::fs::remove_file(&out);
    eprintln!(
        "vs-qemu-linux: /dev/kvm is PVM, where Linux does not boot: measuring in kvm-box \
         ({}, KVM_BOX_FORCE=1, KVM_BOX_CPUS={}; slow: the box runs host code under TCG)",
        run.display(),
        box_cpus()
    );
    // The child's figures go to its stdout as well: send that to stderr, so the
    // figures are printed once on stdout, by this process.
    let stderr = std::io::stderr();
    let to_stderr = std::os::fd::AsFd::as_fd(&stderr)
        .try_clone_to_owned()
        .map_err(|e| format!("stderr: {e}"))?;
    let status = box_command(&run, &exe, &demovm, &image, &out)
        .stdin(Stdio::null())
        .stdout(Stdio::from(to_stderr))
        .status()
        .map_err(|e| format!("cannot run {}: {e}", run.display()))?;
    let read = std::fs::read(&out);
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        return Err(format!(
            "the Linux row in kvm-box failed ({status}); its output is above"
        ));
    }
    let bytes = read.map_err(|e| {
        format!(
            "kvm-box exited successfully but its reports are missing ({}: {e})",
            out.display()
        )
    })?;
    let shipped: Vec<Shipped> = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the reports from kvm-box ({}): {e}", out.display()))?;
    let where_ = format!("{IN_BOX}, KVM_BOX_CPUS={}", box_cpus());
    shipped
        .into_iter()
        .map(|s| s.into_report(&where_))
        .collect()
}

/// Whether `p` is a file with an execute bit.
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A report as the child in kvm-box hands it to its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Shipped {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    baseline: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
}

impl From<&Report> for Shipped {
    fn from(r: &Report) -> Shipped {
        match r {
            Report::Figure(f) => Shipped {
                name: f.name.clone(),
                value: Some(f.value),
                unit: Some(f.unit.to_owned()),
                baseline: f.baseline,
                note: f.note.clone(),
                skipped: None,
            },
            Report::Skipped { name, why } => Shipped {
                name: name.clone(),
                value: None,
                unit: None,
                baseline: None,
                note: None,
                skipped: Some(why.clone()),
            },
        }
    }
}

impl Shipped {
    /// The report, its note (or skip reason) prefixed with `where_`.
    fn into_report(self, where_: &str) -> Result<Report, String> {
        if let Some(why) = self.skipped {
            return Ok(Report::Skipped {
                name: self.name,
                why: format!("{where_}: {why}"),
            });
        }
        let value = self
            .value
            .ok_or_else(|| format!("report {} from kvm-box has no value", self.name))?;
        // Figure units are static: the row's are these.
        let unit = match self.unit.as_deref() {
            Some("ms") => "ms",
            Some("MiB") => "MiB",
            u => return Err(format!("report {} from kvm-box: unit {u:?}", self.name)),
        };
        let mut f = Figure::new(self.name, value, unit);
        if let Some(b) = self.baseline {
            f = f.baseline(b);
        }
        let note = match self.note {
            Some(n) => format!("{where_}: {n}"),
            None => where_.to_owned(),
        };
        Ok(f.note(note).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            kernel: PathBuf::from("/l/bzImage"),
            initrd: PathBuf::from("/l/initramfs.cpio"),
        }
    }

    fn args(vmm: Vmm, incoming: Option<&str>) -> Vec<String> {
        let l = Launcher {
            vmm,
            bin: PathBuf::from("x"),
            guest: Guest::Linux(image()),
        };
        l.command(Path::new("/q.sock"), Path::new("/s.out"), incoming)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn qemu_gets_demovms_cmdline_but_acpi_off() {
        let d = demovm_cmdline();
        assert!(d.starts_with("console=ttyS0 "), "{d}");
        assert!(d.contains(" acpi=off "), "{d}");
        assert!(d.ends_with(" workload=64,200"), "{d}");
        let q = qemu_cmdline(&d);
        assert_eq!(q, d.replace(" acpi=off", ""));
        assert_eq!(qemu_cmdline("acpi=off"), "");
        assert_eq!(qemu_cmdline("a noacpi=off b"), "a noacpi=off b");
    }

    #[test]
    fn both_vmms_get_the_same_image_cpus_memory_and_workload() {
        let q = args(Vmm::Qemu, Some("tcp:127.0.0.1:5"));
        let expect_q = [
            "-enable-kvm",
            "-cpu",
            "host",
            "-smp",
            "2",
            "-m",
            "256",
            "-nodefaults",
            "-kernel",
            "/l/bzImage",
            "-initrd",
            "/l/initramfs.cpio",
            "-append",
            &qemu_cmdline(&demovm_cmdline()),
            "-display",
            "none",
            "-serial",
            "file:/s.out",
            "-qmp",
            "unix:/q.sock,server=on,wait=off",
            "-incoming",
            "tcp:127.0.0.1:5",
        ];
        assert_eq!(q, expect_q);
        let d = args(Vmm::Demovm, None);
        let expect_d = [
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--kernel",
            "/l/bzImage",
            "--initrd",
            "/l/initramfs.cpio",
            "--cmdline",
            &demovm_cmdline(),
            "--qmp",
            "/q.sock",
            "--serial",
            "/s.out",
        ];
        assert_eq!(d, expect_d);
    }

    #[test]
    fn ready_needs_the_shell_and_a_pass() {
        assert!(!ready(""));
        assert!(!ready("linux-guest: shell ready\n"));
        assert!(!ready("workload: pass 1 ok at 0.3 s\n"));
        assert!(ready(
            "linux-guest: shell ready\nguest# workload: pass 1 ok at 0.3 s\n"
        ));
    }

    #[test]
    fn the_destination_goes_on_only_past_the_sources_last_pass() {
        let src = "workload: pass 7 ok at 2.0 s\nworkload: pass 12 ok at 3.1 s\n";
        assert!(!goes_on(src, ""));
        assert!(!goes_on(src, "workload: pass 12 ok at 3.1 s\n"));
        assert!(goes_on(src, "workload: pass 13 ok at 3.3 s\n"));
        assert!(goes_on("", "workload: pass 1 ok at 0.2 s\n"));
    }

    #[test]
    fn the_box_runs_this_executable_on_the_linux_row_only() {
        let cmd = box_command(
            Path::new("/s/kvm-box/run"),
            Path::new("/t/release/xtask"),
            Path::new("/t/release/demovm"),
            &image(),
            Path::new("/t/bench-box/o.json"),
        );
        assert_eq!(cmd.get_program(), "/s/kvm-box/run");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(
            args,
            ["--", "/t/release/xtask", "bench", "--only", "vs-qemu-linux"]
        );
        let env: Vec<(String, String)> = cmd
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map_or_else(String::new, |v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        for (k, v) in [
            ("KVM_BOX_FORCE", "1"),
            ("KVM_BOX_CPUS", &box_cpus()),
            ("DEMOVM_BIN", "/t/release/demovm"),
            (e2e::linux::KERNEL_ENV, "/l/bzImage"),
            (e2e::linux::INITRD_ENV, "/l/initramfs.cpio"),
            (OUT_ENV, "/t/bench-box/o.json"),
        ] {
            assert!(
                env.contains(&(k.to_owned(), v.to_owned())),
                "{k}={v} missing from {env:?}"
            );
        }
    }

    #[test]
    fn reports_from_the_box_come_back_marked() {
        let reports = [
            Report::from(
                Figure::new("vs_qemu.linux_2cpu_256m.downtime", 120.0, "ms")
                    .baseline(60.0)
                    .note("n"),
            ),
            Report::Skipped {
                name: "x.*".into(),
                why: "no qemu".into(),
            },
        ];
        let json =
            serde_json::to_string(&reports.iter().map(Shipped::from).collect::<Vec<_>>()).unwrap();
        let back: Vec<Shipped> = serde_json::from_str(&json).unwrap();
        let back: Vec<Report> = back
            .into_iter()
            .map(|s| s.into_report(IN_BOX).unwrap())
            .collect();
        match &back[0] {
            Report::Figure(f) => {
                assert_eq!(f.name, "vs_qemu.linux_2cpu_256m.downtime");
                assert_eq!((f.value, f.unit, f.baseline), (120.0, "ms", Some(60.0)));
                assert_eq!(
                    f.note.as_deref(),
                    Some("in kvm-box (nested KVM under TCG): n")
                );
            }
            Report::Skipped { .. } => panic!("a figure came back skipped"),
        }
        match &back[1] {
            Report::Skipped { name, why } => {
                assert_eq!(name, "x.*");
                assert_eq!(why, "in kvm-box (nested KVM under TCG): no qemu");
            }
            Report::Figure(_) => panic!("a skip came back measured"),
        }
        let bad = Shipped {
            unit: Some("furlongs".into()),
            ..Shipped::from(&reports[0])
        };
        assert!(bad.into_report(IN_BOX).is_err());
    }
}
