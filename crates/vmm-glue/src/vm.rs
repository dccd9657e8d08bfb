//! A VM of `demovm`: guest memory laid out like a small PC, vCPUs, and a COM1 serial port.

use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::serial::Serial;
use crate::soft::{SoftVcpus, Workload};
use crate::vcpu::{VcpuError, Vcpus};
use migration_ram::GuestMemoryMmap;

/// Start of the legacy hole (VGA and BIOS area), where RAM stops below 1 MiB.
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Start of RAM above the hole; the built-in workloads run from here to the top.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Names of the RAM blocks, in region order.
pub const BLOCK_NAMES: [&str; 2] = ["pc.ram.low", "pc.ram"];

/// What the guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSpec {
    /// A built-in workload.
    Builtin(Workload),
    /// A raw boot sector loaded at 0x7c00 and started in real mode (needs KVM).
    BootSector(PathBuf),
}

impl GuestSpec {
    /// Parses `builtin:ab|random|idle` or a file path.
    pub fn parse(s: &str) -> Result<GuestSpec, String> {
        match s.strip_prefix("builtin:") {
            Some(w) => Workload::parse(w)
                .map(GuestSpec::Builtin)
                .ok_or_else(|| format!("unknown built-in guest {w:?} (ab, random, idle)")),
            None => Ok(GuestSpec::BootSector(PathBuf::from(s))),
        }
    }
}

/// Which accelerator runs the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM where `/dev/kvm` works, soft vCPUs otherwise (said loudly).
    Auto,
    /// KVM only.
    Kvm,
    /// Soft vCPUs only.
    Soft,
}

/// Everything a VM is built from; source and destination must agree on it.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Top of guest-physical memory in bytes (RAM minus the legacy hole).
    pub mem_size: u64,
    /// vCPU count.
    pub vcpus: usize,
    /// The guest.
    pub guest: GuestSpec,
    /// Where COM1 output goes.
    pub serial: Option<PathBuf>,
    /// The accelerator.
    pub accel: Accel,
}

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A configuration value is unusable.
    #[error("{0}")]
    Config(String),
    /// Guest memory could not be mapped.
    #[error("cannot map {size:#x} bytes of guest memory")]
    Memory {
        /// Requested size.
        size: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The serial output file could not be opened.
    #[error("cannot open the serial output file")]
    Serial(#[source] std::io::Error),
    /// The vCPUs could not be created.
    #[error("cannot create the vCPUs")]
    Vcpus(#[source] VcpuError),
}

/// The guest-physical regions for `mem_size` bytes: below and above the legacy hole.
pub fn memory_layout(mem_size: u64) -> Result<Vec<(GuestAddress, usize)>, VmError> {
    if mem_size < 2 * HIGH_RAM_START || mem_size % 4096 != 0 {
        return Err(VmError::Config(format!(
            "--mem must be a multiple of 4 KiB and at least 2 MiB, not {mem_size:#x}"
        )));
    }
    let usize_of =
        |v: u64| usize::try_from(v).map_err(|_| VmError::Config("--mem too large".into()));
    Ok(vec![
        (GuestAddress(0), usize_of(LOW_RAM_END)?),
        (
            GuestAddress(HIGH_RAM_START),
            usize_of(mem_size - HIGH_RAM_START)?,
        ),
    ])
}

/// A running (or paused) VM.
pub struct Vm {
    /// Guest memory, shared with the migration threads.
    pub mem: Arc<GuestMemoryMmap>,
    /// The vCPUs.
    pub vcpus: Box<dyn Vcpus>,
    /// COM1.
    pub serial: Arc<Serial>,
    /// What it was built from.
    pub config: VmConfig,
    /// Why soft vCPUs run it (None once a KVM backend runs it).
    pub accel_note: Option<String>,
}

impl Vm {
    /// Builds the VM with fresh (zero) memory and paused vCPUs.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let regions = memory_layout(config.mem_size)?;
        let mem =
            Arc::new(
                GuestMemoryMmap::from_ranges(&regions).map_err(|source| VmError::Memory {
                    size: config.mem_size,
                    source,
                })?,
            );
        let serial = Arc::new(Serial::new(config.serial.as_deref()).map_err(VmError::Serial)?);
        // The KVM backend for guests is not part of this build yet: built-in guests run on
        // soft vCPUs (the same workload over the same memory), and the note says why.
        let accel_note = match (config.accel, crate::kvm::host_facts()) {
            (Accel::Soft, _) => "soft vCPUs requested with --accel soft".to_owned(),
            (Accel::Kvm, Err(e)) => {
                return Err(VmError::Config(format!(
                    "--accel kvm: KVM unusable: {}",
                    crate::error_chain(&e)
                )))
            }
            (_, Ok(_)) => {
                "KVM is usable, but this build runs built-in guests on soft vCPUs".to_owned()
            }
            (Accel::Auto, Err(e)) => {
                format!("KVM unusable ({}): soft vCPUs", crate::error_chain(&e))
            }
        };
        let vcpus: Box<dyn Vcpus> = match &config.guest {
            GuestSpec::Builtin(w) => Box::new(
                SoftVcpus::new(
                    Arc::clone(&mem),
                    Arc::clone(&serial),
                    *w,
                    config.vcpus,
                    HIGH_RAM_START,
                    config.mem_size,
                )
                .map_err(VmError::Vcpus)?,
            ),
            GuestSpec::BootSector(p) => {
                return Err(VmError::Config(format!(
                    "boot sector guest {}: needs the KVM backend, which this build does not have",
                    p.display()
                )))
            }
        };
        Ok(Vm {
            mem,
            vcpus,
            serial,
            config,
            accel_note: Some(accel_note),
        })
    }
}

/// A 64-bit content digest of `data` (word-wise multiply-rotate; not cryptographic).
fn digest_update(mut h: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
    }
    h
}

/// `(name, size, digest)` of each RAM block: derived from contents only, so equal RAM
/// gives equal answers on two hosts.
pub fn ram_digest(mem: &GuestMemoryMmap) -> Vec<(String, u64, String)> {
    let mut buf = vec![0u8; 1 << 20];
    mem.iter()
        .zip(BLOCK_NAMES)
        .map(|(region, name)| {
            let size = region.len();
            let mut h = size;
            let mut off = 0u64;
            while off < size {
                let n = usize::try_from((size - off).min(buf.len() as u64)).unwrap_or(buf.len());
                let ok = mem
                    .read_slice(&mut buf[..n], region.start_addr().unchecked_add(off))
                    .is_ok();
                h = if ok {
                    digest_update(h, &buf[..n])
                } else {
                    h ^ 0xdead
                };
                off += n as u64;
            }
            (name.to_owned(), size, format!("{h:016x}"))
        })
        .collect()
}

/// The guest-physical bytes at `start, start + stride, ...` below `end`; addresses
/// outside RAM (the hole) read as 0xff, as on a PC.
pub fn ram_sample(
    mem: &GuestMemoryMmap,
    start: u64,
    end: u64,
    stride: u64,
) -> Result<Vec<u8>, String> {
    if stride == 0 {
        return Err("stride must be at least 1".into());
    }
    let count = end.saturating_sub(start).div_ceil(stride);
    if count > 1 << 24 {
        return Err(format!(
            "{count} samples requested; at most {} per call",
            1 << 24
        ));
    }
    Ok((0..count)
        .map(|i| {
            mem.read_obj::<u8>(GuestAddress(start + i * stride))
                .unwrap_or(0xff)
        })
        .collect())
}

/// The a-b check of the `ab` workload over the first byte of each page of its memory
/// (`pages[i]` for page `i` from [`HIGH_RAM_START`]), split into the slices of `vcpus`
/// vCPUs as [`SoftVcpus`] splits them: within a slice every page's byte equals the
/// previous page's, except at most one place where it is one less (the vCPU's position).
pub fn ab_check(pages: &[u8], vcpus: usize) -> Result<(), String> {
    let vcpus = vcpus.max(1);
    let per = pages.len() / vcpus;
    for v in 0..vcpus {
        let end = if v + 1 == vcpus {
            pages.len()
        } else {
            (v + 1) * per
        };
        let slice = &pages[v * per..end];
        let mut steps = 0;
        for (i, w) in slice.windows(2).enumerate() {
            if w[1] == w[0] {
                continue;
            }
            if w[1] == w[0].wrapping_sub(1) && steps == 0 {
                steps += 1;
                continue;
            }
            return Err(format!(
                "vCPU {v}: page {} holds {}, the page before it {}",
                v * per + i + 1,
                w[1],
                w[0]
            ));
        }
    }
    Ok(())
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(T[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ab_check_accepts_one_step_per_slice() {
        assert!(ab_check(&[5, 5, 4, 4, 9, 9, 9, 8], 2).is_ok());
        assert!(ab_check(&[0, 0, 255, 255], 1).is_ok(), "the byte wraps");
        assert!(
            ab_check(&[5, 4, 4, 3], 1).is_err(),
            "two steps in one slice"
        );
        assert!(
            ab_check(&[5, 6, 6, 6], 1).is_err(),
            "a page ahead of the one before"
        );
        assert!(ab_check(&[5, 3, 3, 3], 1).is_err(), "a step of two");
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn layout_has_the_hole_and_checks_sizes() {
        let l = memory_layout(64 << 20).unwrap();
        assert_eq!(
            l,
            vec![
                (GuestAddress(0), 0xa_0000),
                (GuestAddress(0x10_0000), (64 << 20) - 0x10_0000)
            ]
        );
        assert!(memory_layout(1 << 20).is_err());
        assert!(memory_layout((64 << 20) + 1).is_err());
    }

    #[test]
    fn digest_and_sample_see_contents() {
        let mem = GuestMemoryMmap::from_ranges(&memory_layout(4 << 20).unwrap()).unwrap();
        let d0 = ram_digest(&mem);
        assert_eq!(d0.len(), 2);
        assert_eq!(d0[1].0, "pc.ram");
        mem.write_obj(7u8, GuestAddress(0x20_0000)).unwrap();
        let d1 = ram_digest(&mem);
        assert_eq!(d0[0], d1[0]);
        assert_ne!(d0[1], d1[1]);
        let s = ram_sample(&mem, 0x1f_f000, 0x20_2000, 0x1000).unwrap();
        assert_eq!(s, vec![0, 7, 0]);
        assert_eq!(
            ram_sample(&mem, 0xa_0000, 0xa_0001, 1).unwrap(),
            vec![0xff],
            "hole"
        );
        assert!(ram_sample(&mem, 0, 10, 0).is_err());
    }
}
