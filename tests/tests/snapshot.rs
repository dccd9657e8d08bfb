//! Background snapshots and restores of `demovm` guests, driven over QMP: a
//! running guest saved once per page under write protection, restored
//! eagerly and lazily.

e2e::scenarios! {
    a_running_ab_guest_is_snapshotted_and_restored => "snapshot-ab", e2e::snapshots::ab_eager;
    the_same_on_soft_vcpus => "snapshot-ab-soft", e2e::snapshots::ab_eager_soft;
    a_snapshot_is_restored_lazily => "snapshot-lazy-restore", e2e::snapshots::lazy;
    a_random_writes_guest_is_snapshotted_at_one_instant => "snapshot-random", e2e::snapshots::random_consistent;
    cancel_and_a_full_disk_leave_the_guest_running_unprotected => "snapshot-cancel-disk-full", e2e::snapshots::cancel_and_disk_full;
    bad_snapshot_files_are_refused_clearly => "snapshot-bad-file", e2e::snapshots::bad_file;
}
