//! Project automation: `cargo xtask <command>`; `cargo xtask --help` lists them and
//! `cargo xtask <command> --help` explains one.
//!
//! - `doctor`: host check before migrating: userfaultfd paths, features and memory kinds;
//!   KVM API version and dirty-log capabilities.
//! - `e2e [--json] [--scenario NAME] [--list]`: end-to-end scenarios on the real kernel,
//!   with a summary table; progress on stderr.
//! - `bench [--json] [--only GROUP] [--vs-qemu]`: benchmarks, each figure beside a
//!   baseline measured in the same run; `--vs-qemu` migrates the same guest with QEMU and
//!   with `demovm`, side by side.
//! - `guests [--touch SIZE] [--out DIR]`: writes the boot-sector guests (`guests/` as
//!   committed, with no options).
//! - `linux-guest [--out DIR]`: the Linux test guest (Debian's kernel, busybox and our
//!   workload in an initramfs), fetched with `apt-get download` and cached.
//! - `ci`: what CI runs (`.ci/run`): fmt, clippy, doc and the tests.
//! - `qmp SOCKET COMMAND [JSON-ARGS] [--events]`: one QMP command against a running
//!   `demovm`, its `return` printed as pretty JSON.
//!
//! Exit status: 0 when all went well, 1 when something checked failed (a scenario, a
//! QMP command), 2 for usage errors and when the command could not do its work.

#![deny(unsafe_code)]

mod bench;
mod bench_dirty;
mod bench_postcopy;
mod bench_precopy;
mod bench_qemu;
mod bench_snapshot;
mod e2e;
mod guests;
mod linux_guest;
mod qmp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Project automation for the live-migration workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Host check: userfaultfd paths, features and memory kinds; KVM facts.
    Doctor,
    /// End-to-end scenarios between real demovm processes, summed up in a table.
    E2e(e2e::Args),
    /// Benchmarks, each figure beside a baseline measured in the same run.
    Bench(bench::Args),
    /// Writes the boot-sector guests (ab.bin, random.bin); with no options, guests/ as
    /// committed.
    Guests(guests::Args),
    /// Fetches Debian's kernel and busybox-static and builds the Linux test guest
    /// (bzImage and initramfs in target/linux-guest, cached).
    LinuxGuest(linux_guest::Args),
    /// What CI runs (.ci/run): fmt, clippy, doc and the tests.
    Ci,
    /// One QMP command against a running demovm; prints its `return` as pretty JSON.
    Qmp(qmp::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Doctor => {
            print!("{}", uffd_sys::probe());
            print!("{}", vmm_glue::kvm::host_report());
            Ok(true)
        }
        Command::E2e(a) => e2e::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Guests(a) => guests::main(a),
        Command::LinuxGuest(a) => linux_guest::main(a),
        Command::Ci => ci(),
        Command::Qmp(a) => qmp::main(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs `.ci/run`, the one definition of what CI checks.
fn ci() -> Result<bool, String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?;
    let status = std::process::Command::new("bash")
        .arg(root.join(".ci/run"))
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run .ci/run: {e}"))?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_is_a_success_for_every_command() {
        for args in [
            &["--help"][..],
            &["help"],
            &["doctor", "--help"],
            &["e2e", "--help"],
            &["bench", "--help"],
            &["guests", "--help"],
            &["ci", "--help"],
            &["qmp", "--help"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{args:?}");
            // clap prints help on stdout and exits 0 for this kind.
            assert_eq!(e.exit_code(), 0, "{args:?}");
            assert!(!e.use_stderr(), "{args:?}: help goes to stdout");
        }
        let top = Cli::command().render_help().to_string();
        for cmd in ["doctor", "e2e", "bench", "guests", "ci", "qmp"] {
            assert!(top.contains(cmd), "{cmd} missing from:\n{top}");
        }
    }

    #[test]
    fn scenario_takes_its_name_either_way() {
        for args in [
            &["e2e", "--scenario", "precopy-live-ab"][..],
            &["e2e", "--scenario=precopy-live-ab"],
        ] {
            let Command::E2e(a) = parse(args).unwrap().command else {
                panic!("{args:?} is not e2e");
            };
            assert_eq!(a.scenario.as_deref(), Some("precopy-live-ab"));
        }
        let e = parse(&["e2e", "--scenario=nonesuch"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        assert!(
            e.to_string().contains("precopy-live-ab"),
            "the error names the scenarios: {e}"
        );
    }

    #[test]
    fn guests_defaults_to_the_committed_touch_size() {
        let Command::Guests(a) = parse(&["guests"]).unwrap().command else {
            panic!("not guests");
        };
        assert_eq!(a.touch, vmm_glue::guest::boot_sector::DEFAULT_TOUCH);
        assert_eq!(a.out, None);
        let Command::Guests(a) = parse(&["guests", "--touch", "512M", "--out", "/tmp/g"])
            .unwrap()
            .command
        else {
            panic!("not guests");
        };
        assert_eq!(a.touch, 512 << 20);
        assert_eq!(a.out, Some(std::path::PathBuf::from("/tmp/g")));
        assert_eq!(
            parse(&["guests", "--touch", "lots"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn qmp_takes_socket_command_and_optional_arguments() {
        let Command::Qmp(a) = parse(&["qmp", "/tmp/x.qmp", "query-status"])
            .unwrap()
            .command
        else {
            panic!("not qmp");
        };
        assert_eq!(a.socket, std::path::PathBuf::from("/tmp/x.qmp"));
        assert_eq!(a.command, "query-status");
        assert_eq!(a.args, None);
        assert!(!a.events);
        let Command::Qmp(a) = parse(&["qmp", "--events", "s", "migrate", r#"{"uri": "tcp:h:1"}"#])
            .unwrap()
            .command
        else {
            panic!("not qmp");
        };
        assert_eq!(a.args.as_deref(), Some(r#"{"uri": "tcp:h:1"}"#));
        assert!(a.events);
        assert_eq!(
            parse(&["qmp", "s"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse(&["bogus"]).unwrap_err().kind(),
            ErrorKind::InvalidSubcommand
        );
    }
}
