//! The session API driven as a VMM drives it, source and destination in one
//! process: guests on soft vCPUs, two device sections of the test's own, and
//! connections over socket pairs and loopback TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_ram::VmmDirtyLog;
use migration_stream::{memory_pair, ErrorKind, Hello, MigrationId, Role, StreamWriter};
use vm_memory::GuestAddress;
use vmm_glue::guest::{ab_check, Workload};
use vmm_glue::io::NoDevices;
use vmm_glue::session::{
    Capability, DeviceState, Event, GuestRam, Machine, MigrationInfo, MigrationStatus, RamRegion,
    RestoreMode, RunState, Session, SessionError, StateError, UsageError, Vcpus,
};
use vmm_glue::soft::SoftVcpus;
use vmm_glue::{verify, GuestMemoryMmap};

const HIGH: u64 = 0x10_0000;
/// A hang guard for waits, not a performance limit.
const GUARD: Duration = Duration::from_secs(300);

/// A device of the test's own: a value that must arrive intact.
struct Register {
    name: &'static str,
    value: AtomicU64,
}

impl DeviceState for Register {
    fn name(&self) -> &str {
        self.name
    }
    fn version(&self) -> u32 {
        3
    }
    fn save(&self) -> Result<Vec<u8>, StateError> {
        Ok(self.value.load(Ordering::Relaxed).to_le_bytes().to_vec())
    }
    fn load(&self, version: u32, data: &[u8]) -> Result<(), StateError> {
        let bytes: [u8; 8] = data
            .try_into()
            .map_err(|_| StateError::malformed(self.name, format!("{} bytes", data.len())))?;
        if version != 3 {
            return Err(StateError::malformed(
                self.name,
                format!("version {version}"),
            ));
        }
        self.value
            .store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        Ok(())
    }
}

struct Vm {
    session: Arc<Session>,
    vcpus: Arc<SoftVcpus>,
    devices: [Arc<Register>; 2],
    mem: u64,
}

fn vm(mem_mib: u64, workload: Workload, values: [u64; 2]) -> Vm {
    let mem = mem_mib << 20;
    let guest = Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0xa_0000),
            (GuestAddress(HIGH), (mem - HIGH) as usize),
        ])
        .unwrap(),
    );
    let ram = GuestRam::new(
        Arc::clone(&guest),
        vec![RamRegion::new("pc.ram.low"), RamRegion::new("pc.ram")],
    )
    .unwrap();
    let vcpus = Arc::new(
        SoftVcpus::new(
            Arc::clone(&guest),
            Arc::new(NoDevices),
            workload,
            2,
            HIGH,
            mem,
        )
        .unwrap(),
    );
    let devices = [
        Arc::new(Register {
            name: "timer",
            value: AtomicU64::new(values[0]),
        }),
        Arc::new(Register {
            name: "nvram",
            value: AtomicU64::new(values[1]),
        }),
    ];
    let machine = Machine::new(
        ram,
        Arc::new(VmmDirtyLog::new(Arc::clone(&guest))),
        Arc::clone(&vcpus) as _,
    )
    .with_device(Arc::clone(&devices[0]) as _)
    .unwrap()
    .with_device(Arc::clone(&devices[1]) as _)
    .unwrap();
    Vm {
        session: Arc::new(Session::new(machine)),
        vcpus,
        devices,
        mem,
    }
}

impl Vm {
    fn first_bytes(&self) -> Vec<u8> {
        verify::sample(self.session.machine().ram(), HIGH, self.mem, 4096).unwrap()
    }

    fn wait_progress(&self) {
        let before: u64 = self.vcpus.passes().iter().sum();
        let t = Instant::now();
        while self.vcpus.passes().iter().sum::<u64>() < before + 2 {
            assert!(t.elapsed() < GUARD, "the guest makes no progress");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_final(&self) -> MigrationInfo {
        let info = self.session.wait(GUARD);
        assert!(info.status.is_final(), "no final state: {info:?}");
        info
    }

    fn fast(&self) {
        self.session
            .update_parameters(|p| {
                p.max_bandwidth = 0;
                p.downtime_limit = Duration::from_secs(5);
            })
            .unwrap();
    }

    fn digest(&self) -> Vec<verify::RegionDigest> {
        verify::digest(self.session.machine().ram())
    }
}

fn error_of(info: &MigrationInfo) -> &SessionError {
    info.error.as_deref().expect("a failed migration says why")
}

#[test]
fn a_running_guest_migrates_with_its_devices() {
    let src = vm(32, Workload::Ab, [7, 0xfeed]);
    let events = src.session.subscribe(64);
    src.session.start().unwrap();
    src.wait_progress();
    let dst = vm(32, Workload::Ab, [0, 0]);
    dst.session.defer_incoming().unwrap();
    // Stays paused once loaded, so both sides can be compared exactly.
    dst.session.stop().unwrap();
    let (a, b) = memory_pair();
    dst.session.incoming_from(b).unwrap();
    src.fast();
    src.session.migrate_to(a).unwrap();
    let s = src.wait_final();
    assert_eq!(s.status, MigrationStatus::Completed, "{s:?}");
    let d = dst.wait_final();
    assert_eq!(d.status, MigrationStatus::Completed, "{d:?}");
    assert_eq!(src.session.run_state(), RunState::PostMigrate);
    assert_eq!(dst.session.run_state(), RunState::Paused);
    assert!(s.downtime.is_some() && s.total_time.is_some());
    let ram = s.ram.expect("RAM statistics");
    assert!(ram.transferred > 0 && ram.remaining == 0, "{ram:?}");
    assert_eq!(src.digest(), dst.digest(), "RAM equal on both sides");
    for (a, b) in src.devices.iter().zip(&dst.devices) {
        assert_eq!(
            a.value.load(Ordering::Relaxed),
            b.value.load(Ordering::Relaxed),
            "device {} arrived",
            a.name
        );
    }
    assert_eq!(dst.devices[1].value.load(Ordering::Relaxed), 0xfeed);
    let seen: Vec<Event> = events.try_iter().collect();
    assert_eq!(
        seen,
        [
            Event::Resume,
            Event::Migration(MigrationStatus::Setup),
            Event::Migration(MigrationStatus::Active),
            Event::Stop,
            Event::Migration(MigrationStatus::Completed),
        ]
    );
    // The guest goes on at the destination.
    dst.session.cont().unwrap();
    dst.wait_progress();
    dst.session.stop().unwrap();
    ab_check(&dst.first_bytes(), 2).unwrap();
}

#[test]
fn losing_the_destination_is_a_link_error_and_the_source_runs_on() {
    let src = vm(64, Workload::Ab, [1, 2]);
    src.session.start().unwrap();
    // Slow enough that the migration is still running when the peer goes.
    src.session
        .update_parameters(|p| p.max_bandwidth = 4 << 20)
        .unwrap();
    let dst = vm(64, Workload::Ab, [0, 0]);
    let (a, b) = memory_pair();
    dst.session.incoming_from(b).unwrap();
    src.session.migrate_to(a).unwrap();
    let t = Instant::now();
    while src
        .session
        .info()
        .ram
        .is_none_or(|r| r.transferred < 1 << 20)
    {
        assert!(t.elapsed() < GUARD);
        std::thread::sleep(Duration::from_millis(5));
    }
    // The destination VMM goes away: its session ends, its connection closes.
    drop(dst);
    let s = src.wait_final();
    assert_eq!(s.status, MigrationStatus::Failed);
    assert_eq!(error_of(&s).kind(), ErrorKind::Link, "{}", error_of(&s));
    assert_eq!(src.session.run_state(), RunState::Running);
    src.wait_progress();
    src.session.stop().unwrap();
    ab_check(&src.first_bytes(), 2).unwrap();
}

#[test]
fn garbage_is_a_protocol_error_and_memory_stays_untouched() {
    let dst = vm(32, Workload::Ab, [0, 0]);
    dst.session.defer_incoming().unwrap();
    let before = dst.digest();
    let (mut a, b) = memory_pair();
    dst.session.incoming_from(b).unwrap();
    let mut w = StreamWriter::new(&mut a.writer);
    w.write_preamble(&Hello::new(Role::Main, MigrationId::generate()))
        .unwrap();
    w.flush().unwrap();
    drop(w);
    a.writer.write_all(&[0x5a; 4096]).unwrap();
    let d = dst.wait_final();
    assert_eq!(d.status, MigrationStatus::Failed);
    assert_eq!(error_of(&d).kind(), ErrorKind::Protocol, "{}", error_of(&d));
    assert!(
        error_of(&d).describe().starts_with("protocol error: "),
        "{}",
        error_of(&d).describe()
    );
    assert_eq!(dst.session.run_state(), RunState::InMigrate);
    assert!(!dst.vcpus.running());
    assert_eq!(dst.digest(), before, "guest memory untouched");
    drop(a);

    // The same destination then takes a real migration.
    let src = vm(32, Workload::Ab, [5, 6]);
    src.session.start().unwrap();
    src.wait_progress();
    src.session.stop().unwrap();
    let (a, b) = memory_pair();
    dst.session.incoming_from(b).unwrap();
    src.session.migrate_to(a).unwrap();
    assert_eq!(src.wait_final().status, MigrationStatus::Completed);
    assert_eq!(dst.wait_final().status, MigrationStatus::Completed);
    assert_eq!(src.digest(), dst.digest());
    assert_eq!(
        dst.session.run_state(),
        RunState::Paused,
        "it was stopped on the source"
    );
}

#[test]
fn a_silent_destination_is_a_link_error_within_the_link_timeout() {
    let src = vm(32, Workload::Ab, [0, 0]);
    src.session.start().unwrap();
    src.session
        .update_parameters(|p| p.link_timeout = Duration::from_secs(2))
        .unwrap();
    // Accepts and then neither reads nor writes, like a stopped process.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    src.session
        .migrate(&format!("tcp:127.0.0.1:{port}"))
        .unwrap();
    let (_held, _) = l.accept().unwrap();
    let s = src.wait_final();
    assert_eq!(s.status, MigrationStatus::Failed);
    let e = error_of(&s);
    assert_eq!(e.kind(), ErrorKind::Link, "{}", e.describe());
    // The keepalive or the socket's write timeout, whichever fires first,
    // names the 2 s.
    assert!(e.describe().contains(" 2.0"), "{}", e.describe());
    assert_eq!(src.session.run_state(), RunState::Running);
    src.wait_progress();
}

#[test]
fn capabilities_and_parameters_are_checked() {
    let v = vm(8, Workload::Idle, [0, 0]);
    let s = &v.session;
    let usage = |r: Result<(), SessionError>| match r {
        Err(SessionError::Usage(u)) => u,
        other => panic!("expected a usage error, got {other:?}"),
    };
    assert_eq!(
        usage(s.set_capabilities(&[(Capability::PostcopyPreempt, true)])),
        UsageError::CapabilityRequires(Capability::PostcopyPreempt, Capability::PostcopyRam)
    );
    assert_eq!(
        usage(s.set_capabilities(&[
            (Capability::PostcopyRam, true),
            (Capability::BackgroundSnapshot, true)
        ])),
        UsageError::IncompatibleCapabilities(
            Capability::BackgroundSnapshot,
            Capability::PostcopyRam
        )
    );
    assert!(
        !s.capabilities().get(Capability::PostcopyRam),
        "all or nothing"
    );
    // Preempt opens a second connection: refused over a connection the VMM
    // hands in, at once, saying why.
    s.set_capabilities(&[
        (Capability::PostcopyRam, true),
        (Capability::PostcopyPreempt, true),
    ])
    .unwrap();
    assert_eq!(
        usage(s.migrate_to(migration_stream::memory_pair().0)),
        UsageError::PreemptNeedsUri
    );
    assert!(
        !s.info().status.in_progress(),
        "nothing started: {:?}",
        s.info().status
    );
    s.set_capabilities(&[
        (Capability::PostcopyRam, false),
        (Capability::PostcopyPreempt, false),
    ])
    .unwrap();
    let before = s.parameters();
    assert!(s
        .update_parameters(|p| p.downtime_limit = Duration::from_secs(3000))
        .is_err());
    assert!(s
        .update_parameters(|p| p.link_timeout = Duration::from_millis(10))
        .is_err());
    assert_eq!(s.parameters(), before, "a refused update changes nothing");
    assert!(matches!(
        s.migrate("bogus:thing"),
        Err(SessionError::Usage(UsageError::Uri(_)))
    ));
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn thirty_migrations_leak_no_fd_and_no_thread() {
    let src = vm(16, Workload::Ab, [1, 2]);
    src.session.start().unwrap();
    src.wait_progress();
    src.session.stop().unwrap();
    let migrate_once = || {
        let dst = vm(16, Workload::Ab, [0, 0]);
        dst.session.incoming("tcp:127.0.0.1:0").unwrap();
        let addr = dst.session.info().socket_address.expect("listening");
        src.session.migrate(&addr.to_string()).unwrap();
        assert_eq!(src.wait_final().status, MigrationStatus::Completed);
        assert_eq!(dst.wait_final().status, MigrationStatus::Completed);
    };
    migrate_once();
    let (fds, tasks) = (count("/proc/self/fd"), count("/proc/self/task"));
    for _ in 0..30 {
        migrate_once();
    }
    // Other tests of this binary run meanwhile; wait for the counts to settle
    // back (a leak never does).
    let t = Instant::now();
    loop {
        let (f, k) = (count("/proc/self/fd"), count("/proc/self/task"));
        if f <= fds && k <= tasks {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "after 30 migrations: {f} fds (was {fds}), {k} threads (was {tasks})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_state_changes_are_atomic_under_concurrent_callers() {
    let v = vm(16, Workload::Ab, [0, 0]);
    v.session.start().unwrap();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let s = Arc::clone(&v.session);
            std::thread::spawn(move || {
                for k in 0..50 {
                    match (i + k) % 3 {
                        0 => drop(s.stop()),
                        1 => drop(s.cont()),
                        _ => s.cancel(),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Whatever the interleaving, run state and vCPUs agree, and the last
    // command decides.
    let rs = v.session.run_state();
    assert_eq!(rs == RunState::Running, v.vcpus.running(), "{rs}");
    v.session.stop().unwrap();
    assert!(!v.vcpus.running());
    v.session.cont().unwrap();
    assert!(v.vcpus.running());
}

#[test]
fn first_run_is_when_the_guest_first_ran_and_stays_so() {
    let v = vm(16, Workload::Ab, [0, 0]);
    assert_eq!(v.session.first_run(), None, "not run yet");
    let before = std::time::SystemTime::now();
    v.session.start().unwrap();
    let first = v.session.first_run().expect("the guest ran");
    assert!(first >= before, "{first:?} before the start {before:?}");
    v.session.stop().unwrap();
    v.session.cont().unwrap();
    assert_eq!(v.session.first_run(), Some(first), "a later cont keeps it");
}

/// Whether userfaultfd works here; prints SKIPPED (or fails with
/// REQUIRE_UFFD=1) when not.
fn have_uffd(test: &str) -> bool {
    match uffd_sys::Uffd::new() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("REQUIRE_UFFD").as_deref() == Ok("1") {
                panic!("{test}: userfaultfd required (REQUIRE_UFFD=1): {e}");
            }
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED {test}: userfaultfd unusable here: {e} ***\n"
            );
            false
        }
    }
}

/// A background snapshot of `src` (running) to `path`, with the RAM digest
/// taken at its instant. Returns that digest and the source's info.
fn snapshot_to(src: &Vm, path: &std::path::Path) -> (Vec<verify::RegionDigest>, MigrationInfo) {
    let at_instant: Arc<parking_lot::Mutex<Option<Vec<verify::RegionDigest>>>> = Arc::default();
    let slot = Arc::clone(&at_instant);
    src.session.on_snapshot_instant(Box::new(move |m| {
        *slot.lock() = Some(verify::digest(m.ram()))
    }));
    src.session
        .set_capabilities(&[(Capability::BackgroundSnapshot, true)])
        .unwrap();
    // Slow enough that the guest writes to many pages not saved yet.
    src.session
        .update_parameters(|p| p.max_bandwidth = 32 << 20)
        .unwrap();
    let uri = format!("file:{}", path.display());
    src.session.migrate(&uri).unwrap();
    let s = src.wait_final();
    let digest = at_instant
        .lock()
        .take()
        .expect("the hook ran at the instant");
    (digest, s)
}

#[test]
fn a_background_snapshot_is_one_instant_and_restores_eagerly_and_lazily() {
    let test = "a_background_snapshot_is_one_instant_and_restores_eagerly_and_lazily";
    if !have_uffd(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.snap");
    let src = vm(32, Workload::Ab, [11, 0xbeef]);
    src.session.start().unwrap();
    src.wait_progress();
    let (at_instant, s) = snapshot_to(&src, &path);
    assert_eq!(s.status, MigrationStatus::Completed, "{s:?}");
    // A snapshot leaves the guest running here, with nothing protected.
    assert_eq!(src.session.run_state(), RunState::Running);
    src.wait_progress();
    assert_eq!(
        verify::write_protected_pages(src.session.machine().ram()).unwrap(),
        0
    );
    let faults = s.snapshot.expect("write-fault figures");
    assert!(
        faults.fault_pages > 0,
        "the guest wrote during the save: {faults:?}"
    );
    assert!(s.downtime.is_some());
    // The file holds RAM as it was at the instant.
    let reader = migration_stream::SnapshotReader::open(&path).unwrap();
    assert_eq!(verify::snapshot_digest(&reader).unwrap(), at_instant);

    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let dst = vm(32, Workload::Ab, [0, 0]);
        dst.session.defer_incoming().unwrap();
        if mode == RestoreMode::Eager {
            // Paused once loaded, to compare it exactly.
            dst.session.stop().unwrap();
        }
        dst.session.restore(&path, mode).unwrap();
        let d = dst.wait_final();
        assert_eq!(d.status, MigrationStatus::Completed, "{mode}: {d:?}");
        assert_eq!(d.restore_mode, Some(mode));
        for (a, b) in src.devices.iter().zip(&dst.devices) {
            assert_eq!(
                a.value.load(Ordering::Relaxed),
                b.value.load(Ordering::Relaxed),
                "{mode}: device {} restored",
                a.name
            );
        }
        match mode {
            RestoreMode::Eager => {
                assert_eq!(dst.digest(), at_instant, "eager: RAM is the snapshot's");
                ab_check(&dst.first_bytes(), 2).unwrap();
                dst.session.cont().unwrap();
            }
            _ => {
                // The guest ran at once, on pages read as it touched them.
                let pc = d.postcopy.expect("fault figures of a lazy restore");
                assert!(pc.faults > 0 && pc.requests > 0, "lazy: {pc:?}");
                assert_eq!(pc.missing_pages, 0);
                assert_eq!(dst.session.run_state(), RunState::Running);
            }
        }
        dst.wait_progress();
        dst.session.stop().unwrap();
        ab_check(&dst.first_bytes(), 2).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_background_snapshot_over_a_socket_loads_as_a_migration() {
    let test = "a_background_snapshot_over_a_socket_loads_as_a_migration";
    if !have_uffd(test) {
        return;
    }
    let src = vm(32, Workload::Ab, [5, 6]);
    src.session.start().unwrap();
    src.wait_progress();
    let dst = vm(32, Workload::Ab, [0, 0]);
    dst.session.defer_incoming().unwrap();
    dst.session.stop().unwrap();
    let (a, b) = memory_pair();
    dst.session.incoming_from(b).unwrap();
    let at_instant: Arc<parking_lot::Mutex<Option<Vec<verify::RegionDigest>>>> = Arc::default();
    let slot = Arc::clone(&at_instant);
    src.session.on_snapshot_instant(Box::new(move |m| {
        *slot.lock() = Some(verify::digest(m.ram()))
    }));
    src.session
        .set_capabilities(&[(Capability::BackgroundSnapshot, true)])
        .unwrap();
    src.session.migrate_to(a).unwrap();
    let s = src.wait_final();
    assert_eq!(s.status, MigrationStatus::Completed, "{s:?}");
    let d = dst.wait_final();
    assert_eq!(d.status, MigrationStatus::Completed, "{d:?}");
    assert_eq!(src.session.run_state(), RunState::Running);
    assert_eq!(Some(dst.digest()), at_instant.lock().take());
}

#[test]
fn a_cancelled_snapshot_and_a_bad_snapshot_file_leave_both_sides_intact() {
    let test = "a_cancelled_snapshot_and_a_bad_snapshot_file_leave_both_sides_intact";
    if !have_uffd(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("snap-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.snap");
    let src = vm(64, Workload::Ab, [1, 2]);
    src.session.start().unwrap();
    src.session
        .set_capabilities(&[(Capability::BackgroundSnapshot, true)])
        .unwrap();
    src.session
        .update_parameters(|p| p.max_bandwidth = 2 << 20)
        .unwrap();
    src.session
        .migrate(&format!("file:{}", path.display()))
        .unwrap();
    let t = Instant::now();
    while src.session.info().status != MigrationStatus::Active {
        assert!(t.elapsed() < GUARD);
        std::thread::sleep(Duration::from_millis(2));
    }
    src.session.cancel();
    let s = src.wait_final();
    assert_eq!(s.status, MigrationStatus::Cancelled, "{s:?}");
    assert_eq!(src.session.run_state(), RunState::Running);
    assert_eq!(
        verify::write_protected_pages(src.session.machine().ram()).unwrap(),
        0
    );
    verify::populate_write(src.session.machine().ram()).unwrap();
    src.wait_progress();
    assert!(!path.exists(), "the unfinished file is removed");

    // A finished snapshot, then damaged: a clear error, and the destination
    // may try again.
    src.session
        .update_parameters(|p| p.max_bandwidth = 0)
        .unwrap();
    src.session
        .migrate(&format!("file:{}", path.display()))
        .unwrap();
    assert_eq!(src.wait_final().status, MigrationStatus::Completed);
    let good = std::fs::read(&path).unwrap();
    let bad = dir.join("bad.snap");
    let dst = vm(64, Workload::Ab, [0, 0]);
    dst.session.defer_incoming().unwrap();
    for (what, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("corrupt", {
            let mut b = good.clone();
            b[4096 + 5] ^= 0x40;
            b
        }),
    ] {
        std::fs::write(&bad, &bytes).unwrap();
        dst.session.restore(&bad, RestoreMode::Eager).unwrap();
        let d = dst.wait_final();
        assert_eq!(d.status, MigrationStatus::Failed, "{what}: {d:?}");
        let e = error_of(&d);
        assert_eq!(e.kind(), ErrorKind::Protocol, "{what}: {}", e.describe());
        assert!(
            e.describe().contains(what) || e.describe().contains("checksum"),
            "{what}: {}",
            e.describe()
        );
        assert_eq!(dst.session.run_state(), RunState::InMigrate);
    }
    // Not a snapshot at all: refused at the call.
    assert!(matches!(
        dst.session
            .restore(std::path::Path::new("/dev/null"), RestoreMode::Lazy),
        Err(SessionError::Usage(UsageError::NotASnapshot(_)))
    ));
    // No file: refused at the call, saying why.
    let missing = dir.join("missing.snap");
    match dst.session.restore(&missing, RestoreMode::Eager) {
        Err(SessionError::Usage(e @ UsageError::SnapshotUnreadable(..))) => {
            assert!(e.to_string().contains("No such file"), "{e}")
        }
        other => panic!("a missing file: {other:?}"),
    }
    dst.session.restore(&path, RestoreMode::Lazy).unwrap();
    assert_eq!(dst.wait_final().status, MigrationStatus::Completed);
    std::fs::remove_dir_all(&dir).unwrap();
}
