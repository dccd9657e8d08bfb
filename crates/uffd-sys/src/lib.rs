//! The Linux userfaultfd ABI, written by hand, and safe handles over it.
//!
//! This crate is the only place in the workspace with userfaultfd `unsafe` code. It
//! gives:
//!
//! - [`abi`]: the kernel's structs and ioctl numbers, checked at compile time against the
//!   `_IOC` formula and the kernel's struct sizes. No bindgen: `cargo build` needs nothing
//!   but a Rust toolchain.
//! - [`Uffd`]: a negotiated descriptor, opened through `/dev/userfaultfd` and, where that
//!   node is absent or refused, the `userfaultfd(2)` system call; always close-on-exec,
//!   non-blocking, and receiving kernel-mode faults (KVM touches guest memory from the
//!   kernel). Registration (MISSING, WP, MINOR), copy, zeropage, write-protect, continue,
//!   wake, move and poison, with the kernel's errno and partial counts reported as they
//!   are; batched non-blocking event reads into an [`EventBuf`].
//! - [`probe()`]: which paths, features and memory kinds work on this host.
//! - [`Mapping`]: small owned mappings of each memory kind, for probing, tests and
//!   benchmarks; [`mapping::memfd`] makes the shmem and hugetlbfs memfds behind them,
//!   for callers that map guest memory themselves.
//! - `guest` (feature `vm-memory`): safe whole-page `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`
//!   into a vm-memory `GuestMemoryMmap`, range-checked (`Uffd::copy_to_guest`,
//!   `Uffd::zero_guest`, `guest_host_range`).
//! - `host_memory` (feature `vm-memory`): what a postcopy destination does to guest
//!   memory besides placing pages, safely over a checked range: tell a region's
//!   backing (memory kind, page size), discard pages so they fault again, transparent
//!   huge page advice, mlock and munlock.
//! - [`sched`]: the scheduling hint of the threads that resolve faults (a short
//!   slice, so they run at once when they wake).
//!
//! Calls that can change bytes other code may read (`copy`, `move_pages`, `poison`) are
//! `unsafe fn` with a `# Safety` section; the rest are safe.
//!
//! # Examples
//!
//! Resolve a missing-page fault of another thread by copying a page in:
//!
//! ```no_run
//! use std::sync::Arc;
//! use uffd_sys::{CopyMode, Event, EventBuf, Mapping, MemoryKind, RegisterMode, Uffd};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let uffd = Uffd::new()?;
//! let map = Arc::new(Mapping::new(MemoryKind::Anonymous, 4096)?);
//! uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)?;
//!
//! let toucher = {
//!     let map = Arc::clone(&map);
//!     std::thread::spawn(move || map.load_u8(0))
//! };
//! let mut events = EventBuf::new(16);
//! let page = [7u8; 4096];
//! 'outer: loop {
//!     uffd.wait_readable(None)?;
//!     for ev in uffd.read_events(&mut events)? {
//!         if let Event::PageFault(pf) = ev {
//!             // SAFETY: `map` is only accessed through copies and atomics.
//!             unsafe { uffd.copy(pf.address, &page, CopyMode::empty())? };
//!             break 'outer;
//!         }
//!     }
//! }
//! assert_eq!(toucher.join().unwrap()?, 7);
//! # Ok(())
//! # }
//! ```

pub mod abi;
mod error;
mod event;
mod flags;
#[cfg(feature = "vm-memory")]
pub mod guest;
#[cfg(feature = "vm-memory")]
pub mod host_memory;
pub mod mapping;
mod probe;
pub mod sched;
mod uffd;

pub use error::{Error, MemoryOp, Op, Result};
pub use event::{Event, EventBuf, FaultKind, PageFault};
pub use flags::{Features, Ioctls, RegisterMode};
#[cfg(feature = "vm-memory")]
pub use guest::guest_host_range;
#[cfg(feature = "vm-memory")]
pub use host_memory::{
    advise_guest_thp, discard_guest, guest_backing, mlock_guest, munlock_guest, populate_guest,
    region_backing, write_protected_pages, Backing, DiscardMethod, MlockMode, Populate, ThpAdvice,
};
pub use mapping::{Mapping, MemoryKind};
pub use probe::{probe, thp_mode, MemorySupport, ModeSupport, Probe, ThpMode};
pub use uffd::{
    open_raw, query_features, CopyMode, OpenPath, OpenPreference, Readiness, Uffd, UffdBuilder,
    Wake, DEV_USERFAULTFD,
};
