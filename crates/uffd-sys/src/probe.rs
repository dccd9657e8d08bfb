//! Host probe: is userfaultfd usable here, how, and for which memory.
//!
//! Every answer comes from trying the real thing (opening descriptors, negotiating,
//! registering a mapping of each kind in each mode), not from version numbers.

use std::fmt;

use crate::mapping::{default_huge_page_size, Mapping, MemoryKind};
use crate::uffd::{open_raw, query_features, OpenPath, OpenPreference, DEV_USERFAULTFD};
use crate::{Error, Features, Ioctls, RegisterMode, Uffd};

/// Whether one registration mode works on one memory kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeSupport {
    /// Registration worked; the range supports these ioctls.
    Supported(Ioctls),
    /// It did not; why.
    Unsupported(String),
}

/// What the probe found for one memory kind.
#[derive(Debug, Clone)]
pub struct MemorySupport {
    /// The memory kind.
    pub kind: MemoryKind,
    /// Its page size, when a mapping could be made.
    pub page_size: Option<usize>,
    /// MISSING, WP and MINOR registration, in that order.
    pub modes: Vec<(RegisterMode, ModeSupport)>,
}

impl MemorySupport {
    /// Whether `mode` is supported on this memory kind.
    pub fn supports(&self, mode: RegisterMode) -> bool {
        self.modes
            .iter()
            .any(|(m, s)| *m == mode && matches!(s, ModeSupport::Supported(_)))
    }
}

/// The host's userfaultfd facts.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `/dev/userfaultfd`: `Ok` if a descriptor could be made through it, else why not.
    pub dev_node: Result<(), String>,
    /// The `userfaultfd(2)` system call (kernel-mode faults included), likewise.
    pub syscall: Result<(), String>,
    /// The path a default [`Uffd::new`] uses, if any works.
    pub path: Option<OpenPath>,
    /// The features the kernel offers, if a handshake worked.
    pub features: Option<Features>,
    /// The handle-level ioctls, if a handshake worked.
    pub ioctls: Option<Ioctls>,
    /// `vm.unprivileged_userfaultfd`, if readable.
    pub unprivileged_userfaultfd: Option<String>,
    /// Transparent huge page mode (the bracketed word of
    /// /sys/kernel/mm/transparent_hugepage/enabled), if readable.
    pub thp: Option<String>,
    /// Free huge pages of the default size, if readable.
    pub free_huge_pages: Option<u64>,
    /// Per memory kind: which registration modes work.
    pub memory: Vec<MemorySupport>,
}

impl Probe {
    /// Whether userfaultfd can be used at all.
    pub fn usable(&self) -> bool {
        self.features.is_some()
    }

    /// The support entry of one memory kind.
    pub fn memory(&self, kind: MemoryKind) -> Option<&MemorySupport> {
        self.memory.iter().find(|m| m.kind == kind)
    }
}

/// The host's transparent huge page mode, from
/// `/sys/kernel/mm/transparent_hugepage/enabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ThpMode {
    /// `always`: every anonymous mapping may get huge pages.
    Always,
    /// `madvise`: only ranges advised with `MADV_HUGEPAGE`.
    Madvise,
    /// `never`.
    Never,
}

/// The host's transparent huge page mode; `None` when the kernel has no THP or the
/// file cannot be read.
pub fn thp_mode() -> Option<ThpMode> {
    let s = read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled")?;
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    match &s[start + 1..end] {
        "always" => Some(ThpMode::Always),
        "madvise" => Some(ThpMode::Madvise),
        "never" => Some(ThpMode::Never),
        _ => None,
    }
}

impl Uffd {
    /// Whether faults the kernel itself takes on this process's memory reach this
    /// handle, as KVM's do when it touches guest memory for a vCPU.
    ///
    /// Tries it: maps a page, registers it for MISSING faults, and has a thread
    /// `read(2)` from a socket into it, so the kernel's copy to user memory faults in
    /// kernel mode. Delivered, the fault arrives here and is resolved with a zero
    /// page; not delivered (a handle that only sees user-mode faults), the read fails
    /// with `EFAULT` and no fault arrives. The page is unregistered and the thread
    /// joined before returning. The handle must have no other registered range with
    /// faults pending, since this reads its events.
    pub fn check_kernel_mode_faults(&self) -> crate::Result<bool> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;

        use crate::{Event, EventBuf, Wake};

        let page = Mapping::new(MemoryKind::Anonymous, 1).map_err(|source| Error::Memory {
            op: crate::MemoryOp::Mmap,
            start: 0,
            len: 0,
            source,
        })?;
        let (start, len) = (page.addr(), page.len() as u64);
        self.register(start, len, RegisterMode::MISSING)?;
        let io_err = |source| Error::Read(source);
        let result = (|| {
            let (mut tx, rx) = UnixStream::pair().map_err(io_err)?;
            tx.write_all(&[0x5a; 8]).map_err(io_err)?;
            let reader = std::thread::Builder::new()
                .name("uffd-kprobe".into())
                .spawn(move || {
                    // SAFETY: `start` is the first byte of `page`, a live mapping of at
                    // least 8 bytes that outlives this thread (it is joined below before
                    // `page` drops) and is only ever accessed by raw copies, never
                    // through references; `rx` is an open socket owned by this thread.
                    let n = unsafe { libc::read(rx.as_raw_fd(), start as *mut libc::c_void, 8) };
                    n == 8
                })
                .map_err(io_err)?;
            let mut events = EventBuf::new(4);
            let mut faulted = false;
            let outcome = loop {
                if faulted || reader.is_finished() {
                    break Ok(());
                }
                match self.wait_readable(Some(std::time::Duration::from_millis(10))) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => break Err(e),
                }
                match self.read_events(&mut events) {
                    Ok(evs) => {
                        if evs.iter().any(|e| matches!(e, Event::PageFault(_))) {
                            faulted = true;
                            // The reader is blocked in the kernel on the page: give it
                            // one so the read completes. EEXIST cannot happen.
                            if let Err(e) = self.zeropage(start, len, Wake::Yes) {
                                break Err(e);
                            }
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            if outcome.is_err() && !faulted {
                // Never leave the reader blocked: unregistering wakes it.
                let _ = self.unregister(start, len);
            }
            let read_ok = reader.join().unwrap_or(false);
            outcome.map(|()| faulted && read_ok)
        })();
        let unregistered = self.unregister(start, len);
        let delivered = result?;
        unregistered?;
        Ok(delivered)
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Features a registration of `mode` on `kind` needs beyond the basic API.
fn features_for(kind: MemoryKind, mode: RegisterMode) -> Features {
    match (kind, mode) {
        (MemoryKind::Shmem, RegisterMode::MISSING) => Features::MISSING_SHMEM,
        (MemoryKind::Hugetlbfs, RegisterMode::MISSING) => Features::MISSING_HUGETLBFS,
        (MemoryKind::Anonymous, RegisterMode::WP) => Features::PAGEFAULT_FLAG_WP,
        (_, RegisterMode::WP) => Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM,
        (MemoryKind::Shmem, RegisterMode::MINOR) => Features::MINOR_SHMEM,
        (MemoryKind::Hugetlbfs, RegisterMode::MINOR) => Features::MINOR_HUGETLBFS,
        _ => Features::empty(),
    }
}

fn probe_mode(kind: MemoryKind, mode: RegisterMode) -> ModeSupport {
    let uffd = match Uffd::builder().require(features_for(kind, mode)).open() {
        Ok(u) => u,
        Err(e) => return ModeSupport::Unsupported(e.to_string()),
    };
    let map = match Mapping::new(kind, 1) {
        Ok(m) => m,
        Err(e) => return ModeSupport::Unsupported(format!("cannot map {kind} memory: {e}")),
    };
    match uffd.register(map.addr(), map.len() as u64, mode) {
        Ok(ioctls) => ModeSupport::Supported(ioctls),
        Err(e) => ModeSupport::Unsupported(match e.errno() {
            Some(libc::EINVAL) => {
                format!("the kernel refuses {mode} registration of {kind} memory")
            }
            _ => e.to_string(),
        }),
    }
}

fn probe_memory(kind: MemoryKind, usable: bool) -> MemorySupport {
    let mapped = Mapping::new(kind, 1).map(|m| m.page_size());
    let page_size = match kind {
        MemoryKind::Hugetlbfs => default_huge_page_size(),
        _ => mapped.as_ref().ok().copied(),
    };
    let modes = [RegisterMode::MISSING, RegisterMode::WP, RegisterMode::MINOR]
        .into_iter()
        .map(|mode| {
            let s = if !usable {
                ModeSupport::Unsupported("userfaultfd unusable".into())
            } else if let Err(e) = &mapped {
                ModeSupport::Unsupported(match kind {
                    MemoryKind::Hugetlbfs => format!(
                        "cannot map hugetlbfs memory ({e}): reserve huge pages with vm.nr_hugepages"
                    ),
                    _ => format!("cannot map {kind} memory: {e}"),
                })
            } else {
                probe_mode(kind, mode)
            };
            (mode, s)
        })
        .collect();
    MemorySupport {
        kind,
        page_size,
        modes,
    }
}

/// Probes this host. Never fails: what does not work is reported with the reason.
pub fn probe() -> Probe {
    let dev_node = open_raw(OpenPreference::DevNodeOnly)
        .map(drop)
        .map_err(|e| match e {
            crate::Error::Open { dev, .. } => format!("{DEV_USERFAULTFD}: {dev}"),
            e => e.to_string(),
        });
    let syscall = open_raw(OpenPreference::SyscallOnly)
        .map(drop)
        .map_err(|e| match e {
            crate::Error::Open { syscall, .. } => format!("userfaultfd(2): {syscall}"),
            e => e.to_string(),
        });
    let api = query_features(OpenPreference::Auto).ok();
    let usable = api.is_some();
    let free_huge_pages = default_huge_page_size().and_then(|size| {
        read_trimmed(&format!(
            "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
            size / 1024
        ))
        .and_then(|s| s.parse().ok())
    });
    let thp = read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled").and_then(|s| {
        let start = s.find('[')?;
        let end = s[start..].find(']')? + start;
        Some(s[start + 1..end].to_owned())
    });
    Probe {
        dev_node,
        syscall,
        path: api.map(|(_, _, p)| p),
        features: api.map(|(f, _, _)| f),
        ioctls: api.map(|(_, i, _)| i),
        unprivileged_userfaultfd: read_trimmed("/proc/sys/vm/unprivileged_userfaultfd"),
        thp,
        free_huge_pages,
        memory: [
            MemoryKind::Anonymous,
            MemoryKind::Shmem,
            MemoryKind::Hugetlbfs,
        ]
        .into_iter()
        .map(|k| probe_memory(k, usable))
        .collect(),
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = |r: &Result<(), String>| match r {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("unusable: {e}"),
        };
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
        writeln!(f, "userfaultfd")?;
        writeln!(
            f,
            "  usable:                   {}",
            if self.usable() { "yes" } else { "NO" }
        )?;
        match self.path {
            Some(p) => writeln!(f, "  opened through:           {p}")?,
            None => writeln!(f, "  opened through:           nothing works")?,
        }
        writeln!(f, "  /dev/userfaultfd:         {}", status(&self.dev_node))?;
        writeln!(f, "  userfaultfd(2):           {}", status(&self.syscall))?;
        writeln!(
            f,
            "  vm.unprivileged_userfaultfd: {}",
            opt(&self.unprivileged_userfaultfd)
        )?;
        if let Some(feat) = self.features {
            writeln!(f, "  features:                 {feat}")?;
        }
        if let Some(io) = self.ioctls {
            writeln!(f, "  handle ioctls:            {io}")?;
        }
        writeln!(f, "  transparent huge pages:   {}", opt(&self.thp))?;
        match self.free_huge_pages {
            Some(n) => writeln!(f, "  free huge pages:          {n}")?,
            None => writeln!(f, "  free huge pages:          unknown")?,
        }
        writeln!(f, "  registration by memory kind:")?;
        for m in &self.memory {
            let ps = m
                .page_size
                .map_or("-".into(), |p| format!("{} KiB pages", p / 1024));
            writeln!(f, "    {} ({ps})", m.kind)?;
            for (mode, s) in &m.modes {
                match s {
                    ModeSupport::Supported(i) => {
                        writeln!(f, "      {:<8} yes  ioctls {i}", mode.to_string())?
                    }
                    ModeSupport::Unsupported(why) => {
                        writeln!(f, "      {:<8} no   {why}", mode.to_string())?
                    }
                }
            }
        }
        Ok(())
    }
}
