//! Checking guest RAM from the outside: a SHA-256 digest per RAM region (equal
//! RAM gives equal digests on two hosts; [`snapshot_digest`] gives the same
//! of a snapshot file), byte samples at a stride, and the pages a
//! background snapshot might have left write-protected.
//!
//! Both read through vm-memory's volatile accessors, so they may run while the
//! guest runs (the answer is then a blend of instants); for an exact
//! comparison, pause the guest first.

use sha2::{Digest, Sha256};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::session::GuestRam;

/// The digest algorithm of [`digest`], as `x-ram-digest` names it.
pub const DIGEST_ALGORITHM: &str = "sha256";

/// The digest of one RAM region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDigest {
    /// The region's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, in lowercase hex.
    pub sha256: String,
}

/// The SHA-256 of each region of `ram`, from its contents only.
pub fn digest(ram: &GuestRam) -> Vec<RegionDigest> {
    let mem = ram.memory();
    let mut buf = vec![0u8; 1 << 20];
    mem.iter()
        .zip(ram.regions())
        .map(|(region, spec)| {
            let size = region.len();
            let mut h = Sha256::new();
            let mut off = 0u64;
            while off < size {
                let n = usize::try_from(size - off).map_or(buf.len(), |left| left.min(buf.len()));
                let chunk = &mut buf[..n];
                if mem
                    .read_slice(chunk, region.start_addr().unchecked_add(off))
                    .is_err()
                {
                    // Cannot happen inside a region; make it visible if it does.
                    chunk.fill(0xee);
                }
                h.update(&*chunk);
                off += n as u64;
            }
            RegionDigest {
                name: spec.name.clone(),
                size,
                sha256: format!("{:x}", h.finalize()),
            }
        })
        .collect()
}

/// The digests [`digest`] would give for RAM holding what the snapshot file
/// of `reader` holds (its zero pages, which the file does not store, read as
/// zeros): the same per-block SHA-256, so a snapshot can be compared with
/// the RAM it was taken of, or restored into.
pub fn snapshot_digest(
    reader: &migration_stream::SnapshotReader,
) -> Result<Vec<RegionDigest>, migration_stream::Error> {
    let mut buf = Vec::new();
    reader
        .blocks()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let id = migration_stream::BlockId(u32::try_from(i).unwrap_or(u32::MAX));
            let ps = u64::from(b.page_size);
            let per_read = ((1u64 << 20) / ps).max(1);
            buf.resize((per_read * ps) as usize, 0);
            let mut h = Sha256::new();
            let pages = b.size / ps;
            let mut page = 0;
            while page < pages {
                let n = per_read.min(pages - page);
                let chunk = &mut buf[..(n * ps) as usize];
                reader.read_pages(id, page, chunk)?;
                h.update(&*chunk);
                page += n;
            }
            Ok(RegionDigest {
                name: b.name.clone(),
                size: b.size,
                sha256: format!("{:x}", h.finalize()),
            })
        })
        .collect()
}

/// Pages of guest RAM still write-protected by a userfaultfd, over every
/// region (`/proc/self/pagemap`): after a background snapshot ended, in any
/// way, this must be 0.
pub fn write_protected_pages(ram: &GuestRam) -> Result<u64, uffd_sys::Error> {
    let mem = ram.memory();
    mem.iter()
        .map(|r| {
            let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
            uffd_sys::write_protected_pages(mem, r.start_addr(), len)
        })
        .sum()
}

/// Writes to every page of guest RAM without changing a byte
/// (`MADV_POPULATE_WRITE`): it returns only once no page is write-protected,
/// so a page left protected with nobody to resolve its fault shows as a
/// call that never returns.
pub fn populate_write(ram: &GuestRam) -> Result<(), uffd_sys::Error> {
    let mem = ram.memory();
    for r in mem.iter() {
        let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
        uffd_sys::populate_guest(mem, r.start_addr(), len, uffd_sys::Populate::Write)?;
    }
    Ok(())
}

/// Most samples [`sample`] returns in one call.
pub const MAX_SAMPLES: u64 = 1 << 24;

/// The bytes at guest-physical `start, start + stride, ...` below `end`;
/// addresses outside RAM read as 0xff, as on a PC.
pub fn sample(ram: &GuestRam, start: u64, end: u64, stride: u64) -> Result<Vec<u8>, String> {
    if stride == 0 {
        return Err("stride must be at least 1".into());
    }
    let count = end.saturating_sub(start).div_ceil(stride);
    if count > MAX_SAMPLES {
        return Err(format!(
            "{count} samples requested; at most {MAX_SAMPLES} per call"
        ));
    }
    let mem = ram.memory();
    Ok((0..count)
        .map(|i| {
            mem.read_obj::<u8>(GuestAddress(start + i * stride))
                .unwrap_or(0xff)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::session::RamRegion;
    use crate::GuestMemoryMmap;

    fn ram() -> GuestRam {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0xa_0000),
            (GuestAddress(0x10_0000), 0x30_0000),
        ])
        .unwrap();
        GuestRam::new(
            Arc::new(mem),
            vec![RamRegion::new("low"), RamRegion::new("high")],
        )
        .unwrap()
    }

    #[test]
    fn digests_see_contents_and_samples_see_the_hole() {
        let r = ram();
        let d0 = digest(&r);
        assert_eq!(d0.len(), 2);
        assert_eq!(d0[1].name, "high");
        assert_eq!(d0[1].sha256.len(), 64);
        // SHA-256 of 640 KiB of zeros is the same on any host.
        let zeros = format!("{:x}", Sha256::digest(vec![0u8; 0xa_0000]));
        assert_eq!(d0[0].sha256, zeros);
        r.memory().write_obj(7u8, GuestAddress(0x20_0000)).unwrap();
        let d1 = digest(&r);
        assert_eq!(d0[0], d1[0]);
        assert_ne!(d0[1], d1[1]);
        assert_eq!(
            sample(&r, 0x1f_f000, 0x20_2000, 0x1000).unwrap(),
            vec![0, 7, 0]
        );
        assert_eq!(sample(&r, 0xa_0000, 0xa_0001, 1).unwrap(), vec![0xff]);
        assert!(sample(&r, 0, 10, 0).is_err());
        assert!(sample(&r, 0, u64::MAX, 1).is_err());
    }
}
