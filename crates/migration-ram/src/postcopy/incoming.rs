//! [`PostcopyIncoming`]: the destination's postcopy pieces, in their order.

use std::sync::Arc;

use migration_stream::{BlockId, DiscardRange};
use uffd_sys::{MlockMode, Uffd};

use super::{check_support, Discarder, FaultHandler, FaultStats, MunlockGuard, PageRequestSink};
use crate::balloon::{BalloonInhibitor, InhibitGuard};
use crate::block::RamBlocks;
use crate::error::{Error, Result};
use crate::placer::PagePlacer;
use crate::GuestMemoryMmap;

/// One incoming postcopy migration, from the source's `Advise` to its
/// `Complete`: the support check, the discards, fault handling, and what
/// must be undone at the end (huge page advice, memory locking, balloon
/// inhibition), in that order.
///
/// ```text
///  new ──> unlock_memory? ──> discard* ──> listen ──> finish
///   │                                        │          │
///   └─ check_support                         │          └─ fault handling ends, THP advised on,
///                                            │             memory locked again, balloon free
///                                            └─ balloon inhibited, blocks registered,
///                                               fault thread; returns the placer
/// ```
///
/// Dropping it undoes the same things in the same order (fault handling
/// first: locking memory again populates it, which must not wait on
/// missing pages).
#[derive(Debug)]
pub struct PostcopyIncoming {
    // Field order is drop order: fault handling ends first.
    handler: Option<FaultHandler>,
    discarder: Discarder,
    munlock: Option<MunlockGuard>,
    balloon: Option<InhibitGuard>,
    mem: Arc<GuestMemoryMmap>,
    blocks: Arc<RamBlocks>,
    uffd: Arc<Uffd>,
}

impl PostcopyIncoming {
    /// Checks that this host can serve postcopy for `blocks` of `mem` (see
    /// [`check_support`]); `blocks` are the loader's blocks.
    pub fn new(mem: Arc<GuestMemoryMmap>, blocks: Arc<RamBlocks>) -> Result<Self> {
        let uffd = check_support(&mem, &blocks)?;
        Ok(Self::with_uffd(mem, blocks, uffd))
    }

    /// As [`new`](PostcopyIncoming::new), with a userfaultfd the caller
    /// checked itself.
    pub fn with_uffd(mem: Arc<GuestMemoryMmap>, blocks: Arc<RamBlocks>, uffd: Arc<Uffd>) -> Self {
        PostcopyIncoming {
            handler: None,
            discarder: Discarder::new(Arc::clone(&mem), Arc::clone(&blocks)),
            munlock: None,
            balloon: None,
            mem,
            blocks,
            uffd,
        }
    }

    /// The blocks postcopy works over (the loader must use the same ones:
    /// their received bitmaps are the record of what landed).
    pub fn blocks(&self) -> &Arc<RamBlocks> {
        &self.blocks
    }

    /// The userfaultfd postcopy uses.
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    fn before_listen(&self, op: &'static str) -> Result<()> {
        if self.handler.is_some() {
            return Err(Error::InvalidState {
                op,
                state: "listening",
            });
        }
        Ok(())
    }

    /// The VMM had locked guest memory with `mode`: unlocks the blocks until
    /// [`finish`](PostcopyIncoming::finish), which locks them again. Call it
    /// before the first discard.
    pub fn unlock_memory(&mut self, mode: MlockMode) -> Result<()> {
        self.before_listen("unlock_memory")?;
        if self.munlock.is_none() {
            self.munlock = Some(MunlockGuard::unlock(
                Arc::clone(&self.mem),
                &self.blocks,
                mode,
            )?);
        }
        Ok(())
    }

    /// Applies a `Discard` command (see [`Discarder::discard`]). Only before
    /// [`listen`](PostcopyIncoming::listen).
    pub fn discard(&mut self, block: BlockId, ranges: &[DiscardRange]) -> Result<u64> {
        self.before_listen("discard")?;
        self.discarder.discard(block, ranges)
    }

    /// `Listen`: inhibits `balloon` (if the VMM has one), registers the blocks
    /// and starts the fault thread (see [`FaultHandler::start`]). Returns the
    /// placer the loader must use from now on.
    pub fn listen(
        &mut self,
        sink: Arc<dyn PageRequestSink>,
        vcpu_tids: Vec<u32>,
        balloon: Option<&Arc<BalloonInhibitor>>,
    ) -> Result<Arc<dyn PagePlacer>> {
        self.before_listen("listen")?;
        let guard = balloon.map(BalloonInhibitor::inhibit);
        let handler = FaultHandler::start(
            Arc::clone(&self.uffd),
            Arc::clone(&self.mem),
            Arc::clone(&self.blocks),
            sink,
            vcpu_tids,
        )?;
        let placer = handler.placer();
        self.handler = Some(handler);
        self.balloon = guard;
        Ok(placer)
    }

    /// The fault handler, once listening.
    pub fn handler(&self) -> Option<&FaultHandler> {
        self.handler.as_ref()
    }

    /// What fault handling has done so far; `None` before
    /// [`listen`](PostcopyIncoming::listen).
    pub fn stats(&self) -> Option<FaultStats> {
        self.handler.as_ref().map(FaultHandler::stats)
    }

    /// Pages not received yet.
    pub fn missing_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.pages() - b.received().count())
            .sum()
    }

    /// `Complete`: ends fault handling ([`FaultHandler::finish`]), advises
    /// huge pages on again, locks memory again if it was unlocked, and lets
    /// the balloon discard again. Every step runs; the first error is
    /// returned. Without [`listen`](PostcopyIncoming::listen), only the undo
    /// steps run and the figures are empty.
    pub fn finish(mut self) -> Result<FaultStats> {
        let stats = self
            .handler
            .take()
            .map_or(Ok(FaultStats::default()), FaultHandler::finish);
        let thp = self
            .discarder
            .take_thp_guard()
            .map_or(Ok(()), super::ThpGuard::restore);
        let relock = self.munlock.take().map_or(Ok(()), MunlockGuard::relock);
        self.balloon = None;
        let stats = stats?;
        thp?;
        relock?;
        Ok(stats)
    }
}
