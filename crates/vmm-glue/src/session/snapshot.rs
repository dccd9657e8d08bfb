//! A background snapshot: the `migration-out` worker when the
//! `background-snapshot` capability is on.
//!
//! ```text
//!  check the host (write protection of every RAM region's memory)
//!  balloon held off until the end
//!  open the target: file:PATH (a snapshot file, pages at fixed offsets), or
//!    any other URI or connection (a migration stream a destination loads)
//!  --- the instant: vCPUs paused; vCPU and device state saved; all RAM
//!      write-protected; the snapshot hook; the guest runs on as before ---
//!  pages saved once each, write faults first, the scan under max-bandwidth
//!  file: the state, index and bitmaps, then fdatasync
//!  stream: the state, Complete, and the destination's verdict
//!  every way out: all protection removed, the fault thread joined
//! ```
//!
//! The guest runs here throughout, apart from the instant: a snapshot never
//! moves it away, so it completes, fails or is cancelled with the guest
//! running as before.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use migration_ram::snapshot::{check_support, BackgroundSnapshot, FileSink, StreamSink};
use migration_stream::{
    connect, read_preamble, Connection, DeviceState as WireState, Hello, MigrationId, MigrationUri,
    ReturnMessage, ReturnPathReader, Role, SnapshotWriter, StreamWriter,
};

use super::error::SessionError;
use super::{wire, MigrationStatus, Run, RunState, Shared, Target};

/// Where the pages go.
enum Out {
    File(PathBuf),
    Stream(Connection),
}

/// Runs a background snapshot to its end and records the outcome.
pub(super) fn run(sh: &Arc<Shared>, target: Target, run: Run) {
    let mut result = snapshot(sh, target, &run);
    if result.is_err() && run.cancel.load(Ordering::Acquire) {
        result = Err(SessionError::Cancelled);
    }
    match result {
        Ok(()) => sh.finish(MigrationStatus::Completed, None),
        Err(SessionError::Cancelled) => sh.finish(MigrationStatus::Cancelled, None),
        Err(e) => sh.finish(MigrationStatus::Failed, Some(e)),
    }
}

fn snapshot(sh: &Arc<Shared>, target: Target, run: &Run) -> Result<(), SessionError> {
    let started = Instant::now();
    let machine = &sh.machine;
    let ram = machine.ram();
    let blocks = Arc::new(ram.blocks()?);
    // Before the guest is paused: a host that cannot costs it nothing.
    let uffd = check_support(ram.memory(), &blocks)?;
    // A balloon that gave a page back would drop its protection.
    let _no_balloon = machine.balloon_inhibitor().inhibit();
    let out = match target {
        Target::Uri(MigrationUri::File { path }) => Out::File(path),
        Target::Uri(uri) => Out::Stream(connect(&uri, Role::Main)?),
        Target::Connection(c) => Out::Stream(c),
    };
    if let Out::Stream(conn) = &out {
        sh.register_conn(&conn.handle);
        if conn.handle.has_return_path() {
            conn.handle
                .set_link_timeout(Some(sh.link_timeout()))
                .map_err(|source| SessionError::Host {
                    what: "setting the link timeout",
                    source,
                })?;
        }
    }
    if run.cancel.load(Ordering::Acquire) {
        return Err(SessionError::Cancelled);
    }
    sh.state.lock().setup_time = Some(started.elapsed());
    let (mut snap, sections) = instant(sh, uffd, &blocks)?;
    sh.set_status(MigrationStatus::Active);
    let saved = match out {
        Out::File(path) => to_file(sh, &mut snap, &blocks, sections, &path, run),
        Out::Stream(conn) => to_stream(sh, &mut snap, &blocks, sections, conn, run),
    };
    // Whatever happened, no page stays protected (dropping would do it too,
    // but the error of a release belongs to the outcome).
    let released = snap.release();
    let stats = snap.fault_stats();
    log::info!(
        "background snapshot: {} write faults, {} pages saved on them, writers waited p50 {} us, \
         p99 {} us, max {} us",
        stats.faults,
        stats.fault_pages,
        stats.stall_p50_us,
        stats.stall_p99_us,
        stats.stall_max_us
    );
    sh.state.lock().snapshot_stats = Some(stats);
    saved?;
    released?;
    Ok(())
}

/// The instant of the snapshot: the guest paused, its state saved, all RAM
/// write-protected, the hook called, and the guest back in the run state it
/// had, whatever happened.
fn instant(
    sh: &Shared,
    uffd: Arc<uffd_sys::Uffd>,
    blocks: &Arc<migration_ram::RamBlocks>,
) -> Result<(BackgroundSnapshot, Vec<WireState>), SessionError> {
    let machine = &sh.machine;
    let _rc = sh.run_ctl.lock();
    let prior = sh.state.lock().runstate;
    let was_running = machine.vcpus().running();
    let down = Instant::now();
    if was_running {
        sh.pause_guest(RunState::FinishMigrate)?;
    }
    let paused = down.elapsed();
    let taken = (|| {
        let sections = wire::sections(machine, was_running)?;
        let saved = down.elapsed();
        let snap = BackgroundSnapshot::protect(
            uffd,
            Arc::clone(machine.ram().memory()),
            Arc::clone(blocks),
        )?;
        let protected = down.elapsed();
        let hook = sh.snapshot_hook.lock().clone();
        if let Some(hook) = hook {
            hook(machine);
        }
        // Where the guest's pause goes, for whoever tunes it.
        log::info!(
            "background snapshot instant: vCPUs paused after {paused:?}, state saved after \
             {saved:?}, RAM write-protected after {protected:?}, hook done after {:?}",
            down.elapsed()
        );
        Ok::<_, SessionError>((snap, sections))
    })();
    if was_running {
        if let Err(e) = sh.resume_guest() {
            log::error!(
                "cannot resume the guest after the snapshot's instant: {}",
                e.describe()
            );
        }
    } else {
        let mut st = sh.state.lock();
        if st.runstate == RunState::FinishMigrate {
            st.runstate = prior;
        }
    }
    sh.state.lock().downtime = Some(down.elapsed());
    taken
}

/// The pages into a snapshot file, then its state, index and bitmaps. A
/// file that could not be finished is removed: it would only take space
/// (and a restore refuses an unfinished one anyway).
fn to_file(
    sh: &Shared,
    snap: &mut BackgroundSnapshot,
    blocks: &migration_ram::RamBlocks,
    sections: Vec<WireState>,
    path: &std::path::Path,
    run: &Run,
) -> Result<(), SessionError> {
    let state = wire::encode_sections(sections)?;
    let writer = SnapshotWriter::create(path, &blocks.infos(), &state)?;
    let result = (|| {
        snap.save(
            &mut FileSink::new(&writer),
            &sh.ram_params,
            &run.cancel,
            &run.stats,
        )?;
        // Protection is no longer needed while the file is finished.
        snap.release()?;
        let summary = writer.finish()?;
        log::info!(
            "background snapshot: {} written, {} of {} bytes allocated",
            path.display(),
            summary.allocated_bytes,
            summary.file_len
        );
        Ok::<_, SessionError>(())
    })();
    if result.is_err() {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("removing the unfinished snapshot {}: {e}", path.display());
        }
    }
    result
}

/// The pages as a migration stream, then the state and `Complete`; a
/// destination loads it as a precopy migration and answers `Shut`.
fn to_stream(
    sh: &Shared,
    snap: &mut BackgroundSnapshot,
    blocks: &migration_ram::RamBlocks,
    sections: Vec<WireState>,
    conn: Connection,
    run: &Run,
) -> Result<(), SessionError> {
    let has_rp = conn.handle.has_return_path();
    let id = MigrationId::generate();
    let mut w = StreamWriter::new(conn.writer);
    w.write_preamble(&Hello::new(Role::Main, id))?;
    w.write_ram_setup(&blocks.infos())?;
    snap.save(
        &mut StreamSink::new(&mut w),
        &sh.ram_params,
        &run.cancel,
        &run.stats,
    )?;
    snap.release()?;
    wire::write_sections(&mut w, sections)?;
    w.write_complete()?;
    w.flush()?;
    if !has_rp {
        return Ok(());
    }
    // The destination's verdict: its preamble, then messages until Shut.
    let mut reader = conn.reader;
    read_preamble(&mut reader)?.expect(Role::ReturnPath, id)?;
    let mut rp = ReturnPathReader::new(reader);
    loop {
        match rp.read_message(blocks)? {
            ReturnMessage::Shut { status: 0 } => return Ok(()),
            ReturnMessage::Shut { status } => {
                return Err(SessionError::Refused {
                    status,
                    guest: "the guest runs on here",
                })
            }
            ReturnMessage::Pong { .. } => {}
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected return-path message {other:?}"
                )))
            }
        }
    }
}
