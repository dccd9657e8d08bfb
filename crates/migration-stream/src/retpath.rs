//! Return-path messages (destination to source), their writer and reader.
//!
//! The return path is the reverse direction of the main connection. After
//! its own preamble (role `ReturnPath`, same migration id) it is a sequence
//! of messages:
//!
//! | size | field    |                                            |
//! |-----:|----------|--------------------------------------------|
//! | 1    | tag      | [`ReturnTag`]                              |
//! | 4    | body_len | big-endian, checked against the tag's size  |
//! | n    | body     | per tag, below                             |
//!
//! | tag | message               | body                                                  |
//! |----:|-----------------------|-------------------------------------------------------|
//! | 0   | Invalid (reserved)    | never sent, always rejected                           |
//! | 1   | Shut                  | `status: u32` (0 = success)                            |
//! | 2   | Pong                  | `value: u32` (the `Ping`'s value)                      |
//! | 3   | PageRequestWithBlock  | `block: u32, offset: u64, len: u64`                    |
//! | 4   | PageRequest           | `offset: u64, len: u64` (block of the previous request)|
//! | 5   | ReceivedBitmap        | `block: u32, bits: u64, ceil(bits/64) x word: u64`     |
//! | 6   | ResumeAck             | `value: u32`                                           |
//!
//! A received bitmap has one bit per page of its block: bit `i % 64` (least
//! significant first) of word `i / 64` is page `i`; bits past `bits` are
//! zero. Given a block table, the decoder requires `bits` to equal the
//! block's page count, which bounds the bitmap by the block's declared size
//! (and always by [`MAX_RECV_BITMAP_BYTES`]).
//!
//! # Exchanges
//!
//! ```text
//!  source (main channel)              destination (return path)
//!  ----------------------             -------------------------
//!  Command(Ping v)          ------>
//!                           <------   Pong v
//!  (postcopy)                         vCPU faults on page P of block B
//!                           <------   PageRequestWithBlock B, P, len
//!  Ram(P) on main/preempt   ------>   (later requests in B: PageRequest)
//!  (recovery, new connections)
//!  Command(RecvBitmapRequest B) -->
//!                           <------   ReceivedBitmap B
//!  Command(Resume)          ------>
//!                           <------   ResumeAck
//!  Complete                 ------>
//!                           <------   Shut 0      (or Shut err on failure)
//! ```

use std::io::{BufReader, BufWriter, Read, Write};

use crate::block::{BlockId, BlockResolver};
use crate::command::finish_body;
use crate::error::{Error, Result, TagKind};
use crate::header::{write_preamble, Hello};
use crate::limits::{DEFAULT_RETURN_PATH_BUFFER, MAX_RECV_BITMAP_BYTES};
use crate::wire::{check_cap, push_tracked, read_tag, read_u32, read_u64, write_err, Counted};

/// The tag byte of a return-path message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReturnTag {
    /// Reserved: never sent, always rejected.
    Invalid = 0,
    /// [`ReturnMessage::Shut`].
    Shut = 1,
    /// [`ReturnMessage::Pong`].
    Pong = 2,
    /// [`ReturnMessage::PageRequest`] naming its block.
    PageRequestWithBlock = 3,
    /// [`ReturnMessage::PageRequest`] in the previous request's block.
    PageRequest = 4,
    /// [`ReturnMessage::ReceivedBitmap`].
    ReceivedBitmap = 5,
    /// [`ReturnMessage::ResumeAck`].
    ResumeAck = 6,
}

impl ReturnTag {
    /// Decodes a tag byte; `Invalid` and unknown values fail.
    pub fn from_u8(value: u8) -> Result<Self> {
        Ok(match value {
            1 => ReturnTag::Shut,
            2 => ReturnTag::Pong,
            3 => ReturnTag::PageRequestWithBlock,
            4 => ReturnTag::PageRequest,
            5 => ReturnTag::ReceivedBitmap,
            6 => ReturnTag::ResumeAck,
            value => {
                return Err(Error::UnknownTag {
                    kind: TagKind::ReturnPath,
                    value,
                })
            }
        })
    }
}

/// The pages of one block that the destination has received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedBitmap {
    block: BlockId,
    bits: u64,
    words: Vec<u64>,
}

fn words_for(bits: u64) -> u64 {
    bits.div_ceil(64)
}

impl ReceivedBitmap {
    /// An all-clear bitmap of `bits` pages.
    pub fn new(block: BlockId, bits: u64) -> Result<Self> {
        check_cap(
            "received bitmap",
            words_for(bits) * 8,
            MAX_RECV_BITMAP_BYTES,
        )?;
        // Bounded by MAX_RECV_BITMAP_BYTES just above.
        let words = vec![0u64; words_for(bits) as usize];
        Ok(ReceivedBitmap { block, bits, words })
    }

    /// A bitmap from its words (page `i` is bit `i % 64` of word `i / 64`).
    /// The word count must match `bits` and bits past `bits` must be clear.
    pub fn from_words(block: BlockId, bits: u64, words: Vec<u64>) -> Result<Self> {
        check_cap(
            "received bitmap",
            words_for(bits) * 8,
            MAX_RECV_BITMAP_BYTES,
        )?;
        if words.len() as u64 != words_for(bits) {
            return Err(Error::BadLength {
                what: "received bitmap words",
                len: words.len() as u64,
                expected: words_for(bits),
            });
        }
        let tail = bits % 64;
        if tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return Err(Error::BitmapTrailingBits { block, bits });
        }
        Ok(ReceivedBitmap { block, bits, words })
    }

    /// The block.
    pub fn block(&self) -> BlockId {
        self.block
    }

    /// Number of pages covered.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether page `page` was received (`false` past the end).
    pub fn get(&self, page: u64) -> bool {
        page < self.bits
            && usize::try_from(page / 64)
                .ok()
                .and_then(|i| self.words.get(i))
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Marks page `page` received; ignored past the end.
    pub fn set(&mut self, page: u64) {
        if page >= self.bits {
            return;
        }
        if let Some(w) = usize::try_from(page / 64)
            .ok()
            .and_then(|i| self.words.get_mut(i))
        {
            *w |= 1 << (page % 64);
        }
    }

    /// Number of pages received.
    pub fn count_received(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A message of the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnMessage {
    /// The destination is done (`status` 0) or failed (non-zero); the
    /// source stops reading the return path.
    Shut {
        /// 0 for success, otherwise an error code of the destination.
        status: u32,
    },
    /// Answer to `Command::Ping`.
    Pong {
        /// The ping's value.
        value: u32,
    },
    /// Postcopy: the destination needs these pages now. On the wire the
    /// block id is omitted when it is the previous request's block.
    PageRequest {
        /// The block.
        block: BlockId,
        /// Start, page aligned.
        offset: u64,
        /// Length, a non-zero multiple of the page size.
        len: u64,
    },
    /// Recovery: the answer to `Command::RecvBitmapRequest`.
    ReceivedBitmap(ReceivedBitmap),
    /// Recovery: the answer to `Command::Resume`.
    ResumeAck {
        /// Always 1 in version 1.
        value: u32,
    },
}

/// Writes return-path messages through a small buffer.
#[derive(Debug)]
pub struct ReturnPathWriter<W: Write> {
    inner: BufWriter<W>,
    last_block: Option<BlockId>,
}

impl<W: Write> ReturnPathWriter<W> {
    /// A writer with a [`DEFAULT_RETURN_PATH_BUFFER`] buffer.
    pub fn new(inner: W) -> Self {
        ReturnPathWriter {
            inner: BufWriter::with_capacity(DEFAULT_RETURN_PATH_BUFFER, inner),
            last_block: None,
        }
    }

    /// Writes the stream header and `hello` (role `ReturnPath`).
    pub fn write_preamble(&mut self, hello: &Hello) -> Result<()> {
        write_preamble(&mut self.inner, hello)
    }

    /// Writes one message (buffered).
    pub fn write_message(&mut self, msg: &ReturnMessage) -> Result<()> {
        let e = write_err("writing a return-path message");
        let mut b = [0u8; 25];
        let n = match msg {
            ReturnMessage::Shut { status: v }
            | ReturnMessage::Pong { value: v }
            | ReturnMessage::ResumeAck { value: v } => {
                b[0] = match msg {
                    ReturnMessage::Shut { .. } => ReturnTag::Shut,
                    ReturnMessage::Pong { .. } => ReturnTag::Pong,
                    _ => ReturnTag::ResumeAck,
                } as u8;
                b[1..5].copy_from_slice(&4u32.to_be_bytes());
                b[5..9].copy_from_slice(&v.to_be_bytes());
                9
            }
            ReturnMessage::PageRequest { block, offset, len } => {
                let mut at = 5;
                if self.last_block == Some(*block) {
                    b[0] = ReturnTag::PageRequest as u8;
                    b[1..5].copy_from_slice(&16u32.to_be_bytes());
                } else {
                    b[0] = ReturnTag::PageRequestWithBlock as u8;
                    b[1..5].copy_from_slice(&20u32.to_be_bytes());
                    b[5..9].copy_from_slice(&block.0.to_be_bytes());
                    at = 9;
                }
                b[at..at + 8].copy_from_slice(&offset.to_be_bytes());
                b[at + 8..at + 16].copy_from_slice(&len.to_be_bytes());
                self.last_block = Some(*block);
                at + 16
            }
            ReturnMessage::ReceivedBitmap(bm) => {
                let body = 12 + 8 * bm.words.len() as u64;
                // Bounded by MAX_RECV_BITMAP_BYTES (checked at construction).
                let body = u32::try_from(body).map_err(|_| Error::TooLong {
                    what: "received bitmap",
                    len: body,
                    max: MAX_RECV_BITMAP_BYTES,
                })?;
                b[0] = ReturnTag::ReceivedBitmap as u8;
                b[1..5].copy_from_slice(&body.to_be_bytes());
                b[5..9].copy_from_slice(&bm.block.0.to_be_bytes());
                b[9..17].copy_from_slice(&bm.bits.to_be_bytes());
                self.inner.write_all(&b[..17]).map_err(&e)?;
                for w in &bm.words {
                    self.inner.write_all(&w.to_be_bytes()).map_err(&e)?;
                }
                return Ok(());
            }
        };
        self.inner.write_all(&b[..n]).map_err(e)
    }

    /// Pushes buffered messages to the channel.
    pub fn flush(&mut self) -> Result<()> {
        self.inner
            .flush()
            .map_err(write_err("flushing the return path"))
    }

    /// Writes one message and flushes: the usual call, since every
    /// return-path message is waited for.
    pub fn send(&mut self, msg: &ReturnMessage) -> Result<()> {
        self.write_message(msg)?;
        self.flush()
    }

    /// The channel.
    pub fn get_ref(&self) -> &W {
        self.inner.get_ref()
    }

    /// Flushes and returns the channel.
    pub fn into_inner(self) -> Result<W> {
        self.inner.into_inner().map_err(|e| Error::Io {
            context: "flushing the return path",
            source: e.into_error(),
        })
    }
}

/// Reads return-path messages, checking them against the source's blocks.
#[derive(Debug)]
pub struct ReturnPathReader<R: Read> {
    inner: Counted<BufReader<R>>,
    last_block: Option<BlockId>,
}

fn expect_len(what: &'static str, len: u64, expected: u64) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::BadLength {
            what,
            len,
            expected,
        })
    }
}

impl<R: Read> ReturnPathReader<R> {
    /// A reader with a [`DEFAULT_RETURN_PATH_BUFFER`] buffer. It expects
    /// messages: read the preamble first with [`crate::read_preamble`].
    pub fn new(inner: R) -> Self {
        ReturnPathReader {
            inner: Counted {
                inner: BufReader::with_capacity(DEFAULT_RETURN_PATH_BUFFER, inner),
                count: 0,
            },
            last_block: None,
        }
    }

    /// Reads the next message. Page requests must lie inside a block of
    /// `blocks`, page aligned; a received bitmap must have one bit per page
    /// of its block. [`Error::Closed`] if the channel ends between messages.
    pub fn read_message(&mut self, blocks: &dyn BlockResolver) -> Result<ReturnMessage> {
        let r = &mut self.inner;
        let Some(tag) = read_tag(r, "return-path tag")? else {
            return Err(Error::Closed);
        };
        let tag = ReturnTag::from_u8(tag)?;
        let len = u64::from(read_u32(r, "return-path body length")?);
        let mut body = r.take(len);
        let msg = match tag {
            ReturnTag::Invalid => {
                return Err(Error::UnknownTag {
                    kind: TagKind::ReturnPath,
                    value: 0,
                })
            }
            ReturnTag::Shut => {
                expect_len("shut message", len, 4)?;
                ReturnMessage::Shut {
                    status: read_u32(&mut body, "shut status")?,
                }
            }
            ReturnTag::Pong => {
                expect_len("pong message", len, 4)?;
                ReturnMessage::Pong {
                    value: read_u32(&mut body, "pong value")?,
                }
            }
            ReturnTag::ResumeAck => {
                expect_len("resume ack message", len, 4)?;
                ReturnMessage::ResumeAck {
                    value: read_u32(&mut body, "resume ack value")?,
                }
            }
            ReturnTag::PageRequestWithBlock | ReturnTag::PageRequest => {
                let block = if tag == ReturnTag::PageRequestWithBlock {
                    expect_len("page request", len, 20)?;
                    BlockId(read_u32(&mut body, "page request block")?)
                } else {
                    expect_len("page request", len, 16)?;
                    self.last_block.ok_or(Error::NoCurrentBlock {
                        what: "page request",
                    })?
                };
                let offset = read_u64(&mut body, "page request offset")?;
                let plen = read_u64(&mut body, "page request length")?;
                blocks.check_range(block, offset, plen)?;
                self.last_block = Some(block);
                ReturnMessage::PageRequest {
                    block,
                    offset,
                    len: plen,
                }
            }
            ReturnTag::ReceivedBitmap => {
                check_cap("received bitmap message", len, 12 + MAX_RECV_BITMAP_BYTES)?;
                if len < 12 {
                    return Err(Error::BadLength {
                        what: "received bitmap message",
                        len,
                        expected: 12,
                    });
                }
                let block = BlockId(read_u32(&mut body, "received bitmap block")?);
                let bits = read_u64(&mut body, "received bitmap size")?;
                let g = blocks
                    .geometry(block)
                    .ok_or(Error::UnknownBlock { block })?;
                if bits != g.pages() {
                    return Err(Error::BitmapSizeMismatch {
                        block,
                        bits,
                        expected: g.pages(),
                    });
                }
                check_cap(
                    "received bitmap",
                    words_for(bits) * 8,
                    MAX_RECV_BITMAP_BYTES,
                )?;
                let nwords = words_for(bits);
                expect_len("received bitmap message", len, 12 + 8 * nwords)?;
                let mut words = Vec::with_capacity((nwords as usize).min(4096));
                for _ in 0..nwords {
                    push_tracked(&mut words, read_u64(&mut body, "received bitmap word")?);
                }
                ReturnMessage::ReceivedBitmap(ReceivedBitmap::from_words(block, bits, words)?)
            }
        };
        finish_body(&mut body, "return-path message")?;
        Ok(msg)
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.inner.count
    }

    /// The channel.
    pub fn get_ref(&self) -> &R {
        self.inner.inner.get_ref()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::command::tests::table;

    pub(crate) fn all_messages() -> Vec<ReturnMessage> {
        let mut bm = ReceivedBitmap::new(BlockId(0), 64).unwrap();
        bm.set(0);
        bm.set(63);
        let mut bm2 = ReceivedBitmap::new(BlockId(1), 4).unwrap();
        bm2.set(3);
        vec![
            ReturnMessage::Shut { status: 0 },
            ReturnMessage::Shut { status: 5 },
            ReturnMessage::Pong { value: 42 },
            ReturnMessage::PageRequest {
                block: BlockId(0),
                offset: 4096,
                len: 4096,
            },
            ReturnMessage::PageRequest {
                block: BlockId(0),
                offset: 0,
                len: 3 * 4096,
            },
            ReturnMessage::PageRequest {
                block: BlockId(1),
                offset: 2 << 20,
                len: 2 << 20,
            },
            ReturnMessage::ReceivedBitmap(bm),
            ReturnMessage::ReceivedBitmap(bm2),
            ReturnMessage::ResumeAck { value: 1 },
        ]
    }

    #[test]
    fn round_trip_every_message() {
        let t = table();
        let mut w = ReturnPathWriter::new(Vec::new());
        for m in all_messages() {
            w.write_message(&m).unwrap();
        }
        let buf = w.into_inner().unwrap();
        let mut r = ReturnPathReader::new(&buf[..]);
        for m in all_messages() {
            assert_eq!(r.read_message(&t).unwrap(), m);
        }
        assert!(matches!(r.read_message(&t), Err(Error::Closed)));
        assert_eq!(r.bytes_read(), buf.len() as u64);
    }

    #[test]
    fn short_page_request_form() {
        let mut w = ReturnPathWriter::new(Vec::new());
        let req = |offset| ReturnMessage::PageRequest {
            block: BlockId(0),
            offset,
            len: 4096,
        };
        w.write_message(&req(0)).unwrap();
        w.write_message(&req(4096)).unwrap();
        let buf = w.into_inner().unwrap();
        assert_eq!(buf[0], ReturnTag::PageRequestWithBlock as u8);
        assert_eq!(buf[25], ReturnTag::PageRequest as u8);
        assert_eq!(buf.len(), 25 + 21);
        // The short form with no request before it is refused.
        let mut r = ReturnPathReader::new(&buf[25..]);
        assert!(matches!(
            r.read_message(&table()),
            Err(Error::NoCurrentBlock { .. })
        ));
    }

    #[test]
    fn page_requests_checked() {
        let t = table();
        for (block, offset, len) in [
            (0u32, 64 * 4096u64, 4096u64),
            (0, 0, 65 * 4096),
            (0, 1, 4096),
            (0, 0, 0),
            (1, 0, 4096),
            (3, 0, 4096),
            (0, u64::MAX - 4095, 4096),
        ] {
            let mut w = ReturnPathWriter::new(Vec::new());
            w.write_message(&ReturnMessage::PageRequest {
                block: BlockId(block),
                offset,
                len,
            })
            .unwrap();
            let buf = w.into_inner().unwrap();
            assert!(
                ReturnPathReader::new(&buf[..]).read_message(&t).is_err(),
                "{block} {offset:#x} {len:#x}"
            );
        }
    }

    #[test]
    fn bitmap_size_must_match_block() {
        let t = table();
        let mut w = ReturnPathWriter::new(Vec::new());
        w.write_message(&ReturnMessage::ReceivedBitmap(
            ReceivedBitmap::new(BlockId(0), 65).unwrap(),
        ))
        .unwrap();
        let buf = w.into_inner().unwrap();
        assert!(matches!(
            ReturnPathReader::new(&buf[..]).read_message(&t),
            Err(Error::BitmapSizeMismatch { .. })
        ));
        // Huge declared bitmap: refused from the head, nothing allocated.
        let mut buf = vec![5u8];
        buf.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            ReturnPathReader::new(&buf[..]).read_message(&t),
            Err(Error::TooLong { .. })
        ));
        // Trailing bits set.
        assert!(matches!(
            ReceivedBitmap::from_words(BlockId(1), 4, vec![0x10]),
            Err(Error::BitmapTrailingBits { .. })
        ));
        let mut buf = vec![5u8];
        buf.extend_from_slice(&20u32.to_be_bytes());
        buf.extend_from_slice(&1u32.to_be_bytes());
        buf.extend_from_slice(&4u64.to_be_bytes());
        buf.extend_from_slice(&0xf0u64.to_be_bytes());
        assert!(matches!(
            ReturnPathReader::new(&buf[..]).read_message(&t),
            Err(Error::BitmapTrailingBits { .. })
        ));
    }

    #[test]
    fn bitmap_accessors() {
        let mut bm = ReceivedBitmap::new(BlockId(2), 130).unwrap();
        assert_eq!(bm.words().len(), 3);
        bm.set(129);
        bm.set(130); // past the end: ignored
        bm.set(64);
        assert!(bm.get(129) && bm.get(64) && !bm.get(0) && !bm.get(130));
        assert_eq!(bm.count_received(), 2);
        assert_eq!(bm.bits(), 130);
        assert_eq!(bm.block(), BlockId(2));
    }

    #[test]
    fn unknown_tags_and_lengths() {
        for v in [0u8, 7, 0xff] {
            let buf = [v, 0, 0, 0, 4, 0, 0, 0, 0];
            assert!(matches!(
                ReturnPathReader::new(&buf[..]).read_message(&()),
                Err(Error::UnknownTag {
                    kind: TagKind::ReturnPath,
                    value
                }) if value == v
            ));
        }
        let buf = [1u8, 0, 0, 0, 5, 0, 0, 0, 0, 0];
        assert!(matches!(
            ReturnPathReader::new(&buf[..]).read_message(&()),
            Err(Error::BadLength { .. })
        ));
    }
}
