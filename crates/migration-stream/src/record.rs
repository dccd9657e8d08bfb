//! Frames of the main and preempt channels, and their writer and reader.
//!
//! After its preamble (see [`crate::header`]) a main or preempt channel is a
//! sequence of frames, each starting with a [`FrameTag`] byte:
//!
//! | tag | frame      | rest of the frame                                              |
//! |----:|------------|----------------------------------------------------------------|
//! | 0   | Invalid    | reserved: never sent, always rejected                          |
//! | 1   | RamSetup   | `count: u32` (<= 4096), `count x block`                        |
//! | 2   | Ram        | `flags: u8` ([`RamFlags`]), then by flags (below)              |
//! | 3   | Sync       | `iteration: u64`                                               |
//! | 4   | Command    | a command, see [`crate::command`]                              |
//! | 5   | Complete   | nothing: the stream ends here                                  |
//!
//! A `RamSetup` block is `name_len: u16, name: [u8; name_len] (UTF-8,
//! 1..=256), size: u64, page_size: u32`. Block ids are indices into this list.
//!
//! A `Ram` frame is one of:
//!
//! | flags                  | then                                             |
//! |------------------------|--------------------------------------------------|
//! | `PAGE`                 | `block: u32, offset: u64, data[page_size]`        |
//! | `PAGE \| CONTINUE`     | `offset: u64, data[page_size]`                    |
//! | `ZERO`                 | `block: u32, offset: u64`                         |
//! | `ZERO \| CONTINUE`     | `offset: u64`                                     |
//! | `END_OF_SECTION`       | nothing                                          |
//!
//! `CONTINUE` means "the block of the previous `Ram` frame on this channel".
//! The writer picks it by itself. All integers are big-endian.
//!
//! # Main channel grammar
//!
//! ```text
//!  preamble(Main)
//!    RamSetup
//!    [Command(Advise)]
//!    ( Ram* EndOfSection | Sync | Command(Ping) )*          precopy iterations
//!    ( precopy end:
//!        Ram* EndOfSection Command(DeviceState)* Complete
//!    | postcopy switch:
//!        Command(Discard)* Command(Packaged[DeviceState* Listen Run])
//!        ( Ram | EndOfSection )*   requested and background pages
//!        Complete )
//! ```
//!
//! A preempt channel carries only `Ram` and `EndOfSection` frames after its
//! preamble, and ends when the main channel's `Complete` has been read.
//!
//! # Checking before writing
//!
//! [`StreamReader::read_record`] takes a [`BlockResolver`]. A `Ram` frame's
//! block and offset are checked against it (known block, page aligned, whole
//! page inside the block) before the record is returned, so the caller learns
//! the page is acceptable before a single payload byte is read. The payload
//! is then read straight into the caller's buffer with
//! [`StreamReader::read_page_into`], or through the [`PagePayload`] reader.

use std::io::{self, BufReader, BufWriter, Read, Write};

use bitflags::bitflags;

use crate::block::{check_page_size, validate_blocks, BlockId, BlockInfo, BlockResolver};
use crate::command::{decode_command, Command};
use crate::error::{Error, Result, TagKind};
use crate::header::{write_preamble, Hello};
use crate::limits::{
    DEFAULT_STREAM_READ_BUFFER, DEFAULT_STREAM_WRITE_BUFFER, MAX_BLOCKS, MAX_BLOCK_NAME_LEN,
};
use crate::wire::{
    check_cap, push_tracked, read_err, read_name, read_tag, read_u16, read_u32, read_u64, read_u8,
    write_err, Counted, CountedWriter,
};

/// The tag byte of a frame on the main or preempt channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameTag {
    /// Reserved: never sent, always rejected.
    Invalid = 0,
    /// The block list.
    RamSetup = 1,
    /// A page, a zero page or an end of section.
    Ram = 2,
    /// End of one pass over the dirty bitmap.
    Sync = 3,
    /// A [`Command`].
    Command = 4,
    /// End of the stream.
    Complete = 5,
}

impl FrameTag {
    /// Decodes a tag byte; `Invalid` and unknown values fail.
    pub fn from_u8(value: u8) -> Result<Self> {
        Ok(match value {
            1 => FrameTag::RamSetup,
            2 => FrameTag::Ram,
            3 => FrameTag::Sync,
            4 => FrameTag::Command,
            5 => FrameTag::Complete,
            value => {
                return Err(Error::UnknownTag {
                    kind: TagKind::Frame,
                    value,
                })
            }
        })
    }
}

bitflags! {
    /// Flags of a `Ram` frame.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RamFlags: u8 {
        /// A page with `page_size` bytes of data.
        const PAGE = 1 << 0;
        /// A page of zeros: no data.
        const ZERO = 1 << 1;
        /// Same block as the previous `Ram` frame: no block id.
        const CONTINUE = 1 << 2;
        /// End of a batch of RAM frames: nothing else.
        const END_OF_SECTION = 1 << 3;
    }
}

/// The header of a page or zero-page record, checked against the block
/// table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    /// The block.
    pub block: BlockId,
    /// Offset in the block, aligned to `page_size`.
    pub offset: u64,
    /// The block's page size, i.e. the payload length of a page record.
    pub page_size: u32,
}

/// One frame of the main or preempt channel, as decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The source's RAM blocks, validated (caps, unique names); ids are
    /// indices. The destination checks them against its own memory.
    RamSetup(Vec<BlockInfo>),
    /// A page whose `page_size` bytes of payload follow: the caller must
    /// consume them with [`StreamReader::read_page_into`],
    /// [`StreamReader::payload`] or [`StreamReader::skip_page`] before
    /// reading the next record.
    Page(PageHeader),
    /// A page of zeros.
    ZeroPage(PageHeader),
    /// End of a batch of RAM records.
    EndOfSection,
    /// End of pass `iteration` over the dirty bitmap.
    Sync {
        /// The pass number, from 1.
        iteration: u64,
    },
    /// A command.
    Command(Command),
    /// End of the stream: nothing follows.
    Complete,
}

/// Writes frames to a main or preempt channel, through a write buffer.
///
/// Nothing reaches the channel until the buffer fills or [`flush`] is
/// called: flush after each command the peer must act on promptly, and after
/// each urgent page on a postcopy channel.
///
/// [`flush`]: StreamWriter::flush
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    inner: CountedWriter<BufWriter<W>>,
    current_block: Option<BlockId>,
}

impl<W: Write> StreamWriter<W> {
    /// A writer with a [`DEFAULT_STREAM_WRITE_BUFFER`] (1 MiB) buffer.
    pub fn new(inner: W) -> Self {
        Self::with_capacity(DEFAULT_STREAM_WRITE_BUFFER, inner)
    }

    /// A writer with a buffer of `capacity` bytes.
    pub fn with_capacity(capacity: usize, inner: W) -> Self {
        StreamWriter {
            inner: CountedWriter {
                inner: BufWriter::with_capacity(capacity, inner),
                count: 0,
            },
            current_block: None,
        }
    }

    /// Writes the stream header and `hello`; the first call on a channel.
    pub fn write_preamble(&mut self, hello: &Hello) -> Result<()> {
        write_preamble(&mut self.inner, hello)
    }

    /// Writes a `RamSetup` frame announcing `blocks` (ids are indices).
    pub fn write_ram_setup(&mut self, blocks: &[BlockInfo]) -> Result<()> {
        validate_blocks(blocks)?;
        let e = write_err("writing a RAM setup record");
        // Count checked against MAX_BLOCKS by validate_blocks.
        let count = blocks.len() as u32;
        let mut head = [0u8; 5];
        head[0] = FrameTag::RamSetup as u8;
        head[1..].copy_from_slice(&count.to_be_bytes());
        self.inner.write_all(&head).map_err(&e)?;
        for b in blocks {
            // Name length checked against MAX_BLOCK_NAME_LEN by validate_blocks.
            let name_len = b.name.len() as u16;
            self.inner.write_all(&name_len.to_be_bytes()).map_err(&e)?;
            self.inner.write_all(b.name.as_bytes()).map_err(&e)?;
            let mut tail = [0u8; 12];
            tail[..8].copy_from_slice(&b.size.to_be_bytes());
            tail[8..].copy_from_slice(&b.page_size.to_be_bytes());
            self.inner.write_all(&tail).map_err(&e)?;
        }
        Ok(())
    }

    fn write_ram_head(&mut self, flags: RamFlags, block: BlockId, offset: u64) -> Result<()> {
        let mut head = [0u8; 14];
        head[0] = FrameTag::Ram as u8;
        let len = if self.current_block == Some(block) {
            head[1] = (flags | RamFlags::CONTINUE).bits();
            head[2..10].copy_from_slice(&offset.to_be_bytes());
            10
        } else {
            head[1] = flags.bits();
            head[2..6].copy_from_slice(&block.0.to_be_bytes());
            head[6..14].copy_from_slice(&offset.to_be_bytes());
            14
        };
        self.inner
            .write_all(&head[..len])
            .map_err(write_err("writing a RAM record"))?;
        self.current_block = Some(block);
        Ok(())
    }

    /// Writes a page record: `data` is the whole page, its length the
    /// block's page size. Allocation-free.
    pub fn write_page(&mut self, block: BlockId, offset: u64, data: &[u8]) -> Result<()> {
        check_page_size(data.len() as u64)?;
        self.write_ram_head(RamFlags::PAGE, block, offset)?;
        self.inner
            .write_all(data)
            .map_err(write_err("writing a page payload"))
    }

    /// Writes a zero-page record (flags only, no payload).
    pub fn write_zero_page(&mut self, block: BlockId, offset: u64) -> Result<()> {
        self.write_ram_head(RamFlags::ZERO, block, offset)
    }

    /// Writes an end-of-section record.
    pub fn write_end_of_section(&mut self) -> Result<()> {
        self.inner
            .write_all(&[FrameTag::Ram as u8, RamFlags::END_OF_SECTION.bits()])
            .map_err(write_err("writing an end of section"))
    }

    /// Writes a sync marker closing dirty-bitmap pass `iteration`.
    pub fn write_sync(&mut self, iteration: u64) -> Result<()> {
        let mut b = [0u8; 9];
        b[0] = FrameTag::Sync as u8;
        b[1..].copy_from_slice(&iteration.to_be_bytes());
        self.inner
            .write_all(&b)
            .map_err(write_err("writing a sync marker"))
    }

    /// Writes a command. Fails without writing if it breaks a cap.
    pub fn write_command(&mut self, command: &Command) -> Result<()> {
        // Check the caps first so a refused command leaves no frame tag
        // behind in the buffer.
        command.body_len()?;
        self.inner
            .write_all(&[FrameTag::Command as u8])
            .map_err(write_err("writing a command"))?;
        command.encode(&mut self.inner)
    }

    /// Writes the end-of-stream marker. Flush afterwards.
    pub fn write_complete(&mut self) -> Result<()> {
        self.inner
            .write_all(&[FrameTag::Complete as u8])
            .map_err(write_err("writing the complete marker"))
    }

    /// Pushes buffered bytes to the channel.
    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush().map_err(write_err("flushing the stream"))
    }

    /// Bytes accepted so far (preamble and frames, buffered or not).
    pub fn bytes_written(&self) -> u64 {
        self.inner.count
    }

    /// The channel.
    pub fn get_ref(&self) -> &W {
        self.inner.inner.get_ref()
    }

    /// Flushes and returns the channel (for example the `Vec<u8>` of a
    /// `Packaged` command).
    pub fn into_inner(self) -> Result<W> {
        self.inner.inner.into_inner().map_err(|e| Error::Io {
            context: "flushing the stream",
            source: e.into_error(),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    block: BlockId,
    offset: u64,
    remaining: u64,
}

/// Reads frames from a main or preempt channel, through a read buffer.
///
/// Every length is checked against [`crate::limits`] and every block
/// reference against the caller's [`BlockResolver`] before anything is
/// allocated or written.
///
/// After an error other than [`Error::PayloadPending`],
/// [`Error::NoPayloadPending`] or [`Error::BufferSize`] (caller mistakes,
/// which consume nothing) the position in the stream is undefined: drop the
/// reader and fail or recover the channel.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    inner: Counted<BufReader<R>>,
    current_block: Option<BlockId>,
    pending: Option<Pending>,
    in_package: bool,
}

impl<R: Read> StreamReader<R> {
    /// A reader with a [`DEFAULT_STREAM_READ_BUFFER`] buffer. It expects
    /// frames: read the preamble first with [`crate::read_preamble`].
    pub fn new(inner: R) -> Self {
        Self::with_capacity(DEFAULT_STREAM_READ_BUFFER, inner)
    }

    /// A reader with a buffer of `capacity` bytes.
    pub fn with_capacity(capacity: usize, inner: R) -> Self {
        StreamReader {
            inner: Counted {
                inner: BufReader::with_capacity(capacity, inner),
                count: 0,
            },
            current_block: None,
            pending: None,
            in_package: false,
        }
    }

    /// Reads the next frame, checking block references against `blocks`.
    ///
    /// Returns [`Error::Closed`] if the channel ends cleanly before a frame
    /// (normal only after [`Record::Complete`]), and
    /// [`Error::PayloadPending`] if the previous page's payload is unread.
    pub fn read_record(&mut self, blocks: &dyn BlockResolver) -> Result<Record> {
        if let Some(p) = self.pending {
            return Err(Error::PayloadPending {
                block: p.block,
                offset: p.offset,
                remaining: p.remaining,
            });
        }
        let r = &mut self.inner;
        let Some(tag) = read_tag(r, "frame tag")? else {
            return Err(Error::Closed);
        };
        match FrameTag::from_u8(tag)? {
            FrameTag::Invalid => Err(Error::UnknownTag {
                kind: TagKind::Frame,
                value: 0,
            }),
            FrameTag::RamSetup => read_ram_setup(r).map(Record::RamSetup),
            FrameTag::Ram => self.read_ram(blocks),
            FrameTag::Sync => Ok(Record::Sync {
                iteration: read_u64(r, "sync iteration")?,
            }),
            FrameTag::Command => decode_command(r, blocks, self.in_package).map(Record::Command),
            FrameTag::Complete => Ok(Record::Complete),
        }
    }

    fn read_ram(&mut self, blocks: &dyn BlockResolver) -> Result<Record> {
        let r = &mut self.inner;
        let bits = read_u8(r, "RAM flags")?;
        let invalid = Error::InvalidFlags {
            what: "RAM record",
            bits: u32::from(bits),
        };
        let flags = RamFlags::from_bits(bits).ok_or(Error::InvalidFlags {
            what: "RAM record",
            bits: u32::from(bits),
        })?;
        if flags == RamFlags::END_OF_SECTION {
            return Ok(Record::EndOfSection);
        }
        let kind = flags - RamFlags::CONTINUE;
        if kind != RamFlags::PAGE && kind != RamFlags::ZERO {
            return Err(invalid);
        }
        let block = if flags.contains(RamFlags::CONTINUE) {
            self.current_block
                .ok_or(Error::NoCurrentBlock { what: "RAM record" })?
        } else {
            BlockId(read_u32(r, "RAM record block")?)
        };
        let offset = read_u64(r, "RAM record offset")?;
        let geometry = blocks
            .geometry(block)
            .ok_or(Error::UnknownBlock { block })?;
        blocks.check_range(block, offset, u64::from(geometry.page_size))?;
        self.current_block = Some(block);
        let header = PageHeader {
            block,
            offset,
            page_size: geometry.page_size,
        };
        if kind == RamFlags::PAGE {
            self.pending = Some(Pending {
                block,
                offset,
                remaining: u64::from(geometry.page_size),
            });
            Ok(Record::Page(header))
        } else {
            Ok(Record::ZeroPage(header))
        }
    }

    /// Reads the pending page's payload into `dst`, whose length must be the
    /// page size. Allocation-free: the bytes go from the read buffer (or the
    /// channel, for large pages) straight into `dst`.
    pub fn read_page_into(&mut self, dst: &mut [u8]) -> Result<()> {
        let p = self.pending.ok_or(Error::NoPayloadPending)?;
        if dst.len() as u64 != p.remaining {
            return Err(Error::BufferSize {
                expected: p.remaining,
                actual: dst.len() as u64,
            });
        }
        self.inner
            .read_exact(dst)
            .map_err(|e| read_err("page payload", e))?;
        self.pending = None;
        Ok(())
    }

    /// Reads and drops the pending page's payload (a page the destination
    /// already has).
    pub fn skip_page(&mut self) -> Result<()> {
        let p = self.pending.ok_or(Error::NoPayloadPending)?;
        let copied = io::copy(&mut (&mut self.inner).take(p.remaining), &mut io::sink())
            .map_err(|e| read_err("page payload", e))?;
        if copied != p.remaining {
            return Err(Error::Truncated {
                what: "page payload",
            });
        }
        self.pending = None;
        Ok(())
    }

    /// A reader over the pending page's payload, for callers that copy it
    /// with their own `Read`-based routine. Reading past the payload returns
    /// end of file; the record is consumed once every byte is read.
    pub fn payload(&mut self) -> Result<PagePayload<'_, R>> {
        if self.pending.is_none() {
            return Err(Error::NoPayloadPending);
        }
        Ok(PagePayload { reader: self })
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.inner.count
    }

    /// Bytes read from the channel into the buffer and not consumed yet.
    /// When 0, the next read may wait for the peer: a caller holding work
    /// back (pages gathered to place together, say) does it first.
    pub fn buffered(&self) -> usize {
        self.inner.inner.buffer().len()
    }

    /// The channel.
    pub fn get_ref(&self) -> &R {
        self.inner.inner.get_ref()
    }

    /// Returns the channel; bytes read ahead into the buffer are lost.
    pub fn into_inner(self) -> R {
        self.inner.inner.into_inner()
    }
}

impl<'a> StreamReader<&'a [u8]> {
    /// A reader over the contents of a [`Command::Packaged`]: frames with no
    /// preamble, in which another `Packaged` is refused.
    pub fn for_package(data: &'a [u8]) -> Self {
        let mut r = Self::with_capacity(0, data);
        r.in_package = true;
        r
    }
}

/// A `Read` over the payload of the pending page; see
/// [`StreamReader::payload`].
#[derive(Debug)]
pub struct PagePayload<'a, R: Read> {
    reader: &'a mut StreamReader<R>,
}

impl<R: Read> PagePayload<'_, R> {
    /// Payload bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.reader.pending.map_or(0, |p| p.remaining)
    }
}

impl<R: Read> Read for PagePayload<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut p) = self.reader.pending else {
            return Ok(0);
        };
        let want = usize::try_from(p.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.reader.inner.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        p.remaining -= n as u64;
        self.reader.pending = (p.remaining > 0).then_some(p);
        Ok(n)
    }
}

fn read_ram_setup<R: Read + ?Sized>(r: &mut R) -> Result<Vec<BlockInfo>> {
    let count = read_u32(r, "RAM setup block count")?;
    check_cap(
        "RAM setup block count",
        u64::from(count),
        u64::from(MAX_BLOCKS),
    )?;
    let mut blocks = Vec::with_capacity((count as usize).min(16));
    for _ in 0..count {
        let name_len = read_u16(r, "RAM block name length")?;
        let name = read_name(r, usize::from(name_len), MAX_BLOCK_NAME_LEN, "RAM block")?;
        let size = read_u64(r, "RAM block size")?;
        let page_size = read_u32(r, "RAM block page size")?;
        let info = BlockInfo {
            name,
            size,
            page_size,
        };
        info.validate()?;
        push_tracked(&mut blocks, info);
    }
    validate_blocks(&blocks)?;
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockTable;
    use crate::command::tests::{all_commands, table};
    use crate::header::{read_preamble, MigrationId, Role};

    fn page(fill: u8, size: usize) -> Vec<u8> {
        vec![fill; size]
    }

    #[test]
    fn round_trip_every_record() {
        let t = table();
        let mut w = StreamWriter::new(Vec::new());
        let hello = Hello::new(Role::Main, MigrationId([3; 16]));
        w.write_preamble(&hello).unwrap();
        w.write_ram_setup(t.blocks()).unwrap();
        w.write_page(BlockId(0), 0, &page(1, 4096)).unwrap();
        w.write_page(BlockId(0), 4096, &page(2, 4096)).unwrap(); // CONTINUE
        w.write_zero_page(BlockId(0), 8192).unwrap(); // CONTINUE
        w.write_zero_page(BlockId(1), 2 << 20).unwrap();
        w.write_page(BlockId(1), 0, &page(3, 2 << 20)).unwrap(); // CONTINUE
        w.write_page(BlockId(0), 63 * 4096, &page(4, 4096)).unwrap();
        w.write_end_of_section().unwrap();
        w.write_sync(1).unwrap();
        for c in all_commands() {
            w.write_command(&c).unwrap();
        }
        w.write_complete().unwrap();
        let written = w.bytes_written();
        let buf = w.into_inner().unwrap();
        assert_eq!(written, buf.len() as u64);

        let mut src = &buf[..];
        assert_eq!(read_preamble(&mut src).unwrap(), hello);
        let mut r = StreamReader::new(src);
        assert_eq!(
            r.read_record(&()).unwrap(),
            Record::RamSetup(t.blocks().to_vec())
        );
        let mut small = [0u8; 4096];
        let mut big = vec![0u8; 2 << 20];
        let h = |b, o, p| PageHeader {
            block: BlockId(b),
            offset: o,
            page_size: p,
        };
        assert_eq!(r.read_record(&t).unwrap(), Record::Page(h(0, 0, 4096)));
        r.read_page_into(&mut small).unwrap();
        assert_eq!(small, [1u8; 4096]);
        assert_eq!(r.read_record(&t).unwrap(), Record::Page(h(0, 4096, 4096)));
        r.read_page_into(&mut small).unwrap();
        assert_eq!(small, [2u8; 4096]);
        assert_eq!(
            r.read_record(&t).unwrap(),
            Record::ZeroPage(h(0, 8192, 4096))
        );
        assert_eq!(
            r.read_record(&t).unwrap(),
            Record::ZeroPage(h(1, 2 << 20, 2 << 20))
        );
        assert_eq!(r.read_record(&t).unwrap(), Record::Page(h(1, 0, 2 << 20)));
        r.read_page_into(&mut big).unwrap();
        assert!(big.iter().all(|&b| b == 3));
        assert_eq!(
            r.read_record(&t).unwrap(),
            Record::Page(h(0, 63 * 4096, 4096))
        );
        r.read_page_into(&mut small).unwrap();
        assert_eq!(r.read_record(&t).unwrap(), Record::EndOfSection);
        assert_eq!(r.read_record(&t).unwrap(), Record::Sync { iteration: 1 });
        for c in all_commands() {
            assert_eq!(r.read_record(&t).unwrap(), Record::Command(c));
        }
        assert_eq!(r.read_record(&t).unwrap(), Record::Complete);
        assert!(matches!(r.read_record(&t), Err(Error::Closed)));
        assert_eq!(r.bytes_read(), (buf.len() - crate::PREAMBLE_LEN) as u64);
    }

    #[test]
    fn continue_flag_saves_block_ids() {
        let mut w = StreamWriter::new(Vec::new());
        w.write_zero_page(BlockId(0), 0).unwrap();
        w.write_zero_page(BlockId(0), 4096).unwrap();
        let buf = w.into_inner().unwrap();
        assert_eq!(buf.len(), 14 + 10);
        assert_eq!(buf[15], (RamFlags::ZERO | RamFlags::CONTINUE).bits());
    }

    #[test]
    fn zero_page_has_no_payload() {
        let mut w = StreamWriter::new(Vec::new());
        w.write_zero_page(BlockId(7), 0x1000).unwrap();
        assert_eq!(
            w.into_inner().unwrap(),
            [2, 2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0x10, 0]
        );
    }

    #[test]
    fn payload_must_be_consumed() {
        let t = table();
        let mut w = StreamWriter::new(Vec::new());
        w.write_page(BlockId(0), 0, &page(5, 4096)).unwrap();
        w.write_page(BlockId(0), 4096, &page(6, 4096)).unwrap();
        w.write_page(BlockId(0), 8192, &page(7, 4096)).unwrap();
        w.write_complete().unwrap();
        let buf = w.into_inner().unwrap();
        let mut r = StreamReader::new(&buf[..]);
        assert!(matches!(r.read_record(&t).unwrap(), Record::Page(_)));
        assert!(matches!(
            r.read_record(&t),
            Err(Error::PayloadPending {
                remaining: 4096,
                ..
            })
        ));
        let mut wrong = [0u8; 100];
        assert!(matches!(
            r.read_page_into(&mut wrong),
            Err(Error::BufferSize { .. })
        ));
        r.skip_page().unwrap();
        assert!(matches!(r.read_record(&t).unwrap(), Record::Page(_)));
        let mut via_read = Vec::new();
        {
            let mut p = r.payload().unwrap();
            assert_eq!(p.remaining(), 4096);
            p.read_to_end(&mut via_read).unwrap();
        }
        assert_eq!(via_read, page(6, 4096));
        assert!(matches!(r.read_record(&t).unwrap(), Record::Page(_)));
        let mut dst = [0u8; 4096];
        r.read_page_into(&mut dst).unwrap();
        assert_eq!(dst, [7u8; 4096]);
        assert!(matches!(
            r.read_page_into(&mut dst),
            Err(Error::NoPayloadPending)
        ));
        assert_eq!(r.read_record(&t).unwrap(), Record::Complete);
    }

    #[test]
    fn out_of_range_offset_rejected_before_payload() {
        let t = table();
        for (block, offset) in [(0u32, 64 * 4096u64), (0, 4095), (1, 4 << 21), (9, 0)] {
            let mut w = StreamWriter::new(Vec::new());
            w.write_page(BlockId(block), offset, &page(1, 4096))
                .unwrap();
            let buf = w.into_inner().unwrap();
            let mut r = StreamReader::new(&buf[..]);
            assert!(r.read_record(&t).is_err(), "{block} {offset:#x}");
            // Only the 14-byte head was consumed: the payload is untouched.
            assert_eq!(r.bytes_read(), 14);
        }
    }

    #[test]
    fn bad_flags_rejected() {
        let t = table();
        for bits in [0u8, 0x03, 0x04, 0x09, 0x0c, 0x10, 0x80, 0x07] {
            let buf = [2u8, bits, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            let mut r = StreamReader::new(&buf[..]);
            assert!(
                matches!(r.read_record(&t), Err(Error::InvalidFlags { .. })),
                "{bits:#x}"
            );
        }
        // CONTINUE as the first RAM record.
        let buf = [2u8, 0x06, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            StreamReader::new(&buf[..]).read_record(&t),
            Err(Error::NoCurrentBlock { .. })
        ));
    }

    #[test]
    fn unknown_frame_tags_rejected() {
        for v in [0u8, 6, 0x7f, 0xff] {
            let buf = [v];
            assert!(matches!(
                StreamReader::new(&buf[..]).read_record(&()),
                Err(Error::UnknownTag {
                    kind: TagKind::Frame,
                    value
                }) if value == v
            ));
        }
    }

    #[test]
    fn ram_setup_caps() {
        // Block count above the cap, refused before reading any block.
        let mut buf = vec![1u8];
        buf.extend_from_slice(&(MAX_BLOCKS + 1).to_be_bytes());
        assert!(matches!(
            StreamReader::new(&buf[..]).read_record(&()),
            Err(Error::TooLong { .. })
        ));
        // Name length above the cap.
        let mut buf = vec![1u8, 0, 0, 0, 1];
        buf.extend_from_slice(&257u16.to_be_bytes());
        assert!(matches!(
            StreamReader::new(&buf[..]).read_record(&()),
            Err(Error::InvalidName { .. })
        ));
        // Duplicate names and bad page sizes.
        let dup = [
            BlockInfo {
                name: "a".into(),
                size: 4096,
                page_size: 4096,
            },
            BlockInfo {
                name: "a".into(),
                size: 4096,
                page_size: 4096,
            },
        ];
        assert!(StreamWriter::new(Vec::new()).write_ram_setup(&dup).is_err());
        let mut buf = vec![1u8, 0, 0, 0, 2];
        for b in &dup {
            buf.extend_from_slice(&1u16.to_be_bytes());
            buf.extend_from_slice(b.name.as_bytes());
            buf.extend_from_slice(&b.size.to_be_bytes());
            buf.extend_from_slice(&b.page_size.to_be_bytes());
        }
        assert!(matches!(
            StreamReader::new(&buf[..]).read_record(&()),
            Err(Error::DuplicateBlockName { .. })
        ));
        // A page size that is not a power of two.
        let mut buf = vec![1u8, 0, 0, 0, 1, 0, 1, b'a'];
        buf.extend_from_slice(&0x6000u64.to_be_bytes());
        buf.extend_from_slice(&0x3000u32.to_be_bytes());
        assert!(matches!(
            StreamReader::new(&buf[..]).read_record(&()),
            Err(Error::InvalidPageSize { page_size: 0x3000 })
        ));
    }

    #[test]
    fn packaged_streams_nest_once() {
        let t = table();
        let mut inner = StreamWriter::new(Vec::new());
        inner.write_command(&Command::Listen).unwrap();
        inner.write_command(&Command::Run).unwrap();
        let data = inner.into_inner().unwrap();
        let mut w = StreamWriter::new(Vec::new());
        w.write_command(&Command::Packaged(data.clone())).unwrap();
        let outer = w.into_inner().unwrap();
        let Record::Command(Command::Packaged(got)) =
            StreamReader::new(&outer[..]).read_record(&t).unwrap()
        else {
            panic!("not a package");
        };
        let mut p = StreamReader::for_package(&got);
        assert_eq!(p.read_record(&t).unwrap(), Record::Command(Command::Listen));
        assert_eq!(p.read_record(&t).unwrap(), Record::Command(Command::Run));
        assert!(matches!(p.read_record(&t), Err(Error::Closed)));
        // A package inside a package is refused.
        assert!(matches!(
            StreamReader::for_package(&outer).read_record(&t),
            Err(Error::NestedPackage)
        ));
    }

    #[test]
    fn writer_refuses_bad_page_sizes() {
        let mut w = StreamWriter::new(Vec::new());
        assert!(matches!(
            w.write_page(BlockId(0), 0, &[0u8; 100]),
            Err(Error::InvalidPageSize { .. })
        ));
        assert_eq!(w.bytes_written(), 0);
    }

    #[test]
    fn resolver_from_announced_blocks() {
        // A destination can use the announced list itself as the resolver.
        let blocks = table().blocks().to_vec();
        let t2 = BlockTable::new(blocks.clone()).unwrap();
        let mut w = StreamWriter::new(Vec::new());
        w.write_zero_page(BlockId(1), 0).unwrap();
        let buf = w.into_inner().unwrap();
        assert!(StreamReader::new(&buf[..]).read_record(&t2).is_ok());
        assert!(StreamReader::new(&buf[..])
            .read_record(&&blocks[..])
            .is_ok());
    }
}
