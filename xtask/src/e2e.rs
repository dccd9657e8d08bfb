//! `cargo xtask e2e`: the end-to-end scenarios of the `tests` crate, run on the real
//! kernel and summed up in a table (or `--json`, one object per scenario).

use e2e::{Failure, SCENARIOS};

use crate::json::{object, Value};
use crate::Opts;

pub fn main(args: &[String]) -> Result<bool, String> {
    let opts = Opts::parse(args, true)?;
    if opts.list {
        for (name, _) in SCENARIOS {
            println!("{name}");
        }
        return Ok(true);
    }
    let chosen: Vec<_> = SCENARIOS
        .iter()
        .filter(|(n, _)| opts.scenario.as_deref().is_none_or(|s| s == *n))
        .collect();
    if chosen.is_empty() {
        return Err(format!(
            "no scenario {:?}; --list shows them",
            opts.scenario.unwrap_or_default()
        ));
    }
    if !opts.json {
        println!(
            "{:<16} {:<8} {:>9} {:>8} {:>8} {:>8}  note",
            "scenario", "status", "total ms", "pages", "faults", "MiB"
        );
    }
    let mut all_ok = true;
    for (name, run) in chosen {
        let (status, ms, pages, faults, mib, note) = match run() {
            Ok(o) => (
                "passed",
                o.total.as_secs_f64() * 1000.0,
                o.pages,
                o.faults,
                o.bytes as f64 / (1024.0 * 1024.0),
                o.note,
            ),
            Err(Failure::Skipped(why)) => ("SKIPPED", 0.0, 0, 0, 0.0, why),
            Err(Failure::Failed(why)) => ("FAILED", 0.0, 0, 0, 0.0, why),
        };
        all_ok &= status != "FAILED";
        if opts.json {
            println!(
                "{}",
                object(&[
                    ("scenario", Value::Str((*name).into())),
                    ("status", Value::Str(status.to_lowercase())),
                    ("total_ms", Value::Num((ms * 10.0).round() / 10.0)),
                    ("pages", Value::Int(pages)),
                    ("faults", Value::Int(faults)),
                    ("mib", Value::Num((mib * 10.0).round() / 10.0)),
                    ("note", Value::Str(note)),
                ])
            );
        } else {
            println!("{name:<16} {status:<8} {ms:>9.1} {pages:>8} {faults:>8} {mib:>8.1}  {note}");
        }
    }
    Ok(all_ok)
}
