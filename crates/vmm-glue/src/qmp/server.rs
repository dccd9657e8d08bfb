//! A QMP server over `serde_json`: QEMU's Machine Protocol on a Unix socket, built so
//! that no client can stall anything but itself.
//!
//! # Protocol
//!
//! Per connection, one JSON object per line each way:
//!
//! ```text
//!  server: {"QMP": {"version": {...}, "capabilities": []}}       greeting
//!  client: {"execute": "qmp_capabilities"}                       negotiation (required first)
//!  server: {"return": {}}
//!  client: {"execute": CMD, "arguments": {...}, "id": ANY}       commands, "id" echoed
//!  server: {"return": ...} | {"error": {"class": ..., "desc": ...}}
//!  server: {"event": NAME, "data": {...}, "timestamp": {...}}     events, after negotiation
//! ```
//!
//! Input lines are capped at [`MAX_LINE`] bytes and JSON nesting is capped by
//! `serde_json`; malformed input is answered with a `GenericError` and the connection
//! stays usable, as in QEMU. A connection beyond [`Config::max_clients`] gets one
//! `GenericError` line instead of the greeting and is closed.
//!
//! # Threads and queues
//!
//! ```text
//!                 accept thread (epoll: listener + wake-up eventfd)
//!                   |  admits up to max_clients, joins finished clients
//!      +------------+------------+
//!  client reader thread       client reader thread ...
//!    reads a line, runs Handler::execute,
//!    queues the reply (blocks only itself when its queue is full)
//!      |
//!   bounded queue (Config::queue_depth lines)  <--- EventSink::emit: try_push, never waits;
//!      |                                            a full queue drops that client
//!    writer thread: writes each line, then Handler::after_reply for replies
//! ```
//!
//! Every client has a bounded outgoing queue drained by a writer thread of its own.
//! Replies and events share that queue, so lines never interleave. [`EventSink::emit`]
//! never waits for room: a negotiated client whose queue is full is dropped (its
//! socket shut down, with a log line). Emitting is therefore cheap and safe from any
//! thread, a migration thread at switchover included, while some client does not read
//! at all. A client is subscribed just before its `qmp_capabilities` reply is written:
//! it gets every event emitted after it has that reply, and none before it.
//!
//! Dropping the [`Server`] stops accepting, shuts every client's socket down and joins
//! every thread it started. While it runs, finished clients are joined as they end.
//!
//! # Examples
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//!
//! use serde_json::{json, Map, Value};
//! use vmm_glue::qmp::server::{Config, EventSink, Greeting, Handler, QmpError, Server};
//!
//! struct Hello;
//!
//! impl Handler for Hello {
//!     fn execute(&self, command: &str, _args: &Map<String, Value>) -> Result<Value, QmpError> {
//!         match command {
//!             "query-hello" => Ok(json!({"hello": "world"})),
//!             other => Err(QmpError::not_found(other)),
//!         }
//!     }
//!
//!     fn after_reply(&self, _command: &str) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let events = EventSink::new();
//! let greeting = Greeting {
//!     version: (9, 2, 0),
//!     package: "example".into(),
//! };
//! let server = Server::bind(
//!     Path::new("/tmp/example.qmp"),
//!     Config::new(greeting),
//!     Arc::new(Hello),
//!     events.clone(),
//! )?;
//! events.emit("STOP", None);
//! drop(server); // clients closed, threads joined, socket file removed
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use serde_json::{json, Map, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The longest input line accepted, in bytes.
pub const MAX_LINE: usize = 1 << 20;

/// Connections served at once unless [`Config::max_clients`] says otherwise.
pub const DEFAULT_MAX_CLIENTS: usize = 16;

/// Lines a client's outgoing queue holds unless [`Config::queue_depth`] says otherwise.
/// A negotiated client that lets this many lines pile up is dropped at the next event.
pub const DEFAULT_QUEUE_DEPTH: usize = 1024;

/// QEMU's error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// The command does not exist, or is not allowed yet (before negotiation).
    CommandNotFound,
    /// A device or facility is not active.
    DeviceNotActive,
    /// A device does not exist.
    DeviceNotFound,
    /// The accelerator lacks a capability.
    #[serde(rename = "KVMMissingCap")]
    KvmMissingCap,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound` for `command`, worded as QEMU words it.
    pub fn not_found(command: &str) -> Self {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }
}

/// Runs QMP commands: implemented by the VMM (or an adapter to its session API).
///
/// Both methods are called from the server's threads, possibly several clients at
/// once, hence `Send + Sync`.
pub trait Handler: Send + Sync + 'static {
    /// Runs `command` with its `arguments` (an empty map when the client sent none)
    /// and returns the `return` value. Called on the client's reader thread: a slow
    /// command delays only that client.
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;

    /// Called once for every command passed to [`Handler::execute`], on the client's
    /// writer thread, after the reply was written to the socket (or could not be,
    /// because the client went away): so `quit` can end the process once its client
    /// has the answer. Handlers with nothing to do here say so with an empty body.
    fn after_reply(&self, command: &str);
}

/// The server's version, sent in the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// `major.minor.micro` reported as the `qemu` version (the QMP dialect spoken).
    pub version: (u64, u64, u64),
    /// The `package` string.
    pub package: String,
}

impl Greeting {
    fn to_value(&self) -> Value {
        let (major, minor, micro) = self.version;
        json!({
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": self.package,
                },
                "capabilities": [],
            }
        })
    }
}

/// How a [`Server`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Sent to every client on connection.
    pub greeting: Greeting,
    /// Connections served at once; one more is told so and closed. At least 1.
    pub max_clients: usize,
    /// Lines each client's outgoing queue holds (replies and events). At least 1.
    pub queue_depth: usize,
}

impl Config {
    /// The greeting with [`DEFAULT_MAX_CLIENTS`] and [`DEFAULT_QUEUE_DEPTH`].
    pub fn new(greeting: Greeting) -> Self {
        Config {
            greeting,
            max_clients: DEFAULT_MAX_CLIENTS,
            queue_depth: DEFAULT_QUEUE_DEPTH,
        }
    }
}

/// Why a [`Server`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A limit of the [`Config`] is zero.
    #[error("invalid QMP server configuration: {0} must be at least 1")]
    Config(&'static str),
    /// Something other than a socket is in the way at the socket's path.
    #[error("{} exists and is not a socket", path.display())]
    NotASocket {
        /// The path given to [`Server::bind`].
        path: PathBuf,
    },
    /// The stale socket file at the path could not be removed.
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        /// The path given to [`Server::bind`].
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The socket could not be bound or set up.
    #[error("cannot listen on {}", path.display())]
    Listen {
        /// The path given to [`Server::bind`].
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The accept loop's epoll set or wake-up eventfd could not be made.
    #[error("cannot set up the accept loop ({what})")]
    Setup {
        /// Which step failed.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The accept thread could not be started.
    #[error("cannot start the QMP accept thread")]
    Spawn(#[source] io::Error),
}

/// One line for a client's writer thread, newline included.
enum Out {
    /// The greeting, an event, or a reply to input that ran no command.
    Line(Arc<str>),
    /// The reply to a successful `qmp_capabilities`: the writer subscribes the client
    /// to events just before writing it, so the client sees every event emitted after
    /// it has its reply, and none before.
    Negotiated(Arc<str>),
    /// The reply to a command the handler ran: `after_reply(command)` follows it.
    Reply { line: String, command: String },
}

impl Out {
    fn text(&self) -> &str {
        match self {
            Out::Line(l) | Out::Negotiated(l) => l,
            Out::Reply { line, .. } => line,
        }
    }
}

/// Why [`Queue::try_push`] refused a line.
enum PushError {
    /// The queue holds its depth already.
    Full,
    /// The client is going away.
    Closed,
}

/// A client's bounded output queue. Its reader pushes replies, waiting for room
/// (which stalls only that client), [`EventSink::emit`] pushes events without ever
/// waiting, and its writer thread pops. The lock is never held across I/O or a wait.
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
    depth: usize,
}

struct QueueState {
    lines: VecDeque<Out>,
    /// Set when the reader or the writer is done: pushes fail, pops drain.
    closed: bool,
}

impl Queue {
    fn new(depth: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState {
                lines: VecDeque::new(),
                closed: false,
            }),
            changed: Condvar::new(),
            depth,
        }
    }

    /// Queues `out` once there is room; `false` if the queue was closed first.
    fn push_wait(&self, out: Out) -> bool {
        let mut s = self.state.lock();
        while s.lines.len() >= self.depth && !s.closed {
            self.changed.wait(&mut s);
        }
        if s.closed {
            return false;
        }
        s.lines.push_back(out);
        self.changed.notify_all();
        true
    }

    /// Queues `out` if there is room now.
    fn try_push(&self, out: Out) -> Result<(), PushError> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(PushError::Closed);
        }
        if s.lines.len() >= self.depth {
            return Err(PushError::Full);
        }
        s.lines.push_back(out);
        self.changed.notify_all();
        Ok(())
    }

    /// The next line, waiting for one; `None` once closed and drained.
    fn pop(&self) -> Option<Out> {
        let mut s = self.state.lock();
        loop {
            if let Some(out) = s.lines.pop_front() {
                self.changed.notify_all();
                return Some(out);
            }
            if s.closed {
                return None;
            }
            self.changed.wait(&mut s);
        }
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.changed.notify_all();
    }
}

/// A negotiated client, as events see it.
struct Subscriber {
    id: u64,
    queue: Arc<Queue>,
    stream: Arc<UnixStream>,
}

/// Where events are emitted: cheap to clone, usable from any thread, never blocks.
///
/// Create one before the [`Server`] (the VMM's components keep clones) and hand it to
/// [`Server::bind`]. Events emitted while no client is negotiated go nowhere.
#[derive(Clone, Default)]
pub struct EventSink {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("subscribers", &self.subscribers.lock().len())
            .finish()
    }
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

#[derive(Serialize)]
struct EventLine<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
    timestamp: Timestamp,
}

impl EventSink {
    /// A sink with no clients yet.
    pub fn new() -> Self {
        EventSink::default()
    }

    /// Queues `{"event": name, "data": data, "timestamp": now}` for every negotiated
    /// client, without waiting for any of them. A client whose queue is full (it has
    /// not read [`Config::queue_depth`] lines) is dropped: its socket is shut down and
    /// a warning logged.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line: Arc<str> = to_line(&EventLine {
            event: name,
            data,
            timestamp: Timestamp {
                seconds: now.as_secs(),
                microseconds: now.subsec_micros(),
            },
        })
        .into();
        log::debug!("qmp event: {}", line.trim_end());
        let mut dropped = Vec::new();
        // Nothing under the lock can block: try_push takes a queue's lock, which is
        // never held across I/O or a wait.
        self.subscribers
            .lock()
            .retain(|s| match s.queue.try_push(Out::Line(Arc::clone(&line))) {
                Ok(()) => true,
                Err(PushError::Full) => {
                    dropped.push((s.id, Arc::clone(&s.stream)));
                    false
                }
                Err(PushError::Closed) => false,
            });
        for (id, stream) in dropped {
            log::warn!(
                "qmp: client {id} dropped: its output queue is full (it does not read its \
                 socket), so it cannot take event {name}"
            );
            // Ends its reader's read and its writer's write; both threads then finish.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn subscribe(&self, s: Subscriber) {
        self.subscribers.lock().push(s);
    }

    fn unsubscribe(&self, id: u64) {
        self.subscribers.lock().retain(|s| s.id != id);
    }
}

/// A listening QMP socket. Dropping it stops accepting, closes every client, joins
/// every thread it started and removes the socket file; a command still running is
/// waited for.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

/// What every client thread of one server shares.
struct Shared {
    greeting: Arc<str>,
    handler: Arc<dyn Handler>,
    events: EventSink,
    queue_depth: usize,
    /// Written when a client ends (so the accept loop joins it) and on shutdown.
    wake: Arc<EventFd>,
}

const LISTENER: u64 = 0;
const WAKE: u64 = 1;

impl Server {
    /// Binds `path` (replacing a stale socket file there, refusing anything else) and
    /// serves clients on background threads: `handler` runs their commands, `events`
    /// reaches those that negotiated.
    pub fn bind(
        path: &Path,
        config: Config,
        handler: Arc<dyn Handler>,
        events: EventSink,
    ) -> Result<Server, ServerError> {
        if config.max_clients == 0 {
            return Err(ServerError::Config("max_clients"));
        }
        if config.queue_depth == 0 {
            return Err(ServerError::Config("queue_depth"));
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })?
            }
            Ok(_) => {
                return Err(ServerError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(_) => {}
        }
        let listen_err = |source| ServerError::Listen {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let setup = |what| move |source| ServerError::Setup { what, source };
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?);
        let epoll = Epoll::new().map_err(setup("epoll_create1"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(setup("epoll_ctl listener"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WAKE),
            )
            .map_err(setup("epoll_ctl eventfd"))?;
        let shared = Arc::new(Shared {
            greeting: to_line(&config.greeting.to_value()).into(),
            handler,
            events,
            queue_depth: config.queue_depth,
            wake: Arc::clone(&wake),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = Arc::clone(&stop);
            let max = config.max_clients;
            std::thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || accept_loop(&listener, &epoll, &stop, &shared, max))
                .map_err(ServerError::Spawn)?
        };
        Ok(Server {
            path: path.to_owned(),
            stop,
            wake,
            accept: Some(accept),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            // Cannot happen short of a counter overflow; the loop would never wake.
            log::error!("qmp: cannot wake the accept thread to stop it: {e}");
        }
        if let Some(t) = self.accept.take() {
            if t.join().is_err() {
                log::error!("qmp: the accept thread panicked");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A client being served: its thread, and its socket to shut down on stop.
struct Conn {
    thread: JoinHandle<()>,
    stream: Arc<UnixStream>,
}

fn join_client(id: u64, c: Conn) {
    if c.thread.join().is_err() {
        log::error!("qmp: client {id}'s thread panicked");
    }
}

fn accept_loop(
    listener: &UnixListener,
    epoll: &Epoll,
    stop: &AtomicBool,
    shared: &Arc<Shared>,
    max_clients: usize,
) {
    let (done_tx, done_rx) = mpsc::channel::<u64>();
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_id = 0u64;
    let mut ready = [EpollEvent::default(); 2];
    loop {
        match epoll.wait(-1, &mut ready) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("qmp: epoll_wait failed, no longer accepting: {e}");
                break;
            }
        }
        // Non-blocking: clears the wake-ups seen so far (EAGAIN when there were none).
        let _ = shared.wake.read();
        while let Ok(id) = done_rx.try_recv() {
            if let Some(c) = conns.remove(&id) {
                join_client(id, c);
            }
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable, so pause
                    // rather than spin, then try again.
                    log::warn!("qmp: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            if conns.len() >= max_clients {
                refuse(stream, max_clients);
                continue;
            }
            let id = next_id;
            next_id += 1;
            if let Some(c) = admit(id, stream, shared, &done_tx) {
                conns.insert(id, c);
            }
        }
    }
    for c in conns.values() {
        let _ = c.stream.shutdown(Shutdown::Both);
    }
    for (id, c) in conns {
        join_client(id, c);
    }
}

/// Tells a connection beyond the limit why it is closed, without ever waiting for it.
fn refuse(stream: UnixStream, max_clients: usize) {
    log::warn!("qmp: connection refused: {max_clients} clients already connected");
    let e = QmpError::generic(format!("too many QMP connections (limit {max_clients})"));
    let line = to_line(&ErrorLine {
        error: &e,
        id: None,
    });
    // A fresh socket's buffer takes one short line; if not, the client gets nothing.
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write_all(line.as_bytes());
    }
}

fn admit(
    id: u64,
    stream: UnixStream,
    shared: &Arc<Shared>,
    done: &mpsc::Sender<u64>,
) -> Option<Conn> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure anyway.
    if let Err(e) = stream.set_nonblocking(false) {
        log::warn!("qmp: client {id} refused: {e}");
        return None;
    }
    let stream = Arc::new(stream);
    let (s, sh) = (Arc::clone(&stream), Arc::clone(shared));
    let reap = Reap {
        id,
        done: done.clone(),
        wake: Arc::clone(&shared.wake),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("qmp-client-{id}"))
        .spawn(move || {
            let _reap = reap;
            serve(id, &s, &sh);
        });
    match spawned {
        Ok(thread) => Some(Conn { thread, stream }),
        Err(e) => {
            log::warn!("qmp: client {id} refused: cannot start its thread: {e}");
            None
        }
    }
}

/// Tells the accept loop a client thread is ending, when dropped: also when the
/// handler panicked, so the thread is joined all the same.
struct Reap {
    id: u64,
    done: mpsc::Sender<u64>,
    wake: Arc<EventFd>,
}

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.done.send(self.id);
        let _ = self.wake.write(1);
    }
}

/// A client's writer thread. Dropping it (also on unwinding) closes the queue, joins
/// the thread once it has written or drained what was queued, and shuts the socket
/// down, so the client sees the end of the stream.
struct Writer {
    id: u64,
    queue: Arc<Queue>,
    stream: Arc<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("qmp: client {}'s writer thread panicked", self.id);
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        log::debug!("qmp: client {} gone", self.id);
    }
}

/// Closes a queue when dropped, also on unwinding: a reader waiting for room never
/// waits for a writer that is gone.
struct CloseOnDrop<'a>(&'a Queue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Serves one connection on its reader thread, with a writer thread of its own.
fn serve(id: u64, stream: &Arc<UnixStream>, shared: &Arc<Shared>) {
    let queue = Arc::new(Queue::new(shared.queue_depth));
    let spawned = {
        let (s, q, sh) = (Arc::clone(stream), Arc::clone(&queue), Arc::clone(shared));
        std::thread::Builder::new()
            .name(format!("qmp-writer-{id}"))
            .spawn(move || write_loop(id, &s, &q, &sh))
    };
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            log::warn!("qmp: client {id} closed: cannot start its writer thread: {e}");
            return;
        }
    };
    // Dropped when input ends: the writer writes what is queued (a client that closed
    // only its sending side still gets its replies), then the socket is shut down.
    let _writer = Writer {
        id,
        queue: Arc::clone(&queue),
        stream: Arc::clone(stream),
        thread: Some(thread),
    };
    if queue.push_wait(Out::Line(Arc::clone(&shared.greeting))) {
        read_loop(id, shared, stream, &queue);
    }
}

fn write_loop(id: u64, stream: &Arc<UnixStream>, queue: &Arc<Queue>, shared: &Shared) {
    let _close = CloseOnDrop(queue);
    let mut healthy = true;
    while let Some(out) = queue.pop() {
        if healthy && matches!(out, Out::Negotiated(_)) {
            shared.events.subscribe(Subscriber {
                id,
                queue: Arc::clone(queue),
                stream: Arc::clone(stream),
            });
        }
        if healthy {
            let mut w = stream.as_ref();
            if let Err(e) = w.write_all(out.text().as_bytes()).and_then(|()| w.flush()) {
                log::debug!("qmp: client {id}: write failed: {e}");
                healthy = false;
                // No more pushes (a reader waiting for room gives up), the rest is only
                // drained; the shutdown ends the reader's read.
                queue.close();
                shared.events.unsubscribe(id);
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        if let Out::Reply { command, .. } = &out {
            shared.handler.after_reply(command);
        }
    }
    shared.events.unsubscribe(id);
}

fn read_loop(id: u64, shared: &Shared, stream: &UnixStream, queue: &Queue) {
    let mut reader = BufReader::new(stream);
    let mut negotiated = false;
    loop {
        let line = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let e = QmpError::generic(format!("QMP input line longer than {MAX_LINE} bytes"));
                if !queue.push_wait(error_out(&e, None)) {
                    return;
                }
                continue;
            }
            Err(e) => {
                log::debug!("qmp: client {id}: read failed: {e}");
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (request, id_member) = decode(&line);
        let req = match request {
            Ok(r) => r,
            Err(e) => {
                if !queue.push_wait(error_out(&e, id_member.as_ref())) {
                    return;
                }
                continue;
            }
        };
        let id_member = id_member.as_ref();
        let out = match (req.command.as_str(), negotiated) {
            ("qmp_capabilities", false) => {
                // This server has no capabilities: only an empty list can be enabled.
                let enables_nothing = match req.args.get("enable") {
                    None => true,
                    Some(Value::Array(a)) => a.is_empty(),
                    Some(_) => false,
                };
                if enables_nothing {
                    negotiated = true;
                    Out::Negotiated(
                        to_line(&ReturnLine {
                            ret: &json!({}),
                            id: id_member,
                        })
                        .into(),
                    )
                } else {
                    error_out(
                        &QmpError::generic("This server offers no QMP capabilities to enable"),
                        id_member,
                    )
                }
            }
            ("qmp_capabilities", true) => error_out(
                &QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                ),
                id_member,
            ),
            (_, false) => error_out(
                &QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ),
                id_member,
            ),
            (_, true) => {
                let line = match shared.handler.execute(&req.command, &req.args) {
                    Ok(v) => to_line(&ReturnLine {
                        ret: &v,
                        id: id_member,
                    }),
                    Err(e) => to_line(&ErrorLine {
                        error: &e,
                        id: id_member,
                    }),
                };
                Out::Reply {
                    line,
                    command: req.command,
                }
            }
        };
        // Waits only when this client's own queue is full.
        if !queue.push_wait(out) {
            return;
        }
    }
}

#[derive(Serialize)]
struct ReturnLine<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    error: &'a QmpError,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

fn error_out(e: &QmpError, id: Option<&Value>) -> Out {
    Out::Line(to_line(&ErrorLine { error: e, id }).into())
}

/// One JSON line, newline included.
fn to_line(v: &impl Serialize) -> String {
    match serde_json::to_string(v) {
        Ok(mut s) => {
            s.push('\n');
            s
        }
        // Not reachable for the types above (string keys, no failing Serialize impls),
        // but a client still gets a well-formed line if it ever were.
        Err(e) => {
            log::error!("qmp: cannot serialize a reply: {e}");
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"reply not serializable\"}}\n"
                .to_owned()
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at end of input; an
/// over-long line is consumed to its end and reported as `Err(InvalidData)`.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
        let mut sink = Vec::new();
        loop {
            sink.clear();
            let n = r
                .by_ref()
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut sink)?;
            if n == 0 || sink.last() == Some(&b'\n') {
                break;
            }
        }
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
    }
    Ok(Some(line))
}

/// A decoded command.
struct Request {
    command: String,
    args: Map<String, Value>,
}

/// Decodes one input line. The `id` member comes back even when the rest is wrong, so
/// the error reply can echo it.
fn decode(line: &[u8]) -> (Result<Request, QmpError>, Option<Value>) {
    let members = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return (
                Err(QmpError::generic("QMP input must be a JSON object")),
                None,
            )
        }
        Err(e) => {
            return (
                Err(QmpError::generic(format!("QMP input is not JSON: {e}"))),
                None,
            )
        }
    };
    let (mut command, mut args, mut id) = (None, None, None);
    let mut bad = None;
    for (k, v) in members {
        match (k.as_str(), v) {
            ("execute", Value::String(s)) => command = Some(s),
            ("execute", _) => bad = Some("QMP input member 'execute' must be a string".to_owned()),
            ("arguments", Value::Object(a)) => args = Some(a),
            ("arguments", _) => {
                bad = Some("QMP input member 'arguments' must be an object".to_owned())
            }
            ("id", v) => id = Some(v),
            (other, _) => bad = Some(format!("QMP input member '{other}' is unexpected")),
        }
    }
    let r = match (bad, command) {
        (Some(why), _) => Err(QmpError::generic(why)),
        (None, None) => Err(QmpError::generic("QMP input lacks member 'execute'")),
        (None, Some(command)) => Ok(Request {
            command,
            args: args.unwrap_or_default(),
        }),
    };
    (r, id)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// `echo` returns its arguments, `fail` fails, `quit` succeeds; `after_reply`
    /// reports each command it is called for.
    struct Echo {
        after: Mutex<Option<mpsc::Sender<String>>>,
    }

    impl Handler for Echo {
        fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            match command {
                "echo" => Ok(Value::Object(args.clone())),
                "fail" => Err(QmpError::generic("it failed")),
                "quit" => Ok(json!({})),
                c => Err(QmpError::not_found(c)),
            }
        }

        fn after_reply(&self, command: &str) {
            if let Some(tx) = &*self.after.lock() {
                let _ = tx.send(command.to_owned());
            }
        }
    }

    fn echo() -> Arc<Echo> {
        Arc::new(Echo {
            after: Mutex::new(None),
        })
    }

    fn sock_path() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "qmp-server-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("qmp.sock")
    }

    fn greeting() -> Greeting {
        Greeting {
            version: (9, 2, 0),
            package: "test".into(),
        }
    }

    fn start(handler: Arc<Echo>) -> (Server, PathBuf, EventSink) {
        let path = sock_path();
        let events = EventSink::new();
        let s = Server::bind(&path, Config::new(greeting()), handler, events.clone()).unwrap();
        (s, path, events)
    }

    struct Client {
        r: BufReader<UnixStream>,
        w: UnixStream,
    }

    impl Client {
        fn connect(path: &Path) -> Client {
            let w = UnixStream::connect(path).unwrap();
            Client {
                r: BufReader::new(w.try_clone().unwrap()),
                w,
            }
        }

        /// The next line, or `None` at end of stream (or a reset connection).
        fn recv_line(&mut self) -> Option<String> {
            let mut l = String::new();
            match self.r.read_line(&mut l) {
                Ok(0) => None,
                Ok(_) => Some(l),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
                Err(e) => panic!("read: {e}"),
            }
        }

        fn recv(&mut self) -> Value {
            let l = self.recv_line().expect("a line, not the end of the stream");
            serde_json::from_str(&l).unwrap()
        }

        fn send_raw(&mut self, s: &str) {
            self.w.write_all(s.as_bytes()).unwrap();
        }

        fn cmd(&mut self, s: &str) -> Value {
            self.send_raw(&format!("{s}\n"));
            self.recv()
        }

        /// Reads the greeting and negotiates.
        fn negotiate(path: &Path) -> Client {
            let mut c = Client::connect(path);
            assert!(c.recv().get("QMP").is_some());
            assert_eq!(
                c.cmd(r#"{"execute": "qmp_capabilities"}"#),
                json!({"return": {}})
            );
            c
        }
    }

    fn class(v: &Value) -> Option<&str> {
        v.get("error")?.get("class")?.as_str()
    }

    #[test]
    fn greeting_negotiation_commands_and_ids() {
        let (_s, path, _) = start(echo());
        let mut c = Client::connect(&path);
        assert_eq!(
            c.recv(),
            json!({"QMP": {
                "version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "test"},
                "capabilities": [],
            }})
        );
        let r = c.cmd(r#"{"execute": "echo", "arguments": {"a": 1}, "id": 7}"#);
        assert_eq!(
            class(&r),
            Some("CommandNotFound"),
            "refused before negotiation"
        );
        assert_eq!(
            r.get("id"),
            Some(&json!(7)),
            "the id is echoed on refusals too"
        );
        assert_eq!(
            class(&c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#)),
            Some("GenericError"),
            "no capability can be enabled"
        );
        assert_eq!(
            c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}"#),
            json!({"return": {}, "id": "n"})
        );
        assert_eq!(
            c.cmd(r#"{"execute": "echo", "arguments": {"a": 1}, "id": "x1"}"#),
            json!({"return": {"a": 1}, "id": "x1"})
        );
        assert_eq!(
            c.cmd(r#"{"execute": "echo", "id": {"any": ["json", null]}}"#),
            json!({"return": {}, "id": {"any": ["json", null]}}),
            "no arguments means an empty object; any id is echoed as it came"
        );
        assert_eq!(
            c.cmd(r#"{"execute": "fail", "id": 2}"#),
            json!({"error": {"class": "GenericError", "desc": "it failed"}, "id": 2})
        );
        assert_eq!(
            c.cmd(r#"{"execute": "nonesuch"}"#),
            json!({"error": {"class": "CommandNotFound", "desc": "The command nonesuch has not been found"}})
        );
        assert_eq!(
            class(&c.cmd(r#"{"execute": "qmp_capabilities"}"#)),
            Some("CommandNotFound"),
            "negotiation happens once"
        );
    }

    #[test]
    fn malformed_input_gets_generic_errors_and_the_connection_survives() {
        let (_s, path, _) = start(echo());
        let mut c = Client::negotiate(&path);
        for bad in [
            "not json",
            "[1, 2]",
            r#""execute""#,
            r#"{"execute": 5}"#,
            r#"{"execute": "echo", "arguments": []}"#,
            r#"{"arguments": {}}"#,
            r#"{"execute": "echo", "bogus": 1}"#,
            "{\"execute\": \"echo\"",
            &format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)),
        ] {
            let r = c.cmd(bad);
            assert_eq!(class(&r), Some("GenericError"), "{bad:.60}: {r}");
        }
        assert_eq!(
            c.cmd(r#"{"execute": 5, "id": "bad-1"}"#).get("id"),
            Some(&json!("bad-1")),
            "an error about a well-formed object echoes its id"
        );
        c.send_raw(&"x".repeat(MAX_LINE + 10));
        let r = c.cmd("");
        assert_eq!(
            r,
            json!({"error": {"class": "GenericError", "desc": format!("QMP input line longer than {MAX_LINE} bytes")}}),
            "an over-long line is refused"
        );
        c.send_raw("\n   \n");
        assert_eq!(
            c.cmd(r#"{"execute": "echo", "arguments": {"still": true}}"#),
            json!({"return": {"still": true}}),
            "blank lines are ignored and the connection still works"
        );
    }

    #[test]
    fn events_reach_negotiated_clients_only() {
        let (_s, path, events) = start(echo());
        let mut early = Client::connect(&path);
        early.recv();
        let mut c = Client::negotiate(&path);
        events.emit("STOP", None);
        events.emit("MIGRATION", Some(json!({"status": "active"})));
        let e = c.recv();
        assert_eq!(e.get("event"), Some(&json!("STOP")));
        assert_eq!(e.get("data"), None, "no data member when there is none");
        let ts = e.get("timestamp").unwrap();
        assert!(ts.get("seconds").and_then(Value::as_u64).unwrap() > 0);
        assert!(ts.get("microseconds").and_then(Value::as_u64).unwrap() < 1_000_000);
        let e = c.recv();
        assert_eq!(e.get("event"), Some(&json!("MIGRATION")));
        assert_eq!(e.get("data"), Some(&json!({"status": "active"})));
        // The un-negotiated client saw nothing: its next line is its own reply.
        assert_eq!(
            early.cmd(r#"{"execute": "qmp_capabilities"}"#),
            json!({"return": {}})
        );
        // Whoever has the negotiation reply gets the very next event.
        for i in 0..100 {
            let mut c = Client::negotiate(&path);
            events.emit("PING", Some(json!({"i": i})));
            assert_eq!(c.recv()["data"], json!({"i": i}));
        }
    }

    #[test]
    fn after_reply_runs_once_the_reply_is_written() {
        let (tx, rx) = mpsc::channel();
        let handler = Arc::new(Echo {
            after: Mutex::new(Some(tx)),
        });
        let (server, path, _) = start(handler);
        let mut c = Client::negotiate(&path);
        c.send_raw("{\"execute\": \"quit\", \"id\": 1}\n");
        // As demovm does on `quit`: the process goes away as soon as it is told.
        assert_eq!(rx.recv().unwrap(), "quit");
        drop(server);
        assert_eq!(
            c.recv(),
            json!({"return": {}, "id": 1}),
            "the client has its answer"
        );
        assert_eq!(c.recv_line(), None, "then the server closed the connection");
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_and_stalls_nobody() {
        const ROUNDS: u64 = 40;
        const PER_ROUND: u64 = 500;
        let (_s, path, events) = start(echo());
        // Negotiates, then never reads again.
        let mut stuck = Client::negotiate(&path);
        let mut good = Client::negotiate(&path);
        let (round_tx, round_rx) = mpsc::sync_channel::<u64>(0);
        let (ack_tx, ack_rx) = mpsc::sync_channel::<()>(0);
        let flood = std::thread::spawn(move || {
            // Each event is larger than a page: a few dozen fill a socket buffer.
            let blob = "x".repeat(4096);
            for r in 0..ROUNDS {
                for i in 0..PER_ROUND {
                    let seq = r * PER_ROUND + i;
                    events.emit("FLOOD", Some(json!({"seq": seq, "blob": blob})));
                }
                round_tx.send(r).unwrap();
                ack_rx.recv().unwrap();
            }
        });
        let mut next_seq = 0;
        for r in 0..ROUNDS {
            assert_eq!(round_rx.recv().unwrap(), r);
            good.send_raw(&format!(
                "{{\"execute\": \"echo\", \"arguments\": {{\"round\": {r}}}, \"id\": {r}}}\n"
            ));
            // The answer comes right after the events already queued for this client.
            loop {
                let v = good.recv();
                if v.get("event").is_some() {
                    assert_eq!(
                        v["data"]["seq"],
                        json!(next_seq),
                        "events in order, none lost"
                    );
                    next_seq += 1;
                } else {
                    assert_eq!(v, json!({"return": {"round": r}, "id": r}));
                    break;
                }
            }
            assert_eq!(next_seq, (r + 1) * PER_ROUND);
            ack_tx.send(()).unwrap();
        }
        // Every emit returned although one client never read a byte.
        flood.join().unwrap();
        // The stuck client was dropped: once it drains what reached its socket, the
        // stream ends, long before the 20000 events.
        let mut got = 0u64;
        while let Some(line) = stuck.recv_line() {
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["data"]["seq"], json!(got), "what it got is in order");
            got += 1;
        }
        assert!(
            got < ROUNDS * PER_ROUND / 2,
            "the stuck client was cut off, yet it received {got} events"
        );
        // The other client is served as before.
        assert_eq!(
            good.cmd(r#"{"execute": "echo", "arguments": {"after": "flood"}}"#),
            json!({"return": {"after": "flood"}})
        );
    }

    #[test]
    fn connections_beyond_the_limit_are_told_and_closed() {
        let (_s, path, _) = start(echo());
        let mut clients: Vec<Client> = (0..DEFAULT_MAX_CLIENTS)
            .map(|_| {
                let mut c = Client::connect(&path);
                assert!(c.recv().get("QMP").is_some());
                c
            })
            .collect();
        let mut extra = Client::connect(&path);
        assert_eq!(
            extra.recv(),
            json!({"error": {"class": "GenericError", "desc": "too many QMP connections (limit 16)"}})
        );
        assert_eq!(extra.recv_line(), None, "and it is closed");
        for c in &mut clients {
            assert_eq!(
                c.cmd(r#"{"execute": "qmp_capabilities"}"#),
                json!({"return": {}})
            );
            assert_eq!(
                c.cmd(r#"{"execute": "echo", "arguments": {"ok": 1}}"#),
                json!({"return": {"ok": 1}}),
                "clients within the limit are unaffected"
            );
        }
        // One leaves: once the server has seen it go, a newcomer is served.
        drop(clients.pop());
        loop {
            let mut c = Client::connect(&path);
            let first = c.recv();
            if first.get("QMP").is_some() {
                assert_eq!(
                    c.cmd(r#"{"execute": "qmp_capabilities"}"#),
                    json!({"return": {}})
                );
                break;
            }
            assert_eq!(class(&first), Some("GenericError"), "{first}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn bind_replaces_a_stale_socket_and_refuses_anything_else() {
        let path = sock_path();
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a stale socket file left behind");
        let events = EventSink::new();
        let s = Server::bind(&path, Config::new(greeting()), echo(), events.clone()).unwrap();
        Client::negotiate(&path);
        drop(s);

        std::fs::write(&path, "precious").unwrap();
        let r = Server::bind(&path, Config::new(greeting()), echo(), events.clone());
        assert!(matches!(r, Err(ServerError::NotASocket { .. })), "{r:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");

        let mut config = Config::new(greeting());
        config.queue_depth = 0;
        let r = Server::bind(&sock_path(), config, echo(), events);
        assert!(
            matches!(r, Err(ServerError::Config("queue_depth"))),
            "{r:?}"
        );
    }
}
