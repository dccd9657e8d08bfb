//! A Linux guest migrated between two `demovm` processes (issue 11): stopped,
//! live under a memory workload, and with the destination killed mid-way.
//!
//! They need the Linux image (`cargo xtask linux-guest`, or
//! `DEMOVM_LINUX_KERNEL`/`DEMOVM_LINUX_INITRD`) and a KVM that boots Linux.
//! Where `/dev/kvm` is PVM they print a loud SKIPPED line: there they run in
//! kvm-box, built on the host first:
//!
//! ```text
//! cargo test -p tests --test linux --no-run
//! KVM_BOX_FORCE=1 ../shared/kvm-box/run target/debug/deps/linux-<hash> --test-threads 1
//! ```
//!
//! `REQUIRE_LINUX=1` turns every skip into a failure.

e2e::scenarios! {
    linux_stopped_guest_migrated_with_equal_ram => "linux-precopy-stopped", e2e::linux::stopped;
    linux_guest_under_load_migrated_live_keeps_console_clock_and_timers => "linux-precopy-live", e2e::linux::live;
    linux_destination_killed_source_console_still_answers => "linux-precopy-dest-killed", e2e::linux::dest_killed;
}
