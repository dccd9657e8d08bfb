//! The `balloon` guest: half an `ab` workload, half a guest that gives memory back
//! through a minimal paravirtual balloon, and the check of the RAM it leaves behind.
//!
//! Postcopy must not let a balloon discard pages while the destination fills them
//! (QEMU inhibits the balloon then). This guest asks for discards pass after pass, so
//! a VMM can show that its balloon gives memory back, that it drops the requests while
//! inhibited, and that a migration carries either outcome over.
//!
//! # What each vCPU does
//!
//! The vCPU's slice ([`super::slices`]) is split in two halves ([`halves`]): the `ab`
//! half (the first `pages / 2` pages) and the balloon area (the rest). Pass `n` (from
//! 0) of a vCPU:
//!
//! 1. increments the first byte of each page of the `ab` half, in order, as the `ab`
//!    workload does (so [`super::ab_check`] holds on the `ab` halves);
//! 2. writes the marker `n + 1` (8 bytes, little-endian) at the start of each page of
//!    the balloon area, in order;
//! 3. asks the VMM to take the whole balloon area back (the port protocol below);
//! 4. writes `B` to COM1.
//!
//! A slice of fewer than two pages has no halves: its vCPU halts and writes nothing.
//! The built-in KVM code ([`super::builtin`]) and the soft vCPUs ([`crate::soft`]) run
//! this same workload, one page at a time; the soft vCPUs make both port writes of
//! step 3 in one step.
//!
//! # The port protocol
//!
//! Two 32-bit, write-only I/O ports; the guest writes them with `out dx, eax`, never
//! reads them, and never waits for an answer:
//!
//! | port | value written | meaning |
//! |------|---------------|---------|
//! | [`PFN_PORT`] `0x600` | first page frame number (guest-physical address >> 12) | sets the vCPU's PFN register |
//! | [`COUNT_PORT`] `0x604` | page count (4 KiB pages) | the request: take back `count` pages from the PFN register's page on |
//!
//! Each vCPU has its own PFN register (as each has its own LAPIC), so vCPUs need no
//! lock between the two writes; the register is device state and migrates, so a vCPU
//! paused between the two writes completes its request on the destination. The VMM
//! either honours a request (every page of the range then reads zero: it has been
//! given back) or drops it (the pages keep what the guest wrote), and says nothing to
//! the guest either way; a range that is not all guest RAM is refused (nothing
//! happens). Writes of another size are not part of the protocol.
//!
//! # What the guest leaves in its balloon areas
//!
//! A vCPU in pass `n` has written marker `n + 1` in its balloon area from the first
//! page up to its position, and the pages after that hold what pass `n - 1` left:
//! zero if that request was honoured, its marker `n` if it was dropped (zero also
//! before the first pass). After the request, the area reads all zero or all `n + 1`.
//! So an area reads `m, …, m, x, …, x`: one marker, then zero or the marker before it
//! (`m - 1`); and every marker is at most the number of passes the vCPU has begun. The
//! `ab` half ties the two together: its first page has been incremented in every pass
//! begun, so its first byte `a` gives the pass modulo 256. Every marker's low byte is
//! `a` (this pass's) or `a - 1` (the last pass's), and while the `ab` half is
//! part-way (step 1) the area holds one value: zero or the last pass's marker.
//! [`balloon_check`] checks all of it.
//!
//! # Example
//!
//! ```
//! use vmm_glue::guest::balloon::{balloon_check, halves};
//!
//! // A 4-page slice: 2 pages of ab, a 2-page balloon area.
//! let (ab, area) = halves((0x10_0000, 0x10_4000)).unwrap();
//! assert_eq!((ab, area), ((0x10_0000, 0x10_2000), (0x10_2000, 0x10_4000)));
//! // One vCPU in its third pass (ab bytes 3, 2), its balloon area given back by the
//! // second pass's request.
//! let s = balloon_check(&[3, 2, 0, 0], 1, 3).unwrap();
//! assert_eq!((s.zero_pages, s.marked_pages), (2, 0));
//! // Third pass, marker 3 being written over the marker 2 a dropped request left.
//! assert!(balloon_check(&[3, 3, 3, 2], 1, 3).is_ok());
//! // A marker from two passes ago: a lost page.
//! assert!(balloon_check(&[3, 3, 3, 1], 1, 3).is_err());
//! ```

use super::PAGE_SIZE;

/// The I/O port of a vCPU's PFN register: a 4-byte write sets the first page frame
/// number (guest-physical address >> 12) of the next request.
pub const PFN_PORT: u16 = 0x600;
/// The I/O port that makes a request: a 4-byte write of a page count asks the VMM to
/// take back that many pages from the PFN register's page on.
pub const COUNT_PORT: u16 = 0x604;

/// The two halves of a vCPU's slice `(start, end)` (page-aligned, as
/// [`super::slices`] returns them): the `ab` half (the first `pages / 2` pages) and
/// the balloon area (the rest), each `(start, end)`. `None` when the slice has fewer
/// than two pages: the vCPU then halts.
pub fn halves(slice: (u64, u64)) -> Option<((u64, u64), (u64, u64))> {
    let (start, end) = slice;
    let pages = end.checked_sub(start)? / PAGE_SIZE;
    let mid = start + pages / 2 * PAGE_SIZE;
    (mid > start).then_some(((start, mid), (mid, end)))
}

/// What [`balloon_check`] saw in the balloon areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonSummary {
    /// Pages of balloon areas that read zero: given back (or not written yet).
    pub zero_pages: u64,
    /// Pages of balloon areas that hold a marker.
    pub marked_pages: u64,
    /// The largest marker seen (0 if none).
    pub max_marker: u64,
}

/// Checks the RAM of a `balloon` guest, paused.
///
/// `pages[i]` is the first 8 bytes (little-endian) of page `i` of the workload memory,
/// which is split among `vcpus` vCPUs as [`super::slices`] splits it (`0` counts as
/// one vCPU) and each slice in two by [`halves`]. `passes` bounds the passes any one
/// vCPU has begun (its completed passes plus one); one more than the number of `B`s on
/// COM1 is such a bound.
///
/// Checks, per vCPU: the first bytes of the `ab` half pass the a-b check; every page
/// of the balloon area holds zero or a marker no greater than `passes`; the area reads
/// one marker `m`, then zero or `m - 1`; the markers belong to the pass the `ab` half
/// is in or the one before, as the module explains; a slice too small to split was
/// never written. The error names the vCPU and the page (counted from the start of the
/// workload memory).
pub fn balloon_check(pages: &[u64], vcpus: usize, passes: u64) -> Result<BalloonSummary, String> {
    let vcpus = vcpus.max(1);
    let per = pages.len() / vcpus;
    let mut summary = BalloonSummary::default();
    for v in 0..vcpus {
        let first = v * per;
        let end = if v + 1 == vcpus {
            pages.len()
        } else {
            first + per
        };
        let slice = &pages[first..end];
        let half = slice.len() / 2;
        if half == 0 {
            if let Some(i) = slice.iter().position(|&w| w != 0) {
                return Err(format!(
                    "vCPU {v}: page {} holds {:#x}, but a slice of {} page(s) is never written",
                    first + i,
                    slice[i],
                    slice.len()
                ));
            }
            continue;
        }
        let (ab, area) = slice.split_at(half);
        // The a-b check reads the first byte of each page: the low byte.
        let ab_bytes: Vec<u8> = ab.iter().map(|&w| w.to_le_bytes()[0]).collect();
        super::ab_slice_check(&ab_bytes, v, first)?;
        let stepped = ab_bytes.iter().any(|&b| b != ab_bytes[0]);
        check_area(
            area,
            v,
            first + half,
            (ab_bytes[0], stepped),
            passes,
            &mut summary,
        )?;
    }
    Ok(summary)
}

/// The balloon-area rules of [`balloon_check`] for vCPU `v`, whose area starts at page
/// `base`, whose `ab` half's first byte is `a`, and whose `ab` half is `stepped` when the
/// vCPU is part-way through incrementing it.
fn check_area(
    area: &[u64],
    v: usize,
    base: usize,
    (a, stepped): (u8, bool),
    passes: u64,
    summary: &mut BalloonSummary,
) -> Result<(), String> {
    for (i, &w) in area.iter().enumerate() {
        if w > passes {
            return Err(format!(
                "vCPU {v}: balloon page {} holds marker {w}, more than the {passes} passes \
                 begun",
                base + i
            ));
        }
        if w == 0 {
            summary.zero_pages += 1;
        } else {
            summary.marked_pages += 1;
            summary.max_marker = summary.max_marker.max(w);
        }
    }
    // The area as `m` (k pages), then `x` (the rest).
    let m = area.first().copied().unwrap_or(0);
    let k = area.iter().take_while(|&&w| w == m).count();
    let x = area.get(k).copied();
    if let Some(i) = area[k..].iter().position(|&w| Some(w) != x) {
        return Err(format!(
            "vCPU {v}: balloon page {} holds {} after pages holding {m} and {}: an area reads \
             one marker, then zero or the marker before it",
            base + k + i,
            area[k + i],
            x.unwrap_or(0)
        ));
    }
    let low = |w: u64| w.to_le_bytes()[0];
    // A marker of the pass the ab half is in (mod 256), or of the pass before.
    let this_pass = |w: u64| w != 0 && low(w) == a;
    let last_pass = |w: u64| w != 0 && low(w) == a.wrapping_sub(1);
    let fits = match x {
        // One value: zero, or one pass's marker.
        None => m == 0 || last_pass(m) || (!stepped && this_pass(m)),
        // This pass's marker over what the last pass left: the vCPU is past its ab half.
        Some(x) => !stepped && this_pass(m) && (x == 0 || x == m - 1),
    };
    if !fits {
        return Err(format!(
            "vCPU {v}: balloon pages {base}.. read {m} ({k} page(s)){} while the ab half is in \
             pass {a} (mod 256){}: no pass leaves that",
            x.map(|x| format!(" then {x}")).unwrap_or_default(),
            if stepped { ", part-way" } else { "" }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_split_a_slice_and_refuse_one_page() {
        let p = PAGE_SIZE;
        assert_eq!(halves((0, 2 * p)), Some(((0, p), (p, 2 * p))));
        assert_eq!(
            halves((0, 5 * p)),
            Some(((0, 2 * p), (2 * p, 5 * p))),
            "the balloon area takes the odd page"
        );
        assert_eq!(halves((0, p)), None);
        assert_eq!(halves((p, 0)), None);
    }

    #[test]
    fn checker_refuses_what_no_pass_leaves() {
        // Markers above the pass bound.
        assert!(balloon_check(&[3, 3, 3, 3], 1, 2).is_err());
        // Zero, then a marker: a page given back out of turn.
        assert!(balloon_check(&[3, 3, 0, 3], 1, 3).is_err());
        // Three values in one area.
        assert!(balloon_check(&[4, 4, 4, 4, 3, 0], 1, 5).is_err());
        // A marker whose pass does not match the ab half.
        let e = balloon_check(&[7, 7, 2, 2], 1, 9).unwrap_err();
        assert!(e.contains("no pass leaves that"), "{e}");
        // Markers being written while the ab half is still being incremented.
        assert!(balloon_check(&[5, 4, 5, 0], 1, 9).is_err());
        assert!(balloon_check(&[5, 4, 4, 0], 1, 9).is_err());
        assert!(balloon_check(&[5, 4, 4, 4], 1, 9).is_ok());
        // The ab half itself breaks the a-b rule.
        assert!(balloon_check(&[5, 3, 0, 0], 1, 9).is_err());
        // A one-page slice that was written.
        assert!(balloon_check(&[1], 1, 9).is_err());
        assert!(balloon_check(&[0], 1, 9).is_ok());
    }

    #[test]
    fn the_second_vcpu_is_checked_on_its_own_pages() {
        // vCPU 0: pages 0..4, vCPU 1: pages 4..9 (ab 4..6, area 6..9).
        let ok = [2, 2, 0, 0, 5, 4, 4, 4, 4];
        let s = balloon_check(&ok, 2, 5).unwrap();
        assert_eq!(s.zero_pages, 2);
        assert_eq!(s.marked_pages, 3);
        assert_eq!(s.max_marker, 4);
        let mut bad = ok;
        bad[8] = 7;
        let e = balloon_check(&bad, 2, 5).unwrap_err();
        assert!(e.starts_with("vCPU 1: balloon page 8"), "{e}");
    }

    /// A model of balloon vCPUs (one page per step, honoured and dropped requests
    /// mixed) checked after every single step, as a migration may stop them anywhere.
    #[test]
    fn checker_accepts_every_state_a_balloon_guest_passes_through() {
        let (pages, vcpus) = (37usize, 3usize);
        let slices = super::super::slices(0, pages as u64 * PAGE_SIZE, vcpus).unwrap();
        let mut mem = vec![0u64; pages];
        let mut cursor: Vec<u64> = slices.iter().map(|s| s.0).collect();
        let mut done = vec![0u64; vcpus];
        let mut requests = 0u64;
        for step in 0..20_000usize {
            let v = (step * 7 + step / 5) % vcpus;
            let (ab, area) = halves(slices[v]).unwrap();
            let page = (cursor[v] / PAGE_SIZE) as usize;
            if cursor[v] < ab.1 {
                let b = (mem[page] as u8).wrapping_add(1);
                mem[page] = (mem[page] & !0xff) | u64::from(b);
            } else {
                mem[page] = done[v] + 1;
            }
            cursor[v] += PAGE_SIZE;
            if cursor[v] == area.1 {
                requests += 1;
                // Every third request is dropped.
                if requests % 3 != 0 {
                    let (s, e) = ((area.0 / PAGE_SIZE) as usize, (area.1 / PAGE_SIZE) as usize);
                    mem[s..e].fill(0);
                }
                done[v] += 1;
                cursor[v] = ab.0;
            }
            let bound = done.iter().sum::<u64>() + 1;
            balloon_check(&mem, vcpus, bound)
                .unwrap_or_else(|e| panic!("step {step}: {e}: {mem:?}"));
        }
        assert!(
            done.iter().all(|&d| d > 300),
            "every vCPU wrapped the ab byte"
        );
    }
}
