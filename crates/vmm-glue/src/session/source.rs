//! The source of a migration: the `migration-out` worker.
//!
//! It connects, announces RAM and sends it pass after pass (the precopy saver
//! of `migration-ram`, with its page scheduler and rate limiter), pauses the
//! guest when the rest fits the downtime limit, sends the last pages and the
//! machine's state, and waits for the destination's verdict on the return
//! path, which a thread of its own (`migration-rp`) reads. That thread also
//! records the destination's answers to the saver's pings, so a destination
//! that stops answering fails the migration with a link error within the
//! link timeout.
//!
//! After a failure the guest goes back to the run state it had before the
//! switchover, unless the destination may be running it: once `Complete` went
//! out, only the destination's `Shut` with an error proves it does not.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_ram::{Keepalive, PeerLiveness, PrecopySaver};
use migration_stream::ErrorKind;
use migration_stream::{
    connect, read_preamble, BoxedWriter, ConnectionHandle, Hello, MigrationId, ReturnMessage,
    ReturnPathReader, Role, StreamWriter,
};

use super::error::SessionError;
use super::{wire, MigrationStatus, Run, RunState, Shared, Target};

/// What the return-path thread reports: the destination's status in `Shut`,
/// or why the return path ended without one.
type Verdict = Result<u32, SessionError>;

/// Longest gap between two pings on the main channel.
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Runs an outgoing migration to its end and records the outcome.
pub(super) fn run(sh: &Arc<Shared>, target: Target, run: Run) {
    let mut resume_ok = true;
    let mut result = outgoing(sh, target, &run, &mut resume_ok);
    // Whatever error a cancel provoked (the saver's own, or a write on the
    // shut-down connection), the operator asked for it.
    if result.is_err() && resume_ok && run.cancel.load(Ordering::Acquire) {
        result = Err(SessionError::Cancelled);
    }
    finish(sh, result, resume_ok);
}

fn outgoing(
    sh: &Arc<Shared>,
    target: Target,
    run: &Run,
    resume_ok: &mut bool,
) -> Result<(), SessionError> {
    let started = Instant::now();
    let link_timeout = sh.link_timeout();
    let conn = match target {
        Target::Uri(uri) => connect(&uri, Role::Main)?,
        Target::Connection(c) => c,
    };
    let handle = conn.handle.clone();
    sh.register_conn(&handle);
    if run.cancel.load(Ordering::Acquire) {
        return Err(SessionError::Cancelled);
    }
    let has_rp = handle.has_return_path();
    if has_rp {
        handle
            .set_link_timeout(Some(link_timeout))
            .map_err(|source| SessionError::Host {
                what: "setting the link timeout",
                source,
            })?;
    }
    let id = MigrationId::generate();
    let liveness = Arc::new(PeerLiveness::new());
    let (verdict_tx, verdict_rx) = mpsc::channel();
    let rp_thread = if has_rp {
        let (reader, liveness, rp_handle) = (conn.reader, Arc::clone(&liveness), handle.clone());
        let spawned = std::thread::Builder::new()
            .name("migration-rp".into())
            .spawn(move || return_path(reader, id, &liveness, &verdict_tx, &rp_handle))
            .map_err(|source| SessionError::Host {
                what: "starting the return-path thread",
                source,
            })?;
        Some(spawned)
    } else {
        None
    };
    let keepalive =
        has_rp.then(|| Keepalive::new(PING_INTERVAL.min(link_timeout / 4), link_timeout, liveness));
    let result = precopy(
        sh,
        conn.writer,
        Channel {
            id,
            handle: handle.clone(),
            has_rp,
            keepalive,
            verdicts: &verdict_rx,
            link_timeout,
        },
        run,
        started,
        resume_ok,
    );
    // Done with the connection either way: this also ends the return-path
    // thread if it still waits.
    if let Err(e) = handle.shutdown() {
        log::debug!("shutting the migration connection down: {e}");
    }
    if let Some(t) = rp_thread {
        let _ = t.join();
    }
    result
}

/// The main channel's settings for one migration.
struct Channel<'a> {
    id: MigrationId,
    handle: ConnectionHandle,
    has_rp: bool,
    keepalive: Option<Keepalive>,
    verdicts: &'a Receiver<Verdict>,
    link_timeout: Duration,
}

fn precopy(
    sh: &Arc<Shared>,
    writer: BoxedWriter,
    ch: Channel<'_>,
    run: &Run,
    started: Instant,
    resume_ok: &mut bool,
) -> Result<(), SessionError> {
    let machine = &sh.machine;
    let mut w = StreamWriter::new(writer);
    w.write_preamble(&Hello::new(Role::Main, ch.id))?;
    let mut saver = PrecopySaver::new(
        Arc::clone(machine.ram().memory()),
        machine.ram().blocks()?,
        Arc::clone(machine.dirty_log()),
        Arc::clone(&sh.ram_params),
        Arc::clone(&run.stats),
        Arc::clone(&run.cancel),
    );
    saver.set_keepalive(ch.keepalive);
    let result = (|| -> Result<(), SessionError> {
        saver.setup(&mut w)?;
        sh.state.lock().setup_time = Some(started.elapsed());
        sh.set_status(MigrationStatus::Active);
        loop {
            if run.cancel.load(Ordering::Acquire) {
                return Err(SessionError::Cancelled);
            }
            // The destination may have given up already.
            match ch.verdicts.try_recv() {
                Ok(v) => return Err(early_verdict(v)),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
            let out = saver.iterate(&mut w)?;
            log::debug!(
                "precopy pass: {} pages, {} bytes remain, {:.0} B/s",
                out.pages_sent,
                out.remaining_bytes,
                out.bandwidth
            );
            if out.switchover {
                break;
            }
        }
        // Switchover: the guest stops here and goes on at the destination.
        let (was_running, down) = {
            let _rc = sh.run_ctl.lock();
            let prior = sh.state.lock().runstate;
            let was_running = machine.vcpus().running();
            sh.state.lock().before_switchover = Some(prior);
            let down = Instant::now();
            sh.pause_guest(RunState::FinishMigrate)?;
            (was_running, down)
        };
        saver.complete(&mut w)?;
        wire::write_state(&mut w, machine, was_running)?;
        w.write_complete()?;
        w.flush()?;
        if ch.has_rp {
            // From here the destination may run the guest: never resume it here
            // unless the destination says it will not.
            *resume_ok = false;
            match ch.verdicts.recv_timeout(ch.link_timeout) {
                Ok(Ok(0)) => {}
                Ok(Ok(status)) => {
                    *resume_ok = true;
                    return Err(SessionError::Refused {
                        status,
                        guest: if was_running {
                            "the guest runs here again"
                        } else {
                            "the guest stays here, paused as it was"
                        },
                    });
                }
                Ok(Err(e)) => return Err(SessionError::Unconfirmed(Box::new(e))),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SessionError::Unconfirmed(Box::new(SessionError::Timeout(
                        ch.link_timeout.as_secs_f64(),
                    ))))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SessionError::Unconfirmed(Box::new(SessionError::PeerGone)))
                }
            }
        } else {
            // No destination runs this guest: it is complete once the file is
            // durable.
            drop(w.into_inner()?);
            ch.handle.sync_data().map_err(|source| {
                SessionError::Stream(migration_stream::Error::Io {
                    context: "syncing the migration file",
                    source,
                })
            })?;
        }
        sh.state.lock().downtime = Some(down.elapsed());
        Ok(())
    })();
    if result.is_err() {
        saver.abort();
    }
    match result {
        // A write that failed because the return-path watchdog shut the link
        // down: the watchdog's reason is the real one.
        Err(e) if e.kind() == ErrorKind::Link && *resume_ok => match ch.verdicts.try_recv() {
            Ok(Err(why)) if why.kind() == ErrorKind::Link => Err(why),
            Ok(v) => Err(early_verdict(v)),
            Err(_) => Err(e),
        },
        r => r,
    }
}

/// The error for a verdict that came before the switchover.
fn early_verdict(v: Verdict) -> SessionError {
    match v {
        Ok(status) => SessionError::Refused {
            status,
            guest: "the guest runs on here",
        },
        Err(e) => e,
    }
}

/// Reads the return path: pongs refresh the peer's liveness; `Shut` (or the
/// reason there is none) is the verdict.
///
/// It is also the link's watchdog: when the return path fails (the
/// destination said nothing for the link timeout, went away, or refused), it
/// reports why first and then shuts the connection down, so a write blocked
/// on a destination that no longer reads fails at once rather than after its
/// own timeout.
fn return_path(
    mut reader: Box<dyn Read + Send>,
    id: MigrationId,
    liveness: &PeerLiveness,
    verdict: &Sender<Verdict>,
    handle: &ConnectionHandle,
) {
    let r = (|| -> Verdict {
        let hello = read_preamble(&mut reader)?;
        hello.expect(Role::ReturnPath, id)?;
        liveness.heard();
        let mut rp = ReturnPathReader::new(reader);
        loop {
            match rp.read_message(&())? {
                ReturnMessage::Shut { status } => return Ok(status),
                ReturnMessage::Pong { .. } => liveness.heard(),
                other => {
                    return Err(SessionError::Protocol(format!(
                        "unexpected return-path message {other:?} during precopy"
                    )))
                }
            }
        }
    })();
    let confirmed = matches!(r, Ok(0));
    // The migration thread may be gone already: nothing to tell then.
    let _ = verdict.send(r);
    if !confirmed {
        if let Err(e) = handle.shutdown() {
            log::debug!("shutting the migration connection down: {e}");
        }
    }
}

/// Records the outcome and puts the guest where it belongs.
fn finish(sh: &Shared, result: Result<(), SessionError>, resume_ok: bool) {
    let error = match result {
        Ok(()) => {
            sh.state.lock().runstate = RunState::PostMigrate;
            sh.finish(MigrationStatus::Completed, None);
            return;
        }
        Err(e) => e,
    };
    {
        let _rc = sh.run_ctl.lock();
        let (rs, prior) = {
            let mut st = sh.state.lock();
            (st.runstate, st.before_switchover.take())
        };
        if resume_ok && rs == RunState::FinishMigrate {
            // Failed while paused for the last pass, and no destination runs
            // the guest: back to the state it was in, running only if it ran.
            match prior {
                Some(RunState::Running) => {
                    if let Err(e) = sh.resume_guest() {
                        log::error!(
                            "cannot resume the guest after the failed migration: {}",
                            e.describe()
                        );
                    }
                }
                p => sh.state.lock().runstate = p.unwrap_or(RunState::Paused),
            }
        } else if !resume_ok {
            sh.state.lock().runstate = RunState::PostMigrate;
        }
    }
    match error {
        SessionError::Cancelled => sh.finish(MigrationStatus::Cancelled, None),
        e => sh.finish(MigrationStatus::Failed, Some(e)),
    }
}
