//! The destination side of postcopy: the guest runs here before all of its
//! RAM arrived, and a page it touches that is still missing is asked for and
//! placed while the touching thread waits in the kernel.
//!
//! # The switch, as the destination sees it
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
//!  Packaged { device state,
//!    Listen                --->   FaultHandler::start: blocks registered for MISSING faults,
//!                                 fault thread; loader.set_placer(handler.placer())
//!    Run }                 --->   the vCPUs run
//!  pages (background and  --->   placed atomically (UFFDIO_COPY/ZEROPAGE), waking the
//!  requested)              <---   threads waiting on them; page requests on the return path
//!  Complete                --->   FaultHandler::finish: unregistered, thread joined;
//!                                 THP advised on, memory locked again, balloon free
//! ```
//!
//! [`PostcopyIncoming`] runs these steps in their order for a session; the
//! pieces are usable alone:
//!
//! | piece | what |
//! |-------|------|
//! | [`check_support`], [`check_blocks`] | the host check, before anything is received |
//! | [`Discarder`], [`ThpGuard`] | `Discard` commands; huge pages off and on again |
//! | [`FaultHandler`], [`PageRequestSink`] | the fault thread, page requests, the postcopy placer, [`FaultStats`] |
//! | [`BlocktimeSnapshot`] | QEMU's `postcopy-blocktime` figures, per vCPU and overall, with a latency histogram |
//! | [`MunlockGuard`] | guest memory the VMM locked, unlocked for the duration |
//! | [`crate::balloon::BalloonInhibitor`] | a balloon that must not discard pages meanwhile |
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
//!
//! # Hot paths
//!
//! Placing a page takes no lock and reads no clock unless a thread faulted on
//! it (then once, to close its wait). The fault thread reads faults in
//! batches, reads the clock once per batch, and asks the [`PageRequestSink`]
//! to flush once per batch.

mod blocktime;
mod discard;
mod error;
pub(crate) mod fault;
mod incoming;
mod mlock;
mod support;

pub use blocktime::{latency_bucket, BlocktimeSnapshot, LATENCY_BUCKETS};
pub use discard::{Discarder, ThpGuard};
pub use error::PostcopyError;
pub(crate) use fault::serve_events;
pub use fault::{FaultHandler, FaultStats, PageRequestSink};
pub use incoming::PostcopyIncoming;
pub use mlock::MunlockGuard;
pub(crate) use support::block_backing;
pub use support::{check_blocks, check_support, BlockSupport};
/// How the VMM locked its guest memory (for [`MunlockGuard`]).
pub use uffd_sys::MlockMode;
