//! The postcopy rows of `cargo xtask bench --vs-qemu`: the same guests moved in
//! postcopy by QEMU and by `demovm`, driven over QMP by the same code, side by side in
//! one run.
//!
//! Both VMMs start the guests as the precopy rows do (see the parent module), with the
//! destination deferred (`-incoming defer` / `--incoming defer`) so that its
//! capabilities are on before anything arrives. [`postcopy_once`], the only driver:
//!
//! 1. destination: `migrate-set-capabilities` `postcopy-ram` and `postcopy-blocktime`,
//!    then `migrate-incoming` on a loopback TCP port;
//! 2. source: waits for the guest ([`Scenario::ready`]), the same capabilities, then
//!    `migrate-set-parameters` max-bandwidth [`MAX_BANDWIDTH`] and downtime-limit
//!    [`DOWNTIME_LIMIT_MS`] (so precopy alone never ends), `migrate`;
//! 3. `migrate-start-postcopy` at the [`Switch`] point: [`SWITCH_AFTER`] after
//!    `migrate` returned, or once the source's `ram.dirty-sync-count` says the first
//!    pass is over;
//! 4. polls the destination's `query-status` until it says `running` (see
//!    `start_after_switch` below), then the source's `query-migrate` until a final
//!    state, then the destination's. A round counts only if both say `completed`, the source sent
//!    bytes in postcopy (`ram.postcopy-bytes`), the destination reports
//!    `postcopy-blocktime` and runs the guest on (`query-status` `running`, and for
//!    `ab` growing COM1 output; `random` prints nothing after its banner). A round
//!    that does not count is run again (its reason on stderr, the count in the
//!    figures' note), up to [`ATTEMPTS`] tries; then the run fails.
//!
//! Each VMM runs each scenario without and with `postcopy-preempt` (on both sides;
//! with it, requested pages go on a second connection: `demovm`'s source sends them
//! from its return-path thread), four variants alternating round after round. Three
//! groups of figures compare them, value `demovm`, baseline QEMU, so the ratio is
//! demovm/QEMU:
//! - `vs_qemu.postcopy.*`: both without preempt;
//! - `vs_qemu.postcopy_preempt.*`: `demovm` with preempt against QEMU without (its
//!   default): what an operator gets from each, the comparison the blocktime target
//!   is about;
//! - `vs_qemu.postcopy_preempt_both.*`: both with preempt.
//!
//! Figures, medians of [`ROUNDS`] rounds each:
//! - `blocktime`: the destination's `postcopy-blocktime` (ms during which every vCPU
//!   waited for a page at once; the guests have one vCPU);
//! - `requests`: page requests the destination sent: `demovm`'s destination says it
//!   (`x-postcopy-requests`); QEMU's does not, and its source counts every request it
//!   received (`ram.postcopy-requests`), which is the same number;
//! - `wait_per_request`: the blocktime of all rounds over their requests, the mean
//!   wait of a fault (with one vCPU, faults do not overlap); the number of faults
//!   varies much from round to round (it depends on when the destination's vCPU first
//!   runs against the background stream), the wait of each far less;
//! - `start_after_switch`: how long after `migrate-start-postcopy` the destination's
//!   `query-status` first says `running` (polled every [`RUN_POLL`]). Until then the
//!   guest runs nowhere (once the source stopped it), and no blocktime counts it: a
//!   destination that starts the guest late, when most pages have arrived, shows a
//!   small blocktime for a long pause;
//! - `stalled_after_switch`: `start_after_switch` plus blocktime, the time after
//!   the switch during which the guest made no progress (less the moment the
//!   source still ran it after the command);
//! - `total_time`: the source's `total-time`;
//! - `postcopy_time`: `total_time` less the moment `migrate-start-postcopy` went
//!   (measured by the driver from `migrate`): how long the destination ran on missing
//!   pages. A guest that writes all over its memory waits for pages most of that time,
//!   so its blocktime follows it.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::harness::field;
use serde_json::{json, Value};
use vmm_glue::guest::boot_sector::{BootSector, RANDOM_BANNER};

use super::{
    find_qemu, free_port, kvm_unusable, one_pass_done, qemu_version, Guest, Launcher, Process,
    Scratch, Vmm, MEM_MIB, TOUCH,
};
use crate::bench::{median, Figure, Report};
use crate::guests::show_size;

/// `max-bandwidth` of precopy, for both VMMs: 1 GiB/s.
const MAX_BANDWIDTH: u64 = 1 << 30;
/// `downtime-limit` for both VMMs: no precopy pass of these guests fits it, so only
/// postcopy ends the migration.
const DOWNTIME_LIMIT_MS: u64 = 1;
/// Migrations per VMM and scenario.
const ROUNDS: usize = 3;
/// Tries of a round before the run fails.
const ATTEMPTS: u32 = 3;
/// How long after `migrate` the random-writes guest is switched to postcopy.
const SWITCH_AFTER: Duration = Duration::from_millis(200);
/// How long the random-writes guest runs after its banner before `migrate`, so its
/// touch range is populated.
const WARM_UP: Duration = Duration::from_millis(500);
/// How often `query-migrate` is polled.
const POLL: Duration = Duration::from_millis(10);
/// How often the destination's `query-status` is polled after the switch.
const RUN_POLL: Duration = Duration::from_millis(2);
/// Prefix of the figure names.
const PREFIX: &str = "vs_qemu.postcopy";

/// When `migrate-start-postcopy` is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    /// This long after `migrate` returned.
    After(Duration),
    /// Once the source's first pass is over (`ram.dirty-sync-count` at least 2).
    FirstPass,
}

/// One row set: a guest and when it is switched.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    /// Part of the figure names.
    name: &'static str,
    sector: BootSector,
    switch: Switch,
}

/// The two scenarios of issue 9.
const SCENARIOS: [Scenario; 2] = [
    Scenario {
        name: "random_512m_1g",
        sector: BootSector::Random,
        switch: Switch::After(SWITCH_AFTER),
    },
    Scenario {
        name: "ab_512m_1g",
        sector: BootSector::Ab,
        switch: Switch::FirstPass,
    },
];

impl Scenario {
    /// Waits until the source's guest runs its loop with its pages populated: one full
    /// pass for `ab`, the banner and [`WARM_UP`] for `random`.
    fn ready(self, src: &mut Process) -> Result<(), String> {
        match self.sector {
            BootSector::Ab => {
                src.wait_serial("the guest's banner and one full pass", one_pass_done)
            }
            BootSector::Random => {
                let banner = RANDOM_BANNER.as_bytes();
                src.wait_serial("the guest's banner", |out| {
                    out.windows(banner.len()).any(|w| w == banner)
                })?;
                std::thread::sleep(WARM_UP);
                Ok(())
            }
        }
    }

    /// Whether the guest prints as it runs (the destination must then print on).
    fn prints(self) -> bool {
        self.sector == BootSector::Ab
    }
}

/// What one postcopy migration measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Round {
    blocktime_ms: f64,
    requests: f64,
    total_ms: f64,
    /// When `migrate-start-postcopy` went, after `migrate` returned.
    switched_ms: f64,
    /// When the destination's guest first ran, after `migrate-start-postcopy`.
    ran_ms: f64,
}

/// The destination's page requests: its own count where it gives one
/// (`x-postcopy-requests`), else the source's count of requests received.
fn requests(src: &Value, dst: &Value) -> u64 {
    if dst.get("x-postcopy-requests").is_some() {
        field(dst, "x-postcopy-requests")
    } else {
        field(src, "ram.postcopy-requests")
    }
}

/// What a final `query-migrate` pair says, or why the round does not count.
fn round_of(src: &Value, dst: &Value, switched_ms: f64) -> Result<Round, String> {
    let status = |q: &Value| {
        q.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    if status(src) != "completed" {
        return Err(format!("the source did not complete: {src}"));
    }
    if status(dst) != "completed" {
        return Err(format!("the destination did not complete: {dst}"));
    }
    if field(src, "ram.postcopy-bytes") == 0 {
        return Err(format!("the source sent nothing in postcopy: {src}"));
    }
    let Some(blocktime) = dst.get("postcopy-blocktime").and_then(Value::as_u64) else {
        return Err(format!(
            "the destination reports no postcopy-blocktime: {dst}"
        ));
    };
    Ok(Round {
        blocktime_ms: blocktime as f64,
        requests: requests(src, dst) as f64,
        total_ms: field(src, "total-time") as f64,
        switched_ms,
        ran_ms: 0.0,
    })
}

/// Turns capabilities on.
fn caps(p: &mut Process, names: &[&str]) -> Result<(), String> {
    let list: Vec<Value> = names
        .iter()
        .map(|n| json!({"capability": n, "state": true}))
        .collect();
    p.qmp
        .cmd("migrate-set-capabilities", json!({ "capabilities": list }))
        .map(drop)
        .map_err(|e| format!("{}: {e}", p.name))
}

/// `query-migrate` until `done` accepts it (polled every [`POLL`]).
fn wait_migrate(
    p: &mut Process,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    let started = Instant::now();
    loop {
        let q = p
            .qmp
            .cmd("query-migrate", json!({}))
            .map_err(|e| format!("{}: {e}", p.name))?;
        if done(&q) {
            return Ok(q);
        }
        if started.elapsed() > e2e::harness::HANG_GUARD {
            return Err(format!(
                "{}: no {what} after {:?}; last query-migrate: {q}",
                p.name,
                e2e::harness::HANG_GUARD
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Milliseconds from now (just after `migrate-start-postcopy`) until the
/// destination's `query-status` says `running`, polled every [`RUN_POLL`]; `None` if
/// the source's migration ended otherwise than `completed` first.
fn wait_runs(dst: &mut Process, src: &mut Process) -> Result<Option<f64>, String> {
    let started = Instant::now();
    loop {
        let st = dst
            .qmp
            .cmd("query-status", json!({}))
            .map_err(|e| format!("{}: {e}", dst.name))?;
        if st.get("status").and_then(Value::as_str) == Some("running") {
            return Ok(Some(started.elapsed().as_secs_f64() * 1000.0));
        }
        let q = src
            .qmp
            .cmd("query-migrate", json!({}))
            .map_err(|e| format!("{}: {e}", src.name))?;
        if finished(&q) && q.get("status").and_then(Value::as_str) != Some("completed") {
            return Ok(None);
        }
        if started.elapsed() > e2e::harness::HANG_GUARD {
            return Err(format!(
                "{}: not running {:?} after the switch; last query-status: {st}",
                dst.name,
                e2e::harness::HANG_GUARD
            ));
        }
        std::thread::sleep(RUN_POLL);
    }
}

fn finished(q: &Value) -> bool {
    matches!(
        q.get("status").and_then(Value::as_str),
        Some("completed" | "failed" | "cancelled")
    )
}

/// One postcopy migration of `s`'s guest between two fresh processes of `l`, driven
/// the same way whichever the VMM (see the module documentation).
fn postcopy_once(l: &Launcher, s: Scenario, preempt: bool, dir: &Path) -> Result<Round, String> {
    const CAPS: [&str; 2] = ["postcopy-ram", "postcopy-blocktime"];
    const PREEMPT_CAPS: [&str; 3] = ["postcopy-ram", "postcopy-blocktime", "postcopy-preempt"];
    let caps_on: &[&str] = if preempt { &PREEMPT_CAPS } else { &CAPS };
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    let mut dst = Process::start(l, dir, "dst", Some("defer"))?;
    caps(&mut dst, caps_on)?;
    dst.qmp
        .cmd("migrate-incoming", json!({ "uri": uri }))
        .map_err(|e| format!("{}: {e}", dst.name))?;
    let mut src = Process::start(l, dir, "src", None)?;
    s.ready(&mut src)?;
    caps(&mut src, caps_on)?;
    src.qmp
        .cmd(
            "migrate-set-parameters",
            json!({
                "max-bandwidth": MAX_BANDWIDTH,
                "downtime-limit": DOWNTIME_LIMIT_MS,
                "max-postcopy-bandwidth": 0,
            }),
        )
        .map_err(|e| format!("{}: {e}", src.name))?;
    src.qmp
        .cmd("migrate", json!({ "uri": uri }))
        .map_err(|e| format!("{}: {e}", src.name))?;
    let started = Instant::now();
    match s.switch {
        Switch::After(d) => std::thread::sleep(d.saturating_sub(started.elapsed())),
        Switch::FirstPass => {
            let q = wait_migrate(&mut src, "end of the first pass", |q| {
                finished(q) || field(q, "ram.dirty-sync-count") >= 2
            })?;
            if finished(&q) {
                return Err(format!(
                    "{}: the migration ended before the switch: {q}",
                    src.name
                ));
            }
        }
    }
    let switched_ms = started.elapsed().as_secs_f64() * 1000.0;
    src.qmp
        .cmd("migrate-start-postcopy", json!({}))
        .map_err(|e| format!("{}: {e}", src.name))?;
    let ran_ms = wait_runs(&mut dst, &mut src)?;
    let q = wait_migrate(&mut src, "final state on the source", finished)?;
    let d = wait_migrate(&mut dst, "final state on the destination", finished)?;
    let mut round = round_of(&q, &d, switched_ms)?;
    round.ran_ms = ran_ms.ok_or_else(|| {
        format!(
            "{}: the guest never ran during the migration: {q}",
            dst.name
        )
    })?;
    // The destination must run the guest on.
    dst.poll("query-status", "the guest to run", |st| {
        st.get("status").and_then(Value::as_str) == Some("running")
    })?;
    if s.prints() {
        let printed = dst.serial().len();
        dst.wait_serial("the migrated guest's COM1 output to grow", |out| {
            out.len() > printed
        })?;
    }
    Ok(round)
}

/// The postcopy rows of `--vs-qemu`.
pub fn figures() -> Result<Vec<Report>, String> {
    let skip = |why: String| {
        Ok(vec![Report::Skipped {
            name: format!("{PREFIX}*.*"),
            why,
        }])
    };
    let qemu = match find_qemu() {
        Ok(q) => q,
        Err(why) => return skip(why),
    };
    if let Some(why) = kvm_unusable() {
        return skip(why);
    }
    if let Err(e) = uffd_sys::Uffd::new() {
        return skip(format!(
            "postcopy needs userfaultfd, which is unusable: {e} (cargo xtask doctor says more)"
        ));
    }
    let demovm = e2e::harness::demovm_path()?;
    let scratch = Scratch(
        std::env::temp_dir().join(format!("xtask-vs-qemu-postcopy-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&scratch.0);
    let sectors = crate::guests::write_sectors(&scratch.0, TOUCH)?;
    let version = qemu_version(&qemu);
    let kvm = if e2e::harness::kvm_is_pvm() {
        "KVM (PVM, kvm_pvm)"
    } else {
        "KVM"
    };
    let mut reports = Vec::new();
    for s in SCENARIOS {
        let sector = sectors
            .iter()
            .find(|(b, _)| *b == s.sector)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| format!("no {} boot sector was written", s.sector.name()))?;
        let qemu_l = Launcher {
            vmm: Vmm::Qemu,
            bin: qemu.clone(),
            guest: Guest::Sector(sector.clone()),
        };
        let demovm_l = Launcher {
            vmm: Vmm::Demovm,
            bin: demovm.clone(),
            guest: Guest::Sector(sector),
        };
        // Without and with postcopy-preempt, each VMM: the order of `rounds`.
        let variants = [
            (&qemu_l, false),
            (&demovm_l, false),
            (&qemu_l, true),
            (&demovm_l, true),
        ];
        let when = match s.switch {
            Switch::After(d) => format!("switched to postcopy {} ms after migrate", d.as_millis()),
            Switch::FirstPass => "switched to postcopy after the first pass".into(),
        };
        eprintln!(
            "vs-qemu postcopy: {} boot sector touching {} in a {MEM_MIB} MiB guest, {when}, \
             {ROUNDS} rounds each; {version}",
            s.sector.name(),
            show_size(TOUCH),
        );
        let mut rounds: [Vec<Round>; 4] = Default::default();
        let mut discarded = 0;
        for r in 0..ROUNDS {
            for (&(l, preempt), done) in variants.iter().zip(rounds.iter_mut()) {
                let who = format!("{}{}", l.vmm.name(), if preempt { "+preempt" } else { "" });
                let mut attempt = 0;
                let round = loop {
                    attempt += 1;
                    let dir = scratch
                        .0
                        .join(format!("{}-{who}-{}-{attempt}", s.name, r + 1));
                    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                    match postcopy_once(l, s, preempt, &dir) {
                        Ok(round) => break round,
                        // A round that did not count (say, the migration
                        // ended before the switch) is run again, and said.
                        Err(e) if attempt < ATTEMPTS => {
                            discarded += 1;
                            eprintln!(
                                "vs-qemu postcopy {} round {} ({who}) attempt {attempt} does \
                                 not count, running it again: {e}",
                                s.name,
                                r + 1
                            );
                        }
                        Err(e) => {
                            return Err(format!(
                                "vs-qemu postcopy {} round {} ({who}), attempt {attempt}: {e}",
                                s.name,
                                r + 1
                            ))
                        }
                    }
                };
                eprintln!(
                    "vs-qemu postcopy {} round {}/{ROUNDS} {who:<14}: switched at {:>5.0} ms, \
                     destination ran {:>5.0} ms later, blocktime {:>5.0} ms, {:>6.0} \
                     requests, total {:>6.0} ms; destination runs on",
                    s.name,
                    r + 1,
                    round.switched_ms,
                    round.ran_ms,
                    round.blocktime_ms,
                    round.requests,
                    round.total_ms,
                );
                done.push(round);
            }
        }
        let [qemu_rounds, demovm_rounds, qemu_pre, demovm_pre] = &rounds;
        let common = format!(
            "{} boot sector, {} touched, {MEM_MIB} MiB guest, 1 vCPU, {kvm}; {when}; \
             both driven by the same QMP code: capabilities postcopy-ram and \
             postcopy-blocktime on both sides, max-bandwidth {MAX_BANDWIDTH} (1 GiB/s) and \
             downtime-limit {DOWNTIME_LIMIT_MS} ms, max-postcopy-bandwidth 0, migrate over \
             loopback TCP, migrate-start-postcopy; medians of {ROUNDS} rounds each, the four \
             variants alternating; {discarded} round(s) that did not count run again (stderr \
             says why)",
            s.sector.name(),
            show_size(TOUCH),
        );
        reports.extend(scenario_figures(
            s,
            "postcopy_preempt",
            qemu_rounds,
            demovm_pre,
            &format!(
                "{common}; value demovm with postcopy-preempt (requested pages on a channel \
                 of their own, sent by the source's return-path thread), baseline {version} \
                 without it (its default, as in the rows without _preempt)"
            ),
        ));
        reports.extend(scenario_figures(
            s,
            "postcopy_preempt_both",
            qemu_pre,
            demovm_pre,
            &format!(
                "{common}; value demovm, baseline {version}, both with postcopy-preempt on \
                 both sides"
            ),
        ));
        reports.extend(scenario_figures(
            s,
            "postcopy",
            qemu_rounds,
            demovm_rounds,
            &format!(
                "{} boot sector, {} touched, {MEM_MIB} MiB guest, 1 vCPU, {kvm}; {when}; \
                 value demovm, baseline {version}; both driven by the same QMP code: \
                 capabilities postcopy-ram and postcopy-blocktime on both sides, \
                 max-bandwidth {MAX_BANDWIDTH} (1 GiB/s) and downtime-limit \
                 {DOWNTIME_LIMIT_MS} ms (precopy alone never ends), max-postcopy-bandwidth \
                 0 (unlimited), migrate over loopback TCP, migrate-start-postcopy; \
                 blocktime: the destination's postcopy-blocktime; requests: pages the \
                 destination asked for (QEMU: its source's ram.postcopy-requests); wait \
                 per request: all rounds' blocktime over their requests; total: the \
                 source's total-time; start after switch: from migrate-start-postcopy until \
                 the destination's query-status says running; stalled after switch: that \
                 plus blocktime; postcopy time: total less the switch moment; \
                 medians of {ROUNDS} rounds each, alternating; every destination checked \
                 running{}",
                s.sector.name(),
                show_size(TOUCH),
                if s.prints() {
                    " with growing COM1 output"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(reports)
}

/// The figures of one scenario, named `vs_qemu.{group}.{scenario}.*`, from its rounds:
/// value `demovm_rounds`, baseline `qemu_rounds`.
fn scenario_figures(
    s: Scenario,
    group: &str,
    qemu_rounds: &[Round],
    demovm_rounds: &[Round],
    note: &str,
) -> Vec<Report> {
    let med = |rs: &[Round], f: fn(&Round) -> f64| median(rs.iter().map(f).collect());
    let figure = |name: &str, unit: &'static str, f: fn(&Round) -> f64| -> Report {
        Figure::new(
            format!("vs_qemu.{group}.{}.{name}", s.name),
            med(demovm_rounds, f),
            unit,
        )
        .baseline(med(qemu_rounds, f))
        .note(note)
        .into()
    };
    let mut out = vec![figure("blocktime", "ms", |r| r.blocktime_ms)];
    if s.switch != Switch::FirstPass {
        out.push(figure("requests", "pages", |r| r.requests));
    }
    out.push(
        Figure::new(
            format!("vs_qemu.{group}.{}.wait_per_request", s.name),
            wait_per_request_us(demovm_rounds),
            "us",
        )
        .baseline(wait_per_request_us(qemu_rounds))
        .note(note)
        .into(),
    );
    out.push(figure("start_after_switch", "ms", |r| r.ran_ms));
    out.push(figure("stalled_after_switch", "ms", |r| {
        r.ran_ms + r.blocktime_ms
    }));
    out.push(figure("total_time", "ms", |r| r.total_ms));
    out.push(figure("postcopy_time", "ms", |r| {
        r.total_ms - r.switched_ms
    }));
    out
}

/// All rounds' blocktime over all their requests, in µs (0 without requests).
fn wait_per_request_us(rounds: &[Round]) -> f64 {
    let requests: f64 = rounds.iter().map(|r| r.requests).sum();
    if requests == 0.0 {
        return 0.0;
    }
    rounds.iter().map(|r| r.blocktime_ms).sum::<f64>() * 1000.0 / requests
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_destinations_where_it_counts_them() {
        let src = json!({"ram": {"postcopy-requests": 7}});
        assert_eq!(requests(&src, &json!({"x-postcopy-requests": 9})), 9);
        assert_eq!(requests(&src, &json!({"postcopy-blocktime": 3})), 7);
    }

    #[test]
    fn the_wait_per_request_pools_the_rounds() {
        let round = |blocktime_ms, requests| Round {
            blocktime_ms,
            requests,
            total_ms: 1.0,
            switched_ms: 1.0,
            ran_ms: 1.0,
        };
        assert_eq!(
            wait_per_request_us(&[round(300.0, 10.0), round(0.0, 0.0), round(100.0, 10.0)]),
            20_000.0
        );
        assert_eq!(wait_per_request_us(&[round(0.0, 0.0)]), 0.0);
    }

    #[test]
    fn a_round_counts_only_if_both_completed_in_postcopy_with_blocktime() {
        let src = json!({"status": "completed", "total-time": 900,
            "ram": {"postcopy-bytes": 4096, "postcopy-requests": 5}});
        let dst = json!({"status": "completed", "postcopy-blocktime": 12});
        assert_eq!(
            round_of(&src, &dst, 200.0),
            Ok(Round {
                blocktime_ms: 12.0,
                requests: 5.0,
                total_ms: 900.0,
                switched_ms: 200.0,
                ran_ms: 0.0
            })
        );
        let failed = json!({"status": "failed"});
        assert!(round_of(&failed, &dst, 0.0).is_err());
        assert!(round_of(&src, &failed, 0.0).is_err());
        let precopy = json!({"status": "completed", "ram": {"postcopy-bytes": 0}});
        assert!(round_of(&precopy, &dst, 0.0)
            .unwrap_err()
            .contains("nothing in postcopy"));
        let no_blocktime = json!({"status": "completed"});
        assert!(round_of(&src, &no_blocktime, 0.0)
            .unwrap_err()
            .contains("no postcopy-blocktime"));
    }
}
