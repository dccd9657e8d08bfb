//! The RAM side of live migration, over vm-memory guest memory.
//!
//! This crate holds the algorithms that move a guest's RAM from a source to
//! a destination; the bytes they exchange are `migration-stream`'s wire
//! format, and the hypervisor plugs in through the [`DirtyLog`] trait. It has no unsafe code and needs no KVM: any [`GuestMemoryMmap`]
//! works, which is how its tests run.
//!
//! | piece | module |
//! |-------|--------|
//! | [`DirtyBitmap`]: atomic, one bit per page, taken in chunks | [`bitmap`] |
//! | [`RamBlock`], [`RamBlocks`]: named blocks over guest memory; the destination's [`BlockResolver`](migration_stream::BlockResolver) | [`block`] |
//! | [`DirtyLog`], [`VmmDirtyLog`], [`CompositeDirtyLog`] | [`dirty_log`] |
#![deny(unsafe_code)]

pub mod bitmap;
pub mod block;
pub mod dirty_log;
pub mod error;

pub use bitmap::{DirtyBitmap, TakenPages};
pub use block::{RamBlock, RamBlocks, DEFAULT_PAGE_SIZE};
pub use dirty_log::{CompositeDirtyLog, DirtyLog, VmmDirtyLog};
pub use error::{Error, Result};
/// The vm-memory crate this crate is built on, for callers that want the
/// same version.
pub use vm_memory;

/// The guest memory used throughout: vm-memory's mmap backend with an
/// atomic dirty bitmap per region (writes through vm-memory's API are
/// recorded there; [`VmmDirtyLog`] reads them).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// One region of a [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
