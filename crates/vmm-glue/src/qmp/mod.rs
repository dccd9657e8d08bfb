//! QMP, QEMU's Machine Protocol, as management software already speaks it.
//!
//! - [`server`]: the protocol: greeting, negotiation, commands with ids,
//!   QEMU's error classes, events; a bounded output queue per client drained
//!   by a writer thread of its own (an event never waits for a slow client; a
//!   client that cannot keep up is dropped), a connection cap, and every thread
//!   joined when the server is dropped.
//! - [`adapter`]: the thin layer that maps QEMU's migration commands to a
//!   [`Session`](crate::session::Session)'s typed calls and its events to QMP
//!   events. A VMM adds its own commands with a [`adapter::QmpExtension`].

pub mod adapter;
pub mod server;
