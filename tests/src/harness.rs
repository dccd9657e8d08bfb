//! Runs `demovm` processes and talks QMP to them, as an operator's tooling would.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// How long any single wait may take before the scenario is declared hung. A hang
/// guard, not a performance limit.
pub const HANG_GUARD: Duration = Duration::from_secs(300);

/// Start of the memory the built-in workloads use.
pub const WORKLOAD_START: u64 = 0x10_0000;

/// The `demovm` binary: `DEMOVM_BIN`, or the one beside the running executable, which
/// cargo brings up to date (same profile) once per process. A binary left over from an
/// older build is never used as it is: it would test old code under the new name.
pub fn demovm_path() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Ok(p) = std::env::var("DEMOVM_BIN") {
        return Ok(PathBuf::from(p));
    }
    BUILT.get_or_init(build_demovm).clone()
}

fn build_demovm() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no executable directory")?;
    // Test executables live in `deps/`, `xtask` beside the binaries.
    let candidates = [dir.join("demovm"), dir.join("../demovm")];
    let release = exe.components().any(|c| c.as_os_str() == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "vmm-glue", "--bin", "demovm"]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd
        .status()
        .map_err(|e| format!("cannot run cargo to build demovm: {e}"))?;
    if !st.success() {
        return Err("building demovm failed".into());
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| "demovm not found after building it".into())
}

/// A QMP client over a Unix socket.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Events received so far, in order.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying while the socket appears), reads the greeting and negotiates.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        Qmp::connect_while(path, || true)
    }

    /// As [`Qmp::connect`], but gives up as soon as `alive` says the process
    /// that should open the socket is gone.
    pub fn connect_while(path: &Path, mut alive: impl FnMut() -> bool) -> Result<Qmp, String> {
        let start = Instant::now();
        let w = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > HANG_GUARD => {
                    return Err(format!("QMP socket {} never came up: {e}", path.display()))
                }
                Err(e) if !alive() => {
                    return Err(format!(
                        "the process exited before its QMP socket {} came up: {e}",
                        path.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        w.set_read_timeout(Some(HANG_GUARD))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            r: BufReader::new(w.try_clone().map_err(|e| e.to_string())?),
            w,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP reply is not JSON ({e}): {line}"))
    }

    /// Runs a command; `Ok(return value)`, or `Err((class, desc))` for a QMP error.
    pub fn execute(
        &mut self,
        name: &str,
        args: Value,
    ) -> Result<Result<Value, (String, String)>, String> {
        let req = json!({"execute": name, "arguments": args});
        self.w
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = v.get("error") {
                let s = |k| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Ok(Err((s("class"), s("desc"))));
            }
            return Err(format!("unexpected QMP reply {v}"));
        }
    }

    /// Runs a command that must succeed.
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        self.execute(name, args)?
            .map_err(|(c, d)| format!("{name} failed: {c}: {d}"))
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A `demovm` process with its QMP client; killed on drop.
pub struct DemoVm {
    /// A name for messages.
    pub name: String,
    child: Child,
    /// The QMP client.
    pub qmp: Qmp,
    /// The VM's scratch directory.
    pub dir: PathBuf,
    /// Where its COM1 output goes.
    pub serial: PathBuf,
    /// Top of guest memory.
    pub mem: u64,
}

/// How to start a `demovm`.
pub struct VmOpts<'a> {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// `builtin:ab`, `builtin:random`, ...; empty: no `--guest` (a Linux
    /// guest's `--kernel` is in `extra`).
    pub guest: &'a str,
    /// `--incoming` value, if any.
    pub incoming: Option<&'a str>,
    /// `--accel` value; `None` is [`default_accel`].
    pub accel: Option<&'a str>,
    /// More arguments (`--dirty-ring 4096`).
    pub extra: &'a [&'a str],
}

/// Whether `/dev/kvm` is PVM (module `kvm_pvm`: KVM on shadow paging inside
/// a VM without nested virtualization), which runs most guests but
/// mishandles a full dirty ring.
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The accelerator scenarios ask for: `E2E_ACCEL` if set; `kvm` under
/// `REQUIRE_KVM=1`, so a missing KVM fails loudly instead of running soft
/// vCPUs; `auto` otherwise (KVM where `/dev/kvm` works).
pub fn default_accel() -> String {
    if let Ok(a) = std::env::var("E2E_ACCEL") {
        return a;
    }
    if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
        return "kvm".into();
    }
    "auto".into()
}

impl DemoVm {
    /// Starts a VM and connects to its QMP socket.
    pub fn start(name: &str, o: &VmOpts<'_>) -> Result<DemoVm, String> {
        let dir = std::env::temp_dir().join(format!(
            "e2e-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let qmp_path = dir.join("qmp.sock");
        let serial = dir.join("serial.out");
        let mut cmd = Command::new(demovm_path()?);
        cmd.arg("--mem")
            .arg(format!("{}M", o.mem_mib))
            .arg("--vcpus")
            .arg(o.vcpus.to_string())
            .arg("--qmp")
            .arg(&qmp_path)
            .arg("--serial")
            .arg(&serial)
            .env(
                "DEMOVM_LOG",
                std::env::var("DEMOVM_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?,
            ));
        if !o.guest.is_empty() {
            cmd.arg("--guest").arg(o.guest);
        }
        if let Some(i) = o.incoming {
            cmd.arg("--incoming").arg(i);
        }
        cmd.arg("--accel")
            .arg(o.accel.map_or_else(default_accel, str::to_owned))
            .args(o.extra);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start demovm: {e}"))?;
        let qmp = match Qmp::connect_while(&qmp_path, || matches!(child.try_wait(), Ok(None))) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                return Err(format!("{name}: {e}; its stderr: {log}"));
            }
        };
        Ok(DemoVm {
            name: name.into(),
            child,
            qmp,
            dir,
            serial,
            mem: o.mem_mib << 20,
        })
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value, String> {
        self.qmp.cmd("query-migrate", json!({}))
    }

    /// The migration status word.
    pub fn migration_status(&mut self) -> Result<String, String> {
        Ok(self
            .query_migrate()?
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned())
    }

    /// Polls `query-migrate` until `done` accepts it; returns that reply.
    pub fn wait_migration(
        &mut self,
        what: &str,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Result<Value, String> {
        let start = Instant::now();
        loop {
            let q = self.query_migrate()?;
            if done(&q) {
                return Ok(q);
            }
            if start.elapsed() > HANG_GUARD {
                return Err(format!(
                    "{}: waited too long for {what}; last query-migrate: {q}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for one of the final states (or postcopy-paused, where a
    /// migration stays until recovery) and returns the reply.
    pub fn wait_finished(&mut self) -> Result<Value, String> {
        self.wait_migration("the migration to finish", |q| {
            matches!(
                q.get("status").and_then(Value::as_str),
                Some("completed" | "failed" | "cancelled" | "postcopy-paused")
            )
        })
    }

    /// `query-status` status word.
    pub fn run_status(&mut self) -> Result<String, String> {
        Ok(self
            .qmp
            .cmd("query-status", json!({}))?
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned())
    }

    /// `x-ram-digest`.
    pub fn digest(&mut self) -> Result<Value, String> {
        self.qmp.cmd("x-ram-digest", json!({}))
    }

    /// What runs the guest's vCPUs (`kvm` or `soft`), from `x-guest-info`.
    pub fn accel(&mut self) -> Result<String, String> {
        let info = self.qmp.cmd("x-guest-info", json!({}))?;
        info.get("accel")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("{}: x-guest-info has no accel: {info}", self.name))
    }

    /// Waits until guest RAM differs from what it is now: the guest runs.
    pub fn wait_ram_changes(&mut self) -> Result<(), String> {
        let before = self.digest()?;
        let start = Instant::now();
        while self.digest()? == before {
            if start.elapsed() > HANG_GUARD {
                return Err(format!(
                    "{}: guest RAM did not change: the guest does not run",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The first byte of each 4 KiB page of the workload memory.
    pub fn page_bytes(&mut self) -> Result<Vec<u8>, String> {
        self.page_bytes_in(WORKLOAD_START, self.mem)
    }

    /// The first byte of each 4 KiB page of guest-physical `[start, end)`.
    pub fn page_bytes_in(&mut self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        self.sample(start, end, 4096)
    }

    /// `x-ram-sample`: the bytes at `start, start + stride, ...` below `end`.
    pub fn sample(&mut self, start: u64, end: u64, stride: u64) -> Result<Vec<u8>, String> {
        let r = self.qmp.cmd(
            "x-ram-sample",
            json!({"start": start, "end": end, "stride": stride}),
        )?;
        let data = r
            .get("data")
            .and_then(Value::as_str)
            .ok_or("x-ram-sample gave no data")?;
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| format!("{}: x-ram-sample data is not base64: {e}", self.name))
    }

    /// The first 8 bytes (little-endian) of each 4 KiB page of `[start, end)`.
    pub fn page_words(&mut self, start: u64, end: u64) -> Result<Vec<u64>, String> {
        let mut planes = Vec::new();
        for k in 0..8 {
            planes.push(self.sample(start + k, end, 4096)?);
        }
        Ok((0..planes[0].len())
            .map(|i| {
                let mut b = [0u8; 8];
                for (k, p) in planes.iter().enumerate() {
                    b[k] = p[i];
                }
                u64::from_le_bytes(b)
            })
            .collect())
    }

    /// The `x-guest-info` balloon counter `name` (`honoured`, `dropped`, ...).
    pub fn balloon(&mut self, name: &str) -> Result<u64, String> {
        let info = self.qmp.cmd("x-guest-info", json!({}))?;
        info["balloon"][name]
            .as_u64()
            .ok_or_else(|| format!("{}: no balloon.{name} in {info}", self.name))
    }

    /// Waits until the balloon honoured `n` requests.
    pub fn wait_balloon_honoured(&mut self, n: u64) -> Result<(), String> {
        let start = Instant::now();
        while self.balloon("honoured")? < n {
            if start.elapsed() > HANG_GUARD {
                return Err(format!(
                    "{}: its balloon honoured no {n} requests",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Bytes of COM1 output so far.
    pub fn serial_len(&self) -> u64 {
        std::fs::metadata(&self.serial)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Waits until COM1 output grows past `len`.
    pub fn wait_serial_beyond(&self, len: u64) -> Result<u64, String> {
        let start = Instant::now();
        loop {
            let now = self.serial_len();
            if now > len {
                return Ok(now);
            }
            if start.elapsed() > HANG_GUARD {
                return Err(format!(
                    "{}: the guest printed nothing new (stuck at {len} bytes)",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The listening address of an incoming migration, as a URI.
    pub fn incoming_uri(&mut self) -> Result<String, String> {
        let q = self.query_migrate()?;
        let a = q
            .get("socket-address")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .ok_or_else(|| format!("{}: no socket-address in {q}", self.name))?;
        let s = |k| a.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Ok(match s("type").as_str() {
            "inet" => format!("tcp:{}:{}", s("host"), s("port")),
            "unix" => format!("unix:{}", s("path")),
            t => format!("{t}:{}", s("path")),
        })
    }

    /// Kills the process at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks the process to quit and waits for it.
    pub fn quit(mut self) -> Result<(), String> {
        let _ = self.qmp.execute("quit", json!({}));
        let st = self.child.wait().map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("{} exited with {st}", self.name));
        }
        Ok(())
    }
}

impl Drop for DemoVm {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JSON integer field of a `query-migrate` reply (`ram.transferred` style paths).
pub fn field(q: &Value, path: &str) -> u64 {
    path.split('.')
        .try_fold(q, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Whether `needed` free 2 MiB huge pages exist: a loud skip without them, a
/// failure under `REQUIRE_HUGETLB=1`.
pub fn huge_pages(needed: u64) -> Result<(), crate::Failure> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let free = get("HugePages_Free").saturating_sub(get("HugePages_Rsvd"));
    let size = get("Hugepagesize");
    if size == 2048 && free >= needed {
        return Ok(());
    }
    let why = format!(
        "needs {needed} free 2 MiB huge pages, the host has {free} of {size} KiB \
         (echo {needed} > /proc/sys/vm/nr_hugepages)"
    );
    if std::env::var("REQUIRE_HUGETLB").as_deref() == Ok("1") {
        Err(crate::Failure::Failed(format!("{why} (REQUIRE_HUGETLB=1)")))
    } else {
        Err(crate::Failure::Skipped(why))
    }
}
