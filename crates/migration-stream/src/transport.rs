//! Transports: TCP, Unix socket, file and in-memory (socket pair)
//! connections, each split into boxed read and write halves so a caller can
//! run one reader thread and one writer thread per connection, plus a
//! [`ConnectionHandle`] that shuts the connection down from any other thread
//! (cancel) and sets its link timeout.
//!
//! | transport                | opened by                          | return path | link timeout |
//! |--------------------------|------------------------------------|-------------|--------------|
//! | `tcp:HOST:PORT`          | [`connect`], [`Listener`]          | yes         | yes          |
//! | `unix:PATH`              | [`connect`], [`Listener`]          | yes         | yes          |
//! | in-memory (`memory:a/b`) | [`memory_pair`], [`try_memory_pair`] | yes       | yes          |
//! | `file:PATH`              | [`connect`] (writes), [`Listener`] (reads) | no  | no (no-op)   |
//!
//! The in-memory pair is a Unix socket pair behind the same code as `unix:`,
//! so tests over it see real socket behaviour. Dropping a socket
//! connection's writer shuts its sending direction down (the peer reads end
//! of file); the reader keeps working.
//!
//! # Link timeouts
//!
//! [`ConnectionHandle::set_link_timeout`] bounds how long one read or write
//! waits for the peer (the socket's `SO_RCVTIMEO`/`SO_SNDTIMEO`, shared by
//! both halves). An expired wait fails with [`std::io::ErrorKind::TimedOut`]
//! and a message that says what happened ("the peer sent nothing for
//! 10.0 s", "the peer read nothing for 10.0 s"), which
//! [`crate::Error::kind`] classifies as [`crate::ErrorKind::Link`]. No
//! timeout is set by default.
//!
//! # Accepting the right connection
//!
//! [`Listener::accept`] returns whatever connected first. A destination
//! should use [`Listener::accept_hello`] instead: it reads the preamble of
//! every connection concurrently under a hello timeout, reports and closes
//! those that say nothing, garbage or another role, and returns the first
//! valid one, so a stranger cannot hold the real source out. Both end with
//! [`TransportError::Cancelled`] when a [`ListenerCanceller`] cancels them.
//!
//! ```
//! use std::time::Duration;
//!
//! use migration_stream::{
//!     connect, Hello, Listener, MigrationId, Role, StreamReader, StreamWriter, Record,
//! };
//!
//! # type BoxError = Box<dyn std::error::Error + Send + Sync>;
//! # fn main() -> Result<(), BoxError> {
//! let listener = Listener::bind_str("tcp:127.0.0.1:0")?;
//! let uri = listener.local_uri().clone();
//! let id = MigrationId::generate();
//!
//! // Source: connect, say hello, send the stream.
//! let source = std::thread::spawn(move || -> Result<(), BoxError> {
//!     let conn = connect(&uri, Role::Main)?;
//!     let mut w = StreamWriter::new(conn.writer);
//!     w.write_preamble(&Hello::new(Role::Main, id))?;
//!     w.write_complete()?;
//!     Ok(w.flush()?)
//! });
//!
//! // Destination: the first connection with a valid Main hello.
//! let (conn, hello) = listener.accept_hello(
//!     Role::Main,
//!     Duration::from_secs(10),
//!     &mut |peer, e| eprintln!("rejected {peer}: {e}"),
//! )?;
//! hello.expect(Role::Main, id)?;
//! conn.handle.set_link_timeout(Some(Duration::from_secs(30)))?;
//! let mut r = StreamReader::new(conn.reader);
//! assert_eq!(r.read_record(&())?, Record::Complete);
//! source.join().map_err(|_| "the source thread panicked")??;
//! # Ok(())
//! # }
//! ```
//!
//! # Tuning
//!
//! TCP sockets the source opens for the main channel keep Nagle's
//! algorithm (throughput; [`crate::StreamWriter`] batches into a 1 MiB
//! buffer and flushes explicitly), while preempt and return-path sockets set
//! `TCP_NODELAY` (latency: a faulting vCPU waits on them). Every socket the
//! destination accepts sets `TCP_NODELAY`, since all it sends is return-path
//! messages. The standard library does not expose `SO_SNDBUF`/`SO_RCVBUF`;
//! the kernel's buffer autotuning plus the large user-space buffers of
//! [`crate::StreamWriter`] and [`crate::StreamReader`] stand in for them.
//! For latency, [`ConnectionHandle::limit_backlog`] bounds those buffers
//! (`TCP_NOTSENT_LOWAT` and `SO_SNDBUF`; `SO_SNDBUF` on Unix sockets).
//!
//! A `file:` migration has no return path
//! ([`ConnectionHandle::has_return_path`] is false): the source's
//! connection reads end of file at once, and the destination's discards
//! what it writes.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::error::ErrorKind;
use crate::header::Role;
use crate::uri::{MigrationUri, UriError};

mod hello;
mod link;
mod sockopt;

pub use hello::MAX_PENDING_HELLOS;
use link::{LinkTimeout, Socket, SocketReader, SocketWriter};

/// The backlog bound for the main connection once postcopy starts, for
/// [`ConnectionHandle::limit_backlog`] at both ends: a requested page then
/// waits behind about this much of the background stream rather than the
/// megabytes autotuned buffers hold. The send buffer caps what is in flight
/// at about this much per round trip: 256 KiB keeps a 10 Gbit/s link busy
/// up to a round trip of about 200 us, and is four segments on loopback
/// (64 KiB MSS; with 128 KiB, two segments, the ab guest of `cargo xtask
/// bench --only vs-qemu-postcopy` took more faults, on noisy figures). A
/// requested page then waits behind up to about twice this (in flight and
/// the unsent low watermark): about 0.5 ms at 1 GB/s.
///
/// Not for a main connection beside a postcopy preempt channel: requested
/// pages do not travel on it, and bounding it only slows the background
/// stream, which leaves more pages missing for longer. Measured with
/// `cargo xtask bench --only vs-qemu-postcopy`, 8 rounds each: a 64 KiB bound
/// there gave the ab guest a median blocktime of 163 ms, the kernel's own
/// buffers 44 ms (the bound was on the receive buffer then, whose drops
/// and retransmit timeouts were part of that; see
/// [`ConnectionHandle::limit_backlog`]).
pub const POSTCOPY_BACKLOG: usize = 256 << 10;

/// Why a connection could not be made or accepted.
///
/// [`TransportError::kind`] says whose fault it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URI did not parse.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Connecting failed.
    #[error("cannot connect to {uri}")]
    Connect {
        /// The URI.
        uri: String,
        /// The error of the connect call.
        #[source]
        source: io::Error,
    },
    /// Binding a listener failed.
    #[error("cannot listen on {uri}")]
    Bind {
        /// The URI.
        uri: String,
        /// The error of the bind call.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("cannot accept a connection on {uri}")]
    Accept {
        /// The URI.
        uri: String,
        /// The error of the accept call.
        #[source]
        source: io::Error,
    },
    /// Opening or creating the file of a `file:` URI failed.
    #[error("cannot open migration file {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error of the open call.
        #[source]
        source: io::Error,
    },
    /// Duplicating or configuring a socket failed.
    #[error("cannot set up the socket for {uri}: {what}")]
    Setup {
        /// The URI.
        uri: String,
        /// The step that failed.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The listener was cancelled with [`ListenerCanceller::cancel`].
    #[error("listening on {uri} was cancelled")]
    Cancelled {
        /// The URI.
        uri: String,
    },
    /// A `file:` listener has one connection, already accepted.
    #[error("the file of {uri} was already accepted")]
    Exhausted {
        /// The URI.
        uri: String,
    },
    /// The file of a `file:` listener does not start with a valid preamble
    /// of the expected role ([`Listener::accept_hello`]).
    #[error("migration file {uri} does not start with a valid {expected:?} preamble")]
    FileHello {
        /// The URI.
        uri: String,
        /// The role the caller asked for.
        expected: Role,
        /// What is wrong with the preamble.
        #[source]
        source: crate::Error,
    },
}

impl TransportError {
    /// Whose fault this is, in the terms of [`crate::Error::kind`]:
    ///
    /// - [`TransportError::Connect`] is [`ErrorKind::Link`]: the peer is
    ///   not there (refused, unreachable, timed out), and trying again later
    ///   may work.
    /// - [`TransportError::Accept`], [`TransportError::Bind`],
    ///   [`TransportError::Open`] and [`TransportError::Setup`] are
    ///   [`ErrorKind::Local`]: they fail on this host (a descriptor limit,
    ///   an address in use, a missing file) before any peer is involved.
    /// - [`TransportError::Cancelled`] and [`TransportError::Exhausted`] are
    ///   [`ErrorKind::Local`]: this side's own decision or misuse.
    /// - [`TransportError::Uri`] is [`ErrorKind::Local`]: the caller's input.
    /// - [`TransportError::FileHello`] is [`ErrorKind::Protocol`] when the
    ///   bytes are wrong and also when the file ends before its preamble (a
    ///   file is not a link that can break), [`ErrorKind::Local`] when it
    ///   cannot be read.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Connect { .. } => ErrorKind::Link,
            TransportError::FileHello { source, .. } => match source.kind() {
                ErrorKind::Link => ErrorKind::Protocol,
                kind => kind,
            },
            TransportError::Uri(_)
            | TransportError::Bind { .. }
            | TransportError::Accept { .. }
            | TransportError::Open { .. }
            | TransportError::Setup { .. }
            | TransportError::Cancelled { .. }
            | TransportError::Exhausted { .. } => ErrorKind::Local,
        }
    }
}

/// The read half of a connection.
pub type BoxedReader = Box<dyn Read + Send>;
/// The write half of a connection.
pub type BoxedWriter = Box<dyn Write + Send>;

/// An open connection: independent read and write halves and a handle to
/// shut it down.
///
/// Dropping the `writer` of a socket connection shuts its sending
/// direction down (the peer reads end of file after the bytes already
/// sent), while the `reader` keeps working: the same half-close as when the
/// write half of a split socket is dropped in tokio. The whole socket is
/// closed once all three parts are dropped; [`ConnectionHandle::shutdown`]
/// ends both directions at once.
pub struct Connection {
    /// Bytes from the peer.
    pub reader: BoxedReader,
    /// Bytes to the peer.
    pub writer: BoxedWriter,
    /// Shuts the connection down or tunes it, from any thread.
    pub handle: ConnectionHandle,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum HandleInner {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A second descriptor on the migration file, for `fdatasync`.
    File(File),
}

/// A cloneable, `Send + Sync` handle on a connection.
#[derive(Debug, Clone)]
pub struct ConnectionHandle {
    inner: Arc<HandleInner>,
    peer: Arc<str>,
    /// Shared with the connection's reader and writer.
    timeout: LinkTimeout,
}

impl ConnectionHandle {
    /// Shuts both directions down: a thread blocked reading this connection
    /// (here or at the peer) sees end of file, a writer gets an error. Used
    /// to cancel a migration or to simulate a network failure. A connection
    /// already shut down is not an error. No-op for files.
    pub fn shutdown(&self) -> io::Result<()> {
        let r = match &*self.inner {
            HandleInner::Tcp(s) => s.shutdown(Shutdown::Both),
            HandleInner::Unix(s) => s.shutdown(Shutdown::Both),
            HandleInner::File(_) => Ok(()),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        }
    }

    /// Makes what was written durable. For a `file:` connection this waits until
    /// the file's data is on its storage (`fdatasync`), so a migration reported
    /// complete survives a host crash; call it after the last flush. On sockets
    /// it does nothing: there the destination's confirmation plays that role.
    pub fn sync_data(&self) -> io::Result<()> {
        match &*self.inner {
            HandleInner::File(f) => f.sync_data(),
            _ => Ok(()),
        }
    }

    /// Sets `TCP_NODELAY`; no-op on other transports.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match &*self.inner {
            HandleInner::Tcp(s) => s.set_nodelay(nodelay),
            _ => Ok(()),
        }
    }

    /// Bounds what may queue in this socket's kernel buffers to about
    /// `bytes`, for latency rather than throughput: a message written now
    /// then waits behind at most that much earlier data instead of the
    /// megabytes buffer autotuning allows on a fast link. Postcopy wants
    /// this once it starts (a requested page otherwise queues behind the
    /// background stream's backlog); call it on both ends.
    ///
    /// - TCP: `TCP_NOTSENT_LOWAT` (a write waits while more than `bytes`
    ///   are still unsent) and `SO_SNDBUF` (sent data stays in the send
    ///   buffer until acknowledged, so at most about `bytes` are in flight
    ///   from this end; the kernel turns off its send-buffer autotuning for
    ///   this socket). Not `SO_RCVBUF`: shrinking the window a receiver
    ///   already offered makes it drop what the sender still sends into the
    ///   old one, and the sender retransmits only after its 200 ms minimum
    ///   timeout (on loopback, `TcpExtTCPRcvQDrop` and one `TCPTimeouts` per
    ///   stall: postcopy faults of 200 ms and more).
    /// - Unix sockets: `SO_SNDBUF` (what this end's writes may have queued
    ///   at the peer).
    /// - Files: no-op.
    ///
    /// The limit applies from the next write or window update on and stays
    /// for the rest of the connection; the kernel may round it up (Linux
    /// doubles buffer sizes for its bookkeeping). A bound too small for the
    /// link's bandwidth-delay product costs throughput. Fails with
    /// [`io::ErrorKind::InvalidInput`] if `bytes` does not fit a C `int`.
    pub fn limit_backlog(&self, bytes: usize) -> io::Result<()> {
        use sockopt::{set_int, IntOption};
        match &*self.inner {
            HandleInner::Tcp(s) => {
                set_int(s, IntOption::TcpNotSentLowat, bytes)?;
                set_int(s, IntOption::SendBuffer, bytes)
            }
            HandleInner::Unix(s) => set_int(s, IntOption::SendBuffer, bytes),
            HandleInner::File(_) => Ok(()),
        }
    }

    /// Sets how long one read or write of this connection may wait for the
    /// peer before it fails; `None` (the default) waits for ever.
    ///
    /// These are the socket's receive and send timeouts (`SO_RCVTIMEO`,
    /// `SO_SNDTIMEO`). They belong to the socket, so they apply to the
    /// connection's reader, its writer and every clone of this handle, from
    /// the next read or write on. A read that waits longer fails with an
    /// [`io::Error`] of kind [`io::ErrorKind::TimedOut`] saying "the peer
    /// sent nothing for 10.0 s", a write (once the socket buffers are full)
    /// "the peer read nothing for 10.0 s"; [`crate::Error::kind`] calls both
    /// [`crate::ErrorKind::Link`]. The timeout bounds each wait, not a
    /// whole transfer: a peer that sends a little more often than the
    /// timeout never trips it. A read that timed out may have consumed part
    /// of a frame, so treat the stream as broken.
    ///
    /// A zero duration is refused with [`io::ErrorKind::InvalidInput`], as
    /// by the standard library. No-op for files (a file never stalls on a
    /// peer).
    pub fn set_link_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &*self.inner {
            HandleInner::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
            }
            HandleInner::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
            }
            HandleInner::File(_) => return Ok(()),
        }
        self.timeout.set(timeout);
        Ok(())
    }

    /// The link timeout set by [`ConnectionHandle::set_link_timeout`], to
    /// the millisecond; always `None` for files.
    pub fn link_timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    /// Whether the peer can answer on this connection: true for sockets,
    /// false for a `file:` connection (the source's reader is at end of
    /// file at once, the destination's writer discards what it is given).
    pub fn has_return_path(&self) -> bool {
        !matches!(*self.inner, HandleInner::File(_))
    }

    /// A description of the peer, for logs (`tcp:1.2.3.4:5`, `unix:PATH`,
    /// `file:PATH`, `memory:a`).
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

/// Splits a connected socket into a [`Connection`]: the reader and the
/// handle get clones of its descriptor.
fn socket_connection<S: Socket>(
    stream: S,
    uri: &str,
    peer: String,
    inner: fn(S) -> HandleInner,
) -> Result<Connection, TransportError> {
    let setup = |source| TransportError::Setup {
        uri: uri.into(),
        what: "clone the socket",
        source,
    };
    let reader = stream.try_clone().map_err(setup)?;
    let handle = stream.try_clone().map_err(setup)?;
    let timeout = LinkTimeout::default();
    Ok(Connection {
        reader: Box::new(SocketReader {
            socket: reader,
            timeout: timeout.clone(),
        }),
        writer: Box::new(SocketWriter {
            socket: stream,
            timeout: timeout.clone(),
        }),
        handle: ConnectionHandle {
            inner: Arc::new(inner(handle)),
            peer: peer.into(),
            timeout,
        },
    })
}

fn tcp_connection(
    stream: TcpStream,
    uri: &str,
    nodelay: bool,
) -> Result<Connection, TransportError> {
    stream
        .set_nodelay(nodelay)
        .map_err(|source| TransportError::Setup {
            uri: uri.into(),
            what: "set TCP_NODELAY",
            source,
        })?;
    let peer = stream
        .peer_addr()
        .map(|a| {
            MigrationUri::Tcp {
                host: a.ip().to_string(),
                port: a.port(),
            }
            .to_string()
        })
        .unwrap_or_else(|_| uri.to_string());
    socket_connection(stream, uri, peer, HandleInner::Tcp)
}

/// `peer` names the other end: the path for a `unix:` URI (a connecting
/// socket has no address of its own).
fn unix_connection(
    stream: UnixStream,
    uri: &str,
    peer: &str,
) -> Result<Connection, TransportError> {
    socket_connection(stream, uri, peer.into(), HandleInner::Unix)
}

fn host_or<'a>(host: &'a str, default: &'static str) -> &'a str {
    if host.is_empty() {
        default
    } else {
        host
    }
}

/// Opens an outgoing connection for a channel of `role` (the source's main
/// or preempt channel). TCP sets `TCP_NODELAY` for every role but
/// [`Role::Main`]. A `file:` URI creates (truncates) the file.
pub fn connect(uri: &MigrationUri, role: Role) -> Result<Connection, TransportError> {
    let text = uri.to_string();
    match uri {
        MigrationUri::Tcp { host, port } => {
            let stream =
                TcpStream::connect((host_or(host, "localhost"), *port)).map_err(|source| {
                    TransportError::Connect {
                        uri: text.clone(),
                        source,
                    }
                })?;
            tcp_connection(stream, &text, role != Role::Main)
        }
        MigrationUri::Unix { path } => {
            let stream = UnixStream::connect(path).map_err(|source| TransportError::Connect {
                uri: text.clone(),
                source,
            })?;
            unix_connection(stream, &text, &text)
        }
        MigrationUri::File { path } => {
            let open_err = |source| TransportError::Open {
                path: path.clone(),
                source,
            };
            let file = File::create(path).map_err(open_err)?;
            let sync = file.try_clone().map_err(open_err)?;
            Ok(Connection {
                reader: Box::new(io::empty()),
                writer: Box::new(file),
                handle: ConnectionHandle {
                    inner: Arc::new(HandleInner::File(sync)),
                    peer: text.into(),
                    timeout: LinkTimeout::default(),
                },
            })
        }
    }
}

/// Parses `uri` and connects; see [`connect`].
pub fn connect_str(uri: &str, role: Role) -> Result<Connection, TransportError> {
    connect(&uri.parse()?, role)
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    File(Mutex<Option<File>>),
}

/// A listening endpoint of the destination.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
    uri: MigrationUri,
    cancelled: Arc<AtomicBool>,
}

/// Cancels a blocked [`Listener::accept`] from another thread.
#[derive(Debug, Clone)]
pub struct ListenerCanceller {
    uri: MigrationUri,
    cancelled: Arc<AtomicBool>,
}

impl ListenerCanceller {
    /// Makes the pending and every later [`Listener::accept`] and
    /// [`Listener::accept_hello`] return [`TransportError::Cancelled`]. A
    /// blocked `accept` is woken by a throw-away connection to the
    /// listener; `accept_hello` notices within its poll interval and closes
    /// the connections whose hello it was still waiting for.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        match &self.uri {
            MigrationUri::Tcp { host, port } => {
                let host = match host.as_str() {
                    "" | "0.0.0.0" => "127.0.0.1",
                    "::" => "::1",
                    h => h,
                };
                // Best effort: if the wake-up connection fails the listener
                // is gone or unreachable, and accept is not blocked on it.
                let _ = TcpStream::connect((host, *port));
            }
            MigrationUri::Unix { path } => {
                let _ = UnixStream::connect(path);
            }
            MigrationUri::File { .. } => {}
        }
    }
}

fn remove_stale_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

impl Listener {
    /// Listens on `uri`. A `tcp:` port of 0 picks a free port (see
    /// [`Listener::local_uri`]); a stale Unix socket file at the path is
    /// replaced (never any other kind of file); a `file:` URI opens the file
    /// for reading.
    pub fn bind(uri: &MigrationUri) -> Result<Self, TransportError> {
        let text = uri.to_string();
        let bind_err = |source| TransportError::Bind {
            uri: text.clone(),
            source,
        };
        let (inner, uri) = match uri {
            MigrationUri::Tcp { host, port } => {
                let l = TcpListener::bind((host_or(host, "0.0.0.0"), *port)).map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                (
                    ListenerInner::Tcp(l),
                    MigrationUri::Tcp {
                        host: if host.is_empty() {
                            String::new()
                        } else {
                            local.ip().to_string()
                        },
                        port: local.port(),
                    },
                )
            }
            MigrationUri::Unix { path } => {
                remove_stale_socket(path);
                let l = UnixListener::bind(path).map_err(bind_err)?;
                (ListenerInner::Unix(l, path.clone()), uri.clone())
            }
            MigrationUri::File { path } => {
                let f = File::open(path).map_err(|source| TransportError::Open {
                    path: path.clone(),
                    source,
                })?;
                (ListenerInner::File(Mutex::new(Some(f))), uri.clone())
            }
        };
        Ok(Listener {
            inner,
            uri,
            cancelled: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Parses `uri` and binds; see [`Listener::bind`].
    pub fn bind_str(uri: &str) -> Result<Self, TransportError> {
        Self::bind(&uri.parse()?)
    }

    /// The URI a peer connects to (with the real port if 0 was asked for).
    pub fn local_uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// A handle that cancels `accept` from another thread.
    pub fn canceller(&self) -> ListenerCanceller {
        ListenerCanceller {
            uri: self.uri.clone(),
            cancelled: self.cancelled.clone(),
        }
    }

    fn check_cancelled(&self) -> Result<(), TransportError> {
        if self.cancelled.load(Ordering::SeqCst) {
            Err(TransportError::Cancelled {
                uri: self.uri.to_string(),
            })
        } else {
            Ok(())
        }
    }

    /// Waits for the next connection. TCP connections get `TCP_NODELAY`
    /// (the destination only sends return-path messages). A `file:`
    /// listener yields its file once.
    ///
    /// It returns whoever connected first, before anything was read: a
    /// destination waiting for a source should use
    /// [`Listener::accept_hello`], which a silent or foreign connection
    /// cannot hold up.
    pub fn accept(&self) -> Result<Connection, TransportError> {
        self.check_cancelled()?;
        let text = self.uri.to_string();
        let accept_err = |source| TransportError::Accept {
            uri: text.clone(),
            source,
        };
        match &self.inner {
            ListenerInner::Tcp(l) => {
                let (s, _) = l.accept().map_err(accept_err)?;
                self.check_cancelled()?;
                tcp_connection(s, &text, true)
            }
            ListenerInner::Unix(l, _) => {
                let (s, _) = l.accept().map_err(accept_err)?;
                self.check_cancelled()?;
                unix_connection(s, &text, &text)
            }
            ListenerInner::File(f) => {
                let file = f
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .ok_or(TransportError::Exhausted { uri: text.clone() })?;
                let sync = file.try_clone().map_err(accept_err)?;
                Ok(Connection {
                    reader: Box::new(file),
                    writer: Box::new(io::sink()),
                    handle: ConnectionHandle {
                        inner: Arc::new(HandleInner::File(sync)),
                        peer: text.into(),
                        timeout: LinkTimeout::default(),
                    },
                })
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix(_, path) = &self.inner {
            remove_stale_socket(path);
        }
    }
}

/// Two connected in-process endpoints: what one writes the other reads.
///
/// They are the two ends of a Unix socket pair (`socketpair(2)`) behind the
/// same [`Connection`] and [`ConnectionHandle`] as a `unix:` connection, so
/// they behave exactly like a real socket: the kernel's socket buffers
/// bound what is in flight, and either handle's
/// [`ConnectionHandle::shutdown`] ends both directions for both ends. Their
/// peers are named `memory:a` and `memory:b`.
pub fn try_memory_pair() -> Result<(Connection, Connection), TransportError> {
    let (a, b) = UnixStream::pair().map_err(|source| TransportError::Setup {
        uri: "memory:".into(),
        what: "create a socket pair",
        source,
    })?;
    Ok((
        unix_connection(a, "memory:", "memory:b")?,
        unix_connection(b, "memory:", "memory:a")?,
    ))
}

/// [`try_memory_pair`] for tests and in-process use, where running out of
/// file descriptors is a bug of the caller's environment.
///
/// # Panics
///
/// If the process cannot open the four descriptors (the pair and one clone
/// of each end: `EMFILE`/`ENFILE`). Code that must not panic calls
/// [`try_memory_pair`].
pub fn memory_pair() -> (Connection, Connection) {
    match try_memory_pair() {
        Ok(pair) => pair,
        // The signature without `Result` is kept for its many test callers;
        // the panic is documented above and `try_memory_pair` is the
        // fallible form.
        Err(e) => panic!("cannot create an in-memory connection pair: {e}"),
    }
}

/// Resolves a TCP URI's host and port, for callers that need the address.
pub fn resolve_tcp(uri: &MigrationUri) -> io::Result<Vec<std::net::SocketAddr>> {
    match uri {
        MigrationUri::Tcp { host, port } => Ok((host_or(host, "localhost"), *port)
            .to_socket_addrs()?
            .collect()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a tcp: URI",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::table;
    use crate::header::{read_preamble, Hello, MigrationId};
    use crate::record::{Record, StreamReader, StreamWriter};
    use crate::retpath::{ReturnMessage, ReturnPathReader, ReturnPathWriter};
    use crate::{BlockId, Error};
    use std::thread;
    use std::time::Duration;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("migration-stream-{}-{name}", std::process::id()))
    }

    /// Source sends a preamble, a page and Complete on `src`; destination
    /// answers with a return-path preamble and Shut on the same connection.
    fn exchange(src: Connection, dst: Connection) {
        let id = MigrationId::generate();
        let t = table();
        let Connection {
            reader: src_r,
            writer: src_w,
            ..
        } = src;
        let source = thread::spawn(move || {
            let mut w = StreamWriter::new(src_w);
            w.write_preamble(&Hello::new(Role::Main, id)).unwrap();
            w.write_page(BlockId(0), 4096, &[0x42; 4096]).unwrap();
            w.write_complete().unwrap();
            w.flush().unwrap();
            let mut rp = src_r;
            read_preamble(&mut rp)
                .unwrap()
                .expect(Role::ReturnPath, id)
                .unwrap();
            let mut r = ReturnPathReader::new(rp);
            assert_eq!(
                r.read_message(&table()).unwrap(),
                ReturnMessage::Shut { status: 0 }
            );
        });
        let Connection {
            reader: mut dst_r,
            writer: dst_w,
            ..
        } = dst;
        let hello = read_preamble(&mut dst_r).unwrap();
        hello.expect(Role::Main, id).unwrap();
        let mut r = StreamReader::new(dst_r);
        assert!(matches!(r.read_record(&t).unwrap(), Record::Page(_)));
        let mut page = [0u8; 4096];
        r.read_page_into(&mut page).unwrap();
        assert_eq!(page, [0x42; 4096]);
        assert_eq!(r.read_record(&t).unwrap(), Record::Complete);
        let mut w = ReturnPathWriter::new(dst_w);
        w.write_preamble(&Hello::new(Role::ReturnPath, id)).unwrap();
        w.send(&ReturnMessage::Shut { status: 0 }).unwrap();
        source.join().unwrap();
    }

    /// Writes to `w` until a write times out (the peer reads nothing);
    /// returns the bytes it took.
    fn fill(w: &mut BoxedWriter) -> usize {
        let chunk = [0x5a; 4096];
        let mut taken = 0;
        loop {
            match w.write(&chunk) {
                Ok(n) => taken += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                    return taken;
                }
            }
        }
    }

    #[test]
    fn limit_backlog_bounds_what_waits_for_a_peer_that_does_not_read() {
        // Measured on Linux 6.x loopback without the limit: TCP takes 4 MiB
        // (send-buffer autotuning), a Unix socket 176 KiB (the default
        // `SO_SNDBUF`). With it: the window, the unsent low watermark and
        // the kernel's doubling for TCP; the doubled send buffer, which
        // counts each buffer's overhead too, for Unix.
        const LIMIT: usize = 64 << 10;
        for (transport, bound) in [("unix", 2 * LIMIT), ("tcp", 4 * LIMIT)] {
            let dir =
                std::env::temp_dir().join(format!("ms-backlog-{}-{transport}", std::process::id()));
            let _ = std::fs::remove_file(&dir);
            let bind = match transport {
                "tcp" => "tcp:127.0.0.1:0".to_owned(),
                _ => format!("unix:{}", dir.display()),
            };
            let l = Listener::bind_str(&bind).unwrap();
            let uri = l.local_uri().clone();
            let client = thread::spawn(move || connect(&uri, Role::Main).unwrap());
            let dst = l.accept().unwrap();
            let mut src = client.join().unwrap();
            src.handle.limit_backlog(LIMIT).unwrap();
            dst.handle.limit_backlog(LIMIT).unwrap();
            // The timeout only tells a writer that blocks: nothing is read.
            src.handle
                .set_link_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let taken = fill(&mut src.writer);
            assert!(
                taken <= bound,
                "{transport}: {taken} bytes queued with a backlog limit of {LIMIT}"
            );
            // What was queued still arrives, and more follows once read.
            let mut r = dst.reader;
            let mut buf = vec![0; taken];
            r.read_exact(&mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0x5a));
            let _ = std::fs::remove_file(&dir);
        }
    }

    #[test]
    fn limit_backlog_is_a_no_op_on_files() {
        let path = std::env::temp_dir().join(format!("ms-backlog-{}.bin", std::process::id()));
        let conn = connect_str(&format!("file:{}", path.display()), Role::Main).unwrap();
        conn.handle.limit_backlog(LIMIT_ANY).unwrap();
        drop(conn);
        std::fs::remove_file(&path).unwrap();
    }

    const LIMIT_ANY: usize = 4096;

    #[test]
    fn tcp_loopback_both_directions() {
        let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
        let uri = l.local_uri().clone();
        assert!(matches!(uri, MigrationUri::Tcp { port, .. } if port != 0));
        let client = thread::spawn(move || connect(&uri, Role::Main).unwrap());
        let dst = l.accept().unwrap();
        let src = client.join().unwrap();
        assert!(src.handle.peer().starts_with("tcp:127.0.0.1:"));
        exchange(src, dst);
    }

    #[test]
    fn unix_socket_both_directions() {
        let path = temp_path("unix.sock");
        let uri = MigrationUri::Unix { path: path.clone() };
        let l = Listener::bind(&uri).unwrap();
        let client = thread::spawn(move || connect(&uri, Role::Main).unwrap());
        let dst = l.accept().unwrap();
        exchange(client.join().unwrap(), dst);
        drop(l);
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn memory_pair_both_directions() {
        let (a, b) = memory_pair();
        exchange(a, b);
    }

    #[test]
    fn file_round_trip_without_return_path() {
        let path = temp_path("stream.bin");
        let uri = MigrationUri::File { path: path.clone() };
        let id = MigrationId::generate();
        {
            let c = connect(&uri, Role::Main).unwrap();
            let mut w = StreamWriter::new(c.writer);
            w.write_preamble(&Hello::new(Role::Main, id)).unwrap();
            w.write_zero_page(BlockId(0), 0).unwrap();
            w.write_complete().unwrap();
            w.flush().unwrap();
            // The handle syncs the same file: the 29-byte preamble and the frames are in it.
            c.handle.sync_data().unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() > 29);
            let mut rp = c.reader;
            assert!(matches!(read_preamble(&mut rp), Err(Error::Closed)));
        }
        let l = Listener::bind(&uri).unwrap();
        let mut c = l.accept().unwrap();
        assert!(matches!(l.accept(), Err(TransportError::Exhausted { .. })));
        assert_eq!(read_preamble(&mut c.reader).unwrap().migration_id, id);
        let mut r = StreamReader::new(c.reader);
        assert!(matches!(
            r.read_record(&table()).unwrap(),
            Record::ZeroPage(_)
        ));
        assert_eq!(r.read_record(&table()).unwrap(), Record::Complete);
        // Writes to a file's return path go nowhere.
        c.writer.write_all(b"ignored").unwrap();
        c.handle.shutdown().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    fn blocked_reader_woken_by_shutdown(a: Connection, b: Connection) {
        let handle = a.handle.clone();
        let mut reader = a.reader;
        let t = thread::spawn(move || {
            let mut buf = [0u8; 16];
            reader.read(&mut buf)
        });
        thread::sleep(Duration::from_millis(50));
        handle.shutdown().unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 0, "reader sees end of file");
        let mut w = a.writer;
        assert!(w.write_all(&[0; 8]).and_then(|()| w.flush()).is_err());
        // Shutting down twice is fine.
        handle.shutdown().unwrap();
        drop(b);
    }

    #[test]
    fn shutdown_cancels_tcp() {
        let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
        let a = connect(l.local_uri(), Role::PostcopyPreempt).unwrap();
        let b = l.accept().unwrap();
        blocked_reader_woken_by_shutdown(a, b);
    }

    #[test]
    fn shutdown_cancels_memory() {
        let (a, b) = memory_pair();
        assert_eq!(a.handle.peer(), "memory:b");
        assert_eq!(b.handle.peer(), "memory:a");
        let mut b_reader = b.reader;
        a.handle.shutdown().unwrap();
        // The peer sees end of file too, and its writes fail.
        let mut buf = [0u8; 1];
        assert_eq!(b_reader.read(&mut buf).unwrap(), 0);
        let mut b_writer = b.writer;
        assert!(b_writer.write_all(&[0; 8]).is_err());
        let (a, b) = memory_pair();
        blocked_reader_woken_by_shutdown(a, b);
    }

    /// Dropping the writer tells the peer "no more bytes" while the
    /// connection's reader goes on working, on every socket transport.
    fn dropping_the_writer_half_closes(a: Connection, b: Connection) {
        let Connection {
            reader: mut a_r,
            writer: mut a_w,
            handle: _a_handle,
        } = a;
        let Connection {
            reader: mut b_r,
            writer: mut b_w,
            ..
        } = b;
        a_w.write_all(b"last words").unwrap();
        drop(a_w);
        let mut got = Vec::new();
        b_r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        b_w.write_all(b"reply").unwrap();
        b_w.flush().unwrap();
        let mut reply = [0u8; 5];
        a_r.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"reply");
    }

    #[test]
    fn dropping_the_writer_half_closes_memory_and_tcp() {
        let (a, b) = memory_pair();
        dropping_the_writer_half_closes(a, b);
        let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
        let a = connect(l.local_uri(), Role::Main).unwrap();
        let b = l.accept().unwrap();
        dropping_the_writer_half_closes(a, b);
    }

    #[test]
    fn accept_can_be_cancelled() {
        let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
        let c = l.canceller();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            c.cancel();
        });
        assert!(matches!(l.accept(), Err(TransportError::Cancelled { .. })));
        t.join().unwrap();
        assert!(matches!(l.accept(), Err(TransportError::Cancelled { .. })));
    }

    #[test]
    fn transport_errors_say_whose_fault_they_are() {
        // Nobody listens on the port of a listener that was dropped.
        let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
        let uri = l.local_uri().clone();
        drop(l);
        let e = connect(&uri, Role::Main).unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Link);

        let e = connect_str("tcp:127.0.0.1", Role::Main).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Local);
        let e = Listener::bind_str("file:/nonexistent-dir/x").unwrap_err();
        assert!(matches!(e, TransportError::Open { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Local);
        let taken = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
        let e = Listener::bind(taken.local_uri()).unwrap_err();
        assert!(matches!(e, TransportError::Bind { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Local);
        taken.canceller().cancel();
        let e = taken.accept().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Local);
    }

    #[test]
    fn connect_errors_are_typed() {
        assert!(matches!(
            connect_str("tcp:127.0.0.1", Role::Main),
            Err(TransportError::Uri(UriError::MissingPort { .. }))
        ));
        let missing = temp_path("no-such.sock");
        assert!(matches!(
            connect(&MigrationUri::Unix { path: missing }, Role::Main),
            Err(TransportError::Connect { .. })
        ));
        assert!(matches!(
            Listener::bind_str("file:/nonexistent-dir/x"),
            Err(TransportError::Open { .. })
        ));
        assert!(!resolve_tcp(&"tcp:127.0.0.1:1".parse().unwrap())
            .unwrap()
            .is_empty());
    }
}
