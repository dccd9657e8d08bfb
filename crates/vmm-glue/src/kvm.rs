//! KVM facts of this host, read through `/dev/kvm`.
//!
//! What a migration needs to know before it starts: whether KVM is there at all, and
//! how dirty pages can be tracked (`KVM_GET_DIRTY_LOG`, manual protect with
//! `KVM_CLEAR_DIRTY_LOG`, or the dirty ring).

use std::fmt;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::Kvm;

/// The path of the KVM device.
pub const DEV_KVM: &str = "/dev/kvm";

/// What KVM offers on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    pub api_version: i32,
    /// Recommended vCPU count (`KVM_CAP_NR_VCPUS`).
    pub recommended_vcpus: usize,
    /// Maximum vCPU count (`KVM_CAP_MAX_VCPUS`).
    pub max_vcpus: usize,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags: 0 when absent, else a mask of
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` and `KVM_DIRTY_LOG_INITIALLY_SET`.
    pub manual_dirty_log_protect: u32,
    /// Largest dirty ring in bytes (`KVM_CAP_DIRTY_LOG_RING`), 0 when absent.
    pub dirty_ring_bytes: u32,
    /// Dirty ring with acquire/release ordering (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
    pub dirty_ring_acq_rel: bool,
}

/// Why KVM facts could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open {DEV_KVM}")]
    Open(#[source] std::io::Error),
}

impl KvmFacts {
    /// Whether `KVM_CLEAR_DIRTY_LOG` with manual protect is available.
    pub fn has_manual_protect(&self) -> bool {
        self.manual_dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
    }
}

/// Reads the KVM facts of this host.
pub fn host_facts() -> Result<KvmFacts, KvmError> {
    let kvm =
        Kvm::new().map_err(|e| KvmError::Open(std::io::Error::from_raw_os_error(e.errno())))?;
    let raw = |cap: u32| u32::try_from(kvm.check_extension_raw(cap.into())).unwrap_or(0);
    Ok(KvmFacts {
        api_version: kvm.get_api_version(),
        recommended_vcpus: kvm.get_nr_vcpus(),
        max_vcpus: kvm.get_max_vcpus(),
        manual_dirty_log_protect: raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        dirty_ring_bytes: raw(KVM_CAP_DIRTY_LOG_RING),
        dirty_ring_acq_rel: raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) != 0,
    })
}

impl fmt::Display for KvmFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "kvm")?;
        writeln!(f, "  usable:                   yes ({DEV_KVM})")?;
        writeln!(f, "  API version:              {}", self.api_version)?;
        writeln!(
            f,
            "  vCPUs:                    {} recommended, {} max",
            self.recommended_vcpus, self.max_vcpus
        )?;
        writeln!(
            f,
            "  dirty log manual protect: {} (initially-set: {})",
            yes(self.has_manual_protect()),
            yes(self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET != 0)
        )?;
        match self.dirty_ring_bytes {
            0 => writeln!(f, "  dirty ring:               no")?,
            n => writeln!(
                f,
                "  dirty ring:               yes, up to {} KiB (acq/rel: {})",
                n / 1024,
                yes(self.dirty_ring_acq_rel)
            )?,
        }
        Ok(())
    }
}

/// A human-readable KVM report: the facts, or why KVM is unusable and what to check.
pub fn host_report() -> String {
    match host_facts() {
        Ok(f) => f.to_string(),
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!(
                "kvm\n  usable:                   NO: {e}{cause}\n  \
                 hint: the kernel log (dmesg | grep -i kvm) says why the KVM module did not bind;\n  \
                 \x20     nested guests need virtualization exposed by the outer hypervisor\n"
            )
        }
    }
}
