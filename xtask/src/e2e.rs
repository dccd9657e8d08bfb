//! `cargo xtask e2e`: the end-to-end scenarios of the `tests` crate, run on the real
//! kernel and summed up in a table (or `--json`, one object per scenario).

use e2e::{Failure, Outcome, SCENARIOS};

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
            "{:<22} {:<8} {:>9} {:>12} {:>9}  note",
            "scenario", "status", "total ms", "downtime ms", "MiB sent"
        );
    }
    let mut all_ok = true;
    for (name, run) in chosen {
        let (status, o) = match run() {
            Ok(o) => ("passed", o),
            Err(Failure::Skipped(why)) => (
                "SKIPPED",
                Outcome {
                    note: why,
                    ..Outcome::default()
                },
            ),
            Err(Failure::Failed(why)) => (
                "FAILED",
                Outcome {
                    note: why,
                    ..Outcome::default()
                },
            ),
        };
        let ms = o.total.as_secs_f64() * 1000.0;
        let downtime = o.downtime.map(|d| d.as_secs_f64() * 1000.0);
        let mib = o.bytes as f64 / (1024.0 * 1024.0);
        all_ok &= status != "FAILED";
        if opts.json {
            println!(
                "{}",
                object(&[
                    ("scenario", Value::Str((*name).into())),
                    ("status", Value::Str(status.to_lowercase())),
                    ("total_ms", Value::Num((ms * 10.0).round() / 10.0)),
                    ("downtime_ms", downtime.map_or(Value::Null, Value::Num)),
                    ("mib_sent", Value::Num((mib * 10.0).round() / 10.0)),
                    ("pages", Value::Int(o.pages)),
                    ("faults", Value::Int(o.faults)),
                    ("note", Value::Str(o.note)),
                ])
            );
        } else {
            let dt = downtime.map_or("-".to_owned(), |d| format!("{d:.0}"));
            println!(
                "{name:<22} {status:<8} {ms:>9.1} {dt:>12} {mib:>9.1}  {}",
                o.note
            );
        }
    }
    Ok(all_ok)
}
