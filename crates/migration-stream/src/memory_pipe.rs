//! An in-process, blocking, bounded byte pipe and a bidirectional pair
//! built from two of them, for tests.
//!
//! It behaves like a socket: a read blocks until bytes arrive and returns
//! end of file once the writer is gone and the bytes are drained; a write
//! blocks while the pipe is full and fails with `BrokenPipe` once the reader
//! is gone; [`PipeShutdown::shutdown`] (also reachable through
//! [`crate::ConnectionHandle::shutdown`]) wakes both sides: readers see end
//! of file, writers an error. Built on `std::sync::{Mutex, Condvar}`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Default capacity of a pipe: enough for several page records in flight.
pub const DEFAULT_PIPE_CAPACITY: usize = 1 << 20;

#[derive(Debug)]
struct State {
    buf: VecDeque<u8>,
    capacity: usize,
    writer_gone: bool,
    reader_gone: bool,
    shut: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; a poisoned state is still
        // consistent, so keep going rather than propagate a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cond.wait(g).unwrap_or_else(PoisonError::into_inner)
    }
}

/// The read end of a [`pipe`].
#[derive(Debug)]
pub struct PipeReader {
    shared: Arc<Shared>,
}

/// The write end of a [`pipe`].
#[derive(Debug)]
pub struct PipeWriter {
    shared: Arc<Shared>,
}

/// Shuts a pipe down from any thread.
#[derive(Debug, Clone)]
pub struct PipeShutdown {
    shared: Arc<Shared>,
}

/// A one-way pipe holding at most `capacity` bytes (at least 1).
pub fn pipe(capacity: usize) -> (PipeReader, PipeWriter) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: VecDeque::new(),
            capacity: capacity.max(1),
            writer_gone: false,
            reader_gone: false,
            shut: false,
        }),
        cond: Condvar::new(),
    });
    (
        PipeReader {
            shared: shared.clone(),
        },
        PipeWriter { shared },
    )
}

impl PipeReader {
    /// A handle that shuts this pipe down.
    pub fn shutdown_handle(&self) -> PipeShutdown {
        PipeShutdown {
            shared: self.shared.clone(),
        }
    }
}

impl PipeWriter {
    /// A handle that shuts this pipe down.
    pub fn shutdown_handle(&self) -> PipeShutdown {
        PipeShutdown {
            shared: self.shared.clone(),
        }
    }
}

impl PipeShutdown {
    /// Wakes every blocked reader (end of file) and writer (`BrokenPipe`);
    /// later reads return end of file at once, later writes fail.
    pub fn shutdown(&self) {
        self.shared.lock().shut = true;
        self.shared.cond.notify_all();
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut g = self.shared.lock();
        loop {
            if g.shut {
                return Ok(0);
            }
            if !g.buf.is_empty() {
                let n = out.len().min(g.buf.len());
                for (dst, src) in out.iter_mut().zip(g.buf.drain(..n)) {
                    *dst = src;
                }
                self.shared.cond.notify_all();
                return Ok(n);
            }
            if g.writer_gone {
                return Ok(0);
            }
            g = self.shared.wait(g);
        }
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut g = self.shared.lock();
        loop {
            if g.shut || g.reader_gone {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "memory pipe closed",
                ));
            }
            let space = g.capacity - g.buf.len();
            if space > 0 {
                let n = space.min(data.len());
                g.buf.extend(&data[..n]);
                self.shared.cond.notify_all();
                return Ok(n);
            }
            g = self.shared.wait(g);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        self.shared.lock().reader_gone = true;
        self.shared.cond.notify_all();
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        self.shared.lock().writer_gone = true;
        self.shared.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn bytes_flow_and_writer_drop_is_eof() {
        let (mut r, mut w) = pipe(16);
        let t = thread::spawn(move || {
            for i in 0..100u8 {
                w.write_all(&[i; 7]).unwrap();
            }
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got.len(), 700);
        assert!(got.chunks(7).enumerate().all(|(i, c)| c == [i as u8; 7]));
    }

    #[test]
    fn reader_drop_breaks_writer() {
        let (r, mut w) = pipe(4);
        drop(r);
        assert_eq!(w.write(&[1]).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn shutdown_wakes_blocked_reader_and_writer() {
        let (mut r, mut w) = pipe(4);
        let shut = r.shutdown_handle();
        w.write_all(&[0; 4]).unwrap();
        let (mut r2, w2) = pipe(4);
        let shut2 = w2.shutdown_handle();
        let writer = thread::spawn(move || w.write_all(&[1; 8]));
        let reader = thread::spawn(move || {
            let mut b = [0u8; 1];
            r2.read(&mut b)
        });
        thread::sleep(Duration::from_millis(50));
        shut.shutdown();
        shut2.shutdown();
        assert_eq!(
            writer.join().unwrap().unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        assert_eq!(reader.join().unwrap().unwrap(), 0);
        let mut b = [0u8; 1];
        assert_eq!(r.read(&mut b).unwrap(), 0);
        drop(w2);
    }
}
