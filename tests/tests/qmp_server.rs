//! The QMP server over many connections: every thread it starts is joined and every
//! descriptor closed, while it runs and when it is dropped.
//!
//! A test binary of its own, with one test, so that nothing else in the process starts
//! threads or opens files: `/proc/self/task` and `/proc/self/fd` count only what this
//! test and the server do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::harness::HANG_GUARD;
use serde_json::{json, Map, Value};
use vmm_glue::qmp::server::{Config, EventSink, Greeting, Handler, QmpError, Server};

struct Echo;

impl Handler for Echo {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "echo" => Ok(Value::Object(args.clone())),
            "boom" => panic!("a handler bug (expected by this test)"),
            other => Err(QmpError::not_found(other)),
        }
    }

    fn after_reply(&self, _command: &str) {}
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn threads() -> usize {
    count("/proc/self/task")
}

fn fds() -> usize {
    count("/proc/self/fd")
}

/// Waits until `now()` is `want`: threads end and sockets close a moment after the
/// peer sees the connection end. The guard only stops a hang.
fn settle(what: &str, want: usize, now: impl Fn() -> usize) {
    let start = Instant::now();
    loop {
        let n = now();
        if n == want {
            return;
        }
        assert!(
            start.elapsed() < HANG_GUARD,
            "{what}: {n}, expected to come back to {want}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let w = UnixStream::connect(path).unwrap();
        let mut c = Client {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        };
        assert!(c.recv().unwrap().get("QMP").is_some(), "a greeting first");
        c
    }

    fn recv(&mut self) -> Option<Value> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&l).unwrap()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read: {e}"),
        }
    }

    fn cmd(&mut self, line: &str) -> Value {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
        loop {
            let v = self.recv().expect("a reply");
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

#[test]
fn connections_leave_threads_and_descriptors_as_they_were() {
    let dir = std::env::temp_dir().join(format!("qmp-server-cycles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qmp.sock");
    let (threads_before, fds_before) = (threads(), fds());

    let events = EventSink::new();
    let greeting = Greeting {
        version: (9, 2, 0),
        package: "cycles".into(),
    };
    let server =
        Server::bind(&path, Config::new(greeting), Arc::new(Echo), events.clone()).unwrap();
    let (threads_idle, fds_idle) = (threads(), fds());

    for i in 0..200u64 {
        let mut c = Client::connect(&path);
        match i % 4 {
            // Negotiates, runs a command, gets an event, hangs up.
            0 | 1 => {
                assert_eq!(
                    c.cmd(r#"{"execute": "qmp_capabilities"}"#),
                    json!({"return": {}})
                );
                assert_eq!(
                    c.cmd(&format!(
                        r#"{{"execute": "echo", "arguments": {{"i": {i}}}, "id": {i}}}"#
                    )),
                    json!({"return": {"i": i}, "id": i})
                );
                events.emit("CYCLE", Some(json!({"i": i})));
                assert_eq!(c.recv().unwrap()["data"], json!({"i": i}));
            }
            // Hangs up after the greeting.
            2 => {}
            // Hangs up in the middle of a line, after closing its sending side.
            _ => {
                c.w.write_all(br#"{"execute": "qmp_capab"#).unwrap();
                c.w.shutdown(std::net::Shutdown::Write).unwrap();
                let reply = c.recv().expect("an answer to the partial line");
                assert_eq!(reply["error"]["class"], json!("GenericError"), "{reply}");
                assert_eq!(c.recv(), None, "then the end of the stream");
            }
        }
        drop(c);
        events.emit("AFTER", None);
    }
    // A handler that panics costs its client the connection, and no thread or
    // descriptor; the server goes on.
    let mut c = Client::connect(&path);
    assert_eq!(
        c.cmd(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    c.w.write_all(b"{\"execute\": \"boom\"}\n").unwrap();
    assert_eq!(c.recv(), None, "the connection ends");
    drop(c);
    settle("threads while the server runs", threads_idle, threads);
    settle("descriptors while the server runs", fds_idle, fds);

    // A client still connected when the server goes: it is closed, its threads joined.
    let mut last = Client::connect(&path);
    assert_eq!(
        last.cmd(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    drop(server);
    assert_eq!(last.recv(), None, "the server closed the connection");
    drop(last);
    settle(
        "threads after the server is dropped",
        threads_before,
        threads,
    );
    settle("descriptors after the server is dropped", fds_before, fds);
    assert!(!path.exists(), "the socket file is removed");
    // An event with nobody to receive it goes nowhere, without blocking.
    events.emit("NOBODY", None);
    let _ = std::fs::remove_dir_all(&dir);
}
