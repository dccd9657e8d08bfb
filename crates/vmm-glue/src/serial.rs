//! A 16550 UART for a VMM: vm-superio's (the UART of Firecracker and Cloud
//! Hypervisor) on eight I/O ports, with its interrupt line, its output to a
//! file and/or a Unix socket, its input from that socket, and its registers
//! migrating as a [`DeviceState`] named `serial`.
//!
//! # Backends
//!
//! - A **file** ([`SerialConfig::log`]): every byte the guest transmits is
//!   appended to it.
//! - A **Unix socket** ([`SerialConfig::socket`]): the UART listens on it,
//!   like a terminal server. One client at a time (a new client replaces
//!   the old): it receives what the guest transmits and what it writes
//!   reaches the guest's receive FIFO (with an interrupt), 64 bytes at a
//!   time as the guest drains it. A client that stops reading for
//!   [`CLIENT_WRITE_TIMEOUT`] is dropped, so it never stalls the vCPU that
//!   writes to the UART. Bytes typed while the guest does not read wait in
//!   the client thread; they are not part of the migrated state.
//!
//! Both may be used together; with neither, output is discarded.
//!
//! # Interrupts
//!
//! The guest sees the UART's interrupt through an [`Interrupt`] the VMM
//! connects with [`Serial::connect_interrupt`] (with KVM:
//! [`KvmVm::irqfd`](crate::kvm::KvmVm::irqfd) on GSI [`COM1_IRQ`]). Until
//! then the guest must poll, as the boot-sector and built-in guests do.
//!
//! # Threads
//!
//! With a socket, one thread accepts clients and one reads the current
//! client. Dropping the [`Serial`] stops and joins both.
//!
//! # State (`serial`, version 1)
//!
//! Nine register bytes (divisor low and high, IER, IIR, LCR, LSR, MCR,
//! MSR, scratch), the receive FIFO (a length byte, at most 64, and the
//! bytes), and the bytes transmitted since the guest started (`u64`,
//! little-endian).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Trigger;

use crate::io::Interrupt;
use crate::session::{DeviceState, StateError};

/// COM1's base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA interrupt (GSI 4 with KVM's default routing).
pub const COM1_IRQ: u32 = 4;
/// Ports of the UART.
const PORTS: u16 = 8;
/// Version of the `serial` section.
const STATE_VERSION: u32 = 1;
/// The receive FIFO's size in vm-superio.
const FIFO_MAX: usize = 64;
/// How long a socket client may refuse the guest's output before it is
/// dropped.
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_millis(500);

/// Where a [`Serial`] sends the guest's output and takes its input from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SerialConfig {
    /// A file the output is appended to.
    pub log: Option<PathBuf>,
    /// A Unix socket to listen on (an existing socket file is replaced).
    pub socket: Option<PathBuf>,
}

impl SerialConfig {
    /// Output discarded, no input.
    pub fn new() -> Self {
        Self::default()
    }

    /// With the output appended to `path`.
    pub fn with_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// With a listening Unix socket at `path` for a terminal client.
    pub fn with_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }
}

/// The interrupt line, connected once the VMM has one.
#[derive(Clone, Default)]
struct Irq(Arc<OnceLock<Arc<dyn Interrupt>>>);

impl Trigger for Irq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        match self.0.get() {
            Some(line) => line.trigger(),
            None => Ok(()),
        }
    }
}

/// Counts transmitted bytes; wakes the input thread when the FIFO drains.
#[derive(Default)]
struct Events {
    tx: AtomicU64,
    lost: AtomicU64,
    drained: Mutex<bool>,
    drained_cv: Condvar,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.tx.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {
        *self.drained.lock() = true;
        self.drained_cv.notify_all();
    }
}

/// The guest's output: the log file and the socket client, each optional.
struct Out {
    log: Option<File>,
    client: Arc<Mutex<Option<UnixStream>>>,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = &mut self.log {
            // Console output is best effort: a full disk must not stop
            // the guest.
            if let Err(e) = f.write_all(buf) {
                log::debug!("serial log: {e}");
            }
        }
        let mut client = self.client.lock();
        if let Some(c) = client.as_mut() {
            if let Err(e) = c.write_all(buf) {
                log::info!("serial: dropping the socket client: {e}");
                let _ = c.shutdown(std::net::Shutdown::Both);
                *client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Uart = vm_superio::Serial<Irq, Arc<Events>, Out>;

/// What the UART and its threads share.
struct Inner {
    uart: Mutex<Option<Uart>>,
    events: Arc<Events>,
    client: Arc<Mutex<Option<UnixStream>>>,
    stop: AtomicBool,
}

/// A 16550 UART (see the module documentation).
pub struct Serial {
    inner: Arc<Inner>,
    irq: Irq,
    base: u16,
    socket: Option<PathBuf>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("base", &self.base)
            .field("socket", &self.socket)
            .field("tx", &self.tx_count())
            .finish()
    }
}

impl Serial {
    /// A UART on ports `base..base + 8` with the backends of `config`.
    /// Fails when the log file cannot be opened or the socket not bound.
    pub fn new(base: u16, config: &SerialConfig) -> io::Result<Serial> {
        let log =
            match &config.log {
                Some(p) => Some(File::options().create(true).append(true).open(p).map_err(
                    |e| io::Error::new(e.kind(), format!("serial log {}: {e}", p.display())),
                )?),
                None => None,
            };
        let events = Arc::new(Events::default());
        let client = Arc::new(Mutex::new(None));
        let irq = Irq::default();
        let out = Out {
            log,
            client: Arc::clone(&client),
        };
        let inner = Arc::new(Inner {
            uart: Mutex::new(Some(vm_superio::Serial::with_events(
                irq.clone(),
                Arc::clone(&events),
                out,
            ))),
            events,
            client,
            stop: AtomicBool::new(false),
        });
        let acceptor = match &config.socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("serial socket {}: {e}", path.display()))
                })?;
                let inner = Arc::clone(&inner);
                Some(
                    std::thread::Builder::new()
                        .name("serial-accept".into())
                        .spawn(move || accept_loop(&listener, &inner))?,
                )
            }
            None => None,
        };
        Ok(Serial {
            inner,
            irq,
            base,
            socket: config.socket.clone(),
            acceptor,
        })
    }

    /// COM1 (ports `0x3f8..0x400`) with the backends of `config`.
    pub fn com1(config: &SerialConfig) -> io::Result<Serial> {
        Serial::new(COM1_BASE, config)
    }

    /// Connects the UART's interrupt line (once; later calls are ignored
    /// and return false).
    pub fn connect_interrupt(&self, line: Arc<dyn Interrupt>) -> bool {
        self.irq.0.set(line).is_ok()
    }

    /// Bytes the guest transmitted since it started (across migrations).
    pub fn tx_count(&self) -> u64 {
        self.inner.events.tx.load(Ordering::Relaxed)
    }

    /// A guest write to `port`, if it is one of this UART's.
    pub fn port_write(&self, port: u16, value: u8) -> bool {
        let Some(offset) = self.offset(port) else {
            return false;
        };
        if let Some(u) = self.inner.uart.lock().as_mut() {
            if let Err(e) = u.write(offset, value) {
                log::debug!("serial write: {e:?}");
            }
        }
        true
    }

    /// A guest read of `port`, if it is one of this UART's.
    pub fn port_read(&self, port: u16) -> Option<u8> {
        let offset = self.offset(port)?;
        Some(
            self.inner
                .uart
                .lock()
                .as_mut()
                .map_or(0xff, |u| u.read(offset)),
        )
    }

    /// Puts `bytes` into the receive FIFO as far as it has room (raising
    /// the interrupt); returns how many went in.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        enqueue(&self.inner, bytes)
    }

    fn offset(&self, port: u16) -> Option<u8> {
        port.checked_sub(self.base)
            .filter(|o| *o < PORTS)
            .and_then(|o| u8::try_from(o).ok())
    }
}

fn enqueue(inner: &Inner, bytes: &[u8]) -> usize {
    let mut g = inner.uart.lock();
    let Some(u) = g.as_mut() else { return 0 };
    let n = u.fifo_capacity().min(bytes.len());
    if n == 0 {
        return 0;
    }
    *inner.events.drained.lock() = false;
    match u.enqueue_raw_bytes(&bytes[..n]) {
        Ok(k) => k,
        Err(e) => {
            log::debug!("serial input: {e:?}");
            0
        }
    }
}

/// Accepts clients one after the other; each new one replaces the last.
fn accept_loop(listener: &UnixListener, inner: &Arc<Inner>) {
    let mut reader: Option<(UnixStream, JoinHandle<()>)> = None;
    let drop_reader = |r: &mut Option<(UnixStream, JoinHandle<()>)>| {
        if let Some((s, h)) = r.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
            if h.join().is_err() {
                log::error!("serial input thread panicked");
            }
        }
    };
    for conn in listener.incoming() {
        if inner.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("serial socket accept: {e}");
                continue;
            }
        };
        drop_reader(&mut reader);
        let (Ok(for_output), Ok(for_reader), Ok(for_stop)) =
            (stream.try_clone(), stream.try_clone(), stream.try_clone())
        else {
            continue;
        };
        let _ = for_output.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
        *inner.client.lock() = Some(for_output);
        let inner2 = Arc::clone(inner);
        match std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || input_loop(for_reader, &inner2))
        {
            Ok(h) => reader = Some((for_stop, h)),
            Err(e) => log::warn!("serial: cannot start the input thread: {e}"),
        }
    }
    drop_reader(&mut reader);
    if let Some(c) = inner.client.lock().take() {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

/// Feeds what the client types into the receive FIFO as the guest drains
/// it.
fn input_loop(mut stream: UnixStream, inner: &Inner) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            if inner.stop.load(Ordering::SeqCst) {
                return;
            }
            let k = enqueue(inner, pending);
            pending = &pending[k..];
            if !pending.is_empty() {
                // Until the guest empties the FIFO; a short timeout also
                // covers a FIFO replaced by a migration's state.
                let mut drained = inner.events.drained.lock();
                if !*drained {
                    inner
                        .events
                        .drained_cv
                        .wait_for(&mut drained, Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            // Wakes the acceptor, which then sees `stop`.
            if let Some(p) = &self.socket {
                let _ = UnixStream::connect(p);
            }
            if h.join().is_err() {
                log::error!("serial accept thread panicked");
            }
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl DeviceState for Serial {
    fn name(&self) -> &str {
        "serial"
    }

    fn version(&self) -> u32 {
        STATE_VERSION
    }

    fn save(&self) -> Result<Vec<u8>, StateError> {
        let guard = self.inner.uart.lock();
        let s = guard
            .as_ref()
            .map(Uart::state)
            .ok_or_else(|| StateError::InvalidState("the serial port is being restored".into()))?;
        let mut v = vec![
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ];
        // The FIFO holds at most 64 bytes, so its length fits a byte.
        v.push(u8::try_from(s.in_buffer.len()).unwrap_or(u8::MAX));
        v.extend_from_slice(&s.in_buffer);
        v.extend_from_slice(&self.tx_count().to_le_bytes());
        Ok(v)
    }

    fn load(&self, version: u32, data: &[u8]) -> Result<(), StateError> {
        let bad = |why: String| StateError::malformed("serial", why);
        if version != STATE_VERSION {
            return Err(bad(format!(
                "version {version}, this side reads {STATE_VERSION}"
            )));
        }
        let (regs, rest) = data
            .split_at_checked(9)
            .ok_or_else(|| bad(format!("{} bytes", data.len())))?;
        let (&fifo_len, rest) = rest
            .split_first()
            .ok_or_else(|| bad("no FIFO length".into()))?;
        let fifo_len = usize::from(fifo_len);
        if fifo_len > FIFO_MAX || rest.len() != fifo_len + 8 {
            return Err(bad(format!(
                "FIFO of {fifo_len} bytes and {} bytes after it",
                rest.len()
            )));
        }
        let (fifo, tx) = rest.split_at(fifo_len);
        let mut count = [0u8; 8];
        count.copy_from_slice(tx);
        let state = SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: fifo.to_vec(),
        };
        let mut guard = self.inner.uart.lock();
        let old = guard
            .take()
            .ok_or_else(|| StateError::InvalidState("the serial port is being restored".into()))?;
        let out = old.into_writer();
        let uart = vm_superio::Serial::from_state(
            &state,
            self.irq.clone(),
            Arc::clone(&self.inner.events),
            out,
        );
        // The FIFO length was checked above, the one thing `from_state`
        // refuses.
        *guard = Some(uart.map_err(|e| bad(format!("{e:?}")))?);
        self.inner
            .events
            .tx
            .store(u64::from_le_bytes(count), Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use super::*;

    #[test]
    fn registers_and_count_survive_save_and_load() {
        let a = Serial::com1(&SerialConfig::new()).unwrap();
        a.port_write(COM1_BASE + 3, 0x83); // DLAB on
        a.port_write(COM1_BASE, 0x01); // divisor low
        a.port_write(COM1_BASE + 3, 0x03);
        a.port_write(COM1_BASE + 7, 0x5a); // scratch
        a.port_write(COM1_BASE, b'B');
        assert_eq!(a.tx_count(), 1);
        assert_eq!(
            a.port_read(COM1_BASE + 5).unwrap() & 0x20,
            0x20,
            "THR empty"
        );
        let b = Serial::com1(&SerialConfig::new()).unwrap();
        b.load(STATE_VERSION, &a.save().unwrap()).unwrap();
        assert_eq!(b.port_read(COM1_BASE + 7), Some(0x5a));
        assert_eq!(b.tx_count(), 1);
        b.port_write(COM1_BASE + 3, 0x83);
        assert_eq!(b.port_read(COM1_BASE), Some(0x01));
        assert!(b.load(2, &a.save().unwrap()).is_err());
        assert!(b.load(STATE_VERSION, &[0; 3]).is_err());
        let mut long = a.save().unwrap();
        long[9] = 65;
        assert!(b.load(STATE_VERSION, &long).is_err(), "FIFO over 64 bytes");
        assert_eq!(
            b.port_read(COM1_BASE + 7),
            Some(0x5a),
            "a refused state changes nothing"
        );
        assert_eq!(a.port_read(0x2f8), None, "not COM1");
    }

    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Reads the receive FIFO like a driver: while LSR says data ready.
    fn drain(s: &Serial) -> Vec<u8> {
        let mut got = Vec::new();
        while s.port_read(COM1_BASE + 5).unwrap() & 1 == 1 {
            got.push(s.port_read(COM1_BASE).unwrap());
        }
        got
    }

    #[test]
    fn a_socket_client_types_to_the_guest_and_reads_its_output() {
        let dir = std::env::temp_dir().join(format!("serial-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("com1.sock");
        let log = dir.join("com1.log");
        let _ = std::fs::remove_file(&log);
        let s = Serial::com1(&SerialConfig::new().with_log(&log).with_socket(&sock)).unwrap();
        let irq = Arc::new(Count(AtomicUsize::new(0)));
        assert!(s.connect_interrupt(irq.clone()));
        s.port_write(COM1_BASE + 1, 0x01); // IER: received data
        let mut c = UnixStream::connect(&sock).unwrap();
        // More than the FIFO holds: it arrives 64 bytes at a time.
        let typed: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).collect();
        c.write_all(&typed).unwrap();
        let mut got = Vec::new();
        let start = Instant::now();
        while got.len() < typed.len() && start.elapsed() < Duration::from_secs(60) {
            got.extend(drain(&s));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got, typed);
        assert!(irq.0.load(Ordering::SeqCst) >= 4, "an interrupt per refill");
        // The guest's output reaches the client and the log.
        for b in b"ok\n" {
            s.port_write(COM1_BASE, *b);
        }
        let mut out = [0u8; 3];
        c.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"ok\n");
        assert_eq!(std::fs::read(&log).unwrap(), b"ok\n");
        drop(s);
        assert!(!sock.exists(), "the socket file goes with the UART");
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "the client sees EOF");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
