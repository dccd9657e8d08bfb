//! A fault-injecting TCP proxy: a bad link between a source and a
//! destination on loopback. It forwards both directions of every connection
//! until told to cut them all.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A proxy in front of `upstream`: connect to [`Proxy::uri`] instead.
pub struct Proxy {
    port: u16,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    cut: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: Arc<AtomicBool>, counter: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.load(Ordering::Acquire) || to.write_all(&buf[..n]).is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to
    /// `upstream` (`host:port`), on a connection of its own.
    pub fn start(upstream: &str) -> Result<Proxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("proxy: bind: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("proxy: {e}"))?
            .port();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let cut = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let (s2, c2, f2) = (
            Arc::clone(&streams),
            Arc::clone(&cut),
            Arc::clone(&forwarded),
        );
        let acceptor = std::thread::spawn(move || {
            // Every connection (a migration may open a second one: the
            // postcopy preempt channel), until the link is cut.
            let mut pumps = Vec::new();
            for client in listener.incoming() {
                if c2.load(Ordering::Acquire) {
                    break;
                }
                let Ok(client) = client else {
                    break;
                };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    break;
                };
                let clones = (client.try_clone(), server.try_clone());
                let (Ok(c2c), Ok(s2c)) = clones else {
                    break;
                };
                if let Ok(mut v) = s2.lock() {
                    v.extend(client.try_clone());
                    v.extend(server.try_clone());
                }
                let (ca, fa) = (Arc::clone(&c2), Arc::clone(&f2));
                pumps.push(std::thread::spawn(move || pump(client, s2c, ca, fa)));
                let (cb, fb) = (Arc::clone(&c2), Arc::clone(&f2));
                pumps.push(std::thread::spawn(move || pump(server, c2c, cb, fb)));
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        Ok(Proxy {
            port,
            streams,
            cut,
            forwarded,
            threads: vec![acceptor],
        })
    }

    /// Where the source connects: `tcp:127.0.0.1:PORT`.
    pub fn uri(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    /// Bytes forwarded so far, both directions.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Cuts the link: both connections are reset from the middle.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        if let Ok(v) = self.streams.lock() {
            for s in v.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        // Unblocks an accept that never got a connection.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
