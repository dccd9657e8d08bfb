//! Live migration between two `demovm` processes on each RAM backend
//! (`--mem-backend memfd`, `hugetlbfs`), driven over QMP with the scenarios'
//! harness: the migration completes with RAM equal on both sides and the guest
//! runs on at the destination; a `builtin:balloon` guest whose balloon gives
//! memory back during precopy arrives with the zeros (the balloon's writes are
//! resent) and keeps ballooning there; a destination on another backend refuses
//! the source's RAM blocks.
//!
//! hugetlbfs needs free 2 MiB huge pages (`vm.nr_hugepages`): without them those
//! tests print a loud SKIPPED line, or fail under `REQUIRE_HUGETLB=1`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use e2e::harness::{field, DemoVm, VmOpts, HANG_GUARD, WORKLOAD_START};
use e2e::migration::{live, Guest};
use e2e::{Failure, Outcome};
use serde_json::{json, Value};
use vmm_glue::guest::balloon_check;

/// hugetlbfs tests take this, so that they never need the huge pages of more
/// than one migration (two VMs) at once.
static HUGE_PAGES: Mutex<()> = Mutex::new(());

fn run(name: &str, scenario: impl FnOnce() -> Result<Outcome, Failure>) {
    match scenario() {
        Ok(o) => eprintln!("{name} [{}]: {}", o.accel.as_deref().unwrap_or("-"), o.note),
        Err(Failure::Skipped(why)) => eprintln!("\n*** SKIPPED {name}: {why} ***\n"),
        Err(f) => panic!("{name}: {f}"),
    }
}

/// Whether `needed` free 2 MiB huge pages exist: a skip without them, a failure
/// under `REQUIRE_HUGETLB=1`.
fn huge_pages(needed: u64) -> Result<(), Failure> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let free = get("HugePages_Free").saturating_sub(get("HugePages_Rsvd"));
    let size = get("Hugepagesize");
    if size == 2048 && free >= needed {
        return Ok(());
    }
    let why = format!(
        "needs {needed} free 2 MiB huge pages, the host has {free} of {size} KiB \
         (echo {needed} > /proc/sys/vm/nr_hugepages)"
    );
    if std::env::var("REQUIRE_HUGETLB").as_deref() == Ok("1") {
        Err(Failure::Failed(format!("{why} (REQUIRE_HUGETLB=1)")))
    } else {
        Err(Failure::Skipped(why))
    }
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

/// The `x-guest-info` balloon counter `name`.
fn balloon(vm: &mut DemoVm, name: &str) -> Result<u64, String> {
    let info = vm.qmp.cmd("x-guest-info", json!({}))?;
    info["balloon"][name]
        .as_u64()
        .ok_or_else(|| format!("{}: no balloon.{name} in {info}", vm.name))
}

/// Waits until `vm`'s balloon honoured `n` requests.
fn wait_honoured(vm: &mut DemoVm, n: u64) -> Result<(), String> {
    let start = Instant::now();
    while balloon(vm, "honoured")? < n {
        if start.elapsed() > HANG_GUARD {
            return Err(format!("{}: its balloon honoured no {n} requests", vm.name));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The first 8 bytes (little-endian) of each 4 KiB page of `[start, end)`.
fn page_words(vm: &mut DemoVm, start: u64, end: u64) -> Result<Vec<u64>, String> {
    let mut planes = Vec::new();
    for k in 0..8 {
        let r = vm.qmp.cmd(
            "x-ram-sample",
            json!({"start": start + k, "end": end, "stride": 4096}),
        )?;
        let data = r["data"].as_str().ok_or("x-ram-sample gave no data")?;
        planes.push(
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| e.to_string())?,
        );
    }
    Ok((0..planes[0].len())
        .map(|i| {
            let mut b = [0u8; 8];
            for (k, p) in planes.iter().enumerate() {
                b[k] = p[i];
            }
            u64::from_le_bytes(b)
        })
        .collect())
}

#[test]
fn precopy_live_ab_guest_on_memfd() {
    run("precopy-live-ab-memfd", || {
        live(&Guest::builtin("ab", 2, 64).with(&["--mem-backend", "memfd"]))
    });
}

#[test]
fn precopy_live_ab_guest_on_hugetlbfs() {
    let _one = HUGE_PAGES.lock().unwrap_or_else(|e| e.into_inner());
    run("precopy-live-ab-hugetlbfs", || {
        // 8 MiB: pc.ram is 3 huge pages, on each side.
        huge_pages(6)?;
        live(&Guest::builtin("ab", 2, 8).with(&["--mem-backend", "hugetlbfs"]))
    });
}

/// A `balloon` guest on memfd RAM, migrated live while its balloon gives memory
/// back: RAM equal at switchover, `balloon_check` holds at the destination, and
/// there the guest runs on and its requests are honoured.
#[test]
fn precopy_live_balloon_guest_on_memfd() {
    run("precopy-live-balloon-memfd", || {
        let (vcpus, mem_mib) = (2, 32);
        let guest = Guest::builtin("balloon", vcpus, mem_mib).with(&["--mem-backend", "memfd"]);
        guest.available()?;
        let mut src = guest.start("src", None)?;
        wait_honoured(&mut src, 4)?;
        let mut dst = guest.paused_destination("dst", "tcp:127.0.0.1:0")?;
        let uri = dst.incoming_uri()?;
        // Limits no guest fits first, so that precopy iterates while the
        // balloon zeroes pages; then limits that converge.
        src.qmp.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 32 << 20, "downtime-limit": 1}),
        )?;
        src.qmp.cmd("migrate", json!({ "uri": uri }))?;
        let before = balloon(&mut src, "honoured")?;
        src.wait_migration("two dirty-log syncs", |q| {
            field(q, "ram.dirty-sync-count") >= 2
        })?;
        let during = balloon(&mut src, "honoured")? - before;
        src.qmp.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 0, "downtime-limit": 5000}),
        )?;
        let q = src.wait_finished()?;
        expect(status(&q) == "completed", || format!("source: {q}"))?;
        let d = dst.wait_finished()?;
        expect(status(&d) == "completed", || format!("destination: {d}"))?;
        let (a, b) = (src.digest()?, dst.digest()?);
        expect(a == b, || {
            format!("RAM differs after the migration: source {a}, destination {b}")
        })?;
        let top = mem_mib << 20;
        let bound = dst.qmp.cmd("x-guest-info", json!({}))?["serial-bytes"]
            .as_u64()
            .unwrap_or(0)
            + 1;
        let s = balloon_check(&page_words(&mut dst, WORKLOAD_START, top)?, vcpus, bound)
            .map_err(|e| format!("destination RAM: {e}"))?;
        // The destination runs on, and its balloon serves the guest.
        dst.qmp.cmd("cont", json!({}))?;
        wait_honoured(&mut dst, 2)?;
        dst.qmp.cmd("stop", json!({}))?;
        let bound = dst.qmp.cmd("x-guest-info", json!({}))?["serial-bytes"]
            .as_u64()
            .unwrap_or(0)
            + 1;
        balloon_check(&page_words(&mut dst, WORKLOAD_START, top)?, vcpus, bound)
            .map_err(|e| format!("destination RAM after running on: {e}"))?;
        let accel = e2e::migration::accel_of(&mut [&mut src, &mut dst])?;
        Ok(Outcome {
            accel: Some(accel),
            note: format!(
                "{during} balloon requests honoured while precopy iterated; RAM equal at \
                 switchover; balloon_check holds ({} pages given back, {} marked); the \
                 destination balloons on",
                s.zero_pages, s.marked_pages
            ),
            ..Outcome::default()
        })
    });
}

/// An anon source and a hugetlbfs destination: the destination refuses the RAM
/// blocks, and the source's guest runs on.
#[test]
fn a_destination_on_another_backend_refuses_the_ram_blocks() {
    let _one = HUGE_PAGES.lock().unwrap_or_else(|e| e.into_inner());
    run("backend-mismatch", || {
        huge_pages(3)?;
        let opts = |incoming, extra| VmOpts {
            mem_mib: 8,
            vcpus: 1,
            guest: "builtin:ab",
            incoming,
            accel: None,
            extra,
        };
        let mut src = DemoVm::start("src", &opts(None, &[]))?;
        let mut dst = DemoVm::start(
            "dst",
            &opts(Some("tcp:127.0.0.1:0"), &["--mem-backend", "hugetlbfs"]),
        )?;
        let uri = dst.incoming_uri()?;
        src.qmp.cmd("migrate", json!({ "uri": uri }))?;
        let q = src.wait_finished()?;
        expect(status(&q) == "failed", || format!("source: {q}"))?;
        let d = dst.wait_finished()?;
        expect(status(&d) == "failed", || format!("destination: {d}"))?;
        let why = d
            .get("error-desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        expect(why.contains("RAM blocks"), || {
            format!("the destination must name the RAM blocks: {d}")
        })?;
        expect(src.run_status()? == "running", || {
            "the source's guest must run on".into()
        })?;
        let accel = e2e::migration::accel_of(&mut [&mut src, &mut dst])?;
        Ok(Outcome {
            accel: Some(accel),
            note: format!("anon to hugetlbfs refused: \"{why}\"; the source runs on"),
            ..Outcome::default()
        })
    });
}
