//! The memory workload of the project's Linux test guest: a static program that
//! dirties memory pass after pass, checks that what it wrote is still there, and
//! prints its progress on the console. Built by `cargo xtask linux-guest` with
//! `rustc -C target-feature=+crt-static`; std only.
//!
//! `workload MIB [PAUSE_MS]`: allocates MIB MiB and, pass after pass, writes the pass
//! number into the first byte of each 4 KiB page after checking that the page holds
//! the previous pass's number (a page that does not is reported as `CORRUPT`: memory
//! that a migration lost or mixed up). Prints `workload: pass N ok` about once a
//! second, and sleeps PAUSE_MS between passes (0: none).
//!
//! `workload now`: prints the guest's wall clock as `now SECONDS.NANOSECONDS`
//! (busybox `date` has no `%N`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PAGE: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("now") {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        println!("now {}.{:09}", t.as_secs(), t.subsec_nanos());
        return;
    }
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(64);
    let pause = Duration::from_millis(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0));
    let pages = (mib << 20) / PAGE;
    let mut mem = vec![0u8; mib << 20];
    println!("workload: dirtying {mib} MiB ({pages} pages) pass after pass");
    let start = Instant::now();
    let mut last = start;
    let mut corrupt = 0u64;
    for pass in 1u64.. {
        let (expect, value) = ((pass - 1) as u8, pass as u8);
        for p in 0..pages {
            let b = &mut mem[p * PAGE];
            if *b != expect {
                corrupt += 1;
                if corrupt <= 10 {
                    println!("workload: CORRUPT page {p} in pass {pass}: {b} instead of {expect}");
                }
            }
            *b = value;
        }
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let verdict = if corrupt == 0 { "ok" } else { "CORRUPT" };
            println!(
                "workload: pass {pass} {verdict} at {:.1} s",
                start.elapsed().as_secs_f64()
            );
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}
