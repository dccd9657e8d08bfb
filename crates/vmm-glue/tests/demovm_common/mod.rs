//! Helpers of the `demovm_*` tests: a `demovm` process driven over QMP as an
//! operator's tooling would (a small client, like the `tests` crate's harness), and
//! the skip rules for KVM and huge pages.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// How long any single wait may take: a hang guard, not a performance limit.
pub const HANG_GUARD: Duration = Duration::from_secs(300);
/// Where the built-in guests' workload memory starts.
pub const WORKLOAD_START: u64 = 0x10_0000;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether KVM is usable; prints the loud skip line when not, and panics instead
/// under `REQUIRE_KVM=1`.
pub fn kvm_or_skip(name: &str) -> bool {
    match vmm_glue::kvm::host_facts() {
        Ok(_) => true,
        Err(e) => {
            let why = vmm_glue::error_chain(&e);
            assert!(
                std::env::var("REQUIRE_KVM").as_deref() != Ok("1"),
                "{name}: REQUIRE_KVM=1 but no usable /dev/kvm: {why}"
            );
            eprintln!("\n*** SKIPPED {name}: no usable /dev/kvm: {why} ***\n");
            false
        }
    }
}

/// Free (unreserved) huge pages of the default size, and that size in bytes.
pub fn free_huge_pages() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (
        field("HugePages_Free").saturating_sub(field("HugePages_Rsvd")),
        field("Hugepagesize") << 10,
    )
}

/// Whether `needed` free 2 MiB huge pages exist; prints the loud skip line when
/// not, and panics instead under `REQUIRE_HUGETLB=1`.
pub fn huge_pages_or_skip(name: &str, needed: u64) -> bool {
    let (free, size) = free_huge_pages();
    if size == 2 << 20 && free >= needed {
        return true;
    }
    let why = format!(
        "needs {needed} free 2 MiB huge pages, the host has {free} of {} KiB \
         (echo {needed} > /proc/sys/vm/nr_hugepages)",
        size >> 10
    );
    assert!(
        std::env::var("REQUIRE_HUGETLB").as_deref() != Ok("1"),
        "{name}: REQUIRE_HUGETLB=1 but it {why}"
    );
    eprintln!("\n*** SKIPPED {name}: {why} ***\n");
    false
}

/// A `demovm` process with a QMP connection; killed on drop.
pub struct Vm {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Its scratch directory (QMP socket, COM1 output, stderr).
    pub dir: PathBuf,
    /// Top of guest memory.
    pub mem: u64,
}

impl Vm {
    /// Starts `demovm --mem {mem_mib}M` with `args` (plus its QMP socket and COM1
    /// file) and negotiates QMP.
    pub fn start(name: &str, mem_mib: u64, args: &[&str]) -> Vm {
        let dir = std::env::temp_dir().join(format!(
            "demovm-test-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_demovm"))
            .arg("--mem")
            .arg(format!("{mem_mib}M"))
            .args(args)
            .arg("--qmp")
            .arg(&sock)
            .arg("--serial")
            .arg(dir.join("serial.out"))
            .env("DEMOVM_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        panic!(
                            "{name}: demovm exited with {st}: {}",
                            std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                        );
                    }
                    assert!(t.elapsed() < HANG_GUARD, "{name}: no QMP socket: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut vm = Vm {
            child,
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            dir,
            mem: mem_mib << 20,
        };
        let greeting = vm.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        vm.cmd("qmp_capabilities", json!({}));
        vm
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Runs a QMP command: its return value, or its error's `(class, desc)`.
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, (String, String)> {
        let req = json!({ "execute": name, "arguments": args });
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let e = &v["error"];
            let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
            return Err((s("class"), s("desc")));
        }
    }

    /// Runs a QMP command that must succeed.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.execute(name, args)
            .unwrap_or_else(|e| panic!("{name} failed: {e:?}"))
    }

    /// `x-guest-info`.
    pub fn info(&mut self) -> Value {
        self.cmd("x-guest-info", json!({}))
    }

    /// The balloon counter `name` of `x-guest-info`.
    pub fn balloon(&mut self, name: &str) -> u64 {
        self.info()["balloon"][name].as_u64().unwrap()
    }

    /// Polls `f` until it holds, within the hang guard.
    pub fn wait(&mut self, what: &str, mut f: impl FnMut(&mut Vm) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(
                t.elapsed() < HANG_GUARD,
                "waited too long for {what}: {}",
                self.info()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The bytes at `start + k * stride` below `end` (`x-ram-sample`).
    pub fn sample(&mut self, start: u64, end: u64, stride: u64) -> Vec<u8> {
        let r = self.cmd(
            "x-ram-sample",
            json!({ "start": start, "end": end, "stride": stride }),
        );
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }

    /// The first 8 bytes (little-endian) of each 4 KiB page of `[start, end)`.
    pub fn page_words(&mut self, start: u64, end: u64) -> Vec<u64> {
        let planes: Vec<Vec<u8>> = (0..8).map(|k| self.sample(start + k, end, 4096)).collect();
        (0..planes[0].len())
            .map(|i| {
                let b: Vec<u8> = planes.iter().map(|p| p[i]).collect();
                u64::from_le_bytes(b.try_into().unwrap())
            })
            .collect()
    }

    /// The first byte of each 4 KiB page of the workload memory.
    pub fn page_bytes(&mut self) -> Vec<u8> {
        let top = self.mem;
        self.sample(WORKLOAD_START, top, 4096)
    }

    /// `x-ram-digest`: each block's name and digest.
    pub fn digest(&mut self) -> Vec<(String, String)> {
        self.cmd("x-ram-digest", json!({}))["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_owned(),
                    b["digest"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The mappings of the process (`/proc/PID/smaps`) as `(first line, size in
    /// KiB, kernel page size in KiB)`.
    pub fn mappings(&self) -> Vec<(String, u64, u64)> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.child.id())).unwrap();
        let mut out: Vec<(String, u64, u64)> = Vec::new();
        for line in smaps.lines() {
            let kib = |l: &str| -> u64 {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("Size:") {
                if let Some(m) = out.last_mut() {
                    m.1 = kib(line);
                }
            } else if line.starts_with("KernelPageSize:") {
                if let Some(m) = out.last_mut() {
                    m.2 = kib(line);
                }
            } else if line
                .split_whitespace()
                .next()
                .is_some_and(|a| a.contains('-') && !a.ends_with(':'))
            {
                out.push((line.to_owned(), 0, 0));
            }
        }
        out
    }

    /// Bytes the guest wrote to COM1 (`x-guest-info`).
    pub fn serial_bytes(&mut self) -> u64 {
        self.info()["serial-bytes"].as_u64().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `demovm` with `args`, which must make it fail before it serves anything:
/// its exit code and stderr. A VM that starts after all (its banner appears) is
/// killed, and the exit code is `None`.
pub fn run_to_failure(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_demovm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        err.push_str(&line);
        err.push('\n');
        if line.contains("vCPU(s), guest") {
            let _ = child.kill();
            let _ = child.wait();
            return (None, err);
        }
    }
    (child.wait().unwrap().code(), err)
}
