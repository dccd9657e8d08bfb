//! Precopy figures for `cargo xtask bench`.
//!
//! - `precopy.stopped_1g`: a stopped 1 GiB guest whose pages are all non-zero,
//!   migrated over loopback TCP by the real saver and loader (setup, iterations, last
//!   pass, every page checked on arrival), against a plain socket copy of the same
//!   bytes from guest memory to guest memory in the same run.
//! - `precopy.overhead_*_per_gib`: what the saver and loader add to a process's resident
//!   memory per GiB of guest (bitmaps, buffers), measured as the RSS growth across
//!   their setup with guest memory already resident.
//! - `precopy.live_ab_1g.*`: a running 1 GiB `ab` guest between two `demovm`
//!   processes: total time, downtime, MiB sent.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_ram::vm_memory::{Bytes, GuestAddress};
use migration_ram::{
    GuestMemoryMmap, PrecopyLoader, PrecopyParams, PrecopySaver, RamBlocks, RamStats, VmmDirtyLog,
};
use migration_stream::{Record, StreamReader, StreamWriter};

use crate::bench::{median, Figure, Report};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
const ROUNDS: usize = 5;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

fn guest(fill: bool) -> Result<Arc<GuestMemoryMmap>, String> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GIB as usize)]).map_err(e)?;
    let mut buf = vec![0u8; CHUNK];
    for off in (0..GIB).step_by(CHUNK) {
        if fill {
            // Every 8-byte word non-zero and different per page.
            for (i, w) in buf.chunks_exact_mut(8).enumerate() {
                let v = (off + i as u64 * 8) | 1;
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
        // Touch every page so both sides start resident, as a running guest's RAM is.
        mem.write_slice(&buf, GuestAddress(off)).map_err(e)?;
    }
    Ok(Arc::new(mem))
}

fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Result<bool, String> {
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for off in (0..GIB).step_by(CHUNK) {
        a.read_slice(&mut x, GuestAddress(off)).map_err(e)?;
        b.read_slice(&mut y, GuestAddress(off)).map_err(e)?;
        if x != y {
            return Ok(false);
        }
    }
    Ok(true)
}

fn blocks(mem: &GuestMemoryMmap) -> Result<RamBlocks, String> {
    RamBlocks::from_guest_memory(mem, &["pc.ram"]).map_err(e)
}

/// No bandwidth cap; switchover once a pass leaves less than a second's worth.
fn unlimited() -> PrecopyParams {
    PrecopyParams {
        max_bandwidth: 0,
        downtime_limit: Duration::from_secs(1),
    }
}

/// A saver of all of `src`, tracking writes through vm-memory.
fn saver(src: &Arc<GuestMemoryMmap>, params: PrecopyParams) -> Result<PrecopySaver, String> {
    Ok(PrecopySaver::new(
        Arc::clone(src),
        blocks(src)?,
        Arc::new(VmmDirtyLog::new(Arc::clone(src))),
        params.shared(),
        Arc::new(RamStats::new()),
        Arc::new(AtomicBool::new(false)),
    ))
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Runs `receive` on a thread accepting one loopback TCP connection and `send` on a
/// connection to it; returns the time from connecting until the receiver is done.
fn loopback_transfer(
    receive: impl FnOnce(TcpStream) -> Result<(), String> + Send + 'static,
    send: impl FnOnce(TcpStream) -> Result<(), String>,
) -> Result<Duration, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(e)?;
    let addr = listener.local_addr().map_err(e)?;
    let receiver = std::thread::spawn(move || receive(listener.accept().map_err(e)?.0));
    let start = Instant::now();
    send(TcpStream::connect(addr).map_err(e)?)?;
    receiver.join().map_err(|_| "receiver panicked")??;
    Ok(start.elapsed())
}

/// Migrates `src` into `dst` over loopback TCP; returns the elapsed time.
fn precopy_once(
    src: &Arc<GuestMemoryMmap>,
    dst: &Arc<GuestMemoryMmap>,
) -> Result<Duration, String> {
    let dst = Arc::clone(dst);
    loopback_transfer(
        move |s| {
            let mut loader =
                PrecopyLoader::new(Arc::clone(&dst), blocks(&dst)?, Arc::new(RamStats::new()));
            loader.set_fresh_memory(false);
            let mut r = StreamReader::new(s);
            match loader.load(&mut r).map_err(e)? {
                Record::Complete => Ok(()),
                other => Err(format!("unexpected {other:?}")),
            }
        },
        |s| {
            let mut w = StreamWriter::new(s);
            let mut saver = saver(src, unlimited())?;
            saver.setup(&mut w).map_err(e)?;
            while !saver.iterate(&mut w).map_err(e)?.switchover {}
            saver.complete(&mut w).map_err(e)?;
            w.write_complete().map_err(e)?;
            w.flush().map_err(e)
        },
    )
}

/// The same bytes over a plain socket, guest memory to guest memory.
fn socket_copy_once(
    src: &Arc<GuestMemoryMmap>,
    dst: &Arc<GuestMemoryMmap>,
) -> Result<Duration, String> {
    let dst = Arc::clone(dst);
    loopback_transfer(
        move |mut s| {
            let mut buf = vec![0u8; CHUNK];
            for off in (0..GIB).step_by(CHUNK) {
                s.read_exact(&mut buf).map_err(e)?;
                dst.write_slice(&buf, GuestAddress(off)).map_err(e)?;
            }
            Ok(())
        },
        |mut s| {
            let mut buf = vec![0u8; CHUNK];
            for off in (0..GIB).step_by(CHUNK) {
                src.read_slice(&mut buf, GuestAddress(off)).map_err(e)?;
                s.write_all(&buf).map_err(e)?;
            }
            s.flush().map_err(e)
        },
    )
}

/// How the overhead figures are measured.
const OVERHEAD_NOTE: &str = "resident memory the saver (setup and one pass) and the loader \
     (a recorded stream) add, guest memory already resident, 1 GiB guest";

/// The stopped-guest throughput and the overhead figures.
pub fn stopped_figures() -> Result<Vec<Report>, String> {
    let src = guest(true)?;
    let dst = guest(false)?;
    let mib = |d: Duration| GIB as f64 / f64::from(1u32 << 20) / d.as_secs_f64();
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ours.push(mib(precopy_once(&src, &dst)?));
        if !same(&src, &dst)? {
            return Err("precopy bench: destination differs from the source".into());
        }
        // Reset the destination so every round moves every byte again.
        let zero = vec![0u8; CHUNK];
        for off in (0..GIB).step_by(CHUNK) {
            dst.write_slice(&zero, GuestAddress(off)).map_err(e)?;
        }
        plain.push(mib(socket_copy_once(&src, &dst)?));
    }
    let (ours, plain) = (median(ours), median(plain));

    // Overheads: RSS growth across a whole pass with guest memory already resident, so
    // every bitmap word and buffer byte the saver and loader use has been touched.
    // The destination side loads a recorded stream (recorded before measuring).
    let mut recorded = StreamWriter::new(Vec::new());
    recorded
        .write_ram_setup(&blocks(&src)?.infos())
        .map_err(e)?;
    let mut buf = [0u8; 4096];
    for page in 0..4096u64 {
        src.read_slice(&mut buf, GuestAddress(page * 4096))
            .map_err(e)?;
        recorded
            .write_page(migration_stream::BlockId(0), page * 4096, &buf)
            .map_err(e)?;
    }
    recorded.write_complete().map_err(e)?;
    let recorded = recorded.into_inner().map_err(e)?;

    let before = rss();
    let mut loader = PrecopyLoader::new(Arc::clone(&dst), blocks(&dst)?, Arc::new(RamStats::new()));
    let mut r = StreamReader::new(recorded.as_slice());
    match loader.load(&mut r).map_err(e)? {
        Record::Complete => {}
        other => return Err(format!("overhead bench: unexpected {other:?}")),
    }
    let dst_overhead = rss().saturating_sub(before);

    let before = rss();
    let mut saver = saver(&src, unlimited())?;
    let mut w = StreamWriter::new(std::io::sink());
    saver.setup(&mut w).map_err(e)?;
    saver.iterate(&mut w).map_err(e)?;
    let src_overhead = rss().saturating_sub(before);
    saver.abort();
    drop((saver, w, loader, r));

    Ok(vec![
        Figure::new("precopy.stopped_1g", ours, "MiB/s")
            .baseline(plain)
            .note(format!(
                "stopped 1 GiB guest, every page non-zero, saver to loader over loopback \
                 TCP; baseline: a plain socket copy of the same bytes, memory to memory; \
                 median of {ROUNDS} rounds, alternating"
            ))
            .into(),
        Figure::new(
            "precopy.overhead_source_per_gib",
            src_overhead as f64,
            "bytes",
        )
        .note(OVERHEAD_NOTE)
        .into(),
        Figure::new(
            "precopy.overhead_destination_per_gib",
            dst_overhead as f64,
            "bytes",
        )
        .note(OVERHEAD_NOTE)
        .into(),
    ])
}

/// A running 1 GiB `ab` guest migrated between two `demovm` processes.
pub fn live_figures() -> Result<Vec<Report>, String> {
    use e2e::harness::{field, DemoVm, VmOpts};
    use serde_json::{json, Value};
    let opts = |incoming| VmOpts {
        mem_mib: 1024,
        vcpus: 1,
        guest: "builtin:ab",
        incoming,
        accel: None,
        extra: &[],
    };
    let mut src = DemoVm::start("bench-src", &opts(None))?;
    let mut dst = DemoVm::start("bench-dst", &opts(Some("tcp:127.0.0.1:0")))?;
    src.wait_serial_beyond(1)?;
    src.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 5000}),
    )?;
    let uri = dst.incoming_uri()?;
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    let q = src.wait_finished()?;
    if q.get("status").and_then(Value::as_str) != Some("completed") {
        return Err(format!("live bench migration did not complete: {q}"));
    }
    let d = dst.wait_finished()?;
    if d.get("status").and_then(Value::as_str) != Some("completed") {
        return Err(format!("live bench destination: {d}"));
    }
    let accel = dst.accel()?;
    let prefix = if accel == "soft" {
        "precopy.live_ab_1g_soft_vcpus"
    } else {
        "precopy.live_ab_1g"
    };
    let note = format!(
        "running 1 GiB builtin:ab guest ({accel}) between two demovm processes over \
         loopback TCP, max-bandwidth 0 (unlimited), downtime-limit 5000 ms; one run; \
         sent against the guest size"
    );
    Ok(vec![
        Figure::new(
            format!("{prefix}.total"),
            field(&q, "total-time") as f64,
            "ms",
        )
        .note(&note)
        .into(),
        Figure::new(
            format!("{prefix}.downtime"),
            field(&q, "downtime") as f64,
            "ms",
        )
        .note(&note)
        .into(),
        Figure::new(
            format!("{prefix}.sent"),
            field(&q, "ram.transferred") as f64 / f64::from(1u32 << 20),
            "MiB",
        )
        .baseline(GIB as f64 / f64::from(1u32 << 20))
        .note(note)
        .into(),
    ])
}
