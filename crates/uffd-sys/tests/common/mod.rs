//! Shared helpers of the real-kernel tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use uffd_sys::{Error, Event, EventBuf, Features, Op, PageFault, Uffd};

/// How long a test waits for an event before calling the kernel's behaviour broken.
/// A hang guard, not a performance limit.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Prints a loud SKIPPED line straight to stderr (not captured by the test harness), or
/// fails when `REQUIRE_UFFD=1` says userfaultfd must be there (CI on these hosts).
pub fn skip(test: &str, why: &str) {
    if std::env::var("REQUIRE_UFFD").as_deref() == Ok("1") {
        panic!("{test}: userfaultfd required (REQUIRE_UFFD=1) but {why}");
    }
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

/// A handle with `features` required, or None after printing SKIPPED.
pub fn uffd(test: &str, features: Features) -> Option<Uffd> {
    match Uffd::builder().require(features).open() {
        Ok(u) => Some(u),
        Err(e) => {
            skip(test, &format!("userfaultfd unusable here: {e}"));
            None
        }
    }
}

/// Waits for and returns the next `n` page faults, failing on any other event.
pub fn next_faults(uffd: &Uffd, n: usize) -> Vec<PageFault> {
    let mut buf = EventBuf::new(16);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            uffd.wait_readable(Some(HANG_GUARD)).unwrap(),
            "no userfaultfd event within the hang guard"
        );
        for ev in uffd.read_events(&mut buf).unwrap() {
            match ev {
                Event::PageFault(pf) => out.push(*pf),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
    assert_eq!(out.len(), n, "more faults than expected: {out:?}");
    out
}

/// Waits for the next event of any kind and returns it owned.
pub fn next_event(uffd: &Uffd) -> Event {
    let mut buf = EventBuf::new(1);
    loop {
        assert!(
            uffd.wait_readable(Some(HANG_GUARD)).unwrap(),
            "no event within the hang guard"
        );
        uffd.read_events(&mut buf).unwrap();
        if let Some(e) = buf.drain().next() {
            return e;
        }
    }
}

/// A thread that runs `f` and raises a flag when it returns, so a test can tell that it
/// is still blocked in a fault.
pub struct Toucher<T> {
    pub done: Arc<AtomicBool>,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> Toucher<T> {
    pub fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        let handle = std::thread::spawn(move || {
            let v = f();
            d.store(true, Ordering::SeqCst);
            v
        });
        Toucher { done, handle }
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    pub fn join(self) -> T {
        self.handle.join().expect("toucher panicked")
    }
}

/// The operation and errno of a range error; panics on any other error.
pub fn range_err(e: &Error) -> (Op, i32) {
    match e {
        Error::Range { op, source, .. } => (*op, source.raw_os_error().expect("an errno")),
        e => panic!("expected a range error, got {e:?}"),
    }
}

/// A hugetlbfs mapping of `pages` huge pages of the default size, or None after printing
/// SKIPPED when the host has none free; fails instead when `REQUIRE_HUGETLB=1` (set by
/// `.ci/run` once it has reserved some).
pub fn huge_mapping(test: &str, pages: usize) -> Option<uffd_sys::Mapping> {
    let size = uffd_sys::mapping::default_huge_page_size().unwrap_or(2 << 20);
    match uffd_sys::Mapping::new(uffd_sys::MemoryKind::Hugetlbfs, pages * size) {
        Ok(m) => Some(m),
        Err(e) => {
            let why = format!(
                "cannot map hugetlbfs memory ({e}): reserve huge pages with vm.nr_hugepages"
            );
            if std::env::var("REQUIRE_HUGETLB").as_deref() == Ok("1") {
                panic!("{test}: huge pages required (REQUIRE_HUGETLB=1) but {why}");
            }
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
            None
        }
    }
}
