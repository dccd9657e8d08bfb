//! A minimal 16550 UART on COM1 (port 0x3f8): what a boot sector or the built-in guests
//! need to print, with its registers saved and restored across a migration.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use parking_lot::Mutex;

/// COM1's base I/O port.
pub const COM1: u16 = 0x3f8;
/// Registers of the UART's port window.
pub const PORTS: u16 = 8;

const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;

/// Version of the serial state format.
pub const STATE_VERSION: u32 = 1;
const STATE_LEN: usize = 6 + 8;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Regs {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    /// Bytes transmitted since the guest started, across migrations.
    tx_count: u64,
}

/// The UART. Output goes to a file (or nowhere).
#[derive(Debug)]
pub struct Serial {
    regs: Mutex<Regs>,
    out: Mutex<Option<File>>,
}

/// Why a saved serial state is unacceptable.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The state has the wrong length or version.
    #[error("serial state version {version}, {len} bytes: expected version {STATE_VERSION}, {STATE_LEN} bytes")]
    BadState {
        /// Version found.
        version: u32,
        /// Length found.
        len: usize,
    },
}

impl Serial {
    /// A UART writing to `path` (appending), or discarding output.
    pub fn new(path: Option<&Path>) -> std::io::Result<Self> {
        let out = match path {
            Some(p) => Some(File::options().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(Serial {
            regs: Mutex::new(Regs {
                lcr: 0x03,
                dll: 0x0c,
                ..Regs::default()
            }),
            out: Mutex::new(out),
        })
    }

    /// Transmits one byte.
    pub fn transmit(&self, b: u8) {
        self.regs.lock().tx_count += 1;
        if let Some(f) = self.out.lock().as_mut() {
            // Console output is best effort: a full disk must not stop the guest.
            let _ = f.write_all(&[b]);
        }
    }

    /// Bytes transmitted since the guest started.
    pub fn tx_count(&self) -> u64 {
        self.regs.lock().tx_count
    }

    /// A guest write to port `COM1 + offset`.
    pub fn port_write(&self, offset: u16, v: u8) {
        let dlab = self.regs.lock().lcr & LCR_DLAB != 0;
        match (offset, dlab) {
            (0, false) => self.transmit(v),
            (0, true) => self.regs.lock().dll = v,
            (1, true) => self.regs.lock().dlm = v,
            (1, false) => self.regs.lock().ier = v & 0x0f,
            (3, _) => self.regs.lock().lcr = v,
            (4, _) => self.regs.lock().mcr = v & 0x1f,
            (7, _) => self.regs.lock().scr = v,
            _ => {}
        }
    }

    /// A guest read of port `COM1 + offset`.
    pub fn port_read(&self, offset: u16) -> u8 {
        let r = *self.regs.lock();
        let dlab = r.lcr & LCR_DLAB != 0;
        match (offset, dlab) {
            (0, true) => r.dll,
            (1, true) => r.dlm,
            (1, false) => r.ier,
            (2, _) => 0x01, // no interrupt pending
            (3, _) => r.lcr,
            (4, _) => r.mcr,
            (5, _) => LSR_THRE | LSR_TEMT, // the transmitter is always ready
            (6, _) => 0xb0,                // DCD, DSR, CTS
            (7, _) => r.scr,
            _ => 0,
        }
    }

    /// The registers as a state blob.
    pub fn save(&self) -> Vec<u8> {
        let r = *self.regs.lock();
        let mut v = vec![r.ier, r.lcr, r.mcr, r.scr, r.dll, r.dlm];
        v.extend_from_slice(&r.tx_count.to_le_bytes());
        v
    }

    /// Restores registers saved by [`Serial::save`].
    pub fn load(&self, version: u32, data: &[u8]) -> Result<(), SerialError> {
        if version != STATE_VERSION || data.len() != STATE_LEN {
            return Err(SerialError::BadState {
                version,
                len: data.len(),
            });
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&data[6..14]);
        *self.regs.lock() = Regs {
            ier: data[0],
            lcr: data[1],
            mcr: data[2],
            scr: data[3],
            dll: data[4],
            dlm: data[5],
            tx_count: u64::from_le_bytes(c),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_survive_save_and_load() {
        let a = Serial::new(None).unwrap();
        a.port_write(3, 0x83); // DLAB
        a.port_write(0, 0x01);
        a.port_write(3, 0x03);
        a.port_write(7, 0x5a);
        a.port_write(0, b'B');
        assert_eq!(a.port_read(5) & LSR_THRE, LSR_THRE);
        let b = Serial::new(None).unwrap();
        b.load(STATE_VERSION, &a.save()).unwrap();
        assert_eq!(b.port_read(7), 0x5a);
        assert_eq!(b.tx_count(), 1);
        b.port_write(3, 0x83);
        assert_eq!(b.port_read(0), 0x01);
        assert!(b.load(2, &a.save()).is_err());
        assert!(b.load(STATE_VERSION, &[0; 3]).is_err());
    }
}
