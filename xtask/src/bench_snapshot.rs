//! Background-snapshot figures for `cargo xtask bench` (group `snapshot`, and rows of
//! `--vs-qemu`).
//!
//! The guest is the `ab` boot sector of [`crate::bench_qemu`] (512 MiB touched pass
//! after pass, a `B` on COM1 after each pass) in a 1 GiB guest, on KVM.
//!
//! - `snapshot.ab_512m_1g.*`: a running `demovm` guest, after one full pass, saved by a
//!   background snapshot to a file (`migrate-set-capabilities background-snapshot`,
//!   `migrate {"uri": "file:PATH"}`): the total time, the file's allocated size (the
//!   file is sparse: zero pages are not written), the guest's pause at the start
//!   (`downtime`) and how long its writers waited on write faults (`x-snapshot`
//!   `stall-p50-us`, `stall-p99-us`). The baseline of the time and the size is QEMU's
//!   background snapshot of the same boot sector (`migrate "exec:cat > FILE"`: QEMU 7.2
//!   has no `file:` URI), started and driven the same way; where QEMU is missing the
//!   baselines are left out and the reason is printed.
//! - `snapshot.precopy_file_ab_512m_1g.*`: the same `demovm` guest, right after its
//!   snapshot, saved by a dirty-logging (precopy) migration to a file: the time and
//!   the file's size (median and worst round), beside the background snapshot's.
//! - `snapshot.restore_{1g,4g}.*`: a snapshot of the guest (1 GiB, and 4 GiB less
//!   1 MiB, [`BIG_MIB`], with the same 512 MiB touched) restored by a fresh `demovm --incoming file:PATH
//!   --restore-mode lazy`, beside `--restore-mode eager` of the same file: the time
//!   from spawning the process to the guest's first run (`query-status`
//!   `x-first-run-unix-us`, [`vmm_glue::session::Session::first_run`]), to its first
//!   COM1 byte (the file polled every 0.5 ms from before the spawn), and to the end of
//!   the restore (`query-migrate` `completed`: for lazy, when the background fill
//!   finished). The snapshot file is in the page cache, as it is right after a save.
//!
//! Every save is checked: it completed, and the guest printed on after it (no vCPU was
//! left blocked); the passes the guest finished during the save, per minute of it,
//! are a figure (`guest_pass_rate`), as is the write-fault count. Every restore is
//! checked: completed, running, and printing. Rounds alternate the measured path and
//! its baseline; the medians are reported.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use e2e::harness::{field, Qmp, HANG_GUARD};
use serde_json::{json, Value};
use vmm_glue::guest::boot_sector::BootSector;

use crate::bench::{median, Figure, Report};
use crate::bench_qemu::{
    find_qemu, one_pass_done, qemu_version, read_lossy, Guest, Launcher, Scratch, Vmm, MEM_MIB,
    TOUCH,
};
use crate::guests::show_size;

/// Saves per VMM, and restores per mode and size.
const ROUNDS: usize = 3;
/// `max-bandwidth` of every save: far above what a disk takes, so unlimited in effect
/// for both VMMs (whatever each makes of 0).
const MAX_BANDWIDTH: u64 = 64 << 30;
/// `downtime-limit` of the precopy save.
const DOWNTIME_LIMIT_MS: u64 = 300;
/// A precopy save that has not converged by then is cancelled and reported so.
const PRECOPY_GIVE_UP: Duration = Duration::from_secs(120);
/// How often `query-migrate` and `query-status` are polled.
const POLL: Duration = Duration::from_millis(10);
/// How often the first-output watcher looks at the COM1 file.
const SERIAL_POLL: Duration = Duration::from_micros(500);
/// The "4 GiB" guest of the restore figures: 1 MiB short, as demovm's RAM ends below
/// the TSS pages KVM needs at `0xfffb_d000` (it maps no RAM above 4 GiB).
const BIG_MIB: u64 = 4095;
/// Prefix of the save figures.
const PREFIX: &str = "snapshot.ab_512m_1g";
const MIB: f64 = (1u64 << 20) as f64;

/// A VMM process with its QMP client and a watcher of its first COM1 byte; killed on
/// drop.
struct Vm {
    name: String,
    child: Child,
    /// Connected once the socket exists.
    qmp: Option<Qmp>,
    serial: PathBuf,
    stderr: PathBuf,
    /// Wall-clock time just before the spawn.
    spawned: SystemTime,
    stop_watch: Arc<AtomicBool>,
    watcher: Option<JoinHandle<Option<SystemTime>>>,
}

impl Vm {
    /// Starts the command `build` makes from the QMP socket and COM1 file paths in
    /// `dir` (removed first), and negotiates QMP.
    fn start(
        name: &str,
        dir: &Path,
        build: impl FnOnce(&Path, &Path) -> Command,
    ) -> Result<Vm, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let qmp_path = dir.join("qmp.sock");
        let serial = dir.join("serial.out");
        let stderr = dir.join("stderr.log");
        for p in [&qmp_path, &serial] {
            let _ = std::fs::remove_file(p);
        }
        let log = std::fs::File::create(&stderr).map_err(|e| format!("{name}: {e}"))?;
        let mut cmd = build(&qmp_path, &serial);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let stop_watch = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (serial, stop) = (serial.clone(), Arc::clone(&stop_watch));
            std::thread::Builder::new()
                .name("first-output".into())
                .spawn(move || first_output(&serial, &stop))
                .map_err(|e| format!("{name}: cannot start the COM1 watcher: {e}"))?
        };
        let spawned = SystemTime::now();
        let child = cmd.spawn();
        let mut vm = Vm {
            name: name.into(),
            child: match child {
                Ok(c) => c,
                Err(e) => {
                    stop_watch.store(true, Ordering::Release);
                    let _ = watcher.join();
                    return Err(format!("cannot start {name}: {e}"));
                }
            },
            qmp: None,
            serial,
            stderr,
            spawned,
            stop_watch,
            watcher: Some(watcher),
        };
        let started = Instant::now();
        while !qmp_path.exists() {
            if let Ok(Some(st)) = vm.child.try_wait() {
                return Err(format!(
                    "{name} exited with {st} before serving QMP; its stderr: {}",
                    read_lossy(&vm.stderr)
                ));
            }
            if started.elapsed() > HANG_GUARD {
                return Err(format!("{name}: no QMP socket after {HANG_GUARD:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.qmp = Some(
            Qmp::connect(&qmp_path)
                .map_err(|e| format!("{name}: {e}; its stderr: {}", read_lossy(&vm.stderr)))?,
        );
        Ok(vm)
    }

    fn cmd(&mut self, command: &str, args: Value) -> Result<Value, String> {
        let qmp = self.qmp.as_mut().ok_or("QMP is not connected")?;
        qmp.cmd(command, args).map_err(|e| {
            format!(
                "{}: {e}; its stderr: {}",
                self.name,
                read_lossy(&self.stderr)
            )
        })
    }

    fn serial_len(&self) -> u64 {
        std::fs::metadata(&self.serial).map_or(0, |m| m.len())
    }

    /// Waits until `done` accepts the COM1 output.
    fn wait_serial(&mut self, what: &str, done: impl Fn(&[u8]) -> bool) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let out = std::fs::read(&self.serial).unwrap_or_default();
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
                return Err(format!("{}: waited {HANG_GUARD:?} for {what}", self.name));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Polls `command` until `done` accepts its reply, for at most `limit`; `None` if
    /// the time ran out.
    fn poll_for(
        &mut self,
        command: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Option<Value>, String> {
        let started = Instant::now();
        loop {
            let v = self.cmd(command, json!({}))?;
            if done(&v) {
                return Ok(Some(v));
            }
            if started.elapsed() > limit {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls `query-migrate` until a final state.
    fn wait_migration(&mut self) -> Result<Value, String> {
        self.poll_for("query-migrate", HANG_GUARD, is_final)?
            .ok_or_else(|| {
                format!(
                    "{}: no final migration state after {HANG_GUARD:?}",
                    self.name
                )
            })
    }

    /// When the first COM1 byte was seen, measured from the spawn.
    fn first_output(&mut self) -> Result<Duration, String> {
        let seen = self
            .watcher
            .take()
            .ok_or("first output already taken")?
            .join()
            .map_err(|_| "the COM1 watcher panicked")?
            .ok_or_else(|| format!("{}: no COM1 output after {HANG_GUARD:?}", self.name))?;
        Ok(seen.duration_since(self.spawned).unwrap_or_default())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_watch.store(true, Ordering::Release);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// Watches `serial` until it holds a byte (its wall-clock time), `stop`, or
/// [`HANG_GUARD`].
fn first_output(serial: &Path, stop: &AtomicBool) -> Option<SystemTime> {
    let started = Instant::now();
    while !stop.load(Ordering::Acquire) && started.elapsed() < HANG_GUARD {
        if std::fs::metadata(serial).is_ok_and(|m| m.len() > 0) {
            return Some(SystemTime::now());
        }
        std::thread::sleep(SERIAL_POLL);
    }
    None
}

fn is_final(q: &Value) -> bool {
    matches!(
        q.get("status").and_then(Value::as_str),
        Some("completed" | "failed" | "cancelled")
    )
}

fn status(q: &Value) -> &str {
    q.get("status").and_then(Value::as_str).unwrap_or("?")
}

/// The time `x-first-run-unix-us` (microseconds since the epoch) says, from `spawned`.
fn since_spawn(spawned: SystemTime, unix_us: u64) -> Duration {
    (SystemTime::UNIX_EPOCH + Duration::from_micros(unix_us))
        .duration_since(spawned)
        .unwrap_or_default()
}

/// Bytes a file takes on disk (its allocated blocks), and its length.
fn file_sizes(p: &Path) -> Result<(u64, u64), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok((m.blocks() * 512, m.len()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `demovm` command of a 1 GiB-or-more `ab` guest.
fn demovm(bin: &Path, sector: &Path, mem_mib: u64, qmp: &Path, serial: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--mem")
        .arg(format!("{mem_mib}M"))
        .arg("--guest")
        .arg(sector)
        .arg("--qmp")
        .arg(qmp)
        .arg("--serial")
        .arg(serial)
        .env(
            "DEMOVM_LOG",
            std::env::var("DEMOVM_LOG").unwrap_or_else(|_| "warn".into()),
        );
    cmd
}

/// A background snapshot of `vm`'s running guest into `uri`, with `file` the file
/// it lands in; counts the guest's passes meanwhile and checks it prints on after.
fn background_snapshot(vm: &mut Vm, uri: &str, file: &Path) -> Result<Save, String> {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    )?;
    vm.cmd(
        "migrate-set-parameters",
        json!({ "max-bandwidth": MAX_BANDWIDTH }),
    )?;
    let before = vm.serial_len();
    vm.cmd("migrate", json!({ "uri": uri }))?;
    let q = vm.wait_migration()?;
    // Passes the guest finished during the save (to within one poll).
    let out = std::fs::read(&vm.serial).unwrap_or_default();
    let passes = passes_after(&out, before);
    if status(&q) != "completed" {
        return Err(format!("{}: the snapshot did not complete: {q}", vm.name));
    }
    // No vCPU was left blocked: the guest runs on and prints.
    let now = out.len();
    vm.wait_serial("COM1 output to grow after the snapshot", |out| {
        out.len() > now
    })?;
    let (allocated, len) = file_sizes(file)?;
    let sn = q.get("x-snapshot");
    let us = |k: &str| sn.and_then(|s| s.get(k)).and_then(Value::as_u64);
    Ok(Save {
        total_ms: field(&q, "total-time") as f64,
        pause_ms: q.get("downtime").and_then(Value::as_u64).map(|v| v as f64),
        allocated_mib: allocated as f64 / MIB,
        len_mib: len as f64 / MIB,
        stall_p50_us: us("stall-p50-us").map(|v| v as f64),
        stall_p99_us: us("stall-p99-us").map(|v| v as f64),
        write_faults: us("write-faults").map(|v| v as f64),
        passes: Some(passes as f64),
        converged: true,
    })
}

/// The `B`s (finished passes of the `ab` guest) in `out` from byte `from` on.
fn passes_after(out: &[u8], from: u64) -> usize {
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(out.len());
    out[from..].iter().filter(|&&b| b == b'B').count()
}

/// What one save measured.
struct Save {
    total_ms: f64,
    pause_ms: Option<f64>,
    allocated_mib: f64,
    len_mib: f64,
    stall_p50_us: Option<f64>,
    stall_p99_us: Option<f64>,
    write_faults: Option<f64>,
    /// Passes the guest finished during a background snapshot.
    passes: Option<f64>,
    /// False for a precopy save cancelled after [`PRECOPY_GIVE_UP`].
    converged: bool,
}

/// A dirty-logging save of `vm`'s running guest to `file`.
fn precopy_save(vm: &mut Vm, file: &Path) -> Result<Save, String> {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": false}]}),
    )?;
    vm.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}),
    )?;
    let started = Instant::now();
    vm.cmd(
        "migrate",
        json!({ "uri": format!("file:{}", file.display()) }),
    )?;
    let q = match vm.poll_for("query-migrate", PRECOPY_GIVE_UP, is_final)? {
        Some(q) => q,
        None => {
            vm.cmd("migrate_cancel", json!({}))?;
            let q = vm.wait_migration()?;
            let (allocated, len) = file_sizes(file).unwrap_or((0, 0));
            return Ok(Save {
                total_ms: ms(started.elapsed()),
                pause_ms: None,
                allocated_mib: allocated as f64 / MIB,
                len_mib: len as f64 / MIB,
                stall_p50_us: None,
                stall_p99_us: None,
                write_faults: None,
                passes: None,
                converged: status(&q) == "completed",
            });
        }
    };
    if status(&q) != "completed" {
        return Err(format!(
            "{}: the precopy save did not complete: {q}",
            vm.name
        ));
    }
    let (allocated, len) = file_sizes(file)?;
    Ok(Save {
        total_ms: field(&q, "total-time") as f64,
        pause_ms: q.get("downtime").and_then(Value::as_u64).map(|v| v as f64),
        allocated_mib: allocated as f64 / MIB,
        len_mib: len as f64 / MIB,
        stall_p50_us: None,
        stall_p99_us: None,
        write_faults: None,
        passes: None,
        converged: true,
    })
}

/// One round of `demovm`: a background snapshot and then, with `precopy`, a precopy
/// save of the same running guest.
fn demovm_round(
    bin: &Path,
    sector: &Path,
    dir: &Path,
    precopy: bool,
) -> Result<(Save, Option<Save>), String> {
    let mut vm = Vm::start("demovm", dir, |q, s| demovm(bin, sector, MEM_MIB, q, s))?;
    vm.wait_serial("the guest's banner and one full pass", one_pass_done)?;
    let snap = dir.join("snapshot.bin");
    let bg = background_snapshot(&mut vm, &format!("file:{}", snap.display()), &snap)?;
    let _ = std::fs::remove_file(&snap);
    if !precopy {
        return Ok((bg, None));
    }
    let pre_file = dir.join("precopy.bin");
    let pre = precopy_save(&mut vm, &pre_file)?;
    let _ = std::fs::remove_file(&pre_file);
    Ok((bg, Some(pre)))
}

/// One round of QEMU: a background snapshot through `exec:cat`.
fn qemu_round(l: &Launcher, dir: &Path) -> Result<Save, String> {
    let mut vm = Vm::start("qemu", dir, |q, s| l.command(q, s, None))?;
    vm.wait_serial("the guest's banner and one full pass", one_pass_done)?;
    let file = dir.join("snapshot.bin");
    let uri = format!("exec:cat > {}", file.display());
    let save = background_snapshot(&mut vm, &uri, &file)?;
    let _ = std::fs::remove_file(&file);
    Ok(save)
}

/// The QEMU launcher, or why there is none.
fn qemu_launcher(sector: &Path) -> Result<(Launcher, String), String> {
    let bin = find_qemu()?;
    let version = qemu_version(&bin);
    Ok((
        Launcher {
            vmm: Vmm::Qemu,
            bin,
            guest: Guest::Sector(sector.to_owned()),
        },
        version,
    ))
}

/// The ab sector with the bench's touch size, written into `scratch`.
fn sector(scratch: &Path) -> Result<PathBuf, String> {
    crate::guests::write_sectors(scratch, TOUCH)?
        .into_iter()
        .find(|(s, _)| *s == BootSector::Ab)
        .map(|(_, p)| p)
        .ok_or_else(|| "no ab boot sector was written".into())
}

fn scratch(what: &str) -> Scratch {
    let s =
        Scratch(std::env::temp_dir().join(format!("xtask-snapshot-{what}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&s.0);
    s
}

/// Why KVM cannot run the guests, if it cannot.
fn no_kvm() -> Option<String> {
    vmm_glue::kvm::host_facts()
        .err()
        .map(|e| format!("/dev/kvm is unusable: {}", vmm_glue::error_chain(&e)))
}

/// The save figures: `demovm`'s background snapshot (baseline QEMU's where QEMU is
/// installed) and its precopy save. With `vs_qemu` only the rows compared with QEMU,
/// named `vs_qemu.*`.
pub fn save_figures(vs_qemu: bool) -> Result<Vec<Report>, String> {
    let prefix = if vs_qemu {
        "vs_qemu.snapshot_ab_512m_1g"
    } else {
        PREFIX
    };
    if let Some(why) = no_kvm() {
        return Ok(vec![Report::Skipped {
            name: format!("{prefix}.*"),
            why,
        }]);
    }
    let bin = e2e::harness::demovm_path()?;
    let scratch = scratch("save");
    let sector = sector(&scratch.0)?;
    let qemu = qemu_launcher(&sector);
    if vs_qemu {
        if let Err(why) = &qemu {
            return Ok(vec![Report::Skipped {
                name: format!("{prefix}.*"),
                why: why.clone(),
            }]);
        }
    }
    eprintln!(
        "snapshot: ab boot sector touching {} in a {MEM_MIB} MiB guest, {ROUNDS} rounds; {}",
        show_size(TOUCH),
        qemu.as_ref().map_or_else(|w| w.clone(), |(_, v)| v.clone())
    );
    let (mut ours, mut pres, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for r in 1..=ROUNDS {
        if let Ok((l, _)) = &qemu {
            let s = qemu_round(l, &scratch.0.join(format!("qemu-{r}")))
                .map_err(|e| format!("snapshot round {r} (qemu): {e}"))?;
            eprintln!(
                "snapshot round {r}/{ROUNDS} qemu  : background {:>6.0} ms, file {:>5.0} MiB, \
                 pause {:?} ms, {:?} guest passes during it",
                s.total_ms, s.allocated_mib, s.pause_ms, s.passes
            );
            theirs.push(s);
        }
        let dir = scratch.0.join(format!("demovm-{r}"));
        let (bg, pre) = demovm_round(&bin, &sector, &dir, !vs_qemu)
            .map_err(|e| format!("snapshot round {r} (demovm): {e}"))?;
        eprintln!(
            "snapshot round {r}/{ROUNDS} demovm: background {:>6.0} ms, file {:>5.0} MiB \
             allocated ({:.0} MiB long), pause {:?} ms, stall p50 {:?} us p99 {:?} us, \
             {:?} write faults, {:?} guest passes during it{}",
            bg.total_ms,
            bg.allocated_mib,
            bg.len_mib,
            bg.pause_ms,
            bg.stall_p50_us,
            bg.stall_p99_us,
            bg.write_faults,
            bg.passes,
            pre.as_ref().map_or_else(String::new, |p| format!(
                "; precopy {:>6.0} ms, {:>6.0} MiB{}",
                p.total_ms,
                p.allocated_mib,
                if p.converged {
                    ""
                } else {
                    " (cancelled: did not converge)"
                }
            ))
        );
        ours.push(bg);
        pres.extend(pre);
    }
    let kvm = if e2e::harness::kvm_is_pvm() {
        "KVM (PVM, kvm_pvm)"
    } else {
        "KVM"
    };
    let med = |rs: &[Save], f: &dyn Fn(&Save) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = rs.iter().filter_map(f).collect();
        (v.len() == rs.len() && !v.is_empty()).then(|| median(v))
    };
    let base_note = format!(
        "running ab boot sector, {} touched, {MEM_MIB} MiB guest, {kvm}, after one full \
         pass; max-bandwidth {MAX_BANDWIDTH} B/s (unlimited in effect); medians of \
         {ROUNDS} rounds",
        show_size(TOUCH)
    );
    let note = match &qemu {
        Ok((_, v)) => format!(
            "{base_note}; value demovm background snapshot to file:, baseline {v} \
             background snapshot to exec:cat > FILE, alternating; guest_pass_rate: the \
             passes over its 512 MiB the guest finished while the save ran, per minute of \
             the save (its progress, to within one pass); every guest printed on after its \
             save"
        ),
        Err(why) => format!("{base_note}; no QEMU baseline: {why}"),
    };
    let mut out = Vec::new();
    let mut row = |name: &str, unit: &'static str, f: &dyn Fn(&Save) -> Option<f64>| {
        let Some(v) = med(&ours, f) else {
            out.push(Report::Skipped {
                name: format!("{prefix}.{name}"),
                why: "demovm's query-migrate did not report it".into(),
            });
            return;
        };
        let mut fig = Figure::new(format!("{prefix}.{name}"), v, unit).note(note.clone());
        if let Some(b) = med(&theirs, f) {
            fig = fig.baseline(b);
        }
        out.push(fig.into());
    };
    row("total_time", "ms", &|s| Some(s.total_ms));
    row("file_allocated", "MiB", &|s| Some(s.allocated_mib));
    row("pause", "ms", &|s| s.pause_ms);
    row("guest_pass_rate", "passes/min", &|s| {
        s.passes.map(|p| p / (s.total_ms.max(1.0) / 60_000.0))
    });
    if !vs_qemu {
        // QEMU reports no write-fault stalls: no baseline.
        row("stall_p50", "us", &|s| s.stall_p50_us);
        row("stall_p99", "us", &|s| s.stall_p99_us);
        row("write_faults", "faults", &|s| s.write_faults);
        let converged = pres.iter().all(|p| p.converged);
        let pre_note = format!(
            "{base_note}; value: demovm dirty-logging (precopy) save of the same running \
             guest to file: right after its background snapshot, downtime-limit \
             {DOWNTIME_LIMIT_MS} ms{}; baseline: its background snapshot",
            if converged {
                String::new()
            } else {
                format!(
                    "; SOME ROUNDS DID NOT CONVERGE and were cancelled after \
                     {PRECOPY_GIVE_UP:?} (their time and size so far are counted)"
                )
            }
        );
        let pre_prefix = "snapshot.precopy_file_ab_512m_1g";
        for (name, unit, f) in [
            (
                "total_time",
                "ms",
                (|s: &Save| s.total_ms) as fn(&Save) -> f64,
            ),
            ("file_allocated", "MiB", |s: &Save| s.allocated_mib),
        ] {
            out.push(
                Figure::new(
                    format!("{pre_prefix}.{name}"),
                    median(pres.iter().map(f).collect()),
                    unit,
                )
                .baseline(median(ours.iter().map(f).collect()))
                .note(pre_note.clone())
                .into(),
            );
            // A dirty-logging save now and then chases the guest for long: show the
            // worst round too, beside the background snapshot's worst.
            let max = |v: &[Save]| v.iter().map(f).fold(0.0, f64::max);
            out.push(
                Figure::new(format!("{pre_prefix}.{name}_max"), max(&pres), unit)
                    .baseline(max(&ours))
                    .note(pre_note.clone())
                    .into(),
            );
        }
    }
    Ok(out)
}

/// What one restore measured, from the process's spawn.
struct Restore {
    first_run: Duration,
    first_output: Duration,
    complete: Duration,
}

/// One restore of `file` into a fresh `demovm` of `mem_mib` in `mode`.
fn restore_once(
    bin: &Path,
    sector: &Path,
    mem_mib: u64,
    file: &Path,
    mode: &str,
    dir: &Path,
) -> Result<Restore, String> {
    let mut vm = Vm::start(&format!("demovm restore {mode}"), dir, |q, s| {
        let mut c = demovm(bin, sector, mem_mib, q, s);
        c.arg("--incoming")
            .arg(format!("file:{}", file.display()))
            .arg("--restore-mode")
            .arg(mode);
        c
    })?;
    let s = vm
        .poll_for("query-status", HANG_GUARD, |s| {
            s.get("x-first-run-unix-us").is_some()
        })?
        .ok_or("the restored guest never ran")?;
    let first_run = since_spawn(vm.spawned, field(&s, "x-first-run-unix-us"));
    let q = vm.wait_migration()?;
    if status(&q) != "completed" {
        return Err(format!("{}: the restore did not complete: {q}", vm.name));
    }
    // The whole restore, from the spawn (the destination's total-time starts at its
    // incoming migration, after the process set itself up), to within one poll.
    let complete = vm.spawned.elapsed().unwrap_or_default();
    let first_output = vm.first_output()?;
    let printed = vm.serial_len();
    vm.wait_serial("the restored guest's COM1 output to grow", |out| {
        out.len() as u64 > printed
    })?;
    let st = vm.cmd("query-status", json!({}))?;
    if st.get("status").and_then(Value::as_str) != Some("running") {
        return Err(format!(
            "{}: the restored guest is not running: {st}",
            vm.name
        ));
    }
    Ok(Restore {
        first_run,
        first_output,
        complete,
    })
}

/// A snapshot of the ab guest in `mem_mib`, written to `file` by a background
/// snapshot of a `demovm` that is then stopped.
fn make_snapshot(
    bin: &Path,
    sector: &Path,
    mem_mib: u64,
    file: &Path,
    dir: &Path,
) -> Result<(), String> {
    let mut vm = Vm::start("demovm snapshot source", dir, |q, s| {
        demovm(bin, sector, mem_mib, q, s)
    })?;
    vm.wait_serial("the guest's banner and one full pass", one_pass_done)?;
    background_snapshot(&mut vm, &format!("file:{}", file.display()), file)?;
    Ok(())
}

/// Free memory in MiB (`MemAvailable`), if known.
fn available_mib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib / 1024)
    })
}

/// The lazy-against-eager restore figures, for a 1 GiB and a 4 GiB guest.
pub fn restore_figures() -> Result<Vec<Report>, String> {
    if let Some(why) = no_kvm() {
        return Ok(vec![Report::Skipped {
            name: "snapshot.restore_*".into(),
            why,
        }]);
    }
    let bin = e2e::harness::demovm_path()?;
    let scratch = scratch("restore");
    let sector = sector(&scratch.0)?;
    let mut out = Vec::new();
    for (mem_mib, tag) in [(1024u64, "1g"), (BIG_MIB, "4g")] {
        let prefix = format!("snapshot.restore_{tag}");
        // The guest's RAM is sparse (512 MiB touched), but a restore may populate
        // more: ask for the whole guest, twice over (source and restore, one at a
        // time, plus the page cache's copy of the file).
        if let Some(avail) = available_mib() {
            if avail < 2 * mem_mib {
                out.push(Report::Skipped {
                    name: format!("{prefix}.*"),
                    why: format!("{avail} MiB available, fewer than twice the {mem_mib} MiB guest"),
                });
                continue;
            }
        }
        let dir = scratch.0.join(tag);
        let file = dir.join("snapshot.bin");
        make_snapshot(&bin, &sector, mem_mib, &file, &dir.join("source"))?;
        let (allocated, _) = file_sizes(&file)?;
        let (mut lazy, mut eager) = (Vec::new(), Vec::new());
        for r in 1..=ROUNDS {
            for (mode, done) in [("lazy", &mut lazy), ("eager", &mut eager)] {
                let d = dir.join(format!("{mode}-{r}"));
                let got = restore_once(&bin, &sector, mem_mib, &file, mode, &d)
                    .map_err(|e| format!("restore {tag} round {r} ({mode}): {e}"))?;
                eprintln!(
                    "restore {tag} round {r}/{ROUNDS} {mode:<5}: first run {:>7.1} ms, \
                     first output {:>7.1} ms, complete {:>7.1} ms",
                    ms(got.first_run),
                    ms(got.first_output),
                    ms(got.complete)
                );
                done.push(got);
                let _ = std::fs::remove_dir_all(&d);
            }
        }
        let note = format!(
            "ab boot sector, {} touched, {mem_mib} MiB guest, snapshot file {:.0} MiB \
             allocated, in the page cache; from spawning demovm --incoming file:PATH: \
             value --restore-mode lazy, baseline --restore-mode eager of the same file; \
             first_run: to the guest's first run (x-first-run-unix-us: the vCPUs told to \
             run), first_output: to its first COM1 byte (it prints after finishing the \
             pass it was in, so a lazy guest faults in all it touches first), complete: \
             to the restore's end (lazy: the background fill done); medians of {ROUNDS} \
             rounds, alternating; every restored guest ran on and printed",
            show_size(TOUCH),
            allocated as f64 / MIB
        );
        for (name, f) in [
            (
                "first_run",
                (|r: &Restore| r.first_run) as fn(&Restore) -> Duration,
            ),
            ("first_output", |r: &Restore| r.first_output),
            ("complete", |r: &Restore| r.complete),
        ] {
            let m = |rs: &[Restore]| median(rs.iter().map(|r| ms(f(r))).collect());
            out.push(
                Figure::new(format!("{prefix}.{name}"), m(&lazy), "ms")
                    .baseline(m(&eager))
                    .note(note.clone())
                    .into(),
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_run_is_measured_from_the_spawn() {
        let spawned = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            since_spawn(spawned, 1_000_002_500),
            Duration::from_micros(2500)
        );
        // A clock step backwards gives zero, not a panic.
        assert_eq!(since_spawn(spawned, 999_000_000), Duration::ZERO);
    }

    #[test]
    fn only_final_states_end_a_wait() {
        for s in ["completed", "failed", "cancelled"] {
            assert!(is_final(&json!({ "status": s })), "{s}");
        }
        for s in ["setup", "active", "none"] {
            assert!(!is_final(&json!({ "status": s })), "{s}");
        }
        assert!(!is_final(&json!({})));
    }

    #[test]
    fn passes_are_the_bs_after_the_mark() {
        assert_eq!(passes_after(b"ab\r\nBBB", 0), 3);
        assert_eq!(passes_after(b"ab\r\nBBB", 5), 2);
        assert_eq!(passes_after(b"ab\r\nBBB", 99), 0);
    }
}
