//! Events read from a userfaultfd: page faults and the non-cooperative events.

use std::os::fd::{FromRawFd, OwnedFd};

use crate::abi::{self, uffd_msg};
use crate::Features;

/// Why a page fault was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The page is not present (MISSING registration).
    Missing,
    /// A write hit a write-protected page (WP registration).
    WriteProtect,
    /// The page is in the page cache but not mapped (MINOR registration).
    Minor,
}

/// A page fault on a registered range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting address: page-aligned unless `EXACT_ADDRESS` was negotiated.
    pub address: u64,
    /// What kind of fault it is.
    pub kind: FaultKind,
    /// The access was a write.
    pub write: bool,
    /// The faulting thread, when `THREAD_ID` was negotiated.
    pub thread_id: Option<u32>,
}

/// One event read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread is blocked on a page of a registered range until it is resolved.
    PageFault(PageFault),
    /// The process forked; the child's ranges are reported on this new descriptor,
    /// which the reader now owns (dropping it closes it).
    Fork {
        /// The child's userfaultfd.
        uffd: OwnedFd,
    },
    /// A registered range was moved by `mremap()`.
    Remap {
        /// Old start address.
        from: u64,
        /// New start address.
        to: u64,
        /// Length moved.
        len: u64,
    },
    /// Pages of a registered range were dropped (`MADV_DONTNEED`, `MADV_REMOVE`).
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// A registered range was unmapped.
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// An event code this crate does not know (from a newer kernel).
    Unknown {
        /// The raw event code.
        event: u8,
    },
}

impl Event {
    /// Decodes one raw message. `features` are the handle's negotiated features (they
    /// decide whether a thread id is present).
    ///
    /// A `Fork` message carries a descriptor number the kernel installed in this process
    /// for the reader, so decoding takes ownership of it: decode each message exactly once.
    pub(crate) fn decode(msg: &uffd_msg, features: Features) -> Event {
        let [a0, a1, a2] = msg.arg;
        match msg.event {
            abi::UFFD_EVENT_PAGEFAULT => {
                let kind = if a0 & abi::UFFD_PAGEFAULT_FLAG_WP != 0 {
                    FaultKind::WriteProtect
                } else if a0 & abi::UFFD_PAGEFAULT_FLAG_MINOR != 0 {
                    FaultKind::Minor
                } else {
                    FaultKind::Missing
                };
                Event::PageFault(PageFault {
                    address: a1,
                    kind,
                    write: a0 & abi::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    // Truncation intended: `ptid` is the low 32 bits of the third word.
                    thread_id: features
                        .contains(Features::THREAD_ID)
                        .then_some((a2 & 0xffff_ffff) as u32),
                })
            }
            abi::UFFD_EVENT_FORK => {
                // Truncation intended: `ufd` is the low 32 bits of the first word.
                let fd = (a0 & 0xffff_ffff) as i32;
                // SAFETY: for UFFD_EVENT_FORK the kernel installed `fd` in this process's
                // descriptor table for the reader of this message and nothing else owns
                // it; each message is decoded once (see above), so ownership is taken once.
                let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
                Event::Fork { uffd }
            }
            abi::UFFD_EVENT_REMAP => Event::Remap {
                from: a0,
                to: a1,
                len: a2,
            },
            abi::UFFD_EVENT_REMOVE => Event::Remove { start: a0, end: a1 },
            abi::UFFD_EVENT_UNMAP => Event::Unmap { start: a0, end: a1 },
            event => Event::Unknown { event },
        }
    }
}

/// A reusable buffer for batched event reads: holds the raw messages and the decoded
/// events, so steady-state reads allocate nothing.
#[derive(Debug)]
pub struct EventBuf {
    pub(crate) raw: Vec<uffd_msg>,
    pub(crate) events: Vec<Event>,
}

impl EventBuf {
    /// A buffer that reads up to `capacity` events at a time (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        EventBuf {
            raw: vec![uffd_msg::default(); capacity],
            events: Vec::with_capacity(capacity),
        }
    }

    /// Takes the events of the last read out of the buffer, so the caller owns them
    /// (a [`Event::Fork`] descriptor, for one).
    pub fn drain(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// How many events one read can return.
    pub fn capacity(&self) -> usize {
        self.raw.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: u8, arg: [u64; 3]) -> uffd_msg {
        uffd_msg {
            event,
            arg,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_page_faults() {
        let m = msg(
            abi::UFFD_EVENT_PAGEFAULT,
            [
                abi::UFFD_PAGEFAULT_FLAG_WRITE | abi::UFFD_PAGEFAULT_FLAG_WP,
                0x7000,
                42,
            ],
        );
        match Event::decode(&m, Features::THREAD_ID) {
            Event::PageFault(pf) => assert_eq!(
                pf,
                PageFault {
                    address: 0x7000,
                    kind: FaultKind::WriteProtect,
                    write: true,
                    thread_id: Some(42)
                }
            ),
            e => panic!("unexpected {e:?}"),
        }
        match Event::decode(
            &msg(abi::UFFD_EVENT_PAGEFAULT, [0, 0x1000, 42]),
            Features::empty(),
        ) {
            Event::PageFault(pf) => {
                assert_eq!(pf.kind, FaultKind::Missing);
                assert!(!pf.write);
                assert_eq!(pf.thread_id, None, "no thread id unless negotiated");
            }
            e => panic!("unexpected {e:?}"),
        }
        match Event::decode(
            &msg(
                abi::UFFD_EVENT_PAGEFAULT,
                [abi::UFFD_PAGEFAULT_FLAG_MINOR, 0x2000, 0],
            ),
            Features::empty(),
        ) {
            Event::PageFault(pf) => assert_eq!(pf.kind, FaultKind::Minor),
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn decodes_non_cooperative_events() {
        assert!(matches!(
            Event::decode(
                &msg(abi::UFFD_EVENT_REMOVE, [0x1000, 0x3000, 0]),
                Features::empty()
            ),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        ));
        assert!(matches!(
            Event::decode(
                &msg(abi::UFFD_EVENT_UNMAP, [0x1000, 0x3000, 0]),
                Features::empty()
            ),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        ));
        assert!(matches!(
            Event::decode(&msg(abi::UFFD_EVENT_REMAP, [1, 2, 3]), Features::empty()),
            Event::Remap {
                from: 1,
                to: 2,
                len: 3
            }
        ));
        assert!(matches!(
            Event::decode(&msg(0x7f, [0; 3]), Features::empty()),
            Event::Unknown { event: 0x7f }
        ));
    }
}
