//! The migration session a VMM links: source and destination, over traits the
//! VMM implements for its vCPUs, dirty log and device state.
//!
//! (Being built: the traits and the machine description are here; the session
//! itself follows.)

mod machine;
mod state;

pub use machine::{GuestRam, Machine, MachineError, RamRegion, MAX_DEVICE_NAME};
pub use state::{DeviceState, ExitHandler, GuestExit, Section, StateError, Vcpus};
