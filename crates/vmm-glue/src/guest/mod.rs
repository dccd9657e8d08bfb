//! Test guests: the built-in workloads as real x86 code, the project's boot sectors,
//! and the checks that verify the RAM they leave behind.
//!
//! Every guest here is generated in Rust with iced-x86's `CodeAssembler`: no external
//! assembler runs at build time and no binary is trusted without its generator.
//!
//! - [`Workload`]: what a built-in guest does (`ab`, `random`, `idle`, `balloon`),
//!   whoever runs it: the soft vCPUs of [`crate::soft`] or real vCPUs.
//! - [`builtin`]: the built-in workloads as 64-bit long-mode code for KVM vCPUs, with
//!   their register contract ([`builtin::program`]).
//! - [`boot_sector`]: self-contained 512-byte boot sectors (`ab`, `random`) that a PC
//!   BIOS, QEMU, or a VMM without any BIOS starts at 0000:7c00 in real mode; the
//!   committed images live in `guests/` at the root of the repository.
//! - [`balloon`]: the `balloon` guest's port protocol (a minimal paravirtual balloon)
//!   and [`balloon_check`], which verifies what a `balloon` guest left in RAM.
//! - [`slices`] splits workload memory among vCPUs, and [`ab_check`] verifies what an
//!   `ab` guest left in it.
//!
//! # What the `ab` guests guarantee
//!
//! An `ab` vCPU increments the first byte of each 4 KiB page of its slice in order, one
//! `inc byte` at a time, and starts over at the end of the slice. Whenever it is
//! stopped, the pages before its position have been incremented once more than the
//! pages from its position on, so the first bytes of a slice read `n+1, …, n+1, n, …,
//! n` (modulo 256): at most one step down by one. A migration that loses or reorders
//! a page breaks the pattern, which [`ab_check`] detects.
//!
//! # Example
//!
//! ```
//! use vmm_glue::guest::{ab_check, slices, Workload};
//!
//! let w = Workload::parse("ab").unwrap();
//! assert_eq!(w.name(), "ab");
//! // 10 pages from 1 MiB for 3 vCPUs: 3, 3 and 4 pages.
//! let s = slices(0x10_0000, 0x10_0000 + 10 * 4096, 3).unwrap();
//! assert_eq!(s[2], (0x10_0000 + 6 * 4096, 0x10_0000 + 10 * 4096));
//! // First bytes of those 10 pages after a stop: each slice steps down at most once.
//! assert!(ab_check(&[7, 6, 6, 2, 2, 2, 9, 9, 8, 8], 3).is_ok());
//! assert!(ab_check(&[7, 6, 5, 2, 2, 2, 9, 9, 8, 8], 3).is_err());
//! ```

pub mod balloon;
pub mod boot_sector;
pub mod builtin;

pub use balloon::{balloon_check, BalloonSummary};

use iced_x86::code_asm::{al, dx, CodeAssembler};
use iced_x86::IcedError;

/// COM1's base I/O port, where the guests print.
pub const COM1: u16 = 0x3f8;

/// The page size the workloads step by (4 KiB, whatever the host uses).
pub const PAGE_SIZE: u64 = 4096;

/// Offset of COM1's line status register from [`COM1`].
const LSR: u16 = 5;
/// Line status: the transmitter holding register is empty (a byte may be written).
const LSR_THRE: u32 = 0x20;

/// A built-in guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Increments the first byte of every 4 KiB page of the vCPU's slice in an endless
    /// loop and writes `B` to COM1 after each pass.
    Ab,
    /// Writes 8-byte values of a xorshift64 generator to pseudo-random 8-byte-aligned
    /// places of pseudo-random pages of the slice, as fast as it can, with no output.
    Random,
    /// Does nothing (a halted guest).
    Idle,
    /// Splits the vCPU's slice in two: runs `ab` on the first half, and on the second
    /// (its balloon area) writes a marker in every page, then asks the VMM to take the
    /// area back, pass after pass ([`balloon`]).
    Balloon,
}

impl Workload {
    /// Every workload, in the order their names are usually listed.
    pub const ALL: [Workload; 4] = [
        Workload::Ab,
        Workload::Random,
        Workload::Idle,
        Workload::Balloon,
    ];

    /// Parses `ab`, `random`, `idle` or `balloon` (exactly, as [`Workload::name`]
    /// spells them).
    pub fn parse(s: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == s)
    }

    /// The name [`Workload::parse`] accepts: `ab`, `random`, `idle` or `balloon`.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Ab => "ab",
            Workload::Random => "random",
            Workload::Idle => "idle",
            Workload::Balloon => "balloon",
        }
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why workload memory cannot be split among vCPUs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    /// Zero vCPUs were asked for.
    #[error("a workload needs at least one vCPU")]
    NoVcpus,
    /// The memory does not start on a page boundary.
    #[error("workload memory starts at {start:#x}, not on a 4 KiB page boundary")]
    Unaligned {
        /// Start of the workload memory.
        start: u64,
    },
    /// Fewer whole pages than vCPUs.
    #[error(
        "workload memory [{start:#x}, {end:#x}) holds {pages} whole pages: \
         {vcpus} vCPUs need at least one each"
    )]
    TooSmall {
        /// Start of the workload memory.
        start: u64,
        /// End of the workload memory (exclusive).
        end: u64,
        /// Whole 4 KiB pages in it.
        pages: u64,
        /// vCPUs asked for.
        vcpus: usize,
    },
}

/// Splits the pages of `[start, end)` among `vcpus` vCPUs: `pages / vcpus` pages
/// each, the last slice taking the remainder, as [`crate::soft`] splits them. A
/// partial page at `end` belongs to no slice.
///
/// Returns each vCPU's `(start, end)`, end exclusive, both page-aligned: the RDI and
/// RSI of the [`builtin`] register contract. Fails unless `start` is page-aligned and
/// every vCPU gets at least one page.
pub fn slices(start: u64, end: u64, vcpus: usize) -> Result<Vec<(u64, u64)>, GuestError> {
    if vcpus == 0 {
        return Err(GuestError::NoVcpus);
    }
    if start % PAGE_SIZE != 0 {
        return Err(GuestError::Unaligned { start });
    }
    let pages = end.saturating_sub(start) / PAGE_SIZE;
    let count = vcpus as u64;
    if pages < count {
        return Err(GuestError::TooSmall {
            start,
            end,
            pages,
            vcpus,
        });
    }
    let per = pages / count;
    Ok((0..count)
        .map(|i| {
            let s = start + i * per * PAGE_SIZE;
            let e = if i + 1 == count {
                start + pages * PAGE_SIZE
            } else {
                s + per * PAGE_SIZE
            };
            (s, e)
        })
        .collect())
}

/// The a-b check of the `ab` workload: `pages[i]` is the first byte of page `i` of the
/// workload memory, which is split among `vcpus` vCPUs as [`slices`] splits it (`0`
/// counts as one vCPU). Within each slice every page's byte must equal the previous
/// page's, except at most one place where it is one less (modulo 256): the vCPU's
/// position.
///
/// The error names the vCPU and the page (counted from the start of the workload
/// memory) where the pattern breaks.
pub fn ab_check(pages: &[u8], vcpus: usize) -> Result<(), String> {
    let vcpus = vcpus.max(1);
    let per = pages.len() / vcpus;
    for v in 0..vcpus {
        let end = if v + 1 == vcpus {
            pages.len()
        } else {
            (v + 1) * per
        };
        ab_slice_check(&pages[v * per..end], v, v * per)?;
    }
    Ok(())
}

/// The a-b rule on the first bytes of vCPU `v`'s pages, the first of which is page
/// `first` of the workload memory (for the error).
fn ab_slice_check(slice: &[u8], v: usize, first: usize) -> Result<(), String> {
    let mut stepped = false;
    for (i, w) in slice.windows(2).enumerate() {
        if w[1] == w[0] {
            continue;
        }
        if w[1] == w[0].wrapping_sub(1) && !stepped {
            stepped = true;
            continue;
        }
        return Err(format!(
            "vCPU {v}: page {} holds {}, the page before it {}",
            first + i + 1,
            w[1],
            w[0]
        ));
    }
    Ok(())
}

/// Emits code that waits until COM1 can take a byte (line status bit 5), then leaves
/// DX = [`COM1`] for an `out dx, al`. Clobbers AL. Valid in 16-, 32- and 64-bit code.
fn wait_com1_ready(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut poll = a.create_label();
    a.mov(dx, u32::from(COM1 + LSR))?;
    a.set_label(&mut poll)?;
    a.in_(al, dx)?;
    a.test(al, LSR_THRE)?;
    a.jz(poll)?;
    a.mov(dx, u32::from(COM1))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(Workload::parse(w.name()), Some(w));
            assert_eq!(w.to_string(), w.name());
        }
        assert_eq!(Workload::parse("AB"), None);
        assert_eq!(Workload::parse("builtin:ab"), None);
        assert_eq!(Workload::parse(""), None);
    }

    #[test]
    fn slices_split_pages_and_give_the_last_the_remainder() {
        const S: u64 = 0x10_0000;
        const P: u64 = PAGE_SIZE;
        assert_eq!(
            slices(S, S + 10 * P, 3).unwrap(),
            vec![
                (S, S + 3 * P),
                (S + 3 * P, S + 6 * P),
                (S + 6 * P, S + 10 * P)
            ]
        );
        assert_eq!(slices(S, S + 2 * P, 1).unwrap(), vec![(S, S + 2 * P)]);
        // A partial page at the end belongs to no slice.
        assert_eq!(
            slices(S, S + 2 * P + 100, 2).unwrap(),
            vec![(S, S + P), (S + P, S + 2 * P)]
        );
    }

    #[test]
    fn slices_refuse_what_cannot_be_split() {
        assert_eq!(slices(0, 1 << 20, 0), Err(GuestError::NoVcpus));
        assert_eq!(
            slices(100, 1 << 20, 1),
            Err(GuestError::Unaligned { start: 100 })
        );
        let e = slices(0x10_0000, 0x10_0000 + 3 * PAGE_SIZE, 4).unwrap_err();
        assert_eq!(
            e,
            GuestError::TooSmall {
                start: 0x10_0000,
                end: 0x10_3000,
                pages: 3,
                vcpus: 4
            }
        );
        assert!(e.to_string().contains("4 vCPUs"), "{e}");
        assert!(slices(0x20_0000, 0x10_0000, 1).is_err(), "end before start");
    }

    #[test]
    fn ab_check_accepts_one_step_per_slice() {
        assert!(ab_check(&[5, 5, 4, 4, 9, 9, 9, 8], 2).is_ok());
        assert!(ab_check(&[0, 0, 255, 255], 1).is_ok(), "the byte wraps");
        assert!(ab_check(&[], 1).is_ok());
        assert!(
            ab_check(&[5, 4, 4, 3], 1).is_err(),
            "two steps in one slice"
        );
        assert!(
            ab_check(&[5, 6, 6, 6], 1).is_err(),
            "a page ahead of the one before"
        );
        assert!(ab_check(&[5, 3, 3, 3], 1).is_err(), "a step of two");
        // The step between two slices is no step within one.
        assert!(ab_check(&[5, 4, 9, 8], 2).is_ok());
        assert!(ab_check(&[5, 4, 9, 8], 1).is_err());
        // The last slice takes the remainder: pages 2..5 are one slice.
        assert!(ab_check(&[1, 1, 3, 3, 2], 2).is_ok());
        let e = ab_check(&[1, 1, 3, 2, 1], 2).unwrap_err();
        assert!(e.starts_with("vCPU 1: page 4 holds 1"), "{e}");
    }

    /// Runs a model of `ab` vCPUs (one `inc byte` per step, each on its slice) and
    /// checks the RAM after every single step, as a migration may stop them anywhere.
    #[test]
    fn ab_check_accepts_every_state_an_ab_guest_passes_through() {
        let pages = 23usize;
        let vcpus = 4usize;
        let slices = slices(0, pages as u64 * PAGE_SIZE, vcpus).unwrap();
        let mut mem = vec![0u8; pages];
        let mut cursors: Vec<u64> = slices.iter().map(|s| s.0).collect();
        // Uneven speeds, so vCPUs are at different places and passes.
        for step in 0..2000usize {
            let v = (step * 7 + step / 3) % vcpus;
            let (s, e) = slices[v];
            let page = (cursors[v] / PAGE_SIZE) as usize;
            mem[page] = mem[page].wrapping_add(1);
            cursors[v] += PAGE_SIZE;
            if cursors[v] >= e {
                cursors[v] = s;
            }
            ab_check(&mem, vcpus).unwrap();
        }
        assert!(mem.iter().all(|&b| b > 0), "every page was written");
    }
}
