//! QMP, QEMU's Machine Protocol, as management software already speaks it.
//!
//! - [`legacy`]: today's control socket over the crate's own [`crate::json`] value, used
//!   by the migration controller and `demovm`. Its items are re-exported here so they
//!   keep compiling; it goes once the session API and its QMP adapter replace the
//!   controller.

pub mod legacy;

pub use legacy::{ErrorClass, EventBus, Greeting, QmpError, QmpHandler, QmpServer, MAX_LINE};
