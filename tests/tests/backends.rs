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

use e2e::harness::{field, huge_pages, DemoVm, VmOpts, WORKLOAD_START};
use e2e::migration::{expect, live, status, Guest};
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
        src.wait_balloon_honoured(4)?;
        let mut dst = guest.paused_destination("dst", "tcp:127.0.0.1:0")?;
        let uri = dst.incoming_uri()?;
        // Limits no guest fits first, so that precopy iterates while the
        // balloon zeroes pages; then limits that converge.
        src.qmp.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 32 << 20, "downtime-limit": 1}),
        )?;
        src.qmp.cmd("migrate", json!({ "uri": uri }))?;
        let before = src.balloon("honoured")?;
        src.wait_migration("two dirty-log syncs", |q| {
            field(q, "ram.dirty-sync-count") >= 2
        })?;
        let during = src.balloon("honoured")? - before;
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
        let s = balloon_check(&dst.page_words(WORKLOAD_START, top)?, vcpus, bound)
            .map_err(|e| format!("destination RAM: {e}"))?;
        // The destination runs on, and its balloon serves the guest.
        dst.qmp.cmd("cont", json!({}))?;
        dst.wait_balloon_honoured(2)?;
        dst.qmp.cmd("stop", json!({}))?;
        let bound = dst.qmp.cmd("x-guest-info", json!({}))?["serial-bytes"]
            .as_u64()
            .unwrap_or(0)
            + 1;
        balloon_check(&dst.page_words(WORKLOAD_START, top)?, vcpus, bound)
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
