//! Snapshot files: a VM's RAM and machine state at one instant, laid out so
//! that a restore can read any page by its offset.
//!
//! A background snapshot writes the guest's pages in any order while the
//! guest runs (faulting pages first, then a scan), so the file is not a
//! stream: every page has a fixed place, computed from the block table
//! alone, and zero pages are never written at all (the file has a hole
//! there). A lazy restore then reads the page a vCPU faulted on straight
//! from its place. The complete format, with byte tables, is in
//! `docs/snapshot-format.md`.
//!
//! ```text
//!  0        4096                          data_offset(0)      data_offset(1)      file_len
//!  +--------+------------------------------+----+--------------+--+----------------+
//!  | header | meta: blocks, state, bitmaps |pad | block 0 pages|  | block 1 pages  |
//!  +--------+------------------------------+----+--------------+--+----------------+
//!   4 KiB    meta_len bytes                      page p at data_offset(b) + p * page_size
//! ```
//!
//! - The **header** (one 4 KiB page) holds the magic `"RSNAPSHT"`, the
//!   version, the file and meta lengths, a `complete` byte, and two SHA-256
//!   sums: of the meta area, and of the header's own bytes before it.
//! - The **meta area** holds the block table (name, size, page size, data
//!   offset of each block), the machine state (an opaque blob of the
//!   caller's, in practice its `DeviceState` frames) and one *present*
//!   bitmap per block: bit set, the page's bytes are in the file; clear, the
//!   page is all zeros and was not written.
//! - The **data area** holds each block's pages at `data_offset(block) + page
//!   * page_size`, each block aligned to `max(4096, page_size)`.
//!
//! # Writing
//!
//! [`SnapshotWriter::create`] computes the [`SnapshotLayout`] from the block
//! table and the state's length, sizes the (sparse) file, writes the block
//! table and the state, and a header that says the file is not finished.
//! [`SnapshotWriter::write_pages`] takes `&self`: any number of threads may
//! write pages, in any order, each with one `pwrite` and, for the present
//! bitmap, atomic bit sets (no lock, no clock). [`SnapshotWriter::finish`]
//! writes the bitmaps, syncs, and only then writes the final header, and
//! syncs again: a file whose header says "complete" has all its bytes on
//! disk. A save that fails or is cancelled leaves a file the reader refuses
//! with [`Error::SnapshotIncomplete`].
//!
//! # Reading
//!
//! [`SnapshotReader::open`] checks the header and the meta area (magic,
//! version, both checksums, every length against its cap before anything is
//! allocated, the block table, every data offset, every bitmap) and keeps the
//! meta area in memory. [`SnapshotReader::read_pages`] then reads pages with
//! `pread`, filling the pages that are not present with zeros without
//! touching the file. It takes `&self`: a lazy-restore fault thread and a
//! background filler can share one reader.
//!
//! Page data is **not** checksummed: pages are written in any order, some
//! more than once, while the guest runs, so a running hash cannot be kept
//! without a lock or a second pass over the file. Header and meta area are
//! checksummed; a corrupt page reaches the guest as it is.
//!
//! # Examples
//!
//! ```
//! use migration_stream::{is_snapshot, BlockId, BlockInfo, SnapshotReader, SnapshotWriter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let path = std::env::temp_dir().join(format!("snapshot-doc-{}", std::process::id()));
//! let blocks = vec![BlockInfo { name: "pc.ram".into(), size: 16 * 4096, page_size: 4096 }];
//! let state = b"device state frames".to_vec();
//!
//! // Saver: pages in any order, zero pages skipped.
//! let w = SnapshotWriter::create(&path, &blocks, &state)?;
//! w.write_pages(BlockId(0), 3, &[0xbb; 4096])?;
//! w.write_pages(BlockId(0), 0, &[0xaa; 2 * 4096])?;
//! let summary = w.finish()?;
//! assert_eq!(summary.pages_stored, 3);
//!
//! // Restore: state first, then pages by offset.
//! assert!(is_snapshot(&std::fs::read(&path)?[..8]));
//! let r = SnapshotReader::open(&path)?;
//! assert_eq!(r.blocks(), &blocks[..]);
//! assert_eq!(r.state(), &state[..]);
//! let mut page = vec![0xffu8; 4096];
//! r.read_pages(BlockId(0), 2, &mut page)?; // never written: a zero page
//! assert!(page.iter().all(|&b| b == 0));
//! r.read_pages(BlockId(0), 3, &mut page)?;
//! assert!(page.iter().all(|&b| b == 0xbb));
//! # std::fs::remove_file(&path).ok();
//! # Ok(())
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::block::{validate_blocks, BlockGeometry, BlockId, BlockInfo, BlockResolver, BlockTable};
use crate::error::{Error, Result};
use crate::limits::{
    MAX_BLOCKS, MAX_BLOCK_NAME_LEN, MAX_SNAPSHOT_BITMAP_BYTES, MAX_SNAPSHOT_META_LEN,
    MAX_SNAPSHOT_STATE_LEN,
};
use crate::wire::{check_cap, track_alloc};

/// The eight bytes every snapshot file starts with: `"RSNAPSHT"`.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"RSNAPSHT";

/// The snapshot format version this crate reads and writes.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Size of the header: one 4 KiB page at offset 0. The meta area starts
/// right after it.
pub const SNAPSHOT_HEADER_LEN: u64 = 4096;

/// The smallest alignment of a block's data in the file (and of the data
/// area): 4 KiB. A block with larger pages is aligned to its page size.
pub const SNAPSHOT_MIN_ALIGN: u64 = 4096;

/// Bytes of one block table entry besides its name: `name_len: u16, size:
/// u64, page_size: u32, data_offset: u64`.
const BLOCK_ENTRY_FIXED: u64 = 2 + 8 + 4 + 8;
/// Bytes of the meta area before the block table: `block_count: u32,
/// state_len: u64`.
const META_PREFIX: u64 = 4 + 8;

// Header field offsets (see the module docs and docs/snapshot-format.md).
const H_MAGIC: Range<usize> = 0..8;
const H_VERSION: Range<usize> = 8..12;
const H_FLAGS: Range<usize> = 12..16;
const H_FILE_LEN: Range<usize> = 16..24;
const H_META_OFFSET: Range<usize> = 24..32;
const H_META_LEN: Range<usize> = 32..40;
const H_COMPLETE: usize = 40;
const H_RESERVED: Range<usize> = 41..48;
const H_CREATED: Range<usize> = 48..56;
const H_META_SHA: Range<usize> = 56..88;
const H_HEADER_SHA: Range<usize> = 88..120;
const H_PADDING: Range<usize> = 120..4096;
const HEADER_LEN: usize = 4096;

// The caps must leave room for the largest block table, state and bitmaps
// together, so a writer never makes a file its own reader refuses for length.
#[allow(clippy::cast_lossless)] // `u64::from` is not const.
const _: () = assert!(
    META_PREFIX
        + MAX_BLOCKS as u64 * (BLOCK_ENTRY_FIXED + MAX_BLOCK_NAME_LEN as u64)
        + MAX_SNAPSHOT_STATE_LEN
        + MAX_SNAPSHOT_BITMAP_BYTES
        <= MAX_SNAPSHOT_META_LEN
);
const _: () = assert!(HEADER_LEN as u64 == SNAPSHOT_HEADER_LEN);
const _: () = assert!(H_PADDING.end == HEADER_LEN);

/// Whether `first_bytes` (the start of a file, at least 8 bytes) begin with
/// [`SNAPSHOT_MAGIC`]: for a loader that tells a snapshot from a migration
/// stream by sniffing. Says nothing about the rest of the file.
pub fn is_snapshot(first_bytes: &[u8]) -> bool {
    first_bytes.starts_with(&SNAPSHOT_MAGIC)
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(value.checked_add(align - 1)? & !(align - 1))
}

/// The alignment of a block's data in the file: `max(4096, page_size)`.
fn block_align(page_size: u32) -> u64 {
    u64::from(page_size).max(SNAPSHOT_MIN_ALIGN)
}

/// Words (`u64`) of a present bitmap of `pages` pages.
fn bitmap_words(pages: u64) -> u64 {
    pages.div_ceil(64)
}

fn overflow(what: &'static str) -> Error {
    Error::TooLong {
        what,
        len: u64::MAX,
        max: u64::MAX,
    }
}

/// Where everything lives in a snapshot file: computed by a writer from the
/// block table and the state's length ([`SnapshotLayout::new`]), or read
/// (and checked) by a reader from the file.
///
/// Implements [`BlockResolver`], so page ranges can be checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLayout {
    table: BlockTable,
    data_offsets: Vec<u64>,
    state_len: u64,
    meta_len: u64,
    file_len: u64,
}

/// The length of the meta area for `blocks` (already validated) and a state
/// of `state_len` bytes, with every cap checked.
fn meta_len_for(blocks: &[BlockInfo], state_len: u64) -> Result<u64> {
    check_cap("snapshot machine state", state_len, MAX_SNAPSHOT_STATE_LEN)?;
    let mut table = 0u64;
    let mut bitmap_bytes = 0u64;
    for b in blocks {
        // Names are at most 256 bytes and there are at most 4096 blocks
        // (validated), so neither sum can overflow.
        table += BLOCK_ENTRY_FIXED + b.name.len() as u64;
        bitmap_bytes += bitmap_words(b.geometry().pages()) * 8;
    }
    check_cap(
        "snapshot present bitmaps",
        bitmap_bytes,
        MAX_SNAPSHOT_BITMAP_BYTES,
    )?;
    let len = META_PREFIX + table + state_len + bitmap_bytes;
    check_cap("snapshot meta area", len, MAX_SNAPSHOT_META_LEN)?;
    Ok(len)
}

impl SnapshotLayout {
    /// The layout a writer uses for `blocks` and a machine state of
    /// `state_len` bytes: the meta area right after the header, then each
    /// block in order at the next offset aligned to `max(4096, page_size)`,
    /// the file ending where the last block ends.
    ///
    /// Fails if a block breaks the block rules ([`validate_blocks`]), the
    /// state is longer than [`MAX_SNAPSHOT_STATE_LEN`], or the bitmaps would
    /// exceed [`MAX_SNAPSHOT_BITMAP_BYTES`].
    pub fn new(blocks: &[BlockInfo], state_len: u64) -> Result<Self> {
        let table = BlockTable::new(blocks.to_vec())?;
        let meta_len = meta_len_for(blocks, state_len)?;
        let mut cursor = align_up(SNAPSHOT_HEADER_LEN + meta_len, SNAPSHOT_MIN_ALIGN)
            .ok_or_else(|| overflow("snapshot file"))?;
        let mut data_offsets = Vec::with_capacity(blocks.len());
        for b in blocks {
            let at = align_up(cursor, block_align(b.page_size))
                .ok_or_else(|| overflow("snapshot file"))?;
            data_offsets.push(at);
            cursor = at
                .checked_add(b.size)
                .ok_or_else(|| overflow("snapshot file"))?;
        }
        Ok(SnapshotLayout {
            table,
            data_offsets,
            state_len,
            meta_len,
            file_len: cursor,
        })
    }

    /// The blocks, in id order.
    pub fn blocks(&self) -> &[BlockInfo] {
        self.table.blocks()
    }

    /// The blocks as a [`BlockTable`] (lookup by name, [`BlockResolver`]).
    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    /// Length of the machine state blob.
    pub fn state_len(&self) -> u64 {
        self.state_len
    }

    /// File offset of the meta area: always [`SNAPSHOT_HEADER_LEN`].
    pub fn meta_offset(&self) -> u64 {
        SNAPSHOT_HEADER_LEN
    }

    /// Length of the meta area.
    pub fn meta_len(&self) -> u64 {
        self.meta_len
    }

    /// File offset of the first page of `block`, `None` for an unknown
    /// block.
    pub fn data_offset(&self, block: BlockId) -> Option<u64> {
        self.data_offsets
            .get(usize::try_from(block.0).ok()?)
            .copied()
    }

    /// File offset of page `page` of `block`, `None` for an unknown block
    /// or a page past its end.
    pub fn page_offset(&self, block: BlockId, page: u64) -> Option<u64> {
        let g = self.geometry(block)?;
        if page >= g.pages() {
            return None;
        }
        // In range: page * page_size < size, and data_offset + size <= file_len.
        Some(self.data_offset(block)? + page * u64::from(g.page_size))
    }

    /// Length of the file in bytes (most of it holes where pages were zero).
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Checks that pages `first_page..` of `block`, `len` bytes, lie inside
    /// the block, and returns the file offset of the first one and the
    /// block's geometry.
    fn page_range(
        &self,
        block: BlockId,
        first_page: u64,
        len: u64,
    ) -> Result<(u64, BlockGeometry)> {
        let g = self.geometry(block).ok_or(Error::UnknownBlock { block })?;
        let offset = first_page
            .checked_mul(u64::from(g.page_size))
            .ok_or(Error::OutOfRange {
                block,
                offset: u64::MAX,
                len,
                block_size: g.size,
            })?;
        self.check_range(block, offset, len)?;
        let data = self
            .data_offset(block)
            .ok_or(Error::UnknownBlock { block })?;
        // offset + len <= size (checked), and data + size <= file_len.
        Ok((data + offset, g))
    }
}

impl BlockResolver for SnapshotLayout {
    fn geometry(&self, block: BlockId) -> Option<BlockGeometry> {
        self.table.geometry(block)
    }
}

/// The fields of a header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    file_len: u64,
    meta_len: u64,
    complete: bool,
    created_unix_ns: u64,
    meta_sha256: [u8; 32],
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[H_MAGIC].copy_from_slice(&SNAPSHOT_MAGIC);
        h[H_VERSION].copy_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        h[H_FLAGS].copy_from_slice(&0u32.to_be_bytes());
        h[H_FILE_LEN].copy_from_slice(&self.file_len.to_be_bytes());
        h[H_META_OFFSET].copy_from_slice(&SNAPSHOT_HEADER_LEN.to_be_bytes());
        h[H_META_LEN].copy_from_slice(&self.meta_len.to_be_bytes());
        h[H_COMPLETE] = u8::from(self.complete);
        h[H_CREATED].copy_from_slice(&self.created_unix_ns.to_be_bytes());
        h[H_META_SHA].copy_from_slice(&self.meta_sha256);
        let sha: [u8; 32] = Sha256::digest(&h[..H_HEADER_SHA.start]).into();
        h[H_HEADER_SHA].copy_from_slice(&sha);
        h
    }

    /// Decodes and checks a header. `bytes` is what the file holds at offset
    /// 0, up to [`HEADER_LEN`] bytes, `actual_len` the file's length.
    fn decode(bytes: &[u8], actual_len: u64) -> Result<Header> {
        let truncated = || Error::SnapshotTruncated {
            what: "its header",
            expected: SNAPSHOT_HEADER_LEN,
            actual: actual_len,
        };
        let n = bytes.len().min(SNAPSHOT_MAGIC.len());
        if bytes[..n] != SNAPSHOT_MAGIC[..n] {
            return Err(Error::SnapshotBadMagic {
                found: bytes[..n].to_vec(),
            });
        }
        if n < SNAPSHOT_MAGIC.len() {
            // A prefix of the magic (an empty file included): a snapshot cut
            // short, not another kind of file.
            return Err(truncated());
        }
        let u32_at = |r: Range<usize>| -> Result<u32> {
            let b = bytes.get(r).ok_or_else(truncated)?;
            Ok(u32::from_be_bytes(b.try_into().map_err(|_| truncated())?))
        };
        let u64_at = |r: Range<usize>| -> Result<u64> {
            let b = bytes.get(r).ok_or_else(truncated)?;
            Ok(u64::from_be_bytes(b.try_into().map_err(|_| truncated())?))
        };
        let version = u32_at(H_VERSION)?;
        if version != SNAPSHOT_VERSION {
            return Err(Error::SnapshotVersion {
                found: version,
                supported: SNAPSHOT_VERSION,
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(truncated());
        }
        let sha: [u8; 32] = Sha256::digest(&bytes[..H_HEADER_SHA.start]).into();
        if bytes[H_HEADER_SHA] != sha {
            return Err(Error::SnapshotChecksum { what: "header" });
        }
        match bytes[H_COMPLETE] {
            1 => {}
            0 => return Err(Error::SnapshotIncomplete),
            other => {
                return Err(Error::SnapshotField {
                    field: "complete byte",
                    found: u64::from(other),
                    expected: 1,
                })
            }
        }
        let flags = u32_at(H_FLAGS)?;
        if flags != 0 {
            return Err(Error::InvalidFlags {
                what: "snapshot header",
                bits: flags,
            });
        }
        for range in [H_RESERVED, H_PADDING] {
            let start = range.start;
            if let Some(i) = bytes[range].iter().position(|&b| b != 0) {
                return Err(Error::SnapshotReserved {
                    offset: (start + i) as u64,
                });
            }
        }
        let meta_offset = u64_at(H_META_OFFSET)?;
        if meta_offset != SNAPSHOT_HEADER_LEN {
            return Err(Error::SnapshotField {
                field: "meta offset",
                found: meta_offset,
                expected: SNAPSHOT_HEADER_LEN,
            });
        }
        let file_len = u64_at(H_FILE_LEN)?;
        if actual_len < file_len {
            return Err(Error::SnapshotTruncated {
                what: "the file length its header records",
                expected: file_len,
                actual: actual_len,
            });
        }
        if actual_len > file_len {
            return Err(Error::SnapshotTooLong {
                expected: file_len,
                actual: actual_len,
            });
        }
        let meta_len = u64_at(H_META_LEN)?;
        check_cap("snapshot meta area", meta_len, MAX_SNAPSHOT_META_LEN)?;
        if SNAPSHOT_HEADER_LEN + meta_len > file_len {
            return Err(Error::SnapshotOutOfFile {
                what: "the meta area".into(),
                offset: SNAPSHOT_HEADER_LEN,
                len: meta_len,
                file_len,
            });
        }
        let mut meta_sha256 = [0u8; 32];
        meta_sha256.copy_from_slice(&bytes[H_META_SHA]);
        Ok(Header {
            file_len,
            meta_len,
            complete: true,
            created_unix_ns: u64_at(H_CREATED)?,
            meta_sha256,
        })
    }
}

fn io_err(context: &'static str) -> impl Fn(io::Error) -> Error + Copy {
    move |source| Error::SnapshotIo { context, source }
}

/// Encodes the block table part of the meta area: `block_count`,
/// `state_len`, then each block.
fn encode_table(layout: &SnapshotLayout) -> Vec<u8> {
    let mut out = Vec::new();
    // At most MAX_BLOCKS blocks (validated).
    out.extend_from_slice(&(layout.blocks().len() as u32).to_be_bytes());
    out.extend_from_slice(&layout.state_len.to_be_bytes());
    for (b, &at) in layout.blocks().iter().zip(&layout.data_offsets) {
        // At most MAX_BLOCK_NAME_LEN bytes (validated).
        out.extend_from_slice(&(b.name.len() as u16).to_be_bytes());
        out.extend_from_slice(b.name.as_bytes());
        out.extend_from_slice(&b.size.to_be_bytes());
        out.extend_from_slice(&b.page_size.to_be_bytes());
        out.extend_from_slice(&at.to_be_bytes());
    }
    out
}

/// Sets the bits of pages `first..first + count` in `words`, one atomic OR
/// per word touched.
fn set_bits(words: &[AtomicU64], first: u64, count: u64) {
    let mut page = first;
    let end = first + count;
    while page < end {
        let bit = page % 64;
        let n = (64 - bit).min(end - page);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        if let Some(w) = usize::try_from(page / 64).ok().and_then(|i| words.get(i)) {
            w.fetch_or(mask, Ordering::Relaxed);
        }
        page += n;
    }
}

/// What [`SnapshotWriter::finish`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Pages whose bytes are in the file (present bits set), all blocks.
    pub pages_stored: u64,
    /// Bytes of those pages (each page counted once).
    pub page_bytes_stored: u64,
    /// Bytes written to the file: header (twice), meta area, and every
    /// page given to [`SnapshotWriter::write_pages`] (a page written twice
    /// counted twice).
    pub bytes_written: u64,
    /// Length of the file (holes included).
    pub file_len: u64,
    /// Bytes the file system allocated for the file (`st_blocks * 512`):
    /// close to the header, meta and stored pages, not to `file_len`, on a
    /// file system with holes.
    pub allocated_bytes: u64,
}

/// Writes a snapshot file: pages at fixed offsets in any order, from any
/// number of threads, then [`finish`](SnapshotWriter::finish).
///
/// Dropping a writer without `finish` leaves a file that readers refuse as
/// unfinished ([`Error::SnapshotIncomplete`]); the caller may delete it.
#[derive(Debug)]
pub struct SnapshotWriter {
    file: File,
    layout: SnapshotLayout,
    /// One bitmap per block: page `i` is bit `i % 64` of word `i / 64`.
    present: Vec<Box<[AtomicU64]>>,
    /// SHA-256 over the meta area written so far (block table and state).
    meta_hasher: Sha256,
    /// Length of the block table and state at the start of the meta area.
    meta_prefix_len: u64,
    created_unix_ns: u64,
    page_bytes_written: AtomicU64,
}

impl SnapshotWriter {
    /// Creates (or truncates) the file at `path` and starts a snapshot of
    /// `blocks` with machine state `state` (see [`SnapshotWriter::from_file`]).
    pub fn create(path: &Path, blocks: &[BlockInfo], state: &[u8]) -> Result<Self> {
        // Check the layout before touching the file.
        SnapshotLayout::new(blocks, state.len() as u64)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Error::SnapshotOpen {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_file(file, blocks, state)
    }

    /// Starts a snapshot in `file` (opened for writing, not in append mode,
    /// where Linux ignores the offsets of `pwrite`; its old contents are
    /// discarded): computes the layout, sizes the file to
    /// [`SnapshotLayout::file_len`] (sparse: nothing is allocated for the
    /// data area), writes the block table and the state into the meta area
    /// and a header marked not complete. `state` is not kept.
    pub fn from_file(file: File, blocks: &[BlockInfo], state: &[u8]) -> Result<Self> {
        let layout = SnapshotLayout::new(blocks, state.len() as u64)?;
        file.set_len(0)
            .and_then(|()| file.set_len(layout.file_len))
            .map_err(io_err("sizing the snapshot file"))?;
        let table = encode_table(&layout);
        let mut meta_hasher = Sha256::new();
        meta_hasher.update(&table);
        meta_hasher.update(state);
        file.write_all_at(&table, SNAPSHOT_HEADER_LEN)
            .map_err(io_err("writing the snapshot block table"))?;
        let state_at = SNAPSHOT_HEADER_LEN + table.len() as u64;
        file.write_all_at(state, state_at)
            .map_err(io_err("writing the snapshot machine state"))?;
        let created_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let header = Header {
            file_len: layout.file_len,
            meta_len: layout.meta_len,
            complete: false,
            created_unix_ns,
            meta_sha256: [0; 32],
        };
        file.write_all_at(&header.encode(), 0)
            .map_err(io_err("writing the snapshot header"))?;
        let present = layout
            .blocks()
            .iter()
            .map(|b| {
                (0..bitmap_words(b.geometry().pages()))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        Ok(SnapshotWriter {
            file,
            meta_prefix_len: table.len() as u64 + state.len() as u64,
            layout,
            present,
            meta_hasher,
            created_unix_ns,
            page_bytes_written: AtomicU64::new(0),
        })
    }

    /// The file's layout.
    pub fn layout(&self) -> &SnapshotLayout {
        &self.layout
    }

    /// When the snapshot was started, in nanoseconds since the Unix epoch
    /// (recorded in the header; informational).
    pub fn created_unix_ns(&self) -> u64 {
        self.created_unix_ns
    }

    /// Writes `data`, a whole number of pages of `block`, as pages
    /// `first_page..` at their fixed offset (one `pwrite`), then marks them
    /// present. Safe to call from several threads at once, for any pages in
    /// any order; a page written twice keeps the last bytes. The caller
    /// skips zero pages (they read as zeros without being written); a zero
    /// page passed here is stored like any other.
    ///
    /// Fails without writing if the range is not inside the block or `data`
    /// is not a non-zero multiple of its page size; fails with
    /// [`Error::SnapshotIo`] (a full disk) otherwise, the pages then not
    /// marked present.
    pub fn write_pages(&self, block: BlockId, first_page: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let (at, g) = self.layout.page_range(block, first_page, len)?;
        self.file
            .write_all_at(data, at)
            .map_err(io_err("writing pages"))?;
        if let Some(words) = usize::try_from(block.0)
            .ok()
            .and_then(|i| self.present.get(i))
        {
            set_bits(words, first_page, len / u64::from(g.page_size));
        }
        self.page_bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Whether page `page` of `block` has been written (`false` for an
    /// unknown block or page).
    pub fn is_present(&self, block: BlockId, page: u64) -> bool {
        usize::try_from(block.0)
            .ok()
            .and_then(|i| self.present.get(i))
            .and_then(|words| words.get(usize::try_from(page / 64).ok()?))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }

    /// Bytes of pages given to [`write_pages`](Self::write_pages) so far (a
    /// page written twice counts twice): for progress and rate limiting.
    pub fn bytes_written(&self) -> u64 {
        self.page_bytes_written.load(Ordering::Relaxed)
    }

    /// Finishes the file: writes the present bitmaps, syncs the data and the
    /// meta area (`fdatasync`), then writes the header marked complete with
    /// the meta area's SHA-256, and syncs again. Only then does a reader
    /// accept the file.
    ///
    /// Call it after every [`write_pages`](Self::write_pages) has returned
    /// (it takes the writer by value, so shared borrows have ended; the
    /// join or scope that ended them orders their bit sets before it).
    pub fn finish(self) -> Result<SnapshotSummary> {
        let mut bitmaps = Vec::new();
        let mut pages_stored = 0u64;
        let mut page_bytes_stored = 0u64;
        for (b, words) in self.layout.blocks().iter().zip(&self.present) {
            let mut stored = 0u64;
            for w in words.iter() {
                let w = w.load(Ordering::Relaxed);
                stored += u64::from(w.count_ones());
                bitmaps.extend_from_slice(&w.to_be_bytes());
            }
            pages_stored += stored;
            page_bytes_stored += stored * u64::from(b.page_size);
        }
        let page_bytes_written = self.bytes_written();
        let mut meta_hasher = self.meta_hasher;
        meta_hasher.update(&bitmaps);
        let meta_sha256: [u8; 32] = meta_hasher.finalize().into();
        self.file
            .write_all_at(&bitmaps, SNAPSHOT_HEADER_LEN + self.meta_prefix_len)
            .map_err(io_err("writing the snapshot present bitmaps"))?;
        self.file
            .sync_data()
            .map_err(io_err("syncing the snapshot data"))?;
        let header = Header {
            file_len: self.layout.file_len,
            meta_len: self.layout.meta_len,
            complete: true,
            created_unix_ns: self.created_unix_ns,
            meta_sha256,
        };
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(io_err("writing the final snapshot header"))?;
        self.file
            .sync_data()
            .map_err(io_err("syncing the snapshot header"))?;
        let allocated_bytes = self
            .file
            .metadata()
            .map_err(io_err("reading the snapshot file's size"))?
            .blocks()
            .saturating_mul(512);
        Ok(SnapshotSummary {
            pages_stored,
            page_bytes_stored,
            bytes_written: page_bytes_written + 2 * SNAPSHOT_HEADER_LEN + self.layout.meta_len,
            file_len: self.layout.file_len,
            allocated_bytes,
        })
    }
}

/// A cursor over the meta area that refuses to read past its end.
struct MetaCursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> MetaCursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, len: u64, what: &'static str) -> Result<&'a [u8]> {
        let len = usize::try_from(len).map_err(|_| Error::SnapshotMetaTruncated { what })?;
        if len > self.remaining() {
            return Err(Error::SnapshotMetaTruncated { what });
        }
        let b = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(b)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let b = self.take(N as u64, what)?;
        b.try_into()
            .map_err(|_| Error::SnapshotMetaTruncated { what })
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
}

/// Reads a snapshot file: checks it whole at open, then hands out the
/// machine state and reads pages by offset.
///
/// `Send + Sync`: every method takes `&self` and reads with `pread`.
#[derive(Debug)]
pub struct SnapshotReader {
    file: File,
    layout: SnapshotLayout,
    /// The meta area as read (checksum verified).
    meta: Vec<u8>,
    /// Where the state lies in `meta`.
    state: Range<usize>,
    /// Where each block's present bitmap starts in `meta`.
    bitmaps: Vec<usize>,
    /// Present pages of each block.
    present: Vec<u64>,
    created_unix_ns: u64,
}

impl SnapshotReader {
    /// Opens and checks the snapshot file at `path` (see
    /// [`SnapshotReader::from_file`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::SnapshotOpen {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file(file)
    }

    /// Checks a snapshot file and keeps its meta area.
    ///
    /// Refuses, each with its own [`Error`]: a wrong magic or version, a
    /// header or meta area whose SHA-256 does not match, a file that was
    /// never finished, a file shorter or longer than its header says,
    /// non-zero reserved bytes or flags, a meta area longer than
    /// [`MAX_SNAPSHOT_META_LEN`] (checked before it is read), a block table
    /// that breaks the block rules, a state longer than
    /// [`MAX_SNAPSHOT_STATE_LEN`], a block whose data is misaligned,
    /// overlaps the meta area or the previous block, or extends past the
    /// file, bits set past the last page of a bitmap, and bytes left over in
    /// the meta area. It never panics and allocates at most the meta area,
    /// which is capped and present in the file.
    pub fn from_file(file: File) -> Result<Self> {
        let actual_len = file
            .metadata()
            .map_err(io_err("reading the snapshot file's size"))?
            .len();
        // At most HEADER_LEN bytes.
        let head_len = actual_len.min(SNAPSHOT_HEADER_LEN) as usize;
        let mut head = vec![0u8; head_len];
        file.read_exact_at(&mut head, 0)
            .map_err(io_err("reading the snapshot header"))?;
        let header = Header::decode(&head, actual_len)?;

        // Capped by MAX_SNAPSHOT_META_LEN and inside the file (checked by
        // Header::decode).
        let meta_len = usize::try_from(header.meta_len).map_err(|_| Error::TooLong {
            what: "snapshot meta area",
            len: header.meta_len,
            max: usize::MAX as u64,
        })?;
        let mut meta = vec![0u8; meta_len];
        track_alloc(meta_len);
        file.read_exact_at(&mut meta, SNAPSHOT_HEADER_LEN)
            .map_err(io_err("reading the snapshot meta area"))?;
        let sha: [u8; 32] = Sha256::digest(&meta).into();
        if sha != header.meta_sha256 {
            return Err(Error::SnapshotChecksum { what: "meta area" });
        }
        let parsed = parse_meta(&meta, header.file_len)?;
        Ok(SnapshotReader {
            file,
            layout: parsed.layout,
            meta,
            state: parsed.state,
            bitmaps: parsed.bitmaps,
            present: parsed.present,
            created_unix_ns: header.created_unix_ns,
        })
    }

    /// The file's layout, as read.
    pub fn layout(&self) -> &SnapshotLayout {
        &self.layout
    }

    /// The blocks, in id order.
    pub fn blocks(&self) -> &[BlockInfo] {
        self.layout.blocks()
    }

    /// The blocks as a [`BlockTable`] (lookup by name, [`BlockResolver`]).
    pub fn table(&self) -> &BlockTable {
        self.layout.table()
    }

    /// The machine state blob, as the writer was given it.
    pub fn state(&self) -> &[u8] {
        &self.meta[self.state.clone()]
    }

    /// When the snapshot was started, in nanoseconds since the Unix epoch
    /// (informational; not checked).
    pub fn created_unix_ns(&self) -> u64 {
        self.created_unix_ns
    }

    /// Whether page `page` of `block` is stored in the file (`false`: the
    /// page is all zeros, and for an unknown block or page).
    pub fn is_present(&self, block: BlockId, page: u64) -> bool {
        let Some(i) = usize::try_from(block.0).ok() else {
            return false;
        };
        let (Some(g), Some(&start)) = (self.layout.geometry(block), self.bitmaps.get(i)) else {
            return false;
        };
        if page >= g.pages() {
            return false;
        }
        // Page i is bit i % 64 of big-endian word i / 64: that bit is in the
        // word's byte 7 - (i % 64) / 8, at position i % 8. In range: the
        // bitmap was checked to have ceil(pages / 64) words.
        let byte = start + (page / 64 * 8 + 7 - page % 64 / 8) as usize;
        self.meta
            .get(byte)
            .is_some_and(|b| b & (1 << (page % 8)) != 0)
    }

    /// Number of pages of `block` stored in the file (0 for an unknown
    /// block).
    pub fn present_pages(&self, block: BlockId) -> u64 {
        usize::try_from(block.0)
            .ok()
            .and_then(|i| self.present.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Reads pages `first_page..` of `block` into `buf`, a whole number of
    /// pages: pages stored in the file with `pread` (one per run of stored
    /// pages), the others filled with zeros. A range outside the block, or a
    /// `buf` that is not a non-zero multiple of the page size, is an error
    /// (never a panic); so is a file that shrank since it was opened.
    pub fn read_pages(&self, block: BlockId, first_page: u64, buf: &mut [u8]) -> Result<()> {
        let (at, g) = self
            .layout
            .page_range(block, first_page, buf.len() as u64)?;
        let page_size = g.page_size as usize;
        let count = buf.len() / page_size;
        let mut i = 0usize;
        while i < count {
            let present = self.is_present(block, first_page + i as u64);
            let mut j = i + 1;
            while j < count && self.is_present(block, first_page + j as u64) == present {
                j += 1;
            }
            let run = &mut buf[i * page_size..j * page_size];
            if present {
                self.file
                    .read_exact_at(run, at + (i * page_size) as u64)
                    .map_err(io_err("reading pages"))?;
            } else {
                run.fill(0);
            }
            i = j;
        }
        Ok(())
    }

    /// File offset of the first page of `block`, `None` for an unknown
    /// block.
    pub fn data_offset(&self, block: BlockId) -> Option<u64> {
        self.layout.data_offset(block)
    }

    /// Length of the file.
    pub fn file_len(&self) -> u64 {
        self.layout.file_len
    }
}

/// A meta area, decoded and checked.
struct ParsedMeta {
    layout: SnapshotLayout,
    state: Range<usize>,
    bitmaps: Vec<usize>,
    present: Vec<u64>,
}

fn parse_meta(meta: &[u8], file_len: u64) -> Result<ParsedMeta> {
    let mut c = MetaCursor { buf: meta, pos: 0 };
    let count = c.u32("the block count")?;
    check_cap(
        "snapshot block count",
        u64::from(count),
        u64::from(MAX_BLOCKS),
    )?;
    let state_len = c.u64("the state length")?;
    check_cap("snapshot machine state", state_len, MAX_SNAPSHOT_STATE_LEN)?;

    // At most MAX_BLOCKS entries, and no more than the bytes present could
    // hold.
    let cap = (count as usize).min(c.remaining() / BLOCK_ENTRY_FIXED as usize);
    let mut blocks = Vec::with_capacity(cap);
    let mut data_offsets = Vec::with_capacity(cap);
    track_alloc(cap * std::mem::size_of::<BlockInfo>());
    for _ in 0..count {
        let name_len = c.u16("a block name length")?;
        if name_len == 0 || usize::from(name_len) > MAX_BLOCK_NAME_LEN {
            return Err(Error::InvalidName {
                what: "RAM block",
                reason: if name_len == 0 { "empty" } else { "too long" },
            });
        }
        let name = c.take(u64::from(name_len), "a block name")?;
        let name = std::str::from_utf8(name).map_err(|_| Error::InvalidName {
            what: "RAM block",
            reason: "not UTF-8",
        })?;
        let size = c.u64("a block size")?;
        let page_size = c.u32("a block page size")?;
        let data_offset = c.u64("a block data offset")?;
        blocks.push(BlockInfo {
            name: name.to_owned(),
            size,
            page_size,
        });
        data_offsets.push(data_offset);
    }
    validate_blocks(&blocks)?;
    // Checks the bitmap cap, and that the lengths add up to what the header
    // says (they must, exactly: nothing may follow the bitmaps).
    let expected = meta_len_for(&blocks, state_len)?;

    let state_start = c.pos;
    c.take(state_len, "the machine state")?;
    let state = state_start..c.pos;

    let mut bitmaps = Vec::with_capacity(blocks.len());
    let mut present = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        let block = BlockId(i as u32);
        let pages = b.geometry().pages();
        bitmaps.push(c.pos);
        let words = c.take(bitmap_words(pages) * 8, "a present bitmap")?;
        let tail = pages % 64;
        if tail != 0 {
            let last = &words[words.len() - 8..];
            let last =
                u64::from_be_bytes(last.try_into().map_err(|_| Error::SnapshotMetaTruncated {
                    what: "a present bitmap",
                })?);
            if last >> tail != 0 {
                return Err(Error::SnapshotBitmapTail { block, pages });
            }
        }
        present.push(words.iter().map(|w| u64::from(w.count_ones())).sum());
    }
    if c.remaining() != 0 {
        return Err(Error::TrailingBytes {
            what: "snapshot meta area",
            extra: c.remaining() as u64,
        });
    }
    debug_assert_eq!(expected, meta.len() as u64);

    // Data offsets: aligned, in order, after the meta area, inside the file.
    let meta_end = SNAPSHOT_HEADER_LEN + meta.len() as u64;
    let mut previous = ("the meta area", meta_end);
    for (i, (b, &at)) in blocks.iter().zip(&data_offsets).enumerate() {
        let block = BlockId(i as u32);
        let align = block_align(b.page_size);
        if at % align != 0 {
            return Err(Error::SnapshotMisaligned {
                block,
                offset: at,
                align,
            });
        }
        if at < previous.1 {
            return Err(Error::SnapshotOverlap {
                block,
                offset: at,
                previous: previous.0,
                previous_end: previous.1,
            });
        }
        match at.checked_add(b.size) {
            Some(end) if end <= file_len => previous = ("the previous block", end),
            _ => {
                return Err(Error::SnapshotOutOfFile {
                    what: format!("data of RAM block {block} ({:?})", b.name),
                    offset: at,
                    len: b.size,
                    file_len,
                })
            }
        }
    }
    Ok(ParsedMeta {
        layout: SnapshotLayout {
            table: BlockTable::new(blocks)?,
            data_offsets,
            state_len,
            meta_len: meta.len() as u64,
            file_len,
        },
        state,
        bitmaps,
        present,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::take_max_alloc;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn writer_and_reader_are_send_and_sync() {
        assert_send_sync::<SnapshotWriter>();
        assert_send_sync::<SnapshotReader>();
    }

    #[test]
    fn layout_aligns_blocks_to_their_page_size() {
        let blocks = vec![
            BlockInfo {
                name: "a".into(),
                size: 3 * 4096,
                page_size: 4096,
            },
            BlockInfo {
                name: "huge".into(),
                size: 2 << 21,
                page_size: 2 << 20,
            },
            BlockInfo {
                name: "b".into(),
                size: 4096,
                page_size: 4096,
            },
        ];
        let l = SnapshotLayout::new(&blocks, 100).unwrap();
        // 12 + 3 entries (22 + 1, 22 + 4, 22 + 1) + 100 + 3 one-word bitmaps.
        assert_eq!(l.meta_len(), 12 + 23 + 26 + 23 + 100 + 24);
        assert_eq!(l.data_offset(BlockId(0)), Some(8192));
        assert_eq!(l.data_offset(BlockId(1)), Some(2 << 20));
        assert_eq!(l.data_offset(BlockId(2)), Some(6 << 20));
        assert_eq!(l.file_len(), (6 << 20) + 4096);
        assert_eq!(l.page_offset(BlockId(1), 1), Some(4 << 20));
        assert_eq!(l.page_offset(BlockId(1), 2), None);
        assert_eq!(l.data_offset(BlockId(3)), None);
    }

    #[test]
    fn set_bits_matches_a_bit_by_bit_model() {
        for (first, count) in [
            (0, 1),
            (0, 64),
            (3, 61),
            (3, 62),
            (63, 2),
            (10, 200),
            (64, 64),
        ] {
            let words: Vec<AtomicU64> = (0..5).map(|_| AtomicU64::new(0)).collect();
            set_bits(&words, first, count);
            for page in 0..320u64 {
                let set = words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64));
                assert_eq!(
                    set != 0,
                    (first..first + count).contains(&page),
                    "{first} {count} {page}"
                );
            }
        }
    }

    /// A header that passes every check except what the file holds after it.
    fn header_bytes(file_len: u64, meta_len: u64) -> Vec<u8> {
        Header {
            file_len,
            meta_len,
            complete: true,
            created_unix_ns: 0,
            meta_sha256: [0; 32],
        }
        .encode()
    }

    #[test]
    fn hostile_lengths_allocate_nothing_beyond_the_file() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("snapshot-unit-alloc-{}", std::process::id()));
        // Meta lengths up to the cap and beyond, with the file's own length
        // claiming to match, but the bytes not there (a sparse file of the
        // claimed length holds them as zeros: the checksum fails).
        for meta_len in [
            12,
            1 << 20,
            MAX_SNAPSHOT_META_LEN,
            MAX_SNAPSHOT_META_LEN + 1,
            u64::MAX - 8192,
        ] {
            let file_len = 4096 + 4096;
            std::fs::write(&path, header_bytes(file_len, meta_len)).unwrap();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(file_len).unwrap();
            take_max_alloc();
            let e = SnapshotReader::open(&path).unwrap_err();
            assert!(take_max_alloc() as u64 <= file_len, "{meta_len}: {e}");
        }
        std::fs::remove_file(&path).ok();
    }
}
