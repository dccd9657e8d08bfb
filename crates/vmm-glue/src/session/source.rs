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

use migration_ram::{
    Keepalive, PageRequester, PeerLiveness, PrecopySaver, PreemptSender, RamBlocks,
};
use migration_stream::ErrorKind;
use migration_stream::{
    connect, read_preamble, AdviseFlags, BlockId, BoxedWriter, Command, ConnectionHandle, Hello,
    MigrationId, MigrationUri, ReturnMessage, ReturnPathReader, Role, StreamWriter,
    POSTCOPY_BACKLOG,
};

use parking_lot::Mutex;

use super::error::{SessionError, UsageError};
use super::Capability;
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
    let preempt = {
        let caps = sh.state.lock().caps;
        caps.get(Capability::PostcopyRam) && caps.get(Capability::PostcopyPreempt)
    };
    // `start_outgoing` refused preempt over a connection handed in.
    let (conn, preempt_uri) = match target {
        Target::Uri(uri) => (connect(&uri, Role::Main)?, preempt.then_some(uri)),
        Target::Connection(c) => (c, None),
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
    let requests: Arc<Mutex<Option<Requests>>> = Arc::default();
    let blocks = Arc::new(sh.machine.ram().blocks()?);
    let (verdict_tx, verdict_rx) = mpsc::channel();
    let rp_thread = if has_rp {
        let rp = ReturnPath {
            id,
            blocks: Arc::clone(&blocks),
            liveness: Arc::clone(&liveness),
            requests: Arc::clone(&requests),
            verdict: verdict_tx,
            handle: handle.clone(),
        };
        let reader = conn.reader;
        let spawned = std::thread::Builder::new()
            .name("migration-rp".into())
            .spawn(move || rp.run(reader))
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
            blocks: Arc::clone(&blocks),
            requests: Arc::clone(&requests),
            handle: handle.clone(),
            has_rp,
            keepalive,
            verdicts: &verdict_rx,
            link_timeout,
            preempt_uri,
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
    /// The RAM blocks, which the return path decodes page requests against.
    blocks: Arc<RamBlocks>,
    /// Where the return-path thread finds what serves page requests once
    /// postcopy starts.
    requests: Arc<Mutex<Option<Requests>>>,
    handle: ConnectionHandle,
    has_rp: bool,
    keepalive: Option<Keepalive>,
    verdicts: &'a Receiver<Verdict>,
    link_timeout: Duration,
    /// Where the postcopy preempt channel connects, if `postcopy-preempt`
    /// is on.
    preempt_uri: Option<MigrationUri>,
}

/// What serves the destination's page requests in postcopy, for the
/// return-path thread.
enum Requests {
    /// The saver's queue: the saver sends them on the main channel.
    Queue(PageRequester),
    /// `postcopy-preempt`: the return-path thread sends them itself, on the
    /// preempt channel (see `migration_ram::preempt`).
    Preempt(PreemptSender<BoxedWriter>),
}

impl Requests {
    fn serve(&mut self, block: BlockId, offset: u64, len: u64) -> Result<(), SessionError> {
        match self {
            Requests::Queue(r) => r.request_range(block, offset, len)?,
            // A refused request is reported to the saver by the sender; a
            // failed write ends the return path, whose watchdog then shuts
            // the main channel down under the saver.
            Requests::Preempt(s) => {
                s.serve(block, offset, len)?;
            }
        }
        Ok(())
    }
}

/// Shuts a connection down when dropped: the preempt channel, whatever way
/// postcopy ends (a return-path thread blocked writing on it then fails).
struct ShutOnDrop(ConnectionHandle);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            log::debug!("shutting the preempt channel down: {e}");
        }
    }
}

fn precopy(
    sh: &Arc<Shared>,
    writer: BoxedWriter,
    mut ch: Channel<'_>,
    run: &Run,
    started: Instant,
    resume_ok: &mut bool,
) -> Result<(), SessionError> {
    let machine = &sh.machine;
    let mut w = StreamWriter::new(writer);
    w.write_preamble(&Hello::new(Role::Main, ch.id))?;
    let mut saver = PrecopySaver::new(
        Arc::clone(machine.ram().memory()),
        Arc::clone(&ch.blocks),
        Arc::clone(machine.dirty_log()),
        Arc::clone(&sh.ram_params),
        Arc::clone(&run.stats),
        Arc::clone(&run.cancel),
    );
    saver.set_keepalive(ch.keepalive.take());
    let postcopy = sh.state.lock().caps.get(Capability::PostcopyRam);
    if postcopy {
        saver.set_interrupt(Arc::clone(&run.postcopy));
    }
    let result = (|| -> Result<(), SessionError> {
        if postcopy {
            let mut flags = AdviseFlags::POSTCOPY_RAM;
            if ch.preempt_uri.is_some() {
                flags |= AdviseFlags::POSTCOPY_PREEMPT;
            }
            w.write_command(&Command::Advise(flags))?;
        }
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
            if run.postcopy.load(Ordering::Acquire) {
                if !ch.has_rp {
                    return Err(UsageError::PostcopyNeedsReturnPath.into());
                }
                return switch_to_postcopy(sh, &mut saver, &mut w, &mut ch, resume_ok);
            }
            let out = saver.iterate(&mut w)?;
            log::debug!(
                "precopy pass: {} pages, {} bytes remain, {:.0} B/s{}",
                out.pages_sent,
                out.remaining_bytes,
                out.bandwidth,
                if out.interrupted {
                    ", interrupted for postcopy"
                } else {
                    ""
                }
            );
            if out.switchover && !run.postcopy.load(Ordering::Acquire) {
                break;
            }
        }
        // Switchover: the guest stops here and goes on at the destination.
        let (was_running, down) = pause_for_switchover(sh)?;
        saver.complete(&mut w)?;
        wire::write_state(&mut w, machine, was_running)?;
        w.write_complete()?;
        w.flush()?;
        if ch.has_rp {
            // From here the destination may run the guest: never resume it here
            // unless the destination says it will not.
            *resume_ok = false;
            await_verdict(&ch, was_running, resume_ok)?;
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
        // down: the watchdog's reason is the real one (a silent peer, a
        // refusal, a hostile page request).
        Err(e) if e.kind() == ErrorKind::Link => match ch.verdicts.try_recv() {
            Ok(Err(why)) => Err(why),
            Ok(v) if *resume_ok => Err(early_verdict(v)),
            _ => Err(e),
        },
        r => r,
    }
}

/// Pauses the guest for the switchover (`finish-migrate`), remembering the
/// run state it had; returns whether it ran and when it stopped.
fn pause_for_switchover(sh: &Shared) -> Result<(bool, Instant), SessionError> {
    let _rc = sh.run_ctl.lock();
    let prior = sh.state.lock().runstate;
    let was_running = sh.machine.vcpus().running();
    sh.state.lock().before_switchover = Some(prior);
    let down = Instant::now();
    sh.pause_guest(RunState::FinishMigrate)?;
    Ok((was_running, down))
}

/// Waits for the destination's `Shut` after the last state went out. A
/// refusal (`Shut` with an error) proves the destination does not run the
/// guest (`resume_ok` is set again); anything else leaves that unknown.
fn await_verdict(
    ch: &Channel<'_>,
    was_running: bool,
    resume_ok: &mut bool,
) -> Result<(), SessionError> {
    match ch.verdicts.recv_timeout(ch.link_timeout) {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(status)) => {
            *resume_ok = true;
            Err(SessionError::Refused {
                status,
                guest: if was_running {
                    "the guest runs here again"
                } else {
                    "the guest stays here, paused as it was"
                },
            })
        }
        Ok(Err(e)) => Err(SessionError::Unconfirmed(Box::new(e))),
        Err(RecvTimeoutError::Timeout) => Err(SessionError::Unconfirmed(Box::new(
            SessionError::Timeout(ch.link_timeout.as_secs_f64()),
        ))),
        Err(RecvTimeoutError::Disconnected) => {
            Err(SessionError::Unconfirmed(Box::new(SessionError::PeerGone)))
        }
    }
}

/// The postcopy switch and what follows: the guest stops here; pages sent and
/// dirtied again are discarded at the destination; the machine's state goes
/// packaged with `Listen` and `Run`, so the destination cannot start the
/// vCPUs on half a state; then every page still missing goes, the ones the
/// destination asks for first.
fn switch_to_postcopy<W: std::io::Write>(
    sh: &Shared,
    saver: &mut PrecopySaver,
    w: &mut StreamWriter<W>,
    ch: &mut Channel<'_>,
    resume_ok: &mut bool,
) -> Result<(), SessionError> {
    let machine = &sh.machine;
    // The preempt channel is connected before the guest stops, so that its
    // handshake costs no downtime.
    let preempt = ch
        .preempt_uri
        .as_ref()
        .map(|uri| open_preempt(uri, ch.id, ch.link_timeout))
        .transpose()?;
    let (was_running, down) = pause_for_switchover(sh)?;
    // A balloon that gave pages back now would look like missing pages.
    let _no_balloon = machine.balloon_inhibitor().inhibit();
    let switch = saver.start_postcopy(w)?;
    log::info!(
        "postcopy: {} pages discarded at the destination in {} ranges, {} pages to send",
        switch.discarded_pages,
        switch.discarded_ranges,
        switch.remaining_pages
    );
    // Without preempt a requested page waits behind what the socket buffers
    // hold of the background stream: keep that small from here on (the
    // destination does the same at its end). With preempt it does not travel
    // here, and the background stream keeps the kernel's buffers.
    if preempt.is_none() {
        if let Err(e) = ch.handle.limit_backlog(POSTCOPY_BACKLOG) {
            log::warn!("postcopy: cannot bound the main channel's backlog: {e}");
        }
    }
    // Requests may come as soon as the destination runs.
    let _preempt = match preempt {
        Some((writer, handle)) => {
            *ch.requests.lock() = Some(Requests::Preempt(saver.preempt_sender(writer)));
            Some(ShutOnDrop(handle))
        }
        None => {
            *ch.requests.lock() = Some(Requests::Queue(saver.page_requester()));
            None
        }
    };
    let mut package = StreamWriter::new(Vec::new());
    wire::write_state(&mut package, machine, was_running)?;
    package.write_command(&Command::Listen)?;
    package.write_command(&Command::Run)?;
    w.write_command(&Command::Packaged(package.into_inner()?))?;
    w.flush()?;
    // The destination may run the guest from here: never here again.
    *resume_ok = false;
    sh.state.lock().downtime = Some(down.elapsed());
    sh.set_status(MigrationStatus::PostcopyActive);
    let out = saver.postcopy_send(w)?;
    // Every page went (on one channel or the other): the preempt channel
    // ends, after the page the return-path thread may be writing; later
    // requests are ignored by the finished requester.
    let sender = {
        let mut slot = ch.requests.lock();
        match slot.take() {
            Some(Requests::Preempt(s)) => {
                *slot = Some(Requests::Queue(s.requester().clone()));
                Some(s)
            }
            other => {
                *slot = other;
                None
            }
        }
    };
    if let Some(s) = sender {
        s.finish()?;
    }
    let stats = saver.stats().snapshot();
    log::info!(
        "postcopy: {} pages sent on the main channel, {} requests served there, {} in all, \
         {} ignored, {} pages sent again on the preempt channel",
        out.pages_sent,
        out.requests_served,
        stats.postcopy_requests,
        stats.postcopy_requests_ignored,
        stats.postcopy_pages_resent
    );
    w.write_complete()?;
    w.flush()?;
    await_verdict(ch, was_running, resume_ok)
}

/// Connects the postcopy preempt channel and writes its preamble: its
/// writer (with `TCP_NODELAY`: it carries single urgent pages) and handle.
fn open_preempt(
    uri: &MigrationUri,
    id: MigrationId,
    link_timeout: Duration,
) -> Result<(StreamWriter<BoxedWriter>, ConnectionHandle), SessionError> {
    let conn = connect(uri, Role::PostcopyPreempt)?;
    let host = |what| move |source| SessionError::Host { what, source };
    conn.handle
        .set_link_timeout(Some(link_timeout))
        .map_err(host("setting the preempt channel's link timeout"))?;
    conn.handle
        .set_nodelay(true)
        .map_err(host("setting TCP_NODELAY on the preempt channel"))?;
    let mut w = StreamWriter::new(conn.writer);
    w.write_preamble(&Hello::new(Role::PostcopyPreempt, id))?;
    w.flush()?;
    Ok((w, conn.handle))
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

/// The return-path thread: pongs refresh the peer's liveness, page requests go
/// to the saver's requester (postcopy), and `Shut` (or the reason there is
/// none) is the verdict.
///
/// It is also the link's watchdog: when the return path fails (the
/// destination said nothing for the link timeout, went away, refused, or
/// asked for a page that does not exist), it reports why first and then
/// shuts the connection down, so a write blocked on a destination that no
/// longer reads fails at once rather than after its own timeout.
struct ReturnPath {
    id: MigrationId,
    blocks: Arc<RamBlocks>,
    liveness: Arc<PeerLiveness>,
    requests: Arc<Mutex<Option<Requests>>>,
    verdict: Sender<Verdict>,
    handle: ConnectionHandle,
}

impl ReturnPath {
    fn run(self, mut reader: Box<dyn Read + Send>) {
        // In postcopy a vCPU at the destination waits on each request this
        // thread reads: run as soon as one comes.
        if let Err(e) = uffd_sys::sched::prefer_short_slices(uffd_sys::sched::SHORT_SLICE) {
            log::debug!("return path: no short scheduler slice: {e}");
        }
        let r = (|| -> Verdict {
            let hello = read_preamble(&mut reader)?;
            hello.expect(Role::ReturnPath, self.id)?;
            self.liveness.heard();
            let mut rp = ReturnPathReader::new(reader);
            loop {
                // On an error, the watchdog's shutdown below also ends a
                // saver that waits for requests: its next write fails.
                let msg = rp.read_message(&*self.blocks)?;
                self.liveness.heard();
                match msg {
                    ReturnMessage::Shut { status } => return Ok(status),
                    ReturnMessage::Pong { .. } => {}
                    ReturnMessage::PageRequest { block, offset, len } => {
                        let mut guard = self.requests.lock();
                        let req = guard.as_mut().ok_or_else(|| {
                            SessionError::Protocol(format!(
                                "a page request (block {block}, offset {offset:#x}) before postcopy"
                            ))
                        })?;
                        // A refused request also fails the saver's sending.
                        req.serve(block, offset, len)?;
                    }
                    other => {
                        return Err(SessionError::Protocol(format!(
                            "unexpected return-path message {other:?}"
                        )))
                    }
                }
            }
        })();
        let confirmed = matches!(r, Ok(0));
        if let Err(e) = &r {
            log::warn!("return path: {}", e.describe());
        }
        // The migration thread may be gone already: nothing to tell then.
        let _ = self.verdict.send(r);
        if !confirmed {
            if let Err(e) = self.handle.shutdown() {
                log::debug!("shutting the migration connection down: {e}");
            }
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
    let postcopy = sh.state.lock().status == MigrationStatus::PostcopyActive;
    match error {
        SessionError::Cancelled => sh.finish(MigrationStatus::Cancelled, None),
        // The guest runs at the destination, which waits for the pages
        // still here: a broken link pauses both sides, keeping what recovery
        // needs (planned); the guest never runs here again.
        e if postcopy && e.kind() == ErrorKind::Link => {
            sh.finish(MigrationStatus::PostcopyPaused, Some(e))
        }
        e => sh.finish(MigrationStatus::Failed, Some(e)),
    }
}
