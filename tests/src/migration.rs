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

use crate::harness::{field, DemoVm, VmOpts, WORKLOAD_START};
use crate::{Failure, Outcome};

/// The guest a scenario runs, and where its a-b check looks.
#[derive(Debug, Clone)]
pub struct Guest {
    /// `--guest`.
    arg: String,
    /// vCPUs.
    vcpus: usize,
    /// Guest RAM in MiB.
    mem_mib: u64,
    /// `--accel`, when the scenario insists on one.
    accel: Option<&'static str>,
    /// More arguments.
    extra: &'static [&'static str],
    /// The pages the a-b check covers, and its vCPU slices; `None` for guests
    /// that write randomly.
    ab: Option<(u64, u64, usize)>,
    /// A boot sector (KVM only).
    sector: bool,
}

/// `guests/NAME` at the top of the repository.
fn guest_image(name: &str) -> String {
    format!("{}/../guests/{name}", env!("CARGO_MANIFEST_DIR"))
}

impl Guest {
    /// A built-in workload (`ab`, `random`, `idle`).
    pub fn builtin(workload: &str, vcpus: usize, mem_mib: u64) -> Guest {
        Guest {
            arg: format!("builtin:{workload}"),
            vcpus,
            mem_mib,
            accel: None,
            extra: &[],
            ab: (workload == "ab").then_some((WORKLOAD_START, mem_mib << 20, vcpus)),
            sector: false,
        }
    }

    /// The project's boot sector `guests/NAME`, which touches its first 64 MiB
    /// above 1 MiB.
    pub fn sector(name: &str) -> Guest {
        let touch = 64 << 20;
        Guest {
            arg: guest_image(name),
            vcpus: 1,
            mem_mib: 96,
            accel: None,
            extra: &[],
            ab: name
                .starts_with("ab")
                .then_some((WORKLOAD_START, WORKLOAD_START + touch, 1)),
            sector: true,
        }
    }

    /// The same guest on soft vCPUs.
    pub fn soft(mut self) -> Guest {
        self.accel = Some("soft");
        self
    }

    /// With more `demovm` arguments.
    pub fn with(mut self, extra: &'static [&'static str]) -> Guest {
        self.extra = extra;
        self
    }

    /// A short name for notes (`builtin:ab`, `ab.bin`).
    pub fn name(&self) -> &str {
        self.arg.rsplit('/').next().unwrap_or(&self.arg)
    }

    /// Guest RAM in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    /// Whether `demovm` gets `arg`.
    pub fn has_arg(&self, arg: &str) -> bool {
        self.extra.contains(&arg)
    }

    /// Whether its RAM has an a-b check.
    pub fn has_ab_check(&self) -> bool {
        self.ab.is_some()
    }

    /// Starts a VM running this guest.
    pub fn start(&self, name: &str, incoming: Option<&str>) -> Result<DemoVm, String> {
        DemoVm::start(
            name,
            &VmOpts {
                mem_mib: self.mem_mib,
                vcpus: self.vcpus,
                guest: &self.arg,
                incoming,
                accel: self.accel,
                extra: self.extra,
            },
        )
    }

    /// A destination that loads and then stays paused (`--incoming defer`,
    /// `stop`, `migrate-incoming`), so its RAM can be compared with the source's.
    pub fn paused_destination(&self, name: &str, uri: &str) -> Result<DemoVm, String> {
        let mut dst = self.start(name, Some("defer"))?;
        dst.qmp.cmd("stop", json!({}))?;
        dst.qmp.cmd("migrate-incoming", json!({ "uri": uri }))?;
        Ok(dst)
    }

    /// The a-b check of `vm`'s RAM (paused), if this guest has one.
    pub fn ab_check(&self, vm: &mut DemoVm, when: &str) -> Result<(), String> {
        match self.ab {
            Some((start, end, slices)) => ab_check(&vm.page_bytes_in(start, end)?, slices)
                .map_err(|e| format!("{} {when}: {e}", vm.name)),
            None => Ok(()),
        }
    }

    /// Waits until the guest shows it runs: new COM1 output for `ab`, RAM that
    /// changes for the others.
    pub fn wait_runs(&self, vm: &mut DemoVm) -> Result<(), String> {
        if self.ab.is_some() {
            let before = vm.serial_len();
            vm.wait_serial_beyond(before + 1).map(drop)
        } else {
            vm.wait_ram_changes()
        }
    }

    /// Whether the host can run it: boot sectors need KVM. Under
    /// `REQUIRE_KVM=1` a missing KVM is a failure, elsewhere a loud skip.
    pub fn available(&self) -> Result<(), Failure> {
        if !self.sector && self.accel.is_some() {
            return Ok(());
        }
        if self.sector || std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
            if let Err(e) = vmm_glue::kvm::host_facts() {
                let why = format!("needs KVM: {}", vmm_glue::error_chain(&e));
                return Err(if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
                    Failure::Failed(format!("{why} (REQUIRE_KVM=1)"))
                } else {
                    Failure::Skipped(why)
                });
            }
        }
        Ok(())
    }
}

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
            accel: None,
            extra: &[],
        },
    )
}

/// `Ok` when `cond` holds, else a failure saying `what`.
pub fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failure> {
    if cond {
        Ok(())
    } else {
        Err(Failure::Failed(what()))
    }
}

/// A `query-migrate` reply's `status`.
pub fn status(q: &Value) -> &str {
    q.get("status").and_then(Value::as_str).unwrap_or("?")
}

/// `query-migrate`'s `error-desc`, empty when there is none.
pub(crate) fn error_desc(q: &Value) -> String {
    q.get("error-desc")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// Settings under which an `ab` guest converges: no bandwidth cap, a generous downtime.
pub(crate) fn converge(vm: &mut DemoVm) -> Result<(), String> {
    vm.qmp
        .cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 0, "downtime-limit": 5000}),
        )
        .map(drop)
}

pub(crate) fn migrate(src: &mut DemoVm, uri: &str) -> Result<(), String> {
    src.qmp.cmd("migrate", json!({ "uri": uri })).map(drop)
}

/// What ran the guests' vCPUs, from each VM's `x-guest-info`: one word when they
/// agree (`soft`), else the distinct values joined with `+`.
pub fn accel_of(vms: &mut [&mut DemoVm]) -> Result<String, String> {
    let mut seen: Vec<String> = Vec::new();
    for vm in vms {
        let a = vm.accel()?;
        if !seen.contains(&a) {
            seen.push(a);
        }
    }
    Ok(seen.join("+"))
}

pub(crate) fn outcome(q: &Value, accel: String, note: String) -> Outcome {
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
    let accel = accel_of(&mut [&mut src, &mut dst])?;
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

/// A running guest migrated live. The destination is held paused after loading
/// so its RAM can be compared with the source's exactly, then resumed: it runs
/// on (new `B`s, or RAM that changes) and, for `ab`, its RAM passes the a-b
/// check. `query-migrate` must show a non-zero `mbps` while pages flow.
pub fn live(guest: &Guest) -> Result<Outcome, Failure> {
    guest.available()?;
    let mut src = guest.start("src", None)?;
    guest.wait_runs(&mut src)?;
    let mut dst = guest.paused_destination("dst", "tcp:127.0.0.1:0")?;
    let uri = dst.incoming_uri()?;
    // First limits no running guest fits (32 MiB/s, 1 ms of downtime): the
    // migration iterates without converging...
    src.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 32 << 20, "downtime-limit": 1}),
    )?;
    migrate(&mut src, &uri)?;
    let mut mbps = 0.0f64;
    let q = src.wait_migration("two dirty-log syncs", |q| {
        if let Some(m) = q.pointer("/ram/mbps").and_then(Value::as_f64) {
            mbps = mbps.max(m);
        }
        field(q, "ram.dirty-sync-count") >= 2
    })?;
    expect(status(&q) == "active", || {
        format!("should still be iterating: {q}")
    })?;
    expect(mbps > 0.0, || {
        format!("query-migrate showed mbps 0 throughout the first passes: {q}")
    })?;
    expect(src.run_status()? == "running", || {
        format!(
            "the guest must run during precopy (run state {})",
            src.run_status().unwrap_or_default()
        )
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
    guest.ab_check(&mut dst, "at switchover")?;
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
    guest.wait_runs(&mut dst)?;
    dst.qmp.cmd("stop", json!({}))?;
    guest.ab_check(&mut dst, "after running on")?;
    expect(src.serial_len() == serial_src, || {
        "the source guest printed after it migrated away".into()
    })?;
    let syncs = field(&q, "ram.dirty-sync-count");
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    let checked = if guest.ab.is_some() {
        "ran on and passes the a-b check"
    } else {
        "ran on"
    };
    Ok(outcome(
        &q,
        accel,
        format!(
            "{} on {} vCPU(s): {syncs} dirty syncs, mbps up to {mbps:.0}; RAM equal at switchover; destination {checked}",
            guest.arg.rsplit('/').next().unwrap_or(&guest.arg),
            guest.vcpus
        ),
    ))
}

/// A running `ab` guest on two vCPUs, migrated live.
pub fn live_ab() -> Result<Outcome, Failure> {
    live(&Guest::builtin("ab", 2, 128))
}

/// A running `ab` guest on one vCPU, its dirty pages tracked by a KVM dirty
/// ring (the bitmap where the host has none), migrated live.
pub fn live_ab_ring() -> Result<Outcome, Failure> {
    if crate::harness::kvm_is_pvm() && std::env::var("E2E_ACCEL").as_deref() != Ok("soft") {
        return Err(Failure::Skipped(
            "the dirty ring needs real KVM: PVM (kvm_pvm) lets a ring overfill; run it with \
             KVM_BOX_FORCE=1 ../shared/kvm-box/run"
                .into(),
        ));
    }
    live(&Guest::builtin("ab", 1, 64).with(&["--dirty-ring", "4096"]))
}

/// A running `random` guest on two vCPUs, migrated live.
pub fn live_random() -> Result<Outcome, Failure> {
    live(&Guest::builtin("random", 2, 64))
}

/// The project's `ab` boot sector (real mode, then protected mode), migrated
/// live.
pub fn live_sector_ab() -> Result<Outcome, Failure> {
    live(&Guest::sector("ab.bin"))
}

/// The project's `random` boot sector, migrated live.
pub fn live_sector_random() -> Result<Outcome, Failure> {
    live(&Guest::sector("random.bin"))
}

/// The `ab` guest on two soft vCPUs (the stand-in for hosts without KVM),
/// migrated live.
pub fn live_ab_soft() -> Result<Outcome, Failure> {
    live(&Guest::builtin("ab", 2, 64).soft())
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
    let mut dst2 =
        Guest::builtin("random", 1, 128).paused_destination("dst2", "tcp:127.0.0.1:0")?;
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
    let accel = accel_of(&mut [&mut src, &mut dst1, &mut dst2])?;
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
    let accel = accel_of(&mut [&mut src, &mut dst])?;
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
        last = Some((q, desc, accel_of(&mut [&mut src, &mut dst])?));
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
    let mut dst = Guest::builtin("ab", 1, 64)
        .paused_destination("restored", &format!("file:{}", path.display()))?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("restore: {d}"))?;
    let (a, b) = (src.digest()?, dst.digest()?);
    expect(a == b, || format!("restored RAM differs: {a} vs {b}"))?;
    dst.qmp.cmd("cont", json!({}))?;
    let before = dst.serial_len();
    dst.wait_serial_beyond(before + 1)?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "{} MiB file; restored RAM equal; restored guest runs",
            size >> 20
        ),
    ))
}

/// A hostile peer connects to `dst` (listening) and sends one bad stream;
/// returns the destination's verdict (`query-migrate`) once it has one.
fn hostile_case(
    dst: &mut DemoVm,
    name: &str,
    send: impl FnOnce(&mut TcpStream) -> std::io::Result<()>,
) -> Result<Value, Failure> {
    let uri = dst.incoming_uri()?;
    let addr = uri.trim_start_matches("tcp:");
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{name}: connect: {e}"))?;
    // The destination may close early; its verdict is what counts.
    let _ = send(&mut s);
    let _ = s.flush();
    drop(s);
    Ok(dst.wait_finished()?)
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

/// Hostile peers against one destination process:
/// - a connection whose hello is garbage is dropped and counted, and the
///   destination keeps listening for the real source;
/// - after a valid hello: garbage, a truncated page, an out-of-range offset, an
///   oversized length, blocks that do not match. Each fails the incoming
///   migration with an `error-desc` of the right kind (`x-error-kind`: a
///   truncated stream is a broken link, the rest protocol errors), the guest
///   never runs and its memory stays untouched; `migrate-incoming` then listens
///   again;
/// - finally the real source migrates into the same process.
pub fn hostile_streams() -> Result<Outcome, Failure> {
    let start = Instant::now();
    let mem = 64u64 << 20;
    let guest = Guest::builtin("ab", 1, 64);
    let mut dst = guest.start("dst", Some("defer"))?;
    dst.qmp.cmd("stop", json!({}))?;
    let before = dst.digest()?;
    let listen = |dst: &mut DemoVm| {
        dst.qmp
            .cmd("migrate-incoming", json!({ "uri": "tcp:127.0.0.1:0" }))
            .map(drop)
    };
    listen(&mut dst)?;

    // A bad hello: dropped, counted, and listening goes on.
    let uri = dst.incoming_uri()?;
    let mut junk_conn = TcpStream::connect(uri.trim_start_matches("tcp:"))
        .map_err(|e| format!("garbage-hello: connect: {e}"))?;
    let mut x = 0x1234_5678_9abc_def0u64;
    let junk: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = junk_conn.write_all(&junk);
    drop(junk_conn);
    let q = dst.wait_migration("the bad hello to be dropped", |q| {
        field(q, "x-rejected-connections") >= 1
    })?;
    expect(status(&q) == "setup", || {
        format!("garbage-hello: the destination must keep listening: {q}")
    })?;
    let mut notes = vec!["garbage-hello: dropped, still listening".to_owned()];

    type Send = Box<dyn FnOnce(&mut TcpStream) -> std::io::Result<()>>;
    let cases: Vec<(&str, &str, Send)> = vec![
        (
            "garbage",
            "protocol",
            Box::new(move |s| {
                let inner = after_setup(s, mem)?;
                inner.write_all(&junk)
            }),
        ),
        (
            "truncated",
            "link",
            Box::new(move |s| {
                let inner = after_setup(s, mem)?;
                // A page record for pc.ram offset 0 with half its payload.
                let mut rec = vec![2u8, 1];
                rec.extend_from_slice(&1u32.to_be_bytes());
                rec.extend_from_slice(&0u64.to_be_bytes());
                rec.extend_from_slice(&[0xabu8; 2048]);
                inner.write_all(&rec)
            }),
        ),
        (
            "out-of-range",
            "protocol",
            Box::new(move |s| {
                let inner = after_setup(s, mem)?;
                let mut rec = vec![2u8, 1];
                rec.extend_from_slice(&1u32.to_be_bytes());
                rec.extend_from_slice(&(mem).to_be_bytes());
                rec.extend_from_slice(&[0xcdu8; 4096]);
                inner.write_all(&rec)
            }),
        ),
        (
            "oversized",
            "protocol",
            Box::new(move |s| {
                let inner = after_setup(s, mem)?;
                // A DeviceState command claiming a 4 GiB body.
                let mut rec = vec![4u8, 8];
                rec.extend_from_slice(&u32::MAX.to_be_bytes());
                rec.extend_from_slice(&[0u8; 64]);
                inner.write_all(&rec)
            }),
        ),
        (
            "wrong-blocks",
            "protocol",
            Box::new(move |s| {
                let mut w = main_stream(s)?;
                let mut b = blocks(mem);
                b[1].size += 4096;
                w.write_ram_setup(&b).map_err(std::io::Error::other)?;
                w.write_page(BlockId(1), 0, &[0xeeu8; 4096])
                    .map_err(std::io::Error::other)?;
                w.flush().map_err(std::io::Error::other)
            }),
        ),
    ];
    for (i, (name, kind, send)) in cases.into_iter().enumerate() {
        if i > 0 {
            // A failed incoming migration leaves the VM ready for another.
            listen(&mut dst)?;
        }
        let q = hostile_case(&mut dst, name, send)?;
        expect(status(&q) == "failed", || {
            format!("{name}: the destination accepted a bad stream: {q}")
        })?;
        let desc = error_desc(&q);
        let got = q.get("x-error-kind").and_then(Value::as_str).unwrap_or("");
        expect(got == kind, || {
            format!("{name}: error kind {got:?}, expected {kind:?}: {desc}")
        })?;
        expect(desc.starts_with(&format!("{kind} error: ")), || {
            format!("{name}: error-desc must say its kind: {desc}")
        })?;
        expect(dst.alive(), || {
            format!("{name}: the destination process died")
        })?;
        let rs = dst.run_status()?;
        expect(rs == "inmigrate", || {
            format!("{name}: the guest must not run (run state {rs})")
        })?;
        let after = dst.digest()?;
        expect(before == after, || {
            format!("{name}: guest memory changed: {before} -> {after}")
        })?;
        notes.push(format!("{name}: {desc}"));
    }

    // The same destination then takes the real source.
    listen(&mut dst)?;
    let mut src = guest.start("src", None)?;
    guest.wait_runs(&mut src)?;
    src.qmp.cmd("stop", json!({}))?;
    let uri = dst.incoming_uri()?;
    migrate(&mut src, &uri)?;
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || {
        format!("the real source: {q}")
    })?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || {
        format!("the destination: {d}")
    })?;
    let (a, b) = (src.digest()?, dst.digest()?);
    expect(a == b, || {
        format!("RAM differs after the real migration: {a} vs {b}")
    })?;
    notes.push("then the real source migrated into the same process, RAM equal".into());
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(Outcome {
        total: start.elapsed(),
        accel: Some(accel),
        note: notes.join(" | "),
        ..Outcome::default()
    })
}
