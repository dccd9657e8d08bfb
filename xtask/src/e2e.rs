//! `cargo xtask e2e`: the end-to-end scenarios of the `tests` crate, run on the real
//! kernel and summed up in a table (or `--json`, one object per scenario).
//!
//! Progress goes to stderr as it happens: the `demovm` build, then `[i/n] NAME ...`
//! and its result for each scenario, with a line every few seconds while one runs, so
//! a slow machine is never silent for long. The table comes at the end on stdout: one
//! row per scenario, a note that is never cut (a long one is wrapped on indented lines
//! below its row), and a totals row whose figures are the sums of those shown.

use std::fmt::Write as _;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::builder::PossibleValuesParser;
use e2e::{Failure, Outcome, SCENARIOS};
use serde::Serialize;

/// `cargo xtask e2e`'s command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per scenario on stdout, as each finishes, instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Run only this scenario (--list names them).
    #[arg(long, value_name = "NAME", value_parser = scenario_names())]
    pub scenario: Option<String>,
    /// Print the scenario names, one per line, and run nothing.
    #[arg(long, conflicts_with_all = ["json", "scenario"])]
    pub list: bool,
}

fn scenario_names() -> PossibleValuesParser {
    PossibleValuesParser::new(SCENARIOS.iter().map(|(n, _)| *n))
}

/// How often a running step says it is still running.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Runs the chosen scenarios; `Ok(false)` when one failed.
pub fn main(a: &Args) -> Result<bool, String> {
    if a.list {
        for (name, _) in SCENARIOS {
            println!("{name}");
        }
        return Ok(true);
    }
    let chosen: Vec<_> = SCENARIOS
        .iter()
        .filter(|(n, _)| a.scenario.as_deref().is_none_or(|s| s == *n))
        .collect();
    eprintln!("building demovm ...");
    let started = Instant::now();
    let demovm = with_heartbeat("building demovm", e2e::harness::demovm_path)?;
    eprintln!(
        "demovm ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        demovm.display()
    );
    let _huge = HugePages::reserve(E2E_HUGE_PAGES);
    // The Linux rows need the guest image: made (or found cached) here, so a
    // fresh machine needs no extra step; where it cannot be made, those rows
    // say SKIPPED and why.
    let linux = chosen.iter().any(|(n, _)| n.starts_with("linux-"));
    if linux && std::env::var_os(e2e::linux::KERNEL_ENV).is_none() {
        if let Err(why) = crate::linux_guest::build(&e2e::linux::default_dir()) {
            eprintln!("no Linux guest image: {why}");
        }
    }
    let n = chosen.len();
    let mut rows = Vec::with_capacity(n);
    for (i, (name, run)) in chosen.into_iter().enumerate() {
        eprintln!("[{}/{n}] {name} ...", i + 1);
        let started = Instant::now();
        let row = Row::new(name, with_heartbeat(name, run));
        eprintln!(
            "[{}/{n}] {name}: {} in {:.1} s",
            i + 1,
            row.status.word(),
            started.elapsed().as_secs_f64()
        );
        if a.json {
            let line = serde_json::to_string(&row.json()).map_err(|e| e.to_string())?;
            println!("{line}");
        }
        rows.push(row);
    }
    if !a.json {
        print!("{}", table(&rows, TABLE_WIDTH));
    }
    Ok(rows.iter().all(|r| r.status != Status::Failed))
}

/// Runs `f`, saying on stderr every [`HEARTBEAT`] that `what` is still running. The
/// ticker is a scoped thread, joined before this returns.
fn with_heartbeat<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let (done, wait) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            let start = Instant::now();
            while let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(HEARTBEAT) {
                eprintln!(
                    "      ... {what}: still running after {} s",
                    start.elapsed().as_secs()
                );
            }
        });
        let r = f();
        drop(done);
        r
    })
}

/// How a scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Passed,
    Failed,
    Skipped,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed => "FAILED",
            Status::Skipped => "SKIPPED",
        }
    }
}

/// One scenario's line of the report. Figures exist only for scenarios that ran to
/// their end; the table shows `-` for the others.
struct Row {
    name: &'static str,
    status: Status,
    outcome: Option<Outcome>,
    note: String,
}

impl Row {
    fn new(name: &'static str, r: Result<Outcome, Failure>) -> Row {
        match r {
            Ok(mut o) => Row {
                name,
                status: Status::Passed,
                note: std::mem::take(&mut o.note),
                outcome: Some(o),
            },
            Err(Failure::Skipped(why)) => Row {
                name,
                status: Status::Skipped,
                outcome: None,
                note: why,
            },
            Err(Failure::Failed(why)) => Row {
                name,
                status: Status::Failed,
                outcome: None,
                note: why,
            },
        }
    }

    /// Total time in tenths of a millisecond, as shown (one decimal).
    fn total_tenths_ms(&self) -> Option<u64> {
        self.outcome
            .as_ref()
            .map(|o| tenths(o.total.as_secs_f64() * 1000.0))
    }

    /// MiB sent in tenths, as shown (one decimal).
    fn sent_tenths_mib(&self) -> Option<u64> {
        self.outcome
            .as_ref()
            .map(|o| tenths(o.bytes as f64 / f64::from(1u32 << 20)))
    }

    fn json(&self) -> JsonRow<'_> {
        let o = self.outcome.as_ref();
        JsonRow {
            scenario: self.name,
            status: self.status.word().to_lowercase(),
            accel: o.and_then(|o| o.accel.as_deref()),
            total_ms: self.total_tenths_ms().map(from_tenths),
            downtime_ms: o.and_then(|o| o.downtime).map(|d| d.as_secs_f64() * 1000.0),
            mib_sent: self.sent_tenths_mib().map(from_tenths),
            pages: o.map(|o| o.pages),
            faults: o.map(|o| o.faults),
            note: &self.note,
        }
    }
}

/// One scenario in `--json` output; figures are `null` where it did not run to its end.
#[derive(Serialize)]
struct JsonRow<'a> {
    scenario: &'a str,
    status: String,
    accel: Option<&'a str>,
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    mib_sent: Option<f64>,
    pages: Option<u64>,
    faults: Option<u64>,
    note: &'a str,
}

/// `v` rounded to tenths, as a count of tenths (negative and non-finite values: 0).
fn tenths(v: f64) -> u64 {
    let t = (v * 10.0).round();
    if t.is_finite() && t > 0.0 {
        // In range: u64::MAX tenths of a millisecond is longer than any run.
        t as u64
    } else {
        0
    }
}

fn from_tenths(t: u64) -> f64 {
    t as f64 / 10.0
}

fn show_tenths(t: Option<u64>) -> String {
    t.map_or("-".to_owned(), |t| format!("{}.{}", t / 10, t % 10))
}

/// Width the table aims for; notes that do not fit beside their row go below it.
const TABLE_WIDTH: usize = 120;

/// The indentation of notes printed below their row.
const NOTE_INDENT: &str = "    ";

/// The table: a header, one row per scenario, a totals row. Each figure of the totals
/// row is the sum of the figures shown above it; notes are never cut.
fn table(rows: &[Row], width: usize) -> String {
    let name_w = rows
        .iter()
        .map(|r| r.name.len())
        .chain(["scenario".len()])
        .max()
        .unwrap_or(0);
    let accel_w = rows
        .iter()
        .filter_map(|r| r.outcome.as_ref()?.accel.as_ref().map(String::len))
        .chain(["accel".len()])
        .max()
        .unwrap_or(0);
    let line = |name: &str, status: &str, accel: &str, total: &str, down: &str, mib: &str| {
        format!("{name:<name_w$} {status:<8} {accel:<accel_w$} {total:>10} {down:>11} {mib:>9}  ")
    };
    let mut out = String::new();
    let header = line(
        "scenario",
        "status",
        "accel",
        "total ms",
        "downtime ms",
        "MiB sent",
    );
    let _ = writeln!(out, "{header}note");
    let note_room = width.saturating_sub(header.len());
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let (mut total, mut sent) = (0u64, 0u64);
    for r in rows {
        match r.status {
            Status::Passed => passed += 1,
            Status::Failed => failed += 1,
            Status::Skipped => skipped += 1,
        }
        total += r.total_tenths_ms().unwrap_or(0);
        sent += r.sent_tenths_mib().unwrap_or(0);
        let o = r.outcome.as_ref();
        let prefix = line(
            r.name,
            r.status.word(),
            o.and_then(|o| o.accel.as_deref()).unwrap_or("-"),
            &show_tenths(r.total_tenths_ms()),
            &o.and_then(|o| o.downtime).map_or("-".to_owned(), |d| {
                format!("{:.0}", d.as_secs_f64() * 1000.0)
            }),
            &show_tenths(r.sent_tenths_mib()),
        );
        if r.note.chars().count() <= note_room && !r.note.contains('\n') {
            let _ = writeln!(out, "{prefix}{}", r.note);
        } else {
            let _ = writeln!(out, "{}", prefix.trim_end());
            for l in wrap(&r.note, width.saturating_sub(NOTE_INDENT.len())) {
                let _ = writeln!(out, "{NOTE_INDENT}{l}");
            }
        }
    }
    let totals = line(
        "total",
        "",
        "",
        &show_tenths(Some(total)),
        "-",
        &show_tenths(Some(sent)),
    );
    let _ = writeln!(
        out,
        "{totals}{passed} passed, {failed} failed, {skipped} skipped"
    );
    out
}

/// `text` in lines of at most `width` characters, broken at white space. A word
/// longer than `width` gets a line of its own, whole: nothing is ever cut.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Free 2 MiB huge pages the hugetlbfs scenarios need (source and destination).
const E2E_HUGE_PAGES: u64 = 8;

/// Huge pages reserved for this run (as root, when fewer are free), given
/// back when dropped. Without them the hugetlbfs scenarios say SKIPPED and
/// why.
struct HugePages {
    old: Option<u64>,
}

impl HugePages {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    fn free() -> Option<u64> {
        std::fs::read_to_string("/proc/meminfo")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))?
            .trim()
            .parse()
            .ok()
    }

    fn reserve(want: u64) -> HugePages {
        let free = Self::free().unwrap_or(0);
        let old = std::fs::read_to_string(Self::NR)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let Some(old) = old.filter(|_| free < want) else {
            return HugePages { old: None };
        };
        if std::fs::write(Self::NR, (old + want - free).to_string()).is_err() {
            return HugePages { old: None };
        }
        eprintln!(
            "reserved huge pages for the hugetlbfs scenarios: {} free (vm.nr_hugepages {old} -> {}, \
             given back at the end)",
            Self::free().unwrap_or(0),
            old + want - free
        );
        HugePages { old: Some(old) }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            if let Err(e) = std::fs::write(Self::NR, old.to_string()) {
                eprintln!("cannot give back the huge pages (vm.nr_hugepages = {old}): {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(name: &'static str, micros: u64, bytes: u64, note: &str) -> Row {
        Row::new(
            name,
            Ok(Outcome {
                total: Duration::from_micros(micros),
                downtime: Some(Duration::from_millis(12)),
                bytes,
                accel: Some("soft".into()),
                note: note.into(),
                ..Outcome::default()
            }),
        )
    }

    /// A figure as shown, in tenths (`-`: none).
    fn shown(w: &str) -> Option<u64> {
        let (int, frac) = w.split_once('.')?;
        Some(int.parse::<u64>().ok()? * 10 + frac.parse::<u64>().ok()?)
    }

    #[test]
    fn the_totals_row_sums_the_figures_shown() {
        let rows = vec![
            // 1234.567 ms shows as 1234.6, 1.26 MiB as 1.3: the total adds what is shown.
            passed("a", 1_234_567, 1_321_205, "ok"),
            passed("b", 55, 104_858, "ok"),
            passed("c", 10_049, 0, "ok"),
            Row::new("d", Err(Failure::Skipped("no userfaultfd".into()))),
            Row::new("e", Err(Failure::Failed("it broke".into()))),
        ];
        let t = table(&rows, 120);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 7, "{t}");
        let (mut total, mut sent) = (0, 0);
        for l in &lines[1..6] {
            // scenario, status, accel, total ms, downtime ms, MiB sent, note...
            let w: Vec<&str> = l.split_whitespace().collect();
            total += shown(w[3]).unwrap_or(0);
            sent += shown(w[5]).unwrap_or(0);
        }
        assert_eq!((total, sent), (12346 + 1 + 100, 13 + 1));
        let last: Vec<&str> = lines[6].split_whitespace().collect();
        // total, total ms, downtime ms, MiB sent, counts
        assert_eq!(last[0], "total");
        assert_eq!(shown(last[1]), Some(total), "{t}");
        assert_eq!(last[2], "-", "downtimes are not summed");
        assert_eq!(shown(last[3]), Some(sent), "{t}");
        assert!(lines[6].ends_with("3 passed, 1 failed, 1 skipped"), "{t}");
        let skipped: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(skipped[1..6], ["SKIPPED", "-", "-", "-", "-"], "{t}");
    }

    #[test]
    fn long_notes_are_wrapped_below_their_row_never_cut() {
        let long = (0..60)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" ")
            + " "
            + &"x".repeat(150);
        let rows = vec![
            passed("short-note", 1000, 0, "fits beside the row"),
            passed("long-note", 1000, 0, &long),
        ];
        let t = table(&rows, 100);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].ends_with("fits beside the row"), "{t}");
        assert!(lines[2].starts_with("long-note"), "{t}");
        assert!(
            lines[2].ends_with("0.0"),
            "the row itself carries no note: {t}"
        );
        let below: Vec<&str> = lines[3..lines.len() - 1].to_vec();
        assert!(below.len() > 1, "{t}");
        for l in &below {
            assert!(l.starts_with(NOTE_INDENT), "{l}");
            assert!(
                l.len() <= 100 || !l.trim().contains(' '),
                "only an unbreakable word may overflow: {l}"
            );
        }
        let words: Vec<&str> = below.iter().flat_map(|l| l.split_whitespace()).collect();
        assert_eq!(
            words,
            long.split_whitespace().collect::<Vec<_>>(),
            "every word, in order"
        );
    }

    #[test]
    fn json_rows_carry_accel_and_null_figures_for_rows_that_did_not_finish() {
        let r = passed("a", 1_234_567, 1 << 20, "ok");
        let v = serde_json::to_value(r.json()).unwrap();
        assert_eq!(v["accel"], "soft");
        assert_eq!(v["total_ms"], 1234.6);
        assert_eq!(v["mib_sent"], 1.0);
        assert_eq!(v["downtime_ms"], 12.0);
        assert_eq!(v["status"], "passed");
        let r = Row::new("b", Err(Failure::Failed("why".into())));
        let v = serde_json::to_value(r.json()).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["total_ms"], serde_json::Value::Null);
        assert_eq!(v["note"], "why");
    }
}
