//! `demovm`: a minimal VMM that runs a guest and migrates it, driven over QMP.
//!
//! ```text
//! demovm --mem 512M [--vcpus N] [--guest builtin:ab|builtin:random|builtin:idle|FILE]
//!        [--qmp PATH] [--serial PATH] [--incoming URI|defer] [--accel auto|kvm|soft]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};

use vmm_glue::controller::{Controller, QmpFace};
use vmm_glue::qmp::{EventBus, Greeting, QmpServer};
use vmm_glue::vm::{Accel, GuestSpec, Vm, VmConfig};
use vmm_glue::Logger;

const USAGE: &str =
    "usage: demovm --mem SIZE [--vcpus N] [--guest builtin:ab|builtin:random|builtin:idle|FILE]
              [--qmp PATH] [--serial PATH] [--incoming URI|defer] [--accel auto|kvm|soft]
  SIZE: bytes with an optional K, M or G suffix (e.g. 512M)
  URI:  tcp:HOST:PORT | unix:PATH | file:PATH
  DEMOVM_LOG=error|warn|info|debug sets the log level (default info)";

/// Parses `512M`, `1G`, `65536`.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

struct Args {
    config: VmConfig,
    qmp: Option<PathBuf>,
    incoming: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut mem = None;
    let mut config = VmConfig {
        mem_size: 0,
        vcpus: 1,
        guest: GuestSpec::parse("builtin:ab")?,
        serial: None,
        accel: Accel::Auto,
    };
    let (mut qmp, mut incoming) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--mem" => mem = Some(parse_size(&val()?)?),
            "--vcpus" => {
                config.vcpus = val()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or("--vcpus takes 1 to 64")?
            }
            "--guest" => config.guest = GuestSpec::parse(&val()?)?,
            "--serial" => config.serial = Some(PathBuf::from(val()?)),
            "--qmp" => qmp = Some(PathBuf::from(val()?)),
            "--incoming" => incoming = Some(val()?),
            "--accel" => {
                config.accel = match val()?.as_str() {
                    "auto" => Accel::Auto,
                    "kvm" => Accel::Kvm,
                    "soft" => Accel::Soft,
                    o => return Err(format!("unknown accelerator {o:?}")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            o => return Err(format!("unknown argument {o:?}")),
        }
    }
    config.mem_size = mem.ok_or("--mem is required")?;
    Ok(Args {
        config,
        qmp,
        incoming,
    })
}

fn main() -> ExitCode {
    Logger::install_from_env("DEMOVM_LOG");
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("demovm: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let vm = match Vm::new(args.config) {
        Ok(vm) => Arc::new(vm),
        Err(e) => {
            eprintln!("demovm: {}", vmm_glue::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "demovm: {} MiB, {} vCPU(s), guest {:?}, accel {}{}",
        vm.config.mem_size >> 20,
        vm.vcpus.count(),
        vm.config.guest,
        vm.vcpus.accel(),
        vm.accel_note
            .as_deref()
            .map(|n| format!(" [{n}]"))
            .unwrap_or_default()
    );
    let events = EventBus::new();
    let (quit_tx, quit_rx) = mpsc::channel();
    let ctl = Controller::new(Arc::clone(&vm), Arc::clone(&events), quit_tx);
    let _qmp = match &args.qmp {
        Some(path) => match QmpServer::bind(
            path,
            Greeting {
                version: (9, 2, 0),
                package: format!("demovm {}", env!("CARGO_PKG_VERSION")),
            },
            Arc::new(QmpFace(Arc::clone(&ctl))),
            events,
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("demovm: cannot serve QMP on {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let started = match args.incoming.as_deref() {
        Some("defer") => ctl.expect_incoming(None),
        Some(uri) => ctl.expect_incoming(Some(uri)),
        None => ctl.start_guest(),
    };
    if let Err(e) = started {
        eprintln!("demovm: {}", e.desc);
        return ExitCode::FAILURE;
    }
    // Runs until `quit`.
    let _ = quit_rx.recv();
    ExitCode::SUCCESS
}
