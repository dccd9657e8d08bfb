//! The RAM side of live migration, over vm-memory guest memory.
//!
//! This crate holds the algorithms that move a guest's RAM from a source to
//! a destination; the bytes they exchange are `migration-stream`'s wire
//! format, and the hypervisor plugs in through the [`DirtyLog`] trait. It
//! has no unsafe code and needs no KVM: any [`GuestMemoryMmap`] works, which
//! is how its tests run. Errors answer [`Error::kind`], so a controller can
//! tell a broken link from a disagreeing peer from a local failure.
//!
//! | piece | module |
//! |-------|--------|
//! | [`DirtyBitmap`]: atomic, one bit per page, taken in chunks | [`bitmap`] |
//! | [`RamBlock`], [`RamBlocks`]: named blocks over guest memory; the destination's [`BlockResolver`](migration_stream::BlockResolver) | [`block`] |
//! | [`DirtyLog`], [`VmmDirtyLog`], [`CompositeDirtyLog`] | [`dirty_log`] |
//! | [`PrecopySaver`] (also the postcopy source: [`PostcopySwitch`], [`PostcopyOutcome`]), [`PrecopyLoader`] | [`precopy`] |
//! | [`PageScheduler`] (source: which pages next, on which channel): [`LinearScan`], [`RequestFirst`], [`PageRequester`] | [`schedule`] |
//! | [`Channel`], [`ChannelSet`], [`Channels`]: the main and preempt channels a source writes | [`channel`] |
//! | [`PagePlacer`] (destination: how a page lands): [`CopyPlacer`], [`UffdPlacer`] | [`placer`] |
//! | the postcopy destination: [`check_support`], [`Discarder`], [`FaultHandler`], blocktime, [`PostcopyIncoming`] | [`postcopy`] |
//! | [`BalloonInhibitor`]: no balloon discards while postcopy runs | [`balloon`] |
//! | [`Keepalive`], [`PeerLiveness`]: pings, and noticing a silent peer | [`keepalive`] |
//! | [`PrecopyParams`], [`Params`] (lock-free, shared), [`RamStats`] (QEMU's `query-migrate` fields) | [`stats`] |
//! | [`Error`], its [`ErrorKind`] (link, protocol, local) | [`error`] |
//!
//! The seams are traits with simple implementations, so a postcopy session
//! composes them: a [`RequestFirst`] scheduler and [`Channels`] with a
//! preempt writer on the source, a [`UffdPlacer`] on the destination. The
//! only unsafe code they need (the `UFFDIO_COPY` into guest memory) lives in
//! `uffd-sys`.
//!
//! # Precopy in short
//!
//! The source sends every page once, zero pages as flags only, while the
//! guest runs; then, pass after pass, the pages the guest dirtied in the
//! meantime, under a bandwidth limit. When what remains can be sent within
//! the downtime limit at the measured bandwidth, the caller pauses the
//! vCPUs and the saver sends the rest. The destination checks the block
//! list, places each page and records it as received. See [`precopy`].
//!
//! # Examples
//!
//! Precopy of a guest that is not running, into a `Vec`, then loaded into
//! fresh memory and compared.
//!
//! ```
//! use std::sync::atomic::AtomicBool;
//! use std::sync::Arc;
//!
//! use migration_ram::{
//!     GuestMemoryMmap, PrecopyLoader, PrecopyParams, PrecopySaver, RamBlocks, RamStats,
//!     VmmDirtyLog,
//! };
//! use migration_stream::{Record, StreamReader, StreamWriter};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 640 KiB below a hole, 1 MiB above it.
//! let ranges = [(GuestAddress(0), 640 << 10), (GuestAddress(1 << 20), 1 << 20)];
//! let names = ["pc.ram", "pc.ram.high"];
//! let src = Arc::new(GuestMemoryMmap::from_ranges(&ranges)?);
//! src.write_slice(b"hello, destination", GuestAddress(0x1000))?;
//! src.write_slice(&[0xab; 4096], GuestAddress(0x10_0000))?;
//!
//! // Source.
//! let stats = Arc::new(RamStats::new());
//! let mut saver = PrecopySaver::new(
//!     src.clone(),
//!     RamBlocks::from_guest_memory(&src, &names)?,
//!     Arc::new(VmmDirtyLog::new(src.clone())),
//!     PrecopyParams::default().shared(),
//!     stats.clone(),
//!     Arc::new(AtomicBool::new(false)),
//! );
//! let mut w = StreamWriter::new(Vec::new());
//! saver.setup(&mut w)?;
//! let pass = saver.iterate(&mut w)?;
//! assert!(pass.switchover, "nothing runs, nothing is dirtied again");
//! saver.complete(&mut w)?;
//! w.write_complete()?;
//! let stream = w.into_inner()?;
//! let s = stats.snapshot();
//! assert_eq!((s.normal, s.remaining), (2, 0));
//! assert_eq!(s.normal + s.duplicate, (640 << 10) / 4096 + (1 << 20) / 4096);
//!
//! // Destination.
//! let dst = Arc::new(GuestMemoryMmap::from_ranges(&ranges)?);
//! let mut loader = PrecopyLoader::new(
//!     dst.clone(),
//!     RamBlocks::from_guest_memory(&dst, &names)?,
//!     Arc::new(RamStats::new()),
//! );
//! let mut r = StreamReader::new(&stream[..]);
//! assert_eq!(loader.load(&mut r)?, Record::Complete);
//!
//! for (at, len) in ranges {
//!     let (mut a, mut b) = (vec![0; len], vec![0; len]);
//!     src.read_slice(&mut a, at)?;
//!     dst.read_slice(&mut b, at)?;
//!     assert!(a == b);
//! }
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]

pub mod balloon;
pub mod bitmap;
pub mod block;
pub mod channel;
pub mod dirty_log;
pub mod error;
pub mod keepalive;
pub mod placer;
pub mod postcopy;
pub mod precopy;
pub mod preempt;
mod rate;
pub mod schedule;
pub mod snapshot;
pub mod stats;

pub use balloon::{BalloonInhibitor, InhibitGuard};
pub use bitmap::{DirtyBitmap, TakenPages};
pub use block::{RamBlock, RamBlocks, DEFAULT_PAGE_SIZE};
pub use channel::{Channel, ChannelSet, Channels};
pub use dirty_log::{CompositeDirtyLog, DirtyLog, VmmDirtyLog};
pub use error::{Error, Result};
pub use keepalive::{Keepalive, PeerLiveness};
/// The three kinds of error a migration tells apart, answered by
/// [`Error::kind`].
pub use migration_stream::ErrorKind;
pub use placer::{CopyPlacer, PagePlacer, UffdPlacer, ZERO_RUN_DISCARD_BYTES};
pub use postcopy::{
    check_support, Discarder, FaultHandler, FaultStats, PageRequestSink, PostcopyError,
    PostcopyIncoming,
};
pub use precopy::{IterationOutcome, PrecopyLoader, PrecopySaver};
pub use precopy::{PostcopyOutcome, PostcopySwitch};
pub use preempt::{PreemptSender, Served, PREEMPT_READAHEAD};
pub use schedule::{Batch, LinearScan, PageRequester, PageScheduler, RequestFirst};
pub use stats::{Params, PrecopyParams, RamStats, RamStatsSnapshot, SharedParams};
/// The vm-memory crate this crate is built on, for callers that want the
/// same version.
pub use vm_memory;

/// The guest memory used throughout: vm-memory's mmap backend with an
/// atomic dirty bitmap per region (writes through vm-memory's API are
/// recorded there; [`VmmDirtyLog`] reads them).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// One region of a [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
