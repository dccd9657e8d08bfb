//! Linux guests: where the test image is, and the scenarios that migrate a running
//! Linux kernel between two `demovm` processes.
//!
//! The image is Debian's kernel and an initramfs with busybox and the project's
//! workload (`guests/linux`), made by `cargo xtask linux-guest` into
//! `target/linux-guest`, or given with [`KERNEL_ENV`] and [`INITRD_ENV`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vmm_glue::boot::linux::DEFAULT_CMDLINE;

use crate::harness::{field, DemoVm, VmOpts, HANG_GUARD};
use crate::migration::{accel_of, error_desc, expect, migrate, outcome, status};
use crate::{Failure, Outcome};

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

/// Guest RAM of the Linux scenarios, in MiB.
pub const MEM_MIB: u64 = 256;
/// vCPUs of the Linux scenarios.
pub const VCPUS: usize = 2;
/// MiB the workload dirties, pass after pass.
pub const WORKLOAD_MIB: u64 = 64;
/// Milliseconds the workload sleeps between passes.
pub const WORKLOAD_PAUSE_MS: u64 = 200;
/// The environment variable that sets how long (seconds) the live scenario
/// watches the destination's console after the switch (default
/// [`WATCH_SECS`]).
pub const WATCH_ENV: &str = "LINUX_WATCH_SECS";
/// How long the destination is watched after the switch, unless [`WATCH_ENV`]
/// says otherwise.
pub const WATCH_SECS: u64 = 30;
/// Kernel messages that mean the migrated guest's timers or clock broke.
const BAD_MESSAGES: &[&str] = &[
    "rcu_sched self-detected stall",
    "rcu: INFO: rcu_sched detected stalls",
    "rcu_preempt detected stalls",
    "rcu_preempt self-detected stall",
    "soft lockup",
    "clocksource unstable",
    "Marking clocksource",
    "CORRUPT",
];

/// The image, if the Linux scenarios can run here: the image exists, and
/// `/dev/kvm` is a KVM that boots Linux. On PVM (module `kvm_pvm`) Linux
/// fails at boot with an emulation failure: a loud skip that says to run
/// the scenarios in kvm-box, even with `REQUIRE_LINUX=1` (as the dirty ring
/// scenario on PVM: CI runs them in the box and checks that they ran there).
/// A missing image is a failure with `REQUIRE_LINUX=1`. Without KVM, a skip
/// (a failure with `REQUIRE_KVM=1`).
pub fn available() -> Result<Image, Failure> {
    let image = image()?;
    let require_linux = std::env::var("REQUIRE_LINUX").as_deref() == Ok("1");
    if crate::harness::kvm_is_pvm() {
        let why = "/dev/kvm is PVM (module kvm_pvm), where Linux fails to boot with an \
                   emulation failure; the Linux rows run in kvm-box: `KVM_BOX_FORCE=1 \
                   ../shared/kvm-box/run target/debug/deps/linux-<hash> --test-threads 1`"
            .to_owned();
        return Err(Failure::Skipped(why));
    }
    if let Err(e) = vmm_glue::kvm::host_facts() {
        let why = format!("Linux guests need KVM: {}", vmm_glue::error_chain(&e));
        let require = require_linux || std::env::var("REQUIRE_KVM").as_deref() == Ok("1");
        return Err(if require {
            Failure::Failed(format!("{why} (REQUIRE_KVM=1)"))
        } else {
            Failure::Skipped(why)
        });
    }
    Ok(image)
}

/// A `demovm` running the Linux image, with its console socket.
pub struct LinuxVm {
    /// The VM.
    pub vm: DemoVm,
    /// Its COM1 socket.
    pub console_path: PathBuf,
}

/// Starts `demovm --kernel` with the image, [`MEM_MIB`], [`VCPUS`], the
/// workload on the command line, COM1 to a file and to a socket.
pub fn start(name: &str, image: &Image, incoming: Option<&str>) -> Result<LinuxVm, String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let console_path = std::env::temp_dir().join(format!(
        "linux-{}-{}-{name}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let kernel = image.kernel.display().to_string();
    let initrd = image.initrd.display().to_string();
    let cmdline = format!("{DEFAULT_CMDLINE} workload={WORKLOAD_MIB},{WORKLOAD_PAUSE_MS}");
    let serial = format!("unix:{}", console_path.display());
    let extra = [
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
        "--serial",
        &serial,
    ];
    let vm = DemoVm::start(
        name,
        &VmOpts {
            mem_mib: MEM_MIB,
            vcpus: VCPUS,
            guest: "",
            incoming,
            accel: Some("kvm"),
            extra: &extra,
        },
    )?;
    Ok(LinuxVm { vm, console_path })
}

/// A client of a guest's serial socket: what the guest printed since it
/// connected, and a keyboard.
pub struct Console {
    name: String,
    s: UnixStream,
    buf: Vec<u8>,
}

impl Console {
    /// Connects to `vm`'s console (retrying while the socket appears).
    pub fn connect(vm: &LinuxVm) -> Result<Console, String> {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(&vm.console_path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > HANG_GUARD => {
                    return Err(format!(
                        "{}: console socket {} never came up: {e}",
                        vm.vm.name,
                        vm.console_path.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        Ok(Console {
            name: vm.vm.name.clone(),
            s,
            buf: Vec::new(),
        })
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// What the guest printed from byte `from` on.
    pub fn text(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.buf[from.min(self.buf.len())..]).into_owned()
    }

    /// Reads what is there (waiting at most 50 ms).
    fn pump(&mut self) -> Result<(), String> {
        let mut b = [0u8; 4096];
        match self.s.read(&mut b) {
            Ok(0) => Err(format!("{}: the console socket closed", self.name)),
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(format!("{}: console read: {e}", self.name)),
        }
    }

    /// Reads for about `d`, keeping what arrives.
    pub fn drain_for(&mut self, d: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < d {
            self.pump()?;
        }
        Ok(())
    }

    /// Waits until `found` finds something in what was printed from `from`
    /// on, and returns it.
    pub fn wait_for<T>(
        &mut self,
        from: usize,
        what: &str,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let start = Instant::now();
        loop {
            if let Some(t) = found(&self.text(from)) {
                return Ok(t);
            }
            if start.elapsed() > HANG_GUARD {
                let text = self.text(from);
                let tail: String = text
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                return Err(format!(
                    "{}: waited too long for {what}; the console's last output:\n{tail}",
                    self.name
                ));
            }
            self.pump()?;
        }
    }

    /// Types `line` and a newline.
    pub fn type_line(&mut self, line: &str) -> Result<(), String> {
        self.s
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("{}: typing into the console: {e}", self.name))
    }

    /// Types `echo ok-$RANDOM-TOKEN` and waits for the shell's answer
    /// (`ok-<digits>-TOKEN`, which the echo of the typed line cannot be);
    /// returns it.
    pub fn echo(&mut self, token: &str) -> Result<String, String> {
        let from = self.len();
        self.type_line(&format!("echo ok-$RANDOM-{token}"))?;
        self.wait_for(from, "the shell to answer `echo ok-$RANDOM`", |t| {
            t.lines().find_map(|l| {
                let l = l.trim();
                let digits = l.strip_prefix("ok-")?.strip_suffix(&format!("-{token}"))?;
                (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| l.to_owned())
            })
        })
    }

    /// The guest's wall clock against the host's: types `workload now`
    /// and returns (guest - host midpoint, half the round trip), in seconds.
    pub fn clock_offset(&mut self) -> Result<(f64, f64), String> {
        let from = self.len();
        let before = unix_now();
        self.type_line("workload now")?;
        // Only a whole line: a partial `now 17961` parses too.
        let guest = self.wait_for(from, "the guest's clock (`workload now`)", |t| {
            t.split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .find_map(|l| l.trim().strip_prefix("now ")?.parse::<f64>().ok())
        })?;
        let after = unix_now();
        Ok((guest - (before + after) / 2.0, (after - before) / 2.0))
    }

    /// The highest `workload: pass N` printed from `from` on.
    pub fn last_pass(&self, from: usize) -> Option<u64> {
        Some(last_pass(&self.text(from))).filter(|&n| n > 0)
    }

    /// Waits for a workload pass after `after`, printed from `from` on.
    pub fn wait_pass_after(&mut self, from: usize, after: u64) -> Result<u64, String> {
        self.wait_for(from, &format!("a workload pass after {after}"), |t| {
            t.lines()
                .filter_map(|l| {
                    let rest = &l[l.find("workload: pass ")? + "workload: pass ".len()..];
                    rest.split_whitespace().next()?.parse::<u64>().ok()
                })
                .filter(|&n| n > after)
                .max()
        })
    }

    /// The kernel's complaints about stalls, lockups, an unstable clocksource
    /// or corrupt workload memory printed from `from` on, and those `dmesg`
    /// holds: the lines found.
    pub fn complaints(&mut self, from: usize) -> Result<Vec<String>, String> {
        let mut bad: Vec<String> = self
            .text(from)
            .lines()
            .filter(|l| BAD_MESSAGES.iter().any(|m| l.contains(m)))
            .map(|l| l.trim().to_owned())
            .collect();
        // The typed line holds none of the messages; its answer is
        // prefixed so that the echo of the command does not match.
        let from = self.len();
        self.type_line(
            "dmesg | grep -ciE 'rcu.*stall|soft lockup|clocksource.*unstable' | sed 's/^/hits=/'",
        )?;
        let hits = self.wait_for(from, "dmesg's stall count", |t| {
            t.lines()
                .find_map(|l| l.trim().strip_prefix("hits=")?.parse::<u64>().ok())
        })?;
        if hits > 0 {
            bad.push(format!("dmesg: {hits} stall/lockup/clocksource lines"));
        }
        Ok(bad)
    }
}

/// The highest `workload: pass N` in `text`, 0 if none.
pub fn last_pass(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let rest = &l[l.find("workload: pass ")? + "workload: pass ".len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A token for one `echo`.
fn token(what: &str) -> String {
    format!("{what}{}", std::process::id())
}

/// Boots `name` and waits for its workload's first pass; returns the
/// console.
fn boot(vm: &LinuxVm) -> Result<Console, String> {
    let mut c = Console::connect(vm)?;
    c.wait_for(0, "the guest's shell", |t| {
        t.contains("linux-guest: shell ready").then_some(())
    })?;
    c.wait_pass_after(0, 0)?;
    Ok(c)
}

fn guest_note(image: &Image) -> String {
    format!(
        "Linux {} ({VCPUS} vCPUs, {MEM_MIB} MiB, workload dirtying {WORKLOAD_MIB} MiB)",
        image
            .kernel
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    )
}

/// The Linux guest, stopped, then migrated over TCP: both sides complete,
/// RAM equal (`x-ram-digest`), the destination stays paused; on `cont` its
/// shell answers and its workload goes on.
pub fn stopped() -> Result<Outcome, Failure> {
    let image = available()?;
    let mut src = start("src", &image, None)?;
    let mut csrc = boot(&src)?;
    csrc.echo(&token("src"))?;
    src.vm.qmp.cmd("stop", json!({}))?;
    csrc.drain_for(Duration::from_millis(200))?;
    let pass = csrc.last_pass(0).unwrap_or(0);
    let mut dst = start("dst", &image, Some("tcp:127.0.0.1:0"))?;
    let mut cdst = Console::connect(&dst)?;
    let uri = dst.vm.incoming_uri()?;
    migrate(&mut src.vm, &uri)?;
    let q = src.vm.wait_finished()?;
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.vm.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    let rs = dst.vm.run_status()?;
    expect(rs == "paused", || {
        format!("destination run state {rs}: a guest stopped on the source must stay stopped")
    })?;
    let (a, b) = (src.vm.digest()?, dst.vm.digest()?);
    expect(a == b, || {
        format!("RAM differs: source {a}, destination {b}")
    })?;
    dst.vm.qmp.cmd("cont", json!({}))?;
    let answer = cdst.echo(&token("dst"))?;
    let next = cdst.wait_pass_after(0, pass)?;
    let bad = cdst.complaints(0)?;
    expect(bad.is_empty(), || {
        format!("the destination's guest complains: {bad:?}")
    })?;
    let accel = accel_of(&mut [&mut src.vm, &mut dst.vm])?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "{}: stopped at workload pass {pass}; x-ram-digest equal on both sides; after cont \
             the destination's shell answered {answer:?} and the workload reached pass {next}",
            guest_note(&image)
        ),
    ))
}

/// The Linux guest migrated live over TCP while its workload dirties
/// memory: the workload goes on on the destination, its shell answers
/// through the destination's console socket, its clock jumps by no more
/// than the downtime plus the measurement's uncertainty and a second, and
/// for [`WATCH_SECS`] after the switch neither the console nor dmesg shows a
/// stall, a soft lockup, an unstable clocksource or corrupt workload memory.
pub fn live() -> Result<Outcome, Failure> {
    let image = available()?;
    let mut src = start("src", &image, None)?;
    let mut csrc = boot(&src)?;
    csrc.echo(&token("src"))?;
    let mut dst = start("dst", &image, Some("tcp:127.0.0.1:0"))?;
    let mut cdst = Console::connect(&dst)?;
    let uri = dst.vm.incoming_uri()?;
    let (off0, err0) = csrc.clock_offset()?;
    // The workload dirties 64 MiB about five times a second: a downtime limit
    // that lets the last pass carry it.
    src.vm.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 5000}),
    )?;
    migrate(&mut src.vm, &uri)?;
    let q = src.vm.wait_finished()?;
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.vm.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    let rs = dst.vm.run_status()?;
    expect(rs == "running", || format!("destination run state {rs}"))?;
    // The source's last pass, from its log file (its console client may be
    // gone with the guest).
    let pass = last_pass(&std::fs::read_to_string(&src.vm.serial).unwrap_or_default());
    let next = cdst.wait_pass_after(0, pass)?;
    let answer = cdst.echo(&token("dst"))?;
    let (off1, err1) = cdst.clock_offset()?;
    let downtime = q.get("downtime").and_then(Value::as_u64).unwrap_or(0) as f64 / 1000.0;
    let jump = off1 - off0;
    let margin = 1.0 + err0 + err1;
    let total = field(&q, "total-time") as f64 / 1000.0;
    expect(jump.abs() <= downtime + margin, || {
        format!(
            "the guest's clock jumped by {jump:.3} s across the migration, more than the \
             downtime {downtime:.3} s + {margin:.3} s (guest - host clock: {off0:.3} s before, \
             {off1:.3} s after; migration total time {total:.3} s)"
        )
    })?;
    let watch = std::env::var(WATCH_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(WATCH_SECS);
    cdst.drain_for(Duration::from_secs(watch))?;
    let last = cdst.wait_pass_after(0, next)?;
    cdst.echo(&token("late"))?;
    let bad = cdst.complaints(0)?;
    expect(bad.is_empty(), || {
        format!("the destination's guest complains after the switch: {bad:?}")
    })?;
    let accel = accel_of(&mut [&mut src.vm, &mut dst.vm])?;
    let syncs = field(&q, "ram.dirty-sync-count");
    Ok(outcome(
        &q,
        accel,
        format!(
            "{}: {syncs} dirty syncs; the workload went on from pass {pass} to {last} on the \
             destination, whose shell answered {answer:?}; guest clock jump {jump:+.3} s \
             (downtime {downtime:.3} s); no stall, lockup or clocksource message in {watch} s",
            guest_note(&image)
        ),
    ))
}

/// The destination killed mid-way through a live migration: the source
/// fails the migration, its guest keeps running, its shell still answers on
/// its console and its workload goes on.
pub fn dest_killed() -> Result<Outcome, Failure> {
    let image = available()?;
    let mut src = start("src", &image, None)?;
    let mut csrc = boot(&src)?;
    let mut dst = start("dst", &image, Some("tcp:127.0.0.1:0"))?;
    let accel = accel_of(&mut [&mut src.vm, &mut dst.vm])?;
    src.vm
        .qmp
        .cmd("migrate-set-parameters", json!({"max-bandwidth": 16 << 20}))?;
    let uri = dst.vm.incoming_uri()?;
    migrate(&mut src.vm, &uri)?;
    src.vm
        .wait_migration("pages to flow", |q| field(q, "ram.transferred") > 4 << 20)?;
    dst.vm.kill();
    let q = src.vm.wait_finished()?;
    expect(status(&q) == "failed", || {
        format!("source after the destination died: {q}")
    })?;
    let rs = src.vm.run_status()?;
    expect(rs == "running", || {
        format!("the source guest must keep running (run state {rs})")
    })?;
    csrc.drain_for(Duration::from_millis(200))?;
    let mark = csrc.len();
    let pass = csrc.last_pass(0).unwrap_or(0);
    let answer = csrc.echo(&token("src"))?;
    let next = csrc.wait_pass_after(mark, pass)?;
    let bad = csrc.complaints(0)?;
    expect(bad.is_empty(), || {
        format!("the source's guest complains: {bad:?}")
    })?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "{}: source failed with \"{}\"; its shell still answered {answer:?}, its workload \
             went on to pass {next}",
            guest_note(&image),
            error_desc(&q)
        ),
    ))
}
