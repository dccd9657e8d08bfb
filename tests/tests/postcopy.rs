//! Postcopy between two `demovm` processes, driven over QMP: the destination
//! runs the guest before all of its memory arrived.

e2e::scenarios! {
    postcopy_ab_on_two_vcpus => "postcopy-live-ab", e2e::postcopy::live_ab;
    postcopy_ab_on_one_vcpu => "postcopy-live-ab-1vcpu", e2e::postcopy::live_ab_1vcpu;
    postcopy_ab_boot_sector => "postcopy-live-sector-ab", e2e::postcopy::live_sector_ab;
    postcopy_ab_on_soft_vcpus => "postcopy-live-ab-soft", e2e::postcopy::live_ab_soft;
    postcopy_ab_on_huge_pages => "postcopy-live-ab-hugetlbfs", e2e::postcopy::live_hugetlbfs;
    balloon_requests_are_dropped_during_postcopy => "postcopy-balloon", e2e::postcopy::balloon;
    locked_memory_is_locked_again_after_postcopy => "postcopy-mlock", e2e::postcopy::live_mlock;
    postcopy_of_a_stopped_guest => "postcopy-stopped", e2e::postcopy::stopped;
    postcopy_of_a_guest_precopy_cannot_converge => "postcopy-random", e2e::postcopy::random;
    a_hostile_page_request_fails_the_source => "postcopy-hostile-request", e2e::postcopy::hostile_request;
    a_link_cut_after_the_switch_pauses_both_sides => "postcopy-link-cut", e2e::postcopy::link_cut;
    postcopy_preempt_ab_on_two_vcpus => "postcopy-preempt-live-ab", e2e::postcopy::preempt_live_ab;
    postcopy_preempt_of_a_guest_precopy_cannot_converge => "postcopy-preempt-random", e2e::postcopy::preempt_random;
    preempt_on_at_the_source_only_is_refused => "postcopy-preempt-only-at-source", e2e::postcopy::preempt_only_at_source;
    a_link_cut_with_preempt_pauses_both_sides => "postcopy-preempt-link-cut", e2e::postcopy::preempt_link_cut;
}
