//! Live migration between two `demovm` processes, driven over QMP, and the
//! control plane under stress.
//!
//! These run real processes on loopback. The guests run on KVM where `/dev/kvm`
//! works and on soft vCPUs otherwise; with `REQUIRE_KVM=1` (as CI sets) every
//! VM is started with `--accel kvm`, so a missing KVM fails instead. Boot-sector
//! guests need KVM: without it they print a loud SKIPPED line.

e2e::scenarios! {
    precopy_stopped_guest_over_tcp => "precopy-stopped-tcp", e2e::migration::stopped_tcp;
    precopy_stopped_guest_over_unix => "precopy-stopped-unix", e2e::migration::stopped_unix;
    precopy_live_ab_guest_on_two_vcpus => "precopy-live-ab", e2e::migration::live_ab;
    precopy_live_ab_guest_with_a_dirty_ring => "precopy-live-ab-ring", e2e::migration::live_ab_ring;
    precopy_live_random_guest => "precopy-live-random", e2e::migration::live_random;
    precopy_live_ab_boot_sector => "precopy-live-sector-ab", e2e::migration::live_sector_ab;
    precopy_live_random_boot_sector => "precopy-live-sector-random", e2e::migration::live_sector_random;
    precopy_live_ab_guest_on_soft_vcpus => "precopy-live-ab-soft", e2e::migration::live_ab_soft;
    precopy_non_converging_guest_cancelled_then_migrated => "precopy-cancel-random", e2e::migration::cancel_random;
    precopy_destination_killed => "precopy-dest-killed", e2e::migration::dest_killed;
    precopy_destination_refuses => "precopy-dest-refuses", e2e::migration::dest_refuses;
    precopy_destination_frozen => "precopy-dest-stopped", e2e::control::dest_stopped;
    precopy_file_save_and_restore => "precopy-file", e2e::migration::file_save_restore;
    hostile_streams_are_refused => "hostile-streams", e2e::migration::hostile_streams;
    a_qmp_client_that_never_reads_stalls_nothing => "qmp-stuck-client", e2e::control::qmp_stuck_client;
    concurrent_qmp_commands_leave_a_legal_state => "qmp-concurrent", e2e::control::qmp_concurrent;
    a_guest_that_triple_faults_stops_and_the_vmm_lives => "guest-stops", e2e::control::guest_stops;
}
