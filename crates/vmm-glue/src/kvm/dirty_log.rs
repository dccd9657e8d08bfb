//! KVM's dirty-page tracking as [`DirtyLog`]s: the bitmap
//! ([`KvmDirtyLog`]) and the dirty ring ([`KvmDirtyRing`]).
//!
//! Both see the writes the vCPUs make (and KVM makes for them), never the
//! VMM's own writes: [`KvmVm::dirty_log`](super::KvmVm::dirty_log) merges
//! them with a [`migration_ram::VmmDirtyLog`] for that.
//!
//! KVM tracks 4 KiB pages of each memory slot. A sync maps each dirty KVM
//! page to the block page holding it (by guest address), so blocks with
//! larger pages (2 MiB on hugetlbfs) get a bit per block page.
//!
//! # Bitmap
//!
//! `start` registers every slot again with `KVM_MEM_LOG_DIRTY_PAGES`, `stop`
//! without. `sync` reads each slot's bitmap with `KVM_GET_DIRTY_LOG`.
//! Without manual protect that call also clears the bitmap and
//! write-protects the slot. With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (on
//! whenever the host offers it, with `KVM_DIRTY_LOG_INITIALLY_SET` where
//! offered) it does neither: a reported page stays dirty and writable in
//! KVM until `clear` re-protects exactly the pages the caller took, just
//! before it reads them for sending (a sync in between reports the page
//! again, which finds its bit already set). A page written again before it
//! is sent costs no second protection fault, and each `KVM_CLEAR_DIRTY_LOG`
//! holds KVM's MMU lock for one chunk only.
//! `KVM_CLEAR_DIRTY_LOG` wants `first_page` a multiple of 64 and
//! `num_pages` one too unless the range ends the slot: each call covers the
//! 64-aligned span around the chunk, with bits set only for the chunk's
//! pages (KVM re-protects only pages whose bit is set).
//!
//! # Ring
//!
//! With the ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL` where offered, else
//! `KVM_CAP_DIRTY_LOG_RING`, chosen by [`KvmVmConfig`](super::KvmVmConfig)),
//! each vCPU has a ring of `kvm_dirty_gfn` mapped from its fd at page
//! `KVM_DIRTY_LOG_PAGE_OFFSET`. Harvesting walks a ring in order from where
//! the last harvest stopped, reading each entry's flags with an acquire
//! load, and stops at the first entry not marked dirty; a dirty entry's
//! page goes to a pending bitmap and its flags get the RESET bit with a
//! release store. `KVM_RESET_DIRTY_RINGS` then recycles the harvested
//! entries and write-protects their pages again, before `sync` returns, so
//! before any harvested page is read for sending. `sync` first kicks the
//! running vCPUs out of `KVM_RUN` and waits for each to leave it (CPU
//! buffers, PML, reach the ring at an exit). A vCPU whose ring fills exits
//! with `KVM_EXIT_DIRTY_RING_FULL`; its thread harvests its own ring into
//! the pending bitmap, resets, and runs on: the guest never waits for the
//! migration thread. A host without the ring falls back to the bitmap
//! where the configuration allows it (it says so in the log).

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VcpuFd;
use migration_ram::{DirtyLog, Error, RamBlocks, TakenPages};
use parking_lot::Mutex;

use super::abi::{self, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET};
use super::vcpu::KvmVcpus;
use super::vm::{Slot, VmShared};
use super::KvmError;

/// The page KVM tracks.
const KVM_PAGE: u64 = 4096;

/// The geometry of a block, as the last `sync` saw it: (guest address,
/// size, page size).
type BlockGeometry = (u64, u64, u64);

fn geometry(blocks: &RamBlocks) -> Vec<BlockGeometry> {
    blocks
        .iter()
        .map(|b| (b.guest_addr().0, b.size(), u64::from(b.page_size())))
        .collect()
}

/// ORs a slot's dirty bits (one per 4 KiB page from the slot's start) into
/// the blocks it overlaps; returns the block pages newly marked.
fn merge(blocks: &RamBlocks, slot: &Slot, words: &[u64]) -> u64 {
    let mut newly = 0;
    for block in blocks {
        let (b_start, b_size) = (block.guest_addr().0, block.size());
        let b_end = b_start + b_size;
        let s_end = slot.guest_addr + slot.size;
        if b_start >= s_end || slot.guest_addr >= b_end {
            continue;
        }
        let page = u64::from(block.page_size());
        let dirty = block.dirty();
        // Fast path: 4 KiB block pages starting on a bitmap word of the slot.
        if page == KVM_PAGE && b_start >= slot.guest_addr {
            let off = (b_start - slot.guest_addr) / KVM_PAGE;
            if off % 64 == 0 {
                let base = usize::try_from(off / 64).unwrap_or(usize::MAX);
                newly += (0..dirty.words())
                    .map(|i| {
                        let bits = words.get(base.saturating_add(i)).copied().unwrap_or(0);
                        dirty.or_word(i, bits)
                    })
                    .sum::<u64>();
                continue;
            }
        }
        for (w, &bits) in words.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let bit = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let addr = slot.guest_addr + bit * KVM_PAGE;
                if (b_start..b_end).contains(&addr) {
                    newly += u64::from(dirty.set((addr - b_start) / page));
                }
            }
        }
    }
    newly
}

fn sync_err(e: KvmError) -> Error {
    Error::dirty_log("sync", e)
}

/// KVM's dirty bitmap (`KVM_GET_DIRTY_LOG`, and `KVM_CLEAR_DIRTY_LOG` with
/// manual protect): see the module documentation.
pub struct KvmDirtyLog {
    vm: Arc<VmShared>,
    blocks: Mutex<Vec<BlockGeometry>>,
}

impl std::fmt::Debug for KvmDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyLog")
            .field("slots", &self.vm.slots.len())
            .field("manual_protect", &self.vm.manual_protect)
            .finish()
    }
}

impl KvmDirtyLog {
    pub(crate) fn new(vm: Arc<VmShared>) -> Self {
        KvmDirtyLog {
            vm,
            blocks: Mutex::new(Vec::new()),
        }
    }

    fn manual(&self) -> bool {
        self.vm.manual_protect != 0
    }

    /// `KVM_CLEAR_DIRTY_LOG` for KVM pages `[first, first + n)` of `slot`
    /// whose bits are set in `bits` (bit 0 = page `first`); `first` must be
    /// a multiple of 64.
    fn clear_slot(
        &self,
        slot: &Slot,
        first: u64,
        n: u64,
        bits: &mut [u64],
    ) -> Result<(), KvmError> {
        let op = || {
            format!(
                "KVM_CLEAR_DIRTY_LOG slot {} pages {first:#x}+{n:#x}",
                slot.id
            )
        };
        let num_pages = u32::try_from(n).map_err(|_| KvmError::Config { why: op() })?;
        if bits.len() as u64 * 64 < n || first % 64 != 0 {
            return Err(KvmError::Config { why: op() });
        }
        let mut arg = kvm_clear_dirty_log {
            slot: slot.id,
            num_pages,
            first_page: first,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
        // SAFETY: KVM_CLEAR_DIRTY_LOG (number and struct layout asserted in
        // `abi`) on the VM fd: it reads `arg` and `num_pages` bits from
        // `dirty_bitmap`, which points to `bits`, at least `n` bits long
        // (checked above) and alive for the call; KVM may clear bits of the
        // bitmap in place, which `&mut` allows. `first` is 64-aligned and
        // `n` is 64-aligned or reaches the slot's end (callers).
        let r = unsafe {
            libc::ioctl(
                self.vm.fd.as_raw_fd(),
                abi::KVM_CLEAR_DIRTY_LOG as _,
                &mut arg as *mut kvm_clear_dirty_log,
            )
        };
        if r < 0 {
            return Err(KvmError::Ioctl {
                op: op(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl DirtyLog for KvmDirtyLog {
    fn start(&self) -> migration_ram::Result<()> {
        self.vm
            .set_slot_flags(KVM_MEM_LOG_DIRTY_PAGES)
            .map_err(|e| Error::dirty_log("start", e))
    }

    fn sync(&self, blocks: &RamBlocks) -> migration_ram::Result<u64> {
        *self.blocks.lock() = geometry(blocks);
        if !self.vm.logging() {
            return Err(Error::dirty_log("sync", "dirty logging is not started"));
        }
        let mut newly = 0;
        for slot in &self.vm.slots {
            let size = usize::try_from(slot.size).unwrap_or(usize::MAX);
            let mut bits = self.vm.fd.get_dirty_log(slot.id, size).map_err(|e| {
                sync_err(KvmError::ioctl(
                    format!("KVM_GET_DIRTY_LOG slot {}", slot.id),
                    e,
                ))
            })?;
            if bits.iter().all(|&w| w == 0) {
                continue;
            }
            // With manual protect the reported pages stay dirty (and writable)
            // in KVM until `clear` re-protects each one just before it is read:
            // a page written again before it is sent costs no second fault,
            // and a later sync reporting it again only finds its bit set.
            newly += merge(blocks, slot, &bits);
            bits.clear();
        }
        Ok(newly)
    }

    fn clear(&self, index: usize, pages: &TakenPages) -> migration_ram::Result<()> {
        if !self.manual() || pages.is_empty() {
            return Ok(());
        }
        let geom = self.blocks.lock().get(index).copied();
        let Some((b_addr, b_size, b_page)) = geom else {
            return Err(Error::dirty_log(
                "clear",
                format!("no block {index} in the last sync"),
            ));
        };
        // The KVM pages of exactly the block pages taken: a page beside them
        // may hold a write no sync has reported yet, and must keep its bit.
        let lo = b_addr.saturating_add(pages.start().saturating_mul(b_page));
        let hi = b_addr
            .saturating_add(pages.end().saturating_mul(b_page))
            .min(b_addr + b_size);
        for slot in &self.vm.slots {
            let s_end = slot.guest_addr + slot.size;
            let (lo, hi) = (lo.max(slot.guest_addr), hi.min(s_end));
            if lo >= hi {
                continue;
            }
            let slot_pages = slot.size / KVM_PAGE;
            let p0 = (lo - slot.guest_addr) / KVM_PAGE;
            let p1 = (hi - slot.guest_addr).div_ceil(KVM_PAGE);
            let a0 = p0 & !63;
            let a1 = p1.next_multiple_of(64).min(slot_pages);
            let mut bits = vec![0u64; usize::try_from((a1 - a0).div_ceil(64)).unwrap_or(0)];
            let mut any = false;
            for page in pages {
                let start = b_addr + page * b_page;
                let (g0, g1) = (start.max(slot.guest_addr), (start + b_page).min(s_end));
                if g0 >= g1 {
                    continue;
                }
                for p in
                    (g0 - slot.guest_addr) / KVM_PAGE..(g1 - slot.guest_addr).div_ceil(KVM_PAGE)
                {
                    let b = p - a0;
                    bits[(b / 64) as usize] |= 1 << (b % 64);
                    any = true;
                }
            }
            if any {
                self.clear_slot(slot, a0, a1 - a0, &mut bits)
                    .map_err(|e| Error::dirty_log("clear", e))?;
            }
        }
        Ok(())
    }

    fn stop(&self) -> migration_ram::Result<()> {
        self.vm
            .set_slot_flags(0)
            .map_err(|e| Error::dirty_log("stop", e))
    }
}

/// One vCPU's mapped ring and where its next harvest starts.
struct Ring {
    ptr: NonNull<kvm_dirty_gfn>,
    bytes: usize,
    entries: u32,
    next: u32,
}

// SAFETY: the ring is shared memory owned by this value; the entries are
// only accessed through `RingShared`'s per-ring mutex (flags atomically,
// as the kernel writes them concurrently).
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map_vcpu` made, which nothing
        // refers to any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// The rings of a VM and the pages harvested from them.
pub(crate) struct RingShared {
    vm: Arc<VmShared>,
    rings: Vec<Mutex<Option<Ring>>>,
    /// Harvested, not yet synced: per slot, a bit per KVM page.
    pending: Vec<Vec<AtomicU64>>,
}

impl RingShared {
    pub(crate) fn new(vm: &Arc<VmShared>, vcpus: usize) -> Self {
        let pending = vm
            .slots
            .iter()
            .map(|s| {
                (0..(s.size / KVM_PAGE).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        RingShared {
            vm: vm.clone(),
            rings: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            pending,
        }
    }

    /// Maps vCPU `index`'s ring from its fd.
    pub(crate) fn map_vcpu(&self, index: usize, fd: &VcpuFd) -> Result<(), KvmError> {
        let bytes = self.vm.ring_bytes as usize;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a fresh shared mapping of the vCPU fd at the dirty ring's
        // offset, of the ring's size as enabled on the VM; the kernel picks
        // the address. Checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::Ioctl {
                op: format!("mmap of vCPU {index}'s dirty ring ({bytes} bytes)"),
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<kvm_dirty_gfn>()).ok_or_else(|| KvmError::Config {
            why: "mmap of the dirty ring returned NULL".into(),
        })?;
        let entries = u32::try_from(bytes / std::mem::size_of::<kvm_dirty_gfn>()).unwrap_or(0);
        *self.rings[index].lock() = Some(Ring {
            ptr,
            bytes,
            entries,
            next: 0,
        });
        Ok(())
    }

    /// Harvests vCPU `index`'s ring into the pending bitmap; returns the
    /// entries harvested.
    fn harvest(&self, index: usize) -> u64 {
        let mut guard = self.rings[index].lock();
        let Some(ring) = guard.as_mut() else {
            return 0;
        };
        let mut n = 0;
        // At most one lap: past it every entry is one this walk harvested.
        while n < u64::from(ring.entries) {
            let i = (ring.next % ring.entries) as usize;
            // SAFETY: `i < entries`, so the entry lies inside the mapping,
            // which lives as long as `ring`. Its flags word is accessed only
            // atomically (the kernel writes it concurrently), and
            // `AtomicU32` has the layout of `u32`.
            let entry = unsafe { ring.ptr.as_ptr().add(i) };
            // SAFETY: as above; `flags` is at offset 0 (asserted in `abi`).
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            let f = flags.load(Ordering::Acquire);
            // Only "dirty" (01) is to harvest; "harvested" (1X) waits for
            // KVM_RESET_DIRTY_RINGS, "unused" (00) is where KVM stopped.
            if f & (KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET) != KVM_DIRTY_GFN_F_DIRTY {
                break;
            }
            // SAFETY: as above; the acquire load of a DIRTY flag makes the
            // kernel's writes of `slot` and `offset` visible, and it does
            // not touch them again until the entry is reset.
            let (slot, offset) = unsafe {
                (
                    std::ptr::addr_of!((*entry).slot).read_volatile(),
                    std::ptr::addr_of!((*entry).offset).read_volatile(),
                )
            };
            // Slot bits 16-31 are the address space: only 0 is used.
            if slot >> 16 == 0 {
                if let Some(words) = self.pending.get((slot & 0xffff) as usize) {
                    if let Some(w) = words.get((offset / 64) as usize) {
                        w.fetch_or(1 << (offset % 64), Ordering::AcqRel);
                    }
                }
            }
            flags.store(f | KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            ring.next = ring.next.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// `KVM_RESET_DIRTY_RINGS`: recycles the harvested entries and
    /// re-protects their pages.
    fn reset(&self) -> Result<(), KvmError> {
        // SAFETY: KVM_RESET_DIRTY_RINGS (number asserted in `abi`) on the VM
        // fd takes no argument and touches only the kernel's rings.
        let r = unsafe { libc::ioctl(self.vm.fd.as_raw_fd(), abi::KVM_RESET_DIRTY_RINGS as _, 0) };
        if r < 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_RESET_DIRTY_RINGS".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// On `KVM_EXIT_DIRTY_RING_FULL`, on the vCPU's thread: harvests its
    /// ring and resets; returns the entries harvested.
    pub(crate) fn harvest_full(&self, index: usize) -> Result<u64, KvmError> {
        let n = self.harvest(index);
        self.reset()?;
        Ok(n)
    }

    fn harvest_all(&self) -> Result<(), KvmError> {
        let mut n = 0;
        for i in 0..self.rings.len() {
            n += self.harvest(i);
        }
        if n > 0 {
            self.reset()?;
        }
        Ok(())
    }
}

/// KVM's dirty ring: see the module documentation.
pub struct KvmDirtyRing {
    ring: Arc<RingShared>,
    vcpus: Weak<KvmVcpus>,
}

impl std::fmt::Debug for KvmDirtyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyRing")
            .field("vcpus", &self.ring.rings.len())
            .field("ring_bytes", &self.ring.vm.ring_bytes)
            .finish()
    }
}

impl KvmDirtyRing {
    pub(crate) fn new(ring: Arc<RingShared>, vcpus: Arc<KvmVcpus>) -> Self {
        KvmDirtyRing {
            ring,
            vcpus: Arc::downgrade(&vcpus),
        }
    }

    /// Harvests everything and forgets it.
    fn drain(&self) -> Result<(), KvmError> {
        self.ring.harvest_all()?;
        for words in &self.ring.pending {
            for w in words {
                w.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl DirtyLog for KvmDirtyRing {
    fn start(&self) -> migration_ram::Result<()> {
        self.ring
            .vm
            .set_slot_flags(KVM_MEM_LOG_DIRTY_PAGES)
            .and_then(|()| self.drain())
            .map_err(|e| Error::dirty_log("start", e))
    }

    fn sync(&self, blocks: &RamBlocks) -> migration_ram::Result<u64> {
        if let Some(v) = self.vcpus.upgrade() {
            v.kick_and_wait_exits();
        }
        self.ring.harvest_all().map_err(sync_err)?;
        let mut newly = 0;
        for (slot, words) in self.ring.vm.slots.iter().zip(&self.ring.pending) {
            let taken: Vec<u64> = words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect();
            if taken.iter().any(|&w| w != 0) {
                newly += merge(blocks, slot, &taken);
            }
        }
        Ok(newly)
    }

    /// The ring re-protects pages when `sync` resets it: nothing to do.
    fn clear(&self, _: usize, _: &TakenPages) -> migration_ram::Result<()> {
        Ok(())
    }

    fn stop(&self) -> migration_ram::Result<()> {
        self.ring
            .vm
            .set_slot_flags(0)
            .and_then(|()| self.drain())
            .map_err(|e| Error::dirty_log("stop", e))
    }
}
