//! RAM blocks: the named, page-granular view of guest memory that
//! migration works on.
//!
//! A [`RamBlock`] is a range of guest physical memory with a name (`pc.ram`,
//! `pc.ram.high`, ...), a page size, and three [`DirtyBitmap`]s: `dirty` and
//! `sent` on the source (pages still to send; pages sent at least once,
//! whose copy at the destination a postcopy switch must discard if they
//! are dirty again) and `received` on the destination (pages that
//! arrived). [`RamBlocks`] is the ordered list; a block's index in it is its
//! [`BlockId`] on the wire.
//!
//! On the destination, [`RamBlocks`] is also the [`BlockResolver`] handed to
//! [`migration_stream::StreamReader::read_record`]: it answers with the
//! destination's *own* geometry, so a page record is checked against the
//! memory it will be written to, whatever the source announced.

use migration_stream::block::validate_blocks;
use migration_stream::{BlockGeometry, BlockId, BlockInfo, BlockResolver};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::bitmap::{DirtyBitmap, TakenPages};
use crate::error::{Error, Result};
use crate::{GuestMemoryMmap, GuestRegionMmap};

/// Page size of the blocks [`RamBlocks::from_guest_memory`] builds: the
/// base page of x86-64 and of most aarch64 hosts.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;

/// One RAM block.
#[derive(Debug)]
pub struct RamBlock {
    name: String,
    guest_addr: GuestAddress,
    size: u64,
    page_size: u32,
    dirty: DirtyBitmap,
    sent: DirtyBitmap,
    received: DirtyBitmap,
}

impl RamBlock {
    /// A block of `size` bytes at `guest_addr`. Name, size and page size
    /// must follow the wire format's rules (a 1..=256 byte name, a power of
    /// two page size of 4 KiB to 1 GiB, a non-zero size that is a multiple
    /// of it). Every bitmap starts clear.
    pub fn new(
        name: impl Into<String>,
        guest_addr: GuestAddress,
        size: u64,
        page_size: u32,
    ) -> Result<Self> {
        let name = name.into();
        let info = BlockInfo {
            name,
            size,
            page_size,
        };
        if let Err(source) = info.validate() {
            return Err(Error::InvalidBlock {
                name: info.name,
                source,
            });
        }
        let pages = size / u64::from(page_size);
        Ok(RamBlock {
            name: info.name,
            guest_addr,
            size,
            page_size,
            dirty: DirtyBitmap::new(pages),
            sent: DirtyBitmap::new(pages),
            received: DirtyBitmap::new(pages),
        })
    }

    /// The block's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its guest physical address.
    pub fn guest_addr(&self) -> GuestAddress {
        self.guest_addr
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its page size: the unit of dirty tracking and of page records.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.dirty.pages()
    }

    /// Pages still to send (source).
    pub fn dirty(&self) -> &DirtyBitmap {
        &self.dirty
    }

    /// Pages sent at least once (source): taken by the saver to be written
    /// to a channel, whether or not the write then succeeded, so it holds
    /// every page the destination may have. A postcopy switch discards the pages
    /// both sent and dirty again; postcopy recovery will compare it with
    /// the destination's received bitmap.
    pub fn sent(&self) -> &DirtyBitmap {
        &self.sent
    }

    /// Pages that arrived (destination).
    pub fn received(&self) -> &DirtyBitmap {
        &self.received
    }

    /// Records the pages of `pages` as sent.
    pub(crate) fn mark_sent(&self, pages: &TakenPages) {
        // `restore` ORs exactly the taken bits in: here, into `sent`.
        self.sent.restore(pages);
    }

    /// The block as announced in a `RamSetup` record.
    pub fn info(&self) -> BlockInfo {
        BlockInfo {
            name: self.name.clone(),
            size: self.size,
            page_size: self.page_size,
        }
    }

    /// The block's geometry.
    pub fn geometry(&self) -> BlockGeometry {
        BlockGeometry {
            size: self.size,
            page_size: self.page_size,
        }
    }

    /// Guest physical address of page `page`.
    pub fn page_addr(&self, page: u64) -> GuestAddress {
        GuestAddress(self.guest_addr.0 + page * u64::from(self.page_size))
    }

    /// Host virtual address of the block's first byte in `mem`, if the
    /// block lies in one of its regions (for userfaultfd registration and
    /// `madvise`).
    pub fn host_addr(&self, mem: &GuestMemoryMmap) -> Option<u64> {
        self.region(mem)?;
        mem.get_host_address(self.guest_addr)
            .ok()
            .map(|p| p as usize as u64)
    }

    /// The region of `mem` that holds the whole block.
    pub fn region<'m>(&self, mem: &'m GuestMemoryMmap) -> Option<&'m GuestRegionMmap> {
        let region = mem.find_region(self.guest_addr)?;
        let offset = self.guest_addr.0 - region.start_addr().0;
        (offset.checked_add(self.size)? <= region.len()).then_some(region)
    }
}

/// The RAM blocks of a guest, in [`BlockId`] order.
#[derive(Debug)]
pub struct RamBlocks(Vec<RamBlock>);

impl RamBlocks {
    /// A list of blocks; names must be unique (at most 4096 blocks).
    pub fn new(blocks: Vec<RamBlock>) -> Result<Self> {
        let infos: Vec<BlockInfo> = blocks.iter().map(RamBlock::info).collect();
        validate_blocks(&infos).map_err(|source| Error::InvalidBlockList { source })?;
        Ok(RamBlocks(blocks))
    }

    /// One block per region of `mem`, in region (address) order, named by
    /// `names`, with [`DEFAULT_PAGE_SIZE`] pages. Fails if `names` does not
    /// have one name per region, or a region's size is not a multiple of
    /// the page size.
    pub fn from_guest_memory(mem: &GuestMemoryMmap, names: &[&str]) -> Result<Self> {
        if names.len() != mem.num_regions() {
            return Err(Error::NameCount {
                regions: mem.num_regions(),
                names: names.len(),
            });
        }
        let blocks = mem
            .iter()
            .zip(names)
            .map(|(r, name)| RamBlock::new(*name, r.start_addr(), r.len(), DEFAULT_PAGE_SIZE))
            .collect::<Result<Vec<_>>>()?;
        Self::new(blocks)
    }

    /// The blocks as announced in a `RamSetup` record.
    pub fn infos(&self) -> Vec<BlockInfo> {
        self.0.iter().map(RamBlock::info).collect()
    }

    /// Checks the blocks a source announced against these (the
    /// destination's): same count, and per index the same name, size and
    /// page size. The error names the first mismatch.
    pub fn check_against(&self, announced: &[BlockInfo]) -> Result<()> {
        if announced.len() != self.0.len() {
            return Err(Error::BlockCountMismatch {
                announced: announced.len(),
                local: self.0.len(),
            });
        }
        for (index, (a, l)) in announced.iter().zip(&self.0).enumerate() {
            if a.name != l.name {
                return Err(Error::BlockNameMismatch {
                    index,
                    announced: a.name.clone(),
                    local: l.name.clone(),
                });
            }
            if a.size != l.size {
                return Err(Error::BlockSizeMismatch {
                    name: l.name.clone(),
                    announced: a.size,
                    local: l.size,
                });
            }
            if a.page_size != l.page_size {
                return Err(Error::PageSizeMismatch {
                    name: l.name.clone(),
                    announced: a.page_size,
                    local: l.page_size,
                });
            }
        }
        Ok(())
    }

    /// Checks that each block lies inside one region of `mem`.
    pub fn check_memory(&self, mem: &GuestMemoryMmap) -> Result<()> {
        match self.0.iter().find(|b| b.region(mem).is_none()) {
            Some(b) => Err(Error::NotInMemory {
                name: b.name.clone(),
                guest_addr: b.guest_addr.0,
                size: b.size,
            }),
            None => Ok(()),
        }
    }

    /// The block with id `id`.
    pub fn get(&self, id: BlockId) -> Option<&RamBlock> {
        self.0.get(usize::try_from(id.0).ok()?)
    }

    /// The block named `name` and its id.
    pub fn by_name(&self, name: &str) -> Option<(BlockId, &RamBlock)> {
        let index = self.0.iter().position(|b| b.name == name)?;
        Some((BlockId(u32::try_from(index).ok()?), &self.0[index]))
    }

    /// The blocks, in id order.
    pub fn iter(&self) -> std::slice::Iter<'_, RamBlock> {
        self.0.iter()
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sum of the block sizes.
    pub fn total_bytes(&self) -> u64 {
        self.0.iter().map(RamBlock::size).sum()
    }

    /// Sum of the blocks' dirty pages.
    pub fn dirty_pages(&self) -> u64 {
        self.0.iter().map(|b| b.dirty.count()).sum()
    }

    /// Bytes of the blocks' dirty pages.
    pub fn dirty_bytes(&self) -> u64 {
        self.0
            .iter()
            .map(|b| b.dirty.count() * u64::from(b.page_size))
            .sum()
    }

    /// Sum of the blocks' pages sent at least once.
    pub fn sent_pages(&self) -> u64 {
        self.0.iter().map(|b| b.sent.count()).sum()
    }

    /// Sum of the blocks' received pages.
    pub fn received_pages(&self) -> u64 {
        self.0.iter().map(|b| b.received.count()).sum()
    }

    /// Largest page size of any block (0 if there is none).
    pub fn max_page_size(&self) -> u32 {
        self.0.iter().map(RamBlock::page_size).max().unwrap_or(0)
    }
}

impl<'a> IntoIterator for &'a RamBlocks {
    type Item = &'a RamBlock;
    type IntoIter = std::slice::Iter<'a, RamBlock>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl BlockResolver for RamBlocks {
    fn geometry(&self, block: BlockId) -> Option<BlockGeometry> {
        self.get(block).map(RamBlock::geometry)
    }
}

/// One block's host range, for [`HostMap`].
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    index: usize,
    page_size: u64,
}

/// Where each block of a [`RamBlocks`] lies in this process: its host start
/// address, and the reverse lookup of a faulting host address to its block
/// and page (userfaultfd reports host addresses).
#[derive(Debug, Clone)]
pub(crate) struct HostMap {
    /// Host start of each block, by index.
    host: Vec<u64>,
    /// The blocks' host ranges, by start.
    spans: Vec<Span>,
}

impl HostMap {
    /// The host ranges of `blocks`, each of which must lie in one region of
    /// `mem`.
    pub(crate) fn new(mem: &GuestMemoryMmap, blocks: &RamBlocks) -> Result<Self> {
        blocks.check_memory(mem)?;
        let mut host = Vec::with_capacity(blocks.len());
        for b in blocks.iter() {
            let addr = b.host_addr(mem).ok_or_else(|| Error::NotInMemory {
                name: b.name().to_owned(),
                guest_addr: b.guest_addr().0,
                size: b.size(),
            })?;
            host.push(addr);
        }
        let mut spans: Vec<Span> = blocks
            .iter()
            .zip(&host)
            .enumerate()
            .map(|(index, (b, &start))| Span {
                start,
                end: start + b.size(),
                index,
                page_size: u64::from(b.page_size()),
            })
            .collect();
        spans.sort_unstable_by_key(|s| s.start);
        Ok(HostMap { host, spans })
    }

    /// Host start of block `index`.
    pub(crate) fn host(&self, index: usize) -> u64 {
        self.host[index]
    }

    /// Host starts of the blocks, by index.
    pub(crate) fn starts(&self) -> &[u64] {
        &self.host
    }

    /// The block index, page and page host address of host address `addr`.
    pub(crate) fn locate(&self, addr: u64) -> Option<(usize, u64, u64)> {
        let i = self
            .spans
            .partition_point(|s| s.start <= addr)
            .checked_sub(1)?;
        let s = self.spans[i];
        if addr >= s.end {
            return None;
        }
        let page = (addr - s.start) / s.page_size;
        Some((s.index, page, s.start + page * s.page_size))
    }
}

#[cfg(test)]
mod tests {
    use migration_stream::Error as StreamError;

    use super::*;

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 640 << 10),
            (GuestAddress(1 << 20), 3 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn blocks_follow_regions() {
        let mem = two_regions();
        let blocks = RamBlocks::from_guest_memory(&mem, &["pc.ram", "pc.ram.high"]).unwrap();
        assert_eq!(blocks.len(), 2);
        let low = blocks.get(BlockId(0)).unwrap();
        let high = blocks.get(BlockId(1)).unwrap();
        assert_eq!(low.name(), "pc.ram");
        assert_eq!(low.pages(), 160);
        assert_eq!(high.guest_addr(), GuestAddress(1 << 20));
        assert_eq!(high.size(), 3 << 20);
        assert_eq!(blocks.total_bytes(), (640 << 10) + (3 << 20));
        assert!(blocks.get(BlockId(2)).is_none());
        assert_eq!(blocks.by_name("pc.ram.high").unwrap().0, BlockId(1));
        blocks.check_memory(&mem).unwrap();
        let host = high.host_addr(&mem).unwrap();
        assert_eq!(
            host,
            mem.get_host_address(GuestAddress(1 << 20)).unwrap() as usize as u64
        );
        assert_eq!(
            blocks.infos(),
            vec![
                BlockInfo {
                    name: "pc.ram".into(),
                    size: 640 << 10,
                    page_size: 4096
                },
                BlockInfo {
                    name: "pc.ram.high".into(),
                    size: 3 << 20,
                    page_size: 4096
                }
            ]
        );
        high.dirty().set_range(0, 10);
        assert_eq!(blocks.dirty_pages(), 10);
        assert_eq!(blocks.dirty_bytes(), 10 * 4096);
    }

    #[test]
    fn bad_block_lists() {
        let mem = two_regions();
        assert!(matches!(
            RamBlocks::from_guest_memory(&mem, &["a"]),
            Err(Error::NameCount {
                regions: 2,
                names: 1
            })
        ));
        assert!(matches!(
            RamBlocks::from_guest_memory(&mem, &["a", "a"]),
            Err(Error::InvalidBlockList {
                source: StreamError::DuplicateBlockName { .. }
            })
        ));
        assert!(matches!(
            RamBlocks::from_guest_memory(&mem, &["a", ""]),
            Err(Error::InvalidBlock { .. })
        ));
        assert!(matches!(
            RamBlock::new("x", GuestAddress(0), 6000, 4096),
            Err(Error::InvalidBlock {
                source: StreamError::InvalidBlockSize { .. },
                ..
            })
        ));
        // A block that straddles the hole is not in memory.
        let straddle = RamBlocks::new(vec![RamBlock::new(
            "x",
            GuestAddress(512 << 10),
            1 << 20,
            4096,
        )
        .unwrap()])
        .unwrap();
        let err = straddle.check_memory(&mem).unwrap_err();
        assert!(err.to_string().contains("0x80000"), "{err}");
        assert!(straddle.get(BlockId(0)).unwrap().host_addr(&mem).is_none());
    }

    #[test]
    fn check_against_names_the_mismatch() {
        let mem = two_regions();
        let blocks = RamBlocks::from_guest_memory(&mem, &["pc.ram", "high"]).unwrap();
        let good = blocks.infos();
        blocks.check_against(&good).unwrap();

        let err = blocks.check_against(&good[..1]).unwrap_err();
        assert!(matches!(
            err,
            Error::BlockCountMismatch {
                announced: 1,
                local: 2
            }
        ));

        let mut bad = good.clone();
        bad[1].name = "other".into();
        let err = blocks.check_against(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "RAM block #1 is named \"other\" by the source, \"high\" here"
        );

        let mut bad = good.clone();
        bad[0].size = 1 << 20;
        let err = blocks.check_against(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "RAM block \"pc.ram\" has size 0x100000 on the source, 0xa0000 here"
        );

        let mut bad = good;
        bad[1].page_size = 2 << 20;
        let err = blocks.check_against(&bad).unwrap_err();
        assert!(matches!(
            err,
            Error::PageSizeMismatch {
                announced: 0x200000,
                local: 4096,
                ..
            }
        ));
    }

    #[test]
    fn resolver_answers_with_local_geometry() {
        let mem = two_regions();
        let blocks = RamBlocks::from_guest_memory(&mem, &["a", "b"]).unwrap();
        assert_eq!(
            blocks.geometry(BlockId(0)),
            Some(BlockGeometry {
                size: 640 << 10,
                page_size: 4096
            })
        );
        blocks.check_range(BlockId(0), 159 * 4096, 4096).unwrap();
        assert!(blocks.check_range(BlockId(0), 160 * 4096, 4096).is_err());
        assert!(blocks.check_range(BlockId(2), 0, 4096).is_err());
    }
}
