//! [`Listener::accept_hello`]: the destination's accept that only returns
//! a connection once it has said the expected hello.
//!
//! A destination that accepted one connection and then read its preamble
//! could be held up by anyone able to connect: a port scanner, a half-dead
//! earlier source, an attacker that connects and sends nothing. Here every
//! accepted connection gets a scoped thread that reads its preamble under
//! a deadline, while the calling thread goes on accepting:
//!
//! ```text
//!  caller's thread (accept loop)            one scoped thread per connection
//!  -----------------------------            --------------------------------
//!  accept (non-blocking) --new conn--> spawn ---> read preamble by deadline
//!    |  more than MAX_PENDING_HELLOS?                 |
//!    |    -> on_reject, close                         | Ok(hello of `role`)
//!    v                                                | or Err(why)
//!  wait for an outcome (poll interval) <--channel-----+
//!    Err  -> on_reject, close, go on
//!    Ok   -> shut the other pending connections down, join every thread,
//!            return (connection, hello)
//!  cancelled -> same clean-up, return Cancelled
//! ```
//!
//! The accept loop polls (the listener is non-blocking while it runs) rather
//! than blocking in `accept(2)`: a blocked accept can only be woken by a
//! connection to the listener's own address, which may not be reachable
//! (a replaced Unix socket path, a firewall), and the loop must never be
//! left waiting for a thread it cannot wake.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::link::DisplayDuration;
use super::{
    tcp_connection, unix_connection, Connection, ConnectionHandle, Listener, ListenerInner,
    TransportError,
};
use crate::error::{Error, ErrorKind};
use crate::header::{read_preamble, Hello, Role, PREAMBLE_LEN};

/// How many accepted connections [`Listener::accept_hello`] lets wait for
/// their hello at once, each on its own thread. A connection accepted while
/// this many are waiting is closed at once (and reported as
/// [`Error::TooManyPendingHellos`]), so strangers cost at most this many
/// threads and descriptors; the cost is that a source connecting while
/// this many silent strangers wait is turned away until their hello
/// timeouts expire.
pub const MAX_PENDING_HELLOS: usize = 8;

/// How often the accept loop looks for a new connection or a cancel while
/// no hello arrives. A hello that arrives is acted on at once.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// What the thread of one connection found.
struct Outcome {
    id: u64,
    peer: String,
    result: Result<(Connection, Hello), Error>,
    /// The accept loop had already returned when this came in, and shut
    /// the connection down: a disconnect is its own doing, not the peer's.
    after_close: bool,
}

impl Listener {
    /// Accepts connections until one sends a valid preamble naming `role`,
    /// and returns it with its [`Hello`] (the preamble consumed, the link
    /// timeout unset so the caller sets its own).
    ///
    /// Each accepted connection has `hello_timeout` to send its whole
    /// preamble (a deadline, not a per-read timeout, so a peer dripping a
    /// byte at a time cannot stretch it). A connection that sends nothing
    /// in time, sends bytes that are not a valid preamble, or names another
    /// role is reported to `on_reject` with its peer and the reason, and
    /// closed; listening goes on. Connections are read concurrently, so one
    /// that says nothing does not keep a real source out; at most
    /// [`MAX_PENDING_HELLOS`] wait at a time. The migration id and epoch are
    /// the caller's to check ([`Hello::expect`]). TCP connections get
    /// `TCP_NODELAY`, as with [`Listener::accept`].
    ///
    /// Every thread it starts has ended and every connection but the one
    /// returned is closed when it returns. [`super::ListenerCanceller::cancel`]
    /// makes it return [`TransportError::Cancelled`] within one poll
    /// interval (20 ms), even while hellos are pending. `on_reject` is called on
    /// the caller's thread (it need not be `Send`); rejections still in
    /// flight when the winner arrives are reported before this returns.
    ///
    /// A `file:` listener has one connection: its preamble is read once
    /// (no timeout: a file does not stall) and a bad one is returned as
    /// [`TransportError::FileHello`] rather than reported.
    ///
    /// While it runs the listening socket is non-blocking: do not call
    /// [`Listener::accept`] on the same listener from another thread
    /// meanwhile. A zero `hello_timeout` is refused
    /// ([`TransportError::Setup`]).
    pub fn accept_hello(
        &self,
        role: Role,
        hello_timeout: Duration,
        on_reject: &mut dyn FnMut(&str, &Error),
    ) -> Result<(Connection, Hello), TransportError> {
        self.check_cancelled()?;
        let text = self.uri.to_string();
        if hello_timeout.is_zero() {
            return Err(TransportError::Setup {
                uri: text,
                what: "wait for a hello",
                source: io::Error::new(io::ErrorKind::InvalidInput, "the hello timeout is zero"),
            });
        }
        if let ListenerInner::File(_) = &self.inner {
            return self.file_hello(role);
        }
        let _non_blocking =
            NonBlocking::set(&self.inner).map_err(|source| TransportError::Setup {
                uri: text.clone(),
                what: "make the listener non-blocking",
                source,
            })?;

        let (tx, rx) = mpsc::channel::<Outcome>();
        let closed = AtomicBool::new(false);
        let result = thread::scope(|scope| {
            // Dropped when the scope's closure ends, by return or by a panic
            // of `on_reject`: the threads it waits for must not be left
            // reading until their hello timeout.
            let mut pending = Pending {
                handles: HashMap::new(),
                closed: &closed,
            };
            let mut next_id = 0u64;
            let result = 'run: loop {
                if let Err(e) = self.check_cancelled() {
                    break 'run Err(e);
                }
                // Outcomes first: a thread that is done frees a slot for the
                // next connection. Then one connection from the backlog.
                // With neither, wait for an outcome until it is time to look
                // again (the loop holds a sender: the channel never
                // disconnects).
                let outcome = match rx.try_recv() {
                    Ok(outcome) => outcome,
                    Err(_) => match self.try_accept(&text) {
                        Ok(Some(conn)) => {
                            if let Err(e) = self.check_cancelled() {
                                break 'run Err(e);
                            }
                            let conn = match conn {
                                Ok(conn) => conn,
                                Err(e) => {
                                    on_reject(&text, &e);
                                    continue;
                                }
                            };
                            if pending.handles.len() >= MAX_PENDING_HELLOS {
                                let e = Error::TooManyPendingHellos {
                                    max: MAX_PENDING_HELLOS,
                                };
                                on_reject(conn.handle.peer(), &e);
                                continue;
                            }
                            let id = next_id;
                            next_id += 1;
                            let handle = conn.handle.clone();
                            let tx = tx.clone();
                            let closed = &closed;
                            let spawned = thread::Builder::new()
                                .name("migration-hello".into())
                                .spawn_scoped(scope, move || {
                                    let peer = conn.handle.peer().to_owned();
                                    let result = read_hello(conn, role, hello_timeout);
                                    let after_close = closed.load(Ordering::SeqCst);
                                    // The receiver outlives every thread.
                                    let _ = tx.send(Outcome {
                                        id,
                                        peer,
                                        result,
                                        after_close,
                                    });
                                });
                            match spawned {
                                Ok(_) => {
                                    pending.handles.insert(id, handle);
                                }
                                Err(e) => on_reject(
                                    handle.peer(),
                                    &Error::Io {
                                        context: "starting the thread that reads a hello",
                                        // Local, whatever errno it had.
                                        source: io::Error::other(e),
                                    },
                                ),
                            }
                            continue;
                        }
                        Ok(None) => match rx.recv_timeout(ACCEPT_POLL) {
                            Ok(outcome) => outcome,
                            Err(_) => continue,
                        },
                        Err(e) => break 'run Err(e),
                    },
                };
                pending.handles.remove(&outcome.id);
                match outcome.result {
                    Ok(found) => {
                        if let Err(e) = self.check_cancelled() {
                            break 'run Err(e);
                        }
                        break 'run Ok(found);
                    }
                    Err(e) => on_reject(&outcome.peer, &e),
                }
            };
            drop(pending);
            result
            // The scope joins every thread here.
        });
        drop(tx);
        for outcome in rx.try_iter() {
            match outcome.result {
                // Cut short by the shutdown above: not the peer's doing. A
                // malformed preamble is, whenever it was read.
                Err(e) if outcome.after_close && e.kind() != ErrorKind::Protocol => {}
                Err(e) => on_reject(&outcome.peer, &e),
                Ok((_, hello)) => log::warn!(
                    "{}: closed a second connection with a valid {:?} hello ({}) \
                     after accepting another",
                    outcome.peer,
                    hello.role,
                    hello.migration_id
                ),
            }
        }
        result
    }

    /// The next connection waiting in the backlog of a non-blocking
    /// listener, or `None`. A connection that cannot be set up is returned
    /// as the reason to report.
    fn try_accept(&self, text: &str) -> Result<Option<Result<Connection, Error>>, TransportError> {
        loop {
            let accepted = match &self.inner {
                ListenerInner::Tcp(l) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(tcp_connection(s, text, true))
                }),
                ListenerInner::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(unix_connection(s, text, text))
                }),
                ListenerInner::File(_) => return Ok(None),
            };
            return match accepted {
                Ok(conn) => Ok(Some(conn.map_err(|e| {
                    let source = match e {
                        TransportError::Setup { source, .. } => source,
                        other => io::Error::other(other),
                    };
                    Error::Io {
                        context: "setting up an accepted connection",
                        source,
                    }
                }))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                // A connection that was reset before it was accepted, or a
                // signal: nothing to report, try the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(source) => Err(TransportError::Accept {
                    uri: text.into(),
                    source,
                }),
            };
        }
    }

    /// [`Listener::accept_hello`] for a `file:` listener.
    fn file_hello(&self, role: Role) -> Result<(Connection, Hello), TransportError> {
        let mut conn = self.accept()?;
        let hello = read_preamble(&mut conn.reader).and_then(|hello| check_role(hello, role));
        match hello {
            Ok(hello) => Ok((conn, hello)),
            Err(source) => Err(TransportError::FileHello {
                uri: self.uri.to_string(),
                expected: role,
                source,
            }),
        }
    }
}

fn check_role(hello: Hello, role: Role) -> Result<Hello, Error> {
    if hello.role == role {
        Ok(hello)
    } else {
        Err(Error::RoleMismatch {
            expected: role,
            found: hello.role,
        })
    }
}

/// The connections whose hello is being read, by id.
struct Pending<'a> {
    handles: HashMap<u64, ConnectionHandle>,
    /// Tells the threads that a disconnect from now on is this side's.
    closed: &'a AtomicBool,
}

impl Drop for Pending<'_> {
    /// Shuts every pending connection down: the threads reading them see
    /// end of file at once and end.
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        for handle in self.handles.values() {
            let _ = handle.shutdown();
        }
    }
}

/// Reads the preamble of a freshly accepted connection by a deadline.
fn read_hello(
    mut conn: Connection,
    role: Role,
    timeout: Duration,
) -> Result<(Connection, Hello), Error> {
    let hello = read_preamble(&mut HelloReader {
        deadline: Instant::now().checked_add(timeout),
        timeout,
        got: 0,
        conn: &mut conn,
    })?;
    let hello = check_role(hello, role)?;
    conn.handle
        .set_link_timeout(None)
        .map_err(|source| Error::Io {
            context: "clearing the hello timeout",
            source,
        })?;
    Ok((conn, hello))
}

/// Reads a connection with the socket's timeout set, before each read, to
/// what is left until the deadline.
struct HelloReader<'a> {
    conn: &'a mut Connection,
    /// `None` if `timeout` is too far away to compute.
    deadline: Option<Instant>,
    timeout: Duration,
    got: usize,
}

impl HelloReader<'_> {
    fn expired(&self) -> io::Error {
        let msg = if self.got == 0 {
            format!(
                "the peer sent nothing for {}",
                DisplayDuration(self.timeout)
            )
        } else {
            format!(
                "the peer sent {} of the {PREAMBLE_LEN} bytes of its hello in {}",
                self.got,
                DisplayDuration(self.timeout)
            )
        };
        io::Error::new(io::ErrorKind::TimedOut, msg)
    }
}

impl Read for HelloReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = match self.deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => self.timeout,
        };
        if left.is_zero() {
            return Err(self.expired());
        }
        self.conn.handle.set_link_timeout(Some(left))?;
        match self.conn.reader.read(buf) {
            Ok(n) => {
                self.got += n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(self.expired()),
            Err(e) => Err(e),
        }
    }
}

/// Makes a listening socket non-blocking until dropped.
struct NonBlocking<'a>(&'a ListenerInner);

impl<'a> NonBlocking<'a> {
    fn set(inner: &'a ListenerInner) -> io::Result<Self> {
        set_non_blocking(inner, true)?;
        Ok(NonBlocking(inner))
    }
}

impl Drop for NonBlocking<'_> {
    fn drop(&mut self) {
        // Clearing a flag on a descriptor this listener owns does not fail
        // short of a kernel bug; if it did, a later `accept` would report
        // `WouldBlock` rather than hang.
        let _ = set_non_blocking(self.0, false);
    }
}

fn set_non_blocking(inner: &ListenerInner, on: bool) -> io::Result<()> {
    match inner {
        ListenerInner::Tcp(l) => l.set_nonblocking(on),
        ListenerInner::Unix(l, _) => l.set_nonblocking(on),
        ListenerInner::File(_) => Ok(()),
    }
}
