//! The hypervisor side of live migration over KVM.
//!
//! This crate joins the RAM algorithms of `migration-ram` to a real hypervisor:
//!
//! - [`kvm`]: the only module of the crate with `unsafe` code: KVM facts of the host
//!   (API version, dirty-log capabilities) and, as the crate grows, dirty logging per
//!   memory slot and vCPU state.
//! - [`json`]: a small JSON value, parser and writer, hardened against hostile input.
//! - [`qmp`]: a QMP-compatible control socket (QEMU's greeting, negotiation, errors and
//!   events), with commands run by a [`qmp::QmpHandler`].
//!
//! The migration controller, the QMP-compatible control socket and the `demovm` binary
//! build on it.

#![deny(unsafe_code)]

pub mod json;
#[allow(unsafe_code)]
pub mod kvm;
pub mod qmp;
