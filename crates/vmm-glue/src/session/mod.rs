//! The migration session a VMM links: source and destination, over traits the
//! VMM implements for its vCPUs ([`Vcpus`]), its dirty log
//! ([`migration_ram::DirtyLog`]) and its device state ([`DeviceState`]).
//!
//! A VMM describes its VM once as a [`Machine`] (guest RAM as named vm-memory
//! regions, a dirty log, vCPUs, device sections) and builds a [`Session`] over
//! it. The session owns the VM's run state (QEMU's: running, paused,
//! inmigrate, ...) and at most one migration at a time, outgoing
//! ([`Session::migrate`], [`Session::migrate_to`]) or incoming
//! ([`Session::incoming`], [`Session::incoming_from`]), each on a thread of
//! its own that the session joins. Capabilities and parameters are typed;
//! [`Session::info`] is QEMU's `query-migrate` as one value; events arrive on
//! bounded channels or callbacks that can never stall a migration.
//!
//! ```text
//!  source:       none -> setup -> active -----------------> completed
//!                          |        |  (passes until the rest fits
//!                          |        |   downtime-limit; pause; last pass;
//!                          |        |   vCPU + device state; Complete;
//!                          |        |   wait for the destination's Shut 0)
//!                          +--------+--> cancelling -> cancelled   (guest as before)
//!                          +--------+--> failed                    (guest as before,
//!                                                                   unless the destination
//!                                                                   may run it)
//!  destination:  none -> setup (listening) -> active (loading) -> completed (guest runs
//!                                                      |              if it ran on the source)
//!                                                      +-> failed (guest never ran;
//!                                                                  incoming may start again)
//! ```
//!
//! # Threads
//!
//! - One worker per migration (`migration-out` or `migration-in`), joined by
//!   the session (at the next migration or when the session drops).
//! - An outgoing migration over a socket reads the return path on a thread of
//!   its own (`migration-rp`), joined by the worker. In postcopy it serves
//!   page requests: it queues them for the saver (on the worker), or, with
//!   `postcopy-preempt`, sends the pages itself on the preempt channel.
//! - An incoming one reads each pending connection's hello on a short-lived
//!   thread (a silent connection cannot keep the real source out), all joined
//!   before it goes on.
//! - An incoming postcopy runs the fault thread of `migration-ram`
//!   (`PostcopyIncoming`), joined when postcopy ends, and with
//!   `postcopy-preempt` a loader for the preempt channel
//!   (`migration-preempt`), joined before the worker reports the outcome.
//!
//! # Locks
//!
//! `run_ctl` serialises everything that pauses or resumes the vCPUs (stop,
//! cont, switchover, the end of a migration), so run state and vCPUs never
//! disagree; the `state` lock guards the session's fields and is never held
//! across blocking I/O or a vCPU operation. Order: `run_ctl`, then `state`,
//! then the event subscribers.
//!
//! # Examples
//!
//! `vmm-glue/examples/embed.rs` is a small VMM that migrates itself through
//! this API.

mod config;
mod destination;
mod error;
mod events;
mod machine;
mod snapshot;
mod source;
mod state;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use migration_ram::postcopy::{FaultStats, PostcopyIncoming};
use migration_ram::snapshot::WriteFaultStats;
use migration_ram::{RamStats, SharedParams};
use migration_stream::{Connection, ConnectionHandle, Listener, ListenerCanceller, MigrationUri};
use parking_lot::Mutex;

pub use config::{
    Capabilities, Capability, Event, Failure, MigrationInfo, MigrationStatus, Parameters,
    RestoreMode, RunState, DEFAULT_LINK_TIMEOUT, INCOMPATIBLE, MAX_DOWNTIME_MS, REQUIRES,
};
pub use error::{SessionError, UsageError};
pub use events::EventCallback;
pub use machine::{GuestRam, Machine, MachineError, RamRegion, MAX_DEVICE_NAME};
pub use migration_stream::ErrorKind;
pub use state::{DeviceState, ExitHandler, GuestExit, Section, StateError, Vcpus};

use events::EventHub;

/// Per-migration handles: what cancel and query-migrate reach.
#[derive(Clone)]
struct Run {
    stats: Arc<RamStats>,
    cancel: Arc<AtomicBool>,
    /// `migrate-start-postcopy` was asked for (outgoing).
    postcopy: Arc<AtomicBool>,
}

struct State {
    status: MigrationStatus,
    runstate: RunState,
    caps: Capabilities,
    params: Parameters,
    error: Option<Failure>,
    started: Option<Instant>,
    setup_time: Option<Duration>,
    total_time: Option<Duration>,
    downtime: Option<Duration>,
    run: Option<Run>,
    conn: Option<ConnectionHandle>,
    listener: Option<ListenerCanceller>,
    listen_uri: Option<MigrationUri>,
    rejected: u64,
    /// Whether the guest ever ran here (an incoming migration would overwrite
    /// it).
    guest_started: bool,
    /// When the vCPUs were first told to run ([`Session::first_run`]).
    first_run: Option<SystemTime>,
    /// Whether the destination starts the guest once loaded (`stop`/`cont`
    /// while in `inmigrate` change it).
    autostart: bool,
    /// The run state the switchover paused the guest from.
    before_switchover: Option<RunState>,
    /// Whether the current (or last) migration is outgoing.
    outgoing: bool,
    /// A postcopy destination's figures once fault handling ended.
    postcopy_stats: Option<FaultStats>,
    /// A background snapshot's write-fault figures once it ended.
    snapshot_stats: Option<WriteFaultStats>,
    /// How the snapshot being restored here is read.
    restore_mode: Option<RestoreMode>,
}

pub(crate) struct Shared {
    machine: Machine,
    state: Mutex<State>,
    run_ctl: Mutex<()>,
    /// Bandwidth and downtime as the RAM saver reads them (atomics, no lock).
    ram_params: SharedParams,
    events: EventHub,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// A postcopy destination's state: set up with the incoming migration
    /// when postcopy-ram is on, kept while postcopy is paused.
    postcopy_in: Mutex<Option<PostcopyIncoming>>,
    /// Called at a background snapshot's instant.
    snapshot_hook: Mutex<Option<Arc<SnapshotHook>>>,
}

/// What [`Session::on_snapshot_instant`] calls: with the vCPUs paused and
/// guest RAM as the snapshot will hold it.
pub type SnapshotHook = dyn Fn(&Machine) + Send + Sync;

/// The migration session of one VM. See the [module docs](self).
pub struct Session {
    shared: Arc<Shared>,
}

/// Where an outgoing migration goes.
enum Target {
    Uri(MigrationUri),
    Connection(Connection),
}

/// Where an incoming migration comes from.
enum Origin {
    Listener(Listener),
    Connection(Connection),
    /// A snapshot file, restored so.
    Snapshot(PathBuf, RestoreMode),
}

impl Session {
    /// A session over `machine`, with its guest paused (not started) and no
    /// migration. It installs its exit handler on the vCPUs.
    pub fn new(machine: Machine) -> Session {
        let params = Parameters::default();
        let ram_params = migration_ram::PrecopyParams {
            max_bandwidth: params.max_bandwidth,
            downtime_limit: params.downtime_limit,
        }
        .shared();
        let shared = Arc::new(Shared {
            machine,
            state: Mutex::new(State {
                status: MigrationStatus::None,
                runstate: RunState::Paused,
                caps: Capabilities::default(),
                params,
                error: None,
                started: None,
                setup_time: None,
                total_time: None,
                downtime: None,
                run: None,
                conn: None,
                listener: None,
                listen_uri: None,
                rejected: 0,
                guest_started: false,
                first_run: None,
                autostart: true,
                before_switchover: None,
                outgoing: false,
                postcopy_stats: None,
                snapshot_stats: None,
                restore_mode: None,
            }),
            run_ctl: Mutex::new(()),
            ram_params,
            events: EventHub::default(),
            workers: Mutex::new(Vec::new()),
            postcopy_in: Mutex::new(None),
            snapshot_hook: Mutex::new(None),
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        shared
            .machine
            .vcpus()
            .set_exit_handler(Box::new(move |exit| {
                if let Some(sh) = weak.upgrade() {
                    sh.guest_exited(exit);
                }
            }));
        Session { shared }
    }

    /// The machine.
    pub fn machine(&self) -> &Machine {
        &self.shared.machine
    }

    /// A bounded channel of events. A subscriber that lets `capacity` events
    /// pile up is dropped (its channel closes, with a log line): the session
    /// never waits for it.
    pub fn subscribe(&self, capacity: usize) -> Receiver<Event> {
        self.shared.events.subscribe(capacity)
    }

    /// Calls `callback` for every event, on the thread that emits it (a
    /// migration or vCPU thread): it must return at once.
    pub fn on_event(&self, callback: EventCallback) {
        self.shared.events.on_event(callback)
    }

    /// The run state.
    pub fn run_state(&self) -> RunState {
        self.shared.state.lock().runstate
    }

    /// When the guest first ran in this session (first boot, the end of an
    /// incoming migration, or the start of a lazy restore), by the wall
    /// clock, so another process can compare it with its own clock readings
    /// (a benchmark's time from process start to the first guest
    /// instruction). It is read just before the vCPUs are told to run: the
    /// first guest instruction follows within a thread wake-up. `None` until
    /// then.
    pub fn first_run(&self) -> Option<SystemTime> {
        self.shared.state.lock().first_run
    }

    /// Starts the guest (first boot). The same as [`Session::cont`].
    pub fn start(&self) -> Result<(), SessionError> {
        self.cont()
    }

    /// Whether an incoming migration or restore starts the guest once it is
    /// loaded, when the guest ran where it came from (on by default; QEMU's
    /// `-S` turns it off). Set it before [`Session::incoming`] or
    /// [`Session::restore`]: a guest loaded meanwhile is not stopped again.
    /// [`Session::cont`] and [`Session::stop`] during an incoming migration
    /// set it too.
    pub fn set_autostart(&self, on: bool) {
        self.shared.state.lock().autostart = on;
    }

    /// Resumes the guest (QMP `cont`). While an incoming migration is awaited
    /// it only says the guest is to run once loaded.
    pub fn cont(&self) -> Result<(), SessionError> {
        let sh = &self.shared;
        let _rc = sh.run_ctl.lock();
        let rs = {
            let mut st = sh.state.lock();
            match st.runstate {
                RunState::InMigrate => {
                    st.autostart = true;
                    return Ok(());
                }
                RunState::FinishMigrate => return Err(UsageError::Switchover.into()),
                RunState::Running => return Ok(()),
                rs @ (RunState::Shutdown | RunState::InternalError) => {
                    return Err(UsageError::GuestStopped(rs.as_str().to_owned()).into())
                }
                rs => rs,
            }
        };
        if rs == RunState::PostMigrate {
            log::warn!("cont after the guest migrated away: it now runs here too");
        }
        sh.resume_guest()
    }

    /// Pauses the guest (QMP `stop`). While an incoming migration is awaited
    /// it only says the guest is to stay paused once loaded.
    pub fn stop(&self) -> Result<(), SessionError> {
        let sh = &self.shared;
        let _rc = sh.run_ctl.lock();
        {
            let mut st = sh.state.lock();
            match st.runstate {
                RunState::InMigrate => {
                    st.autostart = false;
                    return Ok(());
                }
                RunState::FinishMigrate => return Err(UsageError::Switchover.into()),
                RunState::Running => {}
                _ => return Ok(()),
            }
        }
        sh.pause_guest(RunState::Paused)
    }

    /// The capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.shared.state.lock().caps
    }

    /// Sets each capability of `changes` at once, or none: refused while a
    /// migration runs or when the result breaks [`INCOMPATIBLE`] or
    /// [`REQUIRES`].
    pub fn set_capabilities(&self, changes: &[(Capability, bool)]) -> Result<(), SessionError> {
        let mut st = self.shared.state.lock();
        if st.status.in_progress() {
            return Err(UsageError::InProgress.into());
        }
        let mut caps = st.caps;
        for (c, on) in changes {
            caps.set(*c, *on);
        }
        caps.validate()?;
        st.caps = caps;
        Ok(())
    }

    /// The parameters.
    pub fn parameters(&self) -> Parameters {
        self.shared.state.lock().params
    }

    /// Changes parameters with `update`, at once and atomically (also while a
    /// migration runs: the new bandwidth and downtime apply from the next
    /// chunk of pages); refused, changing nothing, when a value is out of
    /// range.
    pub fn update_parameters(
        &self,
        update: impl FnOnce(&mut Parameters),
    ) -> Result<Parameters, SessionError> {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let mut p = st.params;
        update(&mut p);
        p.validate()?;
        st.params = p;
        sh.ram_params.set_max_bandwidth(p.max_bandwidth);
        sh.ram_params.set_downtime_limit(p.downtime_limit);
        sh.ram_params
            .set_max_postcopy_bandwidth(p.max_postcopy_bandwidth);
        Ok(p)
    }

    /// Migrates the VM to `uri` (`tcp:HOST:PORT`, `unix:PATH`, `file:PATH`) on
    /// a thread of its own; [`Session::info`] and the events follow it.
    pub fn migrate(&self, uri: &str) -> Result<(), SessionError> {
        let uri = MigrationUri::parse(uri).map_err(UsageError::from)?;
        self.start_outgoing(Target::Uri(uri))
    }

    /// Migrates the VM over a connection the VMM opened itself (a socket pair,
    /// a pre-authenticated channel). Its return path is used when it has one.
    pub fn migrate_to(&self, conn: Connection) -> Result<(), SessionError> {
        self.start_outgoing(Target::Connection(conn))
    }

    /// Marks the VM as waiting for an incoming migration that
    /// [`Session::incoming`] will start later (QEMU's `-incoming defer`).
    pub fn defer_incoming(&self) -> Result<(), SessionError> {
        let mut st = self.shared.state.lock();
        st.check_incoming()?;
        st.runstate = RunState::InMigrate;
        Ok(())
    }

    /// Listens on `uri` for an incoming migration, on a thread of its own. The
    /// listening address (with the real port when 0 was asked for) is in
    /// [`MigrationInfo::socket_address`] once this returns.
    ///
    /// With the `postcopy-ram` capability on, this host's support for it is
    /// checked first (userfaultfd with kernel faults, registration of every
    /// RAM region's memory kind): without it, this refuses, before anything
    /// is received.
    ///
    /// A `file:` URI naming a snapshot file (written by a background
    /// snapshot) is restored eagerly, as [`Session::restore`] does.
    pub fn incoming(&self, uri: &str) -> Result<(), SessionError> {
        let uri = MigrationUri::parse(uri).map_err(UsageError::from)?;
        self.shared.state.lock().check_incoming()?;
        if let MigrationUri::File { path } = &uri {
            if is_snapshot_file(path).unwrap_or(false) {
                return self.restore(path, RestoreMode::Eager);
            }
        }
        self.prepare_postcopy()?;
        let listener = Listener::bind(&uri)?;
        self.start_incoming(Origin::Listener(listener))
    }

    /// Loads an incoming migration from a connection the VMM accepted itself
    /// (postcopy support is checked first, as for [`Session::incoming`]).
    pub fn incoming_from(&self, conn: Connection) -> Result<(), SessionError> {
        self.shared.state.lock().check_incoming()?;
        self.prepare_postcopy()?;
        self.start_incoming(Origin::Connection(conn))
    }

    /// Restores the snapshot file at `path` (written by a background
    /// snapshot to a `file:` URI), on a thread of its own, as an incoming
    /// migration: [`Session::info`] and the events follow it, and the guest
    /// runs afterwards if it ran when the snapshot was taken (unless `stop`
    /// said otherwise meanwhile).
    ///
    /// [`RestoreMode::Eager`] reads every page before the guest runs.
    /// [`RestoreMode::Lazy`] runs the guest as soon as its state is loaded:
    /// a page it touches is read from the file while it waits, and a
    /// background fill reads the rest, from the last page touched on
    /// ([`MigrationInfo::postcopy`] shows the faults and their latency). This
    /// host's userfaultfd support is checked first. A lazy restore cannot be
    /// cancelled once the guest runs.
    pub fn restore(&self, path: &Path, mode: RestoreMode) -> Result<(), SessionError> {
        self.shared.state.lock().check_incoming()?;
        let shown = || path.display().to_string();
        match is_snapshot_file(path) {
            Ok(true) => {}
            Ok(false) => return Err(UsageError::NotASnapshot(shown()).into()),
            Err(e) => return Err(UsageError::SnapshotUnreadable(shown(), e.to_string()).into()),
        }
        if mode == RestoreMode::Lazy {
            // Refused here, before anything else, if this host cannot.
            let ram = self.shared.machine.ram();
            migration_ram::postcopy::check_support(ram.memory(), &ram.blocks()?)?;
        }
        *self.shared.postcopy_in.lock() = None;
        self.start_incoming(Origin::Snapshot(path.to_owned(), mode))
    }

    /// Calls `hook` at the instant of every background snapshot, with the
    /// vCPUs paused and guest RAM as the snapshot will hold it (before the
    /// guest runs on): for device state kept outside the session (a disk
    /// image to copy at the same instant), or a check of the snapshot. It
    /// lengthens the guest's pause by its own time.
    pub fn on_snapshot_instant(&self, hook: Box<SnapshotHook>) {
        *self.shared.snapshot_hook.lock() = Some(Arc::from(hook));
    }

    /// Sets a postcopy destination up, if postcopy-ram is on: checks the
    /// host, and keeps the blocks the loader and the fault handler share.
    fn prepare_postcopy(&self) -> Result<(), SessionError> {
        let sh = &self.shared;
        let wanted = sh.state.lock().caps.get(Capability::PostcopyRam);
        let pc = if wanted {
            let ram = sh.machine.ram();
            Some(PostcopyIncoming::new(
                Arc::clone(ram.memory()),
                Arc::new(ram.blocks()?),
            )?)
        } else {
            None
        };
        *sh.postcopy_in.lock() = pc;
        Ok(())
    }

    /// Cancels the running migration (QMP `migrate_cancel`): the source's guest
    /// goes back to the state it had, a destination stops listening or
    /// loading. Does nothing when no migration can be cancelled.
    pub fn cancel(&self) {
        let sh = &self.shared;
        let (conn, listener) = {
            let mut st = sh.state.lock();
            if !matches!(st.status, MigrationStatus::Setup | MigrationStatus::Active) {
                return;
            }
            if st.restore_mode == Some(RestoreMode::Lazy) && st.guest_started {
                log::warn!(
                    "a lazy restore cannot be cancelled once the guest runs on it: it goes on"
                );
                return;
            }
            if let Some(run) = &st.run {
                run.cancel.store(true, Ordering::Release);
            }
            sh.set_status_locked(&mut st, MigrationStatus::Cancelling);
            (st.conn.clone(), st.listener.clone())
        };
        // Unblocks a write stuck on a stalled peer, a read, or an accept.
        if let Some(c) = conn {
            if let Err(e) = c.shutdown() {
                log::debug!("shutting the migration connection down: {e}");
            }
        }
        if let Some(l) = listener {
            l.cancel();
        }
    }

    /// Switches the running outgoing migration to postcopy (QMP
    /// `migrate-start-postcopy`) at the next chunk boundary, even before the
    /// first pass ends: the guest stops here, runs at the destination at
    /// once, and the pages it lacks come on demand while the rest follows.
    /// Needs the `postcopy-ram` capability, set before the migration started.
    pub fn start_postcopy(&self) -> Result<(), SessionError> {
        let st = self.shared.state.lock();
        if !st.caps.get(Capability::PostcopyRam) {
            return Err(UsageError::PostcopyNotEnabled.into());
        }
        match (&st.run, st.status, st.outgoing) {
            (Some(run), MigrationStatus::Setup | MigrationStatus::Active, true) => {
                run.postcopy.store(true, Ordering::Release);
                Ok(())
            }
            _ => Err(UsageError::NoActiveMigration.into()),
        }
    }

    /// The current (or last) migration: QEMU's `query-migrate`.
    pub fn info(&self) -> MigrationInfo {
        let live = self
            .shared
            .postcopy_in
            .lock()
            .as_ref()
            .and_then(PostcopyIncoming::stats);
        let st = self.shared.state.lock();
        let total_time = st.total_time.or_else(|| st.started.map(|s| s.elapsed()));
        MigrationInfo {
            postcopy: live.or_else(|| st.postcopy_stats.clone()),
            status: st.status,
            total_time,
            setup_time: st.setup_time,
            downtime: st.downtime,
            ram: st.run.as_ref().map(|r| r.stats.snapshot()),
            socket_address: st.listen_uri.clone(),
            error: st.error.clone(),
            rejected_connections: st.rejected,
            snapshot: st.snapshot_stats.clone(),
            restore_mode: st.restore_mode,
        }
    }

    /// Waits until the migration reaches a final state (or `timeout` passes)
    /// and returns its info: for a VMM that drives a migration to its end.
    pub fn wait(&self, timeout: Duration) -> MigrationInfo {
        let rx = self.subscribe(64);
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info();
            if info.status.is_final() || info.status == MigrationStatus::None {
                return info;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return info;
            }
            // Any event (or a dropped subscription) means: look again.
            let _ = rx.recv_timeout(left.min(Duration::from_millis(100)));
        }
    }

    fn start_outgoing(&self, target: Target) -> Result<(), SessionError> {
        let sh = &self.shared;
        sh.reap_workers();
        let run = {
            let mut st = sh.state.lock();
            if st.status.in_progress() {
                return Err(UsageError::InProgress.into());
            }
            if st.runstate == RunState::InMigrate {
                return Err(UsageError::WaitingForIncoming.into());
            }
            if let Some(c) = st.caps.enabled().find(|c| !c.available()) {
                return Err(UsageError::Unavailable(c).into());
            }
            let preempt =
                st.caps.get(Capability::PostcopyRam) && st.caps.get(Capability::PostcopyPreempt);
            if preempt && matches!(target, Target::Connection(_)) {
                return Err(UsageError::PreemptNeedsUri.into());
            }
            let run = st.new_run();
            st.outgoing = true;
            sh.set_status_locked(&mut st, MigrationStatus::Setup);
            run
        };
        let snapshot = sh.state.lock().caps.get(Capability::BackgroundSnapshot);
        let me = Arc::clone(sh);
        let spawned = std::thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || {
                if snapshot {
                    snapshot::run(&me, target, run)
                } else {
                    source::run(&me, target, run)
                }
            });
        sh.track_worker(spawned, "starting the migration thread")
    }

    fn start_incoming(&self, origin: Origin) -> Result<(), SessionError> {
        let sh = &self.shared;
        sh.reap_workers();
        let run = {
            let mut st = sh.state.lock();
            st.check_incoming()?;
            let run = st.new_run();
            st.outgoing = false;
            st.runstate = RunState::InMigrate;
            if let Origin::Listener(l) = &origin {
                st.listener = Some(l.canceller());
                st.listen_uri = Some(l.local_uri().clone());
            }
            if let Origin::Snapshot(_, mode) = &origin {
                st.restore_mode = Some(*mode);
            }
            sh.set_status_locked(&mut st, MigrationStatus::Setup);
            run
        };
        let me = Arc::clone(sh);
        let spawned = std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || destination::run(&me, origin, run));
        sh.track_worker(spawned, "starting the incoming migration thread")
    }
}

/// Whether the file at `path` starts as a snapshot file does.
/// Whether `path` starts with the snapshot file magic (a file shorter than
/// the magic is not a snapshot); an error when it cannot be opened or read.
fn is_snapshot_file(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 8];
    match std::fs::File::open(path)?.read_exact(&mut head) {
        Ok(()) => Ok(migration_stream::is_snapshot(&head)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.cancel();
        let workers = std::mem::take(&mut *self.shared.workers.lock());
        for w in workers {
            let _ = w.join();
        }
    }
}

impl State {
    fn check_incoming(&self) -> Result<(), UsageError> {
        if self.status.in_progress() {
            return Err(UsageError::Incoming(
                "The incoming migration has already been started",
            ));
        }
        if self.guest_started {
            return Err(UsageError::Incoming(
                "the guest has run here: an incoming migration would overwrite it",
            ));
        }
        Ok(())
    }

    /// Resets what `query-migrate` shows for a new migration.
    fn new_run(&mut self) -> Run {
        let run = Run {
            stats: Arc::new(RamStats::new()),
            cancel: Arc::new(AtomicBool::new(false)),
            postcopy: Arc::new(AtomicBool::new(false)),
        };
        self.run = Some(run.clone());
        self.error = None;
        self.started = Some(Instant::now());
        self.setup_time = None;
        self.total_time = None;
        self.downtime = None;
        self.before_switchover = None;
        self.conn = None;
        self.listener = None;
        self.listen_uri = None;
        self.rejected = 0;
        self.postcopy_stats = None;
        self.snapshot_stats = None;
        self.restore_mode = None;
        run
    }
}

impl Shared {
    fn set_status_locked(&self, st: &mut State, status: MigrationStatus) {
        st.status = status;
        log::info!("migration status: {status}");
        self.events.emit(&Event::Migration(status));
    }

    fn set_status(&self, status: MigrationStatus) {
        let mut st = self.state.lock();
        self.set_status_locked(&mut st, status);
    }

    /// Ends the migration in a final state, with its error, and clears the
    /// handles cancel reaches.
    fn finish(&self, status: MigrationStatus, error: Option<SessionError>) {
        let mut st = self.state.lock();
        st.conn = None;
        st.listener = None;
        st.total_time = st.started.map(|s| s.elapsed());
        if let Some(e) = error {
            log::error!("migration failed: {}", e.describe());
            st.error = Some(Arc::new(e));
        }
        self.set_status_locked(&mut st, status);
    }

    /// Resumes the vCPUs and says so; the caller holds `run_ctl`. The run
    /// state says `running` before the vCPUs start, so a guest that stops on
    /// its own at once (its exit handler runs on a vCPU thread) has the last
    /// word.
    fn resume_guest(&self) -> Result<(), SessionError> {
        let prior = {
            let mut st = self.state.lock();
            let prior = st.runstate;
            st.runstate = RunState::Running;
            st.guest_started = true;
            st.first_run.get_or_insert_with(SystemTime::now);
            self.events.emit(&Event::Resume);
            prior
        };
        if let Err(e) = self.machine.vcpus().resume() {
            let mut st = self.state.lock();
            if st.runstate == RunState::Running {
                st.runstate = prior;
            }
            return Err(SessionError::state("vCPUs", e));
        }
        Ok(())
    }

    /// Pauses the vCPUs into `state` and says so; the caller holds `run_ctl`.
    fn pause_guest(&self, state: RunState) -> Result<(), SessionError> {
        let was = self.machine.vcpus().running();
        self.machine
            .vcpus()
            .pause()
            .map_err(|e| SessionError::state("vCPUs", e))?;
        let mut st = self.state.lock();
        // A guest that stopped on its own keeps saying so.
        if !matches!(st.runstate, RunState::Shutdown | RunState::InternalError) {
            st.runstate = state;
        }
        if was {
            self.events.emit(&Event::Stop);
        }
        Ok(())
    }

    fn guest_exited(&self, exit: GuestExit) {
        let mut st = self.state.lock();
        st.runstate = match &exit {
            GuestExit::Shutdown { reason } => {
                log::warn!("guest shut down: {reason}");
                RunState::Shutdown
            }
            GuestExit::InternalError { message, .. } => {
                log::error!("guest stopped on an internal error: {message}");
                RunState::InternalError
            }
        };
        self.events.emit(&Event::GuestExit(exit));
    }

    fn track_worker(
        &self,
        spawned: std::io::Result<JoinHandle<()>>,
        what: &'static str,
    ) -> Result<(), SessionError> {
        match spawned {
            Ok(h) => {
                self.workers.lock().push(h);
                Ok(())
            }
            Err(source) => {
                let e = SessionError::Host { what, source };
                let shown = SessionError::Host {
                    what,
                    source: std::io::Error::other(crate::error_chain(&e)),
                };
                self.finish(MigrationStatus::Failed, Some(shown));
                Err(e)
            }
        }
    }

    /// Joins the workers that have ended.
    fn reap_workers(&self) {
        let done: Vec<JoinHandle<()>> = {
            let mut w = self.workers.lock();
            let (done, running) = w.drain(..).partition(|h| h.is_finished());
            *w = running;
            done
        };
        for h in done {
            let _ = h.join();
        }
    }

    fn register_conn(&self, conn: &ConnectionHandle) {
        self.state.lock().conn = Some(conn.clone());
    }

    fn link_timeout(&self) -> Duration {
        self.state.lock().params.link_timeout
    }
}
