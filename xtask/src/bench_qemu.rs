//! `cargo xtask bench --vs-qemu`: the same guest live-migrated by QEMU and by `demovm`,
//! driven over QMP by the same code, side by side in one run.
//!
//! The guest is the project's `ab` boot sector with a touch size of 512 MiB (written by
//! [`crate::guests::write_sectors`]) in a 1 GiB guest: it increments the first byte of
//! each of 131072 pages, pass after pass, and prints `B` on COM1 after each pass. QEMU
//! boots it through SeaBIOS from an IDE disk; `demovm` starts it at 0000:7c00 without a
//! BIOS. Both run it on KVM:
//!
//! ```text
//! qemu-system-x86_64 -enable-kvm -m 1024 -drive file=SECTOR,format=raw,if=ide \
//!     -display none -serial file:SERIAL -qmp unix:SOCKET,server=on,wait=off \
//!     [-incoming tcp:127.0.0.1:PORT]
//! demovm --mem 1G --guest SECTOR --qmp SOCKET --serial SERIAL [--incoming tcp:127.0.0.1:PORT]
//! ```
//!
//! Each round starts a destination and a source of one VMM, and [`migrate_once`], the
//! only driver, then: negotiates QMP on both (`qmp_capabilities`), waits for the
//! source's banner and then for a `B` after it (a full pass: SeaBIOS's boot is over and
//! the guest's pages are populated), sets [`MAX_BANDWIDTH`] and [`DOWNTIME_LIMIT_MS`]
//! with `migrate-set-parameters`, runs `migrate` to the destination's port over
//! loopback TCP and polls `query-migrate` until a final state. A round counts only if
//! the source says `completed` and the destination then runs the guest on: its
//! `query-status` says `running` and its COM1 output grows. Anything else fails the run.
//!
//! Rounds alternate QEMU, `demovm`, QEMU, ... ([`ROUNDS`] each); the figures are the
//! medians of the source's `total-time`, `downtime` and `ram.transferred`, with
//! `demovm`'s as the value and QEMU's as the baseline, so the ratio is demovm/QEMU.
//! QEMU's guest has RAM beyond the 1 GiB that `demovm`'s lacks (VGA memory, option
//! ROMs): its `ram.total` is in the stderr log of each round.
//!
//! Where `qemu-system-x86_64` is missing the figures are SKIPPED with the package to
//! install; where `/dev/kvm` is unusable, with the reason.
//!
//! The same driver moves other guests: a [`Launcher`] starts one VMM with one
//! [`Guest`], which says when the guest is ready to migrate and how the destination
//! shows that it runs on. [`linux`] is the Linux row (`--only vs-qemu-linux`, part of
//! `--vs-qemu`): the project's Linux test image, 2 vCPUs and 256 MiB, its workload
//! dirtying 64 MiB, booted by QEMU with `-kernel`/`-initrd`/`-append` and by `demovm`
//! with `--kernel`/`--initrd`/`--cmdline`; the destination must print a workload pass
//! after the source's last. Where `/dev/kvm` is PVM, Linux does not boot, so that row
//! re-runs this executable in kvm-box (nested KVM under TCG) and says so in its note.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::harness::{field, Qmp, HANG_GUARD};
use serde_json::{json, Value};
use vmm_glue::guest::boot_sector::{BootSector, AB_BANNER};

use crate::bench::{median, Figure, Report};
use crate::guests::show_size;

pub mod linux;
pub mod postcopy;

/// Memory the guest dirties, pass after pass.
pub(crate) const TOUCH: u64 = 512 << 20;
/// Guest memory in MiB.
pub(crate) const MEM_MIB: u64 = 1024;
/// `max-bandwidth` for both VMMs: 1 GiB/s.
pub const MAX_BANDWIDTH: u64 = 1 << 30;
/// `downtime-limit` for both VMMs.
pub const DOWNTIME_LIMIT_MS: u64 = 300;
/// Migrations per VMM.
const ROUNDS: usize = 3;
/// How often `query-migrate` is polled.
const POLL: Duration = Duration::from_millis(50);
/// The QEMU binary.
pub(crate) const QEMU: &str = "qemu-system-x86_64";
/// The Debian package that has it.
pub(crate) const QEMU_PACKAGE: &str = "qemu-system-x86";
/// Prefix of the figure names.
const PREFIX: &str = "vs_qemu.ab_512m_1g";

/// A VMM under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vmm {
    Qemu,
    Demovm,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::Demovm => "demovm",
        }
    }
}

/// The guest a [`Launcher`] starts.
#[derive(Debug, Clone)]
pub(crate) enum Guest {
    /// A boot sector file (the `ab` one here) in a [`MEM_MIB`] guest: QEMU boots it
    /// through SeaBIOS from an IDE disk, `demovm` at 0000:7c00.
    Sector(PathBuf),
    /// The Linux test image with its workload ([`linux`]).
    Linux(e2e::linux::Image),
}

impl Guest {
    /// What [`Guest::ready`] waits for, for messages.
    fn ready_what(&self) -> &'static str {
        match self {
            Guest::Sector(_) => "the guest's banner and one full pass",
            Guest::Linux(_) => "the guest's shell and a first workload pass",
        }
    }

    /// Whether the COM1 output `out` shows the guest ready to migrate: its memory
    /// populated and its load running.
    pub(crate) fn ready(&self, out: &[u8]) -> bool {
        match self {
            Guest::Sector(_) => one_pass_done(out),
            Guest::Linux(_) => linux::ready(&String::from_utf8_lossy(out)),
        }
    }

    /// Whether the destination runs the guest on: `dst` is its COM1 output now,
    /// `dst_at_switch` its length when the migration completed, `src` the source's
    /// whole COM1 output.
    fn goes_on(&self, src: &[u8], dst_at_switch: usize, dst: &[u8]) -> bool {
        match self {
            Guest::Sector(_) => dst.len() > dst_at_switch,
            Guest::Linux(_) => {
                linux::goes_on(&String::from_utf8_lossy(src), &String::from_utf8_lossy(dst))
            }
        }
    }
}

/// What starts a VMM: its binary and the guest.
pub(crate) struct Launcher {
    pub(crate) vmm: Vmm,
    pub(crate) bin: PathBuf,
    pub(crate) guest: Guest,
}

impl Launcher {
    /// The command line of one process (`incoming`: the destination's listening URI).
    pub(crate) fn command(&self, qmp: &Path, serial: &Path, incoming: Option<&str>) -> Command {
        let mut cmd = Command::new(&self.bin);
        match (self.vmm, &self.guest) {
            (Vmm::Qemu, Guest::Sector(sector)) => {
                cmd.arg("-enable-kvm")
                    .arg("-m")
                    .arg(MEM_MIB.to_string())
                    .arg("-drive")
                    .arg(format!("file={},format=raw,if=ide", sector.display()));
            }
            (Vmm::Qemu, Guest::Linux(image)) => {
                linux::qemu_args(&mut cmd, image);
            }
            (Vmm::Demovm, Guest::Sector(sector)) => {
                cmd.arg("--mem")
                    .arg(format!("{MEM_MIB}M"))
                    .arg("--guest")
                    .arg(sector);
            }
            (Vmm::Demovm, Guest::Linux(image)) => {
                linux::demovm_args(&mut cmd, image);
            }
        }
        match self.vmm {
            Vmm::Qemu => {
                cmd.arg("-display")
                    .arg("none")
                    .arg("-serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("-qmp")
                    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
                if let Some(uri) = incoming {
                    cmd.arg("-incoming").arg(uri);
                }
            }
            Vmm::Demovm => {
                cmd.arg("--qmp").arg(qmp).arg("--serial").arg(serial).env(
                    "DEMOVM_LOG",
                    std::env::var("DEMOVM_LOG").unwrap_or_else(|_| "warn".into()),
                );
                if let Some(uri) = incoming {
                    cmd.arg("--incoming").arg(uri);
                }
            }
        }
        cmd
    }
}

/// A running VMM process with its QMP client; killed on drop.
struct Process {
    name: String,
    child: Child,
    qmp: Qmp,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Process {
    /// Starts `role` (`src` or `dst`) in `dir` and negotiates QMP with it.
    fn start(
        l: &Launcher,
        dir: &Path,
        role: &str,
        incoming: Option<&str>,
    ) -> Result<Process, String> {
        let name = format!("{} {role}", l.vmm.name());
        let qmp_path = dir.join(format!("{role}.qmp"));
        let serial = dir.join(format!("{role}.serial"));
        let stderr = dir.join(format!("{role}.stderr"));
        for p in [&qmp_path, &serial] {
            let _ = std::fs::remove_file(p);
        }
        let log = std::fs::File::create(&stderr).map_err(|e| format!("{name}: {e}"))?;
        let mut child = l
            .command(&qmp_path, &serial, incoming)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({}): {e}", l.bin.display()))?;
        // Wait for the socket while watching the process, so a VMM that refuses its
        // command line fails at once with what it said.
        let started = Instant::now();
        while !qmp_path.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "{name} exited with {st} before serving QMP; its stderr: {}",
                    read_lossy(&stderr)
                ));
            }
            if started.elapsed() > HANG_GUARD {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name}: no QMP socket after {HANG_GUARD:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let qmp = match Qmp::connect(&qmp_path) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name}: {e}; its stderr: {}", read_lossy(&stderr)));
            }
        };
        Ok(Process {
            name,
            child,
            qmp,
            serial,
            stderr,
        })
    }

    /// COM1 output so far.
    fn serial(&self) -> Vec<u8> {
        std::fs::read(&self.serial).unwrap_or_default()
    }

    /// Waits until `done` accepts the COM1 output; fails if the process exits or after
    /// [`HANG_GUARD`].
    fn wait_serial(&mut self, what: &str, done: impl Fn(&[u8]) -> bool) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let out = self.serial();
            if done(&out) {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited with {st} while waiting for {what}; its stderr: {}",
                    self.name,
                    read_lossy(&self.stderr)
                ));
            }
            if started.elapsed() > HANG_GUARD {
                return Err(format!(
                    "{}: waited {HANG_GUARD:?} for {what}; COM1 output so far: {:?}",
                    self.name,
                    String::from_utf8_lossy(&out)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `command` until `done` accepts its return value, which is returned.
    fn poll(
        &mut self,
        command: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let started = Instant::now();
        loop {
            let v = self
                .qmp
                .cmd(command, json!({}))
                .map_err(|e| format!("{}: {e}", self.name))?;
            if done(&v) {
                return Ok(v);
            }
            if started.elapsed() > HANG_GUARD {
                return Err(format!(
                    "{}: waited {HANG_GUARD:?} for {what}; last {command}: {v}",
                    self.name
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn read_lossy(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default())
        .trim()
        .to_owned()
}

/// Whether `out` holds the `ab` banner and a `B` after it: one full pass.
pub(crate) fn one_pass_done(out: &[u8]) -> bool {
    let banner = AB_BANNER.as_bytes();
    out.windows(banner.len())
        .position(|w| w == banner)
        .is_some_and(|at| out[at + banner.len()..].contains(&b'B'))
}

/// A loopback TCP port free now (the destination listens on it a moment later).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// What one migration measured, from the source's final `query-migrate`.
struct Round {
    total_ms: f64,
    downtime_ms: f64,
    transferred_mib: f64,
    ram_total_mib: f64,
}

/// The migration parameters both VMMs are given over QMP.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `max-bandwidth`, bytes per second.
    pub(crate) max_bandwidth: u64,
    /// `downtime-limit`, milliseconds.
    pub(crate) downtime_limit_ms: u64,
}

/// The ab row's parameters.
const AB_LIMITS: Limits = Limits {
    max_bandwidth: MAX_BANDWIDTH,
    downtime_limit_ms: DOWNTIME_LIMIT_MS,
};

/// One live migration of `l`'s guest between two fresh processes, driven the same way
/// whichever the VMM and the guest (see the module documentation).
fn migrate_once(l: &Launcher, dir: &Path, limits: Limits) -> Result<Round, String> {
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    let mut dst = Process::start(l, dir, "dst", Some(&uri))?;
    let mut src = Process::start(l, dir, "src", None)?;
    src.wait_serial(l.guest.ready_what(), |out| l.guest.ready(out))?;
    src.qmp
        .cmd(
            "migrate-set-parameters",
            json!({
                "max-bandwidth": limits.max_bandwidth,
                "downtime-limit": limits.downtime_limit_ms,
            }),
        )
        .map_err(|e| format!("{}: {e}", src.name))?;
    src.qmp
        .cmd("migrate", json!({ "uri": uri }))
        .map_err(|e| format!("{}: {e}", src.name))?;
    let q = src.poll("query-migrate", "the migration to finish", |q| {
        matches!(
            q.get("status").and_then(Value::as_str),
            Some("completed" | "failed" | "cancelled")
        )
    })?;
    if q.get("status").and_then(Value::as_str) != Some("completed") {
        return Err(format!("{}: the migration did not complete: {q}", src.name));
    }
    // The destination must run the guest on: running, and its load's output going on.
    dst.poll("query-status", "the guest to run", |s| {
        s.get("status").and_then(Value::as_str) == Some("running")
    })?;
    let printed = dst.serial().len();
    let src_out = src.serial();
    dst.wait_serial("the migrated guest's output to go on", |out| {
        l.guest.goes_on(&src_out, printed, out)
    })?;
    let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
    Ok(Round {
        total_ms: field(&q, "total-time") as f64,
        downtime_ms: field(&q, "downtime") as f64,
        transferred_mib: mib(field(&q, "ram.transferred")),
        ram_total_mib: mib(field(&q, "ram.total")),
    })
}

/// [`ROUNDS`] migrations by each launcher (QEMU's first), alternating, each in its own
/// directory under `scratch`; `row` names the row in the progress lines. Returns each
/// launcher's rounds, in the launchers' order.
fn alternate(
    row: &str,
    launchers: &[Launcher; 2],
    scratch: &Path,
    limits: Limits,
) -> Result<[Vec<Round>; 2], String> {
    let mut rounds: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for r in 0..ROUNDS {
        for (l, done) in launchers.iter().zip(rounds.iter_mut()) {
            let dir = scratch.join(format!("{}-{}", l.vmm.name(), r + 1));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let round = migrate_once(l, &dir, limits)
                .map_err(|e| format!("{row} round {} ({}): {e}", r + 1, l.vmm.name()))?;
            eprintln!(
                "{row} round {}/{ROUNDS} {:<6}: total {:>6.0} ms, downtime {:>4.0} ms, \
                 transferred {:>6.0} MiB (ram.total {:.0} MiB); destination runs on",
                r + 1,
                l.vmm.name(),
                round.total_ms,
                round.downtime_ms,
                round.transferred_mib,
                round.ram_total_mib
            );
            done.push(round);
        }
    }
    Ok(rounds)
}

/// The median of `f` over `rounds`.
fn med(rounds: &[Round], f: fn(&Round) -> f64) -> f64 {
    median(rounds.iter().map(f).collect())
}

/// The three figures of a row: `PREFIX.total_time`, `.downtime` and `.transferred`,
/// demovm's medians against QEMU's, all with `note`.
fn row_figures(prefix: &str, [qemu, demovm]: &[Vec<Round>; 2], note: &str) -> Vec<Report> {
    let figure = |name: &str, unit: &'static str, f: fn(&Round) -> f64| -> Report {
        Figure::new(format!("{prefix}.{name}"), med(demovm, f), unit)
            .baseline(med(qemu, f))
            .note(note)
            .into()
    };
    vec![
        figure("total_time", "ms", |r| r.total_ms),
        figure("downtime", "ms", |r| r.downtime_ms),
        figure("transferred", "MiB", |r| r.transferred_mib),
    ]
}

/// The first line of `qemu-system-x86_64 --version`.
pub(crate) fn qemu_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "QEMU of unknown version".into())
}

/// The QEMU binary, or why there is none (with the package to install).
pub(crate) fn find_qemu() -> Result<PathBuf, String> {
    in_path(QEMU).ok_or_else(|| {
        format!(
            "{QEMU} not found in PATH: install it to compare with QEMU \
             (apt-get install {QEMU_PACKAGE})"
        )
    })
}

/// Why the VMMs cannot run on KVM here, if they cannot.
pub(crate) fn kvm_unusable() -> Option<String> {
    vmm_glue::kvm::host_facts().err().map(|e| {
        format!(
            "both VMMs need KVM and /dev/kvm is unusable: {}",
            vmm_glue::error_chain(&e)
        )
    })
}

/// `name` found in a directory of `PATH`.
pub(crate) fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A scratch directory, removed on drop.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The QEMU-versus-demovm figures.
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
    if let Some(why) = kvm_unusable() {
        return skip(why);
    }
    let demovm = e2e::harness::demovm_path()?;
    let scratch =
        Scratch(std::env::temp_dir().join(format!("xtask-vs-qemu-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let sector = crate::guests::write_sectors(&scratch.0, TOUCH)?
        .into_iter()
        .find(|(s, _)| *s == BootSector::Ab)
        .map(|(_, p)| p)
        .ok_or("no ab boot sector was written")?;
    let version = qemu_version(&qemu);
    let launchers = [
        Launcher {
            vmm: Vmm::Qemu,
            bin: qemu,
            guest: Guest::Sector(sector.clone()),
        },
        Launcher {
            vmm: Vmm::Demovm,
            bin: demovm,
            guest: Guest::Sector(sector),
        },
    ];
    eprintln!(
        "vs-qemu: ab boot sector touching {} in a {MEM_MIB} MiB guest, max-bandwidth {} B/s, \
         downtime-limit {DOWNTIME_LIMIT_MS} ms, {ROUNDS} rounds each; {version}",
        show_size(TOUCH),
        MAX_BANDWIDTH
    );
    let [qemu_rounds, demovm_rounds] = alternate("vs-qemu", &launchers, &scratch.0, AB_LIMITS)?;
    let kvm = if e2e::harness::kvm_is_pvm() {
        "KVM (PVM, kvm_pvm)"
    } else {
        "KVM"
    };
    let note = format!(
        "ab boot sector, {} touched, {MEM_MIB} MiB guest, {kvm}; value demovm, baseline \
         {version}; both driven by the same QMP code: migrate-set-parameters max-bandwidth \
         {MAX_BANDWIDTH} (1 GiB/s), downtime-limit {DOWNTIME_LIMIT_MS} ms, migrate over \
         loopback TCP after one full guest pass; medians of {ROUNDS} rounds each, \
         alternating; every destination checked running with growing COM1 output; \
         RAM migrated (ram.total): demovm {:.0} MiB, QEMU {:.0} MiB (its VGA memory and \
         ROMs too)",
        show_size(TOUCH),
        med(&demovm_rounds, |r| r.ram_total_mib),
        med(&qemu_rounds, |r| r.ram_total_mib),
    );
    Ok(row_figures(PREFIX, &[qemu_rounds, demovm_rounds], &note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_a_b_after_the_banner() {
        assert!(!one_pass_done(b""));
        assert!(!one_pass_done(b"ab\r\n"));
        assert!(
            !one_pass_done(b"B ab\r\n"),
            "a B before the banner is no pass"
        );
        assert!(one_pass_done(b"ab\r\nB"));
        assert!(one_pass_done(b"SeaBIOS noise\r\nab\r\nBBB"));
    }

    #[test]
    fn both_vmms_get_the_same_guest_memory_and_sector() {
        let (q, s) = (Path::new("/q.sock"), Path::new("/s.out"));
        let args = |vmm, incoming| {
            let l = Launcher {
                vmm,
                bin: PathBuf::from("x"),
                guest: Guest::Sector(PathBuf::from("/g/ab.bin")),
            };
            let cmd = l.command(q, s, incoming);
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            args(Vmm::Qemu, Some("tcp:127.0.0.1:5")),
            "-enable-kvm -m 1024 -drive file=/g/ab.bin,format=raw,if=ide -display none \
             -serial file:/s.out -qmp unix:/q.sock,server=on,wait=off -incoming tcp:127.0.0.1:5"
        );
        assert_eq!(
            args(Vmm::Demovm, None),
            "--mem 1024M --guest /g/ab.bin --qmp /q.sock --serial /s.out"
        );
    }
}
