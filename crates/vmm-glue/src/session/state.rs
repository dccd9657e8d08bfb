//! What a VMM implements so that a session can migrate its VM: its vCPUs
//! ([`Vcpus`]) and any number of device-state sections ([`DeviceState`]).
//!
//! Both are small traits with no default methods: a VMM that forgets one does
//! not compile, rather than migrate silently wrong. State travels as named,
//! versioned [`Section`]s; the receiving side decides which versions it reads.
//!
//! # Order on the destination
//!
//! The session loads every device section (in the order the VMM registered
//! the devices), then hands all vCPU sections to [`Vcpus::restore_state`], and
//! only then may the vCPUs run. On the source, all of it is saved with the
//! vCPUs paused.

use migration_stream::ErrorKind;

/// One named, versioned piece of VM state, as it travels in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// A name unique within its owner (`regs.0`, `lapic.1`, ...): 1 to 200
    /// bytes of UTF-8.
    pub name: String,
    /// The version of `data`'s format.
    pub version: u32,
    /// The state.
    pub data: Vec<u8>,
}

impl Section {
    /// A section.
    pub fn new(name: impl Into<String>, version: u32, data: Vec<u8>) -> Self {
        Section {
            name: name.into(),
            version,
            data,
        }
    }
}

/// Why state could not be saved or loaded, or vCPUs not driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The saved state is malformed, or of a version this side does not read:
    /// the stream is at fault ([`ErrorKind::Protocol`]).
    #[error("malformed {what} state: {why}")]
    Malformed {
        /// The device or vCPU piece.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// The state is well-formed but this VM or host cannot take it: another
    /// vCPU count or accelerator, a CPU feature or XSAVE area this host lacks
    /// ([`ErrorKind::Local`]).
    #[error("{what} state does not fit this VM: {why}")]
    Incompatible {
        /// The device or vCPU piece.
        what: String,
        /// Why it does not fit.
        why: String,
    },
    /// The hypervisor or the host refused an operation
    /// ([`ErrorKind::Local`]).
    #[error("{op} failed")]
    Host {
        /// What was attempted (`KVM_SET_XSAVE on vCPU 1`).
        op: String,
        /// The error of the host.
        #[source]
        source: std::io::Error,
    },
    /// The operation is not allowed now: saving running vCPUs, restoring
    /// after they ran ([`ErrorKind::Local`]).
    #[error("{0}")]
    InvalidState(String),
}

impl StateError {
    /// Whose fault this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::Malformed { .. } => ErrorKind::Protocol,
            StateError::Incompatible { .. }
            | StateError::Host { .. }
            | StateError::InvalidState(_) => ErrorKind::Local,
        }
    }

    /// A [`StateError::Malformed`].
    pub fn malformed(what: impl Into<String>, why: impl Into<String>) -> Self {
        StateError::Malformed {
            what: what.into(),
            why: why.into(),
        }
    }

    /// A [`StateError::Incompatible`].
    pub fn incompatible(what: impl Into<String>, why: impl Into<String>) -> Self {
        StateError::Incompatible {
            what: what.into(),
            why: why.into(),
        }
    }

    /// A [`StateError::Host`].
    pub fn host(op: impl Into<String>, source: std::io::Error) -> Self {
        StateError::Host {
            op: op.into(),
            source,
        }
    }
}

/// A device whose state migrates: one named, versioned section.
///
/// The session calls `save` with the vCPUs paused (at switchover) and `load`
/// on the destination before the vCPUs first run. A device that cannot read
/// a version answers [`StateError::Malformed`]; one that cannot take a valid
/// state on this host, [`StateError::Incompatible`].
pub trait DeviceState: Send + Sync {
    /// The section's name, unique among the VM's devices (1 to 200 bytes of
    /// UTF-8). Source and destination must register the same names.
    fn name(&self) -> &str;

    /// The version of the format [`DeviceState::save`] writes.
    fn version(&self) -> u32;

    /// The device's state.
    fn save(&self) -> Result<Vec<u8>, StateError>;

    /// Loads a state that a source's [`DeviceState::save`] wrote as `version`.
    fn load(&self, version: u32, data: &[u8]) -> Result<(), StateError>;
}

/// How a guest stopped on its own, as its vCPUs report it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestExit {
    /// The guest shut down or reset (a triple fault included): QEMU's run
    /// state `shutdown`.
    Shutdown {
        /// What happened, for the operator (`triple fault on vCPU 0`).
        reason: String,
    },
    /// A vCPU hit an error the hypervisor cannot handle (an emulation
    /// failure, an unhandled exit): QEMU's run state `internal-error`.
    InternalError {
        /// The vCPU.
        vcpu: usize,
        /// What the hypervisor said.
        message: String,
    },
}

/// Receives the [`GuestExit`]s of a VM's vCPUs. Called on a vCPU thread: it
/// must not block.
pub type ExitHandler = Box<dyn Fn(GuestExit) + Send + Sync>;

/// The vCPUs of a VM, as a session drives them, whatever runs them (KVM, a
/// software stand-in, another hypervisor).
pub trait Vcpus: Send + Sync {
    /// What runs them (`kvm`, `soft`, ...), for the operator.
    fn accel(&self) -> &str;

    /// How many there are.
    fn count(&self) -> usize;

    /// Lets them run: the first start, or after [`Vcpus::pause`].
    fn resume(&self) -> Result<(), StateError>;

    /// Stops every vCPU at a clean point and returns once all have stopped:
    /// no guest write is in flight, no I/O exit half done, and their state is
    /// stable. Must work whatever the guest does (spinning, halted).
    fn pause(&self) -> Result<(), StateError>;

    /// Whether they run (resumed and not paused or stopped on their own).
    fn running(&self) -> bool;

    /// The state of every vCPU, paused, as sections (one per piece per vCPU,
    /// each versioned).
    fn save_state(&self) -> Result<Vec<Section>, StateError>;

    /// Restores what a source's [`Vcpus::save_state`] saved, paused, before
    /// they run. Refuses sections of another accelerator, vCPU count or CPU
    /// with a clear [`StateError`].
    fn restore_state(&self, sections: &[Section]) -> Result<(), StateError>;

    /// Where to report a guest that stops on its own (shutdown, internal
    /// error). A session installs its handler when it is built; vCPUs that
    /// cannot stop on their own may drop it.
    fn set_exit_handler(&self, handler: ExitHandler);

    /// The host thread id (`gettid`) of each vCPU's thread, in vCPU order
    /// (0 where unknown). A postcopy destination attributes the page faults
    /// of these threads to their vCPU (per-vCPU blocktime);
    /// [`crate::thread_id`] gives the calling thread's.
    fn thread_ids(&self) -> Vec<u32>;
}
