//! Link timeouts over every socket transport (TCP, Unix, the in-memory
//! socket pair): a silent peer fails a read, a peer that never reads fails
//! a write once the buffers are full, each with an error that says what
//! happened and after how long; without a timeout a read waits until the
//! connection is shut down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Read, Write};
use std::thread;
use std::time::Duration;

use migration_stream::{
    connect, memory_pair, read_preamble, BlockId, Connection, Error, ErrorKind, Listener,
    MigrationUri, Role, StreamWriter,
};

const TIMEOUT: Duration = Duration::from_millis(200);

/// A connected pair of each socket transport, with its name.
fn pairs() -> Vec<(&'static str, Connection, Connection)> {
    let tcp = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
    let a = connect(tcp.local_uri(), Role::Main).unwrap();
    let b = tcp.accept().unwrap();
    let path = std::env::temp_dir().join(format!(
        "migration-stream-link-{}-{:?}.sock",
        std::process::id(),
        thread::current().id()
    ));
    let unix = Listener::bind(&MigrationUri::Unix { path }).unwrap();
    let ua = connect(unix.local_uri(), Role::Main).unwrap();
    let ub = unix.accept().unwrap();
    let (ma, mb) = memory_pair();
    vec![("tcp", a, b), ("unix", ua, ub), ("memory", ma, mb)]
}

#[test]
fn a_silent_peer_times_out_a_read() {
    for (name, a, b) in pairs() {
        assert_eq!(a.handle.link_timeout(), None, "{name}");
        a.handle.set_link_timeout(Some(TIMEOUT)).unwrap();
        assert_eq!(a.handle.link_timeout(), Some(TIMEOUT), "{name}");
        let mut reader = a.reader;
        let mut buf = [0u8; 16];
        let e = reader.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{name}: {e}");
        assert_eq!(e.to_string(), "the peer sent nothing for 0.2 s", "{name}");

        // Through the decoder: a link error, with the reason in its source.
        let e = read_preamble(&mut reader).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Link, "{name}: {e}");
        let Error::Io { source, .. } = &e else {
            panic!("{name}: {e:?}")
        };
        assert_eq!(source.kind(), io::ErrorKind::TimedOut);

        // Nothing was lost at a frame boundary: once the peer speaks, the
        // link works again.
        let mut bw = b.writer;
        bw.write_all(b"hello").unwrap();
        bw.flush().unwrap();
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello", "{name}");
        drop(b.reader);
    }
}

#[test]
fn a_peer_that_never_reads_times_out_a_write() {
    for (name, a, b) in pairs() {
        a.handle.set_link_timeout(Some(TIMEOUT)).unwrap();
        // The peer holds its end open and reads nothing.
        let _silent = b;
        let mut w = StreamWriter::new(a.writer);
        let page = [0x5a; 4096];
        let mut sent = 0u64;
        let e = loop {
            // A guard against a writer that would never time out; the
            // kernel buffers of a loopback connection are far smaller.
            assert!(
                sent < 1 << 30,
                "{name}: 1 GiB written to a peer that reads nothing"
            );
            if let Err(e) = w.write_page(BlockId(0), 0, &page).and_then(|()| w.flush()) {
                break e;
            }
            sent += 4096;
        };
        assert!(sent > 0, "{name}: the buffers took nothing");
        assert_eq!(e.kind(), ErrorKind::Link, "{name}: {e}");
        let Error::Io { source, .. } = &e else {
            panic!("{name}: {e:?}")
        };
        assert_eq!(source.kind(), io::ErrorKind::TimedOut, "{name}");
        assert_eq!(
            source.to_string(),
            "the peer read nothing for 0.2 s",
            "{name}"
        );
    }
}

/// Spawns a read on `c`, checks it is still waiting after a while, shuts the
/// connection down and checks the read then sees end of file.
fn read_waits_until_shutdown(name: &str, c: Connection) {
    let handle = c.handle.clone();
    let mut reader = c.reader;
    let t = thread::spawn(move || {
        let mut buf = [0u8; 16];
        reader.read(&mut buf)
    });
    // Longer than the timeout the other tests use; the read must still be
    // waiting.
    thread::sleep(3 * TIMEOUT);
    assert!(
        !t.is_finished(),
        "{name}: the read returned without a timeout"
    );
    handle.shutdown().unwrap();
    assert_eq!(t.join().unwrap().unwrap(), 0, "{name}");
}

#[test]
fn without_a_timeout_reads_wait_until_shutdown() {
    for (name, a, _b) in pairs() {
        read_waits_until_shutdown(name, a);
    }
    // Clearing a timeout that was set waits for ever again.
    for (name, a, _b) in pairs() {
        a.handle.set_link_timeout(Some(TIMEOUT)).unwrap();
        a.handle.set_link_timeout(None).unwrap();
        assert_eq!(a.handle.link_timeout(), None);
        read_waits_until_shutdown(name, a);
    }
}

#[test]
fn zero_is_refused_and_sockets_have_a_return_path() {
    for (name, a, _b) in pairs() {
        assert!(a.handle.has_return_path(), "{name}");
        let e = a.handle.set_link_timeout(Some(Duration::ZERO)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name}");
        assert_eq!(a.handle.link_timeout(), None, "{name}");
    }
}

#[test]
fn files_have_no_return_path_and_no_timeout() {
    let path =
        std::env::temp_dir().join(format!("migration-stream-link-{}.bin", std::process::id()));
    let uri = MigrationUri::File { path: path.clone() };
    let src = connect(&uri, Role::Main).unwrap();
    assert!(!src.handle.has_return_path());
    src.handle.set_link_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(src.handle.link_timeout(), None);
    drop(src);
    let dst = Listener::bind(&uri).unwrap().accept().unwrap();
    assert!(!dst.handle.has_return_path());
    assert_eq!(dst.handle.peer(), uri.to_string());
    std::fs::remove_file(path).unwrap();
}
