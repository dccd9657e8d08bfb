//! QMP, QEMU's Machine Protocol, as management software already speaks it.
//!
//! - [`legacy`]: today's control socket over the crate's own [`crate::json`] value, used
//!   by the migration controller and `demovm`. Its items are re-exported here so they
//!   keep compiling; it goes once the session API and its QMP adapter replace the
//!   controller.
//! - [`server`]: the QMP server over `serde_json` that replaces it: a bounded output
//!   queue per client drained by a writer thread of its own (an event never waits for
//!   a slow client; a client that cannot keep up is dropped), a connection cap, and
//!   every thread joined when the server is dropped. Its names (`server::Server`,
//!   `server::Handler`, `server::EventSink`, ...) are not re-exported here, so they
//!   never clash with the legacy ones.

pub mod legacy;
pub mod server;

pub use legacy::{ErrorClass, EventBus, Greeting, QmpError, QmpHandler, QmpServer, MAX_LINE};
