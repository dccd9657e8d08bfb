//! The migration controller: QEMU's migration states, the source and destination
//! threads, statistics, and the QMP commands that drive them.
//!
//! ```text
//!  source:       none -> setup -> active -----------------> completed
//!                          |        |  (iterate until the rest fits
//!                          |        |   downtime-limit; pause; last pass;
//!                          |        |   vCPU + device state; Complete;
//!                          |        |   wait for the destination's Shut 0)
//!                          +--------+--> cancelling -> cancelled   (guest resumed)
//!                          +--------+--> failed                    (guest resumed, unless
//!                                                                   the destination may run)
//!  destination:  none -> setup (listening) -> active (loading) -> completed (guest runs)
//!                                                      \-> failed (guest never ran)
//! ```
//!
//! The source resumes its guest after a failure only when the destination cannot be
//! running it: the failure came before `Complete` was sent, or the destination said
//! `Shut` with an error. If the connection is lost after `Complete` and before the
//! destination's answer, the guest stays paused and the error says why: running it
//! on both hosts would corrupt it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_ram::{
    PrecopyLoader, PrecopyParams, PrecopySaver, RamBlocks, RamStats, SharedParams, VmmDirtyLog,
};
use migration_stream::{
    connect, read_preamble, Command, ConnectionHandle, DeviceState, Hello, Listener,
    ListenerCanceller, MigrationId, MigrationUri, Record, ReturnMessage, ReturnPathReader,
    ReturnPathWriter, Role, StreamReader, StreamWriter,
};
use parking_lot::Mutex;

use crate::json::Json;
use crate::qmp::{EventBus, QmpError, QmpHandler};
use crate::vm::{base64, ram_digest, ram_sample, Vm, BLOCK_NAMES};

/// QEMU's migration states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Connecting, announcing blocks (source); listening (destination).
    Setup,
    /// Pages moving.
    Active,
    /// Postcopy running.
    PostcopyActive,
    /// Postcopy lost its connection.
    PostcopyPaused,
    /// Postcopy recovery starting.
    PostcopyRecoverSetup,
    /// Postcopy recovering.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed; see the error description.
    Failed,
    /// Cancel requested.
    Cancelling,
    /// Cancelled.
    Cancelled,
}

impl MigrationStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    fn in_progress(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::Cancelling
        )
    }
}

/// QEMU's run states, as `query-status` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Stopped by `stop` (or never started).
    Paused,
    /// Waiting for an incoming migration.
    InMigrate,
    /// Stopped for the last pass of a migration.
    FinishMigrate,
    /// Stopped after migrating away.
    PostMigrate,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }
}

/// Migration capabilities (QEMU's names).
pub const CAPABILITIES: [&str; 4] = [
    "postcopy-ram",
    "postcopy-preempt",
    "postcopy-blocktime",
    "background-snapshot",
];

/// QEMU's largest downtime limit, in milliseconds.
pub const MAX_DOWNTIME_MS: u64 = 2_000_000;

struct Inner {
    status: MigrationStatus,
    runstate: RunState,
    error: Option<String>,
    caps: [bool; 4],
    max_postcopy_bandwidth: u64,
    started: Option<Instant>,
    setup_ms: Option<u64>,
    total_ms: Option<u64>,
    downtime_ms: Option<u64>,
    conn: Option<ConnectionHandle>,
    listener: Option<ListenerCanceller>,
    /// Where the destination listens (the real port when 0 was asked for).
    listen_uri: Option<MigrationUri>,
    /// Waiting for `migrate-incoming` (`--incoming defer`).
    incoming_deferred: bool,
    /// Whether the destination starts the guest once loaded (`cont`/`stop` set it).
    autostart: bool,
    /// The run state the last pass paused the guest from; a migration that fails while
    /// the guest may still run here puts it back in that state, and only that one.
    before_switchover: Option<RunState>,
}

/// The controller of one VM.
pub struct Controller {
    vm: Arc<Vm>,
    events: Arc<EventBus>,
    inner: Mutex<Inner>,
    params: SharedParams,
    stats: Mutex<Arc<RamStats>>,
    cancel: Mutex<Arc<AtomicBool>>,
    quit: mpsc::Sender<()>,
}

fn qerr(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// Why a migration stopped.
enum Stop {
    Cancelled,
    Failed(String),
}

impl<E: std::error::Error> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Failed(crate::error_chain(&e))
    }
}

impl Controller {
    /// A controller for `vm`; `quit` is signalled by the `quit` command.
    pub fn new(vm: Arc<Vm>, events: Arc<EventBus>, quit: mpsc::Sender<()>) -> Arc<Self> {
        Arc::new(Controller {
            vm,
            events,
            inner: Mutex::new(Inner {
                status: MigrationStatus::None,
                runstate: RunState::Paused,
                error: None,
                caps: [false; 4],
                max_postcopy_bandwidth: 0,
                started: None,
                setup_ms: None,
                total_ms: None,
                downtime_ms: None,
                conn: None,
                listener: None,
                listen_uri: None,
                incoming_deferred: false,
                autostart: true,
                before_switchover: None,
            }),
            params: PrecopyParams::default().shared(),
            stats: Mutex::new(Arc::new(RamStats::new())),
            cancel: Mutex::new(Arc::new(AtomicBool::new(false))),
            quit,
        })
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    fn set_status(&self, s: MigrationStatus) {
        self.inner.lock().status = s;
        log::info!("migration status: {}", s.as_str());
        self.events.emit(
            "MIGRATION",
            Some(Json::obj([("status", Json::str(s.as_str()))])),
        );
    }

    fn set_runstate(&self, r: RunState) {
        self.inner.lock().runstate = r;
    }

    /// Starts the guest (first boot or `cont`).
    pub fn start_guest(&self) -> Result<(), QmpError> {
        self.vm.vcpus.resume().map_err(qerr)?;
        self.set_runstate(RunState::Running);
        self.events.emit("RESUME", None);
        Ok(())
    }

    fn pause_guest(&self, state: RunState) -> Result<(), QmpError> {
        let was = self.vm.vcpus.running();
        self.vm.vcpus.pause().map_err(qerr)?;
        self.set_runstate(state);
        if was {
            self.events.emit("STOP", None);
        }
        Ok(())
    }

    /// Prepares for an incoming migration: `Some(uri)` starts listening now, `None`
    /// waits for `migrate-incoming` (`--incoming defer`).
    pub fn expect_incoming(self: &Arc<Self>, uri: Option<&str>) -> Result<(), QmpError> {
        self.set_runstate(RunState::InMigrate);
        match uri {
            Some(u) => self.start_incoming(u),
            None => {
                self.inner.lock().incoming_deferred = true;
                Ok(())
            }
        }
    }

    fn fresh_run(&self) -> (Arc<RamStats>, Arc<AtomicBool>) {
        let stats = Arc::new(RamStats::new());
        let cancel = Arc::new(AtomicBool::new(false));
        *self.stats.lock() = Arc::clone(&stats);
        *self.cancel.lock() = Arc::clone(&cancel);
        let mut i = self.inner.lock();
        i.error = None;
        i.started = Some(Instant::now());
        i.setup_ms = None;
        i.total_ms = None;
        i.downtime_ms = None;
        i.before_switchover = None;
        (stats, cancel)
    }

    fn start_incoming(self: &Arc<Self>, uri: &str) -> Result<(), QmpError> {
        let parsed = MigrationUri::parse(uri).map_err(qerr)?;
        let listener = Listener::bind(&parsed).map_err(|e| qerr(crate::error_chain(&e)))?;
        let (stats, _cancel) = self.fresh_run();
        {
            let mut i = self.inner.lock();
            i.listener = Some(listener.canceller());
            i.listen_uri = Some(listener.local_uri().clone());
            i.incoming_deferred = false;
        }
        self.set_status(MigrationStatus::Setup);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("migration-incoming".into())
            .spawn(move || {
                let result = me.run_incoming(&listener, stats);
                me.finish_incoming(result);
            })
            .map_err(qerr)?;
        Ok(())
    }

    fn run_incoming(&self, listener: &Listener, stats: Arc<RamStats>) -> Result<(), Stop> {
        let mut conn = listener.accept()?;
        self.inner.lock().conn = Some(conn.handle.clone());
        self.set_status(MigrationStatus::Active);
        let hello = read_preamble(&mut conn.reader)?;
        hello.expect(Role::Main, hello.migration_id)?;
        let mut rp = ReturnPathWriter::new(conn.writer);
        // A file has no return path: the writer discards, which is harmless.
        rp.write_preamble(&Hello::new(Role::ReturnPath, hello.migration_id))?;
        rp.flush()?;

        let blocks = RamBlocks::from_guest_memory(&self.vm.mem, &BLOCK_NAMES)?;
        let mut loader = PrecopyLoader::new(Arc::clone(&self.vm.mem), blocks, stats);
        let mut reader = StreamReader::new(conn.reader);
        let mut cpus = None;
        let mut serial = None;
        let mut source_running = None;
        let result = (|| -> Result<(), Stop> {
            loop {
                match loader.load(&mut reader)? {
                    Record::Complete => break,
                    Record::Command(Command::Ping { value }) => {
                        rp.send(&ReturnMessage::Pong { value })?;
                    }
                    Record::Command(Command::DeviceState(d)) => match d.name.as_str() {
                        "serial" => serial = Some(d),
                        "global" => match (d.version, d.data.as_slice()) {
                            (1, [r @ (0 | 1)]) => source_running = Some(*r == 1),
                            _ => return Err(Stop::Failed("malformed global state".into())),
                        },
                        n if n.starts_with("cpus.") => cpus = Some(d),
                        n => return Err(Stop::Failed(format!("state of unknown device {n:?}"))),
                    },
                    Record::Command(c) => {
                        return Err(Stop::Failed(format!(
                            "command {:?} is not part of a precopy stream",
                            c.tag()
                        )))
                    }
                    other => return Err(Stop::Failed(format!("unexpected record {other:?}"))),
                }
            }
            let cpus =
                cpus.ok_or_else(|| Stop::Failed("the stream carried no vCPU state".into()))?;
            let mine = format!("cpus.{}", self.vm.vcpus.accel());
            if cpus.name != mine {
                return Err(Stop::Failed(format!(
                    "the source sent {} state, this VM runs {mine}",
                    cpus.name
                )));
            }
            self.vm.vcpus.restore_state(cpus.version, &cpus.data)?;
            if let Some(s) = serial {
                self.vm.serial.load(s.version, &s.data)?;
            }
            let running = source_running
                .ok_or_else(|| Stop::Failed("the stream carried no global state".into()))?;
            if !running {
                // A guest stopped on the source stays stopped here (QEMU's global state).
                self.inner.lock().autostart = false;
            }
            Ok(())
        })();
        match &result {
            Ok(()) => rp.send(&ReturnMessage::Shut { status: 0 })?,
            Err(_) => {
                // Best effort: the source learns the guest will not run here.
                let _ = rp.send(&ReturnMessage::Shut { status: 1 });
            }
        }
        result
    }

    fn finish_incoming(&self, result: Result<(), Stop>) {
        {
            let mut i = self.inner.lock();
            i.conn = None;
            i.listener = None;
            i.total_ms = i.started.map(|s| s.elapsed().as_millis() as u64);
        }
        match result {
            Ok(()) => {
                self.set_status(MigrationStatus::Completed);
                if self.inner.lock().autostart {
                    if let Err(e) = self.start_guest() {
                        log::error!("cannot start the migrated guest: {}", e.desc);
                    }
                } else {
                    self.set_runstate(RunState::Paused);
                }
            }
            Err(Stop::Cancelled) => self.set_status(MigrationStatus::Cancelled),
            Err(Stop::Failed(why)) => {
                log::error!("incoming migration failed: {why}");
                self.inner.lock().error = Some(why);
                self.set_status(MigrationStatus::Failed);
            }
        }
    }

    fn start_outgoing(self: &Arc<Self>, uri: &str) -> Result<(), QmpError> {
        {
            let i = self.inner.lock();
            if i.status.in_progress() {
                return Err(QmpError::generic("There's a migration process in progress"));
            }
            if i.runstate == RunState::InMigrate {
                return Err(QmpError::generic(
                    "Guest is waiting for an incoming migration",
                ));
            }
            if let Some(c) = CAPABILITIES
                .iter()
                .zip(i.caps)
                .find_map(|(n, on)| (on && *n != "postcopy-blocktime").then_some(n))
            {
                return Err(QmpError::generic(format!(
                    "capability {c} is not available in this build"
                )));
            }
        }
        let parsed = MigrationUri::parse(uri).map_err(qerr)?;
        let (stats, cancel) = self.fresh_run();
        self.set_status(MigrationStatus::Setup);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let mut resume_ok = true;
                let mut result =
                    me.run_outgoing(&parsed, stats, Arc::clone(&cancel), &mut resume_ok);
                // Whatever error a cancel provoked (the saver's own, or a write on the
                // shut-down connection), the operator asked for it.
                if result.is_err() && resume_ok && cancel.load(Ordering::Acquire) {
                    result = Err(Stop::Cancelled);
                }
                me.finish_outgoing(result, resume_ok);
            })
            .map_err(qerr)?;
        Ok(())
    }

    fn run_outgoing(
        &self,
        uri: &MigrationUri,
        stats: Arc<RamStats>,
        cancel: Arc<AtomicBool>,
        resume_ok: &mut bool,
    ) -> Result<(), Stop> {
        let started = Instant::now();
        let conn = connect(uri, Role::Main)?;
        self.inner.lock().conn = Some(conn.handle.clone());
        if cancel.load(Ordering::Acquire) {
            return Err(Stop::Cancelled);
        }
        let id = MigrationId::generate();
        let is_file = matches!(uri, MigrationUri::File { .. });

        // The return path: the destination's verdict, read on its own thread.
        let (verdict_tx, verdict_rx) = mpsc::channel::<Result<u32, String>>();
        if !is_file {
            let mut reader = conn.reader;
            std::thread::Builder::new()
                .name("migration-rp".into())
                .spawn(move || {
                    let r = (|| -> Result<u32, String> {
                        let hello = read_preamble(&mut reader).map_err(|e| e.to_string())?;
                        hello
                            .expect(Role::ReturnPath, id)
                            .map_err(|e| e.to_string())?;
                        let mut rp = ReturnPathReader::new(reader);
                        loop {
                            match rp.read_message(&()).map_err(|e| e.to_string())? {
                                ReturnMessage::Shut { status } => return Ok(status),
                                ReturnMessage::Pong { .. } => {}
                                other => {
                                    return Err(format!("unexpected return-path message {other:?}"))
                                }
                            }
                        }
                    })();
                    let _ = verdict_tx.send(r);
                })?;
        }

        let mut w = StreamWriter::new(conn.writer);
        w.write_preamble(&Hello::new(Role::Main, id))?;
        let dirty_log = Arc::new(VmmDirtyLog::new(Arc::clone(&self.vm.mem)));
        let blocks = RamBlocks::from_guest_memory(&self.vm.mem, &BLOCK_NAMES)?;
        let mut saver = PrecopySaver::new(
            Arc::clone(&self.vm.mem),
            blocks,
            dirty_log,
            Arc::clone(&self.params),
            stats,
            Arc::clone(&cancel),
        );
        let result = (|| -> Result<(), Stop> {
            saver.setup(&mut w)?;
            self.inner.lock().setup_ms = Some(started.elapsed().as_millis() as u64);
            self.set_status(MigrationStatus::Active);
            loop {
                if cancel.load(Ordering::Acquire) {
                    return Err(Stop::Cancelled);
                }
                let out = saver.iterate(&mut w)?;
                log::debug!(
                    "iteration: {} pages sent, {} bytes remain, {:.0} B/s",
                    out.pages_sent,
                    out.remaining_bytes,
                    out.bandwidth
                );
                if out.switchover {
                    break;
                }
            }
            // Switchover: the guest stops here and resumes on the destination.
            let was_running = self.vm.vcpus.running();
            {
                let mut i = self.inner.lock();
                i.before_switchover = Some(i.runstate);
            }
            let down = Instant::now();
            self.pause_guest(RunState::FinishMigrate)
                .map_err(|e| Stop::Failed(e.desc))?;
            let finish = (|| -> Result<(), Stop> {
                saver.complete(&mut w)?;
                let (version, data) = self.vm.vcpus.save_state()?;
                w.write_command(&Command::DeviceState(DeviceState {
                    name: format!("cpus.{}", self.vm.vcpus.accel()),
                    version,
                    data,
                }))?;
                // QEMU's global state: the destination runs the guest only if it ran here.
                w.write_command(&Command::DeviceState(DeviceState {
                    name: "global".into(),
                    version: 1,
                    data: vec![u8::from(was_running)],
                }))?;
                w.write_command(&Command::DeviceState(DeviceState {
                    name: "serial".into(),
                    version: crate::serial::STATE_VERSION,
                    data: self.vm.serial.save(),
                }))?;
                w.write_complete()?;
                w.flush()?;
                Ok(())
            })();
            // A failure from here to the destination's verdict leaves `resume_ok` set,
            // and `finish_outgoing` puts the guest back as it was.
            finish?;
            if is_file {
                // No destination runs this guest: it is complete once the file is durable.
                w.into_inner()?;
                conn.handle.sync_data()?;
            } else {
                // From here the destination may run the guest: never resume it here unless
                // the destination says it will not.
                *resume_ok = false;
                match verdict_rx.recv() {
                    Ok(Ok(0)) => {}
                    Ok(Ok(status)) => {
                        *resume_ok = true;
                        let here = if was_running {
                            "the guest runs here again"
                        } else {
                            "the guest stays here, paused as it was"
                        };
                        return Err(Stop::Failed(format!(
                            "the destination failed to load the migration (status {status}); {here}"
                        )));
                    }
                    lost => {
                        let why = match lost {
                            Ok(Err(e)) => e,
                            _ => "the return path closed".into(),
                        };
                        return Err(Stop::Failed(format!(
                            "no confirmation from the destination after the last page ({why}): the guest \
                             stays paused here because it may be running on the destination"
                        )));
                    }
                }
            }
            self.inner.lock().downtime_ms = Some(down.elapsed().as_millis() as u64);
            Ok(())
        })();
        if result.is_err() {
            saver.abort();
        }
        result
    }

    fn finish_outgoing(&self, result: Result<(), Stop>, resume_ok: bool) {
        {
            let mut i = self.inner.lock();
            i.conn = None;
            i.total_ms = i.started.map(|s| s.elapsed().as_millis() as u64);
        }
        match result {
            Ok(()) => {
                self.set_runstate(RunState::PostMigrate);
                self.set_status(MigrationStatus::Completed);
            }
            Err(stop) => {
                let runstate = self.inner.lock().runstate;
                if resume_ok && runstate == RunState::FinishMigrate {
                    // Failed while paused for the last pass, and no destination runs the
                    // guest: back to the state it was in, running only if it ran.
                    let prior = self.inner.lock().before_switchover.take();
                    match prior {
                        Some(RunState::Running) => {
                            if let Err(e) = self.start_guest() {
                                log::error!(
                                    "cannot resume the guest after the failed migration: {}",
                                    e.desc
                                );
                            }
                        }
                        prior => self.set_runstate(prior.unwrap_or(RunState::Paused)),
                    }
                } else if !resume_ok {
                    self.set_runstate(RunState::PostMigrate);
                }
                match stop {
                    Stop::Cancelled => self.set_status(MigrationStatus::Cancelled),
                    Stop::Failed(why) => {
                        log::error!("migration failed: {why}");
                        self.inner.lock().error = Some(why);
                        self.set_status(MigrationStatus::Failed);
                    }
                }
            }
        }
    }

    fn cancel(&self) -> Result<Json, QmpError> {
        let (status, conn, listener) = {
            let i = self.inner.lock();
            (i.status, i.conn.clone(), i.listener.clone())
        };
        if matches!(status, MigrationStatus::Setup | MigrationStatus::Active) {
            self.cancel.lock().store(true, Ordering::Release);
            self.set_status(MigrationStatus::Cancelling);
            // Unblocks a write stuck on a stalled peer, or an accept.
            if let Some(c) = conn {
                let _ = c.shutdown();
            }
            if let Some(l) = listener {
                l.cancel();
            }
        }
        Ok(Json::obj::<&str>([]))
    }

    fn query_migrate(&self) -> Json {
        let i = self.inner.lock();
        let mut f: Vec<(String, Json)> = vec![("status".into(), Json::str(i.status.as_str()))];
        if i.status == MigrationStatus::None {
            return Json::Obj(f);
        }
        let total = i
            .total_ms
            .or_else(|| i.started.map(|s| s.elapsed().as_millis() as u64))
            .unwrap_or(0);
        f.push(("total-time".into(), Json::uint(total)));
        if let Some(d) = i.downtime_ms {
            f.push(("downtime".into(), Json::uint(d)));
        }
        if let Some(s) = i.setup_ms {
            f.push(("setup-time".into(), Json::uint(s)));
        }
        let s = self.stats.lock().snapshot();
        f.push((
            "ram".into(),
            Json::obj([
                ("transferred", Json::uint(s.transferred)),
                ("remaining", Json::uint(s.remaining)),
                ("total", Json::uint(s.total)),
                ("duplicate", Json::uint(s.duplicate)),
                ("normal", Json::uint(s.normal)),
                ("normal-bytes", Json::uint(s.normal_bytes)),
                ("mbps", Json::from(s.mbps)),
                ("dirty-sync-count", Json::uint(s.dirty_sync_count)),
                ("postcopy-requests", Json::uint(s.postcopy_requests)),
                ("dirty-pages-rate", Json::uint(s.dirty_pages_rate)),
            ]),
        ));
        if let Some(u) = &i.listen_uri {
            let addr = match u {
                MigrationUri::Tcp { host, port } => Json::obj([
                    ("type", Json::str("inet")),
                    ("host", Json::str(host.clone())),
                    ("port", Json::str(port.to_string())),
                ]),
                MigrationUri::Unix { path } => Json::obj([
                    ("type", Json::str("unix")),
                    ("path", Json::str(path.display().to_string())),
                ]),
                MigrationUri::File { path } => Json::obj([
                    ("type", Json::str("file")),
                    ("path", Json::str(path.display().to_string())),
                ]),
            };
            f.push(("socket-address".into(), Json::Arr(vec![addr])));
        }
        if let Some(e) = &i.error {
            f.push(("error-desc".into(), Json::str(e.clone())));
        }
        Json::Obj(f)
    }

    fn set_capabilities(&self, args: &Json) -> Result<Json, QmpError> {
        let list = args
            .get("capabilities")
            .and_then(Json::as_array)
            .ok_or_else(|| {
                QmpError::generic("Parameter 'capabilities' is missing or not a list")
            })?;
        let mut i = self.inner.lock();
        if i.status.in_progress() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let mut caps = i.caps;
        for item in list {
            let name = item
                .get("capability")
                .and_then(Json::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'capability' is missing"))?;
            let state = item.get("state").and_then(Json::as_bool).ok_or_else(|| {
                QmpError::generic("Parameter 'state' is missing or not a boolean")
            })?;
            let idx = CAPABILITIES
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| {
                    QmpError::generic(format!(
                        "Parameter 'capability' does not accept value '{name}'"
                    ))
                })?;
            caps[idx] = state;
        }
        if caps[1] && !caps[0] {
            return Err(QmpError::generic("Postcopy preempt requires postcopy-ram"));
        }
        if caps[3] && caps[0] {
            return Err(QmpError::generic(
                "Postcopy is not compatible with background snapshot",
            ));
        }
        i.caps = caps;
        Ok(Json::obj::<&str>([]))
    }

    fn set_parameters(&self, args: &Json) -> Result<Json, QmpError> {
        let members = args.as_object().unwrap_or(&[]);
        let mut p = self.params.snapshot();
        let mut postcopy_bw = None;
        for (k, v) in members {
            let n = v.as_u64().ok_or_else(|| {
                QmpError::generic(format!("Parameter '{k}' expects an unsigned integer"))
            })?;
            match k.as_str() {
                "max-bandwidth" => p.max_bandwidth = n,
                "downtime-limit" => {
                    if n > MAX_DOWNTIME_MS {
                        return Err(QmpError::generic(format!(
                            "Parameter 'downtime_limit' expects an integer in the range of 0 to {MAX_DOWNTIME_MS} milliseconds"
                        )));
                    }
                    p.downtime_limit = Duration::from_millis(n);
                }
                "max-postcopy-bandwidth" => postcopy_bw = Some(n),
                other => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{other}' is unexpected"
                    )))
                }
            }
        }
        self.params.store(p);
        if let Some(b) = postcopy_bw {
            self.inner.lock().max_postcopy_bandwidth = b;
        }
        Ok(Json::obj::<&str>([]))
    }

    fn query_parameters(&self) -> Json {
        let p = self.params.snapshot();
        Json::obj([
            ("max-bandwidth", Json::uint(p.max_bandwidth)),
            (
                "downtime-limit",
                Json::uint(p.downtime_limit.as_millis() as u64),
            ),
            (
                "max-postcopy-bandwidth",
                Json::uint(self.inner.lock().max_postcopy_bandwidth),
            ),
        ])
    }

    fn query_status(&self) -> Json {
        let r = self.inner.lock().runstate;
        Json::obj([
            ("status", Json::str(r.as_str())),
            ("running", Json::Bool(r == RunState::Running)),
            ("singlestep", Json::Bool(false)),
        ])
    }

    fn x_ram_sample(&self, args: &Json) -> Result<Json, QmpError> {
        let get = |k: &str| {
            args.get(k).and_then(Json::as_u64).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter '{k}' is missing or not an unsigned integer"
                ))
            })
        };
        let data = ram_sample(&self.vm.mem, get("start")?, get("end")?, get("stride")?)
            .map_err(QmpError::generic)?;
        Ok(Json::obj([("data", Json::str(base64(&data)))]))
    }
}

fn no_args(cmd: &str, args: &Json) -> Result<(), QmpError> {
    match args.as_object() {
        Some([]) | None => Ok(()),
        Some([(k, _), ..]) => Err(QmpError::generic(format!(
            "Parameter '{k}' is unexpected in {cmd}"
        ))),
    }
}

/// The QMP face of the controller.
pub struct QmpFace(pub Arc<Controller>);

impl QmpHandler for QmpFace {
    fn execute(&self, command: &str, args: &Json) -> Result<Json, QmpError> {
        let c = &self.0;
        let empty = || Ok(Json::obj::<&str>([]));
        match command {
            "query-status" => no_args(command, args).map(|()| c.query_status()),
            "stop" => {
                no_args(command, args)?;
                let rs = c.inner.lock().runstate;
                match rs {
                    RunState::InMigrate => c.inner.lock().autostart = false,
                    RunState::FinishMigrate => return Err(QmpError::generic("Migration is completing the last pass")),
                    _ => c.pause_guest(RunState::Paused)?,
                }
                empty()
            }
            "cont" => {
                no_args(command, args)?;
                let rs = c.inner.lock().runstate;
                match rs {
                    RunState::InMigrate => c.inner.lock().autostart = true,
                    RunState::FinishMigrate => return Err(QmpError::generic("Migration is completing the last pass")),
                    RunState::Running => {}
                    _ => c.start_guest()?,
                }
                empty()
            }
            "quit" => empty(),
            "migrate-set-capabilities" => c.set_capabilities(args),
            "query-migrate-capabilities" => {
                let caps = c.inner.lock().caps;
                Ok(Json::Arr(
                    CAPABILITIES
                        .iter()
                        .zip(caps)
                        .map(|(n, s)| Json::obj([("capability", Json::str(*n)), ("state", Json::Bool(s))]))
                        .collect(),
                ))
            }
            "migrate-set-parameters" => c.set_parameters(args),
            "query-migrate-parameters" => Ok(c.query_parameters()),
            "query-migrate" => Ok(c.query_migrate()),
            "migrate" => {
                if args.get("resume").and_then(Json::as_bool) == Some(true) {
                    return Err(QmpError::generic("Cannot resume if there is no paused migration"));
                }
                let uri = args
                    .get("uri")
                    .and_then(Json::as_str)
                    .ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
                c.start_outgoing(uri).map(|()| Json::obj::<&str>([]))
            }
            "migrate-incoming" => {
                let uri = args
                    .get("uri")
                    .and_then(Json::as_str)
                    .ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
                let i = c.inner.lock();
                if !i.incoming_deferred {
                    return Err(QmpError::generic(if i.runstate == RunState::InMigrate {
                        "The incoming migration has already been started"
                    } else {
                        "'-incoming' was not specified on the command line"
                    }));
                }
                drop(i);
                c.start_incoming(uri).map(|()| Json::obj::<&str>([]))
            }
            "migrate_cancel" => c.cancel(),
            "migrate-start-postcopy" => Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            )),
            "migrate-pause" => Err(QmpError::generic(
                "migrate-pause is currently only supported during postcopy-active or postcopy-recover state",
            )),
            "migrate-recover" => Err(QmpError::generic("Migrate recover can only be run when postcopy is paused.")),
            "x-ram-digest" => Ok(Json::obj([(
                "blocks",
                Json::Arr(
                    ram_digest(&c.vm.mem)
                        .into_iter()
                        .map(|(n, s, d)| Json::obj([("name", Json::str(n)), ("size", Json::uint(s)), ("digest", Json::str(d))]))
                        .collect(),
                ),
            )])),
            "x-ram-sample" => c.x_ram_sample(args),
            "x-guest-info" => Ok(Json::obj([
                ("accel", Json::str(c.vm.vcpus.accel())),
                ("vcpus", Json::uint(c.vm.vcpus.count() as u64)),
                ("serial-bytes", Json::uint(c.vm.serial.tx_count())),
                ("accel-note", c.vm.accel_note.clone().map_or(Json::Null, Json::from)),
            ])),
            other => Err(QmpError::not_found(other)),
        }
    }

    fn after_reply(&self, command: &str) {
        if command == "quit" {
            let _ = self.0.quit.send(());
        }
    }
}
