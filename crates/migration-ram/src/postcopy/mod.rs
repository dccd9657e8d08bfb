//! The destination side of postcopy: the guest runs here before all of its
//! RAM arrived, and a page it touches that is still missing is asked for and
//! placed while the touching thread waits in the kernel.
//!
//! # Before the guest runs here
//!
//! ```text
//!  source (main channel)          destination (this module)
//!  ---------------------          -------------------------
//!  Advise(postcopy)        --->   check_support: the memory kinds, a userfaultfd that sees
//!                                 kernel-mode faults with their features, each block
//!                                 test-registered (COPY, ZEROPAGE offered)
//!  precopy pages           --->   PrecopyLoader with its CopyPlacer (received bits set)
//!  Discard(block, ranges)* --->   Discarder: THP advised off (first time), pages dropped,
//!                                 received bits cleared
//! ```
//!
//! | piece | what |
//! |-------|------|
//! | [`check_support`], [`check_blocks`] | the host check, before anything is received |
//! | [`Discarder`], [`ThpGuard`] | `Discard` commands; huge pages off and on again |
//! | [`MunlockGuard`] | guest memory the VMM locked, unlocked for the duration |
//!
//! # Memory kinds
//!
//! | memory | userfaultfd feature | zero page | discard |
//! |--------|---------------------|-----------|---------|
//! | anonymous, 4 KiB | none | `UFFDIO_ZEROPAGE` | `MADV_DONTNEED` |
//! | memfd (shmem), 4 KiB | `MISSING_SHMEM` | `UFFDIO_ZEROPAGE` | `fallocate(PUNCH_HOLE)` |
//! | hugetlbfs, 2 MiB (or 1 GiB) | `MISSING_HUGETLBFS` | a copy of zeros | `fallocate(PUNCH_HOLE)` |
//!
//! A block's page size must be its memory's page size: pages are placed,
//! requested and discarded whole.

mod discard;
mod error;
mod mlock;
mod support;

pub use discard::{Discarder, ThpGuard};
pub use error::PostcopyError;
pub use mlock::MunlockGuard;
pub use support::{check_blocks, check_support, BlockSupport};
/// How the VMM locked its guest memory (for [`MunlockGuard`]).
pub use uffd_sys::MlockMode;
