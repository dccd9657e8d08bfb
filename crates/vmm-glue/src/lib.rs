//! The hypervisor side of live migration over KVM.
//!
//! This crate joins the RAM algorithms of `migration-ram` to a VM:
//!
//! - [`kvm`]: the only module of the crate with `unsafe` code: KVM facts of the host
//!   (API version, dirty-log capabilities).
//! - [`vcpu`]: the [`vcpu::Vcpus`] trait the migration controller drives (pause, resume,
//!   state save and restore), whatever runs the vCPUs.
//! - [`soft`]: software vCPUs running the built-in guest workloads on host threads, for
//!   hosts without KVM (said loudly wherever they are used).
//! - [`serial`]: a minimal 16550 on COM1 whose registers migrate with the guest.
//! - [`vm`]: the VM of `demovm` (memory layout with a hole below 1 MiB, vCPUs, serial)
//!   and RAM verification helpers (`x-ram-digest`, `x-ram-sample`).
//! - [`controller`]: the migration controller (QEMU's states, source and destination
//!   threads, statistics) and its QMP commands.
//! - [`json`]: a small JSON value, parser and writer, hardened against hostile input.
//! - [`qmp`]: a QMP-compatible control socket (QEMU's greeting, negotiation, errors and
//!   events), with commands run by a [`qmp::QmpHandler`].

#![deny(unsafe_code)]

pub mod controller;
pub mod guest;
pub mod json;
#[allow(unsafe_code)]
pub mod kvm;
mod logger;
pub mod qmp;
pub mod serial;
pub mod session;
pub mod soft;
pub mod vcpu;
pub mod vm;

/// Guest memory as the whole stack uses it (mmap-backed, with vm-memory's atomic dirty
/// bitmap recording the writes the VMM or a soft vCPU makes).
pub use migration_ram::GuestMemoryMmap;

pub use logger::Logger;

/// An error and its sources, joined with `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
