//! The userfaultfd kernel ABI, written by hand from `include/uapi/linux/userfaultfd.h`.
//!
//! Nothing here is generated: every struct is `#[repr(C)]` with its size asserted at
//! compile time, and every ioctl number is computed with the kernel's `_IOC` formula and
//! asserted against the value the kernel headers give. A test in `tests/c_headers.rs`
//! also compiles a C probe against the system headers, where a C compiler is present,
//! and compares the numbers the headers give with these.

#![allow(missing_docs)] // The names are the kernel's; their meaning is documented there.

use std::mem::size_of;

/// The ioctl type byte of userfaultfd (`UFFDIO`).
pub const UFFDIO: u32 = 0xAA;
/// The API version the kernel speaks (`UFFD_API`).
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: only user-mode faults are delivered. Never used by this crate
/// for guest memory, because KVM touches guest pages from kernel mode.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

// The `_IOC` encoding of asm-generic/ioctl.h, which x86_64 and aarch64 use.
const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// The kernel's `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u64 {
    assert!(size < (1 << IOC_SIZEBITS), "ioctl argument too large");
    ((dir << IOC_DIRSHIFT) | (ty << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT)) as u64
        | ((size as u64) << IOC_SIZESHIFT)
}
/// `_IO(type, nr)`.
pub const fn io(ty: u32, nr: u32) -> u64 {
    ioc(IOC_NONE, ty, nr, 0)
}
/// `_IOR(type, nr, T)`.
pub const fn ior<T>(ty: u32, nr: u32) -> u64 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}
/// `_IOWR(type, nr, T)`.
pub const fn iowr<T>(ty: u32, nr: u32) -> u64 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

// Ioctl command numbers (the `_UFFDIO_*` values), also the bit positions in the
// `ioctls` masks returned by UFFDIO_API and UFFDIO_REGISTER.
pub const _UFFDIO_REGISTER: u32 = 0x00;
pub const _UFFDIO_UNREGISTER: u32 = 0x01;
pub const _UFFDIO_WAKE: u32 = 0x02;
pub const _UFFDIO_COPY: u32 = 0x03;
pub const _UFFDIO_ZEROPAGE: u32 = 0x04;
pub const _UFFDIO_MOVE: u32 = 0x05;
pub const _UFFDIO_WRITEPROTECT: u32 = 0x06;
pub const _UFFDIO_CONTINUE: u32 = 0x07;
pub const _UFFDIO_POISON: u32 = 0x08;
pub const _UFFDIO_API: u32 = 0x3F;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_zeropage {
    pub range: uffdio_range,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_continue {
    pub range: uffdio_range,
    pub mode: u64,
    pub mapped: i64,
}

/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    pub updated: i64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_move {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub move_: i64,
}

/// `struct uffd_msg` (packed in the kernel; its natural layout has no padding, so
/// `repr(C)` with 8-byte alignment gives the same 32 bytes).
///
/// The kernel's union `arg` is kept as four raw `u64` words and decoded by
/// the event decoder, so no union access (and no unsafe) is needed to read it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    /// The `arg` union as raw words:
    /// pagefault: `[flags, address, ptid (low 32 bits), -]`; fork: `[ufd (low 32), ..]`;
    /// remap: `[from, to, len, -]`; remove/unmap: `[start, end, -, -]`.
    pub arg: [u64; 3],
}

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// `USERFAULTFD_IOC_NEW`, issued on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u64 = io(UFFDIO, 0x00);
pub const UFFDIO_API: u64 = iowr::<uffdio_api>(UFFDIO, _UFFDIO_API);
pub const UFFDIO_REGISTER: u64 = iowr::<uffdio_register>(UFFDIO, _UFFDIO_REGISTER);
pub const UFFDIO_UNREGISTER: u64 = ior::<uffdio_range>(UFFDIO, _UFFDIO_UNREGISTER);
pub const UFFDIO_WAKE: u64 = ior::<uffdio_range>(UFFDIO, _UFFDIO_WAKE);
pub const UFFDIO_COPY: u64 = iowr::<uffdio_copy>(UFFDIO, _UFFDIO_COPY);
pub const UFFDIO_ZEROPAGE: u64 = iowr::<uffdio_zeropage>(UFFDIO, _UFFDIO_ZEROPAGE);
pub const UFFDIO_MOVE: u64 = iowr::<uffdio_move>(UFFDIO, _UFFDIO_MOVE);
pub const UFFDIO_WRITEPROTECT: u64 = iowr::<uffdio_writeprotect>(UFFDIO, _UFFDIO_WRITEPROTECT);
pub const UFFDIO_CONTINUE: u64 = iowr::<uffdio_continue>(UFFDIO, _UFFDIO_CONTINUE);
pub const UFFDIO_POISON: u64 = iowr::<uffdio_poison>(UFFDIO, _UFFDIO_POISON);

// Struct sizes as the kernel defines them.
const _: () = assert!(size_of::<uffdio_api>() == 24);
const _: () = assert!(size_of::<uffdio_range>() == 16);
const _: () = assert!(size_of::<uffdio_register>() == 32);
const _: () = assert!(size_of::<uffdio_copy>() == 40);
const _: () = assert!(size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<uffdio_continue>() == 32);
const _: () = assert!(size_of::<uffdio_poison>() == 32);
const _: () = assert!(size_of::<uffdio_move>() == 40);
const _: () = assert!(size_of::<uffd_msg>() == 32);

// Ioctl numbers as the x86_64/aarch64 kernel headers expand them.
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(UFFDIO_CONTINUE == 0xc020_aa07);
const _: () = assert!(UFFDIO_POISON == 0xc020_aa08);
