//! Where a background snapshot's pages go: [`SnapshotSink`], with a sink for
//! a migration stream and one for a snapshot file.

use std::io::Write;

use migration_stream::{BlockId, SnapshotWriter, StreamWriter};

use crate::block::RamBlock;
use crate::error::Result;

/// Takes the pages of a background snapshot, in any order, each page once.
pub trait SnapshotSink: Send {
    /// Pages `first..` of block `id` (`block`): `data` holds `zero.len()`
    /// whole pages, and `zero[i]` says whether page `first + i` is all
    /// zeros. Returns the bytes written.
    fn write_pages(
        &mut self,
        id: BlockId,
        block: &RamBlock,
        first: u64,
        data: &[u8],
        zero: &[bool],
    ) -> Result<u64>;

    /// Called once after the last page.
    fn flush(&mut self) -> Result<()>;
}

/// Pages as `Ram` records of a migration stream (any transport): a
/// destination loads them as it loads precopy pages. The caller writes the
/// preamble and `RamSetup` before, and the state and `Complete` after;
/// [`flush`](SnapshotSink::flush) writes `EndOfSection` and flushes.
#[derive(Debug)]
pub struct StreamSink<'a, W: Write> {
    w: &'a mut StreamWriter<W>,
}

impl<'a, W: Write> StreamSink<'a, W> {
    /// A sink writing to `w`.
    pub fn new(w: &'a mut StreamWriter<W>) -> Self {
        StreamSink { w }
    }
}

impl<W: Write + Send> SnapshotSink for StreamSink<'_, W> {
    fn write_pages(
        &mut self,
        id: BlockId,
        block: &RamBlock,
        first: u64,
        data: &[u8],
        zero: &[bool],
    ) -> Result<u64> {
        let before = self.w.bytes_written();
        let ps = block.page_size() as usize;
        for ((i, page), &z) in data.chunks_exact(ps).enumerate().zip(zero) {
            let offset = (first + i as u64) * ps as u64;
            if z {
                self.w.write_zero_page(id, offset)?;
            } else {
                self.w.write_page(id, offset, page)?;
            }
        }
        Ok(self.w.bytes_written() - before)
    }

    fn flush(&mut self) -> Result<()> {
        self.w.write_end_of_section()?;
        self.w.flush()?;
        Ok(())
    }
}

/// Pages into a snapshot file at their fixed offsets; zero pages are not
/// written at all (the file has a hole there). The caller
/// [finishes](SnapshotWriter::finish) the file after the save.
#[derive(Debug)]
pub struct FileSink<'a> {
    w: &'a SnapshotWriter,
}

impl<'a> FileSink<'a> {
    /// A sink writing into `w`.
    pub fn new(w: &'a SnapshotWriter) -> Self {
        FileSink { w }
    }
}

impl SnapshotSink for FileSink<'_> {
    fn write_pages(
        &mut self,
        id: BlockId,
        block: &RamBlock,
        first: u64,
        data: &[u8],
        zero: &[bool],
    ) -> Result<u64> {
        let ps = block.page_size() as usize;
        let mut bytes = 0;
        let mut i = 0;
        while i < zero.len() {
            if zero[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < zero.len() && !zero[i] {
                i += 1;
            }
            self.w
                .write_pages(id, first + start as u64, &data[start * ps..i * ps])?;
            bytes += ((i - start) * ps) as u64;
        }
        Ok(bytes)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
