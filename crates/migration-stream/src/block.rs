//! RAM blocks as the wire format sees them, and the block table a decoder
//! checks offsets against.
//!
//! The source announces its blocks once in a `RamSetup` record (name, size,
//! page size). Blocks are then referred to by [`BlockId`], their index in
//! that record. The destination checks the announced blocks against its own
//! memory, and hands the decoders a [`BlockResolver`] (usually a
//! [`BlockTable`]) so that every offset in a page record, discard range or
//! page request is checked (page aligned, inside the block) before any byte
//! reaches guest memory.

use std::collections::HashSet;
use std::fmt;

use crate::error::{Error, Result};
use crate::limits::{MAX_BLOCKS, MAX_BLOCK_NAME_LEN, MAX_BLOCK_SIZE, MAX_PAGE_SIZE, MIN_PAGE_SIZE};
use crate::wire::check_name;

/// A RAM block's index in the `RamSetup` record that announced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a decoder needs to know of a block to check offsets into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGeometry {
    /// Size of the block in bytes, a multiple of `page_size`.
    pub size: u64,
    /// Page size of the block: the payload size of its page records.
    pub page_size: u32,
}

impl BlockGeometry {
    /// Number of pages in the block.
    pub fn pages(&self) -> u64 {
        self.size / u64::from(self.page_size)
    }
}

/// A RAM block as announced in a `RamSetup` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Unique name, 1 to [`MAX_BLOCK_NAME_LEN`] bytes of UTF-8.
    pub name: String,
    /// Size in bytes: non-zero, a multiple of `page_size`, at most
    /// [`MAX_BLOCK_SIZE`].
    pub size: u64,
    /// A power of two between [`MIN_PAGE_SIZE`] and [`MAX_PAGE_SIZE`].
    pub page_size: u32,
}

impl BlockInfo {
    /// The block's geometry.
    pub fn geometry(&self) -> BlockGeometry {
        BlockGeometry {
            size: self.size,
            page_size: self.page_size,
        }
    }

    /// Checks name, page size and size against the format's rules.
    pub fn validate(&self) -> Result<()> {
        check_name(&self.name, MAX_BLOCK_NAME_LEN, "RAM block")?;
        check_page_size(u64::from(self.page_size))?;
        if self.size == 0
            || self.size > MAX_BLOCK_SIZE
            || self.size % u64::from(self.page_size) != 0
        {
            return Err(Error::InvalidBlockSize {
                name: self.name.clone(),
                size: self.size,
                page_size: self.page_size,
            });
        }
        Ok(())
    }
}

/// Checks that `page_size` is a power of two in `[MIN_PAGE_SIZE,
/// MAX_PAGE_SIZE]`.
pub fn check_page_size(page_size: u64) -> Result<()> {
    if page_size.is_power_of_two()
        && page_size >= u64::from(MIN_PAGE_SIZE)
        && page_size <= u64::from(MAX_PAGE_SIZE)
    {
        Ok(())
    } else {
        Err(Error::InvalidPageSize { page_size })
    }
}

/// Checks a whole block list: count, each block, unique names.
pub fn validate_blocks(blocks: &[BlockInfo]) -> Result<()> {
    let count = blocks.len() as u64;
    if count > u64::from(MAX_BLOCKS) {
        return Err(Error::TooLong {
            what: "RAM setup block count",
            len: count,
            max: u64::from(MAX_BLOCKS),
        });
    }
    let mut names = HashSet::with_capacity(blocks.len());
    for b in blocks {
        b.validate()?;
        if !names.insert(b.name.as_str()) {
            return Err(Error::DuplicateBlockName {
                name: b.name.clone(),
            });
        }
    }
    Ok(())
}

/// Resolves a block id to its geometry for the decoders.
///
/// Implemented by [`BlockTable`], by `Vec` and slices of [`BlockInfo`], by `()` (no
/// blocks: every block reference is refused) and by closures
/// `Fn(BlockId) -> Option<BlockGeometry>`, so a loader can answer from its
/// own RAM block list without copying it.
pub trait BlockResolver {
    /// The geometry of `block`, or `None` if the block is unknown.
    fn geometry(&self, block: BlockId) -> Option<BlockGeometry>;

    /// Checks that `len` bytes at `offset` lie inside `block`, page aligned
    /// at both ends, and returns the block's geometry.
    fn check_range(&self, block: BlockId, offset: u64, len: u64) -> Result<BlockGeometry> {
        let g = self.geometry(block).ok_or(Error::UnknownBlock { block })?;
        let page = u64::from(g.page_size);
        // A resolver is caller code: guard against a bogus page size rather
        // than divide by zero.
        if page == 0 || !page.is_power_of_two() {
            return Err(Error::InvalidPageSize { page_size: page });
        }
        if offset % page != 0 {
            return Err(Error::Misaligned {
                block,
                offset,
                page_size: g.page_size,
            });
        }
        if len == 0 || len % page != 0 {
            return Err(Error::BadRangeLength {
                block,
                len,
                page_size: g.page_size,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= g.size => Ok(g),
            _ => Err(Error::OutOfRange {
                block,
                offset,
                len,
                block_size: g.size,
            }),
        }
    }
}

impl BlockResolver for () {
    fn geometry(&self, _block: BlockId) -> Option<BlockGeometry> {
        None
    }
}

impl BlockResolver for &[BlockInfo] {
    fn geometry(&self, block: BlockId) -> Option<BlockGeometry> {
        self.get(usize::try_from(block.0).ok()?)
            .map(BlockInfo::geometry)
    }
}

impl BlockResolver for Vec<BlockInfo> {
    fn geometry(&self, block: BlockId) -> Option<BlockGeometry> {
        self.as_slice().geometry(block)
    }
}

impl<F: Fn(BlockId) -> Option<BlockGeometry>> BlockResolver for F {
    fn geometry(&self, block: BlockId) -> Option<BlockGeometry> {
        self(block)
    }
}

/// A validated list of blocks, indexed by [`BlockId`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockInfo>,
}

impl BlockTable {
    /// Builds a table, checking every block and that names are unique.
    pub fn new(blocks: Vec<BlockInfo>) -> Result<Self> {
        validate_blocks(&blocks)?;
        Ok(BlockTable { blocks })
    }

    /// The blocks, in id order.
    pub fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }

    /// The block with id `block`.
    pub fn get(&self, block: BlockId) -> Option<&BlockInfo> {
        self.blocks.get(usize::try_from(block.0).ok()?)
    }

    /// The id of the block named `name`.
    pub fn id_of(&self, name: &str) -> Option<BlockId> {
        self.blocks
            .iter()
            .position(|b| b.name == name)
            .and_then(|i| u32::try_from(i).ok())
            .map(BlockId)
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the table has no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

impl BlockResolver for BlockTable {
    fn geometry(&self, block: BlockId) -> Option<BlockGeometry> {
        self.get(block).map(BlockInfo::geometry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, size: u64, page_size: u32) -> BlockInfo {
        BlockInfo {
            name: name.into(),
            size,
            page_size,
        }
    }

    #[test]
    fn page_sizes() {
        for ok in [4096u64, 8192, 2 << 20, 1 << 30] {
            check_page_size(ok).unwrap();
        }
        for bad in [0u64, 1, 2048, 4097, 3 << 12, 2 << 30] {
            assert!(check_page_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_validation() {
        BlockTable::new(vec![info("pc.ram", 1 << 20, 4096), info("rom", 8192, 4096)]).unwrap();
        assert!(matches!(
            BlockTable::new(vec![info("a", 4096, 4096), info("a", 4096, 4096)]),
            Err(Error::DuplicateBlockName { .. })
        ));
        assert!(matches!(
            BlockTable::new(vec![info("", 4096, 4096)]),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            BlockTable::new(vec![info(&"x".repeat(257), 4096, 4096)]),
            Err(Error::InvalidName { .. })
        ));
        BlockTable::new(vec![info(&"x".repeat(256), 4096, 4096)]).unwrap();
        assert!(matches!(
            BlockTable::new(vec![info("a", 6000, 4096)]),
            Err(Error::InvalidBlockSize { .. })
        ));
        assert!(matches!(
            BlockTable::new(vec![info("a", 0, 4096)]),
            Err(Error::InvalidBlockSize { .. })
        ));
    }

    #[test]
    fn range_checks() {
        let t = BlockTable::new(vec![info("a", 4 * 4096, 4096)]).unwrap();
        let a = BlockId(0);
        t.check_range(a, 0, 4096).unwrap();
        t.check_range(a, 3 * 4096, 4096).unwrap();
        t.check_range(a, 0, 4 * 4096).unwrap();
        assert!(matches!(
            t.check_range(a, 4 * 4096, 4096),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            t.check_range(a, u64::MAX - 4095, 4096),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            t.check_range(a, 1, 4096),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            t.check_range(a, 0, 0),
            Err(Error::BadRangeLength { .. })
        ));
        assert!(matches!(
            t.check_range(BlockId(1), 0, 4096),
            Err(Error::UnknownBlock { .. })
        ));
        assert_eq!(t.id_of("a"), Some(a));
        assert_eq!(t.id_of("b"), None);
        // Closures resolve too.
        let f = |b: BlockId| {
            (b.0 == 9).then_some(BlockGeometry {
                size: 8192,
                page_size: 4096,
            })
        };
        f.check_range(BlockId(9), 4096, 4096).unwrap();
        assert!(().check_range(BlockId(0), 0, 4096).is_err());
    }
}
