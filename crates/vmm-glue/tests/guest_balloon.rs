//! The `balloon` built-in guest, on soft vCPUs and on KVM, with one and two vCPUs,
//! against a balloon written for the test: every request names exactly its vCPU's
//! balloon area, arrives with every page of the area holding that pass's marker (the
//! pass number + 1), and what the guest leaves in RAM passes `balloon_check`, whether
//! the requests are honoured (the area zeroed) or dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kvm_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress};
use vmm_glue::guest::balloon::{halves, COUNT_PORT, PFN_PORT};
use vmm_glue::guest::{balloon_check, builtin, slices, Workload, COM1, PAGE_SIZE};
use vmm_glue::io::IoHandler;
use vmm_glue::kvm::{KvmVm, KvmVmConfig, LongModeEntry};
use vmm_glue::session::{GuestRam, RamRegion, Vcpus};
use vmm_glue::soft::SoftVcpus;
use vmm_glue::GuestMemoryMmap;

/// Where the workload memory starts (as in demovm).
const START: u64 = 0x10_0000;
/// Top of guest memory.
const TOP: u64 = 8 << 20;
/// Passes every vCPU completes before the guest is paused and checked.
const PASSES: u64 = 4;
/// A hang guard, not a performance limit.
const HANG_GUARD: Duration = Duration::from_secs(300);

/// A balloon that checks each request against what the guest must have done.
struct TestBalloon {
    mem: Arc<GuestMemoryMmap>,
    /// Each vCPU's balloon area, `[start, end)`.
    areas: Vec<(u64, u64)>,
    /// Zero the area on a request (honour it), or leave it (drop it).
    honour: bool,
    /// The PFN register of each vCPU thread.
    pfn: Mutex<HashMap<ThreadId, u32>>,
    /// Requests per area so far: the passes each vCPU made its request in.
    requests: Mutex<Vec<u64>>,
    /// What went wrong, for the test to report.
    errors: Mutex<Vec<String>>,
    /// Bytes written to COM1.
    com1: AtomicU64,
}

impl TestBalloon {
    fn request(&self, count: u32) {
        let Some(pfn) = self.pfn.lock().remove(&std::thread::current().id()) else {
            self.errors
                .lock()
                .push(format!("a count of {count} with no PFN written before it"));
            return;
        };
        let start = u64::from(pfn) * PAGE_SIZE;
        let range = (start, start + u64::from(count) * PAGE_SIZE);
        let Some(v) = self.areas.iter().position(|&a| a == range) else {
            self.errors.lock().push(format!(
                "a request for [{:#x}, {:#x}), no vCPU's balloon area ({:x?})",
                range.0, range.1, self.areas
            ));
            return;
        };
        let mut requests = self.requests.lock();
        let marker = requests[v] + 1;
        for page in (range.0..range.1).step_by(PAGE_SIZE as usize) {
            let w: u64 = self.mem.read_obj(GuestAddress(page)).unwrap_or(u64::MAX);
            if w != marker {
                self.errors.lock().push(format!(
                    "vCPU {v}'s request {marker}: page {page:#x} holds {w}, not the marker {marker}"
                ));
                break;
            }
        }
        requests[v] += 1;
        if self.honour {
            let zeros = vec![0u8; (range.1 - range.0) as usize];
            if let Err(e) = self.mem.write_slice(&zeros, GuestAddress(range.0)) {
                self.errors.lock().push(format!("zeroing: {e}"));
            }
        }
    }
}

impl IoHandler for TestBalloon {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> bool {
        // COM1's line status reads as 0xff (unhandled): ready to send.
        false
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match (port, <[u8; 4]>::try_from(data)) {
            (PFN_PORT, Ok(v)) => {
                self.pfn
                    .lock()
                    .insert(std::thread::current().id(), u32::from_le_bytes(v));
                true
            }
            (COUNT_PORT, Ok(v)) => {
                self.request(u32::from_le_bytes(v));
                true
            }
            (COM1, _) => {
                self.com1.fetch_add(data.len() as u64, Ordering::Relaxed);
                true
            }
            _ => {
                self.errors
                    .lock()
                    .push(format!("a write of {data:02x?} to port {port:#x}"));
                false
            }
        }
    }

    fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
        false
    }

    fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Soft,
    Kvm,
}

/// Runs the guest until each vCPU made [`PASSES`] requests, pauses it, and checks
/// its requests and RAM.
fn run(accel: Accel, vcpus: usize, honour: bool) {
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0xa_0000),
            (GuestAddress(START), (TOP - START) as usize),
        ])
        .unwrap(),
    );
    let ram = GuestRam::new(
        Arc::clone(&mem),
        vec![RamRegion::new("pc.ram.low"), RamRegion::new("pc.ram")],
    )
    .unwrap();
    let slices = slices(START, TOP, vcpus).unwrap();
    let areas: Vec<(u64, u64)> = slices.iter().map(|&s| halves(s).unwrap().1).collect();
    let io = Arc::new(TestBalloon {
        mem: Arc::clone(&mem),
        areas,
        honour,
        pfn: Mutex::default(),
        requests: Mutex::new(vec![0; vcpus]),
        errors: Mutex::default(),
        com1: AtomicU64::new(0),
    });
    // The KVM VM lives as long as its vCPUs run.
    let (cpus, _vm): (Arc<dyn Vcpus>, Option<KvmVm>) = match accel {
        Accel::Soft => {
            let v = SoftVcpus::new(
                Arc::clone(&mem),
                Arc::clone(&io) as Arc<dyn IoHandler>,
                Workload::Balloon,
                vcpus,
                START,
                TOP,
            )
            .unwrap();
            (Arc::new(v), None)
        }
        Accel::Kvm => {
            let vm = KvmVm::new(&ram, KvmVmConfig::new(vcpus)).unwrap();
            let v = vm.vcpus();
            v.set_io_handler(Arc::clone(&io) as Arc<dyn IoHandler>);
            let p = builtin::program(Workload::Balloon);
            mem.write_slice(&p.code, GuestAddress(p.load_addr)).unwrap();
            let entries: Vec<LongModeEntry> = slices
                .iter()
                .zip(0u64..)
                .map(|(&(s, e), i)| LongModeEntry::new(p.entry, 0).with_args([s, e, i, 0]))
                .collect();
            v.boot_long_mode(&entries).unwrap();
            (v as Arc<dyn Vcpus>, Some(vm))
        }
    };
    cpus.resume().unwrap();
    let t = Instant::now();
    while io.requests.lock().iter().any(|&r| r < PASSES) {
        assert!(
            io.errors.lock().is_empty(),
            "{:?}",
            io.errors.lock().as_slice()
        );
        assert!(
            t.elapsed() < HANG_GUARD,
            "hang guard: requests {:?}",
            io.requests.lock()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    cpus.pause().unwrap();
    let errors = io.errors.lock().clone();
    assert!(errors.is_empty(), "{errors:?}");

    let requests = io.requests.lock().clone();
    let made: u64 = requests.iter().sum();
    let b = io.com1.load(Ordering::Relaxed);
    assert!(
        b <= made && made <= b + vcpus as u64,
        "one B after each request: {b} B, {made} requests"
    );
    let words: Vec<u64> = (START..TOP)
        .step_by(PAGE_SIZE as usize)
        .map(|a| mem.read_obj(GuestAddress(a)).unwrap())
        .collect();
    let most = requests.iter().max().copied().unwrap_or(0);
    let s = balloon_check(&words, vcpus, most + 1)
        .unwrap_or_else(|e| panic!("{accel:?}, {vcpus} vCPU(s), honour {honour}: {e}"));
    let area_pages: u64 = io.areas.iter().map(|a| (a.1 - a.0) / PAGE_SIZE).sum();
    assert_eq!(s.zero_pages + s.marked_pages, area_pages);
    if honour {
        assert!(s.max_marker <= most + 1, "{s:?}");
    } else {
        // Every vCPU completed a pass and nothing was given back: all marked.
        assert_eq!(s.zero_pages, 0, "{s:?}");
        assert!(s.max_marker >= PASSES, "{s:?}");
    }
    eprintln!("{accel:?}, {vcpus} vCPU(s), honour {honour}: requests {requests:?}, {s:?}");
}

fn kvm(name: &str) -> bool {
    kvm_common::kvm_or_skip(name)
}

#[test]
fn soft_one_vcpu_requests_honoured() {
    run(Accel::Soft, 1, true);
}

#[test]
fn soft_two_vcpus_requests_honoured() {
    run(Accel::Soft, 2, true);
}

#[test]
fn soft_two_vcpus_requests_dropped() {
    run(Accel::Soft, 2, false);
}

#[test]
fn kvm_one_vcpu_requests_honoured() {
    if kvm("kvm_one_vcpu_requests_honoured") {
        run(Accel::Kvm, 1, true);
    }
}

#[test]
fn kvm_two_vcpus_requests_honoured() {
    if kvm("kvm_two_vcpus_requests_honoured") {
        run(Accel::Kvm, 2, true);
    }
}

#[test]
fn kvm_two_vcpus_requests_dropped() {
    if kvm("kvm_two_vcpus_requests_dropped") {
        run(Accel::Kvm, 2, false);
    }
}
