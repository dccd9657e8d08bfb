//! Checking guest RAM from the outside: a SHA-256 digest per RAM region (equal
//! RAM gives equal digests on two hosts) and byte samples at a stride.
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
