//! The QMP face of a [`Session`]: QEMU's migration commands mapped to the
//! session's typed calls, and its events to QMP events. Nothing else lives
//! here: the protocol is the server's, the behaviour the session's.
//!
//! | command | session call |
//! |---|---|
//! | `query-status` | [`Session::run_state`]; `x-first-run-unix-us` is [`Session::first_run`] |
//! | `stop`, `cont` | [`Session::stop`], [`Session::cont`] |
//! | `migrate-set-capabilities`, `query-migrate-capabilities` | [`Session::set_capabilities`], [`Session::capabilities`] |
//! | `migrate-set-parameters`, `query-migrate-parameters` | [`Session::update_parameters`], [`Session::parameters`] |
//! | `migrate`, `migrate-incoming`, `migrate_cancel` | [`Session::migrate`], [`Session::incoming`], [`Session::cancel`] |
//! | `migrate-start-postcopy` | [`Session::start_postcopy`] |
//! | `query-migrate` | [`Session::info`] |
//! | `x-ram-digest`, `x-ram-sample` | [`verify::digest`], [`verify::sample`] |
//! | `x-write-protected-pages`, `x-populate-write` | [`verify::write_protected_pages`], [`verify::populate_write`] |
//! | `quit` | the VMM's quit callback, after the reply |
//!
//! `migrate-set-parameters` also takes `x-link-timeout` (milliseconds);
//! `migrate-incoming` takes `x-restore-mode` (`eager` or `lazy`) with a
//! `file:` snapshot ([`Session::restore`]). `query-migrate` adds
//! `x-snapshot` (a background snapshot's write faults and the writers'
//! waits) and `x-restore-mode`. Other commands go to the VMM's
//! [`QmpExtension`], if any.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::qmp::server::{EventSink, Handler, QmpError};
use crate::session::{
    Capability, Event, GuestExit, MigrationInfo, MigrationStatus, Parameters, RestoreMode,
    RunState, Session, SessionError,
};
use crate::verify;

/// Commands a VMM adds to the adapter's (`x-guest-info`, say).
pub trait QmpExtension: Send + Sync {
    /// Runs `command`, or returns `None` when it is not one of the extension's.
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>>;
}

/// Maps QMP commands to a [`Session`].
pub struct QmpAdapter {
    session: Arc<Session>,
    quit: Box<dyn Fn() + Send + Sync>,
    extension: Option<Arc<dyn QmpExtension>>,
}

impl QmpAdapter {
    /// An adapter for `session`; `quit` runs after the reply to `quit` went
    /// out.
    pub fn new(session: Arc<Session>, quit: Box<dyn Fn() + Send + Sync>) -> QmpAdapter {
        QmpAdapter {
            session,
            quit,
            extension: None,
        }
    }

    /// Adds the VMM's own commands.
    pub fn with_extension(mut self, extension: Arc<dyn QmpExtension>) -> QmpAdapter {
        self.extension = Some(extension);
        self
    }
}

/// Sends the session's events to QMP clients as QEMU names them (`MIGRATION`,
/// `STOP`, `RESUME`, `SHUTDOWN`). The sink never blocks, so neither does the
/// session.
pub fn forward_events(session: &Session, sink: EventSink) {
    session.on_event(Box::new(move |e| match e {
        Event::Migration(s) => sink.emit("MIGRATION", Some(json!({ "status": s.as_str() }))),
        Event::Stop => sink.emit("STOP", None),
        Event::Resume => sink.emit("RESUME", None),
        Event::GuestExit(GuestExit::Shutdown { reason }) => sink.emit(
            "SHUTDOWN",
            Some(json!({ "guest": true, "reason": "guest-shutdown", "x-detail": reason })),
        ),
        Event::GuestExit(GuestExit::InternalError { vcpu, message }) => sink.emit(
            "STOP",
            Some(json!({ "x-internal-error": { "vcpu": vcpu, "message": message } })),
        ),
    }));
}

fn err(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn session_err(e: SessionError) -> QmpError {
    QmpError::generic(e.describe())
}

/// Refuses members other than `allowed`, as QEMU words it.
fn only(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(err(format_args!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn missing(name: &str) -> QmpError {
    err(format_args!("Parameter '{name}' is missing"))
}

fn wrong_type(name: &str, expected: &str) -> QmpError {
    err(format_args!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, QmpError> {
    match args.get(name) {
        None => Err(missing(name)),
        Some(v) => v.as_str().ok_or_else(|| wrong_type(name, "string")),
    }
}

fn u64_of(name: &str, v: &Value) -> Result<u64, QmpError> {
    v.as_u64().ok_or_else(|| wrong_type(name, "integer"))
}

fn u64_arg(args: &Map<String, Value>, name: &str) -> Result<u64, QmpError> {
    args.get(name)
        .ok_or_else(|| missing(name))
        .and_then(|v| u64_of(name, v))
}

fn bool_of(name: &str, v: &Value) -> Result<bool, QmpError> {
    v.as_bool().ok_or_else(|| wrong_type(name, "boolean"))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl QmpAdapter {
    fn set_capabilities(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        only(args, &["capabilities"])?;
        let list = args
            .get("capabilities")
            .ok_or_else(|| missing("capabilities"))?
            .as_array()
            .ok_or_else(|| wrong_type("capabilities", "array"))?;
        let mut changes = Vec::with_capacity(list.len());
        for item in list {
            let item = item
                .as_object()
                .ok_or_else(|| wrong_type("capabilities", "array of objects"))?;
            only(item, &["capability", "state"])?;
            let name = str_arg(item, "capability")?;
            let state = item
                .get("state")
                .ok_or_else(|| missing("state"))
                .and_then(|v| bool_of("state", v))?;
            let cap = Capability::from_name(name).ok_or_else(|| {
                err(format_args!(
                    "Parameter 'capability' does not accept value '{name}'"
                ))
            })?;
            changes.push((cap, state));
        }
        self.session
            .set_capabilities(&changes)
            .map_err(session_err)?;
        Ok(json!({}))
    }

    fn set_parameters(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        only(
            args,
            &[
                "max-bandwidth",
                "downtime-limit",
                "max-postcopy-bandwidth",
                "x-link-timeout",
            ],
        )?;
        let mut values = Vec::with_capacity(args.len());
        for (k, v) in args {
            values.push((k.as_str(), u64_of(k, v)?));
        }
        self.session
            .update_parameters(|p: &mut Parameters| {
                for (k, v) in values {
                    match k {
                        "max-bandwidth" => p.max_bandwidth = v,
                        "downtime-limit" => p.downtime_limit = Duration::from_millis(v),
                        "max-postcopy-bandwidth" => p.max_postcopy_bandwidth = v,
                        _ => p.link_timeout = Duration::from_millis(v),
                    }
                }
            })
            .map_err(session_err)?;
        Ok(json!({}))
    }

    fn migrate(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        only(args, &["uri", "resume", "detach"])?;
        if let Some(v) = args.get("resume") {
            if bool_of("resume", v)? {
                return Err(err("Cannot resume if there is no paused migration"));
            }
        }
        if let Some(v) = args.get("detach") {
            bool_of("detach", v)?;
        }
        let uri = str_arg(args, "uri")?;
        self.session.migrate(uri).map_err(session_err)?;
        Ok(json!({}))
    }

    fn migrate_incoming(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        only(args, &["uri", "x-restore-mode"])?;
        let uri = str_arg(args, "uri")?;
        if self.session.run_state() != RunState::InMigrate {
            return Err(err("'-incoming' was not specified on the command line"));
        }
        match args.get("x-restore-mode") {
            None => self.session.incoming(uri).map_err(session_err)?,
            Some(v) => {
                let mode = v
                    .as_str()
                    .and_then(RestoreMode::from_name)
                    .ok_or_else(|| err("x-restore-mode must be \"eager\" or \"lazy\""))?;
                let path = uri.strip_prefix("file:").ok_or_else(|| {
                    err("x-restore-mode applies to snapshot files: the uri must be file:PATH")
                })?;
                self.session
                    .restore(std::path::Path::new(path), mode)
                    .map_err(session_err)?;
            }
        }
        Ok(json!({}))
    }

    fn ram_sample(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        only(args, &["start", "end", "stride"])?;
        let data = verify::sample(
            self.session.machine().ram(),
            u64_arg(args, "start")?,
            u64_arg(args, "end")?,
            u64_arg(args, "stride")?,
        )
        .map_err(QmpError::generic)?;
        Ok(json!({ "data": base64::engine::general_purpose::STANDARD.encode(data) }))
    }
}

/// A histogram of power-of-two microsecond buckets, the empty ones left out:
/// `bucket-us` is a bucket's lower bound.
fn buckets(dist: &[u64]) -> Value {
    Value::Array(
        dist.iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| json!({"bucket-us": 1u64 << i, "count": c}))
            .collect(),
    )
}

/// QEMU's `query-migrate` reply for `info`.
pub fn query_migrate_reply(info: &MigrationInfo) -> Value {
    let mut f = Map::new();
    f.insert("status".into(), json!(info.status.as_str()));
    if info.status == MigrationStatus::None {
        return Value::Object(f);
    }
    if let Some(t) = info.total_time {
        f.insert("total-time".into(), json!(ms(t)));
    }
    if let Some(t) = info.downtime {
        f.insert("downtime".into(), json!(ms(t)));
    }
    if let Some(t) = info.setup_time {
        f.insert("setup-time".into(), json!(ms(t)));
    }
    if let Some(s) = &info.ram {
        f.insert(
            "ram".into(),
            json!({
                "transferred": s.transferred,
                "remaining": s.remaining,
                "total": s.total,
                "duplicate": s.duplicate,
                "normal": s.normal,
                "normal-bytes": s.normal_bytes,
                "mbps": s.mbps,
                "dirty-sync-count": s.dirty_sync_count,
                "postcopy-requests": s.postcopy_requests,
                "dirty-pages-rate": s.dirty_pages_rate,
            }),
        );
    }
    if let Some(u) = &info.socket_address {
        use migration_stream::MigrationUri;
        let addr = match u {
            MigrationUri::Tcp { host, port } => {
                json!({ "type": "inet", "host": host, "port": port.to_string() })
            }
            MigrationUri::Unix { path } => {
                json!({ "type": "unix", "path": path.display().to_string() })
            }
            MigrationUri::File { path } => {
                json!({ "type": "file", "path": path.display().to_string() })
            }
        };
        f.insert("socket-address".into(), json!([addr]));
    }
    if let Some(s) = &info.ram {
        if let Some(Value::Object(ram)) = f.get_mut("ram") {
            ram.insert("precopy-bytes".into(), json!(s.precopy_bytes));
            ram.insert("downtime-bytes".into(), json!(s.downtime_bytes));
            ram.insert("postcopy-bytes".into(), json!(s.postcopy_bytes));
            // Not QEMU's: pages a preempt channel sent a second time.
            ram.insert(
                "x-postcopy-pages-resent".into(),
                json!(s.postcopy_pages_resent),
            );
        }
    }
    if let Some(pc) = &info.postcopy {
        let b = &pc.blocktime;
        f.insert(
            "postcopy-blocktime".into(),
            json!(b.postcopy_blocktime_ms()),
        );
        f.insert(
            "postcopy-vcpu-blocktime".into(),
            json!(b.postcopy_vcpu_blocktime_ms()),
        );
        f.insert("postcopy-latency".into(), json!(b.postcopy_latency_ns()));
        f.insert(
            "x-postcopy-latency-us".into(),
            buckets(b.postcopy_latency_dist()),
        );
        f.insert("x-postcopy-faults".into(), json!(pc.faults));
        f.insert("x-postcopy-requests".into(), json!(pc.requests));
        f.insert("x-postcopy-missing-pages".into(), json!(pc.missing_pages));
    }
    if let Some(sn) = &info.snapshot {
        f.insert(
            "x-snapshot".into(),
            json!({
                "write-faults": sn.faults,
                "fault-pages": sn.fault_pages,
                "late-faults": sn.late_faults,
                "stall-p50-us": sn.stall_p50_us,
                "stall-p99-us": sn.stall_p99_us,
                "stall-max-us": sn.stall_max_us,
                "stall-us": buckets(&sn.stall_histogram),
            }),
        );
    }
    if let Some(mode) = info.restore_mode {
        f.insert("x-restore-mode".into(), json!(mode.as_str()));
    }
    if info.rejected_connections > 0 {
        f.insert(
            "x-rejected-connections".into(),
            json!(info.rejected_connections),
        );
    }
    if let Some(e) = &info.error {
        f.insert("error-desc".into(), json!(e.describe()));
        f.insert("x-error-kind".into(), json!(e.kind().as_str()));
    }
    Value::Object(f)
}

impl Handler for QmpAdapter {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let s = &self.session;
        let none = |()| json!({});
        match command {
            "query-status" => {
                only(args, &[])?;
                let rs = s.run_state();
                let mut reply = json!({
                    "status": rs.as_str(),
                    "running": rs == RunState::Running,
                    "singlestep": false,
                });
                if let Some(us) = s
                    .first_run()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .and_then(|d| u64::try_from(d.as_micros()).ok())
                {
                    reply["x-first-run-unix-us"] = json!(us);
                }
                Ok(reply)
            }
            "stop" => only(args, &[]).and_then(|()| s.stop().map(none).map_err(session_err)),
            "cont" => only(args, &[]).and_then(|()| s.cont().map(none).map_err(session_err)),
            "quit" => only(args, &[]).map(none),
            "migrate-set-capabilities" => self.set_capabilities(args),
            "query-migrate-capabilities" => {
                only(args, &[])?;
                let caps = s.capabilities();
                Ok(Value::Array(
                    Capability::ALL
                        .iter()
                        .map(|c| json!({ "capability": c.name(), "state": caps.get(*c) }))
                        .collect(),
                ))
            }
            "migrate-set-parameters" => self.set_parameters(args),
            "query-migrate-parameters" => {
                only(args, &[])?;
                let p = s.parameters();
                Ok(json!({
                    "max-bandwidth": p.max_bandwidth,
                    "downtime-limit": ms(p.downtime_limit),
                    "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
                    "x-link-timeout": ms(p.link_timeout),
                }))
            }
            "query-migrate" => only(args, &[]).map(|()| query_migrate_reply(&s.info())),
            "migrate" => self.migrate(args),
            "migrate-incoming" => self.migrate_incoming(args),
            "migrate_cancel" => {
                only(args, &[])?;
                s.cancel();
                Ok(json!({}))
            }
            "migrate-start-postcopy" => {
                only(args, &[])?;
                s.start_postcopy().map(none).map_err(session_err)
            }
            "migrate-pause" => Err(err(
                "migrate-pause is currently only supported during postcopy-active or postcopy-recover state",
            )),
            "migrate-recover" => Err(err(
                "Migrate recover can only be run when postcopy is paused.",
            )),
            "x-ram-digest" => {
                only(args, &[])?;
                let blocks: Vec<Value> = verify::digest(s.machine().ram())
                    .into_iter()
                    .map(|d| json!({ "name": d.name, "size": d.size, "digest": d.sha256 }))
                    .collect();
                Ok(json!({ "algorithm": verify::DIGEST_ALGORITHM, "blocks": blocks }))
            }
            "x-ram-sample" => self.ram_sample(args),
            "x-write-protected-pages" => {
                only(args, &[])?;
                let n = verify::write_protected_pages(s.machine().ram())
                    .map_err(|e| QmpError::generic(crate::error_chain(&e)))?;
                Ok(json!({ "pages": n }))
            }
            "x-populate-write" => {
                only(args, &[])?;
                verify::populate_write(s.machine().ram())
                    .map_err(|e| QmpError::generic(crate::error_chain(&e)))?;
                Ok(json!({}))
            }
            other => match self.extension.as_ref().and_then(|x| x.execute(other, args)) {
                Some(r) => r,
                None => Err(QmpError::not_found(other)),
            },
        }
    }

    fn after_reply(&self, command: &str) {
        if command == "quit" {
            (self.quit)();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use migration_ram::VmmDirtyLog;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::guest::Workload;
    use crate::io::NoDevices;
    use crate::session::{GuestRam, Machine, RamRegion};
    use crate::soft::SoftVcpus;
    use crate::GuestMemoryMmap;

    struct Info;
    impl QmpExtension for Info {
        fn execute(
            &self,
            command: &str,
            _: &Map<String, Value>,
        ) -> Option<Result<Value, QmpError>> {
            (command == "x-info").then(|| Ok(json!({"vmm": "test"})))
        }
    }

    fn adapter(quit: Arc<AtomicBool>) -> QmpAdapter {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap());
        let ram = GuestRam::new(Arc::clone(&mem), vec![RamRegion::new("ram")]).unwrap();
        let vcpus = SoftVcpus::new(
            Arc::clone(&mem),
            Arc::new(NoDevices),
            Workload::Ab,
            1,
            1 << 20,
            2 << 20,
        )
        .unwrap();
        let machine = Machine::new(ram, Arc::new(VmmDirtyLog::new(mem)), Arc::new(vcpus));
        QmpAdapter::new(
            Arc::new(Session::new(machine)),
            Box::new(move || quit.store(true, Ordering::Relaxed)),
        )
        .with_extension(Arc::new(Info))
    }

    fn call(a: &QmpAdapter, cmd: &str, args: Value) -> Result<Value, String> {
        let args = args.as_object().cloned().unwrap_or_default();
        a.execute(cmd, &args).map_err(|e| e.desc)
    }

    #[test]
    fn arguments_are_checked_with_qemus_words() {
        let a = adapter(Arc::default());
        assert_eq!(
            call(&a, "migrate", json!({"uri": 5})).unwrap_err(),
            "Invalid parameter type for 'uri', expected: string"
        );
        assert_eq!(
            call(&a, "migrate", json!({})).unwrap_err(),
            "Parameter 'uri' is missing"
        );
        assert_eq!(
            call(
                &a,
                "migrate",
                json!({"uri": "tcp:127.0.0.1:1", "blk": true})
            )
            .unwrap_err(),
            "Parameter 'blk' is unexpected"
        );
        assert_eq!(
            call(
                &a,
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "xbzrle", "state": true}]})
            )
            .unwrap_err(),
            "Parameter 'capability' does not accept value 'xbzrle'"
        );
        assert_eq!(
            call(
                &a,
                "migrate-set-parameters",
                json!({"max-bandwidth": "fast"})
            )
            .unwrap_err(),
            "Invalid parameter type for 'max-bandwidth', expected: integer"
        );
        assert!(
            call(&a, "migrate-set-parameters", json!({"x-link-timeout": 10}))
                .unwrap_err()
                .contains("x-link-timeout")
        );
        assert_eq!(
            call(&a, "migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"})).unwrap_err(),
            "'-incoming' was not specified on the command line"
        );
        assert!(call(&a, "migrate", json!({"uri": "ftp:x"}))
            .unwrap_err()
            .contains("ftp"));
        let e = a.execute("no-such-command", &Map::new()).unwrap_err();
        assert_eq!(e, QmpError::not_found("no-such-command"));
    }

    #[test]
    fn commands_map_to_the_session() {
        let quit = Arc::new(AtomicBool::new(false));
        let a = adapter(Arc::clone(&quit));
        assert_eq!(
            call(&a, "query-status", json!({})).unwrap()["status"],
            "paused"
        );
        call(&a, "cont", json!({})).unwrap();
        assert_eq!(
            call(&a, "query-status", json!({})).unwrap()["running"],
            true
        );
        call(&a, "stop", json!({})).unwrap();
        assert_eq!(
            call(&a, "query-status", json!({})).unwrap()["status"],
            "paused"
        );
        call(
            &a,
            "migrate-set-parameters",
            json!({"max-bandwidth": 1000, "downtime-limit": 50, "x-link-timeout": 5000}),
        )
        .unwrap();
        let p = call(&a, "query-migrate-parameters", json!({})).unwrap();
        assert_eq!(p["max-bandwidth"], 1000);
        assert_eq!(p["downtime-limit"], 50);
        assert_eq!(p["x-link-timeout"], 5000);
        call(
            &a,
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-blocktime", "state": true}]}),
        )
        .unwrap();
        let caps = call(&a, "query-migrate-capabilities", json!({})).unwrap();
        assert!(caps
            .as_array()
            .unwrap()
            .contains(&json!({"capability": "postcopy-blocktime", "state": true})));
        assert_eq!(
            call(&a, "query-migrate", json!({})).unwrap(),
            json!({"status": "none"})
        );
        let d = call(&a, "x-ram-digest", json!({})).unwrap();
        assert_eq!(d["algorithm"], "sha256");
        assert_eq!(d["blocks"][0]["name"], "ram");
        assert_eq!(
            call(&a, "x-info", json!({})).unwrap(),
            json!({"vmm": "test"})
        );
        call(&a, "quit", json!({})).unwrap();
        assert!(!quit.load(Ordering::Relaxed), "quit waits for its reply");
        a.after_reply("quit");
        assert!(quit.load(Ordering::Relaxed));
    }
}
