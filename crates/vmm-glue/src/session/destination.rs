//! The destination of a migration: the `migration-in` worker.
//!
//! It waits for the source's hello (connections that say nothing valid in
//! time are dropped and listening goes on), loads RAM through the precopy
//! loader, answers pings, collects the state sections, and once `Complete`
//! arrives checks and loads them, then tells the source its verdict (`Shut`
//! 0, or 1 when it cannot run the guest). The guest runs here only if it ran
//! on the source and nobody said `stop` meanwhile.
//!
//! A failed incoming migration leaves the guest unstarted, in `inmigrate`,
//! and a new incoming migration may start (every page it sends replaces what
//! the failed one left).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use migration_ram::PrecopyLoader;
use migration_stream::{
    read_preamble, Command, Connection, Hello, Record, ReturnMessage, ReturnPathWriter, Role,
    StreamReader,
};

use super::error::SessionError;
use super::wire::Received;
use super::{MigrationStatus, Origin, Run, RunState, Shared};

/// Runs an incoming migration to its end and records the outcome.
pub(super) fn run(sh: &Arc<Shared>, origin: Origin, run: Run) {
    let result = incoming(sh, origin, &run);
    finish(sh, result, &run);
}

/// Waits for the source: the first connection with a valid main-channel hello.
fn accept(sh: &Shared, origin: Origin) -> Result<(Connection, Hello), SessionError> {
    let link_timeout = sh.link_timeout();
    match origin {
        Origin::Listener(listener) => {
            let mut rejected = |peer: &str, e: &migration_stream::Error| {
                log::warn!("dropped a connection from {peer}: {e}");
                sh.state.lock().rejected += 1;
            };
            let accepted = listener.accept_hello(Role::Main, link_timeout, &mut rejected)?;
            sh.state.lock().listener = None;
            Ok(accepted)
        }
        Origin::Connection(mut conn) => {
            if conn.handle.has_return_path() {
                conn.handle
                    .set_link_timeout(Some(link_timeout))
                    .map_err(|source| SessionError::Host {
                        what: "setting the link timeout",
                        source,
                    })?;
            }
            // Registered first, so a cancel unblocks the read of the hello.
            sh.register_conn(&conn.handle);
            let hello = read_preamble(&mut conn.reader)?;
            hello.expect(Role::Main, hello.migration_id)?;
            Ok((conn, hello))
        }
    }
}

fn incoming(sh: &Arc<Shared>, origin: Origin, run: &Run) -> Result<bool, SessionError> {
    let (conn, hello) = accept(sh, origin)?;
    sh.register_conn(&conn.handle);
    if conn.handle.has_return_path() {
        conn.handle
            .set_link_timeout(Some(sh.link_timeout()))
            .map_err(|source| SessionError::Host {
                what: "setting the link timeout",
                source,
            })?;
    }
    if run.cancel.load(Ordering::Acquire) {
        return Err(SessionError::Cancelled);
    }
    sh.set_status(MigrationStatus::Active);
    let mut rp = ReturnPathWriter::new(conn.writer);
    // A file has no return path: its writer discards, which is harmless.
    rp.write_preamble(&Hello::new(Role::ReturnPath, hello.migration_id))?;
    rp.flush()?;

    let machine = &sh.machine;
    // The loader's copy placer writes every page that arrives, and a zero page
    // only where memory does not read as zero already: whatever an earlier
    // attempt or the VMM left in RAM is overwritten, and untouched memory
    // stays unallocated.
    let mut loader = PrecopyLoader::new(
        Arc::clone(machine.ram().memory()),
        machine.ram().blocks()?,
        Arc::clone(&run.stats),
    );
    let mut reader = StreamReader::new(conn.reader);
    let result = (|| -> Result<bool, SessionError> {
        let mut received = Received::default();
        loop {
            match loader.load(&mut reader)? {
                Record::Complete => break,
                Record::Command(Command::Ping { value }) => {
                    rp.send(&ReturnMessage::Pong { value })?;
                }
                Record::Command(Command::DeviceState(d)) => received.accept(machine, d)?,
                Record::Command(c) => {
                    return Err(SessionError::Protocol(format!(
                        "command {:?} is not part of a precopy stream",
                        c.tag()
                    )))
                }
                other => {
                    return Err(SessionError::Protocol(format!(
                        "unexpected record {other:?}"
                    )))
                }
            }
        }
        received.apply(machine)
    })();
    match &result {
        Ok(_) => rp.send(&ReturnMessage::Shut { status: 0 })?,
        Err(_) => {
            // Best effort: the source learns the guest will not run here.
            let _ = rp.send(&ReturnMessage::Shut { status: 1 });
        }
    }
    result
}

fn finish(sh: &Shared, result: Result<bool, SessionError>, run: &Run) {
    match result {
        Ok(source_running) => {
            let _rc = sh.run_ctl.lock();
            let autostart = {
                let mut st = sh.state.lock();
                // A guest stopped on the source stays stopped here (QEMU's
                // global state), and so does one the operator stopped.
                let start = st.autostart && source_running;
                if !start {
                    st.runstate = RunState::Paused;
                }
                start
            };
            sh.finish(MigrationStatus::Completed, None);
            if autostart {
                if let Err(e) = sh.resume_guest() {
                    log::error!("cannot start the migrated guest: {}", e.describe());
                    sh.state.lock().runstate = RunState::Paused;
                }
            }
        }
        Err(e) if run.cancel.load(Ordering::Acquire) => {
            log::info!("incoming migration cancelled ({})", e.describe());
            sh.finish(MigrationStatus::Cancelled, None);
        }
        Err(e) => sh.finish(MigrationStatus::Failed, Some(e)),
    }
}
