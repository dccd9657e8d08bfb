//! Background snapshots with userfaultfd write protection, and restoring
//! them eagerly or lazily.
//!
//! A background snapshot saves guest RAM as it was at one instant, each
//! page exactly once, while the guest runs: RAM is write-protected while
//! the guest is paused for its vCPU and device state, then a saver writes
//! the pages in order, and a write to a page not saved yet blocks the writer
//! only until that page is copied. A dirty-logging save, in contrast, sends
//! pages again and again while the guest keeps changing them.
//!
//! | piece | what |
//! |-------|------|
//! | [`check_support`] | the host check (write protection of each block's memory, kernel-mode faults), before the guest is paused |
//! | [`BackgroundSnapshot`] | protection, the fault thread, the rate-limited scan, and the release of every protection on every way out |
//! | [`SnapshotSink`], [`StreamSink`], [`FileSink`] | where the pages go: a migration stream (any transport), or a snapshot file at fixed offsets |
//! | [`restore_eager`] | a snapshot file into guest memory before the guest runs |
//! | [`LazyRestore`] | the guest runs at once; pages come from the file on first touch, and a background fill places the rest |
//!
//! The snapshot file format is `migration_stream::snapshot`'s
//! (`docs/snapshot-format.md`).

mod error;
mod restore;
mod saver;
mod sink;
mod support;

pub use error::SnapshotError;
pub use restore::{restore_eager, LazyRestore, RestoreOutcome};
pub use saver::{BackgroundSnapshot, SnapshotOutcome, WriteFaultStats};
pub use sink::{FileSink, SnapshotSink, StreamSink};
pub use support::check_support;
