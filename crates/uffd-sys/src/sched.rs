//! A scheduling hint for the threads that resolve faults.
//!
//! A thread a vCPU waits on (a postcopy fault thread, the loader of the
//! preempt channel, the source thread that answers page requests) sleeps
//! most of the time and must run at once when it wakes, even while
//! threads streaming memory in the background keep every CPU busy. Since
//! Linux 6.12 the fair scheduler (EEVDF) takes a per-thread slice
//! (`sched_setattr` with `SCHED_OTHER` and `sched_runtime`): a thread with a
//! shorter slice gets an earlier deadline when it wakes and preempts a
//! longer-sliced one at once (the `PREEMPT_SHORT` feature), with no
//! privilege, no real-time policy and no change to its share of the CPU.
//! Older kernels ignore the field.

use std::io;
use std::time::Duration;

/// The slice [`prefer_short_slices`] asks for: 100 µs, the kernel's floor.
pub const SHORT_SLICE: Duration = Duration::from_micros(100);

/// `SCHED_OTHER`.
const SCHED_NORMAL: u32 = 0;

/// Asks the scheduler for `slice` (clamped by the kernel to 0.1 to 100 ms)
/// as the calling thread's time slice, keeping its policy and nice value.
/// Does nothing, successfully, for a thread whose policy is not
/// `SCHED_OTHER` (a VMM may have made it real-time on purpose). Returns
/// the kernel's error otherwise (`EINVAL` from a kernel that knows no
/// `sched_setattr`).
pub fn prefer_short_slices(slice: Duration) -> io::Result<()> {
    // SAFETY: `sched_getscheduler(0)` reads the calling thread's policy; it
    // takes no pointer.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    if policy != libc::SCHED_OTHER {
        return Ok(());
    }
    // `getpriority` returns -1 both for nice -1 and for an error: clear
    // errno first and look at it after.
    // SAFETY: `__errno_location` returns the calling thread's errno slot,
    // valid for the thread's lifetime.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: `getpriority(PRIO_PROCESS, 0)` reads the calling thread's
    // nice value (Linux applies it per thread); it takes no pointer.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error().unwrap_or(0) != 0 {
            return Err(e);
        }
    }
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: SCHED_NORMAL,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `sched_setattr(0, attr, 0)` reads `size` bytes of `attr`, a
    // live, initialised `sched_attr` whose `size` is its own size; pid 0 is
    // the calling thread; flags must be 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_nice_value_and_policy() {
        std::thread::spawn(|| {
            // SAFETY: as in `prefer_short_slices`.
            let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            prefer_short_slices(SHORT_SLICE).unwrap();
            // SAFETY: as above.
            let after = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!(before, after);
            // SAFETY: as in `prefer_short_slices`.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
            // The slice, where the kernel shows it (6.12 and later).
            let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
            match sched.lines().find(|l| l.starts_with("se.slice")) {
                Some(line) => {
                    let ns: u64 = line
                        .rsplit(':')
                        .next()
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap();
                    assert_eq!(ns, SHORT_SLICE.as_nanos() as u64, "{line}");
                }
                None => eprintln!(
                    "*** SKIPPED the slice check of a_thread_keeps_its_nice_value_and_policy: \
                     this kernel shows no se.slice ***"
                ),
            }
        })
        .join()
        .unwrap();
    }
}
