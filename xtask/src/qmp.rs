//! `cargo xtask qmp SOCKET COMMAND [JSON-ARGS]`: a tiny QMP client for poking at a
//! running `demovm` (or anything speaking QMP).
//!
//! It reads the greeting, negotiates, runs one command and prints the reply's `return`
//! as pretty JSON on stdout. A QMP error is printed as `CLASS: DESC` on stderr with exit
//! status 1. With `--events`, events that arrive before the reply are printed on
//! stderr, one JSON object per line, so stdout stays the `return` alone.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

/// `cargo xtask qmp`'s command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The QMP socket (a Unix socket path, as given to demovm --qmp).
    pub socket: PathBuf,
    /// The command to run, e.g. query-status or query-migrate.
    pub command: String,
    /// The command's arguments as one JSON object, e.g. '{"uri": "tcp:127.0.0.1:4444"}'.
    #[arg(value_name = "JSON-ARGS")]
    pub args: Option<String>,
    /// Also print the events received before the reply (on stderr, one per line).
    #[arg(long)]
    pub events: bool,
    /// Seconds to wait for each line from the server before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
}

/// Runs the command; `Ok(false)` when the server answered with a QMP error.
pub fn main(a: &Args) -> Result<bool, String> {
    let args = parse_args(a.args.as_deref())?;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    run(
        &a.socket,
        &a.command,
        args,
        &Options {
            events: a.events,
            timeout: Duration::from_secs(a.timeout.max(1)),
        },
        &mut out,
        &mut err,
    )
}

/// JSON-ARGS as an object (none: an empty one).
fn parse_args(text: Option<&str>) -> Result<Map<String, Value>, String> {
    match text.map(serde_json::from_str::<Value>) {
        None => Ok(Map::new()),
        Some(Ok(Value::Object(m))) => Ok(m),
        Some(Ok(other)) => Err(format!("JSON-ARGS must be a JSON object, not {other}")),
        Some(Err(e)) => Err(format!("JSON-ARGS is not JSON: {e}")),
    }
}

/// How [`run`] behaves.
pub struct Options {
    /// Print events received before the reply on `err`.
    pub events: bool,
    /// How long to wait for any one line.
    pub timeout: Duration,
}

/// The id the command is sent with; its reply carries it back.
const ID: &str = "xtask-qmp";

/// Connects to `socket`, negotiates and runs `command`. The `return` goes to `out` as
/// pretty JSON; a QMP error to `err` as `CLASS: DESC`, answered with `Ok(false)`.
pub fn run(
    socket: &Path,
    command: &str,
    args: Map<String, Value>,
    o: &Options,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool, String> {
    let at = socket.display();
    let stream = UnixStream::connect(socket).map_err(|e| format!("cannot connect to {at}: {e}"))?;
    stream
        .set_read_timeout(Some(o.timeout))
        .and_then(|()| stream.set_write_timeout(Some(o.timeout)))
        .map_err(|e| format!("{at}: {e}"))?;
    let mut w = stream.try_clone().map_err(|e| format!("{at}: {e}"))?;
    let mut r = BufReader::new(stream);
    let mut next = |err: &mut dyn Write| -> Result<Value, String> {
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return Err(format!("{at} closed the connection")),
                Ok(_) => {}
                Err(e) => return Err(format!("reading from {at}: {e}")),
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| format!("{at} sent something that is not JSON ({e}): {line}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
            if o.events {
                writeln!(err, "{v}").map_err(|e| e.to_string())?;
            }
        }
    };
    let greeting = next(err)?;
    if greeting.get("QMP").is_none() {
        // A refused connection says why in an error line instead of the greeting.
        return Err(match qmp_error(&greeting) {
            Some((class, desc)) => format!("{at} refused the connection: {class}: {desc}"),
            None => format!("{at} is not a QMP server: {greeting}"),
        });
    }
    let mut send = |v: Value| -> Result<(), String> {
        w.write_all(format!("{v}\n").as_bytes())
            .map_err(|e| format!("writing to {at}: {e}"))
    };
    send(json!({"execute": "qmp_capabilities"}))?;
    let reply = next(err)?;
    if reply.get("return").is_none() {
        return Err(format!("capabilities negotiation failed: {reply}"));
    }
    send(json!({"execute": command, "arguments": args, "id": ID}))?;
    let reply = next(err)?;
    if reply.get("id") != Some(&json!(ID)) {
        return Err(format!("a reply to something else: {reply}"));
    }
    if let Some(ret) = reply.get("return") {
        let pretty = serde_json::to_string_pretty(ret).map_err(|e| e.to_string())?;
        writeln!(out, "{pretty}").map_err(|e| e.to_string())?;
        return Ok(true);
    }
    match qmp_error(&reply) {
        Some((class, desc)) => {
            writeln!(err, "{class}: {desc}").map_err(|e| e.to_string())?;
            Ok(false)
        }
        None => Err(format!("neither a return nor an error: {reply}")),
    }
}

/// The class and description of an `{"error": ...}` line.
fn qmp_error(v: &Value) -> Option<(&str, &str)> {
    let e = v.get("error")?;
    Some((e.get("class")?.as_str()?, e.get("desc")?.as_str()?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_glue::qmp::server::{Config, EventSink, Greeting, Handler, QmpError, Server};

    use super::*;

    /// `echo` returns its arguments after emitting `ECHOED`; `fail` fails.
    struct Echo(EventSink);

    impl Handler for Echo {
        fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            match command {
                "echo" => {
                    self.0.emit("ECHOED", Some(json!({"n": args.len()})));
                    Ok(Value::Object(args.clone()))
                }
                "fail" => Err(QmpError::generic("it failed")),
                other => Err(QmpError::not_found(other)),
            }
        }

        fn after_reply(&self, _command: &str) {}
    }

    fn server(name: &str) -> (Server, PathBuf) {
        let dir = std::env::temp_dir().join(format!("xtask-qmp-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let events = EventSink::new();
        let greeting = Greeting {
            version: (9, 2, 0),
            package: "xtask test".into(),
        };
        let s = Server::bind(
            &path,
            Config::new(greeting),
            Arc::new(Echo(events.clone())),
            events,
        )
        .unwrap();
        (s, path)
    }

    fn call(
        path: &Path,
        cmd: &str,
        args: Option<&str>,
        events: bool,
    ) -> (Result<bool, String>, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let o = Options {
            events,
            timeout: Duration::from_secs(300),
        };
        let r = parse_args(args).and_then(|a| run(path, cmd, a, &o, &mut out, &mut err));
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn prints_the_return_as_pretty_json() {
        let (_s, path) = server("return");
        let (r, out, err) = call(
            &path,
            "echo",
            Some(r#"{"uri": "tcp:h:1", "n": [1]}"#),
            false,
        );
        assert_eq!(r, Ok(true));
        assert_eq!(
            out,
            "{\n  \"n\": [\n    1\n  ],\n  \"uri\": \"tcp:h:1\"\n}\n"
        );
        assert_eq!(err, "", "events are not shown without --events");
    }

    #[test]
    fn events_are_shown_on_stderr_when_asked() {
        let (_s, path) = server("events");
        let (r, out, err) = call(&path, "echo", None, true);
        assert_eq!(r, Ok(true));
        assert_eq!(out, "{}\n");
        let ev: Value = serde_json::from_str(err.trim_end()).unwrap();
        assert_eq!(ev["event"], json!("ECHOED"));
        assert_eq!(ev["data"], json!({"n": 0}));
    }

    #[test]
    fn a_qmp_error_is_class_and_desc_on_stderr() {
        let (_s, path) = server("error");
        let (r, out, err) = call(&path, "fail", None, false);
        assert_eq!(r, Ok(false), "exit status 1");
        assert_eq!(out, "");
        assert_eq!(err, "GenericError: it failed\n");
        let (r, _, err) = call(&path, "nonesuch", None, false);
        assert_eq!(r, Ok(false));
        assert_eq!(
            err,
            "CommandNotFound: The command nonesuch has not been found\n"
        );
    }

    #[test]
    fn bad_arguments_and_sockets_are_usage_errors() {
        let (_s, path) = server("usage");
        for bad in ["[1]", "not json", "\"x\""] {
            let (r, out, _) = call(&path, "echo", Some(bad), false);
            assert!(
                r.as_ref().is_err_and(|e| e.contains("JSON-ARGS")),
                "{bad}: {r:?}"
            );
            assert_eq!(out, "");
        }
        let (r, _, _) = call(Path::new("/nonexistent/qmp.sock"), "echo", None, false);
        assert!(r.is_err_and(|e| e.contains("cannot connect")));
    }
}
