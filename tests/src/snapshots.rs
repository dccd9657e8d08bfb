//! Background snapshots and restores between `demovm` processes, driven over
//! QMP: a running guest saved once per page under write protection, then
//! restored eagerly or lazily.
//!
//! Each checks what an operator would: the snapshot is RAM of one instant
//! (the digest a test hook took at the instant, the a-b check), its file is
//! about the size of the touched memory, the guest ran on during the save,
//! the restored guest runs on from the snapshot, and every way out of a
//! snapshot (completion, cancel, a full disk) leaves the guest running with
//! no page write-protected and no thread left behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{field, DemoVm};
use crate::migration::{accel_of, expect, status, Guest};
use crate::{Failure, Outcome};

/// `x-snapshot-digest` (the digest of RAM at the last snapshot's instant) or
/// `x-ram-digest` replies as comparable values.
fn blocks(d: &Value) -> Value {
    d.get("blocks").cloned().unwrap_or(Value::Null)
}

/// The per-block digests of a snapshot file, as `x-ram-digest` gives them.
fn file_digest(path: &Path) -> Result<Value, String> {
    let reader = migration_stream::SnapshotReader::open(path)
        .map_err(|e| format!("{}: {}", path.display(), vmm_glue::error_chain(&e)))?;
    let d = vmm_glue::verify::snapshot_digest(&reader).map_err(|e| vmm_glue::error_chain(&e))?;
    Ok(Value::Array(
        d.iter()
            .map(|d| json!({ "name": d.name, "size": d.size, "digest": d.sha256 }))
            .collect(),
    ))
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}

/// Waits until `pid` has `n` threads again (a migration's worker ends just
/// after it reports its final state).
fn wait_threads(vm: &DemoVm, n: usize) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let now = threads(vm.pid());
        if now == n {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "{}: {now} threads after the snapshot, {n} before: a thread was left behind",
                vm.name
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every way out of a snapshot leaves no page protected, every page
/// writable (a writer to every page returns) and the guest running.
fn nothing_protected(guest: &Guest, vm: &mut DemoVm, threads_before: usize) -> Result<(), String> {
    let wp = field(&vm.qmp.cmd("x-write-protected-pages", json!({}))?, "pages");
    if wp != 0 {
        return Err(format!("{}: {wp} pages still write-protected", vm.name));
    }
    vm.qmp.cmd("x-populate-write", json!({}))?;
    let rs = vm.run_status()?;
    if rs != "running" {
        return Err(format!("{}: the guest is {rs}, not running", vm.name));
    }
    guest.wait_runs(vm)?;
    wait_threads(vm, threads_before)
}

/// Starts a background snapshot of `src` to `uri` at `bandwidth` bytes/s.
fn start_snapshot(src: &mut DemoVm, uri: &str, bandwidth: u64) -> Result<(), String> {
    src.qmp.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    )?;
    src.qmp.cmd(
        "migrate-set-parameters",
        json!({ "max-bandwidth": bandwidth }),
    )?;
    src.qmp.cmd("migrate", json!({ "uri": uri })).map(drop)
}

/// A snapshot taken and checked: the file, the source's final reply, and
/// how much COM1 output the guest printed while it was saved.
struct Taken {
    path: PathBuf,
    q: Value,
    printed_during: u64,
}

/// Snapshots `src` (running, started with `--x-snapshot-digest`) to a file
/// and checks it: completed, the guest ran on meanwhile and runs on after,
/// nothing protected, no thread left, the file is RAM at the instant.
fn snapshot(guest: &Guest, src: &mut DemoVm, bandwidth: u64) -> Result<Taken, Failure> {
    let path = src.dir.join("guest.snap");
    let before = threads(src.pid());
    start_snapshot(src, &format!("file:{}", path.display()), bandwidth)?;
    let serial_at_start = src.serial_len();
    let q = src.wait_finished()?;
    let printed_during = src.serial_len().saturating_sub(serial_at_start);
    expect(status(&q) == "completed", || format!("snapshot: {q}"))?;
    nothing_protected(guest, src, before)?;
    let at_instant = blocks(&src.qmp.cmd("x-snapshot-digest", json!({}))?);
    let in_file = file_digest(&path)?;
    expect(at_instant == in_file, || {
        format!("the file is not RAM at the snapshot's instant: {in_file} vs {at_instant}")
    })?;
    Ok(Taken {
        path,
        q,
        printed_during,
    })
}

/// The source `--x-snapshot-digest` needs.
fn source(guest: &Guest) -> Result<DemoVm, String> {
    guest.start("src", None)
}

/// A restore of `path`: `--incoming file:PATH`, paused with `-S` when
/// `paused`, lazily when `lazy`.
fn restore(
    guest: &Guest,
    name: &str,
    path: &Path,
    lazy: bool,
    paused: bool,
) -> Result<DemoVm, String> {
    const DIGEST: &str = "--x-snapshot-digest";
    const LAZY: &str = "--restore-mode=lazy";
    let extra: &'static [&'static str] = match (lazy, paused) {
        (false, false) => &[DIGEST],
        (false, true) => &[DIGEST, "-S"],
        (true, false) => &[DIGEST, LAZY],
        (true, true) => &[DIGEST, LAZY, "-S"],
    };
    guest
        .clone()
        .with(extra)
        .start(name, Some(&format!("file:{}", path.display())))
}

fn ab(vcpus: usize) -> Guest {
    Guest::builtin("ab", vcpus, 64).with(&["--x-snapshot-digest"])
}

/// A running `ab` guest snapshotted to a file, then restored eagerly: the
/// saved RAM passes the a-b check and equals RAM at the instant, the file
/// is about the size of the touched memory, the guest printed during the
/// save, and the restored guest goes on printing.
fn ab_and_eager(guest: &Guest) -> Result<Outcome, Failure> {
    guest.available()?;
    let mut src = source(guest)?;
    guest.wait_runs(&mut src)?;
    // 64 MiB at 24 MiB/s: the guest writes to pages not saved yet.
    let t = snapshot(guest, &mut src, 24 << 20)?;
    expect(t.printed_during > 0, || {
        "the guest printed nothing while it was saved: it did not run".into()
    })?;
    let faults = field(&t.q, "x-snapshot.fault-pages");
    expect(faults > 0, || {
        format!("no page saved on a write fault: {}", t.q)
    })?;
    let meta = std::fs::metadata(&t.path).map_err(|e| e.to_string())?;
    let allocated = meta.blocks() * 512;
    let touched = guest.mem_mib() << 20;
    // The ab guest writes all of its RAM above 1 MiB: the file holds each
    // page once, never a multiple of it.
    expect(
        allocated <= touched + (2 << 20) && allocated >= touched / 2,
        || format!("the file allocates {allocated} bytes for {touched} bytes of touched RAM"),
    )?;
    let mut dst = restore(guest, "restored", &t.path, false, true)?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("restore: {d}"))?;
    let (file, ram) = (file_digest(&t.path)?, blocks(&dst.digest()?));
    expect(file == ram, || {
        format!("restored RAM differs from the file: {ram} vs {file}")
    })?;
    guest.ab_check(&mut dst, "in the snapshot")?;
    dst.qmp.cmd("cont", json!({}))?;
    guest.wait_runs(&mut dst)?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(Outcome {
        accel: Some(accel),
        total: Duration::from_millis(field(&t.q, "total-time")),
        downtime: Some(Duration::from_millis(field(&t.q, "downtime"))),
        bytes: allocated,
        pages: field(&t.q, "ram.normal") + field(&t.q, "ram.duplicate"),
        faults,
        note: format!(
            "{}: {} MiB file for {} MiB RAM; {faults} pages saved on write faults (writers \
             waited p50 {} us, p99 {} us); {} bytes printed during the save; file == RAM at \
             the instant; eager restore == file, a-b check holds, guest runs on",
            guest.name(),
            allocated >> 20,
            guest.mem_mib(),
            field(&t.q, "x-snapshot.stall-p50-us"),
            field(&t.q, "x-snapshot.stall-p99-us"),
            t.printed_during
        ),
    })
}

/// `snapshot-ab`: 2 vCPUs on KVM (or what the host has).
pub fn ab_eager() -> Result<Outcome, Failure> {
    ab_and_eager(&ab(2))
}

/// `snapshot-ab-soft`: the same on soft vCPUs.
pub fn ab_eager_soft() -> Result<Outcome, Failure> {
    ab_and_eager(&ab(2).soft())
}

/// `snapshot-lazy-restore`: a snapshot restored lazily. Paused, the
/// restore completes with RAM equal to the file; running, the guest runs
/// from the first moment on pages read as it touches them, the faults and
/// their latencies show in `query-migrate`, and the a-b check holds at the
/// end.
pub fn lazy() -> Result<Outcome, Failure> {
    let guest = ab(2);
    guest.available()?;
    let mut src = source(&guest)?;
    guest.wait_runs(&mut src)?;
    let t = snapshot(&guest, &mut src, 0)?;
    // The file is in the source's directory: stop the source, keep the file.
    src.kill();

    let mut paused = restore(&guest, "lazy-paused", &t.path, true, true)?;
    let d = paused.wait_finished()?;
    expect(status(&d) == "completed", || {
        format!("paused lazy restore: {d}")
    })?;
    let (file, ram) = (file_digest(&t.path)?, blocks(&paused.digest()?));
    expect(file == ram, || {
        format!("lazily restored RAM differs from the file: {ram} vs {file}")
    })?;
    drop(paused);

    let start = Instant::now();
    let mut dst = restore(&guest, "lazy", &t.path, true, false)?;
    // The guest runs while pages are still missing.
    guest.wait_runs(&mut dst)?;
    let first_output = start.elapsed();
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("lazy restore: {d}"))?;
    expect(d.get("x-restore-mode") == Some(&json!("lazy")), || {
        format!("{d}")
    })?;
    let faults = field(&d, "x-postcopy-faults");
    let requests = field(&d, "x-postcopy-requests");
    expect(faults > 0 && requests > 0, || {
        format!("the guest faulted on no missing page: {d}")
    })?;
    let hist = d
        .get("x-postcopy-latency-us")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    expect(hist > 0, || format!("no fault latency histogram: {d}"))?;
    expect(field(&d, "ram.remaining") == 0, || format!("{d}"))?;
    guest.wait_runs(&mut dst)?;
    dst.qmp.cmd("stop", json!({}))?;
    guest.ab_check(&mut dst, "after the lazy restore")?;
    let accel = accel_of(&mut [&mut dst])?;
    Ok(Outcome {
        accel: Some(accel),
        total: Duration::from_millis(field(&d, "total-time")),
        downtime: None,
        bytes: field(&d, "ram.transferred"),
        pages: field(&d, "ram.normal") + field(&d, "ram.duplicate"),
        faults,
        note: format!(
            "paused: RAM == file; running: first output {} ms after start, {faults} faults, \
             {requests} pages read on demand, blocktime {} ms; a-b check holds",
            first_output.as_millis(),
            field(&d, "postcopy-blocktime")
        ),
    })
}

/// `snapshot-random`: a multi-vCPU guest writing random pages is
/// snapshotted; the file, and RAM restored from it, equal the digest taken
/// at the instant the vCPUs stopped.
pub fn random_consistent() -> Result<Outcome, Failure> {
    let guest = Guest::builtin("random", 2, 64).with(&["--x-snapshot-digest"]);
    guest.available()?;
    let mut src = source(&guest)?;
    guest.wait_runs(&mut src)?;
    let t = snapshot(&guest, &mut src, 24 << 20)?;
    let at_instant = blocks(&src.qmp.cmd("x-snapshot-digest", json!({}))?);
    let mut dst = restore(&guest, "restored", &t.path, false, true)?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("restore: {d}"))?;
    let ram = blocks(&dst.digest()?);
    expect(ram == at_instant, || {
        format!("restored RAM is not RAM at the instant: {ram} vs {at_instant}")
    })?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    let faults = field(&t.q, "x-snapshot.fault-pages");
    Ok(Outcome {
        accel: Some(accel),
        total: Duration::from_millis(field(&t.q, "total-time")),
        downtime: Some(Duration::from_millis(field(&t.q, "downtime"))),
        bytes: field(&t.q, "ram.transferred"),
        pages: field(&t.q, "ram.normal") + field(&t.q, "ram.duplicate"),
        faults,
        note: format!(
            "2 vCPUs writing random pages: {faults} pages saved on write faults; file and \
             restored RAM == digest at the instant"
        ),
    })
}

/// A tmpfs of `size` bytes mounted for a test, unmounted on drop.
struct TinyFs {
    dir: PathBuf,
}

impl TinyFs {
    fn mount(dir: &Path, size: u64) -> Result<TinyFs, Failure> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .map_err(|e| Failure::Skipped(format!("cannot run mount: {e}")))?;
        if !out.status.success() {
            let why = format!(
                "cannot mount a small tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Err(if std::env::var("CI").as_deref() == Ok("true") {
                Failure::Failed(why)
            } else {
                Failure::Skipped(why)
            });
        }
        Ok(TinyFs {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

/// `snapshot-cancel-and-disk-full`: a snapshot cancelled half-way, and one
/// whose file system fills up half-way: each ends (cancelled, failed with
/// the disk's error), the guest runs on, no page stays write-protected, a
/// writer to every page returns, no thread is left behind and the
/// unfinished file is gone; a later snapshot completes.
pub fn cancel_and_disk_full() -> Result<Outcome, Failure> {
    let guest = ab(2);
    guest.available()?;
    let mut src = source(&guest)?;
    guest.wait_runs(&mut src)?;
    let before = threads(src.pid());

    let path = src.dir.join("cancelled.snap");
    start_snapshot(&mut src, &format!("file:{}", path.display()), 4 << 20)?;
    src.wait_migration("the snapshot to save pages", |q| {
        field(q, "ram.transferred") > 1 << 20
    })?;
    src.qmp.cmd("migrate_cancel", json!({}))?;
    let q = src.wait_finished()?;
    expect(status(&q) == "cancelled", || format!("cancel: {q}"))?;
    nothing_protected(&guest, &mut src, before)?;
    expect(!path.exists(), || {
        "the cancelled snapshot's file is left".into()
    })?;

    let fs = TinyFs::mount(&src.dir.join("tiny"), 8 << 20)?;
    let full = fs.dir.join("full.snap");
    start_snapshot(&mut src, &format!("file:{}", full.display()), 0)?;
    let q = src.wait_finished()?;
    let desc = q.get("error-desc").and_then(Value::as_str).unwrap_or("");
    expect(
        status(&q) == "failed" && desc.contains("No space left"),
        || format!("a full disk: {q}"),
    )?;
    expect(q.get("x-error-kind") == Some(&json!("local")), || {
        format!("{q}")
    })?;
    nothing_protected(&guest, &mut src, before)?;
    expect(!full.exists(), || {
        "the unfinished file is left on the full disk".into()
    })?;
    drop(fs);

    let t = snapshot(&guest, &mut src, 0)?;
    let accel = accel_of(&mut [&mut src])?;
    Ok(Outcome {
        accel: Some(accel),
        total: Duration::from_millis(field(&t.q, "total-time")),
        downtime: Some(Duration::from_millis(field(&t.q, "downtime"))),
        bytes: field(&t.q, "ram.transferred"),
        pages: field(&t.q, "ram.normal") + field(&t.q, "ram.duplicate"),
        faults: field(&t.q, "x-snapshot.fault-pages"),
        note: format!(
            "cancelled, then \"{desc}\": guest runs on, 0 pages write-protected, \
             x-populate-write returns, no thread left, no file left; the next snapshot completes"
        ),
    })
}

/// `snapshot-bad-file`: truncated and corrupt snapshot files fail the
/// restore with a clear protocol error; the destination process stays
/// alive, waiting, and restores a good file afterwards.
pub fn bad_file() -> Result<Outcome, Failure> {
    let guest = ab(1);
    guest.available()?;
    let mut src = source(&guest)?;
    guest.wait_runs(&mut src)?;
    let t = snapshot(&guest, &mut src, 0)?;
    let good = std::fs::read(&t.path).map_err(|e| e.to_string())?;
    let mut dst = guest.start("dst", Some("defer"))?;
    let mut seen = Vec::new();
    for (what, bytes, expected) in [
        ("truncated", good[..good.len() / 3].to_vec(), "truncated"),
        (
            "corrupt",
            {
                let mut b = good.clone();
                b[4096 + 40] ^= 1;
                b
            },
            "checksum",
        ),
    ] {
        let bad = src.dir.join("bad.snap");
        std::fs::write(&bad, bytes).map_err(|e| e.to_string())?;
        dst.qmp.cmd(
            "migrate-incoming",
            json!({"uri": format!("file:{}", bad.display()), "x-restore-mode": "lazy"}),
        )?;
        let d = dst.wait_finished()?;
        let desc = d.get("error-desc").and_then(Value::as_str).unwrap_or("");
        expect(status(&d) == "failed" && desc.contains(expected), || {
            format!("{what} file: {d}")
        })?;
        expect(d.get("x-error-kind") == Some(&json!("protocol")), || {
            format!("{d}")
        })?;
        expect(dst.alive() && dst.run_status()? == "inmigrate", || {
            format!("{what}: the destination must stay alive and waiting")
        })?;
        seen.push(format!("{what}: \"{desc}\""));
    }
    dst.qmp.cmd(
        "migrate-incoming",
        json!({"uri": format!("file:{}", t.path.display())}),
    )?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("good file: {d}"))?;
    guest.wait_runs(&mut dst)?;
    let accel = accel_of(&mut [&mut dst])?;
    Ok(Outcome {
        accel: Some(accel),
        note: format!("{}; then the good file restores and runs", seen.join("; ")),
        ..Outcome::default()
    })
}
