//! Balloon inhibition: keeping a balloon device from discarding guest pages
//! while something relies on every page staying where it is.
//!
//! A virtio-balloon device discards the pages the guest gives back
//! (`MADV_DONTNEED`, or a hole punched in the memory file). During postcopy
//! that is wrong twice over on the destination: a page the balloon dropped
//! reads as missing and would be taken for a page the source has not sent yet
//! (a request for a page the guest gave away, or a zero page where the
//! source's bytes belong), and the balloon races with the pages being placed.
//! QEMU inhibits its balloon for the whole postcopy; so does this crate's
//! postcopy destination, through a [`BalloonInhibitor`] the VMM shares with
//! its balloon device.
//!
//! # For a VMM's balloon device
//!
//! Hold the VMM's one `Arc<BalloonInhibitor>` in the balloon device. For each
//! inflate request, ask for a [`DiscardPermit`] with
//! [`BalloonInhibitor::try_discard`] and discard the pages only while holding
//! it; without one (inhibited), acknowledge the request and leave the pages
//! in place (the guest no longer uses them; they can be discarded later, or
//! never). The permit makes the check and the discard one step: once
//! [`inhibit`](BalloonInhibitor::inhibit) returns, no discard runs and none
//! can start until the guard drops. A device that only needs to know (to
//! report it, say) asks [`is_inhibited`](BalloonInhibitor::is_inhibited).
//!
//! Everything is one atomic word: asking costs a load, a permit a
//! compare-and-swap.
//!
//! ```
//! use std::sync::Arc;
//!
//! use migration_ram::balloon::BalloonInhibitor;
//!
//! let inhibitor = Arc::new(BalloonInhibitor::new());
//! // The balloon device, on an inflate request:
//! if let Some(_permit) = inhibitor.try_discard() {
//!     // madvise(MADV_DONTNEED) the pages here.
//! }
//! // Postcopy, on the destination:
//! let guard = inhibitor.inhibit();
//! assert!(inhibitor.is_inhibited());
//! assert!(inhibitor.try_discard().is_none());
//! drop(guard);
//! assert!(!inhibitor.is_inhibited());
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bits of the word that count inhibitors; the rest count discards running.
const INHIBIT_SHIFT: u32 = 32;
const DISCARDS: u64 = (1 << INHIBIT_SHIFT) - 1;

/// Counts who inhibits the balloon and which discards are running; see the
/// [module docs](self).
#[derive(Debug, Default)]
pub struct BalloonInhibitor {
    /// Inhibitors in the high half, running discards in the low half.
    state: AtomicU64,
}

impl BalloonInhibitor {
    /// An inhibitor nobody holds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inhibits the balloon until the guard drops (counted: the balloon is
    /// free again when the last guard drops). Waits for discards already
    /// running to end (they are single system calls), so that none runs once
    /// this returns.
    pub fn inhibit(self: &Arc<Self>) -> InhibitGuard {
        self.state.fetch_add(1 << INHIBIT_SHIFT, Ordering::AcqRel);
        while self.state.load(Ordering::Acquire) & DISCARDS != 0 {
            std::thread::yield_now();
        }
        InhibitGuard {
            inhibitor: Arc::clone(self),
        }
    }

    /// Whether anybody inhibits the balloon now.
    pub fn is_inhibited(&self) -> bool {
        self.state.load(Ordering::Acquire) >> INHIBIT_SHIFT != 0
    }

    /// How many guards inhibit the balloon now.
    pub fn inhibitors(&self) -> u64 {
        self.state.load(Ordering::Acquire) >> INHIBIT_SHIFT
    }

    /// A permit to discard balloon pages, unless the balloon is inhibited. The
    /// discard must happen while the permit is held, and be short:
    /// [`inhibit`](BalloonInhibitor::inhibit) waits for it.
    pub fn try_discard(&self) -> Option<DiscardPermit<'_>> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            if cur >> INHIBIT_SHIFT != 0 || cur & DISCARDS == DISCARDS {
                return None;
            }
            match self.state.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(DiscardPermit { inhibitor: self }),
                Err(seen) => cur = seen,
            }
        }
    }
}

/// Keeps the balloon inhibited while it lives; see
/// [`BalloonInhibitor::inhibit`].
#[derive(Debug)]
#[must_use = "the balloon is inhibited only while the guard lives"]
pub struct InhibitGuard {
    inhibitor: Arc<BalloonInhibitor>,
}

impl InhibitGuard {
    /// The inhibitor this guard holds.
    pub fn inhibitor(&self) -> &Arc<BalloonInhibitor> {
        &self.inhibitor
    }
}

impl Drop for InhibitGuard {
    fn drop(&mut self) {
        self.inhibitor
            .state
            .fetch_sub(1 << INHIBIT_SHIFT, Ordering::AcqRel);
    }
}

/// A balloon discard in progress; see [`BalloonInhibitor::try_discard`].
#[derive(Debug)]
#[must_use = "the discard is allowed only while the permit lives"]
pub struct DiscardPermit<'a> {
    inhibitor: &'a BalloonInhibitor,
}

impl Drop for DiscardPermit<'_> {
    fn drop(&mut self) {
        self.inhibitor.state.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn guards_are_counted() {
        let b = Arc::new(BalloonInhibitor::new());
        assert!(!b.is_inhibited());
        let g1 = b.inhibit();
        let g2 = b.inhibit();
        assert_eq!(b.inhibitors(), 2);
        drop(g1);
        assert!(b.is_inhibited(), "one guard still holds it");
        assert!(b.try_discard().is_none());
        assert!(Arc::ptr_eq(g2.inhibitor(), &b));
        drop(g2);
        assert!(!b.is_inhibited());
        assert_eq!(b.inhibitors(), 0);
        let p1 = b.try_discard().unwrap();
        let p2 = b.try_discard().unwrap();
        drop((p1, p2));
        assert!(!b.is_inhibited());
    }

    #[test]
    fn inhibit_waits_for_running_discards() {
        let b = Arc::new(BalloonInhibitor::new());
        let permit = b.try_discard().unwrap();
        let inhibited = Arc::new(AtomicBool::new(false));
        let t = {
            let (b, inhibited) = (Arc::clone(&b), Arc::clone(&inhibited));
            std::thread::spawn(move || {
                let g = b.inhibit();
                inhibited.store(true, Ordering::SeqCst);
                g
            })
        };
        // The inhibitor counts at once, so no new discard starts...
        while !b.is_inhibited() {
            std::thread::yield_now();
        }
        assert!(b.try_discard().is_none());
        // ...but inhibit() returns only once the running one ends.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!inhibited.load(Ordering::SeqCst));
        drop(permit);
        let guard = t.join().unwrap();
        assert!(inhibited.load(Ordering::SeqCst));
        assert!(b.is_inhibited());
        drop(guard);
        assert!(b.try_discard().is_some());
    }

    #[test]
    fn no_discard_runs_while_inhibited() {
        // Balloon threads discard in a loop; a "postcopy" thread inhibits and
        // checks that no discard is ever in progress while it holds the guard.
        let b = Arc::new(BalloonInhibitor::new());
        let in_discard = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let balloons: Vec<_> = (0..2)
            .map(|_| {
                let (b, in_discard, stop) = (b.clone(), in_discard.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut done = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(_p) = b.try_discard() {
                            in_discard.fetch_add(1, Ordering::SeqCst);
                            std::hint::spin_loop();
                            in_discard.fetch_sub(1, Ordering::SeqCst);
                            done += 1;
                        }
                    }
                    done
                })
            })
            .collect();
        for _ in 0..200 {
            let g = b.inhibit();
            for _ in 0..50 {
                assert_eq!(in_discard.load(Ordering::SeqCst), 0);
            }
            drop(g);
        }
        stop.store(true, Ordering::Relaxed);
        for t in balloons {
            t.join().unwrap();
        }
        assert!(!b.is_inhibited());
    }
}
