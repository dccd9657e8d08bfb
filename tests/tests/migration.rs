//! Live migration between two `demovm` processes, driven over QMP.
//!
//! These run real processes on loopback. The guests run on KVM where `/dev/kvm` works
//! and on soft vCPUs otherwise (the migration path is the same; see `vmm_glue::soft`).

use std::io::Write;

use e2e::{Failure, Outcome};

fn run(name: &str, scenario: fn() -> Result<Outcome, Failure>) {
    match scenario() {
        Ok(o) => {
            let _ = writeln!(std::io::stderr(), "{name}: {}", o.note);
        }
        Err(Failure::Skipped(why)) => {
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {name}: {why} ***\n");
        }
        Err(f) => panic!("{name}: {f}"),
    }
}

#[test]
fn precopy_stopped_guest_over_tcp() {
    run("precopy-stopped-tcp", e2e::migration::stopped_tcp);
}

#[test]
fn precopy_stopped_guest_over_unix() {
    run("precopy-stopped-unix", e2e::migration::stopped_unix);
}

#[test]
fn precopy_live_ab_guest() {
    run("precopy-live-ab", e2e::migration::live_ab);
}

#[test]
fn precopy_non_converging_guest_cancelled_then_migrated() {
    run("precopy-cancel-random", e2e::migration::cancel_random);
}

#[test]
fn precopy_destination_killed() {
    run("precopy-dest-killed", e2e::migration::dest_killed);
}

#[test]
fn precopy_destination_refuses() {
    run("precopy-dest-refuses", e2e::migration::dest_refuses);
}

#[test]
fn precopy_file_save_and_restore() {
    run("precopy-file", e2e::migration::file_save_restore);
}

#[test]
fn hostile_streams_are_refused() {
    run("hostile-streams", e2e::migration::hostile_streams);
}
