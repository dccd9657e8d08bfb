//! The socket halves of a connection and the link timeout they share.
//!
//! A socket connection is three descriptors on one socket: the reader's,
//! the writer's and the handle's. Socket options such as `SO_RCVTIMEO`
//! belong to the socket, so the handle sets them for all three; the halves
//! only need the value, to turn the kernel's bare `EAGAIN` after a timeout
//! into an error that says what happened and after how long.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a connection needs of the socket types it wraps.
pub(super) trait Socket: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl Socket for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// The link timeout of one connection, shared by its handle and halves.
///
/// Whole milliseconds (at least 1), 0 for none. The socket options hold the
/// real value; this copy only words the error, so a millisecond is
/// precision enough.
#[derive(Debug, Clone, Default)]
pub(super) struct LinkTimeout(Arc<AtomicU64>);

impl LinkTimeout {
    pub(super) fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub(super) fn set(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.0.store(ms, Ordering::Relaxed);
    }

    /// Turns the error of a socket read or write that the kernel ended
    /// because its timeout expired (`EAGAIN`, or `ETIMEDOUT`) into a
    /// `TimedOut` error saying the peer `did` nothing for how long. Any
    /// other error passes unchanged.
    fn convert(&self, e: io::Error, did: &str) -> io::Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                let msg = match self.get() {
                    Some(t) => format!("the peer {did} for {}", DisplayDuration(t)),
                    // Cleared while the call was waiting.
                    None => format!("the peer {did} within the link timeout"),
                };
                io::Error::new(io::ErrorKind::TimedOut, msg)
            }
            _ => e,
        }
    }
}

/// A timeout as an operator reads it: `10.0 s`, `0.2 s`, or `50 ms` below a
/// tenth of a second.
pub(super) struct DisplayDuration(pub(super) Duration);

impl std::fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 >= Duration::from_millis(100) {
            write!(f, "{:.1} s", self.0.as_secs_f64())
        } else {
            write!(f, "{} ms", self.0.as_millis())
        }
    }
}

/// The read half of a socket connection.
pub(super) struct SocketReader<S: Socket> {
    pub(super) socket: S,
    pub(super) timeout: LinkTimeout,
}

impl<S: Socket> Read for SocketReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket
            .read(buf)
            .map_err(|e| self.timeout.convert(e, "sent nothing"))
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.socket
            .read_vectored(bufs)
            .map_err(|e| self.timeout.convert(e, "sent nothing"))
    }
}

/// The write half of a socket connection. The reader and the handle hold
/// their own descriptors on the socket, so closing this one alone would
/// not tell the peer anything: dropping it shuts the sending direction down
/// instead, and the peer reads end of file once it has read what was sent.
pub(super) struct SocketWriter<S: Socket> {
    pub(super) socket: S,
    pub(super) timeout: LinkTimeout,
}

impl<S: Socket> Write for SocketWriter<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket
            .write(buf)
            .map_err(|e| self.timeout.convert(e, "read nothing"))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.socket
            .write_vectored(bufs)
            .map_err(|e| self.timeout.convert(e, "read nothing"))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket
            .flush()
            .map_err(|e| self.timeout.convert(e, "read nothing"))
    }
}

impl<S: Socket> Drop for SocketWriter<S> {
    fn drop(&mut self) {
        // Best effort: a socket already shut down or reset has nothing left
        // to tell the peer.
        let _ = self.socket.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_as_an_operator_expects() {
        let t = LinkTimeout::default();
        assert_eq!(t.get(), None);
        t.set(Some(Duration::from_secs(10)));
        assert_eq!(t.get(), Some(Duration::from_secs(10)));
        let e = t.convert(io::ErrorKind::WouldBlock.into(), "sent nothing");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "the peer sent nothing for 10.0 s");
        t.set(Some(Duration::from_micros(10)));
        assert_eq!(t.get(), Some(Duration::from_millis(1)), "rounded up");
        let e = t.convert(io::ErrorKind::TimedOut.into(), "read nothing");
        assert_eq!(e.to_string(), "the peer read nothing for 1 ms");
        t.set(Some(Duration::MAX));
        assert!(t.get().is_some());
        t.set(None);
        let e = t.convert(io::ErrorKind::WouldBlock.into(), "sent nothing");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Other errors are left alone.
        let e = t.convert(io::ErrorKind::BrokenPipe.into(), "read nothing");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(
            DisplayDuration(Duration::from_millis(1500)).to_string(),
            "1.5 s"
        );
    }
}
