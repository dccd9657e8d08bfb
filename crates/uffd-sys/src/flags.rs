//! Typed bit sets over the raw ABI values: API features, supported ioctls and register
//! modes.
//!
//! Unknown bits are kept (`from_bits_retain`), so a newer kernel's features are reported
//! as `unknown(0x..)` rather than dropped.

use std::fmt;

use bitflags::bitflags;

use crate::abi;

bitflags! {
    /// `UFFD_FEATURE_*`: what the kernel supports, or what a handle negotiated.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
        const PAGEFAULT_FLAG_WP = 1 << 0;
        /// `fork()` of the registering process is reported, with a new descriptor.
        const EVENT_FORK = 1 << 1;
        /// `mremap()` of a registered range is reported.
        const EVENT_REMAP = 1 << 2;
        /// `madvise(MADV_DONTNEED/REMOVE)` on a registered range is reported.
        const EVENT_REMOVE = 1 << 3;
        /// MISSING registration of hugetlbfs memory.
        const MISSING_HUGETLBFS = 1 << 4;
        /// MISSING registration of shmem (memfd, tmpfs) memory.
        const MISSING_SHMEM = 1 << 5;
        /// `munmap()` of a registered range is reported.
        const EVENT_UNMAP = 1 << 6;
        /// Faults raise SIGBUS instead of being queued.
        const SIGBUS = 1 << 7;
        /// Page faults carry the faulting thread id.
        const THREAD_ID = 1 << 8;
        /// MINOR registration of hugetlbfs memory.
        const MINOR_HUGETLBFS = 1 << 9;
        /// MINOR registration of shmem memory.
        const MINOR_SHMEM = 1 << 10;
        /// Fault addresses are exact, not page-aligned.
        const EXACT_ADDRESS = 1 << 11;
        /// WP registration of hugetlbfs and shmem memory.
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        /// Write-protecting unpopulated (never touched) pages protects them too.
        const WP_UNPOPULATED = 1 << 13;
        /// `UFFDIO_POISON` is available.
        const POISON = 1 << 14;
        /// Write faults are resolved by the kernel itself (dirty tracking via PAGEMAP_SCAN).
        const WP_ASYNC = 1 << 15;
        /// `UFFDIO_MOVE` is available.
        const MOVE = 1 << 16;
    }
}

bitflags! {
    /// Which ioctls a handle (from UFFDIO_API) or a registered range (from
    /// UFFDIO_REGISTER) supports: bit N is ioctl number N.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << abi::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << abi::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << abi::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << abi::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << abi::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << abi::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << abi::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << abi::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << abi::_UFFDIO_POISON;
        /// `UFFDIO_API`.
        const API = 1 << abi::_UFFDIO_API;
    }
}

bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults of a range are reported.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct RegisterMode: u64 {
        /// Faults on pages that are not present.
        const MISSING = abi::UFFDIO_REGISTER_MODE_MISSING;
        /// Writes to write-protected pages.
        const WP = abi::UFFDIO_REGISTER_MODE_WP;
        /// Faults on pages present in the page cache but not mapped (shmem, hugetlbfs).
        const MINOR = abi::UFFDIO_REGISTER_MODE_MINOR;
    }
}

/// Writes the set names separated by `|`, unknown bits as `unknown(0x..)`, and `none`
/// for the empty set.
fn write_names<B: bitflags::Flags<Bits = u64>>(f: &mut fmt::Formatter<'_>, v: &B) -> fmt::Result {
    let mut first = true;
    let mut sep = |f: &mut fmt::Formatter<'_>| {
        if first {
            first = false;
            Ok(())
        } else {
            f.write_str("|")
        }
    };
    for (name, _) in v.iter_names() {
        sep(f)?;
        f.write_str(name)?;
    }
    let unknown = v.bits() & !B::all().bits();
    if unknown != 0 {
        sep(f)?;
        write!(f, "unknown({unknown:#x})")?;
    }
    if v.bits() == 0 {
        f.write_str("none")?;
    }
    Ok(())
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_names(f, self)
    }
}

impl fmt::Display for Ioctls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_names(f, self)
    }
}

impl fmt::Display for RegisterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_names(f, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_lists_names_and_keeps_unknown_bits() {
        let f = Features::from_bits_retain(
            Features::WP_UNPOPULATED.bits() | Features::MOVE.bits() | (1 << 40),
        );
        assert_eq!(f.to_string(), "WP_UNPOPULATED|MOVE|unknown(0x10000000000)");
        assert_eq!(Features::empty().to_string(), "none");
        assert_eq!(
            (RegisterMode::MISSING | RegisterMode::WP).to_string(),
            "MISSING|WP"
        );
    }

    #[test]
    fn ioctl_bits_are_the_ioctl_numbers() {
        assert_eq!(Ioctls::COPY.bits(), 1 << 3);
        assert_eq!(Ioctls::API.bits(), 1 << 0x3f);
        assert_eq!(Ioctls::CONTINUE.bits(), 1 << 7);
    }
}
