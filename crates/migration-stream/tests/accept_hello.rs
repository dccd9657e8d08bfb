//! `Listener::accept_hello` against strangers: a connection that says
//! nothing, garbage, the wrong role, too many at once, a cancel; over TCP
//! and Unix sockets, and the one-shot `file:` listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use migration_stream::{
    connect, Connection, Error, ErrorKind, Hello, Listener, MigrationId, MigrationUri, Record,
    Role, StreamReader, StreamWriter, TransportError, MAGIC, MAX_PENDING_HELLOS, PREAMBLE_LEN,
};

/// Long enough that no test can pass by waiting it out.
const LONG: Duration = Duration::from_secs(300);

/// A read on a client that must not hang the test run if the listener
/// misbehaves.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn listeners(name: &str) -> Vec<Listener> {
    let path = std::env::temp_dir().join(format!(
        "migration-stream-hello-{}-{name}.sock",
        std::process::id()
    ));
    vec![
        Listener::bind_str("tcp:127.0.0.1:0").unwrap(),
        Listener::bind(&MigrationUri::Unix { path }).unwrap(),
    ]
}

/// Connects and sends `bytes` without closing.
fn send(uri: &MigrationUri, bytes: &[u8]) -> Connection {
    let mut c = connect(uri, Role::Main).unwrap();
    c.writer.write_all(bytes).unwrap();
    c.writer.flush().unwrap();
    c
}

/// A real source: its preamble, then a `Complete` frame.
fn source(uri: &MigrationUri, role: Role, id: MigrationId) -> Connection {
    let c = connect(uri, role).unwrap();
    let mut w = StreamWriter::new(c.writer);
    w.write_preamble(&Hello::new(role, id)).unwrap();
    w.write_complete().unwrap();
    w.flush().unwrap();
    Connection {
        writer: Box::new(w.into_inner().unwrap()),
        ..c
    }
}

/// The listener has closed `c`: it reads end of file, or a reset where the
/// listener closed a TCP socket with bytes it had not read.
fn assert_closed_by_listener(c: Connection) {
    c.handle.set_link_timeout(Some(HANG_GUARD)).unwrap();
    let mut r = c.reader;
    let mut buf = [0u8; 1];
    match r.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "the listener sent bytes"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// The accepted connection goes on after the preamble: the next frame is
/// the source's `Complete`.
fn assert_stream_follows(conn: Connection) {
    let mut r = StreamReader::new(conn.reader);
    assert_eq!(r.read_record(&()).unwrap(), Record::Complete);
}

type Rejects = Vec<(String, Error)>;

/// Runs `accept_hello` on `l` while `client` runs with the listener's URI
/// and a receiver of each rejection's text; returns what both returned and
/// every rejection.
fn run<T: Send + 'static>(
    l: &Listener,
    role: Role,
    hello_timeout: Duration,
    client: impl FnOnce(MigrationUri, mpsc::Receiver<String>) -> T + Send + 'static,
) -> (Result<(Connection, Hello), TransportError>, T, Rejects) {
    let (tx, rx) = mpsc::channel();
    let uri = l.local_uri().clone();
    let client = thread::spawn(move || client(uri, rx));
    let mut rejects = Vec::new();
    let result = l.accept_hello(role, hello_timeout, &mut |peer, e| {
        let _ = tx.send(e.to_string());
        rejects.push((peer.to_owned(), clone_error(e)));
    });
    drop(tx);
    (result, client.join().unwrap(), rejects)
}

/// Enough of an `Error` to assert on (it is not `Clone`: it may hold an
/// `io::Error`).
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Io { context, source } => Error::Io {
            context,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::BadMagic { found, expected } => Error::BadMagic {
            found: *found,
            expected: *expected,
        },
        Error::RoleMismatch { expected, found } => Error::RoleMismatch {
            expected: *expected,
            found: *found,
        },
        Error::TooManyPendingHellos { max } => Error::TooManyPendingHellos { max: *max },
        Error::Closed => Error::Closed,
        other => panic!("unexpected rejection {other:?}"),
    }
}

#[test]
fn a_silent_connection_does_not_keep_the_source_out() {
    for l in listeners("silent") {
        let id = MigrationId::generate();
        let (result, (silent, src), rejects) = run(&l, Role::Main, LONG, move |uri, _| {
            let silent = connect(&uri, Role::Main).unwrap();
            thread::sleep(Duration::from_millis(100));
            (silent, source(&uri, Role::Main, id))
        });
        // Returned with a 300 s hello timeout while the test still held the
        // silent connection open: it was read alongside, not before.
        let (conn, hello) = result.unwrap();
        hello.expect(Role::Main, id).unwrap();
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(conn.handle.link_timeout(), None, "the caller sets its own");
        assert_stream_follows(conn);
        // The silent one was closed when accept_hello returned.
        assert_closed_by_listener(silent);
        drop(src);
    }
}

#[test]
fn garbage_is_rejected_and_the_source_accepted() {
    for l in listeners("garbage") {
        let id = MigrationId::generate();
        let (result, (garbage, src), rejects) = run(&l, Role::Main, LONG, move |uri, rejected| {
            let garbage = send(&uri, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n...");
            // The source connects once the garbage was turned away.
            rejected.recv().unwrap();
            (garbage, source(&uri, Role::Main, id))
        });
        let (conn, hello) = result.unwrap();
        hello.expect(Role::Main, id).unwrap();
        assert_eq!(rejects.len(), 1, "{rejects:?}");
        let (peer, e) = &rejects[0];
        assert!(
            peer.starts_with("tcp:127.0.0.1:") || peer.starts_with("unix:"),
            "{peer}"
        );
        assert!(
            matches!(e, Error::BadMagic { found: 0x4745_5420, expected } if *expected == MAGIC),
            "{e:?}"
        );
        assert!(e.to_string().contains("bad stream magic 0x47455420"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert_closed_by_listener(garbage);
        assert_stream_follows(conn);
        drop(src);
    }
}

#[test]
fn the_wrong_role_is_rejected() {
    for l in listeners("role") {
        let id = MigrationId::generate();
        let (result, (wrong, src), rejects) =
            run(&l, Role::PostcopyPreempt, LONG, move |uri, rejected| {
                let wrong = source(&uri, Role::Main, id);
                rejected.recv().unwrap();
                (wrong, source(&uri, Role::PostcopyPreempt, id))
            });
        let (conn, hello) = result.unwrap();
        hello.expect(Role::PostcopyPreempt, id).unwrap();
        assert!(
            matches!(
                rejects[..],
                [(
                    _,
                    Error::RoleMismatch {
                        expected: Role::PostcopyPreempt,
                        found: Role::Main
                    }
                )]
            ),
            "{rejects:?}"
        );
        assert_closed_by_listener(wrong);
        assert_stream_follows(conn);
        drop(src);
    }
}

#[test]
fn a_peer_that_says_too_little_times_out() {
    for l in listeners("timeout") {
        let id = MigrationId::generate();
        let (result, (silent, dripper, src), rejects) = run(
            &l,
            Role::Main,
            Duration::from_millis(300),
            move |uri, rejected| {
                let silent = connect(&uri, Role::Main).unwrap();
                rejected.recv().unwrap();
                let dripper = send(&uri, b"RMIG");
                rejected.recv().unwrap();
                (silent, dripper, source(&uri, Role::Main, id))
            },
        );
        result.unwrap().1.expect(Role::Main, id).unwrap();
        let texts: Vec<String> = rejects
            .iter()
            .map(|(_, e)| {
                assert_eq!(e.kind(), ErrorKind::Link, "{e:?}");
                let Error::Io { source, .. } = e else {
                    panic!("{e:?}")
                };
                assert_eq!(source.kind(), std::io::ErrorKind::TimedOut);
                source.to_string()
            })
            .collect();
        assert_eq!(
            texts,
            [
                "the peer sent nothing for 0.3 s".to_string(),
                format!("the peer sent 4 of the {PREAMBLE_LEN} bytes of its hello in 0.3 s"),
            ]
        );
        assert_closed_by_listener(silent);
        assert_closed_by_listener(dripper);
        drop(src);
    }
}

#[test]
fn connections_past_the_cap_are_closed_at_once() {
    for l in listeners("cap") {
        let id = MigrationId::generate();
        let (result, (silent, extra, src), rejects) =
            run(&l, Role::Main, LONG, move |uri, rejected| {
                let mut silent: Vec<Connection> = (0..MAX_PENDING_HELLOS)
                    .map(|_| connect(&uri, Role::Main).unwrap())
                    .collect();
                // One too many: turned away unread.
                let extra = connect(&uri, Role::Main).unwrap();
                rejected.recv().unwrap();
                // One of the waiting strangers leaves, which makes room.
                drop(silent.pop());
                rejected.recv().unwrap();
                (silent, extra, source(&uri, Role::Main, id))
            });
        result.unwrap().1.expect(Role::Main, id).unwrap();
        assert!(
            matches!(
                rejects[..],
                [
                    (
                        _,
                        Error::TooManyPendingHellos {
                            max: MAX_PENDING_HELLOS
                        }
                    ),
                    (_, Error::Closed)
                ]
            ),
            "{rejects:?}"
        );
        assert_eq!(rejects[0].1.kind(), ErrorKind::Local);
        assert_closed_by_listener(extra);
        for c in silent {
            assert_closed_by_listener(c);
        }
        drop(src);
    }
}

#[test]
fn cancel_ends_the_wait_while_a_hello_is_pending() {
    for l in listeners("cancel") {
        let canceller = l.canceller();
        let (result, silent, rejects) = run(&l, Role::Main, LONG, move |uri, _| {
            let silent = connect(&uri, Role::Main).unwrap();
            // Time for the listener to take the connection and wait for its
            // hello; the test holds for either order.
            thread::sleep(Duration::from_millis(200));
            canceller.cancel();
            silent
        });
        assert!(
            matches!(result, Err(TransportError::Cancelled { .. })),
            "{result:?}"
        );
        assert_eq!(result.unwrap_err().kind(), ErrorKind::Local);
        assert!(rejects.is_empty(), "closing on cancel is no rejection");
        assert_closed_by_listener(silent);
        // And it stays cancelled.
        assert!(matches!(
            l.accept_hello(Role::Main, LONG, &mut |_, _| {}),
            Err(TransportError::Cancelled { .. })
        ));
    }
}

#[test]
fn a_zero_hello_timeout_is_refused() {
    let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
    let e = l
        .accept_hello(Role::Main, Duration::ZERO, &mut |_, _| {})
        .unwrap_err();
    assert!(matches!(e, TransportError::Setup { .. }), "{e:?}");
}

fn file_with(name: &str, bytes: &[u8]) -> (Listener, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "migration-stream-hello-{}-{name}.bin",
        std::process::id()
    ));
    std::fs::write(&path, bytes).unwrap();
    (
        Listener::bind(&MigrationUri::File { path: path.clone() }).unwrap(),
        path,
    )
}

#[test]
fn a_file_listener_reads_its_preamble_once() {
    let id = MigrationId::generate();
    let mut good = Hello::new(Role::Main, id).to_preamble().to_vec();
    good.push(5); // the Complete frame tag
    let (l, path) = file_with("good", &good);
    let mut never = |_: &str, e: &Error| panic!("file reported {e}");
    let (conn, hello) = l.accept_hello(Role::Main, LONG, &mut never).unwrap();
    hello.expect(Role::Main, id).unwrap();
    assert!(!conn.handle.has_return_path());
    assert_stream_follows(conn);
    assert!(matches!(
        l.accept_hello(Role::Main, LONG, &mut never),
        Err(TransportError::Exhausted { .. })
    ));
    std::fs::remove_file(path).unwrap();

    let (l, path) = file_with("bad", b"QEVM\0\0\0\x03 not ours");
    let e = l.accept_hello(Role::Main, LONG, &mut never).unwrap_err();
    let TransportError::FileHello { source, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(matches!(source, Error::BadMagic { .. }), "{source:?}");
    assert_eq!(e.kind(), ErrorKind::Protocol);
    std::fs::remove_file(path).unwrap();

    // A file that ends before its preamble is a bad file, not a broken link.
    let (l, path) = file_with("empty", b"");
    let e = l.accept_hello(Role::Main, LONG, &mut never).unwrap_err();
    assert!(
        matches!(
            &e,
            TransportError::FileHello {
                source: Error::Closed,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::Protocol);
    std::fs::remove_file(path).unwrap();

    let (l, path) = file_with("role", &Hello::new(Role::ReturnPath, id).to_preamble());
    let e = l.accept_hello(Role::Main, LONG, &mut never).unwrap_err();
    assert!(
        matches!(
            &e,
            TransportError::FileHello {
                expected: Role::Main,
                source: Error::RoleMismatch {
                    found: Role::ReturnPath,
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_panicking_on_reject_does_not_leave_hellos_pending() {
    let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
    let uri = l.local_uri().clone();
    let client = thread::spawn(move || {
        let silent = connect(&uri, Role::Main).unwrap();
        thread::sleep(Duration::from_millis(100));
        (silent, send(&uri, b"not a preamble, not at all"))
    });
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        l.accept_hello(Role::Main, LONG, &mut |_, e| {
            panic!("caller gave up on {e}")
        })
    }));
    // Unwound while the silent connection, 300 s from its hello timeout,
    // was still open: its thread was ended, not waited for.
    assert!(unwound.is_err());
    let (silent, garbage) = client.join().unwrap();
    assert_closed_by_listener(silent);
    assert_closed_by_listener(garbage);
    // The listener is usable again, blocking as before.
    let id = MigrationId::generate();
    let uri = l.local_uri().clone();
    let src = thread::spawn(move || source(&uri, Role::Main, id));
    let conn = l.accept().unwrap();
    assert_eq!(
        migration_stream::read_preamble(&mut { conn.reader }).unwrap(),
        Hello::new(Role::Main, id)
    );
    drop(src.join().unwrap());
}
