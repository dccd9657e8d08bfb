//! `Listener::accept_hello` joins every thread it starts: after a burst of
//! rejected connections the process has as many threads as before. Alone in
//! its test binary, so no other test's threads come and go meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use migration_stream::{connect, Hello, Listener, MigrationId, Role, StreamWriter};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_burst_of_rejected_connections_leaves_no_thread_behind() {
    let l = Listener::bind_str("tcp:127.0.0.1:0").unwrap();
    let uri = l.local_uri().clone();
    let id = MigrationId::generate();
    let before = threads();

    let (rejections, rejected_rx) = mpsc::channel();
    let client = thread::spawn(move || {
        // Twenty strangers at once, all still connected when the source
        // arrives: some are read and rejected, some turned away at the cap.
        let strangers: Vec<_> = (0..20)
            .map(|i| {
                let mut c = connect(&uri, Role::Main).unwrap();
                c.writer.write_all(&[i; 29]).unwrap();
                c.writer.flush().unwrap();
                c
            })
            .collect();
        // The source comes once every stranger was turned away (arriving
        // in the middle of the burst, it could meet the cap too).
        for _ in 0..20 {
            rejected_rx.recv().unwrap();
        }
        let c = connect(&uri, Role::Main).unwrap();
        let mut w = StreamWriter::new(c.writer);
        w.write_preamble(&Hello::new(Role::Main, id)).unwrap();
        w.flush().unwrap();
        (strangers, w)
    });
    let mut rejected = 0;
    let (conn, hello) = l
        .accept_hello(Role::Main, Duration::from_secs(300), &mut |_, _| {
            rejected += 1;
            let _ = rejections.send(());
        })
        .unwrap();
    hello.expect(Role::Main, id).unwrap();
    let (strangers, source) = client.join().unwrap();
    assert_eq!(rejected, 20);
    drop((conn, strangers, source));

    // A joined thread can linger in /proc for a moment after its join.
    let mut now = threads();
    for _ in 0..1000 {
        if now == before {
            break;
        }
        thread::sleep(Duration::from_millis(10));
        now = threads();
    }
    assert_eq!(now, before, "threads before the burst and after it");
}
