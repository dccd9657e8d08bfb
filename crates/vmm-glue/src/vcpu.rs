//! What the migration controller needs of a VM's vCPUs, whatever runs them.

/// Errors of vCPU control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A saved vCPU state does not fit this VM.
    #[error("vCPU state rejected: {0}")]
    BadState(String),
    /// The accelerator refused an operation.
    #[error("{op} failed")]
    Accel {
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest cannot run on this accelerator.
    #[error("{0}")]
    Unsupported(String),
}

/// The vCPUs of a VM, as the controller drives them.
pub trait Vcpus: Send + Sync {
    /// Which accelerator runs them (`kvm` or `soft`).
    fn accel(&self) -> &'static str;
    /// How many there are.
    fn count(&self) -> usize;
    /// Lets them run (the first start, or after [`Vcpus::pause`]).
    fn resume(&self) -> Result<(), VcpuError>;
    /// Stops them at a clean point and returns once every vCPU has stopped; their
    /// state is then stable and no guest write is in flight.
    fn pause(&self) -> Result<(), VcpuError>;
    /// Whether they are running.
    fn running(&self) -> bool;
    /// The state of every vCPU (paused), as an opaque versioned blob.
    fn save_state(&self) -> Result<(u32, Vec<u8>), VcpuError>;
    /// Restores a state saved by `save_state` on the source (paused, before resume).
    fn restore_state(&self, version: u32, data: &[u8]) -> Result<(), VcpuError>;
}
