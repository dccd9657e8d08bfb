//! Migration scenarios between `demovm` processes, driven over QMP.
//!
//! Each checks what an operator would: final states on both sides, whether the guest
//! runs where it should, RAM equal on both sides (`x-ram-digest`) or passing the a-b
//! check, and clear errors where something went wrong.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use migration_stream::{BlockId, BlockInfo, Hello, MigrationId, Role, StreamWriter};
use serde_json::{json, Value};
use vmm_glue::guest::ab_check;

use crate::harness::{field, DemoVm, VmOpts};
use crate::{Failure, Outcome};

fn vm(
    name: &str,
    mem_mib: u64,
    vcpus: usize,
    guest: &str,
    incoming: Option<&str>,
) -> Result<DemoVm, String> {
    DemoVm::start(
        name,
        &VmOpts {
            mem_mib,
            vcpus,
            guest,
            incoming,
        },
    )
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failure> {
    if cond {
        Ok(())
    } else {
        Err(Failure::Failed(what()))
    }
}

fn status(q: &Value) -> &str {
    q.get("status").and_then(Value::as_str).unwrap_or("?")
}

/// `query-migrate`'s `error-desc`, empty when there is none.
fn error_desc(q: &Value) -> String {
    q.get("error-desc")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// Settings under which an `ab` guest converges: no bandwidth cap, a generous downtime.
fn converge(vm: &mut DemoVm) -> Result<(), String> {
    vm.qmp
        .cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 0, "downtime-limit": 5000}),
        )
        .map(drop)
}

fn migrate(src: &mut DemoVm, uri: &str) -> Result<(), String> {
    src.qmp.cmd("migrate", json!({ "uri": uri })).map(drop)
}

/// What ran the guests' vCPUs, from each VM's `x-guest-info`: one word when they
/// agree (`soft`), else the distinct values joined with `+`.
fn accel(vms: &mut [&mut DemoVm]) -> Result<String, String> {
    let mut seen: Vec<String> = Vec::new();
    for vm in vms {
        let a = vm.accel()?;
        if !seen.contains(&a) {
            seen.push(a);
        }
    }
    Ok(seen.join("+"))
}

fn outcome(q: &Value, accel: String, note: String) -> Outcome {
    Outcome {
        accel: Some(accel),
        total: Duration::from_millis(field(q, "total-time")),
        downtime: q
            .get("downtime")
            .and_then(Value::as_u64)
            .map(Duration::from_millis),
        bytes: field(q, "ram.transferred"),
        pages: field(q, "ram.normal") + field(q, "ram.duplicate"),
        faults: 0,
        note,
    }
}

/// A destination that loads and then stays paused (`--incoming defer`, `stop`,
/// `migrate-incoming`), so its RAM can be compared with the source's.
fn paused_destination(
    name: &str,
    mem_mib: u64,
    vcpus: usize,
    guest: &str,
    uri: &str,
) -> Result<DemoVm, String> {
    let mut dst = DemoVm::start(
        name,
        &VmOpts {
            mem_mib,
            vcpus,
            guest,
            incoming: Some("defer"),
        },
    )?;
    dst.qmp.cmd("stop", json!({}))?;
    dst.qmp.cmd("migrate-incoming", json!({ "uri": uri }))?;
    Ok(dst)
}

fn stopped(transport: &str) -> Result<Outcome, Failure> {
    let mut src = vm("src", 64, 1, "builtin:ab", None)?;
    src.wait_serial_beyond(2)?;
    src.qmp.cmd("stop", json!({}))?;
    let uri = match transport {
        "tcp" => "tcp:127.0.0.1:0".to_owned(),
        _ => format!("unix:{}", src.dir.join("migration.sock").display()),
    };
    let mut dst = vm("dst", 64, 1, "builtin:ab", Some(&uri))?;
    let uri = dst.incoming_uri()?;
    migrate(&mut src, &uri)?;
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    let (rs_src, rs_dst) = (src.run_status()?, dst.run_status()?);
    expect(rs_src == "postmigrate", || {
        format!("source run state {rs_src}")
    })?;
    expect(rs_dst == "paused", || {
        format!("destination run state {rs_dst}: a guest stopped on the source must stay stopped")
    })?;
    let (a, b) = (src.digest()?, dst.digest()?);
    expect(a == b, || {
        format!("RAM differs: source {a}, destination {b}")
    })?;
    ab_check(&dst.page_bytes()?, 1).map_err(|e| format!("destination RAM: {e}"))?;
    let accel = accel(&mut [&mut src, &mut dst])?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "over {transport}: x-ram-digest equal on both sides; destination paused like the source"
        ),
    ))
}

/// A stopped guest over TCP: RAM equal on both sides.
pub fn stopped_tcp() -> Result<Outcome, Failure> {
    stopped("tcp")
}

/// A stopped guest over a Unix socket: RAM equal on both sides.
pub fn stopped_unix() -> Result<Outcome, Failure> {
    stopped("unix")
}

/// A running `ab` guest on two vCPUs migrated live. The destination is held paused
/// after loading so its RAM can be compared with the source's exactly, then resumed:
/// it prints new `B`s and its RAM passes the a-b check.
pub fn live_ab() -> Result<Outcome, Failure> {
    let mut src = vm("src", 128, 2, "builtin:ab", None)?;
    src.wait_serial_beyond(4)?;
    let mut dst = paused_destination("dst", 128, 2, "builtin:ab", "tcp:127.0.0.1:0")?;
    let uri = dst.incoming_uri()?;
    // QEMU's defaults first (128 MiB/s, 300 ms): ab dirties all of its memory faster
    // than that, so the migration iterates without converging...
    migrate(&mut src, &uri)?;
    let q = src.wait_migration("two dirty-log syncs", |q| {
        field(q, "ram.dirty-sync-count") >= 2
    })?;
    expect(status(&q) == "active", || {
        format!("should still be iterating: {q}")
    })?;
    expect(src.run_status()? == "running", || {
        "the guest must run during precopy".into()
    })?;
    // ... until the operator allows more bandwidth and downtime, mid-migration.
    converge(&mut src)?;
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    expect(src.run_status()? == "postmigrate", || {
        "source should be in postmigrate".into()
    })?;
    let (a, b) = (src.digest()?, dst.digest()?);
    expect(a == b, || {
        format!("RAM differs after a live migration: source {a}, destination {b}")
    })?;
    let serial_src = src.serial_len();
    let migration_events = |vm: &DemoVm| -> Vec<String> {
        vm.qmp
            .events
            .iter()
            .filter(|e| e.get("event").and_then(Value::as_str) == Some("MIGRATION"))
            .filter_map(|e| e.get("data")?.get("status")?.as_str().map(str::to_owned))
            .collect()
    };
    let seen = migration_events(&src);
    expect(seen == ["setup", "active", "completed"], || {
        format!("source MIGRATION events {seen:?}, expected setup, active, completed")
    })?;
    let stops = src
        .qmp
        .events
        .iter()
        .filter(|e| e.get("event").and_then(Value::as_str) == Some("STOP"))
        .count();
    expect(stops == 1, || {
        format!("source emitted {stops} STOP events, expected 1 at switchover")
    })?;

    dst.qmp.cmd("cont", json!({}))?;
    dst.qmp.cmd("query-status", json!({}))?;
    let resumed = dst
        .qmp
        .events
        .iter()
        .any(|e| e.get("event").and_then(Value::as_str) == Some("RESUME"));
    expect(resumed, || {
        "the destination emitted no RESUME on cont".into()
    })?;
    let before = dst.serial_len();
    dst.wait_serial_beyond(before + 2)?;
    dst.qmp.cmd("stop", json!({}))?;
    ab_check(&dst.page_bytes()?, 2).map_err(|e| format!("destination after running on: {e}"))?;
    expect(src.serial_len() == serial_src, || {
        "the source guest printed after it migrated away".into()
    })?;
    let syncs = field(&q, "ram.dirty-sync-count");
    let accel = accel(&mut [&mut src, &mut dst])?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "{syncs} dirty syncs; RAM equal at switchover; destination printed new Bs and passes the a-b check"
        ),
    ))
}

/// A `random` guest under a tight downtime and low bandwidth never converges; cancel
/// returns the source to running, unharmed; a second migration then succeeds.
pub fn cancel_random() -> Result<Outcome, Failure> {
    let mut src = vm("src", 128, 1, "builtin:random", None)?;
    let mut dst1 = vm("dst1", 128, 1, "builtin:random", Some("tcp:127.0.0.1:0"))?;
    src.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 32 << 20, "downtime-limit": 1}),
    )?;
    let uri = dst1.incoming_uri()?;
    migrate(&mut src, &uri)?;
    let q = src.wait_migration("three dirty-log syncs", |q| {
        field(q, "ram.dirty-sync-count") >= 3
    })?;
    expect(status(&q) == "active", || {
        format!("a non-converging migration must stay active: {q}")
    })?;
    expect(field(&q, "ram.remaining") > 0, || {
        format!("pages should remain: {q}")
    })?;
    src.qmp.cmd("migrate_cancel", json!({}))?;
    let q = src.wait_finished()?;
    expect(status(&q) == "cancelled", || {
        format!("after migrate_cancel: {q}")
    })?;
    expect(src.run_status()? == "running", || {
        "the source must run again after cancel".into()
    })?;
    let d1 = dst1.wait_finished()?;
    expect(status(&d1) == "failed", || {
        format!("the abandoned destination: {d1}")
    })?;
    expect(dst1.run_status()? == "inmigrate", || {
        "the abandoned destination must not run the guest".into()
    })?;
    // The guest is alive: its memory keeps changing.
    src.wait_ram_changes()?;

    // A second migration, to a fresh destination, with limits that converge.
    let mut dst2 = paused_destination("dst2", 128, 1, "builtin:random", "tcp:127.0.0.1:0")?;
    let uri = dst2.incoming_uri()?;
    converge(&mut src)?;
    migrate(&mut src, &uri)?;
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || {
        format!("second migration: {q}")
    })?;
    let d2 = dst2.wait_finished()?;
    expect(status(&d2) == "completed", || {
        format!("second destination: {d2}")
    })?;
    let (a, b) = (src.digest()?, dst2.digest()?);
    expect(a == b, || {
        format!("RAM differs after the second migration: {a} vs {b}")
    })?;
    dst2.qmp.cmd("cont", json!({}))?;
    dst2.wait_ram_changes()?;
    let accel = accel(&mut [&mut src, &mut dst1, &mut dst2])?;
    Ok(outcome(
        &q,
        accel,
        "first attempt stayed active, cancelled, source unharmed; second migration completed, RAM equal".into(),
    ))
}

/// The destination is killed mid-migration: the source reports `failed` with a clear
/// reason and its guest keeps running.
pub fn dest_killed() -> Result<Outcome, Failure> {
    let mut src = vm("src", 128, 1, "builtin:ab", None)?;
    let mut dst = vm("dst", 128, 1, "builtin:ab", Some("tcp:127.0.0.1:0"))?;
    // Asked now: the destination will not be there to answer.
    let accel = accel(&mut [&mut src, &mut dst])?;
    src.qmp
        .cmd("migrate-set-parameters", json!({"max-bandwidth": 16 << 20}))?;
    let uri = dst.incoming_uri()?;
    migrate(&mut src, &uri)?;
    src.wait_migration("pages to flow", |q| field(q, "ram.transferred") > 4 << 20)?;
    dst.kill();
    let q = src.wait_finished()?;
    expect(status(&q) == "failed", || {
        format!("source after the destination died: {q}")
    })?;
    let desc = error_desc(&q);
    expect(!desc.is_empty(), || format!("no error-desc: {q}"))?;
    expect(src.run_status()? == "running", || {
        "the source guest must keep running".into()
    })?;
    let before = src.serial_len();
    src.wait_serial_beyond(before)?;
    src.qmp.cmd("stop", json!({}))?;
    ab_check(&src.page_bytes()?, 1).map_err(|e| format!("source RAM after the failure: {e}"))?;
    Ok(outcome(
        &q,
        accel,
        format!("source failed with \"{desc}\"; guest still running, a-b check holds"),
    ))
}

/// The destination refuses the migration after all RAM arrived (it has one vCPU, the
/// source two, so the vCPU state does not load). The source reports `failed` with the
/// destination's status, and its guest goes back to the state it had before the
/// switchover: a stopped guest stays stopped with RAM untouched, a running guest runs
/// again and passes the a-b check.
pub fn dest_refuses() -> Result<Outcome, Failure> {
    let mut notes = Vec::new();
    let mut last = None;
    for running in [false, true] {
        let mut src = vm("src", 64, 2, "builtin:ab", None)?;
        src.wait_serial_beyond(2)?;
        if !running {
            src.qmp.cmd("stop", json!({}))?;
        }
        converge(&mut src)?;
        let before = src.digest()?;
        let mut dst = vm("dst", 64, 1, "builtin:ab", Some("tcp:127.0.0.1:0"))?;
        let uri = dst.incoming_uri()?;
        migrate(&mut src, &uri)?;
        let q = src.wait_finished()?;
        expect(status(&q) == "failed", || format!("source: {q}"))?;
        let desc = error_desc(&q);
        expect(desc.contains("destination failed to load"), || {
            format!("the source must say the destination refused: {q}")
        })?;
        let d = dst.wait_finished()?;
        expect(status(&d) == "failed", || format!("destination: {d}"))?;
        let why = error_desc(&d);
        expect(why.contains("vCPU"), || {
            format!("the destination must name the vCPU state: {d}")
        })?;
        let rs = src.run_status()?;
        if running {
            expect(rs == "running", || {
                format!("source run state {rs}: a running guest must run again")
            })?;
            src.wait_ram_changes()?;
            src.qmp.cmd("stop", json!({}))?;
            ab_check(&src.page_bytes()?, 2)
                .map_err(|e| format!("source RAM after the refusal: {e}"))?;
            notes.push("running source runs again, a-b check holds".to_owned());
        } else {
            expect(rs == "paused", || {
                format!("source run state {rs}: a guest stopped by the operator must stay stopped")
            })?;
            let after = src.digest()?;
            expect(after == before, || {
                format!("a stopped guest's RAM changed: {before} then {after}")
            })?;
            notes.push("stopped source stays paused, RAM unchanged".to_owned());
        }
        last = Some((q, desc, accel(&mut [&mut src, &mut dst])?));
    }
    let (q, desc, accel) = last.ok_or_else(|| Failure::Failed("no attempt ran".into()))?;
    Ok(outcome(
        &q,
        accel,
        format!("\"{desc}\"; {}", notes.join("; ")),
    ))
}

/// `migrate file:` saves a running guest; `--incoming file:` restores it exactly.
pub fn file_save_restore() -> Result<Outcome, Failure> {
    let mut src = vm("src", 64, 1, "builtin:ab", None)?;
    src.wait_serial_beyond(2)?;
    converge(&mut src)?;
    let path = src.dir.join("guest.mig");
    migrate(&mut src, &format!("file:{}", path.display()))?;
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || format!("save: {q}"))?;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    expect(size > 0, || "the file is empty".into())?;
    let mut dst = paused_destination(
        "restored",
        64,
        1,
        "builtin:ab",
        &format!("file:{}", path.display()),
    )?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("restore: {d}"))?;
    let (a, b) = (src.digest()?, dst.digest()?);
    expect(a == b, || format!("restored RAM differs: {a} vs {b}"))?;
    dst.qmp.cmd("cont", json!({}))?;
    let before = dst.serial_len();
    dst.wait_serial_beyond(before + 1)?;
    let accel = accel(&mut [&mut src, &mut dst])?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "{} MiB file; restored RAM equal; restored guest runs",
            size >> 20
        ),
    ))
}

/// A hostile peer connects to a destination and sends one bad stream. Returns the
/// destination's `error-desc` and what ran its vCPUs.
fn hostile_case(
    name: &str,
    send: impl FnOnce(&mut TcpStream) -> std::io::Result<()>,
) -> Result<(String, String), Failure> {
    let mut dst = vm(name, 64, 1, "builtin:ab", Some("tcp:127.0.0.1:0"))?;
    let before = dst.digest()?;
    let uri = dst.incoming_uri()?;
    let addr = uri.trim_start_matches("tcp:");
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{name}: connect: {e}"))?;
    // The destination may close early; its verdict is what counts.
    let _ = send(&mut s);
    let _ = s.flush();
    drop(s);
    let q = dst.wait_finished()?;
    expect(status(&q) == "failed", || {
        format!("{name}: the destination accepted a bad stream: {q}")
    })?;
    let desc = error_desc(&q);
    expect(!desc.is_empty(), || format!("{name}: no error-desc"))?;
    expect(dst.alive(), || {
        format!("{name}: the destination process died")
    })?;
    expect(dst.run_status()? == "inmigrate", || {
        format!("{name}: the guest must not run")
    })?;
    let after = dst.digest()?;
    expect(before == after, || {
        format!("{name}: guest memory changed: {before} -> {after}")
    })?;
    let accel = dst.accel()?;
    Ok((format!("{name}: {desc}"), accel))
}

fn blocks(mem: u64) -> Vec<BlockInfo> {
    vec![
        BlockInfo {
            name: "pc.ram.low".into(),
            size: 0xa_0000,
            page_size: 4096,
        },
        BlockInfo {
            name: "pc.ram".into(),
            size: mem - 0x10_0000,
            page_size: 4096,
        },
    ]
}

fn main_stream(s: &mut TcpStream) -> std::io::Result<StreamWriter<&mut TcpStream>> {
    let mut w = StreamWriter::new(s);
    w.write_preamble(&Hello::new(Role::Main, MigrationId::generate()))
        .map_err(std::io::Error::other)?;
    Ok(w)
}

/// A valid preamble and `RamSetup` for `mem`, then the raw socket for what follows.
fn after_setup(s: &mut TcpStream, mem: u64) -> std::io::Result<&mut TcpStream> {
    let mut w = main_stream(s)?;
    w.write_ram_setup(&blocks(mem))
        .map_err(std::io::Error::other)?;
    w.flush().map_err(std::io::Error::other)?;
    w.into_inner().map_err(std::io::Error::other)
}

/// Hostile peers: garbage, a truncated page, an out-of-range offset, an oversized
/// length, and blocks that do not match. Each destination fails with a clear error,
/// keeps running as a process, and its guest memory is untouched.
pub fn hostile_streams() -> Result<Outcome, Failure> {
    let start = Instant::now();
    let mut notes = Vec::new();
    let mem = 64u64 << 20;
    notes.push(hostile_case("garbage", |s| {
        let mut x = 0x1234_5678_9abc_def0u64;
        let junk: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        s.write_all(&junk)
    })?);
    notes.push(hostile_case("truncated", |s| {
        let inner = after_setup(s, mem)?;
        // A page record for pc.ram offset 0 with half its payload.
        let mut rec = vec![2u8, 1];
        rec.extend_from_slice(&1u32.to_be_bytes());
        rec.extend_from_slice(&0u64.to_be_bytes());
        rec.extend_from_slice(&[0xabu8; 2048]);
        inner.write_all(&rec)
    })?);
    notes.push(hostile_case("out-of-range", |s| {
        let inner = after_setup(s, mem)?;
        let mut rec = vec![2u8, 1];
        rec.extend_from_slice(&1u32.to_be_bytes());
        rec.extend_from_slice(&(mem).to_be_bytes());
        rec.extend_from_slice(&[0xcdu8; 4096]);
        inner.write_all(&rec)
    })?);
    notes.push(hostile_case("oversized", |s| {
        let inner = after_setup(s, mem)?;
        // A DeviceState command claiming a 4 GiB body.
        let mut rec = vec![4u8, 8];
        rec.extend_from_slice(&u32::MAX.to_be_bytes());
        rec.extend_from_slice(&[0u8; 64]);
        inner.write_all(&rec)
    })?);
    notes.push(hostile_case("wrong-blocks", |s| {
        let mut w = main_stream(s)?;
        let mut b = blocks(mem);
        b[1].size += 4096;
        w.write_ram_setup(&b).map_err(std::io::Error::other)?;
        w.write_page(BlockId(1), 0, &[0xeeu8; 4096])
            .map_err(std::io::Error::other)?;
        w.flush().map_err(std::io::Error::other)
    })?);
    let mut accels: Vec<String> = Vec::new();
    let mut descs = Vec::new();
    for (desc, accel) in notes {
        descs.push(desc);
        if !accels.contains(&accel) {
            accels.push(accel);
        }
    }
    Ok(Outcome {
        total: start.elapsed(),
        accel: Some(accels.join("+")),
        note: format!(
            "5 bad streams refused, memory untouched: {}",
            descs.join(" | ")
        ),
        ..Outcome::default()
    })
}
