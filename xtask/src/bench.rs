//! `cargo xtask bench`: figures measured beside a baseline in the same run.
//!
//! Groups (`--only GROUP` picks some; all but the `vs-qemu` ones run by default):
//!
//! - `uffd`: pages placed per second by one userfaultfd handler thread while a faulting
//!   thread waits on each page in turn (a full fault round trip per 4 KiB page), by
//!   `UFFDIO_COPY` and by `UFFDIO_ZEROPAGE`; the baseline is a plain memcpy of the same
//!   bytes, 4 KiB at a time, into populated memory.
//! - `precopy`: a stopped 1 GiB guest over loopback TCP against a plain socket copy of
//!   the same bytes, and the saver's and loader's memory overhead
//!   ([`crate::bench_precopy`]).
//! - `live`: a running 1 GiB `ab` guest between two `demovm` processes.
//! - `postcopy`: the latency of a remote postcopy fault through the real stack, with
//!   no background traffic, against a loopback TCP round trip of the same message
//!   sizes plus one `UFFDIO_COPY` ([`crate::bench_postcopy`]).
//! - `dirty-sync`: the cost of one dirty-log sync of a 1 GiB KVM guest with the plain
//!   bitmap, with manual protect and with the dirty ring ([`crate::bench_dirty`]).
//! - `snapshot`: a running 1 GiB `ab` guest saved by a background snapshot (beside
//!   QEMU's and a precopy save to a file), and lazy against eager restore
//!   ([`crate::bench_snapshot`]).
//! - `vs-qemu` (`--vs-qemu`): the same boot-sector guest live-migrated by QEMU and by
//!   `demovm`, driven by the same QMP code ([`crate::bench_qemu`]).
//! - `vs-qemu-postcopy` (also `--vs-qemu`): a random-writes and a running `ab` guest
//!   moved in postcopy by QEMU and by `demovm`: blocktime, requests and total time
//!   ([`crate::bench_qemu::postcopy`]).
//! - `vs-qemu-linux` (also `--vs-qemu`): the project's Linux test image (2 vCPUs,
//!   256 MiB, its workload dirtying 64 MiB) live-migrated by QEMU and by `demovm`; where
//!   `/dev/kvm` is PVM, measured in kvm-box ([`crate::bench_qemu::linux`]).
//! - `snapshot` rows are also part of `--vs-qemu`: background snapshots of the ab sector
//!   by QEMU and by `demovm` ([`crate::bench_snapshot`]).
//!
//! Rounds alternate between the measured path and its baseline so machine noise hits
//! both alike; the median round is reported. Figures are printed as each group
//! finishes. A figure this host cannot measure is printed as `SKIPPED` with the reason
//! (and, with `--json`, as an object with `skipped` instead of `value`), never left out
//! silently.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd_sys::{CopyMode, Event, EventBuf, Mapping, MemoryKind, RegisterMode, Uffd, Wake};

const PAGE: usize = 4096;
/// Pages per round: 64 MiB.
const PAGES: usize = 16 * 1024;
const ROUNDS: usize = 5;

/// One reported figure.
pub struct Figure {
    /// Dotted name.
    pub name: String,
    /// The measurement.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The same quantity for the baseline, measured in the same run.
    pub baseline: Option<f64>,
    /// How it was measured, when the name does not say enough (parameters, sizes).
    pub note: Option<String>,
}

impl Figure {
    /// A figure with no baseline and no note.
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit,
            baseline: None,
            note: None,
        }
    }

    /// With the baseline measured in the same run.
    pub fn baseline(mut self, baseline: f64) -> Figure {
        self.baseline = Some(baseline);
        self
    }

    /// With a note on how it was measured.
    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }

    fn ratio(&self) -> Option<f64> {
        self.baseline.map(|b| self.value / b)
    }
}

/// A line of the report: a figure, or a figure this host cannot measure.
pub enum Report {
    /// A measured figure.
    Figure(Figure),
    /// Not measured here.
    Skipped {
        /// The figure (or group of figures) not measured.
        name: String,
        /// Why, and what would make it measurable.
        why: String,
    },
}

impl From<Figure> for Report {
    fn from(f: Figure) -> Report {
        Report::Figure(f)
    }
}

/// A group of figures `--only` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    /// userfaultfd fault round trips against memcpy.
    Uffd,
    /// A stopped 1 GiB guest over loopback TCP against a socket copy; memory overhead.
    Precopy,
    /// A live 1 GiB ab guest between two demovm processes.
    Live,
    /// Remote postcopy fault latency against a TCP round trip plus one UFFDIO_COPY.
    Postcopy,
    /// One dirty-log sync of a KVM guest: bitmap, manual protect, ring.
    DirtySync,
    /// Background snapshots of a running 1 GiB ab guest; lazy and eager restore.
    Snapshot,
    /// The same guest live-migrated by QEMU and by demovm (as --vs-qemu).
    VsQemu,
    /// The same guests moved in postcopy by QEMU and by demovm (part of --vs-qemu).
    VsQemuPostcopy,
    /// The Linux test image live-migrated by QEMU and by demovm (part of --vs-qemu; in
    /// kvm-box where /dev/kvm is PVM).
    VsQemuLinux,
}

/// The groups run when neither `--only` nor `--vs-qemu` is given.
const DEFAULT_GROUPS: [Group; 6] = [
    Group::Uffd,
    Group::Precopy,
    Group::Live,
    Group::Postcopy,
    Group::DirtySync,
    Group::Snapshot,
];

/// `cargo xtask bench`'s command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per figure on stdout instead of aligned text.
    #[arg(long)]
    pub json: bool,
    /// Run only these groups (repeat or separate with commas); default: every group
    /// but vs-qemu, vs-qemu-postcopy and vs-qemu-linux.
    #[arg(long, value_name = "GROUP", value_enum, value_delimiter = ',')]
    pub only: Vec<Group>,
    /// Live-migrate the ab boot sector (512 MiB touched, 1 GiB guest) with QEMU and
    /// with demovm, alternating, 3 rounds each, driven by the same QMP code, in
    /// precopy and then in postcopy (with the random-writes sector too), and
    /// background-snapshot it to a file with both, and live-migrate the Linux test
    /// image (in kvm-box where /dev/kvm is PVM) with both; needs
    /// qemu-system-x86_64 (Debian: apt-get install qemu-system-x86). Alone, it runs
    /// only this comparison.
    #[arg(long)]
    pub vs_qemu: bool,
    /// Guest memory of the dirty-sync figures (smaller inside the kvm-box, where
    /// touching guest memory is slow; the figure names say the size).
    #[arg(long, value_name = "SIZE", value_parser = crate::guests::parse_size, default_value = "1G")]
    pub sync_mem: u64,
    /// Memory the dirty-sync guest dirties between two syncs.
    #[arg(long, value_name = "SIZE", value_parser = crate::guests::parse_size, default_value = "128M")]
    pub sync_dirty: u64,
}

impl Args {
    /// The groups to run, in report order.
    fn groups(&self) -> Vec<Group> {
        let mut chosen = self.only.clone();
        if self.vs_qemu {
            chosen.extend([Group::VsQemu, Group::VsQemuPostcopy, Group::VsQemuLinux]);
        }
        if chosen.is_empty() {
            chosen = DEFAULT_GROUPS.to_vec();
        }
        let order = [
            DEFAULT_GROUPS.as_slice(),
            &[Group::VsQemu, Group::VsQemuPostcopy, Group::VsQemuLinux],
        ]
        .concat();
        order.into_iter().filter(|g| chosen.contains(g)).collect()
    }
}

/// One figure in `--json` output; `baseline` and `ratio` only where a baseline exists,
/// `note` where the figure has one, `skipped` (and no `value`) where it was not
/// measured.
#[derive(Serialize)]
struct JsonFigure<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<&'a str>,
}

/// Runs the chosen groups, printing each group's figures as it finishes.
pub fn main(a: &Args) -> Result<bool, String> {
    let mut out = Printer {
        json: a.json,
        last_note: None,
    };
    for group in a.groups() {
        let reports = match group {
            Group::Uffd => uffd_figures()?,
            Group::Precopy => crate::bench_precopy::stopped_figures()?,
            Group::Live => crate::bench_precopy::live_figures()?,
            Group::Postcopy => crate::bench_postcopy::figures()?,
            Group::DirtySync => crate::bench_dirty::figures(a.sync_mem, a.sync_dirty)?,
            Group::Snapshot => [
                crate::bench_snapshot::save_figures(false)?,
                crate::bench_snapshot::restore_figures()?,
            ]
            .into_iter()
            .flatten()
            .collect(),
            Group::VsQemu => [
                crate::bench_qemu::figures()?,
                crate::bench_snapshot::save_figures(true)?,
            ]
            .into_iter()
            .flatten()
            .collect(),
            Group::VsQemuPostcopy => crate::bench_qemu::postcopy::figures()?,
            Group::VsQemuLinux => crate::bench_qemu::linux::figures()?,
        };
        for r in &reports {
            out.print(r)?;
        }
    }
    Ok(true)
}

/// Prints reports as text or JSON lines.
struct Printer {
    json: bool,
    /// The note printed last in text mode (a note shared by several figures is
    /// printed once, above them).
    last_note: Option<String>,
}

impl Printer {
    /// Prints `r` on stdout (and, with `--json`, a skip loudly on stderr too, as stdout
    /// is for machines then).
    fn print(&mut self, r: &Report) -> Result<(), String> {
        if let (true, Report::Skipped { name, why }) = (self.json, r) {
            eprintln!("*** SKIPPED {name}: {why} ***");
        }
        print!("{}", self.render(r)?);
        Ok(())
    }

    /// The lines `r` prints as, each ending in a newline.
    fn render(&mut self, r: &Report) -> Result<String, String> {
        if self.json {
            let line = match r {
                Report::Figure(f) => JsonFigure {
                    name: &f.name,
                    value: Some(round(f.value)),
                    unit: Some(f.unit),
                    baseline: f.baseline.map(round),
                    ratio: f.ratio().map(|r| (r * 1000.0).round() / 1000.0),
                    note: f.note.as_deref(),
                    skipped: None,
                },
                Report::Skipped { name, why } => JsonFigure {
                    name,
                    value: None,
                    unit: None,
                    baseline: None,
                    ratio: None,
                    note: None,
                    skipped: Some(why),
                },
            };
            let line = serde_json::to_string(&line).map_err(|e| e.to_string())?;
            return Ok(format!("{line}\n"));
        }
        let mut out = String::new();
        match r {
            Report::Figure(f) => {
                if let Some(note) = f.note.as_deref().filter(|_| f.note != self.last_note) {
                    out.push_str(&format!("# {note}\n"));
                }
                self.last_note.clone_from(&f.note);
                out.push_str(&match (f.baseline, f.ratio()) {
                    (Some(b), Some(r)) => format!(
                        "{:<40} {:>14.0} {:<8} baseline {:>14.0}  ratio {:.3}\n",
                        f.name, f.value, f.unit, b, r
                    ),
                    _ => format!("{:<40} {:>14.0} {}\n", f.name, f.value, f.unit),
                });
            }
            Report::Skipped { name, why } => {
                self.last_note = None;
                out.push_str(&format!("*** SKIPPED {name}: {why} ***\n"));
            }
        }
        Ok(out)
    }
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The median of `v` (the upper one of an even count); 0 when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[derive(Clone, Copy)]
enum Place {
    Copy,
    Zero,
}

fn uffd_figures() -> Result<Vec<Report>, String> {
    if let Err(e) = Uffd::new() {
        return Ok(vec![Report::Skipped {
            name: "uffd.*".into(),
            why: format!("userfaultfd unusable: {e} (cargo xtask doctor says more)"),
        }]);
    }
    let src = vec![0xa5u8; PAGE];
    let mut copy = Vec::new();
    let mut zero = Vec::new();
    let mut memcpy = Vec::new();
    for _ in 0..ROUNDS {
        copy.push(rate(fault_round_trips(Place::Copy, &src)?));
        memcpy.push(rate(memcpy_pages(&src)?));
        zero.push(rate(fault_round_trips(Place::Zero, &src)?));
    }
    let base = median(memcpy);
    let mib = |pages_per_s: f64| pages_per_s * PAGE as f64 / (1024.0 * 1024.0);
    let copy = median(copy);
    let zero = median(zero);
    let note = format!(
        "{PAGES} faults on 4 KiB pages per round, each resolved by one handler thread; \
         baseline: memcpy of the same pages; median of {ROUNDS} rounds, alternating"
    );
    Ok(vec![
        Figure::new("uffd.copy_4k", copy, "pages/s")
            .baseline(base)
            .note(&note)
            .into(),
        Figure::new("uffd.zeropage_4k", zero, "pages/s")
            .baseline(base)
            .note(&note)
            .into(),
        Figure::new("uffd.copy_4k_bandwidth", mib(copy), "MiB/s")
            .baseline(mib(base))
            .note(&note)
            .into(),
        Figure::new("memcpy_4k", base, "pages/s").note(note).into(),
    ])
}

fn rate(d: Duration) -> f64 {
    PAGES as f64 / d.as_secs_f64()
}

/// A faulting thread touches each page in turn; this thread resolves each fault. Returns
/// the time from the first touch to the last page placed.
fn fault_round_trips(place: Place, src: &[u8]) -> Result<Duration, String> {
    let uffd = Uffd::new().map_err(|e| e.to_string())?;
    let map =
        Arc::new(Mapping::new(MemoryKind::Anonymous, PAGES * PAGE).map_err(|e| e.to_string())?);
    uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .map_err(|e| e.to_string())?;
    let m = Arc::clone(&map);
    let start = Instant::now();
    let toucher = std::thread::spawn(move || {
        let mut sum = 0u64;
        for i in 0..PAGES {
            sum += u64::from(m.load_u8(i * PAGE).unwrap_or(0));
        }
        sum
    });
    let mut buf = EventBuf::new(64);
    let mut placed = 0;
    while placed < PAGES {
        if !uffd
            .wait_readable(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?
        {
            return Err("the faulting thread stopped faulting".into());
        }
        for ev in uffd.read_events(&mut buf).map_err(|e| e.to_string())? {
            let Event::PageFault(pf) = ev else { continue };
            let off = usize::try_from(pf.address - map.addr()).map_err(|e| e.to_string())?;
            let off = off - off % PAGE;
            let r = match place {
                Place::Copy => map.copy_in(&uffd, off, src, CopyMode::empty()),
                Place::Zero => map.zero_in(&uffd, off, PAGE, Wake::Yes),
            };
            r.map_err(|e| e.to_string())?;
            placed += 1;
        }
    }
    let sum = toucher.join().map_err(|_| "the faulting thread panicked")?;
    let elapsed = start.elapsed();
    let expect = match place {
        Place::Copy => u64::from(src[0]) * PAGES as u64,
        Place::Zero => 0,
    };
    if sum != expect {
        return Err(format!("the faulting thread read {sum}, expected {expect}"));
    }
    Ok(elapsed)
}

/// The same bytes moved by memcpy, 4 KiB at a time, into populated memory.
fn memcpy_pages(src: &[u8]) -> Result<Duration, String> {
    let map = Mapping::new(MemoryKind::Anonymous, PAGES * PAGE).map_err(|e| e.to_string())?;
    for i in 0..PAGES {
        map.store_u8(i * PAGE, 0).map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    for i in 0..PAGES {
        map.write(i * PAGE, src).map_err(|e| e.to_string())?;
    }
    let elapsed = start.elapsed();
    if map.load_u8((PAGES - 1) * PAGE).map_err(|e| e.to_string())? != src[0] {
        return Err("memcpy baseline lost its bytes".into());
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: Args,
    }

    fn groups(args: &[&str]) -> Vec<Group> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .unwrap()
            .bench
            .groups()
    }

    #[test]
    fn groups_default_to_all_but_vs_qemu_and_vs_qemu_alone_runs_alone() {
        assert_eq!(groups(&[]), DEFAULT_GROUPS.to_vec());
        assert_eq!(
            groups(&["--vs-qemu"]),
            vec![Group::VsQemu, Group::VsQemuPostcopy, Group::VsQemuLinux]
        );
        assert_eq!(
            groups(&["--only", "dirty-sync,uffd", "--vs-qemu"]),
            vec![
                Group::Uffd,
                Group::DirtySync,
                Group::VsQemu,
                Group::VsQemuPostcopy,
                Group::VsQemuLinux
            ]
        );
        assert_eq!(
            groups(&["--only", "vs-qemu-linux"]),
            vec![Group::VsQemuLinux]
        );
        assert_eq!(
            groups(&["--only", "vs-qemu-postcopy"]),
            vec![Group::VsQemuPostcopy]
        );
        assert_eq!(
            groups(&["--only", "live", "--only", "live"]),
            vec![Group::Live]
        );
        assert!(Cli::try_parse_from(["bench", "--only", "nonesuch"]).is_err());
    }

    #[test]
    fn json_lines_keep_the_figure_shape_and_say_why_a_figure_is_skipped() {
        let mut p = Printer {
            json: true,
            last_note: None,
        };
        let line = p
            .render(&Figure::new("a.b", 2.0, "ms").baseline(4.0).into())
            .unwrap();
        assert_eq!(
            line,
            "{\"name\":\"a.b\",\"value\":2.0,\"unit\":\"ms\",\"baseline\":4.0,\"ratio\":0.5}\n"
        );
        let line = p
            .render(&Report::Skipped {
                name: "c".into(),
                why: "no KVM".into(),
            })
            .unwrap();
        assert_eq!(line, "{\"name\":\"c\",\"skipped\":\"no KVM\"}\n");
    }

    #[test]
    fn text_prints_a_shared_note_once_above_its_figures() {
        let mut p = Printer {
            json: false,
            last_note: None,
        };
        let a = p
            .render(&Figure::new("x.one", 1.0, "ms").note("how").into())
            .unwrap();
        let b = p
            .render(&Figure::new("x.two", 2.0, "ms").note("how").into())
            .unwrap();
        assert!(a.starts_with("# how\nx.one"), "{a}");
        assert!(b.starts_with("x.two"), "{b}");
        let skipped = p
            .render(&Report::Skipped {
                name: "y".into(),
                why: "why".into(),
            })
            .unwrap();
        assert_eq!(skipped, "*** SKIPPED y: why ***\n");
    }
}
