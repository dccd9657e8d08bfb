//! Commands: the control messages of the main channel.
//!
//! A command travels inside a `Command` frame of the main channel (see
//! [`crate::record`]) as
//!
//! | size | field    |                                          |
//! |-----:|----------|------------------------------------------|
//! | 1    | tag      | [`CommandTag`]                           |
//! | 4    | body_len | big-endian, checked against the tag's cap |
//! | n    | body     | per tag, below                           |
//!
//! | tag | command             | body                                                       |
//! |----:|---------------------|------------------------------------------------------------|
//! | 0   | Invalid (reserved)  | never sent, always rejected                                |
//! | 1   | Advise              | `flags: u32` ([`AdviseFlags`])                             |
//! | 2   | Listen              | empty                                                      |
//! | 3   | Run                 | empty                                                      |
//! | 4   | Packaged            | `bytes[body_len]`, a nested stream of frames (<= 128 MiB)  |
//! | 5   | Discard             | `block: u32, count: u32, count x (offset: u64, len: u64)`  |
//! | 6   | Resume              | empty                                                      |
//! | 7   | RecvBitmapRequest   | `block: u32`                                               |
//! | 8   | DeviceState         | `name_len: u16, name, version: u32, data[rest]` (<= 64 MiB)|
//! | 9   | Ping                | `value: u32`                                               |
//!
//! The body length is checked against the tag's exact size or cap before any
//! of the body is read, and a body with bytes left over is refused.

use std::io::{Read, Write};

use bitflags::bitflags;

use crate::block::{BlockId, BlockResolver};
use crate::error::{Error, Result, TagKind};
use crate::limits::{
    MAX_DEVICE_NAME_LEN, MAX_DEVICE_STATE_LEN, MAX_DISCARD_RANGES, MAX_PACKAGED_LEN,
};
use crate::wire::{
    check_cap, check_name, push_tracked, read_blob, read_err, read_name, read_u16, read_u32,
    read_u64, read_u8, write_err,
};

/// The tag byte of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CommandTag {
    /// Reserved: never sent, always rejected.
    Invalid = 0,
    /// [`Command::Advise`].
    Advise = 1,
    /// [`Command::Listen`].
    Listen = 2,
    /// [`Command::Run`].
    Run = 3,
    /// [`Command::Packaged`].
    Packaged = 4,
    /// [`Command::Discard`].
    Discard = 5,
    /// [`Command::Resume`].
    Resume = 6,
    /// [`Command::RecvBitmapRequest`].
    RecvBitmapRequest = 7,
    /// [`Command::DeviceState`].
    DeviceState = 8,
    /// [`Command::Ping`].
    Ping = 9,
}

impl CommandTag {
    /// Decodes a tag byte; `Invalid` and unknown values fail.
    pub fn from_u8(value: u8) -> Result<Self> {
        Ok(match value {
            1 => CommandTag::Advise,
            2 => CommandTag::Listen,
            3 => CommandTag::Run,
            4 => CommandTag::Packaged,
            5 => CommandTag::Discard,
            6 => CommandTag::Resume,
            7 => CommandTag::RecvBitmapRequest,
            8 => CommandTag::DeviceState,
            9 => CommandTag::Ping,
            value => {
                return Err(Error::UnknownTag {
                    kind: TagKind::Command,
                    value,
                })
            }
        })
    }
}

bitflags! {
    /// What the source intends, sent in [`Command::Advise`] before the
    /// first RAM record so the destination can prepare (register
    /// userfaultfd, open the preempt listener).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct AdviseFlags: u32 {
        /// The source may switch to postcopy.
        const POSTCOPY_RAM = 1 << 0;
        /// Postcopy will use a preempt channel (requires `POSTCOPY_RAM`).
        const POSTCOPY_PREEMPT = 1 << 1;
    }
}

impl AdviseFlags {
    /// Decodes flags, refusing unknown bits and preempt without postcopy.
    pub fn from_wire(bits: u32) -> Result<Self> {
        let flags = AdviseFlags::from_bits(bits).ok_or(Error::InvalidFlags {
            what: "advise",
            bits,
        })?;
        if flags.contains(AdviseFlags::POSTCOPY_PREEMPT)
            && !flags.contains(AdviseFlags::POSTCOPY_RAM)
        {
            return Err(Error::InvalidFlags {
                what: "advise",
                bits,
            });
        }
        Ok(flags)
    }
}

/// A byte range of a block whose destination pages must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRange {
    /// Start, aligned to the block's page size.
    pub offset: u64,
    /// Length, a non-zero multiple of the block's page size.
    pub len: u64,
}

/// One device's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Device name, 1 to [`MAX_DEVICE_NAME_LEN`] bytes of UTF-8.
    pub name: String,
    /// Version of the device's own state format, opaque to this crate.
    pub version: u32,
    /// The state, at most [`MAX_DEVICE_STATE_LEN`] bytes.
    pub data: Vec<u8>,
}

/// A command of the main channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Announces what the source may do (postcopy, preempt); sent before
    /// the first RAM record.
    Advise(AdviseFlags),
    /// Postcopy switch: the destination starts handling faults and reading
    /// pages on the listen path before the vCPUs run.
    Listen,
    /// The destination starts its vCPUs.
    Run,
    /// A nested stream of frames (device state, `Listen`, `Run`...) that
    /// the destination reads whole before acting on it, so the main channel
    /// is free for pages at the postcopy switch. Cannot nest.
    Packaged(Vec<u8>),
    /// Pages of `block` that were sent but dirtied again: the destination
    /// drops them before postcopy so they fault and get requested.
    Discard {
        /// The block.
        block: BlockId,
        /// At most [`MAX_DISCARD_RANGES`] ranges.
        ranges: Vec<DiscardRange>,
    },
    /// Postcopy recovery: the source resumes sending on the new
    /// connections; the destination answers `ResumeAck` on the return path.
    Resume,
    /// Postcopy recovery: the source asks for the destination's received
    /// bitmap of `block`, answered by `ReceivedBitmap` on the return path.
    RecvBitmapRequest {
        /// The block.
        block: BlockId,
    },
    /// One device's state.
    DeviceState(DeviceState),
    /// Answered by `Pong` with the same value on the return path.
    Ping {
        /// Echoed back.
        value: u32,
    },
}

const DISCARD_HEADER: u64 = 8;
const DISCARD_RANGE_LEN: u64 = 16;
const DEVICE_FIXED: u64 = 2 + 4;

impl Command {
    /// The command's tag.
    pub fn tag(&self) -> CommandTag {
        match self {
            Command::Advise(_) => CommandTag::Advise,
            Command::Listen => CommandTag::Listen,
            Command::Run => CommandTag::Run,
            Command::Packaged(_) => CommandTag::Packaged,
            Command::Discard { .. } => CommandTag::Discard,
            Command::Resume => CommandTag::Resume,
            Command::RecvBitmapRequest { .. } => CommandTag::RecvBitmapRequest,
            Command::DeviceState(_) => CommandTag::DeviceState,
            Command::Ping { .. } => CommandTag::Ping,
        }
    }

    /// Checks the command against the format's caps and returns its body
    /// length.
    pub(crate) fn body_len(&self) -> Result<u32> {
        let len: u64 = match self {
            Command::Advise(flags) => {
                AdviseFlags::from_wire(flags.bits())?;
                4
            }
            Command::Listen | Command::Run | Command::Resume => 0,
            Command::Packaged(data) => {
                check_cap("packaged command", data.len() as u64, MAX_PACKAGED_LEN)?;
                data.len() as u64
            }
            Command::Discard { ranges, .. } => {
                let n = ranges.len() as u64;
                check_cap("discard range count", n, u64::from(MAX_DISCARD_RANGES))?;
                DISCARD_HEADER + DISCARD_RANGE_LEN * n
            }
            Command::RecvBitmapRequest { .. } | Command::Ping { .. } => 4,
            Command::DeviceState(d) => {
                check_name(&d.name, MAX_DEVICE_NAME_LEN, "device")?;
                check_cap("device state", d.data.len() as u64, MAX_DEVICE_STATE_LEN)?;
                DEVICE_FIXED + d.name.len() as u64 + d.data.len() as u64
            }
        };
        // Every cap above keeps the body far below 4 GiB.
        u32::try_from(len).map_err(|_| Error::TooLong {
            what: "command body",
            len,
            max: u64::from(u32::MAX),
        })
    }

    /// Encodes the command (tag, body length, body) into `w`.
    ///
    /// Fails without writing anything if the command breaks a cap.
    pub fn encode<W: Write + ?Sized>(&self, w: &mut W) -> Result<()> {
        let body_len = self.body_len()?;
        let e = write_err("writing a command");
        let mut head = [0u8; 5];
        head[0] = self.tag() as u8;
        head[1..5].copy_from_slice(&body_len.to_be_bytes());
        w.write_all(&head).map_err(&e)?;
        match self {
            Command::Advise(flags) => w.write_all(&flags.bits().to_be_bytes()),
            Command::Listen | Command::Run | Command::Resume => Ok(()),
            Command::Packaged(data) => w.write_all(data),
            Command::Discard { block, ranges } => {
                let mut r = w.write_all(&block.0.to_be_bytes());
                // Count checked against MAX_DISCARD_RANGES in body_len.
                let count = ranges.len() as u32;
                r = r.and_then(|()| w.write_all(&count.to_be_bytes()));
                for range in ranges {
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&range.offset.to_be_bytes());
                    b[8..].copy_from_slice(&range.len.to_be_bytes());
                    r = r.and_then(|()| w.write_all(&b));
                }
                r
            }
            Command::RecvBitmapRequest { block } => w.write_all(&block.0.to_be_bytes()),
            Command::DeviceState(d) => {
                // Name length checked against MAX_DEVICE_NAME_LEN in body_len.
                let name_len = d.name.len() as u16;
                w.write_all(&name_len.to_be_bytes())
                    .and_then(|()| w.write_all(d.name.as_bytes()))
                    .and_then(|()| w.write_all(&d.version.to_be_bytes()))
                    .and_then(|()| w.write_all(&d.data))
            }
            Command::Ping { value } => w.write_all(&value.to_be_bytes()),
        }
        .map_err(e)
    }

    /// Decodes one command (tag, body length, body) from `r`.
    ///
    /// Block references are checked against `blocks`: a `Discard` range must
    /// be page aligned and inside its block, a `RecvBitmapRequest` must name
    /// a known block.
    pub fn decode<R: Read + ?Sized>(r: &mut R, blocks: &dyn BlockResolver) -> Result<Self> {
        decode_command(r, blocks, false)
    }
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

/// Decodes a command; `in_package` refuses a nested `Packaged`.
pub(crate) fn decode_command<R: Read + ?Sized>(
    r: &mut R,
    blocks: &dyn BlockResolver,
    in_package: bool,
) -> Result<Command> {
    let tag = CommandTag::from_u8(read_u8(r, "command tag")?)?;
    let len = u64::from(read_u32(r, "command body length")?);
    let mut body = r.take(len);
    let cmd = match tag {
        CommandTag::Invalid => {
            return Err(Error::UnknownTag {
                kind: TagKind::Command,
                value: 0,
            })
        }
        CommandTag::Advise => {
            expect_len("advise command", len, 4)?;
            Command::Advise(AdviseFlags::from_wire(read_u32(
                &mut body,
                "advise flags",
            )?)?)
        }
        CommandTag::Listen => {
            expect_len("listen command", len, 0)?;
            Command::Listen
        }
        CommandTag::Run => {
            expect_len("run command", len, 0)?;
            Command::Run
        }
        CommandTag::Resume => {
            expect_len("resume command", len, 0)?;
            Command::Resume
        }
        CommandTag::Packaged => {
            if in_package {
                return Err(Error::NestedPackage);
            }
            Command::Packaged(read_blob(
                &mut body,
                len,
                MAX_PACKAGED_LEN,
                "packaged command",
            )?)
        }
        CommandTag::Discard => {
            let max = DISCARD_HEADER + DISCARD_RANGE_LEN * u64::from(MAX_DISCARD_RANGES);
            check_cap("discard command", len, max)?;
            if len < DISCARD_HEADER {
                return Err(Error::BadLength {
                    what: "discard command",
                    len,
                    expected: DISCARD_HEADER,
                });
            }
            let block = BlockId(read_u32(&mut body, "discard block")?);
            let count = read_u32(&mut body, "discard range count")?;
            check_cap(
                "discard range count",
                u64::from(count),
                u64::from(MAX_DISCARD_RANGES),
            )?;
            expect_len(
                "discard command",
                len,
                DISCARD_HEADER + DISCARD_RANGE_LEN * u64::from(count),
            )?;
            if blocks.geometry(block).is_none() {
                return Err(Error::UnknownBlock { block });
            }
            let mut ranges = Vec::with_capacity((count as usize).min(256));
            for _ in 0..count {
                let offset = read_u64(&mut body, "discard range offset")?;
                let len = read_u64(&mut body, "discard range length")?;
                blocks.check_range(block, offset, len)?;
                push_tracked(&mut ranges, DiscardRange { offset, len });
            }
            Command::Discard { block, ranges }
        }
        CommandTag::RecvBitmapRequest => {
            expect_len("received-bitmap request", len, 4)?;
            let block = BlockId(read_u32(&mut body, "received-bitmap request block")?);
            if blocks.geometry(block).is_none() {
                return Err(Error::UnknownBlock { block });
            }
            Command::RecvBitmapRequest { block }
        }
        CommandTag::DeviceState => {
            let max = DEVICE_FIXED + MAX_DEVICE_NAME_LEN as u64 + MAX_DEVICE_STATE_LEN;
            check_cap("device state command", len, max)?;
            if len < DEVICE_FIXED + 1 {
                return Err(Error::BadLength {
                    what: "device state command",
                    len,
                    expected: DEVICE_FIXED + 1,
                });
            }
            let name_len = read_u16(&mut body, "device name length")?;
            let fixed = DEVICE_FIXED + u64::from(name_len);
            if len < fixed {
                return Err(Error::BadLength {
                    what: "device state command",
                    len,
                    expected: fixed,
                });
            }
            let name = read_name(
                &mut body,
                usize::from(name_len),
                MAX_DEVICE_NAME_LEN,
                "device",
            )?;
            let version = read_u32(&mut body, "device state version")?;
            let data = read_blob(&mut body, len - fixed, MAX_DEVICE_STATE_LEN, "device state")?;
            Command::DeviceState(DeviceState {
                name,
                version,
                data,
            })
        }
        CommandTag::Ping => {
            expect_len("ping command", len, 4)?;
            Command::Ping {
                value: read_u32(&mut body, "ping value")?,
            }
        }
    };
    finish_body(&mut body, "command")?;
    Ok(cmd)
}

/// Refuses a body with unread bytes. Reads at most one byte: a declared
/// length always matches what the parser consumed unless the peer lied.
pub(crate) fn finish_body<R: Read>(body: &mut std::io::Take<R>, what: &'static str) -> Result<()> {
    let extra = body.limit();
    if extra == 0 {
        return Ok(());
    }
    // Make sure the bytes are at least there, so a truncated stream reports
    // truncation rather than trailing bytes.
    let mut b = [0u8; 1];
    body.read_exact(&mut b).map_err(|e| read_err(what, e))?;
    Err(Error::TrailingBytes { what, extra })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::block::{BlockInfo, BlockTable};

    pub(crate) fn table() -> BlockTable {
        BlockTable::new(vec![
            BlockInfo {
                name: "pc.ram".into(),
                size: 64 * 4096,
                page_size: 4096,
            },
            BlockInfo {
                name: "huge".into(),
                size: 4 << 21,
                page_size: 2 << 20,
            },
        ])
        .unwrap()
    }

    pub(crate) fn all_commands() -> Vec<Command> {
        vec![
            Command::Advise(AdviseFlags::empty()),
            Command::Advise(AdviseFlags::POSTCOPY_RAM),
            Command::Advise(AdviseFlags::POSTCOPY_RAM | AdviseFlags::POSTCOPY_PREEMPT),
            Command::Listen,
            Command::Run,
            Command::Packaged(vec![]),
            Command::Packaged(vec![1, 2, 3]),
            Command::Discard {
                block: BlockId(0),
                ranges: vec![],
            },
            Command::Discard {
                block: BlockId(1),
                ranges: vec![
                    DiscardRange {
                        offset: 0,
                        len: 2 << 20,
                    },
                    DiscardRange {
                        offset: 2 << 21,
                        len: 2 << 21,
                    },
                ],
            },
            Command::Resume,
            Command::RecvBitmapRequest { block: BlockId(1) },
            Command::DeviceState(DeviceState {
                name: "virtio-net".into(),
                version: 3,
                data: vec![9; 1000],
            }),
            Command::DeviceState(DeviceState {
                name: "x".into(),
                version: 0,
                data: vec![],
            }),
            Command::Ping { value: 0xdead_beef },
        ]
    }

    #[test]
    fn round_trip_every_command() {
        let t = table();
        for cmd in all_commands() {
            let mut buf = Vec::new();
            cmd.encode(&mut buf).unwrap();
            let mut r = &buf[..];
            assert_eq!(Command::decode(&mut r, &t).unwrap(), cmd);
            assert!(r.is_empty(), "{cmd:?} left bytes");
        }
    }

    #[test]
    fn invalid_and_unknown_tags() {
        for v in [0u8, 10, 0xff] {
            let buf = [v, 0, 0, 0, 0];
            assert!(matches!(
                Command::decode(&mut &buf[..], &table()),
                Err(Error::UnknownTag {
                    kind: TagKind::Command,
                    value
                }) if value == v
            ));
        }
    }

    #[test]
    fn bad_advise_flags() {
        for bits in [2u32, 4, 0x8000_0000] {
            let mut buf = vec![1, 0, 0, 0, 4];
            buf.extend_from_slice(&bits.to_be_bytes());
            assert!(matches!(
                Command::decode(&mut &buf[..], &table()),
                Err(Error::InvalidFlags { .. })
            ));
        }
        assert!(Command::Advise(AdviseFlags::POSTCOPY_PREEMPT)
            .encode(&mut Vec::new())
            .is_err());
    }

    #[test]
    fn oversized_lengths_rejected_before_reading() {
        // Device state claiming 4 GiB - 1: refused from the 5-byte head.
        let buf = [8u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Command::decode(&mut &buf[..], &table()),
            Err(Error::TooLong { .. })
        ));
        let buf = [4u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Command::decode(&mut &buf[..], &table()),
            Err(Error::TooLong { .. })
        ));
        // Discard with a count above the cap.
        let mut buf = vec![5u8];
        buf.extend_from_slice(&(8u32 + 16).to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
        buf.extend_from_slice(&(MAX_DISCARD_RANGES + 1).to_be_bytes());
        assert!(matches!(
            Command::decode(&mut &buf[..], &table()),
            Err(Error::TooLong { .. })
        ));
        // Fixed-size body with the wrong length.
        let buf = [9u8, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            Command::decode(&mut &buf[..], &table()),
            Err(Error::BadLength { .. })
        ));
        // Encoders refuse what decoders would refuse.
        let big = Command::DeviceState(DeviceState {
            name: "d".into(),
            version: 0,
            data: vec![0; MAX_DEVICE_STATE_LEN as usize + 1],
        });
        assert!(matches!(
            big.encode(&mut Vec::new()),
            Err(Error::TooLong { .. })
        ));
    }

    #[test]
    fn discard_ranges_checked_against_blocks() {
        let t = table();
        for (block, offset, len) in [
            (0u32, 64 * 4096, 4096u64),
            (0, 100, 4096),
            (0, 0, 100),
            (1, 4096, 2 << 20),
            (7, 0, 4096),
        ] {
            let cmd = Command::Discard {
                block: BlockId(block),
                ranges: vec![DiscardRange { offset, len }],
            };
            let mut buf = Vec::new();
            cmd.encode(&mut buf).unwrap();
            assert!(Command::decode(&mut &buf[..], &t).is_err(), "{cmd:?}");
        }
        let mut buf = Vec::new();
        Command::RecvBitmapRequest { block: BlockId(2) }
            .encode(&mut buf)
            .unwrap();
        assert!(matches!(
            Command::decode(&mut &buf[..], &t),
            Err(Error::UnknownBlock { .. })
        ));
    }

    #[test]
    fn device_state_names_checked() {
        // Name length larger than the body.
        let mut buf = vec![8u8];
        buf.extend_from_slice(&7u32.to_be_bytes());
        buf.extend_from_slice(&200u16.to_be_bytes());
        buf.extend_from_slice(&[b'a', 0, 0, 0, 0]);
        assert!(matches!(
            Command::decode(&mut &buf[..], &table()),
            Err(Error::BadLength { .. })
        ));
        // Non-UTF-8 name.
        let mut buf = vec![8u8];
        buf.extend_from_slice(&7u32.to_be_bytes());
        buf.extend_from_slice(&1u16.to_be_bytes());
        buf.extend_from_slice(&[0xff, 0, 0, 0, 0]);
        assert!(matches!(
            Command::decode(&mut &buf[..], &table()),
            Err(Error::InvalidName { .. })
        ));
        // Empty name.
        let mut buf = vec![8u8];
        buf.extend_from_slice(&7u32.to_be_bytes());
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, 0, 0]);
        assert!(matches!(
            Command::decode(&mut &buf[..], &table()),
            Err(Error::InvalidName { .. })
        ));
    }
}
