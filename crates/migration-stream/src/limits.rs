//! Caps on every length and count a peer can declare.
//!
//! A decoder checks each declared length against the cap here *before* it
//! allocates or reads anything, so a hostile or corrupt stream can make the
//! decoder fail but never make it allocate more than these bounds (and, for
//! variable-length blobs, never more than about twice the bytes the peer
//! actually sent: blobs are read in [`READ_CHUNK`] steps).
//!
//! The same caps bind the encoders, so a writer never produces a stream its
//! own reader would refuse.

/// Longest RAM block name, in bytes of UTF-8 (QEMU's `idstr` is 256 bytes).
pub const MAX_BLOCK_NAME_LEN: usize = 256;

/// Most RAM blocks a `RamSetup` record may announce.
pub const MAX_BLOCKS: u32 = 4096;

/// Smallest page size a block may declare (4 KiB).
pub const MIN_PAGE_SIZE: u32 = 4 << 10;

/// Largest page size a block may declare (1 GiB hugepages).
pub const MAX_PAGE_SIZE: u32 = 1 << 30;

/// Largest block size a `RamSetup` record may declare (1 PiB). Keeps every
/// offset + length computation far from `u64` overflow.
pub const MAX_BLOCK_SIZE: u64 = 1 << 50;

/// Longest device name in a `DeviceState` command, in bytes of UTF-8.
pub const MAX_DEVICE_NAME_LEN: usize = 256;

/// Largest device state blob (64 MiB).
pub const MAX_DEVICE_STATE_LEN: u64 = 64 << 20;

/// Largest `Packaged` blob (128 MiB): room for device state plus the commands
/// around it.
pub const MAX_PACKAGED_LEN: u64 = 128 << 20;

/// Largest machine state blob a snapshot file may hold (128 MiB, the
/// [`MAX_PACKAGED_LEN`] cap: the same device state a `Packaged` blob carries).
pub const MAX_SNAPSHOT_STATE_LEN: u64 = MAX_PACKAGED_LEN;

/// Largest total of the present bitmaps of one snapshot file, over all its
/// blocks (256 MiB: one bit per page, so 8 TiB of 4 KiB pages).
pub const MAX_SNAPSHOT_BITMAP_BYTES: u64 = 256 << 20;

/// Largest meta area of a snapshot file (512 MiB): room for the largest
/// block table, the largest state and the largest bitmaps together. A reader
/// checks the header's meta length against it before allocating.
pub const MAX_SNAPSHOT_META_LEN: u64 = 512 << 20;

/// Most ranges one `Discard` command may carry; a sender splits longer lists.
pub const MAX_DISCARD_RANGES: u32 = 65_536;

/// Largest received bitmap (128 MiB of bitmap, i.e. 4 TiB of 4 KiB pages).
/// A decoder given a block table further requires the bitmap to have exactly
/// one bit per page of the named block.
pub const MAX_RECV_BITMAP_BYTES: u64 = 128 << 20;

/// Step in which variable-length blobs are read, so the buffer only grows as
/// the peer's bytes actually arrive.
pub const READ_CHUNK: usize = 64 << 10;

/// Default capacity of the write buffer of the main and preempt channels
/// (1 MiB, for throughput).
pub const DEFAULT_STREAM_WRITE_BUFFER: usize = 1 << 20;

/// Default capacity of the read buffer of the main and preempt channels.
pub const DEFAULT_STREAM_READ_BUFFER: usize = 256 << 10;

/// Default buffer capacity of the return path in either direction (small
/// messages, latency matters).
pub const DEFAULT_RETURN_PATH_BUFFER: usize = 16 << 10;
