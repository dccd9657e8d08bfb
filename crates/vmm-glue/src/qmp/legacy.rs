//! A QMP-compatible control socket: QEMU's Machine Protocol, as management software
//! already speaks it.
//!
//! Protocol, per connection on a Unix socket:
//!
//! ```text
//!  server: {"QMP": {"version": {...}, "capabilities": []}}     greeting
//!  client: {"execute": "qmp_capabilities"}                     negotiation (required first)
//!  server: {"return": {}}
//!  client: {"execute": CMD, "arguments": {...}, "id": ANY}     commands, "id" echoed
//!  server: {"return": ...} | {"error": {"class": ..., "desc": ...}}
//!  server: {"event": NAME, "data": {...}, "timestamp": {...}}   events, any time after negotiation
//! ```
//!
//! One JSON object per line each way. Input is capped ([`MAX_LINE`] bytes a line, JSON
//! nesting capped by the parser); malformed input gets a `GenericError` reply and the
//! connection stays usable, as in QEMU. Commands are run by a [`QmpHandler`]; events
//! are broadcast to every negotiated client through an [`EventBus`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::json::Json;

/// The longest input line accepted, in bytes.
pub const MAX_LINE: usize = 1 << 20;

/// QEMU's error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// The command does not exist (or is not allowed yet).
    CommandNotFound,
    /// A device or facility is not active.
    DeviceNotActive,
}

impl ErrorClass {
    fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// `CommandNotFound` for `cmd`, worded as QEMU words it.
    pub fn not_found(cmd: &str) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {cmd} has not been found"),
        }
    }

    fn to_json(&self) -> Json {
        Json::obj([(
            "error",
            Json::obj([
                ("class", Json::str(self.class.as_str())),
                ("desc", Json::str(self.desc.clone())),
            ]),
        )])
    }
}

/// Runs QMP commands. Implemented by the VMM (the migration controller in `demovm`).
pub trait QmpHandler: Send + Sync + 'static {
    /// Runs `command` with its `arguments` object (an empty object when absent) and
    /// returns the `return` value.
    fn execute(&self, command: &str, args: &Json) -> Result<Json, QmpError>;

    /// Called after the reply to `command` was written and flushed (so `quit` can exit
    /// once the client has its answer).
    fn after_reply(&self, _command: &str) {}
}

/// The server's version, sent in the greeting.
#[derive(Debug, Clone)]
pub struct Greeting {
    /// `major.minor.micro` reported as the `qemu` version (the QMP dialect spoken).
    pub version: (u64, u64, u64),
    /// The `package` string.
    pub package: String,
}

impl Greeting {
    fn to_json(&self) -> Json {
        let (major, minor, micro) = self.version;
        Json::obj([(
            "QMP",
            Json::obj([
                (
                    "version",
                    Json::obj([
                        (
                            "qemu",
                            Json::obj([
                                ("micro", Json::uint(micro)),
                                ("minor", Json::uint(minor)),
                                ("major", Json::uint(major)),
                            ]),
                        ),
                        ("package", Json::str(self.package.clone())),
                    ]),
                ),
                ("capabilities", Json::Arr(Vec::new())),
            ]),
        )])
    }
}

type Writer = Arc<Mutex<UnixStream>>;

/// Broadcasts events to every negotiated client.
#[derive(Default)]
pub struct EventBus {
    clients: Mutex<Vec<Writer>>,
}

impl EventBus {
    /// A bus with no clients.
    pub fn new() -> Arc<Self> {
        Arc::new(EventBus::default())
    }

    fn add(&self, w: Writer) {
        self.clients.lock().push(w);
    }

    /// Sends `{"event": name, "data": data, "timestamp": now}` to every client; clients
    /// whose socket fails are dropped.
    pub fn emit(&self, name: &str, data: Option<Json>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut fields = vec![("event".to_owned(), Json::str(name))];
        if let Some(d) = data {
            fields.push(("data".to_owned(), d));
        }
        fields.push((
            "timestamp".to_owned(),
            Json::obj([
                ("seconds", Json::uint(now.as_secs())),
                ("microseconds", Json::uint(u64::from(now.subsec_micros()))),
            ]),
        ));
        let line = format!("{}\n", Json::Obj(fields));
        log::debug!("qmp event: {}", line.trim_end());
        self.clients
            .lock()
            .retain(|w| w.lock().write_all(line.as_bytes()).is_ok());
    }
}

/// A listening QMP socket; the socket file is removed on drop.
pub struct QmpServer {
    path: PathBuf,
}

impl QmpServer {
    /// Binds `path` (replacing a stale socket file) and serves clients on background
    /// threads, one per connection.
    pub fn bind(
        path: &Path,
        greeting: Greeting,
        handler: Arc<dyn QmpHandler>,
        events: Arc<EventBus>,
    ) -> io::Result<QmpServer> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        let greeting = Arc::new(greeting);
        std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (greeting, handler, events) = (
                        Arc::clone(&greeting),
                        Arc::clone(&handler),
                        Arc::clone(&events),
                    );
                    let _ =
                        std::thread::Builder::new()
                            .name("qmp-client".into())
                            .spawn(move || {
                                if let Err(e) = serve(conn, &greeting, handler.as_ref(), &events) {
                                    log::debug!("qmp client gone: {e}");
                                }
                            });
                }
            })?;
        Ok(QmpServer {
            path: path.to_owned(),
        })
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
        // Skip the rest of the over-long line.
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

/// Decodes one request: the command name, its arguments and the id to echo.
fn decode(line: &[u8]) -> Result<(String, Json, Option<Json>), QmpError> {
    let text =
        std::str::from_utf8(line).map_err(|_| QmpError::generic("QMP input is not UTF-8"))?;
    let v = Json::parse(text).map_err(|e| QmpError::generic(e.to_string()))?;
    let Json::Obj(members) = v else {
        return Err(QmpError::generic("QMP input must be a JSON object"));
    };
    let (mut cmd, mut args, mut id) = (None, None, None);
    for (k, v) in members {
        match k.as_str() {
            "execute" => match v {
                Json::Str(s) => cmd = Some(s),
                _ => {
                    return Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
            },
            "arguments" => match v {
                Json::Obj(_) => args = Some(v),
                _ => {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
            },
            "id" => id = Some(v),
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    let cmd = cmd.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok((cmd, args.unwrap_or(Json::Obj(Vec::new())), id))
}

fn with_id(mut reply: Json, id: Option<Json>) -> Json {
    if let (Json::Obj(f), Some(id)) = (&mut reply, id) {
        f.push(("id".to_owned(), id));
    }
    reply
}

fn send(w: &Writer, v: &Json) -> io::Result<()> {
    let mut s = w.lock();
    s.write_all(format!("{v}\n").as_bytes())?;
    s.flush()
}

fn serve(
    conn: UnixStream,
    greeting: &Greeting,
    handler: &dyn QmpHandler,
    events: &EventBus,
) -> io::Result<()> {
    let writer: Writer = Arc::new(Mutex::new(conn.try_clone()?));
    let mut reader = BufReader::new(conn);
    send(&writer, &greeting.to_json())?;
    let mut negotiated = false;
    loop {
        let line = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                send(
                    &writer,
                    &QmpError::generic(format!("QMP input line longer than {MAX_LINE} bytes"))
                        .to_json(),
                )?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (cmd, args, id) = match decode(&line) {
            Ok(r) => r,
            Err(e) => {
                send(&writer, &e.to_json())?;
                continue;
            }
        };
        let result = match (cmd.as_str(), negotiated) {
            ("qmp_capabilities", false) => {
                let caps_ok = match args.get("enable") {
                    None => true,
                    Some(Json::Arr(a)) => a.is_empty(),
                    Some(_) => false,
                };
                if caps_ok {
                    negotiated = true;
                    events.add(Arc::clone(&writer));
                    Ok(Json::Obj(Vec::new()))
                } else {
                    Err(QmpError::generic(
                        "This server offers no QMP capabilities to enable",
                    ))
                }
            }
            ("qmp_capabilities", true) => Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            }),
            (_, false) => Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            }),
            (_, true) => handler.execute(&cmd, &args),
        };
        let reply = match result {
            Ok(v) => Json::obj([("return", v)]),
            Err(e) => e.to_json(),
        };
        send(&writer, &with_id(reply, id))?;
        if negotiated {
            handler.after_reply(&cmd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl QmpHandler for Echo {
        fn execute(&self, command: &str, args: &Json) -> Result<Json, QmpError> {
            match command {
                "echo" => Ok(args.clone()),
                "fail" => Err(QmpError::generic("it failed")),
                c => Err(QmpError::not_found(c)),
            }
        }
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
        fn recv(&mut self) -> Json {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            Json::parse(&l).unwrap()
        }
        fn send_raw(&mut self, s: &str) {
            self.w.write_all(s.as_bytes()).unwrap();
        }
        fn cmd(&mut self, s: &str) -> Json {
            self.send_raw(&format!("{s}\n"));
            self.recv()
        }
    }

    fn server() -> (QmpServer, PathBuf, Arc<EventBus>) {
        let dir = std::env::temp_dir().join(format!(
            "qmp-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let events = EventBus::new();
        let s = QmpServer::bind(
            &path,
            Greeting {
                version: (9, 2, 0),
                package: "test".into(),
            },
            Arc::new(Echo),
            Arc::clone(&events),
        )
        .unwrap();
        (s, path, events)
    }

    fn class(v: &Json) -> Option<&str> {
        v.get("error")?.get("class")?.as_str()
    }

    #[test]
    fn greeting_negotiation_commands_and_ids() {
        let (_s, path, _) = server();
        let mut c = Client::connect(&path);
        let g = c.recv();
        assert_eq!(
            g.get("QMP").and_then(|q| q.get("capabilities")),
            Some(&Json::Arr(vec![]))
        );
        let r = c.cmd(r#"{"execute": "echo", "arguments": {"a": 1}}"#);
        assert_eq!(
            class(&r),
            Some("CommandNotFound"),
            "commands before negotiation are refused"
        );
        assert_eq!(
            c.cmd(r#"{"execute": "qmp_capabilities"}"#),
            Json::parse(r#"{"return": {}}"#).unwrap()
        );
        let r = c.cmd(r#"{"execute": "echo", "arguments": {"a": 1}, "id": "x1"}"#);
        assert_eq!(
            r,
            Json::parse(r#"{"return": {"a": 1}, "id": "x1"}"#).unwrap()
        );
        let r = c.cmd(r#"{"execute": "fail", "id": 2}"#);
        assert_eq!(
            r,
            Json::parse(r#"{"error": {"class": "GenericError", "desc": "it failed"}, "id": 2}"#)
                .unwrap()
        );
        let r = c.cmd(r#"{"execute": "nonesuch"}"#);
        assert_eq!(class(&r), Some("CommandNotFound"));
        assert_eq!(
            class(&c.cmd(r#"{"execute": "qmp_capabilities"}"#)),
            Some("CommandNotFound")
        );
    }

    #[test]
    fn malformed_input_gets_generic_errors_and_the_connection_survives() {
        let (_s, path, _) = server();
        let mut c = Client::connect(&path);
        c.recv();
        c.cmd(r#"{"execute": "qmp_capabilities"}"#);
        for bad in [
            "not json",
            "[1, 2]",
            r#"{"execute": 5}"#,
            r#"{"execute": "echo", "arguments": []}"#,
            r#"{"arguments": {}}"#,
            r#"{"execute": "echo", "bogus": 1}"#,
            "{\"execute\": \"echo\"",
        ] {
            let r = c.cmd(bad);
            assert_eq!(class(&r), Some("GenericError"), "{bad}: {r}");
        }
        c.send_raw(&"x".repeat(MAX_LINE + 10));
        let r = c.cmd("");
        assert_eq!(
            class(&r),
            Some("GenericError"),
            "an over-long line is refused: {r}"
        );
        let r = c.cmd(r#"{"execute": "echo", "arguments": {"still": true}}"#);
        assert_eq!(
            r.get("return").and_then(|v| v.get("still")),
            Some(&Json::Bool(true))
        );
    }

    #[test]
    fn events_reach_negotiated_clients_only() {
        let (_s, path, events) = server();
        let mut early = Client::connect(&path);
        early.recv();
        let mut c = Client::connect(&path);
        c.recv();
        c.cmd(r#"{"execute": "qmp_capabilities"}"#);
        events.emit("STOP", None);
        let e = c.recv();
        assert_eq!(e.get("event").and_then(Json::as_str), Some("STOP"));
        assert!(e.get("timestamp").and_then(|t| t.get("seconds")).is_some());
        // The un-negotiated client saw nothing: its next line is its own reply.
        let r = early.cmd(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(r, Json::parse(r#"{"return": {}}"#).unwrap());
    }
}
