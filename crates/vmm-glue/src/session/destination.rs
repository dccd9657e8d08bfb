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

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use migration_ram::postcopy::{PageRequestSink, PostcopyIncoming};
use migration_ram::snapshot::{restore_eager, LazyRestore};
use migration_ram::{CopyPlacer, PrecopyLoader, RamBlocks};
use migration_stream::{
    read_preamble, AdviseFlags, BlockId, BoxedWriter, Command, Connection, ConnectionHandle,
    ErrorKind, Hello, Listener, MigrationId, Record, ReturnMessage, ReturnPathWriter, Role,
    SnapshotReader, StreamReader, POSTCOPY_BACKLOG,
};
use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};

use super::error::SessionError;
use super::wire::Received;
use super::{Capability, MigrationStatus, Origin, RestoreMode, Run, RunState, Shared};

/// Runs an incoming migration (or a restore) to its end and records the
/// outcome.
pub(super) fn run(sh: &Arc<Shared>, origin: Origin, run: Run) {
    let result = match origin {
        Origin::Snapshot(path, mode) => restore(sh, &path, mode, &run),
        origin => incoming(sh, origin, &run),
    };
    finish(sh, result, &run);
}

/// Waits for the source: the first connection with a valid main-channel
/// hello. The listener is given back if `postcopy-preempt` is on here: the
/// source may open a preempt channel later.
fn accept(
    sh: &Shared,
    origin: Origin,
) -> Result<(Connection, Hello, Option<Listener>), SessionError> {
    match origin {
        Origin::Listener(listener) => {
            let accepted = accept_role(sh, &listener, Role::Main)?;
            let keep = sh.state.lock().caps.get(Capability::PostcopyPreempt);
            if !keep {
                sh.state.lock().listener = None;
            }
            Ok((accepted.0, accepted.1, keep.then_some(listener)))
        }
        Origin::Snapshot(..) => Err(SessionError::Protocol(
            "a snapshot file is restored, not accepted".into(),
        )),
        Origin::Connection(mut conn) => {
            if conn.handle.has_return_path() {
                conn.handle
                    .set_link_timeout(Some(sh.link_timeout()))
                    .map_err(|source| SessionError::Host {
                        what: "setting the link timeout",
                        source,
                    })?;
            }
            // Registered first, so a cancel unblocks the read of the hello.
            sh.register_conn(&conn.handle);
            let hello = read_preamble(&mut conn.reader)?;
            hello.expect(Role::Main, hello.migration_id)?;
            Ok((conn, hello, None))
        }
    }
}

/// The first connection on `listener` with a valid hello of `role`; the
/// others are dropped and counted.
fn accept_role(
    sh: &Shared,
    listener: &Listener,
    role: Role,
) -> Result<(Connection, Hello), SessionError> {
    let mut rejected = |peer: &str, e: &migration_stream::Error| {
        log::warn!("dropped a connection from {peer}: {e}");
        sh.state.lock().rejected += 1;
    };
    Ok(listener.accept_hello(role, sh.link_timeout(), &mut rejected)?)
}

/// The loader thread of the postcopy preempt channel (`migration-preempt`),
/// placing the pages the source sends there until its `EndOfSection`.
/// Dropped, it shuts the channel down and joins the thread;
/// [`finish`](PreemptIn::finish) waits for the channel's end instead.
struct PreemptIn(Option<(JoinHandle<migration_ram::Result<u64>>, ConnectionHandle)>);

impl PreemptIn {
    /// Accepts the source's preempt channel of migration `id` on
    /// `listener` and starts its loader, which shares `loader`'s placer
    /// (the postcopy one, so call this after `Listen`). A failure there
    /// shuts `main` down, so the main loader fails too.
    fn start(
        sh: &Shared,
        listener: &Listener,
        id: MigrationId,
        loader: &PrecopyLoader,
        main: ConnectionHandle,
    ) -> Result<PreemptIn, SessionError> {
        let (conn, hello) = accept_role(sh, listener, Role::PostcopyPreempt)?;
        sh.state.lock().listener = None;
        hello.expect(Role::PostcopyPreempt, id)?;
        let mut preempt = loader.preempt_loader();
        let reader = conn.reader;
        let thread = std::thread::Builder::new()
            .name("migration-preempt".into())
            .spawn(move || {
                // A vCPU waits for each page this thread places.
                if let Err(e) = uffd_sys::sched::prefer_short_slices(uffd_sys::sched::SHORT_SLICE) {
                    log::debug!("postcopy preempt channel: no short scheduler slice: {e}");
                }
                let r = preempt.load_preempt(&mut StreamReader::new(reader));
                if let Err(e) = &r {
                    log::warn!("postcopy preempt channel: {e}");
                    if let Err(e) = main.shutdown() {
                        log::debug!("shutting the migration connection down: {e}");
                    }
                }
                r
            })
            .map_err(|source| SessionError::Host {
                what: "starting the preempt channel's loader thread",
                source,
            })?;
        Ok(PreemptIn(Some((thread, conn.handle))))
    }

    /// Waits for the preempt channel's `EndOfSection` (every page sent on
    /// it placed); returns how many pages came on it.
    fn finish(mut self) -> Result<u64, SessionError> {
        let Some((thread, _)) = self.0.take() else {
            return Ok(0);
        };
        match thread.join() {
            Ok(r) => Ok(r?),
            Err(_) => Err(SessionError::Protocol(
                "the preempt channel's loader thread panicked".into(),
            )),
        }
    }
}

impl Drop for PreemptIn {
    fn drop(&mut self) {
        if let Some((thread, handle)) = self.0.take() {
            if let Err(e) = handle.shutdown() {
                log::debug!("shutting the preempt channel down: {e}");
            }
            let _ = thread.join();
        }
    }
}

/// How an incoming migration ended well.
struct Loaded {
    /// Whether the guest ran on the source.
    source_running: bool,
    /// Whether it went through postcopy (the guest was started at `Run`).
    postcopy: bool,
}

/// The return path, shared by the loader (pongs, the verdict) and, in
/// postcopy, the fault thread (page requests).
type SharedReturnPath = Arc<Mutex<ReturnPathWriter<BoxedWriter>>>;

/// Page requests of the fault thread, on the return path.
struct RequestSink(SharedReturnPath);

impl PageRequestSink for RequestSink {
    fn request(&self, block: BlockId, offset: u64, len: u64) -> migration_ram::Result<()> {
        self.0
            .lock()
            .write_message(&ReturnMessage::PageRequest { block, offset, len })?;
        Ok(())
    }

    fn flush(&self) -> migration_ram::Result<()> {
        self.0.lock().flush()?;
        Ok(())
    }
}

fn send(rp: &SharedReturnPath, msg: &ReturnMessage) -> Result<(), SessionError> {
    rp.lock().send(msg)?;
    Ok(())
}

fn incoming(sh: &Arc<Shared>, origin: Origin, run: &Run) -> Result<Loaded, SessionError> {
    let (conn, hello, mut listener) = accept(sh, origin)?;
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
    let mut writer = ReturnPathWriter::new(conn.writer);
    // A file has no return path: its writer discards, which is harmless.
    writer.write_preamble(&Hello::new(Role::ReturnPath, hello.migration_id))?;
    writer.flush()?;
    let rp: SharedReturnPath = Arc::new(Mutex::new(writer));

    let machine = &sh.machine;
    let mem = Arc::clone(machine.ram().memory());
    // The blocks postcopy was set up over, if it was: their received bitmaps
    // are the single record of what landed, for the loader and the faults.
    let blocks = match sh.postcopy_in.lock().as_ref() {
        Some(pc) => Arc::clone(pc.blocks()),
        None => Arc::new(machine.ram().blocks()?),
    };
    // The loader's copy placer writes every page that arrives, and a zero page
    // only where memory does not read as zero already: whatever an earlier
    // attempt or the VMM left in RAM is overwritten, and untouched memory
    // stays unallocated.
    let mut loader = PrecopyLoader::new(
        Arc::clone(&mem),
        Arc::clone(&blocks),
        Arc::clone(&run.stats),
    );
    let mut reader = StreamReader::new(conn.reader);
    let mut preempt: Option<PreemptIn> = None;
    let result = (|| -> Result<Loaded, SessionError> {
        let mut received = Some(Received::default());
        let mut source_running = None;
        loop {
            match loader.load(&mut reader)? {
                Record::Complete => break,
                Record::Command(Command::Ping { value }) => {
                    send(&rp, &ReturnMessage::Pong { value })?;
                }
                Record::Command(Command::DeviceState(d)) => received
                    .as_mut()
                    .ok_or_else(|| SessionError::Protocol("device state after Run".into()))?
                    .accept(machine, d)?,
                Record::Command(Command::Advise(flags)) => {
                    if flags.contains(AdviseFlags::POSTCOPY_RAM) && sh.postcopy_in.lock().is_none()
                    {
                        return Err(SessionError::Protocol(
                            "the source may switch to postcopy, but postcopy-ram is off here: \
                             turn it on at both ends"
                                .into(),
                        ));
                    }
                    if !flags.contains(AdviseFlags::POSTCOPY_PREEMPT) {
                        // No preempt channel will come.
                        if listener.take().is_some() {
                            sh.state.lock().listener = None;
                        }
                    } else if listener.is_none() {
                        return Err(SessionError::Protocol(
                            "the source sends requested pages on a postcopy preempt channel, \
                             but postcopy-preempt is off here: turn it on at both ends"
                                .into(),
                        ));
                    }
                }
                Record::Command(Command::Discard { block, ranges }) => {
                    postcopy(sh)?.discard(block, &ranges)?;
                }
                Record::Command(Command::Packaged(bytes)) => {
                    // Postcopy without preempt: a page the guest waits for
                    // comes behind what the socket buffers hold; keep that
                    // small (the source does the same at its end). With
                    // preempt it comes on the other channel.
                    if listener.is_none() {
                        if let Err(e) = conn.handle.limit_backlog(POSTCOPY_BACKLOG) {
                            log::warn!("postcopy: cannot bound the main channel's backlog: {e}");
                        }
                    }
                    let state = received
                        .take()
                        .ok_or_else(|| SessionError::Protocol("a second package".into()))?;
                    source_running = Some(unpack(sh, &blocks, &rp, &mut loader, state, &bytes)?);
                    // The preempt channel was connected before the package
                    // went: its loader shares the postcopy placer.
                    if let Some(l) = listener.take() {
                        preempt = Some(PreemptIn::start(
                            sh,
                            &l,
                            hello.migration_id,
                            &loader,
                            conn.handle.clone(),
                        )?);
                    }
                }
                Record::Command(c) => {
                    return Err(SessionError::Protocol(format!(
                        "command {:?} is not part of this stream",
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
        match (source_running, received) {
            (Some(source_running), _) => {
                // Postcopy: every page is here once the preempt channel,
                // too, has ended; fault handling ends.
                if let Some(p) = preempt.take() {
                    let pages = p.finish()?;
                    log::info!("postcopy: {pages} requested pages came on the preempt channel");
                }
                let pc = sh.postcopy_in.lock().take();
                if let Some(pc) = pc {
                    let stats = pc.finish()?;
                    sh.state.lock().postcopy_stats = Some(stats);
                }
                Ok(Loaded {
                    source_running,
                    postcopy: true,
                })
            }
            (None, Some(state)) => Ok(Loaded {
                source_running: state.apply(machine)?,
                postcopy: false,
            }),
            (None, None) => Err(SessionError::Protocol("no state arrived".into())),
        }
    })();
    // On a failure its thread is stopped and joined here.
    drop(preempt);
    match &result {
        Ok(_) => send(&rp, &ReturnMessage::Shut { status: 0 })?,
        Err(_) => {
            // Best effort: the source learns the guest will not run here.
            let _ = send(&rp, &ReturnMessage::Shut { status: 1 });
        }
    }
    result
}

/// The postcopy state of this incoming migration (made when it was set up,
/// if postcopy-ram is on here), with guest memory unlocked if the VMM locked
/// it: locked memory and discarded pages do not mix.
fn postcopy(sh: &Shared) -> Result<MappedMutexGuard<'_, PostcopyIncoming>, SessionError> {
    let guard = sh.postcopy_in.lock();
    let mut pc = MutexGuard::try_map(guard, Option::as_mut).map_err(|_| {
        SessionError::Protocol("a postcopy command, but postcopy-ram is off here".into())
    })?;
    if let Some(mode) = sh.machine.ram().locked() {
        pc.unlock_memory(mode)?;
    }
    Ok(pc)
}

/// The postcopy package: the machine's state, `Listen` (fault handling on,
/// the loader places atomically from now on) and `Run` (the state loads and
/// the guest starts, if it ran on the source). Returns whether it did.
fn unpack(
    sh: &Arc<Shared>,
    blocks: &Arc<RamBlocks>,
    rp: &SharedReturnPath,
    loader: &mut PrecopyLoader,
    mut state: Received,
    bytes: &[u8],
) -> Result<bool, SessionError> {
    let machine = &sh.machine;
    let mut r = StreamReader::for_package(bytes);
    let mut listening = false;
    loop {
        let record = match r.read_record(&**blocks) {
            Ok(rec) => rec,
            // The package ends cleanly between two frames.
            Err(migration_stream::Error::Closed) => {
                return Err(SessionError::Protocol(
                    "the postcopy package ended without Run".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        match record {
            Record::Command(Command::DeviceState(d)) => state.accept(machine, d)?,
            Record::Command(Command::Listen) => {
                let sink: Arc<dyn PageRequestSink> = Arc::new(RequestSink(Arc::clone(rp)));
                let placer = postcopy(sh)?.listen(
                    sink,
                    machine.vcpus().thread_ids(),
                    Some(machine.balloon_inhibitor()),
                )?;
                loader.set_placer(placer);
                listening = true;
            }
            Record::Command(Command::Run) => {
                if !listening {
                    return Err(SessionError::Protocol("Run before Listen".into()));
                }
                let source_running = state.apply(machine)?;
                sh.set_status(MigrationStatus::PostcopyActive);
                start_if_wanted(sh, source_running);
                return Ok(source_running);
            }
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected record {other:?} in the postcopy package"
                )))
            }
        }
    }
}

/// Restores a snapshot file: its blocks checked against this machine's
/// RAM and its state sections filed first, then, eagerly, every page read
/// before the state loads; or, lazily, fault handling on, the state loaded,
/// the guest started, and every page filled in while it runs.
fn restore(
    sh: &Arc<Shared>,
    path: &Path,
    mode: RestoreMode,
    run: &Run,
) -> Result<Loaded, SessionError> {
    let machine = &sh.machine;
    let reader = Arc::new(SnapshotReader::open(path)?);
    let ram = machine.ram();
    let blocks = Arc::new(ram.blocks()?);
    blocks.check_against(reader.blocks())?;
    let mut state = Received::default();
    state.accept_frames(machine, reader.state())?;
    sh.set_status(MigrationStatus::Active);
    log::info!(
        "restoring {} ({mode}): {} pages stored in the file",
        path.display(),
        (0..reader.blocks().len())
            .map(|i| reader.present_pages(BlockId(i as u32)))
            .sum::<u64>()
    );
    match mode {
        RestoreMode::Eager => {
            let placer = CopyPlacer::new(Arc::clone(ram.memory()));
            restore_eager(&reader, &blocks, &placer, &run.stats, &run.cancel)?;
            Ok(Loaded {
                source_running: state.apply(machine)?,
                postcopy: false,
            })
        }
        RestoreMode::Lazy => {
            let mut pc = PostcopyIncoming::new(Arc::clone(ram.memory()), Arc::clone(&blocks))?;
            if let Some(lock) = ram.locked() {
                pc.unlock_memory(lock)?;
            }
            let started = LazyRestore::start(
                reader,
                &mut pc,
                machine.vcpus().thread_ids(),
                Some(machine.balloon_inhibitor()),
            );
            // Kept where `info` finds its figures, and where `finish` ends it
            // on every way out.
            *sh.postcopy_in.lock() = Some(pc);
            let mut lazy = started?;
            let source_running = state.apply(machine)?;
            start_if_wanted(sh, source_running);
            // Not cancellable any more once the guest may run on it.
            let never = AtomicBool::new(false);
            let cancel = if sh.state.lock().guest_started {
                &never
            } else {
                &*run.cancel
            };
            lazy.fill(&run.stats, cancel)?;
            let pc = sh.postcopy_in.lock().take();
            if let Some(pc) = pc {
                let stats = pc.finish()?;
                sh.state.lock().postcopy_stats = Some(stats);
            }
            Ok(Loaded {
                source_running,
                postcopy: true,
            })
        }
    }
}

/// Starts the migrated guest if it ran on the source and nobody said `stop`
/// here meanwhile; otherwise it stays paused.
fn start_if_wanted(sh: &Shared, source_running: bool) {
    let _rc = sh.run_ctl.lock();
    let start = {
        let mut st = sh.state.lock();
        // A guest stopped on the source stays stopped here (QEMU's global
        // state), and so does one the operator stopped.
        let start = st.autostart && source_running;
        if !start {
            st.runstate = RunState::Paused;
        }
        start
    };
    if start {
        if let Err(e) = sh.resume_guest() {
            log::error!("cannot start the migrated guest: {}", e.describe());
            sh.state.lock().runstate = RunState::Paused;
        }
    }
}

/// Whether a lazy restore's guest has run on the memory being restored.
fn lazy_running(sh: &Shared) -> bool {
    let st = sh.state.lock();
    st.restore_mode == Some(RestoreMode::Lazy) && st.guest_started
}

fn finish(sh: &Shared, result: Result<Loaded, SessionError>, run: &Run) {
    match result {
        Ok(loaded) => {
            sh.finish(MigrationStatus::Completed, None);
            if !loaded.postcopy {
                start_if_wanted(sh, loaded.source_running);
            }
        }
        Err(e) if run.cancel.load(Ordering::Acquire) => {
            // A lazy restore cancelled before its guest ran: its fault
            // handling ends too.
            if sh.state.lock().restore_mode == Some(RestoreMode::Lazy) {
                if let Some(pc) = sh.postcopy_in.lock().take() {
                    if let Err(f) = pc.finish() {
                        log::debug!("ending the cancelled restore's fault handling: {f}");
                    }
                }
            }
            log::info!("incoming migration cancelled ({})", e.describe());
            sh.finish(MigrationStatus::Cancelled, None);
        }
        // The guest runs here and waits for pages still at the source: a
        // broken link pauses postcopy, and fault handling stays on for
        // recovery (planned).
        Err(e)
            if sh.state.lock().status == MigrationStatus::PostcopyActive
                && e.kind() == ErrorKind::Link =>
        {
            sh.finish(MigrationStatus::PostcopyPaused, Some(e))
        }
        Err(e) if lazy_running(sh) => {
            // A guest that runs on a lazy restore that failed must not see
            // its missing pages as zeros: it is paused, and fault handling
            // stays on (its pages never come).
            let _rc = sh.run_ctl.lock();
            if sh.machine.vcpus().running() {
                if let Err(p) = sh.pause_guest(RunState::Paused) {
                    log::error!(
                        "cannot pause the guest of a failed lazy restore: {}",
                        p.describe()
                    );
                }
            }
            sh.finish(MigrationStatus::Failed, Some(e))
        }
        Err(e) => {
            // Fault handling ends: a guest that was running here on missing
            // pages cannot go on.
            if let Some(pc) = sh.postcopy_in.lock().take() {
                if let Err(f) = pc.finish() {
                    log::error!("ending postcopy fault handling: {f}");
                }
            }
            sh.finish(MigrationStatus::Failed, Some(e))
        }
    }
}
