//! Every error path a caller can reach returns the typed error with the kernel's errno,
//! never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{range_err, uffd};
use uffd_sys::{CopyMode, Error, Features, Mapping, MemoryKind, Op, RegisterMode, Uffd, Wake};

const PAGE: u64 = 4096;

#[test]
fn a_missing_feature_is_named() {
    let test = "a_missing_feature_is_named";
    let Some(u) = uffd(test, Features::empty()) else {
        return;
    };
    // A bit no kernel defines yet stands for "a feature this kernel lacks".
    let future = Features::from_bits_retain(1 << 50);
    assert!(!u.available_features().contains(future));
    let err = Uffd::builder()
        .require(future | Features::THREAD_ID)
        .open()
        .unwrap_err();
    match &err {
        Error::MissingFeatures { missing, available } => {
            assert_eq!(*missing, future, "only the lacking feature is named");
            assert!(available.contains(Features::THREAD_ID));
        }
        e => panic!("expected MissingFeatures, got {e:?}"),
    }
    assert!(
        err.to_string().contains("unknown(0x4000000000000)"),
        "{err}"
    );
    // Requested (not required) features the kernel lacks are simply left out.
    let u = Uffd::builder().request(future).open().unwrap();
    assert!(!u.features().contains(future));
}

#[test]
fn bad_ranges_give_typed_errors() {
    let test = "bad_ranges_give_typed_errors";
    let Some(u) = uffd(test, Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let map = Mapping::new(MemoryKind::Anonymous, 4 * PAGE as usize).unwrap();
    let a = map.addr();

    // Misaligned start and length.
    let e = u.register(a + 1, PAGE, RegisterMode::MISSING).unwrap_err();
    assert_eq!(range_err(&e), (Op::Register, libc::EINVAL));
    let e = u.register(a, PAGE + 1, RegisterMode::MISSING).unwrap_err();
    assert_eq!(range_err(&e), (Op::Register, libc::EINVAL));
    // A mode anonymous memory does not support.
    let e = u.register(a, PAGE, RegisterMode::MINOR).unwrap_err();
    assert_eq!(range_err(&e), (Op::Register, libc::EINVAL));
    // No mode at all.
    let e = u.register(a, PAGE, RegisterMode::empty()).unwrap_err();
    assert_eq!(range_err(&e).0, Op::Register);
    // Unmapped memory (beyond the mapping, after unmapping a spare one).
    let gone = Mapping::new(MemoryKind::Anonymous, PAGE as usize).unwrap();
    let gone_addr = gone.addr();
    drop(gone);
    let e = u
        .register(gone_addr, PAGE, RegisterMode::MISSING)
        .unwrap_err();
    assert_eq!(range_err(&e).0, Op::Register);

    // Operations on a range that is not registered.
    // SAFETY: `map` is only accessed through copies and atomics.
    let e = unsafe { u.copy(a, &[0u8; PAGE as usize], CopyMode::empty()) }.unwrap_err();
    assert_eq!(range_err(&e).0, Op::Copy);
    assert_eq!(e.done(), 0);
    let e = u.zeropage(a, PAGE, Wake::Yes).unwrap_err();
    assert_eq!(range_err(&e).0, Op::ZeroPage);
    let e = u.write_protect(a, PAGE).unwrap_err();
    assert_eq!(range_err(&e).0, Op::WriteProtect);
    let e = u.continue_range(a, PAGE, Wake::Yes).unwrap_err();
    assert_eq!(range_err(&e).0, Op::Continue);

    // Registered for MISSING only: write-protect and continue are refused.
    u.register(a, 4 * PAGE, RegisterMode::MISSING).unwrap();
    let e = u.write_protect(a, PAGE).unwrap_err();
    assert_eq!(range_err(&e).0, Op::WriteProtect);
    let e = u.continue_range(a, PAGE, Wake::Yes).unwrap_err();
    assert_eq!(range_err(&e).0, Op::Continue);
    // A misaligned copy destination.
    // SAFETY: as above.
    let e = unsafe { u.copy(a + 8, &[0u8; PAGE as usize], CopyMode::empty()) }.unwrap_err();
    assert_eq!(range_err(&e), (Op::Copy, libc::EINVAL));
    // A zero-length zeropage.
    let e = u.zeropage(a, 0, Wake::Yes).unwrap_err();
    assert_eq!(range_err(&e).0, Op::ZeroPage);

    // Unregistering works, and afterwards the range is a plain one again.
    u.unregister(a, 4 * PAGE).unwrap();
    assert_eq!(map.load_u8(0).unwrap(), 0, "no fault once unregistered");
    let e = u.unregister(a + 1, PAGE).unwrap_err();
    assert_eq!(range_err(&e), (Op::Unregister, libc::EINVAL));
    // The messages carry the range in hex.
    assert!(e.to_string().contains(&format!("{:#x}", a + 1)), "{e}");
}

#[test]
fn mapping_placement_is_bounds_checked() {
    let test = "mapping_placement_is_bounds_checked";
    let Some(u) = uffd(test, Features::empty()) else {
        return;
    };
    let map = Mapping::new(MemoryKind::Anonymous, 2 * PAGE as usize).unwrap();
    u.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .unwrap();
    let page = [1u8; PAGE as usize];
    let e = map
        .copy_in(&u, 2 * PAGE as usize, &page, CopyMode::empty())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfBounds {
                offset: 8192,
                len: 4096,
                size: 8192
            }
        ),
        "{e:?}"
    );
    let e = map.zero_in(&u, usize::MAX, 1, Wake::Yes).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
    assert_eq!(
        map.copy_in(&u, PAGE as usize, &page, CopyMode::empty())
            .unwrap(),
        PAGE
    );
    assert_eq!(map.zero_in(&u, 0, PAGE as usize, Wake::Yes).unwrap(), PAGE);
    assert_eq!(map.load_u8(PAGE as usize).unwrap(), 1);
}
