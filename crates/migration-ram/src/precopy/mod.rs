//! Precopy: send all of RAM while the guest runs, then what it dirtied,
//! pass after pass, until the rest fits in the downtime limit; or switch
//! to postcopy and send the rest while the guest runs at the destination.
//!
//! # Source ([`PrecopySaver`])
//!
//! ```text
//!  new ──> setup ──> iterate* ─┬──> complete              (caller pauses vCPUs
//!            │          │      │       │                   before complete or
//!            │          │      └──> start_postcopy ──> postcopy_send+
//!            │          │              │                      │
//!            └──────────┴──────────────┴──────────────────────┴──> abort
//! ```
//!
//! - `setup` starts the dirty log, marks every page dirty, syncs once and
//!   writes `RamSetup` on the main channel.
//! - `iterate` is one pass: the [`PageScheduler`](crate::PageScheduler)
//!   starts a new round and hands out batches of dirty pages until it is
//!   over; every page is sent once, zero pages as flags only, each batch on
//!   the [`Channel`](crate::Channel) it names; then `EndOfSection` and
//!   `Sync` on the main channel; the dirty log is synced and the remaining
//!   dirty bytes are compared with what the measured bandwidth moves in
//!   the downtime limit.
//! - `complete` (vCPUs paused) syncs a last time, sends everything still
//!   dirty without a bandwidth limit, writes `EndOfSection` and stops the
//!   dirty log.
//! - `abort` stops the dirty log. Nothing is lost before it: a batch's bits
//!   are taken from the dirty bitmap (at most 256 pages, 1 MiB with the
//!   default [`LinearScan`](crate::LinearScan)) and cleared for good only
//!   once its records were flushed to the channel; if anything fails in
//!   between (read, write, flush, cancel, a missing channel, a silent
//!   peer), the whole batch is marked dirty again.
//!
//! - `set_interrupt` gives a flag that ends an `iterate` at the next chunk
//!   boundary (QEMU's `migrate-start-postcopy` during a pass): the chunk
//!   being sent completes, the pages not reached stay dirty.
//!
//! ## Postcopy, the source side
//!
//! QEMU's hybrid postcopy: precopy passes first, then the switch.
//!
//! - Every page handed to a channel is recorded in its block's `sent`
//!   bitmap ([`RamBlock::sent`](crate::RamBlock::sent)).
//! - `start_postcopy` (vCPUs paused) syncs the dirty log a last time and
//!   stops it; each page both sent and dirty is stale at the destination,
//!   which is told to drop it: `Discard` commands, per block, consecutive
//!   pages merged into ranges, at most `MAX_DISCARD_RANGES` per command.
//!   The caller then writes the device state packaged with `Listen` and
//!   `Run`.
//! - `postcopy_send` sends every page still dirty through a
//!   [`RequestFirst`](crate::RequestFirst) scheduler: pages the destination
//!   faulted on (queued by the return-path thread through the
//!   [`PageRequester`](crate::PageRequester) of `page_requester`) go first,
//!   each alone, and the background scan goes on just after them, under
//!   `max_postcopy_bandwidth`. It writes `EndOfSection` once every page
//!   went; the caller writes `Complete`. A failure keeps every page not
//!   flushed dirty, for a retry.
//!
//! ```text
//!  main channel:  ... Ram* EndOfSection [Sync]   precopy passes
//!                 Discard*                       start_postcopy
//!                 Packaged[DeviceState* Listen Run]        (caller)
//!                 ( Ram | Ping )* EndOfSection   postcopy_send
//!                 Complete                                 (caller)
//! ```
//!
//! The channels are a [`ChannelSet`](crate::ChannelSet): a single
//! `StreamWriter` for precopy (main only), [`Channels`](crate::Channels)
//! when postcopy preempt adds a second connection.
//!
//! ## One chunk
//!
//! For each batch the saver calls [`DirtyLog::clear`](crate::DirtyLog::clear)
//! for its range, reads its pages into a chunk buffer (so a write racing
//! with the read is reported by the next sync), and then, with one clock
//! read and one read of [`Params`](crate::Params):
//!
//! 1. measures the bandwidth of the chunks before it (the estimate, and
//!    `mbps`, move at most every 100 ms, during the pass as well);
//! 2. runs the [keepalive](crate::keepalive), if any: a `Ping` on the main
//!    channel when one is due, [`Error::PeerSilent`](crate::Error::PeerSilent)
//!    when the peer has not answered for too long;
//! 3. has the rate limiter admit the chunk's exact bytes at once
//!    (`max_bandwidth`; a wait sleeps in slices of at most 10 ms, re-reading
//!    the limit, checking cancel and running the keepalive each time);
//! 4. writes the records and flushes the batch's channel.
//!
//! Nothing in this loop takes a lock or reads the clock per page.
//!
//! # Destination ([`PrecopyLoader`])
//!
//! The loader checks the announced blocks against its own
//! ([`PrecopyLoader::check_setup`]), refuses pages before that, and reads
//! each page into a page buffer (a truncated payload never reaches guest
//! memory), then hands it to its [`PagePlacer`](crate::PagePlacer), which
//! writes the whole page and records it in the block's `received` bitmap:
//! a [`CopyPlacer`](crate::CopyPlacer) by default (which leaves fresh zero
//! pages unwritten), a [`UffdPlacer`](crate::UffdPlacer) for memory under
//! userfaultfd. Offsets were already checked by the decoder against
//! [`PrecopyLoader::blocks`], the destination's own geometry. A `Ping`
//! (or any other command) ends [`PrecopyLoader::load`] with the record, for
//! the caller to answer (`Pong` on the return path) and call `load` again.

mod loader;
mod saver;

pub use loader::PrecopyLoader;
pub(crate) use saver::read_page;
pub use saver::{IterationOutcome, PostcopyOutcome, PostcopySwitch, PrecopySaver};

/// Largest chunk of pages taken from a dirty bitmap at once, in bytes.
pub(crate) const CHUNK_BYTES: u64 = 1 << 20;

/// Largest chunk of the postcopy background stream, in bytes: a requested
/// page waits for the chunk being written when its request comes, so this
/// bounds that wait (64 KiB is about 50 us at 10 Gbit/s).
pub(crate) const POSTCOPY_CHUNK_BYTES: u64 = 64 << 10;

/// Pages per chunk of `bytes` for a page size, between 1 and
/// [`crate::bitmap::TAKE_MAX_PAGES`].
pub(crate) fn chunk_pages_of(bytes: u64, page_size: u32) -> u64 {
    (bytes / u64::from(page_size)).clamp(1, crate::bitmap::TAKE_MAX_PAGES)
}

/// Whether `buf` is all zeros: 16-byte words OR-ed over 256-byte blocks,
/// stopping at the first non-zero block.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    fn word(c: &[u8]) -> u128 {
        let mut a = [0u8; 16];
        a.copy_from_slice(c);
        u128::from_ne_bytes(a)
    }
    let mut blocks = buf.chunks_exact(256);
    blocks
        .by_ref()
        .all(|b| b.chunks_exact(16).fold(0u128, |acc, c| acc | word(c)) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for at in [0, 15, 16, 255, 256, 4000, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "{at}");
            page[at] = 0;
        }
        assert!(is_zero(&[0u8; 300]));
        assert!(!is_zero(&[0, 0, 0, 1]));
        assert!(is_zero(&[]));
    }

    #[test]
    fn chunks() {
        let chunk_pages = |page| chunk_pages_of(CHUNK_BYTES, page);
        assert_eq!(chunk_pages(4096), 256);
        assert_eq!(chunk_pages(64 << 10), 16);
        assert_eq!(chunk_pages(2 << 20), 1);
        assert_eq!(chunk_pages(1 << 30), 1);
        // Postcopy's background chunks: 16 small pages, one huge page.
        assert_eq!(chunk_pages_of(POSTCOPY_CHUNK_BYTES, 4096), 16);
        assert_eq!(chunk_pages_of(POSTCOPY_CHUNK_BYTES, 2 << 20), 1);
    }
}
