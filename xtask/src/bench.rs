//! `cargo xtask bench`: figures measured beside a baseline in the same run.
//!
//! userfaultfd (`uffd.*`): pages placed per second by one handler thread while a faulting
//! thread waits on each page in turn (a full fault round trip per 4 KiB page), by
//! `UFFDIO_COPY` and by `UFFDIO_ZEROPAGE`; the baseline is a plain memcpy of the same
//! bytes, 4 KiB at a time, into populated memory. Rounds alternate between the measured
//! path and its baseline so machine noise hits both alike; the median round is reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_sys::{CopyMode, Event, EventBuf, Mapping, MemoryKind, RegisterMode, Uffd, Wake};

use serde::Serialize;

const PAGE: usize = 4096;
/// Pages per round: 64 MiB.
const PAGES: usize = 16 * 1024;
const ROUNDS: usize = 5;

/// One reported figure.
pub struct Figure {
    /// Dotted name.
    pub name: &'static str,
    /// The measurement.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The same quantity for the baseline, measured in the same run.
    pub baseline: Option<f64>,
}

impl Figure {
    fn ratio(&self) -> Option<f64> {
        self.baseline.map(|b| self.value / b)
    }
}

/// `cargo xtask bench`'s command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per figure on stdout instead of aligned text.
    #[arg(long)]
    pub json: bool,
}

/// One figure in `--json` output; `baseline` and `ratio` only where a baseline exists.
#[derive(Serialize)]
struct JsonFigure<'a> {
    name: &'a str,
    value: f64,
    unit: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
}

pub fn main(a: &Args) -> Result<bool, String> {
    let mut figures = uffd_figures()?;
    figures.extend(crate::bench_precopy::stopped_figures()?);
    figures.extend(crate::bench_precopy::live_figures()?);
    for f in &figures {
        if a.json {
            let line = serde_json::to_string(&JsonFigure {
                name: f.name,
                value: round(f.value),
                unit: f.unit,
                baseline: f.baseline.map(round),
                ratio: f.ratio().map(|r| (r * 1000.0).round() / 1000.0),
            })
            .map_err(|e| e.to_string())?;
            println!("{line}");
        } else {
            match (f.baseline, f.ratio()) {
                (Some(b), Some(r)) => println!(
                    "{:<28} {:>14.0} {:<8} baseline {:>14.0}  ratio {:.3}",
                    f.name, f.value, f.unit, b, r
                ),
                _ => println!("{:<28} {:>14.0} {}", f.name, f.value, f.unit),
            }
        }
    }
    Ok(true)
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Clone, Copy)]
enum Place {
    Copy,
    Zero,
}

fn uffd_figures() -> Result<Vec<Figure>, String> {
    let uffd = Uffd::new().map_err(|e| format!("userfaultfd unusable, no uffd figures: {e}"))?;
    drop(uffd);
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
    Ok(vec![
        Figure {
            name: "uffd.copy_4k",
            value: copy,
            unit: "pages/s",
            baseline: Some(base),
        },
        Figure {
            name: "uffd.zeropage_4k",
            value: zero,
            unit: "pages/s",
            baseline: Some(base),
        },
        Figure {
            name: "uffd.copy_4k_bandwidth",
            value: mib(copy),
            unit: "MiB/s",
            baseline: Some(mib(base)),
        },
        Figure {
            name: "memcpy_4k",
            value: base,
            unit: "pages/s",
            baseline: None,
        },
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
