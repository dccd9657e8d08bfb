//! COM1 of `demovm`: vm-superio's 16550 (the UART of Firecracker and Cloud
//! Hypervisor) on ports 0x3f8-0x3ff, writing the guest's output to a file,
//! with its registers migrating as the device section `serial`.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_glue::session::{DeviceState, StateError};

/// COM1's base port.
pub const COM1: u16 = 0x3f8;
/// Ports of the UART.
const PORTS: u16 = 8;
/// Version of the `serial` section: nine register bytes (divisor low and
/// high, IER, IIR, LCR, LSR, MCR, MSR, scratch), the receive FIFO (a length
/// byte and the bytes), and the bytes transmitted since the guest started
/// (u64, little-endian).
const STATE_VERSION: u32 = 1;
/// The receive FIFO's size in vm-superio.
const FIFO_MAX: usize = 64;

/// No interrupt line yet: the guests of this VMM poll the UART.
struct NoIrq;

impl Trigger for NoIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts the bytes the guest transmitted.
#[derive(Default)]
struct TxCount(AtomicU64);

impl SerialEvents for TxCount {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {}
}

/// Where the guest's output goes: a file (appended to), or nowhere.
enum Out {
    File(File),
    Sink,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::File(f) => f.write(buf),
            Out::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::File(f) => f.flush(),
            Out::Sink => Ok(()),
        }
    }
}

type Uart = Serial<NoIrq, Arc<TxCount>, Out>;

/// The UART.
pub struct Com1 {
    uart: Mutex<Option<Uart>>,
    tx: Arc<TxCount>,
}

impl Com1 {
    /// A UART writing to `path` (appending), or discarding its output.
    pub fn new(path: Option<&Path>) -> io::Result<Com1> {
        let out = match path {
            Some(p) => Out::File(File::options().create(true).append(true).open(p)?),
            None => Out::Sink,
        };
        let tx = Arc::new(TxCount::default());
        Ok(Com1 {
            uart: Mutex::new(Some(Serial::with_events(NoIrq, Arc::clone(&tx), out))),
            tx,
        })
    }

    /// Bytes the guest transmitted since it started (across migrations).
    pub fn tx_count(&self) -> u64 {
        self.tx.0.load(Ordering::Relaxed)
    }

    /// A guest write to `port`, if it is one of COM1's.
    pub fn port_write(&self, port: u16, value: u8) -> bool {
        let Some(offset) = offset(port) else {
            return false;
        };
        if let Some(u) = self.uart.lock().as_mut() {
            // Console output is best effort: a full disk must not stop the guest.
            if let Err(e) = u.write(offset, value) {
                log::debug!("COM1 write: {e:?}");
            }
        }
        true
    }

    /// A guest read of `port`, if it is one of COM1's.
    pub fn port_read(&self, port: u16) -> Option<u8> {
        let offset = offset(port)?;
        Some(self.uart.lock().as_mut().map_or(0xff, |u| u.read(offset)))
    }
}

fn offset(port: u16) -> Option<u8> {
    port.checked_sub(COM1)
        .filter(|o| *o < PORTS)
        .and_then(|o| u8::try_from(o).ok())
}

impl DeviceState for Com1 {
    fn name(&self) -> &str {
        "serial"
    }

    fn version(&self) -> u32 {
        STATE_VERSION
    }

    fn save(&self) -> Result<Vec<u8>, StateError> {
        let guard = self.uart.lock();
        let s = guard
            .as_ref()
            .map(Uart::state)
            .ok_or_else(|| StateError::InvalidState("COM1 is being restored".into()))?;
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
        let mut guard = self.uart.lock();
        let old = guard
            .take()
            .ok_or_else(|| StateError::InvalidState("COM1 is being restored".into()))?;
        let out = old.into_writer();
        let uart = Serial::from_state(&state, NoIrq, Arc::clone(&self.tx), out)
            .map_err(|e| bad(format!("{e:?}")))?;
        *guard = Some(uart);
        self.tx
            .0
            .store(u64::from_le_bytes(count), Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_count_survive_save_and_load() {
        let a = Com1::new(None).unwrap();
        a.port_write(COM1 + 3, 0x83); // DLAB on
        a.port_write(COM1, 0x01); // divisor low
        a.port_write(COM1 + 3, 0x03);
        a.port_write(COM1 + 7, 0x5a); // scratch
        a.port_write(COM1, b'B');
        assert_eq!(a.tx_count(), 1);
        assert_eq!(a.port_read(COM1 + 5).unwrap() & 0x20, 0x20, "THR empty");
        let b = Com1::new(None).unwrap();
        b.load(STATE_VERSION, &a.save().unwrap()).unwrap();
        assert_eq!(b.port_read(COM1 + 7), Some(0x5a));
        assert_eq!(b.tx_count(), 1);
        b.port_write(COM1 + 3, 0x83);
        assert_eq!(b.port_read(COM1), Some(0x01));
        assert!(b.load(2, &a.save().unwrap()).is_err());
        assert!(b.load(STATE_VERSION, &[0; 3]).is_err());
        let mut long = a.save().unwrap();
        long[9] = 65;
        assert!(b.load(STATE_VERSION, &long).is_err(), "FIFO over 64 bytes");
        assert_eq!(
            b.port_read(COM1 + 7),
            Some(0x5a),
            "a refused state changes nothing"
        );
        assert_eq!(a.port_read(0x2f8), None, "not COM1");
    }
}
