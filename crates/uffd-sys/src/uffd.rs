//! The userfaultfd handle: opening, feature negotiation, registration, resolution ioctls
//! and event reads.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use crate::abi::{self, uffd_msg};
use crate::error::{Error, Op, Result};
use crate::event::{Event, EventBuf};
use crate::flags::{Features, Ioctls, RegisterMode};

/// The path to the userfaultfd device node (Linux 6.1 and later).
pub const DEV_USERFAULTFD: &str = "/dev/userfaultfd";

/// How a userfaultfd descriptor was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPath {
    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: governed by the node's file
    /// permissions, and handles kernel-mode faults without `CAP_SYS_PTRACE`.
    DevNode,
    /// The `userfaultfd(2)` system call: kernel-mode faults need `CAP_SYS_PTRACE` or
    /// `vm.unprivileged_userfaultfd = 1`.
    Syscall,
}

impl std::fmt::Display for OpenPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpenPath::DevNode => "/dev/userfaultfd",
            OpenPath::Syscall => "userfaultfd(2)",
        })
    }
}

/// Which ways of opening a descriptor to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenPreference {
    /// `/dev/userfaultfd` first, the system call where the node is absent or refused.
    #[default]
    Auto,
    /// Only `/dev/userfaultfd`.
    DevNodeOnly,
    /// Only the system call.
    SyscallOnly,
}

/// Opens an un-negotiated descriptor (close-on-exec, non-blocking, kernel-mode faults
/// included). Returns it with the path that worked.
pub fn open_raw(pref: OpenPreference) -> Result<(OwnedFd, OpenPath)> {
    let not_tried = || io::Error::new(io::ErrorKind::Unsupported, "not tried");
    let dev = match pref {
        OpenPreference::SyscallOnly => Err(not_tried()),
        _ => open_dev_node(),
    };
    let dev = match dev {
        Ok(fd) => return Ok((fd, OpenPath::DevNode)),
        Err(e) => e,
    };
    let syscall = match pref {
        OpenPreference::DevNodeOnly => Err(not_tried()),
        _ => open_syscall(),
    };
    match syscall {
        Ok(fd) => Ok((fd, OpenPath::Syscall)),
        Err(syscall) => Err(Error::Open { dev, syscall }),
    }
}

fn open_dev_node() -> io::Result<OwnedFd> {
    let node = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(DEV_USERFAULTFD)?;
    // SAFETY: `node` is an open descriptor of /dev/userfaultfd for the whole call;
    // USERFAULTFD_IOC_NEW takes its flags by value and touches no memory of ours.
    let fd = unsafe {
        libc::ioctl(
            node.as_raw_fd(),
            abi::USERFAULTFD_IOC_NEW as libc::Ioctl,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl succeeded, so `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_syscall() -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes its flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the system call succeeded, so `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs one ioctl whose argument is `arg`, mapping -1 to the errno.
fn ioctl<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the `#[repr(C)]` struct whose size is encoded in
    // `request` (checked at compile time in `abi`), so the kernel reads and writes
    // exactly `size_of::<T>()` bytes of `arg`, which is a valid exclusive reference.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            request as libc::Ioctl,
            std::ptr::from_mut(arg),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Performs the UFFDIO_API handshake on a fresh descriptor. On success returns the
/// features the kernel offers and the ioctls the handle supports.
fn api(fd: BorrowedFd<'_>, requested: Features) -> Result<(Features, Ioctls)> {
    let mut arg = abi::uffdio_api {
        api: abi::UFFD_API,
        features: requested.bits(),
        ioctls: 0,
    };
    ioctl(fd, abi::UFFDIO_API, &mut arg).map_err(|source| Error::Api { requested, source })?;
    Ok((
        Features::from_bits_retain(arg.features),
        Ioctls::from_bits_retain(arg.ioctls),
    ))
}

/// What the kernel offers: every feature it reports and the handle-level ioctls. Opens
/// and closes a throw-away descriptor, because a descriptor can be negotiated only once.
pub fn query_features(pref: OpenPreference) -> Result<(Features, Ioctls, OpenPath)> {
    let (fd, path) = open_raw(pref)?;
    let (features, ioctls) = api(fd.as_fd(), Features::empty())?;
    Ok((features, ioctls, path))
}

/// Builds a [`Uffd`]: which features it must have, which it would like.
#[derive(Debug, Clone, Default)]
pub struct UffdBuilder {
    required: Features,
    wanted: Features,
    pref: OpenPreference,
}

impl UffdBuilder {
    /// Features without which `open` fails with [`Error::MissingFeatures`].
    pub fn require(mut self, features: Features) -> Self {
        self.required |= features;
        self
    }

    /// Features enabled where the kernel offers them.
    pub fn request(mut self, features: Features) -> Self {
        self.wanted |= features;
        self
    }

    /// Which ways of opening to try.
    pub fn open_preference(mut self, pref: OpenPreference) -> Self {
        self.pref = pref;
        self
    }

    /// Opens and negotiates the handle.
    pub fn open(self) -> Result<Uffd> {
        let (available, _, _) = query_features(self.pref)?;
        let missing = self.required - available;
        if !missing.is_empty() {
            return Err(Error::MissingFeatures { missing, available });
        }
        let requested = self.required | (self.wanted & available);
        let (fd, path) = open_raw(self.pref)?;
        let (_, ioctls) = api(fd.as_fd(), requested)?;
        // WP_ASYNC implies WP_UNPOPULATED in the kernel.
        let mut features = requested;
        if features.contains(Features::WP_ASYNC) {
            features |= Features::WP_UNPOPULATED;
        }
        Ok(Uffd {
            fd,
            path,
            features,
            available,
            ioctls,
        })
    }
}

bitflags::bitflags! {
    /// Modes of [`Uffd::copy`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake the threads waiting on the range (wake them later, in one call).
        const DONTWAKE = abi::UFFDIO_COPY_MODE_DONTWAKE;
        /// Map the copied pages write-protected (needs WP registration).
        const WP = abi::UFFDIO_COPY_MODE_WP;
    }
}

/// Whether a resolving call wakes the threads waiting on its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wake {
    /// Wake them (the default).
    #[default]
    Yes,
    /// Leave them waiting; a later [`Uffd::wake`] wakes them.
    No,
}

/// A negotiated userfaultfd.
///
/// Every method takes `&self`: the kernel serialises what needs serialising, so one
/// handle can be shared by a fault thread and the threads that place pages.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    path: OpenPath,
    features: Features,
    available: Features,
    ioctls: Ioctls,
}

impl Uffd {
    /// A builder; see [`UffdBuilder`].
    pub fn builder() -> UffdBuilder {
        UffdBuilder::default()
    }

    /// Opens a handle with no optional features.
    pub fn new() -> Result<Self> {
        Self::builder().open()
    }

    /// How the descriptor was opened.
    pub fn open_path(&self) -> OpenPath {
        self.path
    }

    /// The features enabled on this handle.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Every feature the kernel offers.
    pub fn available_features(&self) -> Features {
        self.available
    }

    /// The handle-level ioctls (from UFFDIO_API).
    pub fn api_ioctls(&self) -> Ioctls {
        self.ioctls
    }

    fn range_ioctl<T>(
        &self,
        op: Op,
        start: u64,
        len: u64,
        request: u64,
        arg: &mut T,
    ) -> Result<()> {
        ioctl(self.fd.as_fd(), request, arg).map_err(|source| Error::Range {
            op,
            start,
            len,
            done: 0,
            source,
        })
    }

    /// Registers `[start, start + len)` (page-aligned, within one or more mappings) for
    /// the faults of `mode`. Returns the ioctls the range supports.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<Ioctls> {
        let mut arg = abi::uffdio_register {
            range: abi::uffdio_range { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.range_ioctl(Op::Register, start, len, abi::UFFDIO_REGISTER, &mut arg)?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregisters a range; threads blocked on it are woken and fault normally.
    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        let mut arg = abi::uffdio_range { start, len };
        self.range_ioctl(Op::Unregister, start, len, abi::UFFDIO_UNREGISTER, &mut arg)
    }

    /// Wakes the threads waiting on a range (after `DONTWAKE` resolutions).
    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        let mut arg = abi::uffdio_range { start, len };
        self.range_ioctl(Op::Wake, start, len, abi::UFFDIO_WAKE, &mut arg)
    }

    /// Turns a failed resolving ioctl's count field into `Error::Range`, keeping the
    /// errno, and wakes waiters on `EEXIST` (see [`Uffd::copy`]).
    fn resolve_result(
        &self,
        op: Op,
        start: u64,
        len: u64,
        wake: bool,
        res: io::Result<()>,
        count: i64,
    ) -> Result<u64> {
        match res {
            // On success the kernel's count is the whole length.
            Ok(()) => Ok(len),
            Err(source) => {
                let done = u64::try_from(count).unwrap_or(0);
                if wake && source.raw_os_error() == Some(libc::EEXIST) {
                    // The kernel does not wake on EEXIST; a waiter on a page that another
                    // path placed would otherwise sleep until the next wake. A failure of
                    // this wake is secondary to the EEXIST being reported.
                    let _ = self.wake(start, len);
                }
                Err(Error::Range {
                    op,
                    start,
                    len,
                    done,
                    source,
                })
            }
        }
    }

    /// Atomically places `src` at `dst` (page-aligned, inside a MISSING-registered range)
    /// and, unless `DONTWAKE`, wakes the threads waiting there. Returns the bytes placed.
    ///
    /// Errors keep the kernel's errno: `EEXIST` when a page of the range is already
    /// present (then, unless `DONTWAKE`, the range's waiters are woken all the same, so a
    /// page placed by another path never leaves a thread asleep); `EAGAIN` with
    /// [`Error::done`] bytes placed when the kernel stopped part way (retry the rest).
    ///
    /// # Safety
    ///
    /// `[dst, dst + src.len())` must be memory of this process that no Rust reference
    /// observes as anything but raw bytes: the call writes arbitrary bytes into pages that
    /// were missing, under every reference to them.
    pub unsafe fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> Result<u64> {
        let len = src.len() as u64;
        let mut arg = abi::uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: mode.bits(),
            copy: 0,
        };
        let res = ioctl(self.fd.as_fd(), abi::UFFDIO_COPY, &mut arg);
        self.resolve_result(
            Op::Copy,
            dst,
            len,
            !mode.contains(CopyMode::DONTWAKE),
            res,
            arg.copy,
        )
    }

    /// Maps zero pages over the missing pages of `[start, start + len)` (MISSING
    /// registration). Pages already present are left alone (`EEXIST`, with waiters woken
    /// as for [`Uffd::copy`]). Safe: a missing page of an anonymous mapping reads as
    /// zero anyway, so no byte anybody could have read changes.
    pub fn zeropage(&self, start: u64, len: u64, wake: Wake) -> Result<u64> {
        let mode = match wake {
            Wake::Yes => 0,
            Wake::No => abi::UFFDIO_ZEROPAGE_MODE_DONTWAKE,
        };
        let mut arg = abi::uffdio_zeropage {
            range: abi::uffdio_range { start, len },
            mode,
            zeropage: 0,
        };
        let res = ioctl(self.fd.as_fd(), abi::UFFDIO_ZEROPAGE, &mut arg);
        self.resolve_result(
            Op::ZeroPage,
            start,
            len,
            wake == Wake::Yes,
            res,
            arg.zeropage,
        )
    }

    /// Write-protects `[start, start + len)` (WP registration): writes then block and are
    /// reported as [`crate::FaultKind::WriteProtect`] faults.
    pub fn write_protect(&self, start: u64, len: u64) -> Result<()> {
        self.writeprotect_ioctl(start, len, abi::UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes write protection from `[start, start + len)`, waking the blocked writers
    /// unless `wake` is [`Wake::No`].
    pub fn write_unprotect(&self, start: u64, len: u64, wake: Wake) -> Result<()> {
        let mode = match wake {
            Wake::Yes => 0,
            Wake::No => abi::UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
        };
        self.writeprotect_ioctl(start, len, mode)
    }

    fn writeprotect_ioctl(&self, start: u64, len: u64, mode: u64) -> Result<()> {
        let mut arg = abi::uffdio_writeprotect {
            range: abi::uffdio_range { start, len },
            mode,
        };
        self.range_ioctl(
            Op::WriteProtect,
            start,
            len,
            abi::UFFDIO_WRITEPROTECT,
            &mut arg,
        )
    }

    /// Resolves minor faults on `[start, start + len)` (MINOR registration) by mapping
    /// the pages already in the page cache. Returns the bytes mapped. Safe: the pages
    /// mapped are the ones a normal fault would have mapped.
    pub fn continue_range(&self, start: u64, len: u64, wake: Wake) -> Result<u64> {
        let mode = match wake {
            Wake::Yes => 0,
            Wake::No => abi::UFFDIO_CONTINUE_MODE_DONTWAKE,
        };
        let mut arg = abi::uffdio_continue {
            range: abi::uffdio_range { start, len },
            mode,
            mapped: 0,
        };
        let res = ioctl(self.fd.as_fd(), abi::UFFDIO_CONTINUE, &mut arg);
        self.resolve_result(Op::Continue, start, len, wake == Wake::Yes, res, arg.mapped)
    }

    /// Moves the pages at `src` to the missing pages at `dst` (`MOVE` feature), leaving
    /// holes at `src`. Returns the bytes moved.
    ///
    /// # Safety
    ///
    /// Both ranges must be private anonymous memory of this process that no Rust
    /// reference observes as anything but raw bytes: `dst` receives arbitrary bytes and
    /// `src` becomes missing (zero, or blocking if registered).
    pub unsafe fn move_pages(&self, dst: u64, src: u64, len: u64, wake: Wake) -> Result<u64> {
        let mode = match wake {
            Wake::Yes => 0,
            Wake::No => abi::UFFDIO_MOVE_MODE_DONTWAKE,
        };
        let mut arg = abi::uffdio_move {
            dst,
            src,
            len,
            mode,
            move_: 0,
        };
        let res = ioctl(self.fd.as_fd(), abi::UFFDIO_MOVE, &mut arg);
        self.resolve_result(Op::Move, dst, len, wake == Wake::Yes, res, arg.move_)
    }

    /// Marks the missing pages of `[start, start + len)` as poisoned (`POISON`
    /// feature): any access raises SIGBUS. Returns the bytes poisoned.
    ///
    /// # Safety
    ///
    /// No code of this process may access the range afterwards except to unmap or
    /// replace it: an access kills the process with SIGBUS.
    pub unsafe fn poison(&self, start: u64, len: u64, wake: Wake) -> Result<u64> {
        let mode = match wake {
            Wake::Yes => 0,
            Wake::No => abi::UFFDIO_POISON_MODE_DONTWAKE,
        };
        let mut arg = abi::uffdio_poison {
            range: abi::uffdio_range { start, len },
            mode,
            updated: 0,
        };
        let res = ioctl(self.fd.as_fd(), abi::UFFDIO_POISON, &mut arg);
        self.resolve_result(Op::Poison, start, len, wake == Wake::Yes, res, arg.updated)
    }

    /// Reads the pending events without blocking, up to the buffer's capacity, and
    /// returns them decoded; an empty slice when none is pending.
    pub fn read_events<'b>(&self, buf: &'b mut EventBuf) -> Result<&'b [Event]> {
        buf.events.clear();
        let bytes = buf.raw.len() * std::mem::size_of::<uffd_msg>();
        // SAFETY: `buf.raw` is a live, exclusively borrowed buffer of `bytes` bytes of
        // plain-old-data messages; read(2) writes at most `bytes` bytes into it.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.raw.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(&buf.events),
                _ => Err(Error::Read(e)),
            };
        }
        let n = usize::try_from(n).map_err(|_| Error::ShortRead(0))?;
        let size = std::mem::size_of::<uffd_msg>();
        // Decode every whole message first: a Fork message owns a descriptor.
        buf.events.extend(
            buf.raw[..n / size]
                .iter()
                .map(|m| Event::decode(m, self.features)),
        );
        if n % size != 0 {
            return Err(Error::ShortRead(n));
        }
        Ok(&buf.events)
    }

    /// Waits until events are pending or `timeout` (forever if `None`) passes. Returns
    /// whether events are pending. Interrupted waits are resumed.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool> {
        poll_readable([self.fd.as_raw_fd()], timeout)
            .map(|r| r[0])
            .map_err(Error::Poll)
    }

    /// Waits until events are pending on this handle or `other` (an eventfd that
    /// asks a fault thread to stop, say) is readable, or `timeout` (forever if
    /// `None`) passes. Interrupted waits are resumed. `other` being closed or
    /// broken is an error, as for the handle. (`other` is borrowed for the call,
    /// so its descriptor stays open; `AsRawFd` rather than `AsFd` because
    /// rust-vmm's `EventFd` offers only that.)
    pub fn wait_readable_or(
        &self,
        other: &impl AsRawFd,
        timeout: Option<Duration>,
    ) -> Result<Readiness> {
        let [uffd, other] = poll_readable([self.fd.as_raw_fd(), other.as_raw_fd()], timeout)
            .map_err(Error::Poll)?;
        Ok(Readiness { uffd, other })
    }
}

/// What [`Uffd::wait_readable_or`] found readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// Events are pending on the userfaultfd.
    pub uffd: bool,
    /// The other descriptor is readable.
    pub other: bool,
}

/// Polls descriptors for readability; returns which are readable (none after a
/// timeout). The caller keeps the descriptors open for the call; a closed one is
/// reported as `EBADF`, never acted on.
fn poll_readable<const N: usize>(
    fds: [RawFd; N],
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    let ms = match timeout {
        None => -1,
        Some(t) => i32::try_from(t.as_millis()).unwrap_or(i32::MAX),
    };
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // N is 1 or 2 here; the cast cannot truncate.
    let count = N as libc::nfds_t;
    loop {
        // SAFETY: `pfds` is an exclusively borrowed array of exactly `count` valid
        // pollfds. poll(2) only reads and writes that array; a descriptor that is
        // not open is reported in `revents` (POLLNVAL), never used.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), count, ms) };
        if ret == 0 {
            return Ok([false; N]);
        }
        if ret > 0 {
            // POLLNVAL: a descriptor is not open; POLLERR: it is broken. Neither is
            // "readable".
            if pfds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            if pfds.iter().any(|p| p.revents & libc::POLLERR != 0) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "POLLERR on a polled descriptor",
                ));
            }
            return Ok(pfds.map(|p| p.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
