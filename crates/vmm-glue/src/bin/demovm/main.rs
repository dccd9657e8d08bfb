//! `demovm`: a minimal KVM VMM that runs a guest and migrates it, driven over QMP.
//!
//! It is the library's first user and uses only its public API, as a
//! third-party VMM would: it builds guest memory ([`memory`]: anonymous, memfd
//! or hugetlbfs), COM1 (`vmm_glue::serial`), a balloon ([`balloon`]) and vCPUs
//! ([`machine`]) with the guest (a built-in workload, a boot sector or a Linux
//! kernel through `vmm_glue::boot`), hands
//! them to a `vmm_glue::session::Session`, and serves QMP through
//! `vmm_glue::qmp::adapter` over `vmm_glue::qmp::server`.

mod balloon;
mod machine;
mod memory;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};

use clap::Parser;
use vmm_glue::boot::linux::{LinuxImage, DEFAULT_CMDLINE};
use vmm_glue::qmp::adapter::{forward_events, QmpAdapter};
use vmm_glue::qmp::server::{Config as QmpConfig, EventSink, Greeting, Server};
use vmm_glue::serial::SerialConfig;
use vmm_glue::session::RestoreMode;
use vmm_glue::Logger;

use machine::{Accel, Config, GuestSpec};
use memory::MemBackend;

/// A minimal KVM VMM that runs a guest and live-migrates it, driven over QMP.
#[derive(Parser, Debug)]
#[command(name = "demovm", version, long_about = None, after_help = AFTER_HELP)]
struct Args {
    /// Guest RAM: bytes, or with a K, M or G suffix (512M).
    #[arg(long, value_parser = vmm_glue::parse_size)]
    mem: u64,
    /// What backs guest RAM: anonymous memory, a memfd (shared memory), or
    /// hugetlbfs above 2 MiB (2 MiB pages; --mem in whole 2 MiB, free huge
    /// pages in vm.nr_hugepages). Migrate only between VMs of the same backend.
    #[arg(long, value_enum, default_value_t = MemBackend::Anon)]
    mem_backend: MemBackend,
    /// vCPUs (1 to 64).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    vcpus: u16,
    /// builtin:ab | builtin:random | builtin:idle | builtin:balloon, or a
    /// 512-byte boot sector FILE.
    #[arg(long, default_value = "builtin:ab", value_parser = GuestSpec::parse)]
    guest: GuestSpec,
    /// Boot this Linux bzImage (64-bit boot protocol, KVM only) instead of
    /// --guest.
    #[arg(long, value_name = "BZIMAGE", conflicts_with = "guest")]
    kernel: Option<PathBuf>,
    /// The initrd (initramfs) for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel command line for --kernel.
    #[arg(long, value_name = "ARGS", requires = "kernel", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// The QMP socket to serve.
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// COM1: FILE (its output appended to it), or unix:PATH (a listening
    /// socket: a client reads the output and types into the guest). Give
    /// both a file and a socket by repeating it.
    #[arg(long, value_name = "FILE|unix:PATH", value_parser = SerialArg::parse)]
    serial: Vec<SerialArg>,
    /// Wait for an incoming migration: tcp:HOST:PORT, unix:PATH, file:PATH, or
    /// defer (then QMP migrate-incoming).
    #[arg(long, value_name = "URI")]
    incoming: Option<String>,
    /// What runs the vCPUs; auto is KVM where /dev/kvm works, else soft.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Track dirty pages with a KVM dirty ring of N entries per vCPU (the
    /// dirty bitmap where the host has no ring).
    #[arg(long, value_name = "N")]
    dirty_ring: Option<u32>,
    /// Lock guest memory in RAM (mlock). A postcopy destination unlocks it
    /// while postcopy runs and locks it again at the end.
    #[arg(long)]
    mlock: bool,
    /// How `--incoming file:PATH` reads a snapshot file (written by a
    /// background snapshot): eager reads all of RAM first; lazy runs the
    /// guest at once and reads each page on first touch, filling in the rest
    /// in the background.
    #[arg(long, value_enum, requires = "incoming")]
    restore_mode: Option<RestoreModeArg>,
    /// Take RAM's digest at every background snapshot's instant, for QMP
    /// `x-snapshot-digest` (a test hook: it lengthens the snapshot's pause).
    #[arg(long, hide = true)]
    x_snapshot_digest: bool,
    /// Do not start the guest: QMP `cont` starts it (QEMU's -S).
    #[arg(short = 'S', long)]
    paused: bool,
}

const AFTER_HELP: &str = "\
Environment: DEMOVM_LOG=error|warn|info|debug|trace sets the log level (info).
A failed incoming migration leaves the guest unstarted and waiting: QMP migrate-incoming
may start another one.
RAM: anon and memfd lay out pc.ram.low [0, 640K) and pc.ram [1M, top) in 4 KiB pages;
hugetlbfs lays out pc.ram.low, pc.ram.mid [1M, 2M) and pc.ram [2M, top) in 2 MiB pages,
so source and destination of a migration must use the same --mem-backend.
Balloon: ports 0x600 (page frame) and 0x604 (page count) give guest pages back;
QMP x-guest-info shows its counters, x-balloon-inhibit drops requests.
Linux (--kernel): an MP table for the vCPUs and the IOAPIC, no ACPI, no PCI; COM1
(ttyS0) on IRQ 4 is the console; the default --cmdline suits that machine.";

/// One `--serial` backend.
#[derive(Debug, Clone)]
enum SerialArg {
    File(PathBuf),
    Socket(PathBuf),
}

impl SerialArg {
    fn parse(s: &str) -> Result<SerialArg, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path".into()),
            Some(p) => Ok(SerialArg::Socket(p.into())),
            None if s.is_empty() => Err("an empty serial file name".into()),
            None => Ok(SerialArg::File(s.into())),
        }
    }
}

/// COM1's backends from the `--serial` options: at most one file and one
/// socket.
fn serial_config(args: &[SerialArg]) -> Result<SerialConfig, String> {
    let mut c = SerialConfig::new();
    for a in args {
        match a {
            SerialArg::File(p) if c.log.is_none() => c = c.with_log(p),
            SerialArg::Socket(p) if c.socket.is_none() => c = c.with_socket(p),
            _ => return Err("--serial takes at most one file and one unix: socket".into()),
        }
    }
    Ok(c)
}

/// `--restore-mode`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RestoreModeArg {
    Eager,
    Lazy,
}

impl From<RestoreModeArg> for RestoreMode {
    fn from(m: RestoreModeArg) -> Self {
        match m {
            RestoreModeArg::Eager => RestoreMode::Eager,
            RestoreModeArg::Lazy => RestoreMode::Lazy,
        }
    }
}

fn main() -> ExitCode {
    Logger::install_from_env("DEMOVM_LOG");
    let args = Args::parse();
    let serial = match serial_config(&args.serial) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demovm: {e}");
            return ExitCode::from(2);
        }
    };
    let guest = match &args.kernel {
        Some(k) => {
            let mut image = LinuxImage::new(k).with_cmdline(&args.cmdline);
            if let Some(i) = &args.initrd {
                image = image.with_initrd(i);
            }
            GuestSpec::Linux(image)
        }
        None => args.guest.clone(),
    };
    let config = Config {
        mem: args.mem,
        mem_backend: args.mem_backend,
        vcpus: usize::from(args.vcpus),
        guest,
        serial,
        accel: args.accel,
        dirty_ring: args.dirty_ring,
        mlock: args.mlock,
        incoming: args.incoming.is_some(),
        snapshot_digest: args.x_snapshot_digest,
    };
    let demo = match machine::build(&config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demovm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let info = &demo.info;
    eprintln!(
        "demovm: {} MiB ({}), {} vCPU(s), guest {}, accel {}{}",
        args.mem >> 20,
        info.mem_backend.name(),
        info.vcpus,
        info.guest,
        info.accel,
        info.accel_note
            .as_deref()
            .map(|n| format!(" [{n}]"))
            .unwrap_or_default()
    );
    let session = &demo.session;
    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    let events = EventSink::new();
    forward_events(session, events.clone());
    // Listening (or running) before QMP answers: a client that connects
    // as soon as the socket appears sees the incoming address.
    // -S: an incoming guest stays paused once loaded, until QMP `cont`.
    session.set_autostart(!args.paused);
    let started = match (args.incoming.as_deref(), args.restore_mode) {
        (Some(uri), Some(mode)) => match uri.strip_prefix("file:") {
            Some(path) => session.restore(std::path::Path::new(path), mode.into()),
            None => {
                eprintln!("demovm: --restore-mode needs --incoming file:PATH (a snapshot file)");
                return ExitCode::FAILURE;
            }
        },
        (Some("defer"), None) => session.defer_incoming(),
        (Some(uri), None) => session.incoming(uri),
        (None, _) if args.paused => Ok(()),
        (None, _) => session.start(),
    };
    if let Err(e) = started {
        eprintln!("demovm: {}", e.describe());
        return ExitCode::FAILURE;
    }
    let server = match &args.qmp {
        Some(path) => {
            let quit = quit_tx.clone();
            let adapter = QmpAdapter::new(
                Arc::clone(session),
                Box::new(move || {
                    let _ = quit.send(());
                }),
            )
            .with_extension(Arc::clone(&demo.info) as _);
            let greeting = Greeting {
                version: (9, 2, 0),
                package: format!("demovm {}", env!("CARGO_PKG_VERSION")),
            };
            match Server::bind(path, QmpConfig::new(greeting), Arc::new(adapter), events) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!(
                        "demovm: cannot serve QMP on {}: {}",
                        path.display(),
                        vmm_glue::error_chain(&e)
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    // Runs until QMP `quit` (or until killed).
    let _ = quit_rx.recv();
    // The QMP server first (it holds the session), then the session and the
    // vCPUs: every thread is joined.
    drop(server);
    ExitCode::SUCCESS
}
