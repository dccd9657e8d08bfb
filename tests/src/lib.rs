//! End-to-end scenarios, shared by `cargo test` (the tests in `tests/`) and
//! `cargo xtask e2e` (which prints them as a table).
//!
//! - [`migration`]: two `demovm` processes driven over QMP, as an operator would: a
//!   stopped guest over TCP and Unix sockets, a live `ab` guest, a non-converging
//!   `random` guest cancelled and migrated again, a destination killed mid-way, a
//!   file save and restore, and hostile peers feeding the destination bad streams.
//! - [`linux`]: a Linux guest (2 vCPUs, 256 MiB, a workload dirtying 64 MiB)
//!   stopped then migrated, migrated live (console, clock, stalls checked on the
//!   destination), and with its destination killed mid-way.
//! - [`uffd`]: the userfaultfd mechanisms the postcopy and snapshot work builds on:
//!   `uffd-postcopy` (a 64 MiB destination filled in the background while two threads
//!   fault on random pages, each page placed once) and `uffd-snapshot` (a write-protect
//!   snapshot of 64 MiB under two writers, equal to the region at protection time).

#![deny(unsafe_code)]

pub mod control;
pub mod harness;
pub mod linux;
pub mod migration;
pub mod postcopy;
pub mod proxy;
pub mod snapshots;
pub mod uffd;

use std::time::Duration;

pub use uffd::{postcopy, snapshot};

/// The outcome of one scenario that ran to its end.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Duration of the migration (or the migration-like phase).
    pub total: Duration,
    /// Guest downtime, where a guest was migrated live.
    pub downtime: Option<Duration>,
    /// Bytes sent over the migration channel (or moved).
    pub bytes: u64,
    /// Pages moved.
    pub pages: u64,
    /// Page faults handled.
    pub faults: u64,
    /// What ran the guests' vCPUs (`kvm`, `soft`), from their `x-guest-info`; `None`
    /// where no guest ran.
    pub accel: Option<String>,
    /// What was checked and seen, in a line.
    pub note: String,
}

/// Why a scenario did not pass.
#[derive(Debug)]
pub enum Failure {
    /// The host lacks something the scenario needs (named).
    Skipped(String),
    /// The scenario ran and something was wrong.
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Skipped(w) => write!(f, "SKIPPED: {w}"),
            Failure::Failed(w) => write!(f, "FAILED: {w}"),
        }
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Failed(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure::Failed(s.to_owned())
    }
}

/// Runs scenario `name` as a `#[test]`: its outcome line, or a loud
/// `*** SKIPPED name: why ***` line, goes to stderr past the test harness's
/// capture (a skip must show in a plain `cargo test`), each line in one
/// write, so the lines of tests that run at once never interleave; a
/// failure panics with its message. See [`scenarios!`].
pub fn run_test(name: &str, scenario: fn() -> Result<Outcome, Failure>) {
    use std::io::Write;

    let line = match scenario() {
        Ok(o) => format!(
            "{name} [{}]: {}\n",
            o.accel.as_deref().unwrap_or("-"),
            o.note
        ),
        Err(Failure::Skipped(why)) => format!("\n*** SKIPPED {name}: {why} ***\n\n"),
        Err(f) => panic!("{name}: {f}"),
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// One `#[test]` per scenario, run with [`run_test`]:
///
/// ```ignore
/// e2e::scenarios! {
///     a_stopped_guest_over_tcp => "precopy-stopped-tcp", e2e::migration::stopped_tcp;
/// }
/// ```
#[macro_export]
macro_rules! scenarios {
    ($($test:ident => $name:literal, $f:path;)*) => {
        $(
            #[test]
            fn $test() {
                $crate::run_test($name, $f);
            }
        )*
    };
}

/// A scenario: runs to completion and reports, or says why not.
pub type Scenario = fn() -> Result<Outcome, Failure>;

/// Every scenario, by name, in the order `cargo xtask e2e` runs them.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("precopy-stopped-tcp", migration::stopped_tcp),
    ("precopy-stopped-unix", migration::stopped_unix),
    ("precopy-live-ab", migration::live_ab),
    ("precopy-live-ab-ring", migration::live_ab_ring),
    ("precopy-live-random", migration::live_random),
    ("precopy-live-sector-ab", migration::live_sector_ab),
    ("precopy-live-sector-random", migration::live_sector_random),
    ("precopy-live-ab-soft", migration::live_ab_soft),
    ("precopy-cancel-random", migration::cancel_random),
    ("precopy-dest-killed", migration::dest_killed),
    ("precopy-dest-refuses", migration::dest_refuses),
    ("precopy-dest-stopped", control::dest_stopped),
    ("precopy-file", migration::file_save_restore),
    ("hostile-streams", migration::hostile_streams),
    ("qmp-stuck-client", control::qmp_stuck_client),
    ("qmp-concurrent", control::qmp_concurrent),
    ("guest-stops", control::guest_stops),
    ("postcopy-live-ab", postcopy::live_ab),
    ("postcopy-live-ab-1vcpu", postcopy::live_ab_1vcpu),
    ("postcopy-live-sector-ab", postcopy::live_sector_ab),
    ("postcopy-live-ab-soft", postcopy::live_ab_soft),
    ("postcopy-live-ab-hugetlbfs", postcopy::live_hugetlbfs),
    ("postcopy-balloon", postcopy::balloon),
    ("postcopy-mlock", postcopy::live_mlock),
    ("postcopy-stopped", postcopy::stopped),
    ("postcopy-random", postcopy::random),
    ("postcopy-hostile-request", postcopy::hostile_request),
    ("postcopy-link-cut", postcopy::link_cut),
    ("postcopy-preempt-live-ab", postcopy::preempt_live_ab),
    ("postcopy-preempt-random", postcopy::preempt_random),
    (
        "postcopy-preempt-only-at-source",
        postcopy::preempt_only_at_source,
    ),
    ("snapshot-ab", snapshots::ab_eager),
    ("snapshot-ab-soft", snapshots::ab_eager_soft),
    ("snapshot-lazy-restore", snapshots::lazy),
    ("snapshot-random", snapshots::random_consistent),
    ("snapshot-cancel-disk-full", snapshots::cancel_and_disk_full),
    ("snapshot-bad-file", snapshots::bad_file),
    ("linux-precopy-stopped", linux::stopped),
    ("linux-precopy-live", linux::live),
    ("linux-precopy-dest-killed", linux::dest_killed),
    ("uffd-postcopy", uffd::postcopy),
    ("uffd-snapshot", uffd::snapshot),
];
