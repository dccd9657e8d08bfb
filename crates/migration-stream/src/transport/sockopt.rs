//! The two socket options the standard library does not expose and
//! [`super::ConnectionHandle::limit_backlog`] sets: `SO_SNDBUF` (how much
//! the kernel buffers for a socket's writes) and `TCP_NOTSENT_LOWAT` (how
//! much written data may wait unsent). The only unsafe code of this crate:
//! one `setsockopt` call on a descriptor the caller owns.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// A socket option at a level: what `setsockopt` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IntOption {
    /// `SOL_SOCKET`/`SO_SNDBUF`.
    SendBuffer,
    /// `IPPROTO_TCP`/`TCP_NOTSENT_LOWAT` (TCP sockets only).
    TcpNotSentLowat,
}

impl IntOption {
    fn level_name(self) -> (libc::c_int, libc::c_int) {
        match self {
            IntOption::SendBuffer => (libc::SOL_SOCKET, libc::SO_SNDBUF),
            IntOption::TcpNotSentLowat => (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
        }
    }
}

/// Sets an integer socket option on `socket`. A value above `c_int::MAX`
/// is refused with [`io::ErrorKind::InvalidInput`].
pub(super) fn set_int(socket: &impl AsFd, option: IntOption, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{value} bytes do not fit a socket option"),
        )
    })?;
    let (level, name) = option.level_name();
    let fd = socket.as_fd();
    // SAFETY: `fd` is an open descriptor borrowed from `socket` for the
    // whole call (`AsFd`), so the kernel acts on the caller's socket and no
    // other; `optval` points to a live, initialised `c_int` on this stack
    // frame and `optlen` is exactly its size, which is what these three
    // options read; the kernel copies the value in and keeps no pointer. A
    // wrong option for the socket type only makes the call fail (checked).
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast::<libc::c_void>(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
                .expect("4 fits a socklen_t"),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn sets_the_buffer_and_the_low_watermark_of_a_tcp_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_int(&s, IntOption::SendBuffer, 64 << 10).unwrap();
        set_int(&s, IntOption::TcpNotSentLowat, 16 << 10).unwrap();
        let e = set_int(&s, IntOption::SendBuffer, usize::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_tcp_option_on_a_unix_socket_is_an_error() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(set_int(&a, IntOption::TcpNotSentLowat, 16 << 10).is_err());
        set_int(&a, IntOption::SendBuffer, 64 << 10).unwrap();
    }
}
