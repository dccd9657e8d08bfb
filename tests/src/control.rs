//! The control plane under stress, as an attacker or an unlucky operator would
//! stress it: QMP clients that never read, too many clients, concurrent
//! commands, a destination that stops answering, a connection that never says
//! hello.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{field, Qmp, HANG_GUARD};
use crate::migration::{converge, expect, outcome, status, Guest};
use crate::{Failure, Outcome};

/// A raw QMP connection: greeting read, capabilities negotiated. While the
/// server is at its connection cap (clients that just left not yet reaped),
/// it tries again.
fn negotiated(path: &std::path::Path) -> Result<UnixStream, String> {
    let start = Instant::now();
    let (s, mut r) = loop {
        let s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(HANG_GUARD))
            .map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut greeting = String::new();
        r.read_line(&mut greeting).map_err(|e| e.to_string())?;
        if greeting.contains("\"QMP\"") {
            break (s, r);
        }
        if start.elapsed() > HANG_GUARD {
            return Err(format!("never greeted: {greeting}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut line = String::new();
    (&s).write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .map_err(|e| e.to_string())?;
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.contains("return") {
        return Err(format!("negotiation failed: {line}"));
    }
    Ok(s)
}

/// A QMP client that negotiates, then sends commands and never reads a reply,
/// while a live migration runs and other clients keep asking; plus the
/// connection cap. The migration completes, the other clients get every
/// answer, the stuck client is dropped, and the client over the cap gets a
/// clear error while the others are served.
pub fn qmp_stuck_client() -> Result<Outcome, Failure> {
    let guest = Guest::builtin("ab", 1, 64);
    let mut src = guest.start("src", None)?;
    let qmp_path = src.dir.join("qmp.sock");

    // The cap: the harness's client is one; open more until one is refused.
    let mut extra = Vec::new();
    let refused = loop {
        let s = UnixStream::connect(&qmp_path).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(HANG_GUARD))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s.try_clone().map_err(|e| e.to_string())?)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.contains("\"error\"") {
            break line;
        }
        extra.push(s);
        expect(extra.len() < 64, || "no QMP connection cap".into())?;
    };
    expect(refused.contains("too many QMP connections"), || {
        format!("the client over the cap got {refused}")
    })?;
    let cap = extra.len() + 1;
    // The others are still served.
    src.qmp.cmd("query-status", json!({}))?;
    drop(extra);

    // The stuck client: commands it never reads the answers to, until its
    // socket is full.
    let stuck = negotiated(&qmp_path)?;
    stuck.set_nonblocking(true).map_err(|e| e.to_string())?;
    let line = b"{\"execute\": \"query-migrate\"}\n";
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match (&stuck).write(line) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
    }
    // A second client that keeps asking (once the clients over the cap are
    // reaped).
    let start = Instant::now();
    let mut other = loop {
        match Qmp::connect(&qmp_path) {
            Ok(q) => break q,
            Err(e) if start.elapsed() > HANG_GUARD => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    other.cmd("query-status", json!({}))?;

    let mut dst = guest.paused_destination("dst", "tcp:127.0.0.1:0")?;
    let uri = dst.incoming_uri()?;
    converge(&mut src)?;
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    let mut answers = 0u32;
    let q = loop {
        let q = other.cmd("query-migrate", json!({}))?;
        answers += 1;
        if matches!(status(&q), "completed" | "failed" | "cancelled") {
            break q;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    expect(status(&q) == "completed", || format!("source: {q}"))?;
    let d = dst.wait_finished()?;
    expect(status(&d) == "completed", || format!("destination: {d}"))?;
    let (a, b) = (src.digest()?, dst.digest()?);
    expect(a == b, || format!("RAM differs: {a} vs {b}"))?;
    // The stuck client was dropped: once drained, its socket ends.
    stuck.set_nonblocking(false).map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    // It ends with end of file, or a reset when the server closed it with
    // commands still unread: dropped either way.
    let drained = (&stuck).read_to_end(&mut sink);
    let dropped = match &drained {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    expect(dropped, || {
        format!("the stuck client was never dropped: {drained:?}")
    })?;
    let accel = src.accel()?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "client {cap} over the cap refused; a client that sent {sent} commands and read nothing was dropped; \
             the migration completed (RAM equal) while another client got {answers} answers"
        ),
    ))
}

/// Four QMP clients send 50 `stop`, `cont`, `migrate` (to files) and
/// `migrate_cancel` commands at once. Nothing deadlocks, the final states are
/// legal ones, query-status agrees with what the vCPUs do, and the guest ends
/// running or paused as the last command asked.
pub fn qmp_concurrent() -> Result<Outcome, Failure> {
    let guest = Guest::builtin("ab", 1, 32);
    let mut src = guest.start("src", None)?;
    converge(&mut src)?;
    let qmp_path = src.dir.join("qmp.sock");
    let dir = src.dir.clone();
    let started = Instant::now();
    let results: Vec<Result<(u32, u32), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u32)
            .map(|c| {
                let (qmp_path, dir) = (&qmp_path, &dir);
                s.spawn(move || -> Result<(u32, u32), String> {
                    let mut q = Qmp::connect(qmp_path)?;
                    let (mut ok, mut refused) = (0, 0);
                    let n = if c < 2 { 13 } else { 12 };
                    for k in 0..n {
                        let r = match (c + k) % 4 {
                            0 => q.execute("stop", json!({}))?,
                            1 => q.execute("cont", json!({}))?,
                            2 => {
                                let uri = format!("file:{}/c{c}-{k}.mig", dir.display());
                                q.execute("migrate", json!({ "uri": uri }))?
                            }
                            _ => q.execute("migrate_cancel", json!({}))?,
                        };
                        match r {
                            Ok(_) => ok += 1,
                            Err(_) => refused += 1,
                        }
                    }
                    Ok((ok, refused))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a client panicked".into())))
            .collect()
    });
    let (mut ok, mut refused) = (0, 0);
    for r in results {
        let (o, f) = r?;
        ok += o;
        refused += f;
    }
    expect(ok + refused == 50, || {
        format!("{} answers to 50 commands", ok + refused)
    })?;
    let q = src.wait_migration("the last migration to end", |q| {
        matches!(status(q), "none" | "completed" | "failed" | "cancelled")
    })?;
    let rs = src.run_status()?;
    expect(
        matches!(rs.as_str(), "running" | "paused" | "postmigrate"),
        || format!("run state {rs} after the storm"),
    )?;
    // The last command decides, and query-status tells the truth.
    src.qmp.cmd("cont", json!({}))?;
    expect(src.run_status()? == "running", || {
        "cont did not run it".into()
    })?;
    src.wait_ram_changes()?;
    src.qmp.cmd("stop", json!({}))?;
    expect(src.run_status()? == "paused", || {
        "stop did not pause it".into()
    })?;
    let a = src.digest()?;
    std::thread::sleep(Duration::from_millis(200));
    let b = src.digest()?;
    expect(a == b, || "the guest runs while paused".into())?;
    let accel = src.accel()?;
    Ok(Outcome {
        accel: Some(accel),
        total: started.elapsed(),
        note: format!(
            "50 concurrent commands from 4 clients: {ok} done, {refused} refused as the state required; \
             last migration {}, then cont runs and stop pauses the guest",
            status(&q)
        ),
        ..Outcome::default()
    })
}

fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map_err(|e| format!("kill {sig}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid}: {st}"))
    }
}

/// The destination is frozen (SIGSTOP) mid-migration: the source reports a
/// link error once the link timeout passes, and its guest runs on; a
/// connection that never says hello does not keep the real source out.
pub fn dest_stopped() -> Result<Outcome, Failure> {
    let guest = Guest::builtin("ab", 1, 128);
    let mut src = guest.start("src", None)?;
    src.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 32 << 20, "x-link-timeout": 3000}),
    )?;
    let mut dst = guest.start("dst", Some("tcp:127.0.0.1:0"))?;
    let uri = dst.incoming_uri()?;
    // Somebody connects first and never says a word.
    let silent = TcpStream::connect(uri.trim_start_matches("tcp:"))
        .map_err(|e| format!("silent connection: {e}"))?;
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    src.wait_migration("pages to flow", |q| field(q, "ram.transferred") > 8 << 20)?;
    let accel = crate::migration::accel_of(&mut [&mut src, &mut dst])?;
    signal(dst.pid(), "-STOP")?;
    let frozen = Instant::now();
    let q = src.wait_finished();
    let waited = frozen.elapsed();
    signal(dst.pid(), "-CONT")?;
    let q = q?;
    drop(silent);
    expect(status(&q) == "failed", || format!("source: {q}"))?;
    let kind = q.get("x-error-kind").and_then(Value::as_str).unwrap_or("");
    let desc = q.get("error-desc").and_then(Value::as_str).unwrap_or("");
    expect(kind == "link", || {
        format!("a frozen destination must be a link error: {q}")
    })?;
    expect(src.run_status()? == "running", || {
        "the source guest must run on".into()
    })?;
    let before = src.serial_len();
    src.wait_serial_beyond(before + 1)?;
    src.qmp.cmd("stop", json!({}))?;
    guest_ab_check(&mut src)?;
    // The thawed destination sees the link gone and does not run the guest.
    let d = dst.wait_finished()?;
    expect(status(&d) == "failed", || format!("destination: {d}"))?;
    expect(dst.run_status()? == "inmigrate", || {
        "the destination must not run the guest".into()
    })?;
    Ok(outcome(
        &q,
        accel,
        format!(
            "a silent connection came first and the source still got in; destination frozen: source failed after {:.1} s \
             (link timeout 3 s) with \"{desc}\"; its guest runs on, a-b check holds",
            waited.as_secs_f64()
        ),
    ))
}

fn guest_ab_check(vm: &mut crate::harness::DemoVm) -> Result<(), String> {
    vmm_glue::guest::ab_check(&vm.page_bytes()?, 1).map_err(|e| format!("{}: {e}", vm.name))
}

/// A boot sector that enters protected mode with an empty IDT and raises an
/// exception: a triple fault.
///
/// ```text
/// 7c00: fa                    cli
/// 7c01: 0f 01 16 30 7c        lgdt [0x7c30]
/// 7c06: 0f 20 c0              mov eax, cr0
/// 7c09: 66 83 c8 01           or eax, 1
/// 7c0d: 0f 22 c0              mov cr0, eax
/// 7c10: ea 15 7c 08 00        jmp 0x08:0x7c15
/// 7c15: 0f 01 1d 60 7c 00 00  lidt [0x7c60]      ; limit 0
/// 7c1c: cc                    int3               ; no IDT: triple fault
/// 7c1d: f4                    hlt
/// 7c30: GDTR (limit 0x17, base 0x7c38); 7c38: GDT null, flat code, flat data
/// 7c60: IDTR (limit 0, base 0)
/// ```
fn triple_fault_sector() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    let code = [
        0xfa, 0x0f, 0x01, 0x16, 0x30, 0x7c, 0x0f, 0x20, 0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f, 0x22,
        0xc0, 0xea, 0x15, 0x7c, 0x08, 0x00,
    ];
    b[..code.len()].copy_from_slice(&code);
    let pm = [0x0f, 0x01, 0x1d, 0x60, 0x7c, 0x00, 0x00, 0xcc, 0xf4];
    b[0x15..0x15 + pm.len()].copy_from_slice(&pm);
    b[0x30..0x32].copy_from_slice(&0x17u16.to_le_bytes());
    b[0x32..0x36].copy_from_slice(&0x7c38u32.to_le_bytes());
    b[0x40..0x48].copy_from_slice(&0x00cf_9a00_0000_ffffu64.to_le_bytes());
    b[0x48..0x50].copy_from_slice(&0x00cf_9200_0000_ffffu64.to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

/// A guest that triple-faults: `query-status` says `shutdown` (on PVM, whose
/// emulator cannot run this exception path, `internal-error` with the
/// emulation failure), with a `SHUTDOWN` or `STOP` event; the process lives
/// on, answers QMP, and refuses to `cont` a guest that stopped.
pub fn guest_stops() -> Result<Outcome, Failure> {
    let guest = Guest::sector("ab.bin");
    guest.available()?;
    let dir = std::env::temp_dir().join(format!("e2e-tf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sector = dir.join("triple-fault.bin");
    std::fs::write(&sector, triple_fault_sector()).map_err(|e| e.to_string())?;
    let path = sector.display().to_string();
    let started = Instant::now();
    let mut vm = crate::harness::DemoVm::start(
        "tf",
        &crate::harness::VmOpts {
            mem_mib: 16,
            vcpus: 1,
            guest: &path,
            incoming: None,
            accel: None,
            // Started paused (QEMU's -S), so this client sees it all.
            extra: &["--paused"],
        },
    )?;
    expect(vm.run_status()? == "paused", || {
        "--paused did not hold the guest".into()
    })?;
    vm.qmp.cmd("cont", json!({}))?;
    let rs = loop {
        let rs = vm.run_status()?;
        if rs != "running" {
            break rs;
        }
        if started.elapsed() > HANG_GUARD {
            return Err(Failure::Failed("the guest never stopped".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pvm = crate::harness::kvm_is_pvm();
    expect(rs == "shutdown" || (pvm && rs == "internal-error"), || {
        format!("run state {rs} after a triple fault (PVM: {pvm})")
    })?;
    vm.qmp.cmd("query-migrate", json!({}))?;
    let events: Vec<String> = vm
        .qmp
        .events
        .iter()
        .filter_map(|e| e.get("event")?.as_str().map(str::to_owned))
        .collect();
    expect(
        events.iter().any(|e| e == "SHUTDOWN" || e == "STOP"),
        || format!("no SHUTDOWN or STOP event: {events:?}"),
    )?;
    let refused = vm.qmp.execute("cont", json!({}))?;
    expect(
        matches!(&refused, Err((_, d)) if d.contains("stopped")),
        || format!("cont of a stopped guest: {refused:?}"),
    )?;
    expect(vm.alive(), || "demovm died".into())?;
    let accel = vm.accel()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Outcome {
        accel: Some(accel),
        total: started.elapsed(),
        note: format!(
            "triple fault: run state {rs}{}, events {events:?}; the process answers QMP and refuses cont",
            if rs == "internal-error" { " (PVM cannot emulate it)" } else { "" }
        ),
        ..Outcome::default()
    })
}
