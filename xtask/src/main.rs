//! Project automation: `cargo xtask <command>`.
//!
//! - `doctor`: host check before migrating: userfaultfd paths, features and memory kinds;
//!   KVM API version and dirty-log capabilities.
//! - `e2e [--json] [--scenario NAME] [--list]`: end-to-end scenarios on the real kernel,
//!   with a summary table.
//! - `bench [--json]`: benchmarks, each figure beside a baseline measured in the same run.
//! - `ci`: what CI runs (`.ci/run`): fmt, clippy, doc and the tests.

#![deny(unsafe_code)]

mod bench;
mod bench_precopy;
mod e2e;
mod json;

use std::process::ExitCode;

const USAGE: &str =
    "usage: cargo xtask <doctor | e2e [--json] [--scenario NAME] [--list] | bench [--json] | ci>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd {
        "doctor" => {
            print!("{}", uffd_sys::probe());
            print!("{}", vmm_glue::kvm::host_report());
            Ok(true)
        }
        "e2e" => e2e::main(rest),
        "bench" => bench::main(rest),
        "ci" => ci(),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(true)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
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

/// Parses `--flag` and `--key VALUE` options; unknown ones are errors.
pub(crate) struct Opts {
    pub json: bool,
    pub list: bool,
    pub scenario: Option<String>,
}

impl Opts {
    pub(crate) fn parse(args: &[String], allow_scenario: bool) -> Result<Opts, String> {
        let mut o = Opts {
            json: false,
            list: false,
            scenario: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--json" => o.json = true,
                "--list" if allow_scenario => o.list = true,
                "--scenario" if allow_scenario => {
                    o.scenario = Some(it.next().ok_or("--scenario needs a name")?.clone())
                }
                other => return Err(format!("unknown option {other:?}\n{USAGE}")),
            }
        }
        Ok(o)
    }
}
