//! The userfaultfd end-to-end scenarios, as tests: real threads blocking on real faults.
//! Without userfaultfd each prints a loud SKIPPED line (a failure under REQUIRE_UFFD=1).

use std::io::Write;

use e2e::{Failure, Outcome};

fn run(name: &str, scenario: fn() -> Result<Outcome, Failure>) {
    match scenario() {
        Ok(o) => {
            assert_eq!(o.pages, 16 * 1024, "{name}: every page moved once");
            assert!(o.faults > 0, "{name}: no fault was exercised");
            let _ = writeln!(std::io::stderr(), "{name}: {}", o.note);
        }
        Err(Failure::Skipped(why)) => {
            assert_ne!(
                std::env::var("REQUIRE_UFFD").as_deref(),
                Ok("1"),
                "{name}: userfaultfd required (REQUIRE_UFFD=1): {why}"
            );
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {name}: {why} ***\n");
        }
        Err(f) => panic!("{name}: {f}"),
    }
}

#[test]
fn uffd_postcopy() {
    run("uffd-postcopy", e2e::postcopy);
}

#[test]
fn uffd_snapshot() {
    run("uffd-snapshot", e2e::snapshot);
}
