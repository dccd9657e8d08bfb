//! Postcopy scenarios between `demovm` processes: the destination runs the
//! guest before all of its memory arrived, pages it touches are requested on
//! the return path, and the rest follows.

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use migration_stream::{
    read_preamble, BlockId, BlockTable, Command, Hello, Record, ReturnMessage, ReturnPathWriter,
    Role, StreamReader,
};
use serde_json::{json, Value};

use crate::harness::{field, DemoVm, HANG_GUARD};
use crate::migration::{accel_of, expect, status, Guest};
use crate::proxy::Proxy;
use crate::{Failure, Outcome};

/// Turns capabilities on.
fn caps(vm: &mut DemoVm, names: &[&str]) -> Result<(), String> {
    let list: Vec<Value> = names
        .iter()
        .map(|n| json!({"capability": n, "state": true}))
        .collect();
    vm.qmp
        .cmd("migrate-set-capabilities", json!({ "capabilities": list }))
        .map(drop)
}

/// Limits no running guest fits, so precopy iterates until postcopy starts.
fn slow(vm: &mut DemoVm) -> Result<(), String> {
    vm.qmp
        .cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 32 << 20, "downtime-limit": 1}),
        )
        .map(drop)
}

/// Whether `postcopy-preempt` is on at both ends: requested pages go on a
/// channel of their own, sent by the source's return-path thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preempt {
    /// Requested pages go on the main channel, from the saver's queue.
    Off,
    /// Requested pages go on the preempt channel.
    On,
}

impl Preempt {
    /// The source's capabilities.
    fn source_caps(self) -> &'static [&'static str] {
        match self {
            Preempt::Off => &["postcopy-ram"],
            Preempt::On => &["postcopy-ram", "postcopy-preempt"],
        }
    }

    /// The destination's capabilities.
    fn destination_caps(self) -> &'static [&'static str] {
        match self {
            Preempt::Off => &["postcopy-ram", "postcopy-blocktime"],
            Preempt::On => &["postcopy-ram", "postcopy-blocktime", "postcopy-preempt"],
        }
    }

    fn note(self) -> &'static str {
        match self {
            Preempt::Off => "",
            Preempt::On => " with postcopy-preempt",
        }
    }
}

/// A destination for postcopy (capabilities on), listening on loopback;
/// `stopped` keeps its guest from running once loaded.
fn destination(guest: &Guest, name: &str, stopped: bool) -> Result<DemoVm, String> {
    destination_with(guest, name, stopped, Preempt::Off)
}

fn destination_with(
    guest: &Guest,
    name: &str,
    stopped: bool,
    preempt: Preempt,
) -> Result<DemoVm, String> {
    let mut dst = guest.start(name, Some("defer"))?;
    caps(&mut dst, preempt.destination_caps())?;
    if stopped {
        dst.qmp.cmd("stop", json!({}))?;
    }
    dst.qmp
        .cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))?;
    Ok(dst)
}

fn outcome(q: &Value, d: &Value, accel: String, note: String) -> Outcome {
    Outcome {
        accel: Some(accel),
        total: Duration::from_millis(field(q, "total-time")),
        downtime: q
            .get("downtime")
            .and_then(Value::as_u64)
            .map(Duration::from_millis),
        bytes: field(q, "ram.transferred"),
        pages: field(q, "ram.normal") + field(q, "ram.duplicate"),
        faults: field(d, "x-postcopy-faults"),
        note,
    }
}

/// A running guest switched to postcopy after its first precopy pass: both
/// sides complete, the destination runs on (new output, a-b check for `ab`),
/// the source guest never runs again, and the destination reports blocktime:
/// total, per vCPU, and a latency histogram.
pub fn live(guest: &Guest) -> Result<Outcome, Failure> {
    live_with(guest, Preempt::Off)
}

/// [`live`], with or without postcopy preempt. With it, the source must
/// have served requests (on the preempt channel: nothing else serves them
/// then).
pub fn live_with(guest: &Guest, preempt: Preempt) -> Result<Outcome, Failure> {
    guest.available()?;
    let mut src = guest.start("src", None)?;
    guest.wait_runs(&mut src)?;
    let mut dst = destination_with(guest, "dst", false, preempt)?;
    caps(&mut src, preempt.source_caps())?;
    slow(&mut src)?;
    if guest.has_arg("hugetlbfs") {
        // One dirty huge page fits in 1 ms on loopback, so precopy could end
        // before the switch: no downtime allowed, it cannot. And a few huge
        // pages could all arrive in the background before the guest touches
        // one: send them slowly (a quarter of RAM per second), so the guest
        // asks for some.
        src.qmp.cmd(
            "migrate-set-parameters",
            json!({
                "downtime-limit": 0,
                "max-postcopy-bandwidth": (guest.mem_mib() << 20) / 4,
            }),
        )?;
    }
    let uri = dst.incoming_uri()?;
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    src.wait_migration("the first pass", |q| field(q, "ram.dirty-sync-count") >= 2)?;
    src.qmp.cmd("migrate-start-postcopy", json!({}))?;
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    let went_through = src.qmp.events.iter().any(|e| {
        e.get("event").and_then(Value::as_str) == Some("MIGRATION")
            && e.pointer("/data/status").and_then(Value::as_str) == Some("postcopy-active")
    });
    expect(went_through, || {
        "the source never said postcopy-active".into()
    })?;
    let rs = src.run_status()?;
    expect(rs == "postmigrate", || format!("source run state {rs}"))?;
    expect(dst.run_status()? == "running", || {
        "the destination must run the guest".into()
    })?;
    let mut locked_note = String::new();
    if guest.has_arg("--mlock") {
        // Unlocked while postcopy ran, locked again at the end.
        let locked = locked_kib(dst.pid())?;
        let ram_kib = guest.mem_mib() << 10;
        expect(locked >= ram_kib * 9 / 10, || {
            format!(
                "the destination has {locked} KiB locked after postcopy, its RAM is {ram_kib} KiB"
            )
        })?;
        locked_note = format!("; {} MiB locked again after postcopy", locked >> 10);
    }
    let serial_src = src.serial_len();
    guest.wait_runs(&mut dst)?;
    dst.qmp.cmd("stop", json!({}))?;
    guest.ab_check(&mut dst, "after postcopy")?;
    expect(src.serial_len() == serial_src, || {
        "the source guest printed after the switch".into()
    })?;
    // Pages the destination asked for; the source served those it had not
    // sent yet (the others were on their way).
    let requests = field(&d, "x-postcopy-requests");
    let served = field(&q, "ram.postcopy-requests");
    let resent = field(&q, "ram.x-postcopy-pages-resent");
    let blocktime = field(&d, "postcopy-blocktime");
    let per_vcpu = d
        .get("postcopy-vcpu-blocktime")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let histogram: u64 = d
        .get("x-postcopy-latency-us")
        .and_then(Value::as_array)
        .map_or(0, |h| {
            h.iter()
                .filter_map(|b| b.get("count").and_then(Value::as_u64))
                .sum()
        });
    expect(per_vcpu == guest_vcpus(&mut dst)?, || {
        format!("postcopy-vcpu-blocktime has {per_vcpu} entries: {d}")
    })?;
    // Blocktime is in whole ms: a few fast faults may add up to 0.
    expect(
        d.get("postcopy-blocktime").is_some() && histogram > 0 && requests > 0,
        || format!("blocktime {blocktime} ms, {histogram} timed faults, {requests} requests: {d}"),
    )?;
    expect(preempt == Preempt::Off || served > 0, || {
        format!("with postcopy-preempt the source served no request: {q}")
    })?;
    // Only a preempt channel sends a page twice, and never more pages than
    // were asked for.
    expect(
        resent <= requests && (preempt == Preempt::On || resent == 0),
        || format!("{resent} pages sent again for {requests} requests: {q}"),
    )?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(outcome(
        &q,
        &d,
        accel,
        format!(
            "{} on {} vCPU(s){}: switched after the first pass; {requests} pages requested ({served} \
             served by the source, {}), blocktime {blocktime} ms ({histogram} faults timed); \
             destination ran on{}",
            guest.name(),
            per_vcpu,
            preempt.note(),
            match preempt {
                Preempt::Off => "from the saver's queue on the main channel".to_owned(),
                Preempt::On => format!(
                    "by its return-path thread on the preempt channel, {resent} more sent \
                     again there as they were on their way on the main one"
                ),
            },
            if guest.has_ab_check() { ", a-b check holds" } else { "" }
        ) + &locked_note,
    ))
}

/// `VmLck` of process `pid`, in KiB.
fn locked_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no VmLck in /proc/{pid}/status"))
}

/// The `ab` guest with its memory locked (`--mlock`) on both sides: the
/// destination unlocks it for postcopy and locks it again at the end.
pub fn live_mlock() -> Result<Outcome, Failure> {
    live(&Guest::builtin("ab", 1, 64).with(&["--mlock"]))
}

fn guest_vcpus(vm: &mut DemoVm) -> Result<usize, String> {
    let info = vm.qmp.cmd("x-guest-info", json!({}))?;
    Ok(info.get("vcpus").and_then(Value::as_u64).unwrap_or(0) as usize)
}

/// The `ab` guest on two KVM vCPUs, switched to postcopy.
pub fn live_ab() -> Result<Outcome, Failure> {
    live(&Guest::builtin("ab", 2, 128))
}

/// The `ab` guest on one vCPU.
pub fn live_ab_1vcpu() -> Result<Outcome, Failure> {
    live(&Guest::builtin("ab", 1, 64))
}

/// The project's `ab` boot sector.
pub fn live_sector_ab() -> Result<Outcome, Failure> {
    live(&Guest::sector("ab.bin"))
}

/// The `ab` guest on soft vCPUs: host threads fault on missing pages as vCPUs
/// do.
pub fn live_ab_soft() -> Result<Outcome, Failure> {
    live(&Guest::builtin("ab", 2, 64).soft())
}

/// A guest that precopy cannot converge (random writes under tight limits),
/// or one that is stopped, moved by postcopy to a destination held paused:
/// every page arrives, and `x-ram-digest` is equal on both sides.
fn exact(guest: &Guest, stopped: bool, preempt: Preempt) -> Result<Outcome, Failure> {
    guest.available()?;
    let mut src = guest.start("src", None)?;
    guest.wait_runs(&mut src)?;
    if stopped {
        src.qmp.cmd("stop", json!({}))?;
    }
    let mut dst = destination_with(guest, "dst", true, preempt)?;
    caps(&mut src, preempt.source_caps())?;
    slow(&mut src)?;
    let uri = dst.incoming_uri()?;
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    if stopped {
        // Before the first pass ends.
        src.wait_migration("pages to flow", |q| field(q, "ram.transferred") > 1 << 20)?;
    } else {
        // Precopy iterates without converging.
        src.wait_migration("three passes", |q| field(q, "ram.dirty-sync-count") >= 3)?;
        let q = src.query_migrate()?;
        expect(status(&q) == "active", || {
            format!("precopy should not converge: {q}")
        })?;
    }
    src.qmp.cmd("migrate-start-postcopy", json!({}))?;
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    let (a, b) = (src.digest()?, dst.digest()?);
    expect(a == b, || format!("RAM differs after postcopy: {a} vs {b}"))?;
    dst.qmp.cmd("cont", json!({}))?;
    guest.wait_runs(&mut dst)?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(outcome(
        &q,
        &d,
        accel,
        format!(
            "{}{}{}: postcopy completed, x-ram-digest equal on both sides, then the destination runs it",
            guest.name(),
            preempt.note(),
            if stopped {
                " stopped, switched before the first pass ended"
            } else {
                " running, precopy not converging"
            }
        ),
    ))
}

/// A stopped guest moved by postcopy: RAM equal on both sides.
pub fn stopped() -> Result<Outcome, Failure> {
    exact(&Guest::builtin("ab", 1, 64), true, Preempt::Off)
}

/// A random-writes guest that precopy cannot converge, moved by postcopy.
pub fn random() -> Result<Outcome, Failure> {
    exact(&Guest::builtin("random", 2, 64), false, Preempt::Off)
}

/// The `ab` guest on two KVM vCPUs switched to postcopy with
/// `postcopy-preempt`: requested pages on their own channel.
pub fn preempt_live_ab() -> Result<Outcome, Failure> {
    live_with(&Guest::builtin("ab", 2, 128), Preempt::On)
}

/// The random-writes guest that precopy cannot converge, moved by postcopy
/// with `postcopy-preempt`: every page arrives once, on one channel or the
/// other, and RAM is equal on both sides.
pub fn preempt_random() -> Result<Outcome, Failure> {
    exact(&Guest::builtin("random", 2, 64), false, Preempt::On)
}

/// `postcopy-preempt` on at the source only: the destination refuses the
/// stream at `Advise` with an error that says to turn it on at both ends,
/// and the source's guest runs on.
pub fn preempt_only_at_source() -> Result<Outcome, Failure> {
    let guest = Guest::builtin("ab", 1, 64);
    guest.available()?;
    let mut src = guest.start("src", None)?;
    guest.wait_runs(&mut src)?;
    let mut dst = destination(&guest, "dst", false)?;
    caps(&mut src, Preempt::On.source_caps())?;
    let uri = dst.incoming_uri()?;
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    let q = src.wait_finished()?;
    expect(status(&q) == "failed", || format!("source: {q}"))?;
    let d = dst.wait_finished()?;
    let why = d.get("error-desc").and_then(Value::as_str).unwrap_or("");
    expect(
        status(&d) == "failed" && why.contains("postcopy-preempt is off here"),
        || format!("the destination must refuse, naming postcopy-preempt: {d}"),
    )?;
    expect(src.run_status()? == "running", || {
        "the source's guest must run on".into()
    })?;
    guest.wait_runs(&mut src)?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(Outcome {
        accel: Some(accel),
        total: Duration::ZERO,
        downtime: None,
        bytes: field(&q, "ram.transferred"),
        pages: 0,
        faults: 0,
        note: format!("the destination refused: {why}; the source's guest runs on"),
    })
}

/// The link is cut after the switch: both sides say `postcopy-paused`, the
/// source guest stays stopped, and the destination, waiting for pages, lives
/// on without crashing.
pub fn link_cut() -> Result<Outcome, Failure> {
    link_cut_with(Preempt::Off)
}

/// [`link_cut`] with `postcopy-preempt`: both connections go through the
/// proxy and are cut.
pub fn preempt_link_cut() -> Result<Outcome, Failure> {
    link_cut_with(Preempt::On)
}

fn link_cut_with(preempt: Preempt) -> Result<Outcome, Failure> {
    let guest = Guest::builtin("ab", 1, 128);
    guest.available()?;
    let mut src = guest.start("src", None)?;
    guest.wait_runs(&mut src)?;
    let mut dst = destination_with(&guest, "dst", false, preempt)?;
    caps(&mut src, preempt.source_caps())?;
    src.qmp.cmd(
        "migrate-set-parameters",
        // Postcopy's background stream slow enough to cut it mid-way.
        json!({"max-bandwidth": 32 << 20, "downtime-limit": 1, "max-postcopy-bandwidth": 4 << 20}),
    )?;
    let upstream = dst.incoming_uri()?;
    let proxy = Proxy::start(upstream.trim_start_matches("tcp:"))?;
    src.qmp.cmd("migrate", json!({ "uri": proxy.uri() }))?;
    src.wait_migration("the first pass", |q| field(q, "ram.dirty-sync-count") >= 2)?;
    src.qmp.cmd("migrate-start-postcopy", json!({}))?;
    dst.wait_migration("postcopy to start at the destination", |q| {
        status(q) == "postcopy-active"
    })?;
    let cut_at = proxy.forwarded();
    proxy.cut();
    let q = src.wait_migration("the source to pause", |q| {
        matches!(status(q), "postcopy-paused" | "failed" | "completed")
    })?;
    let d = dst.wait_migration("the destination to pause", |q| {
        matches!(status(q), "postcopy-paused" | "failed" | "completed")
    })?;
    expect(status(&q) == "postcopy-paused", || format!("source: {q}"))?;
    expect(status(&d) == "postcopy-paused", || {
        format!("destination: {d}")
    })?;
    let kind = |v: &Value| {
        v.get("x-error-kind")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    expect(kind(&q).as_deref() == Some("link"), || {
        format!("the source must keep a link error: {q}")
    })?;
    let rs = src.run_status()?;
    expect(rs != "running", || {
        "the source guest must not run again after the switch".into()
    })?;
    std::thread::sleep(Duration::from_millis(300));
    expect(dst.alive() && src.alive(), || "a process died".into())?;
    dst.qmp.cmd("query-status", json!({}))?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(Outcome {
        accel: Some(accel),
        note: format!(
            "link cut after {} MiB{}: both sides postcopy-paused (source: \"{}\"), source guest {rs}, both alive",
            cut_at >> 20,
            preempt.note(),
            q.get("error-desc").and_then(Value::as_str).unwrap_or("")
        ),
        ..Outcome::default()
    })
}

/// A hostile destination asks, after the switch, for a page outside guest
/// RAM: the source fails the migration with a clear protocol error, and its
/// guest, stopped at the switch, is not resumed.
pub fn hostile_request() -> Result<Outcome, Failure> {
    let guest = Guest::builtin("ab", 1, 64);
    guest.available()?;
    let start = Instant::now();
    let mut src = guest.start("src", None)?;
    guest.wait_runs(&mut src)?;
    caps(&mut src, &["postcopy-ram"])?;
    slow(&mut src)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    src.qmp
        .cmd("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))?;
    let (conn, _) = listener.accept().map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(HANG_GUARD))
        .map_err(|e| e.to_string())?;
    let mut reader = conn.try_clone().map_err(|e| e.to_string())?;
    let hello = read_preamble(&mut reader).map_err(|e| e.to_string())?;
    let mut rp = ReturnPathWriter::new(conn.try_clone().map_err(|e| e.to_string())?);
    rp.write_preamble(&Hello::new(Role::ReturnPath, hello.migration_id))
        .map_err(|e| e.to_string())?;
    rp.flush().map_err(|e| e.to_string())?;
    // Reads the stream as a destination would, answering pings, until the
    // package that says the guest may run here.
    let mut r = StreamReader::new(reader);
    let mut started_postcopy = false;
    let mut table = BlockTable::new(Vec::new()).map_err(|e| e.to_string())?;
    loop {
        if !started_postcopy && field(&src.query_migrate()?, "ram.dirty-sync-count") >= 2 {
            src.qmp.cmd("migrate-start-postcopy", json!({}))?;
            started_postcopy = true;
        }
        match r.read_record(&table).map_err(|e| e.to_string())? {
            Record::RamSetup(blocks) => {
                table = BlockTable::new(blocks).map_err(|e| e.to_string())?
            }
            Record::Page(_) => r.skip_page().map_err(|e| e.to_string())?,
            Record::Command(Command::Ping { value }) => {
                rp.send(&ReturnMessage::Pong { value })
                    .map_err(|e| e.to_string())?;
            }
            Record::Command(Command::Packaged(_)) => break,
            _ => {}
        }
    }
    // Page 0x100000 of 4 KiB pages lies 4 GiB into a 63 MiB block.
    rp.send(&ReturnMessage::PageRequest {
        block: BlockId(1),
        offset: 1 << 32,
        len: 4096,
    })
    .map_err(|e| e.to_string())?;
    let q = src.wait_finished()?;
    expect(status(&q) == "failed", || format!("source: {q}"))?;
    let desc = q.get("error-desc").and_then(Value::as_str).unwrap_or("");
    let kind = q.get("x-error-kind").and_then(Value::as_str).unwrap_or("");
    expect(kind == "protocol" && desc.contains("0x100000000"), || {
        format!("a hostile page request must be a protocol error naming it: {q}")
    })?;
    let rs = src.run_status()?;
    expect(rs != "running", || {
        format!("the source guest must stay stopped after the switch (run state {rs})")
    })?;
    expect(src.alive(), || "the source died".into())?;
    let _ = rp.get_ref().flush();
    let accel = accel_of(&mut [&mut src])?;
    Ok(Outcome {
        accel: Some(accel),
        total: start.elapsed(),
        note: format!(
            "a request 4 GiB into pc.ram failed the source with \"{desc}\"; its guest stays {rs}"
        ),
        ..Outcome::default()
    })
}

/// The `ab` guest on 2 MiB huge pages (`--mem-backend hugetlbfs`), switched to
/// postcopy: pages are requested, moved and placed a whole huge page at a
/// time.
pub fn live_hugetlbfs() -> Result<Outcome, Failure> {
    // pc.ram is [2 MiB, 8 MiB): 3 huge pages on each side.
    crate::harness::huge_pages(6)?;
    live(&Guest::builtin("ab", 1, 8).with(&["--mem-backend", "hugetlbfs"]))
}

/// The `balloon` guest keeps giving pages back while it dirties memory: its
/// requests are honoured before the switch, dropped (and counted) while
/// postcopy runs, and honoured again after; its RAM passes the balloon check.
pub fn balloon() -> Result<Outcome, Failure> {
    let (vcpus, mem_mib) = (2, 32);
    let guest = Guest::builtin("balloon", vcpus, mem_mib);
    guest.available()?;
    let mut src = guest.start("src", None)?;
    src.wait_balloon_honoured(4)?;
    let honoured_before = src.balloon("honoured")?;
    let mut dst = destination(&guest, "dst", false)?;
    caps(&mut src, &["postcopy-ram"])?;
    src.qmp.cmd(
        "migrate-set-parameters",
        // A slow postcopy stream, so the guest asks while postcopy runs.
        json!({"max-bandwidth": 32 << 20, "downtime-limit": 1, "max-postcopy-bandwidth": 4 << 20}),
    )?;
    let uri = dst.incoming_uri()?;
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    src.wait_migration("the first pass", |q| field(q, "ram.dirty-sync-count") >= 2)?;
    src.qmp.cmd("migrate-start-postcopy", json!({}))?;
    dst.wait_migration("postcopy to start at the destination", |q| {
        status(q) != "active" && status(q) != "setup"
    })?;
    // While postcopy runs, the destination's balloon drops every request.
    let mut dropped = 0;
    let mut honoured_during = 0;
    loop {
        let q = dst.query_migrate()?;
        dropped = dropped.max(dst.balloon("dropped")?);
        if status(&q) != "postcopy-active" {
            break;
        }
        honoured_during = dst.balloon("honoured")?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let q = src.wait_finished()?;
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    expect(dropped > 0 && honoured_during == 0, || {
        format!("while postcopy ran: {dropped} requests dropped, {honoured_during} honoured")
    })?;
    // After postcopy, the balloon works again.
    let honoured_after = dst.balloon("honoured")?;
    dst.wait_balloon_honoured(honoured_after + 2)?;
    dst.qmp.cmd("stop", json!({}))?;
    let bound = dst.qmp.cmd("x-guest-info", json!({}))?["serial-bytes"]
        .as_u64()
        .unwrap_or(0)
        + 1;
    let s = vmm_glue::guest::balloon_check(
        &dst.page_words(crate::harness::WORKLOAD_START, mem_mib << 20)?,
        vcpus,
        bound,
    )
    .map_err(|e| format!("destination RAM: {e}"))?;
    let accel = accel_of(&mut [&mut src, &mut dst])?;
    Ok(outcome(
        &q,
        &d,
        accel,
        format!(
            "{honoured_before} balloon requests honoured before the switch, {dropped} dropped while postcopy ran, \
             honoured again after; balloon check holds ({} pages given back)",
            s.zero_pages
        ),
    ))
}
