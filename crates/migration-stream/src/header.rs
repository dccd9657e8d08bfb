//! The preamble every channel starts with: stream header and hello.
//!
//! Each direction of each connection starts with the same 29 bytes:
//!
//! | offset | size | field        | value                                   |
//! |-------:|-----:|--------------|-----------------------------------------|
//! | 0      | 4    | magic        | `0x524D4947` (`"RMIG"`)                 |
//! | 4      | 4    | version      | `1`, big-endian                         |
//! | 8      | 1    | role         | [`Role`]                                |
//! | 9      | 4    | epoch        | connection generation, big-endian       |
//! | 13     | 16   | migration id | [`MigrationId`], a UUID's 16 bytes      |
//!
//! The migration id ties the channels of one migration together (a preempt
//! channel or a recovered connection must name the id of the main channel).
//! The epoch is 0 for the first set of connections and grows by one on every
//! postcopy recovery, so a late connection from a dead generation is told
//! apart from the live one.

use std::fmt;
use std::io::{Read, Write};

use crate::error::{Error, Result, TagKind};
use crate::wire::{read_array, read_err, read_u32, read_u8, write_err};

/// The four bytes every stream starts with: `"RMIG"`.
pub const MAGIC: u32 = 0x524D_4947;

/// The wire format version this crate reads and writes.
pub const VERSION: u32 = 1;

/// Size of the stream header plus hello, in bytes.
pub const PREAMBLE_LEN: usize = 4 + 4 + 1 + 4 + 16;

/// The role of one direction of a connection, named in its hello.
///
/// On the wire a `u8`; the value 0 is reserved (`Invalid`) and, like any
/// unknown value, rejected with [`Error::UnknownTag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// Source to destination: RAM records, commands, device state.
    Main = 1,
    /// Destination to source, on the main connection's reverse direction:
    /// page requests, pongs, received bitmaps, shut.
    ReturnPath = 2,
    /// Source to destination, a second connection carrying only the pages
    /// the destination faulted on during postcopy.
    PostcopyPreempt = 3,
}

impl Role {
    /// Decodes a role byte; `0` (reserved `Invalid`) and unknown values fail.
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            1 => Ok(Role::Main),
            2 => Ok(Role::ReturnPath),
            3 => Ok(Role::PostcopyPreempt),
            value => Err(Error::UnknownTag {
                kind: TagKind::Role,
                value,
            }),
        }
    }
}

/// A 16-byte identifier shared by every channel of one migration.
///
/// On the wire it is 16 opaque bytes. [`MigrationId::generate`] makes a
/// random (version 4) UUID, and an id is displayed in the usual hyphenated
/// UUID form (`67e55044-10b1-426f-9247-bb680e5fe0c8`) whatever its bytes, so
/// logs and QMP replies of both sides name a migration the same way.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationId(pub [u8; 16]);

impl MigrationId {
    /// A fresh random id: a version 4 UUID (122 random bits from the
    /// operating system's generator), so two migrations never share an id by
    /// chance. It is not a secret: the format has no authentication.
    ///
    /// # Panics
    ///
    /// Only if the operating system's random source fails (`getrandom(2)`
    /// on Linux), as [`uuid::Uuid::new_v4`] does.
    pub fn generate() -> Self {
        MigrationId(uuid::Uuid::new_v4().into_bytes())
    }

    /// The id as a [`uuid::Uuid`] (same 16 bytes, in order).
    pub fn as_uuid(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.0)
    }
}

impl From<uuid::Uuid> for MigrationId {
    fn from(u: uuid::Uuid) -> Self {
        MigrationId(u.into_bytes())
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.as_uuid().hyphenated(), f)
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

/// The hello that follows the stream header on every channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// What this direction of the connection carries.
    pub role: Role,
    /// Connection generation: 0 at first, +1 per postcopy recovery.
    pub epoch: u32,
    /// The migration this channel belongs to.
    pub migration_id: MigrationId,
}

impl Hello {
    /// A hello of epoch 0.
    pub fn new(role: Role, migration_id: MigrationId) -> Self {
        Hello {
            role,
            epoch: 0,
            migration_id,
        }
    }

    /// Checks that this hello names `role` and `migration_id`.
    pub fn expect(&self, role: Role, migration_id: MigrationId) -> Result<()> {
        if self.role != role {
            return Err(Error::RoleMismatch {
                expected: role,
                found: self.role,
            });
        }
        if self.migration_id != migration_id {
            return Err(Error::MigrationMismatch {
                expected: migration_id,
                found: self.migration_id,
            });
        }
        Ok(())
    }

    /// The preamble (header and hello) as bytes.
    pub fn to_preamble(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        b[8] = self.role as u8;
        b[9..13].copy_from_slice(&self.epoch.to_be_bytes());
        b[13..29].copy_from_slice(&self.migration_id.0);
        b
    }
}

/// Writes the stream header and `hello` (29 bytes). Does not flush.
pub fn write_preamble<W: Write + ?Sized>(w: &mut W, hello: &Hello) -> Result<()> {
    w.write_all(&hello.to_preamble())
        .map_err(write_err("writing the preamble"))
}

/// Reads and checks a stream header and hello.
///
/// Reads exactly [`PREAMBLE_LEN`] bytes, so it can be called on an
/// unbuffered connection before handing it to a [`crate::StreamReader`] or
/// [`crate::ReturnPathReader`]. Fails with [`Error::BadMagic`],
/// [`Error::UnsupportedVersion`] or [`Error::UnknownTag`] on a foreign or
/// newer stream, and with [`Error::Closed`] if the peer sent nothing.
pub fn read_preamble<R: Read + ?Sized>(r: &mut R) -> Result<Hello> {
    let mut first = [0u8; 1];
    loop {
        match r.read(&mut first) {
            Ok(0) => return Err(Error::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err("stream magic", e)),
        }
    }
    let rest: [u8; 3] = read_array(r, "stream magic")?;
    let magic = u32::from_be_bytes([first[0], rest[0], rest[1], rest[2]]);
    if magic != MAGIC {
        return Err(Error::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let version = read_u32(r, "stream version")?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let role = Role::from_u8(read_u8(r, "hello role")?)?;
    let epoch = read_u32(r, "hello epoch")?;
    let migration_id = MigrationId(read_array(r, "hello migration id")?);
    Ok(Hello {
        role,
        epoch,
        migration_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            role: Role::PostcopyPreempt,
            epoch: 7,
            migration_id: MigrationId([0xab; 16]),
        }
    }

    #[test]
    fn preamble_round_trip_every_role() {
        for role in [Role::Main, Role::ReturnPath, Role::PostcopyPreempt] {
            let h = Hello { role, ..hello() };
            let mut buf = Vec::new();
            write_preamble(&mut buf, &h).unwrap();
            assert_eq!(buf.len(), PREAMBLE_LEN);
            assert_eq!(&buf[..4], b"RMIG");
            assert_eq!(read_preamble(&mut &buf[..]).unwrap(), h);
        }
    }

    #[test]
    fn wrong_magic_rejected() {
        let mut buf = hello().to_preamble();
        buf[0] = b'Q';
        assert!(matches!(
            read_preamble(&mut &buf[..]),
            Err(Error::BadMagic {
                expected: MAGIC,
                ..
            })
        ));
    }

    #[test]
    fn wrong_version_rejected() {
        let mut buf = hello().to_preamble();
        buf[7] = 2;
        assert!(matches!(
            read_preamble(&mut &buf[..]),
            Err(Error::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        ));
    }

    #[test]
    fn invalid_and_unknown_roles_rejected() {
        for v in [0u8, 4, 0xff] {
            let mut buf = hello().to_preamble();
            buf[8] = v;
            assert!(matches!(
                read_preamble(&mut &buf[..]),
                Err(Error::UnknownTag {
                    kind: TagKind::Role,
                    value
                }) if value == v
            ));
        }
    }

    #[test]
    fn empty_is_closed_and_partial_is_truncated() {
        assert!(matches!(read_preamble(&mut &[][..]), Err(Error::Closed)));
        let buf = hello().to_preamble();
        for cut in 1..PREAMBLE_LEN {
            assert!(matches!(
                read_preamble(&mut &buf[..cut]),
                Err(Error::Truncated { .. })
            ));
        }
    }

    #[test]
    fn expect_checks_role_and_id() {
        let h = hello();
        h.expect(Role::PostcopyPreempt, h.migration_id).unwrap();
        assert!(matches!(
            h.expect(Role::Main, h.migration_id),
            Err(Error::RoleMismatch { .. })
        ));
        assert!(matches!(
            h.expect(Role::PostcopyPreempt, MigrationId([0; 16])),
            Err(Error::MigrationMismatch { .. })
        ));
    }

    #[test]
    fn generated_ids_are_random_uuids() {
        let a = MigrationId::generate();
        assert_ne!(a, MigrationId::generate());
        let u = a.as_uuid();
        assert_eq!(u.get_version(), Some(uuid::Version::Random));
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        // The wire carries the UUID's bytes in order.
        assert_eq!(&Hello::new(Role::Main, a).to_preamble()[13..], u.as_bytes());
        assert_eq!(MigrationId::from(u), a);
    }

    #[test]
    fn ids_display_as_hyphenated_uuids() {
        let id = MigrationId([
            0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f,
            0xe0, 0xc8,
        ]);
        assert_eq!(id.to_string(), "67e55044-10b1-426f-9247-bb680e5fe0c8");
        assert_eq!(
            format!("{id:?}"),
            "MigrationId(67e55044-10b1-426f-9247-bb680e5fe0c8)"
        );
        // Any 16 bytes from the wire display the same way, version or not.
        assert_eq!(
            MigrationId([0x01; 16]).to_string(),
            "01010101-0101-0101-0101-010101010101"
        );
        let text = MigrationId::generate().to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(
            text.parse::<uuid::Uuid>()
                .map(MigrationId::from)
                .map(|m| m.to_string()),
            Ok(text.clone())
        );
    }
}
