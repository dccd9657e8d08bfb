//! Atomic dirty bitmaps: one bit per page of a RAM block.
//!
//! A [`DirtyBitmap`] is shared between the thread that sends pages and the
//! threads that mark pages dirty (a dirty-log sync, a failed send putting
//! its pages back). Every operation is a single atomic read-modify-write per
//! 64-page word, so no bit set concurrently with a clear is ever lost: a
//! clear only removes bits it also returns to its caller.
//!
//! The sender takes pages in chunks with [`DirtyBitmap::take_range`]: the
//! bits of up to [`TAKE_MAX_PAGES`] pages are cleared and handed over as a
//! [`TakenPages`] value, which lives on the stack (no allocation), is
//! iterated to send the pages, and is given back with
//! [`DirtyBitmap::restore`] if sending fails.
//!
//! Bits past [`DirtyBitmap::pages`] do not exist: setting them is ignored,
//! testing them returns `false`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most pages one [`DirtyBitmap::take_range`] call takes.
pub const TAKE_MAX_PAGES: u64 = 256;

/// Words a [`TakenPages`] may span: 256 pages starting anywhere in a word.
const TAKE_WORDS: usize = (TAKE_MAX_PAGES / 64) as usize + 1;

/// A bitmap of `pages` bits in atomic 64-bit words.
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("pages", &self.pages)
            .field("set", &self.count())
            .finish()
    }
}

/// The `(word index, mask)` pairs covering pages `[first, end)`.
fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let first_word = first / 64;
    let end_word = end.div_ceil(64);
    (first_word..end_word.max(first_word)).map(move |w| {
        let lo = first.max(w * 64) - w * 64;
        let hi = end.min((w + 1) * 64) - w * 64;
        let width = hi - lo;
        let mask = if width >= 64 {
            u64::MAX
        } else {
            ((1u64 << width) - 1) << lo
        };
        // `w` < words.len(), which came from a usize.
        (w as usize, mask)
    })
}

impl DirtyBitmap {
    /// A bitmap of `pages` clear bits.
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64);
        DirtyBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages (bits).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of 64-bit words.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// The bits of word `index` that stand for existing pages.
    fn valid_mask(&self, index: usize) -> u64 {
        let first = index as u64 * 64;
        let valid = self.pages.saturating_sub(first);
        if valid >= 64 {
            u64::MAX
        } else {
            (1u64 << valid) - 1
        }
    }

    fn clamp(&self, first: u64, n: u64) -> (u64, u64) {
        let first = first.min(self.pages);
        (first, first.saturating_add(n).min(self.pages))
    }

    /// Sets the bit of `page`; returns whether it was clear. Ignored past
    /// the end.
    pub fn set(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Whether the bit of `page` is set.
    pub fn test(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1u64 << (page % 64)) != 0
    }

    /// Clears the bit of `page`.
    pub fn clear(&self, page: u64) {
        self.test_and_clear(page);
    }

    /// Clears the bit of `page` and returns whether it was set.
    pub fn test_and_clear(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % 64);
        self.words[(page / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Sets the bits of pages `[first, first + n)` (clamped to the bitmap);
    /// returns how many were clear before.
    pub fn set_range(&self, first: u64, n: u64) -> u64 {
        let (first, end) = self.clamp(first, n);
        word_masks(first, end)
            .map(|(w, mask)| {
                let old = self.words[w].fetch_or(mask, Ordering::AcqRel);
                u64::from((mask & !old).count_ones())
            })
            .sum()
    }

    /// Clears the bits of pages `[first, first + n)` (clamped to the
    /// bitmap); returns how many were set before.
    pub fn clear_range(&self, first: u64, n: u64) -> u64 {
        let (first, end) = self.clamp(first, n);
        word_masks(first, end)
            .map(|(w, mask)| {
                let old = self.words[w].fetch_and(!mask, Ordering::AcqRel);
                u64::from((mask & old).count_ones())
            })
            .sum()
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            w.store(self.valid_mask(i), Ordering::Release);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut bits = self.words[w].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                return (page < self.pages).then_some(page);
            }
            w += 1;
            bits = self.words.get(w)?.load(Ordering::Acquire);
        }
    }

    /// The set pages, in ascending order. Bits changing during the walk
    /// may or may not be seen.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = 0u64;
        std::iter::from_fn(move || {
            let page = self.next_set(next)?;
            next = page + 1;
            Some(page)
        })
    }

    /// The current value of word `index` (pages `64 * index ..`); 0 past
    /// the end.
    pub fn load_word(&self, index: usize) -> u64 {
        self.words
            .get(index)
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// ORs `bits` into word `index` (bits past the last page are dropped);
    /// returns how many bits were newly set. Ignored past the end.
    pub fn or_word(&self, index: usize, bits: u64) -> u64 {
        let Some(w) = self.words.get(index) else {
            return 0;
        };
        let bits = bits & self.valid_mask(index);
        if bits == 0 {
            return 0;
        }
        let old = w.fetch_or(bits, Ordering::AcqRel);
        u64::from((bits & !old).count_ones())
    }

    /// Atomically clears the bits of pages `[first, first + n)` and returns
    /// the pages that were set. At most [`TAKE_MAX_PAGES`] pages are taken:
    /// a longer range stops there ([`TakenPages::end`] says where).
    /// Allocation-free.
    pub fn take_range(&self, first: u64, n: u64) -> TakenPages {
        let (first, end) = self.clamp(first, n.min(TAKE_MAX_PAGES));
        let mut taken = TakenPages {
            first_word: first / 64,
            bits: [0; TAKE_WORDS],
            start: first,
            end,
        };
        for (w, mask) in word_masks(first, end) {
            let old = self.words[w].fetch_and(!mask, Ordering::AcqRel);
            taken.bits[w - taken.first_word as usize] = old & mask;
        }
        taken
    }

    /// Sets again the bits of pages taken by [`take_range`], for pages whose
    /// send failed; returns how many were clear.
    ///
    /// [`take_range`]: DirtyBitmap::take_range
    pub fn restore(&self, taken: &TakenPages) -> u64 {
        taken
            .bits
            .iter()
            .enumerate()
            .map(|(i, &bits)| {
                let index = usize::try_from(taken.first_word).unwrap_or(usize::MAX);
                self.or_word(index.saturating_add(i), bits)
            })
            .sum()
    }
}

/// Pages taken out of a [`DirtyBitmap`] by [`DirtyBitmap::take_range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakenPages {
    first_word: u64,
    bits: [u64; TAKE_WORDS],
    start: u64,
    end: u64,
}

impl TakenPages {
    /// First page of the range examined.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// End (exclusive) of the range examined.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Number of pages taken.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Whether no page was taken.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&b| b == 0)
    }

    /// The pages taken, ascending.
    pub fn iter(&self) -> TakenIter {
        TakenIter {
            bits: self.bits,
            index: 0,
            base: self.first_word * 64,
        }
    }
}

impl IntoIterator for &TakenPages {
    type Item = u64;
    type IntoIter = TakenIter;

    fn into_iter(self) -> TakenIter {
        self.iter()
    }
}

/// Iterator over the pages of a [`TakenPages`].
#[derive(Debug, Clone)]
pub struct TakenIter {
    bits: [u64; TAKE_WORDS],
    index: usize,
    base: u64,
}

impl Iterator for TakenIter {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while let Some(word) = self.bits.get_mut(self.index) {
            if *word != 0 {
                let bit = u64::from(word.trailing_zeros());
                *word &= *word - 1;
                return Some(self.base + self.index as u64 * 64 + bit);
            }
            self.index += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn basics() {
        let b = DirtyBitmap::new(130);
        assert_eq!(b.words(), 3);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130), "past the end is ignored");
        assert!(!b.test(130));
        assert_eq!(b.count(), 2);
        assert_eq!(b.next_set(1), Some(129));
        assert_eq!(b.next_set(130), None);
        assert!(b.test_and_clear(129));
        assert!(!b.test_and_clear(129));
        b.set_all();
        assert_eq!(b.count(), 130);
        assert_eq!(b.load_word(2), 0b11, "no bit past the last page");
        assert_eq!(b.or_word(2, u64::MAX), 0);
        assert_eq!(b.clear_range(60, 10), 10);
        assert_eq!(b.count(), 120);
        assert_eq!(b.set_range(0, 1000), 10);
        b.clear_all();
        assert_eq!(b.count(), 0);
        assert_eq!(b.or_word(2, u64::MAX), 2);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![128, 129]);
    }

    #[test]
    fn take_and_restore() {
        let b = DirtyBitmap::new(1000);
        b.set_range(10, 500);
        let t = b.take_range(5, 1000);
        assert_eq!(t.start(), 5);
        assert_eq!(t.end(), 5 + TAKE_MAX_PAGES);
        assert_eq!(t.count(), TAKE_MAX_PAGES - 5);
        assert_eq!(t.iter().next(), Some(10));
        assert_eq!(t.iter().last(), Some(260));
        assert_eq!(b.count(), 500 - t.count());
        assert!(!b.test(10) && !b.test(260) && b.test(261));
        assert_eq!(b.restore(&t), t.count());
        assert_eq!(b.count(), 500);
        assert!(b.take_range(0, 10).is_empty());
        assert!(b.take_range(2000, 10).is_empty());
    }

    #[test]
    fn concurrent_sets_are_never_lost() {
        let b = std::sync::Arc::new(DirtyBitmap::new(4096));
        let setter = {
            let b = b.clone();
            std::thread::spawn(move || {
                for round in 0..50u64 {
                    for p in 0..4096 {
                        if (p + round) % 7 == 0 {
                            b.set(p);
                        }
                    }
                }
            })
        };
        let mut seen = vec![false; 4096];
        while !setter.is_finished() {
            for first in (0..4096).step_by(256) {
                for p in &b.take_range(first, 256) {
                    seen[p as usize] = true;
                }
            }
        }
        setter.join().unwrap();
        for p in b.iter_set() {
            seen[p as usize] = true;
        }
        // Every page that was ever set is either still set or was taken.
        for (p, s) in seen.iter().enumerate() {
            let ever_set = (0..50).any(|r| (p as u64 + r) % 7 == 0);
            assert_eq!(*s, ever_set, "page {p}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64),
        Clear(u64),
        TestAndClear(u64),
        SetRange(u64, u64),
        ClearRange(u64, u64),
        SetAll,
        NextSet(u64),
        Take(u64, u64),
        TakeRestore(u64, u64),
        OrWord(usize, u64),
    }

    fn op(pages: u64) -> impl Strategy<Value = Op> {
        let p = 0..pages + 70;
        prop_oneof![
            p.clone().prop_map(Op::Set),
            p.clone().prop_map(Op::Clear),
            p.clone().prop_map(Op::TestAndClear),
            (p.clone(), 0..300u64).prop_map(|(f, n)| Op::SetRange(f, n)),
            (p.clone(), 0..300u64).prop_map(|(f, n)| Op::ClearRange(f, n)),
            Just(Op::SetAll),
            p.clone().prop_map(Op::NextSet),
            (p.clone(), 0..400u64).prop_map(|(f, n)| Op::Take(f, n)),
            (p, 0..400u64).prop_map(|(f, n)| Op::TakeRestore(f, n)),
            (0..8usize, any::<u64>()).prop_map(|(w, b)| Op::OrWord(w, b)),
        ]
    }

    proptest! {
        #[test]
        fn matches_vec_bool_model(
            (pages, ops) in (0..400u64).prop_flat_map(|pages| {
                (Just(pages), proptest::collection::vec(op(pages), 1..60))
            })
        ) {
            let b = DirtyBitmap::new(pages);
            let mut m = vec![false; pages as usize];
            let range = |f: u64, n: u64| {
                let f = f.min(pages) as usize;
                f..(f + n as usize).min(pages as usize)
            };
            for op in ops {
                match op {
                    Op::Set(p) => {
                        let was_clear = p < pages && !m[p as usize];
                        prop_assert_eq!(b.set(p), was_clear);
                        if p < pages { m[p as usize] = true; }
                    }
                    Op::Clear(p) => {
                        b.clear(p);
                        if p < pages { m[p as usize] = false; }
                    }
                    Op::TestAndClear(p) => {
                        let was = p < pages && m[p as usize];
                        prop_assert_eq!(b.test_and_clear(p), was);
                        if p < pages { m[p as usize] = false; }
                    }
                    Op::SetRange(f, n) => {
                        let r = range(f, n);
                        let newly = m[r.clone()].iter().filter(|s| !**s).count() as u64;
                        prop_assert_eq!(b.set_range(f, n), newly);
                        m[r].iter_mut().for_each(|s| *s = true);
                    }
                    Op::ClearRange(f, n) => {
                        let r = range(f, n);
                        let were = m[r.clone()].iter().filter(|s| **s).count() as u64;
                        prop_assert_eq!(b.clear_range(f, n), were);
                        m[r].iter_mut().for_each(|s| *s = false);
                    }
                    Op::SetAll => {
                        b.set_all();
                        m.iter_mut().for_each(|s| *s = true);
                    }
                    Op::NextSet(from) => {
                        let expected = (from.min(pages) as usize..m.len())
                            .find(|&i| m[i])
                            .map(|i| i as u64);
                        prop_assert_eq!(b.next_set(from), expected);
                    }
                    Op::Take(f, n) | Op::TakeRestore(f, n) => {
                        let r = range(f, n.min(TAKE_MAX_PAGES));
                        let expected: Vec<u64> =
                            r.clone().filter(|&i| m[i]).map(|i| i as u64).collect();
                        let t = b.take_range(f, n);
                        prop_assert_eq!(t.iter().collect::<Vec<_>>(), expected.clone());
                        prop_assert_eq!(t.count(), expected.len() as u64);
                        prop_assert_eq!(t.end() as usize, r.end);
                        if matches!(op, Op::TakeRestore(..)) {
                            prop_assert_eq!(b.restore(&t), t.count());
                        } else {
                            m[r].iter_mut().for_each(|s| *s = false);
                        }
                    }
                    Op::OrWord(w, bits) => {
                        let mut newly = 0;
                        for bit in 0..64u64 {
                            let p = w as u64 * 64 + bit;
                            if bits & (1 << bit) != 0 && p < pages && !m[p as usize] {
                                m[p as usize] = true;
                                newly += 1;
                            }
                        }
                        prop_assert_eq!(b.or_word(w, bits), newly);
                    }
                }
                prop_assert_eq!(b.count(), m.iter().filter(|s| **s).count() as u64);
                for (i, s) in m.iter().enumerate() {
                    prop_assert_eq!(b.test(i as u64), *s, "page {}", i);
                }
                prop_assert_eq!(
                    b.iter_set().collect::<Vec<_>>(),
                    (0..pages).filter(|&i| m[i as usize]).collect::<Vec<_>>()
                );
            }
        }
    }
}
