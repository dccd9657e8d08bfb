//! The hypervisor side of live migration: what a VMM links to migrate its VM.
//!
//! - [`session`]: the migration session, source and destination, over traits
//!   the VMM implements for its vCPUs ([`session::Vcpus`]), its dirty log
//!   ([`migration_ram::DirtyLog`]) and its device state
//!   ([`session::DeviceState`]); typed capabilities, parameters, status and
//!   errors; events that never block it.
//! - [`kvm`]: the only module of the crate with `unsafe` code: a KVM VM over
//!   the VMM's guest RAM, vCPU threads with their run loop and kicking, boot
//!   helpers, the whole x86 vCPU and VM state as versioned sections, and KVM
//!   dirty logging (bitmap with manual protect, dirty ring).
//! - [`io`]: the port and MMIO bus between vCPUs and the VMM's devices, and
//!   interrupt lines.
//! - [`boot`]: booting a Linux bzImage (linux-loader, zero page, e820, MP
//!   table) on a PC layout.
//! - [`serial`]: a 16550 UART (vm-superio) with an interrupt line, a log
//!   file and a Unix-socket terminal, migrating as a device section.
//! - [`soft`]: software vCPUs running the built-in guest workloads on host
//!   threads, for hosts without KVM (said loudly wherever they are used).
//! - [`guest`]: the test guests: built-in 64-bit workloads and boot sectors,
//!   generated in Rust, and the a-b check of their RAM.
//! - [`verify`]: RAM digests and samples, to check a migration from outside.
//! - [`qmp`]: a QMP server and the adapter that maps QEMU's migration commands
//!   to a session.
//!
//! `demovm` (`src/bin/demovm`) is a minimal VMM built on this API alone, and
//! `examples/embed.rs` a smaller one that migrates itself.

#![deny(unsafe_code)]

pub mod boot;
pub mod guest;
pub mod io;
#[allow(unsafe_code)]
pub mod kvm;
mod logger;
pub mod qmp;
pub mod serial;
pub mod session;
pub mod soft;
pub mod verify;

/// Guest memory as the whole stack uses it (mmap-backed, with vm-memory's atomic dirty
/// bitmap recording the writes the VMM or a soft vCPU makes).
pub use migration_ram::GuestMemoryMmap;

pub use logger::Logger;

/// The calling thread's host thread id (`gettid`), read from
/// `/proc/thread-self`; 0 if it cannot be read.
pub fn thread_id() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// Parses a size: bytes, or a number with a binary `K`, `M` or `G` suffix
/// (`512M`, `1G`, `64k`, `65536`), as command lines take guest sizes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}: bytes, or a number with K, M or G"))
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(super::parse_size("512M"), Ok(512 << 20));
        assert_eq!(super::parse_size("1G"), Ok(1 << 30));
        assert_eq!(super::parse_size("64k"), Ok(64 << 10));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(super::parse_size("12X").is_err());
        assert!(super::parse_size("99999999999G").is_err());
        assert!(super::parse_size("").is_err());
    }

    #[test]
    fn thread_ids_tell_threads_apart() {
        let here = super::thread_id();
        let there = std::thread::spawn(super::thread_id).join().unwrap();
        assert!(here != 0 && there != 0 && here != there, "{here} {there}");
    }
}
